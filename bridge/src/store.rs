//! The bridge's durable store: one SQLite database, `DATA_DIR/bridge.sqlite3`.
//!
//! SQLite in WAL mode with `synchronous = FULL`: a transaction that returned from
//! COMMIT survives `kill -9` and power loss. The recorder writes one transaction per
//! batch of messages (group commit), and only then acknowledges them to the broker and
//! sends receipts; so whatever a device was told is durable, is.
//!
//! Tables (all append-only except the state tables, which are replaced in place):
//!
//! | table | plane | contents |
//! |---|---|---|
//! | `raw_messages` | raw | exact COSE bytes of every accepted message, with receipt metadata (received_at, broker, publisher, topic, SHA-256) |
//! | `events` | normalized | the canonical event (JSON) per accepted message, keyed by its deterministic event id; `position` orders the outbox |
//! | `quarantine` | — | raw bytes of refused messages with their SPEC reason class |
//! | `device_state` | — | the sequence window per device (epoch, highest, bitmap) |
//! | `gaps` | — | data-completeness events: skipped sequence ranges, open, closed or lost |
//! | `counters` | — | per-device counts of duplicates, replays and refusals |
//! | `alerts` | clinical outputs | every alert state change (clinical and operational) as published, in order; the outbox of the alert handlers |
//! | `alert_state` | — | the alert engine's state per device (open episodes, persistence, baselines), JSON |
//! | `handler_cursors` | — | per alert handler (MQTT, webhooks): last alert position confirmed |
//! | `sink_cursors` | — | per sink: last outbox position confirmed, and the batch in flight |
//! | `audit_ship_cursors` | — | per (objects sink, audit log): last record shipped (seq, hash, where its line starts) and the segment in flight |
//! | `sequence_resets` | — | operator requests to reset a device's sequence state, and when the bridge applied each (see `resets`) |
//! | `withheld` | — | per sink (kind `sink`) or alert handler (kind `handler`) and reason: events or alert changes withheld by consent (issue 19) |
//!
//! The raw and normalized planes are written once, in the same transaction, and never
//! updated; `(device, epoch, seq)` is UNIQUE, so even a bug upstream cannot store an
//! event twice. `event_index` finds an event by its id (see [`EVENT_INDEX_BUCKET`]).
//! `u64` values (`epoch`, `seq`, gap bounds) are stored bit-cast to SQLite's `i64`;
//! compare them in Rust, not in SQL. Events reach the planes only as [`RecordedEvent`]s,
//! made from a `Verified<Telemetry>`: the raw plane holds the bytes that were verified.
//! The store records its schema version (`PRAGMA user_version`) and is migrated forward
//! when opened; a store newer than this code is refused ([`schema`]).
//!
//! The module is split by concept: [`schema`] (tables and their versions), `write` (the
//! recorder's commit transaction and the state it loads at start), `outbox` (the sink and
//! alert-handler outboxes with their cursors, and the audit-ship cursors), `read` (typed
//! rows for `vitalmq store`, `vitalmq trace` and the demo report), `resets` and
//! [`sealing`] (encryption at rest of the payloads, and scrubbing for erasure).
//!
//! Since schema v4 `events` and `alerts` carry the row's `patient_ref` (NULL for
//! operational alerts) in the clear, so erasure, export and retention find a patient's
//! rows without opening any payload.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::Connection;

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "bridge.sqlite3";

/// A store failure. `Full` is told apart because the bridge reacts to it (stops
/// acknowledging, raises an operational alert) instead of treating it as a bug.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("{path}: cannot create the data directory: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot create the database file: {source}")]
    CreateFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: the disk is full: {source}")]
    Full {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("{path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// The store was written by a newer vitalmq: its schema is one this code does not
    /// know, so it is not opened (and never migrated backwards).
    #[error(
        "{path}: the store has schema version {found}, newer than this vitalmq knows ({known}); use a newer vitalmq"
    )]
    NewerSchema {
        path: PathBuf,
        found: usize,
        known: usize,
    },
    #[error("{path}: cannot migrate the store from schema version {from}: {source}")]
    Migration {
        path: PathBuf,
        from: usize,
        source: Box<rusqlite_migration::Error>,
    },
    /// A sealed payload could not be opened or sealed (not an erasure: erased payloads
    /// read as erased).
    #[error("{path}: {source}")]
    Key {
        path: PathBuf,
        source: vitalmq_keyring::KeyError,
    },
    /// The store holds sealed payloads and was opened without a keyring.
    #[error("{path}: the store holds sealed payloads; its keyring is needed to read them")]
    NoKeyring { path: PathBuf },
    #[error("{path}: stored state of device {device} is corrupt: {detail}")]
    Corrupt {
        path: PathBuf,
        device: String,
        detail: String,
    },
}

/// One connection to the bridge database.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// Seals new payloads and opens sealed ones ([`sealing`]); plaintext without it.
    keyring: Option<std::sync::Arc<vitalmq_keyring::Keyring>>,
}

/// Locks a store shared between tasks. A panic while holding the lock leaves the
/// connection usable (SQLite rolled the transaction back), so poisoning is ignored.
pub fn lock(store: &std::sync::Mutex<Store>) -> std::sync::MutexGuard<'_, Store> {
    store
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Tells a full disk apart from other SQLite failures.
fn classify(path: &Path, source: rusqlite::Error) -> StoreError {
    let full = matches!(
        &source,
        rusqlite::Error::SqliteFailure(e, _) if e.code == rusqlite::ErrorCode::DiskFull
    );
    let path = path.to_path_buf();
    if full {
        StoreError::Full { path, source }
    } else {
        StoreError::Sqlite { path, source }
    }
}

fn u2i(v: u64) -> i64 {
    v as i64
}

fn i2u(v: i64) -> u64 {
    v as u64
}

impl Store {
    /// Opens (creating if needed) the database in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        vitalmq_private_fs::dir_builder()
            .create(data_dir)
            .map_err(|source| StoreError::CreateDir {
                path: data_dir.to_path_buf(),
                source,
            })?;
        let path = data_dir.join(DB_FILE);
        // Created 0600 before SQLite opens it: SQLite gives its -wal and -shm files the
        // database file's mode. Only a missing file is opened here: closing a descriptor
        // of a database this process already has open would drop the POSIX locks of
        // its SQLite connections (the bridge opens the store more than once).
        match vitalmq_private_fs::create_options()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(StoreError::CreateFile {
                    path: path.clone(),
                    source,
                });
            }
        }
        let conn = Connection::open(&path).map_err(|source| StoreError::Sqlite {
            path: path.clone(),
            source,
        })?;
        let mut store = Self {
            conn,
            path,
            keyring: None,
        };
        store
            .conn
            .busy_timeout(Duration::from_secs(10))
            .map_err(|e| store.err(e))?;
        // secure_delete (zeroing what is deleted) is turned on by the connections that
        // delete patient data: retention (`apply_retention`) and the erasure cleanup.
        // The recorder's connection deletes none, and zeroing the cells its in-place
        // updates free (windows, cursors) would cost every commit (issue 20).
        store
            .conn
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 PRAGMA foreign_keys = ON;",
            )
            .map_err(|e| store.err(e))?;
        schema::migrate(&mut store.conn, &store.path)?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Caps the database at about `bytes` (SQLite `max_page_count`). Past it, writes
    /// fail exactly as on a full disk (SQLITE_FULL), so the quota and a real full disk
    /// take the same path: nothing more is acknowledged, an operational alert is raised.
    pub fn set_quota(&self, bytes: u64) -> Result<(), StoreError> {
        let page: i64 = self
            .conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        let pages = (bytes / u64::try_from(page.max(512)).unwrap_or(4096)).max(1);
        self.conn
            .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        classify(&self.path, source)
    }
}

mod backup;
pub mod coverage;
pub mod export;
mod outbox;
mod read;
mod resets;
mod retention;
pub mod schema;
mod scores;
pub mod sealing;
mod shadow_alerts;
mod surveil;
mod write;

pub use backup::{
    BACKUP_FORMAT, BackupCounts, BackupError, BackupManifest, MANIFEST_FILE, RestoreReport,
    read_manifest, restore,
};
pub use outbox::{AuditCursor, Cursor, ShippedAudit, StoredAlert};
pub use read::{
    AlertChangeRow, AlertRow, EventDetail, EventHead, EventRow, GapRow, QuarantineRow, RawRef,
    StoreStats, Tally,
};
pub use resets::SequenceReset;
pub use retention::{
    ANONYMIZED_DEVICE, ANONYMIZED_ID_PREFIX, AlertPage, RetainedAlert, RetainedEvent,
    RetainedQuarantine, RetainedScore, RetainedShadowAlert, ShadowAlertPage, StoreAct,
    anonymized_alert_id, anonymized_score_id, anonymized_shadow_alert_id,
    anonymized_shadow_change_id,
};
pub use schema::EVENT_INDEX_BUCKET;
pub use scores::{ScoreRow, StoredScore};
pub use sealing::{NoKeys, Payload};
pub use shadow_alerts::{DeliveredChange, NewShadowAlert, StoredShadowAlert, shadow_change_id};
pub use surveil::{Reported, StoredGap, StoredRefusal, SurveilScore};
#[cfg(test)]
pub(crate) use write::test_events;
pub use write::{Commit, Committed, NewAlert, Quarantined, RecordedEvent};

#[cfg(test)]
mod tests;
