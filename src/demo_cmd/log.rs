//! The demo's tracing: every component's log goes to `demo.log` in the work directory
//! (the terminal is for the demo's own lines; `RUST_LOG` sets the level, default
//! `info`), and one event is watched for: the bridge's ready line
//! ([`vitalmq_bridge::READY`]), which says it is subscribed, so devices may start.
//! `--log-format json` writes the file as JSON lines.

use std::path::Path;
use std::sync::Mutex;

use anyhow::Context as _;

use crate::log_format::LogFormat;
use tokio::sync::watch;
use tracing::field::{Field, Visit};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer, fmt};

/// Sends the log to `path`; the receiver turns true once the bridge is ready.
pub fn init(path: &Path, format: LogFormat) -> anyhow::Result<watch::Receiver<bool>> {
    let file = Mutex::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let level = crate::log_format::level();
    let (tx, rx) = watch::channel(false);
    let ready = BridgeReady { tx }
        .with_filter(Targets::new().with_target("vitalmq_bridge", tracing::Level::INFO));
    tracing_subscriber::registry()
        .with(
            match format {
                LogFormat::Text => fmt::layer().with_ansi(false).with_writer(file).boxed(),
                LogFormat::Json => fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(file)
                    .boxed(),
            }
            .with_filter(level),
        )
        .with(ready)
        .try_init()
        .context("installing the log")?;
    Ok(rx)
}

/// Watches for the bridge's ready event.
struct BridgeReady {
    tx: watch::Sender<bool>,
}

impl<S: tracing::Subscriber> Layer<S> for BridgeReady {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut message = MessageIs {
            wanted: vitalmq_bridge::READY,
            found: false,
        };
        event.record(&mut message);
        if message.found {
            self.tx.send_replace(true);
        }
    }
}

/// Whether an event's message is `wanted`.
struct MessageIs {
    wanted: &'static str,
    found: bool,
}

impl Visit for MessageIs {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" && format!("{value:?}") == self.wanted {
            self.found = true;
        }
    }
}
