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
use vitalmq_bridge::store::coverage::Coverage;
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

/// The keyring a restored store will be read with, and its key file.
#[derive(Debug, Clone, Copy)]
pub struct RestoreKeys<'a> {
    pub keyring: &'a Path,
    pub key_file: &'a Path,
}

/// Checks, before anything is written, that the keyring the restored store will be read
/// with holds every key its sealed rows need; `None` for a backup without sealed rows.
fn keys_cover(from: &Path, keys: Option<RestoreKeys<'_>>) -> anyhow::Result<Option<Coverage>> {
    let db = from.join(vitalmq_bridge::store::DB_FILE);
    let Some(keys) = keys else {
        anyhow::ensure!(
            !vitalmq_bridge::store::coverage::holds_sealed_rows(&db)?,
            "the backup holds sealed payloads: give --keyring and --key-file (the bridge's \
             [encryption] keyring) so the restore can check they will be readable"
        );
        return Ok(None);
    };
    let ring = vitalmq_keyring::Keyring::open(
        keys.keyring,
        std::sync::Arc::new(vitalmq_keyring::LocalKeyFile::load(keys.key_file)?),
    )?;
    let c = vitalmq_bridge::store::coverage::coverage(&db, &ring)?;
    anyhow::ensure!(
        c.missing == 0,
        "refused: {} of the {} data-key versions the backup's sealed rows need are not in {} \
         (and not erased): this is not the keyring of this store",
        c.missing,
        c.key_versions,
        keys.keyring.display()
    );
    Ok(Some(c))
}

pub fn restore_cmd(args: &RestoreArgs) -> anyhow::Result<ExitCode> {
    let keys = match (&args.keyring, &args.key_file) {
        (Some(keyring), Some(key_file)) => Some(RestoreKeys { keyring, key_file }),
        _ => None,
    };
    let (report, coverage) = restore_audited(&args.from, &args.data, keys)?;
    let mut summary = serde_json::to_value(&report)?;
    summary["keyring_coverage"] = serde_json::to_value(&coverage)?;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(ExitCode::SUCCESS)
}

/// Restores the backup in `from` into the new data directory `data`, audited as
/// `store.restore` in the backup directory's operator log; refused before anything is
/// written unless `keys` holds every key the backup's sealed rows need.
pub fn restore_audited(
    from: &Path,
    data: &Path,
    keys: Option<RestoreKeys<'_>>,
) -> anyhow::Result<(RestoreReport, Option<Coverage>)> {
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
        .detail("keyring", keys.map(|k| absolute(k.keyring)))
        .run(|| {
            let covered = keys_cover(from, keys)?;
            let r = restore(from, data)?;
            let mut d = details(
                &r.sha256,
                r.schema_version,
                r.counts,
                r.highest_event_position,
            );
            d.insert("keyring_coverage".into(), serde_json::to_value(&covered)?);
            Ok(((r, covered), d))
        })
}
