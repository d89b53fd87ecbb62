//! One patient's rows for an export of their data (GDPR access and portability,
//! `vitalmq export`): every accepted event (normalized body, raw COSE bytes and their
//! receipt metadata, the sinks whose cursor passed it) and every alert state change
//! about the patient, read in one snapshot so events and alerts agree with each other
//! while the bridge keeps writing.
//!
//! Rows are found by their clear `patient_ref` column (schema v4). A row with none
//! there (one the v4 migration could not tag) is matched by the `patient_ref` of its
//! own JSON instead. Payloads come back as [`Payload`]s, opened through the store's
//! keyring when sealed: what an erased or locked one means for an export is the
//! caller's decision. A raw message that opens but does not hash to its recorded
//! SHA-256 is a read error, never exported.

use rusqlite::{Row, params};
use sha2::Digest as _;
use vitalmq_envelope::DeviceId;
use vitalmq_keyring::Subject;

use super::read::{EVENT_HEAD_COLUMNS, event_head};
use super::sealing::{
    ERASED_MARKER, Payload, alert_context, column_bytes, normalized_context, raw_context,
};
use super::{EventHead, RawRef, Store, StoreError, i2u};

/// One accepted event of the patient, with everything an export shows of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatientEvent {
    pub head: EventHead,
    pub observed_at_ms: u64,
    pub received_at_ms: u64,
    /// Its raw-plane row (SHA-256, topic, broker, publisher, length).
    pub raw_ref: RawRef,
    /// The normalized event JSON as stored.
    pub normalized: Payload,
    /// The exact COSE_Sign1 bytes received; when readable, they hash to
    /// `raw_ref.sha256` (checked).
    pub raw: Payload,
    /// The sinks whose delivery cursor has passed the event: delivered to them, or
    /// withheld from them by their consent rules (the store keeps no per-event record
    /// of which).
    pub sinks: Vec<String>,
}

/// One recorded state change of an alert about the patient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatientAlert {
    pub position: i64,
    pub alert_id: String,
    pub state: String,
    /// `clinical` or `operational`.
    pub kind: String,
    pub topic: String,
    pub device: Option<DeviceId>,
    pub rule: Option<String>,
    pub created_at_ms: u64,
    /// The alert JSON as published.
    pub body: Payload,
}

/// A row handed to the visitor of [`Store::read_patient`]: every event first, in
/// outbox order, then every alert change, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatientRow {
    Event(Box<PatientEvent>),
    Alert(Box<PatientAlert>),
}

/// What [`Store::read_patient`] read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatientSnapshot {
    /// The store's schema version.
    pub schema_version: usize,
    /// Highest outbox position of the snapshot (of every patient).
    pub head: i64,
    pub events: u64,
    pub alerts: u64,
}

/// That a patient was erased: their data keys destroyed (the keyring's tombstone,
/// with its time), or their plaintext rows scrubbed (time unknown to the store).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatientErased {
    pub erased_at_ms: Option<u64>,
}

/// The `WHERE` of a patient's rows in the table aliased `t` whose payload column is
/// `payload`: the clear column, or for an untagged row its payload naming the patient
/// (a cheap byte search here, confirmed by parsing in [`names_patient`]). `?1` is the
/// patient_ref, `?2` its JSON form `"patient_ref":"<ref>"`.
fn patient_rows(t: &str, payload: &str) -> String {
    format!(
        "({t}.patient_ref = ?1 OR ({t}.patient_ref IS NULL
            AND instr(CAST({t}.{payload} AS BLOB), CAST(?2 AS BLOB)) > 0))"
    )
}

/// Whether an untagged row's opened payload names `patient_ref` (its top-level
/// `patient_ref` field, not merely the text somewhere in it).
fn names_patient(payload: &Payload, patient_ref: &str) -> bool {
    match payload {
        Payload::Plain(bytes) => serde_json::from_slice::<serde_json::Value>(bytes)
            .ok()
            .and_then(|v| v.get("patient_ref")?.as_str().map(|p| p == patient_ref))
            .unwrap_or(false),
        Payload::Erased { .. } | Payload::Locked => false,
    }
}

impl Store {
    /// Whether `patient_ref` was erased: a tombstone in the keyring (needs no key), or
    /// a row of theirs scrubbed to the erased marker.
    pub fn patient_erased(&self, patient_ref: &str) -> Result<Option<PatientErased>, StoreError> {
        if let Some(k) = &self.keyring {
            let key_err = |source| StoreError::Key {
                path: self.path.clone(),
                source,
            };
            let subject = Subject::new(patient_ref).map_err(key_err)?;
            if let Some(t) = k.erased(&subject).map_err(key_err)? {
                return Ok(Some(PatientErased {
                    erased_at_ms: Some(t.erased_at_ms),
                }));
            }
        }
        let scrubbed: bool = self
            .conn
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM events WHERE patient_ref = ?1
                                 AND CAST(normalized AS BLOB) = CAST(?2 AS BLOB))
                     OR EXISTS(SELECT 1 FROM alerts WHERE patient_ref = ?1
                                 AND CAST(body AS BLOB) = CAST(?2 AS BLOB))",
                params![patient_ref, ERASED_MARKER],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))?;
        Ok(scrubbed.then_some(PatientErased { erased_at_ms: None }))
    }

    /// Hands every event of `patient_ref` (outbox order), then every alert change
    /// about them (in order), to `visit`, all read in one snapshot (a read
    /// transaction: rows committed meanwhile are not seen). Stops at the first error of
    /// `visit`. Sealed payloads are opened with the store's keyring; a raw message that
    /// opens is checked against its recorded SHA-256.
    pub fn read_patient<E: From<StoreError>>(
        &self,
        patient_ref: &str,
        mut visit: impl FnMut(PatientRow) -> Result<(), E>,
    ) -> Result<PatientSnapshot, E> {
        let tx = self.conn.unchecked_transaction().map_err(|e| self.err(e))?;
        let json_key = format!("\"patient_ref\":{}", serde_json::Value::from(patient_ref));
        let schema_version = super::schema::version(&tx).map_err(|e| self.err(e))?;
        let head = self.head()?;
        let cursors: Vec<(String, i64)> = {
            let mut stmt = tx
                .prepare("SELECT sink, delivered_through FROM sink_cursors ORDER BY sink")
                .map_err(|e| self.err(e))?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .and_then(Iterator::collect)
                .map_err(|e| self.err(e))?
        };
        let mut snapshot = PatientSnapshot {
            schema_version,
            head,
            events: 0,
            alerts: 0,
        };
        {
            let mut stmt = tx
                .prepare(&format!(
                    "SELECT {EVENT_HEAD_COLUMNS}, e.observed_at_ms, e.received_at_ms,
                            r.id, r.sha256, r.topic, r.broker, r.publisher, length(r.bytes),
                            e.patient_ref IS NULL, e.normalized, r.bytes
                     FROM events e JOIN raw_messages r ON r.id = e.raw_id
                     WHERE {}
                     ORDER BY e.position",
                    patient_rows("e", "normalized")
                ))
                .map_err(|e| self.err(e))?;
            let mut rows = stmt
                .query(params![patient_ref, json_key])
                .map_err(|e| self.err(e))?;
            while let Some(r) = rows.next().map_err(|e| self.err(e))? {
                let (event, untagged, normalized, raw) = event_row(r).map_err(|e| self.err(e))?;
                if let Some(event) =
                    self.open_event(event, untagged, &normalized, &raw, patient_ref, &cursors)?
                {
                    snapshot.events += 1;
                    visit(PatientRow::Event(Box::new(event)))?;
                }
            }
        }
        {
            let mut stmt = tx
                .prepare(&format!(
                    "SELECT t.position, t.alert_id, t.state, t.kind, t.topic, t.device, t.rule,
                            t.created_at_ms, t.patient_ref IS NULL, t.body
                     FROM alerts t WHERE {} ORDER BY t.position",
                    patient_rows("t", "body")
                ))
                .map_err(|e| self.err(e))?;
            let mut rows = stmt
                .query(params![patient_ref, json_key])
                .map_err(|e| self.err(e))?;
            while let Some(r) = rows.next().map_err(|e| self.err(e))? {
                let (mut alert, untagged, stored) = alert_row(r).map_err(|e| self.err(e))?;
                alert.body =
                    self.open_payload(&stored, &alert_context(&alert.alert_id, &alert.state))?;
                if untagged && !names_patient(&alert.body, patient_ref) {
                    continue;
                }
                snapshot.alerts += 1;
                visit(PatientRow::Alert(Box::new(alert)))?;
            }
        }
        drop(tx);
        Ok(snapshot)
    }

    /// Opens an event row's payloads and checks its raw bytes; `None` for an untagged
    /// row that turns out not to be the patient's.
    fn open_event(
        &self,
        mut event: PatientEvent,
        untagged: bool,
        normalized: &[u8],
        raw: &[u8],
        patient_ref: &str,
        cursors: &[(String, i64)],
    ) -> Result<Option<PatientEvent>, StoreError> {
        let id = event.head.event_id.as_str().to_owned();
        event.normalized = self.open_payload(normalized, &normalized_context(&id))?;
        if untagged && !names_patient(&event.normalized, patient_ref) {
            return Ok(None);
        }
        event.raw = if raw.is_empty() {
            // Scrubbed by an erasure.
            Payload::Erased { erased_at_ms: None }
        } else {
            self.open_payload(raw, &raw_context(&id))?
        };
        if let Payload::Plain(bytes) = &event.raw
            && hex::encode(sha2::Sha256::digest(bytes)) != event.raw_ref.sha256
        {
            return Err(StoreError::Corrupt {
                path: self.path.clone(),
                device: event.head.device.to_string(),
                detail: format!(
                    "the raw message of event {id} does not hash to its recorded SHA-256"
                ),
            });
        }
        event.sinks = cursors
            .iter()
            .filter(|(_, through)| *through >= event.head.position)
            .map(|(sink, _)| sink.clone())
            .collect();
        Ok(Some(event))
    }
}

/// An event row of [`Store::read_patient`]'s query: the event without its payloads,
/// whether it is untagged, and its stored normalized and raw payloads.
fn event_row(r: &Row<'_>) -> rusqlite::Result<(PatientEvent, bool, Vec<u8>, Vec<u8>)> {
    let event = PatientEvent {
        head: event_head(r)?,
        observed_at_ms: i2u(r.get(7)?),
        received_at_ms: i2u(r.get(8)?),
        raw_ref: RawRef {
            store_row: r.get(9)?,
            sha256: r.get(10)?,
            topic: r.get(11)?,
            broker: r.get(12)?,
            publisher: r.get(13)?,
            bytes: r.get(14)?,
        },
        normalized: Payload::Locked,
        raw: Payload::Locked,
        sinks: Vec::new(),
    };
    Ok((
        event,
        r.get(15)?,
        column_bytes(r, 16)?,
        column_bytes(r, 17)?,
    ))
}

/// An alert row of [`Store::read_patient`]'s query: the change without its body,
/// whether it is untagged, and its stored body.
fn alert_row(r: &Row<'_>) -> rusqlite::Result<(PatientAlert, bool, Vec<u8>)> {
    let device = match r.get::<_, Option<String>>(5)? {
        None => None,
        Some(text) => Some(DeviceId::new(text.as_str()).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(
                5,
                rusqlite::types::Type::Text,
                format!("not a device id: {text:?}: {e}").into(),
            )
        })?),
    };
    let alert = PatientAlert {
        position: r.get(0)?,
        alert_id: r.get(1)?,
        state: r.get(2)?,
        kind: r.get(3)?,
        topic: r.get(4)?,
        device,
        rule: r.get(6)?,
        created_at_ms: i2u(r.get(7)?),
        body: Payload::Locked,
    };
    Ok((alert, r.get(8)?, column_bytes(r, 9)?))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vitalmq_keyring::{Keyring, LocalKeyFile};

    use super::*;
    use crate::store::write::test_events::event;
    use crate::store::{Commit, NewAlert};

    const A: &str = "pt-7f3a";
    const B: &str = "pt-other";

    fn alert(id: &str, state: &str, patient: Option<&str>) -> NewAlert {
        let mut body = serde_json::json!({"alert_id": id, "state": state, "evidence": ["ev1-x"]});
        if let Some(p) = patient {
            body["patient_ref"] = p.into();
        }
        NewAlert {
            alert_id: id.into(),
            state: state.into(),
            kind: if patient.is_some() {
                "clinical"
            } else {
                "operational"
            }
            .into(),
            topic: format!("alerts/site-01/x/{id}"),
            device: Some("dev-00001".into()),
            rule: Some("spo2-low".into()),
            created_at_ms: 9,
            body: body.to_string(),
            level: 0,
        }
    }

    /// Events of A (dev-00001) and B (dev-00002) interleaved, alerts of both and an
    /// operational one, and a sink that has passed position 2.
    fn fill(store: &mut Store) {
        let events = (0..4)
            .flat_map(|s| {
                [
                    event("dev-00001", 1, s),
                    event("dev-00002", 1, s).for_patient(B),
                ]
            })
            .collect();
        let _committed = store
            .commit(&Commit {
                events,
                alerts: vec![
                    alert("al-a", "open", Some(A)),
                    alert("al-b", "open", Some(B)),
                    alert("al-ops", "open", None),
                    alert("al-a", "closed", Some(A)),
                ],
                ..Commit::default()
            })
            .expect("commit");
        store
            .conn
            .execute(
                "INSERT INTO sink_cursors (sink, delivered_through) VALUES ('objects', 3), ('lake', 0)",
                [],
            )
            .expect("cursor");
    }

    fn read(
        store: &Store,
        patient: &str,
    ) -> (Vec<PatientEvent>, Vec<PatientAlert>, PatientSnapshot) {
        let (mut events, mut alerts) = (Vec::new(), Vec::new());
        let snapshot = store
            .read_patient(patient, |row| {
                match row {
                    PatientRow::Event(e) => events.push(*e),
                    PatientRow::Alert(a) => alerts.push(*a),
                }
                Ok::<_, StoreError>(())
            })
            .expect("read");
        (events, alerts, snapshot)
    }

    fn keyring(dir: &std::path::Path) -> Arc<Keyring> {
        let kek = LocalKeyFile::create(&dir.join("kek.json")).expect("key file");
        Arc::new(Keyring::open(&dir.join("keyring.sqlite3"), Arc::new(kek)).expect("keyring"))
    }

    #[test]
    fn only_the_patients_rows_in_order_with_raw_bytes_and_sinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(dir.path()).expect("open");
        fill(&mut store);
        let (events, alerts, snapshot) = read(&store, A);
        assert_eq!(snapshot.schema_version, super::super::schema::VERSION);
        assert_eq!((snapshot.events, snapshot.alerts, snapshot.head), (4, 2, 8));
        let positions: Vec<i64> = events.iter().map(|e| e.head.position).collect();
        assert_eq!(positions, [1, 3, 5, 7]);
        for e in &events {
            assert_eq!(e.head.device.as_str(), "dev-00001");
            let Payload::Plain(raw) = &e.raw else {
                panic!("raw not readable: {:?}", e.raw)
            };
            assert_eq!(hex::encode(sha2::Sha256::digest(raw)), e.raw_ref.sha256);
            assert_eq!(e.raw_ref.bytes, i64::try_from(raw.len()).expect("len"));
            assert!(matches!(&e.normalized, Payload::Plain(n) if n.starts_with(b"{")));
            let expected: &[&str] = if e.head.position <= 3 {
                &["objects"]
            } else {
                &[]
            };
            assert_eq!(e.sinks, expected, "position {}", e.head.position);
        }
        let changes: Vec<(&str, &str)> = alerts
            .iter()
            .map(|a| (a.alert_id.as_str(), a.state.as_str()))
            .collect();
        assert_eq!(changes, [("al-a", "open"), ("al-a", "closed")]);
        let (events, alerts, _) = read(&store, B);
        assert_eq!(events.len(), 4);
        assert!(events.iter().all(|e| e.head.device.as_str() == "dev-00002"));
        assert_eq!(alerts.len(), 1);
        let (events, alerts, _) = read(&store, "pt-nobody");
        assert!(events.is_empty() && alerts.is_empty());
        assert_eq!(store.patient_erased(A).expect("erased?"), None);
    }

    /// Rows the v4 migration left untagged are matched by their own JSON's
    /// `patient_ref`, exactly (not a prefix of it, not a nested field).
    #[test]
    fn untagged_rows_are_matched_by_their_json() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(dir.path()).expect("open");
        fill(&mut store);
        store
            .conn
            .execute_batch(
                "UPDATE events SET patient_ref = NULL WHERE position IN (1, 2);
                 UPDATE alerts SET patient_ref = NULL;",
            )
            .expect("untag");
        // Position 2 is B's by its column, but its (test) JSON names A: once untagged,
        // the JSON decides.
        let (events, alerts, _) = read(&store, A);
        let positions: Vec<i64> = events.iter().map(|e| e.head.position).collect();
        assert_eq!(positions, [1, 2, 3, 5, 7]);
        assert_eq!(alerts.len(), 2);
        let (events, alerts, _) = read(&store, "pt-7f3");
        assert!(events.is_empty() && alerts.is_empty());
        let (events, _, _) = read(&store, B);
        assert_eq!(events.len(), 3);
    }

    #[test]
    fn sealed_rows_open_with_the_keyring_and_read_as_erased_after_an_erasure() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = keyring(dir.path());
        let mut store = Store::open(dir.path())
            .expect("open")
            .with_keyring(keys.clone());
        fill(&mut store);
        let sealed: Vec<u8> = store
            .conn
            .query_row(
                "SELECT normalized FROM events WHERE position = 1",
                [],
                |r| column_bytes(r, 0),
            )
            .expect("row");
        assert!(vitalmq_keyring::is_sealed(&sealed));
        let (events, alerts, _) = read(&store, A);
        assert_eq!((events.len(), alerts.len()), (4, 2));
        assert!(events.iter().all(|e| matches!(e.raw, Payload::Plain(_))));
        assert!(alerts.iter().all(|a| matches!(a.body, Payload::Plain(_))));
        // Without the key: sealed rows are locked, not erased.
        let locked = Store::open(dir.path()).expect("open");
        let (events, _, _) = read(&locked, A);
        assert!(events.iter().all(|e| e.normalized == Payload::Locked));

        keys.erase(&Subject::new(A).expect("subject"), "test", "request", 77)
            .expect("erase");
        assert_eq!(
            store.patient_erased(A).expect("erased?"),
            Some(PatientErased {
                erased_at_ms: Some(77)
            })
        );
        assert_eq!(store.patient_erased(B).expect("erased?"), None);
        let (events, alerts, _) = read(&store, A);
        assert!(
            events
                .iter()
                .all(|e| e.raw.is_erased() && e.normalized.is_erased())
        );
        assert!(alerts.iter().all(|a| a.body.is_erased()));
        let (events, _, _) = read(&store, B);
        assert!(events.iter().all(|e| matches!(e.raw, Payload::Plain(_))));
    }

    #[test]
    fn a_scrubbed_patient_reads_as_erased_and_altered_raw_bytes_are_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(dir.path()).expect("open");
        fill(&mut store);
        store.scrub_patient(A).expect("scrub");
        assert_eq!(
            store.patient_erased(A).expect("erased?"),
            Some(PatientErased { erased_at_ms: None })
        );
        let (events, _, _) = read(&store, A);
        assert!(
            events
                .iter()
                .all(|e| e.raw.is_erased() && e.normalized.is_erased())
        );

        store
            .conn
            .execute(
                "UPDATE raw_messages SET bytes = X'00' || bytes
                 WHERE id = (SELECT raw_id FROM events WHERE position = 4)",
                [],
            )
            .expect("alter");
        let err = store
            .read_patient(B, |_| Ok::<_, StoreError>(()))
            .expect_err("altered raw bytes");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    }
}
