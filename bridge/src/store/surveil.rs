//! What the surveillance sink (`sink::parquet`) reads besides the events outbox: the
//! quarantine (refusals), the gaps and the scores, each after a cursor kept in
//! `handler_cursors` under a name of its own (`surveil:<sink>:<table>`).

use rusqlite::params;

use super::sealing::{Payload, column_bytes, normalized_context};
use super::{Store, StoreError, i2u};

/// A quarantined message, as the data set's `refusals` table needs it (no payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRefusal {
    pub id: i64,
    pub received_at_ms: u64,
    pub device: Option<String>,
    pub reason: String,
}

/// A gap, followed by its `rowid`: gaps are keyed by `(device, epoch, first)`, but
/// SQLite gives each row a rowid that grows with insertion and is kept by updates, so
/// it orders them as they were opened (a gap is exported once, in the state it has
/// when the sink reads it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredGap {
    pub rowid: i64,
    pub device: String,
    pub epoch: i64,
    pub first: i64,
    pub last: i64,
    pub state: String,
    pub opened_at_ms: u64,
}

/// What a device last reported at or before a time (firmware, model and the bridge's
/// judgement of it), from its newest event by `observed_at` not after that time: the
/// one rule by which rows that carry none of these (gaps, refusals, alerts without
/// them) are attributed, in the Parquet sink and in `vitalmq surveil` alike.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reported {
    pub fw: Option<String>,
    pub model: Option<String>,
    pub model_status: Option<String>,
}

impl Reported {
    /// The fields of a normalized event (`vitalmq-event/v1` JSON).
    pub fn of_event(event: &serde_json::Value) -> Self {
        let text = |v: &serde_json::Value, k: &str| {
            v.get(k)
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
        };
        let provenance = event.get("provenance").cloned().unwrap_or_default();
        Self {
            fw: text(event, "fw"),
            model: text(event, "model"),
            model_status: text(&provenance, "model_status")
                .or_else(|| provenance.get("model").and_then(|m| text(m, "status")))
                .or_else(|| text(event, "model_status")),
        }
    }
}

/// A score row with its payload opened (JSON `vitalmq-score/v1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SurveilScore {
    pub id: i64,
    pub device: String,
    pub observed_at_ms: u64,
    pub payload: String,
}

impl Store {
    /// Up to `max` quarantined messages with ids above `after`, in order.
    pub fn refusals_after(&self, after: i64, max: usize) -> Result<Vec<StoredRefusal>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, received_at_ms, device, reason FROM quarantine
                 WHERE id > ?1 ORDER BY id LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![after, limit(max)], |r| {
                Ok(StoredRefusal {
                    id: r.get(0)?,
                    received_at_ms: i2u(r.get(1)?),
                    device: r.get(2)?,
                    reason: r.get(3)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Up to `max` gaps with rowids above `after`, in order.
    pub fn gaps_after(&self, after: i64, max: usize) -> Result<Vec<StoredGap>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT rowid, device, epoch, first, last, state, opened_at_ms FROM gaps
                 WHERE rowid > ?1 ORDER BY rowid LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![after, limit(max)], |r| {
                Ok(StoredGap {
                    rowid: r.get(0)?,
                    device: r.get(1)?,
                    epoch: r.get(2)?,
                    first: r.get(3)?,
                    last: r.get(4)?,
                    state: r.get(5)?,
                    opened_at_ms: i2u(r.get(6)?),
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// What `device` last reported at or before `at_ms` ([`Reported`]); empty when it
    /// sent nothing by then or that event's payload was erased.
    pub fn reported_at(&self, device: &str, at_ms: u64) -> Result<Reported, StoreError> {
        let at = i64::try_from(at_ms).unwrap_or(i64::MAX);
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT event_id, normalized FROM events
                 WHERE device = ?1 AND observed_at_ms <= ?2
                 ORDER BY observed_at_ms DESC, position DESC LIMIT 1",
            )
            .map_err(|e| self.err(e))?;
        let found = stmt
            .query_map(params![device, at], |r| {
                Ok((r.get::<_, String>(0)?, column_bytes(r, 1)?))
            })
            .map_err(|e| self.err(e))?
            .next()
            .transpose()
            .map_err(|e| self.err(e))?;
        let Some((event_id, stored)) = found else {
            return Ok(Reported::default());
        };
        match self.open_payload(&stored, &normalized_context(&event_id))? {
            Payload::Plain(p) => Ok(serde_json::from_slice(&p)
                .map(|v: serde_json::Value| Reported::of_event(&v))
                .unwrap_or_default()),
            Payload::Erased { .. } => Ok(Reported::default()),
            Payload::Locked => Err(StoreError::NoKeyring {
                path: self.path.clone(),
            }),
        }
    }

    /// Up to `max` scores with ids above `after`, payloads opened (an erased patient's
    /// are left out). The one reader of scores for the surveillance sink.
    pub fn surveil_scores_after(
        &self,
        after: i64,
        max: usize,
    ) -> Result<Vec<SurveilScore>, StoreError> {
        // The store's one reader of scores; this only drops erased rows and refuses
        // sealed ones it cannot open.
        let rows = self.scores(u64::try_from(after).unwrap_or(0), None, max)?;
        let mut out = Vec::with_capacity(rows.len());
        for s in rows {
            match s.payload {
                Payload::Plain(p) => out.push(SurveilScore {
                    id: i64::try_from(s.id).unwrap_or(i64::MAX),
                    device: s.device,
                    observed_at_ms: s.observed_at_ms,
                    payload: String::from_utf8_lossy(&p).into_owned(),
                }),
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
}

fn limit(max: usize) -> i64 {
    i64::try_from(max).unwrap_or(i64::MAX)
}
