//! The Prometheus `/metrics` endpoint (`metrics_listen`). The exporter crate's own HTTP
//! listener binds inside and cannot tell which port it got, so the broker binds the
//! listener itself and logs the address it really bound: `metrics_listen` may ask for
//! port 0, as tests do.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

/// How often the recorder's histograms are maintained (the exporter's default).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Binds `addr`, installs the global Prometheus recorder and serves it there. A
/// failure is logged, not fatal: the broker runs without metrics.
pub(crate) async fn install(addr: SocketAddr) {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(%addr, error = %e, "metrics endpoint not started");
            return;
        }
    };
    let handle = match PrometheusBuilder::new().install_recorder() {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(%addr, error = %e, "metrics endpoint not started");
            return;
        }
    };
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!(addr = %bound, "metrics on /metrics");
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(UPKEEP_EVERY).await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(serve(listener, handle));
}

/// Serves the metrics text on every connection.
async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics connection not accepted");
                continue;
            }
        };
        let handle = handle.clone();
        // As the exporter's own listener answered: `/health` is "OK", any other path
        // the metrics text.
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let body = if req.uri().path() == "/health" {
                "OK".to_owned()
            } else {
                handle.render()
            };
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            async move { Ok::<_, Infallible>(response) }
        });
        tokio::spawn(async move {
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}
