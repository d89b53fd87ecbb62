//! The operator audit log: what people did with the `vitalmq` CLI (changed the PKI,
//! read patient-linked records), who did it, and how it ended.
//!
//! Each CLI invocation is short-lived and several may run at once, so the log is written
//! in sessions: [`append`] takes an exclusive `flock` on the log file, continues its
//! chain (the writer re-reads the last record), appends the records, ends with a signed
//! checkpoint (the writer signs at close) and syncs, then releases the lock. The lock is
//! taken before the signing key is loaded or created, so two first invocations cannot
//! race to create it either.
//!
//! Records are `operator_action` by component `cli`: `action` (`certs.revoke`,
//! `store.events`, `trace`, ...), `resource` (the identity, serial or record id acted
//! on, never a patient value), `reason` the outcome (`started`, `succeeded`, `failed`)
//! and `details` with who ([`Operator`]) and what the action needs to be understood.

use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde_json::{Map, Value};

use crate::checkpoint::{CheckpointKey, KeyError, signing_key_path};
use crate::writer::{AuditError, AuditLog};
use crate::{Actor, AuditRecord, Component, Event};

/// The person (OS account) running the CLI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    /// User name of the real uid (`uid:<n>` when the account has no name).
    pub user: String,
    pub uid: u32,
    /// Effective uid, when it differs from the real one (setuid).
    pub euid: Option<u32>,
    pub host: String,
    /// `SUDO_USER`, when the command runs under sudo: the person behind root.
    pub sudo_user: Option<String>,
}

impl Operator {
    /// Who is running this process.
    pub fn current() -> Self {
        let uid = nix::unistd::getuid();
        let euid = nix::unistd::geteuid();
        let user = nix::unistd::User::from_uid(uid)
            .ok()
            .flatten()
            .map_or_else(|| format!("uid:{uid}"), |u| u.name);
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".to_owned());
        Self {
            user,
            uid: uid.as_raw(),
            euid: (euid != uid).then_some(euid.as_raw()),
            host,
            sudo_user: std::env::var("SUDO_USER").ok().filter(|s| !s.is_empty()),
        }
    }

    /// `user@host`, the actor identity of the operator's records.
    pub fn identity(&self) -> String {
        format!("{}@{}", self.user, self.host)
    }

    fn details(&self) -> Map<String, Value> {
        let mut d = Map::new();
        d.insert("user".into(), self.user.clone().into());
        d.insert("uid".into(), self.uid.into());
        if let Some(euid) = self.euid {
            d.insert("euid".into(), euid.into());
        }
        d.insert("host".into(), self.host.clone().into());
        if let Some(s) = &self.sudo_user {
            d.insert("sudo_user".into(), s.clone().into());
        }
        d
    }
}

/// How an operator action ended, or that it is about to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Recorded before the action runs: if this cannot be written, it does not run.
    Started,
    Succeeded,
    /// The error, as the CLI reports it.
    Failed(String),
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Succeeded => "succeeded",
            Self::Failed(_) => "failed",
        }
    }
}

/// The record of one step of an operator action. `details` must hold no patient values.
pub fn operator_record(
    who: &Operator,
    action: &str,
    resource: Option<&str>,
    outcome: &Outcome,
    details: &Map<String, Value>,
) -> AuditRecord {
    let mut record = AuditRecord::new(Component::Cli, Event::OperatorAction)
        .actor(Actor {
            identity: Some(who.identity()),
            ..Actor::default()
        })
        .action(action)
        .reason(outcome.as_str());
    if let Some(r) = resource {
        record = record.resource(r);
    }
    record.details = who.details();
    record
        .details
        .insert("pid".into(), std::process::id().into());
    for (k, v) in details {
        record.details.insert(k.clone(), v.clone());
    }
    if let Outcome::Failed(error) = outcome {
        record.details.insert("error".into(), error.clone().into());
    }
    record
}

/// Why the operator log could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OperatorLogError {
    #[error("operator audit log {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("operator audit log {path}: cannot lock it: {source}")]
    Lock {
        path: PathBuf,
        source: nix::errno::Errno,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Audit(#[from] AuditError),
}

/// Appends `records` to the operator log at `path` under an exclusive lock, ends the
/// session with a signed checkpoint (key `audit-signing.key.pem` beside the log, created
/// on first use) and syncs. Returns only once everything is on disk.
pub fn append(path: &Path, records: Vec<AuditRecord>) -> Result<(), OperatorLogError> {
    let io = |source| OperatorLogError::Io {
        path: path.to_path_buf(),
        source,
    };
    vitalmq_private_fs::create_parent(path).map_err(io)?;
    let file = vitalmq_private_fs::create_options()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)?;
    // Held until the end of this function; dropping it unlocks.
    let _lock = Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, source)| {
        OperatorLogError::Lock {
            path: path.to_path_buf(),
            source,
        }
    })?;
    let key = CheckpointKey::load_or_create(&signing_key_path(path), Component::Cli)?;
    let log = AuditLog::open_signed(path, records.len() + 1, Some(key))?;
    let auditor = log.auditor();
    for record in records {
        auditor.record(record)?;
    }
    log.close()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::BufReader;

    use super::*;
    use crate::{verify_chain, verify_checkpoints};

    fn action(n: u64) -> AuditRecord {
        let mut d = Map::new();
        d.insert("n".into(), n.into());
        operator_record(
            &Operator::current(),
            "certs.revoke",
            Some("serial:0A"),
            &Outcome::Succeeded,
            &d,
        )
    }

    #[test]
    fn sessions_continue_one_signed_chain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit/operator.jsonl");
        append(&path, vec![action(0)]).expect("first session");
        append(&path, vec![action(1), action(2)]).expect("second session");
        let open = || BufReader::new(std::fs::File::open(&path).expect("log"));
        // 3 actions and one checkpoint per session.
        assert_eq!(verify_chain(open()).expect("chain"), 5);
        let public = std::fs::read_to_string(dir.path().join("audit/audit-signing.key.pem.pub"))
            .expect("public key");
        let report = verify_checkpoints(open(), &[public.trim().to_owned()]).expect("signed");
        assert_eq!(report.checkpoints, 2);
        assert_eq!(report.last_covered_seq, Some(3));
        let first: AuditRecord = serde_json::from_str(
            std::fs::read_to_string(&path)
                .expect("log")
                .lines()
                .next()
                .expect("line"),
        )
        .expect("record");
        assert_eq!(first.component, Component::Cli);
        assert_eq!(first.event, Event::OperatorAction);
        assert_eq!(first.reason.as_deref(), Some("succeeded"));
        assert_eq!(
            first.details["uid"],
            Value::from(nix::unistd::getuid().as_raw())
        );
    }

    #[test]
    fn concurrent_sessions_do_not_break_the_chain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("operator.jsonl");
        std::thread::scope(|s| {
            for t in 0..8 {
                let path = &path;
                s.spawn(move || {
                    for i in 0..5 {
                        append(path, vec![action(t * 100 + i)]).expect("append");
                    }
                });
            }
        });
        let log = BufReader::new(std::fs::File::open(&path).expect("log"));
        // 40 actions, each session closed by a checkpoint.
        assert_eq!(verify_chain(log).expect("chain intact"), 80);
    }

    #[test]
    fn an_unwritable_location_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blocker = dir.path().join("audit");
        std::fs::write(&blocker, "a file where the directory should be").expect("write");
        let err = append(&blocker.join("operator.jsonl"), vec![action(0)])
            .expect_err("cannot create the log");
        assert!(matches!(err, OperatorLogError::Io { .. }), "{err}");
    }
}
