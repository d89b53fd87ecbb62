//! Turns for read-modify-write of a file that is replaced by a rename (the device
//! registry): such a file cannot carry a lock itself (each writer renames a new inode
//! over it), so writers hold an exclusive `flock` on the directory that holds it, from
//! reading the file until its replacement is in place. Every writer of the registry
//! (`vitalmq registry`, the admin API through it, `vitalmq certs issue`) takes this one
//! lock, so no change is lost to a concurrent one.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
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
    /// Another holder kept the lock past the deadline (a stuck or slow writer).
    #[error("{} stayed locked by another writer for {waited:?}; try again later", path.display())]
    Busy { path: PathBuf, waited: Duration },
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

/// Longest pause between two tries of [`lock_dir_timeout`].
const MAX_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Holds an exclusive lock on `dir`, trying until `deadline` has passed: a holder that
/// is stuck makes this fail with [`DirLockError::Busy`] rather than wait for ever
/// (and with it everything waiting behind this caller).
pub fn lock_dir_timeout(dir: &Path, deadline: Duration) -> Result<DirLock, DirLockError> {
    let started = Instant::now();
    let mut file = File::open(dir).map_err(|source| DirLockError::Open {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut pause = Duration::from_millis(1);
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(DirLock { _lock: lock }),
            Err((back, Errno::EWOULDBLOCK | Errno::EINTR)) => file = back,
            Err((_, source)) => {
                return Err(DirLockError::Lock {
                    path: dir.to_path_buf(),
                    source,
                });
            }
        }
        let waited = started.elapsed();
        if waited >= deadline {
            return Err(DirLockError::Busy {
                path: dir.to_path_buf(),
                waited,
            });
        }
        std::thread::sleep(pause.min(deadline - waited));
        pause = (pause * 2).min(MAX_RETRY_PAUSE);
    }
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
    fn a_held_lock_times_out_busy_and_is_taken_once_free() {
        let dir = tempfile::tempdir().expect("tempdir");
        let held = lock_dir(dir.path()).expect("first");
        let deadline = Duration::from_millis(200);
        let started = Instant::now();
        let busy = lock_dir_timeout(dir.path(), deadline);
        assert!(matches!(busy, Err(DirLockError::Busy { .. })), "{busy:?}");
        assert!(started.elapsed() >= deadline, "tried until the deadline");
        drop(held);
        let taken = lock_dir_timeout(dir.path(), deadline).expect("free once released");
        assert!(!try_lock(dir.path()), "and held");
        drop(taken);
    }

    #[test]
    fn dir_of_a_bare_name_is_the_current_directory() {
        assert_eq!(dir_of(Path::new("registry.toml")), Path::new("."));
        assert_eq!(dir_of(Path::new("a/registry.toml")), Path::new("a"));
    }
}
