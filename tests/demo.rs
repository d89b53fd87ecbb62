//! `vitalmq demo` as a new user runs it: the whole system in one process (broker gate,
//! bridge, simulated devices with injected faults) for 20 seconds. It must stop on its
//! own and report every device connected, every injected fault refused by the party and
//! with the reason the SPEC gives, nothing lost, and audit logs whose chains verify; and
//! the commands it suggests for looking around must work on what it left behind.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{run, temp_dir};

const DEVICES: u32 = 12;

fn bin() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_vitalmq"))
}

/// The `ok`/`FAIL` lines of the demo's checks.
fn checks(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with("ok ") || l.starts_with("FAIL "))
        .collect()
}

/// The check line about `what`, asserting it passed.
fn passed<'a>(stdout: &'a str, what: &str) -> &'a str {
    let line = checks(stdout)
        .into_iter()
        .find(|l| l.contains(what))
        .unwrap_or_else(|| panic!("no check about {what:?}:\n{stdout}"));
    assert!(line.starts_with("ok "), "{line}\n\n{stdout}");
    line
}

/// The number after `label` on the first line that has it.
fn number_after(stdout: &str, label: &str) -> usize {
    stdout
        .lines()
        .find_map(|l| l.split_once(label))
        .and_then(|(_, rest)| {
            rest.trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {label:?} in:\n{stdout}"))
}

/// The scripted desaturation episode raised at least one clinical alert for its device,
/// seen by the operator's subscription.
fn assert_alerts_raised_for_the_scripted_episode(stdout: &str) {
    let n = number_after(
        stdout,
        "alerts for the scripted episode (desaturation on dev-00001):",
    );
    assert!(n >= 1, "no alert for the scripted episode:\n{stdout}");
    assert!(
        stdout.contains("ALERT alerts/") && stdout.contains("device dev-00001"),
        "{stdout}"
    );
}

#[test]
fn demo_runs_the_whole_system_and_accounts_for_every_fault() {
    let tmp = temp_dir("vitalmq-demo");
    let dir = tmp.path().join("work");
    let out = run(
        Command::new(bin())
            .args([
                "demo",
                "--duration",
                "20s",
                "--devices",
                &DEVICES.to_string(),
            ])
            .arg("--dir")
            .arg(&dir),
        Duration::from_secs(150),
    );
    assert!(out.success, "exit {:?}\n{}", out.code, out.all());
    let stdout = &out.stdout;
    assert!(
        stdout.contains("demo ok: all") && checks(stdout).iter().all(|l| l.starts_with("ok ")),
        "{stdout}"
    );

    passed(
        stdout,
        &format!("every device connected ({DEVICES}/{DEVICES}"),
    );
    // Each fault, refused by the party and with the reason the SPEC gives it.
    for (fault, evidence) in [
        ("duplicate on dev-00003", "as duplicate"),
        ("replay on dev-00004", "as replay"),
        (
            "bad-signature on dev-00005",
            "quarantined 1 message as bad_signature",
        ),
        ("out-of-order on dev-00006", "late (out_of_order)"),
        (
            "wrong-topic on dev-00007 (MQTT 3.1.1)",
            "device saw: connection closed by the broker",
        ),
        ("wrong-topic on dev-00007", "audited 1 publish denial"),
        (
            "wrong-topic on dev-00008 (MQTT 5)",
            "device saw: PUBACK NotAuthorized",
        ),
        ("wrong-topic on dev-00008", "audited 1 publish denial"),
        ("foreign-client-id on dev-00009", "CONNACK NotAuthorized"),
        ("foreign-client-id on dev-00009", "client_id_mismatch"),
        (
            "revoked-certificate on dev-00012",
            "TLS alert CertificateRevoked",
        ),
        ("revoked-certificate on dev-00012", "as certificate_revoked"),
        ("clock-skew on dev-00010", "0 refused"),
        ("reboot-storm on dev-00011", "0 replays"),
        ("reconnect storm", "reconnected"),
    ] {
        let line = passed(stdout, fault);
        assert!(
            line.contains(evidence),
            "{fault}: {evidence:?} missing in {line}"
        );
    }
    passed(
        stdout,
        "the quarantine holds exactly the injected forgeries: bad_signature 1",
    );
    passed(
        stdout,
        "nothing lost: every message a device sent is stored exactly once",
    );
    passed(stdout, "audit log of the broker: chain intact");
    passed(stdout, "audit log of the bridge: chain intact");

    // The alert counts are always shown; what they must be depends on the alert engine.
    number_after(stdout, "alerts seen:");
    assert_alerts_raised_for_the_scripted_episode(stdout);

    // The commands it suggests work on what it left.
    for log in [
        dir.join("broker/audit.jsonl"),
        dir.join("bridge-data/audit.jsonl"),
    ] {
        let verified = run(
            Command::new(bin()).args(["audit", "verify"]).arg(&log),
            Duration::from_secs(30),
        );
        assert!(verified.success, "{}", verified.all());
        assert!(
            verified.stdout.contains("chain intact"),
            "{}",
            verified.stdout
        );
    }
    let data = dir.join("bridge-data");
    let stats = run(
        Command::new(bin())
            .args(["store", "stats", "--data"])
            .arg(&data),
        Duration::from_secs(30),
    );
    assert!(stats.success, "{}", stats.all());
    let stats: serde_json::Value = serde_json::from_str(stats.stdout.trim()).expect("stats JSON");
    assert_eq!(stats["quarantine"]["bad_signature"], 1, "{stats}");
    assert_eq!(stats["devices"], DEVICES, "{stats}");
    assert_eq!(
        stats["sinks"]["objects"], stats["head"],
        "the object sink has everything: {stats}"
    );
    let quarantine = run(
        Command::new(bin())
            .args(["store", "quarantine", "--data"])
            .arg(&data),
        Duration::from_secs(30),
    );
    assert!(
        quarantine.stdout.contains("\"reason\":\"bad_signature\""),
        "{}",
        quarantine.all()
    );
    assert!(
        dir.join("objects")
            .read_dir()
            .expect("objects dir")
            .next()
            .is_some()
    );

    // The PKI it made is one openssl accepts.
    let verified = run(
        Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(dir.join("pki/ca/ca.pem"))
            .arg(dir.join("pki/identities/device/dev-00001.pem")),
        Duration::from_secs(30),
    );
    assert!(verified.success, "{}", verified.all());

    // A second run into the same directory refuses rather than overwrite anything.
    let again = run(
        Command::new(bin()).args(["demo", "--dir"]).arg(&dir),
        Duration::from_secs(60),
    );
    assert!(!again.success, "re-running into a used directory must fail");
    assert!(again.stderr.contains("not empty"), "{}", again.stderr);
}
