//! The shipped DuckDB SQL (`queries/`) against a simulated fleet with a planted defect
//! (`tests/py/surveil_queries.py`: LOT-C drops 5x the messages and opens more gaps),
//! with the Parquet data set written by pyarrow in the pinned layout: every shipped
//! file runs, with known answers.
//!
//! The same fleet, as rows (`fleet.json`), is then asked the same questions by
//! `vitalmq surveil --rows` (the command's aggregations, without a store): the answers
//! must be the SQL's, row for row.
//!
//! Needs `python3 -m pip install 'pyarrow==22.*' 'duckdb==1.*'` (scripts/test does).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{run, temp_dir, vitalmq_ok};
use serde_json::Value as Json;

/// Runs the script; its stdout is the queries' results (query name -> rows).
fn sql_results(work: &Path) -> Json {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = run(
        Command::new("python3")
            .arg(root.join("tests/py/surveil_queries.py"))
            .arg(root.join("queries"))
            .arg(work),
        Duration::from_secs(120),
    );
    assert!(
        !out.stderr.contains("ModuleNotFoundError"),
        "pyarrow or duckdb is not installed: run `python3 -m pip install 'pyarrow==22.*' 'duckdb==1.*'` (scripts/test does)\n{}",
        out.stderr
    );
    assert!(out.success, "the SQL checks failed:\n{}", out.all());
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", out.stdout))
}

#[test]
fn shipped_sql_finds_the_planted_lot() {
    let dir = temp_dir("surveil-sql");
    let results = sql_results(dir.path());
    let top = &results["outliers_dropped"][0];
    assert_eq!(top["value"], "LOT-C", "{top}");
    assert_eq!(top["stands_out"], true, "{top}");
}

/// Numbers (DuckDB may hand decimals over as strings) within 1e-6; the rest equal.
fn same(a: &Json, b: &Json) -> bool {
    let num = |v: &Json| match v {
        Json::Number(n) => n.as_f64(),
        Json::String(s) => s.parse::<f64>().ok(),
        _ => None,
    };
    match (a, b) {
        (Json::Object(x), Json::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        (Json::Array(x), Json::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same(v, w))
        }
        _ => match (num(a), num(b)) {
            (Some(x), Some(y)) => (x - y).abs() <= 1e-6 * x.abs().max(1.0),
            _ => a == b,
        },
    }
}

fn assert_same(what: &str, sql: &Json, cmd: &Json) {
    let (Some(s), Some(c)) = (sql.as_array(), cmd.as_array()) else {
        panic!("{what}: not arrays");
    };
    assert_eq!(s.len(), c.len(), "{what}: row counts differ");
    for (i, (x, y)) in s.iter().zip(c).enumerate() {
        assert!(
            same(x, y),
            "{what} row {i} differs:\n  sql: {x}\n  cmd: {y}"
        );
    }
}

#[test]
fn the_command_answers_as_the_sql_does() {
    let dir = temp_dir("surveil-same");
    let sql = sql_results(dir.path());
    let bin = Path::new(env!("CARGO_BIN_EXE_vitalmq"));
    let fleet = dir.path().join("fleet.json");
    let fleet = fleet.to_str().expect("utf-8 path");
    let ask = |args: &[&str]| -> Json {
        let mut all = vec!["surveil"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--rows", fleet, "--json"]);
        let out = vitalmq_ok(bin, &all);
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", out.stdout))
    };
    assert_same("rates_by", &sql["rates_by"], &ask(&["rates"]));
    assert_same(
        "outliers dropped",
        &sql["outliers_dropped"],
        &ask(&["outliers", "--measure", "dropped"]),
    );
    assert_same("outliers", &sql["outliers_all"], &ask(&["outliers"]));
    // A lot whose every message is refused stands out in the command as in the SQL.
    let refused = ask(&["outliers", "--measure", "refusals", "--dimension", "lot"]);
    assert_same("outliers refusals", &sql["outliers_refusals"], &refused);
    assert_eq!(refused[0]["value"], "LOT-E", "{refused}");
    assert_eq!(refused[0]["stands_out"], true, "{refused}");
    let one = |v: Json| {
        v.as_array()
            .and_then(|a| a.first().cloned())
            .expect("one row")
    };
    let psi = |reference: &str, compare: &str| {
        one(ask(&[
            "psi",
            "--metric",
            "spo2",
            "--reference",
            reference,
            "--compare",
            compare,
        ]))
    };
    for (key, got) in [
        ("psi_same", psi("2026-W47", "2026-W48")),
        ("psi_shifted", psi("2026-W47..2026-W48", "2026-W49")),
    ] {
        for col in ["reference_n", "compare_n", "psi"] {
            assert!(
                same(&sql[key][col], &got[col]),
                "{key} {col}: {} vs {got}",
                sql[key]
            );
        }
    }
    let score = |compare: &str| {
        one(ask(&[
            "psi-score",
            "--reference-version",
            "1.0.0",
            "--compare-version",
            compare,
        ]))
    };
    for (key, got) in [
        ("psi_score_self", score("1.0.0")),
        ("psi_score_candidate", score("1.1.0")),
    ] {
        for col in ["reference_n", "compare_n", "psi"] {
            assert!(
                same(&sql[key][col], &got[col]),
                "{key} {col}: {} vs {got}",
                sql[key]
            );
        }
    }
}
