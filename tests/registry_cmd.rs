//! `vitalmq registry assign|unassign|retire` (issue 19): changes go through the
//! assignment history's rules, refused ones leave the file as it was, accepted ones are
//! written as a valid v2 registry, and every change is a verified operator action.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Ran, run, temp_dir, vitalmq_ok};
use serde_json::Value;
use vitalmq_envelope::DeviceId;
use vitalmq_policies::{DeviceRegistry, Use, parse_rfc3339};

const TIMEOUT: Duration = Duration::from_secs(60);

/// A v1 registry: the command must migrate it.
const V1: &str = r#"format = "vitalmq-registry/v1"
trust_domain = "demo.vitalmq"

[[devices]]
id = "dev-00042"
site = "site-a"
patient_ref = "pt-first"
alg = "EdDSA"
public_key = "50163016231421c3895b50daa2c884654e188d01a090529bbddd36d151e50d2f"
"#;

fn bin() -> &'static Path {
    vitalmq_bin!()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

fn registry(reg: &Path, args: &[&str]) -> Ran {
    let mut all = vec!["registry"];
    all.extend_from_slice(&args[..1]);
    all.extend_from_slice(&["--registry", s(reg), "--device", "dev-00042"]);
    all.extend_from_slice(&args[1..]);
    run(Command::new(bin()).args(&all), TIMEOUT)
}

fn ok(reg: &Path, args: &[&str]) -> Ran {
    let ran = registry(reg, args);
    assert!(ran.success, "{args:?}:\n{}", ran.all());
    ran
}

/// A refused change: non-zero exit, the error on stderr, the file byte for byte as it
/// was.
fn refused(reg: &Path, args: &[&str], why: &str) {
    let before = std::fs::read(reg).expect("registry");
    let ran = registry(reg, args);
    assert!(!ran.success, "{args:?} was accepted:\n{}", ran.all());
    assert!(ran.stderr.contains(why), "{args:?}: {}", ran.all());
    assert_eq!(
        std::fs::read(reg).expect("registry"),
        before,
        "file untouched"
    );
}

fn patient_at(reg: &DeviceRegistry, t: &str) -> Option<String> {
    let dev = DeviceId::new("dev-00042").expect("id");
    let t = parse_rfc3339(t).expect("time");
    match &reg.assignment_at(&dev, t)?.serves {
        Use::Assigned { patient_ref, site } => Some(format!("{patient_ref}@{site}")),
        Use::Retired => Some("retired".into()),
    }
}

fn verified_records(log: &Path) -> Vec<Value> {
    let public = std::fs::read_to_string(log.with_file_name("audit-signing.key.pem.pub"))
        .expect("the signing key's public half is beside the log");
    let ran = vitalmq_ok(
        bin(),
        &["audit", "verify", s(log), "--trusted-key", public.trim()],
    );
    assert!(ran.stdout.contains("chain intact"), "{}", ran.all());
    std::fs::read_to_string(log)
        .expect("log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("record"))
        .collect()
}

#[test]
fn assign_reassign_unassign_retire_keep_history_and_are_audited() {
    let dir = temp_dir("registry-cmd");
    let reg = dir.path().join("registry.toml");
    std::fs::write(&reg, V1).expect("write v1");

    // A reassignment of the v1 device: its open period is closed, a new one opens.
    let ran = ok(
        &reg,
        &[
            "assign",
            "--patient-ref",
            "pt-second-01",
            "--site",
            "site-a",
            "--at",
            "2026-01-01T00:00:00Z",
        ],
    );
    assert!(
        ran.stdout
            .contains("- 1970-01-01T00:00:00Z .. open: patient pt-first on site-a"),
        "{}",
        ran.all()
    );
    assert!(
        ran.stdout
            .contains("+ 1970-01-01T00:00:00Z .. 2026-01-01T00:00:00Z: patient pt-first"),
        "{}",
        ran.all()
    );
    assert!(
        ran.stdout
            .contains("+ 2026-01-01T00:00:00Z .. open: patient pt-second-01 on site-a"),
        "{}",
        ran.all()
    );
    let text = std::fs::read_to_string(&reg).expect("registry");
    assert!(text.contains("format = \"vitalmq-registry/v2\""), "{text}");
    let mode = std::fs::metadata(&reg).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "written owner-only");

    ok(
        &reg,
        &[
            "assign",
            "--patient-ref",
            "pt-third-001",
            "--site",
            "site-b",
            "--at",
            "2026-02-01T00:00:00+01:00",
        ],
    );
    // Overlapping: a period from mid-2025 would run into the later ones.
    refused(
        &reg,
        &[
            "assign",
            "--patient-ref",
            "pt-x0000001",
            "--site",
            "site-a",
            "--at",
            "2025-06-01T00:00:00Z",
        ],
        "overlaps",
    );
    ok(&reg, &["unassign", "--at", "2026-03-01T00:00:00Z"]);
    ok(&reg, &["retire", "--at", "2026-04-01T00:00:00Z"]);
    refused(
        &reg,
        &["assign", "--patient-ref", "pt-y0000001", "--site", "site-a"],
        "retired since",
    );
    refused(&reg, &["unassign", "--at", "nope"], "--at nope");

    let loaded = DeviceRegistry::load(&reg).expect("the file is still a valid registry");
    assert_eq!(
        patient_at(&loaded, "2025-12-31T23:59:59.999Z").as_deref(),
        Some("pt-first@site-a")
    );
    assert_eq!(
        patient_at(&loaded, "2026-01-15T00:00:00Z").as_deref(),
        Some("pt-second-01@site-a")
    );
    assert_eq!(
        patient_at(&loaded, "2026-01-31T23:00:00Z").as_deref(),
        Some("pt-third-001@site-b"),
        "00:00+01:00 is 23:00Z the day before"
    );
    assert_eq!(
        patient_at(&loaded, "2026-03-15T00:00:00Z"),
        None,
        "unassigned"
    );
    assert_eq!(
        patient_at(&loaded, "2030-01-01T00:00:00Z").as_deref(),
        Some("retired")
    );
    let no_tmp = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(Result::ok)
        .all(|e| !e.file_name().to_string_lossy().ends_with(".tmp"));
    assert!(no_tmp, "no temporary left behind");

    // The operator log beside the registry: every attempt, refused ones as failed.
    let records = verified_records(&dir.path().join("audit/operator.jsonl"));
    let outcomes = |action: &str| -> Vec<String> {
        records
            .iter()
            .filter(|r| r["event"] == "operator_action" && r["action"] == action)
            .map(|r| {
                assert_eq!(r["resource"], "device/dev-00042");
                assert!(
                    !r.to_string().contains("pt-"),
                    "no patient pseudonym in the operator log: {r}"
                );
                r["reason"].as_str().expect("reason").to_owned()
            })
            .collect()
    };
    assert_eq!(
        outcomes("registry.assign"),
        [
            "started",
            "succeeded",
            "started",
            "succeeded",
            "started",
            "failed",
            "started",
            "failed"
        ]
    );
    assert_eq!(
        outcomes("registry.unassign"),
        ["started", "succeeded", "started", "failed"]
    );
    assert_eq!(outcomes("registry.retire"), ["started", "succeeded"]);
    let failed = records
        .iter()
        .find(|r| r["action"] == "registry.assign" && r["reason"] == "failed")
        .expect("a failed assign");
    assert!(
        failed["details"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("overlaps")),
        "{failed}"
    );
}

#[test]
fn an_unknown_device_or_a_bad_pseudonym_changes_nothing() {
    let dir = temp_dir("registry-cmd-bad");
    let reg = dir.path().join("registry.toml");
    std::fs::write(&reg, V1).expect("write v1");
    // Names, record numbers and refs that only start like a pseudonym are refused, by
    // the CLI and (through the same code) the admin API.
    for bad in [
        "Jane Doe",
        "MRN4711",
        "mrn-12345678",
        "pt-4711",
        "pt-1234567",
        "pt-ABCDEF12",
        "pt-1234_5678",
        "PT-12345678",
    ] {
        refused(
            &reg,
            &["assign", "--patient-ref", bad, "--site", "site-a"],
            "pseudonymous token",
        );
    }
    ok(
        &reg,
        &["assign", "--patient-ref", "pt-12345678", "--site", "site-a"],
    );
    let before = std::fs::read(&reg).expect("registry");
    let ran = run(
        Command::new(bin()).args([
            "registry",
            "retire",
            "--registry",
            s(&reg),
            "--device",
            "dev-99999",
        ]),
        TIMEOUT,
    );
    assert!(
        !ran.success && ran.stderr.contains("dev-99999"),
        "{}",
        ran.all()
    );
    assert_eq!(std::fs::read(&reg).expect("registry"), before);
}

/// Eight operators at once, each unassigning another device: every change is in the
/// file afterwards (none lost to a read-modify-write race).
#[test]
fn a_change_gives_up_on_a_registry_locked_past_the_deadline() {
    let dir = temp_dir("registry-cmd-stuck");
    let reg = dir.path().join("registry.toml");
    std::fs::write(&reg, V1).expect("write v1");
    // A stuck writer: this test holds the registry directory's lock throughout.
    let held = vitalmq_private_fs::lock_dir(dir.path()).expect("lock");
    let started = std::time::Instant::now();
    refused(&reg, &["unassign"], "stayed locked by another writer");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(10) && waited < TIMEOUT,
        "gave up after its deadline, not before and not never: {waited:?}"
    );
    drop(held);
    ok(&reg, &["unassign"]);
}

#[test]
fn concurrent_changes_take_turns() {
    let dir = temp_dir("registry-cmd-race");
    let reg = dir.path().join("registry.toml");
    let ids: Vec<String> = (1..=8).map(|n| format!("dev-{n:05}")).collect();
    let (head, device) = V1.split_once("[[devices]]").expect("a device");
    let mut text = head.to_owned();
    for id in &ids {
        text.push_str("[[devices]]");
        text.push_str(&device.replace("dev-00042", id));
    }
    std::fs::write(&reg, &text).expect("write");
    DeviceRegistry::load(&reg).expect("eight devices");
    let children: Vec<_> = ids
        .iter()
        .map(|id| {
            Command::new(bin())
                .args([
                    "registry",
                    "unassign",
                    "--registry",
                    s(&reg),
                    "--device",
                    id,
                    "--at",
                    "2026-01-01T00:00:00Z",
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let loaded = DeviceRegistry::load(&reg).expect("valid");
    let t = parse_rfc3339("2026-06-01T00:00:00Z").expect("time");
    for id in &ids {
        let dev = DeviceId::new(id.clone()).expect("id");
        assert!(
            loaded.assignment_at(&dev, t).is_none(),
            "{id}'s unassignment was lost:\n{}",
            std::fs::read_to_string(&reg).expect("registry")
        );
    }
}

/// `registry consent grant|withdraw`: the grant and the withdrawal land in the file
/// (read back through the registry's own consent rules), refused ones (care, an
/// overlap, nothing to withdraw) change nothing, and each attempt is audited.
#[test]
fn consent_grant_and_withdraw_are_written_and_audited() {
    let dir = temp_dir("registry-cmd-consent");
    let reg = dir.path().join("registry.toml");
    std::fs::write(&reg, V1).expect("write v1");
    let consent = |sub: &str, rest: &[&str]| {
        let mut all = vec![
            "registry",
            "consent",
            sub,
            "--registry",
            s(&reg),
            "--device",
            "dev-00042",
        ];
        all.extend_from_slice(rest);
        run(Command::new(bin()).args(&all), TIMEOUT)
    };
    let ran = consent(
        "grant",
        &[
            "--purpose",
            "research",
            "--from",
            "2026-01-10T00:00:00Z",
            "--until",
            "2026-06-01T00:00:00Z",
        ],
    );
    assert!(ran.success, "{}", ran.all());
    assert!(
        ran.stdout
            .contains("+ consent research 2026-01-10T00:00:00Z .. 2026-06-01T00:00:00Z"),
        "{}",
        ran.all()
    );
    let refused_consent = |sub: &str, rest: &[&str], why: &str| {
        let before = std::fs::read(&reg).expect("registry");
        let ran = consent(sub, rest);
        assert!(!ran.success && ran.stderr.contains(why), "{}", ran.all());
        assert_eq!(std::fs::read(&reg).expect("registry"), before);
    };
    refused_consent(
        "grant",
        &["--purpose", "research", "--from", "2026-03-01T00:00:00Z"],
        "overlaps",
    );
    refused_consent(
        "grant",
        &["--purpose", "care", "--from", "2026-03-01T00:00:00Z"],
        "care is implied",
    );
    refused_consent(
        "grant",
        &["--purpose", "marketing", "--from", "2026-03-01T00:00:00Z"],
        "unknown purpose",
    );
    let ran = consent(
        "withdraw",
        &["--purpose", "research", "--at", "2026-02-01T00:00:00Z"],
    );
    assert!(ran.success, "{}", ran.all());
    refused_consent(
        "withdraw",
        &["--purpose", "research", "--at", "2026-03-01T00:00:00Z"],
        "no research grant",
    );

    let loaded = DeviceRegistry::load(&reg).expect("valid");
    let dev = DeviceId::new("dev-00042").expect("id");
    let covers = |t: &str| {
        let t = parse_rfc3339(t).expect("time");
        loaded
            .consent_at(&dev, t)
            .expect("assigned")
            .covers(vitalmq_policies::Purpose::Research, t)
    };
    assert!(!covers("2026-01-09T23:59:59Z"), "before the grant");
    assert!(covers("2026-01-20T00:00:00Z"), "granted");
    assert!(!covers("2026-02-01T00:00:00Z"), "withdrawn from --at on");

    let records = verified_records(&dir.path().join("audit/operator.jsonl"));
    let outcomes = |action: &str| -> Vec<String> {
        records
            .iter()
            .filter(|r| r["action"] == action)
            .map(|r| {
                assert_eq!(r["resource"], "device/dev-00042");
                r["reason"].as_str().expect("reason").to_owned()
            })
            .collect()
    };
    assert_eq!(
        outcomes("registry.consent.grant"),
        [
            "started",
            "succeeded",
            "started",
            "failed",
            "started",
            "failed",
            "started",
            "failed"
        ]
    );
    assert_eq!(
        outcomes("registry.consent.withdraw"),
        ["started", "succeeded", "started", "failed"]
    );
}

/// `vitalmq certs issue` adds devices to a PKI's registry while operators change it
/// (`registry unassign`, as the admin API does through the same code): both take the
/// lock on the registry's directory and re-read the file under it, so neither
/// overwrites the other's change. Several rounds of both at once; nothing is lost.
#[test]
fn certs_issue_and_registry_changes_take_turns() {
    const ROUNDS: usize = 4;
    const EACH: usize = 3;
    let dir = temp_dir("registry-cmd-certs-race");
    let pki = dir.path().join("pki");
    let devices = (ROUNDS * EACH).to_string();
    vitalmq_ok(
        bin(),
        &["certs", "init", "--dir", s(&pki), "--devices", &devices],
    );
    let reg = pki.join("registry.toml");
    let spawn = |args: &[&str]| {
        Command::new(bin())
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    let mut issued = Vec::new();
    let mut unassigned = Vec::new();
    for round in 0..ROUNDS {
        let mut children = Vec::new();
        for k in 0..EACH {
            let new = format!("dev-{:05}", 10_000 + round * EACH + k);
            children.push(spawn(&[
                "certs",
                "issue",
                "--dir",
                s(&pki),
                "--role",
                "device",
                "--id",
                &new,
                "--site",
                "site-01",
            ]));
            issued.push(new);
            let old = format!("dev-{:05}", 1 + round * EACH + k);
            children.push(spawn(&[
                "registry",
                "unassign",
                "--registry",
                s(&reg),
                "--device",
                &old,
                "--at",
                "2026-01-01T00:00:00Z",
            ]));
            unassigned.push(old);
        }
        for child in children {
            let out = child.wait_with_output().expect("wait");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let loaded = DeviceRegistry::load(&reg).expect("valid");
    let text = || std::fs::read_to_string(&reg).expect("registry");
    for id in &issued {
        let dev = DeviceId::new(id.clone()).expect("id");
        assert!(
            loaded.device(&dev).is_some(),
            "issued {id} was lost:\n{}",
            text()
        );
    }
    let t = parse_rfc3339("2026-06-01T00:00:00Z").expect("time");
    for id in &unassigned {
        let dev = DeviceId::new(id.clone()).expect("id");
        assert!(
            loaded.assignment_at(&dev, t).is_none(),
            "{id}'s unassignment was lost:\n{}",
            text()
        );
    }
    // Every issued certificate is in the CA's index: concurrent issues each read the
    // index under the lock, so none saves over another's entry.
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(pki.join("ca/index.json")).expect("the CA index"),
    )
    .expect("index JSON");
    let ids: Vec<&str> = index["certs"]
        .as_array()
        .expect("certs")
        .iter()
        .filter_map(|c| c["id"].as_str())
        .collect();
    for id in &issued {
        assert!(
            ids.contains(&id.as_str()),
            "issued {id} is not in the index: {ids:?}"
        );
    }
}
