//! The gate's connect path end to end: TLS clients sending raw MQTT frames to an
//! in-process broker on 127.0.0.1 (issue 15, items 1 and 6).
//!
//! The reconnect race: two connections with one device certificate and client id,
//! each looping "TLS connect, CONNECT, read CONNACK, close without DISCONNECT", once
//! per MQTT version. rumqttd 0.20 used to leave a stale will handler behind, panic on
//! the next CONNECT of that client id while holding its will-handler lock, and from
//! then on refuse every CONNECT of that MQTT version, while the gate audited every
//! dead connection as accepted. Afterwards other devices of both versions (and the
//! racing ones) must connect, and the audit log must hold a `connection_accepted`
//! record exactly for the connections whose client received a successful CONNACK
//! (matched by the client's address).
//!
//! Protocol violations after CONNECT that stock clients do not produce (a second
//! CONNECT, a PUBACK or PUBREL for a packet id nobody used) close the connection with
//! an audit record saying why.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use vitalmq_broker::{Broker, BrokerConfig};
use vitalmq_certs::Layout;
use vitalmq_policies::{PrincipalId, Role, TrustDomain};

/// Connections per racing loop, and the time the race may take at most. On a release
/// build the race took rumqttd down after about 6 s (3.1.1) and 2 s (5) of two ~10 ms
/// loops, i.e. some hundreds of connections; each loop here makes up to this many.
const ROUNDS: usize = 1_500;
const RACE_DEADLINE: Duration = Duration::from_secs(60);
/// One connect / CONNACK exchange.
const EXCHANGE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mqtt {
    V311,
    V5,
}

struct Deployment {
    _dir: tempfile::TempDir,
    layout: Layout,
    audit: std::path::PathBuf,
    ca: Vec<CertificateDer<'static>>,
}

impl Deployment {
    fn new() -> (Self, BrokerConfig) {
        let (dir, pki_dir, config) = common::deployment();
        let layout = Layout::new(&pki_dir);
        let ca = CertificateDer::pem_file_iter(layout.ca_cert())
            .expect("ca")
            .collect::<Result<Vec<_>, _>>()
            .expect("ca pem");
        let deployment = Self {
            audit: dir.path().join("audit.jsonl"),
            _dir: dir,
            layout,
            ca,
        };
        (deployment, config)
    }

    /// A TLS client configuration presenting `device`'s certificate.
    fn device(&self, device: &str) -> TlsConnector {
        let id = PrincipalId::new(device).expect("id");
        let chain = CertificateDer::pem_file_iter(self.layout.identity_cert(Role::Device, &id))
            .expect("cert")
            .collect::<Result<Vec<_>, _>>()
            .expect("cert pem");
        let key =
            PrivateKeyDer::from_pem_file(self.layout.identity_key(Role::Device, &id)).expect("key");
        let mut roots = rustls::RootCertStore::empty();
        for ca in &self.ca {
            roots.add(ca.clone()).expect("root");
        }
        TlsConnector::from(Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_client_auth_cert(chain, key)
                .expect("client auth"),
        ))
    }
}

fn connect_packet(version: Mqtt, client_id: &str) -> BytesMut {
    let mut buf = BytesMut::new();
    match version {
        Mqtt::V311 => {
            let mut c = v4::Connect::new(client_id);
            c.keep_alive = 30;
            c.write(&mut buf).expect("encode");
        }
        Mqtt::V5 => {
            let c = v5::Connect {
                keep_alive: 30,
                client_id: client_id.into(),
                clean_start: true,
                properties: None,
            };
            c.write(&None, &None, &mut buf).expect("encode");
        }
    }
    buf
}

/// One "connect, CONNECT, read CONNACK, close without DISCONNECT" round. Returns the
/// client's address and whether a successful CONNACK arrived.
async fn round(
    tls: &TlsConnector,
    broker: SocketAddr,
    version: Mqtt,
    client_id: &str,
) -> (Option<SocketAddr>, bool) {
    let exchange = async {
        let tcp = TcpStream::connect(broker).await.ok()?;
        let local = tcp.local_addr().ok()?;
        let name = ServerName::try_from("localhost").expect("name");
        let Ok(mut stream) = tls.connect(name, tcp).await else {
            return Some((local, false));
        };
        if stream
            .write_all(&connect_packet(version, client_id))
            .await
            .is_err()
        {
            return Some((local, false));
        }
        let mut buf = BytesMut::new();
        loop {
            let ok = match version {
                Mqtt::V311 => match v4::Packet::read(&mut buf, 1 << 16) {
                    Ok(v4::Packet::ConnAck(a)) => Some(a.code == v4::ConnectReturnCode::Success),
                    Ok(_) => Some(false),
                    Err(_) => None,
                },
                Mqtt::V5 => match v5::Packet::read(&mut buf, None) {
                    Ok(v5::Packet::ConnAck(a)) => Some(a.code == v5::ConnectReturnCode::Success),
                    Ok(_) => Some(false),
                    Err(_) => None,
                },
            };
            if let Some(ok) = ok {
                // Close without DISCONNECT, as a dying link does.
                drop(stream);
                return Some((local, ok));
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return Some((local, false)),
                Ok(_) => {}
            }
        }
    };
    match tokio::time::timeout(EXCHANGE, exchange).await {
        Ok(Some((local, ok))) => (Some(local), ok),
        _ => (None, false),
    }
}

/// What the racing loops saw.
#[derive(Debug, Default)]
struct Seen {
    connections: usize,
    /// Client addresses that got a successful CONNACK, with how often (ports recur).
    connacked: HashMap<String, usize>,
    refused_or_dead: usize,
}

async fn race(
    tls: TlsConnector,
    broker: SocketAddr,
    version: Mqtt,
    client_id: &'static str,
    deadline: tokio::time::Instant,
) -> Seen {
    let mut seen = Seen::default();
    for _ in 0..ROUNDS {
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        let (local, ok) = round(&tls, broker, version, client_id).await;
        seen.connections += 1;
        match (local, ok) {
            (Some(local), true) => *seen.connacked.entry(local.to_string()).or_default() += 1,
            _ => seen.refused_or_dead += 1,
        }
    }
    seen
}

fn audit_records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .expect("audit log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json record"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_loops_on_one_identity_leave_both_mqtt_versions_usable() {
    let (deployment, config) = Deployment::new();
    let broker = Broker::start(config).await.expect("broker starts");
    let addr = broker.local_addr();

    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + RACE_DEADLINE;
    let mut loops = Vec::new();
    for (version, device) in [(Mqtt::V311, "dev-00001"), (Mqtt::V5, "dev-00002")] {
        for _ in 0..2 {
            let tls = deployment.device(device);
            loops.push(tokio::spawn(race(tls, addr, version, device, deadline)));
        }
    }
    let mut seen = Seen::default();
    for l in loops {
        let s = l.await.expect("loop");
        seen.connections += s.connections;
        seen.refused_or_dead += s.refused_or_dead;
        for (addr, n) in s.connacked {
            *seen.connacked.entry(addr).or_default() += n;
        }
    }
    let took = started.elapsed();
    eprintln!(
        "race: {} connections in {:.1} s ({} with CONNACK, {} without)",
        seen.connections,
        took.as_secs_f64(),
        seen.connacked.values().sum::<usize>(),
        seen.refused_or_dead
    );

    // Every version still serves: other devices, and the racing identities themselves.
    for (version, device) in [
        (Mqtt::V311, "dev-00003"),
        (Mqtt::V5, "dev-00004"),
        (Mqtt::V311, "dev-00001"),
        (Mqtt::V5, "dev-00002"),
    ] {
        let (local, ok) = round(&deployment.device(device), addr, version, device).await;
        assert!(ok, "{device} ({version:?}) connects after the race");
        if let Some(local) = local {
            *seen.connacked.entry(local.to_string()).or_default() += 1;
        }
    }
    broker.shutdown().await;

    let records = audit_records(&deployment.audit);
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for r in &records {
        *kinds
            .entry(format!(
                "{} {} {}",
                r["event"], r["reason"], r["details"]["ended"]
            ))
            .or_default() += 1;
    }
    eprintln!("{kinds:#?}");
    let mut accepted = HashMap::<String, usize>::new();
    for r in records
        .iter()
        .filter(|r| r["event"] == "connection_accepted")
    {
        let addr = r["actor"]["addr"].as_str().expect("addr").to_owned();
        *accepted.entry(addr).or_default() += 1;
    }
    let false_records: usize = accepted
        .iter()
        .map(|(addr, n)| n.saturating_sub(seen.connacked.get(addr).copied().unwrap_or(0)))
        .sum();
    assert_eq!(
        false_records, 0,
        "connection_accepted records for connections that got no CONNACK"
    );
    let unaudited: usize = seen
        .connacked
        .iter()
        .map(|(addr, n)| n.saturating_sub(accepted.get(addr).copied().unwrap_or(0)))
        .sum();
    assert_eq!(
        unaudited, 0,
        "connections that got a CONNACK without a connection_accepted record"
    );
}

/// A connected raw client: sends `after` once its CONNACK came, then reads until the
/// broker closes. Returns the client's address and everything read after CONNACK.
async fn violate(
    tls: &TlsConnector,
    broker: SocketAddr,
    version: Mqtt,
    client_id: &str,
    after: &[u8],
) -> (SocketAddr, Vec<u8>) {
    let exchange = async {
        let tcp = TcpStream::connect(broker).await.expect("tcp");
        let local = tcp.local_addr().expect("addr");
        let name = ServerName::try_from("localhost").expect("name");
        let mut stream = tls.connect(name, tcp).await.expect("handshake");
        stream
            .write_all(&connect_packet(version, client_id))
            .await
            .expect("CONNECT");
        // CONNACK: 0x20, remaining length (< 128 here), the rest.
        let mut head = [0u8; 2];
        stream.read_exact(&mut head).await.expect("CONNACK");
        assert_eq!(head[0], 0x20, "CONNACK first");
        let mut rest = vec![0u8; usize::from(head[1])];
        stream.read_exact(&mut rest).await.expect("CONNACK body");
        assert_eq!(rest.get(1), Some(&0), "CONNACK success");
        stream.write_all(after).await.expect("violation");
        let mut tail = Vec::new();
        let _ = stream.read_to_end(&mut tail).await;
        (local, tail)
    };
    tokio::time::timeout(EXCHANGE, exchange)
        .await
        .expect("the broker closes the connection in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_after_connect_are_audited_with_their_reason() {
    let (deployment, config) = Deployment::new();
    let broker = Broker::start(config).await.expect("broker starts");
    let addr = broker.local_addr();
    let tls = deployment.device("dev-00001");

    let second_connect_5 = connect_packet(Mqtt::V5, "dev-00001");
    // (An unknown PUBREL is no violation: it is answered with PUBCOMP, gate unit test
    // `an_unknown_puback_is_audited_and_closes_the_connection_an_unknown_pubrel_gets_pubcomp`.)
    let cases: [(Mqtt, &[u8], &str); 4] = [
        (
            Mqtt::V311,
            &connect_packet(Mqtt::V311, "dev-00001"),
            "second_connect",
        ),
        (Mqtt::V5, &second_connect_5, "second_connect"),
        (Mqtt::V311, &[0x40, 2, 0x12, 0x34], "unknown_packet_id"),
        (Mqtt::V5, &[0x40, 2, 0x12, 0x34], "unknown_packet_id"),
    ];
    let mut expected = Vec::new();
    for (version, after, reason) in cases {
        let (local, tail) = violate(&tls, addr, version, "dev-00001", after).await;
        if version == Mqtt::V5 {
            assert_eq!(
                tail.get(..3),
                Some(&[0xE0, 2, 0x82][..]),
                "{reason}: DISCONNECT with 0x82 (protocol error)"
            );
        }
        expected.push((local.to_string(), reason));
    }
    broker.shutdown().await;

    let records = audit_records(&deployment.audit);
    for (local, reason) in expected {
        assert!(
            records.iter().any(|r| r["event"] == "connection_closed"
                && r["reason"] == reason
                && r["actor"]["addr"] == local.as_str()),
            "no connection_closed record with reason {reason} for {local}"
        );
    }
}

/// Collects audit records in memory.
#[derive(Debug, Default)]
struct Records(std::sync::Mutex<Vec<vitalmq_audit::AuditRecord>>);

impl vitalmq_broker::gate::AuditSink for Records {
    fn record(
        &self,
        record: vitalmq_audit::AuditRecord,
    ) -> Result<(), vitalmq_broker::gate::AuditUnavailable> {
        self.0.lock().expect("records").push(record);
        Ok(())
    }
}

/// Keepalive 0 ("no keepalive") is valid MQTT; rumqttd refuses it and, asked for a
/// keepalive instead, closes a connection it hears nothing from for 1.5 times that.
/// The gate keeps rumqttd's side alive for such a client: after minutes of silence
/// (tokio's paused clock, through the relay and the embedded rumqttd) it still answers.
#[tokio::test]
async fn a_silent_client_with_keepalive_0_stays_connected() {
    use tokio::sync::watch;
    use vitalmq_broker::accept::AcceptedPeer;
    use vitalmq_broker::authz::{Authorizer, PolicyAuthorizer};
    use vitalmq_broker::embedded::{EmbeddedBroker, EmbeddedSettings};
    use vitalmq_broker::identity::{IdentitySource, PeerIdentity};
    use vitalmq_broker::ratelimit::RateRegistry;
    use vitalmq_broker::relay::{self, RelayContext};
    use vitalmq_policies::{AclPolicy, DeviceRegistry, SpiffeId};

    let (deployment, config) = Deployment::new();
    let acl = AclPolicy::load(&config.policy.acl).expect("acl");
    let registry = DeviceRegistry::load(&config.policy.registry).expect("registry");
    let authz: Arc<dyn Authorizer> =
        Arc::new(PolicyAuthorizer::new(Arc::new(acl), Arc::new(registry)));
    let edge = vitalmq_broker::tls::build(&config.tls).expect("tls");
    let (_authz_tx, authz_rx) = watch::channel(authz);
    let (_edge_tx, edge_rx) = watch::channel(Arc::new(edge));
    let (_shutdown_tx, shutdown_rx) = watch::channel(false);
    let audit = Arc::new(Records::default());
    let ctx = Arc::new(RelayContext {
        embedded: Arc::new(EmbeddedBroker::start(&EmbeddedSettings::default()).expect("rumqttd")),
        authz: authz_rx,
        edge: edge_rx,
        audit: audit.clone(),
        rates: RateRegistry::default(),
        connect_timeout: Duration::from_secs(10),
        shutdown: shutdown_rx,
        presence: vitalmq_broker::presence::PresenceFeed::disabled(),
    });
    let id = PrincipalId::new("dev-00001").expect("id");
    let leaf = CertificateDer::pem_file_iter(deployment.layout.identity_cert(Role::Device, &id))
        .expect("cert")
        .next()
        .expect("one certificate")
        .expect("pem");
    let peer = AcceptedPeer {
        identity: PeerIdentity {
            spiffe: SpiffeId::new(
                TrustDomain::new("demo.vitalmq").expect("td"),
                Role::Device,
                id,
            ),
            source: IdentitySource::SanUri,
            serial_hex: "01".into(),
            fingerprint_sha256_hex: "00".repeat(32),
            not_after: time::OffsetDateTime::now_utc() + time::Duration::days(1),
        },
        remote: "127.0.0.1:5555".parse().expect("addr"),
        leaf,
        intermediates: Vec::new(),
    };
    let (mut client, gate_end) = tokio::io::duplex(64 << 10);
    let served = tokio::spawn(relay::serve(gate_end, peer, ctx));

    let mut connect = v4::Connect::new("dev-00001");
    connect.keep_alive = 0;
    let mut buf = BytesMut::new();
    connect.write(&mut buf).expect("encode");
    client.write_all(&buf).await.expect("CONNECT");
    let mut inbox = BytesMut::new();
    let read_packet = async |client: &mut tokio::io::DuplexStream, inbox: &mut BytesMut| loop {
        match v4::Packet::read(inbox, 1 << 16) {
            Ok(packet) => return Some(packet),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => panic!("malformed packet from the gate: {e:?}"),
        }
        match tokio::time::timeout(EXCHANGE, client.read_buf(inbox)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return None,
        }
    };
    assert!(matches!(
        read_packet(&mut client, &mut inbox).await,
        Some(v4::Packet::ConnAck(a)) if a.code == v4::ConnectReturnCode::Success
    ));

    // Five silent minutes, one second at a time so every timer and task gets its turn.
    tokio::time::pause();
    for _ in 0..300 {
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    }
    tokio::time::resume();

    client.write_all(&[0xC0, 0]).await.expect("PINGREQ");
    assert!(
        matches!(
            read_packet(&mut client, &mut inbox).await,
            Some(v4::Packet::PingResp)
        ),
        "still connected: the gate pinged rumqttd on the client's behalf"
    );
    assert!(!served.is_finished());
    let events: Vec<_> = audit
        .0
        .lock()
        .expect("records")
        .iter()
        .map(|r| r.event)
        .collect();
    assert_eq!(events, vec![vitalmq_audit::Event::ConnectionAccepted]);
}
