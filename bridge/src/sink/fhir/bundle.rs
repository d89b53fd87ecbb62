//! One batch of outbox records as one FHIR R4 `transaction` Bundle, mapped by
//! `vitalmq-fhir` (docs/fhir.md): per record the device's Device (conditional update,
//! the newest facts of the batch), and per vitals reading its Observations and their
//! Provenance carrying the device's COSE_Sign1 bytes (conditional creates). Every
//! entry is idempotent, so a batch delivered again creates nothing twice.

use serde_json::Value;
use vitalmq_fhir::{BundleBuilder, DeviceFacts, Event};

use super::FhirFailure;
use crate::sink::{Batch, OutboxRecord};

/// The transaction Bundle of `batch`; `None` when nothing in it maps to FHIR.
pub fn bundle_for(batch: &Batch) -> Result<Option<Value>, FhirFailure> {
    let mut bundle = BundleBuilder::new();
    for r in &batch.records {
        let json: Value = serde_json::from_str(&r.normalized_json)
            .map_err(|e| FhirFailure::Mapping(format!("event at {}: {e}", r.position)))?;
        let event = Event::from_json(&json)
            .map_err(|e| FhirFailure::Mapping(format!("event at {}: {e}", r.position)))?;
        bundle.device(&facts(r, &event));
        bundle
            .reading(&event, &r.raw)
            .map_err(|e| FhirFailure::Mapping(format!("event at {}: {e}", r.position)))?;
    }
    Ok((!bundle.is_empty()).then(|| bundle.transaction()))
}

/// What the Device says: the event's own facts and the registry's (lot, hardware
/// model, region: `None` until the device registry carries them, issue 21).
fn facts(r: &OutboxRecord, event: &Event) -> DeviceFacts {
    DeviceFacts {
        id: r.device.clone(),
        site: r.site.clone(),
        patient_ref: Some(event.patient_ref.clone()),
        fw: Some(event.fw.clone()),
        model: event.model.clone(),
        lot: None,
        hardware_model: None,
        region: None,
    }
}
