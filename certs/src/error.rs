//! The errors of the PKI library. The CLI adds the argument or step ([`crate::cli::CliError`]).

use std::path::PathBuf;

use vitalmq_envelope::DeviceId;
use vitalmq_policies::{IdentityError, PrincipalId, Role, TrustDomain};

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertsError {
    /// `rcgen` refused to build or sign something (a bug or a bad key file).
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("system randomness unavailable")]
    Random,
    #[error("device key: {0}")]
    DeviceKey(#[from] vitalmq_envelope::KeyError),
    #[error("validity: not_after ({not_after}) must be later than not_before ({not_before})")]
    Validity {
        not_before: String,
        not_after: String,
    },
    #[error("`{0}` is not a valid DNS name or IP address for the server certificate")]
    ServerName(String),
    #[error("`{0}` is not a certificate serial number (hex, at most 20 bytes)")]
    Serial(String),
    #[error("{path}: refusing to overwrite, it already exists")]
    Exists { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Index {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "{path}: format: expected \"{}\", found {found:?}",
        crate::index::FORMAT
    )]
    IndexFormat { path: PathBuf, found: String },
    #[error("ca/index.json: revoked_at of {serial}: {source}")]
    RevokedAt {
        serial: String,
        source: time::error::Parse,
    },
    #[error("{path}: {source}")]
    Registry {
        path: PathBuf,
        source: vitalmq_policies::PolicyErrors,
    },
    #[error("{path}: trust domain `{found}` differs from the CA's `{ca}`")]
    RegistryDomain {
        path: PathBuf,
        found: TrustDomain,
        ca: TrustDomain,
    },
    #[error("{role} `{id}` has already been issued (serial {serial})")]
    AlreadyIssued {
        role: Role,
        id: PrincipalId,
        serial: String,
    },
    #[error("no live certificate matches {0}")]
    NotFound(String),
    #[error("certificate {0} is already revoked")]
    AlreadyRevoked(String),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("at least one site is needed")]
    NoSites,
    #[error("at most 99 sites and 99999 devices (ids are site-NN and dev-NNNNN)")]
    TooMany,
    #[error("--es256 names `{device}`, which is not one of the {devices} devices")]
    UnknownEs256 { device: DeviceId, devices: u32 },
    #[error("device `{0}` twice")]
    DuplicateDevice(DeviceId),
    #[error("{}: directory exists and is not empty; refusing to overwrite a PKI", .0.display())]
    NotEmpty(PathBuf),
    #[error("a {0} must be bound to a site: pass --site")]
    SiteRequired(Role),
    #[error("a {0} is not bound to a site: drop --site")]
    SiteNotAllowed(Role),
    /// The registry's directory could not be locked for a change.
    #[error(transparent)]
    RegistryLock(#[from] vitalmq_private_fs::DirLockError),
    #[error("{role} `{id}` is already in {}", path.display())]
    InRegistry {
        role: Role,
        id: PrincipalId,
        path: PathBuf,
    },
}

impl CertsError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}
