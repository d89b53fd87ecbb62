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
use vitalmq_audit::{Actor, AuditRecord, Component, Decision, Event};
use vitalmq_envelope::DeviceId;
use vitalmq_policies::{DeviceRegistry, PrincipalId, Role, SiteId, SpiffeId};

use super::{Sequenced, Sequencer, Track, new_alert};
use crate::alerts::presence::Presence;
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
        // Devices never heard from are watched from the first tick (and after each
        // enrolment, within a minute); the site of every device is cached for deadlines.
        if now_ms >= fleet.next_scan_ms {
            fleet.next_scan_ms = now_ms.saturating_add(SCAN_EVERY_MS);
            for entry in registry.devices() {
                let current = self.tracks.get(&entry.id);
                let fresh = current.is_none_or(|t| {
                    t.alerts.silence.since_ms().is_none() || t.site.as_ref() != Some(&entry.site)
                });
                if !fresh {
                    continue;
                }
                let mut track = current.cloned().unwrap_or_default();
                track.site = Some(entry.site.clone());
                if track.alerts.silence.watch(now_ms) {
                    persist.push(entry.id.clone());
                }
                out.staged.insert(entry.id.clone(), track);
            }
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
            track.site = Some(entry.site.clone());
            let connected = self
                .presence
                .device_connected(registry, device.as_str(), &entry.site);
            let state = &mut track.alerts;
            let mut sent = Vec::new();
            if let Some(mut o) =
                state
                    .silence
                    .on_tick(policy, rules.sha256(), entry, connected, now_ms)
            {
                opened += 1;
                state.book.record(&mut o, now_ms);
                sent.push(o);
            }
            sent.extend(state.book.due(policy, device.as_str(), now_ms));
            for o in sent {
                out.commit.alerts.push(new_alert(o, now_ms));
            }
            persist.push(device.clone());
            out.staged.insert(device.clone(), track);
        }
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
        // The fleet-wide count (resolutions come with data, already adopted).
        let count = self.silent.len() as u64 + opened;
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
