//! `vitalmq store backup` and `vitalmq store restore`: an online backup of a bridge's
//! store (running or stopped) and its restore into a new data directory, each recorded
//! in the operator audit log with the copy's hash and counts
//! (see `vitalmq_bridge::store::backup`).
//!
//! A backup is logged beside the data directory it copies (`<data>/operator-audit/`),
//! like the other store commands. A restore is logged in the backup directory
//! (`<backup>/operator-audit/`): the new data directory must be empty until the restore
//! has written it, and the `started` record comes before the restore runs.

use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::{Map, Value};
use vitalmq_bridge::store::coverage::Coverage;
use vitalmq_bridge::store::{BackupCounts, MANIFEST_FILE, restore};

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
    /// The keyring the restored store will be read with (the bridge's `[encryption]
    /// keyring`): the restore is refused unless it holds every key the backup's sealed
    /// rows need (or knows them erased). Without it, a backup holding sealed rows is
    /// refused: restoring beside the wrong keyring leaves them unreadable.
    #[arg(long, requires = "key_file")]
    keyring: Option<PathBuf>,
    /// The key file of that keyring.
    #[arg(long, requires = "keyring")]
    key_file: Option<PathBuf>,
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
    let store = crate::bridge_cmd::open_existing(&args.data)?;
    let manifest = Action::new("store.backup", log_path(data_dir_log(&args.data)))
        .detail("data_dir", absolute(&args.data))
        .detail("to", absolute(&args.to))
        .run(|| {
            let m = store.backup_to(&args.to)?;
            let d = details(
                &m.sha256,
                m.schema_version,
                m.counts,
                m.highest_event_position,
            );
            Ok((m, d))
        })?;
    let mut summary = serde_json::to_value(&manifest)?;
    summary["backup"] = absolute(&args.to).into();
    println!("{}", serde_json::to_string(&summary)?);
    Ok(ExitCode::SUCCESS)
}

/// Checks, before anything is written, that the keyring the restored store will be read
/// with holds every key its sealed rows need; `None` for a backup without sealed rows.
fn keys_cover(args: &RestoreArgs) -> anyhow::Result<Option<Coverage>> {
    let db = args.from.join(vitalmq_bridge::store::DB_FILE);
    let (Some(keyring), Some(key_file)) = (&args.keyring, &args.key_file) else {
        anyhow::ensure!(
            !vitalmq_bridge::store::coverage::holds_sealed_rows(&db)?,
            "the backup holds sealed payloads: give --keyring and --key-file (the bridge's \
             [encryption] keyring) so the restore can check they will be readable"
        );
        return Ok(None);
    };
    let ring = vitalmq_keyring::Keyring::open(
        keyring,
        std::sync::Arc::new(vitalmq_keyring::LocalKeyFile::load(key_file)?),
    )?;
    let c = vitalmq_bridge::store::coverage::coverage(&db, &ring)?;
    anyhow::ensure!(
        c.missing == 0,
        "refused: {} of the {} data-key versions the backup's sealed rows need are not in {} \
         (and not erased): this is not the keyring of this store",
        c.missing,
        c.key_versions,
        keyring.display()
    );
    Ok(Some(c))
}

pub fn restore_cmd(args: &RestoreArgs) -> anyhow::Result<ExitCode> {
    // A typo in `--from` must not leave an operator audit log somewhere.
    let manifest = args.from.join(MANIFEST_FILE);
    anyhow::ensure!(
        manifest.exists(),
        "{}: no backup manifest here (made by `vitalmq store backup`?)",
        manifest.display()
    );
    let log = log_path(args.from.join("operator-audit").join("operator.jsonl"));
    let report = Action::new("store.restore", log)
        .detail("from", absolute(&args.from))
        .detail("data_dir", absolute(&args.data))
        .detail("keyring", args.keyring.as_deref().map(absolute))
        .run(|| {
            let covered = keys_cover(args)?;
            let r = restore(&args.from, &args.data)?;
            let mut d = details(
                &r.sha256,
                r.schema_version,
                r.counts,
                r.highest_event_position,
            );
            d.insert("keyring_coverage".into(), serde_json::to_value(&covered)?);
            Ok(((r, covered), d))
        })?;
    let mut summary = serde_json::to_value(&report.0)?;
    summary["keyring_coverage"] = serde_json::to_value(&report.1)?;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(ExitCode::SUCCESS)
}
