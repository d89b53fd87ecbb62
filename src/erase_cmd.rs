//! `vitalmq erase`: erasure of one patient by crypto-shredding (issue 20, point 3).
//!
//! Steps, in this order ([`erase`]):
//!
//! 1. Refused (operator audit record, outcome failed with `refused: ...`) when an
//!    active legal hold covers the patient (conservatively: a hold naming the patient,
//!    or a device the patient ever had, or a time range overlapping the patient's
//!    assignments or readings), or when the registry still has an open assignment to
//!    the patient (new data would keep arriving: unassign first).
//! 2. `Keyring::erase`: the patient's data keys are destroyed and a tombstone recorded,
//!    in one transaction. The point of no return: from here every sealed copy of the
//!    patient's data (store, objects, backups) is unreadable.
//! 3. Cleanup in the store: the patient's rows written before encryption was on
//!    (plaintext) are overwritten in place (`Store::scrub_patient`).
//!
//! Idempotent and safe against `kill -9` at any point: a rerun finds the tombstone and
//! runs only the cleanup, which is itself idempotent. `VITALMQ_ERASE_ABORT_AFTER_KEYRING`
//! (tests only) aborts the process between steps 2 and 3, to prove it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use serde::Serialize;
use serde_json::{Map, Value};
use vitalmq_bridge::store::{NoKeys, Store};
use vitalmq_envelope::DeviceId;
use vitalmq_keyring::{KeyProvider, Keyring, LocalKeyFile, Subject};
use vitalmq_policies::{DeviceRegistry, LegalHolds, Period, Use};

use crate::operator_audit::{self, Action};

/// Test hook: set, the process aborts right after the keyring erase (before cleanup).
pub const ABORT_AFTER_KEYRING_ENV: &str = "VITALMQ_ERASE_ABORT_AFTER_KEYRING";

#[derive(Debug, clap::Args)]
pub struct EraseArgs {
    /// The patient's care pseudonym (`pt-...`).
    #[arg(long)]
    patient: String,
    /// Why (recorded in the operator audit log and the tombstone), e.g. "GDPR art. 17, ticket 4711".
    #[arg(long)]
    reason: String,
    /// The bridge's data directory (`data_dir` in its configuration).
    #[arg(long)]
    data: PathBuf,
    /// The device registry: erasure is refused while it assigns a device to the patient.
    #[arg(long)]
    registry: Option<PathBuf>,
    /// Legal holds (`vitalmq-holds/v1`): erasure is refused under an active hold.
    #[arg(long)]
    holds: Option<PathBuf>,
    /// The key file (`[encryption] key_file`); not needed to erase.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// The keyring; default `DATA/keyring.sqlite3`.
    #[arg(long)]
    keyring: Option<PathBuf>,
    /// Who asks (recorded in the tombstone); default the operator's user name.
    #[arg(long)]
    by: Option<String>,
}

/// One erasure request (the CLI's and the admin API's).
#[derive(Debug, Clone)]
pub struct Request {
    pub patient_ref: String,
    pub reason: String,
    pub data: PathBuf,
    pub registry: Option<PathBuf>,
    pub holds: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub keyring: Option<PathBuf>,
    pub by: String,
}

/// An erasure refused by the state of the data: an active legal hold covers the
/// patient, or a device is still assigned to them; nothing was erased. Callers (the
/// admin API) tell it apart by downcasting the error of [`erase`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refused: {}", self.0)
    }
}

impl std::error::Error for Refused {}

/// Store rows of the patient, by plane.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Rows {
    pub events: u64,
    pub raw: u64,
    pub alerts: u64,
}

/// What an erasure did (printed as JSON).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub patient_ref: String,
    pub erased_at_ms: u64,
    pub erased_by: String,
    /// Data-key versions destroyed (by the first, effective run).
    pub keys_destroyed: u64,
    /// The patient's store rows, now unreadable (sealed under a destroyed key, or
    /// scrubbed).
    pub unreadable_rows: Rows,
    /// Plaintext payloads (written before encryption was on) overwritten by this run.
    pub legacy_scrubbed: u64,
    /// True when the keys were already destroyed (a rerun): only the cleanup ran.
    pub already_erased: bool,
}

pub fn run(args: EraseArgs) -> anyhow::Result<ExitCode> {
    let by = args
        .by
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "operator".to_owned());
    let report = erase(&Request {
        patient_ref: args.patient,
        reason: args.reason,
        data: args.data,
        registry: args.registry,
        holds: args.holds,
        key_file: args.key_file,
        keyring: args.keyring,
        by,
    })?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}

/// Erases one patient (see the module docs): an audited operator action, refusals
/// included.
pub fn erase(req: &Request) -> anyhow::Result<Report> {
    let subject =
        Subject::new(&req.patient_ref).map_err(|e| anyhow::anyhow!("refused: --patient: {e}"))?;
    anyhow::ensure!(
        req.patient_ref.starts_with("pt-"),
        "refused: --patient is not a patient pseudonym (pt-...)"
    );
    // No store, nothing to erase or audit: a typo must not create one.
    let mut store = crate::bridge_cmd::open_existing(&req.data)?;
    Action::new(
        "erase",
        operator_audit::log_path(operator_audit::data_dir_log(&req.data)),
    )
    .resource(Some(req.patient_ref.clone()))
    .detail("data", operator_audit::absolute(&req.data))
    .detail("reason", req.reason.clone())
    .detail("by", req.by.clone())
    .run(|| {
        let keyring = open_keyring(req)?;
        let report = erase_in(req, &subject, &keyring, &mut store)?;
        let mut details = Map::new();
        details.insert("erased_at_ms".into(), report.erased_at_ms.into());
        details.insert("keys_destroyed".into(), report.keys_destroyed.into());
        details.insert(
            "unreadable_rows".into(),
            serde_json::to_value(report.unreadable_rows)?,
        );
        details.insert("legacy_scrubbed".into(), report.legacy_scrubbed.into());
        details.insert("already_erased".into(), Value::Bool(report.already_erased));
        Ok((report, details))
    })
}

fn open_keyring(req: &Request) -> anyhow::Result<Keyring> {
    let provider: Arc<dyn KeyProvider> = match &req.key_file {
        Some(f) => Arc::new(LocalKeyFile::load(f)?),
        None => Arc::new(NoKeys),
    };
    let path = req
        .keyring
        .clone()
        .unwrap_or_else(|| req.data.join(vitalmq_keyring::KEYRING_FILE));
    Keyring::open(&path, provider).with_context(|| format!("keyring {}", path.display()))
}

fn erase_in(
    req: &Request,
    subject: &Subject,
    keyring: &Keyring,
    store: &mut Store,
) -> anyhow::Result<Report> {
    let patient = req.patient_ref.as_str();
    let tombstone = match keyring.erased(subject)? {
        Some(t) => (t, true),
        None => {
            refuse_if_held(req, store)?;
            refuse_if_assigned(req)?;
            let t = keyring.erase(subject, &req.by, &req.reason, now_ms())?;
            tracing::info!(keys_destroyed = t.keys_destroyed, "data keys destroyed");
            (t, false)
        }
    };
    if std::env::var_os(ABORT_AFTER_KEYRING_ENV).is_some() {
        eprintln!(
            "{ABORT_AFTER_KEYRING_ENV} set: aborting between the keyring erase and the cleanup"
        );
        std::process::abort();
    }
    let legacy_scrubbed = store.scrub_patient(patient)?;
    let (events, raw, alerts) = store.patient_rows(patient)?;
    let (t, already_erased) = tombstone;
    Ok(Report {
        patient_ref: patient.to_owned(),
        erased_at_ms: t.erased_at_ms,
        erased_by: t.erased_by,
        keys_destroyed: t.keys_destroyed,
        unreadable_rows: Rows {
            events,
            raw,
            alerts,
        },
        legacy_scrubbed,
        already_erased,
    })
}

/// Refused when an active legal hold covers the patient: one naming the patient, a
/// device the patient ever had (registry history or stored readings), or a time range
/// overlapping the patient's assignments or readings.
fn refuse_if_held(req: &Request, store: &Store) -> anyhow::Result<()> {
    let Some(path) = &req.holds else {
        return Ok(());
    };
    let holds = LegalHolds::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let patient = req.patient_ref.as_str();
    let (stored_devices, span) = store.patient_span(patient)?;
    let mut devices: Vec<DeviceId> = stored_devices
        .iter()
        .filter_map(|d| DeviceId::new(d).ok())
        .collect();
    let mut periods: Vec<Period> = span
        .and_then(|(a, b)| Period::new(a, Some(b.saturating_add(1))))
        .into_iter()
        .collect();
    if let Some(registry) = &req.registry {
        let registry = DeviceRegistry::load(registry).map_err(|e| anyhow::anyhow!("{e}"))?;
        for (id, period) in assignments_of(&registry, patient) {
            devices.push(id);
            periods.push(period);
        }
    }
    for h in holds.holds() {
        let by_patient = h.patient_ref.as_deref() == Some(patient);
        let by_device = h.device.as_ref().is_some_and(|d| devices.contains(d));
        let by_time = h.patient_ref.is_none()
            && h.device.is_none()
            && h.during
                .is_some_and(|d| periods.iter().any(|p| p.overlaps(&d)));
        if by_patient || by_device || by_time {
            return Err(Refused(format!(
                "legal hold {} covers this patient ({}); lift it first",
                h.id,
                if by_patient {
                    "names the patient"
                } else if by_device {
                    "names a device the patient had"
                } else {
                    "its time range overlaps the patient's"
                }
            ))
            .into());
        }
    }
    Ok(())
}

/// Refused while the registry assigns a device to the patient (open assignment).
fn refuse_if_assigned(req: &Request) -> anyhow::Result<()> {
    let Some(path) = &req.registry else {
        return Ok(());
    };
    let registry = DeviceRegistry::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let now = now_ms();
    if let Some((id, _)) = assignments_of(&registry, &req.patient_ref)
        .into_iter()
        .find(|(_, p)| p.to.is_none_or(|to| to > now))
    {
        return Err(Refused(format!(
            "device {id} is still assigned to this patient; unassign it first (`vitalmq registry unassign`)"
        ))
        .into());
    }
    Ok(())
}

/// Every assignment period of `patient` in the registry, with its device.
fn assignments_of(registry: &DeviceRegistry, patient: &str) -> Vec<(DeviceId, Period)> {
    let mut out = Vec::new();
    for d in registry.devices() {
        let Some(history) = registry.history(&d.id) else {
            continue;
        };
        for a in history.periods() {
            if let Use::Assigned { patient_ref, .. } = &a.serves
                && patient_ref == patient
            {
                out.push((d.id.clone(), a.period));
            }
        }
    }
    out
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
