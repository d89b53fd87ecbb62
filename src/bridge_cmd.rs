//! `vitalmq bridge --config FILE` runs the bridge; `vitalmq store ...` reads what a
//! bridge stored (running or stopped) as JSON lines.

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
}

#[derive(Debug, clap::Args)]
pub struct DataDir {
    /// The bridge's data directory (`data_dir` in its configuration).
    #[arg(long)]
    data: PathBuf,
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
        }
    }

    pub fn run(self) -> anyhow::Result<ExitCode> {
        let (Self::Stats(d)
        | Self::Events(d)
        | Self::Quarantine(d)
        | Self::Gaps(d)
        | Self::Alerts(d)) = &self;
        let store = open_existing(&d.data)?;
        let read = || -> anyhow::Result<((), serde_json::Map<String, serde_json::Value>)> {
            let rows = match &self {
                Self::Stats(_) => vec![store.stats()?],
                Self::Events(_) => store.list_events()?,
                Self::Quarantine(_) => store.list_quarantine()?,
                Self::Gaps(_) => store.list_gaps()?,
                Self::Alerts(_) => store.list_alerts()?,
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
                crate::operator_audit::log_path(crate::operator_audit::data_dir_log(&d.data)),
            )
            .detail("data_dir", crate::operator_audit::absolute(&d.data))
            .run(read)?,
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// Opens the store of a bridge data directory that must already hold one (a typo in
/// `--data` must not create an empty store, or an operator audit log, somewhere).
pub fn open_existing(data: &std::path::Path) -> anyhow::Result<Store> {
    let db = data.join(vitalmq_bridge::store::DB_FILE);
    anyhow::ensure!(db.exists(), "{}: no bridge store here", db.display());
    Ok(Store::open(data)?)
}
