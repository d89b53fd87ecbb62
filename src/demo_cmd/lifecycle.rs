//! The demo's data lifecycle step (issue 20), once the bridge has stopped: encryption at
//! rest (no plaintext reading in the store, its WAL or any telemetry object), a backup,
//! a legal hold that refuses an erasure, the erasure by crypto-shredding of the patient
//! reassigned away from [`REASSIGNED_DEVICE`] (in the store, in the objects and in the
//! backup taken before it, with every audit chain intact), an export of another
//! patient, and two retention runs: a dry one 31 days ahead (raw rows due, the held
//! patient's rows kept) and a real one now (nothing due, audited).
//!
//! Every action goes through the function its command runs (`vitalmq store backup`,
//! `hold place`, `erase`, `export`, `retention run`), so each is audited as the
//! operator's would be. Nothing here prints a patient reference or a measured value.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use serde_json::Value;
use vitalmq_bridge::sink::object::sealed as object_sealed;
use vitalmq_bridge::store::Store;
use vitalmq_keyring::{KeyError, Keyring};
use vitalmq_policies::{DeviceRegistry, Use};

use super::governance::{REASSIGNED_DEVICE, RESEARCH_DIR, walkdir};
use super::report::Check;
use super::setup::{self, WorkDir};
use crate::{backup_cmd, erase_cmd, export_cmd, hold_cmd, registry_cmd, retention_cmd};

/// The id of the hold the demo places.
pub const HOLD_ID: &str = "lh-demo-001";
/// The device whose patient is put under the hold: the one with the scripted episode.
pub const HELD_DEVICE: &str = setup::EPISODE_DEVICE;
/// The device whose patient is exported.
pub const EXPORTED_DEVICE: &str = "dev-00003";
/// Plaintext a sealed payload never shows: JSON keys of measurements with their value
/// following (`"m":{"pulse":79,...,"spo2":97}`); the metric's name alone is no reading
/// (the alert engine's state names the metric a rule watches).
const READINGS: [&[u8]; 2] = [b"\"spo2\":", b"\"pulse\":"];
const DAY_MS: u64 = 86_400_000;

/// Where the step writes, in the work directory.
fn backup_dir(work: &WorkDir) -> PathBuf {
    work.root.join("backup")
}
fn restored_dir(work: &WorkDir) -> PathBuf {
    work.root.join("restored-backup")
}
fn export_dir(work: &WorkDir) -> PathBuf {
    work.root.join("export")
}

/// The keyring of the demo's bridge, with the work directory's key file.
pub fn open_keyring(work: &WorkDir) -> anyhow::Result<Arc<Keyring>> {
    let kek = vitalmq_keyring::LocalKeyFile::load(&work.key_file())?;
    let keyring = Keyring::open(&work.keyring(), Arc::new(kek))
        .with_context(|| format!("keyring {}", work.keyring().display()))?;
    Ok(Arc::new(keyring))
}

/// The demo's store, opened with its keyring.
pub fn open_store(work: &WorkDir, keyring: &Arc<Keyring>) -> anyhow::Result<Store> {
    Ok(Store::open(&work.bridge_data())?.with_keyring(Arc::clone(keyring)))
}

/// The wall clock, in milliseconds since the Unix epoch.
pub fn wall_now() -> u64 {
    vitalmq_bridge::lifecycle::wall_clock()
}

/// Runs the step, printing what it does; returns its checks. `erased` is the patient
/// to erase (the one reassigned away from [`REASSIGNED_DEVICE`]), if the reassignment
/// happened; `device_now` what the devices' clocks read (assignments are on it).
/// Blocking (the retention run has its own runtime).
pub fn step(
    work: &WorkDir,
    erased: Option<&str>,
    now: u64,
    device_now: u64,
) -> anyhow::Result<Vec<Check>> {
    println!("\nlifecycle: encryption at rest, backup, legal hold, erasure, export, retention");
    let keyring = open_keyring(work)?;
    let mut checks = at_rest(work, &keyring)?;

    let registry = DeviceRegistry::load(&work.registry())?;
    let held = patient_of(&registry, HELD_DEVICE, now)?;
    let exported = patient_of(&registry, EXPORTED_DEVICE, now)?;

    let manifest = backup_cmd::backup_audited(&work.bridge_data(), &backup_dir(work))?;
    println!(
        "  backup    {} ({} events, {} bytes, SHA-256 {}..., audited store.backup)",
        backup_dir(work).display(),
        manifest.counts.events,
        manifest.bytes,
        &manifest.sha256[..12]
    );

    checks.push(hold_refuses_erasure(work, &held, device_now)?);

    match erased {
        Some(patient) => checks.extend(erasure(work, &keyring, patient, device_now)?),
        None => checks.push(Check::skipped(
            "erasure (the reassignment was not made: stopped before it was due)",
        )),
    }
    checks.push(export(work, &keyring, &exported)?);
    // The erasure keeps the rows (their ciphertext): the backup's count is still the
    // store's.
    let raw_total = manifest.counts.raw_messages;
    checks.extend(retention(work, &keyring, &held, raw_total, now)?);
    checks.push(audit_chains(work));
    Ok(checks)
}

/// The patient `device` serves at `now` (device time of the registry).
fn patient_of(registry: &DeviceRegistry, device: &str, now: u64) -> anyhow::Result<String> {
    let id = vitalmq_envelope::DeviceId::new(device)?;
    match registry.assignment_at(&id, now).map(|a| &a.serves) {
        Some(Use::Assigned { patient_ref, .. }) => Ok(patient_ref.to_string()),
        _ => anyhow::bail!("{device} is not assigned to a patient"),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn has_reading(bytes: &[u8]) -> bool {
    READINGS.iter().any(|r| contains(bytes, r))
}

/// The telemetry objects (`raw/`, `normalized/`) of both objects sinks; the shipped
/// audit segments stay plain by design (hashes and ids only).
fn telemetry_objects(work: &WorkDir) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for sink in [work.objects(), work.root.join(RESEARCH_DIR)] {
        for kind in ["raw", "normalized"] {
            let dir = sink.join(kind);
            if dir.exists() {
                files.extend(walkdir(&dir)?);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Encryption at rest: the store file and its WAL hold no reading in plaintext, the
/// store does hold events (so the search means something), and every telemetry object
/// is sealed (`.vmqs`, `VMQS` header) and opens with the keyring to records that do
/// name readings.
fn at_rest(work: &WorkDir, keyring: &Keyring) -> anyhow::Result<Vec<Check>> {
    let db = work.bridge_data().join(vitalmq_bridge::store::DB_FILE);
    let mut scanned = 0usize;
    let mut plain_in = Vec::new();
    for file in [db.clone(), PathBuf::from(format!("{}-wal", db.display()))] {
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        scanned += bytes.len();
        if has_reading(&bytes) {
            plain_in.push(file.display().to_string());
        }
    }
    let events = Store::open(&work.bridge_data())?.stats()?.events;
    println!(
        "  at rest   store and WAL: {scanned} bytes searched for \"spo2\": and \"pulse\": {}",
        if plain_in.is_empty() { "none" } else { "FOUND" }
    );
    let store_check = Check::new(
        plain_in.is_empty() && events > 0 && scanned > 0,
        format!(
            "at rest: the store ({events} events, {scanned} bytes with its WAL) holds no reading in plaintext{}",
            if plain_in.is_empty() {
                String::new()
            } else {
                format!(" (found in {})", plain_in.join(", "))
            }
        ),
    );

    let (mut sealed, mut opened, mut bad) = (0usize, 0usize, Vec::new());
    for file in telemetry_objects(work)? {
        let name = file.display().to_string();
        let bytes = std::fs::read(&file).with_context(|| format!("reading {name}"))?;
        let ok = name.ends_with(&format!(".{}", object_sealed::SEALED_EXTENSION))
            && vitalmq_keyring::is_sealed(&bytes)
            && !has_reading(&bytes);
        if !ok {
            bad.push(name);
            continue;
        }
        sealed += 1;
        // Opened, the same bytes are records with readings: the seal hides them.
        if let Ok(plain) = object_sealed::open(keyring, &name, &bytes)
            && (name.contains(".cborseq.") || has_reading(&plain))
        {
            opened += 1;
        }
    }
    println!(
        "  at rest   objects: {sealed} telemetry objects sealed (VMQS), {opened} open with the keyring"
    );
    let objects_check = Check::new(
        sealed > 0 && bad.is_empty() && opened == sealed,
        format!(
            "at rest: every telemetry object of both sinks is sealed ({sealed} .vmqs, VMQS header, no reading in plaintext; {opened} open with the keyring){}",
            bad.first()
                .map(|b| format!(" (not sealed: {b} and {} more)", bad.len() - 1))
                .unwrap_or_default()
        ),
    );
    Ok(vec![store_check, objects_check])
}

/// Places the hold on `held` and checks that erasing them is refused.
fn hold_refuses_erasure(work: &WorkDir, held: &str, device_now: u64) -> anyhow::Result<Check> {
    hold_cmd::apply(
        &work.holds(),
        &hold_cmd::Change::Place(hold_cmd::Place {
            id: HOLD_ID.to_owned(),
            reason: "demo: claim about the scripted episode".to_owned(),
            patient_ref: Some(held.to_owned()),
            device: None,
            from: None,
            to: None,
        }),
        &registry_cmd::Actor::default(),
    )?;
    println!(
        "  hold      {HOLD_ID} placed on the patient of {HELD_DEVICE} ({}, audited hold.place)",
        work.holds().display()
    );
    let refused = erase_cmd::erase(&erase_request(work, held, device_now));
    let text = match &refused {
        Ok(_) => "erased (not refused!)".to_owned(),
        Err(e) => format!("{e:#}"),
    };
    let ok = refused.is_err() && text.contains(&format!("legal hold {HOLD_ID}"));
    println!(
        "  hold      erasing that patient: {}",
        if ok { "refused under the hold" } else { &text }
    );
    Ok(Check::new(
        ok,
        format!(
            "legal hold: erasing the patient of {HELD_DEVICE} under hold {HOLD_ID} is refused{}",
            if ok {
                " (legal hold covers this patient)".to_owned()
            } else {
                format!(": {text}")
            }
        ),
    ))
}

/// An erasure request for `patient` as the demo's operator, its open-assignment check
/// made at `device_now`: the devices' clocks (and the assignments set on them) run
/// `--time-scale` times faster than the wall clock, so the end of the erased patient's
/// assignment (the reassignment, in device time) is still in the wall clock's future.
fn erase_request(work: &WorkDir, patient: &str, device_now: u64) -> erase_cmd::Request {
    erase_cmd::Request {
        patient_ref: patient.to_owned(),
        reason: "demo: the patient asked for erasure (GDPR art. 17)".to_owned(),
        data: work.bridge_data(),
        registry: Some(work.registry()),
        holds: Some(work.holds()),
        key_file: Some(work.key_file()),
        keyring: None,
        by: "vitalmq-demo".to_owned(),
        encrypted_at_rest: true,
        scrub_plaintext_only: false,
        now_ms: Some(device_now),
    }
}

/// Event rows of `store`, by whether they read as erased.
fn erased_events(store: &Store) -> anyhow::Result<(Vec<String>, usize)> {
    let rows = store.list_events()?;
    let erased: Vec<String> = rows
        .iter()
        .filter(|r| r.marks.erased)
        .map(|r| r.head.event_id.to_string())
        .collect();
    let others = rows.len() - erased.len();
    Ok((erased, others))
}

/// Erases `patient` and checks the store, the objects, the backup taken before and
/// the trace of one of their events.
fn erasure(
    work: &WorkDir,
    keyring: &Arc<Keyring>,
    patient: &str,
    device_now: u64,
) -> anyhow::Result<Vec<Check>> {
    let store = open_store(work, keyring)?;
    let (rows_before, _, _) = store.patient_rows(patient)?;
    drop(store);
    let report = erase_cmd::erase(&erase_request(work, patient, device_now))?;
    println!(
        "  erasure   the patient reassigned away from {REASSIGNED_DEVICE}: {} data keys destroyed, {} events unreadable (audited erase)",
        report.keys_destroyed, report.unreadable_rows.events
    );
    let mut checks = Vec::new();

    let store = open_store(work, keyring)?;
    let (erased, others) = erased_events(&store)?;
    checks.push(Check::new(
        rows_before > 0 && erased.len() as u64 == rows_before && others > 0,
        format!(
            "erasure: the store reads the patient's {rows_before} events as erased ({} erased rows), the other {others} stay readable",
            erased.len()
        ),
    ));

    // Objects: the patient's no longer open, everyone else's still do.
    let (mut gone, mut still, mut wrong) = (0usize, 0usize, 0usize);
    for file in telemetry_objects(work)? {
        let name = file.display().to_string();
        let bytes = std::fs::read(&file).with_context(|| format!("reading {name}"))?;
        let theirs = object_sealed::header(&bytes).is_ok_and(|h| h.subject.as_str() == patient);
        match (theirs, object_sealed::open(keyring, &name, &bytes)) {
            (true, Err(object_sealed::OpenError::Key(KeyError::Erased { .. }))) => gone += 1,
            (false, Ok(_)) => still += 1,
            _ => wrong += 1,
        }
    }
    println!("  erasure   objects: {gone} of the patient's no longer open, {still} others do");
    checks.push(Check::new(
        gone > 0 && still > 0 && wrong == 0,
        format!(
            "erasure: the patient's {gone} objects no longer open (erased), the other {still} still do ({wrong} otherwise)"
        ),
    ));

    // The backup taken before: restored into a new directory, the same rows are there
    // and read as erased, through the same keyring.
    let restored = restored_dir(work);
    let (keyring_file, key_file) = (work.keyring(), work.key_file());
    backup_cmd::restore_audited(
        &backup_dir(work),
        &restored,
        Some(backup_cmd::RestoreKeys {
            keyring: &keyring_file,
            key_file: &key_file,
        }),
    )?;
    let copy = Store::open(&restored)?.with_keyring(Arc::clone(keyring));
    let (copy_rows, _, _) = copy.patient_rows(patient)?;
    let (copy_erased, copy_others) = erased_events(&copy)?;
    let backup_plain = std::fs::read(backup_dir(work).join(vitalmq_bridge::store::DB_FILE))
        .map(|b| has_reading(&b))
        .unwrap_or(true);
    println!(
        "  erasure   the backup taken before, restored into {}: the patient's {copy_rows} events read as erased",
        restored.display()
    );
    checks.push(Check::new(
        copy_rows > 0
            && copy_erased.len() as u64 == copy_rows
            && copy_others > 0
            && !backup_plain,
        format!(
            "erasure reaches the backup taken before it: restored, it holds the patient's {copy_rows} events, {} read as erased, {copy_others} others readable; no reading in plaintext in the backup",
            copy_erased.len()
        ),
    ));

    // The trace of one of their events says it was erased.
    let traced = match erased.first() {
        Some(id) => crate::trace_cmd::trace_json(&open_store(work, keyring)?, None, id)?
            .map(|(json, _)| json.to_string()),
        None => None,
    };
    let says_erased = traced.as_deref().is_some_and(|t| t.contains("erased"));
    println!(
        "  erasure   vitalmq trace {} --data {}: {}",
        erased.first().map_or("-", String::as_str),
        work.bridge_data().display(),
        if says_erased {
            "erased (crypto-shredded)"
        } else {
            "not said erased"
        }
    );
    checks.push(Check::new(
        says_erased,
        "erasure: `vitalmq trace` of one of the patient's events says it was erased",
    ));
    Ok(checks)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

/// Exports `patient` and checks the manifest's hashes against the files.
fn export(work: &WorkDir, keyring: &Arc<Keyring>, patient: &str) -> anyhow::Result<Check> {
    let out = export_dir(work);
    let report = export_cmd::export(&export_cmd::ExportRequest {
        patient_ref: patient.to_owned(),
        data: work.bridge_data(),
        out: out.clone(),
        key_file: Some(work.key_file()),
        keyring: None,
        purpose: Some("demo: access request (GDPR art. 15)".to_owned()),
        requested_by: Some("vitalmq-demo".to_owned()),
    })?;
    let (rows, _, _) = open_store(work, keyring)?.patient_rows(patient)?;
    let manifest_bytes = std::fs::read(out.join(export_cmd::MANIFEST))?;
    let manifest: Value = serde_json::from_slice(&manifest_bytes)?;
    let sum_file = std::fs::read_to_string(out.join(export_cmd::MANIFEST_SHA256))?;
    let manifest_ok = sum_file.split_whitespace().next() == Some(&sha256_hex(&manifest_bytes));
    let mut files = 0usize;
    let mut mismatched = Vec::new();
    for f in manifest["files"].as_array().into_iter().flatten() {
        let name = f["name"].as_str().unwrap_or_default();
        let bytes = std::fs::read(out.join(name)).unwrap_or_default();
        files += 1;
        if f["sha256"].as_str() != Some(&sha256_hex(&bytes)) {
            mismatched.push(name.to_owned());
        }
    }
    println!(
        "  export    the patient of {EXPORTED_DEVICE}: {} events, {} alert changes in {} (audited patient.export)",
        report.events,
        report.alerts,
        out.display()
    );
    Ok(Check::new(
        manifest_ok && files >= 4 && mismatched.is_empty() && report.events == rows && rows > 0,
        format!(
            "export: the patient of {EXPORTED_DEVICE}'s {} events, {files} files whose SHA-256 match the manifest, manifest.sha256 matches{}",
            report.events,
            if mismatched.is_empty() {
                String::new()
            } else {
                format!(" (mismatched: {})", mismatched.join(", "))
            }
        ),
    ))
}

/// The number at `path` in `v` (0 when absent).
fn count(v: &Value, path: &[&str]) -> u64 {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// A dry run 31 days ahead and a real run now, through `vitalmq retention run`'s
/// function and the demo's bridge configuration.
fn retention(
    work: &WorkDir,
    keyring: &Arc<Keyring>,
    held: &str,
    raw_total: u64,
    now: u64,
) -> anyhow::Result<Vec<Check>> {
    let store = open_store(work, keyring)?;
    let (held_rows, held_raw, _) = store.patient_rows(held)?;
    drop(store);
    let ahead = now + 31 * DAY_MS;
    let dry = Value::Object(retention_cmd::run_audited(
        &work.bridge_config(),
        ahead,
        true,
        // A month ahead on purpose: a dry run shows what would fall due.
        true,
    )?);
    let due = count(&dry, &["acted", "raw", "delete", "count"]);
    let skipped: u64 = ["raw", "normalized"]
        .iter()
        .flat_map(|p| {
            dry["skipped"][p]
                .as_object()
                .into_iter()
                .flat_map(|m| m.values())
        })
        .filter_map(Value::as_u64)
        .sum();
    let kept = count(&dry, &["held", "normalized"]);
    let kept_by = dry["holds_kept"]
        .as_array()
        .is_some_and(|h| h.iter().any(|id| id == HOLD_ID));
    println!(
        "  retention dry run at now + 31 days: {due} raw rows due for deletion; the held patient's {held_rows} events kept by {HOLD_ID}, with every object (a patient hold keeps objects: their names do not say whose records they hold)"
    );
    let mut checks = vec![Check::new(
        due > 0
            && held_raw > 0
            && due + held_raw + skipped == raw_total
            && kept >= held_rows
            && kept_by,
        format!(
            "retention (dry run at now + 31 days): {due} of {raw_total} raw rows due for deletion, the held patient's {held_raw} kept by {HOLD_ID} ({skipped} skipped)"
        ),
    )];

    let real = Value::Object(retention_cmd::run_audited(
        &work.bridge_config(),
        now,
        false,
        false,
    )?);
    let acted: u64 = real["acted"]
        .as_object()
        .into_iter()
        .flat_map(|planes| planes.values())
        .flat_map(|actions| actions.as_object().into_iter().flat_map(|a| a.values()))
        .map(|t| t["count"].as_u64().unwrap_or(0))
        .sum();
    let objects = count(&real, &["objects", "count"]);
    let audited = operator_records(&crate::operator_audit::data_dir_log(&work.bridge_data()))?
        .iter()
        .any(|r| {
            r["action"] == "retention.run"
                && r["reason"] == "succeeded"
                && r["details"]["now_ms"].as_u64() == Some(now)
                && r["details"]["dry_run"] == false
        });
    let scheduled = std::fs::read_to_string(work.bridge_audit())?
        .lines()
        .any(|l| l.contains("\"retention_run\""));
    println!(
        "  retention run at now: {acted} records and {objects} objects acted on (audited retention.run); the bridge's hourly job recorded retention_run: {}",
        if scheduled { "yes" } else { "no" }
    );
    checks.push(Check::new(
        acted == 0 && objects == 0 && audited && scheduled,
        format!(
            "retention (run at now): nothing due, {acted} acted on; its retention.run record is in the operator log, and the bridge's scheduled run left a retention_run record"
        ),
    ));
    Ok(checks)
}

/// The records of an operator audit log.
fn operator_records(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Every audit log of the run verifies, after all of the above.
fn audit_chains(work: &WorkDir) -> Check {
    let logs: BTreeMap<&str, PathBuf> = [
        ("broker", work.broker_audit()),
        ("bridge", work.bridge_audit()),
        ("admin", work.admin_audit()),
        (
            "operator (store)",
            crate::operator_audit::data_dir_log(&work.bridge_data()),
        ),
        ("operator (holds)", work.root.join("audit/operator.jsonl")),
        (
            "operator (registry)",
            work.pki().join("audit/operator.jsonl"),
        ),
        (
            "operator (backup)",
            backup_dir(work).join("operator-audit/operator.jsonl"),
        ),
    ]
    .into_iter()
    .collect();
    let mut records = 0u64;
    let mut broken = Vec::new();
    for (name, path) in &logs {
        // The admin API step runs only with two sites or more.
        if *name == "admin" && !path.exists() {
            continue;
        }
        match super::verify_chain(path) {
            Ok(n) => records += n,
            Err(e) => broken.push(format!("{name}: {e:#}")),
        }
    }
    Check::new(
        broken.is_empty(),
        format!(
            "audit chains intact after the lifecycle step: {} logs, {records} records{}",
            logs.values().filter(|p| p.exists()).count(),
            if broken.is_empty() {
                String::new()
            } else {
                format!(" (broken: {})", broken.join("; "))
            }
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reading_is_found_in_plaintext_and_not_in_a_seal() {
        assert!(has_reading(br#"{"m":{"spo2":97}}"#));
        assert!(has_reading(br#"{"pulse":61}"#));
        assert!(!has_reading(br#"{"metric":"spo2","threshold":90.0}"#));
        assert!(!has_reading(b"VMQS\x01 sealed bytes spo2-low"));
    }

    #[test]
    fn counts_are_read_from_nested_details() {
        let v = serde_json::json!({"acted": {"raw": {"delete": {"count": 3}}}});
        assert_eq!(count(&v, &["acted", "raw", "delete", "count"]), 3);
        assert_eq!(count(&v, &["acted", "normalized"]), 0);
    }
}
