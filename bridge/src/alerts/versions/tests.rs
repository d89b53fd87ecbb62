//! The hand-over between rule-set versions of one device, over the shipped example rules
//! and a stricter candidate (SpO2 below 94 after 10 s instead of below 90 after 30 s).

use std::path::Path;

use vitalmq_envelope::DeviceId;
use vitalmq_policies::{ModelRole, RuleSet, SiteId};

use super::super::message::ResolveReason;
use super::super::state::{DeviceAlertState, EngineState};
use super::super::{AlertChange, Sample, evaluate, evaluate_engine};
use super::{Running, hand_over, shadow_mut, single};
use crate::normalize::event_id;

const EXAMPLE: &str = include_str!("../../../../policies/examples/rules.toml");
const T0_MS: u64 = 1_718_260_800_000;

fn base() -> RuleSet {
    RuleSet::parse(EXAMPLE, Path::new("rules.toml")).expect("base")
}

/// The candidate: another version, a stricter and quicker SpO2 rule.
fn candidate() -> RuleSet {
    let text = EXAMPLE
        .replacen(
            "version = \"2025-06-01.1\"",
            "version = \"2025-07-01.1\"",
            1,
        )
        .replace(
            "below = 90\nresolve_at = 92\nresolve_after_s = 60\npersist = { seconds = 30 }",
            "below = 94\nresolve_at = 95\nresolve_after_s = 60\npersist = { seconds = 10 }",
        );
    let c = RuleSet::parse(&text, Path::new("candidate.toml")).expect("candidate");
    assert_ne!(c.sha256(), base().sha256());
    c
}

fn sample(seq: u64, t_s: u64, spo2: f64) -> Sample {
    let device = DeviceId::new("dev-a").expect("id");
    Sample {
        event_id: event_id(&device, 1, seq),
        device,
        site: SiteId::new("site-b").expect("site"),
        patient_ref: "pt-1".into(),
        ts_ms: T0_MS + t_s * 1000,
        metrics: [("spo2".to_owned(), spo2)].into(),
        implausible: Vec::new(),
        q: Some(0.95),
        fw: "5.12.1".into(),
        model: None,
    }
}

/// One device run like the bridge runs it: hand over, deliver, then the shadows.
struct Device {
    base: RuleSet,
    cand: RuleSet,
    state: DeviceAlertState,
    seq: u64,
}

/// (rule, state, reason, policy sha) of a clinical change of `spo2-low` (the SpO2
/// fall rule may join in on a drop; it is not what these tests are about).
type Seen = (String, &'static str, Option<&'static str>, String);

fn seen(changes: &[AlertChange]) -> Vec<Seen> {
    changes
        .iter()
        .filter_map(|c| match c {
            AlertChange::Clinical(a) if a.rule == "spo2-low" => Some((
                a.rule.clone(),
                a.state.as_str(),
                a.resolution.map(ResolveReason::as_str),
                a.policy_sha256.clone(),
            )),
            _ => None,
        })
        .collect()
}

impl Device {
    fn new() -> Self {
        Self {
            base: base(),
            cand: candidate(),
            state: DeviceAlertState::new(),
            seq: 0,
        }
    }

    fn set(&self, version: &str) -> &RuleSet {
        if version == self.base.version() {
            &self.base
        } else {
            &self.cand
        }
    }

    /// Feeds one reading; returns (delivered, shadow) changes.
    fn feed(
        &mut self,
        running: &Running<'_>,
        t_s: u64,
        spo2: f64,
    ) -> (Vec<AlertChange>, Vec<AlertChange>) {
        self.seq += 1;
        let s = sample(self.seq, t_s, spo2);
        self.feed_sample(running, &s, |v| Some(sha_of(v)))
    }

    /// Feeds `s`; `loaded(version)` is the digest of a loaded version (`None`: its file
    /// is not loaded any more).
    fn feed_sample(
        &mut self,
        running: &Running<'_>,
        s: &Sample,
        loaded: impl Fn(&str) -> Option<&'static str>,
    ) -> (Vec<AlertChange>, Vec<AlertChange>) {
        // Durable state between samples.
        let json = serde_json::to_string(&self.state).expect("serializes");
        self.state = serde_json::from_str(&json).expect("parses");
        let base = self.base.clone();
        let handed = hand_over(
            &mut self.state,
            (base.version(), base.sha256()),
            MODEL,
            running,
            loaded,
            |_| false,
            s,
        );
        let mut delivered = handed.delivered;
        for c in &handed.shadow {
            assert_eq!(c.model, MODEL);
            assert_eq!(c.policy_sha256, sha_of(&c.version));
        }
        let mut shadow: Vec<AlertChange> = handed.shadow.into_iter().map(|c| c.change).collect();
        let set = self.set(running.deliver).clone();
        delivered.extend(evaluate(&set, set.sha256(), &mut self.state, s));
        for v in &running.shadows {
            let set = self.set(v).clone();
            shadow.extend(evaluate_engine(
                &set,
                set.sha256(),
                self.base.plausibility().resolve_after,
                shadow_mut(&mut self.state, MODEL, v, sha_of(v)),
                s,
            ));
        }
        (delivered, shadow)
    }
}

const MODEL: &str = "rules";
const BASE_V: &str = "2025-06-01.1";
const CAND_V: &str = "2025-07-01.1";

fn sha_of(version: &str) -> &'static str {
    static SHAS: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    let (b, c) = SHAS.get_or_init(|| (base().sha256().to_owned(), candidate().sha256().to_owned()));
    if version == BASE_V { b } else { c }
}

fn live_with_shadow() -> Running<'static> {
    Running {
        deliver: BASE_V,
        deliver_sha256: sha_of(BASE_V),
        role: ModelRole::Live,
        shadows: vec![CAND_V],
    }
}

fn canary() -> Running<'static> {
    Running {
        deliver: CAND_V,
        deliver_sha256: sha_of(CAND_V),
        role: ModelRole::Canary,
        shadows: vec![BASE_V],
    }
}

/// In shadow the candidate alerts where the base does not, and only in its own state;
/// canaried it delivers without inheriting its shadow episode, resolving the base's;
/// rolled back, its delivered episode resolves as `model_rollback` and the base
/// delivers again from a state with no episode.
#[test]
fn shadow_then_canary_then_rollback() {
    let mut d = Device::new();
    let (b, c) = (base(), candidate());
    // SpO2 92: under the candidate's 94 (after 10 s), above the base's 90.
    let mut shadow = Vec::new();
    for t in (0..=60).step_by(5) {
        let (delivered, s) = d.feed(&live_with_shadow(), t, 92.0);
        assert!(delivered.is_empty(), "the base sees nothing at 92: {t}");
        shadow.extend(s);
    }
    assert_eq!(
        seen(&shadow),
        [("spo2-low".into(), "open", None, c.sha256().to_owned())]
    );
    assert!(d.state.engine.rules.values().all(|r| r.episode.is_none()));
    assert!(d.state.shadows[CAND_V].rules["spo2-low"].episode.is_some());
    let shadow_id = d.state.shadows[CAND_V].rules["spo2-low"]
        .episode
        .as_ref()
        .map(|e| e.alert_id.clone());

    // The base opens too once SpO2 is below 90 for 30 s.
    for t in (65..=100).step_by(5) {
        let (delivered, _) = d.feed(&live_with_shadow(), t, 88.0);
        if t == 95 {
            assert_eq!(
                seen(&delivered),
                [("spo2-low".into(), "open", None, b.sha256().to_owned())]
            );
        }
    }
    assert!(d.state.engine.rules["spo2-low"].episode.is_some());

    // Canary: the base's open alert resolves (it was live: rollout_changed) and the
    // candidate does not deliver its shadow episode as open.
    let (delivered, shadow) = d.feed(&canary(), 105, 88.0);
    assert_eq!(
        seen(&delivered),
        [(
            "spo2-low".into(),
            "resolved",
            Some("rollout_changed"),
            b.sha256().to_owned()
        )]
    );
    // The candidate's would-be episode ends where it starts delivering (stored as a
    // shadow change, never delivered); the base's shadow starts without episodes.
    assert_eq!(
        seen(&shadow),
        [(
            "spo2-low".into(),
            "resolved",
            Some("rollout_changed"),
            c.sha256().to_owned()
        )]
    );
    assert!(d.state.engine.rules["spo2-low"].episode.is_none());
    assert_eq!(d.state.shadows.keys().collect::<Vec<_>>(), [BASE_V]);
    // The candidate opens a delivered alert of its own after its 10 s, a new id.
    let mut delivered = Vec::new();
    for t in (110..=125).step_by(5) {
        delivered.extend(d.feed(&canary(), t, 88.0).0);
    }
    assert_eq!(
        seen(&delivered),
        [("spo2-low".into(), "open", None, c.sha256().to_owned())]
    );
    let AlertChange::Clinical(open) = &delivered[0] else {
        panic!("clinical")
    };
    assert_ne!(Some(open.alert_id.clone()), shadow_id);
    assert_eq!(
        d.state
            .engine_version
            .as_ref()
            .map(|v| (v.version.as_str(), v.role)),
        Some((CAND_V, ModelRole::Canary))
    );

    // Rollback while the reading stays low: the canary's alert resolves as
    // model_rollback under the candidate's digest; the base delivers again, opening
    // its own alert only after its own persistence.
    let (delivered, _) = d.feed(&live_with_shadow(), 130, 88.0);
    assert_eq!(
        seen(&delivered),
        [(
            "spo2-low".into(),
            "resolved",
            Some("model_rollback"),
            c.sha256().to_owned()
        )]
    );
    let mut again = Vec::new();
    for t in (135..=170).step_by(5) {
        again.extend(d.feed(&live_with_shadow(), t, 88.0).0);
    }
    assert_eq!(
        seen(&again),
        [("spo2-low".into(), "open", None, b.sha256().to_owned())]
    );
}

/// A version that loses every role for the device is dropped: the state holds only
/// the versions that run.
#[test]
fn a_version_without_a_role_is_dropped() {
    let mut d = Device::new();
    for t in (0..=20).step_by(5) {
        d.feed(&live_with_shadow(), t, 92.0);
    }
    assert!(d.state.shadows.contains_key(CAND_V));
    let alone = Running {
        deliver: BASE_V,
        deliver_sha256: sha_of(BASE_V),
        role: ModelRole::Live,
        shadows: vec![],
    };
    d.feed(&alone, 25, 92.0);
    assert!(d.state.shadows.is_empty());
    // The candidate canaried, the base not even in shadow: its open alert resolves
    // and its state is gone.
    for t in (30..=80).step_by(5) {
        d.feed(&alone, t, 85.0);
    }
    assert!(d.state.engine.rules["spo2-low"].episode.is_some());
    let only = Running {
        deliver: CAND_V,
        deliver_sha256: sha_of(CAND_V),
        role: ModelRole::Live,
        shadows: vec![],
    };
    let (delivered, _) = d.feed(&only, 85, 85.0);
    assert_eq!(seen(&delivered).len(), 1);
    assert!(d.state.shadows.is_empty());
}

/// A state stored before rule-set versions (engine fields at the top level) loads as
/// the delivering engine's; a state with shadows round-trips.
#[test]
fn a_stored_state_from_before_loads() {
    let mut old = DeviceAlertState::new();
    let b = base();
    for (i, t) in (0..=40).step_by(5).enumerate() {
        evaluate(&b, b.sha256(), &mut old, &sample(i as u64 + 1, t, 85.0));
    }
    assert!(old.engine.rules["spo2-low"].episode.is_some());
    let json: serde_json::Value = serde_json::to_value(&old).expect("json");
    assert!(json.get("rules").is_some(), "flattened: {json}");
    assert!(json.get("engine").is_none());
    assert!(json.get("shadows").is_none() && json.get("engine_version").is_none());
    // Exactly what the previous layout wrote: the same keys.
    let back: DeviceAlertState = serde_json::from_value(json.clone()).expect("loads");
    assert_eq!(back, old);
    assert_eq!(back.engine_version, None);

    let mut d = Device::new();
    d.state = old;
    let (delivered, _) = d.feed(&live_with_shadow(), 45, 85.0);
    assert!(delivered.is_empty(), "no hand-over: None is the base, live");
    assert!(d.state.engine.rules["spo2-low"].episode.is_some());
    let json = serde_json::to_string(&d.state).expect("json");
    let back: DeviceAlertState = serde_json::from_str(&json).expect("loads");
    assert_eq!(back, d.state);
    assert_eq!(back.shadows.len(), 1);
    let _: &EngineState = &back.shadows[CAND_V].engine;
    assert_eq!(back.shadows[CAND_V].model, MODEL);
    assert_eq!(back.shadows[CAND_V].policy_sha256, sha_of(CAND_V));
}

/// Candidates gone (a restart without them): a canary's open alert is resolved at the
/// next sample, under the digest it was delivered with, and the state has no versions.
#[test]
fn without_candidates_the_base_takes_over() {
    let mut d = Device::new();
    let c = candidate();
    for t in (0..=20).step_by(5) {
        d.feed(&canary(), t, 92.0);
    }
    assert!(d.state.engine.rules["spo2-low"].episode.is_some());
    let b = base();
    let s = sample(100, 25, 92.0);
    let out = single(&mut d.state, (b.version(), b.sha256()), &s);
    assert!(out.shadow.is_empty(), "the base in shadow had no episode");
    assert_eq!(
        seen(&out.delivered),
        [(
            "spo2-low".into(),
            "resolved",
            Some("model_rollback"),
            c.sha256().to_owned()
        )]
    );
    assert!(d.state.engine_version.is_none() && d.state.shadows.is_empty());
    let again = single(&mut d.state, (b.version(), b.sha256()), &s);
    assert!(again.delivered.is_empty() && again.shadow.is_empty());
}

/// `(rule, state, reason)` of every change, operational ones as `ops/...`.
fn all_seen(changes: &[AlertChange]) -> Vec<(String, &'static str)> {
    changes
        .iter()
        .map(|c| match c {
            AlertChange::Clinical(a) => (a.rule.clone(), a.state.as_str()),
            AlertChange::Operational(a) => {
                (format!("ops/{}", a.alert_type.as_str()), a.state.as_str())
            }
        })
        .collect()
}

/// A restart without candidates: the would-be episode of the version that ran in
/// shadow is closed (a `resolved` shadow change under the name and digest kept with
/// its state, no file needed), so it never stays open for ever.
#[test]
fn without_candidates_the_shadow_episodes_are_closed() {
    let mut d = Device::new();
    for t in (0..=60).step_by(5) {
        d.feed(&live_with_shadow(), t, 92.0);
    }
    let open_id = d.state.shadows[CAND_V].rules["spo2-low"]
        .episode
        .as_ref()
        .map(|e| e.alert_id.clone())
        .expect("the candidate's would-be episode is open");
    let b = base();
    let out = single(
        &mut d.state,
        (b.version(), b.sha256()),
        &sample(100, 65, 92.0),
    );
    assert!(out.delivered.is_empty(), "the base delivered and goes on");
    assert_eq!(out.shadow.len(), 1, "{:?}", out.shadow);
    let c = &out.shadow[0];
    assert_eq!(
        (
            c.model.as_str(),
            c.version.as_str(),
            c.policy_sha256.as_str()
        ),
        (MODEL, CAND_V, sha_of(CAND_V))
    );
    assert_eq!(c.change.alert_id(), open_id);
    assert_eq!(
        seen(std::slice::from_ref(&c.change)),
        [(
            "spo2-low".into(),
            "resolved",
            Some("rollout_changed"),
            sha_of(CAND_V).to_owned()
        )]
    );
    assert!(d.state.engine_version.is_none() && d.state.shadows.is_empty());
}

/// A shadow version whose file is no longer loaded (and loses its role): its would-be
/// episode is closed under the digest kept with its state.
#[test]
fn a_shadow_no_longer_loaded_is_closed_with_its_own_digest() {
    let mut d = Device::new();
    for t in (0..=60).step_by(5) {
        d.feed(&live_with_shadow(), t, 92.0);
    }
    let alone = Running {
        deliver: BASE_V,
        deliver_sha256: sha_of(BASE_V),
        role: ModelRole::Live,
        shadows: vec![],
    };
    d.seq += 1;
    let s = sample(d.seq, 65, 92.0);
    let (delivered, shadow) = d.feed_sample(&alone, &s, |v| (v == BASE_V).then(|| sha_of(BASE_V)));
    assert!(delivered.is_empty());
    assert_eq!(
        seen(&shadow),
        [(
            "spo2-low".into(),
            "resolved",
            Some("rollout_changed"),
            sha_of(CAND_V).to_owned()
        )]
    );
    assert!(d.state.shadows.is_empty());
}

/// The operational would-be episodes of a shadow (signal quality, sensor fault) are
/// closed like its clinical ones: when it starts delivering (it takes over the
/// deliverer's own instead) and when it loses every role.
#[test]
fn a_shadows_operational_episodes_are_closed_too() {
    let mut d = Device::new();
    // Low signal quality: both versions open a signal-quality episode.
    for t in 0..15 {
        d.seq += 1;
        let mut s = sample(d.seq, t, 97.0);
        s.q = Some(0.1);
        d.feed_sample(&live_with_shadow(), &s, |v| Some(sha_of(v)));
    }
    assert!(d.state.engine.quality.open.is_some());
    let shadow_quality = d.state.shadows[CAND_V]
        .quality
        .open
        .as_ref()
        .map(|o| o.alert_id.clone())
        .expect("the shadow's own signal-quality episode");
    let delivered_quality = d.state.engine.quality.open.clone();
    // Canary: the candidate's would-be quality episode ends, the delivered one passes
    // on as it is.
    d.seq += 1;
    let mut s = sample(d.seq, 15, 97.0);
    s.q = Some(0.1);
    let (_, shadow) = d.feed_sample(&canary(), &s, |v| Some(sha_of(v)));
    // (The base, now in shadow with the quality ring but no episode, opens its own.)
    assert_eq!(
        all_seen(&shadow[..1]),
        [("ops/signal_quality".to_owned(), "resolved")]
    );
    assert_eq!(shadow[0].alert_id(), shadow_quality);
    assert!(shadow[1..].iter().all(|c| c.alert_id() != shadow_quality));
    assert_eq!(d.state.engine.quality.open, delivered_quality);

    // Back to live with the candidate in shadow; an implausible reading opens a
    // sensor fault in both; then the candidate loses every role.
    d.feed(&live_with_shadow(), 16, 97.0);
    d.seq += 1;
    let mut s = sample(d.seq, 17, 97.0);
    s.implausible = vec!["spo2".into()];
    d.feed_sample(&live_with_shadow(), &s, |v| Some(sha_of(v)));
    assert!(d.state.shadows[CAND_V].sensor.open.is_some());
    assert!(d.state.engine.sensor.open.is_some());
    let alone = Running {
        deliver: BASE_V,
        deliver_sha256: sha_of(BASE_V),
        role: ModelRole::Live,
        shadows: vec![],
    };
    let (_, shadow) = d.feed(&alone, 18, 97.0);
    let ops: Vec<_> = all_seen(&shadow)
        .into_iter()
        .filter(|(r, _)| r.starts_with("ops/"))
        .collect();
    assert!(
        ops.contains(&("ops/sensor_fault".to_owned(), "resolved")),
        "{ops:?}"
    );
    assert!(d.state.shadows.is_empty());
    assert!(
        d.state.engine.sensor.open.is_some(),
        "the delivered one goes on"
    );
}
