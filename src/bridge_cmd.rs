//! `vitalmq bridge --config FILE` runs the bridge; `vitalmq store ...` reads what a
//! bridge stored (running or stopped) as JSON lines, and `vitalmq store reset-sequence`
//! asks the bridge to forget a device's sequence state; `vitalmq store backup|restore`
//! are in `backup_cmd`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use vitalmq_bridge::BridgeConfig;
use vitalmq_bridge::store::Store;

#[derive(Debug, clap::Args)]
pub struct BridgeArgs {
    /// Bridge configuration (TOML); see bridge/examples/bridge.toml.
    #[arg(long)]
    config: PathBuf,
}

pub fn run(args: BridgeArgs) -> anyhow::Result<ExitCode> {
    let config = BridgeConfig::load(&args.config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime
        .block_on(vitalmq_bridge::run(config, crate::stop::wait_for_stop()))
        .with_context(|| format!("bridge from {}", args.config.display()))?;
    Ok(ExitCode::SUCCESS)
}

/// Every shadow alert change of the store as JSON lines (`payload` opened when
/// readable, else empty with `marks` saying why), like `store scores`.
fn shadow_alert_lines(store: &vitalmq_bridge::store::Store) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = store.shadow_alerts(after, None, 1000)?;
        let Some(last) = page.last() else { break };
        after = last.id;
        for s in page {
            out.push(
                serde_json::json!({
                    "id": s.id,
                    "change_id": s.change_id,
                    "alert_id": s.alert_id,
                    "patient_ref": s.patient_ref,
                    "site": s.site,
                    "device": s.device,
                    "model": s.model,
                    "version": s.version,
                    "config_sha256": s.config_sha256,
                    "role": s.role,
                    "rule": s.rule,
                    "state": s.state,
                    "severity": s.severity,
                    "at_ms": s.at_ms,
                    "created_at_ms": s.created_at_ms,
                    "payload": s.payload.text(),
                    "marks": s.payload.marks(),
                })
                .to_string(),
            );
        }
    }
    Ok(out)
}

/// What to print from a bridge's store.
#[derive(Debug, clap::Subcommand)]
pub enum StoreCommand {
    /// Totals: events, refusals by reason, duplicates, replays, gaps, sink cursors.
    Stats(DataDir),
    /// Accepted events in outbox order, one JSON object per line.
    Events(DataDir),
    /// Refused messages kept for investigation, one per line.
    Quarantine(DataDir),
    /// Data-completeness events (sequence gaps), one per line.
    Gaps(DataDir),
    /// Alert state changes (clinical and operational) as published, one per line.
    Alerts(DataDir),
    /// Server-side scores (NEWS2, every version: live, shadow, canary) in id order,
    /// one per line, payloads opened with `--key-file`.
    Scores(DataDir),
    /// Would-be alert changes of candidate rule sets running in shadow (issue 21), in
    /// id order, one per line, payloads opened with `--key-file`.
    ShadowAlerts(DataDir),
    /// Ask the bridge to forget a device's sequence state (window and open gaps), e.g.
    /// after re-keying it or after it sent `epoch` = u64::MAX and is locked out. The
    /// bridge applies the request before its next batch (or when it starts) and audits
    /// it; this command records it and is audited in the operator log.
    ResetSequence(ResetArgs),
    /// Online backup of the store into a new directory (the bridge may be running):
    /// the database and a manifest with its SHA-256 and row counts. The keyring is not
    /// included (by design); audited in the operator log.
    Backup(crate::backup_cmd::BackupArgs),
    /// Restore a backup into a new, empty data directory (checked against its manifest
    /// first); audited in the operator log of the backup directory.
    Restore(crate::backup_cmd::RestoreArgs),
}

#[derive(Debug, clap::Args)]
pub struct ResetArgs {
    /// The bridge's data directory (`data_dir` in its configuration).
    #[arg(long)]
    data: PathBuf,
    /// The device whose sequence state to reset.
    #[arg(long)]
    device: vitalmq_envelope::DeviceId,
    /// Why (recorded in both audit logs), e.g. "re-keyed, ticket 4711".
    #[arg(long)]
    reason: String,
    /// Wait this long for a running bridge to apply it (e.g. `10s`); without it the
    /// command returns once the request is recorded.
    #[arg(long, value_parser = vitalmq_device_sim::runner::parse_duration)]
    wait: Option<std::time::Duration>,
}

#[derive(Debug, clap::Args)]
pub struct DataDir {
    /// The bridge's data directory (`data_dir` in its configuration); not with
    /// `--server`.
    #[arg(long, required_unless_present = "server", conflicts_with = "server")]
    data: Option<PathBuf>,
    /// Only this device's rows (with `--server`).
    #[arg(long, requires = "server")]
    device: Option<String>,
    /// The key file of `[encryption]`: sealed payloads are opened with the keyring in
    /// the data directory (without it they show as `"sealed": true`; erased ones as
    /// `"erased": true` either way).
    #[arg(long, conflicts_with = "server")]
    key_file: Option<PathBuf>,
    /// Why the records are read (recorded in the audit log; required with `--server`).
    #[arg(long)]
    purpose: Option<String>,
    /// The admin API to ask instead of the local store (events, alerts, quarantine).
    #[command(flatten)]
    client: crate::admin_cmd::client::ClientArgs,
}

impl StoreCommand {
    /// The operator action name of a read of patient-linked records; `None` for
    /// `stats` (totals only, not audited).
    fn audited_action(&self) -> Option<&'static str> {
        match self {
            Self::Stats(_) => None,
            Self::Events(_) => Some("store.events"),
            Self::Quarantine(_) => Some("store.quarantine"),
            Self::Gaps(_) => Some("store.gaps"),
            Self::Alerts(_) => Some("store.alerts"),
            Self::Scores(_) => Some("store.scores"),
            Self::ShadowAlerts(_) => Some("store.shadow_alerts"),
            Self::ResetSequence(_) => Some("store.reset_sequence"),
            Self::Backup(_) => Some("store.backup"),
            Self::Restore(_) => Some("store.restore"),
        }
    }

    pub fn run(self) -> anyhow::Result<ExitCode> {
        let d = match &self {
            Self::ResetSequence(args) => return reset_sequence(args),
            Self::Backup(args) => return crate::backup_cmd::backup(args),
            Self::Restore(args) => return crate::backup_cmd::restore_cmd(args),
            Self::Stats(d)
            | Self::Events(d)
            | Self::Quarantine(d)
            | Self::Gaps(d)
            | Self::Alerts(d)
            | Self::Scores(d)
            | Self::ShadowAlerts(d) => d,
        };
        let data = match (d.client.remote(), &d.data) {
            (Some(server), _) => {
                let kind = match &self {
                    Self::Events(_) => "events",
                    Self::Alerts(_) => "alerts",
                    Self::Quarantine(_) => "quarantine",
                    _ => anyhow::bail!(
                        "only events, alerts and quarantine are served by the admin API"
                    ),
                };
                return d.client.store_rows(
                    server,
                    kind,
                    d.device.as_deref(),
                    d.purpose.as_deref(),
                );
            }
            (None, Some(data)) => data,
            (None, None) => anyhow::bail!("--data or --server is required"),
        };
        let store = open_existing_with(data, d.key_file.as_deref())?;
        let read = || -> anyhow::Result<((), serde_json::Map<String, serde_json::Value>)> {
            let rows = match &self {
                Self::Stats(_) => json_lines(&[store.stats()?])?,
                Self::Events(_) => json_lines(&store.list_events()?)?,
                Self::Quarantine(_) => json_lines(&store.list_quarantine()?)?,
                Self::Gaps(_) => json_lines(&store.list_gaps()?)?,
                Self::Alerts(_) => json_lines(&store.list_alerts()?)?,
                Self::Scores(_) => json_lines(&store.list_scores()?)?,
                Self::ShadowAlerts(_) => shadow_alert_lines(&store)?,
                // Returned above.
                Self::ResetSequence(_) | Self::Backup(_) | Self::Restore(_) => Vec::new(),
            };
            for row in &rows {
                println!("{row}");
            }
            let mut done = serde_json::Map::new();
            done.insert("rows".into(), rows.len().into());
            Ok(((), done))
        };
        match self.audited_action() {
            None => read().map(|((), _)| ())?,
            Some(action) => crate::operator_audit::Action::new(
                action,
                crate::operator_audit::log_path(crate::operator_audit::data_dir_log(data)),
            )
            .detail("data_dir", crate::operator_audit::absolute(data))
            .detail("purpose", d.purpose.clone())
            .run(read)?,
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// Typed store rows as the JSON lines `vitalmq store` prints.
fn json_lines<T: serde::Serialize>(rows: &[T]) -> anyhow::Result<Vec<String>> {
    Ok(rows
        .iter()
        .map(serde_json::to_string)
        .collect::<Result<_, _>>()?)
}

/// Records a sequence reset request for the bridge (see `vitalmq_bridge::store::resets`)
/// as an audited operator action, and optionally waits until the bridge applied it.
/// Exit code 0 when recorded (and applied, with `--wait`), 1 when `--wait` ran out.
fn reset_sequence(args: &ResetArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        !args.reason.trim().is_empty() && args.reason.len() <= 256,
        "--reason must say why, in at most 256 bytes"
    );
    let store = open_existing(&args.data)?;
    let who = vitalmq_audit::operator::Operator::current();
    let by = match &who.sudo_user {
        Some(s) => format!("{} (sudo from {s})", who.identity()),
        None => who.identity(),
    };
    let log = crate::operator_audit::log_path(crate::operator_audit::data_dir_log(&args.data));
    let done = crate::operator_audit::Action::new("store.reset_sequence", log)
        .resource(Some(args.device.to_string()))
        .detail("data_dir", crate::operator_audit::absolute(&args.data))
        .detail("reason", args.reason.as_str())
        .run(|| {
            let now = vitalmq_bridge::recorder::now_ms();
            let request =
                store.request_sequence_reset(args.device.as_str(), &by, &args.reason, now)?;
            let deadline = args.wait.map(|w| std::time::Instant::now() + w);
            let mut current = request.clone();
            while let Some(deadline) = deadline
                && current.applied_at_ms.is_none()
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(100));
                current = store.sequence_reset(request.id)?.unwrap_or(current);
            }
            let mut details = serde_json::Map::new();
            details.insert("request".into(), current.id.into());
            details.insert(
                "state".into(),
                if current.applied_at_ms.is_some() {
                    "applied"
                } else {
                    "pending"
                }
                .into(),
            );
            if let Some(p) = &current.previous {
                details.insert("previous".into(), p.as_str().into());
            }
            Ok((current, details))
        })?;
    println!("{}", serde_json::to_string(&done)?);
    if done.applied_at_ms.is_none() {
        eprintln!(
            "request {} recorded; the bridge applies it before its next batch, or when it starts",
            done.id
        );
        if args.wait.is_some() {
            return Ok(ExitCode::from(1));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Opens the store of a bridge data directory that must already hold one (a typo in
/// `--data` must not create an empty store, or an operator audit log, somewhere).
/// With a keyring at its default place, an erased patient's rows read as erased; sealed
/// payloads open only with a key file ([`open_existing_with`]).
pub fn open_existing(data: &std::path::Path) -> anyhow::Result<Store> {
    open_existing_with(data, None)
}

/// As [`open_existing`], opening sealed payloads with the keyring of `data` and the
/// key-encryption keys of `key_file` (`[encryption] key_file`) when given.
pub fn open_existing_with(
    data: &std::path::Path,
    key_file: Option<&std::path::Path>,
) -> anyhow::Result<Store> {
    let db = data.join(vitalmq_bridge::store::DB_FILE);
    anyhow::ensure!(db.exists(), "{}: no bridge store here", db.display());
    let store = Store::open(data)?;
    let keyring_path = data.join(vitalmq_keyring::KEYRING_FILE);
    if !keyring_path.exists() {
        anyhow::ensure!(
            key_file.is_none(),
            "{}: no keyring here, so nothing to open with --key-file",
            keyring_path.display()
        );
        return Ok(store);
    }
    let keyring = open_keyring(&keyring_path, key_file)?;
    Ok(store.with_keyring(std::sync::Arc::new(keyring)))
}

/// The keyring at `path`, unwrapping with the KEKs of `key_file`; without one it holds
/// no key (`NoKeys`) but still tells an erased patient from a merely sealed one. The
/// one opening every command that reads a store shares (store reads, trace, erase,
/// export, the admin API).
pub fn open_keyring(
    path: &std::path::Path,
    key_file: Option<&std::path::Path>,
) -> anyhow::Result<vitalmq_keyring::Keyring> {
    let provider: std::sync::Arc<dyn vitalmq_keyring::KeyProvider> = match key_file {
        Some(f) => std::sync::Arc::new(vitalmq_keyring::LocalKeyFile::load(f)?),
        None => std::sync::Arc::new(vitalmq_bridge::store::NoKeys),
    };
    vitalmq_keyring::Keyring::open(path, provider)
        .with_context(|| format!("keyring {}", path.display()))
}
