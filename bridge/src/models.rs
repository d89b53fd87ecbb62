//! Device-side models checked against the model registry (issue 21): the `model` a
//! device reports on vitals and alarms is resolved into a [`ModelStatus`], recorded in
//! the normalized event's provenance (`model_status`, `model_artifact_sha256`) and
//! counted per `(model, status)` (`vitalmq_bridge_model_messages_total`).
//!
//! Without `[models]` in the bridge configuration nothing is resolved or recorded: the
//! normalized events are byte for byte what they were before.

use vitalmq_envelope::Telemetry;
use vitalmq_policies::{DeviceEntry, DeviceFacts, ModelRegistry, ModelStatus, RuleSet};

/// What the registry made of one message's reported model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelCheck {
    pub status: ModelStatus,
    /// The registry entry's `artifact_sha256`, when the model is in the registry.
    pub artifact_sha256: Option<String>,
}

/// Resolves the model `telemetry` reports for the device `entry` (attributed site,
/// hardware model), its cohorts in `rules` and the firmware the message carries.
pub fn check(
    models: &ModelRegistry,
    rules: Option<&RuleSet>,
    entry: &DeviceEntry,
    telemetry: &Telemetry,
) -> ModelCheck {
    let cohorts = rules.map(|r| r.cohorts_of(&entry.id)).unwrap_or_default();
    let facts = DeviceFacts {
        site: Some(&entry.site),
        cohorts: &cohorts,
        fw: Some(telemetry.fw.as_str()).filter(|f| !f.is_empty()),
        hardware_model: entry.hardware_model.as_deref(),
    };
    let reported = telemetry.model.as_deref();
    let status = models.resolve(reported, &facts);
    let artifact_sha256 = reported
        .and_then(|r| models.reported_entry(r))
        .map(|e| e.artifact_sha256.clone());
    // Only registered models get their own label: a device reporting arbitrary text
    // must not grow the metric without bound.
    let label = match (status, reported) {
        (ModelStatus::Unknown, _) => "(unknown)".to_owned(),
        (_, Some(r)) => r.to_owned(),
        (_, None) => "(none)".to_owned(),
    };
    metrics::counter!(
        "vitalmq_bridge_model_messages_total",
        "model" => label,
        "status" => status.as_str()
    )
    .increment(1);
    ModelCheck {
        status,
        artifact_sha256,
    }
}

/// An alarm alert of a device whose reported model needs attention, marked with
/// `model_status` in its body (an extra field, SPEC section 5 allows them); approved
/// models' alerts, and any without a models file, are left as they are.
pub(crate) fn mark_alarm(
    mut alert: crate::alerts::book::Outgoing,
    check: Option<&ModelCheck>,
) -> crate::alerts::book::Outgoing {
    let Some(check) = check.filter(|c| c.status.needs_attention()) else {
        return alert;
    };
    if let Ok(serde_json::Value::Object(mut body)) = serde_json::from_str(&alert.body) {
        body.insert(
            "model_status".into(),
            serde_json::json!(check.status.as_str()),
        );
        alert.body = serde_json::Value::Object(body).to_string();
    }
    alert
}

/// Most models with an open `model_unapproved` episode at once; reports of further
/// models join the episode of `(other)`, so a device sending arbitrary text cannot
/// grow the bridge's memory or the alert stream without bound.
const MAX_OPEN: usize = 64;
const OTHER: &str = "(other)";

/// The fleet-wide operational alert `ops/bridge/model_unapproved`: one episode per
/// reported model (`name/version`) whose messages resolve to a status other than
/// `approved` (and `none`), with fleet counts.
///
/// - It opens at the first such message, and is sent again (`open`, same `alert_id`)
///   each time another device joins it, with the counts: `devices`, `messages` since it
///   opened, and `statuses` (devices per status: a model may be out of cohort for some
///   devices and approved for others).
/// - It resolves when a reload of the models file approves the model (its registry
///   entry's status becomes `approved`). A device still outside the approval (e.g.
///   out of cohort) opens a new episode with its next message, so nothing is lost.
#[derive(Debug, Default)]
pub struct ModelFleet {
    open: std::collections::BTreeMap<String, Episode>,
}

#[derive(Debug)]
struct Episode {
    alert_id: String,
    devices: std::collections::BTreeMap<vitalmq_envelope::DeviceId, ModelStatus>,
    messages: u64,
}

impl ModelFleet {
    /// One message of `device` reporting `reported`, resolved to `status`; the alert to
    /// send, if the episode opened or gained a device.
    pub fn observe(
        &mut self,
        device: &vitalmq_envelope::DeviceId,
        reported: &str,
        status: ModelStatus,
        now_ms: u64,
    ) -> Option<crate::ops::OpsAlert> {
        if !status.needs_attention() {
            return None;
        }
        let key = if self.open.contains_key(reported) || self.open.len() < MAX_OPEN - 1 {
            reported
        } else {
            OTHER
        };
        let episode = self.open.entry(key.to_owned()).or_insert_with(|| Episode {
            alert_id: format!("ops-bridge-model_unapproved-{}-{now_ms}", sanitize(key)),
            devices: std::collections::BTreeMap::new(),
            messages: 0,
        });
        episode.messages += 1;
        let joined = episode.devices.insert(device.clone(), status) != Some(status);
        joined.then(|| alert(key, episode, "open", now_ms))
    }

    /// Resolves the episodes of every model `models` now approves.
    pub fn on_reload(&mut self, models: &ModelRegistry, now_ms: u64) -> Vec<crate::ops::OpsAlert> {
        let approved: Vec<String> = self
            .open
            .keys()
            .filter(|m| {
                models
                    .reported_entry(m)
                    .is_some_and(|e| e.approval.is_approved())
            })
            .cloned()
            .collect();
        approved
            .into_iter()
            .filter_map(|m| {
                let episode = self.open.remove(&m)?;
                Some(alert(&m, &episode, "resolved", now_ms))
            })
            .collect()
    }
}

/// `[A-Za-z0-9._-]` of a model reference, the rest as `_`: for alert ids.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn alert(model: &str, e: &Episode, state: &'static str, now_ms: u64) -> crate::ops::OpsAlert {
    let mut statuses = serde_json::Map::new();
    for s in e.devices.values() {
        let n = statuses
            .get(s.as_str())
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        statuses.insert(s.as_str().to_owned(), serde_json::json!(n + 1));
    }
    let mut details = serde_json::Map::new();
    details.insert("model".into(), serde_json::json!(model));
    details.insert("devices".into(), serde_json::json!(e.devices.len()));
    details.insert("messages".into(), serde_json::json!(e.messages));
    details.insert("statuses".into(), serde_json::Value::Object(statuses));
    let reason = match state {
        "resolved" => format!("model {model} is approved now"),
        _ => format!(
            "{} devices report model {model}, which is not approved for them",
            e.devices.len()
        ),
    };
    crate::ops::OpsAlert {
        kind: crate::ops::OpsKind::ModelUnapproved,
        state,
        alert_id: e.alert_id.clone(),
        reason,
        details,
        at_ms: now_ms,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use vitalmq_envelope::DeviceId;

    use super::*;

    #[test]
    fn one_episode_per_model_with_fleet_counts_resolved_by_approval() {
        let mut fleet = ModelFleet::default();
        let d = |n: u32| DeviceId::new(format!("dev-{n:05}")).expect("id");
        let rc = "arrhythmia-net/2.2.0-rc1";
        let open = fleet
            .observe(&d(1), rc, ModelStatus::Unapproved, 10)
            .expect("opens");
        assert_eq!(
            (open.state, open.kind.as_str()),
            ("open", "model_unapproved")
        );
        assert!(
            fleet
                .observe(&d(1), rc, ModelStatus::Unapproved, 11)
                .is_none()
        );
        assert!(
            fleet
                .observe(&d(9), "x/1", ModelStatus::Approved, 11)
                .is_none()
        );
        let more = fleet
            .observe(&d(2), rc, ModelStatus::Unapproved, 12)
            .expect("joins");
        assert_eq!(more.alert_id, open.alert_id);
        assert_eq!(more.details["devices"], 2);
        assert_eq!(more.details["messages"], 3);
        assert_eq!(more.details["statuses"]["unapproved"], 2);
        let other = fleet
            .observe(&d(3), "nobody/1", ModelStatus::Unknown, 13)
            .expect("own episode");
        assert_ne!(other.alert_id, open.alert_id);

        let text = include_str!("../../policies/examples/models.toml");
        let models = ModelRegistry::parse(text, Path::new("m.toml")).expect("valid");
        assert!(fleet.on_reload(&models, 20).is_empty(), "still a draft");
        let approved = text.replacen(
            "status = \"draft\"",
            "status = \"approved\"\napproved_by = \"b\"\napproved_at = \"2026-01-01T00:00:00Z\"",
            1,
        );
        let models = ModelRegistry::parse(&approved, Path::new("m.toml")).expect("valid");
        let resolved = fleet.on_reload(&models, 30);
        assert_eq!(resolved.len(), 1);
        assert_eq!(
            (resolved[0].state, resolved[0].alert_id.as_str()),
            ("resolved", open.alert_id.as_str())
        );
        assert_eq!(resolved[0].details["messages"], 3);
        // the unknown model's episode stays; a new report of rc1 out of cohort reopens
        assert!(fleet.on_reload(&models, 31).is_empty());
        let again = fleet
            .observe(&d(1), rc, ModelStatus::OutOfCohort, 40)
            .expect("reopens");
        assert_ne!(again.alert_id, open.alert_id);
    }

    #[test]
    fn the_number_of_episodes_is_bounded() {
        let mut fleet = ModelFleet::default();
        let d = DeviceId::new("dev-00001").expect("id");
        for i in 0..200 {
            fleet.observe(&d, &format!("junk/{i}"), ModelStatus::Unknown, 1);
        }
        assert_eq!(fleet.open.len(), MAX_OPEN);
        assert!(fleet.open.contains_key(OTHER));
    }
}
