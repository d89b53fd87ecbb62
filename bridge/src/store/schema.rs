//! The tables and their versions.
//!
//! Every store records its schema version in SQLite's `user_version` and is migrated
//! forward when opened ([`migrate`], with `rusqlite_migration`): migration `n` takes a
//! store from version `n - 1` to `n`, in one transaction with the version stamp. Stores
//! made before versions were recorded have `user_version` 0 and today's tables; the first
//! migration adopts them as version 1 without rewriting a row (its DDL is the schema
//! they were created with, every statement `IF NOT EXISTS`, and its check that each
//! table has the columns this code reads). A store of a newer version than this code
//! knows is refused ([`StoreError::NewerSchema`]), never opened.
//!
//! To change the schema, append a migration to [`MIGRATIONS`]; never edit one that has
//! shipped. `rusqlite_migration` reads the version before its transaction starts, so
//! two processes opening an old store at the same moment could both run a pending
//! migration: write migrations so that a second run is harmless (`IF NOT EXISTS`, or
//! guarded by what the first run left).

use std::path::Path;

use rusqlite::{Connection, Transaction, TransactionBehavior, params};
use rusqlite_migration::{HookResult, M, Migrations};

use super::StoreError;

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
pub(super) fn event_key(event_id: &str) -> i64 {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(event_id.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// The schema of the stores made before versions were recorded (issue 15), as version 1.
/// It also created the tables of older stores and carried their cursors over
/// (`audit_cursors`); kept as it was, so that adopting a store changes nothing in it.
const V1: &str = "
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

/// Every table of version 1 with the columns this code reads: a version-0 file without
/// them is not a store this code made (or one older than any in the field), and is
/// refused instead of adopted.
const V1_TABLES: &[(&str, &str)] = &[
    (
        "raw_messages",
        "id, received_at_ms, broker, publisher, topic, sha256, bytes",
    ),
    (
        "events",
        "position, event_id, raw_id, device, site, epoch, seq, observed_at_ms, received_at_ms, verdict, normalized",
    ),
    ("event_index", "bucket, key, position"),
    (
        "quarantine",
        "id, received_at_ms, topic, device, reason, detail, sha256, bytes",
    ),
    ("device_state", "device, epoch, highest, window, bitmap"),
    (
        "gaps",
        "device, epoch, first, last, filled, state, opened_at_ms, changed_at_ms",
    ),
    ("counters", "device, name, value"),
    (
        "alerts",
        "position, alert_id, state, kind, topic, device, rule, created_at_ms, body",
    ),
    ("alert_state", "device, state"),
    ("handler_cursors", "handler, delivered_through"),
    (
        "audit_ship_cursors",
        "sink, log, shipped_through, shipped_hash, line_start, pending_first, pending_last",
    ),
    (
        "sink_cursors",
        "sink, delivered_through, pending_first, pending_last",
    ),
    (
        "sequence_resets",
        "id, device, requested_at_ms, requested_by, reason, applied_at_ms, previous",
    ),
];

/// After [`V1`]: checks the tables, then indexes the events of stores made before
/// `event_index` existed (every commit indexes its own events since).
fn adopt_v1(tx: &Transaction<'_>) -> HookResult {
    for (table, columns) in V1_TABLES {
        tx.prepare(&format!("SELECT {columns} FROM {table} LIMIT 0"))?;
    }
    let indexed: i64 = tx.query_row(
        "SELECT COALESCE(MAX(position), 0) FROM event_index
         WHERE bucket = (SELECT MAX(bucket) FROM event_index)",
        [],
        |r| r.get(0),
    )?;
    let mut rows = tx.prepare("SELECT position, event_id FROM events WHERE position > ?1")?;
    let mut insert = tx
        .prepare("INSERT OR IGNORE INTO event_index (bucket, key, position) VALUES (?1, ?2, ?3)")?;
    let mut found = rows.query(params![indexed])?;
    while let Some(r) = found.next()? {
        let position: i64 = r.get(0)?;
        let event_id: String = r.get(1)?;
        insert.execute(params![
            position / EVENT_INDEX_BUCKET,
            event_key(&event_id),
            position
        ])?;
    }
    Ok(())
}

/// Version 2 (issue 17): each alert row carries the escalation level it is delivered
/// at (SPEC 5.2), so a handler delivers only the levels the policy routes to it. Rows
/// written before it are level 0, the first message of an episode. The column is added
/// by the hook, and only when missing, so a second run of this migration is harmless.
fn add_alert_level(tx: &Transaction<'_>) -> HookResult {
    let present: i64 = tx.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('alerts') WHERE name = 'level'",
        [],
        |r| r.get(0),
    )?;
    if present == 0 {
        tx.execute_batch("ALTER TABLE alerts ADD COLUMN level INTEGER NOT NULL DEFAULT 0")?;
    }
    Ok(())
}

/// Version 3 (issue 19): events (and alert changes) withheld from a sink (or alert
/// handler) by consent, counted per target and reason. A sink's counts are added in
/// the transaction that advances its cursor, so a batch delivered again after a failed
/// advance is counted once.
const V3_WITHHELD: &str = "
CREATE TABLE IF NOT EXISTS withheld (
    target          TEXT    NOT NULL,
    kind            TEXT    NOT NULL,
    reason          TEXT    NOT NULL,
    count           INTEGER NOT NULL,
    PRIMARY KEY (target, kind, reason)
);
";

/// Version 4 (issue 20): `events` and `alerts` carry the row's `patient_ref` in the
/// clear (NULL for operational alerts), so erasure, export and retention find a
/// patient's rows without opening a payload (payloads may be sealed since). Rows
/// written before it are plaintext and get theirs from their own JSON. The columns are
/// added only when missing, so a second run is harmless.
fn add_patient_ref(tx: &Transaction<'_>) -> HookResult {
    for (table, source) in [("events", "normalized"), ("alerts", "body")] {
        let present: i64 = tx.query_row(
            &format!(
                "SELECT COUNT(*) FROM pragma_table_info('{table}') WHERE name = 'patient_ref'"
            ),
            [],
            |r| r.get(0),
        )?;
        if present == 0 {
            tx.execute_batch(&format!(
                "ALTER TABLE {table} ADD COLUMN patient_ref TEXT;
                 UPDATE {table} SET patient_ref = json_extract({source}, '$.patient_ref')
                     WHERE json_valid({source});"
            ))?;
        }
    }
    tx.execute_batch(
        "CREATE INDEX IF NOT EXISTS events_by_patient ON events(patient_ref);
         CREATE INDEX IF NOT EXISTS alerts_by_patient ON alerts(patient_ref);",
    )?;
    Ok(())
}

/// Version 5 (issue 21): server-side scores (NEWS2), one row per score table version
/// per scoring, clinical plane, payload sealed per patient (context `score|<score_id>`);
/// `id` is monotonic so sinks follow it with their own cursor. Beside it, the scoring
/// state of each patient (latest valid reading per parameter, open score alerts), JSON,
/// written in the transaction of the readings that changed it: a table of its own,
/// keyed by patient, because a patient has several devices (and a cluster will move
/// this state elsewhere).
const V5_SCORES: &str = "
CREATE TABLE IF NOT EXISTS scores (
    id              INTEGER PRIMARY KEY,
    score_id        TEXT    NOT NULL UNIQUE,
    patient_ref     TEXT    NOT NULL,
    site            TEXT    NOT NULL,
    device          TEXT    NOT NULL,
    model           TEXT    NOT NULL,
    version         TEXT    NOT NULL,
    config_sha256   TEXT    NOT NULL,
    role            TEXT    NOT NULL,
    observed_at_ms  INTEGER NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    payload         BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS scores_by_patient ON scores(patient_ref);
CREATE TABLE IF NOT EXISTS patient_score_state (
    patient_ref     TEXT    PRIMARY KEY,
    state           TEXT    NOT NULL
);
";

/// Version 6 (issue 21): the would-be alert changes of rule-set versions running in
/// shadow for a device, never delivered; clinical plane like `scores` (payload sealed
/// per patient, context `shadow-alert|<change_id>`). `change_id` is deterministic, so a
/// resent batch stores its changes once; `id` is monotonic for readers that follow it.
/// Indexed by (model, version, at_ms) for `vitalmq models compare`, by patient for
/// erasure and export, and by alert id for retention (it anonymizes an episode whole).
const V6_SHADOW_ALERTS: &str = "
CREATE TABLE IF NOT EXISTS shadow_alerts (
    id              INTEGER PRIMARY KEY,
    change_id       TEXT    NOT NULL UNIQUE,
    alert_id        TEXT    NOT NULL,
    patient_ref     TEXT    NOT NULL,
    site            TEXT    NOT NULL,
    device          TEXT    NOT NULL,
    model           TEXT    NOT NULL,
    version         TEXT    NOT NULL,
    config_sha256   TEXT    NOT NULL,
    role            TEXT    NOT NULL,
    rule            TEXT    NOT NULL,
    state           TEXT    NOT NULL,
    severity        TEXT    NOT NULL,
    at_ms           INTEGER NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    payload         BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS shadow_alerts_by_version ON shadow_alerts(model, version, at_ms);
CREATE INDEX IF NOT EXISTS shadow_alerts_by_patient ON shadow_alerts(patient_ref);
CREATE INDEX IF NOT EXISTS shadow_alerts_by_alert ON shadow_alerts(alert_id);
";

/// The migrations, oldest first; the store's version is how many have run.
static MIGRATIONS: std::sync::LazyLock<Migrations<'static>> = std::sync::LazyLock::new(|| {
    Migrations::new(vec![
        M::up_with_hook(V1, adopt_v1),
        M::up_with_hook("", add_alert_level),
        M::up(V3_WITHHELD),
        M::up_with_hook("", add_patient_ref),
        M::up(V5_SCORES),
        M::up(V6_SHADOW_ALERTS),
    ])
});

/// The schema version this code writes.
pub const VERSION: usize = 6;

/// The store's recorded schema version.
pub fn version(conn: &Connection) -> rusqlite::Result<usize> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// Brings the store at `path` to [`VERSION`]: nothing to do (and no write) when it is
/// there, refused when it is beyond.
pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let sqlite = |source| StoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let found = version(conn).map_err(sqlite)?;
    if found == VERSION {
        return Ok(());
    }
    if found > VERSION {
        return Err(StoreError::NewerSchema {
            path: path.to_path_buf(),
            found,
            known: VERSION,
        });
    }
    // Take the write lock when the migration starts, not at its first write.
    conn.set_transaction_behavior(TransactionBehavior::Immediate);
    let migrated = MIGRATIONS.to_latest(conn);
    conn.set_transaction_behavior(TransactionBehavior::Deferred);
    migrated.map_err(|source| StoreError::Migration {
        path: path.to_path_buf(),
        from: found,
        source: Box::new(source),
    })?;
    tracing::info!(store = %path.display(), from = found, to = VERSION, "store schema migrated");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn version_is_the_number_of_migrations() {
        super::MIGRATIONS.validate().expect("valid");
        let mut conn = rusqlite::Connection::open_in_memory().expect("open");
        super::MIGRATIONS.to_latest(&mut conn).expect("migrate");
        assert_eq!(super::version(&conn).expect("version"), super::VERSION);
    }
}
