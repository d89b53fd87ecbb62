//! Candidate rule sets through the sequencer (issue 21, part 4): shadow changes are
//! stored as shadow alerts and never reach `commit.alerts` nor the book; the
//! delivering version follows the rollout per device (site and cohort canaries); a
//! reload of the models file hands over at the device's next sample.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value as Json;
use vitalmq_envelope::{Algorithm, Number, SigningKey};
use vitalmq_policies::{DeviceEntry, ModelRegistry, SiteId, TrustDomain};

use super::*;

const T0: u64 = 1_718_260_200_000;

/// The base: SpO2 below 90 opens at once. Device 2 is in the cohort `copd`.
const BASE: &str = r#"
format = "vitalmq-rules/v1"
version = "b1"

[quality]
low_below = 0.5
max_low_fraction = 0.5
over_n = 20

[cohorts]
copd = ["dev-00002"]

[[rules]]
id = "spo2-low"
version = "1"
metric = "spo2"
severity = "review"
kind = "threshold"
below = 90
resolve_at = 92
"#;

fn candidate_text() -> String {
    BASE.replace("version = \"b1\"", "version = \"c1\"")
        .replace("below = 90\nresolve_at = 92", "below = 94\nresolve_at = 95")
}

fn set(text: &str) -> Arc<RuleSet> {
    Arc::new(RuleSet::parse(text, std::path::Path::new("rules.toml")).expect("rules"))
}

fn entry(version: &str, sha256: &str) -> String {
    format!(
        "[[models]]\nname = \"rules\"\nversion = \"{version}\"\nkind = \"rules\"\n\
         artifact_sha256 = \"{sha256}\"\nlineage = \"t\"\nfeature_pipeline = \"f\"\n\
         intended_use = \"t\"\nstatus = \"approved\"\napproved_by = \"board\"\n\
         approved_at = \"2025-06-01T09:00:00Z\"\n\n"
    )
}

/// A models file with both rule sets registered and `rollout` for them.
fn models(rollout: &str) -> Arc<ModelRegistry> {
    let text = format!(
        "format = \"vitalmq-models/v1\"\n\n{}{}[[rollout]]\nmodel = \"rules\"\nlive = \"b1\"\n{rollout}\n",
        entry("b1", set(BASE).sha256()),
        entry("c1", set(&candidate_text()).sha256()),
    );
    Arc::new(ModelRegistry::parse(&text, std::path::Path::new("models.toml")).expect("models"))
}

const SHADOW: &str = "shadow = [\"c1\"]";
const CANARY_SITE_02: &str = "canary = [{ version = \"c1\", sites = [\"site-02\"] }]";
const CANARY_COPD: &str = "canary = [{ version = \"c1\", cohorts = [\"copd\"] }]";

struct F {
    registry: DeviceRegistry,
    keys: HashMap<String, SigningKey>,
    origin: Origin,
}

fn fixture() -> F {
    let mut registry = DeviceRegistry::new(TrustDomain::new("test.vitalmq").expect("td"));
    let mut keys = HashMap::new();
    for (id, site) in [
        ("dev-00001", "site-01"),
        ("dev-00002", "site-01"),
        ("dev-00003", "site-02"),
    ] {
        let key = SigningKey::generate(Algorithm::EdDsa).expect("key");
        registry
            .insert_device(DeviceEntry {
                id: DeviceId::new(id).expect("id"),
                site: SiteId::new(site).expect("site"),
                patient_ref: format!("pt-{id}"),
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

fn sequencer(rollout: &str) -> Sequencer {
    let mut s = Sequencer::new(
        WindowSize::default(),
        HashMap::new(),
        HashMap::new(),
        HashMap::new(),
        Some(set(BASE)),
    )
    .with_candidates("rules".into(), vec![set(&candidate_text())]);
    let _ = s.set_models(Some(models(rollout)), T0);
    s
}

fn vitals(f: &F, dev: &str, seq: u64, spo2: f64) -> Incoming<u32> {
    let at = T0 + seq * 1000;
    let t = Telemetry {
        dev: DeviceId::new(dev).expect("id"),
        epoch: 1,
        seq,
        ts: at,
        fw: "5.12.1".into(),
        kind: MessageType::Vitals,
        m: Some(BTreeMap::from([("spo2".to_owned(), Number::Float(spo2))])),
        q: None,
        model: None,
        schema: None,
        extra: BTreeMap::new(),
    };
    Incoming {
        topic: format!("devices/{dev}/telemetry"),
        payload: Bytes::from(vitalmq_envelope::sign(&t, &f.keys[dev]).expect("sign")),
        received_at_ms: at,
        token: 0,
    }
}

fn run(f: &F, s: &mut Sequencer, batch: Vec<Incoming<u32>>) -> Sequenced<u32> {
    let now = batch.last().map_or(T0, |m| m.received_at_ms);
    let checked = batch.into_iter().map(|m| verify(&f.registry, m)).collect();
    let mut out = s.sequence(&f.registry, &f.origin, checked, now);
    s.adopt(&mut out);
    out
}

/// `(rule, state, policy_sha256, reason)` of the clinical alerts of a commit.
fn delivered(out: &Sequenced<u32>) -> Vec<(String, String, String, Option<String>)> {
    out.commit
        .alerts
        .iter()
        .filter(|a| a.kind == "clinical")
        .map(|a| {
            let b: Json = serde_json::from_str(&a.body).expect("json");
            (
                b["rule"].as_str().unwrap_or_default().to_owned(),
                a.state.clone(),
                b["policy_sha256"].as_str().unwrap_or_default().to_owned(),
                b["reason"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

fn book_len(s: &Sequencer, dev: &str) -> usize {
    s.tracks[&DeviceId::new(dev).expect("id")]
        .alerts
        .book
        .entries()
        .count()
}

#[test]
fn a_shadow_candidate_is_stored_never_delivered() {
    let f = fixture();
    let mut s = sequencer(SHADOW);
    let cand = set(&candidate_text());
    // 92: under the candidate's 94, above the base's 90.
    let out = run(&f, &mut s, vec![vitals(&f, "dev-00001", 1, 92.0)]);
    assert!(out.commit.alerts.is_empty(), "{:?}", out.commit.alerts);
    assert_eq!(book_len(&s, "dev-00001"), 0);
    let [sa] = out.commit.shadow_alerts.as_slice() else {
        panic!("one shadow change: {:?}", out.commit.shadow_alerts);
    };
    assert_eq!(
        (
            sa.rule.as_str(),
            sa.state.as_str(),
            sa.model.as_str(),
            sa.version.as_str(),
            sa.role.as_str(),
            sa.severity.as_str()
        ),
        ("spo2-low", "open", "rules", "c1", "shadow", "review")
    );
    assert_eq!(sa.config_sha256, cand.sha256());
    assert_eq!(
        (
            sa.device.as_str(),
            sa.site.as_str(),
            sa.patient_ref.as_str()
        ),
        ("dev-00001", "site-01", "pt-dev-00001")
    );
    let body: Json = serde_json::from_str(&sa.payload).expect("json");
    assert_eq!(body["policy_sha256"], cand.sha256());
    assert_eq!(body["alert_id"], sa.alert_id.as_str());
    assert_eq!(
        sa.change_id,
        crate::store::shadow_change_id(
            "c1",
            &sa.alert_id,
            "open",
            body["evidence"][0].as_str().expect("evidence")
        ),
    );
    // Persisted with the device's state, and it loads back.
    let (_, json) = out
        .commit
        .alert_states
        .iter()
        .find(|(d, _)| d.as_str() == "dev-00001")
        .expect("state staged");
    let back: DeviceAlertState = serde_json::from_str(json).expect("loads");
    assert!(back.shadows.contains_key("c1"));

    // Below both: the base delivers; the candidate's episode stays a shadow one.
    let out = run(&f, &mut s, vec![vitals(&f, "dev-00001", 2, 88.0)]);
    let base = set(BASE);
    assert_eq!(
        delivered(&out),
        [(
            "spo2-low".into(),
            "open".into(),
            base.sha256().to_owned(),
            None
        )]
    );
    assert!(
        out.commit.shadow_alerts.is_empty(),
        "already open in shadow"
    );
    assert_eq!(book_len(&s, "dev-00001"), 1);
}

#[test]
fn a_site_canary_delivers_the_candidate_there_only() {
    let f = fixture();
    let mut s = sequencer(CANARY_SITE_02);
    let cand = set(&candidate_text());
    let out = run(
        &f,
        &mut s,
        vec![
            vitals(&f, "dev-00001", 1, 92.0),
            vitals(&f, "dev-00003", 1, 92.0),
        ],
    );
    assert_eq!(
        delivered(&out),
        [(
            "spo2-low".into(),
            "open".into(),
            cand.sha256().to_owned(),
            None
        )]
    );
    assert_eq!(out.commit.alerts[0].device.as_deref(), Some("dev-00003"));
    let body: Json = serde_json::from_str(&out.commit.alerts[0].body).expect("json");
    assert_eq!(body["rule_set_version"], "c1", "the canary names itself");
    assert_eq!(body["role"], "canary");
    // A live alert says so too.
    let live = run(&f, &mut s, vec![vitals(&f, "dev-00001", 2, 85.0)]);
    let body: Json = serde_json::from_str(&live.commit.alerts[0].body).expect("json");
    assert_eq!(body["rule_set_version"], "b1");
    assert_eq!(body["role"], "live");
    // The base runs as shadow on site-02 (sees nothing at 92); the candidate has no
    // role on site-01.
    assert!(out.commit.shadow_alerts.is_empty());
    let t = &s.tracks[&DeviceId::new("dev-00001").expect("id")].alerts;
    assert!(t.shadows.is_empty());
    let t = &s.tracks[&DeviceId::new("dev-00003").expect("id")].alerts;
    assert_eq!(t.shadows.keys().collect::<Vec<_>>(), ["b1"]);
}

#[test]
fn a_cohort_canary_follows_the_base_rule_sets_cohorts() {
    let f = fixture();
    let mut s = sequencer(CANARY_COPD);
    let out = run(
        &f,
        &mut s,
        vec![
            vitals(&f, "dev-00001", 1, 92.0),
            vitals(&f, "dev-00002", 1, 92.0),
        ],
    );
    let devices: Vec<_> = out
        .commit
        .alerts
        .iter()
        .map(|a| a.device.clone().unwrap_or_default())
        .collect();
    assert_eq!(devices, ["dev-00002"]);
}

/// Shadow, canary, rollback by reloading the models file, readings low throughout.
#[test]
fn canary_and_rollback_hand_over_at_the_next_sample() {
    let f = fixture();
    let mut s = sequencer(SHADOW);
    let (base, cand) = (set(BASE), set(&candidate_text()));
    let out = run(&f, &mut s, vec![vitals(&f, "dev-00003", 1, 92.0)]);
    assert!(out.commit.alerts.is_empty());
    assert_eq!(out.commit.shadow_alerts.len(), 1);
    let shadow_id = out.commit.shadow_alerts[0].alert_id.clone();

    let _ = s.set_models(Some(models(CANARY_SITE_02)), T0 + 1500);
    let out = run(&f, &mut s, vec![vitals(&f, "dev-00003", 2, 92.0)]);
    // The candidate delivers, opening anew: its shadow episode is not delivered as
    // already open (and the base had nothing open to resolve).
    assert_eq!(
        delivered(&out),
        [(
            "spo2-low".into(),
            "open".into(),
            cand.sha256().to_owned(),
            None
        )]
    );
    // Its would-be episode is closed in shadow (so a comparison sees it end).
    let [closed] = out.commit.shadow_alerts.as_slice() else {
        panic!("{:?}", out.commit.shadow_alerts);
    };
    assert_eq!(
        (
            closed.alert_id.as_str(),
            closed.state.as_str(),
            closed.version.as_str()
        ),
        (shadow_id.as_str(), "resolved", "c1")
    );
    let opened = out.commit.alerts[0].alert_id.clone();
    assert_eq!(book_len(&s, "dev-00003"), 1);

    let _ = s.set_models(Some(models(SHADOW)), T0 + 2500);
    let out = run(&f, &mut s, vec![vitals(&f, "dev-00003", 3, 92.0)]);
    assert_eq!(
        delivered(&out),
        [(
            "spo2-low".into(),
            "resolved".into(),
            cand.sha256().to_owned(),
            Some("model_rollback".into())
        )]
    );
    assert_eq!(out.commit.alerts[0].alert_id, opened);
    // The rollback's resolution is the canary's last change: it names the canary.
    let body: Json = serde_json::from_str(&out.commit.alerts[0].body).expect("json");
    assert_eq!(
        (body["rule_set_version"].as_str(), body["role"].as_str()),
        (Some("c1"), Some("canary"))
    );
    assert_eq!(book_len(&s, "dev-00003"), 0, "the book saw it resolved");
    // The candidate is a shadow again, from a state without episodes: it reopens in
    // shadow, never delivered.
    assert_eq!(out.commit.shadow_alerts.len(), 1);
    assert_eq!(out.commit.shadow_alerts[0].state, "open");
    assert_ne!(out.commit.shadow_alerts[0].alert_id, opened);
    // And the base delivers again.
    let out = run(&f, &mut s, vec![vitals(&f, "dev-00003", 4, 85.0)]);
    assert_eq!(
        delivered(&out),
        [(
            "spo2-low".into(),
            "open".into(),
            base.sha256().to_owned(),
            None
        )]
    );
}

/// Without candidates the state has no versions: nothing changes.
#[test]
fn without_candidates_nothing_changes() {
    let f = fixture();
    let mut s = Sequencer::new(
        WindowSize::default(),
        HashMap::new(),
        HashMap::new(),
        HashMap::new(),
        Some(set(BASE)),
    );
    let _ = s.set_models(Some(models(CANARY_SITE_02)), T0);
    let out = run(&f, &mut s, vec![vitals(&f, "dev-00003", 1, 88.0)]);
    assert_eq!(delivered(&out).len(), 1);
    let body: Json = serde_json::from_str(&out.commit.alerts[0].body).expect("json");
    assert!(
        body.get("rule_set_version").is_none() && body.get("role").is_none(),
        "the body is unchanged without candidates: {body}"
    );
    let t = &s.tracks[&DeviceId::new("dev-00003").expect("id")].alerts;
    assert!(t.engine_version.is_none() && t.shadows.is_empty());
}

/// A restart without the candidates after a canary: the candidate's open alert is
/// resolved at the device's next sample (under its own digest) and the base delivers.
#[test]
fn a_restart_without_candidates_hands_back_to_the_base() {
    let f = fixture();
    let mut s = sequencer(CANARY_SITE_02);
    let cand = set(&candidate_text());
    let out = run(&f, &mut s, vec![vitals(&f, "dev-00003", 1, 88.0)]);
    assert_eq!(delivered(&out)[0].2, cand.sha256());
    // The base runs in shadow for the canaried site: its would-be episode opens.
    assert_eq!(out.commit.shadow_alerts.len(), 1);
    let shadow_open = out.commit.shadow_alerts[0].clone();
    assert_eq!(
        (shadow_open.version.as_str(), shadow_open.state.as_str()),
        ("b1", "open")
    );
    let states: HashMap<DeviceId, DeviceAlertState> = out
        .commit
        .alert_states
        .iter()
        .map(|(d, json)| (d.clone(), serde_json::from_str(json).expect("state")))
        .collect();
    let mut restarted = Sequencer::new(
        WindowSize::default(),
        HashMap::new(),
        HashMap::new(),
        states,
        Some(set(BASE)),
    );
    let _ = restarted.set_models(Some(models(CANARY_SITE_02)), T0);
    let out = run(&f, &mut restarted, vec![vitals(&f, "dev-00003", 2, 88.0)]);
    assert_eq!(
        delivered(&out),
        [
            (
                "spo2-low".into(),
                "resolved".into(),
                cand.sha256().to_owned(),
                Some("model_rollback".into())
            ),
            (
                "spo2-low".into(),
                "open".into(),
                set(BASE).sha256().to_owned(),
                None
            )
        ]
    );
    // The base's would-be episode from its shadow days is closed, not left open for
    // ever: a resolved shadow row under the name and digest its state kept.
    let closed: Vec<_> = out
        .commit
        .shadow_alerts
        .iter()
        .map(|r| {
            (
                r.alert_id.as_str(),
                r.model.as_str(),
                r.version.as_str(),
                r.config_sha256.as_str(),
                r.state.as_str(),
                r.patient_ref.as_str(),
            )
        })
        .collect();
    assert_eq!(
        closed,
        [(
            shadow_open.alert_id.as_str(),
            "rules",
            "b1",
            set(BASE).sha256(),
            "resolved",
            "pt-dev-00003"
        )]
    );
    let payload: Json = serde_json::from_str(&out.commit.shadow_alerts[0].payload).expect("json");
    assert_eq!(payload["reason"], "rollout_changed");
    let t = &restarted.tracks[&DeviceId::new("dev-00003").expect("id")].alerts;
    assert!(t.engine_version.is_none() && t.shadows.is_empty());
}

/// `f` with the devices at `sites` and patients `patients` (by device id), same keys.
fn placed(f: F, sites: &[(&str, &str)], patients: &[(&str, &str)]) -> F {
    let mut registry = DeviceRegistry::new(TrustDomain::new("test.vitalmq").expect("td"));
    for (id, site) in [
        ("dev-00001", "site-01"),
        ("dev-00002", "site-01"),
        ("dev-00003", "site-02"),
    ] {
        let site = sites
            .iter()
            .find(|(d, _)| *d == id)
            .map_or(site, |(_, s)| *s);
        let patient_ref = patients
            .iter()
            .find(|(d, _)| *d == id)
            .map_or(format!("pt-{id}"), |(_, p)| (*p).to_owned());
        registry
            .insert_device(DeviceEntry {
                id: DeviceId::new(id).expect("id"),
                site: SiteId::new(site).expect("site"),
                patient_ref,
                key: f.keys[id].verifying_key(),
                consent: None,
                processing_policy: None,
                lot: None,
                hardware_model: None,
                region: None,
            })
            .expect("insert");
    }
    F { registry, ..f }
}

/// A device that moves out of the canary's site while the canary stays: its canary
/// alert is resolved `rollout_changed` (the canary was not taken back); a rollback of
/// the canary itself stays `model_rollback` (`canary_and_rollback_...`).
#[test]
fn a_device_leaving_a_canary_site_is_not_a_rollback() {
    let f = fixture();
    let mut s = sequencer(CANARY_SITE_02);
    let cand = set(&candidate_text());
    let out = run(&f, &mut s, vec![vitals(&f, "dev-00003", 1, 88.0)]);
    assert_eq!(delivered(&out)[0].2, cand.sha256());
    let f = placed(f, &[("dev-00003", "site-01")], &[]);
    let out = run(&f, &mut s, vec![vitals(&f, "dev-00003", 2, 88.0)]);
    assert_eq!(
        delivered(&out),
        [
            (
                "spo2-low".into(),
                "resolved".into(),
                cand.sha256().to_owned(),
                Some("rollout_changed".into())
            ),
            (
                "spo2-low".into(),
                "open".into(),
                set(BASE).sha256().to_owned(),
                None
            )
        ]
    );
    let body: Json = serde_json::from_str(&out.commit.alerts[1].body).expect("json");
    assert_eq!(body["site"], "site-01");
    assert_eq!(body["role"], "live");
}

/// A device without a patient under candidates: its shadow version's rows are stored
/// with an empty `patient_ref`, nothing of the shadow is delivered.
#[test]
fn a_device_without_a_patient_runs_its_shadow_too() {
    let f = placed(fixture(), &[], &[("dev-00001", "")]);
    let mut s = sequencer(SHADOW);
    let out = run(&f, &mut s, vec![vitals(&f, "dev-00001", 1, 92.0)]);
    assert!(out.commit.alerts.is_empty(), "the base sees nothing at 92");
    let rows: Vec<_> = out
        .commit
        .shadow_alerts
        .iter()
        .map(|r| {
            (
                r.version.as_str(),
                r.state.as_str(),
                r.patient_ref.as_str(),
                r.device.as_str(),
            )
        })
        .collect();
    assert_eq!(rows, [("c1", "open", "", "dev-00001")]);
    let body: Json = serde_json::from_str(&out.commit.shadow_alerts[0].payload).expect("json");
    assert_eq!(body["patient_ref"], "");
}

/// A delivering candidate resolves the sensor-fault alert after the base's
/// `[plausibility] resolve_after` (the base flags the implausible readings), not its
/// own.
#[test]
fn a_delivering_candidate_resolves_sensor_faults_by_the_bases_plausibility() {
    let plausible = "\n[plausibility]\nresolve_after = 2\n\n[plausibility.limits]\nspo2 = { min = 0, max = 100, unit = \"%\" }\n";
    let base_text = format!("{BASE}{plausible}");
    let cand_text = base_text
        .replace("version = \"b1\"", "version = \"c1\"")
        .replace("resolve_after = 2", "resolve_after = 9");
    let (base, cand) = (set(&base_text), set(&cand_text));
    let text = format!(
        "format = \"vitalmq-models/v1\"\n\n{}{}[[rollout]]\nmodel = \"rules\"\nlive = \"b1\"\n{CANARY_SITE_02}\n",
        entry("b1", base.sha256()),
        entry("c1", cand.sha256()),
    );
    let registry =
        ModelRegistry::parse(&text, std::path::Path::new("models.toml")).expect("models");
    let mut s = Sequencer::new(
        WindowSize::default(),
        HashMap::new(),
        HashMap::new(),
        HashMap::new(),
        Some(base),
    )
    .with_candidates("rules".into(), vec![Arc::clone(&cand)]);
    let _ = s.set_models(Some(Arc::new(registry)), T0);
    let f = fixture();
    let ops = |out: &Sequenced<u32>| -> Vec<(String, String)> {
        out.commit
            .alerts
            .iter()
            .filter(|a| a.kind == "operational")
            .map(|a| {
                let b: Json = serde_json::from_str(&a.body).expect("json");
                (
                    b["type"].as_str().unwrap_or_default().to_owned(),
                    a.state.clone(),
                )
            })
            .collect()
    };
    let out = run(&f, &mut s, vec![vitals(&f, "dev-00003", 1, 150.0)]);
    assert_eq!(ops(&out), [("sensor_fault".to_owned(), "open".to_owned())]);
    let b: Json = serde_json::from_str(&out.commit.alerts[0].body).expect("json");
    assert_eq!(b["policy_sha256"], cand.sha256(), "the canary delivers it");
    assert_eq!(b["resolve_after"], 2);
    let out = run(&f, &mut s, vec![vitals(&f, "dev-00003", 2, 97.0)]);
    assert!(ops(&out).is_empty());
    let out = run(&f, &mut s, vec![vitals(&f, "dev-00003", 3, 97.0)]);
    assert_eq!(
        ops(&out),
        [("sensor_fault".to_owned(), "resolved".to_owned())],
        "after the base's 2 clean readings"
    );
}

/// A restart with another candidate: the shadow version no longer loaded still gets
/// its would-be episode closed, under the digest its state kept.
#[test]
fn a_shadow_version_no_longer_loaded_is_closed_in_the_store() {
    let f = fixture();
    let mut s = sequencer(SHADOW);
    let c1 = set(&candidate_text());
    let out = run(&f, &mut s, vec![vitals(&f, "dev-00001", 1, 92.0)]);
    assert_eq!(out.commit.shadow_alerts.len(), 1);
    let opened = out.commit.shadow_alerts[0].alert_id.clone();
    let states: HashMap<DeviceId, DeviceAlertState> = out
        .commit
        .alert_states
        .iter()
        .map(|(d, json)| (d.clone(), serde_json::from_str(json).expect("state")))
        .collect();
    // Restarted with c2 instead of c1.
    let c2 = set(&candidate_text().replace("version = \"c1\"", "version = \"c2\""));
    let text = format!(
        "format = \"vitalmq-models/v1\"\n\n{}{}{}[[rollout]]\nmodel = \"rules\"\nlive = \"b1\"\nshadow = [\"c2\"]\n",
        entry("b1", set(BASE).sha256()),
        entry("c1", c1.sha256()),
        entry("c2", c2.sha256()),
    );
    let registry =
        ModelRegistry::parse(&text, std::path::Path::new("models.toml")).expect("models");
    let mut restarted = Sequencer::new(
        WindowSize::default(),
        HashMap::new(),
        HashMap::new(),
        states,
        Some(set(BASE)),
    )
    .with_candidates("rules".into(), vec![c2]);
    let _ = restarted.set_models(Some(Arc::new(registry)), T0);
    let out = run(&f, &mut restarted, vec![vitals(&f, "dev-00001", 2, 92.0)]);
    let c1_rows: Vec<_> = out
        .commit
        .shadow_alerts
        .iter()
        .filter(|r| r.version == "c1")
        .map(|r| {
            (
                r.alert_id.as_str(),
                r.state.as_str(),
                r.config_sha256.as_str(),
            )
        })
        .collect();
    assert_eq!(c1_rows, [(opened.as_str(), "resolved", c1.sha256())]);
    assert!(
        out.commit.alerts.is_empty(),
        "nothing of a shadow is delivered"
    );
}
