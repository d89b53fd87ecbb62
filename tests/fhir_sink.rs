//! The FHIR sink end to end: broker, bridge with a `kind = "fhir"` sink, simulated
//! devices, and a stand-in FHIR server (`tests/py/fhir_server.py`: OAuth 2.0 client
//! credentials, every resource validated with the `fhir.resources` R4B models,
//! conditional creates honoured). Through a lost answer (the server applied a
//! transaction, the bridge never heard), an outage (503) and a `kill -9` of the bridge,
//! the server ends with every accepted reading's Observations, each resource stored
//! exactly once, and zero validation errors.

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::os::unix::fs::OpenOptionsExt as _;
use std::process::Command;
use std::time::Duration;

use common::{
    Rig, Spawned, audit_records, desaturation, has_fields, recent_device_time_origin,
    reported_addr, run, sim_summary_all_receipted, wait_until,
};
use serde_json::Value as Json;

const CLIENT_ID: &str = "bridge-01";
const SECRET: &str = "s3cret&with:odd=chars";
const READY: &str = "fhir listening on ";

/// `tests/py/fhir_server.py` on 127.0.0.1, tokens living `ttl_s`; killed on drop.
struct FhirServer {
    _process: Spawned,
    port: u16,
}

impl FhirServer {
    fn start(secret_file: &std::path::Path, ttl_s: u32) -> Self {
        let probe = run(
            Command::new("python3").args(["-c", "import fhir.resources.R4B"]),
            Duration::from_secs(30),
        );
        assert!(
            probe.success,
            "fhir.resources is not installed (scripts/test installs it): {}",
            probe.all()
        );
        let process = Spawned::start(
            Command::new("python3")
                .arg(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/py/fhir_server.py"
                ))
                .arg(CLIENT_ID)
                .arg(secret_file)
                .arg(ttl_s.to_string()),
        );
        assert!(
            process.wait_output(Duration::from_secs(30), |out| {
                reported_addr(out, READY).is_some() || out.contains("Error")
            }),
            "the FHIR server did not start: {}",
            process.all()
        );
        let port = reported_addr(&process.stdout(), READY)
            .unwrap_or_else(|| panic!("the FHIR server did not start: {}", process.all()))
            .port();
        Self {
            _process: process,
            port,
        }
    }

    /// One HTTP/1.0 request to the server; the JSON body of its answer.
    fn call(&self, method: &str, path: &str) -> Json {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(s, "{method} {path} HTTP/1.0\r\nContent-Length: 0\r\n\r\n").expect("request");
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("answer");
        let (_, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"))
    }

    fn dump(&self) -> Json {
        self.call("GET", "/_dump")
    }
}

fn sink(port: u16) -> String {
    format!(
        "[[sinks]]\nkind = \"fhir\"\nname = \"ehr\"\nbase_url = \"http://127.0.0.1:{port}/fhir\"\n\
         token_url = \"http://127.0.0.1:{port}/token\"\nclient_id = \"{CLIENT_ID}\"\n\
         client_secret_file = \"fhir.secret\"\nscope = \"system/*.write\"\n\
         batch_max_events = 20\nbatch_max_age_ms = 200\ntimeout_ms = 3000\n"
    )
}

/// The client secret, owner-only, in the rig's directory (where [`sink`] names it).
fn write_secret(rig: &Rig) -> std::path::PathBuf {
    let secret = rig.dir().join("fhir.secret");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&secret)
        .and_then(|mut f| f.write_all(format!("{SECRET}\n").as_bytes()))
        .expect("secret file");
    secret
}

/// What the server stored, checked: nothing refused by validation, nothing stored
/// twice, every create conditional.
fn assert_clean(dump: &Json) {
    assert_eq!(dump["validation_errors"], Json::Array(vec![]), "{dump}");
    assert_eq!(
        dump["refused_validation"], 0,
        "zero validation errors: {dump}"
    );
    assert_eq!(dump["unconditional"], 0, "every create conditional: {dump}");
    assert_eq!(
        dump["refused_unsupported"], 0,
        "nothing a real server refuses (chained searches, unresolvable references): {dump}"
    );
    let per_identifier = dump["per_identifier"].as_object().expect("per_identifier");
    let twice: Vec<_> = per_identifier.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        twice.is_empty(),
        "{} stored more than once, e.g. {:?}",
        twice.len(),
        twice.first()
    );
    assert_eq!(
        per_identifier.len() as u64,
        dump["created"].as_u64().expect("created"),
        "every resource created under its identifier"
    );
}

#[test]
fn fhir_sink_delivers_every_reading_once_through_a_lost_answer_an_outage_and_a_kill() {
    let rig = Rig::start(vitalmq_bin!(), "fhir-sink", 2, |_| {});
    let secret = write_secret(&rig);
    // Tokens live 2 s: the bridge fetches new ones throughout the run.
    let server = FhirServer::start(&secret, 2);
    let mut bridge = rig.bridge("", &sink(server.port));
    let mut sim = rig.sim(2, 160);

    wait_until(Duration::from_secs(30), "transactions arrive", || {
        server.dump()["transactions"].as_u64() >= Some(2)
    });
    // The server applies a transaction and the answer is lost: the bridge must send
    // it again, and the server answer 200s rather than store it twice.
    server.call("POST", "/_down?mode=lost");
    wait_until(Duration::from_secs(20), "an answer lost", || {
        server.dump()["lost"].as_u64() >= Some(1)
    });
    // Then an outage: the bridge reports the sink down and keeps the backlog.
    server.call("POST", "/_down?mode=503");
    let audit = rig.data().join("audit.jsonl");
    wait_until(Duration::from_secs(20), "the outage audited", || {
        audit_records(&audit)
            .iter()
            .any(|r| has_fields(r, &[("/event", "sink_failed"), ("/resource", "ehr")]))
    });
    server.call("POST", "/_up");
    wait_until(Duration::from_secs(20), "delivery resumed", || {
        audit_records(&audit)
            .iter()
            .any(|r| has_fields(r, &[("/event", "sink_recovered"), ("/resource", "ehr")]))
    });

    // kill -9 with a transaction the server applied but the bridge never saw
    // confirmed (its answer lost), then the same bridge again: it resumes from its
    // durable cursor, so it must send that transaction again and find what it created.
    let lost = server.dump()["lost"].as_u64().expect("lost");
    server.call("POST", "/_down?mode=lost");
    wait_until(
        Duration::from_secs(20),
        "an answer lost before the kill",
        || server.dump()["lost"].as_u64() > Some(lost),
    );
    bridge.process.kill9();
    // A request the killed bridge had in flight may still be applied: the snapshot is
    // taken once the server's counters have stood still for a few polls.
    let (mut at_kill, mut still) = (server.dump(), 0);
    wait_until(
        Duration::from_secs(10),
        "the server quiet after the kill",
        || {
            let now = server.dump();
            still = if now == at_kill { still + 1 } else { 0 };
            at_kill = now;
            still >= 5
        },
    );
    server.call("POST", "/_up");
    let log_before = bridge.process.all();
    let bridge = rig.bridge("", &sink(server.port));
    sim_summary_all_receipted(&mut sim);
    let st = rig.wait_stats(Duration::from_secs(30), "everything sent to FHIR", |s| {
        s["sinks"]["ehr"] == s["head"]
    });

    let dump = server.dump();
    assert_clean(&dump);
    assert!(
        dump["existing"].as_u64() > at_kill["existing"].as_u64(),
        "after the kill the restarted bridge sent the unconfirmed batch again and found \
         what it had created: at the kill {at_kill}, now {dump}"
    );
    assert_eq!(dump["resources"]["Device"], 2, "{dump}");

    // Every accepted reading has its Observations, and no other reading does.
    let observed: std::collections::BTreeSet<String> = dump["observations"]
        .as_array()
        .expect("observations")
        .iter()
        .flat_map(|ids| ids.as_array().cloned().unwrap_or_default())
        .filter_map(|i| {
            i.as_str()?
                .strip_prefix("urn:vitalmq:observation|")?
                .split_once('/')
                .map(|(event, _)| event.to_owned())
        })
        .collect();
    // The simulator sends vitals readings only (`--count` telemetry messages each).
    let readings: std::collections::BTreeSet<String> = rig
        .rows("events")
        .iter()
        .map(|e| e["event_id"].as_str().expect("event_id").to_owned())
        .collect();
    assert_eq!(
        readings.len() as u64,
        st["events"].as_u64().expect("events")
    );
    assert_eq!(readings.len(), 2 * 160, "every message accepted");
    assert_eq!(observed, readings, "every reading in FHIR");
    assert_eq!(
        dump["resources"]["Provenance"].as_u64(),
        Some(readings.len() as u64),
        "one Provenance (with the device signature) per reading"
    );
    for log in [log_before, bridge.process.all()] {
        assert!(!log.contains(SECRET), "the client secret never in the log");
    }
}

/// `[alerts] fhir = ["ehr"]`: a desaturation's clinical alert reaches the FHIR server
/// as a DetectedIssue with a Communication and a Provenance per state change, valid,
/// each once; the sink's readings beside it.
#[test]
fn fhir_alert_handler_records_a_desaturation() {
    let rig = Rig::start(vitalmq_bin!(), "fhir-alerts", 1, |_| {});
    let secret = write_secret(&rig);
    let server = FhirServer::start(&secret, 60);
    let rules =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/examples/rules.toml");
    let alerts = format!(
        "[alerts]\nrules = \"{}\"\nfhir = [\"ehr\"]\n\
         publisher = {{ client_id = \"bridge-01-alerts\", cert = \"pki/identities/bridge/bridge-01-alerts.pem\", key = \"pki/identities/bridge/bridge-01-alerts.key.pem\" }}\n",
        rules.display()
    );
    let bridge = rig.bridge("", &(sink(server.port) + &alerts));
    // Signed with dev-00001's key, device clock ten minutes ago (inside the rules'
    // clock limits): the shipped spo2-low rule opens, then the recovery resolves it.
    let t0_ms = recent_device_time_origin();
    for ((t_s, spo2), seq) in desaturation().into_iter().zip(0u64..) {
        let ts = (t0_ms + t_s * 1000).to_string();
        let spo2 = format!("spo2={spo2}");
        let args = ["--ts", &ts, "--m", &spo2, "--m", "pulse=72", "--q", "0.95"];
        let bytes = rig.sign("dev-00001", "dev-00001", 1, seq, &args);
        rig.mosquitto_pub("device", "dev-00001", "devices/dev-00001/telemetry", &bytes);
    }
    let readings = desaturation().len() as u64;
    // spo2-falling and spo2-low open, escalate and resolve: every change of both sent.
    let st = rig.wait_stats(Duration::from_secs(30), "readings and alerts sent", |s| {
        s["events"] == readings
            && s["sinks"]["ehr"] == s["head"]
            && s["alerts"]["clinical/resolved"].as_u64() >= Some(1)
            && s["alert_handlers"]["fhir:ehr"] == s["alert_handlers"]["mqtt"]
    });
    let alerts = rig.rows("alerts");
    assert_eq!(
        Some(alerts.len() as u64),
        st["alert_handlers"]["fhir:ehr"].as_u64(),
        "every change went through the fhir handler: {st}"
    );
    let alert_ids: std::collections::BTreeSet<&str> = alerts
        .iter()
        .map(|a| a["alert_id"].as_str().expect("alert_id"))
        .collect();
    let dump = server.dump();
    assert_clean(&dump);
    let keys: Vec<&String> = dump["per_identifier"]
        .as_object()
        .expect("per_identifier")
        .keys()
        .collect();
    assert!(
        keys.iter()
            .any(|k| k.starts_with("DetectedIssue|identifier=urn:vitalmq:alert|")),
        "{keys:?}"
    );
    assert_eq!(
        dump["resources"]["DetectedIssue"].as_u64(),
        Some(alert_ids.len() as u64),
        "one DetectedIssue per alert: {dump}"
    );
    assert_eq!(
        dump["resources"]["Communication"].as_u64(),
        Some(alerts.len() as u64),
        "one Communication per state change: {dump}"
    );
    assert_eq!(
        dump["resources"]["Provenance"].as_u64(),
        Some(readings + alerts.len() as u64),
        "a Provenance per reading and per alert change: {dump}"
    );
    assert!(
        dump["resources"]["Observation"].as_u64() >= Some(2 * readings),
        "spo2 and pulse of every reading: {dump}"
    );
    assert!(!bridge.process.all().contains(SECRET));
}

/// One HTTP/1.0 request with headers and a body to the stand-in server: (status, body).
fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> (u16, Json) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut head = format!(
        "{method} {path} HTTP/1.0\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).expect("request");
    s.write_all(body).expect("body");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("answer");
    let (status_line, rest) = answer.split_once("\r\n").expect("an HTTP answer");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let (_, body) = rest.split_once("\r\n\r\n").expect("a body");
    (status, serde_json::from_str(body).unwrap_or(Json::Null))
}

/// A stand-in server and a bearer token from it (the directory holds its secret).
fn server_with_token() -> (tempfile::TempDir, FhirServer, String) {
    use base64::Engine as _;
    let dir = tempfile::tempdir().expect("tmp");
    let secret = dir.path().join("fhir.secret");
    std::fs::write(&secret, SECRET).expect("secret");
    let server = FhirServer::start(&secret, 300);
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{SECRET}"));
    let (status, token) = http(
        server.port,
        "POST",
        "/token",
        &[
            ("Authorization", format!("Basic {basic}")),
            ("Content-Type", "application/x-www-form-urlencoded".into()),
        ],
        b"grant_type=client_credentials",
    );
    assert_eq!(status, 200, "{token}");
    let bearer = format!("Bearer {}", token["access_token"].as_str().expect("token"));
    (dir, server, bearer)
}

/// POSTs a transaction Bundle; its answer must be 200.
fn transact(server: &FhirServer, bearer: &str, bundle: &Json) {
    let body = serde_json::to_vec(bundle).expect("json");
    let (status, answer) = http(
        server.port,
        "POST",
        "/fhir",
        &[
            ("Authorization", bearer.to_owned()),
            ("Content-Type", "application/fhir+json".into()),
        ],
        &body,
    );
    assert_eq!(status, 200, "{answer}");
}

fn test_event(m: Json) -> vitalmq_fhir::event::Event {
    vitalmq_fhir::event::Event::from_json(&serde_json::json!({
        "event_id": "ev1-0123", "device": "dev-1", "site": "site-01",
        "patient_ref": "pt-aaaa1111", "epoch": 1, "seq": 7, "type": "vitals",
        "ts": 1_763_726_405_123u64, "observed_at": "2025-11-21T12:00:05.123Z",
        "received_at": "2025-11-21T12:00:05.2Z", "m": m, "q": null, "fw": "", "model": null,
        "provenance": {"kid": "dev-1", "alg": "EdDSA", "raw_sha256": "aa".repeat(32),
            "publisher": "spiffe://demo.vitalmq/device/dev-1",
            "bridge": "spiffe://demo.vitalmq/bridge/b-1", "transformation": "vitalmq-normalize/2",
            "consent": "care"},
    }))
    .expect("event")
}

/// The sink sent a reading with its signed Provenance; later an export of the same
/// reading, its raw message purged by then, is loaded into the same server: the
/// unsigned Provenance is added next to the signed one, which stays current.
#[test]
fn a_purged_export_never_replaces_the_signed_provenance() {
    let (_dir, server, bearer) = server_with_token();
    let event = test_event(serde_json::json!({"spo2": 95}));
    let mut signed = vitalmq_fhir::bundle::BundleBuilder::new();
    signed.reading(&event, b"\xd2\x84cose").expect("reading");
    transact(&server, &bearer, &signed.transaction());
    let mut purged = vitalmq_fhir::bundle::BundleBuilder::for_export();
    purged.reading_raw_purged(&event).expect("reading");
    transact(&server, &bearer, &purged.transaction());
    let dump = server.dump();
    assert_clean(&dump);
    assert_eq!(dump["resources"]["Provenance"], 2, "{dump}");
    assert_eq!(dump["updated"], 0, "nothing replaced: {dump}");
    assert_eq!(dump["resources"]["Observation"], 1, "{dump}");
}

/// A metric is any text a device names: `spo2,x` must not search as `spo2` OR `x`
/// (that finds the reading's `spo2` and never creates `spo2,x`), `&#%+=` must not break
/// the query, an empty name or firmware must not make an invalid R4 code or string (a
/// 400 that would stick the batch). The stand-in parses the searches as a real server
/// does (URL-decoding, OR on unescaped `,`, escapes; 412 on two matches).
#[test]
fn fhir_searches_are_escaped_and_odd_names_are_valid_r4() {
    let (_dir, server, bearer) = server_with_token();
    let event = test_event(serde_json::json!(
        {"spo2": 95, "spo2,x": 1, "a&b#c%+=": 2, "": 3, "a  b": 4}
    ));
    let mut b = vitalmq_fhir::bundle::BundleBuilder::new();
    assert_eq!(b.reading(&event, b"x").expect("reading"), 5);
    // Twice: the second time every conditional create finds its one match.
    for _ in 0..2 {
        transact(&server, &bearer, &b.transaction());
    }
    let dump = server.dump();
    assert_clean(&dump);
    assert_eq!(dump["resources"]["Observation"], 5, "{dump}");
    assert_eq!(
        dump["existing"], 5,
        "the second round found each one: {dump}"
    );
}
