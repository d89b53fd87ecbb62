//! The operator audit log (issue 7): `vitalmq certs ...`, `vitalmq store <records>` and
//! `vitalmq trace` record who did what and how it ended, in a log that `vitalmq audit
//! verify` accepts under its signing key; an action whose record cannot be written does
//! not run.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Ran, run, temp_dir, vitalmq_ok};
use serde_json::Value;
use vitalmq_bridge::store::{Commit, RecordedEvent, Store};
use vitalmq_envelope::DeviceId;

const TIMEOUT: Duration = Duration::from_secs(60);

fn bin() -> &'static Path {
    vitalmq_bin!()
}

fn vitalmq(args: &[&str]) -> Ran {
    run(Command::new(bin()).args(args), TIMEOUT)
}

fn vitalmq_env(args: &[&str], env: (&str, &Path)) -> Ran {
    run(Command::new(bin()).args(args).env(env.0, env.1), TIMEOUT)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// `vitalmq audit verify LOG --trusted-key <the .pub beside it>` must pass; returns the
/// log's records.
fn verified_records(log: &Path) -> Vec<Value> {
    let public = std::fs::read_to_string(log.with_file_name("audit-signing.key.pem.pub"))
        .expect("the signing key's public half is beside the log");
    let ran = vitalmq_ok(
        bin(),
        &["audit", "verify", s(log), "--trusted-key", public.trim()],
    );
    assert!(
        ran.stdout.contains("chain intact") && ran.stdout.contains("trusted key"),
        "{}",
        ran.all()
    );
    std::fs::read_to_string(log)
        .expect("log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("record"))
        .collect()
}

/// The operator records of `action` (checkpoints and other actions left out).
fn actions<'a>(records: &'a [Value], action: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| r["event"] == "operator_action" && r["action"] == action)
        .collect()
}

fn current_uid() -> u64 {
    // The test process runs as the same user as the CLI it starts.
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .expect("real uid")
}

fn init_pki(dir: &Path) -> PathBuf {
    let pki = dir.join("pki");
    vitalmq_ok(
        bin(),
        &["certs", "init", "--dir", s(&pki), "--devices", "3"],
    );
    pki
}

fn index_entry(pki: &Path, id: &str) -> Value {
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(pki.join("ca/index.json")).expect("index"))
            .expect("index json");
    index["certs"]
        .as_array()
        .expect("certs")
        .iter()
        .find(|c| c["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("{id} not in the index"))
}

#[test]
fn a_revocation_is_in_the_verified_operator_log_with_its_serial() {
    let dir = temp_dir("opaudit-revoke");
    let pki = init_pki(dir.path());
    let ran = vitalmq_ok(
        bin(),
        &[
            "certs",
            "revoke",
            "--dir",
            s(&pki),
            "--role",
            "device",
            "--id",
            "dev-00002",
            "--reason",
            "key-compromise",
        ],
    );
    let serial = index_entry(&pki, "dev-00002")["serial"]
        .as_str()
        .expect("serial")
        .to_owned();
    assert!(ran.stdout.contains(&serial), "{}", ran.all());

    let records = verified_records(&pki.join("audit/operator.jsonl"));
    let revoke = actions(&records, "certs.revoke");
    assert_eq!(revoke.len(), 2, "started and succeeded: {revoke:?}");
    let (started, done) = (revoke[0], revoke[1]);
    assert_eq!(started["reason"], "started");
    assert_eq!(done["reason"], "succeeded");
    assert!(
        started["seq"].as_u64() < done["seq"].as_u64(),
        "the intent is recorded before the outcome"
    );
    for r in [started, done] {
        assert_eq!(r["component"], "cli");
        assert_eq!(r["resource"], "device/dev-00002");
        assert_eq!(r["details"]["uid"], current_uid());
        assert!(r["details"]["user"].as_str().is_some_and(|u| !u.is_empty()));
        assert!(r["details"]["host"].as_str().is_some_and(|h| !h.is_empty()));
        assert_eq!(
            r["details"]["dir"],
            std::path::absolute(&pki)
                .expect("abs")
                .display()
                .to_string()
        );
    }
    assert_eq!(done["details"]["serial"], serial.as_str());
    assert_eq!(done["details"]["reason"], "key-compromise");
    assert_eq!(
        done["details"]["identity"],
        "spiffe://demo.vitalmq/device/dev-00002"
    );
    assert_eq!(done["details"]["crl_number"], 2);
    // The init that made the PKI is in the same log, before the revocation.
    assert_eq!(actions(&records, "certs.init").len(), 2);
}

#[test]
fn a_failed_action_is_recorded_with_its_error() {
    let dir = temp_dir("opaudit-failed");
    let pki = init_pki(dir.path());
    let ran = vitalmq(&[
        "certs",
        "revoke",
        "--dir",
        s(&pki),
        "--role",
        "device",
        "--id",
        "dev-99999",
    ]);
    assert!(!ran.success, "revoking an unknown identity must fail");
    let records = verified_records(&pki.join("audit/operator.jsonl"));
    let revoke = actions(&records, "certs.revoke");
    assert_eq!(revoke.len(), 2, "{revoke:?}");
    assert_eq!(revoke[1]["reason"], "failed");
    let error = revoke[1]["details"]["error"].as_str().expect("error text");
    assert!(error.contains("dev-99999"), "{error}");
}

/// A bridge data directory with a store holding one event (signed, verified and
/// recorded as the bridge does).
fn store_with_one_event(dir: &Path) -> (PathBuf, String) {
    use vitalmq_bridge::normalize::Receipt;
    use vitalmq_bridge::plausible::Assessment;
    use vitalmq_bridge::window::Accepted;
    use vitalmq_envelope::{Algorithm, AnyKid, MessageType, Number, SigningKey, Telemetry};
    use vitalmq_policies::{DeviceEntry, SiteId};

    let data = dir.join("data");
    let mut store = Store::open(&data).expect("store");
    let key = SigningKey::generate(Algorithm::EdDsa).expect("key");
    let entry = DeviceEntry {
        id: DeviceId::new("dev-00001").expect("device id"),
        site: SiteId::new("site-01").expect("site"),
        patient_ref: "pt-operator-audit".into(),
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
        seq: 0,
        ts: 1_700_000_000_000,
        fw: "1.0.0".into(),
        kind: MessageType::Vitals,
        m: Some([("spo2".to_owned(), Number::Int(97))].into()),
        q: None,
        model: None,
        schema: None,
        extra: Default::default(),
    };
    let message = vitalmq_envelope::sign(&telemetry, &key).expect("sign");
    let verified = vitalmq_envelope::verify(&message, &AnyKid(entry.key.clone()), Some(&entry.id))
        .expect("verify");
    let receipt = Receipt {
        received_at_ms: 1_700_000_000_100,
        topic: "devices/dev-00001/telemetry",
        broker: "127.0.0.1:1",
        publisher: "spiffe://demo.vitalmq/device/dev-00001",
        bridge: "spiffe://demo.vitalmq/bridge/bridge-01",
    };
    let assessment = Assessment::of(
        &verified,
        receipt.received_at_ms,
        &Default::default(),
        &Default::default(),
    );
    let event = RecordedEvent::new(
        &verified,
        Accepted::FirstSeen,
        &entry,
        &receipt,
        &assessment,
    );
    let event_id = event.event_id().to_owned();
    store
        .commit(&Commit {
            events: vec![event],
            now_ms: 1_700_000_000_100,
            ..Commit::default()
        })
        .expect("commit");
    (data, event_id)
}

#[test]
fn store_reads_and_traces_leave_records_without_patient_values() {
    let dir = temp_dir("opaudit-read");
    let (data, event_id) = store_with_one_event(dir.path());
    let ran = vitalmq_ok(bin(), &["store", "events", "--data", s(&data)]);
    assert!(ran.stdout.contains(&event_id), "{}", ran.all());
    vitalmq_ok(bin(), &["trace", &event_id, "--data", s(&data), "--json"]);
    // Totals are not patient-linked: not audited.
    vitalmq_ok(bin(), &["store", "stats", "--data", s(&data)]);

    let log = data.join("operator-audit/operator.jsonl");
    let text = std::fs::read_to_string(&log).expect("operator log");
    let records = verified_records(&log);
    let events = actions(&records, "store.events");
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[1]["reason"], "succeeded");
    assert_eq!(events[1]["details"]["rows"], 1);
    assert_eq!(
        events[1]["details"]["data_dir"],
        std::path::absolute(&data)
            .expect("abs")
            .display()
            .to_string()
    );
    let trace = actions(&records, "trace");
    assert_eq!(trace.len(), 2, "{trace:?}");
    assert_eq!(trace[1]["resource"], event_id.as_str());
    assert_eq!(trace[1]["details"]["found"], true);
    assert!(actions(&records, "store.stats").is_empty());
    assert!(
        !text.contains("spo2"),
        "no patient values in the operator log"
    );
}

#[test]
fn concurrent_reads_keep_one_chain() {
    let dir = temp_dir("opaudit-concurrent");
    let (data, _) = store_with_one_event(dir.path());
    let children: Vec<_> = (0..6)
        .map(|_| {
            Command::new(bin())
                .args(["store", "gaps", "--data", s(&data)])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn")
        })
        .collect();
    for mut child in children {
        assert!(child.wait().expect("wait").success());
    }
    let records = verified_records(&data.join("operator-audit/operator.jsonl"));
    assert_eq!(actions(&records, "store.gaps").len(), 12);
}

#[test]
fn an_unwritable_operator_log_refuses_the_action() {
    let dir = temp_dir("opaudit-unwritable");
    let pki = init_pki(dir.path());
    // A file where the log's directory should be: unwritable even for root.
    std::fs::remove_dir_all(pki.join("audit")).expect("rm audit dir");
    std::fs::write(pki.join("audit"), "not a directory").expect("block");
    let crl_before = std::fs::read(pki.join("crl.pem")).expect("crl");
    let ran = vitalmq(&[
        "certs",
        "revoke",
        "--dir",
        s(&pki),
        "--role",
        "device",
        "--id",
        "dev-00001",
    ]);
    assert!(!ran.success, "the revocation must not run unaudited");
    assert!(
        ran.stderr.contains("operator audit log cannot be written")
            && ran.stderr.contains("certs.revoke"),
        "{}",
        ran.all()
    );
    assert!(index_entry(&pki, "dev-00001")["revoked_at"].is_null());
    assert_eq!(std::fs::read(pki.join("crl.pem")).expect("crl"), crl_before);

    // A store read: refused before any row is printed.
    let (data, _) = store_with_one_event(dir.path());
    std::fs::write(data.join("operator-audit"), "not a directory").expect("block");
    let ran = vitalmq(&["store", "events", "--data", s(&data)]);
    assert!(!ran.success);
    assert!(
        ran.stdout.is_empty(),
        "rows printed unaudited: {}",
        ran.stdout
    );
    assert!(ran.stderr.contains("store.events"), "{}", ran.all());
    let ran = vitalmq(&["trace", "ev1-operator-audit-test", "--data", s(&data)]);
    assert!(!ran.success && ran.stdout.is_empty(), "{}", ran.all());

    // VITALMQ_OPERATOR_AUDIT moves the log; then the read runs and is recorded there.
    let elsewhere = dir.path().join("ops/operator.jsonl");
    let ran = vitalmq_env(
        &["store", "events", "--data", s(&data)],
        ("VITALMQ_OPERATOR_AUDIT", &elsewhere),
    );
    assert!(ran.success, "{}", ran.all());
    assert_eq!(
        actions(&verified_records(&elsewhere), "store.events").len(),
        2
    );
}

#[test]
fn a_mistyped_directory_gets_no_audit_log_created_in_it() {
    let dir = temp_dir("opaudit-typo");
    let missing = dir.path().join("no-such-pki");
    let ran = vitalmq(&["certs", "revoke", "--dir", s(&missing), "--serial", "0A"]);
    assert!(
        !ran.success && ran.stderr.contains("no PKI here"),
        "{}",
        ran.all()
    );
    assert!(!missing.exists(), "a directory tree was created for a typo");

    let foreign = dir.path().join("someone-elses");
    std::fs::create_dir(&foreign).expect("mkdir");
    std::fs::write(foreign.join("notes.txt"), "x").expect("write");
    let ran = vitalmq(&["certs", "init", "--dir", s(&foreign)]);
    assert!(
        !ran.success && ran.stderr.contains("not empty"),
        "{}",
        ran.all()
    );
    assert!(!foreign.join("audit").exists());

    let no_store = dir.path().join("no-store");
    let ran = vitalmq(&["store", "alerts", "--data", s(&no_store)]);
    assert!(
        !ran.success && ran.stderr.contains("no bridge store"),
        "{}",
        ran.all()
    );
    assert!(!no_store.exists());
}
