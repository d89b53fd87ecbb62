//! Whether a verified reading can be true: its measurements against the physiological
//! limits of the rule file (`[plausibility]`), its device time against the time the
//! bridge received it (`[clock]`). Pure: the same inputs give the same [`Assessment`].
//!
//! What the bridge does with it (decided here, applied in `classify`, `normalize` and
//! `alerts`):
//! - an implausible value stays in the raw and normalized planes, listed under
//!   `implausible` in the event; the alert engine never sees it (the reading's other
//!   metrics it still does) and counts it toward the device's `sensor_fault`
//!   operational alert;
//! - a reading whose `ts` is further from reception than the clock policy allows is
//!   marked `clock_skew` in the event; its `observed_at` is the reception time, and the
//!   alert engine evaluates it at the reception time, so one reading dated years ahead
//!   cannot move the device's alert clock forward, nor one dated 1970 restart it.
//!   `observed_at` is therefore never null, whatever `ts` is.

use std::collections::BTreeMap;

use vitalmq_envelope::Telemetry;
use vitalmq_policies::{ClockPolicy, Plausibility, PlausibleRange};

/// How a reading's device time relates to its reception.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockCheck {
    /// Within the clock policy: the device time is used.
    Within,
    /// `ts` is this many ms after reception, more than `max_ahead_s`.
    Ahead { by_ms: u64, allowed_ms: u64 },
    /// `ts` is this many ms before reception, more than `max_behind_s`.
    Behind { by_ms: u64, allowed_ms: u64 },
}

impl ClockCheck {
    pub fn is_skewed(self) -> bool {
        self != Self::Within
    }
}

/// The verdict on one reading.
#[derive(Debug, Clone, PartialEq)]
pub struct Assessment {
    /// Metrics outside their limits, with the limits they broke.
    pub implausible: BTreeMap<String, PlausibleRange>,
    pub clock: ClockCheck,
    /// The time the bridge relies on for the reading: `ts` when within the clock
    /// policy, else the reception time.
    pub observed_at_ms: u64,
    /// What the model registry made of the model the message reports; `None` when the
    /// bridge has no models file (nothing is recorded then).
    pub model: Option<crate::models::ModelCheck>,
}

impl Assessment {
    pub fn of(
        telemetry: &Telemetry,
        received_at_ms: u64,
        plausibility: &Plausibility,
        clock: &ClockPolicy,
    ) -> Self {
        let implausible = telemetry
            .m
            .iter()
            .flatten()
            .filter_map(|(metric, value)| {
                let range = plausibility.range(metric)?;
                (!range.contains(value.as_f64())).then(|| (metric.clone(), range.clone()))
            })
            .collect();
        let ts = telemetry.ts;
        let ahead = clock.max_ahead_s.saturating_mul(1000);
        let behind = clock.max_behind_s.saturating_mul(1000);
        let check = if ts > received_at_ms && ts - received_at_ms > ahead {
            ClockCheck::Ahead {
                by_ms: ts - received_at_ms,
                allowed_ms: ahead,
            }
        } else if ts < received_at_ms && received_at_ms - ts > behind {
            ClockCheck::Behind {
                by_ms: received_at_ms - ts,
                allowed_ms: behind,
            }
        } else {
            ClockCheck::Within
        };
        Self {
            implausible,
            clock: check,
            observed_at_ms: if check.is_skewed() {
                received_at_ms
            } else {
                ts
            },
            model: None,
        }
    }

    pub fn is_implausible(&self, metric: &str) -> bool {
        self.implausible.contains_key(metric)
    }

    /// The marks as the normalized event carries them (`implausible`, `clock_skew`),
    /// each only when it applies; for tools that judge a message as the bridge would.
    pub fn marks(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut out = serde_json::Map::new();
        if !self.implausible.is_empty() {
            out.insert(
                "implausible".into(),
                serde_json::to_value(&self.implausible).unwrap_or_default(),
            );
        }
        let skew = match self.clock {
            ClockCheck::Within => None,
            ClockCheck::Ahead { by_ms, allowed_ms } => Some(("ahead", by_ms, allowed_ms)),
            ClockCheck::Behind { by_ms, allowed_ms } => Some(("behind", by_ms, allowed_ms)),
        };
        if let Some((direction, by_ms, allowed_ms)) = skew {
            out.insert(
                "clock_skew".into(),
                serde_json::json!({"direction": direction, "by_ms": by_ms, "allowed_ms": allowed_ms}),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use vitalmq_envelope::{DeviceId, MessageType, Number};
    use vitalmq_policies::RuleSet;

    use super::*;

    const NOW: u64 = 1_767_225_600_000;

    fn reading(ts: u64, m: &[(&str, Number)]) -> Telemetry {
        Telemetry {
            dev: DeviceId::new("dev-00001").expect("id"),
            epoch: 1,
            seq: 1,
            ts,
            fw: "1".into(),
            kind: MessageType::Vitals,
            m: Some(m.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()),
            q: None,
            model: None,
            schema: None,
            extra: BTreeMap::new(),
        }
    }

    fn assess(t: &Telemetry) -> Assessment {
        let rules = RuleSet::parse(
            include_str!("../../policies/examples/rules.toml"),
            Path::new("rules.toml"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        Assessment::of(t, NOW, rules.plausibility(), rules.clock())
    }

    #[test]
    fn the_issues_values_are_implausible_and_alarming_ones_are_not() {
        for v in [
            Number::Int(u64::MAX.into()),
            Number::Int(-5),
            Number::Int(-(1i128 << 64)),
            Number::Float(100.01),
        ] {
            let a = assess(&reading(NOW, &[("spo2", v), ("pulse", Number::Int(70))]));
            assert_eq!(a.implausible.keys().collect::<Vec<_>>(), ["spo2"], "{v:?}");
            assert!(!a.is_implausible("pulse"));
        }
        for v in [Number::Int(80), Number::Int(0), Number::Float(100.0)] {
            assert!(assess(&reading(NOW, &[("spo2", v)])).implausible.is_empty());
        }
        // A metric without limits is not checked.
        let a = assess(&reading(NOW, &[("steps", Number::Int(-1))]));
        assert!(a.implausible.is_empty());
    }

    #[test]
    fn skewed_device_times_fall_back_to_reception_time() {
        let ten_years_ms = 10 * 365 * 24 * 3600 * 1000;
        for (ts, skewed) in [
            (NOW, false),
            (NOW + 300_000, false),
            (NOW + 300_001, true),
            (NOW + ten_years_ms, true),
            (u64::MAX, true),
            (NOW - 604_800_000, false),
            (NOW - 604_800_001, true),
            (0, true),
        ] {
            let a = assess(&reading(ts, &[("spo2", Number::Int(97))]));
            assert_eq!(a.clock.is_skewed(), skewed, "ts {ts}");
            assert_eq!(a.observed_at_ms, if skewed { NOW } else { ts }, "ts {ts}");
        }
        assert_eq!(
            assess(&reading(u64::MAX, &[])).clock,
            ClockCheck::Ahead {
                by_ms: u64::MAX - NOW,
                allowed_ms: 300_000
            }
        );
        assert_eq!(
            assess(&reading(0, &[])).clock,
            ClockCheck::Behind {
                by_ms: NOW,
                allowed_ms: 604_800_000
            }
        );
    }
}
