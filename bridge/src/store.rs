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
//!
//! The raw and normalized planes are written once, in the same transaction, and never
//! updated; `(device, epoch, seq)` is UNIQUE, so even a bug upstream cannot store an
//! event twice. `event_index` finds an event by its id (see [`EVENT_INDEX_BUCKET`]).
//! `u64` values (`epoch`, `seq`, gap bounds) are stored bit-cast to SQLite's `i64`;
//! compare them in Rust, not in SQL.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension as _, params};
use vitalmq_envelope::DeviceId;

use crate::gaps::{Gap, GapState};
use crate::sink::{Batch, OutboxRecord};
use crate::window::{DeviceSequence, WindowSize};

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "bridge.sqlite3";

/// Outbox positions per `event_index` bucket.
///
/// Event ids are hashes, so an index on them takes every insert to a random leaf page: a
/// commit of 500 events dirtied ~400 pages (1.6 MB of WAL), more as the store grew, and
/// that was most of the recorder's time (`scripts/bench-bridge`). `event_index` is keyed
/// by (position / bucket, hash of the id): inserts stay within the newest bucket, a few
/// dozen pages that one commit rewrites once. A lookup probes each bucket once, newest
/// first: ~420 index probes for a day of 100 devices at one reading per 5 s.
pub const EVENT_INDEX_BUCKET: i64 = 4096;

/// The `event_index` key of an event id: its SHA-256 truncated to 64 bits. Any string
/// works (ids are opaque here); a rare collision only costs a second candidate row,
/// which the lookup compares by the full id.
fn event_key(event_id: &str) -> i64 {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(event_id.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS raw_messages (
    id              INTEGER PRIMARY KEY,
    received_at_ms  INTEGER NOT NULL,
    broker          TEXT    NOT NULL,
    publisher       TEXT    NOT NULL,
    topic           TEXT    NOT NULL,
    sha256          TEXT    NOT NULL,
    bytes           BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    position        INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        TEXT    NOT NULL,
    raw_id          INTEGER NOT NULL REFERENCES raw_messages(id),
    device          TEXT    NOT NULL,
    site            TEXT    NOT NULL,
    epoch           INTEGER NOT NULL,
    seq             INTEGER NOT NULL,
    observed_at_ms  INTEGER NOT NULL,
    received_at_ms  INTEGER NOT NULL,
    verdict         TEXT    NOT NULL,
    normalized      TEXT    NOT NULL
);
-- An event's identity is (device, epoch, seq) (SPEC section 4): even a bug upstream
-- cannot store one twice. Each device appends at its own end of this index, so a commit
-- touches one leaf page per device. (Stores made before it had UNIQUE(event_id), a
-- random key that dirtied a leaf page per event, and an unused index by time.)
CREATE UNIQUE INDEX IF NOT EXISTS events_by_sequence ON events(device, epoch, seq);
DROP INDEX IF EXISTS events_by_device;
-- Lookup of an event by its id (trace), see `EVENT_INDEX_BUCKET`.
CREATE TABLE IF NOT EXISTS event_index (
    bucket          INTEGER NOT NULL,
    key             INTEGER NOT NULL,
    position        INTEGER NOT NULL,
    PRIMARY KEY (bucket, key, position)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quarantine (
    id              INTEGER PRIMARY KEY,
    received_at_ms  INTEGER NOT NULL,
    topic           TEXT    NOT NULL,
    device          TEXT,
    reason          TEXT    NOT NULL,
    detail          TEXT    NOT NULL,
    sha256          TEXT    NOT NULL,
    bytes           BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS device_state (
    device          TEXT    PRIMARY KEY,
    epoch           INTEGER NOT NULL,
    highest         INTEGER NOT NULL,
    window          INTEGER NOT NULL,
    bitmap          BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS gaps (
    device          TEXT    NOT NULL,
    epoch           INTEGER NOT NULL,
    first           INTEGER NOT NULL,
    last            INTEGER NOT NULL,
    filled          INTEGER NOT NULL,
    state           TEXT    NOT NULL,
    opened_at_ms    INTEGER NOT NULL,
    changed_at_ms   INTEGER NOT NULL,
    PRIMARY KEY (device, epoch, first)
);
CREATE TABLE IF NOT EXISTS counters (
    device          TEXT    NOT NULL,
    name            TEXT    NOT NULL,
    value           INTEGER NOT NULL,
    PRIMARY KEY (device, name)
);
CREATE TABLE IF NOT EXISTS alerts (
    position        INTEGER PRIMARY KEY AUTOINCREMENT,
    alert_id        TEXT    NOT NULL,
    state           TEXT    NOT NULL,
    kind            TEXT    NOT NULL,
    topic           TEXT    NOT NULL,
    device          TEXT,
    rule            TEXT,
    created_at_ms   INTEGER NOT NULL,
    body            TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS alerts_by_id ON alerts(alert_id);
CREATE TABLE IF NOT EXISTS alert_state (
    device          TEXT    PRIMARY KEY,
    state           TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS handler_cursors (
    handler         TEXT    PRIMARY KEY,
    delivered_through INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_cursors (
    target          TEXT    PRIMARY KEY,
    shipped_through INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_ship_cursors (
    sink            TEXT    NOT NULL,
    log             TEXT    NOT NULL,
    shipped_through INTEGER,
    shipped_hash    TEXT,
    line_start      INTEGER,
    pending_first   INTEGER,
    pending_last    INTEGER,
    PRIMARY KEY (sink, log)
);
-- Cursors of bridges from before per-log shipping: `audit:<sink>` was the bridge's log.
INSERT OR IGNORE INTO audit_ship_cursors (sink, log, shipped_through)
    SELECT substr(target, 7), 'bridge', shipped_through FROM audit_cursors
    WHERE target LIKE 'audit:%';
CREATE TABLE IF NOT EXISTS sink_cursors (
    sink            TEXT    PRIMARY KEY,
    delivered_through INTEGER NOT NULL,
    pending_first   INTEGER,
    pending_last    INTEGER
);
-- Operator requests to reset a device's sequence state, applied by the bridge
-- (see `resets`).
CREATE TABLE IF NOT EXISTS sequence_resets (
    id              INTEGER PRIMARY KEY,
    device          TEXT    NOT NULL,
    requested_at_ms INTEGER NOT NULL,
    requested_by    TEXT    NOT NULL,
    reason          TEXT    NOT NULL,
    applied_at_ms   INTEGER,
    previous        TEXT
);
";

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
    #[error("{path}: stored state of device {device} is corrupt: {detail}")]
    Corrupt {
        path: PathBuf,
        device: String,
        detail: String,
    },
}

/// An accepted message, both planes, as the recorder hands it to [`Store::commit`].
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event_id: String,
    pub device: DeviceId,
    pub site: String,
    pub epoch: u64,
    pub seq: u64,
    pub observed_at_ms: u64,
    pub received_at_ms: u64,
    /// Sequence verdict detail (`in_order`, `missing=3`, ...).
    pub verdict: String,
    pub broker: String,
    pub publisher: String,
    pub topic: String,
    pub sha256_hex: String,
    pub raw: bytes::Bytes,
    pub normalized_json: String,
}

/// A refused message kept for investigation.
#[derive(Debug, Clone)]
pub struct Quarantined {
    pub received_at_ms: u64,
    pub topic: String,
    pub device: Option<String>,
    pub reason: String,
    pub detail: String,
    pub sha256_hex: String,
    pub raw: bytes::Bytes,
}

/// One alert state change to record and deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAlert {
    pub alert_id: String,
    pub state: String,
    /// `clinical` or `operational`.
    pub kind: String,
    pub topic: String,
    pub device: Option<String>,
    pub rule: Option<String>,
    pub created_at_ms: u64,
    /// The alert JSON exactly as published.
    pub body: String,
}

/// A recorded alert, as the handlers read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAlert {
    pub position: i64,
    pub alert_id: String,
    pub state: String,
    pub topic: String,
    pub body: String,
}

/// Everything one batch changes, written in one transaction.
#[derive(Debug, Default)]
pub struct Commit {
    pub events: Vec<NewEvent>,
    pub quarantine: Vec<Quarantined>,
    pub sequences: Vec<(DeviceId, DeviceSequence)>,
    pub gaps: Vec<(DeviceId, Gap)>,
    /// `(device, counter name, increment)`.
    pub counters: Vec<(String, &'static str, u64)>,
    pub alerts: Vec<NewAlert>,
    /// The alert engine's state of each device the batch touched, JSON.
    pub alert_states: Vec<(DeviceId, String)>,
    pub now_ms: u64,
}

/// A sink's position in the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// Every position up to and including this one is confirmed by the sink.
    pub delivered_through: i64,
    /// The batch planned and possibly partly delivered before a crash.
    pub pending: Option<(i64, i64)>,
}

/// Where shipping one audit log to one objects sink stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditCursor {
    /// The last record the sink confirmed holding, if any.
    pub shipped: Option<ShippedAudit>,
    /// The segment `(first, last)` planned and possibly written before a crash.
    pub pending: Option<(u64, u64)>,
}

/// The last record of an audit log a sink holds, and where its line starts in the log,
/// so the next pass reads only what follows (and can check it is still there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShippedAudit {
    pub seq: u64,
    /// The record's hash; unknown only for cursors written before it was kept.
    pub hash: Option<String>,
    /// Byte offset of the record's line in the log (0 when unknown).
    pub line_start: u64,
}

/// One connection to the bridge database.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
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
        let store = Self { conn, path };
        store
            .conn
            .busy_timeout(Duration::from_secs(10))
            .map_err(|e| store.err(e))?;
        store
            .conn
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 PRAGMA foreign_keys = ON;",
            )
            .map_err(|e| store.err(e))?;
        store.conn.execute_batch(SCHEMA).map_err(|e| store.err(e))?;
        store.index_unindexed_events()?;
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

    /// The stored sequence windows, converted to `size` if it changed.
    pub fn load_sequences(
        &self,
        size: WindowSize,
    ) -> Result<HashMap<DeviceId, DeviceSequence>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT device, epoch, highest, window, bitmap FROM device_state")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Vec<u8>>(4)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out = HashMap::new();
        for row in rows {
            let (device, epoch, highest, window, bitmap) = row.map_err(|e| self.err(e))?;
            let corrupt = |detail: String| StoreError::Corrupt {
                path: self.path.clone(),
                device: device.clone(),
                detail,
            };
            let id = DeviceId::new(&device).map_err(|e| corrupt(e.to_string()))?;
            let window = u32::try_from(window).map_err(|e| corrupt(e.to_string()))?;
            let state = DeviceSequence::restore(size, window, i2u(epoch), i2u(highest), &bitmap)
                .map_err(|e| corrupt(e.to_string()))?;
            out.insert(id, state);
        }
        Ok(out)
    }

    /// Gaps still open, per device.
    pub fn load_open_gaps(&self) -> Result<HashMap<DeviceId, Vec<Gap>>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT device, epoch, first, last, filled, opened_at_ms FROM gaps
                 WHERE state = 'open'",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out: HashMap<DeviceId, Vec<Gap>> = HashMap::new();
        for row in rows {
            let (device, epoch, first, last, filled, opened) = row.map_err(|e| self.err(e))?;
            let id = DeviceId::new(&device).map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                device: device.clone(),
                detail: e.to_string(),
            })?;
            out.entry(id).or_default().push(Gap {
                epoch: i2u(epoch),
                first: i2u(first),
                last: i2u(last),
                filled: i2u(filled),
                state: GapState::Open,
                opened_at_ms: i2u(opened),
            });
        }
        Ok(out)
    }

    /// Writes one batch in one transaction, durable when this returns `Ok`.
    pub fn commit(&mut self, c: &Commit) -> Result<(), StoreError> {
        let path = self.path.clone();
        let err = |source| classify(&path, source);
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut raw = tx
                .prepare_cached(
                    "INSERT INTO raw_messages (received_at_ms, broker, publisher, topic, sha256, bytes)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(err)?;
            let mut event = tx
                .prepare_cached(
                    "INSERT INTO events (event_id, raw_id, device, site, epoch, seq,
                         observed_at_ms, received_at_ms, verdict, normalized)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                     ON CONFLICT(device, epoch, seq) DO NOTHING",
                )
                .map_err(err)?;
            let mut index = tx
                .prepare_cached(
                    "INSERT INTO event_index (bucket, key, position) VALUES (?1, ?2, ?3)",
                )
                .map_err(err)?;
            for e in &c.events {
                raw.execute(params![
                    u2i(e.received_at_ms),
                    e.broker,
                    e.publisher,
                    e.topic,
                    e.sha256_hex,
                    &e.raw[..]
                ])
                .map_err(err)?;
                let raw_id = tx.last_insert_rowid();
                let inserted = event
                    .execute(params![
                        e.event_id,
                        raw_id,
                        e.device.as_str(),
                        e.site,
                        u2i(e.epoch),
                        u2i(e.seq),
                        u2i(e.observed_at_ms),
                        u2i(e.received_at_ms),
                        e.verdict,
                        e.normalized_json
                    ])
                    .map_err(err)?;
                if inserted == 0 {
                    // Already stored: only reachable after an operator reset the
                    // device's window (`resets`). A duplicate, not a second event, and
                    // never a failed commit that would stop the recorder.
                    tx.execute("DELETE FROM raw_messages WHERE id = ?1", params![raw_id])
                        .map_err(err)?;
                    tx.execute(
                        "INSERT INTO counters (device, name, value) VALUES (?1, 'duplicate', 1)
                         ON CONFLICT(device, name) DO UPDATE SET value = value + 1",
                        params![e.device.as_str()],
                    )
                    .map_err(err)?;
                    continue;
                }
                let position = tx.last_insert_rowid();
                index
                    .execute(params![
                        position / EVENT_INDEX_BUCKET,
                        event_key(&e.event_id),
                        position
                    ])
                    .map_err(err)?;
            }
            let mut q = tx
                .prepare_cached(
                    "INSERT INTO quarantine (received_at_ms, topic, device, reason, detail, sha256, bytes)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(err)?;
            for m in &c.quarantine {
                q.execute(params![
                    u2i(m.received_at_ms),
                    m.topic,
                    m.device,
                    m.reason,
                    m.detail,
                    m.sha256_hex,
                    &m.raw[..]
                ])
                .map_err(err)?;
            }
            let mut state = tx
                .prepare_cached(
                    "INSERT INTO device_state (device, epoch, highest, window, bitmap)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT(device) DO UPDATE SET epoch = ?2, highest = ?3, window = ?4, bitmap = ?5",
                )
                .map_err(err)?;
            for (device, s) in &c.sequences {
                state
                    .execute(params![
                        device.as_str(),
                        u2i(s.epoch()),
                        u2i(s.highest()),
                        s.size().get(),
                        s.bitmap_bytes()
                    ])
                    .map_err(err)?;
            }
            let mut gap = tx
                .prepare_cached(
                    "INSERT INTO gaps (device, epoch, first, last, filled, state, opened_at_ms, changed_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT(device, epoch, first) DO UPDATE SET filled = ?5, state = ?6, changed_at_ms = ?8",
                )
                .map_err(err)?;
            for (device, g) in &c.gaps {
                gap.execute(params![
                    device.as_str(),
                    u2i(g.epoch),
                    u2i(g.first),
                    u2i(g.last),
                    u2i(g.filled),
                    g.state.as_str(),
                    u2i(g.opened_at_ms),
                    u2i(c.now_ms)
                ])
                .map_err(err)?;
            }
            let mut counter = tx
                .prepare_cached(
                    "INSERT INTO counters (device, name, value) VALUES (?1, ?2, ?3)
                     ON CONFLICT(device, name) DO UPDATE SET value = value + ?3",
                )
                .map_err(err)?;
            for (device, name, n) in &c.counters {
                counter
                    .execute(params![device, name, u2i(*n)])
                    .map_err(err)?;
            }
            let mut alert = tx
                .prepare_cached(
                    "INSERT INTO alerts (alert_id, state, kind, topic, device, rule, created_at_ms, body)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .map_err(err)?;
            for a in &c.alerts {
                alert
                    .execute(params![
                        a.alert_id,
                        a.state,
                        a.kind,
                        a.topic,
                        a.device,
                        a.rule,
                        u2i(a.created_at_ms),
                        a.body
                    ])
                    .map_err(err)?;
            }
            let mut alert_state = tx
                .prepare_cached(
                    "INSERT INTO alert_state (device, state) VALUES (?1, ?2)
                     ON CONFLICT(device) DO UPDATE SET state = ?2",
                )
                .map_err(err)?;
            for (device, state) in &c.alert_states {
                alert_state
                    .execute(params![device.as_str(), state])
                    .map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    /// The alert engine's stored state per device (JSON).
    pub fn load_alert_states(&self) -> Result<HashMap<DeviceId, String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT device, state FROM alert_state")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(|e| self.err(e))?;
        let mut out = HashMap::new();
        for row in rows {
            let (device, state) = row.map_err(|e| self.err(e))?;
            let id = DeviceId::new(&device).map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                device: device.clone(),
                detail: e.to_string(),
            })?;
            out.insert(id, state);
        }
        Ok(out)
    }

    /// Up to `max` alerts after `handler`'s cursor, in order.
    pub fn alerts_after(&self, handler: &str, max: usize) -> Result<Vec<StoredAlert>, StoreError> {
        let through: i64 = self
            .conn
            .query_row(
                "SELECT delivered_through FROM handler_cursors WHERE handler = ?1",
                params![handler],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?
            .unwrap_or(0);
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT position, alert_id, state, topic, body FROM alerts
                 WHERE position > ?1 ORDER BY position LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(
                params![through, i64::try_from(max).unwrap_or(i64::MAX)],
                |r| {
                    Ok(StoredAlert {
                        position: r.get(0)?,
                        alert_id: r.get(1)?,
                        state: r.get(2)?,
                        topic: r.get(3)?,
                        body: r.get(4)?,
                    })
                },
            )
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// Records that `handler` delivered every alert up to `position`.
    pub fn alert_delivered(&self, handler: &str, position: i64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO handler_cursors (handler, delivered_through) VALUES (?1, ?2)
                 ON CONFLICT(handler) DO UPDATE SET delivered_through = MAX(delivered_through, ?2)",
                params![handler, position],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Where shipping audit log `log` (its component label) to `sink` stands.
    pub fn audit_cursor(&self, sink: &str, log: &str) -> Result<AuditCursor, StoreError> {
        self.conn
            .query_row(
                "SELECT shipped_through, shipped_hash, line_start, pending_first, pending_last
                 FROM audit_ship_cursors WHERE sink = ?1 AND log = ?2",
                params![sink, log],
                |r| {
                    let seq: Option<i64> = r.get(0)?;
                    let hash: Option<String> = r.get(1)?;
                    let line_start: Option<i64> = r.get(2)?;
                    let first: Option<i64> = r.get(3)?;
                    let last: Option<i64> = r.get(4)?;
                    Ok(AuditCursor {
                        shipped: seq.map(|s| ShippedAudit {
                            seq: i2u(s),
                            hash,
                            line_start: line_start.map_or(0, i2u),
                        }),
                        pending: first.zip(last).map(|(f, l)| (i2u(f), i2u(l))),
                    })
                },
            )
            .optional()
            .map(Option::unwrap_or_default)
            .map_err(|e| self.err(e))
    }

    /// Persists the segment `first..=last` of `log` as in flight to `sink`, before its
    /// first attempt, so a retry after a crash ships exactly the same range.
    pub fn audit_pending(
        &self,
        sink: &str,
        log: &str,
        first: u64,
        last: u64,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO audit_ship_cursors (sink, log, pending_first, pending_last)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(sink, log) DO UPDATE SET pending_first = ?3, pending_last = ?4",
                params![sink, log, u2i(first), u2i(last)],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Records that `sink` holds every record of `log` up to `shipped` (and nothing is
    /// in flight).
    pub fn set_audit_shipped(
        &self,
        sink: &str,
        log: &str,
        shipped: &ShippedAudit,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO audit_ship_cursors (sink, log, shipped_through, shipped_hash, line_start)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(sink, log) DO UPDATE SET shipped_through = ?3, shipped_hash = ?4,
                     line_start = ?5, pending_first = NULL, pending_last = NULL",
                params![
                    sink,
                    log,
                    u2i(shipped.seq),
                    shipped.hash,
                    u2i(shipped.line_start)
                ],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Makes sure `sink` has a cursor (starting before the first event).
    pub fn register_sink(&self, sink: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO sink_cursors (sink, delivered_through) VALUES (?1, 0)
                 ON CONFLICT(sink) DO NOTHING",
                params![sink],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub fn cursor(&self, sink: &str) -> Result<Cursor, StoreError> {
        self.conn
            .query_row(
                "SELECT delivered_through, pending_first, pending_last FROM sink_cursors WHERE sink = ?1",
                params![sink],
                |r| {
                    let first: Option<i64> = r.get(1)?;
                    let last: Option<i64> = r.get(2)?;
                    Ok(Cursor {
                        delivered_through: r.get(0)?,
                        pending: first.zip(last),
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))?
            .map_or_else(
                || {
                    self.register_sink(sink)?;
                    Ok(Cursor {
                        delivered_through: 0,
                        pending: None,
                    })
                },
                Ok,
            )
    }

    /// Highest outbox position written so far (0 when empty).
    pub fn head(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("SELECT COALESCE(MAX(position), 0) FROM events", [], |r| {
                r.get(0)
            })
            .map_err(|e| self.err(e))
    }

    /// Events written but not yet confirmed by the slowest of `sinks`.
    ///
    /// Positions are dense (AUTOINCREMENT, no deletes; a rolled-back transaction does not
    /// consume them), so this is `head - slowest cursor`: O(1), where counting rows cost
    /// O(backlog) per batch and made a large backlog slow down its own ingest.
    pub fn backlog(&self, sinks: &[String]) -> Result<u64, StoreError> {
        let head = self.head()?;
        let mut slowest = head;
        for sink in sinks {
            slowest = slowest.min(self.cursor(sink)?.delivered_through);
        }
        Ok(u64::try_from(head - slowest).unwrap_or(0))
    }

    /// The next batch for `sink`: the pending one left by a crash if there is one
    /// (identical range, so a redelivery rewrites the same objects), else up to `max`
    /// events after the cursor, persisted as pending before it is returned. `None`
    /// when nothing is waiting.
    pub fn next_batch(&mut self, sink: &str, max: usize) -> Result<Option<Batch>, StoreError> {
        let cursor = self.cursor(sink)?;
        let (first, last) = match cursor.pending {
            Some(range) => range,
            None => {
                let range: Option<(i64, i64)> = self
                    .conn
                    .query_row(
                        "SELECT MIN(position), MAX(position) FROM
                           (SELECT position FROM events WHERE position > ?1 ORDER BY position LIMIT ?2)",
                        params![cursor.delivered_through, i64::try_from(max).unwrap_or(i64::MAX)],
                        |r| Ok(r.get::<_, Option<i64>>(0)?.zip(r.get::<_, Option<i64>>(1)?)),
                    )
                    .map_err(|e| self.err(e))?;
                let Some(range) = range else {
                    return Ok(None);
                };
                self.conn
                    .execute(
                        "UPDATE sink_cursors SET pending_first = ?2, pending_last = ?3 WHERE sink = ?1",
                        params![sink, range.0, range.1],
                    )
                    .map_err(|e| self.err(e))?;
                range
            }
        };
        let records = self.read_range(first, last)?;
        Ok(Some(Batch {
            first,
            last,
            records,
        }))
    }

    /// Records that `sink` confirmed the batch ending at `last`.
    pub fn batch_delivered(&mut self, sink: &str, last: i64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE sink_cursors SET delivered_through = ?2, pending_first = NULL, pending_last = NULL
                 WHERE sink = ?1",
                params![sink, last],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The outbox records with positions in `first..=last`, in order.
    pub fn read_range(&self, first: i64, last: i64) -> Result<Vec<OutboxRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT e.position, e.event_id, e.device, e.site, e.epoch, e.seq,
                        e.observed_at_ms, e.received_at_ms, r.topic, r.bytes, e.normalized
                 FROM events e JOIN raw_messages r ON r.id = e.raw_id
                 WHERE e.position BETWEEN ?1 AND ?2 ORDER BY e.position",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![first, last], |r| {
                Ok(OutboxRecord {
                    position: r.get(0)?,
                    event_id: r.get(1)?,
                    device: r.get(2)?,
                    site: r.get(3)?,
                    epoch: i2u(r.get(4)?),
                    seq: i2u(r.get(5)?),
                    observed_at_ms: i2u(r.get(6)?),
                    received_at_ms: i2u(r.get(7)?),
                    topic: r.get(8)?,
                    raw: bytes::Bytes::from(r.get::<_, Vec<u8>>(9)?),
                    normalized_json: r.get(10)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// A counter's value for one device (0 when never incremented).
    pub fn counter(&self, device: &str, name: &str) -> Result<u64, StoreError> {
        let v: Option<i64> = self
            .conn
            .query_row(
                "SELECT value FROM counters WHERE device = ?1 AND name = ?2",
                params![device, name],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(v.map_or(0, i2u))
    }
}

/// Read-only views for `vitalmq store` and tests: one JSON object per row.
impl Store {
    fn rows_json(&self, sql: &str, columns: &[&str]) -> Result<Vec<serde_json::Value>, StoreError> {
        let mut stmt = self.conn.prepare(sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                let mut obj = serde_json::Map::new();
                for (i, name) in columns.iter().enumerate() {
                    let v = match r.get_ref(i)? {
                        rusqlite::types::ValueRef::Null => serde_json::Value::Null,
                        rusqlite::types::ValueRef::Integer(n) if U64_COLUMNS.contains(name) => {
                            serde_json::Value::from(i2u(n))
                        }
                        rusqlite::types::ValueRef::Integer(n) => serde_json::Value::from(n),
                        rusqlite::types::ValueRef::Real(f) => serde_json::Value::from(f),
                        rusqlite::types::ValueRef::Text(t) => {
                            serde_json::Value::from(String::from_utf8_lossy(t).into_owned())
                        }
                        rusqlite::types::ValueRef::Blob(b) => {
                            serde_json::Value::from(hex::encode(b))
                        }
                    };
                    obj.insert((*name).to_owned(), v);
                }
                Ok(serde_json::Value::Object(obj))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// Accepted events in outbox order (without the normalized body).
    pub fn list_events(&self) -> Result<Vec<serde_json::Value>, StoreError> {
        self.rows_json(
            "SELECT e.position, e.event_id, e.device, e.site, e.epoch, e.seq, e.verdict,
                    e.received_at_ms, r.sha256 AS raw_sha256
             FROM events e JOIN raw_messages r ON r.id = e.raw_id ORDER BY e.position",
            &[
                "position",
                "event_id",
                "device",
                "site",
                "epoch",
                "seq",
                "verdict",
                "received_at_ms",
                "raw_sha256",
            ],
        )
    }

    /// Refused messages (without the bytes).
    pub fn list_quarantine(&self) -> Result<Vec<serde_json::Value>, StoreError> {
        self.rows_json(
            "SELECT id, received_at_ms, topic, device, reason, detail, sha256 FROM quarantine ORDER BY id",
            &["id", "received_at_ms", "topic", "device", "reason", "detail", "sha256"],
        )
    }

    /// Every gap with its state.
    pub fn list_gaps(&self) -> Result<Vec<serde_json::Value>, StoreError> {
        self.rows_json(
            "SELECT device, epoch, first, last, filled, state, opened_at_ms, changed_at_ms
             FROM gaps ORDER BY device, epoch, first",
            &[
                "device",
                "epoch",
                "first",
                "last",
                "filled",
                "state",
                "opened_at_ms",
                "changed_at_ms",
            ],
        )
    }

    /// Adds the events that have no `event_index` row (those of a store made before the
    /// index existed; every commit indexes its own events) in one transaction.
    fn index_unindexed_events(&self) -> Result<(), StoreError> {
        // Head first: an event committed after this read was indexed by its own commit,
        // so a running recorder never makes this open start a write.
        let head = self.head()?;
        let indexed: i64 = self
            .conn
            .query_row(
                "SELECT COALESCE(MAX(position), 0) FROM event_index
                 WHERE bucket = (SELECT MAX(bucket) FROM event_index)",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))?;
        if head <= indexed {
            return Ok(());
        }
        let tx = rusqlite::Transaction::new_unchecked(
            &self.conn,
            rusqlite::TransactionBehavior::Immediate,
        )
        .map_err(|e| self.err(e))?;
        {
            let mut rows = tx
                .prepare("SELECT position, event_id FROM events WHERE position > ?1")
                .map_err(|e| self.err(e))?;
            let mut insert = tx
                .prepare(
                    "INSERT OR IGNORE INTO event_index (bucket, key, position) VALUES (?1, ?2, ?3)",
                )
                .map_err(|e| self.err(e))?;
            let mut found = rows.query(params![indexed]).map_err(|e| self.err(e))?;
            while let Some(r) = found.next().map_err(|e| self.err(e))? {
                let position: i64 = r.get(0).map_err(|e| self.err(e))?;
                let event_id: String = r.get(1).map_err(|e| self.err(e))?;
                insert
                    .execute(params![
                        position / EVENT_INDEX_BUCKET,
                        event_key(&event_id),
                        position
                    ])
                    .map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// An outbox position whose event was received about `ms` (bridge clock): a lookup
    /// hint for [`Store::event_detail_near`]. Binary search over positions, which follow
    /// reception order except across a clock step, where the hint is merely less good.
    pub fn position_near_time(&self, ms: u64) -> Result<i64, StoreError> {
        let mut at = self
            .conn
            .prepare_cached("SELECT received_at_ms FROM events WHERE position = ?1")
            .map_err(|e| self.err(e))?;
        let (mut lo, mut hi) = (1, self.head()?);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let received: Option<i64> = at
                .query_row(params![mid], |r| r.get(0))
                .optional()
                .map_err(|e| self.err(e))?;
            if received.is_some_and(|r| i2u(r) < ms) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    /// The outbox position of the event with this id, if stored. Buckets are probed
    /// outwards from the one holding `near` (earlier ones first), or newest first.
    fn event_position(&self, event_id: &str, near: Option<i64>) -> Result<Option<i64>, StoreError> {
        let last = self.head()? / EVENT_INDEX_BUCKET;
        let start = near.map_or(last, |p| (p / EVENT_INDEX_BUCKET).clamp(0, last));
        let order = std::iter::once(start).chain((1..).flat_map(|d| [start - d, start + d]));
        let mut probed = 0;
        for bucket in order {
            if probed > last {
                break;
            }
            if !(0..=last).contains(&bucket) {
                continue;
            }
            probed += 1;
            if let Some(found) = self.event_in_bucket(event_id, bucket)? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    fn event_in_bucket(&self, event_id: &str, bucket: i64) -> Result<Option<i64>, StoreError> {
        let key = event_key(event_id);
        let mut candidates = self
            .conn
            .prepare_cached(
                "SELECT i.position FROM event_index i JOIN events e ON e.position = i.position
                 WHERE i.bucket = ?1 AND i.key = ?2 AND e.event_id = ?3",
            )
            .map_err(|e| self.err(e))?;
        candidates
            .query_row(params![bucket, key, event_id], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))
    }

    /// One event with its raw-plane row and normalized body, by event id.
    pub fn event_detail(&self, event_id: &str) -> Result<Option<serde_json::Value>, StoreError> {
        self.event_detail_near(event_id, None)
    }

    /// As [`Store::event_detail`], searching from outbox position `near` (for example
    /// from [`Store::position_near_time`] of an alert that cites the event).
    pub fn event_detail_near(
        &self,
        event_id: &str,
        near: Option<i64>,
    ) -> Result<Option<serde_json::Value>, StoreError> {
        let Some(position) = self.event_position(event_id, near)? else {
            return Ok(None);
        };
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT e.position, e.event_id, e.device, e.site, e.epoch, e.seq, e.verdict,
                        e.observed_at_ms, e.received_at_ms, e.normalized,
                        r.id, r.sha256, r.topic, r.broker, r.publisher, length(r.bytes)
                 FROM events e JOIN raw_messages r ON r.id = e.raw_id WHERE e.position = ?1",
            )
            .map_err(|e| self.err(e))?;
        stmt.query_row(params![position], |r| {
            let normalized: String = r.get(9)?;
            Ok(serde_json::json!({
                "position": r.get::<_, i64>(0)?,
                "event_id": r.get::<_, String>(1)?,
                "device": r.get::<_, String>(2)?,
                "site": r.get::<_, String>(3)?,
                "epoch": i2u(r.get(4)?),
                "seq": i2u(r.get(5)?),
                "verdict": r.get::<_, String>(6)?,
                "observed_at_ms": i2u(r.get(7)?),
                "received_at_ms": i2u(r.get(8)?),
                "normalized": serde_json::from_str::<serde_json::Value>(&normalized)
                    .unwrap_or(serde_json::Value::String(normalized)),
                "raw": {
                    "store_row": r.get::<_, i64>(10)?,
                    "sha256": r.get::<_, String>(11)?,
                    "topic": r.get::<_, String>(12)?,
                    "broker": r.get::<_, String>(13)?,
                    "publisher": r.get::<_, String>(14)?,
                    "bytes": r.get::<_, i64>(15)?,
                },
            }))
        })
        .optional()
        .map_err(|e| self.err(e))
    }

    /// Every state change of one alert, in order.
    pub fn alert_history(&self, alert_id: &str) -> Result<Vec<serde_json::Value>, StoreError> {
        self.alert_rows("WHERE alert_id = ?1", alert_id)
    }

    /// Alert state changes whose evidence names `event_id`.
    pub fn alerts_citing(&self, event_id: &str) -> Result<Vec<serde_json::Value>, StoreError> {
        self.alert_rows("WHERE body LIKE '%' || ?1 || '%'", event_id)
    }

    fn alert_rows(&self, filter: &str, arg: &str) -> Result<Vec<serde_json::Value>, StoreError> {
        let sql = format!(
            "SELECT position, alert_id, state, topic, created_at_ms, body FROM alerts {filter} ORDER BY position"
        );
        let mut stmt = self.conn.prepare(&sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![arg], |r| {
                let body: String = r.get(5)?;
                Ok(serde_json::json!({
                    "position": r.get::<_, i64>(0)?,
                    "alert_id": r.get::<_, String>(1)?,
                    "state": r.get::<_, String>(2)?,
                    "topic": r.get::<_, String>(3)?,
                    "recorded_at_ms": i2u(r.get(4)?),
                    "body": serde_json::from_str::<serde_json::Value>(&body)
                        .unwrap_or(serde_json::Value::String(body)),
                }))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// Sinks whose cursor has passed `position`: `(sink, delivered_through)`.
    pub fn sinks_past(&self, position: i64) -> Result<Vec<(String, i64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT sink, delivered_through FROM sink_cursors WHERE delivered_through >= ?1",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![position], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// Every recorded alert state change, in order (the bodies as published).
    pub fn list_alerts(&self) -> Result<Vec<serde_json::Value>, StoreError> {
        self.rows_json(
            "SELECT position, alert_id, state, kind, topic, device, rule, created_at_ms, body
             FROM alerts ORDER BY position",
            &[
                "position",
                "alert_id",
                "state",
                "kind",
                "topic",
                "device",
                "rule",
                "created_at_ms",
                "body",
            ],
        )
    }

    /// Totals: events, quarantine by reason, counters by name, gaps by state, cursors.
    pub fn stats(&self) -> Result<serde_json::Value, StoreError> {
        let pairs = |sql: &str| -> Result<serde_json::Map<String, serde_json::Value>, StoreError> {
            let mut stmt = self.conn.prepare(sql).map_err(|e| self.err(e))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(|e| self.err(e))?;
            let mut m = serde_json::Map::new();
            for row in rows {
                let (k, v) = row.map_err(|e| self.err(e))?;
                m.insert(k, serde_json::Value::from(v));
            }
            Ok(m)
        };
        let events: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        Ok(serde_json::json!({
            "events": events,
            "devices": self.conn.query_row("SELECT COUNT(*) FROM device_state", [], |r| r.get::<_, i64>(0)).map_err(|e| self.err(e))?,
            "quarantine": pairs("SELECT reason, COUNT(*) FROM quarantine GROUP BY reason")?,
            "counters": pairs("SELECT name, SUM(value) FROM counters GROUP BY name")?,
            "gaps": pairs("SELECT state, COUNT(*) FROM gaps GROUP BY state")?,
            "sinks": pairs("SELECT sink, delivered_through FROM sink_cursors")?,
            "alerts": pairs("SELECT kind || '/' || state, COUNT(*) FROM alerts GROUP BY kind, state")?,
            "alert_handlers": pairs("SELECT handler, delivered_through FROM handler_cursors")?,
            "head": self.head()?,
        }))
    }
}

/// Columns holding bit-cast `u64` values.
const U64_COLUMNS: &[&str] = &[
    "epoch",
    "seq",
    "first",
    "last",
    "filled",
    "received_at_ms",
    "opened_at_ms",
    "changed_at_ms",
];

mod resets;
pub use resets::SequenceReset;

#[cfg(test)]
mod tests;
