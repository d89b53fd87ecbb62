//! Device alarms (SPEC 3.1, v1.1): the keys an `alarm` message carries besides the common
//! ones, checked when the payload is parsed and read back as an [`Alarm`].

use std::collections::BTreeMap;
use std::fmt;

use ciborium::value::Value;

use crate::telemetry::{SchemaError, wrong};

/// Longest `detail` text, in bytes.
pub const MAX_ALARM_DETAIL_BYTES: usize = 256;

/// A device's alarm code: `[a-z0-9_-]{1,32}`, e.g. `arrhythmia`, `lead_off`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct AlarmCode(String);

/// The text is not an alarm code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an alarm code is 1 to 32 of a-z, 0-9, `_` and `-`")]
pub struct InvalidAlarmCode;

impl AlarmCode {
    pub fn new(code: impl Into<String>) -> Result<Self, InvalidAlarmCode> {
        let code = code.into();
        let valid = (1..=32).contains(&code.len())
            && code
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if valid {
            Ok(Self(code))
        } else {
            Err(InvalidAlarmCode)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AlarmCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for AlarmCode {
    type Err = InvalidAlarmCode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// The device's own severity for an alarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlarmLevel {
    Info,
    Review,
    Urgent,
}

/// The text is not `info`, `review` or `urgent`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an alarm level is `info`, `review` or `urgent`")]
pub struct InvalidAlarmLevel;

impl AlarmLevel {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Review => "review",
            Self::Urgent => "urgent",
        }
    }
}

impl fmt::Display for AlarmLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for AlarmLevel {
    type Err = InvalidAlarmLevel;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "info" => Ok(Self::Info),
            "review" => Ok(Self::Review),
            "urgent" => Ok(Self::Urgent),
            _ => Err(InvalidAlarmLevel),
        }
    }
}

/// What an `alarm` message says: the code raised (`active`) or cleared, at the device's
/// level, with optional free text for the clinician.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Alarm {
    pub code: AlarmCode,
    pub level: AlarmLevel,
    pub active: bool,
    /// At most [`MAX_ALARM_DETAIL_BYTES`] bytes; [`Alarm::to_fields`] does not check it,
    /// the verifier does.
    pub detail: Option<String>,
}

impl Alarm {
    /// Reads and checks the alarm keys of a payload's remaining fields.
    pub(crate) fn from_fields(fields: &BTreeMap<String, Value>) -> Result<Self, SchemaError> {
        let code = match fields.get("alarm") {
            Some(Value::Text(t)) => AlarmCode::new(t.as_str())
                .map_err(|_| wrong("alarm", "a code of 1 to 32 of a-z, 0-9, `_`, `-`"))?,
            Some(_) => return Err(wrong("alarm", "a text string")),
            None => return Err(SchemaError::Missing("alarm")),
        };
        let level = match fields.get("level") {
            Some(Value::Text(t)) => t
                .parse()
                .map_err(|_| wrong("level", "`info`, `review` or `urgent`"))?,
            Some(_) => return Err(wrong("level", "a text string")),
            None => return Err(SchemaError::Missing("level")),
        };
        let active = match fields.get("active") {
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(wrong("active", "a boolean")),
            None => return Err(SchemaError::Missing("active")),
        };
        let detail = match fields.get("detail") {
            Some(Value::Text(t)) if t.len() <= MAX_ALARM_DETAIL_BYTES => Some(t.clone()),
            Some(Value::Text(_)) => return Err(wrong("detail", "at most 256 bytes")),
            Some(_) => return Err(wrong("detail", "a text string")),
            None => None,
        };
        Ok(Self {
            code,
            level,
            active,
            detail,
        })
    }

    /// The payload keys of this alarm, for a signer to put in [`crate::Telemetry::extra`].
    pub fn to_fields(&self) -> impl Iterator<Item = (String, Value)> + use<> {
        [
            Some(("alarm", Value::Text(self.code.0.clone()))),
            Some(("level", Value::Text(self.level.as_str().to_owned()))),
            Some(("active", Value::Bool(self.active))),
            self.detail.clone().map(|d| ("detail", Value::Text(d))),
        ]
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.to_owned(), v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DeviceId, MessageType, Telemetry, parse_payload};

    fn alarm_message(fields: &[(&str, Value)]) -> Telemetry {
        Telemetry {
            dev: DeviceId::new("dev-00042").expect("valid id"),
            epoch: 5,
            seq: 201,
            ts: 1_718_432_201_000,
            fw: "5.12.1".into(),
            kind: MessageType::Alarm,
            m: None,
            q: None,
            model: Some("ecg-af-2.1.0".into()),
            schema: None,
            extra: fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        }
    }

    fn text(s: &str) -> Value {
        Value::Text(s.to_owned())
    }

    fn raised() -> Vec<(&'static str, Value)> {
        vec![
            ("alarm", text("arrhythmia")),
            ("level", text("urgent")),
            ("active", Value::Bool(true)),
        ]
    }

    fn with(field: &'static str, value: Option<Value>) -> Telemetry {
        let mut fields: Vec<_> = raised().into_iter().filter(|(k, _)| *k != field).collect();
        if let Some(v) = value {
            fields.push((field, v));
        }
        alarm_message(&fields)
    }

    fn refusal(t: &Telemetry) -> Option<&'static str> {
        match parse_payload(&t.to_cbor()) {
            Err(SchemaError::WrongType { field, .. } | SchemaError::Missing(field)) => Some(field),
            Err(other) => panic!("unexpected refusal {other}"),
            Ok(_) => None,
        }
    }

    #[test]
    fn a_valid_alarm_parses_and_reads_back() {
        let t = alarm_message(&raised());
        let parsed = parse_payload(&t.to_cbor()).expect("valid alarm");
        assert_eq!(parsed, t, "the keys pass through unchanged");
        assert_eq!(
            parsed.alarm(),
            Some(Alarm {
                code: AlarmCode::new("arrhythmia").expect("code"),
                level: AlarmLevel::Urgent,
                active: true,
                detail: None,
            })
        );
        assert_eq!(parsed.status(), crate::StatusReport::default());
    }

    #[test]
    fn the_code_is_required_text_of_the_alarm_alphabet() {
        assert_eq!(refusal(&with("alarm", None)), Some("alarm"));
        assert_eq!(
            refusal(&with("alarm", Some(Value::Integer(3.into())))),
            Some("alarm")
        );
        for bad in ["AFib", "", "a b", "é", &"x".repeat(33)] {
            assert_eq!(
                refusal(&with("alarm", Some(text(bad)))),
                Some("alarm"),
                "{bad:?}"
            );
        }
        for good in ["lead_off", "battery-critical", "a", "0", &"x".repeat(32)] {
            assert_eq!(refusal(&with("alarm", Some(text(good)))), None, "{good:?}");
        }
    }

    #[test]
    fn the_level_is_required_and_one_of_three() {
        assert_eq!(refusal(&with("level", None)), Some("level"));
        assert_eq!(
            refusal(&with("level", Some(text("critical")))),
            Some("level")
        );
        assert_eq!(refusal(&with("level", Some(text("Urgent")))), Some("level"));
        assert_eq!(
            refusal(&with("level", Some(Value::Integer(2.into())))),
            Some("level")
        );
        for level in ["info", "review", "urgent"] {
            let t = with("level", Some(text(level)));
            assert_eq!(refusal(&t), None);
            let alarm = parse_payload(&t.to_cbor())
                .expect("ok")
                .alarm()
                .expect("alarm");
            assert_eq!(alarm.level.as_str(), level);
        }
    }

    #[test]
    fn active_is_a_required_bool_not_an_integer() {
        assert_eq!(refusal(&with("active", None)), Some("active"));
        assert_eq!(
            refusal(&with("active", Some(Value::Integer(1.into())))),
            Some("active")
        );
        assert_eq!(refusal(&with("active", Some(text("true")))), Some("active"));
        let cleared = with("active", Some(Value::Bool(false)));
        let alarm = parse_payload(&cleared.to_cbor())
            .expect("ok")
            .alarm()
            .expect("alarm");
        assert!(!alarm.active);
    }

    #[test]
    fn detail_is_optional_text_of_at_most_256_bytes() {
        let mut fields = raised();
        fields.push(("detail", text(&"é".repeat(128))));
        let t = alarm_message(&fields);
        assert_eq!(refusal(&t), None, "256 bytes");
        assert_eq!(
            parse_payload(&t.to_cbor())
                .expect("ok")
                .alarm()
                .expect("alarm")
                .detail,
            Some("é".repeat(128))
        );
        fields.pop();
        fields.push(("detail", text(&format!("{}x", "é".repeat(128)))));
        assert_eq!(
            refusal(&alarm_message(&fields)),
            Some("detail"),
            "257 bytes"
        );
        fields.pop();
        fields.push(("detail", Value::Null));
        assert_eq!(refusal(&alarm_message(&fields)), Some("detail"));
    }

    #[test]
    fn alarm_keys_on_other_types_pass_through_unchecked() {
        // v1 payloads: unknown keys of a vitals message are not the alarm keys.
        let mut t = with("level", Some(text("critical")));
        t.kind = MessageType::Vitals;
        t.m = Some(BTreeMap::new());
        let parsed = parse_payload(&t.to_cbor()).expect("vitals with an odd key");
        assert_eq!(parsed.alarm(), None);
    }

    #[test]
    fn to_fields_writes_what_the_parser_reads() {
        let alarm = Alarm {
            code: AlarmCode::new("fall").expect("code"),
            level: AlarmLevel::Review,
            active: false,
            detail: Some("fell at 03:12".into()),
        };
        let mut t = alarm_message(&[]);
        t.extra.extend(alarm.to_fields());
        assert_eq!(
            parse_payload(&t.to_cbor()).expect("ok").alarm(),
            Some(alarm)
        );
    }
}
