//! What a reading must look like before clinical rules may see it: physiological limits
//! per metric (`[plausibility]`) and how far the device clock may be from the bridge's
//! (`[clock]`). A signature proves who sent a value, not that it can be true.
//!
//! Both sections are optional in a rule file: without `[plausibility]` no metric has
//! limits; without `[clock]` the [`ClockPolicy::default`] limits apply.

use std::collections::BTreeMap;

use toml::Spanned;

use super::MAX_SECONDS;
use super::raw::{RawClock, RawPlausibility};
use crate::error::Problems;

/// Longest `max_behind_s`: a year.
pub(crate) const MAX_BEHIND_S: u64 = 366 * 24 * 3600;
/// Largest `resolve_after`: readings in a row.
pub(crate) const MAX_RESOLVE_AFTER: u64 = 1000;

/// Physiological limits of one metric: a reading outside `min..=max` cannot be a
/// measurement of a living patient and is treated as a sensor fault.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct PlausibleRange {
    pub min: f64,
    pub max: f64,
    /// The unit the limits (and the device's readings) are in, e.g. `%`, `/min`.
    pub unit: String,
}

impl PlausibleRange {
    /// Whether `value` lies within the limits; never for NaN.
    pub fn contains(&self, value: f64) -> bool {
        value >= self.min && value <= self.max
    }
}

/// Limits per metric, and when a device's sensor-fault alert resolves.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Plausibility {
    /// By metric name; metrics without limits are not checked.
    pub limits: BTreeMap<String, PlausibleRange>,
    /// Readings in a row without an implausible value that resolve the alert.
    pub resolve_after: u32,
}

impl Default for Plausibility {
    fn default() -> Self {
        Self {
            limits: BTreeMap::new(),
            resolve_after: 5,
        }
    }
}

impl Plausibility {
    /// The limits of `metric`, if it has any.
    pub fn range(&self, metric: &str) -> Option<&PlausibleRange> {
        self.limits.get(metric)
    }
}

/// How far a reading's device time (`ts`) may be from the time the bridge received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClockPolicy {
    /// Seconds `ts` may be ahead of reception (a device clock running fast).
    pub max_ahead_s: u64,
    /// Seconds `ts` may be behind reception (buffered readings sent late).
    pub max_behind_s: u64,
}

impl Default for ClockPolicy {
    /// Five minutes ahead, seven days behind (a device may hold readings that long
    /// while offline, and sends them when it is back).
    fn default() -> Self {
        Self {
            max_ahead_s: 300,
            max_behind_s: 7 * 24 * 3600,
        }
    }
}

pub(super) fn validate_plausibility(
    raw: Option<&Spanned<RawPlausibility>>,
    problems: &mut Problems<'_>,
) -> Plausibility {
    let mut out = Plausibility::default();
    let Some(raw) = raw.map(Spanned::get_ref) else {
        return out;
    };
    if let Some(n) = &raw.resolve_after {
        let v = *n.get_ref();
        if v == 0 || v > MAX_RESOLVE_AFTER {
            problems.add(
                Some(n.span()),
                "plausibility.resolve_after",
                format!("must be between 1 and {MAX_RESOLVE_AFTER}"),
            );
        }
        out.resolve_after = u32::try_from(v.clamp(1, MAX_RESOLVE_AFTER)).unwrap_or(1);
    }
    for (metric, range) in &raw.limits {
        let field = format!("plausibility.limits.{}", metric.get_ref());
        if let Err(why) = super::validate::check_metric(metric.get_ref()) {
            problems.add(Some(metric.span()), field.clone(), why.to_string());
        }
        let r = range.get_ref();
        let (min, max) = (*r.min.get_ref(), *r.max.get_ref());
        let mut ok = true;
        for (name, v, span) in [("min", min, r.min.span()), ("max", max, r.max.span())] {
            if !v.is_finite() {
                problems.add(Some(span), format!("{field}.{name}"), "must be finite");
                ok = false;
            }
        }
        if ok && min >= max {
            problems.add(
                Some(r.max.span()),
                format!("{field}.max"),
                "must be above min",
            );
            ok = false;
        }
        let unit = r.unit.get_ref();
        if unit.trim().is_empty() || unit.len() > 16 || unit.chars().any(char::is_control) {
            problems.add(
                Some(r.unit.span()),
                format!("{field}.unit"),
                "must be 1 to 16 bytes of printable text, e.g. \"%\" or \"/min\"",
            );
            ok = false;
        }
        if ok {
            out.limits.insert(
                metric.get_ref().clone(),
                PlausibleRange {
                    min,
                    max,
                    unit: unit.clone(),
                },
            );
        }
    }
    out
}

pub(super) fn validate_clock(
    raw: Option<&Spanned<RawClock>>,
    problems: &mut Problems<'_>,
) -> ClockPolicy {
    let mut out = ClockPolicy::default();
    let Some(raw) = raw.map(Spanned::get_ref) else {
        return out;
    };
    if let Some(a) = &raw.max_ahead_s {
        let v = *a.get_ref();
        if v == 0 || v > MAX_SECONDS {
            problems.add(
                Some(a.span()),
                "clock.max_ahead_s",
                format!("must be between 1 and {MAX_SECONDS}"),
            );
        }
        out.max_ahead_s = v.clamp(1, MAX_SECONDS);
    }
    if let Some(b) = &raw.max_behind_s {
        let v = *b.get_ref();
        if v == 0 || v > MAX_BEHIND_S {
            problems.add(
                Some(b.span()),
                "clock.max_behind_s",
                format!("must be between 1 and {MAX_BEHIND_S}"),
            );
        }
        out.max_behind_s = v.clamp(1, MAX_BEHIND_S);
    }
    out
}
