//! The embedded rumqttd honours an MQTT 5 client's own limits (issue 18 point 7,
//! `vendor/rumqttd/VITALMQ-PATCHES.md` 13 and 14): its Receive Maximum bounds the
//! QoS 1/2 deliveries in flight to it, and a delivery larger than its Maximum Packet
//! Size is discarded and completed by rumqttd, so the messages after it still flow and
//! a resumed session holds nothing of it.

use std::time::Duration;

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::{QoS, v5};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
use vitalmq_broker::embedded::{EmbeddedBroker, EmbeddedSettings};
use vitalmq_broker::gate::Version;

const WAIT: Duration = Duration::from_secs(5);

/// One side of an MQTT 5 connection to rumqttd.
struct Client {
    pipe: DuplexStream,
    buf: BytesMut,
}

impl Client {
    /// Connects `client_id` with the CONNECT properties `props`; expects CONNACK 0.
    async fn connect(
        embedded: &EmbeddedBroker,
        client_id: &str,
        props: Option<v5::ConnectProperties>,
    ) -> Self {
        Self::connect_with(embedded, client_id, true, props, None)
            .await
            .0
    }

    /// [`Client::connect`] with Clean Start `clean_start` and a will; also returns
    /// Session Present.
    async fn connect_with(
        embedded: &EmbeddedBroker,
        client_id: &str,
        clean_start: bool,
        props: Option<v5::ConnectProperties>,
        will: Option<v5::LastWill>,
    ) -> (Self, bool) {
        let mut client = Self {
            pipe: embedded.connect(Version::V5),
            buf: BytesMut::new(),
        };
        let connect = v5::Connect {
            keep_alive: 30,
            client_id: client_id.into(),
            clean_start,
            properties: props,
        };
        let login = Some(v5::Login::new("anyone", &*embedded.password()));
        client
            .send(|b| connect.write(&will, &login, b).map(drop))
            .await;
        let session_present = match client.read().await {
            v5::Packet::ConnAck(ack) => {
                assert_eq!(ack.code, v5::ConnectReturnCode::Success);
                ack.session_present
            }
            other => panic!("expected CONNACK, got {other:?}"),
        };
        (client, session_present)
    }

    async fn send(
        &mut self,
        packet: impl FnOnce(&mut BytesMut) -> Result<(), rumqttc::v5::mqttbytes::Error>,
    ) {
        let mut buf = BytesMut::new();
        packet(&mut buf).expect("encode");
        self.pipe.write_all(&buf).await.expect("write to rumqttd");
    }

    /// The next packet from rumqttd (panics after [`WAIT`] or when the pipe closed).
    async fn read(&mut self) -> v5::Packet {
        loop {
            match v5::Packet::read(&mut self.buf, None) {
                Ok(packet) => return packet,
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("rumqttd sent a malformed packet: {e:?}"),
            }
            let n = tokio::time::timeout(WAIT, self.pipe.read_buf(&mut self.buf))
                .await
                .expect("rumqttd answers in time")
                .expect("read from rumqttd");
            assert_ne!(n, 0, "rumqttd closed the connection");
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: QoS) {
        let mut subscribe = v5::Subscribe::new(v5::Filter::new(filter, qos), None);
        subscribe.pkid = 1;
        self.send(|b| subscribe.write(b).map(drop)).await;
        match self.read().await {
            v5::Packet::SubAck(_) => {}
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// Publishes and waits for the flow to complete (PUBACK, or PUBREC then PUBCOMP).
    async fn publish(&mut self, topic: &str, qos: QoS, pkid: u16, payload: Vec<u8>) {
        let mut publish = v5::Publish::new(topic, qos, payload, None);
        publish.pkid = pkid;
        self.send(|b| publish.write(b).map(drop)).await;
        match (qos, self.read().await) {
            (QoS::AtLeastOnce, v5::Packet::PubAck(ack)) => assert_eq!(ack.pkid, pkid),
            (QoS::ExactlyOnce, v5::Packet::PubRec(rec)) => {
                assert_eq!(rec.pkid, pkid);
                self.send(|b| v5::PubRel::new(pkid, None).write(b).map(drop))
                    .await;
                assert!(matches!(self.read().await, v5::Packet::PubComp(_)));
            }
            (_, other) => panic!("unexpected answer to PUBLISH: {other:?}"),
        }
    }

    /// The PUBLISHes rumqttd has delivered by the time it answers two PINGREQs sent one
    /// after the other: each goes through the router, which forwards whatever the
    /// connection may receive before it reads further events.
    async fn deliveries_until_quiet(&mut self) -> Vec<v5::Publish> {
        let mut got = Vec::new();
        for _ in 0..2 {
            self.send(|b| v5::PingReq::write(b).map(drop)).await;
            loop {
                match self.read().await {
                    v5::Packet::PingResp(_) => break,
                    v5::Packet::Publish(p) => got.push(p),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        got
    }

    /// Reads until `n` PUBLISHes arrived.
    async fn deliveries(&mut self, n: usize) -> Vec<v5::Publish> {
        let mut got = Vec::new();
        while got.len() < n {
            match self.read().await {
                v5::Packet::Publish(p) => got.push(p),
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
        got
    }

    async fn puback(&mut self, pkid: u16) {
        self.send(|b| v5::PubAck::new(pkid, None).write(b).map(drop))
            .await;
    }
}

fn embedded() -> EmbeddedBroker {
    EmbeddedBroker::start(&EmbeddedSettings::default()).expect("starts")
}

/// MQTT 5 3.1.2.11.3 and 4.9 (MQTT-4.9.0-2/3): rumqttd never has more unacknowledged
/// QoS 1 deliveries in flight to a client than its Receive Maximum; each PUBACK lets
/// the next one go.
#[tokio::test]
async fn mqtt5_4_9_deliveries_in_flight_stay_within_the_clients_receive_maximum() {
    let embedded = embedded();
    let props = v5::ConnectProperties {
        receive_maximum: Some(2),
        ..v5::ConnectProperties::new()
    };
    let mut subscriber = Client::connect(&embedded, "slow-reader", Some(props)).await;
    subscriber.subscribe("rm/t", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect(&embedded, "writer", None).await;
    for pkid in 1..=6 {
        publisher
            .publish("rm/t", QoS::AtLeastOnce, pkid, format!("m{pkid}").into())
            .await;
    }

    let mut received = Vec::new();
    while received.len() < 6 {
        let window = subscriber.deliveries_until_quiet().await;
        assert!(
            !window.is_empty() && window.len() <= 2,
            "{} unacknowledged deliveries in flight after {received:?}, Receive Maximum 2",
            window.len()
        );
        for p in window {
            subscriber.puback(p.pkid).await;
            received.push(String::from_utf8(p.payload.to_vec()).expect("utf-8"));
        }
    }
    assert_eq!(received, ["m1", "m2", "m3", "m4", "m5", "m6"]);
}

/// MQTT-3.1.2-24/25 (MQTT 5 3.1.2.11.4): a delivery larger than the client's Maximum
/// Packet Size is not sent; rumqttd behaves as if it had been (the QoS 1 and QoS 2
/// flows are completed for the client), so with a Receive Maximum of 1 the next
/// message still arrives, and the connection stays up.
#[tokio::test]
async fn mqtt_3_1_2_25_an_oversize_delivery_is_discarded_and_completed() {
    let embedded = embedded();
    let props = v5::ConnectProperties {
        max_packet_size: Some(256),
        receive_maximum: Some(1),
        ..v5::ConnectProperties::new()
    };
    let mut subscriber = Client::connect(&embedded, "small-reader", Some(props)).await;
    subscriber.subscribe("mps/#", QoS::ExactlyOnce).await;
    let mut publisher = Client::connect(&embedded, "writer", None).await;

    // QoS 1: big, then small.
    publisher
        .publish("mps/1", QoS::AtLeastOnce, 1, vec![b'x'; 1000])
        .await;
    publisher
        .publish("mps/1", QoS::AtLeastOnce, 2, b"small-1".to_vec())
        .await;
    let got = subscriber.deliveries(1).await;
    assert_eq!(&got[0].payload[..], b"small-1", "the big one is never sent");
    subscriber.puback(got[0].pkid).await;

    // QoS 2: big, then small; the small one's flow completes normally.
    publisher
        .publish("mps/2", QoS::ExactlyOnce, 3, vec![b'y'; 1000])
        .await;
    publisher
        .publish("mps/2", QoS::ExactlyOnce, 4, b"small-2".to_vec())
        .await;
    let got = subscriber.deliveries(1).await;
    assert_eq!(&got[0].payload[..], b"small-2");
    assert_eq!(got[0].qos, QoS::ExactlyOnce);
    let pkid = got[0].pkid;
    subscriber
        .send(|b| v5::PubRec::new(pkid, None).write(b).map(drop))
        .await;
    match subscriber.read().await {
        v5::Packet::PubRel(rel) => assert_eq!(rel.pkid, pkid, "only the delivered one's PUBREL"),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    subscriber
        .send(|b| v5::PubComp::new(pkid, None).write(b).map(drop))
        .await;

    // Everything completed: the window of 1 is free for the next message.
    publisher
        .publish("mps/3", QoS::AtLeastOnce, 5, b"after".to_vec())
        .await;
    let got = subscriber.deliveries(1).await;
    assert_eq!(&got[0].payload[..], b"after");
    assert!(
        subscriber.deliveries_until_quiet().await.is_empty(),
        "nothing else"
    );
}

/// MQTT-3.1.2-25 with MQTT 5 4.3.3 / 4.4 (a PUBREL is only sent for a PUBLISH the
/// client received and answered with PUBREC; an unknown one is a Protocol Error to
/// stock clients): a QoS 2 delivery discarded as too large leaves nothing for a
/// resumed session. rumqttd (patch 14 before its amendment) completed it in two steps
/// and kept the packet id as an unacknowledged PUBREL when the connection ended in
/// between, then sent that PUBREL on resume, so the client reconnected in a loop. The
/// connection is dropped right after each oversize delivery, over several rounds, to
/// land in that gap; its will (published once rumqttd has ended the connection) says
/// when to resume.
#[tokio::test]
async fn mqtt_3_1_2_25_a_discarded_qos2_delivery_leaves_no_pubrel_for_a_resumed_session() {
    const ROUNDS: u16 = 24;
    let embedded = embedded();
    let props = || v5::ConnectProperties {
        max_packet_size: Some(256),
        session_expiry_interval: Some(3600),
        ..v5::ConnectProperties::new()
    };
    let will = || {
        Some(v5::LastWill::new(
            "gone/resumer",
            "",
            QoS::AtMostOnce,
            false,
            None,
        ))
    };
    let mut watcher = Client::connect(&embedded, "watcher", None).await;
    watcher.subscribe("gone/#", QoS::AtMostOnce).await;
    let (mut subscriber, _) =
        Client::connect_with(&embedded, "resumer", true, Some(props()), will()).await;
    subscriber.subscribe("resume/#", QoS::ExactlyOnce).await;
    let mut publisher = Client::connect(&embedded, "writer", None).await;

    for round in 1..=ROUNDS {
        publisher
            .publish("resume/big", QoS::ExactlyOnce, round, vec![b'z'; 1000])
            .await;
        // The connection is lost; the session is kept (Session Expiry 3600).
        drop(subscriber);
        let gone = watcher.deliveries(1).await;
        assert_eq!(&gone[0].topic[..], b"gone/resumer");
        let (resumed, session_present) =
            Client::connect_with(&embedded, "resumer", false, Some(props()), will()).await;
        assert!(session_present, "round {round}: the session was kept");
        subscriber = resumed;
        // A PUBREL (or anything but PINGRESP) fails here.
        assert!(
            subscriber.deliveries_until_quiet().await.is_empty(),
            "round {round}: the discarded message is never sent"
        );
    }

    // The session still works: a small QoS 2 message runs its whole flow.
    publisher
        .publish(
            "resume/small",
            QoS::ExactlyOnce,
            ROUNDS + 1,
            b"fits".to_vec(),
        )
        .await;
    let got = subscriber.deliveries(1).await;
    assert_eq!(&got[0].payload[..], b"fits");
    let pkid = got[0].pkid;
    subscriber
        .send(|b| v5::PubRec::new(pkid, None).write(b).map(drop))
        .await;
    match subscriber.read().await {
        v5::Packet::PubRel(rel) => assert_eq!(rel.pkid, pkid),
        other => panic!("expected PUBREL, got {other:?}"),
    }
}
