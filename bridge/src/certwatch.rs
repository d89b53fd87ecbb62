//! Certificate expiry: the bridge checks the certificates it presents (its own, the
//! alert publisher's, upstream gateways') at start and every 12 hours, and raises
//! `ops/bridge/cert_expiry` for each that expires within the configured days.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, json};
use tokio::sync::{mpsc, watch};
use tracing::warn;

use crate::ops::{Episodes, OpsAlert, OpsKind};
use crate::recorder::now_ms;

/// Why a certificate's expiry cannot be read.
#[derive(Debug, thiserror::Error)]
enum ExpiryError {
    #[error(transparent)]
    Read(std::io::Error),
    #[error(transparent)]
    Pem(x509_parser::nom::Err<x509_parser::error::PEMError>),
    #[error(transparent)]
    X509(x509_parser::nom::Err<x509_parser::error::X509Error>),
}

/// Seconds until `pem`'s first certificate expires (negative: expired).
fn seconds_left(pem: &[u8], now_s: i64) -> Result<i64, ExpiryError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).map_err(ExpiryError::Pem)?;
    let cert = pem.parse_x509().map_err(ExpiryError::X509)?;
    Ok(cert.validity().not_after.timestamp() - now_s)
}

/// Runs until `stop`.
pub async fn watch(
    certs: Vec<PathBuf>,
    days: u64,
    ops: mpsc::UnboundedSender<OpsAlert>,
    mut stop: watch::Receiver<bool>,
) {
    if days == 0 {
        return;
    }
    let mut episodes = Episodes::default();
    loop {
        let now = now_ms();
        let now_s = i64::try_from(now / 1000).unwrap_or(i64::MAX);
        for path in &certs {
            let subject = path.display().to_string();
            let left = match std::fs::read(path)
                .map_err(ExpiryError::Read)
                .and_then(|pem| seconds_left(&pem, now_s))
            {
                Ok(left) => left,
                Err(e) => {
                    warn!(cert = %subject, error = %e, "cannot read a certificate's expiry");
                    continue;
                }
            };
            let limit = i64::try_from(days.saturating_mul(86_400)).unwrap_or(i64::MAX);
            let alert = if left < limit {
                let mut details = Map::new();
                details.insert("certificate".into(), json!(subject));
                details.insert("days_left".into(), json!(left.div_euclid(86_400)));
                warn!(cert = %subject, days_left = left.div_euclid(86_400), "certificate expires soon");
                episodes.raise(
                    OpsKind::CertExpiry,
                    &subject,
                    "certificate_expires_soon",
                    details,
                    now,
                )
            } else {
                episodes.resolve(OpsKind::CertExpiry, &subject, now)
            };
            if let Some(a) = alert {
                let _ = ops.send(a);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(12 * 3600)) => {}
            _ = stop.changed() => return,
        }
    }
}
