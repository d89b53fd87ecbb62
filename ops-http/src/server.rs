//! The listener and its routes.

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::{OpsHttpError, Readiness};

/// The Prometheus text exposition format.
const METRICS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the endpoint serves.
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    /// `/metrics`; 503 when the process has no recorder.
    pub metrics: Option<PrometheusHandle>,
    /// `/readyz`.
    pub readiness: Readiness,
}

/// A running endpoint; it stops when dropped.
#[derive(Debug)]
pub struct OpsServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl OpsServer {
    /// The address really bound (the port chosen when port 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for OpsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `addr` and serves `endpoints` there from a task of the current runtime. Logs
/// `metrics on /metrics addr=<bound>` (tests read the port from it).
pub async fn serve(addr: SocketAddr, endpoints: Endpoints) -> Result<OpsServer, OpsHttpError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| OpsHttpError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| OpsHttpError::Bind { addr, source })?;
    tracing::info!(addr = %bound, "metrics on /metrics");
    let task = tokio::spawn(accept_loop(listener, endpoints));
    Ok(OpsServer { addr: bound, task })
}

async fn accept_loop(listener: TcpListener, endpoints: Endpoints) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "operations connection not accepted");
                continue;
            }
        };
        let endpoints = endpoints.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let response = respond(&endpoints, req.method(), req.uri().path());
            async move { Ok::<_, Infallible>(response) }
        });
        tokio::spawn(async move {
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "operations connection ended");
            }
        });
    }
}

/// The answer to one request.
fn respond(endpoints: &Endpoints, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let known = matches!(path, "/metrics" | "/healthz" | "/readyz");
    if known && method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".to_owned());
    }
    match path {
        "/metrics" => match &endpoints.metrics {
            Some(handle) => {
                let mut response = text(StatusCode::OK, handle.render());
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static(METRICS_TYPE));
                response
            }
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no metrics recorder in this process\n".to_owned(),
            ),
        },
        "/healthz" => text(StatusCode::OK, "ok\n".to_owned()),
        "/readyz" => {
            let failing = endpoints.readiness.failing();
            if failing.is_empty() {
                text(StatusCode::OK, "ready\n".to_owned())
            } else {
                let body: String = failing.iter().map(|name| format!("{name}\n")).collect();
                text(StatusCode::SERVICE_UNAVAILABLE, body)
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".to_owned()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    async fn get(server: &OpsServer, path: &str) -> (u16, String) {
        let r = reqwest::get(format!("http://{}{path}", server.addr()))
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    #[tokio::test]
    async fn routes_answer_and_readyz_names_what_fails() {
        let connected = Arc::new(AtomicBool::new(false));
        let handle = crate::recorder().unwrap();
        let server = serve(
            "127.0.0.1:0".parse().unwrap(),
            Endpoints {
                metrics: Some(handle),
                readiness: Readiness::new()
                    .flag("connected", Arc::clone(&connected))
                    .check("store_writable", || true),
            },
        )
        .await
        .unwrap();
        assert_ne!(server.addr().port(), 0);

        metrics::counter!("ops_http_test_total").increment(3);
        metrics::histogram!("ops_http_test_seconds").record(0.003);
        let (status, body) = get(&server, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("ops_http_test_total 3"), "{body}");
        // A histogram with buckets, not a summary with quantiles.
        assert!(
            body.contains("ops_http_test_seconds_bucket{le=\"0.005\"} 1"),
            "{body}"
        );
        assert!(!body.contains("quantile="), "{body}");

        assert_eq!(get(&server, "/healthz").await, (200, "ok\n".to_owned()));
        assert_eq!(
            get(&server, "/readyz").await,
            (503, "connected\n".to_owned())
        );
        connected.store(true, Ordering::Release);
        assert_eq!(get(&server, "/readyz").await, (200, "ready\n".to_owned()));
        assert_eq!(get(&server, "/health").await.0, 404);
        assert_eq!(get(&server, "/").await.0, 404);

        let post = reqwest::Client::new()
            .post(format!("http://{}/readyz", server.addr()))
            .send()
            .await
            .unwrap();
        assert_eq!(post.status().as_u16(), 405);
    }

    #[tokio::test]
    async fn without_a_recorder_metrics_is_unavailable_and_a_second_recorder_is_the_same() {
        let server = serve("127.0.0.1:0".parse().unwrap(), Endpoints::default())
            .await
            .unwrap();
        assert_eq!(get(&server, "/metrics").await.0, 503);
        assert_eq!(get(&server, "/readyz").await.0, 200);
        // Installing twice in one process hands out the one recorder.
        let a = crate::recorder().unwrap();
        let b = crate::recorder().unwrap();
        metrics::counter!("ops_http_twice_total").increment(1);
        assert!(a.render().contains("ops_http_twice_total 1"));
        assert!(b.render().contains("ops_http_twice_total 1"));
    }

    #[tokio::test]
    async fn a_taken_port_is_a_typed_error_and_a_dropped_server_stops() {
        let server = serve("127.0.0.1:0".parse().unwrap(), Endpoints::default())
            .await
            .unwrap();
        let addr = server.addr();
        let err = serve(addr, Endpoints::default()).await.unwrap_err();
        assert!(matches!(err, OpsHttpError::Bind { addr: a, .. } if a == addr));
        drop(server);
        // The listener is closed once the aborted task is gone: connections are refused.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "still listening");
            tokio::task::yield_now().await;
        }
    }
}
