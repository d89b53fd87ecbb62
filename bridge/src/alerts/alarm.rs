//! Device alarms (SPEC 3.1, 5.1): an `alarm` message with `active` = true opens a
//! clinical alert `device-alarm:<code>` (one episode per code), `active` = false for the
//! same code resolves it. The severity is the device's `level` as the site's policy maps
//! it. Never suppressed by signal quality; a repeat of an active alarm is not re-sent.
//!
//! Bounded: at most [`MAX_OPEN_ALARMS`] open codes per device; beyond, a new code is
//! still sent (a clinician must hear it) but not tracked, so it is never resolved or
//! re-escalated by the bridge (logged).
//!
//! Withheld (issue 21): when the models file says `[policy] unapproved_alarms =
//! "withhold"` and the message's reported model needs attention, an alarm opens an
//! episode marked `withheld` but raises no alert ([`AlarmOutcome::Withheld`]; the
//! caller audits it); the clear of a withheld episode raises nothing either. Once it is
//! no longer withheld (model approved, policy back to deliver), the device's next
//! accepted message raises a still-open episode ([`release_withheld`]): a real alarm is
//! not lost to the paperwork.
//!
//! An `urgent` alarm is never withheld: SPEC 3.1 sends `active: true` once, so a
//! withheld urgent alarm would be heard only if the device repeated it after the
//! model's approval. It is delivered (the caller marks it with the model status).

use std::collections::BTreeMap;

use ciborium::value::Value;
use serde::{Deserialize, Serialize};
use serde_json::json;
use vitalmq_envelope::{MessageType, Telemetry};
use vitalmq_policies::{Alerting, DeviceEntry, Severity};

use super::book::Outgoing;
use super::message::alert_id;
use crate::normalize::rfc3339_ms;

/// Most open alarm codes tracked per device.
pub const MAX_OPEN_ALARMS: usize = 32;

/// An alarm as the device sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct AlarmEvent {
    pub code: String,
    pub level: Severity,
    pub active: bool,
    pub detail: Option<String>,
}

impl AlarmEvent {
    /// The alarm of an `alarm` message (its SPEC 3.1 keys pass through in `extra`);
    /// `None` for other types or keys that break SPEC 3.1 (the envelope refuses those).
    pub fn of(t: &Telemetry) -> Option<Self> {
        if t.kind != MessageType::Alarm {
            return None;
        }
        let text = |k: &str| match t.extra.get(k) {
            Some(Value::Text(s)) => Some(s.clone()),
            _ => None,
        };
        let level = match text("level")?.as_str() {
            "info" => Severity::Info,
            "review" => Severity::Review,
            "urgent" => Severity::Urgent,
            _ => return None,
        };
        let active = match t.extra.get("active") {
            Some(Value::Bool(b)) => *b,
            _ => return None,
        };
        Some(Self {
            code: text("alarm")?,
            level,
            active,
            detail: text("detail"),
        })
    }
}

/// One open alarm episode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlarmEpisode {
    pub alert_id: String,
    pub severity: Severity,
    /// Bridge clock.
    pub opened_ms: u64,
    /// Opened without an alert: the models policy withheld it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub withheld: bool,
    /// The alarm as the device sent it, kept while withheld so that it can be raised
    /// once no longer withheld ([`release_withheld`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<Severity>,
}

/// A device's open alarms by code.
pub type Alarms = BTreeMap<String, AlarmEpisode>;

/// What one alarm message did to its episode.
#[derive(Debug, Clone, PartialEq)]
pub enum AlarmOutcome {
    /// Nothing to send: a repeat of an active alarm, or the clear of one not open.
    Nothing,
    /// The alert change to send.
    Alert(Outgoing),
    /// Withheld by the models policy: the episode opened (`open`) or cleared
    /// (`resolved`) without an alert.
    Withheld {
        alert_id: String,
        state: &'static str,
    },
}

/// The device's withheld episodes, at its first accepted message once its messages are
/// no longer withheld (the models file reloaded: model approved, or policy back to
/// deliver): each raised now as an `open` alert (the caller marks it). SPEC 3.1 sends
/// `active: true` once, so waiting for a repeat could lose the alarm.
pub fn release_withheld(
    alarms: &mut Alarms,
    policy_sha256: &str,
    entry: &DeviceEntry,
    t: &Telemetry,
    event_id: &str,
) -> Vec<Outgoing> {
    let mut out = Vec::new();
    for (code, ep) in alarms.iter_mut().filter(|(_, e)| e.withheld) {
        ep.withheld = false;
        let alarm = AlarmEvent {
            code: code.clone(),
            level: ep.level.take().unwrap_or(ep.severity),
            active: true,
            detail: None,
        };
        out.push(alert(
            &alarm,
            (&ep.alert_id, "open", ep.severity),
            policy_sha256,
            entry,
            t,
            event_id,
        ));
    }
    out
}

/// One alarm message of one device through its episodes; `withhold` when the models
/// policy withholds this message's alarms (see the module doc).
#[allow(clippy::too_many_arguments)]
pub fn on_alarm(
    alarms: &mut Alarms,
    policy: &Alerting,
    policy_sha256: &str,
    entry: &DeviceEntry,
    t: &Telemetry,
    event_id: &str,
    alarm: &AlarmEvent,
    withhold: bool,
    now_ms: u64,
) -> AlarmOutcome {
    let withhold = withhold && alarm.level != Severity::Urgent;
    let rule = format!("device-alarm:{}", alarm.code);
    let open_now = match (alarms.get(&alarm.code), alarm.active) {
        (None, true) => true,
        // Withheld while it needed attention; delivered at its next report once not.
        (Some(ep), true) => ep.withheld && !withhold,
        (None, false) => false,
        (Some(_), false) => false,
    };
    let (id, state, severity) = if open_now {
        let id = alert_id(&entry.id, &rule, event_id);
        let severity = policy.alarm_severity(&entry.site, alarm.level);
        if alarms.len() < MAX_OPEN_ALARMS || alarms.contains_key(&alarm.code) {
            alarms.insert(
                alarm.code.clone(),
                AlarmEpisode {
                    alert_id: id.clone(),
                    severity,
                    opened_ms: now_ms,
                    withheld: withhold,
                    level: withhold.then_some(alarm.level),
                },
            );
        } else {
            tracing::warn!(device = %entry.id, code = %alarm.code, "too many open device alarms: this one is sent but not tracked");
        }
        if withhold {
            return AlarmOutcome::Withheld {
                alert_id: id,
                state: "open",
            };
        }
        (id, "open", severity)
    } else if !alarm.active {
        let Some(ep) = alarms.remove(&alarm.code) else {
            return AlarmOutcome::Nothing;
        };
        if ep.withheld {
            return AlarmOutcome::Withheld {
                alert_id: ep.alert_id,
                state: "resolved",
            };
        }
        (ep.alert_id, "resolved", ep.severity)
    } else {
        return AlarmOutcome::Nothing;
    };
    AlarmOutcome::Alert(alert(
        alarm,
        (&id, state, severity),
        policy_sha256,
        entry,
        t,
        event_id,
    ))
}

/// The alert change of `alarm`: `(alert id, state, severity)`.
fn alert(
    alarm: &AlarmEvent,
    (id, state, severity): (&str, &str, Severity),
    policy_sha256: &str,
    entry: &DeviceEntry,
    t: &Telemetry,
    event_id: &str,
) -> Outgoing {
    let rule = format!("device-alarm:{}", alarm.code);
    let mut body = json!({
        "alert_id": id,
        "kind": "clinical",
        "state": state,
        "severity": severity.as_str(),
        "rule": rule,
        "rule_version": "1",
        "policy_sha256": policy_sha256,
        "device": entry.id.as_str(),
        "site": entry.site.as_str(),
        "patient_ref": entry.patient_ref,
        "metric": null,
        "value": null,
        "threshold": null,
        "window_s": 0,
        "evidence": [event_id],
        "fw": t.fw,
        "model": t.model,
        "raised_at": rfc3339_ms(t.ts),
        "alarm": {
            "code": alarm.code,
            "level": alarm.level.as_str(),
            "active": alarm.active,
        },
    });
    if let Some(d) = &alarm.detail {
        body["alarm"]["detail"] = json!(d);
    }
    if state == "resolved" {
        body["reason"] = json!("cleared");
    }
    Outgoing {
        alert_id: id.to_owned(),
        state: state.to_owned(),
        kind: "clinical",
        topic: format!("alerts/{}/{}/{}", entry.site, severity, entry.id),
        device: entry.id.to_string(),
        rule: Some(rule),
        severity: Some(severity),
        body: body.to_string(),
        level: 0,
    }
}
