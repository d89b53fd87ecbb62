//! `vitalmq admin serve --config admin.toml`: the admin API (see the `vitalmq_admin`
//! crate) over this binary's own read and change code: the bridge store reads of
//! `vitalmq store`, `vitalmq trace`, `registry_cmd::apply`, `hold_cmd::apply`,
//! `erase_cmd::erase`, `export_cmd::export` and the re-identification store of
//! `vitalmq reid` (which the admin service may open; broker and bridge never do).
//! Every store read opens the store with its keyring ([`LocalBackend::open_store`]).
//! [`client`] is the other side: the CLI commands given `--server`.

pub mod client;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use serde_json::{Value, json};
use vitalmq_admin::backend::{Acting, Backend, BackendError, Record, Rows, ScopeCheck};
use vitalmq_bridge::store::Store;
use vitalmq_envelope::DeviceId;
use vitalmq_policies::{DeviceRegistry, HoldError, SpiffeId, Use};

use crate::registry_cmd::{self, Actor, Change};
use crate::{erase_cmd, export_cmd, hold_cmd};

/// Line printed on stderr once the server listens, followed by its address.
pub const READY: &str = "vitalmq admin listening on ";

#[derive(Debug, clap::Subcommand)]
pub enum AdminCommand {
    /// Serve the admin API over mutual TLS (operators only; every call audited).
    Serve {
        /// The admin configuration (`vitalmq-admin/v1`, TOML).
        #[arg(long)]
        config: PathBuf,
    },
}

impl AdminCommand {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let Self::Serve { config: path } = self;
        let config = vitalmq_admin::AdminConfig::load(&path)?;
        let backend = Arc::new(LocalBackend::of(&config));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        runtime
            .block_on(vitalmq_admin::serve(
                config,
                backend,
                |addr| eprintln!("{READY}{addr}"),
                crate::stop::wait_for_stop(),
            ))
            .with_context(|| format!("admin API from {}", path.display()))?;
        Ok(ExitCode::SUCCESS)
    }
}

/// The data the admin API serves: the files of this host.
#[derive(Debug)]
pub struct LocalBackend {
    data_dir: PathBuf,
    registry: PathBuf,
    reid_store: Option<PathBuf>,
    broker_audit: Option<PathBuf>,
    holds: Option<PathBuf>,
    /// `[encryption] key_file`: sealed payloads open with it.
    key_file: Option<PathBuf>,
    /// `[encryption] keyring`, or the data directory's.
    keyring: PathBuf,
    exports_dir: Option<PathBuf>,
}

fn failed(e: anyhow::Error) -> BackendError {
    BackendError::Failed(format!("{e:#}"))
}

/// The backend error of a refused change: outside the caller's scope, a lock held past
/// its deadline (busy), an unknown hold (not found), or refused by the rules.
fn change_error(e: &anyhow::Error) -> BackendError {
    if let Some(out) = e.downcast_ref::<registry_cmd::OutsideScope>() {
        BackendError::OutsideScope(out.0.clone())
    } else if e.chain().any(|c| {
        matches!(
            c.downcast_ref::<vitalmq_private_fs::DirLockError>(),
            Some(vitalmq_private_fs::DirLockError::Busy { .. })
        )
    }) {
        BackendError::Busy(format!("{e:#}"))
    } else if let Some(HoldError::UnknownHold(id)) = e.downcast_ref::<HoldError>() {
        BackendError::NotFound(format!("hold {id}"))
    } else {
        BackendError::Refused(format!("{e:#}"))
    }
}

/// The backend error of a failed erasure or export: a refusal by the state of the data
/// (a legal hold, an open assignment, an erased patient) is a conflict.
fn patient_error(e: anyhow::Error) -> BackendError {
    if e.downcast_ref::<erase_cmd::Refused>().is_some()
        || e.downcast_ref::<export_cmd::Refused>().is_some()
    {
        BackendError::Conflict(format!("{e:#}"))
    } else {
        failed(e)
    }
}

/// The operator id of an API caller (`priya` of `spiffe://.../operator/priya`): who an
/// erasure or export is by.
fn operator_id(acting: &Acting) -> Result<String, BackendError> {
    acting
        .identity
        .parse::<SpiffeId>()
        .map(|id| id.id.as_str().to_owned())
        .map_err(|e| BackendError::Failed(format!("`{}`: {e}", acting.identity)))
}

/// A new export directory's name: UTC time and a random suffix, never the patient
/// (a listing of the exports directory says nothing of whose data is there).
fn export_name() -> Result<String, BackendError> {
    use ring::rand::SecureRandom as _;
    let mut suffix = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut suffix)
        .map_err(|_| BackendError::Failed("no randomness for an export name".into()))?;
    let t = time::OffsetDateTime::now_utc();
    Ok(format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z-{}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        hex::encode(suffix)
    ))
}

fn actor_of(acting: &Acting) -> Actor {
    Actor {
        identity: Some(acting.identity.clone()),
        role: Some(acting.role.clone()),
        purpose: Some(acting.purpose.clone()),
    }
}

fn json<T: serde::Serialize>(row: &T) -> Result<Value, BackendError> {
    serde_json::to_value(row).map_err(|e| BackendError::Failed(e.to_string()))
}

impl LocalBackend {
    /// The files `config` names.
    pub fn of(config: &vitalmq_admin::AdminConfig) -> Self {
        Self {
            data_dir: config.data_dir.clone(),
            registry: config.registry.clone(),
            reid_store: config.reid_store.clone(),
            broker_audit: config.broker_audit.clone(),
            holds: config.holds.clone(),
            key_file: config.encryption.as_ref().map(|e| e.key_file.clone()),
            keyring: config
                .encryption
                .as_ref()
                .and_then(|e| e.keyring.clone())
                .unwrap_or_else(|| config.data_dir.join(vitalmq_keyring::KEYRING_FILE)),
            exports_dir: config.exports_dir.clone(),
        }
    }

    /// Whether the bridge seals what it stores, judged from the data (the admin API
    /// does not read the bridge's configuration): the store holds sealed rows, or the
    /// keyring holds a key. An admin configuration with `[encryption]` beside a bridge
    /// without it must not let an erasure pass for a crypto-shred.
    fn bridge_seals(&self) -> Result<bool, BackendError> {
        let failed = |e: String| BackendError::Failed(e);
        let db = self.data_dir.join(vitalmq_bridge::store::DB_FILE);
        if db.exists()
            && vitalmq_bridge::store::coverage::holds_sealed_rows(&db)
                .map_err(|e| failed(e.to_string()))?
        {
            return Ok(true);
        }
        if !self.keyring.exists() {
            return Ok(false);
        }
        let keyring = crate::bridge_cmd::open_keyring(&self.keyring, None)
            .map_err(|e| failed(format!("{e:#}")))?;
        Ok(keyring.key_counts().map_err(|e| failed(e.to_string()))?.0 > 0)
    }

    /// The bridge's store, with the keyring when there is one: with `[encryption]`
    /// sealed payloads open (a clinician reads plaintext); without it they read as
    /// `"sealed": true`. An erased patient's rows read as erased either way (the
    /// keyring's tombstones need no key). The key file is read at each call, so a KEK
    /// rotation applies without a restart.
    fn open_store(&self) -> anyhow::Result<Store> {
        let db = self.data_dir.join(vitalmq_bridge::store::DB_FILE);
        anyhow::ensure!(db.exists(), "{}: no bridge store here", db.display());
        let store = Store::open(&self.data_dir)?;
        if !self.keyring.exists() {
            // No keyring: the store was never encrypted, nothing in it is sealed.
            return Ok(store);
        }
        let keyring = crate::bridge_cmd::open_keyring(&self.keyring, self.key_file.as_deref())?;
        Ok(store.with_keyring(Arc::new(keyring)))
    }

    fn holds_file(&self) -> Result<&std::path::Path, BackendError> {
        self.holds.as_deref().ok_or_else(|| {
            BackendError::NotConfigured(
                "no legal holds file in the admin configuration (`holds`)".into(),
            )
        })
    }

    fn load_registry(&self) -> Result<DeviceRegistry, BackendError> {
        DeviceRegistry::load(&self.registry).map_err(|e| BackendError::Failed(e.to_string()))
    }
}

/// The site the device served at `t`, if it was assigned then.
fn site_at(registry: &DeviceRegistry, device: &DeviceId, t: u64) -> Option<String> {
    match &registry.assignment_at(device, t)?.serves {
        Use::Assigned { site, .. } => Some(site.to_string()),
        Use::Retired => None,
    }
}

impl Backend for LocalBackend {
    fn rows(&self, rows: Rows, device: Option<&str>) -> Result<Vec<Record>, BackendError> {
        let store = self.open_store().map_err(failed)?;
        let keep = |d: Option<&str>| device.is_none_or(|want| d == Some(want));
        let store_err = |e: vitalmq_bridge::store::StoreError| BackendError::Failed(e.to_string());
        match rows {
            Rows::Events => store
                .list_events()
                .map_err(store_err)?
                .iter()
                .filter(|r| keep(Some(r.head.device.as_str())))
                .map(|r| {
                    Ok(Record {
                        site: Some(r.head.site.to_string()),
                        body: json(r)?,
                    })
                })
                .collect(),
            Rows::Alerts => store
                .list_alerts()
                .map_err(store_err)?
                .iter()
                .filter(|r| keep(r.device.as_ref().map(DeviceId::as_str)))
                .map(|r| {
                    // The site is the topic's: alerts/{site}/... (SPEC section 5).
                    let site = r
                        .topic
                        .strip_prefix("alerts/")
                        .and_then(|t| t.split('/').next())
                        .map(str::to_owned);
                    Ok(Record {
                        site,
                        body: json(r)?,
                    })
                })
                .collect(),
            Rows::Quarantine => {
                let registry = self.load_registry()?;
                store
                    .list_quarantine()
                    .map_err(store_err)?
                    .iter()
                    .filter(|r| keep(r.device.as_ref().map(DeviceId::as_str)))
                    .map(|r| {
                        let site = r
                            .device
                            .as_ref()
                            .and_then(|d| site_at(&registry, d, r.received_at_ms));
                        Ok(Record {
                            site,
                            body: json(r)?,
                        })
                    })
                    .collect()
            }
        }
    }

    fn trace(&self, id: &str) -> Result<Record, BackendError> {
        let store = self.open_store().map_err(failed)?;
        match crate::trace_cmd::trace_json(&store, self.broker_audit.as_deref(), id)
            .map_err(failed)?
        {
            Some((body, site)) => Ok(Record { site, body }),
            None => Err(BackendError::NotFound(id.to_owned())),
        }
    }

    fn device_sites(&self, device: &str) -> Result<Vec<String>, BackendError> {
        let registry = self.load_registry()?;
        let id = DeviceId::new(device.to_owned())
            .map_err(|e| BackendError::Refused(format!("device: {e}")))?;
        let history = registry
            .history(&id)
            .ok_or_else(|| BackendError::NotFound(format!("device {device}")))?;
        Ok(registry_cmd::sites_of(history))
    }

    fn change(
        &self,
        device: &str,
        change: Value,
        acting: &Acting,
        scope: Option<&ScopeCheck>,
    ) -> Result<Value, BackendError> {
        let change: Change = serde_json::from_value(change)
            .map_err(|e| BackendError::Refused(format!("not a registry change: {e}")))?;
        let scope = scope.map(|check| check as registry_cmd::ScopeCheck<'_>);
        let applied =
            registry_cmd::apply_scoped(&self.registry, device, &change, &actor_of(acting), scope)
                .map_err(|e| change_error(&e))?;
        json(&applied)
    }

    fn holds(&self) -> Result<Vec<Value>, BackendError> {
        let path = self.holds_file()?;
        if !path.exists() {
            // No hold was ever placed: none holds.
            return Ok(Vec::new());
        }
        hold_cmd::read(path).map_err(failed)
    }

    fn place_hold(&self, hold: Value, acting: &Acting) -> Result<Value, BackendError> {
        let path = self.holds_file()?;
        let place: hold_cmd::Place = serde_json::from_value(hold)
            .map_err(|e| BackendError::Refused(format!("not a hold: {e}")))?;
        hold_cmd::apply(path, &hold_cmd::Change::Place(place), &actor_of(acting))
            .map_err(|e| change_error(&e))
    }

    fn lift_hold(&self, id: &str, lift: Value, acting: &Acting) -> Result<Value, BackendError> {
        let path = self.holds_file()?;
        let lift: hold_cmd::Lift = serde_json::from_value(lift)
            .map_err(|e| BackendError::Refused(format!("not a lift: {e}")))?;
        let change = hold_cmd::Change::Lift {
            id: id.to_owned(),
            reason: lift.reason,
        };
        hold_cmd::apply(path, &change, &actor_of(acting)).map_err(|e| change_error(&e))
    }

    fn erase_patient(
        &self,
        patient_ref: &str,
        request: Value,
        acting: &Acting,
    ) -> Result<Value, BackendError> {
        let reason = request
            .get("reason")
            .and_then(Value::as_str)
            .ok_or_else(|| BackendError::Refused("an erasure needs a \"reason\"".into()))?;
        let report = erase_cmd::erase(&erase_cmd::Request {
            patient_ref: patient_ref.to_owned(),
            reason: reason.to_owned(),
            data: self.data_dir.clone(),
            registry: Some(self.registry.clone()),
            // Fail closed: without the deployment's holds file (the bridge's
            // `[lifecycle] holds`), the erasure is refused.
            holds: self.holds.clone(),
            key_file: self.key_file.clone(),
            keyring: Some(self.keyring.clone()),
            by: operator_id(acting)?,
            encrypted_at_rest: self.bridge_seals()?,
            scrub_plaintext_only: false,
            now_ms: None,
        })
        .map_err(patient_error)?;
        json(&report)
    }

    fn export_patient(
        &self,
        patient_ref: &str,
        request: Value,
        acting: &Acting,
    ) -> Result<Value, BackendError> {
        let root = self.exports_dir.as_deref().ok_or_else(|| {
            BackendError::NotConfigured(
                "no exports directory in the admin configuration (`exports_dir`)".into(),
            )
        })?;
        vitalmq_private_fs::create_dir_all(root)
            .map_err(|e| BackendError::Failed(e.to_string()))?;
        let purpose = request
            .get("purpose")
            .and_then(Value::as_str)
            .unwrap_or(&acting.purpose)
            .to_owned();
        let report = export_cmd::export(&export_cmd::ExportRequest {
            patient_ref: patient_ref.to_owned(),
            data: self.data_dir.clone(),
            out: root.join(export_name()?),
            key_file: self.key_file.clone(),
            keyring: Some(self.keyring.clone()),
            purpose: Some(purpose),
            requested_by: Some(operator_id(acting)?),
        })
        .map_err(patient_error)?;
        let manifest = std::fs::read(report.out.join(export_cmd::MANIFEST))
            .map_err(|e| BackendError::Failed(format!("{}: {e}", report.out.display())))?;
        let manifest: Value = serde_json::from_slice(&manifest)
            .map_err(|e| BackendError::Failed(format!("the manifest written: {e}")))?;
        Ok(json!({
            "dir": report.out,
            "manifest_sha256": report.manifest_sha256,
            "events": report.events,
            "alerts": report.alerts,
            "scores": report.scores,
            "manifest": manifest,
        }))
    }

    fn reid_lookup(&self, pseudonym: &str, acting: &Acting) -> Result<Value, BackendError> {
        let store = self.reid_store.as_deref().ok_or_else(|| {
            BackendError::Failed("no reid_store in the admin configuration".into())
        })?;
        let found = crate::reid_cmd::lookup_as(
            store,
            pseudonym,
            Some(&acting.identity),
            Some(&acting.purpose),
        );
        match found {
            Ok(enrolment_id) => Ok(serde_json::json!({
                "pseudonym": pseudonym,
                "enrolment_id": enrolment_id,
            })),
            Err(e) if format!("{e:#}").contains("no enrolment") => Err(BackendError::NotFound(
                "no enrolment under this pseudonym".into(),
            )),
            Err(e) => Err(BackendError::Refused(format!("{e:#}"))),
        }
    }
}
