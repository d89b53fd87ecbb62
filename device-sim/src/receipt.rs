//! Receipts (SPEC section 4): the bridge's word that every message of a device up to and
//! including `(epoch, seq)` is durably recorded (or reported lost), published QoS 1 to
//! `devices/{id}/ack` as the CBOR map `{"epoch": uint, "seq": uint}`.
//!
//! Decoding is strict where ambiguity could free messages by mistake: one definite-length
//! CBOR item and nothing after it (the same well-formedness scan the envelope uses), a
//! map with text keys, no key twice, `epoch` and `seq` both present as unsigned
//! integers. Other keys are ignored, so the bridge may add fields later. A receipt that
//! fails any of this is refused as a whole and frees nothing.

use ciborium::value::Value;

use crate::ring::Key;

/// A receipt is a few bytes; anything much larger is not one.
pub const MAX_RECEIPT_BYTES: usize = 256;

/// Why a payload on `devices/{id}/ack` is not a receipt. Describes structure only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiptError {
    #[error("receipt has {0} bytes, more than {MAX_RECEIPT_BYTES}")]
    Oversized(usize),
    #[error("receipt is not one strict CBOR item: {0}")]
    Cbor(String),
    #[error("receipt is not a CBOR map")]
    NotAMap,
    #[error("receipt map has a key that is not a text string")]
    NonTextKey,
    #[error("receipt map repeats the key `{0}`")]
    DuplicateKey(String),
    #[error("receipt lacks `{0}`")]
    Missing(&'static str),
    #[error("receipt field `{0}` is not an unsigned integer")]
    NotUint(&'static str),
}

/// Decodes a receipt payload into the key it covers through.
pub fn decode(bytes: &[u8]) -> Result<Key, ReceiptError> {
    if bytes.len() > MAX_RECEIPT_BYTES {
        return Err(ReceiptError::Oversized(bytes.len()));
    }
    vitalmq_envelope::cbor::check_single_item(bytes)
        .map_err(|e| ReceiptError::Cbor(e.to_string()))?;
    let value: Value =
        ciborium::de::from_reader(bytes).map_err(|e| ReceiptError::Cbor(e.to_string()))?;
    let Value::Map(entries) = value else {
        return Err(ReceiptError::NotAMap);
    };
    let (mut epoch, mut seq) = (None, None);
    let mut seen: Vec<String> = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        let Value::Text(key) = key else {
            return Err(ReceiptError::NonTextKey);
        };
        if seen.contains(&key) {
            return Err(ReceiptError::DuplicateKey(
                key.escape_debug().take(32).collect(),
            ));
        }
        match key.as_str() {
            "epoch" => epoch = Some(uint(&value).ok_or(ReceiptError::NotUint("epoch"))?),
            "seq" => seq = Some(uint(&value).ok_or(ReceiptError::NotUint("seq"))?),
            _ => {}
        }
        seen.push(key);
    }
    Ok(Key {
        epoch: epoch.ok_or(ReceiptError::Missing("epoch"))?,
        seq: seq.ok_or(ReceiptError::Missing("seq"))?,
    })
}

/// Encodes a receipt as the bridge sends it: `{"epoch": e, "seq": s}`.
pub fn encode(key: Key) -> Vec<u8> {
    let map = Value::Map(vec![
        (
            Value::Text("epoch".into()),
            Value::Integer(key.epoch.into()),
        ),
        (Value::Text("seq".into()), Value::Integer(key.seq.into())),
    ]);
    let mut out = Vec::with_capacity(24);
    // Writing a Value into a Vec cannot fail: the writer is infallible and every Value
    // variant has an encoding.
    ciborium::ser::into_writer(&map, &mut out).expect("CBOR into a Vec is infallible");
    out
}

fn uint(value: &Value) -> Option<u64> {
    match value {
        Value::Integer(i) => u64::try_from(*i).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hex with optional spaces between the CBOR items, for reading.
    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn decodes_the_spec_form() {
        // {"epoch": 3, "seq": 1001}
        assert_eq!(
            decode(&hex("a26565706f636803637365711903e9")),
            Ok(Key::new(3, 1001))
        );
        // Key order does not matter; the full u64 range is allowed.
        // {"seq": 0, "epoch": 18446744073709551615}
        assert_eq!(
            decode(&hex("a2637365710065 65706f6368 1bffffffffffffffff")),
            Ok(Key::new(u64::MAX, 0))
        );
    }

    #[test]
    fn round_trips() {
        for key in [
            Key::new(0, 0),
            Key::new(1, 49),
            Key::new(u64::MAX, u64::MAX),
        ] {
            assert_eq!(decode(&encode(key)), Ok(key));
        }
    }

    #[test]
    fn ignores_unknown_keys() {
        // {"epoch": 1, "seq": 2, "lost": 0}
        assert_eq!(
            decode(&hex("a36565706f6368016373657102646c6f737400")),
            Ok(Key::new(1, 2))
        );
    }

    #[test]
    fn refuses_malformed_receipts() {
        let cases: &[(&str, ReceiptError)] = &[
            // [1, 2]
            ("820102", ReceiptError::NotAMap),
            // {"epoch": 1}
            ("a16565706f636801", ReceiptError::Missing("seq")),
            // {"seq": 1}
            ("a163736571 01", ReceiptError::Missing("epoch")),
            // {"epoch": -1, "seq": 1}
            (
                "a26565706f63682063736571 01",
                ReceiptError::NotUint("epoch"),
            ),
            // {"epoch": 1, "seq": "1"}
            (
                "a26565706f6368016373657161 31",
                ReceiptError::NotUint("seq"),
            ),
            // {"epoch": 1, "seq": 1.0}
            (
                "a265 65706f6368 01 63736571 f93c00",
                ReceiptError::NotUint("seq"),
            ),
            // {1: 1, "seq": 1}
            ("a20101 6373657101", ReceiptError::NonTextKey),
            // {"seq": 1, "seq": 2, "epoch": 1}
            (
                "a3637365710163736571 0265 65706f636801",
                ReceiptError::DuplicateKey("seq".into()),
            ),
        ];
        for (h, want) in cases {
            assert_eq!(decode(&hex(h)), Err(want.clone()), "{h}");
        }
    }

    #[test]
    fn refuses_non_strict_cbor() {
        let good = encode(Key::new(1, 2));
        // Trailing bytes.
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(matches!(decode(&trailing), Err(ReceiptError::Cbor(_))));
        // Truncated.
        assert!(matches!(
            decode(&good[..good.len() - 1]),
            Err(ReceiptError::Cbor(_))
        ));
        // Indefinite-length map {_ "epoch": 1, "seq": 2}.
        assert!(matches!(
            decode(&hex("bf6565706f63680163736571 02ff")),
            Err(ReceiptError::Cbor(_))
        ));
        // Empty, and oversized.
        assert!(matches!(decode(b""), Err(ReceiptError::Cbor(_))));
        assert_eq!(
            decode(&[0u8; MAX_RECEIPT_BYTES + 1]),
            Err(ReceiptError::Oversized(MAX_RECEIPT_BYTES + 1))
        );
    }
}
