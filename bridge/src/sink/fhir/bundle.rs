//! One batch of outbox records as one FHIR R4 `transaction` Bundle of conditional
//! creates: every entry `POST <type>` with `ifNoneExist = identifier=<system>|<value>`,
//! so a batch delivered again (after a timeout, a crash) creates nothing twice.
//!
//! PLACEHOLDER until the mapping crate (`vitalmq-fhir`) is merged: one minimal
//! Observation per event, identified by its event id.

use serde_json::{Value, json};

use super::FhirFailure;
use crate::sink::Batch;

/// Identifier system of an event (the mapping's).
const EVENT_SYSTEM: &str = "urn:vitalmq:event";

/// The transaction Bundle of `batch`.
pub fn bundle_for(batch: &Batch) -> Result<Value, FhirFailure> {
    let mut entries = Vec::with_capacity(batch.records.len());
    for r in &batch.records {
        let observation = json!({
            "resourceType": "Observation",
            "status": "final",
            "identifier": [{"system": EVENT_SYSTEM, "value": r.event_id}],
            "code": {"text": "vitalmq event"},
            "effectiveDateTime": rfc3339(r.observed_at_ms)?,
            "issued": rfc3339(r.received_at_ms)?,
        });
        entries.push(entry(observation, EVENT_SYSTEM, &r.event_id));
    }
    Ok(json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}))
}

/// A conditional-create entry of `resource`, identified by `system|value`.
fn entry(resource: Value, system: &str, value: &str) -> Value {
    let kind = resource["resourceType"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    json!({
        "resource": resource,
        "request": {
            "method": "POST",
            "url": kind,
            "ifNoneExist": format!("identifier={system}|{value}"),
        }
    })
}

fn rfc3339(ms: u64) -> Result<String, FhirFailure> {
    let bad = |e: String| FhirFailure::Mapping(format!("time {ms}: {e}"));
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|e| bad(e.to_string()))?
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(|e| bad(e.to_string()))
}
