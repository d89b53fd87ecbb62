//! `vitalmq demo` as a new user runs it: it must finish on its own, report every device
//! verified and every injected fault refused, and leave a PKI that openssl accepts.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{run, temp_dir};

#[test]
fn demo_runs_end_to_end_and_reports_what_it_checked() {
    let tmp = temp_dir("vitalmq-demo");
    let dir = tmp.path().join("work");
    let out = run(
        Command::new(env!("CARGO_BIN_EXE_vitalmq"))
            .args(["demo", "--devices", "6", "--sites", "2", "--dir"])
            .arg(&dir),
        Duration::from_secs(60),
    );
    assert!(out.success, "{}", out.all());
    assert!(out.stdout.contains("verified 6/6"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains("demo ok: 6 accepted, 6 refused with the expected reason"),
        "{}",
        out.stdout
    );
    for reason in [
        "bad_signature",
        "kid_mismatch",
        "unknown_key",
        "oversized",
        "malformed",
    ] {
        assert!(
            out.stdout.contains(reason),
            "{reason} missing:\n{}",
            out.stdout
        );
    }

    let cert = dir.join("identities/device/dev-00001.pem");
    let verified = run(
        Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(dir.join("ca/ca.pem"))
            .arg(&cert),
        Duration::from_secs(30),
    );
    assert!(verified.success, "{}", verified.all());

    // A second run into the same directory must refuse rather than overwrite the PKI.
    let again = run(
        Command::new(env!("CARGO_BIN_EXE_vitalmq"))
            .args(["demo", "--dir"])
            .arg(&dir),
        Duration::from_secs(60),
    );
    assert!(!again.success, "re-running into a used directory must fail");
    assert!(again.stderr.contains("not empty"), "{}", again.stderr);
}
