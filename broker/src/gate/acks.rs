//! Packet ids across the gate: which QoS 1 PUBLISHes and PUBRECs rumqttd sent the
//! client, so a client PUBACK or PUBREL for an id it was never given is refused, and
//! the QoS 2 flows the gate itself acknowledged and dropped.

use super::frame::{Frame, FrameError, Version, kind};
use super::reply;
use super::session::{GateSession, Output};

impl GateSession {
    /// A client PUBACK must acknowledge a QoS 1 PUBLISH this connection delivered.
    pub(super) fn puback(&mut self, version: Version, frame: Frame, out: &mut Vec<Output>) {
        match frame.ack_packet_id() {
            Some(pkid) if self.unacked_to_client.remove(&pkid) => {
                out.push(Output::ToBroker(frame.bytes().clone()))
            }
            Some(pkid) => self.protocol_violation(
                version,
                "unknown_packet_id",
                format!("PUBACK for packet id {pkid}, which was not delivered"),
                out,
            ),
            None => self.refuse_unframeable(FrameError::Malformed("short PUBACK".into()), out),
        }
    }

    pub(super) fn pubrel(&mut self, version: Version, frame: Frame, out: &mut Vec<Output>) {
        match frame.ack_packet_id() {
            Some(pkid) if self.dropped_qos2.remove(&pkid) => {
                out.push(Output::ToClient(reply::pubcomp(version, pkid)))
            }
            // A resumed session may release what it published on an earlier connection;
            // otherwise rumqttd holds nothing under this id. A PUBREL is always answered
            // with PUBCOMP (MQTT 3.1.1 4.3.3; MQTT 5 3.7.2.1: 0x92), not a disconnect:
            // a client that lost its session state may release an id twice.
            Some(pkid) if !self.awaiting_pubrel.remove(&pkid) && self.clean_session => {
                tracing::debug!(
                    pkid,
                    "PUBREL for a packet id with no PUBREC: PUBCOMP not found"
                );
                out.push(Output::ToClient(reply::pubcomp_not_found(version, pkid)))
            }
            Some(_) => out.push(Output::ToBroker(frame.bytes().clone())),
            None => self.refuse_unframeable(FrameError::Malformed("short PUBREL".into()), out),
        }
    }

    /// Remembers the packet ids the client must acknowledge (QoS 1 PUBLISH to it) or
    /// may release (PUBREC to it), as they pass from rumqttd.
    pub(super) fn track_packet_id(&mut self, frame: &Frame) {
        let bytes = frame.bytes();
        match frame.packet_type() {
            kind::PUBLISH if bytes.first().is_some_and(|b| (b >> 1) & 0b11 == 1) => {
                // The packet id follows the length-prefixed topic.
                let header_len = frame.header_len();
                let topic_len = frame.u16_at(header_len).map_or(0, usize::from);
                if let Some(pkid) = frame.u16_at(header_len + 2 + topic_len) {
                    self.unacked_to_client.insert(pkid);
                }
            }
            kind::PUBREC => {
                if let Some(pkid) = frame.ack_packet_id() {
                    self.awaiting_pubrel.insert(pkid);
                }
            }
            _ => {}
        }
    }
}
