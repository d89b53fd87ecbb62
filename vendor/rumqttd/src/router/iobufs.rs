use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use flume::{Receiver, Sender};
use parking_lot::Mutex;
use tracing::{debug, error, warn};

use crate::{
    protocol::{Packet, QoS},
    router::{FilterIdx, MAX_CHANNEL_CAPACITY},
    Cursor, Notification,
};

use super::logs::Origin;
use super::{Forward, IncomingMeter, OutgoingMeter};

// vitalmq patch 2: 100 unacknowledged messages per subscriber capped a subscriber
// that acknowledges only after a durable group commit (the vitalmq bridge) at one
// window per commit round trip. Packet ids stay within 1..=3000.
const MAX_INFLIGHT: usize = 3000;
const MAX_PKID: u16 = MAX_INFLIGHT as u16;

#[derive(Debug)]
pub struct Incoming {
    /// Identifier associated with connected client
    pub(crate) client_id: String,
    /// vitalmq patch 11: the same id, shared with every message this connection
    /// publishes (for No Local).
    pub(crate) origin: Origin,
    /// Recv buffer
    pub(crate) buffer: Arc<Mutex<VecDeque<Packet>>>,
    /// incoming metrics
    pub(crate) meter: IncomingMeter,
}

impl Incoming {
    #[inline]
    pub(crate) fn new(client_id: String) -> Self {
        Self {
            // vitalmq patch 1: grow on demand instead of reserving MAX_CHANNEL_CAPACITY
            // packets for every connection, most of which stay idle.
            buffer: Arc::new(Mutex::new(VecDeque::new())),
            meter: Default::default(),
            origin: Origin::from(client_id.as_str()),
            client_id,
        }
    }

    #[inline]
    pub(crate) fn buffer(&self) -> Arc<Mutex<VecDeque<Packet>>> {
        self.buffer.clone()
    }

    #[inline]
    pub(crate) fn exchange(&mut self, mut v: VecDeque<Packet>) -> VecDeque<Packet> {
        std::mem::swap(&mut v, &mut self.buffer.lock());
        v
    }
}

#[derive(Debug)]
pub struct Outgoing {
    /// Identifier associated with connected client
    pub(crate) client_id: String,
    /// Send buffer
    pub(crate) data_buffer: Arc<Mutex<VecDeque<Notification>>>,
    /// Handle which is given to router to allow router to communicate with this connection
    pub(crate) handle: Sender<()>,
    /// The buffer to keep track of inflight packets.
    inflight_buffer: VecDeque<(u16, FilterIdx, Option<Cursor>)>,
    /// PubRels waiting for PubComp
    pub(crate) unacked_pubrels: VecDeque<u16>,
    /// Last packet id
    last_pkid: u16,
    /// vitalmq patch 18: the packet ids in `inflight_buffer` and `unacked_pubrels`, so
    /// that none is handed out again while in use. Built at the first packet id handed
    /// out (after a resumed session's `unacked_pubrels` is in place), so a connection
    /// that never gets a QoS 1/2 delivery pays nothing.
    pkids_in_use: Option<PkidsInUse>,
    /// vitalmq patch 13: most unacknowledged QoS 1/2 deliveries: the client's Receive
    /// Maximum (MQTT 5 3.1.2.11.3, 65,535 when absent) within `MAX_INFLIGHT`.
    max_inflight: usize,
    /// Metrics of outgoing messages of this connection
    pub(crate) meter: OutgoingMeter,
}

impl Outgoing {
    #[inline]
    pub(crate) fn new(client_id: String) -> (Self, Receiver<()>) {
        let (handle, rx) = flume::bounded(MAX_CHANNEL_CAPACITY);
        // vitalmq patch 1: grow on demand (see Incoming::new).
        let data_buffer = VecDeque::new();
        let inflight_buffer = VecDeque::new();
        let unacked_pubrels = VecDeque::new();

        let outgoing = Self {
            client_id,
            data_buffer: Arc::new(Mutex::new(data_buffer)),
            inflight_buffer,
            unacked_pubrels,
            handle,
            last_pkid: 0,
            pkids_in_use: None,
            max_inflight: MAX_INFLIGHT,
            meter: Default::default(),
        };

        (outgoing, rx)
    }

    #[inline]
    pub(crate) fn buffer(&self) -> Arc<Mutex<VecDeque<Notification>>> {
        self.data_buffer.clone()
    }

    /// vitalmq patch 13: flow control (MQTT 5 4.9, MQTT-4.9.0-2): at most the client's
    /// Receive Maximum QoS 1/2 deliveries in flight at once, never more than `MAX_INFLIGHT`.
    pub fn limit_inflight(&mut self, receive_maximum: u16) {
        self.max_inflight = usize::from(receive_maximum).clamp(1, MAX_INFLIGHT);
    }

    /// Deliveries that may still go out at QoS 1/2. A QoS 2 delivery counts until its
    /// PUBCOMP (vitalmq patch 13; rumqttd freed its slot at PUBREC, but MQTT 5 4.9
    /// counts it until PUBCOMP, and its packet id is in use until then too).
    pub fn free_slots(&self) -> usize {
        self.max_inflight
            .saturating_sub(self.inflight_buffer.len() + self.unacked_pubrels.len())
    }

    pub fn push_notification(&mut self, notification: Notification) -> usize {
        let mut buffer = self.data_buffer.lock();
        buffer.push_back(notification);
        buffer.len()
    }

    /// Push packets to the outgoing buffer.
    ///
    /// vitalmq patch 10: each forward is sent at its own QoS (the minimum of the
    /// published and the granted QoS, MQTT 5 3.8.4 / 4.3), so one read can mix QoS 0
    /// and QoS 1/2 messages: only those at QoS 1/2 take a packet id and an in-flight
    /// slot. rumqttd decided this once per read from the subscription's QoS.
    pub fn push_forwards(
        &mut self,
        publishes: impl Iterator<Item = Forward>,
        filter_idx: usize,
    ) -> (usize, usize) {
        // A handle of its own, so that handing out packet ids may borrow `self`.
        let data_buffer = self.data_buffer.clone();
        let mut buffer = data_buffer.lock();

        for mut p in publishes {
            if p.publish.qos == QoS::AtMostOnce {
                p.publish.pkid = 0;
            } else {
                let pkid = self.next_pkid();
                p.publish.pkid = pkid;
                self.inflight_buffer.push_back((pkid, filter_idx, p.cursor));
            }

            self.meter.publish_count += 1;
            self.meter.total_size += p.publish.topic.len() + p.publish.payload.len();
            buffer.push_back(Notification::Forward(p));
        }

        let buffer_count = buffer.len();
        let inflight_count = self.inflight_buffer.len();

        if inflight_count > MAX_INFLIGHT {
            warn!(
                "More inflight publishes than max allowed, inflight count = {}, max allowed = {}",
                inflight_count, MAX_INFLIGHT
            );
        }

        (buffer_count, inflight_count)
    }

    /// The next packet id not in use, after `last_pkid` in the cycle 1..=`MAX_PKID`.
    ///
    /// vitalmq patch 18: rumqttd handed ids out strictly in turn, which is safe only
    /// while acknowledgements come in order. Since patch 14 one may come late (an old
    /// delivery still unacknowledged while 2,999 later ones completed), and a resumed
    /// session starts again at 1 while its unacknowledged PUBRELs may hold low ids; the
    /// same id then named two messages in flight and an ack matched the first one
    /// (MQTT-2.2.1-3: an id is reusable only once its flow completed). In-use ids are
    /// skipped. Cost: one bit test per id handed out while acks come in order; a skipped
    /// id moves the cursor on, so a whole cycle of `MAX_PKID` ids costs at most
    /// `MAX_PKID` extra tests. Reads are bounded by `free_slots` (never above
    /// `MAX_PKID` ids in use), so a free id exists; should none, the id in turn is used
    /// as rumqttd did, with an error.
    fn next_pkid(&mut self) -> u16 {
        let in_use = self.pkids_in_use.get_or_insert_with(|| {
            let mut in_use = PkidsInUse::default();
            let inflight = self.inflight_buffer.iter().map(|(pkid, ..)| *pkid);
            inflight
                .chain(self.unacked_pubrels.iter().copied())
                .for_each(|pkid| in_use.insert(pkid));
            in_use
        });
        let mut pkid = self.last_pkid;
        for _ in 0..MAX_PKID {
            pkid = pkid % MAX_PKID + 1;
            if !in_use.contains(pkid) {
                break;
            }
        }
        if in_use.contains(pkid) {
            error!(pkid, "every packet id is in flight; reusing one");
        }
        in_use.insert(pkid);
        self.last_pkid = pkid;
        pkid
    }

    /// vitalmq patch 18: `pkid` no longer in use.
    fn release_pkid(&mut self, pkid: u16) {
        if let Some(in_use) = self.pkids_in_use.as_mut() {
            in_use.remove(pkid);
        }
    }

    // Returns (unsolicited, outoforder) flags
    // Return: Out of order or unsolicited acks
    ///
    /// vitalmq patch 14: an ack may come out of order (rumqttd refused that): the link
    /// completes a delivery it could not send (larger than the client's Maximum Packet
    /// Size, MQTT-3.1.2-25) ahead of the client's acks for earlier ones. An ack for a
    /// packet id not in flight is still refused.
    pub fn register_ack(&mut self, pkid: u16) -> Option<()> {
        let at = self.inflight_buffer.iter().position(|(id, ..)| *id == pkid);
        let Some(at) = at else {
            error!(pkid, "ack for a packet id not in flight.");
            return None;
        };
        if at != 0 {
            debug!(pkid, "out of order ack.");
        }
        self.inflight_buffer.remove(at);
        self.release_pkid(pkid);
        Some(())
    }

    pub fn register_pubrec(&mut self, pkid: u16) {
        // NOTE: we can return true of false
        // to indicate whether this is duplicate or not
        self.unacked_pubrels.push_back(pkid);
        // vitalmq patch 18: in use until its PUBCOMP.
        if let Some(in_use) = self.pkids_in_use.as_mut() {
            in_use.insert(pkid);
        }
    }

    // OASIS standards don't specify anything about ordering of PubComp
    // https://docs.oasis-open.org/mqtt/mqtt/v5.0/os/mqtt-v5.0-os.html#_Toc3901240
    // But we don't support out of order / unsolicited pubcomps
    // to be consistent with the behaviour with other acks
    //
    // vitalmq patch 14: out of order, like `register_ack`.
    pub fn register_pubcomp(&mut self, pkid: u16) -> Option<()> {
        let Some(at) = self.unacked_pubrels.iter().position(|id| *id == pkid) else {
            error!(pkid, "pubcomp for a packet id without a pubrel.");
            return None;
        };
        self.unacked_pubrels.remove(at);
        self.release_pkid(pkid);
        Some(())
    }

    // Here we are assuming that the first unique filter_idx we find while iterating will have the
    // least corresponding cursor because of the way we insert into the inflight_buffer
    pub fn retransmission_map(&self) -> HashMap<FilterIdx, Cursor> {
        let mut o = HashMap::new();
        for (_, filter_idx, cursor) in self.inflight_buffer.iter() {
            // if cursor in None, it means it was a retained publish
            if !o.contains_key(filter_idx) && cursor.is_some() {
                o.insert(*filter_idx, cursor.unwrap());
            }
        }

        o
    }
}

/// vitalmq patch 18: a set of packet ids 1..=`MAX_PKID`, one bit each (376 bytes). Ids
/// above `MAX_PKID` are never handed out, so they are not tracked.
#[derive(Debug)]
struct PkidsInUse([u64; MAX_PKID as usize / 64 + 1]);

impl Default for PkidsInUse {
    fn default() -> Self {
        Self([0; MAX_PKID as usize / 64 + 1])
    }
}

impl PkidsInUse {
    fn slot(pkid: u16) -> Option<(usize, u64)> {
        (pkid <= MAX_PKID).then(|| (usize::from(pkid / 64), 1 << (pkid % 64)))
    }

    fn insert(&mut self, pkid: u16) {
        if let Some((word, bit)) = Self::slot(pkid) {
            self.0[word] |= bit;
        }
    }

    fn remove(&mut self, pkid: u16) {
        if let Some((word, bit)) = Self::slot(pkid) {
            self.0[word] &= !bit;
        }
    }

    fn contains(&self, pkid: u16) -> bool {
        Self::slot(pkid).is_some_and(|(word, bit)| self.0[word] & bit != 0)
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::protocol::Publish;

    /// Pushes one QoS 1 forward (cursor `(0, offset)`) and returns its packet id.
    fn deliver(outgoing: &mut Outgoing, offset: u64) -> u16 {
        let mut publish = Publish::new("alerts/a", "x", false);
        publish.qos = QoS::AtLeastOnce;
        let forward = Forward {
            cursor: Some((0, offset)),
            size: 0,
            publish,
            properties: None,
        };
        outgoing.push_forwards(std::iter::once(forward), 0);
        let last = outgoing.data_buffer.lock().pop_back();
        match last {
            Some(Notification::Forward(f)) => f.publish.pkid,
            other => panic!("expected a forward, got {other:?}"),
        }
    }

    /// MQTT-2.2.1-3 (MQTT 5 2.2.1): a packet id is reusable only once its flow has
    /// completed. vitalmq patch 18: one old delivery stays unacknowledged while more
    /// than a whole cycle of later ones is delivered and acknowledged (acks may come out
    /// of order since patch 14); its id is never handed out again meanwhile, and its ack
    /// then completes that delivery.
    #[test]
    fn mqtt_2_2_1_3_an_unacknowledged_packet_id_is_not_reused() {
        let (mut outgoing, _rx) = Outgoing::new("pkids".to_owned());
        let old = deliver(&mut outgoing, 0);
        for offset in 1..=(2 * u64::from(MAX_PKID) + 10) {
            let pkid = deliver(&mut outgoing, offset);
            assert_ne!(pkid, old, "delivery {offset} reused the unacknowledged id");
            assert_eq!(outgoing.register_ack(pkid), Some(()));
        }
        assert_eq!(outgoing.inflight_buffer.len(), 1);
        assert_eq!(outgoing.register_ack(old), Some(()));
        assert!(outgoing.inflight_buffer.is_empty());
    }

    /// MQTT-2.2.1-3 for QoS 2: an id whose PUBREL awaits its PUBCOMP is still in use;
    /// after the PUBCOMP it may be handed out again.
    #[test]
    fn mqtt_2_2_1_3_a_packet_id_awaiting_pubcomp_is_not_reused() {
        let (mut outgoing, _rx) = Outgoing::new("pkids".to_owned());
        let old = deliver(&mut outgoing, 0);
        assert_eq!(outgoing.register_ack(old), Some(()));
        outgoing.register_pubrec(old);
        for offset in 1..=u64::from(MAX_PKID) + 10 {
            let pkid = deliver(&mut outgoing, offset);
            assert_ne!(
                pkid, old,
                "delivery {offset} reused the id awaiting PUBCOMP"
            );
            assert_eq!(outgoing.register_ack(pkid), Some(()));
        }
        assert_eq!(outgoing.register_pubcomp(old), Some(()));
        let reused = (1..=u64::from(MAX_PKID)).any(|offset| {
            let pkid = deliver(&mut outgoing, offset);
            outgoing.register_ack(pkid);
            pkid == old
        });
        assert!(reused, "a completed id is free again");
    }

    /// MQTT-2.2.1-3 across a resumed session (MQTT 5 4.1: the unacknowledged PUBRELs
    /// are part of the session state): the new connection's ids start over, but skip
    /// the ids of the session's PUBRELs still awaiting PUBCOMP.
    #[test]
    fn mqtt_2_2_1_3_a_resumed_sessions_pubrel_ids_are_not_reused() {
        let (mut outgoing, _rx) = Outgoing::new("pkids".to_owned());
        outgoing.unacked_pubrels = VecDeque::from([1, 2, 5]);
        let pkids: Vec<u16> = (0..4)
            .map(|offset| deliver(&mut outgoing, offset))
            .collect();
        assert_eq!(pkids, [3, 4, 6, 7]);
    }

    #[test]
    fn retransmission_map_is_calculated_accurately() {
        let (mut outgoing, _) = Outgoing::new("retransmission-test".to_string());
        let mut result = HashMap::new();

        result.insert(0, (0, 8));
        result.insert(1, (0, 1));
        result.insert(2, (1, 1));
        result.insert(3, (1, 0));

        let buf = vec![
            (1, 0, Some((0, 8))),
            (1, 0, Some((0, 10))),
            (1, 1, Some((0, 1))),
            (3, 1, Some((0, 4))),
            (2, 2, Some((1, 1))),
            (1, 2, Some((2, 6))),
            (1, 2, Some((2, 1))),
            (1, 3, Some((1, 0))),
            (1, 3, Some((1, 1))),
            (1, 3, Some((1, 3))),
            (1, 3, Some((1, 3))),
        ];

        outgoing.inflight_buffer.extend(buf);
        assert_eq!(outgoing.retransmission_map(), result);
    }

    // use super::{Outgoing, MAX_INFLIGHT};
    // use crate::protocol::{Publish, QoS};
    // use crate::router::Forward;
    // use crate::Notification;
    //
    // fn publishes(count: usize) -> impl Iterator<Item = Forward> {
    //     (1..=count).map(|v| {
    //         let publish = Publish {
    //             dup: false,
    //             retain: false,
    //             pkid: 0,
    //             qos: QoS::AtLeastOnce,
    //             topic: "hello/world".into(),
    //             payload: vec![1, 2, 3].into(),
    //         };
    //
    //         Forward {
    //             cursor: (0, v as u64),
    //             publish,
    //             size: 0,
    //         }
    //     })
    // }
    //
    // #[test]
    // fn inflight_ring_buffer_pushes_correctly() {
    //     let count = MAX_INFLIGHT as usize;
    //     let (mut outgoing, _rx) = Outgoing::new("hello".to_owned());
    //     outgoing.push_forwards(publishes(count), 1, 3);
    //
    //     // Index 1 = (0, 1), Index 99 = (0, 99), Index 0 = (0, 100)
    //     assert_eq!(outgoing.inflight_buffer[0].unwrap().1, (0, count as u64));
    //     for i in 1..count {
    //         assert_eq!(outgoing.inflight_buffer[i].unwrap().1, (0, i as u64));
    //     }
    //
    //     // Outgoing publish pkids are as expected
    //     for (i, o) in outgoing.data_buffer.lock().iter().enumerate() {
    //         let pkid = match &o {
    //             Notification::Forward(f) => f.publish.pkid,
    //             _ => unreachable!(),
    //         };
    //
    //         assert_eq!(pkid, i as u16 + 1);
    //     }
    // }
    //
    // #[test]
    // fn inflight_ring_buffer_pops_correctly() {
    //     let (mut outgoing, _rx) = Outgoing::new("hello".to_owned());
    //     outgoing.push_forwards(publishes(MAX_INFLIGHT as usize), 1, 3);
    //
    //     for pkid in 1..=MAX_INFLIGHT {
    //         let (unsolicited, outoforder) = outgoing.register_ack(pkid);
    //         assert_eq!(unsolicited, false);
    //         assert_eq!(outoforder, false);
    //     }
    // }
}
