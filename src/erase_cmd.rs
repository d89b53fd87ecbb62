//! `vitalmq erase`: erasure of one patient by crypto-shredding (issue 20, point 3).
//!
//! `vitalmq erase --patient pt-... --reason R --config BRIDGE_TOML`. The bridge's
//! configuration names everything an erasure must consult: the data directory, the
//! keyring (`[encryption]`), the device registry and the legal holds (`[lifecycle]
//! holds`, the one holds file of the deployment; the admin API must name the same).
//! `--data`, `--registry`, `--holds`, `--key-file` and `--keyring` override it.
//!
//! Steps, in this order ([`erase`]):
//!
//! 1. Refused, fail closed (operator audit record, outcome failed with `refused: ...`):
//!    when no holds file or no registry is known, or the holds file cannot be read
//!    (absence is never taken for "nothing held" or "nothing assigned"); when the bridge
//!    has no `[encryption]` (it would store the patient's late readings again in
//!    plaintext), unless `--scrub-plaintext-only` (weaker: scrubs what is stored, nothing
//!    is shredded for the future); when an active legal hold covers the patient
//!    (conservatively: a hold naming the patient, a device the patient ever had, or a
//!    time range overlapping the patient's assignments or readings); when the registry
//!    still has an open assignment to the patient (new data would keep arriving:
//!    unassign first).
//! 2. `Keyring::erase`: the patient's data keys are destroyed and a tombstone recorded,
//!    in one transaction. The point of no return: from here every sealed copy of the
//!    patient's data (store, objects, backups) is unreadable. The hold check and this
//!    step run under the lock of the holds file's directory (the one `vitalmq hold`
//!    and the admin API take to change it), so a hold placed meanwhile is not missed.
//! 3. Cleanup in the store (`Store::erase_cleanup`, one transaction, `secure_delete`):
//!    the patient's plaintext rows (written before encryption was on) are overwritten
//!    in place; the alert engine's state of every device the patient had (registry
//!    history, stored events) is deleted (it is per device: a device now serving
//!    another patient starts its baselines afresh); quarantined messages of those
//!    devices received within the patient's assignment periods are deleted (they are
//!    sealed under `sys:quarantine`, which the key erasure does not reach).
//! 4. The WAL of the keyring and of the store are checkpointed (retried for up to 5 s
//!    while a reader holds them); `wal_checkpointed: false` in the report (and a
//!    warning) when one could not complete: old page images are then still in a WAL
//!    until its next checkpoint (rerun the erasure when the bridge is idle).
//!
//! Idempotent and safe against `kill -9` at any point: a rerun finds the tombstone and
//! runs only the cleanup, which is itself idempotent. `VITALMQ_ERASE_ABORT_AFTER_KEYRING`
//! (tests only) aborts the process between steps 2 and 3, to prove it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use serde::Serialize;
use serde_json::{Map, Value};
use vitalmq_bridge::BridgeConfig;
use vitalmq_bridge::store::Store;
use vitalmq_bridge::store::sealing::ErasureScope;
use vitalmq_envelope::DeviceId;
use vitalmq_keyring::{Keyring, Subject};
use vitalmq_policies::{DeviceRegistry, LegalHolds, Period, Use};
use vitalmq_private_fs::{dir_of, lock_dir_timeout};

use crate::operator_audit::{self, Action};
use crate::registry_cmd;

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
    /// The bridge's configuration: data directory, `[encryption]` key file and
    /// keyring, registry and `[lifecycle] holds`.
    #[arg(long)]
    config: PathBuf,
    /// Overrides the configuration's data directory.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Overrides the configuration's device registry.
    #[arg(long)]
    registry: Option<PathBuf>,
    /// Overrides the configuration's `[lifecycle] holds` (`vitalmq-holds/v1`).
    #[arg(long)]
    holds: Option<PathBuf>,
    /// Overrides `[encryption] key_file`; not needed to erase.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Overrides `[encryption] keyring` (default `DATA/keyring.sqlite3`).
    #[arg(long)]
    keyring: Option<PathBuf>,
    /// Erase a patient of a bridge without `[encryption]`: only scrubs what is stored.
    /// Weaker: nothing is shredded, so readings that arrive later (a resend, a device
    /// not yet unassigned everywhere) are stored again in plaintext.
    #[arg(long)]
    scrub_plaintext_only: bool,
    /// Who asks (recorded in the tombstone); default the operator's user name.
    #[arg(long)]
    by: Option<String>,
}

/// One erasure request (the CLI's and the admin API's). `registry` and `holds` are
/// options so a caller can pass what it knows, but an erasure without either is
/// refused (fail closed).
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
    /// The bridge has encryption at rest (`[encryption]`); without it the erasure is
    /// refused unless `scrub_plaintext_only`.
    pub encrypted_at_rest: bool,
    /// Erase without encryption at rest (scrub only; see [`EraseArgs`]).
    pub scrub_plaintext_only: bool,
    /// The instant the open-assignment check is made at; `None`: the wall clock. (The
    /// demo's devices run on a faster clock, and their assignments with them.)
    pub now_ms: Option<u64>,
}

impl Request {
    /// A request for `patient_ref` with the paths of the bridge configuration `config`
    /// (data directory, keyring, key file, registry, `[lifecycle] holds`).
    pub fn from_bridge_config(
        config: &BridgeConfig,
        patient_ref: String,
        reason: String,
        by: String,
    ) -> Self {
        let encryption = config.encryption.as_ref();
        Self {
            patient_ref,
            reason,
            data: config.data_dir.clone(),
            registry: Some(config.registry.clone()),
            holds: config.lifecycle.as_ref().and_then(|l| l.holds.clone()),
            key_file: encryption.map(|e| e.key_file.clone()),
            keyring: encryption.map(|e| e.keyring_path(&config.data_dir)),
            by,
            encrypted_at_rest: encryption.is_some(),
            scrub_plaintext_only: false,
            now_ms: None,
        }
    }
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
    /// Devices whose alert-engine state (baselines) this run deleted.
    pub alert_states_deleted: u64,
    /// Quarantined messages of the patient's devices, within their assignment periods,
    /// this run deleted.
    pub quarantine_deleted: u64,
    /// Whether the keyring's and the store's WALs were checkpointed and truncated;
    /// false leaves old page images in a WAL until its next checkpoint.
    pub wal_checkpointed: bool,
    /// True when the keys were already destroyed (a rerun): only the cleanup ran.
    pub already_erased: bool,
    /// Erased without encryption at rest (`--scrub-plaintext-only`).
    pub scrub_plaintext_only: bool,
}

pub fn run(args: EraseArgs) -> anyhow::Result<ExitCode> {
    let by = args
        .by
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "operator".to_owned());
    let config = BridgeConfig::load(&args.config)
        .with_context(|| format!("--config {}", args.config.display()))?;
    let mut req = Request::from_bridge_config(&config, args.patient, args.reason, by);
    if let Some(data) = args.data {
        req.data = data;
    }
    if args.registry.is_some() {
        req.registry = args.registry;
    }
    if args.holds.is_some() {
        req.holds = args.holds;
    }
    if args.key_file.is_some() {
        req.key_file = args.key_file;
    }
    if args.keyring.is_some() {
        req.keyring = args.keyring;
    }
    req.scrub_plaintext_only = args.scrub_plaintext_only;
    let report = erase(&req)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}

/// Erases one patient (see the module docs): an audited operator action, refusals
/// included.
pub fn erase(req: &Request) -> anyhow::Result<Report> {
    // The one rule of holds, export and erasure, checked before anything is recorded:
    // what is refused here might be a name.
    anyhow::ensure!(
        vitalmq_policies::is_patient_ref(&req.patient_ref),
        "refused: --patient is not a patient pseudonym (pt- and at least 8 of [0-9a-z-])"
    );
    let subject =
        Subject::new(&req.patient_ref).map_err(|e| anyhow::anyhow!("refused: --patient: {e}"))?;
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
    .detail("scrub_plaintext_only", req.scrub_plaintext_only)
    .run(|| {
        let sources = Sources::of(req)?;
        let keyring = open_keyring(req)?;
        let report = erase_in(req, &sources, &subject, &keyring, &mut store)?;
        let mut details = Map::new();
        details.insert("erased_at_ms".into(), report.erased_at_ms.into());
        details.insert("keys_destroyed".into(), report.keys_destroyed.into());
        details.insert(
            "unreadable_rows".into(),
            serde_json::to_value(report.unreadable_rows)?,
        );
        details.insert("legacy_scrubbed".into(), report.legacy_scrubbed.into());
        details.insert(
            "alert_states_deleted".into(),
            report.alert_states_deleted.into(),
        );
        details.insert(
            "quarantine_deleted".into(),
            report.quarantine_deleted.into(),
        );
        details.insert(
            "wal_checkpointed".into(),
            Value::Bool(report.wal_checkpointed),
        );
        details.insert("already_erased".into(), Value::Bool(report.already_erased));
        Ok((report, details))
    })
}

/// The holds file and registry an erasure must consult, refused when either is not
/// known: their absence must never read as "nothing held" or "nothing assigned".
struct Sources {
    holds: PathBuf,
    registry: PathBuf,
}

impl Sources {
    fn of(req: &Request) -> anyhow::Result<Self> {
        let (holds, registry) = match (req.holds.clone(), req.registry.clone()) {
            (Some(h), Some(r)) => (h, r),
            (h, r) => {
                let mut missing = Vec::new();
                if h.is_none() {
                    missing.push(
                        "no legal holds file ([lifecycle] holds in the bridge configuration, or --holds)",
                    );
                }
                if r.is_none() {
                    missing.push(
                        "no device registry (registry in the bridge configuration, or --registry)",
                    );
                }
                anyhow::bail!(
                    "refused: {}: an erasure must check holds and assignments",
                    missing.join("; ")
                );
            }
        };
        anyhow::ensure!(
            req.encrypted_at_rest || req.scrub_plaintext_only,
            "refused: erasure needs encryption at rest: without it the bridge would store the patient's late readings again (configure [encryption], or pass --scrub-plaintext-only to only scrub what is stored)"
        );
        Ok(Self { holds, registry })
    }
}

fn open_keyring(req: &Request) -> anyhow::Result<Keyring> {
    let path = req
        .keyring
        .clone()
        .unwrap_or_else(|| req.data.join(vitalmq_keyring::KEYRING_FILE));
    crate::bridge_cmd::open_keyring(&path, req.key_file.as_deref())
}

fn erase_in(
    req: &Request,
    sources: &Sources,
    subject: &Subject,
    keyring: &Keyring,
    store: &mut Store,
) -> anyhow::Result<Report> {
    let patient = req.patient_ref.as_str();
    let load_assignments = || -> anyhow::Result<Vec<(DeviceId, Period)>> {
        let registry =
            DeviceRegistry::load(&sources.registry).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(assignments_of(&registry, patient))
    };
    let mut assignments = load_assignments()?;
    let (stored_devices, span) = store.patient_span(patient)?;
    let (tombstone, already_erased, keyring_checkpointed) = match keyring.erased(subject)? {
        Some(t) => (t, true, true),
        None => {
            // A hold placed or a device assigned between the checks and the erase would
            // be missed: all three run under the locks `vitalmq hold` and `vitalmq
            // registry` (and the admin API) take to change them, registry first (nobody
            // takes them the other way round), one lock when both files share a
            // directory; the registry is read again under its lock.
            let (registry_dir, holds_dir) = (dir_of(&sources.registry), dir_of(&sources.holds));
            let _registry_turn = lock_dir_timeout(registry_dir, registry_cmd::LOCK_TIMEOUT)
                .with_context(|| format!("lock of {}", sources.registry.display()))?;
            let _holds_turn = if same_dir(registry_dir, holds_dir) {
                None
            } else {
                Some(
                    lock_dir_timeout(holds_dir, registry_cmd::LOCK_TIMEOUT)
                        .with_context(|| format!("lock of {}", sources.holds.display()))?,
                )
            };
            assignments = load_assignments()?;
            refuse_if_held(patient, &sources.holds, &stored_devices, span, &assignments)?;
            refuse_if_assigned(&assignments, req.now_ms.unwrap_or_else(now_ms))?;
            let done = keyring.erase_checked(subject, &req.by, &req.reason, now_ms())?;
            tracing::info!(
                keys_destroyed = done.tombstone.keys_destroyed,
                "data keys destroyed"
            );
            (done.tombstone, false, done.wal_checkpointed)
        }
    };
    // A rerun checkpoints again: the first run may have been in a reader's way.
    let keyring_checkpointed =
        keyring_checkpointed && keyring.checkpoint(vitalmq_keyring::CHECKPOINT_WITHIN)?;
    if std::env::var_os(ABORT_AFTER_KEYRING_ENV).is_some() {
        eprintln!(
            "{ABORT_AFTER_KEYRING_ENV} set: aborting between the keyring erase and the cleanup"
        );
        std::process::abort();
    }
    let mut scope = ErasureScope {
        devices: stored_devices,
        received: Vec::new(),
    };
    for (id, period) in &assignments {
        scope.devices.push(id.as_str().to_owned());
        scope
            .received
            .push((id.as_str().to_owned(), period.from, period.to));
    }
    scope.devices.sort();
    scope.devices.dedup();
    let cleanup = store.erase_cleanup(patient, &scope)?;
    let (events, raw, alerts) = store.patient_rows(patient)?;
    let wal_checkpointed = keyring_checkpointed && cleanup.wal_checkpointed;
    if !wal_checkpointed {
        tracing::warn!(
            keyring = keyring_checkpointed,
            store = cleanup.wal_checkpointed,
            "a WAL checkpoint after the erasure did not complete; rerun the erasure when the bridge is idle"
        );
    }
    Ok(Report {
        patient_ref: patient.to_owned(),
        erased_at_ms: tombstone.erased_at_ms,
        erased_by: tombstone.erased_by,
        keys_destroyed: tombstone.keys_destroyed,
        unreadable_rows: Rows {
            events,
            raw,
            alerts,
        },
        legacy_scrubbed: cleanup.legacy_scrubbed,
        alert_states_deleted: cleanup.alert_states,
        quarantine_deleted: cleanup.quarantine,
        wal_checkpointed,
        already_erased,
        scrub_plaintext_only: req.scrub_plaintext_only,
    })
}

/// Refused when an active legal hold covers the patient: one naming the patient, a
/// device the patient ever had (registry history or stored readings), or a time range
/// overlapping the patient's assignments or readings. A holds file that cannot be read
/// (missing included) refuses too.
fn refuse_if_held(
    patient: &str,
    holds: &Path,
    stored_devices: &[String],
    span: Option<(u64, u64)>,
    assignments: &[(DeviceId, Period)],
) -> anyhow::Result<()> {
    let holds = LegalHolds::load(holds).map_err(|e| {
        anyhow::anyhow!("refused: the legal holds cannot be read, so none can be ruled out: {e}")
    })?;
    let mut devices: Vec<DeviceId> = stored_devices
        .iter()
        .filter_map(|d| DeviceId::new(d).ok())
        .collect();
    let mut periods: Vec<Period> = span
        .and_then(|(a, b)| Period::new(a, Some(b.saturating_add(1))))
        .into_iter()
        .collect();
    for (id, period) in assignments {
        devices.push(id.clone());
        periods.push(*period);
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

/// Whether two directories are the same one (then one lock covers both files).
fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Refused while the registry assigns a device to the patient (open assignment).
fn refuse_if_assigned(assignments: &[(DeviceId, Period)], now: u64) -> anyhow::Result<()> {
    if let Some((id, _)) = assignments
        .iter()
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
