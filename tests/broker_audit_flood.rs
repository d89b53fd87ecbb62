//! A flood of unauthenticated connects does not flood the broker's audit log (issue 15,
//! item 3): repeated refusals of one kind from one address become one record and a
//! summary with their count per interval, and every refusal is accounted for.

mod common;

use std::io::Write as _;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{BrokerProcess, TRUST_DOMAIN, broker_config, temp_dir, vitalmq_ok};
use serde_json::Value;

/// Connects made by the flood: bounded, all from 127.0.0.1.
const CONNECTS: u64 = 400;
/// Appended to the `[audit]` section (the last one) of the test configuration; the
/// size alert is set below what the flood writes.
const AGGREGATE: &str = "aggregate_interval_s = 2\nalert_bytes = 1000\n";

/// The broker's Prometheus text, fetched with a plain HTTP/1.0 GET.
fn scrape(port: u16) -> String {
    use std::io::Read as _;
    let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = tcp.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    let mut text = String::new();
    let _ = tcp.read_to_string(&mut text);
    text
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn refusals(log: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["event"] == "connection_refused")
        .collect()
}

/// Refusals a record stands for: itself, or the repeats its summary counts.
fn represented(records: &[Value]) -> u64 {
    records.iter().map(common::refusals_represented).sum()
}

#[test]
fn a_flood_of_unauthenticated_connects_writes_a_record_and_a_count() {
    let bin = vitalmq_bin!();
    let tmp = temp_dir("vitalmq-audit-flood");
    let dir = tmp.path();
    vitalmq_ok(
        bin,
        &[
            "certs",
            "init",
            "--dir",
            dir.join("pki").to_str().expect("utf-8"),
            "--trust-domain",
            TRUST_DOMAIN,
            "--devices",
            "1",
        ],
    );
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/examples/acl.toml"),
        dir.join("acl.toml"),
    )
    .expect("copy the ACL");
    // Port 0: the broker logs the port it bound.
    let config =
        "metrics_listen = \"127.0.0.1:0\"\n".to_owned() + &broker_config(TRUST_DOMAIN) + AGGREGATE;
    let broker = BrokerProcess::start(bin, dir, &config, Duration::from_secs(30));
    let metrics_port = broker.metrics_port();
    let log = dir.join("broker-audit.jsonl");

    for _ in 0..CONNECTS {
        let mut tcp = TcpStream::connect(("127.0.0.1", broker.port)).expect("connect");
        let _ = tcp.write_all(b"\x10\x00not a TLS ClientHello\r\n");
    }
    // Every refusal shows up, as a record or in a summary's count.
    let deadline = Instant::now() + Duration::from_secs(60);
    let records = loop {
        let records = refusals(&log);
        if represented(&records) >= CONNECTS {
            break records;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {CONNECTS} refusals audited: {records:#?}",
            represented(&records)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(represented(&records), CONNECTS, "{records:#?}");
    // A first record per kind and interval, and one summary each: a handful, not 400.
    assert!(
        records.len() <= 12,
        "{} records: {records:#?}",
        records.len()
    );
    let summaries: Vec<&Value> = records
        .iter()
        .filter(|r| r["details"]["repeats"].is_u64())
        .collect();
    assert!(!summaries.is_empty());
    for s in summaries {
        assert_eq!(s["actor"]["addr"], "127.0.0.1", "{s}");
        assert_eq!(s["decision"], "deny", "{s}");
    }

    // Its size is exported, and above alert_bytes the alert gauge is up and the broker
    // says so.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = scrape(metrics_port);
        let bytes = metric(&text, "vitalmq_audit_bytes").unwrap_or(0.0);
        if bytes > 1000.0 && metric(&text, "vitalmq_audit_size_alert") == Some(1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "no size alert in:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        broker
            .stderr()
            .contains("audit log is above its configured size"),
        "{}",
        broker.stderr()
    );
    drop(broker);
}
