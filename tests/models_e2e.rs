//! Device-side models end to end (issue 21), through the real broker, bridge and
//! simulator, with the bridge checking against a `[models] file`:
//!
//! - one cohort of devices (dev-00003, dev-00004) runs the draft
//!   `arrhythmia-net/2.2.0-rc1`, the others the approved `2.1.0`, all sending alarms:
//!   the stored events' provenance says `unapproved` / `approved`, the operational alert
//!   `ops/bridge/model_unapproved` counts the cohort, and the cohort's alarm alert is
//!   delivered marked `model_status` (the default policy) while the others' is not;
//! - approving the draft by rewriting the models file is audited (`policy_reloaded`) and
//!   resolves the operational alert;
//! - with `unapproved_alarms = "withhold"`, an alarm of a withdrawn model is stored,
//!   audited `alarm_withheld` and counted, and raises no clinical alert.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Rig, Spawned, audit_records, wait_until};
use serde_json::Value as Json;

const APPROVED: &str = "arrhythmia-net/2.1.0";
const DRAFT: &str = "arrhythmia-net/2.2.0-rc1";
const WITHDRAWN: &str = "arrhythmia-net/2.0.3";

fn example_models() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/examples/models.toml"),
    )
    .expect("example models file")
}

/// The example models file with the draft approved.
fn draft_approved(text: &str) -> String {
    let approved = text.replacen(
        "status = \"draft\"",
        "status = \"approved\"\napproved_by = \"clinical-safety-board\"\napproved_at = \"2026-01-10T09:00:00Z\"",
        1,
    );
    assert_ne!(approved, text, "the example has a draft");
    approved
}

/// Replaces `path` in one step (write aside, rename), as an editor saving does.
fn rewrite(path: &Path, text: &str) {
    let aside = path.with_extension("toml.new");
    std::fs::write(&aside, text).expect("write models");
    std::fs::rename(&aside, path).expect("rename models");
}

fn rules(dir: &Path) -> PathBuf {
    let path = dir.join("rules.toml");
    std::fs::write(
        &path,
        r#"format = "vitalmq-rules/v1"
version = "models-e2e"

[quality]
low_below = 0.5
max_low_fraction = 0.5
over_n = 20

[[rules]]
id = "spo2-low"
version = "1"
metric = "spo2"
severity = "urgent"
kind = "threshold"
below = 80
resolve_at = 85
"#,
    )
    .expect("write rules");
    path
}

/// The `topic payload` lines of a mosquitto_sub, as JSON.
fn messages(sub: &Spawned) -> Vec<(String, Json)> {
    sub.stdout()
        .lines()
        .filter_map(|l| {
            let (topic, payload) = l.split_once(' ')?;
            Some((topic.to_owned(), serde_json::from_str(payload).ok()?))
        })
        .collect()
}

fn wait_message(
    sub: &Spawned,
    within: Duration,
    what: &str,
    found: impl Fn(&str, &Json) -> bool,
) -> Json {
    let mut hit = None;
    let ok = common::poll_until(within, Duration::from_millis(100), || {
        hit = messages(sub)
            .into_iter()
            .find(|(t, m)| found(t, m))
            .map(|(_, m)| m);
        hit.is_some()
    });
    assert!(ok, "not within {within:?}: {what}; got:\n{}", sub.all());
    hit.expect("found")
}

/// `vitalmq sim` for the first 4 devices: dev-00003 and dev-00004 report the draft,
/// the others the approved model; dev-00001 and dev-00003 raise an alarm (never
/// cleared) a second into the run.
fn sim(rig: &Rig) -> Spawned {
    Spawned::start(
        Command::new(&rig.bin)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info,rumqttc=warn")
            .args(["sim", "--pki"])
            .arg(rig.pki())
            .arg("--broker")
            .arg(format!("127.0.0.1:{}", rig.broker.port))
            .arg("--state")
            .arg(rig.dir().join("sim-state"))
            .args(["--devices", "4", "--count", "40", "--rate", "20"])
            .args(["--resend-after", "1s", "--until-receipted", "60s"])
            .args(["--device-model", &format!("dev-00003={DRAFT}")])
            .args(["--device-model", &format!("dev-00004={DRAFT}")])
            .args(["--device-model", &format!("all={APPROVED}")])
            .args([
                "--alarm-episode",
                "dev-00001:arrhythmia:urgent:at=1s:for=never,dev-00003:arrhythmia:urgent:at=1s:for=never",
            ]),
    )
}

#[test]
fn an_unapproved_cohort_is_marked_alerted_resolved_by_approval_and_withheld_by_policy() {
    // 5 devices on 2 sites, all `vw-band-2`/`vw-band-3` at firmware 5.12.1 (what the
    // approved 2.1.0 is approved for); dev-00005 stays out of the simulation.
    let rig = Rig::start(vitalmq_bin!(), "models", 5, |_| {});
    let rules = rules(rig.dir());
    let models = rig.dir().join("models.toml");
    let text = example_models();
    std::fs::write(&models, &text).expect("write models");
    let config = common::BridgeProcess::config_with(rig.broker.port, "", "")
        + &format!(
            r#"[alerts]
rules = "{}"
publisher = {{ client_id = "bridge-01-alerts", cert = "pki/identities/bridge/bridge-01-alerts.pem", key = "pki/identities/bridge/bridge-01-alerts.key.pem" }}
[models]
file = "{}"
"#,
            rules.display(),
            models.display()
        );
    let watch = rig.mosquitto_sub_all("operator", "ops-01", &["alerts/#", "ops/bridge/#"]);
    let bridge =
        common::BridgeProcess::start(&rig.bin, rig.dir(), &config, Duration::from_secs(30));
    let mut sim = sim(&rig);
    common::sim_summary_all_receipted(&mut sim);

    // Provenance of every stored event: the cohort's unapproved, the others' approved.
    let store = vitalmq_bridge::store::Store::open(&rig.data()).expect("store");
    let events = store.list_events().expect("events");
    assert!(events.len() >= 4 * 40, "{} events", events.len());
    for e in &events {
        let detail = store
            .event_detail(e.head.event_id.as_str())
            .expect("read")
            .expect("stored");
        let provenance = &detail.normalized["provenance"];
        let device = e.head.device.as_str();
        let status = match device {
            "dev-00003" | "dev-00004" => "unapproved",
            _ => "approved",
        };
        assert_eq!(provenance["model_status"], status, "{device}: {provenance}");
        assert!(
            provenance["model_artifact_sha256"]
                .as_str()
                .is_some_and(|s| s.len() == 64),
            "{provenance}"
        );
    }

    // One operational alert for the draft, counting both cohort devices.
    let ops = wait_message(
        &watch,
        Duration::from_secs(20),
        "model_unapproved with the cohort's two devices",
        |t, m| t == "ops/bridge/model_unapproved" && m["devices"] == 2,
    );
    assert_eq!(
        (&ops["model"], &ops["state"]),
        (&Json::from(DRAFT), &Json::from("open")),
        "{ops}"
    );
    assert_eq!(ops["statuses"]["unapproved"], 2, "{ops}");
    assert!(ops["messages"].as_u64().unwrap_or(0) >= 2, "{ops}");
    let ops_id = ops["alert_id"].clone();
    // Deterministic per model and UTC day, so a restarted bridge continues it.
    assert!(
        ops_id.as_str().is_some_and(
            |id| id.starts_with("ops-bridge-model_unapproved-arrhythmia-net_2.2.0-rc1-20")
        ),
        "{ops}"
    );
    assert!(
        !messages(&watch)
            .iter()
            .any(|(t, m)| t == "ops/bridge/model_unapproved" && m["model"] == APPROVED),
        "no alert for the approved model"
    );

    // The alarms: the cohort's delivered marked, the others' unmarked.
    let alarm_of = |device: &'static str| {
        move |_: &str, m: &Json| {
            m["rule"] == "device-alarm:arrhythmia" && m["device"] == device && m["state"] == "open"
        }
    };
    let cohort = wait_message(
        &watch,
        Duration::from_secs(20),
        "dev-00003's alarm",
        alarm_of("dev-00003"),
    );
    assert_eq!(cohort["model_status"], "unapproved", "{cohort}");
    assert_eq!(cohort["model"], DRAFT, "{cohort}");
    let other = wait_message(
        &watch,
        Duration::from_secs(20),
        "dev-00001's alarm",
        alarm_of("dev-00001"),
    );
    assert!(other["model_status"].is_null(), "{other}");

    // Approving the draft: an audited reload resolves the operational alert.
    let audit = rig.data().join("audit.jsonl");
    rewrite(&models, &draft_approved(&text));
    wait_until(
        Duration::from_secs(20),
        "the approval reloaded and audited",
        || {
            audit_records(&audit).iter().any(|r| {
                r["event"] == "policy_reloaded"
                    && r["resource"]
                        .as_str()
                        .is_some_and(|p| p.ends_with("models.toml"))
            })
        },
    );
    let resolved = wait_message(
        &watch,
        Duration::from_secs(20),
        "model_unapproved resolved",
        |t, m| {
            t == "ops/bridge/model_unapproved"
                && m["alert_id"] == ops_id
                && m["state"] == "resolved"
        },
    );
    assert_eq!(resolved["model"], DRAFT, "{resolved}");
    assert_eq!(resolved["resolved_by"], "approval", "{resolved}");

    // Withhold: a (review-level: urgent ones are never withheld) alarm of a withdrawn
    // model is stored and audited, never alerted.
    rewrite(
        &models,
        &draft_approved(&text).replace(
            "unapproved_alarms = \"deliver\"",
            "unapproved_alarms = \"withhold\"",
        ),
    );
    wait_until(
        Duration::from_secs(20),
        "the withhold policy in force",
        || {
            audit_records(&audit).iter().any(|r| {
                r["event"] == "policy_reloaded" && r["details"]["unapproved_alarms"] == "withhold"
            })
        },
    );
    let ts = common::now_ms().to_string();
    let alarm = rig.sign(
        "dev-00005",
        "dev-00005",
        1,
        0,
        &[
            "--ts",
            &ts,
            "--fw",
            "5.12.1",
            "--type",
            "alarm",
            "--alarm",
            "arrhythmia",
            "--level",
            "review",
            "--model",
            WITHDRAWN,
        ],
    );
    rig.mosquitto_pub("device", "dev-00005", "devices/dev-00005/telemetry", &alarm);
    let mut withheld = Json::Null;
    wait_until(Duration::from_secs(20), "alarm_withheld audited", || {
        withheld = audit_records(&audit)
            .into_iter()
            .find(|r| r["event"] == "alarm_withheld")
            .unwrap_or(Json::Null);
        !withheld.is_null()
    });
    assert_eq!(withheld["resource"], "dev-00005", "{withheld}");
    let d = &withheld["details"];
    assert_eq!(
        (&d["model"], &d["model_status"]),
        (&Json::from(WITHDRAWN), &Json::from("withdrawn")),
        "{withheld}"
    );
    assert_eq!(
        (&d["code"], &d["level"], &d["state"]),
        (
            &Json::from("arrhythmia"),
            &Json::from("review"),
            &Json::from("open")
        )
    );
    assert!(!withheld.to_string().contains("patient"), "{withheld}");
    // Stored (the audit record is written once the batch is), with its provenance.
    let event_id = d["event_id"].as_str().expect("event id");
    let stored = store.event_detail(event_id).expect("read").expect("stored");
    assert_eq!(stored.normalized["provenance"]["model_status"], "withdrawn");
    // Counted in the withdrawn model's episode; and no clinical alert, stored or sent.
    let counted = wait_message(
        &watch,
        Duration::from_secs(20),
        "the withheld alarm counted",
        |t, m| {
            t == "ops/bridge/model_unapproved"
                && m["model"] == WITHDRAWN
                && m["withheld_alarms"] == 1
        },
    );
    assert_eq!(counted["statuses"]["withdrawn"], 1, "{counted}");
    assert!(
        !rig.rows("alerts")
            .iter()
            .any(|a| a["device"] == "dev-00005"),
        "a withheld alarm raised an alert"
    );
    assert!(
        !messages(&watch)
            .iter()
            .any(|(_, m)| m["kind"] == "clinical" && m["device"] == "dev-00005"),
        "a withheld alarm was published"
    );
    drop(bridge);
}
