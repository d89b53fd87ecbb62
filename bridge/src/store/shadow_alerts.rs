//! Shadow alerts (issue 21, schema v6): the would-be alert changes of a rule-set
//! version that does not deliver for the device (its role there is `shadow`). Stored
//! beside the delivered alerts, never in `alerts`: nothing reads this table to publish,
//! hand over or sink. Clinical plane like the scores: payload sealed per patient
//! (context `shadow-alert|<change_id>`), erased, retained and exported like them.

use rusqlite::params;

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
    crate::derived_id::derived_id(
        "sa",
        "vitalmq/shadow-alert/v1",
        &[version, alert_id, state, event_id],
    )
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

/// One delivered clinical alert change (an `alerts` row), for comparing rule-set
/// versions against their shadow alerts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveredChange {
    pub position: i64,
    pub alert_id: String,
    pub state: String,
    pub device: Option<String>,
    pub rule: Option<String>,
    pub created_at_ms: u64,
    /// The body as published, opened through the keyring.
    pub body: Payload,
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

    /// The shadow alert changes of `model` at the two `versions` the bridge recorded
    /// (`created_at_ms`, its clock, like the delivered alerts' period) in
    /// `[since_ms, until_ms)`, after `after_id` (ascending), at most `limit`: selected
    /// before any payload is opened (`vitalmq models compare`).
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
                   AND (?5 IS NULL OR created_at_ms >= ?5) AND (?6 IS NULL OR created_at_ms < ?6)
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

    /// The clinical alert changes the bridge recorded (`created_at_ms`) in
    /// `[since_ms, until_ms)` after `after_position` (ascending), at most `limit`: the
    /// delivered side of `vitalmq models compare` for rule sets (which keeps those whose
    /// `policy_sha256` is a compared version's digest).
    pub fn clinical_alerts_in(
        &self,
        (since_ms, until_ms): (Option<u64>, Option<u64>),
        after_position: i64,
        limit: usize,
    ) -> Result<Vec<DeliveredChange>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT position, alert_id, state, device, rule, created_at_ms, body
                 FROM alerts WHERE position > ?1 AND kind = 'clinical'
                   AND (?2 IS NULL OR created_at_ms >= ?2) AND (?3 IS NULL OR created_at_ms < ?3)
                 ORDER BY position LIMIT ?4",
            )
            .map_err(|e| self.err(e))?;
        let rows: Vec<(DeliveredChange, Vec<u8>)> = stmt
            .query_map(
                params![
                    after_position,
                    since_ms.map(u2i),
                    until_ms.map(u2i),
                    i64::try_from(limit).unwrap_or(i64::MAX)
                ],
                |r| {
                    Ok((
                        DeliveredChange {
                            position: r.get(0)?,
                            alert_id: r.get(1)?,
                            state: r.get(2)?,
                            device: r.get(3)?,
                            rule: r.get(4)?,
                            created_at_ms: i2u(r.get(5)?),
                            body: Payload::Locked,
                        },
                        super::sealing::column_bytes(r, 6)?,
                    ))
                },
            )
            .and_then(Iterator::collect)
            .map_err(|e| self.err(e))?;
        rows.into_iter()
            .map(|(mut row, stored)| {
                row.body = self.open_payload(
                    &stored,
                    &super::sealing::alert_context(&row.alert_id, &row.state),
                )?;
                Ok(row)
            })
            .collect()
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::write::test_events::event;
    use super::*;

    const T0: u64 = 1_767_571_200_000;

    fn keyring_in(dir: &std::path::Path) -> Arc<vitalmq_keyring::Keyring> {
        let kek =
            Arc::new(vitalmq_keyring::LocalKeyFile::create(&dir.join("kek.json")).expect("kek"));
        Arc::new(vitalmq_keyring::Keyring::open(&dir.join("keyring.sqlite3"), kek).expect("ring"))
    }

    /// A would-be change of version `v2` for `patient`, triggered by `event_id`.
    fn change(patient: &str, state: &str, at_ms: u64, event_id: &str) -> NewShadowAlert {
        let alert_id = "al-spo2-low-1".to_owned();
        NewShadowAlert {
            change_id: shadow_change_id("v2", &alert_id, state, event_id),
            payload: serde_json::json!({"alert_id": alert_id, "kind": "clinical",
                "state": state, "rule": "spo2-low", "rule_version": "v2",
                "patient_ref": patient, "value": 87.25, "raised_at": "2026-01-05T00:00:00.000Z"})
            .to_string(),
            alert_id,
            patient_ref: patient.into(),
            site: "site-01".into(),
            device: "dev-00001".into(),
            model: "rules".into(),
            version: "v2".into(),
            config_sha256: "cd".repeat(32),
            role: "shadow".into(),
            rule: "spo2-low".into(),
            state: state.into(),
            severity: "urgent".into(),
            at_ms,
            created_at_ms: at_ms + 5,
        }
    }

    #[test]
    fn the_change_id_is_deterministic_and_names_each_part() {
        let id = shadow_change_id("v2", "al-1", "open", "ev1-aa");
        assert_eq!(id, shadow_change_id("v2", "al-1", "open", "ev1-aa"));
        assert!(id.starts_with("sa-") && id.len() == 3 + 32, "{id}");
        for other in [
            shadow_change_id("v3", "al-1", "open", "ev1-aa"),
            shadow_change_id("v2", "al-2", "open", "ev1-aa"),
            shadow_change_id("v2", "al-1", "resolved", "ev1-aa"),
            shadow_change_id("v2", "al-1", "open", "ev1-bb"),
            // The separators keep the parts apart.
            shadow_change_id("v2a", "l-1", "open", "ev1-aa"),
        ] {
            assert_ne!(id, other);
        }
    }

    #[test]
    fn shadow_alerts_are_written_with_the_batch_read_back_and_stored_once() {
        let dir = tempfile::tempdir().expect("dir");
        let mut store = Store::open(dir.path()).expect("open");
        let open = change("pt-7f3a", "open", T0, "ev1-01");
        let resolved = change("pt-7f3a", "resolved", T0 + 60_000, "ev1-02");
        let batch = Commit {
            events: vec![event("dev-00001", 1, 1)],
            shadow_alerts: vec![open.clone(), resolved.clone()],
            ..Commit::default()
        };
        store.commit(&batch).expect("commit");
        // A resend of the batch (and the alert part alone, as while paused): once.
        store.commit_alerts_only(&batch).expect("again");
        let rows = store.shadow_alerts(0, None, 10).expect("read");
        assert_eq!(rows.len(), 2);
        let r = &rows[0];
        assert_eq!(
            (
                r.change_id.as_str(),
                r.alert_id.as_str(),
                r.version.as_str(),
                r.role.as_str(),
                r.rule.as_str(),
                r.state.as_str(),
                r.severity.as_str(),
                r.at_ms,
                r.created_at_ms
            ),
            (
                open.change_id.as_str(),
                "al-spo2-low-1",
                "v2",
                "shadow",
                "spo2-low",
                "open",
                "urgent",
                T0,
                T0 + 5
            )
        );
        assert_eq!(r.payload, Payload::Plain(open.payload.clone().into_bytes()));
        assert!(rows[1].id > rows[0].id, "monotonic ids");
        // Paging, per patient, and the compare selection by version and period.
        assert_eq!(
            store
                .shadow_alerts(rows[0].id, None, 10)
                .expect("page")
                .len(),
            1
        );
        assert!(
            store
                .shadow_alerts(0, Some("pt-other"), 10)
                .expect("pt")
                .is_empty()
        );
        let of = |versions, period| {
            store
                .shadow_alerts_of("rules", versions, period, 0, 10)
                .expect("of")
                .len()
        };
        assert_eq!(of(["v1", "v2"], (None, None)), 2);
        assert_eq!(of(["v1", "v3"], (None, None)), 0);
        // The period is the bridge's recording time.
        assert_eq!(of(["v2", "v2"], (Some(T0 + 5), Some(T0 + 6))), 1);
        assert_eq!(of(["v2", "v2"], (Some(T0 + 6), None)), 1);
        // The alert part carries the shadow alerts (written while recording is paused).
        let mut paused = Commit {
            shadow_alerts: vec![change("pt-7f3a", "open", T0 + 120_000, "ev1-03")],
            ..Commit::default()
        };
        let part = paused.take_alert_part();
        assert!(paused.shadow_alerts.is_empty());
        store.commit_alerts_only(&part).expect("alerts only");
        assert_eq!(store.shadow_alerts(0, None, 10).expect("read").len(), 3);
    }

    #[test]
    fn shadow_alerts_are_sealed_per_patient_and_an_erased_patient_gets_no_new_row() {
        let dir = tempfile::tempdir().expect("dir");
        let keys = tempfile::tempdir().expect("keys");
        let keyring = keyring_in(keys.path());
        let mut store = Store::open(dir.path())
            .expect("open")
            .with_keyring(Arc::clone(&keyring));
        let mut unattributed = change("", "open", T0, "ev1-09");
        unattributed.change_id = shadow_change_id("v2", "al-x", "open", "ev1-09");
        store
            .commit(&Commit {
                shadow_alerts: vec![change("pt-7f3a", "open", T0, "ev1-01"), unattributed],
                ..Commit::default()
            })
            .expect("commit");
        let at_rest = store.shadow_alert_payloads_at_rest();
        assert!(vitalmq_keyring::is_sealed(&at_rest[0]), "sealed at rest");
        // (The sealed header names its subject, the patient pseudonym, by design.)
        for clear in ["87.25", "spo2-low"] {
            assert!(
                !at_rest[0]
                    .windows(clear.len())
                    .any(|w| w == clear.as_bytes()),
                "{clear} in the payload at rest"
            );
        }
        assert!(
            !vitalmq_keyring::is_sealed(&at_rest[1]),
            "no patient: in the clear, like an alert body naming none"
        );
        let rows = store.shadow_alerts(0, None, 10).expect("read");
        assert!(matches!(&rows[0].payload, Payload::Plain(p) if p.starts_with(b"{")));
        // Without the keyring: locked, not erased.
        let locked = Store::open(dir.path()).expect("reopen");
        assert_eq!(
            locked.shadow_alerts(0, None, 10).expect("read")[0].payload,
            Payload::Locked
        );
        drop(locked);

        keyring
            .erase(
                &vitalmq_keyring::Subject::new("pt-7f3a").expect("s"),
                "po",
                "test",
                1,
            )
            .expect("erase");
        assert!(
            store.shadow_alerts(0, None, 10).expect("read")[0]
                .payload
                .is_erased()
        );
        // A late reading's shadow alert of the erased patient is not written.
        let committed = store
            .commit(&Commit {
                shadow_alerts: vec![change("pt-7f3a", "resolved", T0 + 1, "ev1-02")],
                ..Commit::default()
            })
            .expect("commit");
        assert_eq!(committed.erased_patients, ["pt-7f3a"]);
        assert_eq!(store.shadow_alerts(0, None, 10).expect("read").len(), 2);
    }

    #[test]
    fn plaintext_shadow_alerts_are_scrubbed_on_erasure() {
        let dir = tempfile::tempdir().expect("dir");
        let mut store = Store::open(dir.path()).expect("open");
        store
            .commit(&Commit {
                shadow_alerts: vec![
                    change("pt-7f3a", "open", T0, "ev1-01"),
                    change("pt-other", "resolved", T0, "ev1-02"),
                ],
                ..Commit::default()
            })
            .expect("commit");
        let cleanup = store
            .erase_cleanup("pt-7f3a", &super::super::sealing::ErasureScope::default())
            .expect("cleanup");
        assert_eq!(cleanup.legacy_scrubbed, 1);
        let rows = store.shadow_alerts(0, None, 10).expect("read");
        assert!(rows[0].payload.is_erased());
        assert!(!rows[1].payload.is_erased(), "another patient's kept");
    }

    #[test]
    fn a_version_5_store_gains_the_table_and_a_newer_one_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let store = Store::open(dir.path()).expect("open");
            // As a store written by the previous release.
            store
                .conn
                .execute_batch("DROP TABLE shadow_alerts; PRAGMA user_version = 5;")
                .expect("v5");
        }
        let mut store = Store::open(dir.path()).expect("migrated");
        assert_eq!(
            super::super::schema::version(&store.conn).expect("version"),
            6
        );
        store
            .commit(&Commit {
                shadow_alerts: vec![change("pt-7f3a", "open", T0, "ev1-01")],
                ..Commit::default()
            })
            .expect("commit");
        assert_eq!(store.shadow_alerts(0, None, 10).expect("read").len(), 1);
        store
            .conn
            .execute_batch("PRAGMA user_version = 7;")
            .expect("newer");
        drop(store);
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::NewerSchema {
                found: 7,
                known: 6,
                ..
            })
        ));
    }
}
