//! Does a keyring hold the keys a store's sealed payloads need? (issue 20)
//!
//! A store backup holds ciphertext only; the keyring lives apart. Restoring a store
//! beside the wrong keyring (a new, empty one, as a default configuration would make)
//! would leave every sealed row unreadable, and new data sealed under fresh keys whose
//! version numbers collide with the lost ones. So a restore given the keyring checks
//! that every (subject, key version) named in the copy's sealed headers is in it, or
//! erased; and the bridge refuses to start on a store holding sealed rows beside a
//! keyring that holds no key and no tombstone at all.

use std::collections::BTreeSet;
use std::path::Path;

use rusqlite::{Connection, OpenFlags};
use serde::Serialize;
use vitalmq_keyring::{KeyError, Keyring, Subject};

/// The columns that may hold sealed payloads.
const SEALED_COLUMNS: [(&str, &str); 7] = [
    ("events", "normalized"),
    ("raw_messages", "bytes"),
    ("alerts", "body"),
    ("quarantine", "bytes"),
    // Schema v5 (issue 21): a store written before it has neither table.
    ("scores", "payload"),
    ("patient_score_state", "state"),
    // Schema v6 (issue 21): rule-set shadow alerts.
    ("shadow_alerts", "payload"),
];

/// How far a keyring covers a store's sealed rows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Coverage {
    /// Sealed payloads in the store.
    pub sealed_rows: u64,
    /// Distinct (subject, key version) pairs they name.
    pub key_versions: u64,
    /// Pairs whose subject the keyring holds a tombstone of (erased: unreadable by
    /// design).
    pub erased: u64,
    /// Pairs the keyring neither holds nor knows as erased.
    pub missing: u64,
}

/// Every distinct (subject, key version) named by a sealed payload of the store file
/// `db` (opened read-only), and how many sealed payloads there are.
pub fn sealed_key_refs(db: &Path) -> rusqlite::Result<(u64, BTreeSet<(String, u32)>)> {
    key_refs(db, None)
}

/// The (subject, key version) pairs of the sealed payloads of `db`, every one or the
/// `newest` of each column; only the first bytes of each are read (the header).
fn key_refs(db: &Path, newest: Option<u32>) -> rusqlite::Result<(u64, BTreeSet<(String, u32)>)> {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    // SQLite's LIMIT -1: no limit.
    let limit = newest.map_or(-1, i64::from);
    let mut refs = BTreeSet::new();
    let mut rows = 0u64;
    for (table, column) in SEALED_COLUMNS {
        let present: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
            [table],
            |r| r.get(0),
        )?;
        if !present {
            continue;
        }
        let mut stmt = conn.prepare(&format!(
            "SELECT substr({column}, 1, 80) FROM {table} WHERE {} ORDER BY rowid DESC LIMIT ?1",
            sealed_condition(column)
        ))?;
        let mut q = stmt.query([limit])?;
        while let Some(row) = q.next()? {
            let head: Vec<u8> = row.get(0)?;
            if let Ok(h) = vitalmq_keyring::sealed::header_only(&head) {
                rows += 1;
                refs.insert((h.subject.as_str().to_owned(), h.key_version));
            }
        }
    }
    Ok((rows, refs))
}

/// Checks the store file `db` against `keyring`.
pub fn coverage(db: &Path, keyring: &Keyring) -> Result<Coverage, CoverageError> {
    let (sealed_rows, refs) = sealed_key_refs(db).map_err(|source| CoverageError::Sqlite {
        path: db.display().to_string(),
        source,
    })?;
    check(keyring, sealed_rows, &refs)
}

/// The SQL condition "column `c` holds a sealed payload": a blob starting with the
/// sealed format's magic and version (plaintext raw bytes and scrubbed payloads are
/// blobs too).
pub(super) fn sealed_condition(column: &str) -> String {
    format!("typeof({column}) = 'blob' AND substr({column}, 1, 5) = X'564D515301'")
}

/// Whether the store file `db` holds any sealed payload (a quick look, for start-up).
pub fn holds_sealed_rows(db: &Path) -> rusqlite::Result<bool> {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    for (table, column) in SEALED_COLUMNS {
        let found: bool = conn.query_row(
            &format!(
                "SELECT EXISTS(SELECT 1 FROM {table} WHERE {})",
                sealed_condition(column)
            ),
            [],
            |r| r.get(0),
        )?;
        if found {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Like [`coverage`], on the `per_column` newest sealed payloads of each column only: a
/// cheap look at start-up that catches a keyring of another store, or an older copy of
/// this one, without reading every row.
pub fn coverage_of_newest(
    db: &Path,
    keyring: &Keyring,
    per_column: u32,
) -> Result<Coverage, CoverageError> {
    let (rows, refs) = key_refs(db, Some(per_column)).map_err(|source| CoverageError::Sqlite {
        path: db.display().to_string(),
        source,
    })?;
    check(keyring, rows, &refs)
}

fn check(
    keyring: &Keyring,
    sealed_rows: u64,
    refs: &BTreeSet<(String, u32)>,
) -> Result<Coverage, CoverageError> {
    let mut c = Coverage {
        sealed_rows,
        key_versions: refs.len() as u64,
        ..Coverage::default()
    };
    for (subject, version) in refs {
        let subject = Subject::new(subject)?;
        if keyring.has_key(&subject, *version)? {
            continue;
        }
        if keyring.erased(&subject)?.is_some() {
            c.erased += 1;
        } else {
            c.missing += 1;
        }
    }
    Ok(c)
}

#[derive(Debug, thiserror::Error)]
pub enum CoverageError {
    #[error("{path}: {source}")]
    Sqlite {
        path: String,
        source: rusqlite::Error,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::write::test_events::event;
    use crate::store::{Commit, DB_FILE, Store};

    fn keyring(dir: &Path, name: &str) -> Keyring {
        let kek = vitalmq_keyring::LocalKeyFile::load(&dir.join("kek.json"))
            .or_else(|_| vitalmq_keyring::LocalKeyFile::create(&dir.join("kek.json")))
            .expect("kek");
        Keyring::open(&dir.join(name), Arc::new(kek)).expect("keyring")
    }

    /// Plaintext raw bytes and scrubbed payloads are blobs too: a store never sealed
    /// does not count as sealed (a plain backup restores without keys; encryption can
    /// be turned on for it).
    #[test]
    fn a_plaintext_store_holds_no_sealed_rows() {
        let dir = tempfile::tempdir().expect("dir");
        let mut store = Store::open(dir.path()).expect("open");
        store
            .commit(&Commit {
                events: vec![event("dev-00001", 1, 1)],
                ..Commit::default()
            })
            .expect("commit");
        let db = dir.path().join(DB_FILE);
        assert!(!holds_sealed_rows(&db).expect("look"));
        assert_eq!(sealed_key_refs(&db).expect("refs").0, 0);
    }

    #[test]
    fn a_keyring_covers_its_store_and_a_fresh_one_does_not() {
        let dir = tempfile::tempdir().expect("dir");
        let ring = Arc::new(keyring(dir.path(), "keyring.sqlite3"));
        let db = dir.path().join(DB_FILE);
        assert!(!holds_sealed_rows(&db).unwrap_or(false));
        let mut store = Store::open(dir.path())
            .expect("open")
            .with_keyring(Arc::clone(&ring));
        store
            .commit(&Commit {
                events: vec![event("dev-00001", 1, 1), event("dev-00001", 1, 2)],
                ..Commit::default()
            })
            .expect("commit");
        assert!(holds_sealed_rows(&db).expect("look"));
        let own = coverage(&db, &ring).expect("coverage");
        assert_eq!(own.sealed_rows, 4, "raw and normalized of two events");
        assert_eq!((own.key_versions, own.missing, own.erased), (1, 0, 0));

        let fresh = keyring(dir.path(), "other.sqlite3");
        assert_eq!(coverage(&db, &fresh).expect("coverage").missing, 1);
        assert_eq!(
            coverage_of_newest(&db, &fresh, 8).expect("newest").missing,
            1,
            "the start-up look catches another keyring"
        );
        assert_eq!(
            coverage_of_newest(&db, &ring, 8).expect("newest").missing,
            0
        );

        ring.erase(&Subject::new("pt-7f3a").expect("s"), "po", "t", 1)
            .expect("erase");
        let after = coverage(&db, &ring).expect("coverage");
        assert_eq!((after.missing, after.erased), (0, 1));
    }

    /// Scores and the scoring state (schema v5) are sealed per patient too: a keyring
    /// missing their keys must not pass the check because no event names the patient.
    #[test]
    fn sealed_scores_and_scoring_states_count() {
        let dir = tempfile::tempdir().expect("dir");
        let ring = Arc::new(keyring(dir.path(), "keyring.sqlite3"));
        drop(Store::open(dir.path()).expect("open"));
        let db = dir.path().join(DB_FILE);
        let subject = Subject::new("pt-scored01").expect("s");
        let payload = ring.seal(&subject, b"score|sc-1", b"{}").expect("seal");
        let state = ring
            .seal(&subject, b"score-state|pt-scored01", b"{}")
            .expect("seal");
        let conn = Connection::open(&db).expect("db");
        conn.execute(
            "INSERT INTO scores (score_id, patient_ref, site, device, model, version,
               config_sha256, role, observed_at_ms, created_at_ms, payload)
             VALUES ('sc-1', 'pt-scored01', 'site-01', 'dev-00001', 'news2', 'v', 'x',
               'live', 1, 1, ?1)",
            [&payload],
        )
        .expect("score");
        conn.execute(
            "INSERT INTO patient_score_state (patient_ref, state) VALUES ('pt-scored01', ?1)",
            [&state],
        )
        .expect("state");
        drop(conn);
        assert!(holds_sealed_rows(&db).expect("look"));
        let own = coverage(&db, &ring).expect("coverage");
        assert_eq!((own.sealed_rows, own.missing), (2, 0));
        let fresh = keyring(dir.path(), "other.sqlite3");
        assert_eq!(coverage(&db, &fresh).expect("coverage").missing, 1);
    }

    /// Shadow alerts (schema v6) are sealed per patient: a keyring missing their
    /// patient's key must not pass the check because nothing else names the patient.
    #[test]
    fn sealed_shadow_alerts_count() {
        let dir = tempfile::tempdir().expect("dir");
        let ring = Arc::new(keyring(dir.path(), "keyring.sqlite3"));
        drop(Store::open(dir.path()).expect("open"));
        let db = dir.path().join(DB_FILE);
        let subject = Subject::new("pt-shadow01").expect("s");
        let payload = ring
            .seal(&subject, b"shadow-alert|sa-1", b"{}")
            .expect("seal");
        let conn = Connection::open(&db).expect("db");
        conn.execute(
            "INSERT INTO shadow_alerts (change_id, alert_id, patient_ref, site, device, model,
               version, config_sha256, role, rule, state, severity, at_ms, created_at_ms, payload)
             VALUES ('sa-1', 'al-1', 'pt-shadow01', 'site-01', 'dev-00001', 'rules', 'v2',
               'x', 'shadow', 'spo2-low', 'open', 'urgent', 1, 1, ?1)",
            [&payload],
        )
        .expect("shadow alert");
        drop(conn);
        assert!(holds_sealed_rows(&db).expect("look"));
        let own = coverage(&db, &ring).expect("coverage");
        assert_eq!((own.sealed_rows, own.missing), (1, 0));
        let fresh = keyring(dir.path(), "other.sqlite3");
        assert_eq!(coverage(&db, &fresh).expect("coverage").missing, 1);
    }
}
