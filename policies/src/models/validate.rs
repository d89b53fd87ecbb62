//! Turns the raw models file into a [`ModelRegistry`], reporting every problem.

use std::collections::{BTreeMap, BTreeSet};

use toml::Spanned;

use super::raw::{RawApprovedFor, RawFile, RawModel, RawRollout};
use super::{
    Approval, ApprovedFor, Canary, FORMAT, ModelEntry, ModelKind, ModelRegistry, Rollout,
    UnapprovedAlarms,
};
use crate::error::Problems;
use crate::registry::SiteId;

use super::{check_name, parse_rfc3339};

/// Longest free-text field (lineage, intended use, reasons).
const MAX_TEXT: usize = 1024;
/// Longest name, version, cohort or hardware model.
const MAX_NAME: usize = 64;
/// Longest quiet period of a `model_unapproved` episode: a week.
const MAX_QUIET_MINUTES: u32 = 7 * 24 * 60;

pub(super) fn validate(raw: RawFile, reg: &mut ModelRegistry, p: &mut Problems<'_>) {
    if raw.format.get_ref() != FORMAT {
        p.add(
            Some(raw.format.span()),
            "format",
            format!("expected \"{FORMAT}\""),
        );
    }
    if let Some(u) = raw
        .policy
        .as_ref()
        .and_then(|policy| policy.get_ref().unapproved_alarms.as_ref())
    {
        match u.get_ref().as_str() {
            "deliver" => reg.unapproved_alarms = UnapprovedAlarms::Deliver,
            "withhold" => reg.unapproved_alarms = UnapprovedAlarms::Withhold,
            _ => p.add(
                Some(u.span()),
                "policy.unapproved_alarms",
                "must be \"deliver\" or \"withhold\"",
            ),
        }
    }
    if let Some(q) = raw
        .policy
        .as_ref()
        .and_then(|policy| policy.get_ref().unapproved_quiet_minutes.as_ref())
    {
        match u32::try_from(*q.get_ref()) {
            Ok(n) if (1..=MAX_QUIET_MINUTES).contains(&n) => reg.unapproved_quiet_minutes = n,
            _ => p.add(
                Some(q.span()),
                "policy.unapproved_quiet_minutes",
                format!("must be a whole number of minutes from 1 to {MAX_QUIET_MINUTES}"),
            ),
        }
    }
    for (i, m) in raw.models.iter().enumerate() {
        if let Some(entry) = model(p, i, m) {
            let key = (entry.name.clone(), entry.version.clone());
            if reg.index.contains_key(&key) {
                p.add(
                    Some(m.get_ref().version.span()),
                    format!("models[{i}].version"),
                    format!("`{}/{}` is listed twice", key.0, key.1),
                );
            } else {
                reg.index.insert(key, reg.entries.len());
                reg.entries.push(entry);
            }
        }
    }
    for (i, r) in raw.rollout.iter().enumerate() {
        if let Some(rollout) = rollout(p, reg, i, r) {
            if reg.rollouts.contains_key(&rollout.model) {
                p.add(
                    Some(r.get_ref().model.span()),
                    format!("rollout[{i}].model"),
                    format!("`{}` has a rollout already", rollout.model),
                );
            } else {
                reg.rollouts.insert(rollout.model.clone(), rollout);
            }
        }
    }
}

fn name(p: &mut Problems<'_>, s: &Spanned<String>, field: String) -> Option<String> {
    match check_name(s.get_ref(), MAX_NAME) {
        Ok(()) => Some(s.get_ref().clone()),
        Err(e) => {
            p.add(Some(s.span()), field, e.to_string());
            None
        }
    }
}

fn text(p: &mut Problems<'_>, s: &Spanned<String>, field: String) -> Option<String> {
    let t = s.get_ref();
    if t.trim().is_empty() {
        p.add(Some(s.span()), field, "must not be empty");
        None
    } else if t.len() > MAX_TEXT || t.chars().any(char::is_control) {
        p.add(
            Some(s.span()),
            field,
            format!("at most {MAX_TEXT} bytes, no control characters"),
        );
        None
    } else {
        Some(t.clone())
    }
}

fn time(p: &mut Problems<'_>, s: &Spanned<String>, field: String) -> Option<u64> {
    parse_rfc3339(s.get_ref())
        .map_err(|e| p.add(Some(s.span()), field, e.to_string()))
        .ok()
}

fn names(p: &mut Problems<'_>, list: &[Spanned<String>], field: &str) -> Option<BTreeSet<String>> {
    let mut ok = true;
    let mut out = BTreeSet::new();
    for (k, s) in list.iter().enumerate() {
        match name(p, s, format!("{field}[{k}]")) {
            Some(n) => {
                if !out.insert(n) {
                    p.add(Some(s.span()), format!("{field}[{k}]"), "listed twice");
                    ok = false;
                }
            }
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn sites(p: &mut Problems<'_>, list: &[Spanned<String>], field: &str) -> Option<BTreeSet<SiteId>> {
    let mut ok = true;
    let mut out = BTreeSet::new();
    for (k, s) in list.iter().enumerate() {
        match SiteId::new(s.get_ref().clone()) {
            Ok(site) => {
                if !out.insert(site) {
                    p.add(Some(s.span()), format!("{field}[{k}]"), "listed twice");
                    ok = false;
                }
            }
            Err(e) => {
                p.add(Some(s.span()), format!("{field}[{k}]"), e.to_string());
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

fn model(p: &mut Problems<'_>, i: usize, m: &Spanned<RawModel>) -> Option<ModelEntry> {
    let at = |f: &str| format!("models[{i}].{f}");
    let r = m.get_ref();
    let name_ = name(p, &r.name, at("name"));
    let version = name(p, &r.version, at("version"));
    let kind = match r.kind.get_ref().as_str() {
        "device" => Some(ModelKind::Device),
        "score" => Some(ModelKind::Score),
        "rules" => Some(ModelKind::Rules),
        _ => {
            p.add(
                Some(r.kind.span()),
                at("kind"),
                "must be \"device\", \"score\" or \"rules\"",
            );
            None
        }
    };
    let digest = r.artifact_sha256.get_ref();
    let artifact_sha256 = if digest.len() == 64
        && digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Some(digest.clone())
    } else {
        p.add(
            Some(r.artifact_sha256.span()),
            at("artifact_sha256"),
            "must be 64 lowercase hex digits (a SHA-256)",
        );
        None
    };
    let lineage = text(p, &r.lineage, at("lineage"));
    let feature_pipeline = text(p, &r.feature_pipeline, at("feature_pipeline"));
    let intended_use = text(p, &r.intended_use, at("intended_use"));
    let approval = approval(p, i, m);
    let approved_for = approved_for(p, i, r.approved_for.as_ref());
    Some(ModelEntry {
        name: name_?,
        version: version?,
        kind: kind?,
        artifact_sha256: artifact_sha256?,
        lineage: lineage?,
        feature_pipeline: feature_pipeline?,
        intended_use: intended_use?,
        approval: approval?,
        approved_for: approved_for?,
    })
}

fn approval(p: &mut Problems<'_>, i: usize, m: &Spanned<RawModel>) -> Option<Approval> {
    let at = |f: &str| format!("models[{i}].{f}");
    let r = m.get_ref();
    let by = r
        .approved_by
        .as_ref()
        .map(|s| text(p, s, at("approved_by")));
    let when = r
        .approved_at
        .as_ref()
        .map(|s| time(p, s, at("approved_at")));
    let approved = match (by, when) {
        (Some(Some(by)), Some(Some(when))) => Some(Some((by, when))),
        (None, None) => Some(None),
        (Some(None), _) | (_, Some(None)) => None,
        (Some(_), None) => {
            let span = r.approved_by.as_ref().map(Spanned::span);
            p.add(span, at("approved_at"), "missing (approved_by is set)");
            None
        }
        (None, Some(_)) => {
            let span = r.approved_at.as_ref().map(Spanned::span);
            p.add(span, at("approved_by"), "missing (approved_at is set)");
            None
        }
    };
    let withdrawn_at = r
        .withdrawn_at
        .as_ref()
        .map(|s| (s.span(), time(p, s, at("withdrawn_at"))));
    let reason = r
        .withdrawn_reason
        .as_ref()
        .map(|s| (s.span(), text(p, s, at("withdrawn_reason"))));
    let status = r.status.get_ref().as_str();
    match status {
        "draft" | "approved" => {
            for (field, span) in [
                ("withdrawn_at", withdrawn_at.as_ref().map(|w| w.0.clone())),
                ("withdrawn_reason", reason.as_ref().map(|w| w.0.clone())),
            ] {
                if span.is_some() {
                    p.add(span, at(field), "only for status \"withdrawn\"");
                }
            }
        }
        _ => {}
    }
    match status {
        "draft" => {
            if let Some(Some(_)) = approved {
                p.add(
                    r.approved_by.as_ref().map(Spanned::span),
                    at("approved_by"),
                    "a draft is not approved: drop approved_by and approved_at, or set status = \"approved\"",
                );
                return None;
            }
            (withdrawn_at.is_none() && reason.is_none() && approved.is_some())
                .then_some(Approval::Draft)
        }
        "approved" => match approved? {
            Some((by, at_)) => (withdrawn_at.is_none() && reason.is_none())
                .then_some(Approval::Approved { by, at: at_ }),
            None => {
                p.add(
                    Some(r.status.span()),
                    at("approved_by"),
                    "an approved model needs approved_by and approved_at",
                );
                None
            }
        },
        "withdrawn" => {
            let when = match withdrawn_at {
                Some((_, w)) => w,
                None => {
                    p.add(
                        Some(r.status.span()),
                        at("withdrawn_at"),
                        "missing (required when withdrawn)",
                    );
                    None
                }
            };
            let reason = match reason {
                Some((_, w)) => w,
                None => {
                    p.add(
                        Some(r.status.span()),
                        at("withdrawn_reason"),
                        "missing (required when withdrawn)",
                    );
                    None
                }
            };
            Some(Approval::Withdrawn {
                at: when?,
                reason: reason?,
                approved: approved?,
            })
        }
        _ => {
            p.add(
                Some(r.status.span()),
                at("status"),
                "must be \"draft\", \"approved\" or \"withdrawn\"",
            );
            None
        }
    }
}

fn approved_for(
    p: &mut Problems<'_>,
    i: usize,
    raw: Option<&Spanned<RawApprovedFor>>,
) -> Option<ApprovedFor> {
    let Some(raw) = raw else {
        return Some(ApprovedFor::default());
    };
    let at = |f: &str| format!("models[{i}].approved_for.{f}");
    let r = raw.get_ref();
    let site_set = sites(p, &r.sites, &at("sites"));
    let cohorts = names(p, &r.cohorts, &at("cohorts"));
    let hardware_models = names(p, &r.hardware_models, &at("hardware_models"));
    let firmware = match &r.firmware {
        None => Some(None),
        Some(f) => match semver::VersionReq::parse(f.get_ref()) {
            Ok(req) => Some(Some(req)),
            Err(e) => {
                p.add(
                    Some(f.span()),
                    at("firmware"),
                    format!("not a semver requirement (e.g. \">=5.0, <6\"): {e}"),
                );
                None
            }
        },
    };
    Some(ApprovedFor {
        sites: site_set?,
        cohorts: cohorts?,
        firmware: firmware?,
        hardware_models: hardware_models?,
    })
}

fn rollout(
    p: &mut Problems<'_>,
    reg: &ModelRegistry,
    i: usize,
    r: &Spanned<RawRollout>,
) -> Option<Rollout> {
    let at = |f: &str| format!("rollout[{i}].{f}");
    let raw = r.get_ref();
    let model = raw.model.get_ref().clone();
    let versions: BTreeMap<&str, &ModelEntry> = reg
        .entries
        .iter()
        .filter(|e| e.name == model)
        .map(|e| (e.version.as_str(), e))
        .collect();
    if versions.is_empty() {
        p.add(
            Some(raw.model.span()),
            at("model"),
            format!("no model `{model}` in [[models]]"),
        );
        return None;
    }
    let mut ok = true;
    if let Some(e) = versions.values().find(|e| e.kind == ModelKind::Device) {
        p.add(
            Some(raw.model.span()),
            at("model"),
            format!(
                "`{model}` is a {} model: rollouts are for score and rules models only",
                e.kind
            ),
        );
        ok = false;
    }
    let exists = |p: &mut Problems<'_>, v: &Spanned<String>, field: String| -> bool {
        if versions.contains_key(v.get_ref().as_str()) {
            true
        } else {
            p.add(
                Some(v.span()),
                field,
                format!("no version `{}` of `{model}` in [[models]]", v.get_ref()),
            );
            false
        }
    };
    let live = raw.live.get_ref().clone();
    if exists(p, &raw.live, at("live")) {
        if !versions[live.as_str()].approval.is_approved() {
            p.add(
                Some(raw.live.span()),
                at("live"),
                format!(
                    "`{model}/{live}` is {}: the live version must be approved",
                    versions[live.as_str()].approval.as_str()
                ),
            );
            ok = false;
        }
    } else {
        ok = false;
    }
    let mut shadow = Vec::new();
    for (k, v) in raw.shadow.iter().enumerate() {
        let field = at(&format!("shadow[{k}]"));
        if !exists(p, v, field.clone()) {
            ok = false;
        } else if *v.get_ref() == live {
            p.add(Some(v.span()), field, "is the live version");
            ok = false;
        } else if shadow.contains(v.get_ref()) {
            p.add(Some(v.span()), field, "listed twice");
            ok = false;
        } else {
            shadow.push(v.get_ref().clone());
        }
    }
    let mut canary: Vec<Canary> = Vec::new();
    for (k, c) in raw.canary.iter().enumerate() {
        let cr = c.get_ref();
        let field = |f: &str| at(&format!("canary[{k}].{f}"));
        let v = &cr.version;
        let version_ok = if !exists(p, v, field("version")) {
            false
        } else if *v.get_ref() == live {
            p.add(Some(v.span()), field("version"), "is the live version");
            false
        } else if shadow.contains(v.get_ref()) {
            p.add(
                Some(v.span()),
                field("version"),
                "is a shadow version too: a version is either shadow or canary",
            );
            false
        } else if canary.iter().any(|c| c.version == *v.get_ref()) {
            p.add(Some(v.span()), field("version"), "has a canary already");
            false
        } else if !versions[v.get_ref().as_str()].approval.is_approved() {
            // A canary delivers clinical alerts where it runs: like the live version,
            // it must be approved (a draft or withdrawn version may run as shadow only,
            // which delivers nothing).
            p.add(
                Some(v.span()),
                field("version"),
                format!(
                    "`{model}/{}` is {}: a canary version must be approved",
                    v.get_ref(),
                    versions[v.get_ref().as_str()].approval.as_str()
                ),
            );
            false
        } else {
            true
        };
        if cr.sites.is_empty() && cr.cohorts.is_empty() {
            p.add(
                Some(c.span()),
                field("sites"),
                "a canary names at least one site or cohort",
            );
            ok = false;
        }
        let sites = sites(p, &cr.sites, &field("sites"));
        let cohorts = names(p, &cr.cohorts, &field("cohorts"));
        match (version_ok, sites, cohorts) {
            (true, Some(sites), Some(cohorts)) => canary.push(Canary {
                version: v.get_ref().clone(),
                sites,
                cohorts,
            }),
            _ => ok = false,
        }
    }
    ok.then_some(Rollout {
        model,
        live,
        shadow,
        canary,
    })
}
