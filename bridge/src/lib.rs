//! Verify, sequence-check and durably forward device telemetry (issue 4, SPEC sections
//! 3 and 4). See ARCHITECTURE.md for the pipeline and its invariants.
//!
//! The public modules are what the binary, tests and examples use; the rest is the
//! bridge process's own machinery, reached through [`run`].

mod alerts;
mod attribute;
mod audit_ship;
mod audit_size;
mod certwatch;
pub mod classify;
mod config;
mod delivery;
mod derived_id;
mod drain;
mod gaps;
pub mod governance;
pub mod lifecycle;
mod link;
mod link5;
pub mod models;
mod mqtt;
pub mod normalize;
mod observe;
mod ops;
pub mod plausible;
mod receipt;
pub mod recorder;
mod reload;
pub mod rollout;
mod run;
mod score;
pub mod sink;
pub mod store;
pub mod surveillance;
mod webhook;
pub mod window;

pub use config::{BridgeConfig, ConfigError, Invalid, LifecycleConfig};
pub use run::{READY, RunError, run};
/// A score row as a commit takes it (tests write stores with scores).
pub use score::NewScore;
