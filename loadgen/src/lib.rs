//! The vitalmq benchmark drivers. They drive the simulator's devices
//! (`vitalmq-device-sim`) or plain MQTT clients (`vitalmq-mqtt-client`) and measure; the
//! simulator knows nothing of them.
//!
//! * [`broker`] drives a broker with many identities and measures throughput, latency,
//!   losses and reconnect storms (`vitalmq loadgen`).
//! * [`signed`] is its signed mode for the bridge benchmark (pre-signed telemetry,
//!   counted by the bridge's receipts; `vitalmq loadgen --signed`) and the one-core
//!   signature reference (`--verify-reference`).
//! * [`sim_load`] is the load mode of `vitalmq sim` (`--aggregate-rate`,
//!   `--latency-report`): the simulator's fleet spread over one period, with
//!   [`latency`] timing every message from its first publish to the bridge's receipt and
//!   to the alert an integrator ([`alert_watch`]) receives; [`load_report`] writes the
//!   result.
//! * [`process`] samples CPU and memory of this and other processes (Linux `/proc`).
#![forbid(unsafe_code)]

pub mod alert_watch;
pub mod broker;
mod error;
pub mod latency;
pub mod load_report;
pub mod process;
pub mod signed;
pub mod sim_load;

pub use error::Error;
