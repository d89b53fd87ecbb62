//! The models file as written: serde types that mirror the TOML, every value [`Spanned`]
//! so validation can name its line, `deny_unknown_fields` everywhere. Nothing here is
//! checked beyond TOML types; [`super::validate`] turns it into a `ModelRegistry`.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    pub(super) format: Spanned<String>,
    pub(super) policy: Option<Spanned<RawPolicy>>,
    #[serde(default)]
    pub(super) models: Vec<Spanned<RawModel>>,
    #[serde(default)]
    pub(super) rollout: Vec<Spanned<RawRollout>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    pub(super) unapproved_alarms: Option<Spanned<String>>,
    pub(super) unapproved_quiet_minutes: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModel {
    pub(super) name: Spanned<String>,
    pub(super) version: Spanned<String>,
    pub(super) kind: Spanned<String>,
    pub(super) artifact_sha256: Spanned<String>,
    pub(super) lineage: Spanned<String>,
    pub(super) feature_pipeline: Spanned<String>,
    pub(super) intended_use: Spanned<String>,
    pub(super) status: Spanned<String>,
    pub(super) approved_by: Option<Spanned<String>>,
    pub(super) approved_at: Option<Spanned<String>>,
    pub(super) withdrawn_at: Option<Spanned<String>>,
    pub(super) withdrawn_reason: Option<Spanned<String>>,
    pub(super) approved_for: Option<Spanned<RawApprovedFor>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApprovedFor {
    #[serde(default)]
    pub(super) sites: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) cohorts: Vec<Spanned<String>>,
    pub(super) firmware: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) hardware_models: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRollout {
    pub(super) model: Spanned<String>,
    pub(super) live: Spanned<String>,
    #[serde(default)]
    pub(super) shadow: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) canary: Vec<Spanned<RawCanary>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCanary {
    pub(super) version: Spanned<String>,
    #[serde(default)]
    pub(super) sites: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) cohorts: Vec<Spanned<String>>,
}
