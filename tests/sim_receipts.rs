//! Simulated wearables keep every message until a receipt covers it (SPEC section 4),
//! end to end: the real `vitalmq broker` (fresh `vitalmq certs init` PKI, the shipped
//! ACL), `vitalmq sim` as a subprocess, and a stand-in for the bridge written here.
//!
//! The stand-in connects with the PKI's bridge identity, subscribes to
//! `devices/+/telemetry` and `devices/+/status`, verifies every message against the
//! registry with `vitalmq_envelope::verify`, and publishes cumulative receipts
//! `{"epoch", "seq"}` (CBOR, encoded here with ciborium, independently of the simulator)
//! to `devices/{id}/ack`: for each device, the highest seq up to which it has every
//! message of the device's newest epoch, at most every 100 ms, and again whenever a
//! duplicate arrives (a duplicate is acknowledged, as the SPEC requires, so a device
//! whose receipt was lost learns it after resending). In these runs each device has one
//! epoch, so "contiguous from 0 in the newest epoch" is exactly what a bridge may receipt.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{BrokerProcess, Spawned, run, temp_dir};
use serde_json::Value as Json;
use vitalmq_envelope::{DeviceId, MessageType, verify};
use vitalmq_policies::DeviceRegistry;

const TRUST_DOMAIN: &str = "demo.vitalmq";
const DEVICES: [&str; 2] = ["dev-00001", "dev-00002"];
const COUNT: u64 = 50;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_vitalmq"))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// A PKI with 4 devices on 2 sites and the broker in front of it with the shipped ACL.
struct Setup {
    tmp: tempfile::TempDir,
    pki: PathBuf,
    broker: BrokerProcess,
}

impl Setup {
    fn start(name: &str) -> Self {
        let tmp = temp_dir(&format!("vitalmq-sim-{name}"));
        let pki = tmp.path().join("pki");
        let ran = run(
            Command::new(bin()).args([
                "certs",
                "init",
                "--dir",
                s(&pki),
                "--trust-domain",
                TRUST_DOMAIN,
                "--devices",
                "4",
                "--sites",
                "2",
            ]),
            Duration::from_secs(30),
        );
        assert!(ran.success, "certs init:\n{}", ran.all());
        let acl = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/examples/acl.toml");
        std::fs::copy(acl, tmp.path().join("acl.toml")).expect("copy the ACL");
        let config = common::broker_config(TRUST_DOMAIN);
        let broker = BrokerProcess::start(bin(), tmp.path(), &config, Duration::from_secs(20));
        Self { tmp, pki, broker }
    }

    /// `vitalmq sim` against this broker with a fresh state directory.
    fn sim(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new(bin());
        cmd.env("NO_COLOR", "1")
            .env("RUST_LOG", "info,rumqttc=warn")
            .args(["sim", "--pki", s(&self.pki), "--broker"])
            .arg(format!("127.0.0.1:{}", self.broker.port))
            .arg("--state")
            .arg(self.tmp.path().join("sim-state"))
            .args(["--devices", "2", "--count", &COUNT.to_string()])
            .args(extra);
        cmd
    }
}

// ---------------------------------------------------------------------------------------
// The stand-in bridge

/// What the stand-in observed.
#[derive(Debug, Default, Clone)]
struct Seen {
    /// Per device, per (epoch, seq): how often it arrived.
    counts: BTreeMap<String, BTreeMap<(u64, u64), u32>>,
    /// Per device, the (epoch, seq) of each message in the order it first arrived.
    first_arrivals: BTreeMap<String, Vec<(u64, u64)>>,
    /// Messages that failed verification or arrived on a topic they do not belong to.
    refused: Vec<String>,
    /// Every verified message at its first arrival, per device.
    verified: BTreeMap<String, Vec<vitalmq_envelope::Telemetry>>,
    receipts_sent: u64,
    connects: u64,
    /// SUBACKs received: the stand-in is ready once both filters are in place.
    subacks: u64,
    /// The stand-in's last connection error, for the failure message.
    last_error: Option<String>,
}

impl Seen {
    fn distinct(&self, device: &str) -> usize {
        self.counts.get(device).map_or(0, BTreeMap::len)
    }

    fn duplicates(&self, device: &str) -> u32 {
        self.counts
            .get(device)
            .map_or(0, |m| m.values().map(|n| n - 1).sum())
    }

    /// The cumulative receipt the stand-in may give a device: every message of its
    /// newest epoch from seq 0 up to the returned one has arrived.
    fn receipt_for(&self, device: &str) -> Option<(u64, u64)> {
        let keys = self.counts.get(device)?;
        let &(epoch, _) = keys.keys().next_back()?;
        let mut upto = None;
        for seq in 0.. {
            if !keys.contains_key(&(epoch, seq)) {
                break;
            }
            upto = Some((epoch, seq));
        }
        upto
    }
}

/// The stand-in bridge, on its own thread and runtime; stopped on drop.
struct StandIn {
    seen: Arc<Mutex<Seen>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StandIn {
    fn start(pki: &Path, broker: &BrokerProcess) -> Self {
        let port = broker.port;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        let pki = pki.to_path_buf();
        let shared = Arc::clone(&seen);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(stand_in(&pki, port, shared, stop_rx));
        });
        let standin = Self {
            seen,
            stop: Some(stop),
            thread: Some(thread),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        // Ready at the SUBACKs, not at the CONNACK: a device publishing in between
        // would have its first messages routed to nobody (and resent out of order).
        while standin.snapshot().subacks < 2 {
            assert!(
                Instant::now() < deadline,
                "stand-in bridge did not connect; its last error: {:?}\nbroker:\n{}",
                standin.snapshot().last_error,
                broker.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        standin
    }

    fn snapshot(&self) -> Seen {
        self.seen.lock().expect("seen lock").clone()
    }

    /// Waits until `pred` holds for what was seen; false after `timeout`.
    fn wait_for(&self, timeout: Duration, pred: impl Fn(&Seen) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if pred(&self.snapshot()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn receipt_cbor(epoch: u64, seq: u64) -> Vec<u8> {
    use ciborium::value::Value;
    let map = Value::Map(vec![
        (Value::Text("epoch".into()), Value::Integer(epoch.into())),
        (Value::Text("seq".into()), Value::Integer(seq.into())),
    ]);
    let mut out = Vec::new();
    ciborium::ser::into_writer(&map, &mut out).expect("encode receipt");
    out
}

async fn stand_in(
    pki: &Path,
    port: u16,
    seen: Arc<Mutex<Seen>>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};

    let registry = DeviceRegistry::load(&pki.join("registry.toml")).expect("registry");
    let identity = vitalmq_device_sim::pki::Pki::open(pki)
        .and_then(|p| p.identity("bridge", "bridge-01"))
        .expect("bridge identity");
    let mut options = MqttOptions::new("bridge-01", "127.0.0.1", port);
    options
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            identity.tls,
        )))
        .set_keep_alive(Duration::from_secs(5))
        .set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(options, 256);
    let mut flush = tokio::time::interval(Duration::from_millis(100));
    let mut dirty: BTreeSet<String> = BTreeSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => return,
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    seen.lock().expect("seen lock").connects += 1;
                    // A clean session each time: subscribe again after every reconnect.
                    for filter in ["devices/+/telemetry", "devices/+/status"] {
                        client.try_subscribe(filter, QoS::AtLeastOnce).expect("subscribe");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    seen.lock().expect("seen lock").subacks += 1;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let mut parts = p.topic.split('/');
                    let (Some("devices"), Some(id), Some(kind), None) =
                        (parts.next(), parts.next(), parts.next(), parts.next())
                    else {
                        continue;
                    };
                    let device = DeviceId::new(id).expect("device id in topic");
                    let mut seen = seen.lock().expect("seen lock");
                    match verify(&p.payload, &registry, Some(&device)) {
                        Ok(t) => {
                            let expected: &[MessageType] = match kind {
                                "telemetry" => &[MessageType::Vitals, MessageType::Alarm],
                                _ => &[MessageType::Status],
                            };
                            if !expected.contains(&t.kind) {
                                seen.refused.push(format!("{} on {}", t.kind, p.topic));
                            }
                            let n = seen
                                .counts
                                .entry(id.to_owned())
                                .or_default()
                                .entry((t.epoch, t.seq))
                                .or_default();
                            *n += 1;
                            if *n == 1 {
                                seen.first_arrivals
                                    .entry(id.to_owned())
                                    .or_default()
                                    .push((t.epoch, t.seq));
                                seen.verified
                                    .entry(id.to_owned())
                                    .or_default()
                                    .push(t.into_inner());
                            }
                            dirty.insert(id.to_owned());
                        }
                        Err(refusal) => seen.refused.push(format!("{}: {refusal}", p.topic)),
                    }
                }
                Ok(_) => {}
                // The broker is away; rumqttc reconnects on the next poll.
                Err(e) => {
                    seen.lock().expect("seen lock").last_error = Some(e.to_string());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = flush.tick() => {
                let mut seen = seen.lock().expect("seen lock");
                for id in std::mem::take(&mut dirty) {
                    if let Some((epoch, seq)) = seen.receipt_for(&id) {
                        let topic = format!("devices/{id}/ack");
                        if client
                            .try_publish(topic, QoS::AtLeastOnce, false, receipt_cbor(epoch, seq))
                            .is_ok()
                        {
                            seen.receipts_sent += 1;
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Checks

/// The summary line `vitalmq sim` printed.
fn summary(stdout: &str) -> Json {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON summary on stdout:\n{stdout}"));
    serde_json::from_str(line).expect("summary is JSON")
}

/// Every device's summary says all of its 50 messages (epoch 1, seq 0..49) are receipted.
fn assert_all_receipted(summary: &Json) {
    assert_eq!(summary["all_receipted"], true, "{summary:#}");
    let devices = summary["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), DEVICES.len());
    for (d, id) in devices.iter().zip(DEVICES) {
        assert_eq!(d["id"], id);
        assert_eq!(d["epoch"], 1, "{d}");
        assert_eq!(d["highest_seq"], COUNT - 1, "{d}");
        assert_eq!(d["receipted"]["epoch"], 1, "{d}");
        assert_eq!(d["receipted"]["seq"], COUNT - 1, "{d}");
        assert_eq!(d["unreceipted"], 0, "{d}");
        assert_eq!(d["overflow_dropped"], 0, "{d}");
        assert_eq!(
            d["sent"], COUNT,
            "every message sent once, then maybe resent: {d}"
        );
    }
    assert_eq!(summary["totals"]["unreceipted"], 0);
}

/// The stand-in saw every (1, 0..49) of both devices, each verified.
fn assert_saw_everything(seen: &Seen) {
    assert!(seen.refused.is_empty(), "refused: {:?}", seen.refused);
    for id in DEVICES {
        let keys: Vec<(u64, u64)> = seen.counts[id].keys().copied().collect();
        let want: Vec<(u64, u64)> = (0..COUNT).map(|s| (1, s)).collect();
        assert_eq!(keys, want, "{id}");
    }
}

#[test]
fn every_message_is_receipted() {
    let setup = Setup::start("receipts");
    let standin = StandIn::start(&setup.pki, &setup.broker);
    let t = Instant::now();
    let ran = run(
        &mut setup.sim(&["--rate", "25", "--until-receipted", "30s"]),
        Duration::from_secs(40),
    );
    let took = t.elapsed();
    assert!(
        ran.success,
        "vitalmq sim failed ({:?}):\n{}",
        ran.code,
        ran.all()
    );
    assert!(
        ran.stderr
            .contains("vitalmq sim: 2 devices connected to 127.0.0.1:"),
        "no ready line:\n{}",
        ran.stderr
    );
    assert_eq!(
        ran.stdout.lines().filter(|l| !l.trim().is_empty()).count(),
        1,
        "one summary line:\n{}",
        ran.stdout
    );
    let summary = summary(&ran.stdout);
    assert_all_receipted(&summary);
    let seen = standin.snapshot();
    assert_saw_everything(&seen);
    eprintln!(
        "sim took {took:?}; duplicates {:?}; receipts sent {}",
        DEVICES.map(|d| seen.duplicates(d)),
        seen.receipts_sent
    );
}

#[test]
fn broker_crash_loses_nothing() {
    let mut setup = Setup::start("crash");
    let standin = StandIn::start(&setup.pki, &setup.broker);
    let t = Instant::now();
    let mut sim = Spawned::start(&mut setup.sim(&[
        "--rate",
        "10",
        "--until-receipted",
        "20s",
        "--resend-after",
        "2s",
        "--backoff-max",
        "1s",
    ]));
    // Midway: a good part of both devices' messages has arrived.
    assert!(
        standin.wait_for(Duration::from_secs(15), |s| DEVICES
            .iter()
            .all(|d| s.distinct(d) >= 15)),
        "messages did not arrive before the crash:\n{}",
        sim.all()
    );
    setup.broker.kill9();
    let at_crash = standin.snapshot();
    // The devices keep running while the broker is away: each notices the loss and
    // fails at least one reconnect before the broker is back.
    for what in ["connection lost", "connect failed"] {
        assert!(
            sim.wait_output(Duration::from_secs(15), |out| out.matches(what).count()
                >= DEVICES.len()),
            "not every device logged {what}:\n{}",
            sim.all()
        );
    }
    assert!(
        sim.running(),
        "the simulator survives the crash:\n{}",
        sim.all()
    );
    setup.broker.restart(bin(), Duration::from_secs(15));
    let ran = sim.finish(Duration::from_secs(30));
    let took = t.elapsed();
    assert!(
        ran.success,
        "vitalmq sim failed ({:?}):\n{}",
        ran.code,
        ran.all()
    );
    let summary = summary(&ran.stdout);
    assert_all_receipted(&summary);
    for d in summary["devices"].as_array().expect("devices") {
        assert!(d["connects"].as_u64() >= Some(2), "reconnected: {d}");
    }
    let seen = standin.snapshot();
    assert_saw_everything(&seen);
    assert!(seen.connects >= 2, "the stand-in reconnected too");
    eprintln!(
        "crash after {:?} distinct; sim took {took:?}; resent {}; duplicates at the stand-in {:?}; receipts sent {}",
        DEVICES.map(|d| at_crash.distinct(d)),
        summary["totals"]["resent"],
        DEVICES.map(|d| seen.duplicates(d)),
        seen.receipts_sent
    );
}

/// Simulated reboots every 20 messages (over MQTT 5): each reboot makes a new epoch
/// durable before its first message, and the older epoch's backlog always arrives before
/// anything of the newer one.
#[test]
fn reboots_send_the_older_epoch_first() {
    let setup = Setup::start("reboot");
    let standin = StandIn::start(&setup.pki, &setup.broker);
    let ran = run(
        &mut setup.sim(&[
            "--rate",
            "25",
            "--reboot-every",
            "20",
            "--mqtt-version",
            "5",
            "--until-receipted",
            "30s",
        ]),
        Duration::from_secs(40),
    );
    assert!(
        ran.success,
        "vitalmq sim failed ({:?}):\n{}",
        ran.code,
        ran.all()
    );
    let summary = summary(&ran.stdout);
    assert_eq!(summary["all_receipted"], true, "{summary:#}");
    // 50 messages: epoch 1 seq 0..19, epoch 2 seq 0..19, epoch 3 seq 0..9.
    let want: Vec<(u64, u64)> = (0..20)
        .map(|s| (1, s))
        .chain((0..20).map(|s| (2, s)))
        .chain((0..10).map(|s| (3, s)))
        .collect();
    let seen = standin.snapshot();
    assert!(seen.refused.is_empty(), "refused: {:?}", seen.refused);
    for (d, id) in summary["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .zip(DEVICES)
    {
        assert_eq!(d["epoch"], 3, "{d}");
        assert_eq!(d["reboots"], 2, "{d}");
        assert_eq!(d["highest_seq"], 9, "{d}");
        assert_eq!(d["receipted"]["epoch"], 3, "{d}");
        assert_eq!(d["receipted"]["seq"], 9, "{d}");
        assert_eq!(d["sent"], COUNT, "{d}");
        assert_eq!(
            std::fs::read_to_string(setup.tmp.path().join(format!("sim-state/{id}.epoch")))
                .expect("epoch file"),
            "3\n"
        );
        let keys: Vec<(u64, u64)> = seen.counts[id].keys().copied().collect();
        assert_eq!(keys, want, "{id}");
        assert_eq!(
            seen.first_arrivals[id], want,
            "{id}: first arrivals in (epoch, seq) order"
        );
    }
}

/// Issue 17: a scripted alarm is raised and cleared in verified `alarm` messages, every
/// status carries `battery`, `charging`, `interval_s` and `dropped`, and a forged-only
/// device's every message is refused as bad_signature while the run still counts as
/// all receipted (the forged device is left out and says so).
#[test]
fn alarms_status_keys_and_a_forged_only_device() {
    let setup = Setup::start("alarms");
    let standin = StandIn::start(&setup.pki, &setup.broker);
    let ran = run(
        &mut setup.sim(&[
            "--rate",
            "10",
            "--status-every",
            "1s",
            "--alarm-episode",
            "dev-00001:arrhythmia:urgent:at=1s:for=1s",
            "--battery",
            "0.5",
            "--forged-only",
            "dev-00002",
            "--until-receipted",
            "30s",
        ]),
        Duration::from_secs(60),
    );
    assert!(
        ran.success,
        "vitalmq sim failed ({:?}):\n{}",
        ran.code,
        ran.all()
    );
    let summary = summary(&ran.stdout);
    assert_eq!(summary["all_receipted"], true, "{summary:#}");
    let (honest, forged) = (&summary["devices"][0], &summary["devices"][1]);
    assert_eq!(honest["alarms"], 2, "{honest}");
    assert!(honest.get("forged_only").is_none(), "{honest}");
    assert_eq!(honest["all_receipted"], true, "{honest}");
    assert_eq!(forged["forged_only"], true, "{forged}");
    assert_eq!(forged["all_receipted"], false, "{forged}");
    assert!(forged.get("alarms").is_none(), "{forged}");

    let seen = standin.snapshot();
    let messages = &seen.verified["dev-00001"];
    let alarms: Vec<_> = messages.iter().filter_map(|t| t.alarm()).collect();
    assert_eq!(alarms.len(), 2, "raised and cleared: {alarms:?}");
    assert!(alarms[0].active && !alarms[1].active, "{alarms:?}");
    assert!(alarms.iter().all(|a| a.code.as_str() == "arrhythmia"));
    assert!(
        messages
            .iter()
            .filter(|t| t.kind == MessageType::Alarm)
            .all(|t| t.model.as_deref() == Some("arrhythmia-net/2.1.0"))
    );
    let statuses: Vec<_> = messages
        .iter()
        .filter(|t| t.kind == MessageType::Status)
        .map(|t| t.status())
        .collect();
    assert!(!statuses.is_empty(), "status messages arrive");
    for s in &statuses {
        assert_eq!(s.interval_s, Some(1), "{s:?}");
        assert_eq!(s.charging, Some(false), "{s:?}");
        assert_eq!(s.dropped, Some(0), "{s:?}");
        assert!(s.battery.is_some_and(|b| b <= 0.5 && b > 0.4), "{s:?}");
    }

    assert!(
        !seen.verified.contains_key("dev-00002"),
        "nothing forged verifies"
    );
    let forged_refusals: Vec<_> = seen
        .refused
        .iter()
        .filter(|r| r.starts_with("devices/dev-00002/"))
        .collect();
    assert!(!forged_refusals.is_empty(), "the forged messages arrive");
    assert!(
        forged_refusals.iter().all(|r| r.contains("bad_signature")),
        "{forged_refusals:?}"
    );
    assert_eq!(
        forged_refusals.len(),
        seen.refused.len(),
        "only the forged device is refused: {:?}",
        seen.refused
    );
}

/// Issue 17: a device told `--silent-after` stops publishing at that time but keeps its
/// one connection until the run ends, while the others go on.
#[test]
fn a_silent_device_stops_publishing_but_stays_connected() {
    let setup = Setup::start("silent");
    let standin = StandIn::start(&setup.pki, &setup.broker);
    let ran = run(
        &mut setup.sim(&[
            "--rate",
            "10",
            "--duration",
            "4s",
            "--silent-after",
            "dev-00001@1s",
        ]),
        Duration::from_secs(60),
    );
    assert!(
        ran.success,
        "vitalmq sim failed ({:?}):\n{}",
        ran.code,
        ran.all()
    );
    assert!(ran.stderr.contains("going silent"), "{}", ran.stderr);
    let summary = summary(&ran.stdout);
    let (silent, talking) = (&summary["devices"][0], &summary["devices"][1]);
    assert_eq!(silent["connects"], 1, "never reconnected: {silent}");
    assert_eq!(talking["connects"], 1, "{talking}");
    let silent_vitals = silent["vitals"].as_u64().expect("vitals");
    let talking_vitals = talking["vitals"].as_u64().expect("vitals");
    assert!(
        (5..=15).contains(&silent_vitals),
        "about a second of vitals: {silent}"
    );
    assert!(talking_vitals >= 30, "the other device went on: {talking}");
    let seen = standin.snapshot();
    assert_eq!(
        seen.distinct("dev-00001") as u64,
        silent["sent"].as_u64().expect("sent"),
        "what the silent device made before its time, nothing after"
    );
    assert!(seen.refused.is_empty(), "{:?}", seen.refused);
}
