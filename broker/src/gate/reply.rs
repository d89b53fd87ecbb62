//! Packets the gate writes itself: refusals the broker never sees, and acknowledgements
//! for what the gate decided on its own. Each returns the encoded bytes.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

use super::frame::Version;

/// Encoding a packet rumqttc parsed or the gate built failed (a field beyond what the
/// protocol can carry).
#[derive(Debug, thiserror::Error)]
pub(crate) enum EncodeError {
    #[error(transparent)]
    V311(#[from] rumqttc::mqttbytes::Error),
    #[error(transparent)]
    V5(#[from] rumqttc::v5::mqttbytes::Error),
}

fn encode<E: std::fmt::Debug>(f: impl FnOnce(&mut BytesMut) -> Result<usize, E>) -> Bytes {
    let mut buf = BytesMut::with_capacity(16);
    // Encoding a fixed, small control packet into a growable buffer cannot fail.
    f(&mut buf).expect("encoding a small control packet");
    buf.freeze()
}

/// CONNACK refusing a connection: 0x05 not authorized (3.1.1), 0x87 (5).
pub(super) fn connack_not_authorized(version: Version) -> Bytes {
    connack(
        version,
        v4::ConnectReturnCode::NotAuthorized,
        v5::ConnectReturnCode::NotAuthorized,
    )
}

/// CONNACK refusing a client id: 0x02 identifier rejected (3.1.1), 0x85 (5).
pub(super) fn connack_identifier_rejected(version: Version) -> Bytes {
    connack(
        version,
        v4::ConnectReturnCode::BadClientId,
        v5::ConnectReturnCode::ClientIdentifierNotValid,
    )
}

/// CONNACK refusing a connection the gate cannot audit: 0x03 server unavailable
/// (3.1.1), 0x88 (5).
pub(super) fn connack_unavailable(version: Version) -> Bytes {
    connack(
        version,
        v4::ConnectReturnCode::ServiceUnavailable,
        v5::ConnectReturnCode::ServerUnavailable,
    )
}

/// CONNACK for an MQTT 5 CONNECT asking for enhanced authentication we do not offer.
pub(super) fn connack_bad_auth_method() -> Bytes {
    connack_v5(v5::ConnectReturnCode::BadAuthenticationMethod)
}

fn connack(version: Version, v311: v4::ConnectReturnCode, v5: v5::ConnectReturnCode) -> Bytes {
    match version {
        Version::V311 => encode(|b| v4::ConnAck::new(v311, false).write(b)),
        Version::V5 => connack_v5(v5),
    }
}

fn connack_v5(code: v5::ConnectReturnCode) -> Bytes {
    encode(|b| {
        v5::ConnAck {
            session_present: false,
            code,
            properties: None,
        }
        .write(b)
    })
}

/// SUBACK with one code per requested filter: `None` marks a denied filter (0x80 in
/// 3.1.1, 0x87 not authorized in 5), `Some` carries the broker's code for a forwarded one.
pub(super) fn suback_v311(pkid: u16, codes: Vec<v4::SubscribeReasonCode>) -> Bytes {
    encode(|b| v4::SubAck::new(pkid, codes).write(b))
}

pub(super) fn suback_v5(
    pkid: u16,
    codes: Vec<v5::SubscribeReasonCode>,
    properties: Option<v5::SubAckProperties>,
) -> Bytes {
    encode(|b| {
        v5::SubAck {
            pkid,
            return_codes: codes,
            properties,
        }
        .write(b)
    })
}

pub(super) fn unsuback_v311(pkid: u16) -> Bytes {
    encode(|b| v4::UnsubAck::new(pkid).write(b))
}

pub(super) fn unsuback_v5(
    pkid: u16,
    reasons: Vec<v5::UnsubAckReason>,
    properties: Option<v5::UnsubAckProperties>,
) -> Bytes {
    encode(|b| {
        v5::UnsubAck {
            pkid,
            reasons,
            properties,
        }
        .write(b)
    })
}

/// Answers a QoS 1 or 2 PUBLISH the gate will not route. In MQTT 5 with a reason
/// (0x87 not authorized, 0x97 quota exceeded); in 3.1.1 a plain acknowledgement
/// (acknowledge-and-drop policy).
pub(super) fn publish_refused(
    version: Version,
    qos2: bool,
    pkid: u16,
    reason: PublishRefusal,
) -> Bytes {
    match (version, qos2) {
        (Version::V311, false) => encode(|b| v4::PubAck::new(pkid).write(b)),
        (Version::V311, true) => encode(|b| v4::PubRec::new(pkid).write(b)),
        (Version::V5, false) => encode(|b| {
            let mut ack = v5::PubAck::new(pkid, None);
            ack.reason = match reason {
                PublishRefusal::NotAuthorized => v5::PubAckReason::NotAuthorized,
                PublishRefusal::QuotaExceeded => v5::PubAckReason::QuotaExceeded,
            };
            ack.write(b)
        }),
        (Version::V5, true) => encode(|b| {
            let mut rec = v5::PubRec::new(pkid, None);
            rec.reason = match reason {
                PublishRefusal::NotAuthorized => v5::PubRecReason::NotAuthorized,
                PublishRefusal::QuotaExceeded => v5::PubRecReason::QuotaExceeded,
            };
            rec.write(b)
        }),
    }
}

/// Why a PUBLISH is answered by the gate instead of routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PublishRefusal {
    NotAuthorized,
    QuotaExceeded,
}

/// PUBCOMP ending the QoS 2 flow of a PUBLISH the gate acknowledged and dropped.
pub(super) fn pubcomp(version: Version, pkid: u16) -> Bytes {
    match version {
        Version::V311 => encode(|b| v4::PubComp::new(pkid).write(b)),
        Version::V5 => encode(|b| v5::PubComp::new(pkid, None).write(b)),
    }
}

/// PUBCOMP for a PUBREL whose packet id is unknown here: MQTT 5 says so (0x92, Packet
/// Identifier not found); MQTT 3.1.1 answers every PUBREL with a plain PUBCOMP (4.3.3).
pub(super) fn pubcomp_not_found(version: Version, pkid: u16) -> Bytes {
    match version {
        Version::V311 => encode(|b| v4::PubComp::new(pkid).write(b)),
        Version::V5 => encode(|b| {
            v5::PubComp {
                pkid,
                reason: v5::PubCompReason::PacketIdentifierNotFound,
                properties: None,
            }
            .write(b)
        }),
    }
}

/// MQTT 5 DISCONNECT from the server with a reason; 3.1.1 has none (the socket closes).
pub(super) fn disconnect_v5(reason: v5::DisconnectReasonCode) -> Bytes {
    // Written by hand: rumqttc's `Disconnect::write` without properties counts a
    // remaining length of 1 but writes 2 bytes (the reason and a property length), so a
    // client reads a stray byte after it. This is remaining length 2: the reason and an
    // empty property list (MQTT 5 3.14.2).
    Bytes::from(vec![0xE0, 0x02, reason as u8, 0x00])
}
