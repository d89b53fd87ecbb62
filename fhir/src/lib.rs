//! FHIR R4 mapping of vitalmq data (issue 22; the mapping and its reasons are in
//! `docs/fhir.md`). Pure: inputs are the normalized event JSON, the alert JSON as
//! published, device facts and the raw COSE_Sign1 bytes; outputs are FHIR resources as
//! `serde_json` values and Bundles of them. No I/O, no clock: the same inputs give the
//! same resources, ids included ([`ids`]), so a re-sent Bundle is idempotent.
//!
//! - [`codes`]: the measurement table (LOINC, UCUM, vital-signs profile per metric).
//! - [`observation`]: one accepted reading to Observations (BP as one panel).
//! - [`device`]: device facts to Device.
//! - [`alert`]: one clinical alert state change to DetectedIssue, Task, Communication.
//! - [`provenance`]: the chain of custody of a reading (with the device's COSE_Sign1
//!   as `Provenance.signature`) and of an alert state change.
//! - [`bundle`]: transaction Bundles with conditional create / update requests.
//! - [`read`]: the signed readings a Bundle carries, for re-verification.

pub mod alert;
pub mod bundle;
pub mod codes;
pub mod device;
pub mod event;
pub mod ids;
pub mod observation;
pub mod provenance;
pub mod read;

pub use alert::{AlertChange, AlertResources};
pub use bundle::{BundleBuilder, Entry, Request};
pub use device::DeviceFacts;
pub use event::Event;
pub use read::SignedReading;

/// Why an input could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The normalized event JSON lacks a field or has a wrong type.
    #[error("normalized event: {0}")]
    Event(#[source] serde_json::Error),
    /// The alert JSON lacks a field or has a wrong type.
    #[error("alert: {0}")]
    Alert(#[source] serde_json::Error),
    /// Only clinical alerts go to FHIR; operational ones are fleet records.
    #[error("alert {alert_id} is {kind}, not clinical")]
    NotClinical { alert_id: String, kind: String },
    /// An alert state SPEC section 5 does not define.
    #[error("alert {alert_id}: unknown state {state:?}")]
    UnknownState { alert_id: String, state: String },
    /// A device-clock or reception time outside the RFC 3339 range.
    #[error("time {0} ms is out of range")]
    Time(u64),
    /// A Bundle (or resource) that is not what [`read`] expects.
    #[error("bundle: {0}")]
    Bundle(String),
}
