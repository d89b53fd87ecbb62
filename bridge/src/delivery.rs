//! Alert handlers: deliver every recorded alert state change, in order, to MQTT
//! (`alerts/{site}/{severity}/{device}`, `ops/bridge/...`) and to webhooks.
//!
//! The `alerts` table is their outbox: the recorder writes an alert in the same
//! transaction as the event that raised it, then wakes the handlers. Each handler has
//! its own cursor and task, so a slow webhook never delays the MQTT hot path, and
//! neither waits for cloud storage. A handler's cursor advances only after the
//! destination confirmed (PUBACK; HTTP 2xx); failures are retried with backoff and
//! reported as an operational alert; nothing is dropped (but for MQTT alerts whose
//! expiry passed first, below). Delivery is at-least-once:
//! receivers deduplicate by the webhook id ([`change_id`]), or by the whole body; not by
//! `(alert_id, state)` alone, which repeats (each unacknowledged re-send is `escalated`
//! one level higher; an alert can be acknowledged again after it worsened).
//!
//! The MQTT handler publishes over MQTT 5 ([`crate::link5`]) with the Message Expiry
//! Interval the rule set in force gives the alert's severity (`[alert_expiry]`, issue
//! 18), Content Type `application/json` and Payload Format Indicator 1 (UTF-8). The
//! expiry counts from when the bridge made the change (`created_at_ms`), not from the
//! publish: a change that waited in the outbox (broker down, bridge restarted) goes out
//! with only the time it has left ([`expiry_at`]), and one whose time is up is not
//! published at all; it is counted (`vitalmq_bridge_alerts_expired_total`), logged at
//! debug, and the cursor moves over it as over a delivered one. Webhooks have no expiry.
//!
//! Each row carries the escalation level it goes out at; a handler delivers the rows
//! the rule set in force routes to it (`RuleSet::handlers_for_level`, reloaded with the
//! rules) and moves its cursor over the others.
//!
//! Consent (issue 19): clinical alerting runs under care, so the MQTT publisher and the
//! webhooks of purpose care deliver every change as before (a care webhook with a field
//! allow-list gets its alerts minimised to it). A webhook of another purpose
//! ([`AlertGovernance`]) gets a clinical alert change only if, at the observation time
//! of every reading in the change's `evidence` (each looked up in the store; a change
//! without evidence is judged at the time the bridge made it), the registry still
//! attributes the device to the patient and site the change names and their consent
//! covered its purpose, minimised to its allow-list (by default everything but
//! `patient_ref`). A change some of whose readings are not in the store is withheld
//! (`evidence_missing`); a store error during the lookup sends nothing and retries
//! with backoff. Such a handler waits [`crate::drain::REGISTRY_SETTLE`] after a change
//! was made before judging it, and pauses while the last registry reload failed, as
//! sinks of its purpose do. Withheld changes are counted
//! per handler and reason with the cursor advance (`vitalmq store stats`,
//! `alerts_withheld`), in `vitalmq_bridge_alerts_withheld_total{handler,reason}` and in
//! one `events_withheld` audit record per delivered batch. Operational alerts
//! (`ops/...`) carry no patient reference and no reading's value (see
//! `alerts::message`): every handler gets them whole, whatever its purpose.
//!
//! While the store cannot take alert rows (recording paused, see `recorder`), the
//! recorder hands them to each handler directly ([`HandlerFeed`]): a bounded queue the
//! handler delivers before its store outbox. It remembers what it delivered from
//! memory, so the same row, written to the store once it takes writes again, is not
//! delivered a second time.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, json};
use tokio::sync::{Notify, mpsc, watch};
use tracing::{debug, info, warn};
use vitalmq_audit::{AuditRecord, Auditor, Component, Event};
use vitalmq_policies::{DeviceRegistry, Purpose, RuleSet, Severity};

use crate::governance::{
    Fields, Flow, PseudonymOf, PurposePseudonym, Reason, Withheld, judge_recorded, reshape,
};

use crate::link::LinkError;
use crate::link5::{Link5, Publish5};
use crate::mqtt::V5Endpoint;
use crate::ops::{Episodes, OpsAlert, OpsKind};
use crate::recorder::now_ms;
use crate::store::{Store, StoreError, StoredAlert, lock};
use crate::webhook::{
    HEADER_WEBHOOK_ID, HEADER_WEBHOOK_SIGNATURE, HEADER_WEBHOOK_TIMESTAMP, SignError, WebhookSigner,
};

/// Header carrying the alert id; with the state it is the idempotency key.
pub const ALERT_ID_HEADER: &str = "X-Vitalmq-Alert-Id";
/// `Idempotency-Key: <alert_id>/<state>/<change>`, also the Standard Webhooks `webhook-id`.
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";

/// Why a batch of alerts was not confirmed; reported in the `alert_handler_down` alert.
#[derive(Debug, thiserror::Error)]
enum DeliveryError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("no connection")]
    NotConnected,
    #[error("no PUBACK in time")]
    NoPuback,
    #[error(transparent)]
    Sign(#[from] SignError),
    #[error("POST {url}: {source}")]
    Post { url: String, source: reqwest::Error },
    #[error("POST {url}: HTTP {status}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
    },
    #[error("FHIR: {0}")]
    Fhir(#[from] crate::sink::fhir::FhirFailure),
}

/// The id of one alert change: `<alert_id>/<state>/<16 hex of SHA-256(body)>`. The
/// same for every attempt at one change (the stored body does not change), and
/// different for each change, including a second `escalated` (another level) or a
/// second `acknowledged`.
pub fn change_id(alert: &StoredAlert) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(alert.body.as_bytes());
    format!(
        "{}/{}/{}",
        alert.alert_id,
        alert.state,
        hex::encode(&digest[..8])
    )
}

/// Where alerts go.
pub enum Handler {
    /// The broker, over the alert publisher's own MQTT 5 connection.
    Mqtt {
        endpoint: Box<V5Endpoint>,
        link: Option<Link5>,
    },
    /// An HTTP endpoint; the body is the alert JSON, signed as Standard Webhooks
    /// specifies (`crate::webhook`).
    Webhook {
        name: String,
        url: String,
        signer: WebhookSigner,
        client: reqwest::Client,
        /// Consent and minimisation, for a handler of a purpose other than care or
        /// with a field allow-list.
        governance: Option<AlertGovernance>,
    },
    /// A FHIR server (that of the FHIR sink `name`): each batch of clinical alert
    /// changes one transaction Bundle (DetectedIssue, Task, Communication, Provenance;
    /// see `crate::sink::fhir::bundle::alert_bundle`), idempotent by identifier.
    /// Operational alerts are not sent. Care.
    Fhir {
        name: String,
        sink: Box<crate::sink::fhir::FhirSink>,
    },
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl Handler {
    /// The alert publisher, connecting to `endpoint` when it first has something to send.
    pub fn mqtt(endpoint: V5Endpoint) -> Self {
        Self::Mqtt {
            endpoint: Box::new(endpoint),
            link: None,
        }
    }

    pub fn webhook(
        name: String,
        url: String,
        signer: WebhookSigner,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Self::Webhook {
            name,
            url,
            signer,
            client,
            governance: None,
        })
    }

    /// The handler, judged and minimised by `governance` (webhooks only: the MQTT
    /// publisher is clinical alerting, under care).
    pub fn governed(mut self, governance: Option<AlertGovernance>) -> Self {
        if let Self::Webhook { governance: g, .. } = &mut self {
            *g = governance;
        }
        self
    }

    /// Consent and minimisation of the handler, if any.
    pub fn governance(&self) -> Option<&AlertGovernance> {
        match self {
            Self::Mqtt { .. } | Self::Fhir { .. } => None,
            Self::Webhook { governance, .. } => governance.as_ref(),
        }
    }

    /// The cursor key in the store.
    pub fn name(&self) -> String {
        match self {
            Self::Mqtt { .. } => "mqtt".to_owned(),
            Self::Webhook { name, .. } => format!("webhook:{name}"),
            Self::Fhir { name, .. } => format!("fhir:{name}"),
        }
    }

    /// Delivers `alerts` in order; `Ok` only when every one was confirmed or (MQTT)
    /// had expired by `now_ms` under `rules`' `[alert_expiry]`; `Ok(n)`: `n` expired and
    /// were not published.
    async fn deliver(
        &mut self,
        alerts: &[StoredAlert],
        rules: Option<&RuleSet>,
        now_ms: u64,
    ) -> Result<usize, DeliveryError> {
        match self {
            Self::Mqtt { endpoint, link } => {
                let (items, expired) = mqtt_publishes(alerts, rules, now_ms);
                if items.is_empty() {
                    return Ok(expired);
                }
                if link.is_none() {
                    *link = Some(Link5::connect(endpoint, Duration::from_secs(5)).await?);
                }
                let Some(l) = link.as_mut() else {
                    return Err(DeliveryError::NotConnected);
                };
                let sent =
                    tokio::time::timeout(Duration::from_secs(10), l.publish_confirmed(items)).await;
                match sent {
                    Ok(Ok(())) => Ok(expired),
                    Ok(Err(e)) => {
                        *link = None;
                        Err(e.into())
                    }
                    Err(_) => {
                        *link = None;
                        Err(DeliveryError::NoPuback)
                    }
                }
            }
            Self::Webhook {
                url,
                signer,
                client,
                ..
            } => {
                for a in alerts {
                    // One id for every attempt at this state change; a fresh timestamp
                    // (and so signature) per attempt.
                    let id = change_id(a);
                    let now = time::OffsetDateTime::now_utc().unix_timestamp();
                    let signed = signer.sign(&id, now, a.body.as_bytes())?;
                    let response = client
                        .post(url.as_str())
                        .header(reqwest::header::CONTENT_TYPE, "application/json")
                        .header(HEADER_WEBHOOK_ID, signed.id)
                        .header(HEADER_WEBHOOK_TIMESTAMP, signed.timestamp)
                        .header(HEADER_WEBHOOK_SIGNATURE, signed.signature)
                        .header(ALERT_ID_HEADER, &a.alert_id)
                        .header(IDEMPOTENCY_HEADER, id)
                        .body(a.body.clone())
                        .send()
                        .await
                        .map_err(|source| DeliveryError::Post {
                            url: url.clone(),
                            source,
                        })?;
                    if !response.status().is_success() {
                        return Err(DeliveryError::Status {
                            url: url.clone(),
                            status: response.status(),
                        });
                    }
                }
                Ok(0)
            }
            Self::Fhir { sink, .. } => {
                sink.deliver_alerts(alerts).await?;
                Ok(0)
            }
        }
    }
}

/// An alert message's Message Expiry Interval when published at some time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Its severity does not expire: no property.
    Never,
    /// Seconds left, at least 1.
    Left(u32),
    /// Its time is up (less than a second left): not to be published.
    Expired,
}

/// The expiry of a change made at `created_at_ms` with `expiry_s` to live, published at
/// `now_ms` (both the bridge's clock, ms since the Unix epoch): the policy's interval
/// less the time already passed, rounded down so that no integrator holds it longer
/// than the policy says. A clock that went back counts as no time passed.
pub fn expiry_at(expiry_s: Option<u64>, created_at_ms: u64, now_ms: u64) -> Expiry {
    let Some(expiry_s) = expiry_s else {
        return Expiry::Never;
    };
    let waited_ms = now_ms.saturating_sub(created_at_ms);
    let left_s = expiry_s.saturating_mul(1000).saturating_sub(waited_ms) / 1000;
    match u32::try_from(left_s) {
        Ok(0) => Expiry::Expired,
        Ok(s) => Expiry::Left(s),
        Err(_) => Expiry::Left(u32::MAX),
    }
}

/// The severity of a clinical alert topic `alerts/{site}/{severity}/{device}`; `None`
/// for operational alerts (`ops/...`), which never expire.
fn topic_severity(topic: &str) -> Option<Severity> {
    let mut levels = topic.split('/');
    match (levels.next(), levels.next(), levels.next(), levels.next()) {
        (Some("alerts"), Some(_), Some(severity), Some(_)) => Severity::parse(severity),
        _ => None,
    }
}

/// The PUBLISHes of `alerts` at `now_ms` (in order, the expired left out) and how many
/// expired.
fn mqtt_publishes(
    alerts: &[StoredAlert],
    rules: Option<&RuleSet>,
    now_ms: u64,
) -> (Vec<Publish5>, usize) {
    let mut expired = 0;
    let mut items = Vec::with_capacity(alerts.len());
    for a in alerts {
        let policy = topic_severity(&a.topic)
            .and_then(|s| rules.and_then(|r| r.alerting().expiry_after_s(s)));
        let message_expiry_interval = match expiry_at(policy, a.created_at_ms, now_ms) {
            Expiry::Never => None,
            Expiry::Left(s) => Some(s),
            Expiry::Expired => {
                expired += 1;
                debug!(
                    alert_id = %a.alert_id,
                    state = %a.state,
                    topic = %a.topic,
                    expiry_s = policy,
                    waited_ms = now_ms.saturating_sub(a.created_at_ms),
                    "alert expired before it could be published; not published"
                );
                continue;
            }
        };
        items.push(Publish5 {
            topic: a.topic.clone(),
            payload: Bytes::from(a.body.clone()),
            properties: rumqttc::v5::mqttbytes::v5::PublishProperties {
                payload_format_indicator: Some(1),
                message_expiry_interval,
                content_type: Some("application/json".to_owned()),
                ..Default::default()
            },
        });
    }
    (items, expired)
}

/// What an alert handler of a purpose other than care may receive (see the module
/// docs); `None` for the MQTT publisher and care webhooks without a field list.
#[derive(Debug, Clone)]
pub struct AlertGovernance {
    pub purpose: Purpose,
    pub fields: Fields,
    pub registry: watch::Receiver<Arc<DeviceRegistry>>,
    /// Replaces `patient_ref` for a handler whose fields allow it.
    pub pseudonym: Option<PurposePseudonym>,
    /// True while the last reload of the registry failed: a handler of a purpose other
    /// than care then delivers no change and does not advance until a reload succeeds.
    pub stale: Option<watch::Receiver<bool>>,
}

/// Whether a change flows to a handler of `purpose`, given the device, the patient
/// and site the change names (`recorded`) and the observation times of its evidence
/// (empty: judged at `made_at`): only if, at every one of them, the registry still
/// attributes the device to that patient and site and their consent covered the
/// purpose ([`judge_recorded`]); the first reason found otherwise. Care always flows
/// (clinical alerting runs under care).
pub fn alert_flow(
    registry: &DeviceRegistry,
    purpose: Purpose,
    device: Option<&str>,
    recorded: Option<(&str, &str)>,
    evidence_observed_at: &[u64],
    made_at: u64,
) -> Flow {
    if purpose == Purpose::Care {
        return Flow::Send;
    }
    let Some(device) = device else {
        return Flow::Withheld(Reason::Unassigned);
    };
    let times: &[u64] = if evidence_observed_at.is_empty() {
        &[made_at]
    } else {
        evidence_observed_at
    };
    for &t in times {
        if let Flow::Withheld(r) = judge_recorded(registry, device, recorded, purpose, t) {
            return Flow::Withheld(r);
        }
    }
    Flow::Send
}

/// Whether an alert row is operational (`ops/...`): no patient data, not judged.
fn operational(alert: &StoredAlert) -> bool {
    alert.topic.starts_with("ops/")
}

/// The alerts of `rows` that may go to the handler, minimised, and what was withheld
/// per reason, with the change ids of the withheld ones. A change whose evidence
/// readings are not all in the store is withheld (`evidence_missing`): consent is never
/// judged on part of the evidence. A store error fails the whole batch (nothing sent,
/// the cursor stays; the handler tries again).
pub(crate) fn govern_alerts(
    rows: Vec<StoredAlert>,
    governance: &AlertGovernance,
    store: &Mutex<Store>,
) -> Result<(Vec<StoredAlert>, Withheld, HashSet<String>), StoreError> {
    let registry = Arc::clone(&governance.registry.borrow());
    let mut sent = Vec::with_capacity(rows.len());
    let mut withheld = Withheld::default();
    let mut withheld_ids = HashSet::new();
    for mut a in rows {
        if operational(&a) {
            sent.push(a);
            continue;
        }
        let body: serde_json::Value = serde_json::from_str(&a.body).unwrap_or_default();
        let device = body["device"].as_str();
        let recorded = body["patient_ref"].as_str().zip(body["site"].as_str());
        let flow = if governance.purpose == Purpose::Care {
            Flow::Send
        } else {
            let ids: Vec<&str> = body["evidence"]
                .as_array()
                .map(|ids| ids.iter().filter_map(serde_json::Value::as_str).collect())
                .unwrap_or_default();
            let mut evidence = Vec::with_capacity(ids.len());
            let mut missing = false;
            {
                let store = lock(store);
                for id in ids {
                    match store.event_detail(id)? {
                        Some(e) => evidence.push(e.observed_at_ms),
                        None => missing = true,
                    }
                }
            }
            if missing {
                Flow::Withheld(Reason::EvidenceMissing)
            } else {
                alert_flow(
                    &registry,
                    governance.purpose,
                    device,
                    recorded,
                    &evidence,
                    a.created_at_ms,
                )
            }
        };
        match flow {
            Flow::Withheld(reason) => {
                withheld.add(reason);
                withheld_ids.insert(change_id(&a));
            }
            Flow::Send => {
                if governance.fields != Fields::All {
                    let of = governance
                        .pseudonym
                        .as_ref()
                        .map(|p| move |care: &str| p.of(care));
                    let minimised = reshape(
                        &a.body,
                        &governance.fields,
                        of.as_ref().map(|f| f as PseudonymOf<'_>),
                    );
                    match minimised {
                        Ok(body) => a.body = body,
                        Err(e) => {
                            // Our own JSON: cannot happen; never sent unminimised.
                            warn!(alert_id = %a.alert_id, error = %e, "alert body not minimisable; withheld");
                            withheld.add(Reason::NoConsent);
                            withheld_ids.insert(change_id(&a));
                            continue;
                        }
                    }
                }
                sent.push(a);
            }
        }
    }
    Ok((sent, withheld, withheld_ids))
}

/// Counts, logs (counts only) and audits what consent withheld from one batch of alert
/// changes.
pub(crate) fn report_alerts_withheld(
    name: &str,
    purpose: Purpose,
    last: i64,
    withheld: &Withheld,
    auditor: &Auditor,
) {
    let mut per_reason = Map::new();
    for (reason, n) in withheld.counts() {
        metrics::counter!("vitalmq_bridge_alerts_withheld_total", "handler" => name.to_owned(), "reason" => reason)
            .increment(n);
        per_reason.insert(reason.to_owned(), json!(n));
    }
    info!(handler = %name, purpose = %purpose, through = last, withheld = withheld.total(), "alert changes withheld by consent");
    let _ = auditor.record(
        AuditRecord::new(Component::Bridge, Event::EventsWithheld)
            .resource(name)
            .action("deliver_alerts")
            .detail("purpose", purpose.as_str())
            .detail("last", last)
            .detail("withheld", serde_json::Value::Object(per_reason)),
    );
}

/// Alert rows for a handler that the store could not take, delivered from memory.
pub const MEMORY_QUEUE: usize = 1024;

/// The recorder's side of one handler: its wake-up and its in-memory queue.
#[derive(Debug, Clone)]
pub struct HandlerFeed {
    pub wake: Arc<Notify>,
    pub memory: mpsc::Sender<StoredAlert>,
}

/// The handler's side of [`HandlerFeed`].
#[derive(Debug)]
pub struct HandlerInbox {
    pub wake: Arc<Notify>,
    pub memory: mpsc::Receiver<StoredAlert>,
}

/// A connected feed and inbox.
pub fn feed() -> (HandlerFeed, HandlerInbox) {
    let wake = Arc::new(Notify::new());
    let (tx, rx) = mpsc::channel(MEMORY_QUEUE);
    (
        HandlerFeed {
            wake: Arc::clone(&wake),
            memory: tx,
        },
        HandlerInbox { wake, memory: rx },
    )
}

/// Whether the rule set in force routes a row of escalation `level` to `handler`
/// (no rule set, or no routing for the level: every handler).
fn routed(rules: Option<&watch::Receiver<Arc<RuleSet>>>, handler: &str, level: u32) -> bool {
    let Some(rules) = rules else { return true };
    let rules = rules.borrow();
    // Cumulative: a change at level L reaches the handlers of levels 0 to L, so those
    // that got the alert when it opened also get its escalation, acknowledgement and
    // resolution (levels past the policy's last repeat the last).
    (0..=level.min(MAX_ROUTED_LEVEL)).any(|l| {
        rules
            .handlers_for_level(l)
            .is_none_or(|names| names.iter().any(|n| n == handler))
    })
}

/// Levels looked at when routing; a policy lists far fewer.
const MAX_ROUTED_LEVEL: u32 = 63;

/// Runs one handler until `stop`: wakes on `wake` (a new alert) or every second.
pub async fn run_handler(
    mut handler: Handler,
    store: Arc<Mutex<Store>>,
    inbox: HandlerInbox,
    rules: Option<watch::Receiver<Arc<RuleSet>>>,
    auditor: Auditor,
    ops: mpsc::UnboundedSender<OpsAlert>,
    mut stop: watch::Receiver<bool>,
) {
    let name = handler.name();
    let governance = handler.governance().cloned();
    let HandlerInbox {
        wake,
        memory: mut from_memory,
    } = inbox;
    let mut memory: VecDeque<StoredAlert> = VecDeque::new();
    let mut from_memory_delivered: HashSet<String> = HashSet::new();
    let mut episodes = Episodes::default();
    let mut failures = 0u32;
    let mut delay = Duration::from_millis(100);
    loop {
        if *stop.borrow() {
            return;
        }
        // Bounded: beyond MEMORY_QUEUE rows the channel fills, the recorder's try_send
        // fails, and those rows go out from the store once it takes them.
        while memory.len() < MEMORY_QUEUE
            && let Ok(a) = from_memory.try_recv()
        {
            if routed(rules.as_ref(), &name, a.level) {
                memory.push_back(a);
            }
        }
        // Rows the store could not take go first: they are the newest news.
        let (alerts, skipped_last, already) = if memory.is_empty() {
            let pending = {
                let store = Arc::clone(&store);
                let name = name.clone();
                tokio::task::spawn_blocking(move || lock(&store).alerts_after(&name, 100)).await
            };
            let rows = match pending {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => {
                    warn!(handler = %name, error = %e, "cannot read the alert outbox");
                    Vec::new()
                }
                Err(e) => {
                    warn!(handler = %name, error = %e, "alert outbox task failed");
                    Vec::new()
                }
            };
            if rows.is_empty() {
                tokio::select! {
                    () = wake.notified() => {}
                    a = from_memory.recv() => if let Some(a) = a
                        && routed(rules.as_ref(), &name, a.level)
                    {
                        memory.push_back(a);
                    },
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            let last = rows.last().map(|a| a.position);
            let mut already = Vec::new();
            let mut send = Vec::new();
            for a in rows {
                let key = change_id(&a);
                if from_memory_delivered.contains(&key) {
                    already.push(key);
                } else if routed(rules.as_ref(), &name, a.level) {
                    send.push(a);
                }
            }
            (send, last, already)
        } else {
            let n = memory.len().min(100);
            (memory.iter().take(n).cloned().collect(), None, Vec::new())
        };
        let taken = alerts.len();
        let (alerts, withheld, withheld_ids) = match &governance {
            Some(g) => {
                // Like a sink of its purpose: judged once the registry had time to
                // reload what was written when the newest change was made, and never
                // while the last reload failed.
                if g.purpose != Purpose::Care {
                    let newest = alerts
                        .iter()
                        .filter(|a| !operational(a))
                        .map(|a| a.created_at_ms)
                        .max();
                    if !crate::drain::settle_after(newest, crate::drain::REGISTRY_SETTLE, &mut stop)
                        .await
                        || !crate::drain::registry_fresh(g.stale.as_ref(), &name, &mut stop).await
                    {
                        return;
                    }
                }
                let g = g.clone();
                let store = Arc::clone(&store);
                match tokio::task::spawn_blocking(move || govern_alerts(alerts, &g, &store)).await {
                    Ok(Ok(governed)) => governed,
                    Ok(Err(e)) => {
                        warn!(handler = %name, error = %e, retry_in_ms = delay.as_millis() as u64, "cannot look up the evidence of alert changes; consent not judged, nothing sent");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = stop.changed() => {}
                        }
                        delay = (delay * 2).min(Duration::from_secs(10));
                        continue;
                    }
                    Err(e) => {
                        warn!(handler = %name, error = %e, "consent task failed");
                        continue;
                    }
                }
            }
            None => (alerts, Withheld::default(), HashSet::new()),
        };
        let outcome = if alerts.is_empty() {
            Ok(0)
        } else {
            let started = std::time::Instant::now();
            let policy = rules.as_ref().map(|r| Arc::clone(&r.borrow()));
            let delivered = handler.deliver(&alerts, policy.as_deref(), now_ms()).await;
            crate::observe::alert_delivery_duration(&name, started.elapsed(), delivered.is_ok());
            delivered
        };
        match outcome {
            Ok(expired) => {
                failures = 0;
                delay = Duration::from_millis(100);
                if let Some(last) = skipped_last {
                    let store = Arc::clone(&store);
                    let n = name.clone();
                    let counts = withheld.counts();
                    let moved = match tokio::task::spawn_blocking(move || {
                        lock(&store).alert_delivered_withheld(&n, last, &counts)
                    })
                    .await
                    {
                        Ok(Ok(counted)) => {
                            debug!(handler = %name, n = alerts.len(), "alerts delivered");
                            if counted
                                && !withheld.is_empty()
                                && let Some(g) = &governance
                            {
                                report_alerts_withheld(&name, g.purpose, last, &withheld, &auditor);
                            }
                            true
                        }
                        Ok(Err(e)) => {
                            warn!(handler = %name, error = %e, "cannot advance the alert cursor; will deliver again");
                            false
                        }
                        Err(e) => {
                            warn!(handler = %name, error = %e, "alert cursor task failed");
                            false
                        }
                    };
                    if moved {
                        for key in &already {
                            from_memory_delivered.remove(key);
                        }
                    } else {
                        // The same rows come back next time: not in a tight loop.
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = stop.changed() => {}
                        }
                        delay = (delay * 2).min(Duration::from_secs(10));
                    }
                } else {
                    // Withheld ones are judged (and counted) again once the store
                    // has them.
                    for a in memory.drain(..taken) {
                        let id = change_id(&a);
                        if !withheld_ids.contains(&id) {
                            from_memory_delivered.insert(id);
                        }
                    }
                    info!(handler = %name, n = alerts.len(), "alerts delivered from memory (not recorded yet)");
                }
                metrics::counter!("vitalmq_bridge_alerts_delivered_total", "handler" => name.clone())
                    .increment((alerts.len() - expired) as u64);
                if expired > 0 {
                    metrics::counter!("vitalmq_bridge_alerts_expired_total", "handler" => name.clone())
                        .increment(expired as u64);
                }
                if alerts.is_empty() {
                    continue;
                }
                if let Some(a) = episodes.resolve(OpsKind::Sink, &name, now_ms()) {
                    info!(handler = %name, "alert handler recovered");
                    let _ = auditor.record(
                        AuditRecord::new(Component::Bridge, Event::SinkRecovered)
                            .resource(name.clone()),
                    );
                    let _ = ops.send(a);
                }
            }
            Err(e) => {
                failures += 1;
                warn!(handler = %name, error = %e, failures, retry_in_ms = delay.as_millis() as u64, "alert delivery failed");
                if failures >= 3 {
                    let mut details = Map::new();
                    details.insert("sink".into(), json!(name));
                    details.insert("error".into(), json!(e.to_string()));
                    if let Some(a) = episodes.raise(
                        OpsKind::Sink,
                        &name,
                        "alert_handler_down",
                        details,
                        now_ms(),
                    ) {
                        let _ = auditor.record(
                            AuditRecord::new(Component::Bridge, Event::SinkFailed)
                                .resource(name.clone())
                                .reason("alert_handler_down")
                                .detail("error", e.to_string()),
                        );
                        let _ = ops.send(a);
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::store::{Commit, NewAlert};

    /// Levels add up: with `[["mqtt"], ["webhook:pager"]]` the pager gets level 1 and
    /// up, and mqtt, which got the alert at level 0, also gets its later changes.
    #[test]
    fn a_change_reaches_the_handlers_of_its_level_and_every_level_below() {
        let text = "format = \"vitalmq-rules/v1\"\nversion = \"t\"\n[quality]\nlow_below = 0.5\nmax_low_fraction = 0.5\nover_n = 20\n[escalation]\nlevels = [[\"mqtt\"], [\"webhook:pager\"]]\n";
        let rules = RuleSet::parse(text, std::path::Path::new("rules.toml")).expect("rules");
        let (_tx, rx) = watch::channel(Arc::new(rules));
        assert!(routed(Some(&rx), "mqtt", 0));
        assert!(!routed(Some(&rx), "webhook:pager", 0));
        for level in [1, 2, 700] {
            assert!(routed(Some(&rx), "mqtt", level), "{level}");
            assert!(routed(Some(&rx), "webhook:pager", level), "{level}");
        }
        assert!(!routed(Some(&rx), "webhook:other", 3));
        assert!(routed(None, "webhook:other", 3), "no rules: every handler");
    }

    /// Re-sends for want of an acknowledgement repeat the state `escalated` at each
    /// level; a receiver deduplicating by the webhook id must still get each one, and
    /// every retry of one change must carry the same id.
    #[test]
    fn each_alert_change_has_its_own_webhook_id_and_retries_share_it() {
        let row = |state: &str, level: u32| StoredAlert {
            position: 1,
            alert_id: "al-1".into(),
            state: state.into(),
            topic: "alerts/site-01/urgent/dev-00001".into(),
            body: format!(r#"{{"alert_id":"al-1","state":"{state}","escalation_level":{level}}}"#),
            level,
            created_at_ms: 1,
        };
        let first = change_id(&row("escalated", 1));
        assert!(first.starts_with("al-1/escalated/"), "{first}");
        assert_eq!(first, change_id(&row("escalated", 1)), "a retry");
        assert_ne!(first, change_id(&row("escalated", 2)), "the next level");
        assert_ne!(first, change_id(&row("acknowledged", 1)));
    }

    /// Issue 18: the Message Expiry Interval counts from when the change was made; what
    /// waited goes out with the time it has left (rounded down, never longer than the
    /// policy), and with less than a second left not at all.
    #[test]
    fn the_expiry_left_counts_from_when_the_change_was_made() {
        let made = 1_700_000_000_000;
        assert_eq!(expiry_at(None, made, made + 86_400_000), Expiry::Never);
        assert_eq!(expiry_at(Some(3600), made, made), Expiry::Left(3600));
        assert_eq!(expiry_at(Some(3600), made, made + 1), Expiry::Left(3599));
        assert_eq!(
            expiry_at(Some(3600), made, made + 600_000),
            Expiry::Left(3000)
        );
        assert_eq!(expiry_at(Some(2), made, made + 1_000), Expiry::Left(1));
        assert_eq!(expiry_at(Some(2), made, made + 1_001), Expiry::Expired);
        assert_eq!(expiry_at(Some(2), made, made + 2_000), Expiry::Expired);
        assert_eq!(expiry_at(Some(2), made, made + 3_600_000), Expiry::Expired);
        assert_eq!(
            expiry_at(Some(60), made, made - 5_000),
            Expiry::Left(60),
            "a clock that went back: no time passed"
        );
        assert_eq!(
            expiry_at(Some(u64::MAX), made, made),
            Expiry::Left(u32::MAX),
            "saturates"
        );
    }

    /// Clinical alerts take their severity's expiry from the rule set in force, with
    /// content type and payload format on every PUBLISH; operational alerts and a rule
    /// set without `[alert_expiry]` never expire; expired rows are left out, in order.
    #[test]
    fn mqtt_publishes_carry_the_expiry_left_and_leave_out_the_expired() {
        let text = "format = \"vitalmq-rules/v1\"\nversion = \"t\"\n[quality]\nlow_below = 0.5\nmax_low_fraction = 0.5\nover_n = 20\n[alert_expiry]\ninfo_s = 2\nreview_s = 3600\n";
        let rules = RuleSet::parse(text, std::path::Path::new("rules.toml")).expect("rules");
        let now = 1_700_000_010_000;
        let row = |position: i64, topic: &str, created_at_ms: u64| StoredAlert {
            position,
            alert_id: format!("al-{position}"),
            state: "open".into(),
            topic: topic.into(),
            body: "{}".into(),
            level: 0,
            created_at_ms,
        };
        let rows = [
            row(1, "alerts/site-01/info/dev-00001", now - 2_500),
            row(2, "alerts/site-01/review/dev-00001", now - 2_500),
            row(3, "alerts/site-01/urgent/dev-00001", now - 86_400_000),
            row(4, "ops/bridge/battery", now - 86_400_000),
            row(5, "alerts/site-01/info/dev-00001", now - 500),
        ];
        let (items, expired) = mqtt_publishes(&rows, Some(&rules), now);
        assert_eq!(expired, 1);
        let got: Vec<(&str, Option<u32>)> = items
            .iter()
            .map(|p| (p.topic.as_str(), p.properties.message_expiry_interval))
            .collect();
        assert_eq!(
            got,
            [
                ("alerts/site-01/review/dev-00001", Some(3597)),
                ("alerts/site-01/urgent/dev-00001", None),
                ("ops/bridge/battery", None),
                ("alerts/site-01/info/dev-00001", Some(1)),
            ]
        );
        for p in &items {
            assert_eq!(
                p.properties.content_type.as_deref(),
                Some("application/json")
            );
            assert_eq!(p.properties.payload_format_indicator, Some(1));
        }
        let (items, expired) = mqtt_publishes(&rows, None, now);
        assert_eq!(
            (items.len(), expired),
            (5, 0),
            "no rule set: nothing expires"
        );
        assert!(
            items
                .iter()
                .all(|p| p.properties.message_expiry_interval.is_none())
        );
        assert_eq!(topic_severity("alerts/site-01/ack/int-01"), None);
        assert_eq!(topic_severity("alerts/site-01/urgent"), None);
    }

    /// Issue 19: a research handler gets a clinical change only if research consent
    /// of the patient the change names covered every reading of its evidence; care
    /// always (clinical alerting runs under care); the first reason otherwise.
    #[test]
    fn a_handler_of_another_purpose_gets_a_change_only_if_consent_covered_its_evidence() {
        use crate::drain::tests::{JAN_2026, registry};
        let r = registry(Some("2026-01-01T00:00:30Z"));
        let dev1 = Some("dev-1");
        let pt_a = Some(("pt-a", "north"));
        let flow = |device, recorded, evidence: &[u64]| {
            alert_flow(
                &r,
                Purpose::Research,
                device,
                recorded,
                evidence,
                JAN_2026 + 10_000,
            )
        };
        assert_eq!(
            flow(dev1, pt_a, &[JAN_2026 + 1_000, JAN_2026 + 2_000]),
            Flow::Send
        );
        assert_eq!(
            flow(dev1, pt_a, &[JAN_2026 - 1, JAN_2026 + 1_000]),
            Flow::Withheld(Reason::NoConsent),
            "one reading before the grant is enough to withhold"
        );
        assert_eq!(
            flow(dev1, pt_a, &[JAN_2026 + 1_000, JAN_2026 + 30_000]),
            Flow::Withheld(Reason::Withdrawn)
        );
        assert_eq!(
            flow(dev1, pt_a, &[]),
            Flow::Send,
            "no evidence: when it was made"
        );
        assert_eq!(
            flow(dev1, Some(("pt-z", "north")), &[JAN_2026 + 1_000]),
            Flow::Withheld(Reason::Reattributed),
            "a change naming another patient than the registry: not under pt-a's grant"
        );
        assert_eq!(
            flow(dev1, Some(("pt-a", "south")), &[JAN_2026 + 1_000]),
            Flow::Withheld(Reason::Reattributed)
        );
        assert_eq!(
            flow(Some("dev-2"), Some(("pt-b", "north")), &[JAN_2026 + 1_000]),
            Flow::Withheld(Reason::NoConsent)
        );
        assert_eq!(flow(None, pt_a, &[]), Flow::Withheld(Reason::Unassigned));
        assert_eq!(
            alert_flow(&r, Purpose::Care, Some("dev-2"), None, &[0], 0),
            Flow::Send,
            "care: always"
        );
    }

    /// Operational alerts go whole to every handler; clinical ones are judged and
    /// minimised (by default everything but `patient_ref`); a change whose evidence is
    /// not in the store is withheld, never judged at another time.
    #[test]
    fn governed_alerts_are_minimised_and_operational_ones_pass_whole() {
        use crate::drain::tests::{JAN_2026, registry};
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Mutex::new(Store::open(dir.path()).expect("store"));
        let (_tx, rx) = watch::channel(registry(None));
        let g = AlertGovernance {
            purpose: Purpose::Research,
            fields: Fields::alert_default_for(Purpose::Research),
            registry: rx,
            pseudonym: None,
            stale: None,
        };
        let row = |position: i64, topic: &str, device: &str, evidence: &str| StoredAlert {
            position,
            alert_id: format!("al-{position}"),
            state: "open".into(),
            topic: topic.into(),
            body: format!(
                r#"{{"alert_id":"al-{position}","kind":"clinical","device":"{device}","site":"north","patient_ref":"{}","value":88,"evidence":[{evidence}]}}"#,
                if device == "dev-1" { "pt-a" } else { "pt-b" }
            ),
            level: 0,
            created_at_ms: JAN_2026 + 5_000,
        };
        let rows = vec![
            row(1, "alerts/north/urgent/dev-1", "dev-1", ""),
            row(2, "alerts/north/urgent/dev-2", "dev-2", ""),
            row(3, "ops/bridge/sensor_fault", "dev-2", ""),
            row(4, "alerts/north/urgent/dev-1", "dev-1", r#""ev-unknown""#),
        ];
        let (sent, withheld, ids) = govern_alerts(rows.clone(), &g, &store).expect("store");
        assert_eq!(sent.iter().map(|a| a.position).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(
            sent[0].body,
            r#"{"alert_id":"al-1","kind":"clinical","device":"dev-1","site":"north","value":88,"evidence":[]}"#
        );
        assert_eq!(sent[1].body, rows[2].body, "operational: whole");
        assert_eq!(
            withheld.counts(),
            [("no_consent", 1), ("evidence_missing", 1)]
        );
        assert!(ids.contains(&change_id(&rows[1])));
        assert!(ids.contains(&change_id(&rows[3])));

        // The evidence cannot be looked up: nothing is sent, the batch fails whole.
        rusqlite::Connection::open(dir.path().join(crate::store::DB_FILE))
            .and_then(|c| c.execute_batch("DROP TABLE event_index"))
            .expect("break the store");
        assert!(govern_alerts(rows, &g, &store).is_err());
    }

    /// An HTTP endpoint on 127.0.0.1 that answers every request 200 and counts them.
    async fn counting_endpoint() -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/alerts", listener.local_addr().expect("addr"));
        let count = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&count);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let seen = Arc::clone(&seen);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    let mut have = Vec::new();
                    loop {
                        let Ok(n) = socket.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        have.extend_from_slice(&buf[..n]);
                        // One small request at a time: headers, then a body of
                        // content-length bytes.
                        let text = String::from_utf8_lossy(&have).to_string();
                        let Some(end) = text.find("\r\n\r\n") else {
                            continue;
                        };
                        let len: usize = text[..end]
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse().ok())?
                            })
                            .unwrap_or(0);
                        if have.len() < end + 4 + len {
                            continue;
                        }
                        have.drain(..end + 4 + len);
                        seen.fetch_add(1, Ordering::SeqCst);
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        if socket.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (url, count)
    }

    /// A log writer into a shared buffer.
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        tokio::time::timeout(Duration::from_secs(20), async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("not within 20 s: {what}"));
    }

    /// An alert the store could not take goes out from memory at once; written to the
    /// store later, the same row is not delivered a second time, but the handler's
    /// cursor moves over it, and a new row after it goes out as usual.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_row_delivered_from_memory_is_not_delivered_again_from_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Mutex::new(Store::open(dir.path()).expect("store")));
        let audit =
            vitalmq_audit::AuditLog::open(&dir.path().join("audit.jsonl"), 64).expect("audit");
        let (url, requests) = counting_endpoint().await;
        let signer = WebhookSigner::parse("whsec_bmV3LWtleS1uZXcta2V5LW5ldy1rZXktbmV3LWtleS0=")
            .expect("secret");
        let handler = Handler::webhook("ehr".into(), url, signer).expect("client");
        let (feed, inbox) = feed();
        let (ops, _ops_rx) = mpsc::unbounded_channel();
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(run_handler(
            handler,
            Arc::clone(&store),
            inbox,
            None,
            audit.auditor(),
            ops,
            stop,
        ));
        let row = |id: &str| NewAlert {
            alert_id: id.into(),
            state: "open".into(),
            kind: "clinical".into(),
            topic: "alerts/site-01/urgent/dev-00001".into(),
            device: Some("dev-00001".into()),
            rule: Some("spo2-low".into()),
            created_at_ms: 1,
            body: format!("{{\"alert_id\":\"{id}\",\"state\":\"open\"}}"),
            level: 0,
        };
        let first = row("al-1");
        feed.memory
            .try_send(StoredAlert {
                position: 0,
                alert_id: first.alert_id.clone(),
                state: first.state.clone(),
                topic: first.topic.clone(),
                body: first.body.clone(),
                level: 0,
                created_at_ms: first.created_at_ms,
            })
            .expect("queue");
        feed.wake.notify_one();
        until("delivered from memory", || {
            requests.load(Ordering::SeqCst) == 1
        })
        .await;

        // The store takes writes again: the row and a newer one are recorded.
        lock(&store)
            .commit_alerts_only(&Commit {
                alerts: vec![first, row("al-2")],
                ..Commit::default()
            })
            .expect("commit");
        feed.wake.notify_one();
        until("the cursor over both rows", || {
            lock(&store).handler_cursor("webhook:ehr").expect("cursor") == 2
        })
        .await;
        assert_eq!(
            requests.load(Ordering::SeqCst),
            2,
            "al-1 once (from memory), al-2 once (from the store)"
        );
        stop_tx.send(true).expect("stop");
        let _ = task.await;
        audit.close().expect("close");
    }

    /// A research webhook pauses while the last registry reload failed: it sends
    /// nothing and keeps its cursor, then delivers once a reload succeeded.
    #[tokio::test]
    async fn a_handler_of_another_purpose_pauses_while_the_registry_is_stale() {
        use crate::drain::tests::{JAN_2026, registry};
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Mutex::new(Store::open(dir.path()).expect("store")));
        let audit =
            vitalmq_audit::AuditLog::open(&dir.path().join("audit.jsonl"), 64).expect("audit");
        let (url, requests) = counting_endpoint().await;
        let signer = WebhookSigner::parse("whsec_bmV3LWtleS1uZXcta2V5LW5ldy1rZXktbmV3LWtleS0=")
            .expect("secret");
        let (_registry_tx, registry_rx) = watch::channel(registry(None));
        let (stale_tx, stale_rx) = watch::channel(true);
        let g = AlertGovernance {
            purpose: Purpose::Research,
            fields: Fields::alert_default_for(Purpose::Research),
            registry: registry_rx,
            pseudonym: None,
            stale: Some(stale_rx),
        };
        let handler = Handler::webhook("study".into(), url, signer)
            .expect("client")
            .governed(Some(g));
        let (feed, inbox) = feed();
        let (ops, _ops_rx) = mpsc::unbounded_channel();
        let (stop_tx, stop) = watch::channel(false);
        // Made long ago: no settling wait; consented (research granted from 2026).
        lock(&store)
            .commit_alerts_only(&Commit {
                alerts: vec![NewAlert {
                    alert_id: "al-1".into(),
                    state: "open".into(),
                    kind: "clinical".into(),
                    topic: "alerts/north/urgent/dev-1".into(),
                    device: Some("dev-1".into()),
                    rule: Some("spo2-low".into()),
                    created_at_ms: JAN_2026 + 5_000,
                    body: r#"{"alert_id":"al-1","device":"dev-1","site":"north","patient_ref":"pt-a","evidence":[]}"#.into(),
                    level: 0,
                }],
                ..Commit::default()
            })
            .expect("commit");
        // The pause is seen in the handler's log (this runtime runs on this thread).
        let logs = Arc::new(Mutex::new(Vec::new()));
        let captured = Arc::clone(&logs);
        let _logging = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_ansi(false)
                .with_writer(move || Captured(Arc::clone(&captured)))
                .finish(),
        );
        let task = tokio::spawn(run_handler(
            handler,
            Arc::clone(&store),
            inbox,
            None,
            audit.auditor(),
            ops,
            stop,
        ));
        feed.wake.notify_one();
        until("the handler pauses", || {
            String::from_utf8_lossy(&logs.lock().expect("logs"))
                .contains("registry stale: delivery paused until a reload succeeds")
        })
        .await;
        assert_eq!(
            requests.load(Ordering::SeqCst),
            0,
            "nothing sent while stale"
        );
        assert_eq!(
            lock(&store)
                .handler_cursor("webhook:study")
                .expect("cursor"),
            0
        );

        stale_tx.send(false).expect("reloaded");
        until("delivered after the reload", || {
            lock(&store)
                .handler_cursor("webhook:study")
                .expect("cursor")
                == 1
        })
        .await;
        assert_eq!(requests.load(Ordering::SeqCst), 1);
        stop_tx.send(true).expect("stop");
        let _ = task.await;
        audit.close().expect("close");
    }
}
