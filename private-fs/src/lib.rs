//! Owner-only storage for patient-linked data.
//!
//! Every file vitalmq writes (store, objects, quarantine, audit logs, keys) may hold or
//! point at patient data, so it must not be readable by other local users. Three rules:
//!
//! - directories vitalmq creates are `0700` ([`create_dir_all`]), files `0600`
//!   ([`create_options`]), whatever the process umask;
//! - the `vitalmq` binary also sets its umask to `077`, so files created by libraries we
//!   do not control (SQLite's `-wal`/`-shm`, `object_store`'s local files) are `0600` too;
//! - at start, broker and bridge check the data roots they were given ([`check`]): a root
//!   that grants its group or others any access is refused, or only warned about when the
//!   operator's policy says so ([`ExposurePolicy`]).
//!
//! The start check looks at each root directory and the files named to it, not at every
//! object below: a `0700` root cannot be traversed by anyone else, whatever the modes
//! beneath it, and walking millions of objects at every start would not scale.

use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod dir_lock;
pub use dir_lock::{DirLock, DirLockError, dir_of, lock_dir, lock_dir_timeout};

/// Mode of the directories vitalmq creates.
pub(crate) const DIR_MODE: u32 = 0o700;
/// Mode of the files vitalmq creates.
pub(crate) const FILE_MODE: u32 = 0o600;
/// The umask the `vitalmq` binary runs under.
pub const UMASK: u32 = 0o077;
/// Permission bits for group and others: any of them set means exposed.
const OTHERS: u32 = 0o077;

#[derive(Debug, thiserror::Error)]
pub enum PrivateFsError {
    #[error("creating directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading the permissions of {path}: {source}")]
    Metadata {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "refusing to start: {} readable by other local users ({}); \
         fix with `chmod -R go-rwx` on each, or set `private_files = \"warn\"` to run anyway",
        if .0.len() == 1 { "this path is" } else { "these paths are" },
        .0.iter().map(Exposed::to_string).collect::<Vec<_>>().join(", ")
    )]
    Exposed(Vec<Exposed>),
}

/// What to do when a data root is readable by others.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExposurePolicy {
    /// Do not start (the default: patient data must not be exposed).
    #[default]
    Refuse,
    /// Start, log a warning and let the caller audit it.
    Warn,
}

/// A path whose mode grants its group or others access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exposed {
    pub path: PathBuf,
    /// The permission bits (`mode & 0o7777`).
    pub mode: u32,
}

impl std::fmt::Display for Exposed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} is {:04o}", self.path.display(), self.mode)
    }
}

/// A recursive `DirBuilder` whose newly created directories get mode `0700`.
/// Existing directories keep their mode (the start check reports them).
pub fn dir_builder() -> DirBuilder {
    let mut builder = DirBuilder::new();
    builder.recursive(true).mode(DIR_MODE);
    builder
}

/// Creates `path` and its missing parents with mode `0700`.
pub fn create_dir_all(path: &Path) -> Result<(), PrivateFsError> {
    dir_builder()
        .create(path)
        .map_err(|source| PrivateFsError::CreateDir {
            path: path.to_path_buf(),
            source,
        })
}

/// Creates the directory `file` is to be in, and its missing parents, with mode `0700`;
/// nothing when `file` names no directory.
pub fn create_parent(file: &Path) -> std::io::Result<()> {
    match file.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => dir_builder().create(parent),
        None => Ok(()),
    }
}

/// `OpenOptions` whose newly created file gets mode `0600`.
pub fn create_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.mode(FILE_MODE);
    options
}

/// The paths among `paths` that exist and grant their group or others any access.
/// Missing paths are not exposed (they will be created owner-only).
pub(crate) fn exposed(paths: &[&Path]) -> Result<Vec<Exposed>, PrivateFsError> {
    let mut found = Vec::new();
    for path in paths {
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(PrivateFsError::Metadata {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let mode = meta.permissions().mode() & 0o7777;
        if mode & OTHERS != 0 {
            found.push(Exposed {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    Ok(found)
}

/// The start check: `Err` when a path is exposed and the policy refuses; otherwise the
/// exposed paths (empty when all is well), already logged, for the caller to audit.
pub fn check(paths: &[&Path], policy: ExposurePolicy) -> Result<Vec<Exposed>, PrivateFsError> {
    let found = exposed(paths)?;
    if found.is_empty() {
        return Ok(found);
    }
    match policy {
        ExposurePolicy::Refuse => Err(PrivateFsError::Exposed(found)),
        ExposurePolicy::Warn => {
            for e in &found {
                tracing::warn!(
                    path = %e.path.display(),
                    mode = format!("{:04o}", e.mode),
                    "data path readable by other local users; running anyway (private_files = \"warn\")"
                );
            }
            Ok(found)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).expect("meta").permissions().mode() & 0o7777
    }

    #[test]
    fn creates_owner_only_directories_and_files_whatever_the_parent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nested = dir.path().join("a/b/c");
        create_dir_all(&nested).expect("create");
        for p in ["a", "a/b", "a/b/c"] {
            assert_eq!(mode(&dir.path().join(p)), 0o700, "{p}");
        }
        let file = nested.join("f");
        let mut f = create_options()
            .write(true)
            .create_new(true)
            .open(&file)
            .expect("open");
        f.write_all(b"x").expect("write");
        assert_eq!(mode(&file), 0o600);
    }

    #[test]
    fn reports_exposed_paths_and_refuses_by_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("data");
        create_dir_all(&root).expect("create");
        let missing = dir.path().join("not-yet");
        assert!(
            check(&[&root, &missing], ExposurePolicy::default())
                .expect("check")
                .is_empty()
        );

        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let err = check(&[&root], ExposurePolicy::Refuse).expect_err("refused");
        let text = err.to_string();
        assert!(text.contains("0755") && text.contains("go-rwx"), "{text}");

        let warned = check(&[&root], ExposurePolicy::Warn).expect("warn runs");
        assert_eq!(
            warned,
            vec![Exposed {
                path: root.clone(),
                mode: 0o755
            }]
        );

        // Group access alone is exposure too.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o710)).expect("chmod");
        assert_eq!(exposed(&[&root]).expect("check").len(), 1);
    }
}
