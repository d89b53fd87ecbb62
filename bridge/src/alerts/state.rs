//! The durable alert state of one device: what the engine must remember between samples,
//! and nothing more.
//!
//! The bridge stores it (serde; JSON is fine) and hands it back to
//! [`evaluate`](super::evaluate) with the device's next sample. Invariants:
//! - bounded: per rule one [`Pending`] run, at most one open [`Episode`], one resolve run,
//!   one change window and one baseline; every evidence list holds at most
//!   [`EVIDENCE_CAP`] event ids (the newest); rules that left the rule set are removed;
//! - an episode exists only between its `open` and `resolved` messages;
//! - while an episode is open the pending run is empty (persistence starts afresh after
//!   resolution), and a resolve run exists only while an episode is open;
//! - fields added later must carry `#[serde(default)]`, so stored states stay readable.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vitalmq_policies::{Persist, Severity};

use super::measure::{Baseline, ChangeWindow};
use super::message::{AlertState, SuppressedCounts, SuppressionReason};

/// Most event ids kept as evidence per run.
pub const EVIDENCE_CAP: usize = 10;

/// Everything the engine remembers about one device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceAlertState {
    /// The state of the rule-set version that delivers for the device (flattened: a
    /// state stored before rule-set versions existed reads as this one).
    #[serde(flatten)]
    pub(crate) engine: EngineState,
    /// The rule-set version [`Self::engine`] belongs to and its role when it last
    /// evaluated; `None` before candidates were configured (the base rule set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) engine_version: Option<EngineVersion>,
    /// The engine states of the rule-set versions that run in shadow for the device,
    /// by version (only versions loaded and with a role for the device).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) shadows: BTreeMap<String, ShadowEngine>,
    /// Acknowledgement and re-escalation of the open clinical alerts (issue 17).
    #[serde(default)]
    pub(crate) book: super::book::Book,
    /// Open device alarms by code.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub(crate) alarms: super::alarm::Alarms,
    #[serde(default)]
    pub(crate) silence: super::silence::SilenceState,
    #[serde(default)]
    pub(crate) status: super::status::StatusState,
    /// The `(epoch, seq)` the engine has evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) evaluated: Option<super::evaluated::Evaluated>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What [`evaluate`](super::evaluate) reads and writes: the state of ONE rule-set
/// version for one device (issue 21: a device holds one per version that runs for it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineState {
    /// Newest device-clock time evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) newest_ts_ms: Option<u64>,
    /// Readings older than the newest, not evaluated.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) late_ignored: u64,
    /// By rule id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) rules: BTreeMap<String, RuleState>,
    #[serde(default)]
    pub(crate) quality: QualityState,
    /// Implausible readings and the device's sensor-fault alert.
    #[serde(default, skip_serializing_if = "SensorState::is_quiet")]
    pub(crate) sensor: SensorState,
}

/// The engine state of one shadow version, with the names its shadow rows carry, so
/// its would-be episodes can be closed when it stops running for the device even if
/// its file is no longer loaded (or the bridge runs without candidates).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowEngine {
    #[serde(flatten)]
    pub(crate) engine: EngineState,
    /// The rule set's registry name; empty in a state stored before it was kept.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) model: String,
    /// The version's file digest; empty in a state stored before it was kept.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) policy_sha256: String,
}

impl std::ops::Deref for ShadowEngine {
    type Target = EngineState;
    fn deref(&self) -> &EngineState {
        &self.engine
    }
}

impl std::ops::DerefMut for ShadowEngine {
    fn deref_mut(&mut self) -> &mut EngineState {
        &mut self.engine
    }
}

/// A rule-set version and the role it had for the device when it last evaluated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineVersion {
    pub(crate) version: String,
    pub(crate) role: vitalmq_policies::ModelRole,
    /// The digest of the rule set it delivered under: what its resolutions name when
    /// it stops delivering, even if it is no longer loaded then.
    #[serde(default)]
    pub(crate) policy_sha256: String,
    /// The scope it delivered for: the device's site and its cohorts in the base rule
    /// set, so a hand-over can tell a canary taken back from a device that left the
    /// canary's scope (empty in a state stored before it was kept).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) site: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) cohorts: Vec<String>,
}

/// An open alert, for status pages and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenAlert<'a> {
    /// The rule id, or `ops/signal_quality` / `ops/sensor_fault` for the operational ones.
    pub rule: &'a str,
    pub alert_id: &'a str,
    pub state: AlertState,
    pub opened_at_ms: u64,
    pub suppressed: u64,
}

impl DeviceAlertState {
    pub fn new() -> Self {
        Self::default()
    }

    /// The newest device-clock time evaluated.
    pub fn newest_ts_ms(&self) -> Option<u64> {
        self.engine.newest_ts_ms
    }

    /// Readings that arrived older than the newest one and were not evaluated.
    pub fn late_ignored(&self) -> u64 {
        self.engine.late_ignored
    }

    /// The device's open alerts, clinical ones by rule id, then the operational one.
    pub fn open_alerts(&self) -> impl Iterator<Item = OpenAlert<'_>> {
        self.engine.open_alerts()
    }
}

impl EngineState {
    /// The open alerts of this version, clinical ones by rule id, then the operational
    /// ones.
    pub fn open_alerts(&self) -> impl Iterator<Item = OpenAlert<'_>> {
        self.rules
            .iter()
            .filter_map(|(rule, r)| {
                r.episode.as_ref().map(|e| OpenAlert {
                    rule,
                    alert_id: &e.alert_id,
                    state: e.state,
                    opened_at_ms: e.opened_at_ms,
                    suppressed: e.suppressed.total(),
                })
            })
            .chain(self.quality.open.as_ref().map(|o| OpenAlert {
                rule: super::engine::SIGNAL_QUALITY_RULE,
                alert_id: &o.alert_id,
                state: AlertState::Open,
                opened_at_ms: o.opened_at_ms,
                suppressed: 0,
            }))
            .chain(self.sensor.open.as_ref().map(|o| OpenAlert {
                rule: super::engine::SENSOR_FAULT_RULE,
                alert_id: &o.alert_id,
                state: AlertState::Open,
                opened_at_ms: o.opened_at_ms,
                suppressed: self.sensor.implausible.saturating_sub(1),
            }))
    }
}

/// The state of one rule for one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RuleState {
    /// `kind:metric:direction` when built; a different one means the rule changed.
    pub(crate) signature: String,
    #[serde(default, skip_serializing_if = "Pending::is_empty")]
    pub(crate) pending: Pending,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) episode: Option<Episode>,
    /// Readings past the resolve threshold, while an episode is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) resolving: Option<Run>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) change: Option<ChangeWindow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) baseline: Option<Baseline>,
}

impl RuleState {
    pub(crate) fn new(signature: String) -> Self {
        Self {
            signature,
            pending: Pending::default(),
            episode: None,
            resolving: None,
            change: None,
            baseline: None,
        }
    }

    /// After a device clock reset: every run and window starts afresh; an open episode
    /// stays open, its escalation clock restarting at `ts_ms`.
    pub(crate) fn restart_clock(&mut self, ts_ms: u64) {
        self.pending = Pending::default();
        self.resolving = None;
        self.change = None;
        self.baseline = None;
        if let Some(e) = &mut self.episode {
            e.opened_at_ms = ts_ms;
        }
    }
}

/// Consecutive readings that support one conclusion (trigger or resolve).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Run {
    /// Device time of the first reading of the run.
    pub(crate) since_ms: u64,
    /// The newest [`EVIDENCE_CAP`] event ids of the run.
    pub(crate) evidence: Vec<String>,
}

impl Run {
    pub(crate) fn new(since_ms: u64) -> Self {
        Self {
            since_ms,
            evidence: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, event_id: &str) {
        push_bounded(&mut self.evidence, event_id);
    }
}

/// Adds an event id, dropping the oldest beyond [`EVIDENCE_CAP`].
pub(crate) fn push_bounded(evidence: &mut Vec<String>, event_id: &str) {
    if evidence.len() >= EVIDENCE_CAP {
        let excess = evidence.len() + 1 - EVIDENCE_CAP;
        evidence.drain(..excess);
    }
    evidence.push(event_id.to_owned());
}

/// Progress toward opening an alert.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Pending {
    /// `persist = { k, n }`: one bit per reading, newest in bit 0, `n` bits.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) bits: u64,
    /// The trigger-true readings since the trigger last stopped holding (`seconds`,
    /// immediate) or since the `k`-of-`n` ring last held none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) run: Option<Run>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.bits == 0 && self.run.is_none()
    }

    /// Records one reading; true when the trigger has persisted long enough to open.
    pub(crate) fn observe(
        &mut self,
        persist: Persist,
        triggered: bool,
        ts_ms: u64,
        event_id: &str,
    ) -> bool {
        if triggered {
            self.run
                .get_or_insert_with(|| Run::new(ts_ms))
                .push(event_id);
        }
        match persist {
            Persist::Immediate => {
                if !triggered {
                    self.run = None;
                }
                triggered
            }
            Persist::Seconds(s) => {
                if !triggered {
                    self.run = None;
                    return false;
                }
                self.run
                    .as_ref()
                    .is_some_and(|r| ts_ms.saturating_sub(r.since_ms) >= s.saturating_mul(1000))
            }
            Persist::KOfN { k, n } => {
                let mask = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
                self.bits = ((self.bits << 1) | u64::from(triggered)) & mask;
                if self.bits == 0 {
                    self.run = None;
                }
                triggered && self.bits.count_ones() >= u32::from(k)
            }
        }
    }
}

/// An open alert episode of one rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Episode {
    pub(crate) alert_id: String,
    /// `Open` or `Escalated`.
    pub(crate) state: AlertState,
    /// As last sent.
    pub(crate) severity: Severity,
    pub(crate) rule_version: String,
    pub(crate) metric: String,
    /// The trigger threshold it opened at.
    pub(crate) threshold: f64,
    pub(crate) opened_at_ms: u64,
    /// The readings that opened it, then the newest trigger-true readings while open.
    pub(crate) evidence: Vec<String>,
    #[serde(default)]
    pub(crate) suppressed: Suppressed,
}

/// Repeats of an open alert that were not sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Suppressed {
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) already_open: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) already_escalated: u64,
    /// Reason of the newest suppression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) last: Option<SuppressionReason>,
}

impl Suppressed {
    pub(crate) fn count(&mut self, reason: SuppressionReason) {
        match reason {
            SuppressionReason::AlreadyOpen => {
                self.already_open = self.already_open.saturating_add(1);
            }
            SuppressionReason::AlreadyEscalated => {
                self.already_escalated = self.already_escalated.saturating_add(1);
            }
        }
        self.last = Some(reason);
    }

    pub(crate) fn total(&self) -> u64 {
        self.already_open.saturating_add(self.already_escalated)
    }

    pub(crate) fn counts(&self) -> SuppressedCounts {
        SuppressedCounts {
            already_open: self.already_open,
            already_escalated: self.already_escalated,
            last: self.last,
        }
    }
}

/// The signal-quality ring of a device and its operational alert.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct QualityState {
    /// One bit per reading (1 = low quality), newest in bit 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) bits: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) open: Option<OpsEpisode>,
}

/// Implausible readings of a device (values outside the physiological limits) and its
/// sensor-fault alert.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct SensorState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) open: Option<OpsEpisode>,
    /// Implausible readings during the open episode.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) implausible: u64,
    /// Readings in a row without an implausible value, while the episode is open.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) clean_run: u64,
    /// Metrics found implausible during the open episode, at most the reading's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) metrics: Vec<String>,
}

impl SensorState {
    fn is_quiet(&self) -> bool {
        self.open.is_none()
    }
}

/// An open operational alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct OpsEpisode {
    pub(crate) alert_id: String,
    pub(crate) opened_at_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evidence_keeps_the_newest_ids() {
        let mut run = Run::new(0);
        for i in 0..25 {
            run.push(&format!("ev-{i}"));
        }
        assert_eq!(run.evidence.len(), EVIDENCE_CAP);
        assert_eq!(run.evidence.first().map(String::as_str), Some("ev-15"));
        assert_eq!(run.evidence.last().map(String::as_str), Some("ev-24"));
    }

    #[test]
    fn persistence_by_time_by_count_and_immediate() {
        let mut p = Pending::default();
        let secs = Persist::Seconds(30);
        assert!(!p.observe(secs, true, 0, "a"));
        assert!(!p.observe(secs, true, 29_999, "b"));
        assert!(p.observe(secs, true, 30_000, "c"));
        assert!(!p.observe(secs, false, 31_000, "d"));
        assert!(
            p.run.is_none(),
            "a reading without the trigger breaks the run"
        );
        assert!(!p.observe(secs, true, 40_000, "e"));

        let mut p = Pending::default();
        let kn = Persist::KOfN { k: 3, n: 5 };
        let seen: Vec<bool> = [
            true, false, true, false, false, false, true, true, false, true,
        ]
        .iter()
        .enumerate()
        .map(|(i, t)| p.observe(kn, *t, i as u64, "x"))
        .collect();
        // 3 of the last 5 first at the 10th reading (positions 6, 7, 9).
        assert_eq!(seen.iter().filter(|s| **s).count(), 1);
        assert!(seen[9]);

        let mut p = Pending::default();
        let wide = Persist::KOfN { k: 64, n: 64 };
        let opened = (0..64)
            .map(|i| p.observe(wide, true, i, "x"))
            .filter(|o| *o)
            .count();
        assert_eq!(opened, 1);

        let mut p = Pending::default();
        assert!(p.observe(Persist::Immediate, true, 0, "x"));
        assert!(!p.observe(Persist::Immediate, false, 1, "y"));
        assert!(p.is_empty());
    }

    #[test]
    fn suppression_is_counted_per_reason() {
        let mut s = Suppressed::default();
        s.count(SuppressionReason::AlreadyOpen);
        s.count(SuppressionReason::AlreadyOpen);
        s.count(SuppressionReason::AlreadyEscalated);
        assert_eq!(s.total(), 3);
        assert_eq!(s.counts().last, Some(SuppressionReason::AlreadyEscalated));
    }
}
