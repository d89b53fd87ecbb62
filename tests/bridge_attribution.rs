//! Issue 19, point 1, across real processes: `vitalmq broker`, `vitalmq bridge`,
//! mosquitto_pub as the device, and `vitalmq registry assign|unassign` run while the
//! bridge runs. The bridge picks the changed registry up without a restart (audited)
//! and attributes each reading by its observed_at: one observed before the
//! reassignment but arriving after it stays with the earlier patient; one observed
//! while the device is unassigned is quarantined as `unassigned`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Rig, audit_records, has_fields, now_ms, vitalmq_ok, wait_until};
use serde_json::Value as Json;
use vitalmq_policies::format_rfc3339;

const DEVICE: &str = "dev-00001";

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// Every normalized event the local object sink wrote, keyed by seq.
fn normalized(root: &Path) -> std::collections::BTreeMap<u64, Json> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.join("normalized")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "ndjson") {
                for line in std::fs::read_to_string(&p).unwrap_or_default().lines() {
                    // A line being written is skipped until it is whole.
                    if let Ok(v) = serde_json::from_str::<Json>(line) {
                        out.insert(v["seq"].as_u64().expect("seq"), v);
                    }
                }
            }
        }
    }
    out
}

/// Publishes `seq` of epoch 1, observed (the device's `ts`) at `ts`.
fn publish(rig: &Rig, seq: u64, ts: u64) {
    let bytes = rig.sign(
        DEVICE,
        DEVICE,
        1,
        seq,
        &["--ts", &ts.to_string(), "--m", "spo2=97", "--q", "0.95"],
    );
    rig.mosquitto_pub(
        "device",
        DEVICE,
        &format!("devices/{DEVICE}/telemetry"),
        &bytes,
    );
}

/// The (patient_ref, site) of the stored event `seq`, once the sink wrote it.
fn owner_of(objects: &Path, seq: u64) -> (String, String) {
    let mut found = None;
    wait_until(Duration::from_secs(30), &format!("event seq {seq}"), || {
        found = normalized(objects).remove(&seq);
        found.is_some()
    });
    let e = found.expect("found");
    (
        e["patient_ref"].as_str().expect("patient_ref").to_owned(),
        e["site"].as_str().expect("site").to_owned(),
    )
}

/// Runs a `vitalmq registry` change and waits until the bridge audited reloading it.
fn change_registry(rig: &Rig, args: &[&str]) {
    let audit = rig.data().join("audit.jsonl");
    let reloaded = |records: &[Json]| {
        records
            .iter()
            .filter(|r| {
                has_fields(r, &[("/event", "policy_reloaded")])
                    && r["resource"]
                        .as_str()
                        .is_some_and(|p| p.ends_with("registry.toml"))
            })
            .count()
    };
    let before = reloaded(&audit_records(&audit));
    let registry = rig.pki().join("registry.toml");
    let mut all = vec!["registry"];
    all.extend(args);
    all.extend(["--registry", s(&registry), "--device", DEVICE]);
    vitalmq_ok(&rig.bin, &all);
    wait_until(
        Duration::from_secs(20),
        "the bridge reloads the registry",
        || reloaded(&audit_records(&audit)) > before,
    );
}

#[test]
fn readings_are_attributed_by_observed_at_across_a_live_reassignment() {
    let rig = Rig::start(vitalmq_bin!(), "attribution", 1, |_| {});
    let objects = rig.dir().join("objects");
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&objects)
        .expect("objects dir");
    let mut bridge = rig.bridge(
        "",
        &format!(
            "[[sinks]]\nkind = \"objects\"\nname = \"objects\"\npath = \"{}\"\nbatch_max_events = 1\nbatch_max_age_ms = 100\n",
            s(&objects)
        ),
    );

    // As `certs init` enrolled it (a v1 entry: assigned since forever).
    let t0 = now_ms();
    publish(&rig, 0, t0);
    let (first_patient, site) = owner_of(&objects, 0);

    // Reassigned now, while the bridge runs.
    let switch = now_ms();
    change_registry(
        &rig,
        &[
            "assign",
            "--patient-ref",
            "pt-later-0001",
            "--site",
            &site,
            "--at",
            &format_rfc3339(switch),
        ],
    );
    // Observed two seconds before the switch, arriving after it: the earlier patient.
    publish(&rig, 1, switch - 2_000);
    // Observed after the switch: the new one.
    publish(&rig, 2, switch + 1);
    assert_eq!(owner_of(&objects, 1), (first_patient.clone(), site.clone()));
    assert_eq!(
        owner_of(&objects, 2),
        ("pt-later-0001".to_owned(), site.clone())
    );

    // Unassigned now: a reading observed after it is quarantined as `unassigned`, one
    // observed before it (arriving later still) is the second patient's.
    let unassigned = now_ms();
    change_registry(&rig, &["unassign", "--at", &format_rfc3339(unassigned)]);
    publish(&rig, 3, unassigned + 1);
    publish(&rig, 4, unassigned - 1);
    assert_eq!(
        owner_of(&objects, 4),
        ("pt-later-0001".to_owned(), site.clone())
    );
    let quarantine = rig.rows("quarantine");
    assert_eq!(quarantine.len(), 1, "{quarantine:?}");
    assert_eq!(quarantine[0]["reason"], "unassigned", "{quarantine:?}");
    assert_eq!(quarantine[0]["device"], DEVICE);
    assert!(
        !normalized(&objects).contains_key(&3),
        "the unassigned reading is no event"
    );
    assert_eq!(rig.stats()["quarantine"]["unassigned"], 1);
    // The bridge never restarted.
    assert!(bridge.process.running(), "{}", bridge.process.all());
}
