//! The score tables in force and their roles (bridge config `[scoring]`).

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use vitalmq_policies::{ScoreTable, Spo2Scale};

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

/// The scoring in force: the tables (the first is the live version until a model
/// registry assigns roles) and the rule-set cohorts scored on SpO2 scale 2.
#[derive(Debug, Clone, Default)]
pub struct Scoring {
    pub models: Vec<ScoreModel>,
    pub spo2_scale2_cohorts: BTreeSet<String>,
}

impl Scoring {
    /// The role of the `index`-th table for a patient at `site` in `cohorts`: the first
    /// configured table is live, the others shadow. (A model registry's
    /// `role(model, version, site, cohorts)` replaces this once merged.)
    pub fn role(&self, index: usize, _site: &str, _cohorts: &[&str]) -> Role {
        if index == 0 { Role::Live } else { Role::Shadow }
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
