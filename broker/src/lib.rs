//! The vitalmq broker: an mTLS identity gate with topic ACLs in front of an embedded
//! rumqttd (SPEC sections 1 and 2).
//!
//! rumqttd 0.20 authorizes only username/password at CONNECT and handshakes TLS clients
//! one at a time inside its accept loop, so the gate owns the network edge: it terminates
//! TLS ([`tls`], [`accept`]), takes the identity from the certificate ([`identity`]),
//! filters every MQTT frame through the authorization hook, and relays only what is
//! allowed to rumqttd, which serves it over an in-process pipe ([`embedded`]).
//!
//! Architecture invariant: only this crate names rumqttd types.
#![forbid(unsafe_code)]

pub mod accept;
mod audit_aggregate;
pub mod authz;
pub mod config;
pub mod embedded;
pub mod gate;
mod handover;
pub mod identity;
mod metrics_http;
pub mod presence;
pub mod ratelimit;
pub mod relay;
mod server;
pub mod tls;

pub use config::BrokerConfig;
pub use server::{Broker, LoadError, ReloadError, StartError};
