//! The process-wide Prometheus recorder. `metrics` has one global recorder per process
//! and it can be set once: `vitalmq demo` and the tests run a broker and a bridge in one
//! process, so the first caller installs it and every later one gets the same handle.

use std::sync::Mutex;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::OpsHttpError;

/// Buckets (seconds) of every histogram: exported as Prometheus histograms
/// (`_bucket{le=...}`), never summaries, so they aggregate across nodes. From half a
/// millisecond (a handshake, a verify batch) to a minute (an alert delivered after
/// retries).
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// How often the recorder's histograms are maintained (the exporter's default).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

/// The handle of the process-wide recorder, installed (with [`SECONDS_BUCKETS`] for
/// every histogram) by the first call. Fails when another recorder was installed
/// globally by something else.
pub fn recorder() -> Result<PrometheusHandle, OpsHttpError> {
    // A poisoned lock still holds a valid Option: nothing panics between its writes.
    let mut slot = HANDLE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(handle) = slot.as_ref() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets(SECONDS_BUCKETS)
        .map_err(OpsHttpError::Recorder)?
        .install_recorder()
        .map_err(OpsHttpError::Recorder)?;
    // Not a task: the recorder outlives any one runtime (tests start several).
    let upkeep = handle.clone();
    let spawned = std::thread::Builder::new()
        .name("vitalmq-metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_EVERY);
                upkeep.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        // Upkeep only bounds the histograms' memory; metrics still work without it.
        tracing::warn!(error = %e, "metrics upkeep thread not started");
    }
    *slot = Some(handle.clone());
    Ok(handle)
}
