//! Simulated hospital-at-home gateways (`vitalmq sim --via-gateway`), end to end with
//! the real `vitalmq broker` (shipped ACL, fresh `certs init` PKI with 4 devices on 2
//! sites) and the real `vitalmq bridge`: the devices never connect; one connection per
//! site, with the site's gateway identity, relays each device's own signed messages and
//! routes its receipts back. Every message must be stored exactly once, also when the
//! broker is killed with `kill -9` in the middle of the run, and the broker's audit log
//! must show the gateway identities connecting, never the devices.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Rig, Spawned, sim_summary_all_receipted, store_rows, wait_until};
use serde_json::Value as Json;

const DEVICES: u32 = 4;
const COUNT: u64 = 50;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_vitalmq"))
}

/// `vitalmq sim --via-gateway` against the rig's broker, in the background.
fn sim_via_gateway(rig: &Rig) -> Spawned {
    Spawned::start(
        Command::new(bin())
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info,rumqttc=warn")
            .args(["sim", "--pki"])
            .arg(rig.pki())
            .arg("--broker")
            .arg(format!("127.0.0.1:{}", rig.broker.port))
            .arg("--state")
            .arg(rig.dir().join("sim-state"))
            .args(["--devices", &DEVICES.to_string()])
            .args(["--count", &COUNT.to_string()])
            .args([
                "--rate",
                "20",
                "--resend-after",
                "1s",
                "--status-every",
                "0",
            ])
            .args(["--via-gateway", "--until-receipted", "60s"]),
    )
}

/// Checks the summary (every device receipted, carried by its site's gateway) and the
/// bridge's store (seqs 0..COUNT exactly once per device, in the device's one epoch).
fn assert_relayed_exactly_once(rig: &Rig, summary: &Json) {
    let devices = summary["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), DEVICES as usize, "{summary}");
    let mut epochs = BTreeMap::new();
    for (i, d) in devices.iter().enumerate() {
        let id = d["id"].as_str().expect("id");
        assert_eq!(id, format!("dev-{:05}", i + 1));
        // certs init assigns device i to site ((i - 1) mod 2) + 1.
        let site = i % 2 + 1;
        assert_eq!(d["gateway"], format!("gw-site-{site:02}"), "{d}");
        assert_eq!(d["all_receipted"], true, "{d}");
        assert_eq!(d["highest_seq"], COUNT - 1, "{d}");
        epochs.insert(id.to_owned(), d["epoch"].as_u64().expect("epoch"));
    }
    let gateways = summary["gateways"].as_array().expect("gateways");
    let ids: Vec<&str> = gateways.iter().filter_map(|g| g["id"].as_str()).collect();
    assert_eq!(ids, ["gw-site-01", "gw-site-02"], "{summary}");
    assert!(
        gateways.iter().all(|g| g["subscriptions_granted"] == true),
        "{summary}"
    );

    let mut stored: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut event_ids = BTreeSet::new();
    for e in store_rows(bin(), "events", &rig.data()) {
        let device = e["device"].as_str().expect("device").to_owned();
        assert_eq!(e["epoch"].as_u64(), epochs.get(&device).copied(), "{e}");
        assert!(
            event_ids.insert(e["event_id"].as_str().expect("event_id").to_owned()),
            "stored twice: {e}"
        );
        stored
            .entry(device)
            .or_default()
            .push(e["seq"].as_u64().expect("seq"));
    }
    for id in epochs.keys() {
        let mut seqs = stored.remove(id).unwrap_or_default();
        seqs.sort_unstable();
        assert_eq!(
            seqs,
            (0..COUNT).collect::<Vec<_>>(),
            "{id}: every message exactly once"
        );
    }
    assert!(stored.is_empty(), "events of unknown devices: {stored:?}");
}

/// The identities the broker's audit log shows connecting.
fn audited_connections(rig: &Rig) -> BTreeSet<String> {
    let log = std::fs::read_to_string(rig.dir().join("broker-audit.jsonl")).expect("audit log");
    log.lines()
        .filter_map(|l| serde_json::from_str::<Json>(l).ok())
        .filter(|r| r["event"] == "connection_accepted")
        .filter_map(|r| r["actor"]["identity"].as_str().map(str::to_owned))
        .collect()
}

fn assert_only_gateways_connected(rig: &Rig) {
    let connected = audited_connections(rig);
    for gw in ["gw-site-01", "gw-site-02"] {
        assert!(
            connected.contains(&format!("spiffe://demo.vitalmq/gateway/{gw}")),
            "{gw} not audited as connected: {connected:?}"
        );
    }
    assert!(
        connected.iter().all(|id| !id.contains("/device/")),
        "a device connected itself: {connected:?}"
    );
}

#[test]
fn a_gateway_per_site_relays_every_message_exactly_once() {
    let started = Instant::now();
    let rig = Rig::start(bin(), "sim-gateway", DEVICES, |_| {});
    let _bridge = rig.bridge("", "");
    let mut sim = sim_via_gateway(&rig);
    let summary = sim_summary_all_receipted(&mut sim);
    assert_eq!(summary["totals"]["unreceipted"], 0, "{summary}");
    assert_relayed_exactly_once(&rig, &summary);
    assert_only_gateways_connected(&rig);
    eprintln!("took {:?}", started.elapsed());
}

#[test]
fn gateways_lose_nothing_when_the_broker_is_killed() {
    let started = Instant::now();
    let mut rig = Rig::start(bin(), "sim-gateway-kill", DEVICES, |_| {});
    let _bridge = rig.bridge("", "");
    let mut sim = sim_via_gateway(&rig);
    assert!(
        sim.wait_output(Duration::from_secs(30), |out| out
            .contains("devices connected")),
        "the gateways did not connect:\n{}",
        sim.all()
    );
    // Once about a third of the messages are stored, kill the broker mid-run; when both
    // gateways noticed, let the devices finish generating into their outboxes, then
    // bring it back.
    let third = u64::from(DEVICES) * COUNT / 3;
    rig.wait_stats(Duration::from_secs(30), "a third stored", |st| {
        st["events"].as_u64() >= Some(third)
    });
    rig.broker.kill9();
    wait_until(
        Duration::from_secs(30),
        "both gateways lost the broker",
        || sim.stderr().matches("gateway connection lost").count() >= 2,
    );
    wait_until(
        Duration::from_secs(30),
        "every device done generating",
        || sim.stderr().matches("generation done").count() >= DEVICES as usize,
    );
    rig.broker.restart(bin(), Duration::from_secs(30));
    let summary = sim_summary_all_receipted(&mut sim);
    let connects: Vec<u64> = summary["gateways"]
        .as_array()
        .expect("gateways")
        .iter()
        .filter_map(|g| g["connects"].as_u64())
        .collect();
    assert!(
        connects.len() == 2 && connects.iter().all(|&c| c >= 2),
        "each gateway reconnects after the broker restart: {summary}"
    );
    assert_relayed_exactly_once(&rig, &summary);
    assert_only_gateways_connected(&rig);
    eprintln!("took {:?}", started.elapsed());
}
