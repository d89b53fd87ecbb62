//! Which store rows may enter the surveillance data set: the one judgement, under the
//! `surveillance` purpose and the registry in force, that the Parquet sink
//! (`sink::parquet`) and `vitalmq surveil` both apply, so that the command answers
//! over exactly the rows the data set holds and never reads a non-consenting
//! patient's data into an answer.
//!
//! * events: as the drain judges them ([`judge_recorded`] at `observed_at`);
//! * alert changes: at each evidence reading's observation time, as an alert handler
//!   of the purpose ([`alert_flow`]); operational alerts (`ops/...`) always flow;
//! * scores: at every input reading's observation time with the device that made it,
//!   and at the score's own `observed_at` with its device; an input not in the store
//!   withholds the score (`evidence_missing`);
//! * gaps and refusals name no patient, but a device and a time: they flow only when
//!   the device's assignment at that time had a consent covering the purpose
//!   ([`device_flow`]), so a non-consenting patient's device is not followed through
//!   them either. A refusal naming no device flows (it is nobody's).

use vitalmq_policies::{DeviceRegistry, Purpose};

use crate::delivery::alert_flow;
use crate::governance::{Flow, Reason, decide, judge_recorded};
use crate::store::{Store, StoreError};

const PURPOSE: Purpose = Purpose::Surveillance;

/// Whether an event (`device`, the care `patient_ref` and site it was recorded under,
/// its observation time) flows: the drain's decision for a surveillance sink.
pub fn event_flow(
    registry: &DeviceRegistry,
    device: &str,
    recorded: Option<(&str, &str)>,
    observed_at_ms: u64,
) -> Flow {
    judge_recorded(registry, device, recorded, PURPOSE, observed_at_ms)
}

/// Whether a device-level row (a gap, a refusal) at `at_ms` flows: the device's
/// assignment then must have had a consent covering surveillance.
pub fn device_flow(registry: &DeviceRegistry, device: Option<&str>, at_ms: u64) -> Flow {
    let Some(device) = device else {
        return Flow::Send;
    };
    let Ok(id) = vitalmq_envelope::DeviceId::new(device) else {
        return Flow::Withheld(Reason::Unassigned);
    };
    decide(registry.consent_at(&id, at_ms), PURPOSE, at_ms)
}

/// Whether an alert change flows (its topic and body as stored; `made_at_ms` when the
/// bridge made it): judged at its evidence readings' observation times.
pub fn alert_change_flow(
    registry: &DeviceRegistry,
    store: &Store,
    topic: &str,
    body: &serde_json::Value,
    made_at_ms: u64,
) -> Result<Flow, StoreError> {
    if topic.starts_with("ops/") {
        return Ok(Flow::Send);
    }
    let device = body["device"].as_str();
    let recorded = body["patient_ref"].as_str().zip(body["site"].as_str());
    let mut evidence = Vec::new();
    for id in body["evidence"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_str)
    {
        match store.event_detail(id)? {
            Some(e) => evidence.push(e.observed_at_ms),
            None => return Ok(Flow::Withheld(Reason::EvidenceMissing)),
        }
    }
    Ok(alert_flow(
        registry, PURPOSE, device, recorded, &evidence, made_at_ms,
    ))
}

/// Whether a score flows (its opened `vitalmq-score/v1` payload, the device and time
/// of its row): the recorded patient and site must be the registry's, with consent
/// covering surveillance, at every input's observation time for the input's device
/// and at the score's own time for its device.
pub fn score_flow(
    registry: &DeviceRegistry,
    store: &Store,
    payload: &serde_json::Value,
    device: &str,
    observed_at_ms: u64,
) -> Result<Flow, StoreError> {
    let recorded = payload["patient_ref"]
        .as_str()
        .zip(payload["site"].as_str());
    if let Flow::Withheld(r) = judge_recorded(registry, device, recorded, PURPOSE, observed_at_ms) {
        return Ok(Flow::Withheld(r));
    }
    for id in payload["inputs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["event_id"].as_str())
    {
        let Some(e) = store.event_detail(id)? else {
            return Ok(Flow::Withheld(Reason::EvidenceMissing));
        };
        let flow = judge_recorded(
            registry,
            e.head.device.as_str(),
            recorded,
            PURPOSE,
            e.observed_at_ms,
        );
        if let Flow::Withheld(r) = flow {
            return Ok(Flow::Withheld(r));
        }
    }
    Ok(Flow::Send)
}
