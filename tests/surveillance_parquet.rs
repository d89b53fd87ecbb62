//! The surveillance data set read back by independent readers: pyarrow and DuckDB from
//! PyPI (`tests/py/surveillance_read.py`). A synthetic fleet (with the planted LOT-C
//! defect) and a batch delivered through the parquet sink are written, then read:
//! column names and types as `docs/surveillance.md` documents them, row counts equal
//! to what was written, each event once after a redelivery, and no care reference as
//! a subject.
//!
//! Needs `python3 -m pip install 'pyarrow==22.*' 'duckdb==1.*'` (scripts/test does).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{run, temp_dir};
use serde_json::Value as Json;
use tokio::sync::watch;
use vitalmq_bridge::sink::object::ObjectStoreSink;
use vitalmq_bridge::sink::parquet::ParquetSink;
use vitalmq_bridge::sink::{Batch, OutboxRecord, Sink as _};
use vitalmq_bridge::surveillance::synth::{self, DEFECT_LOT, SynthConfig};
use vitalmq_envelope::{Algorithm, SigningKey};
use vitalmq_policies::DeviceRegistry;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/surveillance_read.py")
}

fn read_back(root: &Path) -> Json {
    let out = run(
        Command::new("python3").arg(script()).arg(root),
        Duration::from_secs(120),
    );
    assert!(
        !out.stderr.contains("ModuleNotFoundError"),
        "pyarrow/duckdb are not installed: run `python3 -m pip install 'pyarrow==22.*' 'duckdb==1.*'` (scripts/test does)\n{}",
        out.stderr
    );
    assert!(
        out.success,
        "reader failed ({:?}):\n{}",
        out.code, out.stderr
    );
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", out.stdout))
}

/// The documented columns of `events` and their types as each reader names them.
const EVENT_COLUMNS: &[(&str, &str, &str)] = &[
    ("event_id", "string", "VARCHAR"),
    ("kind", "string", "VARCHAR"),
    (
        "observed_at",
        "timestamp[ms, tz=UTC]",
        "TIMESTAMP WITH TIME ZONE",
    ),
    (
        "received_at",
        "timestamp[ms, tz=UTC]",
        "TIMESTAMP WITH TIME ZONE",
    ),
    ("device", "string", "VARCHAR"),
    ("subject", "string", "VARCHAR"),
    ("site", "string", "VARCHAR"),
    ("region", "string", "VARCHAR"),
    ("lot", "string", "VARCHAR"),
    ("hardware_model", "string", "VARCHAR"),
    ("fw", "string", "VARCHAR"),
    ("model", "string", "VARCHAR"),
    ("model_status", "string", "VARCHAR"),
    ("spo2", "double", "DOUBLE"),
    ("pulse", "double", "DOUBLE"),
    ("resp", "double", "DOUBLE"),
    ("temp", "double", "DOUBLE"),
    ("sbp", "double", "DOUBLE"),
    ("dbp", "double", "DOUBLE"),
    ("q", "double", "DOUBLE"),
    ("implausible", "bool", "BOOLEAN"),
    ("battery", "double", "DOUBLE"),
    ("dropped", "int64", "BIGINT"),
    ("alarm_code", "string", "VARCHAR"),
    ("alarm_level", "string", "VARCHAR"),
    ("alarm_active", "bool", "BOOLEAN"),
    ("epoch", "int64", "BIGINT"),
];

const GAP_COLUMNS: &[(&str, &str, &str)] = &[
    ("device", "string", "VARCHAR"),
    ("site", "string", "VARCHAR"),
    ("region", "string", "VARCHAR"),
    ("lot", "string", "VARCHAR"),
    ("hardware_model", "string", "VARCHAR"),
    ("fw", "string", "VARCHAR"),
    ("epoch", "int64", "BIGINT"),
    ("from_seq", "int64", "BIGINT"),
    ("to_seq", "int64", "BIGINT"),
    ("state", "string", "VARCHAR"),
    (
        "opened_at",
        "timestamp[ms, tz=UTC]",
        "TIMESTAMP WITH TIME ZONE",
    ),
];

const REFUSAL_COLUMNS: &[(&str, &str, &str)] = &[
    ("at", "timestamp[ms, tz=UTC]", "TIMESTAMP WITH TIME ZONE"),
    ("device", "string", "VARCHAR"),
    ("site", "string", "VARCHAR"),
    ("region", "string", "VARCHAR"),
    ("lot", "string", "VARCHAR"),
    ("hardware_model", "string", "VARCHAR"),
    ("fw", "string", "VARCHAR"),
    ("reason", "string", "VARCHAR"),
];

/// Each documented column with its type in both readers, plus the Hive `week` column.
fn assert_columns(found: &Json, table: &str, expected: &[(&str, &str, &str)]) {
    let t = &found[table];
    for (reader, i) in [("pyarrow_columns", 1), ("duckdb_columns", 2)] {
        let columns = t[reader].as_object().expect("columns");
        for c in expected {
            let ty = if i == 1 { c.1 } else { c.2 };
            assert_eq!(
                columns.get(c.0).and_then(Json::as_str),
                Some(ty),
                "{table}.{} in {reader}",
                c.0
            );
        }
        assert_eq!(
            columns.len(),
            expected.len() + 1,
            "{table} in {reader}: {columns:?}"
        );
        assert!(columns.contains_key("week"), "the Hive partition column");
    }
}

#[test]
fn a_synthetic_fleet_reads_back_in_pyarrow_and_duckdb_with_the_defect_visible() {
    let dir = temp_dir("vitalmq-surveil-py");
    let root = dir.path().join("synth");
    let config = SynthConfig {
        devices: 12,
        days: 8,
        interval_s: 300,
        ..SynthConfig::default()
    };
    let started = std::time::Instant::now();
    let summary = synth::generate(&config, &root).expect("generate");
    let bytes: u64 = summary
        .files
        .iter()
        .map(|f| std::fs::metadata(f).expect("file").len())
        .sum();
    eprintln!(
        "synth: {} events, {} files, {bytes} bytes ({:.1} bytes/event) in {:?}",
        summary.events,
        summary.files.len(),
        bytes as f64 / summary.events.max(1) as f64,
        started.elapsed()
    );
    let found = read_back(&root);
    assert_columns(&found, "events", EVENT_COLUMNS);
    assert_columns(&found, "gaps", GAP_COLUMNS);
    assert_columns(&found, "refusals", REFUSAL_COLUMNS);
    for (table, rows) in [
        ("events", summary.events),
        ("refusals", summary.refusals),
        ("gaps", summary.gaps),
    ] {
        assert_eq!(found[table]["pyarrow_rows"], rows, "{table} in pyarrow");
        assert_eq!(found[table]["duckdb_rows"], rows, "{table} in duckdb");
    }
    assert_eq!(found["events"]["distinct_ids"], summary.events);
    assert_eq!(
        found["events"]["weeks"],
        serde_json::json!(["2026-W02", "2026-W03"]),
        "eight days from a Monday span two ISO weeks"
    );
    // The planted defect stands out: LOT-C drops more than any other lot.
    let dropped = found["events"]["dropped_by_lot"].as_object().expect("lots");
    assert_eq!(
        dropped.values().filter_map(Json::as_u64).sum::<u64>(),
        summary.dropped,
        "every dropped message reported by a status row's per-boot counter"
    );
    let defect = dropped[DEFECT_LOT].as_u64().expect("LOT-C");
    for (lot, n) in dropped {
        if lot != DEFECT_LOT {
            assert!(
                defect > 2 * n.as_u64().expect("n"),
                "{lot}: {n} vs {defect}"
            );
        }
    }
}

fn registry() -> Arc<DeviceRegistry> {
    let key = SigningKey::generate(Algorithm::EdDsa)
        .expect("key")
        .verifying_key()
        .to_hex();
    let text = format!(
        "format = \"vitalmq-registry/v2\"\ntrust_domain = \"t.vitalmq\"\n\
         [[devices]]\nid = \"dev-1\"\nalg = \"EdDSA\"\npublic_key = \"{key}\"\n\
         [[devices.assignments]]\nvalid_from = \"2025-01-01T00:00:00Z\"\npatient_ref = \"pt-a\"\nsite = \"north\"\n"
    );
    Arc::new(DeviceRegistry::parse(&text, Path::new("registry.toml")).expect("registry"))
}

/// A record as the drain hands it to the sink after governance: `patient_ref` is the
/// purpose pseudonym and the care reference stays in `ingest_patient`; `rewritten`
/// false leaves the care reference in place (the sink must then write no subject).
fn record(position: i64, observed_at_ms: u64, rewritten: bool) -> OutboxRecord {
    let patient = if rewritten { "ps-7f3a" } else { "pt-a" };
    OutboxRecord {
        position,
        event_id: format!("ev-{position}"),
        device: "dev-1".into(),
        site: "north".into(),
        epoch: 1,
        seq: u64::try_from(position).expect("position"),
        observed_at_ms,
        received_at_ms: observed_at_ms + 5,
        topic: "devices/dev-1/telemetry".into(),
        raw: bytes::Bytes::new(),
        normalized_json: format!(
            r#"{{"format":"vitalmq-event/v1","event_id":"ev-{position}","device":"dev-1","site":"north","patient_ref":"{patient}","type":"vitals","m":{{"spo2":96,"pulse":70}},"fw":"1.0.0","model":"arrhythmia-net/2.1.0"}}"#
        ),
        ingest_patient: rewritten.then(|| "pt-a".to_owned()),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_sinks_files_read_back_once_each_with_pseudonyms_only() {
    let dir = temp_dir("vitalmq-surveil-sink");
    let root = dir.path().join("sink");
    let (_tx, rx) = watch::channel(registry());
    let files = ObjectStoreSink::local("surveil", &root).expect("local sink");
    let sink = ParquetSink::new(files, rx);
    // 2026-01-05 (W02) and a week later (W03).
    let monday = 1_767_571_200_000u64;
    let week = 7 * 86_400_000;
    let batch = Batch {
        first: 1,
        last: 6,
        records: (1..=6)
            .map(|p| {
                let at =
                    monday + u64::try_from(p).expect("p") * 1000 + if p > 3 { week } else { 0 };
                record(p, at, p != 6)
            })
            .collect(),
    };
    sink.deliver(&batch).await.expect("deliver");
    // A redelivery after a crash before the cursor moved: the same names, no duplicates.
    sink.deliver(&batch).await.expect("redeliver");
    let found = read_back(&root);
    assert_columns(&found, "events", EVENT_COLUMNS);
    assert_eq!(found["events"]["pyarrow_rows"], 6);
    assert_eq!(found["events"]["duckdb_rows"], 6);
    assert_eq!(found["events"]["distinct_ids"], 6);
    assert_eq!(
        found["events"]["weeks"],
        serde_json::json!(["2026-W02", "2026-W03"])
    );
    let subjects = found["events"]["subjects"].as_array().expect("subjects");
    assert_eq!(subjects, &[Json::from("ps-7f3a")], "pseudonyms only");
    assert!(
        !subjects.contains(&Json::from("pt-a")),
        "never a care reference"
    );
}
