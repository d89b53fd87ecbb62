//! The receipt message of SPEC section 4: a CBOR map `{"epoch": uint, "seq": uint}` on
//! `devices/{id}/ack`, meaning every message of the device up to and including
//! `(epoch, seq)` is durably recorded (or fell out of the window and was reported lost).

use ciborium::value::{Integer, Value};

use crate::window::ReceiptPoint;

/// Encodes a receipt.
pub fn encode(r: ReceiptPoint) -> Vec<u8> {
    let map = Value::Map(vec![
        (
            Value::Text("epoch".into()),
            Value::Integer(Integer::from(r.epoch)),
        ),
        (
            Value::Text("seq".into()),
            Value::Integer(Integer::from(r.seq)),
        ),
    ]);
    let mut out = Vec::with_capacity(24);
    // Serializing a Value into a Vec cannot fail.
    let _ = ciborium::ser::into_writer(&map, &mut out);
    out
}

/// Decodes a receipt; `None` for anything that is not exactly such a map.
pub fn decode(bytes: &[u8]) -> Option<ReceiptPoint> {
    if bytes.len() > 64 {
        return None;
    }
    let mut reader = bytes;
    let Value::Map(entries) = ciborium::de::from_reader::<Value, _>(&mut reader).ok()? else {
        return None;
    };
    if !reader.is_empty() || entries.len() != 2 {
        return None;
    }
    let field = |name: &str| {
        entries.iter().find_map(|(k, v)| match (k, v) {
            (Value::Text(t), Value::Integer(i)) if t == name => u64::try_from(*i).ok(),
            _ => None,
        })
    };
    Some(ReceiptPoint {
        epoch: field("epoch")?,
        seq: field("seq")?,
    })
}

/// The device id of a receipt topic `devices/{id}/ack`.
pub fn topic_device(topic: &str) -> Option<&str> {
    topic
        .strip_prefix("devices/")?
        .strip_suffix("/ack")
        .filter(|id| !id.contains('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_round_trip_over_the_whole_range() {
        for (epoch, seq) in [(0, 0), (5, 17), (u64::MAX, u64::MAX)] {
            let r = ReceiptPoint { epoch, seq };
            assert_eq!(decode(&encode(r)), Some(r));
        }
        // {"epoch": 5, "seq": 17} as a device decoder sees it.
        assert_eq!(
            hex::encode(encode(ReceiptPoint { epoch: 5, seq: 17 })),
            "a26565706f6368056373657111"
        );
    }

    #[test]
    fn anything_else_is_not_a_receipt() {
        for bad in [
            &b""[..],
            b"\xa0",
            b"\xa1\x65epoch\x05",
            b"\xa2\x65epoch\x05\x63seq\x20",
            b"\x00",
            b"\xa2\x65epoch\x05\x63seq\x11\x00",
        ] {
            assert_eq!(decode(bad), None, "{}", hex::encode(bad));
        }
        assert_eq!(topic_device("devices/dev-1/ack"), Some("dev-1"));
        assert_eq!(topic_device("devices/a/b/ack"), None);
    }
}
