//! Encryption at rest of the store's payloads, and what erasure leaves of them.
//!
//! With a keyring ([`Store::with_keyring`]) every payload the store writes is sealed
//! (`vitalmq_keyring`, AES-256-GCM under a per-subject data key), bound to a context
//! that names the row, so a sealed blob moved to another row does not open:
//!
//! | column | subject | context |
//! |---|---|---|
//! | `raw_messages.bytes` | the event's `patient_ref` | `raw\|<event_id>` |
//! | `events.normalized` | the event's `patient_ref` | `normalized\|<event_id>` |
//! | `alerts.body` (bodies naming a `patient_ref`) | that `patient_ref` | `alert\|<alert_id>\|<state>` |
//! | `scores.payload` | the score's `patient_ref` | `score\|<score_id>` |
//! | `patient_score_state.state` | its `patient_ref` | `score-state\|<patient_ref>` |
//! | `shadow_alerts.payload` (rows with a `patient_ref`) | that `patient_ref` | `shadow-alert\|<change_id>` |
//! | `quarantine.bytes` | `sys:quarantine` | `quarantine\|<sha256>` |
//!
//! An accepted event always carries a patient (attribution quarantines unassigned
//! readings); one that did not would be sealed under `sys:unattributed`. Operational
//! alerts carry no patient content and stay plaintext. Rows written without a keyring
//! (before encryption was turned on) stay plaintext and readable; readers tell the two
//! apart with [`vitalmq_keyring::is_sealed`].
//!
//! Erasure (`vitalmq erase`) destroys the subject's data keys in the keyring: its sealed
//! rows no longer open ([`Payload::Erased`]). Its plaintext rows are then scrubbed in
//! place ([`Store::scrub_patient`]): the payload becomes [`ERASED_MARKER`] (raw bytes:
//! empty), while ids, hashes and positions stay, so windows, cursors and audit
//! references keep pointing at something.

use std::sync::Arc;

use rusqlite::params;
use rusqlite::types::ValueRef;
use vitalmq_keyring::{KeyError, Keyring, Subject};

use super::{Store, StoreError};

/// The subject of quarantined bytes: no patient is attributable to refused data.
pub const QUARANTINE_SUBJECT: &str = "sys:quarantine";
/// The subject of an accepted event without a patient (should not occur).
pub const UNATTRIBUTED_SUBJECT: &str = "sys:unattributed";
/// The busy timeout `Store::open` gives its connection, restored after a checkpoint.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// What a scrubbed (erased plaintext) normalized event or alert body holds.
pub const ERASED_MARKER: &str = r#"{"erased":true}"#;

pub(super) fn raw_context(event_id: &str) -> String {
    format!("raw|{event_id}")
}

pub(super) fn normalized_context(event_id: &str) -> String {
    format!("normalized|{event_id}")
}

pub(super) fn alert_context(alert_id: &str, state: &str) -> String {
    format!("alert|{alert_id}|{state}")
}

/// A score's payload (issue 21), sealed for its patient.
pub(crate) fn score_context(score_id: &str) -> String {
    format!("score|{score_id}")
}

/// A patient's scoring state (issue 21: latest readings with their event ids, open
/// score episodes), sealed for the patient.
pub(crate) fn score_state_context(patient_ref: &str) -> String {
    format!("score-state|{patient_ref}")
}

/// A shadow alert change's payload (issue 21), sealed for its patient.
pub(crate) fn shadow_alert_context(change_id: &str) -> String {
    format!("shadow-alert|{change_id}")
}

pub(super) fn quarantine_context(sha256_hex: &str) -> String {
    format!("quarantine|{sha256_hex}")
}

/// The `patient_ref` an alert body names, if any (clinical alerts do).
pub(super) fn alert_patient(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v.get("patient_ref")?.as_str().map(str::to_owned)
}

/// The devices of a patient's stored events, and the span of their observation times.
pub type PatientSpan = (Vec<String>, Option<(u64, u64)>);

/// A stored payload as a reader gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// Readable: plaintext as stored, or opened.
    Plain(Vec<u8>),
    /// Its subject was erased: sealed under a destroyed key, or scrubbed. The time is
    /// known for a sealed row whose tombstone the keyring holds.
    Erased { erased_at_ms: Option<u64> },
    /// Sealed, and this reader has no key to open it (no keyring, or one opened
    /// without the key file): not erased, just not readable here.
    Locked,
}

impl Payload {
    pub fn is_erased(&self) -> bool {
        matches!(self, Self::Erased { .. })
    }

    /// The payload as JSON for a reader: the value (a string if it is not JSON), or
    /// null when erased or locked.
    pub fn json(&self) -> serde_json::Value {
        match self {
            Self::Plain(b) => serde_json::from_slice(b).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(b).into_owned())
            }),
            Self::Erased { .. } | Self::Locked => serde_json::Value::Null,
        }
    }

    /// The payload as text (empty when erased or locked).
    pub fn text(&self) -> String {
        match self {
            Self::Plain(b) => String::from_utf8_lossy(b).into_owned(),
            Self::Erased { .. } | Self::Locked => String::new(),
        }
    }

    /// The erasure facts a reader prints beside the row's ids.
    pub fn marks(&self) -> PayloadMarks {
        match self {
            Self::Plain(_) => PayloadMarks::default(),
            Self::Erased { erased_at_ms } => PayloadMarks {
                erased: true,
                erased_at_ms: *erased_at_ms,
                sealed: false,
            },
            Self::Locked => PayloadMarks {
                sealed: true,
                ..PayloadMarks::default()
            },
        }
    }
}

/// Why a row's payload is not shown, flattened into the row a reader prints: nothing
/// for a readable row; `"erased": true` (with the tombstone's time when known) for an
/// erased patient's; `"sealed": true` when it is sealed and no key was given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PayloadMarks {
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub erased: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub erased_at_ms: Option<u64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub sealed: bool,
}

/// The bytes of a TEXT or BLOB column (sealed payloads are BLOBs in TEXT columns).
pub(super) fn column_bytes(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Vec<u8>> {
    Ok(match r.get_ref(i)? {
        ValueRef::Text(b) | ValueRef::Blob(b) => b.to_vec(),
        ValueRef::Null => Vec::new(),
        // Integers and reals are no payload this store writes.
        other => {
            return Err(rusqlite::Error::FromSqlConversionFailure(
                i,
                other.data_type(),
                "not a payload".into(),
            ));
        }
    })
}

impl Store {
    /// Seals every payload this store writes from now on with `keyring`; reads open
    /// sealed payloads with it.
    #[must_use]
    pub fn with_keyring(mut self, keyring: Arc<Keyring>) -> Self {
        self.keyring = Some(keyring);
        self
    }

    pub fn keyring(&self) -> Option<&Arc<Keyring>> {
        self.keyring.as_ref()
    }

    pub(super) fn key_err(&self, source: KeyError) -> StoreError {
        StoreError::Key {
            path: self.path.clone(),
            source,
        }
    }

    /// Seals `plain` for `subject` when the store has a keyring, else returns it as is.
    /// `KeyError::Erased` when the subject was erased.
    pub(super) fn seal(
        &self,
        subject: &str,
        context: &str,
        plain: &[u8],
    ) -> Result<Option<Vec<u8>>, KeyError> {
        let Some(k) = &self.keyring else {
            return Ok(None);
        };
        let subject = Subject::new(subject)?;
        k.seal(&subject, context.as_bytes(), plain).map(Some)
    }

    /// Opens a stored payload: plaintext as is (the erased marker as erased), sealed
    /// through the keyring. An erased subject is [`Payload::Erased`], not an error.
    pub fn open_payload(&self, stored: &[u8], context: &str) -> Result<Payload, StoreError> {
        if !vitalmq_keyring::is_sealed(stored) {
            if stored == ERASED_MARKER.as_bytes() {
                return Ok(Payload::Erased { erased_at_ms: None });
            }
            return Ok(Payload::Plain(stored.to_vec()));
        }
        let Some(k) = &self.keyring else {
            return Ok(Payload::Locked);
        };
        match k.unseal(stored, context.as_bytes()) {
            Ok(plain) => Ok(Payload::Plain(plain)),
            Err(KeyError::Erased { erased_at_ms, .. }) => Ok(Payload::Erased {
                erased_at_ms: Some(erased_at_ms),
            }),
            Err(KeyError::UnknownKek { .. }) => Ok(Payload::Locked),
            Err(e) => Err(self.key_err(e)),
        }
    }

    /// Whether a stored payload is erased, without opening it: the erased marker, or
    /// sealed for a subject the keyring holds a tombstone of (needs no key).
    pub fn payload_erased(&self, stored: &[u8]) -> Result<Option<u64>, StoreError> {
        if stored == ERASED_MARKER.as_bytes() || stored.is_empty() {
            return Ok(Some(0));
        }
        if !vitalmq_keyring::is_sealed(stored) {
            return Ok(None);
        }
        let Some(k) = &self.keyring else {
            return Ok(None);
        };
        let header = vitalmq_keyring::sealed::header(stored).map_err(|e| self.key_err(e))?;
        Ok(k.erased(&header.subject)
            .map_err(|e| self.key_err(e))?
            .map(|t| t.erased_at_ms))
    }

    /// How many of `patient_ref`'s rows the store holds: `(events, raw, alerts)`.
    pub fn patient_rows(&self, patient_ref: &str) -> Result<(u64, u64, u64), StoreError> {
        self.conn
            .query_row(
                "SELECT (SELECT COUNT(*) FROM events WHERE patient_ref = ?1),
                        (SELECT COUNT(*) FROM raw_messages r JOIN events e ON e.raw_id = r.id
                           WHERE e.patient_ref = ?1),
                        (SELECT COUNT(*) FROM alerts WHERE patient_ref = ?1)",
                params![patient_ref],
                |r| {
                    Ok((
                        super::i2u(r.get(0)?),
                        super::i2u(r.get(1)?),
                        super::i2u(r.get(2)?),
                    ))
                },
            )
            .map_err(|e| self.err(e))
    }

    /// The devices `patient_ref`'s events came from, and the span of their observation
    /// times `(first, last)` (ms), for deciding whether a legal hold covers the patient.
    pub fn patient_span(&self, patient_ref: &str) -> Result<PatientSpan, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT DISTINCT device FROM events WHERE patient_ref = ?1 ORDER BY device")
            .map_err(|e| self.err(e))?;
        let devices = stmt
            .query_map(params![patient_ref], |r| r.get(0))
            .and_then(Iterator::collect)
            .map_err(|e| self.err(e))?;
        let span: (Option<i64>, Option<i64>) = self
            .conn
            .query_row(
                "SELECT MIN(observed_at_ms), MAX(observed_at_ms) FROM events WHERE patient_ref = ?1",
                params![patient_ref],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| self.err(e))?;
        Ok((
            devices,
            span.0
                .zip(span.1)
                .map(|(a, b)| (super::i2u(a), super::i2u(b))),
        ))
    }

    /// Overwrites in place every plaintext payload of `patient_ref` (rows written
    /// before encryption was on); see [`Self::erase_cleanup`], of which this is the
    /// payload part alone. Returns how many rows it changed.
    pub fn scrub_patient(&mut self, patient_ref: &str) -> Result<u64, StoreError> {
        self.erase_cleanup(patient_ref, &ErasureScope::default())
            .map(|c| c.legacy_scrubbed)
    }

    /// The store's part of an erasure, after the patient's keys were destroyed, in one
    /// transaction with SQLite's `secure_delete` (old cells are zeroed):
    ///
    /// - every plaintext payload of `patient_ref` (rows written before encryption was
    ///   on) is overwritten in place: normalized events and alert bodies become
    ///   [`ERASED_MARKER`], raw bytes become empty; ids, hashes and positions stay.
    ///   Sealed rows are left as they are (their key is gone).
    /// - the alert engine's state (`alert_state`: baselines, recent measurements, in
    ///   plaintext) of every device in `scope.devices` is deleted. That state is per
    ///   device, not per patient: a device that now serves another patient loses its
    ///   baselines too, and the engine starts them afresh (as after a sequence reset).
    /// - the patient's scoring state (`patient_score_state`: latest readings; sealed
    ///   with a keyring, plaintext when written without) is deleted; plaintext score
    ///   and shadow alert payloads are scrubbed like the rest.
    /// - quarantined messages (sealed under [`QUARANTINE_SUBJECT`], not the patient's
    ///   key, so the key erasure does not reach them) of a device in `scope.received`
    ///   received within its period are deleted.
    ///
    /// Then the WAL is checkpointed and truncated (retried up to
    /// [`vitalmq_keyring::CHECKPOINT_WITHIN`] while a reader holds it), so no old page
    /// image lingers in it; whether that completed is reported. Idempotent.
    pub fn erase_cleanup(
        &mut self,
        patient_ref: &str,
        scope: &ErasureScope,
    ) -> Result<Cleanup, StoreError> {
        let path = self.path.clone();
        let err = |e| super::classify(&path, e);
        self.conn
            .pragma_update(None, "secure_delete", "ON")
            .map_err(err)?;
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        let plain = |col: &str| format!("NOT ({})", super::coverage::sealed_condition(col));
        let mut changed = tx
            .execute(
                &format!(
                    "UPDATE raw_messages SET bytes = X''
                     WHERE id IN (SELECT raw_id FROM events WHERE patient_ref = ?1)
                       AND length(bytes) > 0 AND {}",
                    plain("bytes")
                ),
                params![patient_ref],
            )
            .map_err(err)?;
        for (table, column) in [
            ("events", "normalized"),
            ("alerts", "body"),
            ("scores", "payload"),
            ("shadow_alerts", "payload"),
        ] {
            changed += tx
                .execute(
                    &format!(
                        "UPDATE {table} SET {column} = ?2
                         WHERE patient_ref = ?1 AND {column} <> ?2 AND {}",
                        plain(column)
                    ),
                    params![patient_ref, ERASED_MARKER],
                )
                .map_err(err)?;
        }
        let mut alert_states = 0;
        for device in &scope.devices {
            alert_states += tx
                .execute("DELETE FROM alert_state WHERE device = ?1", params![device])
                .map_err(err)?;
        }
        // The patient's scoring state: latest readings (plaintext without a keyring).
        let score_states = tx
            .execute(
                "DELETE FROM patient_score_state WHERE patient_ref = ?1",
                params![patient_ref],
            )
            .map_err(err)?;
        let mut quarantine = 0;
        for (device, from, to) in &scope.received {
            quarantine += tx
                .execute(
                    "DELETE FROM quarantine
                     WHERE device = ?1 AND received_at_ms >= ?2 AND (?3 IS NULL OR received_at_ms < ?3)",
                    params![device, super::u2i(*from), to.map(super::u2i)],
                )
                .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        let wal_checkpointed = vitalmq_keyring::checkpoint_wal_with(
            &self.conn,
            vitalmq_keyring::CHECKPOINT_WITHIN,
            BUSY_TIMEOUT,
        )
        .map_err(err)?;
        if !wal_checkpointed {
            tracing::warn!(
                store = %self.path.display(),
                "store WAL not checkpointed after an erasure cleanup (a reader held it): old page images stay in the WAL until the next checkpoint"
            );
        }
        Ok(Cleanup {
            legacy_scrubbed: changed as u64,
            alert_states: alert_states as u64,
            score_states: score_states as u64,
            quarantine: quarantine as u64,
            wal_checkpointed,
        })
    }
}

/// Whose rows beyond the patient's own an erasure cleanup removes
/// ([`Store::erase_cleanup`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErasureScope {
    /// Devices the patient had (registry history, stored events): their alert state
    /// is deleted.
    pub devices: Vec<String>,
    /// `(device, from, to)` (ms, `to` exclusive, open when `None`): the patient's
    /// assignment periods; quarantined messages of the device received within one
    /// are deleted.
    pub received: Vec<(String, u64, Option<u64>)>,
}

/// What [`Store::erase_cleanup`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Cleanup {
    /// Plaintext payloads (written before encryption was on) overwritten.
    pub legacy_scrubbed: u64,
    /// Devices whose alert-engine state was deleted.
    pub alert_states: u64,
    /// The patient's scoring state rows deleted (0 or 1).
    pub score_states: u64,
    /// Quarantined messages deleted.
    pub quarantine: u64,
    /// Whether the WAL was checkpointed and truncated afterwards.
    pub wal_checkpointed: bool,
}

/// A key provider that holds no key: a keyring opened with it answers what needs no
/// key (tombstones, whether a sealed row is erased) and refuses everything else. For
/// readers such as `vitalmq store events` that are given no key file.
#[derive(Debug, Default)]
pub struct NoKeys;

impl vitalmq_keyring::KeyProvider for NoKeys {
    fn describe(&self) -> String {
        "no key file".to_owned()
    }

    fn current_version(&self) -> u32 {
        0
    }

    fn wrap(
        &self,
        _context: &[u8],
        _secret: &[u8],
    ) -> Result<vitalmq_keyring::WrappedKey, KeyError> {
        Err(KeyError::UnknownKek { version: 0 })
    }

    fn unwrap(
        &self,
        _context: &[u8],
        wrapped: &vitalmq_keyring::WrappedKey,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, KeyError> {
        Err(KeyError::UnknownKek {
            version: wrapped.kek_version,
        })
    }
}

#[cfg(test)]
mod tests {
    use vitalmq_envelope::DeviceId;

    use super::super::write::test_events::event;
    use super::super::{Commit, Quarantined};
    use super::*;

    fn quarantined(device: &str, at: u64) -> Quarantined {
        Quarantined {
            received_at_ms: at,
            topic: format!("devices/{device}/telemetry"),
            device: Some(device.to_owned()),
            reason: "implausible".into(),
            detail: "d".into(),
            sha256_hex: format!("{at:02x}"),
            raw: bytes::Bytes::from(format!("q-{device}-{at}")),
        }
    }

    fn count(store: &Store, sql: &str) -> i64 {
        store.conn.query_row(sql, [], |r| r.get(0)).expect("count")
    }

    #[test]
    fn the_cleanup_deletes_alert_state_of_the_devices_and_quarantine_within_the_periods() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(dir.path()).expect("open");
        let dev = |d: &str| DeviceId::new(d).expect("id");
        store
            .commit(&Commit {
                events: vec![event("dev-00001", 1, 1).for_patient("pt-a")],
                // dev-00001 was A's during [100, 200); dev-00002 is someone else's.
                quarantine: vec![
                    quarantined("dev-00001", 50),
                    quarantined("dev-00001", 100),
                    quarantined("dev-00001", 199),
                    quarantined("dev-00001", 200),
                    quarantined("dev-00002", 150),
                ],
                alert_states: vec![
                    (dev("dev-00001"), r#"{"baseline":{"spo2":97}}"#.into()),
                    (dev("dev-00002"), r#"{"baseline":{"spo2":95}}"#.into()),
                ],
                ..Commit::default()
            })
            .expect("commit");
        let scope = ErasureScope {
            devices: vec!["dev-00001".into()],
            received: vec![("dev-00001".into(), 100, Some(200))],
        };
        let done = store.erase_cleanup("pt-a", &scope).expect("cleanup");
        assert_eq!((done.alert_states, done.quarantine), (1, 2), "{done:?}");
        assert!(done.wal_checkpointed);
        let states = store.load_alert_states().expect("states");
        assert!(!states.contains_key(&dev("dev-00001")), "A's device reset");
        assert!(states.contains_key(&dev("dev-00002")), "others' kept");
        let left: Vec<(String, i64)> = {
            let mut stmt = store
                .conn
                .prepare("SELECT device, received_at_ms FROM quarantine ORDER BY id")
                .expect("prepare");
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .and_then(Iterator::collect)
                .expect("rows")
        };
        assert_eq!(
            left,
            [
                ("dev-00001".to_owned(), 50),
                ("dev-00001".to_owned(), 200),
                ("dev-00002".to_owned(), 150)
            ],
            "only the device's rows within the period"
        );
        // Zeroed, not just unlinked: neither the state nor the bytes are in the file.
        let mut bytes = std::fs::read(dir.path().join(super::super::DB_FILE)).expect("db");
        if let Ok(wal) = std::fs::read(dir.path().join(format!("{}-wal", super::super::DB_FILE))) {
            bytes.extend(wal);
        }
        let has = |n: &[u8]| bytes.windows(n.len()).any(|w| w == n);
        assert!(!has(b"\"spo2\":97"), "alert state zeroed");
        assert!(!has(b"q-dev-00001-100") && !has(b"q-dev-00001-199"));
        assert!(has(b"q-dev-00002-150"), "the check can see plaintext");
        let again = store.erase_cleanup("pt-a", &scope).expect("again");
        assert_eq!((again.alert_states, again.quarantine), (0, 0), "idempotent");
        assert_eq!(count(&store, "SELECT COUNT(*) FROM quarantine"), 3);
    }
}
