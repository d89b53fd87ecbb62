//! The bridge end to end across real processes: `vitalmq broker`, `vitalmq bridge`,
//! and publishers nobody here wrote (mosquitto_pub) or the device simulator. What the
//! bridge stored is read back with `vitalmq store` (and its audit log checked).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    BridgeProcess, Rig, TRUST_DOMAIN, broker_config, poll_until, store_rows, temp_dir, vitalmq_ok,
    wait_until,
};
use serde_json::Value as Json;

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/vectors")
}

fn read_json(path: &Path) -> Json {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// Waits until the bridge has stored `events` events and `refused` quarantined
/// messages, and counted `rejected` duplicates + replays.
fn wait_stored(rig: &Rig, events: u64, refused: u64, rejected: u64) -> Json {
    rig.wait_stats(Duration::from_secs(30), "all verdicts recorded", |st| {
        let quarantined: u64 = st["quarantine"]
            .as_object()
            .map_or(0, |m| m.values().filter_map(Json::as_u64).sum());
        let counted = st["counters"]["duplicate"].as_u64().unwrap_or(0)
            + st["counters"]["replay"].as_u64().unwrap_or(0);
        st["events"].as_u64() == Some(events) && quarantined == refused && counted == rejected
    })
}

fn publish_signed(rig: &Rig, device: &str, epoch: u64, seqs: std::ops::Range<u64>) {
    for seq in seqs {
        let bytes = rig.signed(device, epoch, seq);
        rig.mosquitto_pub(
            "device",
            device,
            &format!("devices/{device}/telemetry"),
            &bytes,
        );
    }
}

/// Gives `device` the vectors' public key (keys.json) in the PKI's registry, after
/// issuing it an identity certificate at site-01.
fn enroll_vector_device(dir: &Path, device: &str) {
    let pki = dir.join("pki");
    vitalmq_ok(
        vitalmq_bin!(),
        &[
            "certs",
            "issue",
            "--dir",
            s(&pki),
            "--role",
            "device",
            "--id",
            device,
            "--site",
            "site-01",
        ],
    );
    let keys = read_json(&vectors_dir().join("keys.json"));
    let entry = keys["registry"]
        .as_array()
        .expect("registry")
        .iter()
        .find(|k| k["kid"] == device)
        .expect("vector key");
    let (alg, public) = match entry["alg"].as_str().expect("alg") {
        "EdDSA" => ("EdDSA", entry["x"].as_str().expect("x").to_owned()),
        _ => (
            "ES256",
            format!(
                "04{}{}",
                entry["x"].as_str().expect("x"),
                entry["y"].as_str().expect("y")
            ),
        ),
    };
    let path = pki.join("registry.toml");
    let text = std::fs::read_to_string(&path).expect("registry");
    let start = text
        .find(&format!("id = \"{device}\""))
        .expect("issued entry");
    let block_end = text[start..].find("\n\n").map_or(text.len(), |i| start + i);
    let mut block: Vec<String> = text[start..block_end].lines().map(str::to_owned).collect();
    for line in &mut block {
        if line.starts_with("alg = ") {
            *line = format!("alg = \"{alg}\"");
        } else if line.starts_with("public_key = ") {
            *line = format!("public_key = \"{public}\"");
        }
    }
    let rewritten = format!(
        "{}{}{}",
        &text[..start],
        block.join("\n"),
        &text[block_end..]
    );
    std::fs::write(&path, rewritten).expect("write registry");
}

/// Both shared replay scenarios, published in order through the broker by a device
/// with the scenario's id (mosquitto_pub with that device's certificate): the bridge's
/// verdicts and gap reports match the scenario step by step.
#[test]
fn replay_scenarios_end_to_end_through_broker_and_bridge() {
    let scenarios: Vec<Json> = [
        "replay-01-window-basics.json",
        "replay-02-epoch-reboot.json",
    ]
    .iter()
    .map(|f| read_json(&vectors_dir().join("replay").join(f)))
    .collect();
    let system = Rig::start(vitalmq_bin!(), "bridge-e2e-replay", 2, |dir| {
        enroll_vector_device(dir, "dev-00042");
        enroll_vector_device(dir, "dev-00077");
    });
    let mut bridge = system.bridge("", "");
    let (mut accepted, mut invalid, mut rejected) = (Vec::new(), 0u64, 0u64);
    let mut expected_gaps = Vec::new();
    for scenario in &scenarios {
        let mut highest: Option<(u64, u64)> = None;
        for step in scenario["steps"].as_array().expect("steps") {
            let device = step["device"].as_str().expect("device");
            let bytes = hex::decode(step["cose_sign1_hex"].as_str().expect("hex")).expect("hex");
            system.mosquitto_pub(
                "device",
                device,
                &format!("devices/{device}/telemetry"),
                &bytes,
            );
            let (epoch, seq) = (
                step["epoch"].as_u64().expect("epoch"),
                step["seq"].as_u64().expect("seq"),
            );
            match step["expect"].as_str().expect("expect") {
                "accept" | "gap" => {
                    if step["expect"] == "gap" {
                        let (_, h) = highest.expect("a gap follows an accepted message");
                        expected_gaps.push((device.to_owned(), epoch, h + 1, seq - 1));
                    }
                    accepted.push((
                        device.to_owned(),
                        epoch,
                        seq,
                        step["detail"].as_str().expect("detail").to_owned(),
                    ));
                }
                "invalid" => invalid += 1,
                _ => rejected += 1,
            }
            let after = &step["state_after"];
            highest = Some((
                after["epoch"].as_u64().expect("epoch"),
                after["highest"].as_u64().expect("highest"),
            ));
        }
    }
    wait_stored(&system, accepted.len() as u64, invalid, rejected);
    let events: Vec<(String, u64, u64, String)> = system
        .rows("events")
        .iter()
        .map(|e| {
            (
                e["device"].as_str().expect("device").to_owned(),
                e["epoch"].as_u64().expect("epoch"),
                e["seq"].as_u64().expect("seq"),
                e["verdict"].as_str().expect("verdict").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        events, accepted,
        "accepted messages, in order, with the scenario's verdict detail"
    );
    let stats = system.stats();
    let quarantine = system.rows("quarantine");
    assert_eq!(quarantine.len() as u64, invalid);
    assert!(
        quarantine.iter().all(|q| q["reason"] == "bad_signature"),
        "{quarantine:?}"
    );
    let count = |key: &str| -> u64 {
        scenarios
            .iter()
            .flat_map(|sc| sc["steps"].as_array().expect("steps"))
            .filter(|s| s["expect"] == key)
            .count() as u64
    };
    assert_eq!(
        stats["counters"]["duplicate"].as_u64(),
        Some(count("duplicate")),
        "{stats}"
    );
    assert_eq!(
        stats["counters"]["replay"].as_u64(),
        Some(count("replay")),
        "{stats}"
    );
    let gaps: Vec<(String, u64, u64, u64)> = system
        .rows("gaps")
        .iter()
        .map(|g| {
            (
                g["device"].as_str().expect("device").to_owned(),
                g["epoch"].as_u64().expect("epoch"),
                g["first"].as_u64().expect("first"),
                g["last"].as_u64().expect("last"),
            )
        })
        .collect();
    let mut expected_sorted = expected_gaps.clone();
    expected_sorted.sort();
    assert_eq!(gaps, expected_sorted, "one gap report per skipped range");
    // replay-01 step 5 skipped 3..4 and both arrived later: that gap is closed.
    let closed = system
        .rows("gaps")
        .into_iter()
        .find(|g| g["device"] == "dev-00042" && g["first"] == 3)
        .expect("gap 3..4");
    assert_eq!(closed["state"], "closed");
    // Every replay and refusal is in the bridge's audit log, which verifies.
    let audit = system.data().join("audit.jsonl");
    // The bridge is running: records since its last checkpoint are not signed yet.
    vitalmq_ok(
        vitalmq_bin!(),
        &["audit", "verify", s(&audit), "--allow-unsigned-tail"],
    );
    let text = std::fs::read_to_string(&audit).expect("audit log");
    let replays = text
        .lines()
        .filter(|l| l.contains("\"event\":\"replay\""))
        .count() as u64;
    assert_eq!(replays, count("replay"));
    let refused = text
        .lines()
        .filter(|l| l.contains("\"reason\":\"bad_signature\""))
        .count() as u64;
    assert_eq!(refused, invalid);
    // A clean stop ends the log with a checkpoint signed by the bridge's own key; it
    // verifies under that key and is refused under any other.
    bridge.process.signal("TERM");
    assert!(
        bridge.process.wait_exit(Duration::from_secs(20)).is_some(),
        "bridge did not stop"
    );
    let public = std::fs::read_to_string(system.data().join("audit-signing.key.pem.pub"))
        .expect("public key");
    let ok = vitalmq_ok(
        vitalmq_bin!(),
        &["audit", "verify", s(&audit), "--trusted-key", public.trim()],
    );
    assert!(
        ok.stdout.contains("signed checkpoints") && ok.stdout.contains("(trusted key)"),
        "{}",
        ok.stdout
    );
    let wrong = common::run(
        std::process::Command::new(vitalmq_bin!()).args([
            "audit",
            "verify",
            s(&audit),
            "--trusted-key",
            &"ab".repeat(32),
        ]),
        Duration::from_secs(20),
    );
    assert_eq!(wrong.code, Some(1), "{}", wrong.all());
    assert!(
        wrong.stdout.contains("not a trusted key"),
        "{}",
        wrong.stdout
    );
}

fn seqs(events: &[Json]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect()
}

/// A site bridge forwards accepted messages unmodified to a cloud broker with the
/// gateway's certificate; a cloud-side bridge verifies them again. While the cloud
/// broker is down (kill -9) the backlog waits on disk; after it is back, it drains in
/// order and nothing is lost or doubled.
#[test]
fn upstream_forwarding_survives_a_cloud_broker_outage() {
    let site = Rig::start(vitalmq_bin!(), "bridge-e2e-site", 2, |_| {});
    let cloud_dir = temp_dir("vitalmq-bridge-e2e-cloud");
    copy_dir(&site.pki(), &cloud_dir.path().join("pki"));
    std::fs::copy(
        site.dir().join("acl.toml"),
        cloud_dir.path().join("acl.toml"),
    )
    .expect("acl");
    let config = broker_config(TRUST_DOMAIN);
    let mut cloud_broker = common::BrokerProcess::start(
        vitalmq_bin!(),
        cloud_dir.path(),
        &config,
        Duration::from_secs(30),
    );
    let cloud_port = cloud_broker.port;
    let cloud_bridge = BridgeProcess::start(
        vitalmq_bin!(),
        cloud_dir.path(),
        &BridgeProcess::config(cloud_port, ""),
        Duration::from_secs(30),
    );
    let upstream = format!(
        r#"[[sinks]]
kind = "upstream"
name = "cloud"
address = "127.0.0.1:{cloud_port}"
ca = "pki/ca/ca.pem"
cert = "pki/identities/gateway/gw-site-01.pem"
key = "pki/identities/gateway/gw-site-01.key.pem"
client_id = "gw-site-01"
"#
    );
    let site_bridge = site.bridge("", &upstream);
    let cloud = |within| {
        store_rows(
            vitalmq_bin!(),
            "events",
            &cloud_dir.path().join("bridge-data"),
        )
        .len()
            >= within
    };
    // dev-00001 is registered at site-01, the gateway's site.
    publish_signed(&site, "dev-00001", 1, 0..10);
    wait_until(
        Duration::from_secs(30),
        "10 events forwarded to the cloud",
        || cloud(10),
    );

    cloud_broker.kill9();
    publish_signed(&site, "dev-00001", 1, 10..25);
    site.wait_stats(Duration::from_secs(30), "25 events at the site", |st| {
        st["events"] == 25
    });
    // The site bridge tried to forward them and gave the cloud up as down (it audits
    // that).
    let audit = site.data().join("audit.jsonl");
    wait_until(Duration::from_secs(60), "the cloud outage audited", || {
        common::audit_records(&audit)
            .iter()
            .any(|r| common::has_fields(r, &[("/event", "sink_failed"), ("/resource", "cloud")]))
    });
    let site_stats = site.stats();
    assert!(
        site_stats["sinks"]["cloud"].as_i64().unwrap_or(0) < 25,
        "the cloud cannot have confirmed: {site_stats}"
    );

    cloud_broker.restart(vitalmq_bin!(), Duration::from_secs(30));
    if !poll_until(Duration::from_secs(60), Duration::from_millis(250), || {
        cloud(25)
    }) {
        panic!(
            "the backlog did not drain to the cloud:\n--- site bridge\n{}\n--- cloud bridge\n{}\n--- site stats {}\n--- cloud events {}",
            site_bridge.process.all(),
            cloud_bridge.process.all(),
            site.stats(),
            store_rows(
                vitalmq_bin!(),
                "events",
                &cloud_dir.path().join("bridge-data")
            )
            .len()
        );
    }
    let cloud_events = store_rows(
        vitalmq_bin!(),
        "events",
        &cloud_dir.path().join("bridge-data"),
    );
    assert_eq!(
        seqs(&cloud_events),
        (0..25).collect::<Vec<_>>(),
        "in order, once each"
    );
    // Byte for byte: the cloud stored the very message the device signed.
    let site_events = site.rows("events");
    for (a, b) in site_events.iter().zip(&cloud_events) {
        assert_eq!(a["raw_sha256"], b["raw_sha256"]);
        assert_eq!(a["event_id"], b["event_id"]);
    }
    wait_until(Duration::from_secs(30), "site cursor at 25", || {
        site.stats()["sinks"]["cloud"].as_i64() == Some(25)
    });
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// Bad input from a connected device, published with mosquitto_pub: each message is
/// refused with its SPEC reason class and kept in quarantine (SHA-256 of the exact
/// bytes), audited, and the pipeline carries on with the next good message.
#[test]
fn refused_messages_are_quarantined_with_their_reason_and_the_pipeline_goes_on() {
    let rig = Rig::start(vitalmq_bin!(), "bridge-e2e-refusals", 2, |_| {});
    let _bridge = rig.bridge("", "");
    let topic = "devices/dev-00001/telemetry";
    let good = rig.signed("dev-00001", 1, 0);
    // Signed by dev-00002 (its kid), published on dev-00001's topic by dev-00001.
    let foreign = rig.signed("dev-00002", 1, 0);
    let mut forged = rig.signed("dev-00001", 1, 1);
    let last = forged.len() - 1;
    forged[last] ^= 0x01;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("malformed", b"not cbor at all".to_vec()),
        ("oversized", vec![0xd2; 65_537]),
        ("kid_mismatch", foreign),
        ("bad_signature", forged),
    ];
    for (_, bytes) in &cases {
        rig.mosquitto_pub("device", "dev-00001", topic, bytes);
    }
    rig.mosquitto_pub("device", "dev-00001", topic, &good);
    let st = rig.wait_stats(
        Duration::from_secs(30),
        "refusals and the good message",
        |st| {
            st["events"] == 1
                && st["quarantine"].as_object().map_or(0, serde_json::Map::len) == cases.len()
        },
    );
    let quarantine = rig.rows("quarantine");
    let reasons: Vec<&str> = quarantine
        .iter()
        .map(|q| q["reason"].as_str().expect("reason"))
        .collect();
    let expected: Vec<&str> = cases.iter().map(|(r, _)| *r).collect();
    assert_eq!(reasons, expected, "{st}");
    for ((_, bytes), q) in cases.iter().zip(&quarantine) {
        use sha2::Digest as _;
        assert_eq!(
            q["sha256"],
            hex::encode(sha2::Sha256::digest(bytes)),
            "the exact bytes are kept"
        );
        assert_eq!(q["topic"], topic);
    }
    let audit = std::fs::read_to_string(rig.data().join("audit.jsonl")).expect("audit");
    for reason in expected {
        assert!(
            audit
                .lines()
                .any(|l| l.contains("\"event\":\"message_refused\"")
                    && l.contains(&format!("\"reason\":\"{reason}\""))),
            "{reason} audited"
        );
    }
}

/// `epoch` = u64::MAX locks a device out for good: no later epoch exists and a lower one
/// is `replay` (SPEC section 4). `vitalmq store reset-sequence`, run while the bridge
/// runs, lets it back in: the bridge applies the request before its next batch (its
/// in-memory window, not only the stored one, is forgotten), and the reset is in the
/// operator audit log (who, why) and in the bridge's (what it removed).
#[test]
fn an_operator_reset_lets_a_locked_out_device_back_in_while_the_bridge_runs() {
    let rig = Rig::start(vitalmq_bin!(), "bridge-reset", 2, |_| {});
    let _bridge = rig.bridge("", "");
    publish_signed(&rig, "dev-00001", 1, 0..1);
    publish_signed(&rig, "dev-00001", u64::MAX, 0..1);
    wait_stored(&rig, 2, 0, 0);
    publish_signed(&rig, "dev-00001", 1, 1..2);
    wait_stored(&rig, 2, 0, 1);
    assert_eq!(rig.stats()["counters"]["replay"], 1, "locked out");

    let data = rig.data();
    let ran = vitalmq_ok(
        vitalmq_bin!(),
        &[
            "store",
            "reset-sequence",
            "--data",
            s(&data),
            "--device",
            "dev-00001",
            "--reason",
            "epoch overflow, ticket 4711",
        ],
    );
    let request: Json = serde_json::from_str(ran.stdout.trim()).expect("request JSON");
    assert_eq!(request["device"], "dev-00001");

    // The device, re-keyed, boots into epoch 1 again: (1, 0) is stored already and is a
    // duplicate (it used to fail the commit and stop the recorder), what follows is new.
    publish_signed(&rig, "dev-00001", 1, 0..3);
    wait_stored(&rig, 4, 0, 2);
    assert_eq!(rig.stats()["counters"]["duplicate"], 1);
    let events = rig.rows("events");
    let epochs: Vec<(u64, u64)> = events
        .iter()
        .map(|e| {
            (
                e["epoch"].as_u64().expect("epoch"),
                e["seq"].as_u64().expect("seq"),
            )
        })
        .collect();
    assert_eq!(epochs, [(1, 0), (u64::MAX, 0), (1, 1), (1, 2)]);

    let applied = vitalmq_bridge::store::Store::open(&data)
        .expect("store")
        .sequence_reset(request["id"].as_i64().expect("id"))
        .expect("read")
        .expect("recorded");
    assert!(applied.applied_at_ms.is_some(), "{applied:?}");
    assert_eq!(applied.previous.as_deref(), Some("18446744073709551615:0"));

    let records = |path: &Path| -> Vec<Json> {
        std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let bridge_audit = records(&data.join("audit.jsonl"));
    let reset = bridge_audit
        .iter()
        .find(|r| r["action"] == "sequence_reset")
        .unwrap_or_else(|| panic!("no sequence_reset in the bridge's audit log"));
    assert_eq!(reset["component"], "bridge");
    assert_eq!(reset["resource"], "dev-00001");
    assert_eq!(reset["decision"], "allow");
    assert_eq!(reset["details"]["previous"], "18446744073709551615:0");
    assert_eq!(
        reset["details"]["request_reason"],
        "epoch overflow, ticket 4711"
    );
    let operator = records(&data.join("operator-audit/operator.jsonl"));
    let outcomes: Vec<&str> = operator
        .iter()
        .filter(|r| r["action"] == "store.reset_sequence")
        .map(|r| r["reason"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(outcomes, ["started", "succeeded"]);
    assert!(
        operator
            .iter()
            .any(|r| r["action"] == "store.reset_sequence" && r["resource"] == "dev-00001"),
        "{operator:?}"
    );
}
