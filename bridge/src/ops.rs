//! Operational alerts of the bridge (SPEC section 5): published to
//! `ops/bridge/{kind}`, never mixed with clinical alerts. Each condition is an episode:
//! `open` when it starts, `resolved` when it ends, with the same `alert_id`.

use serde_json::{Map, Value as Json, json};

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpsKind {
    /// The outbox reached `max_backlog`: new messages are not acknowledged.
    Backlog,
    /// The store cannot be written (disk full, unwritable directory).
    Store,
    /// The audit log cannot be written: the bridge takes no new work.
    Audit,
    /// A sink has been failing.
    Sink,
    /// Messages failing verification above the configured rate.
    Refusals,
    /// Replay attempts above the configured rate.
    Replays,
    /// Sequence gaps (data-completeness events) above the configured rate.
    Gaps,
    /// A certificate the bridge uses expires within the configured number of days.
    CertExpiry,
    /// An audit log to ship no longer continues the chain already shipped (rotated,
    /// replaced, truncated or edited), so it is not shipped.
    AuditShip,
    /// An audit log on this host grew past its limit, or its disk is nearly full
    /// (`audit_size`).
    AuditDisk,
    /// A device's battery is low and it is not charging (issue 17).
    Battery,
    /// A device dropped messages from its own buffer (`dropped` in `status`): data lost
    /// before the bridge could record it.
    Dropped,
    /// An acknowledgement was refused (malformed, unknown alert, another site's alert,
    /// already resolved, unknown acknowledger); a one-off record (`state` = `event`).
    AckRefused,
    /// The fleet-wide count of devices with an open `no-data` alert.
    NoData,
    /// The last reload of the device registry failed: consent may be out of date, so
    /// sinks and alert handlers of purposes other than care are paused.
    RegistryStale,
    /// Devices report a model the model registry does not approve for them (unknown,
    /// draft, withdrawn, out of cohort): one episode per model, with fleet counts.
    ModelUnapproved,
}

impl OpsKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Backlog => "backlog",
            Self::Store => "store",
            Self::Audit => "audit",
            Self::Sink => "sink",
            Self::Refusals => "refusals",
            Self::Replays => "replays",
            Self::Gaps => "gaps",
            Self::CertExpiry => "cert_expiry",
            Self::AuditShip => "audit_ship",
            Self::AuditDisk => "audit_disk",
            Self::Battery => "battery",
            Self::Dropped => "dropped",
            Self::AckRefused => "ack_refused",
            Self::NoData => "no_data",
            Self::RegistryStale => "registry_stale",
            Self::ModelUnapproved => "model_unapproved",
        }
    }
}

/// One operational alert message.
#[derive(Debug, Clone, PartialEq)]
pub struct OpsAlert {
    pub kind: OpsKind,
    /// `open` or `resolved`; `event` for a one-off record (a refused ack, dropped
    /// messages).
    pub state: &'static str,
    pub alert_id: String,
    pub reason: String,
    pub details: Map<String, Json>,
    pub at_ms: u64,
}

impl OpsAlert {
    pub fn topic(&self) -> String {
        format!("ops/bridge/{}", self.kind.as_str())
    }

    pub fn to_json(&self) -> String {
        let mut v = json!({
            "alert_id": self.alert_id,
            "kind": "operational",
            "component": "bridge",
            "type": self.kind.as_str(),
            "state": self.state,
            "reason": self.reason,
            "raised_at": crate::normalize::rfc3339_ms(self.at_ms),
        });
        if let Json::Object(m) = &mut v {
            m.extend(self.details.clone());
        }
        v.to_string()
    }
}

/// Tracks which conditions are open, so each is raised once and resolved once.
#[derive(Debug, Default)]
pub struct Episodes {
    open: std::collections::HashMap<(OpsKind, String), String>,
}

impl Episodes {
    /// An alert to send if `(kind, subject)` was not open yet.
    pub fn raise(
        &mut self,
        kind: OpsKind,
        subject: &str,
        reason: impl Into<String>,
        details: Map<String, Json>,
        now_ms: u64,
    ) -> Option<OpsAlert> {
        let key = (kind, subject.to_owned());
        if self.open.contains_key(&key) {
            return None;
        }
        let alert_id = format!("ops-bridge-{}-{subject}-{now_ms}", kind.as_str());
        self.open.insert(key, alert_id.clone());
        Some(OpsAlert {
            kind,
            state: "open",
            alert_id,
            reason: reason.into(),
            details,
            at_ms: now_ms,
        })
    }

    /// The resolving alert if `(kind, subject)` was open.
    pub fn resolve(&mut self, kind: OpsKind, subject: &str, now_ms: u64) -> Option<OpsAlert> {
        let alert_id = self.open.remove(&(kind, subject.to_owned()))?;
        Some(OpsAlert {
            kind,
            state: "resolved",
            alert_id,
            reason: "recovered".into(),
            details: Map::new(),
            at_ms: now_ms,
        })
    }
}

/// Counts events per kind over a sliding minute and says when a rate crosses its limit
/// (raise) and when it has been back under it for a whole minute (resolve). Pure: the
/// caller passes the time.
#[derive(Debug)]
pub struct RateWatch {
    kind: OpsKind,
    per_minute: u64,
    /// (second, count) buckets of the last 60 s.
    buckets: std::collections::VecDeque<(u64, u64)>,
    raised: bool,
    quiet_since_ms: Option<u64>,
}

/// What a [`RateWatch`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateChange {
    Raise { count: u64 },
    Resolve,
}

impl RateWatch {
    /// `per_minute == 0` disables the watch.
    pub fn new(kind: OpsKind, per_minute: u64) -> Self {
        Self {
            kind,
            per_minute,
            buckets: std::collections::VecDeque::new(),
            raised: false,
            quiet_since_ms: None,
        }
    }

    pub fn kind(&self) -> OpsKind {
        self.kind
    }

    /// Records `n` events at `now_ms` and returns a change, if any.
    pub fn observe(&mut self, n: u64, now_ms: u64) -> Option<RateChange> {
        if self.per_minute == 0 {
            return None;
        }
        let second = now_ms / 1000;
        while self.buckets.front().is_some_and(|(s, _)| *s + 60 <= second) {
            self.buckets.pop_front();
        }
        if n > 0 {
            match self.buckets.back_mut() {
                Some((s, c)) if *s == second => *c += n,
                _ => self.buckets.push_back((second, n)),
            }
        }
        let count: u64 = self.buckets.iter().map(|(_, c)| c).sum();
        if count > self.per_minute {
            self.quiet_since_ms = None;
            if !self.raised {
                self.raised = true;
                return Some(RateChange::Raise { count });
            }
        } else if self.raised {
            let since = *self.quiet_since_ms.get_or_insert(now_ms);
            if now_ms.saturating_sub(since) >= 60_000 {
                self.raised = false;
                self.quiet_since_ms = None;
                return Some(RateChange::Resolve);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_over_the_limit_raises_once_and_resolves_after_a_quiet_minute() {
        let mut w = RateWatch::new(OpsKind::Replays, 5);
        let t0 = 1_000_000;
        for i in 0..5 {
            assert_eq!(
                w.observe(1, t0 + i * 1000),
                None,
                "at the limit, not over it"
            );
        }
        assert_eq!(
            w.observe(1, t0 + 5000),
            Some(RateChange::Raise { count: 6 })
        );
        assert_eq!(w.observe(3, t0 + 6000), None, "raised once");
        // The events age out of the minute; then a quiet minute resolves it.
        assert_eq!(w.observe(0, t0 + 70_000), None);
        assert_eq!(w.observe(0, t0 + 129_000), None);
        assert_eq!(w.observe(0, t0 + 130_000), Some(RateChange::Resolve));
        assert_eq!(w.observe(0, t0 + 200_000), None);
        let mut off = RateWatch::new(OpsKind::Gaps, 0);
        assert_eq!(off.observe(1_000, t0), None, "0 disables");
    }

    #[test]
    fn a_condition_is_raised_once_and_resolved_once_with_the_same_id() {
        let mut e = Episodes::default();
        let open = e
            .raise(OpsKind::Store, "db", "disk full", Map::new(), 1000)
            .expect("raised");
        assert!(
            e.raise(OpsKind::Store, "db", "disk full", Map::new(), 2000)
                .is_none()
        );
        let done = e.resolve(OpsKind::Store, "db", 3000).expect("resolved");
        assert_eq!(open.alert_id, done.alert_id);
        assert!(e.resolve(OpsKind::Store, "db", 4000).is_none());
        let j: Json = serde_json::from_str(&open.to_json()).expect("json");
        assert_eq!(j["kind"], "operational");
        assert_eq!(j["state"], "open");
        assert_eq!(open.topic(), "ops/bridge/store");
    }
}
