//! `vitalmq demo` as a new user runs it: the whole system in one process (broker gate,
//! bridge, simulated devices with injected faults) for 20 seconds. It must stop on its
//! own and report every device connected, every injected fault refused by the party and
//! with the reason the SPEC gives, nothing lost, every alert path of SPEC 5.1/5.2 taken
//! (a device alarm opened and resolved, a silent device's `no-data`, the operator's
//! acknowledgement, an unacknowledged alert re-sent escalated), the governance scenario
//! (a research sink of consented, minimised events, a consent withdrawal, a reassignment,
//! a clinician's refused and break-glass reads through the admin API), the data lifecycle
//! (encryption at rest, a backup, a legal hold refusing an erasure, the erasure of a
//! patient reaching the backup taken before it, an export, retention runs), and audit
//! logs whose chains verify; and the commands it suggests for looking around must work on what it
//! left behind, the `mosquitto_pub` acknowledgement and the `fhir export|verify` included
//! (against the demo's broker and bridge started again from the configurations it wrote).
//! Every patient of the run exported as FHIR from the store it left validates with
//! `fhir.resources` (zero errors) and re-verifies with `vitalmq fhir verify`; only the
//! erased patient's export is refused.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{BridgeProcess, BrokerProcess, run, temp_dir};

const DEVICES: u32 = 14;

fn bin() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_vitalmq"))
}

/// The `ok`/`FAIL` lines of the demo's checks.
fn checks(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with("ok ") || l.starts_with("FAIL "))
        .collect()
}

/// The check line about `what`, asserting it passed.
fn passed<'a>(stdout: &'a str, what: &str) -> &'a str {
    let line = checks(stdout)
        .into_iter()
        .find(|l| l.contains(what))
        .unwrap_or_else(|| panic!("no check about {what:?}:\n{stdout}"));
    assert!(line.starts_with("ok "), "{line}\n\n{stdout}");
    line
}

/// The number after `label` on the first line that has it.
fn number_after(stdout: &str, label: &str) -> usize {
    stdout
        .lines()
        .find_map(|l| l.split_once(label))
        .and_then(|(_, rest)| {
            rest.trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {label:?} in:\n{stdout}"))
}

/// The scripted desaturation episode raised at least one clinical alert for its device,
/// seen by the operator's subscription.
fn assert_alerts_raised_for_the_scripted_episode(stdout: &str) {
    let n = number_after(
        stdout,
        "alerts for the scripted episode (desaturation on dev-00001):",
    );
    assert!(n >= 1, "no alert for the scripted episode:\n{stdout}");
    assert!(
        stdout.contains("ALERT alerts/") && stdout.contains("device dev-00001"),
        "{stdout}"
    );
}

#[test]
fn demo_runs_the_whole_system_and_accounts_for_every_fault() {
    let tmp = temp_dir("vitalmq-demo");
    let dir = tmp.path().join("work");
    let out = run(
        Command::new(bin())
            .args([
                "demo",
                "--duration",
                "20s",
                "--devices",
                &DEVICES.to_string(),
            ])
            .arg("--dir")
            .arg(&dir),
        Duration::from_secs(150),
    );
    assert!(out.success, "exit {:?}\n{}", out.code, out.all());
    let stdout = &out.stdout;
    assert!(
        stdout.contains("demo ok: all") && checks(stdout).iter().all(|l| l.starts_with("ok ")),
        "{stdout}"
    );

    passed(
        stdout,
        &format!("every device connected ({DEVICES}/{DEVICES}"),
    );
    // Each fault, refused by the party and with the reason the SPEC gives it.
    for (fault, evidence) in [
        ("duplicate on dev-00003", "as duplicate"),
        ("replay on dev-00004", "as replay"),
        (
            "bad-signature on dev-00005",
            "quarantined 1 message as bad_signature",
        ),
        ("out-of-order on dev-00006", "late (out_of_order)"),
        (
            "wrong-topic on dev-00007 (MQTT 3.1.1)",
            "device saw: connection closed by the broker",
        ),
        ("wrong-topic on dev-00007", "audited 1 publish denial"),
        (
            "wrong-topic on dev-00008 (MQTT 5)",
            "device saw: PUBACK NotAuthorized",
        ),
        ("wrong-topic on dev-00008", "audited 1 publish denial"),
        ("foreign-client-id on dev-00009", "CONNACK NotAuthorized"),
        ("foreign-client-id on dev-00009", "client_id_mismatch"),
        (
            "revoked-certificate on dev-00014",
            "TLS alert CertificateRevoked",
        ),
        ("revoked-certificate on dev-00014", "as certificate_revoked"),
        ("clock-skew on dev-00010", "0 refused"),
        ("reboot-storm on dev-00011", "0 replays"),
        ("reconnect storm", "reconnected"),
    ] {
        let line = passed(stdout, fault);
        assert!(
            line.contains(evidence),
            "{fault}: {evidence:?} missing in {line}"
        );
    }
    passed(
        stdout,
        "the quarantine holds exactly the injected forgeries: bad_signature 1",
    );
    passed(
        stdout,
        "nothing lost: every message a device sent is stored exactly once",
    );
    // Governance (issue 19): the research sink, the withdrawal, the reassignment and
    // the admin API, each checked against what the sinks wrote and the audit logs.
    for (what, evidence) in [
        ("research sink:", "each with only the allowed fields"),
        (
            "research sink: nothing from devices without research consent",
            "every fifth",
        ),
        (
            "consent withdrawal: dev-00013",
            "reached research, none of the",
        ),
        ("withheld from research, counted:", "no_consent"),
        ("reassignment: dev-00012", "(0 misattributed)"),
        (
            "admin API: clin-01 (site-01) reading dev-00002",
            "refused (403",
        ),
        (
            "admin API: break-glass read answered",
            "seen on ops/admin/break_glass",
        ),
        ("admin audit chain intact", "records"),
    ] {
        let line = passed(stdout, what);
        assert!(
            line.contains(evidence),
            "{what}: {evidence:?} missing in {line}"
        );
    }
    // The data lifecycle (issue 20), after the bridge stopped: each step printed and
    // checked against the store, the objects, the backup and the audit logs.
    for line in [
        "lifecycle: encryption at rest, backup, legal hold, erasure, export, retention",
        "  backup    ",
        "  hold      lh-demo-001 placed on the patient of dev-00001",
        "  hold      erasing that patient: refused under the hold",
        "  erasure   the patient reassigned away from dev-00012:",
        "  export    the patient of dev-00003:",
        "  retention dry run at now + 31 days:",
        "kept by lh-demo-001, with every object",
        "  retention run at now: 0 records and 0 objects acted on",
    ] {
        assert!(stdout.contains(line), "{line:?} missing:\n{stdout}");
    }
    for (what, evidence) in [
        ("at rest: the store", "holds no reading in plaintext"),
        (
            "at rest: every telemetry object of both sinks is sealed",
            "VMQS header",
        ),
        (
            "legal hold: erasing the patient of dev-00001 under hold lh-demo-001 is refused",
            "legal hold covers this patient",
        ),
        ("erasure: the store reads the patient's", "stay readable"),
        ("erasure: the patient's", "objects no longer open (erased)"),
        (
            "erasure reaches the backup taken before it",
            "no reading in plaintext in the backup",
        ),
        ("erasure: `vitalmq trace`", "says it was erased"),
        ("export: the patient of dev-00003", "match the manifest"),
        (
            "retention (dry run at now + 31 days)",
            "kept by lh-demo-001",
        ),
        ("retention (run at now)", "nothing due, 0 acted on"),
        ("audit chains intact after the lifecycle step", "records"),
    ] {
        let line = passed(stdout, what);
        assert!(
            line.contains(evidence),
            "{what}: {evidence:?} missing in {line}"
        );
    }
    assert!(
        number_after(stdout, "retention dry run at now + 31 days:") > 0,
        "raw rows due a month on:\n{stdout}"
    );
    assert_eq!(
        number_after(stdout, "demo ok: all"),
        checks(stdout).len(),
        "every check is listed"
    );
    lifecycle_left_behind(&dir);

    // The alert paths of issue 17, each checked against the store and the audit log.
    for (what, evidence) in [
        (
            "device alarm on dev-00001",
            "alert device-alarm:arrhythmia opened (urgent) and resolved, one episode (1 alert id: open -> acknowledged -> resolved)",
        ),
        (
            "silence on dev-00002",
            "no-data alert opened with reason silent",
        ),
        ("silence on dev-00002", "no healthy device alerted"),
        (
            "acknowledgement: ops-01 published",
            "acknowledged, ack.by spiffe://demo.vitalmq/operator/ops-01; audited alert_acknowledged 1x; re-sent for want of an ack after it: 0",
        ),
        (
            "re-escalation: no-data of dev-00002",
            "re-sent escalated, reason unacknowledged, escalation_level 1",
        ),
    ] {
        let line = passed(stdout, what);
        assert!(
            line.contains(evidence),
            "{what}: {evidence:?} missing in {line}"
        );
    }
    assert!(
        stdout.contains("ACK   ops-01 acknowledged al-") && stdout.contains("PUBACK ok"),
        "{stdout}"
    );
    passed(stdout, "audit log of the broker: chain intact");
    passed(stdout, "audit log of the bridge: chain intact");

    // The alert counts are always shown; what they must be depends on the alert engine.
    number_after(stdout, "alerts seen:");
    assert_alerts_raised_for_the_scripted_episode(stdout);

    // The commands it suggests work on what it left.
    for log in [
        dir.join("broker/audit.jsonl"),
        dir.join("bridge-data/audit.jsonl"),
    ] {
        let verified = run(
            Command::new(bin()).args(["audit", "verify"]).arg(&log),
            Duration::from_secs(30),
        );
        assert!(verified.success, "{}", verified.all());
        assert!(
            verified.stdout.contains("chain intact"),
            "{}",
            verified.stdout
        );
    }
    let data = dir.join("bridge-data");
    let stats = run(
        Command::new(bin())
            .args(["store", "stats", "--data"])
            .arg(&data),
        Duration::from_secs(30),
    );
    assert!(stats.success, "{}", stats.all());
    let stats: serde_json::Value = serde_json::from_str(stats.stdout.trim()).expect("stats JSON");
    assert_eq!(stats["quarantine"]["bad_signature"], 1, "{stats}");
    assert_eq!(stats["devices"], DEVICES, "{stats}");
    assert_eq!(
        stats["sinks"]["objects"], stats["head"],
        "the object sink has everything: {stats}"
    );
    let quarantine = run(
        Command::new(bin())
            .args(["store", "quarantine", "--data"])
            .arg(&data),
        Duration::from_secs(30),
    );
    assert!(
        quarantine.stdout.contains("\"reason\":\"bad_signature\""),
        "{}",
        quarantine.all()
    );
    assert!(
        dir.join("objects")
            .read_dir()
            .expect("objects dir")
            .next()
            .is_some()
    );

    // The PKI it made is one openssl accepts.
    let verified = run(
        Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(dir.join("pki/ca/ca.pem"))
            .arg(dir.join("pki/identities/device/dev-00001.pem")),
        Duration::from_secs(30),
    );
    assert!(verified.success, "{}", verified.all());

    fhir_as_printed(stdout);
    fhir_for_every_patient(&dir);
    acknowledge_as_printed(&dir, stdout);
    break_glass_as_printed(stdout);

    // A second run into the same directory refuses rather than overwrite anything.
    let again = run(
        Command::new(bin()).args(["demo", "--dir"]).arg(&dir),
        Duration::from_secs(60),
    );
    assert!(!again.success, "re-running into a used directory must fail");
    assert!(again.stderr.contains("not empty"), "{}", again.stderr);
}

/// What the lifecycle step left, read with tools that share no code with it: the key
/// file owner-only, no plaintext telemetry object, the export's manifest verified by
/// `sha256sum -c`, the legal hold listed by `vitalmq hold list`.
fn lifecycle_left_behind(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dir.join("kek.json"))
        .expect("kek.json")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the key file is owner-only: {mode:o}");
    let mut pending = vec![dir.join("objects/normalized"), dir.join("objects/raw")];
    let mut sealed = 0;
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).expect("objects dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let bytes = std::fs::read(&path).expect("object");
            assert!(
                path.extension().is_some_and(|e| e == "vmqs") && bytes.starts_with(b"VMQS"),
                "not sealed: {}",
                path.display()
            );
            sealed += 1;
        }
    }
    assert!(sealed > 0, "no telemetry objects");
    let checked = run(
        Command::new("sha256sum")
            .args(["-c", "manifest.sha256"])
            .current_dir(dir.join("export")),
        Duration::from_secs(30),
    );
    assert!(checked.success, "{}", checked.all());
    let listed = run(
        Command::new(bin())
            .args(["hold", "list", "--holds"])
            .arg(dir.join("holds.toml")),
        Duration::from_secs(30),
    );
    assert!(
        listed.success && listed.stdout.contains("\"id\":\"lh-demo-001\""),
        "{}",
        listed.all()
    );
}

/// Runs the admin API commands of the "look around" block: `vitalmq admin serve` as
/// printed, then its `curl` with the clinician's certificate, once without the
/// break-glass header (403) and once with a reason (the device's events).
fn break_glass_as_printed(stdout: &str) {
    let serve = stdout
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("admin API    "))
        .and_then(|l| l.split("   (").next())
        .unwrap_or_else(|| panic!("no admin API command in:\n{stdout}"));
    let args: Vec<&str> = serve.split_whitespace().collect();
    assert_eq!(&args[..3], ["vitalmq", "admin", "serve"], "{serve}");
    let server = common::Spawned::start(Command::new(bin()).args(&args[1..]));
    assert!(
        server.wait_output(Duration::from_secs(30), |out| {
            common::reported_addr(out, "vitalmq admin listening on ").is_some()
        }),
        "the admin server did not start:\n{}",
        server.all()
    );
    let addr =
        common::reported_addr(&server.stderr(), "vitalmq admin listening on ").expect("address");
    // The curl command spans two printed lines ending in a backslash.
    let at = stdout.find("curl --cert ").expect("a curl command");
    let curl: String = stdout[at..]
        .lines()
        .take(2)
        .map(|l| l.trim().trim_end_matches('\\'))
        .collect::<Vec<_>>()
        .join(" ")
        .replace("<address>", &addr.to_string());
    let words = shell_words(&curl);
    let call = |break_glass: bool| {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-o", "/dev/stdout", "-w", "\n%{http_code}"]);
        let mut skip_next = false;
        for (i, w) in words.iter().enumerate().skip(1) {
            if skip_next {
                skip_next = false;
                continue;
            }
            if !break_glass && w == "-H" && words[i + 1].starts_with("X-Vitalmq-Break-Glass") {
                skip_next = true;
                continue;
            }
            cmd.arg(w.replace("<reason>", "demo test: covering site-02"));
        }
        let out = run(&mut cmd, Duration::from_secs(30));
        assert!(out.success, "{}", out.all());
        let (body, code) = out.stdout.trim().rsplit_once('\n').expect("status line");
        (code.to_owned(), body.to_owned())
    };
    let (code, body) = call(false);
    assert_eq!(
        code, "403",
        "no reason: outside the clinician's scope: {body}"
    );
    let (code, body) = call(true);
    assert_eq!(code, "200", "break-glass: {body}");
    let rows: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert!(
        rows["rows"].as_array().is_some_and(|r| !r.is_empty()),
        "the device's events: {body}"
    );
}

/// The `vitalmq fhir export` and `fhir verify` the "look around" block prints, run as
/// printed: the export writes the episode patient's Bundle, which verifies.
fn fhir_as_printed(stdout: &str) {
    let line = |prefix: &str| {
        stdout
            .lines()
            .map(|l| {
                let l = l.trim();
                l.strip_prefix("fhir").map_or(l, str::trim_start)
            })
            .find(|l| l.starts_with(prefix))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no `{prefix}` in the look-around block:\n{stdout}"))
    };
    for command in [line("vitalmq fhir export "), line("vitalmq fhir verify ")] {
        let words = shell_words(&command);
        let ran = run(
            Command::new(bin()).args(&words[1..]),
            Duration::from_secs(30),
        );
        assert!(ran.success, "{command}\n{}", ran.all());
    }
}

/// Every refusal-free path of the demo as FHIR: each patient the demo's registry ever
/// assigned a device to, exported from the store the demo left; every Bundle parses
/// under the independent validator (fhir.resources, R4 StructureDefinitions) with
/// zero errors and its signatures re-verify with `vitalmq fhir verify`. The only
/// export refused is the erased patient's. Together the Bundles hold the demo's alert
/// paths (a device alarm, the silent device's `no-data`, acknowledged and escalated
/// changes) as DetectedIssue and Communication.
fn fhir_for_every_patient(dir: &std::path::Path) {
    let registry = vitalmq_policies::DeviceRegistry::load(&dir.join("pki/registry.toml"))
        .expect("the demo's registry");
    let mut patients = std::collections::BTreeSet::new();
    for device in registry.devices() {
        let history = registry.history(&device.id).expect("history");
        for a in history.periods() {
            if let vitalmq_policies::Use::Assigned { patient_ref, .. } = &a.serves {
                patients.insert(patient_ref.clone());
            }
        }
    }
    let started = std::time::Instant::now();
    let out = dir.join("fhir-every-patient");
    std::fs::create_dir(&out).expect("fhir dir");
    let (mut bundles, mut refused) = (Vec::new(), Vec::new());
    for patient in &patients {
        let bundle = out.join(format!("{patient}.json"));
        let ran = run(
            Command::new(bin())
                .args(["fhir", "export", "--config"])
                .arg(dir.join("bridge.toml"))
                .args(["--patient", patient, "--out"])
                .arg(&bundle),
            Duration::from_secs(30),
        );
        if ran.code == Some(1) && ran.stderr.contains("erased") {
            refused.push(patient.clone());
            continue;
        }
        assert!(ran.success, "{patient}: {}", ran.all());
        bundles.push(bundle);
    }
    assert_eq!(refused.len(), 1, "only the erased patient: {refused:?}");
    assert!(
        bundles.len() >= DEVICES as usize,
        "{} Bundles of {} patients",
        bundles.len(),
        patients.len()
    );

    let mut validate = Command::new("python3");
    validate
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/py/fhir_validate.py"
        ))
        .args(&bundles);
    let ran = run(&mut validate, Duration::from_secs(60));
    assert!(
        !ran.stderr.contains("ModuleNotFoundError"),
        "install the peers: python3 -m pip install 'fhir.resources==8.*'\n{}",
        ran.stderr
    );
    assert!(ran.success, "fhir_validate.py: {}", ran.all());
    let summary: serde_json::Value = serde_json::from_str(ran.stdout.trim()).expect("summary");
    assert_eq!(summary["errors"], serde_json::json!([]), "{summary}");

    let (mut rules, mut changes) = (std::collections::BTreeSet::new(), Vec::new());
    for bundle in &bundles {
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(bundle).expect("bundle")).expect("json");
        let entries = doc["entry"].as_array().expect("entries");
        let of = |t: &'static str| {
            entries
                .iter()
                .filter(move |e| e["resource"]["resourceType"] == t)
                .map(|e| &e["resource"])
        };
        for d in of("DetectedIssue") {
            rules.insert(d["code"]["text"].as_str().expect("rule").to_owned());
        }
        for c in of("Communication") {
            changes.push(
                c["identifier"][0]["value"]
                    .as_str()
                    .expect("key")
                    .to_owned(),
            );
        }
        if of("Observation").next().is_none() {
            continue; // verify wants at least one signed reading
        }
        let ran = run(
            Command::new(bin())
                .args(["fhir", "verify"])
                .arg(bundle)
                .arg("--registry")
                .arg(dir.join("pki/registry.toml")),
            Duration::from_secs(30),
        );
        assert!(ran.success, "{}: {}", bundle.display(), ran.all());
    }
    eprintln!(
        "fhir: {} Bundles in {:?}, {summary}; rules {rules:?}; {} alert changes; refused {refused:?}",
        bundles.len(),
        started.elapsed(),
        changes.len()
    );
    // The desaturation episode, the device alarm, the silent device.
    for rule in ["spo2-low", "device-alarm:arrhythmia", "no-data"] {
        assert!(rules.contains(rule), "{rule}: {rules:?}");
    }
    for state in ["open", "acknowledged", "escalated", "resolved"] {
        assert!(
            changes.iter().any(|k| k.contains(&format!("/{state}/"))),
            "{state}: {changes:?}"
        );
    }
}

/// Splits a printed command line into words (single quotes group, as a shell would).
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '\'' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// Runs the `mosquitto_pub` of the "look around" block against the demo's broker and
/// bridge, started again from the configurations the demo wrote (the broker on a new
/// port, which replaces the demo's in the bridge config and in the command): the
/// bridge must re-send the alert it names `acknowledged` by the demo's operator.
fn acknowledge_as_printed(dir: &std::path::Path, stdout: &str) {
    let command = stdout
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("acknowledge  "))
        .unwrap_or_else(|| panic!("no acknowledge command in:\n{stdout}"))
        .trim();
    assert!(command.starts_with("mosquitto_pub "), "{command}");
    let alert_id = command
        .split("\"alert_id\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no alert id in {command}"))
        .to_owned();
    assert!(alert_id.starts_with("al-"), "a real alert id: {command}");
    let old_port = number_after(command, " -p ");

    let broker_toml = std::fs::read_to_string(dir.join("broker.toml")).expect("broker.toml");
    let template = broker_toml.replace("listen = \"127.0.0.1:0\"", "listen = \"{listen}\"");
    assert_ne!(template, broker_toml, "the demo's broker listens on port 0");
    let broker = BrokerProcess::start(bin(), dir, &template, Duration::from_secs(30));
    let bridge_toml = std::fs::read_to_string(dir.join("bridge.toml")).expect("bridge.toml");
    let old_address = format!("127.0.0.1:{old_port}");
    assert!(bridge_toml.contains(&old_address), "{bridge_toml}");
    let bridge_config = bridge_toml.replace(&old_address, &format!("127.0.0.1:{}", broker.port));
    let _bridge = BridgeProcess::start(bin(), dir, &bridge_config, Duration::from_secs(30));

    let command = command.replace(
        &format!(" -p {old_port} "),
        &format!(" -p {} ", broker.port),
    );
    let published = run(
        Command::new("sh").args(["-c", &format!("{command} -d")]),
        Duration::from_secs(20),
    );
    assert!(published.success, "{command}\n{}", published.all());
    assert!(
        published.all().contains("PUBACK") && !published.all().contains("failed"),
        "the broker took the ack: {}",
        published.all()
    );

    let by = "spiffe://demo.vitalmq/operator/ops-01";
    let data = dir.join("bridge-data");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        // Alert bodies are sealed at rest: `trace` opens them with the demo's key file.
        let traced = run(
            Command::new(bin())
                .args(["trace", &alert_id, "--json", "--data"])
                .arg(&data)
                .arg("--key-file")
                .arg(dir.join("kek.json")),
            Duration::from_secs(20),
        );
        assert!(traced.success, "{}", traced.all());
        let trace: serde_json::Value =
            serde_json::from_str(traced.stdout.trim()).expect("trace JSON");
        let acked = trace["changes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["state"] == "acknowledged" && c["ack"]["by"] == by);
        if acked {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the bridge never re-sent {alert_id} acknowledged by {by} (broker:\n{})",
            broker.process.all()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}
