//! Silence (SPEC 5.1): a registered device from which nothing was accepted for the
//! policy's silence time, on the bridge's clock, opens a clinical `no-data` alert; the
//! next accepted message resolves it. Pure: the caller gives the time and whether the
//! device counts as connected.
//!
//! ```text
//!   watching --(now >= since + after_s)--> OPEN (reason offline | silent | refused)
//!      ^                                     |
//!      +-------(a message is accepted)--- RESOLVED
//! ```
//!
//! `since` is the last accepted message's reception, else the time the bridge started
//! watching a device never seen (persisted, so a restart does not reset its clock). The
//! reason is decided when it opens: `refused` if messages arrived since the last
//! accepted one and were all refused (with the newest refusal's class), else `silent`
//! when the device (or a gateway of its site) is connected, else `offline`.
//!
//! Only a device assigned to a patient now (the assignment in force at the bridge's
//! clock) is watched, and its alerts name that assignment's patient and site (issue
//! 19); an episode keeps the patient and site it opened for, and its resolution
//! (`data_resumed` or `unassigned`) names those. When the watched assignment ends (unassigned, retired or reassigned), an open
//! episode is resolved with reason `unassigned` naming the patient it was about
//! ([`SilenceState::on_unassigned`]), and the watch starts over for the next assignment,
//! if any. SPEC 5.1 names no reason for a resolution; `data_resumed` and `unassigned`
//! are ours.

use serde::{Deserialize, Serialize};
use serde_json::json;
use vitalmq_envelope::DeviceId;
use vitalmq_policies::{Alerting, DeviceEntry, Severity, SiteId};

use super::book::Outgoing;
use super::message::alert_id;
use crate::normalize::rfc3339_ms;

/// The rule name of silence alerts.
pub const NO_DATA_RULE: &str = "no-data";
/// The `reason` of a silence alert resolved by accepted data.
pub const RESOLVED_DATA_RESUMED: &str = "data_resumed";
/// The `reason` of a silence alert resolved because the assignment it was about ended.
pub const RESOLVED_UNASSIGNED: &str = "unassigned";

/// An open silence alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SilenceEpisode {
    pub alert_id: String,
    pub severity: Severity,
    /// `offline`, `silent` or `refused`.
    pub reason: String,
    pub opened_ms: u64,
    /// The patient and site the episode was about (the assignment in force when it
    /// opened): its resolution names them, whatever the registry says by then. `None`
    /// in states saved before they were kept: the device as the caller gives it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient_ref: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<SiteId>,
}

/// What the bridge knows about a device's silence.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SilenceState {
    /// When the bridge began watching a device it had not heard from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch_since_ms: Option<u64>,
    /// Reception time of the last accepted message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_ms: Option<u64>,
    /// The class of the newest refusal since the last accepted message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Refusals since the last accepted message.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub refused_count: u64,
    /// The interval the device reports (`status.interval_s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open: Option<SilenceEpisode>,
    /// Start (`from`, Unix ms) of the assignment being watched, so that its end or a
    /// reassignment is noticed; `None` until a tick has seen the device assigned (and in
    /// states saved before it was kept: the assignment in force is then adopted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignment_from: Option<u64>,
}

/// What a silence message says happened: the episode opened, or it was resolved for
/// the given reason.
#[derive(Debug, Clone, Copy)]
enum Change {
    Opened,
    Resolved(&'static str),
}
use Change::{Opened, Resolved};

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl SilenceState {
    /// From when silence is measured; `None` until the device is watched.
    pub fn since_ms(&self) -> Option<u64> {
        self.last_seen_ms.or(self.watch_since_ms)
    }

    /// Starts watching a device never heard from; true if this changed the state.
    pub fn watch(&mut self, now_ms: u64) -> bool {
        if self.since_ms().is_some() {
            return false;
        }
        self.watch_since_ms = Some(now_ms);
        true
    }

    /// When the alert opens if nothing arrives, or `None` while one is open.
    pub fn deadline_ms(&self, policy: &Alerting, device: &DeviceId, site: &SiteId) -> Option<u64> {
        if self.open.is_some() {
            return None;
        }
        let after = policy.silence.after_s(device, site, self.interval_s);
        Some(self.since_ms()?.saturating_add(after.saturating_mul(1000)))
    }

    /// An accepted message at `now_ms`: resolves an open alert.
    pub fn on_accepted(
        &mut self,
        policy_sha256: &str,
        entry: &DeviceEntry,
        now_ms: u64,
    ) -> Option<Outgoing> {
        let out = self.open.take().map(|ep| {
            let state = Resolved(RESOLVED_DATA_RESUMED);
            self.message(policy_sha256, entry, &ep, state, None, now_ms)
        });
        self.last_seen_ms = Some(now_ms);
        self.refused = None;
        self.refused_count = 0;
        out
    }

    /// The watched assignment ended at the bridge's `now_ms` (the device is unassigned,
    /// retired or reassigned): resolves an open episode, naming `entry` (the device as
    /// the ended assignment had it), and forgets the watch, so nothing measured under
    /// that assignment (last message, refusals) carries over to the next one.
    pub fn on_unassigned(
        &mut self,
        policy_sha256: &str,
        entry: &DeviceEntry,
        now_ms: u64,
    ) -> Option<Outgoing> {
        let out = self.open.take().map(|ep| {
            let state = Resolved(RESOLVED_UNASSIGNED);
            self.message(policy_sha256, entry, &ep, state, None, now_ms)
        });
        *self = Self {
            interval_s: self.interval_s,
            ..Self::default()
        };
        out
    }

    /// A refused message at `now_ms`.
    pub fn on_refused(&mut self, class: &str) {
        self.refused = Some(class.to_owned());
        self.refused_count = self.refused_count.saturating_add(1);
    }

    /// The passing of time: opens the alert once the device has been silent too long.
    pub fn on_tick(
        &mut self,
        policy: &Alerting,
        policy_sha256: &str,
        entry: &DeviceEntry,
        connected: bool,
        now_ms: u64,
    ) -> Option<Outgoing> {
        let deadline = self.deadline_ms(policy, &entry.id, &entry.site)?;
        if now_ms < deadline {
            return None;
        }
        let reason = if self.refused.is_some() {
            "refused"
        } else if connected {
            "silent"
        } else {
            "offline"
        };
        let opened_from = format!("silence@{}", self.since_ms().unwrap_or(0));
        let ep = SilenceEpisode {
            alert_id: alert_id(&entry.id, NO_DATA_RULE, &opened_from),
            severity: policy.silence.severity,
            reason: reason.to_owned(),
            opened_ms: now_ms,
            patient_ref: Some(entry.patient_ref.clone()),
            site: Some(entry.site.clone()),
        };
        let expected = policy
            .silence
            .after_s(&entry.id, &entry.site, self.interval_s);
        let out = self.message(policy_sha256, entry, &ep, Opened, Some(expected), now_ms);
        self.open = Some(ep);
        Some(out)
    }

    fn message(
        &self,
        policy_sha256: &str,
        entry: &DeviceEntry,
        ep: &SilenceEpisode,
        change: Change,
        expected: Option<u64>,
        now_ms: u64,
    ) -> Outgoing {
        let (state, reason) = match change {
            Opened => ("open", ep.reason.as_str()),
            Resolved(why) => ("resolved", why),
        };
        let site = ep.site.as_ref().unwrap_or(&entry.site);
        let patient_ref = ep.patient_ref.as_ref().unwrap_or(&entry.patient_ref);
        let mut body = json!({
            "alert_id": ep.alert_id,
            "kind": "clinical",
            "state": state,
            "severity": ep.severity.as_str(),
            "rule": NO_DATA_RULE,
            "rule_version": "1",
            "policy_sha256": policy_sha256,
            "device": entry.id.as_str(),
            "site": site.as_str(),
            "patient_ref": patient_ref,
            "metric": null,
            "value": null,
            "threshold": null,
            "window_s": now_ms.saturating_sub(self.since_ms().unwrap_or(now_ms)) / 1000,
            "evidence": [],
            "fw": null,
            "model": null,
            "raised_at": rfc3339_ms(now_ms),
            "reason": reason,
            "last_seen_at": self.last_seen_ms.and_then(rfc3339_ms),
        });
        if let Some(after) = expected {
            body["expected_interval_s"] = json!(self.interval_s.unwrap_or(after));
            body["silence_after_s"] = json!(after);
        }
        if state != "resolved" && ep.reason == "refused" {
            body["refusal"] = json!(self.refused);
            body["refused_count"] = json!(self.refused_count);
        }
        // Kept apart from `reason`, which a re-send for want of an ack overwrites.
        body["silence_reason"] = json!(ep.reason);
        Outgoing {
            alert_id: ep.alert_id.clone(),
            state: state.to_owned(),
            kind: "clinical",
            topic: format!("alerts/{}/{}/{}", site, ep.severity, entry.id),
            device: entry.id.to_string(),
            rule: Some(NO_DATA_RULE.to_owned()),
            severity: Some(ep.severity),
            body: body.to_string(),
            level: 0,
        }
    }
}
