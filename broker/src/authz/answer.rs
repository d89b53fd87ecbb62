//! What an [`Authorizer`](super::Authorizer) answers: a [`Permit`] or a [`Denial`].
//!
//! A `Permit` is the proof the gate's forwarding paths take: it can only be made by
//! granting an [`Ask`], and an `Ask` is only made by the `authz` module when the gate
//! puts a question to an authorizer. A permit is typed by its decision kind
//! ([`kind`]), so a publish permit cannot forward a SUBSCRIBE, and names the resource
//! (topic, filter or identity) it was granted for, which the forwarding path checks.

use std::marker::PhantomData;

/// The kinds of decision, as types: the parameter of [`Permit`] and [`Ask`].
pub mod kind {
    /// Admitting the identity (CONNECT).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Connect;
    /// A PUBLISH to one topic.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Publish;
    /// One SUBSCRIBE filter.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Subscribe;
    /// One UNSUBSCRIBE filter.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Unsubscribe;
    /// The will message a CONNECT carries (a later publish on the client's behalf).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Will;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::kind::Connect {}
    impl Sealed for super::kind::Publish {}
    impl Sealed for super::kind::Subscribe {}
    impl Sealed for super::kind::Unsubscribe {}
    impl Sealed for super::kind::Will {}
}

/// A decision kind; sealed: the gate knows every kind it forwards.
pub trait Kind: sealed::Sealed + Clone + std::fmt::Debug + Send + Sync + 'static {
    /// The audit record's `action` for this kind.
    const ACTION: &'static str;
}

impl Kind for kind::Connect {
    const ACTION: &'static str = "connect";
}
impl Kind for kind::Publish {
    const ACTION: &'static str = "publish";
}
impl Kind for kind::Subscribe {
    const ACTION: &'static str = "subscribe";
}
impl Kind for kind::Unsubscribe {
    const ACTION: &'static str = "unsubscribe";
}
impl Kind for kind::Will {
    const ACTION: &'static str = "will";
}

/// One question the gate puts to an [`Authorizer`](super::Authorizer): may the
/// identity do `K` on `resource`? Only `authz` makes one; an authorizer answers yes
/// with [`Ask::grant`], the one way to make a [`Permit`].
#[derive(Debug)]
pub struct Ask<'a, K: Kind> {
    resource: &'a str,
    kind: PhantomData<fn() -> K>,
}

impl<'a, K: Kind> Ask<'a, K> {
    pub(super) fn new(resource: &'a str) -> Self {
        Self {
            resource,
            kind: PhantomData,
        }
    }

    /// The topic (publish, will), filter (subscribe, unsubscribe) or identity URI
    /// (connect) asked about.
    pub fn resource(&self) -> &'a str {
        self.resource
    }

    /// Yes, by `rule` (named in the audit record).
    pub fn grant(self, rule: impl Into<String>) -> Permit<K> {
        Permit {
            resource: self.resource.to_owned(),
            rule: rule.into(),
            kind: PhantomData,
        }
    }
}

/// An authorizer's yes to one [`Ask`]: kind `K` on one resource, by one rule.
///
/// [`Ask::grant`] is the only way to make one; it cannot be built from its parts:
///
/// ```compile_fail,E0451
/// use vitalmq_broker::authz::{Permit, kind};
///
/// let forged: Permit<kind::Publish> = Permit {
///     resource: "devices/dev-00001/telemetry".into(),
///     rule: "forged".into(),
///     kind: std::marker::PhantomData,
/// };
/// ```
///
/// nor from an `Ask` of its own making:
///
/// ```compile_fail,E0624
/// use vitalmq_broker::authz::{Ask, kind};
///
/// let permit = Ask::<kind::Publish>::new("devices/dev-00001/telemetry").grant("forged");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a permit is what lets the gate forward"]
pub struct Permit<K: Kind> {
    resource: String,
    rule: String,
    kind: PhantomData<fn() -> K>,
}

impl<K: Kind> Permit<K> {
    /// The rule that allowed it.
    pub fn rule(&self) -> &str {
        &self.rule
    }

    /// What it was granted for: a topic, a filter or an identity URI.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// Whether this permit was granted for `resource`.
    pub(crate) fn covers(&self, resource: &str) -> Result<(), Misdirected> {
        if self.resource == resource {
            Ok(())
        } else {
            Err(Misdirected {
                action: K::ACTION,
                granted: self.resource.clone(),
                asked: resource.to_owned(),
            })
        }
    }
}

/// A permit offered for a resource other than the one it was granted for: a gate bug,
/// so the frame is not forwarded and the connection closes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{action} permit for {granted:?} offered for {asked:?}")]
pub struct Misdirected {
    action: &'static str,
    granted: String,
    asked: String,
}

/// Why something was refused. The audit record's `reason` and the reply the client gets
/// (CONNACK, PUBACK/PUBREC, SUBACK/UNSUBACK code, DISCONNECT reason) follow from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// The policy does not allow it.
    NotAuthorized,
    /// CONNECT claimed a client id other than the certificate's (SPEC section 1).
    ClientIdMismatch,
    /// MQTT 3.1.1: an empty client id with CleanSession = 0 (MQTT-3.1.3-8, CONNACK 0x02).
    IdentifierRejected,
    /// MQTT 5 enhanced authentication was asked for; the gate offers none.
    EnhancedAuth,
    /// A payload (or will message) above the role's limit.
    Oversized,
    /// A retained PUBLISH on a telemetry topic under `retained_telemetry = "refuse"`.
    RetainNotSupported,
    /// More filters in one SUBSCRIBE than the role allows.
    TooManyFilters,
    /// A new policy withdrew what a live connection was allowed.
    RevokedByPolicy,
    /// The registry retires the device at or before now (issue 19): it may not connect.
    DeviceRetired,
}

impl DenyReason {
    /// The audit record's `reason`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NotAuthorized => "not_authorized",
            Self::ClientIdMismatch => "client_id_mismatch",
            Self::IdentifierRejected => "identifier_rejected",
            Self::EnhancedAuth => "enhanced_auth",
            Self::Oversized => "oversized",
            Self::RetainNotSupported => "retain_not_supported",
            Self::TooManyFilters => "too_many_filters",
            Self::RevokedByPolicy => "revoked_by_policy",
            Self::DeviceRetired => "device_retired",
        }
    }
}

/// A no: why, and the rule that decided it (for the audit record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub reason: DenyReason,
    pub rule: String,
}

impl Denial {
    pub fn new(reason: DenyReason, rule: impl Into<String>) -> Self {
        Self {
            reason,
            rule: rule.into(),
        }
    }

    /// The policy's no, by `rule`.
    pub fn not_authorized(rule: impl Into<String>) -> Self {
        Self::new(DenyReason::NotAuthorized, rule)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_permit_covers_only_the_resource_it_was_granted_for() {
        let permit = Ask::<kind::Publish>::new("devices/dev-00001/telemetry").grant("own");
        assert_eq!(permit.rule(), "own");
        assert!(permit.covers("devices/dev-00001/telemetry").is_ok());
        let err = permit
            .covers("devices/dev-00002/telemetry")
            .expect_err("another topic");
        assert_eq!(
            err.to_string(),
            "publish permit for \"devices/dev-00001/telemetry\" offered for \"devices/dev-00002/telemetry\""
        );
    }

    #[test]
    fn each_reason_names_its_audit_reason() {
        for (reason, text) in [
            (DenyReason::NotAuthorized, "not_authorized"),
            (DenyReason::ClientIdMismatch, "client_id_mismatch"),
            (DenyReason::EnhancedAuth, "enhanced_auth"),
            (DenyReason::Oversized, "oversized"),
            (DenyReason::RetainNotSupported, "retain_not_supported"),
            (DenyReason::TooManyFilters, "too_many_filters"),
            (DenyReason::RevokedByPolicy, "revoked_by_policy"),
            (DenyReason::DeviceRetired, "device_retired"),
        ] {
            assert_eq!(reason.as_str(), text);
        }
    }
}
