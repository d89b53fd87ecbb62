//! Scenario tests of the alert engine over the shipped example rules
//! (`policies/examples/rules.toml`): deterministic trajectories on the device clock, each
//! asserting exactly the changes emitted, no more.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value as Json;
use vitalmq_envelope::DeviceId;
use vitalmq_policies::{RuleSet, SiteId};

use super::message::{ClinicalAlert, EscalationCause, ResolveReason, SuppressionReason, alert_id};
use super::state::{EVIDENCE_CAP, OpenAlert};
use super::*;
use crate::normalize::event_id;

const EXAMPLE: &str = include_str!("../../../policies/examples/rules.toml");
/// 2024-06-13T06:40:00Z, the device clock at t = 0.
const T0_MS: u64 = 1_718_260_800_000;
/// Signal quality of a clean reading.
const GOOD: Option<f64> = Some(0.95);

fn rules_from(text: &str) -> RuleSet {
    RuleSet::parse(text, Path::new("rules.toml")).unwrap_or_else(|e| panic!("{e}"))
}

fn example() -> RuleSet {
    rules_from(EXAMPLE)
}

/// One simulated device feeding the engine, with its durable state.
struct Patient {
    rules: RuleSet,
    state: DeviceAlertState,
    device: DeviceId,
    site: SiteId,
    seq: u64,
    /// Serialize and deserialize the state before every sample (durability).
    round_trip: bool,
}

/// A compact view of a change for exact assertions:
/// (rule or ops type, state, severity or "-", device time in seconds).
type Seen = (String, &'static str, &'static str, u64);

impl Patient {
    fn new(device: &str, site: &str) -> Self {
        Self {
            rules: example(),
            state: DeviceAlertState::new(),
            device: DeviceId::new(device).expect("device id"),
            site: SiteId::new(site).expect("site id"),
            seq: 0,
            round_trip: false,
        }
    }

    fn sample(&mut self, t_s: u64, metrics: &[(&str, f64)], q: Option<f64>) -> Sample {
        self.seq += 1;
        Sample {
            event_id: event_id(&self.device, 1, self.seq),
            device: self.device.clone(),
            site: self.site.clone(),
            patient_ref: "pt-3f9c2a1b".to_owned(),
            ts_ms: T0_MS + t_s * 1000,
            metrics: metrics.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            implausible: Vec::new(),
            q,
            fw: "5.12.1".to_owned(),
            model: None,
        }
    }

    fn feed(&mut self, t_s: u64, metrics: &[(&str, f64)], q: Option<f64>) -> Vec<AlertChange> {
        let sample = self.sample(t_s, metrics, q);
        self.feed_sample(&sample)
    }

    fn feed_sample(&mut self, sample: &Sample) -> Vec<AlertChange> {
        if self.round_trip {
            let json = serde_json::to_string(&self.state).expect("state serializes");
            let back: DeviceAlertState = serde_json::from_str(&json).expect("state parses");
            assert_eq!(back, self.state, "state survives serde unchanged");
            self.state = back;
        }
        let sha = self.rules.sha256().to_owned();
        evaluate(&self.rules, &sha, &mut self.state, sample)
    }

    /// Feeds `(t, value)` readings of one metric and collects the changes.
    fn run(&mut self, metric: &str, readings: &[(u64, f64)], q: Option<f64>) -> Vec<AlertChange> {
        readings
            .iter()
            .flat_map(|&(t, v)| self.feed(t, &[(metric, v)], q))
            .collect()
    }
}

fn seen(changes: &[AlertChange]) -> Vec<Seen> {
    changes
        .iter()
        .map(|c| match c {
            AlertChange::Clinical(a) => (
                a.rule.clone(),
                a.state.as_str(),
                a.severity.as_str(),
                (a.raised_at_ms - T0_MS) / 1000,
            ),
            AlertChange::Operational(a) => (
                a.alert_type.as_str().to_owned(),
                a.state.as_str(),
                "-",
                (a.raised_at_ms - T0_MS) / 1000,
            ),
        })
        .collect()
}

/// No changes.
const NONE: [Seen; 0] = [];

fn s(rule: &str, state: &'static str, severity: &'static str, t: u64) -> Seen {
    (rule.to_owned(), state, severity, t)
}

fn clinical(c: &AlertChange) -> &ClinicalAlert {
    match c {
        AlertChange::Clinical(a) => a,
        AlertChange::Operational(a) => panic!("expected a clinical alert, got {a:?}"),
    }
}

/// Readings every `step` seconds from `from` to `to` (inclusive) of `f(t)`.
fn every(step: u64, from: u64, to: u64, f: impl Fn(u64) -> f64) -> Vec<(u64, f64)> {
    (from..=to)
        .step_by(usize::try_from(step).expect("step"))
        .map(|t| (t, f(t)))
        .collect()
}

/// SpO2 98 for a minute, falling to 86 over 2 minutes, 86 for 5 minutes, back to 97 in a
/// minute, then 97. Every 5 s. Values are computed with exact divisions.
fn desaturation(t: u64) -> f64 {
    let t = t as f64;
    match t {
        _ if t <= 60.0 => 98.0,
        _ if t <= 180.0 => 98.0 - (t - 60.0) / 10.0,
        _ if t <= 480.0 => 86.0,
        _ if t <= 540.0 => 86.0 + (t - 480.0) * 11.0 / 60.0,
        _ => 97.0,
    }
}

// ---- (a) desaturation --------------------------------------------------------------------

#[test]
fn a_desaturation_opens_escalates_and_resolves_once() {
    let mut p = Patient::new("dev-00042", "site-uk-03");
    let changes = p.run("spo2", &every(5, 0, 900, desaturation), GOOD);
    // spo2-low: below 90 from t=145 (89.5); 30 s later it opens. Held at 86 (never below
    // 85), it escalates when 300 s open (t=475). From t=515 it is back at >= 92; a minute
    // later it resolves.
    // spo2-falling, the rate rule's early warning, is part of the exact expectation: the
    // fall of 12 points in 2 minutes is what it is for. It fires (2 of 3 readings with a
    // fall >= 4 within 60 s) before the threshold rule, and resolves a minute after the
    // fall stops being seen (t=205: the window no longer reaches back to 93.5 at t=135).
    assert_eq!(
        seen(&changes),
        [
            s("spo2-falling", "open", "review", 105),
            s("spo2-low", "open", "review", 175),
            s("spo2-falling", "resolved", "review", 265),
            s("spo2-low", "escalated", "urgent", 475),
            s("spo2-low", "resolved", "urgent", 575),
        ]
    );
    let low: Vec<&ClinicalAlert> = changes
        .iter()
        .map(clinical)
        .filter(|a| a.rule == "spo2-low")
        .collect();
    let (open, up, done) = (low[0], low[1], low[2]);
    assert_eq!(open.alert_id, up.alert_id);
    assert_eq!(open.alert_id, done.alert_id);
    assert_eq!(
        (open.value, open.threshold, open.window_s),
        (Some(86.5), 90.0, 30)
    );
    assert_eq!(open.evidence.len(), 7, "readings t=145..175");
    assert_eq!(up.escalation, Some(EscalationCause::Persisting));
    assert_eq!((up.value, up.window_s), (Some(86.0), 300));
    assert_eq!(done.resolution, Some(ResolveReason::Recovered));
    assert_eq!(done.threshold, 92.0);
    assert_eq!(
        done.evidence.len(),
        10,
        "capped: the newest 10 of 13 readings >= 92"
    );
    // Every reading below 90 after the opening one is a suppressed repeat:
    // t=180..470 while open, t=480..500 while escalated (t=505..510 are 90.6 and 91.5:
    // not below 90, not yet 92).
    let counts = done.suppressed.expect("counts on resolve");
    assert_eq!(counts.already_open, 59);
    assert_eq!(counts.already_escalated, 5);
    assert_eq!(counts.last, Some(SuppressionReason::AlreadyEscalated));
    assert!(p.state.open_alerts().next().is_none(), "nothing left open");
}

#[test]
fn the_alert_message_has_every_spec_field() {
    let mut p = Patient::new("dev-00042", "site-uk-03");
    let changes = p.run("spo2", &every(5, 0, 900, desaturation), GOOD);
    let open = changes
        .iter()
        .find(|c| matches!(c, AlertChange::Clinical(a) if a.rule == "spo2-low"))
        .expect("spo2-low opened");
    assert_eq!(open.topic(), "alerts/site-uk-03/review/dev-00042");
    let j: Json = serde_json::from_str(&open.to_json()).expect("json");
    let keys: Vec<&str> = j
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys[..18],
        [
            "alert_id",
            "kind",
            "state",
            "severity",
            "rule",
            "rule_version",
            "policy_sha256",
            "device",
            "site",
            "patient_ref",
            "metric",
            "value",
            "threshold",
            "window_s",
            "evidence",
            "fw",
            "model",
            "raised_at"
        ],
        "SPEC section 5 order"
    );
    assert_eq!(j["kind"], "clinical");
    assert_eq!(j["state"], "open");
    assert_eq!(j["severity"], "review");
    assert_eq!(j["rule"], "spo2-low");
    assert_eq!(j["rule_version"], "3");
    assert_eq!(j["policy_sha256"], p.rules.sha256());
    assert_eq!(j["device"], "dev-00042");
    assert_eq!(j["site"], "site-uk-03");
    assert_eq!(j["patient_ref"], "pt-3f9c2a1b");
    assert_eq!(j["metric"], "spo2");
    assert_eq!(j["value"], 86.5);
    assert_eq!(j["threshold"], 90);
    assert_eq!(j["window_s"], 30);
    assert_eq!(j["evidence"][0], event_id(&p.device, 1, 30).as_str());
    assert_eq!(j["fw"], "5.12.1");
    assert_eq!(j["model"], Json::Null);
    assert_eq!(j["raised_at"], "2024-06-13T06:42:55Z");
    assert_eq!(j["measure"], "value");
    assert!(j.get("suppressed").is_none());

    let done = changes.last().expect("resolved");
    let j: Json = serde_json::from_str(&done.to_json()).expect("json");
    assert_eq!(done.topic(), "alerts/site-uk-03/urgent/dev-00042");
    assert_eq!(j["state"], "resolved");
    assert_eq!(j["reason"], "recovered");
    assert_eq!(j["suppressed"], 64);
    assert_eq!(j["suppressed_reasons"]["already_open"], 59);

    // The rate alert says what it measured.
    let fall = clinical(&changes[0]);
    assert_eq!(
        (fall.measure, fall.measured, fall.threshold),
        ("fall", Some(4.5), 4.0)
    );
    // The id is the documented hash of device, rule and the opening reading.
    let opening = &clinical(open).evidence.last().expect("evidence").clone();
    assert_eq!(open.alert_id(), alert_id(&p.device, "spo2-low", opening));
}

// ---- (b) motion artifact -----------------------------------------------------------------

#[test]
fn b_a_motion_artifact_burst_raises_one_operational_alert_and_no_clinical_one() {
    let mut p = Patient::new("dev-00042", "site-uk-03");
    let mut changes = Vec::new();
    let mut t = 0;
    for _ in 0..24 {
        changes.extend(p.feed(t, &[("spo2", 97.0), ("pulse", 72.0)], GOOD));
        t += 5;
    }
    assert!(changes.is_empty());
    // 30 readings of wild values at q = 0.2: SpO2 60..100, pulse 40..200.
    for i in 0..30u32 {
        let spo2 = [60.0, 100.0, 71.0, 84.0, 99.0][(i % 5) as usize];
        let pulse = [40.0, 200.0, 155.0, 31.0, 180.0, 125.0][(i % 6) as usize];
        changes.extend(p.feed(t, &[("spo2", spo2), ("pulse", pulse)], Some(0.2)));
        t += 5;
    }
    // More than half of the last 20 low: the 11th low reading (t = 120 + 50).
    assert_eq!(seen(&changes), [s("signal_quality", "open", "-", 170)]);
    let AlertChange::Operational(ops) = &changes[0] else {
        panic!("operational")
    };
    assert_eq!(changes[0].topic(), "ops/bridge/signal_quality");
    assert_eq!((ops.low_quality, ops.over_n), (11, 20));
    let j: Json = serde_json::from_str(&changes[0].to_json()).expect("json");
    assert_eq!(j["kind"], "operational");
    assert_eq!(j["type"], "signal_quality");
    assert_eq!(j["device"], "dev-00042");
    assert!(
        j.get("patient_ref").is_none(),
        "no patient reference in ops"
    );

    // Clean again: resolved when at most a quarter of the last 20 are low, i.e. after
    // 15 good readings; still no clinical alert (the burst taught no rule anything).
    let mut after = Vec::new();
    for _ in 0..40 {
        after.extend(p.feed(t, &[("spo2", 97.0), ("pulse", 72.0)], GOOD));
        t += 5;
    }
    assert_eq!(
        seen(&after),
        [s("signal_quality", "resolved", "-", 270 + 14 * 5)]
    );
    assert_eq!(after[0].alert_id(), changes[0].alert_id());
}

// ---- (c) baseline drift ------------------------------------------------------------------

/// Small deterministic noise in -1.5..=1.5.
fn noise(i: u64) -> f64 {
    ((i * 37) % 7) as f64 * 0.5 - 1.5
}

#[test]
fn c_slow_drift_is_followed_but_a_sudden_jump_alerts_once() {
    let mut p = Patient::new("dev-00042", "site-uk-03");
    let minute = 60;
    let mut changes = Vec::new();
    // 5 h: 70 -> 95; 3 h: 95 -> 80; 1 h at 80. One reading a minute, with noise.
    for i in 0..=300u64 {
        let pulse = 70.0 + 25.0 * i as f64 / 300.0 + noise(i);
        changes.extend(p.feed(i * minute, &[("pulse", pulse)], GOOD));
    }
    for i in 1..=180u64 {
        let pulse = 95.0 - 15.0 * i as f64 / 180.0 + noise(i);
        changes.extend(p.feed((300 + i) * minute, &[("pulse", pulse)], GOOD));
    }
    for i in 1..=60u64 {
        changes.extend(p.feed((480 + i) * minute, &[("pulse", 80.0 + noise(i))], GOOD));
    }
    assert_eq!(seen(&changes), NONE, "9 hours of drift: no alert");

    // Jump +30 to 110 (below the tachycardia threshold of 120) for 10 minutes: the
    // baseline rule opens after its 60 s persistence, once.
    let jump_at = 541 * minute;
    let jump = p.run(
        "pulse",
        &every(minute, jump_at, jump_at + 10 * minute, |_| 110.0),
        GOOD,
    );
    assert_eq!(
        seen(&jump),
        [s("pulse-deviation", "open", "review", jump_at + minute)]
    );
    let open = clinical(&jump[0]);
    assert_eq!(open.measure, "deviation");
    let baseline = open.baseline.expect("baseline in message");
    assert!((baseline - 80.0).abs() < 1.5, "{baseline}");
    assert!(open.measured.is_some_and(|d| d > 25.0));

    // Back to 80: within 15 of the baseline for 2 minutes resolves it.
    let back_at = jump_at + 11 * minute;
    let back = p.run(
        "pulse",
        &every(minute, back_at, back_at + 5 * minute, |_| 80.0),
        GOOD,
    );
    assert_eq!(
        seen(&back),
        [s(
            "pulse-deviation",
            "resolved",
            "review",
            back_at + 2 * minute
        )]
    );
    // While open the baseline learns again (so a lasting new level would resolve the
    // alert within about a window): of the 9 readings of 110 after the opening one, the
    // first 4 are still more than 25 away from it, and are the suppressed repeats.
    assert_eq!(clinical(&back[0]).suppressed.map(|c| c.total()), Some(4));
}

#[test]
fn a_lasting_new_level_becomes_the_baseline_and_the_alert_resolves() {
    let mut p = Patient::new("dev-00042", "site-uk-03");
    let minute = 60;
    let warm = p.run("pulse", &every(minute, 0, 40 * minute, |_| 75.0), GOOD);
    assert_eq!(seen(&warm), NONE);
    let jump_at = 41 * minute;
    let after = p.run(
        "pulse",
        &every(minute, jump_at, jump_at + 120 * minute, |_| 105.0),
        GOOD,
    );
    // Opens after a minute (the two readings that opened it taught nothing); from then on
    // the baseline learns the new level, is within 15 of 105 after 21 more readings, and
    // 2 minutes later the alert resolves: within one 30-minute window.
    assert_eq!(
        seen(&after),
        [
            s("pulse-deviation", "open", "review", jump_at + minute),
            s(
                "pulse-deviation",
                "resolved",
                "review",
                jump_at + 24 * minute
            ),
        ]
    );
}

// ---- (d) flapping ------------------------------------------------------------------------

#[test]
fn d_flapping_around_the_threshold_opens_once_and_does_not_resolve() {
    let mut p = Patient::new("dev-00042", "site-uk-03");
    // 88 for 40 s opens after 30 s; then 89 / 91 alternate every reading for 3.5 min.
    let mut readings = every(5, 0, 40, |_| 88.0);
    readings.extend(every(5, 45, 250, |t| if t % 10 == 5 { 89.0 } else { 91.0 }));
    let changes = p.run("spo2", &readings, GOOD);
    assert_eq!(seen(&changes), [s("spo2-low", "open", "review", 30)]);
    // 91 is inside the hysteresis band (resolve at >= 92): no resolve run ever starts.
    let rs = &p.state.engine.rules["spo2-low"];
    assert!(rs.resolving.is_none());
    let episode = rs.episode.as_ref().expect("still open");
    // Repeats: 88 at t=35, 40 and the 21 readings of 89.
    assert_eq!(episode.suppressed.already_open, 23);
    assert_eq!(
        episode.suppressed.last,
        Some(SuppressionReason::AlreadyOpen)
    );
    let open: Vec<OpenAlert<'_>> = p.state.open_alerts().collect();
    assert_eq!(open.len(), 1);
    assert_eq!((open[0].rule, open[0].suppressed), ("spo2-low", 23));

    // Recovery to 97: resolved a minute later (before the 300 s escalation), reporting
    // the suppressed repeats.
    let done = p.run("spo2", &every(5, 255, 330, |_| 97.0), GOOD);
    assert_eq!(seen(&done), [s("spo2-low", "resolved", "review", 315)]);
    assert_eq!(clinical(&done[0]).suppressed.map(|c| c.total()), Some(23));
}

#[test]
fn flapping_around_a_k_of_n_threshold_opens_once() {
    let mut p = Patient::new("dev-00042", "site-uk-03");
    // Pulse 119 / 121 alternating: 3 of 5 above 120 after the 5th reading.
    let changes = p.run(
        "pulse",
        &every(10, 0, 600, |t| if t % 20 == 0 { 121.0 } else { 119.0 }),
        GOOD,
    );
    assert_eq!(seen(&changes), [s("pulse-high", "open", "review", 40)]);
}

// ---- (e) durability ----------------------------------------------------------------------

#[test]
fn e_state_round_trips_through_serde_and_evaluation_continues_identically() {
    let trajectory = |p: &mut Patient| {
        let mut out = p.run("spo2", &every(5, 0, 900, desaturation), GOOD);
        for i in 0..40u64 {
            let q = if i % 4 == 0 { GOOD } else { Some(0.1) };
            out.extend(p.feed(
                905 + i * 5,
                &[("spo2", 70.0 + i as f64), ("pulse", 130.0)],
                q,
            ));
        }
        for i in 0..200u64 {
            let pulse = 72.0 + noise(i) + if (120..150).contains(&i) { 35.0 } else { 0.0 };
            out.extend(p.feed(
                1200 + i * 30,
                &[("pulse", pulse), ("temp", 37.0 + noise(i))],
                GOOD,
            ));
        }
        out
    };
    let mut plain = Patient::new("dev-00042", "site-uk-03");
    let mut durable = Patient::new("dev-00042", "site-uk-03");
    durable.round_trip = true;
    let a = trajectory(&mut plain);
    let b = trajectory(&mut durable);
    assert!(
        a.len() >= 8,
        "the trajectory exercises the engine: {:?}",
        seen(&a)
    );
    assert_eq!(a, b);
    assert_eq!(plain.state, durable.state);
}

// ---- (f) overrides -----------------------------------------------------------------------

#[test]
fn f_a_site_override_changes_the_rule_for_that_site_only() {
    let low = every(5, 0, 60, |_| 89.0);
    let mut ward = Patient::new("dev-00001", "site-a");
    let mut hdu = Patient::new("dev-00002", "site-hdu");
    let ward_changes = ward.run("spo2", &low, GOOD);
    let hdu_changes = hdu.run("spo2", &low, GOOD);
    // The HDU override: urgent, and 15 s of persistence instead of 30.
    assert_eq!(seen(&ward_changes), [s("spo2-low", "open", "review", 30)]);
    assert_eq!(seen(&hdu_changes), [s("spo2-low", "open", "urgent", 15)]);
    assert_eq!(ward_changes[0].topic(), "alerts/site-a/review/dev-00001");
    assert_eq!(hdu_changes[0].topic(), "alerts/site-hdu/urgent/dev-00002");

    // The COPD cohort alerts below 88 only, wherever it is.
    let mut copd = Patient::new("dev-00077", "site-a");
    assert_eq!(seen(&copd.run("spo2", &low, GOOD)), NONE);
    let lower = copd.run("spo2", &every(5, 65, 120, |_| 87.0), GOOD);
    assert_eq!(seen(&lower), [s("spo2-low", "open", "review", 95)]);
    assert_eq!(clinical(&lower[0]).threshold, 88.0);
}

// ---- (g) bounded state -------------------------------------------------------------------

/// A small deterministic generator (64-bit LCG, Knuth's constants).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 11
    }

    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next() as f64 / (1u64 << 53) as f64)
    }
}

#[test]
fn g_state_stays_bounded_over_100k_samples() {
    let mut p = Patient::new("dev-00042", "site-uk-03");
    let mut rng = Lcg(7);
    let (mut largest, mut changes, mut t) = (0, 0usize, 0u64);
    for i in 0..100_000u64 {
        // Episodes of every kind: regimes of 200 readings, from calm to wild.
        let regime = (i / 200) % 5;
        let (spo2, pulse, temp) = match regime {
            0 => (
                rng.uniform(95.0, 99.0),
                rng.uniform(60.0, 80.0),
                rng.uniform(36.5, 37.2),
            ),
            1 => (
                rng.uniform(80.0, 91.0),
                rng.uniform(110.0, 160.0),
                rng.uniform(37.8, 40.0),
            ),
            2 => (
                rng.uniform(60.0, 100.0),
                rng.uniform(30.0, 220.0),
                rng.uniform(35.0, 41.0),
            ),
            _ => (
                rng.uniform(88.0, 93.0),
                rng.uniform(95.0, 125.0),
                rng.uniform(37.4, 38.2),
            ),
        };
        let q = if rng.next() % 10 == 0 {
            Some(rng.uniform(0.0, 0.6))
        } else {
            GOOD
        };
        t += 1 + rng.next() % 9;
        changes += p
            .feed(t, &[("spo2", spo2), ("pulse", pulse), ("temp", temp)], q)
            .len();
        if i % 97 == 0 || i > 99_900 {
            let size = serde_json::to_vec(&p.state).expect("json").len();
            largest = largest.max(size);
        }
    }
    assert!(
        changes > 1000,
        "the run opened and resolved many alerts: {changes}"
    );
    // Measured: about 5.6 KiB at worst, with all five rules open and resolving at once
    // (two full evidence lists each) and a full rate window; about 1.1 KiB per rule.
    assert!(
        largest < 6 * 1024,
        "largest serialized state: {largest} bytes"
    );
    for rule in p.state.engine.rules.values() {
        assert!(
            rule.pending
                .run
                .as_ref()
                .is_none_or(|r| r.evidence.len() <= EVIDENCE_CAP)
        );
        assert!(
            rule.episode
                .as_ref()
                .is_none_or(|e| e.evidence.len() <= EVIDENCE_CAP)
        );
    }
}

// ---- rule reloads, time and robustness ---------------------------------------------------

#[test]
fn a_removed_rule_resolves_its_open_alert_and_leaves_the_state() {
    let mut p = Patient::new("dev-00042", "site-uk-03");
    let opened = p.run("spo2", &every(5, 0, 40, |_| 88.0), GOOD);
    assert_eq!(seen(&opened), [s("spo2-low", "open", "review", 30)]);
    // The new rule set drops spo2-low (and its overrides).
    let start = EXAMPLE.find("# Desaturation").expect("spo2-low");
    let end = EXAMPLE.find("# Early warning").expect("next rule");
    let without = format!("{}{}", &EXAMPLE[..start], &EXAMPLE[end..])
        .split("# --- Overrides")
        .next()
        .expect("head")
        .to_owned();
    p.rules = rules_from(&without);
    let changes = p.run("spo2", &[(45, 88.0)], GOOD);
    assert_eq!(seen(&changes), [s("spo2-low", "resolved", "review", 45)]);
    let done = clinical(&changes[0]);
    assert_eq!(done.alert_id, clinical(&opened[0]).alert_id);
    assert_eq!(done.resolution, Some(ResolveReason::RuleRemoved));
    assert_eq!(done.suppressed.map(|c| c.total()), Some(2));
    assert!(!p.state.engine.rules.contains_key("spo2-low"));
    let j: Json = serde_json::from_str(&changes[0].to_json()).expect("json");
    assert_eq!(j["reason"], "rule_removed");
}

#[test]
fn a_rule_that_measures_something_else_resolves_as_changed() {
    let mut p = Patient::new("dev-00042", "site-uk-03");
    let opened = p.run("temp", &every(60, 0, 120, |_| 38.5), GOOD);
    assert_eq!(seen(&opened), [s("temp-high", "open", "info", 60)]);
    p.rules = rules_from(&EXAMPLE.replace("metric = \"temp\"", "metric = \"core_temp\""));
    let changes = p.feed(180, &[("temp", 38.6)], GOOD);
    assert_eq!(seen(&changes), [s("temp-high", "resolved", "info", 180)]);
    assert_eq!(
        clinical(&changes[0]).resolution,
        Some(ResolveReason::RuleChanged)
    );
    // A new version of the same rule keeps the episode and reports the new version.
    let mut p = Patient::new("dev-00042", "site-uk-03");
    p.run("temp", &every(60, 0, 120, |_| 38.5), GOOD);
    p.rules = rules_from(&EXAMPLE.replace(
        "id = \"temp-high\"\nversion = \"1\"",
        "id = \"temp-high\"\nversion = \"2\"",
    ));
    let changes = p.run("temp", &every(60, 180, 60 * 13, |_| 37.0), GOOD);
    assert_eq!(seen(&changes), [s("temp-high", "resolved", "info", 780)]);
    assert_eq!(clinical(&changes[0]).rule_version, "2");
}

#[test]
fn an_alert_past_the_escalation_threshold_opens_and_escalates_at_once() {
    let mut p = Patient::new("dev-00042", "site-uk-03");
    let changes = p.run("spo2", &every(5, 0, 30, |_| 80.0), GOOD);
    assert_eq!(
        seen(&changes),
        [
            s("spo2-low", "open", "review", 30),
            s("spo2-low", "escalated", "urgent", 30),
        ]
    );
    assert_eq!(
        clinical(&changes[1]).escalation,
        Some(EscalationCause::Worse)
    );
    assert_eq!(clinical(&changes[1]).threshold, 85.0);
    // Escalated is final until resolution: further readings are suppressed.
    assert_eq!(
        seen(&p.run("spo2", &every(5, 35, 600, |_| 80.0), GOOD)),
        NONE
    );
}

#[test]
fn late_readings_are_ignored_and_a_clock_reset_restarts_the_runs() {
    let mut p = Patient::new("dev-00042", "site-uk-03");
    p.run("spo2", &every(5, 0, 25, |_| 88.0), GOOD);
    // A late reading (older than the newest, within 10 minutes) changes nothing.
    let before = p.state.clone();
    assert_eq!(seen(&p.feed(3, &[("spo2", 50.0)], GOOD)), NONE);
    assert_eq!(p.state.late_ignored(), 1);
    assert_eq!(p.state.engine.rules, before.engine.rules);
    // The run continues: open at t=30.
    assert_eq!(
        seen(&p.run("spo2", &[(30, 88.0)], GOOD)),
        [s("spo2-low", "open", "review", 30)]
    );

    // The device clock jumps back a day: the alert stays open and is not escalated by the
    // 300 s that the old clock would claim; runs restart.
    let mut q = Patient::new("dev-00042", "site-uk-03");
    q.run("spo2", &every(5, 86_400, 86_430, |_| 88.0), GOOD);
    let changes = q.run("spo2", &every(5, 0, 200, |_| 88.0), GOOD);
    assert_eq!(seen(&changes), NONE);
    assert_eq!(q.state.newest_ts_ms(), Some(T0_MS + 200_000));
    let changes = q.run("spo2", &every(5, 205, 300, |_| 88.0), GOOD);
    assert_eq!(seen(&changes), [s("spo2-low", "escalated", "urgent", 300)]);
}

#[test]
fn unusable_readings_are_ignored() {
    let mut p = Patient::new("dev-00042", "site-uk-03");
    let mut changes = Vec::new();
    for t in (0..=120).step_by(5) {
        changes.extend(p.feed(t, &[("spo2", f64::NAN)], Some(0.3)));
        changes.extend(p.feed(t, &[("spo2", f64::NEG_INFINITY), ("other", 1.0)], GOOD));
        changes.extend(p.feed(t, &[("spo2", 70.0)], Some(0.55)));
        changes.extend(p.feed(t, &[("spo2", 70.0)], Some(f64::NAN)));
        changes.extend(p.feed(t, &[("spo2", 70.0)], Some(0.45)));
    }
    // spo2-low needs q >= 0.6, so no reading reaches it. For the device, 0.3, NaN and
    // 0.45 are low quality (0.55 is not): 3 of every 5, so the operational alert opens
    // with the 11th low reading of the last 20 (t=15), and no clinical one.
    assert_eq!(seen(&changes), [s("signal_quality", "open", "-", 15)]);
    assert!(!p.state.engine.rules.contains_key("spo2-low"));
    // A reading without q is good.
    let changes = p.run("spo2", &every(5, 125, 160, |_| 70.0), None);
    assert_eq!(
        seen(&changes),
        [
            s("spo2-low", "open", "review", 155),
            s("spo2-low", "escalated", "urgent", 155),
        ]
    );
}

#[test]
fn extreme_numbers_never_panic() {
    let mut p = Patient::new("dev-00042", "site-uk-03");
    let values = [f64::MAX, f64::MIN, 1e300, -1e300, 0.0, -0.0, 5e-324, 97.0];
    let times = [0, 1, u64::MAX / 2000, 3, u64::MAX / 1000 - T0_MS / 1000];
    for (i, &t) in times.iter().enumerate() {
        for &v in &values {
            let metrics: BTreeMap<String, f64> = ["spo2", "pulse", "temp"]
                .iter()
                .map(|m| ((*m).to_owned(), v))
                .collect();
            let mut sample = p.sample(t, &[], Some(v));
            sample.metrics = metrics;
            sample.ts_ms = sample.ts_ms.wrapping_add(i as u64);
            for c in p.feed_sample(&sample) {
                let _ = (c.topic(), c.to_json());
            }
        }
    }
    let json = serde_json::to_string(&p.state).expect("serializes");
    let back: DeviceAlertState = serde_json::from_str(&json).expect("parses");
    assert_eq!(back.engine.rules.len(), p.state.engine.rules.len());
}

#[test]
fn a_sample_is_made_from_verified_telemetry_and_the_registry_entry() {
    use vitalmq_envelope::{MessageType, Number, Telemetry};
    use vitalmq_policies::DeviceRegistry;
    let registry = DeviceRegistry::parse(
        "format = \"vitalmq-registry/v1\"\ntrust_domain = \"demo.vitalmq\"\n\
         [[devices]]\nid = \"dev-00042\"\nsite = \"site-a\"\npatient_ref = \"pt-1\"\n\
         alg = \"EdDSA\"\n\
         public_key = \"50163016231421c3895b50daa2c884654e188d01a090529bbddd36d151e50d2f\"\n",
        Path::new("registry.toml"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let dev = DeviceId::new("dev-00042").expect("id");
    let entry = registry.device(&dev).expect("registered");
    let t = Telemetry {
        dev: dev.clone(),
        epoch: 1,
        seq: 7,
        ts: T0_MS,
        fw: "5.12.1".to_owned(),
        kind: MessageType::Vitals,
        m: Some(BTreeMap::from([
            ("spo2".to_owned(), Number::Int(97)),
            ("temp".to_owned(), Number::Float(36.9)),
        ])),
        q: Some(0.9),
        model: Some("ppg-2".to_owned()),
        schema: None,
        extra: BTreeMap::new(),
    };
    let s = Sample::from_telemetry(event_id(&dev, 1, 7), &t, entry);
    assert_eq!(s.site.as_str(), "site-a");
    assert_eq!(s.patient_ref, "pt-1");
    assert_eq!(s.metrics["spo2"], 97.0);
    assert_eq!(s.metrics["temp"], 36.9);
    assert_eq!(
        (s.ts_ms, s.q, s.model.as_deref()),
        (T0_MS, Some(0.9), Some("ppg-2"))
    );
}

/// An implausible value hides only itself: the reading's other metrics still reach their
/// rules, and the sensor-fault alert opens once, counts, survives serde and resolves
/// after `resolve_after` clean readings.
#[test]
fn h_implausible_values_raise_one_sensor_fault_and_other_metrics_still_alert() {
    let mut p = Patient::new("dev-00042", "site-a");
    p.round_trip = true;
    let mut out = Vec::new();
    for t in [0, 10, 20] {
        let mut sample = p.sample(t, &[("pulse", 130.0)], GOOD);
        sample.implausible = vec!["spo2".to_owned()];
        out.extend(p.feed_sample(&sample));
    }
    assert_eq!(
        seen(&out),
        [
            s("sensor_fault", "open", "-", 0),
            s("pulse-high", "open", "review", 20),
        ]
    );
    let ops: Vec<_> = out
        .iter()
        .filter_map(|c| match c {
            AlertChange::Operational(a) => Some(a),
            AlertChange::Clinical(_) => None,
        })
        .collect();
    let change = AlertChange::Operational(ops[0].clone());
    assert_eq!(change.topic(), "ops/bridge/sensor_fault");
    let body: Json = serde_json::from_str(&change.to_json()).expect("json");
    assert_eq!(body["metrics"], serde_json::json!(["spo2"]));
    assert!(body.get("patient_ref").is_none());
    assert_eq!(p.state.open_alerts().count(), 2);
    let mut later = Vec::new();
    for t in [30, 40, 50, 60] {
        later.extend(p.feed(t, &[("pulse", 72.0)], GOOD));
    }
    assert!(
        seen(&later).iter().all(|c| c.0 != "sensor_fault"),
        "{later:?}"
    );
    later = p.feed(70, &[("pulse", 72.0)], GOOD);
    let resolved: Vec<_> = seen(&later)
        .into_iter()
        .filter(|c| c.0 == "sensor_fault")
        .collect();
    assert_eq!(resolved, [s("sensor_fault", "resolved", "-", 70)]);
}
