//! Simulated wearables, gateways and the load generator (issue 6).
//!
//! Only the load generator ([`loadgen`]) exists so far: it drives a broker over mTLS with
//! many device identities and measures delivered throughput, latency, losses and
//! reconnect storms.

pub mod loadgen;
