//! The boot counter a device keeps across restarts (SPEC section 3, `epoch`), in
//! `<state>/<id>.epoch` as decimal text.
//!
//! Invariant: [`EpochStore::advance`] returns an epoch only after it is durable: the new
//! value is written to a temporary sibling, fsynced, renamed over the old file and the
//! directory is fsynced. A device calls it on every (simulated) start and reboot BEFORE
//! making the first message of the new epoch, so a crash at any point can never reuse an
//! epoch that messages were already sent under (which the bridge would refuse as
//! `replay`). A missing file means the device never booted: its first epoch is 1.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Why the epoch could not be read or advanced.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EpochError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a decimal epoch")]
    Corrupt { path: PathBuf },
    #[error("{path}: the epoch cannot go past {}", u64::MAX)]
    Exhausted { path: PathBuf },
}

/// The epoch file of one device.
#[derive(Debug, Clone)]
pub struct EpochStore {
    path: PathBuf,
}

impl EpochStore {
    /// The store for `device` in `state_dir` (created on first [`advance`](Self::advance)).
    pub fn new(state_dir: &Path, device: &str) -> Self {
        Self {
            path: state_dir.join(format!("{device}.epoch")),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last epoch made durable, `None` if the device never booted.
    pub fn current(&self) -> Result<Option<u64>, EpochError> {
        match fs::read_to_string(&self.path) {
            Ok(text) => text
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| EpochError::Corrupt {
                    path: self.path.clone(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(self.io(source)),
        }
    }

    /// Increments the epoch and makes it durable; returns the new epoch.
    pub fn advance(&self) -> Result<u64, EpochError> {
        let next = match self.current()? {
            None => 1,
            Some(e) => e.checked_add(1).ok_or_else(|| EpochError::Exhausted {
                path: self.path.clone(),
            })?,
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(|source| self.io(source))?;
        let mut tmp = self.path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let write = || -> std::io::Result<()> {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            file.write_all(format!("{next}\n").as_bytes())?;
            file.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            // The rename is durable only once the directory entry is.
            File::open(dir)?.sync_all()
        };
        write().map_err(|source| self.io(source))?;
        Ok(next)
    }

    fn io(&self, source: std::io::Error) -> EpochError {
        EpochError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_boot_is_one_then_increments() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = EpochStore::new(&dir.path().join("state"), "dev-00001");
        assert_eq!(store.current().expect("read"), None);
        assert_eq!(store.advance().expect("advance"), 1);
        assert_eq!(store.advance().expect("advance"), 2);
        // Another store on the same file (a restarted process) continues from there.
        let again = EpochStore::new(&dir.path().join("state"), "dev-00001");
        assert_eq!(again.current().expect("read"), Some(2));
        assert_eq!(again.advance().expect("advance"), 3);
        assert_eq!(
            fs::read_to_string(dir.path().join("state/dev-00001.epoch")).expect("file"),
            "3\n"
        );
        assert!(!dir.path().join("state/dev-00001.epoch.tmp").exists());
        // Devices do not share a counter.
        assert_eq!(
            EpochStore::new(&dir.path().join("state"), "dev-00002")
                .advance()
                .expect("advance"),
            1
        );
    }

    #[test]
    fn corrupt_or_exhausted_epochs_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = EpochStore::new(dir.path(), "dev-00001");
        fs::write(store.path(), "seven\n").expect("write");
        assert!(matches!(store.advance(), Err(EpochError::Corrupt { .. })));
        fs::write(store.path(), format!("{}\n", u64::MAX)).expect("write");
        assert!(matches!(store.advance(), Err(EpochError::Exhausted { .. })));
        assert_eq!(
            store.current().expect("read"),
            Some(u64::MAX),
            "left as it was"
        );
    }
}
