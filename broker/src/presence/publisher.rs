//! The task that publishes presence: one internal MQTT 3.1.1 connection to the
//! embedded rumqttd (never through a `GateSession`: it is the broker speaking), with
//! the per-process secret in its CONNECT and a client id no certificate can have.
//!
//! Messages go out in the book's order with at most [`WINDOW`] unacknowledged; a
//! change is taken off the feed only when the window has room, so what waits is the
//! feed (one small entry per connection event, which `accept` rate-limits) and never
//! more than the window here. When the connection to rumqttd drops, the task opens a
//! new one and sends the unacknowledged messages again, in order, before new ones
//! (a repeat is harmless: retained, and the bridge orders by `seq`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::{QoS, v4};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
use tokio::sync::{mpsc, watch};

use super::book::{Book, Change, Message};
use crate::embedded::EmbeddedBroker;
use crate::gate::Version;

/// The internal client id: `_` cannot start a certificate id (SPEC section 1: the
/// first character is a letter or digit), and the gate binds every client's id to its
/// certificate, so no client can take this session over. (rumqttd closes a CONNECT
/// whose client id starts with `$` without a CONNACK.)
const CLIENT_ID: &str = "_vitalmq-presence";
/// Unacknowledged PUBLISHes at most (rumqttd allows `max_inflight`, 100 by default).
const WINDOW: usize = 32;
const KEEPALIVE_S: u16 = 60;
/// How long rumqttd may take to answer the CONNECT.
const CONNACK_WAIT: Duration = Duration::from_secs(10);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Largest packet read from rumqttd (it sends PUBACKs, PINGRESPs and a CONNACK).
const MAX_PACKET: usize = 1 << 16;

/// Why the internal connection ended.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("rumqttd closed the connection")]
    Closed,
    #[error("rumqttd refused the CONNECT: {0:?}")]
    Refused(v4::ConnectReturnCode),
    #[error("rumqttd did not answer the CONNECT in time")]
    ConnackTimeout,
    #[error("unexpected packet from rumqttd: {0}")]
    Unexpected(&'static str),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Mqtt(#[from] rumqttc::mqttbytes::Error),
}

/// Messages sent and not yet acknowledged, and those not yet sent, in order.
#[derive(Debug, Default)]
struct Queue {
    in_flight: VecDeque<(u16, Message)>,
    waiting: VecDeque<Message>,
    last_pkid: u16,
}

impl Queue {
    fn next_pkid(&mut self) -> u16 {
        loop {
            self.last_pkid = self.last_pkid.wrapping_add(1).max(1);
            let pkid = self.last_pkid;
            if !self.in_flight.iter().any(|(p, _)| *p == pkid) {
                return pkid;
            }
        }
    }

    /// After a reconnect: everything unacknowledged is sent again first.
    fn requeue(&mut self) {
        while let Some((_, m)) = self.in_flight.pop_back() {
            self.waiting.push_front(m);
        }
    }

    fn has_room(&self) -> bool {
        self.in_flight.len() < WINDOW
    }

    /// Encodes what the window allows into `out`.
    fn fill(&mut self, out: &mut BytesMut) -> Result<(), LinkError> {
        while self.has_room() {
            let Some(message) = self.waiting.pop_front() else {
                break;
            };
            let pkid = self.next_pkid();
            let mut publish = v4::Publish::new(
                message.topic.clone(),
                QoS::AtLeastOnce,
                message.payload.clone(),
            );
            publish.retain = true;
            publish.pkid = pkid;
            publish.write(out)?;
            tracing::debug!(topic = %message.topic, pkid, "presence published");
            self.in_flight.push_back((pkid, message));
        }
        Ok(())
    }

    fn acked(&mut self, pkid: u16) {
        if let Some(at) = self.in_flight.iter().position(|(p, _)| *p == pkid) {
            self.in_flight.remove(at);
        }
    }
}

/// Publishes until shutdown (or until every feed is gone, i.e. the broker stopped).
pub(super) async fn run(
    embedded: Arc<EmbeddedBroker>,
    mut feed: mpsc::UnboundedReceiver<Change>,
    mut book: Book,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut queue = Queue::default();
    queue.waiting.push_back(book.boot_message());
    let mut retry = RETRY_MIN;
    loop {
        let ended = async {
            let mut pipe = open(&embedded).await?;
            retry = RETRY_MIN;
            queue.requeue();
            serve(&mut pipe, &mut queue, &mut feed, &mut book).await
        };
        let ended = tokio::select! {
            ended = ended => ended,
            _ = shutdown.changed() => return,
        };
        match ended {
            Ok(()) => return,
            Err(e) => {
                metrics::counter!("vitalmq_presence_reconnects_total").increment(1);
                tracing::warn!(error = %e, retry_in = ?retry, "presence: internal connection to rumqttd lost; reconnecting");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            _ = shutdown.changed() => return,
        }
        retry = (retry * 2).min(RETRY_MAX);
    }
}

/// Opens the internal connection: CONNECT with the gate's secret, then CONNACK.
async fn open(embedded: &EmbeddedBroker) -> Result<DuplexStream, LinkError> {
    let mut pipe = embedded.connect(Version::V311);
    let mut connect = v4::Connect::new(CLIENT_ID);
    connect.keep_alive = KEEPALIVE_S;
    connect.clean_session = true;
    connect.login = Some(v4::Login::new("vitalmq-presence", &*embedded.password()));
    let mut buf = BytesMut::new();
    connect.write(&mut buf)?;
    pipe.write_all(&buf).await?;
    buf.clear();
    let ack = tokio::time::timeout(CONNACK_WAIT, async {
        loop {
            if let Some(packet) = read_packet(&mut buf)? {
                return Ok::<_, LinkError>(packet);
            }
            if pipe.read_buf(&mut buf).await? == 0 {
                return Err(LinkError::Closed);
            }
        }
    })
    .await
    .map_err(|_| LinkError::ConnackTimeout)??;
    match ack {
        v4::Packet::ConnAck(a) if a.code == v4::ConnectReturnCode::Success => Ok(pipe),
        v4::Packet::ConnAck(a) => Err(LinkError::Refused(a.code)),
        _ => Err(LinkError::Unexpected("expected CONNACK")),
    }
}

fn read_packet(buf: &mut BytesMut) -> Result<Option<v4::Packet>, LinkError> {
    match v4::Packet::read(buf, MAX_PACKET) {
        Ok(packet) => Ok(Some(packet)),
        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Publishes over one connection until it fails (`Err`) or the feed closed (`Ok`).
async fn serve(
    pipe: &mut DuplexStream,
    queue: &mut Queue,
    feed: &mut mpsc::UnboundedReceiver<Change>,
    book: &mut Book,
) -> Result<(), LinkError> {
    let every = Duration::from_secs(u64::from(KEEPALIVE_S) / 2);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut inbox = BytesMut::with_capacity(256);
    let mut out = BytesMut::with_capacity(1024);
    loop {
        queue.fill(&mut out)?;
        if !out.is_empty() {
            pipe.write_all(&out).await?;
            out.clear();
        }
        let take = queue.waiting.is_empty() && queue.has_room();
        tokio::select! {
            change = feed.recv(), if take => {
                let Some(change) = change else { return Ok(()) };
                queue.waiting.extend(book.apply(change));
                metrics::gauge!("vitalmq_presence_connected").set(book.connected() as f64);
            }
            read = pipe.read_buf(&mut inbox) => {
                if read? == 0 {
                    return Err(LinkError::Closed);
                }
                while let Some(packet) = read_packet(&mut inbox)? {
                    match packet {
                        v4::Packet::PubAck(ack) => queue.acked(ack.pkid),
                        v4::Packet::PingResp => {}
                        _ => return Err(LinkError::Unexpected("only PUBACK and PINGRESP expected")),
                    }
                }
            }
            _ = ping.tick() => v4::PingReq.write(&mut out).map(|_| ())?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embedded::EmbeddedSettings;

    /// A subscriber on its own pipe to rumqttd, as the gate would hand the bridge over.
    async fn subscriber(embedded: &EmbeddedBroker, filter: &str) -> (DuplexStream, BytesMut) {
        subscriber_as(embedded, "bridge-01", filter, QoS::AtLeastOnce).await
    }

    async fn subscriber_as(
        embedded: &EmbeddedBroker,
        id: &str,
        filter: &str,
        qos: QoS,
    ) -> (DuplexStream, BytesMut) {
        let mut pipe = embedded.connect(Version::V311);
        let mut connect = v4::Connect::new(id);
        connect.login = Some(v4::Login::new("u", &*embedded.password()));
        let mut buf = BytesMut::new();
        connect.write(&mut buf).expect("encode");
        v4::Subscribe::new(filter, qos)
            .write(&mut buf)
            .expect("encode");
        pipe.write_all(&buf).await.expect("write");
        (pipe, BytesMut::new())
    }

    async fn next_publish(pipe: &mut DuplexStream, inbox: &mut BytesMut) -> v4::Publish {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                while let Some(packet) = read_packet(inbox).expect("well-formed") {
                    if let v4::Packet::Publish(p) = packet {
                        return p;
                    }
                }
                assert!(pipe.read_buf(inbox).await.expect("read") > 0, "closed");
            }
        })
        .await
        .expect("a PUBLISH in time")
    }

    /// Through the real embedded rumqttd: the boot message first, then a change, all
    /// retained, so a subscriber that comes later gets them too.
    #[tokio::test]
    async fn publishes_retained_through_rumqttd() {
        let embedded =
            Arc::new(EmbeddedBroker::start(&EmbeddedSettings::default()).expect("rumqttd"));
        let (_stop, shutdown) = watch::channel(false);
        let (feed, task) = super::super::start(Arc::clone(&embedded), shutdown).expect("start");
        let (mut pipe, mut inbox) = subscriber(&embedded, "presence/#").await;
        let boot = next_publish(&mut pipe, &mut inbox).await;
        assert_eq!(boot.topic, "presence/broker/boot");
        let who =
            vitalmq_policies::SpiffeId::parse("spiffe://demo.vitalmq/device/dev-1").expect("id");
        let presence = feed.admitted(&who).expect("devices have presence");
        // A subscription that races the boot message may get it twice (retained, and
        // live from the log); the bridge orders by `seq`, so a repeat is harmless.
        let mut up = next_publish(&mut pipe, &mut inbox).await;
        if up.topic == "presence/broker/boot" {
            up = next_publish(&mut pipe, &mut inbox).await;
        }
        assert_eq!(up.topic, "presence/device/dev-1");
        presence.end("client_closed");
        let down = next_publish(&mut pipe, &mut inbox).await;
        assert!(String::from_utf8_lossy(&down.payload).contains(r#""connected":false"#));
        drop(feed);
        let _ = task.await;
    }

    fn message(n: u8) -> Message {
        Message {
            topic: format!("presence/device/d{n}"),
            payload: vec![n],
        }
    }

    #[test]
    fn the_window_bounds_what_is_in_flight_and_a_reconnect_resends_in_order() {
        let mut q = Queue::default();
        for n in 0..40 {
            q.waiting.push_back(message(n));
        }
        let mut out = BytesMut::new();
        q.fill(&mut out).expect("encode");
        assert_eq!((q.in_flight.len(), q.waiting.len()), (WINDOW, 40 - WINDOW));
        q.acked(1);
        q.acked(3);
        q.requeue();
        let order: Vec<u8> = q.waiting.iter().map(|m| m.payload[0]).collect();
        let mut want: Vec<u8> = (0..40).filter(|n| *n != 0 && *n != 2).collect();
        want.sort_unstable();
        assert_eq!(order, want, "unacknowledged first, in their order");
        assert!(q.in_flight.is_empty());
    }

    #[test]
    fn packet_ids_skip_zero_and_those_in_flight() {
        let mut q = Queue {
            last_pkid: u16::MAX - 1,
            ..Queue::default()
        };
        q.in_flight.push_back((1, message(0)));
        assert_eq!(q.next_pkid(), u16::MAX);
        assert_eq!(q.next_pkid(), 2);
    }

    /// rumqttd 0.20 sent a new subscription at most one read's worth of retained
    /// messages (its free in-flight slots, or `max_outgoing_packets` at QoS 0) and
    /// dropped the rest; a bridge subscribing after 500 devices connected must still
    /// learn about every one (vendor/rumqttd patch 8).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_late_subscriber_gets_every_identity_not_only_one_read() {
        const DEVICES: usize = 500;
        let settings = EmbeddedSettings {
            max_outgoing_packets: 50,
            ..EmbeddedSettings::default()
        };
        let embedded = Arc::new(EmbeddedBroker::start(&settings).expect("rumqttd"));
        let (_stop, shutdown) = watch::channel(false);
        let (feed, _task) = super::super::start(Arc::clone(&embedded), shutdown).expect("start");
        let (mut live, mut live_inbox) =
            subscriber_as(&embedded, "live", "presence/#", QoS::AtMostOnce).await;
        let mut held = Vec::new();
        for n in 0..DEVICES {
            let who = vitalmq_policies::SpiffeId::parse(&format!(
                "spiffe://demo.vitalmq/device/dev-{n:05}"
            ))
            .expect("id");
            held.push(feed.admitted(&who).expect("presence"));
        }
        // Every message has gone through rumqttd once the live subscriber saw every
        // topic (counted by topic: the boot message can reach it twice, retained and
        // live, when it subscribed while that was being published).
        let mut seen = std::collections::HashSet::new();
        while seen.len() < DEVICES + 1 {
            seen.insert(next_publish(&mut live, &mut live_inbox).await.topic);
        }
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
            let id = format!("late-{qos:?}");
            let (mut late, mut inbox) = subscriber_as(&embedded, &id, "presence/#", qos).await;
            let mut topics = std::collections::HashSet::new();
            while topics.len() < DEVICES + 1 {
                let p = next_publish(&mut late, &mut inbox).await;
                assert!(p.retain, "{p:?}");
                if qos == QoS::AtLeastOnce {
                    let mut ack = BytesMut::new();
                    v4::PubAck::new(p.pkid).write(&mut ack).expect("encode");
                    late.write_all(&ack).await.expect("PUBACK");
                }
                topics.insert(p.topic);
            }
        }
        drop(held);
    }

    /// When rumqttd drops the internal connection (here: another connection of its
    /// client id takes the session over), the publisher connects again and goes on;
    /// a change made meanwhile is published.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_connection_to_rumqttd_is_reopened() {
        let embedded =
            Arc::new(EmbeddedBroker::start(&EmbeddedSettings::default()).expect("rumqttd"));
        let (_stop, shutdown) = watch::channel(false);
        let (feed, _task) = super::super::start(Arc::clone(&embedded), shutdown).expect("start");
        let (mut pipe, mut inbox) = subscriber(&embedded, "presence/#").await;
        assert_eq!(
            next_publish(&mut pipe, &mut inbox).await.topic,
            "presence/broker/boot"
        );
        // The impostor takes the session over; the publisher takes it back.
        let (mut impostor, mut impostor_inbox) =
            subscriber_as(&embedded, CLIENT_ID, "nothing", QoS::AtMostOnce).await;
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(v4::Packet::ConnAck(_)) =
                    read_packet(&mut impostor_inbox).expect("well-formed")
                {
                    return;
                }
                assert!(impostor.read_buf(&mut impostor_inbox).await.expect("read") > 0);
            }
        })
        .await
        .expect("the impostor is connected");
        let who =
            vitalmq_policies::SpiffeId::parse("spiffe://demo.vitalmq/gateway/gw-1").expect("id");
        let _presence = feed.admitted(&who).expect("gateways have presence");
        loop {
            let p = next_publish(&mut pipe, &mut inbox).await;
            if p.topic == "presence/gateway/gw-1" {
                break;
            }
            assert_eq!(
                p.topic, "presence/broker/boot",
                "only a repeat of the boot message"
            );
        }
        // The publisher's new connection took the session back.
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            let mut sink = [0u8; 256];
            while matches!(impostor.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
        assert!(closed.is_ok(), "the impostor was taken over");
    }
}
