use std::collections::{BTreeMap, HashMap};

use vitalmq_envelope::{Algorithm, Number, SigningKey};
use vitalmq_policies::{DeviceEntry, SiteId, TrustDomain};

use super::*;

struct Fixture {
    registry: DeviceRegistry,
    keys: HashMap<String, SigningKey>,
    origin: Origin,
}

fn fixture() -> Fixture {
    let mut registry = DeviceRegistry::new(TrustDomain::new("test.vitalmq").expect("td"));
    let mut keys = HashMap::new();
    for (id, alg) in [
        ("dev-00001", Algorithm::EdDsa),
        ("dev-00002", Algorithm::Es256),
    ] {
        let key = SigningKey::generate(alg).expect("key");
        registry
            .insert_device(DeviceEntry {
                id: DeviceId::new(id).expect("id"),
                site: SiteId::new("site-01").expect("site"),
                patient_ref: "pt-7f3a".into(),
                key: key.verifying_key(),
                consent: Some("care".into()),
                processing_policy: None,
                lot: None,
                hardware_model: None,
                region: None,
            })
            .expect("insert");
        keys.insert(id.to_owned(), key);
    }
    Fixture {
        registry,
        keys,
        origin: Origin {
            broker: "127.0.0.1:8883".into(),
            bridge: "spiffe://test.vitalmq/bridge/bridge-01".into(),
        },
    }
}

fn telemetry(dev: &str, epoch: u64, seq: u64, kind: MessageType) -> Telemetry {
    Telemetry {
        dev: DeviceId::new(dev).expect("id"),
        epoch,
        seq,
        ts: 1_718_260_201_000 + seq,
        fw: "5.12.1".into(),
        kind,
        m: (kind == MessageType::Vitals)
            .then(|| BTreeMap::from([("spo2".to_owned(), Number::Int(97))])),
        q: Some(0.9),
        model: None,
        schema: None,
        extra: BTreeMap::new(),
    }
}

impl Fixture {
    fn message(&self, dev: &str, epoch: u64, seq: u64) -> Incoming<u32> {
        self.on_topic(
            dev,
            &format!("devices/{dev}/telemetry"),
            epoch,
            seq,
            MessageType::Vitals,
        )
    }

    fn on_topic(
        &self,
        dev: &str,
        topic: &str,
        epoch: u64,
        seq: u64,
        kind: MessageType,
    ) -> Incoming<u32> {
        let bytes = vitalmq_envelope::sign(&telemetry(dev, epoch, seq, kind), &self.keys[dev])
            .expect("sign");
        Incoming {
            topic: topic.to_owned(),
            payload: Bytes::from(bytes),
            received_at_ms: 1_718_260_202_000,
            token: u32::try_from(seq).unwrap_or(u32::MAX),
        }
    }

    fn run(&self, seq: &mut Sequencer, batch: Vec<Incoming<u32>>) -> Sequenced<u32> {
        let checked = batch
            .into_iter()
            .map(|m| verify(&self.registry, m))
            .collect();
        let mut out = seq.sequence(&self.registry, &self.origin, checked, 1_718_260_202_000);
        seq.adopt(&mut out);
        out
    }
}

fn sequencer() -> Sequencer {
    Sequencer::new(
        WindowSize::default(),
        HashMap::new(),
        HashMap::new(),
        HashMap::new(),
        None,
    )
}

#[test]
fn accepted_messages_become_events_and_repeats_do_not() {
    let f = fixture();
    let mut s = sequencer();
    let out = f.run(
        &mut s,
        vec![
            f.message("dev-00001", 1, 0),
            f.message("dev-00001", 1, 1),
            f.message("dev-00001", 1, 1),
        ],
    );
    assert_eq!(out.commit.events.len(), 2);
    assert_eq!(
        out.dispositions.len(),
        3,
        "every message gets a disposition (and an ack)"
    );
    assert!(matches!(
        out.dispositions[2].0,
        Disposition::Rejected {
            why: Rejected::Duplicate,
            ..
        }
    ));
    assert_eq!(
        out.commit.counters,
        vec![("dev-00001".to_owned(), "duplicate", 1)]
    );
    let event: serde_json::Value =
        serde_json::from_str(out.commit.events[1].normalized_json()).expect("json");
    assert_eq!(
        event["event_id"],
        crate::normalize::event_id(&DeviceId::new("dev-00001").expect("id"), 1, 1)
    );
    assert_eq!(event["site"], "site-01");
    assert_eq!(event["patient_ref"], "pt-7f3a");
    assert_eq!(event["provenance"]["consent"], "care");
    assert_eq!(event["provenance"]["sequence"], "in_order");
    assert_eq!(event["provenance"]["alg"], "EdDSA");
    assert_eq!(event["m"]["spo2"], 97);
    assert_eq!(
        s.receipt(&DeviceId::new("dev-00001").expect("id")),
        Some(ReceiptPoint { epoch: 1, seq: 1 })
    );
    // The next batch sees the adopted state: seq 0 and 1 are duplicates now.
    let again = f.run(&mut s, vec![f.message("dev-00001", 1, 0)]);
    assert!(again.commit.events.is_empty());
}

#[test]
fn state_is_not_adopted_until_the_caller_says_it_is_durable() {
    let f = fixture();
    let s = sequencer();
    let checked = vec![verify(&f.registry, f.message("dev-00002", 4, 10))];
    let staged = s.sequence(&f.registry, &f.origin, checked, 0);
    assert_eq!(staged.commit.events.len(), 1);
    // Not adopted (the commit "failed"): the same message is still new.
    let checked = vec![verify(&f.registry, f.message("dev-00002", 4, 10))];
    let retry = s.sequence(&f.registry, &f.origin, checked, 0);
    assert_eq!(retry.commit.events.len(), 1);
    assert_eq!(s.receipt(&DeviceId::new("dev-00002").expect("id")), None);
}

#[test]
fn refusals_are_quarantined_with_their_class_and_never_move_the_window() {
    let f = fixture();
    let mut s = sequencer();
    let mut forged = f.message("dev-00001", 9, 0);
    let mut bytes = forged.payload.to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    forged.payload = Bytes::from(bytes);
    let wrong_topic = f.on_topic(
        "dev-00001",
        "devices/dev-00002/telemetry",
        1,
        0,
        MessageType::Vitals,
    );
    let status_on_telemetry = f.on_topic(
        "dev-00001",
        "devices/dev-00001/telemetry",
        1,
        0,
        MessageType::Status,
    );
    let not_a_device_topic = f.on_topic(
        "dev-00001",
        "devices/dev-00001/config",
        1,
        0,
        MessageType::Vitals,
    );
    let out = f.run(
        &mut s,
        vec![forged, wrong_topic, status_on_telemetry, not_a_device_topic],
    );
    let reasons: Vec<&str> = out
        .commit
        .quarantine
        .iter()
        .map(|q| q.reason.as_str())
        .collect();
    assert_eq!(
        reasons,
        [
            "bad_signature",
            "kid_mismatch",
            "payload_schema",
            "malformed"
        ]
    );
    assert!(out.commit.events.is_empty());
    assert!(out.commit.sequences.is_empty(), "no window moved");
    assert_eq!(out.dispositions.len(), 4);
    // The forged epoch-9 message did not reset anything: epoch 1 is still fresh.
    let ok = f.run(&mut s, vec![f.message("dev-00001", 1, 0)]);
    assert_eq!(ok.commit.events.len(), 1);
}

#[test]
fn gaps_open_fill_and_are_lost_on_a_new_epoch() {
    let f = fixture();
    let mut s = sequencer();
    let out = f.run(
        &mut s,
        vec![
            f.message("dev-00001", 1, 0),
            f.message("dev-00001", 1, 4),
            f.message("dev-00001", 1, 2),
        ],
    );
    let states: Vec<(u64, u64, u64, &str)> = out
        .gaps()
        .iter()
        .map(|(_, g)| (g.first, g.last, g.filled, g.state.as_str()))
        .collect();
    assert_eq!(states, [(1, 3, 0, "open"), (1, 3, 1, "open")]);
    let out = f.run(&mut s, vec![f.message("dev-00001", 2, 0)]);
    let lost: Vec<(u64, u64, &str)> = out
        .gaps()
        .iter()
        .map(|(_, g)| (g.epoch, g.unfilled(), g.state.as_str()))
        .collect();
    assert_eq!(lost, [(1, 2, "lost")]);
}

#[test]
fn status_messages_share_the_device_sequence() {
    let f = fixture();
    let mut s = sequencer();
    let out = f.run(
        &mut s,
        vec![
            f.message("dev-00001", 1, 0),
            f.on_topic(
                "dev-00001",
                "devices/dev-00001/status",
                1,
                1,
                MessageType::Status,
            ),
            f.on_topic(
                "dev-00001",
                "devices/dev-00001/status",
                1,
                1,
                MessageType::Status,
            ),
        ],
    );
    assert_eq!(out.commit.events.len(), 2);
    assert!(matches!(
        out.dispositions[2].0,
        Disposition::Rejected { .. }
    ));
}

#[test]
fn accepted_vitals_run_through_the_alert_engine_and_stage_its_state() {
    let f = fixture();
    let rules_path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/examples/rules.toml");
    let rules = Arc::new(RuleSet::load(&rules_path).expect("example rules"));
    let mut s = Sequencer::new(
        WindowSize::default(),
        HashMap::new(),
        HashMap::new(),
        HashMap::new(),
        Some(rules),
    );
    let t0 = 1_767_225_600_000u64;
    let reading = |seq: u64, t_s: u64, spo2: i128| {
        let mut t = telemetry("dev-00001", 1, seq, MessageType::Vitals);
        t.ts = t0 + t_s * 1000;
        t.m = Some(BTreeMap::from([
            ("spo2".to_owned(), Number::Int(spo2)),
            ("pulse".to_owned(), Number::Int(72)),
        ]));
        let bytes = vitalmq_envelope::sign(&t, &f.keys["dev-00001"]).expect("sign");
        Incoming {
            topic: "devices/dev-00001/telemetry".to_owned(),
            payload: Bytes::from(bytes),
            received_at_ms: t0,
            token: 0u32,
        }
    };
    let values = [97, 97, 97, 97, 97, 97, 97, 89, 88, 87, 86, 86, 86];
    // One message per batch, as at low rates: the state carries over through adopt().
    let mut raised = Vec::new();
    for (i, v) in values.iter().enumerate() {
        let out = f.run(&mut s, vec![reading(i as u64, i as u64 * 10, *v)]);
        assert_eq!(
            out.commit.alert_states.len(),
            1,
            "the device's alert state is written with the batch"
        );
        raised.extend(
            out.commit
                .alerts
                .iter()
                .map(|a| (a.rule.clone().unwrap_or_default(), a.state.clone())),
        );
    }
    assert!(
        raised.contains(&("spo2-low".to_owned(), "open".to_owned())),
        "{raised:?}"
    );
}

fn example_sequencer() -> Sequencer {
    let rules_path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/examples/rules.toml");
    let rules = Arc::new(RuleSet::load(&rules_path).expect("example rules"));
    Sequencer::new(
        WindowSize::default(),
        HashMap::new(),
        HashMap::new(),
        HashMap::new(),
        Some(rules),
    )
}

/// One signed spo2 reading of dev-00001 with device time `ts`, received at `received`.
fn spo2_reading(f: &Fixture, seq: u64, ts: u64, received: u64, spo2: Number) -> Incoming<u32> {
    let mut t = telemetry("dev-00001", 1, seq, MessageType::Vitals);
    t.ts = ts;
    t.q = Some(0.95);
    t.m = Some(BTreeMap::from([
        ("spo2".to_owned(), spo2),
        ("pulse".to_owned(), Number::Int(72)),
    ]));
    let bytes = vitalmq_envelope::sign(&t, &f.keys["dev-00001"]).expect("sign");
    Incoming {
        topic: "devices/dev-00001/telemetry".to_owned(),
        payload: Bytes::from(bytes),
        received_at_ms: received,
        token: u32::try_from(seq).expect("small"),
    }
}

/// (topic, state) of every alert change in the batch.
fn alert_changes(out: &Sequenced<u32>) -> Vec<(String, String)> {
    out.commit
        .alerts
        .iter()
        .map(|a| (a.topic.clone(), a.state.clone()))
        .collect()
}

/// The probes: spo2 = 2^64-1 then 80 opened `spo2-falling` with a measured fall
/// of 1.8e19; -5 and -2^64 were stored as normal readings. Now each is stored, marked
/// implausible, kept from the rules, and the device gets one sensor-fault alert that
/// resolves after `resolve_after` clean readings.
#[test]
fn implausible_values_are_stored_marked_and_never_reach_the_clinical_rules() {
    let f = fixture();
    let mut s = example_sequencer();
    let t0 = 1_767_225_600_000u64;
    let values = [
        Number::Int(u64::MAX.into()),
        Number::Int(80),
        Number::Int(80),
        Number::Int(-5),
        Number::Int(-(1i128 << 64)),
    ];
    let mut changes = Vec::new();
    let mut events = Vec::new();
    for (i, v) in values.into_iter().enumerate() {
        let ts = t0 + i as u64 * 5000;
        let out = f.run(&mut s, vec![spo2_reading(&f, i as u64, ts, ts, v)]);
        changes.extend(alert_changes(&out));
        events.extend(
            out.commit
                .events
                .iter()
                .map(|e| e.normalized_json().to_owned()),
        );
    }
    assert_eq!(events.len(), 5, "every reading is stored");
    for (i, e) in events.iter().enumerate() {
        let e: serde_json::Value = serde_json::from_str(e).expect("json");
        let marked = e.get("implausible").is_some();
        assert_eq!(marked, ![1, 2].contains(&i), "event {i}: {e}");
        if marked {
            assert_eq!(e["implausible"]["spo2"]["unit"], "%", "event {i}");
        }
    }
    assert_eq!(
        changes,
        [("ops/bridge/sensor_fault".to_owned(), "open".to_owned())],
        "no clinical alert, one sensor-fault alert"
    );
    // Five clean readings resolve it, with the count of implausible readings.
    let mut resolved = Vec::new();
    for i in 5..10u64 {
        let ts = t0 + i * 5000;
        let out = f.run(&mut s, vec![spo2_reading(&f, i, ts, ts, Number::Int(97))]);
        resolved.extend(out.commit.alerts.iter().cloned());
    }
    assert_eq!(resolved.len(), 1, "{resolved:?}");
    assert_eq!(resolved[0].state, "resolved");
    let body: serde_json::Value = serde_json::from_str(&resolved[0].body).expect("json");
    assert_eq!(body["type"], "sensor_fault");
    assert_eq!(body["implausible"], 3);
    assert_eq!(body["metrics"], serde_json::json!(["spo2"]));
    assert!(
        !resolved[0].body.contains("pt-7f3a"),
        "no patient reference"
    );
}

/// The probes: one reading dated ten years ahead escalated `spo2-low` to urgent
/// at once (`raised_at` 2036), `ts` = 0 stored `observed_at` 1970 and `ts` = u64::MAX
/// stored null. Now a skewed reading is marked, observed at its reception, and evaluated
/// then: it neither escalates the open alert nor restarts the device's runs.
#[test]
fn a_skewed_device_clock_cannot_move_the_alert_clock() {
    let f = fixture();
    let mut s = example_sequencer();
    let t0 = 1_767_225_600_000u64;
    let ten_years_ms = 10 * 365 * 24 * 3600 * 1000;
    let mut changes = Vec::new();
    let mut bodies = Vec::new();
    let mut seq = 0;
    let mut feed = |s: &mut Sequencer, ts: u64, received: u64| {
        let out = f.run(
            s,
            vec![spo2_reading(&f, seq, ts, received, Number::Int(86))],
        );
        seq += 1;
        out
    };
    let mut record = |out: Sequenced<u32>| {
        changes.extend(alert_changes(&out));
        bodies.extend(out.commit.alerts.iter().map(|a| a.body.clone()));
        out.commit.events.into_iter().next().expect("stored")
    };
    for t_s in (0..=60).step_by(10) {
        record(feed(&mut s, t0 + t_s * 1000, t0 + t_s * 1000));
    }
    let mut skewed = Vec::new();
    for ts in [t0 + 70_000 + ten_years_ms, 0, u64::MAX] {
        skewed.push((ts, record(feed(&mut s, ts, t0 + 70_000))));
    }
    // Normal readings go on: no escalation (after_s = 300 has not passed), no reset.
    for t_s in [80, 90] {
        record(feed(&mut s, t0 + t_s * 1000, t0 + t_s * 1000));
    }
    for (ts, event) in skewed {
        assert_eq!(event.observed_at_ms(), t0 + 70_000, "ts {ts}");
        let e: serde_json::Value = serde_json::from_str(event.normalized_json()).expect("json");
        assert_eq!(e["observed_at"], "2026-01-01T00:01:10Z", "ts {ts}");
        assert!(e["clock_skew"]["direction"].is_string(), "ts {ts}: {e}");
    }
    assert_eq!(
        changes,
        [(
            "alerts/site-01/review/dev-00001".to_owned(),
            "open".to_owned()
        )],
        "spo2-low opened once and nothing changed after the skewed readings"
    );
    assert!(
        bodies.iter().all(|b| b.contains("\"raised_at\":\"2026-")),
        "{bodies:?}"
    );
}

/// Issue 19: the event carries the patient and site of the assignment that covered its
/// observed_at, although the bridge processes it after the reassignment.
#[test]
fn a_reading_observed_before_a_reassignment_is_recorded_for_the_earlier_patient() {
    let mut f = fixture();
    let dev = DeviceId::new("dev-00001").expect("id");
    // Readings are observed at 1_718_260_201_000 + seq; the device changes hands at
    // seq 5's instant, before the batch below is processed.
    let switch = 1_718_260_201_005;
    f.registry
        .change_history(&dev, |h| {
            h.reassign(
                switch,
                None,
                "pt-b".into(),
                SiteId::new("site-02").expect("site"),
            )
        })
        .expect("reassigned");
    assert_eq!(f.registry.device(&dev).expect("entry").patient_ref, "pt-b");
    let mut s = sequencer();
    let out = f.run(
        &mut s,
        vec![f.message("dev-00001", 1, 4), f.message("dev-00001", 1, 5)],
    );
    let owner = |i: usize| {
        let e: serde_json::Value =
            serde_json::from_str(out.commit.events[i].normalized_json()).expect("json");
        (e["patient_ref"].clone(), e["site"].clone())
    };
    assert_eq!(owner(0), ("pt-7f3a".into(), "site-01".into()));
    assert_eq!(owner(1), ("pt-b".into(), "site-02".into()));
}

/// Issue 19: a reading observed while no assignment covers the device cannot be
/// attributed; it is quarantined as `unassigned` and does not move the window.
#[test]
fn a_reading_observed_while_unassigned_is_quarantined_and_not_sequenced() {
    let mut f = fixture();
    let dev = DeviceId::new("dev-00001").expect("id");
    f.registry
        .change_history(&dev, |h| h.close(1_718_260_201_003))
        .expect("unassigned");
    let mut s = sequencer();
    let out = f.run(
        &mut s,
        vec![f.message("dev-00001", 1, 2), f.message("dev-00001", 1, 3)],
    );
    assert_eq!(out.commit.events.len(), 1, "seq 2 was still assigned");
    assert_eq!(out.commit.quarantine.len(), 1);
    let q = &out.commit.quarantine[0];
    assert_eq!(q.reason, "unassigned");
    assert!(q.detail.contains("no assignment"), "{}", q.detail);
    assert!(matches!(
        out.dispositions[1].0,
        Disposition::Refused {
            reason: ReasonClass::Unassigned,
            ..
        }
    ));
    assert_eq!(
        out.commit.counters,
        vec![("dev-00001".to_owned(), "unassigned", 1)]
    );
    let highest: Vec<_> = out
        .commit
        .sequences
        .iter()
        .map(|(d, w)| (d.as_str(), w.highest()))
        .collect();
    assert_eq!(
        highest,
        vec![("dev-00001", 2)],
        "the refused reading did not move the window"
    );

    // Retired: refused too, with the reason said.
    f.registry
        .change_history(&dev, |h| {
            h.reassign(
                1_718_260_201_004,
                None,
                "pt-b".into(),
                SiteId::new("site-01").expect("site"),
            )?;
            h.retire(1_718_260_201_006)
        })
        .expect("retired");
    let out = f.run(
        &mut s,
        vec![f.message("dev-00001", 1, 5), f.message("dev-00001", 1, 6)],
    );
    assert_eq!(out.commit.events.len(), 1);
    assert!(out.commit.quarantine[0].detail.contains("retired"));
}

/// With a model registry in force every accepted message's provenance names what its
/// reported model resolved to (and the artifact digest of a registered one); a
/// reloaded registry changes the mark of the next message; without one, no mark.
#[test]
fn reported_models_are_resolved_into_the_provenance() {
    let f = fixture();
    let mut s = sequencer();
    let models = vitalmq_policies::ModelRegistry::parse(
        include_str!("../../../policies/examples/models.toml"),
        std::path::Path::new("models.toml"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let signed = |seq: u64, model: Option<&str>| {
        let mut t = telemetry("dev-00001", 1, seq, MessageType::Vitals);
        t.model = model.map(str::to_owned);
        Incoming {
            topic: "devices/dev-00001/telemetry".to_owned(),
            payload: Bytes::from(vitalmq_envelope::sign(&t, &f.keys["dev-00001"]).expect("sign")),
            received_at_ms: 1_718_260_202_000,
            token: 0u32,
        }
    };
    let marks = |out: &Sequenced<u32>| -> Vec<(String, String)> {
        out.commit
            .events
            .iter()
            .map(|e| {
                let json: serde_json::Value =
                    serde_json::from_str(e.normalized_json()).expect("json");
                let p = &json["provenance"];
                (
                    p["model_status"].as_str().unwrap_or("-").to_owned(),
                    p["model_artifact_sha256"]
                        .as_str()
                        .unwrap_or("-")
                        .chars()
                        .take(8)
                        .collect(),
                )
            })
            .collect()
    };
    let out = f.run(&mut s, vec![signed(0, Some("arrhythmia-net/2.1.0"))]);
    assert_eq!(marks(&out), [("-".to_owned(), "-".to_owned())]);

    s.set_models(Some(Arc::new(models.clone())), 0);
    let out = f.run(
        &mut s,
        vec![
            // the fixture's device has no hardware model: outside 2.1.0's approval
            signed(1, Some("arrhythmia-net/2.1.0")),
            signed(2, Some("arrhythmia-net/2.2.0-rc1")),
            signed(3, Some("arrhythmia-net/2.0.3")),
            signed(4, Some("nobody/1")),
            signed(5, None),
        ],
    );
    let pair = |a: &str, b: &str| (a.to_owned(), b.to_owned());
    assert_eq!(
        marks(&out),
        [
            pair("out_of_cohort", "3b7e4f0c"),
            pair("unapproved", "9c2d5e8f"),
            pair("withdrawn", "1f0e2d3c"),
            pair("unknown", "-"),
            pair("none", "-"),
        ]
    );
    // One operational episode per model needing attention, with its fleet counts.
    let opened: Vec<_> = out
        .ops
        .iter()
        .map(|o| {
            (
                o.kind.as_str(),
                o.state,
                o.details["model"].as_str().unwrap_or("").to_owned(),
                o.details["devices"].as_u64(),
            )
        })
        .collect();
    let op = |m: &str| ("model_unapproved", "open", m.to_owned(), Some(1));
    assert_eq!(
        opened,
        [
            op("arrhythmia-net/2.1.0"),
            op("arrhythmia-net/2.2.0-rc1"),
            op("arrhythmia-net/2.0.3"),
            op("nobody/1"),
        ]
    );
    // Approving 2.1.0 everywhere (a reloaded file) approves the next message.
    let everywhere = include_str!("../../../policies/examples/models.toml").replace(
        "hardware_models = [\"vw-band-2\", \"vw-band-3\"]",
        "hardware_models = []",
    );
    let reloaded =
        vitalmq_policies::ModelRegistry::parse(&everywhere, std::path::Path::new("models.toml"))
            .expect("valid");
    let resolved = s.set_models(Some(Arc::new(reloaded)), 0);
    assert_eq!(
        resolved.len(),
        1,
        "2.1.0 approved for all now: its episode resolves"
    );
    let out = f.run(&mut s, vec![signed(6, Some("arrhythmia-net/2.1.0"))]);
    assert_eq!(marks(&out), [pair("approved", "3b7e4f0c")]);
}
