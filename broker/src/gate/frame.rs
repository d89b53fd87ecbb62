//! Framing client and broker byte streams into whole MQTT packets, with a size cap
//! checked from the fixed header before a packet is buffered.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes as v4;
use rumqttc::v5::mqttbytes::v5;

/// The MQTT protocol version of a connection, fixed by its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    V311,
    V5,
}

impl Version {
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::V311 => "3.1.1",
            Self::V5 => "5",
        }
    }
}

/// One complete packet: its type nibble, its parsed fixed header and its bytes.
#[derive(Debug, Clone)]
pub(crate) enum Frame {
    V311 {
        header: v4::FixedHeader,
        bytes: Bytes,
    },
    V5 {
        header: v5::FixedHeader,
        bytes: Bytes,
    },
}

impl Frame {
    /// The MQTT control packet type (1 = CONNECT ... 15 = AUTH).
    pub(crate) fn packet_type(&self) -> u8 {
        self.bytes()[0] >> 4
    }

    pub(crate) fn bytes(&self) -> &Bytes {
        match self {
            Self::V311 { bytes, .. } | Self::V5 { bytes, .. } => bytes,
        }
    }

    /// Length of the fixed header: the type byte and the 1 to 4 bytes of the remaining
    /// length (the frame was validated by [`next_frame`]).
    pub(crate) fn header_len(&self) -> usize {
        2 + self
            .bytes()
            .iter()
            .skip(1)
            .take(4)
            .take_while(|b| *b & 0x80 != 0)
            .count()
    }

    /// The big-endian two bytes at `at`, if the packet is that long.
    pub(crate) fn u16_at(&self, at: usize) -> Option<u16> {
        self.bytes()
            .get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    /// The packet id of an acknowledgement (PUBACK..PUBCOMP): right after the header.
    pub(crate) fn ack_packet_id(&self) -> Option<u16> {
        self.u16_at(self.header_len())
    }
}

/// Why a stream could not be framed; the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("packet of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("malformed MQTT: {0}")]
    Malformed(String),
    #[error("unsupported MQTT protocol level {0} (3.1.1 and 5 are supported)")]
    UnsupportedLevel(u8),
}

/// Packet type numbers used by the gate.
pub(crate) mod kind {
    pub(crate) const CONNECT: u8 = 1;
    pub(crate) const CONNACK: u8 = 2;
    pub(crate) const PUBLISH: u8 = 3;
    pub(crate) const PUBACK: u8 = 4;
    pub(crate) const PUBREC: u8 = 5;
    pub(crate) const PUBREL: u8 = 6;
    pub(crate) const PUBCOMP: u8 = 7;
    pub(crate) const SUBSCRIBE: u8 = 8;
    pub(crate) const SUBACK: u8 = 9;
    pub(crate) const UNSUBSCRIBE: u8 = 10;
    pub(crate) const UNSUBACK: u8 = 11;
    pub(crate) const PINGREQ: u8 = 12;
    pub(crate) const PINGRESP: u8 = 13;
    pub(crate) const DISCONNECT: u8 = 14;
    pub(crate) const AUTH: u8 = 15;
}

/// Splits the next complete packet off `buf`, or `None` when more bytes are needed.
/// `max_packet` bounds the whole packet, fixed header included (MQTT 5's Maximum Packet
/// Size, 3.1.2.11.4); the codecs bound the remaining length, checked from the header
/// before anything is buffered, so at most the few header bytes more are read before
/// the whole size is checked.
pub(crate) fn next_frame(
    buf: &mut BytesMut,
    version: Version,
    max_packet: usize,
) -> Result<Option<Frame>, FrameError> {
    let frame = remaining_within(buf, version, max_packet)?;
    match frame {
        Some(f) if f.bytes().len() > max_packet => Err(FrameError::TooLarge(f.bytes().len())),
        other => Ok(other),
    }
}

/// [`next_frame`] with only the codecs' remaining-length check.
fn remaining_within(
    buf: &mut BytesMut,
    version: Version,
    max_packet: usize,
) -> Result<Option<Frame>, FrameError> {
    if buf.is_empty() {
        return Ok(None);
    }
    match version {
        Version::V311 => match v4::check(buf.iter(), max_packet) {
            Ok(header) => {
                let bytes = buf.split_to(header.frame_length()).freeze();
                Ok(Some(Frame::V311 { header, bytes }))
            }
            Err(v4::Error::InsufficientBytes(_)) => Ok(None),
            Err(v4::Error::PayloadSizeLimitExceeded(n)) => Err(FrameError::TooLarge(n)),
            Err(e) => Err(FrameError::Malformed(e.to_string())),
        },
        Version::V5 => {
            let max = u32::try_from(max_packet).unwrap_or(u32::MAX);
            match v5::check(buf.iter(), Some(max)) {
                Ok(header) => {
                    let bytes = buf.split_to(header.frame_length()).freeze();
                    Ok(Some(Frame::V5 { header, bytes }))
                }
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                Err(rumqttc::v5::mqttbytes::Error::PayloadSizeLimitExceeded {
                    pkt_size, ..
                }) => Err(FrameError::TooLarge(pkt_size)),
                Err(e) => Err(FrameError::Malformed(e.to_string())),
            }
        }
    }
}

/// Checks what a client's packet says about itself in its fixed header, which the codecs
/// do not: the flag bits every packet type fixes (MQTT 3.1.1 2.2.2 and MQTT 5 2.1.3:
/// `0010` for PUBREL, SUBSCRIBE and UNSUBSCRIBE, `0000` for the others except
/// PUBLISH), a PUBLISH's QoS (never 3) and DUP (never with QoS 0, MQTT-3.3.1-2), and
/// the remaining length of packets whose length the standard fixes (PINGREQ 0; in
/// 3.1.1 DISCONNECT 0 and PUBACK..PUBCOMP 2; in 5 PUBACK..PUBCOMP at least 2). Either
/// standard says to close the connection on such a packet (MQTT 5: Malformed Packet).
pub(crate) fn check_fixed_header(frame: &Frame, version: Version) -> Result<(), FrameError> {
    let bytes = frame.bytes();
    let packet_type = frame.packet_type();
    let flags = bytes[0] & 0x0f;
    // The frame is exactly one packet: the fixed header, then the rest.
    let remaining = bytes.len().saturating_sub(frame.header_len());
    let malformed = |what: String| Err(FrameError::Malformed(what));
    match packet_type {
        kind::PUBLISH => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                return malformed("PUBLISH with QoS 3".into());
            }
            if qos == 0 && flags & 0b1000 != 0 {
                return malformed("PUBLISH with QoS 0 and DUP set".into());
            }
        }
        kind::PUBREL | kind::SUBSCRIBE | kind::UNSUBSCRIBE if flags != 0b0010 => {
            return malformed(format!(
                "packet type {packet_type} with fixed-header flags {flags:04b}, not 0010"
            ));
        }
        kind::PUBREL | kind::SUBSCRIBE | kind::UNSUBSCRIBE => {}
        _ if flags != 0 => {
            return malformed(format!(
                "packet type {packet_type} with fixed-header flags {flags:04b}, not 0000"
            ));
        }
        _ => {}
    }
    let fixed_len = match (packet_type, version) {
        (kind::PINGREQ, _) => Some(0),
        (kind::DISCONNECT, Version::V311) => Some(0),
        (kind::PUBACK..=kind::PUBCOMP, Version::V311) => Some(2),
        _ => None,
    };
    if let Some(want) = fixed_len
        && remaining != want
    {
        return malformed(format!(
            "packet type {packet_type} with remaining length {remaining}, not {want}"
        ));
    }
    if matches!(packet_type, kind::PUBACK..=kind::PUBCOMP) && remaining < 2 {
        return malformed(format!(
            "packet type {packet_type} without a packet identifier"
        ));
    }
    Ok(())
}

/// Reads the protocol level from a CONNECT at the start of `buf` without consuming it:
/// `None` until enough bytes have arrived.
pub(crate) fn connect_version(buf: &[u8]) -> Result<Option<Version>, FrameError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first != 0x10 {
        return Err(FrameError::Malformed(
            "the first packet must be CONNECT".into(),
        ));
    }
    // Remaining length: 1 to 4 bytes of 7-bit groups.
    let mut at = 1;
    loop {
        let Some(&b) = buf.get(at) else {
            return Ok(None);
        };
        at += 1;
        if b & 0x80 == 0 {
            break;
        }
        if at > 4 {
            return Err(FrameError::Malformed("bad remaining length".into()));
        }
    }
    // Protocol name "MQTT" (length-prefixed), then the level.
    let Some(header) = buf.get(at..at + 7) else {
        return Ok(None);
    };
    if &header[..6] != b"\x00\x04MQTT" {
        // MQTT 3.1 used "MQIsdp"; anything else is not MQTT we speak.
        return Err(FrameError::UnsupportedLevel(
            if header.starts_with(b"\x00\x06MQIsdp") {
                3
            } else {
                0
            },
        ));
    }
    match header[6] {
        4 => Ok(Some(Version::V311)),
        5 => Ok(Some(Version::V5)),
        other => Err(FrameError::UnsupportedLevel(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(bytes: &[u8], version: Version) -> Result<(), FrameError> {
        let mut buf = BytesMut::from(bytes);
        let frame = next_frame(&mut buf, version, 1 << 16)
            .expect("frames")
            .expect("one whole packet");
        check_fixed_header(&frame, version)
    }

    #[test]
    fn fixed_headers_are_checked_as_the_standard_fixes_them() {
        use Version::{V5, V311};
        let publish = |first: u8| vec![first, 0x05, 0x00, 0x01, b't', 0x00, 0x01];
        for (bytes, version, ok) in [
            // PUBLISH: QoS 0..2 with or without DUP (not with QoS 0), never QoS 3.
            (publish(0x30), V311, true),
            (publish(0x31), V311, true),
            (publish(0x3A), V5, true),
            (publish(0x38), V311, false),
            (publish(0x38), V5, false),
            (publish(0x36), V311, false),
            // PUBREL, SUBSCRIBE, UNSUBSCRIBE need 0010; the rest 0000.
            (vec![0x62, 0x02, 0x00, 0x01], V311, true),
            (vec![0x60, 0x02, 0x00, 0x01], V311, false),
            (vec![0x82, 0x04, 0x00, 0x01, 0x00, 0x00], V311, true),
            (vec![0x80, 0x04, 0x00, 0x01, 0x00, 0x00], V5, false),
            (vec![0xA3, 0x03, 0x00, 0x01, 0x00], V311, false),
            (vec![0x41, 0x02, 0x00, 0x01], V311, false),
            (vec![0xC1, 0x00], V5, false),
            // Lengths: PINGREQ 0; 3.1.1 DISCONNECT 0 and PUBACK..PUBCOMP 2; MQTT 5
            // acknowledgements at least the packet id, DISCONNECT with a reason.
            (vec![0xC0, 0x00], V311, true),
            (vec![0xC0, 0x01, 0x00], V311, false),
            (vec![0xC0, 0x01, 0x00], V5, false),
            (vec![0xE0, 0x00], V311, true),
            (vec![0xE0, 0x01, 0x00], V311, false),
            (vec![0xE0, 0x02, 0x00, 0x00], V5, true),
            (vec![0x40, 0x03, 0x00, 0x01, 0x00], V311, false),
            (vec![0x40, 0x03, 0x00, 0x01, 0x10], V5, true),
            (vec![0x40, 0x01, 0x00], V5, false),
        ] {
            assert_eq!(
                checked(&bytes, version).is_ok(),
                ok,
                "{bytes:02x?} {version:?}"
            );
        }
    }
}
