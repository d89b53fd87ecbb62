//! The broker process: the mTLS listener, the embedded rumqttd, policy and CRL reloads,
//! metrics and audit, wired together.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use vitalmq_audit::{AuditLog, AuditRecord, Component, Event};
use vitalmq_policies::{AclPolicy, DeviceRegistry};

use crate::accept::{AcceptLimits, Acceptor};
use crate::audit_aggregate::RefusalAudit;
use crate::authz::{Authorizer, PolicyAuthorizer};
use crate::config::BrokerConfig;
use crate::embedded::EmbeddedBroker;
use crate::gate::AuditSink;
use crate::ratelimit::RateRegistry;
use crate::relay::{self, RelayContext};
use crate::tls::{self, TlsEdge};

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("audit log: {0}")]
    Audit(#[from] vitalmq_audit::AuditError),
    #[error(transparent)]
    PrivateFiles(#[from] vitalmq_private_fs::PrivateFsError),
    #[error("{0}")]
    AuditKey(#[from] vitalmq_audit::KeyError),
    #[error("embedded broker: {0}")]
    Embedded(#[from] crate::embedded::EmbeddedError),
    #[error("presence: {0}")]
    Presence(#[from] crate::presence::PresenceError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Why the policy, registry or TLS files could not be loaded; every message names
/// the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The ACL policy or the device registry.
    #[error(transparent)]
    Policy(#[from] vitalmq_policies::PolicyErrors),
    /// Certificates, keys, CAs or CRLs. Not chained as a source: the message already
    /// ends with its cause, which an error report would otherwise print twice.
    #[error("{0}")]
    Tls(tls::TlsError),
}

/// Why a reload did not take effect; the policy in force stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("broker stopped")]
    Stopped,
}

/// A reload request and where its outcome goes.
type ReloadRequest = tokio::sync::oneshot::Sender<Result<(), LoadError>>;

/// Everything one reload produces: all of it or none of it takes effect.
struct Loaded {
    acl: Arc<AclPolicy>,
    registry: Arc<DeviceRegistry>,
    edge: Arc<TlsEdge>,
}

fn load(config: &BrokerConfig) -> Result<Loaded, LoadError> {
    let acl = AclPolicy::load(&config.policy.acl)?;
    let registry = DeviceRegistry::load(&config.policy.registry)?;
    let mut tls_settings = config.tls.clone();
    // SPEC section 1: the CN fallback is a policy decision.
    tls_settings.cn_fallback = acl.cn_fallback();
    let edge = tls::build(&tls_settings).map_err(LoadError::Tls)?;
    Ok(Loaded {
        acl: Arc::new(acl),
        registry: Arc::new(registry),
        edge: Arc::new(edge),
    })
}

/// A running broker.
#[derive(Debug)]
pub struct Broker {
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    reload: mpsc::Sender<ReloadRequest>,
    tasks: Vec<JoinHandle<()>>,
    audit: Option<AuditLog>,
    /// Flushed once more at shutdown, after the tasks that may still count refusals.
    refusals: Arc<RefusalAudit>,
    _watcher: Option<notify::RecommendedWatcher>,
    /// `/metrics`, `/healthz`, `/readyz` (`metrics_listen`); stops with the broker.
    _ops: Option<vitalmq_ops_http::OpsServer>,
}

impl Broker {
    pub async fn start(mut config: BrokerConfig) -> Result<Self, StartError> {
        config.max_connections = connection_budget(config.max_connections);
        config.embedded.max_connections =
            config.embedded.max_connections.max(config.max_connections);
        let ready = crate::metrics_http::Ready::default();
        let loaded = load(&config)?;
        ready.policy_loaded();
        // The audit log names devices, sites and addresses, its key vouches for it:
        // owner-only. Its directory may be a shared log directory, so only the files
        // are checked.
        let key_path = vitalmq_audit::signing_key_path(&config.audit.path);
        let exposed = vitalmq_private_fs::check(
            &[config.audit.path.as_path(), key_path.as_path()],
            config.private_files,
        )?;
        // Checkpoints are signed with the broker's own key, kept beside its audit log.
        let key = vitalmq_audit::CheckpointKey::load_or_create(
            &key_path,
            vitalmq_audit::Component::Broker,
        )?;
        tracing::info!(public_key = %key.public_hex(), "audit checkpoints signed with this key");
        let audit_log = AuditLog::open_signed(&config.audit.path, config.audit.queue, Some(key))?;
        let auditor = audit_log.auditor();
        let audit: Arc<dyn AuditSink> = Arc::new(auditor.clone());
        let ops = match config.metrics_listen {
            Some(addr) => crate::metrics_http::install(addr, &ready).await,
            None => None,
        };
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Listen {
                    addr: config.listen,
                    source,
                })?;
        let embedded = Arc::new(EmbeddedBroker::start(&config.embedded)?);
        let addr = listener.local_addr().map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;

        let authz: Arc<dyn Authorizer> = Arc::new(PolicyAuthorizer::new(
            loaded.acl.clone(),
            loaded.registry.clone(),
        ));
        let (authz_tx, authz_rx) = watch::channel(authz);
        let (edge_tx, edge_rx) = watch::channel(loaded.edge.clone());
        let (registry_tx, registry_rx) = watch::channel(loaded.registry.clone());
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (presence, presence_task) =
            crate::presence::start(Arc::clone(&embedded), shutdown_rx.clone())?;
        let acceptor = Arc::new(
            Acceptor::new(edge_rx.clone(), AcceptLimits::from_settings(&config.tls))
                .with_registry(registry_rx),
        );
        let ctx = Arc::new(RelayContext {
            embedded,
            authz: authz_rx,
            edge: edge_rx,
            audit: Arc::clone(&audit),
            rates: RateRegistry::default(),
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            shutdown: shutdown_rx.clone(),
            presence,
        });
        let _ = audit.record(
            AuditRecord::new(Component::Broker, Event::ComponentStarted)
                .policy_sha256(loaded.acl.sha256_hex())
                .detail("listen", addr.to_string())
                .detail(
                    "exposed_paths",
                    exposed.iter().map(ToString::to_string).collect::<Vec<_>>(),
                ),
        );
        tracing::info!(%addr, policy_sha256 = loaded.acl.sha256_hex(), "broker listening (mTLS)");

        let refusals = Arc::new(RefusalAudit::new(
            Arc::clone(&audit),
            Duration::from_secs(config.audit.aggregate_interval_s),
            config.audit.aggregate_max_sources,
        ));
        let summaries_task = tokio::spawn(Arc::clone(&refusals).run(shutdown_rx.clone()));
        let size_task = tokio::spawn(watch_audit_size(
            auditor.clone(),
            config.audit.alert_bytes,
            shutdown_rx.clone(),
        ));
        let accept_task = tokio::spawn(accept_loop(
            listener,
            acceptor,
            ctx,
            Arc::clone(&refusals),
            config.max_connections,
            shutdown_rx.clone(),
        ));

        let (reload_tx, reload_rx) = mpsc::channel(8);
        let reloader = Reloader {
            config: config.clone(),
            acl_sha: loaded.acl.sha256_hex().to_owned(),
            authz_tx,
            edge_tx,
            registry_tx,
            audit: Arc::clone(&audit),
        };
        let checkpoint_task = tokio::spawn(checkpoint_periodically(
            auditor.clone(),
            Duration::from_secs(config.audit.checkpoint_interval_s),
            shutdown_rx.clone(),
        ));
        let reload_task = tokio::spawn(reloader.run(reload_rx, shutdown_rx));
        let watcher = if config.policy.watch {
            watch_files(&config, reload_tx.clone())
        } else {
            None
        };
        ready.listening();
        Ok(Self {
            addr,
            shutdown: shutdown_tx,
            reload: reload_tx,
            tasks: vec![
                accept_task,
                reload_task,
                checkpoint_task,
                summaries_task,
                size_task,
                presence_task,
            ],
            audit: Some(audit_log),
            refusals,
            _watcher: watcher,
            _ops: ops,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Reloads policy, registry, certificates and CRLs now (what SIGHUP does). A broken
    /// file is refused with its error, and the policy in force stays.
    pub async fn reload(&self) -> Result<(), ReloadError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.reload
            .send(tx)
            .await
            .map_err(|_| ReloadError::Stopped)?;
        Ok(rx.await.map_err(|_| ReloadError::Stopped)??)
    }

    /// Stops accepting, closes every connection and flushes the audit log.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        self.refusals.flush();
        if let Some(log) = self.audit.take() {
            let auditor = log.auditor();
            let _ = auditor.record(AuditRecord::new(Component::Broker, Event::ComponentStopped));
            let _ = tokio::task::spawn_blocking(move || log.close()).await;
        }
    }
}

/// Syncs the audit log every `every`, which appends a signed checkpoint when records
/// were written since the last one. The writer checkpoints on its own only when records
/// arrive, so without this a burst of refusals followed by quiet would wait, unsigned
/// and so unshipped, for the next record.
async fn checkpoint_periodically(
    auditor: vitalmq_audit::Auditor,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    if every.is_zero() {
        return;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        let a = auditor.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || a.sync()).await {
            tracing::warn!(error = %e, "audit log sync for a checkpoint failed");
        }
    }
}

/// How often the audit log's size is exported and checked against `alert_bytes`.
const AUDIT_SIZE_EVERY: Duration = Duration::from_secs(5);

/// Exports the audit log's size (`vitalmq_audit_bytes`) and raises
/// `vitalmq_audit_size_alert` with a warning while it is above `alert_bytes`. The
/// broker has no ops topic of its own; alerting rules read the metric.
async fn watch_audit_size(
    auditor: vitalmq_audit::Auditor,
    alert_bytes: u64,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut above = false;
    loop {
        let bytes = auditor.bytes();
        metrics::gauge!("vitalmq_audit_bytes").set(bytes as f64);
        let now_above = alert_bytes > 0 && bytes > alert_bytes;
        if now_above != above {
            above = now_above;
            metrics::gauge!("vitalmq_audit_size_alert").set(if above { 1.0 } else { 0.0 });
            if above {
                tracing::warn!(bytes, alert_bytes, "audit log is above its configured size");
            } else {
                tracing::info!(
                    bytes,
                    alert_bytes,
                    "audit log is below its configured size again"
                );
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(AUDIT_SIZE_EVERY) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Arc<Acceptor>,
    ctx: Arc<RelayContext>,
    refusals: Arc<RefusalAudit>,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            refused(&refusals, remote, "max_connections", "max_connections");
            continue;
        };
        let acceptor = Arc::clone(&acceptor);
        let ctx = Arc::clone(&ctx);
        let refusals = Arc::clone(&refusals);
        tokio::spawn(async move {
            let _slot = slot;
            match acceptor.accept(tcp, remote).await {
                Err(refusal) => refused(&refusals, remote, refusal.reason(), refusal.detail()),
                Ok((tls, peer)) => {
                    metrics::gauge!("vitalmq_connections").increment(1.0);
                    let id = peer.identity.spiffe.clone();
                    let ended = relay::serve(tls, peer, ctx).await;
                    metrics::gauge!("vitalmq_connections").decrement(1.0);
                    tracing::debug!(peer.id = %id.id, ?ended, "connection ended");
                }
            }
        });
    }
}

fn refused(refusals: &RefusalAudit, remote: SocketAddr, reason: &str, detail: &str) {
    metrics::counter!("vitalmq_denials_total", "kind" => "handshake").increment(1);
    // Repeats go to the log as a count, and to the debug log only.
    if let Ok(crate::audit_aggregate::Admit::Counted) = refusals.refused(remote, reason, detail) {
        tracing::debug!(peer.addr = %remote, reason, detail, "connection refused (repeat)");
    } else {
        tracing::info!(peer.addr = %remote, reason, detail, "connection refused");
    }
}

struct Reloader {
    config: BrokerConfig,
    acl_sha: String,
    authz_tx: watch::Sender<Arc<dyn Authorizer>>,
    edge_tx: watch::Sender<Arc<TlsEdge>>,
    registry_tx: watch::Sender<Arc<DeviceRegistry>>,
    audit: Arc<dyn AuditSink>,
}

impl Reloader {
    async fn run(
        mut self,
        mut requests: mpsc::Receiver<ReloadRequest>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        #[cfg(unix)]
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let sighup = async {
                match hangup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let sighup = std::future::pending::<Option<()>>();
            tokio::select! {
                request = requests.recv() => match request {
                    Some(reply) => {
                        // Coalesce a burst of file events into one reload.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        while let Ok(extra) = requests.try_recv() { let _ = extra.send(Ok(())); }
                        let _ = reply.send(self.reload());
                    }
                    None => return,
                },
                Some(()) = sighup => { let _ = self.reload(); }
                _ = shutdown.changed() => return,
            }
        }
    }

    fn reload(&mut self) -> Result<(), LoadError> {
        match load(&self.config) {
            Ok(loaded) => {
                let new_sha = loaded.acl.sha256_hex().to_owned();
                let _ = self.audit.record(
                    AuditRecord::new(Component::Broker, Event::PolicyReloaded)
                        .policy_sha256(new_sha.clone())
                        .detail("old_sha256", self.acl_sha.clone())
                        .detail("new_sha256", new_sha.clone()),
                );
                tracing::info!(old = %self.acl_sha, new = %new_sha, "policy reloaded");
                self.acl_sha = new_sha;
                let authz: Arc<dyn Authorizer> =
                    Arc::new(PolicyAuthorizer::new(loaded.acl, loaded.registry.clone()));
                self.registry_tx.send_replace(loaded.registry);
                self.edge_tx.send_replace(loaded.edge);
                self.authz_tx.send_replace(authz);
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "policy reload refused; the policy in force stays");
                let _ = self.audit.record(
                    AuditRecord::new(Component::Broker, Event::PolicyRejected)
                        .policy_sha256(self.acl_sha.clone())
                        .reason("invalid_policy")
                        .detail("error", e.to_string()),
                );
                Err(e)
            }
        }
    }
}

fn watch_files(
    config: &BrokerConfig,
    reload: mpsc::Sender<ReloadRequest>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let files: Vec<PathBuf> = [config.policy.acl.clone(), config.policy.registry.clone()]
        .into_iter()
        .chain(config.tls.crls.iter().cloned())
        .chain(config.tls.client_ca.iter().cloned())
        .collect();
    let watched = files.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let relevant = event.kind.is_modify() || event.kind.is_create();
        if relevant
            && event
                .paths
                .iter()
                .any(|p| watched.iter().any(|w| p.file_name() == w.file_name()))
        {
            let (tx, _rx) = tokio::sync::oneshot::channel();
            let _ = reload.try_send(tx);
        }
    })
    .map_err(|e| tracing::warn!(error = %e, "file watching unavailable; SIGHUP still reloads"))
    .ok()?;
    // Watch directories: editors replace files by rename, which a file watch would miss.
    let mut dirs: Vec<PathBuf> = files
        .iter()
        .filter_map(|f| f.parent().map(PathBuf::from))
        .collect();
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        if let Err(e) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch");
        }
    }
    Some(watcher)
}

/// File descriptors each client connection holds: its TLS socket (the connection to the
/// embedded rumqttd is an in-process pipe).
const FDS_PER_CONNECTION: u64 = 1;
/// Descriptors kept for everything else (listeners, files, the audit log, metrics).
const FDS_RESERVED: u64 = 256;

/// Raises the soft descriptor limit to the hard one and caps `wanted` connections to
/// what it allows. Running out of descriptors would make the accept loop fail on every
/// new client, so the gate refuses (and audits) connections beyond the budget.
fn connection_budget(wanted: usize) -> usize {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the file descriptor limit");
            return wanted;
        }
    };
    let budget = usize::try_from(limit.saturating_sub(FDS_RESERVED) / FDS_PER_CONNECTION)
        .unwrap_or(usize::MAX);
    if wanted > budget {
        tracing::warn!(
            wanted,
            budget,
            fd_limit = limit,
            "max_connections lowered to fit the file descriptor limit (1 per connection)"
        );
        budget.max(1)
    } else {
        wanted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record followed by quiet gets a signed checkpoint from the timer, not only at
    /// the next record or at shutdown (the bridge ships only checkpointed records).
    /// Paused clock: time does not auto-advance while a tick's `sync` runs on the
    /// blocking pool, so once the test's own sleep returns, every tick before it has
    /// finished writing.
    #[tokio::test(start_paused = true)]
    async fn quiet_after_records_still_gets_a_checkpoint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let key = vitalmq_audit::CheckpointKey::load_or_create(
            &vitalmq_audit::signing_key_path(&path),
            Component::Broker,
        )
        .expect("key");
        let log = AuditLog::open_signed(&path, 16, Some(key)).expect("open");
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(checkpoint_periodically(
            log.auditor(),
            Duration::from_millis(50),
            stop_rx,
        ));
        log.auditor()
            .record(AuditRecord::new(
                Component::Broker,
                Event::ConnectionRefused,
            ))
            .expect("record");
        let checkpointed = || {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines.len() == 2 && lines[1].contains("\"event\":\"checkpoint\"")
        };
        // Bounded wait for the effect, not a timing assertion.
        for _ in 0..200 {
            if checkpointed() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            checkpointed(),
            "{}",
            std::fs::read_to_string(&path).unwrap_or_default()
        );
        // Nothing new: no checkpoint of a checkpoint, after four more ticks.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(checkpointed());
        let _ = stop_tx.send(true);
        task.await.expect("task");
    }
}
