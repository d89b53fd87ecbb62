//! `vitalmq export --patient pt-... --data DIR --out NEW_DIR`: one patient's data for
//! GDPR access and portability, as JSON lines with a manifest of hashes.
//!
//! The export reads, in one store snapshot ([`vitalmq_bridge::store::export`]), every
//! event of the patient and every alert change about them, opening sealed payloads
//! through the keyring (`--key-file`, `--keyring`). It writes into a new directory
//! (0700; an existing one must be empty), each file 0600:
//!
//! | file | one line per | fields |
//! |---|---|---|
//! | `events.jsonl` | event, outbox order | the normalized event exactly as stored |
//! | `raw.jsonl` | event | `event_id`, `position`, `device`, `epoch`, `seq`, `sha256`, `length`, `cose_sign1_base64` (the bytes as received, so the recipient can verify the device signature), `received_at(_ms)`, `topic`, `broker`, `publisher` |
//! | `alerts.jsonl` | alert state change, in order | `position`, `alert_id`, `state`, `kind`, `topic`, `device`, `rule`, `recorded_at(_ms)`, `body` (the alert as published) |
//! | `provenance.jsonl` | event, then alert change | event: `kind` "event", ids, `raw_sha256`, `verdict`, times, `sinks` (whose cursor passed it), the event's own `provenance`; alert: `kind` "alert", ids, rule and policy, `evidence` and `evidence_not_exported` |
//! | `scores.jsonl` | server-side score (issue 21), id order | `score_id`, `model`, `version`, `config_sha256`, `role`, `device`, `site`, `observed_at(_ms)`, `recorded_at_ms`, `score` (the stored score: aggregate, risk, sub-scores, missing, inputs) |
//! | `shadow_alerts.jsonl` | would-be alert change of a rule-set version running in shadow (issue 21; never delivered), id order | `change_id`, `alert_id`, `model`, `version`, `config_sha256`, `role`, `rule`, `state`, `severity`, `device`, `site`, `at(_ms)`, `recorded_at_ms`, `alert` (the alert as it would have been published) |
//!
//! then `manifest.json` (`vitalmq-export/v1`: patient, time, source store and schema
//! version, who asked and why, per file its name, lines, bytes and SHA-256), and last
//! `manifest.sha256` (`sha256sum -c` format): a directory without it is an incomplete
//! export. A failed export removes what it wrote.
//!
//! An erased patient is refused ([`Refused`], exit 1), as is a payload found erased
//! while reading: an export never ships holes. A patient without data gets an export
//! with empty files. Every export is an operator action (`patient.export`, resource
//! the patient_ref) recorded with the manifest's SHA-256 and the counts, never the
//! data; refusals are recorded as failed with the reason. A `--patient` that is not a
//! pseudonym (it might be a name) is rejected before anything is recorded.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use base64::Engine as _;
use serde::Serialize;
use serde_json::{Map, Value as Json, json};
use vitalmq_bridge::normalize::rfc3339_ms;
use vitalmq_bridge::store::export::{PatientAlert, PatientEvent, PatientRow};
use vitalmq_bridge::store::{Payload, Store};
use vitalmq_keyring::Keyring;

use crate::operator_audit::{self, Action};

/// The manifest's format.
pub const FORMAT: &str = "vitalmq-export/v1";
/// The data files, in the order the manifest lists them.
pub const FILES: [&str; 6] = [
    "events.jsonl",
    "raw.jsonl",
    "alerts.jsonl",
    "provenance.jsonl",
    "scores.jsonl",
    "shadow_alerts.jsonl",
];
pub const MANIFEST: &str = "manifest.json";
/// What `vitalmq export` says when a payload is sealed and it has no key.
const KEY_HINT: &str = "give the key file (--key-file)";
pub const MANIFEST_SHA256: &str = "manifest.sha256";

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The patient's pseudonym (`pt-...`).
    #[arg(long)]
    patient: String,
    /// The bridge's data directory.
    #[arg(long)]
    data: PathBuf,
    /// A new directory for the export (an existing one must be empty).
    #[arg(long)]
    out: PathBuf,
    /// The key-encryption key file, to open a store with encryption at rest.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// The keyring; default DATA/keyring.sqlite3.
    #[arg(long)]
    keyring: Option<PathBuf>,
    /// Why the data is exported (recorded in the manifest and the audit log).
    #[arg(long)]
    purpose: Option<String>,
    /// Who requested the export (recorded; default the operator running it).
    #[arg(long)]
    by: Option<String>,
}

/// What to export, for the CLI and the admin API alike.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    pub patient_ref: String,
    /// The bridge's data directory.
    pub data: PathBuf,
    pub out: PathBuf,
    pub key_file: Option<PathBuf>,
    /// Default `DATA/keyring.sqlite3`.
    pub keyring: Option<PathBuf>,
    pub purpose: Option<String>,
    /// Default the operator (`user@host`) running the process.
    pub requested_by: Option<String>,
}

/// What an export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    pub out: PathBuf,
    /// SHA-256 (hex) of `manifest.json`.
    pub manifest_sha256: String,
    pub events: u64,
    pub alerts: u64,
    pub scores: u64,
    pub shadow_alerts: u64,
    pub files: Vec<FileEntry>,
}

/// One data file as the manifest lists it.
#[derive(Debug, Clone, Serialize)]
pub struct FileEntry {
    pub name: String,
    pub lines: u64,
    pub bytes: u64,
    pub sha256: String,
}

/// An export refused because the patient was erased: not a fault, nothing of theirs
/// can be read any more. Callers tell it apart by downcasting the error of [`export`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub erased_at_ms: Option<u64>,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = self
            .erased_at_ms
            .and_then(rfc3339_ms)
            .map(|t| format!(" at {t}"))
            .unwrap_or_default();
        write!(
            f,
            "refused: the patient was erased{at}; their data is destroyed and cannot be exported"
        )
    }
}

impl std::error::Error for Refused {}

pub fn run(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let request = ExportRequest {
        patient_ref: args.patient,
        data: args.data,
        out: args.out,
        key_file: args.key_file,
        keyring: args.keyring,
        purpose: args.purpose,
        requested_by: args.by,
    };
    match export(&request) {
        Ok(report) => {
            println!("{}", serde_json::to_string(&report)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) if e.downcast_ref::<Refused>().is_some() => {
            eprintln!("{e:#}");
            Ok(ExitCode::from(1))
        }
        Err(e) => Err(e),
    }
}

/// Exports one patient's data (see the module docs), recorded as the operator action
/// `patient.export` in the operator log of the data directory.
pub fn export(req: &ExportRequest) -> anyhow::Result<ExportReport> {
    // A pseudonym as holds accept one (never a name: a value that is not one is
    // neither read nor recorded).
    anyhow::ensure!(
        vitalmq_policies::is_patient_ref(&req.patient_ref),
        "--patient is not a patient pseudonym (pt- then at least 8 of [0-9a-z-])"
    );
    check_out(&req.out)?;
    let store = crate::bridge_cmd::open_existing(&req.data)?;
    let store = match open_keyring(req)? {
        Some(k) => store.with_keyring(k),
        None => store,
    };
    let requested_by = req
        .requested_by
        .clone()
        .unwrap_or_else(|| vitalmq_audit::operator::Operator::current().identity());
    Action::new(
        "patient.export",
        operator_audit::log_path(operator_audit::data_dir_log(&req.data)),
    )
    .resource(Some(req.patient_ref.clone()))
    .detail("data_dir", operator_audit::absolute(&req.data))
    .detail("out", operator_audit::absolute(&req.out))
    .detail("purpose", req.purpose.clone())
    .detail("requested_by", requested_by.as_str())
    .run(|| {
        if let Some(erased) = store.patient_erased(&req.patient_ref)? {
            return Err(Refused {
                erased_at_ms: erased.erased_at_ms,
            }
            .into());
        }
        let created = make_out(&req.out)?;
        let report = write_export(&store, req, &requested_by).inspect_err(|_| {
            remove_partial(&req.out, created);
        })?;
        let mut done = Map::new();
        done.insert(
            "manifest_sha256".into(),
            report.manifest_sha256.clone().into(),
        );
        done.insert("events".into(), report.events.into());
        done.insert("alerts".into(), report.alerts.into());
        let bytes: u64 = report.files.iter().map(|f| f.bytes).sum();
        done.insert("bytes".into(), bytes.into());
        Ok((report, done))
    })
}

/// The keyring to open sealed payloads with: with `--key-file`, the keyring (which
/// must exist); without, the keyring if there is one, holding no key (it still tells
/// an erased patient); none when the store never had one.
fn open_keyring(req: &ExportRequest) -> anyhow::Result<Option<Arc<Keyring>>> {
    let path = req
        .keyring
        .clone()
        .unwrap_or_else(|| req.data.join(vitalmq_keyring::KEYRING_FILE));
    if req.key_file.is_none() && !path.exists() {
        return Ok(None);
    }
    anyhow::ensure!(
        path.exists(),
        "{}: no keyring here (--keyring)",
        path.display()
    );
    Ok(Some(Arc::new(crate::bridge_cmd::open_keyring(
        &path,
        req.key_file.as_deref(),
    )?)))
}

/// Refuses an output path that exists and is not an empty directory.
fn check_out(out: &Path) -> anyhow::Result<()> {
    match std::fs::read_dir(out) {
        Ok(mut entries) => anyhow::ensure!(
            entries.next().is_none(),
            "{}: exists and is not empty; an export goes into a new directory",
            out.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| {
                format!("{}: not a directory an export can go into", out.display())
            });
        }
    }
    Ok(())
}

/// Creates the output directory (0700), or makes an existing empty one owner-only;
/// returns whether it was created.
fn make_out(out: &Path) -> anyhow::Result<bool> {
    use std::os::unix::fs::PermissionsExt as _;
    check_out(out)?;
    let created = !out.exists();
    vitalmq_private_fs::create_dir_all(out)?;
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("{}", out.display()))?;
    Ok(created)
}

/// Removes what a failed export wrote.
fn remove_partial(out: &Path, created: bool) {
    if created {
        let _ = std::fs::remove_dir_all(out);
        return;
    }
    for name in FILES.iter().chain(&[MANIFEST, MANIFEST_SHA256]) {
        let _ = std::fs::remove_file(out.join(name));
    }
}

/// A JSON-lines file being written, hashed and counted as it goes.
struct Lines {
    name: &'static str,
    file: BufWriter<File>,
    digest: ring::digest::Context,
    lines: u64,
    bytes: u64,
}

impl Lines {
    fn create(dir: &Path, name: &'static str) -> anyhow::Result<Self> {
        let path = dir.join(name);
        let file = vitalmq_private_fs::create_options()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("{}", path.display()))?;
        Ok(Self {
            name,
            file: BufWriter::new(file),
            digest: ring::digest::Context::new(&ring::digest::SHA256),
            lines: 0,
            bytes: 0,
        })
    }

    /// Writes `line` (one JSON document, no newline in it) and its newline.
    fn line(&mut self, line: &[u8]) -> anyhow::Result<()> {
        anyhow::ensure!(
            !line.contains(&b'\n'),
            "a line of {} spans lines",
            self.name
        );
        for part in [line, b"\n"] {
            self.file.write_all(part)?;
            self.digest.update(part);
            self.bytes += part.len() as u64;
        }
        self.lines += 1;
        Ok(())
    }

    fn json(&mut self, value: &Json) -> anyhow::Result<()> {
        self.line(&serde_json::to_vec(value)?)
    }

    /// Flushes and syncs the file; its manifest entry.
    fn finish(self) -> anyhow::Result<FileEntry> {
        let file = self.file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(FileEntry {
            name: self.name.to_owned(),
            lines: self.lines,
            bytes: self.bytes,
            sha256: hex::encode(self.digest.finish()),
        })
    }
}

/// The bytes of a payload an export needs: an erased one refuses the export (the
/// patient was erased while it ran), a locked one needs the key file.
/// The bytes of a payload for an export: an erased one refuses the export
/// ([`Refused`]), a locked one needs the key (`key_hint` says where it comes from).
/// `vitalmq export` and `vitalmq fhir export` both read through it.
pub(crate) fn readable<'a>(
    payload: &'a Payload,
    what: &str,
    key_hint: &str,
) -> anyhow::Result<&'a [u8]> {
    match payload {
        Payload::Plain(bytes) => Ok(bytes),
        Payload::Erased { erased_at_ms } => Err(Refused {
            erased_at_ms: *erased_at_ms,
        }
        .into()),
        Payload::Locked => {
            anyhow::bail!("the store holds this patient's {what} sealed; {key_hint}")
        }
    }
}

/// The four data files being written.
struct DataFiles {
    events: Lines,
    raw: Lines,
    alerts: Lines,
    provenance: Lines,
    /// Ids of the exported events, to tell which evidence an alert cites is here.
    event_ids: HashSet<String>,
}

impl DataFiles {
    fn event(&mut self, e: &PatientEvent) -> anyhow::Result<()> {
        let id = e.head.event_id.as_str();
        let normalized = readable(&e.normalized, "normalized events", KEY_HINT)?;
        let parsed: Json = serde_json::from_slice(normalized)
            .with_context(|| format!("event {id}: the stored normalized event is not JSON"))?;
        self.events.line(normalized)?;
        let raw = readable(&e.raw, "raw messages", KEY_HINT)?;
        let received_at = rfc3339_ms(e.received_at_ms);
        self.raw.json(&json!({
            "event_id": id,
            "position": e.head.position,
            "device": e.head.device.as_str(),
            "epoch": e.head.epoch,
            "seq": e.head.seq,
            "sha256": e.raw_ref.sha256,
            "length": raw.len(),
            "cose_sign1_base64": base64::engine::general_purpose::STANDARD.encode(raw),
            "received_at": received_at,
            "received_at_ms": e.received_at_ms,
            "topic": e.raw_ref.topic,
            "broker": e.raw_ref.broker,
            "publisher": e.raw_ref.publisher,
        }))?;
        let mut line = json!({"kind": "event"});
        if let (Some(map), Json::Object(head)) =
            (line.as_object_mut(), serde_json::to_value(&e.head)?)
        {
            map.extend(head);
            map.insert("raw_sha256".into(), e.raw_ref.sha256.clone().into());
            map.insert("observed_at".into(), rfc3339_ms(e.observed_at_ms).into());
            map.insert("received_at".into(), received_at.into());
            map.insert("received_at_ms".into(), e.received_at_ms.into());
            map.insert("sinks".into(), e.sinks.clone().into());
            map.insert(
                "provenance".into(),
                parsed.get("provenance").cloned().unwrap_or(Json::Null),
            );
        }
        self.provenance.json(&line)?;
        self.event_ids.insert(id.to_owned());
        Ok(())
    }

    fn alert(&mut self, a: &PatientAlert) -> anyhow::Result<()> {
        let body: Json = serde_json::from_slice(readable(&a.body, "alert bodies", KEY_HINT)?)
            .with_context(|| {
                format!(
                    "alert {} ({}): the stored body is not JSON",
                    a.alert_id, a.state
                )
            })?;
        let recorded_at = rfc3339_ms(a.created_at_ms);
        self.alerts.json(&json!({
            "position": a.position,
            "alert_id": a.alert_id,
            "state": a.state,
            "kind": a.kind,
            "topic": a.topic,
            "device": a.device.as_ref().map(|d| d.as_str()),
            "rule": a.rule,
            "recorded_at": recorded_at,
            "recorded_at_ms": a.created_at_ms,
            "body": body,
        }))?;
        let evidence: Vec<String> = body
            .get("evidence")
            .and_then(Json::as_array)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| id.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let not_exported: Vec<&String> = evidence
            .iter()
            .filter(|id| !self.event_ids.contains(id.as_str()))
            .collect();
        self.provenance.json(&json!({
            "kind": "alert",
            "alert_id": a.alert_id,
            "state": a.state,
            "position": a.position,
            "recorded_at": recorded_at,
            "rule": a.rule,
            "rule_version": body.get("rule_version"),
            "policy_sha256": body.get("policy_sha256"),
            "evidence": evidence,
            "evidence_not_exported": not_exported,
        }))
    }
}

/// Writes the data files, then the manifest and its hash, into `req.out`.
fn write_export(
    store: &Store,
    req: &ExportRequest,
    requested_by: &str,
) -> anyhow::Result<ExportReport> {
    let out = &req.out;
    let mut files = DataFiles {
        events: Lines::create(out, FILES[0])?,
        raw: Lines::create(out, FILES[1])?,
        alerts: Lines::create(out, FILES[2])?,
        provenance: Lines::create(out, FILES[3])?,
        event_ids: HashSet::new(),
    };
    let snapshot = store.read_patient(&req.patient_ref, |row| match row {
        PatientRow::Event(e) => files.event(&e),
        PatientRow::Alert(a) => files.alert(&a),
    })?;
    // The patient's scores (schema v5), read right after the snapshot: a score is
    // committed with the reading that triggered it, so it may name an event the
    // snapshot did not see (it was recorded meanwhile), never the other way round.
    let mut scores = Lines::create(out, FILES[4])?;
    let mut score_count = 0u64;
    for s in store.scores(0, Some(&req.patient_ref), usize::MAX)? {
        let score: Json = serde_json::from_slice(readable(&s.payload, "scores", KEY_HINT)?)
            .with_context(|| format!("score {}: the stored payload is not JSON", s.score_id))?;
        scores.json(&json!({
            "score_id": s.score_id,
            "model": s.model,
            "version": s.version,
            "config_sha256": s.config_sha256,
            "role": s.role,
            "device": s.device,
            "site": s.site,
            "observed_at": rfc3339_ms(s.observed_at_ms),
            "observed_at_ms": s.observed_at_ms,
            "recorded_at_ms": s.created_at_ms,
            "score": score,
        }))?;
        score_count += 1;
    }
    // The patient's shadow alerts (schema v6), likewise after the snapshot.
    let mut shadow = Lines::create(out, FILES[5])?;
    let mut shadow_count = 0u64;
    for a in store.shadow_alerts(0, Some(&req.patient_ref), usize::MAX)? {
        let alert: Json = serde_json::from_slice(readable(&a.payload, "shadow alerts", KEY_HINT)?)
            .with_context(|| {
                format!(
                    "shadow alert {}: the stored payload is not JSON",
                    a.change_id
                )
            })?;
        shadow.json(&json!({
            "change_id": a.change_id,
            "alert_id": a.alert_id,
            "model": a.model,
            "version": a.version,
            "config_sha256": a.config_sha256,
            "role": a.role,
            "rule": a.rule,
            "state": a.state,
            "severity": a.severity,
            "device": a.device,
            "site": a.site,
            "at": rfc3339_ms(a.at_ms),
            "at_ms": a.at_ms,
            "recorded_at_ms": a.created_at_ms,
            "alert": alert,
        }))?;
        shadow_count += 1;
    }
    let entries = vec![
        files.events.finish()?,
        files.raw.finish()?,
        files.alerts.finish()?,
        files.provenance.finish()?,
        scores.finish()?,
        shadow.finish()?,
    ];
    let manifest = json!({
        "format": FORMAT,
        "patient_ref": req.patient_ref,
        "created_at": rfc3339_ms(now_ms()),
        "source": {
            "store": operator_audit::absolute(store.path()),
            "schema_version": snapshot.schema_version,
            "head": snapshot.head,
            "encrypted": store.keyring().is_some(),
        },
        "requested_by": requested_by,
        "purpose": req.purpose,
        "counts": {"events": snapshot.events, "alerts": snapshot.alerts, "scores": score_count,
            "shadow_alerts": shadow_count},
        "files": entries,
    });
    let mut text = serde_json::to_vec_pretty(&manifest)?;
    text.push(b'\n');
    write_new(&out.join(MANIFEST), &text)?;
    let manifest_sha256 = hex::encode(ring::digest::digest(&ring::digest::SHA256, &text));
    write_new(
        &out.join(MANIFEST_SHA256),
        format!("{manifest_sha256}  {MANIFEST}\n").as_bytes(),
    )?;
    File::open(out)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("{}", out.display()))?;
    Ok(ExportReport {
        out: out.clone(),
        manifest_sha256,
        events: snapshot.events,
        alerts: snapshot.alerts,
        scores: score_count,
        shadow_alerts: shadow_count,
        files: entries,
    })
}

/// Writes a new owner-only file and syncs it.
fn write_new(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut file = vitalmq_private_fs::create_options()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("{}", path.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
