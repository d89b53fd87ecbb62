//! A simulated hospital-at-home gateway (`vitalmq sim --via-gateway`): one MQTT
//! connection, with the site's gateway identity, relays the signed messages of every
//! simulated device registered at that site (SPEC sections 1, 2 and 4).
//!
//! The devices stay [`SimDevice`]s: each makes, signs (with its own COSE key) and holds
//! its messages in its own outbox exactly as when it connects itself, so the bridge
//! verifies a relayed message exactly as one the device published. Only the transport
//! changes: the gateway publishes `devices/{id}/telemetry` (and `.../status`) for its
//! devices, subscribes to `devices/{id}/ack` once per device in one SUBSCRIBE (the ACL
//! forbids `devices/+/ack` to gateways), and routes each receipt to the device it names.
//!
//! Invariants, per device, the same as [`crate::link`]'s:
//!
//! * Generation never waits for the network; while the gateway is offline every device's
//!   messages accumulate in that device's outbox.
//! * Only what a device's outbox holds is published, in outbox order, through one
//!   cursor per device per connection. After every gateway (re)connect all cursors start
//!   over, so every unreceipted message of every device is resent in `(epoch, seq)` order
//!   (an older epoch's backlog before a newer epoch) before anything newer.
//! * A receipt only ever reaches the outbox of the device whose ack topic it came on
//!   ([`AckRouter`]); a message on any other topic is ignored.
//! * Nothing is sent before the SUBACK of the receipt subscriptions.
//! * Each device is paced at `send_rate` as if it were connected itself; the devices take
//!   turns ([`Rotation`]) so one device's backlog cannot starve the others, and the
//!   gateway keeps at most `window` PUBLISHes per device (capped) without PUBACK.
//! * If a device's receipts stop while its messages wait, its backlog is resent after
//!   `resend_after`, doubling up to eight times that, as for a device on its own.
//! * A simulated reboot (`--reboot-every`) of a device behind a gateway advances its
//!   durable epoch and keeps its outbox; the gateway's connection is not affected.
//!
//! Layering: [`plan_sites`], [`AckRouter`] and [`Rotation`] do no I/O and are tested
//! directly; [`GatewayLink`] is the async shell.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior, sleep_until};
use vitalmq_envelope::DeviceId;
use vitalmq_policies::DeviceRegistry;

use crate::clock::DeviceClock;
use crate::device::{DeviceError, DeviceReport, ReceiptOutcome, SimDevice};
use crate::link::{Backoff, Control, LinkOptions, LiveCounts, Pacer, Phase, Schedule, wall_ms};
use crate::mqtt::{Event, Session};
use crate::pki::Identity;
use crate::ring::Key;

/// Most PUBLISHes without PUBACK on one gateway connection, whatever the device count
/// (below rumqttc's own in-flight limit, so a publish is never refused locally).
pub const MAX_GATEWAY_WINDOW: usize = 96;

/// One site's gateway and the devices it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SitePlan {
    pub site: String,
    /// The gateway identity bound to the site in the registry (`gw-<site>`).
    pub gateway: String,
    /// Device ids, in the order given.
    pub devices: Vec<String>,
}

/// Groups `devices` by the site the registry assigns them and picks each site's gateway
/// (the registry's gateway bound to that site, the lowest id if several). Sites come in
/// order; an unregistered device or a site without a gateway is an error.
pub fn plan_sites(devices: &[String], registry: &DeviceRegistry) -> Result<Vec<SitePlan>, String> {
    let mut plans: Vec<SitePlan> = Vec::new();
    for d in devices {
        let id = DeviceId::new(d.clone()).map_err(|e| format!("device `{d}`: {e}"))?;
        let site = registry
            .device(&id)
            .ok_or_else(|| format!("device `{d}` is not in the registry"))?
            .site
            .to_string();
        if let Some(plan) = plans.iter_mut().find(|p| p.site == site) {
            plan.devices.push(d.clone());
            continue;
        }
        let gateway = registry
            .gateways()
            .filter(|g| g.site.to_string() == site)
            .map(|g| g.id.to_string())
            .min()
            .ok_or_else(|| format!("site `{site}` (of `{d}`) has no gateway in the registry"))?;
        plans.push(SitePlan {
            site,
            gateway,
            devices: vec![d.clone()],
        });
    }
    plans.sort_by(|a, b| a.site.cmp(&b.site));
    Ok(plans)
}

/// Maps each carried device's receipt topic `devices/{id}/ack` to its index.
#[derive(Debug, Clone)]
pub struct AckRouter {
    filters: Vec<String>,
    index: HashMap<String, usize>,
}

impl AckRouter {
    /// A router for these devices, index = position.
    pub fn new<'a>(devices: impl IntoIterator<Item = &'a str>) -> Self {
        let filters: Vec<String> = devices
            .into_iter()
            .map(|d| format!("devices/{d}/ack"))
            .collect();
        let index = filters
            .iter()
            .enumerate()
            .map(|(i, f)| (f.clone(), i))
            .collect();
        Self { filters, index }
    }

    /// The topic filters to subscribe to, one per device (no wildcard).
    pub fn filters(&self) -> &[String] {
        &self.filters
    }

    /// Which device a message on `topic` is for; `None` for any other topic.
    pub fn route(&self, topic: &str) -> Option<usize> {
        self.index.get(topic).copied()
    }
}

/// Round robin over `len` members: each pick starts after the last one picked.
#[derive(Debug, Clone)]
pub struct Rotation {
    len: usize,
    next: usize,
}

impl Rotation {
    pub fn new(len: usize) -> Self {
        Self { len, next: 0 }
    }

    /// The first member from the current position on for which `ready` holds.
    pub fn pick(&mut self, ready: impl Fn(usize) -> bool) -> Option<usize> {
        let found = (0..self.len)
            .map(|k| (self.next + k) % self.len)
            .find(|&i| ready(i))?;
        self.next = (found + 1) % self.len;
        Some(found)
    }
}

/// The gateway's own account in the summary.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayReport {
    pub id: String,
    pub site: String,
    pub devices: Vec<String>,
    /// Connections that came up (CONNACK and SUBACK).
    pub connects: u64,
    /// Whether every receipt filter was granted on the last connection.
    pub subscriptions_granted: bool,
}

/// One device behind the gateway: the device and its generation and send state.
#[derive(Debug)]
struct Member {
    device: SimDevice,
    clock: DeviceClock,
    pacer: Pacer,
    ticks: u64,
    next_tick: Instant,
    next_status: Option<Instant>,
    generating: bool,
    /// The last message of this device sent on the current connection.
    cursor: Option<Key>,
    last_progress: Instant,
    resend_wait: Duration,
    error: Option<String>,
}

#[derive(Debug)]
struct Conn {
    session: Session,
    phase: Phase,
    opened: Instant,
    inflight: usize,
}

/// One gateway's shell; see the module documentation.
#[derive(Debug)]
pub struct GatewayLink {
    identity: Identity,
    site: String,
    members: Vec<Member>,
    router: AckRouter,
    rotation: Rotation,
    link: Arc<LinkOptions>,
    window: usize,
    schedule: Arc<Schedule>,
    t0: Instant,
    conn: Option<Conn>,
    next_attempt: Instant,
    backoff: Backoff,
    connects: u64,
    granted: bool,
    first_connected: Option<oneshot::Sender<()>>,
    live: Option<Arc<LiveCounts>>,
}

impl GatewayLink {
    /// A gateway for `site` connecting as `identity` and carrying `devices`; time zero of
    /// every device's vitals model and schedule is `t0`. `first_connected` fires when the
    /// gateway is connected and subscribed the first time.
    pub fn new(
        identity: Identity,
        site: String,
        devices: Vec<SimDevice>,
        link: &LinkOptions,
        schedule: Arc<Schedule>,
        t0: Instant,
        first_connected: oneshot::Sender<()>,
    ) -> Self {
        let now = Instant::now();
        let since_t0 = u64::try_from(now.saturating_duration_since(t0).as_millis()).unwrap_or(0);
        let router = AckRouter::new(devices.iter().map(|d| d.id().as_str()));
        let window = link
            .window
            .saturating_mul(devices.len())
            .clamp(1, MAX_GATEWAY_WINDOW);
        let mut link = link.clone();
        // Every PUBLISH of the window and the SUBSCRIBE must fit in the request channel.
        link.session.request_capacity = link.session.request_capacity.max(window + 16);
        let seed = identity.id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let members = devices
            .into_iter()
            .map(|device| Member {
                device,
                clock: DeviceClock::new(wall_ms().saturating_sub(since_t0), schedule.time_scale),
                pacer: Pacer::new(link.send_rate, link.send_burst, now),
                ticks: 0,
                next_tick: t0,
                next_status: schedule.status_every.map(|d| t0 + d),
                generating: true,
                cursor: None,
                last_progress: now,
                resend_wait: link.resend_after,
                error: None,
            })
            .collect::<Vec<_>>();
        Self {
            rotation: Rotation::new(members.len()),
            backoff: Backoff::new(link.backoff_min, link.backoff_max, seed),
            identity,
            site,
            members,
            router,
            window,
            link: Arc::new(link),
            schedule,
            t0,
            conn: None,
            next_attempt: now,
            connects: 0,
            granted: false,
            first_connected: Some(first_connected),
            live: None,
        }
    }

    /// Keeps `live` up to date with the devices this gateway has connected.
    pub fn with_live(mut self, live: Arc<LiveCounts>) -> Self {
        self.live = Some(live);
        self
    }

    /// Runs until every device's schedule is done (and, with `until_receipted`, all
    /// their messages are receipted or the time is up) or `control` says otherwise;
    /// returns the gateway's account and each device's, in the order given.
    pub async fn run(
        mut self,
        mut control: watch::Receiver<Control>,
    ) -> (GatewayReport, Vec<DeviceReport>) {
        let mut housekeeping = tokio::time::interval(Duration::from_millis(200));
        housekeeping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let generate_until = self.schedule.duration.map(|d| self.t0 + d);
        let mut done_at: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let told = *control.borrow();
            if told == Control::Stop {
                break;
            }
            for m in self.members.iter_mut().filter(|m| m.generating) {
                if told == Control::Finish
                    || self
                        .schedule
                        .count
                        .is_some_and(|c| m.device.stats().vitals_made >= c)
                    || generate_until.is_some_and(|end| now >= end)
                {
                    m.generating = false;
                    tracing::info!(
                        device.id = %m.device.id(),
                        gateway.id = %self.identity.id,
                        vitals = m.device.stats().vitals_made,
                        held = m.device.outbox().len(),
                        "generation done"
                    );
                }
            }
            if !self.members.iter().any(|m| m.generating) {
                let done = *done_at.get_or_insert(now);
                if self.finished(now, done) {
                    break;
                }
            }

            let generating = self.members.iter().filter(|m| m.generating);
            let next_tick = generating.clone().map(|m| m.next_tick).min();
            let status_at = generating.filter_map(|m| m.next_status).min();
            let send_at = self.send_at();
            let next_attempt = self.next_attempt;
            let offline = self.conn.is_none();
            tokio::select! {
                changed = control.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                event = next_event(&mut self.conn) => self.on_event(event),
                () = sleep_until(next_tick.unwrap_or(now)), if next_tick.is_some() => self.on_ticks(),
                () = sleep_until(status_at.unwrap_or(now)), if status_at.is_some() => self.on_status(),
                () = sleep_until(next_attempt), if offline => self.open(),
                () = sleep_until(send_at.unwrap_or(now)), if send_at.is_some() => self.send_ready(),
                _ = housekeeping.tick() => self.housekeeping(),
            }
        }
        if let Some(conn) = self.take_conn() {
            conn.session.close(Duration::from_millis(500)).await;
        }
        let gateway = GatewayReport {
            id: self.identity.id.clone(),
            site: self.site.clone(),
            devices: self
                .members
                .iter()
                .map(|m| m.device.id().as_str().to_owned())
                .collect(),
            connects: self.connects,
            subscriptions_granted: self.granted,
        };
        let reports = self
            .members
            .into_iter()
            .map(|m| {
                let mut r = m.device.report(self.connects, m.error);
                r.gateway = Some(self.identity.id.clone());
                r
            })
            .collect();
        (gateway, reports)
    }

    fn finished(&self, now: Instant, done: Instant) -> bool {
        match self.schedule.until_receipted {
            Some(timeout) => {
                self.members.iter().all(|m| m.device.fully_receipted()) || now >= done + timeout
            }
            None => {
                let drained = self.conn.as_ref().is_some_and(|c| {
                    c.phase == Phase::Ready
                        && c.inflight == 0
                        && self
                            .members
                            .iter()
                            .all(|m| m.device.next_after(m.cursor).is_none())
                });
                drained || now >= done + self.schedule.drain
            }
        }
    }

    /// When the next message may go, if any waits and the connection can take it.
    fn send_at(&self) -> Option<Instant> {
        let conn = self.conn.as_ref()?;
        if conn.phase != Phase::Ready || conn.inflight >= self.window {
            return None;
        }
        self.members
            .iter()
            .filter(|m| m.device.next_after(m.cursor).is_some())
            .map(|m| m.pacer.ready_at())
            .min()
    }

    /// Generates what is due for every generating device.
    fn on_ticks(&mut self) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.t0);
        for m in self
            .members
            .iter_mut()
            .filter(|m| m.generating && m.next_tick <= now)
        {
            if let Err(e) = tick(m, &self.schedule, self.t0, elapsed) {
                stop_member(m, &e);
            }
        }
    }

    fn on_status(&mut self) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.t0);
        let every = self
            .schedule
            .status_every
            .unwrap_or(Duration::from_secs(60));
        for m in self
            .members
            .iter_mut()
            .filter(|m| m.generating && m.next_status.is_some_and(|at| at <= now))
        {
            m.next_status = m.next_status.map(|at| at + every);
            let made = m
                .device
                .make_status(m.clock.ts_ms(elapsed), m.clock.device_time(elapsed));
            if let Err(e) = made {
                stop_member(m, &e);
            }
        }
    }

    fn open(&mut self) {
        tracing::debug!(gateway.id = %self.identity.id, "connecting");
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
            live.sub(self.members.len());
        }
        Some(conn)
    }

    fn on_event(&mut self, event: Event) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        match event {
            Event::Connected => {
                conn.phase = Phase::Subscribing;
                if let Err(e) = conn.session.subscribe_many(self.router.filters()) {
                    self.lost(&format!("subscribe: {e}"));
                }
            }
            Event::Subscribed { granted } => {
                if !granted {
                    tracing::warn!(gateway.id = %self.identity.id, "a receipt subscription was refused; those devices' messages will not be released");
                }
                self.granted = granted;
                conn.phase = Phase::Ready;
                conn.inflight = 0;
                let now = Instant::now();
                for m in &mut self.members {
                    m.cursor = None;
                    progress(m, &self.link, now);
                }
                if let Some(live) = &self.live {
                    live.add(self.members.len());
                }
                self.connects += 1;
                self.backoff.reset();
                tracing::info!(
                    gateway.id = %self.identity.id,
                    site = %self.site,
                    devices = self.members.len(),
                    backlog = self.members.iter().map(|m| m.device.outbox().len()).sum::<usize>(),
                    connects = self.connects,
                    "gateway connected"
                );
                if let Some(tx) = self.first_connected.take() {
                    let _ = tx.send(());
                }
            }
            Event::Acked { refused } => {
                conn.inflight = conn.inflight.saturating_sub(1);
                if let Some(reason) = refused {
                    tracing::warn!(gateway.id = %self.identity.id, reason, "publish refused by the broker");
                }
            }
            Event::Message { topic, payload } => {
                let Some(i) = self.router.route(&topic) else {
                    tracing::debug!(gateway.id = %self.identity.id, topic = %topic, "message on an unexpected topic ignored");
                    return;
                };
                // The router was built from `members`, so its indexes are theirs.
                let m = &mut self.members[i];
                match m.device.apply_receipt(&payload) {
                    ReceiptOutcome::Applied { receipt, released } => {
                        if released > 0 || m.device.outbox().is_empty() {
                            progress(m, &self.link, Instant::now());
                        }
                        tracing::debug!(
                            device.id = %m.device.id(),
                            gateway.id = %self.identity.id,
                            receipt.epoch = receipt.epoch,
                            receipt.seq = receipt.seq,
                            released,
                            held = m.device.outbox().len(),
                            "receipt"
                        );
                    }
                    ReceiptOutcome::BeyondNewest { receipt } => tracing::warn!(
                        device.id = %m.device.id(),
                        receipt.epoch = receipt.epoch,
                        receipt.seq = receipt.seq,
                        "receipt for a message never made; ignored"
                    ),
                    ReceiptOutcome::Malformed(e) => {
                        tracing::warn!(device.id = %m.device.id(), error = %e, "malformed receipt ignored");
                    }
                }
            }
            Event::Down { reason } => self.lost(&reason),
        }
    }

    /// The connection is gone: schedule the next attempt.
    fn lost(&mut self, reason: &str) {
        let was_ready = self.take_conn().is_some_and(|c| c.phase == Phase::Ready);
        let delay = self.backoff.delay();
        self.next_attempt = Instant::now() + delay;
        let retry_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        let held: usize = self.members.iter().map(|m| m.device.outbox().len()).sum();
        if was_ready {
            tracing::warn!(gateway.id = %self.identity.id, reason, retry_ms, held, "gateway connection lost");
        } else {
            tracing::info!(gateway.id = %self.identity.id, reason, retry_ms, held, "gateway connect failed");
        }
    }

    /// Sends, device by device in turn, every message whose device's pacer allows it,
    /// while the window has room.
    fn send_ready(&mut self) {
        let now = Instant::now();
        while self
            .conn
            .as_ref()
            .is_some_and(|c| c.phase == Phase::Ready && c.inflight < self.window)
        {
            let members = &self.members;
            // The rotation spans exactly `members`, so every index it offers is valid.
            let Some(i) = self.rotation.pick(|i| {
                let m = &members[i];
                m.pacer.ready_at() <= now && m.device.next_after(m.cursor).is_some()
            }) else {
                return;
            };
            if !self.send_next_of(i, now) {
                return;
            }
        }
    }

    /// Publishes member `i`'s next held message; false if the connection was lost.
    fn send_next_of(&mut self, i: usize, now: Instant) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        // `i` comes from the rotation over `members`.
        let m = &mut self.members[i];
        let Some(out) = m.device.next_after(m.cursor) else {
            return true;
        };
        let (key, resend) = (out.key, out.resend);
        let topic = out.channel.topic(m.device.id().as_str());
        match conn.session.publish(topic, out.bytes.to_vec()) {
            Ok(()) => {
                m.cursor = Some(key);
                conn.inflight += 1;
                m.pacer.take(now);
                m.device.mark_sent(key);
                tracing::trace!(device.id = %m.device.id(), gateway.id = %self.identity.id, epoch = key.epoch, seq = key.seq, resend, "relayed");
                true
            }
            Err(e) => {
                self.lost(&format!("publish: {e}"));
                false
            }
        }
    }

    fn housekeeping(&mut self) {
        let now = Instant::now();
        for m in &mut self.members {
            if m.device.outbox().is_empty() {
                progress(m, &self.link, now);
            }
        }
        let phase = match self.conn.as_ref() {
            Some(c) => (c.phase, c.opened),
            None => return,
        };
        match phase {
            (Phase::Connecting | Phase::Subscribing, opened) => {
                let limit = self.link.session.connect_timeout + self.link.subscribe_timeout;
                if now.duration_since(opened) > limit {
                    self.lost("no CONNACK or SUBACK in time");
                }
            }
            (Phase::Ready, _) => {
                for m in &mut self.members {
                    let front = m.device.outbox().front().map(|e| e.key());
                    let front_sent = front.is_some_and(|f| m.cursor.is_some_and(|c| c >= f));
                    if front_sent && now.duration_since(m.last_progress) >= m.resend_wait {
                        m.cursor = None;
                        m.last_progress = now;
                        m.resend_wait = (m.resend_wait * 2).min(self.link.resend_after * 8);
                        tracing::info!(
                            device.id = %m.device.id(),
                            gateway.id = %self.identity.id,
                            backlog = m.device.outbox().len(),
                            "no receipt progress; resending backlog"
                        );
                    }
                }
            }
        }
    }
}

/// Makes member `m`'s due vitals message (and reboots it on schedule).
fn tick(
    m: &mut Member,
    schedule: &Schedule,
    t0: Instant,
    elapsed: Duration,
) -> Result<(), DeviceError> {
    let wall = Duration::from_secs_f64(m.ticks as f64 / schedule.rate);
    let t = m.clock.device_time(wall);
    m.ticks += 1;
    m.next_tick = t0 + Duration::from_secs_f64(m.ticks as f64 / schedule.rate);
    let Some(made) = m.device.make_vitals(t, m.clock.ts_ms(elapsed))? else {
        tracing::debug!(device.id = %m.device.id(), "sensor dropout; no sample");
        return Ok(());
    };
    tracing::debug!(device.id = %m.device.id(), epoch = made.key.epoch, seq = made.key.seq, "vitals made");
    let made_so_far = m.device.stats().vitals_made;
    let last = schedule.count.is_some_and(|c| made_so_far >= c);
    if let Some(n) = schedule.reboot_every
        && n > 0
        && made_so_far % n == 0
        && !last
    {
        m.device.reboot()?;
    }
    Ok(())
}

/// A device that cannot go on stops generating; what it holds is still relayed.
fn stop_member(m: &mut Member, e: &DeviceError) {
    tracing::error!(device.id = %m.device.id(), error = %e, "device stopped");
    m.generating = false;
    m.error = Some(e.to_string());
}

/// Receipts moved for `m` (or nothing waits for one): restart its resend clock.
fn progress(m: &mut Member, link: &LinkOptions, now: Instant) {
    m.last_progress = now;
    m.resend_wait = link.resend_after;
}

/// The next event of the connection, or never when there is none.
async fn next_event(conn: &mut Option<Conn>) -> Event {
    match conn {
        Some(c) => c.session.next().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_are_routed_only_to_their_own_device() {
        let r = AckRouter::new(["dev-00001", "dev-00003"]);
        assert_eq!(
            r.filters(),
            ["devices/dev-00001/ack", "devices/dev-00003/ack"]
        );
        assert!(
            r.filters()
                .iter()
                .all(|f| !f.contains('+') && !f.contains('#'))
        );
        assert_eq!(r.route("devices/dev-00003/ack"), Some(1));
        assert_eq!(r.route("devices/dev-00001/ack"), Some(0));
        assert_eq!(r.route("devices/dev-00002/ack"), None);
        assert_eq!(r.route("devices/dev-00001/config"), None);
        assert_eq!(r.route("devices/dev-00001/ack/x"), None);
    }

    #[test]
    fn rotation_takes_turns_and_skips_the_idle() {
        let mut r = Rotation::new(3);
        let all: Vec<_> = (0..6).map(|_| r.pick(|_| true)).collect();
        assert_eq!(all, [0, 1, 2, 0, 1, 2].map(Some));
        let mut r = Rotation::new(3);
        assert_eq!(r.pick(|i| i == 2), Some(2));
        assert_eq!(r.pick(|i| i != 1), Some(0));
        assert_eq!(r.pick(|i| i != 1), Some(2));
        assert_eq!(r.pick(|_| false), None);
        assert_eq!(Rotation::new(0).pick(|_| true), None);
    }

    #[test]
    fn devices_are_grouped_by_their_registered_site() {
        let mut registry = crate::test_fixtures::registry_of(5, 2);
        for n in [2, 1] {
            let site = vitalmq_certs::site_id(n);
            let gw = vitalmq_policies::PrincipalId::new(format!("gw-{site}")).expect("id");
            registry.insert_gateway(gw, site);
        }
        let devices: Vec<String> = (1..=5).map(|i| format!("dev-{i:05}")).collect();
        let sites = plan_sites(&devices, &registry).expect("plan");
        assert_eq!(
            sites,
            [
                SitePlan {
                    site: "site-01".into(),
                    gateway: "gw-site-01".into(),
                    devices: vec!["dev-00001".into(), "dev-00003".into(), "dev-00005".into()],
                },
                SitePlan {
                    site: "site-02".into(),
                    gateway: "gw-site-02".into(),
                    devices: vec!["dev-00002".into(), "dev-00004".into()],
                },
            ]
        );
        assert!(plan_sites(&["dev-00009".to_owned()], &registry).is_err());
    }
}
