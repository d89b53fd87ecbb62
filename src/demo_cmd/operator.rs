//! The operator's view of the demo: an MQTT subscription to `alerts/#` and `ops/#` with
//! the PKI's operator identity (`identities/operator/ops-01`), over mTLS through the
//! broker's ACL like any other client. Each alert is shown by topic, state, rule and
//! device; patient references and measured values are never shown.
//!
//! The demo shows whatever arrives there and nothing else: the clinical alerts the
//! bridge publishes (`alerts/{site}/{severity}/{device}`, SPEC section 5) and its
//! operational ones (`ops/bridge/<kind>`).
//!
//! The operator also acknowledges one alert, as a person at a console would (SPEC 5.2):
//! the first device alarm it sees open, by publishing `{"alert_id": ...}` to
//! `alerts/{site}/ack/{its id}` on the same connection. The bridge then re-sends that
//! alert `acknowledged`, with `ack.by` the operator's SPIFFE id, and it is not re-sent
//! for want of an acknowledgement; every other alert is left unacknowledged.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::Value as Json;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use vitalmq_mqtt_client::{Event, MqttVersion, Session, SessionOptions, Target};

/// The operator identity the demo subscribes with.
pub const OPERATOR: &str = "ops-01";

/// The filters it subscribes to.
pub const FILTERS: [&str; 2] = ["alerts/#", "ops/#"];

/// The operator acknowledges the first open clinical alert whose rule starts so.
pub const ACK_RULE_PREFIX: &str = "device-alarm:";

/// The topic on which operator [`OPERATOR`] acknowledges an alert of `site`.
pub fn ack_topic(site: &str) -> String {
    format!("alerts/{site}/ack/{OPERATOR}")
}

/// Whether `topic` is an acknowledgement (`alerts/{site}/ack/{id}`), which `alerts/#`
/// also matches.
fn is_ack_topic(topic: &str) -> bool {
    let parts: Vec<&str> = topic.split('/').collect();
    matches!(parts.as_slice(), ["alerts", _, "ack", _])
}

/// The acknowledgement payload for `alert_id` (SPEC 5.2).
pub fn ack_payload(alert_id: &str) -> String {
    serde_json::json!({ "alert_id": alert_id }).to_string()
}

/// One alert message as the demo shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertSeen {
    pub topic: String,
    pub clinical: bool,
    pub state: Option<String>,
    /// The rule (clinical) or the operational kind.
    pub rule: Option<String>,
    pub device: Option<String>,
    pub alert_id: Option<String>,
    pub site: Option<String>,
}

impl AlertSeen {
    /// Reads the fields the demo shows from an alert payload (SPEC section 5); an
    /// unreadable payload still counts, with the fields missing.
    pub fn parse(topic: &str, payload: &[u8]) -> Self {
        let json: Json = serde_json::from_slice(payload).unwrap_or(Json::Null);
        let text = |k: &str| json.get(k).and_then(Json::as_str).map(str::to_owned);
        let clinical = topic.starts_with("alerts/");
        Self {
            topic: topic.to_owned(),
            clinical,
            state: text("state"),
            rule: if clinical { text("rule") } else { text("type") },
            device: text("device"),
            alert_id: text("alert_id"),
            site: text("site"),
        }
    }

    /// Whether this is the kind of alert the operator acknowledges, and if so the
    /// alert id and the site.
    fn to_acknowledge(&self) -> Option<(&str, &str)> {
        let wanted = self.clinical
            && self.state.as_deref() == Some("open")
            && self
                .rule
                .as_deref()
                .is_some_and(|r| r.starts_with(ACK_RULE_PREFIX));
        match (wanted, &self.alert_id, &self.site) {
            (true, Some(id), Some(site)) => Some((id, site)),
            _ => None,
        }
    }
}

/// The operator's acknowledgement, once the broker answered its PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckSent {
    pub alert_id: String,
    pub topic: String,
    /// The alert's rule and device, for the demo's output.
    pub rule: Option<String>,
    pub device: Option<String>,
    /// The broker's refusal (MQTT 5 PUBACK reason), if it refused.
    pub refused: Option<String>,
}

impl std::fmt::Display for AckSent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
        write!(
            f,
            "ACK   {OPERATOR} acknowledged {} ({} on {}) on {}: {}",
            self.alert_id,
            dash(&self.rule),
            dash(&self.device),
            self.topic,
            match &self.refused {
                None => "PUBACK ok".to_owned(),
                Some(why) => format!("refused by the broker ({why})"),
            }
        )
    }
}

/// What the operator view reports, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    Alert(AlertSeen),
    Ack(AckSent),
}

impl std::fmt::Display for Note {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Alert(a) => a.fmt(f),
            Self::Ack(a) => a.fmt(f),
        }
    }
}

impl std::fmt::Display for AlertSeen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
        write!(
            f,
            "{} {}  state {}  {} {}  device {}",
            if self.clinical { "ALERT" } else { "OPS  " },
            self.topic,
            dash(&self.state),
            if self.clinical { "rule" } else { "kind" },
            dash(&self.rule),
            dash(&self.device),
        )
    }
}

/// The running subscription.
#[derive(Debug)]
pub struct OperatorView {
    alerts: mpsc::UnboundedReceiver<Note>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl OperatorView {
    /// Connects to the broker on 127.0.0.1:`port` and returns once both filters are
    /// granted.
    pub async fn start(pki: &Path, port: u16) -> anyhow::Result<Self> {
        let identity = vitalmq_device_sim::pki::Pki::open(pki)?
            .identity("operator", OPERATOR)
            .context("the operator identity")?;
        let target = Target {
            host: "127.0.0.1".into(),
            port,
            version: MqttVersion::V5,
        };
        let (tx, alerts) = mpsc::unbounded_channel();
        let (stop, stopped) = watch::channel(false);
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(subscribe(target, identity, tx, stopped, ready_tx));
        match tokio::time::timeout(Duration::from_secs(20), ready_rx).await {
            Ok(Ok(true)) => Ok(Self { alerts, stop, task }),
            Ok(Ok(false)) => bail!("operator subscription: a filter was refused by the ACL"),
            _ => bail!("operator subscription: not granted within 20 s"),
        }
    }

    /// The next alert or acknowledgement (cancel-safe).
    pub async fn next(&mut self) -> Option<Note> {
        self.alerts.recv().await
    }

    /// Unsubscribes and returns what arrived and was not taken yet.
    pub async fn stop(mut self) -> Vec<Note> {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let mut rest = Vec::new();
        while let Ok(a) = self.alerts.try_recv() {
            rest.push(a);
        }
        rest
    }
}

/// Keeps the subscription up (reconnecting after a second) until told to stop, and
/// acknowledges one alert (see the module documentation).
async fn subscribe(
    target: Target,
    identity: vitalmq_device_sim::pki::Identity,
    alerts: mpsc::UnboundedSender<Note>,
    mut stop: watch::Receiver<bool>,
    // Whether every filter was granted, sent once.
    ready: oneshot::Sender<bool>,
) {
    let mut ready = Some(ready);
    // The acknowledgement: none yet, published and awaiting its PUBACK, or done.
    let mut ack: Option<AckSent> = None;
    let mut acked = false;
    while !*stop.borrow() {
        let mut session =
            Session::open(&target, OPERATOR, &identity.tls, &SessionOptions::default());
        let mut granted = 0;
        loop {
            let event = tokio::select! {
                e = session.next() => e,
                _ = stop.changed() => {
                    session.close(Duration::from_millis(500)).await;
                    return;
                }
            };
            match event {
                Event::Connected => {
                    for filter in FILTERS {
                        if let Err(e) = session.subscribe(filter) {
                            tracing::warn!(filter, error = %e, "operator subscription");
                        }
                    }
                }
                Event::Subscribed { granted: true } => {
                    granted += 1;
                    if granted == FILTERS.len()
                        && let Some(tx) = ready.take()
                    {
                        let _ = tx.send(true);
                    }
                }
                Event::Subscribed { granted: false } => {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(false);
                    }
                }
                Event::Message { topic, payload } => {
                    if is_ack_topic(&topic) {
                        // Its own acknowledgement (or another's), not an alert.
                        continue;
                    }
                    let seen = AlertSeen::parse(&topic, &payload);
                    if !acked
                        && ack.is_none()
                        && let Some((alert_id, site)) = seen.to_acknowledge()
                    {
                        let topic = ack_topic(site);
                        match session.publish(topic.clone(), ack_payload(alert_id).into_bytes()) {
                            Ok(()) => {
                                ack = Some(AckSent {
                                    alert_id: alert_id.to_owned(),
                                    topic,
                                    rule: seen.rule.clone(),
                                    device: seen.device.clone(),
                                    refused: None,
                                });
                            }
                            Err(e) => tracing::warn!(error = %e, "operator acknowledgement"),
                        }
                    }
                    let _ = alerts.send(Note::Alert(seen));
                }
                Event::Acked { refused } => {
                    if let Some(mut sent) = ack.take() {
                        sent.refused = refused;
                        acked = true;
                        let _ = alerts.send(Note::Ack(sent));
                    }
                }
                Event::Down { reason } => {
                    tracing::warn!(reason, "operator connection lost; reconnecting");
                    // An acknowledgement without its PUBACK is given again on the next
                    // alarm; the bridge audits a repeated one and re-sends nothing.
                    ack = None;
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_topic_state_rule_and_device_only() {
        let payload = br#"{"alert_id":"a1","kind":"clinical","state":"open","severity":"urgent",
            "rule":"spo2-low","device":"dev-00001","site":"site-01","patient_ref":"p-secret",
            "metric":"spo2","value":86,"threshold":90}"#;
        let a = AlertSeen::parse("alerts/site-01/urgent/dev-00001", payload);
        let shown = a.to_string();
        assert_eq!(
            shown,
            "ALERT alerts/site-01/urgent/dev-00001  state open  rule spo2-low  device dev-00001"
        );
        assert!(!shown.contains("p-secret") && !shown.contains("86"));
        let ops = AlertSeen::parse(
            "ops/bridge/sink",
            br#"{"kind":"operational","type":"sink","state":"resolved"}"#,
        );
        assert!(!ops.clinical);
        assert_eq!(
            ops.to_string(),
            "OPS   ops/bridge/sink  state resolved  kind sink  device -"
        );
        let junk = AlertSeen::parse("alerts/x", b"\xff");
        assert_eq!(junk.to_acknowledge(), None);
        assert_eq!((junk.clinical, junk.state), (true, None));
    }

    #[test]
    fn acknowledges_open_device_alarms_only() {
        let alarm = |state: &str| {
            AlertSeen::parse(
                "alerts/site-01/urgent/dev-00001",
                format!(
                    r#"{{"alert_id":"a7","state":"{state}","rule":"device-alarm:arrhythmia","device":"dev-00001","site":"site-01"}}"#
                )
                .as_bytes(),
            )
        };
        assert_eq!(alarm("open").to_acknowledge(), Some(("a7", "site-01")));
        assert_eq!(alarm("resolved").to_acknowledge(), None);
        let rule = AlertSeen::parse(
            "alerts/site-01/review/dev-00001",
            br#"{"alert_id":"a8","state":"open","rule":"spo2-low","site":"site-01"}"#,
        );
        assert_eq!(rule.to_acknowledge(), None);
        assert_eq!(ack_topic("site-02"), "alerts/site-02/ack/ops-01");
        assert_eq!(ack_payload("a7"), r#"{"alert_id":"a7"}"#);
        assert!(is_ack_topic("alerts/site-01/ack/ops-01"));
        assert!(!is_ack_topic("alerts/site-01/urgent/dev-00001"));
    }
}
