//! The async shell of one simulated device: generates on a schedule, keeps a connection
//! to the broker, publishes from the outbox and feeds receipts back. Decisions about
//! messages are [`SimDevice`]'s; this only moves bytes and keeps time.
//!
//! Invariants (SPEC section 4):
//!
//! * Generation never waits for the network: messages are made on schedule whether or
//!   not the device is connected; while offline they accumulate in the outbox.
//! * Only what the outbox holds is published, in outbox order, through one cursor per
//!   connection. After every (re)connect the cursor starts over, so every unreceipted
//!   message is resent, oldest first (an older epoch's backlog before any newer epoch),
//!   before anything newer; new messages simply join the end of the same walk.
//! * Sending is paced (at most `send_rate` a second, after a short burst) and windowed
//!   (at most `window` PUBLISHes without PUBACK), so a reconnect after a long outage does
//!   not flood the broker past the device's ACL rate limit.
//! * Nothing is sent before the receipt subscription is acknowledged, so a receipt for
//!   what is sent cannot be missed for lack of a subscription.
//! * If receipts stop while messages wait (the bridge restarted, or the resend went to no
//!   subscriber), the backlog is resent after `resend_after` without a receipt, then
//!   after twice that, and so on up to eight times it; any progress resets the wait.
//! * Reconnects back off exponentially with jitter between `backoff_min` and
//!   `backoff_max`; the backoff resets once a connection is fully up.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior, sleep_until};

use crate::device::{DeviceError, DeviceReport, ReceiptOutcome, SimDevice};
use crate::mqtt::{Event, Session, SessionOptions, Target};
use crate::pki::Identity;
use crate::ring::Key;

/// How a device talks to the broker.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    pub target: Target,
    pub session: SessionOptions,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Messages per second at most, resends and catch-up included.
    pub send_rate: f64,
    /// Messages that may go at once above `send_rate`.
    pub send_burst: u32,
    /// PUBLISHes without PUBACK at most.
    pub window: usize,
    /// Resend the backlog when no receipt arrived for this long while messages wait.
    pub resend_after: Duration,
    /// Longest wait for SUBACK after CONNACK before the connection is abandoned.
    pub subscribe_timeout: Duration,
}

impl LinkOptions {
    pub fn new(target: Target) -> Self {
        Self {
            target,
            session: SessionOptions::default(),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            // Below the shipped ACL's 50 messages a second per device.
            send_rate: 40.0,
            send_burst: 10,
            window: 16,
            resend_after: Duration::from_secs(10),
            subscribe_timeout: Duration::from_secs(10),
        }
    }
}

/// What a device generates and when it stops.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Vitals per second.
    pub rate: f64,
    /// Stop generating after this many vitals messages.
    pub count: Option<u64>,
    /// Stop generating after this long.
    pub duration: Option<Duration>,
    /// A status message this often.
    pub status_every: Option<Duration>,
    /// A simulated reboot after every this many vitals messages.
    pub reboot_every: Option<u64>,
    /// After generating, keep going until every message is receipted, at most this long.
    pub until_receipted: Option<Duration>,
    /// Without `until_receipted`: after generating, wait at most this long for the last
    /// messages to be sent and acknowledged by the broker.
    pub drain: Duration,
}

/// Exponential backoff with jitter (75-125 %), deterministic per device.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    state: u64,
}

impl Backoff {
    fn new(min: Duration, max: Duration, seed: u64) -> Self {
        Self {
            min,
            max: max.max(min),
            next: min,
            state: seed,
        }
    }

    fn delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        // splitmix64 step for the jitter.
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let unit = ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64;
        base.mul_f64(0.75 + 0.5 * unit).min(self.max)
    }

    fn reset(&mut self) {
        self.next = self.min;
    }
}

/// A generic cell rate pacer: `rate` per second with a burst of `burst`.
#[derive(Debug)]
struct Pacer {
    interval: Duration,
    tolerance: Duration,
    /// Theoretical arrival time of the next message.
    tat: Instant,
}

impl Pacer {
    fn new(rate: f64, burst: u32, now: Instant) -> Self {
        let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
        Self {
            interval,
            tolerance: interval * burst.saturating_sub(1),
            tat: now,
        }
    }

    fn ready_at(&self) -> Instant {
        self.tat.checked_sub(self.tolerance).unwrap_or(self.tat)
    }

    fn take(&mut self, now: Instant) {
        self.tat = self.tat.max(now) + self.interval;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for CONNACK.
    Connecting,
    /// CONNACK received, SUBACK of the receipt subscription awaited.
    Subscribing,
    /// Sending.
    Ready,
}

#[derive(Debug)]
struct Conn {
    session: Session,
    phase: Phase,
    opened: Instant,
    /// The last message sent on this connection.
    cursor: Option<Key>,
    inflight: usize,
}

/// One device's shell; see the module documentation.
#[derive(Debug)]
pub struct DeviceLink {
    device: SimDevice,
    identity: Identity,
    link: Arc<LinkOptions>,
    schedule: Arc<Schedule>,
    ack_topic: String,
    t0: Instant,
    conn: Option<Conn>,
    next_attempt: Instant,
    backoff: Backoff,
    pacer: Pacer,
    ticks: u64,
    next_tick: Instant,
    next_status: Option<Instant>,
    /// Last time receipts made progress, the backlog was (re)started, or the outbox was
    /// empty: the reference for `resend_after`.
    last_progress: Instant,
    /// The current wait for receipt progress before resending: `resend_after`, doubled
    /// after each resend that brought no receipt.
    resend_wait: Duration,
    connects: u64,
    first_connected: Option<oneshot::Sender<()>>,
}

impl DeviceLink {
    /// Prepares the shell; time zero of the vitals model and the schedule is `t0`.
    /// `first_connected` fires when the device is connected and subscribed the first time.
    pub fn new(
        device: SimDevice,
        identity: Identity,
        link: Arc<LinkOptions>,
        schedule: Arc<Schedule>,
        t0: Instant,
        first_connected: oneshot::Sender<()>,
    ) -> Self {
        let ack_topic = format!("devices/{}/ack", device.id());
        let seed = device
            .id()
            .as_str()
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        let now = Instant::now();
        Self {
            backoff: Backoff::new(link.backoff_min, link.backoff_max, seed),
            pacer: Pacer::new(link.send_rate, link.send_burst, now),
            next_status: schedule.status_every.map(|d| t0 + d),
            device,
            identity,
            ack_topic,
            t0,
            conn: None,
            next_attempt: now,
            ticks: 0,
            next_tick: t0,
            last_progress: now,
            resend_wait: link.resend_after,
            connects: 0,
            first_connected: Some(first_connected),
            link,
            schedule,
        }
    }

    /// Runs until the schedule is done (and, with `until_receipted`, everything is
    /// receipted or the time is up) or `stop` turns true; returns the device's account.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> DeviceReport {
        let mut housekeeping = tokio::time::interval(Duration::from_millis(200));
        housekeeping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let generate_until = self.schedule.duration.map(|d| self.t0 + d);
        let mut generating = true;
        let mut done_at: Option<Instant> = None;
        let mut error = None;
        loop {
            let now = Instant::now();
            if generating
                && (self
                    .schedule
                    .count
                    .is_some_and(|c| self.device.stats().vitals_made >= c)
                    || generate_until.is_some_and(|end| now >= end))
            {
                generating = false;
                done_at = Some(now);
                tracing::info!(
                    device.id = %self.device.id(),
                    vitals = self.device.stats().vitals_made,
                    held = self.device.outbox().len(),
                    "generation done"
                );
            }
            if let Some(done) = done_at
                && self.finished(now, done)
            {
                break;
            }
            if *stop.borrow() {
                break;
            }

            let can_send = self.conn.as_ref().is_some_and(|c| {
                c.phase == Phase::Ready
                    && c.inflight < self.link.window
                    && self.device.next_after(c.cursor).is_some()
            });
            let status_at = self.next_status.filter(|_| generating);
            let (next_tick, next_attempt, send_at) =
                (self.next_tick, self.next_attempt, self.pacer.ready_at());
            let offline = self.conn.is_none();
            let step: Result<(), DeviceError> = tokio::select! {
                changed = stop.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    Ok(())
                }
                event = next_event(&mut self.conn) => {
                    self.on_event(event);
                    Ok(())
                }
                () = sleep_until(next_tick), if generating => self.on_tick(),
                () = sleep_until(status_at.unwrap_or(now)), if status_at.is_some() => self.on_status(),
                () = sleep_until(next_attempt), if offline => {
                    self.open();
                    Ok(())
                }
                () = sleep_until(send_at), if can_send => {
                    self.send_one();
                    Ok(())
                }
                _ = housekeeping.tick() => {
                    self.housekeeping();
                    Ok(())
                }
            };
            if let Err(e) = step {
                tracing::error!(device.id = %self.device.id(), error = %e, "device stopped");
                error = Some(e.to_string());
                break;
            }
        }
        if let Some(conn) = self.conn.take() {
            conn.session.close(Duration::from_millis(500)).await;
        }
        self.device.report(self.connects, error)
    }

    fn finished(&self, now: Instant, done: Instant) -> bool {
        match self.schedule.until_receipted {
            Some(timeout) => self.device.fully_receipted() || now >= done + timeout,
            None => {
                let drained = self.conn.as_ref().is_some_and(|c| {
                    c.phase == Phase::Ready
                        && c.inflight == 0
                        && self.device.next_after(c.cursor).is_none()
                });
                drained || now >= done + self.schedule.drain
            }
        }
    }

    fn on_tick(&mut self) -> Result<(), DeviceError> {
        let t = Duration::from_secs_f64(self.ticks as f64 / self.schedule.rate);
        self.ticks += 1;
        self.next_tick = self.t0 + Duration::from_secs_f64(self.ticks as f64 / self.schedule.rate);
        let Some(made) = self.device.make_vitals(t, wall_ms())? else {
            tracing::debug!(device.id = %self.device.id(), "sensor dropout; no sample");
            return Ok(());
        };
        tracing::debug!(device.id = %self.device.id(), epoch = made.key.epoch, seq = made.key.seq, "vitals made");
        if self.device.outbox().len() == 1 {
            self.progress(Instant::now());
        }
        let made_so_far = self.device.stats().vitals_made;
        let last = self.schedule.count.is_some_and(|c| made_so_far >= c);
        if let Some(n) = self.schedule.reboot_every
            && n > 0
            && made_so_far % n == 0
            && !last
        {
            // Power cycle: the connection goes without a goodbye, the new epoch is
            // durable before anything of it is made, the outbox is retained.
            self.conn = None;
            self.device.reboot()?;
            self.backoff.reset();
            self.next_attempt = Instant::now() + self.link.backoff_min;
        }
        Ok(())
    }

    fn on_status(&mut self) -> Result<(), DeviceError> {
        let every = self
            .schedule
            .status_every
            .unwrap_or(Duration::from_secs(60));
        self.next_status = self.next_status.map(|at| at + every);
        let made = self.device.make_status(wall_ms(), self.t0.elapsed())?;
        tracing::debug!(
            device.id = %self.device.id(),
            epoch = made.key.epoch,
            seq = made.key.seq,
            dropped = self.device.outbox().counters().overflow_dropped,
            "status made"
        );
        Ok(())
    }

    fn open(&mut self) {
        tracing::debug!(device.id = %self.device.id(), "connecting");
        let session = Session::open(
            &self.link.target,
            &self.identity.id,
            &self.identity.tls,
            &self.link.session,
        );
        self.conn = Some(Conn {
            session,
            phase: Phase::Connecting,
            opened: Instant::now(),
            cursor: None,
            inflight: 0,
        });
    }

    fn on_event(&mut self, event: Event) {
        let id = self.device.id().clone();
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        match event {
            Event::Connected => {
                conn.phase = Phase::Subscribing;
                if let Err(e) = conn.session.subscribe(&self.ack_topic) {
                    self.lost(&format!("subscribe: {e}"));
                }
            }
            Event::Subscribed { granted } => {
                if !granted {
                    tracing::warn!(device.id = %id, topic = %self.ack_topic, "receipt subscription refused; nothing will be released");
                }
                conn.phase = Phase::Ready;
                conn.cursor = None;
                conn.inflight = 0;
                self.connects += 1;
                self.backoff.reset();
                self.progress(Instant::now());
                tracing::info!(
                    device.id = %id,
                    epoch = self.device.epoch(),
                    backlog = self.device.outbox().len(),
                    connects = self.connects,
                    "connected"
                );
                if let Some(tx) = self.first_connected.take() {
                    let _ = tx.send(());
                }
            }
            Event::Acked => conn.inflight = conn.inflight.saturating_sub(1),
            Event::Message { topic, payload } if topic == self.ack_topic => {
                match self.device.apply_receipt(&payload) {
                    ReceiptOutcome::Applied { receipt, released } => {
                        if released > 0 || self.device.outbox().is_empty() {
                            self.progress(Instant::now());
                        }
                        tracing::debug!(
                            device.id = %id,
                            receipt.epoch = receipt.epoch,
                            receipt.seq = receipt.seq,
                            released,
                            held = self.device.outbox().len(),
                            "receipt"
                        );
                    }
                    ReceiptOutcome::BeyondNewest { receipt } => tracing::warn!(
                        device.id = %id,
                        receipt.epoch = receipt.epoch,
                        receipt.seq = receipt.seq,
                        "receipt for a message never made; ignored"
                    ),
                    ReceiptOutcome::Malformed(e) => {
                        tracing::warn!(device.id = %id, error = %e, "malformed receipt ignored");
                    }
                }
            }
            Event::Message { topic, .. } => {
                tracing::debug!(device.id = %id, topic = %topic, "message on an unexpected topic ignored");
            }
            Event::Down { reason } => self.lost(&reason),
        }
    }

    /// Receipts moved (or nothing waits for one): restart the resend clock.
    fn progress(&mut self, now: Instant) {
        self.last_progress = now;
        self.resend_wait = self.link.resend_after;
    }

    /// The connection is gone: schedule the next attempt.
    fn lost(&mut self, reason: &str) {
        let was_ready = self.conn.take().is_some_and(|c| c.phase == Phase::Ready);
        let delay = self.backoff.delay();
        self.next_attempt = Instant::now() + delay;
        let retry_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        let held = self.device.outbox().len();
        if was_ready {
            tracing::warn!(device.id = %self.device.id(), reason, retry_ms, held, "connection lost");
        } else {
            tracing::info!(device.id = %self.device.id(), reason, retry_ms, held, "connect failed");
        }
    }

    fn send_one(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let Some(out) = self.device.next_after(conn.cursor) else {
            return;
        };
        let (key, resend) = (out.key, out.resend);
        let topic = out.channel.topic(self.device.id().as_str());
        match conn.session.publish(topic, out.bytes.to_vec()) {
            Ok(()) => {
                conn.cursor = Some(key);
                conn.inflight += 1;
                self.pacer.take(Instant::now());
                self.device.mark_sent(key);
                tracing::trace!(device.id = %self.device.id(), epoch = key.epoch, seq = key.seq, resend, "published");
            }
            Err(e) => self.lost(&format!("publish: {e}")),
        }
    }

    fn housekeeping(&mut self) {
        let now = Instant::now();
        if self.device.outbox().is_empty() {
            self.progress(now);
        }
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        match conn.phase {
            Phase::Connecting | Phase::Subscribing => {
                let limit = self.link.session.connect_timeout + self.link.subscribe_timeout;
                if now.duration_since(conn.opened) > limit {
                    self.lost("no CONNACK or SUBACK in time");
                }
            }
            Phase::Ready => {
                let front = self.device.outbox().front().map(|e| e.key());
                let front_sent = front.is_some_and(|f| conn.cursor.is_some_and(|c| c >= f));
                if front_sent && now.duration_since(self.last_progress) >= self.resend_wait {
                    conn.cursor = None;
                    self.last_progress = now;
                    self.resend_wait = (self.resend_wait * 2).min(self.link.resend_after * 8);
                    tracing::info!(
                        device.id = %self.device.id(),
                        backlog = self.device.outbox().len(),
                        next_wait_ms = u64::try_from(self.resend_wait.as_millis()).unwrap_or(u64::MAX),
                        "no receipt progress; resending backlog"
                    );
                }
            }
        }
    }
}

/// The next event of the connection, or never when there is none.
async fn next_event(conn: &mut Option<Conn>) -> Event {
    match conn {
        Some(c) => c.session.next().await,
        None => std::future::pending().await,
    }
}

/// The device clock: milliseconds since the Unix epoch.
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2), 7);
        let delays: Vec<Duration> = (0..8).map(|_| b.delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let base = Duration::from_millis(100 * (1 << i.min(5))).min(Duration::from_secs(2));
            assert!(
                *d >= base.mul_f64(0.75) && *d <= base.mul_f64(1.25).min(Duration::from_secs(2)),
                "{i}: {d:?}"
            );
        }
        b.reset();
        assert!(b.delay() <= Duration::from_millis(125));
    }

    #[test]
    fn pacer_allows_a_burst_then_the_rate() {
        let t = Instant::now();
        let mut p = Pacer::new(10.0, 3, t);
        for _ in 0..3 {
            assert!(p.ready_at() <= t);
            p.take(t);
        }
        assert_eq!(p.ready_at(), t + Duration::from_millis(100));
        p.take(t + Duration::from_millis(100));
        assert_eq!(p.ready_at(), t + Duration::from_millis(200));
    }
}
