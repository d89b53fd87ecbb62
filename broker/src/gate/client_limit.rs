//! What the gate writes to an MQTT 5 client, held to the client's own Maximum Packet
//! Size (MQTT 5 3.1.2.11.4, read from its CONNECT) and to the order the standard fixes.
//!
//! rumqttd measures the packets it writes against that limit (vendored patch 14), but
//! the gate writes packets of its own (refusals, acknowledgements) and enlarges some of
//! rumqttd's after they were measured: the CONNACK (the limits the gate announces, an
//! assigned client id) and a SUBACK or UNSUBACK whose refused filters are merged back.
//! Every packet for the client passes [`GateSession::hold_to_client`]:
//!
//! * One larger than the client allows (MQTT-3.1.2-24) is re-encoded without its Reason
//!   String and User Properties, which the standard lets a sender leave out for that
//!   reason (MQTT-3.1.2-25, MQTT-3.2.2-19/20, MQTT-3.4.2-2/3, MQTT-3.9.2-1/2 ...).
//! * One that still does not fit is discarded without being sent (MQTT-3.1.2-25), as
//!   rumqttd does with its own; the connection goes on. A SUBACK discarded this way
//!   leaves its SUBSCRIBE unanswered, which is what the standard prescribes.
//! * A CONNACK cannot be discarded and the connection go on, and no DISCONNECT may come
//!   before it: a successful CONNACK that does not fit closes the connection without
//!   a word and is audited as a refusal (`connack_too_large`, see `connect`). Only a
//!   client announcing a limit below the few dozen bytes of a CONNACK meets this.
//! * A DISCONNECT before a successful CONNACK is not sent (MQTT-3.14.0-1): a
//!   connection the gate ends before the client saw its CONNACK is just closed, as the
//!   standard says (MQTT 5 4.13.1).
//!
//! PUBLISHes are rumqttd's deliveries, which it already measured: the gate passes them
//! as they are (discarding one would leave rumqttd waiting for its acknowledgement).

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5;

use super::frame::kind;
use super::session::{CloseReason, GateSession, Output};

/// A packet for the client that does not fit its Maximum Packet Size even without its
/// optional properties.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TooLarge {
    pub(super) size: usize,
    pub(super) limit: usize,
}

/// `packet`, if need be without its Reason String and User Properties, within `limit`
/// (`None`: the client set none).
pub(super) fn fit(packet: Bytes, limit: Option<usize>) -> Result<Bytes, TooLarge> {
    let Some(limit) = limit else {
        return Ok(packet);
    };
    if packet.len() <= limit {
        return Ok(packet);
    }
    let too_large = TooLarge {
        size: packet.len(),
        limit,
    };
    match without_optional_properties(&packet) {
        Some(smaller) if smaller.len() <= limit => Ok(smaller),
        _ => Err(too_large),
    }
}

/// The MQTT 5 packet re-encoded without its Reason String and User Properties; `None`
/// for a packet the gate does not shrink (PUBLISH) or cannot read.
fn without_optional_properties(packet: &Bytes) -> Option<Bytes> {
    fn clear(reason: &mut Option<String>, user: &mut Vec<(String, String)>) {
        *reason = None;
        user.clear();
    }
    let mut packet = v5::Packet::read(&mut BytesMut::from(&packet[..]), None).ok()?;
    match &mut packet {
        v5::Packet::ConnAck(p) => {
            let props = p.properties.as_mut()?;
            clear(&mut props.reason_string, &mut props.user_properties);
        }
        v5::Packet::PubAck(p) => {
            let props = p.properties.as_mut()?;
            clear(&mut props.reason_string, &mut props.user_properties);
        }
        v5::Packet::PubRec(p) => {
            let props = p.properties.as_mut()?;
            clear(&mut props.reason_string, &mut props.user_properties);
        }
        v5::Packet::PubRel(p) => {
            let props = p.properties.as_mut()?;
            clear(&mut props.reason_string, &mut props.user_properties);
        }
        v5::Packet::PubComp(p) => {
            let props = p.properties.as_mut()?;
            clear(&mut props.reason_string, &mut props.user_properties);
        }
        v5::Packet::SubAck(p) => {
            let props = p.properties.as_mut()?;
            clear(&mut props.reason_string, &mut props.user_properties);
        }
        v5::Packet::UnsubAck(p) => {
            let props = p.properties.as_mut()?;
            clear(&mut props.reason_string, &mut props.user_properties);
        }
        v5::Packet::Disconnect(p) => {
            // Kept as `Some` even when empty: rumqttc miscounts a DISCONNECT with a
            // reason and no properties (see `reply::disconnect_v5`).
            let props = p.properties.as_mut()?;
            clear(&mut props.reason_string, &mut props.user_properties);
        }
        _ => return None,
    }
    let mut buf = BytesMut::new();
    packet.write(&mut buf, None).ok()?;
    Some(buf.freeze())
}

impl GateSession {
    /// Holds the packets for the client in `out[from..]` to its Maximum Packet Size
    /// and lets no DISCONNECT precede a successful CONNACK (see the module docs).
    pub(super) fn hold_to_client(&mut self, out: &mut Vec<Output>, from: usize) {
        // Most calls carry nothing to look at (forwarded PUBLISHes, deliveries).
        let needs_a_look = out.get(from..).unwrap_or_default().iter().any(|output| {
            let Output::ToClient(packet) = output else {
                return false;
            };
            match packet.first().map_or(0, |b| b >> 4) {
                kind::PUBLISH => false,
                kind::CONNACK => true,
                kind::DISCONNECT if !self.connack_to_client => true,
                _ => self.client_max_packet.is_some_and(|l| packet.len() > l),
            }
        });
        if !needs_a_look {
            return;
        }
        let mut connack_too_large = None;
        let tail = out.split_off(from);
        for output in tail {
            let Output::ToClient(packet) = output else {
                out.push(output);
                continue;
            };
            let packet_type = packet.first().map_or(0, |b| b >> 4);
            if packet_type == kind::PUBLISH {
                out.push(Output::ToClient(packet));
                continue;
            }
            if packet_type == kind::DISCONNECT && !self.connack_to_client {
                tracing::debug!(peer.id = %self.peer.spiffe.id, "no DISCONNECT before CONNACK: closed without one");
                continue;
            }
            match fit(packet, self.client_max_packet) {
                Ok(packet) => {
                    if packet_type == kind::CONNACK && connack_succeeded(&packet) {
                        self.connack_to_client = true;
                    }
                    out.push(Output::ToClient(packet));
                }
                Err(too_large) => {
                    metrics::counter!("vitalmq_gate_oversize_discarded_total").increment(1);
                    tracing::info!(
                        peer.id = %self.peer.spiffe.id,
                        packet_type,
                        size = too_large.size,
                        limit = too_large.limit,
                        "packet larger than the client's Maximum Packet Size: not sent"
                    );
                    if packet_type == kind::CONNACK {
                        connack_too_large = Some(too_large);
                    }
                }
            }
        }
        if let Some(too_large) = connack_too_large
            && !self.is_closed()
        {
            let detail = format!(
                "CONNACK of {} bytes, client maximum {}",
                too_large.size, too_large.limit
            );
            self.close(out, CloseReason::new("connack_too_large", detail));
        }
    }
}

/// A CONNACK whose code is below 0x80 (the byte after the flags, which follow the
/// fixed header: the same position in both versions).
fn connack_succeeded(connack: &Bytes) -> bool {
    let length_bytes = connack
        .iter()
        .skip(1)
        .take(4)
        .take_while(|b| *b & 0x80 != 0)
        .count()
        + 1;
    connack
        .get(1 + length_bytes + 1)
        .is_some_and(|code| *code < 0x80)
}
