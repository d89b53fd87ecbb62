//! Alert rules and the device registry change without a restart: each file is reloaded
//! when it changes on disk or on SIGHUP. A file with a mistake is refused (the error
//! names file and line) and what is in force stays; every reload and refusal is audited
//! with the old and new SHA-256.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info};
use vitalmq_audit::{AuditRecord, Auditor, Component, Decision, Event};
use vitalmq_policies::{DeviceRegistry, ModelRegistry, PolicyErrors, RuleSet};

/// Keeps the rule set current; drop the returned watcher to stop watching the file.
#[derive(Debug)]
pub struct RulesWatch {
    pub rules: watch::Receiver<Arc<RuleSet>>,
    _watcher: Option<notify::RecommendedWatcher>,
}

/// Starts watching `path` (already loaded as `initial`).
/// The escalation handlers `rules` names that the bridge does not have (`handlers` are
/// the bridge's: `mqtt`, `webhook:<name>`); a rule set naming one is refused, at start
/// and on reload, so no escalation level can go nowhere.
pub fn unknown_handlers(rules: &RuleSet, handlers: &[String]) -> Vec<String> {
    rules
        .handler_names()
        .into_iter()
        .filter(|n| !handlers.iter().any(|h| h == n))
        .map(str::to_owned)
        .collect()
}

/// With `[alerts] candidates`: the base rule set and the models file in force, shared
/// by their two watchers, so a reload of either is checked
/// ([`check_rule_sets`](crate::rollout::check_rule_sets)) against the other one in
/// force and refused (`models_rule_sets_mismatch`) when they would not fit.
#[derive(Debug, Clone)]
pub struct RuleSetGuard {
    inner: Arc<std::sync::Mutex<InForce>>,
}

#[derive(Debug)]
struct InForce {
    /// The rule set's registry name at start: the running versions are looked up
    /// under it, so a reload may not move them to another name.
    model: String,
    base_path: String,
    base: Arc<RuleSet>,
    /// `(path, rule set)`, loaded at start (not reloaded).
    candidates: Vec<(String, Arc<RuleSet>)>,
    models: Arc<ModelRegistry>,
}

impl RuleSetGuard {
    pub fn new(
        model: String,
        base_path: String,
        base: Arc<RuleSet>,
        candidates: Vec<(String, Arc<RuleSet>)>,
        models: Arc<ModelRegistry>,
    ) -> Self {
        Self {
            inner: Arc::new(std::sync::Mutex::new(InForce {
                model,
                base_path,
                base,
                candidates,
                models,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InForce> {
        // A panic while holding it leaves plain data behind: still usable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn check(
        f: &InForce,
        base: &RuleSet,
        models: &ModelRegistry,
    ) -> Result<(), crate::rollout::RuleSetsError> {
        let sets: Vec<(&str, &RuleSet)> = std::iter::once((f.base_path.as_str(), base))
            .chain(f.candidates.iter().map(|(p, s)| (p.as_str(), s.as_ref())))
            .collect();
        let model = crate::rollout::check_rule_sets(&sets, models)?;
        if model != f.model {
            return Err(crate::rollout::RuleSetsError::Renamed {
                model,
                was: f.model.clone(),
            });
        }
        Ok(())
    }

    /// Takes `models` into force if the rule sets in force fit it.
    fn try_models(&self, models: &Arc<ModelRegistry>) -> Result<(), crate::rollout::RuleSetsError> {
        let mut f = self.lock();
        Self::check(&f, &f.base, models)?;
        f.models = Arc::clone(models);
        Ok(())
    }

    /// Takes the base rule set `rules` into force if it fits the models in force.
    fn try_base(&self, rules: &Arc<RuleSet>) -> Result<(), crate::rollout::RuleSetsError> {
        let mut f = self.lock();
        Self::check(&f, rules, &f.models)?;
        f.base = Arc::clone(rules);
        Ok(())
    }
}

/// Starts watching the rule set at `path` (already loaded as `initial`). With
/// candidates (`rule_sets`), a rule set the models file in force does not fit is
/// refused (`models_rule_sets_mismatch`).
pub fn watch_rules(
    path: PathBuf,
    initial: Arc<RuleSet>,
    handlers: Vec<String>,
    auditor: Auditor,
    rule_sets: Option<RuleSetGuard>,
) -> RulesWatch {
    let (tx, rx) = watch::channel(initial);
    let (trigger, mut triggers) = mpsc::channel::<()>(1);
    let watcher = file_watcher(&path, trigger.clone());
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    tokio::spawn(async move {
        while next_trigger(&mut triggers, &mut hup, tx.closed(), None).await {
            let old = tx.borrow().sha256().to_owned();
            let path2 = path.clone();
            let loaded = tokio::task::spawn_blocking(move || RuleSet::load(&path2)).await;
            match loaded {
                Ok(Ok(rules)) => {
                    if rules.sha256() == old {
                        continue;
                    }
                    let unknown = unknown_handlers(&rules, &handlers);
                    if !unknown.is_empty() {
                        error!(rules = %path.display(), unknown = ?unknown, "alert rules name handlers this bridge does not have; the rules in force stay");
                        let _ = auditor.record(
                            rejected(&path, old, "unknown_handler")
                                .detail("unknown_handlers", unknown),
                        );
                        continue;
                    }
                    let rules = Arc::new(rules);
                    if let Some(g) = &rule_sets
                        && let Err(e) = g.try_base(&rules)
                    {
                        error!(rules = %path.display(), error = %e, "alert rules refused: the models file does not fit them with the candidates; the rules in force stay");
                        let _ = auditor.record(
                            rejected(&path, old, "models_rule_sets_mismatch")
                                .detail("error", e.to_string())
                                .detail("refused_sha256", rules.sha256().to_owned()),
                        );
                        continue;
                    }
                    info!(rules = %path.display(), old = %old, new = %rules.sha256(), "alert rules reloaded");
                    let _ = auditor.record(
                        reloaded(&path, old, rules.sha256())
                            .detail("rules_version", rules.version()),
                    );
                    let _ = tx.send(rules);
                }
                Ok(Err(e)) => {
                    error!(rules = %path.display(), error = %e, "alert rules refused; the rules in force stay");
                    let _ = auditor.record(
                        rejected(&path, old, "invalid_rules").detail("error", e.to_string()),
                    );
                }
                Err(e) => error!(error = %e, "rule reload task failed"),
            }
        }
    });
    drop(trigger);
    RulesWatch {
        rules: rx,
        _watcher: watcher,
    }
}

/// Keeps the model registry current; drop it to stop watching the file.
#[derive(Debug)]
pub struct ModelsWatch {
    pub models: watch::Receiver<Arc<ModelRegistry>>,
    _watcher: Option<notify::RecommendedWatcher>,
}

/// Starts watching the models file `path` (already loaded as `initial`): reloaded on
/// change or SIGHUP, audited `policy_reloaded` (old and new SHA-256) or
/// `policy_rejected` (`invalid_models`, the registry in force stays). A registry the
/// loaded score `tables` do not fit (`rollout::check_tables`) is refused the same way,
/// reason `models_tables_mismatch`, and one the rule sets do not fit (`rule_sets`,
/// with candidates) reason `models_rule_sets_mismatch`.
pub fn watch_models(
    path: PathBuf,
    initial: Arc<ModelRegistry>,
    tables: Vec<crate::score::ScoreModel>,
    auditor: Auditor,
    rule_sets: Option<RuleSetGuard>,
) -> ModelsWatch {
    let (tx, rx) = watch::channel(initial);
    let (trigger, mut triggers) = mpsc::channel::<()>(1);
    let watcher = file_watcher(&path, trigger.clone());
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    tokio::spawn(async move {
        while next_trigger(&mut triggers, &mut hup, tx.closed(), None).await {
            let old = tx.borrow().sha256().to_owned();
            let path2 = path.clone();
            let loaded = tokio::task::spawn_blocking(move || ModelRegistry::load(&path2)).await;
            match loaded {
                Ok(Ok(models)) => {
                    if models.sha256() == old {
                        continue;
                    }
                    if !tables.is_empty()
                        && let Err(e) = crate::rollout::check_tables(&tables, &models)
                    {
                        error!(models = %path.display(), error = %e, "model registry refused: the score tables do not fit it; the one in force stays");
                        let _ = auditor.record(
                            rejected(&path, old, "models_tables_mismatch")
                                .detail("error", e.to_string())
                                .detail("refused_sha256", models.sha256().to_owned()),
                        );
                        continue;
                    }
                    let models = Arc::new(models);
                    if let Some(g) = &rule_sets
                        && let Err(e) = g.try_models(&models)
                    {
                        error!(models = %path.display(), error = %e, "model registry refused: the rule sets do not fit it; the one in force stays");
                        let _ = auditor.record(
                            rejected(&path, old, "models_rule_sets_mismatch")
                                .detail("error", e.to_string())
                                .detail("refused_sha256", models.sha256().to_owned()),
                        );
                        continue;
                    }
                    info!(models = %path.display(), old = %old, new = %models.sha256(), "model registry reloaded");
                    let transitions = crate::rollout::transitions(&tx.borrow(), &models);
                    let _ = auditor.record(
                        reloaded(&path, old.clone(), models.sha256())
                            .detail("unapproved_alarms", models.unapproved_alarms().as_str())
                            .detail("rollout_transitions", transitions.len()),
                    );
                    // One record per role that changed (issue 21: every transition
                    // audited, rollbacks included).
                    for t in &transitions {
                        info!(model = %t.model, version = %t.version, scope = %t.scope, old_role = ?t.old, new_role = ?t.new, "rollout transition");
                        let _ =
                            auditor.record(crate::rollout::audit_record(t, &old, models.sha256()));
                    }
                    let _ = tx.send(models);
                }
                Ok(Err(e)) => {
                    error!(models = %path.display(), error = %e, "model registry refused; the one in force stays");
                    let _ = auditor.record(
                        rejected(&path, old, "invalid_models").detail("error", e.to_string()),
                    );
                }
                Err(e) => error!(error = %e, "model registry reload task failed"),
            }
        }
    });
    drop(trigger);
    ModelsWatch {
        models: rx,
        _watcher: watcher,
    }
}

/// The audit record of a policy file refused on reload (`reason`), naming the one that
/// stays in force.
fn rejected(path: &Path, in_force: impl Into<String>, reason: &str) -> AuditRecord {
    AuditRecord::new(Component::Bridge, Event::PolicyRejected)
        .resource(path.display().to_string())
        .decision(Decision::Deny)
        .policy_sha256(in_force)
        .reason(reason)
}

/// The audit record of a policy file taken into force on reload.
fn reloaded(path: &Path, old: impl Into<String>, new: impl Into<String> + Clone) -> AuditRecord {
    AuditRecord::new(Component::Bridge, Event::PolicyReloaded)
        .resource(path.display().to_string())
        .decision(Decision::Allow)
        .policy_sha256(new.clone())
        .detail("old_sha256", old.into())
        .detail("new_sha256", new.into())
}

/// Waits for a file change or SIGHUP, then lets an editor finish writing and swallows
/// the burst of events it made; false once nobody reads what is reloaded (`stop`).
/// Without a file watcher (`triggers` closed at once) SIGHUP still reloads.
///
/// With `poll`, it also fires when that long passed without either.
async fn next_trigger(
    triggers: &mut mpsc::Receiver<()>,
    hup: &mut Option<tokio::signal::unix::Signal>,
    stop: impl std::future::Future<Output = ()>,
    poll: Option<Duration>,
) -> bool {
    tokio::pin!(stop);
    let mut watching = !triggers.is_closed();
    loop {
        let fired = async {
            match hup.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            t = triggers.recv(), if watching => match t {
                Some(()) => break,
                None => watching = false,
            },
            Some(()) = fired => break,
            () = tokio::time::sleep(poll.unwrap_or(Duration::MAX)), if poll.is_some() => break,
            () = &mut stop => return false,
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    while triggers.try_recv().is_ok() {}
    true
}

/// A registry as read from its file, with the file's SHA-256 (hex): what the audit
/// records name, and how a reload tells a real change from a touched file.
#[derive(Debug, Clone)]
pub struct LoadedRegistry {
    pub registry: Arc<DeviceRegistry>,
    pub sha256: String,
}

/// Reads and validates the registry file (all of it or nothing).
pub fn load_registry(path: &std::path::Path) -> Result<LoadedRegistry, PolicyErrors> {
    // Read once and hash the bytes that were parsed, so the recorded hash is the
    // registry in force even when the file changes again meanwhile.
    let bytes = std::fs::read(path).map_err(|e| {
        PolicyErrors(vec![vitalmq_policies::PolicyError {
            file: path.to_path_buf(),
            line: None,
            field: None,
            message: format!("cannot read: {e}"),
        }])
    })?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let text = String::from_utf8(bytes).map_err(|e| {
        PolicyErrors(vec![vitalmq_policies::PolicyError {
            file: path.to_path_buf(),
            line: None,
            field: None,
            message: format!("not UTF-8: {e}"),
        }])
    })?;
    let registry = DeviceRegistry::parse(&text, path)?;
    Ok(LoadedRegistry {
        registry: Arc::new(registry),
        sha256,
    })
}

/// Keeps the device registry current; drop it to stop watching the file.
#[derive(Debug)]
pub struct RegistryWatch {
    pub registry: watch::Receiver<Arc<DeviceRegistry>>,
    /// True while the last reload attempt failed (the file unreadable, invalid, or
    /// naming another trust domain): the registry in force may hold a consent since
    /// withdrawn, so sinks and handlers of purposes other than care pause (fail
    /// closed) until a reload succeeds. Care goes on under the registry in force.
    pub stale: watch::Receiver<bool>,
    _watcher: Option<notify::RecommendedWatcher>,
}

/// How often the registry file is read again while the last reload failed, or when
/// there is no file watcher (a change would otherwise wait for SIGHUP).
pub const REGISTRY_POLL: Duration = Duration::from_secs(2);

/// Starts watching the registry at `path` (already loaded as `initial`). The
/// `vitalmq registry` commands write it by rename, which the directory watch sees; a
/// registry that does not validate is refused whole and the one in force stays.
///
/// Without a file watcher the file is read every [`REGISTRY_POLL`]; while the last
/// reload failed, too, so a fixed file is picked up even if no change is seen.
pub fn watch_registry(path: PathBuf, initial: LoadedRegistry, auditor: Auditor) -> RegistryWatch {
    let (tx, rx) = watch::channel(initial.registry);
    let (stale_tx, stale_rx) = watch::channel(false);
    let (trigger, mut triggers) = mpsc::channel::<()>(1);
    let watcher = file_watcher(&path, trigger.clone());
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut in_force = initial.sha256;
    let watched = watcher.is_some();
    // The refusal last logged and audited: while stale the file is polled, and the
    // same refusal found again is not news (it would chain a record every poll).
    let mut refused_last: Option<Refusal> = None;
    tokio::spawn(async move {
        loop {
            let poll = (!watched || *stale_tx.borrow()).then_some(REGISTRY_POLL);
            if !next_trigger(&mut triggers, &mut hup, tx.closed(), poll).await {
                break;
            }
            let path2 = path.clone();
            // Fail closed until this attempt succeeds.
            let loaded = tokio::task::spawn_blocking(move || {
                let loaded = load_registry(&path2);
                // What was refused, to tell a new refusal from the same one again.
                let digest = loaded.is_err().then(|| {
                    std::fs::read(&path2)
                        .ok()
                        .map(|b| hex::encode(Sha256::digest(&b)))
                });
                (loaded, digest.flatten())
            })
            .await
            .map(|(loaded, digest)| loaded.map_err(|e| (e, digest)));
            let refused = !matches!(&loaded, Ok(Ok(l)) if l.registry.trust_domain() == tx.borrow().trust_domain());
            // Stale at once on a failure; fresh only once the new registry is in force,
            // so nothing paused resumes under the old one.
            let fresh = || stale_tx.send_if_modified(|stale| std::mem::replace(stale, false));
            if refused {
                stale_tx.send_if_modified(|stale| !std::mem::replace(stale, true));
            }
            match loaded {
                Ok(Ok(loaded)) => {
                    if loaded.sha256 == in_force {
                        refused_last = None;
                        fresh();
                        continue;
                    }
                    let domain = tx.borrow().trust_domain().clone();
                    if loaded.registry.trust_domain() != &domain {
                        let refusal = Refusal::TrustDomain {
                            sha256: loaded.sha256.clone(),
                        };
                        if refused_last.as_ref() == Some(&refusal) {
                            debug!(registry = %path.display(), "device registry still names another trust domain");
                            continue;
                        }
                        refused_last = Some(refusal);
                        // The bridge's own identity and every SPIFFE check were made
                        // for the domain it started with.
                        error!(registry = %path.display(), "device registry names another trust domain; the registry in force stays (restart to change it)");
                        let _ = auditor.record(
                            rejected(&path, in_force.clone(), "trust_domain_changed")
                                .detail("new_sha256", loaded.sha256)
                                .detail(
                                    "new_trust_domain",
                                    loaded.registry.trust_domain().to_string(),
                                ),
                        );
                        continue;
                    }
                    let devices = loaded.registry.devices().count();
                    info!(registry = %path.display(), old = %in_force, new = %loaded.sha256, devices, "device registry reloaded");
                    let _ = auditor.record(
                        reloaded(&path, in_force.clone(), loaded.sha256.clone())
                            .detail("devices", devices),
                    );
                    in_force = loaded.sha256;
                    refused_last = None;
                    let _ = tx.send(loaded.registry);
                    fresh();
                }
                Ok(Err((e, sha256))) => {
                    let refusal = Refusal::Invalid {
                        sha256,
                        error: e.to_string(),
                    };
                    if refused_last.as_ref() == Some(&refusal) {
                        debug!(registry = %path.display(), "device registry still refused");
                        continue;
                    }
                    refused_last = Some(refusal);
                    error!(registry = %path.display(), error = %e, "device registry refused; the registry in force stays");
                    let _ = auditor.record(
                        rejected(&path, in_force.clone(), "invalid_registry")
                            .detail("error", e.to_string()),
                    );
                }
                Err(e) => error!(error = %e, "registry reload task failed"),
            }
        }
    });
    drop(trigger);
    RegistryWatch {
        registry: rx,
        stale: stale_rx,
        _watcher: watcher,
    }
}

/// Why a registry reload was refused: the file's SHA-256 (none when it could not be
/// read) with the error, or the digest of a registry naming another trust domain.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    Invalid {
        sha256: Option<String>,
        error: String,
    },
    TrustDomain {
        sha256: String,
    },
}

/// Raises `ops/bridge/registry_stale` while `stale` is true (the last reload of the
/// registry at `path` failed) and resolves it when a reload succeeds; runs until the
/// registry watch ends.
pub async fn report_stale(
    mut stale: watch::Receiver<bool>,
    path: PathBuf,
    ops: mpsc::UnboundedSender<crate::ops::OpsAlert>,
) {
    let mut episodes = crate::ops::Episodes::default();
    let subject = "registry";
    loop {
        let now = crate::recorder::now_ms();
        let alert = if *stale.borrow_and_update() {
            let mut details = serde_json::Map::new();
            details.insert("registry".into(), path.display().to_string().into());
            error!(registry = %path.display(), "registry reload failed: sinks and alert handlers of purposes other than care are paused until a reload succeeds");
            episodes.raise(
                crate::ops::OpsKind::RegistryStale,
                subject,
                "registry_reload_failed",
                details,
                now,
            )
        } else {
            episodes
                .resolve(crate::ops::OpsKind::RegistryStale, subject, now)
                .inspect(|_| info!(registry = %path.display(), "registry reloaded: paused sinks and alert handlers resume"))
        };
        if let Some(a) = alert {
            let _ = ops.send(a);
        }
        if stale.changed().await.is_err() {
            return;
        }
    }
}

fn file_watcher(
    path: &std::path::Path,
    trigger: mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let name = path.file_name()?.to_owned();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if (event.kind.is_modify() || event.kind.is_create())
            && event
                .paths
                .iter()
                .any(|p| p.file_name() == Some(name.as_os_str()))
        {
            let _ = trigger.try_send(());
        }
    })
    .map_err(|e| tracing::warn!(error = %e, "file watching unavailable; SIGHUP still reloads"))
    .ok()?;
    // The directory, not the file: editors replace files by rename.
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch");
    }
    Some(watcher)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use vitalmq_envelope::{Algorithm, DeviceId, SigningKey};
    use vitalmq_policies::{DeviceRegistry, RuleSet, Use};

    use super::{load_registry, unknown_handlers, watch_registry};

    /// A v2 registry: `dev-1` worn by `patient` on `north` from 2025 on.
    fn registry_text(key_hex: &str, domain: &str, patient: &str) -> String {
        format!(
            "format = \"vitalmq-registry/v2\"\ntrust_domain = \"{domain}\"\n[[devices]]\nid = \"dev-1\"\nalg = \"EdDSA\"\npublic_key = \"{key_hex}\"\n[[devices.assignments]]\nvalid_from = \"2025-01-01T00:00:00Z\"\npatient_ref = \"{patient}\"\nsite = \"north\"\n"
        )
    }

    /// Writes `text` over `path` as the `vitalmq registry` commands do: by rename.
    fn replace(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, path).expect("rename");
    }

    /// Polls the audit log until a line contains `needle`.
    async fn audited(log: &Path, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                return line.to_owned();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no audit record with {needle}: {text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn patient(registry: &DeviceRegistry) -> String {
        let dev = DeviceId::new("dev-1").expect("id");
        match registry
            .assignment_at(&dev, 1_750_000_000_000)
            .map(|a| a.serves.clone())
        {
            Some(Use::Assigned { patient_ref, .. }) => patient_ref,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_registry_reloads_on_change_and_a_bad_one_is_refused_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("registry.toml");
        let log = dir.path().join("audit.jsonl");
        let key = SigningKey::generate(Algorithm::EdDsa)
            .expect("key")
            .verifying_key()
            .to_hex();
        std::fs::write(&path, registry_text(&key, "test.vitalmq", "pt-a")).expect("write");
        let audit = vitalmq_audit::AuditLog::open(&log, 64).expect("audit");
        let initial = load_registry(&path).expect("valid");
        let first_sha = initial.sha256.clone();
        let mut watch = watch_registry(path.clone(), initial, audit.auditor());

        replace(&path, &registry_text(&key, "test.vitalmq", "pt-b"));
        tokio::time::timeout(Duration::from_secs(10), watch.registry.changed())
            .await
            .expect("reloaded in time")
            .expect("watch open");
        assert_eq!(patient(&watch.registry.borrow_and_update()), "pt-b");
        let line = audited(&log, "policy_reloaded").await;
        assert!(line.contains(&first_sha), "old hash recorded: {line}");

        // A broken file and one naming another trust domain: refused, audited, and
        // the registry in force stays.
        assert!(!*watch.stale.borrow(), "reloaded: not stale");
        replace(&path, "format = \"vitalmq-registry/v2\"\ntrust_domain = ");
        let line = audited(&log, "invalid_registry").await;
        assert!(line.contains("policy_rejected"), "{line}");
        stale_turns(&mut watch.stale, true).await;
        replace(&path, &registry_text(&key, "other.vitalmq", "pt-c"));
        audited(&log, "trust_domain_changed").await;
        assert!(!watch.registry.has_changed().expect("open"));
        assert_eq!(patient(&watch.registry.borrow()), "pt-b");
        assert!(*watch.stale.borrow(), "still not reloaded: still stale");

        // Fixed: reloaded, no longer stale.
        replace(&path, &registry_text(&key, "test.vitalmq", "pt-d"));
        stale_turns(&mut watch.stale, false).await;
        assert_eq!(patient(&watch.registry.borrow()), "pt-d");
        drop(audit);
    }

    /// Counts the audit records holding `needle` once there are at least `want`,
    /// waiting (the clock is paused) with a real-time deadline.
    /// The models file reloads on change, audited with both hashes; a broken one is
    /// refused (audited, the registry in force stays).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_models_file_reloads_and_a_bad_one_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("models.toml");
        let log = dir.path().join("audit.jsonl");
        let text = include_str!("../../policies/examples/models.toml");
        std::fs::write(&path, text).expect("write");
        let audit = vitalmq_audit::AuditLog::open(&log, 64).expect("audit");
        let initial =
            std::sync::Arc::new(vitalmq_policies::ModelRegistry::load(&path).expect("valid"));
        let first_sha = initial.sha256().to_owned();
        let mut watch =
            super::watch_models(path.clone(), initial, Vec::new(), audit.auditor(), None);

        let approved = text.replacen(
            "status = \"draft\"",
            "status = \"approved\"\napproved_by = \"board\"\napproved_at = \"2026-01-01T00:00:00Z\"",
            1,
        );
        replace(&path, &approved);
        tokio::time::timeout(Duration::from_secs(10), watch.models.changed())
            .await
            .expect("reloaded in time")
            .expect("watch open");
        let fresh = std::sync::Arc::clone(&watch.models.borrow_and_update());
        assert!(
            fresh
                .entry("arrhythmia-net", "2.2.0-rc1")
                .is_some_and(|e| e.approval.is_approved())
        );
        let line = audited(&log, "policy_reloaded").await;
        assert!(
            line.contains(&first_sha) && line.contains(fresh.sha256()),
            "{line}"
        );

        replace(
            &path,
            "format = \"vitalmq-models/v1\"\n[[models]]\nname = 1\n",
        );
        let line = audited(&log, "invalid_models").await;
        assert!(
            line.contains("policy_rejected") && line.contains(fresh.sha256()),
            "{line}"
        );
        assert!(!watch.models.has_changed().expect("open"));
        drop(audit);
    }

    /// A models file the loaded score tables do not fit (here a canary version no
    /// table has) is refused on reload, audited; the registry in force stays.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_models_file_the_score_tables_do_not_fit_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("models.toml");
        let log = dir.path().join("audit.jsonl");
        let text = include_str!("../../policies/examples/models.toml");
        std::fs::write(&path, text).expect("write");
        let audit = vitalmq_audit::AuditLog::open(&log, 64).expect("audit");
        let initial =
            std::sync::Arc::new(vitalmq_policies::ModelRegistry::load(&path).expect("valid"));
        let table = vitalmq_policies::ScoreTable::parse(
            include_str!("../../policies/examples/news2.toml"),
            Path::new("news2.toml"),
        )
        .expect("table");
        let tables = vec![crate::score::ScoreModel {
            table: std::sync::Arc::new(table),
            path: "news2.toml".into(),
        }];
        crate::rollout::check_tables(&tables, &initial).expect("the shipped pair fits");
        let in_force = initial.sha256().to_owned();
        let watch = super::watch_models(path.clone(), initial, tables, audit.auditor(), None);
        let unloaded_canary = text.replace(
            "[[rollout]]\nmodel = \"news2\"\nlive = \"rcp-2017.1\"",
            &format!(
                "[[models]]\nname = \"news2\"\nversion = \"cand-9\"\nkind = \"score\"\n\
                 artifact_sha256 = \"{}\"\nlineage = \"t\"\nfeature_pipeline = \"f\"\n\
                 intended_use = \"t\"\nstatus = \"approved\"\napproved_by = \"board\"\n\
                 approved_at = \"2026-01-01T00:00:00Z\"\n\n\
                 [[rollout]]\nmodel = \"news2\"\nlive = \"rcp-2017.1\"\n\
                 canary = [{{ version = \"cand-9\", sites = [\"site-01\"] }}]",
                "0".repeat(64)
            ),
        );
        vitalmq_policies::ModelRegistry::parse(&unloaded_canary, Path::new("m.toml"))
            .expect("a valid models file by itself");
        replace(&path, &unloaded_canary);
        let line = audited(&log, "models_tables_mismatch").await;
        assert!(
            line.contains("policy_rejected") && line.contains(&in_force) && line.contains("cand-9"),
            "{line}"
        );
        assert!(!watch.models.has_changed().expect("open"));
        assert_eq!(watch.models.borrow().sha256(), in_force);
        drop(audit);
    }

    /// With candidate rule sets, a models file that canaries a version nobody loaded,
    /// and a base rule set the registry does not name with its digest, are refused on
    /// reload (`models_rule_sets_mismatch`), audited; what is in force stays. A models
    /// file that fits goes through.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reloads_the_rule_sets_do_not_fit_are_refused() {
        use std::sync::Arc;
        use vitalmq_policies::{ModelRegistry, RuleSet};
        let dir = tempfile::tempdir().expect("tempdir");
        let models_path = dir.path().join("models.toml");
        let rules_path = dir.path().join("rules.toml");
        let log = dir.path().join("audit.jsonl");
        let rules_text = include_str!("../../policies/examples/rules.toml");
        let cand_text = rules_text.replacen(
            "version = \"2025-06-01.1\"",
            "version = \"2025-07-01.1\"",
            1,
        );
        let base = Arc::new(RuleSet::parse(rules_text, Path::new("rules.toml")).expect("base"));
        let cand = Arc::new(RuleSet::parse(&cand_text, Path::new("cand.toml")).expect("cand"));
        let entry = |version: &str, sha: &str| {
            format!(
                "[[models]]\nname = \"rules\"\nversion = \"{version}\"\nkind = \"rules\"\n\
                 artifact_sha256 = \"{sha}\"\nlineage = \"t\"\nfeature_pipeline = \"f\"\n\
                 intended_use = \"t\"\nstatus = \"approved\"\napproved_by = \"board\"\n\
                 approved_at = \"2026-01-01T00:00:00Z\"\n\n"
            )
        };
        let shipped = include_str!("../../policies/examples/models.toml");
        let models_text = |rollout: &str| {
            format!(
                "{shipped}\n{}[[rollout]]\nmodel = \"rules\"\nlive = \"2025-06-01.1\"\n{rollout}\n",
                entry("2025-07-01.1", cand.sha256())
            )
        };
        std::fs::write(&models_path, models_text("shadow = [\"2025-07-01.1\"]")).expect("write");
        std::fs::write(&rules_path, rules_text).expect("write");
        let audit = vitalmq_audit::AuditLog::open(&log, 64).expect("audit");
        let initial = Arc::new(ModelRegistry::load(&models_path).expect("valid"));
        let guard = super::RuleSetGuard::new(
            "rules".into(),
            "rules.toml".into(),
            Arc::clone(&base),
            vec![("cand.toml".into(), Arc::clone(&cand))],
            Arc::clone(&initial),
        );
        let in_force = initial.sha256().to_owned();
        let mut models = super::watch_models(
            models_path.clone(),
            initial,
            Vec::new(),
            audit.auditor(),
            Some(guard.clone()),
        );
        let rules = super::watch_rules(
            rules_path.clone(),
            Arc::clone(&base),
            vec!["mqtt".into()],
            audit.auditor(),
            Some(guard),
        );

        // A canary of a version no rule set has (registered, approved, not loaded).
        let unloaded = format!(
            "{shipped}\n{}{}[[rollout]]\nmodel = \"rules\"\nlive = \"2025-06-01.1\"\n\
             canary = [{{ version = \"2025-08-01.1\", sites = [\"site-01\"] }}]\n",
            entry("2025-07-01.1", cand.sha256()),
            entry("2025-08-01.1", &"0".repeat(64)),
        );
        ModelRegistry::parse(&unloaded, Path::new("m.toml")).expect("valid by itself");
        replace(&models_path, &unloaded);
        let line = audited(&log, "models_rule_sets_mismatch").await;
        assert!(
            line.contains("policy_rejected")
                && line.contains(&in_force)
                && line.contains("2025-08-01.1"),
            "{line}"
        );
        assert!(!models.models.has_changed().expect("open"));

        // An edited base rule set: its digest is nobody's.
        replace(&rules_path, &format!("{rules_text}\n# edited\n"));
        let line = audited_times(&log, "models_rule_sets_mismatch", 2).await;
        assert_eq!(line, 2);
        assert!(!rules.rules.has_changed().expect("open"));
        assert_eq!(rules.rules.borrow().sha256(), base.sha256());

        // The same files registered under another name: the running versions would
        // be looked up under the old one.
        let renamed = format!(
            "{}\n{}[[rollout]]\nmodel = \"rules2\"\nlive = \"2025-06-01.1\"\n",
            shipped.replace("name = \"rules\"", "name = \"rules2\""),
            entry("2025-07-01.1", cand.sha256()).replace("name = \"rules\"", "name = \"rules2\""),
        );
        ModelRegistry::parse(&renamed, Path::new("m.toml")).expect("valid by itself");
        replace(&models_path, &renamed);
        assert_eq!(audited_times(&log, "models_rule_sets_mismatch", 3).await, 3);
        let line = audited(&log, "a rename needs a restart").await;
        assert!(line.contains("rules2"), "{line}");
        assert!(!models.models.has_changed().expect("open"));

        // A canary of the loaded candidate fits.
        replace(
            &models_path,
            &models_text("canary = [{ version = \"2025-07-01.1\", sites = [\"site-01\"] }]"),
        );
        tokio::time::timeout(Duration::from_secs(10), models.models.changed())
            .await
            .expect("reloaded in time")
            .expect("watch open");
        assert_ne!(models.models.borrow_and_update().sha256(), in_force);
        drop(audit);
    }

    async fn audited_times(log: &Path, needle: &str, want: usize) -> usize {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let n = text.lines().filter(|l| l.contains(needle)).count();
            if n >= want {
                return n;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{n} audit records with {needle}, not {want}: {text}"
            );
            // The paused clock moves on (the watch's timers fire) and so does real time
            // (the file watcher's thread reports).
            tokio::time::sleep(Duration::from_millis(20)).await;
            tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(5)))
                .await
                .expect("sleep");
        }
    }

    /// While stale the watch reads the file every poll; the same refusal found again
    /// is neither logged nor audited again, a changed file is (and so is a refusal
    /// after a reload succeeded in between).
    #[tokio::test(start_paused = true)]
    async fn a_registry_refused_again_unchanged_is_audited_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("registry.toml");
        let log = dir.path().join("audit.jsonl");
        let key = SigningKey::generate(Algorithm::EdDsa)
            .expect("key")
            .verifying_key()
            .to_hex();
        std::fs::write(&path, registry_text(&key, "test.vitalmq", "pt-a")).expect("write");
        let audit = vitalmq_audit::AuditLog::open(&log, 64).expect("audit");
        let initial = load_registry(&path).expect("valid");
        let mut watch = watch_registry(path.clone(), initial, audit.auditor());
        let polls = super::REGISTRY_POLL * 30;

        let broken = "format = \"vitalmq-registry/v2\"\ntrust_domain = ";
        replace(&path, broken);
        audited_times(&log, "invalid_registry", 1).await;
        stale_turns(&mut watch.stale, true).await;
        // Some 27 polls find the same broken file.
        tokio::time::sleep(polls).await;
        // Another mistake is news; every record before it is written by then.
        replace(&path, &format!("# changed\n{broken}"));
        assert_eq!(audited_times(&log, "invalid_registry", 2).await, 2);

        replace(&path, &registry_text(&key, "other.vitalmq", "pt-c"));
        audited_times(&log, "trust_domain_changed", 1).await;
        tokio::time::sleep(polls).await;
        replace(&path, &registry_text(&key, "other.vitalmq", "pt-d"));
        assert_eq!(audited_times(&log, "trust_domain_changed", 2).await, 2);

        // Fixed, then the first mistake again: refused anew, so audited again.
        replace(&path, &registry_text(&key, "test.vitalmq", "pt-e"));
        stale_turns(&mut watch.stale, false).await;
        replace(&path, broken);
        assert_eq!(audited_times(&log, "invalid_registry", 3).await, 3);
        assert_eq!(
            audited_times(&log, "trust_domain_changed", 2).await,
            2,
            "no repeat of the trust domain refusal"
        );
        audit.close().expect("close");
    }

    /// Waits until the registry watch's `stale` is `want`.
    async fn stale_turns(stale: &mut tokio::sync::watch::Receiver<bool>, want: bool) {
        tokio::time::timeout(Duration::from_secs(10), stale.wait_for(|s| *s == want))
            .await
            .expect("in time")
            .expect("watch open");
    }

    /// An unreadable registry is a failed reload too: stale until it can be read
    /// again, which the watch notices by itself (it polls while stale), and the
    /// operational alert opens and resolves with it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreadable_registry_is_stale_until_read_again_and_raises_an_ops_alert() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("registry.toml");
        let key = SigningKey::generate(Algorithm::EdDsa)
            .expect("key")
            .verifying_key()
            .to_hex();
        std::fs::write(&path, registry_text(&key, "test.vitalmq", "pt-a")).expect("write");
        let audit =
            vitalmq_audit::AuditLog::open(&dir.path().join("audit.jsonl"), 64).expect("audit");
        let initial = load_registry(&path).expect("valid");
        let mut watch = watch_registry(path.clone(), initial, audit.auditor());
        let (ops_tx, mut ops_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(super::report_stale(
            watch.stale.clone(),
            path.clone(),
            ops_tx,
        ));

        // Root reads anything: make it unreadable by making it a directory's name.
        let moved = dir.path().join("registry.saved");
        std::fs::rename(&path, &moved).expect("move away");
        std::fs::create_dir(&path).expect("a directory in its place");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        stale_turns(&mut watch.stale, true).await;
        let open = tokio::time::timeout(Duration::from_secs(10), ops_rx.recv())
            .await
            .expect("in time")
            .expect("an alert");
        assert_eq!(
            (open.topic().as_str(), open.state),
            ("ops/bridge/registry_stale", "open")
        );

        // Put back: reloaded, no longer stale.
        std::fs::remove_dir(&path).expect("rmdir");
        std::fs::hard_link(&moved, &path).expect("link back");
        stale_turns(&mut watch.stale, false).await;
        let resolved = tokio::time::timeout(Duration::from_secs(10), ops_rx.recv())
            .await
            .expect("in time")
            .expect("an alert");
        assert_eq!(resolved.state, "resolved");
        assert_eq!(resolved.alert_id, open.alert_id);
    }

    /// SIGHUP alone reloads: the file is changed where the watcher does not look (a
    /// write through a hard link in another directory; inotify reports the change on
    /// the linked path only).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sighup_reloads_the_registry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let elsewhere = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("registry.toml");
        let key = SigningKey::generate(Algorithm::EdDsa)
            .expect("key")
            .verifying_key()
            .to_hex();
        std::fs::write(&path, registry_text(&key, "test.vitalmq", "pt-a")).expect("write");
        let link = elsewhere.path().join("registry.toml");
        std::fs::hard_link(&path, &link).expect("hard link");
        let audit =
            vitalmq_audit::AuditLog::open(&dir.path().join("audit.jsonl"), 64).expect("audit");
        let initial = load_registry(&path).expect("valid");
        let mut watch = watch_registry(path.clone(), initial, audit.auditor());
        std::fs::write(&link, registry_text(&key, "test.vitalmq", "pt-b")).expect("write");
        let hup = std::process::Command::new("kill")
            .args(["-HUP", &std::process::id().to_string()])
            .status()
            .expect("kill");
        assert!(hup.success());
        tokio::time::timeout(Duration::from_secs(10), watch.registry.changed())
            .await
            .expect("reloaded in time")
            .expect("watch open");
        assert_eq!(patient(&watch.registry.borrow()), "pt-b");
    }

    fn rules(escalation: &str) -> RuleSet {
        let text = format!(
            "format = \"vitalmq-rules/v1\"\nversion = \"t\"\n[quality]\nlow_below = 0.5\nmax_low_fraction = 0.5\nover_n = 20\n{escalation}"
        );
        RuleSet::parse(&text, Path::new("rules.toml")).expect("valid rules")
    }

    #[test]
    fn a_rule_set_naming_a_handler_the_bridge_lacks_is_named() {
        let have = vec!["mqtt".to_owned(), "webhook:ehr".to_owned()];
        assert!(unknown_handlers(&rules(""), &have).is_empty());
        let paging = rules("[escalation]\nlevels = [[\"mqtt\"], [\"mqtt\", \"webhook:pager\"]]\n");
        assert_eq!(unknown_handlers(&paging, &have), vec!["webhook:pager"]);
        let known = rules("[escalation]\nlevels = [[\"mqtt\"], [\"mqtt\", \"webhook:ehr\"]]\n");
        assert!(unknown_handlers(&known, &have).is_empty());
    }
}
