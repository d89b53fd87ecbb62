//! The alert path over MQTT 5 (issue 18), through the real broker and bridge, with a
//! stock MQTT 5 client (paho-mqtt, `tests/py/paho_alerts5.py`) as the integrator:
//!
//! - an integrator with a one-hour session (Clean Start 1, Session Expiry Interval
//!   3600, MQTT 5 3.1.2.4 and 3.1.2.11.2) disconnects; alerts of three severities are
//!   raised, the info one with a 2 s expiry (`[alert_expiry]`); once that passed it
//!   reconnects (Clean Start 0) and finds its session (CONNACK session_present 1,
//!   MQTT 5 3.2.2.1.1) with the alerts at the QoS it asked for, the review one's
//!   Message Expiry Interval lowered by the time it waited (MQTT 5 3.3.2.3.3,
//!   MQTT-3.3.2-6), and not the expired info one (MQTT-3.3.2-5); integrators online
//!   at QoS 0 and 2 get every alert at min(published, granted) (MQTT-3.8.4-8);
//! - an integrator online gets each alert with the expiry its severity has, Content
//!   Type `application/json` and Payload Format Indicator 1 (MQTT 5 3.3.2.3.2,
//!   3.3.2.3.9).
//!
//! The first needs the broker to keep MQTT 5 sessions by Session Expiry Interval and to
//! deliver at min(published, granted) QoS (issue 18 points 3 and 4); the second only
//! needs the bridge's MQTT 5 alert publisher.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Rig, Spawned, run, vitalmq_ok};
use serde_json::Value as Json;

/// Three rules on one reading, one per severity, opening on the first reading past the
/// threshold and resolving on the first one back; info alerts expire after `info_s`,
/// review ones after an hour, urgent ones never. Nothing re-sent for want of an
/// acknowledgement and no silence alert while a test runs.
fn rules(dir: &Path, info_s: u64) -> PathBuf {
    let path = dir.join("rules.toml");
    std::fs::write(
        &path,
        format!(
            r#"format = "vitalmq-rules/v1"
version = "issue18-test"

[quality]
low_below = 0.5
max_low_fraction = 0.5
over_n = 20

[[rules]]
id = "spo2-low"
version = "1"
metric = "spo2"
severity = "urgent"
kind = "threshold"
below = 90
resolve_at = 92

[[rules]]
id = "pulse-high"
version = "1"
metric = "pulse"
severity = "review"
kind = "threshold"
above = 120
resolve_at = 110

[[rules]]
id = "temp-high"
version = "1"
metric = "temp"
severity = "info"
kind = "threshold"
at_or_above = 38.0
resolve_at = 37.5

[acknowledge]
urgent_s = 0
review_s = 0
info_s = 0

[silence]
after_s = 3600

[alert_expiry]
info_s = {info_s}
review_s = 3600
"#
        ),
    )
    .expect("write rules");
    path
}

fn start_bridge(rig: &Rig, rules: &Path) -> common::BridgeProcess {
    let config = common::BridgeProcess::config_with(rig.broker.port, "", "")
        + &format!(
            r#"[alerts]
rules = "{}"
publisher = {{ client_id = "bridge-01-alerts", cert = "pki/identities/bridge/bridge-01-alerts.pem", key = "pki/identities/bridge/bridge-01-alerts.key.pem" }}
"#,
            rules.display()
        );
    common::BridgeProcess::start(&rig.bin, rig.dir(), &config, Duration::from_secs(30))
}

/// Another integrator of site-01 (`certs issue`), before the broker reads the registry.
fn issue_integrator(bin: &Path, dir: &Path, id: &str) {
    let pki = dir.join("pki");
    vitalmq_ok(
        bin,
        &[
            "certs",
            "issue",
            "--dir",
            pki.to_str().expect("utf-8"),
            "--role",
            "integrator",
            "--id",
            id,
            "--site",
            "site-01",
        ],
    );
}

/// A reading of dev-00001 (site-01), dated now: `spo2`, pulse and temp as given.
fn reading(rig: &Rig, seq: u64, spo2: u32, pulse: u32, temp: f64) -> Vec<u8> {
    let ts = common::now_ms().to_string();
    let (spo2, pulse, temp) = (
        format!("spo2={spo2}"),
        format!("pulse={pulse}"),
        format!("temp={temp}"),
    );
    rig.sign(
        "dev-00001",
        "dev-00001",
        1,
        seq,
        &[
            "--ts", &ts, "--fw", "5.12.1", "--m", &spo2, "--m", &pulse, "--m", &temp, "--q", "0.95",
        ],
    )
}

fn send(rig: &Rig, message: &[u8]) {
    rig.mosquitto_pub(
        "device",
        "dev-00001",
        "devices/dev-00001/telemetry",
        message,
    );
}

/// The arguments of `tests/py/paho_alerts5.py` for integrator `id` of this rig.
fn paho(rig: &Rig, id: &str, args: &[&str]) -> Command {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/paho_alerts5.py");
    let mut cmd = Command::new("python3");
    cmd.arg("-u")
        .arg(script)
        .args(["--port", &rig.broker.port.to_string(), "--pki"])
        .arg(rig.pki())
        .args(["--id", id])
        .args(args);
    cmd
}

/// The JSON lines the script printed.
fn events(out: &str) -> Vec<Json> {
    out.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn event<'a>(events: &'a [Json], kind: &str) -> Option<&'a Json> {
    events.iter().find(|e| e["event"] == kind)
}

fn messages(events: &[Json]) -> Vec<&Json> {
    events.iter().filter(|e| e["event"] == "message").collect()
}

/// An integrator online until dropped, subscribed to its site's alerts at `qos`.
fn online(rig: &Rig, id: &str, qos: u8) -> Spawned {
    let sub = Spawned::start(&mut paho(
        rig,
        id,
        &[
            "--clean-start",
            "1",
            "--subscribe",
            "alerts/site-01/#",
            "--qos",
            &qos.to_string(),
            "--until",
            "never",
            "--within",
            "300",
        ],
    ));
    let ok = sub.wait_output(Duration::from_secs(20), |out| {
        event(&events(out), "suback").is_some()
    });
    assert!(ok, "{id}: no SUBACK:\n{}", sub.all());
    let got = events(&sub.stdout());
    assert_eq!(
        event(&got, "suback").expect("suback")["reasons"],
        serde_json::json!([qos]),
        "{id} granted QoS {qos}"
    );
    sub
}

/// Waits until `sub` printed a message whose payload satisfies `found`; returns it.
fn wait_message(sub: &Spawned, what: &str, found: impl Fn(&Json) -> bool) -> Json {
    let mut hit = None;
    let ok = common::poll_until(Duration::from_secs(30), Duration::from_millis(100), || {
        hit = messages(&events(&sub.stdout()))
            .into_iter()
            .find(|m| found(m))
            .cloned();
        hit.is_some()
    });
    assert!(ok, "not within 30 s: {what}; got:\n{}", sub.all());
    hit.expect("found")
}

fn alert(rule: &'static str, state: &'static str) -> impl Fn(&Json) -> bool {
    move |m| m["payload"]["rule"] == rule && m["payload"]["state"] == state
}

/// MQTT 5 3.3.2.3.2 and 3.3.2.3.9: what the bridge sets on every alert.
#[track_caller]
fn json_utf8(m: &Json) {
    assert_eq!(m["content_type"], "application/json", "{m}");
    assert_eq!(m["payload_format"], 1, "{m}");
}

/// The proof of the alert path (issue 18): an MQTT 5 integrator with a one-hour
/// session (MQTT 5 3.1.2.11.2 Session Expiry Interval) is away while alerts are raised
/// and gets them on its return (3.2.2.1.1 session_present), at the QoS it asked for
/// (MQTT-3.8.4-8), expired ones excepted (MQTT-3.3.2-5) and with the Message Expiry
/// Interval lowered by the time they waited (MQTT-3.3.2-6).
#[test]
fn an_mqtt5_integrator_away_gets_its_alerts_at_its_qos_without_the_expired_one() {
    let rig = Rig::start(vitalmq_bin!(), "alerts-mqtt5", 2, |dir| {
        for id in ["int-site-01b", "int-site-01c"] {
            issue_integrator(vitalmq_bin!(), dir, id);
        }
    });
    let rules = rules(rig.dir(), 2);
    let _bridge = start_bridge(&rig, &rules);

    // int-site-01 makes its one-hour session, subscribes at QoS 1 and leaves.
    let made = run(
        &mut paho(
            &rig,
            "int-site-01",
            &[
                "--clean-start",
                "1",
                "--session-expiry",
                "3600",
                "--subscribe",
                "alerts/site-01/#",
                "--qos",
                "1",
                "--until",
                "suback",
                "--within",
                "20",
            ],
        ),
        Duration::from_secs(40),
    );
    let got = events(&made.stdout);
    assert!(event(&got, "done").is_some(), "{}", made.all());
    assert_eq!(event(&got, "connack").expect("connack")["rc"], 0);
    assert_eq!(
        event(&got, "suback").expect("suback")["reasons"],
        serde_json::json!([1])
    );
    // Two more of the site's integrators stay online, asking for QoS 0 and QoS 2.
    let qos0 = online(&rig, "int-site-01b", 0);
    let qos2 = online(&rig, "int-site-01c", 2);

    // One reading raises an urgent (SpO2), a review (pulse) and an info (temp) alert.
    send(&rig, &reading(&rig, 0, 85, 130, 38.5));
    for (rule, severity) in [
        ("spo2-low", "urgent"),
        ("pulse-high", "review"),
        ("temp-high", "info"),
    ] {
        let m = wait_message(&qos0, rule, alert(rule, "open"));
        assert_eq!(m["topic"], format!("alerts/site-01/{severity}/dev-00001"));
    }
    // The info alert's 2 s run out: wait until the store says it was made more than
    // 3 s ago (2 s of expiry and a second of the broker's rounding).
    let info_made = rig
        .rows("alerts")
        .iter()
        .find(|a| a["topic"] == "alerts/site-01/info/dev-00001")
        .and_then(|a| a["created_at_ms"].as_u64())
        .unwrap_or_else(|| panic!("no info alert in the store: {:?}", rig.rows("alerts")));
    common::wait_until(Duration::from_secs(30), "the info alert expired", || {
        common::now_ms() > info_made + 3_000
    });
    // Then SpO2 recovers: the urgent alert's `resolved` goes out after the others, so
    // once the returning integrator has it, it has everything that was queued before.
    send(&rig, &reading(&rig, 1, 95, 130, 38.5));
    wait_message(&qos0, "spo2-low resolved", alert("spo2-low", "resolved"));

    // int-site-01 returns.
    let back = run(
        &mut paho(
            &rig,
            "int-site-01",
            &[
                "--clean-start",
                "0",
                "--session-expiry",
                "3600",
                "--until",
                "state=resolved",
                "--within",
                "20",
            ],
        ),
        Duration::from_secs(40),
    );
    let got = events(&back.stdout);
    let connack = event(&got, "connack").unwrap_or_else(|| panic!("{}", back.all()));
    assert_eq!(connack["rc"], 0, "{}", back.all());
    assert_eq!(
        connack["session_present"],
        1,
        "MQTT 5 3.2.2.1.1: the one-hour session is still there:\n{}",
        back.all()
    );
    assert!(
        event(&got, "done").is_some(),
        "the queued alerts and the resolution did not arrive:\n{}",
        back.all()
    );
    let queued = messages(&got);
    let rules_states: Vec<(String, String)> = queued
        .iter()
        .map(|m| {
            (
                m["payload"]["rule"].as_str().unwrap_or("").to_owned(),
                m["payload"]["state"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert!(
        !rules_states.iter().any(|(r, _)| r == "temp-high"),
        "MQTT-3.3.2-5: the expired info alert was delivered: {rules_states:?}"
    );
    for (rule, state) in [
        ("spo2-low", "open"),
        ("pulse-high", "open"),
        ("spo2-low", "resolved"),
    ] {
        assert!(
            rules_states.iter().any(|(r, s)| r == rule && s == state),
            "{rule} {state} missing: {rules_states:?}"
        );
    }
    for m in &queued {
        json_utf8(m);
        assert_eq!(m["qos"], 1, "at the QoS it asked for: {m}");
        match m["payload"]["rule"].as_str() {
            Some("spo2-low") => assert!(m["expiry"].is_null(), "urgent never expires: {m}"),
            _ => {
                // The bridge published it with (almost) 3600 left, and it waited in
                // the session for more than 3 s.
                let left = m["expiry"].as_u64().unwrap_or_else(|| panic!("{m}"));
                assert!(
                    (3000..=3598).contains(&left),
                    "MQTT-3.3.2-6: the expiry is lowered by the time it waited: {m}"
                );
            }
        }
    }

    // The integrators online got every alert, at min(published QoS 1, granted).
    for (sub, qos) in [(&qos0, 0), (&qos2, 1)] {
        wait_message(sub, "spo2-low resolved", alert("spo2-low", "resolved"));
        let all = events(&sub.stdout());
        let live = messages(&all);
        assert_eq!(live.len(), 4, "{}", sub.all());
        for m in live {
            json_utf8(m);
            assert_eq!(m["qos"], qos, "MQTT-3.8.4-8: min(published, granted): {m}");
        }
    }
}

/// What an integrator online sees (MQTT 5 3.3.2.3.3 Message Expiry Interval, 3.3.2.3.2
/// Payload Format Indicator, 3.3.2.3.9 Content Type): every alert as UTF-8 JSON, an
/// info alert with the time its severity's expiry leaves, an urgent one without expiry.
#[test]
fn an_mqtt5_integrator_online_sees_expiry_content_type_and_payload_format() {
    let rig = Rig::start(vitalmq_bin!(), "alerts-mqtt5-online", 2, |_| {});
    let rules = rules(rig.dir(), 600);
    let _bridge = start_bridge(&rig, &rules);
    let sub = online(&rig, "int-site-01", 1);

    send(&rig, &reading(&rig, 0, 85, 100, 38.5));
    let info = wait_message(&sub, "temp-high open", alert("temp-high", "open"));
    let urgent = wait_message(&sub, "spo2-low open", alert("spo2-low", "open"));
    for m in [&info, &urgent] {
        json_utf8(m);
        assert_eq!(m["qos"], 1, "{m}");
    }
    assert_eq!(info["topic"], "alerts/site-01/info/dev-00001");
    let left = info["expiry"]
        .as_u64()
        .unwrap_or_else(|| panic!("no Message Expiry Interval on the info alert: {info}"));
    assert!(
        (590..=600).contains(&left),
        "the policy's 600 s less the moment it took: {info}"
    );
    assert!(
        urgent["expiry"].is_null(),
        "urgent alerts never expire: {urgent}"
    );
}
