//! Verify, sequence-check and durably forward device telemetry (issue 4).

pub mod sink;
pub mod window;
