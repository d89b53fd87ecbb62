//! The shipped DuckDB SQL (`queries/`) over data sets OUR code writes, with known
//! answers (issue 21: "shipped SQL run against them with known answers"):
//!
//! * a synthetic fleet written by `vitalmq surveil generate` (the planted LOT-C
//!   defect; `surveillance::synth`), its truth in `synth.json`: every shipped query
//!   runs (`tests/py/surveil_synth.py`), every measure's count per lot equals what the
//!   generator says it wrote, and LOT-C alone stands out for dropped messages;
//! * a real bridge's parquet sink (`kind = "parquet"`, purpose `surveillance`) after a
//!   short `vitalmq sim` run of three devices (LOT-A, LOT-B, LOT-C in the registry)
//!   with status messages every second: every shipped query runs over what the sink
//!   wrote, and its counts per lot (events, readings, dropped, device-weeks) equal
//!   the bridge store's.
//!
//! Needs `python3 -m pip install 'pyarrow==22.*' 'duckdb==1.*'` (scripts/test does).

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{
    Rig, Spawned, now_ms, run, sim_summary_all_receipted, temp_dir, vitalmq_ok, wait_until,
};
use serde_json::Value as Json;
use vitalmq_envelope::DeviceId;
use vitalmq_policies::{DeviceRegistry, Grant, Period, Purpose};

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
        let mode = std::fs::metadata(&entry)
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
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

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// Surveillance consent for every device of the rig's registry (from an hour ago).
fn grant_surveillance(registry: &Path) {
    let text = std::fs::read_to_string(registry).expect("registry");
    let mut r = DeviceRegistry::parse(&text, registry).expect("a valid registry");
    let from = now_ms() - 3_600_000;
    for i in 1..=3 {
        r.grant_consent(
            &DeviceId::new(format!("dev-{i:05}")).expect("id"),
            Grant {
                purpose: Purpose::Surveillance,
                period: Period::new(from, None).expect("period"),
            },
        )
        .expect("grant");
    }
    std::fs::write(registry, r.to_toml()).expect("write the registry");
}

/// What the bridge stored (its store, read after the bridge stopped), per lot, in the
/// queries' terms: the known answers.
fn store_truth(data: &Path, registry: &DeviceRegistry) -> Json {
    let store = vitalmq_bridge::store::Store::open(data).expect("the bridge's store");
    let head = store.head().expect("head");
    let records = store.read_range(1, head).expect("events");
    // Per lot: readings, dropped, and its (device, ISO week) pairs.
    type Lot = (u64, u64, BTreeSet<(String, String)>);
    let mut lots: std::collections::BTreeMap<String, Lot> = Default::default();
    let mut boots: std::collections::BTreeMap<(String, u64), (String, i64)> = Default::default();
    let mut statuses = 0;
    for rec in &records {
        let e: Json = serde_json::from_str(&rec.normalized_json).expect("event JSON");
        let lot = registry
            .device(&DeviceId::new(&rec.device).expect("id"))
            .and_then(|d| d.lot.clone())
            .expect("a lot for every device");
        let ms = i64::try_from(rec.observed_at_ms).expect("ms");
        let week = vitalmq_bridge::surveillance::iso_week(ms).expect("week");
        let entry = lots.entry(lot.clone()).or_default();
        if e["type"] == "vitals" {
            entry.0 += 1;
        }
        entry.2.insert((rec.device.clone(), week));
        if e["type"] == "status" {
            statuses += 1;
            let dropped = e["extra"]["dropped"].as_i64().expect("dropped in status");
            let top = boots
                .entry((rec.device.clone(), rec.epoch))
                .or_insert((lot, 0));
            top.1 = top.1.max(dropped);
        }
    }
    for (lot, top) in boots.values() {
        if let Some(entry) = lots.get_mut(lot) {
            entry.1 += u64::try_from(*top).expect("a count");
        }
    }
    assert!(statuses >= 3, "status messages every second: {statuses}");
    serde_json::json!({
        "events": records.len(),
        "defect_lot": "LOT-C",
        "lots": lots.into_iter().map(|(lot, (readings, dropped, weeks))| {
            (lot, serde_json::json!({"readings": readings, "dropped": dropped,
                                     "device_weeks": weeks.len()}))
        }).collect::<serde_json::Map<_, _>>(),
    })
}

#[test]
fn shipped_sql_over_a_real_bridge_parquet_sink_gives_the_stores_counts() {
    let rig = Rig::start(vitalmq_bin!(), "surveil-bridge", 3, |dir| {
        grant_surveillance(&dir.join("pki/registry.toml"));
    });
    let root = rig.dir().join("surveil");
    let key_file = rig.dir().join("pseudonym.key");
    std::fs::write(&key_file, [0x5a; 32]).expect("key");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut bridge = rig.bridge(
        "",
        &format!(
            "[pseudonyms]\nkey_file = \"{}\"\n[[sinks]]\nkind = \"parquet\"\nname = \"surveil\"\n\
             path = \"{}\"\nbatch_max_events = 50\nbatch_max_age_ms = 100\n",
            s(&key_file),
            s(&root)
        ),
    );
    // Three devices, 60 readings each at 20/s, a status every second.
    let mut sim = Spawned::start(
        Command::new(&rig.bin)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info,rumqttc=warn")
            .args(["sim", "--pki"])
            .arg(rig.pki())
            .arg("--broker")
            .arg(format!("127.0.0.1:{}", rig.broker.port))
            .arg("--state")
            .arg(rig.dir().join("sim-state"))
            .args(["--devices", "3", "--count", "60", "--rate", "20"])
            .args(["--status-every", "1s", "--resend-after", "1s"])
            .args(["--until-receipted", "60s"]),
    );
    sim_summary_all_receipted(&mut sim);
    let registry_path = rig.pki().join("registry.toml");
    let registry = DeviceRegistry::parse(
        &std::fs::read_to_string(&registry_path).expect("registry"),
        &registry_path,
    )
    .expect("registry");
    let expected = u64::try_from(rig.rows("events").len()).expect("n");
    assert!(expected >= 180, "every reading stored: {expected}");
    // The sink catches up with the store (its cursor is the outbox's).
    let count = || -> u64 {
        if !root.join("events").is_dir() {
            return 0;
        }
        let out = run(
            Command::new("python3").args([
                "-c",
                "import sys, pyarrow.dataset as ds; print(ds.dataset(sys.argv[1], format='parquet', partitioning='hive').count_rows())",
                s(&root.join("events")),
            ]),
            Duration::from_secs(30),
        );
        out.stdout.trim().parse().unwrap_or(0)
    };
    wait_until(
        Duration::from_secs(30),
        "the sink writes every event",
        || count() == expected,
    );
    // The side tables' empty files are there (no gaps, refusals or alerts in this run).
    wait_until(Duration::from_secs(30), "every table has a file", || {
        ["alerts", "scores", "refusals", "gaps"]
            .iter()
            .all(|t| root.join(t).is_dir())
    });
    bridge.process.kill9();
    let truth = store_truth(&rig.data(), &registry);
    assert_eq!(truth["events"], expected, "{truth}");
    std::fs::write(root.join("truth.json"), truth.to_string()).expect("truth");
    let found = check_sql(&root, &["--bridge"]);
    assert_eq!(
        found["dropped_by_lot"].as_object().map(|m| m.len()),
        Some(3),
        "{found}"
    );
    assert_owner_only(&root.join("events"));
}
