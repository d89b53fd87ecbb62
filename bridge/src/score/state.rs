//! Per-patient scoring state, the seam between readings and scores.
//!
//! One [`PatientScoreState`] per patient, whatever devices feed it: the latest reading
//! of every metric a score table reads, and each version's open score alert episode.
//! Stored as JSON in `patient_score_state` (keyed by `patient_ref`) in the commit of
//! the readings that changed it, and loaded at start.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The latest reading of one metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    pub value: f64,
    pub event_id: String,
    /// The time the bridge relies on for the reading (ms since the Unix epoch), never
    /// after the bridge's clock when it was scored (a device clock ahead is bounded).
    pub observed_at_ms: u64,
    pub device: String,
}

/// The open score alert of one version (or, for a shadow version, the one it would
/// have open).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Episode {
    /// `news2-medium` or `news2-high`.
    pub rule: String,
    pub alert_id: String,
    /// The device whose reading opened it: its alert book acknowledges and escalates it.
    pub device: String,
    pub opened_at_ms: u64,
    /// The version's role when the episode opened (`live`, `canary`, `shadow`): whether
    /// its alert was delivered. Absent in states stored before rollouts: taken as
    /// unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The scope it opened for: the reading's site and the patient's cohorts, so a
    /// hand-over can tell a canary taken back from a patient that left the canary's
    /// scope (empty in states stored before it was kept).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub site: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cohorts: Vec<String>,
}

/// Everything scoring remembers about one patient.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PatientScoreState {
    /// By metric (`m` key).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub latest: BTreeMap<String, Reading>,
    /// By score table version.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub episodes: BTreeMap<String, Episode>,
}

impl PatientScoreState {
    /// Takes the reading's values of `metrics` unless a newer reading of the metric is
    /// already held (a late reading never replaces a newer one). Says whether anything
    /// changed.
    pub fn observe<'a>(
        &mut self,
        values: impl IntoIterator<Item = (&'a str, f64)>,
        event_id: &str,
        observed_at_ms: u64,
        device: &str,
    ) -> bool {
        let mut changed = false;
        for (metric, value) in values {
            if !value.is_finite() {
                continue;
            }
            if self
                .latest
                .get(metric)
                .is_some_and(|r| r.observed_at_ms > observed_at_ms)
            {
                continue;
            }
            self.latest.insert(
                metric.to_owned(),
                Reading {
                    value,
                    event_id: event_id.to_owned(),
                    observed_at_ms,
                    device: device.to_owned(),
                },
            );
            changed = true;
        }
        changed
    }

    /// The newest observed time held: the instant the patient is scored at (bounded by
    /// the bridge's clock, see `engine::on_vitals`).
    pub fn newest_ms(&self) -> Option<u64> {
        self.latest.values().map(|r| r.observed_at_ms).max()
    }

    /// The value and observed time of a metric, for `ScoreTable::inputs_at`.
    pub fn value(&self, metric: &str) -> Option<(f64, u64)> {
        self.latest.get(metric).map(|r| (r.value, r.observed_at_ms))
    }
}
