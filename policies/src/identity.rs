//! Identities (SPEC section 1): `spiffe://<trust-domain>/<role>/<id>`.

use std::fmt;
use std::str::FromStr;

use vitalmq_envelope::DeviceId;

/// What a party is allowed to be.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Device,
    Gateway,
    Bridge,
    Integrator,
    Operator,
}

impl Role {
    pub const ALL: [Self; 5] = [
        Self::Device,
        Self::Gateway,
        Self::Bridge,
        Self::Integrator,
        Self::Operator,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::Gateway => "gateway",
            Self::Bridge => "bridge",
            Self::Integrator => "integrator",
            Self::Operator => "operator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| IdentityError::Role(s.escape_debug().take(40).collect()))
    }
}

/// Why an identity string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("`{0}` is not a SPIFFE id of the form spiffe://<trust-domain>/<role>/<id>")]
    Shape(String),
    #[error("`{0}` is not a trust domain (lowercase letters, digits, '.', '-', '_')")]
    TrustDomain(String),
    #[error("`{0}` is not a role (device, gateway, bridge, integrator, operator)")]
    Role(String),
    #[error("`{0}` is not an id: it must match [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}")]
    Id(String),
}

/// A SPIFFE trust domain, e.g. `demo.vitalmq`.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn new(s: impl Into<String>) -> Result<Self, IdentityError> {
        let s = s.into();
        let ok = !s.is_empty()
            && s.len() <= 255
            && s.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            });
        if ok {
            Ok(Self(s))
        } else {
            Err(IdentityError::TrustDomain(
                s.escape_debug().take(80).collect(),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TrustDomain {
    type Error = IdentityError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<TrustDomain> for String {
    fn from(t: TrustDomain) -> Self {
        t.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The id part of any identity. Same grammar as a [`DeviceId`]; a separate type so that
/// an operator's or bridge's id cannot be used where a device is meant.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct PrincipalId(String);

impl PrincipalId {
    pub fn new(s: impl Into<String>) -> Result<Self, IdentityError> {
        let s = s.into();
        match DeviceId::new(s) {
            Ok(id) => Ok(Self(id.into())),
            Err(e) => Err(IdentityError::Id(e.shown)),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The same id as a device id (the grammar is shared, so this cannot fail).
    pub fn to_device_id(&self) -> DeviceId {
        DeviceId::new(self.0.clone()).expect("PrincipalId and DeviceId share one grammar")
    }
}

impl From<DeviceId> for PrincipalId {
    fn from(id: DeviceId) -> Self {
        Self(id.into())
    }
}

impl TryFrom<String> for PrincipalId {
    type Error = IdentityError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<PrincipalId> for String {
    fn from(p: PrincipalId) -> Self {
        p.0
    }
}

impl fmt::Display for PrincipalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `spiffe://<trust-domain>/<role>/<id>`, the authoritative identity of a party.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: TrustDomain,
    pub role: Role,
    pub id: PrincipalId,
}

impl SpiffeId {
    pub fn new(trust_domain: TrustDomain, role: Role, id: PrincipalId) -> Self {
        Self {
            trust_domain,
            role,
            id,
        }
    }

    /// Parses the URI exactly: scheme `spiffe`, no port, query, fragment, user info or
    /// extra path segments.
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let shape = || IdentityError::Shape(uri.escape_debug().take(120).collect());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(shape)?;
        let mut parts = rest.split('/');
        let (Some(td), Some(role), Some(id), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(shape());
        };
        Ok(Self {
            trust_domain: TrustDomain::new(td)?,
            role: role.parse()?,
            id: PrincipalId::new(id)?,
        })
    }

    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/{}/{}",
            self.trust_domain, self.role, self.id
        )
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_spec_example() {
        let id = SpiffeId::parse("spiffe://demo.vitalmq/device/dev-00042").expect("valid");
        assert_eq!(id.role, Role::Device);
        assert_eq!(id.id.as_str(), "dev-00042");
        assert_eq!(id.trust_domain.as_str(), "demo.vitalmq");
        assert_eq!(id.uri(), "spiffe://demo.vitalmq/device/dev-00042");
    }

    #[test]
    fn refuses_everything_else() {
        for bad in [
            "spiffe://demo.vitalmq/device",
            "spiffe://demo.vitalmq/device/dev-1/extra",
            "spiffe://Demo.vitalmq/device/dev-1",
            "spiffe://demo.vitalmq:443/device/dev-1",
            "spiffe://demo.vitalmq/admin/dev-1",
            "spiffe://demo.vitalmq/device/-dev",
            "spiffe://demo.vitalmq/device/dev-1?x=1",
            "https://demo.vitalmq/device/dev-1",
            "spiffe:///device/dev-1",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }
}
