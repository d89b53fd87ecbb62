//! Sinks: where the outbox drains to (cloud object storage, an upstream broker, a FHIR
//! server).
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
//! * Consent and minimisation are the drain's (issue 19, [`crate::governance`]): a sink
//!   gets only the records of the batch that may flow to its purpose, minimised to its
//!   field allow-list, still under the batch's range (the withheld positions are simply
//!   absent); a batch whose every record is withheld is not handed to the sink at all,
//!   and its cursor advances all the same.

pub mod fhir;
pub mod object;
pub mod parquet;
pub(crate) mod upstream;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;
use object_store::path::Path as ObjectPath;

use crate::link::LinkError;

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
    /// The `patient_ref` the event named at ingest, kept here when governance rewrote
    /// `normalized_json` for a sink (minimised it, or put a purpose pseudonym in place
    /// of the care reference; see the `Governed` impl). `None` as the store reads it:
    /// [`OutboxRecord::subject`] then reads `normalized_json`.
    pub ingest_patient: Option<String>,
}

impl OutboxRecord {
    /// The patient and site the event was attributed to at ingest (its `patient_ref`,
    /// read from the normalized event, and its site); `None` when it names no patient.
    pub fn recorded(&self) -> Option<(std::borrow::Cow<'_, str>, &str)> {
        #[derive(serde::Deserialize)]
        struct Attributed<'a> {
            #[serde(borrow)]
            patient_ref: Option<std::borrow::Cow<'a, str>>,
        }
        serde_json::from_str::<Attributed<'_>>(&self.normalized_json)
            .ok()?
            .patient_ref
            .map(|p| (p, self.site.as_str()))
    }

    /// The care `patient_ref` the event was attributed to at ingest, also after
    /// governance minimised or pseudonymised `normalized_json`: whose data key seals the
    /// sink's copy of it, so that erasing that patient reaches every sink.
    pub fn subject(&self) -> Option<std::borrow::Cow<'_, str>> {
        match &self.ingest_patient {
            Some(p) => Some(std::borrow::Cow::Borrowed(p.as_str())),
            None => self.recorded().map(|(p, _)| p),
        }
    }
}

impl crate::governance::Governed for OutboxRecord {
    fn device(&self) -> &str {
        &self.device
    }

    fn observed_at(&self) -> u64 {
        self.observed_at_ms
    }

    fn event_json(&self) -> &str {
        &self.normalized_json
    }

    fn set_event_json(&mut self, json: String) {
        // The rewritten event may no longer name the care patient (field removed, or a
        // purpose pseudonym in its place); keep who it was for sealing.
        if self.ingest_patient.is_none() {
            self.ingest_patient = self.recorded().map(|(p, _)| p.into_owned());
        }
        self.normalized_json = json;
    }
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
    Unavailable {
        sink: String,
        #[source]
        detail: Box<SinkFailure>,
    },
    /// The batch cannot be written as it is (a bug or a misconfiguration); retrying
    /// will not help, but the records are kept.
    #[error("{sink}: write refused: {detail}")]
    Refused {
        sink: String,
        #[source]
        detail: Box<SinkFailure>,
    },
}

impl SinkError {
    pub(crate) fn unavailable(sink: impl Into<String>, detail: SinkFailure) -> Self {
        Self::Unavailable {
            sink: sink.into(),
            detail: Box::new(detail),
        }
    }

    pub(crate) fn refused(sink: impl Into<String>, detail: SinkFailure) -> Self {
        Self::Refused {
            sink: sink.into(),
            detail: Box::new(detail),
        }
    }
}

/// What a sink could not do; [`SinkError`] says whether a retry can help.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkFailure {
    #[error("invalid key prefix: {0}")]
    Prefix(#[source] object_store::path::Error),
    #[error(transparent)]
    CreateDir(#[from] vitalmq_private_fs::PrivateFsError),
    #[error("resolving {}: {source}", dir.display())]
    Resolve {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("opening {}: {source}", dir.display())]
    Open {
        dir: PathBuf,
        source: object_store::Error,
    },
    #[error("invalid S3 bucket name {0:?}")]
    Bucket(String),
    #[error("invalid S3 configuration: {0}")]
    S3Config(#[source] object_store::Error),
    #[error("invalid listing prefix {under:?}: {source}")]
    ListPrefix {
        under: String,
        source: object_store::path::Error,
    },
    #[error("invalid object path {name}: {source}")]
    ObjectPath {
        name: String,
        source: object_store::path::Error,
    },
    #[error("batch {first}..={last}: {source}")]
    Batch {
        first: i64,
        last: i64,
        source: object::BadBatch,
    },
    /// An object store operation (`PUT`, `SYNC`) on one object failed.
    #[error("{op} {location}: {source}")]
    Store {
        op: &'static str,
        location: ObjectPath,
        source: object_store::Error,
    },
    #[error("PUT {location}: no answer within {deadline:?}")]
    PutTimeout {
        location: ObjectPath,
        deadline: Duration,
    },
    #[error("fsync {}: {source}", path.display())]
    Fsync {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("fsync task failed: {0}")]
    FsyncTask(#[source] tokio::task::JoinError),
    /// Sealing an object under its subject's data key failed (keyring or key provider
    /// unavailable); the records wait in the outbox.
    #[error("sealing: {0}")]
    Seal(#[source] vitalmq_keyring::KeyError),
    #[error("sealing task failed: {0}")]
    SealTask(#[source] tokio::task::JoinError),
    #[error(transparent)]
    Link(LinkError),
    /// The upstream broker refused to let the sink subscribe to the devices' receipts.
    #[error("{0}: is the gateway certificate's site the devices' site?")]
    ReceiptsRefused(#[source] LinkError),
    #[error("the upstream bridge did not receipt the batch in time")]
    NoReceipt,
    #[error("no connection")]
    NotConnected,
    /// The FHIR server or its token endpoint (see [`fhir`]).
    #[error(transparent)]
    Fhir(fhir::FhirFailure),
    /// Encoding a surveillance file failed (a bug: the rows are built in memory).
    #[error(transparent)]
    Parquet(#[from] crate::surveillance::write::WriteError),
}

/// A destination the outbox drains to. See the module docs for the contract.
pub trait Sink: Send + Sync + fmt::Debug {
    /// Stable name, the key of the sink's cursor in the store (e.g. `objects`, `upstream`).
    fn name(&self) -> &str;

    /// Delivers `batch` durably and idempotently.
    fn deliver<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<(), SinkError>>;
}
