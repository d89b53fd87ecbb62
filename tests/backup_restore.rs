//! Backup under traffic and an exactly-once resume (issue 20, point 6): devices publish
//! signed messages through the real broker into the real bridge while
//! `vitalmq store backup` copies its store; the store is restored into a new directory,
//! a bridge starts on it, and the devices resend everything they made. Afterwards the
//! stored set is what the devices made, each message once: the messages in the backup
//! were counted as duplicates (the windows travelled with the store), the ones stored
//! after the backup point were accepted again.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use common::{BridgeProcess, Rig, store_rows, vitalmq_ok, wait_until};
use serde_json::Value as Json;

const DEVICES: [&str; 2] = ["dev-00001", "dev-00002"];
const EPOCH: u64 = 7;
/// Messages per device, seq 1..=N (within the default window of 64, so a resend of
/// any of them is recognised).
const N: u64 = 24;
/// Published before the backup starts, and the first seq published after it finished.
const BEFORE: u64 = 8;
const AFTER: u64 = 19;
const EVENTUALLY: Duration = Duration::from_secs(60);

fn publish(
    rig: &Rig,
    signed: &BTreeMap<(&str, u64), Vec<u8>>,
    seqs: std::ops::RangeInclusive<u64>,
) {
    for seq in seqs {
        for device in DEVICES {
            rig.mosquitto_pub(
                "device",
                device,
                &format!("devices/{device}/telemetry"),
                &signed[&(device, seq)],
            );
        }
    }
}

fn stats(rig: &Rig, data: &Path) -> Json {
    store_rows(&rig.bin, "stats", data).remove(0)
}

fn events(st: &Json) -> u64 {
    st["events"].as_u64().expect("events")
}

fn duplicates(st: &Json) -> u64 {
    st["counters"]["duplicate"].as_u64().unwrap_or(0)
}

/// The stored events of `data` as (device, seq) -> event id; panics on a second copy.
fn stored(rig: &Rig, data: &Path) -> BTreeMap<(String, u64), String> {
    let mut out = BTreeMap::new();
    for e in store_rows(&rig.bin, "events", data) {
        assert_eq!(e["epoch"].as_u64(), Some(EPOCH), "{e}");
        let key = (
            e["device"].as_str().expect("device").to_owned(),
            e["seq"].as_u64().expect("seq"),
        );
        let id = e["event_id"].as_str().expect("event_id").to_owned();
        assert!(out.insert(key, id).is_none(), "stored twice: {e}");
    }
    out
}

/// The bridges' `[encryption]`: the keyring beside the data directory, not in it.
const ENCRYPTION: &str = "[encryption]\nkey_file = \"kek.json\"\nkeyring = \"keyring.sqlite3\"\n";

#[test]
fn a_restored_store_resumes_exactly_once_from_the_devices_resends() {
    let rig = Rig::start(vitalmq_bin!(), "backup-restore", 2, |_| {});
    // Encryption at rest on, with the keyring outside the data directory: a backup
    // holds ciphertext only, and the restored store is read with the same keyring.
    let key_file = rig.dir().join("kek.json");
    vitalmq_ok(
        &rig.bin,
        &[
            "keys",
            "init",
            "--key-file",
            key_file.to_str().expect("utf-8"),
        ],
    );
    let mut bridge = rig.bridge("", ENCRYPTION);
    // What the devices make, signed up front: they resend these bytes later.
    let mut signed = BTreeMap::new();
    for device in DEVICES {
        for seq in 1..=N {
            signed.insert((device, seq), rig.signed(device, EPOCH, seq));
        }
    }
    let all = u64::try_from(DEVICES.len()).expect("small") * N;
    publish(&rig, &signed, 1..=BEFORE);
    let first = 2 * BEFORE;
    rig.wait_stats(EVENTUALLY, "the first part stored", |st| {
        events(st) == first
    });

    // The backup runs while the devices keep publishing: it starts once the stream
    // has moved past the first part.
    let backup = rig.dir().join("backup");
    let manifest: Json = std::thread::scope(|s| {
        let publisher = s.spawn(|| publish(&rig, &signed, BEFORE + 1..=AFTER - 1));
        rig.wait_stats(EVENTUALLY, "the stream under way", |st| events(st) > first);
        let ran = vitalmq_ok(
            &rig.bin,
            &[
                "store",
                "backup",
                "--data",
                rig.data().to_str().expect("utf-8"),
                "--to",
                backup.to_str().expect("utf-8"),
            ],
        );
        publisher.join().expect("publisher");
        serde_json::from_str(ran.stdout.trim()).expect("backup summary")
    });
    // The rest is published after the backup finished: stored only in the live store.
    publish(&rig, &signed, AFTER..=N);
    rig.wait_stats(EVENTUALLY, "every message stored", |st| events(st) == all);
    let live = stored(&rig, &rig.data());
    let in_backup = manifest["counts"]["events"].as_u64().expect("events");
    assert!(
        in_backup > first && in_backup < all,
        "the backup point lies inside the stream: {manifest}"
    );
    assert_eq!(manifest["format"], "vitalmq-backup/v1");
    assert!(
        manifest["keyring"]
            .as_str()
            .is_some_and(|k| k.contains("not included")),
        "{manifest}"
    );
    bridge.process.signal("TERM");
    bridge.process.finish(Duration::from_secs(30));

    // Restore into a new directory; the operator log of the backup records it. Not
    // beside an unknown keyring: without one, or with a fresh one, it is refused before
    // anything is written.
    let restored = rig.dir().join("restored-data");
    let restore = |keyring: Option<&str>| {
        let mut args = vec![
            "store".to_owned(),
            "restore".to_owned(),
            "--from".to_owned(),
            backup.to_str().expect("utf-8").to_owned(),
            "--data".to_owned(),
            restored.to_str().expect("utf-8").to_owned(),
        ];
        if let Some(k) = keyring {
            args.extend([
                "--keyring".to_owned(),
                rig.dir().join(k).to_str().expect("utf-8").to_owned(),
                "--key-file".to_owned(),
                key_file.to_str().expect("utf-8").to_owned(),
            ]);
        }
        common::run(
            std::process::Command::new(&rig.bin).args(&args),
            Duration::from_secs(30),
        )
    };
    let refused = restore(None);
    assert!(
        !refused.success && refused.all().contains("holds sealed payloads"),
        "{}",
        refused.all()
    );
    let refused = restore(Some("fresh-keyring.sqlite3"));
    assert!(
        !refused.success && refused.all().contains("not the keyring of this store"),
        "{}",
        refused.all()
    );
    assert!(!restored.exists(), "a refused restore writes nothing");
    let ran = restore(Some("keyring.sqlite3"));
    assert!(ran.success, "{}", ran.all());
    let report: Json = serde_json::from_str(ran.stdout.trim()).expect("restore summary");
    assert_eq!(report["keyring_coverage"]["missing"], 0, "{report}");
    assert!(
        report["keyring_coverage"]["sealed_rows"].as_u64() > Some(0),
        "{report}"
    );
    assert_eq!(report["sha256"], manifest["sha256"]);
    assert_eq!(report["counts"], manifest["counts"]);
    let audit = common::audit_records(&backup.join("operator-audit/operator.jsonl"));
    assert!(
        audit.iter().any(|r| r.to_string().contains("store.restore")
            && r.to_string().contains("succeeded")
            && r.to_string()
                .contains(manifest["sha256"].as_str().expect("sha"))),
        "{audit:?}"
    );
    let backed_up = stored(&rig, &restored);
    assert_eq!(backed_up.len() as u64, in_backup);
    for (key, id) in &backed_up {
        assert_eq!(
            live.get(key),
            Some(id),
            "the backup holds what the store held"
        );
    }
    let before = stats(&rig, &restored);

    // A bridge on the restored store beside a fresh keyring refuses to start.
    let foreign = BridgeProcess::config(
        rig.broker.port,
        &ENCRYPTION.replace("keyring.sqlite3", "fresh-keyring-2.sqlite3"),
    )
    .replace("data_dir = \"bridge-data\"", "data_dir = \"restored-data\"");
    let foreign_path = rig.dir().join("bridge-foreign.toml");
    std::fs::write(&foreign_path, foreign).expect("config");
    let refused = common::run(
        std::process::Command::new(&rig.bin)
            .arg("bridge")
            .arg("--config")
            .arg(&foreign_path),
        Duration::from_secs(30),
    );
    assert!(
        !refused.success && refused.all().contains("not this store's keyring"),
        "{}",
        refused.all()
    );

    // A bridge on the restored store; the devices resend everything they made.
    let config = BridgeProcess::config(rig.broker.port, ENCRYPTION)
        .replace("data_dir = \"bridge-data\"", "data_dir = \"restored-data\"");
    let _resumed = BridgeProcess::start(&rig.bin, rig.dir(), &config, Duration::from_secs(30));
    publish(&rig, &signed, 1..=N);
    let mut after = Json::Null;
    wait_until(EVENTUALLY, "every resend recorded", || {
        after = stats(&rig, &restored);
        events(&after) == all && duplicates(&after) - duplicates(&before) >= in_backup
    });
    assert_eq!(
        duplicates(&after) - duplicates(&before),
        in_backup,
        "each message in the backup was a duplicate, not a second event"
    );
    assert_eq!(
        events(&after) - events(&before),
        all - in_backup,
        "each message after the backup point was accepted again"
    );
    let resumed = stored(&rig, &restored);
    let made: BTreeSet<(String, u64)> = DEVICES
        .iter()
        .flat_map(|d| (1..=N).map(move |s| ((*d).to_owned(), s)))
        .collect();
    assert_eq!(
        resumed.keys().cloned().collect::<BTreeSet<_>>(),
        made,
        "stored set = what the devices made, once each"
    );
    for (key, id) in &backed_up {
        assert_eq!(
            resumed.get(key),
            Some(id),
            "events in the backup kept their ids"
        );
    }
    let quarantine = store_rows(&rig.bin, "quarantine", &restored);
    assert!(quarantine.is_empty(), "nothing refused: {quarantine:?}");
}
