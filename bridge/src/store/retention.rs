//! The store side of retention (issue 20): the rows the retention job looks at, and the
//! acts it applies, one batch per transaction (`crate::lifecycle` decides which).
//!
//! Rows are read in key order after a key, so a run pages through a table without
//! holding a transaction open, and a rerun after a crash starts again from the start:
//! every act is idempotent (a deleted row is gone, an anonymized event is marked and
//! skipped, a purged raw row has no bytes left).
//!
//! `events.raw_id` references `raw_messages(id)` (foreign keys are on), so the raw
//! plane's "delete" of a row whose event is still kept *purges* it: the COSE bytes are
//! replaced by an empty blob and the row keeps only its receipt metadata (time, broker,
//! publisher, topic, SHA-256), which the event's provenance (`vitalmq trace`) cites. The
//! raw row itself goes with its event. An anonymized event's raw row is purged and its
//! `publisher` and `topic` (which name the device) are blanked too.
//!
//! The normalized payload is read and written only through [`load_normalized`] and
//! [`store_normalized`], the one place that knows how it is kept at rest.

use rusqlite::{OptionalExtension as _, Transaction, params};

use super::{Store, StoreError, i2u, u2i};

/// The event id of an anonymized event starts so (real ids are `ev1-`): the old id, a
/// hash of device, epoch and seq, would link it back to the device.
pub const ANONYMIZED_ID_PREFIX: &str = "anon-";
/// The device column of an anonymized event (and `epoch` 0, `seq` its position, so
/// the `(device, epoch, seq)` index stays unique).
pub const ANONYMIZED_DEVICE: &str = "anonymized";

/// An event row as retention sees it: both its planes (raw and normalized).
#[derive(Debug, Clone, PartialEq)]
pub struct RetainedEvent {
    /// Outbox position.
    pub position: i64,
    pub raw_id: i64,
    pub device: String,
    pub observed_at_ms: u64,
    pub received_at_ms: u64,
    /// The normalized event JSON; `None` when it cannot be read (see [`load_normalized`]).
    pub normalized: Option<String>,
    /// Already anonymized (by an earlier run).
    pub anonymized: bool,
    /// The raw row still holds its COSE bytes.
    pub raw_present: bool,
}

/// An alert row (clinical plane).
#[derive(Debug, Clone, PartialEq)]
pub struct RetainedAlert {
    pub position: i64,
    pub device: Option<String>,
    pub created_at_ms: u64,
    pub body: String,
}

/// A quarantine row.
#[derive(Debug, Clone, PartialEq)]
pub struct RetainedQuarantine {
    pub id: i64,
    pub device: Option<String>,
    pub received_at_ms: u64,
}

/// One act on the store.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreAct {
    /// Delete the event (and its index entries and its raw row).
    DeleteEvent {
        position: i64,
        raw_id: i64,
    },
    /// Replace the event by its anonymized form (`json`, from
    /// `crate::lifecycle::anonymize`), times coarsened to `hour_ms`; purge its raw row.
    AnonymizeEvent {
        position: i64,
        raw_id: i64,
        json: String,
        hour_ms: u64,
    },
    /// Empty the raw row's bytes (the event stays).
    PurgeRaw {
        raw_id: i64,
    },
    DeleteAlert {
        position: i64,
    },
    /// Replace the alert's body by its anonymized form and forget its device.
    AnonymizeAlert {
        position: i64,
        body: String,
    },
    DeleteQuarantine {
        id: i64,
    },
}

/// Reads the stored normalized payload (today the TEXT column as it is).
fn load_normalized(stored: String) -> Option<String> {
    Some(stored)
}

/// The stored form of a normalized payload (today the JSON text as it is).
fn store_normalized(json: &str) -> String {
    json.to_owned()
}

impl Store {
    /// Up to `limit` events after position `after`, in position order.
    pub fn retention_events(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<RetainedEvent>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT e.position, e.raw_id, e.device, e.observed_at_ms, e.received_at_ms,
                        e.normalized, e.event_id, length(r.bytes)
                 FROM events e JOIN raw_messages r ON r.id = e.raw_id
                 WHERE e.position > ?1 ORDER BY e.position LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        stmt.query_map(params![after, limit], |r| {
            let event_id: String = r.get(6)?;
            let raw_len: i64 = r.get(7)?;
            Ok(RetainedEvent {
                position: r.get(0)?,
                raw_id: r.get(1)?,
                device: r.get(2)?,
                observed_at_ms: i2u(r.get(3)?),
                received_at_ms: i2u(r.get(4)?),
                normalized: load_normalized(r.get(5)?),
                anonymized: event_id.starts_with(ANONYMIZED_ID_PREFIX),
                raw_present: raw_len > 0,
            })
        })
        .and_then(Iterator::collect)
        .map_err(|e| self.err(e))
    }

    /// Up to `limit` alert rows after position `after`, in order.
    pub fn retention_alerts(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<RetainedAlert>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT position, device, created_at_ms, body FROM alerts
                 WHERE position > ?1 ORDER BY position LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        stmt.query_map(
            params![after, i64::try_from(limit).unwrap_or(i64::MAX)],
            |r| {
                Ok(RetainedAlert {
                    position: r.get(0)?,
                    device: r.get(1)?,
                    created_at_ms: i2u(r.get(2)?),
                    body: r.get(3)?,
                })
            },
        )
        .and_then(Iterator::collect)
        .map_err(|e| self.err(e))
    }

    /// Up to `limit` quarantine rows after id `after`, in order.
    pub fn retention_quarantine(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<RetainedQuarantine>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, device, received_at_ms FROM quarantine
                 WHERE id > ?1 ORDER BY id LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        stmt.query_map(
            params![after, i64::try_from(limit).unwrap_or(i64::MAX)],
            |r| {
                Ok(RetainedQuarantine {
                    id: r.get(0)?,
                    device: r.get(1)?,
                    received_at_ms: i2u(r.get(2)?),
                })
            },
        )
        .and_then(Iterator::collect)
        .map_err(|e| self.err(e))
    }

    /// The outbox position every one of `sinks` has confirmed (the slowest cursor; a
    /// sink without a cursor has confirmed nothing). `None` when there are no sinks.
    pub fn confirmed_by_sinks(&self, sinks: &[String]) -> Result<Option<i64>, StoreError> {
        let mut slowest: Option<i64> = None;
        for sink in sinks {
            let through: i64 = self
                .conn
                .query_row(
                    "SELECT delivered_through FROM sink_cursors WHERE sink = ?1",
                    params![sink],
                    |r| r.get(0),
                )
                .optional()
                .map_err(|e| self.err(e))?
                .unwrap_or(0);
            slowest = Some(slowest.map_or(through, |s| s.min(through)));
        }
        Ok(slowest)
    }

    /// The alert position every one of `handlers` has confirmed; `None` without handlers.
    pub fn confirmed_by_handlers(&self, handlers: &[String]) -> Result<Option<i64>, StoreError> {
        let mut slowest: Option<i64> = None;
        for handler in handlers {
            let through = self.handler_cursor(handler)?;
            slowest = Some(slowest.map_or(through, |s| s.min(through)));
        }
        Ok(slowest)
    }

    /// Applies `acts` in one transaction: all of them or none.
    pub fn apply_retention(&mut self, acts: &[StoreAct]) -> Result<(), StoreError> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction()
            .map_err(|e| super::classify(&path, e))?;
        for act in acts {
            apply(&tx, act).map_err(|e| super::classify(&path, e))?;
        }
        tx.commit().map_err(|e| super::classify(&path, e))
    }
}

fn apply(tx: &Transaction<'_>, act: &StoreAct) -> rusqlite::Result<()> {
    match act {
        StoreAct::DeleteEvent { position, raw_id } => {
            delete_index(tx, *position)?;
            tx.execute("DELETE FROM events WHERE position = ?1", params![position])?;
            tx.execute("DELETE FROM raw_messages WHERE id = ?1", params![raw_id])?;
        }
        StoreAct::AnonymizeEvent {
            position,
            raw_id,
            json,
            hour_ms,
        } => {
            // The old id (a hash of device, epoch and seq) is forgotten with its index.
            delete_index(tx, *position)?;
            tx.execute(
                "UPDATE events SET event_id = ?2, device = ?3, epoch = 0, seq = ?1,
                        observed_at_ms = ?4, received_at_ms = ?4, normalized = ?5
                 WHERE position = ?1",
                params![
                    position,
                    format!("{ANONYMIZED_ID_PREFIX}{position}"),
                    ANONYMIZED_DEVICE,
                    u2i(*hour_ms),
                    store_normalized(json),
                ],
            )?;
            tx.execute(
                "UPDATE raw_messages SET bytes = X'', publisher = '', topic = '',
                        received_at_ms = ?2
                 WHERE id = ?1",
                params![raw_id, u2i(*hour_ms)],
            )?;
        }
        StoreAct::PurgeRaw { raw_id } => {
            tx.execute(
                "UPDATE raw_messages SET bytes = X'' WHERE id = ?1",
                params![raw_id],
            )?;
        }
        StoreAct::DeleteAlert { position } => {
            tx.execute("DELETE FROM alerts WHERE position = ?1", params![position])?;
        }
        StoreAct::AnonymizeAlert { position, body } => {
            tx.execute(
                "UPDATE alerts SET device = NULL, body = ?2 WHERE position = ?1",
                params![position, body],
            )?;
        }
        StoreAct::DeleteQuarantine { id } => {
            tx.execute("DELETE FROM quarantine WHERE id = ?1", params![id])?;
        }
    }
    Ok(())
}

/// Removes the `event_index` entries of the event at `position` (its bucket is known).
fn delete_index(tx: &Transaction<'_>, position: i64) -> rusqlite::Result<()> {
    tx.execute(
        "DELETE FROM event_index WHERE bucket = ?1 AND position = ?2",
        params![position / super::EVENT_INDEX_BUCKET, position],
    )?;
    Ok(())
}

#[cfg(test)]
impl Store {
    /// For tests: the times of the event at `position` (and its raw row).
    pub(crate) fn retime_event(&self, position: i64, observed_at_ms: u64, received_at_ms: u64) {
        self.conn
            .execute(
                "UPDATE events SET observed_at_ms = ?2, received_at_ms = ?3 WHERE position = ?1",
                params![position, u2i(observed_at_ms), u2i(received_at_ms)],
            )
            .expect("retime event");
        self.conn
            .execute(
                "UPDATE raw_messages SET received_at_ms = ?2
                 WHERE id = (SELECT raw_id FROM events WHERE position = ?1)",
                params![position, u2i(received_at_ms)],
            )
            .expect("retime raw");
    }

    /// For tests: the raw bytes' length, publisher and topic of the event at `position`.
    pub(crate) fn raw_of(&self, position: i64) -> Option<(i64, String, String)> {
        self.conn
            .query_row(
                "SELECT length(r.bytes), r.publisher, r.topic FROM events e
                 JOIN raw_messages r ON r.id = e.raw_id WHERE e.position = ?1",
                params![position],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .expect("raw row")
    }

    /// For tests: how many rows `table` has.
    pub(crate) fn rows_in(&self, table: &str) -> i64 {
        self.conn
            .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .expect("count")
    }
}
