//! Durability across crashes (SPEC section 4): receipt-keeping simulated devices
//! (`vitalmq sim`) stream through the real broker into the real bridge while the bridge,
//! the broker, or both are killed with `kill -9` and restarted. Afterwards every message
//! a device sent is stored exactly once: the stored `(device, epoch, seq)` set equals
//! what the devices made, with no duplicates, and every device holds a receipt for all
//! of it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{BridgeProcess, Rig, Spawned, sim_summary_all_receipted, vitalmq_ok, wait_until};
use serde_json::Value as Json;

const DEVICES: u32 = 10;
const PER_DEVICE: u32 = 300;

/// A rig with a bridge whose window comfortably exceeds what a device sends while a
/// lost message waits for its resend (20/s x (1 s resend timeout + reconnects)): a gap
/// that fell out of the window would be receipted as lost (SPEC section 4).
struct Durability {
    rig: Rig,
    bridge: Option<BridgeProcess>,
    _turn: std::sync::MutexGuard<'static, ()>,
}

/// The tests of this file run one at a time: each already loads both cores with a
/// broker, a bridge and ten devices, and overload would only measure the machine.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Durability {
    fn start(name: &str) -> Self {
        let turn = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let rig = Rig::start(
            vitalmq_bin!(),
            &format!("durability-{name}"),
            DEVICES,
            |_| {},
        );
        let mut d = Self {
            rig,
            bridge: None,
            _turn: turn,
        };
        d.start_bridge();
        d
    }

    fn start_bridge(&mut self) {
        self.bridge = Some(self.rig.bridge("window = 1024", ""));
    }

    /// `kill -9` of the bridge (restarted at once: its start takes long enough for the
    /// broker to hold what the devices send meanwhile).
    fn kill_bridge(&mut self) {
        if let Some(mut b) = self.bridge.take() {
            b.process.kill9();
        }
    }

    /// `kill -9` of the broker, then waits until every device has noticed (logged its
    /// connection lost): from then on the devices hold what they make in their outboxes.
    fn kill_broker(&mut self, sim: &Spawned) {
        let lost = connections_lost(sim);
        self.rig.broker.kill9();
        wait_until(
            EVENTUALLY,
            "every device noticed the broker is gone",
            || connections_lost(sim) >= lost + DEVICES as usize,
        );
    }

    fn sim(&self) -> Spawned {
        self.rig.sim(DEVICES, PER_DEVICE)
    }

    /// Waits until the store holds at least `n` events (the stream ran that far).
    fn wait_stored(&self, n: u64) -> u64 {
        let st = self
            .rig
            .wait_stats(EVENTUALLY, &format!("{n} events stored"), |st| {
                st["events"].as_u64() >= Some(n)
            });
        st["events"].as_u64().expect("events")
    }
}

/// How long a stream, a kill or a restart may take to show its effect.
const EVENTUALLY: Duration = Duration::from_secs(60);
/// Stored between two kills: well into the run (10 devices at 20/s store about 200 a
/// second), far from its end (3000).
const BETWEEN_KILLS: u64 = 300;

/// How many times the simulator's devices logged a lost connection.
fn connections_lost(sim: &Spawned) -> usize {
    sim.stderr().matches("connection lost").count()
}

/// Waits for the simulator's summary and checks the store against it.
fn assert_exactly_once(rig: &Rig, mut sim: Spawned) {
    let summary = sim_summary_all_receipted(&mut sim);
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
    let mut stored: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut ids = BTreeSet::new();
    for e in &rig.rows("events") {
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
        assert_eq!(
            seqs,
            (0..=*highest).collect::<Vec<u64>>(),
            "{device}: every message exactly once"
        );
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
    let unfilled: Vec<Json> = rig
        .rows("gaps")
        .into_iter()
        .filter(|g| g["state"] != "closed")
        .collect();
    assert!(
        unfilled.is_empty(),
        "every gap must have been filled by resends: {unfilled:?}"
    );
    let quarantine = rig.rows("quarantine");
    assert!(
        quarantine.is_empty(),
        "nothing should be refused: {quarantine:?}"
    );
}

#[test]
fn every_message_is_stored_exactly_once_while_the_bridge_is_killed_repeatedly() {
    let mut d = Durability::start("bridge-kill");
    let sim = d.sim();
    let mut stored = 0;
    for _ in 0..4 {
        stored = d.wait_stored(stored + BETWEEN_KILLS);
        d.kill_bridge();
        d.start_bridge();
    }
    assert_exactly_once(&d.rig, sim);
    // A message of an older boot (epoch) replayed after all this is refused as a
    // replay, never stored, and audited.
    let rig = &d.rig;
    let replays = |st: &Json| st["counters"]["replay"].as_u64().unwrap_or(0);
    let before = replays(&rig.stats());
    let epoch = rig
        .rows("events")
        .iter()
        .find(|e| e["device"] == "dev-00001")
        .and_then(|e| e["epoch"].as_u64())
        .expect("dev-00001 events");
    let old = rig.signed("dev-00001", epoch - 1, 3);
    rig.mosquitto_pub("device", "dev-00001", "devices/dev-00001/telemetry", &old);
    // Generous: after the kills the (debug-build) bridge may still be working through
    // the duplicates the devices resent; the replay queues behind them.
    let st = rig.wait_stats(Duration::from_secs(60), "the replay refused", |st| {
        replays(st) == before + 1
    });
    assert_eq!(
        st["events"].as_u64(),
        Some(u64::from(DEVICES * PER_DEVICE)),
        "the replay was not stored: {st}"
    );
    let audit = rig.data().join("audit.jsonl");
    let text = std::fs::read_to_string(&audit).expect("audit");
    assert!(
        text.lines()
            .any(|l| l.contains("\"event\":\"replay\"") && l.contains("dev-00001"))
    );
    vitalmq_ok(
        vitalmq_bin!(),
        // The bridge is running: its newest records are not signed yet.
        &[
            "audit",
            "verify",
            audit.to_str().expect("utf-8"),
            "--allow-unsigned-tail",
        ],
    );
}

#[test]
fn every_message_is_stored_exactly_once_when_the_broker_is_killed() {
    let mut d = Durability::start("broker-kill");
    let sim = d.sim();
    let mut stored = 0;
    for _ in 0..2 {
        stored = d.wait_stored(stored + BETWEEN_KILLS);
        d.kill_broker(&sim);
        d.rig
            .broker
            .restart(vitalmq_bin!(), Duration::from_secs(30));
    }
    assert_exactly_once(&d.rig, sim);
}

#[test]
fn every_message_is_stored_exactly_once_when_broker_and_bridge_die_together() {
    let mut d = Durability::start("both-kill");
    let sim = d.sim();
    d.wait_stored(2 * BETWEEN_KILLS);
    d.kill_bridge();
    d.kill_broker(&sim);
    d.rig
        .broker
        .restart(vitalmq_bin!(), Duration::from_secs(30));
    d.start_bridge();
    assert_exactly_once(&d.rig, sim);
}
