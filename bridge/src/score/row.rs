//! One `scores` row (schema v5) and its payload (`vitalmq-score/v1`).

use crate::derived_id::derived_id;

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
    derived_id(
        "sc",
        "vitalmq/score/v1",
        &[patient_ref, model, version, event_id],
    )
}

/// The deterministic id of a score alert episode: `al-` + the first 32 hex digits of
/// SHA-256("vitalmq/score-alert/v1" 0x00 patient 0x00 version 0x00 rule 0x00 opening
/// event id).
pub fn alert_id(patient_ref: &str, version: &str, rule: &str, opening_event: &str) -> String {
    derived_id(
        "al",
        "vitalmq/score-alert/v1",
        &[patient_ref, version, rule, opening_event],
    )
}
