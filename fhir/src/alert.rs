//! One clinical alert state change (SPEC section 5, 5.1, 5.2) to FHIR R4:
//!
//! - `DetectedIssue` per alert episode (identifier `alert_id`): the finding a versioned
//!   rule established, with its severity, the implicated Device, the patient and the
//!   evidence (the readings' event ids). Created once (conditional create): a finding
//!   does not change when someone acknowledges it.
//! - `Task` per episode, for `urgent` and `review` alerts (those SPEC 5.2 expects to be
//!   acknowledged): the work of responding. Updated on every change (conditional
//!   update): `open` -> requested, `escalated` -> requested with priority `stat`,
//!   `acknowledged` -> accepted (owner = the acknowledger), `resolved` -> completed; the
//!   SPEC state is its `businessStatus`.
//! - `Communication` per state change: the alert message as sent (immutable; so every
//!   change, including each escalation and acknowledgement, stays on record).
//!
//! The Provenance of a change is in [`crate::provenance::alert`].

use serde::Deserialize;
use serde_json::{Value as Json, json};

use crate::ids;

/// `businessStatus` codes: the SPEC alert states.
pub const ALERT_STATE: &str = "urn:vitalmq:alert-state";
/// `DetectedIssue.code`: the rule that raised the alert.
pub const RULE: &str = "urn:vitalmq:rule";

/// One alert state change as published (the alert JSON) and when it was recorded.
#[derive(Debug, Clone)]
pub struct AlertChange {
    pub body: Json,
    /// When the bridge recorded this change (the store row's time).
    pub recorded_at_ms: u64,
}

/// The alert JSON fields the mapping reads.
#[derive(Debug, Clone, Deserialize)]
pub struct AlertBody {
    pub alert_id: String,
    pub kind: String,
    pub state: String,
    pub severity: Option<String>,
    pub rule: Option<String>,
    pub rule_version: Option<String>,
    pub policy_sha256: Option<String>,
    pub device: Option<String>,
    pub site: Option<String>,
    pub patient_ref: Option<String>,
    pub metric: Option<String>,
    pub value: Option<Json>,
    pub threshold: Option<Json>,
    #[serde(default)]
    pub evidence: Vec<String>,
    pub fw: Option<String>,
    pub model: Option<String>,
    pub raised_at: Option<String>,
    pub reason: Option<String>,
    pub escalation_level: Option<u64>,
    pub ack: Option<Ack>,
}

/// SPEC 5.2's `ack`.
#[derive(Debug, Clone, Deserialize)]
pub struct Ack {
    pub by: String,
    pub at: Option<String>,
}

/// The resources of one state change.
#[derive(Debug, Clone)]
pub struct AlertResources {
    pub alert: AlertBody,
    /// Identifier value of the change under [`ids::ALERT_CHANGE`].
    pub change_key: String,
    pub detected_issue: Json,
    pub task: Option<Json>,
    pub communication: Json,
}

/// SPEC states, in the order a change can follow another.
pub const STATES: [&str; 4] = ["open", "escalated", "acknowledged", "resolved"];

impl AlertChange {
    /// Maps the change; operational alerts and unknown states are refused.
    pub fn map(&self) -> Result<AlertResources, crate::Error> {
        let a = AlertBody::deserialize(&self.body).map_err(crate::Error::Alert)?;
        if a.kind != "clinical" {
            return Err(crate::Error::NotClinical {
                alert_id: a.alert_id,
                kind: a.kind,
            });
        }
        if !STATES.contains(&a.state.as_str()) {
            return Err(crate::Error::UnknownState {
                alert_id: a.alert_id,
                state: a.state,
            });
        }
        let at = ids::instant(self.recorded_at_ms)?;
        let change_key = format!("{}/{}/{}", a.alert_id, a.state, self.recorded_at_ms);
        let detected_issue = detected_issue(&a);
        let task = needs_task(&a).then(|| task(&a, &at));
        let communication = communication(&a, &change_key, &at);
        Ok(AlertResources {
            alert: a,
            change_key,
            detected_issue,
            task,
            communication,
        })
    }
}

fn needs_task(a: &AlertBody) -> bool {
    matches!(a.severity.as_deref(), Some("urgent" | "review"))
}

/// DetectedIssue.severity: urgent -> high, review -> moderate, info -> low.
fn issue_severity(severity: Option<&str>) -> &'static str {
    match severity {
        Some("urgent") => "high",
        Some("review") => "moderate",
        _ => "low",
    }
}

/// Request priority: urgent -> stat, review -> urgent, info -> routine; an escalated
/// alert is `stat` whatever its severity (nobody answered in time, or it worsened).
fn priority(a: &AlertBody) -> &'static str {
    match (a.state.as_str(), a.severity.as_deref()) {
        ("escalated", _) | (_, Some("urgent")) => "stat",
        (_, Some("review")) => "urgent",
        _ => "routine",
    }
}

/// One line a clinician reads: rule, severity, state and the numbers; never a direct
/// identifier (the alert carries none).
fn summary(a: &AlertBody) -> String {
    let mut s = format!(
        "{} ({}): {}",
        a.rule.as_deref().unwrap_or("alert"),
        a.severity.as_deref().unwrap_or("info"),
        a.state
    );
    if let (Some(m), Some(v)) = (&a.metric, a.value.as_ref().filter(|v| !v.is_null())) {
        s.push_str(&format!(", {m} {v}"));
        if let Some(t) = a.threshold.as_ref().filter(|t| !t.is_null()) {
            s.push_str(&format!(" (threshold {t})"));
        }
    }
    if let Some(r) = &a.reason {
        s.push_str(&format!(", reason {r}"));
    }
    if let Some(l) = a.escalation_level {
        s.push_str(&format!(", escalation level {l}"));
    }
    s
}

fn subject(a: &AlertBody) -> Option<Json> {
    a.patient_ref.as_deref().map(ids::patient)
}

fn detected_issue(a: &AlertBody) -> Json {
    let rule = a.rule.as_deref().unwrap_or("unknown");
    let mut coding = json!({"system": RULE, "code": rule});
    if let Some(v) = &a.rule_version {
        coding["version"] = v.as_str().into();
    }
    let mut d = json!({
        "resourceType": "DetectedIssue",
        "identifier": [ids::identifier(ids::ALERT, &a.alert_id)],
        "status": "final",
        "code": {"coding": [coding], "text": rule},
        "severity": issue_severity(a.severity.as_deref()),
    });
    if let Some(p) = subject(a) {
        d["patient"] = p;
    }
    if let Some(t) = &a.raised_at {
        d["identifiedDateTime"] = t.as_str().into();
    }
    d["author"] = ids::logical("Device", ids::COMPONENT, "bridge");
    if let Some(dev) = &a.device {
        d["implicated"] = json!([ids::device(dev)]);
    }
    if !a.evidence.is_empty() {
        let refs: Vec<Json> = a
            .evidence
            .iter()
            .map(|e| ids::logical("Observation", ids::EVENT, e))
            .collect();
        d["evidence"] = json!([{"detail": refs}]);
    }
    let mut open = a.clone();
    open.state = "raised".into();
    open.escalation_level = None;
    d["detail"] = summary(&open).into();
    d
}

fn task(a: &AlertBody, at: &str) -> Json {
    let status = match a.state.as_str() {
        "acknowledged" => "accepted",
        "resolved" => "completed",
        _ => "requested",
    };
    let mut t = json!({
        "resourceType": "Task",
        "identifier": [ids::identifier(ids::ALERT, &a.alert_id)],
        "status": status,
        "businessStatus": {"coding": [{"system": ALERT_STATE, "code": a.state}], "text": a.state},
        "intent": "order",
        "priority": priority(a),
        "code": {"text": "acknowledge and respond to the clinical alert"},
        "description": summary(a),
        "focus": ids::local("DetectedIssue", ids::ALERT, &a.alert_id),
    });
    if let Some(p) = subject(a) {
        t["for"] = p;
    }
    if let Some(r) = &a.raised_at {
        t["authoredOn"] = r.as_str().into();
    }
    t["lastModified"] = at.into();
    t["requester"] = ids::logical("Device", ids::COMPONENT, "bridge");
    if let Some(ack) = &a.ack {
        t["owner"] = json!({"identifier": ids::identifier(ids::URI, &ack.by), "display": ack.by});
    }
    t
}

fn communication(a: &AlertBody, change_key: &str, at: &str) -> Json {
    let mut c = json!({
        "resourceType": "Communication",
        "identifier": [
            ids::identifier(ids::ALERT_CHANGE, change_key),
            ids::identifier(ids::ALERT, &a.alert_id),
        ],
        "status": "completed",
        "category": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/communication-category",
            "code": "alert",
            "display": "Alert",
        }]}],
        "priority": priority(a),
    });
    if let Some(p) = subject(a) {
        c["subject"] = p;
    }
    c["about"] = json!([ids::local("DetectedIssue", ids::ALERT, &a.alert_id)]);
    c["sent"] = at.into();
    c["sender"] = ids::logical("Device", ids::COMPONENT, "bridge");
    c["payload"] = json!([{"contentString": summary(a)}]);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn body(state: &str, severity: &str) -> Json {
        let mut b = json!({
            "alert_id": "al-1", "kind": "clinical", "state": state, "severity": severity,
            "rule": "spo2-low", "rule_version": "3", "policy_sha256": "ab12",
            "device": "dev-1", "site": "site-01", "patient_ref": "pt-aaaa1111",
            "metric": "spo2", "value": 86, "threshold": 90, "window_s": 120,
            "evidence": ["ev1-00", "ev1-01"], "fw": "5.12.1", "model": null,
            "raised_at": "2025-11-21T12:00:05Z",
        });
        if state == "acknowledged" {
            b["ack"] = json!({"by": "spiffe://demo.vitalmq/integrator/nurse-1", "at": "2025-11-21T12:01:00Z"});
        }
        if state == "escalated" {
            b["escalation_level"] = json!(1);
            b["reason"] = json!("unacknowledged");
        }
        b
    }

    fn map(state: &str, severity: &str) -> AlertResources {
        AlertChange {
            body: body(state, severity),
            recorded_at_ms: 1_763_726_460_000,
        }
        .map()
        .expect("maps")
    }

    #[test]
    fn every_state_maps_to_its_task_status() {
        for (state, status) in [
            ("open", "requested"),
            ("escalated", "requested"),
            ("acknowledged", "accepted"),
            ("resolved", "completed"),
        ] {
            let r = map(state, "urgent");
            let task = r.task.expect("urgent alerts have a task");
            assert_eq!(task["status"], status, "{state}");
            assert_eq!(task["businessStatus"]["coding"][0]["code"], state);
            assert_eq!(r.communication["status"], "completed");
            assert_eq!(
                r.communication["payload"][0]["contentString"]
                    .as_str()
                    .map(|s| s.contains(state)),
                Some(true)
            );
            assert_eq!(r.change_key, format!("al-1/{state}/1763726460000"));
            // The finding itself does not move with the workflow.
            assert_eq!(r.detected_issue["status"], "final");
            assert_eq!(r.detected_issue["severity"], "high");
        }
        assert_eq!(
            map("escalated", "review").task.expect("task")["priority"],
            "stat"
        );
        assert_eq!(
            map("open", "review").task.expect("task")["priority"],
            "urgent"
        );
    }

    #[test]
    fn acknowledgement_names_the_acknowledger() {
        let task = map("acknowledged", "urgent").task.expect("task");
        assert_eq!(
            task["owner"]["identifier"]["value"],
            "spiffe://demo.vitalmq/integrator/nurse-1"
        );
        assert!(
            map("open", "urgent")
                .task
                .expect("task")
                .get("owner")
                .is_none()
        );
    }

    #[test]
    fn info_alerts_have_no_task_and_low_severity() {
        let r = map("open", "info");
        assert!(r.task.is_none());
        assert_eq!(r.detected_issue["severity"], "low");
        assert_eq!(r.communication["priority"], "routine");
    }

    #[test]
    fn evidence_and_device_are_referenced() {
        let d = map("open", "urgent").detected_issue;
        assert_eq!(
            d["evidence"][0]["detail"][1]["identifier"]["value"],
            "ev1-01"
        );
        assert_eq!(d["implicated"][0]["identifier"]["value"], "dev-1");
        assert_eq!(d["patient"]["identifier"]["system"], ids::PATIENT);
        assert_eq!(d["code"]["coding"][0]["version"], "3");
    }

    #[test]
    fn operational_and_unknown_states_are_refused() {
        let mut b = body("open", "urgent");
        b["kind"] = "operational".into();
        let change = AlertChange {
            body: b,
            recorded_at_ms: 0,
        };
        assert!(matches!(
            change.map(),
            Err(crate::Error::NotClinical { .. })
        ));
        let mut b = body("open", "urgent");
        b["state"] = "snoozed".into();
        let change = AlertChange {
            body: b,
            recorded_at_ms: 0,
        };
        assert!(matches!(
            change.map(),
            Err(crate::Error::UnknownState { .. })
        ));
    }

    #[test]
    fn device_alarm_and_silence_alerts_map() {
        let mut b = body("open", "urgent");
        b["rule"] = "device-alarm:arrhythmia".into();
        b["metric"] = Json::Null;
        b["value"] = Json::Null;
        b["threshold"] = Json::Null;
        let r = AlertChange {
            body: b,
            recorded_at_ms: 1,
        }
        .map()
        .expect("maps");
        assert_eq!(
            r.detected_issue["code"]["coding"][0]["code"],
            "device-alarm:arrhythmia"
        );
        let mut b = body("open", "urgent");
        b["rule"] = "no-data".into();
        b["reason"] = "offline".into();
        b["evidence"] = json!([]);
        let r = AlertChange {
            body: b,
            recorded_at_ms: 1,
        }
        .map()
        .expect("maps");
        assert!(r.detected_issue.get("evidence").is_none());
        assert!(
            r.communication["payload"][0]["contentString"]
                .as_str()
                .is_some_and(|s| s.contains("offline"))
        );
    }
}
