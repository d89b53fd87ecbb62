//! Issue 21 through the sequencer: NEWS2 per patient (validity expiry, several devices
//! of one patient, SpO2 scale 2 by cohort), the alerts of the live version at 5 and 7,
//! a shadow version that stores rows and never an `alerts` row, and kill-safety (the
//! scores and the patient state are in the commit of the reading). Every time is
//! explicit.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value as Json;
use vitalmq_envelope::{Algorithm, Number, SigningKey};
use vitalmq_policies::{DeviceEntry, ScoreTable, SiteId, TrustDomain};

use super::*;
use crate::score::{ScoreModel, Scoring};
use crate::store::Store;

const T0: u64 = 1_718_260_200_000;
const MIN: u64 = 60_000;
const NEWS2: &str = include_str!("../../../policies/examples/news2.toml");
const RULES: &str = r#"
format = "vitalmq-rules/v1"
version = "t1"
[quality]
low_below = 0.5
max_low_fraction = 0.5
over_n = 20

[cohorts]
copd = ["dev-00003"]
"#;

struct F {
    registry: DeviceRegistry,
    keys: HashMap<String, SigningKey>,
    origin: Origin,
}

/// dev-00001 and dev-00002 serve patient pt-a; dev-00003 (cohort copd) serves pt-b.
fn fixture() -> F {
    let mut registry = DeviceRegistry::new(TrustDomain::new("test.vitalmq").expect("td"));
    let mut keys = HashMap::new();
    for (id, patient) in [
        ("dev-00001", "pt-a"),
        ("dev-00002", "pt-a"),
        ("dev-00003", "pt-b"),
    ] {
        let key = SigningKey::generate(Algorithm::EdDsa).expect("key");
        registry
            .insert_device(DeviceEntry {
                id: DeviceId::new(id).expect("id"),
                site: SiteId::new("site-01").expect("site"),
                patient_ref: patient.into(),
                key: key.verifying_key(),
                consent: None,
                processing_policy: None,
                lot: None,
                hardware_model: None,
                region: None,
            })
            .expect("insert");
        keys.insert(id.to_owned(), key);
    }
    F {
        registry,
        keys,
        origin: Origin {
            broker: "127.0.0.1:8883".into(),
            bridge: "spiffe://test.vitalmq/bridge/bridge-01".into(),
        },
    }
}

/// The shipped chart as the live version and, with `shadow`, a candidate version
/// whose high band starts at 6 instead of 7.
fn scoring(shadow: bool) -> Arc<Scoring> {
    let live = ScoreTable::parse(NEWS2, std::path::Path::new("news2.toml")).expect("chart");
    let mut models = vec![ScoreModel {
        table: Arc::new(live),
        path: "news2.toml".into(),
    }];
    if shadow {
        let text = NEWS2
            .replace("version = \"rcp-2017.1\"", "version = \"cand-2\"")
            .replace(
                "{ min = 5, max = 6, risk = \"medium\" },\n  { min = 7, risk = \"high\" },",
                "{ min = 5, max = 5, risk = \"medium\" },\n  { min = 6, risk = \"high\" },",
            );
        let t = ScoreTable::parse(&text, std::path::Path::new("cand.toml")).expect("cand");
        assert_eq!(t.risk_min(vitalmq_policies::Risk::High), Some(6));
        models.push(ScoreModel {
            table: Arc::new(t),
            path: "cand.toml".into(),
        });
    }
    Arc::new(Scoring {
        models,
        spo2_scale2_cohorts: ["copd".to_owned()].into(),
        registry: None,
    })
}

fn sequencer(shadow: bool) -> Sequencer {
    let rules = Arc::new(RuleSet::parse(RULES, std::path::Path::new("r.toml")).expect("rules"));
    Sequencer::new(
        WindowSize::default(),
        HashMap::new(),
        HashMap::new(),
        HashMap::new(),
        Some(rules),
    )
    .with_scoring(Some(scoring(shadow)), HashMap::new())
}

fn vitals(f: &F, dev: &str, seq: u64, m: &[(&str, f64)], at_ms: u64) -> Incoming<u32> {
    let t = Telemetry {
        dev: DeviceId::new(dev).expect("id"),
        epoch: 1,
        seq,
        ts: at_ms,
        fw: "5.12.1".into(),
        kind: MessageType::Vitals,
        m: Some(
            m.iter()
                .map(|(k, v)| ((*k).to_owned(), Number::Float(*v)))
                .collect::<BTreeMap<_, _>>(),
        ),
        q: None,
        model: None,
        schema: None,
        extra: BTreeMap::new(),
    };
    Incoming {
        topic: format!("devices/{dev}/telemetry"),
        payload: Bytes::from(vitalmq_envelope::sign(&t, &f.keys[dev]).expect("sign")),
        received_at_ms: at_ms,
        token: 0,
    }
}

/// All normal on scale 1 and on air.
const NORMAL: [(&str, f64); 7] = [
    ("resp", 16.0),
    ("spo2", 98.0),
    ("o2", 0.0),
    ("sbp", 120.0),
    ("pulse", 70.0),
    ("acvpu", 0.0),
    ("temp", 37.0),
];

fn with(changes: &[(&'static str, f64)]) -> Vec<(&'static str, f64)> {
    NORMAL
        .iter()
        .map(|(k, v)| {
            changes
                .iter()
                .find(|(c, _)| c == k)
                .map_or((*k, *v), |c| *c)
        })
        .collect()
}

/// Sequences one message and adopts it (as after a durable commit).
fn feed(s: &mut Sequencer, f: &F, msg: Incoming<u32>, now_ms: u64) -> Sequenced<u32> {
    let checked = verify(&f.registry, msg);
    let mut out = s.sequence(&f.registry, &f.origin, vec![checked], now_ms);
    s.adopt(&mut out);
    out
}

fn payload(row: &crate::score::NewScore) -> Json {
    serde_json::from_str(&row.payload).expect("payload json")
}

fn body(a: &NewAlert) -> Json {
    serde_json::from_str(&a.body).expect("alert json")
}

#[test]
fn a_reading_past_its_validity_window_is_missing_not_normal() {
    let f = fixture();
    let mut s = sequencer(false);
    let out = feed(&mut s, &f, vitals(&f, "dev-00001", 1, &NORMAL, T0), T0);
    assert_eq!(out.commit.scores.len(), 1);
    let p = payload(&out.commit.scores[0]);
    assert_eq!(p["complete"], true);
    assert_eq!(p["assessment"], "exact");
    assert_eq!(
        (p["aggregate"].as_u64(), p["risk"].as_str()),
        (Some(0), Some("low"))
    );
    assert_eq!(p["inputs"].as_array().map(Vec::len), Some(7));
    assert_eq!(p["role"], "live");
    assert_eq!(p["format"], "vitalmq-score/v1");

    // 16 minutes on, a respiration rate alone: SpO2 and pulse (valid 15 min) are
    // missing; blood pressure, temperature, consciousness (1 h, 4 h) still count.
    let out = feed(
        &mut s,
        &f,
        vitals(&f, "dev-00001", 2, &[("resp", 22.0)], T0 + 16 * MIN),
        T0 + 16 * MIN,
    );
    assert_eq!(out.commit.scores.len(), 1);
    let p = payload(&out.commit.scores[0]);
    assert_eq!(p["complete"], false);
    assert_eq!(p["assessment"], "incomplete");
    assert_eq!(p["risk"], Json::Null);
    assert_eq!(p["missing"], serde_json::json!(["spo2_scale1", "pulse"]));
    assert_eq!(p["aggregate"], 2);
    assert!(p["sub_scores"].get("pulse").is_none());
    assert_eq!(out.commit.scores[0].observed_at_ms, T0 + 16 * MIN);
    // The same values again change no input: no score.
    let out = feed(
        &mut s,
        &f,
        vitals(&f, "dev-00001", 3, &[("resp", 22.0)], T0 + 16 * MIN),
        T0 + 16 * MIN,
    );
    assert!(out.commit.scores.is_empty());
}

#[test]
fn the_devices_of_one_patient_combine_into_one_score() {
    let f = fixture();
    let mut s = sequencer(false);
    let a = feed(
        &mut s,
        &f,
        vitals(&f, "dev-00001", 1, &[("spo2", 98.0), ("pulse", 70.0)], T0),
        T0,
    );
    let p = payload(&a.commit.scores[0]);
    assert_eq!(p["complete"], false);
    let first = a.commit.events[0].event_id().to_owned();
    let rest: Vec<_> = NORMAL
        .iter()
        .filter(|(k, _)| *k != "spo2" && *k != "pulse")
        .copied()
        .collect();
    let b = feed(
        &mut s,
        &f,
        vitals(&f, "dev-00002", 1, &rest, T0 + MIN),
        T0 + MIN,
    );
    let second = b.commit.events[0].event_id().to_owned();
    let row = &b.commit.scores[0];
    assert_eq!(
        (row.patient_ref.as_str(), row.device.as_str()),
        ("pt-a", "dev-00002")
    );
    let p = payload(row);
    assert_eq!(p["complete"], true, "{p}");
    let ids: Vec<&str> = p["inputs"]
        .as_array()
        .expect("inputs")
        .iter()
        .filter_map(|i| i["event_id"].as_str())
        .collect();
    assert!(ids.contains(&first.as_str()) && ids.contains(&second.as_str()));
    // The other patient is untouched.
    assert!(s.patient_score_state("pt-b").is_none());
    assert_eq!(
        b.commit
            .patient_states
            .iter()
            .map(|(p, _)| p.as_str())
            .collect::<Vec<_>>(),
        ["pt-a"]
    );
}

#[test]
fn a_copd_cohort_is_scored_on_spo2_scale_2() {
    let f = fixture();
    let mut s = sequencer(false);
    // SpO2 88 scores 0 on scale 2 (3 on scale 1).
    let out = feed(
        &mut s,
        &f,
        vitals(&f, "dev-00003", 1, &with(&[("spo2", 88.0)]), T0),
        T0,
    );
    let p = payload(&out.commit.scores[0]);
    assert_eq!(p["sub_scores"]["spo2_scale2"], 0, "{p}");
    assert_eq!(
        (p["aggregate"].as_u64(), p["complete"].as_bool()),
        (Some(0), Some(true))
    );
    let out = feed(
        &mut s,
        &f,
        vitals(&f, "dev-00001", 1, &with(&[("spo2", 88.0)]), T0),
        T0,
    );
    let p = payload(&out.commit.scores[0]);
    assert_eq!(p["sub_scores"]["spo2_scale1"], 3);
    assert_eq!(p["risk"], "low-medium");
}

#[test]
fn the_live_version_alerts_at_5_and_7_and_a_shadow_one_never_in_alerts() {
    let f = fixture();
    let mut s = sequencer(true);
    // resp 21 (2) + pulse 111 (2) + temp 38.5 (1) = 5: medium.
    let five = with(&[("resp", 21.0), ("pulse", 111.0), ("temp", 38.5)]);
    let out = feed(&mut s, &f, vitals(&f, "dev-00001", 1, &five, T0), T0);
    assert_eq!(out.commit.scores.len(), 2, "one row per version");
    let (live, shadow) = (&out.commit.scores[0], &out.commit.scores[1]);
    assert_eq!(
        (live.role.as_str(), live.version.as_str()),
        ("live", "rcp-2017.1")
    );
    assert_eq!(
        (shadow.role.as_str(), shadow.version.as_str()),
        ("shadow", "cand-2")
    );
    assert_ne!(live.config_sha256, shadow.config_sha256);
    assert_eq!(out.commit.alerts.len(), 1);
    let a = &out.commit.alerts[0];
    assert_eq!(
        (a.rule.as_deref(), a.state.as_str()),
        (Some("news2-medium"), "open")
    );
    assert_eq!(a.kind, "clinical");
    assert_eq!(a.topic, "alerts/site-01/review/dev-00001");
    let b = body(a);
    assert_eq!(b["rule_version"], "rcp-2017.1");
    assert_eq!(b["score_id"].as_str(), Some(live.score_id.as_str()));
    assert_eq!(
        (b["value"].as_u64(), b["threshold"].as_u64()),
        (Some(5), Some(5))
    );
    assert_eq!(b["evidence"].as_array().map(Vec::len), Some(7));
    assert_eq!(b["patient_ref"], "pt-a");
    // The candidate (high from 6) would have said medium too: in its row only.
    let sp = payload(shadow);
    assert_eq!(sp["alert"]["rule"], "news2-medium");
    assert_eq!(sp["alert"]["transition"], "open");
    assert!(payload(live).get("alert").is_none());
    // Acknowledgement and escalation apply: the alert is in the device's book.
    assert!(
        s.tracks[&DeviceId::new("dev-00001").expect("id")]
            .alerts
            .book
            .get(&a.alert_id)
            .is_some()
    );

    // + sbp 105 (1) = 6: the candidate's high, never an alerts row.
    let six = with(&[
        ("resp", 21.0),
        ("pulse", 111.0),
        ("temp", 38.5),
        ("sbp", 105.0),
    ]);
    let out = feed(
        &mut s,
        &f,
        vitals(&f, "dev-00001", 2, &six, T0 + MIN),
        T0 + MIN,
    );
    assert!(out.commit.alerts.is_empty(), "{:?}", out.commit.alerts);
    let sp = payload(&out.commit.scores[1]);
    assert_eq!(sp["alert"]["rule"], "news2-high");
    assert_eq!(sp["alert"]["replaces"], "news2-medium");

    // resp 25 (3) instead: 7, high for the live version: medium superseded, high open.
    let seven = with(&[
        ("resp", 25.0),
        ("pulse", 111.0),
        ("temp", 38.5),
        ("sbp", 105.0),
    ]);
    let out = feed(
        &mut s,
        &f,
        vitals(&f, "dev-00001", 3, &seven, T0 + 2 * MIN),
        T0 + 2 * MIN,
    );
    let got: Vec<_> = out
        .commit
        .alerts
        .iter()
        .map(|a| (a.rule.as_deref(), a.state.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (Some("news2-medium"), "resolved"),
            (Some("news2-high"), "open")
        ]
    );
    assert_eq!(body(&out.commit.alerts[0])["reason"], "superseded");
    assert_eq!(
        out.commit.alerts[1].topic,
        "alerts/site-01/urgent/dev-00001"
    );
    assert!(
        out.commit
            .alerts
            .iter()
            .all(|a| body(a)["rule_version"] == "rcp-2017.1")
    );

    // Back to normal, complete: high resolves (recovered) in both.
    let out = feed(
        &mut s,
        &f,
        vitals(&f, "dev-00001", 4, &NORMAL, T0 + 3 * MIN),
        T0 + 3 * MIN,
    );
    let got: Vec<_> = out
        .commit
        .alerts
        .iter()
        .map(|a| (a.rule.as_deref(), a.state.as_str()))
        .collect();
    assert_eq!(got, [(Some("news2-high"), "resolved")]);
    assert_eq!(body(&out.commit.alerts[0])["reason"], "recovered");
    assert_eq!(
        payload(&out.commit.scores[1])["alert"]["transition"],
        "resolved"
    );
}

#[test]
fn a_partial_score_raises_what_it_proves_and_missing_never_resolves() {
    let f = fixture();
    let mut s = sequencer(false);
    // Pulse 131 alone: a single red parameter proves news2-medium (low-medium).
    let out = feed(
        &mut s,
        &f,
        vitals(&f, "dev-00001", 1, &[("pulse", 131.0)], T0),
        T0,
    );
    assert_eq!(out.commit.alerts.len(), 1);
    let b = body(&out.commit.alerts[0]);
    assert_eq!(b["rule"], "news2-medium");
    assert_eq!(b["score"]["assessment"], "at_least");
    assert_eq!(b["score"]["complete"], false);
    assert_eq!(b["score"]["red"], serde_json::json!(["pulse"]));
    assert_eq!(b["threshold"], 3);
    // 20 minutes later the pulse expired and a normal temperature arrives: nothing is
    // proven, but missing readings are no recovery: the alert stays open.
    let out = feed(
        &mut s,
        &f,
        vitals(&f, "dev-00001", 2, &[("temp", 37.0)], T0 + 20 * MIN),
        T0 + 20 * MIN,
    );
    assert_eq!(payload(&out.commit.scores[0])["assessment"], "incomplete");
    assert!(out.commit.alerts.is_empty());
}

#[test]
fn scores_and_patient_state_are_in_the_commit_of_the_reading() {
    let f = fixture();
    let dir = tempfile::tempdir().expect("dir");
    let five = with(&[("resp", 21.0), ("pulse", 111.0), ("temp", 38.5)]);
    {
        let mut store = Store::open(dir.path()).expect("open");
        let s = sequencer(true);
        let checked = verify(&f.registry, vitals(&f, "dev-00001", 1, &five, T0));
        let out = s.sequence(&f.registry, &f.origin, vec![checked], T0);
        store.commit(&out.commit).expect("commit");
        // Killed here: committed, never adopted.
    }
    let store = Store::open(dir.path()).expect("reopen");
    let rows = store.scores(0, None, 10).expect("scores");
    assert_eq!(
        rows.iter().map(|r| r.role.as_str()).collect::<Vec<_>>(),
        ["live", "shadow"]
    );
    assert_eq!(store.scores(0, Some("pt-b"), 10).expect("scores").len(), 0);
    let states = store.load_patient_score_states().expect("states");
    let state: PatientScoreState = serde_json::from_str(&states["pt-a"]).expect("state");
    assert_eq!(state.episodes["rcp-2017.1"].rule, "news2-medium");
    let alert_states: HashMap<DeviceId, crate::alerts::DeviceAlertState> = store
        .load_alert_states()
        .expect("alert states")
        .into_iter()
        .map(|(d, j)| (d, serde_json::from_str(&j).expect("state")))
        .collect();
    // Restarted from the store: the resent reading is a duplicate (no second score,
    // no second alert), and a new reading continues the same episode.
    let rules = Arc::new(RuleSet::parse(RULES, std::path::Path::new("r.toml")).expect("rules"));
    let patients = HashMap::from([("pt-a".to_owned(), state)]);
    let mut s = Sequencer::new(
        WindowSize::default(),
        store.load_sequences(WindowSize::default()).expect("seq"),
        HashMap::new(),
        alert_states,
        Some(rules),
    )
    .with_scoring(Some(scoring(true)), patients);
    let again = feed(&mut s, &f, vitals(&f, "dev-00001", 1, &five, T0), T0 + 1);
    assert!(again.commit.scores.is_empty() && again.commit.alerts.is_empty());
    let next = feed(
        &mut s,
        &f,
        vitals(
            &f,
            "dev-00001",
            2,
            &with(&[("resp", 22.0), ("pulse", 111.0), ("temp", 38.5)]),
            T0 + MIN,
        ),
        T0 + MIN,
    );
    assert_eq!(next.commit.scores.len(), 2);
    assert!(
        next.commit.alerts.is_empty(),
        "still medium: no second open"
    );
}

/// The candidate as a canary for cohort copd (dev-00003, patient pt-b): live there,
/// the old live version shadow; elsewhere the candidate does not run.
fn canary_registry() -> Arc<vitalmq_policies::ModelRegistry> {
    let cand = &scoring(true).models[1].table;
    let text = include_str!("../../../policies/examples/models.toml")
        .replace(
            "[[rollout]]\nmodel = \"news2\"\nlive = \"rcp-2017.1\"",
            &format!(
                "[[models]]\nname = \"news2\"\nversion = \"cand-2\"\nkind = \"score\"\n\
                 artifact_sha256 = \"{}\"\nlineage = \"test\"\nfeature_pipeline = \"vitals-latest/1\"\n\
                 intended_use = \"test\"\nstatus = \"approved\"\napproved_by = \"board\"\n\
                 approved_at = \"2025-06-01T09:00:00Z\"\n\n\
                 [[rollout]]\nmodel = \"news2\"\nlive = \"rcp-2017.1\"\n\
                 canary = [{{ version = \"cand-2\", cohorts = [\"copd\"] }}]",
                cand.sha256()
            ),
        );
    Arc::new(
        vitalmq_policies::ModelRegistry::parse(&text, std::path::Path::new("models.toml"))
            .expect("models"),
    )
}

#[test]
fn a_canary_cohort_gets_the_candidates_alerts_and_every_output_names_its_version() {
    let f = fixture();
    let rules = Arc::new(RuleSet::parse(RULES, std::path::Path::new("r.toml")).expect("rules"));
    let mut with_registry = (*scoring(true)).clone();
    with_registry.registry = Some(canary_registry());
    let mut s = Sequencer::new(
        WindowSize::default(),
        HashMap::new(),
        HashMap::new(),
        HashMap::new(),
        Some(rules),
    )
    .with_scoring(Some(Arc::new(with_registry)), HashMap::new());
    // Aggregate 6 on scale 2 (resp 21: 2, pulse 111: 2, temp 38.5: 1, sbp 105: 1).
    let six = with(&[
        ("resp", 21.0),
        ("pulse", 111.0),
        ("temp", 38.5),
        ("sbp", 105.0),
        ("spo2", 90.0),
    ]);
    let out = feed(&mut s, &f, vitals(&f, "dev-00003", 1, &six, T0), T0);
    let roles: Vec<_> = out
        .commit
        .scores
        .iter()
        .map(|r| (r.version.as_str(), r.role.as_str()))
        .collect();
    assert_eq!(roles, [("rcp-2017.1", "shadow"), ("cand-2", "canary")]);
    let got: Vec<_> = out
        .commit
        .alerts
        .iter()
        .map(|a| (a.rule.as_deref(), body(a)["rule_version"].clone()))
        .collect();
    assert_eq!(got, [(Some("news2-high"), Json::from("cand-2"))]);
    assert_eq!(body(&out.commit.alerts[0])["role"], "canary");
    assert_eq!(
        payload(&out.commit.scores[0])["alert"]["rule"],
        "news2-medium"
    );

    // Outside the cohort (scale 1, SpO2 98): the live version alone, live.
    let six = with(&[
        ("resp", 21.0),
        ("pulse", 111.0),
        ("temp", 38.5),
        ("sbp", 105.0),
    ]);
    let out = feed(&mut s, &f, vitals(&f, "dev-00001", 1, &six, T0), T0);
    let roles: Vec<_> = out
        .commit
        .scores
        .iter()
        .map(|r| (r.version.as_str(), r.role.as_str()))
        .collect();
    assert_eq!(roles, [("rcp-2017.1", "live")]);
    assert_eq!(body(&out.commit.alerts[0])["rule"], "news2-medium");
}

/// The shipped registry with cand-2 approved and `rollout` as the news2 rollout.
fn registry_with(rollout: &str) -> Arc<vitalmq_policies::ModelRegistry> {
    let cand = &scoring(true).models[1].table;
    let text = include_str!("../../../policies/examples/models.toml").replace(
        "[[rollout]]\nmodel = \"news2\"\nlive = \"rcp-2017.1\"",
        &format!(
            "[[models]]\nname = \"news2\"\nversion = \"cand-2\"\nkind = \"score\"\n\
             artifact_sha256 = \"{}\"\nlineage = \"test\"\nfeature_pipeline = \"vitals-latest/1\"\n\
             intended_use = \"test\"\nstatus = \"approved\"\napproved_by = \"board\"\n\
             approved_at = \"2025-06-01T09:00:00Z\"\n\n\
             [[rollout]]\nmodel = \"news2\"\nlive = \"rcp-2017.1\"\n{rollout}",
            cand.sha256()
        ),
    );
    Arc::new(
        vitalmq_policies::ModelRegistry::parse(&text, std::path::Path::new("models.toml"))
            .expect("models"),
    )
}

/// A models reload changes the roles under traffic: the version that stops delivering
/// has its open alert resolved (`rollout_changed`, `model_rollback` for a canary) at the
/// patient's next score; the one that starts delivering opens its own alert from no
/// episode (its shadow would-be episode is never resolved as if delivered).
#[test]
fn a_canary_and_its_rollback_hand_over_open_alerts() {
    let f = fixture();
    let mut s = sequencer(true);
    let shadow = registry_with("shadow = [\"cand-2\"]");
    s.set_models(Some(Arc::clone(&shadow)), T0);
    let six = |pulse: f64| {
        with(&[
            ("resp", 21.0),
            ("pulse", pulse),
            ("temp", 38.5),
            ("sbp", 105.0),
        ])
    };
    let out = feed(&mut s, &f, vitals(&f, "dev-00001", 1, &six(111.0), T0), T0);
    let opened = &out.commit.alerts[0];
    assert_eq!(
        (opened.rule.as_deref(), body(opened)["rule_version"].clone()),
        (Some("news2-medium"), Json::from("rcp-2017.1"))
    );
    assert_eq!(
        payload(&out.commit.scores[1])["alert"]["rule"],
        "news2-high"
    );

    // Canary on the site: the live alert resolves, the candidate opens its own.
    s.set_models(
        Some(registry_with(
            "canary = [{ version = \"cand-2\", sites = [\"site-01\"] }]",
        )),
        T0 + MIN,
    );
    let out = feed(
        &mut s,
        &f,
        vitals(&f, "dev-00001", 2, &six(112.0), T0 + MIN),
        T0 + MIN,
    );
    let got: Vec<_> = out
        .commit
        .alerts
        .iter()
        .map(|a| {
            let b = body(a);
            (
                a.rule.clone(),
                a.state.clone(),
                b["rule_version"].clone(),
                b["role"].clone(),
                b["reason"].clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                Some("news2-medium".into()),
                "resolved".into(),
                Json::from("rcp-2017.1"),
                Json::from("live"),
                Json::from("rollout_changed")
            ),
            (
                Some("news2-high".into()),
                "open".into(),
                Json::from("cand-2"),
                Json::from("canary"),
                Json::Null
            ),
        ]
    );
    assert_eq!(out.commit.alerts[0].alert_id, opened.alert_id);
    let canary_id = out.commit.alerts[1].alert_id.clone();
    // The old live version, now shadow, starts its would-be episode afresh.
    assert_eq!(payload(&out.commit.scores[0])["role"], "shadow");
    assert_eq!(
        payload(&out.commit.scores[0])["alert"]["transition"],
        "open"
    );

    // Rollback under traffic: the canary's alert resolves, live delivers again.
    s.set_models(Some(shadow), T0 + 2 * MIN);
    let out = feed(
        &mut s,
        &f,
        vitals(&f, "dev-00001", 3, &six(113.0), T0 + 2 * MIN),
        T0 + 2 * MIN,
    );
    let got: Vec<_> = out
        .commit
        .alerts
        .iter()
        .map(|a| {
            let b = body(a);
            (a.alert_id.clone(), a.state.clone(), b["reason"].clone())
        })
        .collect();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(
        got[0],
        (
            canary_id,
            "resolved".to_owned(),
            Json::from("model_rollback")
        )
    );
    assert_eq!(
        (
            got[1].1.as_str(),
            body(&out.commit.alerts[1])["rule_version"].clone()
        ),
        ("open", Json::from("rcp-2017.1"))
    );
    assert_ne!(got[1].0, opened.alert_id, "a new episode, not the old id");
}

/// Recording paused (disk full, `max_backlog`): the alert part of the batch is written
/// alone and its `news2-*` alert delivered. The score that alert names is written with
/// it: the resend of the reading is not scored again (its evaluation was adopted with
/// the alert state), so a score left out then would never exist.
#[test]
fn the_alerts_only_commit_writes_the_score_its_alert_names() {
    let f = fixture();
    let dir = tempfile::tempdir().expect("dir");
    let mut store = Store::open(dir.path()).expect("open");
    let mut s = sequencer(false);
    let high = with(&[("resp", 25.0), ("pulse", 131.0), ("temp", 39.5)]);
    let checked = verify(&f.registry, vitals(&f, "dev-00001", 1, &high, T0));
    let mut out = s.sequence(&f.registry, &f.origin, vec![checked], T0);
    let named = body(&out.commit.alerts[0])["score_id"]
        .as_str()
        .expect("score_id")
        .to_owned();
    // The whole commit is refused; the recorder writes the alert part alone.
    let alert_part = out.commit.take_alert_part();
    store.commit_alerts_only(&alert_part).expect("alerts only");
    s.adopt_unrecorded(&mut out);
    let rows = store.scores(0, None, 10).expect("scores");
    assert_eq!(
        rows.iter().map(|r| r.score_id.as_str()).collect::<Vec<_>>(),
        [named.as_str()],
        "the score the delivered alert names is stored"
    );
    assert!(
        store
            .load_patient_score_states()
            .expect("states")
            .contains_key("pt-a"),
        "the episode's state goes with its alert"
    );
    // The device resends; the whole batch is recorded now: no second score row.
    let resent = verify(&f.registry, vitals(&f, "dev-00001", 1, &high, T0));
    let mut again = s.sequence(&f.registry, &f.origin, vec![resent], T0 + 1);
    assert!(again.commit.scores.is_empty() && again.commit.alerts.is_empty());
    assert_eq!(
        again.commit.events.len(),
        1,
        "the reading itself is recorded"
    );
    store.commit(&again.commit).expect("commit");
    s.adopt(&mut again);
    assert_eq!(store.scores(0, None, 10).expect("scores").len(), 1);
}

/// A patient the store found erased while committing is forgotten on adoption: no
/// pre-erasure reading stays in memory to be scored or written again.
#[test]
fn an_erased_patients_scoring_state_is_dropped_from_memory() {
    let f = fixture();
    let mut s = sequencer(false);
    feed(&mut s, &f, vitals(&f, "dev-00001", 1, &NORMAL, T0), T0);
    assert!(s.patient_score_state("pt-a").is_some());
    let checked = verify(&f.registry, vitals(&f, "dev-00001", 2, &NORMAL, T0 + MIN));
    let mut out = s.sequence(&f.registry, &f.origin, vec![checked], T0 + MIN);
    out.forget_patients(&["pt-a".to_owned()]);
    s.adopt(&mut out);
    assert!(s.patient_score_state("pt-a").is_none());
}

/// A reading attributed to no patient (an empty `patient_ref`) is not scored and
/// leaves no scoring state keyed "".
#[test]
fn a_reading_without_a_patient_leaves_no_scoring_state() {
    let mut f = fixture();
    let key = SigningKey::generate(Algorithm::EdDsa).expect("key");
    f.registry
        .insert_device(DeviceEntry {
            id: DeviceId::new("dev-00009").expect("id"),
            site: SiteId::new("site-01").expect("site"),
            patient_ref: String::new(),
            key: key.verifying_key(),
            consent: None,
            processing_policy: None,
            lot: None,
            hardware_model: None,
            region: None,
        })
        .expect("insert");
    f.keys.insert("dev-00009".into(), key);
    let mut s = sequencer(false);
    let out = feed(&mut s, &f, vitals(&f, "dev-00009", 1, &NORMAL, T0), T0);
    assert!(out.commit.scores.is_empty());
    assert!(
        out.commit.patient_states.is_empty(),
        "{:?}",
        out.commit.patient_states
    );
    assert!(s.patient_score_state("").is_none());
}

/// A device whose clock is ahead (within the accepted skew) does not become the
/// patient's clock: its reading counts as observed now, another device's real-time
/// reading a moment later is newer and taken, and the score is never dated in the
/// future.
#[test]
fn a_device_clock_ahead_does_not_set_the_patients_clock() {
    let f = fixture();
    let mut s = sequencer(false);
    let mut ahead = vitals(&f, "dev-00001", 1, &NORMAL, T0 + 4 * MIN);
    ahead.received_at_ms = T0;
    let first = feed(&mut s, &f, ahead, T0);
    assert_eq!(first.commit.scores.len(), 1);
    assert_eq!(
        first.commit.scores[0].observed_at_ms, T0,
        "not in the future"
    );
    let later = T0 + 10_000;
    let out = feed(
        &mut s,
        &f,
        vitals(&f, "dev-00002", 1, &[("pulse", 131.0)], later),
        later,
    );
    assert_eq!(out.commit.scores.len(), 1, "the real-time reading is taken");
    let p = payload(&out.commit.scores[0]);
    assert_eq!(p["sub_scores"]["pulse"], 3);
    assert_eq!(out.commit.scores[0].observed_at_ms, later);
    assert_eq!(p["missing"].as_array().map(Vec::len), Some(0));
}

/// A patient whose devices stopped (discharged, unassigned, switched off): once every
/// input of the version expired, the tick resolves its open score alert with reason
/// `no_data`, never `recovered`; before, a partial expiry changes nothing.
#[test]
fn an_open_score_alert_resolves_no_data_once_every_input_expired() {
    let f = fixture();
    let mut s = sequencer(false);
    let high = with(&[("resp", 25.0), ("pulse", 131.0), ("temp", 39.5)]);
    let out = feed(&mut s, &f, vitals(&f, "dev-00001", 1, &high, T0), T0);
    assert_eq!(out.commit.alerts[0].rule.as_deref(), Some("news2-high"));
    let alert_id = out.commit.alerts[0].alert_id.clone();
    let tick = |s: &mut Sequencer, at: u64| {
        let mut o = s.control(&f.registry, Control::Tick { now_ms: at }, at);
        s.adopt(&mut o);
        o
    };
    let news2 = |o: &Sequenced<()>| -> Vec<NewAlert> {
        o.commit
            .alerts
            .iter()
            .filter(|a| a.alert_id == alert_id && a.state == "resolved")
            .cloned()
            .collect()
    };
    // Some inputs (15 min, 1 h) expired, others (4 h) not: still open.
    let partial = tick(&mut s, T0 + 2 * 60 * MIN);
    assert!(news2(&partial).is_empty());
    assert!(
        s.patient_score_state("pt-a")
            .expect("state")
            .episodes
            .contains_key("rcp-2017.1")
    );
    let all = tick(&mut s, T0 + 4 * 60 * MIN + 1);
    let resolved = news2(&all);
    assert_eq!(resolved.len(), 1, "{:?}", all.commit.alerts);
    let b = body(&resolved[0]);
    assert_eq!(b["reason"], "no_data");
    assert_eq!(b["rule"], "news2-high");
    assert!(b["score_id"].is_null());
    assert!(
        !all.commit.patient_states.is_empty(),
        "the state is committed"
    );
    assert!(
        s.patient_score_state("pt-a")
            .expect("state")
            .episodes
            .is_empty()
    );
    // Out of the device's book: no re-escalation, and no second resolution.
    let dev = DeviceId::new("dev-00001").expect("id");
    assert!(
        s.tracks[&dev]
            .alerts
            .book
            .entries()
            .all(|(id, _)| *id != alert_id)
    );
    assert!(news2(&tick(&mut s, T0 + 5 * 60 * MIN)).is_empty());
}

/// The documented rounding convention (docs/models.md): a value is charted at its
/// parameter's decimals, half away from zero, then banded: SpO2 91.5 is 92 (2 points),
/// 91.4 is 91 (3 points, red); temperature 38.05 is 38.1 (1 point).
#[test]
fn values_are_banded_as_charted_rounded_to_the_tables_decimals() {
    let f = fixture();
    let mut s = sequencer(false);
    let cases = [
        ("spo2", 91.5, 2),
        ("spo2", 91.4, 3),
        ("temp", 38.05, 1),
        ("temp", 38.04, 0),
    ];
    for (seq, (metric, value, points)) in (1..).zip(cases) {
        let at = T0 + seq * MIN;
        let out = feed(
            &mut s,
            &f,
            vitals(&f, "dev-00001", seq, &with(&[(metric, value)]), at),
            at,
        );
        let p = payload(&out.commit.scores[0]);
        let sub = p["sub_scores"]
            .as_object()
            .expect("sub_scores")
            .iter()
            .find(|(k, _)| k.starts_with(if metric == "temp" { "temp" } else { "spo2" }))
            .map(|(_, v)| v.clone());
        assert_eq!(sub, Some(Json::from(points)), "{metric} {value}: {p}");
    }
}

/// One patient, an oximeter in cohort copd (dev-00002) and a cuff outside it
/// (dev-00001): the patient's cohorts are the union over its devices, so the canary's
/// role and SpO2 scale 2 hold whichever device sent the reading; alternating readings
/// that leave the score as it is change no alert.
#[test]
fn a_patients_devices_in_different_cohorts_make_one_role_and_one_scale() {
    let f = fixture();
    let rules = RULES.replace("copd = [\"dev-00003\"]", "copd = [\"dev-00002\"]");
    let rules = Arc::new(RuleSet::parse(&rules, std::path::Path::new("r.toml")).expect("rules"));
    let mut with_registry = (*scoring(true)).clone();
    with_registry.registry = Some(canary_registry());
    let mut s = Sequencer::new(
        WindowSize::default(),
        HashMap::new(),
        HashMap::new(),
        HashMap::new(),
        Some(rules),
    )
    .with_scoring(Some(Arc::new(with_registry)), HashMap::new());
    // Aggregate 6 on scale 2 (SpO2 90 scores 0 there, 3 on scale 1).
    let oximeter = |pulse: f64| {
        with(&[
            ("resp", 21.0),
            ("pulse", pulse),
            ("temp", 38.5),
            ("sbp", 105.0),
            ("spo2", 90.0),
        ])
    };
    let out = feed(
        &mut s,
        &f,
        vitals(&f, "dev-00002", 1, &oximeter(111.0), T0),
        T0,
    );
    let opened: Vec<_> = out
        .commit
        .alerts
        .iter()
        .map(|a| (a.state.clone(), body(a)["rule_version"].clone()))
        .collect();
    assert_eq!(opened, [("open".to_owned(), Json::from("cand-2"))]);
    for i in 1..=6_u64 {
        let at = T0 + i * MIN;
        let msg = if i % 2 == 1 {
            let sbp = if i % 4 == 1 { 106.0 } else { 107.0 };
            vitals(&f, "dev-00001", i, &[("sbp", sbp)], at)
        } else {
            vitals(&f, "dev-00002", i, &oximeter(111.0 + i as f64 / 2.0), at)
        };
        let out = feed(&mut s, &f, msg, at);
        assert!(!out.commit.scores.is_empty(), "reading {i} was scored");
        let changes: Vec<_> = out
            .commit
            .alerts
            .iter()
            .map(|a| (a.state.clone(), body(a)["reason"].clone()))
            .collect();
        assert!(
            changes.is_empty(),
            "reading {i} changed alerts: {changes:?}"
        );
        let roles: Vec<_> = out.commit.scores.iter().map(|r| r.role.clone()).collect();
        assert_eq!(roles, ["shadow", "canary"], "reading {i}");
        let p = payload(&out.commit.scores[1]);
        assert_eq!(p["aggregate"], 6, "reading {i}: scale 2 for the patient");
    }
}

/// A rollback under a stable patient (no further reading): the next tick hands the
/// episodes over, so the canary's alert resolves (`model_rollback`) and the live
/// version opens what the current score proves, each named by a stored score; no
/// second tick repeats it.
#[test]
fn a_rollback_hands_over_a_stable_patients_alerts_at_the_next_tick() {
    let f = fixture();
    let mut s = sequencer(true);
    s.set_models(
        Some(registry_with(
            "canary = [{ version = \"cand-2\", sites = [\"site-01\"] }]",
        )),
        T0,
    );
    let six = with(&[
        ("resp", 21.0),
        ("pulse", 111.0),
        ("temp", 38.5),
        ("sbp", 105.0),
    ]);
    let out = feed(&mut s, &f, vitals(&f, "dev-00001", 1, &six, T0), T0);
    let canary: Vec<_> = out
        .commit
        .alerts
        .iter()
        .map(|a| (a.alert_id.clone(), body(a)["role"].clone()))
        .collect();
    assert_eq!(canary.len(), 1, "{canary:?}");
    assert_eq!(canary[0].1, "canary");
    let tick = |s: &mut Sequencer, at: u64| {
        let mut o = s.control(&f.registry, Control::Tick { now_ms: at }, at);
        s.adopt(&mut o);
        o
    };
    assert!(tick(&mut s, T0 + MIN).commit.alerts.is_empty());

    // Rollback; the patient sends nothing more.
    s.set_models(Some(registry_with("shadow = [\"cand-2\"]")), T0 + 2 * MIN);
    let out = tick(&mut s, T0 + 2 * MIN);
    let got: Vec<_> = out
        .commit
        .alerts
        .iter()
        .map(|a| {
            let b = body(a);
            (
                a.state.clone(),
                b["rule_version"].clone(),
                b["role"].clone(),
                b["reason"].clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                "resolved".to_owned(),
                Json::from("cand-2"),
                Json::from("canary"),
                Json::from("model_rollback")
            ),
            (
                "open".to_owned(),
                Json::from("rcp-2017.1"),
                Json::from("live"),
                Json::Null
            ),
        ]
    );
    assert_eq!(out.commit.alerts[0].alert_id, canary[0].0);
    let opened = body(&out.commit.alerts[1]);
    assert_eq!(opened["rule"], "news2-medium");
    assert!(
        out.commit
            .scores
            .iter()
            .any(|r| opened["score_id"] == r.score_id.as_str() && r.role == "live"),
        "the opened alert names a stored score"
    );
    assert!(
        !out.commit.patient_states.is_empty(),
        "the state is committed"
    );
    let again = tick(&mut s, T0 + 3 * MIN);
    assert!(again.commit.alerts.is_empty() && again.commit.scores.is_empty());
}

/// A patient whose device moves out of the canary's site while the canary stays: the
/// canary's score alert resolves as `rollout_changed` (nothing was rolled back).
#[test]
fn a_patient_leaving_a_canary_site_is_not_a_rollback() {
    let f = fixture();
    let mut s = sequencer(true);
    s.set_models(
        Some(registry_with(
            "canary = [{ version = \"cand-2\", sites = [\"site-01\"] }]",
        )),
        T0,
    );
    let six = with(&[
        ("resp", 21.0),
        ("pulse", 111.0),
        ("temp", 38.5),
        ("sbp", 105.0),
    ]);
    let out = feed(&mut s, &f, vitals(&f, "dev-00001", 1, &six, T0), T0);
    assert_eq!(out.commit.alerts.len(), 1);
    assert_eq!(body(&out.commit.alerts[0])["role"], "canary");
    let canary_id = out.commit.alerts[0].alert_id.clone();

    // The same device (same key), now registered on site-02.
    let mut registry = DeviceRegistry::new(TrustDomain::new("test.vitalmq").expect("td"));
    registry
        .insert_device(DeviceEntry {
            id: DeviceId::new("dev-00001").expect("id"),
            site: SiteId::new("site-02").expect("site"),
            patient_ref: "pt-a".into(),
            key: f.keys["dev-00001"].verifying_key(),
            consent: None,
            processing_policy: None,
            lot: None,
            hardware_model: None,
            region: None,
        })
        .expect("insert");
    let moved = F { registry, ..f };
    let out = feed(
        &mut s,
        &moved,
        vitals(
            &moved,
            "dev-00001",
            2,
            &with(&[
                ("resp", 21.0),
                ("pulse", 112.0),
                ("temp", 38.5),
                ("sbp", 105.0),
            ]),
            T0 + MIN,
        ),
        T0 + MIN,
    );
    let resolved = out
        .commit
        .alerts
        .iter()
        .find(|a| a.alert_id == canary_id)
        .expect("the canary's alert is resolved");
    assert_eq!(resolved.state, "resolved");
    assert_eq!(body(resolved)["reason"], "rollout_changed");
}
