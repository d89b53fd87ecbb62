//! The recorder thread: takes the bridge's work in order (batches of verified
//! messages, and control inputs: acknowledgements of alerts, presence, the ticks of
//! the clock), turns each into a [`Sequenced`], commits it, audits it and hands back
//! the acknowledgements and receipts.
//!
//! Alerting never waits for archiving (issue 17). Recording is *paused* while the
//! outbox is at `max_backlog` (until it drains below `resume_backlog`) or after the
//! store refused a commit (disk full, quota, I/O); the recorder does not block then:
//!
//! ```text
//! work ─▶ sequence / control (evaluate alerts) ─▶ recording?
//!   yes: commit all (+ alert rows the store missed) ─ok─▶ adopt ─▶ audit, ops, wake
//!        │                                                   handlers ─▶ ack + receipts
//!        └─fails─▶ paused (store) ─┐
//!   no:  alerts-only commit ───────┴─fails─▶ alert rows to the handlers from memory,
//!        │                                   kept to be written later
//!        └─▶ adopt_unrecorded ─▶ audit, ops, wake handlers ─▶ ack, NO receipts
//! ```
//!
//! Paused, nothing a device sent is recorded: its PUBLISH is acknowledged to the
//! broker (its in-flight window must not stall alerting) and the device gets no
//! receipt, so it resends. While the store is failing a whole commit is retried at
//! most once per [`RETRY_EVERY`] (not per batch). A paused episode raises
//! `ops/bridge/store` (`recording_paused`, with its cause) and an audit record once,
//! and resolves both when recording resumes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Map, json};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};
use vitalmq_audit::{AuditRecord, Auditor, Component, Decision, Event};
use vitalmq_envelope::DeviceId;
use vitalmq_policies::{DeviceRegistry, RuleSet};

use crate::classify::{Checked, Control, Disposition, Origin, Sequenced, Sequencer};
use crate::delivery::HandlerFeed;
use crate::gaps::GapState;
use crate::ops::{Episodes, OpsAlert, OpsKind, RateChange, RateWatch};
use crate::store::{Commit, NewAlert, Store, StoreError, StoredAlert};
use crate::window::{Accepted, ReceiptPoint};

/// How often a failing store is tried again with a whole commit.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Alert rows kept for the store while it cannot take them; beyond, the oldest are
/// dropped from what will be written (they were delivered from memory).
const PENDING_ALERTS_MAX: usize = 65_536;

/// One unit of the recorder's work, in arrival order.
#[derive(Debug)]
pub enum Work<T> {
    /// Device messages, verified.
    Batch(Vec<Checked<T>>),
    /// An input that is not a device message; `token` acknowledges its PUBLISH (none
    /// for a tick).
    Control { control: Control, token: Option<T> },
}

/// What the recorder hands back after a work item.
#[derive(Debug)]
pub struct Recorded<T> {
    /// Acknowledge these to the broker.
    pub tokens: Vec<T>,
    /// Current receipt point of every device the batch touched (none for a batch that
    /// was not recorded).
    pub receipts: Vec<(DeviceId, ReceiptPoint)>,
}

/// Commits and their sizes, reported when the recorder stops: how well group commit
/// amortizes the fsync is the first thing to look at when ingest is slow.
#[derive(Debug, Default)]
struct CommitStats {
    commits: u64,
    messages: u64,
    largest: usize,
    busy: Duration,
    first_batch: Option<std::time::Instant>,
}

impl CommitStats {
    fn add(&mut self, messages: usize, took: Duration) {
        self.first_batch
            .get_or_insert_with(|| std::time::Instant::now() - took);
        self.commits += 1;
        self.messages += messages as u64;
        self.largest = self.largest.max(messages);
        self.busy += took;
    }

    fn report(&self) {
        if self.commits == 0 {
            return;
        }
        info!(
            commits = self.commits,
            messages = self.messages,
            mean_batch = self.messages as f64 / self.commits as f64,
            largest_batch = self.largest,
            commit_ms_total = self.busy.as_millis() as u64,
            mean_commit_us = (self.busy.as_micros() as u64) / self.commits,
            wall_ms = self
                .first_batch
                .map_or(0, |t| t.elapsed().as_millis() as u64),
            "recorder stopped"
        );
    }
}

/// Settings of the recorder.
#[derive(Debug, Clone)]
pub struct RecorderSettings {
    pub max_backlog: u64,
    pub resume_backlog: u64,
    /// Sink names whose cursors count for the backlog.
    pub sinks: Vec<String>,
}

/// Everything the recorder thread owns.
#[derive(Debug)]
pub struct Recorder {
    pub store: Store,
    pub sequencer: Sequencer,
    pub registry: Arc<DeviceRegistry>,
    /// Reloaded registries: the next batch is sequenced and attributed with the newest.
    pub registry_updates: Option<watch::Receiver<Arc<DeviceRegistry>>>,
    pub origin: Origin,
    pub auditor: Auditor,
    pub settings: RecorderSettings,
    pub ops: mpsc::UnboundedSender<OpsAlert>,
    /// Reloaded alert rules, when the alert engine runs.
    pub rules: Option<watch::Receiver<Arc<RuleSet>>>,
    /// Reloaded model registries, when `[models]` is configured.
    pub models: Option<watch::Receiver<Arc<vitalmq_policies::ModelRegistry>>>,
    /// One per alert handler: woken after alerts were recorded, and fed the alert rows
    /// the store could not take.
    pub handlers: Vec<HandlerFeed>,
    /// Rates that raise operational alerts (refusals, replays, gaps).
    pub rate_watches: Vec<RateWatch>,
    /// True while the store takes whole commits (for `/readyz`).
    pub store_writable: Arc<AtomicBool>,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The store refused a commit: why, and when it was last tried.
#[derive(Debug)]
struct StoreFailure {
    /// `disk_full` or `store_error`.
    cause: &'static str,
    error: String,
    last_attempt: Instant,
}

/// Alert rows and alert states decided while the store could not take them, in
/// order: written with the first commit the store takes. With them the scores and
/// patients' scoring states and the shadow alert changes of the same batches
/// (`Commit::take_alert_part`): the engine states that made those changes are adopted,
/// so a resend does not make them again.
#[derive(Debug, Default)]
struct Unrecorded {
    alerts: Vec<NewAlert>,
    states: BTreeMap<DeviceId, String>,
    scores: Vec<crate::score::NewScore>,
    patient_states: BTreeMap<String, String>,
    shadow_alerts: Vec<crate::store::NewShadowAlert>,
}

impl Unrecorded {
    /// Puts what is kept in front of `commit`'s own alert part.
    fn merge_into(&mut self, commit: &mut Commit) {
        commit.alerts.splice(0..0, self.alerts.drain(..));
        let fresh: BTreeSet<DeviceId> =
            commit.alert_states.iter().map(|(d, _)| d.clone()).collect();
        // The commit's own states are newer: they were staged from the adopted ones.
        commit.alert_states.extend(
            std::mem::take(&mut self.states)
                .into_iter()
                .filter(|(d, _)| !fresh.contains(d)),
        );
        commit.scores.splice(0..0, self.scores.drain(..));
        let fresh: BTreeSet<String> = commit
            .patient_states
            .iter()
            .map(|(p, _)| p.clone())
            .collect();
        commit.patient_states.extend(
            std::mem::take(&mut self.patient_states)
                .into_iter()
                .filter(|(p, _)| !fresh.contains(p)),
        );
        commit
            .shadow_alerts
            .splice(0..0, self.shadow_alerts.drain(..));
    }

    /// Undoes [`Self::merge_into`] after the commit failed, keeping the commit's own
    /// alert part too (it was not recorded either). Returns what it had to drop
    /// beyond `PENDING_ALERTS_MAX` (the oldest), for the caller to count and audit.
    #[must_use]
    fn take_back(&mut self, commit: &mut Commit) -> Overflow {
        let mut dropped = Overflow::default();
        self.alerts.append(&mut commit.alerts);
        for (d, s) in commit.alert_states.drain(..) {
            self.states.insert(d, s);
        }
        self.scores.append(&mut commit.scores);
        for (p, s) in commit.patient_states.drain(..) {
            self.patient_states.insert(p, s);
        }
        self.shadow_alerts.append(&mut commit.shadow_alerts);
        if self.shadow_alerts.len() > PENDING_ALERTS_MAX {
            let over = self.shadow_alerts.len() - PENDING_ALERTS_MAX;
            error!(
                dropped = over,
                "too many shadow alert rows waiting for the store; the oldest will not be recorded"
            );
            dropped.shadow_alerts = self
                .shadow_alerts
                .drain(..over)
                .map(|r| r.change_id)
                .collect();
        }
        if self.scores.len() > PENDING_ALERTS_MAX {
            let over = self.scores.len() - PENDING_ALERTS_MAX;
            error!(
                dropped = over,
                "too many score rows waiting for the store; the oldest will not be recorded"
            );
            dropped.scores = self.scores.drain(..over).map(|r| r.score_id).collect();
        }
        if self.alerts.len() > PENDING_ALERTS_MAX {
            let over = self.alerts.len() - PENDING_ALERTS_MAX;
            error!(
                dropped = over,
                "too many alert rows waiting for the store; the oldest will not be recorded (they were delivered)"
            );
            dropped.alerts = self.alerts.drain(..over).map(|a| a.alert_id).collect();
        }
        dropped
    }
}

/// Rows [`Unrecorded::take_back`] dropped, by id: never recorded.
#[derive(Debug, Default, PartialEq, Eq)]
struct Overflow {
    scores: Vec<String>,
    alerts: Vec<String>,
    /// Shadow alert rows, by `change_id`.
    shadow_alerts: Vec<String>,
}

impl Overflow {
    /// One audit record per kind of row dropped: how many, the first and last id.
    fn records(&self) -> Vec<AuditRecord> {
        [
            ("score", &self.scores),
            ("alert", &self.alerts),
            ("shadow_alert", &self.shadow_alerts),
        ]
        .into_iter()
        .filter(|(_, ids)| !ids.is_empty())
        .map(|(kind, ids)| {
            AuditRecord::new(Component::Bridge, Event::EventsWithheld)
                .action("record")
                .resource(kind)
                .decision(Decision::Deny)
                .reason("unrecorded_overflow")
                .detail("count", ids.len())
                .detail("first_id", ids.first().cloned().unwrap_or_default())
                .detail("last_id", ids.last().cloned().unwrap_or_default())
        })
        .collect()
    }
}

/// Acknowledgements that arrived while the audit log could not write: an
/// acknowledgement is applied only with its audit record, so they wait (their PUBLISHes
/// unacknowledged to the broker) and are applied, in order, once it writes again.
#[derive(Debug)]
struct DeferredAcks<T> {
    waiting: std::collections::VecDeque<(Control, Option<T>)>,
}

/// Most acknowledgements kept waiting for the audit log; beyond, the newest is not
/// taken (its PUBLISH stays unacknowledged: the broker resends it on reconnect).
const DEFERRED_ACKS_MAX: usize = 1024;

impl<T> Default for DeferredAcks<T> {
    fn default() -> Self {
        Self {
            waiting: std::collections::VecDeque::new(),
        }
    }
}

impl<T> DeferredAcks<T> {
    /// Keeps `control` for later if it is an acknowledgement and the audit log cannot
    /// write; gives it back otherwise.
    fn defer(
        &mut self,
        audit_broken: bool,
        control: Control,
        token: Option<T>,
    ) -> Option<(Control, Option<T>)> {
        if !(audit_broken && matches!(control, Control::Ack { .. })) {
            return Some((control, token));
        }
        if self.waiting.len() < DEFERRED_ACKS_MAX {
            self.waiting.push_back((control, token));
        } else {
            error!(
                "too many acknowledgements waiting for the audit log; one dropped unacknowledged (the broker resends it after a reconnect)"
            );
        }
        None
    }

    /// The waiting acknowledgements, oldest first, once the audit log writes again.
    fn release(&mut self, audit_broken: bool) -> Vec<(Control, Option<T>)> {
        if audit_broken {
            return Vec::new();
        }
        self.waiting.drain(..).collect()
    }
}

/// What the recorder keeps between work items.
#[derive(Debug, Default)]
struct State {
    /// The audit log refused a record and has not recovered: recording pauses (no
    /// security decision is recorded unaudited) and acknowledgements wait; alerting
    /// goes on.
    audit_broken: bool,
    episodes: Episodes,
    stats: CommitStats,
    data_version: Option<i64>,
    /// The outbox is at `max_backlog` (until it drains below `resume_backlog`).
    backlogged: bool,
    store_failure: Option<StoreFailure>,
    unrecorded: Unrecorded,
}

impl State {
    fn recording(&self) -> bool {
        !self.backlogged && self.store_failure.is_none() && !self.audit_broken
    }
}

/// What became of one work item.
struct Handled<U> {
    recorded: bool,
    /// Its alert part (alert rows, alert states) is in the store: recorded whole, or
    /// by an alerts-only commit.
    alerts_durable: bool,
    dispositions: Vec<(Disposition, U)>,
}

/// Whether `commit` holds anything beyond its alert part.
fn carries_messages(c: &Commit) -> bool {
    !(c.events.is_empty()
        && c.quarantine.is_empty()
        && c.sequences.is_empty()
        && c.gaps.is_empty()
        && c.counters.is_empty())
}

fn is_empty(c: &Commit) -> bool {
    !carries_messages(c)
        && c.alerts.is_empty()
        && c.alert_states.is_empty()
        && c.scores.is_empty()
        && c.patient_states.is_empty()
        && c.shadow_alerts.is_empty()
}

impl Recorder {
    /// Runs until `work` closes.
    pub fn run<T: Send>(
        mut self,
        mut work: mpsc::Receiver<Work<T>>,
        done: mpsc::UnboundedSender<Recorded<T>>,
    ) {
        let mut st = State::default();
        let mut deferred = DeferredAcks::default();
        // PUBLISHes of acknowledgements applied while nothing could be written: released
        // once a commit makes their alert state durable, so a crash meanwhile has the
        // broker resend them (applying one again is harmless).
        let mut held: Vec<T> = Vec::new();
        while let Some(item) = work.blocking_recv() {
            self.watch_audit(&mut st);
            if st.store_failure.is_none() && !st.audit_broken {
                self.apply_sequence_resets(&mut st.data_version);
            }
            if let Some(rules) = &mut self.rules
                && rules.has_changed().unwrap_or(false)
            {
                let fresh = Arc::clone(&rules.borrow_and_update());
                self.sequencer.set_rules(Some(fresh));
            }
            if let Some(models) = &mut self.models
                && models.has_changed().unwrap_or(false)
            {
                let fresh = Arc::clone(&models.borrow_and_update());
                for a in self.sequencer.set_models(Some(fresh), now_ms()) {
                    let _ = self.ops.send(a);
                }
            }
            if let Some(updates) = &mut self.registry_updates
                && updates.has_changed().unwrap_or(false)
            {
                self.registry = Arc::clone(&updates.borrow_and_update());
            }
            self.watch_backlog(&mut st);
            let mut tokens = Vec::new();
            let mut receipts = Vec::new();
            let mut audited = true;
            for (control, token) in deferred.release(st.audit_broken) {
                let sequenced = self.sequencer.control(&self.registry, control, now_ms());
                let (h, ok) = self.handle(&mut st, sequenced);
                audited &= ok;
                if h.alerts_durable {
                    tokens.extend(token);
                } else {
                    held.extend(token);
                }
            }
            match item {
                Work::Batch(batch) => {
                    let sequenced =
                        self.sequencer
                            .sequence(&self.registry, &self.origin, batch, now_ms());
                    let (h, ok) = self.handle(&mut st, sequenced);
                    let (t, r) = self.account(h);
                    tokens.extend(t);
                    receipts = r;
                    audited &= ok;
                }
                Work::Control { control, token } => {
                    if let Some((control, token)) = deferred.defer(st.audit_broken, control, token)
                    {
                        let is_ack = matches!(control, Control::Ack { .. });
                        let sequenced = self.sequencer.control(&self.registry, control, now_ms());
                        let (h, ok) = self.handle(&mut st, sequenced);
                        audited &= ok;
                        if is_ack && !h.alerts_durable {
                            held.extend(token);
                        } else {
                            tokens.extend(token);
                        }
                    }
                }
            }
            if st.recording() {
                // A whole commit went through, with every alert state kept meanwhile.
                tokens.append(&mut held);
            }
            if !audited {
                st.audit_broken = true;
            }
            self.report_episode(&mut st);
            if done.send(Recorded { tokens, receipts }).is_err() {
                break;
            }
        }
        st.stats.report();
    }

    /// Commits (or, paused, keeps alerting without recording) one sequenced item;
    /// false in the second value when the audit log refused a record.
    fn handle<U>(&mut self, st: &mut State, mut s: Sequenced<U>) -> (Handled<U>, bool) {
        // Decided now, whatever the store does: they go out one way or another.
        let fresh = s.commit.alerts.clone();
        let mut audited = self.audit_alerts(&fresh);
        let retry_due = st
            .store_failure
            .as_ref()
            .is_none_or(|f| f.last_attempt.elapsed() >= RETRY_EVERY);
        let try_whole = !st.backlogged
            && !st.audit_broken
            && (st.store_failure.is_none() || (retry_due && carries_messages(&s.commit)));
        let mut recorded = false;
        let mut alerts_durable = false;
        if try_whole {
            st.unrecorded.merge_into(&mut s.commit);
            if is_empty(&s.commit) {
                recorded = true; // nothing to write: a quiet tick
            } else {
                let started = Instant::now();
                match self.store.commit(&s.commit) {
                    Ok(committed) => {
                        audited &= self.erased_dropped(&committed);
                        s.forget_patients(&committed.erased_patients);
                        crate::observe::commit_duration(started.elapsed());
                        st.stats.add(s.dispositions.len(), started.elapsed());
                        if st.store_failure.take().is_some() {
                            info!(store = %self.store.path().display(), "store writable again; recording resumed");
                        }
                        recorded = true;
                    }
                    Err(e) => {
                        self.store_failed(st, &e);
                        let dropped = st.unrecorded.take_back(&mut s.commit);
                        audited &= self.overflowed(&dropped);
                    }
                }
            }
        }
        if recorded {
            self.sequencer.adopt(&mut s);
            if !s.commit.alerts.is_empty() {
                self.wake_handlers();
            }
            audited &= self.audit(&s.dispositions, &s.commit.gaps);
            self.watch_rates(&s.dispositions, &s.commit.gaps, &mut st.episodes);
        } else {
            alerts_durable = self.alert_without_recording(st, &mut s, &fresh);
            self.sequencer.adopt_unrecorded(&mut s);
            // Refusals and rejections are security facts, audited now; gaps are not
            // news until the messages are recorded (the windows did not move).
            audited &= self.audit(&s.dispositions, &[]);
        }
        for r in std::mem::take(&mut s.audit) {
            if let Err(e) = self.auditor.record(r) {
                error!(error = %e, "audit log refused a record");
                audited = false;
            }
        }
        for a in std::mem::take(&mut s.ops) {
            let _ = self.ops.send(a);
        }
        self.set_gauges(st);
        (
            Handled {
                recorded,
                alerts_durable: recorded || alerts_durable,
                dispositions: s.dispositions,
            },
            audited,
        )
    }

    /// Paused: records the alert part alone if the store takes it, else hands this
    /// item's alert rows to the handlers from memory and keeps them for the store.
    fn alert_without_recording<U>(
        &mut self,
        st: &mut State,
        s: &mut Sequenced<U>,
        fresh: &[NewAlert],
    ) -> bool {
        // Only the alert part (with its scores) is written; the rest waits for the
        // devices' resends.
        let mut alerts_only = s.commit.take_alert_part();
        let worth_trying = st.store_failure.is_none() || !fresh.is_empty();
        st.unrecorded.merge_into(&mut alerts_only);
        if is_empty(&alerts_only) {
            return true;
        }
        if worth_trying {
            match self.store.commit_alerts_only(&alerts_only) {
                Ok(committed) => {
                    // An unaudited drop is still a drop: the next audit failure shows.
                    let _ = self.erased_dropped(&committed);
                    s.forget_patients(&committed.erased_patients);
                    if !alerts_only.alerts.is_empty() {
                        self.wake_handlers();
                    }
                    return true;
                }
                Err(e) => self.store_failed(st, &e),
            }
        }
        let dropped = st.unrecorded.take_back(&mut alerts_only);
        // An unaudited drop still shows in the metric; the next audit failure shows.
        let _ = self.overflowed(&dropped);
        if fresh.is_empty() {
            return false;
        }
        for feed in &self.handlers {
            for a in fresh {
                let row = StoredAlert {
                    position: 0,
                    alert_id: a.alert_id.clone(),
                    state: a.state.clone(),
                    topic: a.topic.clone(),
                    body: a.body.clone(),
                    level: a.level,
                    created_at_ms: a.created_at_ms,
                };
                if feed.memory.try_send(row).is_err() {
                    warn!(alert_id = %a.alert_id, "alert handler's memory queue full; the alert goes out once the store takes it");
                }
            }
            feed.wake.notify_one();
        }
        false
    }

    /// Counts and audits (ids only) what a commit left out because its patient was
    /// erased: a late message from before the erasure. It is acknowledged and receipted
    /// like a stored one, so the device stops resending it, and never stored (the
    /// patient's key is gone; there is no plaintext fallback). False when the audit log
    /// refused a record.
    fn erased_dropped(&self, committed: &crate::store::Committed) -> bool {
        let mut audited = true;
        for (event_id, device) in &committed.erased_events {
            metrics::counter!("vitalmq_bridge_erased_dropped_total", "kind" => "event")
                .increment(1);
            info!(event_id = %event_id, device = %device, "reading of an erased patient dropped");
            if let Err(e) = self.auditor.record(
                AuditRecord::new(Component::Bridge, Event::EventsWithheld)
                    .action("record")
                    .resource(device.clone())
                    .decision(Decision::Deny)
                    .reason("erased_patient_dropped")
                    .detail("event_id", event_id.clone()),
            ) {
                error!(error = %e, "audit log refused a record");
                audited = false;
            }
        }
        for (alert_id, state) in &committed.erased_alerts {
            metrics::counter!("vitalmq_bridge_erased_dropped_total", "kind" => "alert")
                .increment(1);
            if let Err(e) = self.auditor.record(
                AuditRecord::new(Component::Bridge, Event::EventsWithheld)
                    .action("record")
                    .resource("alert")
                    .decision(Decision::Deny)
                    .reason("erased_patient_dropped")
                    .detail("alert_id", alert_id.clone())
                    .detail("state", state.clone()),
            ) {
                error!(error = %e, "audit log refused a record");
                audited = false;
            }
        }
        audited
    }

    /// Counts (`vitalmq_bridge_unrecorded_dropped_total{kind}`) and audits the rows
    /// kept for the store that had to be dropped. False when the audit log refused a
    /// record.
    fn overflowed(&self, dropped: &Overflow) -> bool {
        metrics::counter!("vitalmq_bridge_unrecorded_dropped_total", "kind" => "score")
            .increment(dropped.scores.len() as u64);
        metrics::counter!("vitalmq_bridge_unrecorded_dropped_total", "kind" => "alert")
            .increment(dropped.alerts.len() as u64);
        metrics::counter!("vitalmq_bridge_unrecorded_dropped_total", "kind" => "shadow_alert")
            .increment(dropped.shadow_alerts.len() as u64);
        let mut audited = true;
        for r in dropped.records() {
            if let Err(e) = self.auditor.record(r) {
                error!(error = %e, "audit log refused a record");
                audited = false;
            }
        }
        audited
    }

    fn store_failed(&mut self, st: &mut State, e: &StoreError) {
        let full = matches!(e, StoreError::Full { .. });
        if st.store_failure.is_none() {
            error!(error = %e, disk_full = full, "cannot record; alerting goes on without durable recording, devices get no receipts");
        }
        st.store_failure = Some(StoreFailure {
            cause: if full { "disk_full" } else { "store_error" },
            error: e.to_string(),
            last_attempt: Instant::now(),
        });
    }

    fn wake_handlers(&self) {
        for feed in &self.handlers {
            feed.wake.notify_one();
        }
    }

    /// Metrics and the acknowledgements and receipts of a handled batch.
    fn account<T>(&self, h: Handled<T>) -> (Vec<T>, Vec<(DeviceId, ReceiptPoint)>) {
        if !h.recorded {
            metrics::counter!("vitalmq_bridge_unrecorded_total")
                .increment(h.dispositions.len() as u64);
            return (
                h.dispositions.into_iter().map(|(_, t)| t).collect(),
                Vec::new(),
            );
        }
        let mut touched = BTreeSet::new();
        let mut tokens = Vec::with_capacity(h.dispositions.len());
        for (d, token) in h.dispositions {
            match &d {
                Disposition::Accepted {
                    device, verdict, ..
                } => {
                    metrics::counter!("vitalmq_bridge_accepted_total").increment(1);
                    if matches!(verdict, Accepted::Gap { .. }) {
                        metrics::counter!("vitalmq_bridge_gaps_total").increment(1);
                    }
                    touched.insert(device.clone());
                }
                Disposition::Rejected { device, why, .. } => {
                    metrics::counter!("vitalmq_bridge_rejected_total", "class" => why.class())
                        .increment(1);
                    touched.insert(device.clone());
                }
                Disposition::Refused { reason, .. } => {
                    metrics::counter!("vitalmq_bridge_refused_total", "class" => reason.as_str())
                        .increment(1);
                }
            }
            tokens.push(token);
        }
        let receipts = touched
            .into_iter()
            .filter_map(|d| self.sequencer.receipt(&d).map(|r| (d, r)))
            .collect();
        (tokens, receipts)
    }

    /// Reads the outbox size per sink and pauses or resumes recording for it (with
    /// hysteresis: at `max_backlog` it pauses, below `resume_backlog` it resumes).
    fn watch_backlog(&mut self, st: &mut State) {
        let per_sink = match self.store.backlog_per_sink(&self.settings.sinks) {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "cannot read the outbox size");
                return;
            }
        };
        let mut backlog = 0;
        for (sink, n) in &per_sink {
            metrics::gauge!("vitalmq_bridge_backlog", "sink" => sink.clone()).set(*n as f64);
            backlog = backlog.max(*n);
        }
        if !st.backlogged && backlog >= self.settings.max_backlog.max(1) {
            st.backlogged = true;
            warn!(
                backlog,
                limit = self.settings.max_backlog,
                "outbox full; alerting goes on, messages are not recorded (devices resend them)"
            );
        } else if st.backlogged && backlog < self.settings.resume_backlog.max(1) {
            st.backlogged = false;
            info!(
                backlog,
                "outbox drained below the resume mark; recording again"
            );
        }
    }

    /// Raises the paused episode once (operational alert and audit record), and
    /// resolves both when recording resumes.
    fn report_episode(&mut self, st: &mut State) {
        let now = now_ms();
        if st.recording() {
            if let Some(a) = st.episodes.resolve(OpsKind::Store, "recording", now) {
                info!("recording resumed");
                if let Err(e) = self.auditor.record(
                    AuditRecord::new(Component::Bridge, Event::SinkRecovered)
                        .action("record")
                        .resource("store")
                        .reason("recording_resumed"),
                ) {
                    error!(error = %e, "audit log refused a record");
                }
                let _ = self.ops.send(a);
            }
            return;
        }
        let (cause, error) = match &st.store_failure {
            Some(f) => (f.cause, Some(f.error.clone())),
            None if st.audit_broken => ("audit_unwritable", None),
            None => ("backlog", None),
        };
        let mut details = Map::new();
        details.insert("cause".into(), json!(cause));
        details.insert("disk_full".into(), json!(cause == "disk_full"));
        details.insert("max_backlog".into(), json!(self.settings.max_backlog));
        if let Some(e) = &error {
            details.insert("error".into(), json!(e));
        }
        if let Some(a) = st.episodes.raise(
            OpsKind::Store,
            "recording",
            "recording_paused",
            details,
            now,
        ) {
            warn!(
                cause,
                "recording paused: alerts are evaluated and delivered without durable recording"
            );
            let mut r = AuditRecord::new(Component::Bridge, Event::SinkFailed)
                .action("record")
                .resource("store")
                .reason("recording_paused")
                .detail("cause", cause);
            if let Some(e) = error {
                r = r.detail("error", e);
            }
            if let Err(e) = self.auditor.record(r) {
                error!(error = %e, "audit log refused a record");
            }
            let _ = self.ops.send(a);
        }
    }

    /// The alert figures of the adopted state and whether the bridge records.
    fn set_gauges(&self, st: &State) {
        let g = self.sequencer.gauges();
        for (i, severity) in ["info", "review", "urgent"].into_iter().enumerate() {
            metrics::gauge!("vitalmq_bridge_open_alerts", "severity" => severity)
                .set(g.open_by_severity[i] as f64);
        }
        metrics::gauge!("vitalmq_bridge_silent_devices").set(g.silent_devices as f64);
        metrics::gauge!("vitalmq_bridge_unacknowledged_alerts").set(g.unacknowledged as f64);
        metrics::gauge!("vitalmq_bridge_oldest_unacknowledged_urgent_seconds")
            .set(g.oldest_unacknowledged_urgent_s.unwrap_or(0.0));
        let recording = st.recording();
        metrics::gauge!("vitalmq_bridge_recording").set(if recording { 1.0 } else { 0.0 });
        self.store_writable
            .store(st.store_failure.is_none(), Ordering::Release);
    }

    /// Applies the operator's pending sequence resets (`vitalmq store reset-sequence`),
    /// if another connection changed the store since the last look (always on the
    /// first batch, for requests made while the bridge was down). Each is durable
    /// before the in-memory window goes, and audited; one that fails stays pending and
    /// is retried before the next batch.
    fn apply_sequence_resets(&mut self, seen: &mut Option<i64>) {
        let version = match self.store.data_version() {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "cannot read the store's data version");
                return;
            }
        };
        // Unaudited, a reset would be an unrecorded security decision: wait.
        if *seen == Some(version) || !self.auditor.healthy() {
            return;
        }
        let pending = match self.store.pending_sequence_resets() {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot read pending sequence resets");
                return;
            }
        };
        let mut all_applied = true;
        for request in pending {
            let Ok(device) = DeviceId::new(request.device.clone()) else {
                warn!(
                    request = request.id,
                    "sequence reset for an invalid device id; ignored"
                );
                continue;
            };
            match self.store.apply_sequence_reset(request.id, now_ms()) {
                Ok(Some(applied)) => {
                    self.sequencer.reset_sequence(&device);
                    info!(device = %device, request = applied.id, previous = ?applied.previous, "sequence state reset by an operator");
                    let mut r = AuditRecord::new(Component::Bridge, Event::OperatorAction)
                        .action("sequence_reset")
                        .resource(device.as_str())
                        .decision(Decision::Allow)
                        .reason("operator_request")
                        .detail("request", applied.id)
                        .detail("requested_by", applied.requested_by.as_str())
                        .detail("requested_at_ms", applied.requested_at_ms)
                        .detail("request_reason", applied.reason.as_str());
                    if let Some(previous) = &applied.previous {
                        r = r.detail("previous", previous.as_str());
                    }
                    if let Err(e) = self.auditor.record(r) {
                        error!(error = %e, device = %device, "the sequence reset could not be audited");
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    all_applied = false;
                    error!(error = %e, request = request.id, "cannot apply a sequence reset; retrying before the next batch");
                }
            }
        }
        if all_applied {
            *seen = Some(version);
        }
    }

    /// Follows the audit log's health: while it cannot write (a full disk, say),
    /// recording pauses and acknowledgements wait, but the recorder never stops taking
    /// work, so alerts are still evaluated and delivered (`ops/bridge/audit`).
    fn watch_audit(&mut self, st: &mut State) {
        let broken = !self.auditor.healthy();
        if broken && !st.audit_broken {
            st.audit_broken = true;
        }
        if st.audit_broken {
            if let Some(a) = st.episodes.raise(
                OpsKind::Audit,
                "audit",
                "audit_unwritable",
                Map::new(),
                now_ms(),
            ) {
                error!(
                    "the audit log cannot write: recording paused, acknowledgements wait; alerting goes on"
                );
                let _ = self.ops.send(a);
            }
            if !broken {
                st.audit_broken = false;
                if let Some(a) = st.episodes.resolve(OpsKind::Audit, "audit", now_ms()) {
                    info!("the audit log writes again");
                    let _ = self.ops.send(a);
                }
            }
        }
    }

    /// Feeds this batch's refusals, replays and new gaps to the rate watches and sends
    /// the operational alerts they decide.
    fn watch_rates<T>(
        &mut self,
        dispositions: &[(Disposition, T)],
        gaps: &[(DeviceId, crate::gaps::Gap)],
        episodes: &mut Episodes,
    ) {
        let refused = dispositions
            .iter()
            .filter(|(d, _)| matches!(d, Disposition::Refused { .. }))
            .count() as u64;
        let replays = dispositions
            .iter()
            .filter(
                |(d, _)| matches!(d, Disposition::Rejected { why, .. } if why.class() == "replay"),
            )
            .count() as u64;
        let new_gaps = gaps
            .iter()
            .filter(|(_, g)| g.state == GapState::Open && g.filled == 0)
            .count() as u64;
        let now = now_ms();
        for w in &mut self.rate_watches {
            let n = match w.kind() {
                OpsKind::Refusals => refused,
                OpsKind::Replays => replays,
                OpsKind::Gaps => new_gaps,
                _ => 0,
            };
            let alert = match w.observe(n, now) {
                Some(RateChange::Raise { count }) => {
                    let mut details = Map::new();
                    details.insert("count_last_minute".into(), json!(count));
                    warn!(
                        kind = w.kind().as_str(),
                        count, "operational rate limit crossed"
                    );
                    episodes.raise(w.kind(), "rate", "rate_above_limit", details, now)
                }
                Some(RateChange::Resolve) => episodes.resolve(w.kind(), "rate", now),
                None => None,
            };
            if let Some(a) = alert {
                let _ = self.ops.send(a);
            }
        }
    }

    /// One audit record per alert state change, with the policy that decided it.
    fn audit_alerts(&self, alerts: &[crate::store::NewAlert]) -> bool {
        let policy = self.sequencer.rules().map(|r| r.sha256().to_owned());
        let mut ok = true;
        for a in alerts {
            let mut r = AuditRecord::new(Component::Bridge, Event::AlertStateChanged)
                .action("alert")
                .resource(a.alert_id.clone())
                .reason(a.state.clone())
                .detail("kind", a.kind.as_str())
                .detail("topic", a.topic.as_str())
                .detail("device", a.device.clone().unwrap_or_default());
            if let Some(rule) = &a.rule {
                r = r.rule(rule.clone());
            }
            if let Some(p) = &policy {
                r = r.policy_sha256(p.clone());
            }
            if let Err(e) = self.auditor.record(r) {
                error!(error = %e, "audit log refused a record");
                ok = false;
            }
        }
        ok
    }

    /// One audit record per refused, rejected message and gap change. False when the
    /// audit log refused a record.
    fn audit<T>(
        &self,
        dispositions: &[(Disposition, T)],
        gaps: &[(DeviceId, crate::gaps::Gap)],
    ) -> bool {
        let mut ok = true;
        let mut write = |r: AuditRecord| {
            if let Err(e) = self.auditor.record(r) {
                error!(error = %e, "audit log refused a record");
                ok = false;
            }
        };
        for (d, _) in dispositions {
            match d {
                Disposition::Accepted { .. } => {}
                Disposition::Rejected {
                    device,
                    epoch,
                    seq,
                    why,
                } => write(
                    AuditRecord::new(
                        Component::Bridge,
                        if why.class() == "replay" {
                            Event::Replay
                        } else {
                            Event::MessageRefused
                        },
                    )
                    .action("sequence")
                    .resource(device.to_string())
                    .decision(Decision::Deny)
                    .reason(why.class())
                    .detail("detail", why.detail())
                    .detail("epoch", *epoch)
                    .detail("seq", *seq),
                ),
                Disposition::Refused {
                    device,
                    reason,
                    detail,
                    sha256_hex,
                } => write(
                    AuditRecord::new(Component::Bridge, Event::MessageRefused)
                        .action("verify")
                        .resource(
                            device
                                .as_ref()
                                .map_or_else(|| "unknown".to_owned(), ToString::to_string),
                        )
                        .decision(Decision::Deny)
                        .reason(reason.as_str())
                        .detail("detail", detail.as_str())
                        .detail("raw_sha256", sha256_hex.as_str()),
                ),
            }
        }
        for (device, g) in gaps {
            if g.state == GapState::Open && g.filled > 0 {
                continue; // a partial fill is not news; opening, closing and losing are
            }
            write(
                AuditRecord::new(Component::Bridge, Event::Gap)
                    .action("sequence")
                    .resource(device.to_string())
                    .reason(g.state.as_str())
                    .detail("epoch", g.epoch)
                    .detail("first", g.first)
                    .detail("last", g.last)
                    .detail("missing", g.missing())
                    .detail("unfilled", g.unfilled()),
            );
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(id: &str, state: &str) -> NewAlert {
        NewAlert {
            alert_id: id.into(),
            state: state.into(),
            kind: "clinical".into(),
            topic: "alerts/site-01/review/dev-00001".into(),
            device: Some("dev-00001".into()),
            rule: Some("spo2-low".into()),
            created_at_ms: 1,
            body: format!("{{\"alert_id\":\"{id}\",\"state\":\"{state}\"}}"),
            level: 0,
        }
    }

    fn device(id: &str) -> DeviceId {
        DeviceId::new(id).expect("id")
    }

    /// Rows kept while the store refused them go in front of the next commit's own, in
    /// order; a device's newer state wins; a failed commit gives everything back, in
    /// the same order, for the next attempt.
    #[test]
    fn unrecorded_alerts_keep_their_order_across_failed_commits() {
        let mut kept = Unrecorded::default();
        let mut first = Commit {
            alerts: vec![alert("a", "open")],
            alert_states: vec![(device("dev-00001"), "old".into())],
            ..Commit::default()
        };
        kept.merge_into(&mut first);
        assert_eq!(kept.take_back(&mut first), Overflow::default());
        let mut next = Commit {
            alerts: vec![alert("a", "escalated"), alert("b", "open")],
            alert_states: vec![(device("dev-00001"), "new".into())],
            ..Commit::default()
        };
        kept.merge_into(&mut next);
        let order: Vec<(&str, &str)> = next
            .alerts
            .iter()
            .map(|a| (a.alert_id.as_str(), a.state.as_str()))
            .collect();
        assert_eq!(order, [("a", "open"), ("a", "escalated"), ("b", "open")]);
        assert_eq!(next.alert_states, [(device("dev-00001"), "new".to_owned())]);
        assert!(kept.alerts.is_empty() && kept.states.is_empty());
        assert_eq!(kept.take_back(&mut next), Overflow::default());
        assert_eq!(kept.alerts.len(), 3);
        assert_eq!(kept.states[&device("dev-00001")], "new");
        assert!(next.alerts.is_empty() && next.alert_states.is_empty());
    }

    /// The scores and patients' scoring states of an unrecorded batch are kept with
    /// its alert rows (an alert names its score) and written with them.
    #[test]
    fn unrecorded_scores_are_kept_with_the_alerts_they_explain() {
        let score = |id: &str| crate::score::NewScore {
            score_id: id.into(),
            patient_ref: "pt-a".into(),
            site: "site-01".into(),
            device: "dev-00001".into(),
            model: "news2".into(),
            version: "v1".into(),
            config_sha256: String::new(),
            role: "live".into(),
            observed_at_ms: 1,
            created_at_ms: 1,
            payload: "{}".into(),
        };
        let mut kept = Unrecorded::default();
        let mut first = Commit {
            alerts: vec![alert("a", "open")],
            scores: vec![score("sc-1")],
            patient_states: vec![("pt-a".into(), "old".into())],
            ..Commit::default()
        };
        let mut part = first.take_alert_part();
        assert!(first.scores.is_empty() && first.patient_states.is_empty());
        assert!(!is_empty(&part));
        kept.merge_into(&mut part);
        assert_eq!(kept.take_back(&mut part), Overflow::default());
        let mut next = Commit {
            scores: vec![score("sc-2")],
            patient_states: vec![("pt-a".into(), "new".into())],
            ..Commit::default()
        };
        kept.merge_into(&mut next);
        let ids: Vec<&str> = next.scores.iter().map(|s| s.score_id.as_str()).collect();
        assert_eq!(ids, ["sc-1", "sc-2"]);
        assert_eq!(next.patient_states, [("pt-a".to_owned(), "new".to_owned())]);

        // Beyond the cap the oldest score rows go, named for the metric and the audit.
        assert_eq!(kept.take_back(&mut next), Overflow::default());
        let mut over = Commit {
            scores: (0..PENDING_ALERTS_MAX)
                .map(|i| score(&format!("sc-x{i}")))
                .collect(),
            ..Commit::default()
        };
        let dropped = kept.take_back(&mut over);
        assert_eq!(dropped.scores, ["sc-1", "sc-2"]);
        assert!(dropped.alerts.is_empty());
        assert_eq!(kept.scores.len(), PENDING_ALERTS_MAX);
        let records = dropped.records();
        assert_eq!(records.len(), 1);
        let r = serde_json::to_value(&records[0]).expect("json");
        assert_eq!(r["reason"], "unrecorded_overflow");
        assert_eq!(r["resource"], "score");
        assert_eq!(r["details"]["count"], 2);
        assert_eq!(r["details"]["first_id"], "sc-1");
        assert_eq!(r["details"]["last_id"], "sc-2");
    }

    /// A batch with shadow changes and no delivered alert, while the store fails: its
    /// shadow rows are kept (the engine states that made them are adopted, a resend
    /// does not make them again), written in order with the next commit, counted when
    /// the cap drops the oldest.
    #[test]
    fn unrecorded_shadow_alerts_are_kept_until_the_store_takes_them() {
        let shadow = |id: &str| crate::store::NewShadowAlert {
            change_id: id.into(),
            alert_id: "al-1".into(),
            patient_ref: "pt-a".into(),
            site: "site-01".into(),
            device: "dev-00001".into(),
            model: "rules".into(),
            version: "b1".into(),
            config_sha256: String::new(),
            role: "shadow".into(),
            rule: "spo2-low".into(),
            state: "open".into(),
            severity: "high".into(),
            at_ms: 1,
            created_at_ms: 1,
            payload: "{}".into(),
        };
        let mut kept = Unrecorded::default();
        let mut first = Commit {
            shadow_alerts: vec![shadow("sa-1")],
            alert_states: vec![(device("dev-00001"), "old".into())],
            ..Commit::default()
        };
        let mut part = first.take_alert_part();
        assert!(first.shadow_alerts.is_empty());
        part.alert_states.clear();
        assert!(!is_empty(&part), "shadow rows alone are worth a commit");
        kept.merge_into(&mut part);
        assert_eq!(kept.take_back(&mut part), Overflow::default());
        assert_eq!(kept.shadow_alerts.len(), 1);
        let mut next = Commit {
            shadow_alerts: vec![shadow("sa-2")],
            ..Commit::default()
        };
        kept.merge_into(&mut next);
        let ids: Vec<&str> = next
            .shadow_alerts
            .iter()
            .map(|s| s.change_id.as_str())
            .collect();
        assert_eq!(ids, ["sa-1", "sa-2"]);
        assert!(kept.shadow_alerts.is_empty());

        assert_eq!(kept.take_back(&mut next), Overflow::default());
        let mut over = Commit {
            shadow_alerts: (0..PENDING_ALERTS_MAX)
                .map(|i| shadow(&format!("sa-x{i}")))
                .collect(),
            ..Commit::default()
        };
        let dropped = kept.take_back(&mut over);
        assert_eq!(dropped.shadow_alerts, ["sa-1", "sa-2"]);
        assert_eq!(kept.shadow_alerts.len(), PENDING_ALERTS_MAX);
        let records = dropped.records();
        assert_eq!(records.len(), 1);
        let r = serde_json::to_value(&records[0]).expect("json");
        assert_eq!(r["resource"], "shadow_alert");
        assert_eq!(r["details"]["count"], 2);
    }

    /// While the audit log cannot write, acknowledgements wait (an ack is applied only
    /// with its audit record) and come back in order once it writes; every other
    /// control input, ticks and presence, goes on at once.
    #[test]
    fn acknowledgements_wait_for_a_writable_audit_log_and_nothing_else_does() {
        let ack = |n: u8| Control::Ack {
            topic: "alerts/site-01/ack/int-site-01".into(),
            payload: bytes::Bytes::from(vec![n]),
            received_at_ms: 1,
        };
        let mut d: DeferredAcks<u8> = DeferredAcks::default();
        assert!(
            d.defer(false, ack(0), Some(0)).is_some(),
            "healthy: at once"
        );
        assert!(d.defer(true, ack(1), Some(1)).is_none());
        assert!(d.defer(true, ack(2), Some(2)).is_none());
        assert!(
            d.defer(true, Control::Tick { now_ms: 5 }, None).is_some(),
            "ticks keep silence and re-escalation going"
        );
        assert!(d.release(true).is_empty(), "still broken");
        let back: Vec<Option<u8>> = d.release(false).into_iter().map(|(_, t)| t).collect();
        assert_eq!(back, [Some(1), Some(2)]);
        assert!(d.release(false).is_empty());
        for n in 0..=DEFERRED_ACKS_MAX {
            let _ = d.defer(true, ack(3), Some(u8::try_from(n % 200).expect("small")));
        }
        assert_eq!(d.waiting.len(), DEFERRED_ACKS_MAX, "bounded");
    }

    #[test]
    fn only_a_commit_with_messages_probes_a_failing_store() {
        let mut c = Commit::default();
        assert!(is_empty(&c) && !carries_messages(&c));
        c.alerts.push(alert("a", "open"));
        assert!(!is_empty(&c) && !carries_messages(&c));
        c.counters.push(("dev-00001".into(), "duplicate", 1));
        assert!(carries_messages(&c));
    }
}
