//! The FHIR sink against a scripted HTTP server on 127.0.0.1: the token request, the
//! cache, the 401 refresh, and how answers are classified. The real FHIR server
//! stand-in (`tests/py/fhir_server.py`) drives the end-to-end test.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;
use crate::sink::OutboxRecord;

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

type Script = Arc<dyn Fn(&Seen, usize) -> (u16, String) + Send + Sync>;

/// A server answering each request with `script(request, how many came before on
/// its path)`; the requests it saw.
async fn scripted(script: Script) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let log = Arc::clone(&log);
            let script = Arc::clone(&script);
            tokio::spawn(async move {
                let mut have = Vec::new();
                let mut buf = vec![0u8; 65_536];
                loop {
                    let Ok(n) = socket.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    have.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&have).to_string();
                    let Some(end) = text.find("\r\n\r\n") else {
                        continue;
                    };
                    let mut lines = text[..end].lines();
                    let path = lines
                        .next()
                        .and_then(|l| l.split(' ').nth(1))
                        .unwrap_or("")
                        .to_owned();
                    let headers: Vec<(String, String)> = lines
                        .filter_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            Some((k.trim().to_owned(), v.trim().to_owned()))
                        })
                        .collect();
                    let len: usize = headers
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                        .and_then(|(_, v)| v.parse().ok())
                        .unwrap_or(0);
                    if have.len() < end + 4 + len {
                        continue;
                    }
                    let body = String::from_utf8_lossy(&have[end + 4..end + 4 + len]).to_string();
                    have.drain(..end + 4 + len);
                    let request = Seen {
                        path,
                        headers,
                        body,
                    };
                    let before = {
                        let mut log = log.lock().expect("log");
                        let n = log.iter().filter(|s| s.path == request.path).count();
                        log.push(request.clone());
                        n
                    };
                    let (status, answer) = script(&request, before);
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    if socket.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (base, seen)
}

fn token(n: usize) -> String {
    format!(r#"{{"access_token":"tok-{n}","token_type":"Bearer","expires_in":300}}"#)
}

/// A transaction-response creating every entry of the Bundle in `body`.
fn created(body: &str) -> String {
    let bundle: serde_json::Value = serde_json::from_str(body).expect("bundle");
    let n = bundle["entry"].as_array().map_or(0, Vec::len);
    let entries: Vec<_> = (0..n)
        .map(|_| serde_json::json!({"response": {"status": "201 Created"}}))
        .collect();
    serde_json::json!({"resourceType": "Bundle", "type": "transaction-response", "entry": entries})
        .to_string()
}

fn sink(base: &str, dir: &tempfile::TempDir) -> FhirSink {
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cr:t&\n").expect("secret");
    FhirSink::new(&FhirSinkConfig {
        name: "ehr".into(),
        base_url: format!("{base}/fhir"),
        token_url: format!("{base}/token"),
        client_id: "bridge 01".into(),
        client_secret_file: secret,
        scope: Some("system/*.write".into()),
        ca: None,
        purpose: vitalmq_policies::Purpose::Care,
        batch_max_events: 10,
        batch_max_age_ms: 100,
        timeout_ms: 2_000,
        connect_timeout_ms: 1_000,
    })
    .expect("sink")
}

/// A normalized vitals event (as `normalize.rs` writes it) at outbox position `p`.
fn event_json(p: i64) -> String {
    serde_json::json!({
        "format": "vitalmq-event/v1", "event_id": format!("ev-{p}"), "device": "dev-1",
        "site": "north", "patient_ref": "pt-aaaa1111", "epoch": 1, "seq": p,
        "type": "vitals", "ts": 1_767_225_600_000u64,
        "observed_at": "2026-01-01T00:00:00Z", "received_at": "2026-01-01T00:00:01Z",
        "m": {"spo2": 97, "pulse": 72, "sbp": 120, "dbp": 80}, "q": 0.93, "fw": "5.12.1",
        "model": "arrhythmia-net/2.1.0", "schema": 1, "extra": {},
        "provenance": {"kid": "dev-1", "alg": "EdDSA", "raw_sha256": format!("{p:064x}"),
            "topic": "devices/dev-1/telemetry", "broker": "127.0.0.1:1",
            "publisher": "spiffe://demo.vitalmq/device/dev-1",
            "bridge": "spiffe://demo.vitalmq/bridge/b-1", "sequence": "in_order",
            "transformation": "vitalmq-normalize/2", "consent": "care",
            "processing_policy": null},
    })
    .to_string()
}

fn batch(first: i64, n: i64) -> Batch {
    Batch {
        first,
        last: first + n - 1,
        records: (first..first + n)
            .map(|p| OutboxRecord {
                position: p,
                event_id: format!("ev-{p}"),
                device: "dev-1".into(),
                site: "north".into(),
                epoch: 1,
                seq: p as u64,
                observed_at_ms: 1_767_225_600_000,
                received_at_ms: 1_767_225_601_000,
                topic: "devices/dev-1/telemetry".into(),
                raw: bytes::Bytes::from_static(&[0xf6]),
                normalized_json: event_json(p),
                ingest_patient: None,
            })
            .collect(),
    }
}

/// Client credentials as RFC 6749 asks (Basic auth of the form-urlencoded id and
/// secret, grant type and scope in the form), the token cached across batches and
/// sent as a bearer, every entry a conditional create on its identifier.
#[tokio::test]
async fn a_batch_is_one_transaction_of_conditional_creates_under_a_cached_token() {
    let (base, seen) = scripted(Arc::new(|r: &Seen, n| match r.path.as_str() {
        "/token" => (200, token(n)),
        _ => (200, created(&r.body)),
    }))
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = sink(&base, &dir);
    sink.deliver(&batch(1, 3)).await.expect("first batch");
    sink.deliver(&batch(4, 2)).await.expect("second batch");
    let seen = seen.lock().expect("log").clone();
    let paths: Vec<_> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths, ["/token", "/fhir", "/fhir"], "one token for both");

    let t = &seen[0];
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode("bridge+01:s3cr%3At%26");
    assert_eq!(
        t.header("authorization"),
        Some(format!("Basic {basic}").as_str())
    );
    assert_eq!(
        t.body, "grant_type=client_credentials&scope=system%2F*.write",
        "the secret is in the header only"
    );
    for tx in &seen[1..] {
        assert_eq!(tx.header("authorization"), Some("Bearer tok-0"));
        assert_eq!(tx.header("content-type"), Some("application/fhir+json"));
    }
    let bundle: serde_json::Value = serde_json::from_str(&seen[1].body).expect("bundle");
    assert_eq!(bundle["resourceType"], "Bundle");
    assert_eq!(bundle["type"], "transaction");
    let entries = bundle["entry"].as_array().expect("entries");
    assert!(!entries.is_empty());
    let kinds: Vec<&str> = entries
        .iter()
        .map(|e| e["resource"]["resourceType"].as_str().expect("type"))
        .collect();
    // One Device for the batch, per reading 3 Observations (spo2, pulse, the BP
    // panel) and their Provenance.
    assert_eq!(kinds.iter().filter(|k| **k == "Device").count(), 1);
    assert_eq!(kinds.iter().filter(|k| **k == "Observation").count(), 9);
    assert_eq!(kinds.iter().filter(|k| **k == "Provenance").count(), 3);
    for e in entries {
        let conditional = match e["request"]["method"].as_str() {
            Some("POST") => e["request"]["ifNoneExist"].as_str(),
            Some("PUT") => e["request"]["url"].as_str(),
            _ => None,
        };
        // A Provenance (no identifier in R4) is PUT to its deterministic id.
        let by_id = e["resource"]["id"]
            .as_str()
            .map(|id| format!("Provenance/{id}"));
        assert!(
            conditional.is_some_and(|c| c.starts_with("identifier=urn:vitalmq:")
                || c.contains("?identifier=urn:vitalmq:")
                || Some(c) == by_id.as_deref()),
            "every entry conditional on an identifier or PUT to its id: {e}"
        );
    }
    assert!(
        !format!("{sink:?}").contains("s3cr"),
        "the secret is never printed"
    );
}

/// A refused bearer token is replaced once, and the same transaction sent again.
#[tokio::test]
async fn a_401_fetches_a_new_token_once() {
    let (base, seen) = scripted(Arc::new(|r: &Seen, n| match r.path.as_str() {
        "/token" => (200, token(n)),
        _ if r.header("authorization") == Some("Bearer tok-0") => (401, String::new()),
        _ => (200, created(&r.body)),
    }))
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    sink(&base, &dir)
        .deliver(&batch(1, 2))
        .await
        .expect("delivered with the second token");
    let seen = seen.lock().expect("log").clone();
    let paths: Vec<_> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths, ["/token", "/fhir", "/token", "/fhir"]);
    assert_eq!(seen[1].body, seen[3].body, "the same transaction");

    // A server that refuses every token: refused (a misconfiguration), after one retry.
    let (base, seen) = scripted(Arc::new(|r: &Seen, n| match r.path.as_str() {
        "/token" => (200, token(n)),
        _ => (401, String::new()),
    }))
    .await;
    let e = sink(&base, &dir)
        .deliver(&batch(1, 1))
        .await
        .expect_err("refused");
    assert!(matches!(e, SinkError::Refused { .. }), "{e}");
    assert_eq!(
        seen.lock().expect("log").len(),
        4,
        "one refresh, not a loop"
    );
}

/// Validation errors are refusals (kept, reported, retried by the drain), outages
/// are unavailability; so are refused and failing token endpoints.
#[tokio::test]
async fn answers_are_classified_as_refused_or_unavailable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let oo = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"invalid","expression":["Bundle.entry[0].resource"],"diagnostics":"value 97 bad"}]}"#;
    for (tx_status, token_status, refused) in [
        (400, 200, true),
        (422, 200, true),
        (503, 200, false),
        (500, 200, false),
        (429, 200, false),
        (200, 401, true),
        (200, 400, true),
        (200, 503, false),
    ] {
        let (base, _) = scripted(Arc::new(move |r: &Seen, n| match r.path.as_str() {
            "/token" if token_status == 200 => (200, token(n)),
            "/token" => (token_status, r#"{"error":"invalid_client"}"#.to_owned()),
            _ => (tx_status, oo.to_owned()),
        }))
        .await;
        let e = sink(&base, &dir)
            .deliver(&batch(1, 1))
            .await
            .expect_err("fails");
        assert_eq!(
            matches!(e, SinkError::Refused { .. }),
            refused,
            "{tx_status}/{token_status}: {e}"
        );
        assert!(!e.to_string().contains("97"), "no diagnostics: {e}");
    }
    // Nobody listening: unavailable.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    drop(listener);
    let e = sink(&base, &dir)
        .deliver(&batch(1, 1))
        .await
        .expect_err("down");
    assert!(matches!(e, SinkError::Unavailable { .. }), "{e}");
}

#[test]
fn tokens_are_used_until_shortly_before_they_expire() {
    use std::time::Duration;
    assert_eq!(
        oauth::usable_for(Some(Duration::from_secs(3600))),
        Duration::from_secs(3570)
    );
    assert_eq!(
        oauth::usable_for(Some(Duration::from_secs(60))),
        Duration::from_secs(54)
    );
    assert_eq!(oauth::usable_for(Some(Duration::ZERO)), Duration::ZERO);
}

/// A token that expires at once is fetched again for the next batch.
#[tokio::test]
async fn an_expired_token_is_fetched_again() {
    let (base, seen) = scripted(Arc::new(|r: &Seen, n| match r.path.as_str() {
        "/token" => (
            200,
            format!(r#"{{"access_token":"tok-{n}","token_type":"bearer","expires_in":0}}"#),
        ),
        _ => (200, created(&r.body)),
    }))
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = sink(&base, &dir);
    sink.deliver(&batch(1, 1)).await.expect("first");
    sink.deliver(&batch(2, 1)).await.expect("second");
    let seen = seen.lock().expect("log").clone();
    let auth: Vec<_> = seen
        .iter()
        .filter(|s| s.path == "/fhir")
        .map(|s| s.header("authorization").unwrap_or("").to_owned())
        .collect();
    assert_eq!(auth, ["Bearer tok-0", "Bearer tok-1"]);
}

/// A stored alert change (as the `alerts` table holds it) of `kind`.
fn alert(position: i64, kind: &str, state: &str) -> crate::store::StoredAlert {
    let mut body = serde_json::json!({
        "alert_id": "al-1", "kind": kind, "state": state, "severity": "urgent",
        "rule": "spo2-low", "rule_version": "3", "policy_sha256": "ab12",
        "device": "dev-1", "site": "north", "patient_ref": "pt-aaaa1111",
        "evidence": ["ev-1"], "raised_at": "2026-01-01T00:00:05Z",
    });
    if state == "acknowledged" {
        body["ack"] =
            serde_json::json!({"by": "spiffe://d/integrator/n-1", "at": "2026-01-01T00:01:00Z"});
    }
    crate::store::StoredAlert {
        position,
        alert_id: "al-1".into(),
        state: state.into(),
        topic: "alerts/north/urgent/dev-1".into(),
        body: body.to_string(),
        level: 0,
        created_at_ms: 1_767_225_605_000 + position as u64,
    }
}

/// The `fhir` alert handler: clinical changes as one transaction (DetectedIssue once,
/// the Task at its newest state, a Communication and a Provenance per change);
/// operational alerts never go to the clinical record.
#[tokio::test]
async fn clinical_alert_changes_go_as_one_transaction_and_operational_ones_not_at_all() {
    let (base, seen) = scripted(Arc::new(|r: &Seen, n| match r.path.as_str() {
        "/token" => (200, token(n)),
        _ => (200, created(&r.body)),
    }))
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = sink(&base, &dir);
    sink.deliver_alerts(&[alert(1, "operational", "open")])
        .await
        .expect("nothing to send");
    assert!(seen.lock().expect("log").is_empty(), "not even a token");
    sink.deliver_alerts(&[
        alert(2, "clinical", "open"),
        alert(3, "operational", "open"),
        alert(4, "clinical", "acknowledged"),
    ])
    .await
    .expect("delivered");
    let seen = seen.lock().expect("log").clone();
    let tx = seen
        .iter()
        .find(|s| s.path == "/fhir")
        .expect("a transaction");
    let bundle: serde_json::Value = serde_json::from_str(&tx.body).expect("bundle");
    let kinds: Vec<&str> = bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["resource"]["resourceType"].as_str().expect("type"))
        .collect();
    let count = |t: &str| kinds.iter().filter(|k| **k == t).count();
    assert_eq!(count("DetectedIssue"), 1, "{kinds:?}");
    assert_eq!(count("Communication"), 2, "{kinds:?}");
    assert_eq!(count("Provenance"), 2, "{kinds:?}");
    assert!(count("Task") <= 1, "{kinds:?}");
    assert!(!tx.body.contains("\"operational\""), "no operational alert");
}

/// A registry with `dev-1` of `lot` (hardware model `hm-2`, region `eu-west`).
fn registry_with_lot(lot: &str) -> Arc<vitalmq_policies::DeviceRegistry> {
    let key = vitalmq_envelope::SigningKey::generate(vitalmq_envelope::Algorithm::EdDsa)
        .expect("key")
        .verifying_key()
        .to_hex();
    let text = format!(
        "format = \"vitalmq-registry/v2\"\ntrust_domain = \"t.vitalmq\"\n\
         [[devices]]\nid = \"dev-1\"\nalg = \"EdDSA\"\npublic_key = \"{key}\"\n\
         lot = \"{lot}\"\nhardware_model = \"hm-2\"\nregion = \"eu-west\"\n\
         [[devices.assignments]]\nvalid_from = \"2025-01-01T00:00:00Z\"\npatient_ref = \"pt-aaaa1111\"\nsite = \"north\"\n"
    );
    Arc::new(
        vitalmq_policies::DeviceRegistry::parse(&text, std::path::Path::new("r.toml"))
            .expect("registry"),
    )
}

/// The Device entry of a POSTed transaction Bundle.
fn device_of(body: &str) -> serde_json::Value {
    let bundle: serde_json::Value = serde_json::from_str(body).expect("bundle");
    bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .find(|e| e["resource"]["resourceType"] == "Device")
        .map(|e| e["resource"].clone())
        .expect("a Device")
}

/// The Device carries the lot, hardware model and region of the registry in force when
/// the batch is mapped: a reload between two batches shows in the second.
#[tokio::test]
async fn the_device_carries_the_registry_facts_in_force() {
    let (base, seen) = scripted(Arc::new(|r: &Seen, n| match r.path.as_str() {
        "/token" => (200, token(n)),
        _ => (200, created(&r.body)),
    }))
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (tx, rx) = tokio::sync::watch::channel(registry_with_lot("LOT-A"));
    let sink = sink(&base, &dir).with_registry(rx);
    sink.deliver(&batch(1, 2)).await.expect("first batch");
    tx.send(registry_with_lot("LOT-B")).expect("reload");
    sink.deliver(&batch(3, 1)).await.expect("second batch");
    let seen = seen.lock().expect("log").clone();
    let posted: Vec<&Seen> = seen.iter().filter(|s| s.path == "/fhir").collect();
    assert_eq!(posted.len(), 2);

    let first = device_of(&posted[0].body);
    assert_eq!(first["lotNumber"], "LOT-A");
    assert_eq!(first["modelNumber"], "hm-2");
    assert_eq!(first["property"][0]["type"]["coding"][0]["code"], "region");
    assert_eq!(
        first["property"][0]["valueCode"][0]["coding"][0]["code"],
        "eu-west"
    );
    assert_eq!(device_of(&posted[1].body)["lotNumber"], "LOT-B", "reloaded");

    // Without a registry (or a device it does not list) the Device says nothing of them.
    let bare = bundle::bundle_for(&batch(1, 1), None)
        .expect("maps")
        .expect("a bundle");
    let bare = device_of(&bare.to_string());
    for key in ["lotNumber", "modelNumber", "property"] {
        assert!(bare.get(key).is_none(), "{key}: {bare}");
    }
}

/// A device clock beyond year 9999 maps (dated by the bridge's observation time); a
/// record that cannot be mapped at all is left out: neither holds the batch back.
#[test]
fn an_unmappable_record_never_blocks_the_batch() {
    let mut b = batch(1, 3);
    let mut far: serde_json::Value =
        serde_json::from_str(&b.records[1].normalized_json).expect("json");
    far["ts"] = serde_json::json!(u64::MAX);
    b.records[1].normalized_json = far.to_string();
    b.records[2].normalized_json = "{\"format\": \"vitalmq-event/v1\"}".into();
    let bundle = bundle::bundle_for(&b, None)
        .expect("the batch maps")
        .expect("a bundle");
    let observations: Vec<&serde_json::Value> = bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| &e["resource"])
        .filter(|r| r["resourceType"] == "Observation")
        .collect();
    // spo2, pulse and the BP panel of records 1 and 2; record 3 left out.
    assert_eq!(observations.len(), 6);
    let far_obs: Vec<_> = observations
        .iter()
        .filter(|o| o["identifier"][1]["value"] == "ev-2")
        .collect();
    assert_eq!(far_obs.len(), 3);
    for o in far_obs {
        assert_eq!(o["effectiveDateTime"], "2026-01-01T00:00:00Z");
        assert!(o.to_string().contains(&u64::MAX.to_string()));
    }
}
