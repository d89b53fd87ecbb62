//! The operational alert a break-glass read raises (SPEC section 5, topic
//! `ops/admin/break_glass`): written durably, one JSON line per alert, to the
//! configured outbox before the read it allows is answered, then (when `[ops_mqtt]` is
//! configured) published to the broker over mTLS, QoS 1, in the background: a publish
//! that fails is logged and the outbox line stays the record (no resend). It names who read what
//! under which role, never the stated reason (that is in the audit record) or any
//! patient value.

use std::io::Write as _;
use std::path::PathBuf;

use std::time::Duration;

use serde_json::{Value, json};
use vitalmq_mqtt_client::{Event, MqttVersion, Session, SessionOptions, Target, host_port};

use crate::config::OpsMqtt;

/// Time to connect, publish and get the PUBACK.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(15);

/// The topic the alert is meant for.
pub const TOPIC: &str = "ops/admin/break_glass";

/// The break-glass outbox, and the broker it also publishes to.
#[derive(Debug, Clone)]
pub struct OpsOutbox {
    path: PathBuf,
    mqtt: Option<OpsMqtt>,
}

/// What a break-glass read was.
#[derive(Debug, Clone)]
pub struct BreakGlass<'a> {
    pub identity: &'a str,
    pub role: &'a str,
    pub action: &'a str,
    pub resource: Option<&'a str>,
    pub device: Option<&'a str>,
    pub sites: &'a [String],
    pub audit_log: &'a str,
}

impl OpsOutbox {
    pub fn new(path: PathBuf, mqtt: Option<OpsMqtt>) -> Self {
        Self { path, mqtt }
    }

    /// The alert JSON of `read` raised at `now` (RFC 3339).
    pub fn alert(read: &BreakGlass<'_>, now: &str, nonce: &str) -> Value {
        json!({
            "alert_id": format!("ops-admin-break-glass-{nonce}"),
            "kind": "operational",
            "state": "open",
            "severity": "urgent",
            "type": "break_glass",
            "rule": "break-glass",
            "component": "admin",
            "reason": "break_glass",
            "topic": TOPIC,
            "identity": read.identity,
            "role": read.role,
            "action": read.action,
            "resource": read.resource,
            "device": read.device,
            "sites": read.sites,
            "audit_log": read.audit_log,
            "raised_at": now,
        })
    }

    /// Appends `alert` and syncs it; then publishes it, when configured, in the
    /// background.
    pub async fn raise(&self, alert: &Value) -> std::io::Result<()> {
        self.write(alert).await?;
        if let Some(mqtt) = self.mqtt.clone() {
            let payload = serde_json::to_vec(alert).map_err(std::io::Error::other)?;
            tokio::spawn(async move {
                match tokio::time::timeout(PUBLISH_TIMEOUT, publish(&mqtt, payload)).await {
                    Ok(Ok(())) => tracing::info!(topic = TOPIC, "break-glass alert published"),
                    Ok(Err(e)) => {
                        tracing::error!(topic = TOPIC, error = %e, "break-glass alert not published (it is in the outbox)");
                    }
                    Err(_) => {
                        tracing::error!(
                            topic = TOPIC,
                            "break-glass alert not published in time (it is in the outbox)"
                        );
                    }
                }
            });
        }
        Ok(())
    }

    /// Appends `alert` and syncs it.
    async fn write(&self, alert: &Value) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(alert).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            vitalmq_private_fs::create_parent(&path)?;
            let mut file = vitalmq_private_fs::create_options()
                .create(true)
                .append(true)
                .open(&path)?;
            file.write_all(&line)?;
            file.sync_all()
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

/// Why a break-glass alert was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("ops_mqtt.broker: {0}")]
    Address(#[from] vitalmq_mqtt_client::BadAddress),
    #[error("ops_mqtt TLS: {0}")]
    Tls(#[from] vitalmq_mqtt_client::TlsError),
    #[error("broker: {0}")]
    Session(#[from] vitalmq_mqtt_client::SessionError),
    #[error("publish: {0}")]
    Request(#[from] vitalmq_mqtt_client::RequestError),
    #[error("the broker refused the publish: {0}")]
    Refused(String),
    #[error("the connection ended before the PUBACK: {0}")]
    Down(String),
}

/// One clean session: connect, publish QoS 1, wait for the PUBACK.
async fn publish(mqtt: &OpsMqtt, payload: Vec<u8>) -> Result<(), PublishError> {
    let (host, port) = host_port(&mqtt.broker)?;
    let tls = vitalmq_mqtt_client::tls::client_config_from_files(&mqtt.ca, &mqtt.cert, &mqtt.key)?;
    let target = Target {
        host,
        port,
        version: MqttVersion::V5,
    };
    let mut session = Session::open(&target, &mqtt.client_id, &tls, &SessionOptions::default());
    session.connected().await?;
    session.publish(TOPIC.to_owned(), payload)?;
    loop {
        match session.next().await {
            Event::Acked { refused: None } => return Ok(()),
            Event::Acked { refused: Some(r) } => return Err(PublishError::Refused(r)),
            Event::Down { reason } => return Err(PublishError::Down(reason)),
            _ => {}
        }
    }
}
