//! Issue 21, part 4 end to end: two NEWS2 table versions (the shipped chart, live, and
//! a candidate whose SpO2 scale 1 scores 3 from 93 % down) scoring a simulated fleet on
//! two sites whose devices desaturate, while the models file moves the candidate from
//! shadow to a canary on site-02 and back (the rollback) under traffic:
//! 1. shadow: candidate rows stored with role shadow; no alert of its version in the
//!    `alerts` table nor on `alerts/#`;
//! 2. canary on site-02: audited transitions; site-02's live alert resolved
//!    (`rollout_changed`), its alerts now carry the candidate's version (role canary);
//!    site-01 never sees the candidate;
//! 3. rollback: audited; the open candidate alert resolved (`model_rollback`); the live
//!    version delivers again on site-02.
//!
//! Then `vitalmq models compare` over the store gives the counts the store holds.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Rig, Spawned, vitalmq_ok};
use serde_json::Value as Json;

const LIVE: &str = "rcp-2017.1";
const CAND: &str = "cand-spo2";

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The models file with the news2 rollout `rollout` (TOML lines after `live`).
fn models_file(cand_sha: &str, rollout: &str) -> String {
    let text = std::fs::read_to_string(repo("policies/examples/models.toml")).expect("models");
    let live = "[[rollout]]\nmodel = \"news2\"\nlive = \"rcp-2017.1\"";
    assert!(text.contains(live), "the shipped rollout changed");
    text.replace(
        live,
        &format!(
            "[[models]]\nname = \"news2\"\nversion = \"{CAND}\"\nkind = \"score\"\n\
             artifact_sha256 = \"{cand_sha}\"\nlineage = \"RCP 2017, SpO2 scale 1 stricter\"\n\
             feature_pipeline = \"vitals-latest/1\"\nintended_use = \"candidate\"\n\
             status = \"approved\"\napproved_by = \"clinical-safety-board\"\n\
             approved_at = \"2026-01-01T00:00:00Z\"\n\n{live}\n{rollout}\n"
        ),
    )
}

/// Writes by rename, as an editor or deployment would.
fn replace(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The `alerts` rows with their body parsed.
fn alerts(rig: &Rig) -> Vec<Json> {
    rig.rows("alerts")
        .into_iter()
        .map(|mut r| {
            let body: Json = r["body"]
                .as_str()
                .and_then(|b| serde_json::from_str(b).ok())
                .unwrap_or(Json::Null);
            r["body"] = body;
            r
        })
        .filter(|r| r["body"]["source"] == "score")
        .collect()
}

fn wait_for<T>(what: &str, within: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not within {within:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn transitions(audit: &std::path::Path) -> Vec<Json> {
    common::audit_records(audit)
        .into_iter()
        .filter(|r| r["action"] == "rollout_transition")
        .collect()
}

fn has_transition(ts: &[Json], version: &str, scope: &str, old: &str, new: &str) -> bool {
    ts.iter().any(|t| {
        common::has_fields(
            t,
            &[
                ("/details/version", version),
                ("/details/scope", scope),
                ("/details/old_role", old),
                ("/details/new_role", new),
            ],
        )
    })
}

/// The alert bodies a `mosquitto_sub -v` printed (`topic payload` lines).
fn published(sub: &Spawned) -> Vec<Json> {
    sub.stdout()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(t, _)| t.starts_with("alerts/"))
        .filter_map(|(_, p)| serde_json::from_str(p).ok())
        .collect()
}

#[test]
fn shadow_canary_and_rollback_under_traffic_are_audited_and_delivered_by_role() {
    let bin = vitalmq_bin!();
    let rig = Rig::start(bin, "rollout", 2, |_| {});
    let dir = rig.dir();
    let chart = std::fs::read_to_string(repo("policies/examples/news2.toml")).expect("chart");
    let strict = "  { max = 91, score = 3 },\n  { min = 92, max = 93, score = 2 },";
    assert!(
        chart.contains(strict),
        "the shipped SpO2 scale 1 bands changed"
    );
    let cand = chart
        .replace("version = \"rcp-2017.1\"", &format!("version = \"{CAND}\""))
        .replacen(strict, "  { max = 93, score = 3 },", 1);
    std::fs::write(dir.join("news2.toml"), &chart).expect("write");
    std::fs::write(dir.join("news2-cand.toml"), &cand).expect("write");
    let cand_sha = sha256_hex(cand.as_bytes());
    let models = dir.join("models.toml");
    let shadow = models_file(&cand_sha, &format!("shadow = [\"{CAND}\"]"));
    let canary = models_file(
        &cand_sha,
        &format!("canary = [{{ version = \"{CAND}\", sites = [\"site-02\"] }}]"),
    );
    std::fs::write(&models, &shadow).expect("write");
    let check = vitalmq_ok(bin, &["models", "check", models.to_str().expect("utf-8")]);
    assert!(check.stdout.contains("ok"), "{}", check.all());
    // A broken one: every problem at file:line, exit 1.
    let bad = dir.join("bad-models.toml");
    std::fs::write(
        &bad,
        shadow.replace(&format!("shadow = [\"{CAND}\"]"), "shadow = [\"nope\"]"),
    )
    .expect("write");
    let ran = common::run(
        Command::new(bin).args(["models", "check"]).arg(&bad),
        Duration::from_secs(20),
    );
    assert!(!ran.success, "{}", ran.all());
    assert!(ran.stderr.contains("bad-models.toml:"), "{}", ran.all());

    let config = format!(
        "{}\n[alerts]\nrules = \"{}\"\npublisher = {{ client_id = \"bridge-01-alerts\", cert = \"pki/identities/bridge/bridge-01-alerts.pem\", key = \"pki/identities/bridge/bridge-01-alerts.key.pem\" }}\n\n[models]\nfile = \"models.toml\"\n\n[scoring]\ntables = [\"news2.toml\", \"news2-cand.toml\"]\n",
        common::BridgeProcess::config_with(rig.broker.port, "", ""),
        repo("policies/examples/rules.toml").display()
    );
    let bridge = common::BridgeProcess::start(bin, dir, &config, Duration::from_secs(30));
    let audit = rig.data().join("audit.jsonl");
    let loaded: Vec<Json> = common::audit_records(&audit)
        .into_iter()
        .filter(|r| r["action"] == "score_table_loaded")
        .collect();
    assert_eq!(loaded.len(), 2, "both tables audited at start");
    assert!(loaded.iter().any(|r| r["details"]["version"] == CAND
        && r["details"]["config_sha256"] == cand_sha.as_str()
        && r["details"]["roles"]["*"] == "shadow"));

    let site1 = rig.mosquitto_sub("integrator", "int-site-01", "alerts/site-01/#");
    let site2 = rig.mosquitto_sub("integrator", "int-site-02", "alerts/site-02/#");
    // dev-00001 (site-01) desaturates once; dev-00002 (site-02) every 270 s of device
    // time (4.5 s of wall time at 60x), so a desaturation is never far off.
    let mut episodes = vec!["desaturation:dev-00001@30s".to_owned()];
    episodes.extend((0..20).map(|i| format!("desaturation:dev-00002@{}s", 30 + 270 * i)));
    let sim = Spawned::start(
        Command::new(bin)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info,rumqttc=warn")
            .args(["sim", "--pki"])
            .arg(rig.pki())
            .arg("--broker")
            .arg(format!("127.0.0.1:{}", rig.broker.port))
            .arg("--state")
            .arg(dir.join("sim-state"))
            .args(["--devices", "2", "--rate", "10", "--time-scale", "60"])
            .args(["--duration", "90s", "--resend-after", "1s"])
            .args(["--episode", &episodes.join(",")]),
    );

    // 1. Shadow: the candidate scores, never alerts.
    let within = Duration::from_secs(20);
    wait_for(
        "live news2 alerts on both sites, candidate rows in shadow",
        within,
        || {
            let a = alerts(&rig);
            let live_on = |site: &str| {
                a.iter().any(|r| {
                    r["state"] == "open"
                        && r["body"]["rule_version"] == LIVE
                        && r["body"]["site"] == site
                })
            };
            let shadow_rows = rig
                .rows("scores")
                .iter()
                .any(|s| s["version"] == CAND && s["role"] == "shadow");
            (live_on("site-01") && live_on("site-02") && shadow_rows).then_some(())
        },
    );
    assert!(
        alerts(&rig)
            .iter()
            .all(|r| r["body"]["rule_version"] == LIVE),
        "no alert of the shadow version"
    );

    // 2. Canary on site-02.
    replace(&models, &canary);
    let ts = wait_for("canary transitions audited", within, || {
        let ts = transitions(&audit);
        has_transition(&ts, CAND, "site:site-02", "shadow", "canary").then_some(ts)
    });
    assert!(
        has_transition(&ts, LIVE, "site:site-02", "live", "shadow"),
        "{ts:?}"
    );
    assert!(has_transition(&ts, CAND, "*", "shadow", "none"), "{ts:?}");
    let shadow_sha = sha256_hex(shadow.as_bytes());
    let canary_sha = sha256_hex(canary.as_bytes());
    assert!(
        ts.iter()
            .all(|t| t["details"]["old_sha256"] == shadow_sha.as_str()
                && t["details"]["new_sha256"] == canary_sha.as_str())
    );
    let status = vitalmq_ok(
        bin,
        &[
            "models",
            "status",
            "--config",
            bridge.config.to_str().expect("utf-8"),
            "--json",
        ],
    );
    let status: Json = serde_json::from_str(status.stdout.trim()).expect("status json");
    assert!(status["roles"].as_array().expect("roles").iter().any(|r| {
        r["version"] == CAND && r["scope"] == "site:site-02" && r["role"] == "canary"
    }));
    let canary_alert = wait_for("a candidate alert on site-02", within, || {
        alerts(&rig)
            .into_iter()
            .find(|r| r["state"] == "open" && r["body"]["rule_version"] == CAND)
    });
    assert_eq!(canary_alert["body"]["site"], "site-02");
    assert_eq!(canary_alert["body"]["role"], "canary");
    let handed_over = alerts(&rig).into_iter().any(|r| {
        r["state"] == "resolved"
            && r["body"]["site"] == "site-02"
            && r["body"]["rule_version"] == LIVE
            && r["body"]["reason"] == "rollout_changed"
    });
    assert!(
        handed_over,
        "site-02's live alert resolved when the canary took over"
    );

    // 3. Rollback while the sim keeps publishing.
    let before = alerts(&rig).len();
    replace(&models, &shadow);
    wait_for("rollback transitions audited", within, || {
        let ts = transitions(&audit);
        (has_transition(&ts, CAND, "site:site-02", "canary", "shadow")
            && has_transition(&ts, LIVE, "site:site-02", "shadow", "live"))
        .then_some(())
    });
    let rolled_back = transitions(&audit)
        .into_iter()
        .filter(|t| t["reason"] == "rollback")
        .count();
    assert!(rolled_back >= 2, "rollbacks named as such");
    wait_for(
        "the candidate's alert resolved by the rollback",
        within,
        || {
            alerts(&rig)
                .iter()
                .any(|r| {
                    r["alert_id"] == canary_alert["alert_id"]
                        && r["state"] == "resolved"
                        && r["body"]["reason"] == "model_rollback"
                })
                .then_some(())
        },
    );
    wait_for("the live version delivers on site-02 again", within, || {
        alerts(&rig)
            .iter()
            .skip(before)
            .any(|r| {
                r["state"] == "open"
                    && r["body"]["site"] == "site-02"
                    && r["body"]["rule_version"] == LIVE
            })
            .then_some(())
    });
    drop(sim);

    // Subscribers saw live and canary outputs only; site-01 never the candidate.
    let seen1 = published(&site1);
    let seen2 = published(&site2);
    assert!(!seen1.is_empty() && !seen2.is_empty());
    assert!(
        seen1.iter().all(|a| a["rule_version"] != CAND),
        "site-01 saw the candidate"
    );
    assert!(
        seen1.iter().chain(&seen2).all(|a| a["role"] != "shadow"),
        "a shadow output was published"
    );
    assert!(
        seen2
            .iter()
            .any(|a| a["rule_version"] == CAND && a["role"] == "canary")
    );
    assert!(alerts(&rig).iter().all(|r| r["body"]["role"] != "shadow"));

    // Compare over the store: the counts it holds.
    let ran = vitalmq_ok(
        bin,
        &[
            "models",
            "compare",
            "--config",
            bridge.config.to_str().expect("utf-8"),
            "--from",
            LIVE,
            "--to",
            CAND,
            "--json",
        ],
    );
    let report: Json = serde_json::from_str(ran.stdout.trim()).expect("compare json");
    let all = alerts(&rig);
    let opens = |v: &str| {
        all.iter()
            .filter(|r| r["state"] == "open" && r["body"]["rule_version"] == v)
            .count() as u64
    };
    let delivered = |v: &str| -> u64 {
        report["alerts"][v]["delivered"]
            .as_object()
            .map_or(0, |m| m.values().filter_map(Json::as_u64).sum())
    };
    // The store may hold rows committed after compare read it: at most more.
    assert!(
        delivered(LIVE) >= 3 && delivered(LIVE) <= opens(LIVE),
        "{report}"
    );
    assert!(
        delivered(CAND) >= 1 && delivered(CAND) <= opens(CAND),
        "{report}"
    );
    assert!(
        report["alerts"][CAND]["shadow"]["news2-medium"].as_u64() >= Some(1),
        "{report}"
    );
    assert!(report["pairs"].as_u64() > Some(0), "{report}");
    assert!(report["timing"]["matched"].as_u64() >= Some(1), "{report}");
    // The stricter band opens no later than the shipped one.
    assert!(report["timing"]["max_s"].as_f64() <= Some(0.0), "{report}");
    eprintln!("compare: {report}");
    let text = ran.stdout;
    assert!(!text.contains("pt-"), "no patient reference printed");
}

const RULES_LIVE: &str = "2025-06-01.1";
const RULES_CAND: &str = "2025-07-01.1";

/// The models file with a candidate rule set registered and the rule set's rollout
/// `rollout` (TOML lines after `live`).
fn rules_models_file(cand_sha: &str, rollout: &str) -> String {
    let text = std::fs::read_to_string(repo("policies/examples/models.toml")).expect("models");
    format!(
        "{text}\n[[models]]\nname = \"rules\"\nversion = \"{RULES_CAND}\"\nkind = \"rules\"\n\
         artifact_sha256 = \"{cand_sha}\"\nlineage = \"Clinical thresholds, stricter SpO2 (candidate)\"\n\
         feature_pipeline = \"vitals-normalized/1\"\nintended_use = \"candidate\"\n\
         status = \"approved\"\napproved_by = \"clinical-safety-board\"\n\
         approved_at = \"2026-01-01T00:00:00Z\"\n\n\
         [[rollout]]\nmodel = \"rules\"\nlive = \"{RULES_LIVE}\"\n{rollout}\n"
    )
}

/// The `spo2-low` rows of the `alerts` table, body parsed.
fn spo2_alerts(rig: &Rig) -> Vec<Json> {
    rig.rows("alerts")
        .into_iter()
        .map(|mut r| {
            let body: Json = r["body"]
                .as_str()
                .and_then(|b| serde_json::from_str(b).ok())
                .unwrap_or(Json::Null);
            r["body"] = body;
            r
        })
        .filter(|r| r["body"]["rule"] == "spo2-low")
        .collect()
}

/// Issue 21 part 4 for rule sets: the shipped rules live, a candidate (SpO2 below 93
/// after 10 s, resolving only at 100) in shadow, then a canary on site-02, then the
/// rollback under traffic.
#[test]
fn a_candidate_rule_set_in_shadow_canary_and_rollback() {
    let bin = vitalmq_bin!();
    let rig = Rig::start(bin, "rules-rollout", 2, |_| {});
    let dir = rig.dir();
    let shipped = std::fs::read_to_string(repo("policies/examples/rules.toml")).expect("rules");
    let spo2 = "below = 90\nresolve_at = 92\nresolve_after_s = 60\npersist = { seconds = 30 }";
    assert!(shipped.contains(spo2), "the shipped spo2-low rule changed");
    let cand = shipped
        .replacen(
            &format!("version = \"{RULES_LIVE}\""),
            &format!("version = \"{RULES_CAND}\""),
            1,
        )
        .replacen(
            spo2,
            "below = 93\nresolve_at = 100\nresolve_after_s = 60\npersist = { seconds = 10 }",
            1,
        );
    std::fs::write(dir.join("rules-cand.toml"), &cand).expect("write");
    let base_sha = sha256_hex(shipped.as_bytes());
    let cand_sha = sha256_hex(cand.as_bytes());
    let models = dir.join("models.toml");
    let shadow = rules_models_file(&cand_sha, &format!("shadow = [\"{RULES_CAND}\"]"));
    let canary = rules_models_file(
        &cand_sha,
        &format!("canary = [{{ version = \"{RULES_CAND}\", sites = [\"site-02\"] }}]"),
    );
    std::fs::write(&models, &shadow).expect("write");
    vitalmq_ok(bin, &["models", "check", models.to_str().expect("utf-8")]);

    let config = format!(
        "{}\n[alerts]\nrules = \"{}\"\ncandidates = [\"rules-cand.toml\"]\npublisher = {{ client_id = \"bridge-01-alerts\", cert = \"pki/identities/bridge/bridge-01-alerts.pem\", key = \"pki/identities/bridge/bridge-01-alerts.key.pem\" }}\n\n[models]\nfile = \"models.toml\"\n",
        common::BridgeProcess::config_with(rig.broker.port, "", ""),
        repo("policies/examples/rules.toml").display()
    );
    let bridge = common::BridgeProcess::start(bin, dir, &config, Duration::from_secs(30));
    let audit = rig.data().join("audit.jsonl");
    let loaded: Vec<Json> = common::audit_records(&audit)
        .into_iter()
        .filter(|r| r["action"] == "rule_set_loaded")
        .collect();
    assert_eq!(loaded.len(), 2, "base and candidate audited at start");
    assert!(loaded.iter().any(|r| r["details"]["version"] == RULES_CAND
        && r["details"]["config_sha256"] == cand_sha.as_str()
        && r["details"]["candidate"] == true
        && r["details"]["roles"]["*"] == "shadow"));
    assert!(
        loaded
            .iter()
            .any(|r| r["details"]["version"] == RULES_LIVE && r["details"]["roles"]["*"] == "live")
    );

    let site1 = rig.mosquitto_sub("integrator", "int-site-01", "alerts/site-01/#");
    let site2 = rig.mosquitto_sub("integrator", "int-site-02", "alerts/site-02/#");
    let mut episodes = vec!["desaturation:dev-00001@30s".to_owned()];
    episodes.extend((0..20).map(|i| format!("desaturation:dev-00002@{}s", 30 + 270 * i)));
    let sim = Spawned::start(
        Command::new(bin)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info,rumqttc=warn")
            .args(["sim", "--pki"])
            .arg(rig.pki())
            .arg("--broker")
            .arg(format!("127.0.0.1:{}", rig.broker.port))
            .arg("--state")
            .arg(dir.join("sim-state"))
            .args(["--devices", "2", "--rate", "10", "--time-scale", "60"])
            .args(["--duration", "90s", "--resend-after", "1s"])
            .args(["--episode", &episodes.join(",")]),
    );
    let by = |sha: &str, site: &str, state: &str| {
        let (sha, site, state) = (sha.to_owned(), site.to_owned(), state.to_owned());
        move |r: &Json| {
            r["state"] == state.as_str()
                && r["body"]["site"] == site.as_str()
                && r["body"]["policy_sha256"] == sha.as_str()
        }
    };

    // 1. Shadow: the candidate's changes are stored, never delivered.
    let within = Duration::from_secs(20);
    wait_for(
        "base alerts on both sites, candidate changes in shadow_alerts",
        within,
        || {
            let a = spo2_alerts(&rig);
            let shadow_rows = rig.rows("shadow-alerts");
            let stored = |site: &str| {
                shadow_rows.iter().any(|s| {
                    s["version"] == RULES_CAND
                        && s["config_sha256"] == cand_sha.as_str()
                        && s["role"] == "shadow"
                        && s["rule"] == "spo2-low"
                        && s["state"] == "open"
                        && s["site"] == site
                })
            };
            (a.iter().any(by(&base_sha, "site-01", "open"))
                && a.iter().any(by(&base_sha, "site-02", "open"))
                && stored("site-01")
                && stored("site-02"))
            .then_some(())
        },
    );
    let before_canary = published(&site2);
    assert!(
        spo2_alerts(&rig)
            .iter()
            .all(|r| r["body"]["policy_sha256"] == base_sha.as_str()),
        "no alert of the shadow version"
    );
    assert!(
        before_canary
            .iter()
            .all(|a| a["policy_sha256"] != cand_sha.as_str()),
        "nothing of the shadow candidate was published"
    );
    // A delivered alert names the rule-set version and role that delivered it.
    let live_alert = spo2_alerts(&rig)
        .into_iter()
        .find(by(&base_sha, "site-02", "open"))
        .expect("a base alert on site-02");
    assert_eq!(live_alert["body"]["rule_set_version"], RULES_LIVE);
    assert_eq!(live_alert["body"]["role"], "live");

    // 2. Canary on site-02.
    replace(&models, &canary);
    let ts = wait_for("canary transitions audited", within, || {
        let ts = transitions(&audit);
        has_transition(&ts, RULES_CAND, "site:site-02", "shadow", "canary").then_some(ts)
    });
    assert!(
        has_transition(&ts, RULES_LIVE, "site:site-02", "live", "shadow"),
        "{ts:?}"
    );
    let canary_alert = wait_for("a candidate alert on site-02", within, || {
        spo2_alerts(&rig)
            .into_iter()
            .find(by(&cand_sha, "site-02", "open"))
    });
    assert_eq!(canary_alert["body"]["rule_version"], "3");
    assert_eq!(canary_alert["body"]["rule_set_version"], RULES_CAND);
    assert_eq!(canary_alert["body"]["role"], "canary");

    // 3. Rollback while the sim keeps publishing.
    let before = spo2_alerts(&rig).len();
    replace(&models, &shadow);
    wait_for("rollback transitions audited", within, || {
        let ts = transitions(&audit);
        (has_transition(&ts, RULES_CAND, "site:site-02", "canary", "shadow")
            && ts
                .iter()
                .any(|t| t["reason"] == "rollback" && t["details"]["model"] == "rules"))
        .then_some(())
    });
    wait_for(
        "the candidate's alert resolved by the rollback",
        within,
        || {
            spo2_alerts(&rig)
                .iter()
                .any(|r| {
                    r["alert_id"] == canary_alert["alert_id"]
                        && r["state"] == "resolved"
                        && r["body"]["reason"] == "model_rollback"
                        && r["body"]["policy_sha256"] == cand_sha.as_str()
                })
                .then_some(())
        },
    );
    wait_for("the base delivers on site-02 again", within, || {
        spo2_alerts(&rig)
            .iter()
            .skip(before)
            .any(by(&base_sha, "site-02", "open"))
            .then_some(())
    });
    drop(sim);

    // Subscribers: site-01 never saw the candidate; site-02 saw its canary alerts.
    let seen1 = published(&site1);
    let seen2 = published(&site2);
    assert!(!seen1.is_empty());
    assert!(
        seen1
            .iter()
            .all(|a| a["policy_sha256"] != cand_sha.as_str()),
        "site-01 saw the candidate"
    );
    assert!(
        seen2
            .iter()
            .any(|a| a["policy_sha256"] == cand_sha.as_str() && a["state"] == "open")
    );
    assert!(
        spo2_alerts(&rig)
            .iter()
            .filter(|r| r["body"]["site"] == "site-01")
            .all(|r| r["body"]["policy_sha256"] == base_sha.as_str())
    );
    // Compare over the store: exact counts, read from the same store compare read.
    let compare = |config: &std::path::Path| -> Json {
        let ran = vitalmq_ok(
            bin,
            &[
                "models",
                "compare",
                "--config",
                config.to_str().expect("utf-8"),
                "--model",
                "rules",
                "--from",
                RULES_LIVE,
                "--to",
                RULES_CAND,
                "--json",
            ],
        );
        assert!(!ran.stdout.contains("pt-"), "no patient reference printed");
        serde_json::from_str(ran.stdout.trim()).expect("compare json")
    };
    // The store as compare saw it: a snapshot before and after agree (the sim has
    // stopped; a resend still landing makes the loop read again).
    let snapshot = || (rig.rows("alerts"), rig.rows("shadow-alerts"));
    let (report, alert_rows, shadow_rows) =
        wait_for("a compare over a quiet store", within, || {
            let before = snapshot();
            let report = compare(&bridge.config);
            let after = snapshot();
            (before == after).then_some((report, after.0, after.1))
        });
    // Clinical rule alerts as compare selects them.
    let bodies: Vec<(Json, String)> = alert_rows
        .iter()
        .filter_map(|r| {
            Some((
                serde_json::from_str::<Json>(r["body"].as_str()?).ok()?,
                r["state"].as_str()?.to_owned(),
            ))
        })
        .filter(|(b, _)| {
            b["kind"] == "clinical"
                && b["alarm"].is_null()
                && b["source"].as_str().is_none_or(|s| s == "rule")
                && b["rule"]
                    .as_str()
                    .is_some_and(|r| !r.is_empty() && !r.starts_with("news2") && r != "no-data")
        })
        .collect();
    let digest = |v: &str| {
        if v == RULES_LIVE {
            base_sha.clone()
        } else {
            cand_sha.clone()
        }
    };
    let delivered = |v: &str| {
        let sha = digest(v);
        bodies
            .iter()
            .filter(move |(b, _)| b["policy_sha256"] == sha.as_str())
    };
    let shadowed = |v: &str| {
        let v = v.to_owned();
        shadow_rows.iter().filter(move |r| {
            r["version"] == v.as_str() && !r["rule"].as_str().unwrap_or("ops/").starts_with("ops/")
        })
    };
    let n = |j: &Json| j.as_u64().unwrap_or(0);
    for v in [RULES_LIVE, RULES_CAND] {
        assert_eq!(
            n(&report["rows"][v]["delivered"]),
            delivered(v).count() as u64,
            "{v} {report}"
        );
        assert_eq!(
            n(&report["rows"][v]["shadow"]),
            shadowed(v).count() as u64,
            "{v} {report}"
        );
        assert_eq!(
            n(&report["opens"][v]["delivered"]["spo2-low"]),
            delivered(v)
                .filter(|(b, s)| s == "open" && b["rule"] == "spo2-low")
                .count() as u64,
            "{v} {report}"
        );
        assert_eq!(
            n(&report["opens"][v]["shadow"]["spo2-low"]),
            shadowed(v)
                .filter(|r| r["state"] == "open" && r["rule"] == "spo2-low")
                .count() as u64,
            "{v} {report}"
        );
        // Episodes: the alert ids with an open change, delivered and shadow.
        let ids: std::collections::BTreeSet<String> = delivered(v)
            .filter(|(_, s)| s == "open")
            .filter_map(|(b, _)| b["alert_id"].as_str().map(str::to_owned))
            .chain(
                shadowed(v)
                    .filter(|r| r["state"] == "open")
                    .filter_map(|r| r["alert_id"].as_str().map(str::to_owned)),
            )
            .collect();
        assert_eq!(
            n(&report["episodes"]["per_version"][v]),
            ids.len() as u64,
            "{v} {report}"
        );
    }
    let e = &report["episodes"];
    let (paired, only_from, only_to) = (n(&e["paired"]), n(&e["only_from"]), n(&e["only_to"]));
    assert_eq!(
        n(&e["per_version"][RULES_LIVE]),
        paired + only_from,
        "{report}"
    );
    assert_eq!(
        n(&e["per_version"][RULES_CAND]),
        paired + only_to,
        "{report}"
    );
    assert_eq!(
        e["agreement_pct"].as_f64(),
        Some(100.0 * paired as f64 / (paired + only_from + only_to) as f64),
        "{report}"
    );
    assert_eq!(
        e["partial"], 0,
        "every episode opened in the store: {report}"
    );
    // The rollout in force (shadow everywhere) gives both versions a role on every
    // device: nothing outside the scope, and the scope names that models file.
    assert_eq!(
        e["outside_scope"],
        serde_json::json!({RULES_LIVE: 0, RULES_CAND: 0}),
        "{report}"
    );
    assert_eq!(
        report["scope_models_sha256"],
        sha256_hex(shadow.as_bytes()).as_str()
    );
    assert!(
        report["scope"]
            .as_str()
            .is_some_and(|s| s.contains("not reconstructed"))
    );
    assert!(paired >= 1, "{report}");
    assert!(e["open_diff_min_s"].as_f64() <= Some(0.0), "{report}");

    // Judged by the canary rollout instead (a config naming a copy of the canary
    // models file; the running bridge is not touched): dev-00001 (site-01) runs the
    // base alone there, so its episodes of both versions are outside the scope.
    let canary_models = dir.join("models-canary.toml");
    std::fs::write(&canary_models, &canary).expect("write");
    let canary_config = dir.join("bridge-canary.toml");
    let text = std::fs::read_to_string(&bridge.config).expect("config");
    assert!(text.contains("file = \"models.toml\""));
    std::fs::write(
        &canary_config,
        text.replace("file = \"models.toml\"", "file = \"models-canary.toml\""),
    )
    .expect("write");
    let scoped = compare(&canary_config);
    let outside = |v: &str, dev: &str| {
        let ids: std::collections::BTreeSet<String> = delivered(v)
            .filter(|(b, s)| s == "open" && b["device"] == dev)
            .filter_map(|(b, _)| b["alert_id"].as_str().map(str::to_owned))
            .chain(
                shadowed(v)
                    .filter(|r| r["state"] == "open" && r["device"] == dev)
                    .filter_map(|r| r["alert_id"].as_str().map(str::to_owned)),
            )
            .collect();
        ids.len() as u64
    };
    let s = &scoped["episodes"];
    assert_eq!(
        n(&s["outside_scope"][RULES_LIVE]),
        outside(RULES_LIVE, "dev-00001"),
        "{scoped}"
    );
    assert_eq!(
        n(&s["outside_scope"][RULES_CAND]),
        outside(RULES_CAND, "dev-00001"),
        "{scoped}"
    );
    assert!(n(&s["outside_scope"][RULES_LIVE]) >= 1, "{scoped}");
    assert_eq!(
        n(&s["per_version"][RULES_LIVE]),
        n(&e["per_version"][RULES_LIVE]) - outside(RULES_LIVE, "dev-00001"),
        "{scoped}"
    );
    assert_eq!(
        n(&s["per_version"][RULES_CAND]),
        n(&e["per_version"][RULES_CAND]) - outside(RULES_CAND, "dev-00001"),
        "{scoped}"
    );
    assert_eq!(
        scoped["loaded_versions"],
        serde_json::json!([RULES_LIVE, RULES_CAND]),
        "{scoped}"
    );
    assert_eq!(
        scoped["scope_models_sha256"],
        sha256_hex(canary.as_bytes()).as_str()
    );
}
