//! `vitalmq store backup` and `vitalmq store restore`: an online backup of a bridge's
//! store (running or stopped) and its restore into a new data directory, each recorded
//! in the operator audit log with the copy's hash and counts
//! (see `vitalmq_bridge::store::backup`).
//!
//! A backup is logged beside the data directory it copies (`<data>/operator-audit/`),
//! like the other store commands. A restore is logged in the backup directory
//! (`<backup>/operator-audit/`): the new data directory must be empty until the restore
//! has written it, and the `started` record comes before the restore runs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::{Map, Value};
use vitalmq_bridge::store::{BackupCounts, BackupManifest, MANIFEST_FILE, RestoreReport, restore};

use crate::operator_audit::{Action, absolute, data_dir_log, log_path};

#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// The bridge's data directory (`data_dir` in its configuration); the bridge may be
    /// running.
    #[arg(long)]
    data: PathBuf,
    /// The backup directory to make: new, or empty.
    #[arg(long)]
    to: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// A backup directory made by `vitalmq store backup`.
    #[arg(long)]
    from: PathBuf,
    /// The new data directory to restore into: new, or empty. Never an existing store.
    #[arg(long)]
    data: PathBuf,
}

/// The hash and counts of a copy, as operator audit details.
fn details(
    sha256: &str,
    schema_version: usize,
    counts: BackupCounts,
    head: i64,
) -> Map<String, Value> {
    let mut d = Map::new();
    d.insert("sha256".into(), sha256.into());
    d.insert("schema_version".into(), schema_version.into());
    d.insert("events".into(), counts.events.into());
    d.insert("raw_messages".into(), counts.raw_messages.into());
    d.insert("alerts".into(), counts.alerts.into());
    d.insert("quarantine".into(), counts.quarantine.into());
    d.insert("highest_event_position".into(), head.into());
    d
}

pub fn backup(args: &BackupArgs) -> anyhow::Result<ExitCode> {
    let manifest = backup_audited(&args.data, &args.to)?;
    let mut summary = serde_json::to_value(&manifest)?;
    summary["backup"] = absolute(&args.to).into();
    println!("{}", serde_json::to_string(&summary)?);
    Ok(ExitCode::SUCCESS)
}

/// Backs the store of `data` up into `to`, audited as `store.backup` (the CLI's and
/// the demo's path).
pub fn backup_audited(data: &Path, to: &Path) -> anyhow::Result<BackupManifest> {
    let store = crate::bridge_cmd::open_existing(data)?;
    Action::new("store.backup", log_path(data_dir_log(data)))
        .detail("data_dir", absolute(data))
        .detail("to", absolute(to))
        .run(|| {
            let m = store.backup_to(to)?;
            let d = details(
                &m.sha256,
                m.schema_version,
                m.counts,
                m.highest_event_position,
            );
            Ok((m, d))
        })
}

pub fn restore_cmd(args: &RestoreArgs) -> anyhow::Result<ExitCode> {
    let report = restore_audited(&args.from, &args.data)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}

/// Restores the backup in `from` into the new data directory `data`, audited as
/// `store.restore` in the backup directory's operator log.
pub fn restore_audited(from: &Path, data: &Path) -> anyhow::Result<RestoreReport> {
    // A typo in `--from` must not leave an operator audit log somewhere.
    let manifest = from.join(MANIFEST_FILE);
    anyhow::ensure!(
        manifest.exists(),
        "{}: no backup manifest here (made by `vitalmq store backup`?)",
        manifest.display()
    );
    let log = log_path(from.join("operator-audit").join("operator.jsonl"));
    Action::new("store.restore", log)
        .detail("from", absolute(from))
        .detail("data_dir", absolute(data))
        .run(|| {
            let r = restore(from, data)?;
            let d = details(
                &r.sha256,
                r.schema_version,
                r.counts,
                r.highest_event_position,
            );
            Ok((r, d))
        })
}
