//! `vitalmq sim` load mode end to end (issue 6): the real broker (shipped ACL), the real
//! bridge with the shipped alert rules, and a short load run of tens of devices at an
//! aggregate rate with one scripted desaturation on a fast device clock. The latency
//! report must account for every message (each receipted message timed once, nothing
//! lost), agree with the bridge's own store, and time at least one alert received by the
//! site's integrator. Latency values themselves are not asserted (they depend on the
//! machine); scripts/bench-load measures them.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Rig, run};
use serde_json::Value as Json;

const DEVICES: u32 = 24;

/// The `[alerts]` section: the shipped rules, published by the bridge's alert identity.
fn alerts_config() -> String {
    let rules =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/examples/rules.toml");
    format!(
        r#"[alerts]
rules = "{}"
publisher = {{ client_id = "bridge-01-alerts", cert = "pki/identities/bridge/bridge-01-alerts.pem", key = "pki/identities/bridge/bridge-01-alerts.key.pem" }}
"#,
        rules.display()
    )
}

fn u(v: &Json) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

#[test]
fn a_load_run_times_every_receipted_message_and_the_alerts_it_raises() {
    let rig = Rig::start(vitalmq_bin!(), "sim-load", DEVICES, |_| {});
    // BridgeProcess::config_with sets receipt_interval_ms = 100; the [alerts] section is
    // appended after the pipeline like a sink would be.
    let _bridge = rig.bridge("", &alerts_config());
    let report_path = rig.dir().join("load.json");
    let ran = run(
        Command::new(vitalmq_bin!())
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info,rumqttc=warn")
            .args(["sim", "--pki"])
            .arg(rig.pki())
            .arg("--broker")
            .arg(format!("127.0.0.1:{}", rig.broker.port))
            .arg("--state")
            .arg(rig.dir().join("sim-state"))
            .args(["--devices", &DEVICES.to_string()])
            // 3 vitals a second per device; the device clock 30 times faster, so the
            // desaturation (1 min ramp, 2 min hold) crosses the spo2-low rule's 30 s
            // persistence within a few wall-clock seconds.
            .args(["--aggregate-rate", "72", "--duration", "6s"])
            .args([
                "--time-scale",
                "30",
                "--episode",
                "desaturation:dev-00001@5s",
            ])
            .args(["--connect-rate", "40", "--status-every", "0"])
            .args(["--resend-after", "2s", "--until-receipted", "60s"])
            .args(["--receipt-interval", "100ms", "--latency-report"])
            .arg(&report_path),
        Duration::from_secs(150),
    );
    assert!(
        ran.success,
        "vitalmq sim (load mode) failed:\n{}",
        ran.all()
    );
    let text = std::fs::read_to_string(&report_path).expect("latency report written");
    let report: Json = serde_json::from_str(&text).expect("report is JSON");
    let ctx = format!("report:\n{text}\nsim stderr:\n{}", ran.stderr);

    assert_eq!(report["format"], "vitalmq-sim-load/v1", "{ctx}");
    assert_eq!(report["setup"]["devices"], DEVICES, "{ctx}");
    assert_eq!(report["setup"]["receipt_interval_ms"], 100, "{ctx}");
    assert_eq!(report["setup"]["per_device_rate"], 3.0, "{ctx}");
    assert!(
        report["connect"]["all_connected_ms"].as_f64().is_some(),
        "every device connected: {ctx}"
    );

    // Accounting: every message made was receipted, each timed exactly once.
    let m = &report["messages"];
    let made = u(&m["made"]);
    assert!(made >= u64::from(DEVICES), "messages made: {ctx}");
    assert_eq!(u(&m["lost"]), 0, "nothing lost: {ctx}");
    assert_eq!(u(&m["receipted"]), made, "{ctx}");
    assert_eq!(
        u(&m["sent"]),
        made,
        "each message published once first: {ctx}"
    );
    assert_eq!(u(&m["untimed"]), 0, "{ctx}");
    let bridge = &report["bridge"];
    assert_eq!(
        u(&bridge["latency"]["samples"]),
        made,
        "one bridge latency per receipted message: {ctx}"
    );
    let receipts = u(&bridge["receipts"]);
    assert!(receipts >= 1 && receipts <= made, "{ctx}");
    for p in ["p50_us", "p90_us", "p99_us", "p999_us", "max_us"] {
        assert!(bridge["latency"][p].as_u64().is_some(), "{p}: {ctx}");
    }
    // The bridge's store agrees: it holds exactly the messages the devices saw receipted.
    let stats = rig.stats();
    assert_eq!(
        stats["events"].as_u64(),
        Some(made),
        "store stats {stats}\n{ctx}"
    );

    // Alerts: the desaturation reached the site's integrator and was matched to the
    // publish of its newest evidence.
    let alerts = &report["alerts"];
    let watchers = alerts["watchers"].as_array().expect("watchers");
    let sites: Vec<&str> = watchers
        .iter()
        .map(|w| w["site"].as_str().expect("site"))
        .collect();
    assert_eq!(
        sites,
        ["site-01", "site-02"],
        "one integrator per site: {ctx}"
    );
    assert!(
        u(&alerts["latency"]["samples"]) >= 1,
        "at least one alert timed: {ctx}\nstore alerts: {:?}",
        rig.rows("alerts")
    );
    assert_eq!(u(&alerts["unmatched"]), 0, "{ctx}");
    assert_eq!(u(&alerts["malformed"]), 0, "{ctx}");
    let stored: u64 = stats["alerts"]
        .as_object()
        .expect("stored alerts by kind/state")
        .iter()
        .filter(|(k, _)| k.starts_with("clinical/"))
        .map(|(_, n)| u(n))
        .sum();
    assert!(
        u(&alerts["received"]) <= stored && u(&alerts["received"]) >= 1,
        "received alerts are ones the bridge raised ({stored}): {ctx}"
    );
    assert!(
        ran.stderr
            .contains("to the bridge (publish -> receipt, receipt interval 100 ms)"),
        "human summary on stderr: {ctx}"
    );
}

#[test]
fn load_mode_refuses_bad_input_clearly() {
    let tmp = common::temp_dir("vitalmq-sim-load-args");
    let base = |extra: &[&str]| {
        run(
            Command::new(vitalmq_bin!())
                .args(["sim", "--pki"])
                .arg(tmp.path().join("pki"))
                .args(["--broker", "127.0.0.1:1", "--state"])
                .arg(tmp.path().join("state"))
                .args(extra),
            Duration::from_secs(20),
        )
    };
    let ran = base(&["--aggregate-rate", "0"]);
    assert!(
        !ran.success && ran.stderr.contains("--aggregate-rate must be a positive"),
        "{}",
        ran.all()
    );
    let ran = base(&["--connect-rate", "10"]);
    assert!(
        !ran.success && ran.stderr.contains("--aggregate-rate"),
        "--connect-rate alone is not load mode: {}",
        ran.all()
    );
    let ran = base(&["--aggregate-rate", "10", "--rate", "2"]);
    assert!(
        !ran.success && ran.stderr.contains("cannot be used with"),
        "{}",
        ran.all()
    );
    let ran = base(&["--aggregate-rate", "10", "--via-gateway"]);
    assert!(
        !ran.success && ran.stderr.contains("not supported with --via-gateway"),
        "{}",
        ran.all()
    );
}
