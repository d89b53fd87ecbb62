//! [`evaluate`]: one sample of one device against the rule set, as a state machine per
//! rule (see the module doc of `alerts` for the decisions it implements).
//!
//! Order of work for a sample, and so the order of the changes it returns:
//! 0. sensor fault: the device's operational alert for implausible values opens,
//!    counts or resolves (whatever the reading's time);
//! 1. time: a late reading is ignored, a device clock reset restarts the runs;
//! 2. reconciliation: open alerts of rules that left the rule set or changed what they
//!    measure are resolved, and their state dropped;
//! 3. signal quality: the device's operational alert opens or resolves;
//! 4. the rules in file order: each reading a rule can use (its metric present and
//!    finite, `q` at least the rule's `min_quality`) moves the rule's state machine:
//!
//! ```text
//!   quiet:      trigger holds -> pending run; persisted  -> OPEN (then ESCALATED at
//!               once if it is already past the escalation threshold)
//!   open:       past escalation threshold, or open after_s and not resolving
//!                                                        -> ESCALATED
//!   open/esc.:  past resolve threshold -> resolve run; held resolve_after_s -> RESOLVED
//!               trigger holds, nothing sent              -> suppressed += 1
//! ```

use vitalmq_policies::{
    AlertRule, ChangeDirection, DeviationSide, Measure, QualityPolicy, RuleParams, RuleSet,
};

use super::Sample;
use super::measure::{Baseline, ChangeWindow};
use super::message::{
    AlertChange, AlertState, ClinicalAlert, EscalationCause, OperationalAlert, OpsAlertType,
    ResolveReason, SensorFaultCounts, SuppressionReason, alert_id,
};
use super::state::{
    DeviceAlertState, EngineState, Episode, OpsEpisode, RuleState, Run, push_bounded,
};

/// A reading this much older than the newest one means the device clock was reset.
pub const CLOCK_RESET_MS: u64 = 10 * 60 * 1000;

/// The rule name of the operational signal-quality alert (in alert ids and
/// [`OpenAlert`](super::OpenAlert)); rule ids cannot contain `/`, so it never collides.
pub(crate) const SIGNAL_QUALITY_RULE: &str = "ops/signal_quality";
/// The rule name of the operational sensor-fault alert.
pub(crate) const SENSOR_FAULT_RULE: &str = "ops/sensor_fault";

/// Evaluates one sample of one device and returns the alert changes to publish, in order.
///
/// `policy_sha256` is the hash recorded in every alert: the policy in force (for example
/// [`RuleSet::sha256`], or a digest over all policy files). `state` must be this
/// device's; a state built under an older rule set is reconciled first.
pub fn evaluate(
    rules: &RuleSet,
    policy_sha256: &str,
    state: &mut DeviceAlertState,
    sample: &Sample,
) -> Vec<AlertChange> {
    let resolve_after = rules.plausibility().resolve_after;
    evaluate_engine(
        rules,
        policy_sha256,
        resolve_after,
        &mut state.engine,
        sample,
    )
}

/// [`evaluate`] on the engine state of one rule-set version (the delivering one, or a
/// shadow: the engine cannot tell them apart). `sensor_resolve_after` is the
/// `[plausibility] resolve_after` of the rule set that flags implausible readings (the
/// base's: a candidate governs its rules and quality only).
pub fn evaluate_engine(
    rules: &RuleSet,
    policy_sha256: &str,
    sensor_resolve_after: u32,
    state: &mut EngineState,
    sample: &Sample,
) -> Vec<AlertChange> {
    let mut out = Vec::new();
    let cx = Context {
        policy_sha256,
        sample,
    };
    // Before the time check: an implausible value counts even in a late reading.
    sensor_fault(sensor_resolve_after, state, &cx, &mut out);
    let ts = sample.ts_ms;
    if let Some(newest) = state.newest_ts_ms
        && ts < newest
    {
        if newest - ts <= CLOCK_RESET_MS {
            state.late_ignored = state.late_ignored.saturating_add(1);
            return out;
        }
        for rule in state.rules.values_mut() {
            rule.restart_clock(ts);
        }
    }
    state.newest_ts_ms = Some(ts);
    reconcile(rules, state, &cx, &mut out);
    quality(rules.quality(), state, &cx, &mut out);
    for rule in rules.rules() {
        let Some(value) = sample
            .metrics
            .get(rule.metric())
            .copied()
            .filter(|v| v.is_finite())
        else {
            continue;
        };
        let params = rule.params_for(&sample.device, &sample.site);
        let usable = sample.q.is_none_or(|q| q >= params.min_quality);
        if !usable {
            continue;
        }
        let rs = match state.rules.get_mut(rule.id()) {
            Some(rs) => rs,
            None => state
                .rules
                .entry(rule.id().to_owned())
                .or_insert_with(|| RuleState::new(signature(rule))),
        };
        step(rule, params, rs, value, &cx, &mut out);
    }
    out
}

struct Context<'a> {
    policy_sha256: &'a str,
    sample: &'a Sample,
}

/// What a rule measures; a state built for another signature belongs to another rule.
/// Overrides cannot change it (the rule set validates that), so the rule's own
/// parameters decide.
fn signature(rule: &AlertRule) -> String {
    let params = rule.base();
    let direction = match params.measure {
        Measure::Value if params.trigger.op.is_low() => "low",
        Measure::Value => "high",
        Measure::Change {
            direction: ChangeDirection::Fall,
            ..
        } => "fall",
        Measure::Change {
            direction: ChangeDirection::Rise,
            ..
        } => "rise",
        Measure::Deviation {
            side: DeviationSide::Either,
            ..
        } => "either",
        Measure::Deviation {
            side: DeviationSide::Above,
            ..
        } => "above",
        Measure::Deviation {
            side: DeviationSide::Below,
            ..
        } => "below",
        _ => "other",
    };
    format!("{}:{}:{direction}", rule.kind().as_str(), rule.metric())
}

/// Resolves and drops the state of rules that are gone or changed.
fn reconcile(
    rules: &RuleSet,
    state: &mut EngineState,
    cx: &Context<'_>,
    out: &mut Vec<AlertChange>,
) {
    let sample = cx.sample;
    state.rules.retain(|id, rs| {
        let reason = match rules.rule(id) {
            None => ResolveReason::RuleRemoved,
            Some(rule) if signature(rule) == rs.signature => return true,
            Some(_) => ResolveReason::RuleChanged,
        };
        if let Some(e) = rs.episode.take() {
            out.push(resolved(e, id, reason, cx.policy_sha256, sample));
        }
        false
    });
}

/// The resolution of an open episode the engine will not carry on (its rule left the
/// rule set, or its rule-set version stopped delivering): `value` is the sample's
/// reading of the metric, if any.
pub(super) fn resolved(
    e: Episode,
    rule: &str,
    reason: ResolveReason,
    policy_sha256: &str,
    sample: &Sample,
) -> AlertChange {
    let value = sample
        .metrics
        .get(&e.metric)
        .copied()
        .filter(|v| v.is_finite());
    AlertChange::Clinical(Box::new(ClinicalAlert {
        alert_id: e.alert_id,
        state: AlertState::Resolved,
        severity: e.severity,
        rule: rule.to_owned(),
        rule_version: e.rule_version,
        policy_sha256: policy_sha256.to_owned(),
        device: sample.device.clone(),
        site: sample.site.clone(),
        patient_ref: sample.patient_ref.clone(),
        metric: e.metric,
        value,
        measure: "value",
        measured: value,
        baseline: None,
        threshold: e.threshold,
        window_s: seconds_between(e.opened_at_ms, sample.ts_ms),
        evidence: Vec::new(),
        fw: sample.fw.clone(),
        model: sample.model.clone(),
        raised_at_ms: sample.ts_ms,
        escalation: None,
        resolution: Some(reason),
        suppressed: Some(e.suppressed.counts()),
        delivered_by: None,
    }))
}

/// The resolution of an open operational episode (signal quality or sensor fault) of
/// a rule-set version that stops running for the device as a shadow: nothing resolves
/// it any more, so it ends here, saying why.
pub(super) fn ops_resolved(
    alert_type: OpsAlertType,
    e: OpsEpisode,
    state: &EngineState,
    policy_sha256: &str,
    sample: &Sample,
) -> AlertChange {
    let sensor = (alert_type == OpsAlertType::SensorFault).then(|| {
        Box::new(SensorFaultCounts {
            implausible: state.sensor.implausible,
            metrics: state.sensor.metrics.clone(),
            resolve_after: 0,
        })
    });
    AlertChange::Operational(OperationalAlert {
        alert_id: e.alert_id,
        alert_type,
        state: AlertState::Resolved,
        device: sample.device.clone(),
        site: sample.site.clone(),
        reason: format!(
            "{}: this rule-set version no longer runs in shadow for the device",
            ResolveReason::RolloutChanged.as_str()
        ),
        low_quality: state.quality.bits.count_ones(),
        over_n: 0,
        low_below: 0.0,
        policy_sha256: policy_sha256.to_owned(),
        evidence: vec![sample.event_id.clone()],
        raised_at_ms: sample.ts_ms,
        sensor,
        delivered_by: None,
    })
}

/// The device's signal-quality ring and its operational alert.
fn quality(
    policy: &QualityPolicy,
    state: &mut EngineState,
    cx: &Context<'_>,
    out: &mut Vec<AlertChange>,
) {
    let sample = cx.sample;
    let q = &mut state.quality;
    let n = policy.over_n.min(64);
    let mask = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
    q.bits = ((q.bits << 1) | u64::from(policy.is_low(sample.q))) & mask;
    let low = q.bits.count_ones();
    let change = |state: AlertState, alert_id: String, reason: String| {
        AlertChange::Operational(OperationalAlert {
            alert_id,
            alert_type: OpsAlertType::SignalQuality,
            state,
            device: sample.device.clone(),
            site: sample.site.clone(),
            reason,
            low_quality: low,
            over_n: n,
            low_below: policy.low_below,
            policy_sha256: cx.policy_sha256.to_owned(),
            evidence: vec![sample.event_id.clone()],
            raised_at_ms: sample.ts_ms,
            sensor: None,
            delivered_by: None,
        })
    };
    match &q.open {
        None if policy.raises(low) => {
            let id = alert_id(&sample.device, SIGNAL_QUALITY_RULE, &sample.event_id);
            q.open = Some(OpsEpisode {
                alert_id: id.clone(),
                opened_at_ms: sample.ts_ms,
            });
            out.push(change(
                AlertState::Open,
                id,
                format!(
                    "{low} of the last {n} readings have signal quality below {}: clinical rules ignore them",
                    policy.low_below
                ),
            ));
        }
        Some(open) if policy.resolves(low) => {
            let id = open.alert_id.clone();
            q.open = None;
            out.push(change(
                AlertState::Resolved,
                id,
                format!("signal quality recovered: {low} of the last {n} readings are low"),
            ));
        }
        _ => {}
    }
}

/// The device's implausible readings and its operational sensor-fault alert: opens at
/// the first implausible value, counts them while open, resolves after `resolve_after`
/// readings in a row without one.
fn sensor_fault(
    resolve_after: u32,
    state: &mut EngineState,
    cx: &Context<'_>,
    out: &mut Vec<AlertChange>,
) {
    let sample = cx.sample;
    let s = &mut state.sensor;
    let faulty = !sample.implausible.is_empty();
    let change = |state: AlertState, alert_id: String, reason: String, counts| {
        AlertChange::Operational(OperationalAlert {
            alert_id,
            alert_type: OpsAlertType::SensorFault,
            state,
            device: sample.device.clone(),
            site: sample.site.clone(),
            reason,
            low_quality: 0,
            over_n: 0,
            low_below: 0.0,
            policy_sha256: cx.policy_sha256.to_owned(),
            evidence: vec![sample.event_id.clone()],
            raised_at_ms: sample.ts_ms,
            sensor: Some(Box::new(counts)),
            delivered_by: None,
        })
    };
    match &s.open {
        None if faulty => {
            let id = alert_id(&sample.device, SENSOR_FAULT_RULE, &sample.event_id);
            s.open = Some(OpsEpisode {
                alert_id: id.clone(),
                opened_at_ms: sample.ts_ms,
            });
            s.implausible = 1;
            s.clean_run = 0;
            s.metrics.clone_from(&sample.implausible);
            out.push(change(
                AlertState::Open,
                id,
                format!(
                    "reading outside the physiological limits of {}: clinical rules ignore the value",
                    s.metrics.join(", ")
                ),
                SensorFaultCounts {
                    implausible: 1,
                    metrics: s.metrics.clone(),
                    resolve_after,
                },
            ));
        }
        Some(_) if faulty => {
            s.implausible = s.implausible.saturating_add(1);
            s.clean_run = 0;
            for m in &sample.implausible {
                if !s.metrics.contains(m) && s.metrics.len() < 64 {
                    s.metrics.push(m.clone());
                }
            }
            s.metrics.sort();
        }
        Some(open) => {
            s.clean_run = s.clean_run.saturating_add(1);
            if s.clean_run >= u64::from(resolve_after) {
                let id = open.alert_id.clone();
                let counts = SensorFaultCounts {
                    implausible: s.implausible,
                    metrics: std::mem::take(&mut s.metrics),
                    resolve_after,
                };
                *s = Default::default();
                out.push(change(
                    AlertState::Resolved,
                    id,
                    format!("{resolve_after} readings in a row within the physiological limits"),
                    counts,
                ));
            }
        }
        None => {}
    }
}

/// One usable reading through one rule's state machine.
fn step(
    rule: &AlertRule,
    params: &RuleParams,
    rs: &mut RuleState,
    value: f64,
    cx: &Context<'_>,
    out: &mut Vec<AlertChange>,
) {
    let sample = cx.sample;
    let ts = sample.ts_ms;
    let measured = match params.measure {
        Measure::Change {
            direction,
            within_s,
        } => rs
            .change
            .get_or_insert_with(|| ChangeWindow::new(within_s))
            .observe(ts, value, direction, within_s),
        Measure::Deviation { side, window_s } => match &rs.baseline {
            Some(b) => b.deviation(value, side, window_s),
            None => None,
        },
        Measure::Value => Some(value),
        // A measure this engine does not know never triggers.
        _ => None,
    };
    let baseline = rs.baseline.as_ref().map(Baseline::mean);
    let Some(m) = measured else {
        learn(params, rs, ts, value);
        return;
    };
    let triggered = params.trigger.holds(m);
    let msg = |alert_id: &str, state, severity, threshold, window_s, evidence| ClinicalAlert {
        alert_id: alert_id.to_owned(),
        state,
        severity,
        rule: rule.id().to_owned(),
        rule_version: rule.version().to_owned(),
        policy_sha256: cx.policy_sha256.to_owned(),
        device: sample.device.clone(),
        site: sample.site.clone(),
        patient_ref: sample.patient_ref.clone(),
        metric: rule.metric().to_owned(),
        value: Some(value),
        measure: params.measure.name(),
        measured: Some(m),
        baseline: matches!(params.measure, Measure::Deviation { .. })
            .then_some(baseline)
            .flatten(),
        threshold,
        window_s,
        evidence,
        fw: sample.fw.clone(),
        model: sample.model.clone(),
        raised_at_ms: ts,
        escalation: None,
        resolution: None,
        suppressed: None,
        delivered_by: None,
    };

    if rs.episode.is_some() {
        learn(params, rs, ts, value);
    }
    let Some(episode) = &mut rs.episode else {
        // Quiet: persistence toward opening.
        if !rs
            .pending
            .observe(params.persist, triggered, ts, &sample.event_id)
        {
            if !triggered {
                learn(params, rs, ts, value);
            }
            return;
        }
        let run = rs.pending.run.take().unwrap_or_else(|| Run::new(ts));
        rs.pending = Default::default();
        let id = alert_id(&sample.device, rule.id(), &sample.event_id);
        let open = msg(
            &id,
            AlertState::Open,
            params.severity,
            params.trigger.at,
            seconds_between(run.since_ms, ts),
            run.evidence.clone(),
        );
        out.push(AlertChange::Clinical(Box::new(open)));
        let mut episode = Episode {
            alert_id: id,
            state: AlertState::Open,
            severity: params.severity,
            rule_version: rule.version().to_owned(),
            metric: rule.metric().to_owned(),
            threshold: params.trigger.at,
            opened_at_ms: ts,
            evidence: run.evidence,
            suppressed: Default::default(),
        };
        if let Some(esc) = params.escalate
            && let Some(beyond) = esc.beyond
            && beyond.holds(m)
        {
            let mut up = msg(
                &episode.alert_id,
                AlertState::Escalated,
                esc.to,
                beyond.at,
                0,
                episode.evidence.clone(),
            );
            up.escalation = Some(EscalationCause::Worse);
            out.push(AlertChange::Clinical(Box::new(up)));
            episode.state = AlertState::Escalated;
            episode.severity = esc.to;
        }
        rs.episode = Some(episode);
        return;
    };

    // Open or escalated.
    episode.rule_version = rule.version().to_owned();
    if params.resolve.holds(m) {
        let run = rs.resolving.get_or_insert_with(|| Run::new(ts));
        run.push(&sample.event_id);
        if ts.saturating_sub(run.since_ms) < params.resolve_after_s.saturating_mul(1000) {
            return;
        }
        let mut done = msg(
            &episode.alert_id,
            AlertState::Resolved,
            episode.severity,
            params.resolve.at,
            seconds_between(episode.opened_at_ms, ts),
            run.evidence.clone(),
        );
        done.resolution = Some(ResolveReason::Recovered);
        done.suppressed = Some(episode.suppressed.counts());
        out.push(AlertChange::Clinical(Box::new(done)));
        rs.episode = None;
        rs.resolving = None;
        rs.pending = Default::default();
        return;
    }
    rs.resolving = None;
    if triggered {
        push_bounded(&mut episode.evidence, &sample.event_id);
    }
    let cause = match params.escalate {
        Some(esc) if episode.state == AlertState::Open => {
            if esc.beyond.is_some_and(|b| b.holds(m)) {
                Some((EscalationCause::Worse, esc))
            } else if esc
                .after_s
                .is_some_and(|a| ts.saturating_sub(episode.opened_at_ms) >= a.saturating_mul(1000))
            {
                Some((EscalationCause::Persisting, esc))
            } else {
                None
            }
        }
        _ => None,
    };
    if let Some((cause, esc)) = cause {
        let threshold = match (cause, esc.beyond) {
            (EscalationCause::Worse, Some(b)) => b.at,
            _ => params.trigger.at,
        };
        let mut evidence = episode.evidence.clone();
        if !triggered {
            push_bounded(&mut evidence, &sample.event_id);
        }
        let mut up = msg(
            &episode.alert_id,
            AlertState::Escalated,
            esc.to.max(episode.severity),
            threshold,
            seconds_between(episode.opened_at_ms, ts),
            evidence,
        );
        up.escalation = Some(cause);
        episode.state = AlertState::Escalated;
        episode.severity = up.severity;
        out.push(AlertChange::Clinical(Box::new(up)));
    } else if triggered {
        episode.suppressed.count(match episode.state {
            AlertState::Open => SuppressionReason::AlreadyOpen,
            _ => SuppressionReason::AlreadyEscalated,
        });
    }
}

/// Teaches a baseline rule's average. Not while the trigger holds and the alert is not
/// yet open: the event must not teach itself away before it is caught. While an alert is
/// open it learns, so a new level becomes the patient's baseline within about one window
/// and the alert resolves: a baseline rule reports a change; levels are for threshold
/// rules. (Frozen during the alert, a baseline learnt before a patient's recovery would
/// keep the alert open for ever.)
fn learn(params: &RuleParams, rs: &mut RuleState, ts: u64, value: f64) {
    let Measure::Deviation { window_s, .. } = params.measure else {
        return;
    };
    if rs.episode.is_none() && rs.pending.run.is_some() {
        return;
    }
    match &mut rs.baseline {
        Some(b) => b.learn(ts, value, window_s),
        None => rs.baseline = Some(Baseline::new(ts, value)),
    }
}

/// Whole seconds from `from_ms` to `to_ms`, 0 if `to_ms` is earlier.
fn seconds_between(from_ms: u64, to_ms: u64) -> u64 {
    to_ms.saturating_sub(from_ms) / 1000
}
