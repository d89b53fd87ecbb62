//! The retention job end to end (issue 20): a store and objects of several ages made on
//! a controlled clock, `vitalmq retention run --now ...`, then read back: what is past
//! its class is gone or anonymized, what a hold covers is kept, the operator audit
//! record says what was done and verifies; and a run killed after its first
//! transaction, rerun, ends where an uninterrupted run ends.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{run, temp_dir, vitalmq_ok};
use serde_json::Value;
use vitalmq_bridge::normalize::Receipt;
use vitalmq_bridge::plausible::Assessment;
use vitalmq_bridge::sink::object::ObjectStoreSink;
use vitalmq_bridge::store::{Commit, EventRow, RecordedEvent, Store};
use vitalmq_bridge::window::Accepted;
use vitalmq_envelope::{Algorithm, AnyKid, DeviceId, MessageType, Number, SigningKey, Telemetry};
use vitalmq_policies::{DeviceEntry, SiteId};

const DAY: u64 = 86_400_000;
/// 2026-03-01T00:00:00Z.
const NOW: u64 = 1_772_323_200_000;
const NOW_TEXT: &str = "2026-03-01T00:00:00Z";
const HELD_PATIENT: &str = "pt-0123456789abcdef0123456789abcdef";
const EVENTS_PER_DEVICE: u64 = 20;

fn bin() -> &'static Path {
    vitalmq_bin!()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

const POLICY: &str = r#"
format = "vitalmq-retention/v1"
[planes.raw]
keep_for = "30days"
action = "delete"
[planes.normalized]
keep_for = "60days"
action = "anonymize"
[planes.clinical]
keep_for = "1year"
action = "delete"
[planes.quarantine]
keep_for = "30days"
action = "delete"
[planes."audit:broker"]
keep_for = "1year"
action = "delete"
[planes."audit:bridge"]
keep_for = "1year"
action = "delete"
[planes."audit:admin"]
keep_for = "1year"
action = "delete"
[planes."audit:operator"]
keep_for = "1year"
action = "delete"
"#;

/// A hold on the patient of dev-00002's readings, on that device.
fn holds() -> String {
    format!(
        "format = \"vitalmq-holds/v1\"\n[[holds]]\nid = \"lh-1\"\nreason = \"claim\"\n\
         placed_by = \"po-1\"\nplaced_at = \"2026-01-01T00:00:00Z\"\n\
         patient_ref = \"{HELD_PATIENT}\"\ndevice = \"dev-00002\"\n"
    )
}

/// One signed, verified and recorded reading of `device` at `at` (device clock and
/// reception alike).
fn reading(device: &str, patient: &str, key: &SigningKey, seq: u64, at: u64) -> RecordedEvent {
    let entry = DeviceEntry {
        id: DeviceId::new(device).expect("device id"),
        site: SiteId::new("site-01").expect("site"),
        patient_ref: patient.into(),
        key: key.verifying_key(),
        consent: None,
        processing_policy: None,
        lot: None,
        hardware_model: None,
        region: None,
    };
    let telemetry = Telemetry {
        dev: entry.id.clone(),
        epoch: 1,
        seq,
        ts: at,
        fw: "1.0.0".into(),
        kind: MessageType::Vitals,
        m: Some([("spo2".to_owned(), Number::Int(97))].into()),
        q: None,
        model: None,
        schema: None,
        extra: Default::default(),
    };
    let message = vitalmq_envelope::sign(&telemetry, key).expect("sign");
    let verified = vitalmq_envelope::verify(&message, &AnyKid(entry.key.clone()), Some(&entry.id))
        .expect("verify");
    let topic = format!("devices/{device}/telemetry");
    let receipt = Receipt {
        received_at_ms: at,
        topic: &topic,
        broker: "127.0.0.1:1",
        publisher: "spiffe://demo.vitalmq/device/x",
        bridge: "spiffe://demo.vitalmq/bridge/bridge-01",
    };
    let assessment = Assessment::of(&verified, at, &Default::default(), &Default::default());
    let accepted = if seq == 0 {
        Accepted::FirstSeen
    } else {
        Accepted::InOrder
    };
    RecordedEvent::new(&verified, accepted, &entry, &receipt, &assessment)
}

fn date(ms: u64) -> String {
    let t =
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).expect("time");
    format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
}

/// The object names made in `objects` (relative), in order.
const OBJECT_AGES: [(&str, u64); 4] = [
    ("dev-00001", 100),
    ("dev-00001", 5),
    ("dev-00002", 100),
    ("dev-00002", 5),
];

/// A bridge configuration with `[lifecycle]`, a store with 20 readings per device, one
/// a week back from now, every one confirmed by the objects sink, and objects of two
/// ages per device. Returns the configuration file.
fn setup(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(dir).expect("dir");
    std::fs::write(dir.join("retention.toml"), POLICY).expect("policy");
    std::fs::write(dir.join("holds.toml"), holds()).expect("holds");
    let config = dir.join("bridge.toml");
    std::fs::write(
        &config,
        "id = \"bridge-01\"\ndata_dir = \"data\"\nregistry = \"registry.toml\"\n\
         [broker]\naddress = \"127.0.0.1:1\"\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n\
         [[sinks]]\nkind = \"objects\"\nname = \"objects\"\npath = \"objects\"\n\
         [lifecycle]\nretention = \"retention.toml\"\nholds = \"holds.toml\"\nbatch = 5\n",
    )
    .expect("config");
    let mut store = Store::open(&data).expect("store");
    let key = SigningKey::generate(Algorithm::EdDsa).expect("key");
    let mut events = Vec::new();
    for seq in 0..EVENTS_PER_DEVICE {
        let at = NOW - seq * 7 * DAY;
        events.push(reading(
            "dev-00001",
            "pt-ffffffffffffffffffffffffffffffff",
            &key,
            seq,
            at,
        ));
        events.push(reading("dev-00002", HELD_PATIENT, &key, seq, at));
    }
    store
        .commit(&Commit {
            events,
            now_ms: NOW,
            ..Commit::default()
        })
        .expect("commit");
    store.register_sink("objects").expect("sink");
    let head = store.head().expect("head");
    store.batch_delivered("objects", head).expect("confirmed");
    drop(store);
    let sink = ObjectStoreSink::local("objects", &dir.join("objects")).expect("sink");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        for (device, age) in OBJECT_AGES {
            for kind in ["raw", "normalized"] {
                let name = format!(
                    "{kind}/site=site-01/device={device}/date={}/00000000000000000001-00000000000000000002.x",
                    date(NOW - age * DAY)
                );
                sink.put_durable(&name, bytes::Bytes::from_static(b"x"))
                    .await
                    .expect("put");
            }
        }
    });
    config
}

fn events(dir: &Path) -> Vec<EventRow> {
    Store::open(&dir.join("data"))
        .expect("store")
        .list_events()
        .expect("events")
}

fn objects(dir: &Path) -> Vec<String> {
    let root = dir.join("objects");
    let mut names: Vec<String> = walk(&root)
        .into_iter()
        .map(|p| p.strip_prefix(&root).expect("under").display().to_string())
        .collect();
    names.sort();
    names
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn retention(config: &Path, extra: &[&str]) -> common::Ran {
    let mut args = vec!["retention", "run", "--config", s(config), "--now", NOW_TEXT];
    args.extend_from_slice(extra);
    vitalmq_ok(bin(), &args)
}

#[test]
fn retention_run_acts_on_what_is_due_keeps_what_is_held_and_is_audited() {
    let dir = temp_dir("retention");
    let config = setup(dir.path());
    let before = events(dir.path());

    // A dry run reports and changes nothing.
    let dry: Value =
        serde_json::from_str(retention(&config, &["--dry-run"]).stdout.trim()).expect("json");
    assert_eq!(dry["dry_run"], true);
    assert_eq!(events(dir.path()), before);

    let ran = retention(&config, &[]);
    let report: Value = serde_json::from_str(ran.stdout.trim()).expect("json");
    // dev-00001: readings 0..20 weeks old. Over 60 days (9 weeks and more: 11) are
    // anonymized; 30..60 days (5..8 weeks: 4) lose their raw bytes.
    assert_eq!(
        report["acted"]["normalized"]["anonymize"]["count"], 11,
        "{report}"
    );
    // Raw: those 4 rows, and the 100-day-old raw object of dev-00001.
    assert_eq!(report["acted"]["raw"]["delete"]["count"], 4 + 1, "{report}");
    assert_eq!(report["holds_kept"], serde_json::json!(["lh-1"]));
    assert_eq!(report["dry_run"], false);
    let mut report_wo_dry = report.clone();
    report_wo_dry["dry_run"] = Value::Bool(true);
    assert_eq!(dry, report_wo_dry, "the dry run predicted the run");

    let after = events(dir.path());
    assert_eq!(after.len(), before.len(), "anonymized, not deleted");
    let anonymized: Vec<_> = after
        .iter()
        .filter(|e| e.head.event_id.as_str().starts_with("anon-"))
        .collect();
    assert_eq!(anonymized.len(), 11);
    assert!(
        anonymized
            .iter()
            .all(|e| e.head.device.as_str() == "anonymized")
    );
    // Their raw rows keep no hash of the message (a lookup key back to the device).
    assert!(anonymized.iter().all(|e| e.raw_sha256.is_empty()));
    // The held patient's device keeps every reading as it was.
    let held = |rows: &[EventRow]| -> Vec<EventRow> {
        rows.iter()
            .filter(|e| e.head.device.as_str() == "dev-00002")
            .cloned()
            .collect()
    };
    assert_eq!(held(&after), held(&before));
    assert_eq!(held(&after).len(), EVENTS_PER_DEVICE as usize);
    // An anonymized reading keeps its measurement and names nobody.
    let store = Store::open(&dir.path().join("data")).expect("store");
    let young = before
        .iter()
        .find(|e| e.head.device.as_str() == "dev-00001" && e.head.seq == 6)
        .expect("6 weeks old");
    let detail = store
        .event_detail(young.head.event_id.as_str())
        .expect("read")
        .expect("still there");
    assert_eq!(detail.raw.bytes, 0, "raw bytes purged after 30 days");
    assert!(
        detail.normalized.get("patient_ref").is_some(),
        "not anonymized before 60 days"
    );

    // Objects: dev-00001's 100-day-old raw object is deleted; its normalized one would
    // be anonymized, which objects do not support (reported); dev-00002's are held.
    let left = objects(dir.path());
    assert_eq!(left.len(), 7, "{left:?}");
    assert!(
        !left
            .iter()
            .any(|n| n.starts_with("raw/site=site-01/device=dev-00001/date=2025")),
        "{left:?}"
    );
    assert_eq!(
        report["skipped"]["normalized"]["anonymize_unsupported"], 1,
        "{report}"
    );
    assert_eq!(report["objects"]["count"], 1);
    assert_eq!(report["held"]["raw"], 2, "the held device's old objects");

    // The operator log holds the run and verifies under its key.
    let log = dir.path().join("data/operator-audit/operator.jsonl");
    let public = std::fs::read_to_string(log.with_file_name("audit-signing.key.pem.pub"))
        .expect("public key");
    let verified = vitalmq_ok(
        bin(),
        &["audit", "verify", s(&log), "--trusted-key", public.trim()],
    );
    assert!(
        verified.stdout.contains("chain intact"),
        "{}",
        verified.all()
    );
    let text = std::fs::read_to_string(&log).expect("log");
    let done: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("record"))
        .filter(|r| r["action"] == "retention.run" && r["reason"] == "succeeded")
        .collect();
    assert_eq!(done.len(), 2, "dry run and run");
    assert_eq!(done[1]["details"]["acted"], report["acted"]);
    assert!(
        !text.contains(HELD_PATIENT),
        "no patient values in the audit log"
    );

    // A rerun at the same instant has nothing left to do.
    let again: Value = serde_json::from_str(retention(&config, &[]).stdout.trim()).expect("json");
    assert_eq!(again["acted"], serde_json::json!({}), "{again}");
}

#[test]
fn a_run_killed_after_its_first_transaction_is_finished_by_the_next() {
    let dir = temp_dir("retention-kill");
    let whole = dir.path().join("whole");
    let killed = dir.path().join("killed");
    let config = setup(&whole);
    retention(&config, &[]);

    let config = setup(&killed);
    let ran = run(
        Command::new(bin())
            .args([
                "retention",
                "run",
                "--config",
                s(&config),
                "--now",
                NOW_TEXT,
            ])
            .env("VITALMQ_TEST_RETENTION_ABORT_AFTER_BATCHES", "1"),
        Duration::from_secs(30),
    );
    assert!(!ran.success, "the hook stops the run: {}", ran.all());
    // Each setup signs with a key of its own: compare rows without the raw hashes.
    let rows = |dir: &Path| {
        let mut rows = events(dir);
        rows.iter_mut().for_each(|e| e.raw_sha256.clear());
        rows
    };
    assert_ne!(
        rows(&killed),
        rows(&whole),
        "the kill left the run unfinished"
    );
    retention(&config, &[]);

    // The same rows in both stores (positions, and the anonymized ids derived from
    // them), and the same objects.
    assert_eq!(rows(&killed), rows(&whole));
    assert_eq!(objects(&killed), objects(&whole));
}

#[test]
fn a_now_more_than_a_day_ahead_is_refused_unless_allowed() {
    let dir = temp_dir("retention-future");
    let config = setup(dir.path());
    let before = events(dir.path());
    let future = "2999-03-01T00:00:00Z";
    let args = ["retention", "run", "--config", s(&config), "--now", future];
    let refused = run(Command::new(bin()).args(args), Duration::from_secs(30));
    assert!(!refused.success, "{}", refused.all());
    assert!(
        refused.stderr.contains("--allow-future-now"),
        "{}",
        refused.all()
    );
    assert_eq!(events(dir.path()), before, "nothing done");
    let log = std::fs::read_to_string(dir.path().join("data/operator-audit/operator.jsonl"))
        .expect("log");
    assert!(
        log.lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("record"))
            .any(|r| r["action"] == "retention.run"
                && r["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("failed"))),
        "the refusal is audited: {log}"
    );

    let ran = vitalmq_ok(
        bin(),
        &[&args[..], &["--allow-future-now", "--dry-run"]].concat(),
    );
    let report: Value = serde_json::from_str(ran.stdout.trim()).expect("json");
    assert_eq!(report["now"], future, "{report}");
}
