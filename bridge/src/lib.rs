//! Verify, sequence-check and durably forward device telemetry (issue 4).

pub mod classify;
pub mod gaps;
pub mod normalize;
pub mod sink;
pub mod store;
pub mod window;
