//! Turns for read-modify-write of a file that is replaced by a rename (the device
//! registry): such a file cannot carry a lock itself (each writer renames a new inode
//! over it), so writers hold an exclusive `flock` on the directory that holds it, from
//! reading the file until its replacement is in place. Every writer of the registry
//! (`vitalmq registry`, the admin API through it, `vitalmq certs issue`) takes this one
//! lock, so no change is lost to a concurrent one.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum DirLockError {
    #[error("cannot open {} to lock it: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot lock {}: {source}", path.display())]
    Lock {
        path: PathBuf,
        source: nix::errno::Errno,
    },
}

/// An exclusive lock on a directory, held until dropped.
#[derive(Debug)]
pub struct DirLock {
    _lock: Flock<File>,
}

/// Waits for, then holds, an exclusive lock on `dir`.
pub fn lock_dir(dir: &Path) -> Result<DirLock, DirLockError> {
    let file = File::open(dir).map_err(|source| DirLockError::Open {
        path: dir.to_path_buf(),
        source,
    })?;
    let lock =
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, source)| DirLockError::Lock {
            path: dir.to_path_buf(),
            source,
        })?;
    Ok(DirLock { _lock: lock })
}

/// The directory `file` is in (`.` for a bare file name), to pass to [`lock_dir`].
pub fn dir_of(file: &Path) -> &Path {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn try_lock(dir: &Path) -> bool {
        let file = File::open(dir).expect("open");
        Flock::lock(file, FlockArg::LockExclusiveNonblock).is_ok()
    }

    #[test]
    fn excludes_other_holders_until_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let held = lock_dir(dir.path()).expect("first");
        assert!(!try_lock(dir.path()), "a second holder must wait");
        drop(held);
        assert!(try_lock(dir.path()), "free once released");
    }

    #[test]
    fn dir_of_a_bare_name_is_the_current_directory() {
        assert_eq!(dir_of(Path::new("registry.toml")), Path::new("."));
        assert_eq!(dir_of(Path::new("a/registry.toml")), Path::new("a"));
    }
}
