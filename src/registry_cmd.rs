//! `vitalmq registry assign|unassign|retire|consent`: change a device's assignment
//! history or its consent grants in a registry file (issue 19). Each change is applied
//! through the registry's [`History`](vitalmq_policies::History) and
//! [`Consent`](vitalmq_policies::Consent) rules (no overlaps, nothing after a
//! retirement, grants inside their assignment), so a refused change exits non-zero and
//! leaves the file as it was; an accepted one is written as `vitalmq-registry/v2`,
//! atomically (a 0600 temporary in the same directory, synced, renamed over the file,
//! the directory synced), after checking that the new text loads. Broker and bridge
//! pick it up on their next registry reload. Concurrent changes of one registry take
//! turns: each holds an exclusive `flock` on the registry's directory from reading the
//! file until the new one is in place ([`vitalmq_private_fs::lock_dir_timeout`], the
//! lock `vitalmq certs issue` takes too; the file itself is replaced, so it cannot
//! carry the lock). A holder that keeps it past [`LOCK_TIMEOUT`] (a stuck writer)
//! makes the change fail, audited ([`vitalmq_private_fs::DirLockError::Busy`]; 503
//! through the admin API), rather than wait for ever.
//!
//! [`apply`] is the one place a change happens, for the CLI (acting as the local
//! service account) and for the admin API (acting as an authenticated operator): every
//! change is an operator action (see `operator_audit`), logged by default in
//! `audit/operator.jsonl` beside the registry (the PKI's log when the registry is
//! `<pki>/registry.toml`), or in `$VITALMQ_OPERATOR_AUDIT`. The record names the device,
//! site or purpose and the acting identity, never the patient pseudonym.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use vitalmq_envelope::DeviceId;
use vitalmq_policies::{
    Assignment, DeviceRegistry, Grant, History, PSEUDONYM_PREFIX, Period, PrincipalId, Purpose,
    SiteId, UnixMillis, Use, format_rfc3339, parse_rfc3339,
};
use vitalmq_private_fs::{dir_of, lock_dir_timeout};

use crate::operator_audit;

#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Assign a device to a patient pseudonym and a site from `--at` on; an assignment
    /// open then is closed at that instant (a reassignment).
    Assign {
        #[command(flatten)]
        target: Target,
        /// Pseudonym of the patient: `pt-` then at least 8 of [0-9a-z-] (never a name,
        /// record number or other direct identifier).
        #[arg(long)]
        patient_ref: String,
        #[arg(long)]
        site: String,
    },
    /// End the device's assignment open at `--at`.
    Unassign {
        #[command(flatten)]
        target: Target,
    },
    /// Retire the device from `--at` on: what is open then is closed, nothing can be
    /// assigned later, and the broker refuses its connections.
    Retire {
        #[command(flatten)]
        target: Target,
    },
    /// Grant or withdraw consent for a purpose (research, surveillance, model-training;
    /// care is implied by the assignment).
    #[command(subcommand)]
    Consent(ConsentCommand),
}

#[derive(Debug, Subcommand)]
pub enum ConsentCommand {
    /// Grant consent for `--purpose` from `--from` (now when absent) until `--until`
    /// (open when absent), inside the assignment open at `--from`.
    Grant {
        #[command(flatten)]
        device: DeviceArgs,
        #[arg(long)]
        purpose: String,
        /// Start of the grant (RFC 3339); now when absent.
        #[arg(long)]
        from: Option<String>,
        /// End of the grant (RFC 3339, exclusive); open when absent.
        #[arg(long)]
        until: Option<String>,
    },
    /// Withdraw consent for `--purpose` from `--at` (now when absent) on: events
    /// observed from then on no longer flow to sinks of that purpose.
    Withdraw {
        #[command(flatten)]
        device: DeviceArgs,
        #[arg(long)]
        purpose: String,
        /// When the withdrawal takes effect (RFC 3339); now when absent.
        #[arg(long)]
        at: Option<String>,
    },
}

/// The registry file and the device of a change.
#[derive(Debug, Args)]
pub struct DeviceArgs {
    /// The registry file (v1 or v2; written back as v2); not with `--server`.
    #[arg(long, required_unless_present = "server", conflicts_with = "server")]
    registry: Option<PathBuf>,
    #[arg(long)]
    device: String,
    /// Why the change is made (its purpose in the audit records); required by the
    /// admin API with `--server`.
    #[arg(long)]
    reason: Option<String>,
    #[command(flatten)]
    client: crate::admin_cmd::client::ClientArgs,
}

/// The registry file, the device and the instant of a change.
#[derive(Debug, Args)]
pub struct Target {
    #[command(flatten)]
    device: DeviceArgs,
    /// When the change takes effect (RFC 3339); now when absent.
    #[arg(long)]
    at: Option<String>,
}

/// One change of a device's registry entry, as the CLI parses it and as the admin API
/// receives it (JSON, `{"change": "assign", ...}`). Times are RFC 3339; absent means now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Change {
    Assign {
        patient_ref: String,
        site: String,
        #[serde(default)]
        at: Option<String>,
    },
    Unassign {
        #[serde(default)]
        at: Option<String>,
    },
    Retire {
        #[serde(default)]
        at: Option<String>,
    },
    ConsentGrant {
        purpose: String,
        #[serde(default)]
        from: Option<String>,
        #[serde(default)]
        until: Option<String>,
    },
    ConsentWithdraw {
        purpose: String,
        #[serde(default)]
        at: Option<String>,
    },
}

impl Change {
    /// The operator action name of the change.
    pub fn action(&self) -> &'static str {
        match self {
            Self::Assign { .. } => "registry.assign",
            Self::Unassign { .. } => "registry.unassign",
            Self::Retire { .. } => "registry.retire",
            Self::ConsentGrant { .. } => "registry.consent.grant",
            Self::ConsentWithdraw { .. } => "registry.consent.withdraw",
        }
    }
}

/// Who makes a change: the local account running the CLI (the service account), or an
/// operator authenticated by the admin API, with the role and purpose it acted under.
#[derive(Debug, Clone, Default)]
pub struct Actor {
    /// The operator's SPIFFE id; `None` for the local account.
    pub identity: Option<String>,
    pub role: Option<String>,
    pub purpose: Option<String>,
}

/// What an accepted change did.
#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    pub device: String,
    /// When it took effect (RFC 3339).
    pub at: String,
    /// One line per period or grant that went (`- ...`) or came (`+ ...`).
    pub changes: Vec<String>,
}

impl RegistryCommand {
    pub fn run(self) -> anyhow::Result<std::process::ExitCode> {
        let (device, change) = match self {
            Self::Assign {
                target,
                patient_ref,
                site,
            } => (
                target.device,
                Change::Assign {
                    patient_ref,
                    site,
                    at: target.at,
                },
            ),
            Self::Unassign { target } => (target.device, Change::Unassign { at: target.at }),
            Self::Retire { target } => (target.device, Change::Retire { at: target.at }),
            Self::Consent(ConsentCommand::Grant {
                device,
                purpose,
                from,
                until,
            }) => (
                device,
                Change::ConsentGrant {
                    purpose,
                    from,
                    until,
                },
            ),
            Self::Consent(ConsentCommand::Withdraw {
                device,
                purpose,
                at,
            }) => (device, Change::ConsentWithdraw { purpose, at }),
        };
        let registry = match (device.client.remote(), &device.registry) {
            (Some(server), _) => {
                return device.client.registry(
                    server,
                    &device.device,
                    &change,
                    device.reason.as_deref(),
                );
            }
            (None, Some(registry)) => registry,
            (None, None) => anyhow::bail!("--registry or --server is required"),
        };
        let actor = Actor {
            purpose: device.reason.clone(),
            ..Actor::default()
        };
        let applied = apply(registry, &device.device, &change, &actor)?;
        for line in &applied.changes {
            println!("{}: {line}", applied.device);
        }
        println!("wrote {} (vitalmq-registry/v2)", registry.display());
        Ok(std::process::ExitCode::SUCCESS)
    }
}

/// Longest wait for the registry's lock before a change gives up.
pub const LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether the acting caller's scope allows a change of a device that served these
/// sites (`None`: a device the registry does not know): `Some(why)` refuses it.
pub type ScopeCheck<'a> = &'a dyn Fn(Option<&[String]>) -> Option<String>;

/// A change refused by the [`ScopeCheck`] it was applied under.
#[derive(Debug)]
pub struct OutsideScope(pub String);

impl std::fmt::Display for OutsideScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OutsideScope {}

/// Every site the device of `history` was ever assigned to (its scope for changes).
pub fn sites_of(history: &History) -> Vec<String> {
    history
        .periods()
        .iter()
        .filter_map(|a| match &a.serves {
            Use::Assigned { site, .. } => Some(site.to_string()),
            Use::Retired => None,
        })
        .collect()
}

/// Applies `change` to `device` in the registry file `path` as `actor`: an audited
/// operator action; refused changes leave the file untouched.
pub fn apply(path: &Path, device: &str, change: &Change, actor: &Actor) -> anyhow::Result<Applied> {
    apply_scoped(path, device, change, actor, None)
}

/// [`apply`], refused with [`OutsideScope`] when `scope` refuses the device's sites as
/// read under the registry's lock (so a change made meanwhile cannot move the device
/// out of the caller's scope between the check and the change).
pub fn apply_scoped(
    path: &Path,
    device: &str,
    change: &Change,
    actor: &Actor,
    scope: Option<ScopeCheck<'_>>,
) -> anyhow::Result<Applied> {
    let mut action = operator_audit::Action::new(change.action(), audit_log(path))
        .resource(Some(format!("device/{device}")))
        .detail("registry", operator_audit::absolute(path));
    if let Some(identity) = &actor.identity {
        action = action.detail("identity", identity.as_str());
    }
    if let Some(role) = &actor.role {
        action = action.detail("role", role.as_str());
    }
    if let Some(purpose) = &actor.purpose {
        action = action.detail("purpose", purpose.as_str());
    }
    match change {
        Change::Assign { site, .. } => action = action.detail("site", site.as_str()),
        Change::ConsentGrant { purpose, .. } | Change::ConsentWithdraw { purpose, .. } => {
            action = action.detail("consent_purpose", purpose.as_str());
        }
        Change::Unassign { .. } | Change::Retire { .. } => {}
    }
    action.run(|| change_file(path, device, change, scope))
}

/// Fewest characters after [`PSEUDONYM_PREFIX`] in a patient reference.
const MIN_PSEUDONYM_BODY: usize = 8;

/// A patient reference given to `assign` must look like a pseudonym, `pt-` then at
/// least [`MIN_PSEUDONYM_BODY`] of `[0-9a-z-]` (64 characters in all at most, an id's
/// limit), so that a medical record number or a name is refused rather than written
/// into the registry. Looser than [`vitalmq_policies::is_pseudonym`] (`pt-` and 32 hex
/// digits): registries and the demo use shorter `pt-...` references. The registry
/// loader does not apply this, so existing files keep loading.
fn check_patient_ref(patient_ref: &str) -> anyhow::Result<()> {
    let body = patient_ref.strip_prefix(PSEUDONYM_PREFIX);
    let ok = body.is_some_and(|b| {
        b.len() >= MIN_PSEUDONYM_BODY
            && b.bytes()
                .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase() || c == b'-')
    }) && PrincipalId::new(patient_ref.to_owned()).is_ok();
    anyhow::ensure!(
        ok,
        "--patient-ref must be a pseudonymous token: `{PSEUDONYM_PREFIX}` then at least \
         {MIN_PSEUDONYM_BODY} characters of [0-9a-z-], 64 in all at most (for example \
         `{PSEUDONYM_PREFIX}7f3a91c2`), never a name, record number or other direct identifier"
    );
    Ok(())
}

/// `--at`-style time: RFC 3339, or now.
fn instant(text: Option<&String>, flag: &str) -> anyhow::Result<UnixMillis> {
    match text {
        Some(text) => parse_rfc3339(text).with_context(|| format!("--{flag} {text}")),
        None => now_ms(),
    }
}

fn purpose_of(text: &str) -> anyhow::Result<Purpose> {
    text.parse::<Purpose>()
        .with_context(|| format!("--purpose {text}"))
}

fn change_file(
    path: &Path,
    device: &str,
    change: &Change,
    scope: Option<ScopeCheck<'_>>,
) -> anyhow::Result<(Applied, Map<String, Value>)> {
    let device = DeviceId::new(device.to_owned()).with_context(|| format!("--device {device}"))?;
    let _turn = lock_dir_timeout(dir_of(path), LOCK_TIMEOUT)?;
    let mut registry = DeviceRegistry::load(path)?;
    let before = registry.history(&device).cloned();
    if let Some(why) = scope.and_then(|check| check(before.as_ref().map(sites_of).as_deref())) {
        return Err(OutsideScope(why).into());
    }
    let before =
        before.with_context(|| format!("device `{device}` is not in {}", path.display()))?;
    let grants_before = grants(&registry, &device, &before);
    let at = match change {
        Change::Assign {
            patient_ref,
            site,
            at,
        } => {
            let at = instant(at.as_ref(), "at")?;
            check_patient_ref(patient_ref)?;
            let site = SiteId::new(site.clone()).with_context(|| format!("--site {site}"))?;
            registry
                .change_history(&device, |h| h.reassign(at, None, patient_ref.clone(), site))?;
            at
        }
        Change::Unassign { at } => {
            let at = instant(at.as_ref(), "at")?;
            registry.change_history(&device, |h| h.close(at))?;
            at
        }
        Change::Retire { at } => {
            let at = instant(at.as_ref(), "at")?;
            registry.change_history(&device, |h| h.retire(at))?;
            at
        }
        Change::ConsentGrant {
            purpose,
            from,
            until,
        } => {
            let purpose = purpose_of(purpose)?;
            let from = instant(from.as_ref(), "from")?;
            let until = until
                .as_ref()
                .map(|t| parse_rfc3339(t).with_context(|| format!("--until {t}")))
                .transpose()?;
            let period = Period::new(from, until)
                .context("--until must be after --from (a grant is never empty)")?;
            registry.grant_consent(&device, Grant { purpose, period })?;
            from
        }
        Change::ConsentWithdraw { purpose, at } => {
            let purpose = purpose_of(purpose)?;
            let at = instant(at.as_ref(), "at")?;
            registry.withdraw_consent(&device, purpose, at)?;
            at
        }
    };
    let text = registry.to_toml();
    // What is written must load: never leave a registry the broker would refuse.
    DeviceRegistry::parse(&text, path)
        .context("the changed registry does not validate; nothing was written")?;
    write_atomically(path, &text)?;
    let after = registry
        .history(&device)
        .cloned()
        .expect("a registered device keeps its history");
    let grants_after = grants(&registry, &device, &after);
    let mut lines = changes(&before, &after);
    lines.extend(diff(&grants_before, &grants_after));
    tracing::info!(device = %device, action = change.action(), at = %format_rfc3339(at), "registry changed");
    let mut details = Map::new();
    details.insert("at".into(), format_rfc3339(at).into());
    Ok((
        Applied {
            device: device.to_string(),
            at: format_rfc3339(at),
            changes: lines,
        },
        details,
    ))
}

/// Every consent grant of the device's assigned periods, described.
fn grants(registry: &DeviceRegistry, device: &DeviceId, history: &History) -> Vec<String> {
    history
        .periods()
        .iter()
        .filter_map(|a| registry.consent_at(device, a.period.from))
        .flat_map(|c| c.grants().iter().copied())
        .map(|g| {
            let until = g.period.to.map_or("open".to_owned(), format_rfc3339);
            format!(
                "consent {} {} .. {until}",
                g.purpose,
                format_rfc3339(g.period.from)
            )
        })
        .collect()
}

/// `- x` for what is only in `before`, `+ x` for what is only in `after`.
fn diff<T: PartialEq + std::fmt::Display>(before: &[T], after: &[T]) -> Vec<String> {
    let gone = before
        .iter()
        .filter(|p| !after.contains(p))
        .map(|p| format!("- {p}"));
    let came = after
        .iter()
        .filter(|p| !before.contains(p))
        .map(|p| format!("+ {p}"));
    gone.chain(came).collect()
}

/// The operator log for changes to `registry`.
fn audit_log(registry: &Path) -> PathBuf {
    let dir = registry.parent().unwrap_or(Path::new("."));
    operator_audit::log_path(dir.join("audit").join("operator.jsonl"))
}

pub(crate) fn now_ms() -> anyhow::Result<UnixMillis> {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the clock is before 1970")?;
    u64::try_from(since.as_millis()).context("the clock is out of range")
}

/// One line per period that went (`-`) or came (`+`).
fn changes(before: &History, after: &History) -> Vec<String> {
    let describe_all = |h: &History| h.periods().iter().map(describe).collect::<Vec<_>>();
    diff(&describe_all(before), &describe_all(after))
}

fn describe(a: &Assignment) -> String {
    let until = a.period.to.map_or("open".to_owned(), format_rfc3339);
    let span = format!("{} .. {until}", format_rfc3339(a.period.from));
    match &a.serves {
        Use::Assigned { patient_ref, site } => {
            format!("{span}: patient {patient_ref} on {site}")
        }
        Use::Retired => format!("{span}: retired"),
    }
}

/// Replaces `path` with `text`: a 0600 temporary in the same directory, synced, renamed
/// over `path`, then the directory synced, so a crash leaves the old or the new file.
pub(crate) fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let dir = dir_of(path);
    // tempfile creates the file 0600 (O_EXCL, random name).
    let mut tmp = tempfile::Builder::new()
        .prefix(".registry-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    tmp.write_all(text.as_bytes())
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write {}", tmp.path().display()))?;
    tmp.persist(path)
        .with_context(|| format!("cannot replace {}", path.display()))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))?;
    Ok(())
}
