//! Sinks: where the outbox drains to (cloud object storage, an upstream broker).
//!
//! The contract every sink keeps, relied on by [`crate::drain`]:
//!
//! * A [`Batch`] is a contiguous range of outbox positions, fixed (and persisted) before
//!   the first delivery attempt. A retry after an error or a crash delivers exactly the
//!   same records again, so [`Sink::deliver`] must be idempotent: delivering a batch
//!   twice leaves the destination as if it had been delivered once (object names
//!   derived from the batch range, message identity from `(device, epoch, seq)`).
//! * `deliver` returns `Ok` only when the destination has confirmed the write durably
//!   (the object store answered the PUT, the upstream broker sent PUBACK). The sink's
//!   cursor advances only after that.
//! * Errors are retried by the caller with backoff; a sink never drops a record.

pub mod object;
pub mod upstream;

use std::fmt;

use futures::future::BoxFuture;

/// One accepted event as the outbox holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRecord {
    /// Outbox position: strictly increasing, gap-free within a batch's range only when
    /// nothing was skipped (a range may contain positions of other planes).
    pub position: i64,
    /// Deterministic event id, derived from `(device, epoch, seq)`.
    pub event_id: String,
    pub device: String,
    pub site: String,
    pub epoch: u64,
    pub seq: u64,
    /// Device clock (`ts`), milliseconds since the Unix epoch.
    pub observed_at_ms: u64,
    /// When the bridge received the message, milliseconds since the Unix epoch.
    pub received_at_ms: u64,
    /// MQTT topic the message arrived on.
    pub topic: String,
    /// The exact COSE_Sign1 bytes as published (the device signature stays verifiable).
    pub raw: bytes::Bytes,
    /// The normalized event: one JSON object, no trailing newline.
    pub normalized_json: String,
}

/// A fixed range of outbox positions `first..=last` and the records in it, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub first: i64,
    pub last: i64,
    pub records: Vec<OutboxRecord>,
}

/// Why a delivery failed; the drain loop logs it, raises an operational alert when a
/// sink stays down, and retries.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The destination could not be reached or refused the write; retry later.
    #[error("{sink}: destination unavailable: {detail}")]
    Unavailable { sink: String, detail: String },
    /// The batch cannot be written as it is (a bug or a misconfiguration); retrying
    /// will not help, but the records are kept.
    #[error("{sink}: write refused: {detail}")]
    Refused { sink: String, detail: String },
}

/// A destination the outbox drains to. See the module docs for the contract.
pub trait Sink: Send + Sync + fmt::Debug {
    /// Stable name, the key of the sink's cursor in the store (e.g. `objects`, `upstream`).
    fn name(&self) -> &str;

    /// Delivers `batch` durably and idempotently.
    fn deliver<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<(), SinkError>>;
}
