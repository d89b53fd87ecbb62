//! The demo's admin API (issue 19, point 4): after the devices stop, the admin API is
//! started over the run's store with the run's PKI, and a clinician of `site-01` asks
//! for the events of a device of another site, once without a reason (refused:
//! outside their scope) and once with a break-glass reason (answered, audited, and an
//! operational alert on `ops/admin/break_glass` that the operator's subscription
//! sees). The calls go through the same client as `vitalmq store events --server`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;
use vitalmq_certs::{IssueRequest, Pki, Validity};
use vitalmq_policies::{PrincipalId, Role};

use super::report::Check;
use super::setup::{TRUST_DOMAIN, WorkDir};
use crate::admin_cmd::client::{Call, ClientArgs};

/// The clinician: an operator of `site-01` in the admin roles.
pub const CLINICIAN: &str = "clin-01";
/// The clinician's site.
pub const CLINICIAN_SITE: &str = "site-01";
/// The admin API's service identity for publishing its break-glass alerts.
const SERVICE: &str = "admin-api";
/// The break-glass reason the clinician states.
pub const BREAK_GLASS_REASON: &str = "covering site-02 overnight: patient deteriorating";

impl WorkDir {
    pub fn admin_config(&self) -> PathBuf {
        self.root.join("admin.toml")
    }
    pub fn admin_audit(&self) -> PathBuf {
        self.root.join("admin-audit/admin.jsonl")
    }
    pub fn admin_ops_outbox(&self) -> PathBuf {
        self.root.join("admin-audit/ops-alerts.jsonl")
    }
    fn identity(&self, role: &str, id: &str) -> (PathBuf, PathBuf) {
        let dir = self.pki().join("identities").join(role);
        (
            dir.join(format!("{id}.pem")),
            dir.join(format!("{id}.key.pem")),
        )
    }
    /// The clinician's certificate and key.
    pub fn clinician(&self) -> (PathBuf, PathBuf) {
        self.identity("operator", CLINICIAN)
    }
}

/// Issues the clinician's operator certificate and the service identity, and writes
/// the roles file (the demo's operator is an auditor, the clinician is scoped to
/// `site-01`).
pub fn setup(work: &WorkDir) -> anyhow::Result<()> {
    let mut pki = Pki::open(&work.pki())?;
    let now = time::OffsetDateTime::now_utc();
    for (role, id) in [(Role::Operator, CLINICIAN), (Role::Bridge, SERVICE)] {
        pki.issue(&IssueRequest {
            role,
            id: PrincipalId::new(id)?,
            site: None,
            validity: Validity::days_from(now, 2),
            device_alg: vitalmq_envelope::Algorithm::EdDsa,
        })
        .with_context(|| format!("issuing {role}/{id}"))?;
    }
    let roles = format!(
        r#"# Written by `vitalmq demo` (format: policies/examples/admin-roles.toml).
format = "vitalmq-admin-roles/v1"

[roles.clinician]
actions = ["events.read", "alerts.read", "trace.read"]
scope = "sites"

[roles.auditor]
actions = ["events.read", "alerts.read", "trace.read", "quarantine.read"]
scope = "all"

[[operators]]
id = "{CLINICIAN}"
role = "clinician"
sites = ["{CLINICIAN_SITE}"]

[[operators]]
id = "{operator}"
role = "auditor"
"#,
        operator = super::operator::OPERATOR
    );
    write(&work.root.join("admin-roles.toml"), &roles)
}

/// The admin API's configuration, publishing break-glass alerts to the broker on
/// `broker_port`.
pub fn write_config(work: &WorkDir, broker_port: u16) -> anyhow::Result<()> {
    let config = format!(
        r#"# Written by `vitalmq demo`; paths are relative to this file.
# Run it again with: vitalmq admin serve --config admin.toml
format = "vitalmq-admin/v1"
listen = "127.0.0.1:0"
roles = "admin-roles.toml"
audit_log = "admin-audit/admin.jsonl"
ops_outbox = "admin-audit/ops-alerts.jsonl"
data_dir = "bridge-data"
registry = "pki/registry.toml"
broker_audit = "broker/audit.jsonl"

[tls]
server_cert = "pki/broker/server.pem"
server_key = "pki/broker/server.key.pem"
client_ca = ["pki/ca/ca.pem"]
crls = ["pki/crl.pem"]
trust_domain = "{TRUST_DOMAIN}"

[ops_mqtt]
broker = "127.0.0.1:{broker_port}"
client_id = "{SERVICE}"
cert = "pki/identities/bridge/{SERVICE}.pem"
key = "pki/identities/bridge/{SERVICE}.key.pem"
ca = "pki/ca/ca.pem"
"#
    );
    write(&work.admin_config(), &config)
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// What the clinician's two calls got.
#[derive(Debug)]
pub struct Reads {
    /// The device of another site asked for.
    pub device: String,
    /// The refusal of the call without a reason (`None`: it was answered).
    pub refused: Option<String>,
    /// The break-glass call: the rows answered, or why it failed.
    pub break_glass: Result<usize, String>,
}

/// Starts the admin API, makes the clinician's two calls about `device`, stops it.
pub async fn clinician_reads(work: &WorkDir, device: &str) -> anyhow::Result<Reads> {
    let config = vitalmq_admin::AdminConfig::load(&work.admin_config())?;
    let backend = Arc::new(crate::admin_cmd::LocalBackend::of(&config));
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(vitalmq_admin::serve(
        config,
        backend,
        move |addr| {
            let _ = ready_tx.send(addr);
        },
        async {
            let _ = stop_rx.await;
        },
    ));
    let addr = tokio::time::timeout(Duration::from_secs(10), ready_rx)
        .await
        .context("the admin API did not start within 10 s")?
        .context("the admin API stopped at start")?;
    let url = format!("https://{addr}");
    let (cert, key) = work.clinician();
    let ca = work.pki().join("ca/ca.pem");
    let query_device = device.to_owned();
    // The client makes its own runtime, so it runs on a thread of its own.
    let reads = std::thread::spawn(move || {
        let client = |break_glass: Option<&str>| ClientArgs {
            server: Some(url.clone()),
            cert: Some(cert.clone()),
            key: Some(key.clone()),
            ca: Some(ca.clone()),
            break_glass: break_glass.map(str::to_owned),
        };
        let call = || Call {
            method: reqwest::Method::GET,
            path: vec!["v1", "events"],
            query: vec![("device", query_device.as_str())],
            purpose: Some("care"),
            body: None,
        };
        let refused = match client(None).call(&url, call()) {
            Ok(_) => None,
            Err(e) => Some(format!("{e:#}")),
        };
        let break_glass = client(Some(BREAK_GLASS_REASON))
            .call(&url, call())
            .map(|v| rows(&v))
            .map_err(|e| format!("{e:#}"));
        (refused, break_glass)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the admin client thread panicked"))?;
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    Ok(Reads {
        device: device.to_owned(),
        refused: reads.0,
        break_glass: reads.1,
    })
}

/// The number of rows in an answer of the admin API.
fn rows(answer: &Value) -> usize {
    answer
        .get("rows")
        .and_then(Value::as_array)
        .map_or(0, Vec::len)
}

/// Where the admin API publishes a break-glass alert (SPEC section 5, `ops/{component}/{kind}`).
pub const BREAK_GLASS_TOPIC: &str = "ops/admin/break_glass";

/// The admin API's checks: the clinician's read without a reason refused and audited,
/// the break-glass read answered, audited with its reason, alerted (outbox and the
/// operator's subscription), and the admin audit chain intact.
pub fn checks(
    work: &WorkDir,
    reads: Option<&anyhow::Result<Reads>>,
    seen: &[super::operator::AlertSeen],
) -> Vec<Check> {
    let reads = match reads {
        None => {
            return vec![Check::skipped(
                "admin API (one site: nothing is outside the clinician's scope)",
            )];
        }
        Some(Err(e)) => return vec![Check::new(false, format!("admin API: {e:#}"))],
        Some(Ok(r)) => r,
    };
    let records = audit_records(&work.admin_audit());
    let by_clinician = |reason: &str| {
        records.iter().find(|r| {
            r["reason"] == reason
                && r["actor"]["identity"]
                    .as_str()
                    .is_some_and(|i| i.ends_with(&format!("/operator/{CLINICIAN}")))
        })
    };
    let refused_audited = by_clinician("refused:outside_scope").is_some();
    let glass = by_clinician("break_glass");
    let glass_reason = glass.and_then(|r| r["details"]["break_glass_reason"].as_str());
    let outbox = std::fs::read_to_string(work.admin_ops_outbox())
        .map_or(0, |t| t.lines().filter(|l| !l.trim().is_empty()).count());
    let alerted = seen.iter().any(|a| a.topic == BREAK_GLASS_TOPIC);
    let chain = super::verify_chain(&work.admin_audit());
    vec![
        Check::new(
            reads.refused.as_deref().is_some_and(|e| e.contains("403")) && refused_audited,
            format!(
                "admin API: {CLINICIAN} ({CLINICIAN_SITE}) reading {} without a reason refused (403, outside scope) and audited",
                reads.device
            ),
        ),
        Check::new(
            matches!(reads.break_glass, Ok(n) if n > 0)
                && glass_reason == Some(BREAK_GLASS_REASON)
                && outbox == 1
                && alerted,
            format!(
                "admin API: break-glass read answered ({}), audited with its reason, alert written and seen on {BREAK_GLASS_TOPIC}{}",
                match &reads.break_glass {
                    Ok(n) => format!("{n} events"),
                    Err(e) => e.clone(),
                },
                if alerted { "" } else { " (NOT seen)" }
            ),
        ),
        Check::new(
            chain.is_ok(),
            format!(
                "admin audit chain intact: {}",
                match &chain {
                    Ok(n) => format!("{n} records"),
                    Err(e) => format!("{e:#}"),
                }
            ),
        ),
    ]
}

fn audit_records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
