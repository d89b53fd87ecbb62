//! Validation of a raw rule file into a [`RuleSet`]: every problem is reported with file,
//! line and field, all at once. Overrides are checked as their rule with the override
//! laid over it ([`Merged`]), and a problem is blamed on the field the override set.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use toml::Spanned;
use vitalmq_envelope::DeviceId;

use super::raw::{RawBaseline, RawEscalate, RawFile, RawParams, RawPersist, RawQuality, RawRate};
use super::{
    AlertRule, ChangeDirection, CohortOverride, Compare, CompareOp, DeviationSide, Escalation,
    FORMAT, MAX_N, MAX_SECONDS, MIN_BASELINE_S, Measure, Persist, QualityPolicy, RuleKind,
    RuleParams, RuleSet, Severity,
};
use crate::error::Problems;
use crate::registry::SiteId;

/// A raw value with the dotted field path it was written at, and whether an override
/// set it.
#[derive(Debug)]
struct Field<'a, T> {
    raw: &'a Spanned<T>,
    path: String,
    overridden: bool,
}

impl<T> Field<'_, T> {
    fn get(&self) -> &T {
        self.raw.get_ref()
    }

    fn at(&self) -> Spot {
        Spot {
            span: Some(self.raw.span()),
            path: self.path.clone(),
            overridden: self.overridden,
        }
    }

    /// A field inside this (table) field.
    fn inner<'b, U>(&self, raw: &'b Spanned<U>, name: &str) -> Field<'b, U> {
        Field {
            raw,
            path: format!("{}.{name}", self.path),
            overridden: self.overridden,
        }
    }
}

/// Where to report a problem.
#[derive(Debug, Clone)]
struct Spot {
    span: Option<Range<usize>>,
    path: String,
    overridden: bool,
}

/// A rule's parameters with an override laid over them.
#[derive(Debug)]
struct Merged<'a> {
    severity: Option<Field<'a, String>>,
    below: Option<Field<'a, f64>>,
    at_or_below: Option<Field<'a, f64>>,
    above: Option<Field<'a, f64>>,
    at_or_above: Option<Field<'a, f64>>,
    resolve_at: Option<Field<'a, f64>>,
    resolve_after_s: Option<Field<'a, u64>>,
    persist: Option<Field<'a, RawPersist>>,
    rate: Option<Field<'a, RawRate>>,
    baseline: Option<Field<'a, RawBaseline>>,
    min_quality: Option<Field<'a, f64>>,
    escalate: Option<Field<'a, RawEscalate>>,
}

impl<'a> Merged<'a> {
    fn new(base: &'a RawParams, base_path: &str, over: Option<(&'a RawParams, &str)>) -> Self {
        macro_rules! pick {
            ($name:ident) => {
                over.and_then(|(o, path)| {
                    o.$name.as_ref().map(|raw| Field {
                        raw,
                        path: format!("{path}.{}", stringify!($name)),
                        overridden: true,
                    })
                })
                .or_else(|| {
                    base.$name.as_ref().map(|raw| Field {
                        raw,
                        path: format!("{base_path}.{}", stringify!($name)),
                        overridden: false,
                    })
                })
            };
        }
        Self {
            severity: pick!(severity),
            below: pick!(below),
            at_or_below: pick!(at_or_below),
            above: pick!(above),
            at_or_above: pick!(at_or_above),
            resolve_at: pick!(resolve_at),
            resolve_after_s: pick!(resolve_after_s),
            persist: pick!(persist),
            rate: pick!(rate),
            baseline: pick!(baseline),
            min_quality: pick!(min_quality),
            escalate: pick!(escalate),
        }
    }
}

/// Reports problems of one parameter set. When checking an override, a problem is
/// reported only if the override set one of the fields involved (the rule's own problems
/// are reported once, for the rule), and it is placed at the field the override set.
struct Checker<'p, 'x> {
    problems: &'p mut Problems<'x>,
    /// Where problems without a field (something missing) are placed.
    context: Spot,
    is_override: bool,
    found: bool,
}

impl Checker<'_, '_> {
    fn report(&mut self, involved: &[Spot], message: impl Into<String>) {
        let blamed = if self.is_override {
            involved.iter().find(|s| s.overridden)
        } else {
            involved.first()
        };
        if let Some(spot) = blamed {
            self.problems
                .add(spot.span.clone(), spot.path.clone(), message);
            self.found = true;
        }
    }

    /// Something the rule lacks. Overrides cannot remove fields, so what is missing was
    /// missing in the rule and is reported there, once.
    fn missing(&mut self, message: impl Into<String>) {
        if self.is_override {
            return;
        }
        self.problems.add(
            self.context.span.clone(),
            self.context.path.clone(),
            message,
        );
        self.found = true;
    }
}

pub(super) fn validate(raw: RawFile, set: &mut RuleSet, problems: &mut Problems<'_>) {
    if raw.format.get_ref() != FORMAT {
        problems.add(
            Some(raw.format.span()),
            "format",
            format!("expected \"{FORMAT}\""),
        );
    }
    if let Err(why) = check_name(raw.version.get_ref(), 64) {
        problems.add(Some(raw.version.span()), "version", why.to_string());
    }
    set.version = raw.version.get_ref().clone();
    set.quality = validate_quality(raw.quality.get_ref(), problems);
    set.plausibility = super::readings::validate_plausibility(raw.plausibility.as_ref(), problems);
    set.clock = super::readings::validate_clock(raw.clock.as_ref(), problems);

    // Cohorts.
    for (name, devices) in &raw.cohorts {
        let field = format!("cohorts.{}", name.get_ref());
        if let Err(why) = check_name(name.get_ref(), 64) {
            problems.add(Some(name.span()), field.clone(), why.to_string());
        }
        if devices.get_ref().is_empty() {
            problems.add(
                Some(devices.span()),
                field.clone(),
                "a cohort lists at least one device",
            );
        }
        let mut members = BTreeSet::new();
        for (i, d) in devices.get_ref().iter().enumerate() {
            match DeviceId::new(d.get_ref().clone()) {
                Ok(id) => {
                    if !members.insert(id) {
                        problems.add(
                            Some(d.span()),
                            format!("{field}[{i}]"),
                            format!("device `{}` is listed twice", d.get_ref()),
                        );
                    }
                }
                Err(e) => problems.add(Some(d.span()), format!("{field}[{i}]"), e.to_string()),
            }
        }
        set.cohorts.insert(name.get_ref().clone(), members);
    }

    set.alerting = super::alerting::validate_alerting(
        &super::alerting::RawAlerting {
            acknowledge: raw.acknowledge.as_ref(),
            escalation: raw.escalation.as_ref(),
            silence: raw.silence.as_ref(),
            alarms: raw.alarms.as_ref(),
            battery: raw.battery.as_ref(),
            alert_expiry: raw.alert_expiry.as_ref(),
        },
        &set.cohorts,
        problems,
    );

    // Rules.
    let low_below = set.quality.low_below;
    let mut rules: Vec<(Option<RuleKind>, RawParams, Option<AlertRule>)> = Vec::new();
    let mut ids: BTreeMap<String, usize> = BTreeMap::new();
    for (j, entry) in raw.rules.into_iter().enumerate() {
        let span = entry.span();
        let (head, params) = entry.into_inner().split();
        let path = format!("rules[{j}]");
        let id = head.id.get_ref();
        if let Err(why) = check_name(id, 64) {
            problems.add(Some(head.id.span()), format!("{path}.id"), why.to_string());
        }
        if let Some(first) = ids.get(id) {
            problems.add(
                Some(head.id.span()),
                format!("{path}.id"),
                format!("rule id `{id}` is already used by rules[{first}]"),
            );
        } else {
            ids.insert(id.clone(), j);
        }
        if let Err(why) = check_name(head.version.get_ref(), 32) {
            problems.add(
                Some(head.version.span()),
                format!("{path}.version"),
                why.to_string(),
            );
        }
        if let Err(why) = check_metric(head.metric.get_ref()) {
            problems.add(
                Some(head.metric.span()),
                format!("{path}.metric"),
                why.to_string(),
            );
        }
        let kind = parse_kind(head.kind.get_ref());
        if kind.is_none() {
            problems.add(
                Some(head.kind.span()),
                format!("{path}.kind"),
                format!(
                    "unknown kind `{}`: expected threshold, rate or baseline",
                    head.kind.get_ref()
                ),
            );
        }
        let validated = kind.and_then(|kind| {
            let merged = Merged::new(&params, &path, None);
            let mut checker = Checker {
                problems: &mut *problems,
                context: Spot {
                    span: Some(span.clone()),
                    path: path.clone(),
                    overridden: false,
                },
                is_override: false,
                found: false,
            };
            let base = check_params(kind, &merged, low_below, &mut checker);
            base.map(|base| AlertRule {
                id: head.id.get_ref().clone(),
                version: head.version.get_ref().clone(),
                metric: head.metric.get_ref().clone(),
                kind,
                base,
                by_site: BTreeMap::new(),
                by_cohort: Vec::new(),
            })
        });
        rules.push((kind, params, validated));
    }

    // Overrides.
    let mut seen_targets: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (i, entry) in raw.overrides.iter().enumerate() {
        let span = entry.span();
        let o = entry.get_ref();
        let path = format!("overrides[{i}]");
        let Some(&j) = ids.get(o.rule.get_ref()) else {
            problems.add(
                Some(o.rule.span()),
                format!("{path}.rule"),
                format!("no rule has id `{}`", o.rule.get_ref()),
            );
            continue;
        };
        // Which devices or site it selects.
        let target = match (&o.site, &o.cohort) {
            (Some(site), None) => match SiteId::new(site.get_ref().clone()) {
                Ok(site) => Some(Target::Site(site)),
                Err(e) => {
                    problems.add(Some(site.span()), format!("{path}.site"), e.to_string());
                    None
                }
            },
            (None, Some(cohort)) => match set.cohorts.get(cohort.get_ref()) {
                Some(devices) => Some(Target::Cohort(cohort.get_ref().clone(), devices.clone())),
                None => {
                    problems.add(
                        Some(cohort.span()),
                        format!("{path}.cohort"),
                        format!("no cohort `{}` under [cohorts]", cohort.get_ref()),
                    );
                    None
                }
            },
            _ => {
                problems.add(
                    Some(span.clone()),
                    path.clone(),
                    "an override selects exactly one of `site` and `cohort`",
                );
                None
            }
        };
        if let Some(t) = &target {
            let key = (o.rule.get_ref().clone(), t.key());
            if let Some(first) = seen_targets.get(&key) {
                problems.add(
                    Some(o.rule.span()),
                    format!("{path}.rule"),
                    format!(
                        "overrides[{first}] already overrides `{}` for {}",
                        key.0, key.1
                    ),
                );
                continue;
            }
            seen_targets.insert(key, i);
        }
        let set_path = format!("{path}.set");
        let changes = o.set.get_ref();
        if is_empty(changes) {
            problems.add(
                Some(o.set.span()),
                set_path,
                "an override sets at least one field",
            );
            continue;
        }
        let (kind, base_params, validated) = &mut rules[j];
        let Some(kind) = *kind else { continue };
        let merged = Merged::new(
            base_params,
            &format!("rules[{j}]"),
            Some((changes, &set_path)),
        );
        let mut checker = Checker {
            problems: &mut *problems,
            context: Spot {
                span: Some(o.set.span()),
                path: set_path.clone(),
                overridden: true,
            },
            is_override: true,
            found: false,
        };
        let params = check_params(kind, &merged, low_below, &mut checker);
        let (Some(rule), Some(params), Some(target)) = (validated.as_mut(), params, target) else {
            continue;
        };
        if let Some(why) = shape_change(&rule.base, &params) {
            problems.add(
                Some(o.set.span()),
                set_path,
                format!("an override changes values, not what the rule measures: {why}"),
            );
            continue;
        }
        match target {
            Target::Site(site) => {
                rule.by_site.insert(site, params);
            }
            Target::Cohort(cohort, devices) => {
                if let Some(other) = rule
                    .by_cohort
                    .iter()
                    .find(|c| !c.devices.is_disjoint(&devices))
                {
                    let shared = other
                        .devices
                        .intersection(&devices)
                        .next()
                        .map(ToString::to_string)
                        .unwrap_or_default();
                    problems.add(
                        o.cohort.as_ref().map(Spanned::span),
                        format!("{path}.cohort"),
                        format!(
                            "device `{shared}` is in cohorts `{}` and `{cohort}`, which both override `{}`",
                            other.cohort, rule.id
                        ),
                    );
                    continue;
                }
                rule.by_cohort.push(CohortOverride {
                    cohort,
                    devices,
                    params,
                });
            }
        }
    }
    set.rules = rules.into_iter().filter_map(|(_, _, r)| r).collect();
}

enum Target {
    Site(SiteId),
    Cohort(String, BTreeSet<DeviceId>),
}

impl Target {
    fn key(&self) -> String {
        match self {
            Self::Site(s) => format!("site `{s}`"),
            Self::Cohort(c, _) => format!("cohort `{c}`"),
        }
    }
}

/// How an override's parameters measure differently from the rule's, if they do.
fn shape_change(base: &RuleParams, over: &RuleParams) -> Option<String> {
    let (b, o) = (describe(base), describe(over));
    (b != o).then(|| format!("the rule looks at {b}, the override at {o}"))
}

/// What a parameter set compares, in words.
fn describe(p: &RuleParams) -> &'static str {
    match p.measure {
        Measure::Value if p.trigger.op.is_low() => "low values",
        Measure::Value => "high values",
        Measure::Change {
            direction: ChangeDirection::Fall,
            ..
        } => "a fall",
        Measure::Change {
            direction: ChangeDirection::Rise,
            ..
        } => "a rise",
        Measure::Deviation {
            side: DeviationSide::Either,
            ..
        } => "a deviation either side of the baseline",
        Measure::Deviation {
            side: DeviationSide::Above,
            ..
        } => "a deviation above the baseline",
        Measure::Deviation {
            side: DeviationSide::Below,
            ..
        } => "a deviation below the baseline",
    }
}

fn parse_kind(kind: &str) -> Option<RuleKind> {
    match kind {
        "threshold" => Some(RuleKind::Threshold),
        "rate" => Some(RuleKind::Rate),
        "baseline" => Some(RuleKind::Baseline),
        _ => None,
    }
}

fn is_empty(p: &RawParams) -> bool {
    p.severity.is_none()
        && p.below.is_none()
        && p.at_or_below.is_none()
        && p.above.is_none()
        && p.at_or_above.is_none()
        && p.resolve_at.is_none()
        && p.resolve_after_s.is_none()
        && p.persist.is_none()
        && p.rate.is_none()
        && p.baseline.is_none()
        && p.min_quality.is_none()
        && p.escalate.is_none()
}

fn validate_quality(q: &RawQuality, problems: &mut Problems<'_>) -> QualityPolicy {
    let low_below = *q.low_below.get_ref();
    if !(low_below > 0.0 && low_below <= 1.0) {
        problems.add(
            Some(q.low_below.span()),
            "quality.low_below",
            "must be above 0 and at most 1",
        );
    }
    let max = *q.max_low_fraction.get_ref();
    if !(max > 0.0 && max <= 1.0) {
        problems.add(
            Some(q.max_low_fraction.span()),
            "quality.max_low_fraction",
            "must be above 0 and at most 1",
        );
    }
    let resolve = q
        .resolve_fraction
        .as_ref()
        .map_or(max / 2.0, |r| *r.get_ref());
    if let Some(r) = &q.resolve_fraction
        && !(resolve >= 0.0 && resolve < max)
    {
        problems.add(
            Some(r.span()),
            "quality.resolve_fraction",
            "must be at least 0 and below max_low_fraction (hysteresis)",
        );
    }
    let over_n = *q.over_n.get_ref();
    if over_n == 0 || over_n > u64::from(MAX_N) {
        problems.add(
            Some(q.over_n.span()),
            "quality.over_n",
            format!("must be between 1 and {MAX_N}"),
        );
    }
    QualityPolicy {
        low_below,
        max_low_fraction: max,
        resolve_fraction: resolve,
        over_n: u8::try_from(over_n.clamp(1, u64::from(MAX_N))).unwrap_or(MAX_N),
    }
}

/// Validates one parameter set of a rule of `kind`; `None` when anything is wrong.
fn check_params(
    kind: RuleKind,
    m: &Merged<'_>,
    default_quality: f64,
    ck: &mut Checker<'_, '_>,
) -> Option<RuleParams> {
    let severity = match &m.severity {
        Some(f) => {
            let s = Severity::parse(f.get());
            if s.is_none() {
                ck.report(
                    &[f.at()],
                    format!(
                        "unknown severity `{}`: expected info, review or urgent",
                        f.get()
                    ),
                );
            }
            s
        }
        None => {
            ck.missing("missing `severity`");
            None
        }
    };

    // What is measured, the trigger and the resolve threshold, per kind.
    let thresholds: Vec<(&Field<'_, f64>, CompareOp)> = [
        (&m.below, CompareOp::Below),
        (&m.at_or_below, CompareOp::AtOrBelow),
        (&m.above, CompareOp::Above),
        (&m.at_or_above, CompareOp::AtOrAbove),
    ]
    .into_iter()
    .filter_map(|(f, op)| f.as_ref().map(|f| (f, op)))
    .collect();
    let not_for = |ck: &mut Checker<'_, '_>, spot: Spot, what: &str| {
        ck.report(
            &[spot],
            format!("not used by a {} rule{what}", kind.as_str()),
        );
    };
    // (measure, trigger, resolve) when all three are valid; the trigger alone when known.
    let mut shape = None;
    let mut known_trigger = None;
    match kind {
        RuleKind::Threshold => {
            if let Some(f) = &m.rate {
                not_for(ck, f.at(), "");
            }
            if let Some(f) = &m.baseline {
                not_for(ck, f.at(), "");
            }
            match thresholds.as_slice() {
                [] => ck.missing(
                    "a threshold rule needs one of below, at_or_below, above or at_or_above",
                ),
                [(f, op)] => {
                    let trigger = finite(ck, f).map(|at| Compare { op: *op, at });
                    known_trigger = trigger;
                    let resolve = match &m.resolve_at {
                        None => {
                            ck.missing(
                                "missing `resolve_at`: the value the reading must be back at before the alert resolves",
                            );
                            None
                        }
                        Some(r) => finite(ck, r).and_then(|at| {
                            let resolve = Compare {
                                op: if op.is_low() {
                                    CompareOp::AtOrAbove
                                } else {
                                    CompareOp::AtOrBelow
                                },
                                at,
                            };
                            let trigger = trigger?;
                            if trigger.holds(at) {
                                let side = if op.is_low() { "above" } else { "below" };
                                let incl = if matches!(op, CompareOp::Below | CompareOp::Above)
                                {
                                    "at or "
                                } else {
                                    ""
                                };
                                ck.report(
                                    &[r.at(), f.at()],
                                    format!(
                                        "resolve_at ({at}) must be {incl}{side} the trigger ({trigger}), or the alert could never resolve"
                                    ),
                                );
                                None
                            } else {
                                Some(resolve)
                            }
                        }),
                    };
                    if let (Some(trigger), Some(resolve)) = (trigger, resolve) {
                        shape = Some((Measure::Value, trigger, resolve));
                    }
                }
                [first, rest @ ..] => {
                    let mut involved: Vec<Spot> = rest.iter().map(|(f, _)| f.at()).collect();
                    involved.push(first.0.at());
                    ck.report(
                        &involved,
                        "only one of below, at_or_below, above and at_or_above",
                    );
                }
            }
        }
        RuleKind::Rate => {
            for (f, _) in &thresholds {
                not_for(ck, f.at(), "");
            }
            if let Some(f) = &m.resolve_at {
                not_for(
                    ck,
                    f.at(),
                    ": it resolves when the change is no longer seen, after resolve_after_s",
                );
            }
            if let Some(f) = &m.baseline {
                not_for(ck, f.at(), "");
            }
            match &m.rate {
                None => ck.missing(
                    "a rate rule needs rate = { fall = X, within_s = W } or rate = { rise = X, within_s = W }",
                ),
                Some(rate) => {
                    let r = rate.get();
                    let within = rate.inner(&r.within_s, "within_s");
                    let within_s = seconds(ck, &within, 1);
                    let amount = match (&r.fall, &r.rise) {
                        (Some(f), None) => Some((ChangeDirection::Fall, rate.inner(f, "fall"))),
                        (None, Some(f)) => Some((ChangeDirection::Rise, rate.inner(f, "rise"))),
                        _ => {
                            ck.report(&[rate.at()], "needs exactly one of `fall` and `rise`");
                            None
                        }
                    };
                    let amount = amount.and_then(|(direction, f)| {
                        positive(ck, &f).map(|x| (direction, x))
                    });
                    if let Some((_, x)) = amount {
                        known_trigger = Some(Compare {
                            op: CompareOp::AtOrAbove,
                            at: x,
                        });
                    }
                    if let (Some((direction, x)), Some(within_s)) = (amount, within_s) {
                        shape = Some((
                            Measure::Change {
                                direction,
                                within_s,
                            },
                            Compare {
                                op: CompareOp::AtOrAbove,
                                at: x,
                            },
                            Compare {
                                op: CompareOp::Below,
                                at: x,
                            },
                        ));
                    }
                }
            }
        }
        RuleKind::Baseline => {
            for (f, _) in &thresholds {
                not_for(ck, f.at(), "");
            }
            if let Some(f) = &m.resolve_at {
                not_for(ck, f.at(), ": use baseline.resolve_within");
            }
            if let Some(f) = &m.rate {
                not_for(ck, f.at(), "");
            }
            match &m.baseline {
                None => ck.missing(
                    "a baseline rule needs baseline = { window_s = W, deviation = D, resolve_within = R }",
                ),
                Some(b) => {
                    let raw = b.get();
                    let window_s = seconds(ck, &b.inner(&raw.window_s, "window_s"), MIN_BASELINE_S);
                    let dev_f = b.inner(&raw.deviation, "deviation");
                    let deviation = positive(ck, &dev_f);
                    known_trigger = deviation.map(|at| Compare {
                        op: CompareOp::Above,
                        at,
                    });
                    let within_f = b.inner(&raw.resolve_within, "resolve_within");
                    let within = finite(ck, &within_f).and_then(|r| {
                        let d = deviation?;
                        if r < 0.0 || r > d {
                            ck.report(
                                &[within_f.at(), dev_f.at()],
                                format!(
                                    "resolve_within ({r}) must be between 0 and the deviation ({d}), or the alert could never resolve"
                                ),
                            );
                            None
                        } else {
                            Some(r)
                        }
                    });
                    let side = match &raw.direction {
                        None => Some(DeviationSide::Either),
                        Some(d) => match d.get_ref().as_str() {
                            "either" => Some(DeviationSide::Either),
                            "above" => Some(DeviationSide::Above),
                            "below" => Some(DeviationSide::Below),
                            other => {
                                ck.report(
                                    &[b.inner(d, "direction").at()],
                                    format!(
                                        "unknown direction `{other}`: expected either, above or below"
                                    ),
                                );
                                None
                            }
                        },
                    };
                    if let (Some(window_s), Some(d), Some(r), Some(side)) =
                        (window_s, deviation, within, side)
                    {
                        shape = Some((
                            Measure::Deviation { side, window_s },
                            Compare {
                                op: CompareOp::Above,
                                at: d,
                            },
                            Compare {
                                op: CompareOp::AtOrBelow,
                                at: r,
                            },
                        ));
                    }
                }
            }
        }
    }

    let resolve_after_s = match &m.resolve_after_s {
        None => Some(0),
        Some(f) => seconds(ck, f, 0),
    };
    let persist = match &m.persist {
        None => Some(Persist::Immediate),
        Some(p) => check_persist(p, ck),
    };
    let min_quality = match &m.min_quality {
        None => Some(default_quality),
        Some(f) => finite(ck, f).and_then(|q| {
            if (0.0..=1.0).contains(&q) {
                Some(q)
            } else {
                ck.report(&[f.at()], "must be between 0 and 1");
                None
            }
        }),
    };
    let escalate = match &m.escalate {
        None => Some(None),
        Some(e) => check_escalation(e, m.severity.as_ref(), severity, known_trigger, ck),
    };

    if ck.found {
        return None;
    }
    let (measure, trigger, resolve) = shape?;
    Some(RuleParams {
        severity: severity?,
        measure,
        trigger,
        resolve,
        resolve_after_s: resolve_after_s?,
        persist: persist?,
        min_quality: min_quality?,
        escalate: escalate?,
    })
}

fn finite(ck: &mut Checker<'_, '_>, f: &Field<'_, f64>) -> Option<f64> {
    let x = *f.get();
    if x.is_finite() {
        Some(x)
    } else {
        ck.report(&[f.at()], "must be a finite number");
        None
    }
}

fn positive(ck: &mut Checker<'_, '_>, f: &Field<'_, f64>) -> Option<f64> {
    let x = finite(ck, f)?;
    if x > 0.0 {
        Some(x)
    } else {
        ck.report(&[f.at()], "must be above 0");
        None
    }
}

fn seconds(ck: &mut Checker<'_, '_>, f: &Field<'_, u64>, min: u64) -> Option<u64> {
    let s = *f.get();
    if (min..=MAX_SECONDS).contains(&s) {
        Some(s)
    } else {
        ck.report(
            &[f.at()],
            format!("must be between {min} and {MAX_SECONDS} seconds"),
        );
        None
    }
}

fn check_persist(p: &Field<'_, RawPersist>, ck: &mut Checker<'_, '_>) -> Option<Persist> {
    let raw = p.get();
    match (&raw.seconds, &raw.k, &raw.n) {
        (Some(s), None, None) => seconds(ck, &p.inner(s, "seconds"), 1).map(Persist::Seconds),
        (None, Some(k), Some(n)) => {
            let (kf, nf) = (p.inner(k, "k"), p.inner(n, "n"));
            let (k, n) = (*k.get_ref(), *n.get_ref());
            if n == 0 || n > u64::from(MAX_N) {
                ck.report(&[nf.at()], format!("must be between 1 and {MAX_N}"));
                None
            } else if k == 0 || k > n {
                ck.report(&[kf.at()], format!("must be between 1 and n ({n})"));
                None
            } else {
                // Both are at most MAX_N (64), checked above.
                let k = u8::try_from(k).ok()?;
                let n = u8::try_from(n).ok()?;
                Some(Persist::KOfN { k, n })
            }
        }
        _ => {
            ck.report(
                &[p.at()],
                "persist is either { seconds = T } or { k = K, n = N }",
            );
            None
        }
    }
}

fn check_escalation(
    e: &Field<'_, RawEscalate>,
    severity_field: Option<&Field<'_, String>>,
    severity: Option<Severity>,
    trigger: Option<Compare>,
    ck: &mut Checker<'_, '_>,
) -> Option<Option<Escalation>> {
    let raw = e.get();
    let to_f = e.inner(&raw.to, "to");
    let to = Severity::parse(to_f.get());
    match (to, severity) {
        (None, _) => ck.report(
            &[to_f.at()],
            format!(
                "unknown severity `{}`: expected info, review or urgent",
                to_f.get()
            ),
        ),
        (Some(to), Some(sev)) if to < sev => {
            let mut involved = vec![to_f.at()];
            involved.extend(severity_field.map(Field::at));
            ck.report(
                &involved,
                format!("escalating to `{to}` would lower the severity `{sev}`"),
            );
        }
        _ => {}
    }
    if raw.beyond.is_none() && raw.after_s.is_none() {
        ck.report(&[e.at()], "escalate needs `beyond`, `after_s` or both");
        return None;
    }
    let after_s = match &raw.after_s {
        None => Some(None),
        Some(a) => seconds(ck, &e.inner(a, "after_s"), 1).map(Some),
    };
    let beyond = match &raw.beyond {
        None => Some(None),
        Some(b) => {
            let bf = e.inner(b, "beyond");
            let at = finite(ck, &bf)?;
            let trigger = trigger?;
            let further = if trigger.op.is_low() {
                at < trigger.at
            } else {
                at > trigger.at
            };
            if further {
                // The second threshold compares the way the trigger does.
                Some(Some(Compare { op: trigger.op, at }))
            } else {
                let side = if trigger.op.is_low() {
                    "below"
                } else {
                    "above"
                };
                ck.report(
                    &[bf.at()],
                    format!(
                        "beyond ({at}) must be {side} the trigger ({trigger}): a second threshold further out"
                    ),
                );
                None
            }
        }
    };
    Some(Some(Escalation {
        beyond: beyond?,
        after_s: after_s?,
        to: to?,
    }))
}

/// A name, id or version outside `[A-Za-z0-9][A-Za-z0-9._-]{0,max-1}`.
#[derive(Debug, thiserror::Error)]
#[error("must match [A-Za-z0-9][A-Za-z0-9._-]{{0,{}}}", .max - 1)]
pub(crate) struct BadName {
    max: usize,
}

/// A metric name outside `[a-z][a-z0-9_]{0,31}`.
#[derive(Debug, thiserror::Error)]
#[error("must match [a-z][a-z0-9_]{{0,31}}")]
pub(crate) struct BadMetric;

/// Names, ids and versions: `[A-Za-z0-9][A-Za-z0-9._-]{0,max-1}`.
pub(crate) fn check_name(name: &str, max: usize) -> Result<(), BadName> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= max
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok { Ok(()) } else { Err(BadName { max }) }
}

/// Metric names as devices send them in `m`: `[a-z][a-z0-9_]{0,31}`.
pub(super) fn check_metric(name: &str) -> Result<(), BadMetric> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 32
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_');
    if ok { Ok(()) } else { Err(BadMetric) }
}
