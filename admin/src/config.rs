//! `vitalmq-admin/v1`: the admin server's configuration (TOML). Relative paths are
//! resolved against the file's directory.
//!
//! ```toml
//! format = "vitalmq-admin/v1"
//! listen = "127.0.0.1:8443"          # port 0: any free port (reported on start)
//! roles = "admin-roles.toml"         # vitalmq-admin-roles/v1
//! audit_log = "admin-audit/admin.jsonl"
//! ops_outbox = "admin-audit/ops-alerts.jsonl"
//! data_dir = "bridge-data"           # the bridge's store (reads)
//! registry = "pki/registry.toml"     # the device registry (changes)
//! reid_store = "reid"                # optional: the re-identification store
//! holds = "holds.toml"               # optional: the legal holds (vitalmq-holds/v1)
//! broker_audit = "broker-audit.jsonl"  # optional: adds publishers to traces
//! exports_dir = "exports"            # optional: where patient exports are written
//! [encryption]                       # optional: the bridge's [encryption] keys
//! key_file = "kek.json"              # opens sealed payloads for reads
//! keyring = "bridge-data/keyring.sqlite3"  # default DATA_DIR/keyring.sqlite3
//! [ops_mqtt]                         # optional: also publish break-glass alerts
//! broker = "127.0.0.1:8883"
//! client_id = "admin-api"
//! cert = "pki/identities/bridge/admin-api.pem"
//! key = "pki/identities/bridge/admin-api.key.pem"
//! ca = "pki/ca/ca.pem"
//! [tls]                              # the broker's [tls] table
//! server_cert = "pki/server/broker.pem"
//! ...
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use vitalmq_broker::tls::TlsSettings;

const FORMAT: &str = "vitalmq-admin/v1";

/// The admin server's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub format: String,
    pub listen: SocketAddr,
    /// The roles policy (`vitalmq-admin-roles/v1`), re-read when it changes.
    pub roles: PathBuf,
    /// The admin audit log: chained, with signed checkpoints (key beside it).
    pub audit_log: PathBuf,
    /// Where break-glass operational alerts are written (JSON lines), durably, before
    /// the read they allow is served.
    pub ops_outbox: PathBuf,
    /// The bridge's data directory.
    pub data_dir: PathBuf,
    /// The device registry file.
    pub registry: PathBuf,
    #[serde(default)]
    pub reid_store: Option<PathBuf>,
    #[serde(default)]
    pub broker_audit: Option<PathBuf>,
    /// The legal holds file (`vitalmq-holds/v1`) `/v1/holds` reads and changes; without
    /// it those endpoints answer 501 `not_configured`.
    #[serde(default)]
    pub holds: Option<PathBuf>,
    /// Where `POST /v1/patients/{ref}/export` writes each export, in a new directory
    /// (0700) named by time and a random suffix, never the patient; without it that
    /// endpoint answers 501 `not_configured`.
    #[serde(default)]
    pub exports_dir: Option<PathBuf>,
    /// The store's encryption at rest, as the bridge's `[encryption]`: with it, reads
    /// open sealed payloads (clinicians read plaintext); without it a sealed payload is
    /// shown as `"sealed": true`. An erased patient's rows show as erased either way.
    #[serde(default)]
    pub encryption: Option<Encryption>,
    pub tls: TlsSettings,
    /// Where break-glass alerts are also published (`ops/admin/break_glass`, QoS 1);
    /// without it they are only written to `ops_outbox`.
    #[serde(default)]
    pub ops_mqtt: Option<OpsMqtt>,
}

/// The broker connection of the break-glass alerts: a service identity of the PKI
/// (`vitalmq certs issue --role bridge --id admin-api`; the shipped ACL lets bridge
/// identities publish `ops/admin/#`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpsMqtt {
    /// `host:port` of the broker.
    pub broker: String,
    /// The client id: the identity's id (the broker binds it to the certificate).
    pub client_id: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// `[encryption]`: the key-encryption keys and the keyring of the bridge's store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Encryption {
    /// The key-encryption keys (`vitalmq-kek/v1`, the bridge's `[encryption] key_file`).
    pub key_file: PathBuf,
    /// The keyring; default `DATA_DIR/keyring.sqlite3`.
    #[serde(default)]
    pub keyring: Option<PathBuf>,
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

impl AdminConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let mut config: Self = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            invalid(match line {
                Some(line) => format!("line {line}: {}", e.message()),
                None => e.message().to_owned(),
            })
        })?;
        if config.format != FORMAT {
            return Err(invalid(format!("format: expected \"{FORMAT}\"")));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut config.roles);
        resolve(&mut config.audit_log);
        resolve(&mut config.ops_outbox);
        resolve(&mut config.data_dir);
        resolve(&mut config.registry);
        if let Some(p) = &mut config.reid_store {
            resolve(p);
        }
        if let Some(p) = &mut config.broker_audit {
            resolve(p);
        }
        if let Some(p) = &mut config.holds {
            resolve(p);
        }
        if let Some(p) = &mut config.exports_dir {
            resolve(p);
        }
        if let Some(e) = &mut config.encryption {
            resolve(&mut e.key_file);
            if let Some(k) = &mut e.keyring {
                resolve(k);
            }
        }
        if let Some(m) = &mut config.ops_mqtt {
            resolve(&mut m.cert);
            resolve(&mut m.key);
            resolve(&mut m.ca);
        }
        resolve(&mut config.tls.server_cert);
        resolve(&mut config.tls.server_key);
        config.tls.client_ca.iter_mut().for_each(resolve);
        config.tls.crls.iter_mut().for_each(resolve);
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_loads_with_paths_beside_it() {
        let text = include_str!("../examples/admin.toml");
        let config = AdminConfig::parse(text, Path::new("/etc/vitalmq/admin.toml")).expect("valid");
        assert_eq!(config.roles, Path::new("/etc/vitalmq/admin-roles.toml"));
        assert_eq!(config.tls.crls, [PathBuf::from("/etc/vitalmq/pki/crl.pem")]);
        assert_eq!(
            config.holds.as_deref(),
            Some(Path::new("/etc/vitalmq/holds.toml"))
        );
        assert_eq!(
            config.exports_dir.as_deref(),
            Some(Path::new("/etc/vitalmq/exports"))
        );
        let encryption = config.encryption.as_ref().expect("[encryption]");
        assert_eq!(encryption.key_file, Path::new("/etc/vitalmq/kek.json"));
        assert_eq!(encryption.keyring, None, "the data directory's by default");
        let mqtt = config.ops_mqtt.expect("ops_mqtt");
        assert_eq!(
            mqtt.cert,
            Path::new("/etc/vitalmq/pki/identities/bridge/admin-api.pem")
        );
    }

    #[test]
    fn unknown_keys_and_formats_are_refused_with_the_line() {
        let text = include_str!("../examples/admin.toml");
        let err = AdminConfig::parse(&format!("colour = 1\n{text}"), Path::new("a.toml"))
            .expect_err("unknown key");
        assert!(err.to_string().contains("a.toml: line 1"), "{err}");
        let err = AdminConfig::parse(
            &text.replace("vitalmq-admin/v1", "vitalmq-admin/v9"),
            Path::new("a.toml"),
        )
        .expect_err("format");
        assert!(err.to_string().contains("format"), "{err}");
    }
}
