//! `vitalmq models ...` (issue 21): the model registry from an operator's side.
//!
//! - `check FILE`: validates a models file (`vitalmq-models/v1`) as the bridge does on
//!   start and reload; every problem at file:line; exit 1 when any.
//! - `status --config bridge.toml`: the registry and rollout the bridge's configuration
//!   puts in force (digest, entries, the role of every version per scope, the score
//!   tables and whether each is the artifact the registry approved).
//! - `compare --config bridge.toml --model news2 --from V --to V`: agreement, alert
//!   counts and timing differences of two versions over a period, from the bridge's
//!   store (`compare`, where the definitions are). It reads patient-linked rows, so it
//!   is an operator action (`models.compare`, in the data directory's operator log)
//!   and prints aggregates only. A model whose registry entries are of kind `rules`
//!   (a rule set) is compared by its alert episodes instead (`rules_compare`): the
//!   delivered alerts of each version (by its registry digest) and its shadow alerts.

mod compare;
mod read;
mod rules_compare;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use serde_json::{Map, Value as Json, json};
use vitalmq_bridge::BridgeConfig;
use vitalmq_policies::{ModelRegistry, ScoreTable};

use crate::operator_audit::{self, Action};

#[derive(Debug, clap::Subcommand)]
pub enum ModelsCommand {
    /// Validate a models file; print every problem at file:line (exit 1 if any).
    Check { file: PathBuf },
    /// The model registry and rollout a bridge configuration puts in force.
    Status {
        #[arg(long)]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Compare two versions of a score model or rule set over a period (aggregates;
    /// audited).
    Compare(CompareArgs),
}

#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    #[arg(long)]
    config: PathBuf,
    #[arg(long, default_value = "news2")]
    model: String,
    /// The reference version (usually the live one).
    #[arg(long)]
    from: String,
    /// The candidate version.
    #[arg(long)]
    to: String,
    /// Only scores and alerts the bridge recorded at or after this RFC 3339 time.
    #[arg(long)]
    since: Option<String>,
    /// Only scores and alerts the bridge recorded before this RFC 3339 time.
    #[arg(long)]
    until: Option<String>,
    /// How far apart two versions' episode starts of one patient may be to count as
    /// the same episode (seconds).
    #[arg(long, default_value_t = 3600)]
    match_window_s: u64,
    /// Why the data is read (recorded in the operator audit log).
    #[arg(long)]
    purpose: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

impl ModelsCommand {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            Self::Check { file } => Ok(check(&file)),
            Self::Status { config, json } => status(&config, json),
            Self::Compare(args) => run_compare(&args),
        }
    }
}

fn check(file: &Path) -> ExitCode {
    match ModelRegistry::load(file) {
        Ok(m) => {
            println!(
                "{}: ok ({} models, {} rollouts, sha256 {})",
                file.display(),
                m.entries().len(),
                m.rollouts().count(),
                m.sha256()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            ExitCode::from(1)
        }
    }
}

fn load_config(path: &Path) -> anyhow::Result<(BridgeConfig, ModelRegistry)> {
    let config = BridgeConfig::load(path).with_context(|| format!("{}", path.display()))?;
    let file = &config
        .models
        .as_ref()
        .with_context(|| format!("{}: no [models] file configured", path.display()))?
        .file;
    let models = ModelRegistry::load(file)?;
    Ok((config, models))
}

fn status(config_path: &Path, as_json: bool) -> anyhow::Result<ExitCode> {
    let (config, models) = load_config(config_path)?;
    let file = config
        .models
        .as_ref()
        .map(|m| m.file.display().to_string())
        .unwrap_or_default();
    let entries: Vec<Json> = models
        .entries()
        .iter()
        .map(|e| {
            json!({
                "name": e.name,
                "version": e.version,
                "kind": e.kind.as_str(),
                "status": e.approval.as_str(),
                "artifact_sha256": e.artifact_sha256,
            })
        })
        .collect();
    let roles: Vec<Json> = vitalmq_bridge::rollout::roles(&models)
        .into_iter()
        .map(|((model, version, scope), role)| {
            json!({"model": model, "version": version, "scope": scope.to_string(), "role": role.as_str()})
        })
        .collect();
    let mut tables = Vec::new();
    for path in config.scoring.iter().flat_map(|s| &s.tables) {
        let t = ScoreTable::load(path)?;
        let registered = models.entry(t.model(), t.version());
        tables.push(json!({
            "path": path.display().to_string(),
            "model": t.model(),
            "version": t.version(),
            "config_sha256": t.sha256(),
            "registered": registered.is_some(),
            "artifact_matches": registered.is_some_and(|e| e.artifact_sha256 == t.sha256()),
            "status": registered.map(|e| e.approval.as_str()),
        }));
    }
    let out = json!({
        "file": file,
        "sha256": models.sha256(),
        "entries": entries,
        "roles": roles,
        "score_tables": tables,
    });
    if as_json {
        println!("{out}");
        return Ok(ExitCode::SUCCESS);
    }
    println!("models file {file}\nsha256 {}", models.sha256());
    println!("\nmodels:");
    for e in &entries {
        println!(
            "  {:<18} {:<14} {:<6} {:<10} {}",
            e["name"].as_str().unwrap_or_default(),
            e["version"].as_str().unwrap_or_default(),
            e["kind"].as_str().unwrap_or_default(),
            e["status"].as_str().unwrap_or_default(),
            e["artifact_sha256"].as_str().unwrap_or_default(),
        );
    }
    println!("\nrollout (role per scope):");
    for r in &roles {
        println!(
            "  {:<10} {:<14} {:<22} {}",
            r["model"].as_str().unwrap_or_default(),
            r["version"].as_str().unwrap_or_default(),
            r["scope"].as_str().unwrap_or_default(),
            r["role"].as_str().unwrap_or_default(),
        );
    }
    if !tables.is_empty() {
        println!("\nscore tables:");
        for t in &tables {
            println!(
                "  {} {} {} registered={} artifact_matches={}",
                t["model"].as_str().unwrap_or_default(),
                t["version"].as_str().unwrap_or_default(),
                t["path"].as_str().unwrap_or_default(),
                t["registered"],
                t["artifact_matches"],
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_time(s: Option<&str>) -> anyhow::Result<Option<u64>> {
    s.map(|s| {
        vitalmq_policies::parse_rfc3339(s).with_context(|| format!("{s}: not an RFC 3339 time"))
    })
    .transpose()
}

/// The registry digests of `from` and `to` when `model` is a rule set (its entries are
/// of kind `rules`); `None` for any other model (or without a models file).
fn rule_set_digests(
    config: &BridgeConfig,
    args: &CompareArgs,
) -> anyhow::Result<Option<(String, String)>> {
    let Some(file) = config.models.as_ref().map(|m| &m.file) else {
        return Ok(None);
    };
    let models = ModelRegistry::load(file)?;
    let is_rules = models
        .entries()
        .iter()
        .any(|e| e.name == args.model && e.kind == vitalmq_policies::ModelKind::Rules);
    if !is_rules {
        return Ok(None);
    }
    let digest = |version: &str| {
        models
            .entry(&args.model, version)
            .map(|e| e.artifact_sha256.clone())
            .with_context(|| {
                format!(
                    "{}: no registry entry {}/{version} (a rule set version is compared by \
                     its digest in the models file in force: a version removed from it \
                     cannot be compared)",
                    file.display(),
                    args.model
                )
            })
    };
    let (from, to) = (digest(&args.from)?, digest(&args.to)?);
    anyhow::ensure!(
        from != to,
        "{} and {} have the same artifact digest: their delivered alerts cannot be told apart",
        args.from,
        args.to
    );
    Ok(Some((from, to)))
}

fn run_compare(args: &CompareArgs) -> anyhow::Result<ExitCode> {
    let config =
        BridgeConfig::load(&args.config).with_context(|| format!("{}", args.config.display()))?;
    let since = parse_time(args.since.as_deref())?;
    let until = parse_time(args.until.as_deref())?;
    if let Some(digests) = rule_set_digests(&config, args)? {
        return run_rules_compare(args, &config, digests, (since, until));
    }
    let key_file = config.encryption.as_ref().map(|e| e.key_file.as_path());
    let store = crate::bridge_cmd::open_existing_with(&config.data_dir, key_file)?;
    let action = Action::new(
        "models.compare",
        operator_audit::log_path(operator_audit::data_dir_log(&config.data_dir)),
    )
    .detail("data_dir", operator_audit::absolute(&config.data_dir))
    .detail("model", args.model.clone())
    .detail("from", args.from.clone())
    .detail("to", args.to.clone())
    .detail("since", args.since.clone())
    .detail("until", args.until.clone())
    .detail("purpose", args.purpose.clone());
    let report = action.run(|| {
        let versions = [args.from.as_str(), args.to.as_str()];
        let read::Read {
            scores,
            alerts,
            erased_rows,
            erased_alert_rows,
        } = read::rows(&store, &args.model, versions, (since, until))
            .with_context(|| format!("{}", args.config.display()))?;
        let mut report = compare::compare(
            &args.model,
            &args.from,
            &args.to,
            &scores,
            &alerts,
            args.match_window_s.saturating_mul(1000),
        );
        report.erased_rows = erased_rows;
        report.erased_alert_rows = erased_alert_rows;
        let mut done = Map::new();
        done.insert("scores_read".into(), scores.len().into());
        done.insert("erased_rows".into(), erased_rows.into());
        done.insert("pairs".into(), report.pairs.into());
        Ok((report, done))
    })?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", text_report(&report));
    }
    Ok(ExitCode::SUCCESS)
}

/// `models compare` of a rule set: see `rules_compare`.
fn run_rules_compare(
    args: &CompareArgs,
    config: &BridgeConfig,
    (from_sha256, to_sha256): (String, String),
    period: (Option<u64>, Option<u64>),
) -> anyhow::Result<ExitCode> {
    // The scope: the versions the bridge loads, the rollout in force and the base rule
    // set's cohorts.
    let (_, models) = load_config(&args.config)?;
    let (rules, loaded) = rules_compare::loaded_rule_sets(
        config.alerts.as_ref().map(|a| a.rules.as_path()),
        config.alerts.as_ref().map_or(&[][..], |a| &a.candidates),
    )?;
    let key_file = config.encryption.as_ref().map(|e| e.key_file.as_path());
    let store = crate::bridge_cmd::open_existing_with(&config.data_dir, key_file)?;
    let action = Action::new(
        "models.compare",
        operator_audit::log_path(operator_audit::data_dir_log(&config.data_dir)),
    )
    .detail("data_dir", operator_audit::absolute(&config.data_dir))
    .detail("model", args.model.clone())
    .detail("kind", "rules")
    .detail("models_sha256", models.sha256().to_owned())
    .detail("from", args.from.clone())
    .detail("to", args.to.clone())
    .detail("since", args.since.clone())
    .detail("until", args.until.clone())
    .detail("purpose", args.purpose.clone());
    let report = action.run(|| {
        let from = (args.from.as_str(), from_sha256.as_str());
        let to = (args.to.as_str(), to_sha256.as_str());
        let read = rules_compare::rows(&store, &args.model, [from, to], period)
            .with_context(|| format!("{}", args.config.display()))?;
        let scope = rules_compare::Scope {
            models: &models,
            rules: rules.as_ref(),
            loaded: &loaded,
            model: &args.model,
            versions: [&args.from, &args.to],
        };
        let mut report = rules_compare::compare(&args.model, from, to, &read.changes, |d, s| {
            scope.both_run(d, s)
        });
        report.scope_models_sha256 = models.sha256().to_owned();
        report.loaded_versions = loaded.iter().cloned().collect();
        report.erased_rows = read.erased_rows;
        report.erased_shadow_rows = read.erased_shadow_rows;
        report.ops_rows = read.ops_rows;
        let mut done = Map::new();
        done.insert("changes_read".into(), read.changes.len().into());
        done.insert("erased_rows".into(), read.erased_rows.into());
        done.insert("erased_shadow_rows".into(), read.erased_shadow_rows.into());
        done.insert("paired".into(), report.episodes.paired.into());
        done.insert(
            "loaded_versions".into(),
            report.loaded_versions.clone().into(),
        );
        done.insert(
            "outside_scope".into(),
            serde_json::to_value(&report.episodes.outside_scope)?,
        );
        Ok((report, done))
    })?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", rules_compare::text(&report));
    }
    Ok(ExitCode::SUCCESS)
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |x| format!("{x:.2}"))
}

fn text_report(r: &compare::Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "{} {} -> {}", r.model, r.from, r.to);
    if r.erased_rows + r.erased_alert_rows > 0 {
        let _ = writeln!(
            s,
            "not compared (patient erased): {} score rows, {} alert rows",
            r.erased_rows, r.erased_alert_rows
        );
    }
    for (v, roles) in &r.rows {
        let roles: Vec<String> = roles.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let _ = writeln!(s, "rows {v}: {}", roles.join(", "));
    }
    let _ = writeln!(
        s,
        "pairs {}  agree {} ({}%)  kappa {}  unpaired rows: {} only {}, {} only {}",
        r.pairs,
        r.agree,
        opt(r.agreement_pct),
        opt(r.kappa),
        r.only_from_rows,
        r.from,
        r.only_to_rows,
        r.to
    );
    let _ = writeln!(s, "confusion (rows {}, columns {}):", r.from, r.to);
    let _ = write!(s, "  {:<11}", "");
    for c in &r.categories {
        let _ = write!(s, " {c:>10}");
    }
    s.push('\n');
    for (c, row) in r.categories.iter().zip(&r.confusion) {
        let _ = write!(s, "  {c:<11}");
        for n in row {
            let _ = write!(s, " {n:>10}");
        }
        s.push('\n');
    }
    let _ = writeln!(s, "alert opens per rule (delivered / shadow):");
    for (v, c) in &r.alerts {
        let rules: std::collections::BTreeSet<&String> =
            c.delivered.keys().chain(c.shadow.keys()).collect();
        for rule in rules {
            let _ = writeln!(
                s,
                "  {v:<14} {rule:<14} {} / {}",
                c.delivered.get(rule).copied().unwrap_or(0),
                c.shadow.get(rule).copied().unwrap_or(0)
            );
        }
    }
    let t = &r.timing;
    let _ = writeln!(
        s,
        "episode start, {} minus {} (s): matched {}  median {}  min {}  max {}  only {} {}  only {} {}",
        r.to,
        r.from,
        t.matched,
        opt(t.median_s),
        opt(t.min_s),
        opt(t.max_s),
        r.from,
        t.only_from,
        r.to,
        t.only_to
    );
    s
}
