//! Shadow alerts (issue 21, schema v6): the would-be alert changes of a rule-set
//! version that does not deliver for the device (its role there is `shadow`). Stored
//! beside the delivered alerts, never in `alerts`: nothing reads this table to publish,
//! hand over or sink. Clinical plane like the scores: payload sealed per patient
//! (context `shadow-alert|<change_id>`), erased, retained and exported like them.

use rusqlite::params;
use sha2::{Digest as _, Sha256};

use super::write::{Commit, Stored};
use super::{Payload, Store, StoreError, i2u, u2i};

/// One would-be alert change of a rule-set version that does not deliver for the device.
#[derive(Debug, Clone, PartialEq)]
pub struct NewShadowAlert {
    /// Deterministic: `sa-` + 32 hex of SHA-256("vitalmq/shadow-alert/v1" 0 version 0
    /// alert_id 0 state 0 triggering event id); a resend is stored once.
    pub change_id: String,
    pub alert_id: String,
    /// `""` when the device has no patient (the payload is then stored in the clear,
    /// like an alert body that names no patient).
    pub patient_ref: String,
    pub site: String,
    pub device: String,
    /// Registry name of the rule set, e.g. `rules`.
    pub model: String,
    /// `RuleSet::version()`.
    pub version: String,
    /// `RuleSet::sha256()`.
    pub config_sha256: String,
    /// `shadow`.
    pub role: String,
    /// Rule id, or `ops/signal_quality`, `ops/sensor_fault`.
    pub rule: String,
    /// `open`, `escalated` or `resolved`.
    pub state: String,
    pub severity: String,
    /// The change's `raised_at_ms`.
    pub at_ms: u64,
    /// Bridge clock.
    pub created_at_ms: u64,
    /// The would-be alert message (JSON), exactly as it would have been published.
    pub payload: String,
}

/// The deterministic id of a shadow alert change (see [`NewShadowAlert::change_id`]).
pub fn shadow_change_id(version: &str, alert_id: &str, state: &str, event_id: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"vitalmq/shadow-alert/v1\0");
    for part in [version, alert_id, state] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    h.update(event_id.as_bytes());
    format!("sa-{}", hex::encode(&h.finalize()[..16]))
}

/// The shadow alerts of `c`, inside the caller's transaction, as sealed
/// (`seal_batch`): one whose patient was erased (`None`) is not written; one already
/// stored (same `change_id`) is kept once.
pub(super) fn write_shadow_alerts(
    tx: &rusqlite::Transaction<'_>,
    c: &Commit,
    sealed: &[Option<Stored<'_>>],
) -> rusqlite::Result<()> {
    let mut row = tx.prepare_cached(
        "INSERT INTO shadow_alerts (change_id, alert_id, patient_ref, site, device, model,
             version, config_sha256, role, rule, state, severity, at_ms, created_at_ms, payload)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
         ON CONFLICT(change_id) DO NOTHING",
    )?;
    for (s, payload) in c.shadow_alerts.iter().zip(sealed) {
        let Some(payload) = payload else { continue };
        row.execute(params![
            s.change_id,
            s.alert_id,
            s.patient_ref,
            s.site,
            s.device,
            s.model,
            s.version,
            s.config_sha256,
            s.role,
            s.rule,
            s.state,
            s.severity,
            u2i(s.at_ms),
            u2i(s.created_at_ms),
            payload.value()
        ])?;
    }
    Ok(())
}

/// One stored shadow alert change as a reader gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredShadowAlert {
    pub id: u64,
    pub change_id: String,
    pub alert_id: String,
    pub patient_ref: String,
    pub site: String,
    pub device: String,
    pub model: String,
    pub version: String,
    pub config_sha256: String,
    pub role: String,
    pub rule: String,
    pub state: String,
    pub severity: String,
    pub at_ms: u64,
    pub created_at_ms: u64,
    pub payload: Payload,
}

const COLUMNS: &str = "id, change_id, alert_id, patient_ref, site, device, model, version,
    config_sha256, role, rule, state, severity, at_ms, created_at_ms, payload";

impl Store {
    /// Shadow alert changes after `after_id` (ascending), at most `limit`, optionally
    /// of one patient, payloads opened through the keyring when there is one.
    pub fn shadow_alerts(
        &self,
        after_id: u64,
        patient_ref: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredShadowAlert>, StoreError> {
        self.query_shadow_alerts(
            &format!(
                "SELECT {COLUMNS} FROM shadow_alerts
                 WHERE id > ?1 AND (?2 IS NULL OR patient_ref = ?2)
                 ORDER BY id LIMIT ?3"
            ),
            params![
                u2i(after_id),
                patient_ref,
                i64::try_from(limit).unwrap_or(i64::MAX)
            ],
        )
    }

    /// The shadow alert changes of `model` at the two `versions` whose change time
    /// (`at_ms`) is in `[since_ms, until_ms)`, after `after_id` (ascending), at most
    /// `limit`: selected before any payload is opened (`vitalmq models compare`).
    pub fn shadow_alerts_of(
        &self,
        model: &str,
        versions: [&str; 2],
        (since_ms, until_ms): (Option<u64>, Option<u64>),
        after_id: u64,
        limit: usize,
    ) -> Result<Vec<StoredShadowAlert>, StoreError> {
        self.query_shadow_alerts(
            &format!(
                "SELECT {COLUMNS} FROM shadow_alerts
                 WHERE id > ?1 AND model = ?2 AND version IN (?3, ?4)
                   AND (?5 IS NULL OR at_ms >= ?5) AND (?6 IS NULL OR at_ms < ?6)
                 ORDER BY id LIMIT ?7"
            ),
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

    fn query_shadow_alerts(
        &self,
        sql: &str,
        params: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<StoredShadowAlert>, StoreError> {
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
                        r.get::<_, String>(6)?,
                        r.get::<_, String>(7)?,
                    ),
                    (
                        r.get::<_, String>(8)?,
                        r.get::<_, String>(9)?,
                        r.get::<_, String>(10)?,
                        r.get::<_, String>(11)?,
                        r.get::<_, String>(12)?,
                        r.get::<_, i64>(13)?,
                        r.get::<_, i64>(14)?,
                        super::sealing::column_bytes(r, 15)?,
                    ),
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let ((id, change_id, alert_id, patient_ref, site, device, model, version), rest) =
                row.map_err(|e| self.err(e))?;
            let (config_sha256, role, rule, state, severity, at, created, bytes) = rest;
            let payload =
                self.open_payload(&bytes, &super::sealing::shadow_alert_context(&change_id))?;
            out.push(StoredShadowAlert {
                id: i2u(id),
                change_id,
                alert_id,
                patient_ref,
                site,
                device,
                model,
                version,
                config_sha256,
                role,
                rule,
                state,
                severity,
                at_ms: i2u(at),
                created_at_ms: i2u(created),
                payload,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
impl Store {
    /// For tests: the stored payload bytes of every shadow alert, by id.
    pub(crate) fn shadow_alert_payloads_at_rest(&self) -> Vec<Vec<u8>> {
        let mut stmt = self
            .conn
            .prepare("SELECT payload FROM shadow_alerts ORDER BY id")
            .expect("prepare");
        stmt.query_map([], |r| super::sealing::column_bytes(r, 0))
            .and_then(Iterator::collect)
            .expect("payloads")
    }
}
