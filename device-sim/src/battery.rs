//! The simulated battery a `status` message reports (SPEC 3.1 `battery`, `charging`): a
//! pure function of device time, so a run with `--time-scale` drains it faster.

use std::time::Duration;

/// Default charge at the start.
pub const DEFAULT_BATTERY_START: f64 = 0.95;
/// Default drain, as a fraction of a full charge per hour of device time.
pub const DEFAULT_BATTERY_DRAIN_PER_HOUR: f64 = 0.02;
/// How fast a device on external power charges, per hour of device time.
pub const CHARGE_PER_HOUR: f64 = 0.5;

/// One device's battery.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Battery {
    /// Charge at device time zero, 0..=1.
    pub start: f64,
    /// Fraction of a full charge used per hour of device time while not charging.
    pub drain_per_hour: f64,
    /// On external power for the whole run: reports `charging` true and charges.
    pub charging: bool,
}

impl Default for Battery {
    fn default() -> Self {
        Self {
            start: DEFAULT_BATTERY_START,
            drain_per_hour: DEFAULT_BATTERY_DRAIN_PER_HOUR,
            charging: false,
        }
    }
}

impl Battery {
    /// The charge at device time `t`, 0..=1 to two decimals as a device reports it.
    pub fn level(&self, t: Duration) -> f64 {
        let hours = t.as_secs_f64() / 3600.0;
        let level = if self.charging {
            self.start + CHARGE_PER_HOUR * hours
        } else {
            self.start - self.drain_per_hour * hours
        };
        (level.clamp(0.0, 1.0) * 100.0).round() / 100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drains_over_device_time_and_stops_at_empty() {
        let b = Battery {
            start: 0.5,
            drain_per_hour: 0.1,
            charging: false,
        };
        assert_eq!(b.level(Duration::ZERO), 0.5);
        assert_eq!(b.level(Duration::from_secs(3600)), 0.4);
        assert!(b.level(Duration::from_secs(7200)) < b.level(Duration::from_secs(3600)));
        assert_eq!(b.level(Duration::from_secs(100 * 3600)), 0.0);
    }

    #[test]
    fn charging_fills_up_to_full() {
        let b = Battery {
            start: 0.2,
            charging: true,
            ..Battery::default()
        };
        assert!(b.level(Duration::from_secs(600)) > 0.2);
        assert_eq!(b.level(Duration::from_secs(10 * 3600)), 1.0);
    }
}
