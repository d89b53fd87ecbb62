//! Online backup of the store, and restore into a new data directory (issue 20).
//!
//! A backup is a directory holding `bridge.sqlite3` (a self-contained copy, rollback
//! journal mode, no `-wal`) and `manifest.json` ([`BackupManifest`]: format, when, from
//! where, schema version, the copy's SHA-256, row counts, highest event position). It is
//! taken while the bridge runs: SQLite's backup API copies the pages from one read
//! transaction on a separate connection. In WAL mode a reader never blocks the recorder
//! (only checkpoints wait for it, so the WAL grows while a backup runs), and the read
//! transaction fixes one snapshot: the copy is the store as of one commit, and the
//! backup is not restarted by the recorder's writes. Pages are copied in steps with a
//! short pause, so a large backup does not take the disk from the recorder.
//!
//! What makes a restore resume exactly once: the sequence windows (`device_state`)
//! travel in the same copy as the events they cover, so after a restore a device's
//! resend of a message in the backup is a duplicate, and one stored after the backup
//! point is new to the restored store and accepted again.
//!
//! The keyring (per-patient data keys) is NOT in a backup, by design: erasing a patient
//! destroys their key, and that must make every backup taken before the erasure
//! unreadable too (crypto-shredding). Operators back the keyring and its key file up
//! separately, knowing that restoring an old keyring would resurrect erased keys.

use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::{DB_FILE, Store, StoreError, schema};

/// The `format` of every manifest this code writes and reads.
pub const BACKUP_FORMAT: &str = "vitalmq-backup/v1";
/// File name of the manifest inside a backup directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// What the manifest says about the keyring.
pub const KEYRING_NOTE: &str = "the keyring (per-patient data keys) is not included, by design: \
     erasure destroys a patient's key, which makes this backup unreadable for that patient; \
     back the keyring and its key file up separately";

/// Pages copied per step (4 MiB at SQLite's default page size) and the pause between
/// steps.
const PAGES_PER_STEP: i32 = 1024;
const STEP_PAUSE: Duration = Duration::from_millis(5);
/// How long a step may keep finding the source locked before the backup gives up.
const LOCKED_FOR: Duration = Duration::from_secs(30);

/// A backup or restore failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    #[error(
        "{path}: exists and is not empty; a backup or restore only writes into a new directory"
    )]
    NotEmpty { path: PathBuf },
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("{path}: integrity check failed: {detail}")]
    Integrity { path: PathBuf, detail: String },
    #[error("{path}: not a vitalmq backup manifest: {detail}")]
    Manifest { path: PathBuf, detail: String },
    #[error(
        "{path}: SHA-256 {found} does not match the manifest ({expected}); the backup is damaged or was changed, nothing restored"
    )]
    HashMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{path}: the source stayed locked for {LOCKED_FOR:?}")]
    Locked { path: PathBuf },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Rows in the copy, per table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupCounts {
    pub events: u64,
    pub raw_messages: u64,
    pub alerts: u64,
    pub quarantine: u64,
}

/// `manifest.json` of a backup directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupManifest {
    /// [`BACKUP_FORMAT`].
    pub format: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// The database the copy was taken from.
    pub source: PathBuf,
    /// The copy's schema version (`PRAGMA user_version`).
    pub schema_version: usize,
    /// The database file in the backup directory, [`DB_FILE`].
    pub database: String,
    /// SHA-256 of the database file, hex.
    pub sha256: String,
    /// Its length.
    pub bytes: u64,
    pub counts: BackupCounts,
    /// Highest outbox position (`events.position`) in the copy, 0 when empty.
    pub highest_event_position: i64,
    /// [`KEYRING_NOTE`].
    pub keyring: String,
}

/// What a restore put in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestoreReport {
    /// The new data directory.
    pub data_dir: PathBuf,
    /// SHA-256 of the restored database file (equal to the manifest's).
    pub sha256: String,
    /// Schema version in the backup, and after the normal open migrated it.
    pub backup_schema_version: usize,
    pub schema_version: usize,
    pub counts: BackupCounts,
    pub highest_event_position: i64,
}

impl Store {
    /// Takes an online, consistent backup of this store into `dest_dir` (created 0700,
    /// refused if it exists and is not empty), through a connection of its own: the
    /// store's connection stays the recorder's. See the module documentation.
    pub fn backup_to(&self, dest_dir: &Path) -> Result<BackupManifest, BackupError> {
        backup(&self.path, dest_dir, PAGES_PER_STEP, STEP_PAUSE)
    }
}

fn backup(
    source: &Path,
    dest_dir: &Path,
    pages_per_step: i32,
    pause: Duration,
) -> Result<BackupManifest, BackupError> {
    let made = NewDir::make(dest_dir)?;
    let db = dest_dir.join(DB_FILE);
    let copied = copy_online(source, &db, pages_per_step, pause).and_then(|()| {
        let (schema_version, counts, highest_event_position) = describe(&db)?;
        sync_file(&db)?;
        let (sha256, bytes) = hash_file(&db)?;
        let manifest = BackupManifest {
            format: BACKUP_FORMAT.into(),
            created_at: now_rfc3339(),
            source: source.to_path_buf(),
            schema_version,
            database: DB_FILE.into(),
            sha256,
            bytes,
            counts,
            highest_event_position,
            keyring: KEYRING_NOTE.into(),
        };
        write_manifest(&dest_dir.join(MANIFEST_FILE), &manifest)?;
        sync_dir(dest_dir)?;
        Ok(manifest)
    });
    match copied {
        Ok(manifest) => {
            tracing::info!(
                backup = %dest_dir.display(),
                events = manifest.counts.events,
                highest_event_position = manifest.highest_event_position,
                "store backup taken"
            );
            Ok(manifest)
        }
        Err(e) => {
            made.undo(&[DB_FILE, MANIFEST_FILE]);
            Err(e)
        }
    }
}

/// Copies `source` to the new file `dest` from one read snapshot, stepwise, then makes
/// the copy a self-contained rollback-journal database.
fn copy_online(
    source: &Path,
    dest: &Path,
    pages_per_step: i32,
    pause: Duration,
) -> Result<(), BackupError> {
    let src_err = |source_err| BackupError::Sqlite {
        path: source.to_path_buf(),
        source: source_err,
    };
    let dst_err = |source_err| BackupError::Sqlite {
        path: dest.to_path_buf(),
        source: source_err,
    };
    let src = Connection::open_with_flags(
        source,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(src_err)?;
    src.busy_timeout(Duration::from_secs(10)).map_err(src_err)?;
    create_private(dest)?;
    let mut dst = Connection::open(dest).map_err(dst_err)?;
    {
        // One read transaction for the whole copy: its snapshot is what is copied,
        // whatever the recorder commits meanwhile.
        let snapshot = src.unchecked_transaction().map_err(src_err)?;
        snapshot
            .query_row("SELECT COUNT(*) FROM sqlite_schema", [], |_| Ok(()))
            .map_err(src_err)?;
        let copy = Backup::new(&snapshot, &mut dst).map_err(dst_err)?;
        let mut locked_since = None;
        loop {
            match copy.step(pages_per_step).map_err(src_err)? {
                StepResult::Done => break,
                StepResult::More => locked_since = None,
                StepResult::Busy | StepResult::Locked => {
                    let since = *locked_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() > LOCKED_FOR {
                        return Err(BackupError::Locked {
                            path: source.to_path_buf(),
                        });
                    }
                }
                _ => {}
            }
            std::thread::sleep(pause);
        }
    }
    // The copy carries the source's WAL flag; a backup is one file.
    dst.query_row("PRAGMA journal_mode = DELETE", [], |_| Ok(()))
        .map_err(dst_err)?;
    integrity_check(&dst, dest)?;
    dst.close().map_err(|(_, e)| dst_err(e))
}

/// `PRAGMA integrity_check` of `conn` (the database at `path`).
fn integrity_check(conn: &Connection, path: &Path) -> Result<(), BackupError> {
    let mut stmt =
        conn.prepare("PRAGMA integrity_check")
            .map_err(|source| BackupError::Sqlite {
                path: path.to_path_buf(),
                source,
            })?;
    let found: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .and_then(Iterator::collect)
        .map_err(|source| BackupError::Sqlite {
            path: path.to_path_buf(),
            source,
        })?;
    if found.len() == 1 && found[0] == "ok" {
        Ok(())
    } else {
        Err(BackupError::Integrity {
            path: path.to_path_buf(),
            detail: found.join("; "),
        })
    }
}

/// Schema version, row counts and highest event position of the database at `db`.
fn describe(db: &Path) -> Result<(usize, BackupCounts, i64), BackupError> {
    let conn =
        Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|source| {
            BackupError::Sqlite {
                path: db.to_path_buf(),
                source,
            }
        })?;
    counts_of(&conn).map_err(|source| BackupError::Sqlite {
        path: db.to_path_buf(),
        source,
    })
}

fn counts_of(conn: &Connection) -> rusqlite::Result<(usize, BackupCounts, i64)> {
    let count = |table: &str| -> rusqlite::Result<u64> {
        conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| {
            r.get::<_, i64>(0)
        })
        .map(super::i2u)
    };
    let counts = BackupCounts {
        events: count("events")?,
        raw_messages: count("raw_messages")?,
        alerts: count("alerts")?,
        quarantine: count("quarantine")?,
    };
    let highest = conn.query_row("SELECT COALESCE(MAX(position), 0) FROM events", [], |r| {
        r.get(0)
    })?;
    Ok((schema::version(conn)?, counts, highest))
}

/// Restores the backup in `backup_dir` into the new data directory `data_dir` (created
/// 0700; refused if it exists and is not empty): checks the copy against its manifest
/// before writing anything, copies it to `data_dir/bridge.sqlite3` (0600), checks the
/// copy's integrity and opens it as the bridge does (which migrates it forward). On a
/// failure after the copy started, what it wrote is removed again.
pub fn restore(backup_dir: &Path, data_dir: &Path) -> Result<RestoreReport, BackupError> {
    let manifest = read_manifest(&backup_dir.join(MANIFEST_FILE))?;
    let source = backup_dir.join(DB_FILE);
    if !is_absent_or_empty(data_dir)? {
        return Err(BackupError::NotEmpty {
            path: data_dir.to_path_buf(),
        });
    }
    let (found, _) = hash_file(&source)?;
    if found != manifest.sha256 {
        return Err(BackupError::HashMismatch {
            path: source,
            expected: manifest.sha256,
            found,
        });
    }
    let made = NewDir::make(data_dir)?;
    let target = data_dir.join(DB_FILE);
    let restored = copy_verified(&source, &target, &manifest.sha256).and_then(|()| {
        let conn = Connection::open_with_flags(&target, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(
            |source| BackupError::Sqlite {
                path: target.clone(),
                source,
            },
        )?;
        integrity_check(&conn, &target)?;
        drop(conn);
        let store = Store::open(data_dir)?;
        let (schema_version, counts, highest_event_position) =
            counts_of(&store.conn).map_err(|e| BackupError::Store(store.err(e)))?;
        drop(store);
        sync_dir(data_dir)?;
        Ok(RestoreReport {
            data_dir: data_dir.to_path_buf(),
            sha256: manifest.sha256.clone(),
            backup_schema_version: manifest.schema_version,
            schema_version,
            counts,
            highest_event_position,
        })
    });
    match restored {
        Ok(report) => {
            tracing::info!(
                data_dir = %data_dir.display(),
                events = report.counts.events,
                "store restored from backup"
            );
            Ok(report)
        }
        Err(e) => {
            let wal = format!("{DB_FILE}-wal");
            let shm = format!("{DB_FILE}-shm");
            made.undo(&[DB_FILE, &wal, &shm]);
            Err(e)
        }
    }
}

/// Reads and checks the manifest at `path`.
pub fn read_manifest(path: &Path) -> Result<BackupManifest, BackupError> {
    let bad = |detail: String| BackupError::Manifest {
        path: path.to_path_buf(),
        detail,
    };
    let text = std::fs::read(path).map_err(|source| BackupError::Io {
        path: path.to_path_buf(),
        what: "cannot read the backup manifest",
        source,
    })?;
    let manifest: BackupManifest = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    if manifest.format != BACKUP_FORMAT {
        return Err(bad(format!(
            "format {:?}, this vitalmq reads {BACKUP_FORMAT:?}",
            manifest.format
        )));
    }
    if manifest.database != DB_FILE {
        return Err(bad(format!(
            "database {:?}, not {DB_FILE:?}",
            manifest.database
        )));
    }
    Ok(manifest)
}

/// Copies `from` to the new file `to` (0600), hashing what it copies; the copy must hash
/// to `expected` (the source may have changed since it was checked).
fn copy_verified(from: &Path, to: &Path, expected: &str) -> Result<(), BackupError> {
    let io = |path: &Path, what: &'static str| {
        let path = path.to_path_buf();
        move |source| BackupError::Io { path, what, source }
    };
    let mut input = std::fs::File::open(from).map_err(io(from, "cannot read the backup"))?;
    let mut output = create_private(to)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = input
            .read(&mut buf)
            .map_err(io(from, "cannot read the backup"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        output
            .write_all(&buf[..n])
            .map_err(io(to, "cannot write the restored database"))?;
    }
    output
        .sync_all()
        .map_err(io(to, "cannot sync the restored database"))?;
    let found = hex::encode(hasher.finalize());
    if found != expected {
        return Err(BackupError::HashMismatch {
            path: from.to_path_buf(),
            expected: expected.to_owned(),
            found,
        });
    }
    Ok(())
}

fn write_manifest(path: &Path, manifest: &BackupManifest) -> Result<(), BackupError> {
    let io = |source| BackupError::Io {
        path: path.to_path_buf(),
        what: "cannot write the backup manifest",
        source,
    };
    let mut text = serde_json::to_vec_pretty(manifest).map_err(|e| io(e.into()))?;
    text.push(b'\n');
    let mut file = create_private(path)?;
    file.write_all(&text).map_err(io)?;
    file.sync_all().map_err(io)
}

/// Creates the new file `path`, 0600.
fn create_private(path: &Path) -> Result<std::fs::File, BackupError> {
    vitalmq_private_fs::create_options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| BackupError::Io {
            path: path.to_path_buf(),
            what: "cannot create the file",
            source,
        })
}

/// SHA-256 (hex) and length of the file at `path`.
fn hash_file(path: &Path) -> Result<(String, u64), BackupError> {
    let mut file = std::fs::File::open(path).map_err(|source| BackupError::Io {
        path: path.to_path_buf(),
        what: "cannot read the database file",
        source,
    })?;
    let mut hasher = sha2::Sha256::new();
    let bytes = std::io::copy(&mut file, &mut hasher).map_err(|source| BackupError::Io {
        path: path.to_path_buf(),
        what: "cannot read the database file",
        source,
    })?;
    Ok((hex::encode(hasher.finalize()), bytes))
}

fn sync_file(path: &Path) -> Result<(), BackupError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|source| BackupError::Io {
            path: path.to_path_buf(),
            what: "cannot sync the file",
            source,
        })
}

fn sync_dir(path: &Path) -> Result<(), BackupError> {
    std::fs::File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|source| BackupError::Io {
            path: path.to_path_buf(),
            what: "cannot sync the directory",
            source,
        })
}

fn is_absent_or_empty(path: &Path) -> Result<bool, BackupError> {
    match std::fs::read_dir(path) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(source) => Err(BackupError::Io {
            path: path.to_path_buf(),
            what: "cannot read the directory",
            source,
        }),
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| time::OffsetDateTime::now_utc().unix_timestamp().to_string())
}

/// A directory a backup or restore writes into: new (made 0700 here), or empty (made
/// 0700: it will hold patient-linked data).
struct NewDir {
    path: PathBuf,
    created: bool,
}

impl NewDir {
    fn make(path: &Path) -> Result<Self, BackupError> {
        let existed = path.exists();
        if !is_absent_or_empty(path)? {
            return Err(BackupError::NotEmpty {
                path: path.to_path_buf(),
            });
        }
        let io = |what, source| BackupError::Io {
            path: path.to_path_buf(),
            what,
            source,
        };
        if existed {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| io("cannot make the directory owner-only", e))?;
        } else {
            vitalmq_private_fs::dir_builder()
                .create(path)
                .map_err(|e| io("cannot create the directory", e))?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            created: !existed,
        })
    }

    /// Removes `files` (those that exist), then the directory if it was made here.
    fn undo(self, files: &[&str]) {
        for file in files {
            let _ = std::fs::remove_file(self.path.join(file));
        }
        if self.created {
            let _ = std::fs::remove_dir(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Commit;
    use crate::store::write::test_events::event;
    use crate::window::{Accepted, DeviceSequence, WindowSize};
    use vitalmq_envelope::DeviceId;

    const BATCH: u64 = 25;

    /// Commits batch `b` (events `b*BATCH .. (b+1)*BATCH` of dev-00001) with the
    /// device's window, as the recorder does.
    fn commit_batch(store: &mut Store, b: u64) {
        let first = b * BATCH;
        let mut window = DeviceSequence::first(WindowSize::default(), 1, 0);
        for s in 1..first + BATCH {
            window.apply(1, s, Accepted::InOrder);
        }
        store
            .commit(&Commit {
                events: (first..first + BATCH)
                    .map(|s| event("dev-00001", 1, s))
                    .collect(),
                sequences: vec![(DeviceId::new("dev-00001").expect("id"), window)],
                now_ms: 5,
                ..Commit::default()
            })
            .expect("commit");
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn a_backup_under_concurrent_writes_is_one_consistent_snapshot() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let mut store = Store::open(&data).expect("open");
        const FIRST: u64 = 20;
        for b in 0..FIRST {
            commit_batch(&mut store, b);
        }
        let committed = Arc::new(AtomicU64::new(FIRST));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (data, committed, stop) = (data.clone(), committed.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut store = Store::open(&data).expect("writer open");
                let mut b = FIRST;
                while !stop.load(Ordering::SeqCst) {
                    commit_batch(&mut store, b);
                    b += 1;
                    committed.store(b, Ordering::SeqCst);
                }
            })
        };
        while committed.load(Ordering::SeqCst) == FIRST {
            std::thread::yield_now();
        }
        // One page per step with a pause: the writer commits between the steps.
        let dest = dir.path().join("backup");
        let before = committed.load(Ordering::SeqCst);
        let manifest = backup(&store.path, &dest, 1, Duration::from_millis(1)).expect("backup");
        let after = committed.load(Ordering::SeqCst);
        stop.store(true, Ordering::SeqCst);
        writer.join().expect("writer");
        assert!(
            after > before,
            "the recorder kept committing during the backup"
        );
        assert_eq!(manifest.format, BACKUP_FORMAT);
        assert_eq!(manifest.schema_version, schema::VERSION);
        let events = manifest.counts.events;
        assert!(
            (before * BATCH..=after * BATCH).contains(&events),
            "{before}..{after} batches: {manifest:?}"
        );
        assert_eq!(events % BATCH, 0, "whole commits only: {manifest:?}");
        assert_eq!(manifest.counts.raw_messages, events);
        assert_eq!(
            manifest.highest_event_position,
            i64::try_from(events).expect("i64")
        );
        // The manifest describes the file: hash, counts, and the window of that point.
        let db = dest.join(DB_FILE);
        assert_eq!(hash_file(&db).expect("hash").0, manifest.sha256);
        assert!(!dest.join(format!("{DB_FILE}-wal")).exists());
        let restored = dir.path().join("restored");
        let report = restore(&dest, &restored).expect("restore");
        assert_eq!(report.counts, manifest.counts);
        let copy = Store::open(&restored).expect("open copy");
        let windows = copy.load_sequences(WindowSize::default()).expect("windows");
        let window = &windows[&DeviceId::new("dev-00001").expect("id")];
        assert_eq!(
            window.highest(),
            events - 1,
            "the window travels with its events"
        );
    }

    #[test]
    fn backup_and_restore_make_owner_only_files_and_directories() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(&dir.path().join("data")).expect("open");
        commit_batch(&mut store, 0);
        let dest = dir.path().join("backup");
        store.backup_to(&dest).expect("backup");
        assert_eq!(mode(&dest), 0o700);
        assert_eq!(mode(&dest.join(DB_FILE)), 0o600);
        assert_eq!(mode(&dest.join(MANIFEST_FILE)), 0o600);
        // An empty directory the operator made is used, and made owner-only.
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).expect("mkdir");
        std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let report = restore(&dest, &empty).expect("restore");
        assert_eq!(report.counts.events, BATCH);
        assert_eq!(mode(&empty), 0o700);
        assert_eq!(mode(&empty.join(DB_FILE)), 0o600);
        let fresh = dir.path().join("a/b/fresh");
        restore(&dest, &fresh).expect("restore into a new path");
        assert_eq!(mode(&fresh), 0o700);
        assert_eq!(mode(&fresh.join(DB_FILE)), 0o600);
    }

    #[test]
    fn a_non_empty_target_is_refused_and_left_as_it_was() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(&dir.path().join("data")).expect("open");
        commit_batch(&mut store, 0);
        let taken = dir.path().join("taken");
        std::fs::create_dir(&taken).expect("mkdir");
        std::fs::write(taken.join("keep"), b"x").expect("write");
        let err = store
            .backup_to(&taken)
            .expect_err("non-empty backup target");
        assert!(matches!(err, BackupError::NotEmpty { .. }), "{err}");
        let dest = dir.path().join("backup");
        store.backup_to(&dest).expect("backup");
        // A second backup into the same directory is refused too.
        assert!(matches!(
            store.backup_to(&dest),
            Err(BackupError::NotEmpty { .. })
        ));
        let err = restore(&dest, &taken).expect_err("non-empty restore target");
        assert!(matches!(err, BackupError::NotEmpty { .. }), "{err}");
        // Restoring into a live data directory is refused.
        let err = restore(&dest, &dir.path().join("data")).expect_err("live data dir");
        assert!(matches!(err, BackupError::NotEmpty { .. }), "{err}");
        let left: Vec<_> = std::fs::read_dir(&taken)
            .expect("read")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("keep")]);
    }

    #[test]
    fn a_backup_that_does_not_match_its_manifest_is_not_restored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(&dir.path().join("data")).expect("open");
        commit_batch(&mut store, 0);
        let dest = dir.path().join("backup");
        store.backup_to(&dest).expect("backup");
        let db = dest.join(DB_FILE);
        let mut bytes = std::fs::read(&db).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&db, &bytes).expect("write");
        let target = dir.path().join("restored");
        let err = restore(&dest, &target).expect_err("damaged backup");
        assert!(matches!(err, BackupError::HashMismatch { .. }), "{err}");
        assert!(
            err.to_string().contains("does not match the manifest"),
            "{err}"
        );
        assert!(!target.exists(), "nothing written");
        // A manifest of another format is refused before anything is read.
        std::fs::write(dest.join(MANIFEST_FILE), br#"{"format":"other"}"#).expect("write");
        let err = restore(&dest, &target).expect_err("bad manifest");
        assert!(matches!(err, BackupError::Manifest { .. }), "{err}");
        assert!(!target.exists(), "nothing written");
    }
}
