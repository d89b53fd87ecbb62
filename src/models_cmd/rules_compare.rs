//! `vitalmq models compare` for a rule set (registry kind `rules`): two versions'
//! alert changes over a period, delivered ones from `alerts` and would-be ones from
//! `shadow_alerts`. Pure over what was read (the reader is [`rows`]), so the
//! definitions are tested here:
//!
//! - **Period**: changes the bridge recorded in it (`created_at_ms`, its clock), on
//!   both sides, as the score compare does.
//! - **Which version**: a delivered change belongs to the version whose registry
//!   `artifact_sha256` is the alert's `policy_sha256` (clinical rule alerts only:
//!   device alarms, score alerts and no-data alerts are other sources); a shadow
//!   change names its version. Shadow changes of the operational rules
//!   (`ops/signal_quality`, `ops/sensor_fault`) are left out (`ops_rows`): their
//!   delivered counterparts are operational alerts, not compared here.
//! - **Rows** per version and role (`delivered`, or the shadow row's role), and
//!   **opens** per rule per version, delivered and shadow.
//! - **Episodes**: the changes of one `alert_id` of one version, from its `open` to its
//!   `resolved` (still open at the end of the period: open-ended). An episode whose
//!   open is not in the period is not counted (`partial_episodes`). Times are the
//!   changes' own (`raised_at` of the reading behind it).
//! - **Scope**: only episodes of devices where BOTH versions run are compared (under
//!   a canary, a device outside it runs the live version alone: counting its episodes
//!   as `only_from` would make agreement measure the canary's reach). A version runs
//!   where the bridge loads it and the rollout gives it a role, as the bridge decides:
//!   loaded means the `version` of the base rule set (`[alerts] rules`) or of one of
//!   `[alerts] candidates` of the config `--config` names (`loaded_versions`; a version
//!   with a role but no file never runs); the role is `ModelRegistry::role` of the
//!   models file in force (the one that config names) with the site recorded with the
//!   episode's open change and the device's cohorts in the base rule set. The other
//!   episodes are counted per version (`outside_scope`; all of them when a compared
//!   version is not loaded). A rollout
//!   changed during the period is not reconstructed: the scope is judged by the
//!   rollout in force now. `opens` and episodes are of the scope; `rows` are all
//!   rows read.
//! - **Pairing**: a `from` episode and a `to` episode of the same device and rule
//!   whose intervals overlap (touching counts); `from` episodes in open order, each
//!   paired with the earliest-opened unpaired `to` episode that overlaps it.
//!   `agreement = paired / (paired + only_from + only_to)`.
//! - **Timing**: for the pairs, `to` open minus `from` open, seconds: median, min, max.
//!
//! Only aggregates come out: never a patient reference, a device or a value. Rows of
//! an erased patient are skipped and counted; a sealed row this process cannot open
//! stops the comparison (read as absent it would count as disagreement).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Serialize;
use serde_json::Value as Json;
use vitalmq_bridge::store::{Payload, Store};
use vitalmq_envelope::DeviceId;
use vitalmq_policies::{ModelRegistry, RuleSet, SiteId};

/// One alert change as the comparison takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub alert_id: String,
    pub version: String,
    /// `delivered`, or the shadow row's role (`shadow`).
    pub role: String,
    pub device: String,
    /// The site the bridge evaluated the reading for (recorded with the change).
    pub site: String,
    pub rule: String,
    pub state: String,
    /// The change's own time (the reading behind it).
    pub at_ms: u64,
}

impl Change {
    fn delivered(&self) -> bool {
        self.role == "delivered"
    }
}

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Opens {
    pub delivered: BTreeMap<String, u64>,
    pub shadow: BTreeMap<String, u64>,
}

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Episodes {
    /// Episodes per version.
    pub per_version: BTreeMap<String, u64>,
    pub paired: usize,
    pub only_from: usize,
    pub only_to: usize,
    /// Alert ids whose open is not in the period (not counted).
    pub partial: usize,
    /// Episodes per version of devices where, under the rollout in force, the other
    /// version has no role (not compared).
    pub outside_scope: BTreeMap<String, u64>,
    pub agreement_pct: Option<f64>,
    /// `to` open minus `from` open over the pairs, seconds.
    pub open_diff_median_s: Option<f64>,
    pub open_diff_min_s: Option<f64>,
    pub open_diff_max_s: Option<f64>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Report {
    pub model: String,
    pub kind: &'static str,
    pub from: String,
    pub to: String,
    /// The registry digest of each version (what delivered alerts are matched by).
    pub from_sha256: String,
    pub to_sha256: String,
    /// How the compared devices were chosen (see [`SCOPE`]).
    pub scope: &'static str,
    /// SHA-256 of the models file whose rollout judged the scope.
    pub scope_models_sha256: String,
    /// The rule set versions the bridge config loads (base and candidates), sorted: a
    /// compared version not among them runs nowhere, so nothing is in the scope.
    pub loaded_versions: Vec<String>,
    /// Rows read per version and role.
    pub rows: BTreeMap<String, BTreeMap<String, u64>>,
    /// `open` changes per version, per rule.
    pub opens: BTreeMap<String, Opens>,
    pub episodes: Episodes,
    /// Delivered clinical alert rows in the period whose patient was erased (their
    /// version cannot be told): not compared.
    pub erased_rows: u64,
    /// Shadow rows of the two versions in the period whose patient was erased.
    pub erased_shadow_rows: u64,
    /// Shadow rows of operational rules (`ops/...`): not compared.
    pub ops_rows: u64,
}

/// What the report says of its scope.
pub const SCOPE: &str = "devices where both versions are loaded by the bridge config \
    ([alerts] rules or candidates) and have a role under the rollout of the models file in \
    force (site recorded with the episode, cohorts of the base rule set); a rollout \
    changed during the period is not reconstructed";

/// The rule sets a bridge config loads, parsed as the bridge parses them: the base
/// (`[alerts] rules`, also the source of the devices' cohorts) and the versions of it
/// and of every `[alerts] candidates` file. A file that does not load is an error
/// naming it (the bridge would not start with it either).
pub fn loaded_rule_sets(
    base: Option<&Path>,
    candidates: &[PathBuf],
) -> anyhow::Result<(Option<RuleSet>, BTreeSet<String>)> {
    let load = |path: &Path, what: &str| {
        RuleSet::load(path).with_context(|| format!("{}: {what} does not load", path.display()))
    };
    let base = base.map(|p| load(p, "[alerts] rules")).transpose()?;
    let mut versions: BTreeSet<String> = base.iter().map(|r| r.version().to_owned()).collect();
    for path in candidates {
        versions.insert(
            load(path, "an [alerts] candidates file")?
                .version()
                .to_owned(),
        );
    }
    Ok((base, versions))
}

/// Whether both versions of a rule set run for a device: loaded by the bridge and
/// given a role by the rollout.
pub struct Scope<'a> {
    pub models: &'a ModelRegistry,
    /// The base rule set (`[alerts] rules`): the device's cohorts.
    pub rules: Option<&'a RuleSet>,
    /// The rule set versions the bridge loads ([`loaded_rule_sets`]).
    pub loaded: &'a BTreeSet<String>,
    pub model: &'a str,
    pub versions: [&'a str; 2],
}

impl Scope<'_> {
    /// Both versions are loaded and have a role for `device` at `site` (the bridge's
    /// `ModelRegistry::role` with the base rule set's cohorts of the device). A device
    /// or site that is not a valid id cannot be judged: out of scope.
    pub fn both_run(&self, device: &str, site: &str) -> bool {
        if !self.versions.iter().all(|v| self.loaded.contains(*v)) {
            return false;
        }
        let (Ok(device), Ok(site)) = (DeviceId::new(device), SiteId::new(site)) else {
            return false;
        };
        let cohorts = self
            .rules
            .map(|r| r.cohorts_of(&device))
            .unwrap_or_default();
        self.versions
            .iter()
            .all(|v| self.models.role(self.model, v, &site, &cohorts).is_some())
    }
}

/// One episode of one version.
#[derive(Debug, Clone)]
struct Episode<'a> {
    device: &'a str,
    site: &'a str,
    rule: &'a str,
    open_ms: u64,
    /// `None`: still open at the end of the period.
    end_ms: Option<u64>,
}

impl Episode<'_> {
    fn overlaps(&self, other: &Episode<'_>) -> bool {
        self.open_ms <= other.end_ms.unwrap_or(u64::MAX)
            && other.open_ms <= self.end_ms.unwrap_or(u64::MAX)
    }
}

fn median(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// The episodes of `version` in open order, and how many alert ids had no open.
fn episodes<'a>(version: &str, changes: &'a [Change]) -> (Vec<Episode<'a>>, usize) {
    let mut by_id: BTreeMap<&str, Vec<&Change>> = BTreeMap::new();
    for c in changes.iter().filter(|c| c.version == version) {
        by_id.entry(&c.alert_id).or_default().push(c);
    }
    let mut out = Vec::new();
    let mut partial = 0;
    for group in by_id.values_mut() {
        group.sort_by_key(|c| c.at_ms);
        let Some(open) = group.iter().find(|c| c.state == "open") else {
            partial += 1;
            continue;
        };
        let end_ms = group
            .iter()
            .find(|c| c.state == "resolved" && c.at_ms >= open.at_ms)
            .map(|c| c.at_ms);
        out.push(Episode {
            device: &open.device,
            site: &open.site,
            rule: &open.rule,
            open_ms: open.at_ms,
            end_ms,
        });
    }
    out.sort_by_key(|e| (e.open_ms, e.device, e.rule));
    (out, partial)
}

/// The comparison of `from` and `to` (changes already limited to the two versions and
/// the period) over the episodes whose device and site `in_scope` accepts
/// ([`Scope::both_run`]).
pub fn compare(
    model: &str,
    (from, from_sha256): (&str, &str),
    (to, to_sha256): (&str, &str),
    changes: &[Change],
    in_scope: impl Fn(&str, &str) -> bool,
) -> Report {
    let mut rows: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let mut opens: BTreeMap<String, Opens> = BTreeMap::new();
    for v in [from, to] {
        opens.entry(v.to_owned()).or_default();
    }
    for c in changes {
        *rows
            .entry(c.version.clone())
            .or_default()
            .entry(c.role.clone())
            .or_default() += 1;
        if c.state == "open" && in_scope(&c.device, &c.site) {
            let o = opens.entry(c.version.clone()).or_default();
            let side = if c.delivered() {
                &mut o.delivered
            } else {
                &mut o.shadow
            };
            *side.entry(c.rule.clone()).or_default() += 1;
        }
    }
    let (mut a, partial_a) = episodes(from, changes);
    let (mut b, partial_b) = episodes(to, changes);
    let mut outside_scope = BTreeMap::from([(from.to_owned(), 0), (to.to_owned(), 0)]);
    for (v, list) in [(from, &mut a), (to, &mut b)] {
        let before = list.len();
        list.retain(|e| in_scope(e.device, e.site));
        *outside_scope.entry(v.to_owned()).or_default() += (before - list.len()) as u64;
    }
    let mut unpaired: HashMap<(&str, &str), Vec<&Episode<'_>>> = HashMap::new();
    for e in &b {
        unpaired.entry((e.device, e.rule)).or_default().push(e);
    }
    let mut ep = Episodes {
        per_version: BTreeMap::from([
            (from.to_owned(), a.len() as u64),
            (to.to_owned(), b.len() as u64),
        ]),
        partial: partial_a + partial_b,
        outside_scope,
        ..Episodes::default()
    };
    let mut diffs = Vec::new();
    for e in &a {
        let theirs = unpaired.entry((e.device, e.rule)).or_default();
        match theirs.iter().position(|u| u.overlaps(e)) {
            Some(i) => {
                let u = theirs.remove(i);
                diffs.push((u.open_ms as f64 - e.open_ms as f64) / 1000.0);
            }
            None => ep.only_from += 1,
        }
    }
    ep.only_to = unpaired.values().map(Vec::len).sum();
    ep.paired = diffs.len();
    let compared = ep.paired + ep.only_from + ep.only_to;
    ep.agreement_pct = (compared > 0).then(|| 100.0 * ep.paired as f64 / compared as f64);
    diffs.sort_by(f64::total_cmp);
    ep.open_diff_median_s = median(&diffs);
    ep.open_diff_min_s = diffs.first().copied();
    ep.open_diff_max_s = diffs.last().copied();
    Report {
        model: model.to_owned(),
        kind: "rules",
        from: from.to_owned(),
        to: to.to_owned(),
        from_sha256: from_sha256.to_owned(),
        to_sha256: to_sha256.to_owned(),
        scope: SCOPE,
        scope_models_sha256: String::new(),
        loaded_versions: Vec::new(),
        rows,
        opens,
        episodes: ep,
        erased_rows: 0,
        erased_shadow_rows: 0,
        ops_rows: 0,
    }
}

const LOCKED: &str = "alert or shadow alert payloads in the period are sealed and no key \
    here opens them: give the [encryption] key file of the bridge that wrote them";

/// What [`rows`] read.
#[derive(Debug, Default)]
pub struct Read {
    pub changes: Vec<Change>,
    pub erased_rows: u64,
    pub erased_shadow_rows: u64,
    pub ops_rows: u64,
}

/// Whether a delivered alert body is a clinical rule alert (not a device alarm, a
/// score alert or a no-data alert).
fn is_rule_alert(body: &Json) -> bool {
    let text = |k: &str| body.get(k).and_then(Json::as_str);
    let rule = text("rule").unwrap_or_default();
    body.get("alarm").is_none_or(Json::is_null)
        && text("source").is_none_or(|s| s == "rule")
        && !rule.is_empty()
        && !rule.starts_with("news2")
        && rule != "no-data"
        && text("kind") != Some("no_data")
}

/// The changes of `model` at the two versions (name, registry digest) the bridge
/// recorded in `[since, until)`; rows selected in SQL before any payload is opened
/// where the columns allow (shadow rows by version and time, delivered ones by kind
/// and time).
pub fn rows(
    store: &Store,
    model: &str,
    versions: [(&str, &str); 2],
    period: (Option<u64>, Option<u64>),
) -> anyhow::Result<Read> {
    let mut out = Read::default();
    let mut after = 0;
    loop {
        let page = store.clinical_alerts_in(period, after, 1000)?;
        let Some(last) = page.last() else { break };
        after = last.position;
        for a in page {
            let body: Json = match &a.body {
                Payload::Plain(b) => serde_json::from_slice(b)
                    .with_context(|| format!("alert {}: body is not JSON", a.alert_id))?,
                Payload::Erased { .. } => {
                    out.erased_rows += 1;
                    continue;
                }
                Payload::Locked => anyhow::bail!(LOCKED),
            };
            if !is_rule_alert(&body) {
                continue;
            }
            let digest = body.get("policy_sha256").and_then(Json::as_str);
            let Some((version, _)) = versions.iter().find(|(_, sha)| Some(*sha) == digest) else {
                continue;
            };
            let site = body
                .get("site")
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_owned();
            let at_ms = body
                .get("raised_at")
                .and_then(Json::as_str)
                .and_then(|t| vitalmq_policies::parse_rfc3339(t).ok())
                .unwrap_or(a.created_at_ms);
            out.changes.push(Change {
                alert_id: a.alert_id,
                version: (*version).to_owned(),
                role: "delivered".to_owned(),
                device: a.device.unwrap_or_default(),
                site,
                rule: a.rule.unwrap_or_default(),
                state: a.state,
                at_ms,
            });
        }
    }
    let names = [versions[0].0, versions[1].0];
    let mut after = 0;
    loop {
        let page = store.shadow_alerts_of(model, names, period, after, 1000)?;
        let Some(last) = page.last() else { break };
        after = last.id;
        for s in page {
            match s.payload {
                Payload::Plain(_) => {}
                Payload::Erased { .. } => {
                    out.erased_shadow_rows += 1;
                    continue;
                }
                Payload::Locked => anyhow::bail!(LOCKED),
            }
            if s.rule.starts_with("ops/") {
                out.ops_rows += 1;
                continue;
            }
            out.changes.push(Change {
                alert_id: s.alert_id,
                version: s.version,
                role: s.role,
                device: s.device,
                site: s.site,
                rule: s.rule,
                state: s.state,
                at_ms: s.at_ms,
            });
        }
    }
    Ok(out)
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |x| format!("{x:.2}"))
}

/// The report as text.
pub fn text(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "{} (rules) {} -> {}", r.model, r.from, r.to);
    let _ = writeln!(
        s,
        "compared: {} (models file sha256 {})",
        r.scope, r.scope_models_sha256
    );
    let outside: Vec<String> = r
        .episodes
        .outside_scope
        .iter()
        .map(|(v, n)| format!("{v} {n}"))
        .collect();
    let _ = writeln!(s, "loaded by the bridge: {}", r.loaded_versions.join(", "));
    let _ = writeln!(
        s,
        "not compared (a version is not loaded or has no role for the device): episodes {}",
        outside.join(", ")
    );
    if r.erased_rows + r.erased_shadow_rows > 0 {
        let _ = writeln!(
            s,
            "not compared (patient erased): {} delivered alert rows, {} shadow rows",
            r.erased_rows, r.erased_shadow_rows
        );
    }
    if r.ops_rows > 0 {
        let _ = writeln!(
            s,
            "not compared (operational rules): {} shadow rows",
            r.ops_rows
        );
    }
    for (v, roles) in &r.rows {
        let roles: Vec<String> = roles.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let _ = writeln!(s, "rows {v}: {}", roles.join(", "));
    }
    let _ = writeln!(s, "alert opens per rule (delivered / shadow):");
    for (v, o) in &r.opens {
        let rules: std::collections::BTreeSet<&String> =
            o.delivered.keys().chain(o.shadow.keys()).collect();
        for rule in rules {
            let _ = writeln!(
                s,
                "  {v:<14} {rule:<20} {} / {}",
                o.delivered.get(rule).copied().unwrap_or(0),
                o.shadow.get(rule).copied().unwrap_or(0)
            );
        }
    }
    let e = &r.episodes;
    let per: Vec<String> = e
        .per_version
        .iter()
        .map(|(v, n)| format!("{v} {n}"))
        .collect();
    let _ = writeln!(
        s,
        "episodes: {}  paired {}  only {} {}  only {} {}  agreement {}%  (not counted, opened before the period: {})",
        per.join(", "),
        e.paired,
        r.from,
        e.only_from,
        r.to,
        e.only_to,
        opt(e.agreement_pct),
        e.partial
    );
    let _ = writeln!(
        s,
        "episode open, {} minus {} (s): median {}  min {}  max {}",
        r.to,
        r.from,
        opt(e.open_diff_median_s),
        opt(e.open_diff_min_s),
        opt(e.open_diff_max_s)
    );
    s
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;
    use vitalmq_bridge::store::{Commit, NewAlert, NewShadowAlert, shadow_change_id};
    use vitalmq_keyring::{Keyring, LocalKeyFile, Subject};

    use super::*;

    const T0: u64 = 1_794_787_200_000;
    const MIN: u64 = 60_000;
    const SHA1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const SHA2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    fn all(_: &str, _: &str) -> bool {
        true
    }

    fn ch(id: &str, v: &str, role: &str, dev: &str, state: &str, at: u64) -> Change {
        Change {
            alert_id: id.into(),
            version: v.into(),
            role: role.into(),
            device: dev.into(),
            site: "site-01".into(),
            rule: "spo2-low".into(),
            state: state.into(),
            at_ms: at,
        }
    }

    #[test]
    fn episodes_pair_by_device_rule_and_overlap() {
        let changes = vec![
            // dev-1: v1 [0, 10 min], v2 opens 2 min later, [2, 12]: paired, +120 s.
            ch("a1", "v1", "delivered", "dev-1", "open", T0),
            ch("a1", "v1", "delivered", "dev-1", "resolved", T0 + 10 * MIN),
            ch("b1", "v2", "shadow", "dev-1", "open", T0 + 2 * MIN),
            ch("b1", "v2", "shadow", "dev-1", "resolved", T0 + 12 * MIN),
            // dev-1 later: v1 [20, open), v2 opened 1 min before it, still open: -60 s.
            ch("a2", "v1", "delivered", "dev-1", "open", T0 + 20 * MIN),
            ch("b2", "v2", "shadow", "dev-1", "open", T0 + 19 * MIN),
            // dev-2: v1 [0, 1], v2 [5, 6]: no overlap, one each only.
            ch("a3", "v1", "delivered", "dev-2", "open", T0),
            ch("a3", "v1", "delivered", "dev-2", "resolved", T0 + MIN),
            ch("b3", "v2", "shadow", "dev-2", "open", T0 + 5 * MIN),
            ch("b3", "v2", "shadow", "dev-2", "resolved", T0 + 6 * MIN),
            // dev-1 at the same time, another rule: not paired.
            Change {
                rule: "hr-high".into(),
                ..ch("b4", "v2", "shadow", "dev-1", "open", T0)
            },
            // Opened before the period: not an episode.
            ch("a5", "v1", "delivered", "dev-4", "resolved", T0),
        ];
        let r = compare("rules", ("v1", SHA1), ("v2", SHA2), &changes, all);
        let e = &r.episodes;
        assert_eq!((e.per_version["v1"], e.per_version["v2"]), (3, 4));
        assert_eq!((e.paired, e.only_from, e.only_to, e.partial), (2, 1, 2, 1));
        assert_eq!(e.agreement_pct, Some(40.0));
        assert_eq!(
            (e.open_diff_min_s, e.open_diff_max_s, e.open_diff_median_s),
            (Some(-60.0), Some(120.0), Some(30.0))
        );
        assert_eq!(r.rows["v1"]["delivered"], 6);
        assert_eq!(r.rows["v2"]["shadow"], 6);
        assert_eq!(r.opens["v1"].delivered["spo2-low"], 3);
        assert!(r.opens["v1"].shadow.is_empty());
        assert_eq!(r.opens["v2"].shadow["spo2-low"], 3);
        assert_eq!(r.opens["v2"].shadow["hr-high"], 1);
        // Touching intervals overlap; a narrower one does not reach.
        let touching = vec![
            ch("a1", "v1", "delivered", "dev-1", "open", T0),
            ch("a1", "v1", "delivered", "dev-1", "resolved", T0 + MIN),
            ch("b1", "v2", "shadow", "dev-1", "open", T0 + MIN),
        ];
        let r = compare("rules", ("v1", SHA1), ("v2", SHA2), &touching, all);
        assert_eq!(r.episodes.paired, 1);
        assert_eq!(r.episodes.agreement_pct, Some(100.0));
    }

    /// A models file with rule set versions v1 and v2 and this rollout of them.
    fn models(rollout: &str) -> ModelRegistry {
        let entry = |v: &str, sha: &str| {
            format!(
                "[[models]]\nname = \"rules\"\nversion = \"{v}\"\nkind = \"rules\"\n\
                 artifact_sha256 = \"{sha}\"\nlineage = \"l\"\nfeature_pipeline = \"f/1\"\n\
                 intended_use = \"u\"\nstatus = \"approved\"\napproved_by = \"b\"\n\
                 approved_at = \"2026-01-01T00:00:00Z\"\n\n"
            )
        };
        let text = format!(
            "format = \"vitalmq-models/v1\"\n\n{}{}[[rollout]]\nmodel = \"rules\"\nlive = \"v1\"\n{rollout}\n",
            entry("v1", SHA1),
            entry("v2", SHA2)
        );
        ModelRegistry::parse(&text, std::path::Path::new("models.toml")).expect("models")
    }

    /// The shipped rule set: cohort `copd` = dev-00077, dev-00078.
    fn base_rules() -> RuleSet {
        RuleSet::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/examples/rules.toml"),
        )
        .expect("rules")
    }

    /// A canary of v2 on site-02 and the cohort copd, v2 in shadow nowhere else: the
    /// devices that run v1 alone are not compared (else every v1 episode there would
    /// count as v1 only), and two identically behaving versions agree 100 %.
    #[test]
    fn a_canary_compares_only_the_devices_where_both_versions_run() {
        let rules = base_rules();
        let canary =
            models(r#"canary = [{ version = "v2", sites = ["site-02"], cohorts = ["copd"] }]"#);
        let both = BTreeSet::from(["v1".to_owned(), "v2".to_owned()]);
        let scope = Scope {
            models: &canary,
            rules: Some(&rules),
            loaded: &both,
            model: "rules",
            versions: ["v1", "v2"],
        };
        assert!(!scope.both_run("dev-00001", "site-01"));
        assert!(scope.both_run("dev-00002", "site-02"));
        assert!(scope.both_run("dev-00077", "site-03"), "copd canary");
        assert!(!scope.both_run("dev-00003", "site-03"));
        assert!(!scope.both_run("not a device", "site-02"));
        let at = |c: Change, site: &str| Change {
            site: site.into(),
            ..c
        };
        let changes = vec![
            // The canary site: v2 delivers, v1 runs in shadow, the same episode.
            at(
                ch("c1", "v2", "delivered", "dev-00002", "open", T0),
                "site-02",
            ),
            at(
                ch(
                    "c1",
                    "v2",
                    "delivered",
                    "dev-00002",
                    "resolved",
                    T0 + 5 * MIN,
                ),
                "site-02",
            ),
            at(ch("s1", "v1", "shadow", "dev-00002", "open", T0), "site-02"),
            at(
                ch("s1", "v1", "shadow", "dev-00002", "resolved", T0 + 5 * MIN),
                "site-02",
            ),
            // The canary cohort on site-03: the same, still open.
            at(
                ch("c2", "v2", "delivered", "dev-00077", "open", T0 + MIN),
                "site-03",
            ),
            at(
                ch("s2", "v1", "shadow", "dev-00077", "open", T0 + MIN),
                "site-03",
            ),
            // Elsewhere v1 alone delivers: three episodes outside the scope.
            at(
                ch("l1", "v1", "delivered", "dev-00001", "open", T0),
                "site-01",
            ),
            at(
                ch("l2", "v1", "delivered", "dev-00001", "open", T0 + 20 * MIN),
                "site-01",
            ),
            at(
                ch("l3", "v1", "delivered", "dev-00003", "open", T0),
                "site-03",
            ),
            // A v2 shadow row of dev-00003 from a rollout no longer in force.
            at(ch("o1", "v2", "shadow", "dev-00003", "open", T0), "site-03"),
        ];
        let r = compare("rules", ("v1", SHA1), ("v2", SHA2), &changes, |d, s| {
            scope.both_run(d, s)
        });
        let e = &r.episodes;
        assert_eq!(
            e.outside_scope,
            BTreeMap::from([("v1".to_owned(), 3), ("v2".to_owned(), 1)])
        );
        assert_eq!((e.per_version["v1"], e.per_version["v2"]), (2, 2));
        assert_eq!((e.paired, e.only_from, e.only_to, e.partial), (2, 0, 0, 0));
        assert_eq!(e.agreement_pct, Some(100.0));
        assert_eq!(
            (e.open_diff_min_s, e.open_diff_median_s, e.open_diff_max_s),
            (Some(0.0), Some(0.0), Some(0.0))
        );
        // Opens are of the scope; rows are all that was read.
        assert_eq!(r.opens["v1"].shadow["spo2-low"], 2);
        assert!(r.opens["v1"].delivered.is_empty());
        assert_eq!(r.opens["v2"].delivered["spo2-low"], 2);
        assert!(r.opens["v2"].shadow.is_empty());
        assert_eq!(r.rows["v1"]["delivered"], 3);
        assert_eq!(r.rows["v1"]["shadow"], 3);
        assert_eq!(r.rows["v2"]["delivered"], 3);
        assert_eq!(r.rows["v2"]["shadow"], 1);
        assert_eq!(r.scope, SCOPE);
        let printed = text(&r);
        assert!(printed.contains("not reconstructed"), "{printed}");
        assert!(printed.contains("episodes v1 3, v2 1"), "{printed}");

        // v2 in shadow everywhere: every device is in the scope, the v1-only episodes
        // count against agreement (2 of 5 paired: dev-00003's v2 row overlaps l3).
        let shadow = models(r#"shadow = ["v2"]"#);
        let everywhere = Scope {
            models: &shadow,
            ..scope
        };
        assert!(everywhere.both_run("dev-00001", "site-01"));
        let r = compare("rules", ("v1", SHA1), ("v2", SHA2), &changes, |d, s| {
            everywhere.both_run(d, s)
        });
        let e = &r.episodes;
        assert_eq!(
            e.outside_scope,
            BTreeMap::from([("v1".to_owned(), 0), ("v2".to_owned(), 0)])
        );
        assert_eq!((e.paired, e.only_from, e.only_to), (3, 2, 0));
        assert_eq!(e.agreement_pct, Some(60.0));

        // The same rollout, but the config loads v1 alone (no candidate file for v2):
        // v2 runs nowhere, so every episode is outside the scope, none `only_from`.
        let v1_only = BTreeSet::from(["v1".to_owned()]);
        let unloaded = Scope {
            loaded: &v1_only,
            ..everywhere
        };
        assert!(!unloaded.both_run("dev-00001", "site-01"));
        let r = compare("rules", ("v1", SHA1), ("v2", SHA2), &changes, |d, s| {
            unloaded.both_run(d, s)
        });
        let e = &r.episodes;
        assert_eq!(
            e.outside_scope,
            BTreeMap::from([("v1".to_owned(), 5), ("v2".to_owned(), 3)])
        );
        assert_eq!((e.per_version["v1"], e.per_version["v2"]), (0, 0));
        assert_eq!((e.paired, e.only_from, e.only_to), (0, 0, 0));
        assert_eq!(e.agreement_pct, None);
        assert!(r.opens["v1"].delivered.is_empty() && r.opens["v2"].shadow.is_empty());
    }

    /// The versions loaded are those of the base and candidate files, parsed as the
    /// bridge parses them; a candidate that does not parse is an error naming it.
    #[test]
    fn loaded_versions_are_the_base_and_candidate_files_versions() {
        let tmp = tempfile::tempdir().expect("tmp");
        let base =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/examples/rules.toml");
        let text = std::fs::read_to_string(&base).expect("rules");
        assert!(text.contains("\nversion = \"2025-06-01.1\"\n"));
        let cand = tmp.path().join("cand.toml");
        std::fs::write(
            &cand,
            text.replacen(
                "\nversion = \"2025-06-01.1\"\n",
                "\nversion = \"2026-01-01.1\"\n",
                1,
            ),
        )
        .expect("write");
        let (rules, loaded) =
            loaded_rule_sets(Some(&base), std::slice::from_ref(&cand)).expect("loaded");
        assert_eq!(
            rules.map(|r| r.version().to_owned()).as_deref(),
            Some("2025-06-01.1")
        );
        assert_eq!(
            loaded,
            BTreeSet::from(["2025-06-01.1".to_owned(), "2026-01-01.1".to_owned()])
        );
        let (none, empty) = loaded_rule_sets(None, &[]).expect("no alerts");
        assert!(none.is_none() && empty.is_empty());
        let bad = tmp.path().join("bad.toml");
        std::fs::write(&bad, "format = \"vitalmq-rules/v1\"\nversion = 3\n").expect("write");
        let err = loaded_rule_sets(Some(&base), &[cand, bad.clone()]).expect_err("bad");
        assert!(
            format!("{err:#}").contains(&bad.display().to_string()),
            "{err:#}"
        );
    }

    fn delivered(id: &str, state: &str, sha: &str, patient: &str, at: u64) -> NewAlert {
        NewAlert {
            alert_id: id.into(),
            state: state.into(),
            kind: "clinical".into(),
            topic: "alerts/site-01/urgent/dev-a".into(),
            device: Some("dev-a".into()),
            rule: Some("spo2-low".into()),
            created_at_ms: at + 5,
            body: json!({"alert_id": id, "kind": "clinical", "state": state,
                "rule": "spo2-low", "rule_version": "x", "policy_sha256": sha,
                "patient_ref": patient, "device": "dev-a", "site": "site-01",
                "raised_at": vitalmq_bridge::normalize::rfc3339_ms(at)})
            .to_string(),
            level: 0,
        }
    }

    fn shadow(id: &str, state: &str, version: &str, patient: &str, at: u64) -> NewShadowAlert {
        NewShadowAlert {
            change_id: shadow_change_id(version, id, state, &format!("ev-{at}")),
            alert_id: id.into(),
            patient_ref: patient.into(),
            site: "site-01".into(),
            device: "dev-a".into(),
            model: "rules".into(),
            version: version.into(),
            config_sha256: SHA2.into(),
            role: "shadow".into(),
            rule: "spo2-low".into(),
            state: state.into(),
            severity: "urgent".into(),
            at_ms: at,
            created_at_ms: at + 5,
            payload: json!({"alert_id": id, "state": state, "patient_ref": patient}).to_string(),
        }
    }

    /// A store filled through the store API with known episodes: the delivered `v1`
    /// (matched by digest) and the shadow `v2` of two patients, one erased.
    #[test]
    fn a_store_compare_has_the_known_answers_erased_rows_skipped_and_locked_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let data = tmp.path().join("data");
        let keyring = Arc::new(
            Keyring::open(
                &data.join("keyring.sqlite3"),
                Arc::new(LocalKeyFile::create(&tmp.path().join("kek.json")).expect("kek")),
            )
            .expect("keyring"),
        );
        let mut store = Store::open(&data)
            .expect("store")
            .with_keyring(keyring.clone());
        let mut device_alarm = delivered("al-alarm", "open", SHA1, "pt-a", T0);
        device_alarm.body = json!({"alert_id": "al-alarm", "state": "open", "rule": "spo2-low",
            "policy_sha256": SHA1, "patient_ref": "pt-a", "alarm": {"code": "x"}})
        .to_string();
        store
            .commit(&Commit {
                alerts: vec![
                    // pt-a: v1 delivers [0, 10 min]; v2 would open 3 min later, [3, 8].
                    delivered("al-1", "open", SHA1, "pt-a", T0),
                    delivered("al-1", "resolved", SHA1, "pt-a", T0 + 10 * MIN),
                    // Another digest (a third version): not compared.
                    delivered("al-9", "open", &"9".repeat(64), "pt-a", T0),
                    device_alarm,
                    // pt-b (erased below): its rows are counted, not compared.
                    delivered("al-b", "open", SHA1, "pt-b", T0),
                ],
                shadow_alerts: vec![
                    shadow("sh-1", "open", "v2", "pt-a", T0 + 3 * MIN),
                    shadow("sh-1", "resolved", "v2", "pt-a", T0 + 8 * MIN),
                    // pt-a later: v2 alone.
                    shadow("sh-2", "open", "v2", "pt-a", T0 + 30 * MIN),
                    // Operational rule: left out.
                    NewShadowAlert {
                        rule: "ops/signal_quality".into(),
                        ..shadow("sh-3", "open", "v2", "pt-a", T0 + 30 * MIN)
                    },
                    // Another version: not read.
                    shadow("sh-4", "open", "v3", "pt-a", T0),
                    shadow("sh-b", "open", "v2", "pt-b", T0),
                    // Recorded after the period.
                    shadow("sh-5", "open", "v2", "pt-a", T0 + 120 * MIN),
                ],
                ..Commit::default()
            })
            .expect("commit");
        keyring
            .erase(&Subject::new("pt-b").expect("subject"), "test", "test", T0)
            .expect("erase");
        let period = (Some(T0), Some(T0 + 60 * MIN));
        let versions = [("v1", SHA1), ("v2", SHA2)];
        let read = rows(&store, "rules", versions, period).expect("read");
        assert_eq!(
            (read.erased_rows, read.erased_shadow_rows, read.ops_rows),
            (1, 1, 1)
        );
        assert!(read.changes.iter().all(|c| c.site == "site-01"));
        let mut r = compare("rules", versions[0], versions[1], &read.changes, all);
        (r.erased_rows, r.erased_shadow_rows, r.ops_rows) =
            (read.erased_rows, read.erased_shadow_rows, read.ops_rows);
        assert_eq!(r.rows["v1"]["delivered"], 2);
        assert_eq!(r.rows["v2"]["shadow"], 3);
        assert_eq!(r.opens["v1"].delivered["spo2-low"], 1);
        assert_eq!(r.opens["v2"].shadow["spo2-low"], 2);
        let e = &r.episodes;
        assert_eq!((e.paired, e.only_from, e.only_to), (1, 0, 1));
        assert_eq!(e.agreement_pct, Some(50.0));
        assert_eq!(e.open_diff_median_s, Some(180.0));
        // Aggregates only: no patient, device or alert id in what is printed.
        let printed = format!("{}{}", text(&r), serde_json::to_string(&r).expect("json"));
        for secret in ["pt-a", "pt-b", "dev-a", "al-1", "sh-1"] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
        drop(store);
        // The same store without its keyring: refused, not read as absent.
        let store = Store::open(&data).expect("store");
        let err = rows(&store, "rules", versions, period).expect_err("sealed");
        assert!(err.to_string().contains("sealed"), "{err:#}");
    }
}
