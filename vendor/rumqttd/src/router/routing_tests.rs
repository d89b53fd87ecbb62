//! vitalmq patches 10-12 at router level: what a subscriber is handed, driven through
//! the router's own event handling (`events`, `consume`) without links or sockets.

use super::*;
use crate::protocol::{Filter, PubRel, RetainForwardRule, Subscribe, SubscribeProperties};
use crate::router::shared_subs::Strategy;
use bytes::Bytes;

/// A router whose QoS 0 reads carry at most `read_len` messages.
fn router(read_len: u64) -> Router {
    Router::new(
        0,
        RouterConfig {
            max_connections: 10,
            max_outgoing_packet_count: read_len,
            max_segment_size: 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
        },
    )
}

/// Runs the router until no connection is ready to make progress.
fn settle(router: &mut Router) {
    for _ in 0..10_000 {
        if router.consume().is_none() {
            return;
        }
    }
    panic!("router did not settle");
}

fn connect(router: &mut Router, client_id: &str) -> ConnectionId {
    let connection = Connection::new(None, client_id.to_owned(), true, false);
    let incoming = Incoming::new(client_id.to_owned());
    let (outgoing, _link_rx) = Outgoing::new(client_id.to_owned());
    router.events(
        0,
        Event::Connect {
            connection,
            incoming,
            outgoing,
        },
    );
    let id = router.connection_map[client_id];
    settle(router);
    received(router, id);
    id
}

/// Hands the router `packets` from connection `id`, as its link would.
fn push(router: &mut Router, id: ConnectionId, packets: Vec<Packet>) {
    router.ibufs[id].buffer.lock().extend(packets);
    router.events(id, Event::DeviceData);
}

fn send(router: &mut Router, id: ConnectionId, packets: Vec<Packet>) {
    push(router, id, packets);
    settle(router);
}

/// The PUBLISHes the router has handed connection `id` since the last call.
fn received(router: &mut Router, id: ConnectionId) -> Vec<Publish> {
    router.obufs[id]
        .data_buffer
        .lock()
        .drain(..)
        .filter_map(|n| match n {
            Notification::Forward(f) => Some(f.publish),
            _ => None,
        })
        .collect()
}

fn publish(topic: &str, qos: QoS, retain: bool, pkid: u16) -> Packet {
    Packet::Publish(
        Publish {
            dup: false,
            qos,
            pkid,
            retain,
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            payload: Bytes::from_static(b"x"),
        },
        None,
    )
}

fn filter(path: &str, qos: QoS) -> Filter {
    Filter {
        path: path.to_owned(),
        qos,
        nolocal: false,
        preserve_retain: false,
        retain_forward_rule: RetainForwardRule::OnEverySubscribe,
    }
}

fn subscribe(filter: Filter) -> Packet {
    Packet::Subscribe(
        Subscribe {
            pkid: 1,
            filters: vec![filter],
        },
        None,
    )
}

fn subscribe_with_id(filter: Filter, id: usize) -> Packet {
    Packet::Subscribe(
        Subscribe {
            pkid: 1,
            filters: vec![filter],
        },
        Some(SubscribeProperties {
            id: Some(id),
            user_properties: Vec::new(),
        }),
    )
}

/// Publishes one message at each QoS (the QoS 2 one completed with PUBREL).
fn publish_at_each_qos(router: &mut Router, publisher: ConnectionId, topic: &str) {
    send(
        router,
        publisher,
        vec![
            publish(topic, QoS::AtMostOnce, false, 0),
            publish(topic, QoS::AtLeastOnce, false, 1),
            publish(topic, QoS::ExactlyOnce, false, 2),
            Packet::PubRel(
                PubRel {
                    pkid: 2,
                    reason: protocol::PubRelReason::Success,
                },
                None,
            ),
        ],
    );
}

fn qos_of(publishes: &[Publish]) -> Vec<QoS> {
    publishes.iter().map(|p| p.qos).collect()
}

/// MQTT 3.1.1 3.8.4 / MQTT 5 3.8.4 and 4.3: the QoS of a delivered message is the
/// minimum of the QoS it was published at and the granted QoS.
#[test]
fn mqtt_3_8_4_delivered_qos_is_the_minimum_of_published_and_granted() {
    let mut router = router(100);
    let publisher = connect(&mut router, "publisher");
    let mut subscribers = Vec::new();
    for (client, granted) in [
        ("granted-0", QoS::AtMostOnce),
        ("granted-1", QoS::AtLeastOnce),
        ("granted-2", QoS::ExactlyOnce),
    ] {
        let id = connect(&mut router, client);
        send(&mut router, id, vec![subscribe(filter("t/#", granted))]);
        subscribers.push(id);
    }

    publish_at_each_qos(&mut router, publisher, "t/a");

    use QoS::*;
    let expected = [
        vec![AtMostOnce, AtMostOnce, AtMostOnce],
        vec![AtMostOnce, AtLeastOnce, AtLeastOnce],
        vec![AtMostOnce, AtLeastOnce, ExactlyOnce],
    ];
    for (id, expected) in subscribers.into_iter().zip(expected) {
        assert_eq!(qos_of(&received(&mut router, id)), expected);
    }
}

/// MQTT 5 4.3.1 / MQTT-2.2.1-2: a QoS 0 delivery has no packet id, and on a QoS 1/2
/// subscription (MQTT 5 3.8.4) it takes no in-flight slot: only QoS 1/2 deliveries
/// wait for an acknowledgement.
#[test]
fn mqtt_3_8_4_a_qos0_delivery_on_a_qos1_subscription_takes_no_packet_id_or_inflight_slot() {
    let mut router = router(100);
    let publisher = connect(&mut router, "publisher");
    let subscriber = connect(&mut router, "subscriber");
    send(
        &mut router,
        subscriber,
        vec![subscribe(filter("t/#", QoS::AtLeastOnce))],
    );
    let free = router.obufs[subscriber].free_slots();

    send(
        &mut router,
        publisher,
        vec![
            publish("t/a", QoS::AtMostOnce, false, 0),
            publish("t/a", QoS::AtMostOnce, false, 0),
        ],
    );
    let got = received(&mut router, subscriber);
    assert_eq!(qos_of(&got), vec![QoS::AtMostOnce; 2]);
    assert!(got.iter().all(|p| p.pkid == 0));
    assert_eq!(router.obufs[subscriber].free_slots(), free);

    send(
        &mut router,
        publisher,
        vec![publish("t/a", QoS::AtLeastOnce, false, 7)],
    );
    let got = received(&mut router, subscriber);
    assert_eq!(qos_of(&got), vec![QoS::AtLeastOnce]);
    assert_eq!(got[0].pkid, 1);
    assert_eq!(router.obufs[subscriber].free_slots(), free - 1);

    // Its PUBACK is the next one the router expects (acks are taken in order).
    send(
        &mut router,
        subscriber,
        vec![Packet::PubAck(
            protocol::PubAck {
                pkid: 1,
                reason: PubAckReason::Success,
            },
            None,
        )],
    );
    assert!(router.obufs.contains(subscriber), "still connected");
    assert_eq!(router.obufs[subscriber].free_slots(), free);
}

/// MQTT 5 3.8.3.1, MQTT-3.8.3-3: with No Local, a client's own messages are not
/// forwarded to it on that subscription; other clients' are, and others still get its.
#[test]
fn mqtt_3_8_3_3_no_local_leaves_out_only_the_clients_own_messages() {
    let mut router = router(100);
    let local = connect(&mut router, "local");
    let other = connect(&mut router, "other");
    let nolocal = Filter {
        nolocal: true,
        ..filter("t/#", QoS::AtLeastOnce)
    };
    send(&mut router, local, vec![subscribe(nolocal)]);
    send(
        &mut router,
        other,
        vec![subscribe(filter("t/#", QoS::AtLeastOnce))],
    );

    send(
        &mut router,
        local,
        vec![publish("t/own", QoS::AtLeastOnce, false, 1)],
    );
    send(
        &mut router,
        other,
        vec![publish("t/other", QoS::AtLeastOnce, false, 1)],
    );

    let topics = |publishes: Vec<Publish>| -> Vec<Bytes> {
        publishes.into_iter().map(|p| p.topic).collect::<Vec<_>>()
    };
    assert_eq!(topics(received(&mut router, local)), vec!["t/other"]);
    assert_eq!(
        topics(received(&mut router, other)),
        vec!["t/own", "t/other"]
    );
}

/// MQTT-3.8.3-3: a read made only of the client's own messages is not the end of the
/// log; what others published after them still arrives.
#[test]
fn mqtt_3_8_3_3_no_local_skipping_a_whole_read_still_delivers_what_follows() {
    // Reads of 4 messages at QoS 0.
    let mut router = router(4);
    let local = connect(&mut router, "local");
    let other = connect(&mut router, "other");
    let nolocal = Filter {
        nolocal: true,
        ..filter("t/#", QoS::AtMostOnce)
    };
    send(&mut router, local, vec![subscribe(nolocal)]);

    // Both batches reach the log before the subscriber reads.
    let own = (0..6)
        .map(|_| publish("t/own", QoS::AtMostOnce, false, 0))
        .collect();
    push(&mut router, local, own);
    push(
        &mut router,
        other,
        vec![publish("t/other", QoS::AtMostOnce, false, 0)],
    );
    settle(&mut router);

    let got = received(&mut router, local);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].topic, "t/other");
}

/// MQTT-3.8.3-4: No Local on a shared subscription is a Protocol Error.
#[test]
fn mqtt_3_8_3_4_no_local_on_a_shared_subscription_is_a_protocol_error() {
    let mut router = router(100);
    let id = connect(&mut router, "sharer");
    let shared = Filter {
        nolocal: true,
        ..filter("$share/g/t/#", QoS::AtLeastOnce)
    };
    push(&mut router, id, vec![subscribe(shared)]);
    assert!(!router.obufs.contains(id), "disconnected");
}

/// MQTT 5 3.8.3.1 (Retain As Published) and MQTT-3.3.1-9 / MQTT 5 3.3.1.3: on an
/// established subscription RETAIN is forwarded as published with RAP=1 and cleared with
/// RAP=0 (and always for MQTT 3.1.1, whose subscriptions have RAP=0).
#[test]
fn mqtt_3_8_3_1_retain_as_published_keeps_or_clears_retain_on_live_messages() {
    let mut router = router(100);
    let publisher = connect(&mut router, "publisher");
    let keep = connect(&mut router, "rap-1");
    let clear = connect(&mut router, "rap-0");
    let rap = Filter {
        preserve_retain: true,
        ..filter("t/#", QoS::AtLeastOnce)
    };
    send(&mut router, keep, vec![subscribe(rap)]);
    send(
        &mut router,
        clear,
        vec![subscribe(filter("t/#", QoS::AtLeastOnce))],
    );

    send(
        &mut router,
        publisher,
        vec![
            publish("t/retained", QoS::AtLeastOnce, true, 1),
            publish("t/plain", QoS::AtLeastOnce, false, 2),
        ],
    );

    let retain = |publishes: Vec<Publish>| publishes.iter().map(|p| p.retain).collect::<Vec<_>>();
    assert_eq!(retain(received(&mut router, keep)), vec![true, false]);
    assert_eq!(retain(received(&mut router, clear)), vec![false, false]);

    // A retained message sent because of a new subscription carries RETAIN=1 whatever
    // RAP says (MQTT-3.3.1-8).
    let late = connect(&mut router, "late");
    send(
        &mut router,
        late,
        vec![subscribe(filter("t/#", QoS::AtLeastOnce))],
    );
    let got = received(&mut router, late);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].topic, "t/retained");
    assert!(got[0].retain);
}

/// MQTT 5 3.8.3.1 Retain Handling: 0 sends retained messages on every SUBSCRIBE, 1 only
/// when the subscription did not exist, 2 never. Counted as (first SUBSCRIBE, repeated
/// SUBSCRIBE).
#[test]
fn mqtt_3_8_3_1_retain_handling_on_new_and_existing_subscriptions() {
    let mut router = router(100);
    let publisher = connect(&mut router, "publisher");
    send(
        &mut router,
        publisher,
        vec![publish("r/a", QoS::AtLeastOnce, true, 1)],
    );

    for (client, rule, expected) in [
        ("rh-0", RetainForwardRule::OnEverySubscribe, (1, 1)),
        ("rh-1", RetainForwardRule::OnNewSubscribe, (1, 0)),
        ("rh-2", RetainForwardRule::Never, (0, 0)),
    ] {
        let id = connect(&mut router, client);
        let rh = Filter {
            retain_forward_rule: rule,
            ..filter("r/#", QoS::AtLeastOnce)
        };
        send(&mut router, id, vec![subscribe(rh.clone())]);
        let first = received(&mut router, id);
        send(&mut router, id, vec![subscribe(rh)]);
        let again = received(&mut router, id);
        assert!(first.iter().chain(&again).all(|p| p.retain));
        assert_eq!((first.len(), again.len()), expected, "{client}");
    }

    // Never for a shared subscription (MQTT 5 4.8.2), Retain Handling 0 or not.
    let id = connect(&mut router, "sharer");
    send(
        &mut router,
        id,
        vec![subscribe(filter("$share/g/r/#", QoS::AtLeastOnce))],
    );
    send(
        &mut router,
        id,
        vec![subscribe(filter("$share/g/r/#", QoS::AtLeastOnce))],
    );
    assert!(received(&mut router, id).is_empty());
}

/// MQTT 3.1.1 3.8.4 / MQTT 5 3.8.4: a SUBSCRIBE to a filter the client holds replaces
/// the subscription: the new granted QoS, No Local and Subscription Identifier apply,
/// and the messages keep coming once (no second subscription).
#[test]
fn mqtt_3_8_4_a_repeated_subscribe_replaces_the_subscriptions_options() {
    let mut router = router(100);
    let publisher = connect(&mut router, "publisher");
    let id = connect(&mut router, "resubscriber");
    send(
        &mut router,
        id,
        vec![subscribe_with_id(filter("t/#", QoS::ExactlyOnce), 7)],
    );
    send(
        &mut router,
        publisher,
        vec![publish("t/a", QoS::ExactlyOnce, false, 3)],
    );
    // (the QoS 2 publish waits for its PUBREL)
    send(
        &mut router,
        publisher,
        vec![Packet::PubRel(
            PubRel {
                pkid: 3,
                reason: protocol::PubRelReason::Success,
            },
            None,
        )],
    );
    let got = router.obufs[id]
        .data_buffer
        .lock()
        .drain(..)
        .filter_map(|n| match n {
            Notification::Forward(f) => Some(f),
            _ => None,
        })
        .collect::<Vec<_>>();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].publish.qos, QoS::ExactlyOnce);
    let ids = got[0]
        .properties
        .as_ref()
        .map(|p| p.subscription_identifiers.clone());
    assert_eq!(ids, Some(vec![7]));

    // Downgrade to QoS 0, no identifier.
    send(
        &mut router,
        id,
        vec![subscribe(filter("t/#", QoS::AtMostOnce))],
    );
    publish_at_each_qos(&mut router, publisher, "t/a");
    let got = router.obufs[id]
        .data_buffer
        .lock()
        .drain(..)
        .filter_map(|n| match n {
            Notification::Forward(f) => Some(f),
            _ => None,
        })
        .collect::<Vec<_>>();
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|f| f.publish.qos == QoS::AtMostOnce));
    assert!(got.iter().all(|f| f
        .properties
        .as_ref()
        .map_or(true, |p| p.subscription_identifiers.is_empty())));

    // Back to QoS 1 with No Local, in the same batch as one of its own messages (its
    // request is then among the router's pending notifications, not parked).
    let nolocal = Filter {
        nolocal: true,
        ..filter("t/#", QoS::AtLeastOnce)
    };
    send(
        &mut router,
        id,
        vec![
            publish("t/own", QoS::AtMostOnce, false, 0),
            subscribe(nolocal),
        ],
    );
    assert!(
        received(&mut router, id).is_empty(),
        "own message, No Local"
    );
    send(
        &mut router,
        publisher,
        vec![
            publish("t/a", QoS::AtLeastOnce, false, 1),
            publish("t/a", QoS::ExactlyOnce, false, 9),
            Packet::PubRel(
                PubRel {
                    pkid: 9,
                    reason: protocol::PubRelReason::Success,
                },
                None,
            ),
        ],
    );
    let got = received(&mut router, id);
    assert_eq!(qos_of(&got), vec![QoS::AtLeastOnce, QoS::AtLeastOnce]);
    send(
        &mut router,
        id,
        vec![publish("t/own", QoS::AtMostOnce, false, 0)],
    );
    assert!(received(&mut router, id).is_empty());
}

/// Consumes until no connection is ready; the number of connection turns it took, or
/// `None` if the router was still busy after `limit` turns (a connection rescheduled
/// for ever).
fn turns_until_idle(router: &mut Router, limit: usize) -> Option<usize> {
    (0..limit).find(|_| router.consume().is_none())
}

/// A QoS 1 PUBLISH whose Message Expiry Interval (MQTT 5 3.3.2.3.3) is 0: expired as
/// soon as it is stored.
fn expired_publish(topic: &str, pkid: u16) -> Packet {
    let Packet::Publish(publish, _) = publish(topic, QoS::AtLeastOnce, false, pkid) else {
        unreachable!("publish() makes a PUBLISH");
    };
    let properties = protocol::PublishProperties {
        message_expiry_interval: Some(0),
        ..Default::default()
    };
    Packet::Publish(publish, Some(properties))
}

/// MQTT 5 3.3.2.3.3 (an expired message is not delivered) on a shared subscription
/// (MQTT 5 4.8.2): the group reads past the expired message, delivers the live one
/// after it, and the router goes idle. A round-robin group reads one message at a
/// time and moved its cursor only after a non-empty read, so an expired message
/// (or any read left empty) was read again for ever: the member never paused.
#[test]
fn mqtt5_4_8_2_a_shared_group_reads_past_an_expired_message_and_goes_idle() {
    let mut router = router(100);
    let publisher = connect(&mut router, "publisher");
    let member = connect(&mut router, "member");
    send(
        &mut router,
        member,
        vec![subscribe(filter("$share/g/t/#", QoS::AtLeastOnce))],
    );
    assert_eq!(turns_until_idle(&mut router, 10), Some(0));

    // Both reach the log before the group reads.
    push(
        &mut router,
        publisher,
        vec![
            expired_publish("t/expired", 1),
            publish("t/live", QoS::AtLeastOnce, false, 2),
        ],
    );
    let turns = turns_until_idle(&mut router, 1_000);
    assert!(
        turns.is_some_and(|n| n <= 4),
        "the router kept rescheduling: {turns:?}"
    );
    assert!(router.scheduler.readyqueue.is_empty());
    let got = received(&mut router, member);
    assert_eq!(
        got.iter().map(|p| p.topic.clone()).collect::<Vec<_>>(),
        vec!["t/live"]
    );

    // The group still follows the log.
    send(
        &mut router,
        publisher,
        vec![publish("t/next", QoS::AtLeastOnce, false, 3)],
    );
    assert_eq!(received(&mut router, member).len(), 1);
}

/// MQTT 5 4.8.2 (each message of a shared subscription goes to one member, once): a
/// member's outgoing queue filling up (`MAX_CHANNEL_CAPACITY`) pauses the member after
/// the read that filled it; the group's cursor must already be past that read, or the
/// group reads (and sends) its last message again when the member resumes.
#[test]
fn mqtt5_4_8_2_a_shared_member_paused_with_a_full_queue_gets_no_message_twice() {
    let mut router = router(100);
    let publisher = connect(&mut router, "publisher");
    let member = connect(&mut router, "member");
    send(
        &mut router,
        member,
        vec![subscribe(filter("$share/g/t/#", QoS::AtMostOnce))],
    );

    let count = MAX_CHANNEL_CAPACITY + 10;
    let publishes = (0..count)
        .map(|i| {
            Packet::Publish(
                Publish {
                    dup: false,
                    qos: QoS::AtMostOnce,
                    pkid: 0,
                    retain: false,
                    topic: Bytes::from_static(b"t/a"),
                    payload: Bytes::from(i.to_string()),
                },
                None,
            )
        })
        .collect();
    send(&mut router, publisher, publishes);

    // As the link does: drain the queue and, if the router unscheduled the
    // connection, say it is ready again.
    let mut got = Vec::new();
    let mut pauses = 0;
    loop {
        let notifications: Vec<_> = router.obufs[member].data_buffer.lock().drain(..).collect();
        let mut unscheduled = false;
        for notification in notifications {
            match notification {
                Notification::Forward(f) => got.push(f.publish.payload),
                Notification::Unschedule => unscheduled = true,
                _ => {}
            }
        }
        if !unscheduled {
            break;
        }
        pauses += 1;
        router.events(member, Event::Ready);
        settle(&mut router);
    }
    assert_eq!(pauses, 1, "the queue filled once");
    let expected: Vec<Bytes> = (0..count).map(|i| Bytes::from(i.to_string())).collect();
    assert_eq!(got.len(), expected.len(), "each message once");
    assert_eq!(got, expected);
}
