//! The retention job (issue 20): enforces the retention classes (`vitalmq-retention/v1`)
//! on the store, the objects sinks and the audit segments shipped to them, under the
//! legal holds (`vitalmq-holds/v1`, re-read at every run).
//!
//! A run is planning ([`plan`], pure: a record's metadata, the policy, the holds and
//! `now` decide) and acts (here): the store is paged through in key order, each page's
//! acts applied in one transaction ([`crate::store::StoreAct`]); then each objects sink
//! is listed and its due objects deleted or moved (copy, then delete: a rerun finishes a
//! half move). Every act is idempotent and nothing is remembered between runs, so a run
//! killed at any point is finished by the next one with the same `now`.
//!
//! What it touches, per plane (store instants: `raw` the reception time, `normalized`
//! the observation time, `clinical` the alert's creation, `quarantine` the reception;
//! objects: the end of their `date=` day; the store's purpose is care, an objects
//! sink's its own):
//! * store: `raw_messages`, `events`, `alerts`, `quarantine` (see [`plan`] for what
//!   each action does and when a due row is skipped). `device_state`, gaps, counters,
//!   cursors and alert state are never touched: windows and cursors stay whole.
//! * objects: `raw/`, `normalized/` and `audit/` under each objects sink's prefix.
//! * not the local audit logs: their hash chains must stay whole; only their shipped
//!   segments are subject to retention.
//!
//! Each run leaves one `retention_run` audit record ([`report`]); the bridge writes it
//! to its own (hash-chained, checkpoint-signed) audit log.

pub mod anonymize;
pub mod plan;
pub mod report;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path as ObjectPath;
use vitalmq_policies::{LegalHolds, PolicyErrors, Purpose, RetentionPolicy};

use crate::config::{BridgeConfig, SinkConfig};
use crate::run::RunError;
use crate::sink::SinkError;
use crate::sink::object::ObjectStoreSink;
use crate::store::{Store, StoreError};
use plan::{Context, ObjectAct, ObjectName};
use report::Report;

/// Why a run did not finish. What it did before is durable and the next run goes on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LifecycleError {
    #[error("retention policy: {0}")]
    Policy(#[source] PolicyErrors),
    #[error("legal holds: {0}")]
    Holds(#[source] PolicyErrors),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("object {name}: {source}")]
    Object {
        name: String,
        source: object_store::Error,
    },
    #[error("the store part of the run failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    #[error("retention run audit record: {0}")]
    Audit(#[from] vitalmq_audit::AuditError),
}

/// An objects sink the job enforces retention on, with the purpose it serves.
#[derive(Debug, Clone)]
pub struct ObjectsTarget {
    pub sink: Arc<ObjectStoreSink>,
    pub purpose: Purpose,
}

/// What a run needs besides `now`.
#[derive(Debug, Clone)]
pub struct Job {
    /// The `vitalmq-retention/v1` file.
    pub retention: PathBuf,
    /// The `vitalmq-holds/v1` file, if any.
    pub holds: Option<PathBuf>,
    /// Rows per store transaction.
    pub batch: usize,
    /// The bridge's data directory (its store).
    pub data_dir: PathBuf,
    /// Every configured sink: an event is acted on only once all confirmed it.
    pub sinks: Vec<String>,
    /// The objects sinks of purpose care: an event has an archive copy once all
    /// confirmed it (none: nothing has).
    pub care_objects: Vec<String>,
    /// Every alert handler: an alert is acted on only once all confirmed it.
    pub handlers: Vec<String>,
    /// The objects sinks whose objects are subject to retention.
    pub objects: Vec<ObjectsTarget>,
    /// With `[encryption]`: sealed payloads are opened (to anonymize, and to find the
    /// patient of rows from before schema v4) and anonymized ones sealed again.
    pub keyring: Option<Arc<vitalmq_keyring::Keyring>>,
}

/// The result of one run.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub report: Report,
    pub policy_sha256: String,
    pub holds_sha256: String,
    pub now: u64,
    pub dry_run: bool,
}

impl RunOutcome {
    /// The bridge's audit record of the run.
    pub fn record(&self) -> vitalmq_audit::AuditRecord {
        self.report.record(
            &self.policy_sha256,
            &self.holds_sha256,
            self.now,
            self.dry_run,
        )
    }
}

/// Called after each store transaction (tests stop a run there).
pub type BatchHook = Arc<dyn Fn(usize) + Send + Sync>;

/// One run at `now`. `dry_run` plans and reports without acting.
pub async fn run_once(
    job: &Job,
    now: u64,
    dry_run: bool,
    hook: Option<BatchHook>,
) -> Result<RunOutcome, LifecycleError> {
    let policy = RetentionPolicy::load(&job.retention).map_err(LifecycleError::Policy)?;
    let holds = match &job.holds {
        Some(path) => LegalHolds::load(path).map_err(LifecycleError::Holds)?,
        None => LegalHolds::none(),
    };
    let (policy, holds) = (Arc::new(policy), Arc::new(holds));
    let store_job = job.clone();
    let (p, h) = (Arc::clone(&policy), Arc::clone(&holds));
    let mut report = tokio::task::spawn_blocking(move || {
        let mut store = Store::open(&store_job.data_dir)?;
        if let Some(k) = &store_job.keyring {
            store = store.with_keyring(Arc::clone(k));
        }
        run_store(&store_job, &mut store, &p, &h, now, dry_run, hook.as_ref())
    })
    .await
    .map_err(LifecycleError::Task)??;
    for target in &job.objects {
        run_objects(target, &policy, &holds, now, dry_run, &mut report).await?;
    }
    Ok(RunOutcome {
        report,
        policy_sha256: policy.sha256().to_owned(),
        holds_sha256: holds.sha256().to_owned(),
        now,
        dry_run,
    })
}

/// The store part of a run.
fn run_store(
    job: &Job,
    store: &mut Store,
    policy: &RetentionPolicy,
    holds: &LegalHolds,
    now: u64,
    dry_run: bool,
    hook: Option<&BatchHook>,
) -> Result<Report, LifecycleError> {
    let ctx = Context {
        policy,
        holds,
        now,
        sinks_through: store.confirmed_by_sinks(&job.sinks)?,
        archived_through: store.confirmed_by_sinks(&job.care_objects)?,
        handlers_through: store.confirmed_by_handlers(&job.handlers)?,
    };
    let batch = job.batch.max(1);
    let mut report = Report::default();
    let mut batches = 0;
    let mut apply = |store: &mut Store, acts: Vec<crate::store::StoreAct>| {
        if dry_run || acts.is_empty() {
            return Ok::<_, LifecycleError>(());
        }
        store.apply_retention(&acts)?;
        batches += 1;
        if let Some(hook) = hook {
            hook(batches);
        }
        Ok(())
    };
    let mut after = 0;
    loop {
        let rows = store.retention_events(after, batch)?;
        let Some(last) = rows.last() else { break };
        after = last.position;
        let acts = rows
            .iter()
            .filter_map(|r| plan::event(&ctx, r, &mut report))
            .collect();
        apply(store, acts)?;
    }
    let mut after = 0;
    loop {
        // Each alert comes whole (all its states), with its first state's page.
        let page = store.retention_alerts(after, batch)?;
        let Some(last) = page.last else { break };
        after = last;
        let acts = page
            .alerts
            .iter()
            .flat_map(|rows| plan::alert(&ctx, rows, &mut report))
            .collect();
        apply(store, acts)?;
    }
    let mut after = 0;
    loop {
        let rows = store.retention_scores(after, batch)?;
        let Some(last) = rows.last() else { break };
        after = last.id;
        let acts = rows
            .iter()
            .filter_map(|r| plan::score(&ctx, r, &mut report))
            .collect();
        apply(store, acts)?;
    }
    let mut after = 0;
    loop {
        // Each shadow alert episode comes whole, with its first change's page.
        let page = store.retention_shadow_alerts(after, batch)?;
        let Some(last) = page.last else { break };
        after = last;
        let acts = page
            .alerts
            .iter()
            .flat_map(|rows| plan::shadow_alert(&ctx, rows, &mut report))
            .collect();
        apply(store, acts)?;
    }
    let mut after = 0;
    loop {
        let rows = store.retention_quarantine(after, batch)?;
        let Some(last) = rows.last() else { break };
        after = last.id;
        let acts = rows
            .iter()
            .filter_map(|r| plan::quarantine(&ctx, r, &mut report))
            .collect();
        apply(store, acts)?;
    }
    Ok(report)
}

/// The objects part of a run, for one sink.
async fn run_objects(
    target: &ObjectsTarget,
    policy: &RetentionPolicy,
    holds: &LegalHolds,
    now: u64,
    dry_run: bool,
    report: &mut Report,
) -> Result<(), LifecycleError> {
    let ctx = Context {
        policy,
        holds,
        now,
        sinks_through: None,
        archived_through: None,
        handlers_through: None,
    };
    let sink = &target.sink;
    for under in ["raw", "normalized", "audit"] {
        for full in sink.list_objects(under).await? {
            let Some(name) = ObjectName::parse(&full) else {
                continue;
            };
            if plan::archived(policy, &name.relative) {
                continue;
            }
            let Some(act) = plan::object(&ctx, &name, target.purpose, report) else {
                continue;
            };
            report.objects.insert(full.clone());
            if dry_run {
                continue;
            }
            let location = ObjectPath::from(full.as_str());
            if let ObjectAct::Move(to) = &act {
                // Copy first, durably; the original goes only after.
                let bytes = sink
                    .store()
                    .get(&location)
                    .await
                    .map_err(|source| LifecycleError::Object {
                        name: full.clone(),
                        source,
                    })?
                    .bytes()
                    .await
                    .map_err(|source| LifecycleError::Object {
                        name: full.clone(),
                        source,
                    })?;
                let relative = to.strip_prefix(&name.prefix).unwrap_or(to);
                sink.put_durable(relative, bytes).await?;
            }
            match sink.store().delete(&location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(source) => return Err(LifecycleError::Object { name: full, source }),
            }
        }
    }
    Ok(())
}

/// Runs the job every `every` until `stop` turns true, taking `now` from `clock` (the
/// wall clock in the bridge, a fixed one in tests); each run's record goes to `auditor`.
/// A failed run is logged and retried at the next tick.
pub async fn schedule(
    job: Job,
    every: Duration,
    clock: impl Fn() -> u64 + Send,
    auditor: vitalmq_audit::Auditor,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(every.max(Duration::from_millis(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        match run_once(&job, clock(), false, None).await {
            Ok(outcome) => {
                tracing::info!(
                    acted = outcome.report.acted.values().map(|t| t.count).sum::<u64>(),
                    held = outcome.report.held.values().sum::<u64>(),
                    objects = outcome.report.objects.len(),
                    held_by_patient_hold_without_range = outcome.report.patient_hold_without_range,
                    "retention run done"
                );
                if let Err(e) = auditor.record(outcome.record()) {
                    tracing::warn!(error = %e, "retention run not audited");
                }
            }
            Err(e) => tracing::warn!(error = %e, "retention run failed; retried at the next"),
        }
    }
}

/// The wall clock, in milliseconds since the Unix epoch.
pub fn wall_clock() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The job `config` describes (`None` without `[lifecycle]`), over objects sinks of
/// its own (they write to the same places as the drains').
pub fn job_of(config: &BridgeConfig) -> Result<Option<(Job, Duration)>, RunError> {
    let Some(l) = &config.lifecycle else {
        return Ok(None);
    };
    let mut objects = Vec::new();
    let mut care_objects = Vec::new();
    for s in &config.sinks {
        if let SinkConfig::Objects { name, .. } = s {
            // Retention lists, copies and deletes objects; it never opens them.
            if let (_, Some(sink)) = crate::run::build_sink(s, None, None)? {
                objects.push(ObjectsTarget {
                    sink,
                    purpose: s.purpose(),
                });
            }
            if s.purpose() == Purpose::Care {
                care_objects.push(name.clone());
            }
        }
    }
    let handlers = config
        .alerts
        .as_ref()
        .map(crate::run::handler_names)
        .unwrap_or_default();
    let job = Job {
        retention: l.retention.clone(),
        holds: l.holds.clone(),
        batch: l.batch,
        data_dir: config.data_dir.clone(),
        sinks: config.sinks.iter().map(|s| s.name().to_owned()).collect(),
        care_objects,
        handlers,
        objects,
        keyring: crate::run::open_keyring(config)?,
    };
    Ok(Some((job, l.every())))
}

/// Starts the scheduled job of `config` on the wall clock; without `[lifecycle]` says
/// once that nothing is deleted.
pub fn spawn(
    config: &BridgeConfig,
    auditor: &vitalmq_audit::Auditor,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), RunError> {
    match job_of(config)? {
        None => {
            tracing::info!("retention off: no [lifecycle] in the configuration, nothing is deleted")
        }
        Some((job, every)) => {
            if let Some(holds) = &job.holds {
                create_empty_holds(holds)?;
            }
            tracing::info!(every_s = every.as_secs(), retention = %job.retention.display(), "retention job on");
            tokio::spawn(schedule(job, every, wall_clock, auditor.clone(), stop));
        }
    }
    Ok(())
}

/// Creates the deployment's holds file, holding no hold, when it does not exist yet: a
/// named but missing file fails closed (no retention run, no erasure: no hold could be
/// ruled out), so a deployment that never placed a hold would never delete anything.
fn create_empty_holds(path: &std::path::Path) -> Result<(), RunError> {
    use std::io::Write as _;
    let io = |source| RunError::HoldsFile {
        path: path.to_path_buf(),
        source,
    };
    vitalmq_private_fs::create_parent(path).map_err(io)?;
    match vitalmq_private_fs::create_options()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(mut file) => {
            file.write_all(b"# vitalmq legal holds: `vitalmq hold place|lift|list`\nformat = \"vitalmq-holds/v1\"\n")
                .and_then(|()| file.sync_all())
                .map_err(io)?;
            tracing::info!(holds = %path.display(), "no legal holds file yet: made one holding no hold");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod score_tests;
#[cfg(test)]
mod shadow_alert_tests;
