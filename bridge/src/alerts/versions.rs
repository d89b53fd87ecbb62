//! Rule-set versions per device (issue 21, part 4): which version's engine state
//! delivers for the device, the shadow versions' own states, and the hand-over when a
//! reload of the models file changed who delivers. Pure, like the engine.
//!
//! Decisions:
//! - one [`EngineState`] per version that runs for the device: the delivering one in
//!   [`DeviceAlertState::engine`], shadows in [`DeviceAlertState::shadows`]; a version
//!   that runs for the device no more (or is not loaded) is dropped, so the state stays
//!   bounded by the configured versions;
//! - the hand-over happens at the device's first sample after the change, before that
//!   sample is evaluated: the previous deliverer's open clinical episodes are resolved
//!   (delivered changes) with reason `model_rollback` when it delivered as a canary
//!   and the rollout no longer makes it one for the scope (site, cohorts) it delivered
//!   for, else `rollout_changed` (also for a device that only left a canary's scope), so no subscriber keeps an alert nobody will resolve; its
//!   state goes on as its shadow state (episodes dropped) if it still has a role;
//! - the new deliverer starts from its shadow state with episodes, pending and resolve
//!   runs dropped (learned baselines and change windows kept): nothing it only computed
//!   in shadow is ever delivered as "already open", and a condition that persists opens
//!   a delivered alert once the new version's own persistence holds again; each
//!   would-be episode a shadow drops this way (or because its version lost every role)
//!   is closed by a shadow change `resolved`, reason `rollout_changed`, so a
//!   comparison sees where it ended (clinical and operational would-be episodes alike;
//!   each shadow state keeps its rule set's name and digest, so this works with its
//!   file no longer loaded, or after a restart without candidates);
//! - the device's operational episodes (signal quality, sensor fault) are about the
//!   device, not the version: the new deliverer takes them over as they are (same alert
//!   ids, no duplicate or orphan), and the old one's copy goes on without them.

use vitalmq_policies::ModelRole;

use super::Sample;
use super::engine::{ops_resolved, resolved};
use super::message::{AlertChange, OpsAlertType, ResolveReason};
use super::state::{
    DeviceAlertState, EngineState, EngineVersion, QualityState, SensorState, ShadowEngine,
};

/// The rule-set versions that run for one device now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running<'a> {
    /// The version that delivers (role live or canary), and its digest.
    pub deliver: &'a str,
    pub deliver_sha256: &'a str,
    pub role: ModelRole,
    /// The versions that run in shadow (never the delivering one).
    pub shadows: Vec<&'a str>,
}

/// A would-be change of a shadow version, with the names its shadow row carries.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowChange {
    /// The rule set's registry name.
    pub model: String,
    pub version: String,
    /// The version's file digest.
    pub policy_sha256: String,
    pub change: AlertChange,
}

/// What a hand-over emits.
#[derive(Debug, Default)]
pub struct HandOver {
    /// Resolutions of the old deliverer's open clinical alerts: delivered.
    pub delivered: Vec<AlertChange>,
    /// Resolutions (`rollout_changed`) of the would-be episodes, clinical and
    /// operational, a shadow version drops (it starts delivering, or loses every role),
    /// stored as shadow alerts so a comparison sees where each would-be episode ended.
    pub shadow: Vec<ShadowChange>,
}

/// Closes every would-be episode of a shadow engine (clinical rules, signal quality,
/// sensor fault) as `resolved` shadow changes. The names come from the state itself;
/// for a state stored before it kept them, `model` and `shadow_sha256(version)` (none
/// known: the episodes are dropped unrecorded).
fn close_shadow<'s>(
    version: &str,
    shadow: &mut ShadowEngine,
    model: &str,
    shadow_sha256: &impl Fn(&str) -> Option<&'s str>,
    sample: &Sample,
    out: &mut Vec<ShadowChange>,
) {
    let sha = if shadow.policy_sha256.is_empty() {
        shadow_sha256(version).unwrap_or_default().to_owned()
    } else {
        shadow.policy_sha256.clone()
    };
    let model = if shadow.model.is_empty() {
        model.to_owned()
    } else {
        shadow.model.clone()
    };
    let mut changes = Vec::new();
    let engine = &mut shadow.engine;
    for (rule, rs) in &mut engine.rules {
        if let Some(e) = rs.episode.take() {
            changes.push(resolved(
                e,
                rule,
                ResolveReason::RolloutChanged,
                &sha,
                sample,
            ));
        }
    }
    if let Some(e) = engine.quality.open.take() {
        changes.push(ops_resolved(
            OpsAlertType::SignalQuality,
            e,
            engine,
            &sha,
            sample,
        ));
    }
    if let Some(e) = engine.sensor.open.take() {
        changes.push(ops_resolved(
            OpsAlertType::SensorFault,
            e,
            engine,
            &sha,
            sample,
        ));
        engine.sensor = SensorState::default();
    }
    if sha.is_empty() || model.is_empty() {
        return;
    }
    out.extend(changes.into_iter().map(|change| ShadowChange {
        model: model.clone(),
        version: version.to_owned(),
        policy_sha256: sha.clone(),
        change,
    }));
}

/// Makes `running.deliver` the device's delivering version, handing over from the
/// previous one if it differs, and drops the shadow states of versions that no longer
/// run. `base` (version, digest) is the rule set a state stored before candidates (no
/// `engine_version`) belongs to, as live; `model` the rule set's registry name. The
/// old deliverer's resolutions name the digest it delivered under; a shadow version's,
/// the digest kept with its state (`shadow_sha256(version)` for a state stored before).
///
/// `canary_kept(old)`: whether the rollout still makes the old deliverer (a canary) a
/// canary for the scope it delivered for; then the device only left that scope (moved
/// site, or a cohort edit dropped it) and its alerts resolve as `rollout_changed`, not
/// `model_rollback`.
pub fn hand_over<'s>(
    state: &mut DeviceAlertState,
    base: (&str, &str),
    model: &str,
    running: &Running<'_>,
    shadow_sha256: impl Fn(&str) -> Option<&'s str>,
    canary_kept: impl Fn(&EngineVersion) -> bool,
    sample: &Sample,
) -> HandOver {
    let old = state.engine_version.clone().unwrap_or(EngineVersion {
        version: base.0.to_owned(),
        role: ModelRole::Live,
        policy_sha256: base.1.to_owned(),
        site: String::new(),
        cohorts: Vec::new(),
    });
    let mut out = HandOver::default();
    if old.version != running.deliver {
        let reason = if old.role == ModelRole::Canary && !canary_kept(&old) {
            ResolveReason::ModelRollback
        } else {
            ResolveReason::RolloutChanged
        };
        let sha = if old.policy_sha256.is_empty() {
            base.1
        } else {
            old.policy_sha256.as_str()
        };
        let mut previous = std::mem::take(&mut state.engine);
        for (rule, rs) in &mut previous.rules {
            if let Some(e) = rs.episode.take() {
                out.delivered.push(resolved(e, rule, reason, sha, sample));
            }
            rs.resolving = None;
        }
        let mut next = state.shadows.remove(running.deliver).unwrap_or_default();
        close_shadow(
            running.deliver,
            &mut next,
            model,
            &shadow_sha256,
            sample,
            &mut out.shadow,
        );
        let mut next = next.engine;
        for rs in next.rules.values_mut() {
            rs.episode = None;
            rs.pending = Default::default();
            rs.resolving = None;
        }
        next.quality = std::mem::take(&mut previous.quality);
        next.sensor = std::mem::take(&mut previous.sensor);
        previous.quality = QualityState {
            bits: next.quality.bits,
            open: None,
        };
        previous.sensor = SensorState::default();
        state.engine = next;
        if running.shadows.contains(&old.version.as_str()) {
            state.shadows.insert(
                old.version,
                ShadowEngine {
                    engine: previous,
                    model: model.to_owned(),
                    policy_sha256: sha.to_owned(),
                },
            );
        }
    }
    // The scope is the caller's to fill in (`EngineVersion::site`, `cohorts`).
    state.engine_version = Some(EngineVersion {
        version: running.deliver.to_owned(),
        role: running.role,
        policy_sha256: running.deliver_sha256.to_owned(),
        site: sample.site.to_string(),
        cohorts: Vec::new(),
    });
    state.shadows.retain(|v, engine| {
        let runs = running.shadows.contains(&v.as_str());
        if !runs {
            close_shadow(v, engine, model, &shadow_sha256, sample, &mut out.shadow);
        }
        runs
    });
    out
}

/// Back to one rule set (no candidates any more, e.g. after a restart without them):
/// hands over to the base if another version delivered, closes the shadows' would-be
/// episodes (with the names kept in their states: their files need not be loaded),
/// then forgets versions, so the state is exactly one without candidates.
pub fn single(state: &mut DeviceAlertState, base: (&str, &str), sample: &Sample) -> HandOver {
    if state.engine_version.is_none() && state.shadows.is_empty() {
        return HandOver::default();
    }
    let running = Running {
        deliver: base.0,
        deliver_sha256: base.1,
        role: ModelRole::Live,
        shadows: Vec::new(),
    };
    let out = hand_over(state, base, "", &running, |_| None, |_| false, sample);
    state.engine_version = None;
    out
}

/// The engine state of shadow `version` of rule set `model` (digest `policy_sha256`),
/// a fresh one the first time it runs; the names are kept with it.
pub fn shadow_mut<'s>(
    state: &'s mut DeviceAlertState,
    model: &str,
    version: &str,
    policy_sha256: &str,
) -> &'s mut EngineState {
    let shadow = state.shadows.entry(version.to_owned()).or_default();
    if shadow.model != model {
        model.clone_into(&mut shadow.model);
    }
    if shadow.policy_sha256 != policy_sha256 {
        policy_sha256.clone_into(&mut shadow.policy_sha256);
    }
    &mut shadow.engine
}

#[cfg(test)]
mod tests;
