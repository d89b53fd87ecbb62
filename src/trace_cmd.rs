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
use serde_json::{Value as Json, json};
use vitalmq_audit::{AuditRecord, Event};
use vitalmq_bridge::sink::object::PartitionKey;
use vitalmq_bridge::store::Store;
use vitalmq_policies::{Role, SpiffeId};

#[derive(Debug, clap::Args)]
pub struct TraceArgs {
    /// An alert id (`al-...`) or an event id (`ev1-...`).
    id: String,
    /// The bridge's data directory.
    #[arg(long)]
    data: PathBuf,
    /// The broker's audit log: adds the publisher's certificate and the recipients.
    #[arg(long)]
    broker_audit: Option<PathBuf>,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: TraceArgs) -> anyhow::Result<ExitCode> {
    let store = crate::bridge_cmd::open_existing(&args.data)?;
    let mut action = crate::operator_audit::Action::new(
        "trace",
        crate::operator_audit::log_path(crate::operator_audit::data_dir_log(&args.data)),
    )
    .resource(Some(args.id.clone()))
    .detail("data_dir", crate::operator_audit::absolute(&args.data));
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

fn trace(args: &TraceArgs, store: &Store) -> anyhow::Result<ExitCode> {
    let broker = match &args.broker_audit {
        Some(p) => Some(BrokerAudit::read(p, &wanted(store, &args.id)?)?),
        None => None,
    };
    let trace = if args.id.starts_with("al-") {
        trace_alert(store, &args.id, broker.as_ref())?
    } else {
        trace_event(store, &args.id, broker.as_ref())?
    };
    let Some(trace) = trace else {
        eprintln!("{}: not found in {}", args.id, store.path().display());
        return Ok(ExitCode::from(1));
    };
    if args.json {
        println!("{trace}");
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
    /// Accepted connections: (identity, time, certificate serial, certificate SHA-256).
    connections: Vec<(String, String, Option<String>, Option<String>)>,
    /// Alert deliveries: alert id -> (identity, state, time).
    deliveries: BTreeMap<String, Vec<(String, String, String)>>,
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
                    audit
                        .connections
                        .push((who, r.at, actor.cert_serial, actor.cert_sha256));
                }
            } else if r.event == Event::AlertDelivered
                && let Some(id) = r.resource
                && wanted.alert.as_deref() == Some(id.as_str())
            {
                let state = r.reason.unwrap_or_default();
                audit
                    .deliveries
                    .entry(id)
                    .or_default()
                    .push((who, state, r.at));
            }
        }
        Ok(audit)
    }

    /// The last accepted connection of `device` at or before `at` (RFC 3339).
    fn publisher(&self, device: &str, at: &str) -> Option<Json> {
        // Compared as times: RFC 3339 text with and without fractional seconds does not
        // sort as text ("...:00Z" > "...:00.5Z").
        let parse = |t: &str| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        };
        let at = parse(at)?;
        self.connections
            .iter()
            .rfind(|(who, when, _, _)| {
                device_of(who).as_deref() == Some(device) && parse(when).is_some_and(|w| w <= at)
            })
            .map(|(who, when, serial, sha)| {
                json!({"identity": who, "connected_at": when, "cert_serial": serial, "cert_sha256": sha})
            })
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
            .and_then(|h| h.body["device"].as_str().map(str::to_owned));
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
        vec![e.device.to_string()],
        None,
        rfc3339(until).as_str().map(|t| t[..19].to_owned()),
    ))
}

fn rfc3339(ms: u64) -> Json {
    vitalmq_bridge::normalize::rfc3339_ms(ms).map_or(Json::Null, Json::String)
}

/// The chain of one event: message, verdicts, normalized form, where the bytes are.
fn event_chain(
    store: &Store,
    event_id: &str,
    near: Option<i64>,
    broker: Option<&BrokerAudit>,
) -> anyhow::Result<Option<Json>> {
    let Some(detail) = store.event_detail_near(event_id, near)? else {
        return Ok(None);
    };
    let received = rfc3339(detail.received_at_ms);
    let position = detail.position;
    let partition = PartitionKey::new(
        detail.site.as_str(),
        detail.device.as_str(),
        detail.received_at_ms,
    )
    .map(|key| key.name())
    .unwrap_or_default();
    let sinks: Vec<Json> = store
        .sinks_past(position)?
        .into_iter()
        .map(|(sink, _)| {
            json!({
                "sink": sink,
                "partition": partition,
                "note": "objects named <first>-<last> by outbox position; this event is position ".to_owned() + &position.to_string(),
            })
        })
        .collect();
    let mut e = serde_json::to_value(&detail)?;
    e["received_at"] = received.clone();
    e["raw"]["stored_in"] = json!({"bridge_store": format!("raw_messages row {}", detail.raw.store_row), "sinks": sinks});
    if let Some(b) = broker
        && let Some(at) = received.as_str()
    {
        e["publisher_certificate"] = b
            .publisher(detail.device.as_str(), at)
            .unwrap_or(Json::Null);
    }
    Ok(Some(e))
}

fn trace_event(
    store: &Store,
    event_id: &str,
    broker: Option<&BrokerAudit>,
) -> anyhow::Result<Option<Json>> {
    let Some(event) = event_chain(store, event_id, None, broker)? else {
        return Ok(None);
    };
    let alerts: Vec<Json> = store
        .alerts_citing(event_id)?
        .into_iter()
        .map(|a| json!({"alert_id": a.alert_id, "state": a.state, "rule": a.body["rule"]}))
        .collect();
    Ok(Some(
        json!({"kind": "event", "event": event, "cited_by_alerts": alerts}),
    ))
}

fn trace_alert(
    store: &Store,
    alert_id: &str,
    broker: Option<&BrokerAudit>,
) -> anyhow::Result<Option<Json>> {
    let history = store.alert_history(alert_id)?;
    let Some(first) = history.first() else {
        return Ok(None);
    };
    let body = &first.body;
    // Each evidence id with the time of the first change citing it: the event was
    // received shortly before, which tells the store where to look first.
    let mut evidence_ids: Vec<(String, u64)> = Vec::new();
    for h in &history {
        for id in h.body["evidence"].as_array().into_iter().flatten() {
            if let Some(id) = id.as_str()
                && !evidence_ids.iter().any(|(e, _)| e == id)
            {
                let at = h.recorded_at_ms;
                evidence_ids.push((id.to_owned(), at));
            }
        }
    }
    let mut evidence = Vec::new();
    for (id, at) in &evidence_ids {
        let near = store.position_near_time(*at)?;
        evidence.push(
            event_chain(store, id, Some(near), broker)?
                .unwrap_or_else(|| json!({"event_id": id, "missing": true})),
        );
    }
    let changes: Vec<Json> = history
        .iter()
        .map(|h| {
            json!({
                "state": h.state, "severity": h.body["severity"], "topic": h.topic,
                "raised_at": h.body["raised_at"], "recorded_at": rfc3339(h.recorded_at_ms),
                "value": h.body["value"], "threshold": h.body["threshold"],
                "rule_version": h.body["rule_version"], "policy_sha256": h.body["policy_sha256"],
            })
        })
        .collect();
    let recipients: Vec<Json> = broker
        .and_then(|b| b.deliveries.get(alert_id))
        .into_iter()
        .flatten()
        .map(|(who, state, at)| json!({"identity": who, "state": state, "at": at}))
        .collect();
    Ok(Some(json!({
        "kind": "alert",
        "alert_id": alert_id,
        "rule": body["rule"],
        "rule_version": body["rule_version"],
        "policy_sha256": body["policy_sha256"],
        "device": body["device"],
        "site": body["site"],
        "patient_ref": body["patient_ref"],
        "fw": body["fw"],
        "model": body["model"],
        "changes": changes,
        "evidence": evidence,
        "recipients": if broker.is_some() { Json::Array(recipients) } else { Json::Null },
    })))
}

fn s(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        Json::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

fn render_event(out: &mut String, e: &Json, indent: &str) {
    let n = &e["normalized"];
    let p = &n["provenance"];
    out.push_str(&format!(
        "{indent}event {}  device {} epoch {} seq {}  sequence {}\n",
        s(&e["event_id"]),
        s(&e["device"]),
        s(&e["epoch"]),
        s(&e["seq"]),
        s(&e["verdict"])
    ));
    out.push_str(&format!(
        "{indent}  observed {}  received {}  fw {}  model {}  schema {}\n",
        s(&n["observed_at"]),
        s(&e["received_at"]),
        s(&n["fw"]),
        s(&n["model"]),
        s(&n["schema"])
    ));
    out.push_str(&format!(
        "{indent}  verified: kid {} {}  raw sha256 {} ({} bytes)  topic {}\n",
        s(&p["kid"]),
        s(&p["alg"]),
        s(&e["raw"]["sha256"]),
        s(&e["raw"]["bytes"]),
        s(&e["raw"]["topic"])
    ));
    out.push_str(&format!(
        "{indent}  raw bytes: bridge store {}{}\n",
        s(&e["raw"]["stored_in"]["bridge_store"]),
        e["raw"]["stored_in"]["sinks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| format!("; sink {} {}", s(&x["sink"]), s(&x["partition"])))
            .collect::<String>()
    ));
    out.push_str(&format!(
        "{indent}  normalized by {}  consent {}  processing policy {}\n",
        s(&p["transformation"]),
        s(&p["consent"]),
        s(&p["processing_policy"])
    ));
    match &e["publisher_certificate"] {
        Json::Null => out.push_str(&format!(
            "{indent}  publisher: {}\n",
            s(&e["raw"]["publisher"])
        )),
        c => out.push_str(&format!(
            "{indent}  publisher: {} (cert serial {}, sha256 {}, connected {})\n",
            s(&c["identity"]),
            s(&c["cert_serial"]),
            s(&c["cert_sha256"]),
            s(&c["connected_at"])
        )),
    }
}

fn render(t: &Json) -> String {
    let mut out = String::new();
    if t["kind"] == "event" {
        render_event(&mut out, &t["event"], "");
        for a in t["cited_by_alerts"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "  evidence of alert {} ({} {})\n",
                s(&a["alert_id"]),
                s(&a["rule"]),
                s(&a["state"])
            ));
        }
        return out;
    }
    out.push_str(&format!(
        "alert {}  rule {} version {}  policy sha256 {}\n  device {} at {}  patient {}  fw {}  model {}\n",
        s(&t["alert_id"]), s(&t["rule"]), s(&t["rule_version"]), s(&t["policy_sha256"]),
        s(&t["device"]), s(&t["site"]), s(&t["patient_ref"]), s(&t["fw"]), s(&t["model"])
    ));
    out.push_str("state changes:\n");
    for c in t["changes"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {:<10} {:<7} value {} threshold {}  raised {}  recorded {}  rule v{}\n",
            s(&c["state"]),
            s(&c["severity"]),
            s(&c["value"]),
            s(&c["threshold"]),
            s(&c["raised_at"]),
            s(&c["recorded_at"]),
            s(&c["rule_version"])
        ));
    }
    let evidence = t["evidence"].as_array().map_or(0, Vec::len);
    out.push_str(&format!("evidence ({evidence} events):\n"));
    for e in t["evidence"].as_array().into_iter().flatten() {
        render_event(&mut out, e, "  ");
    }
    match &t["recipients"] {
        Json::Null => out.push_str("recipients: give --broker-audit to list who received it\n"),
        Json::Array(r) if r.is_empty() => out.push_str("recipients: none recorded\n"),
        Json::Array(r) => {
            out.push_str("received by:\n");
            for x in r {
                out.push_str(&format!(
                    "  {}  {}  at {}\n",
                    s(&x["identity"]),
                    s(&x["state"]),
                    s(&x["at"])
                ));
            }
        }
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(audit.connections[0].0, DEV1);
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
        let times: Vec<&str> = audit.connections.iter().map(|c| c.1.as_str()).collect();
        // Same second as the bound: kept (the bound is to the second).
        assert_eq!(times, ["2030-01-01T00:00:00Z", "2030-01-01T00:10:00.123Z"]);
        assert_eq!(
            line_time(&line(7, "2030-01-01T00:10:01Z", "x", DEV1, None)),
            Some("2030-01-01T00:10:01")
        );
    }
}
