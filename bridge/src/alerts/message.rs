//! The alert messages (SPEC section 5): what [`evaluate`](super::evaluate) emits, their
//! topics and their JSON.
//!
//! Clinical alerts go to `alerts/{site}/{severity}/{device}` and carry every field of
//! SPEC section 5, in its order, then:
//! `measure` (`value`, `fall`, `rise` or `deviation`) and `measured` (the quantity the
//! threshold applies to; equal to `value` for threshold rules), `baseline` (baseline
//! rules), `escalation` (`worse` or `persisting`, on `escalated`), and on `resolved`
//! `reason` (`recovered`, `rule_removed`, `rule_changed`), `suppressed` (the number of
//! repeats not sent) and `suppressed_reasons` (counts per reason).
//!
//! Field meanings that the SPEC leaves open:
//! - `threshold`: the one this change crossed (the trigger on `open`, the escalation
//!   threshold on `escalated` by `worse`, the trigger on `persisting`, the resolve
//!   threshold on `resolved`);
//! - `window_s`: on `open`, how long the trigger was observed (first to last reading of
//!   the run); on `escalated` and `resolved`, how long the episode has been open;
//! - `evidence`: the event ids of the readings behind this change, newest last, at most
//!   [`EVIDENCE_CAP`](super::EVIDENCE_CAP);
//! - `severity`: on `resolved`, the episode's last severity, so the resolution reaches
//!   the subscribers of the topic the escalation went to.
//!
//! Operational alerts go to `ops/bridge/{type}` and carry no patient reference (and no
//! reading's value: a sensor-fault alert names the metrics, not what they said).
//!
//! With candidate rule sets (`[alerts] candidates`), every change the engine delivers,
//! clinical or operational, also carries `rule_set_version` (the `version` of the rule
//! set file that delivered it) and `role` (`live` or `canary`, as score alerts do), so
//! a canary's alert says so; without candidates the body is unchanged.

use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};
use vitalmq_envelope::DeviceId;
use vitalmq_policies::{Severity, SiteId};

use crate::normalize::rfc3339_ms;

/// The deterministic id of an alert episode: `al-` + the first 32 hex digits of
/// SHA-256("vitalmq/alert/v1" 0x00 device 0x00 rule 0x00 opening event id). Re-evaluating
/// the same events (after a failed commit, or a restart) gives the same ids.
pub fn alert_id(device: &DeviceId, rule: &str, opening_event: &str) -> String {
    crate::derived_id::derived_id(
        "al",
        "vitalmq/alert/v1",
        &[device.as_str(), rule, opening_event],
    )
}

/// Where an episode is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    Open,
    Escalated,
    Resolved,
}

impl AlertState {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Escalated => "escalated",
            Self::Resolved => "resolved",
        }
    }
}

/// Why an alert escalated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EscalationCause {
    /// The measured quantity went past the escalation threshold.
    Worse,
    /// Still unresolved `after_s` after it opened.
    Persisting,
}

impl EscalationCause {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Worse => "worse",
            Self::Persisting => "persisting",
        }
    }
}

/// Why an alert resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResolveReason {
    /// Readings were back past the resolve threshold for `resolve_after_s`.
    Recovered,
    /// The rule is no longer in the rule set.
    RuleRemoved,
    /// The rule now measures something else (metric, kind or direction).
    RuleChanged,
    /// The rule-set version that raised it was a canary for the device and no longer
    /// delivers there (rolled back), issue 21.
    ModelRollback,
    /// The rule-set version that raised it no longer delivers for the device (another
    /// version became live or canary there, or it lost its role).
    RolloutChanged,
}

impl ResolveReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Recovered => "recovered",
            Self::RuleRemoved => "rule_removed",
            Self::RuleChanged => "rule_changed",
            Self::ModelRollback => "model_rollback",
            Self::RolloutChanged => "rollout_changed",
        }
    }
}

/// Why a reading that met the trigger was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SuppressionReason {
    /// The alert is open; the reading repeats it.
    AlreadyOpen,
    /// The alert is escalated; the reading repeats it.
    AlreadyEscalated,
}

/// Repeats not sent during an episode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SuppressedCounts {
    pub already_open: u64,
    pub already_escalated: u64,
    /// The reason of the newest one.
    pub last: Option<SuppressionReason>,
}

impl SuppressedCounts {
    pub fn total(&self) -> u64 {
        self.already_open.saturating_add(self.already_escalated)
    }
}

/// One change of a clinical alert episode.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ClinicalAlert {
    pub alert_id: String,
    pub state: AlertState,
    pub severity: Severity,
    pub rule: String,
    pub rule_version: String,
    pub policy_sha256: String,
    pub device: DeviceId,
    pub site: SiteId,
    pub patient_ref: String,
    pub metric: String,
    /// The reading; `None` when the change is not about a reading of the metric.
    pub value: Option<f64>,
    /// What `measured` is: `value`, `fall`, `rise` or `deviation`.
    pub measure: &'static str,
    pub measured: Option<f64>,
    /// The patient's baseline (baseline rules).
    pub baseline: Option<f64>,
    pub threshold: f64,
    pub window_s: u64,
    pub evidence: Vec<String>,
    pub fw: String,
    pub model: Option<String>,
    /// Device time of the reading behind the change.
    pub raised_at_ms: u64,
    /// On `escalated`.
    pub escalation: Option<EscalationCause>,
    /// On `resolved`.
    pub resolution: Option<ResolveReason>,
    /// On `resolved`.
    pub suppressed: Option<SuppressedCounts>,
    /// The rule-set version that delivered it (only with candidate rule sets).
    pub delivered_by: Option<DeliveredBy>,
}

/// The rule-set version that delivered a change and its role for the device: set on
/// delivered changes when candidate rule sets are configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveredBy {
    /// `RuleSet::version` of the delivering file.
    pub version: String,
    /// `live` or `canary`.
    pub role: vitalmq_policies::ModelRole,
}

/// Kinds of operational alert the engine raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OpsAlertType {
    /// Too many low-quality readings from one device.
    SignalQuality,
    /// Readings outside the physiological limits: the sensor (or the device's
    /// software) is faulty; clinical rules ignore those values.
    SensorFault,
}

impl OpsAlertType {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::SignalQuality => "signal_quality",
            Self::SensorFault => "sensor_fault",
        }
    }
}

/// One change of an operational alert episode (`open` or `resolved`).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct OperationalAlert {
    pub alert_id: String,
    pub alert_type: OpsAlertType,
    pub state: AlertState,
    pub device: DeviceId,
    pub site: SiteId,
    pub reason: String,
    /// Low-quality readings among the last `over_n`.
    pub low_quality: u32,
    pub over_n: u8,
    pub low_below: f64,
    pub policy_sha256: String,
    /// The reading behind the change.
    pub evidence: Vec<String>,
    pub raised_at_ms: u64,
    /// On a sensor-fault alert.
    /// (Boxed, like `delivered_by`: keeps the message small.)
    pub sensor: Option<Box<SensorFaultCounts>>,
    /// The rule-set version that delivered it (only with candidate rule sets).
    pub delivered_by: Option<Box<DeliveredBy>>,
}

/// What a sensor-fault alert reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SensorFaultCounts {
    /// Implausible readings in the episode so far.
    pub implausible: u64,
    /// Metrics that were implausible in the episode, in name order.
    pub metrics: Vec<String>,
    /// Readings in a row without an implausible value that resolve it.
    pub resolve_after: u32,
}

/// What [`evaluate`](super::evaluate) emits.
#[derive(Debug, Clone, PartialEq)]
pub enum AlertChange {
    /// Boxed: a clinical alert is twice the size of an operational one.
    Clinical(Box<ClinicalAlert>),
    Operational(OperationalAlert),
}

impl AlertChange {
    /// `alerts/{site}/{severity}/{device}` or `ops/bridge/{type}` (SPEC section 5).
    pub fn topic(&self) -> String {
        match self {
            Self::Clinical(a) => format!("alerts/{}/{}/{}", a.site, a.severity, a.device),
            Self::Operational(a) => format!("ops/bridge/{}", a.alert_type.as_str()),
        }
    }

    pub fn alert_id(&self) -> &str {
        match self {
            Self::Clinical(a) => &a.alert_id,
            Self::Operational(a) => &a.alert_id,
        }
    }

    pub fn state(&self) -> AlertState {
        match self {
            Self::Clinical(a) => a.state,
            Self::Operational(a) => a.state,
        }
    }

    /// Names the rule-set version that delivers this change (see the module doc).
    pub fn set_delivered_by(&mut self, by: DeliveredBy) {
        match self {
            Self::Clinical(a) => a.delivered_by = Some(by),
            Self::Operational(a) => a.delivered_by = Some(Box::new(by)),
        }
    }

    /// The payload: one JSON object, no trailing newline.
    pub fn to_json(&self) -> String {
        let (mut v, by) = match self {
            Self::Clinical(a) => (clinical_json(a), a.delivered_by.as_ref()),
            Self::Operational(a) => (operational_json(a), a.delivered_by.as_deref()),
        };
        if let (Json::Object(m), Some(by)) = (&mut v, by) {
            m.insert("rule_set_version".into(), json!(by.version));
            m.insert("role".into(), json!(by.role.as_str()));
        }
        v.to_string()
    }
}

/// A JSON number; integral values are written as integers (`86`, not `86.0`).
fn num(x: f64) -> Json {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if x.fract() == 0.0 && x.abs() < EXACT {
        // Integral and below 2^53: the conversion is exact.
        #[allow(clippy::cast_possible_truncation)]
        return json!(x as i64);
    }
    serde_json::Number::from_f64(x).map_or(Json::Null, Json::Number)
}

fn clinical_json(a: &ClinicalAlert) -> Json {
    let mut v = json!({
        "alert_id": a.alert_id,
        "kind": "clinical",
        "state": a.state.as_str(),
        "severity": a.severity.as_str(),
        "rule": a.rule,
        "rule_version": a.rule_version,
        "policy_sha256": a.policy_sha256,
        "device": a.device.as_str(),
        "site": a.site.as_str(),
        "patient_ref": a.patient_ref,
        "metric": a.metric,
        "value": a.value.map_or(Json::Null, num),
        "threshold": num(a.threshold),
        "window_s": a.window_s,
        "evidence": a.evidence,
        "fw": a.fw,
        "model": a.model,
        "raised_at": rfc3339_ms(a.raised_at_ms),
        "measure": a.measure,
        "measured": a.measured.map_or(Json::Null, num),
    });
    if let Json::Object(m) = &mut v {
        if let Some(b) = a.baseline {
            m.insert("baseline".into(), num(b));
        }
        if let Some(c) = a.escalation {
            m.insert("escalation".into(), json!(c.as_str()));
        }
        if let Some(r) = a.resolution {
            m.insert("reason".into(), json!(r.as_str()));
        }
        if let Some(s) = a.suppressed {
            m.insert("suppressed".into(), json!(s.total()));
            m.insert(
                "suppressed_reasons".into(),
                json!({
                    "already_open": s.already_open,
                    "already_escalated": s.already_escalated,
                }),
            );
        }
    }
    v
}

fn operational_json(a: &OperationalAlert) -> Json {
    let mut v = json!({
        "alert_id": a.alert_id,
        "kind": "operational",
        "component": "bridge",
        "type": a.alert_type.as_str(),
        "state": a.state.as_str(),
        "device": a.device.as_str(),
        "site": a.site.as_str(),
        "reason": a.reason,
    });
    // What the alert is about: a sensor fault's implausible readings, or a rule's
    // quality gate.
    let about = match &a.sensor {
        Some(s) => json!({
            "implausible": s.implausible,
            "metrics": s.metrics,
            "resolve_after": s.resolve_after,
        }),
        None => json!({
            "low_quality": a.low_quality,
            "over_n": a.over_n,
            "low_below": num(a.low_below),
        }),
    };
    let tail = json!({
        "policy_sha256": a.policy_sha256,
        "evidence": a.evidence,
        "raised_at": rfc3339_ms(a.raised_at_ms),
    });
    if let (Json::Object(m), Json::Object(about), Json::Object(tail)) = (&mut v, about, tail) {
        m.extend(about);
        m.extend(tail);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alert_ids_depend_on_device_rule_and_opening_event() {
        let d = DeviceId::new("dev-00042").expect("id");
        let e = DeviceId::new("dev-00043").expect("id");
        let id = alert_id(&d, "spo2-low", "ev1-aa");
        assert_eq!(id, alert_id(&d, "spo2-low", "ev1-aa"));
        assert_ne!(id, alert_id(&e, "spo2-low", "ev1-aa"));
        assert_ne!(id, alert_id(&d, "spo2-lo", "ev1-aa"));
        assert_ne!(id, alert_id(&d, "spo2-low", "ev1-ab"));
        // Separators keep ("a", "bc") and ("ab", "c") apart.
        assert_ne!(alert_id(&d, "a", "bc"), alert_id(&d, "ab", "c"));
        assert!(id.starts_with("al-") && id.len() == 35, "{id}");
    }

    #[test]
    fn numbers_are_integers_when_integral() {
        assert_eq!(num(86.0), json!(86));
        assert_eq!(num(37.5), json!(37.5));
        assert_eq!(num(-0.0), json!(0));
        assert_eq!(num(f64::NAN), Json::Null);
        assert_eq!(num(1e300), json!(1e300));
    }
}
