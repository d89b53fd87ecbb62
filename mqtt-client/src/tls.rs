//! The TLS client configuration of an mTLS identity: the CA that anchors the broker's
//! certificate, and the client's certificate chain and key, all PEM files. TLS 1.3 and
//! 1.2 with rustls's ring provider.
//!
//! A configuration is built once per identity and kept for all its reconnects, so that
//! its session cache (TLS resumption) is reused.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why a TLS client configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{}: {source}", path.display())]
    Pem {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    /// The CA file holds a certificate rustls does not accept as a trust anchor.
    #[error("{}: CA certificate: {source}", path.display())]
    Anchor {
        path: PathBuf,
        source: rustls::Error,
    },
    /// A sealed private key its key provider could not open.
    #[error("{}: {source}", path.display())]
    Sealed {
        path: PathBuf,
        source: Box<vitalmq_keyring::KeyError>,
    },
    /// The certificate chain and key do not make a client identity.
    #[error("{}: client certificate and key: {source}", cert.display())]
    Identity {
        cert: PathBuf,
        source: rustls::Error,
    },
}

/// The trust anchors in the PEM file `ca` (every certificate in it).
pub fn read_roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let pem = |source| TlsError::Pem {
        path: ca.to_path_buf(),
        source,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(pem)? {
        roots
            .add(cert.map_err(pem)?)
            .map_err(|source| TlsError::Anchor {
                path: ca.to_path_buf(),
                source,
            })?;
    }
    Ok(roots)
}

/// A client configuration trusting `roots` and presenting the chain in `cert` with the
/// key in `key`.
pub fn client_config(
    roots: Arc<RootCertStore>,
    cert: &Path,
    key: &Path,
) -> Result<Arc<ClientConfig>, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Pem {
            path: cert.to_path_buf(),
            source,
        })?;
    // Plaintext PEM, or sealed under a key provider (`vitalmq keys seal-file`).
    let key_pem = vitalmq_keyring::read_secret(key).map_err(|source| TlsError::Sealed {
        path: key.to_path_buf(),
        source: Box::new(source),
    })?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|source| TlsError::Pem {
        path: key.to_path_buf(),
        source,
    })?;
    let identity = |source| TlsError::Identity {
        cert: cert.to_path_buf(),
        source,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(identity)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(identity)?;
    Ok(Arc::new(config))
}

/// [`client_config`] with the trust anchors read from the PEM file `ca`.
pub fn client_config_from_files(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<Arc<ClientConfig>, TlsError> {
    client_config(Arc::new(read_roots(ca)?), cert, key)
}
