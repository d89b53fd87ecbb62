//! The MQTT conformance checks of issue 18 (`tests/py/mqtt_conformance.py`, paho-mqtt)
//! against a real `vitalmq broker`: each test gets its own PKI, the shipped ACL and its
//! own broker, so sessions and retained messages of one check never meet another's.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value as Json;

use super::{Rig, run, vitalmq_ok};

/// A conformance check's longest run: its waits are bounded at 10 s each.
const RUN: Duration = Duration::from_secs(120);

/// Runs the checks of `point` for `version` ("311" or "5") through a fresh broker and
/// asserts every one passed; returns the checks' JSON lines.
pub fn assert_point(version: &str, point: u8) -> Vec<Json> {
    let bin = Path::new(env!("CARGO_BIN_EXE_vitalmq"));
    let rig = Rig::start(bin, &format!("conf{version}-{point}"), 2, |dir| {
        // A second integrator of site 01, for the shared subscription (point 10).
        vitalmq_ok(
            bin,
            &[
                "certs",
                "issue",
                "--dir",
                dir.join("pki").to_str().expect("utf-8"),
                "--role",
                "integrator",
                "--id",
                "int-site-01b",
                "--site",
                "site-01",
            ],
        );
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/mqtt_conformance.py");
    let ran = run(
        Command::new("python3")
            .arg(script)
            .args(["--port", &rig.broker.port.to_string()])
            .arg("--pki")
            .arg(rig.pki())
            .args(["--version", version, "--point", &point.to_string()]),
        RUN,
    );
    assert!(
        !ran.stderr.contains("ModuleNotFoundError"),
        "paho-mqtt is not installed: python3 -m pip install 'paho-mqtt==2.*' (scripts/test does)\n{}",
        ran.stderr
    );
    assert!(ran.success, "mqtt_conformance.py failed:\n{}", ran.all());
    let checks: Vec<Json> = ran
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!checks.is_empty(), "no check ran:\n{}", ran.all());
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| c["pass"] != Json::Bool(true))
        .map(|c| serde_json::to_string_pretty(c).expect("JSON"))
        .collect();
    assert!(
        failed.is_empty(),
        "MQTT {version}, point {point}: {} of {} checks failed:\n{}\nbroker log:\n{}",
        failed.len(),
        checks.len(),
        failed.join("\n"),
        rig.broker.stderr()
    );
    checks
}
