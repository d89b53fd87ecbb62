use std::io::Write as _;
use std::path::Path;

use vitalmq_audit::{AuditLog, CheckpointKey};

use super::tail::{Divergence, Limits, Tail, TailError, next_segment};
use super::*;
use crate::store::ShippedAudit;

const ALL: Limits = Limits {
    max_records: usize::MAX,
    until: None,
};

/// A signed log at `dir/name`: for each entry of `syncs`, that many records then a sync
/// (so a checkpoint after each group of at least one record).
fn write_log(dir: &Path, name: &str, syncs: &[u64]) -> std::path::PathBuf {
    let path = dir.join(name);
    let key =
        CheckpointKey::load_or_create(&dir.join(format!("{name}.key.pem")), Component::Broker)
            .expect("key");
    let log = AuditLog::open_signed(&path, 4096, Some(key)).expect("open");
    let auditor = log.auditor();
    for n in syncs {
        for _ in 0..*n {
            auditor
                .record(AuditRecord::new(
                    Component::Broker,
                    Event::AuthorizationDenied,
                ))
                .expect("record");
        }
        auditor.sync().expect("sync");
    }
    drop(log);
    path
}

fn segment(tail: Tail) -> Segment {
    match tail {
        Tail::Segment(s) => s,
        other => panic!("expected a segment, got {other:?}"),
    }
}

fn lines(bytes: &[u8]) -> Vec<AuditRecord> {
    bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("record"))
        .collect()
}

#[test]
fn segments_end_at_the_newest_checkpoint_and_continue_after_the_cursor() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Records 0..=2, checkpoint 3; record 4, checkpoint 5.
    let path = write_log(dir.path(), "audit.jsonl", &[3, 1]);
    let s = segment(next_segment(&path, None, ALL).expect("read"));
    assert_eq!((s.first, s.last), (0, 5));
    assert_eq!(
        s.bytes,
        std::fs::read(&path).expect("log"),
        "the lines as written"
    );
    assert_eq!(s.end.seq, 5);
    let records = lines(&s.bytes);
    assert_eq!(records.last().map(|r| r.event), Some(Event::Checkpoint));
    assert_eq!(
        s.end.hash.as_deref(),
        records.last().map(|r| r.hash.as_str())
    );
    assert_eq!(
        &s.date,
        &records[0].at[..10],
        "the date of the first record"
    );

    // A segment is cut at the first checkpoint past the limit.
    let limited = Limits {
        max_records: 2,
        until: None,
    };
    let s1 = segment(next_segment(&path, None, limited).expect("read"));
    assert_eq!((s1.first, s1.last), (0, 3));
    let s2 = segment(next_segment(&path, Some(&s1.end), limited).expect("read"));
    assert_eq!((s2.first, s2.last), (4, 5));
    assert_eq!([s1.bytes, s2.bytes].concat(), s.bytes);
    assert_eq!(
        next_segment(&path, Some(&s2.end), ALL).expect("read"),
        Tail::Nothing
    );
}

#[test]
fn records_after_the_last_checkpoint_and_a_torn_last_line_wait() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_log(dir.path(), "audit.jsonl", &[2]);
    let whole = std::fs::read(&path).expect("log");
    let first = segment(next_segment(&path, None, ALL).expect("read"));
    // The writer appends a record and its checkpoint; we see it halfway through.
    let reopened = {
        let key = CheckpointKey::load_or_create(
            &dir.path().join("audit.jsonl.key.pem"),
            Component::Broker,
        )
        .expect("key");
        let log = AuditLog::open_signed(&path, 16, Some(key)).expect("reopen");
        log.auditor()
            .record(AuditRecord::new(
                Component::Broker,
                Event::ConnectionRefused,
            ))
            .expect("record");
        log.auditor().sync().expect("sync"); // record 3, checkpoint 4
        drop(log);
        std::fs::read(&path).expect("log")
    };
    let tail = &reopened[whole.len()..];
    let record_end = tail.iter().position(|b| *b == b'\n').expect("a line") + 1;
    let torn = whole.len() + record_end + (tail.len() - record_end) / 2;
    std::fs::write(&path, &reopened[..torn]).expect("torn write");
    assert_eq!(
        next_segment(&path, Some(&first.end), ALL).expect("read"),
        Tail::Nothing,
        "a record without a checkpoint after it, and a torn line, are not shipped"
    );
    // The writer finishes the line.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(&reopened[torn..]))
        .expect("finish the line");
    let s = segment(next_segment(&path, Some(&first.end), ALL).expect("read"));
    assert_eq!((s.first, s.last), (3, 4));
    assert_eq!(s.bytes, tail);
}

#[test]
fn a_pass_reads_from_the_cursor_offset_and_falls_back_to_a_scan() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_log(dir.path(), "audit.jsonl", &[3, 2]);
    let limited = Limits {
        max_records: 1,
        until: None,
    };
    let s1 = segment(next_segment(&path, None, limited).expect("read"));
    assert_eq!((s1.first, s1.last), (0, 3));
    let expected = segment(next_segment(&path, Some(&s1.end), ALL).expect("read"));
    assert_eq!((expected.first, expected.last), (4, 6));

    // Blank out everything before the cursor's line: a read from the offset never
    // looks there, so it still finds the tail ...
    let mut text = std::fs::read(&path).expect("log");
    let start = usize::try_from(s1.end.line_start).expect("small");
    for b in &mut text[..start] {
        if *b != b'\n' {
            *b = b'x';
        }
    }
    std::fs::write(&path, &text).expect("write");
    assert_eq!(
        next_segment(&path, Some(&s1.end), ALL).expect("read"),
        Tail::Segment(expected.clone())
    );
    // ... while a cursor whose offset no longer lines up makes it scan from the start,
    // which finds the damage.
    let stale = ShippedAudit {
        line_start: 0,
        ..s1.end.clone()
    };
    assert!(matches!(
        next_segment(&path, Some(&stale), ALL),
        Err(TailError::Diverged(_))
    ));

    // On an intact log the scan finds the record wherever it is (a cursor from before
    // offsets were kept has none, nor a hash).
    let path = write_log(dir.path(), "intact.jsonl", &[3, 2]);
    let s1 = segment(next_segment(&path, None, limited).expect("read"));
    for cursor in [
        ShippedAudit {
            line_start: 1,
            ..s1.end.clone()
        },
        ShippedAudit {
            seq: 3,
            hash: None,
            line_start: 0,
        },
    ] {
        let s = segment(next_segment(&path, Some(&cursor), ALL).expect("read"));
        assert_eq!((s.first, s.last), (4, 6), "{cursor:?}");
    }
}

#[test]
fn a_truncated_or_replaced_log_is_detected_through_the_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_log(dir.path(), "audit.jsonl", &[3, 2]);
    let s = segment(next_segment(&path, None, ALL).expect("read"));
    let text = std::fs::read(&path).expect("log");

    // Truncated to before the shipped checkpoint.
    std::fs::write(
        &path,
        &text[..usize::try_from(s.end.line_start).expect("small")],
    )
    .expect("truncate");
    assert!(matches!(
        next_segment(&path, Some(&s.end), ALL),
        Err(TailError::Diverged(Divergence::Missing(_)))
    ));

    // Replaced by another chain, longer and of the same shape: same seqs, other hashes.
    let other = write_log(dir.path(), "other.jsonl", &[3, 2, 4]);
    std::fs::copy(&other, &path).expect("replace");
    assert!(matches!(
        next_segment(&path, Some(&s.end), ALL),
        Err(TailError::Diverged(Divergence::Replaced(_)))
    ));

    // Rotated: a fresh log in its place, shorter than what was shipped.
    let fresh = write_log(dir.path(), "fresh.jsonl", &[1]);
    std::fs::copy(&fresh, &path).expect("rotate");
    assert!(matches!(
        next_segment(&path, Some(&s.end), ALL),
        Err(TailError::Diverged(_))
    ));

    // Restored: it lines up again.
    std::fs::write(&path, &text).expect("restore");
    assert_eq!(
        next_segment(&path, Some(&s.end), ALL).expect("read"),
        Tail::Nothing
    );
}

#[test]
fn a_log_that_does_not_start_a_chain_or_breaks_it_is_not_shipped_past_the_break() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_log(dir.path(), "audit.jsonl", &[2, 2]);
    let text = std::fs::read_to_string(&path).expect("log");
    let all: Vec<&str> = text.lines().collect();
    // Starts mid-chain.
    std::fs::write(&path, all[1..].join("\n") + "\n").expect("write");
    assert!(matches!(
        next_segment(&path, None, ALL),
        Err(TailError::Broken { offset: 0, .. })
    ));
    // Record 4 deleted: the first segment (0..=2) still ships, not past the break.
    let mut gap: Vec<&str> = all.clone();
    gap.remove(4);
    std::fs::write(&path, gap.join("\n") + "\n").expect("write");
    let s = segment(next_segment(&path, None, ALL).expect("read"));
    assert_eq!((s.first, s.last), (0, 2));
    assert!(matches!(
        next_segment(&path, Some(&s.end), ALL),
        Err(TailError::Broken { .. })
    ));
}

#[test]
fn the_segment_in_flight_is_read_again_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_log(dir.path(), "audit.jsonl", &[2, 2, 2]);
    let until = |seq| Limits {
        max_records: usize::MAX,
        until: Some(seq),
    };
    let s = segment(next_segment(&path, None, until(5)).expect("read"));
    assert_eq!(
        (s.first, s.last),
        (0, 5),
        "not up to the newest checkpoint (8)"
    );
    assert!(matches!(
        next_segment(&path, None, until(4)),
        Err(TailError::Diverged(_))
    ));
    assert_eq!(
        next_segment(&path, None, until(20)).expect("read"),
        Tail::Nothing
    );
    assert_eq!(
        next_segment(&dir.path().join("none.jsonl"), None, ALL).expect("read"),
        Tail::Missing
    );
}

/// A crash between writing a segment and moving the cursor: the retry writes the same
/// object with the same bytes, even though the log grew meanwhile, and nothing twice.
#[tokio::test]
async fn a_retry_after_a_crash_rewrites_the_same_object_and_ships_each_record_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_log(dir.path(), "broker.jsonl", &[2]);
    let store = Arc::new(Mutex::new(
        Store::open(&dir.path().join("data")).expect("store"),
    ));
    let sink = Arc::new(ObjectStoreSink::in_memory("objects"));
    let log = ShippedLog {
        component: "broker".into(),
        path: path.clone(),
        retention: "audit-7y".into(),
        own: None,
    };
    // The pass planned (and persisted) segment 0..=2, wrote it, and died.
    let Tail::Segment(planned) = plan(&store, "objects", &log).expect("plan") else {
        panic!("a segment");
    };
    let name = object_name("audit-7y", "broker", &planned);
    assert_eq!(
        name,
        format!(
            "audit/retention=audit-7y/component=broker/date={}/{:020}-{:020}.jsonl",
            planned.date, 0, 2
        )
    );
    sink.put_durable(&name, planned.bytes.clone().into())
        .await
        .expect("put");
    // The broker wrote more meanwhile.
    let key =
        CheckpointKey::load_or_create(&dir.path().join("broker.jsonl.key.pem"), Component::Broker)
            .expect("key");
    let writer = AuditLog::open_signed(&path, 16, Some(key)).expect("reopen");
    writer
        .auditor()
        .record(AuditRecord::new(
            Component::Broker,
            Event::ConnectionRefused,
        ))
        .expect("record");
    writer.close().expect("close"); // record 3, checkpoint 4

    assert_eq!(
        ship_log(&sink, &log, &store).await.expect("ship"),
        Found::Shipped
    );
    let objects = sink.list_objects("audit").await.expect("list");
    assert_eq!(objects.len(), 2, "{objects:?}");
    let mut shipped = Vec::new();
    for o in &objects {
        let bytes = sink
            .store()
            .get(&object_store::path::Path::from(o.as_str()))
            .await
            .expect("get")
            .bytes()
            .await
            .expect("bytes");
        shipped.extend_from_slice(&bytes);
    }
    assert_eq!(
        shipped,
        std::fs::read(&path).expect("log"),
        "each record once, in order"
    );
    assert!(objects[0].ends_with(&format!("{:020}-{:020}.jsonl", 0, 2)));
    assert!(objects[1].ends_with(&format!("{:020}-{:020}.jsonl", 3, 4)));
    let cursor = lock(&store)
        .audit_cursor("objects", "broker")
        .expect("cursor");
    assert_eq!(cursor.pending, None);
    assert_eq!(cursor.shipped.map(|s| s.seq), Some(4));
}
