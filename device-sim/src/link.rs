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
//! * Injected faults ([`crate::faults`]) never bypass the outbox for the device's own
//!   messages: an injected PUBLISH is an extra copy, and the out-of-order fault only
//!   swaps the send order of two held messages, both of which stay held until receipted.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior, sleep_until};

use crate::clock::DeviceClock;
use crate::device::{DeviceError, DeviceReport, ReceiptOutcome, SimDevice};
use crate::faults::{Action, Injector, LinkState};
use crate::latency::{Recorder, SendTimes};
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
    /// Device time per wall time (see [`crate::clock`]): 1 is real time. `rate`,
    /// `duration`, `status_every` and fault times stay wall-clock.
    pub time_scale: f64,
}

/// Exponential backoff with jitter (75-125 %), deterministic per device.
#[derive(Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    state: u64,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration, seed: u64) -> Self {
        Self {
            min,
            max: max.max(min),
            next: min,
            state: seed,
        }
    }

    pub(crate) fn delay(&mut self) -> Duration {
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

    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}

/// A generic cell rate pacer: `rate` per second with a burst of `burst`.
#[derive(Debug)]
pub(crate) struct Pacer {
    interval: Duration,
    tolerance: Duration,
    /// Theoretical arrival time of the next message.
    tat: Instant,
}

impl Pacer {
    pub(crate) fn new(rate: f64, burst: u32, now: Instant) -> Self {
        let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
        Self {
            interval,
            tolerance: interval * burst.saturating_sub(1),
            tat: now,
        }
    }

    pub(crate) fn ready_at(&self) -> Instant {
        self.tat.checked_sub(self.tolerance).unwrap_or(self.tat)
    }

    pub(crate) fn take(&mut self, now: Instant) {
        self.tat = self.tat.max(now) + self.interval;
    }
}

/// Where a connection stands; shared by a device's own link and a gateway's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
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

/// What the caller tells a running fleet, through a `watch` channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Follow the schedule.
    Run,
    /// Stop generating now, then finish as at the end of the schedule: send what is
    /// held and wait for receipts (`until_receipted`) or the broker (`drain`).
    Finish,
    /// Stop at once.
    Stop,
}

/// Live counts over all devices of a fleet, for progress displays.
#[derive(Debug, Default)]
pub struct LiveCounts {
    connected: AtomicUsize,
}

impl LiveCounts {
    /// Devices connected and subscribed right now.
    pub fn connected(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }

    /// `n` more devices connected (a gateway carries several).
    pub(crate) fn add(&self, n: usize) {
        self.connected.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` devices fewer connected.
    pub(crate) fn sub(&self, n: usize) {
        self.connected.fetch_sub(n, Ordering::Relaxed);
    }
}

/// How the next send goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendPlan {
    /// The next held message.
    One,
    /// The out-of-order fault: `newer` first, then `older`.
    Swap { older: Key, newer: Key },
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
    clock: DeviceClock,
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
    faults: Injector,
    /// The second connection of the foreign-client-id fault, and when it was opened.
    side: Option<(Session, Instant)>,
    live: Option<Arc<LiveCounts>>,
    /// Offset of this device's generation schedule from time zero (load mode spreads
    /// the devices' ticks over one period instead of making them all at once).
    phase: Duration,
    /// Load mode: where first publishes and receipts are timed.
    latency: Option<(Arc<Recorder>, Arc<Mutex<SendTimes>>)>,
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
        let since_t0 = u64::try_from(now.saturating_duration_since(t0).as_millis()).unwrap_or(0);
        let clock = DeviceClock::new(wall_ms().saturating_sub(since_t0), schedule.time_scale);
        Self {
            backoff: Backoff::new(link.backoff_min, link.backoff_max, seed),
            pacer: Pacer::new(link.send_rate, link.send_burst, now),
            next_status: schedule.status_every.map(|d| t0 + d),
            faults: Injector::none(device.id().as_str()),
            device,
            identity,
            ack_topic,
            t0,
            clock,
            conn: None,
            next_attempt: now,
            ticks: 0,
            next_tick: t0,
            last_progress: now,
            resend_wait: link.resend_after,
            connects: 0,
            first_connected: Some(first_connected),
            side: None,
            live: None,
            phase: Duration::ZERO,
            latency: None,
            link,
            schedule,
        }
    }

    /// Offsets the generation (and status) schedule by `phase` from time zero, and makes
    /// the first connection attempt no earlier than `first_attempt`.
    pub fn with_start(mut self, phase: Duration, first_attempt: Instant) -> Self {
        self.phase = phase;
        self.next_tick = self.t0 + phase;
        self.next_status = self.schedule.status_every.map(|d| self.t0 + phase + d);
        self.next_attempt = first_attempt;
        self
    }

    /// Times every first publish and the receipt that covers it into `recorder`
    /// (`times` is this device's ring, shared with whoever matches alerts).
    pub fn with_latency(mut self, recorder: Arc<Recorder>, times: Arc<Mutex<SendTimes>>) -> Self {
        self.latency = Some((recorder, times));
        self
    }

    /// Injects these faults (see [`crate::faults`]).
    pub fn with_faults(mut self, faults: Injector) -> Self {
        self.faults = faults;
        self
    }

    /// Keeps `live` up to date with this device's connection.
    pub fn with_live(mut self, live: Arc<LiveCounts>) -> Self {
        self.live = Some(live);
        self
    }

    /// Runs until the schedule is done (and, with `until_receipted`, everything is
    /// receipted or the time is up) or `control` says otherwise; returns the device's
    /// account.
    pub async fn run(mut self, mut control: watch::Receiver<Control>) -> DeviceReport {
        let mut housekeeping = tokio::time::interval(Duration::from_millis(200));
        housekeeping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let generate_until = self.schedule.duration.map(|d| self.t0 + d);
        let mut generating = true;
        let mut done_at: Option<Instant> = None;
        let mut error = None;
        loop {
            let now = Instant::now();
            let told = *control.borrow();
            if told == Control::Stop {
                break;
            }
            if generating
                && (told == Control::Finish
                    || self
                        .schedule
                        .count
                        .is_some_and(|c| self.device.stats().vitals_made >= c)
                    || generate_until.is_some_and(|end| now >= end))
            {
                generating = false;
                done_at = Some(now);
                self.faults.cancel_swap();
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

            let can_send = self.send_plan().is_some();
            let status_at = self.next_status.filter(|_| generating);
            let (next_tick, next_attempt, send_at) =
                (self.next_tick, self.next_attempt, self.pacer.ready_at());
            let offline = self.conn.is_none();
            let step: Result<(), DeviceError> = tokio::select! {
                changed = control.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    Ok(())
                }
                event = next_event(&mut self.conn) => {
                    self.on_event(event);
                    Ok(())
                }
                event = next_side_event(&mut self.side) => {
                    self.on_side_event(event);
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
                    self.inject_faults()
                }
            };
            if let Err(e) = step {
                tracing::error!(device.id = %self.device.id(), error = %e, "device stopped");
                error = Some(e.to_string());
                break;
            }
        }
        self.side = None;
        if let Some(conn) = self.take_conn() {
            conn.session.close(Duration::from_millis(500)).await;
        }
        let mut report = self.device.report(self.connects, error);
        report.faults = self.faults.reports();
        report
    }

    fn finished(&self, now: Instant, done: Instant) -> bool {
        let ready = self.conn.as_ref().is_some_and(|c| c.phase == Phase::Ready);
        if self.faults.revoked() && !ready {
            // Its certificate is revoked: no receipt can come any more.
            return true;
        }
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

    /// Wall time since time zero.
    fn elapsed(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.t0)
    }

    fn on_tick(&mut self) -> Result<(), DeviceError> {
        let wall = self.phase + Duration::from_secs_f64(self.ticks as f64 / self.schedule.rate);
        let t = self.clock.device_time(wall);
        self.ticks += 1;
        self.next_tick =
            self.t0 + self.phase + Duration::from_secs_f64(self.ticks as f64 / self.schedule.rate);
        let ts = self.clock.ts_ms(self.elapsed(Instant::now()));
        let Some(made) = self.device.make_vitals(t, ts)? else {
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
            self.power_cycle()?;
        }
        Ok(())
    }

    /// A simulated power cycle: the connection goes without a goodbye, the new epoch is
    /// durable before anything of it is made, the outbox is retained.
    fn power_cycle(&mut self) -> Result<(), DeviceError> {
        drop(self.take_conn());
        self.device.reboot()?;
        self.backoff.reset();
        self.next_attempt = Instant::now() + self.link.backoff_min;
        Ok(())
    }

    fn on_status(&mut self) -> Result<(), DeviceError> {
        let every = self
            .schedule
            .status_every
            .unwrap_or(Duration::from_secs(60));
        self.next_status = self.next_status.map(|at| at + every);
        let elapsed = self.elapsed(Instant::now());
        let made = self
            .device
            .make_status(self.clock.ts_ms(elapsed), self.clock.device_time(elapsed))?;
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

    /// Takes the connection away (dropping it closes it without DISCONNECT), keeping the
    /// live count right.
    fn take_conn(&mut self) -> Option<Conn> {
        let conn = self.conn.take()?;
        if conn.phase == Phase::Ready
            && let Some(live) = &self.live
        {
            live.connected.fetch_sub(1, Ordering::Relaxed);
        }
        Some(conn)
    }

    fn on_event(&mut self, event: Event) {
        let id = self.device.id().clone();
        let elapsed = self.elapsed(Instant::now());
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
                if let Some(live) = &self.live {
                    live.connected.fetch_add(1, Ordering::Relaxed);
                }
                self.connects += 1;
                self.backoff.reset();
                self.progress(Instant::now());
                self.faults.on_connected(elapsed);
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
            Event::Acked { refused } => {
                conn.inflight = conn.inflight.saturating_sub(1);
                if let Some(reason) = refused {
                    tracing::info!(device.id = %id, reason, "publish refused by the broker");
                    self.faults.on_puback_refused(&reason);
                }
            }
            Event::Message { topic, payload } if topic == self.ack_topic => {
                match self.device.apply_receipt(&payload) {
                    ReceiptOutcome::Applied { receipt, released } => {
                        if let Some((recorder, times)) = &self.latency {
                            recorder.on_receipt(times, receipt, released, Instant::now());
                        }
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

    /// An event of the foreign-client-id connection: its first answer is the outcome.
    fn on_side_event(&mut self, event: Event) {
        let outcome = match event {
            Event::Connected => Ok(()),
            Event::Down { reason } => Err(reason),
            _ => return,
        };
        tracing::info!(device.id = %self.device.id(), outcome = ?outcome, "foreign client id connection answered");
        self.side = None;
        self.faults.on_side_outcome(outcome);
    }

    /// Receipts moved (or nothing waits for one): restart the resend clock.
    fn progress(&mut self, now: Instant) {
        self.last_progress = now;
        self.resend_wait = self.link.resend_after;
    }

    /// The connection is gone: schedule the next attempt.
    fn lost(&mut self, reason: &str) {
        let was_ready = self.take_conn().is_some_and(|c| c.phase == Phase::Ready);
        let elapsed = self.elapsed(Instant::now());
        self.faults.on_connection_lost(elapsed, reason, was_ready);
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

    /// What to send next, if anything may go now.
    fn send_plan(&self) -> Option<SendPlan> {
        let conn = self
            .conn
            .as_ref()
            .filter(|c| c.phase == Phase::Ready && c.inflight < self.link.window)?;
        let first = self.device.next_after(conn.cursor)?;
        if !self.faults.swap_pending() || first.resend {
            return Some(SendPlan::One);
        }
        // Out of order: wait for a second fresh message of the same epoch, then send
        // it first.
        let second = self.device.next_after(Some(first.key))?;
        if second.resend || second.key.epoch != first.key.epoch {
            return Some(SendPlan::One);
        }
        (conn.inflight + 1 < self.link.window).then_some(SendPlan::Swap {
            older: first.key,
            newer: second.key,
        })
    }

    fn send_one(&mut self) {
        match self.send_plan() {
            Some(SendPlan::One) => {
                if let Some(key) = self
                    .conn
                    .as_ref()
                    .and_then(|c| self.device.next_after(c.cursor).map(|o| o.key))
                {
                    self.send_key(key);
                }
            }
            Some(SendPlan::Swap { older, newer }) => {
                let sent = self.send_key(newer) && self.send_key(older);
                if sent {
                    tracing::info!(device.id = %self.device.id(), first = %newer, second = %older, "sent out of order");
                    self.faults.on_swapped(newer, older);
                }
            }
            None => {}
        }
    }

    /// Publishes the held message `key`; false if the connection was lost doing it.
    fn send_key(&mut self, key: Key) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        let Some(out) = self.device.outbox().iter().find(|e| e.key() == key) else {
            return false;
        };
        let (channel, resend) = (out.channel(), out.sends() > 0);
        let topic = channel.topic(self.device.id().as_str());
        if !resend {
            self.faults.on_sent(key, channel, out.bytes());
        }
        match conn.session.publish(topic, out.bytes().to_vec()) {
            Ok(()) => {
                if conn.cursor.is_none_or(|c| c < key) {
                    conn.cursor = Some(key);
                }
                conn.inflight += 1;
                let now = Instant::now();
                self.pacer.take(now);
                self.device.mark_sent(key);
                if !resend && let Some((recorder, times)) = &self.latency {
                    recorder.on_sent(times, key, now);
                }
                tracing::trace!(device.id = %self.device.id(), epoch = key.epoch, seq = key.seq, resend, "published");
                true
            }
            Err(e) => {
                self.lost(&format!("publish: {e}"));
                false
            }
        }
    }

    /// Carries out whatever faults are due (see [`crate::faults`]).
    fn inject_faults(&mut self) -> Result<(), DeviceError> {
        if self.faults.is_empty() {
            return Ok(());
        }
        let elapsed = self.elapsed(Instant::now());
        loop {
            let state = LinkState {
                connected: self.conn.as_ref().is_some_and(|c| c.phase == Phase::Ready),
                covered: self.device.outbox().covered(),
            };
            let Some(action) = self.faults.poll(elapsed, state) else {
                return Ok(());
            };
            let id = self.device.id().clone();
            match action {
                Action::Publish { topic, bytes } => {
                    tracing::info!(device.id = %id, topic = %topic, "fault: publishing an injected message");
                    if let Some(conn) = self.conn.as_mut() {
                        match conn.session.publish(topic, bytes) {
                            Ok(()) => conn.inflight += 1,
                            Err(e) => self.lost(&format!("publish: {e}")),
                        }
                    }
                }
                Action::ConnectAs { client_id } => {
                    tracing::info!(device.id = %id, claimed = %client_id, "fault: connecting with another device's client id");
                    let session = Session::open(
                        &self.link.target,
                        &client_id,
                        &self.identity.tls,
                        &self.link.session,
                    );
                    self.side = Some((session, Instant::now()));
                }
                Action::SwapNext => {
                    tracing::info!(device.id = %id, "fault: the next two messages go out of order");
                }
                Action::Reboot => {
                    tracing::info!(device.id = %id, "fault: reboot");
                    self.power_cycle()?;
                }
                Action::DropConnection => {
                    tracing::info!(device.id = %id, "fault: dropping the connection");
                    drop(self.take_conn());
                    self.backoff.reset();
                    self.next_attempt = Instant::now();
                }
                Action::SkewClock { ms } => {
                    tracing::info!(device.id = %id, skew_ms = ms, "fault: device clock skewed");
                    self.clock.set_skew_ms(ms);
                }
            }
        }
    }

    fn housekeeping(&mut self) {
        let now = Instant::now();
        if self.device.outbox().is_empty() {
            self.progress(now);
        }
        if self.side.as_ref().is_some_and(|(_, opened)| {
            now.duration_since(*opened) > self.link.session.connect_timeout
        }) {
            self.side = None;
            self.faults
                .on_side_outcome(Err("no answer to CONNECT in time".into()));
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

/// The next event of the foreign-client-id connection, or never when there is none.
async fn next_side_event(side: &mut Option<(Session, Instant)>) -> Event {
    match side {
        Some((s, _)) => s.next().await,
        None => std::future::pending().await,
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
pub(crate) fn wall_ms() -> u64 {
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
