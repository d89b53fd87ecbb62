//! Alert rules change without a restart: the rule file is reloaded when it changes on
//! disk or on SIGHUP. A file with a mistake is refused (the error names file and line)
//! and the rules in force stay; every reload and refusal is audited with the old and
//! new SHA-256.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{error, info};
use vitalmq_audit::{AuditRecord, Auditor, Component, Decision, Event};
use vitalmq_policies::RuleSet;

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

pub fn watch_rules(
    path: PathBuf,
    initial: Arc<RuleSet>,
    handlers: Vec<String>,
    auditor: Auditor,
) -> RulesWatch {
    let (tx, rx) = watch::channel(initial);
    let (trigger, mut triggers) = mpsc::channel::<()>(1);
    let watcher = file_watcher(&path, trigger.clone());
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    tokio::spawn(async move {
        loop {
            let fired = async {
                match hup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                t = triggers.recv() => if t.is_none() { return },
                _ = fired => {}
            }
            // Let an editor finish writing before reading.
            tokio::time::sleep(Duration::from_millis(200)).await;
            while triggers.try_recv().is_ok() {}
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
                            AuditRecord::new(Component::Bridge, Event::PolicyRejected)
                                .resource(path.display().to_string())
                                .decision(Decision::Deny)
                                .policy_sha256(old)
                                .reason("unknown_handler")
                                .detail("unknown_handlers", unknown),
                        );
                        continue;
                    }
                    info!(rules = %path.display(), old = %old, new = %rules.sha256(), "alert rules reloaded");
                    let _ = auditor.record(
                        AuditRecord::new(Component::Bridge, Event::PolicyReloaded)
                            .resource(path.display().to_string())
                            .decision(Decision::Allow)
                            .policy_sha256(rules.sha256())
                            .detail("old_sha256", old)
                            .detail("new_sha256", rules.sha256())
                            .detail("rules_version", rules.version()),
                    );
                    let _ = tx.send(Arc::new(rules));
                }
                Ok(Err(e)) => {
                    error!(rules = %path.display(), error = %e, "alert rules refused; the rules in force stay");
                    let _ = auditor.record(
                        AuditRecord::new(Component::Bridge, Event::PolicyRejected)
                            .resource(path.display().to_string())
                            .decision(Decision::Deny)
                            .policy_sha256(old)
                            .reason("invalid_rules")
                            .detail("error", e.to_string()),
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

    use vitalmq_policies::RuleSet;

    use super::unknown_handlers;

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
