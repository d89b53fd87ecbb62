//! The broker's presence signal (issue 17, SPEC v1.1 section 5.1) end to end: an
//! in-process broker on a free 127.0.0.1 port with the shipped ACL, watched by
//! `mosquitto_sub` holding the bridge's certificate, with devices that are
//! `mosquitto_pub` / `mosquitto_sub` processes (and, for the takeover, a raw TLS client
//! that does not reconnect by itself).

mod common;

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value as Json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use vitalmq_broker::Broker;
use vitalmq_certs::{Layout, Pki};
use vitalmq_policies::{PrincipalId, Role};

/// How long something that should happen may take.
const EVENTUALLY: Duration = Duration::from_secs(15);
/// `-W` of every mosquitto_sub: it exits by itself even if a test forgets it.
const SUB_SECONDS: &str = "60";

struct Setup {
    dir: tempfile::TempDir,
    layout: Layout,
    broker: Option<Broker>,
    port: u16,
}

impl Setup {
    async fn start() -> Self {
        let (dir, pki_dir, config) = common::deployment();
        let broker = Broker::start(config).await.expect("broker starts");
        let port = broker.local_addr().port();
        Self {
            layout: Layout::new(&pki_dir),
            dir,
            broker: Some(broker),
            port,
        }
    }

    fn cert(&self, role: Role, id: &str) -> (PathBuf, PathBuf) {
        let id = PrincipalId::new(id).expect("id");
        (
            self.layout.identity_cert(role, &id),
            self.layout.identity_key(role, &id),
        )
    }

    /// mosquitto_pub / mosquitto_sub as `role` `id` (MQTT 3.1.1, client id = its id).
    fn mosquitto(&self, tool: &str, role: Role, id: &str) -> Command {
        let (cert, key) = self.cert(role, id);
        // Line-buffered, so a background subscriber's output can be read as it comes.
        let mut cmd = Command::new("stdbuf");
        cmd.args(["-oL", tool, "-h", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("--cafile")
            .arg(self.layout.ca_cert())
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .args(["-i", id, "-V", "mqttv311"]);
        cmd
    }

    /// A bridge identity subscribed to `presence/#`; it has seen `presence/broker/boot`.
    fn watch(&self, bridge: &str) -> Lines {
        let mut watcher =
            Lines::start(self.mosquitto("mosquitto_sub", Role::Bridge, bridge).args([
                "-q",
                "1",
                "-t",
                "presence/#",
                "-v",
                "-W",
                SUB_SECONDS,
            ]));
        watcher.wait_for("the boot message", |(topic, _)| {
            topic == "presence/broker/boot"
        });
        watcher
    }

    /// A device (mosquitto_sub on its own receipts) that stays connected until killed.
    fn device(&self, id: &str) -> Lines {
        Lines::start(self.mosquitto("mosquitto_sub", Role::Device, id).args([
            "-q",
            "1",
            "-t",
            &format!("devices/{id}/ack"),
            "-W",
            SUB_SECONDS,
        ]))
    }

    /// The retained presence messages a subscriber connecting now gets (`n` of them).
    fn retained(&self, n: usize) -> Vec<(String, Json)> {
        let out = self
            .mosquitto("mosquitto_sub", Role::Bridge, "bridge-01-alerts")
            .args([
                "-q",
                "1",
                "-t",
                "presence/#",
                "-v",
                "-C",
                &n.to_string(),
                "-W",
                "15",
            ])
            .stderr(Stdio::inherit())
            .output()
            .expect("mosquitto_sub runs");
        let text = String::from_utf8(out.stdout).expect("utf-8");
        let lines: Vec<_> = text.lines().map(parse).collect();
        assert_eq!(lines.len(), n, "retained messages:\n{text}");
        lines
    }

    /// Stops the broker (which flushes its audit log) and returns the audit records.
    async fn stop(&mut self) -> Vec<Json> {
        if let Some(broker) = self.broker.take() {
            broker.shutdown().await;
        }
        std::fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .expect("audit log")
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit record"))
            .collect()
    }
}

/// `topic payload`, as `mosquitto_sub -v` prints it (the payload is compact JSON).
fn parse(line: &str) -> (String, Json) {
    let (topic, payload) = line.split_once(' ').unwrap_or((line, ""));
    let json = serde_json::from_str(payload).unwrap_or_else(|e| panic!("{line}: {e}"));
    (topic.to_owned(), json)
}

/// A child process whose stdout lines arrive on a channel; killed when dropped.
struct Lines {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<(String, Json)>,
}

impl Lines {
    fn start(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("mosquitto client starts (apt-get install mosquitto-clients)");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (at most [`EVENTUALLY`]) for a message `want` accepts; returns it.
    fn wait_for(&mut self, what: &str, want: impl Fn(&(String, Json)) -> bool) -> (String, Json) {
        let deadline = Instant::now() + EVENTUALLY;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let message = parse(&line);
                    self.seen.push(message.clone());
                    if want(&message) {
                        return message;
                    }
                }
                Err(_) => panic!("no {what} within {EVENTUALLY:?}; seen: {:#?}", self.seen),
            }
        }
    }

    /// The messages seen on `topic`, in arrival order.
    fn on(&self, topic: &str) -> Vec<&Json> {
        self.seen
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, j)| j)
            .collect()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `2026-12-05T04:23:36.123Z`: RFC 3339, UTC, milliseconds.
fn is_rfc3339_ms(v: &Json) -> bool {
    let Some(t) = v.as_str() else { return false };
    let shape = "0000-00-00T00:00:00.000Z";
    t.len() == shape.len()
        && t.bytes().zip(shape.bytes()).all(|(c, s)| match s {
            b'0' => c.is_ascii_digit(),
            other => c == other,
        })
}

fn presence_of(id: &str, connected: bool) -> impl Fn(&(String, Json)) -> bool {
    let topic = format!("presence/device/{id}");
    move |(t, j)| *t == topic && j["connected"] == connected
}

/// The boot message, and a device's connect and clean disconnect: each a retained
/// message in the documented format, numbered in order within the boot; a subscriber
/// that comes later gets the current state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_connects_and_disconnects_is_announced_and_the_state_is_retained() {
    let mut setup = Setup::start().await;
    let mut bridge = setup.watch("bridge-01");
    let boot = bridge.on("presence/broker/boot")[0].clone();
    assert_eq!(boot["format"], "vitalmq-presence/v1");
    let boot_id = boot["boot"].as_str().expect("boot id").to_owned();
    assert!(
        boot_id.len() == 16 && boot_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{boot}"
    );
    assert!(is_rfc3339_ms(&boot["started_at"]), "{boot}");

    // mosquitto_pub connects, publishes and disconnects with DISCONNECT.
    let status = setup
        .mosquitto("mosquitto_pub", Role::Device, "dev-00001")
        .args(["-q", "1", "-t", "devices/dev-00001/status", "-m", "x"])
        .status()
        .expect("mosquitto_pub runs");
    assert!(status.success());
    let (_, up) = bridge.wait_for("dev-00001 connected", presence_of("dev-00001", true));
    let (_, down) = bridge.wait_for("dev-00001 disconnected", presence_of("dev-00001", false));
    for (message, connected) in [(&up, true), (&down, false)] {
        assert_eq!(message["format"], "vitalmq-presence/v1");
        assert_eq!(message["role"], "device");
        assert_eq!(message["id"], "dev-00001");
        assert_eq!(message["connected"], connected);
        assert_eq!(message["boot"], boot_id.as_str());
        assert!(is_rfc3339_ms(&message["at"]), "{message}");
    }
    assert!(up.get("reason").is_none(), "{up}");
    assert!(down["reason"].is_string(), "{down}");
    assert!(
        up["seq"].as_u64().expect("seq") < down["seq"].as_u64().expect("seq"),
        "{up} {down}"
    );

    // Retained: a subscriber that connects now learns the boot and the current state.
    let retained = setup.retained(2);
    let device = retained
        .iter()
        .find(|(t, _)| t == "presence/device/dev-00001")
        .expect("the device's retained presence");
    assert_eq!(device.1, down, "the last state is the one retained");
    assert!(retained.iter().any(|(t, _)| t == "presence/broker/boot"));
    drop(bridge);
    setup.stop().await;
}

/// A device whose process dies (its socket closed without DISCONNECT) is announced
/// disconnected; while it was connected, a late subscriber got `connected:true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_device_is_announced_disconnected() {
    let mut setup = Setup::start().await;
    let mut bridge = setup.watch("bridge-01");
    let mut device = setup.device("dev-00002");
    let (_, up) = bridge.wait_for("dev-00002 connected", presence_of("dev-00002", true));

    let retained = setup.retained(2);
    assert!(
        retained
            .iter()
            .any(|(t, j)| t == "presence/device/dev-00002" && *j == up),
        "a late subscriber learns the device is connected: {retained:?}"
    );

    device.kill();
    let (_, down) = bridge.wait_for("dev-00002 disconnected", presence_of("dev-00002", false));
    assert!(down["seq"].as_u64() > up["seq"].as_u64(), "{up} {down}");
    assert!(
        matches!(down["reason"].as_str(), Some("io_error" | "client_closed")),
        "{down}"
    );
    drop(bridge);
    setup.stop().await;
}

/// Nobody may publish presence: a device's attempt is refused and audited, and never
/// reaches the bridge (which does see the device's own connect and disconnect around it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_publish_presence() {
    let mut setup = Setup::start().await;
    let mut bridge = setup.watch("bridge-01");
    let _ = setup
        .mosquitto("mosquitto_pub", Role::Device, "dev-00001")
        .args([
            "-q",
            "1",
            "-t",
            "presence/device/x",
            "-m",
            r#"{"format":"vitalmq-presence/v1","connected":true}"#,
        ])
        .status()
        .expect("mosquitto_pub runs");
    bridge.wait_for("dev-00001 disconnected", presence_of("dev-00001", false));
    assert!(
        bridge.on("presence/device/x").is_empty(),
        "{:#?}",
        bridge.seen
    );
    drop(bridge);
    let records = setup.stop().await;
    let denied = records.iter().find(|r| {
        r["event"] == "authorization_denied"
            && r["resource"] == "presence/device/x"
            && r["actor"]["identity"] == "spiffe://demo.vitalmq/device/dev-00001"
    });
    let denied = denied.unwrap_or_else(|| panic!("no audited denial in {records:#?}"));
    assert_eq!(denied["action"], "publish", "{denied}");
    assert_eq!(denied["rule"], "default-deny", "{denied}");
}

/// A TLS client with `role`/`id`'s certificate that sends CONNECT and reads CONNACK.
async fn raw_connect(
    setup: &Setup,
    id: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let (cert, key) = setup.cert(Role::Device, id);
    let chain = CertificateDer::pem_file_iter(cert)
        .expect("cert")
        .collect::<Result<Vec<_>, _>>()
        .expect("cert pem");
    let key = PrivateKeyDer::from_pem_file(key).expect("key");
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(setup.layout.ca_cert()).expect("ca") {
        roots.add(ca.expect("ca pem")).expect("root");
    }
    let tls = tokio_rustls::TlsConnector::from(Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .expect("client auth"),
    ));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", setup.port))
        .await
        .expect("tcp");
    let mut stream = tls
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("handshake");
    let mut connect = v4::Connect::new(id);
    connect.keep_alive = 30;
    let mut buf = BytesMut::new();
    connect.write(&mut buf).expect("encode");
    stream.write_all(&buf).await.expect("CONNECT");
    buf.clear();
    let ack = tokio::time::timeout(EVENTUALLY, async {
        loop {
            match v4::Packet::read(&mut buf, 1 << 16) {
                Ok(packet) => return packet,
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("malformed: {e:?}"),
            }
            assert!(stream.read_buf(&mut buf).await.expect("read") > 0, "closed");
        }
    })
    .await
    .expect("CONNACK in time");
    assert!(
        matches!(&ack, v4::Packet::ConnAck(a) if a.code == v4::ConnectReturnCode::Success),
        "{ack:?}"
    );
    stream
}

/// The same identity connecting again takes the session over: whatever order the old
/// connection's end and the new one's admission reach the publisher, the identity's
/// last presence message (highest `seq`, and the one retained) says connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_ends_with_the_identity_connected() {
    let mut setup = Setup::start().await;
    let mut bridge = setup.watch("bridge-01");
    let mut first = raw_connect(&setup, "dev-00003").await;
    let (_, up) = bridge.wait_for("the first connection", presence_of("dev-00003", true));

    let mut second = setup.device("dev-00003");
    // The first connection is closed by the takeover.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(EVENTUALLY, first.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the first connection was taken over");
    // Three messages in all: up (first), down (first), up (second), in seq order.
    let topic = "presence/device/dev-00003";
    let deadline = Instant::now() + EVENTUALLY;
    while bridge.on(topic).len() < 3 {
        assert!(Instant::now() < deadline, "{:#?}", bridge.seen);
        bridge.wait_for("the takeover's messages", |(t, _)| t == topic);
    }
    let messages = bridge.on(topic);
    assert_eq!(messages.len(), 3, "{messages:#?}");
    let seqs: Vec<u64> = messages
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "published in order: {seqs:?}"
    );
    assert_eq!(*messages[0], up);
    assert_eq!(messages[1]["connected"], false);
    let last = messages[2].clone();
    assert_eq!(last["connected"], true, "{messages:#?}");

    let retained = setup.retained(2);
    assert!(
        retained.iter().any(|(t, j)| t == topic && *j == last),
        "{retained:?}"
    );

    // And the second connection's own end is still announced.
    second.kill();
    let (_, down) = bridge.wait_for(
        "the second connection's end",
        presence_of("dev-00003", false),
    );
    assert!(down["seq"].as_u64() > last["seq"].as_u64());
    drop(bridge);
    setup.stop().await;
}

/// A connection the broker ends because its certificate was revoked (CRL reloaded) is
/// announced disconnected with that reason; the client's reconnects fail the handshake
/// and announce nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_is_announced_disconnected() {
    let mut setup = Setup::start().await;
    let mut bridge = setup.watch("bridge-01");
    let _device = setup.device("dev-00004");
    bridge.wait_for("dev-00004 connected", presence_of("dev-00004", true));

    let mut pki = Pki::open(setup.layout.root()).expect("pki");
    pki.revoke(
        &vitalmq_certs::index::Target::Identity {
            role: Role::Device,
            id: PrincipalId::new("dev-00004").expect("id"),
        },
        vitalmq_certs::Reason::KeyCompromise,
        time::OffsetDateTime::now_utc(),
    )
    .expect("revoke");
    setup
        .broker
        .as_ref()
        .expect("running")
        .reload()
        .await
        .expect("reload");
    let (_, down) = bridge.wait_for("dev-00004 disconnected", presence_of("dev-00004", false));
    assert_eq!(down["reason"], "certificate_revoked", "{down}");
    drop(bridge);
    setup.stop().await;
}
