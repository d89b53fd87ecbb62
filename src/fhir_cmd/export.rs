//! `vitalmq fhir export --config BRIDGE.toml (--patient pt-... | --device dev-...)
//! [--since T] [--until T] --out BUNDLE.json [--ndjson DIR]`.
//!
//! Reads, in one store snapshot, the patient's events and alert changes (for
//! `--device`: those of every patient the registry's assignment history gives the
//! device for some time of the range, each in its own snapshot, restricted to that
//! device), opens sealed payloads with the configured `[encryption]` keyring, and
//! writes a FHIR R4 **transaction** Bundle (loadable as is into a FHIR server, with the
//! sink's conditional requests except that Device and Task are created only if absent,
//! never updated: an old range must not roll a live server back; re-loading it creates
//! nothing twice):
//! Device, Observations and their Provenance carrying the device's COSE_Sign1, and per
//! clinical alert change its DetectedIssue, Task, Communication and Provenance.
//! `--ndjson DIR` also writes bulk-export style files, `<Type>.ndjson`, one resource per
//! line. Time range: events by `observed_at`, alert changes by the time recorded,
//! `since <= t < until`.
//!
//! Patient-linked: recorded as the operator action `fhir.export` (resource the
//! patient_ref, or the device with its wearers in the details; counts and the Bundle's
//! SHA-256, never the data). A reading whose raw message retention purged goes with a
//! Provenance without signature (`raw_purged` in the report). An erased patient (for `--device`: any wearer in the
//! range; narrow it with `--since`) is refused; new files only, owner-only.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use serde_json::{Map, Value as Json};
use vitalmq_bridge::BridgeConfig;
use vitalmq_bridge::sink::fhir::bundle::device_facts;
use vitalmq_bridge::store::Payload;
use vitalmq_bridge::store::export::{PatientAlert, PatientEvent, PatientRow};
use vitalmq_fhir::{AlertChange, BundleBuilder, Event};
use vitalmq_policies::{DeviceRegistry, History, Use};

use crate::export_cmd::{Refused, readable};

/// What `vitalmq fhir export` says when a payload is sealed and it has no key.
const KEY_HINT: &str = "the configuration gives no key file";
use crate::operator_audit::{self, Action};

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("who").required(true).args(["patient", "device"])))]
pub struct ExportArgs {
    /// The bridge's configuration: data directory, registry, `[encryption]`.
    #[arg(long)]
    config: PathBuf,
    /// The patient's pseudonym (`pt-...`).
    #[arg(long)]
    patient: Option<String>,
    /// A device id: its readings and alerts for the patient it is assigned to.
    #[arg(long)]
    device: Option<String>,
    /// From this time (RFC 3339), inclusive.
    #[arg(long)]
    since: Option<String>,
    /// Until this time (RFC 3339), exclusive.
    #[arg(long)]
    until: Option<String>,
    /// The Bundle to write (a new file).
    #[arg(long)]
    out: PathBuf,
    /// Also write NDJSON, one file per resource type, into this new directory.
    #[arg(long)]
    ndjson: Option<PathBuf>,
    /// Why the data is exported (recorded in the operator audit log).
    #[arg(long)]
    purpose: Option<String>,
}

/// What the export read and wrote.
#[derive(Debug, Default, serde::Serialize)]
struct Report {
    events: u64,
    observations: u64,
    alert_changes: u64,
    /// Readings whose raw message retention purged: exported without signature.
    raw_purged: u64,
    entries: u64,
    bundle_sha256: String,
}

pub fn run(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let config = BridgeConfig::load(&args.config)
        .with_context(|| format!("--config {}", args.config.display()))?;
    let registry = DeviceRegistry::load(&config.registry)
        .map_err(|e| anyhow::anyhow!("{}: {e}", config.registry.display()))?;
    let since = args.since.as_deref().map(parse_time).transpose()?;
    let until = args.until.as_deref().map(parse_time).transpose()?;
    let (patients, device) = match (&args.patient, &args.device) {
        (Some(p), None) => (vec![p.clone()], None),
        (None, Some(d)) => {
            let id = vitalmq_envelope::DeviceId::new(d.as_str())?;
            let history = registry
                .history(&id)
                .with_context(|| format!("--device {d}: not in the registry"))?;
            let patients = wearers(history, since, until);
            anyhow::ensure!(
                !patients.is_empty(),
                "--device {d}: assigned to no patient in the time range"
            );
            (patients, Some(d.clone()))
        }
        _ => anyhow::bail!("give one of --patient and --device"),
    };
    for p in &patients {
        anyhow::ensure!(
            vitalmq_policies::is_patient_ref(p),
            "--patient is not a patient pseudonym (pt- then at least 8 of [0-9a-z-])"
        );
    }
    new_file_ok(&args.out)?;
    if let Some(dir) = &args.ndjson {
        anyhow::ensure!(
            !dir.exists(),
            "{}: exists; NDJSON goes into a new directory",
            dir.display()
        );
    }
    let store = crate::bridge_cmd::open_existing(&config.data_dir)?;
    let store = match &config.encryption {
        Some(enc) => store.with_keyring(Arc::new(crate::bridge_cmd::open_keyring(
            &enc.keyring_path(&config.data_dir),
            Some(&enc.key_file),
        )?)),
        None => store,
    };
    Action::new(
        "fhir.export",
        operator_audit::log_path(operator_audit::data_dir_log(&config.data_dir)),
    )
    // One patient: the patient. A device's export: the device, and every wearer it
    // reads in the details.
    .resource(match &device {
        Some(d) => Some(d.clone()),
        None => patients.first().cloned(),
    })
    .detail("device", device.clone())
    .detail("patients", patients.clone())
    .detail("since", args.since.clone())
    .detail("until", args.until.clone())
    .detail("out", operator_audit::absolute(&args.out))
    .detail("purpose", args.purpose.clone())
    .run(|| {
        let mut collect = Collect {
            device: device.as_deref(),
            since,
            until,
            builder: BundleBuilder::for_export(),
            devices: Vec::new(),
            report: Report::default(),
        };
        // One read snapshot per patient; a device's wearers one after the other.
        for patient_ref in &patients {
            if let Some(erased) = store.patient_erased(patient_ref)? {
                return Err(Refused {
                    erased_at_ms: erased.erased_at_ms,
                }
                .into());
            }
            store.read_patient(patient_ref, |row| match row {
                PatientRow::Event(e) => collect.event(&e),
                PatientRow::Alert(a) => collect.alert(&a),
            })?;
        }
        let Collect {
            mut builder,
            devices,
            mut report,
            ..
        } = collect;
        for (device, site, event) in &devices {
            let entry = vitalmq_envelope::DeviceId::new(device.as_str())
                .ok()
                .and_then(|id| registry.device(&id));
            builder.device(&device_facts(device, site, event, entry));
        }
        let bundle = builder.transaction();
        let mut text = serde_json::to_vec_pretty(&bundle)?;
        text.push(b'\n');
        report.entries = builder.entries().len() as u64;
        report.bundle_sha256 = hex::encode(ring::digest::digest(&ring::digest::SHA256, &text));
        write_new(&args.out, &text)?;
        if let Some(dir) = &args.ndjson {
            write_ndjson(dir, &builder)?;
        }
        let mut done = Map::new();
        done.insert("events".into(), report.events.into());
        done.insert("alert_changes".into(), report.alert_changes.into());
        done.insert("raw_purged".into(), report.raw_purged.into());
        done.insert("bundle_sha256".into(), report.bundle_sha256.clone().into());
        Ok((report, done))
    })
    .and_then(|report| {
        println!("{}", serde_json::to_string(&report)?);
        Ok(ExitCode::SUCCESS)
    })
    .or_else(|e| {
        if e.downcast_ref::<Refused>().is_some() {
            eprintln!("{e:#}");
            Ok(ExitCode::from(1))
        } else {
            Err(e)
        }
    })
}

struct Collect<'a> {
    device: Option<&'a str>,
    since: Option<u64>,
    until: Option<u64>,
    builder: BundleBuilder,
    /// Per device (id, site), its newest event (events come in outbox order): its
    /// Device is mapped from it as the sink maps it.
    devices: Vec<(String, String, Event)>,
    report: Report,
}

impl Collect<'_> {
    fn in_range(&self, t: u64) -> bool {
        self.since.is_none_or(|s| t >= s) && self.until.is_none_or(|u| t < u)
    }

    fn event(&mut self, e: &PatientEvent) -> anyhow::Result<()> {
        let device = e.head.device.as_str();
        if self.device.is_some_and(|d| d != device) || !self.in_range(e.observed_at_ms) {
            return Ok(());
        }
        let id = e.head.event_id.as_str();
        let json: Json =
            serde_json::from_slice(readable(&e.normalized, "normalized events", KEY_HINT)?)
                .with_context(|| format!("event {id}: the stored normalized event is not JSON"))?;
        let event = Event::from_json(&json).with_context(|| format!("event {id}"))?;
        self.report.events += 1;
        if matches!(e.raw, Payload::Erased { erased_at_ms: None }) {
            // The patient is not erased (checked before reading), so an empty raw row
            // is retention's purge: the reading goes without its device signature.
            self.report.raw_purged += 1;
            self.report.observations += self.builder.reading_raw_purged(&event)? as u64;
        } else {
            let raw = readable(&e.raw, "raw messages", KEY_HINT)?;
            anyhow::ensure!(
                hex::encode(ring::digest::digest(&ring::digest::SHA256, raw))
                    == event.provenance.raw_sha256,
                "event {id}: the raw message does not hash to the event's raw_sha256"
            );
            self.report.observations += self.builder.reading(&event, raw)? as u64;
        }
        let newest = (device.to_owned(), e.head.site.as_str().to_owned(), event);
        match self.devices.iter_mut().find(|(d, ..)| d == device) {
            Some(f) => *f = newest,
            None => self.devices.push(newest),
        }
        Ok(())
    }

    fn alert(&mut self, a: &PatientAlert) -> anyhow::Result<()> {
        if a.kind != "clinical"
            || self
                .device
                .is_some_and(|d| a.device.as_ref().is_none_or(|x| x.as_str() != d))
            || !self.in_range(a.created_at_ms)
        {
            return Ok(());
        }
        let body: Json = serde_json::from_slice(readable(&a.body, "alert bodies", KEY_HINT)?)
            .with_context(|| {
                format!(
                    "alert {} ({}): the stored body is not JSON",
                    a.alert_id, a.state
                )
            })?;
        self.builder.alert(&AlertChange {
            body,
            recorded_at_ms: a.created_at_ms,
        })?;
        self.report.alert_changes += 1;
        Ok(())
    }
}

/// Every patient `history` assigns the device to for some time of `[since, until)`,
/// oldest first, each once: a device's export follows its wearers, not only today's.
fn wearers(history: &History, since: Option<u64>, until: Option<u64>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for a in history.periods() {
        let Use::Assigned { patient_ref, .. } = &a.serves else {
            continue;
        };
        let starts_before_until = until.is_none_or(|u| a.period.from < u);
        let ends_after_since = match (a.period.to, since) {
            (Some(to), Some(s)) => to > s,
            _ => true,
        };
        if starts_before_until && ends_after_since && !out.contains(patient_ref) {
            out.push(patient_ref.clone());
        }
    }
    out
}

fn parse_time(s: &str) -> anyhow::Result<u64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("{s}: not an RFC 3339 time"))?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).context("a time before 1970")
}

fn new_file_ok(path: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        !path.exists(),
        "{}: exists; the Bundle goes into a new file",
        path.display()
    );
    Ok(())
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

fn write_ndjson(dir: &Path, builder: &BundleBuilder) -> anyhow::Result<()> {
    vitalmq_private_fs::create_dir_all(dir)?;
    for (resource_type, resources) in builder.by_type() {
        let mut text = Vec::new();
        for r in resources {
            serde_json::to_writer(&mut text, &r)?;
            text.push(b'\n');
        }
        write_new(&dir.join(format!("{resource_type}.ndjson")), &text)?;
    }
    Ok(())
}
