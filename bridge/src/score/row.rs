//! One `scores` row (schema v5) and its payload (`vitalmq-score/v1`).

use sha2::{Digest as _, Sha256};

/// A score on its way to the store: the clear columns, and the payload JSON that is
/// sealed for the patient (context `score|<score_id>`).
#[derive(Debug, Clone, PartialEq)]
pub struct NewScore {
    pub score_id: String,
    pub patient_ref: String,
    pub site: String,
    /// The device whose reading triggered the score.
    pub device: String,
    pub model: String,
    pub version: String,
    pub config_sha256: String,
    /// `live`, `shadow` or `canary`.
    pub role: String,
    pub observed_at_ms: u64,
    pub created_at_ms: u64,
    pub payload: String,
}

/// The deterministic id of a score: `sc-` + the first 32 hex digits of
/// SHA-256("vitalmq/score/v1" 0x00 patient 0x00 model 0x00 version 0x00 triggering
/// event id). Scoring the same reading again (a batch the store could not take, resent)
/// gives the same id, which the store keeps once.
pub fn score_id(patient_ref: &str, model: &str, version: &str, event_id: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"vitalmq/score/v1\0");
    for part in [patient_ref, model, version] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    h.update(event_id.as_bytes());
    format!("sc-{}", hex::encode(&h.finalize()[..16]))
}

/// The deterministic id of a score alert episode: `al-` + the first 32 hex digits of
/// SHA-256("vitalmq/score-alert/v1" 0x00 patient 0x00 version 0x00 rule 0x00 opening
/// event id).
pub fn alert_id(patient_ref: &str, version: &str, rule: &str, opening_event: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"vitalmq/score-alert/v1\0");
    for part in [patient_ref, version, rule] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    h.update(opening_event.as_bytes());
    format!("al-{}", hex::encode(&h.finalize()[..16]))
}
