//! The shipped DuckDB SQL (`queries/`) over data sets OUR code writes, with known
//! answers (issue 21: "shipped SQL run against them with known answers"):
//!
//! * a synthetic fleet written by `vitalmq surveil generate` (the planted LOT-C
//!   defect; `surveillance::synth`), its truth in `synth.json`: every shipped query
//!   runs (`tests/py/surveil_synth.py`), every measure's count per lot equals what the
//!   generator says it wrote, and LOT-C alone stands out for dropped messages.
//!
//! Needs `python3 -m pip install 'pyarrow==22.*' 'duckdb==1.*'` (scripts/test does).

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{run, temp_dir, vitalmq_ok};
use serde_json::Value as Json;

fn check_sql(root: &Path, extra: &[&str]) -> Json {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = run(
        Command::new("python3")
            .arg(repo.join("tests/py/surveil_synth.py"))
            .arg(repo.join("queries"))
            .arg(root)
            .args(extra),
        Duration::from_secs(120),
    );
    assert!(
        !out.stderr.contains("ModuleNotFoundError"),
        "duckdb is not installed: run `python3 -m pip install 'pyarrow==22.*' 'duckdb==1.*'` (scripts/test does)\n{}",
        out.stderr
    );
    assert!(out.success, "the SQL checks failed:\n{}", out.all());
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", out.stdout))
}

/// Every file and directory under `dir` is owner-only.
fn assert_owner_only(dir: &Path) {
    for entry in walk(dir) {
        let mode = std::fs::metadata(&entry).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", entry.display());
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_owned()];
    for e in std::fs::read_dir(dir).expect("dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn shipped_sql_over_a_generated_fleet_gives_the_generators_truth() {
    let dir = temp_dir("surveil-synth");
    let root = dir.path().join("fleet");
    let root_s = root.to_str().expect("utf-8");
    let bin = Path::new(env!("CARGO_BIN_EXE_vitalmq"));
    let args = [
        "surveil",
        "generate",
        "--devices",
        "12",
        "--days",
        "14",
        "--interval",
        "120s",
        "--seed",
        "7",
        "--out",
        root_s,
        "--json",
    ];
    let out = vitalmq_ok(bin, &args);
    let printed: Json = serde_json::from_str(&out.stdout).expect("truth JSON");
    let written: Json =
        serde_json::from_slice(&std::fs::read(root.join("synth.json")).expect("synth.json"))
            .expect("JSON");
    assert_eq!(printed, written, "the truth printed is the one kept");
    let truth = &written["truth"];
    assert_eq!(truth["weeks"], serde_json::json!(["2026-W02", "2026-W03"]));
    assert_eq!(truth["fleet"]["devices"], 12);
    assert_eq!(truth["fleet"]["device_weeks"], 24);
    assert!(
        truth["fleet"]["boots"].as_u64().expect("boots") > 24,
        "devices reboot within a week too: {truth}"
    );
    assert_owner_only(&root);
    // A second run into the same directory would mix two fleets: refused.
    let again = run(Command::new(bin).args(args), Duration::from_secs(60));
    assert!(!again.success, "a non-empty --out must be refused");
    assert!(again.stderr.contains("not empty"), "{}", again.stderr);

    let found = check_sql(&root, &[]);
    assert_eq!(found["outliers_dropped"][0]["value"], "LOT-C", "{found}");
}
