//! What "anonymized" leaves of a normalized event or an alert (retention's `anonymize`).
//!
//! An anonymized event keeps the measurements and what is needed to use them in
//! aggregate, and nothing that links it to a patient, a device or a single message:
//!
//! * kept: `format`, `site`, `type`, `m` (the measurements), `q` (their quality),
//!   `schema`, `model`, `implausible`;
//! * coarsened: `observed_at`, to the start of its UTC hour (RFC 3339);
//! * dropped: `event_id` (a hash of device, epoch and seq: recomputable from the
//!   device), `device`, `patient_ref`, `epoch`, `seq`, `ts` (the device clock, exact to
//!   the millisecond), `received_at`, `fw`, `extra` (payload keys nobody vetted),
//!   `provenance` (names the device, its key and the message hash), `clock_skew`;
//! * added: `"anonymized": "vitalmq-anonymize/1"`.
//!
//! The raw COSE bytes cannot be anonymized (they are signed and name the device):
//! anonymizing an event purges them, and blanks what its raw row says of the message
//! (broker, publisher, topic, SHA-256: the hash is a lookup key back to the message).
//!
//! An anonymized alert (every state change of one alert together, see
//! `super::plan::alert`) keeps the clinical facts of the change and nothing that
//! links it to a patient, a device, a reading or the other alerts of its patient:
//!
//! * kept: `kind`, `state`, `severity`, `rule`, `rule_version`, `policy_sha256`,
//!   `site`, `metric`, `value`, `threshold`, `window_s`, `measure`, `measured`,
//!   `baseline`, `escalation`, `reason`, `suppressed`, `suppressed_reasons`, and of an
//!   operational alert `component`, `type`, `implausible`, `metrics`,
//!   `resolve_after`, `low_quality`, `over_n`, `low_below`;
//! * replaced: `alert_id` (a hash of device, rule and opening event) by
//!   `anon-a<position of the alert's first state>`, the same for all its states;
//! * coarsened: `raised_at`, to the start of its UTC hour;
//! * dropped: `patient_ref`, `device`, `evidence` (event ids), `fw`, `model`, and any
//!   field not listed above;
//! * added: `"anonymized": "vitalmq-anonymize/1"`.
//!
//! Its row loses `device` and `patient_ref`, its topic the device level
//! (`alerts/{site}/{severity}`, see [`alert_topic`]) and its `created_at_ms` is
//! coarsened to the hour.

use serde_json::{Map, Value};

/// The marker (and version) of an anonymized record.
pub const ANONYMIZED: &str = "vitalmq-anonymize/1";

/// The event fields an anonymized event keeps as they are.
const KEPT: &[&str] = &[
    "format",
    "site",
    "type",
    "m",
    "q",
    "schema",
    "model",
    "implausible",
];

/// The alert fields an anonymized alert keeps as they are (clinical, then operational).
const ALERT_KEPT: &[&str] = &[
    "kind",
    "state",
    "severity",
    "rule",
    "rule_version",
    "policy_sha256",
    "site",
    "metric",
    "value",
    "threshold",
    "window_s",
    "measure",
    "measured",
    "baseline",
    "escalation",
    "reason",
    "suppressed",
    "suppressed_reasons",
    "component",
    "type",
    "implausible",
    "metrics",
    "resolve_after",
    "low_quality",
    "over_n",
    "low_below",
];

/// One hour in milliseconds.
pub const HOUR_MS: u64 = 3_600_000;

/// `observed_at_ms` coarsened to the start of its hour.
pub fn hour_of(ms: u64) -> u64 {
    ms - ms % HOUR_MS
}

/// The anonymized form of `json` (a normalized event) observed at `observed_at_ms`;
/// `None` when `json` is not a JSON object.
pub fn event(json: &str, observed_at_ms: u64) -> Option<String> {
    let Value::Object(full) = serde_json::from_str::<Value>(json).ok()? else {
        return None;
    };
    let mut out = Map::new();
    for key in KEPT {
        if let Some(v) = full.get(*key) {
            out.insert((*key).to_owned(), v.clone());
        }
    }
    out.insert(
        "observed_at".to_owned(),
        crate::normalize::rfc3339_ms(hour_of(observed_at_ms)).map_or(Value::Null, Value::String),
    );
    out.insert(
        "anonymized".to_owned(),
        Value::String(ANONYMIZED.to_owned()),
    );
    serde_json::to_string(&Value::Object(out)).ok()
}

/// The anonymized form of an alert body, under its new id `alert_id`; `None` when it
/// is not a JSON object.
pub fn alert(body: &str, alert_id: &str) -> Option<String> {
    let Value::Object(full) = serde_json::from_str::<Value>(body).ok()? else {
        return None;
    };
    let mut out = Map::new();
    out.insert("alert_id".to_owned(), Value::String(alert_id.to_owned()));
    for key in ALERT_KEPT {
        if let Some(v) = full.get(*key) {
            out.insert((*key).to_owned(), v.clone());
        }
    }
    let raised = full
        .get("raised_at")
        .and_then(Value::as_str)
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .and_then(|d| u64::try_from(d.as_millis()).ok())
        .and_then(|ms| crate::normalize::rfc3339_ms(hour_of(ms)));
    if let Some(raised) = raised {
        out.insert("raised_at".to_owned(), Value::String(raised));
    }
    out.insert(
        "anonymized".to_owned(),
        Value::String(ANONYMIZED.to_owned()),
    );
    serde_json::to_string(&Value::Object(out)).ok()
}

/// The score payload fields an anonymized score keeps as they are.
const SCORE_KEPT: &[&str] = &[
    "format",
    "model",
    "version",
    "config_sha256",
    "role",
    "site",
    "aggregate",
    "risk",
    "complete",
    "assessment",
    "red",
    "sub_scores",
    "missing",
];

/// The anonymized form of a score payload (`vitalmq-score/v1`) under its new id:
/// keeps the score and its version facts; `observed_at` coarsened to the hour; drops
/// `patient_ref`, `device`, `alert` and `inputs` (their event ids lead back to the
/// readings; their values are in the anonymized events). `None` when not a JSON object.
pub fn score(json: &str, score_id: &str, observed_at_ms: u64) -> Option<String> {
    let Value::Object(full) = serde_json::from_str::<Value>(json).ok()? else {
        return None;
    };
    let mut out = Map::new();
    out.insert("score_id".to_owned(), Value::String(score_id.to_owned()));
    for key in SCORE_KEPT {
        if let Some(v) = full.get(*key) {
            out.insert((*key).to_owned(), v.clone());
        }
    }
    out.insert(
        "observed_at".to_owned(),
        crate::normalize::rfc3339_ms(hour_of(observed_at_ms)).map_or(Value::Null, Value::String),
    );
    out.insert(
        "anonymized".to_owned(),
        Value::String(ANONYMIZED.to_owned()),
    );
    serde_json::to_string(&Value::Object(out)).ok()
}

/// The topic of an anonymized alert: a clinical alert's `alerts/{site}/{severity}/
/// {device}` without its device level; other topics (`ops/bridge/{type}`) name no
/// device and stay.
pub fn alert_topic(topic: &str) -> String {
    match topic.strip_prefix("alerts/") {
        Some(rest) => {
            let kept: Vec<&str> = rest.split('/').take(2).collect();
            format!("alerts/{}", kept.join("/"))
        }
        None => topic.to_owned(),
    }
}

/// The `patient_ref` a JSON record (event or alert) names, if any.
pub fn patient_ref(json: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Attributed {
        patient_ref: Option<String>,
    }
    serde_json::from_str::<Attributed>(json)
        .ok()
        .and_then(|a| a.patient_ref)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_anonymized_event_keeps_measurements_and_nothing_that_links() {
        let full = json!({
            "format": "vitalmq-event/v1", "event_id": "ev1-00", "device": "dev-1",
            "site": "site-1", "patient_ref": "pt-0123456789abcdef0123456789abcdef",
            "epoch": 1, "seq": 7, "type": "vitals", "ts": 1_700_000_123_456u64,
            "observed_at": "2023-11-14T22:15:23.456Z", "received_at": "2023-11-14T22:15:24Z",
            "m": {"spo2": 97}, "q": {"spo2": "good"}, "fw": "1.0.0", "model": "w1",
            "extra": {"name": "Jane"}, "provenance": {"kid": "dev-1"},
            "implausible": ["hr"], "clock_skew": {"by_ms": 5}
        });
        let out = event(&full.to_string(), 1_700_000_123_456).expect("object");
        let v: Value = serde_json::from_str(&out).expect("json");
        assert_eq!(
            v,
            json!({
                "format": "vitalmq-event/v1", "site": "site-1", "type": "vitals",
                "m": {"spo2": 97}, "q": {"spo2": "good"}, "model": "w1",
                "implausible": ["hr"], "observed_at": "2023-11-14T22:00:00Z",
                "anonymized": ANONYMIZED
            })
        );
        assert_eq!(patient_ref(&out), None);
        assert!(event("[1]", 0).is_none());
    }

    #[test]
    fn an_anonymized_alert_keeps_the_clinical_facts_and_nothing_that_links() {
        let body = json!({
            "alert_id": "al-0123", "kind": "clinical", "state": "escalated",
            "severity": "high", "rule": "spo2-low", "rule_version": "3",
            "policy_sha256": "ab", "device": "dev-00042", "site": "site-01",
            "patient_ref": "pt-0123456789abcdef0123456789abcdef", "metric": "spo2",
            "value": 84, "threshold": 85, "window_s": 30, "evidence": ["ev1-a", "ev1-b"],
            "fw": "1.2.3", "model": "w1", "raised_at": "2026-01-05T10:42:17.123Z",
            "measure": "value", "measured": 84, "escalation": "worse", "note": "free text"
        });
        let v: Value = serde_json::from_str(&alert(&body.to_string(), "anon-a17").expect("object"))
            .expect("json");
        assert_eq!(
            v,
            json!({
                "alert_id": "anon-a17", "kind": "clinical", "state": "escalated",
                "severity": "high", "rule": "spo2-low", "rule_version": "3",
                "policy_sha256": "ab", "site": "site-01", "metric": "spo2", "value": 84,
                "threshold": 85, "window_s": 30, "raised_at": "2026-01-05T10:00:00Z",
                "measure": "value", "measured": 84, "escalation": "worse",
                "anonymized": ANONYMIZED
            })
        );
        let ops = json!({
            "alert_id": "al-9", "kind": "operational", "component": "bridge",
            "type": "sensor_fault", "state": "open", "device": "dev-00042",
            "site": "site-01", "reason": "implausible readings", "implausible": 3,
            "metrics": ["hr"], "resolve_after": 5, "policy_sha256": "ab",
            "evidence": ["ev1-a"], "raised_at": "2026-01-05T10:42:17Z"
        });
        let v: Value = serde_json::from_str(&alert(&ops.to_string(), "anon-a3").expect("object"))
            .expect("json");
        assert_eq!(v["alert_id"], json!("anon-a3"));
        assert_eq!(v["raised_at"], json!("2026-01-05T10:00:00Z"));
        assert!(
            v.get("device").is_none() && v.get("evidence").is_none(),
            "{v}"
        );
        assert_eq!(v["metrics"], json!(["hr"]));
        assert!(alert("[1]", "anon-a1").is_none());
    }

    #[test]
    fn an_anonymized_alert_topic_loses_the_device() {
        assert_eq!(
            alert_topic("alerts/site-01/high/dev-00042"),
            "alerts/site-01/high"
        );
        assert_eq!(
            alert_topic("ops/bridge/sensor_fault"),
            "ops/bridge/sensor_fault"
        );
    }
}
