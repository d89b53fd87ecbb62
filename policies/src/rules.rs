//! Alert rules (issue 5, SPEC section 5): which readings open, escalate and resolve a
//! clinical alert, per rule, site and cohort; and when poor signal quality raises an
//! operational alert instead.
//! Since issue 17 (SPEC 5.1, 5.2) also what happens after an alert is sent and the
//! alerts no reading raises ([`Alerting`]): acknowledgement times per severity, handlers
//! per escalation level, silence times, device alarm level mapping, battery threshold.
//!
//! The file is TOML (`vitalmq-rules/v1`); `policies/examples/rules.toml` is the shipped
//! example and documents every field. It is parsed into raw serde types (every field
//! [`Spanned`], `deny_unknown_fields`), then validated into a [`RuleSet`]; every problem
//! is reported at once with file, line and field.
//!
//! Invariants of a validated [`RuleSet`]:
//! - rule ids are unique; every number is finite; every time is at most [`MAX_SECONDS`]
//!   and every window and persistence at least one second; `1 <= k <= n <= `[`MAX_N`];
//! - for every rule and every override the resolve threshold lies on the other side of
//!   the trigger ([`RuleParams::resolve`] never holds where [`RuleParams::trigger`]
//!   does), an escalation threshold lies further out than the trigger, and an
//!   escalation never lowers the severity;
//! - each rule's kind, metric and comparison direction are the same for its base and all
//!   its overrides (an override changes values, not what is measured);
//! - at most one override applies to a `(rule, device, site)`: a cohort override wins
//!   over a site override, and no device is in two cohorts overriding the same rule.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vitalmq_envelope::DeviceId;

use crate::error::{PolicyErrors, Problems};
use crate::registry::SiteId;

mod alerting;
mod raw;
mod readings;
mod validate;

pub use alerting::{Alerting, BatteryPolicy, SilencePolicy};
pub use readings::{ClockPolicy, Plausibility, PlausibleRange};

use raw::RawFile;
pub(crate) use validate::check_name;
use validate::validate;

const FORMAT: &str = "vitalmq-rules/v1";

/// Longest window, persistence or escalation time a rule may state: seven days.
pub const MAX_SECONDS: u64 = 7 * 24 * 3600;
/// Largest `n` of a `persist = { k, n }` and of `quality.over_n`: one bit per reading in
/// a `u64`.
pub(crate) const MAX_N: u8 = 64;
/// Shortest baseline window: a baseline over less than a minute is not a baseline.
pub(crate) const MIN_BASELINE_S: u64 = 60;

// ---- the validated model ----------------------------------------------------------------

/// How urgent an alert is; also the `{severity}` level of its topic (SPEC section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Review,
    Urgent,
}

impl Severity {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Review => "review",
            Self::Urgent => "urgent",
        }
    }

    /// The severity named `s` (`info`, `review`, `urgent`, as in topics and policy).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "info" => Some(Self::Info),
            "review" => Some(Self::Review),
            "urgent" => Some(Self::Urgent),
            _ => None,
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A comparison of a measured quantity with a threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CompareOp {
    Below,
    AtOrBelow,
    Above,
    AtOrAbove,
}

impl CompareOp {
    pub(crate) const fn symbol(self) -> &'static str {
        match self {
            Self::Below => "<",
            Self::AtOrBelow => "<=",
            Self::Above => ">",
            Self::AtOrAbove => ">=",
        }
    }

    /// True for `Below` and `AtOrBelow`.
    pub const fn is_low(self) -> bool {
        matches!(self, Self::Below | Self::AtOrBelow)
    }
}

/// `measured <op> at`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Compare {
    pub op: CompareOp,
    pub at: f64,
}

impl Compare {
    /// Whether `x` meets the comparison; never for NaN.
    pub fn holds(&self, x: f64) -> bool {
        match self.op {
            CompareOp::Below => x < self.at,
            CompareOp::AtOrBelow => x <= self.at,
            CompareOp::Above => x > self.at,
            CompareOp::AtOrAbove => x >= self.at,
        }
    }
}

impl fmt::Display for Compare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.op.symbol(), self.at)
    }
}

/// How long the trigger must hold before an alert opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Persist {
    /// The first reading that meets the trigger opens.
    Immediate,
    /// Every reading for this many seconds of device clock.
    Seconds(u64),
    /// `k` of the last `n` readings, `1 <= k <= n <= MAX_N`.
    KOfN { k: u8, n: u8 },
}

/// The rule kinds: what is compared with the thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuleKind {
    Threshold,
    Rate,
    Baseline,
}

impl RuleKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Threshold => "threshold",
            Self::Rate => "rate",
            Self::Baseline => "baseline",
        }
    }
}

/// Which way a rate rule looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeDirection {
    Fall,
    Rise,
}

/// Which deviations from the baseline count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviationSide {
    Either,
    Above,
    Below,
}

/// The quantity a reading is turned into before the thresholds apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Measure {
    /// The reading itself (`threshold` rules).
    Value,
    /// How far the reading fell below the highest (or rose above the lowest) reading of
    /// the last `within_s` seconds (`rate` rules); never negative.
    Change {
        direction: ChangeDirection,
        within_s: u64,
    },
    /// Distance from the rolling baseline with time constant `window_s` (`baseline`
    /// rules); never negative.
    Deviation { side: DeviationSide, window_s: u64 },
}

impl Measure {
    /// The name alert messages give the measured quantity.
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Value => "value",
            Self::Change {
                direction: ChangeDirection::Fall,
                ..
            } => "fall",
            Self::Change {
                direction: ChangeDirection::Rise,
                ..
            } => "rise",
            Self::Deviation { .. } => "deviation",
        }
    }
}

/// When an open alert escalates. At least one of `beyond` and `after_s` is set.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Escalation {
    /// A second threshold on the measured quantity, further out than the trigger.
    pub beyond: Option<Compare>,
    /// Seconds after opening: escalate if the alert is still unresolved and the reading
    /// is not on its way out (past the resolve threshold).
    pub after_s: Option<u64>,
    /// The severity after escalation, at least the rule's.
    pub to: Severity,
}

/// The effective parameters of a rule for one device (the rule, or an override of it).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RuleParams {
    pub severity: Severity,
    pub measure: Measure,
    /// Opens the alert (after `persist`).
    pub trigger: Compare,
    /// Resolves it (after `resolve_after_s`); never holds where `trigger` holds.
    pub resolve: Compare,
    pub resolve_after_s: u64,
    pub persist: Persist,
    /// Readings with a lower `q` are ignored by the rule; `0..=1`.
    pub min_quality: f64,
    pub escalate: Option<Escalation>,
}

/// One validated rule with its overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertRule {
    id: String,
    version: String,
    metric: String,
    kind: RuleKind,
    base: RuleParams,
    by_site: BTreeMap<SiteId, RuleParams>,
    by_cohort: Vec<CohortOverride>,
}

#[derive(Debug, Clone, PartialEq)]
struct CohortOverride {
    cohort: String,
    devices: BTreeSet<DeviceId>,
    params: RuleParams,
}

impl AlertRule {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn metric(&self) -> &str {
        &self.metric
    }

    pub fn kind(&self) -> RuleKind {
        self.kind
    }

    /// The parameters as the rule states them, without overrides.
    pub fn base(&self) -> &RuleParams {
        &self.base
    }

    /// The parameters in force for a device at a site: its cohort's override, else its
    /// site's, else the rule's own.
    pub fn params_for(&self, device: &DeviceId, site: &SiteId) -> &RuleParams {
        self.by_cohort
            .iter()
            .find(|c| c.devices.contains(device))
            .map(|c| &c.params)
            .or_else(|| self.by_site.get(site))
            .unwrap_or(&self.base)
    }

    /// Names of the cohorts and sites with an override of this rule.
    #[cfg(test)]
    pub(crate) fn overridden_for(&self) -> impl Iterator<Item = String> + '_ {
        self.by_cohort
            .iter()
            .map(|c| format!("cohort {}", c.cohort))
            .chain(self.by_site.keys().map(|s| format!("site {s}")))
    }
}

/// When signal quality raises an operational alert instead of clinical ones.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct QualityPolicy {
    /// A reading with `q` below this is low quality; `0 < low_below <= 1`.
    pub low_below: f64,
    /// Raise when more than this fraction of the last `over_n` readings are low.
    pub max_low_fraction: f64,
    /// Resolve when at most this fraction of them are low; `< max_low_fraction`.
    pub resolve_fraction: f64,
    /// `1..=MAX_N`.
    pub over_n: u8,
}

impl QualityPolicy {
    /// Whether `low` low-quality readings among the last `over_n` raise the alert.
    pub fn raises(&self, low: u32) -> bool {
        f64::from(low) > self.max_low_fraction * f64::from(self.over_n)
    }

    /// Whether `low` low-quality readings among the last `over_n` resolve it.
    pub fn resolves(&self, low: u32) -> bool {
        f64::from(low) <= self.resolve_fraction * f64::from(self.over_n)
    }

    /// Whether a reading of quality `q` is low quality; a reading without `q` is not,
    /// one with a non-finite `q` is.
    pub fn is_low(&self, q: Option<f64>) -> bool {
        q.is_some_and(|q| q.is_nan() || q < self.low_below)
    }
}

/// A validated, immutable rule set; share it in an `Arc` and swap the `Arc` on reload.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleSet {
    sha256: String,
    version: String,
    quality: QualityPolicy,
    cohorts: BTreeMap<String, BTreeSet<DeviceId>>,
    rules: Vec<AlertRule>,
    plausibility: Plausibility,
    clock: ClockPolicy,
    alerting: Alerting,
}

impl RuleSet {
    /// Reads and validates a rule file.
    pub fn load(path: &Path) -> Result<Self, PolicyErrors> {
        let text = crate::error::read_policy_file(path)?;
        Self::parse(&text, path)
    }

    /// Validates rule text; `path` is used in error messages only. The hash is of
    /// `text`'s bytes, i.e. the file as loaded.
    pub fn parse(text: &str, path: &Path) -> Result<Self, PolicyErrors> {
        let mut problems = Problems::new(path, text);
        let mut set = Self {
            sha256: hex::encode(Sha256::digest(text.as_bytes())),
            version: String::new(),
            quality: QualityPolicy {
                low_below: 0.5,
                max_low_fraction: 0.5,
                resolve_fraction: 0.25,
                over_n: 20,
            },
            cohorts: BTreeMap::new(),
            rules: Vec::new(),
            plausibility: Plausibility::default(),
            clock: ClockPolicy::default(),
            alerting: Alerting::default(),
        };
        let raw: RawFile = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                problems.toml(&e);
                return problems.finish(set);
            }
        };
        validate(raw, &mut set, &mut problems);
        problems.finish(set)
    }

    /// The handlers (by name: `mqtt`, `webhook:<name>`) an alert change at escalation
    /// `level` goes to; `None` means every handler. Levels beyond the last the policy
    /// names use the last.
    pub fn handlers_for_level(&self, level: u32) -> Option<&[String]> {
        self.alerting.handlers_for_level(level)
    }

    /// Every handler name the policy references (`[escalation] levels`), so the bridge
    /// can refuse a policy naming a handler it does not have.
    pub fn handler_names(&self) -> BTreeSet<&str> {
        self.alerting.handler_names()
    }

    /// Acknowledgement, escalation levels, silence, alarm mapping and battery (issue 17).
    pub fn alerting(&self) -> &Alerting {
        &self.alerting
    }

    /// SHA-256 of the file bytes as loaded, lowercase hex.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The rule set's own version (`version` at the top of the file).
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn quality(&self) -> &QualityPolicy {
        &self.quality
    }

    /// The rules in file order.
    pub fn rules(&self) -> &[AlertRule] {
        &self.rules
    }

    pub fn rule(&self, id: &str) -> Option<&AlertRule> {
        self.rules.iter().find(|r| r.id == id)
    }

    /// Physiological limits per metric (`[plausibility]`).
    pub fn plausibility(&self) -> &Plausibility {
        &self.plausibility
    }

    /// How far device clocks may be from the bridge's (`[clock]`).
    pub fn clock(&self) -> &ClockPolicy {
        &self.clock
    }

    /// Names of the cohorts `device` is in (`[cohorts]`), in name order: what model
    /// approvals and rollouts name.
    pub fn cohorts_of(&self, device: &DeviceId) -> Vec<&str> {
        self.cohorts
            .iter()
            .filter(|(_, devices)| devices.contains(device))
            .map(|(name, _)| name.as_str())
            .collect()
    }

    /// The cohorts by name.
    #[cfg(test)]
    pub(crate) fn cohorts(&self) -> &BTreeMap<String, BTreeSet<DeviceId>> {
        &self.cohorts
    }
}

#[cfg(test)]
mod tests;
