//! What the broker's integration tests share: a deployment directory with a dev PKI
//! (4 devices on 2 sites, trust domain `demo.vitalmq`), the shipped ACL and a broker
//! configuration listening on port 0.

use std::path::{Path, PathBuf};

use vitalmq_broker::BrokerConfig;
use vitalmq_certs::{FleetPlan, Pki};
use vitalmq_policies::TrustDomain;

/// The directory (removed on drop), its PKI directory and the loaded configuration.
pub fn deployment() -> (tempfile::TempDir, PathBuf, BrokerConfig) {
    let dir = tempfile::tempdir().expect("tempdir");
    let td = TrustDomain::new("demo.vitalmq").expect("trust domain");
    let pki_dir = dir.path().join("pki");
    Pki::init(
        &pki_dir,
        &FleetPlan::new(td, 4, 2),
        time::OffsetDateTime::now_utc(),
    )
    .expect("pki");
    let acl = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/examples/acl.toml");
    let config_path = dir.path().join("broker.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"listen = "127.0.0.1:0"
connect_timeout_ms = 10000
[tls]
server_cert = "pki/broker/server.pem"
server_key = "pki/broker/server.key.pem"
client_ca = ["pki/ca/ca.pem"]
crls = ["pki/crl.pem"]
trust_domain = "demo.vitalmq"
handshake_timeout_ms = 10000
per_ip_per_second = 0
[policy]
acl = "{}"
registry = "pki/registry.toml"
watch = false
[audit]
path = "audit.jsonl"
"#,
            acl.display()
        ),
    )
    .expect("config");
    let config = BrokerConfig::load(&config_path).expect("config loads");
    (dir, pki_dir, config)
}
