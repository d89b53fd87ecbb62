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
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let open = |d: &DataDir| -> anyhow::Result<Store> {
            let db = d.data.join(vitalmq_bridge::store::DB_FILE);
            anyhow::ensure!(db.exists(), "{}: no bridge store here", db.display());
            Ok(Store::open(&d.data)?)
        };
        let rows = match &self {
            Self::Stats(d) => vec![open(d)?.stats()?],
            Self::Events(d) => open(d)?.list_events()?,
            Self::Quarantine(d) => open(d)?.list_quarantine()?,
            Self::Gaps(d) => open(d)?.list_gaps()?,
            Self::Alerts(d) => open(d)?.list_alerts()?,
        };
        for row in rows {
            println!("{row}");
        }
        Ok(ExitCode::SUCCESS)
    }
}
