//! The bridge when things around it fail, across real processes: a cloud sink that is
//! down (local directory, and a real S3-compatible server, moto), a full store, an
//! outbox over its limit, an unusable data directory. In each case nothing receipted
//! is lost, the condition is reported as an operational alert on `ops/bridge/...`
//! (seen here by an operator's mosquitto_sub), and the backlog drains in order after
//! recovery. Alerting never waits for archiving (issue 17): with the outbox at
//! `max_backlog` or the store full, a desaturation still reaches the site's integrator.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    BridgeProcess, Moto, Rig, Spawned, audit_records, desaturation, has_fields, poll_until,
    recent_device_time_origin, run, sim_summary_all_receipted, vitalmq_ok, wait_until,
};
use serde_json::Value as Json;

fn rig(name: &str, devices: u32) -> Rig {
    Rig::start(vitalmq_bin!(), &format!("failures-{name}"), devices, |_| {})
}

/// An operator watching `ops/#` with mosquitto_sub.
fn operator(rig: &Rig) -> Spawned {
    rig.mosquitto_sub("operator", "ops-01", "ops/#")
}

/// The operational alerts an operator received: (topic, payload).
fn ops_alerts(sub: &Spawned) -> Vec<(String, Json)> {
    sub.stdout()
        .lines()
        .filter_map(|l| {
            let (topic, payload) = l.split_once(' ')?;
            Some((topic.to_owned(), serde_json::from_str(payload).ok()?))
        })
        .collect()
}

fn wait_alert(sub: &Spawned, topic: &str, state: &str) -> Json {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((_, a)) = ops_alerts(sub)
            .into_iter()
            .find(|(t, a)| t == topic && a["state"] == state)
        {
            assert_eq!(a["kind"], "operational");
            return a;
        }
        assert!(
            Instant::now() < deadline,
            "no {state} alert on {topic}; operator saw:\n{}",
            sub.all()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn objects_sink(path: &str, batch: usize) -> String {
    format!(
        "[[sinks]]\nkind = \"objects\"\nname = \"objects\"\npath = \"{path}\"\nbatch_max_events = {batch}\nbatch_max_age_ms = 200\n"
    )
}

/// Every normalized line under `root` (local object layout), as (device, seq).
fn local_lines(root: &Path) -> Vec<(String, u64)> {
    let mut files = Vec::new();
    let mut stack = vec![root.join("normalized")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "ndjson") {
                files.push(p);
            }
        }
    }
    files.sort_by_key(|p| p.file_name().map(|n| n.to_owned()));
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .expect("object")
                .lines()
                .map(|l| {
                    let v: Json = serde_json::from_str(l).expect("ndjson line");
                    (
                        v["device"].as_str().expect("device").to_owned(),
                        v["seq"].as_u64().expect("seq"),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The local object sink is unavailable (a regular file where its directory should
/// be): the bridge keeps recording and receipting, reports the sink down, and after
/// the file is gone drains the whole backlog, in order, once.
#[test]
fn a_cloud_sink_outage_keeps_the_backlog_and_drains_it_in_order() {
    let rig = rig("sink-outage", 2);
    let objects = rig.dir().join("objects");
    // Owner-only, as the bridge requires of a data root it did not create itself.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&objects)
        .expect("objects dir");
    std::fs::write(objects.join("normalized"), b"in the way").expect("block the sink");
    let ops = operator(&rig);
    let _bridge = rig.bridge("", &objects_sink("objects", 50));
    let mut sim = rig.sim(2, 100);
    let alert = wait_alert(&ops, "ops/bridge/sink", "open");
    assert_eq!(alert["sink"], "objects");
    sim_summary_all_receipted(&mut sim);
    let st = rig.stats();
    assert_eq!(st["events"], 200, "{st}");
    assert_eq!(
        st["sinks"]["objects"], 0,
        "nothing confirmed while the sink is down: {st}"
    );

    std::fs::remove_file(objects.join("normalized")).expect("unblock the sink");
    rig.wait_stats(Duration::from_secs(60), "the backlog drained", |s| {
        s["sinks"]["objects"] == 200
    });
    wait_alert(&ops, "ops/bridge/sink", "resolved");
    let lines = local_lines(&objects);
    assert_eq!(lines.len(), 200, "each event exactly once in storage");
    for device in ["dev-00001", "dev-00002"] {
        let seqs: Vec<u64> = lines
            .iter()
            .filter(|(d, _)| d == device)
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(
            seqs,
            (0..100).collect::<Vec<_>>(),
            "{device}: in sequence order"
        );
    }
    let audit = std::fs::read_to_string(rig.data().join("audit.jsonl")).expect("audit");
    assert!(
        audit.contains("\"event\":\"sink_failed\"")
            && audit.contains("\"event\":\"sink_recovered\"")
    );
}

/// The same through a real S3-compatible server (moto): objects land in the bucket
/// with the documented layout; while the server is down the backlog waits; a fresh
/// server gets the rest.
#[test]
fn s3_sink_through_a_real_s3_server_with_an_outage() {
    const BUCKET: &str = "vitalmq-e2e";
    let rig = rig("s3", 2);
    let mut moto = Moto::start(BUCKET, None);
    let sink = format!(
        "[[sinks]]\nkind = \"objects\"\nname = \"s3\"\nbatch_max_events = 40\nbatch_max_age_ms = 200\n\
         s3 = {{ bucket = \"{BUCKET}\", endpoint = \"http://127.0.0.1:{}\", prefix = \"site-a\", allow_http = true }}\n",
        moto.port
    );
    let _bridge = BridgeProcess::start_with_env(
        vitalmq_bin!(),
        rig.dir(),
        &BridgeProcess::config_with(rig.broker.port, "", &sink),
        &[
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
        ],
        Duration::from_secs(30),
    );
    let mut sim = rig.sim(2, 40);
    sim_summary_all_receipted(&mut sim);
    rig.wait_stats(Duration::from_secs(30), "delivered to S3", |s| {
        s["sinks"]["s3"] == 80
    });
    let stored = moto.objects(BUCKET);
    let lines: usize = stored
        .iter()
        .filter(|(k, _)| k.starts_with("site-a/normalized/site=") && k.ends_with(".ndjson"))
        .map(|(_, body)| body.iter().filter(|b| **b == b'\n').count())
        .sum();
    assert_eq!(
        lines,
        80,
        "objects: {:?}",
        stored.iter().map(|o| &o.0).collect::<Vec<_>>()
    );
    assert!(
        stored
            .iter()
            .any(|(k, _)| k.starts_with("site-a/raw/site=") && k.ends_with(".cborseq"))
    );

    let port = moto.port;
    moto.process.kill9();
    let mut sim = rig.sim(2, 80); // the same devices go on from seq 40 (a new boot, in fact)
    sim_summary_all_receipted(&mut sim);
    // The bridge tried to deliver the new events and gave S3 up as down (it audits that).
    let audit = rig.data().join("audit.jsonl");
    wait_until(Duration::from_secs(60), "the S3 outage audited", || {
        audit_records(&audit)
            .iter()
            .any(|r| has_fields(r, &[("/event", "sink_failed"), ("/resource", "s3")]))
    });
    let st = rig.stats();
    assert_eq!(
        st["sinks"]["s3"], 80,
        "nothing more confirmed while S3 is down: {st}"
    );
    let moto = Moto::start(BUCKET, Some(port));
    let st = rig.wait_stats(Duration::from_secs(60), "the backlog drained to S3", |s| {
        s["sinks"]["s3"] == s["head"]
    });
    let lines: usize = moto
        .objects(BUCKET)
        .iter()
        .filter(|(k, _)| k.ends_with(".ndjson"))
        .map(|(_, body)| body.iter().filter(|b| **b == b'\n').count())
        .sum();
    assert_eq!(
        Some(lines as u64 + 80),
        st["head"].as_u64(),
        "the fresh server got exactly the backlog"
    );
}

/// `[alerts]` of a bridge configuration: the shipped rule set, the MQTT handler only.
fn alerts_section() -> String {
    let rules =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/examples/rules.toml");
    format!(
        r#"
[alerts]
rules = "{}"
publisher = {{ client_id = "bridge-01-alerts", cert = "pki/identities/bridge/bridge-01-alerts.pem", key = "pki/identities/bridge/bridge-01-alerts.key.pem" }}
"#,
        rules.display()
    )
}

/// The readings of [`desaturation`] for `device` up to the open `spo2-low` alert (its
/// first 16: 97 for a minute, then a fall to 86 held long enough), signed with its key
/// (device clock ten minutes ago, inside the rule file's clock limits), as
/// `(seq, bytes)` from seq 0.
fn signed_desaturation(rig: &Rig, device: &str) -> Vec<(u64, Vec<u8>)> {
    let t0_ms = recent_device_time_origin();
    desaturation()
        .into_iter()
        .take(16)
        .zip(0u64..)
        .map(|((t_s, spo2), seq)| {
            let ts = (t0_ms + t_s * 1000).to_string();
            let spo2 = format!("spo2={spo2}");
            let args = ["--ts", &ts, "--m", &spo2, "--m", "pulse=72", "--q", "0.95"];
            (seq, rig.sign(device, device, 1, seq, &args))
        })
        .collect()
}

/// Publishes `readings` as `device` (QoS 1, through the broker), in order.
fn publish_readings(rig: &Rig, device: &str, readings: &[(u64, Vec<u8>)]) {
    for (_, bytes) in readings {
        rig.mosquitto_pub(
            "device",
            device,
            &format!("devices/{device}/telemetry"),
            bytes,
        );
    }
}

/// Publishes `readings` as `device` until the store holds every one of them, as a
/// device resends what got no receipt (recording may pause again while the outbox
/// drains).
fn resend_until_stored(rig: &Rig, device: &str, readings: &[(u64, Vec<u8>)]) {
    let all: Vec<u64> = readings.iter().map(|(seq, _)| *seq).collect();
    for _ in 0..5 {
        publish_readings(rig, device, readings);
        let stored = poll_until(Duration::from_secs(10), Duration::from_millis(250), || {
            let mut seqs = stored_seqs(rig, device);
            seqs.sort_unstable();
            seqs == all
        });
        if stored {
            return;
        }
    }
    panic!(
        "{device}'s readings not stored: {:?}",
        stored_seqs(rig, device)
    );
}

/// Whether `sub` (mosquitto_sub -v) printed a message on `topic`.
fn got_message_on(sub: &Spawned, topic: &str) -> bool {
    sub.stdout()
        .lines()
        .any(|l| l.starts_with(&format!("{topic} ")))
}

/// The `spo2-low` alerts an integrator's mosquitto_sub printed: (topic, alert).
fn spo2_low(sub: &Spawned) -> Vec<(String, Json)> {
    ops_alerts(sub)
        .into_iter()
        .filter(|(_, a)| a["rule"] == "spo2-low")
        .collect()
}

/// Waits for the integrator's `spo2-low` open alert of `device` and returns it.
fn wait_spo2_open(sub: &Spawned, device: &str, bridge: &BridgeProcess) -> Json {
    wait_until(
        Duration::from_secs(30),
        "the spo2-low alert at the integrator",
        || {
            spo2_low(sub)
                .iter()
                .any(|(_, a)| a["state"] == "open" && a["device"] == device)
        },
    );
    let (topic, alert) = spo2_low(sub)
        .into_iter()
        .find(|(_, a)| a["state"] == "open")
        .unwrap_or_else(|| panic!("bridge:\n{}", bridge.process.all()));
    assert_eq!(
        topic,
        format!(
            "alerts/site-01/{}/{device}",
            alert["severity"].as_str().expect("severity")
        )
    );
    alert
}

/// The stored events of `device`, as seqs.
fn stored_seqs(rig: &Rig, device: &str) -> Vec<u64> {
    rig.rows("events")
        .iter()
        .filter(|e| e["device"] == device)
        .filter_map(|e| e["seq"].as_u64())
        .collect()
}

/// The bridge's audit records of the paused-recording episode, as (event, reason).
fn recording_audit(rig: &Rig) -> Vec<(String, String)> {
    audit_records(&rig.data().join("audit.jsonl"))
        .iter()
        .filter(|r| r["resource"] == "store" && r["action"] == "record")
        .map(|r| {
            (
                r["event"].as_str().unwrap_or_default().to_owned(),
                r["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// The store fills up (a quota, which fails exactly like a full disk: SQLITE_FULL).
/// Recording pauses, alerting does not: a desaturation of another device still reaches
/// its site's integrator, while the bridge says loudly that it records nothing
/// (ops/bridge/store `recording_paused`, an audit record) and receipts nothing it did
/// not record. Restarted with room (the quota raised), every message the devices still
/// hold, and the desaturation's readings resent, is stored exactly once, and the
/// alert exists once in the store under the id the integrator got.
#[test]
fn a_full_store_keeps_alerting_receipts_nothing_unrecorded_and_loses_nothing() {
    let rig = rig("disk-full", 4);
    let ops = operator(&rig);
    let integrator = rig.mosquitto_sub("integrator", "int-site-01", "alerts/site-01/#");
    // dev-00003 is on site-01; its site's gateway may read its receipts.
    let receipts = rig.mosquitto_sub("gateway", "gw-site-01", "devices/dev-00003/ack");
    let readings = signed_desaturation(&rig, "dev-00003");
    // W = 1024, as in the durability tests: larger than what a device holds
    // unreceipted, which while recording is paused is its whole backlog; resent after
    // the pause in order, its oldest must not fall out of the window unseen.
    let bridge = rig.bridge("max_store_bytes = 131072\nwindow = 1024", &alerts_section());
    let mut sim = rig.sim(2, 150);
    let alert = wait_alert(&ops, "ops/bridge/store", "open");
    assert_eq!(alert["reason"], "recording_paused");
    assert_eq!(alert["cause"], "disk_full");
    assert_eq!(alert["disk_full"], true);
    assert!(
        bridge.process.all().contains("the disk is full"),
        "a clear error in the log"
    );
    wait_until(
        Duration::from_secs(10),
        "the paused episode audited",
        || recording_audit(&rig) == [("sink_failed".to_owned(), "recording_paused".to_owned())],
    );
    let full = rig.stats()["events"].as_u64().expect("events");
    assert!(
        full < 300,
        "the quota must bite before everything is stored ({full})"
    );

    publish_readings(&rig, "dev-00003", &readings);
    let open = wait_spo2_open(&integrator, "dev-00003", &bridge);
    assert_eq!(open["kind"], "clinical");
    // Every reading before the alert's was handled seconds ago; receipts go out every
    // 100 ms: none came, nothing of dev-00003 is stored.
    assert!(
        !got_message_on(&receipts, "devices/dev-00003/ack"),
        "a receipt for an unrecorded message: {}",
        receipts.stdout()
    );
    assert_eq!(stored_seqs(&rig, "dev-00003"), Vec::<u64>::new());
    assert_eq!(
        recording_audit(&rig).len(),
        1,
        "one audit record per episode"
    );

    let mut bridge = bridge;
    bridge.process.kill9();
    // Room again. The devices resend what was not receipted (the simulator by itself;
    // dev-00003's readings here), and everything is stored once.
    let _bridge = rig.bridge("max_store_bytes = 0\nwindow = 1024", &alerts_section());
    resend_until_stored(&rig, "dev-00003", &readings);
    let summary = sim_summary_all_receipted(&mut sim);
    let sent = summary["totals"]["sent"].as_u64().expect("sent");
    let st = rig.wait_stats(Duration::from_secs(60), "everything stored", |s| {
        s["events"].as_u64() == Some(sent + readings.len() as u64)
    });
    assert_eq!(st["quarantine"], serde_json::json!({}), "{st}");
    let mut seqs = stored_seqs(&rig, "dev-00003");
    seqs.sort_unstable();
    assert_eq!(seqs, (0..readings.len() as u64).collect::<Vec<_>>());
    assert!(
        receipts.wait_output(Duration::from_secs(20), |o| o
            .contains("devices/dev-00003/ack")),
        "recorded readings are receipted"
    );
    // The alert is in the store once, opened once, under the id the integrator got.
    let rows: Vec<Json> = rig
        .rows("alerts")
        .into_iter()
        .filter(|a| a["rule"] == "spo2-low")
        .collect();
    let opened: Vec<&Json> = rows.iter().filter(|a| a["state"] == "open").collect();
    assert_eq!(opened.len(), 1, "opened once: {rows:?}");
    assert_eq!(opened[0]["alert_id"], open["alert_id"]);
}

/// Every sink is down and the outbox reaches max_backlog: recording pauses (the
/// broker's in-flight window does not stall, devices resend what they get no receipt
/// for), ops/bridge/store says so, and a desaturation still reaches the integrator.
/// Once the sink is back everything is stored and delivered, the alert once.
#[test]
fn a_full_outbox_pauses_recording_but_never_alerting() {
    let rig = rig("backlog", 4);
    let objects = rig.dir().join("objects");
    // Owner-only, as the bridge requires of a data root it did not create itself.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&objects)
        .expect("objects dir");
    std::fs::write(objects.join("normalized"), b"in the way").expect("block the sink");
    let ops = operator(&rig);
    let integrator = rig.mosquitto_sub("integrator", "int-site-01", "alerts/site-01/#");
    let readings = signed_desaturation(&rig, "dev-00003");
    let bridge = rig.bridge(
        // W = 1024: see the full-store test.
        "max_backlog = 60\nresume_backlog = 30\nwindow = 1024",
        &(objects_sink("objects", 20) + &alerts_section()),
    );
    let mut sim = rig.sim(2, 120);
    let alert = wait_alert(&ops, "ops/bridge/store", "open");
    assert_eq!(alert["reason"], "recording_paused");
    assert_eq!(alert["cause"], "backlog");
    assert_eq!(alert["max_backlog"], 60);
    // Every message is made (and sent: the broker is up) while the bridge holds back.
    wait_until(
        Duration::from_secs(60),
        "both devices done generating",
        || sim.stderr().matches("generation done").count() >= 2,
    );
    let held = rig.stats()["events"].as_u64().expect("events");
    assert!(held < 120, "stored beyond the limit while paused: {held}");

    publish_readings(&rig, "dev-00003", &readings);
    let open = wait_spo2_open(&integrator, "dev-00003", &bridge);
    assert_eq!(
        stored_seqs(&rig, "dev-00003"),
        Vec::<u64>::new(),
        "recorded while paused"
    );

    std::fs::remove_file(objects.join("normalized")).expect("unblock the sink");
    let summary = sim_summary_all_receipted(&mut sim);
    wait_alert(&ops, "ops/bridge/store", "resolved");
    // dev-00003 got no receipt: it resends.
    resend_until_stored(&rig, "dev-00003", &readings);
    for l in bridge.process.all().lines().filter(|l| {
        l.contains("WARN")
            || l.contains("ERROR")
            || l.contains("INFO vitalmq_bridge::recorder")
            || l.contains("DBGREC")
    }) {
        eprintln!("DEBUG log {l}");
    }
    let sent = summary["totals"]["sent"].as_u64().expect("sent") + readings.len() as u64;
    let st = rig.wait_stats(Duration::from_secs(60), "all delivered", |s| {
        s["events"].as_u64() == Some(sent) && s["sinks"]["objects"] == s["head"]
    });
    assert_eq!(
        local_lines(&objects).len() as u64,
        st["events"].as_u64().expect("events")
    );
    let opened: Vec<Json> = rig
        .rows("alerts")
        .into_iter()
        .filter(|a| a["rule"] == "spo2-low" && a["state"] == "open")
        .collect();
    assert_eq!(opened.len(), 1, "opened once: {opened:?}");
    assert_eq!(opened[0]["alert_id"], open["alert_id"]);
    let got: Vec<Json> = spo2_low(&integrator)
        .into_iter()
        .map(|(_, a)| a)
        .filter(|a| a["state"] == "open")
        .collect();
    assert_eq!(got.len(), 1, "delivered once: {got:?}");
}

/// A data directory the bridge cannot use is a clear error at start, naming the path.
#[test]
fn an_unusable_data_directory_stops_the_bridge_with_a_clear_error() {
    let rig = rig("bad-data-dir", 1);
    std::fs::write(rig.data(), b"a file, not a directory").expect("write");
    std::fs::write(
        rig.dir().join("bridge.toml"),
        BridgeProcess::config(rig.broker.port, ""),
    )
    .expect("config");
    let ran = run(
        Command::new(vitalmq_bin!())
            .arg("bridge")
            .arg("--config")
            .arg(rig.dir().join("bridge.toml")),
        Duration::from_secs(20),
    );
    assert!(!ran.success);
    assert!(ran.stderr.contains("bridge-data"), "{}", ran.stderr);
}

/// Replay attempts above the configured rate and a certificate close to expiry are
/// raised as operational alerts on their own topics, for the operator only.
#[test]
fn replay_rates_and_expiring_certificates_raise_operational_alerts() {
    let rig = rig("ops-rates", 2);
    let ops = operator(&rig);
    let _bridge = BridgeProcess::start(
        vitalmq_bin!(),
        rig.dir(),
        // Certificates from `certs init` are valid for 365 days: 400 days' notice fires.
        &(BridgeProcess::config_with(rig.broker.port, "", "")
            + "[ops]\nreplays_per_minute = 2\ncert_expiry_days = 400\n"),
        Duration::from_secs(30),
    );
    let expiry = wait_alert(&ops, "ops/bridge/cert_expiry", "open");
    assert!(
        expiry["certificate"]
            .as_str()
            .is_some_and(|c| c.ends_with("bridge-01.pem")),
        "{expiry}"
    );
    assert!(
        expiry["days_left"]
            .as_i64()
            .is_some_and(|d| (360..=366).contains(&d)),
        "{expiry}"
    );
    // Epoch 2 first, then three messages of the older epoch 1: replays.
    let fresh = rig.signed("dev-00001", 2, 0);
    rig.mosquitto_pub("device", "dev-00001", "devices/dev-00001/telemetry", &fresh);
    for seq in 0..3 {
        let old = rig.signed("dev-00001", 1, seq);
        rig.mosquitto_pub("device", "dev-00001", "devices/dev-00001/telemetry", &old);
    }
    let replays = wait_alert(&ops, "ops/bridge/replays", "open");
    assert_eq!(replays["count_last_minute"], 3);
    assert_eq!(replays["reason"], "rate_above_limit");
}

/// The bridge's audit log reaches cloud storage through its objects sink as a plane of
/// its own, with its retention class in the object name; each shipped segment ends with
/// a checkpoint signed by the bridge's key and verifies on its own.
#[test]
fn audit_records_are_shipped_to_object_storage_with_a_signed_checkpoint() {
    let rig = rig("audit-ship", 1);
    let objects = rig.dir().join("objects");
    let _bridge = rig.bridge("", &objects_sink("objects", 10));
    let forged = {
        let mut m = rig.signed("dev-00001", 1, 0);
        let last = m.len() - 1;
        m[last] ^= 1;
        m
    };
    rig.mosquitto_pub(
        "device",
        "dev-00001",
        "devices/dev-00001/telemetry",
        &forged,
    );
    let dir = objects.join("audit/retention=audit-7y/component=bridge");
    let deadline = Instant::now() + Duration::from_secs(30);
    let segment = loop {
        let found: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|date| {
                std::fs::read_dir(date.path())
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .map(|f| f.path())
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .collect();
        if let Some(first) = found.into_iter().min() {
            let text = std::fs::read_to_string(&first).expect("segment");
            if text.contains("bad_signature") {
                break first;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no audit segment with the refusal under {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let public =
        std::fs::read_to_string(rig.data().join("audit-signing.key.pem.pub")).expect("public key");
    let ran = vitalmq_ok(
        vitalmq_bin!(),
        &[
            "audit",
            "verify",
            segment.to_str().expect("utf-8"),
            "--trusted-key",
            public.trim(),
        ],
    );
    assert!(ran.stdout.contains("(trusted key)"), "{}", ran.stdout);
    assert!(
        std::fs::read_to_string(&segment)
            .expect("segment")
            .trim_end()
            .lines()
            .last()
            .is_some_and(|l| l.contains("\"event\":\"checkpoint\"")),
        "a segment ends with its checkpoint"
    );
}

/// `[[audit_ship]]` for the broker's log of this rig (`broker-audit.jsonl`, in the
/// rig's directory beside `bridge.toml`).
const SHIP_BROKER_AUDIT: &str = "[[audit_ship]]\ncomponent = \"broker\"\npath = \"broker-audit.jsonl\"\nretention = \"audit-7y\"\n";

/// A TCP client that speaks no TLS: the broker refuses it at the handshake and audits it.
fn refused_connection(port: u16) {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
    let _ = s.read_to_end(&mut Vec::new()); // until the broker closes it
}

/// The shipped segments of `component` under the local objects sink `objects`, in
/// record order (names are zero-padded record ranges, whatever the date directory).
fn shipped_segments(objects: &Path, component: &str) -> Vec<std::path::PathBuf> {
    let dir = objects.join(format!("audit/retention=audit-7y/component={component}"));
    let mut found: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|date| {
            std::fs::read_dir(date.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|f| f.path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    found.sort_by_key(|p| p.file_name().map(|n| n.to_owned()));
    found
}

/// The shipped segments of `component` concatenated, and their records.
fn shipped_log(objects: &Path, component: &str) -> (String, Vec<Json>) {
    let text: String = shipped_segments(objects, component)
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("segment"))
        .collect();
    let records = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a shipped line is a record"))
        .collect();
    (text, records)
}

/// `vitalmq audit verify` of `text` (written to `file`) under the broker's key.
fn verifies_under_the_broker_key(rig: &Rig, file: &Path, text: &str) {
    std::fs::write(file, text).expect("write");
    let public =
        std::fs::read_to_string(rig.dir().join("audit-signing.key.pem.pub")).expect("public key");
    let ran = vitalmq_ok(
        vitalmq_bin!(),
        &[
            "audit",
            "verify",
            file.to_str().expect("utf-8"),
            "--trusted-key",
            public.trim(),
        ],
    );
    assert!(
        ran.stdout.contains("chain intact") && ran.stdout.contains("(trusted key)"),
        "{}",
        ran.stdout
    );
}

/// The seq of the newest checkpoint in the broker's log now.
fn broker_checkpointed_through(rig: &Rig) -> Option<u64> {
    std::fs::read_to_string(rig.dir().join("broker-audit.jsonl"))
        .expect("broker audit log")
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Json>(l).ok())
        .find(|r| r["event"] == "checkpoint")
        .and_then(|r| r["seq"].as_u64())
}

/// The broker's audit log reaches cloud storage through the bridge's objects sink: a
/// refused connection ends up in a `component=broker` segment, every segment ends with
/// a checkpoint, and the shipped segments together (from record 0) verify under the
/// broker's own key.
#[test]
fn broker_refusals_are_shipped_to_object_storage_and_verify_under_the_broker_key() {
    let rig = rig("audit-ship-broker", 1);
    let objects = rig.dir().join("objects");
    let _bridge = rig.bridge(
        "",
        &format!("{}{SHIP_BROKER_AUDIT}", objects_sink("objects", 10)),
    );
    for _ in 0..3 {
        refused_connection(rig.broker.port);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let (text, records) = loop {
        let (text, records) = shipped_log(&objects, "broker");
        // Repeats from one address are counted in a summary record (`details.repeats`).
        let refusals: u64 = records
            .iter()
            .filter(|r| r["event"] == "connection_refused" && r["action"] == "handshake")
            .map(|r| r["details"]["repeats"].as_u64().unwrap_or(1))
            .sum();
        if refusals == 3 {
            break (text, records);
        }
        assert!(
            Instant::now() < deadline,
            "the broker's refusals were not shipped; shipped so far:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(records.iter().all(|r| r["component"] == "broker"));
    for segment in shipped_segments(&objects, "broker") {
        let text = std::fs::read_to_string(&segment).expect("segment");
        assert!(
            text.lines()
                .last()
                .is_some_and(|l| l.contains("\"event\":\"checkpoint\"")),
            "{} ends with its checkpoint",
            segment.display()
        );
    }
    verifies_under_the_broker_key(&rig, &rig.dir().join("shipped-broker.jsonl"), &text);
}

/// `kill -9` of the bridge while it ships the broker's log: once right after its first
/// segment was shipped (so the next bridge resumes from a cursor), then twice around
/// its next shipping pass. Across all shipped segments every record of the broker's log
/// up to its newest checkpoint is there exactly once, in order, and the whole verifies
/// under the broker's key.
#[test]
fn shipping_the_broker_log_survives_kill_9_without_duplicates_or_holes() {
    let rig = rig("audit-ship-kill", 1);
    let objects = rig.dir().join("objects");
    let sinks = format!("{}{SHIP_BROKER_AUDIT}", objects_sink("objects", 10));
    let mut bridge = rig.bridge("", &sinks);
    let deadline = Instant::now() + Duration::from_secs(30);
    while shipped_segments(&objects, "broker").is_empty() {
        assert!(Instant::now() < deadline, "no broker segment shipped");
        refused_connection(rig.broker.port);
        std::thread::sleep(Duration::from_millis(200));
    }
    bridge.process.kill9();
    // The shipper passes every 5 s from the bridge's start; kill around that.
    for kill_after_ms in [4_900u64, 5_300] {
        let mut bridge = rig.bridge("", &sinks);
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(kill_after_ms) {
            refused_connection(rig.broker.port);
            std::thread::sleep(Duration::from_millis(200));
        }
        bridge.process.kill9();
    }
    let _bridge = rig.bridge("", &sinks);
    refused_connection(rig.broker.port);
    let broker_log = rig.dir().join("broker-audit.jsonl");
    let refusals_in = |text: &str| text.matches("\"event\":\"connection_refused\"").count();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (text, records) = loop {
        let (text, records) = shipped_log(&objects, "broker");
        let shipped_through = records.last().and_then(|r| r["seq"].as_u64());
        let written = std::fs::read_to_string(&broker_log).expect("broker audit log");
        // Every refusal the broker wrote is shipped, and everything it checkpointed.
        if refusals_in(&text) == refusals_in(&written)
            && shipped_through == broker_checkpointed_through(&rig)
        {
            break (text, records);
        }
        assert!(
            Instant::now() < deadline,
            "shipped through {shipped_through:?}, the broker checkpointed through {:?}",
            broker_checkpointed_through(&rig)
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let seqs: Vec<u64> = records
        .iter()
        .map(|r| r["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(
        seqs,
        (0..seqs.len() as u64).collect::<Vec<_>>(),
        "every record once, in order, no holes"
    );
    verifies_under_the_broker_key(&rig, &rig.dir().join("shipped-broker.jsonl"), &text);
}

/// Audit disk use (issue 15, item 3): the bridge measures its own audit log and the
/// broker's (which it ships) and raises `ops/bridge/audit_disk` for each log past
/// `ops.audit_max_bytes`, with the sizes; the operator sees both. (That it is raised
/// once, and resolved, is `bridge/src/audit_size.rs`'s paused-clock test.)
#[test]
fn an_audit_log_past_its_size_limit_raises_an_operational_alert() {
    let rig = rig("audit-disk", 1);
    let ops = operator(&rig);
    let limits = "[ops]\naudit_max_bytes = 100\naudit_check_interval_s = 1\n";
    let _bridge = rig.bridge("", &format!("{SHIP_BROKER_AUDIT}{limits}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let open = |component: &str| {
        ops_alerts(&ops).into_iter().find(|(t, a)| {
            t == "ops/bridge/audit_disk"
                && a["state"] == "open"
                && a["audit_component"] == component
        })
    };
    while open("broker").is_none() || open("bridge").is_none() {
        assert!(
            Instant::now() < deadline,
            "no audit_disk alert for both logs; operator saw:\n{}",
            ops.all()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, broker) = open("broker").expect("broker alert");
    assert_eq!(broker["reason"], "audit_log_large");
    assert_eq!(broker["max_bytes"], 100);
    assert!(broker["log_bytes"].as_u64() > Some(100), "{broker}");
    assert!(broker["free_bytes"].as_u64() > Some(0), "{broker}");
}
