//! One accepted vitals reading in, the patient's scores and score alert changes out.
//! Pure: the caller stages the state and adopts it after the commit.

use serde::Serialize;
use serde_json::{Value as Json, json};
use vitalmq_policies::{Assessment, Parameter, Risk, Score, ScoreTable, score};

use super::alert::{ScoreRule, Transition, transition};
use super::config::{Role, Scoring};
use super::row::{self, NewScore};
use super::state::{Episode, PatientScoreState};
use crate::alerts::Sample;
use crate::alerts::book::Outgoing;
use crate::normalize::rfc3339_ms;

/// A score alert change for the `alerts` table, and the device whose alert book keeps
/// the episode (the one whose reading opened it).
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreAlert {
    pub book_device: String,
    pub out: Outgoing,
}

/// What one reading made of a patient's scores.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Scored {
    /// One row per configured version, when the reading changed an input.
    pub rows: Vec<NewScore>,
    /// Alert changes of the delivering versions (live, canary), in order.
    pub alerts: Vec<ScoreAlert>,
}

/// Scores the patient of `sample` after its reading (`sample.metrics` holds only its
/// plausible values; `sample.ts_ms` is its observed time), on the patient's `cohorts`
/// (the union over its devices: one role and one SpO2 scale per patient).
/// `state` is the patient's, updated in place.
pub fn on_vitals(
    scoring: &Scoring,
    state: &mut PatientScoreState,
    sample: &Sample,
    cohorts: &[&str],
    now_ms: u64,
) -> Scored {
    let out = Scored::default();
    if scoring.models.is_empty() || sample.patient_ref.is_empty() {
        return out;
    }
    let scale = scoring.spo2_scale(cohorts);
    let metrics = scoring.metrics();
    // The bridge's clock bounds the patient's: a device clock ahead (the clock policy
    // accepts some skew) must neither make the other devices' real-time readings look
    // older nor age the other parameters against a future instant. A reading observed
    // after `now_ms` is taken as observed at `now_ms`.
    let observed_ms = sample.ts_ms.min(now_ms);
    let clock = |state: &PatientScoreState| state.newest_ms().map(|t| t.min(now_ms));
    let inputs_of = |state: &PatientScoreState, table: &ScoreTable| {
        clock(state).map(|at| table.inputs_at(|k| state.value(k), at, scale))
    };
    let before: Vec<_> = scoring
        .models
        .iter()
        .map(|m| inputs_of(state, &m.table))
        .collect();
    let values = sample
        .metrics
        .iter()
        .filter(|(k, _)| metrics.contains(k.as_str()))
        .map(|(k, v)| (k.as_str(), *v));
    if !state.observe(
        values,
        &sample.event_id,
        observed_ms,
        sample.device.as_str(),
    ) {
        return out;
    }
    let after: Vec<_> = scoring
        .models
        .iter()
        .map(|m| inputs_of(state, &m.table))
        .collect();
    if before == after {
        return out;
    }
    let at_ms = clock(state).unwrap_or(observed_ms);
    score_all(scoring, state, sample, cohorts, at_ms, now_ms)
}

/// After a models reload, the patient's versions whose role changed hand over now
/// ([`hand_over`]) rather than at the patient's next reading that changes an input: a
/// stable patient's canary alert stayed open, and re-escalated, after a rollback. A
/// version that now delivers opens what the current score proves (it starts from no
/// episode). Scored at the patient's clock from the readings held, with `sample`
/// standing for the reload (its `event_id` names it, its device and site are those of
/// the patient's newest reading). Nothing (no rows) when no episode changed.
pub fn on_rollout(
    scoring: &Scoring,
    state: &mut PatientScoreState,
    sample: &Sample,
    cohorts: &[&str],
    now_ms: u64,
) -> Scored {
    let Some(at_ms) = state.newest_ms().map(|t| t.min(now_ms)) else {
        return Scored::default();
    };
    if scoring.models.is_empty() || sample.patient_ref.is_empty() {
        return Scored::default();
    }
    let before = state.episodes.clone();
    let out = score_all(scoring, state, sample, cohorts, at_ms, now_ms);
    if state.episodes == before {
        return Scored::default();
    }
    out
}

/// Every configured version's score of the patient at `at_ms`, its role's hand-over
/// and alert transition.
fn score_all(
    scoring: &Scoring,
    state: &mut PatientScoreState,
    sample: &Sample,
    cohorts: &[&str],
    at_ms: u64,
    now_ms: u64,
) -> Scored {
    let mut out = Scored::default();
    let scale = scoring.spo2_scale(cohorts);
    // Alerts a role change retires go out before any version opens its own.
    let mut retired = Vec::new();
    for (i, model) in scoring.models.iter().enumerate() {
        let table = &model.table;
        let inputs = table.inputs_at(|k| state.value(k), at_ms, scale);
        let role = scoring.role(i, &sample.site, cohorts);
        let s = score(table, &inputs);
        let score_id = row::score_id(
            &sample.patient_ref,
            table.model(),
            table.version(),
            &sample.event_id,
        );
        let evidence = used_inputs(table, state, at_ms, scale);
        // A canary still a canary for the scope its episode opened for: the patient
        // only left that scope (not a rollback).
        let canary_kept = |e: &Episode| {
            let cohorts: Vec<&str> = e.cohorts.iter().map(String::as_str).collect();
            vitalmq_policies::SiteId::new(&e.site)
                .is_ok_and(|site| scoring.role(i, &site, &cohorts) == Some(Role::Canary))
        };
        if let Some(retired_alert) = hand_over(
            state,
            role,
            &AlertCtx {
                table,
                role: Role::Live,
                sample,
                score_id: &score_id,
                score: &s,
                evidence: evidence.iter().map(|e| e.2.as_str()).collect(),
                now_ms,
                cohorts,
            },
            canary_kept,
        ) {
            retired.push(retired_alert);
        }
        let Some(role) = role else {
            continue;
        };
        let current = state
            .episodes
            .get(table.version())
            .and_then(|e| ScoreRule::parse(&e.rule));
        let t = transition(current, s.assessment);
        let mut shadow = None;
        if t != Transition::Unchanged {
            let ctx = AlertCtx {
                table,
                role,
                sample,
                score_id: &score_id,
                score: &s,
                evidence: evidence.iter().map(|e| e.2.as_str()).collect(),
                now_ms,
                cohorts,
            };
            let (changes, would_be) = apply(state, &ctx, t);
            if role.delivers() {
                out.alerts.extend(changes);
            } else {
                shadow = would_be;
            }
        }
        let payload = payload(
            &Payload {
                score_id: &score_id,
                table,
                role,
                sample,
                at_ms,
                score: &s,
                inputs: &evidence,
            },
            shadow,
        );
        out.rows.push(NewScore {
            score_id,
            patient_ref: sample.patient_ref.clone(),
            site: sample.site.to_string(),
            device: sample.device.to_string(),
            model: table.model().to_owned(),
            version: table.version().to_owned(),
            config_sha256: table.sha256().to_owned(),
            role: role.as_str().to_owned(),
            observed_at_ms: at_ms,
            created_at_ms: now_ms,
            payload,
        });
    }
    retired.append(&mut out.alerts);
    out.alerts = retired;
    out
}

/// The open score episodes of a patient none of whose version's inputs is still valid
/// at `now_ms` (a patient discharged or unassigned, a device stopped): resolved with
/// reason `no_data` (never `recovered`: missing parameters are no evidence of
/// recovery), as the tick finds them; otherwise such an episode would stay open, and
/// re-escalate, for ever. A shadow version's would-be episode is dropped without
/// output. `site_of` gives the site and SpO2 scale of an episode's device (`None`: the
/// device left the registry; the episode stays, and its book still re-escalates it).
/// The resolution names no score (`score_id` null): none produced it.
pub fn on_expiry(
    scoring: &Scoring,
    state: &mut PatientScoreState,
    patient_ref: &str,
    site_of: impl Fn(&str) -> Option<(vitalmq_policies::SiteId, vitalmq_policies::Spo2Scale)>,
    now_ms: u64,
) -> Vec<ScoreAlert> {
    let mut out = Vec::new();
    for model in &scoring.models {
        let table = &model.table;
        let Some(e) = state.episodes.get(table.version()) else {
            continue;
        };
        let Some((site, scale)) = site_of(&e.device) else {
            continue;
        };
        let Ok(device) = vitalmq_envelope::DeviceId::new(&e.device) else {
            continue;
        };
        if !used_inputs(table, state, now_ms, scale).is_empty() {
            continue;
        }
        let Some(e) = state.episodes.remove(table.version()) else {
            continue;
        };
        let was = e
            .role
            .as_deref()
            .and_then(Role::parse)
            .unwrap_or(Role::Live);
        let Some(rule) = ScoreRule::parse(&e.rule) else {
            continue;
        };
        if !was.delivers() {
            continue;
        }
        let sample = Sample {
            event_id: String::new(),
            device,
            site,
            patient_ref: patient_ref.to_owned(),
            ts_ms: now_ms,
            metrics: std::collections::BTreeMap::new(),
            implausible: Vec::new(),
            q: None,
            fw: String::new(),
            model: None,
        };
        let s = score(table, &table.inputs_at(|_| None, now_ms, scale));
        let ctx = AlertCtx {
            table,
            role: was,
            sample: &sample,
            score_id: "",
            score: &s,
            evidence: Vec::new(),
            now_ms,
            cohorts: &[],
        };
        out.push(change(&ctx, &e, rule, "resolved", Some("no_data")));
    }
    out
}

/// `(metric, value, event id, observed at)` of every reading a score used.
type Used = (String, f64, String, u64);

fn used_inputs(
    table: &ScoreTable,
    state: &PatientScoreState,
    at_ms: u64,
    scale: vitalmq_policies::Spo2Scale,
) -> Vec<Used> {
    let skip = match scale {
        vitalmq_policies::Spo2Scale::Scale1 => Parameter::Spo2Scale2,
        vitalmq_policies::Spo2Scale::Scale2 => Parameter::Spo2Scale1,
    };
    let mut out: Vec<Used> = Vec::new();
    for p in Parameter::ALL.into_iter().filter(|p| *p != skip) {
        let metric = table.metric(p);
        let Some(r) = state.latest.get(metric) else {
            continue;
        };
        let fresh = at_ms
            .checked_sub(r.observed_at_ms)
            .is_some_and(|age| u128::from(age) <= table.valid_for(p).as_millis());
        if fresh && !out.iter().any(|u| u.0 == metric) {
            out.push((
                metric.to_owned(),
                r.value,
                r.event_id.clone(),
                r.observed_at_ms,
            ));
        }
    }
    out
}

struct Payload<'a> {
    score_id: &'a str,
    table: &'a ScoreTable,
    role: Role,
    sample: &'a Sample,
    at_ms: u64,
    score: &'a Score,
    inputs: &'a [Used],
}

fn assessment_str(a: Assessment) -> &'static str {
    match a {
        Assessment::Exact(_) => "exact",
        Assessment::AtLeast(_) => "at_least",
        Assessment::Incomplete => "incomplete",
    }
}

/// `vitalmq-score/v1` (the shared design pins the fields), serialized straight from
/// typed fields: building it as a `serde_json::Value` first (an ordered map per object,
/// a `String` per key) was most of scoring's cost per reading (profiled: about 80% of
/// `on_vitals` in the bridge's recorder thread). The bytes are the same: fields in this
/// order, `alert` (a shadow row's would-be transition) last and only when there is one.
#[derive(Serialize)]
struct PayloadJson<'a> {
    format: &'static str,
    score_id: &'a str,
    model: &'a str,
    version: &'a str,
    config_sha256: &'a str,
    role: &'static str,
    patient_ref: &'a str,
    site: &'a str,
    device: &'a str,
    observed_at: Option<String>,
    aggregate: u32,
    risk: Option<&'static str>,
    complete: bool,
    assessment: &'static str,
    red: bool,
    sub_scores: SubScores<'a>,
    missing: Names<'a>,
    inputs: Vec<InputJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    alert: Option<ShadowAlert>,
}

/// `{"<parameter>": points}` in the score's (chart) order.
struct SubScores<'a>(&'a std::collections::BTreeMap<Parameter, u8>);

impl serde::Serialize for SubScores<'_> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.collect_map(self.0.iter().map(|(p, v)| (p.as_str(), v)))
    }
}

/// Parameter names, in order.
struct Names<'a>(&'a [Parameter]);

impl serde::Serialize for Names<'_> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.collect_seq(self.0.iter().map(|p| p.as_str()))
    }
}

#[derive(Serialize)]
struct InputJson<'a> {
    metric: &'a str,
    value: f64,
    event_id: &'a str,
    observed_at: Option<String>,
}

/// The would-be alert transition a shadow row records (`"alert"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct ShadowAlert {
    rule: &'static str,
    transition: &'static str,
    replaces: Option<&'static str>,
}

fn payload(p: &Payload<'_>, alert: Option<ShadowAlert>) -> String {
    let s = p.score;
    // The inputs of one reading share its observed time, and the newest is the score's:
    // each distinct instant is formatted once (RFC 3339 formatting was half the cost of
    // the payload).
    let mut times: Vec<(u64, Option<String>)> = Vec::with_capacity(4);
    let mut time = |ms: u64| {
        if let Some((_, t)) = times.iter().find(|(at, _)| *at == ms) {
            return t.clone();
        }
        let t = rfc3339_ms(ms);
        times.push((ms, t.clone()));
        t
    };
    let json = PayloadJson {
        format: "vitalmq-score/v1",
        score_id: p.score_id,
        model: p.table.model(),
        version: p.table.version(),
        config_sha256: p.table.sha256(),
        role: p.role.as_str(),
        patient_ref: &p.sample.patient_ref,
        site: p.sample.site.as_str(),
        device: p.sample.device.as_str(),
        observed_at: time(p.at_ms),
        aggregate: s.aggregate,
        risk: s.assessment.risk().map(|r| r.as_str()),
        complete: s.complete,
        assessment: assessment_str(s.assessment),
        red: s.any_red(),
        sub_scores: SubScores(&s.sub_scores),
        missing: Names(&s.missing),
        inputs: p
            .inputs
            .iter()
            .map(|(metric, value, event_id, at)| InputJson {
                metric,
                value: *value,
                event_id,
                observed_at: time(*at),
            })
            .collect(),
        alert,
    };
    serde_json::to_string(&json).expect("a score payload of strings and numbers serializes")
}

struct AlertCtx<'a> {
    table: &'a ScoreTable,
    role: Role,
    sample: &'a Sample,
    score_id: &'a str,
    score: &'a Score,
    evidence: Vec<&'a str>,
    now_ms: u64,
    /// The patient's cohorts (the scope an opened episode keeps).
    cohorts: &'a [&'a str],
}

/// Applies a transition to the version's episode: the alert changes (for a delivering
/// role) and the `"alert"` object a shadow row records instead.
fn apply(
    state: &mut PatientScoreState,
    ctx: &AlertCtx<'_>,
    t: Transition,
) -> (Vec<ScoreAlert>, Option<ShadowAlert>) {
    let version = ctx.table.version();
    let mut changes = Vec::new();
    let (rule, transition, replaces) = match t {
        Transition::Unchanged => return (changes, None),
        Transition::Resolve { from } => {
            if let Some(e) = state.episodes.remove(version) {
                changes.push(change(ctx, &e, from, "resolved", Some("recovered")));
            }
            (from, "resolved", None)
        }
        Transition::Open { from, to } => {
            if let Some(from) = from
                && let Some(e) = state.episodes.remove(version)
            {
                changes.push(change(ctx, &e, from, "resolved", Some("superseded")));
            }
            let e = Episode {
                rule: to.id().to_owned(),
                alert_id: row::alert_id(
                    &ctx.sample.patient_ref,
                    version,
                    to.id(),
                    &ctx.sample.event_id,
                ),
                device: ctx.sample.device.to_string(),
                opened_at_ms: ctx.now_ms,
                role: Some(ctx.role.as_str().to_owned()),
                site: ctx.sample.site.to_string(),
                cohorts: ctx.cohorts.iter().map(|c| (*c).to_owned()).collect(),
            };
            changes.push(change(ctx, &e, to, "open", None));
            state.episodes.insert(version.to_owned(), e);
            (to, "open", from)
        }
    };
    let shadow = ShadowAlert {
        rule: rule.id(),
        transition,
        replaces: replaces.map(ScoreRule::id),
    };
    (changes, Some(shadow))
}

/// A version's episode when its role changed since it opened (a reload of the models
/// file changed the rollout), at the patient's first score after it, like a removed
/// rule's alert at the device's next sample:
/// - it delivered and no longer does (canary rolled back, live replaced by a canary or
///   another live version, version taken out): its alert is resolved, reason
///   `model_rollback` when it was a canary's and the rollout no longer makes the
///   version a canary for the scope (site, cohorts) the episode opened for, else
///   `rollout_changed` (also when the patient only left that scope), so no subscriber
///   keeps an alert nobody will resolve;
/// - it did not deliver (shadow) and now does: its would-be episode is dropped, never
///   resolved (its alert id was never delivered). The version starts from no episode,
///   so the same score opens a delivered alert at once if it proves one;
/// - a version that no longer runs drops its would-be episode too.
///
/// `ctx.role` is ignored: the resolution names the role the alert was delivered under.
fn hand_over(
    state: &mut PatientScoreState,
    now: Option<Role>,
    ctx: &AlertCtx<'_>,
    canary_kept: impl Fn(&Episode) -> bool,
) -> Option<ScoreAlert> {
    let version = ctx.table.version();
    let e = state.episodes.get(version)?;
    let was = e.role.as_deref().and_then(Role::parse);
    let delivers_now = now.is_some_and(Role::delivers);
    let delivered = was.map_or(delivers_now, Role::delivers);
    if delivered == delivers_now && now.is_some() {
        return None;
    }
    let e = state.episodes.remove(version)?;
    if !delivered {
        return None;
    }
    let was = was.unwrap_or(Role::Live);
    let rule = ScoreRule::parse(&e.rule)?;
    let reason = if was == Role::Canary && !canary_kept(&e) {
        "model_rollback"
    } else {
        "rollout_changed"
    };
    let ctx = AlertCtx {
        role: was,
        evidence: ctx.evidence.clone(),
        ..*ctx
    };
    Some(change(&ctx, &e, rule, "resolved", Some(reason)))
}

/// The threshold the rule stands for: the lowest aggregate of its risk band, or the
/// red score when a single red parameter (not the aggregate) proves `news2-medium`.
fn threshold(table: &ScoreTable, rule: ScoreRule, s: &Score) -> Option<u32> {
    match (rule, s.assessment.risk()) {
        (ScoreRule::Medium, Some(Risk::LowMedium)) => Some(u32::from(table.red_score())),
        (ScoreRule::Medium, _) => table.risk_min(Risk::Medium),
        (ScoreRule::High, _) => table.risk_min(Risk::High),
    }
}

/// One alert change: the clinical alert fields of SPEC section 5 in their order, then
/// the score's. `metric` is the model, `value` and `measured` the aggregate, and
/// `threshold` the aggregate band's lower bound the rule stands for.
fn change(
    ctx: &AlertCtx<'_>,
    e: &Episode,
    rule: ScoreRule,
    state: &str,
    reason: Option<&str>,
) -> ScoreAlert {
    let s = ctx.score;
    let severity = rule.severity();
    let device = e.device.as_str();
    let mut body = json!({
        "alert_id": e.alert_id,
        "kind": "clinical",
        "state": state,
        "severity": severity.as_str(),
        "rule": rule.id(),
        "rule_version": ctx.table.version(),
        "policy_sha256": ctx.table.sha256(),
        "device": device,
        "site": ctx.sample.site.as_str(),
        "patient_ref": ctx.sample.patient_ref,
        "metric": ctx.table.model(),
        "value": s.aggregate,
        "threshold": threshold(ctx.table, rule, s),
        "window_s": ctx.now_ms.saturating_sub(e.opened_at_ms) / 1000,
        "evidence": ctx.evidence,
        "fw": ctx.sample.fw,
        "model": ctx.sample.model,
        "raised_at": rfc3339_ms(ctx.sample.ts_ms),
        "measure": "score",
        "measured": s.aggregate,
        "source": "score",
        "role": ctx.role.as_str(),
        "score_id": (!ctx.score_id.is_empty()).then_some(ctx.score_id),
        "score": {
            "model": ctx.table.model(),
            "version": ctx.table.version(),
            "aggregate": s.aggregate,
            "risk": s.assessment.risk().map(|r| r.as_str()),
            "assessment": assessment_str(s.assessment),
            "complete": s.complete,
            "red": s.red.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
            "missing": s.missing.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
        },
    });
    if let (Some(r), Json::Object(m)) = (reason, &mut body) {
        m.insert("reason".into(), json!(r));
    }
    ScoreAlert {
        book_device: device.to_owned(),
        out: Outgoing {
            alert_id: e.alert_id.clone(),
            state: state.to_owned(),
            kind: "clinical",
            topic: format!(
                "alerts/{}/{}/{}",
                ctx.sample.site,
                severity.as_str(),
                device
            ),
            device: device.to_owned(),
            rule: Some(rule.id().to_owned()),
            severity: Some(severity),
            body: body.to_string(),
            level: 0,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEWS2: &str = include_str!("../../../policies/examples/news2.toml");

    /// The payload as it was built before it was serialized from typed fields: a
    /// `serde_json::Value` (ordered keys), `alert` appended to a shadow row.
    fn payload_as_value(p: &Payload<'_>, alert: Option<&ShadowAlert>) -> String {
        let s = p.score;
        let mut v = json!({
            "format": "vitalmq-score/v1",
            "score_id": p.score_id,
            "model": p.table.model(),
            "version": p.table.version(),
            "config_sha256": p.table.sha256(),
            "role": p.role.as_str(),
            "patient_ref": p.sample.patient_ref,
            "site": p.sample.site.as_str(),
            "device": p.sample.device.as_str(),
            "observed_at": rfc3339_ms(p.at_ms),
            "aggregate": s.aggregate,
            "risk": s.assessment.risk().map(|r| r.as_str()),
            "complete": s.complete,
            "assessment": assessment_str(s.assessment),
            "red": s.any_red(),
            "sub_scores": s.sub_scores.iter()
                .map(|(p, v)| (p.as_str().to_owned(), json!(v)))
                .collect::<serde_json::Map<_, _>>(),
            "missing": s.missing.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
            "inputs": p.inputs.iter().map(|(metric, value, event_id, at)| json!({
                "metric": metric,
                "value": value,
                "event_id": event_id,
                "observed_at": rfc3339_ms(*at),
            })).collect::<Vec<_>>(),
        });
        if let (Some(a), Json::Object(m)) = (alert, &mut v) {
            m.insert(
                "alert".into(),
                json!({"rule": a.rule, "transition": a.transition, "replaces": a.replaces}),
            );
        }
        v.to_string()
    }

    fn sample() -> Sample {
        Sample {
            event_id: "ev-1".into(),
            device: vitalmq_envelope::DeviceId::new("dev-000001").expect("device"),
            site: vitalmq_policies::SiteId::new("site-01").expect("site"),
            patient_ref: "pt-\"quoted\"\u{e9}".into(),
            ts_ms: 1_764_000_000_123,
            metrics: std::collections::BTreeMap::new(),
            implausible: Vec::new(),
            q: None,
            fw: String::new(),
            model: None,
        }
    }

    /// Same bytes as the `Value` it replaced, for complete and partial scores, with and
    /// without a shadow row's `alert`: stored payloads, their digests and every reader
    /// (`models compare`, surveillance) see no change.
    #[test]
    fn typed_payload_is_byte_identical_to_the_value_it_replaced() {
        let table = ScoreTable::parse(NEWS2, std::path::Path::new("news2.toml")).expect("chart");
        let sample = sample();
        let full: Vec<Used> = [
            ("resp", 24.0),
            ("spo2", 93.5),
            ("o2", 1.0),
            ("sbp", 101.0),
            ("pulse", 131.0),
            ("acvpu", 0.0),
            ("temp", 38.25),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, (m, v))| {
            (
                m.to_owned(),
                v,
                format!("ev-{i}"),
                1_764_000_000_000 + i as u64,
            )
        })
        .collect();
        // One reading's inputs share its observed time (formatted once), the newest
        // being the score's own.
        let mut shared = full.clone();
        for (i, u) in shared.iter_mut().enumerate() {
            u.3 = if i % 2 == 0 {
                1_764_000_000_100
            } else {
                1_764_000_000_000
            };
        }
        for inputs in [&full[..], &shared[..], &full[..2], &[][..]] {
            let state = PatientScoreState {
                latest: inputs
                    .iter()
                    .map(|(m, v, e, at)| {
                        (
                            m.clone(),
                            super::super::state::Reading {
                                value: *v,
                                event_id: e.clone(),
                                observed_at_ms: *at,
                                device: "dev-000001".into(),
                            },
                        )
                    })
                    .collect(),
                episodes: Default::default(),
            };
            let at_ms = 1_764_000_000_100;
            let s = score(
                &table,
                &table.inputs_at(
                    |k| state.value(k),
                    at_ms,
                    vitalmq_policies::Spo2Scale::Scale1,
                ),
            );
            for (role, alert) in [
                (Role::Live, None),
                (
                    Role::Shadow,
                    Some(ShadowAlert {
                        rule: "news2-high",
                        transition: "open",
                        replaces: Some("news2-medium"),
                    }),
                ),
                (
                    Role::Shadow,
                    Some(ShadowAlert {
                        rule: "news2-medium",
                        transition: "resolved",
                        replaces: None,
                    }),
                ),
            ] {
                let p = Payload {
                    score_id: "sc-0123",
                    table: &table,
                    role,
                    sample: &sample,
                    at_ms,
                    score: &s,
                    inputs,
                };
                assert_eq!(
                    payload(&p, alert.clone()),
                    payload_as_value(&p, alert.as_ref())
                );
            }
        }
    }
}
