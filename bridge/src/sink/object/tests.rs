//! The layout, idempotency and refusals over `InMemory`; files and failures on a local
//! directory. Expected object names are spelled out literally: they are an external
//! format, so a change to them must break these tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ciborium::Value;
use time::macros::datetime;

use super::*;

pub(super) const NAME: &str = "objects";
const PREFIX: &str = "tenant-a/vitalmq";
/// Bound on a failing delivery in these tests: failures must come back promptly.
const PROMPTLY: Duration = Duration::from_secs(10);

fn ms(at: OffsetDateTime) -> u64 {
    u64::try_from(at.unix_timestamp_nanos() / 1_000_000).expect("test times are after 1970")
}

/// A COSE_Sign1-shaped CBOR item (tag 18) unique to `position`.
fn cose(position: i64) -> Bytes {
    let message = Value::Tag(
        18,
        Box::new(Value::Array(vec![
            Value::Bytes(vec![0xa1, 0x01, 0x27]),
            Value::Map(vec![(
                Value::Integer(4.into()),
                Value::Bytes(b"dev".to_vec()),
            )]),
            Value::Bytes(format!("payload {position}").into_bytes()),
            Value::Bytes(vec![u8::try_from(position % 251).expect("< 251"); 64]),
        ])),
    );
    let mut out = Vec::new();
    ciborium::into_writer(&message, &mut out).expect("encode CBOR");
    out.into()
}

pub(super) fn record(position: i64, site: &str, device: &str, received_at_ms: u64) -> OutboxRecord {
    let event_id = format!("ev-{position}");
    OutboxRecord {
        position,
        event_id: event_id.clone(),
        device: device.to_owned(),
        site: site.to_owned(),
        epoch: 1,
        seq: u64::try_from(position).expect("positive"),
        observed_at_ms: received_at_ms.saturating_sub(50),
        received_at_ms,
        topic: format!("devices/{device}/telemetry"),
        raw: cose(position),
        normalized_json: serde_json::json!({
            "event_id": event_id,
            "device": device,
            "site": site,
            "hr": 60 + position,
        })
        .to_string(),
        ingest_patient: None,
    }
}

/// 2 sites, 3 devices, both sides of midnight UTC on 2025-03-01, gaps in the range.
fn mixed_batch() -> Batch {
    let before_midnight = ms(datetime!(2025-03-01 23:59:59.999 UTC));
    let midnight = ms(datetime!(2025-03-02 00:00:00 UTC));
    let noon = ms(datetime!(2025-03-01 12:00 UTC));
    Batch {
        first: 100,
        last: 110,
        records: vec![
            record(100, "north", "dev-a", before_midnight - 10),
            record(101, "north", "dev-b", noon),
            record(102, "north", "dev-a", before_midnight),
            record(103, "south", "dev-c", noon),
            record(104, "north", "dev-a", midnight),
            record(106, "south", "dev-c", midnight + 1),
            record(107, "north", "dev-b", noon + 1),
        ],
    }
}

/// The partitions of [`mixed_batch`]: partition directory and positions, in order.
const MIXED_PARTITIONS: [(&str, &[i64]); 5] = [
    ("site=north/device=dev-a/date=2025-03-01", &[100, 102]),
    ("site=north/device=dev-a/date=2025-03-02", &[104]),
    ("site=north/device=dev-b/date=2025-03-01", &[101, 107]),
    ("site=south/device=dev-c/date=2025-03-01", &[103]),
    ("site=south/device=dev-c/date=2025-03-02", &[106]),
];

const RANGE: &str = "00000000000000000100-00000000000000000110";

fn prefixed_sink() -> ObjectStoreSink {
    ObjectStoreSink::new(NAME, Arc::new(InMemory::new()), PREFIX).expect("valid prefix")
}

/// Every object of the store: name to bytes.
pub(super) async fn snapshot(sink: &ObjectStoreSink) -> BTreeMap<String, Bytes> {
    let mut all = BTreeMap::new();
    for name in sink.list_objects("").await.expect("list") {
        let bytes = sink
            .store()
            .get(&ObjectPath::from(name.as_str()))
            .await
            .expect("get")
            .bytes()
            .await
            .expect("body");
        all.insert(name, bytes);
    }
    all
}

/// Splits an RFC 8742 CBOR sequence into its items' bytes, decoding each with ciborium.
pub(super) fn cbor_items(mut rest: &[u8]) -> Vec<Vec<u8>> {
    let mut items = Vec::new();
    while !rest.is_empty() {
        let before = rest;
        let _: Value = ciborium::from_reader(&mut rest).expect("a CBOR item");
        items.push(before[..before.len() - rest.len()].to_vec());
    }
    items
}

fn by_position(batch: &Batch, position: i64) -> &OutboxRecord {
    batch
        .records
        .iter()
        .find(|r| r.position == position)
        .expect("position in batch")
}

#[tokio::test]
async fn partitions_by_site_device_and_utc_date_with_names_from_the_range() {
    let sink = prefixed_sink();
    sink.deliver(&mixed_batch()).await.expect("delivered");

    let mut expected = Vec::new();
    for (dir, _) in MIXED_PARTITIONS {
        expected.push(format!("{PREFIX}/normalized/{dir}/{RANGE}.ndjson"));
        expected.push(format!("{PREFIX}/raw/{dir}/{RANGE}.cborseq"));
    }
    expected.sort();
    assert_eq!(sink.list_objects("").await.expect("list"), expected);
    assert_eq!(
        sink.list_objects("raw/site=south").await.expect("list"),
        [
            format!("{PREFIX}/raw/site=south/device=dev-c/date=2025-03-01/{RANGE}.cborseq"),
            format!("{PREFIX}/raw/site=south/device=dev-c/date=2025-03-02/{RANGE}.cborseq"),
        ]
    );
}

/// A sink whose allow-list names neither `site` nor `device` writes names with only
/// the date level (no raw objects without `raw`); one naming `device` only, no `site=`
/// level; names stay the same on a retry.
#[tokio::test]
async fn a_restricted_sink_partitions_only_by_what_its_fields_allow() {
    use crate::governance::Fields;
    let only = |f: &[&str]| Fields::Only(f.iter().map(|s| (*s).to_owned()).collect());
    let sink = prefixed_sink().with_fields(&only(&["m", "observed_at"]));
    let batch = mixed_batch();
    sink.deliver(&batch).await.expect("delivered");
    let names = sink.list_objects("").await.expect("list");
    assert_eq!(
        names,
        [
            format!("{PREFIX}/normalized/date=2025-03-01/{RANGE}.ndjson"),
            format!("{PREFIX}/normalized/date=2025-03-02/{RANGE}.ndjson"),
        ]
    );
    let first = snapshot(&sink).await;
    let lines = first[&names[0]]
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .count();
    assert_eq!(lines, 5, "every site and device of the date, in one object");
    sink.deliver(&batch).await.expect("again");
    assert_eq!(snapshot(&sink).await, first, "idempotent");

    let sink = prefixed_sink().with_fields(&only(&["device", "raw"]));
    sink.deliver(&batch).await.expect("delivered");
    let names = sink.list_objects("").await.expect("list");
    assert!(names.iter().all(|n| !n.contains("site=")), "{names:?}");
    assert!(
        names.contains(&format!(
            "{PREFIX}/raw/device=dev-c/date=2025-03-02/{RANGE}.cborseq"
        )),
        "{names:?}"
    );

    let sink = prefixed_sink().with_fields(&Fields::All);
    sink.deliver(&batch).await.expect("delivered");
    assert_eq!(
        sink.list_objects("").await.expect("list").len(),
        10,
        "whole events: every level"
    );
}

#[tokio::test]
async fn ndjson_lines_and_cborseq_items_are_the_records_in_order() {
    let sink = prefixed_sink();
    let batch = mixed_batch();
    sink.deliver(&batch).await.expect("delivered");
    let objects = snapshot(&sink).await;

    for (dir, positions) in MIXED_PARTITIONS {
        let ndjson = &objects[&format!("{PREFIX}/normalized/{dir}/{RANGE}.ndjson")];
        let text = std::str::from_utf8(ndjson).expect("UTF-8");
        assert!(text.ends_with('\n'), "{dir}: last line ends with a newline");
        let lines: Vec<&str> = text.lines().collect();
        let cborseq = &objects[&format!("{PREFIX}/raw/{dir}/{RANGE}.cborseq")];
        let items = cbor_items(cborseq);
        assert_eq!(lines.len(), positions.len(), "{dir}: one line per record");
        assert_eq!(items.len(), positions.len(), "{dir}: one item per record");
        for ((line, item), position) in lines.iter().zip(&items).zip(positions) {
            let record = by_position(&batch, *position);
            assert_eq!(*line, record.normalized_json, "{dir}: line of {position}");
            let json: serde_json::Value = serde_json::from_str(line).expect("line is JSON");
            assert_eq!(json["event_id"], record.event_id.as_str());
            assert_eq!(
                item.as_slice(),
                &record.raw[..],
                "{dir}: item of {position}"
            );
        }
    }
}

#[tokio::test]
async fn delivering_a_batch_again_leaves_the_same_objects_and_bytes() {
    let sink = prefixed_sink();
    let batch = mixed_batch();
    sink.deliver(&batch).await.expect("first delivery");
    let once = snapshot(&sink).await;
    sink.deliver(&batch).await.expect("second delivery");
    assert_eq!(snapshot(&sink).await, once);

    // Bytes depend on the records only: a fresh store gets the same objects.
    let fresh = prefixed_sink();
    fresh.deliver(&batch).await.expect("delivered");
    assert_eq!(snapshot(&fresh).await, once);
}

#[tokio::test]
async fn consecutive_batches_of_one_partition_list_in_outbox_order() {
    let sink = ObjectStoreSink::in_memory(NAME);
    let at = ms(datetime!(2025-03-01 08:00 UTC));
    for (first, last) in [(9, 10), (11, 99), (100, 100)] {
        let batch = Batch {
            first,
            last,
            records: vec![record(last, "north", "dev-a", at)],
        };
        sink.deliver(&batch).await.expect("delivered");
    }
    let dir = "normalized/site=north/device=dev-a/date=2025-03-01";
    assert_eq!(
        sink.list_objects(dir).await.expect("list"),
        [
            format!("{dir}/00000000000000000009-00000000000000000010.ndjson"),
            format!("{dir}/00000000000000000011-00000000000000000099.ndjson"),
            format!("{dir}/00000000000000000100-00000000000000000100.ndjson"),
        ]
    );
}

#[tokio::test]
async fn an_empty_batch_writes_nothing() {
    let sink = ObjectStoreSink::in_memory(NAME);
    let batch = Batch {
        first: 5,
        last: 8,
        records: Vec::new(),
    };
    sink.deliver(&batch).await.expect("delivered");
    assert!(sink.list_objects("").await.expect("list").is_empty());
}

#[tokio::test]
async fn a_record_that_cannot_be_placed_refuses_the_whole_batch() {
    type Spoil = fn(&mut OutboxRecord);
    let cases: &[(&str, Spoil)] = &[
        ("site with '/'", |r| r.site = "north/../south".into()),
        ("empty site", |r| r.site = String::new()),
        ("site '..'", |r| r.site = "..".into()),
        ("device with '='", |r| r.device = "dev=x".into()),
        ("device with '..'", |r| r.device = "dev..x".into()),
        ("device '../x'", |r| r.device = "../x".into()),
        ("empty device", |r| r.device = String::new()),
        ("device with a space", |r| r.device = "dev a".into()),
        ("date past 9999", |r| r.received_at_ms = u64::MAX),
        ("normalized with a newline", |r| {
            r.normalized_json = "{\"a\":1}\n{\"b\":2}".into()
        }),
        ("empty normalized", |r| r.normalized_json = String::new()),
        ("empty raw", |r| r.raw = Bytes::new()),
        ("two CBOR items", |r| {
            r.raw = [cose(1), cose(2)].concat().into();
        }),
        ("truncated CBOR", |r| r.raw = r.raw.slice(..r.raw.len() - 1)),
    ];
    let at = ms(datetime!(2025-03-01 08:00 UTC));
    for (case, spoil) in cases {
        let mut bad = record(7, "north", "dev-b", at);
        spoil(&mut bad);
        let batch = Batch {
            first: 5,
            last: 8,
            records: vec![record(5, "north", "dev-a", at), bad],
        };
        let sink = ObjectStoreSink::in_memory(NAME);
        match sink.deliver(&batch).await {
            Err(SinkError::Refused { sink: name, detail }) => {
                assert_eq!(name, NAME, "{case}");
                assert!(
                    detail.to_string().contains("position 7 (event ev-7)"),
                    "{case}: {detail}"
                );
            }
            other => panic!("{case}: expected Refused, got {other:?}"),
        }
        assert!(
            sink.list_objects("").await.expect("list").is_empty(),
            "{case}: nothing written, not even the valid record's partition"
        );
    }
}

#[tokio::test]
async fn a_batch_whose_records_do_not_fit_its_range_is_refused() {
    let at = ms(datetime!(2025-03-01 08:00 UTC));
    let r = |position| record(position, "north", "dev-a", at);
    let cases = [
        ("first after last", 9, 8, vec![]),
        ("negative first", -1, 8, vec![r(1)]),
        ("before first", 5, 8, vec![r(4)]),
        ("after last", 5, 8, vec![r(5), r(9)]),
        ("out of order", 5, 8, vec![r(6), r(5)]),
        ("repeated", 5, 8, vec![r(6), r(6)]),
    ];
    for (case, first, last, records) in cases {
        let sink = ObjectStoreSink::in_memory(NAME);
        let batch = Batch {
            first,
            last,
            records,
        };
        let result = sink.deliver(&batch).await;
        assert!(
            matches!(result, Err(SinkError::Refused { .. })),
            "{case}: {result:?}"
        );
        assert!(sink.list_objects("").await.expect("list").is_empty());
    }
}

#[test]
fn store_errors_are_retryable_unless_no_retry_can_help() {
    let sink = ObjectStoreSink::in_memory(NAME);
    let path = ObjectPath::from("raw/site=north/x.cborseq");
    let generic = object_store::Error::Generic {
        store: "S3",
        source: "connection refused".into(),
    };
    let denied = object_store::Error::PermissionDenied {
        path: path.to_string(),
        source: "403".into(),
    };
    let invalid = object_store::Error::InvalidPath {
        source: object_store::path::Path::parse("a//b").expect_err("empty segment"),
    };
    for (e, retryable) in [(generic, true), (denied, true), (invalid, false)] {
        let shown = e.to_string();
        match (sink.store_error("PUT", &path, e), retryable) {
            (SinkError::Unavailable { sink, detail }, true)
            | (SinkError::Refused { sink, detail }, false) => {
                assert_eq!(sink, NAME);
                assert!(
                    detail.to_string().contains("PUT raw/site=north/x.cborseq"),
                    "{detail}"
                );
            }
            (other, _) => panic!("{shown}: classified as {other:?}"),
        }
    }
}

#[test]
fn bad_configuration_is_refused_and_secrets_stay_out_of_debug() {
    let settings = S3Settings {
        bucket: String::new(),
        endpoint: Some("http://127.0.0.1:9".into()),
        region: "us-east-1".into(),
        access_key_id: "AKIDEXAMPLE".into(),
        secret_access_key: "very-secret".into(),
        allow_http: true,
        prefix: String::new(),
    };
    assert!(!format!("{settings:?}").contains("very-secret"));
    let no_bucket = ObjectStoreSink::s3(NAME, settings.clone());
    assert!(
        matches!(no_bucket, Err(SinkError::Refused { .. })),
        "{no_bucket:?}"
    );
    let bad_prefix = ObjectStoreSink::s3(
        NAME,
        S3Settings {
            bucket: "b".into(),
            prefix: "a/../b".into(),
            ..settings.clone()
        },
    );
    assert!(
        matches!(bad_prefix, Err(SinkError::Refused { .. })),
        "{bad_prefix:?}"
    );
    let sink = ObjectStoreSink::s3(
        NAME,
        S3Settings {
            bucket: "b".into(),
            ..settings
        },
    )
    .expect("valid settings");
    assert!(!format!("{sink:?}").contains("very-secret"));
}

// Local directory.

/// Every regular file under `root`: path relative to root (with `/`) to bytes.
fn files(root: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, into: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).expect("read dir") {
            let path: PathBuf = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(root, &path, into);
            } else {
                let relative = path.strip_prefix(root).expect("under root");
                let name = relative.to_str().expect("UTF-8 names").to_owned();
                into.insert(name, std::fs::read(&path).expect("read file"));
            }
        }
    }
    let mut all = BTreeMap::new();
    walk(root, root, &mut all);
    all
}

async fn deliver_promptly(sink: &ObjectStoreSink, batch: &Batch) -> Result<(), SinkError> {
    tokio::time::timeout(PROMPTLY, sink.deliver(batch))
        .await
        .expect("delivery answered promptly")
}

#[tokio::test]
async fn local_directory_holds_the_layout_as_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("not/yet/there");
    let sink = ObjectStoreSink::local(NAME, &root).expect("local sink");
    let batch = mixed_batch();
    sink.deliver(&batch).await.expect("delivered");

    let on_disk = files(&root);
    let mut expected = BTreeMap::new();
    for (dir, positions) in MIXED_PARTITIONS {
        let records: Vec<&OutboxRecord> =
            positions.iter().map(|p| by_position(&batch, *p)).collect();
        let ndjson: String = records
            .iter()
            .map(|r| format!("{}\n", r.normalized_json))
            .collect();
        let cborseq: Vec<u8> = records.iter().flat_map(|r| r.raw.to_vec()).collect();
        expected.insert(
            format!("normalized/{dir}/{RANGE}.ndjson"),
            ndjson.into_bytes(),
        );
        expected.insert(format!("raw/{dir}/{RANGE}.cborseq"), cborseq);
    }
    // Exactly these files: no staging files (`name#1`) left behind.
    assert_eq!(on_disk, expected);

    sink.deliver(&batch).await.expect("delivered again");
    assert_eq!(files(&root), expected);
}

#[tokio::test]
async fn local_failure_to_write_raw_is_unavailable_and_writes_no_normalized() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("objects");
    let sink = ObjectStoreSink::local(NAME, &root).expect("local sink");
    // A regular file where the `raw` directory belongs: unwritable even for root, which
    // ignores directory permissions.
    std::fs::write(root.join("raw"), b"in the way").expect("write blocker");

    match deliver_promptly(&sink, &mixed_batch()).await {
        Err(SinkError::Unavailable { sink: name, detail }) => {
            assert_eq!(name, NAME);
            assert!(
                detail.to_string().contains("PUT raw/site="),
                "names the object: {detail}"
            );
            assert!(
                detail.to_string().contains(&format!("{RANGE}.cborseq")),
                "{detail}"
            );
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(
        !root.join("normalized").exists(),
        "no .ndjson without its .cborseq"
    );

    // The operator removes the obstacle; the retry succeeds.
    std::fs::remove_file(root.join("raw")).expect("remove blocker");
    deliver_promptly(&sink, &mixed_batch())
        .await
        .expect("retry delivered");
    assert_eq!(files(&root).len(), 2 * MIXED_PARTITIONS.len());
}

#[tokio::test]
async fn local_retry_after_a_partial_write_converges_to_a_clean_delivery() {
    let batch = mixed_batch();
    let clean = tempfile::tempdir().expect("tempdir");
    ObjectStoreSink::local(NAME, clean.path())
        .expect("local sink")
        .deliver(&batch)
        .await
        .expect("clean delivery");

    let tmp = tempfile::tempdir().expect("tempdir");
    let sink = ObjectStoreSink::local(NAME, tmp.path()).expect("local sink");
    std::fs::write(tmp.path().join("normalized"), b"in the way").expect("write blocker");
    let failed = deliver_promptly(&sink, &batch).await;
    assert!(
        matches!(failed, Err(SinkError::Unavailable { .. })),
        "{failed:?}"
    );
    assert!(
        files(tmp.path())
            .keys()
            .any(|name| name.starts_with("raw/")),
        "raw objects were written before the failure"
    );

    std::fs::remove_file(tmp.path().join("normalized")).expect("remove blocker");
    deliver_promptly(&sink, &batch)
        .await
        .expect("retry delivered");
    assert_eq!(files(tmp.path()), files(clean.path()));
}

// S3 timeouts, without a server: the drain loop must get an answer, not a hang.

fn s3_sink(port: u16) -> ObjectStoreSink {
    let settings = S3Settings {
        bucket: "b".into(),
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        region: "us-east-1".into(),
        access_key_id: "testing".into(),
        secret_access_key: "testing".into(),
        allow_http: true,
        prefix: String::new(),
    };
    ObjectStoreSink::s3(NAME, settings).expect("s3 sink")
}

fn one_record_batch() -> Batch {
    Batch {
        first: 1,
        last: 1,
        records: vec![record(
            1,
            "north",
            "dev-a",
            ms(datetime!(2025-03-01 08:00 UTC)),
        )],
    }
}

#[tokio::test]
async fn s3_endpoint_refusing_connections_is_unavailable_at_once() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").port()
    };
    let result = deliver_promptly(&s3_sink(port), &one_record_batch()).await;
    match result {
        Err(SinkError::Unavailable { detail, .. }) => {
            assert!(
                detail
                    .to_string()
                    .contains("PUT raw/site=north/device=dev-a/"),
                "{detail}"
            );
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn s3_endpoint_that_never_answers_is_unavailable_within_the_deadline() {
    // Accepts connections and reads requests, never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(2 * PUT_DEADLINE, s3_sink(port).deliver(&one_record_batch()))
        .await
        .expect("delivery gave up");
    let took = started.elapsed();
    silent.abort();
    assert!(
        matches!(result, Err(SinkError::Unavailable { .. })),
        "{result:?}"
    );
    // The 10 s request timeout answers, well before the 30 s backstop around each PUT
    // (object_store's defaults would retry for minutes).
    assert!(took < Duration::from_secs(20), "took {took:?}");
}
