//! The recorder thread: sequences verified batches, commits each in one transaction,
//! audits what was refused, and only then hands the acknowledgements and receipts back.
//!
//! Order per batch, and why: (1) wait while the outbox is over `max_backlog`, so the
//! broker keeps what we cannot store yet; (2) commit, retrying while the disk is full,
//! never acknowledging what is not durable; (3) adopt the staged window state; (4)
//! audit refusals, replays and gaps; (5) acknowledge to the broker and compute receipts.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, json};
use tokio::sync::{Notify, mpsc, watch};
use tracing::{error, info, warn};
use vitalmq_audit::{AuditRecord, Auditor, Component, Decision, Event};
use vitalmq_envelope::DeviceId;
use vitalmq_policies::{DeviceRegistry, RuleSet};

use crate::classify::{Checked, Disposition, Origin, Sequencer};
use crate::gaps::GapState;
use crate::ops::{Episodes, OpsAlert, OpsKind, RateChange, RateWatch};
use crate::store::{Store, StoreError};
use crate::window::{Accepted, ReceiptPoint};

/// What the recorder hands back after a durable commit.
#[derive(Debug)]
pub struct Recorded<T> {
    /// Acknowledge these to the broker.
    pub tokens: Vec<T>,
    /// Current receipt point of every device the batch touched.
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
    pub origin: Origin,
    pub auditor: Auditor,
    pub settings: RecorderSettings,
    pub ops: mpsc::UnboundedSender<OpsAlert>,
    /// Reloaded alert rules, when the alert engine runs.
    pub rules: Option<watch::Receiver<Arc<RuleSet>>>,
    /// One per alert handler: woken after a commit that recorded alerts.
    pub alert_wakers: Vec<Arc<Notify>>,
    /// Rates that raise operational alerts (refusals, replays, gaps).
    pub rate_watches: Vec<RateWatch>,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Recorder {
    /// Runs until `batches` closes.
    pub fn run<T: Send>(
        mut self,
        mut batches: mpsc::Receiver<Vec<Checked<T>>>,
        done: mpsc::UnboundedSender<Recorded<T>>,
    ) {
        let mut episodes = Episodes::default();
        let mut paused = false;
        let mut stats = CommitStats::default();
        let mut data_version = None;
        while let Some(batch) = batches.blocking_recv() {
            self.hold_while_backlogged(&mut episodes, &mut paused);
            self.apply_sequence_resets(&mut data_version);
            if let Some(rules) = &mut self.rules
                && rules.has_changed().unwrap_or(false)
            {
                let fresh = Arc::clone(&rules.borrow_and_update());
                self.sequencer.set_rules(Some(fresh));
            }
            let mut sequenced =
                self.sequencer
                    .sequence(&self.registry, &self.origin, batch, now_ms());
            let mut delay = Duration::from_millis(100);
            loop {
                let started = std::time::Instant::now();
                match self.store.commit(&sequenced.commit) {
                    Ok(()) => {
                        crate::observe::commit_duration(started.elapsed());
                        stats.add(sequenced.dispositions.len(), started.elapsed());
                        if let Some(a) = episodes.resolve(OpsKind::Store, "store", now_ms()) {
                            info!(store = %self.store.path().display(), "store writable again");
                            let _ = self.ops.send(a);
                        }
                        break;
                    }
                    Err(e) => {
                        let full = matches!(e, StoreError::Full { .. });
                        error!(error = %e, disk_full = full, "cannot record batch; not acknowledging, will retry");
                        let mut details = Map::new();
                        details.insert("disk_full".into(), json!(full));
                        details.insert("error".into(), json!(e.to_string()));
                        if let Some(a) = episodes.raise(
                            OpsKind::Store,
                            "store",
                            if full { "disk_full" } else { "store_error" },
                            details,
                            now_ms(),
                        ) {
                            let _ = self.ops.send(a);
                        }
                        std::thread::sleep(delay);
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
            self.sequencer.adopt(&mut sequenced);
            if !sequenced.commit.alerts.is_empty() {
                for waker in &self.alert_wakers {
                    waker.notify_one();
                }
            }
            let audited = self.audit(&sequenced.dispositions, &sequenced.commit.gaps)
                & self.audit_alerts(&sequenced.commit.alerts);
            self.watch_rates(
                &sequenced.dispositions,
                &sequenced.commit.gaps,
                &mut episodes,
            );
            let mut touched = BTreeSet::new();
            let mut tokens = Vec::with_capacity(sequenced.dispositions.len());
            for (d, token) in sequenced.dispositions {
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
            if done.send(Recorded { tokens, receipts }).is_err() {
                break;
            }
            if !audited {
                self.hold_while_audit_broken(&mut episodes);
            }
        }
        stats.report();
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

    /// Blocks while the outbox is over its limit (with hysteresis).
    fn hold_while_backlogged(&mut self, episodes: &mut Episodes, paused: &mut bool) {
        loop {
            let backlog = match self.store.backlog(&self.settings.sinks) {
                Ok(b) => b,
                Err(e) => {
                    warn!(error = %e, "cannot read the outbox size");
                    return;
                }
            };
            metrics::gauge!("vitalmq_bridge_backlog").set(backlog as f64);
            let limit = if *paused {
                self.settings.resume_backlog
            } else {
                self.settings.max_backlog
            };
            if backlog < limit.max(1) {
                if *paused {
                    *paused = false;
                    info!(
                        backlog,
                        "outbox drained below the resume mark; acknowledging again"
                    );
                    if let Some(a) = episodes.resolve(OpsKind::Backlog, "outbox", now_ms()) {
                        let _ = self.ops.send(a);
                    }
                }
                return;
            }
            if !*paused {
                *paused = true;
                warn!(
                    backlog,
                    limit = self.settings.max_backlog,
                    "outbox full; not acknowledging new messages"
                );
                let mut details = Map::new();
                details.insert("backlog".into(), json!(backlog));
                details.insert("max_backlog".into(), json!(self.settings.max_backlog));
                if let Some(a) = episodes.raise(
                    OpsKind::Backlog,
                    "outbox",
                    "backlog_high_water",
                    details,
                    now_ms(),
                ) {
                    let _ = self.ops.send(a);
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Takes no new work until the audit log is writable again.
    fn hold_while_audit_broken(&mut self, episodes: &mut Episodes) {
        if let Some(a) = episodes.raise(
            OpsKind::Audit,
            "audit",
            "audit_unwritable",
            Map::new(),
            now_ms(),
        ) {
            let _ = self.ops.send(a);
        }
        while !self.auditor.healthy() {
            std::thread::sleep(Duration::from_millis(500));
        }
        if let Some(a) = episodes.resolve(OpsKind::Audit, "audit", now_ms()) {
            let _ = self.ops.send(a);
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
