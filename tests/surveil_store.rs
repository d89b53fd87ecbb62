//! `vitalmq surveil` over a bridge store written in-process through the store API
//! (real signed, verified messages, sealed with `[encryption]`): the rates come out of
//! the stored events and alerts; the dropped counter is counted per boot (epoch); a
//! sealed store needs the key file; every question is an audited operator action
//! recording what was asked and never a value or a subject.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use ciborium::Value as Cbor;
use common::{run, temp_dir, vitalmq_ok};
use serde_json::{Value as Json, json};
use vitalmq_bridge::NewScore;
use vitalmq_bridge::normalize::Receipt;
use vitalmq_bridge::plausible::Assessment;
use vitalmq_bridge::store::{Commit, NewAlert, Quarantined, RecordedEvent, Store};
use vitalmq_bridge::window::Accepted;
use vitalmq_envelope::{
    Algorithm, AnyKid, DeviceId, MessageType, Number, SigningKey, Telemetry, sign, verify,
};
use vitalmq_keyring::{Keyring, LocalKeyFile};
use vitalmq_policies::{DeviceEntry, DeviceRegistry, Grant, Period, Purpose, SiteId, TrustDomain};

/// Monday 2026-11-16, 00:00 UTC (2026-W47).
const W47: u64 = 1_794_787_200_000;
const DAY: u64 = 86_400_000;

struct Device {
    key: SigningKey,
    entry: DeviceEntry,
}

impl Device {
    fn new(id: &str, patient: &str) -> Self {
        let key = SigningKey::generate(Algorithm::EdDsa).expect("key");
        let entry = DeviceEntry {
            id: DeviceId::new(id).expect("id"),
            site: SiteId::new("site-01").expect("site"),
            patient_ref: patient.into(),
            key: key.verifying_key(),
            consent: Some("care".into()),
            processing_policy: None,
            lot: Some("LOT-C".into()),
            hardware_model: None,
            region: Some("eu-west".into()),
        };
        Self { key, entry }
    }

    fn event(&self, epoch: u64, seq: u64, ts: u64, kind: MessageType) -> RecordedEvent {
        let (m, extra) = match kind {
            MessageType::Vitals => (
                Some(BTreeMap::from([("spo2".to_owned(), Number::Int(95))])),
                BTreeMap::new(),
            ),
            MessageType::Status => (
                None,
                // The cumulative drop counter of this boot: seq doubles as its value.
                BTreeMap::from([("dropped".to_owned(), Cbor::Integer(seq.into()))]),
            ),
            _ => (
                None,
                BTreeMap::from([
                    ("alarm".to_owned(), Cbor::Text("arrhythmia".into())),
                    ("level".to_owned(), Cbor::Text("urgent".into())),
                    ("active".to_owned(), Cbor::Bool(true)),
                ]),
            ),
        };
        let telemetry = Telemetry {
            dev: self.entry.id.clone(),
            epoch,
            seq,
            ts,
            fw: "5.12.1".into(),
            kind,
            m,
            q: None,
            model: Some("arrhythmia-net/2.1.0".into()),
            schema: None,
            extra,
        };
        let bytes = sign(&telemetry, &self.key).expect("sign");
        let verified = verify(
            &bytes,
            &AnyKid(self.entry.key.clone()),
            Some(&self.entry.id),
        )
        .expect("verify");
        let topic = format!("devices/{}/telemetry", self.entry.id.as_str());
        let receipt = Receipt {
            received_at_ms: ts + 100,
            topic: &topic,
            broker: "127.0.0.1:8883",
            publisher: "spiffe://demo.vitalmq/device/x",
            bridge: "spiffe://demo.vitalmq/bridge/bridge-01",
        };
        let assessment = Assessment::of(
            &verified,
            ts + 100,
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

fn alert(id: &str, state: &str, device: &str, patient: &str, at: u64) -> NewAlert {
    NewAlert {
        alert_id: id.into(),
        state: state.into(),
        kind: "clinical".into(),
        topic: format!("alerts/site-01/urgent/{device}"),
        device: Some(device.into()),
        rule: Some("spo2-low".into()),
        created_at_ms: at,
        body: json!({"alert_id": id, "state": state, "rule": "spo2-low", "device": device,
            "patient_ref": patient, "site": "site-01", "severity": "urgent"})
        .to_string(),
        level: 0,
    }
}

/// A NEWS2 score of `patient` as the bridge stores it (payload `vitalmq-score/v1`,
/// sealed by the store with the patient's key).
fn score(
    n: u32,
    patient: &str,
    version: &str,
    role: &str,
    aggregate: i64,
    complete: bool,
) -> NewScore {
    let score_id = format!("sc-{version}-{n}");
    let at = W47 + DAY + u64::from(n);
    NewScore {
        score_id: score_id.clone(),
        patient_ref: patient.into(),
        site: "site-01".into(),
        device: if patient == "pt-bbbb2222" {
            "dev-b"
        } else {
            "dev-a"
        }
        .into(),
        model: "news2".into(),
        version: version.into(),
        config_sha256: "ab".repeat(32),
        role: role.into(),
        observed_at_ms: at,
        created_at_ms: at + 5,
        payload: json!({"format": "vitalmq-score/v1", "score_id": score_id, "model": "news2",
            "version": version, "config_sha256": "ab".repeat(32), "role": role,
            "patient_ref": patient, "site": "site-01", "observed_at": "2026-11-17T00:00:00Z",
            "aggregate": aggregate, "risk": "low", "complete": complete, "red": false,
            "assessment": "routine", "sub_scores": {}, "missing": [], "inputs": []})
        .to_string(),
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

#[test]
fn rates_over_an_encrypted_store_are_counted_per_boot_and_audited() {
    let tmp = temp_dir("vitalmq-surveil-");
    let data = tmp.path().join("data");
    let kek = tmp.path().join("kek.json");
    let keyring = Arc::new(
        Keyring::open(
            &data.join("keyring.sqlite3"),
            Arc::new(LocalKeyFile::create(&kek).expect("kek")),
        )
        .expect("keyring"),
    );
    let mut store = Store::open(&data).expect("store").with_keyring(keyring);
    let a = Device::new("dev-a", "pt-aaaa1111");
    let b = Device::new("dev-b", "pt-bbbb2222");
    // dev-c's patient gave no surveillance consent: none of its rows may count.
    let c = Device::new("dev-c", "pt-cccc3333");
    let mut events = Vec::new();
    // dev-a, W47: 3 readings; status dropped 2 then 5 (epoch 1) = 5.
    // W48: reboot (epoch 2), status dropped 6 then 9 = 9 (not 6 - 5 + 3: a new epoch
    // starts from zero even when its first value is higher); one alarm raised.
    for k in 0..3 {
        events.push(a.event(1, 10 + k, W47 + DAY + k, MessageType::Vitals));
    }
    events.push(a.event(1, 2, W47 + 2 * DAY, MessageType::Status));
    events.push(a.event(1, 5, W47 + 3 * DAY, MessageType::Status));
    events.push(a.event(2, 6, W47 + 8 * DAY, MessageType::Status));
    events.push(a.event(2, 9, W47 + 9 * DAY, MessageType::Status));
    events.push(a.event(2, 20, W47 + 9 * DAY + 1, MessageType::Alarm));
    // dev-b, W47: 1 reading, dropped 1.
    events.push(b.event(1, 10, W47 + DAY, MessageType::Vitals));
    events.push(b.event(1, 1, W47 + 2 * DAY, MessageType::Status));
    for k in 0..3 {
        events.push(c.event(1, 10 + k, W47 + DAY + k, MessageType::Vitals));
    }
    events.push(c.event(1, 7, W47 + 2 * DAY, MessageType::Status));
    events.push(c.event(1, 30, W47 + 2 * DAY + 1, MessageType::Alarm));
    let refusal = |device: &str, at: u64| Quarantined {
        received_at_ms: at,
        topic: format!("devices/{device}/telemetry"),
        device: Some(device.into()),
        reason: "bad_signature".into(),
        detail: "x".into(),
        sha256_hex: "00".into(),
        raw: bytes::Bytes::from_static(b"x"),
    };
    store
        .commit(&Commit {
            events,
            alerts: vec![
                alert("al-1", "open", "dev-a", "pt-aaaa1111", W47 + 4 * DAY),
                alert(
                    "al-1",
                    "resolved",
                    "dev-a",
                    "pt-aaaa1111",
                    W47 + 4 * DAY + 1,
                ),
                alert("al-2", "open", "dev-b", "pt-bbbb2222", W47 + 8 * DAY),
                alert("al-3", "open", "dev-c", "pt-cccc3333", W47 + 4 * DAY),
            ],
            // dev-a's refusal takes the firmware it last reported; dev-c's is withheld.
            quarantine: vec![
                refusal("dev-a", W47 + 5 * DAY),
                refusal("dev-c", W47 + 5 * DAY),
            ],
            // The live NEWS2 version and its shadow candidate (two points higher), and
            // an incomplete score, which PSI leaves out.
            scores: [1, 2, 3, 1]
                .into_iter()
                .enumerate()
                .flat_map(|(n, agg)| {
                    let n = u32::try_from(n).expect("n");
                    [
                        score(n, "pt-aaaa1111", "1.0.0", "live", agg, true),
                        score(n, "pt-aaaa1111", "1.1.0", "shadow", agg + 2, true),
                    ]
                })
                .chain([score(9, "pt-bbbb2222", "1.0.0", "live", 7, false)])
                .collect(),
            now_ms: W47 + 10 * DAY,
            ..Commit::default()
        })
        .expect("commit");
    drop(store);
    // The registry gives each device's lot and region, and the consents: surveillance
    // granted for dev-a's and dev-b's patients, not for dev-c's.
    let mut registry = DeviceRegistry::new(TrustDomain::new("demo.vitalmq").expect("domain"));
    for d in [&a, &b, &c] {
        registry.insert_device(d.entry.clone()).expect("new device");
    }
    for d in [&a, &b] {
        registry
            .grant_consent(
                &d.entry.id,
                Grant {
                    purpose: Purpose::Surveillance,
                    period: Period::new(W47 - DAY, None).expect("period"),
                },
            )
            .expect("grant");
    }
    let registry_file = tmp.path().join("registry.toml");
    std::fs::write(&registry_file, registry.to_toml()).expect("registry");

    let bin = Path::new(env!("CARGO_BIN_EXE_vitalmq"));
    let audit = tmp.path().join("operator.jsonl");
    let ask = |args: &[&str]| {
        let mut all = vec!["surveil"];
        all.extend_from_slice(args);
        all.extend_from_slice(&[
            "--data",
            s(&data),
            "--registry",
            s(&registry_file),
            "--json",
        ]);
        run(
            Command::new(bin)
                .args(&all)
                .env("VITALMQ_OPERATOR_AUDIT", &audit),
            Duration::from_secs(20),
        )
    };
    // Sealed payloads do not open without the key file: an error, not zeros.
    let refused = ask(&["rates"]);
    assert!(
        !refused.success,
        "read a sealed store without keys: {}",
        refused.all()
    );

    let out = ask(&["rates", "--dimension", "week", "--key-file", s(&kek)]);
    assert!(out.success, "{}", out.all());
    let rows: Vec<Json> = serde_json::from_str(&out.stdout).expect("JSON rows");
    let get = |measure: &str, week: &str| {
        rows.iter()
            .find(|r| r["measure"] == measure && r["value"] == week)
            .unwrap_or_else(|| panic!("{measure} {week} in {rows:?}"))
            .clone()
    };
    let w47 = get("dropped", "2026-W47");
    assert_eq!(
        (w47["n"].as_i64(), w47["device_weeks"].as_u64()),
        (Some(6), Some(2))
    );
    assert_eq!(w47["readings"], 4);
    assert_eq!(w47["per_device_week"], 3.0);
    assert_eq!(
        get("dropped", "2026-W48")["n"],
        9,
        "a new epoch starts from zero"
    );
    assert_eq!(get("device_alarms", "2026-W48")["n"], 1);
    assert_eq!(
        get("alerts", "2026-W47")["n"],
        1,
        "open + resolved is one alert"
    );
    assert_eq!(get("alerts", "2026-W48")["n"], 1);
    // Not a single row of dev-c: its readings, drops, alarm and alert are withheld.
    assert_eq!(get("device_alarms", "2026-W47")["n"], 0, "dev-c's alarm");
    assert!(
        out.stderr.contains("no_consent"),
        "withheld counts reported: {}",
        out.stderr
    );
    for table in ["events", "alerts", "refusals"] {
        assert!(
            out.stderr.contains(&format!("\"{table}\"")),
            "{}",
            out.stderr
        );
    }
    // Refusals are attributed to the firmware the device last reported.
    let by_fw = ask(&[
        "rates",
        "--dimension",
        "firmware",
        "--measure",
        "refusals",
        "--key-file",
        s(&kek),
    ]);
    assert!(by_fw.success, "{}", by_fw.all());
    let fw: Vec<Json> = serde_json::from_str(&by_fw.stdout).expect("JSON rows");
    assert_eq!(fw.len(), 1, "{fw:?}");
    assert_eq!(
        (&fw[0]["value"], &fw[0]["n"]),
        (&json!("5.12.1"), &json!(1))
    );
    // By lot, from the registry: dev-a and dev-b are in LOT-C, 5 + 9 + 1 dropped.
    let by_lot = ask(&[
        "rates",
        "--dimension",
        "lot",
        "--measure",
        "dropped",
        "--key-file",
        s(&kek),
    ]);
    assert!(by_lot.success, "{}", by_lot.all());
    let lots: Vec<Json> = serde_json::from_str(&by_lot.stdout).expect("JSON rows");
    assert_eq!(lots.len(), 1, "{lots:?}");
    assert_eq!(
        (&lots[0]["value"], &lots[0]["n"], &lots[0]["device_weeks"]),
        (&json!("LOT-C"), &json!(15), &json!(3))
    );
    assert!(
        !out.stdout.contains("pt-"),
        "a subject in the output: {}",
        out.stdout
    );

    // The text table answers too.
    let text = vitalmq_ok(
        bin,
        &[
            "surveil",
            "outliers",
            "--measure",
            "dropped",
            "--data",
            s(&data),
            "--registry",
            s(&registry_file),
            "--key-file",
            s(&kek),
        ],
    );
    assert!(text.stdout.starts_with("measure"), "{}", text.stdout);
    // Consent is judged by the registry: none given, no answer; no other purpose.
    for extra in [
        &[][..],
        &["--registry", s(&registry_file), "--purpose", "research"][..],
    ] {
        let mut args = vec![
            "surveil",
            "rates",
            "--data",
            s(&data),
            "--key-file",
            s(&kek),
        ];
        args.extend_from_slice(extra);
        let out = run(
            Command::new(bin)
                .args(&args)
                .env("VITALMQ_OPERATOR_AUDIT", &audit),
            Duration::from_secs(20),
        );
        assert!(!out.success, "{args:?}: {}", out.all());
    }

    // PSI of the score between versions, from the store's (sealed) scores table.
    let psi = |compare: &str| -> Json {
        let out = ask(&[
            "psi-score",
            "--reference-version",
            "1.0.0",
            "--compare-version",
            compare,
            "--key-file",
            s(&kek),
        ]);
        assert!(out.success, "{}", out.all());
        let rows: Vec<Json> = serde_json::from_str(&out.stdout).expect("JSON rows");
        rows[0].clone()
    };
    let same = psi("1.0.0");
    assert_eq!(
        (&same["reference_n"], &same["compare_n"]),
        (&json!(4), &json!(4)),
        "complete scores only: {same}"
    );
    assert_eq!(same["psi"].as_f64(), Some(0.0), "{same}");
    let shifted = psi("1.1.0");
    assert_eq!(shifted["compare_n"], 4, "{shifted}");
    assert!(
        shifted["psi"].as_f64().expect("psi") > 0.25,
        "the candidate scores two points higher: {shifted}"
    );
    let refused = ask(&[
        "psi-score",
        "--reference-version",
        "1.0.0",
        "--compare-version",
        "1.1.0",
    ]);
    assert!(
        !refused.success,
        "sealed scores read without keys: {}",
        refused.all()
    );

    // Audited: what was asked, how many rows, never a value or a subject.
    let log = std::fs::read_to_string(&audit).expect("operator audit log");
    let records: Vec<Json> = log
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let asked: Vec<&Json> = records
        .iter()
        .filter(|r| r.to_string().contains("surveil.rates"))
        .collect();
    assert!(asked.len() >= 4, "started and outcome of both runs: {log}");
    assert!(
        log.contains("\"purpose\":\"surveillance\"") && log.contains("\"dimension\":\"week\""),
        "{log}"
    );
    assert!(
        log.contains("\"withheld\":{") && log.contains("no_consent"),
        "withheld counts audited: {log}"
    );
    assert!(!log.contains("pt-") && !log.contains("dev-a"), "{log}");
}
