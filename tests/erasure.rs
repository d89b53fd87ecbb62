//! Erasure by crypto-shredding end to end (issue 20, point 3): a bridge with encryption
//! at rest, two patients publishing, a copy of the store taken before the erasure;
//! `vitalmq erase` is refused while the patient is assigned and under a legal hold,
//! then erases: the patient's rows read as erased (also in the copy), no plaintext of
//! them is anywhere in the files (read by python3's sqlite3 and by bytes), the other
//! patient is intact, every audit chain verifies, and a rerun after a crash between
//! the keyring erase and the cleanup finishes the job.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Rig, run, vitalmq_ok};
use serde_json::Value as Json;

fn bin() -> &'static Path {
    vitalmq_bin!()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// The patient of `device` in the registry.
fn patient_of(registry: &Path, device: &str) -> String {
    let reg = vitalmq_policies::DeviceRegistry::load(registry).expect("registry");
    let id = vitalmq_envelope::DeviceId::new(device).expect("id");
    reg.device(&id).expect("device").patient_ref.clone()
}

fn events(data: &Path) -> Vec<Json> {
    common::store_rows(bin(), "events", data)
}

/// What python3's sqlite3 module (not our code) reads from a store file: for each
/// event of `device`, whether its normalized and raw payloads are sealed blobs.
fn sealed_per_python(db: &Path, device: &str) -> String {
    let script = format!(
        "import sqlite3\n\
         c = sqlite3.connect('file:{}?mode=ro', uri=True)\n\
         rows = c.execute(\"SELECT typeof(e.normalized), substr(e.normalized, 1, 4), \
         substr(r.bytes, 1, 4) FROM events e JOIN raw_messages r ON r.id = e.raw_id \
         WHERE e.device = ?\", ('{device}',)).fetchall()\n\
         print(len(rows), all(t == 'blob' and n == b'VMQS' and (r == b'VMQS' or r == b'') \
         for t, n, r in rows))\n",
        db.display()
    );
    let ran = run(
        Command::new("python3").args(["-c", &script]),
        Duration::from_secs(20),
    );
    assert!(ran.success, "python3: {}", ran.all());
    ran.stdout.trim().to_owned()
}

/// How many `alert_state` rows of `device` python3's sqlite3 reads from a store file.
fn alert_states_per_python(db: &Path, device: &str) -> u64 {
    let script = format!(
        "import sqlite3\n\
         c = sqlite3.connect('file:{}?mode=ro', uri=True)\n\
         print(c.execute('SELECT COUNT(*) FROM alert_state WHERE device = ?', ('{device}',)).fetchone()[0])\n",
        db.display()
    );
    let ran = run(
        Command::new("python3").args(["-c", &script]),
        Duration::from_secs(20),
    );
    assert!(ran.success, "python3: {}", ran.all());
    ran.stdout.trim().parse().expect("a count")
}

/// The store file and its WAL in `dir`, as bytes.
fn file_bytes(dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for name in ["bridge.sqlite3", "bridge.sqlite3-wal"] {
        if let Ok(b) = std::fs::read(dir.join(name)) {
            all.extend(b);
        }
    }
    all
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn erase(config: &Path, patient: &str, extra: &[&str], env: Option<(&str, &str)>) -> common::Ran {
    let mut cmd = Command::new(bin());
    cmd.args([
        "erase",
        "--patient",
        patient,
        "--reason",
        "art. 17 request",
        "--config",
    ])
    .arg(config)
    .args(extra);
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    run(&mut cmd, Duration::from_secs(30))
}

/// `vitalmq audit verify` on one log (live: its tail may be unsigned).
fn verifies(log: &Path) {
    let ran = vitalmq_ok(bin(), &["audit", "verify", s(log), "--allow-unsigned-tail"]);
    assert!(ran.stdout.contains("chain intact"), "{}", ran.all());
}

#[test]
fn an_erased_patient_is_unreadable_everywhere_and_everyone_else_is_intact() {
    let rig = Rig::start(bin(), "erasure", 2, |_| {});
    let registry = rig.pki().join("registry.toml");
    let (a, b) = (
        patient_of(&registry, "dev-00001"),
        patient_of(&registry, "dev-00002"),
    );
    assert_ne!(a, b);
    let key_file = rig.dir().join("kek.json");
    vitalmq_ok(bin(), &["keys", "init", "--key-file", s(&key_file)]);
    let mut bridge = rig.bridge("", "[encryption]\nkey_file = \"kek.json\"\n");
    let mut sim = rig.sim(2, 5);
    common::sim_summary_all_receipted(&mut sim);
    rig.wait_stats(Duration::from_secs(30), "10 events stored", |st| {
        st["events"] == 10
    });
    bridge.process.signal("TERM");
    assert!(bridge.process.wait_exit(Duration::from_secs(30)).is_some());

    // A copy of the store taken before the erasure (the keyring is not part of it).
    let data = rig.data();
    let copy = rig.dir().join("copy");
    std::fs::create_dir(&copy).expect("copy dir");
    for name in ["bridge.sqlite3", "bridge.sqlite3-wal"] {
        if data.join(name).exists() {
            std::fs::copy(data.join(name), copy.join(name)).expect("copy");
        }
    }
    // Everything of both patients is sealed (an independent reader).
    let db = data.join("bridge.sqlite3");
    assert_eq!(sealed_per_python(&db, "dev-00001"), "5 True");
    assert_eq!(sealed_per_python(&db, "dev-00002"), "5 True");
    let a_event = events(&data)
        .into_iter()
        .find(|e| e["device"] == "dev-00001")
        .expect("an event of A");
    let a_event_id = a_event["event_id"].as_str().expect("id").to_owned();
    // With the key, A's event reads back (the payload is there before the erasure).
    let before = vitalmq_ok(
        bin(),
        &[
            "trace",
            &a_event_id,
            "--data",
            s(&data),
            "--key-file",
            s(&key_file),
        ],
    );
    assert!(!before.stdout.contains("payload:"), "{}", before.stdout);
    // A known measurement of A, readable before the erasure (with the key).
    let before_json = vitalmq_ok(
        bin(),
        &[
            "trace",
            &a_event_id,
            "--json",
            "--data",
            s(&data),
            "--key-file",
            s(&key_file),
        ],
    );
    assert!(
        before_json.stdout.contains("\"spo2\"") && before_json.stdout.contains("\"dev-00001\""),
        "{}",
        before_json.stdout
    );

    // Fail closed: no holds file known, or no encryption at rest, is a refusal.
    let bridge_toml = std::fs::read_to_string(rig.dir().join("bridge.toml")).expect("config");
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/examples/retention.toml");
    let lifecycle = format!(
        "[lifecycle]\nretention = {:?}\nholds = \"holds.toml\"\n",
        s(&policy)
    );
    let config = rig.dir().join("erase.toml");
    std::fs::write(&config, format!("{bridge_toml}{lifecycle}")).expect("erase config");
    let no_holds = erase(&rig.dir().join("bridge.toml"), &a, &[], None);
    assert!(
        !no_holds.success && no_holds.all().contains("refused: no legal holds file"),
        "{}",
        no_holds.all()
    );
    let plain = rig.dir().join("plain.toml");
    let without_encryption = bridge_toml.replace("[encryption]\nkey_file = \"kek.json\"\n", "");
    assert_ne!(without_encryption, bridge_toml);
    std::fs::write(&plain, format!("{without_encryption}{lifecycle}")).expect("plain config");
    let unencrypted = erase(&plain, &a, &[], None);
    assert!(
        !unencrypted.success
            && unencrypted
                .all()
                .contains("erasure needs encryption at rest"),
        "{}",
        unencrypted.all()
    );
    // The holds file is named but absent: refused too (never "nothing held").
    let missing = erase(&config, &a, &[], None);
    assert!(
        !missing.success && missing.all().contains("legal holds cannot be read"),
        "{}",
        missing.all()
    );
    let holds = rig.dir().join("holds.toml");
    let no_hold = "format = \"vitalmq-holds/v1\"\n";
    std::fs::write(&holds, no_hold).expect("holds");

    // Refused while assigned, and under a legal hold.
    let refused = erase(&config, &a, &[], None);
    assert!(
        !refused.success && refused.all().contains("still assigned"),
        "{}",
        refused.all()
    );
    std::fs::write(
        &holds,
        "format = \"vitalmq-holds/v1\"\n[[holds]]\nid = \"hold-1\"\nreason = \"litigation\"\n\
         placed_by = \"privacy-officer-1\"\nplaced_at = \"2026-01-01T00:00:00Z\"\n\
         device = \"dev-00001\"\n",
    )
    .expect("holds");
    let held = erase(&config, &a, &[], None);
    assert!(
        !held.success && held.all().contains("legal hold hold-1"),
        "{}",
        held.all()
    );
    std::fs::write(&holds, no_hold).expect("hold gone");
    vitalmq_ok(
        bin(),
        &[
            "registry",
            "unassign",
            "--registry",
            s(&registry),
            "--device",
            "dev-00001",
        ],
    );

    // Killed between the keyring erase and the cleanup: the rerun finishes.
    let crashed = erase(
        &config,
        &a,
        &[],
        Some(("VITALMQ_ERASE_ABORT_AFTER_KEYRING", "1")),
    );
    assert!(!crashed.success, "aborted: {}", crashed.all());
    let done = erase(&config, &a, &[], None);
    assert!(done.success, "{}", done.all());
    let report: Json = serde_json::from_str(done.stdout.trim()).expect("report");
    assert_eq!(report["already_erased"], true, "{report}");
    assert_eq!(report["unreadable_rows"]["events"], 5, "{report}");
    assert!(
        report["keys_destroyed"].as_u64().expect("n") >= 1,
        "{report}"
    );
    assert_eq!(report["wal_checkpointed"], true, "{report}");
    // This rig runs no alert rules (no alert state): the unit test of
    // `Store::erase_cleanup` covers the alert-state and quarantine deletions.
    assert_eq!(
        alert_states_per_python(&db, "dev-00001"),
        0,
        "A's alert state"
    );

    // A's rows read as erased, B's do not; here and in the copy (with the live keyring).
    let check = |dir: &Path| {
        let rows = events(dir);
        assert_eq!(rows.len(), 10);
        for r in &rows {
            let erased = r["erased"] == true;
            assert_eq!(erased, r["device"] == "dev-00001", "{r}");
        }
    };
    check(&data);
    std::fs::copy(data.join("keyring.sqlite3"), copy.join("keyring.sqlite3")).expect("keyring");
    check(&copy);
    let traced = vitalmq_ok(
        bin(),
        &[
            "trace",
            &a_event_id,
            "--data",
            s(&data),
            "--key-file",
            s(&key_file),
        ],
    );
    assert!(
        traced.stdout.contains("payload: erased at") && traced.stdout.contains("crypto-shredded"),
        "{}",
        traced.stdout
    );
    assert!(traced.stdout.contains(&a_event_id), "ids kept");
    let b_event = events(&copy)
        .into_iter()
        .find(|e| e["device"] == "dev-00002")
        .expect("B");
    let b_trace = vitalmq_ok(
        bin(),
        &[
            "trace",
            b_event["event_id"].as_str().expect("id"),
            "--data",
            s(&copy),
            "--key-file",
            s(&key_file),
        ],
    );
    assert!(
        !b_trace.stdout.contains("payload:"),
        "B readable: {}",
        b_trace.stdout
    );
    // No plaintext anywhere: the normalized JSON's keys, a measurement and A's device
    // inside JSON are in no file (main file, WAL, pre-erasure copy).
    for dir in [&data, &copy] {
        let bytes = file_bytes(dir);
        assert!(!bytes.is_empty());
        for needle in [&b"\"provenance\""[..], b"\"spo2\"", b"\"dev-00001\""] {
            assert!(
                !contains(&bytes, needle),
                "{} in {}",
                String::from_utf8_lossy(needle),
                dir.display()
            );
        }
    }
    // Every audit chain verifies.
    verifies(&data.join("audit.jsonl"));
    verifies(&data.join("operator-audit/operator.jsonl"));
    let ops = std::fs::read_to_string(data.join("operator-audit/operator.jsonl")).expect("log");
    assert!(ops.contains("\"erase\""), "erasure audited");
}
