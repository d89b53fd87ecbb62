//! The broker's TLS server configuration (SPEC section 1): TLS 1.2/1.3 with the ring
//! provider, client certificates required, chain + validity + revocation checked by
//! rustls' [`WebPkiClientVerifier`] and the SPIFFE identity checked by
//! [`SpiffeClientVerifier`] during the handshake, so that every refused certificate
//! ends the handshake with an alert.
//!
//! [`build`] is pure apart from reading the configured files and keeps no global state:
//! the broker calls it again on reload (new CRL, new CA) and publishes the new
//! [`TlsEdge`] through a `tokio::sync::watch`; handshakes started after that use it, and
//! [`crate::accept::verify_peer_again`] re-checks live connections against it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use serde::Deserialize;
use vitalmq_policies::TrustDomain;

use crate::identity::{CertIdentity, IdentityError, cert_identity};

/// The `[tls]` table of the broker configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// The broker's certificate chain, PEM (leaf first).
    pub server_cert: PathBuf,
    /// Its private key, PEM (PKCS#8, SEC1 or PKCS#1), plaintext or sealed under a key
    /// provider (`vitalmq keys seal-file`).
    pub server_key: PathBuf,
    /// CA certificates (PEM, one or more per file) that client certificates must chain to.
    pub client_ca: Vec<PathBuf>,
    /// CRLs (PEM). When any is configured, every client certificate's issuer must have
    /// one (unknown revocation status is refused) unless
    /// `allow_unknown_revocation_status` is set.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    /// The only trust domain accepted in SPIFFE URIs.
    pub trust_domain: TrustDomain,
    /// Accept a certificate without URI SAN whose CN is a valid id (role from the registry).
    #[serde(default)]
    pub cn_fallback: bool,
    #[serde(default)]
    pub allow_unknown_revocation_status: bool,
    /// Refuse every client once a CRL's nextUpdate has passed (stale revocation data).
    #[serde(default)]
    pub enforce_crl_next_update: bool,
    /// Time allowed from TCP accept to the client's first byte; a client that sends
    /// nothing holds no handshake slot meanwhile.
    #[serde(default = "default_first_byte_timeout_ms")]
    pub first_byte_timeout_ms: u64,
    /// Time allowed from the client's first byte to a finished handshake, waiting for a
    /// handshake slot included.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Handshakes running at once; further connections wait (within their timeout).
    #[serde(default = "default_max_concurrent_handshakes")]
    pub max_concurrent_handshakes: usize,
    /// New connections per second and source IP, sustained (0 disables the limit).
    #[serde(default = "default_per_ip_per_second")]
    pub per_ip_per_second: u32,
    /// Burst of new connections allowed per source IP.
    #[serde(default = "default_per_ip_burst")]
    pub per_ip_burst: u32,
}

fn default_first_byte_timeout_ms() -> u64 {
    3_000
}
fn default_handshake_timeout_ms() -> u64 {
    5_000
}
fn default_max_concurrent_handshakes() -> usize {
    256
}
fn default_per_ip_per_second() -> u32 {
    20
}
fn default_per_ip_burst() -> u32 {
    50
}

impl TlsSettings {
    /// Settings with the defaults for everything but the files and trust domain.
    pub fn new(
        server_cert: PathBuf,
        server_key: PathBuf,
        client_ca: Vec<PathBuf>,
        trust_domain: TrustDomain,
    ) -> Self {
        Self {
            server_cert,
            server_key,
            client_ca,
            crls: Vec::new(),
            trust_domain,
            cn_fallback: false,
            allow_unknown_revocation_status: false,
            enforce_crl_next_update: false,
            first_byte_timeout_ms: default_first_byte_timeout_ms(),
            handshake_timeout_ms: default_handshake_timeout_ms(),
            max_concurrent_handshakes: default_max_concurrent_handshakes(),
            per_ip_per_second: default_per_ip_per_second(),
            per_ip_burst: default_per_ip_burst(),
        }
    }

    pub fn first_byte_timeout(&self) -> Duration {
        Duration::from_millis(self.first_byte_timeout_ms)
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
}

/// Why a TLS configuration could not be built. Every file problem names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    BadFile { path: PathBuf, message: String },
    #[error("tls.client_ca: at least one CA file is required")]
    NoClientCa,
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] VerifierBuilderError),
    #[error("{} / {}: server certificate or key refused: {source}", cert.display(), key.display())]
    ServerCert {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS protocol versions: {0}")]
    Protocol(#[source] rustls::Error),
}

/// A built TLS edge: the server configuration and the verifier inside it (kept so that
/// live connections can be re-checked after a reload).
#[derive(Debug)]
pub struct TlsEdge {
    pub server: Arc<ServerConfig>,
    pub verifier: Arc<SpiffeClientVerifier>,
}

/// Reads the configured files and builds the TLS edge.
pub fn build(settings: &TlsSettings) -> Result<TlsEdge, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(SpiffeClientVerifier::from_settings(settings, &provider)?);
    let chain = read_certs(&settings.server_cert)?;
    // Plaintext PEM, or sealed under a key provider (`vitalmq keys seal-file`).
    let key_pem =
        vitalmq_keyring::read_secret(&settings.server_key).map_err(|e| TlsError::BadFile {
            path: settings.server_key.clone(),
            message: e.to_string(),
        })?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::BadFile {
        path: settings.server_key.clone(),
        message: format!("no usable private key: {e}"),
    })?;
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Protocol)?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::ServerCert {
            cert: settings.server_cert.clone(),
            key: settings.server_key.clone(),
            source,
        })?;
    // Session resumption, so a reconnect storm does not redo every certificate chain
    // check: stateless TLS 1.3 tickets, plus a bounded cache for TLS 1.2 session ids.
    // Both belong to this config; a reload builds a new one with a new ticket key, so a
    // certificate revoked since cannot resume a session it had before.
    server.ticketer = rustls::crypto::ring::Ticketer::new().map_err(TlsError::Protocol)?;
    server.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
    Ok(TlsEdge {
        server: Arc::new(server),
        verifier,
    })
}

/// Client certificate verifier: rustls' WebPKI verifier (chain, validity, EKU, CRLs),
/// then the SPIFFE identity of the leaf ([`cert_identity`]). An identity problem is
/// reported as `CertificateError::Other` wrapping the [`IdentityError`] (alert
/// `certificate_unknown`); [`identity_error`] gets it back.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    trust_domain: TrustDomain,
    cn_fallback: bool,
}

impl SpiffeClientVerifier {
    /// Reads the CA and CRL files of `settings`.
    pub(crate) fn from_settings(
        settings: &TlsSettings,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        if settings.client_ca.is_empty() {
            return Err(TlsError::NoClientCa);
        }
        let mut roots = RootCertStore::empty();
        for path in &settings.client_ca {
            for cert in read_certs(path)? {
                roots.add(cert).map_err(|e| TlsError::BadFile {
                    path: path.clone(),
                    message: format!("not a usable CA certificate: {e}"),
                })?;
            }
        }
        let mut crls = Vec::new();
        for path in &settings.crls {
            crls.extend(read_crls(path)?);
        }
        let mut builder =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .with_crls(crls)
                .only_check_end_entity_revocation();
        if settings.allow_unknown_revocation_status {
            builder = builder.allow_unknown_revocation_status();
        }
        if settings.enforce_crl_next_update {
            builder = builder.enforce_revocation_expiration();
        }
        Ok(Self {
            webpki: builder.build()?,
            trust_domain: settings.trust_domain.clone(),
            cn_fallback: settings.cn_fallback,
        })
    }

    pub(crate) fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub(crate) fn cn_fallback(&self) -> bool {
        self.cn_fallback
    }

    /// Everything the handshake checks about a client chain, at time `now`.
    pub(crate) fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<CertIdentity, rustls::Error> {
        self.webpki
            .verify_client_cert(end_entity, intermediates, now)?;
        cert_identity(end_entity, &self.trust_domain, self.cn_fallback).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
        })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify_chain(end_entity, intermediates, now)
            .map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// The [`IdentityError`] inside a rustls error made by [`SpiffeClientVerifier`], if any.
pub(crate) fn identity_error(error: &rustls::Error) -> Option<&IdentityError> {
    match error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<IdentityError>()
        }
        _ => None,
    }
}

/// A stable token for a TLS failure, for audit records and metrics labels.
pub fn tls_reason(error: &rustls::Error) -> &'static str {
    use CertificateError as C;
    match error {
        rustls::Error::NoCertificatesPresented => "no_certificate",
        rustls::Error::InvalidCertificate(c) => match c {
            C::Expired | C::ExpiredContext { .. } => "certificate_expired",
            C::NotValidYet | C::NotValidYetContext { .. } => "certificate_not_yet_valid",
            C::Revoked => "certificate_revoked",
            C::UnknownIssuer => "unknown_issuer",
            C::UnknownRevocationStatus => "unknown_revocation_status",
            C::ExpiredRevocationList | C::ExpiredRevocationListContext { .. } => "crl_expired",
            C::BadEncoding => "bad_encoding",
            C::BadSignature => "certificate_bad_signature",
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => "invalid_purpose",
            C::Other(_) => "certificate_refused",
            _ => "invalid_certificate",
        },
        rustls::Error::AlertReceived(_) => "alert_received",
        rustls::Error::PeerIncompatible(_) => "peer_incompatible",
        rustls::Error::PeerMisbehaved(_) => "peer_misbehaved",
        rustls::Error::InvalidMessage(_) => "invalid_message",
        rustls::Error::NoApplicationProtocol => "no_application_protocol",
        _ => "other",
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |message: String| TlsError::BadFile {
        path: path.to_path_buf(),
        message,
    };
    let certs = CertificateDer::pem_slice_iter(&read(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let bad = |message: String| TlsError::BadFile {
        path: path.to_path_buf(),
        message,
    };
    let crls = CertificateRevocationListDer::pem_slice_iter(&read(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("bad PEM: {e}")))?;
    if crls.is_empty() {
        return Err(bad("no X509 CRL block".into()));
    }
    // rustls parses all CRLs together and would not say which file is broken.
    for crl in &crls {
        x509_parser::parse_x509_crl(crl).map_err(|e| bad(format!("not a valid CRL: {e}")))?;
    }
    Ok(crls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_take_defaults_and_refuse_unknown_fields() {
        let text = r#"
server_cert = "s.pem"
server_key = "s.key.pem"
client_ca = ["ca.pem"]
trust_domain = "demo.vitalmq"
"#;
        let s: TlsSettings = toml::from_str(text).expect("valid");
        assert_eq!(s.handshake_timeout(), Duration::from_secs(5));
        assert!(!s.cn_fallback && s.crls.is_empty());
        let err = toml::from_str::<TlsSettings>(&format!("{text}colour = 1\n"))
            .expect_err("unknown field");
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn missing_files_are_named() {
        let s = TlsSettings::new(
            "/nonexistent/server.pem".into(),
            "/nonexistent/server.key.pem".into(),
            vec!["/nonexistent/ca.pem".into()],
            TrustDomain::new("demo.vitalmq").expect("td"),
        );
        let err = build(&s).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }
}
