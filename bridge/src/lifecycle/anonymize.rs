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
//! An anonymized alert keeps its body but for `patient_ref`, `device` and `evidence`
//! (event ids), and gets the same `anonymized` marker. The raw COSE bytes cannot be
//! anonymized (they are signed and name the device): anonymizing an event purges them.

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

/// The alert fields an anonymized alert loses.
const ALERT_DROPPED: &[&str] = &["patient_ref", "device", "evidence"];

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

/// The anonymized form of an alert body; `None` when it is not a JSON object.
pub fn alert(body: &str) -> Option<String> {
    let Value::Object(mut full) = serde_json::from_str::<Value>(body).ok()? else {
        return None;
    };
    for key in ALERT_DROPPED {
        full.remove(*key);
    }
    full.insert(
        "anonymized".to_owned(),
        Value::String(ANONYMIZED.to_owned()),
    );
    serde_json::to_string(&Value::Object(full)).ok()
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
    fn an_anonymized_alert_loses_patient_device_and_evidence() {
        let body = json!({"alert_id": "al-1", "patient_ref": "pt-x", "device": "dev-1",
                          "evidence": ["ev1-a"], "rule": "spo2-low"});
        let v: Value =
            serde_json::from_str(&alert(&body.to_string()).expect("object")).expect("json");
        assert_eq!(
            v,
            json!({"alert_id": "al-1", "rule": "spo2-low", "anonymized": ANONYMIZED})
        );
    }
}
