//! `vitalmq keys` (issue 20, point 4): the key file, data-key rotation, KEK rotation
//! with re-wrapping, sealing a service private key, and the operator audit of each.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use common::vitalmq_ok;
use serde_json::Value as Json;

fn bin() -> &'static Path {
    vitalmq_bin!()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

fn json(ran: &common::Ran) -> Json {
    serde_json::from_str(ran.stdout.trim()).expect("one JSON line")
}

#[test]
fn keys_rotate_rewrap_and_seal_under_audit() {
    let tmp = common::temp_dir("keys-cli");
    let key_file = tmp.path().join("keys").join("kek.json");
    let keyring = tmp.path().join("keyring.sqlite3");
    let (k, r) = (s(&key_file), s(&keyring));

    vitalmq_ok(bin(), &["keys", "init", "--key-file", k]);
    let mode = std::fs::metadata(&key_file)
        .expect("kek")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let again = common::run(
        std::process::Command::new(bin()).args(["keys", "init", "--key-file", k]),
        std::time::Duration::from_secs(20),
    );
    assert!(!again.success, "a key file is never overwritten");

    // Data-key versions for one subject: 1, then 2.
    let subject = "pt-aaaa1111";
    for expected in [1, 2] {
        let ran = vitalmq_ok(
            bin(),
            &[
                "keys",
                "rotate",
                "--key-file",
                k,
                "--keyring",
                r,
                "--subject",
                subject,
            ],
        );
        assert_eq!(json(&ran)["version"], expected, "{}", ran.all());
    }
    let status = json(&vitalmq_ok(
        bin(),
        &["keys", "status", "--key-file", k, "--keyring", r],
    ));
    assert_eq!(status["data_keys"], 2);
    assert_eq!(status["kek_version"], 1);

    // A KEK rotation re-wraps both data keys under version 2.
    let rotated = json(&vitalmq_ok(
        bin(),
        &["keys", "rotate-kek", "--key-file", k, "--keyring", r],
    ));
    assert_eq!(rotated["kek_version"], 2);
    assert_eq!(rotated["rewrapped"], 2);
    let status = json(&vitalmq_ok(
        bin(),
        &["keys", "status", "--key-file", k, "--keyring", r],
    ));
    assert_eq!(status["kek_version"], 2);
    assert_eq!(status["data_keys_under_older_kek"], 0);

    // A service key sealed under the KEK holds no plaintext key.
    let pem = tmp.path().join("server.key.pem");
    std::fs::write(
        &pem,
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n-----END PRIVATE KEY-----\n",
    )
    .expect("pem");
    let sealed = tmp.path().join("server.key.sealed");
    vitalmq_ok(
        bin(),
        &[
            "keys",
            "seal-file",
            "--key-file",
            k,
            "--input",
            s(&pem),
            "--output",
            s(&sealed),
        ],
    );
    let text = std::fs::read_to_string(&sealed).expect("sealed");
    assert!(text.contains("vitalmq-sealed-secret/v1") && !text.contains("PRIVATE KEY"));
    let mode = std::fs::metadata(&sealed)
        .expect("sealed")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    // Every action is in the operator log beside the key file, and the chain verifies.
    let log = tmp.path().join("keys").join("operator-audit.jsonl");
    let records = std::fs::read_to_string(&log).expect("operator log");
    for action in [
        "keys.init",
        "keys.rotate",
        "keys.rotate_kek",
        "keys.status",
        "keys.seal_file",
    ] {
        assert!(
            records.contains(&format!("\"{action}\"")),
            "{action} not audited"
        );
    }
    let verified = vitalmq_ok(
        bin(),
        &["audit", "verify", s(&log), "--allow-unsigned-tail"],
    );
    assert!(
        verified.stdout.contains("chain intact"),
        "{}",
        verified.all()
    );
}
