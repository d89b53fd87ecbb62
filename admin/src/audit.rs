//! The admin audit log: one `admin_request` record (component `admin`) per call,
//! allowed or refused, appended as a session of [`vitalmq_audit::operator::append`]
//! (exclusive lock, chained, a signed checkpoint, synced) before the response leaves.
//! Verify with `vitalmq audit verify LOG --trusted-key HEX` (the public key is
//! `audit-signing.key.pem.pub` beside the log).
//!
//! A record names the operator (`actor.identity`, certificate fingerprint and serial,
//! address), `action`, `resource` (a device, alert or event id, a pseudonym, a hold id
//! or `patient/<pseudonym>`: never a patient value), `decision`, `reason` (the outcome:
//! `allowed`, `break_glass`, `succeeded`, `failed`, `not_found`, `conflict`, or
//! `refused:<why>`), and in `details` the role, purpose, break-glass reason, HTTP
//! status and row counts (for an erasure the keys destroyed and rows made unreadable,
//! for an export the manifest's SHA-256, counts and directory).
//!
//! A call no handler answered (a wrong method, an undecodable path, a body too large or
//! too slow) is recorded as `action` `request`, `resource` the path, with `reason`
//! `refused:method_not_allowed`, `refused:bad_request`, `refused:body_too_large` or
//! `refused:body_timeout` and the method and status in `details`.

use std::path::PathBuf;

use serde_json::{Map, Value};
use vitalmq_audit::operator::{OperatorLogError, append};
use vitalmq_audit::{Actor, AuditRecord, Component, Decision, Event};

use crate::access::Caller;

/// One call's audit record, before it is written.
#[derive(Debug, Clone)]
pub struct Entry {
    pub action: String,
    pub resource: Option<String>,
    pub decision: Decision,
    pub reason: String,
    pub role: Option<String>,
    pub purpose: Option<String>,
    pub policy_sha256: Option<String>,
    pub details: Map<String, Value>,
}

impl Entry {
    pub fn new(action: impl Into<String>, resource: Option<String>) -> Self {
        Self {
            action: action.into(),
            resource,
            decision: Decision::Deny,
            reason: String::new(),
            role: None,
            purpose: None,
            policy_sha256: None,
            details: Map::new(),
        }
    }

    pub fn detail(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.to_owned(), value.into());
        self
    }

    fn record(&self, caller: Option<&Caller>) -> AuditRecord {
        let actor = Actor {
            identity: caller.and_then(|c| c.identity.as_ref().map(ToString::to_string)),
            cert_serial: caller.and_then(|c| c.cert_serial.clone()),
            cert_sha256: caller.and_then(|c| c.cert_sha256.clone()),
            addr: caller.map(|c| c.addr.to_string()),
            client_id: None,
        };
        let mut record = AuditRecord::new(Component::Admin, Event::AdminRequest)
            .actor(actor)
            .action(self.action.clone())
            .decision(self.decision)
            .reason(self.reason.clone());
        if let Some(r) = &self.resource {
            record = record.resource(r.clone());
        }
        if let Some(p) = &self.policy_sha256 {
            record = record.policy_sha256(p.clone());
        }
        if let Some(role) = &self.role {
            record.details.insert("role".into(), role.clone().into());
        }
        if let Some(purpose) = &self.purpose {
            record
                .details
                .insert("purpose".into(), purpose.clone().into());
        }
        record.details.extend(self.details.clone());
        record
    }
}

/// The admin audit log.
#[derive(Debug, Clone)]
pub struct AdminAudit {
    log: PathBuf,
}

impl AdminAudit {
    pub fn new(log: PathBuf) -> Self {
        Self { log }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.log
    }

    /// Writes `entry` for `caller` and returns once it is on disk.
    pub async fn record(
        &self,
        caller: Option<&Caller>,
        entry: &Entry,
    ) -> Result<(), OperatorLogError> {
        let record = entry.record(caller);
        let log = self.log.clone();
        tracing::info!(
            action = %entry.action,
            identity = record.actor.as_ref().and_then(|a| a.identity.as_deref()).unwrap_or("-"),
            outcome = %entry.reason,
            "admin request"
        );
        tokio::task::spawn_blocking(move || append(&log, vec![record]))
            .await
            .unwrap_or_else(|e| {
                Err(OperatorLogError::Io {
                    path: PathBuf::new(),
                    source: std::io::Error::other(format!("audit task failed: {e}")),
                })
            })
    }
}
