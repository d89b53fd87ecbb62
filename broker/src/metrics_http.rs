//! The broker's operations endpoint (`metrics_listen`): Prometheus `/metrics`,
//! `/healthz` and `/readyz` (the `vitalmq-ops-http` crate), ready once the broker has
//! loaded its policy and listens. Bound by the broker itself, so `metrics_listen` may
//! ask for port 0 (tests do) and the log says which port it got.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use vitalmq_ops_http::{Endpoints, OpsServer, Readiness};

/// The broker's readiness checks, set by `Broker::start` as it gets there.
#[derive(Debug, Default)]
pub(crate) struct Ready {
    /// The ACL, registry and TLS settings loaded (a later broken reload keeps them).
    policy_loaded: Arc<AtomicBool>,
    /// The mTLS listener bound and accepting.
    listening: Arc<AtomicBool>,
}

impl Ready {
    pub(crate) fn policy_loaded(&self) {
        self.policy_loaded.store(true, Ordering::Release);
    }

    pub(crate) fn listening(&self) {
        self.listening.store(true, Ordering::Release);
    }

    fn readiness(&self) -> Readiness {
        Readiness::new()
            .flag("policy_loaded", Arc::clone(&self.policy_loaded))
            .flag("listening", Arc::clone(&self.listening))
    }
}

/// Installs the process's Prometheus recorder and serves the endpoint on `addr`. A
/// failure is logged, not fatal: the broker runs without it (without metrics, when
/// another recorder was installed in this process).
pub(crate) async fn install(addr: SocketAddr, ready: &Ready) -> Option<OpsServer> {
    let metrics = match vitalmq_ops_http::recorder() {
        Ok(handle) => Some(handle),
        Err(e) => {
            tracing::warn!(%addr, error = %e, "metrics not recorded");
            None
        }
    };
    let endpoints = Endpoints {
        metrics,
        readiness: ready.readiness(),
    };
    match vitalmq_ops_http::serve(addr, endpoints).await {
        Ok(server) => Some(server),
        Err(e) => {
            tracing::warn!(%addr, error = %e, "metrics endpoint not started");
            None
        }
    }
}
