//! Tampering with an audit log, as someone with write access to it would, through the
//! real `vitalmq audit verify` (issue 15, item 2). The tampered logs are rewritten by
//! this file's own hashing (SHA-256 of the line with its hash value emptied), not by
//! the writer's code, so the verifier is not checked against its own mirror image.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Ran, run, temp_dir};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use vitalmq_audit::{Actor, AuditLog, AuditRecord, CheckpointKey, Component, Decision, Event};

fn verify(args: &[&str]) -> Ran {
    run(
        Command::new(vitalmq_bin!())
            .args(["audit", "verify"])
            .args(args),
        Duration::from_secs(30),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// A closed broker log of 32 records with a signed checkpoint after record 15 (seq 16)
/// and one at the end (seq 33); every fourth record a denial. Returns its lines and the
/// signing key's public half.
fn signed_log(dir: &Path) -> (Vec<String>, String) {
    let path = dir.join("written.jsonl");
    let key = CheckpointKey::load_or_create(&dir.join("audit-signing.key.pem"), Component::Broker)
        .expect("key");
    let public = key.public_hex();
    let log = AuditLog::open_signed(&path, 64, Some(key)).expect("open");
    let auditor = log.auditor();
    for i in 0..32u64 {
        let record = AuditRecord::new(Component::Broker, Event::AuthorizationDenied)
            .actor(Actor {
                identity: Some(format!("spiffe://demo.vitalmq/device/dev-{i:05}")),
                ..Actor::default()
            })
            .action("publish")
            .resource(format!("devices/dev-{:05}/telemetry", i + 1))
            .decision(if i % 4 == 0 {
                Decision::Deny
            } else {
                Decision::Allow
            });
        auditor.record(record).expect("record");
        if i == 15 {
            auditor.sync().expect("sync writes a checkpoint");
        }
    }
    log.close().expect("close");
    let lines: Vec<String> = std::fs::read_to_string(&path)
        .expect("log")
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), 34);
    for at in [16, 33] {
        assert!(
            lines[at].contains("\"event\":\"checkpoint\""),
            "{}",
            lines[at]
        );
    }
    (lines, public)
}

/// Recomputes `prev` and `hash` of every line from `from` on, as an attacker would.
fn rechain(lines: &mut [String], from: usize) {
    for i in from..lines.len() {
        let mut record: Value = serde_json::from_str(&lines[i]).expect("json");
        if i > 0 {
            let before: Value = serde_json::from_str(&lines[i - 1]).expect("json");
            record["prev"] = before["hash"].clone();
        }
        record["hash"] = Value::from("");
        let unhashed = serde_json::to_string(&record).expect("json");
        record["hash"] = Value::from(hex::encode(Sha256::digest(unhashed.as_bytes())));
        lines[i] = serde_json::to_string(&record).expect("json");
    }
}

fn write(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").expect("write");
    path
}

fn assert_refused(ran: &Ran, says: &str) {
    assert_eq!(ran.code, Some(1), "{}", ran.all());
    assert!(
        ran.stdout.contains(says),
        "expected {says:?} in:\n{}",
        ran.all()
    );
}

#[test]
fn the_untampered_log_verifies_under_its_key() {
    let dir = temp_dir("audit-tamper");
    let (lines, key) = signed_log(dir.path());
    let log = write(dir.path(), "audit.jsonl", &lines);
    let ran = verify(&[s(&log), "--trusted-key", &key]);
    assert!(ran.success, "{}", ran.all());
    assert!(!ran.stdout.contains("UNSIGNED"), "{}", ran.all());
}

#[test]
fn a_field_inserted_into_a_record_is_found() {
    let dir = temp_dir("audit-tamper");
    let (mut lines, key) = signed_log(dir.path());
    lines[4] = lines[4].replacen('{', "{\"note\":\"operator approved this\",", 1);
    let log = write(dir.path(), "audit.jsonl", &lines);
    assert_refused(&verify(&[s(&log)]), "line 5");
    assert_refused(&verify(&[s(&log), "--trusted-key", &key]), "line 5");
    // Rehashed too, the field is still refused: records have no free-form fields.
    rechain(&mut lines, 4);
    let log = write(dir.path(), "rechained.jsonl", &lines);
    assert_refused(&verify(&[s(&log)]), "unknown field `note`");
}

#[test]
fn a_deny_turned_allow_with_the_chain_recomputed_and_cut_before_the_next_checkpoint() {
    let dir = temp_dir("audit-tamper");
    let (mut lines, key) = signed_log(dir.path());
    // seq 21 is record 20, a denial after the first checkpoint.
    assert!(lines[21].contains("\"decision\":\"deny\""), "{}", lines[21]);
    lines[21] = lines[21].replace("\"decision\":\"deny\"", "\"decision\":\"allow\"");
    rechain(&mut lines, 21);
    lines.truncate(33);
    let log = write(dir.path(), "audit.jsonl", &lines);
    let ran = verify(&[s(&log), "--trusted-key", &key]);
    assert_refused(
        &ran,
        "UNSIGNED: 16 records after the last signed checkpoint (seq 17..=32)",
    );
    // Accepting an unsigned tail is an explicit choice, and still says what it accepts.
    let ran = verify(&[s(&log), "--trusted-key", &key, "--allow-unsigned-tail"]);
    assert!(ran.success, "{}", ran.all());
    assert!(ran.stdout.contains("UNSIGNED: 16 records"), "{}", ran.all());
}

#[test]
fn the_last_records_cut_off_are_found() {
    let dir = temp_dir("audit-tamper");
    let (mut lines, key) = signed_log(dir.path());
    lines.truncate(30);
    let log = write(dir.path(), "audit.jsonl", &lines);
    assert_refused(&verify(&[s(&log)]), "UNSIGNED: 13 records");
    assert_refused(
        &verify(&[s(&log), "--trusted-key", &key]),
        "UNSIGNED: 13 records",
    );
}

#[test]
fn a_log_cut_after_shipping_is_found_against_the_shipped_segments() {
    let dir = temp_dir("audit-tamper");
    let (lines, key) = signed_log(dir.path());
    // What the bridge ships: segments ending at checkpoints, named by their seqs.
    let shipped = dir
        .path()
        .join("objects/audit/retention=audit-7y/component=broker");
    let day = shipped.join("date=2026-12-04");
    std::fs::create_dir_all(&day).expect("mkdir");
    write(&day, &format!("{:020}-{:020}.jsonl", 0, 16), &lines[..17]);
    write(&day, &format!("{:020}-{:020}.jsonl", 17, 33), &lines[17..]);

    let whole = write(dir.path(), "audit.jsonl", &lines);
    let ran = verify(&[s(&whole), "--trusted-key", &key, "--shipped", s(&shipped)]);
    assert!(ran.success, "{}", ran.all());
    assert!(ran.stdout.contains("shipped: 2 segments"), "{}", ran.all());

    // Cut at a checkpoint: fully signed on its own, so only the shipped copy shows it.
    let cut = write(dir.path(), "cut.jsonl", &lines[..17]);
    let ran = verify(&[s(&cut), "--trusted-key", &key]);
    assert!(ran.success, "{}", ran.all());
    let ran = verify(&[s(&cut), "--trusted-key", &key, "--shipped", s(&shipped)]);
    assert_refused(&ran, "cut after shipping");
}

/// A live log read while the writer is half-way through a line: the complete records
/// are checked and the partial one is reported as unsigned, not as a broken chain.
#[test]
fn a_live_log_read_mid_write_reports_its_partial_line_as_unsigned() {
    let dir = temp_dir("audit-tamper");
    let (lines, key) = signed_log(dir.path());
    let log = dir.path().join("audit.jsonl");
    let half = &lines[33][..lines[33].len() / 2];
    std::fs::write(&log, lines[..33].join("\n") + "\n" + half).expect("write");
    let ran = verify(&[s(&log), "--trusted-key", &key]);
    assert_refused(&ran, "incomplete last line");
    let ran = verify(&[s(&log), "--trusted-key", &key, "--allow-unsigned-tail"]);
    assert!(ran.success, "{}", ran.all());
    assert!(
        ran.stdout.contains("chain intact, 33 records"),
        "{}",
        ran.all()
    );
}
