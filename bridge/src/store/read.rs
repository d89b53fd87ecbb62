//! The read side: typed rows for `vitalmq store`, `vitalmq trace`, the demo report and
//! tests. A row serializes to the JSON object `vitalmq store` prints for it: field names
//! and order are that output format. Stored text that does not parse into its type (a
//! device id, a verdict, a refusal class) is a read error, not a guess.

use rusqlite::types::Type;
use rusqlite::{OptionalExtension as _, Row, params};
use serde::{Serialize, Serializer};
use vitalmq_envelope::{DeviceId, ReasonClass};
use vitalmq_policies::SiteId;

use super::schema::{EVENT_INDEX_BUCKET, event_key};
use super::sealing::{PayloadMarks, alert_context, column_bytes, normalized_context};
use super::{Store, StoreError, i2u};
use crate::gaps::GapState;
use crate::normalize::EventId;
use crate::window::{Accepted, Verdict};

/// What every read of an accepted event starts with: where it is in the outbox, which
/// event of which device it is, and how its sequence number was judged. Flattened into
/// [`EventRow`] and [`EventDetail`], read from [`EVENT_HEAD_COLUMNS`] by one mapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventHead {
    /// Its outbox position.
    pub position: i64,
    pub event_id: EventId,
    pub device: DeviceId,
    pub site: SiteId,
    pub epoch: u64,
    pub seq: u64,
    #[serde(serialize_with = "verdict_text")]
    pub verdict: Accepted,
}

/// The columns of an [`EventHead`] (`events e`), in the order [`event_head`] reads them.
pub(super) const EVENT_HEAD_COLUMNS: &str =
    "e.position, e.event_id, e.device, e.site, e.epoch, e.seq, e.verdict";

/// One accepted event, without its bodies (`vitalmq store events`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventRow {
    #[serde(flatten)]
    pub head: EventHead,
    pub received_at_ms: u64,
    /// SHA-256 (hex) of the raw message.
    pub raw_sha256: String,
    /// Set when the event's patient was erased.
    #[serde(flatten)]
    pub marks: PayloadMarks,
}

/// One refused message, without its bytes (`vitalmq store quarantine`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuarantineRow {
    pub id: i64,
    pub received_at_ms: u64,
    pub topic: String,
    /// The device of the topic, when it named one.
    pub device: Option<DeviceId>,
    pub reason: ReasonClass,
    pub detail: String,
    pub sha256: String,
}

/// One data-completeness event (`vitalmq store gaps`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GapRow {
    pub device: DeviceId,
    pub epoch: u64,
    pub first: u64,
    pub last: u64,
    pub filled: u64,
    #[serde(serialize_with = "gap_state_text")]
    pub state: GapState,
    pub opened_at_ms: u64,
    pub changed_at_ms: u64,
}

/// One recorded alert state change, its body as published (`vitalmq store alerts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AlertRow {
    pub position: i64,
    pub alert_id: String,
    pub state: String,
    /// `clinical` or `operational`.
    pub kind: String,
    pub topic: String,
    pub device: Option<DeviceId>,
    pub rule: Option<String>,
    pub created_at_ms: u64,
    /// The alert JSON exactly as published (empty when erased or sealed).
    pub body: String,
    #[serde(flatten)]
    pub marks: PayloadMarks,
}

/// One alert state change as a trace shows it: the body parsed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertChangeRow {
    pub position: i64,
    pub alert_id: String,
    pub state: String,
    pub topic: String,
    pub recorded_at_ms: u64,
    /// The published alert JSON (a string if it somehow is not JSON; null when erased
    /// or sealed).
    pub body: serde_json::Value,
    #[serde(flatten)]
    pub marks: PayloadMarks,
}

/// One event with its raw-plane row and normalized body (`vitalmq trace`). Serializes
/// without `raw`: the trace writes that with where the raw bytes are kept.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventDetail {
    #[serde(flatten)]
    pub head: EventHead,
    pub observed_at_ms: u64,
    pub received_at_ms: u64,
    /// The normalized event (a string if it somehow is not JSON; null when erased or
    /// sealed).
    pub normalized: serde_json::Value,
    #[serde(flatten)]
    pub marks: PayloadMarks,
    #[serde(skip)]
    pub raw: RawRef,
}

/// Where an event's raw message is kept, and what it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RawRef {
    /// Its `raw_messages` row.
    pub store_row: i64,
    pub sha256: String,
    pub topic: String,
    pub broker: String,
    pub publisher: String,
    /// Its length.
    pub bytes: i64,
}

/// Totals (`vitalmq store stats`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreStats {
    pub events: u64,
    /// Devices with a sequence window.
    pub devices: u64,
    /// Refused messages by reason class.
    pub quarantine: Tally,
    /// Per-device counters summed by name (`duplicate`, `replay`, refusal classes).
    pub counters: Tally,
    /// Gaps by state.
    pub gaps: Tally,
    /// Sink -> delivered through (outbox position).
    pub sinks: Tally,
    /// `kind/state` -> alert state changes.
    pub alerts: Tally,
    /// Alert handler -> delivered through (alert position).
    pub alert_handlers: Tally,
    /// `sink/reason` -> events withheld from the sink by consent (issue 19; reasons
    /// `no_consent`, `withdrawn`, `unassigned`). Left out while nothing was withheld.
    #[serde(skip_serializing_if = "Tally::is_empty")]
    pub withheld: Tally,
    /// `handler/reason` -> alert changes withheld from the handler by consent. Left out
    /// while nothing was withheld.
    #[serde(skip_serializing_if = "Tally::is_empty")]
    pub alerts_withheld: Tally,
    /// Highest outbox position.
    pub head: i64,
}

/// Named counts in the store's order, serialized as a JSON object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally(Vec<(String, i64)>);

impl Tally {
    /// The count of `name`, 0 when absent.
    pub fn get(&self, name: &str) -> i64 {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, v)| *v)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, i64)> {
        self.0.iter().map(|(n, v)| (n.as_str(), *v))
    }
}

impl<S: Into<String>> FromIterator<(S, i64)> for Tally {
    fn from_iter<I: IntoIterator<Item = (S, i64)>>(items: I) -> Self {
        Self(items.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }
}

impl Serialize for Tally {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

fn verdict_text<S: Serializer>(verdict: &Accepted, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&Verdict::Accept(*verdict))
}

fn gap_state_text<S: Serializer>(state: &GapState, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(state.as_str())
}

/// A stored verdict: `first_seen`, `new_epoch`, `in_order`, `out_of_order`, `missing=N`.
fn parse_verdict(text: &str) -> Option<Accepted> {
    Some(match text {
        "first_seen" => Accepted::FirstSeen,
        "new_epoch" => Accepted::NewEpoch,
        "in_order" => Accepted::InOrder,
        "out_of_order" => Accepted::OutOfOrder,
        _ => Accepted::Gap {
            missing: text.strip_prefix("missing=")?.parse().ok()?,
        },
    })
}

fn parse_gap_state(text: &str) -> Option<GapState> {
    [GapState::Open, GapState::Closed, GapState::Lost]
        .into_iter()
        .find(|s| s.as_str() == text)
}

fn parse_reason(text: &str) -> Option<ReasonClass> {
    ReasonClass::ALL.into_iter().find(|r| r.as_str() == text)
}

/// Column `i` as text parsed by `parse`; a conversion error names the column.
fn typed<T>(
    r: &Row<'_>,
    i: usize,
    what: &'static str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> rusqlite::Result<T> {
    let text: String = r.get(i)?;
    parse(&text).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            Type::Text,
            format!("not {what}: {text:?}").into(),
        )
    })
}

fn device(r: &Row<'_>, i: usize) -> rusqlite::Result<DeviceId> {
    typed(r, i, "a device id", |t| DeviceId::new(t).ok())
}

fn site(r: &Row<'_>, i: usize) -> rusqlite::Result<SiteId> {
    typed(r, i, "a site id", |t| SiteId::new(t).ok())
}

fn verdict(r: &Row<'_>, i: usize) -> rusqlite::Result<Accepted> {
    typed(r, i, "a sequence verdict", parse_verdict)
}

/// The [`EventHead`] in the first columns of `r` ([`EVENT_HEAD_COLUMNS`]).
pub(super) fn event_head(r: &Row<'_>) -> rusqlite::Result<EventHead> {
    Ok(EventHead {
        position: r.get(0)?,
        event_id: EventId::stored(r.get(1)?),
        device: device(r, 2)?,
        site: site(r, 3)?,
        epoch: i2u(r.get(4)?),
        seq: i2u(r.get(5)?),
        verdict: verdict(r, 6)?,
    })
}

fn optional_device(r: &Row<'_>, i: usize) -> rusqlite::Result<Option<DeviceId>> {
    match r.get::<_, Option<String>>(i)? {
        None => Ok(None),
        Some(_) => device(r, i).map(Some),
    }
}

impl AlertRow {
    fn with_stored(self, stored: Vec<u8>) -> (Self, Vec<u8>) {
        (self, stored)
    }
}

impl Store {
    fn rows<T>(
        &self,
        sql: &str,
        row: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, StoreError> {
        let mut stmt = self.conn.prepare(sql).map_err(|e| self.err(e))?;
        stmt.query_map([], row)
            .and_then(Iterator::collect)
            .map_err(|e| self.err(e))
    }

    /// Accepted events in outbox order; an erased patient's are marked erased (told
    /// from the keyring's tombstones, no key needed).
    pub fn list_events(&self) -> Result<Vec<EventRow>, StoreError> {
        let rows = self.rows(
            &format!(
                "SELECT {EVENT_HEAD_COLUMNS}, e.received_at_ms, r.sha256, e.normalized
                 FROM events e JOIN raw_messages r ON r.id = e.raw_id ORDER BY e.position"
            ),
            |r| {
                Ok((
                    EventRow {
                        head: event_head(r)?,
                        received_at_ms: i2u(r.get(7)?),
                        raw_sha256: r.get(8)?,
                        marks: PayloadMarks::default(),
                    },
                    column_bytes(r, 9)?,
                ))
            },
        )?;
        let mut out = Vec::with_capacity(rows.len());
        for (mut row, normalized) in rows {
            if let Some(at) = self.payload_erased(&normalized)? {
                row.marks.erased = true;
                row.marks.erased_at_ms = (at > 0).then_some(at);
            }
            out.push(row);
        }
        Ok(out)
    }

    /// Refused messages in the order they came.
    pub fn list_quarantine(&self) -> Result<Vec<QuarantineRow>, StoreError> {
        self.rows(
            "SELECT id, received_at_ms, topic, device, reason, detail, sha256 FROM quarantine ORDER BY id",
            |r| {
                Ok(QuarantineRow {
                    id: r.get(0)?,
                    received_at_ms: i2u(r.get(1)?),
                    topic: r.get(2)?,
                    device: optional_device(r, 3)?,
                    reason: typed(r, 4, "a refusal class", parse_reason)?,
                    detail: r.get(5)?,
                    sha256: r.get(6)?,
                })
            },
        )
    }

    /// Every gap with its state.
    pub fn list_gaps(&self) -> Result<Vec<GapRow>, StoreError> {
        self.rows(
            "SELECT device, epoch, first, last, filled, state, opened_at_ms, changed_at_ms
             FROM gaps ORDER BY device, epoch, first",
            |r| {
                Ok(GapRow {
                    device: device(r, 0)?,
                    epoch: i2u(r.get(1)?),
                    first: i2u(r.get(2)?),
                    last: i2u(r.get(3)?),
                    filled: i2u(r.get(4)?),
                    state: typed(r, 5, "a gap state", parse_gap_state)?,
                    opened_at_ms: i2u(r.get(6)?),
                    changed_at_ms: i2u(r.get(7)?),
                })
            },
        )
    }

    /// Every recorded alert state change, in order (the bodies as published; opened
    /// when sealed, marked when erased or not openable here).
    pub fn list_alerts(&self) -> Result<Vec<AlertRow>, StoreError> {
        let rows = self.rows(
            "SELECT position, alert_id, state, kind, topic, device, rule, created_at_ms, body
             FROM alerts ORDER BY position",
            |r| {
                Ok(AlertRow {
                    position: r.get(0)?,
                    alert_id: r.get(1)?,
                    state: r.get(2)?,
                    kind: r.get(3)?,
                    topic: r.get(4)?,
                    device: optional_device(r, 5)?,
                    rule: r.get(6)?,
                    created_at_ms: i2u(r.get(7)?),
                    body: String::new(),
                    marks: PayloadMarks::default(),
                }
                .with_stored(column_bytes(r, 8)?))
            },
        )?;
        rows.into_iter()
            .map(|(mut row, stored)| {
                let payload =
                    self.open_payload(&stored, &alert_context(&row.alert_id, &row.state))?;
                row.body = payload.text();
                row.marks = payload.marks();
                Ok(row)
            })
            .collect()
    }

    /// The alert changes of `rules` recorded in `[since_ms, until_ms)` (bridge clock), in
    /// order, bodies opened like [`Store::list_alerts`]: only those rows are opened
    /// (`vitalmq models compare`).
    pub fn alerts_of_rules(
        &self,
        rules: &[&str],
        since_ms: Option<u64>,
        until_ms: Option<u64>,
    ) -> Result<Vec<AlertRow>, StoreError> {
        let marks = vec!["?"; rules.len()].join(", ");
        let sql = format!(
            "SELECT position, alert_id, state, kind, topic, device, rule, created_at_ms, body
             FROM alerts WHERE rule IN ({marks})
                 AND (?{a} IS NULL OR created_at_ms >= ?{a}) AND (?{b} IS NULL OR created_at_ms < ?{b})
             ORDER BY position",
            a = rules.len() + 1,
            b = rules.len() + 2,
        );
        let mut values: Vec<rusqlite::types::Value> = rules
            .iter()
            .map(|r| rusqlite::types::Value::Text((*r).to_owned()))
            .collect();
        for t in [since_ms, until_ms] {
            values.push(t.map_or(rusqlite::types::Value::Null, |t| {
                rusqlite::types::Value::Integer(super::u2i(t))
            }));
        }
        let mut stmt = self.conn.prepare(&sql).map_err(|e| self.err(e))?;
        let rows: Vec<(AlertRow, Vec<u8>)> = stmt
            .query_map(rusqlite::params_from_iter(values), |r| {
                Ok(AlertRow {
                    position: r.get(0)?,
                    alert_id: r.get(1)?,
                    state: r.get(2)?,
                    kind: r.get(3)?,
                    topic: r.get(4)?,
                    device: optional_device(r, 5)?,
                    rule: r.get(6)?,
                    created_at_ms: i2u(r.get(7)?),
                    body: String::new(),
                    marks: PayloadMarks::default(),
                }
                .with_stored(column_bytes(r, 8)?))
            })
            .and_then(Iterator::collect)
            .map_err(|e| self.err(e))?;
        rows.into_iter()
            .map(|(mut row, stored)| {
                let payload =
                    self.open_payload(&stored, &alert_context(&row.alert_id, &row.state))?;
                row.body = payload.text();
                row.marks = payload.marks();
                Ok(row)
            })
            .collect()
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
    pub fn event_detail(&self, event_id: &str) -> Result<Option<EventDetail>, StoreError> {
        self.event_detail_near(event_id, None)
    }

    /// As [`Store::event_detail`], searching from outbox position `near` (for example
    /// from [`Store::position_near_time`] of an alert that cites the event).
    pub fn event_detail_near(
        &self,
        event_id: &str,
        near: Option<i64>,
    ) -> Result<Option<EventDetail>, StoreError> {
        let Some(position) = self.event_position(event_id, near)? else {
            return Ok(None);
        };
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {EVENT_HEAD_COLUMNS}, e.observed_at_ms, e.received_at_ms, e.normalized,
                        r.id, r.sha256, r.topic, r.broker, r.publisher, length(r.bytes)
                 FROM events e JOIN raw_messages r ON r.id = e.raw_id WHERE e.position = ?1"
            ))
            .map_err(|e| self.err(e))?;
        let found = stmt
            .query_row(params![position], |r| {
                let detail = EventDetail {
                    head: event_head(r)?,
                    observed_at_ms: i2u(r.get(7)?),
                    received_at_ms: i2u(r.get(8)?),
                    normalized: serde_json::Value::Null,
                    marks: PayloadMarks::default(),
                    raw: RawRef {
                        store_row: r.get(10)?,
                        sha256: r.get(11)?,
                        topic: r.get(12)?,
                        broker: r.get(13)?,
                        publisher: r.get(14)?,
                        bytes: r.get(15)?,
                    },
                };
                Ok((detail, column_bytes(r, 9)?))
            })
            .optional()
            .map_err(|e| self.err(e))?;
        let Some((mut detail, stored)) = found else {
            return Ok(None);
        };
        let payload =
            self.open_payload(&stored, &normalized_context(detail.head.event_id.as_str()))?;
        detail.normalized = payload.json();
        detail.marks = payload.marks();
        Ok(Some(detail))
    }

    /// Every state change of one alert, in order.
    pub fn alert_history(&self, alert_id: &str) -> Result<Vec<AlertChangeRow>, StoreError> {
        self.alert_changes("WHERE alert_id = ?1", alert_id)
    }

    /// Alert state changes whose body names `event_id` (as evidence). Sealed bodies
    /// are opened to look; an erased one cannot say what it cited and is left out.
    pub fn alerts_citing(&self, event_id: &str) -> Result<Vec<AlertChangeRow>, StoreError> {
        let rows = self.alert_changes(
            "WHERE body LIKE '%' || ?1 || '%' OR typeof(body) = 'blob'",
            event_id,
        )?;
        Ok(rows
            .into_iter()
            .filter(|a| a.body.to_string().contains(event_id))
            .collect())
    }

    fn alert_changes(&self, filter: &str, arg: &str) -> Result<Vec<AlertChangeRow>, StoreError> {
        let sql = format!(
            "SELECT position, alert_id, state, topic, created_at_ms, body FROM alerts {filter} ORDER BY position"
        );
        let mut stmt = self.conn.prepare(&sql).map_err(|e| self.err(e))?;
        let rows: Vec<(AlertChangeRow, Vec<u8>)> = stmt
            .query_map(params![arg], |r| {
                Ok((
                    AlertChangeRow {
                        position: r.get(0)?,
                        alert_id: r.get(1)?,
                        state: r.get(2)?,
                        topic: r.get(3)?,
                        recorded_at_ms: i2u(r.get(4)?),
                        body: serde_json::Value::Null,
                        marks: PayloadMarks::default(),
                    },
                    column_bytes(r, 5)?,
                ))
            })
            .and_then(Iterator::collect)
            .map_err(|e| self.err(e))?;
        rows.into_iter()
            .map(|(mut row, stored)| {
                let payload =
                    self.open_payload(&stored, &alert_context(&row.alert_id, &row.state))?;
                row.body = payload.json();
                row.marks = payload.marks();
                Ok(row)
            })
            .collect()
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

    /// Totals: events, quarantine by reason, counters by name, gaps by state, cursors.
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let tally = |sql: &str| -> Result<Tally, StoreError> {
            self.rows(sql, |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map(Tally)
        };
        let count = |sql: &str| -> Result<u64, StoreError> {
            self.conn
                .query_row(sql, [], |r| r.get::<_, i64>(0))
                .map(i2u)
                .map_err(|e| self.err(e))
        };
        Ok(StoreStats {
            events: count("SELECT COUNT(*) FROM events")?,
            devices: count("SELECT COUNT(*) FROM device_state")?,
            quarantine: tally("SELECT reason, COUNT(*) FROM quarantine GROUP BY reason")?,
            counters: tally("SELECT name, SUM(value) FROM counters GROUP BY name")?,
            gaps: tally("SELECT state, COUNT(*) FROM gaps GROUP BY state")?,
            sinks: tally("SELECT sink, delivered_through FROM sink_cursors")?,
            alerts: tally(
                "SELECT kind || '/' || state, COUNT(*) FROM alerts GROUP BY kind, state",
            )?,
            alert_handlers: tally("SELECT handler, delivered_through FROM handler_cursors")?,
            withheld: tally(
                "SELECT target || '/' || reason, count FROM withheld WHERE kind = 'sink' ORDER BY target, reason",
            )?,
            alerts_withheld: tally(
                "SELECT target || '/' || reason, count FROM withheld WHERE kind = 'handler' ORDER BY target, reason",
            )?,
            head: self.head()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_verdict_reads_back_as_it_is_written() {
        for a in [
            Accepted::FirstSeen,
            Accepted::NewEpoch,
            Accepted::InOrder,
            Accepted::OutOfOrder,
            Accepted::Gap { missing: 3 },
            Accepted::Gap { missing: u64::MAX },
        ] {
            assert_eq!(parse_verdict(&Verdict::Accept(a).to_string()), Some(a));
        }
        assert_eq!(parse_verdict("missing=x"), None);
        assert_eq!(parse_verdict("duplicate"), None);
    }

    #[test]
    fn every_refusal_class_and_gap_state_reads_back() {
        for r in ReasonClass::ALL {
            assert_eq!(parse_reason(r.as_str()), Some(r));
        }
        for s in [GapState::Open, GapState::Closed, GapState::Lost] {
            assert_eq!(parse_gap_state(s.as_str()), Some(s));
        }
    }
}
