//! The bridge's operations endpoint (`[metrics]`: `/metrics`, `/healthz`, `/readyz`,
//! served by `vitalmq-ops-http`) and the names of its histograms, in one place.
//!
//! The bridge on its own installs the process's Prometheus recorder; in a process that
//! already has one from `vitalmq-ops-http` (a broker's endpoint, as in tests or a demo
//! run with both), it serves the same recorder. Histograms are exported with buckets
//! ([`vitalmq_ops_http::SECONDS_BUCKETS`]), so they aggregate across bridges.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use vitalmq_ops_http::{Endpoints, OpsHttpError, OpsServer, Readiness};

use crate::config::MetricsConfig;

/// Serves the endpoint when `[metrics]` is configured (none when it is absent). Ready
/// while `connected` (to the broker: CONNACK seen, not lost since) and `store_writable`
/// (the last commit attempt succeeded) both hold; `/readyz` names the one that does not.
/// A port that cannot be bound fails the start: a bridge asked to be observable is not
/// left running unobserved. Without a recorder (another one was installed in this
/// process) it serves `/healthz` and `/readyz` and logs why `/metrics` is missing.
pub(crate) async fn serve(
    config: Option<&MetricsConfig>,
    connected: Arc<AtomicBool>,
    store_writable: Arc<AtomicBool>,
) -> Result<Option<OpsServer>, OpsHttpError> {
    let Some(config) = config else {
        return Ok(None);
    };
    let metrics = match vitalmq_ops_http::recorder() {
        Ok(handle) => {
            describe();
            Some(handle)
        }
        Err(e) => {
            tracing::warn!(addr = %config.listen, error = %e, "metrics not recorded");
            None
        }
    };
    let readiness = Readiness::new()
        .flag("connected", connected)
        .flag("store_writable", store_writable);
    vitalmq_ops_http::serve(config.listen, Endpoints { metrics, readiness })
        .await
        .map(Some)
}

/// The `# HELP` lines of the bridge's metrics (a series appears once it has a value).
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "vitalmq_bridge_accepted_total",
        "Messages accepted and recorded."
    );
    describe_counter!("vitalmq_bridge_gaps_total", "Sequence gaps opened.");
    describe_counter!(
        "vitalmq_bridge_rejected_total",
        "Messages rejected by the sequence check, by class."
    );
    describe_counter!(
        "vitalmq_bridge_refused_total",
        "Messages refused by verification, by class."
    );
    describe_counter!(
        "vitalmq_bridge_sink_delivered_total",
        "Events confirmed by each sink."
    );
    describe_counter!(
        "vitalmq_bridge_sink_failures_total",
        "Failed deliveries to each sink."
    );
    describe_counter!(
        "vitalmq_bridge_alerts_delivered_total",
        "Alert rows confirmed by each handler."
    );
    describe_counter!(
        "vitalmq_bridge_alerts_expired_total",
        "Alert rows not published because their expiry ([alert_expiry]) passed first."
    );
    describe_gauge!(
        "vitalmq_bridge_backlog",
        "Events recorded and not yet confirmed by a sink."
    );
    describe_histogram!(
        "vitalmq_bridge_commit_duration_seconds",
        Unit::Seconds,
        "One store commit, fsync included."
    );
    describe_histogram!(
        "vitalmq_bridge_verify_batch_duration_seconds",
        Unit::Seconds,
        "Verifying one batch of messages on one core."
    );
    describe_histogram!(
        "vitalmq_bridge_alert_delivery_duration_seconds",
        Unit::Seconds,
        "One delivery attempt of alert rows to a handler, by outcome."
    );
}

/// One store commit (a batch of messages, or an alerts-only part), its fsync included.
pub(crate) fn commit_duration(took: Duration) {
    metrics::histogram!("vitalmq_bridge_commit_duration_seconds").record(took.as_secs_f64());
}

/// Verifying one batch of messages (signature, envelope, registry) on one core.
pub(crate) fn verify_batch_duration(took: Duration) {
    metrics::histogram!("vitalmq_bridge_verify_batch_duration_seconds").record(took.as_secs_f64());
}

/// One delivery attempt of a batch of alert rows to a handler, until it confirmed
/// (PUBACK, webhook 2xx) or failed.
pub(crate) fn alert_delivery_duration(handler: &str, took: Duration, ok: bool) {
    metrics::histogram!(
        "vitalmq_bridge_alert_delivery_duration_seconds",
        "handler" => handler.to_owned(),
        "outcome" => if ok { "ok" } else { "failed" },
    )
    .record(took.as_secs_f64());
}
