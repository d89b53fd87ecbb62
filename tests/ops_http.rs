//! The operations endpoints of the real processes (`vitalmq broker` with
//! `metrics_listen`, `vitalmq bridge` with `[metrics]`): `/healthz`, `/readyz` and
//! `/metrics`, the exposition read with the Prometheus project's own parser
//! (`tests/py/prom_parse.py`, `prometheus_client`), and `--log-format json`.

mod common;

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{
    BridgeProcess, BrokerProcess, Rig, Spawned, TRUST_DOMAIN, broker_config, reported_addr,
    temp_dir, vitalmq_ok, wait_until,
};
use serde_json::Value as Json;

const BIN: &str = env!("CARGO_BIN_EXE_vitalmq");
const METRICS_LINE: &str = "metrics on /metrics addr=";
const METRICS: &str = "[metrics]\nlisten = \"127.0.0.1:0\"\n";

/// `GET path` on 127.0.0.1:`port`: (status, body).
fn get(port: u16, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {response}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The exposition `text` as the Prometheus client library parses it:
/// `{family: {"type", "samples": [{"name", "labels", "value"}]}}`.
fn parsed(text: &str) -> Json {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/prom_parse.py");
    let ran = common::run_with_input(
        Command::new("python3").arg(script),
        Some(text.as_bytes()),
        Duration::from_secs(60),
    );
    assert!(
        ran.success,
        "prometheus_client could not parse it (scripts/test installs prometheus-client):\n{}\n{text}",
        ran.all()
    );
    serde_json::from_str(&ran.stdout).expect("parser output")
}

/// The sum of a family's samples named `sample` (all label sets).
fn total(families: &Json, family: &str, sample: &str) -> f64 {
    families[family]["samples"]
        .as_array()
        .map(|s| {
            s.iter()
                .filter(|s| s["name"] == sample)
                .filter_map(|s| s["value"].as_f64())
                .sum()
        })
        .unwrap_or(0.0)
}

/// Asserts `family` is a histogram with buckets (not a summary) that counted something.
fn assert_histogram(families: &Json, family: &str, text: &str) {
    assert_eq!(families[family]["type"], "histogram", "{family}:\n{text}");
    let buckets = families[family]["samples"]
        .as_array()
        .expect("samples")
        .iter()
        .filter(|s| s["name"] == format!("{family}_bucket"))
        .map(|s| s["labels"]["le"].as_str().expect("le").to_owned())
        .collect::<Vec<_>>();
    assert!(
        buckets.len() > 2 && buckets.contains(&"+Inf".to_owned()),
        "{family} buckets {buckets:?}:\n{text}"
    );
    assert!(
        total(families, family, &format!("{family}_count")) >= 1.0,
        "{family} counted nothing:\n{text}"
    );
    // The exposition itself, as a scraper reads it: `<family>_bucket{...le="..."} n`.
    assert!(
        text.lines()
            .any(|l| l.starts_with(&format!("{family}_bucket{{")) && l.contains("le=\"")),
        "{text}"
    );
}

/// A PKI (`certs init`, 4 devices on 2 sites) and the shipped ACL in a scratch dir.
fn pki(name: &str) -> tempfile::TempDir {
    let tmp = temp_dir(&format!("vitalmq-ops-http-{name}"));
    let pki = tmp.path().join("pki");
    vitalmq_ok(
        Path::new(BIN),
        &[
            "certs",
            "init",
            "--dir",
            pki.to_str().expect("utf-8"),
            "--trust-domain",
            TRUST_DOMAIN,
            "--devices",
            "4",
            "--sites",
            "2",
        ],
    );
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/examples/acl.toml"),
        tmp.path().join("acl.toml"),
    )
    .expect("copy the ACL");
    tmp
}

/// The port of a process's operations endpoint, from its log line.
fn ops_port(process: &Spawned) -> u16 {
    let mut port = None;
    wait_until(Duration::from_secs(30), "the ops endpoint reported", || {
        port = reported_addr(&process.stderr(), METRICS_LINE).map(|a| a.port());
        port.is_some()
    });
    port.expect("reported")
}

/// The broker is alive and ready once listening with its policy; the bridge on its
/// own exports its counters and bucketed histograms, and is ready while connected.
#[test]
fn broker_and_bridge_serve_health_readiness_and_bucketed_metrics() {
    let tmp = pki("serve");
    let broker = BrokerProcess::start(
        Path::new(BIN),
        tmp.path(),
        &format!(
            "metrics_listen = \"127.0.0.1:0\"\n{}",
            broker_config(TRUST_DOMAIN)
        ),
        Duration::from_secs(30),
    );
    let rig = Rig {
        bin: BIN.into(),
        tmp,
        broker,
    };
    let broker_ops = rig.broker.metrics_port();
    assert_eq!(get(broker_ops, "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(get(broker_ops, "/readyz"), (200, "ready\n".to_owned()));
    assert_eq!(get(broker_ops, "/nothing-here").0, 404);

    let bridge = BridgeProcess::start(
        Path::new(BIN),
        rig.dir(),
        &BridgeProcess::config(rig.broker.port, METRICS),
        Duration::from_secs(30),
    );
    let bridge_ops = ops_port(&bridge.process);
    assert_ne!(bridge_ops, broker_ops);
    assert_eq!(get(bridge_ops, "/healthz"), (200, "ok\n".to_owned()));
    // Its ready line follows the SUBACK, so it is connected, and its store is new.
    assert_eq!(get(bridge_ops, "/readyz"), (200, "ready\n".to_owned()));

    for seq in 1..=3 {
        let signed = rig.signed("dev-00001", 1, seq);
        rig.mosquitto_pub(
            "device",
            "dev-00001",
            "devices/dev-00001/telemetry",
            &signed,
        );
    }
    let mut text = String::new();
    let mut families = Json::Null;
    wait_until(
        Duration::from_secs(30),
        "the bridge's /metrics counts 3 accepted messages",
        || {
            let (status, body) = get(bridge_ops, "/metrics");
            assert_eq!(status, 200, "{body}");
            text = body;
            families = parsed(&text);
            total(
                &families,
                "vitalmq_bridge_accepted",
                "vitalmq_bridge_accepted_total",
            ) >= 3.0
        },
    );
    assert_eq!(families["vitalmq_bridge_accepted"]["type"], "counter");
    assert_histogram(&families, "vitalmq_bridge_commit_duration_seconds", &text);
    assert_histogram(
        &families,
        "vitalmq_bridge_verify_batch_duration_seconds",
        &text,
    );
    assert!(!text.contains("quantile="), "a summary:\n{text}");

    // The broker's handshake times (the bridge's and mosquitto_pub's) are buckets too.
    let (status, text) = get(broker_ops, "/metrics");
    assert_eq!(status, 200);
    let families = parsed(&text);
    assert_histogram(&families, "vitalmq_handshake_duration_seconds", &text);
    assert!(
        total(&families, "vitalmq_handshakes", "vitalmq_handshakes_total") >= 4.0,
        "{text}"
    );
}

/// A bridge whose broker is not there runs (alive) but is not ready, and says why.
#[test]
fn a_bridge_without_its_broker_is_alive_but_not_ready() {
    let tmp = pki("no-broker");
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let config = tmp.path().join("bridge.toml");
    std::fs::write(&config, BridgeProcess::config(port, METRICS)).expect("config");
    let bridge = Spawned::start(
        Command::new(BIN)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .arg("bridge")
            .arg("--config")
            .arg(&config),
    );
    let ops = ops_port(&bridge);
    assert!(
        bridge.wait_output(Duration::from_secs(30), |out| out
            .contains("broker connection lost")),
        "{}",
        bridge.all()
    );
    assert_eq!(get(ops, "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(get(ops, "/readyz"), (503, "connected\n".to_owned()));
    assert_eq!(get(ops, "/metrics").0, 200);
    assert!(!bridge.all().contains("vitalmq bridge ready"));
}

/// `--log-format json`: every line the broker and the bridge write is a JSON object,
/// their ready lines included, with the structured fields as keys.
#[test]
fn log_format_json_writes_json_lines_with_fields() {
    let tmp = pki("json");
    let broker_toml = tmp.path().join("broker.toml");
    std::fs::write(
        &broker_toml,
        format!(
            "metrics_listen = \"127.0.0.1:0\"\n{}",
            broker_config(TRUST_DOMAIN)
        )
        .replace("{listen}", "127.0.0.1:0"),
    )
    .expect("broker config");
    let broker = Spawned::start(
        Command::new(BIN)
            .env("RUST_LOG", "info")
            .args(["broker", "--log-format", "json", "--config"])
            .arg(&broker_toml),
    );
    let mut port = None;
    wait_until(Duration::from_secs(30), "the broker's ready line", || {
        port = reported_addr(&broker.stderr(), "vitalmq broker listening on ").map(|a| a.port());
        port.is_some()
    });
    let port = port.expect("ready");

    let bridge_toml = tmp.path().join("bridge.toml");
    std::fs::write(&bridge_toml, BridgeProcess::config(port, METRICS)).expect("config");
    // The option is global: before the subcommand works as well as after it.
    let bridge = Spawned::start(
        Command::new(BIN)
            .env("RUST_LOG", "info")
            .args(["--log-format", "json", "bridge", "--config"])
            .arg(&bridge_toml),
    );
    assert!(
        bridge.wait_output(Duration::from_secs(30), |out| out
            .contains("vitalmq bridge ready")),
        "{}",
        bridge.all()
    );

    let lines = |text: &str| -> Vec<Json> {
        // Complete lines only: the last may still be arriving.
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        complete
            .lines()
            .map(|l| {
                serde_json::from_str::<Json>(l)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}\n{text}"))
            })
            .collect()
    };
    let broker_lines = lines(&broker.stderr());
    let find = |lines: &[Json], message: &str| -> Json {
        lines
            .iter()
            .find(|l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message))
            })
            .cloned()
            .unwrap_or_else(|| panic!("no {message:?} in {lines:#?}"))
    };
    let ready = find(&broker_lines, "vitalmq broker listening on");
    assert_eq!(ready["level"], "INFO");
    assert_eq!(ready["addr"], format!("127.0.0.1:{port}"));
    assert!(ready["timestamp"].is_string());
    let metrics = find(&broker_lines, "metrics on /metrics");
    assert!(
        metrics["addr"]
            .as_str()
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            .is_some(),
        "{metrics}"
    );

    let bridge_lines = lines(&bridge.stderr());
    let ready = find(&bridge_lines, "vitalmq bridge ready");
    assert!(
        ready["filters"]
            .as_str()
            .is_some_and(|f| f.contains("devices/+/telemetry")),
        "{ready}"
    );
    find(&bridge_lines, "metrics on /metrics");
    assert!(
        bridge_lines
            .iter()
            .all(|l| l["target"].is_string() && l["level"].is_string()),
        "{bridge_lines:#?}"
    );
}
