//! The shared test vectors (`../shared/vectors`, an independent pycose-generated set):
//! every telemetry vector through the full profile verifier, every cose-wg example
//! through the signature layer alone.

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::{Value as Json, json};
use vitalmq_envelope::{
    Algorithm, DeviceId, MessageType, ReasonClass, VerifyingKey, verify, verify_bytes,
    verify_signature_only,
};

fn vectors_dir() -> PathBuf {
    std::env::var_os("VITALMQ_VECTORS").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/vectors"),
        PathBuf::from,
    )
}

fn read_json(path: &std::path::Path) -> Json {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn json_files(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}

fn hex_field(v: &Json, field: &str) -> Vec<u8> {
    hex::decode(
        v[field]
            .as_str()
            .unwrap_or_else(|| panic!("{field} missing")),
    )
    .expect("hex")
}

/// The registry of `keys.json`, as the bridge would hold it.
fn registry() -> HashMap<DeviceId, VerifyingKey> {
    let keys = read_json(&vectors_dir().join("keys.json"));
    keys["registry"]
        .as_array()
        .expect("registry array")
        .iter()
        .map(|k| {
            let alg: Algorithm = k["alg"].as_str().expect("alg").parse().expect("known alg");
            let public = match alg {
                Algorithm::EdDsa => hex_field(k, "x"),
                Algorithm::Es256 => [vec![4u8], hex_field(k, "x"), hex_field(k, "y")].concat(),
            };
            let id = DeviceId::new(k["kid"].as_str().expect("kid")).expect("device id");
            (
                id,
                VerifyingKey::from_bytes(alg, &public).expect("registry key"),
            )
        })
        .collect()
}

/// Feeds every vector of `folder` to the verifier; returns one line per disagreement.
/// `accepted` sees each accepted vector's record; `refused` each refusal with its vector.
fn check_folder(
    folder: &str,
    at_least: usize,
    mut accepted: impl FnMut(&str, &Json, &vitalmq_envelope::Telemetry) -> Option<String>,
    mut refused: impl FnMut(&str, &Json, &vitalmq_envelope::Refusal) -> Option<String>,
) {
    let registry = registry();
    let files = json_files(&vectors_dir().join(folder));
    assert!(
        files.len() >= at_least,
        "expected {at_least} vectors in {folder}, found {}",
        files.len()
    );
    let mut failures = Vec::new();
    for path in &files {
        let v = read_json(path);
        let id = v["id"].as_str().expect("id");
        let message = hex_field(&v, "cose_sign1_hex");
        let acceptable: Vec<&str> = v["acceptable_reasons"]
            .as_array()
            .expect("acceptable_reasons")
            .iter()
            .map(|r| r.as_str().expect("reason"))
            .collect();
        match (
            verify(&message, &registry, None),
            v["expect_valid"].as_bool().expect("expect_valid"),
        ) {
            (Ok(verified), true) => {
                let got = serde_json::to_value(&*verified).expect("telemetry as JSON");
                if got != v["expected_telemetry"] {
                    failures.push(format!(
                        "{id}: decoded {got} expected {}",
                        v["expected_telemetry"]
                    ));
                }
                failures.extend(accepted(id, &v, &verified));
            }
            (Ok(_), false) => failures.push(format!("{id}: accepted, expected {acceptable:?}")),
            (Err(refusal), true) => {
                failures.push(format!("{id}: refused ({refusal}), expected accept"))
            }
            (Err(refusal), false) => {
                if !acceptable.contains(&refusal.reason.as_str()) {
                    failures.push(format!(
                        "{id}: refused as {refusal}, acceptable {acceptable:?}"
                    ));
                }
                failures.extend(refused(id, &v, &refusal));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} vectors in {folder} differ:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
    eprintln!("{folder} vectors checked: {}", files.len());
}

#[test]
fn every_telemetry_vector_gets_its_verdict() {
    check_folder("telemetry", 45, |_, _, _| None, |_, _, _| None);
}

/// SPEC 3.1 (v1.1): the status and alarm payload vectors. Accepted ones must also read
/// back through the typed accessors the bridge uses; refusals must name the field whose
/// rule the vector breaks (`profile_rule` is `alarm_code`, `status_battery`, ...).
#[test]
fn every_v1_1_payload_vector_gets_its_verdict() {
    check_folder(
        "telemetry-v1.1",
        8,
        |id, v, t| {
            let expected = &v["expected_telemetry"];
            let typed = match t.kind {
                MessageType::Alarm => {
                    let Some(alarm) = t.alarm() else {
                        return Some(format!("{id}: accepted alarm without an alarm()"));
                    };
                    json!({"alarm": alarm.code.as_str(), "level": alarm.level.as_str(),
                           "active": alarm.active, "detail": alarm.detail})
                }
                MessageType::Status => {
                    let s = t.status();
                    json!({"battery": s.battery, "dropped": s.dropped,
                           "interval_s": s.interval_s, "charging": s.charging})
                }
                MessageType::Vitals => return None,
            };
            let typed = typed.as_object().expect("object");
            let differs = typed
                .iter()
                .any(|(k, got)| expected.get(k).unwrap_or(&Json::Null) != got);
            differs.then(|| format!("{id}: typed accessors give {typed:?}, payload {expected}"))
        },
        |id, v, refusal| {
            let rule = v["profile_rule"].as_str().expect("profile_rule");
            let field = rule
                .strip_prefix("alarm_")
                .map(|f| if f == "code" { "alarm" } else { f })
                .or_else(|| rule.strip_prefix("status_"))?;
            (!refusal.detail.contains(&format!("`{field}`")))
                .then(|| format!("{id}: detail `{}` does not name `{field}`", refusal.detail))
        },
    );
}

#[test]
fn accepted_vectors_bind_to_their_topic_device() {
    let registry = registry();
    let v = read_json(&vectors_dir().join("telemetry/ed25519-valid-basic.json"));
    let message = hex_field(&v, "cose_sign1_hex");
    let own = DeviceId::new("dev-00042").expect("id");
    let other = DeviceId::new("dev-00043").expect("id");
    let verified = verify(&message, &registry, Some(&own)).expect("own topic accepts");
    assert_eq!(verified.algorithm(), Algorithm::EdDsa);
    let expected_hash: [u8; 32] = sha2_digest(&message);
    assert_eq!(verified.message_sha256(), &expected_hash);
    let refusal = verify(&message, &registry, Some(&other)).expect_err("another device's topic");
    assert_eq!(refusal.reason, ReasonClass::KidMismatch);
}

#[test]
fn a_verified_value_keeps_the_exact_bytes_it_verified() {
    let registry = registry();
    let v = read_json(&vectors_dir().join("telemetry/ed25519-valid-basic.json"));
    let message = hex_field(&v, "cose_sign1_hex");
    let own = DeviceId::new("dev-00042").expect("id");
    let copied = verify(&message, &registry, Some(&own)).expect("accepted");
    assert_eq!(&copied.message()[..], &message[..]);
    // From Bytes, the same buffer is shared, not copied.
    let shared = bytes::Bytes::from(message.clone());
    let verified = verify_bytes(&shared, &registry, Some(&own)).expect("accepted");
    assert_eq!(verified.message(), &shared);
    assert_eq!(verified.message().as_ptr(), shared.as_ptr());
    assert_eq!(verified.message_sha256(), &sha2_digest(&shared));
}

fn sha2_digest(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

#[test]
fn cose_wg_examples_agree_on_the_signature_layer() {
    let files = json_files(&vectors_dir().join("cose-wg/normalized"));
    assert!(
        files.len() >= 14,
        "expected the 14 cose-wg examples, found {}",
        files.len()
    );
    let mut failures = Vec::new();
    for path in &files {
        let v = read_json(path);
        let name = path
            .file_name()
            .expect("file name")
            .to_string_lossy()
            .into_owned();
        let key = &v["key"];
        let alg: Algorithm = v["alg"].as_str().expect("alg").parse().expect("alg");
        let public = match alg {
            Algorithm::EdDsa => hex_field(key, "x"),
            Algorithm::Es256 => [vec![4u8], hex_field(key, "x"), hex_field(key, "y")].concat(),
        };
        let key = VerifyingKey::from_bytes(alg, &public).expect("example key");
        let message = hex_field(&v, "cose_sign1_hex");
        let aad = hex_field(&v, "external_aad_hex");
        let expected = v["expected_reason"].as_str().expect("expected_reason");
        let got = match verify_signature_only(&message, &key, &aad) {
            Ok(()) => "ok".to_owned(),
            Err(r) => r.reason.as_str().to_owned(),
        };
        if got != expected {
            failures.push(format!("{name}: got {got}, expected {expected}"));
        }
    }
    assert!(
        failures.is_empty(),
        "cose-wg disagreements:\n{}",
        failures.join("\n")
    );
    eprintln!("cose-wg examples checked: {}", files.len());
}
