//! The authorization hook: the one place the gate asks "may this identity do this?".
//!
//! [`Authorizer`] is the seam users plug into; [`PolicyAuthorizer`] is the default,
//! answering from the ACL policy file and the device registry (`policies/`). An answer
//! is a [`Permit`] (what the gate's forwarding paths require) or a [`Denial`] (what
//! the audit record and the client's reply code are made from); the gate caches
//! answers per connection.

mod answer;

use std::sync::Arc;

use vitalmq_policies::{
    AclPolicy, DeniedPublishV311, DeviceRegistry, RetainedTelemetry, Role, RoleLimits,
};

pub use answer::{Ask, Denial, DenyReason, Kind, Misdirected, Permit, kind};

use crate::identity::PeerIdentity;

/// The authorization hook, called with the verified identity (never with what the
/// client claims in MQTT). Implementations must be cheap and must not block: the gate
/// calls them on the connection's task, and caches publish answers per connection
/// until the authorizer is replaced. Each question comes as an [`Ask`]; granting it is
/// the only way to make the [`Permit`] the gate needs to forward.
pub trait Authorizer: Send + Sync + std::fmt::Debug {
    /// `ask.resource()` is the identity's SPIFFE URI.
    fn connect(
        &self,
        who: &PeerIdentity,
        ask: Ask<'_, kind::Connect>,
    ) -> Result<Permit<kind::Connect>, Denial>;
    fn publish(
        &self,
        who: &PeerIdentity,
        ask: Ask<'_, kind::Publish>,
    ) -> Result<Permit<kind::Publish>, Denial>;
    fn subscribe(
        &self,
        who: &PeerIdentity,
        ask: Ask<'_, kind::Subscribe>,
    ) -> Result<Permit<kind::Subscribe>, Denial>;
    /// Unsubscribing cannot widen access; the default allows it.
    fn unsubscribe(
        &self,
        _who: &PeerIdentity,
        ask: Ask<'_, kind::Unsubscribe>,
    ) -> Result<Permit<kind::Unsubscribe>, Denial> {
        Ok(ask.grant("unsubscribe"))
    }
    /// A will message is a publish the broker makes later on the client's behalf; the
    /// default answers as for a publish to the will topic.
    fn will(
        &self,
        who: &PeerIdentity,
        ask: Ask<'_, kind::Will>,
    ) -> Result<Permit<kind::Will>, Denial> {
        let publish = self.publish(who, Ask::new(ask.resource()))?;
        Ok(ask.grant(publish.rule()))
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

/// The gate's side of the hook: each question becomes an [`Ask`] here, so no code
/// outside `authz` can make a permit without an authorizer granting it.
impl dyn Authorizer + '_ {
    pub(crate) fn may_connect(&self, who: &PeerIdentity) -> Result<Permit<kind::Connect>, Denial> {
        self.connect(who, Ask::new(&who.spiffe.uri()))
    }

    pub(crate) fn may_publish(
        &self,
        who: &PeerIdentity,
        topic: &str,
    ) -> Result<Permit<kind::Publish>, Denial> {
        self.publish(who, Ask::new(topic))
    }

    pub(crate) fn may_subscribe(
        &self,
        who: &PeerIdentity,
        filter: &str,
    ) -> Result<Permit<kind::Subscribe>, Denial> {
        self.subscribe(who, Ask::new(filter))
    }

    pub(crate) fn may_unsubscribe(
        &self,
        who: &PeerIdentity,
        filter: &str,
    ) -> Result<Permit<kind::Unsubscribe>, Denial> {
        self.unsubscribe(who, Ask::new(filter))
    }

    pub(crate) fn may_will(
        &self,
        who: &PeerIdentity,
        topic: &str,
    ) -> Result<Permit<kind::Will>, Denial> {
        self.will(who, Ask::new(topic))
    }
}

/// The default hook: the ACL policy file plus the device registry. A device the registry
/// retires at or before now is refused at CONNECT ([`DenyReason::DeviceRetired`]); the
/// registry reload that brings a retirement also closes the device's live connection
/// (the gate re-asks `connect` when its authorizer is replaced), and the ACL no longer
/// counts a retired device as its site's, so no gateway relays for it.
#[derive(Debug, Clone)]
pub struct PolicyAuthorizer {
    acl: Arc<AclPolicy>,
    registry: Arc<DeviceRegistry>,
}

impl PolicyAuthorizer {
    pub fn new(acl: Arc<AclPolicy>, registry: Arc<DeviceRegistry>) -> Self {
        Self { acl, registry }
    }
}

/// The audit rule of a refusal for retirement.
pub const RETIRED_RULE: &str = "registry.retired";

/// The policy's decision on `ask`, as an answer.
fn answer<K: Kind>(ask: Ask<'_, K>, d: vitalmq_policies::Decision) -> Result<Permit<K>, Denial> {
    if d.allowed {
        Ok(ask.grant(d.rule))
    } else {
        Err(Denial::not_authorized(d.rule))
    }
}

impl Authorizer for PolicyAuthorizer {
    fn connect(
        &self,
        who: &PeerIdentity,
        ask: Ask<'_, kind::Connect>,
    ) -> Result<Permit<kind::Connect>, Denial> {
        let permit = answer(ask, self.acl.connect(&who.spiffe, &self.registry))?;
        if who.spiffe.role == Role::Device
            && self.registry.retired_now(&who.spiffe.id.to_device_id())
        {
            return Err(Denial::new(DenyReason::DeviceRetired, RETIRED_RULE));
        }
        Ok(permit)
    }

    fn publish(
        &self,
        who: &PeerIdentity,
        ask: Ask<'_, kind::Publish>,
    ) -> Result<Permit<kind::Publish>, Denial> {
        let d = self
            .acl
            .publish(&who.spiffe, ask.resource(), &self.registry);
        answer(ask, d)
    }

    fn subscribe(
        &self,
        who: &PeerIdentity,
        ask: Ask<'_, kind::Subscribe>,
    ) -> Result<Permit<kind::Subscribe>, Denial> {
        let d = self
            .acl
            .subscribe(&who.spiffe, ask.resource(), &self.registry);
        answer(ask, d)
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
