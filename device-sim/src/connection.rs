//! The one reconnecting connection of a simulated device ([`crate::link`]) and of a
//! gateway ([`crate::gateway`]): what differs between them is the client id, the receipt
//! filters it subscribes to, and how many devices it carries for the live count.
//!
//! Invariants:
//!
//! * At most one [`Session`] at a time. A new one is opened only when the previous one
//!   is gone and the backoff has run out ([`Connection::retry_at`]).
//! * The connection is *ready* only after CONNACK and the SUBACK of the receipt
//!   filters, so nothing is sent before a receipt for it could be missed.
//! * A connection that is not ready within `connect_timeout + subscribe_timeout` is
//!   dropped and counts as lost.
//! * Reconnects back off exponentially with jitter (`backon`), between `backoff_min`
//!   and `backoff_max`; the backoff resets once a connection is ready.
//! * Every PUBLISH handed to the session counts against the in-flight window until its
//!   PUBACK; a new connection starts with an empty window.
//! * Losing the connection never loses a message: the caller's outbox still holds
//!   whatever no receipt covered, and the caller resends it on the next connection.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};
use bytes::Bytes;
use rustls::ClientConfig;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::link::{LinkOptions, LiveCounts};
use vitalmq_mqtt_client::{Event, Session};

/// Exponential backoff with jitter between `min` and `max`, deterministic per seed.
#[derive(Debug)]
pub(crate) struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration, seed: u64) -> Self {
        let max = max.max(min);
        let builder = ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_jitter()
            .with_jitter_seed(seed)
            .without_max_times();
        Self {
            delays: builder.build(),
            builder,
            max,
        }
    }

    /// The next delay: the base doubles from `min` up to `max`, the jitter adds up to
    /// as much again, and the result never exceeds `max`.
    pub(crate) fn delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.max).min(self.max)
    }

    pub(crate) fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for CONNACK.
    Connecting,
    /// CONNACK received, SUBACK of the receipt subscriptions awaited.
    Subscribing,
    /// Sending.
    Ready,
}

#[derive(Debug)]
struct Conn {
    session: Session,
    phase: Phase,
    opened: Instant,
    inflight: usize,
}

/// What an event of the connection means to its owner.
#[derive(Debug)]
pub(crate) enum Happened {
    /// Connected and subscribed: the owner starts its sends over. `granted`: whether
    /// every receipt filter was granted.
    Up { granted: bool },
    /// A PUBACK; `refused` holds the reason when an MQTT 5 broker refused the PUBLISH.
    Acked { refused: Option<String> },
    /// An incoming PUBLISH.
    Message { topic: String, payload: Bytes },
    /// The connection is gone; the next attempt is in `retry`.
    Lost(Lost),
    /// Nothing for the owner.
    Nothing,
}

/// A lost connection.
#[derive(Debug)]
pub(crate) struct Lost {
    pub reason: String,
    /// Whether it had been ready (connected and subscribed).
    pub was_ready: bool,
    pub retry: Duration,
}

impl Lost {
    /// The delay before the next attempt, in ms, for the logs.
    pub(crate) fn retry_ms(&self) -> u64 {
        u64::try_from(self.retry.as_millis()).unwrap_or(u64::MAX)
    }
}

/// One reconnecting connection; see the module documentation.
#[derive(Debug)]
pub(crate) struct Connection {
    client_id: String,
    tls: Arc<ClientConfig>,
    link: Arc<LinkOptions>,
    filters: Vec<String>,
    /// Devices it carries, for the live count.
    carried: usize,
    live: Option<Arc<LiveCounts>>,
    conn: Option<Conn>,
    next_attempt: Instant,
    backoff: Backoff,
    /// Connections that became ready.
    connects: u64,
    /// Told when the connection is ready the first time.
    first_ready: Option<oneshot::Sender<()>>,
}

impl Connection {
    /// A connection (not yet open) as `client_id`, subscribing to `filters` and
    /// carrying `carried` devices; its jitter is seeded from the client id.
    /// `first_ready` fires when it is ready the first time.
    pub(crate) fn new(
        client_id: &str,
        tls: Arc<ClientConfig>,
        link: Arc<LinkOptions>,
        filters: Vec<String>,
        carried: usize,
        first_ready: oneshot::Sender<()>,
    ) -> Self {
        let seed = client_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        Self {
            client_id: client_id.to_owned(),
            tls,
            backoff: Backoff::new(link.backoff_min, link.backoff_max, seed),
            link,
            filters,
            carried,
            live: None,
            conn: None,
            next_attempt: Instant::now(),
            connects: 0,
            first_ready: Some(first_ready),
        }
    }

    /// Keeps `live` up to date with the devices this connection carries.
    pub(crate) fn set_live(&mut self, live: Arc<LiveCounts>) {
        self.live = Some(live);
    }

    pub(crate) fn connects(&self) -> u64 {
        self.connects
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.phase == Phase::Ready)
    }

    /// PUBLISHes without PUBACK on the current connection.
    pub(crate) fn inflight(&self) -> usize {
        self.conn.as_ref().map_or(0, |c| c.inflight)
    }

    /// Ready, with fewer than `window` PUBLISHes in flight.
    pub(crate) fn has_room(&self, window: usize) -> bool {
        self.is_ready() && self.inflight() < window
    }

    /// When to open the next connection; `None` while one is open.
    pub(crate) fn retry_at(&self) -> Option<Instant> {
        self.conn.is_none().then_some(self.next_attempt)
    }

    /// Makes the next attempt no earlier than `at`.
    pub(crate) fn retry_no_earlier(&mut self, at: Instant) {
        self.next_attempt = at;
    }

    /// Opens a session; its first event is CONNACK or its end.
    pub(crate) fn open(&mut self) {
        let session = Session::open(
            &self.link.target,
            &self.client_id,
            &self.tls,
            &self.link.session,
        );
        self.conn = Some(Conn {
            session,
            phase: Phase::Connecting,
            opened: Instant::now(),
            inflight: 0,
        });
    }

    /// The next event of the session, or never when there is none. Cancel-safe.
    pub(crate) async fn next(&mut self) -> Event {
        match &mut self.conn {
            Some(c) => c.session.next().await,
            None => std::future::pending().await,
        }
    }

    /// Handles an event of [`Connection::next`].
    pub(crate) fn on_event(&mut self, event: Event) -> Happened {
        let Some(conn) = self.conn.as_mut() else {
            return Happened::Nothing;
        };
        match event {
            Event::Connected => {
                conn.phase = Phase::Subscribing;
                match conn.session.subscribe_many(&self.filters) {
                    Ok(()) => Happened::Nothing,
                    Err(e) => Happened::Lost(self.lost(&format!("subscribe: {e}"))),
                }
            }
            Event::Subscribed { granted } => {
                conn.phase = Phase::Ready;
                conn.inflight = 0;
                if let Some(live) = &self.live {
                    live.add(self.carried);
                }
                self.connects += 1;
                self.backoff.reset();
                if let Some(tx) = self.first_ready.take() {
                    let _ = tx.send(());
                }
                Happened::Up { granted }
            }
            Event::Acked { refused } => {
                conn.inflight = conn.inflight.saturating_sub(1);
                Happened::Acked { refused }
            }
            Event::Message { topic, payload } => Happened::Message { topic, payload },
            Event::Down { reason } => Happened::Lost(self.lost(&reason)),
        }
    }

    /// Whether a session is open (in any phase).
    pub(crate) fn is_open(&self) -> bool {
        self.conn.is_some()
    }

    /// Hands a QoS 1 PUBLISH to the session: whether one was open to take it. The
    /// connection is lost if the session cannot take it.
    pub(crate) fn publish(&mut self, topic: String, payload: Vec<u8>) -> Result<bool, Lost> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(false);
        };
        match conn.session.publish(topic, payload) {
            Ok(()) => {
                conn.inflight += 1;
                Ok(true)
            }
            Err(e) => Err(self.lost(&format!("publish: {e}"))),
        }
    }

    /// Drops a connection that is not ready in time; the loss, if it was dropped.
    pub(crate) fn check_deadline(&mut self, now: Instant) -> Option<Lost> {
        let conn = self.conn.as_ref()?;
        let limit = self.link.session.connect_timeout + self.link.subscribe_timeout;
        (conn.phase != Phase::Ready && now.duration_since(conn.opened) > limit)
            .then(|| self.lost("no CONNACK or SUBACK in time"))
    }

    /// Drops the connection without DISCONNECT (a power cycle, a radio loss) and tries
    /// again no earlier than `at`, with the backoff reset; whether it was ready.
    pub(crate) fn drop_now(&mut self, at: Instant) -> bool {
        let was_ready = self.take().is_some_and(|c| c.phase == Phase::Ready);
        self.backoff.reset();
        self.next_attempt = at;
        was_ready
    }

    /// Says goodbye (DISCONNECT, waiting up to `grace` for it to go out).
    pub(crate) async fn close(&mut self, grace: Duration) {
        if let Some(conn) = self.take() {
            conn.session.close(grace).await;
        }
    }

    /// The connection is gone: schedule the next attempt.
    fn lost(&mut self, reason: &str) -> Lost {
        let was_ready = self.take().is_some_and(|c| c.phase == Phase::Ready);
        let retry = self.backoff.delay();
        self.next_attempt = Instant::now() + retry;
        Lost {
            reason: reason.to_owned(),
            was_ready,
            retry,
        }
    }

    /// Takes the connection away (dropping it closes it without DISCONNECT), keeping the
    /// live count right.
    fn take(&mut self) -> Option<Conn> {
        let conn = self.conn.take()?;
        if conn.phase == Phase::Ready
            && let Some(live) = &self.live
        {
            live.sub(self.carried);
        }
        Some(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let mut b = Backoff::new(min, max, 7);
        let delays: Vec<Duration> = (0..8).map(|_| b.delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let base = (min * (1 << i.min(5))).min(max);
            assert!(*d >= base && *d <= (base * 2).min(max), "{i}: {d:?}");
        }
        let bases = (0..8).map(|i| (min * (1 << i.min(5))).min(max));
        assert!(
            delays.iter().zip(bases).any(|(d, base)| *d != base),
            "no jitter"
        );
        b.reset();
        assert!(b.delay() < min * 2);
        // Deterministic per seed.
        let mut again = Backoff::new(min, max, 7);
        assert_eq!((0..8).map(|_| again.delay()).collect::<Vec<_>>(), delays);
    }
}
