use super::*;
use crate::gaps::{Gap, GapState};
use crate::window::{Accepted, DeviceSequence, WindowSize};
use vitalmq_envelope::DeviceId;

use super::write::test_events::event;

#[test]
fn committed_state_survives_reopening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let id = DeviceId::new("dev-00001").expect("id");
    let mut window = DeviceSequence::first(WindowSize::default(), u64::MAX, 0);
    window.apply(
        u64::MAX,
        u64::MAX - 1,
        Accepted::Gap {
            missing: u64::MAX - 2,
        },
    );
    {
        let mut store = Store::open(dir.path()).expect("open");
        store
            .commit(&Commit {
                events: vec![
                    event("dev-00001", u64::MAX, 0),
                    event("dev-00001", u64::MAX, u64::MAX - 1),
                ],
                sequences: vec![(id.clone(), window.clone())],
                gaps: vec![(
                    id.clone(),
                    Gap {
                        epoch: u64::MAX,
                        first: 1,
                        last: u64::MAX - 2,
                        filled: 0,
                        state: GapState::Open,
                        opened_at_ms: 5,
                    },
                )],
                counters: vec![
                    ("dev-00001".into(), "duplicate", 2),
                    ("dev-00001".into(), "duplicate", 1),
                ],
                now_ms: 5,
                ..Commit::default()
            })
            .expect("commit");
    }
    let store = Store::open(dir.path()).expect("reopen");
    assert_eq!(
        store.load_sequences(WindowSize::default()).expect("load")[&id],
        window
    );
    let gaps = store.load_open_gaps().expect("gaps");
    assert_eq!(gaps[&id][0].last, u64::MAX - 2);
    assert_eq!(store.counter("dev-00001", "duplicate").expect("counter"), 3);
    assert_eq!(store.head().expect("head"), 2);
}

#[test]
fn the_same_event_cannot_be_stored_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(dir.path()).expect("open");
    let c = Commit {
        events: vec![event("dev-00001", 1, 7)],
        ..Commit::default()
    };
    store.commit(&c).expect("first");
    // A failed commit would stop the recorder (it retries for ever): the second copy
    // is counted as a duplicate instead.
    store.commit(&c).expect("second");
    assert_eq!(
        store.head().expect("head"),
        1,
        "UNIQUE(device, epoch, seq) keeps one copy"
    );
    assert_eq!(store.counter("dev-00001", "duplicate").expect("counter"), 1);
}

#[test]
fn the_same_sequence_number_under_another_event_id_is_refused_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(dir.path()).expect("open");
    let first = event("dev-00001", 1, 7);
    let second = event("dev-00001", 1, 7).with_event_id("ev1-a-different-id");
    store
        .commit(&Commit {
            events: vec![first],
            ..Commit::default()
        })
        .expect("first");
    store
        .commit(&Commit {
            events: vec![second],
            ..Commit::default()
        })
        .expect("second");
    assert_eq!(
        store.head().expect("head"),
        1,
        "the event identity is (device, epoch, seq), whatever its id"
    );
}

/// Commits `n` events of two devices in batches of 500, as the recorder does; the
/// event at position p has seq p - 1 and was received at 1_000 + 10 * (p - 1).
fn commit_events(store: &mut Store, n: u64) -> Vec<String> {
    let mut ids = Vec::new();
    let mut seq = 0;
    while seq < n {
        let events: Vec<RecordedEvent> = (seq..(seq + 500).min(n))
            .map(|s| {
                event(if s % 2 == 0 { "dev-00001" } else { "dev-00002" }, 1, s)
                    .received_at(1_000 + 10 * s)
            })
            .collect();
        ids.extend(events.iter().map(|e| e.event_id().to_owned()));
        store
            .commit(&Commit {
                events,
                ..Commit::default()
            })
            .expect("commit");
        seq += 500;
    }
    ids
}

#[test]
fn events_are_found_by_id_in_every_index_bucket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(dir.path()).expect("open");
    let n = 3 * EVENT_INDEX_BUCKET as u64 + 10;
    let ids = commit_events(&mut store, n);
    for position in [1, 2, 4095, 4096, 4097, 8192, 12_000, n] {
        let id = &ids[position as usize - 1];
        let found = store.event_detail(id).expect("lookup").expect("stored");
        assert_eq!(u64::try_from(found.head.position), Ok(position), "{id}");
        assert_eq!(found.head.event_id.as_str(), id.as_str());
        assert_eq!(found.head.seq, position - 1);
    }
    assert!(
        store
            .event_detail("ev1-00000000000000000000000000000000")
            .expect("lookup")
            .is_none()
    );
    assert!(store.event_detail("").expect("lookup").is_none());
}

#[test]
fn a_lookup_from_a_hint_finds_events_in_any_bucket_and_the_hint_follows_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(dir.path()).expect("open");
    let n = 3 * EVENT_INDEX_BUCKET as u64 + 10;
    let ids = commit_events(&mut store, n);
    assert_eq!(store.position_near_time(0).expect("near"), 1);
    assert_eq!(
        store.position_near_time(1_000 + 10 * 5_000).expect("near"),
        5_001
    );
    assert_eq!(
        store
            .position_near_time(1_000 + 10 * 5_000 - 5)
            .expect("near"),
        5_001
    );
    assert_eq!(store.position_near_time(u64::MAX).expect("near"), n as i64);
    for near in [
        None,
        Some(1),
        Some(6_000),
        Some(n as i64),
        Some(-5),
        Some(1 << 40),
    ] {
        for position in [1, 4096, 9_000, n] {
            let id = &ids[position as usize - 1];
            let found = store
                .event_detail_near(id, near)
                .expect("lookup")
                .expect("stored");
            assert_eq!(
                u64::try_from(found.head.position),
                Ok(position),
                "{id} from {near:?}"
            );
        }
        assert!(
            store
                .event_detail_near("ev1-not-stored", near)
                .expect("lookup")
                .is_none()
        );
    }
}

#[test]
fn a_store_without_the_event_index_is_indexed_when_opened() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ids = {
        let mut store = Store::open(dir.path()).expect("open");
        let ids = commit_events(&mut store, 5_000);
        // As a store written before event_index existed.
        store
            .conn
            .execute_batch("DELETE FROM event_index WHERE position > 10; PRAGMA user_version = 0;")
            .expect("delete");
        assert!(store.event_detail(&ids[4_999]).expect("lookup").is_none());
        ids
    };
    let store = Store::open(dir.path()).expect("reopen");
    for id in [&ids[0], &ids[10], &ids[4_096], &ids[4_999]] {
        assert!(store.event_detail(id).expect("lookup").is_some(), "{id}");
    }
    let rows: i64 = store
        .conn
        .query_row("SELECT COUNT(*) FROM event_index", [], |r| r.get(0))
        .expect("count");
    assert_eq!(rows, 5_000);
}

#[test]
fn a_pending_batch_is_resumed_with_the_same_range_after_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut store = Store::open(dir.path()).expect("open");
        store
            .commit(&Commit {
                events: (0..10).map(|s| event("dev-00001", 1, s)).collect(),
                ..Commit::default()
            })
            .expect("commit");
        store.register_sink("objects").expect("register");
        let batch = store
            .next_batch("objects", 4)
            .expect("plan")
            .expect("batch");
        assert_eq!((batch.first, batch.last, batch.records.len()), (1, 4, 4));
        // More events arrive, then the process dies before the sink confirmed.
        store
            .commit(&Commit {
                events: (10..20).map(|s| event("dev-00001", 1, s)).collect(),
                ..Commit::default()
            })
            .expect("commit");
    }
    let mut store = Store::open(dir.path()).expect("reopen");
    assert_eq!(store.backlog(&["objects".into()]).expect("backlog"), 20);
    let again = store
        .next_batch("objects", 100)
        .expect("plan")
        .expect("batch");
    assert_eq!(
        (again.first, again.last),
        (1, 4),
        "same range, so the same objects"
    );
    assert_eq!(again.records[3].seq, 3);
    store
        .batch_delivered("objects", again.last)
        .expect("delivered");
    let next = store
        .next_batch("objects", 100)
        .expect("plan")
        .expect("batch");
    assert_eq!((next.first, next.last, next.records.len()), (5, 20, 16));
    store
        .batch_delivered("objects", next.last)
        .expect("delivered");
    assert!(store.next_batch("objects", 100).expect("plan").is_none());
    assert_eq!(store.backlog(&["objects".into()]).expect("backlog"), 0);
}

#[test]
fn an_unusable_data_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").expect("write");
    let err = Store::open(&file.join("data")).expect_err("a file where a directory should be");
    assert!(err.to_string().contains("not-a-dir"), "{err}");
}

#[test]
fn a_full_store_is_reported_as_full_and_keeps_what_it_had() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(dir.path()).expect("open");
    store.set_quota(96 * 1024).expect("quota");
    let mut stored = 0u64;
    let err = loop {
        let c = Commit {
            events: vec![event("dev-00001", 1, stored)],
            ..Commit::default()
        };
        match store.commit(&c) {
            Ok(_) => stored += 1,
            Err(e) => break e,
        }
        assert!(stored < 100_000, "the quota never bit");
    };
    assert!(matches!(err, StoreError::Full { .. }), "{err}");
    assert!(err.to_string().contains("disk is full"), "{err}");
    assert_eq!(
        store.head().expect("head"),
        i64::try_from(stored).expect("i64")
    );
    // Raising the quota lets the same commit through.
    store.set_quota(10 << 20).expect("quota");
    store
        .commit(&Commit {
            events: vec![event("dev-00001", 1, stored)],
            ..Commit::default()
        })
        .expect("commit after the quota was raised");
}

#[test]
fn alerts_and_alert_state_are_committed_and_read_back_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let mut store = store;
    let id = DeviceId::new("dev-00001").expect("id");
    let alert = |state: &str| NewAlert {
        alert_id: "al-1".into(),
        state: state.into(),
        kind: "clinical".into(),
        topic: "alerts/site-01/review/dev-00001".into(),
        device: Some("dev-00001".into()),
        rule: Some("spo2-low".into()),
        created_at_ms: 7,
        body: format!("{{\"state\":\"{state}\"}}"),
        level: 0,
    };
    store
        .commit(&Commit {
            alerts: vec![alert("open"), alert("escalated")],
            alert_states: vec![(id.clone(), "{\"v\":1}".into())],
            ..Commit::default()
        })
        .expect("commit");
    assert_eq!(store.load_alert_states().expect("states")[&id], "{\"v\":1}");
    let pending = store.alerts_after("mqtt", 10).expect("pending");
    assert_eq!(
        pending.iter().map(|a| a.state.as_str()).collect::<Vec<_>>(),
        ["open", "escalated"]
    );
    store
        .alert_delivered("mqtt", pending[0].position)
        .expect("cursor");
    let rest = store.alerts_after("mqtt", 10).expect("pending");
    assert_eq!(rest.len(), 1);
    // A late, lower confirmation never moves the cursor back.
    store.alert_delivered("mqtt", 0).expect("cursor");
    assert_eq!(store.alerts_after("mqtt", 10).expect("pending").len(), 1);
    assert_eq!(
        store
            .alerts_after("webhook:ehr", 10)
            .expect("pending")
            .len(),
        2,
        "cursors are per handler"
    );
}

#[test]
fn audit_cursors_are_per_sink_and_log_keep_the_pending_segment_and_survive_reopening() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A store written by a bridge from before per-log cursors: `audit:<sink>`.
    {
        let store = Store::open(dir.path()).expect("open");
        store
            .conn
            .execute_batch(
                "INSERT INTO audit_cursors (target, shipped_through) VALUES ('audit:objects', 41);
                 PRAGMA user_version = 0;",
            )
            .expect("legacy cursor");
    }
    let store = Store::open(dir.path()).expect("reopen");
    assert_eq!(
        store.audit_cursor("objects", "bridge").expect("cursor"),
        AuditCursor {
            shipped: Some(ShippedAudit {
                seq: 41,
                hash: None,
                line_start: 0
            }),
            pending: None
        },
        "the legacy cursor is the bridge log's"
    );
    assert_eq!(
        store.audit_cursor("objects", "broker").expect("cursor"),
        AuditCursor::default()
    );
    store
        .audit_pending("objects", "broker", 0, 7)
        .expect("pending");
    drop(store);
    let store = Store::open(dir.path()).expect("reopen");
    let cursor = store.audit_cursor("objects", "broker").expect("cursor");
    assert_eq!((cursor.shipped, cursor.pending), (None, Some((0, 7))));
    assert_eq!(
        store.audit_cursor("s3", "broker").expect("cursor"),
        AuditCursor::default(),
        "cursors are per sink"
    );
    let shipped = ShippedAudit {
        seq: 7,
        hash: Some("ab".repeat(32)),
        line_start: 1234,
    };
    store
        .set_audit_shipped("objects", "broker", &shipped)
        .expect("shipped");
    drop(store);
    let store = Store::open(dir.path()).expect("reopen");
    assert_eq!(
        store.audit_cursor("objects", "broker").expect("cursor"),
        AuditCursor {
            shipped: Some(shipped),
            pending: None
        }
    );
    assert_eq!(
        store
            .audit_cursor("objects", "bridge")
            .expect("cursor")
            .shipped
            .map(|s| s.seq),
        Some(41),
        "the migration does not overwrite later cursors"
    );
}

/// Issue 19: withheld counts are added in the transaction that advances the cursor, so
/// a batch confirmed again (its first cursor advance committed, the drain did not learn
/// it, or a retry after a failed advance) is counted once.
/// A pending range the cursor is already past (delivered, then planned again) is
/// cleared by the confirmation that finds the cursor past it, so it is not planned
/// (and delivered) again forever; a newer pending range stays.
#[test]
fn a_confirmation_behind_the_cursor_clears_a_stale_pending_range() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(dir.path()).expect("open");
    commit_events(&mut store, 10);
    store.register_sink("study").expect("register");
    let batch = store.next_batch("study", 4).expect("plan").expect("batch");
    assert!(
        store
            .batch_delivered_withheld("study", batch.last, &[])
            .expect("delivered")
    );
    let raw = rusqlite::Connection::open(dir.path().join(crate::store::DB_FILE)).expect("db");
    raw.execute(
        "UPDATE sink_cursors SET pending_first = ?1, pending_last = ?2 WHERE sink = 'study'",
        rusqlite::params![batch.first, batch.last],
    )
    .expect("a stale pending range");
    assert_eq!(
        store.cursor("study").expect("cursor").pending,
        Some((batch.first, batch.last))
    );
    assert!(
        !store
            .batch_delivered_withheld("study", batch.last, &[("withdrawn", 1)])
            .expect("again"),
        "the cursor does not move"
    );
    assert_eq!(store.cursor("study").expect("cursor").pending, None);
    let next = store.next_batch("study", 4).expect("plan").expect("batch");
    assert_eq!(
        next.first,
        batch.last + 1,
        "the next range, not the stale one"
    );
    assert!(
        !store
            .batch_delivered_withheld("study", batch.last, &[])
            .expect("old")
    );
    assert_eq!(
        store.cursor("study").expect("cursor").pending,
        Some((next.first, next.last)),
        "a newer pending range stays"
    );
}

#[test]
fn withheld_counts_are_added_with_the_cursor_once_per_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(dir.path()).expect("open");
    commit_events(&mut store, 10);
    store.register_sink("study").expect("register");
    let batch = store.next_batch("study", 4).expect("plan").expect("batch");
    let counts = [("withdrawn", 3), ("no_consent", 1)];
    assert!(
        store
            .batch_delivered_withheld("study", batch.last, &counts)
            .expect("delivered")
    );
    assert!(
        !store
            .batch_delivered_withheld("study", batch.last, &counts)
            .expect("again"),
        "the same batch again: the cursor does not move, nothing is counted"
    );
    let next = store.next_batch("study", 4).expect("plan").expect("batch");
    assert_eq!(next.first, 5);
    assert!(
        store
            .batch_delivered_withheld("study", next.last, &[("withdrawn", 2)])
            .expect("delivered")
    );
    // Handlers: counted with the cursor too.
    assert!(
        store
            .alert_delivered_withheld("webhook:study", 3, &[("no_consent", 1)])
            .expect("handler")
    );
    assert!(
        !store
            .alert_delivered_withheld("webhook:study", 3, &[("no_consent", 1)])
            .expect("handler again")
    );
    drop(store);
    let stats = Store::open(dir.path())
        .expect("reopen")
        .stats()
        .expect("stats");
    assert_eq!(stats.withheld.get("study/withdrawn"), 5);
    assert_eq!(stats.withheld.get("study/no_consent"), 1);
    assert_eq!(stats.sinks.get("study"), 8);
    assert_eq!(stats.alerts_withheld.get("webhook:study/no_consent"), 1);
}

/// Encryption at rest (issue 20): a keyring in `dir` under a new key file.
fn keyring(dir: &std::path::Path) -> std::sync::Arc<vitalmq_keyring::Keyring> {
    let provider = vitalmq_keyring::LocalKeyFile::create(&dir.join("kek.json")).expect("kek");
    std::sync::Arc::new(
        vitalmq_keyring::Keyring::open(&dir.join("keyring.sqlite3"), std::sync::Arc::new(provider))
            .expect("keyring"),
    )
}

/// The database file and its WAL, as bytes.
fn store_file_bytes(dir: &std::path::Path) -> Vec<u8> {
    let mut all = std::fs::read(dir.join(DB_FILE)).expect("db");
    if let Ok(wal) = std::fs::read(dir.join(format!("{DB_FILE}-wal"))) {
        all.extend(wal);
    }
    all
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn clinical_alert(patient: &str, state: &str) -> NewAlert {
    NewAlert {
        alert_id: format!("al-{patient}"),
        state: state.into(),
        kind: "clinical".into(),
        topic: "alerts/site-01/review/dev-00001".into(),
        device: Some("dev-00001".into()),
        rule: Some("spo2-low".into()),
        created_at_ms: 7,
        body: format!(
            "{{\"alert_id\":\"al-{patient}\",\"patient_ref\":\"{patient}\",\"value\":\"distinctive-4711\"}}"
        ),
        level: 0,
    }
}

#[test]
fn sealed_payloads_read_back_and_leave_no_plaintext_in_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = keyring(dir.path());
    let mut store = Store::open(dir.path())
        .expect("open")
        .with_keyring(keys.clone());
    let a = event("dev-00001", 1, 1).for_patient("pt-a");
    let b = event("dev-00002", 1, 1).for_patient("pt-b");
    let committed = store
        .commit(&Commit {
            events: vec![a.clone(), b.clone()],
            alerts: vec![clinical_alert("pt-a", "open")],
            quarantine: vec![Quarantined {
                received_at_ms: 1,
                topic: "devices/dev-00009/telemetry".into(),
                device: None,
                reason: "unknown_device".into(),
                detail: "d".into(),
                sha256_hex: "00".into(),
                raw: bytes::Bytes::from_static(b"refused-bytes-0815"),
            }],
            ..Commit::default()
        })
        .expect("commit");
    assert_eq!(committed, Committed::default());
    let bytes = store_file_bytes(dir.path());
    for e in [&a, &b] {
        assert!(!contains(&bytes, e.raw()), "raw bytes sealed");
        assert!(
            !contains(&bytes, e.normalized_json().as_bytes()),
            "normalized sealed"
        );
    }
    assert!(!contains(&bytes, b"distinctive-4711"), "alert body sealed");
    assert!(
        !contains(&bytes, b"refused-bytes-0815"),
        "quarantine sealed"
    );
    // Every reader opens them.
    let records = store.read_range(1, 2).expect("range");
    assert_eq!(records.len(), 2);
    assert_eq!(&records[0].raw[..], a.raw());
    assert_eq!(records[0].normalized_json, a.normalized_json());
    let detail = store
        .event_detail(b.event_id())
        .expect("read")
        .expect("found");
    assert_eq!(
        detail.normalized.to_string(),
        serde_json::from_str::<serde_json::Value>(b.normalized_json())
            .expect("json")
            .to_string()
    );
    assert_eq!(detail.marks, sealing::PayloadMarks::default());
    let alerts = store.alerts_after("mqtt", 10).expect("alerts");
    assert!(alerts[0].body.contains("distinctive-4711"));
    assert!(
        store.list_alerts().expect("list")[0]
            .body
            .contains("distinctive-4711")
    );
    // The patient is findable without opening anything.
    assert_eq!(store.patient_rows("pt-a").expect("rows"), (1, 1, 1));
    // Without the keyring a reader sees them as sealed, never as garbage.
    let plain = Store::open(dir.path()).expect("open without keyring");
    assert!(plain.list_alerts().expect("list")[0].marks.sealed);
    assert!(matches!(
        plain.read_range(1, 2),
        Err(StoreError::NoKeyring { .. })
    ));
}

#[test]
fn an_erased_patients_rows_read_as_erased_and_are_withheld_from_sinks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = keyring(dir.path());
    let mut store = Store::open(dir.path())
        .expect("open")
        .with_keyring(keys.clone());
    store
        .commit(&Commit {
            events: vec![
                event("dev-00001", 1, 1).for_patient("pt-a"),
                event("dev-00002", 1, 1).for_patient("pt-b"),
            ],
            alerts: vec![
                clinical_alert("pt-a", "open"),
                clinical_alert("pt-b", "open"),
            ],
            ..Commit::default()
        })
        .expect("commit");
    let subject = vitalmq_keyring::Subject::new("pt-a").expect("subject");
    let t = keys
        .erase(&subject, "test", "request", 1_000)
        .expect("erase");
    let events = store.list_events().expect("events");
    assert!(events[0].marks.erased, "pt-a's event erased");
    assert_eq!(events[0].marks.erased_at_ms, Some(1_000));
    assert!(!events[1].marks.erased, "pt-b's readable");
    let json = serde_json::to_value(&events[0]).expect("json");
    assert_eq!(json["erased"], true);
    let detail = store
        .event_detail(events[0].head.event_id.as_str())
        .expect("detail")
        .expect("found");
    assert!(detail.marks.erased && detail.normalized.is_null());
    // Sinks get pt-b only; pt-a's is counted as withheld (erased).
    let batch = store
        .next_batch("objects", 10)
        .expect("batch")
        .expect("some");
    assert_eq!(batch.records.len(), 1);
    assert_eq!(batch.records[0].device, "dev-00002");
    assert!(
        store
            .batch_delivered_withheld("objects", batch.last, &[])
            .expect("delivered")
    );
    assert_eq!(
        store.stats().expect("stats").withheld.get("objects/erased"),
        1
    );
    // Alert handlers likewise.
    let alerts = store.alerts_after("mqtt", 10).expect("alerts");
    assert_eq!(alerts.len(), 1);
    assert!(alerts[0].body.contains("pt-b"));
    assert!(
        store
            .alert_delivered_withheld("mqtt", 2, &[])
            .expect("delivered")
    );
    assert_eq!(
        store
            .stats()
            .expect("stats")
            .alerts_withheld
            .get("mqtt/erased"),
        1
    );
    assert!(store.list_alerts().expect("alerts")[0].marks.erased);
    assert_eq!(t.keys_destroyed, 1);
}

#[test]
fn a_late_reading_of_an_erased_patient_is_dropped_not_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = keyring(dir.path());
    let mut store = Store::open(dir.path())
        .expect("open")
        .with_keyring(keys.clone());
    let subject = vitalmq_keyring::Subject::new("pt-a").expect("subject");
    keys.erase(&subject, "test", "request", 1_000)
        .expect("erase");
    let late = event("dev-00001", 1, 1).for_patient("pt-a");
    let other = event("dev-00002", 1, 1).for_patient("pt-b");
    let committed = store
        .commit(&Commit {
            events: vec![late.clone(), other],
            alerts: vec![clinical_alert("pt-a", "open")],
            ..Commit::default()
        })
        .expect("the rest of the batch commits");
    assert_eq!(
        committed.erased_events,
        [(late.event_id().to_owned(), "dev-00001".to_owned())]
    );
    assert_eq!(
        committed.erased_alerts,
        [("al-pt-a".to_owned(), "open".to_owned())]
    );
    let events = store.list_events().expect("events");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].head.device.as_str(), "dev-00002");
    assert!(store.list_alerts().expect("alerts").is_empty());
    assert!(
        !contains(&store_file_bytes(dir.path()), late.raw()),
        "never stored"
    );
}

#[test]
fn legacy_plaintext_rows_stay_readable_and_are_scrubbed_on_erasure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let legacy = event("dev-00001", 1, 1).for_patient("pt-a");
    {
        let mut store = Store::open(dir.path()).expect("open plaintext");
        store
            .commit(&Commit {
                events: vec![legacy.clone(), event("dev-00002", 1, 1).for_patient("pt-b")],
                alerts: vec![clinical_alert("pt-a", "open")],
                ..Commit::default()
            })
            .expect("commit");
    }
    let keys = keyring(dir.path());
    let mut store = Store::open(dir.path())
        .expect("open")
        .with_keyring(keys.clone());
    store
        .commit(&Commit {
            events: vec![event("dev-00001", 1, 2).for_patient("pt-a")],
            ..Commit::default()
        })
        .expect("commit sealed");
    let records = store.read_range(1, 3).expect("range");
    assert_eq!(records.len(), 3, "plaintext and sealed rows read alike");
    assert_eq!(&records[0].raw[..], legacy.raw());
    let subject = vitalmq_keyring::Subject::new("pt-a").expect("subject");
    keys.erase(&subject, "test", "request", 1_000)
        .expect("erase");
    // Before the cleanup the legacy row is still plaintext in the file.
    assert!(contains(&store_file_bytes(dir.path()), legacy.raw()));
    assert_eq!(
        store.scrub_patient("pt-a").expect("scrub"),
        3,
        "raw, normalized, alert"
    );
    assert_eq!(store.scrub_patient("pt-a").expect("again"), 0, "idempotent");
    let bytes = store_file_bytes(dir.path());
    assert!(!contains(&bytes, legacy.raw()), "legacy raw bytes gone");
    assert!(!contains(&bytes, legacy.normalized_json().as_bytes()));
    assert!(!contains(&bytes, b"distinctive-4711"));
    let records = store.read_range(1, 3).expect("range");
    assert_eq!(records.len(), 1, "only pt-b's");
    let events = store.list_events().expect("events");
    assert_eq!(
        events.iter().map(|e| e.marks.erased).collect::<Vec<_>>(),
        [true, false, true]
    );
    // Ids and hashes stay.
    assert_eq!(events[0].head.event_id.as_str(), legacy.event_id());
}

#[test]
fn rows_sealed_before_and_after_a_key_rotation_both_read_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = keyring(dir.path());
    let mut store = Store::open(dir.path())
        .expect("open")
        .with_keyring(keys.clone());
    let before = event("dev-00001", 1, 1).for_patient("pt-a");
    store
        .commit(&Commit {
            events: vec![before.clone()],
            ..Commit::default()
        })
        .expect("commit");
    let subject = vitalmq_keyring::Subject::new("pt-a").expect("subject");
    assert_eq!(keys.rotate(&subject).expect("rotate"), 2);
    let after = event("dev-00001", 1, 2).for_patient("pt-a");
    store
        .commit(&Commit {
            events: vec![after.clone()],
            ..Commit::default()
        })
        .expect("commit");
    let versions: Vec<u32> = store
        .conn
        .prepare("SELECT normalized FROM events ORDER BY position")
        .expect("prepare")
        .query_map([], |r| sealing::column_bytes(r, 0))
        .expect("query")
        .map(|b| {
            vitalmq_keyring::sealed::header(&b.expect("row"))
                .expect("sealed")
                .key_version
        })
        .collect();
    assert_eq!(versions, [1, 2], "new data under the new version");
    let records = store.read_range(1, 2).expect("range");
    assert_eq!(records[0].normalized_json, before.normalized_json());
    assert_eq!(records[1].normalized_json, after.normalized_json());
}
