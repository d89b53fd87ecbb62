//! The alert book (issue 17, SPEC 5.2): acknowledgement and re-escalation of a device's
//! open clinical alerts, the same whatever opened them (a rule, a device alarm, silence).
//!
//! Per open clinical alert the book keeps its severity, state (`open`, `acknowledged`,
//! `escalated`), escalation level, the bridge-clock time it was last sent, the ack and
//! the body last sent, so a re-send is the alert as the subscribers know it with a new
//! `state`. Pure: every function takes the bridge's time.
//!
//! - an ack sets `acknowledged` and re-sends the body with `"ack": {"by", "at"}`;
//! - an escalation from the source (worse, persisting) clears the ack: it needs a new one;
//! - past `last sent + ack time(severity)` without an ack, [`Book::due`] re-sends it as
//!   `escalated`, `"reason": "unacknowledged"`, `escalation_level` one higher;
//! - a resolution removes it; its id stays in a short list of resolved ids (so an ack of
//!   it is refused as `resolved`, not `unknown_alert`).
//!
//! Bounded: at most one entry per open alert of the device (rules, alarm codes capped in
//! `alarm`, one silence alert) and [`RESOLVED_KEPT`] resolved ids.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};
use vitalmq_policies::{Alerting, Severity};

use crate::normalize::rfc3339_ms;

/// Resolved alert ids a device remembers.
pub const RESOLVED_KEPT: usize = 16;

/// Where an open clinical alert is, as far as its recipients are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BookState {
    Open,
    Acknowledged,
    Escalated,
}

/// Who acknowledged, when (bridge clock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckBy {
    /// SPIFFE id of the acknowledger.
    pub by: String,
    pub at_ms: u64,
}

/// One open clinical alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub severity: Severity,
    pub state: BookState,
    #[serde(default)]
    pub level: u32,
    /// Bridge clock, ms.
    pub last_sent_ms: u64,
    /// Bridge clock, ms, when it opened.
    #[serde(default)]
    pub opened_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack: Option<AckBy>,
    /// The rule (`spo2-low`, `device-alarm:<code>`, `no-data`).
    #[serde(default)]
    pub rule: String,
    pub topic: String,
    /// The JSON last sent.
    pub body: String,
}

/// A device's open clinical alerts by id, and its recently resolved ids.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Book {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) open: BTreeMap<String, Entry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) resolved: Vec<String>,
}

/// One alert message on its way to the store and the handlers.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub alert_id: String,
    /// `open`, `acknowledged`, `escalated`, `resolved`.
    pub state: String,
    /// `clinical` or `operational`.
    pub kind: &'static str,
    pub topic: String,
    pub device: String,
    pub rule: Option<String>,
    /// Clinical alerts only.
    pub severity: Option<Severity>,
    pub body: String,
    /// The escalation level it is delivered at.
    pub level: u32,
}

/// What an ack found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckOutcome {
    /// Applied; the re-sent alert follows.
    Applied,
    /// Already acknowledged: nothing re-sent.
    AlreadyAcknowledged,
    /// Resolved earlier: refused.
    Resolved,
    /// Not this device's: refused.
    Unknown,
}

/// Sets (or removes, for `None`) one field of a JSON object body.
fn edit(body: &str, fields: &[(&str, Option<Json>)]) -> String {
    let Ok(Json::Object(mut m)) = serde_json::from_str::<Json>(body) else {
        return body.to_owned();
    };
    for (k, v) in fields {
        match v {
            Some(v) => {
                m.insert((*k).to_owned(), v.clone());
            }
            None => {
                m.remove(*k);
            }
        }
    }
    Json::Object(m).to_string()
}

impl Book {
    /// Whether the book holds the alert open.
    #[cfg(test)]
    pub fn get(&self, alert_id: &str) -> Option<&Entry> {
        self.open.get(alert_id)
    }

    pub fn entries(&self) -> impl Iterator<Item = (&String, &Entry)> {
        self.open.iter()
    }

    pub fn was_resolved(&self, alert_id: &str) -> bool {
        self.resolved.iter().any(|r| r == alert_id)
    }

    /// Records a clinical change the source (rules, alarm, silence) emits; sets its
    /// level and, once the alert was escalated for want of an ack, its
    /// `escalation_level`.
    pub fn record(&mut self, out: &mut Outgoing, now_ms: u64) {
        let Some(severity) = out.severity else {
            return;
        };
        match out.state.as_str() {
            "open" => {
                self.open.insert(
                    out.alert_id.clone(),
                    Entry {
                        severity,
                        state: BookState::Open,
                        level: 0,
                        last_sent_ms: now_ms,
                        opened_ms: now_ms,
                        ack: None,
                        rule: out.rule.clone().unwrap_or_default(),
                        topic: out.topic.clone(),
                        body: out.body.clone(),
                    },
                );
                self.resolved.retain(|r| r != &out.alert_id);
            }
            "escalated" => {
                let e = self
                    .open
                    .entry(out.alert_id.clone())
                    .or_insert_with(|| Entry {
                        severity,
                        state: BookState::Escalated,
                        level: 0,
                        last_sent_ms: now_ms,
                        opened_ms: now_ms,
                        ack: None,
                        rule: out.rule.clone().unwrap_or_default(),
                        topic: out.topic.clone(),
                        body: String::new(),
                    });
                if e.level > 0 {
                    out.body = edit(&out.body, &[("escalation_level", Some(json!(e.level)))]);
                }
                out.level = e.level;
                e.severity = severity;
                e.state = BookState::Escalated;
                e.ack = None;
                e.last_sent_ms = now_ms;
                e.topic.clone_from(&out.topic);
                e.body.clone_from(&out.body);
            }
            "resolved" => {
                if let Some(e) = self.open.remove(&out.alert_id) {
                    out.level = e.level;
                    if e.level > 0 {
                        out.body = edit(&out.body, &[("escalation_level", Some(json!(e.level)))]);
                    }
                }
                self.resolved.retain(|r| r != &out.alert_id);
                if self.resolved.len() >= RESOLVED_KEPT {
                    self.resolved.remove(0);
                }
                self.resolved.push(out.alert_id.clone());
            }
            _ => {}
        }
    }

    /// Applies an acknowledgement by `by` at `now_ms`.
    pub fn acknowledge(
        &mut self,
        alert_id: &str,
        by: &str,
        device: &str,
        now_ms: u64,
    ) -> (AckOutcome, Option<Outgoing>) {
        let Some(e) = self.open.get_mut(alert_id) else {
            let outcome = if self.was_resolved(alert_id) {
                AckOutcome::Resolved
            } else {
                AckOutcome::Unknown
            };
            return (outcome, None);
        };
        if e.state == BookState::Acknowledged {
            return (AckOutcome::AlreadyAcknowledged, None);
        }
        e.state = BookState::Acknowledged;
        e.ack = Some(AckBy {
            by: by.to_owned(),
            at_ms: now_ms,
        });
        e.last_sent_ms = now_ms;
        // `reason` "unacknowledged" no longer holds; any other reason (a silence's) does.
        let unacked =
            serde_json::from_str::<Json>(&e.body).is_ok_and(|b| b["reason"] == "unacknowledged");
        let mut fields = vec![
            ("state", Some(json!("acknowledged"))),
            ("ack", Some(json!({"by": by, "at": rfc3339_ms(now_ms)}))),
        ];
        if unacked {
            fields.push(("reason", None));
        }
        e.body = edit(&e.body, &fields);
        let out = Outgoing {
            alert_id: alert_id.to_owned(),
            state: "acknowledged".into(),
            kind: "clinical",
            topic: e.topic.clone(),
            device: device.to_owned(),
            rule: Some(e.rule.clone()),
            severity: Some(e.severity),
            body: e.body.clone(),
            level: e.level,
        };
        (AckOutcome::Applied, Some(out))
    }

    /// The bridge-clock time of the book's next re-escalation, if any.
    pub fn next_due_ms(&self, policy: &Alerting) -> Option<u64> {
        self.open
            .values()
            .filter(|e| e.state != BookState::Acknowledged)
            .filter_map(|e| {
                let s = policy.ack_after_s(e.severity)?;
                Some(e.last_sent_ms.saturating_add(s.saturating_mul(1000)))
            })
            .min()
    }

    /// Re-sends every alert not acknowledged within its severity's time.
    pub fn due(&mut self, policy: &Alerting, device: &str, now_ms: u64) -> Vec<Outgoing> {
        let mut out = Vec::new();
        for (id, e) in &mut self.open {
            if e.state == BookState::Acknowledged {
                continue;
            }
            let Some(s) = policy.ack_after_s(e.severity) else {
                continue;
            };
            if now_ms < e.last_sent_ms.saturating_add(s.saturating_mul(1000)) {
                continue;
            }
            e.level = e.level.saturating_add(1);
            e.state = BookState::Escalated;
            e.last_sent_ms = now_ms;
            e.body = edit(
                &e.body,
                &[
                    ("state", Some(json!("escalated"))),
                    ("reason", Some(json!("unacknowledged"))),
                    ("escalation_level", Some(json!(e.level))),
                    ("ack", None),
                ],
            );
            out.push(Outgoing {
                alert_id: id.clone(),
                state: "escalated".into(),
                kind: "clinical",
                topic: e.topic.clone(),
                device: device.to_owned(),
                rule: Some(e.rule.clone()),
                severity: Some(e.severity),
                body: e.body.clone(),
                level: e.level,
            });
        }
        out
    }
}
