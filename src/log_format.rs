//! `--log-format text|json`: how every subcommand writes its log. `json` is one JSON
//! object per line (JSON lines) for log shippers: `timestamp`, `level`, `target`,
//! `message` and every structured field of the event as a key of its own.

use tracing_subscriber::EnvFilter;

/// The log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, the event's fields flattened into it.
    Json,
}

/// `RUST_LOG`, default `info`.
pub fn level() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Logs to stderr in `format`.
pub fn init_stderr(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(level())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}
