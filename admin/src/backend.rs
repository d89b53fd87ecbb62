//! What the admin API reads and changes. The binary implements it with the same code
//! the CLI runs (the store reads, `registry_cmd::apply`, `hold_cmd::apply`, the
//! re-identification store, `erase_cmd::erase`, `export_cmd::export`), so an answer
//! through the API is the answer of the local command.

use serde_json::Value;

/// Which patient-linked rows to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    Events,
    Alerts,
    Quarantine,
}

/// One record read, with the site it belongs to (for the caller's scope); `None` when
/// the record names none (it is then outside every site-scoped caller's scope).
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub site: Option<String>,
    pub body: Value,
}

/// Who acts on a change or lookup, as the audit records of the backend name them.
#[derive(Debug, Clone)]
pub struct Acting {
    /// SPIFFE id of the operator.
    pub identity: String,
    pub role: String,
    pub purpose: String,
}

/// Why the backend did not do what it was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// Nothing of that id (HTTP 404).
    #[error("not found: {0}")]
    NotFound(String),
    /// The request is invalid or refused by the rules it is checked against (HTTP
    /// 422): an overlapping assignment, an unknown purpose, an unauthorised lookup.
    #[error("{0}")]
    Refused(String),
    /// The caller's scope, checked again by the backend on what it read under the
    /// registry's lock, does not cover the change (HTTP 403, `outside_scope`).
    #[error("{0}")]
    OutsideScope(String),
    /// The backend is busy (a registry lock held past its deadline); nothing was done
    /// and the call may be repeated (HTTP 503).
    #[error("{0}")]
    Busy(String),
    /// The backend could not do it (HTTP 500).
    #[error("{0}")]
    Failed(String),
    /// What the call needs is not configured (HTTP 501): legal holds without a holds
    /// file in the admin configuration, an export without `exports_dir`.
    #[error("{0}")]
    NotConfigured(String),
    /// The state of the data refuses the request (HTTP 409): an erasure under a legal
    /// hold or while a device is still assigned to the patient, an export of an erased
    /// patient. Nothing was done; it may succeed once that state changes.
    #[error("{0}")]
    Conflict(String),
}

/// Whether the caller's scope allows a change of a device that served these sites
/// (`None`: a device the registry does not know): `Some(why)` refuses it. The backend
/// runs it on the registry as read under the lock the change is made under.
pub type ScopeCheck = dyn Fn(Option<&[String]>) -> Option<String> + Send + Sync;

/// The data behind the API.
pub trait Backend: Send + Sync + 'static {
    /// Rows of one kind, of `device` only when given.
    fn rows(&self, rows: Rows, device: Option<&str>) -> Result<Vec<Record>, BackendError>;
    /// The provenance chain of an alert (`al-...`) or event (`ev1-...`).
    fn trace(&self, id: &str) -> Result<Record, BackendError>;
    /// Every site the device was ever assigned to (its scope for changes).
    fn device_sites(&self, device: &str) -> Result<Vec<String>, BackendError>;
    /// Applies a registry change (`{"change": "assign", ...}`) to `device`, refused
    /// with [`BackendError::OutsideScope`] when `scope` (if given) refuses it.
    fn change(
        &self,
        device: &str,
        change: Value,
        acting: &Acting,
        scope: Option<&ScopeCheck>,
    ) -> Result<Value, BackendError>;
    /// The enrolment id behind a pseudonym.
    fn reid_lookup(&self, pseudonym: &str, acting: &Acting) -> Result<Value, BackendError>;
    /// Every legal hold, active and lifted.
    fn holds(&self) -> Result<Vec<Value>, BackendError> {
        Err(not_configured())
    }
    /// Places the hold `hold` (`{"id", "reason", "patient_ref"|"device"|"from"|"to"}`)
    /// as `acting`; the hold as placed.
    fn place_hold(&self, hold: Value, acting: &Acting) -> Result<Value, BackendError> {
        let _ = (hold, acting);
        Err(not_configured())
    }
    /// Lifts the active hold `id` (`lift`: `{"reason"}`) as `acting`; the lifted hold.
    fn lift_hold(&self, id: &str, lift: Value, acting: &Acting) -> Result<Value, BackendError> {
        let _ = (id, lift, acting);
        Err(not_configured())
    }
    /// Erases the patient `patient_ref` by crypto-shredding (`{"reason"}`) as `acting`;
    /// the erasure report. Refused ([`BackendError::Conflict`]) under a legal hold or
    /// while a device is assigned to the patient.
    fn erase_patient(
        &self,
        patient_ref: &str,
        request: Value,
        acting: &Acting,
    ) -> Result<Value, BackendError> {
        let _ = (patient_ref, request, acting);
        Err(BackendError::NotConfigured(
            "erasure is not served here".into(),
        ))
    }
    /// Exports the data of the patient `patient_ref` (`{"purpose"?}`) as `acting` into a
    /// new directory; the manifest and where it is. Refused
    /// ([`BackendError::Conflict`]) for an erased patient.
    fn export_patient(
        &self,
        patient_ref: &str,
        request: Value,
        acting: &Acting,
    ) -> Result<Value, BackendError> {
        let _ = (patient_ref, request, acting);
        Err(BackendError::NotConfigured(
            "no exports directory in the admin configuration (`exports_dir`)".into(),
        ))
    }
}

fn not_configured() -> BackendError {
    BackendError::NotConfigured("no legal holds file in the admin configuration (`holds`)".into())
}
