//! Erasure reaches the object sinks (issue 20, point 3): objects written by a sealing
//! sink, read back by an independent tool (`tests/py/sealed_objects.py`: the file
//! system, and boto3 against moto), hold no plaintext of a patient and name their
//! subject in the sealed header; `vitalmq objects open` prints a patient's plaintext
//! before the patient is erased, fails saying "erased" after, and still opens another
//! patient's objects; the operator audit log records each open without the subject.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{Moto, Ran, run};
use vitalmq_bridge::sink::object::{ObjectStoreSink, S3Settings};
use vitalmq_bridge::sink::{Batch, OutboxRecord, Sink as _};
use vitalmq_keyring::{Keyring, LocalKeyFile, Subject};

const A: &str = "pt-aaaa1111";
const B: &str = "pt-bbbb2222";
/// Plaintext only patient A's events hold: A's device id and a value only A measured.
const A_DEVICE: &str = "dev-only-a";
const A_VALUE: &str = "\"hr\":187";
/// 2025-03-01T12:00:00Z.
const NOON: u64 = 1_740_830_400_000;
const BUCKET: &str = "vitalmq-sealed";

struct Keys {
    kek: std::path::PathBuf,
    keyring_path: std::path::PathBuf,
    keyring: Arc<Keyring>,
}

fn keys(dir: &Path) -> Keys {
    let kek = dir.join("kek.json");
    let keyring_path = dir.join("data").join("keyring.sqlite3");
    let provider = LocalKeyFile::create(&kek).expect("key file");
    let keyring = Keyring::open(&keyring_path, Arc::new(provider)).expect("keyring");
    Keys {
        kek,
        keyring_path,
        keyring: Arc::new(keyring),
    }
}

fn record(position: i64, device: &str, patient: &str, hr: u32) -> OutboxRecord {
    let event = serde_json::json!({
        "event_id": format!("ev-{position}"),
        "device": device,
        "patient_ref": patient,
        "m": {"hr": hr},
    });
    let mut raw = Vec::new();
    ciborium::into_writer(&format!("signed by {device}, hr {hr}"), &mut raw).expect("cbor");
    OutboxRecord {
        position,
        event_id: format!("ev-{position}"),
        device: device.into(),
        site: "north".into(),
        epoch: 1,
        seq: u64::try_from(position).expect("positive"),
        observed_at_ms: NOON,
        received_at_ms: NOON + 10,
        topic: format!("devices/{device}/telemetry"),
        raw: Bytes::from(raw),
        normalized_json: serde_json::to_string(&event).expect("json"),
        ingest_patient: None,
    }
}

/// A's device, B's device, and a device reassigned from A to B within the day.
fn batch() -> Batch {
    Batch {
        first: 1,
        last: 5,
        records: vec![
            record(1, A_DEVICE, A, 187),
            record(2, "dev-b", B, 61),
            record(3, "dev-shared", A, 187),
            record(4, "dev-shared", B, 62),
            record(5, A_DEVICE, A, 187),
        ],
    }
}

async fn deliver(sink: &ObjectStoreSink) {
    tokio::time::timeout(Duration::from_secs(20), sink.deliver(&batch()))
        .await
        .expect("delivered in time")
        .expect("delivered");
}

/// `tests/py/sealed_objects.py ARGS... A_DEVICE A_VALUE`: every object sealed, none
/// holding A's plaintext; its JSON view.
fn independent_view(args: &[&str]) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/sealed_objects.py");
    let ran = run(
        Command::new("python3")
            .arg(script)
            .args(args)
            .args([A_DEVICE, A_VALUE]),
        Duration::from_secs(30),
    );
    assert!(ran.success, "sealed_objects.py: {}", ran.all());
    serde_json::from_str(ran.stdout.trim()).expect("script prints JSON")
}

/// The normalized object of `subject` from `device` in the view.
fn normalized_of(view: &serde_json::Value, subject: &str, device: &str) -> String {
    view["objects"]
        .as_object()
        .expect("objects")
        .iter()
        .find(|(name, o)| {
            name.contains("normalized/")
                && name.contains(&format!("/device={device}/"))
                && o["subject"] == subject
        })
        .map(|(name, _)| name.clone())
        .unwrap_or_else(|| panic!("no normalized object of {subject} in {view}"))
}

fn open(keys: &Keys, audit: &Path, target: &[&str], env: &[(&str, &str)]) -> Ran {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vitalmq"));
    cmd.args(["objects", "open", "--key-file"])
        .arg(&keys.kek)
        .arg("--keyring")
        .arg(&keys.keyring_path)
        .args(target)
        .env("VITALMQ_OPERATOR_AUDIT", audit);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(&mut cmd, Duration::from_secs(20))
}

/// Before and after erasing A: A's object opens, then fails as erased; B's opens.
fn erase_and_check(keys: &Keys, audit: &Path, a: &[&str], b: &[&str], env: &[(&str, &str)]) {
    let before = open(keys, audit, a, env);
    assert!(before.success, "open A before erasure: {}", before.all());
    assert!(before.stdout.contains(A_DEVICE) && before.stdout.contains(A_VALUE));
    assert!(!before.stdout.contains(B));

    keys.keyring
        .erase(
            &Subject::new(A).expect("subject"),
            "test",
            "erasure request",
            1,
        )
        .expect("erase A");

    let after = open(keys, audit, a, env);
    assert!(!after.success, "A's object still opens: {}", after.all());
    assert!(after.stderr.contains("erased"), "{}", after.all());
    assert!(!after.all().contains(A_DEVICE));
    let other = open(keys, audit, b, env);
    assert!(
        other.success,
        "B's object after A's erasure: {}",
        other.all()
    );
    assert!(
        other.stdout.contains("\"device\":\"dev-b\""),
        "{}",
        other.all()
    );

    let log = std::fs::read_to_string(audit).expect("operator audit log");
    assert_eq!(log.matches("\"objects.open\"").count(), 6, "{log}");
    assert!(
        !log.contains(A) && !log.contains(B),
        "a subject in the audit log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_sink_seals_per_patient_and_erasure_makes_a_patients_objects_unreadable() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let keys = keys(tmp.path());
    let root = tmp.path().join("objects");
    let sink = ObjectStoreSink::local("objects", &root)
        .expect("local sink")
        .with_keyring(Arc::clone(&keys.keyring));
    deliver(&sink).await;

    let view = independent_view(&["dir", root.to_str().expect("utf-8")]);
    assert_eq!(view["subjects"], serde_json::json!([A, B]));
    // Both kinds for each group: A alone, B alone, A and B on the shared device.
    assert_eq!(view["objects"].as_object().expect("objects").len(), 8);

    let a = root.join(normalized_of(&view, A, A_DEVICE));
    let b = root.join(normalized_of(&view, B, "dev-b"));
    let audit = tmp.path().join("operator.jsonl");
    erase_and_check(
        &keys,
        &audit,
        &[a.to_str().expect("utf-8")],
        &[b.to_str().expect("utf-8")],
        &[],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_sink_seals_per_patient_and_erasure_makes_a_patients_objects_unreadable() {
    let moto = tokio::task::spawn_blocking(|| Moto::start(BUCKET, None))
        .await
        .expect("moto");
    let endpoint = format!("http://127.0.0.1:{}", moto.port);
    let tmp = tempfile::tempdir().expect("tempdir");
    let keys = keys(tmp.path());
    let sink = ObjectStoreSink::s3(
        "objects",
        S3Settings {
            bucket: BUCKET.into(),
            endpoint: Some(endpoint.clone()),
            region: "us-east-1".into(),
            access_key_id: "testing".into(),
            secret_access_key: "testing".into(),
            allow_http: true,
            prefix: "exports/v1".into(),
        },
    )
    .expect("s3 sink")
    .with_keyring(Arc::clone(&keys.keyring));
    deliver(&sink).await;

    let view = independent_view(&["s3", &endpoint, BUCKET]);
    assert_eq!(view["subjects"], serde_json::json!([A, B]));
    assert_eq!(view["objects"].as_object().expect("objects").len(), 8);
    let content_types = moto.boto3(&format!(
        "print(json.dumps(sorted({{s3.head_object(Bucket={BUCKET:?}, Key=o['Key'])['ContentType'] \
         for o in s3.list_objects_v2(Bucket={BUCKET:?})['Contents']}})))"
    ));
    assert_eq!(
        content_types.trim(),
        r#"["application/vnd.vitalmq.sealed"]"#
    );

    let a = format!("s3://{BUCKET}/{}", normalized_of(&view, A, A_DEVICE));
    let b = format!("s3://{BUCKET}/{}", normalized_of(&view, B, "dev-b"));
    let s3 = |url: &str| -> Vec<String> {
        ["--s3", url, "--endpoint", &endpoint, "--allow-http"]
            .map(String::from)
            .to_vec()
    };
    let (a, b) = (s3(&a), s3(&b));
    let audit = tmp.path().join("operator.jsonl");
    erase_and_check(
        &keys,
        &audit,
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        &b.iter().map(String::as_str).collect::<Vec<_>>(),
        &[
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
        ],
    );
}
