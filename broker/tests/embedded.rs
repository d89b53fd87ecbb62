//! The embedded rumqttd serves in-process pipes: it admits a CONNECT only with the
//! per-process secret, routes between pipes like between sockets, and treats a dropped
//! pipe like a dropped socket (the will message fires).

use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::{QoS, v4};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
use vitalmq_broker::embedded::{EmbeddedBroker, EmbeddedSettings};
use vitalmq_broker::gate::Version;

const WAIT: Duration = Duration::from_secs(5);

async fn send(pipe: &mut DuplexStream, packet: impl FnOnce(&mut BytesMut)) {
    let mut buf = BytesMut::new();
    packet(&mut buf);
    pipe.write_all(&buf).await.expect("write to rumqttd");
}

/// Reads one whole packet from rumqttd, or `None` when the pipe closed first.
async fn read_packet(pipe: &mut DuplexStream, buf: &mut BytesMut) -> Option<v4::Packet> {
    loop {
        match v4::Packet::read(buf, 1 << 20) {
            Ok(packet) => return Some(packet),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => panic!("rumqttd sent a malformed packet: {e:?}"),
        }
        let n = tokio::time::timeout(WAIT, pipe.read_buf(buf))
            .await
            .expect("rumqttd answers in time")
            .expect("read from rumqttd");
        if n == 0 {
            return None;
        }
    }
}

/// Connects `client_id` with `password` (and an optional will); returns the pipe and
/// the CONNACK return code, or `None` when rumqttd closed without one.
async fn connect(
    embedded: &EmbeddedBroker,
    client_id: &str,
    password: &str,
    will: Option<v4::LastWill>,
) -> (DuplexStream, Option<v4::ConnectReturnCode>) {
    let mut pipe = embedded.connect(Version::V311);
    let mut connect = v4::Connect::new(client_id);
    connect.login = Some(v4::Login::new("anyone", password));
    connect.last_will = will;
    send(&mut pipe, |b| {
        connect.write(b).expect("encode CONNECT");
    })
    .await;
    let mut buf = BytesMut::new();
    let code = match read_packet(&mut pipe, &mut buf).await {
        Some(v4::Packet::ConnAck(ack)) => Some(ack.code),
        Some(other) => panic!("expected CONNACK, got {other:?}"),
        None => None,
    };
    (pipe, code)
}

/// Connects `client_id` (MQTT 3.1.1, no will), subscribes to `filter` at QoS 1 and waits
/// for the SUBACK; returns the pipe and its read buffer.
async fn subscriber(
    embedded: &EmbeddedBroker,
    client_id: &str,
    password: &str,
    filter: &str,
) -> (DuplexStream, BytesMut) {
    let (mut pipe, code) = connect(embedded, client_id, password, None).await;
    assert_eq!(code, Some(v4::ConnectReturnCode::Success));
    send(&mut pipe, |b| {
        v4::Subscribe::new(filter, QoS::AtLeastOnce)
            .write(b)
            .expect("encode SUBSCRIBE");
    })
    .await;
    let mut buf = BytesMut::new();
    assert!(matches!(
        read_packet(&mut pipe, &mut buf).await,
        Some(v4::Packet::SubAck(_))
    ));
    (pipe, buf)
}

#[tokio::test]
async fn only_the_gate_secret_is_admitted() {
    let embedded = EmbeddedBroker::start(&EmbeddedSettings::default()).expect("starts");
    let (_, guessed) = connect(&embedded, "outsider", "guess", None).await;
    assert_ne!(
        guessed,
        Some(v4::ConnectReturnCode::Success),
        "a wrong password must not be accepted"
    );
    let (_, admitted) = connect(&embedded, "gate-client", &embedded.password(), None).await;
    assert_eq!(admitted, Some(v4::ConnectReturnCode::Success));
}

#[tokio::test]
async fn messages_route_between_pipes_and_a_dropped_pipe_fires_its_will() {
    let settings = EmbeddedSettings {
        // Small pipes: a 20 KiB message must still pass (the writer waits for room).
        pipe_bytes: 4096,
        ..EmbeddedSettings::default()
    };
    let embedded = EmbeddedBroker::start(&settings).expect("starts");
    let secret = embedded.password();
    let (mut subscriber, mut sub_buf) = subscriber(&embedded, "watcher", &secret, "t/#").await;

    let will = v4::LastWill::new("t/will", "gone", QoS::AtLeastOnce, false);
    let (mut publisher, code) = connect(&embedded, "sender", &secret, Some(will)).await;
    assert_eq!(code, Some(v4::ConnectReturnCode::Success));
    let big = vec![7u8; 20 * 1024];
    let mut publish = v4::Publish::new("t/data", QoS::AtLeastOnce, big.clone());
    publish.pkid = 1;
    send(&mut publisher, |b| {
        publish.write(b).expect("encode PUBLISH");
    })
    .await;
    let mut pub_buf = BytesMut::new();
    assert!(matches!(
        read_packet(&mut publisher, &mut pub_buf).await,
        Some(v4::Packet::PubAck(ack)) if ack.pkid == 1
    ));
    match read_packet(&mut subscriber, &mut sub_buf).await {
        Some(v4::Packet::Publish(p)) => {
            assert_eq!(p.topic, "t/data");
            assert_eq!(&p.payload[..], &big[..]);
            send(&mut subscriber, |b| {
                v4::PubAck::new(p.pkid).write(b).expect("encode PUBACK");
            })
            .await;
        }
        other => panic!("expected the PUBLISH, got {other:?}"),
    }

    // No DISCONNECT: the gate drops the pipe as when a client's socket dies.
    drop(publisher);
    match read_packet(&mut subscriber, &mut sub_buf).await {
        Some(v4::Packet::Publish(p)) => {
            assert_eq!(p.topic, "t/will");
            assert_eq!(&p.payload[..], b"gone");
        }
        other => panic!("expected the will message, got {other:?}"),
    }
}

/// issue 15: a CONNECT whose connection is gone before rumqttd writes its CONNACK (a
/// device on a flapping link, or a takeover racing it) used to leave a stale will
/// handler behind; the next CONNECT with that client id then panicked while holding
/// the server's will-handler lock, and every later CONNECT of the version panicked on
/// the poisoned lock. Both must now connect.
#[tokio::test]
async fn a_connect_abandoned_before_its_connack_leaves_rumqttd_usable() {
    let embedded = EmbeddedBroker::start(&EmbeddedSettings::default()).expect("starts");
    let secret = embedded.password();
    for round in 0..3 {
        let mut abandoned = embedded.connect(Version::V311);
        let mut connect = v4::Connect::new("flappy");
        connect.login = Some(v4::Login::new("anyone", &*secret));
        send(&mut abandoned, |b| {
            connect.write(b).expect("encode CONNECT");
        })
        .await;
        // Gone before rumqttd answers: its CONNACK write fails.
        drop(abandoned);

        let (_same_id, code) = connect_when_ready(&embedded, "flappy", &secret).await;
        assert_eq!(
            code,
            Some(v4::ConnectReturnCode::Success),
            "round {round}: the same client id connects again"
        );
        let (_other, code) = connect_when_ready(&embedded, "bystander", &secret).await;
        assert_eq!(
            code,
            Some(v4::ConnectReturnCode::Success),
            "round {round}: another client of the version connects"
        );
    }
}

/// [`connect`], retried while rumqttd has not yet processed an abandoned connection
/// (its connection task runs concurrently), bounded by [`WAIT`].
async fn connect_when_ready(
    embedded: &EmbeddedBroker,
    client_id: &str,
    password: &str,
) -> (DuplexStream, Option<v4::ConnectReturnCode>) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (pipe, code) = connect(embedded, client_id, password, None).await;
        if code.is_some() || tokio::time::Instant::now() >= deadline {
            return (pipe, code);
        }
        tokio::task::yield_now().await;
    }
}

/// vitalmq patch 15 (issue 18): a PUBLISH from an MQTT 5 client with properties (the
/// bridge's alerts carry Message Expiry Interval, Content Type and Payload Format
/// Indicator) reaches an MQTT 3.1.1 subscriber as a 3.1.1 PUBLISH without them
/// (MQTT 3.1.1 section 3.3 has no properties). Before the patch rumqttd's 3.1.1 encoder
/// hit `unreachable!`: the subscriber's connection died and the message was lost.
#[tokio::test]
async fn a_v5_publish_with_properties_reaches_a_v311_subscriber_without_them() {
    use rumqttc::v5::mqttbytes::v5;

    let embedded = EmbeddedBroker::start(&EmbeddedSettings::default()).expect("starts");
    let secret = embedded.password();
    let (mut subscriber, mut sub_buf) =
        subscriber(&embedded, "integrator", &secret, "alerts/#").await;

    let mut publisher = embedded.connect(Version::V5);
    let connect = v5::Connect {
        keep_alive: 30,
        client_id: "bridge-01-alerts".into(),
        clean_start: true,
        properties: None,
    };
    let login = Some(v5::Login::new("anyone", &*secret));
    send(&mut publisher, |b| {
        connect.write(&None, &login, b).expect("encode CONNECT");
    })
    .await;
    let mut pub_buf = BytesMut::new();
    assert!(matches!(
        read_v5(&mut publisher, &mut pub_buf).await,
        v5::Packet::ConnAck(ack) if ack.code == v5::ConnectReturnCode::Success
    ));
    let properties = v5::PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(3600),
        content_type: Some("application/json".into()),
        ..Default::default()
    };
    let mut publish = v5::Publish::new(
        "alerts/site-01/info/dev-00001",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        &b"{\"state\":\"open\"}"[..],
        Some(properties),
    );
    publish.pkid = 1;
    send(&mut publisher, |b| {
        publish.write(b).expect("encode PUBLISH");
    })
    .await;
    assert!(matches!(
        read_v5(&mut publisher, &mut pub_buf).await,
        v5::Packet::PubAck(ack) if ack.pkid == 1
    ));
    match read_packet(&mut subscriber, &mut sub_buf).await {
        Some(v4::Packet::Publish(p)) => {
            assert_eq!(p.topic, "alerts/site-01/info/dev-00001");
            assert_eq!(&p.payload[..], b"{\"state\":\"open\"}");
            assert_eq!(p.qos, QoS::AtLeastOnce);
        }
        other => panic!("expected the PUBLISH at the 3.1.1 subscriber, got {other:?}"),
    }
}

/// Reads one whole MQTT 5 packet from rumqttd.
async fn read_v5(
    pipe: &mut DuplexStream,
    buf: &mut BytesMut,
) -> rumqttc::v5::mqttbytes::v5::Packet {
    loop {
        match rumqttc::v5::mqttbytes::v5::Packet::read(buf, Some(1 << 20)) {
            Ok(packet) => return packet,
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => panic!("rumqttd sent a malformed packet: {e:?}"),
        }
        let n = tokio::time::timeout(WAIT, pipe.read_buf(buf))
            .await
            .expect("rumqttd answers in time")
            .expect("read from rumqttd");
        assert!(n > 0, "rumqttd closed the MQTT 5 connection");
    }
}
