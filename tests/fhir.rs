//! `vitalmq fhir export|verify` (issue 22): a store written through the bridge's store
//! API (real signed, verified messages, encrypted at rest) exported as FHIR R4 and
//! checked by independent tools: every resource and the Bundle (and the NDJSON) parse
//! with the `fhir.resources` R4B models and the vital-signs profile rules
//! (tests/py/fhir_validate.py), every device signature re-verified by pycose from the
//! exported Provenance with the registry's keys (tests/py/fhir_pycose.py); then our
//! own `fhir verify` accepts it offline and refuses a changed value, a changed
//! signature and an unsigned Observation. Every metric, the BP panel with a missing
//! half, every clinical alert state (open, escalated, acknowledged, resolved), a device
//! alarm and a silence alert are in it; nothing of another patient; audited.
//! Needs `python3 -m pip install pycose 'cbor2<6' 'fhir.resources==8.*'`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{Ran, run, temp_dir};
use serde_json::{Value as Json, json};
use vitalmq_bridge::normalize::Receipt;
use vitalmq_bridge::plausible::Assessment;
use vitalmq_bridge::store::{Commit, NewAlert, RecordedEvent, Store};
use vitalmq_bridge::window::Accepted;
use vitalmq_envelope::{
    Algorithm, AnyKid, DeviceId, MessageType, Number, SigningKey, Telemetry, sign, verify,
};
use vitalmq_keyring::{Keyring, LocalKeyFile};
use vitalmq_policies::{DeviceEntry, SiteId};

const A: &str = "pt-aaaa1111";
const B: &str = "pt-bbbb2222";
/// Wore dev-b before B.
const C: &str = "pt-cccc3333";
/// When dev-b passed from C to B (T0 + 5 s).
const SWAP: &str = "2025-11-21T12:00:05Z";
const T0: u64 = 1_763_726_400_000;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_vitalmq"))
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
            lot: Some("LOT-A".into()),
            hardware_model: Some("vw-band-2".into()),
            region: Some("eu-west".into()),
        };
        Self { key, entry }
    }

    /// Its `vitalmq-registry/v2` entry: worn by each `(patient, from, to)` in turn.
    fn registry_toml(&self, worn: &[(&str, &str, Option<&str>)]) -> String {
        let mut t = format!(
            "[[devices]]\nid = {:?}\nalg = {:?}\npublic_key = {:?}\n",
            self.entry.id.as_str(),
            self.key.algorithm().name(),
            self.entry.key.to_hex()
        );
        for (k, v) in [
            ("lot", &self.entry.lot),
            ("hardware_model", &self.entry.hardware_model),
            ("region", &self.entry.region),
        ] {
            if let Some(v) = v {
                t.push_str(&format!("{k} = {v:?}\n"));
            }
        }
        for (patient, from, to) in worn {
            t.push_str(&format!(
                "[[devices.assignments]]\nvalid_from = {from:?}\npatient_ref = {patient:?}\nsite = \"site-01\"\n"
            ));
            if let Some(to) = to {
                t.push_str(&format!("valid_to = {to:?}\n"));
            }
        }
        t
    }

    fn event(
        &self,
        seq: u64,
        kind: MessageType,
        m: &[(&str, Number)],
        publisher: &str,
    ) -> RecordedEvent {
        self.event_at(seq, T0 + seq * 5_000, kind, m, publisher).0
    }

    /// The event of a message signed with device clock `ts`, and its COSE bytes.
    fn event_at(
        &self,
        seq: u64,
        ts: u64,
        kind: MessageType,
        m: &[(&str, Number)],
        publisher: &str,
    ) -> (RecordedEvent, Vec<u8>) {
        let telemetry = Telemetry {
            dev: self.entry.id.clone(),
            epoch: 1,
            seq,
            ts,
            fw: "5.12.1".into(),
            kind,
            m: (!m.is_empty()).then(|| m.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()),
            q: Some(0.9),
            model: Some("arrhythmia-net/2.1.0".into()),
            schema: None,
            extra: if kind == MessageType::Status {
                BTreeMap::from([("battery".to_owned(), ciborium::Value::Float(0.5))])
            } else {
                BTreeMap::new()
            },
        };
        let bytes = sign(&telemetry, &self.key).expect("sign");
        let verified = verify(
            &bytes,
            &AnyKid(self.entry.key.clone()),
            Some(&self.entry.id),
        )
        .expect("verify");
        let topic = format!("devices/{}/telemetry", self.entry.id.as_str());
        let received = T0 + 100 + seq * 5_000;
        let receipt = Receipt {
            received_at_ms: received,
            topic: &topic,
            broker: "127.0.0.1:8883",
            publisher,
            bridge: "spiffe://demo.vitalmq/bridge/bridge-01",
        };
        let assessment = Assessment::of(
            &verified,
            received,
            &Default::default(),
            &Default::default(),
        );
        (
            RecordedEvent::new(
                &verified,
                Accepted::InOrder,
                &self.entry,
                &receipt,
                &assessment,
            ),
            bytes.to_vec(),
        )
    }
}

/// One alert change of `(patient, device)`.
fn alert(
    id: &str,
    state: &str,
    severity: &str,
    rule: &str,
    (patient, device): (&str, &str),
    evidence: &[&str],
    at: u64,
) -> NewAlert {
    let mut body = json!({"alert_id": id, "kind": "clinical", "state": state, "severity": severity,
        "rule": rule, "rule_version": "3", "policy_sha256": "ab12cd34", "device": device,
        "site": "site-01", "patient_ref": patient, "metric": "spo2", "value": 86, "threshold": 90,
        "window_s": 120, "evidence": evidence, "fw": "5.12.1", "model": null,
        "raised_at": "2025-11-21T12:00:05Z"});
    match state {
        "acknowledged" => {
            body["ack"] = json!({"by": "spiffe://demo.vitalmq/integrator/nurse-1", "at": "2025-11-21T12:02:00Z"})
        }
        "escalated" => {
            body["escalation_level"] = json!(1);
            body["reason"] = json!("unacknowledged");
        }
        _ => {}
    }
    if rule != "spo2-low" {
        for k in ["metric", "value", "threshold"] {
            body[k] = Json::Null;
        }
    }
    if rule == "no-data" {
        body["reason"] = json!("offline");
        body["last_seen_at"] = json!("2025-11-21T12:00:05Z");
        body["expected_interval_s"] = json!(5);
    }
    NewAlert {
        alert_id: id.into(),
        state: state.into(),
        kind: "clinical".into(),
        topic: format!("alerts/site-01/{severity}/{device}"),
        device: Some(device.into()),
        rule: Some(rule.into()),
        created_at_ms: at,
        body: body.to_string(),
        level: 0,
    }
}

/// An encrypted store with A on dev-a (EdDSA, directly and through a gateway) and B on
/// dev-b (ES256; worn by C until 12:00:05, then by B), a bridge configuration and a
/// registry.
struct Fixture {
    tmp: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let tmp = temp_dir("vitalmq-fhir-");
        let a = Device::new("dev-a", Algorithm::EdDsa, A);
        let mut b = Device::new("dev-b", Algorithm::Es256, C);
        let c_on_b = b.event(
            0,
            MessageType::Vitals,
            &[("spo2", Number::Int(98))],
            "spiffe://demo.vitalmq/device/dev-b",
        );
        b.entry.patient_ref = B.into();
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
        let own = "spiffe://demo.vitalmq/device/dev-a";
        let gw = "spiffe://demo.vitalmq/gateway/gw-1";
        let i = Number::Int;
        let events = vec![
            a.event(
                0,
                MessageType::Vitals,
                &[
                    ("spo2", i(96)),
                    ("pulse", i(72)),
                    ("resp", i(16)),
                    ("temp", Number::Float(37.2)),
                    ("sbp", i(121)),
                    ("dbp", i(79)),
                ],
                own,
            ),
            // Half a blood pressure and a metric SPEC does not list, through a gateway.
            a.event(
                1,
                MessageType::Vitals,
                &[("sbp", i(118)), ("etco2", i(35))],
                gw,
            ),
            a.event(2, MessageType::Vitals, &[("spo2", i(86))], own),
            a.event(3, MessageType::Status, &[], own),
            b.event(
                2,
                MessageType::Vitals,
                &[("spo2", i(99)), ("pulse", i(60))],
                "spiffe://demo.vitalmq/device/dev-b",
            ),
            c_on_b,
        ];
        let ev: Vec<String> = events.iter().map(|e| e.event_id().to_owned()).collect();
        let at = T0 + 60_000;
        let alerts = vec![
            alert(
                "al-a1",
                "open",
                "urgent",
                "spo2-low",
                (A, "dev-a"),
                &[&ev[2]],
                at,
            ),
            alert(
                "al-a1",
                "escalated",
                "urgent",
                "spo2-low",
                (A, "dev-a"),
                &[&ev[2]],
                at + 1,
            ),
            alert(
                "al-a1",
                "acknowledged",
                "urgent",
                "spo2-low",
                (A, "dev-a"),
                &[&ev[2]],
                at + 2,
            ),
            alert(
                "al-a1",
                "resolved",
                "urgent",
                "spo2-low",
                (A, "dev-a"),
                &[&ev[2]],
                at + 3,
            ),
            alert(
                "al-a2",
                "open",
                "review",
                "device-alarm:arrhythmia",
                (A, "dev-a"),
                &[&ev[3]],
                at + 4,
            ),
            alert(
                "al-a3",
                "open",
                "info",
                "no-data",
                (A, "dev-a"),
                &[],
                at + 5,
            ),
            alert(
                "al-b1",
                "open",
                "urgent",
                "spo2-low",
                (B, "dev-b"),
                &[&ev[4]],
                at + 6,
            ),
        ];
        store
            .commit(&Commit {
                events,
                alerts,
                now_ms: at + 10,
                ..Commit::default()
            })
            .expect("commit");
        let registry = format!(
            "format = \"vitalmq-registry/v2\"\ntrust_domain = \"demo.vitalmq\"\n\n{}\n{}",
            a.registry_toml(&[(A, "2025-01-01T00:00:00Z", None)]),
            b.registry_toml(&[(C, "2025-01-01T00:00:00Z", Some(SWAP)), (B, SWAP, None)])
        );
        std::fs::write(tmp.path().join("registry.toml"), registry).expect("registry");
        std::fs::write(
            tmp.path().join("bridge.toml"),
            r#"id = "bridge-01"
data_dir = "data"
registry = "registry.toml"
[broker]
address = "127.0.0.1:1"
ca = "ca.pem"
cert = "bridge.pem"
key = "bridge.key.pem"
[encryption]
key_file = "kek.json"
"#,
        )
        .expect("bridge config");
        Self { tmp }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn vitalmq(&self, args: &[&str]) -> Ran {
        let mut cmd = Command::new(bin());
        cmd.current_dir(self.tmp.path())
            .env_remove("VITALMQ_OPERATOR_AUDIT")
            .args(args);
        run(&mut cmd, Duration::from_secs(30))
    }

    fn export(&self, who: &[&str], out: &str, extra: &[&str]) -> Ran {
        let mut args = vec!["fhir", "export", "--config", "bridge.toml", "--out", out];
        args.extend(who);
        args.extend(extra);
        self.vitalmq(&args)
    }

    fn verify(&self, file: &str) -> Ran {
        self.vitalmq(&["fhir", "verify", file, "--registry", "registry.toml"])
    }

    fn bundle(&self, name: &str) -> Json {
        serde_json::from_slice(&std::fs::read(self.path(name)).expect("bundle")).expect("json")
    }

    fn write(&self, name: &str, doc: &Json) {
        std::fs::write(self.path(name), serde_json::to_vec(doc).expect("json")).expect("write");
    }
}

fn python(script: &str, args: &[&Path]) -> Json {
    let mut py = Command::new("python3");
    py.arg(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/py")
            .join(script),
    )
    .args(args);
    let ran = run(&mut py, Duration::from_secs(60));
    assert!(
        !ran.stderr.contains("ModuleNotFoundError"),
        "install the peers: python3 -m pip install pycose 'cbor2<6' 'fhir.resources==8.*'\n{}",
        ran.stderr
    );
    assert!(ran.success, "{script}: {}", ran.all());
    serde_json::from_str(ran.stdout.trim()).expect("summary")
}

fn count(bundle: &Json, resource_type: &str) -> usize {
    bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["resource"]["resourceType"] == resource_type)
        .count()
}

#[test]
fn exported_bundle_validates_and_its_signatures_verify_independently() {
    let f = Fixture::new();
    let ran = f.export(
        &["--patient", A],
        "a.json",
        &["--ndjson", "a-ndjson", "--purpose", "care"],
    );
    assert!(ran.success, "{}", ran.all());
    let report: Json = serde_json::from_str(ran.stdout.trim()).expect("report");
    assert_eq!(report["events"], 4, "{report}");
    assert_eq!(report["alert_changes"], 6, "{report}");

    let text = std::fs::read_to_string(f.path("a.json")).expect("bundle");
    assert!(
        !text.contains(B) && !text.contains("dev-b"),
        "nothing of another patient"
    );
    let bundle: Json = serde_json::from_str(&text).expect("json");
    assert_eq!(bundle["type"], "transaction");
    // Event 0: spo2, pulse, resp, temp, BP panel; event 1: BP panel, etco2; event 2: spo2.
    assert_eq!(count(&bundle, "Observation"), 8);
    assert_eq!(count(&bundle, "Device"), 1);
    assert_eq!(count(&bundle, "DetectedIssue"), 3);
    assert_eq!(count(&bundle, "Task"), 2, "urgent and review alerts");
    // An export never rolls a live server back: Device and Task only if absent.
    for e in bundle["entry"].as_array().expect("entries") {
        if matches!(
            e["resource"]["resourceType"].as_str(),
            Some("Device" | "Task")
        ) {
            assert_eq!(e["request"]["method"], "POST", "{e}");
            assert!(e["request"]["ifNoneExist"].is_string(), "{e}");
        }
    }
    assert_eq!(count(&bundle, "Communication"), 6);
    assert_eq!(count(&bundle, "Provenance"), 3 + 6);
    let states: Vec<&str> = bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["resource"]["resourceType"] == "Communication")
        .filter_map(|e| e["resource"]["identifier"][0]["value"].as_str())
        .collect();
    for state in ["open", "escalated", "acknowledged", "resolved"] {
        assert!(
            states
                .iter()
                .any(|k| k.starts_with(&format!("al-a1/{state}/"))),
            "{state}: {states:?}"
        );
    }

    // The independent validator: the Bundle, and every NDJSON file.
    let mut files = vec![f.path("a.json")];
    for entry in std::fs::read_dir(f.path("a-ndjson")).expect("ndjson") {
        files.push(entry.expect("entry").path());
    }
    let paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let summary = python("fhir_validate.py", &paths);
    assert_eq!(summary["errors"], json!([]), "{summary}");
    assert_eq!(
        summary["counts"]["Observation"], 16,
        "Bundle and NDJSON: {summary}"
    );

    // pycose, with the registry's keys: every reading's signature and values.
    let summary = python(
        "fhir_pycose.py",
        &[&f.path("a.json"), &f.path("registry.toml")],
    );
    assert_eq!(summary["verified"], 3, "{summary}");

    // Our verify agrees, offline.
    let ran = f.verify("a.json");
    assert!(ran.success, "{}", ran.all());
    assert!(ran.stdout.contains("\"ok\":true"), "{}", ran.all());

    // Owner-only files.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: PathBuf| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode(f.path("a.json")), 0o600);
    assert_eq!(mode(f.path("a-ndjson/Observation.ndjson")), 0o600);
    assert_eq!(mode(f.path("a-ndjson")) & 0o077, 0);

    // Same store, same Bundle.
    let again = f.export(&["--patient", A], "a2.json", &[]);
    assert!(again.success, "{}", again.all());
    assert_eq!(f.bundle("a2.json"), bundle, "deterministic");

    // Audited: the operator log records both exports of A's data.
    let log = std::fs::read_to_string(f.path("data/operator-audit/operator.jsonl")).expect("log");
    let exports: Vec<Json> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Json>(l).ok())
        .filter(|r| r.to_string().contains("fhir.export") && r.to_string().contains("succeeded"))
        .collect();
    assert_eq!(exports.len(), 2, "{log}");
    assert!(exports.iter().all(|r| r.to_string().contains(A)));
}

#[test]
fn verify_refuses_changed_values_signatures_and_unsigned_observations() {
    let f = Fixture::new();
    assert!(f.export(&["--patient", A], "a.json", &[]).success);
    let bundle = f.bundle("a.json");
    let entries = || bundle["entry"].as_array().expect("entries").clone();

    // A value changed after signing.
    let mut changed = bundle.clone();
    let i = entries()
        .iter()
        .position(|e| e["resource"]["valueQuantity"]["value"] == 86)
        .expect("the spo2 of 86");
    changed["entry"][i]["resource"]["valueQuantity"]["value"] = json!(96);
    f.write("value.json", &changed);
    let ran = f.verify("value.json");
    assert_eq!(ran.code, Some(1), "{}", ran.all());
    assert!(ran.stdout.contains("the device signed"), "{}", ran.all());

    // A signature byte changed.
    let mut forged = bundle.clone();
    let p = entries()
        .iter()
        .position(|e| e["resource"]["signature"].is_array())
        .expect("a signed provenance");
    let data = forged["entry"][p]["resource"]["signature"][0]["data"]
        .as_str()
        .expect("data")
        .to_owned();
    let mut bytes = base64_decode(&data);
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    forged["entry"][p]["resource"]["signature"][0]["data"] = json!(base64_encode(&bytes));
    f.write("sig.json", &forged);
    let ran = f.verify("sig.json");
    assert_eq!(ran.code, Some(1), "{}", ran.all());
    assert!(ran.stdout.contains("signature refused"), "{}", ran.all());

    // An Observation no signature covers.
    let mut extra = bundle.clone();
    let mut obs = entries()[i].clone();
    obs["fullUrl"] = json!("urn:uuid:00000000-0000-5000-8000-000000000000");
    obs["resource"]["identifier"][0]["value"] = json!("ev1-made-up/spo2");
    extra["entry"].as_array_mut().expect("entries").push(obs);
    f.write("extra.json", &extra);
    let ran = f.verify("extra.json");
    assert_eq!(ran.code, Some(1), "{}", ran.all());
    assert!(ran.stdout.contains("ev1-made-up/spo2"), "{}", ran.all());

    // A lone Provenance: its signature and hash verify; its targets are not in the file.
    f.write("prov.json", &entries()[p]["resource"]);
    let ran = f.verify("prov.json");
    assert!(ran.success, "{}", ran.all());
}

/// The last line `fhir verify` prints: its summary.
fn summary_of(ran: &Ran) -> Json {
    serde_json::from_str(ran.stdout.lines().last().unwrap_or_default()).expect("summary")
}

#[test]
fn verify_refuses_copies_unidentified_ambiguous_unit_and_relabelled_observations() {
    let f = Fixture::new();
    assert!(f.export(&["--patient", A], "a.json", &[]).success);
    let bundle = f.bundle("a.json");
    let entries = bundle["entry"].as_array().expect("entries").clone();
    let spo2 = entries
        .iter()
        .position(|e| e["resource"]["valueQuantity"]["value"] == 86)
        .expect("the spo2 of 86");
    let key = entries[spo2]["resource"]["identifier"][0]["value"]
        .as_str()
        .expect("key")
        .to_owned();
    let refused = |name: &str, doc: &Json, needle: &str| {
        f.write(name, doc);
        let ran = f.verify(name);
        assert_eq!(ran.code, Some(1), "{name}: {}", ran.all());
        assert!(
            ran.stdout.contains(needle),
            "{name}: {needle}: {}",
            ran.all()
        );
        ran
    };
    let with = |entry: Json| {
        let mut b = bundle.clone();
        b["entry"].as_array_mut().expect("entries").push(entry);
        b
    };

    // (a) A second Observation under the signed one's identifier, another value.
    let mut copy = entries[spo2].clone();
    copy["fullUrl"] = json!("urn:uuid:00000000-0000-5000-8000-000000000001");
    copy["resource"]["valueQuantity"]["value"] = json!(42);
    let ran = refused("copy.json", &with(copy), &key);
    assert_eq!(
        summary_of(&ran)["observation_identifiers_duplicated"],
        json!([key]),
        "{}",
        ran.all()
    );

    // (b) An Observation without any identifier.
    let mut bare = entries[spo2].clone();
    bare["fullUrl"] = json!("urn:uuid:00000000-0000-5000-8000-000000000002");
    bare["resource"]["valueQuantity"]["value"] = json!(42);
    bare["resource"]
        .as_object_mut()
        .expect("object")
        .remove("identifier");
    let ran = refused(
        "bare.json",
        &with(bare),
        "no urn:vitalmq:observation identifier",
    );
    assert_eq!(
        summary_of(&ran)["observations_without_a_verified_signature"]
            .as_array()
            .map(Vec::len),
        Some(1),
        "{}",
        ran.all()
    );

    // (c) The signed value as a component, another one as valueQuantity.
    let mut ambiguous = bundle.clone();
    let o = &mut ambiguous["entry"][spo2]["resource"];
    o["component"] =
        json!([{"code": o["code"].clone(), "valueQuantity": o["valueQuantity"].clone()}]);
    o["valueQuantity"]["value"] = json!(42);
    refused(
        "component.json",
        &ambiguous,
        "valueQuantity together with component",
    );

    // (d) Another unit, the same number.
    let temp = entries
        .iter()
        .position(|e| e["resource"]["valueQuantity"]["code"] == "Cel")
        .expect("a temperature");
    let mut unit = bundle.clone();
    unit["entry"][temp]["resource"]["valueQuantity"]["code"] = json!("[degF]");
    unit["entry"][temp]["resource"]["valueQuantity"]["unit"] = json!("degF");
    refused("unit.json", &unit, "[degF]");

    // (e) The reading relabelled as another event.
    let other = "ev1-00000000000000000000000000000000";
    let mut relabelled = bundle.clone();
    let o = &mut relabelled["entry"][spo2]["resource"];
    o["identifier"][0]["value"] = json!(format!("{other}/spo2"));
    o["identifier"][1]["value"] = json!(other);
    refused("relabel.json", &relabelled, "is not the signed message's");

    // Recoded: what a LOINC consumer reads differs from what was signed, though the
    // first coding (the one a naive verifier reads) still names the signed metric.
    let panel = |dbp_absent: bool| {
        entries
            .iter()
            .position(|e| {
                e["resource"]["code"]["coding"][0]["code"] == "85354-9"
                    && e["resource"]["component"][1]["dataAbsentReason"].is_object() == dbp_absent
            })
            .expect("a panel")
    };
    let not_mapped = "not what the mapping makes of the signed message";
    // (f) BP components swapped for a LOINC reader: systolic 79, diastolic 121.
    let bp = panel(false);
    let mut swapped = bundle.clone();
    let comps = &mut swapped["entry"][bp]["resource"]["component"];
    for (i, (metric, loinc)) in [("sbp", "8462-4"), ("dbp", "8480-6")].iter().enumerate() {
        comps[i]["code"]["coding"] = json!([
            {"system": "urn:vitalmq:metric", "code": metric},
            {"system": "http://loinc.org", "code": loinc},
        ]);
    }
    refused("bp-swapped.json", &swapped, not_mapped);
    // (g) A pulse that is also a respiratory rate.
    let pulse = entries
        .iter()
        .position(|e| e["resource"]["code"]["coding"][0]["code"] == "8867-4")
        .expect("a pulse");
    let mut pulse_resp = bundle.clone();
    pulse_resp["entry"][pulse]["resource"]["code"]["coding"]
        .as_array_mut()
        .expect("codings")
        .push(json!({"system": "http://loinc.org", "code": "9279-1"}));
    refused("pulse-resp.json", &pulse_resp, not_mapped);
    // (h) The diastolic the device did not send, given a value next to its absence.
    let half = panel(true);
    let mut made_up = bundle.clone();
    made_up["entry"][half]["resource"]["component"][1]["valueInteger"] = json!(95);
    refused("dbp-made-up.json", &made_up, not_mapped);
    // (i) dev-a's Observation pointing its device reference at dev-b's Device, its
    // identifier left as dev-a: a reader resolving the reference sees dev-b.
    let mut repointed = bundle.clone();
    repointed["entry"][spo2]["resource"]["device"]["reference"] = json!(
        vitalmq_fhir::ids::full_url("Device", "urn:vitalmq:device", "dev-b")
    );
    refused(
        "device-ref.json",
        &repointed,
        "is not the Device of its identifier",
    );
    // (j) A Provenance target whose reference and identifier name different readings.
    let prov = entries
        .iter()
        .position(|e| {
            e["resource"]["resourceType"] == "Provenance"
                && e["resource"]["target"]
                    .as_array()
                    .is_some_and(|t| t.iter().any(|t| t["identifier"]["value"] == key.as_str()))
        })
        .expect("the spo2's provenance");
    let mut retargeted = bundle.clone();
    let targets = retargeted["entry"][prov]["resource"]["target"]
        .as_array_mut()
        .expect("targets");
    let t = targets
        .iter_mut()
        .find(|t| t["identifier"]["value"] == key.as_str())
        .expect("target");
    t["identifier"]["value"] = json!("ev1-other/spo2");
    refused(
        "target-ref.json",
        &retargeted,
        "the resource it references has",
    );
    // pycose's independent check reads the LOINC codes too.
    for name in ["bp-swapped.json", "pulse-resp.json"] {
        let mut py = Command::new("python3");
        py.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/fhir_pycose.py"))
            .arg(f.path(name))
            .arg(f.path("registry.toml"));
        let ran = run(&mut py, Duration::from_secs(60));
        assert!(!ran.success, "{name}: pycose accepted it: {}", ran.all());
        assert!(
            ran.stdout.contains("not the mapping's"),
            "{name}: {}",
            ran.all()
        );
    }

    // The untouched Bundle still verifies.
    assert!(f.verify("a.json").success);
}

/// Retention purged one reading's raw message: the export still goes, that reading
/// with a Provenance without signature, and `verify` reports it as unsigned (raw
/// purged), apart from tampering: a failure unless `--allow-unsigned`.
#[test]
fn a_reading_whose_raw_retention_purged_exports_unsigned() {
    let f = Fixture::new();
    {
        let mut store = Store::open(&f.path("data")).expect("store");
        let first = store
            .retention_events(0, 100)
            .expect("events")
            .into_iter()
            .find(|e| e.device == "dev-a")
            .expect("a reading of dev-a");
        store
            .apply_retention(&[vitalmq_bridge::store::StoreAct::PurgeRaw {
                raw_id: first.raw_id,
            }])
            .expect("purge");
    }
    let ran = f.export(&["--patient", A], "a.json", &[]);
    assert!(ran.success, "{}", ran.all());
    let report: Json = serde_json::from_str(ran.stdout.trim()).expect("report");
    assert_eq!(report["raw_purged"], 1, "{report}");
    assert_eq!(report["events"], 4, "{report}");
    let bundle = f.bundle("a.json");
    let provs: Vec<&Json> = bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| &e["resource"])
        .filter(|r| r["resourceType"] == "Provenance" && r.get("target").is_some())
        .filter(|r| r.to_string().contains("urn:vitalmq:raw-purged"))
        .collect();
    assert_eq!(provs.len(), 1);
    assert!(provs[0].get("signature").is_none());
    let summary = python("fhir_validate.py", &[&f.path("a.json")]);
    assert_eq!(summary["errors"], json!([]), "{summary}");

    let ran = f.verify("a.json");
    assert_eq!(ran.code, Some(1), "{}", ran.all());
    let s = summary_of(&ran);
    assert_eq!(s["failed"], 0, "no tampering: {}", ran.all());
    assert_eq!(s["observations_without_a_verified_signature"], json!([]));
    assert_eq!(
        s["unsigned_raw_purged"].as_array().map(Vec::len),
        Some(5),
        "event 0's spo2, pulse, resp, temp and BP panel: {}",
        ran.all()
    );
    assert!(
        ran.stdout.contains("\"unsigned\":\"raw purged\""),
        "{}",
        ran.all()
    );
    let ran = f.vitalmq(&[
        "fhir",
        "verify",
        "a.json",
        "--registry",
        "registry.toml",
        "--allow-unsigned",
    ]);
    assert!(ran.success, "{}", ran.all());

    // `--allow-unsigned` still checks the structure: a purged reading relabelled as
    // another event, given to another device, or without the raw message's SHA-256 is
    // refused, so the flag vouches only for what retention really purged.
    let purged_prov = bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .position(|e| {
            e["resource"].to_string().contains("urn:vitalmq:raw-purged")
                && e["resource"]["resourceType"] == "Provenance"
        })
        .expect("the purged provenance");
    let target = bundle["entry"][purged_prov]["resource"]["target"][0]["reference"].clone();
    let obs = bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .position(|e| e["fullUrl"] == target)
        .expect("a purged target");
    let allow = |name: &str, doc: &Json, needle: &str| {
        f.write(name, doc);
        let ran = f.vitalmq(&[
            "fhir",
            "verify",
            name,
            "--registry",
            "registry.toml",
            "--allow-unsigned",
        ]);
        assert_eq!(ran.code, Some(1), "{name}: {}", ran.all());
        assert!(
            ran.stdout.contains(needle),
            "{name}: {needle}: {}",
            ran.all()
        );
    };
    let mut relabelled = bundle.clone();
    relabelled["entry"][obs]["resource"]["identifier"][1]["value"] = json!("ev1-other");
    allow("purged-relabel.json", &relabelled, "identifies it as");
    let mut moved = bundle.clone();
    moved["entry"][obs]["resource"]["device"] =
        json!({"type": "Device", "identifier": {"system": "urn:vitalmq:device", "value": "dev-b"}});
    allow("purged-device.json", &moved, "is not the author");
    let mut no_sha = bundle.clone();
    no_sha["entry"][purged_prov]["resource"]
        .as_object_mut()
        .expect("provenance")
        .remove("entity");
    allow("purged-sha.json", &no_sha, "no raw-message SHA-256 entity");
    let mut ambiguous = bundle.clone();
    ambiguous["entry"][obs]["resource"]["valueString"] = json!("42");
    allow("purged-value.json", &ambiguous, "valueString");
}

#[test]
fn device_and_time_range_exports() {
    let f = Fixture::new();
    // dev-b's whole assignment history: C's reading (before the swap) and B's.
    let ran = f.export(&["--device", "dev-b"], "b.json", &[]);
    assert!(ran.success, "{}", ran.all());
    let b = f.bundle("b.json");
    let text = b.to_string();
    assert!(!text.contains(A) && !text.contains("dev-a"));
    assert!(text.contains(B) && text.contains(C), "both wearers: {text}");
    assert_eq!(count(&b, "Observation"), 3, "C's spo2, B's spo2 and pulse");
    let wearers: std::collections::BTreeSet<&str> = b["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["resource"]["resourceType"] == "Observation")
        .filter_map(|e| e["resource"]["subject"]["identifier"]["value"].as_str())
        .collect();
    assert_eq!(wearers, [B, C].into(), "each reading with its own wearer");
    let summary = python("fhir_validate.py", &[&f.path("b.json")]);
    assert_eq!(summary["errors"], json!([]), "{summary}");
    let summary = python(
        "fhir_pycose.py",
        &[&f.path("b.json"), &f.path("registry.toml")],
    );
    assert_eq!(summary["verified"], 2, "ES256 too: {summary}");
    assert!(f.verify("b.json").success);
    // The range picks the wearers: before the swap only C, from it only B.
    let ran = f.export(&["--device", "dev-b", "--until", SWAP], "bc.json", &[]);
    assert!(ran.success, "{}", ran.all());
    let bc = f.bundle("bc.json").to_string();
    assert!(bc.contains(C) && !bc.contains(B), "{bc}");
    let ran = f.export(&["--device", "dev-b", "--since", SWAP], "bb.json", &[]);
    assert!(ran.success, "{}", ran.all());
    let bb = f.bundle("bb.json").to_string();
    assert!(bb.contains(B) && !bb.contains(C), "{bb}");
    let log = std::fs::read_to_string(f.path("data/operator-audit/operator.jsonl")).expect("log");
    assert!(
        log.lines()
            .any(|l| l.contains("fhir.export") && l.contains(B) && l.contains(C)),
        "the device's export names both wearers: {log}"
    );

    // Only event 1 (T0 + 5 s) and no alert change (recorded at T0 + 60 s).
    let ran = f.export(
        &["--patient", A],
        "range.json",
        &[
            "--since",
            "2025-11-21T12:00:05Z",
            "--until",
            "2025-11-21T12:00:10Z",
        ],
    );
    assert!(ran.success, "{}", ran.all());
    let r = f.bundle("range.json");
    assert_eq!(count(&r, "Observation"), 2, "the BP panel and etco2");
    assert_eq!(count(&r, "Communication"), 0);

    // Not a pseudonym, an unknown device, an existing file: refused.
    assert!(!f.export(&["--patient", "Jane Doe"], "x.json", &[]).success);
    assert!(!f.export(&["--device", "dev-zz"], "x.json", &[]).success);
    assert!(!f.export(&["--patient", A], "b.json", &[]).success);
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64")
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// The FHIR sink and `fhir export` give the same reading the same resources: the
/// sink's transaction Bundle of the outbox (mapped as the drain hands it over, Devices
/// from the registry in force) holds no entry the export's Bundle does not hold
/// identically (same fullUrl, same resource, same request).
#[test]
fn the_sink_maps_a_reading_as_the_export_does() {
    let f = Fixture::new();
    let ran = f.export(&["--device", "dev-a"], "a.json", &[]);
    assert!(ran.success, "{}", ran.all());
    let exported = f.bundle("a.json");
    let by_url: BTreeMap<&str, &Json> = exported["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| (e["fullUrl"].as_str().expect("fullUrl"), e))
        .collect();

    let keyring = Arc::new(
        Keyring::open(
            &f.path("data/keyring.sqlite3"),
            Arc::new(LocalKeyFile::load(&f.path("kek.json")).expect("kek")),
        )
        .expect("keyring"),
    );
    let store = Store::open(&f.path("data"))
        .expect("store")
        .with_keyring(keyring);
    let records: Vec<_> = store
        .read_range(1, store.head().expect("head"))
        .expect("outbox")
        .into_iter()
        .filter(|r| r.device == "dev-a")
        .collect();
    assert_eq!(records.len(), 4, "dev-a's events");
    let batch = vitalmq_bridge::sink::Batch {
        first: records[0].position,
        last: records[records.len() - 1].position,
        records,
    };
    let registry =
        vitalmq_policies::DeviceRegistry::load(&f.path("registry.toml")).expect("registry");
    let sent = vitalmq_bridge::sink::fhir::bundle::bundle_for(&batch, Some(&registry))
        .expect("maps")
        .expect("a Bundle");
    let entries = sent["entry"].as_array().expect("entries");
    // The Device, 8 Observations and 3 Provenance of dev-a's readings.
    assert_eq!(entries.len(), 1 + 8 + 3, "{sent}");
    for e in entries {
        let url = e["fullUrl"].as_str().expect("fullUrl");
        let exported = by_url.get(url).expect(url);
        assert_eq!(e["resource"], exported["resource"], "{url}");
        // The same request, except that the export creates a Device only if absent
        // where the sink (moving forward in store order) updates it.
        if e["resource"]["resourceType"] == "Device" {
            assert_eq!(e["request"]["method"], "PUT", "{e}");
            assert_eq!(exported["request"]["method"], "POST", "{exported}");
        } else {
            assert_eq!(e["request"], exported["request"], "{url}");
        }
    }
    let device = entries
        .iter()
        .find(|e| e["resource"]["resourceType"] == "Device")
        .expect("Device");
    assert_eq!(device["resource"]["lotNumber"], "LOT-A", "{device}");
}

/// A device clock beyond what FHIR can date (`ts` = u64::MAX, which SPEC allows): the
/// Observation is dated by the bridge and the signed ts kept in the device-time
/// extension; verify (and pycose) accept it untouched and refuse a changed extension,
/// and refuse such an extension on a reading whose ts is datable.
#[test]
fn a_clock_beyond_year_9999_verifies_by_its_device_time_extension() {
    let tmp = temp_dir("vitalmq-fhir-clock-");
    let a = Device::new("dev-a", Algorithm::EdDsa, A);
    std::fs::write(
        tmp.path().join("registry.toml"),
        format!(
            "format = \"vitalmq-registry/v2\"\ntrust_domain = \"demo.vitalmq\"\n\n{}",
            a.registry_toml(&[(A, "2025-01-01T00:00:00Z", None)])
        ),
    )
    .expect("registry");
    let own = "spiffe://demo.vitalmq/device/dev-a";
    let bundle_of = |seq: u64, ts: u64| {
        let (recorded, raw) = a.event_at(
            seq,
            ts,
            MessageType::Vitals,
            &[("spo2", Number::Int(95))],
            own,
        );
        let json: Json = serde_json::from_str(recorded.normalized_json()).expect("event");
        let event = vitalmq_fhir::Event::from_json(&json).expect("event");
        let mut b = vitalmq_fhir::BundleBuilder::for_export();
        assert_eq!(b.reading(&event, &raw).expect("maps"), 1);
        b.transaction()
    };
    let verify = |name: &str, doc: &Json| {
        let path = tmp.path().join(name);
        std::fs::write(&path, serde_json::to_vec(doc).expect("json")).expect("write");
        let mut cmd = Command::new(bin());
        cmd.current_dir(tmp.path())
            .env_remove("VITALMQ_OPERATOR_AUDIT")
            .args(["fhir", "verify", name, "--registry", "registry.toml"]);
        run(&mut cmd, Duration::from_secs(30))
    };
    let obs = |b: &Json| {
        b["entry"]
            .as_array()
            .expect("entries")
            .iter()
            .position(|e| e["resource"]["resourceType"] == "Observation")
            .expect("an observation")
    };
    let device_time = "urn:vitalmq:fhir:extension:device-time";

    let far = bundle_of(0, u64::MAX);
    let i = obs(&far);
    let ext = far["entry"][i]["resource"]["extension"]
        .as_array()
        .expect("extensions")
        .iter()
        .position(|x| x["url"] == device_time)
        .expect("the device-time extension");
    let ran = verify("far.json", &far);
    assert!(ran.success, "{}", ran.all());
    let summary = python(
        "fhir_pycose.py",
        &[
            &tmp.path().join("far.json"),
            &tmp.path().join("registry.toml"),
        ],
    );
    assert_eq!(summary["errors"], json!([]), "{summary}");
    assert_eq!(summary["verified"], 1, "{summary}");
    // Targets by identifier only (as a server may return them): pycose resolves them.
    let mut by_identifier = far.clone();
    for e in by_identifier["entry"].as_array_mut().expect("entries") {
        for t in e["resource"]["target"].as_array_mut().into_iter().flatten() {
            t.as_object_mut().expect("target").remove("reference");
        }
    }
    std::fs::write(
        tmp.path().join("far-ids.json"),
        serde_json::to_vec(&by_identifier).expect("json"),
    )
    .expect("write");
    let summary = python(
        "fhir_pycose.py",
        &[
            &tmp.path().join("far-ids.json"),
            &tmp.path().join("registry.toml"),
        ],
    );
    assert_eq!(summary["errors"], json!([]), "{summary}");
    assert_eq!(summary["values"], 1, "the target checked: {summary}");

    let mut tampered = far.clone();
    tampered["entry"][i]["resource"]["extension"][ext]["valueString"] = json!("1763726405123");
    let ran = verify("far-tampered.json", &tampered);
    assert_eq!(ran.code, Some(1), "{}", ran.all());
    assert!(ran.stdout.contains("is not the signed"), "{}", ran.all());

    let near = bundle_of(1, T0);
    let i = obs(&near);
    let mut extended = near.clone();
    extended["entry"][i]["resource"]["extension"]
        .as_array_mut()
        .expect("extensions")
        .push(json!({"url": device_time, "valueString": u64::MAX.to_string()}));
    let ran = verify("near-extended.json", &extended);
    assert_eq!(ran.code, Some(1), "{}", ran.all());
    assert!(ran.stdout.contains("is datable"), "{}", ran.all());
    assert!(verify("near.json", &near).success);
}
