//! Turns accepted TCP connections into authenticated TLS streams.
//!
//! The caller spawns one task per TCP connection and calls [`Acceptor::accept`], so
//! handshakes run concurrently and a slow or silent client holds only its own task. In
//! order, each connection:
//!
//! 1. is checked against the per-source-IP rate limit (a keyed GCRA limiter) before any
//!    TLS work: refused with [`HandshakeRefusal::RateLimited`];
//! 2. waits, at most `first_byte_timeout`, for the client's first byte (the start of its
//!    ClientHello) without holding anything but its own task: refused with
//!    [`HandshakeRefusal::Silent`]. Sockets that never send cannot take the handshake
//!    slots real clients need (500 silent sockets delayed a real client by 4-5 s);
//! 3. waits for one of `max_concurrent_handshakes` slots, then handshakes with the
//!    [`TlsEdge`] current *at that accept* (read from a `watch`, so a reload applies to
//!    new handshakes); slot wait and handshake together are bounded by
//!    `handshake_timeout`: refused with [`HandshakeRefusal::Timeout`];
//! 4. has its verified leaf turned into a [`PeerIdentity`] (a CN-only certificate gets
//!    its role from the registry, if one was given with [`Acceptor::with_registry`]).
//!
//! Every outcome is counted in `vitalmq_handshakes_total{outcome}` and timed in
//! `vitalmq_handshake_duration_seconds{outcome}`; `outcome` is `ok` or
//! [`HandshakeRefusal::reason`].
//!
//! After a reload, [`verify_peer_again`] re-checks a live connection's certificate
//! against the new verifier (new CRLs, CAs, trust domain), so the broker can close
//! connections whose certificate is now revoked (or has expired meanwhile).

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::debug;
use vitalmq_policies::DeviceRegistry;

use crate::identity::{CertName, IdentityError, PeerIdentity, cert_identity};
use crate::tls::{SpiffeClientVerifier, TlsEdge, TlsSettings, identity_error, tls_reason};

/// Bounds on the accept path (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptLimits {
    /// Time from TCP accept to the client's first byte; no handshake slot is held.
    pub first_byte_timeout: Duration,
    pub handshake_timeout: Duration,
    pub max_concurrent_handshakes: usize,
    /// Sustained new connections per second and source IP; 0 disables the limit.
    pub per_ip_per_second: u32,
    pub per_ip_burst: u32,
}

impl Default for AcceptLimits {
    fn default() -> Self {
        Self {
            first_byte_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(5),
            max_concurrent_handshakes: 256,
            per_ip_per_second: 20,
            per_ip_burst: 50,
        }
    }
}

impl AcceptLimits {
    pub(crate) fn from_settings(settings: &TlsSettings) -> Self {
        Self {
            first_byte_timeout: settings.first_byte_timeout(),
            handshake_timeout: settings.handshake_timeout(),
            max_concurrent_handshakes: settings.max_concurrent_handshakes,
            per_ip_per_second: settings.per_ip_per_second,
            per_ip_burst: settings.per_ip_burst,
        }
    }
}

/// A connection that completed the handshake with an acceptable identity.
#[derive(Debug, Clone)]
pub struct AcceptedPeer {
    pub identity: PeerIdentity,
    pub remote: SocketAddr,
    /// The verified leaf certificate and the intermediates the client sent, kept for
    /// [`verify_peer_again`].
    pub leaf: CertificateDer<'static>,
    pub intermediates: Vec<CertificateDer<'static>>,
}

/// Why a connection did not become an [`AcceptedPeer`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeRefusal {
    #[error("too many new connections from {ip}")]
    RateLimited { ip: IpAddr },
    /// The client sent nothing (no ClientHello) within the first-byte timeout.
    #[error("nothing received within {after:?}")]
    Silent { after: Duration },
    #[error("handshake not finished within {after:?}")]
    Timeout { after: Duration },
    /// The TLS handshake failed (the certificate chain, validity or revocation, no
    /// client certificate, a protocol error); the peer was sent an alert.
    #[error("TLS handshake failed ({}): {error}", tls_reason(.error))]
    Tls { error: rustls::Error },
    /// The certificate is valid but does not carry an acceptable identity.
    #[error("identity refused ({reason}): {0}", reason = .0.reason())]
    Identity(#[from] IdentityError),
    #[error("i/o error during the handshake: {0}")]
    Io(#[source] io::Error),
}

impl HandshakeRefusal {
    /// A stable token: `rate_limited`, `silent`, `timeout`, `tls`, `identity` or `io`.
    pub const fn reason(&self) -> &'static str {
        match self {
            Self::RateLimited { .. } => "rate_limited",
            Self::Silent { .. } => "silent",
            Self::Timeout { .. } => "timeout",
            Self::Tls { .. } => "tls",
            Self::Identity(_) => "identity",
            Self::Io(_) => "io",
        }
    }

    /// A stable finer token for audit records: [`tls_reason`] for TLS failures (e.g.
    /// `certificate_revoked`), [`IdentityError::reason`] for identity ones (e.g.
    /// `foreign_trust_domain`), else the same as [`Self::reason`].
    pub fn detail(&self) -> &'static str {
        match self {
            Self::Tls { error } => tls_reason(error),
            Self::Identity(e) => e.reason(),
            other => other.reason(),
        }
    }

    /// Classifies the error of a tokio-rustls accept.
    fn from_io(error: io::Error) -> Self {
        let is_tls = error
            .get_ref()
            .is_some_and(|inner| inner.is::<rustls::Error>());
        if !is_tls {
            return Self::Io(error);
        }
        match error
            .into_inner()
            .map(|inner| inner.downcast::<rustls::Error>())
        {
            Some(Ok(tls)) => match identity_error(&tls) {
                Some(identity) => Self::Identity(identity.clone()),
                None => Self::Tls { error: *tls },
            },
            // Checked above: the inner error is a rustls::Error.
            _ => Self::Io(io::Error::other("unclassifiable handshake error")),
        }
    }
}

/// Accepts TLS connections (see the module documentation). Share it with `Arc`.
pub struct Acceptor {
    edge: watch::Receiver<Arc<TlsEdge>>,
    registry: Option<watch::Receiver<Arc<DeviceRegistry>>>,
    limits: AcceptLimits,
    handshakes: Semaphore,
    per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    checked: AtomicU64,
}

impl fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acceptor")
            .field("limits", &self.limits)
            .field("free_handshake_slots", &self.handshakes.available_permits())
            .finish_non_exhaustive()
    }
}

/// How often (in checked connections) idle per-IP limiter entries are dropped.
const RETAIN_EVERY: u64 = 4096;

impl Acceptor {
    pub fn new(edge: watch::Receiver<Arc<TlsEdge>>, limits: AcceptLimits) -> Self {
        let per_ip = NonZeroU32::new(limits.per_ip_per_second).map(|rate| {
            let burst = NonZeroU32::new(limits.per_ip_burst).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Self {
            edge,
            registry: None,
            limits,
            handshakes: Semaphore::new(limits.max_concurrent_handshakes.max(1)),
            per_ip,
            checked: AtomicU64::new(0),
        }
    }

    /// The registry CN-only certificates get their role from (needed with `cn_fallback`;
    /// without it such certificates are refused with `cn_role_unknown`).
    pub fn with_registry(mut self, registry: watch::Receiver<Arc<DeviceRegistry>>) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Handshakes `tcp` (accepted from `remote`) and authenticates the peer.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        remote: SocketAddr,
    ) -> Result<(TlsStream<TcpStream>, AcceptedPeer), HandshakeRefusal> {
        let started = Instant::now();
        let result = self.accept_inner(tcp, remote).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(refusal) => refusal.reason(),
        };
        metrics::counter!("vitalmq_handshakes_total", "outcome" => outcome).increment(1);
        metrics::histogram!("vitalmq_handshake_duration_seconds", "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
        match &result {
            Ok((_, peer)) => debug!(
                peer.addr = %remote,
                peer.id = %peer.identity.spiffe,
                peer.serial = %peer.identity.serial_hex,
                "handshake complete"
            ),
            Err(refusal) => debug!(
                peer.addr = %remote,
                reason = refusal.reason(),
                detail = refusal.detail(),
                error = %refusal,
                "handshake refused"
            ),
        }
        result
    }

    async fn accept_inner(
        &self,
        tcp: TcpStream,
        remote: SocketAddr,
    ) -> Result<(TlsStream<TcpStream>, AcceptedPeer), HandshakeRefusal> {
        if let Some(limiter) = &self.per_ip {
            if self.checked.fetch_add(1, Ordering::Relaxed) % RETAIN_EVERY == RETAIN_EVERY - 1 {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
            limiter
                .check_key(&remote.ip())
                .map_err(|_| HandshakeRefusal::RateLimited { ip: remote.ip() })?;
        }
        // A peek, not a read: the byte stays for rustls. Ok(0) is a client that closed.
        let first_byte = self.limits.first_byte_timeout;
        match tokio::time::timeout(first_byte, tcp.peek(&mut [0u8; 1])).await {
            Err(_) => return Err(HandshakeRefusal::Silent { after: first_byte }),
            Ok(Ok(0)) => {
                return Err(HandshakeRefusal::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before sending anything",
                )));
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(HandshakeRefusal::Io(e)),
        }
        let edge = Arc::clone(&self.edge.borrow());
        let handshake = async {
            let Ok(_slot) = self.handshakes.acquire().await else {
                return Err(io::Error::other("handshake semaphore closed"));
            };
            TlsAcceptor::from(Arc::clone(&edge.server))
                .accept(tcp)
                .await
        };
        let after = self.limits.handshake_timeout;
        let stream = tokio::time::timeout(after, handshake)
            .await
            .map_err(|_| HandshakeRefusal::Timeout { after })?
            .map_err(HandshakeRefusal::from_io)?;

        let (leaf, intermediates) = match stream.get_ref().1.peer_certificates() {
            Some([leaf, rest @ ..]) => (
                leaf.clone().into_owned(),
                rest.iter().map(|c| c.clone().into_owned()).collect(),
            ),
            // The verifier makes client certificates mandatory; kept as a refusal anyway.
            _ => {
                return Err(HandshakeRefusal::Tls {
                    error: rustls::Error::NoCertificatesPresented,
                });
            }
        };
        let verifier = &edge.verifier;
        let registry = self.registry.as_ref().map(|r| Arc::clone(&r.borrow()));
        let identity = cert_identity(&leaf, verifier.trust_domain(), verifier.cn_fallback())?
            .resolve(verifier.trust_domain(), registry.as_deref())?;
        Ok((
            stream,
            AcceptedPeer {
                identity,
                remote,
                leaf,
                intermediates,
            },
        ))
    }
}

/// Re-checks a live connection's certificate with `verifier` (typically the one of a
/// freshly reloaded [`TlsEdge`]) at time `now`: chain to a configured CA, validity,
/// revocation against the new CRLs, and that the certificate still yields the same
/// identity. An error means the connection should be closed; [`tls_reason`] and
/// [`identity_error`] classify it.
pub fn verify_peer_again(
    verifier: &SpiffeClientVerifier,
    peer: &AcceptedPeer,
    now: UnixTime,
) -> Result<(), rustls::Error> {
    let cert = verifier.verify_chain(&peer.leaf, &peer.intermediates, now)?;
    let same = match &cert.name {
        CertName::Spiffe(id) => *id == peer.identity.spiffe,
        CertName::CommonName(cn) => *cn == peer.identity.spiffe.id,
    };
    if same {
        Ok(())
    } else {
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::ApplicationVerificationFailure,
        ))
    }
}
