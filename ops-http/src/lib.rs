//! The operations endpoint of a vitalmq process (broker, bridge): one HTTP listener
//! the process binds itself, serving
//!
//! - `GET /metrics`: the Prometheus text of the process-wide recorder ([`recorder`]);
//! - `GET /healthz`: 200 while the process runs (liveness);
//! - `GET /readyz`: 200 when every named check of its [`Readiness`] holds, else 503
//!   with the failing names, one a line (readiness);
//! - anything else: 404.
//!
//! The exporter crate's own HTTP listener binds inside and cannot tell which port it
//! got, so the listener is bound here and its real address returned and logged
//! (`metrics on /metrics addr=<addr>`): a configuration may ask for port 0, as tests do.

#![forbid(unsafe_code)]

mod readiness;
mod recorder;
mod server;

pub use readiness::Readiness;
pub use recorder::{SECONDS_BUCKETS, recorder};
pub use server::{Endpoints, OpsServer, serve};

/// Why the operations endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpsHttpError {
    #[error("bind the operations endpoint on {addr}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("install the Prometheus recorder")]
    Recorder(#[source] metrics_exporter_prometheus::BuildError),
}
