//! Steps 2 to 4 of the pipeline without I/O: verify one message against the registry,
//! then sequence a batch of verified messages, normalize the accepted ones and run the
//! alert engine on them, into one [`Commit`] for the store.
//!
//! [`Sequencer::sequence`] stages the windows, gaps and alert states it touches; the recorder calls
//! [`Sequencer::adopt`] only after the store committed the batch, so a failed commit
//! (disk full) leaves the in-memory state exactly as durable state is.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use vitalmq_envelope::{DeviceId, MessageType, ReasonClass, Refusal, Telemetry, Verified};
use vitalmq_policies::{DeviceRegistry, RuleSet};

use crate::alerts::{self, AlertChange, DeviceAlertState, Sample};
use crate::gaps::{Gap, OpenGaps};
use crate::normalize::Receipt;
use crate::plausible::Assessment;
use crate::store::{Commit, NewAlert, Quarantined, RecordedEvent};
use crate::window::{self, Accepted, DeviceSequence, ReceiptPoint, Rejected, Verdict, WindowSize};

/// A message as it came off the broker.
#[derive(Debug, Clone)]
pub struct Incoming<T> {
    pub topic: String,
    pub payload: Bytes,
    pub received_at_ms: u64,
    /// What the caller needs to acknowledge the message (the MQTT PUBLISH).
    pub token: T,
}

/// Which of the two device topics a message arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceTopic {
    Telemetry,
    Status,
}

/// Splits `devices/{id}/telemetry|status`; `None` for anything else.
pub fn parse_topic(topic: &str) -> Option<(&str, DeviceTopic)> {
    let rest = topic.strip_prefix("devices/")?;
    let (id, kind) = rest.split_once('/')?;
    let kind = match kind {
        "telemetry" => DeviceTopic::Telemetry,
        "status" => DeviceTopic::Status,
        _ => return None,
    };
    Some((id, kind))
}

/// The outcome of verifying one message.
#[derive(Debug)]
pub enum Checked<T> {
    Verified {
        incoming: Incoming<T>,
        verified: Box<Verified<Telemetry>>,
    },
    Refused {
        incoming: Incoming<T>,
        device: Option<DeviceId>,
        refusal: Refusal,
    },
}

/// Step 2: verify against the registry. The topic's `{id}`, `kid`, `dev` and the
/// registry key must agree (SPEC section 3); the message type must fit the topic.
pub fn verify<T>(registry: &DeviceRegistry, incoming: Incoming<T>) -> Checked<T> {
    let refused = |incoming, device, reason, detail: &str| Checked::Refused {
        incoming,
        device,
        refusal: Refusal::new(reason, detail),
    };
    let Some((id, kind)) = parse_topic(&incoming.topic) else {
        return refused(incoming, None, ReasonClass::Malformed, "not a device topic");
    };
    let device = match DeviceId::new(id) {
        Ok(d) => d,
        Err(_) => return refused(incoming, None, ReasonClass::Malformed, "topic device id"),
    };
    match vitalmq_envelope::verify_bytes(&incoming.payload, registry, Some(&device)) {
        Err(refusal) => Checked::Refused {
            incoming,
            device: Some(device),
            refusal,
        },
        Ok(v) => {
            let fits = match kind {
                DeviceTopic::Status => v.kind == MessageType::Status,
                DeviceTopic::Telemetry => v.kind != MessageType::Status,
            };
            if fits {
                Checked::Verified {
                    incoming,
                    verified: Box::new(v),
                }
            } else {
                refused(
                    incoming,
                    Some(device),
                    ReasonClass::PayloadSchema,
                    "message type does not match the topic",
                )
            }
        }
    }
}

/// What happened to one message, for acknowledgement, metrics and audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    Accepted {
        device: DeviceId,
        event_id: String,
        verdict: Accepted,
    },
    Rejected {
        device: DeviceId,
        epoch: u64,
        seq: u64,
        why: Rejected,
    },
    Refused {
        device: Option<DeviceId>,
        reason: ReasonClass,
        detail: String,
        sha256_hex: String,
    },
}

/// The sequencing result of one batch: what to write, and what each message became.
#[derive(Debug)]
pub struct Sequenced<T> {
    pub commit: Commit,
    /// One per input message, in input order, with its acknowledgement token.
    pub dispositions: Vec<(Disposition, T)>,
    /// Audit records the recorder writes once the commit is durable (or, when the
    /// store cannot take it, at once): acknowledgements applied and refused, and
    /// whatever else a control input decided.
    pub audit: Vec<vitalmq_audit::AuditRecord>,
    /// Operational alerts the recorder sends once the commit is durable (or, when the
    /// store cannot take it, at once).
    pub ops: Vec<crate::ops::OpsAlert>,
    staged: HashMap<DeviceId, Track>,
}

impl<T> Sequenced<T> {
    /// Gap changes in this batch (for audit and operational reporting).
    pub fn gaps(&self) -> &[(DeviceId, Gap)] {
        &self.commit.gaps
    }
}

#[derive(Debug, Clone, Default)]
struct Track {
    window: Option<DeviceSequence>,
    gaps: OpenGaps,
    alerts: DeviceAlertState,
}

/// Identity facts the normalized events record.
#[derive(Debug, Clone)]
pub struct Origin {
    /// Broker address the bridge subscribes at.
    pub broker: String,
    /// This bridge's SPIFFE identity.
    pub bridge: String,
}

/// Per-device sequence and alert state (steps 3 and 4).
#[derive(Debug)]
pub struct Sequencer {
    size: WindowSize,
    tracks: HashMap<DeviceId, Track>,
    /// The alert rules in force; `None` runs no alert engine.
    rules: Option<Arc<RuleSet>>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Sequencer {
    pub fn new(
        size: WindowSize,
        windows: HashMap<DeviceId, DeviceSequence>,
        gaps: HashMap<DeviceId, Vec<Gap>>,
        alert_states: HashMap<DeviceId, DeviceAlertState>,
        rules: Option<Arc<RuleSet>>,
    ) -> Self {
        let mut tracks: HashMap<DeviceId, Track> = windows
            .into_iter()
            .map(|(d, w)| {
                (
                    d,
                    Track {
                        window: Some(w),
                        ..Track::default()
                    },
                )
            })
            .collect();
        for (d, g) in gaps {
            tracks.entry(d).or_default().gaps = OpenGaps::new(g);
        }
        for (d, a) in alert_states {
            tracks.entry(d).or_default().alerts = a;
        }
        Self {
            size,
            tracks,
            rules,
        }
    }

    /// Puts a reloaded rule set in force for the next batch.
    pub fn set_rules(&mut self, rules: Option<Arc<RuleSet>>) {
        self.rules = rules;
    }

    pub fn rules(&self) -> Option<&Arc<RuleSet>> {
        self.rules.as_ref()
    }

    /// The receipt point a device's committed state supports.
    pub fn receipt(&self, device: &DeviceId) -> Option<ReceiptPoint> {
        self.tracks.get(device)?.window.as_ref()?.receipt()
    }

    /// Sequences one verified batch in arrival order.
    pub fn sequence<T>(
        &self,
        registry: &DeviceRegistry,
        origin: &Origin,
        batch: Vec<Checked<T>>,
        now_ms: u64,
    ) -> Sequenced<T> {
        let mut staged: HashMap<DeviceId, Track> = HashMap::new();
        let mut commit = Commit {
            now_ms,
            ..Commit::default()
        };
        let mut dispositions = Vec::with_capacity(batch.len());
        let mut alerted = BTreeSet::new();
        for checked in batch {
            match checked {
                Checked::Refused {
                    incoming,
                    device,
                    refusal,
                } => refuse(&mut commit, &mut dispositions, incoming, device, refusal),
                Checked::Verified { incoming, verified } => {
                    let device = verified.dev.clone();
                    let (epoch, seq) = (verified.epoch, verified.seq);
                    let track = staged
                        .entry(device.clone())
                        .or_insert_with(|| self.tracks.get(&device).cloned().unwrap_or_default());
                    let verdict = window::check(track.window.as_ref(), epoch, seq);
                    let accepted = match verdict {
                        Verdict::Reject(why) => {
                            commit.counters.push((device.to_string(), why.class(), 1));
                            dispositions.push((
                                Disposition::Rejected {
                                    device,
                                    epoch,
                                    seq,
                                    why,
                                },
                                incoming.token,
                            ));
                            continue;
                        }
                        Verdict::Accept(a) => a,
                    };
                    let Some(entry) = registry.device(&device) else {
                        // Only if the registry was reloaded between verify and here.
                        let refusal =
                            Refusal::new(ReasonClass::UnknownKey, "device left the registry");
                        refuse(
                            &mut commit,
                            &mut dispositions,
                            incoming,
                            Some(device),
                            refusal,
                        );
                        continue;
                    };
                    // Window and gaps.
                    let mut changed = Vec::new();
                    match (&mut track.window, accepted) {
                        (Some(w), Accepted::NewEpoch) => {
                            track.gaps.on_new_epoch(epoch, &mut changed);
                            w.apply(epoch, seq, accepted);
                        }
                        (Some(w), Accepted::Gap { missing }) => {
                            track
                                .gaps
                                .open(epoch, w.highest() + 1, seq - 1, now_ms, &mut changed);
                            debug_assert_eq!(missing, seq - w.highest() - 1);
                            w.apply(epoch, seq, accepted);
                            track.gaps.slide(epoch, w.low(), &mut changed);
                        }
                        (Some(w), Accepted::InOrder) => {
                            w.apply(epoch, seq, accepted);
                            track.gaps.slide(epoch, w.low(), &mut changed);
                        }
                        (Some(w), Accepted::OutOfOrder) => {
                            w.apply(epoch, seq, accepted);
                            track.gaps.fill(epoch, seq, &mut changed);
                        }
                        (slot, _) => *slot = Some(DeviceSequence::first(self.size, epoch, seq)),
                    }
                    commit
                        .gaps
                        .extend(changed.into_iter().map(|g| (device.clone(), g)));
                    let publisher = publisher_of(&incoming.topic);
                    let receipt = Receipt {
                        received_at_ms: incoming.received_at_ms,
                        topic: &incoming.topic,
                        broker: &origin.broker,
                        publisher: &publisher,
                        bridge: &origin.bridge,
                    };
                    let assessment = match &self.rules {
                        Some(r) => Assessment::of(
                            &verified,
                            incoming.received_at_ms,
                            r.plausibility(),
                            r.clock(),
                        ),
                        None => Assessment::of(
                            &verified,
                            incoming.received_at_ms,
                            &Default::default(),
                            &Default::default(),
                        ),
                    };
                    let event =
                        RecordedEvent::new(&verified, accepted, entry, &receipt, &assessment);
                    let event_id = event.event_id().to_owned();
                    if let Some(rules) = &self.rules
                        && verified.kind == MessageType::Vitals
                    {
                        let sample = Sample::from_telemetry(event_id.clone(), &verified, entry)
                            .assessed(&assessment);
                        let changes =
                            alerts::evaluate(rules, rules.sha256(), &mut track.alerts, &sample);
                        commit
                            .alerts
                            .extend(changes.iter().map(|c| new_alert(c, now_ms)));
                        alerted.insert(device.clone());
                    }
                    commit.events.push(event);
                    dispositions.push((
                        Disposition::Accepted {
                            device,
                            event_id,
                            verdict: accepted,
                        },
                        incoming.token,
                    ));
                }
            }
        }
        commit.sequences = staged
            .iter()
            .filter_map(|(d, t)| t.window.clone().map(|w| (d.clone(), w)))
            .collect();
        commit.alert_states = alerted
            .into_iter()
            .filter_map(|d| {
                let json = serde_json::to_string(&staged.get(&d)?.alerts).ok()?;
                Some((d, json))
            })
            .collect();
        Sequenced {
            commit,
            dispositions,
            audit: Vec::new(),
            ops: Vec::new(),
            staged,
        }
    }

    /// Forgets a device's sequence window and open gaps (an operator reset the store
    /// applied, see `store::resets`): its next message is its first. Its alert state
    /// stays: the patient's open alerts are not the sequence's business.
    pub fn reset_sequence(&mut self, device: &DeviceId) {
        if let Some(track) = self.tracks.get_mut(device) {
            track.window = None;
            track.gaps = OpenGaps::default();
        }
    }

    /// Makes a batch's alert state current although the store could not record it
    /// (full disk, quota, or the outbox at `max_backlog`): the alerts it raised were
    /// delivered from memory, so the engine must not raise them again when the devices
    /// resend; the sequence windows and gaps stay as durable state is, so the resent
    /// messages are recorded.
    ///
    /// SEAM (issue 17): the alert part of the staged state is adopted here (helper E:
    /// the alert state only, so the recorder's paused path works before D's evaluated
    /// window lands).
    pub fn adopt_unrecorded<T>(&mut self, sequenced: &mut Sequenced<T>) {
        for (device, track) in sequenced.staged.drain() {
            self.tracks.entry(device).or_default().alerts = track.alerts;
        }
    }

    /// Makes a committed batch's state the current one.
    pub fn adopt<T>(&mut self, sequenced: &mut Sequenced<T>) {
        for (device, track) in sequenced.staged.drain() {
            self.tracks.insert(device, track);
        }
    }
}

/// The store row of one alert state change.
fn new_alert(change: &AlertChange, now_ms: u64) -> NewAlert {
    let (kind, device, rule) = match change {
        AlertChange::Clinical(a) => ("clinical", a.device.to_string(), Some(a.rule.clone())),
        AlertChange::Operational(a) => ("operational", a.device.to_string(), None),
    };
    NewAlert {
        alert_id: change.alert_id().to_owned(),
        state: change.state().as_str().to_owned(),
        kind: kind.to_owned(),
        topic: change.topic(),
        device: Some(device),
        rule,
        created_at_ms: now_ms,
        body: change.to_json(),
        level: 0,
    }
}

/// Quarantines a refused message.
fn refuse<T>(
    commit: &mut Commit,
    dispositions: &mut Vec<(Disposition, T)>,
    incoming: Incoming<T>,
    device: Option<DeviceId>,
    refusal: Refusal,
) {
    let sha = sha256_hex(&incoming.payload);
    if let Some(d) = &device {
        commit
            .counters
            .push((d.to_string(), refusal.reason.as_str(), 1));
    }
    commit.quarantine.push(Quarantined {
        received_at_ms: incoming.received_at_ms,
        topic: incoming.topic,
        device: device.as_ref().map(ToString::to_string),
        reason: refusal.reason.as_str().to_owned(),
        detail: refusal.detail.clone(),
        sha256_hex: sha.clone(),
        raw: incoming.payload,
    });
    dispositions.push((
        Disposition::Refused {
            device,
            reason: refusal.reason,
            detail: refusal.detail,
            sha256_hex: sha,
        },
        incoming.token,
    ));
}

/// What the bridge can attest about the publisher: the broker's ACL lets only the
/// device itself or a gateway of its site publish on `devices/{id}/...` (SPEC section
/// 2), and MQTT does not tell a subscriber which of the two it was.
fn publisher_of(topic: &str) -> String {
    match parse_topic(topic) {
        Some((id, _)) => format!("device {id} or a gateway of its site (broker ACL)"),
        None => "unknown".to_owned(),
    }
}

mod control;
pub use control::{AlertGauges, Control};

#[cfg(test)]
mod tests;
