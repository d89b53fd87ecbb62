//! The rate-limit seam: the session asks, the relay's clock-driven limiter answers.

use std::time::Duration;

/// Per-identity publish and SUBSCRIBE rate limits.
pub trait RateGate: Send + Sync + std::fmt::Debug {
    /// `Ok` to admit one message of `bytes` now, or how long to wait.
    fn admit(&self, bytes: usize) -> Result<(), Duration>;
    /// `Ok` to admit one SUBSCRIBE now, or how long to wait.
    fn admit_subscribe(&self) -> Result<(), Duration> {
        Ok(())
    }
}

/// A rate gate that admits everything (tests, and roles without limits).
#[derive(Debug, Clone, Copy, Default)]
pub struct Unlimited;

impl RateGate for Unlimited {
    fn admit(&self, _bytes: usize) -> Result<(), Duration> {
        Ok(())
    }
}
