//! FHIR sink: each batch of the outbox becomes one FHIR R4 `transaction` Bundle
//! ([`bundle::bundle_for`]) POSTed to the configured base URL with an OAuth 2.0
//! client-credentials bearer token ([`oauth`]).
//!
//! Idempotent as the sink contract requires: every entry is a conditional create
//! (`ifNoneExist = identifier=<system>|<value>`), so a batch delivered again (a lost
//! answer, a restart before the cursor moved) finds what it created and creates nothing
//! twice. Confirmed only by a `200` transaction-response whose entries are all 2xx
//! ([`response::check`]); FHIR transactions are atomic, so a refusal wrote nothing.
//!
//! Failures, retried by the drain with capped backoff like every sink's:
//! * unreachable, timed out, `5xx`, `408`, `429`: [`SinkError::Unavailable`];
//! * `401`: the token is fetched again and the transaction sent once more; a second
//!   `401` is a misconfiguration;
//! * other `4xx` (validation: an OperationOutcome), refused credentials at the token
//!   endpoint, an answer that is not a transaction-response: [`SinkError::Refused`],
//!   counted in `vitalmq_bridge_fhir_refused_total{sink,status}`. The records stay in
//!   the outbox and the drain keeps retrying (a fixed server or mapping takes them):
//!   after three failures it raises `ops/bridge/sink` and audits `sink_failed`, so a
//!   refusal is never retried silently.
//!
//! Logs, audit and alerts name statuses and OperationOutcome locations, never the
//! resources, the outcome's diagnostics (they may quote values), the secret or a token.

pub mod bundle;
pub mod oauth;
pub mod response;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use reqwest::StatusCode;
use tokio::sync::watch;
use tracing::{debug, warn};
use vitalmq_policies::DeviceRegistry;

use super::{Batch, Sink, SinkError, SinkFailure};
use crate::config::FhirSinkConfig;
use oauth::TokenSource;

/// What went wrong talking to the FHIR server or its token endpoint.
#[derive(Debug, thiserror::Error)]
pub enum FhirFailure {
    /// Connection, TLS, timeout or body transfer.
    #[error("http: {0}")]
    Http(#[source] reqwest::Error),
    /// The token endpoint refused (RFC 6749 5.2 `error`, e.g. `invalid_client`).
    #[error("token endpoint answered {status} {error}")]
    Token { status: u16, error: String },
    #[error("token endpoint: {0}")]
    TokenResponse(String),
    /// The transaction was refused as a whole.
    #[error("transaction answered {status}: {outcome}")]
    Status { status: u16, outcome: String },
    /// The transaction-response names an entry that was not created nor found.
    #[error("transaction-response entry {index}: {status}")]
    Entry { index: usize, status: String },
    #[error("transaction-response: {0}")]
    Response(String),
    /// The batch could not be mapped to FHIR resources.
    #[error("mapping: {0}")]
    Mapping(String),
}

impl FhirFailure {
    /// Whether a retry may succeed without anyone changing anything.
    fn transient(&self) -> bool {
        let transient_status = |s: u16| s >= 500 || s == 408 || s == 429;
        match self {
            Self::Http(_) => true,
            Self::Token { status, .. } | Self::Status { status, .. } => transient_status(*status),
            Self::Entry { status, .. } => status
                .split_whitespace()
                .next()
                .and_then(|s| s.parse().ok())
                .is_some_and(transient_status),
            Self::TokenResponse(_) | Self::Response(_) | Self::Mapping(_) => false,
        }
    }

    /// The HTTP status (or the failure's kind) as a metric label.
    fn label(&self) -> String {
        match self {
            Self::Token { status, .. } => format!("token-{status}"),
            Self::Status { status, .. } => status.to_string(),
            Self::Entry { .. } => "entry".into(),
            Self::Http(_) => "http".into(),
            Self::TokenResponse(_) => "token-response".into(),
            Self::Response(_) => "response".into(),
            Self::Mapping(_) => "mapping".into(),
        }
    }
}

/// Why a FHIR sink could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FhirSetupError {
    #[error("client_secret_file: {0}")]
    Secret(#[source] vitalmq_keyring::KeyError),
    #[error("client_secret_file {}: empty", .0.display())]
    EmptySecret(PathBuf),
    #[error("ca {}: {source}", path.display())]
    CaRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("ca {}: {source}", path.display())]
    CaPem {
        path: PathBuf,
        source: reqwest::Error,
    },
    #[error("http client: {0}")]
    Client(#[source] reqwest::Error),
}

/// Sends batches to a FHIR server as transaction Bundles.
pub struct FhirSink {
    name: String,
    base_url: String,
    client: reqwest::Client,
    tokens: TokenSource,
    /// The device registry in force (reloaded on change): the Devices' lot, hardware
    /// model and region. `None` for the alert handler, whose Bundles hold no Device.
    registry: Option<watch::Receiver<Arc<DeviceRegistry>>>,
}

impl std::fmt::Debug for FhirSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FhirSink")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

impl FhirSink {
    /// The sink of `config`: reads the client secret and the extra root now, so a
    /// mistake stops the bridge at start rather than at the first batch.
    pub fn new(config: &FhirSinkConfig) -> Result<Self, FhirSetupError> {
        let secret = vitalmq_keyring::secret_file::read_secret(&config.client_secret_file)
            .map_err(FhirSetupError::Secret)?;
        // A secret file written by an editor ends with a newline that is not the secret's.
        let secret = secret.trim_ascii_end();
        if secret.is_empty() {
            return Err(FhirSetupError::EmptySecret(
                config.client_secret_file.clone(),
            ));
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .timeout(Duration::from_millis(config.timeout_ms))
            // A redirect would carry the bearer token elsewhere.
            .redirect(reqwest::redirect::Policy::none());
        if let Some(path) = &config.ca {
            let pem = std::fs::read(path).map_err(|source| FhirSetupError::CaRead {
                path: path.clone(),
                source,
            })?;
            let cert =
                reqwest::Certificate::from_pem(&pem).map_err(|source| FhirSetupError::CaPem {
                    path: path.clone(),
                    source,
                })?;
            builder = builder.add_root_certificate(cert);
        }
        let client = builder.build().map_err(FhirSetupError::Client)?;
        let tokens = TokenSource::new(
            client.clone(),
            config.token_url.clone(),
            config.client_id.clone(),
            secret,
            config.scope.clone(),
        );
        Ok(Self {
            name: config.name.clone(),
            base_url: config.base_url.clone(),
            client,
            tokens,
            registry: None,
        })
    }

    /// Reads the Devices' lot, hardware model and region from `registry`, the registry
    /// in force when each batch is mapped (as the drain's governance does).
    #[must_use]
    pub fn with_registry(mut self, registry: watch::Receiver<Arc<DeviceRegistry>>) -> Self {
        self.registry = Some(registry);
        self
    }

    /// POSTs `body` (a transaction Bundle) with `token`: the status and the answer.
    async fn post(
        &self,
        body: &bytes::Bytes,
        token: &str,
    ) -> Result<(StatusCode, bytes::Bytes), FhirFailure> {
        let response = self
            .client
            .post(&self.base_url)
            .bearer_auth(token)
            .header(reqwest::header::CONTENT_TYPE, "application/fhir+json")
            .header(reqwest::header::ACCEPT, "application/fhir+json")
            .body(body.clone())
            .send()
            .await
            .map_err(FhirFailure::Http)?;
        let status = response.status();
        let answer = response.bytes().await.map_err(FhirFailure::Http)?;
        Ok((status, answer))
    }

    /// One transaction of `batch`, with one fresh token after a `401`.
    async fn transact(&self, batch: &Batch) -> Result<(), FhirFailure> {
        // Cloned out of the watch so no borrow is held across the send.
        let registry = self.registry.as_ref().map(|r| Arc::clone(&r.borrow()));
        match bundle::bundle_for(batch, registry.as_deref())? {
            Some(bundle) => self.send(&bundle).await,
            None => Ok(()), // nothing FHIR records (no event of the batch maps)
        }
    }

    /// Sends the clinical alert changes of `alerts` (the `fhir` alert handler, see
    /// `crate::delivery`) as one transaction; `Ok` at once when none is clinical.
    pub async fn deliver_alerts(
        &self,
        alerts: &[crate::store::StoredAlert],
    ) -> Result<(), FhirFailure> {
        match bundle::alert_bundle(alerts)? {
            Some(bundle) => self.send(&bundle).await,
            None => Ok(()),
        }
    }

    /// POSTs the transaction `bundle`, with one fresh token after a `401`; `Ok` on a
    /// 200 transaction-response whose entries are all 2xx.
    async fn send(&self, bundle: &serde_json::Value) -> Result<(), FhirFailure> {
        let sent = bundle["entry"].as_array().map_or(0, Vec::len);
        let body = bytes::Bytes::from(
            serde_json::to_vec(bundle).map_err(|e| FhirFailure::Mapping(e.to_string()))?,
        );
        let token = self.tokens.token(false).await?;
        let (mut status, mut answer) = self.post(&body, &token).await?;
        if status == StatusCode::UNAUTHORIZED {
            debug!(sink = %self.name, "bearer token refused; fetching a new one");
            let token = self.tokens.token(true).await?;
            (status, answer) = self.post(&body, &token).await?;
        }
        if status != StatusCode::OK {
            return Err(FhirFailure::Status {
                status: status.as_u16(),
                outcome: response::outcome_summary(&answer),
            });
        }
        response::check(&answer, sent)
    }
}

impl Sink for FhirSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn deliver<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            match self.transact(batch).await {
                Ok(()) => {
                    debug!(sink = %self.name, first = batch.first, last = batch.last, n = batch.records.len(), "transaction confirmed");
                    Ok(())
                }
                Err(e) if e.transient() => Err(SinkError::unavailable(
                    self.name.clone(),
                    SinkFailure::Fhir(e),
                )),
                Err(e) => {
                    metrics::counter!("vitalmq_bridge_fhir_refused_total", "sink" => self.name.clone(), "status" => e.label())
                        .increment(1);
                    warn!(sink = %self.name, first = batch.first, last = batch.last, error = %e, "FHIR server refused the batch; it stays in the outbox");
                    Err(SinkError::refused(self.name.clone(), SinkFailure::Fhir(e)))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests;
