//! The bridge process: wires the MQTT connection, the verify stage, the recorder
//! thread, acknowledgements and receipts, operational alerts and the sink drains.
//!
//! ```text
//! broker ──PUBLISH──▶ event loop ──▶ ingest (batches, 2 verified at a time, in order;
//!            acks, presence ─┘  ▲        control inputs keep their place between them)
//!                    tick (1 s) ┘        │ bounded channel of `Work` (backpressure)
//!                                        ▼
//!                                     recorder thread: sequence/control, commit (fsync)
//!                                        │ or, paused, alerts only; audit
//!            PUBACK, receipts ◀── acker ◀┘        store ──▶ drain per sink ──▶ objects / upstream / FHIR
//!                                                 store / memory ──▶ alert handlers
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Packet, QoS};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};
use vitalmq_audit::{AuditError, AuditLog, AuditRecord, Component, Event as AuditEvent};
use vitalmq_envelope::DeviceId;
use vitalmq_policies::{DeviceRegistry, PolicyErrors};
use vitalmq_private_fs::PrivateFsError;

use crate::classify::{self, Control, Incoming, Origin, Sequencer};
use crate::config::{BridgeConfig, SinkConfig};
use crate::delivery::Handler;
use crate::drain::{self, DrainSettings};
use crate::governance::{Fields, PurposePseudonym};
use crate::mqtt;
use crate::ops::{OpsAlert, OpsKind, RateWatch};
use crate::recorder::{Recorded, Recorder, RecorderSettings, Work, now_ms};
use crate::sink::fhir::FhirSink;
use crate::sink::object::{ObjectStoreSink, S3Settings};
use crate::sink::upstream::UpstreamSink;
use crate::sink::{Sink, SinkError};
use crate::store::{Store, StoreError};
use crate::webhook::WebhookSecretError;
use crate::window::ReceiptPoint;

/// Filters the bridge subscribes to (SPEC section 2): device messages, then the
/// control inputs (acknowledgements of alerts, the broker's presence messages).
pub const SUBSCRIPTIONS: [&str; 4] = [
    "devices/+/telemetry",
    "devices/+/status",
    "alerts/+/ack/+",
    "presence/#",
];

/// How many of [`SUBSCRIPTIONS`] carry device messages: without them the bridge is
/// not ready; without the others it runs, saying loudly what it does not receive.
const DEVICE_FILTERS: usize = 2;

/// The line printed (to stderr, through tracing) once the bridge is subscribed.
pub const READY: &str = "vitalmq bridge ready";

/// Why the bridge could not start, or not stop cleanly. The context is the message and
/// the cause its source, so `{:#}` reads `<context>: <cause>`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Registry(PolicyErrors),
    #[error(transparent)]
    Rules(PolicyErrors),
    #[error(transparent)]
    Models(PolicyErrors),
    #[error(transparent)]
    PrivateFs(#[from] PrivateFsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("encryption at rest: {0}")]
    Keyring(#[from] vitalmq_keyring::KeyError),
    #[error("encryption at rest: {0}")]
    ForeignKeyring(String),
    #[error("legal holds file {path}: {source}")]
    HoldsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    CheckpointKey(#[from] vitalmq_audit::KeyError),
    #[error("audit log {}", path.display())]
    AuditLog {
        path: PathBuf,
        #[source]
        source: AuditError,
    },
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("{}: stored alert state of {device}", path.display())]
    AlertState {
        path: PathBuf,
        device: DeviceId,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    ScoreTable(PolicyErrors),
    #[error("[scoring] tables and the models file disagree: {0}")]
    ScoreTables(#[from] crate::rollout::TablesError),
    #[error("[alerts] rules and candidates and the models file disagree: {0}")]
    RuleSets(#[from] crate::rollout::RuleSetsError),
    #[error("{}: stored scoring state of a patient", path.display())]
    ScoreState {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("sink {sink}: environment variable {var} is not set")]
    SinkEnv {
        sink: String,
        var: &'static str,
        #[source]
        source: std::env::VarError,
    },
    #[error("sink {sink}")]
    FhirSink {
        sink: String,
        #[source]
        source: crate::sink::fhir::FhirSetupError,
    },
    #[error("sink {0}: neither path nor s3")]
    SinkTarget(String),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Mqtt(#[from] crate::mqtt::MqttSetupError),
    #[error("webhook {webhook}: environment variable {var} is not set")]
    WebhookEnv {
        webhook: String,
        var: String,
        #[source]
        source: std::env::VarError,
    },
    #[error("webhook {webhook}: the secret in {var}")]
    WebhookSecret {
        webhook: String,
        var: String,
        #[source]
        source: WebhookSecretError,
    },
    #[error(transparent)]
    WebhookClient(#[from] reqwest::Error),
    #[error("{}: [escalation] names handlers this bridge does not have: {}", path.display(), unknown.join(", "))]
    UnknownHandlers { path: PathBuf, unknown: Vec<String> },
    #[error("start the recorder thread")]
    RecorderThread(#[source] std::io::Error),
    #[error("[pseudonyms] key_file {}: {detail}", path.display())]
    PseudonymKey { path: PathBuf, detail: String },
    #[error("close the audit log")]
    CloseAudit(#[source] AuditError),
    #[error(transparent)]
    Observe(#[from] vitalmq_ops_http::OpsHttpError),
}

/// The `[pseudonyms]` key: exactly 32 bytes.
fn read_pseudonym_key(path: &std::path::Path) -> Result<[u8; 32], RunError> {
    let bytes = std::fs::read(path).map_err(|source| RunError::PseudonymKey {
        path: path.to_path_buf(),
        detail: source.to_string(),
    })?;
    bytes
        .as_slice()
        .try_into()
        .map_err(|_| RunError::PseudonymKey {
            path: path.to_path_buf(),
            detail: format!("a pseudonym key is 32 bytes, this file has {}", bytes.len()),
        })
}

/// How often the surveillance sinks look for new alerts, refusals, gaps and scores.
const SURVEIL_EVERY: Duration = Duration::from_secs(5);
/// Rows per table and pass at most.
const SURVEIL_BATCH: usize = 50_000;

/// A sink, and for object storage also the concrete sink the audit shipper writes to.
type BuiltSink = (Arc<dyn Sink>, Option<Arc<ObjectStoreSink>>);

/// The sink of `config`.
/// `keyring`: with `[encryption]`, objects sinks seal every object under its patient's
/// data key (see `sink::object::sealed`). `registry`: the registry in force, for the
/// FHIR sink's Devices (lot, hardware model, region).
pub(crate) fn build_sink(
    config: &SinkConfig,
    keyring: Option<&Arc<vitalmq_keyring::Keyring>>,
    registry: Option<&watch::Receiver<Arc<vitalmq_policies::DeviceRegistry>>>,
) -> Result<BuiltSink, RunError> {
    let objects = |s: ObjectStoreSink| {
        let s = Arc::new(match keyring {
            Some(k) => s.with_keyring(Arc::clone(k)),
            None => s,
        });
        (Arc::clone(&s) as Arc<dyn Sink>, Some(s))
    };
    Ok(match config {
        SinkConfig::Objects { name, path, s3, .. } => objects(
            object_store_of(name, path.as_deref(), s3.as_ref())?.with_fields(&config.fields()),
        ),
        // Built by `parquet_sink` (it needs the registry); never an objects target.
        SinkConfig::Parquet { name, .. } => return Err(RunError::SinkTarget(name.clone())),
        SinkConfig::Upstream {
            name,
            link,
            client_id,
            ..
        } => (
            Arc::new(UpstreamSink::start(name.clone(), link, client_id).map_err(RunError::Mqtt)?),
            None,
        ),
        SinkConfig::Fhir(f) => {
            let sink = FhirSink::new(f).map_err(|source| RunError::FhirSink {
                sink: f.name.clone(),
                source,
            })?;
            let sink = match registry {
                Some(r) => sink.with_registry(r.clone()),
                None => sink,
            };
            (Arc::new(sink), None)
        }
    })
}

/// The object storage of an objects or parquet sink: a local directory or S3.
fn object_store_of(
    name: &str,
    path: Option<&std::path::Path>,
    s3: Option<&crate::config::S3Config>,
) -> Result<ObjectStoreSink, RunError> {
    match (path, s3) {
        (Some(path), _) => Ok(ObjectStoreSink::local(name.to_owned(), path)?),
        (None, Some(s3)) => {
            let env = |var: &'static str| {
                std::env::var(var).map_err(|source| RunError::SinkEnv {
                    sink: name.to_owned(),
                    var,
                    source,
                })
            };
            Ok(ObjectStoreSink::s3(
                name.to_owned(),
                S3Settings {
                    bucket: s3.bucket.clone(),
                    endpoint: s3.endpoint.clone(),
                    region: s3.region.clone(),
                    access_key_id: env("AWS_ACCESS_KEY_ID")?,
                    secret_access_key: env("AWS_SECRET_ACCESS_KEY")?,
                    allow_http: s3.allow_http,
                    prefix: s3.prefix.clone(),
                },
            )?)
        }
        (None, None) => Err(RunError::SinkTarget(name.to_owned())),
    }
}

/// The surveillance sink of a `parquet` sink config (`None` for another kind). Its
/// files are not sealed: the data set holds purpose pseudonyms only, and its readers
/// (DuckDB, pyarrow) read plain Parquet.
fn parquet_sink(
    config: &SinkConfig,
    registry: &watch::Receiver<Arc<vitalmq_policies::DeviceRegistry>>,
) -> Result<Option<Arc<crate::sink::parquet::ParquetSink>>, RunError> {
    let SinkConfig::Parquet { name, path, s3, .. } = config else {
        return Ok(None);
    };
    let files = object_store_of(name, path.as_deref(), s3.as_ref())?;
    Ok(Some(Arc::new(crate::sink::parquet::ParquetSink::new(
        files,
        registry.clone(),
    ))))
}

fn drain_settings(config: &SinkConfig) -> DrainSettings {
    match config {
        SinkConfig::Objects {
            batch_max_events,
            batch_max_age_ms,
            ..
        }
        | SinkConfig::Parquet {
            batch_max_events,
            batch_max_age_ms,
            ..
        } => DrainSettings {
            batch_max_events: (*batch_max_events).max(1),
            batch_max_age: Duration::from_millis(*batch_max_age_ms),
            down_after: 3,
        },
        SinkConfig::Upstream {
            batch_max_events, ..
        } => DrainSettings {
            batch_max_events: (*batch_max_events).max(1),
            batch_max_age: Duration::from_millis(20),
            down_after: 3,
        },
        SinkConfig::Fhir(f) => DrainSettings {
            batch_max_events: f.batch_max_events.max(1),
            batch_max_age: Duration::from_millis(f.batch_max_age_ms),
            down_after: 3,
        },
    }
}

/// Runs the bridge until `shutdown` resolves.
pub async fn run(
    config: BridgeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), RunError> {
    // For `/readyz`: CONNACK seen and not lost since (the event loop); the store takes
    // whole commits (the recorder).
    let connected = Arc::new(AtomicBool::new(false));
    let store_writable = Arc::new(AtomicBool::new(true));
    let _ops_http = crate::observe::serve(
        config.metrics.as_ref(),
        Arc::clone(&connected),
        Arc::clone(&store_writable),
    )
    .await?;
    let loaded_registry =
        crate::reload::load_registry(&config.registry).map_err(RunError::Registry)?;
    let registry = Arc::clone(&loaded_registry.registry);
    // Before anything is opened: patient data must not be readable by other users.
    let private_paths = config.private_paths();
    let exposed = vitalmq_private_fs::check(
        &private_paths
            .iter()
            .map(PathBuf::as_path)
            .collect::<Vec<_>>(),
        config.private_files,
    )?;
    let keyring = open_keyring(&config)?;
    let open_store = || -> Result<Store, StoreError> {
        let store = Store::open(&config.data_dir)?;
        Ok(match &keyring {
            Some(k) => store.with_keyring(Arc::clone(k)),
            None => store,
        })
    };
    let store = open_store()?;
    if let Some(k) = &keyring {
        refuse_foreign_keyring(&store, k)?;
    }
    if config.pipeline.max_store_bytes > 0 {
        store.set_quota(config.pipeline.max_store_bytes)?;
    }
    // Checkpoints are signed with the bridge's own key, kept beside its audit log.
    let key = vitalmq_audit::CheckpointKey::load_or_create(
        &vitalmq_audit::signing_key_path(&config.audit_path()),
        vitalmq_audit::Component::Bridge,
    )?;
    info!(public_key = %key.public_hex(), "audit checkpoints signed with this key");
    let audit =
        AuditLog::open_signed(&config.audit_path(), 65_536, Some(key)).map_err(|source| {
            RunError::AuditLog {
                path: config.audit_path(),
                source,
            }
        })?;
    let auditor = audit.auditor();
    // The registry, reloaded on change: attribution follows the assignments as the
    // `vitalmq registry` commands change them, without a restart. Watched as soon as
    // there is an audit log (a change before this is picked up at the next one or
    // SIGHUP).
    let registry_watch =
        crate::reload::watch_registry(config.registry.clone(), loaded_registry, auditor.clone());
    let rules = match &config.alerts {
        Some(a) => Some(Arc::new(
            vitalmq_policies::RuleSet::load(&a.rules).map_err(RunError::Rules)?,
        )),
        None => None,
    };
    if let (Some(a), Some(r)) = (&config.alerts, &rules) {
        let unknown = crate::reload::unknown_handlers(r, &handler_names(a));
        if !unknown.is_empty() {
            return Err(RunError::UnknownHandlers {
                path: a.rules.clone(),
                unknown,
            });
        }
    }
    // Candidate rule sets (issue 21): loaded once, at start; checked against the models
    // file below.
    let mut candidates: Vec<(String, Arc<vitalmq_policies::RuleSet>)> = Vec::new();
    for path in config.alerts.iter().flat_map(|a| &a.candidates) {
        let set = vitalmq_policies::RuleSet::load(path).map_err(RunError::Rules)?;
        info!(rules_version = %set.version(), policy_sha256 = %set.sha256(), path = %path.display(), "candidate rule set loaded");
        candidates.push((path.display().to_string(), Arc::new(set)));
    }
    match &rules {
        Some(r) => {
            info!(rules_version = %r.version(), policy_sha256 = %r.sha256(), rules = r.rules().len(), "alert engine on")
        }
        None => info!("alert engine off: no [alerts] in the configuration"),
    }
    let mut alert_states = HashMap::new();
    for (device, json) in store.load_alert_states()? {
        let state = serde_json::from_str(&json).map_err(|source| RunError::AlertState {
            path: store.path().to_path_buf(),
            device: device.clone(),
            source,
        })?;
        alert_states.insert(device, state);
    }
    let mut loaded_tables = Vec::new();
    let scoring = match &config.scoring {
        Some(sc) => {
            let mut models = Vec::new();
            for path in &sc.tables {
                let table =
                    vitalmq_policies::ScoreTable::load(path).map_err(RunError::ScoreTable)?;
                info!(model = %table.model(), version = %table.version(), config_sha256 = %table.sha256(), path = %path.display(), "score table loaded");
                models.push(crate::score::ScoreModel {
                    table: Arc::new(table),
                    path: path.display().to_string(),
                });
            }
            loaded_tables.clone_from(&models);
            Some(Arc::new(crate::score::Scoring {
                models,
                spo2_scale2_cohorts: sc.spo2_scale2_cohorts.iter().cloned().collect(),
                // Set from the `[models]` file by `Sequencer::set_models` below.
                registry: None,
            }))
        }
        None => None,
    };
    let mut patients = HashMap::new();
    for (patient, json) in store.load_patient_score_states()? {
        let state = serde_json::from_str(&json).map_err(|source| RunError::ScoreState {
            path: store.path().to_path_buf(),
            source,
        })?;
        patients.insert(patient, state);
    }
    let mut sequencer = Sequencer::new(
        config.window(),
        store.load_sequences(config.window())?,
        store.load_open_gaps()?,
        alert_states,
        rules.clone(),
    )
    .with_scoring(scoring, patients);
    // The model registry (issue 21): an invalid file refuses the start, like the rules.
    let models = match &config.models {
        Some(m) => Some(Arc::new(
            vitalmq_policies::ModelRegistry::load(&m.file).map_err(RunError::Models)?,
        )),
        None => None,
    };
    if let (Some(m), Some(_)) = (&models, &config.scoring) {
        if let Err(e) = crate::rollout::check_tables(&loaded_tables, m) {
            let _ = auditor.record(crate::rollout::tables_refused_record(&e, m.sha256()));
            return Err(e.into());
        }
    }
    // With candidates: every rule set is the registry's, and the rollout's live and
    // canary versions are loaded, else no start (audited).
    let mut rule_set_guard = None;
    if let (Some(a), Some(base), Some(m)) = (&config.alerts, &rules, &models)
        && !candidates.is_empty()
    {
        let base_path = a.rules.display().to_string();
        let sets: Vec<(&str, &vitalmq_policies::RuleSet)> =
            std::iter::once((base_path.as_str(), base.as_ref()))
                .chain(candidates.iter().map(|(p, s)| (p.as_str(), s.as_ref())))
                .collect();
        let model = match crate::rollout::check_rule_sets(&sets, m) {
            Ok(model) => model,
            Err(e) => {
                let _ = auditor.record(crate::rollout::rule_sets_refused_record(&e, m.sha256()));
                return Err(e.into());
            }
        };
        for (i, (path, set)) in sets.iter().enumerate() {
            let _ = auditor.record(crate::rollout::rule_set_loaded_record(
                &model,
                set,
                path,
                i > 0,
                m,
            ));
        }
        sequencer = sequencer.with_candidates(
            model.clone(),
            candidates.iter().map(|(_, s)| Arc::clone(s)).collect(),
        );
        rule_set_guard = Some(crate::reload::RuleSetGuard::new(
            model,
            base_path.clone(),
            Arc::clone(base),
            candidates.clone(),
            Arc::clone(m),
        ));
    }
    if let Some(m) = &models {
        info!(policy_sha256 = %m.sha256(), models = m.entries().len(), unapproved_alarms = m.unapproved_alarms().as_str(), "model checking on");
    }
    sequencer.set_models(models.clone(), 0);
    // The score tables taken into force, with their roles in the rollout at start.
    for t in &loaded_tables {
        let _ = auditor.record(crate::rollout::table_loaded_record(
            t.table.model(),
            t.table.version(),
            t.table.sha256(),
            &t.path,
            models.as_deref(),
        ));
    }
    let models_watch = match (&config.models, &models) {
        (Some(c), Some(m)) => Some(crate::reload::watch_models(
            c.file.clone(),
            Arc::clone(m),
            loaded_tables.clone(),
            auditor.clone(),
            rule_set_guard.clone(),
        )),
        _ => None,
    };
    let pseudonym_key = match &config.pseudonyms {
        Some(p) => Some(read_pseudonym_key(&p.key_file)?),
        None => None,
    };
    let mut sinks = Vec::new();
    let mut object_sinks = Vec::new();
    let mut parquet_sinks = Vec::new();
    for s in &config.sinks {
        store.register_sink(s.name())?;
        let (sink, objects) = match parquet_sink(s, &registry_watch.registry)? {
            Some(parquet) => {
                parquet_sinks.push(Arc::clone(&parquet));
                (parquet as Arc<dyn Sink>, None)
            }
            None => build_sink(s, keyring.as_ref(), Some(&registry_watch.registry))?,
        };
        // The audit logs name devices, operators and patients' alerts: they are
        // shipped to care sinks only, never into a research or other data set.
        if s.purpose() == vitalmq_policies::Purpose::Care {
            object_sinks.extend(objects);
        }
        let mut governance = crate::drain::SinkGovernance::new(
            s.purpose(),
            s.fields(),
            registry_watch.registry.clone(),
        );
        governance.pseudonym = pseudonym_key
            .filter(|_| s.pseudonymised())
            .map(|k| PurposePseudonym::new(k, s.purpose()));
        governance.stale = Some(registry_watch.stale.clone());
        sinks.push((sink, drain_settings(s), governance));
    }
    let bridge_identity = format!("spiffe://{}/bridge/{}", registry.trust_domain(), config.id);
    auditor.record(
        AuditRecord::new(Component::Bridge, AuditEvent::ComponentStarted)
            .resource(bridge_identity.clone())
            .detail("devices_known", sequencer_devices(&store, &config)?)
            .detail(
                "sinks",
                config
                    .sinks
                    .iter()
                    .map(|s| s.name().to_owned())
                    .collect::<Vec<_>>(),
            )
            .detail(
                "exposed_paths",
                exposed.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ),
    )?;

    let options = mqtt::options(&config.broker, &config.id, true).map_err(RunError::Mqtt)?;
    let (client, eventloop) = mqtt::client(options, 4096);

    let (ops_tx, ops_rx) = mpsc::unbounded_channel::<OpsAlert>();
    tokio::spawn(crate::reload::report_stale(
        registry_watch.stale.clone(),
        config.registry.clone(),
        ops_tx.clone(),
    ));
    let (incoming_tx, incoming_rx) = mpsc::unbounded_channel::<Inbound>();
    let (batch_tx, batch_rx) = mpsc::channel::<Work<AckToken>>(2);
    let (done_tx, done_rx) = mpsc::unbounded_channel::<Recorded<AckToken>>();
    let (stop_tx, stop_rx) = watch::channel(false);

    // Alert rules (reloaded on change) and handlers, each with its own cursor and task.
    let mut rules_watch = None;
    let mut handlers = Vec::new();
    if let (Some(a), Some(initial)) = (&config.alerts, &rules) {
        let names = handler_names(a);
        rules_watch = Some(crate::reload::watch_rules(
            a.rules.clone(),
            Arc::clone(initial),
            names,
            auditor.clone(),
            rule_set_guard.clone(),
        ));
        let publisher = crate::config::BrokerLink {
            cert: a.publisher.cert.clone(),
            key: a.publisher.key.clone(),
            ..config.broker.clone()
        };
        handlers.push(Handler::mqtt(
            mqtt::V5Endpoint::new(&publisher, &a.publisher.client_id).map_err(RunError::Mqtt)?,
        ));
        for w in &a.webhooks {
            let secret = std::env::var(&w.secret_env).map_err(|source| RunError::WebhookEnv {
                webhook: w.name.clone(),
                var: w.secret_env.clone(),
                source,
            })?;
            let signer = crate::webhook::WebhookSigner::parse(&secret).map_err(|source| {
                RunError::WebhookSecret {
                    webhook: w.name.clone(),
                    var: w.secret_env.clone(),
                    source,
                }
            })?;
            let fields = w.fields();
            let governance = (w.purpose != vitalmq_policies::Purpose::Care
                || fields != Fields::All)
                .then(|| crate::delivery::AlertGovernance {
                    purpose: w.purpose,
                    fields,
                    registry: registry_watch.registry.clone(),
                    pseudonym: pseudonym_key
                        .filter(|_| w.pseudonymised())
                        .map(|k| PurposePseudonym::new(k, w.purpose)),
                    stale: Some(registry_watch.stale.clone()),
                });
            handlers.push(
                Handler::webhook(w.name.clone(), w.url.clone(), signer)?.governed(governance),
            );
        }
        for name in &a.fhir {
            // validate() checked that it names a FHIR sink.
            if let Some(SinkConfig::Fhir(f)) = config.sinks.iter().find(|s| s.name() == name) {
                let sink = FhirSink::new(f).map_err(|source| RunError::FhirSink {
                    sink: f.name.clone(),
                    source,
                })?;
                handlers.push(Handler::Fhir {
                    name: name.clone(),
                    sink: Box::new(sink),
                });
            }
        }
    }
    let (feeds, inboxes): (Vec<_>, Vec<_>) =
        handlers.iter().map(|_| crate::delivery::feed()).unzip();

    let recorder = Recorder {
        store,
        sequencer,
        registry: Arc::clone(&registry),
        registry_updates: Some(registry_watch.registry.clone()),
        origin: Origin {
            broker: config.broker.address.clone(),
            bridge: bridge_identity.clone(),
        },
        auditor: auditor.clone(),
        settings: RecorderSettings {
            max_backlog: config.pipeline.max_backlog,
            resume_backlog: config.pipeline.resume_backlog,
            sinks: config.sinks.iter().map(|s| s.name().to_owned()).collect(),
        },
        ops: ops_tx.clone(),
        rules: rules_watch.as_ref().map(|w| w.rules.clone()),
        models: models_watch.as_ref().map(|w| w.models.clone()),
        handlers: feeds,
        rate_watches: vec![
            RateWatch::new(OpsKind::Refusals, config.ops.refusals_per_minute),
            RateWatch::new(OpsKind::Replays, config.ops.replays_per_minute),
            RateWatch::new(OpsKind::Gaps, config.ops.gaps_per_minute),
        ],
        store_writable: Arc::clone(&store_writable),
    };
    let recorder = std::thread::Builder::new()
        .name("vitalmq-recorder".into())
        .spawn(move || recorder.run(batch_rx, done_tx))
        .map_err(RunError::RecorderThread)?;

    let ingest = tokio::spawn(ingest(
        incoming_rx,
        batch_tx,
        registry_watch.registry.clone(),
        config.pipeline.batch_max,
    ));
    let connection = Arc::new(AtomicU64::new(0));
    let acker = tokio::spawn(acker(
        client.clone(),
        done_rx,
        ops_rx,
        Duration::from_millis(config.pipeline.receipt_interval_ms.max(10)),
        Arc::clone(&connection),
    ));
    let mut drains = Vec::new();
    for (sink, settings, governance) in sinks {
        let store = Arc::new(Mutex::new(open_store()?));
        drains.push(tokio::spawn(drain::drain(
            sink,
            store,
            settings,
            governance,
            auditor.clone(),
            ops_tx.clone(),
            stop_rx.clone(),
        )));
    }
    // The surveillance sinks' other tables (alerts, refusals, gaps, scores).
    for parquet in parquet_sinks {
        let follower = crate::sink::parquet::Follower {
            sink: parquet,
            store: Arc::new(Mutex::new(open_store()?)),
            registry: registry_watch.registry.clone(),
            pseudonym: pseudonym_key
                .map(|k| PurposePseudonym::new(k, vitalmq_policies::Purpose::Surveillance)),
            auditor: auditor.clone(),
            batch_max: SURVEIL_BATCH,
        };
        drains.push(tokio::spawn(follower.run(SURVEIL_EVERY, stop_rx.clone())));
    }
    for (handler, inbox) in handlers.into_iter().zip(inboxes) {
        let store = Arc::new(Mutex::new(open_store()?));
        drains.push(tokio::spawn(crate::delivery::run_handler(
            handler,
            store,
            inbox,
            rules_watch.as_ref().map(|w| w.rules.clone()),
            auditor.clone(),
            ops_tx.clone(),
            stop_rx.clone(),
        )));
    }
    // The audit logs on this host: shipped to object storage, and measured.
    let audit_logs = shipped_audit_logs(&config, &auditor);
    drains.push(tokio::spawn(crate::audit_ship::ship(
        audit_logs.clone(),
        object_sinks,
        Arc::new(Mutex::new(open_store()?)),
        auditor.clone(),
        ops_tx.clone(),
        stop_rx.clone(),
    )));
    crate::lifecycle::spawn(&config, &auditor, stop_rx.clone())?;
    tokio::spawn(crate::audit_size::watch(
        audit_logs,
        crate::audit_size::Limits {
            max_bytes: config.ops.audit_max_bytes,
            min_free_bytes: config.ops.audit_min_free_bytes,
        },
        Duration::from_secs(config.ops.audit_check_interval_s.max(1)),
        ops_tx.clone(),
        stop_rx.clone(),
    ));
    tokio::spawn(crate::certwatch::watch(
        certificates_in_use(&config),
        config.ops.cert_expiry_days,
        ops_tx.clone(),
        stop_rx.clone(),
    ));
    drop(ops_tx);

    let ticks = tokio::spawn(tick(incoming_tx.clone()));
    let events = tokio::spawn(event_loop(
        client.clone(),
        eventloop,
        incoming_tx,
        Arc::clone(&connection),
        Arc::clone(&connected),
    ));
    shutdown.await;
    info!("stopping: finishing the batch in progress");
    ticks.abort();
    let _ = ticks.await;
    events.abort();
    let _ = events.await;
    let _ = stop_tx.send(true);
    // The ingest task ends when the event loop's sender is gone; then the recorder.
    let _ = tokio::time::timeout(Duration::from_secs(10), ingest).await;
    let _ = tokio::task::spawn_blocking(move || recorder.join()).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), acker).await;
    for d in drains {
        let _ = tokio::time::timeout(Duration::from_secs(5), d).await;
    }
    let _ = client.disconnect().await;
    let _ = auditor.record(
        AuditRecord::new(Component::Bridge, AuditEvent::ComponentStopped).resource(bridge_identity),
    );
    drop(rules_watch);
    drop(registry_watch);
    audit.close().map_err(RunError::CloseAudit)?;
    Ok(())
}

/// The names of the alert handlers `alerts` configures, as the rule set's `[escalation]`
/// names them: `mqtt`, then `webhook:<name>` per webhook.
pub(crate) fn handler_names(alerts: &crate::config::AlertsConfig) -> Vec<String> {
    std::iter::once("mqtt".to_owned())
        .chain(
            alerts
                .webhooks
                .iter()
                .map(|w| format!("webhook:{}", w.name)),
        )
        .chain(alerts.fhir.iter().map(|f| format!("fhir:{f}")))
        .collect()
}

/// The bridge's own audit log, then those of `[[audit_ship]]`.
fn shipped_audit_logs(
    config: &BridgeConfig,
    own: &vitalmq_audit::Auditor,
) -> Vec<crate::audit_ship::ShippedLog> {
    let mut logs = vec![crate::audit_ship::ShippedLog {
        component: "bridge".to_owned(),
        path: config.audit_path(),
        retention: config.audit_retention.clone(),
        own: Some(own.clone()),
    }];
    logs.extend(
        config
            .audit_ship
            .iter()
            .map(|a| crate::audit_ship::ShippedLog {
                component: a.component.clone(),
                path: a.path.clone(),
                retention: a.retention.clone(),
                own: None,
            }),
    );
    logs
}

/// Every certificate this bridge presents: its own, the alert publisher's, and those of
/// upstream sinks.
fn certificates_in_use(config: &BridgeConfig) -> Vec<std::path::PathBuf> {
    let mut certs = vec![config.broker.cert.clone()];
    if let Some(a) = &config.alerts {
        certs.push(a.publisher.cert.clone());
    }
    for s in &config.sinks {
        if let SinkConfig::Upstream { link, .. } = s {
            certs.push(link.cert.clone());
        }
    }
    certs
}

fn sequencer_devices(store: &Store, config: &BridgeConfig) -> Result<usize, StoreError> {
    Ok(store.load_sequences(config.window())?.len())
}

/// What acknowledges one message to the broker: the PUBLISH and the connection it came
/// on. rumqttd does not resend a persistent session's unacknowledged messages with their
/// packet ids after a reconnect; it resends them with fresh ones. An acknowledgement
/// of an earlier connection's packet id would hit another message (or, as rumqttd
/// refuses out-of-order acknowledgements, drop the connection again), so those are
/// never sent: the broker redelivers the message, and the sequence window counts the
/// copy as a duplicate.
#[derive(Debug)]
pub struct AckToken {
    /// Counts CONNACKs; see [`event_loop`].
    connection: u64,
    publish: rumqttc::Publish,
}

/// What the event loop hands the ingest stage, in arrival order.
#[derive(Debug)]
enum Inbound {
    /// A device message, to verify and sequence.
    Message(Incoming<AckToken>),
    /// Anything else for the recorder; the token acknowledges its PUBLISH (none for a
    /// tick).
    Control(Control, Option<AckToken>),
}

/// Sorts a PUBLISH by topic: acknowledgements of alerts (`alerts/{site}/ack/{id}`) and
/// presence (`presence/...`) are control inputs, the rest device messages.
fn inbound(topic: &str, payload: bytes::Bytes, received_at_ms: u64, token: AckToken) -> Inbound {
    let parts: Vec<&str> = topic.split('/').collect();
    let control = match parts.as_slice() {
        ["alerts", _, "ack", _] => Some(Control::Ack {
            topic: topic.to_owned(),
            payload: payload.clone(),
            received_at_ms,
        }),
        ["presence", ..] => Some(Control::Presence {
            topic: topic.to_owned(),
            payload: payload.clone(),
            received_at_ms,
        }),
        _ => None,
    };
    match control {
        Some(c) => Inbound::Control(c, Some(token)),
        None => Inbound::Message(Incoming {
            topic: topic.to_owned(),
            payload,
            received_at_ms,
            token,
        }),
    }
}

/// The bridge's clock for the recorder: a `Control::Tick` about once a second, in line
/// with the messages (silence and re-escalation timers, the paused store's retry).
async fn tick(incoming: mpsc::UnboundedSender<Inbound>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let tick = Control::Tick { now_ms: now_ms() };
        if incoming.send(Inbound::Control(tick, None)).is_err() {
            return;
        }
    }
}

/// Polls the MQTT connection: subscribes after every CONNACK, forwards every PUBLISH.
async fn event_loop(
    client: AsyncClient,
    mut eventloop: rumqttc::EventLoop,
    incoming: mpsc::UnboundedSender<Inbound>,
    connection: Arc<AtomicU64>,
    connected: Arc<AtomicBool>,
) {
    let mut announced = false;
    let mut delay = Duration::from_millis(200);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let topic = p.topic.clone();
                let payload = p.payload.clone();
                let token = AckToken {
                    connection: connection.load(Ordering::Acquire),
                    publish: p,
                };
                if incoming
                    .send(inbound(&topic, payload, now_ms(), token))
                    .is_err()
                {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                delay = Duration::from_millis(200);
                connection.fetch_add(1, Ordering::AcqRel);
                connected.store(true, Ordering::Release);
                info!(
                    session_present = ack.session_present,
                    "connected to the broker"
                );
                let filters = SUBSCRIPTIONS
                    .iter()
                    .map(|f| rumqttc::SubscribeFilter::new((*f).to_owned(), QoS::AtLeastOnce));
                if let Err(e) = client.try_subscribe_many(filters) {
                    error!(error = %e, "cannot subscribe");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused: Vec<&str> = ack
                    .return_codes
                    .iter()
                    .zip(SUBSCRIPTIONS)
                    .filter(|(c, _)| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    .map(|(_, f)| f)
                    .collect();
                let devices_refused = refused
                    .iter()
                    .any(|f| SUBSCRIPTIONS[..DEVICE_FILTERS].contains(f));
                if !refused.is_empty() {
                    error!(
                        filters = ?refused,
                        "the broker refused a subscription: check the bridge's certificate and the ACL{}",
                        if devices_refused { "" } else { " (alert acknowledgements or presence will not reach the bridge)" }
                    );
                }
                if !devices_refused && !announced {
                    announced = true;
                    info!(filters = ?SUBSCRIPTIONS, "{READY}");
                }
            }
            Ok(_) => {}
            Err(e) => {
                connected.store(false, Ordering::Release);
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "broker connection lost");
                tokio::time::sleep(delay).await;
                // Capped low: devices buffer while the bridge is away.
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Batches verified at once: one per core, so that both cores verify while the
/// recorder commits, and a batch delayed on one core does not leave the other idle.
const VERIFY_IN_FLIGHT: usize = 2;

/// One item of the ingest stage's ordered output: a batch being verified, or a control
/// input already in its final form.
type Pending = futures::future::BoxFuture<'static, Result<Work<AckToken>, tokio::task::JoinError>>;

/// Batches incoming messages and verifies them on both cores, handing the results to the
/// recorder in arrival order (the sequence check depends on it); control inputs keep
/// their place between the batches.
///
/// Up to [`VERIFY_IN_FLIGHT`] batches are verified at the same time, each on one
/// blocking thread. A new batch starts as soon as a slot is free, with whatever has
/// arrived (up to `batch_max`, and up to the next control input): small batches at low
/// rates, full ones under load.
async fn ingest(
    mut incoming: mpsc::UnboundedReceiver<Inbound>,
    batches: mpsc::Sender<Work<AckToken>>,
    registry: watch::Receiver<Arc<DeviceRegistry>>,
    batch_max: usize,
) {
    use futures::{FutureExt as _, StreamExt as _};
    let mut verifying: futures::stream::FuturesOrdered<Pending> =
        futures::stream::FuturesOrdered::new();
    let mut open = true;
    // A control input that ended the batch before it, next in line.
    let mut held: Option<Inbound> = None;
    loop {
        let next = if verifying.len() < VERIFY_IN_FLIGHT {
            held.take()
        } else {
            None
        };
        let next = match next {
            Some(n) => Some(n),
            None => tokio::select! {
                biased;
                Some(verified) = verifying.next(), if !verifying.is_empty() => {
                    match verified {
                        Ok(work) => {
                            if batches.send(work).await.is_err() {
                                return;
                            }
                        }
                        // verify() does not panic on any input (fuzzed); if it ever did,
                        // the batch stays unacknowledged and the broker redelivers it.
                        Err(e) => error!(error = %e, "verify task failed; the batch stays unacknowledged"),
                    }
                    continue;
                },
                first = incoming.recv(), if open && held.is_none() && verifying.len() < VERIFY_IN_FLIGHT => match first {
                    Some(first) => Some(first),
                    None => {
                        open = false;
                        continue;
                    }
                },
                else => return,
            },
        };
        match next {
            Some(Inbound::Control(control, token)) => {
                verifying.push_back(async move { Ok(Work::Control { control, token }) }.boxed());
            }
            Some(Inbound::Message(first)) => {
                let mut batch = vec![first];
                while batch.len() < batch_max {
                    match incoming.try_recv() {
                        Ok(Inbound::Message(m)) => batch.push(m),
                        Ok(control) => {
                            held = Some(control);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                // The registry in force when the batch starts (a reload between verify
                // and sequence is handled there: see `Sequencer::sequence`).
                let registry = Arc::clone(&registry.borrow());
                verifying.push_back(
                    tokio::task::spawn_blocking(move || {
                        let started = std::time::Instant::now();
                        let checked = batch
                            .into_iter()
                            .map(|m| classify::verify(&registry, m))
                            .collect::<Vec<_>>();
                        crate::observe::verify_batch_duration(started.elapsed());
                        Work::Batch(checked)
                    })
                    .boxed(),
                );
            }
            None => {}
        }
    }
}

/// Acknowledges recorded messages, sends coalesced receipts and operational alerts.
async fn acker(
    client: AsyncClient,
    mut recorded: mpsc::UnboundedReceiver<Recorded<AckToken>>,
    mut ops: mpsc::UnboundedReceiver<OpsAlert>,
    interval: Duration,
    connection: Arc<AtomicU64>,
) {
    let mut pending: HashMap<DeviceId, ReceiptPoint> = HashMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ops_open = true;
    loop {
        tokio::select! {
            r = recorded.recv() => match r {
                Some(r) => {
                    let current = connection.load(Ordering::Acquire);
                    let mut stale = 0usize;
                    for t in &r.tokens {
                        if t.connection != current {
                            stale += 1;
                            continue;
                        }
                        if let Err(e) = client.ack(&t.publish).await {
                            warn!(error = %e, "cannot acknowledge; the broker will redeliver");
                        }
                    }
                    if stale > 0 {
                        debug!(stale, "not acknowledging messages of an earlier connection; the broker redelivers them");
                    }
                    for (d, point) in r.receipts {
                        pending.insert(d, point);
                    }
                }
                None => {
                    flush_receipts(&client, &mut pending).await;
                    return;
                }
            },
            a = ops.recv(), if ops_open => match a {
                Some(a) => {
                    warn!(topic = %a.topic(), state = a.state, reason = %a.reason, "operational alert");
                    if let Err(e) = client.publish(a.topic(), QoS::AtLeastOnce, false, a.to_json()).await {
                        warn!(error = %e, "cannot publish an operational alert");
                    }
                }
                None => ops_open = false,
            },
            _ = tick.tick() => flush_receipts(&client, &mut pending).await,
        }
    }
}

async fn flush_receipts(client: &AsyncClient, pending: &mut HashMap<DeviceId, ReceiptPoint>) {
    for (device, point) in pending.drain() {
        debug!(device = %device, epoch = point.epoch, seq = point.seq, "receipt");
        if let Err(e) = client
            .publish(
                format!("devices/{device}/ack"),
                QoS::AtLeastOnce,
                false,
                crate::receipt::encode(point),
            )
            .await
        {
            warn!(error = %e, device = %device, "cannot send a receipt; the next one covers it");
        }
    }
}

/// Refuses to start on a store holding sealed rows beside a keyring with no key and no
/// tombstone: the wrong keyring (a restore beside a fresh default one, say) would leave
/// every sealed row unreadable and seal new data under keys that collide with the lost
/// ones.
fn refuse_foreign_keyring(
    store: &Store,
    keyring: &vitalmq_keyring::Keyring,
) -> Result<(), RunError> {
    let sealed = crate::store::coverage::holds_sealed_rows(store.path()).map_err(|source| {
        RunError::ForeignKeyring(format!("{}: {source}", store.path().display()))
    })?;
    if !sealed {
        return Ok(());
    }
    let newest = crate::store::coverage::coverage_of_newest(store.path(), keyring, 64)
        .map_err(|e| RunError::ForeignKeyring(e.to_string()))?;
    if newest.missing > 0 {
        return Err(RunError::ForeignKeyring(format!(
            "the store {} holds sealed payloads whose keys the keyring {} does not hold \
             ({} of the {} key versions its newest rows name): it is not this store's \
             keyring, or an older copy of it (after a restore, point [encryption] keyring \
             at the original one)",
            store.path().display(),
            keyring.path().display(),
            newest.missing,
            newest.key_versions
        )));
    }
    Ok(())
}

/// The keyring of `[encryption]`, if configured: every store connection of this bridge
/// seals with it. Its key file must exist (`vitalmq keys init`); the keyring file is
/// made on first use.
pub(crate) fn open_keyring(
    config: &BridgeConfig,
) -> Result<Option<Arc<vitalmq_keyring::Keyring>>, vitalmq_keyring::KeyError> {
    let Some(e) = &config.encryption else {
        return Ok(None);
    };
    let provider = vitalmq_keyring::LocalKeyFile::load(&e.key_file)?;
    let keyring =
        vitalmq_keyring::Keyring::open(&e.keyring_path(&config.data_dir), Arc::new(provider))?;
    info!(keyring = %keyring.path().display(), "encryption at rest on: new payloads are sealed");
    Ok(Some(Arc::new(keyring)))
}
