//! MQTT 5 sessions through the gate and the embedded rumqttd (issue 18, point 4; MQTT 5
//! 3.1.2.4 Clean Start, 3.1.2.11.2 Session Expiry Interval, 3.2.2.1.1 Session Present,
//! 4.1 Session State), with a stock MQTT 5 client (rumqttc v5) over mTLS.
//!
//! An integrator's session with a Session Expiry Interval outlives its connection: an
//! alert published while it is offline is queued and delivered when it reconnects with
//! Clean Start=0. Without one (absent = 0), Clean Start=0 finds no session. A QoS 2
//! publication cut off after its PUBREC completes on the resumed session (MQTT 5 4.3.3,
//! MQTT-4.4.0-1).

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{self, ConnAck, Packet, Publish};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use vitalmq_broker::Broker;
use vitalmq_certs::Layout;
use vitalmq_policies::{PrincipalId, Role};

const INTEGRATOR: &str = "int-site-01";
const FILTER: &str = "alerts/site-01/#";
const ALERT_TOPIC: &str = "alerts/site-01/sessions/spo2";
/// Any one exchange with the broker.
const DEADLINE: Duration = Duration::from_secs(20);

fn tls(layout: &Layout, role: Role, id: &str) -> Transport {
    Transport::tls_with_config(TlsConfiguration::Rustls(client_config(layout, role, id)))
}

fn client_config(layout: &Layout, role: Role, id: &str) -> Arc<rustls::ClientConfig> {
    let id = PrincipalId::new(id).expect("id");
    let chain = CertificateDer::pem_file_iter(layout.identity_cert(role, &id))
        .expect("cert")
        .collect::<Result<Vec<_>, _>>()
        .expect("cert pem");
    let key = PrivateKeyDer::from_pem_file(layout.identity_key(role, &id)).expect("key");
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(layout.ca_cert()).expect("ca") {
        roots.add(ca.expect("ca pem")).expect("root");
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client auth");
    Arc::new(config)
}

/// Connects and returns the client, its event loop and the CONNACK.
async fn connect(
    layout: &Layout,
    port: u16,
    (role, id): (Role, &str),
    clean_start: bool,
    session_expiry: Option<u32>,
) -> (AsyncClient, EventLoop, ConnAck) {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options
        .set_transport(tls(layout, role, id))
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_start(clean_start)
        .set_session_expiry_interval(session_expiry);
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let connack = next(&mut eventloop, "CONNACK", |p| match p {
        Packet::ConnAck(a) => Some(a),
        _ => None,
    })
    .await;
    (client, eventloop, connack)
}

/// Polls until `pick` takes an incoming packet, within [`DEADLINE`].
async fn next<T>(
    eventloop: &mut EventLoop,
    what: &str,
    mut pick: impl FnMut(Packet) -> Option<T>,
) -> T {
    let wait = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(packet)) => {
                    if let Some(t) = pick(packet) {
                        return t;
                    }
                }
                Ok(Event::Outgoing(_)) => {}
                Err(e) => panic!("connection failed waiting for {what}: {e}"),
            }
        }
    };
    tokio::time::timeout(DEADLINE, wait)
        .await
        .unwrap_or_else(|_| panic!("no {what} within {DEADLINE:?}"))
}

/// Sends DISCONNECT and runs the event loop until the connection is closed.
async fn disconnect(client: AsyncClient, mut eventloop: EventLoop) {
    client.disconnect().await.expect("disconnect");
    let closed = async { while eventloop.poll().await.is_ok() {} };
    tokio::time::timeout(DEADLINE, closed)
        .await
        .expect("closed after DISCONNECT");
}

async fn subscribe(client: &AsyncClient, eventloop: &mut EventLoop) {
    client
        .subscribe(FILTER, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let codes = next(eventloop, "SUBACK", |p| match p {
        Packet::SubAck(a) => Some(a.return_codes),
        _ => None,
    })
    .await;
    assert_eq!(codes.len(), 1);
    assert!(
        format!("{:?}", codes[0]).starts_with("Success"),
        "subscription refused: {codes:?}"
    );
}

/// The bridge publishes one alert at QoS 1 and waits for its PUBACK.
async fn publish_alert(layout: &Layout, port: u16, payload: &'static [u8]) {
    let (client, mut eventloop, _) =
        connect(layout, port, (Role::Bridge, "bridge-01"), true, None).await;
    client
        .publish(ALERT_TOPIC, QoS::AtLeastOnce, false, payload)
        .await
        .expect("publish");
    next(&mut eventloop, "PUBACK", |p| match p {
        Packet::PubAck(_) => Some(()),
        _ => None,
    })
    .await;
    disconnect(client, eventloop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_3_1_2_11_2_an_alert_waits_offline_in_a_session_with_expiry_and_arrives_on_resume() {
    let (_dir, pki, config) = common::deployment();
    let layout = Layout::new(&pki);
    let broker = Broker::start(config).await.expect("broker starts");
    let port = broker.local_addr().port();
    let integrator = (Role::Integrator, INTEGRATOR);

    // Clean Start=1 (a fresh session) that outlives the connection by an hour.
    let (client, mut eventloop, connack) =
        connect(&layout, port, integrator, true, Some(3600)).await;
    assert!(!connack.session_present);
    subscribe(&client, &mut eventloop).await;
    disconnect(client, eventloop).await;

    publish_alert(&layout, port, b"while offline").await;

    // MQTT-3.2.2-3: Clean Start=0 resumes the kept session, Session Present=1, and the
    // alert queued for it arrives.
    let (_client, mut eventloop, connack) =
        connect(&layout, port, integrator, false, Some(3600)).await;
    assert!(connack.session_present, "the session was kept");
    let alert: Publish = next(&mut eventloop, "the queued alert", |p| match p {
        Packet::Publish(p) => Some(p),
        _ => None,
    })
    .await;
    assert_eq!(&alert.topic[..], ALERT_TOPIC.as_bytes());
    assert_eq!(&alert.payload[..], b"while offline");
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_3_1_2_11_2_without_session_expiry_clean_start_0_finds_no_session() {
    let (_dir, pki, config) = common::deployment();
    let layout = Layout::new(&pki);
    let broker = Broker::start(config).await.expect("broker starts");
    let port = broker.local_addr().port();
    let integrator = (Role::Integrator, INTEGRATOR);

    // Clean Start=0 and no Session Expiry Interval (= 0): the session ends with the
    // connection (MQTT 3.1.1 CleanSession=0 would have kept it).
    let (client, mut eventloop, _) = connect(&layout, port, integrator, false, None).await;
    subscribe(&client, &mut eventloop).await;
    disconnect(client, eventloop).await;

    let (_client, _eventloop, connack) = connect(&layout, port, integrator, false, None).await;
    assert!(
        !connack.session_present,
        "MQTT-3.2.2-2: no session was kept"
    );
    broker.shutdown().await;
}

/// A hand-driven MQTT 5 connection through the gate, for an exchange a stock client
/// does not let a test stop half-way (rumqttc answers a PUBREC with its PUBREL at once).
struct RawClient {
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    buf: BytesMut,
}

impl RawClient {
    /// Connects with Clean Start `clean_start` and a Session Expiry Interval; returns the
    /// CONNACK too.
    async fn connect(
        layout: &Layout,
        port: u16,
        (role, id): (Role, &str),
        clean_start: bool,
        session_expiry: u32,
    ) -> (RawClient, v5::ConnAck) {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("tcp");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let stream = tokio_rustls::TlsConnector::from(client_config(layout, role, id))
            .connect(name, tcp)
            .await
            .expect("tls");
        let mut client = RawClient {
            stream,
            buf: BytesMut::new(),
        };
        let mut properties = v5::ConnectProperties::new();
        properties.session_expiry_interval = Some(session_expiry);
        let connect = v5::Connect {
            keep_alive: 30,
            client_id: id.into(),
            clean_start,
            properties: Some(properties),
        };
        client
            .send(|b| connect.write(&None, &None, b).map(drop))
            .await;
        match client.read("CONNACK").await {
            Packet::ConnAck(ack) => {
                assert_eq!(ack.code, v5::ConnectReturnCode::Success);
                (client, ack)
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn send(
        &mut self,
        encode: impl FnOnce(&mut BytesMut) -> Result<(), rumqttc::v5::mqttbytes::Error>,
    ) {
        use tokio::io::AsyncWriteExt as _;
        let mut buf = BytesMut::new();
        encode(&mut buf).expect("encode");
        self.stream.write_all(&buf).await.expect("write");
        self.stream.flush().await.expect("flush");
    }

    /// The next packet from the broker, within [`DEADLINE`].
    async fn read(&mut self, what: &str) -> Packet {
        use tokio::io::AsyncReadExt as _;
        let wait = async {
            loop {
                match Packet::read(&mut self.buf, None) {
                    Ok(packet) => return packet,
                    Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => panic!("malformed packet waiting for {what}: {e:?}"),
                }
                let n = self.stream.read_buf(&mut self.buf).await.expect("read");
                assert_ne!(n, 0, "connection closed waiting for {what}");
            }
        };
        tokio::time::timeout(DEADLINE, wait)
            .await
            .unwrap_or_else(|_| panic!("no {what} within {DEADLINE:?}"))
    }
}

/// MQTT 5 4.3.3 and MQTT-4.4.0-1: the bridge publishes an alert at QoS 2, gets PUBREC
/// and loses its connection before its PUBREL; it resumes its session (Clean Start=0)
/// and resends the PUBREL: PUBCOMP, and the integrator gets the alert exactly once.
/// Before rumqttd patch 16 the resent PUBREL got the bridge disconnected (on every
/// reconnect) and the alert was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_4_3_3_a_qos2_alert_cut_off_after_pubrec_completes_on_the_resumed_session() {
    let (_dir, pki, config) = common::deployment();
    let layout = Layout::new(&pki);
    let broker = Broker::start(config).await.expect("broker starts");
    let port = broker.local_addr().port();
    let bridge = (Role::Bridge, "bridge-01");

    let (integrator, mut integrator_loop, _) =
        connect(&layout, port, (Role::Integrator, INTEGRATOR), true, None).await;
    subscribe(&integrator, &mut integrator_loop).await;

    let (mut raw, connack) = RawClient::connect(&layout, port, bridge, true, 3600).await;
    assert!(!connack.session_present);
    let mut alert = v5::Publish::new(ALERT_TOPIC, QoS::ExactlyOnce, "exactly once", None);
    alert.pkid = 7;
    raw.send(|b| alert.write(b).map(drop)).await;
    match raw.read("PUBREC").await {
        Packet::PubRec(rec) => assert_eq!(rec.pkid, 7),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    // The link dies before the PUBREL (no DISCONNECT).
    drop(raw);

    let (mut raw, connack) = RawClient::connect(&layout, port, bridge, false, 3600).await;
    assert!(connack.session_present, "the bridge's session was kept");
    raw.send(|b| v5::PubRel::new(7, None).write(b).map(drop))
        .await;
    match raw.read("PUBCOMP").await {
        Packet::PubComp(comp) => {
            assert_eq!(comp.pkid, 7);
            assert_eq!(comp.reason, v5::PubCompReason::Success);
        }
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    // A QoS 1 marker after it: the integrator's next message after the alert.
    let mut marker = v5::Publish::new(ALERT_TOPIC, QoS::AtLeastOnce, "marker", None);
    marker.pkid = 8;
    raw.send(|b| marker.write(b).map(drop)).await;
    match raw.read("PUBACK").await {
        Packet::PubAck(ack) => assert_eq!(ack.pkid, 8),
        other => panic!("expected PUBACK, got {other:?}"),
    }

    let mut received = Vec::new();
    for what in ["the alert", "the marker"] {
        let publish: Publish = next(&mut integrator_loop, what, |p| match p {
            Packet::Publish(p) => Some(p),
            _ => None,
        })
        .await;
        received.push(publish.payload);
    }
    assert_eq!(received, [&b"exactly once"[..], &b"marker"[..]]);
    broker.shutdown().await;
}
