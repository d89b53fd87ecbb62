//! The model registry (issue 21): every model vitalmq meets, with what governance needs
//! to know about it, and which version of each server-side model runs where.
//!
//! A model is a device-side algorithm (an arrhythmia detector reporting alarms), a
//! server-side score (NEWS2 tables) or a rule set. Each `[[models]]` entry is one version:
//! its artifact digest, training-data lineage reference, feature-pipeline version,
//! intended use, approval status (`draft`, `approved`, `withdrawn`) with approver and date,
//! and what it is approved for (sites, cohorts, a firmware semver requirement, hardware
//! models; an empty list means everywhere).
//!
//! A device reports its model as `name/version` (e.g. `arrhythmia-net/2.1.0`);
//! [`ModelRegistry::resolve`] turns that and the device's facts into a [`ModelStatus`].
//! A `[[rollout]]` per score or rule-set name says which version is live, which run in
//! shadow (computed and stored, never delivered) and which are canaries for chosen sites
//! or cohorts ([`ModelRegistry::role`]); rollback is an edit of the rollout.
//!
//! The file is TOML (`vitalmq-models/v1`, see `policies/examples/models.toml`), parsed
//! into raw serde types (every value [`Spanned`], `deny_unknown_fields`), then validated;
//! every problem is reported at once with file, line and field.
//!
//! Invariants of a validated [`ModelRegistry`]:
//! - `(name, version)` is unique; an approved entry has `approved_by` and `approved_at`,
//!   a withdrawn one `withdrawn_at` and `withdrawn_reason`; a draft has neither;
//! - every rollout names a score or rule-set model of the registry, at most one rollout
//!   per name; its live version is approved; every shadow and canary version exists and
//!   is not the live one; no version is both shadow and canary, nor canary twice; every
//!   canary names at least one site or cohort.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::assignment::UnixMillis;
use crate::error::{PolicyErrors, Problems};
use crate::registry::{SiteId, parse_rfc3339};
use crate::rules::check_name;

mod raw;
mod validate;

const FORMAT: &str = "vitalmq-models/v1";

/// What kind of model an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Runs on the device; its outputs (alarms, derived vitals) name it in `model`.
    Device,
    /// A server-side score (e.g. NEWS2 tables).
    Score,
    /// An alert rule set (`vitalmq-rules/v1`).
    Rules,
}

impl ModelKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::Score => "score",
            Self::Rules => "rules",
        }
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an entry stands in its approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Approval {
    Draft,
    Approved {
        by: String,
        at: UnixMillis,
    },
    /// `approved` keeps who approved it earlier, when the file says.
    Withdrawn {
        at: UnixMillis,
        reason: String,
        approved: Option<(String, UnixMillis)>,
    },
}

impl Approval {
    /// `draft`, `approved` or `withdrawn`, as the file spells it.
    pub const fn as_str(&self) -> &'static str {
        match self {
            Self::Draft => "draft",
            Self::Approved { .. } => "approved",
            Self::Withdrawn { .. } => "withdrawn",
        }
    }

    pub const fn is_approved(&self) -> bool {
        matches!(self, Self::Approved { .. })
    }
}

/// Where a model version may be used; an empty list (or no firmware requirement) means
/// everywhere.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ApprovedFor {
    pub sites: BTreeSet<SiteId>,
    /// Cohort names, as the rule set's `[cohorts]` defines them.
    pub cohorts: BTreeSet<String>,
    /// A semver requirement on the device firmware, e.g. `>=5.0, <6`.
    pub firmware: Option<semver::VersionReq>,
    pub hardware_models: BTreeSet<String>,
}

/// One model version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelEntry {
    pub name: String,
    pub version: String,
    pub kind: ModelKind,
    /// SHA-256 of the artifact (weights, score table, rule file), lowercase hex.
    pub artifact_sha256: String,
    /// Training-data lineage reference (a data-set id, a document).
    pub lineage: String,
    /// Version of the feature pipeline the model expects.
    pub feature_pipeline: String,
    pub intended_use: String,
    pub approval: Approval,
    pub approved_for: ApprovedFor,
}

impl ModelEntry {
    /// `name/version`, as devices report it.
    pub fn reference(&self) -> String {
        format!("{}/{}", self.name, self.version)
    }

    /// Whether the approval covers a device with these facts (ignores the status).
    pub fn covers(&self, facts: &DeviceFacts<'_>) -> bool {
        let a = &self.approved_for;
        let site_ok = a.sites.is_empty() || facts.site.is_some_and(|s| a.sites.contains(s));
        let cohort_ok =
            a.cohorts.is_empty() || facts.cohorts.iter().any(|c| a.cohorts.contains(*c));
        let hw_ok = a.hardware_models.is_empty()
            || facts
                .hardware_model
                .is_some_and(|h| a.hardware_models.contains(h));
        let fw_ok = a.firmware.as_ref().is_none_or(|req| {
            facts
                .fw
                .and_then(parse_firmware)
                .is_some_and(|v| req.matches(&v))
        });
        site_ok && cohort_ok && hw_ok && fw_ok
    }
}

/// A firmware string as a semver version: `5.12.1` as is, `5.12` as `5.12.0`, `5` as
/// `5.0.0`; anything else is no version (and so meets no firmware requirement).
fn parse_firmware(fw: &str) -> Option<semver::Version> {
    let fw = fw.strip_prefix('v').unwrap_or(fw);
    semver::Version::parse(fw).ok().or_else(|| {
        let dots = fw.matches('.').count();
        let padded = match dots {
            0 => format!("{fw}.0.0"),
            1 => format!("{fw}.0"),
            _ => return None,
        };
        semver::Version::parse(&padded).ok()
    })
}

/// What the bridge knows about a device when it resolves its reported model.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeviceFacts<'a> {
    pub site: Option<&'a SiteId>,
    /// Names of the rule-set cohorts the device is in.
    pub cohorts: &'a [&'a str],
    /// Firmware version the device reports (`fw` in status messages).
    pub fw: Option<&'a str>,
    /// From the device registry.
    pub hardware_model: Option<&'a str>,
}

/// What a device-reported model resolves to; spelled so in JSON and Parquet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelStatus {
    /// Approved, and approved for this device's site, cohort, firmware and hardware.
    Approved,
    /// In the registry as a draft.
    Unapproved,
    Withdrawn,
    /// Not in the registry as a device model (or not `name/version` at all).
    Unknown,
    /// Approved, but not for this device (site, cohort, firmware or hardware model).
    OutOfCohort,
    /// The message reports no model.
    None,
}

impl ModelStatus {
    pub const ALL: [Self; 6] = [
        Self::Approved,
        Self::Unapproved,
        Self::Withdrawn,
        Self::Unknown,
        Self::OutOfCohort,
        Self::None,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Approved => "approved",
            Self::Unapproved => "unapproved",
            Self::Withdrawn => "withdrawn",
            Self::Unknown => "unknown",
            Self::OutOfCohort => "out_of_cohort",
            Self::None => "none",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.as_str() == s)
    }

    /// A reported model whose outputs are not covered by an approval: `unapproved`,
    /// `withdrawn`, `unknown` or `out_of_cohort` (not `approved`, not `none`).
    pub const fn needs_attention(self) -> bool {
        !matches!(self, Self::Approved | Self::None)
    }
}

impl fmt::Display for ModelStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a version of a score or rule set does at a site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelRole {
    /// Its outputs are delivered.
    Live,
    /// Computed and stored, never delivered.
    Shadow,
    /// The live version for the canary's sites and cohorts.
    Canary,
}

impl ModelRole {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Shadow => "shadow",
            Self::Canary => "canary",
        }
    }

    /// Whether outputs of this role are delivered (live and canary).
    pub const fn delivers(self) -> bool {
        !matches!(self, Self::Shadow)
    }
}

impl fmt::Display for ModelRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A candidate version that is live for some sites or cohorts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Canary {
    pub version: String,
    pub sites: BTreeSet<SiteId>,
    pub cohorts: BTreeSet<String>,
}

impl Canary {
    fn applies(&self, site: &SiteId, cohorts: &[&str]) -> bool {
        self.sites.contains(site) || cohorts.iter().any(|c| self.cohorts.contains(*c))
    }
}

/// Which versions of one score or rule set run, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    pub model: String,
    pub live: String,
    pub shadow: Vec<String>,
    /// In file order; the first that applies to a site or cohort wins.
    pub canary: Vec<Canary>,
}

/// What happens to alarms of a device model whose status is not `approved`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnapprovedAlarms {
    /// Delivered, marked with their `model_status` (the default: a real alarm is never
    /// lost to a paperwork gap).
    #[default]
    Deliver,
    /// Stored and audited, not delivered.
    Withhold,
}

impl UnapprovedAlarms {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Deliver => "deliver",
            Self::Withhold => "withhold",
        }
    }
}

/// Default of `[policy] unapproved_quiet_minutes`.
const DEFAULT_QUIET_MINUTES: u32 = 60;

/// A validated, immutable model registry; share it in an `Arc` and swap it on reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRegistry {
    sha256: String,
    unapproved_alarms: UnapprovedAlarms,
    unapproved_quiet_minutes: u32,
    entries: Vec<ModelEntry>,
    /// `(name, version)` to its index in `entries`.
    index: BTreeMap<(String, String), usize>,
    rollouts: BTreeMap<String, Rollout>,
}

impl ModelRegistry {
    /// Reads and validates a models file.
    pub fn load(path: &Path) -> Result<Self, PolicyErrors> {
        let text = crate::error::read_policy_file(path)?;
        Self::parse(&text, path)
    }

    /// Validates models text; `path` is used in error messages only. The hash is of
    /// `text`'s bytes, i.e. the file as loaded.
    pub fn parse(text: &str, path: &Path) -> Result<Self, PolicyErrors> {
        let mut problems = Problems::new(path, text);
        let mut registry = Self {
            sha256: hex::encode(Sha256::digest(text.as_bytes())),
            unapproved_alarms: UnapprovedAlarms::default(),
            unapproved_quiet_minutes: DEFAULT_QUIET_MINUTES,
            entries: Vec::new(),
            index: BTreeMap::new(),
            rollouts: BTreeMap::new(),
        };
        match toml::from_str::<raw::RawFile>(text) {
            Ok(raw) => validate::validate(raw, &mut registry, &mut problems),
            Err(e) => problems.toml(&e),
        }
        problems.finish(registry)
    }

    /// SHA-256 of the file bytes as loaded, lowercase hex.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// `[policy] unapproved_alarms`.
    pub fn unapproved_alarms(&self) -> UnapprovedAlarms {
        self.unapproved_alarms
    }

    /// `[policy] unapproved_quiet_minutes` (default 60): a
    /// `model_unapproved` operational episode with no message needing attention for
    /// this long resolves (`quiet`).
    pub fn unapproved_quiet_minutes(&self) -> u32 {
        self.unapproved_quiet_minutes
    }

    /// Every entry in file order.
    pub fn entries(&self) -> &[ModelEntry] {
        &self.entries
    }

    pub fn entry(&self, name: &str, version: &str) -> Option<&ModelEntry> {
        self.index
            .get(&(name.to_owned(), version.to_owned()))
            .map(|&i| &self.entries[i])
    }

    /// The entry a device-reported `name/version` names, if it is in the registry.
    pub fn reported_entry(&self, reported: &str) -> Option<&ModelEntry> {
        let (name, version) = reported.split_once('/')?;
        self.entry(name, version)
    }

    /// The rollout of a score or rule set.
    pub fn rollout(&self, name: &str) -> Option<&Rollout> {
        self.rollouts.get(name)
    }

    pub fn rollouts(&self) -> impl Iterator<Item = &Rollout> {
        self.rollouts.values()
    }

    /// The status of a device-reported model for a device with these facts. Only
    /// entries of kind `device` count: a score or rule set named by a device is
    /// `unknown`.
    pub fn resolve(&self, reported: Option<&str>, facts: &DeviceFacts<'_>) -> ModelStatus {
        let Some(reported) = reported else {
            return ModelStatus::None;
        };
        let Some(entry) = self
            .reported_entry(reported)
            .filter(|e| e.kind == ModelKind::Device)
        else {
            return ModelStatus::Unknown;
        };
        match entry.approval {
            Approval::Draft => ModelStatus::Unapproved,
            Approval::Withdrawn { .. } => ModelStatus::Withdrawn,
            Approval::Approved { .. } if entry.covers(facts) => ModelStatus::Approved,
            Approval::Approved { .. } => ModelStatus::OutOfCohort,
        }
    }

    /// The role of `model`'s `version` for a device at `site` in `cohorts`: the canary
    /// that applies there is live for it (the rollout's live version runs there as
    /// shadow); elsewhere the live version is live; shadow versions are shadow
    /// everywhere. `None`: the version does not run there (or `model` has no rollout).
    pub fn role(
        &self,
        model: &str,
        version: &str,
        site: &SiteId,
        cohorts: &[&str],
    ) -> Option<ModelRole> {
        let rollout = self.rollouts.get(model)?;
        let canary = rollout.canary.iter().find(|c| c.applies(site, cohorts));
        if let Some(c) = canary {
            if c.version == version {
                return Some(ModelRole::Canary);
            }
            if rollout.live == version {
                return Some(ModelRole::Shadow);
            }
        } else if rollout.live == version {
            return Some(ModelRole::Live);
        }
        rollout
            .shadow
            .iter()
            .any(|v| v == version)
            .then_some(ModelRole::Shadow)
    }

    /// Every version of `model` that runs for a device at `site` in `cohorts`, with its
    /// role: exactly one delivering version (live or canary) first, then the shadows.
    /// Empty when `model` has no rollout.
    pub fn running(&self, model: &str, site: &SiteId, cohorts: &[&str]) -> Vec<(&str, ModelRole)> {
        let Some(rollout) = self.rollouts.get(model) else {
            return Vec::new();
        };
        let mut out: Vec<(&str, ModelRole)> = Vec::new();
        match rollout.canary.iter().find(|c| c.applies(site, cohorts)) {
            Some(c) => {
                out.push((&c.version, ModelRole::Canary));
                out.push((&rollout.live, ModelRole::Shadow));
            }
            None => out.push((&rollout.live, ModelRole::Live)),
        }
        for v in &rollout.shadow {
            out.push((v, ModelRole::Shadow));
        }
        out
    }
}

#[cfg(test)]
mod tests;
