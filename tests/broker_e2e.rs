//! The broker gate end to end (SPEC sections 1 and 2): the real `vitalmq broker` on a
//! free 127.0.0.1 port with a fresh `vitalmq certs init` PKI and the shipped ACL
//! (`policies/examples/acl.toml`), driven by clients nobody here wrote: mosquitto_pub /
//! mosquitto_sub (`apt-get install mosquitto-clients`) and paho-mqtt
//! (`python3 -m pip install 'paho-mqtt==2.*'`, see `tests/py/paho_gate.py`). Every
//! refusal is also checked in the broker's audit log.
//!
//! Each test has its own PKI and broker, so revocations and reloads stay local.

mod common;

use std::io::Read as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{BrokerProcess, Ran, Spawned, run, temp_dir};
use serde_json::Value as Json;

/// Deadline of one client command (connect, one message, disconnect).
const CLIENT: Duration = Duration::from_secs(15);
/// How long to wait for something that should happen (a message, an audit record).
const EVENTUALLY: Duration = Duration::from_secs(8);
const TRUST_DOMAIN: &str = "demo.vitalmq";

fn vitalmq(args: &[&str]) -> Ran {
    let ran = run(
        Command::new(env!("CARGO_BIN_EXE_vitalmq")).args(args),
        CLIENT,
    );
    assert!(ran.success, "vitalmq {args:?} failed:\n{}", ran.all());
    ran
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

fn shipped_acl() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/examples/acl.toml")
}

fn spiffe(role: &str, id: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/{role}/{id}")
}

/// `vitalmq certs init` with 4 devices on 2 sites: dev-00001 and dev-00003 at site-01,
/// dev-00002 and dev-00004 at site-02.
fn certs_init(dir: &Path) {
    vitalmq(&[
        "certs",
        "init",
        "--dir",
        s(dir),
        "--trust-domain",
        TRUST_DOMAIN,
        "--devices",
        "4",
        "--sites",
        "2",
    ]);
}

/// MQTT protocol versions as mosquitto spells them.
const V311: &str = "mqttv311";
const V5: &str = "mqttv5";

/// A client certificate and key, or none.
#[derive(Clone)]
struct Creds {
    cert: Option<(PathBuf, PathBuf)>,
}

impl Creds {
    fn of(pki: &Path, role: &str, id: &str) -> Self {
        let base = pki.join("identities").join(role);
        Self {
            cert: Some((
                base.join(format!("{id}.pem")),
                base.join(format!("{id}.key.pem")),
            )),
        }
    }
    fn none() -> Self {
        Self { cert: None }
    }
}

/// A PKI, the broker configured for it, and its audit log.
struct Gate {
    tmp: tempfile::TempDir,
    pki: PathBuf,
    audit: PathBuf,
    broker: BrokerProcess,
    metrics_port: u16,
}

impl Gate {
    fn start(name: &str) -> Self {
        Self::start_with(name, &shipped_acl())
    }

    /// With the ACL at `acl` (copied into the temp dir first, so tests may break it).
    fn start_with(name: &str, acl: &Path) -> Self {
        let tmp = temp_dir(&format!("vitalmq-broker-e2e-{name}"));
        let pki = tmp.path().join("pki");
        certs_init(&pki);
        let acl_copy = tmp.path().join("acl.toml");
        std::fs::copy(acl, &acl_copy).expect("copy the ACL");
        let audit = tmp.path().join("audit.jsonl");
        let config = format!(
            r#"listen = "{{listen}}"
metrics_listen = "127.0.0.1:0"
connect_timeout_ms = 10000
[tls]
server_cert = "pki/broker/server.pem"
server_key = "pki/broker/server.key.pem"
client_ca = ["pki/ca/ca.pem"]
crls = ["pki/crl.pem"]
trust_domain = "{TRUST_DOMAIN}"
first_byte_timeout_ms = 30000
handshake_timeout_ms = 30000
per_ip_per_second = 0
[policy]
acl = "acl.toml"
registry = "pki/registry.toml"
watch = true
[audit]
path = "audit.jsonl"
aggregate_interval_s = 1
"#
        );
        let broker = BrokerProcess::start(
            Path::new(env!("CARGO_BIN_EXE_vitalmq")),
            tmp.path(),
            &config,
            Duration::from_secs(20),
        );
        let metrics_port = broker.metrics_port();
        Self {
            tmp,
            pki,
            audit,
            broker,
            metrics_port,
        }
    }

    /// The Prometheus text the broker serves on /metrics.
    fn metrics(&self) -> String {
        use std::io::{Read as _, Write as _};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port))
            .expect("metrics endpoint");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .expect("request");
        let mut body = String::new();
        stream.read_to_string(&mut body).expect("response");
        body
    }

    fn creds(&self, role: &str, id: &str) -> Creds {
        Creds::of(&self.pki, role, id)
    }

    /// mosquitto_pub / mosquitto_sub with the connection options for `creds`.
    fn mosquitto(&self, tool: &str, creds: &Creds, client_id: &str, version: &str) -> Command {
        // Line-buffered, so a background subscriber's output can be watched as it comes.
        let mut cmd = Command::new("stdbuf");
        cmd.args(["-oL", tool, "-h", "127.0.0.1", "-p"])
            .arg(self.broker.port.to_string())
            .arg("--cafile")
            .arg(self.pki.join("ca/ca.pem"))
            .args(["-i", client_id, "-V", version]);
        if let Some((cert, key)) = &creds.cert {
            cmd.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        cmd
    }

    /// One QoS 1 publish with mosquitto_pub.
    fn publish(
        &self,
        creds: &Creds,
        client_id: &str,
        version: &str,
        topic: &str,
        payload: &str,
    ) -> Ran {
        run(
            self.mosquitto("mosquitto_pub", creds, client_id, version)
                .args(["-q", "1", "-t", topic, "-m", payload]),
            CLIENT,
        )
    }

    /// A QoS 1 publish that must succeed.
    fn publish_ok(&self, role: &str, id: &str, version: &str, topic: &str, payload: &str) {
        let ran = self.publish(&self.creds(role, id), id, version, topic, payload);
        assert!(
            ran.success,
            "{id} publishing to {topic} failed:\n{}\nbroker:\n{}",
            ran.all(),
            self.broker.stderr()
        );
    }

    /// mosquitto_sub in the background (`-v -d`), after its SUBACK arrived. It exits by
    /// itself after `seconds`.
    fn subscribe(
        &self,
        role: &str,
        id: &str,
        version: &str,
        filter: &str,
        seconds: u32,
    ) -> Spawned {
        let sub = Spawned::start(
            self.mosquitto("mosquitto_sub", &self.creds(role, id), id, version)
                .args(["-q", "1", "-t", filter, "-v", "-d", "-W"])
                .arg(seconds.to_string()),
        );
        assert!(
            sub.wait_output(EVENTUALLY, |out| out.contains("Subscribed (mid:")),
            "{id} did not get its SUBACK for {filter}:\n{}",
            sub.all()
        );
        sub
    }

    fn records(&self) -> Vec<Json> {
        common::audit_records(&self.audit)
    }

    /// Waits for an audit record with these fields (each `(pointer, value)`), returns it.
    fn audited(&self, fields: &[(&str, &str)]) -> Json {
        let deadline = Instant::now() + EVENTUALLY;
        loop {
            let records = self.records();
            if let Some(r) = records.iter().find(|r| common::has_fields(r, fields)) {
                return r.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no audit record with {fields:?}; the log has:\n{}",
                records
                    .iter()
                    .map(Json::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until exactly `n` audit records have these fields (records are written
    /// asynchronously, possibly after the client saw the refusal); a surplus record
    /// would be written before the audit marker that follows.
    fn assert_count(&self, fields: &[(&str, &str)], n: usize) {
        let deadline = Instant::now() + EVENTUALLY;
        while self.count(fields) < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.audit_marker();
        let records = self.records();
        let found = self.count(fields);
        assert_eq!(
            found,
            n,
            "audit records with {fields:?}; the log has:\n{}",
            records
                .iter()
                .map(Json::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    /// A connection of its own (ops-01 subscribes and leaves) and waits for its
    /// `connection_accepted` record. The gate queues a connection's records as it
    /// decides, before it answers, and the log writes them in order: once this record
    /// is written, so is every record of the connections the test made before.
    fn audit_marker(&self) {
        let accepted = [
            ("/event", "connection_accepted"),
            ("/actor/identity", &spiffe("operator", "ops-01")),
        ];
        let before = self.count(&accepted);
        let ran = run(
            self.mosquitto(
                "mosquitto_sub",
                &self.creds("operator", "ops-01"),
                "ops-01",
                V5,
            )
            .args(["-q", "1", "-t", "ops/audit-marker", "-E"]),
            CLIENT,
        );
        assert!(ran.success, "the audit marker connection:\n{}", ran.all());
        let deadline = Instant::now() + EVENTUALLY;
        while self.count(&accepted) <= before {
            assert!(
                Instant::now() < deadline,
                "the audit marker was not written"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn count(&self, fields: &[(&str, &str)]) -> usize {
        self.records()
            .iter()
            .filter(|r| common::has_fields(r, fields))
            .count()
    }
}

/// The `topic payload` lines a `mosquitto_sub -v -d` printed for topics under `prefix`.
fn received(output: &str, prefix: &str) -> Vec<String> {
    output
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

/// Waits until `sub` printed `line` as a received message.
fn wait_message(sub: &Spawned, prefix: &str, line: &str) {
    assert!(
        sub.wait_output(EVENTUALLY, |out| received(out, prefix)
            .iter()
            .any(|l| l == line)),
        "subscriber did not receive `{line}`:\n{}",
        sub.all()
    );
}

// ------------------------------------------------------------------------ section 2

#[test]
fn device_telemetry_reaches_the_bridge_over_both_protocol_versions() {
    let gate = Gate::start("telemetry");
    let bridge = gate.subscribe("bridge", "bridge-01", V311, "devices/+/telemetry", 20);
    gate.publish_ok(
        "device",
        "dev-00001",
        V311,
        "devices/dev-00001/telemetry",
        "reading-311",
    );
    gate.publish_ok(
        "device",
        "dev-00001",
        V5,
        "devices/dev-00001/telemetry",
        "reading-5",
    );
    // Exactly those two messages, each once: a marker published after them arrives
    // after them (one topic, in order), so a duplicate would have arrived by then.
    gate.publish_ok(
        "device",
        "dev-00001",
        V5,
        "devices/dev-00001/telemetry",
        "marker",
    );
    wait_message(&bridge, "devices/", "devices/dev-00001/telemetry marker");
    let mut got = received(&bridge.stdout(), "devices/");
    got.retain(|l| !l.ends_with(" marker"));
    got.sort();
    assert_eq!(
        got,
        [
            "devices/dev-00001/telemetry reading-311",
            "devices/dev-00001/telemetry reading-5"
        ],
        "{}",
        bridge.all()
    );
    gate.audited(&[
        ("/event", "connection_accepted"),
        ("/actor/identity", &spiffe("device", "dev-00001")),
    ]);
}

#[test]
fn publish_to_another_devices_topic_is_refused_and_never_routed() {
    let gate = Gate::start("foreign-topic");
    let bridge = gate.subscribe("bridge", "bridge-01", V5, "devices/+/telemetry", 20);
    let dev1 = gate.creds("device", "dev-00001");

    // 3.1.1: the gate closes the connection (denied_publish_v311 = "disconnect").
    let v311 = gate.publish(
        &dev1,
        "dev-00001",
        V311,
        "devices/dev-00002/telemetry",
        "forged-311",
    );
    assert!(
        !v311.success,
        "3.1.1 denied publish succeeded:\n{}",
        v311.all()
    );
    assert!(v311.all().contains("connection was lost"), "{}", v311.all());

    // 5: PUBACK with 0x87 Not authorized.
    let v5 = gate.publish(
        &dev1,
        "dev-00001",
        V5,
        "devices/dev-00002/telemetry",
        "forged-5",
    );
    assert!(
        v5.all().contains("Publish 1 failed: Not authorized"),
        "MQTT 5 denied publish:\n{}",
        v5.all()
    );

    // A marker published after both: once it arrived, the forged ones would have too.
    gate.publish_ok(
        "device",
        "dev-00002",
        V5,
        "devices/dev-00002/telemetry",
        "marker",
    );
    wait_message(&bridge, "devices/", "devices/dev-00002/telemetry marker");
    assert_eq!(
        received(&bridge.stdout(), "devices/"),
        ["devices/dev-00002/telemetry marker"],
        "a denied publish was routed:\n{}",
        bridge.all()
    );

    let denial = [
        ("/event", "authorization_denied"),
        ("/action", "publish"),
        ("/resource", "devices/dev-00002/telemetry"),
        ("/reason", "not_authorized"),
        ("/actor/identity", &spiffe("device", "dev-00001")),
    ];
    let record = gate.audited(&denial);
    assert!(
        record["rule"].as_str().is_some_and(|r| !r.is_empty()),
        "{record}"
    );
    gate.assert_count(&denial, 2);
    // Only 3.1.1 gets its connection closed for it.
    assert!(
        gate.broker.stderr().contains("publish_denied"),
        "{}",
        gate.broker.stderr()
    );
}

#[test]
fn subscribing_to_everything_is_refused() {
    let gate = Gate::start("subscribe-all");
    for version in [V311, V5] {
        let ran = run(
            gate.mosquitto(
                "mosquitto_sub",
                &gate.creds("device", "dev-00001"),
                "dev-00001",
                version,
            )
            .args(["-t", "#", "-W", "5"]),
            CLIENT,
        );
        assert!(
            ran.all().contains("All subscription requests were denied"),
            "{version}: {}",
            ran.all()
        );
    }
    let denial = [
        ("/event", "authorization_denied"),
        ("/action", "subscribe"),
        ("/resource", "#"),
        ("/reason", "not_authorized"),
        ("/actor/identity", &spiffe("device", "dev-00001")),
    ];
    gate.audited(&denial);
    gate.assert_count(&denial, 2);
}

#[test]
fn claiming_another_client_id_is_refused() {
    let gate = Gate::start("client-id");
    let dev1 = gate.creds("device", "dev-00001");
    let v311 = gate.publish(&dev1, "dev-00002", V311, "devices/dev-00001/telemetry", "x");
    assert_eq!(v311.code, Some(5), "CONNACK 0x05 expected:\n{}", v311.all());
    assert!(v311.all().contains("not authorised"), "{}", v311.all());
    let v5 = gate.publish(&dev1, "dev-00002", V5, "devices/dev-00001/telemetry", "x");
    assert_eq!(v5.code, Some(0x87), "CONNACK 0x87 expected:\n{}", v5.all());
    assert!(v5.all().contains("Not authorized"), "{}", v5.all());

    let refusal = [
        ("/event", "connection_refused"),
        ("/action", "connect"),
        ("/reason", "client_id_mismatch"),
        ("/actor/identity", &spiffe("device", "dev-00001")),
        ("/actor/client_id", "dev-00002"),
    ];
    gate.audited(&refusal);
    gate.assert_count(&refusal, 2);
}

/// Asserts a connection attempt with `creds` fails and the audit log has a handshake
/// refusal with `reason`.
fn assert_handshake_refused(gate: &Gate, creds: &Creds, id: &str, reason: &str) {
    for version in [V311, V5] {
        let ran = gate.publish(creds, id, version, &format!("devices/{id}/telemetry"), "x");
        assert!(
            !ran.success,
            "{id} ({reason}, {version}) could publish:\n{}",
            ran.all()
        );
    }
    let refusal = [
        ("/event", "connection_refused"),
        ("/action", "handshake"),
        ("/reason", reason),
    ];
    gate.audited(&refusal);
    // Both attempts come from 127.0.0.1: the second is counted in a summary record
    // (`details.repeats`) at the end of the aggregation interval.
    let represented = || -> u64 {
        gate.records()
            .iter()
            .filter(|r| common::has_fields(r, &refusal))
            .map(common::refusals_represented)
            .sum()
    };
    let deadline = Instant::now() + EVENTUALLY;
    while represented() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(represented(), 2, "{:?}", gate.records());
    // Nothing got as far as a CONNECT.
    assert_eq!(
        gate.count(&[("/event", "connection_accepted")]),
        0,
        "{:?}",
        gate.records()
    );
}

#[test]
fn revoked_certificate_fails_the_handshake_after_sighup() {
    let gate = Gate::start("revoked");
    gate.publish_ok(
        "device",
        "dev-00003",
        V311,
        "devices/dev-00003/telemetry",
        "before",
    );
    vitalmq(&[
        "certs",
        "revoke",
        "--dir",
        s(&gate.pki),
        "--role",
        "device",
        "--id",
        "dev-00003",
        "--reason",
        "key-compromise",
    ]);
    gate.broker.sighup();
    gate.audited(&[("/event", "policy_reloaded")]);
    for version in [V311, V5] {
        let ran = gate.publish(
            &gate.creds("device", "dev-00003"),
            "dev-00003",
            version,
            "devices/dev-00003/telemetry",
            "after",
        );
        assert!(!ran.success, "revoked certificate accepted:\n{}", ran.all());
    }
    let refusal = [
        ("/event", "connection_refused"),
        ("/action", "handshake"),
        ("/reason", "certificate_revoked"),
    ];
    gate.audited(&refusal);
    gate.assert_count(&refusal, 2);
    // Others are unaffected.
    gate.publish_ok(
        "device",
        "dev-00001",
        V5,
        "devices/dev-00001/telemetry",
        "still-fine",
    );
}

#[test]
fn expired_and_not_yet_valid_certificates_fail_the_handshake() {
    let gate = Gate::start("expired");
    let pki = s(&gate.pki);
    vitalmq(&[
        "certs",
        "issue",
        "--dir",
        pki,
        "--role",
        "device",
        "--id",
        "dev-old",
        "--site",
        "site-01",
        "--not-before",
        "2020-01-01T00:00:00Z",
        "--not-after",
        "2020-06-01T00:00:00Z",
    ]);
    vitalmq(&[
        "certs",
        "issue",
        "--dir",
        pki,
        "--role",
        "device",
        "--id",
        "dev-new",
        "--site",
        "site-01",
        "--not-before",
        "2035-01-01T00:00:00Z",
    ]);
    assert_handshake_refused(
        &gate,
        &gate.creds("device", "dev-old"),
        "dev-old",
        "certificate_expired",
    );
    let refusal = [
        ("/event", "connection_refused"),
        ("/reason", "certificate_not_yet_valid"),
    ];
    for version in [V311, V5] {
        let ran = gate.publish(
            &gate.creds("device", "dev-new"),
            "dev-new",
            version,
            "devices/dev-new/telemetry",
            "x",
        );
        assert!(
            !ran.success,
            "not-yet-valid certificate accepted:\n{}",
            ran.all()
        );
    }
    gate.audited(&refusal);
    gate.assert_count(&refusal, 2);
}

#[test]
fn certificate_from_a_foreign_ca_fails_the_handshake() {
    let gate = Gate::start("foreign-ca");
    // Same trust domain, same ids, another CA.
    let other = gate.tmp.path().join("other-pki");
    certs_init(&other);
    let creds = Creds::of(&other, "device", "dev-00001");
    // Each dev CA has its own name, so the other CA is simply not a known issuer.
    assert_handshake_refused(&gate, &creds, "dev-00001", "unknown_issuer");
}

#[test]
fn missing_client_certificate_fails_the_handshake() {
    let gate = Gate::start("no-cert");
    assert_handshake_refused(&gate, &Creds::none(), "dev-00001", "no_certificate");
}

#[test]
fn integrators_receive_only_their_own_sites_alerts() {
    let gate = Gate::start("alerts");

    // Another site's alerts are refused, whatever the protocol version.
    for version in [V311, V5] {
        let ran = run(
            gate.mosquitto(
                "mosquitto_sub",
                &gate.creds("integrator", "int-site-01"),
                "int-site-01",
                version,
            )
            .args(["-t", "alerts/site-02/#", "-W", "5"]),
            CLIENT,
        );
        assert!(
            ran.all().contains("All subscription requests were denied"),
            "{version}: {}",
            ran.all()
        );
    }

    // Subscribers after the refusals: a second connection with the same client id
    // would take over (and end) the first one's session.
    let site1 = gate.subscribe("integrator", "int-site-01", V5, "alerts/site-01/#", 20);
    let site2 = gate.subscribe("integrator", "int-site-02", V311, "alerts/site-02/#", 20);
    gate.publish_ok(
        "bridge",
        "bridge-01",
        V5,
        "alerts/site-01/urgent/dev-00001",
        "{\"site\":\"site-01\"}",
    );
    gate.publish_ok(
        "bridge",
        "bridge-01",
        V311,
        "alerts/site-02/review/dev-00002",
        "{\"site\":\"site-02\"}",
    );
    wait_message(
        &site1,
        "alerts/",
        "alerts/site-01/urgent/dev-00001 {\"site\":\"site-01\"}",
    );
    wait_message(
        &site2,
        "alerts/",
        "alerts/site-02/review/dev-00002 {\"site\":\"site-02\"}",
    );
    assert_eq!(
        received(&site1.stdout(), "alerts/").len(),
        1,
        "{}",
        site1.all()
    );
    assert_eq!(
        received(&site2.stdout(), "alerts/"),
        ["alerts/site-02/review/dev-00002 {\"site\":\"site-02\"}"],
        "site-02 saw another site's alert:\n{}",
        site2.all()
    );
    let denial = [
        ("/event", "authorization_denied"),
        ("/action", "subscribe"),
        ("/resource", "alerts/site-02/#"),
        ("/reason", "not_authorized"),
        ("/actor/identity", &spiffe("integrator", "int-site-01")),
    ];
    gate.audited(&denial);
    gate.assert_count(&denial, 2);
}

// ------------------------------------------------------------------------ paho-mqtt

fn paho(version: &str) -> Json {
    let gate = Gate::start(&format!("paho-{version}"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/paho_gate.py");
    let ran = run(
        Command::new("python3")
            .arg(script)
            .args([
                "--port",
                &gate.broker.port.to_string(),
                "--pki",
                s(&gate.pki),
            ])
            .args(["--version", version]),
        Duration::from_secs(45),
    );
    assert!(
        !ran.stderr.contains("ModuleNotFoundError"),
        "paho-mqtt is not installed: python3 -m pip install 'paho-mqtt==2.*' (scripts/test does)\n{}",
        ran.stderr
    );
    assert!(ran.success, "paho_gate.py failed:\n{}", ran.all());
    let out: Json = serde_json::from_str(ran.stdout.trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", ran.all()));
    let shown = format!("{out:#}\nbroker:\n{}", gate.broker.stderr());

    // Two filters in one SUBSCRIBE: the allowed one granted, `#` refused, in order.
    let refused = if version == "5" { 0x87 } else { 0x80 };
    assert_eq!(
        out["suback"]["codes"],
        serde_json::json!([1, refused]),
        "{shown}"
    );

    let denied = &out["denied_pub"];
    assert_eq!(denied["connected"], true, "{shown}");
    if version == "5" {
        assert_eq!(denied["denied_puback"], 0x87, "{shown}");
        assert_eq!(denied["still_connected"], true, "{shown}");
    } else {
        assert_eq!(denied["disconnected"], true, "{shown}");
    }
    assert_eq!(denied["allowed_puback"], 0, "{shown}");
    assert_eq!(
        denied["bridge_received"],
        serde_json::json!([["devices/dev-00001/telemetry", "genuine"]]),
        "{shown}"
    );

    let retained = &out["retained"];
    assert_eq!(retained["ops_puback"], 0, "{shown}");
    assert_eq!(retained["codes"], serde_json::json!([1]), "{shown}");
    assert_eq!(
        retained["received"],
        serde_json::json!(["devices/dev-00001/config", "cfg-v2", true]),
        "{shown}"
    );

    let will = &out["will"];
    assert_eq!(will["connected"], true, "{shown}");
    assert_eq!(
        will["bridge_received"],
        serde_json::json!(["devices/dev-00001/status", "gone"]),
        "{shown}"
    );

    assert_eq!(out["empty_id"]["connected"], true, "{shown}");
    assert_eq!(out["empty_id"]["own_puback"], 0, "{shown}");

    let denials = [
        ("/event", "authorization_denied"),
        ("/actor/identity", &spiffe("device", "dev-00001")),
        ("/reason", "not_authorized"),
    ];
    gate.audited(&[
        denials[0],
        denials[1],
        denials[2],
        ("/action", "subscribe"),
        ("/resource", "#"),
    ]);
    gate.audited(&[
        denials[0],
        denials[1],
        denials[2],
        ("/action", "publish"),
        ("/resource", "devices/dev-00002/telemetry"),
    ]);
    out
}

#[test]
fn paho_mqtt5_suback_puback_retained_and_will() {
    paho("5");
}

#[test]
fn paho_mqtt311_suback_disconnect_retained_and_will() {
    paho("311");
}

/// issue 15, item 6: MQTT keepalive 0 means "no keepalive" and is valid in both
/// versions; rumqttd refuses it without a CONNACK, and the gate used to audit such a
/// connection as accepted anyway. Now the gate accepts it (and keeps rumqttd's side of
/// the connection alive itself).
#[test]
fn paho_with_keepalive_0_connects_and_publishes_in_both_versions() {
    let gate = Gate::start("paho-keepalive0");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/paho_keepalive0.py");
    for (version, device) in [("311", "dev-00003"), ("5", "dev-00004")] {
        let ran = run(
            Command::new("python3")
                .arg(&script)
                .args(["--port", &gate.broker.port.to_string()])
                .args(["--pki", s(&gate.pki), "--device", device])
                .args(["--version", version]),
            Duration::from_secs(30),
        );
        assert!(
            !ran.stderr.contains("ModuleNotFoundError"),
            "paho-mqtt is not installed: python3 -m pip install 'paho-mqtt==2.*' (scripts/test does)\n{}",
            ran.stderr
        );
        assert!(ran.success, "paho_keepalive0.py failed:\n{}", ran.all());
        let out: Json = serde_json::from_str(ran.stdout.trim())
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", ran.all()));
        let shown = format!("{version}: {out}\nbroker:\n{}", gate.broker.stderr());
        assert_eq!(out["connect"], 0, "CONNACK success: {shown}");
        assert_eq!(out["puback"], 0, "own telemetry acknowledged: {shown}");
        gate.audited(&[
            ("/event", "connection_accepted"),
            ("/actor/identity", &spiffe("device", device)),
        ]);
    }
    assert_eq!(
        gate.count(&[("/reason", "closed_before_connack")]),
        0,
        "no connection died before its CONNACK"
    );
}

// ------------------------------------------------------------------------ reloads

#[test]
fn live_connection_is_closed_when_its_certificate_is_revoked() {
    let gate = Gate::start("live-revocation");
    let mut sub = gate.subscribe("device", "dev-00002", V311, "devices/dev-00002/config", 30);
    let other = gate.subscribe("device", "dev-00001", V311, "devices/dev-00001/config", 30);
    vitalmq(&[
        "certs",
        "revoke",
        "--dir",
        s(&gate.pki),
        "--role",
        "device",
        "--id",
        "dev-00002",
    ]);
    gate.broker.sighup();
    let started = Instant::now();
    // The connection is closed; mosquitto_sub's reconnect then fails the handshake and
    // it exits.
    let ran = sub.wait_exit(Duration::from_secs(10)).unwrap_or_else(|| {
        panic!(
            "dev-00002 still connected 10 s after revocation:\n{}\nbroker:\n{}",
            sub.all(),
            gate.broker.stderr()
        )
    });
    assert!(!ran.success, "{}", ran.all());
    assert!(started.elapsed() < Duration::from_secs(10));
    let closed = gate.audited(&[
        ("/event", "connection_closed"),
        ("/action", "connect"),
        ("/reason", "certificate_no_longer_valid"),
        ("/actor/identity", &spiffe("device", "dev-00002")),
    ]);
    assert_eq!(closed["details"]["why"], "certificate_revoked", "{closed}");
    gate.audited(&[
        ("/event", "connection_refused"),
        ("/reason", "certificate_revoked"),
    ]);
    // dev-00001 was not touched: still subscribed and receiving.
    gate.publish_ok("operator", "ops-01", V5, "devices/dev-00001/config", "cfg");
    wait_message(&other, "devices/", "devices/dev-00001/config cfg");
    assert_eq!(
        gate.count(&[
            ("/event", "connection_closed"),
            ("/actor/identity", &spiffe("device", "dev-00001"))
        ]),
        0
    );
}

#[test]
fn a_silent_tcp_client_does_not_delay_a_real_one() {
    let gate = Gate::start("silent");
    // Connected: the silent socket is ahead of the real client in the listener's
    // accept queue, so the broker takes it first.
    let mut silent = TcpStream::connect(("127.0.0.1", gate.broker.port)).expect("connect");
    let started = Instant::now();
    // run() panics after CLIENT (15 s), well below the 30 s handshake timeout.
    gate.publish_ok(
        "device",
        "dev-00001",
        V5,
        "devices/dev-00001/telemetry",
        "not-delayed",
    );
    assert!(started.elapsed() < CLIENT);
    // The silent socket is still open: a read times out instead of seeing EOF.
    silent
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("read timeout");
    let mut buf = [0u8; 16];
    match silent.read(&mut buf) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!(
            "silent connection no longer open: {other:?}\nbroker:\n{}",
            gate.broker.stderr()
        ),
    }
}

#[test]
fn a_broken_acl_on_reload_keeps_the_policy_in_force() {
    let gate = Gate::start("broken-acl");
    let acl = gate.tmp.path().join("acl.toml");
    let good = std::fs::read_to_string(&acl).expect("read ACL");
    let line = good.lines().count() + 2;
    std::fs::write(&acl, format!("{good}\n[roles.device\nconnect = true\n")).expect("break ACL");
    gate.broker.sighup();
    let rejected = gate.audited(&[("/event", "policy_rejected"), ("/reason", "invalid_policy")]);
    assert!(
        rejected["details"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("acl.toml")),
        "{rejected}"
    );
    assert_eq!(
        gate.count(&[("/event", "policy_reloaded")]),
        0,
        "{:?}",
        gate.records()
    );

    // Still serving, with the old policy: own telemetry allowed, another's refused.
    let bridge = gate.subscribe("bridge", "bridge-01", V5, "devices/+/telemetry", 20);
    gate.publish_ok(
        "device",
        "dev-00001",
        V5,
        "devices/dev-00001/telemetry",
        "after-broken-reload",
    );
    wait_message(
        &bridge,
        "devices/",
        "devices/dev-00001/telemetry after-broken-reload",
    );
    let ran = gate.publish(
        &gate.creds("device", "dev-00001"),
        "dev-00001",
        V5,
        "devices/dev-00002/telemetry",
        "x",
    );
    assert!(ran.all().contains("Not authorized"), "{}", ran.all());

    // The log names the file and the line.
    let stderr = gate.broker.stderr();
    let location = format!("{}:{line}", acl.display());
    assert!(
        stderr.contains(&location),
        "broker log does not name {location}:\n{stderr}"
    );
}

#[test]
fn metrics_count_connections_handshakes_denials_and_messages() {
    let gate = Gate::start("metrics");
    gate.publish_ok(
        "device",
        "dev-00001",
        "mqttv311",
        "devices/dev-00001/telemetry",
        "ok",
    );
    let denied = gate.publish(
        &gate.creds("device", "dev-00001"),
        "dev-00001",
        "mqttv5",
        "devices/dev-00002/telemetry",
        "x",
    );
    assert!(denied.all().contains("Not authorized"), "{}", denied.all());
    let refused = gate.publish(
        &Creds::none(),
        "dev-00001",
        "mqttv311",
        "devices/dev-00001/telemetry",
        "x",
    );
    assert!(!refused.success);
    gate.audited(&[
        ("/event", "connection_refused"),
        ("/reason", "no_certificate"),
    ]);

    let text = gate.metrics();
    let value = |series: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{series} missing from /metrics:\n{text}"))
    };
    assert!(value("vitalmq_handshakes_total{outcome=\"ok\"}") >= 2.0);
    assert!(value("vitalmq_handshakes_total{outcome=\"tls\"}") >= 1.0);
    assert!(value("vitalmq_denials_total{kind=\"publish\"}") >= 1.0);
    assert!(value("vitalmq_messages_total{direction=\"in\"}") >= 1.0);
    assert!(value("vitalmq_bytes_total{direction=\"in\"}") >= 2.0);
    assert!(text.contains("vitalmq_connections"), "{text}");
}

/// The broker's audit log verifies with `vitalmq audit verify`, and an edited copy is
/// reported at the edited record with exit code 1.
#[test]
fn the_broker_audit_log_is_a_verifiable_chain() {
    let gate = Gate::start("audit-chain");
    let denied = gate.publish(
        &gate.creds("device", "dev-00001"),
        "dev-00001",
        "mqttv5",
        "devices/dev-00002/telemetry",
        "x",
    );
    assert!(denied.all().contains("Not authorized"), "{}", denied.all());
    gate.audited(&[("/event", "authorization_denied")]);
    // The broker is running: records since its last checkpoint are not signed yet.
    let ok = vitalmq(&["audit", "verify", s(&gate.audit), "--allow-unsigned-tail"]);
    assert!(
        ok.success && ok.stdout.contains("chain intact"),
        "{}",
        ok.all()
    );

    let text = std::fs::read_to_string(&gate.audit).expect("audit log");
    let edited = text.replacen(
        "devices/dev-00002/telemetry",
        "devices/dev-00001/telemetry",
        1,
    );
    let line = text
        .lines()
        .position(|l| l.contains("devices/dev-00002/telemetry"))
        .expect("denial line")
        + 1;
    let copy = gate.tmp.path().join("edited.jsonl");
    std::fs::write(&copy, edited).expect("write copy");
    let broken = run(
        Command::new(env!("CARGO_BIN_EXE_vitalmq")).args(["audit", "verify", s(&copy)]),
        CLIENT,
    );
    assert_eq!(broken.code, Some(1), "{}", broken.all());
    assert!(
        broken.stdout.contains(&format!("line {line}:")),
        "{}",
        broken.all()
    );
}
