//! `vitalmq broker --config FILE`: the mTLS gate with the embedded rumqttd.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use vitalmq_broker::{Broker, BrokerConfig};

#[derive(Debug, clap::Args)]
pub struct BrokerArgs {
    /// Broker configuration (TOML); see broker/examples/broker.toml.
    #[arg(long)]
    config: PathBuf,
}

pub fn run(args: BrokerArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let config = BrokerConfig::load(&args.config)?;
        let broker = Broker::start(config)
            .await
            .with_context(|| format!("starting the broker from {}", args.config.display()))?;
        eprintln!(
            "vitalmq broker listening on {} (mTLS); SIGHUP reloads policy and CRLs",
            broker.local_addr()
        );
        wait_for_stop().await;
        eprintln!("vitalmq broker stopping");
        broker.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}

async fn wait_for_stop() {
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let terminate = async {
            match term.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = terminate => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
