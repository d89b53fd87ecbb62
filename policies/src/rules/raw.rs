//! The rule file as written: serde types that mirror the TOML, every value [`Spanned`]
//! so validation can name its line, `deny_unknown_fields` everywhere. Nothing here is
//! checked beyond TOML types; [`super::validate`] turns it into a `RuleSet`.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    pub(super) format: Spanned<String>,
    pub(super) version: Spanned<String>,
    pub(super) quality: Spanned<RawQuality>,
    #[serde(default)]
    pub(super) cohorts: BTreeMap<Spanned<String>, Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub(super) rules: Vec<Spanned<RawRule>>,
    #[serde(default)]
    pub(super) overrides: Vec<Spanned<RawOverride>>,
    pub(super) plausibility: Option<Spanned<RawPlausibility>>,
    pub(super) clock: Option<Spanned<RawClock>>,
    pub(super) acknowledge: Option<Spanned<RawAcknowledge>>,
    pub(super) escalation: Option<Spanned<RawEscalationLevels>>,
    pub(super) silence: Option<Spanned<RawSilence>>,
    pub(super) alarms: Option<Spanned<RawAlarms>>,
    pub(super) battery: Option<Spanned<RawBattery>>,
    pub(super) alert_expiry: Option<Spanned<RawAlertExpiry>>,
}

/// `[alert_expiry]`: seconds an alert message of each severity stays deliverable
/// (MQTT 5 Message Expiry Interval); a severity left out never expires.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAlertExpiry {
    pub(super) urgent_s: Option<Spanned<u64>>,
    pub(super) review_s: Option<Spanned<u64>>,
    pub(super) info_s: Option<Spanned<u64>>,
}

/// `[acknowledge]`: seconds an alert of each severity may stay unacknowledged; 0 = never.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAcknowledge {
    pub(super) urgent_s: Option<Spanned<u64>>,
    pub(super) review_s: Option<Spanned<u64>>,
    pub(super) info_s: Option<Spanned<u64>>,
}

/// `[escalation]`: handler names per escalation level, level 0 first.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEscalationLevels {
    pub(super) levels: Spanned<Vec<Spanned<Vec<Spanned<String>>>>>,
}

/// `[silence]`: when a device that sends nothing opens a `no-data` alert.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSilence {
    pub(super) after_s: Option<Spanned<u64>>,
    pub(super) interval_factor: Option<Spanned<f64>>,
    pub(super) severity: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) sites: BTreeMap<Spanned<String>, Spanned<u64>>,
    #[serde(default)]
    pub(super) cohorts: BTreeMap<Spanned<String>, Spanned<u64>>,
}

/// `[alarms]`: device alarm level -> alert severity, per site.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAlarms {
    #[serde(default)]
    pub(super) sites: BTreeMap<Spanned<String>, Spanned<RawLevelMap>>,
}

/// Device level -> severity, as written.
pub(super) type RawLevelMap = BTreeMap<Spanned<String>, Spanned<String>>;

/// `[battery]`: the low-battery operational alert.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBattery {
    pub(super) low_below: Option<Spanned<f64>>,
    pub(super) resolve_at: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPlausibility {
    pub(super) resolve_after: Option<Spanned<u64>>,
    #[serde(default)]
    pub(super) limits: BTreeMap<Spanned<String>, Spanned<RawRange>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRange {
    pub(super) min: Spanned<f64>,
    pub(super) max: Spanned<f64>,
    pub(super) unit: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClock {
    pub(super) max_ahead_s: Option<Spanned<u64>>,
    pub(super) max_behind_s: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQuality {
    pub(super) low_below: Spanned<f64>,
    pub(super) max_low_fraction: Spanned<f64>,
    pub(super) over_n: Spanned<u64>,
    pub(super) resolve_fraction: Option<Spanned<f64>>,
}

/// Declares [`RawRule`] and [`RawParams`] from one list of the optional parameters, so
/// a rule and an override's `set` accept the same ones; a rule also has its identity and
/// must state its severity.
macro_rules! rule_tables {
    ($($field:ident: $ty:ty,)*) => {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(super) struct RawRule {
            pub(super) id: Spanned<String>,
            pub(super) version: Spanned<String>,
            pub(super) metric: Spanned<String>,
            pub(super) kind: Spanned<String>,
            pub(super) severity: Spanned<String>,
            $(pub(super) $field: Option<Spanned<$ty>>,)*
        }

        /// The parameters a rule states and an override may `set`.
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(super) struct RawParams {
            pub(super) severity: Option<Spanned<String>>,
            $(pub(super) $field: Option<Spanned<$ty>>,)*
        }

        impl RawRule {
            /// Splits the rule into its identity and its parameters.
            pub(super) fn split(self) -> (RuleHead, RawParams) {
                let head = RuleHead {
                    id: self.id,
                    version: self.version,
                    metric: self.metric,
                    kind: self.kind,
                };
                let params = RawParams {
                    severity: Some(self.severity),
                    $($field: self.$field,)*
                };
                (head, params)
            }
        }
    };
}

rule_tables! {
    below: f64,
    at_or_below: f64,
    above: f64,
    at_or_above: f64,
    resolve_at: f64,
    resolve_after_s: u64,
    persist: RawPersist,
    rate: RawRate,
    baseline: RawBaseline,
    min_quality: f64,
    escalate: RawEscalate,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPersist {
    pub(super) seconds: Option<Spanned<u64>>,
    pub(super) k: Option<Spanned<u64>>,
    pub(super) n: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRate {
    pub(super) fall: Option<Spanned<f64>>,
    pub(super) rise: Option<Spanned<f64>>,
    pub(super) within_s: Spanned<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBaseline {
    pub(super) window_s: Spanned<u64>,
    pub(super) deviation: Spanned<f64>,
    pub(super) resolve_within: Spanned<f64>,
    pub(super) direction: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEscalate {
    pub(super) beyond: Option<Spanned<f64>>,
    pub(super) after_s: Option<Spanned<u64>>,
    pub(super) to: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOverride {
    pub(super) rule: Spanned<String>,
    pub(super) site: Option<Spanned<String>>,
    pub(super) cohort: Option<Spanned<String>>,
    pub(super) set: Spanned<RawParams>,
}

#[derive(Debug)]
pub(super) struct RuleHead {
    pub(super) id: Spanned<String>,
    pub(super) version: Spanned<String>,
    pub(super) metric: Spanned<String>,
    pub(super) kind: Spanned<String>,
}
