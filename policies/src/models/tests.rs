//! Tests of the shipped example, of every validation error (each named with file, line
//! and field) and of resolution and roles.

use super::*;

const EXAMPLE: &str = include_str!("../../examples/models.toml");
const PATH: &str = "policies/models.toml";

fn parse(text: &str) -> Result<ModelRegistry, PolicyErrors> {
    ModelRegistry::parse(text, Path::new(PATH))
}

fn example() -> ModelRegistry {
    parse(EXAMPLE).unwrap_or_else(|e| panic!("{e}"))
}

fn line_of(text: &str, needle: &str) -> usize {
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle} not in text"));
    text[..at].matches('\n').count() + 1
}

/// Replaces exactly one occurrence, so a test cannot silently edit the wrong entry.
fn edit(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "`{from}` must occur once");
    text.replace(from, to)
}

fn site(s: &str) -> SiteId {
    SiteId::new(s).expect("site id")
}

/// Asserts a problem at `needle`'s line for `field` whose message contains `message`.
#[track_caller]
fn has(err: &PolicyErrors, text: &str, needle: &str, field: &str, message: &str) {
    let want = format!("{PATH}:{}: {field}: ", line_of(text, needle));
    assert!(
        err.0
            .iter()
            .any(|e| e.to_string().starts_with(&want) && e.message.contains(message)),
        "no `{want}...{message}` in:\n{err}"
    );
}

const SERVER: &str = r#"format = "vitalmq-models/v1"

[[models]]
name = "news2"
version = "v1"
kind = "score"
artifact_sha256 = "0000000000000000000000000000000000000000000000000000000000000001"
lineage = "l"
feature_pipeline = "f"
intended_use = "u"
status = "approved"
approved_by = "board"
approved_at = "2025-01-01T00:00:00Z"

[[models]]
name = "news2"
version = "v2"
kind = "score"
artifact_sha256 = "0000000000000000000000000000000000000000000000000000000000000002"
lineage = "l"
feature_pipeline = "f"
intended_use = "u"
status = "draft"

[[models]]
name = "news2"
version = "v3"
kind = "score"
artifact_sha256 = "0000000000000000000000000000000000000000000000000000000000000003"
lineage = "l"
feature_pipeline = "f"
intended_use = "u"
status = "approved"
approved_by = "board"
approved_at = "2025-01-02T00:00:00Z"

[[models]]
name = "det"
version = "1"
kind = "device"
artifact_sha256 = "0000000000000000000000000000000000000000000000000000000000000004"
lineage = "l"
feature_pipeline = "f"
intended_use = "u"
status = "approved"
approved_by = "board"
approved_at = "2025-01-01T00:00:00Z"
"#;

#[test]
fn the_example_loads() {
    let reg = example();
    assert_eq!(reg.unapproved_alarms(), UnapprovedAlarms::Deliver);
    assert_eq!(reg.entries().len(), 5);
    let rc = reg.entry("arrhythmia-net", "2.2.0-rc1").expect("rc1");
    assert_eq!(
        (rc.kind, rc.approval.as_str()),
        (ModelKind::Device, "draft")
    );
    let ok = reg.entry("arrhythmia-net", "2.1.0").expect("2.1.0");
    assert!(ok.approval.is_approved());
    assert_eq!(
        ok.approved_for.firmware.as_ref().map(ToString::to_string),
        Some(">=5.0, <6".to_owned())
    );
    assert!(matches!(
        reg.entry("arrhythmia-net", "2.0.3").map(|e| &e.approval),
        Some(Approval::Withdrawn {
            approved: Some(_),
            ..
        })
    ));
    let rollout = reg.rollout("news2").expect("news2 rollout");
    assert_eq!(
        (rollout.live.as_str(), rollout.shadow.len()),
        ("rcp-2017.1", 0)
    );
    assert_eq!(
        reg.sha256(),
        hex::encode(Sha256::digest(EXAMPLE.as_bytes()))
    );
}

/// The registry's digests of the shipped score table and rule set are those files'.
#[test]
fn example_digests_match_the_shipped_artifacts() {
    let reg = example();
    for (name, version, file) in [
        (
            "news2",
            "rcp-2017.1",
            include_str!("../../examples/news2.toml"),
        ),
        (
            "rules",
            "2025-06-01.1",
            include_str!("../../examples/rules.toml"),
        ),
    ] {
        let entry = reg.entry(name, version).expect("entry");
        assert_eq!(
            entry.artifact_sha256,
            hex::encode(Sha256::digest(file.as_bytes())),
            "{name}/{version}: update artifact_sha256 in policies/examples/models.toml \
             when the artifact changes"
        );
    }
    // The rule set entry names the version the shipped rule file states.
    let rules = crate::RuleSet::parse(
        include_str!("../../examples/rules.toml"),
        Path::new("rules.toml"),
    )
    .expect("rules");
    assert!(reg.entry("rules", rules.version()).is_some());
}

#[test]
fn toml_errors_and_unknown_fields_are_placed() {
    let text = edit(
        EXAMPLE,
        "lineage = \"ds://ecg-holter/2023-09\"",
        "lineage = \"x\"\ncolour = \"red\"",
    );
    let err = parse(&text).unwrap_err();
    assert_eq!(err.0.len(), 1);
    assert_eq!(err.0[0].line, Some(line_of(&text, "colour")));
    assert!(err.0[0].message.contains("colour"), "{err}");
}

#[test]
fn every_entry_problem_is_reported_at_once() {
    let mut text = EXAMPLE.to_owned();
    for (from, to) in [
        (
            "format = \"vitalmq-models/v1\"",
            "format = \"vitalmq-models/v9\"",
        ),
        (
            "unapproved_alarms = \"deliver\"",
            "unapproved_alarms = \"drop\"",
        ),
        ("name = \"news2\"", "name = \"news 2\""),
        ("version = \"2.0.3\"", "version = \"2.0/3\""),
        (
            "kind = \"device\"                       #",
            "kind = \"gadget\"                       #",
        ),
        (
            "artifact_sha256 = \"9c2d5e8f1a4b7c0d3e6f9a2b5c8d1e4f7a0b3c6d9e2f5a8b1c4d7e0f3a6b9c2d\"",
            "artifact_sha256 = \"9C2D\"",
        ),
        ("lineage = \"ds://ecg-holter/2023-09\"", "lineage = \"  \""),
        (
            "feature_pipeline = \"ecg-fp/3.3\"",
            "feature_pipeline = \"a\\u0007b\"",
        ),
        ("firmware = \">=5.0, <6\"", "firmware = \"five or later\""),
        (
            "hardware_models = [\"vw-band-2\", \"vw-band-3\"]",
            "hardware_models = [\"vw band\", \"x\", \"x\"]",
        ),
        ("sites = []", "sites = [\"no site!\"]"),
        (
            "withdrawn_at = \"2025-05-20T09:00:00Z\"",
            "withdrawn_at = \"yesterday\"",
        ),
        (
            "approved_at = \"2025-06-01T09:00:00Z\"\n\n# The alert",
            "approved_at = \"soon\"\n\n# The alert",
        ),
    ] {
        text = edit(&text, from, to);
    }
    let err = parse(&text).unwrap_err();
    has(&err, &text, "vitalmq-models/v9", "format", "expected");
    has(
        &err,
        &text,
        "\"drop\"",
        "policy.unapproved_alarms",
        "deliver",
    );
    has(&err, &text, "news 2", "models[3].name", "");
    has(&err, &text, "2.0/3", "models[2].version", "");
    has(&err, &text, "gadget", "models[0].kind", "device");
    has(
        &err,
        &text,
        "9C2D",
        "models[1].artifact_sha256",
        "64 lowercase hex",
    );
    has(
        &err,
        &text,
        "lineage = \"  \"",
        "models[2].lineage",
        "empty",
    );
    has(
        &err,
        &text,
        "a\\u0007b",
        "models[1].feature_pipeline",
        "control",
    );
    has(
        &err,
        &text,
        "five or later",
        "models[0].approved_for.firmware",
        "semver",
    );
    has(
        &err,
        &text,
        "vw band",
        "models[0].approved_for.hardware_models[0]",
        "",
    );
    has(
        &err,
        &text,
        "vw band",
        "models[0].approved_for.hardware_models[2]",
        "twice",
    );
    has(
        &err,
        &text,
        "no site!",
        "models[0].approved_for.sites[0]",
        "",
    );
    has(&err, &text, "yesterday", "models[2].withdrawn_at", "");
    has(&err, &text, "\"soon\"", "models[3].approved_at", "");
    // news2 is refused, so its rollout names no model
    has(
        &err,
        &text,
        "model = \"news2\"",
        "rollout[0].model",
        "no model `news2`",
    );
    assert_eq!(err.0.len(), 15, "{err}");
}

#[test]
fn approval_needs_its_fields_and_only_its_fields() {
    // approved without approver and date
    let text = edit(EXAMPLE, "status = \"draft\"", "status = \"approved\" # rc");
    let err = parse(&text).unwrap_err();
    has(
        &err,
        &text,
        "\"approved\" # rc",
        "models[1].approved_by",
        "needs approved_by",
    );
    // approver without date
    let text = edit(
        EXAMPLE,
        "status = \"draft\"",
        "status = \"approved\"\napproved_by = \"board\"",
    );
    let err = parse(&text).unwrap_err();
    has(
        &err,
        &text,
        "approved_by = \"board\"",
        "models[1].approved_at",
        "missing",
    );
    // a draft with an approval
    let text = edit(
        EXAMPLE,
        "status = \"draft\"",
        "status = \"draft\"\napproved_by = \"board\"\napproved_at = \"2025-01-01T00:00:00Z\"",
    );
    let err = parse(&text).unwrap_err();
    has(
        &err,
        &text,
        "approved_by = \"board\"",
        "models[1].approved_by",
        "draft",
    );
    // withdrawn without date and reason; withdrawal fields on an approved entry
    let text = edit(
        EXAMPLE,
        "withdrawn_at = \"2025-05-20T09:00:00Z\"\nwithdrawn_reason = \"FSN-2025-014: missed episodes under motion artefact\"",
        "",
    );
    let text = edit(
        &text,
        "hardware_models = [\"vw-band-2\", \"vw-band-3\"]",
        "hardware_models = []\n[[models.x]]",
    );
    let err = parse(&text).unwrap_err();
    assert_eq!(err.0.len(), 1, "TOML errors come alone: {err}");
    let text = edit(
        EXAMPLE,
        "withdrawn_at = \"2025-05-20T09:00:00Z\"\nwithdrawn_reason = \"FSN-2025-014: missed episodes under motion artefact\"",
        "",
    );
    let text = edit(
        &text,
        "approved_at = \"2025-05-20T09:00:00Z\"\n[models.approved_for]",
        "approved_at = \"2025-05-20T09:00:00Z\"\nwithdrawn_reason = \"why\"\n[models.approved_for]",
    );
    let err = parse(&text).unwrap_err();
    has(
        &err,
        &text,
        "status = \"withdrawn\"",
        "models[2].withdrawn_at",
        "missing",
    );
    has(
        &err,
        &text,
        "status = \"withdrawn\"",
        "models[2].withdrawn_reason",
        "missing",
    );
    has(
        &err,
        &text,
        "withdrawn_reason = \"why\"",
        "models[0].withdrawn_reason",
        "only for",
    );
    assert_eq!(err.0.len(), 3, "{err}");
    // an unknown status
    let text = edit(EXAMPLE, "status = \"draft\"", "status = \"pending\"");
    let err = parse(&text).unwrap_err();
    has(&err, &text, "pending", "models[1].status", "draft");
}

#[test]
fn a_model_version_is_listed_once() {
    let first = &SERVER[SERVER.find("[[models]]").expect("models")..];
    let first = &first[..first.find("\n\n").expect("end of entry")];
    let text = format!("{SERVER}\n{first}\n");
    let err = parse(&text).unwrap_err();
    assert_eq!(err.0.len(), 1, "{err}");
    assert_eq!(err.0[0].field.as_deref(), Some("models[4].version"));
    let dup = text.rfind("version = \"v1\"").expect("duplicate");
    assert_eq!(err.0[0].line, Some(text[..dup].matches('\n').count() + 1));
    assert!(
        err.0[0].message.contains("`news2/v1` is listed twice"),
        "{err}"
    );
}

#[test]
fn rollouts_are_validated() {
    let ok = format!(
        "{SERVER}\n[[rollout]]\nmodel = \"news2\"\nlive = \"v1\"\nshadow = [\"v2\"]\ncanary = [{{ version = \"v3\", sites = [\"site-b\"], cohorts = [\"copd\"] }}]\n"
    );
    let reg = parse(&ok).unwrap_or_else(|e| panic!("{e}"));
    let r = reg.rollout("news2").expect("rollout");
    assert_eq!(
        (r.live.as_str(), r.shadow.clone()),
        ("v1", vec!["v2".to_owned()])
    );
    assert_eq!(r.canary[0].sites.iter().next(), Some(&site("site-b")));

    let bad = format!(
        "{SERVER}
[[rollout]]
model = \"news2\"
live = \"v2\"
shadow = [\"v1\", \"v3\", \"v9\", \"v3\"]
canary = [{{ version = \"v3\", sites = [\"site-b\"] }}, {{ version = \"v1\", cohorts = [] }}, {{ version = \"v8\", sites = [\"bad site\"], cohorts = [\"-x\"] }}]

[[rollout]]
model = \"det\"
live = \"1\"

[[rollout]]
model = \"nothing\"
live = \"1\"
"
    );
    let err = parse(&bad).unwrap_err();
    let field = |f: &str| {
        err.0
            .iter()
            .filter(|e| e.field.as_deref() == Some(f))
            .count()
    };
    let line = |needle: &str| line_of(&bad, needle);
    let at = |f: &str| {
        err.0
            .iter()
            .find(|e| e.field.as_deref() == Some(f))
            .unwrap_or_else(|| panic!("no {f} in {err}"))
    };
    assert!(
        at("rollout[0].live")
            .message
            .contains("draft: the live version must be approved")
    );
    assert_eq!(at("rollout[0].live").line, Some(line("live = \"v2\"")));
    assert!(
        at("rollout[0].shadow[2]")
            .message
            .contains("no version `v9`")
    );
    assert!(at("rollout[0].shadow[3]").message.contains("twice"));
    assert_eq!(
        field("rollout[0].shadow[0]") + field("rollout[0].shadow[1]"),
        0
    );
    assert!(
        at("rollout[0].canary[0].version")
            .message
            .contains("shadow version too")
    );
    assert!(
        at("rollout[0].canary[1].version")
            .message
            .contains("shadow version too")
    );
    assert!(
        at("rollout[0].canary[1].sites")
            .message
            .contains("at least one site or cohort")
    );
    assert!(
        at("rollout[0].canary[2].version")
            .message
            .contains("no version `v8`")
    );
    assert_eq!(field("rollout[0].canary[2].sites[0]"), 1);
    assert_eq!(field("rollout[0].canary[2].cohorts[0]"), 1);
    assert!(
        at("rollout[1].model")
            .message
            .contains("score and rules models only")
    );
    assert!(
        at("rollout[2].model")
            .message
            .contains("no model `nothing`")
    );
    assert_eq!(
        at("rollout[2].model").line,
        Some(line("model = \"nothing\""))
    );

    let twice = format!(
        "{SERVER}\n[[rollout]]\nmodel = \"news2\"\nlive = \"v1\"\n\n[[rollout]]\nmodel = \"news2\"\nlive = \"v1\"\n"
    );
    let err = parse(&twice).unwrap_err();
    assert_eq!(err.0.len(), 1, "{err}");
    assert_eq!(err.0[0].field.as_deref(), Some("rollout[1].model"));
    assert!(err.0[0].message.contains("has a rollout already"));
    let canary_twice = format!(
        "{SERVER}\n[[rollout]]\nmodel = \"news2\"\nlive = \"v1\"\ncanary = [{{ version = \"v3\", sites = [\"a\"] }}, {{ version = \"v3\", sites = [\"b\"] }}]\n"
    );
    let err = parse(&canary_twice).unwrap_err();
    assert_eq!(err.0.len(), 1, "{err}");
    assert_eq!(
        err.0[0].field.as_deref(),
        Some("rollout[0].canary[1].version")
    );
}

#[test]
fn resolve_names_every_status() {
    let reg = example();
    let s = site("site-a");
    let fleet = |fw: Option<&'static str>, hw: Option<&'static str>| DeviceFacts {
        site: None,
        cohorts: &[],
        fw,
        hardware_model: hw,
    };
    let good = DeviceFacts {
        site: Some(&s),
        ..fleet(Some("5.12.1"), Some("vw-band-3"))
    };
    let r = |m: Option<&str>, f: &DeviceFacts<'_>| reg.resolve(m, f);
    assert_eq!(
        r(Some("arrhythmia-net/2.1.0"), &good),
        ModelStatus::Approved
    );
    assert_eq!(
        r(Some("arrhythmia-net/2.2.0-rc1"), &good),
        ModelStatus::Unapproved
    );
    assert_eq!(
        r(Some("arrhythmia-net/2.0.3"), &good),
        ModelStatus::Withdrawn
    );
    assert_eq!(r(Some("arrhythmia-net/9.9.9"), &good), ModelStatus::Unknown);
    assert_eq!(r(Some("arrhythmia-net"), &good), ModelStatus::Unknown);
    assert_eq!(r(Some(""), &good), ModelStatus::Unknown);
    // a score is not a device model
    assert_eq!(r(Some("news2/rcp-2017.1"), &good), ModelStatus::Unknown);
    assert_eq!(r(None, &good), ModelStatus::None);
    // firmware outside the range, unparseable or unknown; hardware not listed or unknown
    for facts in [
        fleet(Some("6.0.0"), Some("vw-band-3")),
        fleet(Some("4.9"), Some("vw-band-3")),
        fleet(Some("five"), Some("vw-band-3")),
        fleet(None, Some("vw-band-3")),
        fleet(Some("5.1"), Some("vw-band-1")),
        fleet(Some("5.1"), None),
    ] {
        assert_eq!(
            r(Some("arrhythmia-net/2.1.0"), &facts),
            ModelStatus::OutOfCohort,
            "{facts:?}"
        );
    }
    assert_eq!(
        r(
            Some("arrhythmia-net/2.1.0"),
            &fleet(Some("5"), Some("vw-band-2"))
        ),
        ModelStatus::Approved
    );
    assert_eq!(
        r(
            Some("arrhythmia-net/2.1.0"),
            &fleet(Some("v5.0.1"), Some("vw-band-2"))
        ),
        ModelStatus::Approved
    );
    assert!(ModelStatus::OutOfCohort.needs_attention() && !ModelStatus::None.needs_attention());
    for s in ModelStatus::ALL {
        assert_eq!(ModelStatus::parse(s.as_str()), Some(s));
    }
}

#[test]
fn resolve_checks_sites_and_cohorts() {
    let text = edit(EXAMPLE, "sites = []", "sites = [\"site-a\"]");
    let text = edit(&text, "cohorts = []", "cohorts = [\"copd\", \"chf\"]");
    let reg = parse(&text).unwrap_or_else(|e| panic!("{e}"));
    let (a, b) = (site("site-a"), site("site-b"));
    let facts = |site: &'static SiteId, cohorts: &'static [&'static str]| DeviceFacts {
        site: Some(site),
        cohorts,
        fw: Some("5.12.1"),
        hardware_model: Some("vw-band-2"),
    };
    let a: &'static SiteId = Box::leak(Box::new(a));
    let b: &'static SiteId = Box::leak(Box::new(b));
    let m = Some("arrhythmia-net/2.1.0");
    assert_eq!(reg.resolve(m, &facts(a, &["chf"])), ModelStatus::Approved);
    assert_eq!(
        reg.resolve(m, &facts(a, &["x", "copd"])),
        ModelStatus::Approved
    );
    assert_eq!(reg.resolve(m, &facts(a, &[])), ModelStatus::OutOfCohort);
    assert_eq!(
        reg.resolve(m, &facts(b, &["copd"])),
        ModelStatus::OutOfCohort
    );
    let no_site = DeviceFacts {
        site: None,
        ..facts(a, &["copd"])
    };
    assert_eq!(reg.resolve(m, &no_site), ModelStatus::OutOfCohort);
}

#[test]
fn roles_follow_the_rollout() {
    let text = format!(
        "{SERVER}\n[[rollout]]\nmodel = \"news2\"\nlive = \"v1\"\nshadow = [\"v2\"]\ncanary = [{{ version = \"v3\", sites = [\"site-b\"], cohorts = [\"copd\"] }}]\n"
    );
    let reg = parse(&text).unwrap_or_else(|e| panic!("{e}"));
    let (a, b) = (site("site-a"), site("site-b"));
    let role = |v: &str, s: &SiteId, c: &[&str]| reg.role("news2", v, s, c);
    // elsewhere: v1 live, v2 shadow, v3 does not run
    assert_eq!(role("v1", &a, &[]), Some(ModelRole::Live));
    assert_eq!(role("v2", &a, &[]), Some(ModelRole::Shadow));
    assert_eq!(role("v3", &a, &[]), None);
    // canary site and canary cohort: v3 delivers, v1 runs as shadow
    for (s, c) in [(&b, &[][..]), (&a, &["copd"][..])] {
        assert_eq!(role("v3", s, c), Some(ModelRole::Canary));
        assert_eq!(role("v1", s, c), Some(ModelRole::Shadow));
        assert_eq!(role("v2", s, c), Some(ModelRole::Shadow));
        assert_eq!(
            reg.running("news2", s, c),
            vec![
                ("v3", ModelRole::Canary),
                ("v1", ModelRole::Shadow),
                ("v2", ModelRole::Shadow)
            ]
        );
    }
    assert_eq!(
        reg.running("news2", &a, &[]),
        vec![("v1", ModelRole::Live), ("v2", ModelRole::Shadow)]
    );
    assert_eq!(role("v9", &a, &[]), None);
    assert_eq!(reg.role("det", "1", &a, &[]), None);
    assert!(reg.running("det", &a, &[]).is_empty());
    assert!(
        ModelRole::Canary.delivers() && ModelRole::Live.delivers() && !ModelRole::Shadow.delivers()
    );
}

#[test]
fn withhold_policy_is_read() {
    let text = edit(
        EXAMPLE,
        "unapproved_alarms = \"deliver\"",
        "unapproved_alarms = \"withhold\"",
    );
    assert_eq!(
        parse(&text).expect("ok").unapproved_alarms(),
        UnapprovedAlarms::Withhold
    );
    let text = edit(EXAMPLE, "[policy]\n", "[policy]\nflavour = 1\n");
    assert!(parse(&text).is_err());
}

#[test]
fn the_quiet_period_is_read_and_bounded() {
    assert_eq!(parse(EXAMPLE).expect("ok").unapproved_quiet_minutes(), 60);
    let text = edit(EXAMPLE, "unapproved_quiet_minutes = 60\n", "");
    assert_eq!(
        parse(&text).expect("ok").unapproved_quiet_minutes(),
        60,
        "default"
    );
    let text = edit(
        EXAMPLE,
        "unapproved_quiet_minutes = 60",
        "unapproved_quiet_minutes = 15",
    );
    assert_eq!(parse(&text).expect("ok").unapproved_quiet_minutes(), 15);
    for bad in ["0", "-5", "10081"] {
        let line = format!("unapproved_quiet_minutes = {bad}");
        let text = edit(EXAMPLE, "unapproved_quiet_minutes = 60", &line);
        let err = parse(&text).unwrap_err();
        has(
            &err,
            &text,
            &line,
            "policy.unapproved_quiet_minutes",
            "1 to 10080",
        );
    }
    let text = edit(
        EXAMPLE,
        "unapproved_quiet_minutes = 60",
        "unapproved_quiet_minutes = \"soon\"",
    );
    assert!(parse(&text).is_err());
}

/// Firmware strings that are not (padded) semver versions, and pre-releases, meet no
/// firmware requirement: the model is `out_of_cohort` there (fails closed), as
/// docs/models.md says.
#[test]
fn odd_firmware_strings_fail_closed() {
    let reg = example();
    let m = Some("arrhythmia-net/2.1.0");
    let facts = |fw: &'static str| DeviceFacts {
        site: None,
        cohorts: &[],
        fw: Some(fw),
        hardware_model: Some("vw-band-2"),
    };
    for fw in ["5.1.2.4", "05.1", "5.2.0-rc1", "5.x", "5.1 ", ""] {
        assert_eq!(
            reg.resolve(m, &facts(fw)),
            ModelStatus::OutOfCohort,
            "{fw:?}"
        );
    }
    for fw in ["5", "5.1", "5.1.2", "v5.1.2", "5.1.2+build.7"] {
        assert_eq!(reg.resolve(m, &facts(fw)), ModelStatus::Approved, "{fw:?}");
    }
}

/// An approved entry without `[models.approved_for]`, or with every list empty and no
/// firmware, covers every device, even one of which nothing is known.
#[test]
fn an_approval_without_approved_for_covers_every_device() {
    let unknown = DeviceFacts::default();
    let text = edit(
        EXAMPLE,
        "firmware = \">=5.0, <6\"                # semver requirement on the device's `fw`\n",
        "",
    );
    let text = edit(
        &text,
        "hardware_models = [\"vw-band-2\", \"vw-band-3\"]",
        "hardware_models = []",
    );
    let reg = parse(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        reg.resolve(Some("arrhythmia-net/2.1.0"), &unknown),
        ModelStatus::Approved
    );
    // the draft approved as is: it has no approved_for at all
    let text = edit(
        EXAMPLE,
        "status = \"draft\"",
        "status = \"approved\"\napproved_by = \"b\"\napproved_at = \"2026-01-01T00:00:00Z\"",
    );
    let reg = parse(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        reg.resolve(Some("arrhythmia-net/2.2.0-rc1"), &unknown),
        ModelStatus::Approved
    );
}

/// A canary delivers clinical alerts where it runs: a draft or withdrawn version may be
/// a shadow (it delivers nothing), never a canary.
#[test]
fn a_canary_must_be_approved_a_shadow_need_not() {
    let with = |server: &str, r: &str| {
        format!("{server}\n[[rollout]]\nmodel = \"news2\"\nlive = \"v1\"\n{r}\n")
    };
    let canary_error = |text: &str, status: &str| {
        let err = parse(text).unwrap_err();
        let e = err
            .0
            .iter()
            .find(|e| e.field.as_deref() == Some("rollout[0].canary[0].version"))
            .unwrap_or_else(|| panic!("no canary error in {err}"));
        assert!(
            e.message
                .contains(&format!("{status}: a canary version must be approved")),
            "{e:?}"
        );
        assert_eq!(e.line, Some(line_of(text, "canary = [")));
    };
    // v2 is a draft.
    let draft = with(
        SERVER,
        "canary = [{ version = \"v2\", sites = [\"site-b\"] }]",
    );
    canary_error(&draft, "draft");
    parse(&with(SERVER, "shadow = [\"v2\"]")).unwrap_or_else(|e| panic!("{e}"));

    // v3 withdrawn.
    let approved =
        "status = \"approved\"\napproved_by = \"board\"\napproved_at = \"2025-01-02T00:00:00Z\"\n";
    assert_eq!(SERVER.matches(approved).count(), 1);
    let server = SERVER.replace(
        approved,
        "status = \"withdrawn\"\napproved_by = \"board\"\napproved_at = \"2025-01-02T00:00:00Z\"\n\
         withdrawn_at = \"2025-03-01T00:00:00Z\"\nwithdrawn_reason = \"FSN\"\n",
    );
    let withdrawn = with(
        &server,
        "canary = [{ version = \"v3\", cohorts = [\"copd\"] }]",
    );
    canary_error(&withdrawn, "withdrawn");
    parse(&with(&server, "shadow = [\"v3\"]")).unwrap_or_else(|e| panic!("{e}"));
}
