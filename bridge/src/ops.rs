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
}

impl OpsKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Backlog => "backlog",
            Self::Store => "store",
            Self::Audit => "audit",
            Self::Sink => "sink",
        }
    }
}

/// One operational alert message.
#[derive(Debug, Clone, PartialEq)]
pub struct OpsAlert {
    pub kind: OpsKind,
    /// `open` or `resolved`.
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

    pub fn is_open(&self, kind: OpsKind, subject: &str) -> bool {
        self.open.contains_key(&(kind, subject.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
