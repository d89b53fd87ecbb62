//! What happens to an alert after it is raised, and the alerts that no reading raises
//! (issue 17, SPEC 5.1 and 5.2): acknowledgement times per severity, handlers per
//! escalation level, silence (`no-data`) times, the mapping of device alarm levels to
//! severities, and the low-battery threshold. Since issue 18 also how long an alert
//! message stays deliverable ([`Alerting::expiry_after_s`], `[alert_expiry]`).
//!
//! Every section is optional; without it the SPEC defaults apply ([`Alerting::default`]).

use std::collections::{BTreeMap, BTreeSet};

use toml::Spanned;
use vitalmq_envelope::DeviceId;

use super::raw::{
    RawAcknowledge, RawAlarms, RawAlertExpiry, RawBattery, RawEscalationLevels, RawSilence,
};
use super::{MAX_SECONDS, Severity};
use crate::error::Problems;
use crate::registry::SiteId;

/// Largest silence interval factor.
const MAX_FACTOR: f64 = 1000.0;
/// Most escalation levels a policy may name.
const MAX_LEVELS: usize = 16;

/// The validated alert-handling policy.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Alerting {
    /// Acknowledgement time per severity (info, review, urgent), seconds; `None` = never.
    pub ack_s: [Option<u64>; 3],
    /// Handler names per escalation level; empty = every handler at every level.
    pub levels: Vec<Vec<String>>,
    pub silence: SilencePolicy,
    /// Device alarm level -> severity, per site; a site or level not listed maps to
    /// itself.
    pub alarm_map: BTreeMap<SiteId, BTreeMap<Severity, Severity>>,
    pub battery: BatteryPolicy,
    /// Message Expiry Interval per severity (info, review, urgent), seconds; `None` =
    /// the message never expires. See [`Alerting::expiry_after_s`].
    pub expiry_s: [Option<u64>; 3],
}

impl Default for Alerting {
    fn default() -> Self {
        Self {
            ack_s: [None, Some(1800), Some(300)],
            levels: Vec::new(),
            silence: SilencePolicy::default(),
            alarm_map: BTreeMap::new(),
            battery: BatteryPolicy::default(),
            expiry_s: [None; 3],
        }
    }
}

/// When a device that sends nothing is a patient who is not monitored.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SilencePolicy {
    /// Seconds without an accepted message; default 300.
    pub after_s: u64,
    /// When a device reported `interval_s`, its silence time is at least
    /// `interval_factor x interval_s`; default 3.
    pub interval_factor: f64,
    /// Severity of a `no-data` alert; default urgent (a patient who is not monitored).
    pub severity: Severity,
    pub by_site: BTreeMap<SiteId, u64>,
    /// By cohort name (the cohort's devices resolved at load).
    pub by_cohort: Vec<(String, BTreeSet<DeviceId>, u64)>,
}

impl Default for SilencePolicy {
    fn default() -> Self {
        Self {
            after_s: 300,
            interval_factor: 3.0,
            severity: Severity::Urgent,
            by_site: BTreeMap::new(),
            by_cohort: Vec::new(),
        }
    }
}

impl SilencePolicy {
    /// The silence time of a device: its cohort's, else its site's, else the default;
    /// raised to `interval_factor x interval_s` when the device reports a slower interval.
    pub fn after_s(&self, device: &DeviceId, site: &SiteId, interval_s: Option<u64>) -> u64 {
        let configured = self
            .by_cohort
            .iter()
            .find(|(_, d, _)| d.contains(device))
            .map(|(_, _, s)| *s)
            .or_else(|| self.by_site.get(site).copied())
            .unwrap_or(self.after_s);
        let reported = interval_s.map_or(0.0, |i| (i as f64 * self.interval_factor).ceil());
        // Bounded by MAX_SECONDS, so the conversion is exact.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let reported = reported.min(MAX_SECONDS as f64) as u64;
        configured.max(reported)
    }
}

/// The low-battery operational alert: raised below `low_below` while not charging,
/// resolved at `resolve_at` or above, or when charging.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct BatteryPolicy {
    pub low_below: f64,
    pub resolve_at: f64,
}

impl Default for BatteryPolicy {
    fn default() -> Self {
        Self {
            low_below: 0.15,
            resolve_at: 0.25,
        }
    }
}

impl Alerting {
    /// Seconds an alert of `severity` may stay unacknowledged; `None` = never re-sent.
    pub fn ack_after_s(&self, severity: Severity) -> Option<u64> {
        self.ack_s[severity as usize]
    }

    /// Seconds an alert message of `severity` stays deliverable once the bridge made it
    /// (the MQTT 5 Message Expiry Interval it is published with, less the time it
    /// already waited); `None` = it never expires (the default for every severity).
    ///
    /// The expiry is per message: every state change (open, escalated, acknowledged,
    /// resolved) is its own message on the topic of the severity it carries, measured
    /// from when that change was made. So a later change is not cut short by the age of
    /// the episode, an escalation to a severity without expiry does not expire, and a
    /// receiver may get a change (e.g. `resolved`) of an alert whose `open` expired
    /// unseen; each message carries the whole alert (SPEC section 5), so it stands alone.
    pub fn expiry_after_s(&self, severity: Severity) -> Option<u64> {
        self.expiry_s[severity as usize]
    }

    /// The severity of a device alarm of `level` at `site`.
    pub fn alarm_severity(&self, site: &SiteId, level: Severity) -> Severity {
        self.alarm_map
            .get(site)
            .and_then(|m| m.get(&level))
            .copied()
            .unwrap_or(level)
    }

    /// The handlers of `level`; `None` means every handler. Levels beyond the last named
    /// use the last.
    pub fn handlers_for_level(&self, level: u32) -> Option<&[String]> {
        let last = self.levels.len().checked_sub(1)?;
        let i = usize::try_from(level).unwrap_or(usize::MAX).min(last);
        self.levels.get(i).map(Vec::as_slice)
    }

    /// Every handler name the policy references.
    pub fn handler_names(&self) -> BTreeSet<&str> {
        self.levels.iter().flatten().map(String::as_str).collect()
    }
}

/// Whether `name` is a handler name: `mqtt` or `webhook:<name>`.
fn is_handler_name(name: &str) -> bool {
    name == "mqtt"
        || name
            .strip_prefix("webhook:")
            .is_some_and(|n| super::check_name(n, 64).is_ok())
}

pub(super) struct RawAlerting<'a> {
    pub(super) acknowledge: Option<&'a Spanned<RawAcknowledge>>,
    pub(super) escalation: Option<&'a Spanned<RawEscalationLevels>>,
    pub(super) silence: Option<&'a Spanned<RawSilence>>,
    pub(super) alarms: Option<&'a Spanned<RawAlarms>>,
    pub(super) battery: Option<&'a Spanned<RawBattery>>,
    pub(super) alert_expiry: Option<&'a Spanned<RawAlertExpiry>>,
}

pub(super) fn validate_alerting(
    raw: &RawAlerting<'_>,
    cohorts: &BTreeMap<String, BTreeSet<DeviceId>>,
    problems: &mut Problems<'_>,
) -> Alerting {
    let mut out = Alerting::default();
    let secs = |v: &Spanned<u64>, field: String, problems: &mut Problems<'_>| {
        if *v.get_ref() > MAX_SECONDS {
            problems.add(
                Some(v.span()),
                field,
                format!("must be at most {MAX_SECONDS}"),
            );
        }
        (*v.get_ref()).min(MAX_SECONDS)
    };
    if let Some(a) = raw.acknowledge.map(Spanned::get_ref) {
        for (sev, v, name) in [
            (Severity::Info, &a.info_s, "info_s"),
            (Severity::Review, &a.review_s, "review_s"),
            (Severity::Urgent, &a.urgent_s, "urgent_s"),
        ] {
            if let Some(v) = v {
                let s = secs(v, format!("acknowledge.{name}"), problems);
                out.ack_s[sev as usize] = (s > 0).then_some(s);
            }
        }
    }
    if let Some(a) = raw.alert_expiry.map(Spanned::get_ref) {
        for (sev, v, name) in [
            (Severity::Info, &a.info_s, "info_s"),
            (Severity::Review, &a.review_s, "review_s"),
            (Severity::Urgent, &a.urgent_s, "urgent_s"),
        ] {
            if let Some(v) = v {
                let field = format!("alert_expiry.{name}");
                if *v.get_ref() == 0 {
                    // 0 would read as "expires at once" to some and "never" to others:
                    // neither is stated by writing it.
                    problems.add(
                        Some(v.span()),
                        field,
                        "must be at least 1 (leave the severity out for no expiry)",
                    );
                } else {
                    out.expiry_s[sev as usize] = Some(secs(v, field, problems));
                }
            }
        }
    }
    if let Some(e) = raw.escalation.map(Spanned::get_ref) {
        let levels = e.levels.get_ref();
        if levels.is_empty() || levels.len() > MAX_LEVELS {
            problems.add(
                Some(e.levels.span()),
                "escalation.levels",
                format!("name between 1 and {MAX_LEVELS} levels"),
            );
        }
        for (i, level) in levels.iter().enumerate() {
            let field = format!("escalation.levels[{i}]");
            if level.get_ref().is_empty() {
                problems.add(
                    Some(level.span()),
                    field.clone(),
                    "a level names at least one handler",
                );
            }
            let mut names = Vec::new();
            for (j, name) in level.get_ref().iter().enumerate() {
                let n = name.get_ref();
                if !is_handler_name(n) {
                    problems.add(
                        Some(name.span()),
                        format!("{field}[{j}]"),
                        format!("`{n}` is not a handler name (`mqtt` or `webhook:<name>`)"),
                    );
                } else if names.contains(n) {
                    problems.add(
                        Some(name.span()),
                        format!("{field}[{j}]"),
                        format!("`{n}` is named twice"),
                    );
                } else {
                    names.push(n.clone());
                }
            }
            out.levels.push(names);
        }
    }
    if let Some(s) = raw.silence.map(Spanned::get_ref) {
        let positive = |v: &Spanned<u64>, field: String, problems: &mut Problems<'_>| {
            if *v.get_ref() == 0 {
                problems.add(Some(v.span()), field.clone(), "must be at least 1");
            }
            secs(v, field, problems).max(1)
        };
        if let Some(v) = &s.after_s {
            out.silence.after_s = positive(v, "silence.after_s".into(), problems);
        }
        if let Some(f) = &s.interval_factor {
            let v = *f.get_ref();
            if !(v.is_finite() && (1.0..=MAX_FACTOR).contains(&v)) {
                problems.add(
                    Some(f.span()),
                    "silence.interval_factor",
                    format!("must be between 1 and {MAX_FACTOR}"),
                );
            } else {
                out.silence.interval_factor = v;
            }
        }
        if let Some(sev) = &s.severity {
            match Severity::parse(sev.get_ref()) {
                Some(v) => out.silence.severity = v,
                None => problems.add(
                    Some(sev.span()),
                    "silence.severity",
                    "a severity is info, review or urgent",
                ),
            }
        }
        for (site, v) in &s.sites {
            let field = format!("silence.sites.{}", site.get_ref());
            let after = positive(v, field.clone(), problems);
            match SiteId::new(site.get_ref().clone()) {
                Ok(id) => {
                    out.silence.by_site.insert(id, after);
                }
                Err(e) => problems.add(Some(site.span()), field, e.to_string()),
            }
        }
        for (cohort, v) in &s.cohorts {
            let field = format!("silence.cohorts.{}", cohort.get_ref());
            let after = positive(v, field.clone(), problems);
            match cohorts.get(cohort.get_ref()) {
                Some(devices) => {
                    if let Some((other, _, _)) = out
                        .silence
                        .by_cohort
                        .iter()
                        .find(|(_, d, _)| !d.is_disjoint(devices))
                    {
                        problems.add(
                            Some(cohort.span()),
                            field.clone(),
                            format!("shares a device with cohort `{other}`, which also sets a silence time"),
                        );
                    }
                    out.silence
                        .by_cohort
                        .push((cohort.get_ref().clone(), devices.clone(), after));
                }
                None => problems.add(
                    Some(cohort.span()),
                    field,
                    format!("no cohort `{}` under [cohorts]", cohort.get_ref()),
                ),
            }
        }
    }
    if let Some(a) = raw.alarms.map(Spanned::get_ref) {
        for (site, map) in &a.sites {
            let field = format!("alarms.sites.{}", site.get_ref());
            let mut levels = BTreeMap::new();
            for (from, to) in map.get_ref() {
                let f = format!("{field}.{}", from.get_ref());
                match (
                    Severity::parse(from.get_ref()),
                    Severity::parse(to.get_ref()),
                ) {
                    (Some(a), Some(b)) => {
                        levels.insert(a, b);
                    }
                    (None, _) => problems.add(
                        Some(from.span()),
                        f,
                        "a device level is info, review or urgent",
                    ),
                    (_, None) => {
                        problems.add(Some(to.span()), f, "a severity is info, review or urgent")
                    }
                }
            }
            match SiteId::new(site.get_ref().clone()) {
                Ok(id) => {
                    out.alarm_map.insert(id, levels);
                }
                Err(e) => problems.add(Some(site.span()), field, e.to_string()),
            }
        }
    }
    if let Some(b) = raw.battery.map(Spanned::get_ref) {
        let mut fraction = |v: &Option<Spanned<f64>>, name: &str, slot: &mut f64| {
            if let Some(v) = v {
                let x = *v.get_ref();
                if x.is_finite() && (0.0..=1.0).contains(&x) {
                    *slot = x;
                } else {
                    problems.add(
                        Some(v.span()),
                        format!("battery.{name}"),
                        "must be between 0 and 1",
                    );
                }
            }
        };
        let mut low = out.battery.low_below;
        let mut resolve = None;
        fraction(&b.low_below, "low_below", &mut low);
        let mut r = f64::NAN;
        fraction(&b.resolve_at, "resolve_at", &mut r);
        if !r.is_nan() {
            resolve = Some(r);
        }
        // Without resolve_at, the default hysteresis (0.1) above the threshold.
        let resolve = resolve.unwrap_or((low + 0.1).min(1.0));
        if resolve <= low && low < 1.0 {
            let span = b
                .resolve_at
                .as_ref()
                .or(b.low_below.as_ref())
                .map(Spanned::span);
            problems.add(
                span,
                "battery.resolve_at",
                "must be above low_below (hysteresis)",
            );
        }
        out.battery = BatteryPolicy {
            low_below: low,
            resolve_at: resolve,
        };
    }
    out
}
