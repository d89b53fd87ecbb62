//! The gate's frame filter: framing, replies and the per-connection session.

mod frame;
mod reply;
mod session;

pub use frame::{Frame, FrameError, Version, connect_version, next_frame};
pub use session::{
    AuditSink, AuditUnavailable, BROKER_PING_EVERY, CloseReason, GateSession, Output, RateGate,
    Unlimited,
};

#[cfg(test)]
mod tests;
