//! `vitalmq envelope verify|inspect|sign` as an integrator runs it: every shared telemetry
//! vector through the CLI with a registry file built from `keys.json`, a key given on the
//! command line, stdin input, and a sign -> verify round trip.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Ran, run_with_input, temp_dir};

use serde_json::{Value as Json, json};
use vitalmq_envelope::{Algorithm, DeviceId, SigningKey, VerifyingKey};
use vitalmq_policies::{DeviceEntry, DeviceRegistry, SiteId, TrustDomain};

fn vectors() -> PathBuf {
    std::env::var_os("VITALMQ_VECTORS").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/vectors"),
        PathBuf::from,
    )
}

fn read_json(path: &Path) -> Json {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json")
}

fn vitalmq(args: &[&str], stdin: Option<&[u8]>) -> Ran {
    run_with_input(
        Command::new(env!("CARGO_BIN_EXE_vitalmq")).args(args),
        stdin,
        Duration::from_secs(30),
    )
}

fn stdout_json(out: &Ran) -> Json {
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", out.stdout, out.stderr))
}

fn registry_from_keys_json(dir: &Path) -> PathBuf {
    let keys = read_json(&vectors().join("keys.json"));
    let mut registry = DeviceRegistry::new(TrustDomain::new("vectors.vitalmq").expect("td"));
    for (i, k) in keys["registry"]
        .as_array()
        .expect("registry")
        .iter()
        .enumerate()
    {
        let alg: Algorithm = k["alg"].as_str().expect("alg").parse().expect("alg");
        let hex_of = |f: &str| k[f].as_str().expect("hex field").to_owned();
        let public = match alg {
            Algorithm::EdDsa => hex_of("x"),
            Algorithm::Es256 => format!("04{}{}", hex_of("x"), hex_of("y")),
        };
        registry
            .insert_device(DeviceEntry {
                id: DeviceId::new(k["kid"].as_str().expect("kid")).expect("id"),
                site: SiteId::new("site-01").expect("site"),
                patient_ref: format!("pt-{i}"),
                key: VerifyingKey::from_hex(alg, &public).expect("key"),
                consent: None,
                processing_policy: None,
                lot: None,
                hardware_model: None,
                region: None,
            })
            .expect("unique");
    }
    let path = dir.join("registry.toml");
    std::fs::write(&path, registry.to_toml()).expect("write registry");
    path
}

#[test]
fn every_vector_gets_its_verdict_through_the_cli() {
    let dir = temp_dir("vitalmq-envelope-cli");
    let registry = registry_from_keys_json(dir.path());
    let registry = registry.to_str().expect("utf-8 path");
    // v1 and the SPEC 3.1 (v1.1) status and alarm payloads.
    let mut entries = Vec::new();
    for (folder, at_least) in [("telemetry", 45), ("telemetry-v1.1", 8)] {
        let mut found: Vec<_> = std::fs::read_dir(vectors().join(folder))
            .expect("vectors")
            .map(|e| e.expect("entry").path())
            .collect();
        found.sort();
        assert!(
            found.len() >= at_least,
            "found {} vectors in {folder}",
            found.len()
        );
        entries.extend(found);
    }
    for path in entries {
        let v = read_json(&path);
        let message = hex::decode(v["cose_sign1_hex"].as_str().expect("hex")).expect("hex");
        let out = vitalmq(
            &["envelope", "verify", "--registry", registry, "-"],
            Some(&message),
        );
        let answer = stdout_json(&out);
        let id = v["id"].as_str().expect("id");
        if v["expect_valid"] == json!(true) {
            assert_eq!(out.code, Some(0), "{id}: {answer}");
            assert_eq!(answer["verdict"], json!("accepted"), "{id}");
            assert_eq!(answer["payload"], v["expected_telemetry"], "{id}");
        } else {
            assert_eq!(out.code, Some(1), "{id}: {answer}");
            assert_eq!(answer["verdict"], json!("refused"), "{id}");
            let acceptable = v["acceptable_reasons"].as_array().expect("reasons");
            assert!(acceptable.contains(&answer["reason"]), "{id}: {answer}");
            assert!(
                answer["detail"].as_str().is_some_and(|d| !d.is_empty()),
                "{id}"
            );
        }
    }
}

#[test]
fn pubkey_on_the_command_line_and_kid_pinning() {
    let v = read_json(&vectors().join("telemetry/es256-valid-basic.json"));
    let message = hex::decode(v["cose_sign1_hex"].as_str().expect("hex")).expect("hex");
    let point = format!(
        "04{}{}",
        v["key"]["x"].as_str().expect("x"),
        v["key"]["y"].as_str().expect("y")
    );
    let dir = temp_dir("vitalmq-envelope-cli");
    let file = dir.path().join("m.cose");
    std::fs::write(&file, &message).expect("write");
    let file = file.to_str().expect("utf-8");
    let base = [
        "envelope",
        "verify",
        "--alg",
        "ES256",
        "--pubkey-hex",
        point.as_str(),
    ];

    let ok = vitalmq(&[&base[..], &["--kid", "dev-00077", file]].concat(), None);
    assert_eq!(stdout_json(&ok)["verdict"], json!("accepted"));

    let wrong_device = vitalmq(&[&base[..], &["--kid", "dev-00078", file]].concat(), None);
    assert_eq!(stdout_json(&wrong_device)["reason"], json!("kid_mismatch"));

    let wrong_alg = vitalmq(
        &[
            "envelope",
            "verify",
            "--alg",
            "EdDSA",
            "--pubkey-hex",
            &"11".repeat(32),
            file,
        ],
        None,
    );
    assert_eq!(stdout_json(&wrong_alg)["reason"], json!("alg_mismatch"));

    let bad_key = vitalmq(
        &[
            "envelope",
            "verify",
            "--alg",
            "ES256",
            "--pubkey-hex",
            "04abcd",
            file,
        ],
        None,
    );
    assert_eq!(
        bad_key.code,
        Some(2),
        "a bad key is a usage error, not a verdict"
    );
    assert!(bad_key.stderr.contains("65 bytes"));

    let oversized = vitalmq(&[&base[..], &["-"]].concat(), Some(&vec![0u8; 70_000]));
    assert_eq!(stdout_json(&oversized)["reason"], json!("oversized"));

    let inspected = stdout_json(&vitalmq(&["envelope", "inspect", file], None));
    assert_eq!(inspected["headers"]["kid"], json!("dev-00077"));
    assert_eq!(inspected["payload"], v["expected_telemetry"]);
}

#[test]
fn sign_then_verify_with_a_pem_key() {
    let dir = temp_dir("vitalmq-envelope-cli");
    for alg in [Algorithm::EdDsa, Algorithm::Es256] {
        let key = SigningKey::generate(alg).expect("key");
        let pem = dir.path().join(format!("{alg}.key.pem"));
        std::fs::write(&pem, key.to_pkcs8_pem().expect("pem")).expect("write pem");
        let out_file = dir.path().join(format!("{alg}.cose"));
        let signed = vitalmq(
            &[
                "envelope",
                "sign",
                "--key",
                pem.to_str().expect("utf-8"),
                "--dev",
                "dev-00001",
                "--seq",
                "42",
                "--m",
                "spo2=88",
                "--m",
                "temp=38.4",
                "--q",
                "0.9",
                "-o",
                out_file.to_str().expect("utf-8"),
            ],
            None,
        );
        assert!(signed.success, "{}", signed.stderr);
        let verified = stdout_json(&vitalmq(
            &[
                "envelope",
                "verify",
                "--alg",
                alg.name(),
                "--pubkey-hex",
                &key.verifying_key().to_hex(),
                "--kid",
                "dev-00001",
                out_file.to_str().expect("utf-8"),
            ],
            None,
        ));
        assert_eq!(verified["verdict"], json!("accepted"), "{alg}: {verified}");
        assert_eq!(verified["payload"]["seq"], json!(42));
        assert_eq!(verified["payload"]["m"], json!({"spo2": 88, "temp": 38.4}));
    }
}

/// SPEC 3.1: `sign` writes alarm and status payloads that `verify` accepts and shows
/// key for key, and refuses an alarm without its code.
#[test]
fn sign_makes_alarm_and_status_payloads() {
    let dir = temp_dir("vitalmq-envelope-cli");
    let key = SigningKey::generate(Algorithm::EdDsa).expect("key");
    let pem = dir.path().join("dev.key.pem");
    std::fs::write(&pem, key.to_pkcs8_pem().expect("pem")).expect("write pem");
    let pem = pem.to_str().expect("utf-8");
    let pubkey = key.verifying_key().to_hex();
    let cases: [(&[&str], Json); 3] = [
        (
            &[
                "--type",
                "alarm",
                "--alarm",
                "arrhythmia",
                "--level",
                "urgent",
                "--detail",
                "irregular rhythm for 30 s",
                "--model",
                "ecg-af-2.1.0",
            ],
            json!({"type": "alarm", "alarm": "arrhythmia", "level": "urgent", "active": true,
                   "detail": "irregular rhythm for 30 s", "model": "ecg-af-2.1.0"}),
        ),
        (
            &[
                "--type",
                "alarm",
                "--alarm",
                "arrhythmia",
                "--level",
                "review",
                "--active",
                "false",
            ],
            json!({"type": "alarm", "alarm": "arrhythmia", "level": "review", "active": false}),
        ),
        (
            &[
                "--type",
                "status",
                "--battery",
                "0.42",
                "--dropped",
                "3",
                "--interval-s",
                "60",
                "--charging",
                "false",
            ],
            json!({"type": "status", "battery": 0.42, "dropped": 3, "interval_s": 60,
                   "charging": false}),
        ),
    ];
    for (i, (flags, expected)) in cases.iter().enumerate() {
        let out_file = dir.path().join(format!("{i}.cose"));
        let out_file = out_file.to_str().expect("utf-8");
        let mut args = vec![
            "envelope",
            "sign",
            "--key",
            pem,
            "--dev",
            "dev-00001",
            "--seq",
            "7",
        ];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["-o", out_file]);
        let signed = vitalmq(&args, None);
        assert!(signed.success, "{flags:?}: {}", signed.stderr);
        let verified = stdout_json(&vitalmq(
            &[
                "envelope",
                "verify",
                "--alg",
                "EdDSA",
                "--pubkey-hex",
                &pubkey,
                out_file,
            ],
            None,
        ));
        assert_eq!(
            verified["verdict"],
            json!("accepted"),
            "{flags:?}: {verified}"
        );
        for (k, v) in expected.as_object().expect("object") {
            assert_eq!(&verified["payload"][k], v, "{flags:?}: {k} in {verified}");
        }
    }
    let incomplete = vitalmq(
        &[
            "envelope",
            "sign",
            "--key",
            pem,
            "--dev",
            "dev-00001",
            "--seq",
            "7",
            "--type",
            "alarm",
            "-o",
            "-",
        ],
        None,
    );
    assert_eq!(incomplete.code, Some(2), "{}", incomplete.stderr);
    assert!(
        incomplete.stderr.contains("--alarm"),
        "{}",
        incomplete.stderr
    );
}

/// The probes and their neighbours: each message goes through `vitalmq envelope
/// verify --rules` and through the bridge's own verify and sequencing code under the
/// same rules, and both must give the same verdict, the same refusal class and, when
/// accepted, the same `m` and the same marks (implausible values, clock skew). The CLI
/// used to exit 2 ("number out of range") on `m.spo2` = -2^64, which the bridge stored.
#[test]
fn the_cli_and_the_bridge_agree_on_every_probe() {
    use std::collections::BTreeMap;

    use bytes::Bytes;
    use ciborium::Value;
    use vitalmq_bridge::classify::{self, Disposition, Incoming, Origin, Sequencer};
    use vitalmq_envelope::{MessageType, Number, Telemetry};

    let dir = temp_dir("vitalmq-envelope-agree");
    let key = SigningKey::generate(Algorithm::EdDsa).expect("key");
    let dev = DeviceId::new("dev-00001").expect("id");
    let mut registry = DeviceRegistry::new(TrustDomain::new("test.vitalmq").expect("td"));
    registry
        .insert_device(DeviceEntry {
            id: dev.clone(),
            site: SiteId::new("site-01").expect("site"),
            patient_ref: "pt-1".into(),
            key: key.verifying_key(),
            consent: None,
            processing_policy: None,
            lot: None,
            hardware_model: None,
            region: None,
        })
        .expect("insert");
    let registry_file = dir.path().join("registry.toml");
    std::fs::write(&registry_file, registry.to_toml()).expect("write registry");

    // Device time now: the clock marks then come from the probes' own ts.
    let start_ms = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis(),
    )
    .expect("ms");
    let base = |seq: u64, m: Vec<(&str, Number)>| Telemetry {
        dev: dev.clone(),
        epoch: 1,
        seq,
        ts: start_ms,
        fw: "5.12.1".into(),
        kind: MessageType::Vitals,
        m: Some(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()),
        q: None,
        model: None,
        schema: None,
        extra: BTreeMap::new(),
    };
    let spo2 = |seq, v| base(seq, vec![("spo2", v)]);
    let mut probes = vec![
        spo2(1, Number::Int(u64::MAX.into())),
        spo2(2, Number::Int(80)),
        spo2(3, Number::Int(-5)),
        spo2(4, Number::Int(-(1i128 << 64))),
        spo2(5, Number::Float(1.8446744073709552e19)),
        spo2(6, Number::Float(-0.0)),
        base(
            7,
            vec![
                ("spo2", Number::Int(97)),
                ("pulse", Number::Int(i64::MIN.into())),
            ],
        ),
    ];
    for (seq, ts) in [(8, 0), (9, u64::MAX), (10, 2_082_758_400_000)] {
        let mut t = spo2(seq, Number::Int(95));
        t.ts = ts;
        probes.push(t);
    }
    let mut dup = spo2(11, Number::Int(95));
    dup.extra.insert(
        "calib".into(),
        Value::Map(vec![
            (Value::Text("gain".into()), Value::Integer(1.into())),
            (Value::Text("gain".into()), Value::Integer(2.into())),
        ]),
    );
    probes.push(dup);

    let origin = Origin {
        broker: "127.0.0.1:1".into(),
        bridge: "spiffe://test.vitalmq/bridge/bridge-01".into(),
    };
    let rules_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/examples/rules.toml");
    let rules = vitalmq_policies::RuleSet::load(&rules_file).expect("shipped rules");
    let mut sequencer = Sequencer::new(
        Default::default(),
        Default::default(),
        Default::default(),
        Default::default(),
        Some(std::sync::Arc::new(rules)),
    );
    let now_ms = || {
        u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_millis(),
        )
        .expect("ms")
    };
    let mut marked = 0;
    for (i, telemetry) in probes.iter().enumerate() {
        let message = vitalmq_envelope::sign(telemetry, &key).expect("sign");
        let file = dir.path().join(format!("probe-{i}.cose"));
        std::fs::write(&file, &message).expect("write probe");
        let cli = vitalmq(
            &[
                "envelope",
                "verify",
                "--registry",
                registry_file.to_str().expect("utf-8"),
                "--kid",
                "dev-00001",
                "--rules",
                rules_file.to_str().expect("utf-8"),
                file.to_str().expect("utf-8"),
            ],
            None,
        );
        let cli_json = stdout_json(&cli);

        let incoming = Incoming {
            topic: "devices/dev-00001/telemetry".to_owned(),
            payload: Bytes::from(message),
            received_at_ms: now_ms(),
            token: (),
        };
        let checked = classify::verify(&registry, incoming);
        let mut out = sequencer.sequence(&registry, &origin, vec![checked], now_ms());
        sequencer.adopt(&mut out);
        match &out.dispositions[0].0 {
            Disposition::Accepted { .. } => {
                assert_eq!(cli.code, Some(0), "probe {i}: {}{}", cli.stdout, cli.stderr);
                assert_eq!(cli_json["verdict"], json!("accepted"), "probe {i}");
                let event: Json =
                    serde_json::from_str(out.commit.events[0].normalized_json()).expect("event");
                assert_eq!(cli_json["payload"]["m"], event["m"], "probe {i}");
                assert_eq!(cli_json["payload"]["ts"], event["ts"], "probe {i}");
                let marks = &cli_json["marks"];
                marked += usize::from(marks.as_object().is_some_and(|m| !m.is_empty()));
                assert_eq!(marks["implausible"], event["implausible"], "probe {i}");
                assert_eq!(
                    marks["clock_skew"]["direction"], event["clock_skew"]["direction"],
                    "probe {i}"
                );
            }
            Disposition::Refused { reason, .. } => {
                assert_eq!(cli.code, Some(1), "probe {i}: {}{}", cli.stdout, cli.stderr);
                assert_eq!(cli_json["reason"], json!(reason.as_str()), "probe {i}");
            }
            other => panic!("probe {i}: the bridge sequenced it as {other:?}"),
        }
    }
    // 2^64-1, -5, -2^64, 1.8e19, pulse i64::MIN; ts 0, u64::MAX, 2036.
    assert_eq!(marked, 8, "marked probes");
}
