//! The derived quantities of `rate` and `baseline` rules, each a small bounded
//! accumulator on the device clock.
//!
//! - [`ChangeWindow`]: the lowest and highest reading per bucket of `within_s /
//!   CHANGE_BUCKETS`; at most `CHANGE_BUCKETS + 1` buckets whatever the sample rate, so a
//!   window is honoured to within one bucket (1/12 of `within_s`).
//! - [`Baseline`]: an exponential moving average with time constant `window_s`, using
//!   `alpha = dt / (tau + dt)` (only correctly rounded IEEE operations, so the same on
//!   every platform). It is ready after `window_s` of learning.
//!
//! Every stored float goes through [`quantize`] (1e-6 steps), so its shortest decimal
//! form parses back to the same bits even with `serde_json`'s fast float parser: state
//! that went through storage evaluates exactly like state that did not.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use vitalmq_policies::{ChangeDirection, DeviationSide};

/// Buckets per rate window.
pub const CHANGE_BUCKETS: u64 = 12;

/// Rounds to 1e-6, leaving values too large to scale (beyond ~1e302) as they are.
pub(crate) fn quantize(x: f64) -> f64 {
    let q = (x * 1e6).round() / 1e6;
    if q.is_finite() { q } else { x }
}

/// Readings of the last `within_s` seconds, as per-bucket extremes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ChangeWindow {
    width_ms: u64,
    buckets: VecDeque<Bucket>,
}

/// Stored as `[start_ms, lo, hi]`: the window is most of a rate rule's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "(u64, f64, f64)", into = "(u64, f64, f64)")]
struct Bucket {
    start_ms: u64,
    lo: f64,
    hi: f64,
}

impl From<(u64, f64, f64)> for Bucket {
    fn from((start_ms, lo, hi): (u64, f64, f64)) -> Self {
        Self { start_ms, lo, hi }
    }
}

impl From<Bucket> for (u64, f64, f64) {
    fn from(b: Bucket) -> Self {
        (b.start_ms, b.lo, b.hi)
    }
}

fn width_of(within_s: u64) -> u64 {
    (within_s.saturating_mul(1000) / CHANGE_BUCKETS).max(1)
}

impl ChangeWindow {
    pub(crate) fn new(within_s: u64) -> Self {
        Self {
            width_ms: width_of(within_s),
            buckets: VecDeque::new(),
        }
    }

    /// How far `value` fell below the highest (or rose above the lowest) earlier reading
    /// of the window, never negative; `None` without earlier readings. Then records
    /// `value`.
    pub(crate) fn observe(
        &mut self,
        ts_ms: u64,
        value: f64,
        direction: ChangeDirection,
        within_s: u64,
    ) -> Option<f64> {
        let width = width_of(within_s);
        let newest_start = self.buckets.back().map(|b| b.start_ms);
        if width != self.width_ms || newest_start.is_some_and(|s| s > ts_ms) {
            // The rule's window changed, or time went backwards: start afresh.
            *self = Self::new(within_s);
        }
        let horizon = ts_ms.saturating_sub(within_s.saturating_mul(1000));
        while self
            .buckets
            .front()
            .is_some_and(|b| b.start_ms.saturating_add(width) <= horizon)
        {
            self.buckets.pop_front();
        }
        let measured = match direction {
            ChangeDirection::Fall => self
                .buckets
                .iter()
                .map(|b| b.hi)
                .reduce(f64::max)
                .map(|hi| (hi - value).max(0.0)),
            ChangeDirection::Rise => self
                .buckets
                .iter()
                .map(|b| b.lo)
                .reduce(f64::min)
                .map(|lo| (value - lo).max(0.0)),
        };
        let start = ts_ms - ts_ms % width;
        let v = quantize(value);
        match self.buckets.back_mut() {
            Some(b) if b.start_ms == start => {
                b.lo = b.lo.min(v);
                b.hi = b.hi.max(v);
            }
            _ => self.buckets.push_back(Bucket {
                start_ms: start,
                lo: v,
                hi: v,
            }),
        }
        // Only reachable if buckets were stored under another width; keeps the bound.
        while self.buckets.len() as u64 > CHANGE_BUCKETS + 1 {
            self.buckets.pop_front();
        }
        measured.map(quantize)
    }
}

/// The patient's rolling baseline of one metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Baseline {
    mean: f64,
    /// First reading learnt.
    since_ms: u64,
    /// Last reading learnt.
    learnt_ms: u64,
}

impl Baseline {
    pub(crate) fn new(ts_ms: u64, value: f64) -> Self {
        Self {
            mean: quantize(value),
            since_ms: ts_ms,
            learnt_ms: ts_ms,
        }
    }

    pub(crate) fn mean(&self) -> f64 {
        self.mean
    }

    /// Learnt for at least one window?
    pub(crate) fn ready(&self, window_s: u64) -> bool {
        self.learnt_ms.saturating_sub(self.since_ms) >= window_s.saturating_mul(1000)
    }

    /// Distance of `value` from the baseline on the side that counts, never negative;
    /// `None` until the baseline is ready.
    pub(crate) fn deviation(&self, value: f64, side: DeviationSide, window_s: u64) -> Option<f64> {
        if !self.ready(window_s) {
            return None;
        }
        let d = match side {
            DeviationSide::Either => (value - self.mean).abs(),
            DeviationSide::Above => (value - self.mean).max(0.0),
            DeviationSide::Below => (self.mean - value).max(0.0),
        };
        Some(quantize(d))
    }

    /// Moves the average toward `value`.
    pub(crate) fn learn(&mut self, ts_ms: u64, value: f64, window_s: u64) {
        if ts_ms <= self.learnt_ms {
            // Same instant (or a clock that went back): weight zero.
            return;
        }
        // Millisecond counts below 2^53 are exact as f64; beyond, precision is moot.
        #[allow(clippy::cast_precision_loss)]
        let (dt, tau) = (
            (ts_ms - self.learnt_ms) as f64,
            window_s.saturating_mul(1000) as f64,
        );
        let alpha = dt / (tau + dt);
        self.mean = quantize(self.mean + alpha * (value - self.mean));
        self.learnt_ms = ts_ms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fall_is_measured_against_the_highest_reading_of_the_window() {
        let mut w = ChangeWindow::new(60);
        let fall = ChangeDirection::Fall;
        assert_eq!(w.observe(0, 98.0, fall, 60), None);
        assert_eq!(w.observe(10_000, 97.0, fall, 60), Some(1.0));
        assert_eq!(w.observe(20_000, 99.0, fall, 60), Some(0.0));
        assert_eq!(w.observe(50_000, 94.0, fall, 60), Some(5.0));
        // 99 at t=20 s leaves the window after 80 s (+ one 5 s bucket at most).
        assert_eq!(w.observe(86_000, 94.0, fall, 60), Some(0.0));
        let mut r = ChangeWindow::new(60);
        let rise = ChangeDirection::Rise;
        assert_eq!(r.observe(0, 70.0, rise, 60), None);
        assert_eq!(r.observe(30_000, 95.0, rise, 60), Some(25.0));
    }

    #[test]
    fn the_window_is_bounded_whatever_the_sample_rate() {
        let mut w = ChangeWindow::new(60);
        for i in 0..10_000u64 {
            w.observe(
                i * 7,
                f64::from(u32::try_from(i % 50).expect("small")),
                ChangeDirection::Fall,
                60,
            );
        }
        assert!(w.buckets.len() as u64 <= CHANGE_BUCKETS + 1);
        // A changed window or a clock that went back restarts it.
        assert_eq!(w.observe(5, 1.0, ChangeDirection::Fall, 60), None);
        assert_eq!(w.observe(10, 1.0, ChangeDirection::Fall, 120), None);
    }

    #[test]
    fn the_baseline_is_ready_after_one_window_and_follows_slowly() {
        let mut b = Baseline::new(0, 70.0);
        assert_eq!(b.deviation(100.0, DeviationSide::Either, 1800), None);
        for i in 1..=30u32 {
            b.learn(u64::from(i) * 60_000, 80.0, 1800);
        }
        assert!(b.ready(1800));
        // 30 steps of alpha = 60/1860 toward 80: about 1 - e^-0.98 of the way.
        assert!((b.mean() - 76.2).abs() < 0.2, "{}", b.mean());
        let dev = |v, side| b.deviation(v, side, 1800).expect("ready");
        assert!((dev(70.0, DeviationSide::Either) - (b.mean() - 70.0)).abs() < 1e-6);
        assert_eq!(dev(70.0, DeviationSide::Above), 0.0);
        assert_eq!(dev(90.0, DeviationSide::Below), 0.0);
        let before = b.clone();
        b.learn(30 * 60_000, 200.0, 1800);
        assert_eq!(b, before, "no time passed: no weight");
    }

    #[test]
    fn quantized_values_survive_json_exactly() {
        for x in [
            97.30000305175781_f64,
            1.0 / 3.0,
            123_456.789_012_345,
            -0.1,
            1e9 + 0.5,
        ] {
            let q = quantize(x);
            let back: f64 =
                serde_json::from_str(&serde_json::to_string(&q).expect("json")).expect("parse");
            assert_eq!(back.to_bits(), q.to_bits(), "{x}");
        }
        assert_eq!(quantize(f64::MAX), f64::MAX);
    }
}
