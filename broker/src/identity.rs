//! The identity of a TLS peer, taken from its leaf certificate (SPEC section 1).
//!
//! Pure: [`cert_identity`] reads DER and answers what the certificate proves; the TLS
//! verifier ([`crate::tls::SpiffeClientVerifier`]) calls it during the handshake so a
//! certificate without an acceptable identity fails the handshake, and the acceptor
//! ([`crate::accept`]) calls it again on the verified leaf to build the [`PeerIdentity`].
//!
//! # Common-Name fallback
//!
//! With `cn_fallback` on, a certificate *without any* URI SAN may name its id in the
//! subject CN. Such a certificate does not state a role, so [`cert_identity`] yields a
//! [`CertName::CommonName`] and the role is resolved from the device registry by
//! [`resolve_cn_role`] ([`CertIdentity::resolve`]): a registered device is a `device`, a
//! gateway or integrator bound to a site is a `gateway` / `integrator`. An id found in
//! more than one list, or in none, has no role and is refused (`cn_role_unknown`):
//! bridges and operators, which the registry does not list, must carry a SPIFFE URI.
//! A [`PeerIdentity`] therefore always has a real role; its [`IdentitySource`] says
//! where the role came from.

use std::fmt;

use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use vitalmq_policies::{DeviceRegistry, PrincipalId, Role, SpiffeId, TrustDomain};
use x509_parser::extensions::GeneralName;

/// Where a [`PeerIdentity`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdentitySource {
    /// The certificate's SPIFFE URI SAN (the normal case).
    SanUri,
    /// The subject CN (only with `cn_fallback`); the role came from the registry.
    CommonName,
}

impl IdentitySource {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::SanUri => "san_uri",
            Self::CommonName => "common_name",
        }
    }
}

impl fmt::Display for IdentitySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The authenticated identity of a connection: only [`CertIdentity::resolve`] makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub spiffe: SpiffeId,
    pub source: IdentitySource,
    /// The certificate serial, upper-case hex without leading zero bytes (as
    /// `vitalmq_certs::Serial::to_hex` and `openssl x509 -serial` print it).
    pub serial_hex: String,
    /// SHA-256 of the leaf certificate DER, lower-case hex.
    pub fingerprint_sha256_hex: String,
    pub not_after: OffsetDateTime,
}

/// The name a certificate carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertName {
    /// A SPIFFE id of the configured trust domain.
    Spiffe(SpiffeId),
    /// A bare id from the subject CN (`cn_fallback` only); the role is still unknown.
    CommonName(PrincipalId),
}

/// What a leaf certificate proves, before a CN-only identity gets its role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    pub name: CertName,
    pub serial_hex: String,
    pub fingerprint_sha256_hex: String,
    pub not_after: OffsetDateTime,
}

/// Why a certificate does not carry an acceptable identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("the certificate is not valid X.509 DER: {0}")]
    BadCertificate(String),
    #[error("the certificate has no URI SAN (spiffe://<trust-domain>/<role>/<id>)")]
    NoSpiffeUri,
    #[error("the certificate has {count} URI SANs; exactly one SPIFFE id is allowed")]
    MultipleUris { count: usize },
    #[error("the URI SAN is not a SPIFFE id: {0}")]
    BadSpiffeId(vitalmq_policies::IdentityError),
    #[error(
        "the URI SAN names role `{0}`, not one of device, gateway, bridge, integrator, operator"
    )]
    BadRole(String),
    #[error("the URI SAN names an invalid id: {0}")]
    BadId(vitalmq_policies::IdentityError),
    #[error("trust domain `{found}` is not the configured `{expected}`")]
    ForeignTrustDomain { found: String, expected: String },
    #[error("no URI SAN and the subject CN is missing, repeated or not a valid id")]
    BadCommonName,
    #[error("CN `{0}` is not exactly one registered device, gateway or integrator")]
    CnRoleUnknown(String),
}

impl IdentityError {
    /// A stable token for audit records and metrics labels.
    pub const fn reason(&self) -> &'static str {
        match self {
            Self::BadCertificate(_) => "bad_certificate",
            Self::NoSpiffeUri => "no_spiffe_uri",
            Self::MultipleUris { .. } => "multiple_uris",
            Self::BadSpiffeId(_) => "bad_spiffe_id",
            Self::BadRole(_) => "bad_role",
            Self::BadId(_) => "bad_id",
            Self::ForeignTrustDomain { .. } => "foreign_trust_domain",
            Self::BadCommonName => "bad_common_name",
            Self::CnRoleUnknown(_) => "cn_role_unknown",
        }
    }
}

/// Reads the identity of a leaf certificate (DER). Does not check the chain, validity
/// or revocation: that is the TLS verifier's job, and it runs first.
pub fn cert_identity(
    der: &[u8],
    trust_domain: &TrustDomain,
    cn_fallback: bool,
) -> Result<CertIdentity, IdentityError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(IdentityError::BadCertificate(
            "trailing bytes after the certificate".into(),
        ));
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    let name = match uris.as_slice() {
        [] if cn_fallback => CertName::CommonName(common_name(&cert)?),
        [] => return Err(IdentityError::NoSpiffeUri),
        [uri] => CertName::Spiffe(spiffe_of(uri, trust_domain)?),
        many => return Err(IdentityError::MultipleUris { count: many.len() }),
    };
    let raw_serial = cert.raw_serial();
    let first = raw_serial
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw_serial.len().saturating_sub(1));
    Ok(CertIdentity {
        name,
        serial_hex: hex::encode_upper(&raw_serial[first..]),
        fingerprint_sha256_hex: hex::encode(Sha256::digest(der)),
        not_after: cert.validity().not_after.to_datetime(),
    })
}

impl CertIdentity {
    /// Turns what the certificate proves into a [`PeerIdentity`]; a CN-only identity
    /// gets its role from [`resolve_cn_role`].
    pub(crate) fn resolve(
        self,
        trust_domain: &TrustDomain,
        registry: Option<&DeviceRegistry>,
    ) -> Result<PeerIdentity, IdentityError> {
        let (spiffe, source) = match self.name {
            CertName::Spiffe(id) => (id, IdentitySource::SanUri),
            CertName::CommonName(cn) => {
                let role = registry
                    .and_then(|r| resolve_cn_role(&cn, r))
                    .ok_or_else(|| IdentityError::CnRoleUnknown(cn.to_string()))?;
                (
                    SpiffeId::new(trust_domain.clone(), role, cn),
                    IdentitySource::CommonName,
                )
            }
        };
        Ok(PeerIdentity {
            spiffe,
            source,
            serial_hex: self.serial_hex,
            fingerprint_sha256_hex: self.fingerprint_sha256_hex,
            not_after: self.not_after,
        })
    }
}

/// The role of a CN-only identity: `device` if the registry lists it as a device,
/// `gateway` / `integrator` if it is bound to a site as one. `None` if it is in none of
/// the lists, or in more than one (ambiguous, so refused).
pub(crate) fn resolve_cn_role(cn: &PrincipalId, registry: &DeviceRegistry) -> Option<Role> {
    let mut found = [
        (registry.device(&cn.to_device_id()).is_some(), Role::Device),
        (registry.gateway_site(cn).is_some(), Role::Gateway),
        (registry.integrator_site(cn).is_some(), Role::Integrator),
    ]
    .into_iter()
    .filter_map(|(hit, role)| hit.then_some(role));
    match (found.next(), found.next()) {
        (Some(role), None) => Some(role),
        _ => None,
    }
}

fn spiffe_of(uri: &str, trust_domain: &TrustDomain) -> Result<SpiffeId, IdentityError> {
    use vitalmq_policies::IdentityError as E;
    let id = SpiffeId::parse(uri).map_err(|e| match e {
        E::Role(role) => IdentityError::BadRole(role),
        e @ E::Id(_) => IdentityError::BadId(e),
        e => IdentityError::BadSpiffeId(e),
    })?;
    if &id.trust_domain != trust_domain {
        return Err(IdentityError::ForeignTrustDomain {
            found: id.trust_domain.to_string(),
            expected: trust_domain.to_string(),
        });
    }
    Ok(id)
}

fn common_name(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<PrincipalId, IdentityError> {
    let mut cns = cert.subject().iter_common_name();
    let (Some(cn), None) = (cns.next(), cns.next()) else {
        return Err(IdentityError::BadCommonName);
    };
    let text = cn.as_str().map_err(|_| IdentityError::BadCommonName)?;
    PrincipalId::new(text).map_err(|_| IdentityError::BadCommonName)
}

#[cfg(test)]
mod tests {
    use time::Duration;
    use vitalmq_certs::{Ca, Validity};

    use super::*;

    /// The identity of a leaf certificate, with a CN-only identity's role resolved from
    /// `registry` (`None`: no registry, so a CN-only certificate is refused).
    fn identity_from_leaf(
        der: &[u8],
        trust_domain: &TrustDomain,
        cn_fallback: bool,
        registry: Option<&DeviceRegistry>,
    ) -> Result<PeerIdentity, IdentityError> {
        cert_identity(der, trust_domain, cn_fallback)?.resolve(trust_domain, registry)
    }

    fn td(s: &str) -> TrustDomain {
        TrustDomain::new(s).expect("trust domain")
    }

    fn issue(ca: &Ca, uri_td: &str, role: Role, id: &str) -> Vec<u8> {
        let spiffe = SpiffeId::new(td(uri_td), role, PrincipalId::new(id).expect("id"));
        let validity = Validity::days_from(OffsetDateTime::now_utc(), 1);
        ca.issue_identity(&spiffe, validity)
            .expect("issue")
            .cert_der
    }

    #[test]
    fn a_spiffe_certificate_yields_its_identity() {
        let ca = Ca::generate(
            td("demo.vitalmq"),
            Validity::days_from(OffsetDateTime::now_utc(), 2),
        )
        .expect("ca");
        let der = issue(&ca, "demo.vitalmq", Role::Gateway, "gw-site-01");
        let id = identity_from_leaf(&der, &td("demo.vitalmq"), false, None).expect("identity");
        assert_eq!(id.spiffe.role, Role::Gateway);
        assert_eq!(id.spiffe.id.as_str(), "gw-site-01");
        assert_eq!(id.source, IdentitySource::SanUri);
        assert_eq!(id.fingerprint_sha256_hex, hex::encode(Sha256::digest(&der)));
        assert!(id.not_after > OffsetDateTime::now_utc() + Duration::hours(23));

        let err = identity_from_leaf(&der, &td("other.vitalmq"), false, None).expect_err("foreign");
        assert_eq!(err.reason(), "foreign_trust_domain");
        let err = cert_identity(b"not a certificate", &td("demo.vitalmq"), true).expect_err("junk");
        assert_eq!(err.reason(), "bad_certificate");
    }

    #[test]
    fn cn_roles_come_from_the_registry_and_ambiguity_is_refused() {
        let mut registry = DeviceRegistry::new(td("demo.vitalmq"));
        let site = vitalmq_policies::SiteId::new("site-01").expect("site");
        let gw = PrincipalId::new("gw-1").expect("id");
        registry.insert_gateway(gw.clone(), site.clone());
        assert_eq!(resolve_cn_role(&gw, &registry), Some(Role::Gateway));
        registry.insert_integrator(gw.clone(), site);
        assert_eq!(resolve_cn_role(&gw, &registry), None, "ambiguous");
        let nobody = PrincipalId::new("nobody").expect("id");
        assert_eq!(resolve_cn_role(&nobody, &registry), None);
    }
}
