//! `vitalmq bridge --config FILE`: the configuration file. See
//! `bridge/examples/bridge.toml` for a commented example. Relative paths are relative
//! to the file's directory.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use vitalmq_policies::Purpose;

use crate::governance::{EVENT_FIELDS, Fields, RAW_FIELD};
use crate::window::{WindowError, WindowSize};

/// The parsed configuration, paths resolved.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// The bridge's identity id; must be the `{id}` of its certificate (it is also the
    /// MQTT client id, and the persistent session the broker keeps).
    pub id: String,
    /// Where the store, quarantine and audit log live.
    pub data_dir: PathBuf,
    /// Device registry (`vitalmq-registry/v1`).
    pub registry: PathBuf,
    /// Audit log; default `DATA_DIR/audit.jsonl`.
    #[serde(default)]
    pub audit: Option<PathBuf>,
    /// Retention class of the audit segments shipped to the objects sinks (a path
    /// component, `audit/retention=<class>/...`, for the bucket's lifecycle rules).
    #[serde(default = "default_audit_retention")]
    pub audit_retention: String,
    /// Further audit logs on this host to ship through the objects sinks (the broker's).
    #[serde(default)]
    pub audit_ship: Vec<AuditShipConfig>,
    pub broker: BrokerLink,
    #[serde(default)]
    pub pipeline: Pipeline,
    #[serde(default)]
    pub sinks: Vec<SinkConfig>,
    /// The alert engine and its handlers; no alerts without it.
    #[serde(default)]
    pub alerts: Option<AlertsConfig>,
    #[serde(default)]
    pub ops: OpsConfig,
    /// The model registry device-reported models are checked against; none when absent.
    #[serde(default)]
    pub models: Option<ModelsConfig>,
    /// The operations endpoint (`/metrics`, `/healthz`, `/readyz`); none when absent.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// What to do at start when the data directory, an object directory or the audit
    /// log is readable by other local users: `refuse` (default) or `warn`.
    #[serde(default)]
    pub private_files: vitalmq_private_fs::ExposurePolicy,
    /// Per-purpose pseudonyms; required by a sink or alert handler of a purpose other
    /// than care whose field list names `patient_ref`.
    #[serde(default)]
    pub pseudonyms: Option<PseudonymsConfig>,
    /// Encryption at rest of the store's payloads; plaintext (as before issue 20)
    /// without it.
    #[serde(default)]
    pub encryption: Option<EncryptionConfig>,
    /// The retention job (issue 20); none, and nothing is ever deleted, without it.
    #[serde(default)]
    pub lifecycle: Option<LifecycleConfig>,
    /// Server-side scores (issue 21); needs `[alerts]` (cohorts, alert book). None
    /// without it.
    #[serde(default)]
    pub scoring: Option<ScoringConfig>,
}

/// `[scoring]`: the score tables (`vitalmq-score/v1`) every accepted vitals reading of
/// a patient is scored with. Until a model registry assigns roles, the first table is
/// the live version (its alerts are delivered) and the others run in shadow.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoringConfig {
    /// Score table files, live first.
    pub tables: Vec<PathBuf>,
    /// Rule-set `[cohorts]` whose patients are scored on SpO2 scale 2 (hypercapnic
    /// respiratory failure); their air/oxygen flag is the `o2` metric when sent.
    #[serde(default)]
    pub spo2_scale2_cohorts: Vec<String>,
}

/// `[encryption]`: every payload the store writes (raw bytes, normalized events, alert
/// bodies with patient content, quarantined bytes) is sealed under a per-subject data
/// key from the keyring (`vitalmq_keyring`); erasing a patient destroys their keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    /// The key-encryption keys (`vitalmq-kek/v1`, made by `vitalmq keys init`).
    pub key_file: PathBuf,
    /// The keyring; default `DATA_DIR/keyring.sqlite3`. Keep it out of store backups.
    #[serde(default)]
    pub keyring: Option<PathBuf>,
}

impl EncryptionConfig {
    /// Where the keyring is, for a bridge whose data directory is `data_dir`.
    pub fn keyring_path(&self, data_dir: &std::path::Path) -> PathBuf {
        self.keyring
            .clone()
            .unwrap_or_else(|| data_dir.join(vitalmq_keyring::KEYRING_FILE))
    }
}

/// `[lifecycle]`: the retention job (`crate::lifecycle`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleConfig {
    /// The retention classes (`vitalmq-retention/v1`), read at every run.
    pub retention: PathBuf,
    /// The legal holds (`vitalmq-holds/v1`), read at every run, so a hold placed
    /// between runs counts at the next one.
    #[serde(default)]
    pub holds: Option<PathBuf>,
    /// How often the job runs (a `humantime` duration; default 1h).
    #[serde(default = "default_lifecycle_every")]
    pub every: String,
    /// Store rows per transaction.
    #[serde(default = "default_lifecycle_batch")]
    pub batch: usize,
}

impl LifecycleConfig {
    /// `every` as a duration (checked when the configuration was loaded).
    pub fn every(&self) -> std::time::Duration {
        humantime::parse_duration(&self.every).unwrap_or(std::time::Duration::from_secs(3600))
    }
}

fn default_lifecycle_every() -> String {
    "1h".to_owned()
}

fn default_lifecycle_batch() -> usize {
    500
}

/// `[pseudonyms]`: a sink or alert handler of a purpose other than care that lists
/// `patient_ref` gets, in its place, `pt-` + 32 hex of HMAC-SHA256(key,
/// "vitalmq-pseudonym/v1" NUL purpose NUL care `patient_ref`) (the construction of
/// `vitalmq_policies::Pseudonymiser`, with the care pseudonym as input): one patient's
/// events link within the purpose, and without the key nobody links them to the care
/// pseudonym or across purposes. Use a key of its own, not the re-identification
/// store's.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PseudonymsConfig {
    /// 32 random bytes (raw, as `vitalmq reid` keeps its key), readable only by the
    /// bridge's user.
    pub key_file: PathBuf,
}

/// `[models]`: the model registry (`vitalmq-models/v1`) device-reported models are
/// checked against (issue 21); reloaded on change or SIGHUP. Without it no model is
/// checked and the normalized events carry no `model_status`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsConfig {
    pub file: PathBuf,
}

/// `[metrics]`: where the bridge serves Prometheus `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// The address to bind; port 0 picks a free port (the log says which).
    pub listen: std::net::SocketAddr,
}

/// Another component's audit log, shipped like the bridge's own: its file on disk is
/// the durable outbox of its records (the component writes, the bridge reads).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditShipConfig {
    /// Label in object names, `component=<label>`, and in the shipping cursors; unique,
    /// and not `bridge` (the bridge's own log).
    pub component: String,
    /// The log file (JSON lines, `vitalmq-audit/v1`); it need not exist yet.
    pub path: PathBuf,
    /// Retention class in object names, `retention=<class>`.
    #[serde(default = "default_audit_retention")]
    pub retention: String,
}

/// When the bridge raises operational alerts on `ops/bridge/<kind>` (0 turns one off).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpsConfig {
    /// Messages refused by verification per sliding minute (`ops/bridge/refusals`).
    pub refusals_per_minute: u64,
    /// Replay attempts per minute (`ops/bridge/replays`).
    pub replays_per_minute: u64,
    /// New sequence gaps per minute (`ops/bridge/gaps`).
    pub gaps_per_minute: u64,
    /// Warn when a certificate the bridge uses expires within this many days
    /// (`ops/bridge/cert_expiry`).
    pub cert_expiry_days: u64,
    /// An audit log on this host (the bridge's, and those in `[[audit_ship]]`) larger
    /// than this raises `ops/bridge/audit_disk` (0: off).
    pub audit_max_bytes: u64,
    /// ... as does less free space than this on an audit log's file system (0: off).
    pub audit_min_free_bytes: u64,
    /// How often audit disk use is measured.
    pub audit_check_interval_s: u64,
}

impl Default for OpsConfig {
    fn default() -> Self {
        Self {
            refusals_per_minute: 30,
            replays_per_minute: 5,
            gaps_per_minute: 30,
            cert_expiry_days: 30,
            audit_max_bytes: 1 << 30,
            audit_min_free_bytes: 256 << 20,
            audit_check_interval_s: 60,
        }
    }
}

/// Alert rules and where alerts go (SPEC section 5).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// Rule file (`vitalmq-rules/v1`); reloaded on change or SIGHUP. The BASE rule set:
    /// escalation, acknowledgement, handlers, silence, alarms, battery, cohorts and
    /// plausibility always come from it.
    pub rules: PathBuf,
    /// Candidate rule sets (issue 21): more `vitalmq-rules/v1` files, loaded at start,
    /// whose `[[rules]]` and `[quality]` run in shadow or as a canary as the models
    /// file's `[[rollout]]` of the rule set says. Each must be an entry of the model
    /// registry with its digest (so `[models]` is required with them).
    #[serde(default)]
    pub candidates: Vec<PathBuf>,
    /// The alert publisher's identity (role bridge, e.g. `bridge-01-alerts`): alerts go
    /// over a connection of their own so each PUBACK confirms one. Address and CA are
    /// the `[broker]` ones.
    pub publisher: AlertPublisher,
    #[serde(default)]
    pub webhooks: Vec<WebhookConfig>,
    /// FHIR sinks (by name) whose server also gets every clinical alert change as
    /// DetectedIssue, Task, Communication and Provenance; handler `fhir:<name>` in
    /// `[escalation]`. Care, like the sink.
    #[serde(default)]
    pub fhir: Vec<String>,
}

/// Certificate and key of the alert publisher, and its client id (the certificate's id).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertPublisher {
    pub client_id: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One HTTP endpoint that receives every alert, signed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub name: String,
    pub url: String,
    /// Environment variable holding the signing secrets (never a secret itself here):
    /// Standard Webhooks `whsec_<base64>` keys, separated by white space, newest first.
    pub secret_env: String,
    /// The purpose the handler serves; clinical alerting runs under care (the default).
    #[serde(default)]
    pub purpose: Purpose,
    /// Allow-list of alert fields the handler receives (default: the whole alert for
    /// care, every field but `patient_ref` otherwise, see
    /// [`Fields::alert_default_for`]). A handler of another purpose than care gets a
    /// clinical alert change only under consent (see `crate::delivery`).
    #[serde(default)]
    pub fields: Option<Vec<String>>,
}

impl WebhookConfig {
    /// Whether the handler gets a per-purpose pseudonym in place of `patient_ref`.
    pub fn pseudonymised(&self) -> bool {
        self.purpose != Purpose::Care && self.fields().allows(crate::governance::PATIENT_REF)
    }

    /// The alert fields the handler receives.
    pub fn fields(&self) -> Fields {
        match self.fields.as_deref() {
            None => Fields::alert_default_for(self.purpose),
            Some(list) => Fields::Only(list.iter().cloned().collect()),
        }
    }
}

/// An MQTT connection over mTLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerLink {
    /// `host:port`; the host is also the TLS server name verified.
    pub address: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default = "default_keepalive")]
    pub keepalive_s: u64,
}

/// A label that is safe as one component of an object name.
fn is_object_name_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn default_audit_retention() -> String {
    "audit-7y".to_owned()
}

fn default_keepalive() -> u64 {
    30
}

/// Batching, windows, receipts and backpressure.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pipeline {
    /// Anti-replay window W (SPEC section 4): a multiple of 64 up to 4096.
    pub window: u32,
    /// Most messages recorded in one transaction.
    pub batch_max: usize,
    /// How often receipts are sent (coalesced per device).
    pub receipt_interval_ms: u64,
    /// Outbox size (events not yet confirmed by every sink) at which the bridge stops
    /// acknowledging new messages; the broker holds them meanwhile.
    pub max_backlog: u64,
    /// Outbox size below which acknowledging resumes.
    pub resume_backlog: u64,
    /// Largest size of the store in bytes (0 = only the disk limits it). Reaching it
    /// behaves exactly like a full disk.
    pub max_store_bytes: u64,
}

impl Default for Pipeline {
    fn default() -> Self {
        Self {
            window: crate::window::DEFAULT_WINDOW,
            batch_max: 512,
            receipt_interval_ms: 250,
            max_backlog: 1_000_000,
            resume_backlog: 900_000,
            max_store_bytes: 0,
        }
    }
}

/// One outbox sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum SinkConfig {
    /// Object storage: a local directory, or S3-compatible storage.
    Objects {
        name: String,
        /// Local directory (the embedded default).
        #[serde(default)]
        path: Option<PathBuf>,
        #[serde(default)]
        s3: Option<S3Config>,
        #[serde(default = "default_batch_events")]
        batch_max_events: usize,
        #[serde(default = "default_batch_age")]
        batch_max_age_ms: u64,
        /// The purpose the sink serves (default care): events flow to it only under
        /// consent for it.
        #[serde(default)]
        purpose: Purpose,
        /// Allow-list of normalized-event fields the sink receives (default: see
        /// [`Fields::default_for`]), and `raw` for the signed COSE messages (the
        /// `raw/` objects). With a list, or by default for a purpose other than care,
        /// the sink gets no `raw/` objects unless the list names `raw`: the signed
        /// bytes carry every payload key and the device id, and cannot be minimised.
        #[serde(default)]
        fields: Option<Vec<String>>,
    },
    /// The surveillance data set (issue 21, `docs/surveillance.md`): normalized events,
    /// alerts, refusals and gaps as Parquet files in a local directory or S3-compatible
    /// storage. Its purpose is always `surveillance` and its fields are the sink's own
    /// allow-list ([`crate::sink::parquet::FIELDS`]), with the purpose pseudonym in
    /// place of `patient_ref` (so it needs `[pseudonyms]`).
    Parquet {
        name: String,
        /// Local directory.
        #[serde(default)]
        path: Option<PathBuf>,
        #[serde(default)]
        s3: Option<S3Config>,
        /// Events per file at most (a file covers one outbox batch and ISO week).
        #[serde(default = "default_parquet_batch")]
        batch_max_events: usize,
        /// How long a batch waits to fill before it is written anyway.
        #[serde(default = "default_parquet_age")]
        batch_max_age_ms: u64,
    },
    /// An upstream (cloud) broker: verified messages forwarded unmodified.
    Upstream {
        name: String,
        #[serde(flatten)]
        link: BrokerLink,
        /// MQTT client id at the upstream broker (its certificate's id).
        client_id: String,
        #[serde(default = "default_batch_events")]
        batch_max_events: usize,
        /// As for `objects`.
        #[serde(default)]
        purpose: Purpose,
        /// As for `objects`. The sink forwards the signed messages and nothing else,
        /// so they cannot be minimised: a list (or a purpose other than care, whose
        /// default is a list) must name `raw`, stating that the destination gets
        /// whole messages of the events consent lets through.
        #[serde(default)]
        fields: Option<Vec<String>>,
    },
    /// A FHIR R4 server: each batch one `transaction` Bundle of conditional creates
    /// (see `crate::sink::fhir`).
    Fhir(FhirSinkConfig),
}

/// `[[sinks]] kind = "fhir"`: a FHIR R4 base URL, reached with an OAuth 2.0
/// client-credentials bearer token (RFC 6749 section 4.4).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FhirSinkConfig {
    pub name: String,
    /// The FHIR base URL the transaction Bundles are POSTed to (`https://`; `http://`
    /// only to a loopback host: 127.0.0.0/8, `::1` or `localhost`); no user info, no
    /// fragment.
    pub base_url: String,
    /// The OAuth 2.0 token endpoint.
    pub token_url: String,
    pub client_id: String,
    /// The client secret, alone in an owner-only file (plaintext, or sealed with
    /// `vitalmq keys seal-file`); never in this file.
    pub client_secret_file: PathBuf,
    /// The `scope` asked for (e.g. `system/Observation.write system/Device.write`).
    #[serde(default)]
    pub scope: Option<String>,
    /// An extra root certificate (PEM) trusted for `https://` URLs, beside the system's.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Care only: the FHIR server is a clinical record (refused otherwise at load).
    #[serde(default)]
    pub purpose: Purpose,
    /// Events per transaction Bundle.
    #[serde(default = "default_fhir_batch_events")]
    pub batch_max_events: usize,
    #[serde(default = "default_batch_age")]
    pub batch_max_age_ms: u64,
    /// Deadline of one HTTP request (token or transaction), connection included.
    #[serde(default = "default_fhir_timeout")]
    pub timeout_ms: u64,
    /// Deadline of establishing a connection.
    #[serde(default = "default_fhir_connect_timeout")]
    pub connect_timeout_ms: u64,
}

fn default_fhir_batch_events() -> usize {
    100
}

fn default_fhir_timeout() -> u64 {
    10_000
}

fn default_fhir_connect_timeout() -> u64 {
    3_000
}

fn default_batch_events() -> usize {
    1000
}

fn default_batch_age() -> u64 {
    1000
}

fn default_parquet_batch() -> usize {
    50_000
}

fn default_parquet_age() -> u64 {
    60_000
}

/// S3-compatible storage; credentials come from the environment
/// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`), never from this file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    #[serde(default)]
    pub prefix: String,
    /// Allow a plain-HTTP endpoint (a local test server).
    #[serde(default)]
    pub allow_http: bool,
}

fn default_region() -> String {
    "us-east-1".to_owned()
}

impl BridgeConfig {
    /// What the start check looks at: the data directory and each local object
    /// directory (dedicated to vitalmq, so owner-only as a whole), the audit log and its
    /// signing key (perhaps in a shared log directory, so the files themselves).
    pub fn private_paths(&self) -> Vec<PathBuf> {
        let audit = self.audit_path();
        let mut paths = vec![self.data_dir.clone()];
        paths.push(vitalmq_audit::signing_key_path(&audit));
        paths.push(audit);
        for sink in &self.sinks {
            match sink {
                SinkConfig::Objects { path: Some(p), .. }
                | SinkConfig::Parquet { path: Some(p), .. } => paths.push(p.clone()),
                SinkConfig::Fhir(f) => paths.push(f.client_secret_file.clone()),
                _ => {}
            }
        }
        if let Some(p) = &self.pseudonyms {
            paths.push(p.key_file.clone());
        }
        if let Some(e) = &self.encryption {
            paths.push(e.key_file.clone());
            paths.push(e.keyring_path(&self.data_dir));
        }
        paths.sort();
        paths.dedup();
        paths
    }
}

/// Whether `url`'s host is this machine (127.0.0.0/8, `::1`, `localhost`).
fn loopback_url(url: &str) -> bool {
    match url::Url::parse(url)
        .ok()
        .and_then(|u| u.host().map(|h| h.to_owned()))
    {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

impl FhirSinkConfig {
    /// Care only, usable URLs and limits.
    fn validate(&self) -> Result<(), Invalid> {
        if self.purpose != Purpose::Care {
            return Err(Invalid::FhirPurpose(self.name.clone()));
        }
        let bad = |field, problem| Invalid::FhirSetting {
            sink: self.name.clone(),
            field,
            problem,
        };
        for (field, url) in [("base_url", &self.base_url), ("token_url", &self.token_url)] {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(bad(field, "must be an http:// or https:// URL"));
            }
            // Credentials only in client_id / client_secret_file (a password in a URL
            // ends up in logs and errors); a fragment is never sent, so it means a
            // mistyped URL. `localhost` by name counts as loopback (RFC 6761 reserves
            // it to this machine), like the literal addresses.
            match url::Url::parse(url) {
                Ok(u) if !u.username().is_empty() || u.password().is_some() => {
                    return Err(bad(
                        field,
                        "must not carry user info (credentials go in client_id and client_secret_file)",
                    ));
                }
                Ok(u) if u.fragment().is_some() => {
                    return Err(bad(field, "must not have a #fragment"));
                }
                Ok(_) => {}
                Err(_) => return Err(bad(field, "must be an http:// or https:// URL")),
            }
            // The bearer token, the client secret and patient data travel here: in the
            // clear only to this host itself (a local proxy or test server).
            if url.starts_with("http://") && !loopback_url(url) {
                return Err(bad(
                    field,
                    "must be https:// (http:// only to a loopback host: 127.0.0.0/8, ::1, localhost)",
                ));
            }
        }
        if self.client_id.is_empty() {
            return Err(bad("client_id", "must not be empty"));
        }
        if self.batch_max_events == 0 {
            return Err(bad("batch_max_events", "must be at least 1"));
        }
        if self.timeout_ms == 0 || self.connect_timeout_ms == 0 {
            return Err(bad("timeout_ms", "timeouts must be longer than zero"));
        }
        Ok(())
    }
}

impl SinkConfig {
    pub fn name(&self) -> &str {
        match self {
            Self::Objects { name, .. }
            | Self::Upstream { name, .. }
            | Self::Parquet { name, .. } => name,
            Self::Fhir(f) => &f.name,
        }
    }

    /// The purpose the sink serves.
    pub fn purpose(&self) -> Purpose {
        match self {
            Self::Objects { purpose, .. } | Self::Upstream { purpose, .. } => *purpose,
            Self::Fhir(f) => f.purpose,
            Self::Parquet { .. } => Purpose::Surveillance,
        }
    }

    /// Whether the sink gets a per-purpose pseudonym in place of `patient_ref`.
    pub fn pseudonymised(&self) -> bool {
        self.purpose() != Purpose::Care && self.fields().allows(crate::governance::PATIENT_REF)
    }

    /// The event fields the sink receives.
    pub fn fields(&self) -> Fields {
        match self {
            Self::Objects { fields, .. } | Self::Upstream { fields, .. } => {
                resolve_fields(self.purpose(), fields.as_deref())
            }
            // The clinical record: the whole event (care only, see `validate`).
            Self::Fhir(_) => Fields::All,
            Self::Parquet { .. } => crate::sink::parquet::fields(),
        }
    }
}

/// Every `purpose` of a sink or alert handler names a [`Purpose`].
fn check_purposes(table: &toml::Table) -> Result<(), Invalid> {
    fn entries(v: Option<&toml::Value>) -> Vec<&toml::Table> {
        v.and_then(toml::Value::as_array)
            .map(|a| a.iter().filter_map(toml::Value::as_table).collect())
            .unwrap_or_default()
    }
    let webhooks = table
        .get("alerts")
        .and_then(toml::Value::as_table)
        .and_then(|a| a.get("webhooks"));
    for (list, entry) in entries(table.get("sinks"))
        .into_iter()
        .map(|e| ("sinks", e))
        .chain(
            entries(webhooks)
                .into_iter()
                .map(|e| ("alerts.webhooks", e)),
        )
    {
        if let Some(purpose) = entry.get("purpose").and_then(toml::Value::as_str) {
            purpose
                .parse::<Purpose>()
                .map_err(|source| Invalid::Purpose {
                    list,
                    name: entry
                        .get("name")
                        .and_then(toml::Value::as_str)
                        .unwrap_or("?")
                        .to_owned(),
                    source,
                })?;
        }
    }
    Ok(())
}

/// The allow-list as configured, or the purpose's default.
fn resolve_fields(purpose: Purpose, listed: Option<&[String]>) -> Fields {
    match listed {
        None => Fields::default_for(purpose),
        Some(list) => Fields::Only(list.iter().cloned().collect()),
    }
}

/// Each name in `listed` known (when `known` is given) and listed once.
fn check_fields(
    listed: Option<&[String]>,
    known: Option<&[&str]>,
) -> Result<(), (String, &'static str)> {
    let mut seen = std::collections::HashSet::new();
    for f in listed.unwrap_or_default() {
        if known.is_some_and(|known| !known.contains(&f.as_str())) {
            return Err((f.clone(), "is not a field of the normalized event"));
        }
        if f.is_empty() {
            return Err((f.clone(), "is empty"));
        }
        if !seen.insert(f) {
            return Err((f.clone(), "is listed twice"));
        }
    }
    Ok(())
}

/// A configuration the bridge cannot run with, naming the file; the cause is the source
/// (so `{:#}` reads `<path>: <cause>`).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{}", path.display())]
    Invalid {
        path: PathBuf,
        #[source]
        source: Invalid,
    },
}

/// A setting that parses but cannot be used, named by its field.
#[derive(Debug, thiserror::Error)]
pub enum Invalid {
    #[error("pipeline.window")]
    Window(#[source] WindowError),
    #[error("scoring.tables: at least one score table")]
    ScoringTables,
    #[error("[scoring] needs [alerts]: cohorts and the alert book come with the rule set")]
    ScoringWithoutAlerts,
    #[error(
        "alerts.candidates needs [models]: the model registry's [[rollout]] says where a candidate rule set runs"
    )]
    CandidatesWithoutModels,
    #[error("audit_retention: letters, digits, '-' and '_' only")]
    AuditRetention,
    #[error("audit_ship.component {0:?}: letters, digits, '-' and '_' only (at most 64)")]
    ShipComponent(String),
    #[error("audit_ship.component {0:?}: used twice (\"bridge\" is the bridge's own log)")]
    ShipComponentTwice(String),
    #[error("audit_ship.{0}.retention: letters, digits, '-' and '_' only")]
    ShipRetention(String),
    #[error("audit_ship.{0}.path: the bridge's own audit log is shipped already")]
    ShipsOwnLog(String),
    #[error("pipeline.batch_max: must be at least 1")]
    BatchMax,
    #[error("lifecycle.every {0:?}: a duration longer than zero, such as \"1h\"")]
    LifecycleEvery(String),
    #[error("lifecycle.batch: must be at least 1")]
    LifecycleBatch,
    #[error("pipeline.resume_backlog: must not exceed max_backlog")]
    ResumeBacklog,
    #[error("alerts.webhooks: the name {0:?} is used twice")]
    WebhookTwice(String),
    #[error("alerts.webhooks.{0}: url must be http:// or https://")]
    WebhookUrl(String),
    #[error("sinks: the name {0:?} is used twice")]
    SinkTwice(String),
    #[error("sinks.{0}: give exactly one of `path` and `s3`")]
    SinkTarget(String),
    #[error(
        "sinks.{0}.fields: an upstream sink forwards the signed messages whole; a restricted list must name \"raw\" (or leave purpose care and fields unset)"
    )]
    UpstreamWithoutRaw(String),
    #[error(
        "{0}.fields: a purpose other than care gets patient_ref only as its own pseudonym; configure [pseudonyms] key_file, or leave patient_ref out"
    )]
    PatientRefWithoutPseudonyms(String),
    #[error(
        "sinks.{0}.purpose: a FHIR sink writes the clinical record and serves care only (remove purpose, or set it to \"care\")"
    )]
    FhirPurpose(String),
    #[error("alerts.fhir: {0:?} is not the name of a sink of kind \"fhir\"")]
    AlertsFhir(String),
    #[error("alerts.fhir: {0:?} is listed twice")]
    AlertsFhirTwice(String),
    #[error("sinks.{sink}.{field}: {problem}")]
    FhirSetting {
        sink: String,
        field: &'static str,
        problem: &'static str,
    },
    #[error("sinks.{sink}.fields: {field:?} {problem}")]
    SinkField {
        sink: String,
        field: String,
        problem: &'static str,
    },
    #[error("{list}.{name}.purpose")]
    Purpose {
        list: &'static str,
        name: String,
        #[source]
        source: vitalmq_policies::UnknownPurpose,
    },
    #[error("alerts.webhooks.{handler}.fields: {field:?} {problem}")]
    WebhookField {
        handler: String,
        field: String,
        problem: &'static str,
    },
}

impl BridgeConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let path_buf = || path.to_path_buf();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path_buf(),
            source,
        })?;
        // Purposes first, so an unknown one is reported with the sink's name rather
        // than only the line of its table.
        if let Ok(table) = text.parse::<toml::Table>() {
            check_purposes(&table).map_err(|source| ConfigError::Invalid {
                path: path_buf(),
                source,
            })?;
        }
        let mut config: Self = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve(base);
        config.validate().map_err(|source| ConfigError::Invalid {
            path: path_buf(),
            source,
        })?;
        Ok(config)
    }

    fn resolve(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.data_dir);
        fix(&mut self.registry);
        if let Some(m) = &mut self.models {
            fix(&mut m.file);
        }
        if let Some(p) = &mut self.pseudonyms {
            fix(&mut p.key_file);
        }
        if let Some(e) = &mut self.encryption {
            fix(&mut e.key_file);
            if let Some(k) = &mut e.keyring {
                fix(k);
            }
        }
        if let Some(l) = &mut self.lifecycle {
            fix(&mut l.retention);
            if let Some(h) = &mut l.holds {
                fix(h);
            }
        }
        if let Some(a) = &mut self.audit {
            fix(a);
        }
        if let Some(sc) = &mut self.scoring {
            for t in &mut sc.tables {
                fix(t);
            }
        }
        for a in &mut self.audit_ship {
            fix(&mut a.path);
        }
        let fix_link = |l: &mut BrokerLink| {
            for p in [&mut l.ca, &mut l.cert, &mut l.key] {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        };
        fix_link(&mut self.broker);
        if let Some(a) = &mut self.alerts {
            for p in [&mut a.rules, &mut a.publisher.cert, &mut a.publisher.key]
                .into_iter()
                .chain(a.candidates.iter_mut())
            {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        for sink in &mut self.sinks {
            match sink {
                SinkConfig::Objects { path: Some(p), .. }
                | SinkConfig::Parquet { path: Some(p), .. } => fix(p),
                SinkConfig::Upstream { link, .. } => fix_link(link),
                SinkConfig::Fhir(f) => {
                    fix(&mut f.client_secret_file);
                    if let Some(ca) = &mut f.ca {
                        fix(ca);
                    }
                }
                SinkConfig::Objects { path: None, .. } | SinkConfig::Parquet { path: None, .. } => {
                }
            }
        }
    }

    fn validate(&self) -> Result<(), Invalid> {
        WindowSize::new(self.pipeline.window).map_err(Invalid::Window)?;
        if let Some(sc) = &self.scoring {
            if sc.tables.is_empty() {
                return Err(Invalid::ScoringTables);
            }
            if self.alerts.is_none() {
                return Err(Invalid::ScoringWithoutAlerts);
            }
        }
        if self.models.is_none()
            && self
                .alerts
                .as_ref()
                .is_some_and(|a| !a.candidates.is_empty())
        {
            return Err(Invalid::CandidatesWithoutModels);
        }
        if !is_object_name_part(&self.audit_retention) {
            return Err(Invalid::AuditRetention);
        }
        let mut labels = std::collections::HashSet::from(["bridge"]);
        for a in &self.audit_ship {
            if !is_object_name_part(&a.component) {
                return Err(Invalid::ShipComponent(a.component.clone()));
            }
            if !labels.insert(&a.component) {
                return Err(Invalid::ShipComponentTwice(a.component.clone()));
            }
            if !is_object_name_part(&a.retention) {
                return Err(Invalid::ShipRetention(a.component.clone()));
            }
            if a.path == self.audit_path() {
                return Err(Invalid::ShipsOwnLog(a.component.clone()));
            }
        }
        if self.pipeline.batch_max == 0 {
            return Err(Invalid::BatchMax);
        }
        if let Some(l) = &self.lifecycle {
            match humantime::parse_duration(&l.every) {
                Ok(d) if !d.is_zero() => {}
                _ => return Err(Invalid::LifecycleEvery(l.every.clone())),
            }
            if l.batch == 0 {
                return Err(Invalid::LifecycleBatch);
            }
        }
        if self.pipeline.resume_backlog > self.pipeline.max_backlog {
            return Err(Invalid::ResumeBacklog);
        }
        if let Some(a) = &self.alerts {
            let mut hooks = std::collections::HashSet::new();
            for w in &a.webhooks {
                if !hooks.insert(&w.name) {
                    return Err(Invalid::WebhookTwice(w.name.clone()));
                }
                if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                    return Err(Invalid::WebhookUrl(w.name.clone()));
                }
                if w.pseudonymised() && self.pseudonyms.is_none() {
                    return Err(Invalid::PatientRefWithoutPseudonyms(format!(
                        "alerts.webhooks.{}",
                        w.name
                    )));
                }
                // Alert fields are not the event's: only the list's shape is checked.
                check_fields(w.fields.as_deref(), None).map_err(|(field, problem)| {
                    Invalid::WebhookField {
                        handler: w.name.clone(),
                        field,
                        problem,
                    }
                })?;
            }
        }
        if let Some(a) = &self.alerts {
            let mut seen = std::collections::HashSet::new();
            for name in &a.fhir {
                if !self
                    .sinks
                    .iter()
                    .any(|s| matches!(s, SinkConfig::Fhir(f) if &f.name == name))
                {
                    return Err(Invalid::AlertsFhir(name.clone()));
                }
                if !seen.insert(name) {
                    return Err(Invalid::AlertsFhirTwice(name.clone()));
                }
            }
        }
        let mut names = std::collections::HashSet::new();
        for sink in &self.sinks {
            if !names.insert(sink.name()) {
                return Err(Invalid::SinkTwice(sink.name().to_owned()));
            }
            if let SinkConfig::Objects { name, path, s3, .. }
            | SinkConfig::Parquet { name, path, s3, .. } = sink
                && path.is_some() == s3.is_some()
            {
                return Err(Invalid::SinkTarget(name.clone()));
            }
            let fields = match sink {
                SinkConfig::Objects { fields, .. } | SinkConfig::Upstream { fields, .. } => fields,
                SinkConfig::Fhir(f) => {
                    f.validate()?;
                    continue;
                }
                SinkConfig::Parquet { .. } => {
                    // The parquet sink's fields are its own allow-list, not configured.
                    if self.pseudonyms.is_none() {
                        return Err(Invalid::PatientRefWithoutPseudonyms(format!(
                            "sinks.{}",
                            sink.name()
                        )));
                    }
                    continue;
                }
            };
            let known: Vec<&str> = EVENT_FIELDS
                .iter()
                .copied()
                .chain(std::iter::once(RAW_FIELD))
                .collect();
            check_fields(fields.as_deref(), Some(&known)).map_err(|(field, problem)| {
                Invalid::SinkField {
                    sink: sink.name().to_owned(),
                    field,
                    problem,
                }
            })?;
            if matches!(sink, SinkConfig::Upstream { .. }) && !sink.fields().allows_raw() {
                return Err(Invalid::UpstreamWithoutRaw(sink.name().to_owned()));
            }
            if sink.pseudonymised() && self.pseudonyms.is_none() {
                return Err(Invalid::PatientRefWithoutPseudonyms(format!(
                    "sinks.{}",
                    sink.name()
                )));
            }
        }
        Ok(())
    }

    pub fn window(&self) -> WindowSize {
        // validate() checked it.
        WindowSize::new(self.pipeline.window).unwrap_or_default()
    }

    pub fn audit_path(&self) -> PathBuf {
        self.audit
            .clone()
            .unwrap_or_else(|| self.data_dir.join("audit.jsonl"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_parses_with_paths_resolved() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/bridge.toml");
        let c = BridgeConfig::load(&path).expect("example config");
        assert_eq!(c.id, "bridge-01");
        assert!(c.data_dir.is_absolute());
        assert_eq!(c.sinks.len(), 1);
        assert_eq!(c.window().get(), 1024);
        assert_eq!(
            c.metrics.as_ref().map(|m| m.listen),
            Some("127.0.0.1:9465".parse().expect("address"))
        );
        let broker = &c.audit_ship[0];
        assert_eq!(
            (broker.component.as_str(), broker.retention.as_str()),
            ("broker", "audit-7y")
        );
        assert!(broker.path.is_absolute() && broker.path.ends_with("data/broker/audit.jsonl"));
        assert_eq!(c.sinks[0].purpose(), Purpose::Care, "care unless named");
        assert_eq!(c.sinks[0].fields(), Fields::All);
    }

    #[test]
    fn encryption_names_a_key_file_and_keeps_the_keyring_in_the_data_directory_by_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bridge.toml");
        let base = "id = \"b\"\ndata_dir = \"d\"\nregistry = \"r\"\n\
                    [broker]\naddress = \"h:1\"\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n";
        std::fs::write(&path, base).expect("write");
        assert!(
            BridgeConfig::load(&path)
                .expect("plain")
                .encryption
                .is_none()
        );
        std::fs::write(
            &path,
            format!("{base}[encryption]\nkey_file = \"kek.json\"\n"),
        )
        .expect("write");
        let c = BridgeConfig::load(&path).expect("encrypted");
        let e = c.encryption.as_ref().expect("section");
        assert_eq!(e.key_file, dir.path().join("kek.json"));
        assert_eq!(
            e.keyring_path(&c.data_dir),
            dir.path().join("d/keyring.sqlite3")
        );
        assert!(c.private_paths().contains(&dir.path().join("kek.json")));
        std::fs::write(
            &path,
            format!("{base}[encryption]\nkey_file = \"k\"\nkeyring = \"elsewhere/ring\"\n"),
        )
        .expect("write");
        let c = BridgeConfig::load(&path).expect("keyring elsewhere");
        assert_eq!(
            c.encryption.expect("section").keyring_path(&c.data_dir),
            dir.path().join("elsewhere/ring")
        );
    }

    #[test]
    fn sinks_and_handlers_declare_purpose_and_fields() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bridge.toml");
        std::fs::write(
            &path,
            "id = \"b\"\ndata_dir = \"d\"\nregistry = \"r\"\n\
             [broker]\naddress = \"h:1\"\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n\
             [[sinks]]\nkind = \"objects\"\nname = \"study\"\npath = \"x\"\npurpose = \"research\"\n\
             [[sinks]]\nkind = \"upstream\"\nname = \"trainer\"\naddress = \"h:2\"\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n\
             client_id = \"u\"\npurpose = \"model-training\"\nfields = [\"raw\", \"m\", \"observed_at\"]\n\
             [alerts]\nrules = \"r\"\npublisher = { client_id = \"a\", cert = \"c\", key = \"k\" }\n\
             webhooks = [{ name = \"ehr\", url = \"https://e\", secret_env = \"S\" }]\n",
        )
        .expect("write");
        let c = BridgeConfig::load(&path).expect("valid");
        assert_eq!(c.sinks[0].purpose(), Purpose::Research);
        let study = c.sinks[0].fields();
        assert!(!study.allows("patient_ref") && !study.allows("extra"));
        assert!(study.allows("m") && study.allows("site"));
        assert_eq!(c.sinks[1].purpose(), Purpose::ModelTraining);
        assert_eq!(
            c.sinks[1].fields(),
            Fields::Only(["raw", "m", "observed_at"].map(String::from).into())
        );
        assert!(c.sinks[1].fields().allows_raw() && !study.allows_raw());
        let ehr = &c.alerts.as_ref().expect("alerts").webhooks[0];
        assert_eq!(
            ehr.purpose,
            Purpose::Care,
            "clinical alerting runs under care"
        );
        assert_eq!(ehr.fields(), Fields::All);
    }

    #[test]
    fn candidate_rule_sets_need_the_models_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bridge.toml");
        let base = "id = \"b\"\ndata_dir = \"d\"\nregistry = \"r\"\n\
                    [broker]\naddress = \"h:1\"\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n\
                    [alerts]\nrules = \"r\"\ncandidates = [\"cand.toml\"]\n\
                    publisher = { client_id = \"a\", cert = \"c\", key = \"k\" }\n";
        std::fs::write(&path, base).expect("write");
        let err = BridgeConfig::load(&path).expect_err("no [models]");
        let cause = std::error::Error::source(&err).map(ToString::to_string);
        assert!(
            cause
                .as_deref()
                .is_some_and(|c| c.contains("alerts.candidates needs [models]")),
            "{cause:?}"
        );
        std::fs::write(&path, format!("{base}[models]\nfile = \"m.toml\"\n")).expect("write");
        let c = BridgeConfig::load(&path).expect("valid");
        assert_eq!(
            c.alerts.expect("alerts").candidates,
            [dir.path().join("cand.toml")],
            "relative to the config file"
        );
    }

    #[test]
    fn a_fhir_sink_names_its_server_and_credentials_and_serves_care_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bridge.toml");
        let base = "id = \"b\"\ndata_dir = \"d\"\nregistry = \"r\"\n\
                    [broker]\naddress = \"h:1\"\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n\
                    [[sinks]]\nkind = \"fhir\"\nname = \"ehr\"\nbase_url = \"https://fhir.example/r4\"\n\
                    token_url = \"https://auth.example/token\"\nclient_id = \"bridge-01\"\n\
                    client_secret_file = \"fhir.secret\"\n";
        std::fs::write(
            &path,
            format!("{base}ca = \"fhir-ca.pem\"\nscope = \"system/*.write\"\n"),
        )
        .expect("write");
        let c = BridgeConfig::load(&path).expect("valid");
        let SinkConfig::Fhir(f) = &c.sinks[0] else {
            panic!("a fhir sink: {:?}", c.sinks[0]);
        };
        assert_eq!(f.client_secret_file, dir.path().join("fhir.secret"));
        assert_eq!(
            f.ca.as_deref(),
            Some(dir.path().join("fhir-ca.pem").as_path())
        );
        assert_eq!((f.batch_max_events, f.timeout_ms), (100, 10_000));
        assert_eq!(
            (c.sinks[0].purpose(), c.sinks[0].fields()),
            (Purpose::Care, Fields::All)
        );
        assert!(
            c.private_paths().contains(&dir.path().join("fhir.secret")),
            "the secret must be owner-only"
        );
        for (extra, expect) in [
            (
                "purpose = \"research\"\n",
                "sinks.ehr.purpose: a FHIR sink writes the clinical record and serves care only",
            ),
            ("batch_max_events = 0\n", "sinks.ehr.batch_max_events"),
            ("client_secret = \"s\"\n", "unknown field"),
        ] {
            std::fs::write(&path, format!("{base}{extra}")).expect("write");
            let err = BridgeConfig::load(&path).expect_err(extra);
            let cause = std::error::Error::source(&err).map(ToString::to_string);
            assert!(
                cause.as_deref().is_some_and(|c| c.contains(expect)),
                "{extra}: {cause:?}"
            );
        }
        let alerts = "[alerts]\nrules = \"r\"\npublisher = { client_id = \"a\", cert = \"c\", key = \"k\" }\n";
        std::fs::write(&path, format!("{base}{alerts}fhir = [\"ehr\"]\n")).expect("write");
        let c = BridgeConfig::load(&path).expect("alerts to the FHIR sink's server");
        assert_eq!(c.alerts.expect("alerts").fhir, ["ehr"]);
        for (list, expect) in [
            (
                "[\"lab\"]",
                "alerts.fhir: \"lab\" is not the name of a sink of kind \"fhir\"",
            ),
            ("[\"ehr\", \"ehr\"]", "alerts.fhir: \"ehr\" is listed twice"),
        ] {
            std::fs::write(&path, format!("{base}{alerts}fhir = {list}\n")).expect("write");
            let err = BridgeConfig::load(&path).expect_err(list);
            let cause = std::error::Error::source(&err).map(ToString::to_string);
            assert_eq!(cause.as_deref(), Some(expect));
        }
        std::fs::write(
            &path,
            base.replace("https://fhir.example/r4", "fhir.example"),
        )
        .expect("write");
        let cause = std::error::Error::source(&BridgeConfig::load(&path).expect_err("url"))
            .map(ToString::to_string);
        assert_eq!(
            cause.as_deref(),
            Some("sinks.ehr.base_url: must be an http:// or https:// URL")
        );
        // Cleartext only to this machine: the token, the secret and patient data go there.
        for (field, url, ok) in [
            ("base_url", "http://fhir.example/r4", false),
            ("base_url", "http://10.0.0.7:8080/fhir", false),
            ("base_url", "http://127.0.0.2:8080/fhir", true),
            ("base_url", "http://localhost:8080/fhir", true),
            ("base_url", "http://[::1]:8080/fhir", true),
            ("token_url", "http://auth.example/token", false),
            ("token_url", "http://127.0.0.1:9/token", true),
        ] {
            let from = if field == "base_url" {
                "https://fhir.example/r4"
            } else {
                "https://auth.example/token"
            };
            std::fs::write(&path, base.replace(from, url)).expect("write");
            let loaded = BridgeConfig::load(&path);
            if ok {
                loaded.expect(url);
            } else {
                let cause =
                    std::error::Error::source(&loaded.expect_err(url)).map(ToString::to_string);
                assert!(
                    cause.as_deref().is_some_and(
                        |c| c.starts_with(&format!("sinks.ehr.{field}: must be https://"))
                    ),
                    "{url}: {cause:?}"
                );
            }
        }
        // No credentials in the URL, no fragment.
        for (field, url, problem) in [
            (
                "base_url",
                "https://user:pw@fhir.example/r4",
                "must not carry user info",
            ),
            (
                "base_url",
                "https://user@fhir.example/r4",
                "must not carry user info",
            ),
            (
                "token_url",
                "https://id:secret@auth.example/token",
                "must not carry user info",
            ),
            (
                "base_url",
                "https://fhir.example/r4#x",
                "must not have a #fragment",
            ),
            (
                "token_url",
                "https://auth.example/token#",
                "must not have a #fragment",
            ),
            (
                "base_url",
                "http://127.0.0.1:8080/fhir#frag",
                "must not have a #fragment",
            ),
        ] {
            let from = if field == "base_url" {
                "https://fhir.example/r4"
            } else {
                "https://auth.example/token"
            };
            std::fs::write(&path, base.replace(from, url)).expect("write");
            let cause = std::error::Error::source(&BridgeConfig::load(&path).expect_err(url))
                .map(ToString::to_string);
            assert!(
                cause
                    .as_deref()
                    .is_some_and(|c| c.starts_with(&format!("sinks.ehr.{field}: {problem}"))),
                "{url}: {cause:?}"
            );
        }
    }

    #[test]
    fn lifecycle_is_optional_with_defaults_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bridge.toml");
        let base = "id = \"b\"\ndata_dir = \"d\"\nregistry = \"r\"\n[broker]\naddress = \"h:1\"\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n";
        std::fs::write(&path, base).expect("write");
        assert!(
            BridgeConfig::load(&path)
                .expect("valid")
                .lifecycle
                .is_none()
        );
        std::fs::write(
            &path,
            format!("{base}[lifecycle]\nretention = \"ret.toml\"\n"),
        )
        .expect("write");
        let l = BridgeConfig::load(&path)
            .expect("valid")
            .lifecycle
            .expect("lifecycle");
        assert_eq!(l.retention, dir.path().join("ret.toml"));
        assert_eq!(l.every(), std::time::Duration::from_secs(3600));
        assert_eq!((l.batch, l.holds), (500, None));
        for (extra, expect) in [
            ("every = \"0s\"\n", "lifecycle.every"),
            ("every = \"often\"\n", "lifecycle.every"),
            ("batch = 0\n", "lifecycle.batch"),
        ] {
            std::fs::write(
                &path,
                format!("{base}[lifecycle]\nretention = \"r.toml\"\n{extra}"),
            )
            .expect("write");
            let e = BridgeConfig::load(&path).expect_err(extra);
            let cause = std::error::Error::source(&e).map(ToString::to_string);
            assert!(
                cause.as_deref().is_some_and(|c| c.contains(expect)),
                "{cause:?}"
            );
        }
    }

    #[test]
    fn a_parquet_sink_serves_surveillance_with_its_own_fields() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bridge.toml");
        std::fs::write(
            &path,
            "id = \"b\"\ndata_dir = \"d\"\nregistry = \"r\"\n\
             [broker]\naddress = \"h:1\"\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n\
             [pseudonyms]\nkey_file = \"p.key\"\n\
             [[sinks]]\nkind = \"parquet\"\nname = \"surveil\"\npath = \"pq\"\n",
        )
        .expect("write");
        let c = BridgeConfig::load(&path).expect("valid");
        let sink = &c.sinks[0];
        assert_eq!(sink.purpose(), Purpose::Surveillance);
        assert_eq!(sink.fields(), crate::sink::parquet::fields());
        assert!(sink.pseudonymised());
        assert!(
            c.private_paths().contains(&dir.path().join("pq")),
            "owner-only"
        );
        let SinkConfig::Parquet {
            batch_max_events, ..
        } = sink
        else {
            panic!("a parquet sink: {sink:?}");
        };
        assert_eq!(*batch_max_events, 50_000);
    }

    #[test]
    fn mistakes_name_the_file_and_the_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = "id = \"b\"\ndata_dir = \"d\"\nregistry = \"r\"\n[broker]\naddress = \"h:1\"\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n";
        for (extra, expect) in [
            ("[pipeline]\nwindow = 100\n", "pipeline.window"),
            (
                "[pipeline]\nmax_backlog = 5\nresume_backlog = 6\n",
                "resume_backlog",
            ),
            (
                "[[sinks]]\nkind = \"objects\"\nname = \"a\"\n",
                "exactly one of",
            ),
            (
                "[[sinks]]\nkind = \"objects\"\nname = \"a\"\npath = \"x\"\n[[sinks]]\nkind = \"objects\"\nname = \"a\"\npath = \"y\"\n",
                "used twice",
            ),
            ("colour = 1\n", "colour"),
            (
                "[metrics]\nlisten = \"localhost\"\n",
                "invalid socket address",
            ),
            (
                "[[audit_ship]]\ncomponent = \"broker/x\"\npath = \"a.jsonl\"\n",
                "audit_ship.component",
            ),
            (
                "[[audit_ship]]\ncomponent = \"broker\"\npath = \"a.jsonl\"\n[[audit_ship]]\ncomponent = \"broker\"\npath = \"b.jsonl\"\n",
                "used twice",
            ),
            (
                "[[audit_ship]]\ncomponent = \"bridge\"\npath = \"a.jsonl\"\n",
                "used twice",
            ),
            (
                "[[audit_ship]]\ncomponent = \"broker\"\npath = \"a.jsonl\"\nretention = \"7 years\"\n",
                "audit_ship.broker.retention",
            ),
            (
                "[[audit_ship]]\ncomponent = \"broker\"\npath = \"d/audit.jsonl\"\n",
                "own audit log",
            ),
            ("[[audit_ship]]\ncomponent = \"broker\"\n", "path"),
            (
                "[[sinks]]\nkind = \"objects\"\nname = \"study\"\npath = \"x\"\npurpose = \"research\"\nfields = [\"m\", \"name\"]\n",
                "sinks.study.fields: \"name\" is not a field",
            ),
            (
                "[[sinks]]\nkind = \"upstream\"\nname = \"cloud\"\naddress = \"h:2\"\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\nclient_id = \"u\"\npurpose = \"research\"\n",
                "sinks.cloud.fields: an upstream sink forwards the signed messages whole",
            ),
            (
                "[[sinks]]\nkind = \"objects\"\nname = \"study\"\npath = \"x\"\npurpose = \"research\"\nfields = [\"m\", \"patient_ref\"]\n",
                "sinks.study.fields: a purpose other than care gets patient_ref only as its own pseudonym",
            ),
            (
                "[alerts]\nrules = \"r\"\npublisher = { client_id = \"a\", cert = \"c\", key = \"k\" }\nwebhooks = [{ name = \"study\", url = \"https://e\", secret_env = \"S\", purpose = \"research\", fields = [\"patient_ref\"] }]\n",
                "alerts.webhooks.study.fields: a purpose other than care",
            ),
            (
                "[[sinks]]\nkind = \"objects\"\nname = \"study\"\npath = \"x\"\nfields = [\"m\", \"m\"]\n",
                "sinks.study.fields: \"m\" is listed twice",
            ),
            (
                "[[sinks]]\nkind = \"parquet\"\nname = \"surveil\"\n",
                "exactly one of",
            ),
            (
                "[[sinks]]\nkind = \"parquet\"\nname = \"surveil\"\npath = \"x\"\n",
                "sinks.surveil.fields: a purpose other than care gets patient_ref only as its own pseudonym",
            ),
            (
                "[[sinks]]\nkind = \"parquet\"\nname = \"surveil\"\npath = \"x\"\nfields = [\"m\"]\n",
                "unknown field `fields`",
            ),
            (
                "[[sinks]]\nkind = \"objects\"\nname = \"study\"\npath = \"x\"\npurpose = \"marketing\"\n",
                "sinks.study.purpose: unknown purpose `marketing`",
            ),
            (
                "[alerts]\nrules = \"r\"\npublisher = { client_id = \"a\", cert = \"c\", key = \"k\" }\nwebhooks = [{ name = \"ehr\", url = \"https://e\", secret_env = \"S\", purpose = \"sales\" }]\n",
                "alerts.webhooks.ehr.purpose: unknown purpose `sales`",
            ),
            (
                "[alerts]\nrules = \"r\"\npublisher = { client_id = \"a\", cert = \"c\", key = \"k\" }\nwebhooks = [{ name = \"ehr\", url = \"https://e\", secret_env = \"S\", fields = [\"\"] }]\n",
                "alerts.webhooks.ehr.fields",
            ),
        ] {
            let path = dir.path().join("bridge.toml");
            // Top-level keys must come before the first table.
            let text = if extra.starts_with('[') {
                format!("{base}{extra}")
            } else {
                format!("{extra}{base}")
            };
            std::fs::write(&path, text).expect("write");
            // As the binary prints it: the error, then each source.
            let err = BridgeConfig::load(&path).expect_err(expect);
            let mut chain: Vec<&dyn std::error::Error> = vec![&err];
            while let Some(s) = chain.last().and_then(|e| e.source()) {
                chain.push(s);
            }
            let err = chain
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(": ");
            assert!(
                err.contains("bridge.toml") && err.contains(expect),
                "{expect}: {err}"
            );
        }
    }
}
