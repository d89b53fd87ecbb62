//! The certificate authority: one ECDSA P-256 key and self-signed root that signs every
//! identity, the broker's server certificate and the CRL.
//!
//! A [`Ca`] lives in memory; [`crate::layout`] is what persists it. Broker and bridge
//! tests build one with [`Ca::generate`] and never touch the disk.

use std::fmt;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};
use vitalmq_policies::TrustDomain;

use crate::error::CertsError;

/// How far back `not_before` is set by default, so that a peer whose clock is a little
/// behind does not see a brand-new certificate as "not yet valid".
pub(crate) const CLOCK_SKEW: Duration = Duration::minutes(5);

/// A certificate serial number: 16 random bytes, top bit clear (a positive DER INTEGER)
/// and first byte non-zero (so every tool prints the same 32 hex digits).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(Vec<u8>);

impl Serial {
    /// A fresh random serial (RFC 5280 allows up to 20 octets; CAs should use >= 64 random bits).
    pub(crate) fn random() -> Result<Self, CertsError> {
        let mut bytes = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| CertsError::Random)?;
        bytes[0] &= 0x7f;
        if bytes[0] == 0 {
            bytes[0] = 1;
        }
        Ok(Self(bytes.to_vec()))
    }

    /// Parses hex as printed by `openssl x509 -serial` (`serial=...`), by `openssl crl
    /// -text`, or with colons (`3a:0f:...`); case-insensitive. Leading zero bytes are
    /// dropped, as DER does.
    pub fn from_hex(s: &str) -> Result<Self, CertsError> {
        let bad = || CertsError::Serial(s.escape_debug().take(80).collect());
        let trimmed = s.trim();
        let trimmed = trimmed.strip_prefix("serial=").unwrap_or(trimmed);
        let digits: String = trimmed.chars().filter(|c| *c != ':').collect();
        let digits = if digits.len() % 2 == 1 {
            format!("0{digits}")
        } else {
            digits
        };
        let bytes = hex::decode(&digits).map_err(|_| bad())?;
        let first = bytes.iter().position(|b| *b != 0).ok_or_else(bad)?;
        let bytes = bytes[first..].to_vec();
        if bytes.len() > 20 {
            return Err(bad());
        }
        Ok(Self(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        hex::encode_upper(&self.0)
    }

    pub(crate) fn to_rcgen(&self) -> rcgen::SerialNumber {
        rcgen::SerialNumber::from_slice(&self.0)
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({})", self.to_hex())
    }
}

/// The validity window of a certificate; `not_after` is strictly later than `not_before`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

impl Validity {
    pub fn new(not_before: OffsetDateTime, not_after: OffsetDateTime) -> Result<Self, CertsError> {
        if not_after <= not_before {
            return Err(CertsError::Validity {
                not_before: rfc3339(not_before),
                not_after: rfc3339(not_after),
            });
        }
        Ok(Self {
            not_before: truncate(not_before),
            not_after: truncate(not_after),
        })
    }

    /// Valid from [`CLOCK_SKEW`] before `now` for `days` days.
    pub fn days_from(now: OffsetDateTime, days: u32) -> Self {
        Self {
            not_before: truncate(now - CLOCK_SKEW),
            not_after: truncate(now + Duration::days(i64::from(days.max(1)))),
        }
    }

    pub fn not_before(&self) -> OffsetDateTime {
        self.not_before
    }

    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    pub(crate) fn apply(&self, params: &mut CertificateParams) {
        params.not_before = self.not_before;
        params.not_after = self.not_after;
    }
}

/// X.509 times have whole seconds; truncating here keeps the index equal to the cert.
fn truncate(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(0).unwrap_or(t)
}

/// RFC 3339 text of a time (for the index and messages).
pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// The certificate authority of one trust domain.
pub struct Ca {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: Vec<u8>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// A new root CA for `trust_domain` (P-256 key, path length 0: it signs leaves only).
    pub fn generate(trust_domain: TrustDomain, validity: Validity) -> Result<Self, CertsError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "vitalmq");
        // A random tag per CA: two dev PKIs must not share an issuer name, or a
        // certificate of one is matched to the other's CA by name and reported as a bad
        // signature instead of an unknown issuer.
        let mut tag = [0u8; 4];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut tag)
            .map_err(|_| CertsError::Random)?;
        dn.push(
            DnType::CommonName,
            format!(
                "vitalmq dev CA {} {}",
                trust_domain.as_str(),
                hex::encode(tag)
            ),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(Serial::random()?.to_rcgen());
        validity.apply(&mut params);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            trust_domain,
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Reloads a CA from its certificate and PKCS#8 private key (both PEM).
    pub fn from_pem(
        trust_domain: TrustDomain,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<Self, CertsError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        let cert_der = pem_to_der(cert_pem)?;
        Ok(Self {
            trust_domain,
            issuer,
            cert_pem: cert_pem.to_owned(),
            cert_der,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The root certificate, PEM: what brokers and clients configure as trust anchor.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA private key, PKCS#8 PEM. Secret: write it with mode 0600.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }
}

/// DER of the first CERTIFICATE block of a PEM text.
fn pem_to_der(pem: &str) -> Result<Vec<u8>, CertsError> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .ok()
        .filter(|(_, block)| block.label == "CERTIFICATE")
        .map(|(_, block)| block.contents)
        .ok_or(CertsError::Rcgen(rcgen::Error::CouldNotParseCertificate))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_positive_sixteen_bytes_and_round_trip_through_hex() {
        for _ in 0..200 {
            let s = Serial::random().expect("randomness");
            assert_eq!(s.as_bytes().len(), 16);
            assert!(s.as_bytes()[0] >= 1 && s.as_bytes()[0] <= 0x7f);
            assert_eq!(Serial::from_hex(&s.to_hex()).expect("hex"), s);
            assert_eq!(
                Serial::from_hex(&format!("serial={}", s.to_hex().to_lowercase())).expect("hex"),
                s
            );
        }
        let colons = Serial::from_hex("00:3a:0F").expect("colons");
        assert_eq!(colons.as_bytes(), &[0x3a, 0x0f]);
        assert!(Serial::from_hex("zz").is_err());
        assert!(Serial::from_hex("00").is_err());
        assert!(Serial::from_hex(&"11".repeat(21)).is_err());
    }

    #[test]
    fn validity_refuses_an_empty_window() {
        let now = OffsetDateTime::now_utc();
        assert!(Validity::new(now, now).is_err());
        assert!(Validity::new(now, now - Duration::days(1)).is_err());
        let v = Validity::new(now - Duration::days(2), now - Duration::days(1)).expect("valid");
        assert_eq!(v.not_after().nanosecond(), 0);
    }

    #[test]
    fn a_ca_round_trips_through_pem() {
        let td = TrustDomain::new("demo.vitalmq").expect("td");
        let ca = Ca::generate(
            td.clone(),
            Validity::days_from(OffsetDateTime::now_utc(), 30),
        )
        .expect("ca");
        let again = Ca::from_pem(td, ca.cert_pem(), &ca.key_pem()).expect("reload");
        assert_eq!(again.cert_der(), ca.cert_der());
        let (_, parsed) = x509_parser::parse_x509_certificate(ca.cert_der()).expect("x509");
        assert!(parsed.is_ca());
        assert!(
            parsed
                .subject()
                .to_string()
                .contains("vitalmq dev CA demo.vitalmq")
        );
    }
}
