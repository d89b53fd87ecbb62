//! Device alarms (SPEC 3.1, 5.1): an `alarm` message with `active` = true opens a
//! clinical alert `device-alarm:<code>` (one episode per code), `active` = false for the
//! same code resolves it. The severity is the device's `level` as the site's policy maps
//! it. Never suppressed by signal quality; a repeat of an active alarm is not re-sent.
//!
//! Bounded: at most [`MAX_OPEN_ALARMS`] open codes per device; beyond, a new code is
//! still sent (a clinician must hear it) but not tracked, so it is never resolved or
//! re-escalated by the bridge (logged).

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
}

/// A device's open alarms by code.
pub type Alarms = BTreeMap<String, AlarmEpisode>;

/// One alarm message of one device through its episodes.
#[allow(clippy::too_many_arguments)]
pub fn on_alarm(
    alarms: &mut Alarms,
    policy: &Alerting,
    policy_sha256: &str,
    entry: &DeviceEntry,
    t: &Telemetry,
    event_id: &str,
    alarm: &AlarmEvent,
    now_ms: u64,
) -> Option<Outgoing> {
    let rule = format!("device-alarm:{}", alarm.code);
    let (id, state, severity) = match (alarms.get(&alarm.code), alarm.active) {
        (Some(_), true) | (None, false) => return None,
        (None, true) => {
            let id = alert_id(&entry.id, &rule, event_id);
            let severity = policy.alarm_severity(&entry.site, alarm.level);
            if alarms.len() < MAX_OPEN_ALARMS {
                alarms.insert(
                    alarm.code.clone(),
                    AlarmEpisode {
                        alert_id: id.clone(),
                        severity,
                        opened_ms: now_ms,
                    },
                );
            } else {
                tracing::warn!(device = %entry.id, code = %alarm.code, "too many open device alarms: this one is sent but not tracked");
            }
            (id, "open", severity)
        }
        (Some(_), false) => {
            let ep = alarms.remove(&alarm.code)?;
            (ep.alert_id, "resolved", ep.severity)
        }
    };
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
    Some(Outgoing {
        alert_id: id,
        state: state.to_owned(),
        kind: "clinical",
        topic: format!("alerts/{}/{}/{}", entry.site, severity, entry.id),
        device: entry.id.to_string(),
        rule: Some(rule),
        severity: Some(severity),
        body: body.to_string(),
        level: 0,
    })
}
