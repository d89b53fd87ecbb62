//! `vitalmq retention run --config BRIDGE_CONFIG [--now T] [--dry-run]`: one run of the
//! bridge's retention job (`vitalmq_bridge::lifecycle`) from the command line, with the
//! bridge's `[lifecycle]` settings, its store and its objects sinks.
//!
//! It may run while the bridge runs (the store takes one short transaction per page;
//! every act is idempotent). The run is an operator action: `retention.run` in the
//! operator audit log (`<data dir>/operator-audit/operator.jsonl` or
//! `$VITALMQ_OPERATOR_AUDIT`), a `started` record before and a `succeeded` record
//! carrying the run's details after (the fields of the bridge's `retention_run`
//! record, plus `policy_sha256`). The details are also printed as one JSON object.
//!
//! A `--now` more than [`FUTURE_SLACK_MS`] ahead of the wall clock is refused (exit 1,
//! nothing done, a `failed` record in the operator log) unless `--allow-future-now` is
//! given: a mistyped year would otherwise make everything due at once.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use vitalmq_bridge::BridgeConfig;
use vitalmq_bridge::lifecycle::{self, BatchHook};

/// Test hook: the process aborts (as `kill -9` would stop it) after this many store
/// transactions, so a test can prove that a rerun finishes a run cut short.
const ABORT_AFTER_ENV: &str = "VITALMQ_TEST_RETENTION_ABORT_AFTER_BATCHES";

/// How far `--now` may be ahead of the wall clock without `--allow-future-now` (1 day).
pub const FUTURE_SLACK_MS: u64 = 86_400_000;

#[derive(Debug, clap::Subcommand)]
pub enum RetentionCommand {
    /// Run the retention job once (the bridge runs it every `[lifecycle] every`).
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The bridge's configuration (TOML) with a `[lifecycle]` section.
    #[arg(long)]
    config: PathBuf,
    /// The instant to decide at (RFC 3339); default: now.
    #[arg(long)]
    now: Option<String>,
    /// Decide and report, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Accept a `--now` more than a day ahead of the wall clock (tests, rehearsals).
    #[arg(long)]
    allow_future_now: bool,
}

impl RetentionCommand {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            Self::Run(args) => run(args),
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let now = match &args.now {
        None => lifecycle::wall_clock(),
        Some(text) => {
            let t =
                time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                    .with_context(|| format!("--now {text:?}: not an RFC 3339 time"))?;
            u64::try_from(t.unix_timestamp_nanos() / 1_000_000)
                .with_context(|| format!("--now {text:?}: before 1970"))?
        }
    };
    let details = run_audited(&args.config, now, args.dry_run, args.allow_future_now)?;
    println!("{}", serde_json::Value::Object(details));
    Ok(ExitCode::SUCCESS)
}

/// One run of the retention job of the bridge configured by `config_path` at `now`
/// (ms), audited as `retention.run`; returns the run's details (the fields of the
/// bridge's `retention_run` record, plus `policy_sha256`). A `now` more than a day ahead
/// of the clock is refused unless `allow_future_now`.
pub fn run_audited(
    config_path: &Path,
    now: u64,
    dry_run: bool,
    allow_future_now: bool,
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let config = BridgeConfig::load(config_path)?;
    let Some((job, _every)) = lifecycle::job_of(&config)? else {
        anyhow::bail!(
            "{}: no [lifecycle] section, so no retention policy to run",
            config_path.display()
        );
    };
    let hook: Option<BatchHook> = std::env::var(ABORT_AFTER_ENV)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map(|after| -> BatchHook {
            Arc::new(move |done| {
                if done >= after {
                    std::process::abort();
                }
            })
        });
    let log =
        crate::operator_audit::log_path(crate::operator_audit::data_dir_log(&config.data_dir));
    crate::operator_audit::Action::new("retention.run", log)
        .detail("config", crate::operator_audit::absolute(config_path))
        .detail(
            "data_dir",
            crate::operator_audit::absolute(&config.data_dir),
        )
        .detail("now_ms", now)
        .detail("allow_future_now", allow_future_now)
        .run(|| {
            let wall = lifecycle::wall_clock();
            if now > wall.saturating_add(FUTURE_SLACK_MS) && !allow_future_now {
                anyhow::bail!(
                    "--now {}: more than a day ahead of the clock ({}); a run then would \
                     act on everything due until then; give --allow-future-now if that is meant",
                    vitalmq_bridge::normalize::rfc3339_ms(now).unwrap_or_default(),
                    vitalmq_bridge::normalize::rfc3339_ms(wall).unwrap_or_default()
                );
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let outcome = runtime.block_on(lifecycle::run_once(&job, now, dry_run, hook))?;
            let mut details =
                outcome
                    .report
                    .details(&outcome.holds_sha256, outcome.now, outcome.dry_run);
            details.insert("policy_sha256".into(), outcome.policy_sha256.clone().into());
            Ok((details.clone(), details))
        })
}
