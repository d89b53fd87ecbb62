//! The shared anti-replay scenarios (`../shared/vectors/replay/*.json`), step by step:
//! each message is verified against the vectors' registry (`keys.json`) exactly as the
//! bridge does, and only authentic ones reach the sequence window. Verdict, detail and
//! the window state after each step must match the scenario.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use vitalmq_bridge::window::{self, Accepted, DeviceSequence, Verdict, WindowSize};
use vitalmq_envelope::{Algorithm, DeviceId, VerifyingKey, verify};

fn vectors_dir() -> PathBuf {
    std::env::var_os("VITALMQ_VECTORS").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/vectors"),
        PathBuf::from,
    )
}

fn read_json(path: &Path) -> Json {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn registry() -> HashMap<DeviceId, VerifyingKey> {
    let keys = read_json(&vectors_dir().join("keys.json"));
    let hex_field =
        |k: &Json, f: &str| hex::decode(k[f].as_str().expect("hex field")).expect("hex");
    keys["registry"]
        .as_array()
        .expect("registry")
        .iter()
        .map(|k| {
            let alg: Algorithm = k["alg"].as_str().expect("alg").parse().expect("alg");
            let public = match alg {
                Algorithm::EdDsa => hex_field(k, "x"),
                Algorithm::Es256 => [vec![4u8], hex_field(k, "x"), hex_field(k, "y")].concat(),
            };
            (
                DeviceId::new(k["kid"].as_str().expect("kid")).expect("id"),
                VerifyingKey::from_bytes(alg, &public).expect("key"),
            )
        })
        .collect()
}

/// (expect, detail) as the vectors spell them.
fn spelled(verdict: Verdict) -> (&'static str, String) {
    let expect = match verdict {
        Verdict::Accept(Accepted::Gap { .. }) => "gap",
        Verdict::Accept(_) => "accept",
        Verdict::Reject(r) => match r.class() {
            "duplicate" => "duplicate",
            _ => "replay",
        },
    };
    (expect, verdict.to_string())
}

#[test]
fn every_replay_scenario_matches_step_by_step() {
    let registry = registry();
    let dir = vectors_dir().join("replay");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 2,
        "expected the replay scenarios in {}",
        dir.display()
    );
    let mut steps_checked = 0;
    for file in &files {
        let scenario = read_json(file);
        let size = WindowSize::new(
            u32::try_from(scenario["window_size"].as_u64().expect("window_size")).expect("u32"),
        )
        .expect("window size");
        let mut states: HashMap<DeviceId, DeviceSequence> = HashMap::new();
        for step in scenario["steps"].as_array().expect("steps") {
            let at = format!("{} step {}", file.display(), step["step"]);
            let message = hex::decode(step["cose_sign1_hex"].as_str().expect("hex")).expect("hex");
            let device = DeviceId::new(step["device"].as_str().expect("device")).expect("id");
            let (expect, detail) = match verify(&message, &registry, Some(&device)) {
                Err(refusal) => {
                    assert_eq!(step["authentic"], false, "{at}: refused {refusal:?}");
                    ("invalid", refusal.reason.as_str().to_owned())
                }
                Ok(verified) => {
                    assert_eq!(step["authentic"], true, "{at}: a forged message verified");
                    let (epoch, seq) = (verified.epoch, verified.seq);
                    assert_eq!(epoch, step["epoch"].as_u64().expect("epoch"), "{at}");
                    assert_eq!(seq, step["seq"].as_u64().expect("seq"), "{at}");
                    let verdict = window::check(states.get(&device), epoch, seq);
                    if let Verdict::Accept(accepted) = verdict {
                        match states.get_mut(&device) {
                            Some(s) => s.apply(epoch, seq, accepted),
                            None => {
                                states.insert(
                                    device.clone(),
                                    DeviceSequence::first(size, epoch, seq),
                                );
                            }
                        }
                    }
                    spelled(verdict)
                }
            };
            assert_eq!(expect, step["expect"].as_str().expect("expect"), "{at}");
            assert_eq!(detail, step["detail"].as_str().expect("detail"), "{at}");
            let state = states
                .get(&device)
                .expect("state after an authentic first message");
            let after = &step["state_after"];
            assert_eq!(
                state.epoch(),
                after["epoch"].as_u64().expect("epoch"),
                "{at}"
            );
            assert_eq!(
                state.highest(),
                after["highest"].as_u64().expect("highest"),
                "{at}"
            );
            assert_eq!(
                format!("{:016x}", state.recent_bitmap()),
                after["bitmap_hex"].as_str().expect("bitmap"),
                "{at}"
            );
            steps_checked += 1;
        }
    }
    assert!(steps_checked >= 50, "only {steps_checked} steps");
}
