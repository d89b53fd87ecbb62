//! Clinical alerts end to end (issue 5, SPEC section 5): a scripted desaturation,
//! signed with the device's key (device clock set per reading) and published by the
//! device through the real broker, reaches the real bridge; the alert goes out on
//! `alerts/{site}/{severity}/{device}` to an integrator of that site (mosquitto_sub,
//! software nobody here wrote) and to a signed webhook received by an HTTP server
//! started here; an integrator of the other site gets nothing. The bridge is killed
//! with `kill -9` in the middle of the episode: the open alert is neither lost nor
//! raised twice.

mod common;

use std::time::Duration;

use common::webhook::{Received, webhook_receiver};
use common::{
    Rig, Spawned, audit_records, desaturation, has_fields, recent_device_time_origin, vitalmq_ok,
    wait_until,
};
use serde_json::Value as Json;

/// The webhook's secrets during a key rotation, newest first (Standard Webhooks keys:
/// `whsec_` + base64 of 32 bytes), as the bridge's environment variable holds them.
const NEW_SECRET: &str = "whsec_bmV3LWtleS1uZXcta2V5LW5ldy1rZXktbmV3LWtleS0=";
const OLD_SECRET: &str = "whsec_b2xkLWtleS1vbGQta2V5LW9sZC1rZXktb2xkLWtleS0=";
const SECRETS: &str = concat!(
    "whsec_bmV3LWtleS1uZXcta2V5LW5ldy1rZXktbmV3LWtleS0=",
    " ",
    "whsec_b2xkLWtleS1vbGQta2V5LW9sZC1rZXktb2xkLWtleS0="
);

/// Verifies the captured requests with the Standard Webhooks reference library for
/// Python (`tests/py/webhook_verify.py`) under each of `secrets`: now, and as if replayed
/// `later_s` seconds after signing. Per secret: (verdicts now, verdicts later).
fn standard_webhooks_verdicts(
    secrets: &[&str],
    hooks: &[Received],
    later_s: u64,
) -> Vec<(Vec<String>, Vec<String>)> {
    use base64::Engine as _;
    let requests: Vec<Json> = hooks
        .iter()
        .map(|r| {
            serde_json::json!({
                "headers": r.headers.iter().map(|(k, v)| (k.clone(), Json::from(v.as_str()))).collect::<serde_json::Map<String, Json>>(),
                "body_b64": base64::engine::general_purpose::STANDARD.encode(&r.body),
            })
        })
        .collect();
    let job = serde_json::json!({ "secrets": secrets, "later_s": later_s, "requests": requests });
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/webhook_verify.py");
    let ran = common::run_with_input(
        std::process::Command::new("python3").arg(script),
        Some(job.to_string().as_bytes()),
        Duration::from_secs(60),
    );
    assert!(
        ran.success,
        "the Standard Webhooks verifier failed (scripts/test installs standardwebhooks):\n{}",
        ran.all()
    );
    let out: Json = serde_json::from_str(ran.stdout.trim()).expect("verifier JSON");
    let list = |v: &Json| -> Vec<String> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_str().expect("verdict").to_owned())
            .collect()
    };
    (0..secrets.len())
        .map(|i| {
            let r = &out[i.to_string()];
            (list(&r["now"]), list(&r["later"]))
        })
        .collect()
}

/// `vitalmq bridge` with `config`, the webhook's secrets in its environment.
fn start_alerting_bridge(rig: &Rig, config: &str) -> common::BridgeProcess {
    common::BridgeProcess::start_with_env(
        vitalmq_bin!(),
        rig.dir(),
        config,
        &[("VITALMQ_TEST_WEBHOOK_SECRET", SECRETS)],
        Duration::from_secs(30),
    )
}

fn alerts_config(webhook_port: u16) -> String {
    let rules =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/examples/rules.toml");
    format!(
        r#"[alerts]
rules = "{}"
publisher = {{ client_id = "bridge-01-alerts", cert = "pki/identities/bridge/bridge-01-alerts.pem", key = "pki/identities/bridge/bridge-01-alerts.key.pem" }}
webhooks = [{{ name = "ehr", url = "http://127.0.0.1:{webhook_port}/alerts", secret_env = "VITALMQ_TEST_WEBHOOK_SECRET" }}]
"#,
        rules.display()
    )
}

/// Alert handlers of [`alerts_config`]: the MQTT publisher and one webhook.
const HANDLERS: [&str; 2] = ["mqtt", "webhook:ehr"];
const INT_SITE_01: &str = "spiffe://demo.vitalmq/integrator/int-site-01";
const INT_SITE_02: &str = "spiffe://demo.vitalmq/integrator/int-site-02";

/// Waits until each alert handler has delivered every alert the bridge stored (MQTT:
/// the broker acknowledged it; the webhook: the receiver answered 200, after recording
/// the request): the bridge sends nothing more for what it has seen.
fn wait_alerts_delivered(rig: &Rig) {
    wait_until(
        Duration::from_secs(30),
        "every stored alert delivered by every handler",
        || {
            let head = rig
                .rows("alerts")
                .iter()
                .filter_map(|a| a["position"].as_i64())
                .max();
            let st = rig.stats();
            HANDLERS
                .iter()
                .all(|h| st["alert_handlers"][h].as_i64() == head)
        },
    );
}

/// Waits until `sub` (connected as `identity`) printed every alert the broker audited
/// as delivered to it; the broker audits a delivery before it writes it out.
fn wait_received_all_delivered(rig: &Rig, sub: &Spawned, identity: &str) {
    let log = rig.dir().join("broker-audit.jsonl");
    let delivered = || {
        audit_records(&log)
            .iter()
            .filter(|r| {
                has_fields(
                    r,
                    &[("/event", "alert_delivered"), ("/actor/identity", identity)],
                )
            })
            .count()
    };
    wait_until(
        Duration::from_secs(30),
        &format!("{identity} received every alert the broker delivered to it"),
        || received_alerts(sub).len() == delivered(),
    );
}

fn received_alerts(sub: &Spawned) -> Vec<(String, Json)> {
    sub.stdout()
        .lines()
        .filter_map(|l| {
            let (topic, payload) = l.split_once(' ')?;
            Some((topic.to_owned(), serde_json::from_str(payload).ok()?))
        })
        .collect()
}

#[test]
fn a_desaturation_reaches_its_sites_integrator_and_the_webhook_once_through_a_crash() {
    let rig = Rig::start(vitalmq_bin!(), "alerts-e2e", 4, |_| {});
    // The receiver is down for its first two requests: the alert is retried, not lost.
    let (port, webhook) = webhook_receiver(2);
    let own_site = rig.mosquitto_sub("integrator", "int-site-01", "alerts/site-01/#");
    let other_site = rig.mosquitto_sub("integrator", "int-site-02", "alerts/site-02/#");
    let config = common::BridgeProcess::config_with(rig.broker.port, "", "") + &alerts_config(port);
    let start = |rig: &Rig| start_alerting_bridge(rig, &config);
    let mut bridge = start(&rig);
    let t0_ms = recent_device_time_origin();
    let trajectory = desaturation();
    let key = rig.pki().join("devices/dev-00001/cose.key.pem");
    let out = rig.dir().join("reading.cbor");
    let publish = |seq: usize, t_s: u64, spo2: f64| {
        vitalmq_ok(
            vitalmq_bin!(),
            &[
                "envelope",
                "sign",
                "--key",
                key.to_str().expect("utf-8"),
                "--dev",
                "dev-00001",
                "--epoch",
                "1",
                "--seq",
                &seq.to_string(),
                "--ts",
                &(t0_ms + t_s * 1000).to_string(),
                "--m",
                &format!("spo2={spo2}"),
                "--m",
                "pulse=72",
                "--q",
                "0.95",
                "--fw",
                "5.12.1",
                "--output",
                out.to_str().expect("utf-8"),
            ],
        );
        let bytes = std::fs::read(&out).expect("signed");
        rig.mosquitto_pub("device", "dev-00001", "devices/dev-00001/telemetry", &bytes);
    };
    let spo2_low = |alerts: &[(String, Json)]| -> Vec<(String, Json)> {
        alerts
            .iter()
            .filter(|(_, a)| a["rule"] == "spo2-low")
            .cloned()
            .collect()
    };
    // Up to the open alert, then a crash.
    let crash_at = trajectory
        .iter()
        .position(|(t, _)| *t >= 160)
        .expect("crash point");
    for (seq, (t, v)) in trajectory.iter().enumerate().take(crash_at) {
        publish(seq, *t, *v);
    }
    assert!(
        own_site.wait_output(Duration::from_secs(20), |o| o.contains("\"spo2-low\"")),
        "no spo2-low alert at the integrator:\n{}\nbridge:\n{}\nstored alerts: {:?}\nstats: {}\nevents: {:?}",
        own_site.all(),
        bridge.process.all(),
        rig.rows("alerts"),
        rig.stats(),
        rig.rows("events").iter().take(3).collect::<Vec<_>>()
    );
    bridge.process.kill9();
    let _bridge = start(&rig);
    for (seq, (t, v)) in trajectory.iter().enumerate().skip(crash_at) {
        publish(seq, *t, *v);
    }
    assert!(
        own_site.wait_output(Duration::from_secs(20), |o| o.contains("\"resolved\"")),
        "no resolution:\n{}",
        own_site.all()
    );
    // Nothing more is on its way: every handler is through the outbox, and each
    // integrator printed what the broker handed it.
    wait_alerts_delivered(&rig);
    wait_received_all_delivered(&rig, &own_site, INT_SITE_01);
    wait_received_all_delivered(&rig, &other_site, INT_SITE_02);

    let got = spo2_low(&received_alerts(&own_site));
    let states: Vec<&str> = got
        .iter()
        .map(|(_, a)| a["state"].as_str().expect("state"))
        .collect();
    assert_eq!(
        states,
        ["open", "escalated", "resolved"],
        "exactly one episode: {got:?}"
    );
    let id = &got[0].1["alert_id"];
    for (topic, a) in &got {
        assert_eq!(&a["alert_id"], id, "one alert id for the episode");
        assert_eq!(a["kind"], "clinical");
        assert_eq!(a["device"], "dev-00001");
        assert_eq!(a["site"], "site-01");
        assert_eq!(a["fw"], "5.12.1");
        assert!(a["policy_sha256"].as_str().is_some_and(|h| h.len() == 64));
        assert!(a["evidence"].as_array().is_some_and(|e| !e.is_empty()));
        assert_eq!(
            topic,
            &format!(
                "alerts/site-01/{}/dev-00001",
                a["severity"].as_str().expect("severity")
            )
        );
    }
    assert!(
        received_alerts(&other_site).is_empty(),
        "another site's integrator got: {}",
        other_site.all()
    );

    // The webhook got the same state changes, each signed over its id, timestamp and
    // exact body as Standard Webhooks specifies: the specification's reference library
    // for Python accepts every request under either key of the rotation, and refuses
    // each one replayed ten minutes later. (The webhook handler is through the outbox,
    // above: every request is in.)
    let hooks = webhook.lock().expect("lock").clone();
    let verdicts = standard_webhooks_verdicts(&[NEW_SECRET, OLD_SECRET], &hooks, 600);
    for (now, later) in &verdicts {
        assert!(now.iter().all(|v| v == "ok"), "refused now: {now:?}");
        assert!(
            later.iter().all(|v| v == "Message timestamp too old"),
            "a replay was accepted: {later:?}"
        );
    }
    let stranger = "whsec_c3RyYW5nZXJzdHJhbmdlcnN0cmFuZ2Vyc3RyYW5nZXI=";
    let (forged, _) = &standard_webhooks_verdicts(&[stranger], &hooks, 0)[0];
    assert!(
        forged.iter().all(|v| v == "No matching signature found"),
        "another key verified: {forged:?}"
    );
    let mut hook_states = Vec::new();
    for r in &hooks {
        assert_eq!(
            r.header("webhook-id"),
            r.header("idempotency-key"),
            "one message id per state change, retries included"
        );
        let a: Json = serde_json::from_slice(&r.body).expect("json body");
        assert_eq!(r.header("x-vitalmq-alert-id"), a["alert_id"].as_str());
        if a["rule"] == "spo2-low" {
            hook_states.push((
                a["alert_id"].clone(),
                a["state"].as_str().expect("state").to_owned(),
            ));
        }
    }
    // The refused first attempt was retried with the same idempotency key.
    let keys: Vec<&str> = hooks
        .iter()
        .filter_map(|r| r.header("idempotency-key"))
        .collect();
    assert!(
        keys.len() >= 3 && keys[0] == keys[2],
        "retries keep the key: {keys:?}"
    );
    hook_states.dedup();
    let expected: Vec<(Json, String)> = ["open", "escalated", "resolved"]
        .iter()
        .map(|s| (id.clone(), (*s).to_owned()))
        .collect();
    assert_eq!(hook_states, expected);
    // The broker audited each delivery: which identity was handed which alert state.
    let broker_audit =
        std::fs::read_to_string(rig.dir().join("broker-audit.jsonl")).expect("broker audit");
    let deliveries: Vec<Json> = broker_audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Json>(l).ok())
        .filter(|r| r["event"] == "alert_delivered" && r["resource"] == *id)
        .collect();
    let to: Vec<(&str, &str)> = deliveries
        .iter()
        .map(|r| {
            (
                r["actor"]["identity"].as_str().unwrap_or(""),
                r["reason"].as_str().unwrap_or(""),
            )
        })
        .collect();
    for state in ["open", "escalated", "resolved"] {
        assert!(
            to.contains(&("spiffe://demo.vitalmq/integrator/int-site-01", state)),
            "delivery of {state} to int-site-01 not audited: {to:?}"
        );
    }
    assert!(
        to.iter().all(|(who, _)| !who.contains("int-site-02")),
        "{to:?}"
    );
    vitalmq_ok(
        vitalmq_bin!(),
        &[
            "audit",
            "verify",
            rig.dir()
                .join("broker-audit.jsonl")
                .to_str()
                .expect("utf-8"),
            // The broker is running: its newest records are not signed yet.
            "--allow-unsigned-tail",
        ],
    );
    // `vitalmq trace` answers who, what, which version, who saw it, from local records.
    let trace = vitalmq_ok(
        vitalmq_bin!(),
        &[
            "trace",
            id.as_str().expect("id"),
            "--data",
            rig.data().to_str().expect("utf-8"),
            "--broker-audit",
            rig.dir()
                .join("broker-audit.jsonl")
                .to_str()
                .expect("utf-8"),
            "--json",
        ],
    );
    let t: Json = serde_json::from_str(trace.stdout.trim()).expect("trace json");
    assert_eq!(t["device"], "dev-00001");
    assert_eq!(t["fw"], "5.12.1");
    assert_eq!(t["rule"], "spo2-low");
    assert_eq!(t["rule_version"], got[0].1["rule_version"]);
    assert_eq!(t["policy_sha256"], got[0].1["policy_sha256"]);
    let states: Vec<&str> = t["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| c["state"].as_str().expect("state"))
        .collect();
    assert_eq!(states, ["open", "escalated", "resolved"]);
    let evidence = t["evidence"].as_array().expect("evidence");
    assert!(!evidence.is_empty());
    for e in evidence {
        assert_eq!(e["normalized"]["provenance"]["kid"], "dev-00001");
        assert!(
            e["raw"]["sha256"].as_str().is_some_and(|h| h.len() == 64),
            "{e}"
        );
        assert!(
            e["publisher_certificate"]["identity"]
                .as_str()
                .is_some_and(|i| i.ends_with("/device/dev-00001")),
            "{e}"
        );
        assert!(e["publisher_certificate"]["cert_sha256"].is_string(), "{e}");
    }
    let recipients: Vec<&str> = t["recipients"]
        .as_array()
        .expect("recipients")
        .iter()
        .map(|r| r["identity"].as_str().expect("who"))
        .collect();
    assert!(
        recipients.contains(&"spiffe://demo.vitalmq/integrator/int-site-01"),
        "{recipients:?}"
    );
    // The same as text, and an evidence event traced on its own.
    let text = vitalmq_ok(
        vitalmq_bin!(),
        &[
            "trace",
            id.as_str().expect("id"),
            "--data",
            rig.data().to_str().expect("utf-8"),
        ],
    );
    assert!(
        text.stdout.contains("rule spo2-low") && text.stdout.contains("evidence ("),
        "{}",
        text.stdout
    );
    let ev = evidence[0]["event_id"].as_str().expect("event id");
    let one = vitalmq_ok(
        vitalmq_bin!(),
        &[
            "trace",
            ev,
            "--data",
            rig.data().to_str().expect("utf-8"),
            "--json",
        ],
    );
    let one: Json = serde_json::from_str(one.stdout.trim()).expect("event trace");
    assert!(
        one["cited_by_alerts"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["alert_id"] == *id))
    );
    // The store has the alert history too, and the audit log still verifies.
    let stored = rig.rows("alerts");
    assert!(
        stored
            .iter()
            .any(|a| a["alert_id"] == *id && a["state"] == "resolved")
    );
    vitalmq_ok(
        vitalmq_bin!(),
        &[
            "audit",
            "verify",
            rig.data().join("audit.jsonl").to_str().expect("utf-8"),
            // The bridge is running: its newest records are not signed yet.
            "--allow-unsigned-tail",
        ],
    );
}

/// A rule change takes effect without a restart and is audited (old and new SHA-256);
/// a rule file with a mistake is refused with its file and line, and the rules in
/// force stay.
#[test]
fn rule_changes_apply_live_and_a_broken_file_keeps_the_rules_in_force() {
    let rig = Rig::start(vitalmq_bin!(), "alerts-reload", 2, |_| {});
    let rules = rig.dir().join("rules.toml");
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/examples/rules.toml"),
    )
    .expect("shipped rules");
    std::fs::write(&rules, &shipped).expect("rules");
    let (port, _webhook) = webhook_receiver(0);
    let config = common::BridgeProcess::config_with(rig.broker.port, "", "")
        + &alerts_config(port).replace(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("policies/examples/rules.toml")
                .display()
                .to_string(),
            &rules.display().to_string(),
        );
    let bridge = start_alerting_bridge(&rig, &config);
    let audit = rig.data().join("audit.jsonl");
    let audited = |event: &str| -> Vec<Json> {
        std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Json>(l).ok())
            .filter(|r| r["event"] == event)
            .collect()
    };
    let wait = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}:\n{}",
                bridge.process.all()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    // A mistake on line 2 of the file: refused, named, audited.
    let broken = shipped.replacen("version = \"2025-06-01.1\"", "version = 7", 1);
    let line = broken
        .lines()
        .position(|l| l == "version = 7")
        .expect("edited line")
        + 1;
    std::fs::write(&rules, &broken).expect("break the rules");
    wait("the broken rules refused", &|| {
        !audited("policy_rejected").is_empty()
    });
    let rejected = &audited("policy_rejected")[0];
    let error = rejected["details"]["error"].as_str().expect("error text");
    assert!(error.contains(&format!("rules.toml:{line}")), "{error}");
    assert!(bridge.process.all().contains("alert rules refused"));
    // A real change: the spo2-low rule's version moves on.
    std::fs::write(
        &rules,
        shipped.replacen(
            "id = \"spo2-low\"\nversion = \"3\"",
            "id = \"spo2-low\"\nversion = \"4\"",
            1,
        ),
    )
    .expect("change the rules");
    wait("the new rules in force", &|| {
        !audited("policy_reloaded").is_empty()
    });
    let reloaded = &audited("policy_reloaded")[0];
    assert_ne!(
        reloaded["details"]["old_sha256"],
        reloaded["details"]["new_sha256"]
    );
    // An alert raised now carries the new rule version and policy hash.
    let sub = rig.mosquitto_sub("integrator", "int-site-01", "alerts/site-01/#");
    let key = rig.pki().join("devices/dev-00001/cose.key.pem");
    let out = rig.dir().join("reading.cbor");
    let t0_ms = recent_device_time_origin();
    for (seq, spo2) in [97, 88, 87, 86, 86, 86].iter().enumerate() {
        vitalmq_ok(
            vitalmq_bin!(),
            &[
                "envelope",
                "sign",
                "--key",
                key.to_str().expect("utf-8"),
                "--dev",
                "dev-00001",
                "--seq",
                &seq.to_string(),
                "--ts",
                &(t0_ms + seq as u64 * 10_000).to_string(),
                "--m",
                &format!("spo2={spo2}"),
                "--q",
                "0.95",
                "--output",
                out.to_str().expect("utf-8"),
            ],
        );
        rig.mosquitto_pub(
            "device",
            "dev-00001",
            "devices/dev-00001/telemetry",
            &std::fs::read(&out).expect("signed"),
        );
    }
    assert!(
        sub.wait_output(Duration::from_secs(20), |o| o.contains("\"spo2-low\"")),
        "{}",
        sub.all()
    );
    let alert = received_alerts(&sub)
        .into_iter()
        .find(|(_, a)| a["rule"] == "spo2-low")
        .expect("alert")
        .1;
    assert_eq!(alert["rule_version"], "4");
    assert_eq!(alert["policy_sha256"], reloaded["details"]["new_sha256"]);
}

/// The issue's probes through the real broker and bridge, signed with the device's own
/// key: spo2 = 2^64-1 then 80 (which opened `spo2-falling`), -5 and -2^64 (stored as
/// normal readings), a reading dated ten years ahead (which escalated `spo2-low` to
/// urgent at once), `ts` = 0 (observed in 1970) and `ts` = u64::MAX (observed_at null).
/// Every one is stored; the impossible values are marked and raise one sensor-fault
/// operational alert instead of clinical ones; the skewed clocks are marked and
/// observed at reception.
#[test]
fn impossible_readings_and_skewed_clocks_are_stored_marked_and_raise_no_clinical_alert() {
    use std::collections::BTreeMap;
    use std::time::{Instant, SystemTime, UNIX_EPOCH};

    use vitalmq_envelope::{DeviceId, MessageType, Number, SigningKey, Telemetry};

    let rig = Rig::start(vitalmq_bin!(), "alerts-plausible", 2, |_| {});
    let (port, _webhook) = webhook_receiver(0);
    let integrator = rig.mosquitto_sub("integrator", "int-site-01", "alerts/site-01/#");
    let operator = rig.mosquitto_sub("operator", "ops-01", "ops/bridge/sensor_fault");
    let config = common::BridgeProcess::config_with(rig.broker.port, "", "") + &alerts_config(port);
    let bridge = start_alerting_bridge(&rig, &config);
    let pem = std::fs::read_to_string(rig.pki().join("devices/dev-00001/cose.key.pem"))
        .expect("device key");
    let key = SigningKey::from_pkcs8_pem(&pem).expect("key");
    let now = u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_millis(),
    )
    .expect("ms");
    let ten_years_ms = 10 * 365 * 24 * 3600 * 1000;
    // (ts, spo2): what each probe sends.
    let probes: Vec<(u64, Number)> = vec![
        (now, Number::Int(u64::MAX.into())),
        (now + 5_000, Number::Int(80)),
        (now + 10_000, Number::Int(80)),
        (now + 15_000, Number::Int(-5)),
        (now + 20_000, Number::Int(-(1i128 << 64))),
        (now + ten_years_ms, Number::Int(86)),
        (0, Number::Int(86)),
        (u64::MAX, Number::Int(86)),
    ];
    let mut ids = Vec::new();
    for (seq, (ts, spo2)) in probes.iter().enumerate() {
        let t = Telemetry {
            dev: DeviceId::new("dev-00001").expect("id"),
            epoch: 1,
            seq: seq as u64,
            ts: *ts,
            fw: "5.12.1".into(),
            kind: MessageType::Vitals,
            m: Some(BTreeMap::from([
                ("spo2".to_owned(), *spo2),
                ("pulse".to_owned(), Number::Int(72)),
            ])),
            q: Some(0.95),
            model: None,
            schema: None,
            extra: BTreeMap::new(),
        };
        let message = vitalmq_envelope::sign(&t, &key).expect("sign");
        rig.mosquitto_pub(
            "device",
            "dev-00001",
            "devices/dev-00001/telemetry",
            &message,
        );
        ids.push(vitalmq_bridge::normalize::event_id(&t.dev, 1, seq as u64));
    }
    rig.wait_stats(Duration::from_secs(30), "all probes stored", |st| {
        st["events"] == probes.len()
    });
    assert!(
        operator.wait_output(Duration::from_secs(20), |o| o.contains("\"open\"")),
        "no sensor-fault alert:\n{}\nbridge:\n{}",
        operator.all(),
        bridge.process.all()
    );

    let store = vitalmq_bridge::store::Store::open(&rig.data()).expect("store");
    let deadline = Instant::now() + Duration::from_secs(10);
    for (i, id) in ids.iter().enumerate() {
        let detail = loop {
            if let Some(d) = store.event_detail(id).expect("read") {
                break d;
            }
            assert!(Instant::now() < deadline, "event {i} not stored");
            std::thread::sleep(Duration::from_millis(100));
        };
        let event = &detail.normalized;
        let implausible = [0, 3, 4].contains(&i);
        assert_eq!(
            event["implausible"]["spo2"]["unit"].as_str(),
            implausible.then_some("%"),
            "event {i}: {event}"
        );
        let skewed = i >= 5;
        assert_eq!(
            event["clock_skew"]["direction"].as_str().is_some(),
            skewed,
            "event {i}: {event}"
        );
        let observed = event["observed_at"]
            .as_str()
            .expect("observed_at never null");
        assert!(
            observed.starts_with("20") && !observed.starts_with("2036"),
            "{observed}"
        );
        assert_eq!(
            event["ts"],
            serde_json::json!(probes[i].0),
            "the device's ts is kept"
        );
    }

    // No clinical alert at all: not spo2-falling from 2^64-1 to 80, not spo2-low
    // escalated by a reading from 2036. Every probe is stored and every stored alert
    // delivered, and each subscriber printed what the broker handed it.
    wait_alerts_delivered(&rig);
    wait_received_all_delivered(&rig, &integrator, INT_SITE_01);
    wait_received_all_delivered(&rig, &operator, "spiffe://demo.vitalmq/operator/ops-01");
    let clinical = received_alerts(&integrator);
    assert!(clinical.is_empty(), "clinical alerts: {clinical:?}");
    let stored: Vec<Json> = rig.rows("alerts");
    assert!(
        stored.iter().all(|a| a["kind"] == "operational"),
        "{stored:?}"
    );
    let ops: Vec<Json> = operator
        .stdout()
        .lines()
        .filter_map(|l| serde_json::from_str(l.split_once(' ')?.1).ok())
        .collect();
    assert_eq!(
        ops.len(),
        1,
        "one sensor-fault alert for the device: {ops:?}"
    );
    assert_eq!(ops[0]["device"], "dev-00001");
    assert_eq!(ops[0]["metrics"], serde_json::json!(["spo2"]));
    assert!(ops[0].get("patient_ref").is_none());
}

/// `vitalmq trace` prints exactly what it printed before its result became a typed
/// model: alert and event, text and `--json`, with and without the broker audit log,
/// on the committed v1 store (`bridge/tests/fixtures/v1-store.sqlite3`) and a hand-made
/// broker log (`tests/fixtures/trace/broker-audit.jsonl`: a device connecting twice,
/// another without a certificate hash, deliveries of two alerts). The expected output
/// was recorded with the `Value`-built trace; `VITALMQ_BLESS=1` records it anew.
#[test]
fn trace_output_is_pinned_on_the_v1_store() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = common::temp_dir("trace-pinned");
    std::fs::copy(
        root.join("bridge/tests/fixtures/v1-store.sqlite3"),
        dir.path().join(vitalmq_bridge::store::DB_FILE),
    )
    .expect("copy the fixture (opening migrates it)");
    let data = dir.path().to_str().expect("utf-8");
    let fixtures = root.join("tests/fixtures/trace");
    let broker = fixtures.join("broker-audit.jsonl");
    let broker = broker.to_str().expect("utf-8");
    let mut got = String::new();
    for id in [
        "al-0b1526c9cc91269ce6663b8eecb5602b",
        "ev1-83e9288f51274ff1ce42463bb90079ef",
        "ev1-fe55c547609d45b670d813fe9dd63efd",
    ] {
        for flags in [&[][..], &["--json"], &["--broker-audit", broker]] {
            let mut args = vec!["trace", id, "--data", data];
            args.extend_from_slice(flags);
            let shown = flags.first().map_or("", |f| *f);
            got.push_str(&format!("=== trace {id} {shown}\n"));
            got.push_str(&vitalmq_ok(vitalmq_bin!(), &args).stdout);
        }
        let both = [
            "trace",
            id,
            "--data",
            data,
            "--json",
            "--broker-audit",
            broker,
        ];
        got.push_str(&format!("=== trace {id} --json --broker-audit\n"));
        got.push_str(&vitalmq_ok(vitalmq_bin!(), &both).stdout);
    }
    let expected = fixtures.join("v1-store.expected");
    if std::env::var_os("VITALMQ_BLESS").is_some() {
        std::fs::write(&expected, &got).expect("record the expected output");
    }
    let want = std::fs::read_to_string(&expected).expect("expected output");
    for (n, (g, w)) in got.lines().zip(want.lines()).enumerate() {
        assert_eq!(g, w, "line {} of {}", n + 1, expected.display());
    }
    assert_eq!(got, want);
    // An id the store does not hold: exit 1, nothing on stdout.
    let missing = common::run(
        std::process::Command::new(vitalmq_bin!()).args([
            "trace",
            "al-00000000000000000000000000000000",
            "--data",
            data,
        ]),
        Duration::from_secs(20),
    );
    assert_eq!(missing.code, Some(1), "{}", missing.all());
    assert_eq!(missing.stdout, "");
    assert!(
        missing.stderr.contains("not found in"),
        "{}",
        missing.stderr
    );
}
