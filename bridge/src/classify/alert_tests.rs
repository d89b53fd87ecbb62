//! Issue 17 through the sequencer: device alarms, silence, acknowledgements,
//! re-escalation, restart and unrecorded batches. Every time is explicit (the bridge
//! clock is a parameter), so these are the "paused clock" tests of the state machines.

use std::collections::{BTreeMap, HashMap};

use ciborium::value::Value;
use serde_json::Value as Json;
use vitalmq_audit::Event;
use vitalmq_envelope::{Algorithm, Number, SigningKey};
use vitalmq_policies::{DeviceEntry, PrincipalId, SiteId, TrustDomain};

use super::*;

const T0: u64 = 1_718_260_200_000;
const RULES: &str = r#"
format = "vitalmq-rules/v1"
version = "t1"
[quality]
low_below = 0.5
max_low_fraction = 0.5
over_n = 20

[[rules]]
id = "spo2-low"
version = "1"
metric = "spo2"
severity = "review"
kind = "threshold"
below = 90
resolve_at = 92
escalate = { beyond = 85, to = "urgent" }

[acknowledge]
urgent_s = 300
review_s = 1800

[escalation]
levels = [["mqtt"], ["mqtt", "webhook:pager"]]

[silence]
after_s = 300
"#;

struct F {
    registry: DeviceRegistry,
    keys: HashMap<String, SigningKey>,
    origin: Origin,
}

fn fixture() -> F {
    let mut registry = DeviceRegistry::new(TrustDomain::new("test.vitalmq").expect("td"));
    let mut keys = HashMap::new();
    for (id, site) in [
        ("dev-00001", "site-01"),
        ("dev-00002", "site-01"),
        ("dev-00003", "site-02"),
    ] {
        let key = SigningKey::generate(Algorithm::EdDsa).expect("key");
        registry
            .insert_device(DeviceEntry {
                id: DeviceId::new(id).expect("id"),
                site: SiteId::new(site).expect("site"),
                patient_ref: "pt-7f3a".into(),
                key: key.verifying_key(),
                consent: None,
                processing_policy: None,
                lot: None,
                hardware_model: None,
                region: None,
            })
            .expect("insert");
        keys.insert(id.to_owned(), key);
    }
    registry.insert_integrator(
        PrincipalId::new("int-ward").expect("id"),
        SiteId::new("site-01").expect("site"),
    );
    registry.insert_integrator(
        PrincipalId::new("int-other").expect("id"),
        SiteId::new("site-02").expect("site"),
    );
    registry.insert_operator(PrincipalId::new("op-01").expect("id"));
    F {
        registry,
        keys,
        origin: Origin {
            broker: "127.0.0.1:8883".into(),
            bridge: "spiffe://test.vitalmq/bridge/bridge-01".into(),
        },
    }
}

fn rules() -> Arc<RuleSet> {
    Arc::new(RuleSet::parse(RULES, std::path::Path::new("rules.toml")).expect("rules"))
}

fn sequencer() -> Sequencer {
    Sequencer::new(
        WindowSize::default(),
        HashMap::new(),
        HashMap::new(),
        HashMap::new(),
        Some(rules()),
    )
}

/// A message of any type; `extra` carries the SPEC 3.1 keys.
fn msg(
    f: &F,
    dev: &str,
    seq: u64,
    kind: MessageType,
    m: Option<f64>,
    extra: &[(&str, Value)],
    at_ms: u64,
) -> Incoming<u32> {
    let t = Telemetry {
        dev: DeviceId::new(dev).expect("id"),
        epoch: 1,
        seq,
        ts: at_ms,
        fw: "5.12.1".into(),
        kind,
        m: m.map(|v| BTreeMap::from([("spo2".to_owned(), Number::Float(v))])),
        q: None,
        model: (kind == MessageType::Alarm).then(|| "arrhythmia-net/2.1.0".to_owned()),
        schema: None,
        extra: extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
    };
    let topic = match kind {
        MessageType::Status => format!("devices/{dev}/status"),
        _ => format!("devices/{dev}/telemetry"),
    };
    Incoming {
        topic,
        payload: Bytes::from(vitalmq_envelope::sign(&t, &f.keys[dev]).expect("sign")),
        received_at_ms: at_ms,
        token: 0,
    }
}

fn vitals(f: &F, dev: &str, seq: u64, spo2: f64, at: u64) -> Incoming<u32> {
    msg(f, dev, seq, MessageType::Vitals, Some(spo2), &[], at)
}

fn alarm(f: &F, dev: &str, seq: u64, active: bool, at: u64) -> Incoming<u32> {
    alarm_at_level(f, dev, seq, active, at, "urgent")
}

fn alarm_at_level(f: &F, dev: &str, seq: u64, active: bool, at: u64, level: &str) -> Incoming<u32> {
    msg(
        f,
        dev,
        seq,
        MessageType::Alarm,
        None,
        &[
            ("alarm", Value::Text("arrhythmia".into())),
            ("level", Value::Text(level.into())),
            ("active", Value::Bool(active)),
            ("detail", Value::Text("AF suspected".into())),
        ],
        at,
    )
}

fn run(f: &F, s: &mut Sequencer, batch: Vec<Incoming<u32>>, now: u64) -> Sequenced<u32> {
    let checked = batch.into_iter().map(|m| verify(&f.registry, m)).collect();
    let mut out = s.sequence(&f.registry, &f.origin, checked, now);
    s.adopt(&mut out);
    out
}

fn control(f: &F, s: &mut Sequencer, c: Control, now: u64) -> Sequenced<()> {
    let mut out = s.control(&f.registry, c, now);
    s.adopt(&mut out);
    out
}

fn tick(f: &F, s: &mut Sequencer, now: u64) -> Sequenced<()> {
    control(f, s, Control::Tick { now_ms: now }, now)
}

fn ack(f: &F, s: &mut Sequencer, site: &str, by: &str, payload: &str, now: u64) -> Sequenced<()> {
    control(
        f,
        s,
        Control::Ack {
            topic: format!("alerts/{site}/ack/{by}"),
            payload: Bytes::from(payload.to_owned()),
            received_at_ms: now,
        },
        now,
    )
}

fn body(a: &NewAlert) -> Json {
    serde_json::from_str(&a.body).expect("alert json")
}

fn presence(f: &F, s: &mut Sequencer, topic: &str, json: &str) {
    control(
        f,
        s,
        Control::Presence {
            topic: topic.into(),
            payload: Bytes::from(json.to_owned()),
            received_at_ms: T0,
        },
        T0,
    );
}

#[test]
fn a_device_alarm_opens_once_and_its_clearing_resolves_it() {
    let f = fixture();
    let mut s = sequencer();
    let out = run(&f, &mut s, vec![alarm(&f, "dev-00001", 0, true, T0)], T0);
    assert_eq!(out.commit.alerts.len(), 1);
    let open = &out.commit.alerts[0];
    let b = body(open);
    assert_eq!(open.state, "open");
    assert_eq!(open.topic, "alerts/site-01/urgent/dev-00001");
    assert_eq!(b["rule"], "device-alarm:arrhythmia");
    assert_eq!(b["severity"], "urgent");
    assert_eq!(b["metric"], Json::Null);
    assert_eq!(b["value"], Json::Null);
    assert_eq!(b["threshold"], Json::Null);
    assert_eq!(b["model"], "arrhythmia-net/2.1.0");
    assert_eq!(b["alarm"]["detail"], "AF suspected");
    assert_eq!(
        b["evidence"][0],
        crate::normalize::event_id(&DeviceId::new("dev-00001").expect("id"), 1, 0)
    );
    let again = run(
        &f,
        &mut s,
        vec![alarm(&f, "dev-00001", 1, true, T0 + 1000)],
        T0 + 1000,
    );
    assert!(again.commit.alerts.is_empty(), "a repeat is not re-sent");
    let clear = run(
        &f,
        &mut s,
        vec![alarm(&f, "dev-00001", 2, false, T0 + 2000)],
        T0 + 2000,
    );
    assert_eq!(clear.commit.alerts.len(), 1);
    assert_eq!(clear.commit.alerts[0].state, "resolved");
    assert_eq!(clear.commit.alerts[0].alert_id, open.alert_id);
    assert_eq!(s.gauges().open_by_severity, [0, 0, 0]);
}

#[test]
fn silence_opens_offline_silent_or_refused_and_data_resolves_it() {
    let f = fixture();
    let mut s = sequencer();
    // Never seen: watched from the first tick.
    let first = tick(&f, &mut s, T0);
    assert!(first.commit.alerts.is_empty());
    assert_eq!(
        first.commit.alert_states.len(),
        3,
        "the watch start is persisted"
    );
    // dev-00002 is connected (its own connection), dev-00003 refused messages.
    presence(
        &f,
        &mut s,
        "presence/broker/boot",
        r#"{"format":"vitalmq-presence/v1","boot":"b1","started_at":"2024-06-13T06:30:00Z"}"#,
    );
    presence(
        &f,
        &mut s,
        "presence/device/dev-00002",
        r#"{"format":"vitalmq-presence/v1","role":"device","id":"dev-00002","connected":true,"boot":"b1","seq":1,"at":"2024-06-13T06:30:01.000Z"}"#,
    );
    let mut forged = vitals(&f, "dev-00003", 0, 97.0, T0 + 1000);
    let mut bytes = forged.payload.to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    forged.payload = Bytes::from(bytes);
    run(&f, &mut s, vec![forged], T0 + 1000);

    assert!(tick(&f, &mut s, T0 + 299_999).commit.alerts.is_empty());
    let due = tick(&f, &mut s, T0 + 300_000);
    let mut by_device: Vec<(String, Json)> = due
        .commit
        .alerts
        .iter()
        .map(|a| (a.device.clone().expect("device"), body(a)))
        .collect();
    by_device.sort_by(|a, b| a.0.cmp(&b.0));
    let reasons: Vec<&str> = by_device
        .iter()
        .map(|(_, b)| b["reason"].as_str().expect("reason"))
        .collect();
    assert_eq!(reasons, ["offline", "silent", "refused"]);
    let (_, refused) = &by_device[2];
    assert_eq!(refused["refusal"], "bad_signature");
    for (_, b) in &by_device {
        assert_eq!(b["rule"], "no-data");
        assert_eq!(b["state"], "open");
        assert_eq!(b["last_seen_at"], Json::Null, "never seen");
        assert_eq!(b["expected_interval_s"], 300);
        assert_eq!(b["metric"], Json::Null);
    }
    let fleet = due
        .ops
        .iter()
        .find(|o| o.kind == crate::ops::OpsKind::NoData)
        .expect("fleet count");
    let fleet_json: Json = serde_json::from_str(&fleet.to_json()).expect("json");
    assert_eq!(fleet_json["count"], 3);
    assert!(fleet_json.get("patient_ref").is_none());
    assert_eq!(s.gauges().silent_devices, 3);
    // Nothing new at the next tick.
    let quiet = tick(&f, &mut s, T0 + 301_000);
    assert!(quiet.writes_nothing(), "{:?}", quiet.commit);

    // Accepted data resolves the device's silence.
    let back = run(
        &f,
        &mut s,
        vec![vitals(&f, "dev-00001", 0, 97.0, T0 + 400_000)],
        T0 + 400_000,
    );
    assert_eq!(back.commit.alerts.len(), 1);
    assert_eq!(back.commit.alerts[0].state, "resolved");
    assert_eq!(body(&back.commit.alerts[0])["rule"], "no-data");
    let count = tick(&f, &mut s, T0 + 401_000);
    let fleet: Json = serde_json::from_str(&count.ops[0].to_json()).expect("json");
    assert_eq!(fleet["count"], 2);
    // The others, urgent and unacknowledged, are re-sent 300 s after they opened.
    let resent = tick(&f, &mut s, T0 + 600_000);
    assert_eq!(resent.commit.alerts.len(), 2);
    for a in &resent.commit.alerts {
        let b = body(a);
        assert_eq!(b["reason"], "unacknowledged");
        assert!(b["silence_reason"] == "silent" || b["silence_reason"] == "refused");
    }
    assert!(
        resent
            .commit
            .alerts
            .iter()
            .all(|a| a.state == "escalated" && a.level == 1)
    );
    // And dev-00001 is watched again from its last message.
    let of_1 = |o: &Sequenced<()>| {
        o.commit
            .alerts
            .iter()
            .filter(|a| a.device.as_deref() == Some("dev-00001"))
            .map(body)
            .collect::<Vec<_>>()
    };
    assert!(of_1(&tick(&f, &mut s, T0 + 699_999)).is_empty());
    let again = of_1(&tick(&f, &mut s, T0 + 700_000));
    assert_eq!(again.len(), 1);
    assert!(again[0]["last_seen_at"].is_string());
}

#[test]
fn a_gateway_of_the_site_makes_a_device_silent_not_offline_and_a_new_boot_forgets_it() {
    let mut f = fixture();
    f.registry.insert_gateway(
        PrincipalId::new("gw-01").expect("id"),
        SiteId::new("site-01").expect("site"),
    );
    let mut s = sequencer();
    tick(&f, &mut s, T0);
    presence(
        &f,
        &mut s,
        "presence/gateway/gw-01",
        r#"{"format":"vitalmq-presence/v1","role":"gateway","id":"gw-01","connected":true,"boot":"b1","seq":4,"at":"x"}"#,
    );
    // An older message of the same boot changes nothing.
    presence(
        &f,
        &mut s,
        "presence/gateway/gw-01",
        r#"{"format":"vitalmq-presence/v1","role":"gateway","id":"gw-01","connected":false,"boot":"b1","seq":3,"at":"x"}"#,
    );
    let due = tick(&f, &mut s, T0 + 300_000);
    let reason = |d: &str| {
        due.commit
            .alerts
            .iter()
            .find(|a| a.device.as_deref() == Some(d))
            .map(|a| body(a)["reason"].clone())
    };
    assert_eq!(reason("dev-00001"), Some(Json::from("silent")));
    assert_eq!(
        reason("dev-00003"),
        Some(Json::from("offline")),
        "another site"
    );
    // After a broker restart nobody is connected until presence says so.
    presence(
        &f,
        &mut s,
        "presence/broker/boot",
        r#"{"format":"vitalmq-presence/v1","boot":"b2","started_at":"x"}"#,
    );
    assert!(!s.presence.device_connected(
        &f.registry,
        "dev-00001",
        &SiteId::new("site-01").expect("site")
    ));
}

/// Opens a review alert (spo2 88) on dev-00001 at T0; returns its id.
fn open_spo2(f: &F, s: &mut Sequencer) -> String {
    let out = run(f, s, vec![vitals(f, "dev-00001", 0, 88.0, T0)], T0);
    let open = out
        .commit
        .alerts
        .iter()
        .find(|a| a.rule.as_deref() == Some("spo2-low"))
        .expect("spo2-low opens");
    assert_eq!(open.level, 0);
    open.alert_id.clone()
}

#[test]
fn an_ack_is_applied_once_and_audited_with_the_acknowledger() {
    let f = fixture();
    let mut s = sequencer();
    let id = open_spo2(&f, &mut s);
    let out = ack(
        &f,
        &mut s,
        "site-01",
        "int-ward",
        &format!(r#"{{"alert_id":"{id}","note":"seen, O2 on"}}"#),
        T0 + 60_000,
    );
    assert_eq!(out.commit.alerts.len(), 1);
    let row = &out.commit.alerts[0];
    assert_eq!(row.state, "acknowledged");
    assert_eq!(row.alert_id, id);
    let b = body(row);
    assert_eq!(b["state"], "acknowledged");
    assert_eq!(b["ack"]["by"], "spiffe://test.vitalmq/integrator/int-ward");
    assert!(b["ack"]["at"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert_eq!(b["rule"], "spo2-low", "the alert as sent, with the ack");
    assert_eq!(out.audit.len(), 1);
    assert_eq!(out.audit[0].event, Event::AlertAcknowledged);
    assert_eq!(
        out.audit[0]
            .actor
            .as_ref()
            .and_then(|a| a.identity.as_deref()),
        Some("spiffe://test.vitalmq/integrator/int-ward")
    );
    assert!(out.ops.is_empty());
    assert_eq!(out.commit.alert_states.len(), 1, "the ack is durable");
    assert_eq!(s.gauges().unacknowledged, 0);

    // An operator's ack of an acknowledged alert is audited, not re-sent.
    let again = ack(
        &f,
        &mut s,
        "site-01",
        "op-01",
        &format!(r#"{{"alert_id":"{id}"}}"#),
        T0 + 61_000,
    );
    assert!(again.commit.alerts.is_empty());
    assert_eq!(
        again.audit[0]
            .actor
            .as_ref()
            .and_then(|a| a.identity.as_deref()),
        Some("spiffe://test.vitalmq/operator/op-01")
    );
    // Acknowledged: never re-escalated for want of an ack.
    assert!(
        tick(&f, &mut s, T0 + 10 * 3_600_000)
            .commit
            .alerts
            .iter()
            .all(|a| a.rule.as_deref() == Some("no-data"))
    );
}

#[test]
fn acks_that_cannot_apply_are_refused_with_an_ops_record_and_audit() {
    let f = fixture();
    let mut s = sequencer();
    let id = open_spo2(&f, &mut s);
    let cases = [
        ("site-01", "int-ward", "{not json".to_owned(), "malformed"),
        (
            "site-01",
            "int-ward",
            format!(r#"{{"alert_id":"{id}","note":"{}"}}"#, "x".repeat(257)),
            "malformed",
        ),
        (
            "site-01",
            "int-ward",
            r#"{"alert_id":"al-nope"}"#.to_owned(),
            "unknown_alert",
        ),
        (
            "site-02",
            "int-other",
            format!(r#"{{"alert_id":"{id}"}}"#),
            "other_site",
        ),
        (
            "site-02",
            "int-ward",
            format!(r#"{{"alert_id":"{id}"}}"#),
            "unknown_acknowledger",
        ),
    ];
    for (site, by, payload, why) in cases {
        let out = ack(&f, &mut s, site, by, &payload, T0 + 1000);
        assert!(out.commit.alerts.is_empty(), "{why}: never applied");
        assert_eq!(out.audit.len(), 1, "{why}");
        assert_eq!(out.audit[0].event, Event::AlertAckRefused);
        assert_eq!(out.audit[0].reason.as_deref(), Some(why));
        assert_eq!(out.ops.len(), 1);
        let o: Json = serde_json::from_str(&out.ops[0].to_json()).expect("json");
        assert_eq!(out.ops[0].topic(), "ops/bridge/ack_refused");
        assert_eq!(o["reason"], why);
        assert!(o.get("patient_ref").is_none() && o.get("device").is_none());
    }
    // Resolved: spo2 back to 95 resolves it; an ack of it is refused as resolved.
    let done = run(
        &f,
        &mut s,
        vec![vitals(&f, "dev-00001", 1, 95.0, T0 + 2000)],
        T0 + 2000,
    );
    assert_eq!(done.commit.alerts[0].state, "resolved");
    let out = ack(
        &f,
        &mut s,
        "site-01",
        "int-ward",
        &format!(r#"{{"alert_id":"{id}"}}"#),
        T0 + 3000,
    );
    assert_eq!(out.audit[0].reason.as_deref(), Some("resolved"));
    assert!(out.commit.alerts.is_empty());
}

#[test]
fn an_unacknowledged_alert_is_re_sent_one_level_higher_and_a_worse_one_needs_a_new_ack() {
    let f = fixture();
    let mut s = sequencer();
    let id = open_spo2(&f, &mut s);
    // Keep the device reporting so silence stays out of the way.
    let keep = |s: &mut Sequencer, seq: u64, at: u64| {
        run(&f, s, vec![vitals(&f, "dev-00001", seq, 89.0, at)], at)
    };
    keep(&mut s, 1, T0 + 200_000);
    tick(&f, &mut s, T0 + 200_001);
    let review_ms = 1_800_000;
    let early = tick(&f, &mut s, T0 + review_ms - 1);
    assert!(early.commit.alerts.iter().all(|a| a.alert_id != id));
    let due = tick(&f, &mut s, T0 + review_ms);
    let row = due
        .commit
        .alerts
        .iter()
        .find(|a| a.alert_id == id)
        .expect("re-sent");
    assert_eq!(row.state, "escalated");
    assert_eq!(row.level, 1);
    let b = body(row);
    assert_eq!(b["reason"], "unacknowledged");
    assert_eq!(b["escalation_level"], 1);
    assert_eq!(b["severity"], "review");
    let r = rules();
    assert_eq!(
        r.handlers_for_level(row.level).map(<[String]>::to_vec),
        Some(vec!["mqtt".to_owned(), "webhook:pager".to_owned()])
    );
    // Ack it; then it gets worse: escalated by the source, the ack is gone.
    let acked = ack(
        &f,
        &mut s,
        "site-01",
        "int-ward",
        &format!(r#"{{"alert_id":"{id}"}}"#),
        T0 + review_ms + 1000,
    );
    assert_eq!(acked.commit.alerts[0].state, "acknowledged");
    assert_eq!(acked.commit.alerts[0].level, 1);
    let worse = run(
        &f,
        &mut s,
        vec![vitals(&f, "dev-00001", 2, 80.0, T0 + review_ms + 2000)],
        T0 + review_ms + 2000,
    );
    let up = worse
        .commit
        .alerts
        .iter()
        .find(|a| a.alert_id == id)
        .expect("escalated");
    assert_eq!(up.state, "escalated");
    assert_eq!(up.level, 1, "the level reached stays");
    let ub = body(up);
    assert_eq!(ub["severity"], "urgent");
    assert!(ub.get("ack").is_none());
    // dev-00002 and dev-00003 went silent meanwhile (urgent, unacknowledged).
    assert_eq!(s.gauges().unacknowledged, 3);
    assert_eq!(s.gauges().open_by_severity, [0, 0, 3]);
    // Urgent now: 300 s later without an ack it goes to level 2.
    keep(&mut s, 3, T0 + review_ms + 200_000);
    let t = T0 + review_ms + 2000 + 300_000;
    let again = tick(&f, &mut s, t);
    let row = again
        .commit
        .alerts
        .iter()
        .find(|a| a.alert_id == id)
        .expect("re-sent");
    assert_eq!((row.state.as_str(), row.level), ("escalated", 2));
    assert_eq!(
        s.gauges().oldest_unacknowledged_urgent_s,
        Some(((t - T0) / 1000) as f64)
    );
}

#[test]
fn state_survives_a_restart_without_re_raising_and_acks_still_find_their_alert() {
    let f = fixture();
    let mut s = sequencer();
    tick(&f, &mut s, T0);
    let id = open_spo2(&f, &mut s);
    let opened = tick(&f, &mut s, T0 + 300_000);
    assert_eq!(opened.commit.alerts.len(), 3, "all three went silent");
    // What the store holds: the last alert state JSON of each device.
    let mut stored: HashMap<DeviceId, DeviceAlertState> = HashMap::new();
    for (d, t) in &s.tracks {
        let json = serde_json::to_string(&t.alerts).expect("json");
        stored.insert(d.clone(), serde_json::from_str(&json).expect("back"));
    }
    let mut restarted = Sequencer::new(
        WindowSize::default(),
        HashMap::new(),
        HashMap::new(),
        stored,
        Some(rules()),
    );
    let after = tick(&f, &mut restarted, T0 + 301_000);
    assert!(
        after
            .commit
            .alerts
            .iter()
            .all(|a| a.rule.as_deref() != Some("no-data")),
        "silence is not raised again"
    );
    assert_eq!(restarted.gauges().silent_devices, 3);
    let out = ack(
        &f,
        &mut restarted,
        "site-01",
        "int-ward",
        &format!(r#"{{"alert_id":"{id}"}}"#),
        T0 + 302_000,
    );
    assert_eq!(out.commit.alerts[0].state, "acknowledged");
}

#[test]
fn an_unrecorded_batch_is_recorded_when_resent_but_alerts_only_once() {
    let f = fixture();
    let mut s = sequencer();
    let batch = || {
        vec![
            vitals(&f, "dev-00001", 0, 88.0, T0),
            alarm(&f, "dev-00002", 0, true, T0),
        ]
    };
    let checked = batch()
        .into_iter()
        .map(|m| verify(&f.registry, m))
        .collect();
    let mut first = s.sequence(&f.registry, &f.origin, checked, T0);
    assert_eq!(first.commit.events.len(), 2);
    assert_eq!(first.commit.alerts.len(), 2);
    // The store could not take it: alerts delivered from memory, state adopted.
    s.adopt_unrecorded(&mut first);
    assert_eq!(s.receipt(&DeviceId::new("dev-00001").expect("id")), None);
    let resent = run(&f, &mut s, batch(), T0 + 5000);
    assert_eq!(resent.commit.events.len(), 2, "recorded when resent");
    assert!(resent.commit.alerts.is_empty(), "never alerted twice");
    assert!(
        s.receipt(&DeviceId::new("dev-00001").expect("id"))
            .is_some()
    );
    assert_eq!(s.gauges().open_by_severity, [0, 1, 1]);
}

#[test]
fn status_reports_low_battery_with_hysteresis_and_dropped_messages() {
    let f = fixture();
    let mut s = sequencer();
    let status = |seq: u64, battery: f64, charging: bool, dropped: u64| {
        msg(
            &f,
            "dev-00001",
            seq,
            MessageType::Status,
            None,
            &[
                ("battery", Value::Float(battery)),
                ("charging", Value::Bool(charging)),
                ("dropped", Value::Integer(dropped.into())),
                ("interval_s", Value::Integer(600.into())),
            ],
            T0 + seq,
        )
    };
    let kinds = |o: &Sequenced<u32>| -> Vec<(&'static str, &'static str)> {
        o.ops.iter().map(|a| (a.kind.as_str(), a.state)).collect()
    };
    let low = run(&f, &mut s, vec![status(0, 0.1, false, 0)], T0);
    assert_eq!(kinds(&low), [("battery", "open")]);
    let j: Json = serde_json::from_str(&low.ops[0].to_json()).expect("json");
    assert!(j.get("patient_ref").is_none());
    assert_eq!(j["device"], "dev-00001");
    assert!(
        kinds(&run(&f, &mut s, vec![status(1, 0.2, false, 0)], T0)).is_empty(),
        "hysteresis"
    );
    let lost = run(&f, &mut s, vec![status(2, 0.2, false, 7)], T0);
    assert_eq!(kinds(&lost), [("dropped", "event")]);
    assert_eq!(
        serde_json::from_str::<Json>(&lost.ops[0].to_json()).expect("json")["increase"],
        7
    );
    assert!(kinds(&run(&f, &mut s, vec![status(3, 0.2, false, 7)], T0)).is_empty());
    assert_eq!(
        kinds(&run(&f, &mut s, vec![status(4, 0.2, true, 7)], T0)),
        [("battery", "resolved")]
    );
    // The reported interval stretches the silence time to 3 x 600 s.
    let track = &s.tracks[&DeviceId::new("dev-00001").expect("id")];
    assert_eq!(track.alerts.silence.interval_s, Some(600));
    assert!(
        tick(&f, &mut s, T0 + 1_799_000)
            .commit
            .alerts
            .iter()
            .all(|a| a.device.as_deref() != Some("dev-00001"))
    );
}

/// The no-data alerts of a tick, by device: `(device, body)`.
fn no_data(o: &Sequenced<()>) -> Vec<(String, Json)> {
    let mut v: Vec<(String, Json)> = o
        .commit
        .alerts
        .iter()
        .filter(|a| a.rule.as_deref() == Some("no-data"))
        .map(|a| (a.device.clone().expect("device"), body(a)))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn change(
    f: &mut F,
    dev: &str,
    c: impl FnOnce(&mut vitalmq_policies::History) -> Result<(), vitalmq_policies::AssignmentError>,
) {
    f.registry
        .change_history(&DeviceId::new(dev).expect("id"), c)
        .expect("registry change");
}

/// Issue 19: an unassigned or retired device is not watched for silence (it is nobody's
/// monitoring any more): its open episode is resolved `unassigned` at the next tick,
/// naming the patient it was about, and nothing opens again, not even while its
/// readings arrive and are refused as `unassigned`.
#[test]
fn an_unassigned_or_retired_device_stops_being_watched_and_its_silence_resolves() {
    let mut f = fixture();
    let mut s = sequencer();
    tick(&f, &mut s, T0);
    let opened = no_data(&tick(&f, &mut s, T0 + 300_000));
    assert_eq!(opened.len(), 3);
    assert!(opened.iter().all(|(_, b)| b["patient_ref"] == "pt-7f3a"));
    assert_eq!(s.gauges().silent_devices, 3);

    change(&mut f, "dev-00001", |h| h.close(T0 + 310_000));
    change(&mut f, "dev-00003", |h| h.retire(T0 + 310_000));
    // Before the next scan (every minute): the open episodes are checked every tick.
    let ended = tick(&f, &mut s, T0 + 311_000);
    let resolved = no_data(&ended);
    let devices: Vec<&str> = resolved.iter().map(|(d, _)| d.as_str()).collect();
    assert_eq!(devices, ["dev-00001", "dev-00003"]);
    for (_, b) in &resolved {
        assert_eq!(b["state"], "resolved");
        assert_eq!(b["reason"], "unassigned");
        assert_eq!(
            b["patient_ref"], "pt-7f3a",
            "the patient the episode was about"
        );
    }
    assert_eq!(s.gauges().silent_devices, 1);
    let fleet = ended
        .ops
        .iter()
        .find(|o| o.kind == crate::ops::OpsKind::NoData)
        .expect("fleet count changed");
    let fleet: Json = serde_json::from_str(&fleet.to_json()).expect("json");
    assert_eq!(fleet["count"], 1);

    // Readings of the unassigned device are refused as `unassigned`...
    let refused = run(
        &f,
        &mut s,
        vec![vitals(&f, "dev-00001", 0, 97.0, T0 + 320_000)],
        T0 + 320_000,
    );
    assert_eq!(refused.commit.quarantine.len(), 1);
    assert_eq!(refused.commit.quarantine[0].reason, "unassigned");
    // ...and open nothing, through scans and past any silence time; the device still
    // assigned is re-sent unacknowledged as before.
    let mut later = Vec::new();
    for n in 1..=20 {
        later.extend(no_data(&tick(&f, &mut s, T0 + 311_000 + n * 60_000)));
    }
    assert!(
        later
            .iter()
            .all(|(d, b)| d == "dev-00002" && b["state"] == "escalated"),
        "{later:?}"
    );

    // A refusal while unassigned (a bad signature) is nobody's: once the device is
    // assigned again its silence opens for the new patient as `offline`, not `refused`.
    let t1 = T0 + 311_000 + 20 * 60_000;
    let mut forged = vitals(&f, "dev-00001", 1, 97.0, t1 + 1_000);
    let mut bytes = forged.payload.to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    forged.payload = Bytes::from(bytes);
    run(&f, &mut s, vec![forged], t1 + 1_000);
    change(&mut f, "dev-00001", |h| {
        h.reassign(
            t1 + 2_000,
            None,
            "pt-next-0001".into(),
            SiteId::new("site-01").expect("site"),
        )
    });
    let watched = t1 + 60_000;
    tick(&f, &mut s, watched);
    let reopened: Vec<Json> = no_data(&tick(&f, &mut s, watched + 300_000))
        .into_iter()
        .filter(|(d, _)| d == "dev-00001")
        .map(|(_, b)| b)
        .collect();
    assert_eq!(reopened.len(), 1, "{reopened:?}");
    assert_eq!(reopened[0]["state"], "open");
    assert_eq!(reopened[0]["patient_ref"], "pt-next-0001");
    assert_eq!(reopened[0]["reason"], "offline");
}

/// Issue 19: a reassigned device is watched under its new assignment from when the
/// bridge sees it, and its silence alert names the new patient and site.
#[test]
fn a_reassigned_device_is_watched_for_its_new_patient() {
    let mut f = fixture();
    let mut s = sequencer();
    tick(&f, &mut s, T0);
    change(&mut f, "dev-00002", |h| {
        h.reassign(
            T0 + 100_000,
            None,
            "pt-new-0001".into(),
            SiteId::new("site-02").expect("site"),
        )
    });
    // dev-00002's old watch (from T0) does not open an alert for anyone at T0 + 300 s:
    // its assignment changed, so the watch starts over.
    let first = no_data(&tick(&f, &mut s, T0 + 300_000));
    let devices: Vec<&str> = first.iter().map(|(d, _)| d.as_str()).collect();
    assert_eq!(devices, ["dev-00001", "dev-00003"]);
    assert!(no_data(&tick(&f, &mut s, T0 + 599_999)).is_empty());
    let renewed = tick(&f, &mut s, T0 + 600_000);
    // (dev-00001 and dev-00003, unacknowledged, are re-sent at the same time.)
    let opened: Vec<(String, Json)> = no_data(&renewed)
        .into_iter()
        .filter(|(d, _)| d == "dev-00002")
        .collect();
    assert_eq!(opened.len(), 1, "{opened:?}");
    let (device, b) = &opened[0];
    assert_eq!(device, "dev-00002");
    assert_eq!(b["state"], "open");
    assert_eq!(b["patient_ref"], "pt-new-0001");
    assert_eq!(b["site"], "site-02");
    let topic = &renewed
        .commit
        .alerts
        .iter()
        .find(|a| a.device.as_deref() == Some("dev-00002"))
        .expect("alert")
        .topic;
    assert!(topic.starts_with("alerts/site-02/"), "{topic}");

    // Reassigned while its silence is open: resolved for the former patient, then
    // watched afresh for the next.
    change(&mut f, "dev-00002", |h| {
        h.reassign(
            T0 + 700_000,
            None,
            "pt-third-001".into(),
            SiteId::new("site-01").expect("site"),
        )
    });
    let ended = no_data(&tick(&f, &mut s, T0 + 700_500));
    let of_2: Vec<&Json> = ended
        .iter()
        .filter(|(d, _)| d == "dev-00002")
        .map(|(_, b)| b)
        .collect();
    assert_eq!(of_2.len(), 1, "{ended:?}");
    assert_eq!(of_2[0]["state"], "resolved");
    assert_eq!(of_2[0]["reason"], "unassigned");
    assert_eq!(of_2[0]["patient_ref"], "pt-new-0001");
    let next = no_data(&tick(&f, &mut s, T0 + 1_000_500));
    let of_2: Vec<&Json> = next
        .iter()
        .filter(|(d, _)| d == "dev-00002")
        .map(|(_, b)| b)
        .collect();
    assert_eq!(of_2.len(), 1, "{next:?}");
    assert_eq!(of_2[0]["state"], "open");
    assert_eq!(of_2[0]["patient_ref"], "pt-third-001");
    assert_eq!(of_2[0]["site"], "site-01");
}

/// A silence episode resolves naming the patient and site it was about: data that
/// arrives after a reassignment (before any tick saw it) resolves it for the former
/// patient, not for the one the registry names now.
#[test]
fn a_resolution_after_a_reassignment_names_the_patient_the_episode_was_about() {
    let mut f = fixture();
    let mut s = sequencer();
    tick(&f, &mut s, T0);
    let opened = no_data(&tick(&f, &mut s, T0 + 300_000));
    let (_, open) = opened
        .iter()
        .find(|(d, _)| d == "dev-00002")
        .expect("dev-00002 silent");
    assert_eq!(
        (&open["patient_ref"], &open["site"]),
        (&serde_json::json!("pt-7f3a"), &serde_json::json!("site-01"))
    );
    change(&mut f, "dev-00002", |h| {
        h.reassign(
            T0 + 310_000,
            None,
            "pt-new-0001".into(),
            SiteId::new("site-02").expect("site"),
        )
    });
    let resumed = run(
        &f,
        &mut s,
        vec![vitals(&f, "dev-00002", 0, 97.0, T0 + 320_000)],
        T0 + 320_000,
    );
    let resolved: Vec<&NewAlert> = resumed
        .commit
        .alerts
        .iter()
        .filter(|a| {
            a.rule.as_deref() == Some("no-data") && a.device.as_deref() == Some("dev-00002")
        })
        .collect();
    assert_eq!(resolved.len(), 1, "{:?}", resumed.commit.alerts);
    let b = body(resolved[0]);
    assert_eq!(b["state"], "resolved");
    assert_eq!(b["alert_id"], open["alert_id"]);
    assert_eq!(
        b["patient_ref"], "pt-7f3a",
        "the patient the episode was about"
    );
    assert_eq!(b["site"], "site-01");
    assert!(
        resolved[0].topic.starts_with("alerts/site-01/"),
        "{}",
        resolved[0].topic
    );
}

/// Silence state saved before episodes kept their patient and site still loads.
#[test]
fn an_episode_saved_without_its_patient_still_loads() {
    let ep: crate::alerts::silence::SilenceEpisode = serde_json::from_str(
        r#"{"alert_id":"al-1","severity":"urgent","reason":"offline","opened_ms":1}"#,
    )
    .expect("old state");
    assert_eq!((ep.patient_ref, ep.site), (None, None));
}

/// With a models file, an alarm of a model not approved for the device is delivered
/// (the default policy) and marked with `model_status`; an approved one is not marked.
#[test]
fn an_alarm_of_an_unapproved_model_is_delivered_marked() {
    let f = fixture();
    let mut s = sequencer();
    let text = include_str!("../../../policies/examples/models.toml");
    let strict = vitalmq_policies::ModelRegistry::parse(text, std::path::Path::new("m.toml"))
        .expect("models");
    // The fixture's devices have no hardware model: 2.1.0 is out of cohort for them.
    let _ = s.set_models(Some(Arc::new(strict)), T0);
    let out = run(&f, &mut s, vec![alarm(&f, "dev-00001", 0, true, T0)], T0);
    assert_eq!(out.commit.alerts.len(), 1);
    assert_eq!(body(&out.commit.alerts[0])["model_status"], "out_of_cohort");
    let everywhere = text.replace(
        "hardware_models = [\"vw-band-2\", \"vw-band-3\"]",
        "hardware_models = []",
    );
    let open = vitalmq_policies::ModelRegistry::parse(&everywhere, std::path::Path::new("m.toml"))
        .expect("models");
    let _ = s.set_models(Some(Arc::new(open)), T0);
    let out = run(
        &f,
        &mut s,
        vec![alarm(&f, "dev-00001", 1, false, T0 + 1000)],
        T0 + 1000,
    );
    assert_eq!(out.commit.alerts.len(), 1);
    assert_eq!(body(&out.commit.alerts[0])["model_status"], Json::Null);
}

/// With `[policy] unapproved_alarms = "withhold"`, an alarm of a model that needs
/// attention (below `urgent`) is stored but raises no alert: audited (`alarm_withheld`, no patient
/// reference) and counted in the model's `model_unapproved` episode; its clear raises
/// nothing either. Once the model is approved, the still-active alarm's next report
/// raises it.
#[test]
fn withhold_stores_and_audits_an_unapproved_models_alarm_without_alerting() {
    let f = fixture();
    let mut s = sequencer();
    let text = include_str!("../../../policies/examples/models.toml").replace(
        "unapproved_alarms = \"deliver\"",
        "unapproved_alarms = \"withhold\"",
    );
    let withhold = vitalmq_policies::ModelRegistry::parse(&text, std::path::Path::new("m.toml"))
        .expect("models");
    // The fixture's devices have no hardware model: 2.1.0 is out of cohort for them.
    let _ = s.set_models(Some(Arc::new(withhold)), T0);
    let out = run(
        &f,
        &mut s,
        vec![alarm_at_level(&f, "dev-00001", 0, true, T0, "review")],
        T0,
    );
    assert_eq!(out.commit.events.len(), 1, "stored like any other event");
    assert!(out.commit.alerts.is_empty(), "no clinical alert");
    assert_eq!(out.audit.len(), 1);
    let r = &out.audit[0];
    assert_eq!(r.event, vitalmq_audit::Event::AlarmWithheld);
    assert_eq!(r.resource.as_deref(), Some("dev-00001"));
    assert_eq!(r.details["code"], "arrhythmia");
    assert_eq!(r.details["level"], "review");
    assert_eq!(r.details["state"], "open");
    assert_eq!(r.details["model"], "arrhythmia-net/2.1.0");
    assert_eq!(r.details["model_status"], "out_of_cohort");
    assert_eq!(
        r.details["event_id"],
        out.commit.events[0].event_id(),
        "names the stored event"
    );
    let line = serde_json::to_string(r).expect("json");
    assert!(!line.contains("pt-7f3a"), "{line}");
    // The episode opened with this message, and is sent again counting the alarm.
    let ops: Vec<_> = out
        .ops
        .iter()
        .filter(|o| o.kind.as_str() == "model_unapproved")
        .collect();
    assert_eq!(ops.len(), 2, "{ops:?}");
    assert_eq!(ops[0].details["withheld_alarms"], 0);
    assert_eq!(ops[1].details["withheld_alarms"], 1);
    assert_eq!(ops[0].alert_id, ops[1].alert_id);

    // A repeat is withheld as nothing (the episode is open), the clear is audited only.
    let out = run(
        &f,
        &mut s,
        vec![
            alarm_at_level(&f, "dev-00001", 1, true, T0 + 1000, "review"),
            alarm_at_level(&f, "dev-00001", 2, false, T0 + 2000, "review"),
        ],
        T0 + 2000,
    );
    assert_eq!(out.commit.events.len(), 2);
    assert!(out.commit.alerts.is_empty(), "the clear raises nothing");
    assert_eq!(out.audit.len(), 1);
    assert_eq!(out.audit[0].details["state"], "resolved");

    // Withheld again, then the model is approved for the device (and the policy still
    // withholds): the active alarm's next report is delivered, unmarked.
    let out = run(
        &f,
        &mut s,
        vec![alarm_at_level(
            &f,
            "dev-00001",
            3,
            true,
            T0 + 3000,
            "review",
        )],
        T0 + 3000,
    );
    assert!(out.commit.alerts.is_empty());
    let everywhere = text.replace(
        "hardware_models = [\"vw-band-2\", \"vw-band-3\"]",
        "hardware_models = []",
    );
    let open = vitalmq_policies::ModelRegistry::parse(&everywhere, std::path::Path::new("m.toml"))
        .expect("models");
    let _ = s.set_models(Some(Arc::new(open)), T0 + 3500);
    let out = run(
        &f,
        &mut s,
        vec![alarm_at_level(
            &f,
            "dev-00001",
            4,
            true,
            T0 + 4000,
            "review",
        )],
        T0 + 4000,
    );
    assert!(out.audit.is_empty());
    assert_eq!(out.commit.alerts.len(), 1, "raised once no longer withheld");
    let b = body(&out.commit.alerts[0]);
    assert_eq!(
        (b["state"].as_str(), b["model_status"].as_str()),
        (Some("open"), None)
    );
    // and its clear resolves it
    let out = run(
        &f,
        &mut s,
        vec![alarm_at_level(
            &f,
            "dev-00001",
            5,
            false,
            T0 + 5000,
            "review",
        )],
        T0 + 5000,
    );
    assert_eq!(out.commit.alerts.len(), 1);
    assert_eq!(body(&out.commit.alerts[0])["state"], "resolved");
}

/// A withheld alarm still open when a reload stops withholding it is raised at the
/// device's next message of any kind (SPEC 3.1 sends `active: true` once), and its
/// clear then resolves it.
#[test]
fn a_withheld_alarm_is_raised_at_the_next_message_once_no_longer_withheld() {
    let f = fixture();
    let mut s = sequencer();
    let text = include_str!("../../../policies/examples/models.toml").replace(
        "unapproved_alarms = \"deliver\"",
        "unapproved_alarms = \"withhold\"",
    );
    let withhold = vitalmq_policies::ModelRegistry::parse(&text, std::path::Path::new("m.toml"))
        .expect("models");
    let _ = s.set_models(Some(Arc::new(withhold)), T0);
    let out = run(
        &f,
        &mut s,
        vec![alarm_at_level(&f, "dev-00001", 0, true, T0, "review")],
        T0,
    );
    assert!(out.commit.alerts.is_empty(), "withheld");
    let everywhere = text.replace(
        "hardware_models = [\"vw-band-2\", \"vw-band-3\"]",
        "hardware_models = []",
    );
    let open = vitalmq_policies::ModelRegistry::parse(&everywhere, std::path::Path::new("m.toml"))
        .expect("models");
    let _ = s.set_models(Some(Arc::new(open)), T0 + 500);
    let out = run(
        &f,
        &mut s,
        vec![vitals(&f, "dev-00001", 1, 97.0, T0 + 1000)],
        T0 + 1000,
    );
    let raised: Vec<Json> = out.commit.alerts.iter().map(body).collect();
    assert_eq!(raised.len(), 1, "{raised:?}");
    assert_eq!(
        (raised[0]["state"].as_str(), raised[0]["rule"].as_str()),
        (Some("open"), Some("device-alarm:arrhythmia"))
    );
    assert_eq!(raised[0]["alarm"]["level"], "review");
    let out = run(
        &f,
        &mut s,
        vec![alarm_at_level(
            &f,
            "dev-00001",
            2,
            false,
            T0 + 2000,
            "review",
        )],
        T0 + 2000,
    );
    assert!(out.audit.is_empty());
    assert_eq!(out.commit.alerts.len(), 1);
    assert_eq!(body(&out.commit.alerts[0])["state"], "resolved");
}

/// An `urgent` alarm is never withheld (SPEC 3.1 sends `active: true` once: withheld, it
/// would be heard only if repeated after approval): delivered, marked, nothing audited.
#[test]
fn withhold_never_withholds_an_urgent_alarm() {
    let f = fixture();
    let mut s = sequencer();
    let text = include_str!("../../../policies/examples/models.toml").replace(
        "unapproved_alarms = \"deliver\"",
        "unapproved_alarms = \"withhold\"",
    );
    let withhold = vitalmq_policies::ModelRegistry::parse(&text, std::path::Path::new("m.toml"))
        .expect("models");
    let _ = s.set_models(Some(Arc::new(withhold)), T0);
    let out = run(&f, &mut s, vec![alarm(&f, "dev-00001", 0, true, T0)], T0);
    assert!(
        out.audit
            .iter()
            .all(|r| r.event != vitalmq_audit::Event::AlarmWithheld),
        "{:?}",
        out.audit
    );
    assert_eq!(out.commit.alerts.len(), 1, "delivered");
    let b = body(&out.commit.alerts[0]);
    assert_eq!(
        (b["state"].as_str(), b["model_status"].as_str()),
        (Some("open"), Some("out_of_cohort"))
    );
}

/// Deliver (the default) with the same model: delivered and marked, nothing audited.
#[test]
fn deliver_raises_the_alarm_marked_and_audits_no_withholding() {
    let f = fixture();
    let mut s = sequencer();
    let text = include_str!("../../../policies/examples/models.toml");
    let models = vitalmq_policies::ModelRegistry::parse(text, std::path::Path::new("m.toml"))
        .expect("models");
    let _ = s.set_models(Some(Arc::new(models)), T0);
    let out = run(&f, &mut s, vec![alarm(&f, "dev-00001", 0, true, T0)], T0);
    assert_eq!(out.commit.alerts.len(), 1);
    assert!(out.audit.is_empty());
    let ops: Vec<_> = out
        .ops
        .iter()
        .filter(|o| o.kind.as_str() == "model_unapproved")
        .collect();
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].details["withheld_alarms"], 0);
}
