//! The audit record.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Format tag carried by every record.
pub(crate) const FORMAT: &str = "vitalmq-audit/v1";

/// Which component wrote a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    Broker,
    Bridge,
    Cli,
    /// The admin API (`vitalmq admin serve`).
    Admin,
}

/// What happened. New kinds are added at the end; readers keep unknown ones as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    ConnectionAccepted,
    ConnectionRefused,
    ConnectionClosed,
    AuthorizationDenied,
    PolicyReloaded,
    PolicyRejected,
    MessageRefused,
    Replay,
    Gap,
    AlertStateChanged,
    AlertDelivered,
    SinkFailed,
    SinkRecovered,
    OperatorAction,
    ComponentStarted,
    ComponentStopped,
    /// A signed checkpoint over the chain so far (see `checkpoint`).
    Checkpoint,
    /// The log is writable again after a failed write; records refused meanwhile are
    /// counted in `details.refused_records`.
    AuditRecovered,
    /// An alert acknowledgement was applied (SPEC 5.2); `actor.identity` is who.
    AlertAcknowledged,
    /// An alert acknowledgement was refused (`reason`: malformed, unknown_acknowledger,
    /// unknown_alert, other_site, resolved).
    AlertAckRefused,
    /// A call to the admin API, allowed or refused: `actor.identity` the operator,
    /// `action` what it asked, `decision` and `reason` the outcome, `details` its role,
    /// purpose and any break-glass reason.
    AdminRequest,
    /// Events (or alert changes) of one delivered batch withheld from a sink (or alert
    /// handler) by consent (issue 19): `resource` is the sink or handler, `details` the
    /// batch range, purpose and counts per reason. One per batch, never per event.
    EventsWithheld,
    /// One run of the retention job (issue 20): `policy_sha256` the retention policy,
    /// `details` the holds file's hash, `now`, `dry_run`, the counts and instant ranges
    /// per plane and action, what holds kept, and the objects acted on (capped list,
    /// count, SHA-256 over the full sorted list).
    RetentionRun,
    /// A device alarm of a model that needs attention, withheld by the models file's
    /// `[policy] unapproved_alarms = "withhold"` (issue 21): stored, never delivered.
    /// `resource` the device, `details` the alarm code, level, active, model, status
    /// and event id (never patient references).
    AlarmWithheld,
}

/// The security decision a record documents, when there is one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    Deny,
}

/// Who acted: the verified identity and its certificate, and where it came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Actor {
    /// SPIFFE URI, when the identity is known.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cert_serial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cert_sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub addr: Option<String>,
    /// The MQTT client id the party claimed, when it matters (binding refusals).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub client_id: Option<String>,
}

/// One audit record. `seq`, `at`, `prev` and `hash` are filled in by the writer.
/// Unknown fields are refused: a field inserted into a record is tampering, not an
/// extension (a new field comes with a new `format`). `hash` must stay the last field:
/// the hash covers the line's bytes up to its value (`chain::line_hash`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    pub format: String,
    /// Position in this log, from 0.
    pub seq: u64,
    /// RFC 3339 UTC time the record was written.
    pub at: String,
    pub component: Component,
    pub event: Event,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub actor: Option<Actor>,
    /// `connect`, `publish`, `subscribe`, `unsubscribe`, `will`, `verify`, ...
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub action: Option<String>,
    /// Topic, filter, device or alert the action was about.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub resource: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub decision: Option<Decision>,
    /// A stable reason code (a SPEC refusal class, a handshake refusal reason, ...).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    /// The policy rule that decided, when one did.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub policy_sha256: Option<String>,
    /// Further structured fields (counts, old/new hashes, ...). Never payload values.
    #[serde(skip_serializing_if = "Map::is_empty", default)]
    pub details: Map<String, Value>,
    /// Hash of the previous record's line ([`crate::GENESIS`] for the first).
    pub prev: String,
    /// SHA-256 over this record's line with the value of `hash` empty.
    pub hash: String,
}

impl AuditRecord {
    /// A record of `event` by `component`; set the optional fields directly.
    pub fn new(component: Component, event: Event) -> Self {
        Self {
            format: FORMAT.to_owned(),
            seq: 0,
            at: String::new(),
            component,
            event,
            actor: None,
            action: None,
            resource: None,
            decision: None,
            reason: None,
            rule: None,
            policy_sha256: None,
            details: Map::new(),
            prev: String::new(),
            hash: String::new(),
        }
    }

    pub fn actor(mut self, actor: Actor) -> Self {
        self.actor = Some(actor);
        self
    }

    pub fn action(mut self, action: impl Into<String>) -> Self {
        self.action = Some(action.into());
        self
    }

    pub fn resource(mut self, resource: impl Into<String>) -> Self {
        self.resource = Some(resource.into());
        self
    }

    pub fn decision(mut self, decision: Decision) -> Self {
        self.decision = Some(decision);
        self
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    pub fn rule(mut self, rule: impl Into<String>) -> Self {
        self.rule = Some(rule.into());
        self
    }

    pub fn policy_sha256(mut self, hash: impl Into<String>) -> Self {
        self.policy_sha256 = Some(hash.into());
        self
    }

    pub fn detail(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.to_owned(), value.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_have_stable_names() {
        for (event, name) in [
            (Event::AlertAcknowledged, "\"alert_acknowledged\""),
            (Event::AlertAckRefused, "\"alert_ack_refused\""),
            (Event::EventsWithheld, "\"events_withheld\""),
            (Event::RetentionRun, "\"retention_run\""),
            (Event::AlarmWithheld, "\"alarm_withheld\""),
            (Event::AdminRequest, "\"admin_request\""),
        ] {
            assert_eq!(serde_json::to_string(&event).expect("json"), name);
            assert_eq!(serde_json::from_str::<Event>(name).expect("parse"), event);
        }
    }
}
