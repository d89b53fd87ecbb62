//! Per-identity publish limits (messages and bytes per second) and SUBSCRIBE limits
//! (packets per second), shared by all of an identity's connections (so also bounding
//! each one), from the role limits of the policy in force when the identity first
//! connected.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::Clock as _;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use vitalmq_policies::{RoleLimits, SpiffeId};

use crate::gate::RateGate;

/// The token buckets of one identity.
#[derive(Debug)]
pub(crate) struct IdentityRate {
    messages: DefaultDirectRateLimiter,
    bytes: DefaultDirectRateLimiter,
    byte_burst: u32,
    subscribes: DefaultDirectRateLimiter,
}

impl IdentityRate {
    pub(crate) fn new(limits: &RoleLimits) -> Self {
        let nz = |n: u64| {
            NonZeroU32::new(u32::try_from(n.max(1)).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN)
        };
        let messages = Quota::per_second(nz(limits.messages_per_second.into()))
            .allow_burst(nz(limits.burst.into()));
        // Byte bucket depth: one second of bytes, and at least one largest message.
        let byte_burst = nz(limits.bytes_per_second.max(limits.max_payload_bytes as u64));
        let bytes = Quota::per_second(nz(limits.bytes_per_second)).allow_burst(byte_burst);
        let subscribes = Quota::per_second(nz(limits.subscribes_per_second.into()))
            .allow_burst(nz(limits.subscribe_burst.into()));
        Self {
            messages: RateLimiter::direct(messages),
            bytes: RateLimiter::direct(bytes),
            byte_burst: byte_burst.get(),
            subscribes: RateLimiter::direct(subscribes),
        }
    }
}

impl RateGate for IdentityRate {
    fn admit(&self, bytes: usize) -> Result<(), Duration> {
        // The limiter's own clock: building a new one per call calibrated it (CPUID)
        // every time and took three quarters of the broker's CPU under load.
        let now = self.messages.clock().now();
        if let Err(not_until) = self.messages.check() {
            return Err(not_until.wait_time_from(now));
        }
        let n = u32::try_from(bytes)
            .unwrap_or(u32::MAX)
            .clamp(1, self.byte_burst);
        match self
            .bytes
            .check_n(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN))
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(not_until.wait_time_from(now)),
            // n is clamped to the burst, so capacity is always sufficient.
            Err(_) => Ok(()),
        }
    }

    fn admit_subscribe(&self) -> Result<(), Duration> {
        let now = self.subscribes.clock().now();
        self.subscribes
            .check()
            .map_err(|not_until| not_until.wait_time_from(now))
    }
}

/// Limiters by identity.
#[derive(Debug, Default)]
pub struct RateRegistry {
    by_identity: Mutex<HashMap<SpiffeId, Arc<IdentityRate>>>,
}

impl RateRegistry {
    pub(crate) fn for_identity(&self, id: &SpiffeId, limits: &RoleLimits) -> Arc<IdentityRate> {
        let mut map = self
            .by_identity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(
            map.entry(id.clone())
                .or_insert_with(|| Arc::new(IdentityRate::new(limits))),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_wait() {
        let limits = RoleLimits {
            max_payload_bytes: 100,
            messages_per_second: 1,
            bytes_per_second: 1_000,
            burst: 3,
            max_subscribe_filters: 8,
            subscribes_per_second: 1,
            subscribe_burst: 2,
        };
        let rate = IdentityRate::new(&limits);
        for _ in 0..3 {
            assert_eq!(rate.admit(10), Ok(()));
        }
        let wait = rate.admit(10).expect_err("burst used up");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // SUBSCRIBE has its own bucket.
        assert_eq!(rate.admit_subscribe(), Ok(()));
        assert_eq!(rate.admit_subscribe(), Ok(()));
        let wait = rate.admit_subscribe().expect_err("subscribe burst used up");
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
    }
}
