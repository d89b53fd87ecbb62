//! The bridge end to end across real processes: `vitalmq broker`, `vitalmq bridge`,
//! and publishers nobody here wrote (mosquitto_pub) or the device simulator. What the
//! bridge stored is read back with `vitalmq store` (and its audit log checked).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{BridgeProcess, BrokerProcess, Ran, broker_config, run, store_rows, temp_dir};
use serde_json::Value as Json;

const TRUST_DOMAIN: &str = "demo.vitalmq";
const CLIENT: Duration = Duration::from_secs(15);
const START: Duration = Duration::from_secs(30);

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_vitalmq"))
}

fn vitalmq(args: &[&str]) -> Ran {
    let ran = run(Command::new(bin()).args(args), CLIENT);
    assert!(ran.success, "vitalmq {args:?} failed:\n{}", ran.all());
    ran
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/vectors")
}

fn read_json(path: &Path) -> Json {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A PKI with `devices` devices on 2 sites, the shipped ACL, and a running broker.
struct System {
    tmp: tempfile::TempDir,
    broker: BrokerProcess,
}

impl System {
    fn start(name: &str, devices: u32, prepare: impl FnOnce(&Path)) -> Self {
        let tmp = temp_dir(&format!("vitalmq-bridge-e2e-{name}"));
        let pki = tmp.path().join("pki");
        vitalmq(&[
            "certs",
            "init",
            "--dir",
            s(&pki),
            "--trust-domain",
            TRUST_DOMAIN,
            "--devices",
            &devices.to_string(),
            "--sites",
            "2",
        ]);
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/examples/acl.toml"),
            tmp.path().join("acl.toml"),
        )
        .expect("copy the ACL");
        prepare(tmp.path());
        let broker = BrokerProcess::start(bin(), tmp.path(), &broker_config(TRUST_DOMAIN), START);
        Self { tmp, broker }
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    fn pki(&self) -> PathBuf {
        self.dir().join("pki")
    }

    fn data(&self) -> PathBuf {
        self.dir().join("bridge-data")
    }

    fn bridge(&self, sinks: &str) -> BridgeProcess {
        BridgeProcess::start(
            bin(),
            self.dir(),
            &BridgeProcess::config(self.broker.port, sinks),
            START,
        )
    }

    /// One QoS 1 PUBLISH of `payload` with mosquitto_pub as device `id`.
    fn mosquitto_pub(&self, id: &str, topic: &str, payload: &[u8]) {
        let file = self.dir().join("payload.bin");
        std::fs::write(&file, payload).expect("write payload");
        let identities = self.pki().join("identities/device");
        let ran = run(
            Command::new("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &self.broker.port.to_string()])
                .arg("--cafile")
                .arg(self.pki().join("ca/ca.pem"))
                .arg("--cert")
                .arg(identities.join(format!("{id}.pem")))
                .arg("--key")
                .arg(identities.join(format!("{id}.key.pem")))
                .args(["-i", id, "-V", "mqttv311", "-q", "1", "-t", topic, "-f"])
                .arg(&file),
            CLIENT,
        );
        assert!(
            ran.success,
            "mosquitto_pub as {id} to {topic}: {}",
            ran.all()
        );
    }

    fn rows(&self, kind: &str) -> Vec<Json> {
        store_rows(bin(), kind, &self.data())
    }

    fn stats(&self) -> Json {
        self.rows("stats").remove(0)
    }

    /// Waits until the bridge has stored `events` events and `refused` quarantined
    /// messages, and counted `rejected` duplicates + replays.
    fn wait_stored(&self, events: u64, refused: u64, rejected: u64, within: Duration) -> Json {
        let deadline = Instant::now() + within;
        loop {
            let st = self.stats();
            let quarantined: u64 = st["quarantine"]
                .as_object()
                .map_or(0, |m| m.values().filter_map(Json::as_u64).sum());
            let counted = st["counters"]["duplicate"].as_u64().unwrap_or(0)
                + st["counters"]["replay"].as_u64().unwrap_or(0);
            if st["events"].as_u64() == Some(events)
                && quarantined == refused
                && counted == rejected
            {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "bridge store did not reach {events}/{refused}/{rejected} within {within:?}: {st}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Gives `device` the vectors' public key (keys.json) in the PKI's registry, after
/// issuing it an identity certificate at site-01.
fn enroll_vector_device(dir: &Path, device: &str) {
    let pki = dir.join("pki");
    vitalmq(&[
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
    ]);
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
    let system = System::start("replay", 2, |dir| {
        enroll_vector_device(dir, "dev-00042");
        enroll_vector_device(dir, "dev-00077");
    });
    let _bridge = system.bridge("");
    let (mut accepted, mut invalid, mut rejected) = (Vec::new(), 0u64, 0u64);
    let mut expected_gaps = Vec::new();
    for scenario in &scenarios {
        let mut highest: Option<(u64, u64)> = None;
        for step in scenario["steps"].as_array().expect("steps") {
            let device = step["device"].as_str().expect("device");
            let bytes = hex::decode(step["cose_sign1_hex"].as_str().expect("hex")).expect("hex");
            system.mosquitto_pub(device, &format!("devices/{device}/telemetry"), &bytes);
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
    system.wait_stored(
        accepted.len() as u64,
        invalid,
        rejected,
        Duration::from_secs(30),
    );
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
    vitalmq(&["audit", "verify", s(&audit)]);
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
}
