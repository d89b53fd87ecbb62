//! Interop both ways with pycose, an independent COSE implementation: what envelope
//! signs verifies in pycose, and what pycose signs verifies in envelope (library and
//! `vitalmq envelope verify`), for EdDSA and ES256.
//!
//! Needs `python3 -m pip install pycose 'cbor2<6'` (the README's test command does it).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Ran, run, temp_dir};

use serde_json::{Value as Json, json};
use vitalmq_envelope::{
    Algorithm, DeviceId, MessageType, Number, ReasonClass, SigningKey, Telemetry, VerifyingKey,
    sign, verify,
};
use vitalmq_policies::{DeviceEntry, DeviceRegistry, SiteId, TrustDomain};

const ALGS: [Algorithm; 2] = [Algorithm::EdDsa, Algorithm::Es256];

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/pycose_interop.py")
}

const TIMEOUT: Duration = Duration::from_secs(60);

fn python(cmd: &mut Command) -> Ran {
    let out = run(cmd, TIMEOUT);
    assert!(
        !out.stderr.contains("ModuleNotFoundError"),
        "pycose is not installed: run `python3 -m pip install pycose 'cbor2<6'` (scripts/test does)\n{}",
        out.stderr
    );
    out
}

fn json_stdout(out: &Ran) -> Json {
    assert!(
        out.success,
        "command failed ({:?}):\n{}",
        out.code, out.stderr
    );
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", out.stdout))
}

fn telemetry(dev: &str, seq: u64) -> Telemetry {
    Telemetry {
        dev: DeviceId::new(dev).expect("device id"),
        epoch: 7,
        seq,
        ts: 1_763_726_400_000,
        fw: "5.12.1".into(),
        kind: MessageType::Vitals,
        m: Some(BTreeMap::from([
            ("spo2".into(), Number::Int(93)),
            ("pulse".into(), Number::Int(108)),
            ("temp".into(), Number::Float(37.5)),
        ])),
        q: Some(0.97),
        model: Some("ppg-filter/2.1".into()),
        schema: None,
        extra: BTreeMap::new(),
    }
}

fn pycose_verify(dir: &Path, alg: Algorithm, public: &VerifyingKey, message: &[u8]) -> Json {
    let file = dir.join(format!("msg-{alg}.cose"));
    std::fs::write(&file, message).expect("write message");
    json_stdout(&python(
        Command::new("python3")
            .arg(script())
            .args([
                "verify",
                "--alg",
                alg.name(),
                "--public-hex",
                &public.to_hex(),
            ])
            .arg(&file),
    ))
}

#[test]
fn messages_envelope_signs_verify_in_pycose() {
    let dir = temp_dir("vitalmq-pycose");
    for alg in ALGS {
        let key = SigningKey::generate(alg).expect("key");
        let t = telemetry("dev-00042", 1001);
        let message = sign(&t, &key).expect("sign");

        let answer = pycose_verify(dir.path(), alg, &key.verifying_key(), &message);
        assert_eq!(answer["valid"], json!(true), "{alg}: {answer}");
        assert_eq!(answer["kid"], json!("dev-00042"), "{alg}");
        assert_eq!(
            answer["payload"],
            serde_json::to_value(&t).expect("json"),
            "{alg}"
        );

        // The same check must be able to fail: a flipped signature bit.
        let mut tampered = message.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 0x01;
        let answer = pycose_verify(dir.path(), alg, &key.verifying_key(), &tampered);
        assert_eq!(
            answer["valid"],
            json!(false),
            "{alg}: tampered accepted by pycose"
        );
    }
}

fn pycose_sign(alg: Algorithm, kid: &str, payload: &Json) -> (Vec<u8>, VerifyingKey) {
    let answer = json_stdout(&python(Command::new("python3").arg(script()).args([
        "sign",
        "--alg",
        alg.name(),
        "--kid",
        kid,
        "--payload-json",
        &payload.to_string(),
    ])));
    let message = hex::decode(answer["cose_hex"].as_str().expect("cose_hex")).expect("hex");
    let public = VerifyingKey::from_hex(alg, answer["public_hex"].as_str().expect("public_hex"))
        .expect("pycose public key");
    (message, public)
}

#[test]
fn messages_pycose_signs_verify_in_envelope_and_the_cli() {
    let dir = temp_dir("vitalmq-pycose");
    let td = TrustDomain::new("interop.vitalmq").expect("trust domain");
    let mut registry = DeviceRegistry::new(td);
    let mut signed = Vec::new();
    for (i, alg) in ALGS.into_iter().enumerate() {
        let dev = format!("dev-py-{i}");
        let payload = serde_json::to_value(telemetry(&dev, 5)).expect("json");
        let (message, public) = pycose_sign(alg, &dev, &payload);

        let keys = HashMap::from([(DeviceId::new(dev.as_str()).expect("id"), public.clone())]);
        let verified = verify(&message, &keys, None)
            .unwrap_or_else(|r| panic!("{alg}: pycose message refused: {r}"));
        assert_eq!(
            serde_json::to_value(&*verified).expect("json"),
            payload,
            "{alg}"
        );
        assert_eq!(verified.algorithm(), alg);

        registry
            .insert_device(DeviceEntry {
                id: DeviceId::new(dev.as_str()).expect("id"),
                site: SiteId::new("site-01").expect("site"),
                patient_ref: format!("pt-{i:04}"),
                key: public,
                consent: None,
                processing_policy: None,
                lot: None,
                hardware_model: None,
                region: None,
            })
            .expect("unique device");
        signed.push((alg, dev, message, payload));
    }
    let registry_path = dir.path().join("registry.toml");
    std::fs::write(&registry_path, registry.to_toml()).expect("write registry");

    for (alg, dev, message, payload) in signed {
        let file = dir.path().join(format!("{dev}.cose"));
        std::fs::write(&file, &message).expect("write message");
        let out = run(
            Command::new(env!("CARGO_BIN_EXE_vitalmq"))
                .args(["envelope", "verify", "--registry"])
                .arg(&registry_path)
                .args(["--kid", &dev])
                .arg(&file),
            TIMEOUT,
        );
        let answer = json_stdout(&out);
        assert_eq!(answer["verdict"], json!("accepted"), "{alg}: {answer}");
        assert_eq!(answer["payload"], payload, "{alg}");
        assert_eq!(answer["headers"]["alg"], json!(alg.name()), "{alg}");

        // The topic (here --kid) of another device: refused, exit code 1.
        let out = run(
            Command::new(env!("CARGO_BIN_EXE_vitalmq"))
                .args(["envelope", "verify", "--registry"])
                .arg(&registry_path)
                .args(["--kid", "dev-someone-else"])
                .arg(&file),
            TIMEOUT,
        );
        assert_eq!(out.code, Some(1), "{alg}");
        let answer: Json = serde_json::from_str(&out.stdout).expect("json");
        assert_eq!(answer["verdict"], json!("refused"));
        assert_eq!(answer["reason"], json!(ReasonClass::KidMismatch.as_str()));
    }
}

#[test]
fn a_pycose_signature_over_other_bytes_is_bad_signature() {
    for alg in ALGS {
        let payload = serde_json::to_value(telemetry("dev-py-x", 9)).expect("json");
        let (mut message, public) = pycose_sign(alg, "dev-py-x", &payload);
        // Change one payload byte (the seq value 9 -> 10), leaving the CBOR well-formed.
        let at = message
            .windows(4)
            .position(|w| w == [0x63, b's', b'e', b'q'])
            .expect("seq key in payload")
            + 4;
        assert_eq!(message[at], 0x09);
        message[at] = 0x0a;
        let keys = HashMap::from([(DeviceId::new("dev-py-x").expect("id"), public)]);
        let refusal = verify(&message, &keys, None).expect_err("tampered payload accepted");
        assert_eq!(
            refusal.reason,
            ReasonClass::BadSignature,
            "{alg}: {refusal}"
        );
    }
}
