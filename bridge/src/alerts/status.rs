//! What a device's `status` messages say about its own health (SPEC 3.1): a battery
//! running low (operational `battery` alert, with hysteresis, not while charging) and
//! messages the device dropped from its buffer (`dropped` increasing within an epoch:
//! operational `dropped` record, with the count). Neither carries a patient reference.
//! `interval_s` goes to the silence state.

use ciborium::value::Value;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json, json};
use vitalmq_envelope::{MessageType, Telemetry};
use vitalmq_policies::{BatteryPolicy, DeviceEntry};

use super::message::alert_id;
use crate::ops::{OpsAlert, OpsKind};

/// The SPEC 3.1 keys of a `status` message.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StatusKeys {
    pub battery: Option<f64>,
    pub dropped: Option<u64>,
    pub interval_s: Option<u64>,
    pub charging: Option<bool>,
}

impl StatusKeys {
    /// The keys of a `status` message (they pass through in `extra`); all `None` for
    /// other types.
    pub fn of(t: &Telemetry) -> Self {
        if t.kind != MessageType::Status {
            return Self::default();
        }
        let uint = |k: &str| match t.extra.get(k) {
            Some(Value::Integer(i)) => u64::try_from(*i).ok(),
            _ => None,
        };
        Self {
            battery: match t.extra.get("battery") {
                Some(Value::Float(f)) => Some(*f),
                Some(Value::Integer(i)) => u8::try_from(*i).ok().map(f64::from),
                _ => None,
            },
            dropped: uint("dropped"),
            interval_s: uint("interval_s"),
            charging: match t.extra.get("charging") {
                Some(Value::Bool(b)) => Some(*b),
                _ => None,
            },
        }
    }
}

/// What the bridge remembers of a device's status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusState {
    /// `(epoch, dropped)` last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<(u64, u64)>,
    /// The open low-battery alert's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub battery_alert: Option<String>,
}

impl StatusState {
    /// One accepted status message; returns the operational alerts it raises.
    pub fn on_status(
        &mut self,
        policy: &BatteryPolicy,
        entry: &DeviceEntry,
        epoch: u64,
        event_id: &str,
        keys: &StatusKeys,
        now_ms: u64,
    ) -> Vec<OpsAlert> {
        let mut out = Vec::new();
        let details = |extra: Json| {
            let mut m = Map::new();
            m.insert("device".into(), json!(entry.id.as_str()));
            m.insert("site".into(), json!(entry.site.as_str()));
            if let Json::Object(e) = extra {
                m.extend(e);
            }
            m
        };
        if let Some(d) = keys.dropped {
            let before = match self.dropped {
                Some((e, n)) if e == epoch => n,
                _ => 0,
            };
            if d > before {
                out.push(OpsAlert {
                    kind: OpsKind::Dropped,
                    state: "event",
                    alert_id: alert_id(&entry.id, "ops/dropped", event_id),
                    reason: format!("the device dropped {} messages from its buffer before a receipt covered them", d - before),
                    details: details(json!({"epoch": epoch, "dropped": d, "increase": d - before, "evidence": [event_id]})),
                    at_ms: now_ms,
                });
            }
            if d >= before || self.dropped.is_none_or(|(e, _)| e != epoch) {
                self.dropped = Some((epoch, d));
            }
        }
        if let Some(level) = keys.battery.filter(|b| b.is_finite()) {
            let charging = keys.charging == Some(true);
            match &self.battery_alert {
                None if level < policy.low_below && !charging => {
                    let id = alert_id(&entry.id, "ops/battery", event_id);
                    self.battery_alert = Some(id.clone());
                    out.push(OpsAlert {
                        kind: OpsKind::Battery,
                        state: "open",
                        alert_id: id,
                        reason: format!("battery below {}", policy.low_below),
                        details: details(json!({"battery": level, "charging": charging, "low_below": policy.low_below, "evidence": [event_id]})),
                        at_ms: now_ms,
                    });
                }
                Some(id) if level >= policy.resolve_at || charging => {
                    let id = id.clone();
                    self.battery_alert = None;
                    out.push(OpsAlert {
                        kind: OpsKind::Battery,
                        state: "resolved",
                        alert_id: id,
                        reason: if charging { "charging".into() } else { format!("battery at {} or above", policy.resolve_at) },
                        details: details(json!({"battery": level, "charging": charging, "resolve_at": policy.resolve_at, "evidence": [event_id]})),
                        at_ms: now_ms,
                    });
                }
                _ => {}
            }
        }
        out
    }
}
