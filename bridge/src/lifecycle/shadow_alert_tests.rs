//! Shadow alerts (issue 21, rule-set versions in shadow) as the clinical plane:
//! retention deletes them row by row or anonymizes an episode whole once it is over,
//! holds keep them, and an erased patient's episode is deleted.

use std::path::Path;

use super::plan::{self, Context};
use super::report::Report;
use crate::store::{Commit, NewShadowAlert, Payload, Store, StoreAct, shadow_change_id};
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

fn change(alert_id: &str, patient: &str, state: &str, at: u64) -> NewShadowAlert {
    NewShadowAlert {
        change_id: shadow_change_id("v2", alert_id, state, &format!("ev1-{at}")),
        alert_id: alert_id.into(),
        patient_ref: patient.into(),
        site: "site-01".into(),
        device: "dev-00001".into(),
        model: "rules".into(),
        version: "v2".into(),
        config_sha256: "cd".into(),
        role: "shadow".into(),
        rule: "spo2-low".into(),
        state: state.into(),
        severity: "urgent".into(),
        at_ms: at,
        created_at_ms: at,
        payload: serde_json::json!({"alert_id": alert_id, "kind": "clinical", "state": state,
            "severity": "urgent", "rule": "spo2-low", "rule_version": "v2",
            "patient_ref": patient, "device": "dev-00001", "value": 87,
            "evidence": ["ev1-secret"], "raised_at": crate::normalize::rfc3339_ms(at)})
        .to_string(),
    }
}

/// Runs the planner over every shadow alert episode of `store` and applies it.
fn run(store: &mut Store, p: &RetentionPolicy, holds: &LegalHolds, now: u64) -> Report {
    let mut report = Report::default();
    let page = store.retention_shadow_alerts(0, 100).expect("page");
    let acts: Vec<StoreAct> = page
        .alerts
        .iter()
        .flat_map(|rows| plan::shadow_alert(&ctx(p, holds, now), rows, &mut report))
        .collect();
    store.apply_retention(&acts).expect("apply");
    report
}

fn ids(store: &Store) -> Vec<(String, String)> {
    store
        .shadow_alerts(0, None, 100)
        .expect("read")
        .into_iter()
        .map(|r| (r.alert_id, r.state))
        .collect()
}

#[test]
fn delete_goes_row_by_row_when_due_unless_held() {
    let dir = tempfile::tempdir().expect("dir");
    let mut store = Store::open(dir.path()).expect("open");
    store
        .commit(&Commit {
            shadow_alerts: vec![
                change("al-1", "pt-7f3a", "open", T0),
                change("al-1", "pt-7f3a", "resolved", T0 + DAY),
                change("al-2", "pt-held", "open", T0),
            ],
            ..Commit::default()
        })
        .expect("commit");
    let holds = LegalHolds::from_holds(vec![Hold {
        id: "h1".into(),
        reason: "test".into(),
        placed_by: PrincipalId::new("tester").expect("id"),
        placed_at: 0,
        patient_ref: Some("pt-held".into()),
        device: None,
        during: None,
    }]);
    let p = policy("delete");
    let report = run(&mut store, &p, &holds, T0 + DAY - 1);
    assert_eq!(report.count("clinical", "delete"), 0, "not due yet");
    let report = run(&mut store, &p, &holds, T0 + DAY);
    assert_eq!(report.count("clinical", "delete"), 1);
    assert_eq!(report.held["clinical"], 1);
    assert_eq!(
        ids(&store),
        [
            ("al-1".to_owned(), "resolved".to_owned()),
            ("al-2".to_owned(), "open".to_owned())
        ]
    );
}

#[test]
fn anonymize_waits_for_the_end_of_the_episode_then_renames_it_whole() {
    let dir = tempfile::tempdir().expect("dir");
    let mut store = Store::open(dir.path()).expect("open");
    store
        .commit(&Commit {
            shadow_alerts: vec![
                change("al-1", "pt-7f3a", "open", T0 + 1234),
                change("al-2", "pt-7f3a", "open", T0),
                change("al-1", "pt-7f3a", "resolved", T0 + 60_000),
            ],
            ..Commit::default()
        })
        .expect("commit");
    let p = policy("anonymize");
    let holds = LegalHolds::none();
    let report = run(&mut store, &p, &holds, T0 + 2 * DAY);
    assert_eq!(report.count("clinical", "anonymize"), 2);
    assert_eq!(report.skipped[&("clinical".into(), "open".into())], 1);
    let rows = store.shadow_alerts(0, None, 10).expect("read");
    // al-1's two changes share one new id (its first row's); al-2 is still open.
    assert_eq!(
        (rows[0].alert_id.as_str(), rows[2].alert_id.as_str()),
        ("anon-h1", "anon-h1")
    );
    assert_eq!(
        (rows[0].change_id.as_str(), rows[2].change_id.as_str()),
        ("anon-hc1", "anon-hc3")
    );
    assert_eq!(rows[1].alert_id, "al-2");
    for r in [&rows[0], &rows[2]] {
        assert_eq!(
            (r.patient_ref.as_str(), r.device.as_str()),
            ("", "anonymized")
        );
        assert_eq!(
            r.at_ms % crate::lifecycle::anonymize::HOUR_MS,
            0,
            "coarsened"
        );
        let Payload::Plain(bytes) = &r.payload else {
            panic!("{:?}", r.payload)
        };
        let v: serde_json::Value = serde_json::from_slice(bytes).expect("json");
        assert_eq!(v["alert_id"], "anon-h1");
        assert_eq!(v["rule"], "spo2-low");
        for gone in ["patient_ref", "device", "evidence"] {
            assert!(v.get(gone).is_none(), "{gone} in {v}");
        }
    }
    // A second run leaves the anonymized episode be.
    let again = run(&mut store, &p, &holds, T0 + 3 * DAY);
    assert_eq!(again.count("clinical", "anonymize"), 0);
}

#[test]
fn an_erased_patients_episode_is_deleted_not_anonymized() {
    let dir = tempfile::tempdir().expect("dir");
    let mut store = Store::open(dir.path()).expect("open");
    store
        .commit(&Commit {
            shadow_alerts: vec![change("al-1", "pt-7f3a", "open", T0)],
            ..Commit::default()
        })
        .expect("commit");
    store
        .erase_cleanup("pt-7f3a", &crate::store::sealing::ErasureScope::default())
        .expect("scrub");
    let report = run(
        &mut store,
        &policy("anonymize"),
        &LegalHolds::none(),
        T0 + DAY,
    );
    assert_eq!(report.count("clinical", "delete_erased"), 1);
    assert!(ids(&store).is_empty());
}
