//! `vitalmq hold place|lift|list --holds FILE`: legal holds (issue 20, point 2), the
//! records retention, anonymisation and erasure must leave alone.
//!
//! A change is checked by [`vitalmq_policies::LegalHolds::place`] or
//! [`vitalmq_policies::LegalHolds::lift`] (a new id, a pseudonymous patient reference,
//! a valid device, a non-empty range, at least one criterion; lifting an active hold),
//! so a refused change exits non-zero and leaves the file as it was. An accepted one is
//! written as `vitalmq-holds/v1`, checked to load first, atomically and owner-only (the
//! registry's writer). A lifted hold stays in the file with who lifted it, when and
//! why: it holds nothing any more, but the history of holds is evidence. Concurrent
//! changes take turns under the exclusive lock of the file's directory
//! ([`vitalmq_private_fs::lock_dir_timeout`], as `vitalmq registry` takes it).
//!
//! [`apply`] is the one place a change happens, for the CLI (as the local account) and
//! for the admin API (as an authenticated operator, `POST /v1/holds`). Every change and
//! every refusal is an operator action (`hold.place`, `hold.lift`; `holds.read` for a
//! listing by the CLI), logged by default in `audit/operator.jsonl` beside the holds
//! file, or in `$VITALMQ_OPERATOR_AUDIT`. The record names the hold, its device and
//! range, whether it names a patient, the reason and the acting identity; never the
//! patient pseudonym. `placed_by`/`lifted_by` is the operator id of an API caller, the
//! local user name for the CLI.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Subcommand;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use vitalmq_policies::{
    Hold, HoldRequest, LegalHolds, LiftedHold, PrincipalId, SpiffeId, UnixMillis, format_rfc3339,
    parse_rfc3339,
};
use vitalmq_private_fs::{dir_of, lock_dir_timeout};

use crate::operator_audit;
use crate::registry_cmd::{self, Actor};

#[derive(Debug, Subcommand)]
pub enum HoldCommand {
    /// Place a legal hold on a patient, a device, a time range, or several of these:
    /// nothing it covers is deleted, anonymised, archived or erased until it is lifted.
    Place {
        /// The holds file (`vitalmq-holds/v1`); created when absent.
        #[arg(long)]
        holds: PathBuf,
        /// The hold's id ([A-Za-z0-9][A-Za-z0-9._-]{0,63}), never used before.
        #[arg(long)]
        id: String,
        /// Why the hold is placed (a claim, a recall).
        #[arg(long)]
        reason: String,
        /// Pseudonym of the patient: `pt-` then at least 8 of [0-9a-z-].
        #[arg(long)]
        patient: Option<String>,
        #[arg(long)]
        device: Option<String>,
        /// Start of the held range (RFC 3339, inclusive); open when absent.
        #[arg(long)]
        from: Option<String>,
        /// End of the held range (RFC 3339, exclusive); open when absent.
        #[arg(long)]
        to: Option<String>,
    },
    /// Lift an active hold: it is kept in the file, with who lifted it, when and why,
    /// and holds nothing any more.
    Lift {
        #[arg(long)]
        holds: PathBuf,
        #[arg(long)]
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Every hold, active and lifted, as JSON lines (audited: holds name patients).
    List {
        #[arg(long)]
        holds: PathBuf,
    },
}

/// A hold to place, as the CLI parses it and the admin API receives it (JSON
/// `{"id", "reason", "patient_ref"?, "device"?, "from"?, "to"?}`, times RFC 3339).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Place {
    pub id: String,
    pub reason: String,
    #[serde(default)]
    pub patient_ref: Option<String>,
    #[serde(default)]
    pub device: Option<String>,
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub to: Option<String>,
}

/// The body of a lift through the admin API: `{"reason": "..."}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lift {
    pub reason: String,
}

/// One change of the holds file.
#[derive(Debug, Clone)]
pub enum Change {
    Place(Place),
    Lift { id: String, reason: String },
}

impl Change {
    /// The operator action name of the change (the admin action's name too).
    pub fn action(&self) -> &'static str {
        match self {
            Self::Place(_) => "hold.place",
            Self::Lift { .. } => "hold.lift",
        }
    }

    fn id(&self) -> &str {
        match self {
            Self::Place(p) => &p.id,
            Self::Lift { id, .. } => id,
        }
    }
}

impl HoldCommand {
    pub fn run(self) -> anyhow::Result<std::process::ExitCode> {
        let (path, change) = match self {
            Self::List { holds } => {
                let rows = operator_audit::Action::new("holds.read", audit_log(&holds))
                    .resource(Some("holds".into()))
                    .detail("holds", operator_audit::absolute(&holds))
                    .run(|| {
                        let rows = read(&holds)?;
                        let mut details = Map::new();
                        details.insert("rows".into(), rows.len().into());
                        Ok((rows, details))
                    })?;
                for row in rows {
                    println!("{row}");
                }
                return Ok(std::process::ExitCode::SUCCESS);
            }
            Self::Place {
                holds,
                id,
                reason,
                patient,
                device,
                from,
                to,
            } => (
                holds,
                Change::Place(Place {
                    id,
                    reason,
                    patient_ref: patient,
                    device,
                    from,
                    to,
                }),
            ),
            Self::Lift { holds, id, reason } => (holds, Change::Lift { id, reason }),
        };
        let done = apply(&path, &change, &Actor::default())?;
        let verb = match change {
            Change::Place(_) => "placed",
            Change::Lift { .. } => "lifted",
        };
        println!("{verb} hold {}", done["id"].as_str().unwrap_or_default());
        println!("wrote {} (vitalmq-holds/v1)", path.display());
        Ok(std::process::ExitCode::SUCCESS)
    }
}

/// Every hold of the file at `path`, active and lifted, as JSON.
pub fn read(path: &Path) -> anyhow::Result<Vec<Value>> {
    let holds = LegalHolds::load(path)?;
    Ok(holds
        .holds()
        .iter()
        .map(|h| hold_json(h, None))
        .chain(holds.lifted().iter().map(|l| hold_json(&l.hold, Some(l))))
        .collect())
}

/// Applies `change` to the holds file `path` as `actor`: an audited operator action;
/// a refused change leaves the file untouched. Returns the hold as JSON.
pub fn apply(path: &Path, change: &Change, actor: &Actor) -> anyhow::Result<Value> {
    let mut action = operator_audit::Action::new(change.action(), audit_log(path))
        .resource(Some(format!("hold/{}", change.id())))
        .detail("holds", operator_audit::absolute(path));
    for (key, value) in [
        ("identity", &actor.identity),
        ("role", &actor.role),
        ("purpose", &actor.purpose),
    ] {
        if let Some(value) = value {
            action = action.detail(key, value.as_str());
        }
    }
    match change {
        Change::Place(p) => {
            // What the hold covers, never whom: a patient is only said to be named.
            action = action
                .detail("reason", p.reason.as_str())
                .detail("names_patient", p.patient_ref.is_some());
            for (key, value) in [("device", &p.device), ("from", &p.from), ("to", &p.to)] {
                if let Some(value) = value {
                    action = action.detail(key, value.as_str());
                }
            }
        }
        Change::Lift { reason, .. } => action = action.detail("reason", reason.as_str()),
    }
    action.run(|| change_file(path, change, actor))
}

/// Who a change is by: the operator id of an API caller, the local user otherwise.
fn acting_id(actor: &Actor) -> anyhow::Result<PrincipalId> {
    if let Some(identity) = &actor.identity {
        let spiffe: SpiffeId = identity
            .parse()
            .with_context(|| format!("`{identity}` is not a SPIFFE id"))?;
        return Ok(spiffe.id);
    }
    let me = vitalmq_audit::operator::Operator::current();
    PrincipalId::new(me.user.clone())
        .or_else(|_| PrincipalId::new(format!("uid-{}", me.uid)))
        .context("the local account has no usable name")
}

fn time(text: Option<&String>, flag: &str) -> anyhow::Result<Option<UnixMillis>> {
    text.map(|t| parse_rfc3339(t).with_context(|| format!("--{flag} {t}")))
        .transpose()
}

fn change_file(
    path: &Path,
    change: &Change,
    actor: &Actor,
) -> anyhow::Result<(Value, Map<String, Value>)> {
    let by = acting_id(actor)?;
    let _turn = lock_dir_timeout(dir_of(path), registry_cmd::LOCK_TIMEOUT)?;
    let mut holds = if path.exists() {
        LegalHolds::load(path)?
    } else {
        LegalHolds::none()
    };
    let now = registry_cmd::now_ms()?;
    let done = match change {
        Change::Place(p) => {
            let request = HoldRequest {
                id: p.id.clone(),
                reason: p.reason.clone(),
                patient_ref: p.patient_ref.clone(),
                device: p.device.clone(),
                from: time(p.from.as_ref(), "from")?,
                to: time(p.to.as_ref(), "to")?,
            };
            hold_json(holds.place(request, by, now)?, None)
        }
        Change::Lift { id, reason } => {
            let lifted = holds.lift(id, reason, by, now)?;
            hold_json(&lifted.hold, Some(lifted))
        }
    };
    let text = holds.to_toml();
    // What is written must load: never leave a file retention would refuse.
    LegalHolds::parse(&text, path)
        .context("the changed holds do not validate; nothing was written")?;
    registry_cmd::write_atomically(path, &text)?;
    tracing::info!(
        hold = change.id(),
        action = change.action(),
        "legal holds changed"
    );
    let mut details = Map::new();
    details.insert("at".into(), format_rfc3339(now).into());
    details.insert("active_holds".into(), holds.holds().len().into());
    Ok((done, details))
}

/// One hold as the CLI lists it and the admin API answers it.
pub fn hold_json(hold: &Hold, lifted: Option<&LiftedHold>) -> Value {
    let mut v = json!({
        "id": hold.id,
        "reason": hold.reason,
        "placed_by": hold.placed_by.as_str(),
        "placed_at": format_rfc3339(hold.placed_at),
        "active": lifted.is_none(),
    });
    let map = v.as_object_mut().expect("a JSON object");
    if let Some(p) = &hold.patient_ref {
        map.insert("patient_ref".into(), p.as_str().into());
    }
    if let Some(d) = &hold.device {
        map.insert("device".into(), d.as_str().into());
    }
    if let Some(period) = hold.during {
        map.insert("from".into(), format_rfc3339(period.from).into());
        if let Some(to) = period.to {
            map.insert("to".into(), format_rfc3339(to).into());
        }
    }
    if let Some(l) = lifted {
        map.insert("lifted_at".into(), format_rfc3339(l.lifted_at).into());
        map.insert("lifted_by".into(), l.lifted_by.as_str().into());
        map.insert("lift_reason".into(), l.reason.as_str().into());
    }
    v
}

/// The operator log for changes to the holds file `holds`.
fn audit_log(holds: &Path) -> PathBuf {
    let dir = holds.parent().unwrap_or(Path::new("."));
    operator_audit::log_path(dir.join("audit").join("operator.jsonl"))
}
