//! `vitalmq trace ID`: the provenance chain of an alert (`al-...`) or an event
//! (`ev1-...`) from the local records of a running or stopped system: the bridge store
//! (events, raw plane, alerts), the bridge audit log (rule and policy of each alert
//! change) and, when given, the broker audit log (the publisher's certificate and who
//! was handed each alert).

use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use serde_json::{Number, Value as Json};
use vitalmq_audit::{AuditRecord, Event};
use vitalmq_bridge::sink::object::PartitionKey;
use vitalmq_bridge::store::{EventDetail, RawRef, Store};
use vitalmq_bridge::window::Verdict;
use vitalmq_policies::{Role, SpiffeId};

#[derive(Debug, clap::Args)]
pub struct TraceArgs {
    /// An alert id (`al-...`) or an event id (`ev1-...`).
    id: String,
    /// The bridge's data directory; not with `--server`.
    #[arg(long, required_unless_present = "server", conflicts_with = "server")]
    data: Option<PathBuf>,
    /// The broker's audit log: adds the publisher's certificate and the recipients.
    #[arg(long)]
    broker_audit: Option<PathBuf>,
    /// One JSON object instead of text (always, with `--server`).
    #[arg(long)]
    json: bool,
    /// Why the trace is read (recorded in the audit log; required with `--server`).
    #[arg(long)]
    purpose: Option<String>,
    /// The key file (`[encryption] key_file`), to open sealed payloads; without it a
    /// sealed payload is shown as sealed (an erased one as erased either way).
    #[arg(long, conflicts_with = "server")]
    key_file: Option<PathBuf>,
    #[command(flatten)]
    client: crate::admin_cmd::client::ClientArgs,
}

pub fn run(args: TraceArgs) -> anyhow::Result<ExitCode> {
    let data = match (args.client.remote(), &args.data) {
        (Some(server), _) => return args.client.trace(server, &args.id, args.purpose.as_deref()),
        (None, Some(data)) => data.clone(),
        (None, None) => anyhow::bail!("--data or --server is required"),
    };
    let store = crate::bridge_cmd::open_existing_with(&data, args.key_file.as_deref())?;
    let mut action = crate::operator_audit::Action::new(
        "trace",
        crate::operator_audit::log_path(crate::operator_audit::data_dir_log(&data)),
    )
    .resource(Some(args.id.clone()))
    .detail("data_dir", crate::operator_audit::absolute(&data));
    if let Some(purpose) = &args.purpose {
        action = action.detail("purpose", purpose.as_str());
    }
    if let Some(b) = &args.broker_audit {
        action = action.detail("broker_audit", crate::operator_audit::absolute(b));
    }
    action.run(|| {
        let code = trace(&args, &store)?;
        let mut done = serde_json::Map::new();
        done.insert("found".into(), (code == ExitCode::SUCCESS).into());
        Ok((code, done))
    })
}

/// The trace of `id` from `store` (and the broker audit log, when given).
fn build(store: &Store, id: &str, broker_audit: Option<&Path>) -> anyhow::Result<Option<Trace>> {
    let broker = match broker_audit {
        Some(p) => Some(BrokerAudit::read(p, &wanted(store, id)?)?),
        None => None,
    };
    if id.starts_with("al-") {
        trace_alert(store, id, broker.as_ref())
    } else {
        trace_event(store, id, broker.as_ref())
    }
}

/// The trace of `id` in `store` as `vitalmq trace --json` prints it, and the site it
/// belongs to, for the admin API (the caller opens the store with its keyring and
/// audits the read).
pub fn trace_json(
    store: &Store,
    broker_audit: Option<&Path>,
    id: &str,
) -> anyhow::Result<Option<(Json, Option<String>)>> {
    let Some(trace) = build(store, id, broker_audit)? else {
        return Ok(None);
    };
    let site = match &trace {
        Trace::Event(e) => Some(e.event.detail.head.site.to_string()),
        Trace::Alert(a) => a.site.clone(),
    };
    Ok(Some((serde_json::to_value(&trace)?, site)))
}

fn trace(args: &TraceArgs, store: &Store) -> anyhow::Result<ExitCode> {
    let trace = build(store, &args.id, args.broker_audit.as_deref())?;
    let Some(trace) = trace else {
        eprintln!("{}: not found in {}", args.id, store.path().display());
        return Ok(ExitCode::from(1));
    };
    if args.json {
        println!("{}", serde_json::to_string(&trace)?);
    } else {
        print!("{}", render(&trace));
    }
    Ok(ExitCode::SUCCESS)
}

/// What a trace needs from the broker audit log, known from the store before reading
/// it: the devices whose connections matter, the alert whose deliveries matter, and
/// for an event trace the time after which nothing can matter.
#[derive(Debug, Default)]
struct Wanted {
    /// The devices whose accepted connections matter.
    devices: Vec<String>,
    /// `/device/<id>"` of each: how its identity ends in a record's line, a cheap
    /// filter before a line is parsed.
    device_suffixes: Vec<String>,
    /// The alert whose deliveries to list.
    alert: Option<String>,
    /// Stop reading at the first record stamped after this (RFC 3339, to the second).
    stop_after: Option<String>,
}

impl Wanted {
    fn new(devices: Vec<String>, alert: Option<String>, stop_after: Option<String>) -> Self {
        Self {
            device_suffixes: devices.iter().map(|d| format!("/device/{d}\"")).collect(),
            devices,
            alert,
            stop_after,
        }
    }
}

/// The device id of a device's SPIFFE identity (`spiffe://<trust domain>/device/<id>`).
fn device_of(identity: &str) -> Option<String> {
    let id = SpiffeId::parse(identity).ok()?;
    (id.role == Role::Device).then(|| id.id.as_str().to_owned())
}

/// Records this far past the newest time a trace needs still get read: the log is in
/// write order, and the broker's wall clock may step back a little.
const CLOCK_STEP_MARGIN_MS: u64 = 5 * 60 * 1000;

/// The parts of the broker audit log a trace needs.
struct BrokerAudit {
    /// Accepted connections of the wanted devices, in log order.
    connections: Vec<Publisher>,
    /// Alert deliveries: alert id -> deliveries in log order.
    deliveries: BTreeMap<String, Vec<Delivery>>,
}

/// `at` of a record line, to the second, without parsing the line (the writer puts it
/// third: `{"format":...,"seq":...,"at":"..."`).
fn line_time(line: &str) -> Option<&str> {
    let head = line.get(..line.len().min(120))?;
    let at = head.find("\"at\":\"")? + 6;
    line.get(at..at + 19)
}

impl BrokerAudit {
    /// Reads the records `wanted` names. The log is read line by line, but only lines
    /// that mention a wanted device or alert are parsed, and an event trace stops at
    /// the first record written after its newest event (plus a margin): a day's log
    /// or a month's costs about one pass over the bytes, not a JSON parse per record.
    fn read(path: &Path, wanted: &Wanted) -> anyhow::Result<Self> {
        let file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
        let mut audit = Self {
            connections: Vec::new(),
            deliveries: BTreeMap::new(),
        };
        let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
        let mut line = String::new();
        loop {
            line.clear();
            if reader
                .read_line(&mut line)
                .with_context(|| format!("{}", path.display()))?
                == 0
            {
                break;
            }
            if let Some(stop) = &wanted.stop_after
                && line_time(&line).is_some_and(|at| at > stop.as_str())
            {
                break;
            }
            // Cheap filters first: a day's log is mostly other records.
            let accepted = line.contains("\"connection_accepted\"")
                && wanted
                    .device_suffixes
                    .iter()
                    .any(|d| line.contains(d.as_str()));
            let delivered = line.contains("\"alert_delivered\"")
                && wanted
                    .alert
                    .as_ref()
                    .is_some_and(|a| line.contains(a.as_str()));
            if !(accepted || delivered) {
                continue;
            }
            let Ok(r) = serde_json::from_str::<AuditRecord>(&line) else {
                continue;
            };
            let actor = r.actor.unwrap_or_default();
            let who = actor.identity.unwrap_or_default();
            if r.event == Event::ConnectionAccepted {
                if device_of(&who).is_some_and(|d| wanted.devices.contains(&d)) {
                    audit.connections.push(Publisher {
                        identity: who,
                        connected_at: r.at,
                        cert_serial: actor.cert_serial,
                        cert_sha256: actor.cert_sha256,
                    });
                }
            } else if r.event == Event::AlertDelivered
                && let Some(id) = r.resource
                && wanted.alert.as_deref() == Some(id.as_str())
            {
                let state = r.reason.unwrap_or_default();
                audit.deliveries.entry(id).or_default().push(Delivery {
                    identity: who,
                    state,
                    at: r.at,
                });
            }
        }
        Ok(audit)
    }

    /// The last accepted connection of `device` at or before `at` (RFC 3339).
    fn publisher(&self, device: &str, at: &str) -> Option<Publisher> {
        // Compared as times: RFC 3339 text with and without fractional seconds does not
        // sort as text ("...:00Z" > "...:00.5Z").
        let parse = |t: &str| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        };
        let at = parse(at)?;
        self.connections
            .iter()
            .rfind(|c| {
                device_of(&c.identity).as_deref() == Some(device)
                    && parse(&c.connected_at).is_some_and(|w| w <= at)
            })
            .cloned()
    }
}

/// What to read from the broker log for `id`: the alert's device and deliveries (read
/// to the end: a delivery may come long after the change, to a subscriber that was
/// offline), or the event's device up to its reception.
fn wanted(store: &Store, id: &str) -> anyhow::Result<Wanted> {
    if id.starts_with("al-") {
        let device = store
            .alert_history(id)?
            .first()
            .and_then(|h| AlertBody::of(&h.body).device);
        return Ok(Wanted::new(
            device.into_iter().collect(),
            Some(id.to_owned()),
            None,
        ));
    }
    let Some(e) = store.event_detail(id)? else {
        return Ok(Wanted::default());
    };
    let until = e.received_at_ms.saturating_add(CLOCK_STEP_MARGIN_MS);
    Ok(Wanted::new(
        vec![e.head.device.to_string()],
        None,
        rfc3339(until).map(|t| t[..19].to_owned()),
    ))
}

fn rfc3339(ms: u64) -> Option<String> {
    vitalmq_bridge::normalize::rfc3339_ms(ms)
}

/// A trace, as `--json` prints it and the text is rendered from.
#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum Trace {
    Event(Box<EventTrace>),
    Alert(Box<AlertTrace>),
}

/// `vitalmq trace ev1-...`: the event's chain and the alerts citing it.
#[derive(Debug, Serialize)]
struct EventTrace {
    event: EventChain,
    cited_by_alerts: Vec<Citation>,
}

/// An alert state change citing the traced event.
#[derive(Debug, Serialize)]
struct Citation {
    alert_id: String,
    state: String,
    rule: Option<String>,
}

/// `vitalmq trace al-...`: who raised what under which rule and policy, on which
/// events, and (with the broker audit log) who was handed it.
#[derive(Debug, Serialize)]
struct AlertTrace {
    alert_id: String,
    rule: Option<String>,
    rule_version: Option<String>,
    policy_sha256: Option<String>,
    device: Option<String>,
    site: Option<String>,
    patient_ref: Option<String>,
    fw: Option<String>,
    model: Option<String>,
    /// Why the alert's bodies are not shown: `erased at <time> (crypto-shredded)`, or
    /// `sealed`; absent when they are readable.
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<String>,
    changes: Vec<Change>,
    evidence: Vec<Evidence>,
    /// `None` (null) without the broker audit log: unknown, not "nobody".
    recipients: Option<Vec<Delivery>>,
}

/// One recorded state change of the alert.
#[derive(Debug, Serialize)]
struct Change {
    state: String,
    severity: Option<String>,
    topic: String,
    raised_at: Option<String>,
    recorded_at: Option<String>,
    value: Option<Number>,
    threshold: Option<Number>,
    rule_version: Option<String>,
    policy_sha256: Option<String>,
    /// The escalation level it was sent at, when above 0 (SPEC 5.2).
    #[serde(skip_serializing_if = "Option::is_none")]
    escalation_level: Option<u64>,
    /// Re-sent because nobody acknowledged it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    unacknowledged: bool,
    /// Who acknowledged it and when (an `acknowledged` change).
    #[serde(skip_serializing_if = "Option::is_none")]
    ack: Option<AckView>,
}

impl Change {
    /// One stored change: its row's state, topic and time, and what its body says.
    fn of(state: &str, topic: &str, recorded_at_ms: u64, b: &AlertBody) -> Self {
        Self {
            state: state.to_owned(),
            severity: b.severity.clone(),
            topic: topic.to_owned(),
            raised_at: b.raised_at.clone(),
            recorded_at: rfc3339(recorded_at_ms),
            value: b.value.clone(),
            threshold: b.threshold.clone(),
            rule_version: b.rule_version.clone(),
            policy_sha256: b.policy_sha256.clone(),
            escalation_level: b.escalation_level.filter(|l| *l > 0),
            unacknowledged: state == "escalated" && b.reason.as_deref() == Some("unacknowledged"),
            ack: b.ack.clone().filter(|_| state == "acknowledged"),
        }
    }
}

/// An acknowledgement as the re-sent alert states it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct AckView {
    by: Option<String>,
    at: Option<String>,
}

/// An evidence id of the alert: its event's chain, or that the store lacks it.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Evidence {
    Found(Box<EventChain>),
    Missing { event_id: String, missing: bool },
}

/// One event's chain: the stored event, where its raw bytes are, and (with the broker
/// audit log) the certificate its publisher connected with.
#[derive(Debug, Serialize)]
struct EventChain {
    #[serde(flatten)]
    detail: EventDetail,
    raw: RawTrace,
    received_at: Option<String>,
    /// Present only with the broker audit log (and a reception time); null when no
    /// connection of the device before the reception is recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    publisher_certificate: Option<Option<Publisher>>,
}

/// The raw-plane row and where its bytes are kept.
#[derive(Debug, Serialize)]
struct RawTrace {
    #[serde(flatten)]
    row: RawRef,
    stored_in: StoredIn,
}

#[derive(Debug, Serialize)]
struct StoredIn {
    bridge_store: String,
    sinks: Vec<SinkDelivery>,
}

/// A sink that has delivered the event, and the partition its object is in.
#[derive(Debug, Serialize)]
struct SinkDelivery {
    sink: String,
    partition: String,
    note: String,
}

/// An accepted connection of a device, from the broker audit log.
#[derive(Debug, Clone, Serialize)]
struct Publisher {
    identity: String,
    connected_at: String,
    cert_serial: Option<String>,
    cert_sha256: Option<String>,
}

/// An alert handed to a subscriber, from the broker audit log.
#[derive(Debug, Clone, Serialize)]
struct Delivery {
    identity: String,
    state: String,
    at: String,
}

/// The fields of a published alert (a document, kept as such in the store) a trace
/// shows; absent or mistyped ones are unknown.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct AlertBody {
    rule: Option<String>,
    rule_version: Option<String>,
    policy_sha256: Option<String>,
    device: Option<String>,
    site: Option<String>,
    patient_ref: Option<String>,
    fw: Option<String>,
    model: Option<String>,
    severity: Option<String>,
    raised_at: Option<String>,
    value: Option<Number>,
    threshold: Option<Number>,
    evidence: Vec<String>,
    escalation_level: Option<u64>,
    reason: Option<String>,
    ack: Option<AckView>,
}

impl AlertBody {
    fn of(body: &Json) -> Self {
        Self::deserialize(body).unwrap_or_default()
    }
}

/// The fields of a normalized event (a published document) the text shows.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct NormalizedView {
    observed_at: Option<String>,
    fw: Option<String>,
    model: Option<String>,
    schema: Option<u64>,
    provenance: ProvenanceView,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ProvenanceView {
    kid: Option<String>,
    alg: Option<String>,
    transformation: Option<String>,
    consent: Option<String>,
    processing_policy: Option<String>,
}

/// The chain of one event: message, verdicts, normalized form, where the bytes are.
fn event_chain(
    store: &Store,
    event_id: &str,
    near: Option<i64>,
    broker: Option<&BrokerAudit>,
) -> anyhow::Result<Option<EventChain>> {
    let Some(detail) = store.event_detail_near(event_id, near)? else {
        return Ok(None);
    };
    let received_at = rfc3339(detail.received_at_ms);
    let position = detail.head.position;
    let partition = PartitionKey::new(
        detail.head.site.as_str(),
        detail.head.device.as_str(),
        detail.received_at_ms,
    )
    .map(|key| key.name())
    .unwrap_or_default();
    let sinks = store
        .sinks_past(position)?
        .into_iter()
        .map(|(sink, _)| SinkDelivery {
            sink,
            partition: partition.clone(),
            note: format!(
                "objects named <first>-<last> by outbox position; this event is position {position}"
            ),
        })
        .collect();
    let raw = RawTrace {
        stored_in: StoredIn {
            bridge_store: format!("raw_messages row {}", detail.raw.store_row),
            sinks,
        },
        row: detail.raw.clone(),
    };
    let publisher_certificate = match (broker, &received_at) {
        (Some(b), Some(at)) => Some(b.publisher(detail.head.device.as_str(), at)),
        _ => None,
    };
    Ok(Some(EventChain {
        detail,
        raw,
        received_at,
        publisher_certificate,
    }))
}

fn trace_event(
    store: &Store,
    event_id: &str,
    broker: Option<&BrokerAudit>,
) -> anyhow::Result<Option<Trace>> {
    let Some(event) = event_chain(store, event_id, None, broker)? else {
        return Ok(None);
    };
    let cited_by_alerts = store
        .alerts_citing(event_id)?
        .into_iter()
        .map(|a| Citation {
            rule: AlertBody::of(&a.body).rule,
            alert_id: a.alert_id,
            state: a.state,
        })
        .collect();
    Ok(Some(Trace::Event(Box::new(EventTrace {
        event,
        cited_by_alerts,
    }))))
}

fn trace_alert(
    store: &Store,
    alert_id: &str,
    broker: Option<&BrokerAudit>,
) -> anyhow::Result<Option<Trace>> {
    let history = store.alert_history(alert_id)?;
    let bodies: Vec<AlertBody> = history.iter().map(|h| AlertBody::of(&h.body)).collect();
    let Some(body) = bodies.first() else {
        return Ok(None);
    };
    // Each evidence id with the time of the first change citing it: the event was
    // received shortly before, which tells the store where to look first.
    let mut evidence_ids: Vec<(&str, u64)> = Vec::new();
    for (h, b) in history.iter().zip(&bodies) {
        for id in &b.evidence {
            if !evidence_ids.iter().any(|(e, _)| e == id) {
                evidence_ids.push((id, h.recorded_at_ms));
            }
        }
    }
    let mut evidence = Vec::new();
    for (id, at) in evidence_ids {
        let near = store.position_near_time(at)?;
        evidence.push(match event_chain(store, id, Some(near), broker)? {
            Some(chain) => Evidence::Found(Box::new(chain)),
            None => Evidence::Missing {
                event_id: id.to_owned(),
                missing: true,
            },
        });
    }
    let changes = history
        .iter()
        .zip(&bodies)
        .map(|(h, b)| Change::of(&h.state, &h.topic, h.recorded_at_ms, b))
        .collect();
    let recipients = broker.map(|b| b.deliveries.get(alert_id).cloned().unwrap_or_default());
    Ok(Some(Trace::Alert(Box::new(AlertTrace {
        alert_id: alert_id.to_owned(),
        rule: body.rule.clone(),
        rule_version: body.rule_version.clone(),
        policy_sha256: body.policy_sha256.clone(),
        device: body.device.clone(),
        site: body.site.clone(),
        patient_ref: body.patient_ref.clone(),
        fw: body.fw.clone(),
        model: body.model.clone(),
        payload: history.iter().find_map(|h| payload_note(&h.marks)),
        changes,
        evidence,
        recipients,
    }))))
}

/// What a trace says of a payload it cannot show: erased (with when, if known), or
/// sealed without a key; `None` when readable.
fn payload_note(marks: &vitalmq_bridge::store::sealing::PayloadMarks) -> Option<String> {
    if marks.erased {
        return Some(match marks.erased_at_ms.and_then(rfc3339) {
            Some(at) => format!("erased at {at} (crypto-shredded)"),
            None => "erased (keys destroyed or scrubbed)".to_owned(),
        });
    }
    marks
        .sealed
        .then(|| "sealed (give --key-file to open it)".to_owned())
}

/// The text of a value the trace may not know: `-` when it does not.
fn or_dash<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn render_event(out: &mut String, e: &EventChain, indent: &str) {
    let d = &e.detail;
    let n = NormalizedView::deserialize(&d.normalized).unwrap_or_default();
    let p = &n.provenance;
    let raw = &e.raw;
    out.push_str(&format!(
        "{indent}event {}  device {} epoch {} seq {}  sequence {}\n",
        d.head.event_id,
        d.head.device,
        d.head.epoch,
        d.head.seq,
        Verdict::Accept(d.head.verdict)
    ));
    out.push_str(&format!(
        "{indent}  observed {}  received {}  fw {}  model {}  schema {}\n",
        or_dash(n.observed_at.as_ref()),
        or_dash(e.received_at.as_ref()),
        or_dash(n.fw.as_ref()),
        or_dash(n.model.as_ref()),
        or_dash(n.schema)
    ));
    out.push_str(&format!(
        "{indent}  verified: kid {} {}  raw sha256 {} ({} bytes)  topic {}\n",
        or_dash(p.kid.as_ref()),
        or_dash(p.alg.as_ref()),
        raw.row.sha256,
        raw.row.bytes,
        raw.row.topic
    ));
    out.push_str(&format!(
        "{indent}  raw bytes: bridge store {}{}\n",
        raw.stored_in.bridge_store,
        raw.stored_in
            .sinks
            .iter()
            .map(|x| format!("; sink {} {}", x.sink, x.partition))
            .collect::<String>()
    ));
    out.push_str(&format!(
        "{indent}  normalized by {}  consent {}  processing policy {}\n",
        or_dash(p.transformation.as_ref()),
        or_dash(p.consent.as_ref()),
        or_dash(p.processing_policy.as_ref())
    ));
    match &e.publisher_certificate {
        Some(Some(c)) => out.push_str(&format!(
            "{indent}  publisher: {} (cert serial {}, sha256 {}, connected {})\n",
            c.identity,
            or_dash(c.cert_serial.as_ref()),
            or_dash(c.cert_sha256.as_ref()),
            c.connected_at
        )),
        _ => out.push_str(&format!("{indent}  publisher: {}\n", raw.row.publisher)),
    }
    if let Some(note) = payload_note(&d.marks) {
        out.push_str(&format!("{indent}  payload: {note}\n"));
    }
}

/// An evidence id the store does not hold, in the shape of an event with nothing known.
fn render_missing(out: &mut String, event_id: &str, indent: &str) {
    out.push_str(&format!(
        "{indent}event {event_id}  device - epoch - seq -  sequence -\n\
         {indent}  observed -  received -  fw -  model -  schema -\n\
         {indent}  verified: kid - -  raw sha256 - (- bytes)  topic -\n\
         {indent}  raw bytes: bridge store -\n\
         {indent}  normalized by -  consent -  processing policy -\n\
         {indent}  publisher: -\n"
    ));
}

fn render(t: &Trace) -> String {
    let mut out = String::new();
    let t = match t {
        Trace::Event(t) => {
            render_event(&mut out, &t.event, "");
            for a in &t.cited_by_alerts {
                out.push_str(&format!(
                    "  evidence of alert {} ({} {})\n",
                    a.alert_id,
                    or_dash(a.rule.as_ref()),
                    a.state
                ));
            }
            return out;
        }
        Trace::Alert(t) => t,
    };
    out.push_str(&format!(
        "alert {}  rule {} version {}  policy sha256 {}\n  device {} at {}  patient {}  fw {}  model {}\n",
        t.alert_id,
        or_dash(t.rule.as_ref()),
        or_dash(t.rule_version.as_ref()),
        or_dash(t.policy_sha256.as_ref()),
        or_dash(t.device.as_ref()),
        or_dash(t.site.as_ref()),
        or_dash(t.patient_ref.as_ref()),
        or_dash(t.fw.as_ref()),
        or_dash(t.model.as_ref())
    ));
    if let Some(note) = &t.payload {
        out.push_str(&format!("  payload: {note}\n"));
    }
    out.push_str("state changes:\n");
    for c in &t.changes {
        out.push_str(&format!(
            "  {:<10} {:<7} value {} threshold {}  raised {}  recorded {}  rule v{}\n",
            c.state,
            or_dash(c.severity.as_ref()),
            or_dash(c.value.as_ref()),
            or_dash(c.threshold.as_ref()),
            or_dash(c.raised_at.as_ref()),
            or_dash(c.recorded_at.as_ref()),
            or_dash(c.rule_version.as_ref())
        ));
        if let Some(level) = c.escalation_level {
            let why = if c.unacknowledged {
                "  (not acknowledged in time)"
            } else {
                ""
            };
            out.push_str(&format!("             escalation level {level}{why}\n"));
        }
        if let Some(a) = &c.ack {
            out.push_str(&format!(
                "             acknowledged by {} at {}\n",
                or_dash(a.by.as_ref()),
                or_dash(a.at.as_ref())
            ));
        }
    }
    out.push_str(&format!("evidence ({} events):\n", t.evidence.len()));
    for e in &t.evidence {
        match e {
            Evidence::Found(e) => render_event(&mut out, e, "  "),
            Evidence::Missing { event_id, .. } => render_missing(&mut out, event_id, "  "),
        }
    }
    match &t.recipients {
        None => out.push_str("recipients: give --broker-audit to list who received it\n"),
        Some(r) if r.is_empty() => out.push_str("recipients: none recorded\n"),
        Some(r) => {
            out.push_str("received by:\n");
            for x in r {
                out.push_str(&format!("  {}  {}  at {}\n", x.identity, x.state, x.at));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_trace_of_an_erased_patients_alert_says_it_was_erased_and_keeps_its_ids() {
        use vitalmq_bridge::store::{Commit, NewAlert};
        let dir = tempfile::tempdir().expect("tempdir");
        let provider =
            vitalmq_keyring::LocalKeyFile::create(&dir.path().join("kek.json")).expect("kek");
        let keyring = std::sync::Arc::new(
            vitalmq_keyring::Keyring::open(
                &dir.path().join(vitalmq_keyring::KEYRING_FILE),
                std::sync::Arc::new(provider),
            )
            .expect("keyring"),
        );
        let mut store = Store::open(dir.path())
            .expect("store")
            .with_keyring(keyring.clone());
        let body = json!({"alert_id": "al-1", "kind": "clinical", "rule": "spo2-low",
            "device": "dev-00001", "patient_ref": "pt-a", "state": "open",
            "evidence": ["ev1-x"]});
        store
            .commit(&Commit {
                alerts: vec![NewAlert {
                    alert_id: "al-1".into(),
                    state: "open".into(),
                    kind: "clinical".into(),
                    topic: "alerts/site-01/review/dev-00001".into(),
                    device: Some("dev-00001".into()),
                    rule: Some("spo2-low".into()),
                    created_at_ms: 7,
                    body: body.to_string(),
                    level: 0,
                }],
                ..Commit::default()
            })
            .expect("commit");
        let readable = render(&build(&store, "al-1", None).expect("trace").expect("found"));
        assert!(readable.contains("patient pt-a"), "{readable}");
        assert!(!readable.contains("payload:"), "{readable}");
        keyring
            .erase(
                &vitalmq_keyring::Subject::new("pt-a").expect("subject"),
                "test",
                "request",
                1_700_000_000_000,
            )
            .expect("erase");
        let trace = build(&store, "al-1", None).expect("trace").expect("found");
        let text = render(&trace);
        assert!(
            text.contains("payload: erased at 2023-11-14T22:13:20")
                && text.contains("(crypto-shredded)"),
            "{text}"
        );
        assert!(text.starts_with("alert al-1"), "the id stays: {text}");
        assert!(!text.contains("pt-a"), "nothing of the patient: {text}");
        let json = serde_json::to_value(&trace).expect("json");
        assert!(
            json["payload"]
                .as_str()
                .expect("payload")
                .starts_with("erased at")
        );
    }

    fn line(seq: u64, at: &str, event: &str, who: &str, resource: Option<&str>) -> String {
        let mut r = json!({
            "format": "vitalmq-audit/v1", "seq": seq, "at": at, "component": "broker",
            "event": event, "actor": {"identity": who, "cert_serial": format!("S{seq}")},
            "prev": "", "hash": "",
        });
        if let Some(id) = resource {
            r["resource"] = json!(id);
            r["reason"] = json!("open");
        }
        r.to_string()
    }

    fn log(lines: &[String]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        std::io::Write::write_all(&mut f, (lines.join("\n") + "\n").as_bytes()).expect("write");
        f
    }

    const DEV1: &str = "spiffe://td/device/dev-1";
    const DEV12: &str = "spiffe://td/device/dev-12";
    const OPS: &str = "spiffe://td/operator/ops-01";

    #[test]
    fn reads_only_the_wanted_device_and_alert() {
        let f = log(&[
            line(0, "2030-01-01T00:00:00Z", "connection_accepted", DEV1, None),
            line(
                1,
                "2030-01-01T00:00:01Z",
                "connection_accepted",
                DEV12,
                None,
            ),
            line(
                2,
                "2030-01-01T00:00:02Z",
                "alert_delivered",
                OPS,
                Some("al-a"),
            ),
            line(
                3,
                "2030-01-01T00:00:03Z",
                "alert_delivered",
                OPS,
                Some("al-b"),
            ),
            line(4, "2030-01-01T00:00:04Z", "connection_closed", DEV1, None),
            line(
                5,
                "2030-01-02T00:00:00Z",
                "alert_delivered",
                OPS,
                Some("al-a"),
            ),
        ]);
        let wanted = Wanted::new(vec!["dev-1".into()], Some("al-a".into()), None);
        let audit = BrokerAudit::read(f.path(), &wanted).expect("read");
        // dev-12 shares dev-1's prefix but is another device.
        assert_eq!(audit.connections.len(), 1);
        assert_eq!(audit.connections[0].identity, DEV1);
        assert_eq!(audit.deliveries.keys().collect::<Vec<_>>(), ["al-a"]);
        // A delivery long after the change is still found (alerts read to the end).
        assert_eq!(audit.deliveries["al-a"].len(), 2);
        assert!(
            audit
                .publisher("dev-1", "2030-01-01T00:00:00.500Z")
                .is_some()
        );
        assert!(audit.publisher("dev-12", "2030-01-01T00:00:05Z").is_none());
    }

    #[test]
    fn an_event_trace_stops_after_its_time() {
        let f = log(&[
            line(0, "2030-01-01T00:00:00Z", "connection_accepted", DEV1, None),
            line(
                1,
                "2030-01-01T00:10:00.123Z",
                "connection_accepted",
                DEV1,
                None,
            ),
            line(2, "2030-01-01T00:10:01Z", "connection_accepted", DEV1, None),
            "not a record, never read".to_owned(),
        ]);
        let wanted = Wanted::new(
            vec!["dev-1".into()],
            None,
            Some("2030-01-01T00:10:00".into()),
        );
        let audit = BrokerAudit::read(f.path(), &wanted).expect("read");
        let times: Vec<&str> = audit
            .connections
            .iter()
            .map(|c| c.connected_at.as_str())
            .collect();
        // Same second as the bound: kept (the bound is to the second).
        assert_eq!(times, ["2030-01-01T00:00:00Z", "2030-01-01T00:10:00.123Z"]);
        assert_eq!(
            line_time(&line(7, "2030-01-01T00:10:01Z", "x", DEV1, None)),
            Some("2030-01-01T00:10:01")
        );
    }

    /// What the fixture-pinned test (`tests/bridge_alerts.rs`) cannot reach: an
    /// operational alert (no rule, severity or values), evidence the store lacks, and a
    /// broker log without deliveries of it.
    #[test]
    fn unknown_fields_and_missing_evidence_keep_their_shape() {
        let body = json!({"alert_id": "al-op", "kind": "operational", "device": "dev-1",
            "site": "site-1", "policy_sha256": "ab", "evidence": ["ev1-gone"], "raised_at": null});
        let b = AlertBody::of(&body);
        let trace = Trace::Alert(Box::new(AlertTrace {
            payload: None,
            alert_id: "al-op".into(),
            rule: b.rule,
            rule_version: b.rule_version,
            policy_sha256: b.policy_sha256.clone(),
            device: b.device,
            site: b.site,
            patient_ref: b.patient_ref,
            fw: b.fw,
            model: b.model,
            changes: vec![Change {
                state: "open".into(),
                severity: b.severity,
                topic: "alerts/site-1/ops/dev-1".into(),
                raised_at: b.raised_at,
                recorded_at: rfc3339(1_000),
                value: b.value,
                threshold: Some(Number::from_f64(90.0).expect("finite")),
                rule_version: None,
                policy_sha256: b.policy_sha256,
                escalation_level: None,
                unacknowledged: false,
                ack: None,
            }],
            evidence: vec![Evidence::Missing {
                event_id: "ev1-gone".into(),
                missing: true,
            }],
            recipients: Some(Vec::new()),
        }));
        assert_eq!(
            serde_json::to_string(&trace).expect("json"),
            r#"{"kind":"alert","alert_id":"al-op","rule":null,"rule_version":null,"policy_sha256":"ab","device":"dev-1","site":"site-1","patient_ref":null,"fw":null,"model":null,"changes":[{"state":"open","severity":null,"topic":"alerts/site-1/ops/dev-1","raised_at":null,"recorded_at":"1970-01-01T00:00:01Z","value":null,"threshold":90.0,"rule_version":null,"policy_sha256":"ab"}],"evidence":[{"event_id":"ev1-gone","missing":true}],"recipients":[]}"#
        );
        assert_eq!(
            render(&trace),
            "alert al-op  rule - version -  policy sha256 ab\n  device dev-1 at site-1  patient -  fw -  model -\n\
             state changes:\n  open       -       value - threshold 90.0  raised -  recorded 1970-01-01T00:00:01Z  rule v-\n\
             evidence (1 events):\n  event ev1-gone  device - epoch - seq -  sequence -\n\
             \x20   observed -  received -  fw -  model -  schema -\n\
             \x20   verified: kid - -  raw sha256 - (- bytes)  topic -\n\
             \x20   raw bytes: bridge store -\n\
             \x20   normalized by -  consent -  processing policy -\n\
             \x20   publisher: -\nrecipients: none recorded\n"
        );
    }

    /// An acknowledged, then unacknowledged-escalated alert shows who acknowledged it,
    /// when, and each escalation level.
    #[test]
    fn acknowledgements_and_escalation_levels_are_shown() {
        let change = |body: Json, state: &str| {
            Change::of(
                state,
                "alerts/site-1/urgent/dev-1",
                1_000,
                &AlertBody::of(&body),
            )
        };
        let up = change(
            json!({"severity": "urgent", "state": "escalated", "reason": "unacknowledged", "escalation_level": 1}),
            "escalated",
        );
        let acked = change(
            json!({"severity": "urgent", "state": "acknowledged", "escalation_level": 1,
                "ack": {"by": "spiffe://d/integrator/int-1", "at": "2024-06-13T06:35:00.000Z"}}),
            "acknowledged",
        );
        let j = serde_json::to_value(&acked).expect("json");
        assert_eq!(j["ack"]["by"], "spiffe://d/integrator/int-1");
        assert_eq!(
            serde_json::to_value(&up).expect("json")["unacknowledged"],
            true
        );
        let trace = Trace::Alert(Box::new(AlertTrace {
            payload: None,
            alert_id: "al-1".into(),
            rule: Some("no-data".into()),
            rule_version: None,
            policy_sha256: None,
            device: None,
            site: None,
            patient_ref: None,
            fw: None,
            model: None,
            changes: vec![up, acked],
            evidence: Vec::new(),
            recipients: None,
        }));
        let text = render(&trace);
        assert!(
            text.contains("escalation level 1  (not acknowledged in time)"),
            "{text}"
        );
        assert!(
            text.contains(
                "acknowledged by spiffe://d/integrator/int-1 at 2024-06-13T06:35:00.000Z"
            ),
            "{text}"
        );
    }
}
