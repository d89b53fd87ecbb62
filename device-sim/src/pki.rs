//! Client identities from a PKI directory made by `vitalmq certs init` (layout in
//! `vitalmq_certs::layout`): the CA that anchors the broker's certificate, each party's
//! SPIFFE identity certificate and key, and each device's COSE signing key.
//!
//! Shared by the simulated devices and gateways and the load generator. Reading the PKI
//! is the only thing this module does; nothing here opens a connection. The TLS client
//! configuration is built by [`vitalmq_mqtt_client::tls`], as for every vitalmq client.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};
use vitalmq_envelope::SigningKey;
use vitalmq_mqtt_client::{TlsError, tls};

/// Why an identity or key could not be read from the PKI.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{dir} has {have} device identities, {need} needed (vitalmq certs init --devices {need})"
    )]
    TooFewDevices {
        dir: String,
        have: usize,
        need: usize,
    },
    #[error("{}: {source}", path.display())]
    SigningKey {
        path: PathBuf,
        source: vitalmq_envelope::KeyError,
    },
}

/// A client identity: its id and a TLS client configuration (kept for all its
/// reconnects so that the session cache inside is reused).
#[derive(Debug, Clone)]
pub struct Identity {
    pub id: String,
    pub tls: Arc<ClientConfig>,
}

/// The PKI directory made by `vitalmq certs init`.
#[derive(Debug, Clone)]
pub struct Pki {
    pub dir: PathBuf,
    roots: Arc<RootCertStore>,
}

impl Pki {
    pub fn open(dir: &Path) -> Result<Self, PkiError> {
        Ok(Self {
            dir: dir.to_path_buf(),
            roots: Arc::new(tls::read_roots(&dir.join("ca/ca.pem"))?),
        })
    }

    /// Ids of a role's identities (`identities/<role>/<id>.pem`), sorted.
    pub fn ids(&self, role: &str) -> Result<Vec<String>, PkiError> {
        let dir = self.dir.join("identities").join(role);
        let io = |source| PkiError::Io {
            path: dir.clone(),
            source,
        };
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io)? {
            let name = entry
                .map_err(io)?
                .file_name()
                .to_string_lossy()
                .into_owned();
            if let Some(id) = name.strip_suffix(".pem")
                && !id.ends_with(".key")
            {
                ids.push(id.to_owned());
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Loads one identity's certificate and key into a TLS client configuration.
    pub fn identity(&self, role: &str, id: &str) -> Result<Identity, PkiError> {
        let base = self.dir.join("identities").join(role);
        let tls = tls::client_config(
            Arc::clone(&self.roots),
            &base.join(format!("{id}.pem")),
            &base.join(format!("{id}.key.pem")),
        )?;
        Ok(Identity {
            id: id.to_owned(),
            tls,
        })
    }

    /// The first `n` device identities (all of them when fewer exist is an error).
    pub fn devices(&self, n: usize) -> Result<Vec<Identity>, PkiError> {
        let ids = self.ids("device")?;
        if ids.len() < n {
            return Err(PkiError::TooFewDevices {
                dir: self.dir.display().to_string(),
                have: ids.len(),
                need: n,
            });
        }
        ids[..n]
            .iter()
            .map(|id| self.identity("device", id))
            .collect()
    }

    /// A device's COSE signing key (`devices/<id>/cose.key.pem`, PKCS#8).
    pub fn signing_key(&self, device: &str) -> Result<SigningKey, PkiError> {
        let path = self.dir.join("devices").join(device).join("cose.key.pem");
        let pem = std::fs::read_to_string(&path).map_err(|source| PkiError::Io {
            path: path.clone(),
            source,
        })?;
        SigningKey::from_pkcs8_pem(&pem).map_err(|source| PkiError::SigningKey { path, source })
    }
}
