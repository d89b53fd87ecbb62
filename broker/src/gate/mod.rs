//! The gate's frame filter: framing, replies and the per-connection session, whose
//! handling of each kind of packet lives in a module of its own.

mod acks;
mod audit;
mod client_limit;
mod connect;
mod delivery;
mod filters;
mod frame;
mod limits;
mod publish;
mod rate;
mod reply;
mod session;

pub use audit::{AuditSink, AuditUnavailable};
pub use frame::Version;
pub use publish::PublishPacket;
pub use rate::{RateGate, Unlimited};
pub(crate) use session::BROKER_PING_EVERY;
pub use session::{CloseReason, GateSession, Output};

#[cfg(test)]
mod tests;
