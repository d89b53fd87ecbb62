//! The score tables in force and their roles (bridge config `[scoring]`).

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use vitalmq_policies::{ModelRegistry, ModelRole, ScoreTable, SiteId, Spo2Scale};

/// What a version's outputs may do (issue 21, part 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Its risk raises and resolves alerts.
    Live,
    /// Computed and stored, never delivered: its would-be alert transitions are in its
    /// score rows only.
    Shadow,
    /// The live version for the sites and cohorts it is rolled out to.
    Canary,
}

impl Role {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Shadow => "shadow",
            Self::Canary => "canary",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Live, Self::Shadow, Self::Canary]
            .into_iter()
            .find(|r| r.as_str() == s)
    }

    /// Whether its alerts go to the `alerts` table (and so to the handlers).
    pub const fn delivers(self) -> bool {
        matches!(self, Self::Live | Self::Canary)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One configured score table.
#[derive(Debug, Clone)]
pub struct ScoreModel {
    pub table: Arc<ScoreTable>,
    /// Where the table was loaded from (for logs and audit).
    pub path: String,
}

/// The scoring in force: the tables, the rule-set cohorts scored on SpO2 scale 2, and
/// the model registry whose `[[rollout]]` of each table's model gives the versions'
/// roles (without one, the first table is live and the others shadow).
#[derive(Debug, Clone, Default)]
pub struct Scoring {
    pub models: Vec<ScoreModel>,
    pub spo2_scale2_cohorts: BTreeSet<String>,
    pub registry: Option<Arc<ModelRegistry>>,
}

impl Scoring {
    /// The role of the `index`-th table for a device at `site` in `cohorts`: the model
    /// registry's (`ModelRegistry::role`; `None`, the version does not run there: no
    /// score); without a registry the first table is live and the others shadow.
    pub fn role(&self, index: usize, site: &SiteId, cohorts: &[&str]) -> Option<Role> {
        match &self.registry {
            Some(r) => {
                let table = &self.models.get(index)?.table;
                r.role(table.model(), table.version(), site, cohorts)
                    .map(|role| match role {
                        ModelRole::Live => Role::Live,
                        ModelRole::Shadow => Role::Shadow,
                        ModelRole::Canary => Role::Canary,
                    })
            }
            None => Some(if index == 0 { Role::Live } else { Role::Shadow }),
        }
    }

    /// The SpO2 scale of a device in `cohorts`: scale 2 when any is configured so.
    /// (The assignment does not yet carry a per-patient scale: a clinical decision the
    /// cohort stands for until it does.)
    pub fn spo2_scale(&self, cohorts: &[&str]) -> Spo2Scale {
        if cohorts
            .iter()
            .any(|c| self.spo2_scale2_cohorts.contains(*c))
        {
            Spo2Scale::Scale2
        } else {
            Spo2Scale::Scale1
        }
    }

    /// The metrics any table reads: a reading without one does not concern scoring.
    pub fn metrics(&self) -> BTreeSet<&str> {
        self.models.iter().flat_map(|m| m.table.metrics()).collect()
    }
}
