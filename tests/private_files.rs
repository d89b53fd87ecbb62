//! Patient data is readable by its owner only (issue 15, item 5): every directory and
//! file the broker and bridge write is owner-only, another local user (`nobody`) can
//! read none of it, and a data root that others can read is refused at start (or only
//! warned about, and audited, when the operator's policy says so).

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{BridgeProcess, Rig, run, sim_summary_all_receipted};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_vitalmq"))
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// `root` and everything below it.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut all = vec![root.to_path_buf()];
    let mut i = 0;
    while i < all.len() {
        if all[i].is_dir() {
            let mut children: Vec<PathBuf> = std::fs::read_dir(&all[i])
                .expect("read_dir")
                .map(|e| e.expect("entry").path())
                .collect();
            children.sort();
            all.extend(children);
        }
        i += 1;
    }
    all
}

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("id -u");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// `cat path` as the user `nobody`; its output.
fn cat_as_nobody(path: &Path) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", "nobody", "--", "cat"])
        .arg(path)
        .output()
        .expect("runuser")
}

fn objects_sink(path: &Path) -> String {
    format!(
        "[[sinks]]\nkind = \"objects\"\nname = \"objects\"\npath = \"{}\"\nbatch_max_events = 5\nbatch_max_age_ms = 100\n",
        path.display()
    )
}

#[test]
fn everything_broker_and_bridge_write_is_owner_only_and_unreadable_by_another_user() {
    let rig = Rig::start(bin(), "private-files", 2, |_| {});
    let objects = rig.dir().join("objects");
    let bridge = rig.bridge("", &objects_sink(&objects));
    let mut sim = rig.sim(2, 10);
    sim_summary_all_receipted(&mut sim);
    rig.wait_stats(Duration::from_secs(60), "20 events stored", |st| {
        st["events"].as_u64() >= Some(20)
    });
    // Wait for the objects sink to have written patient data (the NDJSON objects).
    let deadline = Instant::now() + Duration::from_secs(60);
    let object_file = loop {
        if let Some(f) = walk(&objects)
            .into_iter()
            .find(|p| p.extension().is_some_and(|e| e == "ndjson"))
        {
            break f;
        }
        assert!(
            Instant::now() < deadline,
            "no object written under {objects:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };

    // While both run: nothing grants group or others
    // any access, in the bridge's data directory (store, audit log, its key), the
    // objects, or the broker's audit log and key.
    let broker_audit = rig.dir().join("broker-audit.jsonl");
    let mut written = walk(&rig.data());
    written.extend(walk(&objects));
    written.push(broker_audit.clone());
    let broker_key = rig.dir().join("audit-signing.key.pem");
    written.push(broker_key.clone());
    let store = rig.data().join("bridge.sqlite3");
    for must in [
        &store,
        &rig.data().join("audit.jsonl"),
        &object_file,
        &broker_key,
    ] {
        assert!(must.exists(), "{must:?} not written");
    }
    let exposed: Vec<String> = written
        .iter()
        .filter(|p| p.exists() && mode(p) & 0o077 != 0)
        .map(|p| format!("{} {:04o}", p.display(), mode(p)))
        .collect();
    assert!(exposed.is_empty(), "readable by others: {exposed:#?}");

    // Another local user, with every directory above the data traversable (as /var/lib
    // is), reads none of it, while a file the test wrote itself (0644) it does read.
    if is_root() {
        chmod(rig.dir(), 0o755);
        let shared = rig.dir().join("acl.toml");
        assert!(
            mode(&shared) & 0o004 != 0,
            "the control file is world-readable"
        );
        let control = cat_as_nobody(&shared);
        assert!(
            control.status.success(),
            "nobody cannot read even a world-readable file here: {control:?}"
        );
        for private in [
            &store,
            &object_file,
            &broker_audit,
            &rig.data().join("audit.jsonl"),
        ] {
            let out = cat_as_nobody(private);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && err.contains("Permission denied"),
                "nobody read {private:?}: {out:?}"
            );
        }
        chmod(rig.dir(), 0o700);
    } else {
        eprintln!("not root: the second-user read was not tried (modes were checked)");
    }
    drop(bridge);
}

#[test]
fn a_data_root_others_can_read_is_refused_at_start_or_run_with_a_warning_that_is_audited() {
    let rig = Rig::start(bin(), "private-refuse", 1, |_| {});
    let data = rig.data();
    std::fs::create_dir(&data).expect("mkdir");
    chmod(&data, 0o755);
    let config = BridgeProcess::config(rig.broker.port, "");
    std::fs::write(rig.dir().join("bridge.toml"), &config).expect("write config");
    let refused = run(
        Command::new(bin())
            .env("NO_COLOR", "1")
            .args(["bridge", "--config"])
            .arg(rig.dir().join("bridge.toml")),
        Duration::from_secs(30),
    );
    assert!(
        !refused.success,
        "the bridge started on a 0755 data directory"
    );
    assert!(
        refused.all().contains("readable by other local users") && refused.all().contains("0755"),
        "{}",
        refused.all()
    );
    assert!(
        !data.join("bridge.sqlite3").exists(),
        "the store was opened before the check"
    );

    // The operator's explicit choice: run anyway, warned and audited.
    let bridge = BridgeProcess::start(
        bin(),
        rig.dir(),
        &format!("private_files = \"warn\"\n{config}"),
        Duration::from_secs(30),
    );
    assert!(
        bridge
            .process
            .all()
            .contains("readable by other local users")
    );
    let audit = std::fs::read_to_string(data.join("audit.jsonl")).expect("audit log");
    let started = audit
        .lines()
        .find(|l| l.contains("\"component_started\""))
        .expect("component_started record");
    let record: serde_json::Value = serde_json::from_str(started).expect("json");
    let exposed = record["details"]["exposed_paths"].to_string();
    assert!(exposed.contains("bridge-data is 0755"), "{record}");
    drop(bridge);

    // The broker too: an audit log others can read (in a shared log directory).
    let audit_dir = rig.dir().join("shared-audit");
    std::fs::create_dir(&audit_dir).expect("mkdir");
    chmod(&audit_dir, 0o755);
    std::fs::write(audit_dir.join("broker.jsonl"), "").expect("write");
    chmod(&audit_dir.join("broker.jsonl"), 0o644);
    let broker_toml = common::broker_config(common::TRUST_DOMAIN)
        .replace("{listen}", "127.0.0.1:0")
        .replace(
            "path = \"broker-audit.jsonl\"",
            "path = \"shared-audit/broker.jsonl\"",
        );
    std::fs::write(rig.dir().join("broker2.toml"), &broker_toml).expect("write");
    let refused = run(
        Command::new(bin())
            .env("NO_COLOR", "1")
            .args(["broker", "--config"])
            .arg(rig.dir().join("broker2.toml")),
        Duration::from_secs(30),
    );
    assert!(!refused.success, "the broker started: {}", refused.all());
    assert!(
        refused.all().contains("shared-audit/broker.jsonl is 0644"),
        "{}",
        refused.all()
    );
    assert_eq!(
        std::fs::read(audit_dir.join("broker.jsonl")).expect("read"),
        b"",
        "the broker wrote to its log before the check"
    );
}
