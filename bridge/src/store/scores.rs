//! Scores (issue 21, schema v5): the `scores` rows a commit writes with the readings
//! that triggered them, the per-patient scoring state beside them, and the readers.

use std::collections::HashMap;

use rusqlite::params;

use super::write::{Commit, Stored};
use super::{Payload, Store, StoreError, i2u, u2i};

/// The scores and patient scoring states of `c`, inside the caller's transaction, as
/// sealed (`seal_batch`): a score or state whose patient was erased (`None`) is not
/// written.
pub(super) fn write_scores(
    tx: &rusqlite::Transaction<'_>,
    c: &Commit,
    sealed: &[Option<Stored<'_>>],
    states: &[Option<Stored<'_>>],
) -> rusqlite::Result<()> {
    let mut row = tx.prepare_cached(
        "INSERT INTO scores (score_id, patient_ref, site, device, model, version, config_sha256,
             role, observed_at_ms, created_at_ms, payload)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
         ON CONFLICT(score_id) DO NOTHING",
    )?;
    for (s, payload) in c.scores.iter().zip(sealed) {
        let Some(payload) = payload else { continue };
        row.execute(params![
            s.score_id,
            s.patient_ref,
            s.site,
            s.device,
            s.model,
            s.version,
            s.config_sha256,
            s.role,
            u2i(s.observed_at_ms),
            u2i(s.created_at_ms),
            payload.value()
        ])?;
    }
    let mut state = tx.prepare_cached(
        "INSERT INTO patient_score_state (patient_ref, state) VALUES (?1, ?2)
         ON CONFLICT(patient_ref) DO UPDATE SET state = ?2",
    )?;
    for ((patient, _), sealed) in c.patient_states.iter().zip(states) {
        if let Some(sealed) = sealed {
            state.execute(params![patient, sealed.value()])?;
        }
    }
    Ok(())
}

/// One stored score as a reader gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredScore {
    pub id: u64,
    pub score_id: String,
    pub patient_ref: String,
    pub site: String,
    pub device: String,
    pub model: String,
    pub version: String,
    pub config_sha256: String,
    pub role: String,
    pub observed_at_ms: u64,
    pub created_at_ms: u64,
    pub payload: Payload,
}

/// One stored score as `vitalmq store scores` prints it: the clear columns and the
/// payload JSON (empty when erased or sealed without a key, see the marks).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ScoreRow {
    pub id: u64,
    pub score_id: String,
    pub patient_ref: String,
    pub site: String,
    pub device: String,
    pub model: String,
    pub version: String,
    pub config_sha256: String,
    pub role: String,
    pub observed_at_ms: u64,
    pub created_at_ms: u64,
    pub payload: String,
    #[serde(flatten)]
    pub marks: super::sealing::PayloadMarks,
}

impl From<StoredScore> for ScoreRow {
    fn from(s: StoredScore) -> Self {
        Self {
            id: s.id,
            score_id: s.score_id,
            patient_ref: s.patient_ref,
            site: s.site,
            device: s.device,
            model: s.model,
            version: s.version,
            config_sha256: s.config_sha256,
            role: s.role,
            observed_at_ms: s.observed_at_ms,
            created_at_ms: s.created_at_ms,
            payload: s.payload.text(),
            marks: s.payload.marks(),
        }
    }
}

impl Store {
    /// Every stored score in id order, for `vitalmq store scores`.
    pub fn list_scores(&self) -> Result<Vec<ScoreRow>, StoreError> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let page = self.scores(after, None, 1000)?;
            let Some(last) = page.last() else { break };
            after = last.id;
            out.extend(page.into_iter().map(ScoreRow::from));
        }
        Ok(out)
    }

    /// The scoring state per patient (JSON), loaded at start: opened through the
    /// keyring (sealed for the patient, context `score-state|<patient_ref>`); an
    /// erased patient's state is left out. A sealed state without a keyring is
    /// [`StoreError::NoKeyring`]: scoring must not restart from nothing unnoticed.
    pub fn load_patient_score_states(&self) -> Result<HashMap<String, String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT patient_ref, state FROM patient_score_state")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, super::sealing::column_bytes(r, 1)?))
            })
            .map_err(|e| self.err(e))?;
        let mut out = HashMap::new();
        for row in rows {
            let (patient, bytes) = row.map_err(|e| self.err(e))?;
            let context = super::sealing::score_state_context(&patient);
            match self.open_payload(&bytes, &context)? {
                Payload::Plain(b) => {
                    let json = String::from_utf8(b).map_err(|e| StoreError::Corrupt {
                        path: self.path.clone(),
                        device: patient.clone(),
                        detail: format!("scoring state: {e}"),
                    })?;
                    out.insert(patient, json);
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

    /// Scores after `after_id` (ascending), at most `limit`, optionally of one patient,
    /// payloads opened through the keyring when there is one.
    pub fn scores(
        &self,
        after_id: u64,
        patient_ref: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredScore>, StoreError> {
        self.query_scores(
            "SELECT id, score_id, patient_ref, site, device, model, version, config_sha256,
                    role, observed_at_ms, created_at_ms, payload
             FROM scores WHERE id > ?1 AND (?2 IS NULL OR patient_ref = ?2)
             ORDER BY id LIMIT ?3",
            params![
                u2i(after_id),
                patient_ref,
                i64::try_from(limit).unwrap_or(i64::MAX)
            ],
        )
    }

    /// The scores of `model` at the two `versions` recorded (bridge clock) in
    /// `[since_ms, until_ms)`, after `after_id` (ascending), at most `limit`: selected
    /// before any payload is opened, so a reader opens only those
    /// (`vitalmq models compare`).
    pub fn scores_of(
        &self,
        model: &str,
        versions: [&str; 2],
        (since_ms, until_ms): (Option<u64>, Option<u64>),
        after_id: u64,
        limit: usize,
    ) -> Result<Vec<StoredScore>, StoreError> {
        self.query_scores(
            "SELECT id, score_id, patient_ref, site, device, model, version, config_sha256,
                    role, observed_at_ms, created_at_ms, payload
             FROM scores WHERE id > ?1 AND model = ?2 AND version IN (?3, ?4)
                 AND (?5 IS NULL OR created_at_ms >= ?5) AND (?6 IS NULL OR created_at_ms < ?6)
             ORDER BY id LIMIT ?7",
            params![
                u2i(after_id),
                model,
                versions[0],
                versions[1],
                since_ms.map(u2i),
                until_ms.map(u2i),
                i64::try_from(limit).unwrap_or(i64::MAX)
            ],
        )
    }

    fn query_scores(
        &self,
        sql: &str,
        params: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<StoredScore>, StoreError> {
        let mut stmt = self.conn.prepare(sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params, |r| {
                Ok((
                    (
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, String>(5)?,
                    ),
                    (
                        r.get::<_, String>(6)?,
                        r.get::<_, String>(7)?,
                        r.get::<_, String>(8)?,
                        r.get::<_, i64>(9)?,
                        r.get::<_, i64>(10)?,
                        super::sealing::column_bytes(r, 11)?,
                    ),
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let ((id, score_id, patient_ref, site, device, model), rest) =
                row.map_err(|e| self.err(e))?;
            let (version, config_sha256, role, observed, created, bytes) = rest;
            let payload = self.open_payload(&bytes, &super::sealing::score_context(&score_id))?;
            out.push(StoredScore {
                id: i2u(id),
                score_id,
                patient_ref,
                site,
                device,
                model,
                version,
                config_sha256,
                role,
                observed_at_ms: i2u(observed),
                created_at_ms: i2u(created),
                payload,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
impl Store {
    /// For tests: the stored payload bytes of every score, by id.
    pub(crate) fn score_state_at_rest(&self, patient_ref: &str) -> Option<Vec<u8>> {
        use rusqlite::OptionalExtension as _;
        self.conn
            .query_row(
                "SELECT state FROM patient_score_state WHERE patient_ref = ?1",
                params![patient_ref],
                |r| super::sealing::column_bytes(r, 0),
            )
            .optional()
            .expect("state")
    }

    /// For tests: the stored payload bytes of every score, by id.
    pub(crate) fn score_payloads_at_rest(&self) -> Vec<Vec<u8>> {
        let mut stmt = self
            .conn
            .prepare("SELECT payload FROM scores ORDER BY id")
            .expect("prepare");
        stmt.query_map([], |r| super::sealing::column_bytes(r, 0))
            .and_then(Iterator::collect)
            .expect("payloads")
    }
}
