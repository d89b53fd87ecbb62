//! Simulated wearables and the vitalmq load generator (issue 6).
//!
//! * [`runner`] runs N simulated devices (`vitalmq sim`): each a [`device::SimDevice`]
//!   (epoch, sequence, signing, [`vitals`], the bounded [`ring`] outbox, [`receipt`]s)
//!   inside a [`link::DeviceLink`] that keeps it connected over mTLS ([`mqtt`]) and
//!   resends whatever no receipt covers yet (SPEC section 4).
//! * [`loadgen`] drives a broker with many identities and measures throughput, latency,
//!   losses and reconnect storms (`vitalmq loadgen`); [`signed`] is its signed mode for
//!   the bridge benchmark (pre-signed telemetry, counted by the bridge's receipts).
//! * [`gateway`] is `vitalmq sim --via-gateway`: one connection per site, with the
//!   site's gateway identity, relays the signed messages of the devices at that site and
//!   routes their receipts back to each device's outbox.
//! * Load mode (`vitalmq sim --aggregate-rate R --latency-report FILE`): the same
//!   devices by the thousand at a set aggregate rate, with [`latency`] timing every
//!   message from its first publish to the bridge's receipt and to the alert an
//!   integrator ([`alert_watch`]) receives; [`load_report`] writes the result.
//! * [`pki`] reads the identities of a PKI made by `vitalmq certs init`, for both.
//! * [`faults`] injects the faults a trustworthy ingest path must refuse or survive
//!   (`--fault`); [`clock`] is the device clock, optionally faster than real time
//!   (`--time-scale`) or skewed.
//!
//! Layering: `ring`, `vitals`, `receipt`, `epoch`, `device`, `clock` and `faults` do no
//! network I/O and read no clock (time is an argument), so they are tested directly;
//! `mqtt`, `link`, `gateway` (apart from its routing and planning) and `runner` are the
//! async shell around them.
#![forbid(unsafe_code)]

pub mod alert_watch;
pub mod clock;
pub mod device;
pub mod duration;
pub mod epoch;
pub mod faults;
pub mod gateway;
pub mod latency;
pub mod link;
pub mod load_report;
pub mod loadgen;
/// The MQTT connection and TLS client setup all vitalmq clients share.
pub use vitalmq_mqtt_client as mqtt;
pub mod pki;
pub mod receipt;
pub mod ring;
pub mod runner;
pub mod signed;
#[cfg(test)]
mod test_fixtures;
pub mod vitals;
