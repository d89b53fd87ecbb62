//! Verify, sequence-check and durably forward device telemetry (issue 4, SPEC sections
//! 3 and 4). See ARCHITECTURE.md for the pipeline and its invariants.

pub mod alerts;
pub mod audit_ship;
pub mod audit_size;
pub mod certwatch;
pub mod classify;
pub mod config;
pub mod delivery;
pub mod drain;
pub mod gaps;
pub mod link;
pub mod mqtt;
pub mod normalize;
pub mod ops;
pub mod plausible;
pub mod receipt;
pub mod recorder;
pub mod reload;
pub mod run;
pub mod sink;
pub mod store;
pub mod webhook;
pub mod window;

pub use config::BridgeConfig;
pub use run::{READY, run};
