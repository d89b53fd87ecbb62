//! Audit records shared by broker and bridge: one structured, versioned format
//! (`vitalmq-audit/v1`), written as JSON lines, each chaining the SHA-256 of the one
//! before it, so an edit, deletion, insertion or reordering breaks the chain at the
//! first record it touched. A record's hash covers the exact bytes of its line (only
//! the hash value itself left out), and unknown fields are refused.
//!
//! Writers never block the hot path: [`AuditLog::sender`] hands out an [`Auditor`] that
//! queues records to a writer thread through a bounded channel. They are never dropped
//! silently either: when the queue is full or the file cannot be written, `record`
//! returns an error and [`Auditor::healthy`] turns false, so the component refuses new
//! work instead of continuing unaudited, until the writer, retrying on its own, can
//! write again.
//!
//! [`operator`] is the log of what people do with the CLI: short sessions appended
//! under a file lock, each ending with a signed checkpoint.
#![forbid(unsafe_code)]

mod chain;
mod checkpoint;
pub mod operator;
mod record;
mod shipped;
mod writer;

pub use chain::{ChainError, GENESIS, Start, Unreadable, verify_chain, verify_chain_from};
pub use checkpoint::{
    CheckpointError, CheckpointKey, CheckpointReport, KeyError, KeyProblem, Malformed,
    signing_key_path, verify_checkpoints,
};
pub use record::{Actor, AuditRecord, Component, Decision, Event};
pub use shipped::{ShippedError, ShippedReport, ShippedSegment, compare_shipped};
pub use writer::{AuditError, AuditLog, Auditor};
