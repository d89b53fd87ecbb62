//! One client connection's I/O: moves bytes between the client's TLS stream and its
//! in-process pipe to rumqttd through the [`GateSession`], and reacts to policy and
//! certificate reloads while the connection lives.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rustls_pki_types::UnixTime;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, DuplexStream};
use tokio::sync::watch;

use crate::accept::{AcceptedPeer, verify_peer_again};
use crate::authz::Authorizer;
use crate::embedded::EmbeddedBroker;
use crate::gate::{AuditSink, GateSession, Output};
use crate::ratelimit::RateRegistry;
use crate::tls::TlsEdge;

/// What every connection shares.
#[derive(Debug)]
pub struct RelayContext {
    pub embedded: Arc<EmbeddedBroker>,
    pub authz: watch::Receiver<Arc<dyn Authorizer>>,
    pub edge: watch::Receiver<Arc<TlsEdge>>,
    pub audit: Arc<dyn AuditSink>,
    pub rates: RateRegistry,
    /// How long a client may take to send CONNECT after the handshake.
    pub connect_timeout: Duration,
    pub shutdown: watch::Receiver<bool>,
}

/// How a connection ended, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    ClientClosed,
    BrokerClosed,
    Gate(&'static str),
    ConnectTimeout,
    Io(String),
    Shutdown,
}

/// Serves one authenticated client until either side closes.
pub async fn serve<S>(client: S, peer: AcceptedPeer, ctx: Arc<RelayContext>) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let authz = ctx.authz.borrow().clone();
    let rate = ctx
        .rates
        .for_identity(&peer.identity.spiffe, &authz.limits(&peer.identity));
    let mut session = GateSession::new(
        peer.identity.clone(),
        peer.remote.to_string(),
        authz,
        Arc::clone(&ctx.audit),
        rate,
        ctx.embedded.password(),
    );
    let mut authz_rx = ctx.authz.clone();
    let mut edge_rx = ctx.edge.clone();
    let mut shutdown = ctx.shutdown.clone();
    authz_rx.mark_unchanged();
    edge_rx.mark_unchanged();

    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let mut broker: Option<DuplexStream> = None;
    // Small to start: most connections are idle devices; the buffers grow with use.
    let mut client_buf = BytesMut::with_capacity(1024);
    let mut broker_buf = BytesMut::with_capacity(1024);
    let mut out = Vec::new();
    let connect_deadline = tokio::time::sleep(ctx.connect_timeout);
    tokio::pin!(connect_deadline);

    let ended = loop {
        out.clear();
        if session.has_deferred() {
            // A rate-limited PUBLISH waited out its pause: retry it (it is admitted
            // again, taking a token) before anything else from this client.
            session.on_client_bytes(&mut client_buf, &mut out);
        } else {
            tokio::select! {
            read = client_rd.read_buf(&mut client_buf) => match read {
                Ok(0) => break Ended::ClientClosed,
                Ok(_) => session.on_client_bytes(&mut client_buf, &mut out),
                Err(e) => break Ended::Io(e.to_string()),
            },
            read = read_broker(&mut broker, &mut broker_buf) => match read {
                Ok(0) => break Ended::BrokerClosed,
                Ok(_) => session.on_broker_bytes(&mut broker_buf, &mut out),
                Err(e) => break Ended::Io(e.to_string()),
            },
            () = &mut connect_deadline, if session.version().is_none() => break Ended::ConnectTimeout,
            Ok(()) = authz_rx.changed() => {
                let latest = authz_rx.borrow_and_update().clone();
                session.replace_authorizer(latest, &mut out);
            }
            Ok(()) = edge_rx.changed() => {
                let edge = edge_rx.borrow_and_update().clone();
                if let Err(e) = verify_peer_again(&edge.verifier, &peer, UnixTime::now()) {
                    session.certificate_revoked(crate::tls::tls_reason(&e), &mut out);
                }
            }
            _ = shutdown.changed() => break Ended::Shutdown,
            }
        }
        match apply(&mut out, &mut client_wr, &mut broker, &ctx, peer.remote).await {
            Ok(None) => {}
            Ok(Some(code)) => break Ended::Gate(code),
            Err(e) => break Ended::Io(e.to_string()),
        }
    };
    let _ = client_wr.shutdown().await;
    if session.awaiting_broker_connack() {
        // See GateSession::awaiting_broker_connack: let rumqttd finish the CONNECT.
        let wait = tokio::time::timeout(ctx.connect_timeout, async {
            while session.awaiting_broker_connack() {
                out.clear();
                match read_broker(&mut broker, &mut broker_buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => session.on_broker_bytes(&mut broker_buf, &mut out),
                }
            }
        });
        let _ = wait.await;
    }
    if let Some(mut pipe) = broker {
        let _ = pipe.shutdown().await;
    }
    ended
}

async fn read_broker(
    broker: &mut Option<DuplexStream>,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    match broker {
        Some(pipe) => pipe.read_buf(buf).await,
        None => std::future::pending().await,
    }
}

/// Carries out the session's outputs in order. Consecutive writes to one side are
/// coalesced into a single write (one TLS record where possible).
async fn apply<W: AsyncWrite + Unpin>(
    out: &mut Vec<Output>,
    client: &mut W,
    broker: &mut Option<DuplexStream>,
    ctx: &RelayContext,
    remote: SocketAddr,
) -> std::io::Result<Option<&'static str>> {
    let mut to_client = BytesMut::new();
    let mut to_broker = BytesMut::new();
    let mut closed = None;
    for output in out.drain(..) {
        match output {
            Output::OpenBroker(version) => *broker = Some(ctx.embedded.connect(version)),
            Output::ToBroker(bytes) => to_broker.extend_from_slice(&bytes),
            Output::ToClient(bytes) => to_client.extend_from_slice(&bytes),
            Output::Pause(wait) => {
                flush(client, broker, &mut to_client, &mut to_broker).await?;
                tracing::debug!(peer.addr = %remote, ?wait, "rate limit: pausing client input");
                tokio::time::sleep(wait).await;
            }
            Output::Close(reason) => {
                tracing::info!(peer.addr = %remote, reason = reason.code, detail = %reason.detail, "gate closed connection");
                closed = Some(reason.code);
                break;
            }
        }
    }
    flush(client, broker, &mut to_client, &mut to_broker).await?;
    Ok(closed)
}

async fn flush<W: AsyncWrite + Unpin>(
    client: &mut W,
    broker: &mut Option<DuplexStream>,
    to_client: &mut BytesMut,
    to_broker: &mut BytesMut,
) -> std::io::Result<()> {
    if !to_broker.is_empty() {
        if let Some(pipe) = broker.as_mut() {
            pipe.write_all(to_broker).await?;
        }
        to_broker.clear();
    }
    if !to_client.is_empty() {
        metrics::counter!("vitalmq_bytes_total", "direction" => "out")
            .increment(to_client.len() as u64);
        client.write_all(to_client).await?;
        client.flush().await?;
        to_client.clear();
    }
    Ok(())
}
