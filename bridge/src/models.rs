//! Device-side models checked against the model registry (issue 21): the `model` a
//! device reports on vitals and alarms is resolved into a [`ModelStatus`], recorded in
//! the normalized event's provenance (`model_status`, `model_artifact_sha256`) and
//! counted per `(model, status)` (`vitalmq_bridge_model_messages_total`).
//!
//! Without `[models]` in the bridge configuration nothing is resolved or recorded: the
//! normalized events are byte for byte what they were before.

use vitalmq_envelope::Telemetry;
use vitalmq_policies::{DeviceEntry, DeviceFacts, ModelRegistry, ModelStatus, RuleSet};

/// What the registry made of one message's reported model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelCheck {
    pub status: ModelStatus,
    /// The registry entry's `artifact_sha256`, when the model is in the registry.
    pub artifact_sha256: Option<String>,
}

/// Resolves the model `telemetry` reports for the device `entry` (attributed site,
/// hardware model), its cohorts in `rules` and the firmware the message carries.
pub fn check(
    models: &ModelRegistry,
    rules: Option<&RuleSet>,
    entry: &DeviceEntry,
    telemetry: &Telemetry,
) -> ModelCheck {
    let cohorts = rules.map(|r| r.cohorts_of(&entry.id)).unwrap_or_default();
    let facts = DeviceFacts {
        site: Some(&entry.site),
        cohorts: &cohorts,
        fw: Some(telemetry.fw.as_str()).filter(|f| !f.is_empty()),
        hardware_model: entry.hardware_model.as_deref(),
    };
    let reported = telemetry.model.as_deref();
    let status = models.resolve(reported, &facts);
    let artifact_sha256 = reported
        .and_then(|r| models.reported_entry(r))
        .map(|e| e.artifact_sha256.clone());
    // Only registered models get their own label: a device reporting arbitrary text
    // must not grow the metric without bound.
    let label = match (status, reported) {
        (ModelStatus::Unknown, _) => "(unknown)".to_owned(),
        (_, Some(r)) => r.to_owned(),
        (_, None) => "(none)".to_owned(),
    };
    metrics::counter!(
        "vitalmq_bridge_model_messages_total",
        "model" => label,
        "status" => status.as_str()
    )
    .increment(1);
    ModelCheck {
        status,
        artifact_sha256,
    }
}
