//! The surveillance sink (issue 21, point 5): the outbox's normalized events as Parquet
//! files of the surveillance data set ([`crate::surveillance`], `docs/surveillance.md`).
//!
//! It is drained like every sink ([`crate::drain`]): the drain judges each record under
//! the `surveillance` purpose (consent must cover its `observed_at`), minimises it to
//! [`FIELDS`] and puts the purpose pseudonym in place of `patient_ref`; withheld
//! records never reach [`ParquetSink::deliver`] and are counted by the drain. The
//! `subject` column is that pseudonym, and never the care reference: a record whose
//! `patient_ref` was not rewritten by governance gets no subject.
//!
//! A batch's records are grouped by the ISO week of their `observed_at`; each group is
//! one file `events/week=YYYY-Www/part-<first>-<last>.parquet` named by the batch's
//! outbox range, written through [`ObjectStoreSink::put_durable`] (a local file is
//! staged under another name, renamed, then `fsync`ed; S3 PUTs are atomic), so a
//! reader never sees half a file and a redelivery overwrites the same names.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::watch;
use vitalmq_policies::DeviceRegistry;

use super::object::ObjectStoreSink;
use super::{Batch, OutboxRecord, Sink, SinkError};
use crate::governance::{EVENT_FIELDS, Fields, UNKNOWN_PAYLOAD};
use crate::surveillance::rows::{DeviceFacts, EventRow, Rows};
use crate::surveillance::write::to_parquet;
use crate::surveillance::{Table, file_name, iso_week};

/// The event fields the sink reads (its allow-list; `patient_ref` only as the purpose
/// pseudonym). `extra` is read for its known status and alarm keys only.
pub const FIELDS: &[&str] = &[
    "event_id",
    "device",
    "site",
    "epoch",
    "patient_ref",
    "type",
    "observed_at",
    "received_at",
    "m",
    "q",
    "fw",
    "model",
    "extra",
    "provenance",
    "implausible",
];

/// The allow-list [`FIELDS`] as governance takes it.
pub fn fields() -> Fields {
    debug_assert!(FIELDS.iter().all(|f| EVENT_FIELDS.contains(f)));
    debug_assert!(FIELDS.contains(&UNKNOWN_PAYLOAD));
    Fields::Only(FIELDS.iter().map(|f| (*f).to_owned()).collect())
}

/// A [`Sink`] writing the `events` table of the surveillance data set.
#[derive(Debug)]
pub struct ParquetSink {
    files: ObjectStoreSink,
    registry: watch::Receiver<Arc<DeviceRegistry>>,
}

impl ParquetSink {
    /// Writes through `files` (a local directory or S3, see [`ObjectStoreSink`]), the
    /// device facts read from the registry in force.
    pub fn new(files: ObjectStoreSink, registry: watch::Receiver<Arc<DeviceRegistry>>) -> Self {
        Self { files, registry }
    }

    /// Where the files go (tests read back through it).
    pub fn files(&self) -> &ObjectStoreSink {
        &self.files
    }

    /// The files of `batch`: name and bytes, one per ISO week of its records.
    pub fn files_of(&self, batch: &Batch) -> Result<Vec<(String, Vec<u8>)>, SinkError> {
        let registry = Arc::clone(&self.registry.borrow());
        let mut weeks: BTreeMap<String, Vec<EventRow>> = BTreeMap::new();
        for record in &batch.records {
            let Some(row) = row_of(record, &registry) else {
                continue;
            };
            let at = row.observed_at.unwrap_or_default();
            let Some(week) = iso_week(at) else {
                continue;
            };
            weeks.entry(week).or_default().push(row);
        }
        weeks
            .into_iter()
            .map(|(week, rows)| {
                let bytes = to_parquet(&Rows::Events(rows)).map_err(|e| {
                    SinkError::refused(self.files_name(), super::SinkFailure::Parquet(e))
                })?;
                Ok((
                    file_name(Table::Events, &week, batch.first, batch.last),
                    bytes,
                ))
            })
            .collect()
    }

    fn files_name(&self) -> String {
        self.files.name().to_owned()
    }
}

/// The row of one governed record; `None` when its event is not JSON (a normalized
/// event always is).
fn row_of(record: &OutboxRecord, registry: &DeviceRegistry) -> Option<EventRow> {
    let event: serde_json::Value = serde_json::from_str(&record.normalized_json).ok()?;
    // Governance keeps the care reference in `ingest_patient` when it rewrote the
    // event; the event's `patient_ref` is then the purpose pseudonym. Anything else
    // (not rewritten, or the care reference itself) gives no subject.
    let subject = match (&record.ingest_patient, event.get("patient_ref")) {
        (Some(care), Some(serde_json::Value::String(p))) if p != care => Some(p.clone()),
        _ => None,
    };
    let facts = DeviceFacts::of(registry, &record.device);
    Some(EventRow::from_event(
        &event,
        record.observed_at_ms,
        record.received_at_ms,
        subject,
        facts,
    ))
}

impl Sink for ParquetSink {
    fn name(&self) -> &str {
        self.files.name()
    }

    fn deliver<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            for (name, bytes) in self.files_of(batch)? {
                self.files.put_durable(&name, bytes.into()).await?;
            }
            Ok(())
        })
    }
}

mod follow;

pub use follow::{ALERT_FIELDS, EMPTY_WEEK, FollowError, Follower, cursor_name, read_scores};

#[cfg(test)]
mod tests;
