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
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior, sleep_until};
use vitalmq_envelope::{DeviceId, InvalidDeviceId};
use vitalmq_policies::{DeviceRegistry, PolicyErrors};

use crate::clock::DeviceClock;
use crate::connection::{Connection, Happened, Lost};
use crate::device::{DeviceError, DeviceReport, SimDevice};
use crate::link::{
    Control, LinkOptions, LiveCounts, Pacer, Resend, Schedule, receive_receipt, wall_ms,
};
use crate::pki::{Identity, Pki};

/// Most PUBLISHes without PUBACK on one gateway connection, whatever the device count
/// (below rumqttc's own in-flight limit, so a publish is never refused locally).
pub(crate) const MAX_GATEWAY_WINDOW: usize = 96;

/// One site's gateway and the devices it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SitePlan {
    pub site: String,
    /// The gateway identity bound to the site in the registry (`gw-<site>`).
    pub gateway: String,
    /// Device ids, in the order given.
    pub devices: Vec<String>,
}

/// Why the devices cannot be placed at their sites.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{}: {source}", path.display())]
    Registry { path: PathBuf, source: PolicyErrors },
    #[error("device `{device}`: {source}")]
    DeviceId {
        device: String,
        source: InvalidDeviceId,
    },
    #[error("device `{0}` is not in the registry")]
    Unregistered(String),
    #[error("site `{site}` (of `{device}`) has no gateway in the registry")]
    NoGateway { site: String, device: String },
}

/// The registry of the PKI directory (`registry.toml`).
pub fn load_registry(pki: &Pki) -> Result<DeviceRegistry, PlanError> {
    let path = pki.dir.join("registry.toml");
    DeviceRegistry::load(&path).map_err(|source| PlanError::Registry { path, source })
}

/// The site the registry assigns `device` to.
pub fn site_of(device: &str, registry: &DeviceRegistry) -> Result<String, PlanError> {
    let id = DeviceId::new(device).map_err(|source| PlanError::DeviceId {
        device: device.to_owned(),
        source,
    })?;
    Ok(registry
        .device(&id)
        .ok_or_else(|| PlanError::Unregistered(device.to_owned()))?
        .site
        .to_string())
}

/// Groups `devices` by the site the registry assigns them and picks each site's gateway
/// (the registry's gateway bound to that site, the lowest id if several). Sites come in
/// order; an unregistered device or a site without a gateway is an error.
pub(crate) fn plan_sites(
    devices: &[String],
    registry: &DeviceRegistry,
) -> Result<Vec<SitePlan>, PlanError> {
    let mut plans: Vec<SitePlan> = Vec::new();
    for d in devices {
        let site = site_of(d, registry)?;
        if let Some(plan) = plans.iter_mut().find(|p| p.site == site) {
            plan.devices.push(d.clone());
            continue;
        }
        let gateway = registry
            .gateways()
            .filter(|g| g.site.to_string() == site)
            .map(|g| g.id.to_string())
            .min()
            .ok_or_else(|| PlanError::NoGateway {
                site: site.clone(),
                device: d.clone(),
            })?;
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
pub(crate) struct AckRouter {
    filters: Vec<String>,
    index: HashMap<String, usize>,
}

impl AckRouter {
    /// A router for these devices, index = position.
    pub(crate) fn new<'a>(devices: impl IntoIterator<Item = &'a str>) -> Self {
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
    pub(crate) fn filters(&self) -> &[String] {
        &self.filters
    }

    /// Which device a message on `topic` is for; `None` for any other topic.
    pub(crate) fn route(&self, topic: &str) -> Option<usize> {
        self.index.get(topic).copied()
    }
}

/// Round robin over `len` members: each pick starts after the last one picked.
#[derive(Debug, Clone)]
pub(crate) struct Rotation {
    len: usize,
    next: usize,
}

impl Rotation {
    pub(crate) fn new(len: usize) -> Self {
        Self { len, next: 0 }
    }

    /// The first member from the current position on for which `ready` holds.
    pub(crate) fn pick(&mut self, ready: impl Fn(usize) -> bool) -> Option<usize> {
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
    /// This device's walk through its outbox on the current connection.
    resend: Resend,
    error: Option<String>,
}

/// One gateway's shell; see the module documentation.
#[derive(Debug)]
pub(crate) struct GatewayLink {
    identity: Identity,
    site: String,
    members: Vec<Member>,
    router: AckRouter,
    rotation: Rotation,
    window: usize,
    schedule: Arc<Schedule>,
    t0: Instant,
    connection: Connection,
    granted: bool,
}

impl GatewayLink {
    /// A gateway for `site` connecting as `identity` and carrying `devices`; time zero of
    /// every device's vitals model and schedule is `t0`. `first_connected` fires when the
    /// gateway is connected and subscribed the first time.
    pub(crate) fn new(
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
        let link = Arc::new(link);
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
                resend: Resend::new(link.resend_after, now),
                error: None,
            })
            .collect::<Vec<_>>();
        Self {
            rotation: Rotation::new(members.len()),
            connection: Connection::new(
                &identity.id,
                Arc::clone(&identity.tls),
                Arc::clone(&link),
                router.filters().to_vec(),
                members.len(),
                first_connected,
            ),
            identity,
            site,
            members,
            router,
            window,
            schedule,
            t0,
            granted: false,
        }
    }

    /// Keeps `live` up to date with the devices this gateway has connected.
    pub(crate) fn with_live(mut self, live: Arc<LiveCounts>) -> Self {
        self.connection.set_live(live);
        self
    }

    /// Runs until every device's schedule is done (and, with `until_receipted`, all
    /// their messages are receipted or the time is up) or `control` says otherwise;
    /// returns the gateway's account and each device's, in the order given.
    pub(crate) async fn run(
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
            let retry_at = self.connection.retry_at();
            tokio::select! {
                changed = control.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                event = self.connection.next() => {
                    let happened = self.connection.on_event(event);
                    self.on_event(happened);
                }
                () = sleep_until(next_tick.unwrap_or(now)), if next_tick.is_some() => self.on_ticks(),
                () = sleep_until(status_at.unwrap_or(now)), if status_at.is_some() => self.on_status(),
                () = sleep_until(retry_at.unwrap_or(now)), if retry_at.is_some() => {
                    tracing::debug!(gateway.id = %self.identity.id, "connecting");
                    self.connection.open();
                }
                () = sleep_until(send_at.unwrap_or(now)), if send_at.is_some() => self.send_ready(),
                _ = housekeeping.tick() => self.housekeeping(),
            }
        }
        self.connection.close(Duration::from_millis(500)).await;
        let connects = self.connection.connects();
        let gateway = GatewayReport {
            id: self.identity.id.clone(),
            site: self.site.clone(),
            devices: self
                .members
                .iter()
                .map(|m| m.device.id().as_str().to_owned())
                .collect(),
            connects,
            subscriptions_granted: self.granted,
        };
        let reports = self
            .members
            .into_iter()
            .map(|m| {
                let mut r = m.device.report(connects, m.error);
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
                let drained = self.connection.is_ready()
                    && self.connection.inflight() == 0
                    && self
                        .members
                        .iter()
                        .all(|m| m.device.next_after(m.resend.cursor).is_none());
                drained || now >= done + self.schedule.drain
            }
        }
    }

    /// When the next message may go, if any waits and the connection can take it.
    fn send_at(&self) -> Option<Instant> {
        if !self.connection.has_room(self.window) {
            return None;
        }
        self.members
            .iter()
            .filter(|m| m.device.next_after(m.resend.cursor).is_some())
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

    fn on_event(&mut self, happened: Happened) {
        match happened {
            Happened::Up { granted } => {
                if !granted {
                    tracing::warn!(gateway.id = %self.identity.id, "a receipt subscription was refused; those devices' messages will not be released");
                }
                self.granted = granted;
                let now = Instant::now();
                for m in &mut self.members {
                    m.resend.restart(now);
                }
                tracing::info!(
                    gateway.id = %self.identity.id,
                    site = %self.site,
                    devices = self.members.len(),
                    backlog = self.members.iter().map(|m| m.device.outbox().len()).sum::<usize>(),
                    connects = self.connection.connects(),
                    "gateway connected"
                );
            }
            Happened::Acked { refused } => {
                if let Some(reason) = refused {
                    tracing::warn!(gateway.id = %self.identity.id, reason, "publish refused by the broker");
                }
            }
            Happened::Message { topic, payload } => {
                let Some(i) = self.router.route(&topic) else {
                    tracing::debug!(gateway.id = %self.identity.id, topic = %topic, "message on an unexpected topic ignored");
                    return;
                };
                // The router was built from `members`, so its indexes are theirs.
                let m = &mut self.members[i];
                receive_receipt(
                    &mut m.device,
                    &mut m.resend,
                    &payload,
                    Some(&self.identity.id),
                );
            }
            Happened::Lost(lost) => self.lost(&lost),
            Happened::Nothing => {}
        }
    }

    /// The connection is gone (its next attempt is scheduled): log it.
    fn lost(&self, lost: &Lost) {
        let (reason, retry_ms) = (lost.reason.as_str(), lost.retry_ms());
        let held: usize = self.members.iter().map(|m| m.device.outbox().len()).sum();
        if lost.was_ready {
            tracing::warn!(gateway.id = %self.identity.id, reason, retry_ms, held, "gateway connection lost");
        } else {
            tracing::info!(gateway.id = %self.identity.id, reason, retry_ms, held, "gateway connect failed");
        }
    }

    /// Sends, device by device in turn, every message whose device's pacer allows it,
    /// while the window has room.
    fn send_ready(&mut self) {
        let now = Instant::now();
        while self.connection.has_room(self.window) {
            let members = &self.members;
            // The rotation spans exactly `members`, so every index it offers is valid.
            let Some(i) = self.rotation.pick(|i| {
                let m = &members[i];
                m.pacer.ready_at() <= now && m.device.next_after(m.resend.cursor).is_some()
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
        // `i` comes from the rotation over `members`.
        let m = &mut self.members[i];
        let Some(out) = m.device.next_after(m.resend.cursor) else {
            return true;
        };
        let (key, resend) = (out.key, out.resend);
        let topic = out.channel.topic(m.device.id().as_str());
        match self.connection.publish(topic, out.bytes.to_vec()) {
            Ok(false) => false,
            Ok(true) => {
                m.resend.cursor = Some(key);
                m.pacer.take(now);
                m.device.mark_sent(key);
                tracing::trace!(device.id = %m.device.id(), gateway.id = %self.identity.id, epoch = key.epoch, seq = key.seq, resend, "relayed");
                true
            }
            Err(lost) => {
                self.lost(&lost);
                false
            }
        }
    }

    fn housekeeping(&mut self) {
        let now = Instant::now();
        for m in &mut self.members {
            if m.device.outbox().is_empty() {
                m.resend.progress(now);
            }
        }
        if let Some(lost) = self.connection.check_deadline(now) {
            self.lost(&lost);
            return;
        }
        if self.connection.is_ready() {
            for m in &mut self.members {
                let front = m.device.outbox().front().map(|e| e.key());
                if m.resend.resend_due(front, now) {
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
    m.device.make_alarms(t, m.clock.ts_ms(elapsed))?;
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
        let mut registry = vitalmq_certs::device_registry(
            vitalmq_policies::TrustDomain::new("demo.vitalmq").expect("trust domain"),
            5,
            2,
        )
        .expect("registry");
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
