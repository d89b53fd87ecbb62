//! The alert engine (issue 5, SPEC section 5): turns one device's accepted vitals into
//! clinical and operational alert messages, without I/O.
//!
//! [`evaluate`] is a pure function of the [`RuleSet`](vitalmq_policies::RuleSet), the
//! hash of the policy in force, ONE device's [`DeviceAlertState`] and one [`Sample`].
//! It reads no clock: every time window is measured on the device clock (`ts_ms`). The
//! bridge stages a copy of the device's state, evaluates the batch on it, and adopts the
//! copy (and publishes the changes) only after the store committed it, exactly as it
//! does with the sequence window.
//!
//! Per rule, an alert is an episode `quiet -> open -> escalated -> resolved`; each step
//! is one [`AlertChange`] with the same deterministic `alert_id`
//! ([`alert_id`](message::alert_id)). Readings that meet the trigger while the episode is open are
//! not sent again; they are counted in the state (`suppressed`, with the reason) and the
//! counts go out with the resolution.
//!
//! Invariants:
//! - the same rule set, state and sample always give the same changes and the same new
//!   state, and a state that went through serde gives the same as one that did not;
//! - the state of a device is bounded whatever the input: per rule at most
//!   [`EVIDENCE_CAP`](state::EVIDENCE_CAP) event ids per run,
//!   [`CHANGE_BUCKETS`](measure::CHANGE_BUCKETS)` + 1`
//!   buckets, one moving average and a 64-bit ring; rules no longer in the rule set are
//!   dropped from it;
//! - `evaluate` never panics, whatever the numbers (NaN and infinite readings are
//!   ignored, times use saturating arithmetic).
//!
//! Decisions, documented once here:
//! - A value outside its metric's physiological limits (`[plausibility]`) is invisible
//!   to every clinical rule and counts toward the device's `sensor_fault` operational
//!   alert, which opens at the first one and resolves after `resolve_after` readings in
//!   a row without one. A reading dated outside `[clock]` is evaluated at its reception
//!   time (see `crate::plausible`).
//! - Readings with `q` below a rule's `min_quality` are invisible to that rule. Readings
//!   without `q` are good; with a non-finite `q`, low.
//! - A reading older than the newest one evaluated for the device is ignored (counted in
//!   [`DeviceAlertState::late_ignored`]) unless it is more than
//!   [`CLOCK_RESET_MS`](engine::CLOCK_RESET_MS) older: then the device clock was reset, and every run,
//!   window and baseline starts afresh while open alerts stay open (their escalation
//!   clock restarts).
//! - Persistence is judged on the readings received: a gap in readings does not break a
//!   run, only a (good) reading that does not meet the trigger does. A device that
//!   reports rarely must not be kept from alerting by its own sampling interval.
//! - A rule removed from the rule set (or whose metric, kind or direction changed) has
//!   its open alert resolved with reason `rule_removed` (`rule_changed`) at the device's
//!   next sample, so no subscriber keeps an alert nobody will ever resolve.

//!
//! Issue 17 adds the alerts no reading raises, and what happens after an alert is sent,
//! all in the same [`DeviceAlertState`] (serde, fields `#[serde(default)]`) and all pure,
//! on the bridge's clock (`now_ms` given explicitly):
//! - `book`: acknowledgement and re-escalation of every open clinical alert;
//! - `alarm`: device alarms (`device-alarm:<code>`);
//! - `silence`: `no-data` alerts (offline, silent, refused);
//! - `status`: battery and dropped-message operational alerts;
//! - `evaluated`: the `(epoch, seq)` window of messages already evaluated, so a message
//!   the store could not record is evaluated once however often it is resent;
//! - `presence`: who is connected, from the broker's presence messages (in memory).

pub(crate) mod alarm;
pub(crate) mod book;
mod engine;
pub(crate) mod evaluated;
mod measure;
mod message;
pub(crate) mod presence;
pub(crate) mod silence;
mod state;
pub(crate) mod status;
pub(crate) mod versions;

use std::collections::BTreeMap;

use vitalmq_envelope::{DeviceId, Telemetry};
use vitalmq_policies::{DeviceEntry, SiteId};

use crate::plausible::Assessment;

pub(crate) use engine::{evaluate, evaluate_engine};
#[cfg(test)]
pub(crate) use message::alert_id;
pub(crate) use message::{AlertChange, DeliveredBy};
pub(crate) use state::DeviceAlertState;

/// One accepted vitals event as the alert engine sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The normalized event's id (`ev1-...`); becomes the alerts' evidence.
    pub event_id: String,
    pub device: DeviceId,
    pub site: SiteId,
    /// Pseudonym from the registry; never a direct identifier.
    pub patient_ref: String,
    /// Device clock, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// Measurements by metric name; implausible ones are not here.
    pub metrics: BTreeMap<String, f64>,
    /// Metrics of the reading that were outside their physiological limits, removed
    /// from `metrics`: no clinical rule sees them; they count toward the device's
    /// sensor-fault alert.
    pub implausible: Vec<String>,
    /// Signal quality, 0..=1, when the device reports it.
    pub q: Option<f64>,
    pub fw: String,
    pub model: Option<String>,
}

impl Sample {
    /// The sample of a verified telemetry payload from a registered device.
    pub fn from_telemetry(event_id: String, telemetry: &Telemetry, device: &DeviceEntry) -> Self {
        Self {
            event_id,
            device: telemetry.dev.clone(),
            site: device.site.clone(),
            patient_ref: device.patient_ref.clone(),
            ts_ms: telemetry.ts,
            metrics: telemetry
                .m
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_f64()))
                .collect(),
            implausible: Vec::new(),
            q: telemetry.q,
            fw: telemetry.fw.clone(),
            model: telemetry.model.clone(),
        }
    }

    /// Applies the bridge's [`Assessment`]: implausible values leave `metrics`, and a
    /// reading whose device clock is outside the policy is evaluated at the time the
    /// bridge relies on (its reception), so it cannot move the device's alert clock.
    pub fn assessed(mut self, assessment: &Assessment) -> Self {
        for metric in assessment.implausible.keys() {
            if self.metrics.remove(metric).is_some() {
                self.implausible.push(metric.clone());
            }
        }
        self.ts_ms = assessment.observed_at_ms;
        self
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod machine_tests;
