//! `vitalmq reid`: enrol patients into the re-identification store and, for an
//! authorised identity with a stated purpose, look a pseudonym up.
//!
//! Every enrolment and every lookup, granted or refused, is an operator action (see
//! `operator_audit`). The audit names the pseudonym, the identity and the purpose, never
//! the enrolment id. The identity is the one the operator states: this command runs on
//! the store's host under the store owner's account (the audit also records that user).

mod store;

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use serde_json::Map;
use vitalmq_policies::{SpiffeId, is_pseudonym};

use crate::operator_audit::{self, Action};
use store::Store;

#[derive(Debug, Subcommand)]
pub enum ReidCommand {
    /// Record an enrolment id and print its care pseudonym (makes the store if absent).
    Enrol(EnrolArgs),
    /// Print the enrolment id behind a pseudonym (authorised identity and purpose only).
    Lookup(LookupArgs),
}

#[derive(Debug, Args)]
pub struct EnrolArgs {
    /// The re-identification store directory.
    #[arg(long)]
    store: PathBuf,
    /// The patient's enrolment identifier.
    #[arg(long)]
    enrolment_id: String,
}

#[derive(Debug, Args)]
pub struct LookupArgs {
    /// The re-identification store directory; not with `--server`.
    #[arg(long, required_unless_present = "server", conflicts_with = "server")]
    store: Option<PathBuf>,
    /// The pseudonym to re-identify (`pt-...`).
    #[arg(long)]
    pseudonym: String,
    /// The SPIFFE identity asking; it must be listed in the store's `authorised.toml`.
    /// With `--server`, the identity is the operator certificate's.
    #[arg(long, conflicts_with = "server")]
    identity: Option<String>,
    /// Why the pseudonym is re-identified (recorded in the audit log). Required: a
    /// lookup without one is refused, and the refusal audited.
    #[arg(long)]
    purpose: Option<String>,
    /// The admin API to ask instead of the local store.
    #[command(flatten)]
    client: crate::admin_cmd::client::ClientArgs,
}

impl ReidCommand {
    pub fn run(self) -> anyhow::Result<std::process::ExitCode> {
        match self {
            Self::Enrol(args) => enrol(args),
            Self::Lookup(args) => lookup(args),
        }
    }
}

fn enrol(args: EnrolArgs) -> anyhow::Result<std::process::ExitCode> {
    let store = Store::create_or_open(&args.store)?;
    let pseudonym = store.care_pseudonym(&args.enrolment_id)?;
    let (pseudonym, _) = Action::new(
        "reid.enrol",
        operator_audit::log_path(Store::operator_audit(&args.store)),
    )
    .resource(Some(pseudonym))
    .detail("store", operator_audit::absolute(&args.store))
    .run(|| {
        let (pseudonym, new) = store.enrol(&args.enrolment_id)?;
        let mut details = Map::new();
        details.insert("new".to_owned(), new.into());
        Ok(((pseudonym, new), details))
    })?;
    println!("{pseudonym}");
    Ok(std::process::ExitCode::SUCCESS)
}

fn lookup(args: LookupArgs) -> anyhow::Result<std::process::ExitCode> {
    let store = match (args.client.remote(), &args.store) {
        (Some(server), _) => {
            return args
                .client
                .reid_lookup(server, &args.pseudonym, args.purpose.as_deref());
        }
        (None, Some(store)) => store,
        (None, None) => anyhow::bail!("--store or --server is required"),
    };
    let enrolment_id = lookup_as(
        store,
        &args.pseudonym,
        args.identity.as_deref(),
        args.purpose.as_deref(),
    )?;
    println!("{enrolment_id}");
    Ok(std::process::ExitCode::SUCCESS)
}

/// The enrolment id behind `pseudonym` in the store `dir`, for `identity` (which must
/// be authorised) and a stated `purpose`: an audited operator action, refused ones
/// included. The CLI states the identity; the admin API passes the verified one.
pub fn lookup_as(
    dir: &Path,
    pseudonym: &str,
    identity: Option<&str>,
    purpose: Option<&str>,
) -> anyhow::Result<String> {
    // No store, nothing to audit: do not create an audit log in a mistyped directory.
    let store = Store::open(dir)?;
    Action::new(
        "reid.lookup",
        operator_audit::log_path(Store::operator_audit(dir)),
    )
    .resource(Some(pseudonym.to_owned()))
    .detail("store", operator_audit::absolute(dir))
    .detail("identity", identity)
    .detail("purpose", purpose)
    .run(|| {
        let purpose = purpose.map(str::trim).filter(|p| !p.is_empty());
        anyhow::ensure!(purpose.is_some(), "refused: no purpose stated (--purpose)");
        let identity =
            identity.ok_or_else(|| anyhow::anyhow!("refused: no identity stated (--identity)"))?;
        let identity = SpiffeId::parse(identity)
            .map_err(|e| anyhow::anyhow!("refused: --identity is not a SPIFFE id: {e}"))?;
        anyhow::ensure!(
            store.is_authorised(&identity)?,
            "refused: {identity} is not authorised to re-identify (authorised.toml)"
        );
        anyhow::ensure!(
            is_pseudonym(pseudonym),
            "not a pseudonym (pt- and 32 hex digits)"
        );
        let found = store
            .lookup(pseudonym)?
            .ok_or_else(|| anyhow::anyhow!("no enrolment under this pseudonym"))?;
        let mut details = Map::new();
        details.insert("granted".to_owned(), true.into());
        Ok((found, details))
    })
}
