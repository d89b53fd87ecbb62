//! Steps 2 to 4 of the pipeline without I/O: verify one message against the registry,
//! then sequence a batch of verified messages, normalize the accepted ones and run the
//! alert engine on them, into one [`Commit`] for the store.
//!
//! [`Sequencer::sequence`] stages the windows, gaps and alert states it touches; the recorder calls
//! [`Sequencer::adopt`] only after the store committed the batch, so a failed commit
//! (disk full) leaves the in-memory state exactly as durable state is.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use vitalmq_envelope::{DeviceId, MessageType, ReasonClass, Refusal, Telemetry, Verified};
use vitalmq_policies::{DeviceRegistry, RuleSet, SiteId, Use};

use crate::alerts::alarm::{self, AlarmEvent, AlarmOutcome};
use crate::alerts::book::Outgoing;
use crate::alerts::evaluated::Evaluated;
use crate::alerts::presence::Presence;
use crate::alerts::status::StatusKeys;
use crate::alerts::{AlertChange, DeviceAlertState, Sample};
use crate::attribute::attribute;
use crate::gaps::{Gap, OpenGaps};
use crate::normalize::Receipt;
use crate::plausible::Assessment;
use crate::score::{self, PatientScoreState, Scoring};
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
    /// Scoring state of the patients the batch touched.
    staged_patients: HashMap<String, PatientScoreState>,
    /// Patients the store found erased while committing the batch: their scoring
    /// state is dropped on adoption, not made current.
    erased_patients: Vec<String>,
    /// Presence messages to apply on adoption.
    presence: Vec<(String, Bytes)>,
    /// The models registry (SHA-256) whose rollout a tick handed the patients' score
    /// episodes over to.
    rollout_handed: Option<String>,
    /// Fleet-wide bookkeeping of a tick, to adopt.
    fleet: Option<control::Fleet>,
    /// Devices no longer in the registry: out of the deadline index.
    forget: Vec<DeviceId>,
    /// Messages whose reported model needs attention, for the fleet counts on adoption.
    models_seen: Vec<crate::models::Seen>,
    /// The reported models of the alarm messages the models policy withheld, for the
    /// episodes' counts on adoption.
    alarms_withheld: Vec<String>,
}

impl<T> Sequenced<T> {
    fn empty(now_ms: u64) -> Self {
        Self {
            commit: Commit {
                now_ms,
                ..Commit::default()
            },
            dispositions: Vec::new(),
            audit: Vec::new(),
            ops: Vec::new(),
            staged: HashMap::new(),
            staged_patients: HashMap::new(),
            erased_patients: Vec::new(),
            presence: Vec::new(),
            rollout_handed: None,
            fleet: None,
            forget: Vec::new(),
            models_seen: Vec::new(),
            alarms_withheld: Vec::new(),
        }
    }
}

impl<T> Sequenced<T> {
    /// Drops the scoring state of patients the store found erased while committing
    /// this batch (`Committed::erased_patients`): adoption forgets them, so no
    /// pre-erasure reading is kept in memory or scored again.
    pub fn forget_patients(&mut self, erased: &[String]) {
        for p in erased {
            self.staged_patients.remove(p);
        }
        self.erased_patients.extend_from_slice(erased);
    }

    /// Gap changes in this batch (for audit and operational reporting).
    pub fn gaps(&self) -> &[(DeviceId, Gap)] {
        &self.commit.gaps
    }

    /// True when there is nothing to write, audit or send (most ticks): the caller may
    /// skip the commit, but must still adopt it (it may carry in-memory state: presence,
    /// cached sites, the next registry scan).
    pub fn writes_nothing(&self) -> bool {
        let c = &self.commit;
        c.events.is_empty()
            && c.quarantine.is_empty()
            && c.sequences.is_empty()
            && c.gaps.is_empty()
            && c.counters.is_empty()
            && c.alerts.is_empty()
            && c.alert_states.is_empty()
            && c.scores.is_empty()
            && c.shadow_alerts.is_empty()
            && c.patient_states.is_empty()
            && self.dispositions.is_empty()
            && self.audit.is_empty()
            && self.ops.is_empty()
    }
}

#[derive(Debug, Clone, Default)]
struct Track {
    window: Option<DeviceSequence>,
    gaps: OpenGaps,
    alerts: DeviceAlertState,
    /// The device's site as the registry last said (in memory): silence deadlines
    /// depend on it.
    site: Option<SiteId>,
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
    /// Candidate rule sets (issue 21, `[alerts] candidates`): versions of the rule set
    /// that run in shadow or as a canary as the models file says (see `rulesets`).
    candidates: rulesets::Candidates,
    /// The model registry in force; `None` checks no models (`[models]` absent).
    models: Option<Arc<vitalmq_policies::ModelRegistry>>,
    /// Open `model_unapproved` episodes.
    model_fleet: crate::models::ModelFleet,
    /// Open and recently resolved clinical alert ids -> device (rebuilt at load).
    index: HashMap<String, DeviceId>,
    /// The ids each device put in `index`.
    by_device: HashMap<DeviceId, Vec<String>>,
    /// `(bridge time, device)` of each device's next silence or re-escalation deadline,
    /// so a tick visits only the devices due.
    deadlines: BTreeSet<(u64, DeviceId)>,
    due: HashMap<DeviceId, u64>,
    /// Devices with an open `no-data` alert.
    silent: HashSet<DeviceId>,
    presence: Presence,
    fleet: control::Fleet,
    /// The newest bridge time adopted (for ages in the gauges).
    clock_ms: u64,
    /// Server-side scores (issue 21); `None` scores nothing.
    scoring: Option<Arc<Scoring>>,
    /// Scoring state per patient (`patient_ref`).
    patients: HashMap<String, PatientScoreState>,
    /// The SHA-256 of a models registry put in force whose rollout the patients'
    /// open score episodes have not been handed over to yet (the next tick does it).
    rollout_pending: Option<String>,
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
        let mut s = Self {
            size,
            tracks: HashMap::new(),
            rules,
            candidates: rulesets::Candidates::default(),
            models: None,
            model_fleet: crate::models::ModelFleet::default(),
            index: HashMap::new(),
            by_device: HashMap::new(),
            deadlines: BTreeSet::new(),
            due: HashMap::new(),
            silent: HashSet::new(),
            presence: Presence::default(),
            fleet: control::Fleet::default(),
            clock_ms: 0,
            scoring: None,
            patients: HashMap::new(),
            rollout_pending: None,
        };
        for (device, track) in tracks {
            s.install(device, track);
        }
        s
    }

    /// Scores vitals readings with `scoring` (needs a rule set: cohorts and the alert
    /// book come with it), starting from the stored per-patient states.
    pub fn with_scoring(
        mut self,
        scoring: Option<Arc<Scoring>>,
        patients: HashMap<String, PatientScoreState>,
    ) -> Self {
        self.scoring = scoring;
        self.patients = patients;
        self
    }

    /// Runs the candidate rule sets next to the base one (`[alerts] candidates`), each
    /// in the role the models file's `[[rollout]]` gives it per device; `model` is the
    /// rule set's registry name (`rollout::check_rule_sets` returns it).
    pub fn with_candidates(mut self, model: String, sets: Vec<Arc<RuleSet>>) -> Self {
        self.candidates = rulesets::Candidates { model, sets };
        self
    }

    /// Puts a (re)loaded model registry in force for the next batch.
    /// Returns the `model_unapproved` episodes the new registry resolves.
    pub fn set_models(
        &mut self,
        models: Option<Arc<vitalmq_policies::ModelRegistry>>,
        now_ms: u64,
    ) -> Vec<crate::ops::OpsAlert> {
        let resolved = match &models {
            Some(m) => self.model_fleet.on_reload(m, now_ms),
            None => Vec::new(),
        };
        // The rollout in force gives the score versions their roles: a reload is how a
        // canary starts and how a rollback happens (issue 21, part 4).
        if let Some(scoring) = &mut self.scoring {
            let changed = match (&scoring.registry, &models) {
                (Some(a), Some(b)) => a.sha256() != b.sha256(),
                (None, None) => false,
                _ => true,
            };
            Arc::make_mut(scoring).registry.clone_from(&models);
            if changed {
                self.rollout_pending = Some(
                    models
                        .as_ref()
                        .map(|m| m.sha256().to_owned())
                        .unwrap_or_default(),
                );
            }
        }
        self.models = models;
        resolved
    }

    /// Puts a reloaded rule set in force for the next batch (deadlines depend on it).
    pub fn set_rules(&mut self, rules: Option<Arc<RuleSet>>) {
        self.rules = rules;
        self.deadlines.clear();
        self.due.clear();
        let devices: Vec<DeviceId> = self.tracks.keys().cloned().collect();
        for d in devices {
            self.schedule(&d);
        }
    }

    /// Makes `track` the device's current state and updates the indexes.
    fn install(&mut self, device: DeviceId, track: Track) {
        for id in self.by_device.remove(&device).unwrap_or_default() {
            if self.index.get(&id) == Some(&device) {
                self.index.remove(&id);
            }
        }
        let book = &track.alerts.book;
        let ids: Vec<String> = book
            .entries()
            .map(|(id, _)| id.clone())
            .chain(book.resolved.iter().cloned())
            .collect();
        for id in &ids {
            self.index.insert(id.clone(), device.clone());
        }
        if !ids.is_empty() {
            self.by_device.insert(device.clone(), ids);
        }
        if track.alerts.silence.open.is_some() {
            self.silent.insert(device.clone());
        } else {
            self.silent.remove(&device);
        }
        self.tracks.insert(device.clone(), track);
        self.schedule(&device);
    }

    /// Puts the device's next deadline in the index.
    fn schedule(&mut self, device: &DeviceId) {
        if let Some(old) = self.due.remove(device) {
            self.deadlines.remove(&(old, device.clone()));
        }
        let (Some(rules), Some(track)) = (&self.rules, self.tracks.get(device)) else {
            return;
        };
        let policy = rules.alerting();
        let silence = track
            .site
            .as_ref()
            .and_then(|site| track.alerts.silence.deadline_ms(policy, device, site));
        let book = track.alerts.book.next_due_ms(policy);
        let next = match (silence, book) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(t) = next {
            self.deadlines.insert((t, device.clone()));
            self.due.insert(device.clone(), t);
        }
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
        let mut staged_patients: HashMap<String, PatientScoreState> = HashMap::new();
        // Score alert changes for the book of a device other than the reading's.
        let mut other_books: Vec<(DeviceId, Outgoing)> = Vec::new();
        let mut commit = Commit {
            now_ms,
            ..Commit::default()
        };
        let mut dispositions = Vec::with_capacity(batch.len());
        let mut alerted = BTreeSet::new();
        let mut ops = Vec::new();
        let mut models_seen = Vec::new();
        let mut audit = Vec::new();
        let mut alarms_withheld = Vec::new();
        let versions = self
            .rules
            .as_deref()
            .and_then(|r| rulesets::Versions::of(r, &self.candidates, self.models.as_deref()));
        for checked in batch {
            match checked {
                Checked::Refused {
                    incoming,
                    device,
                    refusal,
                } => {
                    // A refusal counts toward the silence of a device assigned now only:
                    // one unassigned or retired is watched for nobody (issue 19).
                    if self.rules.is_some()
                        && let Some(d) = &device
                        && registry.device(d).is_some()
                        && registry
                            .assignment_at(d, now_ms)
                            .is_some_and(|a| matches!(a.serves, Use::Assigned { .. }))
                    {
                        let track = staged
                            .entry(d.clone())
                            .or_insert_with(|| self.tracks.get(d).cloned().unwrap_or_default());
                        track.alerts.silence.on_refused(refusal.reason.as_str());
                        alerted.insert(d.clone());
                    }
                    refuse(&mut commit, &mut dispositions, incoming, device, refusal);
                }
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
                    let Some(current) = registry.device(&device) else {
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
                    let mut assessment = match &self.rules {
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
                    // The patient and site are those of the assignment covering the
                    // reading's observed_at, not the device's current ones. Refused
                    // before the window moves: nothing of an unattributable reading
                    // is kept but its quarantine row.
                    let entry = match attribute(registry, current, assessment.observed_at_ms) {
                        Ok(entry) => entry,
                        Err(refusal) => {
                            refuse(
                                &mut commit,
                                &mut dispositions,
                                incoming,
                                Some(device),
                                refusal,
                            );
                            continue;
                        }
                    };
                    let entry = entry.as_ref();
                    if let Some(models) = &self.models {
                        let check =
                            crate::models::check(models, self.rules.as_deref(), entry, &verified);
                        if check.status.needs_attention() {
                            models_seen.push(crate::models::Seen::of(
                                self.rules.as_deref(),
                                entry,
                                &verified,
                                check.status,
                            ));
                        }
                        assessment.model = Some(check);
                    }
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
                    let event =
                        RecordedEvent::new(&verified, accepted, entry, &receipt, &assessment);
                    let event_id = event.event_id().to_owned();
                    if let Some(rules) = &self.rules {
                        // Silence is about the device now: its current site and entry.
                        track.site = Some(current.site.clone());
                        let state = &mut track.alerts;
                        let mut out = Vec::new();
                        out.extend(state.silence.on_accepted(
                            rules.sha256(),
                            current,
                            incoming.received_at_ms,
                        ));
                        // Alarms withheld before a reload that stopped withholding them.
                        let check = assessment.model.as_ref();
                        if state.alarms.values().any(|e| e.withheld)
                            && !crate::models::withholds(self.models.as_deref(), check)
                        {
                            out.extend(
                                alarm::release_withheld(
                                    &mut state.alarms,
                                    rules.sha256(),
                                    entry,
                                    &verified,
                                    &event_id,
                                )
                                .into_iter()
                                .map(|o| crate::models::mark_alarm(o, check)),
                            );
                        }
                        // Once per (epoch, seq), however often the store could not
                        // record it and the device resent it.
                        if Evaluated::admit(
                            &mut state.evaluated,
                            epoch,
                            seq,
                            self.size.get() as usize / 64,
                        ) {
                            match verified.kind {
                                MessageType::Vitals => {
                                    let sample =
                                        Sample::from_telemetry(event_id.clone(), &verified, entry)
                                            .assessed(&assessment);
                                    let changes = rulesets::evaluate(
                                        versions.as_ref(),
                                        rules,
                                        &self.candidates,
                                        state,
                                        &sample,
                                        now_ms,
                                        &mut commit.shadow_alerts,
                                    );
                                    out.extend(changes.iter().map(outgoing));
                                    // A reading of no patient scores nothing, and
                                    // must not stage a state keyed "".
                                    if let Some(scoring) = &self.scoring
                                        && !sample.patient_ref.is_empty()
                                    {
                                        let patient = staged_patients
                                            .entry(sample.patient_ref.clone())
                                            .or_insert_with(|| {
                                                self.patients
                                                    .get(&sample.patient_ref)
                                                    .cloned()
                                                    .unwrap_or_default()
                                            });
                                        let cohorts = patient_cohorts(
                                            rules,
                                            registry,
                                            &sample.patient_ref,
                                            patient,
                                            Some(&device),
                                        );
                                        let scored = score::on_vitals(
                                            scoring, patient, &sample, &cohorts, now_ms,
                                        );
                                        commit.scores.extend(scored.rows);
                                        for a in scored.alerts {
                                            if a.book_device == device.as_str() {
                                                out.push(a.out);
                                            } else if let Ok(d) = DeviceId::new(&a.book_device) {
                                                other_books.push((d, a.out));
                                            }
                                        }
                                    }
                                }
                                MessageType::Alarm => {
                                    if let Some(alarm) = AlarmEvent::of(&verified) {
                                        let check = assessment.model.as_ref();
                                        match alarm::on_alarm(
                                            &mut state.alarms,
                                            rules.alerting(),
                                            rules.sha256(),
                                            entry,
                                            &verified,
                                            &event_id,
                                            &alarm,
                                            crate::models::withholds(self.models.as_deref(), check),
                                            now_ms,
                                        ) {
                                            AlarmOutcome::Alert(o) => {
                                                out.push(crate::models::mark_alarm(o, check));
                                            }
                                            AlarmOutcome::Withheld { alert_id, state } => {
                                                let status = check.map_or(
                                                    vitalmq_policies::ModelStatus::None,
                                                    |c| c.status,
                                                );
                                                audit.push(crate::models::withheld_record(
                                                    &device,
                                                    &alarm,
                                                    verified.model.as_deref(),
                                                    status,
                                                    &event_id,
                                                    &alert_id,
                                                    state,
                                                ));
                                                alarms_withheld.push(
                                                    verified.model.clone().unwrap_or_default(),
                                                );
                                            }
                                            AlarmOutcome::Nothing => {}
                                        }
                                    }
                                }
                                MessageType::Status => {
                                    let keys = StatusKeys::of(&verified);
                                    if keys.interval_s.is_some() {
                                        state.silence.interval_s = keys.interval_s;
                                    }
                                    ops.extend(state.status.on_status(
                                        &rules.alerting().battery,
                                        entry,
                                        epoch,
                                        &event_id,
                                        &keys,
                                        now_ms,
                                    ));
                                }
                            }
                        }
                        for mut o in out {
                            state.book.record(&mut o, now_ms);
                            commit.alerts.push(new_alert(o, now_ms));
                        }
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
        for (device, mut o) in other_books {
            let track = staged
                .entry(device.clone())
                .or_insert_with(|| self.tracks.get(&device).cloned().unwrap_or_default());
            track.alerts.book.record(&mut o, now_ms);
            commit.alerts.push(new_alert(o, now_ms));
            alerted.insert(device);
        }
        commit.patient_states = staged_patients
            .iter()
            .filter_map(|(p, s)| Some((p.clone(), serde_json::to_string(s).ok()?)))
            .collect();
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
        let mut out = Sequenced::empty(now_ms);
        out.commit = commit;
        out.dispositions = dispositions;
        out.ops = ops;
        out.staged = staged;
        out.staged_patients = staged_patients;
        out.models_seen = models_seen;
        out.alarms_withheld = alarms_withheld;
        out.audit = audit;
        out
    }

    /// Forgets a device's sequence window and open gaps (an operator reset the store
    /// applied, see `store::resets`): its next message is its first. Its alert state
    /// stays (the patient's open alerts are not the sequence's business), except the
    /// evaluated window, which follows the sequence.
    pub fn reset_sequence(&mut self, device: &DeviceId) {
        if let Some(track) = self.tracks.get_mut(device) {
            track.window = None;
            track.gaps = OpenGaps::default();
            track.alerts.evaluated = None;
        }
    }

    /// Makes a batch's alert state current although the store could not record it
    /// (full disk, quota, or the outbox at `max_backlog`): the alerts it raised were
    /// delivered from memory, so the engine must not raise them again when the devices
    /// resend; the sequence windows and gaps stay as durable state is, so the resent
    /// messages are recorded.
    ///
    /// Adopts the alert part of the staged state (alert book, alarms, silence,
    /// status, the evaluated window) and presence; not the windows and gaps.
    pub fn adopt_unrecorded<T>(&mut self, sequenced: &mut Sequenced<T>) {
        for (device, staged) in std::mem::take(&mut sequenced.staged) {
            let mut track = self.tracks.get(&device).cloned().unwrap_or_default();
            track.alerts = staged.alerts;
            track.site = staged.site;
            self.install(device, track);
        }
        self.adopt_patients(sequenced);
        self.adopt_control(sequenced);
    }

    /// Makes a committed batch's state the current one.
    pub fn adopt<T>(&mut self, sequenced: &mut Sequenced<T>) {
        for (device, track) in std::mem::take(&mut sequenced.staged) {
            self.install(device, track);
        }
        self.adopt_patients(sequenced);
        self.adopt_control(sequenced);
    }

    /// The patients' scoring state of a batch (with the alert state: it holds the
    /// score alert episodes).
    fn adopt_patients<T>(&mut self, sequenced: &mut Sequenced<T>) {
        self.patients
            .extend(std::mem::take(&mut sequenced.staged_patients));
        for p in std::mem::take(&mut sequenced.erased_patients) {
            self.patients.remove(&p);
        }
    }

    /// On a tick: resolves (`no_data`) the open score episodes whose inputs all
    /// expired ([`score::on_expiry`]), recording the changes in their devices' books
    /// and staging the patients' states. Returns the devices whose alert state
    /// changed.
    fn expire_scores(
        &self,
        registry: &DeviceRegistry,
        rules: &RuleSet,
        now_ms: u64,
        out: &mut Sequenced<()>,
    ) -> Vec<DeviceId> {
        let Some(scoring) = &self.scoring else {
            return Vec::new();
        };
        let mut devices = Vec::new();
        for (patient, state) in &self.patients {
            if state.episodes.is_empty() {
                continue;
            }
            let scale = scoring.spo2_scale(&patient_cohorts(rules, registry, patient, state, None));
            let site_of = |device: &str| {
                let d = DeviceId::new(device).ok()?;
                let site = registry.device(&d)?.site.clone();
                Some((site, scale))
            };
            let mut staged = state.clone();
            let changes = score::on_expiry(scoring, &mut staged, patient, site_of, now_ms);
            if staged == *state {
                continue;
            }
            for a in changes {
                let Ok(d) = DeviceId::new(&a.book_device) else {
                    continue;
                };
                let mut o = a.out;
                let track = out
                    .staged
                    .entry(d.clone())
                    .or_insert_with(|| self.tracks.get(&d).cloned().unwrap_or_default());
                track.alerts.book.record(&mut o, now_ms);
                out.commit.alerts.push(new_alert(o, now_ms));
                devices.push(d);
            }
            if let Ok(json) = serde_json::to_string(&staged) {
                out.commit.patient_states.push((patient.clone(), json));
            }
            out.staged_patients.insert(patient.clone(), staged);
        }
        devices
    }

    /// On the first tick after a models reload changed the rollout: every patient with
    /// an open score episode is rescored under the new roles ([`score::on_rollout`]),
    /// so a rollback resolves a canary's alert now, not at the patient's next reading
    /// that changes an input. Staged like [`Self::expire_scores`] (after it, from its
    /// staged state); returns the devices whose alert state changed.
    fn hand_over_scores(
        &self,
        registry: &DeviceRegistry,
        rules: &RuleSet,
        now_ms: u64,
        out: &mut Sequenced<()>,
    ) -> Vec<DeviceId> {
        let (Some(scoring), Some(sha)) = (&self.scoring, &self.rollout_pending) else {
            return Vec::new();
        };
        out.rollout_handed = Some(sha.clone());
        let mut devices = Vec::new();
        for (patient, adopted) in &self.patients {
            let state = out.staged_patients.get(patient).unwrap_or(adopted);
            if state.episodes.is_empty() {
                continue;
            }
            let Some(newest) = state.latest.values().max_by_key(|r| r.observed_at_ms) else {
                continue;
            };
            let Some(entry) = DeviceId::new(&newest.device)
                .ok()
                .and_then(|d| registry.device(&d))
            else {
                continue;
            };
            let sample = Sample {
                event_id: format!("rollout-{sha}"),
                device: entry.id.clone(),
                site: entry.site.clone(),
                patient_ref: patient.clone(),
                ts_ms: now_ms,
                metrics: std::collections::BTreeMap::new(),
                implausible: Vec::new(),
                q: None,
                fw: String::new(),
                model: None,
            };
            let cohorts = patient_cohorts(rules, registry, patient, state, None);
            let mut staged = state.clone();
            let scored = score::on_rollout(scoring, &mut staged, &sample, &cohorts, now_ms);
            if staged == *state {
                continue;
            }
            out.commit.scores.extend(scored.rows);
            for a in scored.alerts {
                let Ok(d) = DeviceId::new(&a.book_device) else {
                    continue;
                };
                let mut o = a.out;
                let track = out
                    .staged
                    .entry(d.clone())
                    .or_insert_with(|| self.tracks.get(&d).cloned().unwrap_or_default());
                track.alerts.book.record(&mut o, now_ms);
                out.commit.alerts.push(new_alert(o, now_ms));
                devices.push(d);
            }
            out.commit.patient_states.retain(|(p, _)| p != patient);
            if let Ok(json) = serde_json::to_string(&staged) {
                out.commit.patient_states.push((patient.clone(), json));
            }
            out.staged_patients.insert(patient.clone(), staged);
        }
        devices
    }

    /// The scoring state of a patient as adopted (for tests and status).
    #[cfg(test)]
    pub(crate) fn patient_score_state(&self, patient_ref: &str) -> Option<&PatientScoreState> {
        self.patients.get(patient_ref)
    }

    /// Presence, fleet counts and forgotten devices of a control input.
    fn adopt_control<T>(&mut self, sequenced: &mut Sequenced<T>) {
        let now_ms = sequenced.commit.now_ms;
        if let Some(sha) = sequenced.rollout_handed.take()
            && self.rollout_pending.as_ref() == Some(&sha)
        {
            self.rollout_pending = None;
        }
        for seen in std::mem::take(&mut sequenced.models_seen) {
            sequenced.ops.extend(self.model_fleet.observe(seen, now_ms));
        }
        for model in std::mem::take(&mut sequenced.alarms_withheld) {
            sequenced
                .ops
                .extend(self.model_fleet.withheld(&model, now_ms));
        }
        sequenced.ops.extend(self.model_fleet.on_tick(now_ms));
        self.clock_ms = self.clock_ms.max(sequenced.commit.now_ms);
        for (topic, payload) in std::mem::take(&mut sequenced.presence) {
            // Checked when staged; a failure here changes nothing.
            let _ = self.presence.apply(&topic, &payload);
        }
        if let Some(fleet) = sequenced.fleet.take() {
            self.fleet = fleet;
        }
        for device in std::mem::take(&mut sequenced.forget) {
            if let Some(t) = self.due.remove(&device) {
                self.deadlines.remove(&(t, device));
            }
        }
    }
}

/// The rule-set cohorts of a patient, for the score versions' roles and the SpO2
/// scale: the union over the devices the patient's scoring state holds readings or
/// episodes of that the registry in force still assigns to the patient, and `device`
/// (the one whose reading is being scored). One decision per patient, whichever of its
/// devices sent the reading: cohorts of the sending device alone made the role and the
/// scale flip between an oximeter in a cohort and a cuff outside it (alerts opened and
/// resolved with no policy change).
fn patient_cohorts<'r>(
    rules: &'r RuleSet,
    registry: &DeviceRegistry,
    patient_ref: &str,
    state: &PatientScoreState,
    device: Option<&DeviceId>,
) -> Vec<&'r str> {
    let held = state
        .latest
        .values()
        .map(|r| r.device.as_str())
        .chain(state.episodes.values().map(|e| e.device.as_str()))
        .filter_map(|d| DeviceId::new(d).ok())
        .filter(|d| {
            registry
                .device(d)
                .is_some_and(|e| e.patient_ref == patient_ref)
        });
    let mut devices: BTreeSet<DeviceId> = held.collect();
    devices.extend(device.cloned());
    let mut cohorts: Vec<&str> = devices.iter().flat_map(|d| rules.cohorts_of(d)).collect();
    cohorts.sort_unstable();
    cohorts.dedup();
    cohorts
}

/// An engine change on its way to the book and the store.
fn outgoing(change: &AlertChange) -> Outgoing {
    let (kind, device, rule, severity) = match change {
        AlertChange::Clinical(a) => (
            "clinical",
            a.device.to_string(),
            Some(a.rule.clone()),
            Some(a.severity),
        ),
        AlertChange::Operational(a) => ("operational", a.device.to_string(), None, None),
    };
    Outgoing {
        alert_id: change.alert_id().to_owned(),
        state: change.state().as_str().to_owned(),
        kind,
        topic: change.topic(),
        device,
        rule,
        severity,
        body: change.to_json(),
        level: 0,
    }
}

/// The store row of one alert state change, at the level the book decided.
fn new_alert(o: Outgoing, now_ms: u64) -> NewAlert {
    NewAlert {
        alert_id: o.alert_id,
        state: o.state,
        kind: o.kind.to_owned(),
        topic: o.topic,
        device: Some(o.device),
        rule: o.rule,
        created_at_ms: now_ms,
        body: o.body,
        level: o.level,
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
mod rulesets;
pub use control::{AlertGauges, Control};

#[cfg(test)]
mod tests;

#[cfg(test)]
mod alert_tests;

#[cfg(test)]
mod score_tests;

#[cfg(test)]
mod rulesets_tests;
