//! One batch of outbox records as one FHIR R4 `transaction` Bundle, mapped by
//! `vitalmq-fhir` (docs/fhir.md): per record the device's Device (conditional update,
//! the newest facts of the batch; lot, hardware model and region from the registry in
//! force, see [`device_facts`]), and per vitals reading its Observations and their
//! Provenance carrying the device's COSE_Sign1 bytes (conditional creates). Every
//! entry is idempotent, so a batch delivered again creates nothing twice.

use serde_json::Value;
use vitalmq_fhir::{AlertChange, BundleBuilder, DeviceFacts, Event};
use vitalmq_policies::{DeviceEntry, DeviceRegistry};

use tracing::warn;

use super::FhirFailure;
use crate::sink::Batch;
use crate::store::StoredAlert;

/// The transaction Bundle of `batch`, the Devices' lot, hardware model and region read
/// from `registry` (the one in force; `None`: without them); `None` when nothing in
/// the batch maps to FHIR.
pub fn bundle_for(
    batch: &Batch,
    registry: Option<&DeviceRegistry>,
) -> Result<Option<Value>, FhirFailure> {
    let mut bundle = BundleBuilder::new();
    for r in &batch.records {
        // A record that cannot be mapped is left out, never holding the batch (and
        // every other patient's readings behind it) in the outbox forever: counted
        // and logged by position and device, the store keeps it.
        let mut tried = BundleBuilder::new();
        if let Err(e) = map_record(&mut tried, r, registry) {
            metrics::counter!("vitalmq_bridge_fhir_unmapped_total").increment(1);
            warn!(position = r.position, device = %r.device, error = %e, "a stored event does not map to FHIR; left out of the transaction");
            continue;
        }
        for entry in tried.entries() {
            bundle.push(entry.clone());
        }
    }
    Ok((!bundle.is_empty()).then(|| bundle.transaction()))
}

fn map_record(
    bundle: &mut BundleBuilder,
    r: &crate::sink::OutboxRecord,
    registry: Option<&DeviceRegistry>,
) -> Result<(), String> {
    let json: Value = serde_json::from_str(&r.normalized_json).map_err(|e| e.to_string())?;
    let event = Event::from_json(&json).map_err(|e| e.to_string())?;
    let entry = registry.and_then(|reg| {
        vitalmq_envelope::DeviceId::new(r.device.as_str())
            .ok()
            .and_then(|id| reg.device(&id))
    });
    bundle.device(&device_facts(&r.device, &r.site, &event, entry));
    bundle.reading(&event, &r.raw).map_err(|e| e.to_string())?;
    Ok(())
}

/// What the Device of one reading says: the event's own facts (site, wearer,
/// firmware, on-device model) and the registry entry's lot, hardware model and region.
/// One function for the sink and `vitalmq fhir export`, so both map a reading to the
/// same Device.
pub fn device_facts(
    device: &str,
    site: &str,
    event: &Event,
    entry: Option<&DeviceEntry>,
) -> DeviceFacts {
    DeviceFacts {
        id: device.to_owned(),
        site: site.to_owned(),
        patient_ref: Some(event.patient_ref.clone()),
        fw: Some(event.fw.clone()),
        model: event.model.clone(),
        lot: entry.and_then(|e| e.lot.clone()),
        hardware_model: entry.and_then(|e| e.hardware_model.clone()),
        region: entry.and_then(|e| e.region.clone()),
    }
}

/// The transaction Bundle of alert state changes (the `fhir` alert handler): per
/// clinical change its DetectedIssue (conditional create on the alert id), Task
/// (conditional update: the workflow moves on), Communication and Provenance (rule
/// version and policy digest). Operational alerts are fleet records, not the patient's:
/// they are left out. `None` when no change of `alerts` is clinical.
pub fn alert_bundle(alerts: &[StoredAlert]) -> Result<Option<Value>, FhirFailure> {
    let mut bundle = BundleBuilder::new();
    for a in alerts {
        let body: Value = serde_json::from_str(&a.body)
            .map_err(|e| FhirFailure::Mapping(format!("alert at {}: {e}", a.position)))?;
        let change = AlertChange {
            body,
            recorded_at_ms: a.created_at_ms,
        };
        match bundle.alert(&change) {
            Ok(()) | Err(vitalmq_fhir::Error::NotClinical { .. }) => {}
            Err(e) => {
                return Err(FhirFailure::Mapping(format!(
                    "alert at {}: {e}",
                    a.position
                )));
            }
        }
    }
    Ok((!bundle.is_empty()).then(|| bundle.transaction()))
}
