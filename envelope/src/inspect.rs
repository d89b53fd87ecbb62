//! Decoding a message without a key, for people debugging devices
//! (`vitalmq envelope inspect`) and for the context of a refusal.

use ciborium::value::Value;
use serde_json::Value as Json;
use sha2::{Digest as _, Sha256};

use crate::json::cbor_to_json;
use crate::refusal::{ReasonClass, Refusal};
use crate::verify::COSE_SIGN1_TAG;
use crate::{Algorithm, cbor};

/// What could be decoded of a message, without any judgement of its signature.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Inspection {
    pub size: usize,
    pub sha256: String,
    pub tagged: bool,
    pub headers: Headers,
    /// The payload as JSON when it is well-formed CBOR, else `null`.
    pub payload: Json,
    pub payload_hex: Option<String>,
    pub signature_hex: String,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Headers {
    /// `EdDSA`, `ES256`, or the raw value for anything else.
    pub alg: Json,
    /// The kid as text when it is UTF-8.
    pub kid: Option<String>,
    pub kid_hex: Option<String>,
    pub protected: Json,
    pub unprotected: Json,
}

/// Decodes headers and payload. Refuses only what cannot be taken apart at all
/// (oversized, not strict CBOR, not a four-element COSE_Sign1 array).
pub fn inspect(message: &[u8]) -> Result<Inspection, Refusal> {
    let malformed = |d: &str| Refusal::new(ReasonClass::Malformed, d);
    crate::verify::check_size(message)?;
    cbor::check_single_item(message).map_err(|e| malformed(&e.to_string()))?;
    let value: Value =
        ciborium::de::from_reader(message).map_err(|e| malformed(&format!("CBOR: {e}")))?;
    let (tagged, inner) = match value {
        Value::Tag(COSE_SIGN1_TAG, inner) => (true, *inner),
        Value::Tag(other, _) => {
            return Err(malformed(&format!(
                "CBOR tag {other} is not COSE_Sign1 (18)"
            )));
        }
        other => (false, other),
    };
    let Value::Array(items) = inner else {
        return Err(malformed("not a CBOR array"));
    };
    let [protected, unprotected, payload, signature]: [Value; 4] = items
        .try_into()
        .map_err(|_| malformed("COSE_Sign1 must have four elements"))?;
    let protected_map = match &protected {
        Value::Bytes(b) if b.is_empty() => Value::Map(vec![]),
        Value::Bytes(b) if cbor::check_single_item(b).is_ok() => {
            ciborium::de::from_reader(b.as_slice()).unwrap_or(Value::Null)
        }
        _ => Value::Null,
    };
    let alg_value = header_value(&protected_map, 1).or_else(|| header_value(&unprotected, 1));
    let alg = match alg_value {
        Some(Value::Integer(i)) => i64::try_from(*i)
            .ok()
            .and_then(Algorithm::from_cose_id)
            .map_or_else(
                || cbor_to_json(&Value::Integer(*i)),
                |a| Json::from(a.name()),
            ),
        Some(other) => cbor_to_json(other),
        None => Json::Null,
    };
    let kid_bytes = match header_value(&unprotected, 4).or_else(|| header_value(&protected_map, 4))
    {
        Some(Value::Bytes(b)) => Some(b.clone()),
        Some(Value::Text(t)) => Some(t.as_bytes().to_vec()),
        _ => None,
    };
    let payload_bytes = match payload {
        Value::Bytes(b) => Some(b),
        _ => None,
    };
    let payload_json = payload_bytes
        .as_deref()
        .filter(|b| cbor::check_single_item(b).is_ok())
        .and_then(|b| ciborium::de::from_reader::<Value, _>(b).ok())
        .map_or(Json::Null, |v| cbor_to_json(&v));
    Ok(Inspection {
        size: message.len(),
        sha256: hex::encode(Sha256::digest(message)),
        tagged,
        headers: Headers {
            alg,
            kid: kid_bytes
                .as_deref()
                .and_then(|b| std::str::from_utf8(b).ok())
                .map(str::to_owned),
            kid_hex: kid_bytes.as_deref().map(hex::encode),
            protected: cbor_to_json(&protected_map),
            unprotected: cbor_to_json(&unprotected),
        },
        payload: payload_json,
        payload_hex: payload_bytes.as_deref().map(hex::encode),
        signature_hex: match &signature {
            Value::Bytes(b) => hex::encode(b),
            _ => String::new(),
        },
    })
}

fn header_value(map: &Value, label: i64) -> Option<&Value> {
    let Value::Map(entries) = map else {
        return None;
    };
    entries.iter().find_map(|(k, v)| match k {
        Value::Integer(i) if i64::try_from(*i).ok() == Some(label) => Some(v),
        _ => None,
    })
}
