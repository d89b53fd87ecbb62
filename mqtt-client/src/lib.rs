//! The one MQTT client setup of vitalmq, shared by the simulated devices and gateways
//! (`vitalmq-device-sim`), the load generator (`vitalmq-loadgen`) and the bridge
//! (`vitalmq-bridge`).
//!
//! * [`tls`] builds the rustls client configuration of an mTLS identity (CA, certificate
//!   chain, key; TLS 1.3 and 1.2 with the ring provider).
//! * [`options`] turns a target, a client id, that configuration and a few choices into
//!   rumqttc's `MqttOptions` (3.1.1 or 5) and client/event-loop pair: the only place that
//!   sets transport, keep-alive, clean session, packet size and network options.
//! * [`session`] is one clean-session connection behind a small event interface; it does
//!   not reconnect by itself (its users decide what to resend).
//!
//! This crate depends on no other vitalmq crate, so every one of them may use it.
#![forbid(unsafe_code)]

pub mod options;
pub mod session;
pub mod tls;

pub use options::{
    BadAddress, ConnectOptions, MqttVersion, Qos, Target, UnknownVersion, host_port,
};
pub use session::{Event, Publisher, RequestError, Session, SessionError, SessionOptions};
pub use tls::TlsError;
