//! The broker's configuration file (`vitalmq broker --config FILE`); see
//! `broker/examples/broker.toml`. Relative paths are taken from the file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::embedded::EmbeddedSettings;
use crate::tls::TlsSettings;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Where devices, gateways, bridges and integrators connect (mTLS).
    pub listen: SocketAddr,
    /// Prometheus metrics endpoint (`/metrics`); none when absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Time from a finished handshake to the client's CONNECT.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Client connections at once; more are refused (and audited).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    pub tls: TlsSettings,
    pub policy: PolicyFiles,
    pub audit: AuditSettings,
    #[serde(default)]
    pub embedded: EmbeddedSettings,
    /// What to do at start when the audit log or its directory is readable by other
    /// local users: `refuse` (default) or `warn`.
    #[serde(default)]
    pub private_files: vitalmq_private_fs::ExposurePolicy,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFiles {
    pub acl: PathBuf,
    pub registry: PathBuf,
    /// Reload when a policy, registry or CRL file changes (SIGHUP always reloads).
    #[serde(default = "yes")]
    pub watch: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSettings {
    pub path: PathBuf,
    /// Records queued between the connections and the writer.
    #[serde(default = "default_audit_queue")]
    pub queue: usize,
    /// When records were written since the last signed checkpoint, append one at least
    /// this often (0: only every 1,000 records, at the first record a minute after the
    /// last checkpoint, and at shutdown). The bridge ships the log up to its newest
    /// checkpoint, so this bounds how long a refusal waits to reach cloud storage.
    #[serde(default = "default_checkpoint_interval_s")]
    pub checkpoint_interval_s: u64,
    /// Repeated connection refusals of one kind from one source address are written
    /// once per this many seconds, plus a summary with their count at its end
    /// (`audit_aggregate`); 0 writes one record per refusal.
    #[serde(default = "default_aggregate_interval_s")]
    pub aggregate_interval_s: u64,
    /// Distinct (source, kind) pairs counted per interval; refusals beyond are counted
    /// per class in one overflow summary.
    #[serde(default = "default_aggregate_max_sources")]
    pub aggregate_max_sources: usize,
    /// Above this size in bytes the log raises `vitalmq_audit_size_alert` and a
    /// warning (0: never). Its size is always exported as `vitalmq_audit_bytes`.
    #[serde(default = "default_alert_bytes")]
    pub alert_bytes: u64,
}

fn default_connect_timeout_ms() -> u64 {
    10_000
}
fn default_max_connections() -> usize {
    20_000
}
fn default_audit_queue() -> usize {
    65_536
}
fn default_checkpoint_interval_s() -> u64 {
    5
}
fn default_aggregate_interval_s() -> u64 {
    10
}
fn default_aggregate_max_sources() -> usize {
    1024
}
fn default_alert_bytes() -> u64 {
    1 << 30
}
fn yes() -> bool {
    true
}

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

impl BrokerConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            line: e.span().map_or(0, |s| {
                text[..s.start.min(text.len())].matches('\n').count() + 1
            }),
            message: e.message().to_owned(),
        })?;
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        Ok(config)
    }

    /// Makes every relative path relative to `base`.
    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.tls.server_cert);
        fix(&mut self.tls.server_key);
        self.tls.client_ca.iter_mut().for_each(fix);
        self.tls.crls.iter_mut().for_each(fix);
        fix(&mut self.policy.acl);
        fix(&mut self.policy.registry);
        fix(&mut self.audit.path);
    }
}
