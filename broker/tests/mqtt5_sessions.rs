//! MQTT 5 sessions through the gate and the embedded rumqttd (issue 18, point 4; MQTT 5
//! 3.1.2.4 Clean Start, 3.1.2.11.2 Session Expiry Interval, 3.2.2.1.1 Session Present,
//! 4.1 Session State), with a stock MQTT 5 client (rumqttc v5) over mTLS.
//!
//! An integrator's session with a Session Expiry Interval outlives its connection: an
//! alert published while it is offline is queued and delivered when it reconnects with
//! Clean Start=0. Without one (absent = 0), Clean Start=0 finds no session.

mod common;

use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnAck, Packet, Publish};
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
    Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(config)))
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
