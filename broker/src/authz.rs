//! The authorization hook: the one place the gate asks "may this identity do this?".
//!
//! [`Authorizer`] is the seam users plug into; [`PolicyAuthorizer`] is the default,
//! answering from the ACL policy file and the device registry (`policies/`). Answers are
//! plain data ([`Verdict`]) so the gate can cache them per connection and audit them.

use std::sync::Arc;

use vitalmq_policies::{
    AclPolicy, DeniedPublishV311, DeviceRegistry, RetainedTelemetry, RoleLimits,
};

use crate::identity::PeerIdentity;

/// An authorization answer and the rule that decided it (for the audit record).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Verdict {
    pub allowed: bool,
    pub rule: String,
}

impl Verdict {
    pub fn allow(rule: impl Into<String>) -> Self {
        Self {
            allowed: true,
            rule: rule.into(),
        }
    }

    pub fn deny(rule: impl Into<String>) -> Self {
        Self {
            allowed: false,
            rule: rule.into(),
        }
    }
}

/// The authorization hook, called with the verified identity (never with what the
/// client claims in MQTT). Implementations must be cheap and must not block: the gate
/// calls them on the connection's task, and caches publish and subscribe answers per
/// connection until the authorizer is replaced.
pub trait Authorizer: Send + Sync + std::fmt::Debug {
    fn connect(&self, who: &PeerIdentity) -> Verdict;
    fn publish(&self, who: &PeerIdentity, topic: &str) -> Verdict;
    fn subscribe(&self, who: &PeerIdentity, filter: &str) -> Verdict;
    /// Unsubscribing cannot widen access; the default allows it.
    fn unsubscribe(&self, _who: &PeerIdentity, _filter: &str) -> Verdict {
        Verdict::allow("unsubscribe")
    }
    /// A will message is a publish the broker makes later on the client's behalf.
    fn will(&self, who: &PeerIdentity, topic: &str) -> Verdict {
        self.publish(who, topic)
    }
    /// Size and rate limits for this identity.
    fn limits(&self, who: &PeerIdentity) -> RoleLimits;
    /// What to do with a denied PUBLISH from an MQTT 3.1.1 client.
    fn denied_publish_v311(&self) -> DeniedPublishV311 {
        DeniedPublishV311::Disconnect
    }
    /// What to do with a retained PUBLISH on a device's telemetry or status topic.
    fn retained_telemetry(&self) -> RetainedTelemetry {
        RetainedTelemetry::Strip
    }
    /// A digest identifying the policy in force, for audit records.
    fn policy_sha256(&self) -> &str;
}

/// The default hook: the ACL policy file plus the device registry.
#[derive(Debug, Clone)]
pub struct PolicyAuthorizer {
    acl: Arc<AclPolicy>,
    registry: Arc<DeviceRegistry>,
}

impl PolicyAuthorizer {
    pub fn new(acl: Arc<AclPolicy>, registry: Arc<DeviceRegistry>) -> Self {
        Self { acl, registry }
    }

    pub fn acl(&self) -> &AclPolicy {
        &self.acl
    }

    pub fn registry(&self) -> &Arc<DeviceRegistry> {
        &self.registry
    }
}

fn verdict(d: vitalmq_policies::Decision) -> Verdict {
    Verdict {
        allowed: d.allowed,
        rule: d.rule,
    }
}

impl Authorizer for PolicyAuthorizer {
    fn connect(&self, who: &PeerIdentity) -> Verdict {
        verdict(self.acl.connect(&who.spiffe, &self.registry))
    }

    fn publish(&self, who: &PeerIdentity, topic: &str) -> Verdict {
        verdict(self.acl.publish(&who.spiffe, topic, &self.registry))
    }

    fn subscribe(&self, who: &PeerIdentity, filter: &str) -> Verdict {
        verdict(self.acl.subscribe(&who.spiffe, filter, &self.registry))
    }

    fn limits(&self, who: &PeerIdentity) -> RoleLimits {
        *self.acl.limits(who.spiffe.role)
    }

    fn denied_publish_v311(&self) -> DeniedPublishV311 {
        self.acl.denied_publish_v311()
    }

    fn retained_telemetry(&self) -> RetainedTelemetry {
        self.acl.retained_telemetry()
    }

    fn policy_sha256(&self) -> &str {
        self.acl.sha256_hex()
    }
}
