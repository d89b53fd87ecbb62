//! The outboxes: events for the sinks and alert state changes for the alert handlers,
//! each with per-consumer cursors, and the audit-ship cursors.

use rusqlite::{OptionalExtension as _, params};

use super::sealing::{
    ERASED_MARKER, Payload, alert_context, column_bytes, normalized_context, raw_context,
};
use super::{Store, StoreError, i2u, u2i};
use crate::sink::{Batch, OutboxRecord};

/// A recorded alert, as the handlers read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAlert {
    pub position: i64,
    pub alert_id: String,
    pub state: String,
    pub topic: String,
    pub body: String,
    /// The escalation level it is delivered at: the policy names the handlers of each
    /// (`RuleSet::handlers_for_level`).
    pub level: u32,
    /// When the bridge made the change (its clock, ms since the Unix epoch): alert
    /// expiry counts from here, not from when a handler got it out.
    pub created_at_ms: u64,
}

/// A sink's position in the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// Every position up to and including this one is confirmed by the sink.
    pub delivered_through: i64,
    /// The batch planned and possibly partly delivered before a crash.
    pub pending: Option<(i64, i64)>,
}

/// Where shipping one audit log to one objects sink stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditCursor {
    /// The last record the sink confirmed holding, if any.
    pub shipped: Option<ShippedAudit>,
    /// The segment `(first, last)` planned and possibly written before a crash.
    pub pending: Option<(u64, u64)>,
}

/// The last record of an audit log a sink holds, and where its line starts in the log,
/// so the next pass reads only what follows (and can check it is still there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShippedAudit {
    pub seq: u64,
    /// The record's hash; unknown only for cursors written before it was kept.
    pub hash: Option<String>,
    /// Byte offset of the record's line in the log (0 when unknown).
    pub line_start: u64,
}

impl Store {
    /// Up to `max` alerts after `handler`'s cursor, in order; an erased patient's are
    /// left out (counted as withheld, reason `erased`, when the cursor passes them).
    pub fn alerts_after(&self, handler: &str, max: usize) -> Result<Vec<StoredAlert>, StoreError> {
        let through = self.handler_cursor(handler)?;
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT position, alert_id, state, topic, body, level, created_at_ms FROM alerts
                 WHERE position > ?1 ORDER BY position LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(
                params![through, i64::try_from(max).unwrap_or(i64::MAX)],
                |r| {
                    Ok((
                        StoredAlert {
                            position: r.get(0)?,
                            alert_id: r.get(1)?,
                            state: r.get(2)?,
                            topic: r.get(3)?,
                            body: String::new(),
                            level: r.get(5)?,
                            created_at_ms: i2u(r.get(6)?),
                        },
                        column_bytes(r, 4)?,
                    ))
                },
            )
            .map_err(|e| self.err(e))?;
        let rows = rows
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        let mut out = Vec::with_capacity(rows.len());
        for (mut a, stored) in rows {
            match self.open_payload(&stored, &alert_context(&a.alert_id, &a.state))? {
                Payload::Plain(body) => {
                    a.body = String::from_utf8(body).map_err(|e| StoreError::Corrupt {
                        path: self.path.clone(),
                        device: a.alert_id.clone(),
                        detail: format!("alert body is not UTF-8: {e}"),
                    })?;
                    out.push(a);
                }
                Payload::Erased { .. } => {}
                Payload::Locked => {
                    return Err(StoreError::NoKeyring {
                        path: self.path.clone(),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Subjects the keyring holds tombstones of (none without a keyring).
    fn erased_subjects(&self) -> Result<std::collections::HashSet<String>, StoreError> {
        let Some(k) = &self.keyring else {
            return Ok(Default::default());
        };
        Ok(k.tombstones()
            .map_err(|source| StoreError::Key {
                path: self.path.clone(),
                source,
            })?
            .into_iter()
            .map(|t| t.subject)
            .collect())
    }

    /// The last alert position `handler` confirmed (0 before its first).
    pub fn handler_cursor(&self, handler: &str) -> Result<i64, StoreError> {
        self.conn
            .query_row(
                "SELECT delivered_through FROM handler_cursors WHERE handler = ?1",
                params![handler],
                |r| r.get(0),
            )
            .optional()
            .map(Option::unwrap_or_default)
            .map_err(|e| self.err(e))
    }

    /// Records that `handler` delivered every alert up to `position`.
    pub fn alert_delivered(&self, handler: &str, position: i64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO handler_cursors (handler, delivered_through) VALUES (?1, ?2)
                 ON CONFLICT(handler) DO UPDATE SET delivered_through = MAX(delivered_through, ?2)",
                params![handler, position],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Where shipping audit log `log` (its component label) to `sink` stands.
    pub fn audit_cursor(&self, sink: &str, log: &str) -> Result<AuditCursor, StoreError> {
        self.conn
            .query_row(
                "SELECT shipped_through, shipped_hash, line_start, pending_first, pending_last
                 FROM audit_ship_cursors WHERE sink = ?1 AND log = ?2",
                params![sink, log],
                |r| {
                    let seq: Option<i64> = r.get(0)?;
                    let hash: Option<String> = r.get(1)?;
                    let line_start: Option<i64> = r.get(2)?;
                    let first: Option<i64> = r.get(3)?;
                    let last: Option<i64> = r.get(4)?;
                    Ok(AuditCursor {
                        shipped: seq.map(|s| ShippedAudit {
                            seq: i2u(s),
                            hash,
                            line_start: line_start.map_or(0, i2u),
                        }),
                        pending: first.zip(last).map(|(f, l)| (i2u(f), i2u(l))),
                    })
                },
            )
            .optional()
            .map(Option::unwrap_or_default)
            .map_err(|e| self.err(e))
    }

    /// Persists the segment `first..=last` of `log` as in flight to `sink`, before its
    /// first attempt, so a retry after a crash ships exactly the same range.
    pub fn audit_pending(
        &self,
        sink: &str,
        log: &str,
        first: u64,
        last: u64,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO audit_ship_cursors (sink, log, pending_first, pending_last)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(sink, log) DO UPDATE SET pending_first = ?3, pending_last = ?4",
                params![sink, log, u2i(first), u2i(last)],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Records that `sink` holds every record of `log` up to `shipped` (and nothing is
    /// in flight).
    pub fn set_audit_shipped(
        &self,
        sink: &str,
        log: &str,
        shipped: &ShippedAudit,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO audit_ship_cursors (sink, log, shipped_through, shipped_hash, line_start)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(sink, log) DO UPDATE SET shipped_through = ?3, shipped_hash = ?4,
                     line_start = ?5, pending_first = NULL, pending_last = NULL",
                params![
                    sink,
                    log,
                    u2i(shipped.seq),
                    shipped.hash,
                    u2i(shipped.line_start)
                ],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Makes sure `sink` has a cursor (starting before the first event).
    pub fn register_sink(&self, sink: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO sink_cursors (sink, delivered_through) VALUES (?1, 0)
                 ON CONFLICT(sink) DO NOTHING",
                params![sink],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub fn cursor(&self, sink: &str) -> Result<Cursor, StoreError> {
        self.conn
            .query_row(
                "SELECT delivered_through, pending_first, pending_last FROM sink_cursors WHERE sink = ?1",
                params![sink],
                |r| {
                    let first: Option<i64> = r.get(1)?;
                    let last: Option<i64> = r.get(2)?;
                    Ok(Cursor {
                        delivered_through: r.get(0)?,
                        pending: first.zip(last),
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))?
            .map_or_else(
                || {
                    self.register_sink(sink)?;
                    Ok(Cursor {
                        delivered_through: 0,
                        pending: None,
                    })
                },
                Ok,
            )
    }

    /// Highest outbox position written so far (0 when empty).
    pub fn head(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("SELECT COALESCE(MAX(position), 0) FROM events", [], |r| {
                r.get(0)
            })
            .map_err(|e| self.err(e))
    }

    /// Events written but not yet confirmed by the slowest of `sinks`.
    ///
    /// Positions are dense (AUTOINCREMENT, no deletes; a rolled-back transaction does not
    /// consume them), so this is `head - slowest cursor`: O(1), where counting rows cost
    /// O(backlog) per batch and made a large backlog slow down its own ingest.
    pub fn backlog(&self, sinks: &[String]) -> Result<u64, StoreError> {
        let head = self.head()?;
        let mut slowest = head;
        for sink in sinks {
            slowest = slowest.min(self.cursor(sink)?.delivered_through);
        }
        Ok(u64::try_from(head - slowest).unwrap_or(0))
    }

    /// Events written but not yet confirmed, per sink of `sinks` (same arithmetic as
    /// [`Self::backlog`]).
    pub fn backlog_per_sink(&self, sinks: &[String]) -> Result<Vec<(String, u64)>, StoreError> {
        let head = self.head()?;
        sinks
            .iter()
            .map(|sink| {
                let through = self.cursor(sink)?.delivered_through;
                Ok((sink.clone(), u64::try_from(head - through).unwrap_or(0)))
            })
            .collect()
    }

    /// The next batch for `sink`: the pending one left by a crash if there is one
    /// (identical range, so a redelivery rewrites the same objects), else up to `max`
    /// events after the cursor, persisted as pending before it is returned. `None`
    /// when nothing is waiting.
    pub fn next_batch(&mut self, sink: &str, max: usize) -> Result<Option<Batch>, StoreError> {
        let cursor = self.cursor(sink)?;
        let (first, last) = match cursor.pending {
            Some(range) => range,
            None => {
                let range: Option<(i64, i64)> = self
                    .conn
                    .query_row(
                        "SELECT MIN(position), MAX(position) FROM
                           (SELECT position FROM events WHERE position > ?1 ORDER BY position LIMIT ?2)",
                        params![cursor.delivered_through, i64::try_from(max).unwrap_or(i64::MAX)],
                        |r| Ok(r.get::<_, Option<i64>>(0)?.zip(r.get::<_, Option<i64>>(1)?)),
                    )
                    .map_err(|e| self.err(e))?;
                let Some(range) = range else {
                    return Ok(None);
                };
                self.conn
                    .execute(
                        "UPDATE sink_cursors SET pending_first = ?2, pending_last = ?3 WHERE sink = ?1",
                        params![sink, range.0, range.1],
                    )
                    .map_err(|e| self.err(e))?;
                range
            }
        };
        let records = self.read_range(first, last)?;
        Ok(Some(Batch {
            first,
            last,
            records,
        }))
    }

    /// Records that `sink` confirmed the batch ending at `last`.
    pub fn batch_delivered(&mut self, sink: &str, last: i64) -> Result<(), StoreError> {
        self.batch_delivered_withheld(sink, last, &[]).map(|_| ())
    }

    /// Records that `sink` confirmed the batch ending at `last`, of which `withheld`
    /// (reason, count) were withheld by consent, in one transaction: the counts are
    /// added only when this moves the cursor, so a batch delivered again (the cursor
    /// advance failed, or a crash came first) is counted once. True when it moved.
    pub fn batch_delivered_withheld(
        &mut self,
        sink: &str,
        last: i64,
        withheld: &[(&str, u64)],
    ) -> Result<bool, StoreError> {
        let erased_subjects = self.erased_subjects()?;
        let path = self.path.clone();
        let err = |e| super::classify(&path, e);
        // Immediate: the write lock from the start, so a read inside cannot be
        // outdated by the recorder's commit (a deferred upgrade would fail BUSY).
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        let through: i64 = tx
            .query_row(
                "SELECT delivered_through FROM sink_cursors WHERE sink = ?1",
                params![sink],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?
            .unwrap_or_default();
        let erased = count_erased(&tx, "events", "normalized", through, last, &erased_subjects)
            .map_err(err)?;
        let moved = tx
            .execute(
                "UPDATE sink_cursors SET delivered_through = ?2, pending_first = NULL, pending_last = NULL
                 WHERE sink = ?1 AND delivered_through < ?2",
                params![sink, last],
            )
            .map_err(err)?
            > 0;
        if moved {
            add_withheld(&tx, sink, "sink", withheld).map_err(err)?;
            add_withheld(&tx, sink, "sink", &[("erased", erased)]).map_err(err)?;
            if erased > 0 {
                metrics::counter!("vitalmq_bridge_withheld_total", "sink" => sink.to_owned(), "reason" => "erased")
                    .increment(erased);
            }
        } else {
            // Already past `last`: a pending range that ends at or before the cursor
            // is delivered already; left in place it would be planned again forever.
            tx.execute(
                "UPDATE sink_cursors SET pending_first = NULL, pending_last = NULL
                 WHERE sink = ?1 AND pending_last IS NOT NULL AND pending_last <= delivered_through",
                params![sink],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(moved)
    }

    /// As [`Self::alert_delivered`], adding `withheld` (reason, count) to the handler's
    /// withheld counts in the same transaction, only when the cursor moves. True when
    /// it moved.
    pub fn alert_delivered_withheld(
        &mut self,
        handler: &str,
        position: i64,
        withheld: &[(&str, u64)],
    ) -> Result<bool, StoreError> {
        let erased_subjects = self.erased_subjects()?;
        let path = self.path.clone();
        let err = |e| super::classify(&path, e);
        // Immediate: the write lock from the start, so a read inside cannot be
        // outdated by the recorder's commit (a deferred upgrade would fail BUSY).
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        let through: i64 = tx
            .query_row(
                "SELECT delivered_through FROM handler_cursors WHERE handler = ?1",
                params![handler],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?
            .unwrap_or_default();
        let moved = position > through;
        if moved {
            tx.execute(
                "INSERT INTO handler_cursors (handler, delivered_through) VALUES (?1, ?2)
                 ON CONFLICT(handler) DO UPDATE SET delivered_through = ?2",
                params![handler, position],
            )
            .map_err(err)?;
            add_withheld(&tx, handler, "handler", withheld).map_err(err)?;
            let erased = count_erased(&tx, "alerts", "body", through, position, &erased_subjects)
                .map_err(err)?;
            add_withheld(&tx, handler, "handler", &[("erased", erased)]).map_err(err)?;
            if erased > 0 {
                metrics::counter!("vitalmq_bridge_alerts_withheld_total", "handler" => handler.to_owned(), "reason" => "erased")
                    .increment(erased);
            }
        }
        tx.commit().map_err(err)?;
        Ok(moved)
    }

    /// The outbox records with positions in `first..=last`, in order, payloads opened;
    /// an erased patient's events are left out (a batch may have holes), and counted
    /// as withheld (`erased`) when the sink's cursor passes them.
    pub fn read_range(&self, first: i64, last: i64) -> Result<Vec<OutboxRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT e.position, e.event_id, e.device, e.site, e.epoch, e.seq,
                        e.observed_at_ms, e.received_at_ms, r.topic, r.bytes, e.normalized
                 FROM events e JOIN raw_messages r ON r.id = e.raw_id
                 WHERE e.position BETWEEN ?1 AND ?2 ORDER BY e.position",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![first, last], |r| {
                Ok(OutboxRecord {
                    position: r.get(0)?,
                    event_id: r.get(1)?,
                    device: r.get(2)?,
                    site: r.get(3)?,
                    epoch: i2u(r.get(4)?),
                    seq: i2u(r.get(5)?),
                    observed_at_ms: i2u(r.get(6)?),
                    received_at_ms: i2u(r.get(7)?),
                    topic: r.get(8)?,
                    raw: bytes::Bytes::new(),
                    normalized_json: String::new(),
                    ingest_patient: None,
                }
                .with_stored(column_bytes(r, 9)?, column_bytes(r, 10)?))
            })
            .map_err(|e| self.err(e))?;
        let rows = rows
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        let mut out = Vec::with_capacity(rows.len());
        for (mut rec, raw, normalized) in rows {
            let normalized = self.open_payload(&normalized, &normalized_context(&rec.event_id))?;
            let raw = self.open_payload(&raw, &raw_context(&rec.event_id))?;
            match (raw, normalized) {
                (Payload::Plain(raw), Payload::Plain(normalized)) if !raw.is_empty() => {
                    rec.raw = bytes::Bytes::from(raw);
                    rec.normalized_json =
                        String::from_utf8(normalized).map_err(|e| StoreError::Corrupt {
                            path: self.path.clone(),
                            device: rec.device.clone(),
                            detail: format!("normalized event is not UTF-8: {e}"),
                        })?;
                    out.push(rec);
                }
                (Payload::Locked, _) | (_, Payload::Locked) => {
                    return Err(StoreError::NoKeyring {
                        path: self.path.clone(),
                    });
                }
                // Erased (crypto-shredded or scrubbed): not delivered.
                _ => {}
            }
        }
        Ok(out)
    }
}

trait WithStored: Sized {
    fn with_stored(self, raw: Vec<u8>, normalized: Vec<u8>) -> (Self, Vec<u8>, Vec<u8>) {
        (self, raw, normalized)
    }
}

impl WithStored for OutboxRecord {}

/// How many rows of `table` at positions in `(after, through]` are erased: their
/// `patient_ref` has a tombstone, or their payload `column` is the erased marker.
fn count_erased(
    tx: &rusqlite::Transaction<'_>,
    table: &str,
    column: &str,
    after: i64,
    through: i64,
    erased_subjects: &std::collections::HashSet<String>,
) -> rusqlite::Result<u64> {
    if through <= after {
        return Ok(0);
    }
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT patient_ref, {column} = ?3, COUNT(*) FROM {table}
         WHERE position > ?1 AND position <= ?2 AND patient_ref IS NOT NULL
         GROUP BY patient_ref, {column} = ?3"
    ))?;
    let mut rows = stmt.query(params![after, through, ERASED_MARKER])?;
    let mut n = 0u64;
    while let Some(r) = rows.next()? {
        let patient: String = r.get(0)?;
        let marker: bool = r.get::<_, Option<bool>>(1)?.unwrap_or(false);
        if marker || erased_subjects.contains(&patient) {
            n += i2u(r.get(2)?);
        }
    }
    Ok(n)
}

/// Adds `withheld` to the counts of `target` (of `kind`), inside the caller's transaction.
fn add_withheld(
    tx: &rusqlite::Transaction<'_>,
    target: &str,
    kind: &str,
    withheld: &[(&str, u64)],
) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO withheld (target, kind, reason, count) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(target, kind, reason) DO UPDATE SET count = count + ?4",
    )?;
    for (reason, n) in withheld.iter().filter(|(_, n)| *n > 0) {
        stmt.execute(params![target, kind, reason, u2i(*n)])?;
    }
    Ok(())
}
