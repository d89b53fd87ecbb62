//! The admin API (issue 19, point 4), called with `curl` and operator certificates of
//! the test PKI against `vitalmq admin serve` over a live bridge's store: each role's
//! allowed and refused calls, a device certificate, an operator without a role, a
//! revoked operator and a call without a purpose refused; break-glass answered, audited
//! and alerted; legal holds placed and lifted by a privacy officer, read by an auditor,
//! refused to a clinician; the admin audit chain verifies afterwards; the CLI with
//! `--server` answers what curl does. Over an encrypted store: reads in plaintext, a
//! patient exported (checked with sha256sum) and erased by a privacy officer, refused
//! to a clinician, while assigned and under a hold; then erased through the API, the
//! other patient intact, and every audit log verifies.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Rig, Spawned, reported_addr, run, vitalmq_ok, wait_until};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(60);
const READY: &str = "vitalmq admin listening on ";

fn bin() -> &'static Path {
    vitalmq_bin!()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// The admin server of a rig, and what a call needs.
struct Admin {
    /// Killed on drop.
    #[allow(dead_code)]
    process: Spawned,
    url: String,
    pki: PathBuf,
    dir: PathBuf,
}

/// An answer: the HTTP status (0 when no HTTP exchange happened) and the JSON body.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Value,
    curl: common::Ran,
}

impl Admin {
    /// `mqtt`: also publish break-glass alerts to the rig's broker as `bridge/admin-api`.
    fn start(rig: &Rig, mqtt: bool) -> Self {
        Self::start_with(rig, mqtt, "")
    }

    /// As [`Self::start`], with `extra` (top-level keys, then tables) at the end of the
    /// configuration's top-level keys.
    fn start_with(rig: &Rig, mqtt: bool, extra: &str) -> Self {
        let dir = rig.dir().to_path_buf();
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/examples/admin-roles.toml"),
            dir.join("admin-roles.toml"),
        )
        .expect("copy the roles");
        // rex: an auditor whose certificate will be revoked; sid: assigns devices of
        // site-01 only.
        let mut roles = std::fs::read_to_string(dir.join("admin-roles.toml")).expect("roles");
        roles.push_str("\n[[operators]]\nid = \"rex\"\nrole = \"auditor\"\n");
        roles.push_str(
            "\n[[operators]]\nid = \"sid\"\nrole = \"site-admin\"\nsites = [\"site-01\"]\n\
             \n[roles.site-admin]\nactions = [\"registry.assign\", \"registry.unassign\"]\nscope = \"sites\"\n",
        );
        std::fs::write(dir.join("admin-roles.toml"), roles).expect("roles");
        std::fs::write(
            dir.join("admin.toml"),
            r#"format = "vitalmq-admin/v1"
listen = "127.0.0.1:0"
roles = "admin-roles.toml"
audit_log = "admin-audit/admin.jsonl"
ops_outbox = "admin-audit/ops-alerts.jsonl"
data_dir = "bridge-data"
registry = "pki/registry.toml"
reid_store = "reid"
holds = "holds.toml"
[tls]
server_cert = "pki/broker/server.pem"
server_key = "pki/broker/server.key.pem"
client_ca = ["pki/ca/ca.pem"]
crls = ["pki/crl.pem"]
trust_domain = "demo.vitalmq"
"#
            .replace("[tls]", &format!("{extra}[tls]")),
        )
        .expect("admin config");
        if mqtt {
            let mut config = std::fs::read_to_string(dir.join("admin.toml")).expect("config");
            config.push_str(&format!(
                r#"[ops_mqtt]
broker = "127.0.0.1:{}"
client_id = "admin-api"
cert = "pki/identities/bridge/admin-api.pem"
key = "pki/identities/bridge/admin-api.key.pem"
ca = "pki/ca/ca.pem"
"#,
                rig.broker.port
            ));
            std::fs::write(dir.join("admin.toml"), config).expect("admin config");
        }
        let process = Spawned::start(
            Command::new(bin())
                .args(["admin", "serve", "--config"])
                .arg(dir.join("admin.toml")),
        );
        assert!(
            process.wait_output(TIMEOUT, |out| reported_addr(out, READY).is_some()),
            "the admin server did not start:\n{}",
            process.all()
        );
        let addr = reported_addr(&process.stderr(), READY).expect("address");
        Self {
            process,
            url: format!("https://{addr}"),
            pki: rig.pki(),
            dir,
        }
    }

    fn cert(&self, role: &str, id: &str) -> (PathBuf, PathBuf) {
        let base = self.pki.join("identities").join(role);
        (
            base.join(format!("{id}.pem")),
            base.join(format!("{id}.key.pem")),
        )
    }

    /// `curl` as `role/id`; `headers` like `X-Vitalmq-Purpose: care`.
    fn curl(
        &self,
        role: &str,
        id: &str,
        method: &str,
        path: &str,
        headers: &[&str],
        body: Option<&Value>,
    ) -> Answer {
        let (cert, key) = self.cert(role, id);
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-X", method, "-w", "\n%{http_code}"])
            .arg("--cacert")
            .arg(self.pki.join("ca/ca.pem"))
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key);
        for h in headers {
            cmd.args(["-H", h]);
        }
        if let Some(b) = body {
            cmd.args([
                "-H",
                "Content-Type: application/json",
                "--data",
                &b.to_string(),
            ]);
        }
        cmd.arg(format!("{}{path}", self.url));
        let ran = run(&mut cmd, TIMEOUT);
        let (text, code) = ran.stdout.rsplit_once('\n').unwrap_or(("", "000"));
        Answer {
            status: code.trim().parse().unwrap_or(0),
            body: serde_json::from_str(text).unwrap_or(Value::Null),
            curl: ran,
        }
    }

    fn get(&self, id: &str, path: &str, purpose: &str) -> Answer {
        let header = format!("X-Vitalmq-Purpose: {purpose}");
        self.curl("operator", id, "GET", path, &[&header], None)
    }

    fn post(&self, id: &str, path: &str, body: &Value) -> Answer {
        self.curl(
            "operator",
            id,
            "POST",
            path,
            &["X-Vitalmq-Purpose: governance"],
            Some(body),
        )
    }

    fn audit(&self) -> Vec<Value> {
        common::audit_records(&self.dir.join("admin-audit/admin.jsonl"))
    }

    fn outbox(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join("admin-audit/ops-alerts.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("alert JSON"))
            .collect()
    }
}

fn expect(answer: &Answer, status: u16, what: &str) {
    assert_eq!(
        answer.status,
        status,
        "{what}: {}\n{}",
        answer.body,
        answer.curl.all()
    );
}

fn reason(answer: &Answer) -> &str {
    answer.body["reason"].as_str().unwrap_or_default()
}

fn rows(answer: &Answer) -> &Vec<Value> {
    answer.body["rows"].as_array().expect("rows")
}

fn issue(pki: &Path, role: &str, id: &str) {
    vitalmq_ok(
        bin(),
        &[
            "certs",
            "issue",
            "--dir",
            s(pki),
            "--role",
            role,
            "--id",
            id,
        ],
    );
}

#[test]
fn roles_scope_break_glass_and_revocation_through_curl() {
    // Identities issued before the broker reads the registry.
    let rig = Rig::start(bin(), "admin-api", 4, |dir| {
        let pki = dir.join("pki");
        for id in ["alice", "aurora", "priya", "adam", "mallory", "rex", "sid"] {
            issue(&pki, "operator", id);
        }
        issue(&pki, "bridge", "admin-api");
    });
    let _bridge = rig.bridge("", "");
    let mut sim = rig.sim(2, 5);
    common::sim_summary_all_receipted(&mut sim);
    rig.wait_stats(TIMEOUT, "10 events stored", |st| st["events"] == 10);

    // A re-identification store with one enrolment; priya may re-identify.
    let reid = rig.dir().join("reid");
    let pseudonym = vitalmq_ok(
        bin(),
        &[
            "reid",
            "enrol",
            "--store",
            s(&reid),
            "--enrolment-id",
            "MRN-4711",
        ],
    )
    .stdout
    .trim()
    .to_owned();
    std::fs::write(
        reid.join("authorised.toml"),
        "identities = [\"spiffe://demo.vitalmq/operator/priya\"]\n",
    )
    .expect("authorise priya");

    let admin = Admin::start(&rig, true);
    let ops = rig.mosquitto_sub("operator", "ops-01", "ops/admin/#");

    // The auditor reads everything; from it, a device of each site.
    let all = admin.get("aurora", "/v1/events", "audit");
    expect(&all, 200, "auditor reads all events");
    assert_eq!(rows(&all).len(), 10, "{}", all.body);
    let device_at = |site: &str| -> String {
        rows(&all)
            .iter()
            .find(|r| r["site"] == site)
            .and_then(|r| r["device"].as_str())
            .unwrap_or_else(|| panic!("a device at {site}: {}", all.body))
            .to_owned()
    };
    let (own, other) = (device_at("site-01"), device_at("site-02"));
    expect(
        &admin.get("aurora", "/v1/quarantine", "audit"),
        200,
        "auditor reads quarantine",
    );
    expect(
        &admin.get("aurora", "/v1/alerts", "audit"),
        200,
        "auditor reads alerts",
    );
    let event_id = rows(&all)[0]["event_id"]
        .as_str()
        .expect("event id")
        .to_owned();
    let traced = admin.get("aurora", &format!("/v1/trace/{event_id}"), "audit");
    expect(&traced, 200, "auditor traces an event");
    assert_eq!(traced.body["kind"], "event", "{}", traced.body);
    let refused = admin.post(
        "aurora",
        &format!("/v1/registry/{own}"),
        &serde_json::json!({"change": "unassign"}),
    );
    expect(&refused, 403, "auditor changes nothing");
    assert_eq!(reason(&refused), "action_not_in_role");

    // The clinician: own site yes, other site no, listing filtered to its site.
    let mine = admin.get("alice", &format!("/v1/events?device={own}"), "care");
    expect(&mine, 200, "clinician reads its site's device");
    assert_eq!(rows(&mine).len(), 5);
    let theirs = admin.get("alice", &format!("/v1/events?device={other}"), "care");
    expect(&theirs, 403, "clinician reads another site's device");
    assert_eq!(reason(&theirs), "outside_scope");
    let listed = admin.get("alice", "/v1/events", "care");
    expect(&listed, 200, "clinician lists events");
    assert!(
        rows(&listed).iter().all(|r| r["site"] == "site-01"),
        "{}",
        listed.body
    );
    assert_eq!(listed.body["withheld_outside_scope"], 5);
    expect(
        &admin.get("alice", "/v1/quarantine", "care"),
        403,
        "clinician reads quarantine",
    );
    let reid_refused = admin.post(
        "alice",
        "/v1/reid/lookup",
        &serde_json::json!({"pseudonym": pseudonym}),
    );
    expect(&reid_refused, 403, "clinician re-identifies");

    // Break-glass: answered in full, audited with the reason, alerted.
    assert!(admin.outbox().is_empty(), "no alert before break-glass");
    let glass = admin.curl(
        "operator",
        "alice",
        "GET",
        &format!("/v1/events?device={other}"),
        &[
            "X-Vitalmq-Purpose: care",
            "X-Vitalmq-Break-Glass: patient transferred, on call",
        ],
        None,
    );
    expect(&glass, 200, "break-glass read");
    assert_eq!(glass.body["break_glass"], true);
    assert_eq!(rows(&glass).len(), 5);
    let alerts = admin.outbox();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    let alert = &alerts[0];
    assert_eq!(alert["kind"], "operational");
    assert_eq!(alert["topic"], "ops/admin/break_glass");
    assert_eq!(alert["identity"], "spiffe://demo.vitalmq/operator/alice");
    assert_eq!(alert["role"], "clinician");
    assert_eq!(alert["device"], other.as_str());
    let alert_id = alert["alert_id"].as_str().expect("alert id").to_owned();
    assert!(
        ops.wait_output(TIMEOUT, |out| out.contains(&alert_id)),
        "the break-glass alert reaches an operator subscribed to ops/admin/#:\n{}",
        ops.all()
    );

    // Missing purpose; no role; a device certificate.
    let unstated = admin.curl("operator", "aurora", "GET", "/v1/events", &[], None);
    expect(&unstated, 400, "no purpose");
    assert_eq!(reason(&unstated), "no_purpose");
    let nobody = admin.get("mallory", "/v1/events", "curiosity");
    expect(&nobody, 403, "operator without a role");
    assert_eq!(reason(&nobody), "no_role");
    // The roles file is re-read when it changes: mallory becomes an auditor.
    let roles = admin.dir.join("admin-roles.toml");
    let mut text = std::fs::read_to_string(&roles).expect("roles");
    text.push_str("\n[[operators]]\nid = \"mallory\"\nrole = \"auditor\"\n");
    std::fs::write(&roles, text).expect("roles");
    wait_until(TIMEOUT, "mallory's new role applies", || {
        admin.get("mallory", "/v1/events", "audit").status == 200
    });
    let unknown = admin.get("aurora", "/v1/erase-everything", "audit");
    expect(&unknown, 404, "unknown endpoint");
    let device = admin.curl(
        "device",
        &own,
        "GET",
        "/v1/events",
        &["X-Vitalmq-Purpose: care"],
        None,
    );
    expect(&device, 403, "device certificate");
    assert_eq!(reason(&device), "not_an_operator");

    // Governance: the admin reassigns, the privacy officer grants consent and
    // re-identifies; each through the shared change function (the registry file).
    let assigned = admin.post(
        "adam",
        &format!("/v1/registry/{own}"),
        &serde_json::json!({"change": "assign", "patient_ref": "pt-newpatient", "site": "site-01"}),
    );
    expect(&assigned, 200, "admin assigns");
    expect(
        &admin.get("adam", "/v1/events", "ops"),
        403,
        "admin reads no events",
    );
    let granted = admin.post(
        "priya",
        &format!("/v1/registry/{own}"),
        &serde_json::json!({"change": "consent-grant", "purpose": "research"}),
    );
    expect(&granted, 200, "privacy officer grants research consent");
    let overlapping = admin.post(
        "priya",
        &format!("/v1/registry/{own}"),
        &serde_json::json!({"change": "consent-grant", "purpose": "research"}),
    );
    expect(
        &overlapping,
        422,
        "an overlapping grant is refused by the registry rules",
    );
    expect(
        &admin.post(
            "priya",
            &format!("/v1/registry/{own}"),
            &serde_json::json!({"change": "retire"}),
        ),
        403,
        "privacy officer retires",
    );
    let registry = std::fs::read_to_string(rig.pki().join("registry.toml")).expect("registry");
    assert!(
        registry.contains("pt-newpatient") && registry.contains("research"),
        "{registry}"
    );
    // A site-scoped role assigns neither to another site nor a device of another site
    // nor one the registry does not know, break-glass reason or not.
    for (device, site) in [
        (own.as_str(), "site-02"),
        (other.as_str(), "site-01"),
        ("dev-99999", "site-01"),
    ] {
        let refused = admin.curl(
            "operator",
            "sid",
            "POST",
            &format!("/v1/registry/{device}"),
            &[
                "X-Vitalmq-Purpose: governance",
                "X-Vitalmq-Break-Glass: urgent",
            ],
            Some(&serde_json::json!({"change": "assign", "patient_ref": "pt-elsewhere", "site": site})),
        );
        expect(
            &refused,
            403,
            &format!("site-01 admin assigns {device} to {site}"),
        );
        assert_eq!(reason(&refused), "outside_scope");
    }
    let registry = std::fs::read_to_string(rig.pki().join("registry.toml")).expect("registry");
    assert!(!registry.contains("pt-elsewhere"), "{registry}");

    // Answers no handler makes are audited too: a wrong method, an undecodable path,
    // a body over the limit.
    let wrong_method = admin.curl(
        "operator",
        "aurora",
        "DELETE",
        "/v1/events",
        &["X-Vitalmq-Purpose: audit"],
        None,
    );
    expect(&wrong_method, 405, "DELETE /v1/events");
    assert_eq!(reason(&wrong_method), "method_not_allowed");
    let undecodable = admin.get("aurora", "/v1/trace/%ff", "audit");
    expect(&undecodable, 400, "an id that is not UTF-8");
    let oversized = admin.post(
        "priya",
        "/v1/reid/lookup",
        &Value::String("x".repeat(70 * 1024)),
    );
    expect(&oversized, 413, "a body over 64 KiB");
    assert_eq!(reason(&oversized), "body_too_large");

    let found = admin.post(
        "priya",
        "/v1/reid/lookup",
        &serde_json::json!({"pseudonym": pseudonym}),
    );
    expect(&found, 200, "privacy officer re-identifies");
    assert_eq!(found.body["enrolment_id"], "MRN-4711");

    // Legal holds: the privacy officer places and lifts, the auditor reads, the
    // clinician may do neither; the hold's patient is in no audit record.
    let held = "pt-heldpatient1";
    let placed = admin.post(
        "priya",
        "/v1/holds",
        &serde_json::json!({"id": "lh-api-1", "reason": "claim 2027/4", "patient_ref": held}),
    );
    expect(&placed, 200, "privacy officer places a hold");
    assert_eq!(placed.body["active"], true, "{}", placed.body);
    assert_eq!(placed.body["placed_by"], "priya", "{}", placed.body);
    let duplicate = admin.post(
        "priya",
        "/v1/holds",
        &serde_json::json!({"id": "lh-api-1", "reason": "again", "device": own}),
    );
    expect(&duplicate, 422, "a hold id is never reused");
    let clinician = admin.post(
        "alice",
        "/v1/holds",
        &serde_json::json!({"id": "lh-api-2", "reason": "mine", "device": own}),
    );
    expect(&clinician, 403, "a clinician places no hold");
    assert_eq!(reason(&clinician), "action_not_in_role");
    expect(
        &admin.get("alice", "/v1/holds", "care"),
        403,
        "a clinician reads no holds",
    );
    let listed = admin.get("aurora", "/v1/holds", "audit");
    expect(&listed, 200, "the auditor reads the holds");
    assert_eq!(rows(&listed).len(), 1, "{}", listed.body);
    assert_eq!(rows(&listed)[0]["patient_ref"], held);
    let auditor_lift = admin.post(
        "aurora",
        "/v1/holds/lh-api-1/lift",
        &serde_json::json!({"reason": "not mine to lift"}),
    );
    expect(&auditor_lift, 403, "an auditor lifts no hold");
    let lifted = admin.post(
        "priya",
        "/v1/holds/lh-api-1/lift",
        &serde_json::json!({"reason": "claim settled"}),
    );
    expect(&lifted, 200, "privacy officer lifts the hold");
    assert_eq!(lifted.body["active"], false, "{}", lifted.body);
    assert_eq!(lifted.body["lifted_by"], "priya", "{}", lifted.body);
    let unknown_hold = admin.post(
        "priya",
        "/v1/holds/lh-none/lift",
        &serde_json::json!({"reason": "x"}),
    );
    expect(&unknown_hold, 404, "lifting a hold that does not exist");
    let after = admin.get("aurora", "/v1/holds", "audit");
    expect(&after, 200, "the lifted hold is still listed");
    assert_eq!(rows(&after).len(), 1, "{}", after.body);
    assert_eq!(rows(&after)[0]["active"], false, "{}", after.body);
    let holds_file = admin.dir.join("holds.toml");
    let loaded = vitalmq_policies::LegalHolds::load(&holds_file).expect("the holds load");
    assert!(loaded.holds().is_empty() && loaded.lifted().len() == 1);
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&holds_file).expect("holds").permissions()
        ) & 0o777,
        0o600
    );

    // rex works until revoked; the new CRL is picked up without a restart.
    expect(
        &admin.get("rex", "/v1/alerts", "audit"),
        200,
        "rex before revocation",
    );
    vitalmq_ok(
        bin(),
        &[
            "certs",
            "revoke",
            "--dir",
            s(&rig.pki()),
            "--role",
            "operator",
            "--id",
            "rex",
        ],
    );
    let revoked = admin.get("rex", "/v1/alerts", "audit");
    assert_eq!(revoked.status, 0, "revoked: no HTTP answer: {revoked:?}");

    // The audit: every call, with identity, role, purpose and outcome; no patient value.
    let records = admin.audit();
    let find = |action: &str, reason: &str, who: &str| {
        records.iter().any(|r| {
            r["event"] == "admin_request"
                && r["component"] == "admin"
                && r["action"] == action
                && r["reason"] == reason
                && r["actor"]["identity"]
                    .as_str()
                    .is_some_and(|i| i.ends_with(who))
        })
    };
    assert!(find("events.read", "allowed", "/aurora"));
    assert!(find("events.read", "refused:outside_scope", "/alice"));
    assert!(find("events.read", "refused:no_purpose", "/aurora"));
    assert!(find("events.read", "refused:no_role", "/mallory"));
    assert!(find("events.read", "allowed", "/mallory"));
    assert!(find("unknown", "refused:no_such_endpoint", "/aurora"));
    assert!(find(
        "events.read",
        "refused:not_an_operator",
        &format!("/{own}")
    ));
    assert!(find("registry.assign", "succeeded", "/adam"));
    assert!(find("reid.lookup", "succeeded", "/priya"));
    assert!(find("reid.lookup", "refused:action_not_in_role", "/alice"));
    assert!(find("registry.assign", "refused:outside_scope", "/sid"));
    assert!(find("request", "refused:method_not_allowed", "/aurora"));
    assert!(find("request", "refused:bad_request", "/aurora"));
    assert!(find("request", "refused:body_too_large", "/priya"));
    assert!(find("hold.place", "allowed", "/priya"));
    assert!(find("hold.place", "succeeded", "/priya"));
    assert!(find("hold.place", "failed", "/priya"));
    assert!(find("hold.place", "refused:action_not_in_role", "/alice"));
    assert!(find("holds.read", "refused:action_not_in_role", "/alice"));
    assert!(find("holds.read", "allowed", "/aurora"));
    assert!(find("hold.lift", "refused:action_not_in_role", "/aurora"));
    assert!(find("hold.lift", "succeeded", "/priya"));
    assert!(find("hold.lift", "not_found", "/priya"));
    let glass_record = records
        .iter()
        .find(|r| r["reason"] == "break_glass")
        .expect("a break-glass record");
    assert_eq!(glass_record["details"]["role"], "clinician");
    assert_eq!(glass_record["details"]["purpose"], "care");
    assert_eq!(
        glass_record["details"]["break_glass_reason"],
        "patient transferred, on call"
    );
    assert!(
        records
            .iter()
            .any(|r| r["action"] == "connect" && r["reason"] == "refused:certificate_revoked"),
        "the revoked handshake is audited"
    );
    let text = std::fs::read_to_string(admin.dir.join("admin-audit/admin.jsonl")).expect("log");
    assert!(
        !text.contains("MRN-4711") && !text.contains("pt-newpatient") && !text.contains(held),
        "no patient values"
    );
    wait_until(TIMEOUT, "the audit chain verifies", || verifies(&admin));
}

/// The patient of `device` in the registry.
fn patient_of(registry: &Path, device: &str) -> String {
    let reg = vitalmq_policies::DeviceRegistry::load(registry).expect("registry");
    let id = vitalmq_envelope::DeviceId::new(device).expect("id");
    reg.device(&id).expect("device").patient_ref.clone()
}

/// An operator log verifies (live: its tail may be unsigned).
fn operator_log_verifies(log: &Path) {
    let ran = vitalmq_ok(bin(), &["audit", "verify", s(log), "--allow-unsigned-tail"]);
    assert!(ran.stdout.contains("chain intact"), "{}", ran.all());
}

#[test]
fn a_privacy_officer_exports_and_erases_a_patient_of_an_encrypted_store() {
    let rig = Rig::start(bin(), "admin-erase", 2, |dir| {
        for id in ["alice", "aurora", "priya"] {
            issue(&dir.join("pki"), "operator", id);
        }
    });
    let registry = rig.pki().join("registry.toml");
    let (a, b) = (
        patient_of(&registry, "dev-00001"),
        patient_of(&registry, "dev-00002"),
    );
    let key_file = rig.dir().join("kek.json");
    vitalmq_ok(bin(), &["keys", "init", "--key-file", s(&key_file)]);
    let _bridge = rig.bridge("", "[encryption]\nkey_file = \"kek.json\"\n");
    let mut sim = rig.sim(2, 3);
    common::sim_summary_all_receipted(&mut sim);
    rig.wait_stats(TIMEOUT, "6 events stored", |st| st["events"] == 6);
    let admin = Admin::start_with(
        &rig,
        false,
        "exports_dir = \"exports\"\n[encryption]\nkey_file = \"kek.json\"\n",
    );
    // The deployment's holds file exists from the start (an erasure without it is
    // refused: no hold could be ruled out).
    std::fs::write(
        admin.dir.join("holds.toml"),
        "format = \"vitalmq-holds/v1\"\n",
    )
    .expect("holds file");

    // The store is sealed, the API reads it in plaintext with the key file.
    let events = admin.get("aurora", "/v1/events", "audit");
    expect(&events, 200, "auditor reads the sealed store");
    assert_eq!(rows(&events).len(), 6, "{}", events.body);
    let event_of = |device: &str| -> String {
        rows(&events)
            .iter()
            .find(|r| r["device"] == device)
            .and_then(|r| r["event_id"].as_str())
            .unwrap_or_else(|| panic!("an event of {device}: {}", events.body))
            .to_owned()
    };
    let (a_event, b_event) = (event_of("dev-00001"), event_of("dev-00002"));
    let normalized = |event: &str| -> Value {
        let traced = admin.get("aurora", &format!("/v1/trace/{event}"), "audit");
        expect(&traced, 200, "trace");
        traced.body["event"].clone()
    };
    let before = normalized(&a_event);
    assert_eq!(
        before["normalized"]["event_id"], a_event,
        "A's sealed event reads in plaintext: {before}"
    );
    assert!(before.get("sealed").is_none(), "{before}");

    // A clinician may neither export nor erase.
    let erase_path = format!("/v1/patients/{a}/erase");
    let export_path = format!("/v1/patients/{a}/export");
    let erase_body = serde_json::json!({"reason": "GDPR art. 17, ticket 4711"});
    for path in [&erase_path, &export_path] {
        let refused = admin.post("alice", path, &erase_body);
        expect(&refused, 403, path);
        assert_eq!(reason(&refused), "action_not_in_role");
    }

    // The privacy officer exports A: a new owner-only directory not named after A,
    // whose manifest and files check with sha256sum.
    let exported = admin.post(
        "priya",
        &export_path,
        &serde_json::json!({"purpose": "GDPR art. 15 access request"}),
    );
    expect(&exported, 200, "privacy officer exports A");
    let dir = PathBuf::from(exported.body["dir"].as_str().expect("dir"));
    assert!(
        dir.starts_with(admin.dir.join("exports")),
        "{}",
        dir.display()
    );
    assert!(
        !s(&dir).contains(&a),
        "the directory does not name the patient"
    );
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&dir).expect("dir").permissions()
        ) & 0o777,
        0o700
    );
    let manifest = &exported.body["manifest"];
    assert_eq!(manifest["patient_ref"], a.as_str(), "{manifest}");
    assert_eq!(manifest["counts"]["events"], 3, "{manifest}");
    assert_eq!(manifest["requested_by"], "priya", "{manifest}");
    assert_eq!(manifest["purpose"], "GDPR art. 15 access request");
    let sums: String = manifest["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| {
            format!(
                "{}  {}\n",
                f["sha256"].as_str().expect("sha256"),
                f["name"].as_str().expect("name")
            )
        })
        .collect();
    let files_sums = rig.dir().join("export-files.sha256");
    std::fs::write(&files_sums, sums).expect("sums");
    for list in [dir.join("manifest.sha256"), files_sums] {
        let check = run(
            Command::new("sha256sum")
                .arg("-c")
                .arg(&list)
                .current_dir(&dir),
            TIMEOUT,
        );
        assert!(check.success, "{}", check.all());
    }
    let exported_events = std::fs::read_to_string(dir.join("events.jsonl")).expect("events");
    assert_eq!(exported_events.lines().count(), 3);
    assert!(exported_events.contains(&a_event) && !exported_events.contains(&b));

    // Erasure: refused while A's device is assigned, then under a hold on it (409,
    // nothing destroyed); done once the device is unassigned and the hold lifted.
    let assigned = admin.post("priya", &erase_path, &erase_body);
    expect(&assigned, 409, "erasure while assigned");
    assert_eq!(reason(&assigned), "conflict");
    assert!(
        assigned.body["error"]
            .as_str()
            .is_some_and(|e| e.contains("still assigned")),
        "{}",
        assigned.body
    );
    expect(
        &admin.post(
            "priya",
            "/v1/holds",
            &serde_json::json!({"id": "lh-erase-1", "reason": "claim 2027/9", "device": "dev-00001"}),
        ),
        200,
        "a hold on A's device",
    );
    vitalmq_ok(
        bin(),
        &[
            "registry",
            "unassign",
            "--registry",
            s(&registry),
            "--device",
            "dev-00001",
        ],
    );
    let held = admin.post("priya", &erase_path, &erase_body);
    expect(&held, 409, "erasure under a hold");
    assert!(
        held.body["error"]
            .as_str()
            .is_some_and(|e| e.contains("legal hold lh-erase-1")),
        "{}",
        held.body
    );
    assert_eq!(
        normalized(&a_event)["normalized"]["event_id"],
        a_event,
        "still readable"
    );
    expect(
        &admin.post(
            "priya",
            "/v1/holds/lh-erase-1/lift",
            &serde_json::json!({"reason": "claim settled"}),
        ),
        200,
        "the hold lifted",
    );
    let erased = admin.post("priya", &erase_path, &erase_body);
    expect(&erased, 200, "privacy officer erases A");
    assert_eq!(erased.body["erased_by"], "priya", "{}", erased.body);
    assert_eq!(erased.body["already_erased"], false, "{}", erased.body);
    assert_eq!(
        erased.body["unreadable_rows"]["events"], 3,
        "{}",
        erased.body
    );
    assert!(erased.body["keys_destroyed"].as_u64().expect("n") >= 1);

    // Read through the API: A's rows erased, B's readable; A cannot be exported.
    let after = admin.get("aurora", "/v1/events", "audit");
    expect(&after, 200, "events after the erasure");
    for r in rows(&after) {
        assert_eq!(r["erased"] == true, r["device"] == "dev-00001", "{r}");
    }
    let a_after = normalized(&a_event);
    assert_eq!(a_after["erased"], true, "{a_after}");
    assert!(a_after["normalized"].is_null(), "{a_after}");
    assert_eq!(normalized(&b_event)["normalized"]["event_id"], b_event);
    let gone = admin.post("priya", &export_path, &serde_json::json!({}));
    expect(&gone, 409, "export of an erased patient");
    assert_eq!(reason(&gone), "conflict");

    // Audited: each outcome, the patient only as the resource, none of their data.
    let records = admin.audit();
    let outcomes: Vec<String> = records
        .iter()
        .filter(|r| {
            r["action"]
                .as_str()
                .is_some_and(|a| a.starts_with("patient."))
        })
        .map(|r| {
            assert_eq!(r["resource"], format!("patient/{a}"), "{r}");
            format!(
                "{} {}",
                r["action"].as_str().unwrap_or_default(),
                r["reason"].as_str().unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            "patient.erase refused:action_not_in_role",
            "patient.export refused:action_not_in_role",
            "patient.export allowed",
            "patient.export succeeded",
            "patient.erase allowed",
            "patient.erase conflict",
            "patient.erase allowed",
            "patient.erase conflict",
            "patient.erase allowed",
            "patient.erase succeeded",
            "patient.export allowed",
            "patient.export conflict",
        ]
    );
    let text = std::fs::read_to_string(admin.dir.join("admin-audit/admin.jsonl")).expect("log");
    assert!(
        !text.contains("spo2") && !text.contains(&b) && !text.contains("ticket 4711"),
        "no patient data, no other patient, not the request's text"
    );
    wait_until(TIMEOUT, "the admin audit chain verifies", || {
        verifies(&admin)
    });
    // The erasure and the export are operator actions of the data directory too, by
    // the API caller; every operator log verifies.
    let data_log = rig.data().join("operator-audit/operator.jsonl");
    let ops = common::audit_records(&data_log);
    for action in ["erase", "patient.export"] {
        assert!(
            ops.iter()
                .any(|r| r["action"] == action && r["reason"] == "succeeded"),
            "{action}: {ops:?}"
        );
    }
    for log in [
        data_log,
        rig.pki().join("audit/operator.jsonl"),
        rig.dir().join("audit/operator.jsonl"),
    ] {
        operator_log_verifies(&log);
    }
}

/// `vitalmq audit verify` on the admin log with its checkpoint key.
fn verifies(admin: &Admin) -> bool {
    let log = admin.dir.join("admin-audit/admin.jsonl");
    let public = std::fs::read_to_string(log.with_file_name("audit-signing.key.pem.pub"))
        .expect("the signing key's public half is beside the log");
    let ran = vitalmq_ok(
        bin(),
        &["audit", "verify", s(&log), "--trusted-key", public.trim()],
    );
    ran.stdout.contains("chain intact")
}

#[test]
fn the_cli_with_server_answers_what_curl_does() {
    let rig = Rig::start(bin(), "admin-cli", 2, |dir| {
        issue(&dir.join("pki"), "operator", "aurora");
        issue(&dir.join("pki"), "operator", "adam");
    });
    let _bridge = rig.bridge("", "");
    let mut sim = rig.sim(2, 3);
    common::sim_summary_all_receipted(&mut sim);
    rig.wait_stats(TIMEOUT, "6 events stored", |st| st["events"] == 6);
    let admin = Admin::start(&rig, false);

    let by_curl = admin.get("aurora", "/v1/events", "audit");
    expect(&by_curl, 200, "curl");
    let (cert, key) = admin.cert("operator", "aurora");
    let client = |args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        all.extend([
            "--server".into(),
            admin.url.clone(),
            "--cert".into(),
            s(&cert).into(),
            "--key".into(),
            s(&key).into(),
            "--ca".into(),
            s(&admin.pki.join("ca/ca.pem")).into(),
        ]);
        run(Command::new(bin()).args(&all), TIMEOUT)
    };
    let ran = client(&["store", "events", "--purpose", "audit"]);
    assert!(ran.success, "{}", ran.all());
    let by_cli: Vec<Value> = ran
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(&by_cli, rows(&by_curl));
    // The same rows as the local read of the store.
    assert_eq!(by_cli, rig.rows("events"));

    let unstated = client(&["store", "events"]);
    assert!(
        !unstated.success && unstated.stderr.contains("purpose"),
        "{}",
        unstated.all()
    );

    // A registry change through the CLI client lands in the file, audited as adam.
    let (cert, key) = admin.cert("operator", "adam");
    let ran = run(
        Command::new(bin()).args([
            "registry",
            "unassign",
            "--device",
            "dev-00002",
            "--reason",
            "device returned",
            "--server",
            &admin.url,
            "--cert",
            s(&cert),
            "--key",
            s(&key),
            "--ca",
            s(&admin.pki.join("ca/ca.pem")),
        ]),
        TIMEOUT,
    );
    assert!(ran.success, "{}", ran.all());
    let operator_log = common::audit_records(&rig.pki().join("audit/operator.jsonl"));
    assert!(
        operator_log
            .iter()
            .any(|r| r["action"] == "registry.unassign"
                && r["reason"] == "succeeded"
                && r["details"]["identity"] == "spiffe://demo.vitalmq/operator/adam"
                && r["details"]["role"] == "admin"
                && r["details"]["purpose"] == "device returned"),
        "{operator_log:?}"
    );
}

#[test]
fn silent_peers_do_not_keep_an_operator_out() {
    let rig = Rig::start(bin(), "admin-slots", 1, |dir| {
        issue(&dir.join("pki"), "operator", "aurora");
    });
    let admin = Admin::start(&rig, false);
    let addr = admin.url.trim_start_matches("https://").to_owned();
    // Twice as many peers as operator slots, each connecting and saying nothing: they
    // hold connections in the handshake, never an operator's slot.
    let silent: Vec<std::net::TcpStream> = (0..2 * vitalmq_admin::MAX_CONNECTIONS)
        .map(|_| std::net::TcpStream::connect(&addr).expect("connect"))
        .collect();
    let unknown = admin.get("aurora", "/v1/nowhere", "audit");
    expect(
        &unknown,
        404,
        "an operator's call while silent peers hold connections",
    );
    // Served while every silent peer still held its connection: none was closed (its
    // handshake timing out) to make room.
    for peer in &silent {
        peer.set_nonblocking(true).expect("nonblocking");
        let mut byte = [0u8; 1];
        let read = std::io::Read::read(&mut &*peer, &mut byte);
        assert!(
            matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a silent peer's connection was closed before the call was served: {read:?}"
        );
    }
    let records = admin.audit();
    assert!(
        records.iter().any(|r| r["action"] == "unknown"),
        "the call is audited: {records:?}"
    );
    drop(silent);
}
