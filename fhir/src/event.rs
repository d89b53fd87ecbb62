//! The normalized event (`vitalmq-event/v1`, bridge `normalize.rs`) as the mapping
//! reads it: only the fields FHIR needs; everything else is ignored.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value as Json;

/// One accepted message, as normalized and stored by the bridge.
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    pub event_id: String,
    pub device: String,
    pub site: String,
    pub patient_ref: String,
    pub epoch: u64,
    pub seq: u64,
    /// `vitals`, `status` or `alarm`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The device clock (ms since the Unix epoch), as signed.
    pub ts: u64,
    /// The time the bridge relies on (RFC 3339): the device's `ts`, or the reception
    /// time when the device clock was outside the policy.
    #[serde(default)]
    pub observed_at: Option<String>,
    /// Reception by the bridge (RFC 3339).
    pub received_at: Option<String>,
    /// Measurements; a non-finite float is `null`.
    #[serde(default)]
    pub m: BTreeMap<String, Json>,
    /// Signal quality 0..1.
    pub q: Option<f64>,
    pub fw: String,
    /// The on-device model (`name/version`) that produced or filtered `m`.
    pub model: Option<String>,
    pub provenance: EventProvenance,
    /// Metric -> the plausibility limits it broke.
    #[serde(default)]
    pub implausible: BTreeMap<String, Json>,
    /// Present when the device clock was outside the policy.
    pub clock_skew: Option<Json>,
}

/// The event's own provenance block.
#[derive(Debug, Clone, Deserialize)]
pub struct EventProvenance {
    pub kid: String,
    pub alg: String,
    /// SHA-256 (hex) of the raw COSE_Sign1 bytes.
    pub raw_sha256: String,
    /// Who published (a device's or a gateway's SPIFFE id).
    pub publisher: String,
    /// The bridge that verified and recorded it.
    pub bridge: String,
    pub transformation: String,
    pub consent: Option<String>,
}

impl Event {
    /// Reads a normalized event.
    pub fn from_json(value: &Json) -> Result<Self, crate::Error> {
        Self::deserialize(value).map_err(crate::Error::Event)
    }

    /// When the reading was taken, as FHIR can say it: the device clock, or when that
    /// is beyond what RFC 3339 can write (after year 9999: SPEC allows any u64 and the
    /// bridge accepts it, marked `clock_skew`) the bridge's `observed_at` (else the
    /// reception time), with `true`. A reading is never unmappable for its clock.
    pub fn effective(&self) -> Result<(String, bool), crate::Error> {
        match crate::ids::instant(self.ts) {
            Ok(t) => Ok((t, false)),
            Err(e) => self
                .observed_at
                .clone()
                .or_else(|| self.received_at.clone())
                .map(|t| (t, true))
                .ok_or(e),
        }
    }

    /// Whether a gateway (not the device itself) relayed the message.
    pub fn relayed_by(&self) -> Option<&str> {
        let own = format!("/device/{}", self.device);
        (!self.provenance.publisher.ends_with(&own) && self.provenance.publisher.contains("://"))
            .then_some(self.provenance.publisher.as_str())
    }
}
