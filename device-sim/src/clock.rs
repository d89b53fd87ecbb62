//! The simulated device's clock: what it writes into `ts`, and how far into the
//! patient's story (the [`crate::vitals`] model) a reading is.
//!
//! Pure: wall time since the simulation's time zero goes in, device time comes out.
//!
//! * `scale` (`--time-scale`) runs the device clock and the vitals model that many times
//!   faster than the wall clock: `ts` advances `scale` milliseconds per wall millisecond,
//!   so a five-minute episode plays in ten seconds at 30. The message rate per wall
//!   second is not scaled.
//! * `skew` is a fixed offset of the device clock (the clock-skew fault); it moves `ts`
//!   only, never the vitals model.

use std::time::Duration;

/// A device clock; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct DeviceClock {
    /// Milliseconds since the Unix epoch at time zero.
    origin_ms: u64,
    scale: f64,
    skew_ms: i64,
}

impl DeviceClock {
    /// A clock reading `origin_ms` at time zero and running `scale` times the wall
    /// clock. `scale` must be positive and finite (the runner checks it).
    pub(crate) fn new(origin_ms: u64, scale: f64) -> Self {
        Self {
            origin_ms,
            scale,
            skew_ms: 0,
        }
    }

    /// Sets the clock's offset from true (scaled) time.
    pub(crate) fn set_skew_ms(&mut self, skew_ms: i64) {
        self.skew_ms = skew_ms;
    }

    /// Device time for a wall time `elapsed` after time zero.
    pub(crate) fn device_time(&self, elapsed: Duration) -> Duration {
        elapsed.mul_f64(self.scale)
    }

    /// The `ts` the device writes at wall time `elapsed` after time zero.
    pub(crate) fn ts_ms(&self, elapsed: Duration) -> u64 {
        let since = u64::try_from(self.device_time(elapsed).as_millis()).unwrap_or(u64::MAX);
        let ts = self.origin_ms.saturating_add(since);
        if self.skew_ms >= 0 {
            ts.saturating_add(self.skew_ms.unsigned_abs())
        } else {
            ts.saturating_sub(self.skew_ms.unsigned_abs())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_time_by_default() {
        let c = DeviceClock::new(1_700_000_000_000, 1.0);
        assert_eq!(c.ts_ms(Duration::ZERO), 1_700_000_000_000);
        assert_eq!(c.ts_ms(Duration::from_millis(1500)), 1_700_000_001_500);
        assert_eq!(
            c.device_time(Duration::from_secs(7)),
            Duration::from_secs(7)
        );
    }

    #[test]
    fn scaled_clock_runs_faster() {
        let c = DeviceClock::new(1_000_000, 30.0);
        assert_eq!(c.ts_ms(Duration::from_secs(10)), 1_000_000 + 300_000);
        // A five-minute episode in ten wall seconds.
        assert_eq!(
            c.device_time(Duration::from_secs(10)),
            Duration::from_secs(300)
        );
    }

    #[test]
    fn skew_moves_ts_only() {
        let mut c = DeviceClock::new(1_000_000, 2.0);
        c.set_skew_ms(-400_000);
        assert_eq!(c.ts_ms(Duration::from_secs(1)), 1_000_000 + 2_000 - 400_000);
        assert_eq!(
            c.device_time(Duration::from_secs(1)),
            Duration::from_secs(2)
        );
        c.set_skew_ms(-5_000_000);
        assert_eq!(c.ts_ms(Duration::ZERO), 0, "saturates at the epoch");
        c.set_skew_ms(90_000);
        assert_eq!(c.ts_ms(Duration::ZERO), 1_090_000);
    }
}
