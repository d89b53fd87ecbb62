//! Where the gate's audit records go, and what it does when they cannot go anywhere.

use vitalmq_audit::AuditRecord;

/// Where audit records go; the server passes the audit log's handle.
pub trait AuditSink: Send + Sync + std::fmt::Debug {
    /// Err means the record could not be queued: the caller must stop the work.
    fn record(&self, record: AuditRecord) -> Result<(), AuditUnavailable>;

    /// False while the log is known not to be writing (a write failed): the gate then
    /// hands no new connection to rumqttd.
    fn healthy(&self) -> bool {
        true
    }
}

/// The audit log cannot take the record (full queue, failed write, stopped writer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("audit log unavailable")]
pub struct AuditUnavailable;

impl AuditSink for vitalmq_audit::Auditor {
    fn record(&self, record: AuditRecord) -> Result<(), AuditUnavailable> {
        vitalmq_audit::Auditor::record(self, record).map_err(|e| {
            tracing::error!(error = %e, "audit record could not be queued");
            AuditUnavailable
        })
    }

    fn healthy(&self) -> bool {
        vitalmq_audit::Auditor::healthy(self)
    }
}
