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
//! `publisher`, `topic` (they name the device), `broker` and `sha256` (a lookup key
//! back to the signed message, so to device, epoch and seq) are blanked too.
//!
//! Alerts are read in groups: every state row of one alert (`alert_id`) together, at
//! the position of its first state, so all states of an alert are anonymized in one
//! transaction, under one new id ([`anonymized_alert_id`]).
//!
//! Sealed payloads (`[encryption]`) are opened through the store's keyring; an
//! anonymized payload no longer belongs to a patient, so it is sealed again under the
//! system subject [`ANONYMIZED_SUBJECT`] and stays readable after the patient's
//! erasure. Rows of an erased patient read as erased: they can still be deleted or
//! archived, not anonymized (nothing readable is left to keep).

use rusqlite::{OptionalExtension as _, Transaction, params};

use super::sealing::{
    alert_context, column_bytes, normalized_context, score_context, shadow_alert_context,
};
use super::{Payload, Store, StoreError, i2u, u2i};

/// The keyring subject anonymized payloads are sealed under: no patient's.
pub const ANONYMIZED_SUBJECT: &str = "sys:anonymized";

/// The event id of an anonymized event starts so (real ids are `ev1-`): the old id, a
/// hash of device, epoch and seq, would link it back to the device.
pub const ANONYMIZED_ID_PREFIX: &str = "anon-";
/// The id every state of an anonymized alert gets: [`ANONYMIZED_ID_PREFIX`], `a` and
/// the position of the alert's first state (the old id, a hash of device, rule and
/// opening event, would link it back).
pub fn anonymized_alert_id(first_position: i64) -> String {
    format!("{ANONYMIZED_ID_PREFIX}a{first_position}")
}

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
    /// The normalized event JSON; `None` when it cannot be read (erased, or sealed and
    /// this store has no keyring).
    pub normalized: Option<String>,
    /// The patient the event was attributed to (the clear column of schema v4, or the
    /// JSON of older rows).
    pub patient_ref: Option<String>,
    /// Its patient was erased: the payload is unreadable for good.
    pub erased: bool,
    /// Already anonymized (by an earlier run).
    pub anonymized: bool,
    /// The raw row still holds its COSE bytes.
    pub raw_present: bool,
}

/// An alert row (clinical plane): one state change of an alert.
#[derive(Debug, Clone, PartialEq)]
pub struct RetainedAlert {
    pub position: i64,
    pub alert_id: String,
    pub state: String,
    pub topic: String,
    pub device: Option<String>,
    pub created_at_ms: u64,
    /// The body JSON; empty when it cannot be read (erased, or sealed without a key).
    pub body: String,
    /// The patient the alert is about (clear column of schema v4, or the body's).
    pub patient_ref: Option<String>,
    /// Its patient was erased: the body is unreadable for good.
    pub erased: bool,
    /// Already anonymized (by an earlier run).
    pub anonymized: bool,
}

/// One page of alerts: the alerts whose first state lies in the page, each with all
/// its state rows in position order, and the last position the page covered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AlertPage {
    pub alerts: Vec<Vec<RetainedAlert>>,
    /// The key to read the next page after; `None` when there are no more rows.
    pub last: Option<i64>,
}

/// A score row (clinical plane, issue 21).
#[derive(Debug, Clone, PartialEq)]
pub struct RetainedScore {
    pub id: i64,
    pub score_id: String,
    pub device: String,
    pub observed_at_ms: u64,
    pub created_at_ms: u64,
    /// The payload JSON; `None` when it cannot be read (erased, or sealed without a key).
    pub payload: Option<String>,
    pub patient_ref: Option<String>,
    /// Its patient was erased: the payload is unreadable for good.
    pub erased: bool,
    /// Already anonymized (by an earlier run).
    pub anonymized: bool,
}

/// The id an anonymized score gets: [`ANONYMIZED_ID_PREFIX`], `s` and its row id (the
/// old id, a hash of patient, version and reading, would link it back).
pub fn anonymized_score_id(id: i64) -> String {
    format!("{ANONYMIZED_ID_PREFIX}s{id}")
}

/// A shadow alert change row (clinical plane, issue 21): one would-be state change of
/// a rule-set version running in shadow.
#[derive(Debug, Clone, PartialEq)]
pub struct RetainedShadowAlert {
    pub id: i64,
    pub alert_id: String,
    pub version: String,
    pub state: String,
    pub device: String,
    pub at_ms: u64,
    pub created_at_ms: u64,
    /// The payload JSON; empty when it cannot be read (erased, or sealed without a key).
    pub payload: String,
    pub patient_ref: Option<String>,
    /// Its patient was erased: the payload is unreadable for good.
    pub erased: bool,
    /// Already anonymized (by an earlier run).
    pub anonymized: bool,
}

/// One page of shadow alerts: the episodes (rule-set version and `alert_id`) whose
/// first change lies in the page, each with all its changes in id order, and the last
/// id the page covered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShadowAlertPage {
    pub alerts: Vec<Vec<RetainedShadowAlert>>,
    /// The key to read the next page after; `None` when there are no more rows.
    pub last: Option<i64>,
}

/// The `alert_id` every change of an anonymized shadow alert episode gets:
/// [`ANONYMIZED_ID_PREFIX`], `h` and the row id of the episode's first change (the old
/// id, a hash of device, rule and opening event, would link it back).
pub fn anonymized_shadow_alert_id(first_id: i64) -> String {
    format!("{ANONYMIZED_ID_PREFIX}h{first_id}")
}

/// The `change_id` of an anonymized shadow alert change: [`ANONYMIZED_ID_PREFIX`],
/// `hc` and its row id.
pub fn anonymized_shadow_change_id(id: i64) -> String {
    format!("{ANONYMIZED_ID_PREFIX}hc{id}")
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
    /// Replace one state row of an alert by its anonymized form: new id, body (from
    /// `crate::lifecycle::anonymize`), topic and creation time; forget its device and
    /// patient. All states of an alert are in the same batch (one transaction).
    AnonymizeAlert {
        position: i64,
        alert_id: String,
        state: String,
        topic: String,
        created_at_ms: u64,
        body: String,
    },
    DeleteQuarantine {
        id: i64,
    },
    DeleteScore {
        id: i64,
    },
    /// Replace the score by its anonymized form (`json`, from
    /// `crate::lifecycle::anonymize::score`), times coarsened to `hour_ms`; forget its
    /// patient and device.
    AnonymizeScore {
        id: i64,
        json: String,
        hour_ms: u64,
    },
    DeleteShadowAlert {
        id: i64,
    },
    /// Replace one change of a shadow alert episode by its anonymized form: the
    /// episode's new `alert_id`, its own new change id, the payload (from
    /// `crate::lifecycle::anonymize::alert`), times coarsened to `hour_ms`; forget its
    /// patient and device. All changes of an episode are in the same batch.
    AnonymizeShadowAlert {
        id: i64,
        alert_id: String,
        json: String,
        hour_ms: u64,
    },
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
                        e.normalized, e.event_id, length(r.bytes), e.patient_ref
                 FROM events e JOIN raw_messages r ON r.id = e.raw_id
                 WHERE e.position > ?1 ORDER BY e.position LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        stmt.query_map(params![after, limit], |r| {
            let event_id: String = r.get(6)?;
            let raw_len: i64 = r.get(7)?;
            let column_patient: Option<String> = r.get(8)?;
            Ok((
                event_id,
                raw_len,
                column_patient,
                column_bytes(r, 5)?,
                RetainedEvent {
                    position: r.get(0)?,
                    raw_id: r.get(1)?,
                    device: r.get(2)?,
                    observed_at_ms: i2u(r.get(3)?),
                    received_at_ms: i2u(r.get(4)?),
                    normalized: None,
                    patient_ref: None,
                    erased: false,
                    anonymized: false,
                    raw_present: false,
                },
            ))
        })
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| self.err(e))?
        .into_iter()
        .map(|(event_id, raw_len, column_patient, stored, mut row)| {
            let payload = self.open_payload(&stored, &normalized_context(&event_id))?;
            row.erased = payload.is_erased();
            row.normalized = readable(payload);
            row.patient_ref = column_patient.or_else(|| {
                row.normalized
                    .as_deref()
                    .and_then(crate::lifecycle::anonymize::patient_ref)
            });
            row.anonymized = event_id.starts_with(ANONYMIZED_ID_PREFIX);
            row.raw_present = raw_len > 0;
            Ok(row)
        })
        .collect()
    }

    /// The alerts whose first state is among the `limit` alert rows after position
    /// `after`, each with every one of its state rows (also those past the page).
    pub fn retention_alerts(&self, after: i64, limit: usize) -> Result<AlertPage, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT a.position, a.alert_id, NOT EXISTS (
                        SELECT 1 FROM alerts b WHERE b.alert_id = a.alert_id
                                               AND b.position < a.position)
                 FROM alerts a WHERE a.position > ?1 ORDER BY a.position LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        let page: Vec<(i64, String, bool)> = stmt
            .query_map(
                params![after, i64::try_from(limit).unwrap_or(i64::MAX)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .and_then(Iterator::collect)
            .map_err(|e| self.err(e))?;
        let mut out = AlertPage {
            alerts: Vec::new(),
            last: page.last().map(|(p, _, _)| *p),
        };
        for (_, alert_id, first) in page {
            if first {
                out.alerts.push(self.alert_states(&alert_id)?);
            }
        }
        Ok(out)
    }

    /// Every state row of `alert_id`, in position order.
    fn alert_states(&self, alert_id: &str) -> Result<Vec<RetainedAlert>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT position, device, created_at_ms, body, alert_id, state, patient_ref, topic
                 FROM alerts WHERE alert_id = ?1 ORDER BY position",
            )
            .map_err(|e| self.err(e))?;
        stmt.query_map(params![alert_id], |r| {
            let row = RetainedAlert {
                position: r.get(0)?,
                alert_id: r.get(4)?,
                state: r.get(5)?,
                topic: r.get(7)?,
                device: r.get(1)?,
                created_at_ms: i2u(r.get(2)?),
                body: String::new(),
                patient_ref: r.get(6)?,
                erased: false,
                anonymized: false,
            };
            Ok((column_bytes(r, 3)?, row))
        })
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| self.err(e))?
        .into_iter()
        .map(|(stored, mut row)| {
            let payload = self.open_payload(&stored, &alert_context(&row.alert_id, &row.state))?;
            row.erased = payload.is_erased();
            row.body = readable(payload).unwrap_or_default();
            if row.patient_ref.is_none() {
                row.patient_ref = crate::lifecycle::anonymize::patient_ref(&row.body);
            }
            row.anonymized = row.alert_id.starts_with(ANONYMIZED_ID_PREFIX);
            Ok(row)
        })
        .collect()
    }

    /// Up to `limit` score rows after id `after`, in order.
    pub fn retention_scores(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<RetainedScore>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, score_id, device, observed_at_ms, created_at_ms, patient_ref, payload
                 FROM scores WHERE id > ?1 ORDER BY id LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        stmt.query_map(
            params![after, i64::try_from(limit).unwrap_or(i64::MAX)],
            |r| {
                let patient: String = r.get(5)?;
                let row = RetainedScore {
                    id: r.get(0)?,
                    score_id: r.get(1)?,
                    device: r.get(2)?,
                    observed_at_ms: i2u(r.get(3)?),
                    created_at_ms: i2u(r.get(4)?),
                    payload: None,
                    patient_ref: (!patient.is_empty()).then_some(patient),
                    erased: false,
                    anonymized: false,
                };
                Ok((column_bytes(r, 6)?, row))
            },
        )
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| self.err(e))?
        .into_iter()
        .map(|(stored, mut row)| {
            let payload = self.open_payload(&stored, &score_context(&row.score_id))?;
            row.erased = payload.is_erased();
            row.payload = readable(payload);
            row.anonymized = row.score_id.starts_with(ANONYMIZED_ID_PREFIX);
            Ok(row)
        })
        .collect()
    }

    /// The shadow alert episodes whose first change is among the `limit` rows after id
    /// `after`, each with every one of its changes (also those past the page).
    pub fn retention_shadow_alerts(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<ShadowAlertPage, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT a.id, a.version, a.alert_id, NOT EXISTS (
                        SELECT 1 FROM shadow_alerts b WHERE b.alert_id = a.alert_id
                            AND b.version = a.version AND b.id < a.id)
                 FROM shadow_alerts a WHERE a.id > ?1 ORDER BY a.id LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        let page: Vec<(i64, String, String, bool)> = stmt
            .query_map(
                params![after, i64::try_from(limit).unwrap_or(i64::MAX)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .and_then(Iterator::collect)
            .map_err(|e| self.err(e))?;
        let mut out = ShadowAlertPage {
            alerts: Vec::new(),
            last: page.last().map(|(id, ..)| *id),
        };
        for (_, version, alert_id, first) in page {
            if first {
                out.alerts
                    .push(self.shadow_alert_changes(&version, &alert_id)?);
            }
        }
        Ok(out)
    }

    /// Every change of the shadow alert episode `alert_id` of `version`, in id order.
    fn shadow_alert_changes(
        &self,
        version: &str,
        alert_id: &str,
    ) -> Result<Vec<RetainedShadowAlert>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, alert_id, version, state, device, at_ms, created_at_ms,
                        patient_ref, change_id, payload
                 FROM shadow_alerts WHERE alert_id = ?1 AND version = ?2 ORDER BY id",
            )
            .map_err(|e| self.err(e))?;
        stmt.query_map(params![alert_id, version], |r| {
            let patient: String = r.get(7)?;
            let change_id: String = r.get(8)?;
            let row = RetainedShadowAlert {
                id: r.get(0)?,
                alert_id: r.get(1)?,
                version: r.get(2)?,
                state: r.get(3)?,
                device: r.get(4)?,
                at_ms: i2u(r.get(5)?),
                created_at_ms: i2u(r.get(6)?),
                payload: String::new(),
                patient_ref: (!patient.is_empty()).then_some(patient),
                erased: false,
                anonymized: false,
            };
            Ok((change_id, column_bytes(r, 9)?, row))
        })
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| self.err(e))?
        .into_iter()
        .map(|(change_id, stored, mut row)| {
            let payload = self.open_payload(&stored, &shadow_alert_context(&change_id))?;
            row.erased = payload.is_erased();
            row.payload = readable(payload).unwrap_or_default();
            row.anonymized = row.alert_id.starts_with(ANONYMIZED_ID_PREFIX);
            Ok(row)
        })
        .collect()
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
        // Anonymized payloads are sealed (under no patient's key) before the transaction.
        let mut stored = Vec::with_capacity(acts.len());
        for act in acts {
            stored.push(match act {
                StoreAct::AnonymizeEvent { position, json, .. } => Some(self.seal_anonymized(
                    &normalized_context(&format!("{ANONYMIZED_ID_PREFIX}{position}")),
                    json,
                )?),
                // Readers open an alert body with its row's (new) id and state.
                StoreAct::AnonymizeAlert {
                    alert_id,
                    state,
                    body,
                    ..
                } => Some(self.seal_anonymized(&alert_context(alert_id, state), body)?),
                StoreAct::AnonymizeScore { id, json, .. } => {
                    Some(self.seal_anonymized(&score_context(&anonymized_score_id(*id)), json)?)
                }
                StoreAct::AnonymizeShadowAlert { id, json, .. } => Some(self.seal_anonymized(
                    &shadow_alert_context(&anonymized_shadow_change_id(*id)),
                    json,
                )?),
                _ => None,
            });
        }
        let path = self.path.clone();
        // What retention deletes is zeroed in the file, not left in free pages or the
        // free space of a page (older copies may sit in WAL frames until overwritten).
        self.conn
            .pragma_update(None, "secure_delete", "ON")
            .map_err(|e| super::classify(&path, e))?;
        let tx = self
            .conn
            .transaction()
            .map_err(|e| super::classify(&path, e))?;
        for (act, stored) in acts.iter().zip(&stored) {
            apply(&tx, act, stored.as_deref()).map_err(|e| super::classify(&path, e))?;
        }
        tx.commit().map_err(|e| super::classify(&path, e))
    }

    /// An anonymized payload as stored: sealed under [`ANONYMIZED_SUBJECT`] with a
    /// keyring, else as it is.
    fn seal_anonymized(&self, context: &str, json: &str) -> Result<Vec<u8>, StoreError> {
        match self.seal(ANONYMIZED_SUBJECT, context, json.as_bytes()) {
            Ok(Some(sealed)) => Ok(sealed),
            Ok(None) => Ok(json.as_bytes().to_vec()),
            Err(e) => Err(self.key_err(e)),
        }
    }
}

/// The readable text of a payload; `None` when erased or locked.
fn readable(payload: Payload) -> Option<String> {
    match payload {
        Payload::Plain(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
        Payload::Erased { .. } | Payload::Locked => None,
    }
}

/// A payload for a TEXT column: UTF-8 JSON as text (as before encryption), sealed bytes
/// as a blob.
fn payload_value(stored: &[u8]) -> rusqlite::types::Value {
    match std::str::from_utf8(stored) {
        Ok(text) if !vitalmq_keyring::is_sealed(stored) => {
            rusqlite::types::Value::Text(text.to_owned())
        }
        _ => rusqlite::types::Value::Blob(stored.to_vec()),
    }
}

/// `stored`: the anonymized payload as stored, for the anonymize acts.
fn apply(tx: &Transaction<'_>, act: &StoreAct, stored: Option<&[u8]>) -> rusqlite::Result<()> {
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
            let payload = payload_value(stored.unwrap_or(json.as_bytes()));
            // The old id (a hash of device, epoch and seq) is forgotten with its index.
            delete_index(tx, *position)?;
            tx.execute(
                "UPDATE events SET event_id = ?2, device = ?3, epoch = 0, seq = ?1,
                        observed_at_ms = ?4, received_at_ms = ?4, normalized = ?5,
                        patient_ref = NULL
                 WHERE position = ?1",
                params![
                    position,
                    format!("{ANONYMIZED_ID_PREFIX}{position}"),
                    ANONYMIZED_DEVICE,
                    u2i(*hour_ms),
                    payload,
                ],
            )?;
            tx.execute(
                "UPDATE raw_messages SET bytes = X'', publisher = '', topic = '', broker = '',
                        sha256 = '', received_at_ms = ?2
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
        StoreAct::AnonymizeAlert {
            position,
            alert_id,
            topic,
            created_at_ms,
            body,
            ..
        } => {
            tx.execute(
                "UPDATE alerts SET alert_id = ?2, topic = ?3, created_at_ms = ?4, device = NULL,
                        patient_ref = NULL, body = ?5
                 WHERE position = ?1",
                params![
                    position,
                    alert_id,
                    topic,
                    u2i(*created_at_ms),
                    payload_value(stored.unwrap_or(body.as_bytes()))
                ],
            )?;
        }
        StoreAct::DeleteQuarantine { id } => {
            tx.execute("DELETE FROM quarantine WHERE id = ?1", params![id])?;
        }
        StoreAct::DeleteScore { id } => {
            tx.execute("DELETE FROM scores WHERE id = ?1", params![id])?;
        }
        StoreAct::AnonymizeScore { id, json, hour_ms } => {
            let payload = stored.map_or_else(|| json.as_bytes().to_vec(), <[u8]>::to_vec);
            tx.execute(
                "UPDATE scores SET score_id = ?2, patient_ref = '', device = ?3,
                        observed_at_ms = ?4, created_at_ms = ?4, payload = ?5
                 WHERE id = ?1",
                params![
                    id,
                    anonymized_score_id(*id),
                    ANONYMIZED_DEVICE,
                    u2i(*hour_ms),
                    payload
                ],
            )?;
        }
        StoreAct::DeleteShadowAlert { id } => {
            tx.execute("DELETE FROM shadow_alerts WHERE id = ?1", params![id])?;
        }
        StoreAct::AnonymizeShadowAlert {
            id,
            alert_id,
            json,
            hour_ms,
        } => {
            let payload = stored.map_or_else(|| json.as_bytes().to_vec(), <[u8]>::to_vec);
            tx.execute(
                "UPDATE shadow_alerts SET change_id = ?2, alert_id = ?3, patient_ref = '',
                        device = ?4, at_ms = ?5, created_at_ms = ?5, payload = ?6
                 WHERE id = ?1",
                params![
                    id,
                    anonymized_shadow_change_id(*id),
                    alert_id,
                    ANONYMIZED_DEVICE,
                    u2i(*hour_ms),
                    payload
                ],
            )?;
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

    /// For tests: the raw bytes' length, publisher, topic, broker and SHA-256 of the
    /// event at `position`.
    pub(crate) fn raw_of(&self, position: i64) -> Option<(i64, String, String, String, String)> {
        self.conn
            .query_row(
                "SELECT length(r.bytes), r.publisher, r.topic, r.broker, r.sha256 FROM events e
                 JOIN raw_messages r ON r.id = e.raw_id WHERE e.position = ?1",
                params![position],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
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
