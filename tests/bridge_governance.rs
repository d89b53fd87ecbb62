//! Issue 19, point 3, across real processes: `vitalmq broker`, `vitalmq bridge` with a
//! care objects sink and a research objects sink (a field allow-list), and `vitalmq
//! sim` as two devices. `dev-00001` has research consent, `dev-00002` none. Under
//! traffic, research consent of `dev-00001` is withdrawn by rewriting the registry
//! (through the policies API, atomically, as `vitalmq registry` does); the bridge
//! reloads it (audited) without a restart. The objects are read back with Python, not
//! with our code: no event observed at or after the withdrawal reached the research
//! sink, its events carry only allowed keys and no raw messages, the care sink has
//! every event, and the withheld counts (store stats and audit records) are exactly
//! what the care sink has and the research sink has not. The research sink lists
//! `patient_ref` and gets the research pseudonym of the care reference (bridge config
//! `[pseudonyms]`), checked against an HMAC computed in Python.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Rig, audit_records, has_fields, now_ms, wait_until};
use serde_json::Value as Json;
use vitalmq_envelope::DeviceId;
use vitalmq_policies::{DeviceRegistry, Grant, Period, Purpose};

const CONSENTING: &str = "dev-00001";
const NOT_CONSENTING: &str = "dev-00002";
/// What the research sink may receive (`format` and `event_id` are always kept).
const RESEARCH_FIELDS: &[&str] = &["device", "seq", "observed_at", "m", "patient_ref"];

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// Loads the registry, changes it, and writes it back by rename (what the `vitalmq
/// registry` commands do), so the bridge never reads half a file.
fn change_registry(path: &Path, change: impl FnOnce(&mut DeviceRegistry)) {
    let text = std::fs::read_to_string(path).expect("read the registry");
    let mut registry = DeviceRegistry::parse(&text, path).expect("a valid registry");
    change(&mut registry);
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, registry.to_toml()).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

fn device(id: &str) -> DeviceId {
    DeviceId::new(id).expect("device id")
}

/// The objects of the sinks as Python reads them.
fn read_back(dirs: &[&Path]) -> Json {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/governance_objects.py");
    let ran = common::run(
        std::process::Command::new("python3")
            .arg(script)
            .args(dirs.iter().map(|d| s(d))),
        Duration::from_secs(30),
    );
    assert!(ran.success, "{}", ran.all());
    serde_json::from_str(ran.stdout.trim()).expect("JSON from the helper")
}

fn count(v: &Json, device: &str) -> u64 {
    v["events"][device].as_u64().unwrap_or(0)
}

fn registry_reloads(audit: &Path) -> usize {
    audit_records(audit)
        .iter()
        .filter(|r| {
            has_fields(r, &[("/event", "policy_reloaded")])
                && r["resource"]
                    .as_str()
                    .is_some_and(|p| p.ends_with("registry.toml"))
        })
        .count()
}

#[test]
fn withdrawn_consent_stops_the_research_flow_under_traffic_and_every_withheld_event_is_counted() {
    let granted_from = now_ms() - 3_600_000;
    let rig = Rig::start(vitalmq_bin!(), "governance", 2, |dir| {
        change_registry(&dir.join("pki/registry.toml"), |r| {
            r.grant_consent(
                &device(CONSENTING),
                Grant {
                    purpose: Purpose::Research,
                    period: Period::new(granted_from, None).expect("period"),
                },
            )
            .expect("grant");
        });
    });
    let care = rig.dir().join("care");
    let research = rig.dir().join("research");
    for d in [&care, &research] {
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(d)
            .expect("objects dir");
    }
    let key_file = rig.dir().join("pseudonym.key");
    std::fs::write(&key_file, [0x5a; 32]).expect("key");
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    let fields = RESEARCH_FIELDS
        .iter()
        .map(|f| format!("\"{f}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let mut bridge = rig.bridge(
        "",
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:0\"\n[pseudonyms]\nkey_file = \"{}\"\n\
             [[sinks]]\nkind = \"objects\"\nname = \"care\"\npath = \"{}\"\nbatch_max_events = 20\nbatch_max_age_ms = 100\n\
             [[sinks]]\nkind = \"objects\"\nname = \"study\"\npath = \"{}\"\nbatch_max_events = 20\nbatch_max_age_ms = 100\n\
             purpose = \"research\"\nfields = [{fields}]\n",
            s(&key_file),
            s(&care),
            s(&research)
        ),
    );
    let audit = rig.data().join("audit.jsonl");

    // 20 readings a second per device for 12 s.
    let mut sim = rig.sim(2, 240);
    wait_until(
        Duration::from_secs(60),
        "research events of the consenting device",
        || count(&read_back(&[&research])[s(&research)], CONSENTING) >= 20,
    );

    // Withdrawn now, under traffic.
    let reloads = registry_reloads(&audit);
    let withdrawn_at = now_ms();
    change_registry(&rig.pki().join("registry.toml"), |r| {
        r.withdraw_consent(&device(CONSENTING), Purpose::Research, withdrawn_at)
            .expect("withdraw");
    });
    wait_until(
        Duration::from_secs(20),
        "the bridge reloads the registry",
        || registry_reloads(&audit) > reloads,
    );

    common::sim_summary_all_receipted(&mut sim);
    let stats = rig.wait_stats(
        Duration::from_secs(60),
        "both sinks drained the outbox",
        |st| {
            let head = st["head"].as_i64().unwrap_or(-1);
            head > 0 && st["sinks"]["care"] == head && st["sinks"]["study"] == head
        },
    );
    let objects = read_back(&[&care, &research]);
    let (care_objects, research_objects) = (&objects[s(&care)], &objects[s(&research)]);

    // The care sink has every event, whole, with the raw messages.
    let events = stats["events"].as_u64().expect("events");
    assert_eq!(events, 480, "{stats}");
    assert_eq!(
        care_objects["distinct_event_ids"].as_u64(),
        Some(events),
        "{care_objects}"
    );
    assert!(
        care_objects["keys"]
            .as_array()
            .expect("keys")
            .contains(&"patient_ref".into())
    );
    assert_eq!(care_objects["raw_objects"], true);

    // The research sink: only allowed keys, no raw messages, nothing of the device
    // without consent, nothing observed at or after the withdrawal.
    let allowed: Vec<&str> = RESEARCH_FIELDS
        .iter()
        .copied()
        .chain(["format", "event_id"])
        .collect();
    for key in research_objects["keys"].as_array().expect("keys") {
        assert!(
            allowed.contains(&key.as_str().expect("key")),
            "{key} is not allowed: {research_objects}"
        );
    }
    assert_eq!(research_objects["raw_objects"], false, "{research_objects}");
    // Object names tell no more than the events: the research sink lists `device` but
    // not `site`, so its names have a device level and no site level; care has both.
    let research_names = object_names(&research);
    assert!(!research_names.is_empty());
    for name in &research_names {
        let levels: Vec<&str> = name.split('/').collect();
        assert!(
            levels.len() == 4
                && levels[0] == "normalized"
                && levels[1].starts_with("device=")
                && levels[2].starts_with("date="),
            "{name}"
        );
        assert!(!name.contains("site="), "{name}");
    }
    for name in object_names(&care)
        .iter()
        .filter(|n| n.starts_with("normalized/") || n.starts_with("raw/"))
    {
        let levels: Vec<&str> = name.split('/').collect();
        assert!(
            levels.len() == 5 && levels[1].starts_with("site=") && levels[2].starts_with("device="),
            "{name}"
        );
    }
    assert_eq!(
        count(research_objects, NOT_CONSENTING),
        0,
        "{research_objects}"
    );
    let latest = research_objects["latest_observed_ms"][CONSENTING]
        .as_u64()
        .expect("research events of the consenting device");
    assert!(
        latest < withdrawn_at,
        "observed at {latest}, at or after the withdrawal at {withdrawn_at}"
    );

    // The research patient_ref is the research pseudonym of the care one, never the
    // care one: one pseudonym for the consenting device's patient.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/governance_objects.py");
    let ran = common::run(
        std::process::Command::new("python3").arg(script).args([
            "--pseudonyms",
            s(&key_file),
            "research",
            s(&care),
            s(&research),
        ]),
        Duration::from_secs(30),
    );
    assert!(ran.success, "{}", ran.all());
    let linked: Json = serde_json::from_str(ran.stdout.trim()).expect("JSON");
    assert_eq!(
        linked["checked"].as_u64(),
        Some(count(research_objects, CONSENTING)),
        "{linked}"
    );
    assert_eq!(linked["mismatched"], 0, "{linked}");
    assert_eq!(linked["care_refs_seen"], 0, "{linked}");
    assert_eq!(linked["distinct_pseudonyms"], 1, "{linked}");

    // Withheld: exactly what care has and research has not, per reason.
    let care_consenting = count(care_objects, CONSENTING);
    let research_consenting = count(research_objects, CONSENTING);
    let after_withdrawal = care_objects["observed_ms"][CONSENTING]
        .as_array()
        .expect("care events")
        .iter()
        .filter(|t| t.as_u64().is_some_and(|t| t >= withdrawn_at))
        .count() as u64;
    assert!(
        after_withdrawal > 0,
        "traffic continued after the withdrawal"
    );
    assert_eq!(
        research_consenting + after_withdrawal,
        care_consenting,
        "every event observed before the withdrawal reached research"
    );
    let withheld = &stats["withheld"];
    assert_eq!(
        withheld["study/withdrawn"].as_u64(),
        Some(care_consenting - research_consenting),
        "{stats}"
    );
    assert_eq!(
        withheld["study/no_consent"].as_u64(),
        Some(count(care_objects, NOT_CONSENTING)),
        "{stats}"
    );
    assert!(withheld.get("care/unassigned").is_none(), "{stats}");

    // One audit record per batch with withheld events, adding up to the same counts.
    let mut audited = std::collections::BTreeMap::<String, u64>::new();
    for r in audit_records(&audit)
        .iter()
        .filter(|r| has_fields(r, &[("/event", "events_withheld"), ("/resource", "study")]))
    {
        for (reason, n) in r["details"]["withheld"].as_object().expect("counts") {
            *audited.entry(reason.clone()).or_default() += n.as_u64().expect("count");
        }
        assert!(r["details"]["first"].as_i64() <= r["details"]["last"].as_i64());
    }
    assert_eq!(
        audited.get("withdrawn").copied(),
        withheld["study/withdrawn"].as_u64()
    );
    assert_eq!(
        audited.get("no_consent").copied(),
        withheld["study/no_consent"].as_u64()
    );
    // And the counter, as the bridge serves it.
    let port = common::reported_addr(&bridge.process.stderr(), "metrics on /metrics addr=")
        .expect("the metrics address is logged")
        .port();
    let exposition = metrics(port);
    for (reason, stat) in
        ["withdrawn", "no_consent"].map(|r| (r, withheld[format!("study/{r}")].as_u64()))
    {
        // Label order is the exporter's: match both labels, in any order.
        let labels = ["sink=\"study\"".to_owned(), format!("reason=\"{reason}\"")];
        let value = exposition
            .lines()
            .filter_map(|l| l.strip_prefix("vitalmq_bridge_withheld_total{"))
            .filter_map(|l| l.split_once('}'))
            .find(|(set, _)| {
                let set: Vec<&str> = set.split(',').collect();
                labels.iter().all(|l| set.contains(&l.as_str()))
            })
            .and_then(|(_, v)| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("study/{reason} missing:\n{exposition}"));
        assert_eq!(Some(value as u64), stat, "study/{reason}");
    }
    assert!(bridge.process.running(), "{}", bridge.process.all());
}

/// The names of the objects under `root` (files, relative, `/`-separated), read with
/// the file system, not with our code.
fn object_names(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, into: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(root, &path, into);
            } else {
                let rel = path.strip_prefix(root).expect("under root");
                into.push(rel.to_str().expect("UTF-8 names").to_owned());
            }
        }
    }
    let mut names = Vec::new();
    walk(root, root, &mut names);
    names.sort();
    names
}

/// The bridge's `/metrics` text.
fn metrics(port: u16) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// Fail closed (issue 19 review): while the last reload of the registry failed, the
/// consent in force may be one since withdrawn, so the research sink delivers nothing
/// and does not advance; the care sink goes on. Once the file is fixed and reloaded,
/// the research sink catches up.
#[test]
fn a_failed_registry_reload_pauses_research_until_a_reload_succeeds_but_not_care() {
    let rig = Rig::start(vitalmq_bin!(), "governance-stale", 1, |dir| {
        change_registry(&dir.join("pki/registry.toml"), |r| {
            r.grant_consent(
                &device(CONSENTING),
                Grant {
                    purpose: Purpose::Research,
                    period: Period::new(now_ms() - 3_600_000, None).expect("period"),
                },
            )
            .expect("grant");
        });
    });
    let care = rig.dir().join("care");
    let research = rig.dir().join("research");
    for d in [&care, &research] {
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(d)
            .expect("objects dir");
    }
    let mut bridge = rig.bridge(
        "",
        &format!(
            "[[sinks]]\nkind = \"objects\"\nname = \"care\"\npath = \"{}\"\nbatch_max_events = 20\nbatch_max_age_ms = 100\n\
             [[sinks]]\nkind = \"objects\"\nname = \"study\"\npath = \"{}\"\nbatch_max_events = 20\nbatch_max_age_ms = 100\n\
             purpose = \"research\"\nfields = [\"device\", \"observed_at\", \"m\"]\n",
            s(&care),
            s(&research)
        ),
    );

    // The registry becomes invalid (written by rename, as an editor would).
    let registry = rig.pki().join("registry.toml");
    let good = std::fs::read_to_string(&registry).expect("registry");
    let tmp = registry.with_extension("toml.tmp");
    std::fs::write(&tmp, "format = \"vitalmq-registry/v2\"\ntrust_domain = ").expect("write");
    std::fs::rename(&tmp, &registry).expect("rename");
    assert!(
        bridge
            .process
            .wait_output(Duration::from_secs(20), |out| out
                .contains("registry reload failed")),
        "the bridge notices the failed reload: {}",
        bridge.process.all()
    );

    let mut sim = rig.sim(1, 40);
    common::sim_summary_all_receipted(&mut sim);
    let stats = rig.wait_stats(Duration::from_secs(60), "care drained the outbox", |st| {
        let head = st["head"].as_i64().unwrap_or(-1);
        head > 0 && st["sinks"]["care"] == head
    });
    let head = stats["head"].as_i64().expect("head");
    assert!(
        bridge
            .process
            .wait_output(Duration::from_secs(30), |out| out
                .lines()
                .any(|l| l.contains("delivery paused") && l.contains("study"))),
        "the research sink pauses: {}",
        bridge.process.all()
    );
    let stats = rig.stats();
    assert_eq!(
        stats["sinks"]["study"], 0,
        "research did not advance: {stats}"
    );
    assert_eq!(stats["sinks"]["care"], head, "{stats}");
    assert!(
        object_names(&research).is_empty(),
        "nothing reached research"
    );
    assert_eq!(count(&read_back(&[&care])[s(&care)], CONSENTING), 40);

    // Fixed: reloaded, and research catches up with every event (all consented).
    std::fs::write(&tmp, good).expect("write");
    std::fs::rename(&tmp, &registry).expect("rename");
    rig.wait_stats(Duration::from_secs(60), "research catches up", |st| {
        st["sinks"]["study"] == head
    });
    assert_eq!(
        count(&read_back(&[&research])[s(&research)], CONSENTING),
        40
    );
    assert!(bridge.process.all().contains("delivery resumes"));
    assert!(bridge.process.running(), "{}", bridge.process.all());
}
