//! The limits the gate announces to an MQTT 5 client in CONNACK (MQTT 5 3.2.2.3) and
//! enforces, so a stock client that honours them is never disconnected for them:
//!
//! * Maximum Packet Size: the role's `max_payload_bytes` plus [`PACKET_HEADROOM`] for
//!   the fixed header, topic, packet id and properties. It is the whole size check of
//!   an MQTT 5 connection from the CONNECT on (the frame limit, see
//!   `GateSession::max_packet`): a larger packet gets DISCONNECT 0x95 (MQTT-3.2.2-15),
//!   one of that size passes. MQTT 3.1.1 cannot announce a limit; there the payload
//!   itself is checked.
//! * Receive Maximum: [`RECEIVE_MAXIMUM`] QoS 1 and 2 PUBLISHes of the client that
//!   rumqttd has not completed (no PUBACK, PUBCOMP, or PUBREC with a reason of 0x80 or
//!   more passed back to the client yet). rumqttd itself holds unreleased QoS 2
//!   messages without a bound; the gate counts and a client above the limit gets
//!   DISCONNECT 0x93 (MQTT 5 3.3.4, 4.9).
//! * Topic Alias Maximum: rumqttd's [`TOPIC_ALIAS_MAXIMUM`](crate::embedded::TOPIC_ALIAS_MAXIMUM),
//!   which bounds the gate's alias table too (`publish`).
//!
//! Before the CONNACK (a client need not wait for it, MQTT 5 3.1.4) the client may
//! assume the standard's defaults: Receive Maximum 65,535 (3.2.2.3.3) and no Maximum
//! Packet Size (3.2.2.3.6). The gate counts in-flight PUBLISHes from the CONNECT on but
//! holds them to 65,535 until the CONNACK has gone out ([`Announced`]), then to what it
//! announced (a client told the limit waits until fewer are in flight). No server can
//! take packets of any size, so for the size the gate applies the limit it is about to
//! announce from the CONNECT on: never stricter before the CONNACK than after it (the
//! 3.1.1 payload check does not apply to MQTT 5).

use rumqttc::v5::mqttbytes::v5;
use vitalmq_audit::{Decision, Event};

use super::frame::{Frame, kind};
use super::reply;
use super::session::{CloseReason, GateSession, Output};
use crate::authz::{Kind as _, kind as decision};

/// Room for everything but the payload in a PUBLISH of the largest payload a role may
/// send: fixed header (5), topic (2 + its length), packet id (2), properties (user
/// properties, response topic, correlation data, content type...).
pub(super) const PACKET_HEADROOM: usize = 1024;

/// Most QoS 1 and 2 PUBLISHes a client may have unacknowledged towards the gate. Above
/// the in-flight window any of our clients uses (device-sim gateways 96, rumqttc's
/// default 100), well below what one connection may make rumqttd hold.
pub(super) const RECEIVE_MAXIMUM: u16 = 1000;

/// The largest packet size MQTT can express (a remaining length of 268,435,455 plus a
/// five-byte fixed header).
const MQTT_MAX_PACKET: usize = 268_435_460;

/// What the MQTT 5 CONNACK the client got announced: the limits enforced from then on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Announced {
    pub(super) max_packet: usize,
    pub(super) receive_max: u16,
}

/// The Maximum Packet Size announced for a role whose payload limit is `max_payload`.
pub(super) fn max_packet_size(max_payload: usize) -> u32 {
    let size = max_payload
        .saturating_add(PACKET_HEADROOM)
        .min(MQTT_MAX_PACKET);
    u32::try_from(size).unwrap_or(u32::MAX)
}

impl GateSession {
    /// The Receive Maximum the client must keep to now: the announced one once the
    /// CONNACK has gone out, the standard's default of 65,535 before.
    fn receive_maximum(&self) -> u16 {
        self.announced.map_or(u16::MAX, |a| a.receive_max)
    }

    /// Counts an MQTT 5 QoS 1 or 2 PUBLISH (packet id `pkid`) towards the Receive
    /// Maximum; false when it is one too many (the connection is then closed with
    /// DISCONNECT 0x93 and an audit record). A packet id already counted (a
    /// retransmission) is not counted again.
    pub(super) fn admit_inbound(&mut self, pkid: u16, out: &mut Vec<Output>) -> bool {
        if self.inbound_unacked.contains(&pkid) {
            return true;
        }
        let receive_maximum = self.receive_maximum();
        if self.inbound_unacked.len() < usize::from(receive_maximum) {
            self.inbound_unacked.insert(pkid);
            return true;
        }
        out.push(Output::ToClient(reply::disconnect_v5(
            v5::DisconnectReasonCode::ReceiveMaximumExceeded,
        )));
        let record = self
            .record(Event::ConnectionClosed)
            .action(decision::Publish::ACTION)
            .decision(Decision::Deny)
            .reason("receive_maximum_exceeded")
            .detail("receive_maximum", receive_maximum);
        let _ = self.audit.record(record);
        self.close(
            out,
            CloseReason::new(
                "receive_maximum_exceeded",
                format!("more than {receive_maximum} unacknowledged QoS 1/2 PUBLISHes"),
            ),
        );
        false
    }

    /// An acknowledgement from rumqttd on its way to the client ends the flow of a
    /// client PUBLISH: PUBACK, PUBCOMP, or PUBREC with a failure reason (0x80 or more).
    pub(super) fn release_inbound(&mut self, frame: &Frame) {
        let done = match frame.packet_type() {
            kind::PUBACK | kind::PUBCOMP => true,
            // The reason code follows the packet id; absent means success.
            kind::PUBREC => frame
                .bytes()
                .get(frame.header_len() + 2)
                .is_some_and(|reason| *reason >= 0x80),
            _ => false,
        };
        if done && let Some(pkid) = frame.ack_packet_id() {
            self.inbound_unacked.remove(&pkid);
        }
    }

    /// How many client PUBLISHes count towards the Receive Maximum now.
    #[cfg(test)]
    pub(super) fn inbound_in_flight(&self) -> usize {
        self.inbound_unacked.len()
    }
}
