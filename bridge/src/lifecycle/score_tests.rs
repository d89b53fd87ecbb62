//! Scores (issue 21) as the clinical plane: retention deletes or anonymizes them,
//! holds keep them, erasure leaves nothing readable, and a late reading of an erased
//! patient makes no score.

use std::path::Path;
use std::sync::Arc;

use super::plan::{self, Context};
use super::report::Report;
use crate::score::NewScore;
use crate::store::{Commit, Payload, RetainedScore, Store, StoreAct};
use vitalmq_policies::{Hold, LegalHolds, PrincipalId, RetentionPolicy};

const DAY: u64 = plan::DAY_MS;
const T0: u64 = 1_767_571_200_000;

fn policy(action: &str) -> RetentionPolicy {
    let mut text = format!(
        "format = \"vitalmq-retention/v1\"\n[planes.clinical]\nkeep_for = \"1day\"\naction = \"{action}\"\n"
    );
    for other in [
        "raw",
        "normalized",
        "quarantine",
        "\"audit:broker\"",
        "\"audit:bridge\"",
        "\"audit:admin\"",
        "\"audit:operator\"",
    ] {
        text.push_str(&format!(
            "[planes.{other}]\nkeep_for = \"1day\"\naction = \"delete\"\n"
        ));
    }
    RetentionPolicy::parse(&text, Path::new("retention.toml")).expect("policy")
}

fn ctx<'a>(policy: &'a RetentionPolicy, holds: &'a LegalHolds, now: u64) -> Context<'a> {
    Context {
        policy,
        holds,
        now,
        sinks_through: None,
        archived_through: None,
        handlers_through: None,
    }
}

fn new_score(score_id: &str, patient: &str, at: u64) -> NewScore {
    let payload = serde_json::json!({
        "format": "vitalmq-score/v1", "score_id": score_id, "model": "news2",
        "version": "rcp-2017.1", "config_sha256": "ab", "role": "live",
        "patient_ref": patient, "site": "site-01", "device": "dev-00001",
        "observed_at": crate::normalize::rfc3339_ms(at), "aggregate": 5,
        "risk": "medium", "complete": true, "assessment": "exact", "red": false,
        "sub_scores": {"pulse": 2}, "missing": [],
        "inputs": [{"metric": "pulse", "value": 111, "event_id": "ev1-00aa",
                    "observed_at": crate::normalize::rfc3339_ms(at)}],
    });
    NewScore {
        score_id: score_id.into(),
        patient_ref: patient.into(),
        site: "site-01".into(),
        device: "dev-00001".into(),
        model: "news2".into(),
        version: "rcp-2017.1".into(),
        config_sha256: "ab".into(),
        role: "live".into(),
        observed_at_ms: at,
        created_at_ms: at,
        payload: payload.to_string(),
    }
}

fn retained(id: i64, at: u64) -> RetainedScore {
    RetainedScore {
        id,
        score_id: "sc-1".into(),
        device: "dev-00001".into(),
        observed_at_ms: at,
        created_at_ms: at,
        payload: Some(new_score("sc-1", "pt-7f3a", at).payload),
        patient_ref: Some("pt-7f3a".into()),
        erased: false,
        anonymized: false,
    }
}

#[test]
fn a_score_is_due_at_keep_for_unless_held() {
    let (p, holds) = (policy("delete"), LegalHolds::none());
    let mut report = Report::default();
    let r = retained(1, T0);
    assert_eq!(
        plan::score(&ctx(&p, &holds, T0 + DAY - 1), &r, &mut report),
        None
    );
    assert_eq!(
        plan::score(&ctx(&p, &holds, T0 + DAY), &r, &mut report),
        Some(StoreAct::DeleteScore { id: 1 })
    );
    let held = LegalHolds::from_holds(vec![Hold {
        id: "h1".into(),
        reason: "test".into(),
        placed_by: PrincipalId::new("tester").expect("id"),
        placed_at: 0,
        patient_ref: Some("pt-7f3a".into()),
        device: None,
        during: None,
    }]);
    assert_eq!(
        plan::score(&ctx(&p, &held, T0 + DAY), &r, &mut report),
        None
    );
    let p = policy("anonymize");
    match plan::score(&ctx(&p, &holds, T0 + DAY + 1), &r, &mut report) {
        Some(StoreAct::AnonymizeScore { id, json, hour_ms }) => {
            assert_eq!((id, hour_ms), (1, T0));
            let v: serde_json::Value = serde_json::from_str(&json).expect("json");
            assert_eq!(v["score_id"], "anon-s1");
            assert_eq!(v["aggregate"], 5);
            for gone in ["patient_ref", "device", "inputs"] {
                assert!(v.get(gone).is_none(), "{gone} in {v}");
            }
        }
        other => panic!("{other:?}"),
    }
    let erased = RetainedScore {
        erased: true,
        payload: None,
        ..retained(2, T0)
    };
    assert_eq!(
        plan::score(&ctx(&p, &holds, T0 + DAY), &erased, &mut report),
        Some(StoreAct::DeleteScore { id: 2 })
    );
}

fn keyring_in(dir: &Path) -> Arc<vitalmq_keyring::Keyring> {
    let kek = Arc::new(vitalmq_keyring::LocalKeyFile::create(&dir.join("kek.json")).expect("kek"));
    Arc::new(vitalmq_keyring::Keyring::open(&dir.join("keyring.sqlite3"), kek).expect("ring"))
}

#[test]
fn scores_are_sealed_per_patient_and_an_erased_patient_gets_no_new_one() {
    let dir = tempfile::tempdir().expect("dir");
    let keys = tempfile::tempdir().expect("keys");
    let keyring = keyring_in(keys.path());
    let mut store = Store::open(dir.path())
        .expect("open")
        .with_keyring(Arc::clone(&keyring));
    store
        .commit(&Commit {
            scores: vec![new_score("sc-1", "pt-7f3a", T0)],
            patient_states: vec![("pt-7f3a".into(), "{}".into())],
            ..Commit::default()
        })
        .expect("commit");
    let at_rest = store.score_payloads_at_rest();
    assert!(vitalmq_keyring::is_sealed(&at_rest[0]), "sealed at rest");
    let rows = store.scores(0, None, 10).expect("scores");
    assert!(matches!(&rows[0].payload, Payload::Plain(p) if p.starts_with(b"{")));

    keyring
        .erase(
            &vitalmq_keyring::Subject::new("pt-7f3a").expect("s"),
            "po",
            "test",
            1,
        )
        .expect("erase");
    let cleanup = store
        .erase_cleanup("pt-7f3a", &crate::store::sealing::ErasureScope::default())
        .expect("cleanup");
    assert_eq!(cleanup.score_states, 1);
    assert!(
        store
            .load_patient_score_states()
            .expect("states")
            .is_empty()
    );
    assert!(matches!(
        store.scores(0, None, 10).expect("scores")[0].payload,
        Payload::Erased { .. }
    ));
    // A late reading's score (and state) of the erased patient is not written.
    store
        .commit(&Commit {
            scores: vec![new_score("sc-2", "pt-7f3a", T0 + 1)],
            patient_states: vec![("pt-7f3a".into(), "{}".into())],
            ..Commit::default()
        })
        .expect("commit");
    assert_eq!(store.scores(0, None, 10).expect("scores").len(), 1);
    assert!(
        store
            .load_patient_score_states()
            .expect("states")
            .is_empty()
    );

    // Retention deletes the erased husk when due.
    let p = policy("anonymize");
    let holds = LegalHolds::none();
    let rows = store.retention_scores(0, 10).expect("rows");
    let mut report = Report::default();
    let acts: Vec<_> = rows
        .iter()
        .filter_map(|r| plan::score(&ctx(&p, &holds, T0 + DAY), r, &mut report))
        .collect();
    assert_eq!(acts, vec![StoreAct::DeleteScore { id: rows[0].id }]);
    store.apply_retention(&acts).expect("apply");
    assert!(store.scores(0, None, 10).expect("scores").is_empty());
}

#[test]
fn an_anonymized_score_keeps_the_score_and_forgets_the_patient() {
    let dir = tempfile::tempdir().expect("dir");
    let mut store = Store::open(dir.path()).expect("open");
    store
        .commit(&Commit {
            scores: vec![new_score("sc-1", "pt-7f3a", T0 + 1234)],
            ..Commit::default()
        })
        .expect("commit");
    let p = policy("anonymize");
    let holds = LegalHolds::none();
    let rows = store.retention_scores(0, 10).expect("rows");
    let mut report = Report::default();
    let acts: Vec<_> = rows
        .iter()
        .filter_map(|r| plan::score(&ctx(&p, &holds, T0 + 2 * DAY), r, &mut report))
        .collect();
    store.apply_retention(&acts).expect("apply");
    let row = &store.scores(0, None, 10).expect("scores")[0];
    assert_eq!(row.score_id, "anon-s1");
    assert_eq!(
        (row.patient_ref.as_str(), row.device.as_str()),
        ("", "anonymized")
    );
    assert_eq!(row.observed_at_ms, T0);
    let Payload::Plain(bytes) = &row.payload else {
        panic!("{:?}", row.payload)
    };
    let v: serde_json::Value = serde_json::from_slice(bytes).expect("json");
    assert_eq!(v["anonymized"], "vitalmq-anonymize/1");
    assert!(v.get("patient_ref").is_none());
    // A second run leaves it be.
    let rows = store.retention_scores(0, 10).expect("rows");
    assert!(rows[0].anonymized);
    assert_eq!(
        plan::score(&ctx(&p, &holds, T0 + 3 * DAY), &rows[0], &mut report),
        None
    );
}

/// The scoring state holds the patient's latest readings and their event ids: sealed
/// for the patient at rest (so backups hold no plaintext readings), opened at load.
#[test]
fn the_patient_scoring_state_is_sealed_at_rest_and_opened_at_load() {
    let dir = tempfile::tempdir().expect("dir");
    let keys = tempfile::tempdir().expect("keys");
    let mut store = Store::open(dir.path())
        .expect("open")
        .with_keyring(keyring_in(keys.path()));
    let state = r#"{"latest":{"spo2":{"value":87.25,"event_id":"ev1-secret-reading","observed_at_ms":1,"device":"dev-00001"}}}"#;
    store
        .commit(&Commit {
            patient_states: vec![("pt-7f3a".into(), state.into())],
            ..Commit::default()
        })
        .expect("commit");
    let at_rest = store.score_state_at_rest("pt-7f3a").expect("row");
    assert!(vitalmq_keyring::is_sealed(&at_rest), "sealed at rest");
    for clear in ["87.25", "ev1-secret-reading", "spo2"] {
        assert!(
            !at_rest.windows(clear.len()).any(|w| w == clear.as_bytes()),
            "{clear} in the state at rest"
        );
    }
    let loaded = store.load_patient_score_states().expect("states");
    assert_eq!(loaded["pt-7f3a"], state);
    // Without its keyring, the store does not pretend there was no state.
    drop(store);
    assert!(matches!(
        Store::open(dir.path())
            .expect("reopen")
            .load_patient_score_states(),
        Err(crate::store::StoreError::NoKeyring { .. })
    ));
}

/// While recording is paused the alert part is written alone: an erased patient's
/// late alert change is dropped, and with it the patient's scoring state (it would
/// write the pre-erasure readings back); the commit names the patient so the
/// sequencer forgets it.
#[test]
fn the_alerts_only_commit_does_not_write_back_an_erased_patients_state() {
    let dir = tempfile::tempdir().expect("dir");
    let keys = tempfile::tempdir().expect("keys");
    let keyring = keyring_in(keys.path());
    let mut store = Store::open(dir.path())
        .expect("open")
        .with_keyring(Arc::clone(&keyring));
    keyring
        .erase(
            &vitalmq_keyring::Subject::new("pt-7f3a").expect("s"),
            "po",
            "test",
            1,
        )
        .expect("erase");
    let alert = crate::store::NewAlert {
        alert_id: "al-1".into(),
        state: "open".into(),
        kind: "clinical".into(),
        topic: "alerts/site-01/urgent/dev-00001".into(),
        device: Some("dev-00001".into()),
        rule: Some("news2-high".into()),
        created_at_ms: T0,
        body: r#"{"alert_id":"al-1","patient_ref":"pt-7f3a","score_id":"sc-1"}"#.into(),
        level: 0,
    };
    let committed = store
        .commit_alerts_only(&Commit {
            alerts: vec![alert],
            patient_states: vec![("pt-7f3a".into(), r#"{"latest":{}}"#.into())],
            ..Commit::default()
        })
        .expect("alerts only");
    assert_eq!(committed.erased_alerts.len(), 1);
    assert_eq!(committed.erased_patients, ["pt-7f3a"]);
    assert!(
        store.score_state_at_rest("pt-7f3a").is_none(),
        "not written back"
    );
}
