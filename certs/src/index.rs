//! The CA's state on disk (`ca/index.json`): every certificate it issued, which are
//! revoked, and the number of the last CRL. `issue` and `revoke` read it, change it and
//! replace it; the CRL is always re-derived from it.
//!
//! ```json
//! { "format": "vitalmq-ca-index/v1", "trust_domain": "demo.vitalmq", "crl_number": 2,
//!   "certs": [ { "serial": "3A0F..", "kind": "identity", "role": "device", "id": "dev-00001",
//!                "cert": "identities/device/dev-00001.pem",
//!                "not_before": "2025-..Z", "not_after": "2026-..Z",
//!                "revoked_at": null, "reason": null } ] }
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use vitalmq_policies::{PrincipalId, Role, TrustDomain};

use crate::ca::{Serial, rfc3339};
use crate::crl::{Reason, Revoked};
use crate::error::CertsError;

pub(crate) const FORMAT: &str = "vitalmq-ca-index/v1";

/// What kind of leaf an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertKind {
    /// The broker's TLS server certificate.
    Server,
    /// A SPIFFE identity certificate.
    Identity,
}

/// One issued certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexEntry {
    /// Upper-case hex, as `openssl x509 -serial` prints it.
    pub serial: String,
    pub kind: CertKind,
    /// Set for identities.
    pub role: Option<Role>,
    /// The identity's id, or `broker` for the server certificate.
    pub id: String,
    /// Path of the certificate, relative to the PKI directory.
    pub cert: PathBuf,
    pub not_before: String,
    pub not_after: String,
    pub revoked_at: Option<String>,
    pub reason: Option<Reason>,
}

/// The whole index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Index {
    pub format: String,
    pub trust_domain: TrustDomain,
    /// Number of the CRL last written (`crl.pem`); the next one gets this plus one.
    pub crl_number: u64,
    pub certs: Vec<IndexEntry>,
}

/// Which certificate to revoke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Identity { role: Role, id: PrincipalId },
    Serial(Serial),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Identity { role, id } => write!(f, "{role} `{id}`"),
            Self::Serial(s) => write!(f, "serial {s}"),
        }
    }
}

impl Index {
    pub(crate) fn new(trust_domain: TrustDomain) -> Self {
        Self {
            format: FORMAT.to_owned(),
            trust_domain,
            crl_number: 0,
            certs: Vec::new(),
        }
    }

    pub(crate) fn parse(text: &str, path: &Path) -> Result<Self, CertsError> {
        let index: Self = serde_json::from_str(text).map_err(|source| CertsError::Index {
            path: path.to_path_buf(),
            source,
        })?;
        if index.format != FORMAT {
            return Err(CertsError::IndexFormat {
                path: path.to_path_buf(),
                found: index.format,
            });
        }
        Ok(index)
    }

    pub(crate) fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self)
            .expect("the index is plain data with string keys, it always serializes");
        s.push('\n');
        s
    }

    /// The live (unrevoked) certificate of an identity, if any.
    pub(crate) fn live_identity(&self, role: Role, id: &PrincipalId) -> Option<&IndexEntry> {
        self.certs.iter().find(|e| {
            e.kind == CertKind::Identity
                && e.role == Some(role)
                && e.id == id.as_str()
                && e.revoked_at.is_none()
        })
    }

    /// Marks the certificate `target` names as revoked; returns the entry.
    pub(crate) fn revoke(
        &mut self,
        target: &Target,
        at: OffsetDateTime,
        reason: Reason,
    ) -> Result<&IndexEntry, CertsError> {
        let position = match target {
            Target::Identity { role, id } => {
                let matches = |e: &IndexEntry| {
                    e.kind == CertKind::Identity && e.role == Some(*role) && e.id == id.as_str()
                };
                self.certs
                    .iter()
                    .position(|e| matches(e) && e.revoked_at.is_none())
                    .or_else(|| self.certs.iter().position(matches))
            }
            Target::Serial(serial) => {
                let hex = serial.to_hex();
                self.certs.iter().position(|e| e.serial == hex)
            }
        }
        .ok_or_else(|| CertsError::NotFound(target.to_string()))?;
        let entry = &mut self.certs[position];
        if entry.revoked_at.is_some() {
            return Err(CertsError::AlreadyRevoked(entry.serial.clone()));
        }
        entry.revoked_at = Some(rfc3339(at));
        entry.reason = Some(reason);
        Ok(entry)
    }

    /// The revoked certificates, for the CRL.
    pub(crate) fn revoked(&self) -> Result<Vec<Revoked>, CertsError> {
        self.certs
            .iter()
            .filter_map(|e| e.revoked_at.as_ref().map(|at| (e, at)))
            .map(|(e, at)| {
                Ok(Revoked {
                    serial: Serial::from_hex(&e.serial)?,
                    revoked_at: OffsetDateTime::parse(at, &Rfc3339).map_err(|source| {
                        CertsError::RevokedAt {
                            serial: e.serial.clone(),
                            source,
                        }
                    })?,
                    reason: e.reason.unwrap_or(Reason::Unspecified),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(serial: &str, role: Role, id: &str) -> IndexEntry {
        IndexEntry {
            serial: serial.into(),
            kind: CertKind::Identity,
            role: Some(role),
            id: id.into(),
            cert: PathBuf::from(format!("identities/{role}/{id}.pem")),
            not_before: "2025-01-01T00:00:00Z".into(),
            not_after: "2026-01-01T00:00:00Z".into(),
            revoked_at: None,
            reason: None,
        }
    }

    #[test]
    fn revoke_by_identity_or_serial_and_never_twice() {
        let mut index = Index::new(TrustDomain::new("demo.vitalmq").expect("td"));
        index.certs.push(entry("0A01", Role::Device, "dev-00001"));
        index.certs.push(entry("0B02", Role::Device, "dev-00002"));
        let now = OffsetDateTime::now_utc();
        let dev1 = Target::Identity {
            role: Role::Device,
            id: PrincipalId::new("dev-00001").expect("id"),
        };
        assert_eq!(
            index
                .revoke(&dev1, now, Reason::KeyCompromise)
                .expect("ok")
                .serial,
            "0A01"
        );
        assert!(matches!(
            index.revoke(&dev1, now, Reason::KeyCompromise),
            Err(CertsError::AlreadyRevoked(_))
        ));
        let by_serial = Target::Serial(Serial::from_hex("0b02").expect("hex"));
        assert_eq!(
            index
                .revoke(&by_serial, now, Reason::Superseded)
                .expect("ok")
                .id,
            "dev-00002"
        );
        let gw = Target::Identity {
            role: Role::Gateway,
            id: PrincipalId::new("dev-00001").expect("id"),
        };
        assert!(matches!(
            index.revoke(&gw, now, Reason::Unspecified),
            Err(CertsError::NotFound(_))
        ));
        let revoked = index.revoked().expect("revoked");
        assert_eq!(revoked.len(), 2);
        assert_eq!(revoked[0].reason, Reason::KeyCompromise);

        let json = index.to_json();
        let back = Index::parse(&json, Path::new("index.json")).expect("round trip");
        assert_eq!(back, index);
        assert!(Index::parse("{}", Path::new("index.json")).is_err());
    }
}
