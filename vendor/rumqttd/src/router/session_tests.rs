//! vitalmq patch 9: session lifetime at the router (MQTT 5 3.1.2.4 Clean Start,
//! 3.1.2.11.2 Session Expiry Interval, 3.14.2.2.2 DISCONNECT's Session Expiry Interval,
//! 4.1 Session State; MQTT 3.1.1 3.1.2.4 Clean Session). Each test drives a `Router`
//! directly: events in, the connection's outgoing buffer out, time as an argument.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

use super::*;
use crate::protocol::{Disconnect, DisconnectProperties, Filter as SubFilter, RetainForwardRule};
use crate::protocol::{PubCompReason, PubRel, PubRelReason, Subscribe, SubscribeReasonCode};
use crate::router::iobufs::{Incoming, Outgoing};
use crate::router::{Ack, Connection, SessionExpiry};
use crate::RouterConfig;

const TOPIC: &str = "alerts/site-01/spo2";

fn router() -> Router {
    Router::new(
        0,
        RouterConfig {
            max_connections: 10,
            max_outgoing_packet_count: 100,
            max_segment_size: 1 << 20,
            max_segment_count: 2,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
    )
}

/// One connection as its link sees it: the router's buffers for it.
struct Client {
    id: ConnectionId,
    incoming: Arc<Mutex<VecDeque<Packet>>>,
    outgoing: Arc<Mutex<VecDeque<Notification>>>,
    _wake: flume::Receiver<()>,
}

/// Runs the router until it has nothing left to do (a bounded number of connection
/// turns: a connection that is rescheduled for ever fails the test, not hangs it).
fn pump(router: &mut Router) {
    let mut turns = 0;
    for _ in 0..1000 {
        let mut busy = false;
        while let Ok((id, event)) = router.router_rx.try_recv() {
            router.events(id, event);
            busy = true;
        }
        while router.consume().is_some() {
            busy = true;
            turns += 1;
            assert!(turns < 10_000, "router never settled");
        }
        if !busy {
            return;
        }
    }
    panic!("router never settled");
}

/// Connects `client_id` (Clean Start / CleanSession `clean`; `expiry` None for the
/// MQTT 3.1.1 rule) and returns the connection and CONNACK's session_present.
fn connect(
    router: &mut Router,
    client_id: &str,
    clean: bool,
    expiry: Option<SessionExpiry>,
) -> (Client, bool) {
    let mut connection = Connection::new(None, client_id.to_owned(), clean, false);
    if let Some(expiry) = expiry {
        connection.session_expiry(expiry);
    }
    let incoming = Incoming::new(client_id.to_owned());
    let (outgoing, wake) = Outgoing::new(client_id.to_owned());
    let (incoming_buf, outgoing_buf) = (incoming.buffer(), outgoing.buffer());
    router.events(
        0,
        Event::Connect {
            connection,
            incoming,
            outgoing,
        },
    );
    pump(router);
    let first = outgoing_buf.lock().pop_front();
    let Some(Notification::DeviceAck(Ack::ConnAck(id, ack, _))) = first else {
        panic!("expected CONNACK, got {first:?}");
    };
    let client = Client {
        id,
        incoming: incoming_buf,
        outgoing: outgoing_buf,
        _wake: wake,
    };
    (client, ack.session_present)
}

fn send(router: &mut Router, client: &Client, packet: Packet) {
    client.incoming.lock().push_back(packet);
    router.events(client.id, Event::DeviceData);
    pump(router);
}

fn subscribe(router: &mut Router, client: &Client) {
    let filter = SubFilter {
        path: TOPIC.to_owned(),
        qos: QoS::AtLeastOnce,
        nolocal: false,
        preserve_retain: false,
        retain_forward_rule: RetainForwardRule::OnEverySubscribe,
    };
    let subscribe = Subscribe {
        pkid: 1,
        filters: vec![filter],
    };
    send(router, client, Packet::Subscribe(subscribe, None));
    let acks = drain(client);
    assert!(
        acks.iter().any(|n| matches!(
            n,
            Notification::DeviceAck(Ack::SubAck(s)) if s.return_codes == [SubscribeReasonCode::QoS1]
        )),
        "no SUBACK: {acks:?}"
    );
}

fn publish(router: &mut Router, client: &Client, payload: &'static str) {
    let publish = Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: TOPIC.into(),
        pkid: 0,
        payload: payload.into(),
    };
    send(router, client, Packet::Publish(publish, None));
}

fn disconnect(router: &mut Router, client: &Client, expiry: Option<u32>) {
    let properties = expiry.map(|e| DisconnectProperties {
        session_expiry_interval: Some(e),
        reason_string: None,
        user_properties: Vec::new(),
        server_reference: None,
    });
    let disconnect = Disconnect {
        reason_code: DisconnectReasonCode::NormalDisconnection,
    };
    send(router, client, Packet::Disconnect(disconnect, properties));
}

/// The network connection is gone without DISCONNECT (network loss, keepalive).
fn drop_connection(router: &mut Router, client: &Client) {
    router.events(client.id, Event::Disconnect);
    pump(router);
}

fn drain(client: &Client) -> Vec<Notification> {
    client.outgoing.lock().drain(..).collect()
}

fn payloads(client: &Client) -> Vec<Bytes> {
    drain(client)
        .into_iter()
        .filter_map(|n| match n {
            Notification::Forward(f) => Some(f.publish.payload),
            _ => None,
        })
        .collect()
}

/// A subscriber `sub` with a session made with `expiry`, offline while "queued" is
/// published; returns the publisher.
fn queue_while_offline(router: &mut Router, expiry: Option<SessionExpiry>, clean: bool) -> Client {
    let (sub, _) = connect(router, "sub", clean, expiry);
    subscribe(router, &sub);
    drop_connection(router, &sub);
    let (publisher, _) = connect(router, "pub", true, Some(SessionExpiry::AtDisconnect));
    publish(router, &publisher, "queued");
    publisher
}

#[test]
fn mqtt5_3_1_2_11_2_expiry_above_zero_keeps_the_session_and_its_queue_across_a_reconnect() {
    let mut router = router();
    let hour = SessionExpiry::from_interval(3600);
    // Made with Clean Start=1: Clean Start says nothing about how long it lives.
    queue_while_offline(&mut router, Some(hour), true);

    let (sub, session_present) = connect(&mut router, "sub", false, Some(hour));
    assert!(session_present, "MQTT-3.2.2-3: session resumed");
    assert_eq!(payloads(&sub), [Bytes::from("queued")]);
}

#[test]
fn mqtt5_3_1_2_11_2_expiry_zero_ends_the_session_with_the_connection() {
    let mut router = router();
    // Clean Start=0 with no Session Expiry Interval (= 0): not a persistent session.
    queue_while_offline(&mut router, Some(SessionExpiry::from_interval(0)), false);
    assert!(!router.graveyard.has_session("sub"));

    let (sub, session_present) =
        connect(&mut router, "sub", false, Some(SessionExpiry::AtDisconnect));
    assert!(!session_present);
    assert!(payloads(&sub).is_empty());
}

#[test]
fn mqtt5_4_1_an_expired_session_is_freed_by_the_sweep_and_not_resumed() {
    let mut router = router();
    let minute = SessionExpiry::from_interval(60);
    queue_while_offline(&mut router, Some(minute), false);
    let expires = router.graveyard.next_expiry().expect("an expiring session");
    assert!(expires > Instant::now() + Duration::from_secs(59));

    router.expire_sessions(expires - Duration::from_millis(1));
    assert!(router.graveyard.has_session("sub"), "not yet expired");
    router.expire_sessions(expires);
    assert!(!router.graveyard.has_session("sub"), "freed at expiry");
    assert_eq!(router.graveyard.next_expiry(), None);

    let (sub, session_present) = connect(&mut router, "sub", false, Some(minute));
    assert!(!session_present, "an expired session is not resumed");
    assert!(payloads(&sub).is_empty());
}

#[test]
fn mqtt5_3_1_2_11_2_never_expiring_session_has_no_deadline() {
    let mut router = router();
    queue_while_offline(
        &mut router,
        Some(SessionExpiry::from_interval(u32::MAX)),
        true,
    );
    assert_eq!(router.graveyard.next_expiry(), None);
    router.expire_sessions(Instant::now() + Duration::from_secs(200 * 365 * 86400));
    let (sub, session_present) = connect(&mut router, "sub", false, None);
    assert!(session_present);
    assert_eq!(payloads(&sub), [Bytes::from("queued")]);
}

#[test]
fn mqtt5_3_1_2_4_clean_start_discards_a_kept_session() {
    let mut router = router();
    let hour = SessionExpiry::from_interval(3600);
    queue_while_offline(&mut router, Some(hour), false);

    let (sub, session_present) = connect(&mut router, "sub", true, Some(hour));
    assert!(
        !session_present,
        "MQTT-3.2.2-2: Clean Start=1, session_present=0"
    );
    assert!(payloads(&sub).is_empty());
    // Its expiry went with it.
    assert_eq!(router.graveyard.next_expiry(), None);
    drop_connection(&mut router, &sub);
    let (sub, session_present) = connect(&mut router, "sub", false, Some(hour));
    assert!(session_present, "the new (empty) session was kept");
    assert!(payloads(&sub).is_empty(), "the old subscription is gone");
}

#[test]
fn mqtt5_3_14_2_2_2_disconnect_zero_ends_a_session_connect_made_persistent() {
    let mut router = router();
    let hour = SessionExpiry::from_interval(3600);
    let (sub, _) = connect(&mut router, "sub", false, Some(hour));
    subscribe(&mut router, &sub);
    disconnect(&mut router, &sub, Some(0));
    assert!(!router.graveyard.has_session("sub"));

    let (_, session_present) = connect(&mut router, "sub", false, Some(hour));
    assert!(!session_present);
}

#[test]
fn mqtt5_3_14_2_2_2_disconnect_expiry_replaces_connects() {
    let mut router = router();
    let (sub, _) = connect(
        &mut router,
        "sub",
        false,
        Some(SessionExpiry::from_interval(3600)),
    );
    subscribe(&mut router, &sub);
    disconnect(&mut router, &sub, Some(10));
    let expires = router.graveyard.next_expiry().expect("kept for 10 s");
    assert!(expires < Instant::now() + Duration::from_secs(11));
    router.expire_sessions(expires);
    assert!(!router.graveyard.has_session("sub"));
}

#[test]
fn mqtt5_3_14_2_2_2_disconnect_cannot_give_expiry_to_a_session_connect_ended() {
    let mut router = router();
    let (sub, _) = connect(&mut router, "sub", false, Some(SessionExpiry::AtDisconnect));
    subscribe(&mut router, &sub);
    disconnect(&mut router, &sub, Some(3600));
    // The server answers DISCONNECT 0x82 and the session ends as CONNECT said.
    let notifications = drain(&sub);
    assert!(
        notifications.iter().any(|n| matches!(
            n,
            Notification::Disconnect(d, _) if d.reason_code == DisconnectReasonCode::ProtocolError
        )),
        "no DISCONNECT 0x82: {notifications:?}"
    );
    assert!(!router.graveyard.has_session("sub"));
}

#[test]
fn mqtt311_3_1_2_4_clean_session_rules_are_unchanged() {
    let mut router = router();
    // CleanSession=0: kept with no expiry, also across a network loss.
    queue_while_offline(&mut router, None, false);
    assert_eq!(router.graveyard.next_expiry(), None);
    let (sub, session_present) = connect(&mut router, "sub", false, None);
    assert!(session_present);
    assert_eq!(payloads(&sub), [Bytes::from("queued")]);

    // CleanSession=1: discarded at connect and ends with the connection.
    let (sub, session_present) = connect(&mut router, "sub", true, None);
    assert!(!session_present);
    subscribe(&mut router, &sub);
    disconnect(&mut router, &sub, None);
    assert!(!router.graveyard.has_session("sub"));
}

#[test]
fn mqtt5_3_1_4_3_a_takeover_resumes_the_old_session_only_if_it_outlives_its_connection() {
    let mut router = router();
    let hour = SessionExpiry::from_interval(3600);
    let (old, _) = connect(&mut router, "sub", false, Some(hour));
    subscribe(&mut router, &old);
    // The same client id connects while the first connection is up.
    let (new, session_present) = connect(&mut router, "sub", false, Some(hour));
    assert!(
        session_present,
        "Clean Start=0 resumes the taken-over session"
    );
    let (publisher, _) = connect(&mut router, "pub", true, None);
    publish(&mut router, &publisher, "live");
    assert_eq!(payloads(&new), [Bytes::from("live")]);

    // A session that ends with its connection ends with a taken-over one too.
    let (old, _) = connect(
        &mut router,
        "other",
        false,
        Some(SessionExpiry::AtDisconnect),
    );
    subscribe(&mut router, &old);
    let (_, session_present) = connect(&mut router, "other", false, Some(hour));
    assert!(!session_present);
}

const SHARED: &str = "$share/integrators/alerts/site-01/#";

fn subscribe_to(router: &mut Router, client: &Client, path: &str) {
    let filter = SubFilter {
        path: path.to_owned(),
        qos: QoS::AtLeastOnce,
        nolocal: false,
        preserve_retain: false,
        retain_forward_rule: RetainForwardRule::OnEverySubscribe,
    };
    let subscribe = Subscribe {
        pkid: 1,
        filters: vec![filter],
    };
    send(router, client, Packet::Subscribe(subscribe, None));
    drain(client);
}

fn publish_qos1(router: &mut Router, client: &Client, payload: &'static str, pkid: u16) {
    let publish = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: TOPIC.into(),
        pkid,
        payload: payload.into(),
    };
    send(router, client, Packet::Publish(publish, None));
}

/// MQTT 5 4.8.2 and 4.1 (a session's subscriptions, shared ones included, are session
/// state): the sole member of a shared group, with a kept session and a QoS 1 delivery
/// it did not acknowledge, loses its connection. The router deleted the empty group and
/// then `expect`ed it to reset its cursor: it panicked, taking every connection down.
/// Resumed, the session gets the unacknowledged message again and what came meanwhile.
#[test]
fn mqtt5_4_8_2_a_kept_session_that_is_a_shared_groups_sole_member_disconnects_unacked() {
    let mut router = router();
    let hour = SessionExpiry::from_interval(3600);
    let (member, _) = connect(&mut router, "member", false, Some(hour));
    subscribe_to(&mut router, &member, SHARED);
    let (publisher, _) = connect(&mut router, "pub", true, Some(SessionExpiry::AtDisconnect));
    publish_qos1(&mut router, &publisher, "unacked", 1);
    assert_eq!(payloads(&member), [Bytes::from("unacked")]);

    drop_connection(&mut router, &member);
    assert!(router.graveyard.has_session("member"));
    publish_qos1(&mut router, &publisher, "while-away", 2);

    let (member, session_present) = connect(&mut router, "member", false, Some(hour));
    assert!(session_present);
    assert_eq!(
        payloads(&member),
        [Bytes::from("unacked"), Bytes::from("while-away")]
    );
    publish_qos1(&mut router, &publisher, "after", 3);
    assert_eq!(payloads(&member), [Bytes::from("after")]);
    assert!(router.scheduler.readyqueue.is_empty());
}

/// MQTT 5 4.8.2: a member's unacknowledged delivery goes to another member when it
/// leaves, and a resumed session is a member of its shared groups again (rumqttd kept
/// its request but not its membership: the group never chose it, its request was
/// skipped on every turn and its connection never paused).
#[test]
fn mqtt5_4_8_2_a_resumed_session_is_a_member_of_its_shared_group_again() {
    let mut router = router();
    let hour = SessionExpiry::from_interval(3600);
    let (kept, _) = connect(&mut router, "kept", false, Some(hour));
    subscribe_to(&mut router, &kept, SHARED);
    let (other, _) = connect(&mut router, "other", true, Some(SessionExpiry::AtDisconnect));
    subscribe_to(&mut router, &other, SHARED);
    let (publisher, _) = connect(&mut router, "pub", true, Some(SessionExpiry::AtDisconnect));

    publish_qos1(&mut router, &publisher, "one", 1);
    assert_eq!(payloads(&kept), [Bytes::from("one")]);
    assert!(payloads(&other).is_empty());

    // "one" was not acknowledged: the group's other member gets it.
    drop_connection(&mut router, &kept);
    assert_eq!(payloads(&other), [Bytes::from("one")]);

    let (kept, session_present) = connect(&mut router, "kept", false, Some(hour));
    assert!(session_present);
    assert!(payloads(&kept).is_empty(), "the group already delivered it");

    // Round robin over both members again.
    publish_qos1(&mut router, &publisher, "two", 2);
    publish_qos1(&mut router, &publisher, "three", 3);
    let (to_kept, to_other) = (payloads(&kept), payloads(&other));
    assert_eq!(to_kept.len(), 1, "kept: {to_kept:?}, other: {to_other:?}");
    assert_eq!(to_other.len(), 1, "kept: {to_kept:?}, other: {to_other:?}");
    assert!(router.scheduler.readyqueue.is_empty());
}

fn publish_qos2(router: &mut Router, client: &Client, payload: &'static str, pkid: u16) {
    let publish = Publish {
        dup: false,
        qos: QoS::ExactlyOnce,
        retain: false,
        topic: TOPIC.into(),
        pkid,
        payload: payload.into(),
    };
    send(router, client, Packet::Publish(publish, None));
}

fn pubrel(router: &mut Router, client: &Client, pkid: u16) {
    let pubrel = PubRel {
        pkid,
        reason: PubRelReason::Success,
    };
    send(router, client, Packet::PubRel(pubrel, None));
}

/// The PUBRECs and PUBCOMPs the router sent `client` since the last drain, as
/// (packet id, whether the reason is Success).
fn qos2_acks(client: &Client) -> (Vec<u16>, Vec<(u16, PubCompReason)>) {
    let (mut pubrecs, mut pubcomps) = (Vec::new(), Vec::new());
    for notification in drain(client) {
        match notification {
            Notification::DeviceAck(Ack::PubRec(p)) => pubrecs.push(p.pkid),
            Notification::DeviceAck(Ack::PubComp(p)) => pubcomps.push((p.pkid, p.reason)),
            _ => {}
        }
    }
    (pubrecs, pubcomps)
}

/// MQTT 5 4.3.3 and 4.4 (MQTT-4.4.0-1: on a resumed session the client resends its
/// PUBRELs), 4.1 (QoS 2 messages received and not completed are session state): a
/// QoS 2 PUBLISH acknowledged with PUBREC, the connection lost, the session resumed;
/// the resent PUBREL gets PUBCOMP and the message reaches the subscriber once.
/// rumqttd kept the message in the connection's ack log only: the PUBREL found nothing,
/// the client was disconnected (on every reconnect) and the message was lost.
#[test]
fn mqtt5_4_3_3_a_resumed_sessions_pubrel_releases_the_message_received_before() {
    let mut router = router();
    let hour = SessionExpiry::from_interval(3600);
    let (sub, _) = connect(&mut router, "sub", true, Some(SessionExpiry::AtDisconnect));
    subscribe(&mut router, &sub);
    let (publisher, _) = connect(&mut router, "q2pub", false, Some(hour));
    publish_qos2(&mut router, &publisher, "exactly-once", 7);
    assert_eq!(qos2_acks(&publisher), (vec![7], vec![]));
    assert!(payloads(&sub).is_empty(), "stored on PUBREL");

    drop_connection(&mut router, &publisher);
    let (publisher, session_present) = connect(&mut router, "q2pub", false, Some(hour));
    assert!(session_present);
    pubrel(&mut router, &publisher, 7);
    assert_eq!(
        qos2_acks(&publisher),
        (vec![], vec![(7, PubCompReason::Success)])
    );
    assert!(router.obufs.contains(publisher.id), "still connected");
    assert_eq!(payloads(&sub), [Bytes::from("exactly-once")]);

    // Its PUBCOMP lost, the client sends the PUBREL again: PUBCOMP, nothing stored.
    pubrel(&mut router, &publisher, 7);
    assert_eq!(
        qos2_acks(&publisher),
        (vec![], vec![(7, PubCompReason::PacketIdentifierNotFound)])
    );
    assert!(payloads(&sub).is_empty(), "delivered exactly once");
}

/// MQTT 5 4.3.3 / MQTT 3.1.1 4.3.3: a PUBREL releases the message with its packet id,
/// in whatever order PUBRELs come (rumqttd released the oldest message for any PUBREL).
/// A resent PUBLISH (DUP) before the PUBREL is still one message.
#[test]
fn mqtt5_4_3_3_pubrels_release_messages_by_packet_id_not_by_arrival() {
    let mut router = router();
    let (sub, _) = connect(&mut router, "sub", true, Some(SessionExpiry::AtDisconnect));
    subscribe(&mut router, &sub);
    let (publisher, _) = connect(&mut router, "q2pub", true, Some(SessionExpiry::AtDisconnect));
    publish_qos2(&mut router, &publisher, "first", 1);
    publish_qos2(&mut router, &publisher, "second", 2);
    publish_qos2(&mut router, &publisher, "second", 2);
    assert_eq!(qos2_acks(&publisher), (vec![1, 2, 2], vec![]));

    pubrel(&mut router, &publisher, 2);
    assert_eq!(payloads(&sub), [Bytes::from("second")]);
    pubrel(&mut router, &publisher, 1);
    assert_eq!(payloads(&sub), [Bytes::from("first")]);
    assert_eq!(
        qos2_acks(&publisher),
        (
            vec![],
            vec![(2, PubCompReason::Success), (1, PubCompReason::Success)]
        )
    );
}

/// MQTT 5 3.7.2.1: a PUBREL for a packet id the server does not hold gets PUBCOMP
/// 0x92 Packet Identifier not found (an MQTT 3.1.1 PUBCOMP, which has no reason code,
/// is a plain PUBCOMP); the client stays connected (rumqttd disconnected it).
#[test]
fn mqtt5_3_7_2_1_an_unknown_pubrel_gets_pubcomp_packet_identifier_not_found() {
    let mut router = router();
    let (client, _) = connect(&mut router, "q2pub", true, Some(SessionExpiry::AtDisconnect));
    pubrel(&mut router, &client, 42);
    assert_eq!(
        qos2_acks(&client),
        (vec![], vec![(42, PubCompReason::PacketIdentifierNotFound)])
    );
    assert!(router.obufs.contains(client.id), "still connected");
}
