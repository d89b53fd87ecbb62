//! The object sink against a real S3-compatible server: moto's standalone server
//! (`python3 -m pip install 'moto[server]==5.*'`; `scripts/test` installs it), started by
//! `tests/py/moto_server.py` on 127.0.0.1 port 0 (it reports the port it bound) per test
//! and killed on drop.
//!
//! Objects are read back through `object_store` and, independently, with plain HTTP GETs
//! of the literal key, and the COSE signatures in the `.cborseq` objects are verified
//! again. Then the server is stopped (delivery must fail promptly with `Unavailable`)
//! and started afresh (delivery must succeed once the bucket exists again).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use vitalmq_bridge::sink::object::{ObjectStoreSink, S3Settings};
use vitalmq_bridge::sink::{Batch, OutboxRecord, Sink as _, SinkError};
use vitalmq_envelope::{Algorithm, DeviceId, SigningKey, sign_payload, verify_signature_only};

const BUCKET: &str = "vitalmq-test";
const PREFIX: &str = "exports/v1";
const SINK: &str = "objects";
/// How long moto may take to start (Python imports on a busy machine).
const MOTO_START: Duration = Duration::from_secs(30);
/// How soon a delivery to a stopped server must fail.
const PROMPT_FAILURE: Duration = Duration::from_secs(30);
/// 2025-03-01T23:59:59Z and one second later, the next UTC day.
const BEFORE_MIDNIGHT_MS: u64 = 1_740_873_599_000;
const AFTER_MIDNIGHT_MS: u64 = 1_740_873_600_000;

/// A moto server process; killed on drop.
struct Moto {
    child: Option<Child>,
    port: u16,
    log: PathBuf,
}

/// What `tests/py/moto_server.py` prints once it listens, followed by its address.
const MOTO_READY: &str = "moto listening on ";

impl Moto {
    /// Starts moto on `port` (0: a port it picks and reports) and waits for its ready
    /// line.
    async fn start(port: u16, log_dir: &Path) -> Self {
        let log = log_dir.join(format!("moto-{port}-{}.log", unique()));
        let out = std::fs::File::create(&log).expect("create moto log");
        let err = out.try_clone().expect("clone log handle");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/py/moto_server.py");
        let child = Command::new("python3")
            .arg(script)
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn python3 tests/py/moto_server.py");
        let mut moto = Self {
            child: Some(child),
            port,
            log,
        };
        moto.port = moto.wait_ready().await;
        assert!(port == 0 || moto.port == port, "moto bound {}", moto.port);
        moto
    }

    /// The port moto reports once it listens.
    async fn wait_ready(&mut self) -> u16 {
        let deadline = Instant::now() + MOTO_START;
        loop {
            if let Some(child) = &mut self.child {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("moto exited ({status}) before listening:\n{}", self.log());
                }
            }
            let bound = self.log().lines().find_map(|l| {
                let addr: std::net::SocketAddr = l.strip_prefix(MOTO_READY)?.trim().parse().ok()?;
                Some(addr.port())
            });
            if let Some(port) = bound {
                return port;
            }
            assert!(
                Instant::now() < deadline,
                "moto did not listen within {MOTO_START:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `object_store` cannot create buckets; S3's CreateBucket is a bare PUT (moto does
    /// not check signatures).
    async fn create_bucket(&self) {
        let (head, body) = http(self.port, "PUT", &format!("/{BUCKET}"))
            .await
            .expect("PUT bucket");
        assert!(
            head.contains(" 200 "),
            "create bucket: {head}\n{}",
            String::from_utf8_lossy(&body)
        );
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos()
}

/// Fails the test (never skips it) when moto is not installed.
fn require_moto() {
    let found = Command::new("python3")
        .args(["-c", "import moto.server"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "moto is not installed: run scripts/test, which installs it \
         (python3 -m pip install 'moto[server]==5.*')"
    );
}

/// One HTTP/1.0 request (so the answer is neither chunked nor kept alive): the head as
/// text and the body.
async fn http(port: u16, method: &str, path: &str) -> std::io::Result<(String, Vec<u8>)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let request =
        format!("{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .map_err(|_| std::io::Error::other("no complete answer within 10 s"))??;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("answer without a head"))?;
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    Ok((head, answer[split + 4..].to_vec()))
}

fn settings(port: u16) -> S3Settings {
    S3Settings {
        bucket: BUCKET.into(),
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        region: "us-east-1".into(),
        access_key_id: "testing".into(),
        secret_access_key: "testing".into(),
        allow_http: true,
        prefix: PREFIX.into(),
    }
}

/// A record whose `raw` is a real COSE_Sign1 message signed with `key`.
fn record(
    key: &SigningKey,
    position: i64,
    site: &str,
    device: &str,
    received_at_ms: u64,
) -> OutboxRecord {
    let kid = DeviceId::new(device).expect("device id");
    let payload = format!("reading {position}").into_bytes();
    let raw = sign_payload(&payload, &kid, key).expect("sign");
    OutboxRecord {
        position,
        event_id: format!("ev-{position}"),
        device: device.into(),
        site: site.into(),
        epoch: 1,
        seq: u64::try_from(position).expect("positive"),
        observed_at_ms: received_at_ms - 20,
        received_at_ms,
        topic: format!("devices/{device}/telemetry"),
        raw: Bytes::from(raw),
        normalized_json:
            serde_json::json!({"event_id": format!("ev-{position}"), "device": device}).to_string(),
        ingest_patient: None,
    }
}

/// Positions 1..=6 over 2 sites, 3 devices and midnight UTC.
fn first_batch(key: &SigningKey) -> Batch {
    Batch {
        first: 1,
        last: 6,
        records: vec![
            record(key, 1, "north", "dev-a", BEFORE_MIDNIGHT_MS),
            record(key, 2, "north", "dev-b", BEFORE_MIDNIGHT_MS),
            record(key, 3, "south", "dev-c", BEFORE_MIDNIGHT_MS),
            record(key, 4, "north", "dev-a", BEFORE_MIDNIGHT_MS + 500),
            record(key, 5, "north", "dev-a", AFTER_MIDNIGHT_MS),
            record(key, 6, "south", "dev-c", AFTER_MIDNIGHT_MS),
        ],
    }
}

/// Partition directory (under `{PREFIX}/{kind}/`) and the positions in it, in order.
const FIRST_PARTITIONS: [(&str, &[i64]); 5] = [
    ("site=north/device=dev-a/date=2025-03-01", &[1, 4]),
    ("site=north/device=dev-a/date=2025-03-02", &[5]),
    ("site=north/device=dev-b/date=2025-03-01", &[2]),
    ("site=south/device=dev-c/date=2025-03-01", &[3]),
    ("site=south/device=dev-c/date=2025-03-02", &[6]),
];
const FIRST_RANGE: &str = "00000000000000000001-00000000000000000006";

async fn snapshot(sink: &ObjectStoreSink) -> BTreeMap<String, Bytes> {
    let mut all = BTreeMap::new();
    for name in sink.list_objects("").await.expect("list") {
        let bytes = sink
            .store()
            .get(&ObjectPath::from(name.as_str()))
            .await
            .expect("GET object")
            .bytes()
            .await
            .expect("object body");
        all.insert(name, bytes);
    }
    all
}

/// The items of an RFC 8742 CBOR sequence, each decoded with ciborium.
fn cbor_items(mut rest: &[u8]) -> Vec<Vec<u8>> {
    let mut items = Vec::new();
    while !rest.is_empty() {
        let before = rest;
        let _: ciborium::Value = ciborium::from_reader(&mut rest).expect("a CBOR item");
        items.push(before[..before.len() - rest.len()].to_vec());
    }
    items
}

/// Lists and reads the bucket with boto3: `{"keys": [...], "objects": {key: {"content_type",
/// "body_hex"}}}`.
fn boto3_view(port: u16) -> serde_json::Value {
    const SCRIPT: &str = r#"
import json, sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id="testing", aws_secret_access_key="testing")
keys = [o["Key"] for o in s3.list_objects_v2(Bucket=sys.argv[2])["Contents"]]
objects = {}
for key in keys:
    got = s3.get_object(Bucket=sys.argv[2], Key=key)
    objects[key] = {"content_type": got["ContentType"], "body_hex": got["Body"].read().hex()}
print(json.dumps({"keys": keys, "objects": objects}))
"#;
    let out = Command::new("python3")
        .args(["-c", SCRIPT, &format!("http://127.0.0.1:{port}"), BUCKET])
        .output()
        .expect("run python3 with boto3");
    assert!(
        out.status.success(),
        "boto3 read failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("boto3 script prints JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_objects_round_trip_verify_and_are_idempotent() {
    require_moto();
    let logs = tempfile::tempdir().expect("tempdir");
    let moto = Moto::start(0, logs.path()).await;
    moto.create_bucket().await;
    let sink = ObjectStoreSink::s3(SINK, settings(moto.port)).expect("s3 sink");
    let key = SigningKey::generate(Algorithm::EdDsa).expect("key");
    let batch = first_batch(&key);

    sink.deliver(&batch).await.expect("delivered");
    let objects = snapshot(&sink).await;
    let mut expected: Vec<String> = FIRST_PARTITIONS
        .iter()
        .flat_map(|(dir, _)| {
            [
                format!("{PREFIX}/normalized/{dir}/{FIRST_RANGE}.ndjson"),
                format!("{PREFIX}/raw/{dir}/{FIRST_RANGE}.cborseq"),
            ]
        })
        .collect();
    expected.sort();
    assert_eq!(objects.keys().cloned().collect::<Vec<_>>(), expected);

    let verifying = key.verifying_key();
    for (dir, positions) in FIRST_PARTITIONS {
        let records: Vec<&OutboxRecord> = positions
            .iter()
            .map(|p| {
                batch
                    .records
                    .iter()
                    .find(|r| r.position == *p)
                    .expect("in batch")
            })
            .collect();
        let ndjson = &objects[&format!("{PREFIX}/normalized/{dir}/{FIRST_RANGE}.ndjson")];
        let lines: Vec<&str> = std::str::from_utf8(ndjson)
            .expect("UTF-8")
            .split_inclusive('\n')
            .collect();
        let items = cbor_items(&objects[&format!("{PREFIX}/raw/{dir}/{FIRST_RANGE}.cborseq")]);
        assert_eq!(lines.len(), records.len(), "{dir}");
        assert_eq!(items.len(), records.len(), "{dir}");
        for ((line, item), record) in lines.iter().zip(&items).zip(&records) {
            assert_eq!(*line, format!("{}\n", record.normalized_json), "{dir}");
            assert_eq!(item.as_slice(), &record.raw[..], "{dir}");
            verify_signature_only(item, &verifying, &[])
                .unwrap_or_else(|r| panic!("{dir}: signature no longer verifies: {r:?}"));
        }
    }

    // Another S3 client (boto3, which moto depends on) sees the literal keys
    // (`site=north`, not percent-encoded), the bytes and the media types of the layout.
    let seen = boto3_view(moto.port);
    assert_eq!(seen["keys"], serde_json::json!(expected));
    for (name, bytes) in &objects {
        let object = &seen["objects"][name];
        assert_eq!(object["body_hex"], hex::encode(bytes), "{name}");
        let media_type = if name.ends_with(".ndjson") {
            "application/x-ndjson"
        } else {
            "application/cbor-seq"
        };
        assert_eq!(object["content_type"], media_type, "{name}");
    }

    // A retry of the same batch leaves the same objects with the same bytes.
    sink.deliver(&batch).await.expect("delivered again");
    assert_eq!(snapshot(&sink).await, objects);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_outage_is_unavailable_promptly_and_delivery_resumes() {
    require_moto();
    let logs = tempfile::tempdir().expect("tempdir");
    let mut moto = Moto::start(0, logs.path()).await;
    let port = moto.port;
    moto.create_bucket().await;
    let sink = ObjectStoreSink::s3(SINK, settings(port)).expect("s3 sink");
    let key = SigningKey::generate(Algorithm::EdDsa).expect("key");
    sink.deliver(&first_batch(&key))
        .await
        .expect("delivered while up");

    let second = Batch {
        first: 7,
        last: 9,
        records: vec![
            record(&key, 7, "north", "dev-a", AFTER_MIDNIGHT_MS + 1),
            record(&key, 9, "north", "dev-b", AFTER_MIDNIGHT_MS + 2),
        ],
    };
    moto.stop();
    let started = Instant::now();
    let down = tokio::time::timeout(2 * PROMPT_FAILURE, sink.deliver(&second))
        .await
        .expect("delivery to a stopped server gave up");
    let took = started.elapsed();
    match down {
        Err(SinkError::Unavailable { sink: name, detail }) => {
            eprintln!("stopped server: Unavailable after {took:?}: {detail}");
            assert_eq!(name, SINK);
            assert!(
                detail
                    .to_string()
                    .contains(&format!("{PREFIX}/raw/site=north/")),
                "names the object: {detail}"
            );
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(took < PROMPT_FAILURE, "took {took:?}");

    // Same port (bound before, so known), fresh state: without the bucket the store is still unavailable.
    let moto = Moto::start(port, logs.path()).await;
    let no_bucket = tokio::time::timeout(2 * PROMPT_FAILURE, sink.deliver(&second))
        .await
        .expect("delivery without a bucket gave up");
    eprintln!("missing bucket: {no_bucket:?}");
    assert!(
        matches!(no_bucket, Err(SinkError::Unavailable { .. })),
        "missing bucket: {no_bucket:?}"
    );

    moto.create_bucket().await;
    sink.deliver(&second)
        .await
        .expect("delivered after restart");
    let range = "00000000000000000007-00000000000000000009";
    assert_eq!(
        sink.list_objects("").await.expect("list"),
        [
            format!("{PREFIX}/normalized/site=north/device=dev-a/date=2025-03-02/{range}.ndjson"),
            format!("{PREFIX}/normalized/site=north/device=dev-b/date=2025-03-02/{range}.ndjson"),
            format!("{PREFIX}/raw/site=north/device=dev-a/date=2025-03-02/{range}.cborseq"),
            format!("{PREFIX}/raw/site=north/device=dev-b/date=2025-03-02/{range}.cborseq"),
        ]
    );
}
