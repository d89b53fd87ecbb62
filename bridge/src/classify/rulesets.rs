//! Rule-set versions in the pipeline (issue 21, part 4): with `[alerts] candidates`,
//! every loaded version of the rule set (the base `[alerts] rules` and the
//! candidates) runs for each vitals sample in the role the models file's `[[rollout]]`
//! gives it for the device (`ModelRegistry::role` with the sample's site and the base
//! rule set's cohorts of the device). The delivering version (live or canary) is
//! evaluated on the device's delivered engine state and its changes go the way every
//! alert goes; each shadow version is evaluated on its own engine state and its
//! changes become `shadow_alerts` rows, never alerts (no book, handler, outbox, sink or
//! MQTT). The hand-over when the delivering version changes is
//! [`alerts::versions::hand_over`].
//!
//! Without candidates (or without a models file naming the base) nothing of this runs.

use std::sync::Arc;

use vitalmq_policies::{ModelRegistry, ModelRole, RuleSet, SiteId};

use crate::alerts::versions::{self, Running};
use crate::alerts::{self, AlertChange, DeliveredBy, DeviceAlertState, Sample};
use crate::store::{NewShadowAlert, shadow_change_id};

/// The candidate rule sets loaded at start and the rule set's registry name.
#[derive(Debug, Clone, Default)]
pub struct Candidates {
    pub model: String,
    pub sets: Vec<Arc<RuleSet>>,
}

/// One vitals sample through the rule set: every version that runs for the device
/// when candidates run ([`Versions::evaluate`]); otherwise the base alone, after a
/// state from a run with candidates is handed back to it ([`versions::single`]).
/// Returns the delivered changes; shadow changes go to `shadow_alerts`.
pub(super) fn evaluate(
    versions: Option<&Versions<'_>>,
    base: &RuleSet,
    candidates: &Candidates,
    state: &mut DeviceAlertState,
    sample: &Sample,
    now_ms: u64,
    shadow_alerts: &mut Vec<NewShadowAlert>,
) -> Vec<AlertChange> {
    if let Some(v) = versions {
        return v.evaluate(
            state,
            sample,
            &base.cohorts_of(&sample.device),
            now_ms,
            shadow_alerts,
        );
    }
    let mut out = Vec::new();
    if candidates.sets.is_empty() {
        let handed = versions::single(state, (base.version(), base.sha256()), sample);
        shadow_alerts.extend(handed_shadow_rows(&handed, sample, now_ms));
        out = handed.delivered;
    }
    out.extend(alerts::evaluate(base, base.sha256(), state, sample));
    out
}

/// The loaded versions of the rule set, and the registry that gives them roles.
#[derive(Debug)]
pub(super) struct Versions<'a> {
    /// The rule set's name in the model registry.
    model: &'a str,
    /// Base first, then the candidates.
    sets: Vec<&'a RuleSet>,
    models: &'a ModelRegistry,
}

impl<'a> Versions<'a> {
    /// `None` (one rule set, as before candidates) without candidates or models file.
    /// `model` is the rule set's registry name, fixed at start by the check (every
    /// reload of either file is checked against it: `reload::RuleSetGuard`), so a
    /// batch between a rules and a models reload never loses the versions.
    pub(super) fn of(
        base: &'a RuleSet,
        candidates: &'a Candidates,
        models: Option<&'a ModelRegistry>,
    ) -> Option<Self> {
        if candidates.sets.is_empty() {
            return None;
        }
        let models = models?;
        let sets = std::iter::once(base)
            .chain(candidates.sets.iter().map(AsRef::as_ref))
            .collect();
        Some(Self {
            model: &candidates.model,
            sets,
            models,
        })
    }

    /// Who runs for a device at `site` in `cohorts`: the first loaded version whose
    /// role delivers (the base as live if none does, which the checks rule out), and
    /// the shadows.
    pub(super) fn running(&self, sample: &Sample, cohorts: &[&str]) -> Running<'a> {
        let roles: Vec<(&'a str, Option<ModelRole>)> = self
            .sets
            .iter()
            .map(|s| {
                (
                    s.version(),
                    self.models
                        .role(self.model, s.version(), &sample.site, cohorts),
                )
            })
            .collect();
        let (deliver, role) = roles
            .iter()
            .find_map(|(v, r)| r.filter(|r| r.delivers()).map(|r| (*v, r)))
            .unwrap_or((self.sets[0].version(), ModelRole::Live));
        let deliver_sha256 = self.set(deliver).sha256();
        let shadows = roles
            .iter()
            .filter(|(v, r)| *r == Some(ModelRole::Shadow) && *v != deliver)
            .map(|(v, _)| *v)
            .collect();
        Running {
            deliver,
            deliver_sha256,
            role,
            shadows,
        }
    }

    fn loaded(&self, version: &str) -> Option<&'a RuleSet> {
        self.sets.iter().find(|s| s.version() == version).copied()
    }

    fn set(&self, version: &str) -> &'a RuleSet {
        self.sets
            .iter()
            .find(|s| s.version() == version)
            .copied()
            .unwrap_or(self.sets[0])
    }

    /// One vitals sample through every version that runs for its device: returns the
    /// delivered changes (the hand-over's resolutions first); the shadows' changes go
    /// to `shadow_alerts`.
    pub(super) fn evaluate(
        &self,
        state: &mut DeviceAlertState,
        sample: &Sample,
        cohorts: &[&str],
        now_ms: u64,
        shadow_alerts: &mut Vec<NewShadowAlert>,
    ) -> Vec<AlertChange> {
        let running = self.running(sample, cohorts);
        let base = self.sets[0];
        // Who delivered until now: its hand-over resolutions are its last changes.
        let before = state.engine_version.as_ref().map_or(
            DeliveredBy {
                version: base.version().to_owned(),
                role: ModelRole::Live,
            },
            |v| DeliveredBy {
                version: v.version.clone(),
                role: v.role,
            },
        );
        let handed = versions::hand_over(
            state,
            (base.version(), base.sha256()),
            self.model,
            &running,
            |v| self.loaded(v).map(RuleSet::sha256),
            |old| {
                let cohorts: Vec<&str> = old.cohorts.iter().map(String::as_str).collect();
                SiteId::new(&old.site).is_ok_and(|site| {
                    self.models.role(self.model, &old.version, &site, &cohorts)
                        == Some(ModelRole::Canary)
                })
            },
            sample,
        );
        if let Some(v) = &mut state.engine_version {
            v.cohorts = cohorts.iter().map(|c| (*c).to_owned()).collect();
        }
        shadow_alerts.extend(handed_shadow_rows(&handed, sample, now_ms));
        let mut out = handed.delivered;
        for c in &mut out {
            c.set_delivered_by(before.clone());
        }
        let deliver = self.set(running.deliver);
        let now = DeliveredBy {
            version: deliver.version().to_owned(),
            role: running.role,
        };
        out.extend(
            // Implausible readings are flagged by the base's limits: its
            // `resolve_after` goes with them, whichever version delivers.
            alerts::evaluate_engine(
                deliver,
                deliver.sha256(),
                base.plausibility().resolve_after,
                &mut state.engine,
                sample,
            )
            .into_iter()
            .map(|mut c| {
                c.set_delivered_by(now.clone());
                c
            }),
        );
        for v in &running.shadows {
            let set = self.set(v);
            let engine = versions::shadow_mut(state, self.model, v, set.sha256());
            let changes = alerts::evaluate_engine(
                set,
                set.sha256(),
                base.plausibility().resolve_after,
                engine,
                sample,
            );
            shadow_alerts.extend(
                changes.iter().map(|c| {
                    shadow_row(c, self.model, set.version(), set.sha256(), sample, now_ms)
                }),
            );
        }
        out
    }
}

/// The `shadow_alerts` row of one change of a shadow version: the message exactly as
/// it would have been published. Operational changes (signal quality, sensor fault)
/// have no severity: `operational`. `model`, `version`, `config_sha256`: the rule set's
/// registry name, the version and its file digest.
/// The shadow rows of a hand-over's closed would-be episodes.
fn handed_shadow_rows<'h>(
    handed: &'h versions::HandOver,
    sample: &'h Sample,
    now_ms: u64,
) -> impl Iterator<Item = NewShadowAlert> + 'h {
    handed.shadow.iter().map(move |c| {
        shadow_row(
            &c.change,
            &c.model,
            &c.version,
            &c.policy_sha256,
            sample,
            now_ms,
        )
    })
}

fn shadow_row(
    change: &AlertChange,
    model: &str,
    version: &str,
    config_sha256: &str,
    sample: &Sample,
    now_ms: u64,
) -> NewShadowAlert {
    let (rule, severity, at_ms) = match change {
        AlertChange::Clinical(a) => (
            a.rule.clone(),
            a.severity.as_str().to_owned(),
            a.raised_at_ms,
        ),
        AlertChange::Operational(a) => (
            format!("ops/{}", a.alert_type.as_str()),
            "operational".to_owned(),
            a.raised_at_ms,
        ),
    };
    let state = change.state().as_str();
    NewShadowAlert {
        change_id: shadow_change_id(version, change.alert_id(), state, &sample.event_id),
        alert_id: change.alert_id().to_owned(),
        patient_ref: sample.patient_ref.clone(),
        site: sample.site.to_string(),
        device: sample.device.to_string(),
        model: model.to_owned(),
        version: version.to_owned(),
        config_sha256: config_sha256.to_owned(),
        role: ModelRole::Shadow.as_str().to_owned(),
        rule,
        state: state.to_owned(),
        severity,
        at_ms,
        created_at_ms: now_ms,
        payload: change.to_json(),
    }
}
