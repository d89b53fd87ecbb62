//! Inputs of the recorder other than device messages (issue 17): acknowledgements of
//! alerts, presence changes the broker reports, and the passing of time (silence,
//! re-escalation). Each is turned into a [`Sequenced`] like a batch of messages, so the
//! recorder stages, commits (or, when the store cannot take it, delivers from memory),
//! adopts, audits and publishes it on one path.
//!
//! - **Ack** (SPEC 5.2, `alerts/{site}/ack/{id}`): the acknowledger is
//!   `spiffe://<td>/integrator/{id}` if the registry has integrator `{id}` at `{site}`,
//!   else `spiffe://<td>/operator/{id}` if `{id}` is an enrolled operator. Refused (never
//!   applied) when the acknowledger is neither, the payload is malformed, the alert is
//!   unknown, of another site or resolved: an `ops/bridge/ack_refused` record (no
//!   patient reference) and an `alert_ack_refused` audit record. Applied: the alert is
//!   re-sent `acknowledged` and an `alert_acknowledged` audit record names who.
//! - **Presence**: applied to the in-memory presence on adoption (see
//!   `alerts::presence`).
//! - **Tick**: every device due in the deadline index (silence opening, re-escalation
//!   of an unacknowledged alert); about once a minute the registry is scanned for devices
//!   never heard from, which are watched from then on; the fleet-wide count of silent
//!   devices goes to `ops/bridge/no_data` when it changes.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, json};
use sha2::{Digest as _, Sha256};
use std::borrow::Cow;
use vitalmq_audit::{Actor, AuditRecord, Component, Decision, Event};
use vitalmq_envelope::DeviceId;

use vitalmq_policies::{DeviceEntry, DeviceRegistry, PrincipalId, Role, SiteId, SpiffeId, Use};

use super::{Sequenced, Sequencer, Track, new_alert};
use crate::alerts::presence::Presence;
use crate::alerts::silence::SilenceState;
use crate::attribute::attribute;
use crate::ops::{OpsAlert, OpsKind};

/// One input to the recorder that is not a device message.
#[derive(Debug, Clone)]
pub enum Control {
    /// A PUBLISH on `alerts/{site}/ack/{id}` (SPEC section 5.2).
    Ack {
        topic: String,
        payload: Bytes,
        received_at_ms: u64,
    },
    /// A presence message of the broker (`presence/...`, see ARCHITECTURE.md).
    Presence {
        topic: String,
        payload: Bytes,
        received_at_ms: u64,
    },
    /// The bridge's wall clock, about once a second: silence and re-escalation timers.
    Tick { now_ms: u64 },
}

/// The alert figures the bridge exports as gauges, after every adopted change.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AlertGauges {
    /// Open clinical alerts (any state but resolved) per severity: info, review, urgent.
    pub open_by_severity: [u64; 3],
    /// Devices with an open silence (`no-data`) alert.
    pub silent_devices: u64,
    /// Open clinical alerts not acknowledged.
    pub unacknowledged: u64,
    /// Age in seconds, on the bridge's clock, of the oldest unacknowledged urgent alert.
    pub oldest_unacknowledged_urgent_s: Option<f64>,
}

/// Fleet-wide bookkeeping of ticks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Fleet {
    /// When the registry is next scanned for devices never heard from.
    next_scan_ms: u64,
    /// The silent-device count last sent to `ops/bridge/no_data`, and its episode id.
    no_data_sent: u64,
    no_data_alert: Option<String>,
}

/// How often the registry is scanned for devices to watch.
const SCAN_EVERY_MS: u64 = 60_000;
/// Longest `note` of an ack, bytes (SPEC 5.2).
const MAX_NOTE_BYTES: usize = 256;

/// The acknowledgement payload (SPEC 5.2).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AckPayload {
    alert_id: String,
    #[serde(default)]
    note: Option<String>,
}

/// Why an ack was refused; the `reason` of its audit record and ops alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckRefusal {
    Malformed,
    UnknownAcknowledger,
    UnknownAlert,
    OtherSite,
    Resolved,
}

impl AckRefusal {
    fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnknownAcknowledger => "unknown_acknowledger",
            Self::UnknownAlert => "unknown_alert",
            Self::OtherSite => "other_site",
            Self::Resolved => "resolved",
        }
    }
}

impl Sequencer {
    /// Stages what one control input changes. `T` is `()`: a control input has no
    /// acknowledgement token; the recorder acknowledges its PUBLISH itself.
    pub fn control(
        &self,
        registry: &DeviceRegistry,
        control: Control,
        now_ms: u64,
    ) -> Sequenced<()> {
        let mut out = Sequenced::empty(now_ms);
        match control {
            Control::Ack { topic, payload, .. } => {
                self.ack(registry, &topic, &payload, now_ms, &mut out)
            }
            Control::Presence { topic, payload, .. } => {
                // Checked on a scratch copy of nothing: applying is idempotent, so the
                // staged message is only validated here.
                match Presence::default().apply(&topic, &payload) {
                    Ok(_) => out.presence.push((topic, payload)),
                    Err(e) => tracing::warn!(%topic, error = %e, "presence message ignored"),
                }
            }
            Control::Tick { now_ms: tick_ms } => self.tick(registry, tick_ms, &mut out),
        }
        out
    }

    fn ack(
        &self,
        registry: &DeviceRegistry,
        topic: &str,
        payload: &[u8],
        now_ms: u64,
        out: &mut Sequenced<()>,
    ) {
        // alerts/{site}/ack/{id}
        let parts: Vec<&str> = topic.split('/').collect();
        let (site, id) = match parts.as_slice() {
            ["alerts", site, "ack", id] => (*site, *id),
            _ => {
                return refuse_ack(out, topic, None, None, None, AckRefusal::Malformed, now_ms);
            }
        };
        let td = registry.trust_domain().clone();
        let by = match (
            SiteId::new(site.to_owned()),
            PrincipalId::new(id.to_owned()),
        ) {
            (Ok(site_id), Ok(p)) => {
                if registry.integrator_site(&p) == Some(&site_id) {
                    Some(SpiffeId::new(td, Role::Integrator, p).uri())
                } else if registry.is_operator(&p) {
                    Some(SpiffeId::new(td, Role::Operator, p).uri())
                } else {
                    None
                }
            }
            _ => None,
        };
        let Some(by) = by else {
            return refuse_ack(
                out,
                topic,
                None,
                None,
                Some(site),
                AckRefusal::UnknownAcknowledger,
                now_ms,
            );
        };
        let parsed = serde_json::from_slice::<AckPayload>(payload)
            .ok()
            .filter(|p| {
                p.note.as_ref().is_none_or(|n| n.len() <= MAX_NOTE_BYTES)
                    && !p.alert_id.is_empty()
                    && p.alert_id.len() <= 128
            });
        let Some(ack) = parsed else {
            return refuse_ack(
                out,
                topic,
                Some(&by),
                None,
                Some(site),
                AckRefusal::Malformed,
                now_ms,
            );
        };
        let refuse = |out: &mut Sequenced<()>, why| {
            refuse_ack(
                out,
                topic,
                Some(&by),
                Some(&ack.alert_id),
                Some(site),
                why,
                now_ms,
            );
        };
        let Some(device) = self.index.get(&ack.alert_id) else {
            return refuse(out, AckRefusal::UnknownAlert);
        };
        let (Some(entry), Some(track)) = (registry.device(device), self.tracks.get(device)) else {
            return refuse(out, AckRefusal::UnknownAlert);
        };
        if entry.site.as_str() != site {
            return refuse(out, AckRefusal::OtherSite);
        }
        let mut track: Track = track.clone();
        let (outcome, sent) =
            track
                .alerts
                .book
                .acknowledge(&ack.alert_id, &by, device.as_str(), now_ms);
        use crate::alerts::book::AckOutcome;
        match outcome {
            AckOutcome::Resolved => return refuse(out, AckRefusal::Resolved),
            AckOutcome::Unknown => return refuse(out, AckRefusal::UnknownAlert),
            AckOutcome::Applied | AckOutcome::AlreadyAcknowledged => {}
        }
        let mut details = Map::new();
        details.insert("site".into(), json!(site));
        details.insert("device".into(), json!(device.as_str()));
        details.insert("has_note".into(), json!(ack.note.is_some()));
        if outcome == AckOutcome::AlreadyAcknowledged {
            details.insert("already_acknowledged".into(), json!(true));
        }
        let mut record = AuditRecord::new(Component::Bridge, Event::AlertAcknowledged);
        record.actor = Some(Actor {
            identity: Some(by.clone()),
            ..Actor::default()
        });
        record.action = Some("ack".into());
        record.resource = Some(ack.alert_id.clone());
        record.decision = Some(Decision::Allow);
        record.details = details;
        out.audit.push(record);
        if let Some(sent) = sent {
            out.commit.alerts.push(new_alert(sent, now_ms));
            if let Ok(json) = serde_json::to_string(&track.alerts) {
                out.commit.alert_states.push((device.clone(), json));
            }
            out.staged.insert(device.clone(), track);
        }
    }

    fn tick(&self, registry: &DeviceRegistry, now_ms: u64, out: &mut Sequenced<()>) {
        let Some(rules) = &self.rules else {
            return;
        };
        let policy = rules.alerting();
        let mut fleet = self.fleet.clone();
        let mut persist: Vec<DeviceId> = Vec::new();
        let mut closed = 0u64;
        // Devices never heard from are watched from the first tick (and after each
        // enrolment or assignment, within a minute); devices whose watched assignment
        // ended stop being watched. A device with an open silence alert is checked at
        // every tick, so its episode is resolved as soon as its assignment ends.
        let scan = now_ms >= fleet.next_scan_ms;
        if scan {
            fleet.next_scan_ms = now_ms.saturating_add(SCAN_EVERY_MS);
        }
        let candidates: Vec<&DeviceEntry> = if scan {
            registry.devices().collect()
        } else {
            self.silent
                .iter()
                .filter_map(|d| registry.device(d))
                .collect()
        };
        for entry in candidates {
            let current = self.tracks.get(&entry.id);
            if !needs_follow(registry, entry, current, now_ms) {
                continue;
            }
            let mut track = current.cloned().unwrap_or_default();
            if self
                .follow(registry, entry, &mut track, now_ms, out, &mut closed)
                .is_some()
            {
                track.alerts.silence.watch(now_ms);
            }
            persist.push(entry.id.clone());
            out.staged.insert(entry.id.clone(), track);
        }
        let mut opened = 0u64;
        let due = self.deadlines.iter().take_while(|(t, _)| *t <= now_ms);
        for (_, device) in due {
            let Some(entry) = registry.device(device) else {
                out.forget.push(device.clone());
                continue;
            };
            let mut track = match out.staged.remove(device) {
                Some(t) => t,
                None => self.tracks.get(device).cloned().unwrap_or_default(),
            };
            let mut sent = Vec::new();
            if let Some(assigned) =
                self.follow(registry, entry, &mut track, now_ms, out, &mut closed)
            {
                let connected =
                    self.presence
                        .device_connected(registry, device.as_str(), &assigned.site);
                let state = &mut track.alerts;
                if let Some(mut o) =
                    state
                        .silence
                        .on_tick(policy, rules.sha256(), &assigned, connected, now_ms)
                {
                    opened += 1;
                    state.book.record(&mut o, now_ms);
                    sent.push(o);
                }
            }
            sent.extend(track.alerts.book.due(policy, device.as_str(), now_ms));
            for o in sent {
                out.commit.alerts.push(new_alert(o, now_ms));
            }
            persist.push(device.clone());
            out.staged.insert(device.clone(), track);
        }
        // Score episodes whose inputs all expired resolve (`no_data`).
        persist.extend(self.expire_scores(registry, rules, now_ms, out));
        // Score episodes whose version's role a models reload changed hand over.
        persist.extend(self.hand_over_scores(registry, rules, now_ms, out));
        persist.sort();
        persist.dedup();
        for device in persist {
            if let Some(json) = out
                .staged
                .get(&device)
                .and_then(|t| serde_json::to_string(&t.alerts).ok())
            {
                out.commit.alert_states.push((device, json));
            }
        }
        // The fleet-wide count (resolutions by data come with it, already adopted; those
        // of ended assignments are this tick's).
        let count = (self.silent.len() as u64 + opened).saturating_sub(closed);
        if count != fleet.no_data_sent {
            let (state, id) = match (&fleet.no_data_alert, count) {
                (Some(id), 0) => ("resolved", Some(id.clone())),
                (Some(id), _) => ("open", Some(id.clone())),
                (None, 0) => ("resolved", None),
                (None, _) => ("open", Some(format!("ops-bridge-no_data-{now_ms}"))),
            };
            if let Some(id) = id {
                let mut details = Map::new();
                details.insert("count".into(), json!(count));
                out.ops.push(OpsAlert {
                    kind: OpsKind::NoData,
                    state,
                    alert_id: id.clone(),
                    reason: format!("{count} devices have sent nothing for their silence time"),
                    details,
                    at_ms: now_ms,
                });
                fleet.no_data_alert = (count > 0).then_some(id);
            }
            fleet.no_data_sent = count;
        }
        if fleet != self.fleet {
            out.fleet = Some(fleet);
        }
    }

    /// Points the device's silence watch at the assignment in force at `now_ms`: when
    /// the watched one ended, an open episode is resolved (`unassigned`, naming the
    /// patient it was about) and the watch is forgotten. The device as assigned now
    /// (patient and site of that assignment), or `None` when it is unassigned or
    /// retired: then it is not watched.
    fn follow<'a>(
        &self,
        registry: &DeviceRegistry,
        entry: &'a DeviceEntry,
        track: &mut Track,
        now_ms: u64,
        out: &mut Sequenced<()>,
        closed: &mut u64,
    ) -> Option<Cow<'a, DeviceEntry>> {
        let now = assigned_at(registry, entry, now_ms);
        let silence = &mut track.alerts.silence;
        let watched = silence.assignment_from;
        let same = match (&now, watched) {
            (Some((_, from)), Some(w)) => *from == w,
            // Not watched under an assignment yet: adopt the one in force.
            (Some(_), None) => true,
            (None, _) => false,
        };
        if !same {
            // The episode was about the ended assignment's patient (it names them
            // itself; this is for states saved before it did).
            let former = watched
                .and_then(|w| assigned_at(registry, entry, w))
                .map_or(Cow::Borrowed(entry), |(e, _)| e);
            if let Some(rules) = &self.rules
                && let Some(mut o) = silence.on_unassigned(rules.sha256(), &former, now_ms)
            {
                *closed += 1;
                track.alerts.book.record(&mut o, now_ms);
                out.commit.alerts.push(new_alert(o, now_ms));
            }
            track.site = None;
        }
        let (assigned, from) = now?;
        track.alerts.silence.assignment_from = Some(from);
        track.site = Some(assigned.site.clone());
        Some(assigned)
    }

    /// The figures of [`AlertGauges`] for the adopted state.
    pub fn gauges(&self) -> AlertGauges {
        use crate::alerts::book::BookState;
        use vitalmq_policies::Severity;
        let mut g = AlertGauges {
            silent_devices: self.silent.len() as u64,
            ..AlertGauges::default()
        };
        let mut oldest: Option<u64> = None;
        for device in self.by_device.keys() {
            let Some(track) = self.tracks.get(device) else {
                continue;
            };
            for (_, e) in track.alerts.book.entries() {
                g.open_by_severity[e.severity as usize] += 1;
                if e.state != BookState::Acknowledged {
                    g.unacknowledged += 1;
                    if e.severity == Severity::Urgent {
                        oldest = Some(oldest.map_or(e.opened_ms, |o| o.min(e.opened_ms)));
                    }
                }
            }
        }
        // Milliseconds to seconds; precision beyond 2^53 ms is not needed.
        #[allow(clippy::cast_precision_loss)]
        let age = |o: u64| self.clock_ms.saturating_sub(o) as f64 / 1000.0;
        g.oldest_unacknowledged_urgent_s = oldest.map(age);
        g
    }
}

/// The device as the assignment in force at `t` has it (its patient and site), with
/// that assignment's start; `None` when unassigned or retired at `t`.
fn assigned_at<'a>(
    registry: &DeviceRegistry,
    entry: &'a DeviceEntry,
    t: u64,
) -> Option<(Cow<'a, DeviceEntry>, u64)> {
    let from = registry.assignment_at(&entry.id, t)?.period.from;
    let assigned = attribute(registry, entry, t).ok()?;
    Some((assigned, from))
}

/// Whether [`Sequencer::follow`] would change the device's silence watch: it is watched
/// but not assigned now, or assigned now but not watched under that assignment (or not
/// watched at all, or under another site).
fn needs_follow(
    registry: &DeviceRegistry,
    entry: &DeviceEntry,
    track: Option<&Track>,
    now_ms: u64,
) -> bool {
    match registry.assignment_at(&entry.id, now_ms) {
        Some(a) => match &a.serves {
            Use::Assigned { site, .. } => track.is_none_or(|t| {
                t.alerts.silence.since_ms().is_none()
                    || t.alerts.silence.assignment_from != Some(a.period.from)
                    || t.site.as_ref() != Some(site)
            }),
            Use::Retired => watched(track),
        },
        None => watched(track),
    }
}

/// Whether anything of a silence watch is left on the track.
fn watched(track: Option<&Track>) -> bool {
    track.is_some_and(|t| {
        let s: &SilenceState = &t.alerts.silence;
        s.since_ms().is_some()
            || s.open.is_some()
            || s.assignment_from.is_some()
            || t.site.is_some()
    })
}

fn refuse_ack(
    out: &mut Sequenced<()>,
    topic: &str,
    by: Option<&str>,
    alert_id: Option<&str>,
    site: Option<&str>,
    why: AckRefusal,
    now_ms: u64,
) {
    let mut details = Map::new();
    details.insert("topic".into(), json!(topic));
    if let Some(site) = site {
        details.insert("site".into(), json!(site));
    }
    if let Some(by) = by {
        details.insert("acknowledger".into(), json!(by));
    }
    if let Some(a) = alert_id {
        details.insert("ack_alert_id".into(), json!(a));
    }
    let mut record = AuditRecord::new(Component::Bridge, Event::AlertAckRefused);
    record.actor = by.map(|b| Actor {
        identity: Some(b.to_owned()),
        ..Actor::default()
    });
    record.action = Some("ack".into());
    record.resource = Some(alert_id.unwrap_or(topic).to_owned());
    record.decision = Some(Decision::Deny);
    record.reason = Some(why.as_str().to_owned());
    record.details = details.clone();
    out.audit.push(record);
    let digest = Sha256::digest(format!("{topic}\0{}\0{now_ms}", alert_id.unwrap_or("")));
    out.ops.push(OpsAlert {
        kind: OpsKind::AckRefused,
        state: "event",
        alert_id: format!("ops-bridge-ack_refused-{}", hex::encode(&digest[..8])),
        reason: why.as_str().to_owned(),
        details,
        at_ms: now_ms,
    });
}
