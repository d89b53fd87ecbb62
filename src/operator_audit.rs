//! Operator audit for CLI actions that change security state (`certs ...`) or read
//! patient-linked records (`store events|quarantine|gaps|alerts`, `trace`).
//!
//! Where the log lives: `$VITALMQ_OPERATOR_AUDIT` when set (one log for every action);
//! otherwise beside what was acted on: `<pki dir>/audit/operator.jsonl` for `certs`, and
//! `<data dir>/operator-audit/operator.jsonl` for store reads and traces (a directory of
//! its own, because the bridge's `audit.jsonl` and its signing key already live in the
//! data directory). The checkpoint key is `audit-signing.key.pem` beside the log, its
//! public half in `.pub`; verify with `vitalmq audit verify LOG --trusted-key HEX`.
//!
//! Each action is two sessions of [`vitalmq_audit::operator::append`] (exclusive lock,
//! append, signed checkpoint, sync): a `started` record before the action runs and a
//! `succeeded`/`failed` record after it. If the `started` record cannot be written the
//! action does not run (fail closed). The lock is not held while the action runs, so a
//! long read does not stall other operators.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde_json::{Map, Value};
use vitalmq_audit::operator::{Operator, Outcome, append, operator_record};

/// Environment variable naming one operator audit log for every action.
pub const ENV: &str = "VITALMQ_OPERATOR_AUDIT";

/// The operator log for an action whose default place is `default`.
pub fn log_path(default: PathBuf) -> PathBuf {
    std::env::var_os(ENV)
        .filter(|v| !v.is_empty())
        .map_or(default, PathBuf::from)
}

/// The default operator log of reads from the bridge data directory `data`.
pub fn data_dir_log(data: &Path) -> PathBuf {
    data.join("operator-audit").join("operator.jsonl")
}

/// `path` made absolute (for the record; not canonicalized, so it names what was given).
pub fn absolute(path: &Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

/// What an operator is about to do.
#[derive(Debug, Clone)]
pub struct Action {
    /// `certs.revoke`, `store.events`, `trace`, ...
    pub name: String,
    /// Identity, serial or record id acted on (never a patient value).
    pub resource: Option<String>,
    /// Context such as the directory acted on.
    pub details: Map<String, Value>,
    /// The operator log to write.
    pub log: PathBuf,
}

impl Action {
    pub fn new(name: impl Into<String>, log: PathBuf) -> Self {
        Self {
            name: name.into(),
            resource: None,
            details: Map::new(),
            log,
        }
    }

    pub fn resource(mut self, resource: Option<String>) -> Self {
        self.resource = resource;
        self
    }

    pub fn detail(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.to_owned(), value.into());
        self
    }

    /// Records the action, runs `run` only if that record is on disk, then records the
    /// outcome with the details `run` returned. `run` gives back its own result and
    /// the details of what it did.
    pub fn run<T>(
        self,
        run: impl FnOnce() -> anyhow::Result<(T, Map<String, Value>)>,
    ) -> anyhow::Result<T> {
        let who = Operator::current();
        let record = |outcome: &Outcome, extra: &Map<String, Value>| {
            let mut details = self.details.clone();
            details.extend(extra.clone());
            operator_record(
                &who,
                &self.name,
                self.resource.as_deref(),
                outcome,
                &details,
            )
        };
        append(&self.log, vec![record(&Outcome::Started, &Map::new())]).with_context(|| {
            format!(
                "the operator audit log cannot be written, so `{}` was not run (set {ENV} to log elsewhere)",
                self.name
            )
        })?;
        tracing::debug!(action = %self.name, log = %self.log.display(), "operator action started");
        let result = run();
        let (outcome, extra) = match &result {
            Ok((_, extra)) => (Outcome::Succeeded, extra.clone()),
            Err(e) => (Outcome::Failed(format!("{e:#}")), Map::new()),
        };
        let recorded = append(&self.log, vec![record(&outcome, &extra)]);
        tracing::debug!(action = %self.name, outcome = outcome.as_str(), "operator action done");
        match (result, recorded) {
            (Ok((value, _)), Ok(())) => Ok(value),
            (Err(e), _) => Err(e),
            (Ok(_), Err(e)) => Err(anyhow::Error::new(e).context(format!(
                "`{}` ran, but its outcome could not be recorded in the operator audit log",
                self.name
            ))),
        }
    }
}
