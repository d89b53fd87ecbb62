//! Durability across crashes (SPEC section 4): receipt-keeping simulated devices
//! (`vitalmq sim`) stream through the real broker into the real bridge while the bridge,
//! the broker, or both are killed with `kill -9` and restarted. Afterwards every message
//! a device sent is stored exactly once: the stored `(device, epoch, seq)` set equals
//! what the devices made, with no duplicates, and every device holds a receipt for all
//! of it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    BridgeProcess, BrokerProcess, Ran, Spawned, broker_config, run, store_rows, temp_dir,
};
use serde_json::Value as Json;

const TRUST_DOMAIN: &str = "demo.vitalmq";
const START: Duration = Duration::from_secs(30);
const DEVICES: u32 = 8;
const PER_DEVICE: u32 = 200;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_vitalmq"))
}

fn vitalmq(args: &[&str]) -> Ran {
    let ran = run(Command::new(bin()).args(args), Duration::from_secs(20));
    assert!(ran.success, "vitalmq {args:?} failed:\n{}", ran.all());
    ran
}

struct Rig {
    tmp: tempfile::TempDir,
    broker: BrokerProcess,
    bridge: Option<BridgeProcess>,
}

impl Rig {
    fn start(name: &str) -> Self {
        let tmp = temp_dir(&format!("vitalmq-durability-{name}"));
        let pki = tmp.path().join("pki");
        vitalmq(&[
            "certs",
            "init",
            "--dir",
            pki.to_str().expect("utf-8"),
            "--trust-domain",
            TRUST_DOMAIN,
            "--devices",
            &DEVICES.to_string(),
            "--sites",
            "2",
        ]);
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/examples/acl.toml"),
            tmp.path().join("acl.toml"),
        )
        .expect("copy the ACL");
        let broker = BrokerProcess::start(bin(), tmp.path(), &broker_config(TRUST_DOMAIN), START);
        let mut rig = Self {
            tmp,
            broker,
            bridge: None,
        };
        rig.start_bridge();
        rig
    }

    fn start_bridge(&mut self) {
        // A window comfortably larger than what a device sends while a lost message
        // waits for its resend (20/s x (1 s resend timeout + reconnects)): a gap that fell
        // out of the window would be receipted as lost (SPEC section 4).
        let config = BridgeProcess::config_with(self.broker.port, "window = 1024", "");
        self.bridge = Some(BridgeProcess::start(bin(), self.tmp.path(), &config, START));
    }

    fn kill_bridge(&mut self) {
        if let Some(mut b) = self.bridge.take() {
            b.process.kill9();
        }
    }

    fn data(&self) -> PathBuf {
        self.tmp.path().join("bridge-data")
    }

    /// `vitalmq sim` in the background: DEVICES devices, PER_DEVICE messages each.
    fn sim(&self) -> Spawned {
        Spawned::start(
            Command::new(bin())
                .args(["sim", "--pki"])
                .arg(self.tmp.path().join("pki"))
                .arg("--broker")
                .arg(format!("127.0.0.1:{}", self.broker.port))
                .arg("--state")
                .arg(self.tmp.path().join("sim-state"))
                .args([
                    "--devices",
                    &DEVICES.to_string(),
                    "--count",
                    &PER_DEVICE.to_string(),
                ])
                .args([
                    "--rate",
                    "40",
                    "--resend-after",
                    "3s",
                    "--until-receipted",
                    "120s",
                ]),
        )
    }

    fn diagnostics(&self) -> String {
        format!(
            "broker:\n{}\nbridge:\n{}",
            tail(&self.broker.stderr()),
            self.bridge
                .as_ref()
                .map_or_else(String::new, |b| tail(&b.process.all()))
        )
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Waits for the simulator's summary and checks the store against it.
fn assert_exactly_once(rig: &Rig, mut sim: Spawned) {
    let ran = sim.finish(Duration::from_secs(180));
    let summary: Json = ran
        .stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "no summary from vitalmq sim:\n{}\n{}",
                ran.all(),
                rig.diagnostics()
            )
        });
    assert!(
        ran.success && summary["all_receipted"] == true,
        "not everything receipted: {summary}\n{}",
        rig.diagnostics()
    );
    let mut made: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for d in summary["devices"].as_array().expect("devices") {
        made.insert(
            d["id"].as_str().expect("id").to_owned(),
            (
                d["epoch"].as_u64().expect("epoch"),
                d["highest_seq"].as_u64().expect("highest_seq"),
            ),
        );
    }
    assert_eq!(made.len(), DEVICES as usize);
    let events = store_rows(bin(), "events", &rig.data());
    let mut stored: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut ids = BTreeSet::new();
    for e in &events {
        let device = e["device"].as_str().expect("device").to_owned();
        assert_eq!(
            Some(e["epoch"].as_u64().expect("epoch")),
            made.get(&device).map(|m| m.0),
            "{e}"
        );
        stored
            .entry(device)
            .or_default()
            .push(e["seq"].as_u64().expect("seq"));
        assert!(
            ids.insert(e["event_id"].as_str().expect("event_id").to_owned()),
            "stored twice: {e}"
        );
    }
    for (device, (_, highest)) in &made {
        let mut seqs = stored.remove(device).unwrap_or_default();
        seqs.sort_unstable();
        let expected: Vec<u64> = (0..=*highest).collect();
        assert_eq!(
            seqs.len(),
            expected.len(),
            "{device}: {} stored, {} made",
            seqs.len(),
            expected.len()
        );
        assert_eq!(seqs, expected, "{device}: every message exactly once");
        assert!(
            *highest + 1 >= u64::from(PER_DEVICE),
            "{device} made {} messages",
            highest + 1
        );
    }
    assert!(
        stored.is_empty(),
        "events of devices the simulator did not run: {stored:?}"
    );
    let lost: Vec<Json> = store_rows(bin(), "gaps", &rig.data())
        .into_iter()
        .filter(|g| g["state"] != "closed")
        .collect();
    assert!(
        lost.is_empty(),
        "every gap must have been filled by resends: {lost:?}"
    );
    let quarantine = store_rows(bin(), "quarantine", &rig.data());
    assert!(
        quarantine.is_empty(),
        "nothing should be refused: {quarantine:?}"
    );
}

#[test]
fn every_message_is_stored_exactly_once_while_the_bridge_is_killed_repeatedly() {
    let mut rig = Rig::start("bridge-kill");
    let sim = rig.sim();
    for round in 0..4 {
        std::thread::sleep(Duration::from_millis(1500));
        rig.kill_bridge();
        std::thread::sleep(Duration::from_millis(300 * round));
        rig.start_bridge();
    }
    assert_exactly_once(&rig, sim);
    // A message of an older boot (epoch) replayed after all this is refused as a
    // replay, never stored, and audited.
    let before = store_rows(bin(), "stats", &rig.data())[0]["counters"]["replay"]
        .as_u64()
        .unwrap_or(0);
    let pki = rig.tmp.path().join("pki");
    let msg = rig.tmp.path().join("old.cbor");
    let key = pki.join("devices/dev-00001/cose.key.pem");
    let epoch = store_rows(bin(), "events", &rig.data())
        .iter()
        .find(|e| e["device"] == "dev-00001")
        .and_then(|e| e["epoch"].as_u64())
        .expect("dev-00001 events");
    vitalmq(&[
        "envelope",
        "sign",
        "--key",
        key.to_str().expect("utf-8"),
        "--dev",
        "dev-00001",
        "--epoch",
        &(epoch - 1).to_string(),
        "--seq",
        "3",
        "--m",
        "spo2=97",
        "--output",
        msg.to_str().expect("utf-8"),
    ]);
    let ran = run(
        Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &rig.broker.port.to_string()])
            .arg("--cafile")
            .arg(pki.join("ca/ca.pem"))
            .arg("--cert")
            .arg(pki.join("identities/device/dev-00001.pem"))
            .arg("--key")
            .arg(pki.join("identities/device/dev-00001.key.pem"))
            .args([
                "-i",
                "dev-00001",
                "-q",
                "1",
                "-t",
                "devices/dev-00001/telemetry",
                "-f",
            ])
            .arg(&msg),
        Duration::from_secs(15),
    );
    assert!(ran.success, "{}", ran.all());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let st = &store_rows(bin(), "stats", &rig.data())[0];
        if st["counters"]["replay"].as_u64().unwrap_or(0) == before + 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replay was not refused: {st}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let st = &store_rows(bin(), "stats", &rig.data())[0];
    assert_eq!(
        st["events"].as_u64(),
        Some(u64::from(DEVICES * PER_DEVICE)),
        "the replay was not stored: {st}"
    );
    let audit = std::fs::read_to_string(rig.data().join("audit.jsonl")).expect("audit");
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"event\":\"replay\"") && l.contains("dev-00001"))
    );
    vitalmq(&[
        "audit",
        "verify",
        rig.data().join("audit.jsonl").to_str().expect("utf-8"),
    ]);
}

#[test]
fn every_message_is_stored_exactly_once_when_the_broker_is_killed() {
    let mut rig = Rig::start("broker-kill");
    let sim = rig.sim();
    for _ in 0..2 {
        std::thread::sleep(Duration::from_secs(2));
        rig.broker.kill9();
        std::thread::sleep(Duration::from_millis(500));
        rig.broker.restart(bin(), START);
    }
    assert_exactly_once(&rig, sim);
}

#[test]
fn every_message_is_stored_exactly_once_when_broker_and_bridge_die_together() {
    let mut rig = Rig::start("both-kill");
    let sim = rig.sim();
    std::thread::sleep(Duration::from_secs(3));
    rig.kill_bridge();
    rig.broker.kill9();
    std::thread::sleep(Duration::from_millis(500));
    rig.broker.restart(bin(), START);
    rig.start_bridge();
    assert_exactly_once(&rig, sim);
}
