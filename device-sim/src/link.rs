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
//!   `backoff_max`; the backoff resets once a connection is fully up (the connection
//!   itself is [`crate::connection`]'s, shared with the gateways).
//! * A silent device (`--silent-after`, [`crate::modes`]) stops generating and publishing
//!   at its time but keeps polling its connection, so the MQTT client keeps answering
//!   keepalive and receipts still arrive; it disconnects only when the run ends.
//! * Injected faults ([`crate::faults`]) never bypass the outbox for the device's own
//!   messages: an injected PUBLISH is an extra copy, and the out-of-order fault only
//!   swaps the send order of two held messages, both of which stay held until receipted.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior, sleep_until};

use crate::clock::DeviceClock;
use crate::connection::{Connection, Happened, Lost};
use crate::device::{DeviceError, DeviceReport, ReceiptOutcome, SimDevice};
use crate::faults::{Action, Injector, LinkState};
use crate::pki::Identity;
use crate::ring::Key;
use vitalmq_mqtt_client::{Event, Session, SessionOptions, Target};

/// Watches one device's first publishes and the receipts it applies (the load mode of
/// `vitalmq sim` times them; see `vitalmq-loadgen`).
pub trait SendObserver: Send + Sync + std::fmt::Debug {
    /// The device published `key` for the first time at `at`.
    fn on_sent(&self, key: Key, at: Instant);
    /// The device applied a receipt through `receipt` at `at`, which released
    /// `released` messages from its outbox.
    fn on_receipt(&self, receipt: Key, released: usize, at: Instant);
}

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

/// Where a device's walk through its outbox stands on the current connection, and when
/// to start it over for lack of receipts (shared by a device's own link and a gateway's
/// members).
#[derive(Debug)]
pub(crate) struct Resend {
    /// The last message sent on the current connection.
    pub(crate) cursor: Option<Key>,
    /// Last time receipts made progress, the backlog was (re)started, or the outbox was
    /// empty: the reference for the wait.
    last_progress: Instant,
    /// The current wait for receipt progress before resending: `resend_after`, doubled
    /// after each resend that brought no receipt, up to eight times it.
    wait: Duration,
    resend_after: Duration,
}

impl Resend {
    pub(crate) fn new(resend_after: Duration, now: Instant) -> Self {
        Self {
            cursor: None,
            last_progress: now,
            wait: resend_after,
            resend_after,
        }
    }

    /// Receipts moved (or nothing waits for one): restart the resend clock.
    pub(crate) fn progress(&mut self, now: Instant) {
        self.last_progress = now;
        self.wait = self.resend_after;
    }

    /// A new connection: the walk starts over at the oldest held message.
    pub(crate) fn restart(&mut self, now: Instant) {
        self.cursor = None;
        self.progress(now);
    }

    /// Starts the walk over if the oldest held message (`front`) was sent and no
    /// receipt progress came for the current wait, doubling the wait; whether it did.
    pub(crate) fn resend_due(&mut self, front: Option<Key>, now: Instant) -> bool {
        let front_sent = front.is_some_and(|f| self.cursor.is_some_and(|c| c >= f));
        if !front_sent || now.duration_since(self.last_progress) < self.wait {
            return false;
        }
        self.cursor = None;
        self.last_progress = now;
        self.wait = (self.wait * 2).min(self.resend_after * 8);
        true
    }

    /// The current wait, in ms, for the logs.
    pub(crate) fn wait_ms(&self) -> u64 {
        u64::try_from(self.wait.as_millis()).unwrap_or(u64::MAX)
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
pub(crate) struct DeviceLink {
    device: SimDevice,
    identity: Identity,
    link: Arc<LinkOptions>,
    schedule: Arc<Schedule>,
    ack_topic: String,
    t0: Instant,
    clock: DeviceClock,
    connection: Connection,
    resend: Resend,
    pacer: Pacer,
    ticks: u64,
    next_tick: Instant,
    next_status: Option<Instant>,
    faults: Injector,
    /// The second connection of the foreign-client-id fault, and when it was opened.
    side: Option<(Session, Instant)>,
    /// Offset of this device's generation schedule from time zero (load mode spreads
    /// the devices' ticks over one period instead of making them all at once).
    phase: Duration,
    /// Load mode: told of first publishes and receipts.
    observer: Option<Arc<dyn SendObserver>>,
    /// From this time on the device publishes nothing (`--silent-after`).
    silent_at: Option<Instant>,
}

impl DeviceLink {
    /// Prepares the shell; time zero of the vitals model and the schedule is `t0`.
    /// `first_connected` fires when the device is connected and subscribed the first time.
    pub(crate) fn new(
        device: SimDevice,
        identity: Identity,
        link: Arc<LinkOptions>,
        schedule: Arc<Schedule>,
        t0: Instant,
        first_connected: oneshot::Sender<()>,
    ) -> Self {
        let ack_topic = format!("devices/{}/ack", device.id());
        let connection = Connection::new(
            &identity.id,
            Arc::clone(&identity.tls),
            Arc::clone(&link),
            vec![ack_topic.clone()],
            1,
            first_connected,
        );
        let now = Instant::now();
        let since_t0 = u64::try_from(now.saturating_duration_since(t0).as_millis()).unwrap_or(0);
        let clock = DeviceClock::new(wall_ms().saturating_sub(since_t0), schedule.time_scale);
        Self {
            connection,
            resend: Resend::new(link.resend_after, now),
            pacer: Pacer::new(link.send_rate, link.send_burst, now),
            next_status: schedule.status_every.map(|d| t0 + d),
            faults: Injector::none(device.id().as_str()),
            device,
            identity,
            ack_topic,
            t0,
            clock,
            ticks: 0,
            next_tick: t0,
            side: None,
            phase: Duration::ZERO,
            observer: None,
            silent_at: None,
            link,
            schedule,
        }
    }

    /// Offsets the generation (and status) schedule by `phase` from time zero, and makes
    /// the first connection attempt no earlier than `first_attempt`.
    pub(crate) fn with_start(mut self, phase: Duration, first_attempt: Instant) -> Self {
        self.phase = phase;
        self.next_tick = self.t0 + phase;
        self.next_status = self.schedule.status_every.map(|d| self.t0 + phase + d);
        self.connection.retry_no_earlier(first_attempt);
        self
    }

    /// Tells `observer` of every first publish and every receipt applied.
    pub(crate) fn with_observer(mut self, observer: Arc<dyn SendObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Goes silent `after` time zero: see the module documentation.
    pub(crate) fn silent_after(mut self, after: Duration) -> Self {
        self.silent_at = Some(self.t0 + after);
        self
    }

    fn silent(&self, now: Instant) -> bool {
        self.silent_at.is_some_and(|at| now >= at)
    }

    /// Injects these faults (see [`crate::faults`]).
    pub(crate) fn with_faults(mut self, faults: Injector) -> Self {
        self.faults = faults;
        self
    }

    /// Keeps `live` up to date with this device's connection.
    pub(crate) fn with_live(mut self, live: Arc<LiveCounts>) -> Self {
        self.connection.set_live(live);
        self
    }

    /// Runs until the schedule is done (and, with `until_receipted`, everything is
    /// receipted or the time is up) or `control` says otherwise; returns the device's
    /// account.
    pub(crate) async fn run(mut self, mut control: watch::Receiver<Control>) -> DeviceReport {
        let mut housekeeping = tokio::time::interval(Duration::from_millis(200));
        housekeeping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let generate_until = self.schedule.duration.map(|d| self.t0 + d);
        let mut generating = true;
        let mut done_at: Option<Instant> = None;
        let mut announced_silence = false;
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

            let silent = self.silent(now);
            // Announced on the first turn of the loop past the time, whichever branch
            // woke it (a receipt may arrive at the very moment).
            if silent && !announced_silence {
                announced_silence = true;
                tracing::info!(
                    device.id = %self.device.id(),
                    held = self.device.outbox().len(),
                    "going silent: connected, publishing nothing more"
                );
            }
            let silence_at = self.silent_at.filter(|_| !silent);
            let publishing = generating && !silent;
            let can_send = !silent && self.send_plan().is_some();
            let status_at = self.next_status.filter(|_| publishing);
            let (next_tick, send_at) = (self.next_tick, self.pacer.ready_at());
            let retry_at = self.connection.retry_at();
            let step: Result<(), DeviceError> = tokio::select! {
                changed = control.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    Ok(())
                }
                event = self.connection.next() => {
                    let happened = self.connection.on_event(event);
                    self.on_event(happened);
                    Ok(())
                }
                event = next_side_event(&mut self.side) => {
                    self.on_side_event(event);
                    Ok(())
                }
                // Only wakes the loop, which announces it.
                () = sleep_until(silence_at.unwrap_or(now)), if silence_at.is_some() => Ok(()),
                () = sleep_until(next_tick), if publishing => self.on_tick(),
                () = sleep_until(status_at.unwrap_or(now)), if status_at.is_some() => self.on_status(),
                () = sleep_until(retry_at.unwrap_or(now)), if retry_at.is_some() => {
                    tracing::debug!(device.id = %self.device.id(), "connecting");
                    self.connection.open();
                    Ok(())
                }
                () = sleep_until(send_at), if can_send => {
                    self.send_one();
                    Ok(())
                }
                _ = housekeeping.tick() => {
                    self.housekeeping();
                    if self.silent(Instant::now()) {
                        Ok(())
                    } else {
                        self.inject_faults()
                    }
                }
            };
            if let Err(e) = step {
                tracing::error!(device.id = %self.device.id(), error = %e, "device stopped");
                error = Some(e.to_string());
                break;
            }
        }
        self.side = None;
        self.connection.close(Duration::from_millis(500)).await;
        let mut report = self.device.report(self.connection.connects(), error);
        report.faults = self.faults.reports();
        report
    }

    fn finished(&self, now: Instant, done: Instant) -> bool {
        if self.faults.revoked() && !self.connection.is_ready() {
            // Its certificate is revoked: no receipt can come any more.
            return true;
        }
        if self.silent(now) {
            // It publishes nothing more; what was in flight has had its answer.
            return self.connection.inflight() == 0 || now >= done + self.schedule.drain;
        }
        let drained = || {
            self.connection.is_ready()
                && self.connection.inflight() == 0
                && self.device.next_after(self.resend.cursor).is_none()
        };
        if self.device.forged_only() {
            // No receipt will ever come: done once everything went out once.
            return drained() || now >= done + self.schedule.drain;
        }
        match self.schedule.until_receipted {
            Some(timeout) => self.device.fully_receipted() || now >= done + timeout,
            None => drained() || now >= done + self.schedule.drain,
        }
    }

    /// Wall time since time zero.
    fn elapsed(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.t0)
    }

    fn on_tick(&mut self) -> Result<(), DeviceError> {
        if self.silent(Instant::now()) {
            return Ok(());
        }
        let wall = self.phase + Duration::from_secs_f64(self.ticks as f64 / self.schedule.rate);
        let t = self.clock.device_time(wall);
        self.ticks += 1;
        self.next_tick =
            self.t0 + self.phase + Duration::from_secs_f64(self.ticks as f64 / self.schedule.rate);
        let ts = self.clock.ts_ms(self.elapsed(Instant::now()));
        if self.device.make_alarms(t, ts)? > 0 && self.device.outbox().len() == 1 {
            self.resend.progress(Instant::now());
        }
        let Some(made) = self.device.make_vitals(t, ts)? else {
            tracing::debug!(device.id = %self.device.id(), "sensor dropout; no sample");
            return Ok(());
        };
        tracing::debug!(device.id = %self.device.id(), epoch = made.key.epoch, seq = made.key.seq, "vitals made");
        if self.device.outbox().len() == 1 {
            self.resend.progress(Instant::now());
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
        self.connection
            .drop_now(Instant::now() + self.link.backoff_min);
        self.device.reboot()?;
        Ok(())
    }

    fn on_status(&mut self) -> Result<(), DeviceError> {
        if self.silent(Instant::now()) {
            return Ok(());
        }
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

    fn on_event(&mut self, happened: Happened) {
        let id = self.device.id().clone();
        match happened {
            Happened::Up { granted } => {
                if !granted {
                    tracing::warn!(device.id = %id, topic = %self.ack_topic, "receipt subscription refused; nothing will be released");
                }
                self.resend.restart(Instant::now());
                self.faults.on_connected(self.elapsed(Instant::now()));
                tracing::info!(
                    device.id = %id,
                    epoch = self.device.epoch(),
                    backlog = self.device.outbox().len(),
                    connects = self.connection.connects(),
                    "connected"
                );
            }
            Happened::Acked { refused } => {
                if let Some(reason) = refused {
                    tracing::info!(device.id = %id, reason, "publish refused by the broker");
                    self.faults.on_puback_refused(&reason);
                }
            }
            Happened::Message { topic, payload } if topic == self.ack_topic => {
                let applied = receive_receipt(&mut self.device, &mut self.resend, &payload, None);
                if let (Some((receipt, released)), Some(observer)) = (applied, &self.observer) {
                    observer.on_receipt(receipt, released, Instant::now());
                }
            }
            Happened::Message { topic, .. } => {
                tracing::debug!(device.id = %id, topic = %topic, "message on an unexpected topic ignored");
            }
            Happened::Lost(lost) => self.lost(&lost),
            Happened::Nothing => {}
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

    /// The connection is gone (its next attempt is scheduled): tell the faults, log.
    fn lost(&mut self, lost: &Lost) {
        let (reason, retry_ms) = (lost.reason.as_str(), lost.retry_ms());
        let elapsed = self.elapsed(Instant::now());
        self.faults
            .on_connection_lost(elapsed, reason, lost.was_ready);
        let held = self.device.outbox().len();
        if lost.was_ready {
            tracing::warn!(device.id = %self.device.id(), reason, retry_ms, held, "connection lost");
        } else {
            tracing::info!(device.id = %self.device.id(), reason, retry_ms, held, "connect failed");
        }
    }

    /// What to send next, if anything may go now.
    fn send_plan(&self) -> Option<SendPlan> {
        if !self.connection.has_room(self.link.window) {
            return None;
        }
        let first = self.device.next_after(self.resend.cursor)?;
        if !self.faults.swap_pending() || first.resend {
            return Some(SendPlan::One);
        }
        // Out of order: wait for a second fresh message of the same epoch, then send
        // it first.
        let second = self.device.next_after(Some(first.key))?;
        if second.resend || second.key.epoch != first.key.epoch {
            return Some(SendPlan::One);
        }
        (self.connection.inflight() + 1 < self.link.window).then_some(SendPlan::Swap {
            older: first.key,
            newer: second.key,
        })
    }

    fn send_one(&mut self) {
        if self.silent(Instant::now()) {
            return;
        }
        match self.send_plan() {
            Some(SendPlan::One) => {
                if let Some(key) = self.device.next_after(self.resend.cursor).map(|o| o.key) {
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
        if !self.connection.is_open() {
            return false;
        }
        let Some(out) = self.device.outbox().iter().find(|e| e.key() == key) else {
            return false;
        };
        let (channel, resend) = (out.channel(), out.sends() > 0);
        let topic = channel.topic(self.device.id().as_str());
        if !resend {
            self.faults.on_sent(key, channel, out.bytes());
        }
        match self.connection.publish(topic, out.bytes().to_vec()) {
            Ok(false) => false,
            Ok(true) => {
                if self.resend.cursor.is_none_or(|c| c < key) {
                    self.resend.cursor = Some(key);
                }
                let now = Instant::now();
                self.pacer.take(now);
                self.device.mark_sent(key);
                if !resend && let Some(observer) = &self.observer {
                    observer.on_sent(key, now);
                }
                tracing::trace!(device.id = %self.device.id(), epoch = key.epoch, seq = key.seq, resend, "published");
                true
            }
            Err(lost) => {
                self.lost(&lost);
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
                connected: self.connection.is_ready(),
                covered: self.device.outbox().covered(),
            };
            let Some(action) = self.faults.poll(elapsed, state) else {
                return Ok(());
            };
            let id = self.device.id().clone();
            match action {
                Action::Publish { topic, bytes } => {
                    tracing::info!(device.id = %id, topic = %topic, "fault: publishing an injected message");
                    if let Err(lost) = self.connection.publish(topic, bytes) {
                        self.lost(&lost);
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
                    self.connection.drop_now(Instant::now());
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
            self.resend.progress(now);
        }
        if self.side.as_ref().is_some_and(|(_, opened)| {
            now.duration_since(*opened) > self.link.session.connect_timeout
        }) {
            self.side = None;
            self.faults
                .on_side_outcome(Err("no answer to CONNECT in time".into()));
        }
        if let Some(lost) = self.connection.check_deadline(now) {
            self.lost(&lost);
            return;
        }
        if self.connection.is_ready() {
            let front = self.device.outbox().front().map(|e| e.key());
            if self.resend.resend_due(front, now) {
                tracing::info!(
                    device.id = %self.device.id(),
                    backlog = self.device.outbox().len(),
                    next_wait_ms = self.resend.wait_ms(),
                    "no receipt progress; resending backlog"
                );
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

/// Applies a payload of `device`'s ack topic (carried by `gateway`, if any): restarts
/// its resend clock when the receipt released something or nothing waits, and logs.
/// The receipt and how many messages it released, if it applied.
pub(crate) fn receive_receipt(
    device: &mut SimDevice,
    resend: &mut Resend,
    payload: &[u8],
    gateway: Option<&str>,
) -> Option<(Key, usize)> {
    match device.apply_receipt(payload) {
        ReceiptOutcome::Applied { receipt, released } => {
            if released > 0 || device.outbox().is_empty() {
                resend.progress(Instant::now());
            }
            tracing::debug!(
                device.id = %device.id(),
                gateway.id = gateway,
                receipt.epoch = receipt.epoch,
                receipt.seq = receipt.seq,
                released,
                held = device.outbox().len(),
                "receipt"
            );
            Some((receipt, released))
        }
        ReceiptOutcome::BeyondNewest { receipt } => {
            tracing::warn!(
                device.id = %device.id(),
                receipt.epoch = receipt.epoch,
                receipt.seq = receipt.seq,
                "receipt for a message never made; ignored"
            );
            None
        }
        ReceiptOutcome::Malformed(e) => {
            tracing::warn!(device.id = %device.id(), error = %e, "malformed receipt ignored");
            None
        }
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
