//! The accept loop: TCP, the TLS handshake against the current [`Edge`], the caller's
//! identity from its verified certificate, then HTTP/1.1 with the [`api`] routes.
//! A refused handshake is audited (`action` `connect`, the TLS refusal reason) where
//! the server sees it.
//!
//! A silent or slow peer cannot hold the server: the handshake ([`HANDSHAKE_TIMEOUT`]),
//! the request head ([`HEADER_READ_TIMEOUT`]) and the body
//! ([`crate::api::BODY_READ_TIMEOUT`]) each have a deadline. Two caps bound what is
//! held at once: at most [`MAX_HANDSHAKES`] connections that have not yet shown an
//! operator certificate (in their handshake, or served a refusal for a certificate
//! that is not an operator's), and at most [`MAX_CONNECTIONS`] operators' calls. A
//! peer without a certificate of the trust domain's operators can take only the
//! first, larger cap, so plain TCP connects, however many, never keep an operator
//! out of the second (more connections wait in the listen backlog).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Extension;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use vitalmq_audit::Decision;
use vitalmq_broker::identity::{CertName, cert_identity};
use vitalmq_policies::PolicyErrors;

use crate::access::{Caller, RolesFile};
use crate::api::{self, App};
use crate::audit::{AdminAudit, Entry};
use crate::backend::Backend;
use crate::config::AdminConfig;
use crate::edge::Edge;
use crate::ops_alert::OpsOutbox;

/// Time a client has to finish its TLS handshake (a local operator's takes
/// milliseconds).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to send its request head once the handshake is done.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections held at once before their peer showed an operator certificate: in the
/// TLS handshake, waiting for an operator slot, or served (a refusal) under a
/// certificate that is not an operator's.
pub const MAX_HANDSHAKES: usize = 512;
/// Operators' calls served at once (after a handshake with an operator certificate).
pub const MAX_CONNECTIONS: usize = 64;

/// Why the server did not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("admin TLS: {0}")]
    Tls(#[from] vitalmq_broker::tls::TlsError),
    #[error("admin roles: {0}")]
    Roles(#[from] PolicyErrors),
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("accepting connections: {0}")]
    Accept(#[source] std::io::Error),
}

/// Serves the admin API until `stop` completes. `ready` is told the bound address.
pub async fn serve(
    config: AdminConfig,
    backend: Arc<dyn Backend>,
    ready: impl FnOnce(SocketAddr),
    stop: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let edge = Arc::new(Edge::new(config.tls.clone())?);
    let trust_domain = config.tls.trust_domain.clone();
    let app = Arc::new(App {
        roles: RolesFile::load(config.roles.clone())?,
        audit: AdminAudit::new(config.audit_log.clone()),
        outbox: OpsOutbox::new(config.ops_outbox.clone(), config.ops_mqtt.clone()),
        backend,
    });
    let router = api::router(Arc::clone(&app));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(ServeError::Accept)?;
    tracing::info!(%addr, audit_log = %config.audit_log.display(), "admin API listening (mTLS)");
    ready(addr);
    tokio::pin!(stop);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        if handshakes.available_permits() == 0 {
            tracing::warn!(
                max = MAX_HANDSHAKES,
                "admin API at its limit of connections in handshake; new connections wait"
            );
        }
        let handshake = tokio::select! {
            () = &mut stop => return Ok(()),
            permit = Arc::clone(&handshakes).acquire_owned() => {
                permit.expect("the handshake semaphore is never closed")
            }
        };
        let (tcp, peer) = tokio::select! {
            () = &mut stop => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, go on.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = edge.acceptor();
        let router = router.clone();
        let app = Arc::clone(&app);
        let trust_domain = trust_domain.clone();
        let slots = Arc::clone(&slots);
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    let reason = e
                        .get_ref()
                        .and_then(|i| i.downcast_ref::<rustls::Error>())
                        .map_or("handshake_failed", vitalmq_broker::tls::tls_reason);
                    refused_handshake(&app, peer, reason).await;
                    return;
                }
                Err(_) => {
                    refused_handshake(&app, peer, "handshake_timeout").await;
                    return;
                }
            };
            let caller = {
                let (_, session) = tls.get_ref();
                let leaf = session.peer_certificates().and_then(|c| c.first());
                let known = leaf.and_then(|der| cert_identity(der, &trust_domain, false).ok());
                Caller {
                    identity: known.as_ref().and_then(|k| match &k.name {
                        CertName::Spiffe(id) => Some(id.clone()),
                        CertName::CommonName(_) => None,
                    }),
                    cert_sha256: known.as_ref().map(|k| k.fingerprint_sha256_hex.clone()),
                    cert_serial: known.as_ref().map(|k| k.serial_hex.clone()),
                    addr: peer,
                }
            };
            // An operator's call moves to an operator slot (waiting for one at most
            // as long as a request head may take); anything else is refused by the
            // API under the handshake permit it holds.
            let _permit = if caller.operator().is_some() {
                let Ok(Ok(slot)) =
                    tokio::time::timeout(HEADER_READ_TIMEOUT, slots.acquire_owned()).await
                else {
                    tracing::warn!(
                        max = MAX_CONNECTIONS,
                        %peer,
                        "admin API at its operator connection limit; connection closed"
                    );
                    return;
                };
                drop(handshake);
                slot
            } else {
                handshake
            };
            let service = TowerToHyperService::new(router.layer(Extension(Arc::new(caller))));
            if let Err(e) = http(tls, service).await {
                tracing::debug!(error = %e, %peer, "admin connection ended with an error");
            }
        });
    }
}

/// Serves one request on `io`. One request per connection: every call is made by a
/// certificate checked against the CA and CRL in force when it was made (a keep-alive
/// connection would outlive a revocation). A head not read within
/// [`HEADER_READ_TIMEOUT`] closes the connection.
pub(crate) async fn http<I, S>(io: I, service: S) -> Result<(), hyper::Error>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming> + Send,
    S::Future: Send + 'static,
    S::ResBody: Send + 'static,
    <S::ResBody as hyper::body::Body>::Data: Send,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(io), service)
        .await
}

async fn refused_handshake(app: &App, peer: SocketAddr, reason: &str) {
    let mut entry = Entry::new("connect", None);
    entry.decision = Decision::Deny;
    entry.reason = format!("refused:{reason}");
    let caller = Caller {
        identity: None,
        cert_sha256: None,
        cert_serial: None,
        addr: peer,
    };
    if let Err(e) = app.audit.record(Some(&caller), &entry).await {
        tracing::error!(error = %e, "a refused admin handshake could not be audited");
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_never_finishes_its_request_head_is_dropped() {
        let service = TowerToHyperService::new(axum::Router::new());
        let (mut client, server) = tokio::io::duplex(4096);
        let served = tokio::spawn(http(server, service));
        let started = tokio::time::Instant::now();
        client
            .write_all(b"GET /v1/events HTTP/1.1\r\nhost: admin\r\n")
            .await
            .expect("write");
        let mut rest = Vec::new();
        tokio::time::timeout(HEADER_READ_TIMEOUT * 3, client.read_to_end(&mut rest))
            .await
            .expect("the server closes the connection instead of waiting for the head")
            .expect("read");
        assert!(started.elapsed() >= HEADER_READ_TIMEOUT);
        let ended = served.await.expect("the connection task");
        assert!(
            ended.is_err(),
            "the connection ends with a timeout: {ended:?}"
        );
    }
}
