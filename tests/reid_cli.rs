//! `vitalmq reid` (issue 19): the re-identification store holds the pseudonym key and
//! the enrolment ids, owner-only; a lookup prints an enrolment id only to an authorised
//! identity stating a purpose; every enrolment and lookup, granted or refused, is in the
//! store's operator audit log, which never names the enrolment id.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Ran, run, temp_dir, vitalmq_ok};
use serde_json::Value;
use vitalmq_policies::{Pseudonymiser, is_pseudonym};

const TIMEOUT: Duration = Duration::from_secs(60);
const ALICE: &str = "spiffe://demo.vitalmq/operator/alice";
const BOB: &str = "spiffe://demo.vitalmq/operator/bob";

fn bin() -> &'static Path {
    vitalmq_bin!()
}

fn vitalmq(args: &[&str]) -> Ran {
    // The log beside the store, whatever the environment running the tests says.
    run(
        Command::new(bin())
            .args(args)
            .env_remove("VITALMQ_OPERATOR_AUDIT"),
        TIMEOUT,
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o7777
}

fn enrol(store: &Path, id: &str) -> String {
    let ran = vitalmq(&["reid", "enrol", "--store", s(store), "--enrolment-id", id]);
    assert!(ran.success, "{}", ran.all());
    ran.stdout.trim().to_owned()
}

fn audit_log(store: &Path) -> PathBuf {
    store.join("audit").join("operator.jsonl")
}

/// The operator records of `action` in the store's log, after `vitalmq audit verify`
/// accepted the log under the key beside it.
fn verified_actions(store: &Path, action: &str) -> Vec<Value> {
    let log = audit_log(store);
    let public = std::fs::read_to_string(log.with_file_name("audit-signing.key.pem.pub"))
        .expect("the signing key's public half is beside the log");
    let ran = vitalmq_ok(
        bin(),
        &["audit", "verify", s(&log), "--trusted-key", public.trim()],
    );
    assert!(ran.stdout.contains("chain intact"), "{}", ran.all());
    std::fs::read_to_string(&log)
        .expect("log")
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("record"))
        .filter(|r| r["event"] == "operator_action" && r["action"] == action)
        .collect()
}

#[test]
fn enrol_makes_an_owner_only_store_and_records_each_id_once() {
    let tmp = temp_dir("reid-enrol");
    let store = tmp.path().join("reid");
    let first = enrol(&store, "E-1001");
    assert!(is_pseudonym(&first), "{first}");
    assert_eq!(enrol(&store, "E-1001"), first, "deterministic");
    let other = enrol(&store, "E-1002");
    assert_ne!(other, first);

    // The printed pseudonym is the care pseudonym under the stored key.
    let key: [u8; 32] = std::fs::read(store.join("reid.key"))
        .expect("key")
        .try_into()
        .expect("the key is 32 bytes");
    assert_eq!(
        Pseudonymiser::new(key)
            .pseudonym("E-1001", None)
            .expect("valid"),
        first
    );
    let map = std::fs::read_to_string(store.join("reid.jsonl")).expect("map");
    assert_eq!(map.lines().count(), 2, "one line per enrolment id:\n{map}");
    assert!(map.contains(&first) && map.contains("E-1001"), "{map}");

    assert_eq!(mode(&store), 0o700);
    for file in ["reid.key", "reid.jsonl", "authorised.toml"] {
        assert_eq!(mode(&store.join(file)), 0o600, "{file}");
    }
    // Enrolments are audited by pseudonym, never by enrolment id.
    let records = verified_actions(&store, "reid.enrol");
    assert_eq!(records.len(), 6, "started + succeeded, three times");
    let log = std::fs::read_to_string(audit_log(&store)).expect("log");
    assert!(!log.contains("E-100"), "the audit names no enrolment id");
    assert!(
        records
            .iter()
            .any(|r| r["resource"] == first.as_str() && r["reason"] == "succeeded"),
        "{records:?}"
    );
}

#[test]
fn enrol_refuses_a_directory_that_is_not_a_store() {
    let tmp = temp_dir("reid-notstore");
    std::fs::write(tmp.path().join("something.txt"), "x").expect("write");
    let ran = vitalmq(&[
        "reid",
        "enrol",
        "--store",
        s(tmp.path()),
        "--enrolment-id",
        "E-1",
    ]);
    assert!(!ran.success, "{}", ran.all());
    assert!(
        ran.stderr.contains("not a re-identification store"),
        "{}",
        ran.all()
    );
    assert!(!tmp.path().join("reid.key").exists());
}

#[test]
fn lookup_needs_an_authorised_identity_and_a_purpose_and_is_audited() {
    let tmp = temp_dir("reid-lookup");
    let store = tmp.path().join("reid");
    let pseudonym = enrol(&store, "E-2001");
    std::fs::write(
        store.join("authorised.toml"),
        format!("identities = [\"{ALICE}\"]\n"),
    )
    .expect("authorise alice");

    let lookup = |extra: &[&str]| {
        let mut args = vec!["reid", "lookup", "--store", s(&store)];
        args.extend_from_slice(extra);
        vitalmq(&args)
    };

    // Refusals: each exits non-zero and prints no enrolment id.
    let unknown = "pt-00000000000000000000000000000000";
    let refused: [(&[&str], &str); 5] = [
        (
            &[
                "--pseudonym",
                &pseudonym,
                "--purpose",
                "audit",
                "--identity",
                BOB,
            ],
            "not authorised",
        ),
        (
            &["--pseudonym", &pseudonym, "--identity", ALICE],
            "no purpose",
        ),
        (
            &[
                "--pseudonym",
                &pseudonym,
                "--purpose",
                "  ",
                "--identity",
                ALICE,
            ],
            "no purpose",
        ),
        (
            &["--pseudonym", &pseudonym, "--purpose", "audit"],
            "no identity",
        ),
        (
            &[
                "--pseudonym",
                unknown,
                "--purpose",
                "audit",
                "--identity",
                ALICE,
            ],
            "no enrolment",
        ),
    ];
    for (args, why) in refused {
        let ran = lookup(args);
        assert!(!ran.success, "{args:?}: {}", ran.all());
        assert!(ran.stderr.contains(why), "{args:?}: {}", ran.all());
        assert!(!ran.all().contains("E-2001"), "{args:?}: {}", ran.all());
    }

    // Granted: the authorised identity with a purpose gets the enrolment id.
    let ran = lookup(&[
        "--pseudonym",
        &pseudonym,
        "--purpose",
        "clinical safety review",
        "--identity",
        ALICE,
    ]);
    assert!(ran.success, "{}", ran.all());
    assert_eq!(ran.stdout.trim(), "E-2001");

    let records = verified_actions(&store, "reid.lookup");
    let with = |outcome: &str| -> Vec<&Value> {
        records.iter().filter(|r| r["reason"] == outcome).collect()
    };
    assert_eq!(with("started").len(), 6, "{records:#?}");
    let failed = with("failed");
    assert_eq!(failed.len(), 5, "{records:#?}");
    for why in [
        "not authorised",
        "no purpose",
        "no identity",
        "no enrolment",
    ] {
        assert!(
            failed.iter().any(|r| r["details"]["error"]
                .as_str()
                .is_some_and(|e| e.contains(why))),
            "no refusal recorded for {why}: {failed:#?}"
        );
    }
    assert!(
        failed
            .iter()
            .any(|r| r["details"]["identity"] == BOB && r["resource"] == pseudonym.as_str()),
        "{failed:#?}"
    );
    let succeeded = with("succeeded");
    assert_eq!(succeeded.len(), 1, "{records:#?}");
    assert_eq!(succeeded[0]["resource"], pseudonym.as_str());
    assert_eq!(succeeded[0]["details"]["identity"], ALICE);
    assert_eq!(succeeded[0]["details"]["purpose"], "clinical safety review");
    assert_eq!(succeeded[0]["details"]["granted"], true);
    let log = std::fs::read_to_string(audit_log(&store)).expect("log");
    assert!(!log.contains("E-2001"), "the audit names no enrolment id");
}

#[test]
fn lookup_refuses_a_missing_or_exposed_store() {
    let tmp = temp_dir("reid-exposed");
    let missing = tmp.path().join("nowhere");
    let args = |store: &Path| {
        vitalmq(&[
            "reid",
            "lookup",
            "--store",
            s(store),
            "--pseudonym",
            "pt-00000000000000000000000000000000",
            "--purpose",
            "audit",
            "--identity",
            ALICE,
        ])
    };
    let ran = args(&missing);
    assert!(
        !ran.success && ran.stderr.contains("no re-identification store"),
        "{}",
        ran.all()
    );
    assert!(!missing.exists(), "a mistyped store gets no audit log");

    let store = tmp.path().join("reid");
    enrol(&store, "E-3001");
    std::fs::set_permissions(
        store.join("reid.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    let ran = args(&store);
    assert!(!ran.success, "{}", ran.all());
    assert!(
        ran.stderr.contains("readable by other local users"),
        "{}",
        ran.all()
    );
}

/// The store's files are named only by the `vitalmq reid` command and the admin service
/// that serves its lookups (issue 19: `vitalmq admin serve`, whose configuration may
/// name the store): no broker or bridge code (nor any other crate) can open them, and
/// no broker or bridge configuration points at them.
#[test]
fn only_the_reid_command_names_the_store_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut offenders = Vec::new();
    let mut stack: Vec<PathBuf> = [
        "src",
        "broker",
        "bridge",
        "policies",
        "audit",
        "envelope",
        "private-fs",
        "certs",
        "ops-http",
        "device-sim",
        "mqtt-client",
        "loadgen",
        "examples",
        "admin",
    ]
    .iter()
    .map(|d| root.join(d))
    .collect();
    let mut seen = 0;
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                if !path.ends_with("target") {
                    stack.push(path);
                }
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            seen += 1;
            let names_store = ["reid.key", "reid.jsonl", "reid_store", "reid-store"]
                .iter()
                .any(|name| text.contains(name));
            // The admin service may open the store (its configuration names it).
            let admin_service = [
                root.join("src/admin_cmd.rs"),
                root.join("admin/src/config.rs"),
                root.join("admin/examples/admin.toml"),
            ];
            if names_store
                && !path.starts_with(root.join("src/reid_cmd"))
                && path != root.join("src/reid_cmd.rs")
                && !admin_service.contains(&path)
            {
                offenders.push(path);
            }
        }
    }
    assert!(seen > 100, "walked the workspace sources ({seen} files)");
    assert!(
        offenders.is_empty(),
        "outside `vitalmq reid`: {offenders:?}"
    );
}

/// Enrolments racing on a new store agree on one key and record the id once: the key
/// is linked into place whole, and the map is appended under an exclusive lock.
#[test]
fn racing_first_enrolments_share_one_key_and_one_record() {
    let tmp = temp_dir("reid-race");
    let store = tmp.path().join("reid");
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            std::thread::spawn(move || enrol(&store, "E-4001"))
        })
        .collect();
    let printed: Vec<String> = racers
        .into_iter()
        .map(|t| t.join().expect("racer"))
        .collect();
    assert!(printed.iter().all(|p| p == &printed[0]), "{printed:?}");
    let map = std::fs::read_to_string(store.join("reid.jsonl")).expect("map");
    assert_eq!(map.lines().count(), 1, "{map}");
    let leftovers: Vec<_> = std::fs::read_dir(&store)
        .expect("store")
        .map(|e| e.expect("entry").file_name())
        .filter(|n| n.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
