//! A store written before schema versions were recorded (`fixtures/v1-store.sqlite3`,
//! made by `fixtures/make-v1-store.sh` with main at db08981) opens with today's code,
//! is adopted as version 1, and every event, window, gap, alert and cursor reads back as
//! it was recorded (`fixtures/v1-store.expected.json`).

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use vitalmq_bridge::store::{self, Store, StoreError, schema};
use vitalmq_bridge::window::WindowSize;
use vitalmq_envelope::DeviceId;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixture("v1-store.expected.json")).expect("expected");
    serde_json::from_str(&text).expect("json")
}

/// A copy of the fixture in a fresh data directory.
fn copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(fixture("v1-store.sqlite3"), dir.path().join(store::DB_FILE)).expect("copy");
    dir
}

fn user_version(dir: &Path) -> usize {
    let conn = rusqlite::Connection::open(dir.join(store::DB_FILE)).expect("open");
    schema::version(&conn).expect("version")
}

/// Typed rows as `vitalmq store` prints them: compared as text, so field order counts.
fn same_output<T: serde::Serialize + ?Sized>(typed: &T, recorded: &Value) {
    assert_eq!(
        serde_json::to_string(typed).expect("serialize"),
        serde_json::to_string(recorded).expect("serialize")
    );
}

#[test]
fn a_store_from_before_versions_is_adopted_with_everything_intact() {
    let want = expected();
    assert_eq!(want["user_version"], 0, "the fixture predates versions");
    let dir = copy();
    assert_eq!(user_version(dir.path()), 0);
    let store = Store::open(dir.path()).expect("opens and migrates");
    assert_eq!(user_version(dir.path()), schema::VERSION);

    // Events: count, order, ids, raw hashes, devices and sites.
    let events = store.list_events().expect("events");
    assert_eq!(events.len(), 199);
    same_output(&events, &want["events"]);
    assert_eq!(store.head().expect("head"), 199);
    // Each event's raw bytes still hash to the recorded SHA-256, through the outbox.
    let outbox = store.read_range(1, 199).expect("outbox");
    assert_eq!(outbox.len(), 199);
    for (record, row) in outbox.iter().zip(want["events"].as_array().expect("rows")) {
        use sha2::Digest as _;
        assert_eq!(record.event_id, row["event_id"]);
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&record.raw)),
            row["raw_sha256"]
        );
    }
    // And each is found by its id, as `vitalmq trace` looks it up.
    for row in want["events"].as_array().expect("rows") {
        let id = row["event_id"].as_str().expect("id");
        assert!(store.event_detail(id).expect("detail").is_some(), "{id}");
    }

    same_output(&store.list_quarantine().expect("q"), &want["quarantine"]);
    same_output(&store.list_gaps().expect("gaps"), &want["gaps"]);
    same_output(&store.list_alerts().expect("alerts"), &want["alerts"]);
    same_output(&store.stats().expect("stats"), &want["stats"]);

    // Windows, exactly as stored.
    let windows = store
        .load_sequences(WindowSize::default())
        .expect("windows");
    assert_eq!(
        windows.len(),
        want["device_state"].as_array().expect("rows").len()
    );
    for row in want["device_state"].as_array().expect("rows") {
        let device = DeviceId::new(row["device"].as_str().expect("device")).expect("id");
        let w = &windows[&device];
        assert_eq!(json!(w.epoch()), row["epoch"], "{device}");
        assert_eq!(json!(w.highest()), row["highest"], "{device}");
        assert_eq!(json!(w.size().get()), row["window"], "{device}");
        assert_eq!(
            hex::encode_upper(w.bitmap_bytes()),
            row["bitmap"].as_str().expect("hex"),
            "{device}"
        );
    }
    // The open gap is loaded for the sequencer.
    let open = store.load_open_gaps().expect("open gaps");
    let dev2 = DeviceId::new("dev-00002").expect("id");
    assert_eq!(open.len(), 1);
    assert_eq!(
        (
            open[&dev2][0].epoch,
            open[&dev2][0].first,
            open[&dev2][0].last
        ),
        (9, 2, 3)
    );
    assert_eq!(store.load_alert_states().expect("states").len(), 12);

    for row in want["counters"].as_array().expect("rows") {
        let (device, name) = (
            row["device"].as_str().expect("d"),
            row["name"].as_str().expect("n"),
        );
        assert_eq!(
            json!(store.counter(device, name).expect("counter")),
            row["value"]
        );
    }

    // Cursors: the objects sink, the MQTT alert handler, audit shipping.
    let sink = store.cursor("objects").expect("cursor");
    assert_eq!(sink.delivered_through, 197);
    assert_eq!(sink.pending, None);
    assert_eq!(store.handler_cursor("mqtt").expect("handler"), 3);
    assert!(store.alerts_after("mqtt", 10).expect("after").is_empty());
    for row in want["audit_ship_cursors"].as_array().expect("rows") {
        let c = store
            .audit_cursor(
                row["sink"].as_str().expect("s"),
                row["log"].as_str().expect("l"),
            )
            .expect("audit cursor");
        let shipped = c.shipped.expect("shipped");
        assert_eq!(json!(shipped.seq), row["shipped_through"]);
        assert_eq!(json!(shipped.hash), row["shipped_hash"]);
        assert_eq!(json!(shipped.line_start), row["line_start"]);
        assert_eq!(c.pending, None);
    }

    // Reset requests: one applied, one still pending.
    let pending = store.pending_sequence_resets().expect("pending");
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].device, "dev-00003");
    let applied = store.sequence_reset(1).expect("reset").expect("stored");
    assert_eq!(applied.previous.as_deref(), Some("4:6"));
    assert!(applied.applied_at_ms.is_some());
}

#[test]
fn a_store_opened_twice_is_migrated_once() {
    let dir = copy();
    drop(Store::open(dir.path()).expect("first open"));
    let db = dir.path().join(store::DB_FILE);
    let changed = |path: &Path| {
        std::fs::metadata(path)
            .expect("meta")
            .modified()
            .expect("mtime")
    };
    let conn = rusqlite::Connection::open(&db).expect("open");
    let before: i64 = conn
        .query_row("PRAGMA data_version", [], |r| r.get(0))
        .expect("data_version");
    let mtime = changed(&db);
    let again = Store::open(dir.path()).expect("second open");
    drop(again);
    // Nothing was written by the second open: no other connection committed.
    let after: i64 = conn
        .query_row("PRAGMA data_version", [], |r| r.get(0))
        .expect("data_version");
    assert_eq!(before, after);
    assert_eq!(mtime, changed(&db));
    assert_eq!(user_version(dir.path()), schema::VERSION);
}

#[test]
fn a_new_store_starts_at_the_current_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(Store::open(dir.path()).expect("create"));
    assert_eq!(user_version(dir.path()), schema::VERSION);
}

#[test]
fn a_store_of_a_newer_version_is_refused() {
    let dir = copy();
    drop(Store::open(dir.path()).expect("migrate"));
    let newer = schema::VERSION + 1;
    let conn = rusqlite::Connection::open(dir.path().join(store::DB_FILE)).expect("open");
    conn.pragma_update(None, "user_version", newer)
        .expect("stamp");
    drop(conn);
    match Store::open(dir.path()) {
        Err(StoreError::NewerSchema { found, known, .. }) => {
            assert_eq!((found, known), (newer, schema::VERSION));
        }
        other => panic!("expected NewerSchema, got {other:?}"),
    }
    // Left as it was.
    assert_eq!(user_version(dir.path()), newer);
}

#[test]
fn a_file_without_the_stores_tables_is_not_adopted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conn = rusqlite::Connection::open(dir.path().join(store::DB_FILE)).expect("open");
    conn.execute_batch("CREATE TABLE events (id INTEGER PRIMARY KEY, what TEXT);")
        .expect("foreign table");
    drop(conn);
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::Migration { from: 0, .. })
    ));
    assert_eq!(user_version(dir.path()), 0);
}
