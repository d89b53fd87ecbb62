//! Certificate revocation lists, signed by the CA.
//!
//! The whole list is re-signed on every change, with a CRL number one higher than the
//! last (RFC 5280 section 5.2.3), so a broker that reloads it can tell newer from older.

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams};
use time::{Duration, OffsetDateTime};

use crate::ca::{Ca, Serial};
use crate::error::CertsError;

/// How long a CRL is valid by default: after `next_update` OpenSSL-based peers treat the
/// CRL as expired and refuse every certificate, so dev setups want a generous window.
pub(crate) const DEFAULT_CRL_DAYS: u32 = 30;

/// Why a certificate was revoked (RFC 5280 CRLReason, the ones that make sense here).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    Unspecified,
    KeyCompromise,
    CaCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
    CertificateHold,
    PrivilegeWithdrawn,
}

impl Reason {
    fn to_rcgen(self) -> RevocationReason {
        match self {
            Self::Unspecified => RevocationReason::Unspecified,
            Self::KeyCompromise => RevocationReason::KeyCompromise,
            Self::CaCompromise => RevocationReason::CaCompromise,
            Self::AffiliationChanged => RevocationReason::AffiliationChanged,
            Self::Superseded => RevocationReason::Superseded,
            Self::CessationOfOperation => RevocationReason::CessationOfOperation,
            Self::CertificateHold => RevocationReason::CertificateHold,
            Self::PrivilegeWithdrawn => RevocationReason::PrivilegeWithdrawn,
        }
    }
}

/// One entry of the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    pub serial: Serial,
    pub revoked_at: OffsetDateTime,
    pub reason: Reason,
}

impl Ca {
    /// Signs a CRL listing `revoked`, valid from `this_update` for `days` days.
    pub fn sign_crl(
        &self,
        revoked: &[Revoked],
        crl_number: u64,
        this_update: OffsetDateTime,
        days: u32,
    ) -> Result<String, CertsError> {
        let params = CertificateRevocationListParams {
            this_update,
            next_update: this_update + Duration::days(i64::from(days.max(1))),
            crl_number: rcgen::SerialNumber::from(crl_number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|r| RevokedCertParams {
                    serial_number: r.serial.to_rcgen(),
                    revocation_time: r.revoked_at,
                    // `unspecified` SHOULD be absent rather than encoded (RFC 5280 5.3.1).
                    reason_code: (r.reason != Reason::Unspecified).then(|| r.reason.to_rcgen()),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(self.issuer())?.pem()?)
    }
}

#[cfg(test)]
mod tests {
    use vitalmq_policies::TrustDomain;

    use super::*;
    use crate::ca::Validity;

    #[test]
    fn a_crl_lists_the_revoked_serials_and_names_the_ca_as_issuer() {
        let now = OffsetDateTime::now_utc();
        let ca = Ca::generate(
            TrustDomain::new("demo.vitalmq").expect("td"),
            Validity::days_from(now, 30),
        )
        .expect("ca");
        let a = Serial::random().expect("serial");
        let b = Serial::random().expect("serial");
        let pem = ca
            .sign_crl(
                &[
                    Revoked {
                        serial: a.clone(),
                        revoked_at: now,
                        reason: Reason::KeyCompromise,
                    },
                    Revoked {
                        serial: b.clone(),
                        revoked_at: now,
                        reason: Reason::Unspecified,
                    },
                ],
                7,
                now,
                DEFAULT_CRL_DAYS,
            )
            .expect("crl");
        let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
        assert_eq!(block.label, "X509 CRL");
        let (_, crl) = x509_parser::parse_x509_crl(&block.contents).expect("crl der");
        let serials: Vec<_> = crl
            .iter_revoked_certificates()
            .map(|r| r.raw_serial().to_vec())
            .collect();
        assert_eq!(serials, vec![a.as_bytes().to_vec(), b.as_bytes().to_vec()]);
        assert_eq!(
            crl.crl_number().map(|n| n.to_string()),
            Some("7".to_owned())
        );
        let (_, ca_cert) = x509_parser::parse_x509_certificate(ca.cert_der()).expect("ca");
        assert_eq!(crl.issuer(), ca_cert.subject());
    }
}
