//! The normalized event: the canonical, provenance-carrying form of one accepted
//! message (issue 4, plane 2). Pure: the same inputs give byte-identical JSON.
//!
//! The event id is derived from `(device, epoch, seq)` alone (SPEC section 4), so a
//! message delivered twice can never yield two events:
//! `ev1-` + the first 32 hex digits of SHA-256("vitalmq/event/v1" 0x00 device 0x00
//! epoch as 8 bytes big-endian, seq as 8 bytes big-endian).

use serde_json::{Map, Value as Json, json};
use sha2::{Digest as _, Sha256};
use vitalmq_envelope::{DeviceId, Telemetry, Verified, json::cbor_to_json};
use vitalmq_policies::DeviceEntry;

/// Version of this transformation, recorded in every event's provenance. Bump it when
/// the mapping from message to event changes.
pub const TRANSFORMATION: &str = "vitalmq-normalize/1";
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
    /// Sequence verdict detail.
    pub verdict: &'a str,
}

/// RFC 3339 UTC text of a Unix time in milliseconds, `None` when out of range.
pub fn rfc3339_ms(ms: u64) -> Option<String> {
    let nanos = i128::from(ms) * 1_000_000;
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()?;
    t.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

/// Builds the normalized event JSON (one line, no trailing newline).
pub fn normalize(
    verified: &Verified<Telemetry>,
    device: &DeviceEntry,
    receipt: &Receipt<'_>,
) -> String {
    let t: &Telemetry = verified;
    let measurements: Map<String, Json> =
        t.m.iter()
            .flatten()
            .map(|(k, v)| {
                let n = match v {
                    vitalmq_envelope::Number::Int(i) => json!(i),
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
    let event = json!({
        "format": EVENT_FORMAT,
        "event_id": event_id(&t.dev, t.epoch, t.seq),
        "device": t.dev.as_str(),
        "site": device.site.as_str(),
        "patient_ref": device.patient_ref,
        "epoch": t.epoch,
        "seq": t.seq,
        "type": t.kind.as_str(),
        "ts": t.ts,
        "observed_at": rfc3339_ms(t.ts),
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
            "sequence": receipt.verdict,
            "transformation": TRANSFORMATION,
            "consent": device.consent,
            "processing_policy": device.processing_policy,
        },
    });
    event.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

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
