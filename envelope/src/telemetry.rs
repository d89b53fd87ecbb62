//! The telemetry payload (SPEC section 3): a CBOR map with text keys, parsed into a typed
//! record ("parse, don't validate"). Unknown keys are kept and passed through.
//!
//! The v1.1 keys of `status` and `alarm` messages (SPEC 3.1) are checked here too but stay
//! in [`Telemetry::extra`], so the normalized JSON of a message is what the device sent;
//! [`Telemetry::alarm`] and [`Telemetry::status`] read them back typed.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fmt;

use ciborium::value::{Integer, Value};

use crate::{Alarm, DeviceId, StatusReport, cbor, json};

/// What a message reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageType {
    Vitals,
    Status,
    Alarm,
}

impl MessageType {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Vitals => "vitals",
            Self::Status => "status",
            Self::Alarm => "alarm",
        }
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A measurement value: CBOR integers keep their exact value, floats are finite.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    Int(i128),
    Float(f64),
}

impl Number {
    pub fn as_f64(self) -> f64 {
        match self {
            // Measurements are small; precision loss above 2^53 is acceptable for alerting.
            #[allow(clippy::cast_precision_loss)]
            Self::Int(i) => i as f64,
            Self::Float(f) => f,
        }
    }

    fn to_value(self) -> Value {
        match self {
            // Parsed values always fit CBOR's integer range; a constructed one outside
            // -2^64..2^64 is sent as the nearest float rather than wrapped.
            #[allow(clippy::cast_precision_loss)]
            Self::Int(i) => Integer::try_from(i).map_or(Value::Float(i as f64), Value::Integer),
            Self::Float(f) => Value::Float(f),
        }
    }
}

impl serde::Serialize for Number {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            Self::Int(i) => s.serialize_i128(i),
            Self::Float(f) => s.serialize_f64(f),
        }
    }
}

/// One decoded telemetry payload. Field names follow the wire keys.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Telemetry {
    pub dev: DeviceId,
    /// Boot counter; increases on every device restart.
    pub epoch: u64,
    /// Sequence number within the epoch.
    pub seq: u64,
    /// Device clock, milliseconds since the Unix epoch.
    pub ts: u64,
    pub fw: String,
    #[serde(rename = "type")]
    pub kind: MessageType,
    /// Measurements, e.g. `spo2`, `pulse`; required for `vitals`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub m: Option<BTreeMap<String, Number>>,
    /// Signal quality of this sample, 0..=1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q: Option<f64>,
    /// Version of an on-device model that produced or filtered `m`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Payload schema version as sent; see [`Telemetry::schema_version`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema: Option<u64>,
    /// Keys this version does not know, kept verbatim for pass-through.
    #[serde(flatten, serialize_with = "json::serialize_value_map")]
    pub extra: BTreeMap<String, Value>,
}

impl Telemetry {
    /// The schema version, 1 when the payload does not say.
    pub fn schema_version(&self) -> u64 {
        self.schema.unwrap_or(1)
    }

    /// The device alarm an `alarm` message carries; `None` for other types. Every parsed
    /// (so every verified) `alarm` message has one; a hand-built record whose `extra`
    /// breaks SPEC 3.1 has none.
    pub fn alarm(&self) -> Option<Alarm> {
        (self.kind == MessageType::Alarm)
            .then(|| Alarm::from_fields(&self.extra).ok())
            .flatten()
    }

    /// What a `status` message reports; all `None` for other types (and for a hand-built
    /// record whose `extra` breaks SPEC 3.1).
    pub fn status(&self) -> StatusReport {
        if self.kind == MessageType::Status {
            StatusReport::from_fields(&self.extra).unwrap_or_default()
        } else {
            StatusReport::default()
        }
    }

    /// Encodes the payload as a definite-length CBOR map, keys in SPEC order, then the
    /// unknown keys.
    pub fn to_cbor(&self) -> Vec<u8> {
        let mut map: Vec<(Value, Value)> = vec![
            (text("dev"), text(self.dev.as_str())),
            (text("epoch"), Value::Integer(self.epoch.into())),
            (text("seq"), Value::Integer(self.seq.into())),
            (text("ts"), Value::Integer(self.ts.into())),
            (text("fw"), text(&self.fw)),
            (text("type"), text(self.kind.as_str())),
        ];
        if let Some(m) = &self.m {
            let entries = m.iter().map(|(k, v)| (text(k), v.to_value())).collect();
            map.push((text("m"), Value::Map(entries)));
        }
        if let Some(q) = self.q {
            map.push((text("q"), Value::Float(q)));
        }
        if let Some(model) = &self.model {
            map.push((text("model"), text(model)));
        }
        if let Some(schema) = self.schema {
            map.push((text("schema"), Value::Integer(schema.into())));
        }
        for (k, v) in &self.extra {
            map.push((text(k), v.clone()));
        }
        let mut out = Vec::with_capacity(160);
        // Serializing a Value into a Vec cannot fail: the writer is infallible and every
        // Value variant has an encoding.
        ciborium::ser::into_writer(&Value::Map(map), &mut out)
            .expect("CBOR encoding of a Value into a Vec is infallible");
        out
    }
}

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

/// Why a payload does not follow the schema; reported as `payload_schema`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    #[error("payload is not strict CBOR: {0}")]
    Cbor(#[from] cbor::CborError),
    #[error("payload is not a CBOR map")]
    NotAMap,
    #[error("payload map has a key that is not a text string")]
    NonTextKey,
    #[error("payload map repeats the key `{0}`")]
    DuplicateKey(String),
    #[error("payload lacks the required field `{0}`")]
    Missing(&'static str),
    #[error("payload field `{field}` must be {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    #[error("payload field `m` entry `{0}` must be a finite number")]
    BadMeasurement(String),
    #[error("payload field `dev` is not a device id")]
    BadDeviceId,
}

/// Parses payload bytes: exactly one strict CBOR map, text keys, no duplicates, the
/// required fields with their types.
pub fn parse_payload(bytes: &[u8]) -> Result<Telemetry, SchemaError> {
    cbor::check_single_item(bytes)?;
    // ciborium's `from_reader` zeroes a 4 KiB scratch buffer per call, a measurable part
    // of verifying a ~150-byte payload. No string in the payload is longer than the
    // payload, so a scratch of `min(len, 4096)` bytes takes the same decoding paths.
    let mut scratch = vec![0u8; bytes.len().min(4096)];
    let value: Value = ciborium::de::from_reader_with_buffer(bytes, &mut scratch)
        .map_err(|_| SchemaError::NotAMap)?;
    let Value::Map(entries) = value else {
        return Err(SchemaError::NotAMap);
    };
    let mut fields: BTreeMap<String, Value> = BTreeMap::new();
    for (key, value) in entries {
        let Value::Text(key) = key else {
            return Err(SchemaError::NonTextKey);
        };
        match fields.entry(key) {
            Entry::Occupied(seen) => {
                return Err(SchemaError::DuplicateKey(
                    seen.key().escape_debug().take(64).collect(),
                ));
            }
            Entry::Vacant(slot) => {
                slot.insert(value);
            }
        }
    }
    let mut take = |name: &'static str| fields.remove(name);

    let dev = match take("dev") {
        Some(Value::Text(t)) => DeviceId::new(t).map_err(|_| SchemaError::BadDeviceId)?,
        Some(_) => return Err(wrong("dev", "a text string")),
        None => return Err(SchemaError::Missing("dev")),
    };
    let epoch = required_uint(take("epoch"), "epoch")?;
    let seq = required_uint(take("seq"), "seq")?;
    let ts = required_uint(take("ts"), "ts")?;
    let fw = match take("fw") {
        Some(Value::Text(t)) => t,
        Some(_) => return Err(wrong("fw", "a text string")),
        None => return Err(SchemaError::Missing("fw")),
    };
    let kind = match take("type") {
        Some(Value::Text(t)) => match t.as_str() {
            "vitals" => MessageType::Vitals,
            "status" => MessageType::Status,
            "alarm" => MessageType::Alarm,
            _ => return Err(wrong("type", "`vitals`, `status` or `alarm`")),
        },
        Some(_) => return Err(wrong("type", "a text string")),
        None => return Err(SchemaError::Missing("type")),
    };
    let m = match take("m") {
        Some(Value::Map(entries)) => Some(measurements(entries)?),
        Some(_) => return Err(wrong("m", "a map of text to numbers")),
        None if kind == MessageType::Vitals => return Err(SchemaError::Missing("m")),
        None => None,
    };
    let q = match take("q") {
        Some(value) => match number(&value) {
            Some(n) if (0.0..=1.0).contains(&n.as_f64()) => Some(n.as_f64()),
            _ => return Err(wrong("q", "a number from 0 to 1")),
        },
        None => None,
    };
    let model = match take("model") {
        Some(Value::Text(t)) => Some(t),
        Some(_) => return Err(wrong("model", "a text string")),
        None => None,
    };
    let schema = match take("schema") {
        Some(value) => Some(uint(&value).ok_or_else(|| wrong("schema", "an unsigned integer"))?),
        None => None,
    };
    // SPEC 3.1: the type's own keys, checked in place; they pass through with the rest.
    match kind {
        MessageType::Alarm => {
            Alarm::from_fields(&fields)?;
        }
        MessageType::Status => {
            StatusReport::from_fields(&fields)?;
        }
        MessageType::Vitals => {}
    }
    // Unknown keys pass through as JSON: a repeated key inside them would lose a value.
    if let Some(dup) = fields
        .iter()
        .find_map(|(k, v)| json::duplicate_key(v, &k.escape_debug().take(64).collect::<String>()))
    {
        return Err(SchemaError::DuplicateKey(dup));
    }
    Ok(Telemetry {
        dev,
        epoch,
        seq,
        ts,
        fw,
        kind,
        m,
        q,
        model,
        schema,
        extra: fields,
    })
}

pub(crate) fn wrong(field: &'static str, expected: &'static str) -> SchemaError {
    SchemaError::WrongType { field, expected }
}

pub(crate) fn uint(value: &Value) -> Option<u64> {
    match value {
        Value::Integer(i) => u64::try_from(*i).ok(),
        _ => None,
    }
}

fn required_uint(value: Option<Value>, field: &'static str) -> Result<u64, SchemaError> {
    let value = value.ok_or(SchemaError::Missing(field))?;
    uint(&value).ok_or_else(|| wrong(field, "an unsigned integer"))
}

pub(crate) fn number(value: &Value) -> Option<Number> {
    match value {
        Value::Integer(i) => Some(Number::Int(i128::from(*i))),
        Value::Float(f) if f.is_finite() => Some(Number::Float(*f)),
        _ => None,
    }
}

fn measurements(entries: Vec<(Value, Value)>) -> Result<BTreeMap<String, Number>, SchemaError> {
    let mut out = BTreeMap::new();
    for (key, value) in entries {
        let Value::Text(name) = key else {
            return Err(wrong("m", "a map with text keys"));
        };
        let shown = || name.escape_debug().take(64).collect::<String>();
        let n = number(&value).ok_or_else(|| SchemaError::BadMeasurement(shown()))?;
        if out.contains_key(&name) {
            return Err(SchemaError::DuplicateKey(format!("m.{}", shown())));
        }
        out.insert(name, n);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Telemetry {
        Telemetry {
            dev: DeviceId::new("dev-00042").expect("valid id"),
            epoch: 3,
            seq: 1001,
            ts: 1_718_260_201_000,
            fw: "5.12.1".into(),
            kind: MessageType::Vitals,
            m: Some(BTreeMap::from([
                ("spo2".into(), Number::Int(93)),
                ("temp".into(), Number::Float(37.2)),
            ])),
            q: Some(0.97),
            model: Some("spo2-filter/1.4".into()),
            schema: None,
            extra: BTreeMap::from([("site_hint".into(), Value::Text("x".into()))]),
        }
    }

    #[test]
    fn round_trips_through_cbor() {
        let t = sample();
        assert_eq!(parse_payload(&t.to_cbor()), Ok(t));
    }

    #[test]
    fn refuses_schema_breaks() {
        let mut t = sample();
        t.m = None;
        assert_eq!(parse_payload(&t.to_cbor()), Err(SchemaError::Missing("m")));
        t.kind = MessageType::Status;
        assert!(parse_payload(&t.to_cbor()).is_ok(), "status needs no m");
        t.q = Some(1.5);
        assert!(matches!(
            parse_payload(&t.to_cbor()),
            Err(SchemaError::WrongType { field: "q", .. })
        ));
        // {"dev": 1}
        assert!(matches!(
            parse_payload(&hex::decode("a1636465760a").expect("hex")),
            Err(SchemaError::WrongType { field: "dev", .. })
        ));
        // a non-text key
        assert_eq!(
            parse_payload(&hex::decode("a10101").expect("hex")),
            Err(SchemaError::NonTextKey)
        );
        // a repeated key inside a pass-through map, also as 1 and "1"
        let mut t = sample();
        t.extra = BTreeMap::from([(
            "calib".to_owned(),
            Value::Array(vec![Value::Map(vec![
                (text("gain"), Value::Integer(1.into())),
                (text("gain"), Value::Integer(2.into())),
            ])]),
        )]);
        assert_eq!(
            parse_payload(&t.to_cbor()),
            Err(SchemaError::DuplicateKey("calib[0].gain".into()))
        );
        t.extra = BTreeMap::from([(
            "x".to_owned(),
            Value::Map(vec![
                (Value::Integer(1.into()), Value::Null),
                (text("1"), Value::Null),
            ]),
        )]);
        assert_eq!(
            parse_payload(&t.to_cbor()),
            Err(SchemaError::DuplicateKey("x.1".into()))
        );
        t.extra = BTreeMap::from([(
            "x".to_owned(),
            Value::Map(vec![(text("a"), Value::Null), (text("b"), Value::Null)]),
        )]);
        assert!(parse_payload(&t.to_cbor()).is_ok(), "distinct keys pass");
        // indefinite map
        assert!(matches!(
            parse_payload(&hex::decode("bf616101ff").expect("hex")),
            Err(SchemaError::Cbor(_))
        ));
    }
}
