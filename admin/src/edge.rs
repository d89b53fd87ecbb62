//! The TLS edge of the admin API: the broker's server configuration and client
//! certificate verifier ([`vitalmq_broker::tls::build`]: chain to the configured CA,
//! validity, revocation by the configured CRLs, a SPIFFE id of the trust domain), rebuilt
//! when one of its files changes (a new CRL after `vitalmq certs revoke`), checked when
//! a connection is accepted, so a revoked operator is refused from the next connection
//! on without a restart. A file that does not load keeps the edge that did (logged).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio_rustls::TlsAcceptor;
use vitalmq_broker::tls::{TlsError, TlsSettings, build};

/// What tells a changed file: modification time and length (`None`: unreadable).
type Stamp = Vec<Option<(SystemTime, u64)>>;

/// The current TLS server configuration and the file stamps it was built from.
#[derive(Debug)]
pub struct Edge {
    settings: TlsSettings,
    current: Mutex<(Stamp, Arc<rustls::ServerConfig>)>,
}

impl Edge {
    pub fn new(settings: TlsSettings) -> Result<Self, TlsError> {
        let stamp = stamp(&files(&settings));
        let server = build(&settings)?.server;
        Ok(Self {
            settings,
            current: Mutex::new((stamp, server)),
        })
    }

    /// The acceptor for a new connection, rebuilt first if a file changed.
    pub fn acceptor(&self) -> TlsAcceptor {
        let now = stamp(&files(&self.settings));
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.0 != now {
            match build(&self.settings) {
                Ok(edge) => {
                    tracing::info!(
                        "admin TLS edge reloaded (CA, CRL or server certificate changed)"
                    );
                    *current = (now, edge.server);
                }
                Err(e) => {
                    tracing::error!(error = %e, "admin TLS files changed but do not load; keeping the previous edge");
                    current.0 = now;
                }
            }
        }
        TlsAcceptor::from(Arc::clone(&current.1))
    }
}

fn files(settings: &TlsSettings) -> Vec<PathBuf> {
    let mut files = vec![settings.server_cert.clone(), settings.server_key.clone()];
    files.extend(settings.client_ca.iter().cloned());
    files.extend(settings.crls.iter().cloned());
    files
}

fn stamp(files: &[PathBuf]) -> Stamp {
    files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}
