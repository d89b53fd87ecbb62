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
//!   (delivered changes) with reason `model_rollback` when it delivered as a canary,
//!   else `rollout_changed`, so no subscriber keeps an alert nobody will resolve; its
//!   state goes on as its shadow state (episodes dropped) if it still has a role;
//! - the new deliverer starts from its shadow state with episodes, pending and resolve
//!   runs dropped (learned baselines and change windows kept): nothing it only computed
//!   in shadow is ever delivered as "already open", and a condition that persists opens
//!   a delivered alert once the new version's own persistence holds again; each
//!   would-be episode a shadow drops this way (or because its version lost every role)
//!   is closed by a shadow change `resolved`, reason `rollout_changed`, so a
//!   comparison sees where it ended;
//! - the device's operational episodes (signal quality, sensor fault) are about the
//!   device, not the version: the new deliverer takes them over as they are (same alert
//!   ids, no duplicate or orphan), and the old one's copy goes on without them.

use vitalmq_policies::ModelRole;

use super::Sample;
use super::engine::resolved;
use super::message::{AlertChange, ResolveReason};
use super::state::{DeviceAlertState, EngineState, EngineVersion, QualityState, SensorState};

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

/// What a hand-over emits.
#[derive(Debug, Default)]
pub struct HandOver {
    /// Resolutions of the old deliverer's open clinical alerts: delivered.
    pub delivered: Vec<AlertChange>,
    /// `(version, change)`: resolutions (`rollout_changed`) of the would-be episodes a
    /// shadow version drops (it starts delivering, or loses every role), stored as
    /// shadow alerts so a comparison sees where each would-be episode ended.
    pub shadow: Vec<(String, AlertChange)>,
}

/// Makes `running.deliver` the device's delivering version, handing over from the
/// previous one if it differs, and drops the shadow states of versions that no longer
/// run. `base` (version, digest) is the rule set a state stored before candidates (no
/// `engine_version`) belongs to, as live. The old deliverer's resolutions name the
/// digest it delivered under; a shadow version's, `shadow_sha256(version)` (none
/// there: not emitted).
pub fn hand_over<'s>(
    state: &mut DeviceAlertState,
    base: (&str, &str),
    running: &Running<'_>,
    shadow_sha256: impl Fn(&str) -> Option<&'s str>,
    sample: &Sample,
) -> HandOver {
    let old = state.engine_version.clone().unwrap_or(EngineVersion {
        version: base.0.to_owned(),
        role: ModelRole::Live,
        policy_sha256: base.1.to_owned(),
    });
    let mut out = HandOver::default();
    let mut close_shadow = |version: &str, engine: &mut EngineState| {
        let sha = shadow_sha256(version);
        for (rule, rs) in &mut engine.rules {
            if let (Some(e), Some(sha)) = (rs.episode.take(), sha) {
                let change = resolved(e, rule, ResolveReason::RolloutChanged, sha, sample);
                out.shadow.push((version.to_owned(), change));
            }
        }
    };
    if old.version != running.deliver {
        let reason = if old.role == ModelRole::Canary {
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
        close_shadow(running.deliver, &mut next);
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
            state.shadows.insert(old.version, previous);
        }
    }
    state.engine_version = Some(EngineVersion {
        version: running.deliver.to_owned(),
        role: running.role,
        policy_sha256: running.deliver_sha256.to_owned(),
    });
    state.shadows.retain(|v, engine| {
        let runs = running.shadows.contains(&v.as_str());
        if !runs {
            close_shadow(v, engine);
        }
        runs
    });
    out
}

/// Back to one rule set (no candidates any more, e.g. after a restart without them):
/// hands over to the base if another version delivered, then forgets versions, so the
/// state is exactly one without candidates.
pub fn single(
    state: &mut DeviceAlertState,
    base: (&str, &str),
    sample: &Sample,
) -> Vec<AlertChange> {
    if state.engine_version.is_none() && state.shadows.is_empty() {
        return Vec::new();
    }
    let running = Running {
        deliver: base.0,
        deliver_sha256: base.1,
        role: ModelRole::Live,
        shadows: Vec::new(),
    };
    let out = hand_over(state, base, &running, |_| None, sample);
    state.engine_version = None;
    out.delivered
}

/// The engine state of shadow `version` (a fresh one the first time it runs).
pub fn shadow_mut<'s>(state: &'s mut DeviceAlertState, version: &str) -> &'s mut EngineState {
    state.shadows.entry(version.to_owned()).or_default()
}

#[cfg(test)]
mod tests;
