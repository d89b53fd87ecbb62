//! Leaf certificate profiles: SPIFFE identity certificates (clientAuth) and the broker's
//! server certificate (serverAuth). Pure: nothing here touches the disk.

use std::fmt;
use std::net::IpAddr;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, string::Ia5String,
};
use vitalmq_policies::SpiffeId;

use crate::ca::{Ca, Serial, Validity};
use crate::error::CertsError;

/// A freshly issued leaf certificate with its private key.
#[derive(Clone)]
pub struct IssuedCert {
    pub serial: Serial,
    pub validity: Validity,
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    /// PKCS#8 PEM of the P-256 key. Secret.
    pub key_pem: String,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("serial", &self.serial)
            .field("validity", &self.validity)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A name the broker's server certificate is valid for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerName {
    Dns(String),
    Ip(IpAddr),
}

impl ServerName {
    /// An IP address if it parses as one, else a DNS name (checked by rcgen at issuance).
    pub fn parse(s: &str) -> Result<Self, CertsError> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Self::Ip(ip));
        }
        let ok = !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'*'));
        if ok {
            Ok(Self::Dns(s.to_owned()))
        } else {
            Err(CertsError::ServerName(s.escape_debug().take(80).collect()))
        }
    }

    /// `localhost` and `127.0.0.1`: what local brokers and tests connect to.
    pub fn local_defaults() -> Vec<Self> {
        vec![
            Self::Dns("localhost".to_owned()),
            Self::Ip(IpAddr::from([127, 0, 0, 1])),
        ]
    }

    fn to_san(&self) -> Result<SanType, CertsError> {
        Ok(match self {
            Self::Dns(name) => SanType::DnsName(
                Ia5String::try_from(name.as_str())
                    .map_err(|_| CertsError::ServerName(name.clone()))?,
            ),
            Self::Ip(ip) => SanType::IpAddress(*ip),
        })
    }
}

impl Ca {
    /// An identity certificate (SPEC section 1): its only SAN is the URI of `id`, its CN
    /// is the bare id (for the optional CN fallback), EKU clientAuth.
    pub fn issue_identity(
        &self,
        id: &SpiffeId,
        validity: Validity,
    ) -> Result<IssuedCert, CertsError> {
        let uri = Ia5String::try_from(id.uri())?;
        let (mut params, serial) = leaf_params(id.id.as_str(), validity)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign_leaf((params, serial), validity)
    }

    /// The broker's TLS server certificate, EKU serverAuth, valid for `names`.
    pub fn issue_server(
        &self,
        names: &[ServerName],
        validity: Validity,
    ) -> Result<IssuedCert, CertsError> {
        let (mut params, serial) = leaf_params("vitalmq broker", validity)?;
        params.subject_alt_names = names
            .iter()
            .map(ServerName::to_san)
            .collect::<Result<_, _>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign_leaf((params, serial), validity)
    }

    fn sign_leaf(
        &self,
        (params, serial): (CertificateParams, Serial),
        validity: Validity,
    ) -> Result<IssuedCert, CertsError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, self.issuer())?;
        Ok(IssuedCert {
            serial,
            validity,
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The parameters every leaf shares, with the fresh serial they carry.
fn leaf_params(
    common_name: &str,
    validity: Validity,
) -> Result<(CertificateParams, Serial), CertsError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    // ECDSA keys only sign (ECDHE does the key agreement).
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let serial = Serial::random()?;
    params.serial_number = Some(serial.to_rcgen());
    validity.apply(&mut params);
    Ok((params, serial))
}

#[cfg(test)]
mod tests {
    use time::OffsetDateTime;
    use vitalmq_policies::{PrincipalId, Role, TrustDomain};
    use x509_parser::extensions::GeneralName;

    use super::*;

    fn ca() -> Ca {
        let td = TrustDomain::new("demo.vitalmq").expect("td");
        Ca::generate(td, Validity::days_from(OffsetDateTime::now_utc(), 30)).expect("ca")
    }

    #[test]
    fn an_identity_certificate_carries_exactly_its_spiffe_uri() {
        let ca = ca();
        let id = SpiffeId::new(
            ca.trust_domain().clone(),
            Role::Gateway,
            PrincipalId::new("gw-site-01").expect("id"),
        );
        let issued = ca
            .issue_identity(&id, Validity::days_from(OffsetDateTime::now_utc(), 1))
            .expect("issue");
        let (_, cert) = x509_parser::parse_x509_certificate(&issued.cert_der).expect("x509");
        let san = cert
            .subject_alternative_name()
            .expect("one SAN extension")
            .expect("SAN present");
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("spiffe://demo.vitalmq/gateway/gw-site-01")]
        );
        let cn: Vec<_> = cert
            .subject()
            .iter_common_name()
            .filter_map(|c| c.as_str().ok())
            .collect();
        assert_eq!(cn, ["gw-site-01"]);
        let eku = cert.extended_key_usage().expect("eku").expect("present");
        assert!(eku.value.client_auth && !eku.value.server_auth);
        assert!(!cert.is_ca());
        assert_eq!(cert.raw_serial(), issued.serial.as_bytes());
        assert_eq!(
            cert.issuer(),
            x509_parser::parse_x509_certificate(ca.cert_der())
                .expect("ca")
                .1
                .subject()
        );
        // The signature verifies with the CA's public key.
        let (_, ca_cert) = x509_parser::parse_x509_certificate(ca.cert_der()).expect("ca");
        cert.verify_signature(Some(ca_cert.public_key()))
            .expect("signed by the CA");
    }

    #[test]
    fn the_server_certificate_names_localhost_and_loopback() {
        let ca = ca();
        let issued = ca
            .issue_server(
                &ServerName::local_defaults(),
                Validity::days_from(OffsetDateTime::now_utc(), 1),
            )
            .expect("issue");
        let (_, cert) = x509_parser::parse_x509_certificate(&issued.cert_der).expect("x509");
        let san = cert.subject_alternative_name().expect("ok").expect("SAN");
        assert_eq!(
            san.value.general_names,
            vec![
                GeneralName::DNSName("localhost"),
                GeneralName::IPAddress(&[127, 0, 0, 1]),
            ]
        );
        let eku = cert.extended_key_usage().expect("eku").expect("present");
        assert!(eku.value.server_auth && !eku.value.client_auth);
    }

    #[test]
    fn server_names_are_checked() {
        assert_eq!(
            ServerName::parse("::1").expect("ip"),
            ServerName::Ip("::1".parse().expect("ip"))
        );
        assert!(ServerName::parse("broker.local").is_ok());
        assert!(ServerName::parse("bad name").is_err());
        assert!(ServerName::parse("").is_err());
    }
}
