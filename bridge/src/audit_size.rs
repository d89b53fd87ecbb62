//! Audit disk use: the size of every audit log on this host the bridge knows (its own
//! and those it ships, e.g. the broker's) and the free space of the file system each is
//! on, as metrics (`vitalmq_audit_log_bytes{component}`,
//! `vitalmq_audit_disk_free_bytes{component}`) and as the operational alert
//! `ops/bridge/audit_disk`: raised when a log grows past `ops.audit_max_bytes` or its
//! file system has less than `ops.audit_min_free_bytes` left, resolved when neither
//! holds. The broker has no operational topic of its own, so its log is watched here.
//!
//! [`assess`] is the pure rule; [`watch`] the loop that measures every
//! `ops.audit_check_interval_s`.

use std::path::Path;
use std::time::Duration;

use serde_json::{Map, json};
use tokio::sync::{mpsc, watch};
use tracing::warn;

use crate::audit_ship::ShippedLog;
use crate::ops::{Episodes, OpsAlert, OpsKind};
use crate::recorder::now_ms;

/// The limits, from `[ops]` (0 turns one off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_bytes: u64,
    pub min_free_bytes: u64,
}

/// What one measurement found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measured {
    pub log_bytes: u64,
    pub free_bytes: u64,
}

/// Why a log needs attention, if it does.
pub fn assess(limits: Limits, m: Measured) -> Option<&'static str> {
    if limits.max_bytes > 0 && m.log_bytes > limits.max_bytes {
        Some("audit_log_large")
    } else if limits.min_free_bytes > 0 && m.free_bytes < limits.min_free_bytes {
        Some("audit_disk_low")
    } else {
        None
    }
}

fn measure(path: &Path) -> std::io::Result<Measured> {
    let log_bytes = std::fs::metadata(path)?.len();
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let fs = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    let free_bytes = fs.blocks_available().saturating_mul(fs.fragment_size());
    Ok(Measured {
        log_bytes,
        free_bytes,
    })
}

/// Measures every `every` until `stop`, sending alert changes to `ops`.
pub async fn watch(
    logs: Vec<ShippedLog>,
    limits: Limits,
    every: Duration,
    ops: mpsc::UnboundedSender<OpsAlert>,
    mut stop: watch::Receiver<bool>,
) {
    let mut episodes = Episodes::default();
    loop {
        let now = now_ms();
        for log in &logs {
            let m = match measure(&log.path) {
                Ok(m) => m,
                Err(e) => {
                    warn!(component = %log.component, path = %log.path.display(), error = %e, "cannot measure an audit log");
                    continue;
                }
            };
            let labels = [("component", log.component.clone())];
            metrics::gauge!("vitalmq_audit_log_bytes", &labels).set(m.log_bytes as f64);
            metrics::gauge!("vitalmq_audit_disk_free_bytes", &labels).set(m.free_bytes as f64);
            let change = match assess(limits, m) {
                Some(reason) => {
                    let mut details = Map::new();
                    details.insert("audit_component".into(), json!(log.component));
                    details.insert("log_bytes".into(), json!(m.log_bytes));
                    details.insert("free_bytes".into(), json!(m.free_bytes));
                    details.insert("max_bytes".into(), json!(limits.max_bytes));
                    details.insert("min_free_bytes".into(), json!(limits.min_free_bytes));
                    warn!(component = %log.component, log_bytes = m.log_bytes, free_bytes = m.free_bytes, reason, "audit disk use needs attention");
                    episodes.raise(OpsKind::AuditDisk, &log.component, reason, details, now)
                }
                None => episodes.resolve(OpsKind::AuditDisk, &log.component, now),
            };
            if let Some(alert) = change {
                let _ = ops.send(alert);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_bytes: 1_000,
        min_free_bytes: 500,
    };

    #[test]
    fn a_large_log_or_a_full_disk_needs_attention() {
        let ok = Measured {
            log_bytes: 1_000,
            free_bytes: 500,
        };
        assert_eq!(assess(LIMITS, ok), None);
        assert_eq!(
            assess(
                LIMITS,
                Measured {
                    log_bytes: 1_001,
                    ..ok
                }
            ),
            Some("audit_log_large")
        );
        assert_eq!(
            assess(
                LIMITS,
                Measured {
                    free_bytes: 499,
                    ..ok
                }
            ),
            Some("audit_disk_low")
        );
        let off = Limits {
            max_bytes: 0,
            min_free_bytes: 0,
        };
        assert_eq!(
            assess(
                off,
                Measured {
                    log_bytes: u64::MAX,
                    free_bytes: 0
                }
            ),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_alert_opens_once_and_resolves_when_the_log_is_back_under_its_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, vec![b'x'; 2_000]).expect("write");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = watch::channel(false);
        let limits = Limits {
            max_bytes: 1_000,
            min_free_bytes: 0,
        };
        let logs = vec![ShippedLog {
            component: "broker".into(),
            path: path.clone(),
            retention: "audit-7y".into(),
            own: None,
        }];
        let task = tokio::spawn(super::watch(
            logs,
            limits,
            Duration::from_secs(60),
            tx,
            stop_rx,
        ));
        let open = rx.recv().await.expect("open");
        assert_eq!((open.kind, open.state), (OpsKind::AuditDisk, "open"));
        assert_eq!(open.reason, "audit_log_large");
        assert_eq!(open.details["audit_component"], "broker");
        assert_eq!(open.details["log_bytes"], 2_000);

        // Still too large a minute later: no second alert. Then shipped and cut back.
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert!(rx.try_recv().is_err(), "raised twice");
        std::fs::write(&path, b"x").expect("truncate");
        let resolved = rx.recv().await.expect("resolved");
        assert_eq!(resolved.state, "resolved");
        assert_eq!(resolved.alert_id, open.alert_id);
        stop_tx.send(true).expect("stop");
        task.await.expect("task");
    }
}
