//! SPEC v1.1 alerts end to end (issue 17), through the real broker and bridge, with
//! clients nobody here wrote (mosquitto_pub/sub, paho-mqtt):
//!
//! - silence (SPEC 5.1): one device killed mid-stream (`offline`), one connected and
//!   quiet (`silent`), one sending only forged messages (`refused`, with the class), one
//!   never seen since enrolment; resolution when accepted data resumes; a `kill -9` of
//!   the bridge neither forgets a silent device nor raises its alert twice;
//! - device alarms (SPEC 5.1) raised and cleared, acknowledgement (SPEC 5.2) accepted,
//!   refused by the broker's ACL for another site's integrator and by the bridge for an
//!   unknown alert, re-escalation of an unacknowledged alert to a second ("pager")
//!   webhook, through a `kill -9` of the bridge during the open, unacknowledged episode.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::webhook::webhook_receiver;
use common::{Rig, Spawned, audit_records, has_fields, run, vitalmq_ok, wait_until};
use serde_json::Value as Json;

const SECRET: &str = "whsec_bmV3LWtleS1uZXcta2V5LW5ldy1rZXktbmV3LWtleS0=";
const INT_SITE_01: &str = "spiffe://demo.vitalmq/integrator/int-site-01";

/// A rule set for these tests: one urgent SpO2 rule that opens on one reading below 90
/// and resolves on one at 92 or more, urgent alerts to be acknowledged within
/// `ack_urgent_s`, level 1 also paging, and silence after `silence_s`.
fn rules(dir: &Path, ack_urgent_s: u64, silence_s: u64) -> PathBuf {
    let path = dir.join("rules.toml");
    std::fs::write(
        &path,
        format!(
            r#"format = "vitalmq-rules/v1"
version = "issue17-test"

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

[acknowledge]
urgent_s = {ack_urgent_s}
review_s = 1800

[escalation]
levels = [["mqtt", "webhook:ehr"], ["mqtt", "webhook:ehr", "webhook:pager"]]

[silence]
after_s = {silence_s}
"#
        ),
    )
    .expect("write rules");
    path
}

fn bridge_config(rig: &Rig, rules: &Path, ehr: u16, pager: u16) -> String {
    common::BridgeProcess::config_with(rig.broker.port, "", "")
        + &format!(
            r#"[alerts]
rules = "{}"
publisher = {{ client_id = "bridge-01-alerts", cert = "pki/identities/bridge/bridge-01-alerts.pem", key = "pki/identities/bridge/bridge-01-alerts.key.pem" }}
webhooks = [
  {{ name = "ehr", url = "http://127.0.0.1:{ehr}/alerts", secret_env = "VITALMQ_TEST_WEBHOOK_SECRET" }},
  {{ name = "pager", url = "http://127.0.0.1:{pager}/page", secret_env = "VITALMQ_TEST_WEBHOOK_SECRET" }},
]
"#,
            rules.display()
        )
}

fn start_bridge(rig: &Rig, config: &str) -> common::BridgeProcess {
    common::BridgeProcess::start_with_env(
        &rig.bin,
        rig.dir(),
        config,
        &[("VITALMQ_TEST_WEBHOOK_SECRET", SECRET)],
        Duration::from_secs(30),
    )
}

/// A message of epoch 1 for `device`, dated now, signed with `key_of`'s key (another
/// device's key forges it); `args` are the payload flags.
fn sign(rig: &Rig, device: &str, key_of: &str, seq: u64, args: &[&str]) -> Vec<u8> {
    let ts = common::now_ms().to_string();
    let mut all = vec!["--ts", &ts, "--fw", "5.12.1"];
    all.extend(args);
    rig.sign(device, key_of, 1, seq, &all)
}

fn reading(rig: &Rig, device: &str, seq: u64, spo2: u32) -> Vec<u8> {
    let spo2 = format!("spo2={spo2}");
    sign(
        rig,
        device,
        device,
        seq,
        &["--m", &spo2, "--m", "pulse=72", "--q", "0.95"],
    )
}

/// The `topic payload` lines of a mosquitto_sub, as JSON.
fn messages(sub: &Spawned) -> Vec<(String, Json)> {
    sub.stdout()
        .lines()
        .filter_map(|l| {
            let (topic, payload) = l.split_once(' ')?;
            Some((topic.to_owned(), serde_json::from_str(payload).ok()?))
        })
        .collect()
}

/// Waits until `sub` printed a message for which `found` holds, and returns it.
fn wait_message(
    sub: &Spawned,
    within: Duration,
    what: &str,
    found: impl Fn(&str, &Json) -> bool,
) -> Json {
    let mut hit = None;
    let ok = common::poll_until(within, Duration::from_millis(100), || {
        hit = messages(sub)
            .into_iter()
            .find(|(t, m)| found(t, m))
            .map(|(_, m)| m);
        hit.is_some()
    });
    assert!(ok, "not within {within:?}: {what}; got:\n{}", sub.all());
    hit.expect("found")
}

fn no_data_for<'a>(device: &'a str, state: &'a str) -> impl Fn(&str, &Json) -> bool + 'a {
    move |_, m| m["rule"] == "no-data" && m["device"] == device && m["state"] == state
}

/// How many times the store holds `alert_id` in `state`.
fn stored(rig: &Rig, alert_id: &Json, state: &str) -> usize {
    rig.rows("alerts")
        .iter()
        .filter(|a| &a["alert_id"] == alert_id && a["state"] == state)
        .count()
}

/// paho-mqtt publishes an acknowledgement of `alert_id` as `role`/`id` on `topic`
/// (MQTT 5); returns the PUBACK reason code.
fn paho_ack(rig: &Rig, role: &str, id: &str, topic: &str, alert_id: &str) -> i64 {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/paho_ack.py");
    let ran = run(
        Command::new("python3")
            .arg(script)
            .args(["--port", &rig.broker.port.to_string(), "--pki"])
            .arg(rig.pki())
            .args(["--role", role, "--id", id, "--topic", topic])
            .args(["--alert-id", alert_id, "--note", "seen at the bedside"]),
        Duration::from_secs(30),
    );
    assert!(ran.success, "paho_ack.py: {}", ran.all());
    let out: Json = serde_json::from_str(ran.stdout.trim()).expect("paho_ack JSON");
    assert_eq!(out["connected"], 0, "{id} could not connect: {out}");
    out["puback"]
        .as_i64()
        .unwrap_or_else(|| panic!("no PUBACK for {id}: {out}"))
}

#[test]
fn every_silence_reason_is_raised_resolved_and_survives_a_bridge_crash() {
    // Devices 1 and 3 are on site-01, 2 and 4 on site-02.
    let rig = Rig::start(vitalmq_bin!(), "silence", 4, |_| {});
    let rules = rules(rig.dir(), 300, 6);
    let (ehr, _) = webhook_receiver(0);
    let (pager, _) = webhook_receiver(0);
    let config = bridge_config(&rig, &rules, ehr, pager);
    // The operator sees every site's alerts and the bridge's operational ones.
    let alerts = rig.mosquitto_sub_all("operator", "ops-01", &["alerts/#", "ops/bridge/#"]);
    let ops = &alerts;
    // dev-00002 is connected (waiting for its receipts) and never says anything.
    let quiet = rig.mosquitto_sub("device", "dev-00002", "devices/dev-00002/ack");
    let mut bridge = start_bridge(&rig, &config);
    // dev-00003 sends only messages signed with another device's key.
    for seq in 0..3 {
        let forged = sign(&rig, "dev-00003", "dev-00004", seq, &["--m", "spo2=97"]);
        rig.mosquitto_pub(
            "device",
            "dev-00003",
            "devices/dev-00003/telemetry",
            &forged,
        );
    }
    // dev-00001 streams, then dies mid-stream.
    let mut sim = rig.sim(1, 100_000);
    rig.wait_stats(Duration::from_secs(30), "dev-00001 recorded", |s| {
        s["events"].as_u64().unwrap_or(0) >= 5
    });
    sim.kill9();

    let offline = wait_message(
        &alerts,
        Duration::from_secs(30),
        "dev-00001 offline",
        no_data_for("dev-00001", "open"),
    );
    assert_eq!(offline["reason"], "offline", "{offline}");
    assert!(offline["last_seen_at"].is_string(), "{offline}");
    assert!(
        offline["metric"].is_null() && offline["value"].is_null() && offline["threshold"].is_null()
    );
    let silent = wait_message(
        &alerts,
        Duration::from_secs(30),
        "dev-00002 silent",
        no_data_for("dev-00002", "open"),
    );
    assert_eq!(silent["reason"], "silent", "{silent}");
    assert!(silent["last_seen_at"].is_null(), "{silent}");
    let refused = wait_message(
        &alerts,
        Duration::from_secs(30),
        "dev-00003 refused",
        no_data_for("dev-00003", "open"),
    );
    assert_eq!(refused["reason"], "refused", "{refused}");
    assert!(
        refused.to_string().contains("bad_signature"),
        "the refusal class: {refused}"
    );
    // Never seen since enrolment, never connected.
    let never = wait_message(
        &alerts,
        Duration::from_secs(30),
        "dev-00004 never seen",
        no_data_for("dev-00004", "open"),
    );
    assert_eq!(never["reason"], "offline", "{never}");
    assert!(never["last_seen_at"].is_null(), "{never}");
    assert!(never["expected_interval_s"].is_number(), "{never}");
    // The fleet-wide count.
    wait_message(
        ops,
        Duration::from_secs(30),
        "ops/bridge/no_data",
        |t, _| t == "ops/bridge/no_data",
    );

    // A crash: the silent devices are neither forgotten nor raised again.
    bridge.process.kill9();
    let before = messages(&alerts).len();
    let _bridge = start_bridge(&rig, &config);
    // Accepted data from dev-00003 resolves its alert, after the restart.
    let valid = reading(&rig, "dev-00003", 10, 97);
    rig.mosquitto_pub("device", "dev-00003", "devices/dev-00003/telemetry", &valid);
    let resolved = wait_message(
        &alerts,
        Duration::from_secs(30),
        "dev-00003 resolved",
        no_data_for("dev-00003", "resolved"),
    );
    assert_eq!(resolved["alert_id"], refused["alert_id"]);
    for a in [&offline, &silent, &refused, &never] {
        assert_eq!(stored(&rig, &a["alert_id"], "open"), 1, "opened once: {a}");
    }
    // An open the bridge had published before the crash may be published again after it
    // (delivery is at least once: the handler's cursor may not have been committed); the
    // store holds it once (above). Raised again would be an open of a new alert.
    let before_crash: Vec<&serde_json::Value> = [&offline, &silent, &refused, &never]
        .map(|a| &a["alert_id"])
        .to_vec();
    let reopened: Vec<_> = messages(&alerts)[before..]
        .iter()
        .filter(|(_, m)| m["rule"] == "no-data" && m["state"] == "open")
        .filter(|(_, m)| !before_crash.contains(&&m["alert_id"]))
        .cloned()
        .collect();
    assert!(
        reopened.is_empty(),
        "raised again after the restart: {reopened:?}"
    );
    drop(quiet);
}

#[test]
fn alarms_acknowledgements_and_reescalation_to_the_pager_through_a_crash() {
    let rig = Rig::start(vitalmq_bin!(), "ack", 4, |_| {});
    let rules = rules(rig.dir(), 4, 3600);
    let (ehr, ehr_got) = webhook_receiver(0);
    let (pager, pager_got) = webhook_receiver(0);
    let config = bridge_config(&rig, &rules, ehr, pager);
    // The operator watches; the site's integrator acknowledges (one connection per
    // identity: a second connection of int-site-01 would take its subscription over).
    let site = rig.mosquitto_sub_all("operator", "ops-01", &["alerts/#", "ops/bridge/#"]);
    let ops = &site;
    let mut bridge = start_bridge(&rig, &config);

    // A device alarm from an on-device model, raised then cleared.
    let raised = sign(
        &rig,
        "dev-00001",
        "dev-00001",
        0,
        &[
            "--type",
            "alarm",
            "--alarm",
            "arrhythmia",
            "--level",
            "urgent",
            "--model",
            "arrhythmia-net/2.1.0",
            "--detail",
            "irregular rhythm for 30 s",
        ],
    );
    rig.mosquitto_pub(
        "device",
        "dev-00001",
        "devices/dev-00001/telemetry",
        &raised,
    );
    let alarm = wait_message(&site, Duration::from_secs(30), "alarm open", |t, m| {
        t == "alerts/site-01/urgent/dev-00001"
            && m["rule"] == "device-alarm:arrhythmia"
            && m["state"] == "open"
    });
    assert_eq!(alarm["model"], "arrhythmia-net/2.1.0");
    assert!(alarm["metric"].is_null() && alarm["value"].is_null() && alarm["threshold"].is_null());
    assert_eq!(
        alarm["evidence"].as_array().map(Vec::len),
        Some(1),
        "{alarm}"
    );
    let alarm_id = alarm["alert_id"].as_str().expect("alert_id").to_owned();

    // The site's integrator acknowledges it (paho, MQTT 5): accepted, re-sent, audited.
    assert_eq!(
        paho_ack(
            &rig,
            "integrator",
            "int-site-01",
            "alerts/site-01/ack/int-site-01",
            &alarm_id
        ),
        0
    );
    let acked = wait_message(
        &site,
        Duration::from_secs(30),
        "alarm acknowledged",
        |_, m| m["alert_id"] == alarm_id.as_str() && m["state"] == "acknowledged",
    );
    assert_eq!(acked["ack"]["by"], INT_SITE_01, "{acked}");
    assert!(acked["ack"]["at"].is_string(), "{acked}");
    let bridge_audit = rig.data().join("audit.jsonl");
    wait_until(
        Duration::from_secs(10),
        "the acknowledgement audited with its identity",
        || {
            audit_records(&bridge_audit).iter().any(|r| {
                r["resource"] == alarm_id.as_str()
                    && r.to_string().contains(INT_SITE_01)
                    && r.to_string().contains("ack")
            })
        },
    );
    // Another site's integrator may not even publish on site-01's ack topics.
    assert_eq!(
        paho_ack(
            &rig,
            "integrator",
            "int-site-02",
            "alerts/site-01/ack/int-site-02",
            &alarm_id
        ),
        0x87
    );
    // An acknowledgement of an alert that does not exist is refused by the bridge.
    assert_eq!(
        paho_ack(
            &rig,
            "integrator",
            "int-site-01",
            "alerts/site-01/ack/int-site-01",
            "al-00000000000000000000000000000000"
        ),
        0
    );
    let refusal = wait_message(ops, Duration::from_secs(30), "ack refused", |t, _| {
        t == "ops/bridge/ack_refused"
    });
    assert!(refusal.to_string().contains("unknown"), "{refusal}");
    // The device clears its alarm.
    let cleared = sign(
        &rig,
        "dev-00001",
        "dev-00001",
        1,
        &[
            "--type",
            "alarm",
            "--alarm",
            "arrhythmia",
            "--level",
            "urgent",
            "--active",
            "false",
        ],
    );
    rig.mosquitto_pub(
        "device",
        "dev-00001",
        "devices/dev-00001/telemetry",
        &cleared,
    );
    wait_message(&site, Duration::from_secs(30), "alarm resolved", |_, m| {
        m["alert_id"] == alarm_id.as_str() && m["state"] == "resolved"
    });
    // Acknowledging a resolved alert is refused too.
    assert_eq!(
        paho_ack(
            &rig,
            "integrator",
            "int-site-01",
            "alerts/site-01/ack/int-site-01",
            &alarm_id
        ),
        0
    );
    wait_until(Duration::from_secs(30), "second ack refusal", || {
        messages(ops)
            .iter()
            .filter(|(t, _)| t == "ops/bridge/ack_refused")
            .count()
            >= 2
    });

    // A desaturation nobody acknowledges; the bridge is killed while it is open.
    let low = reading(&rig, "dev-00003", 0, 86);
    rig.mosquitto_pub("device", "dev-00003", "devices/dev-00003/telemetry", &low);
    let open = wait_message(&site, Duration::from_secs(30), "spo2-low open", |_, m| {
        m["rule"] == "spo2-low" && m["state"] == "open"
    });
    let open_id = open["alert_id"].clone();
    bridge.process.kill9();
    let _bridge = start_bridge(&rig, &config);
    let escalated = wait_message(
        &site,
        Duration::from_secs(30),
        "re-escalated after the restart",
        |_, m| m["alert_id"] == open_id && m["state"] == "escalated",
    );
    assert_eq!(escalated["reason"], "unacknowledged", "{escalated}");
    assert_eq!(escalated["escalation_level"], 1, "{escalated}");
    assert_eq!(
        stored(&rig, &open_id, "open"),
        1,
        "opened once through the crash"
    );
    // Level 0 went to the ward's webhook only; level 1 pages.
    let bodies =
        |got: &std::sync::Arc<std::sync::Mutex<Vec<common::webhook::Received>>>| -> Vec<Json> {
            got.lock()
                .expect("lock")
                .iter()
                .filter_map(|r| serde_json::from_slice(&r.body).ok())
                .collect()
        };
    wait_until(
        Duration::from_secs(30),
        "the pager got the re-escalation",
        || {
            bodies(&pager_got)
                .iter()
                .any(|b| b["alert_id"] == open_id && b["escalation_level"] == 1)
        },
    );
    assert!(
        !bodies(&pager_got)
            .iter()
            .any(|b| b["alert_id"] == open_id && b["state"] == "open"),
        "the pager is for level 1, not the first message"
    );
    assert!(
        bodies(&ehr_got)
            .iter()
            .any(|b| b["alert_id"] == open_id && b["state"] == "open")
    );

    // Acknowledged after the restart; `vitalmq trace` shows who and when.
    let id = open_id.as_str().expect("id").to_owned();
    assert_eq!(
        paho_ack(
            &rig,
            "integrator",
            "int-site-01",
            "alerts/site-01/ack/int-site-01",
            &id
        ),
        0
    );
    wait_message(
        &site,
        Duration::from_secs(30),
        "acknowledged after the restart",
        |_, m| m["alert_id"] == open_id && m["state"] == "acknowledged",
    );
    let trace = vitalmq_ok(
        &rig.bin,
        &["trace", &id, "--data", rig.data().to_str().expect("utf-8")],
    );
    assert!(
        trace.stdout.contains(INT_SITE_01) && trace.stdout.contains("acknowledged"),
        "{}",
        trace.stdout
    );
    let _ = has_fields;
}
