//! Where the PKI lives on disk, and how files are written there.
//!
//! ```text
//! DIR/
//!   ca/ca.pem                        root certificate (the trust anchor)
//!   ca/ca.key.pem                    CA private key, 0600
//!   ca/index.json                    CA state: issued certificates, revocations, CRL number
//!   crl.pem                          current CRL, signed by the CA (re-signed on revoke)
//!   broker/server.pem                broker TLS certificate (localhost, 127.0.0.1)
//!   broker/server.key.pem            its key, 0600
//!   identities/<role>/<id>.pem       identity certificate, SAN spiffe://<td>/<role>/<id>
//!   identities/<role>/<id>.key.pem   its key, 0600
//!   devices/<id>/cose.key.pem        device COSE signing key (PKCS#8), 0600
//!   registry.toml                    device registry (public keys only)
//!   audit/operator.jsonl             operator audit log of `vitalmq certs` (written by the CLI)
//!   audit/audit-signing.key.pem      its checkpoint signing key, 0600 (`.pub` beside it)
//! ```
//!
//! Invariants: a private key is created with mode 0600 from the start (never widened
//! then narrowed), and nothing is ever silently overwritten: certificates and keys are
//! created with `create_new`; only the CA's own state files (index, CRL, registry) are
//! replaced, atomically, by a rename, and only under the lock on the PKI directory
//! ([`vitalmq_private_fs::lock_dir`], the lock `vitalmq registry` and the admin API
//! take to change the registry), each read again under it: concurrent `certs issue`
//! and `revoke` runs take turns and none loses another's index entry.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use vitalmq_policies::{PrincipalId, Role};

use crate::error::CertsError;

/// Subdirectory of the operator audit log; `certs init` accepts a directory holding
/// only this (the record of the init itself is written before the PKI).
pub(crate) const OPERATOR_AUDIT_DIR: &str = "audit";

/// The paths of a PKI directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca/ca.pem")
    }

    pub(crate) fn ca_key(&self) -> PathBuf {
        self.root.join("ca/ca.key.pem")
    }

    pub fn index(&self) -> PathBuf {
        self.root.join("ca/index.json")
    }

    pub fn crl(&self) -> PathBuf {
        self.root.join("crl.pem")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.root.join("broker/server.pem")
    }

    pub fn server_key(&self) -> PathBuf {
        self.root.join("broker/server.key.pem")
    }

    pub fn identity_cert(&self, role: Role, id: &PrincipalId) -> PathBuf {
        self.root.join(format!("identities/{role}/{id}.pem"))
    }

    pub fn identity_key(&self, role: Role, id: &PrincipalId) -> PathBuf {
        self.root.join(format!("identities/{role}/{id}.key.pem"))
    }

    /// The operator audit log of actions on this PKI (`vitalmq certs ...`).
    pub fn operator_audit(&self) -> PathBuf {
        self.root.join(OPERATOR_AUDIT_DIR).join("operator.jsonl")
    }

    pub(crate) fn cose_key(&self, device: &PrincipalId) -> PathBuf {
        self.root.join(format!("devices/{device}/cose.key.pem"))
    }

    pub fn registry(&self) -> PathBuf {
        self.root.join("registry.toml")
    }

    /// `path` relative to the root, for the index (so a PKI directory can be moved).
    pub(crate) fn relative(&self, path: &Path) -> PathBuf {
        path.strip_prefix(&self.root).unwrap_or(path).to_path_buf()
    }
}

/// Who may read a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Certificates, CRL, registry: 0644.
    Public,
    /// Private keys: 0600, set when the file is created.
    Secret,
}

impl Mode {
    fn bits(self) -> u32 {
        match self {
            Self::Public => 0o644,
            Self::Secret => 0o600,
        }
    }
}

fn create_parent(path: &Path) -> Result<(), CertsError> {
    match path.parent() {
        Some(parent) => fs::create_dir_all(parent).map_err(CertsError::io(parent)),
        None => Ok(()),
    }
}

/// Creates `path` with `contents`; fails if it exists.
pub(crate) fn write_new(path: &Path, contents: &str, mode: Mode) -> Result<(), CertsError> {
    create_parent(path)?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode.bits())
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                CertsError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                CertsError::io(path)(e)
            }
        })?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(CertsError::io(path))
}

/// Replaces `path` atomically (write a temporary sibling, then rename over it).
pub(crate) fn replace(path: &Path, contents: &str, mode: Mode) -> Result<(), CertsError> {
    create_parent(path)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    // A stale temporary from a crashed run is ours to discard.
    let _ = fs::remove_file(&tmp);
    write_new(&tmp, contents, mode)?;
    fs::rename(&tmp, path).map_err(CertsError::io(path))
}

/// Reads a text file with the path in the error.
pub(crate) fn read(path: &Path) -> Result<String, CertsError> {
    fs::read_to_string(path).map_err(CertsError::io(path))
}

/// Whether `dir` is missing or an empty directory (so `init` may use it); a lone
/// operator audit directory ([`OPERATOR_AUDIT_DIR`]) counts as empty.
pub fn is_absent_or_empty(dir: &Path) -> Result<bool, CertsError> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry.map_err(CertsError::io(dir))?;
                let audit_dir = entry.file_name() == OPERATOR_AUDIT_DIR
                    && entry.file_type().is_ok_and(|t| t.is_dir());
                if !audit_dir {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(CertsError::io(dir)(e)),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn secrets_are_created_0600_and_never_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a/b/key.pem");
        write_new(&path, "secret", Mode::Secret).expect("write");
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = write_new(&path, "other", Mode::Secret).expect_err("exists");
        assert!(matches!(err, CertsError::Exists { .. }), "{err}");
        assert_eq!(read(&path).expect("read"), "secret");
    }

    #[test]
    fn replace_swaps_contents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("index.json");
        replace(&path, "1", Mode::Public).expect("first");
        replace(&path, "2", Mode::Public).expect("second");
        assert_eq!(read(&path).expect("read"), "2");
        assert!(!dir.path().join("index.json.tmp").exists());
    }

    #[test]
    fn init_wants_an_empty_or_missing_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(is_absent_or_empty(dir.path()).expect("empty"));
        assert!(is_absent_or_empty(&dir.path().join("nope")).expect("missing"));
        // The operator audit directory alone does not count (it records the init).
        fs::create_dir(dir.path().join(OPERATOR_AUDIT_DIR)).expect("mkdir");
        assert!(is_absent_or_empty(dir.path()).expect("only the audit dir"));
        fs::write(dir.path().join("x"), "x").expect("write");
        assert!(!is_absent_or_empty(dir.path()).expect("not empty"));
    }
}
