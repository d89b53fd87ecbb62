//! `vitalmq broker --config FILE`: the mTLS gate with the embedded rumqttd.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use vitalmq_broker::{Broker, BrokerConfig};

use crate::log_format::LogFormat;

#[derive(Debug, clap::Args)]
pub struct BrokerArgs {
    /// Broker configuration (TOML); see broker/examples/broker.toml.
    #[arg(long)]
    config: PathBuf,
}

pub fn run(args: BrokerArgs, log_format: LogFormat) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let config = BrokerConfig::load(&args.config)?;
        let broker = Broker::start(config)
            .await
            .with_context(|| format!("starting the broker from {}", args.config.display()))?;
        let addr = broker.local_addr();
        match log_format {
            LogFormat::Text => {
                // One write: stderr is unbuffered and `eprintln!` writes each fragment on
                // its own, so a reader of this line (tests, scripts) could see it without
                // its address.
                let ready = format!(
                    "vitalmq broker listening on {addr} (mTLS); SIGHUP reloads policy and CRLs\n"
                );
                std::io::Write::write_all(&mut std::io::stderr().lock(), ready.as_bytes())?;
            }
            // Every line a JSON object: the ready line too, its address also a field.
            LogFormat::Json => tracing::info!(
                %addr,
                "vitalmq broker listening on {addr} (mTLS); SIGHUP reloads policy and CRLs"
            ),
        }
        crate::stop::wait_for_stop().await;
        match log_format {
            LogFormat::Text => eprintln!("vitalmq broker stopping"),
            LogFormat::Json => tracing::info!("vitalmq broker stopping"),
        }
        broker.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}
