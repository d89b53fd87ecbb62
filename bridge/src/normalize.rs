//! The normalized event: the canonical, provenance-carrying form of one accepted
//! message (issue 4, plane 2). Pure: the same inputs give byte-identical JSON.
//!
//! The event id is derived from `(device, epoch, seq)` alone (SPEC section 4), so a
//! message delivered twice can never yield two events:
//! `ev1-` + the first 32 hex digits of SHA-256("vitalmq/event/v1" 0x00 device 0x00
//! epoch as 8 bytes big-endian, seq as 8 bytes big-endian).

use std::collections::BTreeMap;

use serde::Serialize;
use serde::ser::{SerializeMap as _, Serializer};
use sha2::{Digest as _, Sha256};
use vitalmq_envelope::{DeviceId, Number, Telemetry, Verified, json::cbor_to_json};
use vitalmq_policies::{DeviceEntry, PlausibleRange};

use crate::plausible::{Assessment, ClockCheck};

/// Version of this transformation, recorded in every event's provenance. Bump it when
/// the mapping from message to event changes (2: `observed_at` is the reception time
/// for a skewed device clock; `implausible` and `clock_skew` added).
pub const TRANSFORMATION: &str = "vitalmq-normalize/2";
/// Format tag of the normalized event.
pub const EVENT_FORMAT: &str = "vitalmq-event/v1";

/// The deterministic event id of `(device, epoch, seq)`.
pub fn event_id(device: &DeviceId, epoch: u64, seq: u64) -> String {
    let mut h = Sha256::new();
    h.update(b"vitalmq/event/v1\0");
    h.update(device.as_str().as_bytes());
    h.update([0]);
    h.update(epoch.to_be_bytes());
    h.update(seq.to_be_bytes());
    let digest = h.finalize();
    format!("ev1-{}", hex::encode(&digest[..16]))
}

/// An event id as stored and cited (`ev1-...`, see [`event_id`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct EventId(String);

impl EventId {
    /// The id of `(device, epoch, seq)`.
    pub fn of(device: &DeviceId, epoch: u64, seq: u64) -> Self {
        Self(event_id(device, epoch, seq))
    }

    /// An id read back from the store, which holds only ids it was given by [`event_id`].
    pub(crate) fn stored(id: String) -> Self {
        Self(id)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where and how the bridge received a message.
#[derive(Debug, Clone)]
pub struct Receipt<'a> {
    pub received_at_ms: u64,
    pub topic: &'a str,
    /// The broker the bridge subscribed at (`host:port`).
    pub broker: &'a str,
    /// Who published, as far as the bridge can know it (see ARCHITECTURE.md).
    pub publisher: &'a str,
    /// This bridge's identity.
    pub bridge: &'a str,
}

/// RFC 3339 UTC text of a Unix time in milliseconds, `None` when out of range.
pub fn rfc3339_ms(ms: u64) -> Option<String> {
    let nanos = i128::from(ms) * 1_000_000;
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()?;
    t.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

/// Builds the normalized event JSON (one line, no trailing newline).
///
/// `observed_at` is the time the bridge relies on ([`Assessment::observed_at_ms`]):
/// the device's `ts`, or the reception time when the device clock is outside the
/// policy; `ts` is always the device's value. Two fields appear only when they apply:
/// `implausible` (metric -> the limits it broke, `{"min", "max", "unit"}`) and
/// `clock_skew` (`{"direction": "ahead" | "behind", "by_ms", "allowed_ms"}`).
///
/// Serialized straight from borrowed fields: building a `serde_json::Value` first cost
/// about 7 us per message in the bridge's profile (a map entry and a key allocation per
/// field). The bytes are the same as that construction gave (pinned by a test against
/// it), and integers beyond the 64-bit range (CBOR allows down to -2^64) are written
/// as they are instead of failing.
///
/// `event_id` is [`event_id`] of the reading, computed once by the caller (the
/// recorded event keeps it too).
pub fn normalize(
    verified: &Verified<Telemetry>,
    event_id: &str,
    device: &DeviceEntry,
    receipt: &Receipt<'_>,
    verdict: &str,
    assessment: &Assessment,
) -> String {
    let t: &Telemetry = verified;
    let event = EventJson {
        format: EVENT_FORMAT,
        event_id,
        device: t.dev.as_str(),
        site: device.site.as_str(),
        patient_ref: &device.patient_ref,
        epoch: t.epoch,
        seq: t.seq,
        kind: t.kind.as_str(),
        ts: t.ts,
        observed_at: rfc3339_ms(assessment.observed_at_ms)
            .or_else(|| rfc3339_ms(receipt.received_at_ms)),
        received_at: rfc3339_ms(receipt.received_at_ms),
        m: Measurements(t.m.as_ref()),
        q: t.q,
        fw: &t.fw,
        model: t.model.as_deref(),
        schema: t.schema_version(),
        extra: Extra(&t.extra),
        provenance: Provenance {
            kid: t.dev.as_str(),
            alg: verified.algorithm().name(),
            raw_sha256: hex::encode(verified.message_sha256()),
            topic: receipt.topic,
            broker: receipt.broker,
            publisher: receipt.publisher,
            bridge: receipt.bridge,
            sequence: verdict,
            transformation: TRANSFORMATION,
            consent: device.consent.as_deref(),
            processing_policy: device.processing_policy.as_deref(),
            model_status: assessment.model.as_ref().map(|m| m.status.as_str()),
            model_artifact_sha256: assessment
                .model
                .as_ref()
                .and_then(|m| m.artifact_sha256.as_deref()),
        },
        implausible: (!assessment.implausible.is_empty()).then_some(&assessment.implausible),
        clock_skew: ClockSkew::of(assessment.clock),
    };
    // Serializing these types cannot fail: every map key is a string.
    serde_json::to_string(&event).unwrap_or_default()
}

/// The normalized event, fields in their published order.
#[derive(Serialize)]
struct EventJson<'a> {
    format: &'static str,
    event_id: &'a str,
    device: &'a str,
    site: &'a str,
    patient_ref: &'a str,
    epoch: u64,
    seq: u64,
    #[serde(rename = "type")]
    kind: &'static str,
    ts: u64,
    observed_at: Option<String>,
    received_at: Option<String>,
    m: Measurements<'a>,
    q: Option<f64>,
    fw: &'a str,
    model: Option<&'a str>,
    schema: u64,
    extra: Extra<'a>,
    provenance: Provenance<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    implausible: Option<&'a std::collections::BTreeMap<String, PlausibleRange>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    clock_skew: Option<ClockSkew>,
}

#[derive(Serialize)]
struct ClockSkew {
    direction: &'static str,
    by_ms: u64,
    allowed_ms: u64,
}

impl ClockSkew {
    fn of(check: ClockCheck) -> Option<Self> {
        let (direction, by_ms, allowed_ms) = match check {
            ClockCheck::Within => return None,
            ClockCheck::Ahead { by_ms, allowed_ms } => ("ahead", by_ms, allowed_ms),
            ClockCheck::Behind { by_ms, allowed_ms } => ("behind", by_ms, allowed_ms),
        };
        Some(Self {
            direction,
            by_ms,
            allowed_ms,
        })
    }
}

#[derive(Serialize)]
struct Provenance<'a> {
    kid: &'a str,
    alg: &'static str,
    raw_sha256: String,
    topic: &'a str,
    broker: &'a str,
    publisher: &'a str,
    bridge: &'a str,
    sequence: &'a str,
    transformation: &'static str,
    consent: Option<&'a str>,
    processing_policy: Option<&'a str>,
    /// With a models file: the reported model's [`vitalmq_policies::ModelStatus`].
    #[serde(skip_serializing_if = "Option::is_none")]
    model_status: Option<&'static str>,
    /// With a models file: the registry's artifact digest of the reported model.
    #[serde(skip_serializing_if = "Option::is_none")]
    model_artifact_sha256: Option<&'a str>,
}

/// `m` as a JSON object (`{}` when absent); non-finite floats become `null`.
struct Measurements<'a>(Option<&'a BTreeMap<String, Number>>);

impl Serialize for Measurements<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.map_or(0, BTreeMap::len)))?;
        for (k, v) in self.0.into_iter().flatten() {
            match v {
                Number::Int(i) => map.serialize_entry(k, i)?,
                Number::Float(f) => map.serialize_entry(k, f)?,
            }
        }
        map.end()
    }
}

/// Unknown payload keys, passed through as JSON.
struct Extra<'a>(&'a BTreeMap<String, ciborium::Value>);

impl Serialize for Extra<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            map.serialize_entry(k, &cbor_to_json(v))?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde_json::{Map, Value as Json, json};
    use vitalmq_envelope::{Algorithm, MessageType, SigningKey};
    use vitalmq_policies::SiteId;

    use super::*;

    /// [`normalize`] with the reading's own event id.
    fn normalized(
        verified: &Verified<Telemetry>,
        device: &DeviceEntry,
        receipt: &Receipt<'_>,
        verdict: &str,
        assessment: &Assessment,
    ) -> String {
        let id = event_id(&verified.dev, verified.epoch, verified.seq);
        normalize(verified, &id, device, receipt, verdict, assessment)
    }

    /// The construction `normalize` replaced (a `serde_json::Value`, then `to_string`):
    /// the oracle for byte-identical output.
    fn normalize_via_value(
        verified: &Verified<Telemetry>,
        device: &DeviceEntry,
        receipt: &Receipt<'_>,
        assessment: &Assessment,
    ) -> String {
        let t: &Telemetry = verified;
        let measurements: Map<String, Json> =
            t.m.iter()
                .flatten()
                .map(|(k, v)| {
                    let n = match v {
                        Number::Int(i) => json!(i),
                        other => serde_json::Number::from_f64(other.as_f64())
                            .map_or(Json::Null, Json::Number),
                    };
                    (k.clone(), n)
                })
                .collect();
        let extra: Map<String, Json> = t
            .extra
            .iter()
            .map(|(k, v)| (k.clone(), cbor_to_json(v)))
            .collect();
        let mut v = json!({
            "format": EVENT_FORMAT,
            "event_id": event_id(&t.dev, t.epoch, t.seq),
            "device": t.dev.as_str(),
            "site": device.site.as_str(),
            "patient_ref": device.patient_ref,
            "epoch": t.epoch,
            "seq": t.seq,
            "type": t.kind.as_str(),
            "ts": t.ts,
            "observed_at": rfc3339_ms(assessment.observed_at_ms),
            "received_at": rfc3339_ms(receipt.received_at_ms),
            "m": measurements,
            "q": t.q,
            "fw": t.fw,
            "model": t.model,
            "schema": t.schema_version(),
            "extra": extra,
            "provenance": {
                "kid": t.dev.as_str(),
                "alg": verified.algorithm().name(),
                "raw_sha256": hex::encode(verified.message_sha256()),
                "topic": receipt.topic,
                "broker": receipt.broker,
                "publisher": receipt.publisher,
                "bridge": receipt.bridge,
                "sequence": "in_order",
                "transformation": TRANSFORMATION,
                "consent": device.consent,
                "processing_policy": device.processing_policy,
            },
        });
        let obj = v.as_object_mut().expect("an object");
        if let Some(m) = &assessment.model {
            let prov = obj
                .get_mut("provenance")
                .and_then(Json::as_object_mut)
                .expect("provenance");
            prov.insert("model_status".into(), json!(m.status.as_str()));
            if let Some(sha) = &m.artifact_sha256 {
                prov.insert("model_artifact_sha256".into(), json!(sha));
            }
        }
        if !assessment.implausible.is_empty() {
            obj.insert("implausible".into(), json!(assessment.implausible));
        }
        let skew = match assessment.clock {
            ClockCheck::Within => None,
            ClockCheck::Ahead { by_ms, allowed_ms } => Some(("ahead", by_ms, allowed_ms)),
            ClockCheck::Behind { by_ms, allowed_ms } => Some(("behind", by_ms, allowed_ms)),
        };
        if let Some((direction, by_ms, allowed_ms)) = skew {
            obj.insert(
                "clock_skew".into(),
                json!({"direction": direction, "by_ms": by_ms, "allowed_ms": allowed_ms}),
            );
        }
        v.to_string()
    }

    fn signed(t: &Telemetry, alg: Algorithm) -> (Verified<Telemetry>, DeviceEntry) {
        let key = SigningKey::generate(alg).expect("key");
        let entry = DeviceEntry {
            id: t.dev.clone(),
            site: SiteId::new("site-01").expect("site"),
            patient_ref: "pt-7f3a".into(),
            key: key.verifying_key(),
            consent: Some("care".into()),
            processing_policy: None,
            lot: None,
            hardware_model: None,
            region: None,
        };
        let keys = HashMap::from([(t.dev.clone(), key.verifying_key())]);
        let bytes = vitalmq_envelope::sign(t, &key).expect("sign");
        let verified = vitalmq_envelope::verify(&bytes, &keys, Some(&t.dev)).expect("verify");
        (verified, entry)
    }

    /// The assessment under the shipped example policy.
    fn assessed(t: &Telemetry) -> Assessment {
        let rules = vitalmq_policies::RuleSet::parse(
            include_str!("../../policies/examples/rules.toml"),
            std::path::Path::new("rules.toml"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        Assessment::of(
            t,
            receipt().received_at_ms,
            rules.plausibility(),
            rules.clock(),
        )
    }

    fn receipt() -> Receipt<'static> {
        Receipt {
            received_at_ms: 1_718_260_201_250,
            topic: "devices/dev-00042/telemetry",
            broker: "127.0.0.1:8883",
            publisher: "spiffe://test.vitalmq/device/dev-00042",
            bridge: "spiffe://test.vitalmq/bridge/bridge-01",
        }
    }

    fn telemetry() -> Telemetry {
        Telemetry {
            dev: DeviceId::new("dev-00042").expect("id"),
            epoch: 3,
            seq: 17,
            ts: 1_718_260_201_000,
            fw: "5.12.1".into(),
            kind: MessageType::Vitals,
            m: Some(BTreeMap::from([
                ("spo2".to_owned(), Number::Int(97)),
                ("temp".to_owned(), Number::Float(36.85)),
                ("resp".to_owned(), Number::Float(1e-7)),
            ])),
            q: Some(0.9),
            model: None,
            schema: None,
            extra: BTreeMap::new(),
        }
    }

    #[test]
    fn output_is_byte_identical_to_the_value_construction() {
        let mut cases = vec![telemetry()];
        let mut t = telemetry();
        t.q = None;
        t.model = Some("spo2-filter \"v2\" \u{e9}".into());
        t.schema = Some(2);
        t.fw = "fw\n\t\u{1}".into();
        t.extra = BTreeMap::from([
            ("battery".to_owned(), ciborium::Value::Integer(87.into())),
            (
                "nested".to_owned(),
                ciborium::Value::Array(vec![
                    ciborium::Value::Text("a".into()),
                    ciborium::Value::Bytes(vec![1, 2, 255]),
                    ciborium::Value::Map(vec![(
                        ciborium::Value::Text("k".into()),
                        ciborium::Value::Bool(true),
                    )]),
                    ciborium::Value::Null,
                ]),
            ),
        ]);
        cases.push(t);
        let mut t = telemetry();
        t.kind = MessageType::Status;
        t.m = None;
        t.epoch = u64::MAX;
        t.seq = u64::MAX;
        t.ts = u64::MAX;
        cases.push(t);
        let mut t = telemetry();
        t.m = Some(BTreeMap::from([
            ("spo2".to_owned(), Number::Int(-5)),
            ("pulse".to_owned(), Number::Int(400)),
            ("resp".to_owned(), Number::Int(12)),
        ]));
        t.ts = 0;
        cases.push(t);
        let checks = [
            None,
            Some(crate::models::ModelCheck {
                status: vitalmq_policies::ModelStatus::OutOfCohort,
                artifact_sha256: Some("ab".repeat(32)),
            }),
            Some(crate::models::ModelCheck {
                status: vitalmq_policies::ModelStatus::Unknown,
                artifact_sha256: None,
            }),
        ];
        for (i, (t, model)) in cases
            .iter()
            .flat_map(|t| checks.iter().map(move |m| (t, m)))
            .enumerate()
        {
            let mut a = assessed(t);
            a.model = model.clone();
            for alg in [Algorithm::EdDsa, Algorithm::Es256] {
                let (verified, mut entry) = signed(t, alg);
                for consent in [Some("care".to_owned()), None] {
                    entry.consent = consent;
                    entry.processing_policy = Some("retain-10y".into());
                    let new = normalized(&verified, &entry, &receipt(), "in_order", &a);
                    assert_eq!(
                        new,
                        normalize_via_value(&verified, &entry, &receipt(), &a),
                        "case {i}"
                    );
                    let json: Json = serde_json::from_str(&new).expect("valid JSON");
                    let status = &json["provenance"]["model_status"];
                    match model {
                        None => assert!(status.is_null(), "no models file, no mark: {new}"),
                        Some(m) => assert_eq!(status, m.status.as_str()),
                    }
                }
            }
        }
    }

    #[test]
    fn integers_beyond_64_bits_are_written_as_they_are() {
        let mut t = telemetry();
        let low = -(1i128 << 64);
        t.m = Some(BTreeMap::from([("x".to_owned(), Number::Int(low))]));
        let (verified, entry) = signed(&t, Algorithm::EdDsa);
        let json = normalized(&verified, &entry, &receipt(), "in_order", &assessed(&t));
        assert!(
            json.contains(r#""m":{"x":-18446744073709551616}"#),
            "{json}"
        );
        // What the replaced construction did with it: a panic in the recorder, so a
        // validly signed message could stop the pipeline.
        let old = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            normalize_via_value(&verified, &entry, &receipt(), &assessed(&t))
        }));
        assert!(old.is_err());
    }

    /// The issue's probes: `ts` = u64::MAX stored `observed_at: null`, `ts` = 0 stored
    /// 1970, and impossible values looked like any other reading.
    #[test]
    fn observed_at_is_never_null_and_skew_and_implausible_values_are_marked() {
        let received = receipt().received_at_ms;
        let ten_years_ahead = received + 10 * 365 * 24 * 3600 * 1000;
        for (ts, direction) in [
            (u64::MAX, Some("ahead")),
            (ten_years_ahead, Some("ahead")),
            (0, Some("behind")),
            (received - 1000, None),
        ] {
            let mut t = telemetry();
            t.ts = ts;
            t.m = Some(BTreeMap::from([
                ("spo2".to_owned(), Number::Int(-5)),
                ("pulse".to_owned(), Number::Int(72)),
            ]));
            let (verified, entry) = signed(&t, Algorithm::EdDsa);
            let event: Json = serde_json::from_str(&normalized(
                &verified,
                &entry,
                &receipt(),
                "in_order",
                &assessed(&t),
            ))
            .expect("json");
            let expected = if direction.is_some() {
                rfc3339_ms(received)
            } else {
                rfc3339_ms(ts)
            };
            assert_eq!(event["observed_at"], json!(expected), "ts {ts}");
            assert_eq!(event["ts"], json!(ts), "the device's ts is kept");
            assert_eq!(
                event["clock_skew"].get("direction").and_then(Json::as_str),
                direction,
                "ts {ts}"
            );
            assert_eq!(
                event["implausible"],
                json!({"spo2": {"min": 0.0, "max": 100.0, "unit": "%"}})
            );
            assert_eq!(event["m"]["spo2"], json!(-5), "the value is kept as sent");
        }
        // A clean reading gains no field.
        let t = telemetry();
        let (verified, entry) = signed(&t, Algorithm::EdDsa);
        let clean = normalized(&verified, &entry, &receipt(), "in_order", &assessed(&t));
        assert!(
            !clean.contains("implausible") && !clean.contains("clock_skew"),
            "{clean}"
        );
    }

    #[test]
    fn event_ids_depend_on_device_epoch_and_seq_only() {
        let a = DeviceId::new("dev-00042").expect("id");
        let b = DeviceId::new("dev-00043").expect("id");
        assert_eq!(event_id(&a, 5, 17), event_id(&a, 5, 17));
        assert_ne!(event_id(&a, 5, 17), event_id(&a, 5, 18));
        assert_ne!(event_id(&a, 5, 17), event_id(&a, 6, 17));
        assert_ne!(event_id(&a, 5, 17), event_id(&b, 5, 17));
        // Epoch and seq are fixed-width, so (1, 23) and (12, 3) cannot collide.
        assert_ne!(event_id(&a, 1, 23), event_id(&a, 12, 3));
        assert_eq!(event_id(&a, 5, 17).len(), 36);
    }

    #[test]
    fn times_out_of_range_are_none() {
        assert_eq!(rfc3339_ms(0).as_deref(), Some("1970-01-01T00:00:00Z"));
        assert_eq!(
            rfc3339_ms(1_718_260_201_000).as_deref(),
            Some("2024-06-13T06:30:01Z")
        );
        assert_eq!(rfc3339_ms(u64::MAX), None);
    }
}
