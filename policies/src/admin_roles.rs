//! Who may do what through the admin API (issue 19, point 4): operators (by the id of
//! their `spiffe://<td>/operator/<id>` certificate) are given one role each; a role is
//! a set of [`AdminAction`]s and a [`Scope`]. A role scoped to `sites` reaches only
//! devices of the sites listed for the operator (a clinician sees their own sites);
//! anything outside that scope needs break-glass (a stated reason, audited, alerted).
//!
//! The file is TOML, `vitalmq-admin-roles/v1` (see `policies/examples/admin-roles.toml`):
//!
//! ```toml
//! format = "vitalmq-admin-roles/v1"
//! [roles.clinician]
//! actions = ["events.read", "alerts.read", "trace.read"]
//! scope = "sites"
//! [[operators]]
//! id = "alice"
//! role = "clinician"
//! sites = ["site-01"]
//! ```
//!
//! Loading yields a complete policy or every problem with file and line; an operator
//! not listed has no role and may do nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use toml::Spanned;

use crate::error::{PolicyErrors, Problems, read_policy_file};
use crate::{PrincipalId, SiteId};

const FORMAT: &str = "vitalmq-admin-roles/v1";

/// What an admin API call does. A closed set: a role naming anything else is an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AdminAction {
    EventsRead,
    AlertsRead,
    TraceRead,
    QuarantineRead,
    RegistryAssign,
    RegistryUnassign,
    RegistryRetire,
    ConsentGrant,
    ConsentWithdraw,
    ReidLookup,
    /// List the legal holds, active and lifted (issue 20).
    HoldsRead,
    HoldPlace,
    HoldLift,
    /// Erase a patient by crypto-shredding (issue 20).
    PatientErase,
    /// Export one patient's data (issue 20).
    PatientExport,
}

impl AdminAction {
    pub const ALL: [AdminAction; 15] = [
        Self::EventsRead,
        Self::AlertsRead,
        Self::TraceRead,
        Self::QuarantineRead,
        Self::RegistryAssign,
        Self::RegistryUnassign,
        Self::RegistryRetire,
        Self::ConsentGrant,
        Self::ConsentWithdraw,
        Self::ReidLookup,
        Self::HoldsRead,
        Self::HoldPlace,
        Self::HoldLift,
        Self::PatientErase,
        Self::PatientExport,
    ];

    /// The name in the policy file and in audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EventsRead => "events.read",
            Self::AlertsRead => "alerts.read",
            Self::TraceRead => "trace.read",
            Self::QuarantineRead => "quarantine.read",
            Self::RegistryAssign => "registry.assign",
            Self::RegistryUnassign => "registry.unassign",
            Self::RegistryRetire => "registry.retire",
            Self::ConsentGrant => "registry.consent.grant",
            Self::ConsentWithdraw => "registry.consent.withdraw",
            Self::ReidLookup => "reid.lookup",
            Self::HoldsRead => "holds.read",
            Self::HoldPlace => "hold.place",
            Self::HoldLift => "hold.lift",
            Self::PatientErase => "patient.erase",
            Self::PatientExport => "patient.export",
        }
    }

    /// Whether the action reads patient-linked records (break-glass applies to reads).
    pub fn is_read(self) -> bool {
        matches!(
            self,
            Self::EventsRead | Self::AlertsRead | Self::TraceRead | Self::QuarantineRead
        )
    }
}

impl fmt::Display for AdminAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for AdminAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| {
                let all: Vec<_> = Self::ALL.iter().map(|a| a.as_str()).collect();
                format!("unknown action `{s}` (expected one of {})", all.join(", "))
            })
    }
}

/// Which devices a role reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Every site.
    All,
    /// Only the sites listed for the operator.
    Sites,
}

/// One role: its actions and scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminRole {
    pub name: String,
    pub actions: BTreeSet<AdminAction>,
    pub scope: Scope,
}

/// An operator's role and, for a site-scoped role, its sites.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grantee {
    pub role: AdminRole,
    pub sites: BTreeSet<SiteId>,
}

impl Grantee {
    /// Whether the role includes `action`.
    pub fn may(&self, action: AdminAction) -> bool {
        self.role.actions.contains(&action)
    }

    /// Whether `site` is inside the operator's scope.
    pub fn reaches(&self, site: &SiteId) -> bool {
        self.role.scope == Scope::All || self.sites.contains(site)
    }
}

/// The validated admin roles policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminRoles {
    operators: BTreeMap<PrincipalId, Grantee>,
    sha256: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    format: Spanned<String>,
    #[serde(default)]
    roles: BTreeMap<Spanned<String>, RawRole>,
    #[serde(default)]
    operators: Vec<RawOperator>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRole {
    actions: Vec<Spanned<String>>,
    scope: Scope,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOperator {
    id: Spanned<String>,
    role: Spanned<String>,
    #[serde(default)]
    sites: Vec<Spanned<String>>,
}

impl AdminRoles {
    pub fn load(path: &Path) -> Result<Self, PolicyErrors> {
        Self::parse(&read_policy_file(path)?, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, PolicyErrors> {
        let mut problems = Problems::new(path, text);
        let mut policy = Self {
            operators: BTreeMap::new(),
            sha256: hex::encode(Sha256::digest(text.as_bytes())),
        };
        let raw: RawPolicy = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                problems.toml(&e);
                return problems.finish(policy);
            }
        };
        if raw.format.get_ref() != FORMAT {
            problems.add(
                Some(raw.format.span()),
                "format",
                format!("expected \"{FORMAT}\""),
            );
        }
        let mut roles = BTreeMap::new();
        for (name, role) in raw.roles {
            let mut actions = BTreeSet::new();
            for (i, action) in role.actions.iter().enumerate() {
                match action.get_ref().parse::<AdminAction>() {
                    Ok(a) => {
                        actions.insert(a);
                    }
                    Err(message) => problems.add(
                        Some(action.span()),
                        format!("roles.{}.actions[{i}]", name.get_ref()),
                        message,
                    ),
                }
            }
            roles.insert(
                name.get_ref().clone(),
                AdminRole {
                    name: name.get_ref().clone(),
                    actions,
                    scope: role.scope,
                },
            );
        }
        for (i, op) in raw.operators.iter().enumerate() {
            let field = |f: &str| format!("operators[{i}].{f}");
            let id = match PrincipalId::new(op.id.get_ref().clone()) {
                Ok(id) => Some(id),
                Err(e) => {
                    problems.add(Some(op.id.span()), field("id"), e.to_string());
                    None
                }
            };
            let role = roles.get(op.role.get_ref()).cloned();
            if role.is_none() {
                problems.add(
                    Some(op.role.span()),
                    field("role"),
                    format!("no role `{}` in [roles]", op.role.get_ref()),
                );
            }
            let mut sites = BTreeSet::new();
            for (j, site) in op.sites.iter().enumerate() {
                match SiteId::new(site.get_ref().clone()) {
                    Ok(s) => {
                        sites.insert(s);
                    }
                    Err(e) => problems.add(
                        Some(site.span()),
                        field(&format!("sites[{j}]")),
                        e.to_string(),
                    ),
                }
            }
            if let Some(r) = &role
                && r.scope == Scope::Sites
                && op.sites.is_empty()
            {
                problems.add(
                    Some(op.role.span()),
                    field("sites"),
                    format!(
                        "role `{}` is scoped to sites: list the operator's sites",
                        r.name
                    ),
                );
            }
            if let (Some(id), Some(role)) = (id, role)
                && policy
                    .operators
                    .insert(id.clone(), Grantee { role, sites })
                    .is_some()
            {
                problems.add(
                    Some(op.id.span()),
                    field("id"),
                    format!("operator `{id}` is listed twice"),
                );
            }
        }
        problems.finish(policy)
    }

    /// The role of operator `id`, if it has one.
    pub fn grantee(&self, id: &PrincipalId) -> Option<&Grantee> {
        self.operators.get(id)
    }

    /// SHA-256 (hex) of the file's text, for audit records.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../examples/admin-roles.toml");

    #[test]
    fn the_example_loads_and_scopes_clinicians_to_their_sites() {
        let roles = AdminRoles::parse(EXAMPLE, Path::new("admin-roles.toml")).expect("valid");
        let alice = roles
            .grantee(&PrincipalId::new("alice").expect("id"))
            .expect("alice has a role");
        assert_eq!(alice.role.name, "clinician");
        assert!(alice.may(AdminAction::EventsRead));
        assert!(!alice.may(AdminAction::ReidLookup));
        assert!(alice.reaches(&SiteId::new("site-01").expect("site")));
        assert!(!alice.reaches(&SiteId::new("site-02").expect("site")));
        assert!(
            roles
                .grantee(&PrincipalId::new("mallory").expect("id"))
                .is_none()
        );
    }

    #[test]
    fn the_example_gives_holds_erasure_and_export_to_the_privacy_officer() {
        let roles = AdminRoles::parse(EXAMPLE, Path::new("admin-roles.toml")).expect("valid");
        let of = |id: &str| {
            roles
                .grantee(&PrincipalId::new(id).expect("id"))
                .unwrap_or_else(|| panic!("{id} has a role"))
        };
        let lifecycle = [
            AdminAction::HoldsRead,
            AdminAction::HoldPlace,
            AdminAction::HoldLift,
            AdminAction::PatientErase,
            AdminAction::PatientExport,
        ];
        let may = |id: &str| -> Vec<AdminAction> {
            lifecycle.into_iter().filter(|a| of(id).may(*a)).collect()
        };
        assert_eq!(may("priya"), lifecycle);
        assert_eq!(may("aurora"), [AdminAction::HoldsRead]);
        assert_eq!(may("adam"), [AdminAction::HoldsRead]);
        assert_eq!(may("alice"), []);
    }

    #[test]
    fn every_action_name_parses_back_to_its_action() {
        for action in AdminAction::ALL {
            assert_eq!(action.as_str().parse::<AdminAction>(), Ok(action));
        }
        let names: BTreeSet<_> = AdminAction::ALL.iter().map(|a| a.as_str()).collect();
        assert_eq!(names.len(), AdminAction::ALL.len(), "names are distinct");
        for name in [
            "holds.read",
            "hold.place",
            "hold.lift",
            "patient.erase",
            "patient.export",
        ] {
            assert!(names.contains(name), "{name}");
        }
    }

    #[test]
    fn problems_name_file_line_and_field() {
        let text = "format = \"vitalmq-admin-roles/v1\"\n\
                    [roles.clinician]\n\
                    actions = [\"events.read\", \"erase.everything\"]\n\
                    scope = \"sites\"\n\
                    [[operators]]\n\
                    id = \"bob\"\n\
                    role = \"clinician\"\n\
                    [[operators]]\n\
                    id = \"carol\"\n\
                    role = \"janitor\"\n";
        let err = AdminRoles::parse(text, Path::new("r.toml")).expect_err("invalid");
        let shown = err.to_string();
        assert!(
            shown.contains("r.toml:3: roles.clinician.actions[1]: unknown action"),
            "{shown}"
        );
        assert!(shown.contains("r.toml:7: operators[0].sites"), "{shown}");
        assert!(
            shown.contains("r.toml:10: operators[1].role: no role `janitor`"),
            "{shown}"
        );
        let err = AdminRoles::parse("format = \"x\"\n", Path::new("r.toml")).expect_err("format");
        assert!(err.to_string().contains("r.toml:1: format"), "{err}");
    }
}
