//! Client identities from a PKI directory made by `vitalmq certs init` (layout in
//! `vitalmq_certs::layout`): the CA that anchors the broker's certificate, each party's
//! SPIFFE identity certificate and key, and each device's COSE signing key.
//!
//! Shared by the load generator and the simulated devices. Reading the PKI is the only
//! thing this module does; nothing here opens a connection.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use rumqttc::tokio_rustls::rustls;
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use vitalmq_envelope::SigningKey;

/// A client identity: its id and a TLS client configuration (kept for all its
/// reconnects so that the session cache inside is reused).
#[derive(Debug, Clone)]
pub struct Identity {
    pub id: String,
    pub tls: Arc<ClientConfig>,
}

/// The PKI directory made by `vitalmq certs init`.
#[derive(Debug, Clone)]
pub struct Pki {
    pub dir: PathBuf,
    roots: Arc<rustls::RootCertStore>,
}

impl Pki {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let ca_path = dir.join("ca/ca.pem");
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&ca_path)
            .with_context(|| format!("{}", ca_path.display()))?
        {
            roots
                .add(cert.with_context(|| format!("{}", ca_path.display()))?)
                .context("CA certificate")?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            roots: Arc::new(roots),
        })
    }

    /// Ids of a role's identities (`identities/<role>/<id>.pem`), sorted.
    pub fn ids(&self, role: &str) -> anyhow::Result<Vec<String>> {
        let dir = self.dir.join("identities").join(role);
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".pem")
                && !id.ends_with(".key")
            {
                ids.push(id.to_owned());
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Loads one identity's certificate and key into a TLS client configuration.
    pub fn identity(&self, role: &str, id: &str) -> anyhow::Result<Identity> {
        let base = self.dir.join("identities").join(role);
        let cert_path = base.join(format!("{id}.pem"));
        let key_path = base.join(format!("{id}.key.pem"));
        let chain = CertificateDer::pem_file_iter(&cert_path)
            .with_context(|| format!("{}", cert_path.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("{}", cert_path.display()))?;
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .with_context(|| format!("{}", key_path.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .context("TLS versions")?
            .with_root_certificates(Arc::clone(&self.roots))
            .with_client_auth_cert(chain, key)
            .with_context(|| format!("identity {role}/{id}"))?;
        Ok(Identity {
            id: id.to_owned(),
            tls: Arc::new(config),
        })
    }

    /// The first `n` device identities (all of them when fewer exist is an error).
    pub fn devices(&self, n: usize) -> anyhow::Result<Vec<Identity>> {
        let ids = self.ids("device")?;
        if ids.len() < n {
            bail!(
                "{} has {} device identities, {n} needed (vitalmq certs init --devices {n})",
                self.dir.display(),
                ids.len()
            );
        }
        ids[..n]
            .iter()
            .map(|id| self.identity("device", id))
            .collect()
    }
}

impl Pki {
    /// A device's COSE signing key (`devices/<id>/cose.key.pem`, PKCS#8).
    pub fn signing_key(&self, device: &str) -> anyhow::Result<SigningKey> {
        let path = self.dir.join("devices").join(device).join("cose.key.pem");
        let pem = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
        SigningKey::from_pkcs8_pem(&pem).with_context(|| format!("{}", path.display()))
    }
}
