//! `vitalmq export`: one patient's data from an encrypted store, checked with
//! independent tools (`sha256sum -c`, python's json and hashlib, pycose for the device
//! signatures); nothing of another patient in it; owner-only files; audited (and the
//! operator log verifies); an erased patient refused; a patient without data gets empty
//! files; a store whose payloads are sealed needs the key file.
//!
//! The store is written through the bridge's store API (real signed, verified
//! messages), which is what the bridge itself commits; no processes but the CLI.
//! Needs `python3 -m pip install pycose 'cbor2<6'` (as tests/pycose_interop.rs).

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{Ran, run, temp_dir, vitalmq_ok};
use serde_json::{Value as Json, json};
use vitalmq_bridge::normalize::Receipt;
use vitalmq_bridge::plausible::Assessment;
use vitalmq_bridge::store::{Commit, NewAlert, RecordedEvent, Store};
use vitalmq_bridge::window::Accepted;
use vitalmq_envelope::{
    Algorithm, AnyKid, DeviceId, MessageType, Number, SigningKey, Telemetry, sign, verify,
};
use vitalmq_keyring::{Keyring, LocalKeyFile, Subject};
use vitalmq_policies::{DeviceEntry, SiteId};

/// A NEWS2 score of `patient` as the bridge stores it (sealed by the store).
fn score(id: &str, patient: &str, device: &str) -> vitalmq_bridge::NewScore {
    vitalmq_bridge::NewScore {
        score_id: id.into(),
        patient_ref: patient.into(),
        site: "site-01".into(),
        device: device.into(),
        model: "news2".into(),
        version: "rcp-2017.1".into(),
        config_sha256: "ab".repeat(32),
        role: "live".into(),
        observed_at_ms: 1_763_726_400_000,
        created_at_ms: 1_763_726_400_005,
        payload: json!({"format": "vitalmq-score/v1", "score_id": id, "patient_ref": patient,
            "aggregate": 6, "risk": "medium", "complete": false, "missing": ["consciousness"]})
        .to_string(),
    }
}

/// A would-be alert change of rule-set version `2025-07-01.1` running in shadow for
/// `patient` (sealed by the store).
fn shadow_alert(
    alert_id: &str,
    state: &str,
    patient: &str,
    device: &str,
) -> vitalmq_bridge::store::NewShadowAlert {
    vitalmq_bridge::store::NewShadowAlert {
        change_id: vitalmq_bridge::store::shadow_change_id(
            "2025-07-01.1",
            alert_id,
            state,
            &format!("ev1-{alert_id}-{state}"),
        ),
        alert_id: alert_id.into(),
        patient_ref: patient.into(),
        site: "site-01".into(),
        device: device.into(),
        model: "rules".into(),
        version: "2025-07-01.1".into(),
        config_sha256: "cd".repeat(32),
        role: "shadow".into(),
        rule: "spo2-low".into(),
        state: state.into(),
        severity: "urgent".into(),
        at_ms: 1_763_726_400_000,
        created_at_ms: 1_763_726_400_005,
        payload: json!({"alert_id": alert_id, "kind": "clinical", "state": state,
            "rule": "spo2-low", "rule_version": "2025-07-01.1", "patient_ref": patient,
            "device": device, "value": 87})
        .to_string(),
    }
}

const A: &str = "pt-aaaa1111";
const B: &str = "pt-bbbb2222";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_vitalmq"))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

struct Device {
    key: SigningKey,
    entry: DeviceEntry,
}

impl Device {
    fn new(id: &str, alg: Algorithm, patient: &str) -> Self {
        let key = SigningKey::generate(alg).expect("key");
        let entry = DeviceEntry {
            id: DeviceId::new(id).expect("id"),
            site: SiteId::new("site-01").expect("site"),
            patient_ref: patient.into(),
            key: key.verifying_key(),
            consent: Some("care".into()),
            processing_policy: None,
            lot: None,
            hardware_model: None,
            region: None,
        };
        Self { key, entry }
    }

    /// `--key` of the python check: `device=ALG:public hex`.
    fn key_arg(&self) -> String {
        format!(
            "{}={}:{}",
            self.entry.id.as_str(),
            self.key.algorithm().name(),
            self.entry.key.to_hex()
        )
    }

    fn event(&self, seq: u64) -> RecordedEvent {
        let telemetry = Telemetry {
            dev: self.entry.id.clone(),
            epoch: 1,
            seq,
            ts: 1_763_726_400_000 + seq * 5_000,
            fw: "5.12.1".into(),
            kind: MessageType::Vitals,
            m: Some(BTreeMap::from([
                ("spo2".to_owned(), Number::Int(90 + seq as i128)),
                ("pulse".to_owned(), Number::Int(70)),
            ])),
            q: None,
            model: None,
            schema: None,
            extra: BTreeMap::new(),
        };
        let bytes = sign(&telemetry, &self.key).expect("sign");
        let verified = verify(
            &bytes,
            &AnyKid(self.entry.key.clone()),
            Some(&self.entry.id),
        )
        .expect("verify");
        let topic = format!("devices/{}/telemetry", self.entry.id.as_str());
        let received = 1_763_726_400_100 + seq * 5_000;
        let receipt = Receipt {
            received_at_ms: received,
            topic: &topic,
            broker: "127.0.0.1:8883",
            publisher: "spiffe://demo.vitalmq/device/x",
            bridge: "spiffe://demo.vitalmq/bridge/bridge-01",
        };
        let assessment = Assessment::of(
            &verified,
            received,
            &Default::default(),
            &Default::default(),
        );
        RecordedEvent::new(
            &verified,
            Accepted::InOrder,
            &self.entry,
            &receipt,
            &assessment,
        )
    }
}

fn alert(id: &str, state: &str, patient: &str, device: &str, evidence: &[&str]) -> NewAlert {
    NewAlert {
        alert_id: id.into(),
        state: state.into(),
        kind: "clinical".into(),
        topic: format!("alerts/site-01/urgent/{device}"),
        device: Some(device.into()),
        rule: Some("spo2-low".into()),
        created_at_ms: 1_763_726_500_000,
        body: json!({"alert_id": id, "state": state, "rule": "spo2-low", "rule_version": "3",
            "policy_sha256": "ab12", "device": device, "patient_ref": patient,
            "severity": "urgent", "value": 88, "evidence": evidence})
        .to_string(),
        level: 0,
    }
}

/// A data directory with an encrypted store: A wears dev-a (EdDSA), B wears dev-b
/// (ES256); their events interleaved, an alert episode each.
struct Fixture {
    tmp: tempfile::TempDir,
    devices: [Device; 2],
    a_events: Vec<String>,
}

impl Fixture {
    fn new() -> Self {
        let tmp = temp_dir("vitalmq-export-");
        let devices = [
            Device::new("dev-a", Algorithm::EdDsa, A),
            Device::new("dev-b", Algorithm::Es256, B),
        ];
        let keyring = Arc::new(
            Keyring::open(
                &tmp.path().join("data/keyring.sqlite3"),
                Arc::new(LocalKeyFile::create(&tmp.path().join("kek.json")).expect("kek")),
            )
            .expect("keyring"),
        );
        let mut store = Store::open(&tmp.path().join("data"))
            .expect("store")
            .with_keyring(keyring);
        let events: Vec<RecordedEvent> = (0..3)
            .flat_map(|seq| [devices[0].event(seq), devices[1].event(seq)])
            .collect();
        let a_events: Vec<String> = events
            .iter()
            .filter(|e| e.patient_ref() == A)
            .map(|e| e.event_id().to_owned())
            .collect();
        let b_event = events[1].event_id().to_owned();
        let committed = store
            .commit(&Commit {
                events,
                alerts: vec![
                    alert(
                        "al-a1",
                        "open",
                        A,
                        "dev-a",
                        &[&a_events[1], "ev1-not-stored"],
                    ),
                    alert("al-b1", "open", B, "dev-b", &[&b_event]),
                    alert("al-a1", "closed", A, "dev-a", &[&a_events[2]]),
                ],
                scores: vec![score("sc-a1", A, "dev-a"), score("sc-b1", B, "dev-b")],
                shadow_alerts: vec![
                    shadow_alert("al-sa1", "open", A, "dev-a"),
                    shadow_alert("al-sb1", "open", B, "dev-b"),
                    shadow_alert("al-sa1", "resolved", A, "dev-a"),
                ],
                now_ms: 1_763_726_500_000,
                ..Commit::default()
            })
            .expect("commit");
        assert_eq!(committed, Default::default(), "nothing erased yet");
        Self {
            tmp,
            devices,
            a_events,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn export(&self, patient: &str, out: &str, key: bool) -> Ran {
        let mut cmd = Command::new(bin());
        cmd.env_remove("VITALMQ_OPERATOR_AUDIT").args([
            "export",
            "--patient",
            patient,
            "--data",
            s(&self.path("data")),
            "--out",
            s(&self.path(out)),
            "--purpose",
            "subject access request",
            "--by",
            "dpo@hospital",
        ]);
        if key {
            cmd.args(["--key-file", s(&self.path("kek.json"))]);
        }
        run(&mut cmd, Duration::from_secs(30))
    }

    fn audit_log(&self) -> PathBuf {
        self.path("data/operator-audit/operator.jsonl")
    }

    /// The operator log verifies under its key; its `patient.export` records.
    fn exports_audited(&self) -> Vec<Json> {
        let log = self.audit_log();
        let public = std::fs::read_to_string(log.with_file_name("audit-signing.key.pem.pub"))
            .expect("the signing key's public half is beside the log");
        let ran = vitalmq_ok(
            bin(),
            &["audit", "verify", s(&log), "--trusted-key", public.trim()],
        );
        assert!(ran.stdout.contains("chain intact"), "{}", ran.all());
        common::audit_records(&log)
            .into_iter()
            .filter(|r| r["action"] == "patient.export")
            .collect()
    }
}

fn lines(dir: &Path, name: &str) -> Vec<Json> {
    std::fs::read_to_string(dir.join(name))
        .expect("file")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{name}: {e}: {l}")))
        .collect()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

#[test]
fn one_patients_export_verifies_independently_and_is_audited() {
    let f = Fixture::new();
    let ran = f.export(A, "out-a", true);
    assert!(ran.success, "{}", ran.all());
    let report: Json = serde_json::from_str(&ran.stdout).expect("report");
    assert_eq!(
        (report["events"].as_u64(), report["alerts"].as_u64()),
        (Some(3), Some(2))
    );
    let out = f.path("out-a");

    // sha256sum -c, in the export directory.
    let check = run(
        Command::new("sha256sum")
            .args(["-c", "manifest.sha256"])
            .current_dir(&out),
        Duration::from_secs(10),
    );
    assert!(
        check.success && check.stdout.contains("manifest.json: OK"),
        "{}",
        check.all()
    );

    // python: every file as JSON lines, hashes against the manifest, raw bytes against
    // their hashes, every device signature with pycose.
    let mut py = Command::new("python3");
    py.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/export_check.py"))
        .arg(&out);
    for d in &f.devices {
        py.args(["--key", &d.key_arg()]);
    }
    let checked = run(&mut py, Duration::from_secs(60));
    assert!(
        !checked.stderr.contains("ModuleNotFoundError"),
        "pycose is not installed: run `python3 -m pip install pycose 'cbor2<6'`\n{}",
        checked.stderr
    );
    assert!(checked.success, "{}", checked.all());
    let summary: Json = serde_json::from_str(&checked.stdout).expect("summary");
    assert_eq!(summary["signatures_verified"], 3, "{summary}");

    // Owner-only.
    assert_eq!(mode(&out), 0o700);
    let manifest: Json =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).expect("manifest"))
            .expect("manifest JSON");
    for name in [
        "events.jsonl",
        "raw.jsonl",
        "alerts.jsonl",
        "provenance.jsonl",
        "scores.jsonl",
        "shadow_alerts.jsonl",
        "manifest.json",
        "manifest.sha256",
    ] {
        assert_eq!(mode(&out.join(name)), 0o600, "{name}");
        // Nothing of the other patient, their device or their alert.
        let text = std::fs::read_to_string(out.join(name)).expect("read");
        for other in [B, "dev-b", "al-b1", "al-sb1"] {
            assert!(!text.contains(other), "{name} mentions {other}");
        }
    }
    assert_eq!(manifest["format"], "vitalmq-export/v1");
    assert_eq!(manifest["patient_ref"], A);
    assert_eq!(manifest["requested_by"], "dpo@hospital");
    assert_eq!(manifest["purpose"], "subject access request");
    assert_eq!(manifest["source"]["schema_version"], 6);
    assert_eq!(manifest["source"]["encrypted"], true);
    assert_eq!(
        manifest["counts"],
        json!({"events": 3, "alerts": 2, "scores": 1, "shadow_alerts": 2})
    );
    // The patient's shadow alert changes (never delivered), opened, in order.
    let shadow = lines(&out, "shadow_alerts.jsonl");
    let changes: Vec<(&str, &str, &str)> = shadow
        .iter()
        .map(|a| {
            (
                a["alert_id"].as_str().expect("id"),
                a["state"].as_str().expect("state"),
                a["version"].as_str().expect("version"),
            )
        })
        .collect();
    assert_eq!(
        changes,
        [
            ("al-sa1", "open", "2025-07-01.1"),
            ("al-sa1", "resolved", "2025-07-01.1")
        ]
    );
    assert_eq!(shadow[0]["role"], "shadow");
    assert_eq!(shadow[0]["alert"]["value"], 87);
    // The patient's score, opened; not the other patient's.
    let scores = lines(&out, "scores.jsonl");
    assert_eq!(scores.len(), 1, "{scores:?}");
    assert_eq!(scores[0]["score_id"], "sc-a1");
    assert_eq!(scores[0]["score"]["aggregate"], 6);
    assert_eq!(scores[0]["score"]["missing"], json!(["consciousness"]));

    // The events in order, as stored; provenance per event and per alert change.
    let events = lines(&out, "events.jsonl");
    let ids: Vec<&str> = events
        .iter()
        .map(|e| e["event_id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, f.a_events);
    assert!(
        events
            .iter()
            .all(|e| e["patient_ref"] == A && e["m"]["spo2"].is_number())
    );
    let alerts = lines(&out, "alerts.jsonl");
    let changes: Vec<(&str, &str)> = alerts
        .iter()
        .map(|a| {
            (
                a["alert_id"].as_str().expect("id"),
                a["state"].as_str().expect("state"),
            )
        })
        .collect();
    assert_eq!(changes, [("al-a1", "open"), ("al-a1", "closed")]);
    assert_eq!(alerts[0]["body"]["value"], 88);
    let provenance = lines(&out, "provenance.jsonl");
    assert_eq!(provenance.len(), 5);
    assert_eq!(provenance[0]["kind"], "event");
    assert_eq!(provenance[0]["verdict"], "in_order");
    assert_eq!(provenance[0]["provenance"]["alg"], "EdDSA");
    assert_eq!(provenance[3]["kind"], "alert");
    assert_eq!(
        provenance[3]["evidence"],
        json!([f.a_events[1], "ev1-not-stored"])
    );
    assert_eq!(
        provenance[3]["evidence_not_exported"],
        json!(["ev1-not-stored"])
    );

    // Audited with the manifest's hash and counts, never the data.
    let audited = f.exports_audited();
    let done = audited.last().expect("an export record");
    assert_eq!(done["reason"], "succeeded");
    assert_eq!(done["resource"], A);
    assert_eq!(
        done["details"]["manifest_sha256"],
        report["manifest_sha256"]
    );
    assert_eq!(done["details"]["events"], 3);
    assert_eq!(done["details"]["requested_by"], "dpo@hospital");
    let log = std::fs::read_to_string(f.audit_log()).expect("log");
    let raw0 = lines(&out, "raw.jsonl")[0]["cose_sign1_base64"].clone();
    assert!(!log.contains(raw0.as_str().expect("b64")) && !log.contains("spo2"));

    // An existing, non-empty directory is never written into.
    let again = f.export(A, "out-a", true);
    assert!(
        !again.success && again.stderr.contains("not empty"),
        "{}",
        again.all()
    );
}

#[test]
fn without_data_empty_files_without_the_key_nothing_and_an_erased_patient_is_refused() {
    let f = Fixture::new();
    // Not a pseudonym (it might be a name, `PrincipalId` would take it): refused
    // before anything is read or recorded.
    for name in ["pt-Jane.Doe", "Jane.Doe", "pt-x"] {
        let ran = f.export(name, "out-name", true);
        assert!(!ran.success, "{name}: {}", ran.all());
        assert!(
            ran.all().contains("not a patient pseudonym"),
            "{}",
            ran.all()
        );
        assert!(!f.path("out-name").exists());
        let log = std::fs::read_to_string(f.audit_log()).unwrap_or_default();
        assert!(!log.contains(name), "{name} recorded: {log}");
    }
    // A patient without data: an export of empty files, not an error.
    let ran = f.export("pt-nobody-01", "out-none", true);
    assert!(ran.success, "{}", ran.all());
    let out = f.path("out-none");
    for name in [
        "events.jsonl",
        "raw.jsonl",
        "alerts.jsonl",
        "provenance.jsonl",
        "scores.jsonl",
        "shadow_alerts.jsonl",
    ] {
        assert_eq!(
            std::fs::read(out.join(name)).expect("file").len(),
            0,
            "{name}"
        );
    }
    let check = run(
        Command::new("sha256sum")
            .args(["-c", "manifest.sha256"])
            .current_dir(&out),
        Duration::from_secs(10),
    );
    assert!(check.success, "{}", check.all());

    // Sealed payloads without the key file: an error, and nothing left behind.
    let locked = f.export(A, "out-locked", false);
    assert!(
        !locked.success && locked.stderr.contains("--key-file"),
        "{}",
        locked.all()
    );
    assert!(!f.path("out-locked").exists());

    // Not a pseudonym (it could be a name): rejected and not recorded.
    let name = f.export("Jane Doe", "out-name", true);
    assert!(!name.success, "{}", name.all());
    assert!(
        !std::fs::read_to_string(f.audit_log())
            .expect("log")
            .contains("Jane")
    );

    // A erased: refused (exit 1), audited as such, no directory; B still exports.
    let keyring = Keyring::open(
        &f.path("data/keyring.sqlite3"),
        Arc::new(LocalKeyFile::load(&f.path("kek.json")).expect("kek")),
    )
    .expect("keyring");
    keyring
        .erase(
            &Subject::new(A).expect("subject"),
            "test",
            "erasure request",
            1_763_800_000_000,
        )
        .expect("erase");
    for key in [true, false] {
        let refused = f.export(A, "out-erased", key);
        assert_eq!(refused.code, Some(1), "{}", refused.all());
        assert!(
            refused.stderr.contains("refused: the patient was erased"),
            "{}",
            refused.all()
        );
        assert!(!f.path("out-erased").exists());
    }
    let audited = f.exports_audited();
    let last = audited.last().expect("records");
    assert_eq!(last["reason"], "failed");
    assert_eq!(last["resource"], A);
    assert!(
        last["details"]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("refused: the patient was erased")),
        "{last}"
    );
    let b = f.export(B, "out-b", true);
    assert!(b.success, "{}", b.all());
    assert_eq!(lines(&f.path("out-b"), "raw.jsonl").len(), 3);
}
