//! The read side, for `vitalmq store`, `vitalmq trace`, the demo report and tests.

use rusqlite::{OptionalExtension as _, params};

use super::schema::{EVENT_INDEX_BUCKET, event_key};
use super::{Store, StoreError, i2u};

/// Read-only views for `vitalmq store` and tests: one JSON object per row.
impl Store {
    fn rows_json(&self, sql: &str, columns: &[&str]) -> Result<Vec<serde_json::Value>, StoreError> {
        let mut stmt = self.conn.prepare(sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                let mut obj = serde_json::Map::new();
                for (i, name) in columns.iter().enumerate() {
                    let v = match r.get_ref(i)? {
                        rusqlite::types::ValueRef::Null => serde_json::Value::Null,
                        rusqlite::types::ValueRef::Integer(n) if U64_COLUMNS.contains(name) => {
                            serde_json::Value::from(i2u(n))
                        }
                        rusqlite::types::ValueRef::Integer(n) => serde_json::Value::from(n),
                        rusqlite::types::ValueRef::Real(f) => serde_json::Value::from(f),
                        rusqlite::types::ValueRef::Text(t) => {
                            serde_json::Value::from(String::from_utf8_lossy(t).into_owned())
                        }
                        rusqlite::types::ValueRef::Blob(b) => {
                            serde_json::Value::from(hex::encode(b))
                        }
                    };
                    obj.insert((*name).to_owned(), v);
                }
                Ok(serde_json::Value::Object(obj))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// Accepted events in outbox order (without the normalized body).
    pub fn list_events(&self) -> Result<Vec<serde_json::Value>, StoreError> {
        self.rows_json(
            "SELECT e.position, e.event_id, e.device, e.site, e.epoch, e.seq, e.verdict,
                    e.received_at_ms, r.sha256 AS raw_sha256
             FROM events e JOIN raw_messages r ON r.id = e.raw_id ORDER BY e.position",
            &[
                "position",
                "event_id",
                "device",
                "site",
                "epoch",
                "seq",
                "verdict",
                "received_at_ms",
                "raw_sha256",
            ],
        )
    }

    /// Refused messages (without the bytes).
    pub fn list_quarantine(&self) -> Result<Vec<serde_json::Value>, StoreError> {
        self.rows_json(
            "SELECT id, received_at_ms, topic, device, reason, detail, sha256 FROM quarantine ORDER BY id",
            &["id", "received_at_ms", "topic", "device", "reason", "detail", "sha256"],
        )
    }

    /// Every gap with its state.
    pub fn list_gaps(&self) -> Result<Vec<serde_json::Value>, StoreError> {
        self.rows_json(
            "SELECT device, epoch, first, last, filled, state, opened_at_ms, changed_at_ms
             FROM gaps ORDER BY device, epoch, first",
            &[
                "device",
                "epoch",
                "first",
                "last",
                "filled",
                "state",
                "opened_at_ms",
                "changed_at_ms",
            ],
        )
    }

    /// An outbox position whose event was received about `ms` (bridge clock): a lookup
    /// hint for [`Store::event_detail_near`]. Binary search over positions, which follow
    /// reception order except across a clock step, where the hint is merely less good.
    pub fn position_near_time(&self, ms: u64) -> Result<i64, StoreError> {
        let mut at = self
            .conn
            .prepare_cached("SELECT received_at_ms FROM events WHERE position = ?1")
            .map_err(|e| self.err(e))?;
        let (mut lo, mut hi) = (1, self.head()?);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let received: Option<i64> = at
                .query_row(params![mid], |r| r.get(0))
                .optional()
                .map_err(|e| self.err(e))?;
            if received.is_some_and(|r| i2u(r) < ms) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    /// The outbox position of the event with this id, if stored. Buckets are probed
    /// outwards from the one holding `near` (earlier ones first), or newest first.
    fn event_position(&self, event_id: &str, near: Option<i64>) -> Result<Option<i64>, StoreError> {
        let last = self.head()? / EVENT_INDEX_BUCKET;
        let start = near.map_or(last, |p| (p / EVENT_INDEX_BUCKET).clamp(0, last));
        let order = std::iter::once(start).chain((1..).flat_map(|d| [start - d, start + d]));
        let mut probed = 0;
        for bucket in order {
            if probed > last {
                break;
            }
            if !(0..=last).contains(&bucket) {
                continue;
            }
            probed += 1;
            if let Some(found) = self.event_in_bucket(event_id, bucket)? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    fn event_in_bucket(&self, event_id: &str, bucket: i64) -> Result<Option<i64>, StoreError> {
        let key = event_key(event_id);
        let mut candidates = self
            .conn
            .prepare_cached(
                "SELECT i.position FROM event_index i JOIN events e ON e.position = i.position
                 WHERE i.bucket = ?1 AND i.key = ?2 AND e.event_id = ?3",
            )
            .map_err(|e| self.err(e))?;
        candidates
            .query_row(params![bucket, key, event_id], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))
    }

    /// One event with its raw-plane row and normalized body, by event id.
    pub fn event_detail(&self, event_id: &str) -> Result<Option<serde_json::Value>, StoreError> {
        self.event_detail_near(event_id, None)
    }

    /// As [`Store::event_detail`], searching from outbox position `near` (for example
    /// from [`Store::position_near_time`] of an alert that cites the event).
    pub fn event_detail_near(
        &self,
        event_id: &str,
        near: Option<i64>,
    ) -> Result<Option<serde_json::Value>, StoreError> {
        let Some(position) = self.event_position(event_id, near)? else {
            return Ok(None);
        };
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT e.position, e.event_id, e.device, e.site, e.epoch, e.seq, e.verdict,
                        e.observed_at_ms, e.received_at_ms, e.normalized,
                        r.id, r.sha256, r.topic, r.broker, r.publisher, length(r.bytes)
                 FROM events e JOIN raw_messages r ON r.id = e.raw_id WHERE e.position = ?1",
            )
            .map_err(|e| self.err(e))?;
        stmt.query_row(params![position], |r| {
            let normalized: String = r.get(9)?;
            Ok(serde_json::json!({
                "position": r.get::<_, i64>(0)?,
                "event_id": r.get::<_, String>(1)?,
                "device": r.get::<_, String>(2)?,
                "site": r.get::<_, String>(3)?,
                "epoch": i2u(r.get(4)?),
                "seq": i2u(r.get(5)?),
                "verdict": r.get::<_, String>(6)?,
                "observed_at_ms": i2u(r.get(7)?),
                "received_at_ms": i2u(r.get(8)?),
                "normalized": serde_json::from_str::<serde_json::Value>(&normalized)
                    .unwrap_or(serde_json::Value::String(normalized)),
                "raw": {
                    "store_row": r.get::<_, i64>(10)?,
                    "sha256": r.get::<_, String>(11)?,
                    "topic": r.get::<_, String>(12)?,
                    "broker": r.get::<_, String>(13)?,
                    "publisher": r.get::<_, String>(14)?,
                    "bytes": r.get::<_, i64>(15)?,
                },
            }))
        })
        .optional()
        .map_err(|e| self.err(e))
    }

    /// Every state change of one alert, in order.
    pub fn alert_history(&self, alert_id: &str) -> Result<Vec<serde_json::Value>, StoreError> {
        self.alert_rows("WHERE alert_id = ?1", alert_id)
    }

    /// Alert state changes whose evidence names `event_id`.
    pub fn alerts_citing(&self, event_id: &str) -> Result<Vec<serde_json::Value>, StoreError> {
        self.alert_rows("WHERE body LIKE '%' || ?1 || '%'", event_id)
    }

    fn alert_rows(&self, filter: &str, arg: &str) -> Result<Vec<serde_json::Value>, StoreError> {
        let sql = format!(
            "SELECT position, alert_id, state, topic, created_at_ms, body FROM alerts {filter} ORDER BY position"
        );
        let mut stmt = self.conn.prepare(&sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![arg], |r| {
                let body: String = r.get(5)?;
                Ok(serde_json::json!({
                    "position": r.get::<_, i64>(0)?,
                    "alert_id": r.get::<_, String>(1)?,
                    "state": r.get::<_, String>(2)?,
                    "topic": r.get::<_, String>(3)?,
                    "recorded_at_ms": i2u(r.get(4)?),
                    "body": serde_json::from_str::<serde_json::Value>(&body)
                        .unwrap_or(serde_json::Value::String(body)),
                }))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// Sinks whose cursor has passed `position`: `(sink, delivered_through)`.
    pub fn sinks_past(&self, position: i64) -> Result<Vec<(String, i64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT sink, delivered_through FROM sink_cursors WHERE delivered_through >= ?1",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![position], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// Every recorded alert state change, in order (the bodies as published).
    pub fn list_alerts(&self) -> Result<Vec<serde_json::Value>, StoreError> {
        self.rows_json(
            "SELECT position, alert_id, state, kind, topic, device, rule, created_at_ms, body
             FROM alerts ORDER BY position",
            &[
                "position",
                "alert_id",
                "state",
                "kind",
                "topic",
                "device",
                "rule",
                "created_at_ms",
                "body",
            ],
        )
    }

    /// Totals: events, quarantine by reason, counters by name, gaps by state, cursors.
    pub fn stats(&self) -> Result<serde_json::Value, StoreError> {
        let pairs = |sql: &str| -> Result<serde_json::Map<String, serde_json::Value>, StoreError> {
            let mut stmt = self.conn.prepare(sql).map_err(|e| self.err(e))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(|e| self.err(e))?;
            let mut m = serde_json::Map::new();
            for row in rows {
                let (k, v) = row.map_err(|e| self.err(e))?;
                m.insert(k, serde_json::Value::from(v));
            }
            Ok(m)
        };
        let events: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        Ok(serde_json::json!({
            "events": events,
            "devices": self.conn.query_row("SELECT COUNT(*) FROM device_state", [], |r| r.get::<_, i64>(0)).map_err(|e| self.err(e))?,
            "quarantine": pairs("SELECT reason, COUNT(*) FROM quarantine GROUP BY reason")?,
            "counters": pairs("SELECT name, SUM(value) FROM counters GROUP BY name")?,
            "gaps": pairs("SELECT state, COUNT(*) FROM gaps GROUP BY state")?,
            "sinks": pairs("SELECT sink, delivered_through FROM sink_cursors")?,
            "alerts": pairs("SELECT kind || '/' || state, COUNT(*) FROM alerts GROUP BY kind, state")?,
            "alert_handlers": pairs("SELECT handler, delivered_through FROM handler_cursors")?,
            "head": self.head()?,
        }))
    }
}

/// Columns holding bit-cast `u64` values.
const U64_COLUMNS: &[&str] = &[
    "epoch",
    "seq",
    "first",
    "last",
    "filled",
    "received_at_ms",
    "opened_at_ms",
    "changed_at_ms",
];
