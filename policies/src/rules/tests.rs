//! Tests of the shipped example rule set and of error reporting: every kind of mistake is
//! named with file, line and field.

use super::*;

const EXAMPLE: &str = include_str!("../../examples/rules.toml");
const PATH: &str = "policies/rules.toml";

fn example() -> RuleSet {
    RuleSet::parse(EXAMPLE, Path::new(PATH)).unwrap_or_else(|e| panic!("{e}"))
}

fn line_of(text: &str, needle: &str) -> usize {
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle} not in text"));
    text[..at].matches('\n').count() + 1
}

/// Replaces exactly one occurrence, so a test cannot silently edit the wrong rule.
fn edit(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "`{from}` must occur once");
    text.replace(from, to)
}

fn device(id: &str) -> DeviceId {
    DeviceId::new(id).expect("device id")
}

fn site(id: &str) -> SiteId {
    SiteId::new(id).expect("site id")
}

/// Asserts that `err` has a problem at `needle`'s line in `text`, for `field`, whose
/// message contains `message`.
#[track_caller]
fn has(err: &PolicyErrors, text: &str, needle: &str, field: &str, message: &str) {
    let want = format!("{PATH}:{}: {field}: ", line_of(text, needle));
    assert!(
        err.0
            .iter()
            .any(|e| e.to_string().starts_with(&want) && e.message.contains(message)),
        "missing `{want}...{message}` in\n{err}"
    );
}

#[test]
fn the_example_parses_into_the_documented_rules() {
    let set = example();
    assert_eq!(set.version(), "2025-06-01.1");
    assert_eq!(
        set.sha256(),
        hex::encode(Sha256::digest(EXAMPLE.as_bytes()))
    );
    let ids: Vec<&str> = set.rules().iter().map(AlertRule::id).collect();
    assert_eq!(
        ids,
        [
            "spo2-low",
            "spo2-falling",
            "pulse-high",
            "pulse-deviation",
            "temp-high"
        ]
    );

    let q = set.quality();
    assert_eq!((q.low_below, q.over_n), (0.5, 20));
    assert!(!q.raises(10) && q.raises(11), "more than half of 20");
    assert!(q.resolves(5) && !q.resolves(6), "a quarter of 20");
    assert!(q.is_low(Some(0.2)) && q.is_low(Some(f64::NAN)));
    assert!(!q.is_low(Some(0.5)) && !q.is_low(None));

    let spo2 = set.rule("spo2-low").expect("spo2-low");
    assert_eq!((spo2.version(), spo2.metric()), ("3", "spo2"));
    assert_eq!(spo2.kind(), RuleKind::Threshold);
    let p = spo2.base();
    assert_eq!(p.severity, Severity::Review);
    assert_eq!(p.measure, Measure::Value);
    assert_eq!(
        p.trigger,
        Compare {
            op: CompareOp::Below,
            at: 90.0
        }
    );
    assert_eq!(
        p.resolve,
        Compare {
            op: CompareOp::AtOrAbove,
            at: 92.0
        }
    );
    assert_eq!(p.resolve_after_s, 60);
    assert_eq!(p.persist, Persist::Seconds(30));
    assert_eq!(p.min_quality, 0.6);
    let e = p.escalate.expect("escalation");
    assert_eq!(
        e.beyond,
        Some(Compare {
            op: CompareOp::Below,
            at: 85.0
        })
    );
    assert_eq!((e.after_s, e.to), (Some(300), Severity::Urgent));

    let rate = set.rule("spo2-falling").expect("rate").base();
    assert_eq!(
        rate.measure,
        Measure::Change {
            direction: ChangeDirection::Fall,
            within_s: 60
        }
    );
    assert_eq!(
        rate.trigger,
        Compare {
            op: CompareOp::AtOrAbove,
            at: 4.0
        }
    );
    assert_eq!(rate.persist, Persist::KOfN { k: 2, n: 3 });
    assert_eq!(rate.min_quality, 0.6);

    let pulse = set.rule("pulse-high").expect("pulse").base();
    assert_eq!(
        pulse.trigger,
        Compare {
            op: CompareOp::Above,
            at: 120.0
        }
    );
    assert_eq!(pulse.persist, Persist::KOfN { k: 3, n: 5 });
    assert_eq!(pulse.min_quality, 0.5, "defaults to quality.low_below");

    let baseline = set.rule("pulse-deviation").expect("baseline").base();
    assert_eq!(
        baseline.measure,
        Measure::Deviation {
            side: DeviationSide::Either,
            window_s: 1800
        }
    );
    assert_eq!(
        baseline.trigger,
        Compare {
            op: CompareOp::Above,
            at: 25.0
        }
    );
    assert_eq!(
        baseline.resolve,
        Compare {
            op: CompareOp::AtOrBelow,
            at: 15.0
        }
    );

    let temp = set.rule("temp-high").expect("temp").base();
    assert_eq!(
        temp.trigger,
        Compare {
            op: CompareOp::AtOrAbove,
            at: 38.0
        }
    );
    assert!(temp.trigger.holds(38.0) && !temp.resolve.holds(37.6) && temp.resolve.holds(37.5));
}

#[test]
fn overrides_apply_per_cohort_then_site() {
    let set = example();
    let spo2 = set.rule("spo2-low").expect("spo2-low");
    assert_eq!(
        set.cohorts().get("copd").map(BTreeSet::len),
        Some(2),
        "two devices"
    );
    // A COPD patient anywhere, including at the HDU: the cohort wins.
    for at in ["site-a", "site-hdu"] {
        let p = spo2.params_for(&device("dev-00077"), &site(at));
        assert_eq!(p.trigger.at, 88.0);
        assert_eq!(p.resolve.at, 90.0);
        assert_eq!(p.persist, Persist::Seconds(30), "not set: the rule's");
        assert_eq!(p.severity, Severity::Review);
    }
    let hdu = spo2.params_for(&device("dev-00001"), &site("site-hdu"));
    assert_eq!(hdu.severity, Severity::Urgent);
    assert_eq!(hdu.persist, Persist::Seconds(15));
    assert_eq!(hdu.trigger.at, 90.0);
    let elsewhere = spo2.params_for(&device("dev-00001"), &site("site-a"));
    assert_eq!(elsewhere, spo2.base());
    // Other rules are not touched.
    let pulse = set.rule("pulse-high").expect("pulse");
    assert_eq!(
        pulse.params_for(&device("dev-00077"), &site("site-hdu")),
        pulse.base()
    );
    let names: Vec<String> = spo2.overridden_for().collect();
    assert_eq!(names, ["cohort copd", "site site-hdu"]);
}

#[test]
fn every_validation_problem_is_reported_at_once_with_file_line_and_field() {
    let mut bad = EXAMPLE.to_owned();
    for (from, to) in [
        ("resolve_at = 92", "resolve_at = 88"),
        ("beyond = 85,", "beyond = 95,"),
        ("id = \"spo2-falling\"", "id = \"spo2-low\""),
        ("persist = { k = 3, n = 5 }", "persist = { k = 6, n = 5 }"),
        (
            "escalate = { beyond = 150, to = \"urgent\" }",
            "escalate = { beyond = 150, to = \"info\" }",
        ),
        ("resolve_within = 15", "resolve_within = 30"),
        ("severity = \"info\"", "severity = \"severe\""),
        ("low_below = 0.5", "low_below = 1.5"),
        ("over_n = 20", "over_n = 100"),
        (
            "set = { below = 88, resolve_at = 90 }",
            "set = { below = 88, resolve_at = 87 }",
        ),
        ("rule = \"spo2-low\"\nsite", "rule = \"spo2-lo\"\nsite"),
        ("metric = \"temp\"", "metric = \"Temp\""),
    ] {
        bad = edit(&bad, from, to);
    }
    let err = RuleSet::parse(&bad, Path::new(PATH)).expect_err("broken rules");
    let expect = [
        (
            "resolve_at = 88",
            "rules[0].resolve_at",
            "must be at or above the trigger (< 90)",
        ),
        (
            "beyond = 95",
            "rules[0].escalate.beyond",
            "must be below the trigger (< 90)",
        ),
        (
            "id = \"spo2-low\"\nversion = \"1\"",
            "rules[1].id",
            "already used by rules[0]",
        ),
        ("k = 6", "rules[2].persist.k", "between 1 and n (5)"),
        (
            "to = \"info\"",
            "rules[2].escalate.to",
            "would lower the severity `review`",
        ),
        (
            "resolve_within = 30",
            "rules[3].baseline.resolve_within",
            "between 0 and the deviation (25)",
        ),
        (
            "severity = \"severe\"",
            "rules[4].severity",
            "unknown severity `severe`",
        ),
        ("metric = \"Temp\"", "rules[4].metric", "[a-z][a-z0-9_]"),
        ("low_below = 1.5", "quality.low_below", "at most 1"),
        ("over_n = 100", "quality.over_n", "between 1 and 64"),
        (
            "resolve_at = 87",
            "overrides[0].set.resolve_at",
            "must be at or above the trigger (< 88)",
        ),
        (
            "rule = \"spo2-lo\"",
            "overrides[1].rule",
            "no rule has id `spo2-lo`",
        ),
    ];
    for (needle, field, message) in expect {
        has(&err, &bad, needle, field, message);
    }
    assert_eq!(err.0.len(), expect.len(), "{err}");
}

#[test]
fn serde_problems_name_file_and_line() {
    for (bad, needle, words) in [
        (
            edit(
                EXAMPLE,
                "kind = \"rate\"\n",
                "kind = \"rate\"\ncolour = 1\n",
            ),
            "colour",
            "unknown field `colour`",
        ),
        (
            edit(
                EXAMPLE,
                "persist = { seconds = 30 }",
                "persist = { secs = 30 }",
            ),
            "secs",
            "unknown field `secs`",
        ),
        (
            edit(
                EXAMPLE,
                "set = { below = 88,",
                "set = { id = \"x\", below = 88,",
            ),
            "id = \"x\"",
            "unknown field `id`",
        ),
        (
            edit(EXAMPLE, "below = 90\n", "below = \"90\"\n"),
            "\"90\"",
            "invalid type: string \"90\", expected f64",
        ),
        (
            edit(
                EXAMPLE,
                "resolve_after_s = 60\npersist",
                "resolve_after_s = -60\npersist",
            ),
            "-60",
            "expected u64",
        ),
        (
            edit(EXAMPLE, "[quality]", "[qualities]"),
            "[qualities]",
            "unknown field `qualities`",
        ),
    ] {
        let err = RuleSet::parse(&bad, Path::new(PATH)).expect_err(needle);
        let first = &err.0[0];
        assert!(first.message.contains(words), "{err}");
        assert_eq!(first.line, Some(line_of(&bad, needle)), "{err}");
        assert!(err.to_string().contains("rules.toml:"), "{err}");
    }
    // A required field that is missing is placed at its table.
    let bad = edit(
        EXAMPLE,
        "metric = \"pulse\"\nseverity = \"review\"\nkind = \"threshold\"",
        "severity = \"review\"\nkind = \"threshold\"",
    );
    let err = RuleSet::parse(&bad, Path::new(PATH)).expect_err("no metric");
    assert!(err.0[0].message.contains("missing field `metric`"), "{err}");
    assert_eq!(
        err.0[0].line,
        Some(line_of(&bad, "[[rules]]\nid = \"pulse-high\"")),
        "{err}"
    );
}

/// A minimal rule file with one rule body and optional extra text after it.
fn one_rule(body: &str, after: &str) -> String {
    format!(
        "format = \"vitalmq-rules/v1\"\nversion = \"t1\"\n\
         [quality]\nlow_below = 0.5\nmax_low_fraction = 0.5\nover_n = 20\n\
         [[rules]]\nid = \"r\"\nversion = \"1\"\nmetric = \"spo2\"\nseverity = \"review\"\n{body}\n{after}"
    )
}

#[test]
fn fields_that_do_not_fit_the_kind_are_refused() {
    let cases = [
        (
            "kind = \"rate\"\nrate = { fall = 4, within_s = 60 }\nbelow = 90",
            "below = 90",
            "rules[0].below",
            "not used by a rate rule",
        ),
        (
            "kind = \"rate\"\nrate = { fall = 4, within_s = 60 }\nresolve_at = 3",
            "resolve_at = 3",
            "rules[0].resolve_at",
            "resolves when the change is no longer seen",
        ),
        (
            "kind = \"rate\"\nrate = { fall = 4, rise = 4, within_s = 60 }",
            "rate = {",
            "rules[0].rate",
            "exactly one of `fall` and `rise`",
        ),
        (
            "kind = \"rate\"\nrate = { fall = 0, within_s = 60 }",
            "rate = {",
            "rules[0].rate.fall",
            "must be above 0",
        ),
        (
            "kind = \"threshold\"\nbelow = 90\nresolve_at = 92\nbaseline = { window_s = 600, deviation = 5, resolve_within = 2 }",
            "baseline = {",
            "rules[0].baseline",
            "not used by a threshold rule",
        ),
        (
            "kind = \"threshold\"\nbelow = 90\nabove = 100\nresolve_at = 92",
            "above = 100",
            "rules[0].above",
            "only one of below",
        ),
        (
            "kind = \"threshold\"\nresolve_at = 92",
            "[[rules]]",
            "rules[0]",
            "needs one of below, at_or_below, above or at_or_above",
        ),
        (
            "kind = \"threshold\"\nat_or_below = 90\nresolve_at = 90",
            "resolve_at = 90",
            "rules[0].resolve_at",
            "must be above the trigger (<= 90)",
        ),
        (
            "kind = \"baseline\"\nbaseline = { window_s = 30, deviation = 5, resolve_within = 2 }",
            "baseline = {",
            "rules[0].baseline.window_s",
            "between 60 and",
        ),
        (
            "kind = \"baseline\"\nbaseline = { window_s = 600, deviation = 5, resolve_within = 2, direction = \"up\" }",
            "baseline = {",
            "rules[0].baseline.direction",
            "unknown direction `up`",
        ),
        (
            "kind = \"baseline\"",
            "[[rules]]",
            "rules[0]",
            "a baseline rule needs baseline",
        ),
        (
            "kind = \"trend\"",
            "kind = \"trend\"",
            "rules[0].kind",
            "unknown kind `trend`",
        ),
        (
            "kind = \"threshold\"\nbelow = 90\nresolve_at = 92\npersist = { seconds = 30, k = 1, n = 2 }",
            "persist = {",
            "rules[0].persist",
            "either { seconds = T } or { k = K, n = N }",
        ),
        (
            "kind = \"threshold\"\nbelow = 90\nresolve_at = 92\npersist = { k = 1, n = 65 }",
            "persist = {",
            "rules[0].persist.n",
            "between 1 and 64",
        ),
        (
            "kind = \"threshold\"\nbelow = 90\nresolve_at = 92\npersist = { seconds = 0 }",
            "persist = {",
            "rules[0].persist.seconds",
            "between 1 and",
        ),
        (
            "kind = \"threshold\"\nbelow = 90\nresolve_at = 92\nescalate = { to = \"urgent\" }",
            "escalate = {",
            "rules[0].escalate",
            "needs `beyond`, `after_s` or both",
        ),
        (
            "kind = \"threshold\"\nbelow = 90\nresolve_at = 92\nmin_quality = 1.5",
            "min_quality",
            "rules[0].min_quality",
            "between 0 and 1",
        ),
        (
            "kind = \"threshold\"\nbelow = nan\nresolve_at = 92",
            "below = nan",
            "rules[0].below",
            "finite",
        ),
        (
            "kind = \"threshold\"\nbelow = 90\nresolve_at = 92\nresolve_after_s = 700000",
            "resolve_after_s",
            "rules[0].resolve_after_s",
            "between 0 and 604800",
        ),
        (
            "kind = \"rate\"\nrate = { rise = 5, within_s = 60 }\nescalate = { beyond = 3, to = \"urgent\" }",
            "escalate = {",
            "rules[0].escalate.beyond",
            "must be above the trigger (>= 5)",
        ),
    ];
    for (body, needle, field, message) in cases {
        let text = one_rule(body, "");
        let err = RuleSet::parse(&text, Path::new(PATH)).expect_err(body);
        has(&err, &text, needle, field, message);
        assert_eq!(err.0.len(), 1, "{body}:\n{err}");
    }
    // Each kind accepts its own fields.
    for body in [
        "kind = \"rate\"\nrate = { rise = 5, within_s = 60 }\nescalate = { beyond = 8, to = \"urgent\" }",
        "kind = \"baseline\"\nbaseline = { window_s = 600, deviation = 5, resolve_within = 5, direction = \"below\" }",
        "kind = \"threshold\"\nat_or_below = 90\nresolve_at = 90.5\npersist = { k = 64, n = 64 }",
    ] {
        RuleSet::parse(&one_rule(body, ""), Path::new(PATH)).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn overrides_are_checked_against_their_rule_and_each_other() {
    const RULE: &str = "kind = \"threshold\"\nbelow = 90\nresolve_at = 92\n\
                        escalate = { beyond = 85, to = \"urgent\" }";
    let cases = [
        (
            "[cohorts]\na = [\"dev-1\", \"dev-2\"]\nb = [\"dev-2\"]\n\
             [[overrides]]\nrule = \"r\"\ncohort = \"a\"\nset = { below = 88, resolve_at = 90 }\n\
             [[overrides]]\nrule = \"r\"\ncohort = \"b\"\nset = { below = 87, resolve_at = 90 }",
            "cohort = \"b\"",
            "overrides[1].cohort",
            "device `dev-2` is in cohorts `a` and `b`",
        ),
        (
            "[[overrides]]\nrule = \"r\"\nsite = \"s1\"\nset = { resolve_after_s = 10 }\n\
             [[overrides]]\nrule = \"r\"\nsite = \"s1\"\nset = { resolve_after_s = 20 }",
            "rule = \"r\"\nsite = \"s1\"\nset = { resolve_after_s = 20",
            "overrides[1].rule",
            "overrides[0] already overrides `r` for site `s1`",
        ),
        (
            "[cohorts]\na = [\"dev-1\"]\n[[overrides]]\nrule = \"r\"\nsite = \"s1\"\ncohort = \"a\"\nset = { below = 88 }",
            "[[overrides]]",
            "overrides[0]",
            "exactly one of `site` and `cohort`",
        ),
        (
            "[[overrides]]\nrule = \"r\"\nsite = \"s1\"\nset = {}",
            "set = {}",
            "overrides[0].set",
            "sets at least one field",
        ),
        (
            "[[overrides]]\nrule = \"r\"\nsite = \"s 1\"\nset = { below = 88 }",
            "site = \"s 1\"",
            "overrides[0].site",
            "",
        ),
        (
            // The override's threshold conflicts with the rule's resolve_at: blamed on the
            // field the override set.
            "[[overrides]]\nrule = \"r\"\nsite = \"s1\"\nset = { below = 95 }",
            "set = { below = 95 }",
            "overrides[0].set.below",
            "resolve_at (92) must be at or above the trigger (< 95)",
        ),
        (
            "[[overrides]]\nrule = \"r\"\nsite = \"s1\"\nset = { rate = { fall = 3, within_s = 60 } }",
            "set = { rate",
            "overrides[0].set.rate",
            "not used by a threshold rule",
        ),
        (
            "[[overrides]]\nrule = \"r\"\nsite = \"s1\"\nset = { above = 100 }",
            "set = { above",
            "overrides[0].set.above",
            "only one of below",
        ),
        (
            "[[overrides]]\nrule = \"r\"\nsite = \"s1\"\nset = { severity = \"urgent\", escalate = { beyond = 80, to = \"review\" } }",
            "set = { severity",
            "overrides[0].set.escalate.to",
            "would lower the severity `urgent`",
        ),
        (
            "[cohorts]\na = [\"dev-1\", \"dev-1\", \"not a device\"]\nb = []",
            "a = [",
            "cohorts.a[1]",
            "listed twice",
        ),
    ];
    for (after, needle, field, message) in cases {
        let text = one_rule(RULE, after);
        let err = RuleSet::parse(&text, Path::new(PATH)).expect_err(after);
        has(&err, &text, needle, field, message);
    }
    // An override moves values; it cannot change what the rule measures.
    let text = one_rule(
        "kind = \"rate\"\nrate = { fall = 4, within_s = 60 }",
        "[[overrides]]\nrule = \"r\"\nsite = \"s1\"\nset = { rate = { rise = 4, within_s = 60 } }",
    );
    let err = RuleSet::parse(&text, Path::new(PATH)).expect_err("direction");
    has(
        &err,
        &text,
        "set = { rate",
        "overrides[0].set",
        "not what the rule measures",
    );
    // The cohort case reports all three problems of the cohorts table.
    let text = one_rule(
        RULE,
        "[cohorts]\na = [\"dev-1\", \"dev-1\", \"not a device\"]\nb = []",
    );
    let err = RuleSet::parse(&text, Path::new(PATH)).expect_err("cohorts");
    assert_eq!(err.0.len(), 3, "{err}");
    has(&err, &text, "b = []", "cohorts.b", "at least one device");
    has(&err, &text, "a = [", "cohorts.a[2]", "");
}

#[test]
fn format_version_and_unreadable_files_are_reported() {
    let err = RuleSet::parse(
        &edit(EXAMPLE, "vitalmq-rules/v1", "vitalmq-rules/v2"),
        Path::new(PATH),
    )
    .expect_err("format");
    has(
        &err,
        EXAMPLE,
        "format = ",
        "format",
        "expected \"vitalmq-rules/v1\"",
    );
    let bad = edit(EXAMPLE, "version = \"2025-06-01.1\"", "version = \"\"");
    let err = RuleSet::parse(&bad, Path::new(PATH)).expect_err("version");
    has(&err, &bad, "version = \"\"", "version", "must match");
    let err = RuleSet::load(Path::new("/nonexistent/rules.toml")).expect_err("no file");
    assert!(
        err.to_string()
            .contains("/nonexistent/rules.toml: cannot read"),
        "{err}"
    );
}

#[test]
fn load_hashes_the_file_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rules.toml");
    std::fs::write(&path, EXAMPLE).expect("write");
    let set = RuleSet::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(set, example());
    assert_eq!(set.sha256().len(), 64);
}

#[test]
fn the_example_states_physiological_limits_and_clock_skew() {
    let set = example();
    let p = set.plausibility();
    assert_eq!(p.resolve_after, 5);
    let spo2 = p.range("spo2").expect("spo2 limits");
    assert_eq!((spo2.min, spo2.max, spo2.unit.as_str()), (0.0, 100.0, "%"));
    // The probes: impossible values out, alarming but possible values in.
    for v in [
        -5.0,
        18_446_744_073_709_551_615.0,
        -18_446_744_073_709_551_616.0,
        100.5,
    ] {
        assert!(!spo2.contains(v), "{v}");
    }
    for v in [0.0, 80.0, 100.0] {
        assert!(spo2.contains(v), "{v}");
    }
    assert!(!spo2.contains(f64::NAN));
    let temp = p.range("temp").expect("temp limits");
    assert_eq!(temp.unit, "°C");
    for metric in ["pulse", "resp", "sbp", "dbp"] {
        assert!(p.range(metric).is_some(), "{metric}");
    }
    assert!(
        p.range("steps").is_none(),
        "metrics without limits are not checked"
    );
    assert_eq!(set.clock().max_ahead_s, 300);
    assert_eq!(set.clock().max_behind_s, 604_800);

    // Both sections are optional, with documented defaults.
    let bare = one_rule("kind = \"threshold\"\nbelow = 90\nresolve_at = 92", "");
    let set = RuleSet::parse(&bare, Path::new(PATH)).unwrap_or_else(|e| panic!("{e}"));
    assert!(set.plausibility().limits.is_empty());
    assert_eq!(*set.clock(), ClockPolicy::default());
    assert_eq!(set.clock().max_ahead_s, 300);
}

#[test]
fn plausibility_and_clock_mistakes_are_named_with_line_and_field() {
    let bad = edit(
        EXAMPLE,
        "spo2 = { min = 0, max = 100, unit = \"%\" }",
        "spo2 = { min = 100, max = 0, unit = \"%\" }",
    );
    let bad = edit(&bad, "resolve_after = 5", "resolve_after = 0");
    let bad = edit(
        &bad,
        "pulse = { min = 20, max = 300, unit = \"/min\" }",
        "pulse = { min = 20, max = nan, unit = \"\" }\nSpO2 = { min = 0, max = 1, unit = \"x\" }",
    );
    let bad = edit(&bad, "max_ahead_s = 300", "max_ahead_s = 0");
    let bad = edit(&bad, "max_behind_s = 604800", "max_behind_s = 99999999999");
    let err = RuleSet::parse(&bad, Path::new(PATH)).expect_err("broken limits");
    has(
        &err,
        &bad,
        "spo2 = { min = 100",
        "plausibility.limits.spo2.max",
        "above min",
    );
    has(
        &err,
        &bad,
        "resolve_after = 0",
        "plausibility.resolve_after",
        "between 1 and",
    );
    has(
        &err,
        &bad,
        "pulse = { min = 20",
        "plausibility.limits.pulse.max",
        "finite",
    );
    has(
        &err,
        &bad,
        "pulse = { min = 20",
        "plausibility.limits.pulse.unit",
        "printable",
    );
    has(&err, &bad, "SpO2 = {", "plausibility.limits.SpO2", "[a-z]");
    has(
        &err,
        &bad,
        "max_ahead_s = 0",
        "clock.max_ahead_s",
        "between 1 and",
    );
    has(
        &err,
        &bad,
        "max_behind_s = 9",
        "clock.max_behind_s",
        "between 1 and",
    );
    assert_eq!(err.0.len(), 7, "{err}");

    let unknown = edit(EXAMPLE, "max_ahead_s = 300", "max_ahead_s = 300\nahead = 1");
    let err = RuleSet::parse(&unknown, Path::new(PATH)).expect_err("unknown key");
    assert!(
        err.to_string()
            .contains(&format!("{PATH}:{}", line_of(&unknown, "ahead = 1"))),
        "{err}"
    );
}

#[test]
fn the_example_states_how_alerts_are_acknowledged_silenced_and_mapped() {
    let set = example();
    let a = set.alerting();
    assert_eq!(a.ack_after_s(Severity::Urgent), Some(300));
    assert_eq!(a.ack_after_s(Severity::Review), Some(1800));
    assert_eq!(a.ack_after_s(Severity::Info), None);
    assert_eq!(
        set.handlers_for_level(0),
        None,
        "the example names no levels"
    );
    assert!(set.handler_names().is_empty());
    let hdu = site("site-hdu");
    let other = site("site-uk-03");
    assert_eq!(a.alarm_severity(&hdu, Severity::Review), Severity::Urgent);
    assert_eq!(a.alarm_severity(&hdu, Severity::Info), Severity::Info);
    assert_eq!(a.alarm_severity(&other, Severity::Review), Severity::Review);
    assert_eq!(a.silence.after_s(&device("dev-00001"), &other, None), 300);
    assert_eq!(a.silence.after_s(&device("dev-00001"), &hdu, None), 120);
    assert_eq!(a.silence.after_s(&device("dev-00077"), &hdu, None), 900);
    assert_eq!(
        a.silence.after_s(&device("dev-00001"), &other, Some(600)),
        1800,
        "a slow device's reported interval raises its silence time"
    );
    assert_eq!(
        a.silence.after_s(&device("dev-00001"), &other, Some(10)),
        300
    );
    assert_eq!(a.battery.low_below, 0.15);
    assert_eq!(a.battery.resolve_at, 0.25);

    // Without the sections: the SPEC defaults.
    let bare = RuleSet::parse(
        "format = \"vitalmq-rules/v1\"\nversion = \"1\"\n[quality]\nlow_below = 0.5\nmax_low_fraction = 0.5\nover_n = 20\n",
        Path::new("bare.toml"),
    )
    .expect("bare");
    assert_eq!(bare.alerting(), &crate::Alerting::default());
    assert_eq!(bare.alerting().ack_after_s(Severity::Urgent), Some(300));
}

/// Issue 18: the example lets info alerts expire after an hour and keeps review and
/// urgent ones deliverable however late; without `[alert_expiry]` nothing expires.
#[test]
fn the_example_expires_info_alerts_only_and_nothing_expires_by_default() {
    let a = example();
    let a = a.alerting();
    assert_eq!(a.expiry_after_s(Severity::Info), Some(3600));
    assert_eq!(a.expiry_after_s(Severity::Review), None);
    assert_eq!(a.expiry_after_s(Severity::Urgent), None);
    let text = edit(EXAMPLE, "[alert_expiry]\ninfo_s = 3600\n", "");
    let set = RuleSet::parse(&text, Path::new(PATH)).expect("valid");
    for sev in [Severity::Info, Severity::Review, Severity::Urgent] {
        assert_eq!(set.alerting().expiry_after_s(sev), None, "{sev}");
    }
    let text = edit(
        EXAMPLE,
        "info_s = 3600\n",
        "info_s = 2\nreview_s = 604800\nurgent_s = 1\n",
    );
    let set = RuleSet::parse(&text, Path::new(PATH)).expect("valid");
    let a = set.alerting();
    assert_eq!(a.expiry_after_s(Severity::Info), Some(2));
    assert_eq!(a.expiry_after_s(Severity::Review), Some(604_800));
    assert_eq!(a.expiry_after_s(Severity::Urgent), Some(1));
}

/// Zero (which could mean "at once" or "never") and more than seven days are refused
/// with file, line and field, as are unknown severities.
#[test]
fn alert_expiry_mistakes_are_named_with_line_and_field() {
    let text = edit(
        EXAMPLE,
        "info_s = 3600\n",
        "info_s = 0\nreview_s = 604801\nloud_s = 5\n",
    );
    let err = RuleSet::parse(&text, Path::new(PATH)).expect_err("unknown key");
    assert!(
        err.to_string().contains("loud_s")
            && err
                .to_string()
                .contains(&format!("{PATH}:{}", line_of(&text, "loud_s = 5"))),
        "{err}"
    );
    let text = edit(
        EXAMPLE,
        "info_s = 3600\n",
        "info_s = 0\nreview_s = 604801\n",
    );
    let err = RuleSet::parse(&text, Path::new(PATH)).expect_err("invalid");
    has(
        &err,
        &text,
        "info_s = 0\nreview_s = 604801",
        "alert_expiry.info_s",
        "at least 1 (leave the severity out for no expiry)",
    );
    has(
        &err,
        &text,
        "review_s = 604801",
        "alert_expiry.review_s",
        "at most 604800",
    );
    assert_eq!(err.0.len(), 2, "{err}");
}

#[test]
fn escalation_levels_route_handlers_and_the_last_level_repeats() {
    let text =
        format!("{EXAMPLE}\n[escalation]\nlevels = [[\"mqtt\"], [\"mqtt\", \"webhook:pager\"]]\n");
    let set = RuleSet::parse(&text, Path::new(PATH)).expect("valid");
    assert_eq!(set.handlers_for_level(0), Some(&["mqtt".to_owned()][..]));
    let pager = ["mqtt".to_owned(), "webhook:pager".to_owned()];
    assert_eq!(set.handlers_for_level(1), Some(&pager[..]));
    assert_eq!(set.handlers_for_level(7), Some(&pager[..]));
    assert_eq!(
        set.handler_names().into_iter().collect::<Vec<_>>(),
        ["mqtt", "webhook:pager"]
    );
}

#[test]
fn alert_handling_mistakes_are_named_with_line_and_field() {
    let text = format!(
        "{}\n[escalation]\nlevels = [[\"mqtt\", \"pager\"], []]\n",
        EXAMPLE
            .replace("urgent_s = 300", "urgent_s = 99999999")
            .replace("interval_factor = 3", "interval_factor = 0.5")
            .replace("cohorts = { copd = 900 }", "cohorts = { nope = 900 }")
            .replace("review = \"urgent\"", "review = \"loud\"")
            .replace("resolve_at = 0.25", "resolve_at = 0.1")
    );
    let err = RuleSet::parse(&text, Path::new(PATH)).expect_err("invalid");
    has(
        &err,
        &text,
        "urgent_s = 99999999",
        "acknowledge.urgent_s",
        "at most",
    );
    has(
        &err,
        &text,
        "interval_factor = 0.5",
        "silence.interval_factor",
        "between 1",
    );
    has(
        &err,
        &text,
        "cohorts = { nope",
        "silence.cohorts.nope",
        "no cohort `nope`",
    );
    has(
        &err,
        &text,
        "review = \"loud\"",
        "alarms.sites.site-hdu.review",
        "severity",
    );
    has(
        &err,
        &text,
        "resolve_at = 0.1",
        "battery.resolve_at",
        "hysteresis",
    );
    has(
        &err,
        &text,
        "levels = [[",
        "escalation.levels[0][1]",
        "not a handler name",
    );
    has(
        &err,
        &text,
        "levels = [[",
        "escalation.levels[1]",
        "at least one handler",
    );
}
