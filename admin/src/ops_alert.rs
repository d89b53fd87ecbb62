//! The operational alert a break-glass read raises (SPEC section 5, topic
//! `ops/admin/break_glass`): written durably, one JSON line per alert, to the
//! configured outbox before the read it allows is answered. It names who read what
//! under which role, never the stated reason (that is in the audit record) or any
//! patient value.

use std::io::Write as _;
use std::path::PathBuf;

use serde_json::{Value, json};

/// The topic the alert is meant for.
pub const TOPIC: &str = "ops/admin/break_glass";

/// The break-glass outbox.
#[derive(Debug, Clone)]
pub struct OpsOutbox {
    path: PathBuf,
}

/// What a break-glass read was.
#[derive(Debug, Clone)]
pub struct BreakGlass<'a> {
    pub identity: &'a str,
    pub role: &'a str,
    pub action: &'a str,
    pub resource: Option<&'a str>,
    pub device: Option<&'a str>,
    pub sites: &'a [String],
    pub audit_log: &'a str,
}

impl OpsOutbox {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// The alert JSON of `read` raised at `now` (RFC 3339).
    pub fn alert(read: &BreakGlass<'_>, now: &str, nonce: &str) -> Value {
        json!({
            "alert_id": format!("ops-admin-break-glass-{nonce}"),
            "kind": "operational",
            "state": "open",
            "severity": "urgent",
            "rule": "break-glass",
            "component": "admin",
            "reason": "break_glass",
            "topic": TOPIC,
            "identity": read.identity,
            "role": read.role,
            "action": read.action,
            "resource": read.resource,
            "device": read.device,
            "sites": read.sites,
            "audit_log": read.audit_log,
            "raised_at": now,
        })
    }

    /// Appends `alert` and syncs it.
    pub async fn write(&self, alert: &Value) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(alert).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            vitalmq_private_fs::create_parent(&path)?;
            let mut file = vitalmq_private_fs::create_options()
                .create(true)
                .append(true)
                .open(&path)?;
            file.write_all(&line)?;
            file.sync_all()
        })
        .await
        .map_err(std::io::Error::other)?
    }
}
