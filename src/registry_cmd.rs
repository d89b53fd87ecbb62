//! `vitalmq registry assign|unassign|retire`: change a device's assignment history in a
//! registry file (issue 19). Each change is applied through the registry's
//! [`History`](vitalmq_policies::History) rules (no overlaps, nothing after a
//! retirement), so a refused change exits non-zero and leaves the file as it was; an
//! accepted one is written as `vitalmq-registry/v2`, atomically (a 0600 temporary in the
//! same directory, synced, renamed over the file, the directory synced), after checking
//! that the new text loads. Broker and bridge pick it up on their next registry reload.
//! Concurrent commands on one registry take turns: each holds an exclusive `flock` on
//! the registry's directory from reading the file until the new one is in place (the
//! file itself is replaced, so it cannot carry the lock).
//!
//! Every change is an operator action (see `operator_audit`): logged by default in
//! `audit/operator.jsonl` beside the registry (the PKI's log when the registry is
//! `<pki>/registry.toml`), or in `$VITALMQ_OPERATOR_AUDIT`. The record names the device
//! and site, never the patient pseudonym.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use nix::fcntl::{Flock, FlockArg};
use serde_json::{Map, Value};
use vitalmq_envelope::DeviceId;
use vitalmq_policies::{
    Assignment, DeviceRegistry, History, PrincipalId, SiteId, UnixMillis, Use, format_rfc3339,
    parse_rfc3339,
};

use crate::operator_audit;

#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Assign a device to a patient pseudonym and a site from `--at` on; an assignment
    /// open then is closed at that instant (a reassignment).
    Assign {
        #[command(flatten)]
        target: Target,
        /// Pseudonym of the patient (never a name or direct identifier).
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
}

/// The registry file, the device and the instant of a change.
#[derive(Debug, Args)]
pub struct Target {
    /// The registry file (v1 or v2; written back as v2).
    #[arg(long)]
    registry: PathBuf,
    #[arg(long)]
    device: String,
    /// When the change takes effect (RFC 3339); now when absent.
    #[arg(long)]
    at: Option<String>,
}

impl RegistryCommand {
    pub fn run(self) -> anyhow::Result<std::process::ExitCode> {
        let (name, target) = match &self {
            Self::Assign { target, .. } => ("registry.assign", target),
            Self::Unassign { target } => ("registry.unassign", target),
            Self::Retire { target } => ("registry.retire", target),
        };
        let mut action = operator_audit::Action::new(name, audit_log(&target.registry))
            .resource(Some(format!("device/{}", target.device)))
            .detail("registry", operator_audit::absolute(&target.registry));
        if let Self::Assign { site, .. } = &self {
            action = action.detail("site", site.as_str());
        }
        action.run(|| self.apply())?;
        Ok(std::process::ExitCode::SUCCESS)
    }

    fn apply(self) -> anyhow::Result<((), Map<String, Value>)> {
        let (path, device, at) = {
            let t = match &self {
                Self::Assign { target, .. }
                | Self::Unassign { target }
                | Self::Retire { target } => target,
            };
            let device = DeviceId::new(t.device.clone())
                .with_context(|| format!("--device {}", t.device))?;
            let at = match &t.at {
                Some(text) => parse_rfc3339(text).with_context(|| format!("--at {text}"))?,
                None => now_ms()?,
            };
            (t.registry.clone(), device, at)
        };
        let _turn = lock_dir(dir_of(&path))?;
        let mut registry = DeviceRegistry::load(&path)?;
        let before = registry
            .history(&device)
            .cloned()
            .with_context(|| format!("device `{device}` is not in {}", path.display()))?;
        match self {
            Self::Assign {
                patient_ref, site, ..
            } => {
                anyhow::ensure!(
                    PrincipalId::new(patient_ref.clone()).is_ok(),
                    "--patient-ref must be a pseudonymous token ([A-Za-z0-9][A-Za-z0-9._-]{{0,63}}), never a name or direct identifier"
                );
                let site = SiteId::new(site.clone()).with_context(|| format!("--site {site}"))?;
                registry.change_history(&device, |h| h.reassign(at, None, patient_ref, site))?
            }
            Self::Unassign { .. } => registry.change_history(&device, |h| h.close(at))?,
            Self::Retire { .. } => registry.change_history(&device, |h| h.retire(at))?,
        }
        let text = registry.to_toml();
        // What is written must load: never leave a registry the broker would refuse.
        DeviceRegistry::parse(&text, &path)
            .context("the changed registry does not validate; nothing was written")?;
        write_atomically(&path, &text)?;
        let after = registry
            .history(&device)
            .cloned()
            .expect("a registered device keeps its history");
        for line in changes(&before, &after) {
            println!("{device}: {line}");
        }
        println!("wrote {} (vitalmq-registry/v2)", path.display());
        tracing::info!(device = %device, at = %format_rfc3339(at), "registry changed");
        let mut details = Map::new();
        details.insert("at".into(), format_rfc3339(at).into());
        Ok(((), details))
    }
}

/// The operator log for changes to `registry`.
fn audit_log(registry: &Path) -> PathBuf {
    let dir = registry.parent().unwrap_or(Path::new("."));
    operator_audit::log_path(dir.join("audit").join("operator.jsonl"))
}

fn now_ms() -> anyhow::Result<UnixMillis> {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the clock is before 1970")?;
    u64::try_from(since.as_millis()).context("the clock is out of range")
}

/// One line per period that went (`-`) or came (`+`).
fn changes(before: &History, after: &History) -> Vec<String> {
    let gone = before
        .periods()
        .iter()
        .filter(|p| !after.periods().contains(p))
        .map(|p| format!("- {}", describe(p)));
    let came = after
        .periods()
        .iter()
        .filter(|p| !before.periods().contains(p))
        .map(|p| format!("+ {}", describe(p)));
    gone.chain(came).collect()
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

/// The directory `path` is in.
fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Waits for, then holds, an exclusive lock on `dir` (released on drop).
fn lock_dir(dir: &Path) -> anyhow::Result<Flock<std::fs::File>> {
    let file =
        std::fs::File::open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| anyhow::anyhow!("cannot lock {}: {errno}", dir.display()))
}

/// Replaces `path` with `text`: a 0600 temporary in the same directory, synced, renamed
/// over `path`, then the directory synced, so a crash leaves the old or the new file.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
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
