//! Device-side models checked against the model registry (issue 21): the `model` a
//! device reports on vitals and alarms is resolved into a [`ModelStatus`], recorded in
//! the normalized event's provenance (`model_status`, `model_artifact_sha256`) and
//! counted per `(model, status)` (`vitalmq_bridge_model_messages_total`).
//!
//! Without `[models]` in the bridge configuration nothing is resolved or recorded: the
//! normalized events are byte for byte what they were before.

use vitalmq_envelope::Telemetry;
use vitalmq_policies::{
    DeviceEntry, DeviceFacts, ModelKind, ModelRegistry, ModelStatus, RuleSet, UnapprovedAlarms,
};

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
    // A device's model only: a score or rule set named by a device is `unknown`.
    let artifact_sha256 = reported
        .and_then(|r| models.reported_entry(r))
        .filter(|e| e.kind == ModelKind::Device)
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

/// Whether the models policy withholds the alarms of a message checked as `check`:
/// `[policy] unapproved_alarms = "withhold"` and a model that needs attention.
pub(crate) fn withholds(models: Option<&ModelRegistry>, check: Option<&ModelCheck>) -> bool {
    models.is_some_and(|m| m.unapproved_alarms() == UnapprovedAlarms::Withhold)
        && check.is_some_and(|c| c.status.needs_attention())
}

/// The audit record of an alarm the models policy withheld (`state` `open` or
/// `resolved`, the clear of a withheld episode), counted in
/// `vitalmq_bridge_alarms_withheld_total{status}`. Device, alarm and model facts only:
/// never the patient reference.
pub(crate) fn withheld_record(
    device: &vitalmq_envelope::DeviceId,
    alarm: &crate::alerts::alarm::AlarmEvent,
    reported: Option<&str>,
    status: ModelStatus,
    event_id: &str,
    alert_id: &str,
    state: &str,
) -> vitalmq_audit::AuditRecord {
    metrics::counter!("vitalmq_bridge_alarms_withheld_total", "status" => status.as_str())
        .increment(1);
    tracing::info!(device = %device, code = %alarm.code, model_status = status.as_str(), state, "device alarm withheld by the models policy");
    vitalmq_audit::AuditRecord::new(
        vitalmq_audit::Component::Bridge,
        vitalmq_audit::Event::AlarmWithheld,
    )
    .action("withhold")
    .resource(device.as_str())
    .reason(status.as_str())
    .rule(format!("device-alarm:{}", alarm.code))
    .detail("code", alarm.code.as_str())
    .detail("level", alarm.level.as_str())
    .detail("active", alarm.active)
    .detail("state", state)
    .detail("model", reported.unwrap_or(""))
    .detail("model_status", status.as_str())
    .detail("event_id", event_id)
    .detail("alert_id", alert_id)
}

/// What the fleet alert keeps of one message whose model needs attention: the device,
/// the model it reported and the facts the status was resolved with, so a reload of the
/// models file re-resolves exactly that (see [`ModelFleet::on_reload`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub device: vitalmq_envelope::DeviceId,
    /// `name/version` as reported (empty if none).
    pub reported: String,
    pub status: ModelStatus,
    site: vitalmq_policies::SiteId,
    cohorts: Vec<String>,
    fw: Option<String>,
    hardware_model: Option<String>,
}

impl Seen {
    /// The message of `entry` carrying `telemetry`, checked as `status`.
    pub fn of(
        rules: Option<&RuleSet>,
        entry: &DeviceEntry,
        telemetry: &Telemetry,
        status: ModelStatus,
    ) -> Self {
        Self {
            device: entry.id.clone(),
            reported: telemetry.model.clone().unwrap_or_default(),
            status,
            site: entry.site.clone(),
            cohorts: rules
                .map(|r| r.cohorts_of(&entry.id))
                .unwrap_or_default()
                .into_iter()
                .map(str::to_owned)
                .collect(),
            fw: Some(telemetry.fw.clone()).filter(|f| !f.is_empty()),
            hardware_model: entry.hardware_model.clone(),
        }
    }

    /// The status `models` gives this message now.
    fn resolve(&self, models: &ModelRegistry) -> ModelStatus {
        let cohorts: Vec<&str> = self.cohorts.iter().map(String::as_str).collect();
        let facts = DeviceFacts {
            site: Some(&self.site),
            cohorts: &cohorts,
            fw: self.fw.as_deref(),
            hardware_model: self.hardware_model.as_deref(),
        };
        models.resolve(
            Some(&self.reported)
                .filter(|r| !r.is_empty())
                .map(String::as_str),
            &facts,
        )
    }
}

/// Most models with an open `model_unapproved` episode at once; reports of further
/// models join the episode of `(other)`, so a device sending arbitrary text cannot
/// grow the bridge's memory or the alert stream without bound.
const MAX_OPEN: usize = 64;
const OTHER: &str = "(other)";
/// Quiet period of an episode while no models file has been put in force (the
/// default of `[policy] unapproved_quiet_minutes`).
const DEFAULT_QUIET_MS: u64 = 60 * 60_000;

/// The fleet-wide operational alert `ops/bridge/model_unapproved`: one episode per
/// reported model (`name/version`) whose messages resolve to a status other than
/// `approved` (and `none`), with fleet counts.
///
/// - It opens at the first such message, and is sent again (`open`, same `alert_id`)
///   each time another device joins it, with the counts: `devices`, `messages` since it
///   opened, and `statuses` (devices per status: a model may be out of cohort for some
///   devices and approved for others).
/// - `withheld_alarms` counts the alarm messages of the model the policy withheld
///   (`[policy] unapproved_alarms = "withhold"`); the episode is sent again when it
///   withholds its first.
/// - On a reload of the models file each device of the episode is resolved again with
///   the facts of its last message (site, cohorts, firmware, hardware model): the
///   devices now approved leave it, and it resolves (`resolved_by` `approval`) when none
///   is left; if some are left but their counts changed it is sent again `open`. So an
///   `out_of_cohort` episode of an approved model stays open until the approval covers
///   its devices.
/// - It resolves (`resolved_by` `quiet`) when no message of its model needing attention
///   arrived for `[policy] unapproved_quiet_minutes` (checked whenever the recorder
///   adopts a batch or a tick, about once a second): withdrawn or unknown models that
///   devices stopped reporting, and the `(other)` bucket, close too.
/// - Its `alert_id` is deterministic: `ops-bridge-model_unapproved-<model>-<UTC day it
///   opened, YYYYMMDD>`, with `-2`, `-3`, ... for the further episodes of that model
///   opened the same day by this process. Episodes are kept in memory only: after a
///   restart, the first episode of a model on the same day carries the id of that day's
///   first episode, so an episode open before the restart goes on under its id (its
///   counts start again from zero); one opened on an earlier day is not resolved by
///   the new process (consumers expire it: an open episode is re-sent whenever a device
///   joins it).
#[derive(Debug)]
pub struct ModelFleet {
    open: std::collections::BTreeMap<String, Episode>,
    /// Episodes opened per `(model key, UTC day)` by this process, for their ids.
    opened: std::collections::BTreeMap<(String, String), u32>,
    quiet_ms: u64,
}

impl Default for ModelFleet {
    fn default() -> Self {
        Self {
            open: std::collections::BTreeMap::new(),
            opened: std::collections::BTreeMap::new(),
            quiet_ms: DEFAULT_QUIET_MS,
        }
    }
}

#[derive(Debug)]
struct Episode {
    alert_id: String,
    devices: std::collections::BTreeMap<vitalmq_envelope::DeviceId, Seen>,
    messages: u64,
    withheld_alarms: u64,
    /// Bridge time of the last message needing attention.
    last_ms: u64,
}

impl ModelFleet {
    /// One message resolved to a status needing attention (`seen`); the alert to send,
    /// if the episode opened or gained a device (or a device's status changed).
    pub fn observe(&mut self, seen: Seen, now_ms: u64) -> Option<crate::ops::OpsAlert> {
        if !seen.status.needs_attention() {
            return None;
        }
        let reported = seen.reported.as_str();
        let key = if self.open.contains_key(reported) || self.open.len() < MAX_OPEN - 1 {
            reported.to_owned()
        } else {
            OTHER.to_owned()
        };
        if !self.open.contains_key(&key) {
            let alert_id = self.next_id(&key, now_ms);
            self.open.insert(
                key.clone(),
                Episode {
                    alert_id,
                    devices: std::collections::BTreeMap::new(),
                    messages: 0,
                    withheld_alarms: 0,
                    last_ms: now_ms,
                },
            );
        }
        let episode = self.open.get_mut(&key)?;
        episode.messages += 1;
        episode.last_ms = episode.last_ms.max(now_ms);
        let status = seen.status;
        let joined = episode
            .devices
            .insert(seen.device.clone(), seen)
            .map(|s| s.status)
            != Some(status);
        joined.then(|| alert(&key, episode, "open", None, now_ms))
    }

    /// The id of the next episode of `key`: deterministic per model and UTC day.
    fn next_id(&mut self, key: &str, now_ms: u64) -> String {
        let day = crate::normalize::rfc3339_ms(now_ms)
            .map(|t| t.get(..10).unwrap_or_default().replace('-', ""))
            .unwrap_or_default();
        let n = self
            .opened
            .entry((key.to_owned(), day.clone()))
            .or_insert(0);
        *n += 1;
        let base = format!("ops-bridge-model_unapproved-{}-{day}", sanitize(key));
        if *n == 1 { base } else { format!("{base}-{n}") }
    }

    /// One alarm message of `reported` the models policy withheld (after its
    /// [`Self::observe`]); the episode to send again when it is its first.
    pub fn withheld(&mut self, reported: &str, now_ms: u64) -> Option<crate::ops::OpsAlert> {
        let key = if self.open.contains_key(reported) {
            reported
        } else {
            OTHER
        };
        let episode = self.open.get_mut(key)?;
        episode.withheld_alarms += 1;
        (episode.withheld_alarms == 1).then(|| alert(key, episode, "open", None, now_ms))
    }

    /// Re-resolves every device of every open episode against `models` (now in force):
    /// resolves the episodes none of whose devices needs attention any more, re-sends
    /// those whose counts changed; adopts its quiet period.
    pub fn on_reload(&mut self, models: &ModelRegistry, now_ms: u64) -> Vec<crate::ops::OpsAlert> {
        self.quiet_ms = u64::from(models.unapproved_quiet_minutes()) * 60_000;
        let mut out = Vec::new();
        let keys: Vec<String> = self.open.keys().cloned().collect();
        for key in keys {
            let Some(episode) = self.open.get_mut(&key) else {
                continue;
            };
            let mut changed = false;
            episode.devices.retain(|_, seen| {
                let now = seen.resolve(models);
                changed |= now != seen.status;
                seen.status = now;
                now.needs_attention()
            });
            if episode.devices.is_empty() {
                if let Some(episode) = self.open.remove(&key) {
                    out.push(alert(&key, &episode, "resolved", Some("approval"), now_ms));
                }
            } else if changed {
                out.push(alert(&key, episode, "open", None, now_ms));
            }
        }
        out
    }

    /// Resolves the episodes with no message needing attention for the quiet period.
    pub fn on_tick(&mut self, now_ms: u64) -> Vec<crate::ops::OpsAlert> {
        let quiet: Vec<String> = self
            .open
            .iter()
            .filter(|(_, e)| now_ms.saturating_sub(e.last_ms) >= self.quiet_ms)
            .map(|(k, _)| k.clone())
            .collect();
        quiet
            .into_iter()
            .filter_map(|k| {
                let episode = self.open.remove(&k)?;
                Some(alert(&k, &episode, "resolved", Some("quiet"), now_ms))
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

/// The episode's message; `resolved_by` (`approval` or `quiet`) when it resolves.
fn alert(
    model: &str,
    e: &Episode,
    state: &'static str,
    resolved_by: Option<&str>,
    now_ms: u64,
) -> crate::ops::OpsAlert {
    let mut statuses = serde_json::Map::new();
    for s in e.devices.values() {
        let n = statuses
            .get(s.status.as_str())
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        statuses.insert(s.status.as_str().to_owned(), serde_json::json!(n + 1));
    }
    let mut details = serde_json::Map::new();
    details.insert("model".into(), serde_json::json!(model));
    details.insert("devices".into(), serde_json::json!(e.devices.len()));
    details.insert("messages".into(), serde_json::json!(e.messages));
    details.insert("statuses".into(), serde_json::Value::Object(statuses));
    details.insert(
        "withheld_alarms".into(),
        serde_json::json!(e.withheld_alarms),
    );
    if let Some(by) = resolved_by {
        details.insert("resolved_by".into(), serde_json::json!(by));
    }
    let reason = match resolved_by {
        Some("quiet") => "quiet".to_owned(),
        Some(_) => format!("model {model} is approved for every device that reported it"),
        None => format!(
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

    /// A message of `device` at site `s1`, in no cohort, firmware 5.12.1, no hardware
    /// model.
    fn seen(device: &DeviceId, reported: &str, status: ModelStatus) -> Seen {
        Seen {
            device: device.clone(),
            reported: reported.to_owned(),
            status,
            site: vitalmq_policies::SiteId::new("s1").expect("site"),
            cohorts: Vec::new(),
            fw: Some("5.12.1".into()),
            hardware_model: None,
        }
    }

    fn example(edit: impl Fn(&str) -> String) -> ModelRegistry {
        let text = edit(include_str!("../../policies/examples/models.toml"));
        ModelRegistry::parse(&text, Path::new("m.toml")).expect("valid")
    }

    #[test]
    fn one_episode_per_model_with_fleet_counts_resolved_by_approval() {
        let mut fleet = ModelFleet::default();
        let d = |n: u32| DeviceId::new(format!("dev-{n:05}")).expect("id");
        let rc = "arrhythmia-net/2.2.0-rc1";
        let open = fleet
            .observe(seen(&d(1), rc, ModelStatus::Unapproved), 10)
            .expect("opens");
        assert_eq!(
            (open.state, open.kind.as_str()),
            ("open", "model_unapproved")
        );
        assert!(
            fleet
                .observe(seen(&d(1), rc, ModelStatus::Unapproved), 11)
                .is_none()
        );
        assert!(
            fleet
                .observe(seen(&d(9), "x/1", ModelStatus::Approved), 11)
                .is_none()
        );
        let more = fleet
            .observe(seen(&d(2), rc, ModelStatus::Unapproved), 12)
            .expect("joins");
        assert_eq!(more.alert_id, open.alert_id);
        assert_eq!(more.details["devices"], 2);
        assert_eq!(more.details["messages"], 3);
        assert_eq!(more.details["statuses"]["unapproved"], 2);
        let other = fleet
            .observe(seen(&d(3), "nobody/1", ModelStatus::Unknown), 13)
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
            .observe(seen(&d(1), rc, ModelStatus::OutOfCohort), 40)
            .expect("reopens");
        assert_ne!(again.alert_id, open.alert_id);
    }

    /// A device naming a score model resolves `unknown`; approving scores does not
    /// resolve it, only a device model of that name would.
    #[test]
    fn a_score_model_reported_by_a_device_stays_open() {
        let mut fleet = ModelFleet::default();
        let d = DeviceId::new("dev-00001").expect("id");
        assert!(
            fleet
                .observe(seen(&d, "news2/rcp-2017.1", ModelStatus::Unknown), 1)
                .is_some()
        );
        let text = include_str!("../../policies/examples/models.toml");
        let models = ModelRegistry::parse(text, Path::new("m.toml")).expect("valid");
        assert!(fleet.on_reload(&models, 2).is_empty());
        assert!(
            fleet.withheld("news2/rcp-2017.1", 3).is_some(),
            "the first withheld alarm re-sends the episode"
        );
        assert!(fleet.withheld("news2/rcp-2017.1", 4).is_none());
        assert!(fleet.withheld("never/seen", 5).is_none());
    }

    #[test]
    fn the_number_of_episodes_is_bounded() {
        let mut fleet = ModelFleet::default();
        let d = DeviceId::new("dev-00001").expect("id");
        for i in 0..200 {
            fleet.observe(seen(&d, &format!("junk/{i}"), ModelStatus::Unknown), 1);
        }
        assert_eq!(fleet.open.len(), MAX_OPEN);
        assert!(fleet.open.contains_key(OTHER));
    }

    /// An out-of-cohort episode concerns an approved model: a reload resolves it only
    /// once the approval covers its devices (as their last messages describe them).
    #[test]
    fn an_out_of_cohort_episode_resolves_only_when_its_devices_are_covered() {
        let mut fleet = ModelFleet::default();
        let d = |n: u32| DeviceId::new(format!("dev-{n:05}")).expect("id");
        let m = "arrhythmia-net/2.1.0";
        let models = example(str::to_owned);
        let mut band9 = seen(&d(2), m, ModelStatus::OutOfCohort);
        band9.hardware_model = Some("vw-band-9".into());
        assert_eq!(band9.resolve(&models), ModelStatus::OutOfCohort);
        let open = fleet
            .observe(seen(&d(1), m, ModelStatus::OutOfCohort), 1)
            .expect("opens");
        fleet.observe(band9, 2).expect("joins");

        // Any reload (the same file, or another model approved) leaves it open.
        assert!(
            fleet.on_reload(&models, 3).is_empty(),
            "still out of cohort"
        );
        // vw-band-9 approved: that device leaves, the other is still outside.
        let with_band9 = example(|t| {
            t.replace(
                "hardware_models = [\"vw-band-2\", \"vw-band-3\"]",
                "hardware_models = [\"vw-band-2\", \"vw-band-3\", \"vw-band-9\"]",
            )
        });
        let sent = fleet.on_reload(&with_band9, 4);
        assert_eq!(sent.len(), 1);
        assert_eq!(
            (sent[0].state, sent[0].alert_id.as_str()),
            ("open", open.alert_id.as_str())
        );
        assert_eq!(sent[0].details["devices"], 1);
        assert_eq!(sent[0].details["statuses"]["out_of_cohort"], 1);
        // Every hardware model: now it resolves, by approval.
        let everywhere = example(|t| {
            t.replace(
                "hardware_models = [\"vw-band-2\", \"vw-band-3\"]",
                "hardware_models = []",
            )
        });
        let resolved = fleet.on_reload(&everywhere, 5);
        assert_eq!(resolved.len(), 1);
        assert_eq!(
            (resolved[0].state, resolved[0].alert_id.as_str()),
            ("resolved", open.alert_id.as_str())
        );
        assert_eq!(resolved[0].details["resolved_by"], "approval");
        assert!(fleet.open.is_empty());
    }

    /// Withdrawn and unknown models (and the `(other)` bucket) close once no device
    /// reports them for the quiet period, which the models file sets.
    #[test]
    fn episodes_no_device_feeds_resolve_after_the_quiet_period() {
        const MIN: u64 = 60_000;
        let mut fleet = ModelFleet::default();
        let d = DeviceId::new("dev-00001").expect("id");
        let withdrawn = fleet
            .observe(seen(&d, "arrhythmia-net/2.0.3", ModelStatus::Withdrawn), 0)
            .expect("opens");
        for i in 0..MAX_OPEN {
            fleet.observe(
                seen(&d, &format!("junk/{i}"), ModelStatus::Unknown),
                30 * MIN,
            );
        }
        assert!(fleet.open.contains_key(OTHER));
        assert!(fleet.on_tick(60 * MIN - 1).is_empty(), "default: an hour");
        // a message of the withdrawn model keeps its episode alive
        assert!(
            fleet
                .observe(
                    seen(&d, "arrhythmia-net/2.0.3", ModelStatus::Withdrawn),
                    50 * MIN
                )
                .is_none()
        );
        assert!(fleet.on_tick(60 * MIN).is_empty());
        let closed = fleet.on_tick(90 * MIN);
        assert_eq!(closed.len(), MAX_OPEN - 1, "all but the withdrawn one");
        assert!(closed.iter().all(|a| a.state == "resolved"
            && a.reason == "quiet"
            && a.details["resolved_by"] == "quiet"));
        assert!(closed.iter().any(|a| a.details["model"] == OTHER));
        let done = fleet.on_tick(110 * MIN);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].alert_id, withdrawn.alert_id);
        assert!(fleet.open.is_empty());

        // A shorter period from the models file (a reload puts it in force).
        let quick = example(|t| {
            t.replace(
                "unapproved_quiet_minutes = 60",
                "unapproved_quiet_minutes = 5",
            )
        });
        assert!(fleet.on_reload(&quick, 110 * MIN).is_empty());
        fleet
            .observe(seen(&d, "nobody/1", ModelStatus::Unknown), 200 * MIN)
            .expect("opens");
        assert!(fleet.on_tick(204 * MIN).is_empty());
        assert_eq!(fleet.on_tick(205 * MIN).len(), 1);
    }

    /// Ids are deterministic per model and day, so a restarted bridge goes on with the
    /// episode it had open rather than opening a duplicate.
    #[test]
    fn episode_ids_survive_a_restart_the_same_day() {
        const DAY: u64 = 86_400_000;
        // 2026-12-05T10:00:00Z
        let t = 1_796_464_800_000;
        let d = DeviceId::new("dev-00001").expect("id");
        let rc = "arrhythmia-net/2.2.0-rc1";
        let mut before = ModelFleet::default();
        let first = before
            .observe(seen(&d, rc, ModelStatus::Unapproved), t)
            .expect("opens");
        assert_eq!(
            first.alert_id,
            "ops-bridge-model_unapproved-arrhythmia-net_2.2.0-rc1-20261205"
        );
        let mut after = ModelFleet::default();
        let again = after
            .observe(seen(&d, rc, ModelStatus::Unapproved), t + 3_600_000)
            .expect("opens");
        assert_eq!(
            again.alert_id, first.alert_id,
            "same episode after a restart"
        );
        // A new episode of the same model the same day has its own id; another day too.
        assert_eq!(after.on_tick(t + 3 * 3_600_000).len(), 1);
        let second = after
            .observe(seen(&d, rc, ModelStatus::Unapproved), t + 4 * 3_600_000)
            .expect("reopens");
        assert_eq!(second.alert_id, format!("{}-2", first.alert_id));
        assert_eq!(after.on_tick(t + 6 * 3_600_000).len(), 1);
        let next_day = after
            .observe(seen(&d, rc, ModelStatus::Unapproved), t + DAY)
            .expect("reopens");
        assert!(
            next_day.alert_id.ends_with("-20261206"),
            "{}",
            next_day.alert_id
        );
    }
}
