//! Device status reports (SPEC 3.1, v1.1): the optional keys a `status` message carries
//! besides the common ones, checked when the payload is parsed and read back as a
//! [`StatusReport`].

use std::collections::BTreeMap;

use ciborium::value::Value;

use crate::telemetry::{SchemaError, number, uint, wrong};

/// What a `status` message reports; every key is optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct StatusReport {
    /// Remaining charge, 0..=1. The integers 0 and 1 are accepted like `q`: encoders
    /// that shrink whole floats (JavaScript's) send an empty or full battery that way.
    pub battery: Option<f64>,
    /// Messages this boot dropped from the device's own buffer before a receipt covered
    /// them.
    pub dropped: Option<u64>,
    /// The reporting interval the device is running with, in seconds.
    pub interval_s: Option<u64>,
    /// On external power.
    pub charging: Option<bool>,
}

impl StatusReport {
    /// Reads and checks the status keys of a payload's remaining fields.
    pub(crate) fn from_fields(fields: &BTreeMap<String, Value>) -> Result<Self, SchemaError> {
        let battery = match fields.get("battery") {
            Some(value) => match number(value).map(|n| n.as_f64()) {
                Some(b) if (0.0..=1.0).contains(&b) => Some(b),
                _ => return Err(wrong("battery", "a number from 0 to 1")),
            },
            None => None,
        };
        let count = |field: &'static str| match fields.get(field) {
            Some(value) => uint(value)
                .map(Some)
                .ok_or_else(|| wrong(field, "an unsigned integer")),
            None => Ok(None),
        };
        let dropped = count("dropped")?;
        let interval_s = count("interval_s")?;
        let charging = match fields.get("charging") {
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => return Err(wrong("charging", "a boolean")),
            None => None,
        };
        Ok(Self {
            battery,
            dropped,
            interval_s,
            charging,
        })
    }

    /// The payload keys of this report, for a signer to put in
    /// [`crate::Telemetry::extra`].
    pub fn to_fields(&self) -> impl Iterator<Item = (String, Value)> + use<> {
        [
            self.battery.map(|b| ("battery", Value::Float(b))),
            self.dropped.map(|d| ("dropped", Value::Integer(d.into()))),
            self.interval_s
                .map(|i| ("interval_s", Value::Integer(i.into()))),
            self.charging.map(|c| ("charging", Value::Bool(c))),
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

    fn status_message(fields: &[(&str, Value)]) -> Telemetry {
        Telemetry {
            dev: DeviceId::new("dev-00042").expect("valid id"),
            epoch: 5,
            seq: 301,
            ts: 1_718_432_301_000,
            fw: "5.12.1".into(),
            kind: MessageType::Status,
            m: None,
            q: None,
            model: None,
            schema: None,
            extra: fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        }
    }

    fn refused_field(fields: &[(&str, Value)]) -> Option<&'static str> {
        match parse_payload(&status_message(fields).to_cbor()) {
            Err(SchemaError::WrongType { field, .. }) => Some(field),
            Err(other) => panic!("unexpected refusal {other}"),
            Ok(_) => None,
        }
    }

    fn int(i: i64) -> Value {
        Value::Integer(i.into())
    }

    #[test]
    fn every_key_is_optional() {
        let parsed = parse_payload(&status_message(&[]).to_cbor()).expect("bare status");
        assert_eq!(parsed.status(), StatusReport::default());
    }

    #[test]
    fn a_full_report_reads_back_and_passes_through() {
        let report = StatusReport {
            battery: Some(0.42),
            dropped: Some(3),
            interval_s: Some(60),
            charging: Some(false),
        };
        let mut t = status_message(&[]);
        t.extra.extend(report.to_fields());
        let parsed = parse_payload(&t.to_cbor()).expect("valid status");
        assert_eq!(parsed, t);
        assert_eq!(parsed.status(), report);
        assert_eq!(parsed.alarm(), None);
    }

    #[test]
    fn battery_is_a_number_from_0_to_1() {
        for bad in [
            Value::Float(1.5),
            Value::Float(-0.01),
            Value::Float(f64::NAN),
            Value::Float(f64::INFINITY),
            int(2),
            int(-1),
            Value::Text("0.5".into()),
            Value::Bool(true),
        ] {
            assert_eq!(
                refused_field(&[("battery", bad.clone())]),
                Some("battery"),
                "{bad:?}"
            );
        }
        for (good, expect) in [
            (Value::Float(0.0), 0.0),
            (Value::Float(1.0), 1.0),
            (Value::Float(0.42), 0.42),
            (int(0), 0.0),
            (int(1), 1.0),
        ] {
            let t = status_message(&[("battery", good.clone())]);
            let parsed = parse_payload(&t.to_cbor()).expect("battery in range");
            assert_eq!(parsed.status().battery, Some(expect), "{good:?}");
            assert_eq!(parsed.extra["battery"], good, "passes through as sent");
        }
    }

    #[test]
    fn dropped_and_interval_are_unsigned_integers() {
        for field in ["dropped", "interval_s"] {
            for bad in [int(-1), Value::Float(3.0), Value::Text("3".into())] {
                assert_eq!(refused_field(&[(field, bad)]), Some(field));
            }
            let parsed = parse_payload(
                &status_message(&[(field, Value::Integer(u64::MAX.into()))]).to_cbor(),
            )
            .expect("full u64 range");
            let got = match field {
                "dropped" => parsed.status().dropped,
                _ => parsed.status().interval_s,
            };
            assert_eq!(got, Some(u64::MAX));
        }
    }

    #[test]
    fn charging_is_a_bool() {
        assert_eq!(refused_field(&[("charging", int(1))]), Some("charging"));
        assert_eq!(
            refused_field(&[("charging", Value::Null)]),
            Some("charging")
        );
        let parsed = parse_payload(&status_message(&[("charging", Value::Bool(true))]).to_cbor())
            .expect("ok");
        assert_eq!(parsed.status().charging, Some(true));
    }

    #[test]
    fn status_keys_on_vitals_pass_through_unchecked() {
        let mut t = status_message(&[("battery", Value::Text("full".into()))]);
        t.kind = MessageType::Vitals;
        t.m = Some(BTreeMap::new());
        let parsed = parse_payload(&t.to_cbor()).expect("v1 vitals with an unknown key");
        assert_eq!(parsed.status(), StatusReport::default());
    }
}
