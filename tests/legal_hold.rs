//! `vitalmq hold place|lift|list` (issue 20, point 2): holds are placed and lifted
//! through the holds file's rules, refused changes leave the file as it was, a lifted
//! hold stays in the file, the file is owner-only, concurrent placers both land, and
//! every change and refusal is a verified operator action that never names the patient.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Ran, run, temp_dir, vitalmq_ok};
use serde_json::Value;
use vitalmq_policies::LegalHolds;

const TIMEOUT: Duration = Duration::from_secs(60);
const PATIENT: &str = "pt-7f3a91c2";

fn bin() -> &'static Path {
    vitalmq_bin!()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

fn hold(file: &Path, args: &[&str]) -> Ran {
    let mut all = vec!["hold", args[0], "--holds", s(file)];
    all.extend_from_slice(&args[1..]);
    // One log per test directory, not a $VITALMQ_OPERATOR_AUDIT of the environment.
    run(
        Command::new(bin())
            .args(&all)
            .env_remove("VITALMQ_OPERATOR_AUDIT"),
        TIMEOUT,
    )
}

fn ok(file: &Path, args: &[&str]) -> Ran {
    let ran = hold(file, args);
    assert!(ran.success, "{args:?}:\n{}", ran.all());
    ran
}

/// A refused change: non-zero exit, the reason on stderr, the file as it was.
fn refused(file: &Path, args: &[&str], why: &str) {
    let before = std::fs::read(file).ok();
    let ran = hold(file, args);
    assert!(!ran.success, "{args:?} was accepted:\n{}", ran.all());
    assert!(ran.stderr.contains(why), "{args:?}: {}", ran.all());
    assert_eq!(std::fs::read(file).ok(), before, "file untouched");
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
        .filter(|r: &Value| r["event"] == "operator_action")
        .collect()
}

#[test]
fn place_list_lift_and_refusals_are_audited_and_keep_the_history() {
    let dir = temp_dir("legal-hold");
    let file = dir.path().join("holds.toml");

    ok(
        &file,
        &[
            "place",
            "--id",
            "lh-1",
            "--reason",
            "claim 2027/4",
            "--patient",
            PATIENT,
            "--from",
            "2026-01-01T00:00:00Z",
        ],
    );
    ok(
        &file,
        &[
            "place", "--id", "lh-2", "--reason", "recall", "--device", "dev-0042",
        ],
    );
    let mode = std::fs::metadata(&file)
        .expect("holds")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "owner-only holds file");

    // Refused: a duplicate id, a name for a pseudonym, a hold of nothing, an empty
    // range, lifting a hold that does not exist.
    refused(
        &file,
        &[
            "place", "--id", "lh-1", "--reason", "again", "--device", "dev-1",
        ],
        "exists already",
    );
    refused(
        &file,
        &[
            "place",
            "--id",
            "lh-3",
            "--reason",
            "x",
            "--patient",
            "Jane-Doe-MRN4711",
        ],
        "pseudonymous token",
    );
    refused(
        &file,
        &["place", "--id", "lh-3", "--reason", "x"],
        "a hold names a patient",
    );
    refused(
        &file,
        &[
            "place",
            "--id",
            "lh-3",
            "--reason",
            "x",
            "--from",
            "2026-02-01T00:00:00Z",
            "--to",
            "2026-01-01T00:00:00Z",
        ],
        "range is empty",
    );
    refused(
        &file,
        &["lift", "--id", "lh-9", "--reason", "x"],
        "no hold `lh-9`",
    );

    ok(
        &file,
        &["lift", "--id", "lh-1", "--reason", "claim settled"],
    );
    refused(
        &file,
        &["lift", "--id", "lh-1", "--reason", "again"],
        "lifted already",
    );
    let holds = LegalHolds::load(&file).expect("the written file loads");
    let active: Vec<_> = holds.holds().iter().map(|h| h.id.as_str()).collect();
    assert_eq!(active, ["lh-2"]);
    let lifted = &holds.lifted()[0];
    assert_eq!(lifted.hold.id, "lh-1");
    assert_eq!(lifted.reason, "claim settled");
    assert_eq!(lifted.hold.patient_ref.as_deref(), Some(PATIENT));

    let listed: Vec<Value> = ok(&file, &["list"])
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(listed.len(), 2, "{listed:?}");
    let one = listed
        .iter()
        .find(|h| h["id"] == "lh-1")
        .expect("lh-1 listed");
    assert_eq!(one["active"], false);
    assert_eq!(one["lift_reason"], "claim settled");
    assert!(one["lifted_by"].is_string() && one["placed_by"] == one["lifted_by"]);

    // Every change, refusal and listing, in order, in a verified chain.
    let log = dir.path().join("audit/operator.jsonl");
    let records = verified_records(&log);
    let outcomes: Vec<(String, String)> = records
        .iter()
        .filter(|r| r["reason"] != "started")
        .map(|r| {
            (
                r["action"].as_str().unwrap_or_default().to_owned(),
                r["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .split(':')
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    let want = [
        ("hold.place", "succeeded"),
        ("hold.place", "succeeded"),
        ("hold.place", "failed"),
        ("hold.place", "failed"),
        ("hold.place", "failed"),
        ("hold.place", "failed"),
        ("hold.lift", "failed"),
        ("hold.lift", "succeeded"),
        ("hold.lift", "failed"),
        ("holds.read", "succeeded"),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(a, o)| ((*a).to_owned(), (*o).to_owned()))
        .collect();
    assert_eq!(outcomes, want, "{records:#?}");
    let placed = records
        .iter()
        .find(|r| r["resource"] == "hold/lh-1" && r["reason"] == "succeeded")
        .expect("placement of lh-1 recorded");
    assert_eq!(placed["details"]["names_patient"], true, "{placed}");
    assert_eq!(placed["details"]["reason"], "claim 2027/4", "{placed}");
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        !text.contains(PATIENT) && !text.contains("Jane-Doe"),
        "the operator log never names the patient"
    );
}

/// Two operators placing holds at once: both holds are in the file (neither lost to a
/// read-modify-write race).
#[test]
fn concurrent_placers_both_land() {
    let dir = temp_dir("legal-hold-race");
    let file = dir.path().join("holds.toml");
    let ids: Vec<String> = (1..=4).map(|n| format!("lh-race-{n}")).collect();
    let children: Vec<_> = ids
        .iter()
        .map(|id| {
            Command::new(bin())
                .args([
                    "hold",
                    "place",
                    "--holds",
                    s(&file),
                    "--id",
                    id,
                    "--reason",
                    "race",
                    "--device",
                    "dev-1",
                ])
                .env_remove("VITALMQ_OPERATOR_AUDIT")
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
    let holds = LegalHolds::load(&file).expect("valid");
    let mut placed: Vec<_> = holds.holds().iter().map(|h| h.id.clone()).collect();
    placed.sort();
    assert_eq!(placed, ids);
    let records = verified_records(&dir.path().join("audit/operator.jsonl"));
    let succeeded = records
        .iter()
        .filter(|r| r["action"] == "hold.place" && r["reason"] == "succeeded")
        .count();
    assert_eq!(succeeded, ids.len());
}
