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
use crate::gate::{AuditSink, BROKER_PING_EVERY, GateSession, Output};
use crate::handover::Handover;
use crate::presence::{Presence, PresenceFeed};
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
    /// Where admitted device and gateway connections report (see [`crate::presence`]).
    pub presence: PresenceFeed,
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

impl Ended {
    /// A short stable word for audit records.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            Ended::ClientClosed => "client_closed",
            Ended::BrokerClosed => "broker_closed",
            Ended::Gate(code) => code,
            Ended::ConnectTimeout => "connect_timeout",
            Ended::Io(_) => "io_error",
            Ended::Shutdown => "shutdown",
        }
    }
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
    // Held from forwarding CONNECT until rumqttd's CONNACK: see `crate::handover`.
    let mut handover: Option<Handover> = None;
    let client_id = peer.identity.spiffe.id.as_str().to_owned();
    // Small to start: most connections are idle devices; the buffers grow with use.
    let mut client_buf = BytesMut::with_capacity(1024);
    let mut broker_buf = BytesMut::with_capacity(1024);
    let mut out = Vec::new();
    let connect_deadline = tokio::time::sleep(ctx.connect_timeout);
    tokio::pin!(connect_deadline);
    // Polled only for clients with keepalive 0 (`GateSession::pings_broker`).
    let mut broker_ping = tokio::time::interval_at(
        tokio::time::Instant::now() + BROKER_PING_EVERY,
        BROKER_PING_EVERY,
    );
    broker_ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    // Bytes rumqttd sent while the gate was writing to it (see `write_draining`).
    let mut broker_bytes_waiting = false;
    // Set once the client has the successful CONNACK; reports the end when taken.
    let mut presence: Option<Presence> = None;

    let ended = loop {
        if handover.is_some() && !session.awaiting_broker_connack() {
            handover = None;
        }
        out.clear();
        if session.has_deferred() {
            // A rate-limited PUBLISH waited out its pause: retry it (it is admitted
            // again, taking a token) before anything else from this client.
            session.on_client_bytes(&mut client_buf, &mut out);
        } else if std::mem::take(&mut broker_bytes_waiting) {
            session.on_broker_bytes(&mut broker_buf, &mut out);
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
            _ = broker_ping.tick(), if session.pings_broker() => session.ping_broker(&mut out),
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
        let mut sides = Sides {
            client: &mut client_wr,
            broker: &mut broker,
            broker_inbox: &mut broker_buf,
            client_id: &client_id,
            handover: &mut handover,
        };
        match apply(&mut out, &mut sides, &ctx, peer.remote).await {
            Ok(applied) => {
                // `|=`: when a deferred PUBLISH was retried first, earlier bytes still wait.
                broker_bytes_waiting |= applied.broker_bytes_read;
                if let Some(code) = applied.closed {
                    break Ended::Gate(code);
                }
                if presence.is_none() && session.is_accepted() {
                    presence = ctx.presence.admitted(&peer.identity.spiffe);
                }
            }
            Err(e) => break Ended::Io(e.to_string()),
        }
    };
    let _ = client_wr.shutdown().await;
    if session.awaiting_broker_connack() && broker.is_some() {
        // See GateSession::awaiting_broker_connack: let rumqttd finish the CONNECT.
        let wait = tokio::time::timeout(ctx.connect_timeout, async {
            while session.awaiting_broker_connack() {
                out.clear();
                if std::mem::take(&mut broker_bytes_waiting) {
                    session.on_broker_bytes(&mut broker_buf, &mut out);
                    continue;
                }
                match read_broker(&mut broker, &mut broker_buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => session.on_broker_bytes(&mut broker_buf, &mut out),
                }
            }
        });
        let _ = wait.await;
    }
    if let Some(mut pipe) = broker {
        // rumqttd identifies connections by a number it reuses: a disconnect it queues
        // for this connection after a newer one of the client id took the number over
        // ends the newer one. Closing under the client id's hand-over slot, until
        // rumqttd has closed its end, orders this disconnect before the next CONNECT.
        if handover.is_none() {
            handover = ctx
                .embedded
                .hand_back(&client_id, ctx.connect_timeout)
                .await
                .ok();
        }
        let _ = pipe.shutdown().await;
        let _ = tokio::time::timeout(ctx.connect_timeout, drain_until_closed(&mut pipe)).await;
    }
    drop(handover);
    session.finish(ended.code());
    // After rumqttd has closed its end, so the bridge hears "disconnected" only once
    // the connection is gone; a takeover's order is the book's business.
    if let Some(presence) = presence {
        presence.end(ended.code());
    }
    ended
}

/// Reads and discards what rumqttd still sends until it closes its end.
async fn drain_until_closed(pipe: &mut DuplexStream) {
    let mut sink = [0u8; 4096];
    while let Ok(n) = pipe.read(&mut sink).await {
        if n == 0 {
            return;
        }
    }
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

/// Where [`apply`] writes: the client, and rumqttd with the buffer its bytes go to.
struct Sides<'a, W> {
    client: &'a mut W,
    broker: &'a mut Option<DuplexStream>,
    broker_inbox: &'a mut BytesMut,
    /// The client id rumqttd knows the connection by, and its hand-over once begun.
    client_id: &'a str,
    handover: &'a mut Option<Handover>,
}

/// What [`apply`] did besides writing.
#[derive(Debug, Default)]
struct Applied {
    /// The session closed the connection with this reason code.
    closed: Option<&'static str>,
    /// Bytes from rumqttd arrived in the inbox while writing to it.
    broker_bytes_read: bool,
}

/// Carries out the session's outputs in order. Consecutive writes to one side are
/// coalesced into a single write (one TLS record where possible).
async fn apply<W: AsyncWrite + Unpin>(
    out: &mut Vec<Output>,
    sides: &mut Sides<'_, W>,
    ctx: &RelayContext,
    remote: SocketAddr,
) -> std::io::Result<Applied> {
    let mut to_client = BytesMut::new();
    let mut to_broker = BytesMut::new();
    let mut applied = Applied::default();
    for output in out.drain(..) {
        match output {
            Output::OpenBroker(version) => {
                let begun = ctx
                    .embedded
                    .hand_over(sides.client_id, version, ctx.connect_timeout)
                    .await;
                match begun {
                    Ok((pipe, handover)) => {
                        *sides.broker = Some(pipe);
                        *sides.handover = Some(handover);
                    }
                    Err(busy) => {
                        metrics::counter!("vitalmq_gate_closes_total", "reason" => "handover_busy")
                            .increment(1);
                        tracing::info!(peer.addr = %remote, reason = %busy, "gate closed connection");
                        applied.closed = Some("handover_busy");
                        break;
                    }
                }
            }
            Output::ToBroker(bytes) => to_broker.extend_from_slice(&bytes),
            Output::ToClient(bytes) => to_client.extend_from_slice(&bytes),
            Output::Pause(wait) => {
                applied.broker_bytes_read |= flush(sides, &mut to_client, &mut to_broker).await?;
                tracing::debug!(peer.addr = %remote, ?wait, "rate limit: pausing client input");
                tokio::time::sleep(wait).await;
            }
            Output::Close(reason) => {
                tracing::info!(peer.addr = %remote, reason = reason.code, detail = %reason.detail, "gate closed connection");
                applied.closed = Some(reason.code);
                break;
            }
        }
    }
    applied.broker_bytes_read |= flush(sides, &mut to_client, &mut to_broker).await?;
    Ok(applied)
}

/// Writes what is pending to each side; true when bytes from rumqttd were read meanwhile.
async fn flush<W: AsyncWrite + Unpin>(
    sides: &mut Sides<'_, W>,
    to_client: &mut BytesMut,
    to_broker: &mut BytesMut,
) -> std::io::Result<bool> {
    let mut read = false;
    if !to_broker.is_empty() {
        if let Some(pipe) = sides.broker.as_mut() {
            read = write_draining(pipe, to_broker, sides.broker_inbox).await?;
        }
        to_broker.clear();
    }
    if !to_client.is_empty() {
        metrics::counter!("vitalmq_bytes_total", "direction" => "out")
            .increment(to_client.len() as u64);
        sides.client.write_all(to_client).await?;
        sides.client.flush().await?;
        to_client.clear();
    }
    Ok(read)
}

/// Writes all of `data` to rumqttd and, whenever the pipe is full, reads what rumqttd
/// has for the gate into `inbox`; true when anything was read.
///
/// rumqttd's connection task does not read while one of its own writes waits. A gate
/// that only wrote would deadlock with it once both directions of the pipe are full,
/// as when a client publishes large messages to a topic it subscribes to. The inbox
/// grows by at most what rumqttd queues for one connection (its notification limit).
async fn write_draining<P: AsyncRead + AsyncWrite + Unpin>(
    pipe: &mut P,
    data: &[u8],
    inbox: &mut BytesMut,
) -> std::io::Result<bool> {
    use std::pin::Pin;
    use std::task::Poll;
    let mut written = 0;
    let mut read = false;
    // On the heap and only once the pipe is full: this future lives inside every
    // connection's task, and most writes never wait.
    let mut chunk = Vec::new();
    std::future::poll_fn(|cx| {
        while written < data.len() {
            match Pin::new(&mut *pipe).poll_write(cx, &data[written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    chunk.resize(4096, 0);
                    let mut buf = tokio::io::ReadBuf::new(&mut chunk);
                    match Pin::new(&mut *pipe).poll_read(cx, &mut buf) {
                        Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                            return Poll::Ready(Err(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "rumqttd closed the connection",
                            )));
                        }
                        Poll::Ready(Ok(())) => {
                            inbox.extend_from_slice(buf.filled());
                            read = true;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return Poll::Pending,
                    }
                }
            }
        }
        Poll::Ready(Ok(()))
    })
    .await?;
    Ok(read)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::BytesMut;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::write_draining;

    /// The peer behaves like rumqttd's connection task: it answers everything it reads
    /// with as many bytes, and does not read while its answer waits for room.
    #[tokio::test]
    async fn writing_to_a_peer_that_answers_before_reading_does_not_deadlock() {
        let (mut gate, mut peer) = tokio::io::duplex(1024);
        let echo = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut echoed = 0;
            while echoed < 64 * 1024 {
                let n = peer.read(&mut buf).await.expect("read");
                assert!(n > 0);
                peer.write_all(&buf[..n]).await.expect("write");
                echoed += n;
            }
        });
        let data: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let mut inbox = BytesMut::new();
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            write_draining(&mut gate, &data, &mut inbox),
        )
        .await
        .expect("no deadlock: the write completes")
        .expect("write");
        assert!(read);
        while inbox.len() < data.len() {
            let n = gate.read_buf(&mut inbox).await.expect("read the rest");
            assert!(n > 0);
        }
        assert_eq!(&inbox[..], &data[..], "everything the peer sent, in order");
        echo.await.expect("peer done");
    }

    #[tokio::test]
    async fn a_peer_that_closes_is_an_error_not_a_hang() {
        let (mut gate, peer) = tokio::io::duplex(16);
        drop(peer);
        let err = write_draining(&mut gate, &[0u8; 64], &mut BytesMut::new())
            .await
            .expect_err("closed");
        assert!(matches!(
            err.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::UnexpectedEof
        ));
    }
}
