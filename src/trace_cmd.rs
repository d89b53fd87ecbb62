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
use vitalmq_bridge::store::Store;

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
        Some(p) => Some(BrokerAudit::read(p)?),
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

/// The parts of the broker audit log a trace needs.
struct BrokerAudit {
    /// Accepted connections: (identity, time, certificate serial, certificate SHA-256).
    connections: Vec<(String, String, Json, Json)>,
    /// Alert deliveries: alert id -> (identity, state, time).
    deliveries: BTreeMap<String, Vec<(String, String, String)>>,
}

impl BrokerAudit {
    fn read(path: &Path) -> anyhow::Result<Self> {
        let file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
        let mut audit = Self {
            connections: Vec::new(),
            deliveries: BTreeMap::new(),
        };
        for line in std::io::BufReader::new(file).lines() {
            let line = line.with_context(|| format!("{}", path.display()))?;
            // Cheap filters first: a day's log is mostly other records.
            let accepted = line.contains("\"connection_accepted\"");
            let delivered = line.contains("\"alert_delivered\"");
            if !(accepted || delivered) {
                continue;
            }
            let Ok(r) = serde_json::from_str::<Json>(&line) else {
                continue;
            };
            let who = r["actor"]["identity"].as_str().unwrap_or("").to_owned();
            let at = r["at"].as_str().unwrap_or("").to_owned();
            if accepted {
                audit.connections.push((
                    who,
                    at,
                    r["actor"]["cert_serial"].clone(),
                    r["actor"]["cert_sha256"].clone(),
                ));
            } else if let Some(id) = r["resource"].as_str() {
                let state = r["reason"].as_str().unwrap_or("").to_owned();
                audit
                    .deliveries
                    .entry(id.to_owned())
                    .or_default()
                    .push((who, state, at));
            }
        }
        Ok(audit)
    }

    /// The last accepted connection of `device` at or before `at` (RFC 3339).
    fn publisher(&self, device: &str, at: &str) -> Option<Json> {
        let suffix = format!("/device/{device}");
        self.connections
            .iter()
            .rfind(|(who, when, _, _)| who.ends_with(&suffix) && when.as_str() <= at)
            .map(|(who, when, serial, sha)| {
                json!({"identity": who, "connected_at": when, "cert_serial": serial, "cert_sha256": sha})
            })
    }
}

fn rfc3339(ms: u64) -> Json {
    vitalmq_bridge::normalize::rfc3339_ms(ms).map_or(Json::Null, Json::String)
}

/// The chain of one event: message, verdicts, normalized form, where the bytes are.
fn event_chain(
    store: &Store,
    event_id: &str,
    broker: Option<&BrokerAudit>,
) -> anyhow::Result<Option<Json>> {
    let Some(mut e) = store.event_detail(event_id)? else {
        return Ok(None);
    };
    let received = rfc3339(e["received_at_ms"].as_u64().unwrap_or(0));
    let position = e["position"].as_i64().unwrap_or(0);
    let sinks: Vec<Json> = store
        .sinks_past(position)?
        .into_iter()
        .map(|(sink, _)| {
            let n = &e["normalized"];
            let date = received.as_str().map(|t| t[..10].to_owned()).unwrap_or_default();
            json!({
                "sink": sink,
                "partition": format!("site={}/device={}/date={date}", n["site"].as_str().unwrap_or(""), n["device"].as_str().unwrap_or("")),
                "note": "objects named <first>-<last> by outbox position; this event is position ".to_owned() + &position.to_string(),
            })
        })
        .collect();
    e["received_at"] = received.clone();
    e["raw"]["stored_in"] = json!({"bridge_store": format!("raw_messages row {}", e["raw"]["store_row"]), "sinks": sinks});
    if let Some(b) = broker
        && let (Some(device), Some(at)) = (e["device"].as_str(), received.as_str())
    {
        e["publisher_certificate"] = b.publisher(device, at).unwrap_or(Json::Null);
    }
    Ok(Some(e))
}

fn trace_event(
    store: &Store,
    event_id: &str,
    broker: Option<&BrokerAudit>,
) -> anyhow::Result<Option<Json>> {
    let Some(event) = event_chain(store, event_id, broker)? else {
        return Ok(None);
    };
    let alerts: Vec<Json> = store
        .alerts_citing(event_id)?
        .into_iter()
        .map(|a| json!({"alert_id": a["alert_id"], "state": a["state"], "rule": a["body"]["rule"]}))
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
    let body = &first["body"];
    let mut evidence_ids: Vec<String> = Vec::new();
    for h in &history {
        for id in h["body"]["evidence"].as_array().into_iter().flatten() {
            if let Some(id) = id.as_str()
                && !evidence_ids.iter().any(|e| e == id)
            {
                evidence_ids.push(id.to_owned());
            }
        }
    }
    let mut evidence = Vec::new();
    for id in &evidence_ids {
        evidence.push(
            event_chain(store, id, broker)?
                .unwrap_or_else(|| json!({"event_id": id, "missing": true})),
        );
    }
    let changes: Vec<Json> = history
        .iter()
        .map(|h| {
            json!({
                "state": h["state"], "severity": h["body"]["severity"], "topic": h["topic"],
                "raised_at": h["body"]["raised_at"], "recorded_at": rfc3339(h["recorded_at_ms"].as_u64().unwrap_or(0)),
                "value": h["body"]["value"], "threshold": h["body"]["threshold"],
                "rule_version": h["body"]["rule_version"], "policy_sha256": h["body"]["policy_sha256"],
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
