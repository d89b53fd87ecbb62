//! Server-side early-warning scores (issue 21 groundwork): a score chart as versioned
//! data ([`ScoreTable`], `vitalmq-score/v1`) and a pure [`score`] function over it.
//!
//! The first and only model is NEWS2 (Royal College of Physicians, 2017); its chart is
//! `policies/examples/news2.toml`, which documents the format. The table carries its
//! `model`, `version` and the SHA-256 of its text (the configuration digest), so a
//! stored score can name exactly what computed it.
//!
//! Invariants of a loaded table:
//! - every [`Parameter`] has an entry, and nothing else does;
//! - a numeric parameter's bands cover every value (at the parameter's resolution) in
//!   exactly one band, for each of air and oxygen where a band depends on it;
//! - a categorical parameter scores each of its categories exactly once;
//! - the aggregate bands cover every sum from 0 up in exactly one band.
//!
//! Missing inputs are never scored as normal. [`score`] sums what is present and says
//! what is missing; the result is then [`Assessment::Incomplete`] unless what is known
//! already reaches a risk above the lowest ([`Assessment::AtLeast`]): a complete score
//! could only raise it, since every sub-score is at least 0.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use toml::Spanned;

use crate::error::{PolicyErrors, Problems, read_policy_file};

const FORMAT: &str = "vitalmq-score/v1";
/// The models `vitalmq-score/v1` knows: the parameter set is the model's.
const MODELS: [&str; 1] = ["news2"];
/// Most decimal places a numeric parameter may be charted with.
const MAX_DECIMALS: u32 = 3;
/// Highest sub-score a band may give.
const MAX_SUB_SCORE: u8 = 10;

/// One NEWS2 parameter. SpO2 is charted on two scales; a patient is scored on one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Parameter {
    RespirationRate,
    Spo2Scale1,
    Spo2Scale2,
    AirOrOxygen,
    SystolicBp,
    Pulse,
    Consciousness,
    Temperature,
}

impl Parameter {
    /// Every parameter, in the chart's order.
    pub const ALL: [Parameter; 8] = [
        Parameter::RespirationRate,
        Parameter::Spo2Scale1,
        Parameter::Spo2Scale2,
        Parameter::AirOrOxygen,
        Parameter::SystolicBp,
        Parameter::Pulse,
        Parameter::Consciousness,
        Parameter::Temperature,
    ];

    /// The name in the score file.
    pub fn as_str(self) -> &'static str {
        match self {
            Parameter::RespirationRate => "respiration_rate",
            Parameter::Spo2Scale1 => "spo2_scale1",
            Parameter::Spo2Scale2 => "spo2_scale2",
            Parameter::AirOrOxygen => "air_or_oxygen",
            Parameter::SystolicBp => "systolic_bp",
            Parameter::Pulse => "pulse",
            Parameter::Consciousness => "consciousness",
            Parameter::Temperature => "temperature",
        }
    }

    /// The categories of a categorical parameter; `None` for a numeric one.
    fn categories(self) -> Option<&'static [&'static str]> {
        match self {
            Parameter::AirOrOxygen => Some(&["air", "oxygen"]),
            Parameter::Consciousness => Some(&["A", "C", "V", "P", "U"]),
            _ => None,
        }
    }
}

impl fmt::Display for Parameter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parameter name that is not one of [`Parameter::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown parameter `{0}` (expected one of respiration_rate, spo2_scale1, spo2_scale2, \
     air_or_oxygen, systolic_bp, pulse, consciousness, temperature)"
)]
pub struct UnknownParameter(pub String);

impl FromStr for Parameter {
    type Err = UnknownParameter;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Parameter::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownParameter(s.to_owned()))
    }
}

/// Which SpO2 scale a patient is scored on: a clinical decision per patient (scale 2
/// only for hypercapnic respiratory failure), never inferred from readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Spo2Scale {
    #[default]
    Scale1,
    Scale2,
}

/// Whether the patient breathes air or gets supplemental oxygen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AirOrOxygen {
    Air,
    Oxygen,
}

impl AirOrOxygen {
    fn as_str(self) -> &'static str {
        match self {
            AirOrOxygen::Air => "air",
            AirOrOxygen::Oxygen => "oxygen",
        }
    }
}

/// Level of consciousness on the ACVPU scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acvpu {
    Alert,
    /// New confusion.
    Confusion,
    Voice,
    Pain,
    Unresponsive,
}

impl Acvpu {
    fn as_str(self) -> &'static str {
        match self {
            Acvpu::Alert => "A",
            Acvpu::Confusion => "C",
            Acvpu::Voice => "V",
            Acvpu::Pain => "P",
            Acvpu::Unresponsive => "U",
        }
    }
}

/// The clinical risk an aggregate stands for, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Risk {
    Low,
    /// A single parameter at the red score while the aggregate is low.
    LowMedium,
    Medium,
    High,
}

impl Risk {
    pub const ALL: [Risk; 4] = [Risk::Low, Risk::LowMedium, Risk::Medium, Risk::High];

    /// The name in the score file.
    pub fn as_str(self) -> &'static str {
        match self {
            Risk::Low => "low",
            Risk::LowMedium => "low-medium",
            Risk::Medium => "medium",
            Risk::High => "high",
        }
    }
}

impl fmt::Display for Risk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is known about one patient's parameters; `None` means no valid reading. A
/// non-finite number counts as missing.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Inputs {
    pub respiration_rate: Option<f64>,
    pub spo2: Option<f64>,
    pub spo2_scale: Spo2Scale,
    pub air_or_oxygen: Option<AirOrOxygen>,
    pub systolic_bp: Option<f64>,
    pub pulse: Option<f64>,
    pub consciousness: Option<Acvpu>,
    pub temperature: Option<f64>,
}

/// What the known parameters say about the clinical risk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assessment {
    /// Every parameter scored: the risk is exact.
    Exact(Risk),
    /// Some parameters are missing, and those present already reach this risk (above
    /// the lowest); the missing ones could only raise it.
    AtLeast(Risk),
    /// Some parameters are missing and those present do not reach a risk above the
    /// lowest: no risk is stated.
    Incomplete,
}

impl Assessment {
    /// The risk to act on, if any: exact, or the lower bound of a partial score.
    pub fn risk(self) -> Option<Risk> {
        match self {
            Assessment::Exact(r) | Assessment::AtLeast(r) => Some(r),
            Assessment::Incomplete => None,
        }
    }
}

/// One scoring of one patient's [`Inputs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Score {
    /// Sub-score of every parameter scored (one SpO2 scale, the patient's).
    pub sub_scores: BTreeMap<Parameter, u8>,
    /// Parameters not scored for want of an input, in chart order. SpO2 on scale 2
    /// above 92% with air/oxygen unknown is missing too: its band depends on it.
    pub missing: Vec<Parameter>,
    /// Sum of `sub_scores`; a lower bound of the true aggregate unless `complete`.
    pub aggregate: u32,
    /// No parameter missing.
    pub complete: bool,
    /// Parameters that scored the table's red score, in chart order.
    pub red: Vec<Parameter>,
    pub assessment: Assessment,
}

impl Score {
    /// Whether any single parameter scored the red score (3 in NEWS2).
    pub fn any_red(&self) -> bool {
        !self.red.is_empty()
    }
}

/// An inclusive range in fixed point (units of the parameter's resolution).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Band {
    min: Option<i64>,
    max: Option<i64>,
    on: Option<AirOrOxygen>,
    score: u8,
}

impl Band {
    fn holds(&self, v: i64, on: AirOrOxygen) -> bool {
        self.min.is_none_or(|m| v >= m)
            && self.max.is_none_or(|m| v <= m)
            && self.on.is_none_or(|o| o == on)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Scoring {
    Numeric {
        decimals: u32,
        bands: Vec<Band>,
    },
    /// `(category, code, score)`, one per category.
    Categorical(Vec<(String, i64, u8)>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ParameterTable {
    metric: String,
    unit: Option<String>,
    /// How long a reading stays valid after it was observed.
    valid_for: Duration,
    scoring: Scoring,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct RiskBand {
    min: u32,
    max: Option<u32>,
    risk: Risk,
}

/// A validated score chart (`vitalmq-score/v1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScoreTable {
    model: String,
    version: String,
    source: Option<String>,
    sha256: String,
    parameters: BTreeMap<Parameter, ParameterTable>,
    risk_bands: Vec<RiskBand>,
    red_score: u8,
    red_risk: Risk,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    format: Spanned<String>,
    model: Spanned<String>,
    version: Spanned<String>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    parameters: BTreeMap<Spanned<String>, Spanned<RawParameter>>,
    aggregate: Spanned<RawAggregate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawParameter {
    metric: Option<Spanned<String>>,
    #[serde(default)]
    unit: Option<String>,
    decimals: Option<Spanned<u32>>,
    valid_for: Option<Spanned<String>>,
    bands: Option<Spanned<Vec<Spanned<RawBand>>>>,
    categories: Option<Spanned<Vec<Spanned<RawCategory>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBand {
    min: Option<Spanned<f64>>,
    max: Option<Spanned<f64>>,
    on: Option<Spanned<String>>,
    score: Spanned<u8>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCategory {
    value: Spanned<String>,
    code: Spanned<i64>,
    score: Spanned<u8>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAggregate {
    bands: Spanned<Vec<Spanned<RawRiskBand>>>,
    red_score: Spanned<u8>,
    red_risk: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRiskBand {
    min: Option<Spanned<u32>>,
    max: Option<Spanned<u32>>,
    risk: Spanned<String>,
}

impl ScoreTable {
    pub fn load(path: &Path) -> Result<Self, PolicyErrors> {
        Self::parse(&read_policy_file(path)?, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, PolicyErrors> {
        let mut problems = Problems::new(path, text);
        let raw: RawTable = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                problems.toml(&e);
                return Err(problems.finish(()).expect_err("a TOML error was recorded"));
            }
        };
        if raw.format.get_ref() != FORMAT {
            problems.add(
                Some(raw.format.span()),
                "format",
                format!("expected \"{FORMAT}\""),
            );
        }
        if !MODELS.contains(&raw.model.get_ref().as_str()) {
            problems.add(
                Some(raw.model.span()),
                "model",
                format!("unknown model (expected one of {})", MODELS.join(", ")),
            );
        }
        if raw.version.get_ref().trim().is_empty() {
            problems.add(Some(raw.version.span()), "version", "must not be empty");
        }
        let mut parameters = BTreeMap::new();
        for (name, rawp) in &raw.parameters {
            let field = format!("parameters.{}", name.get_ref());
            match name.get_ref().parse::<Parameter>() {
                Err(e) => problems.add(Some(name.span()), field, e.to_string()),
                Ok(p) => {
                    if let Some(t) = parameter(&mut problems, p, rawp, &field) {
                        parameters.insert(p, t);
                    }
                }
            }
        }
        for p in Parameter::ALL {
            if !raw.parameters.keys().any(|k| k.get_ref() == p.as_str()) {
                problems.add(
                    None,
                    format!("parameters.{p}"),
                    "missing: every parameter of the model needs a scoring",
                );
            }
        }
        let agg = raw.aggregate.get_ref();
        let risk_bands = risk_bands(&mut problems, agg);
        let red_risk = risk_named(&mut problems, &agg.red_risk, "aggregate.red_risk");
        let red_score = *agg.red_score.get_ref();
        if red_score == 0 || red_score > MAX_SUB_SCORE {
            problems.add(
                Some(agg.red_score.span()),
                "aggregate.red_score",
                format!("must be 1..={MAX_SUB_SCORE}"),
            );
        }
        let table = Self {
            model: raw.model.into_inner(),
            version: raw.version.into_inner(),
            source: raw.source,
            sha256: hex::encode(Sha256::digest(text.as_bytes())),
            parameters,
            risk_bands,
            red_score,
            red_risk: red_risk.unwrap_or(Risk::Low),
        };
        problems.finish(table)
    }

    /// The model this table scores, e.g. `news2`.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The chart's version, e.g. `rcp-2017.1`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Where the chart comes from (free text), if the file says.
    pub fn source(&self) -> Option<&str> {
        self.source.as_deref()
    }

    /// The unit a numeric parameter is charted in (free text), if the file says.
    pub fn unit(&self, p: Parameter) -> Option<&str> {
        self.table(p).unit.as_deref()
    }

    /// SHA-256 (hex) of the file's text: the configuration digest.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// How long a reading of a parameter stays valid after it was observed: older, the
    /// parameter is missing.
    pub fn valid_for(&self, p: Parameter) -> Duration {
        self.table(p).valid_for
    }

    /// The inputs valid at `at_ms` (ms since the Unix epoch): `metric` returns the
    /// latest value of an `m` key with the time it was observed; a value older than its
    /// parameter's `valid_for` (or observed after `at_ms`) counts as missing.
    pub fn inputs_at(
        &self,
        metric: impl Fn(&str) -> Option<(f64, u64)>,
        at_ms: u64,
        spo2_scale: Spo2Scale,
    ) -> Inputs {
        self.inputs_by(
            |p| {
                let (v, observed) = metric(self.metric(p))?;
                let age = at_ms.checked_sub(observed)?;
                (u128::from(age) <= self.valid_for(p).as_millis()).then_some(v)
            },
            spo2_scale,
        )
    }

    /// The lowest aggregate of a risk's band (`None` when no band gives that risk).
    pub fn risk_min(&self, risk: Risk) -> Option<u32> {
        self.risk_bands
            .iter()
            .filter(|b| b.risk == risk)
            .map(|b| b.min)
            .min()
    }

    /// The sub-score that makes a parameter red (3 in NEWS2).
    pub fn red_score(&self) -> u8 {
        self.red_score
    }

    /// The `m` keys the table reads (each once).
    pub fn metrics(&self) -> std::collections::BTreeSet<&str> {
        self.parameters
            .values()
            .map(|t| t.metric.as_str())
            .collect()
    }

    /// The `m` key (SPEC section 3) a parameter reads.
    pub fn metric(&self, p: Parameter) -> &str {
        &self.table(p).metric
    }

    /// The inputs found in one set of measurements (`metric` returns the latest valid
    /// value of an `m` key, if any). The SpO2 scale is the patient's, not a reading. A
    /// categorical metric whose number is no category's code counts as missing.
    pub fn inputs(&self, metric: impl Fn(&str) -> Option<f64>, spo2_scale: Spo2Scale) -> Inputs {
        self.inputs_by(|p| metric(self.metric(p)), spo2_scale)
    }

    /// The inputs of the values `value` gives per parameter.
    fn inputs_by(&self, value: impl Fn(Parameter) -> Option<f64>, spo2_scale: Spo2Scale) -> Inputs {
        let num = |p: Parameter| value(p);
        let cat = |p: Parameter| {
            let v = num(p)?;
            match &self.table(p).scoring {
                Scoring::Categorical(cs) => cs
                    .iter()
                    .find(|(_, code, _)| *code as f64 == v)
                    .map(|(name, _, _)| name.as_str()),
                Scoring::Numeric { .. } => None,
            }
        };
        let spo2 = match spo2_scale {
            Spo2Scale::Scale1 => Parameter::Spo2Scale1,
            Spo2Scale::Scale2 => Parameter::Spo2Scale2,
        };
        Inputs {
            respiration_rate: num(Parameter::RespirationRate),
            spo2: num(spo2),
            spo2_scale,
            air_or_oxygen: cat(Parameter::AirOrOxygen).and_then(|c| match c {
                "air" => Some(AirOrOxygen::Air),
                "oxygen" => Some(AirOrOxygen::Oxygen),
                _ => None,
            }),
            systolic_bp: num(Parameter::SystolicBp),
            pulse: num(Parameter::Pulse),
            consciousness: cat(Parameter::Consciousness).and_then(|c| match c {
                "A" => Some(Acvpu::Alert),
                "C" => Some(Acvpu::Confusion),
                "V" => Some(Acvpu::Voice),
                "P" => Some(Acvpu::Pain),
                "U" => Some(Acvpu::Unresponsive),
                _ => None,
            }),
            temperature: num(Parameter::Temperature),
        }
    }

    fn table(&self, p: Parameter) -> &ParameterTable {
        self.parameters
            .get(&p)
            .expect("a loaded table has every parameter")
    }

    /// The risk of an aggregate alone (no red score).
    fn aggregate_risk(&self, aggregate: u32) -> Risk {
        self.risk_bands
            .iter()
            .find(|b| aggregate >= b.min && b.max.is_none_or(|m| aggregate <= m))
            .map(|b| b.risk)
            .expect("a loaded table's aggregate bands cover every sum")
    }

    /// Sub-score of a numeric value; `None` when the band depends on air/oxygen and
    /// that is unknown (and the two would score differently).
    fn numeric(&self, p: Parameter, value: f64, on: Option<AirOrOxygen>) -> Option<u8> {
        let Scoring::Numeric { decimals, bands } = &self.table(p).scoring else {
            return None;
        };
        let v = fixed(value, *decimals)?;
        let under = |on: AirOrOxygen| {
            bands
                .iter()
                .find(|b| b.holds(v, on))
                .map(|b| b.score)
                .expect("a loaded table's bands cover every value")
        };
        match on {
            Some(on) => Some(under(on)),
            None => {
                let (air, oxygen) = (under(AirOrOxygen::Air), under(AirOrOxygen::Oxygen));
                (air == oxygen).then_some(air)
            }
        }
    }

    fn categorical(&self, p: Parameter, category: &str) -> Option<u8> {
        match &self.table(p).scoring {
            Scoring::Categorical(cs) => cs.iter().find(|(c, _, _)| c == category).map(|c| c.2),
            Scoring::Numeric { .. } => None,
        }
    }

    /// How many bands hold `value` for `p`, breathing air or oxygen (always 1 for a
    /// loaded table; for tests).
    #[cfg(test)]
    fn bands_holding(&self, p: Parameter, value: f64, on: AirOrOxygen) -> usize {
        let Scoring::Numeric { decimals, bands } = &self.table(p).scoring else {
            return 0;
        };
        let Some(v) = fixed(value, *decimals) else {
            return 0;
        };
        bands.iter().filter(|b| b.holds(v, on)).count()
    }
}

/// Scores one patient's inputs against a table. Pure: same table and inputs, same score.
pub fn score(table: &ScoreTable, inputs: &Inputs) -> Score {
    let spo2 = match inputs.spo2_scale {
        Spo2Scale::Scale1 => Parameter::Spo2Scale1,
        Spo2Scale::Scale2 => Parameter::Spo2Scale2,
    };
    let subs: [(Parameter, Option<u8>); 7] = [
        (
            Parameter::RespirationRate,
            inputs
                .respiration_rate
                .and_then(|v| table.numeric(Parameter::RespirationRate, v, None)),
        ),
        (
            spo2,
            inputs
                .spo2
                .and_then(|v| table.numeric(spo2, v, inputs.air_or_oxygen)),
        ),
        (
            Parameter::AirOrOxygen,
            inputs
                .air_or_oxygen
                .and_then(|a| table.categorical(Parameter::AirOrOxygen, a.as_str())),
        ),
        (
            Parameter::SystolicBp,
            inputs
                .systolic_bp
                .and_then(|v| table.numeric(Parameter::SystolicBp, v, None)),
        ),
        (
            Parameter::Pulse,
            inputs
                .pulse
                .and_then(|v| table.numeric(Parameter::Pulse, v, None)),
        ),
        (
            Parameter::Consciousness,
            inputs
                .consciousness
                .and_then(|c| table.categorical(Parameter::Consciousness, c.as_str())),
        ),
        (
            Parameter::Temperature,
            inputs
                .temperature
                .and_then(|v| table.numeric(Parameter::Temperature, v, None)),
        ),
    ];
    let mut sub_scores = BTreeMap::new();
    let mut missing = Vec::new();
    let mut red = Vec::new();
    for (p, s) in subs {
        match s {
            Some(s) => {
                sub_scores.insert(p, s);
                if s >= table.red_score {
                    red.push(p);
                }
            }
            None => missing.push(p),
        }
    }
    let aggregate: u32 = sub_scores.values().map(|&s| u32::from(s)).sum();
    let complete = missing.is_empty();
    let mut risk = table.aggregate_risk(aggregate);
    if !red.is_empty() {
        risk = risk.max(table.red_risk);
    }
    let assessment = if complete {
        Assessment::Exact(risk)
    } else if risk > table.aggregate_risk(0) {
        Assessment::AtLeast(risk)
    } else {
        Assessment::Incomplete
    };
    Score {
        sub_scores,
        missing,
        aggregate,
        complete,
        red,
        assessment,
    }
}

/// `value` in units of `10^-decimals`, rounded half away from zero; `None` when not
/// finite or out of range.
fn fixed(value: f64, decimals: u32) -> Option<i64> {
    let scaled = (value * 10f64.powi(decimals as i32)).round();
    // 2^53: beyond that f64 no longer holds every integer; no vital sign gets there.
    (scaled.is_finite() && scaled.abs() <= 9_007_199_254_740_992.0).then_some(scaled as i64)
}

/// A chart bound in fixed point, refusing more decimals than the resolution.
fn bound(
    problems: &mut Problems<'_>,
    raw: &Spanned<f64>,
    decimals: u32,
    field: &str,
) -> Option<i64> {
    let v = *raw.get_ref();
    let exact = v * 10f64.powi(decimals as i32);
    match fixed(v, decimals) {
        Some(f) if (exact - f as f64).abs() < 1e-6 => Some(f),
        Some(_) => {
            problems.add(
                Some(raw.span()),
                field,
                format!(
                    "{v} has more than {decimals} decimal place(s) (the parameter's `decimals`)"
                ),
            );
            None
        }
        None => {
            problems.add(Some(raw.span()), field, "not a finite number in range");
            None
        }
    }
}

/// Shows a fixed-point value as the chart prints it.
fn show(v: i64, decimals: u32) -> String {
    if decimals == 0 {
        return v.to_string();
    }
    let scale = 10i64.pow(decimals);
    let sign = if v < 0 { "-" } else { "" };
    let (whole, frac) = (v.abs() / scale, v.abs() % scale);
    format!("{sign}{whole}.{frac:0width$}", width = decimals as usize)
}

/// Checks that `bands` (fixed point, with their spans) cover every value once: sorted
/// by lower bound, the first is open below, the last open above, and each starts one
/// step after the previous ends. Problems name the band where coverage breaks.
fn check_cover(
    problems: &mut Problems<'_>,
    bands: &[(Option<i64>, Option<i64>, Range<usize>)],
    decimals: u32,
    field: &str,
    context: &str,
) {
    let mut sorted: Vec<_> = bands.iter().collect();
    sorted.sort_by_key(|(min, _, _)| min.unwrap_or(i64::MIN));
    let Some(first) = sorted.first() else {
        problems.add(None, field, format!("no bands{context}"));
        return;
    };
    if let Some(min) = first.0 {
        problems.add(
            Some(first.2.clone()),
            field,
            format!(
                "gap{context}: values below {} are in no band",
                show(min, decimals)
            ),
        );
    }
    for pair in sorted.windows(2) {
        let (prev, next) = (pair[0], pair[1]);
        let Some(prev_max) = prev.1 else {
            problems.add(
                Some(next.2.clone()),
                field,
                format!("overlap{context}: this band is inside one open above"),
            );
            continue;
        };
        match next.0 {
            None => problems.add(
                Some(next.2.clone()),
                field,
                format!("overlap{context}: two bands open below"),
            ),
            Some(min) if min <= prev_max => problems.add(
                Some(next.2.clone()),
                field,
                format!(
                    "overlap{context}: {} to {} are in two bands",
                    show(min, decimals),
                    show(prev_max.min(next.1.unwrap_or(prev_max)), decimals)
                ),
            ),
            Some(min) if min > prev_max + 1 => problems.add(
                Some(next.2.clone()),
                field,
                format!(
                    "gap{context}: {} to {} are in no band",
                    show(prev_max + 1, decimals),
                    show(min - 1, decimals)
                ),
            ),
            Some(_) => {}
        }
    }
    if let Some(last) = sorted.last()
        && let Some(max) = last.1
        && sorted.iter().all(|b| b.1.is_some())
    {
        problems.add(
            Some(last.2.clone()),
            field,
            format!(
                "gap{context}: values above {} are in no band",
                show(max, decimals)
            ),
        );
    }
}

/// A bound that was given but invalid is `None`; an absent one is `Some(None)`.
fn valid(bound: Option<Option<i64>>) -> Option<Option<i64>> {
    match bound {
        None => Some(None),
        Some(v) => v.map(Some),
    }
}

fn parameter(
    problems: &mut Problems<'_>,
    p: Parameter,
    raw: &Spanned<RawParameter>,
    field: &str,
) -> Option<ParameterTable> {
    let span = raw.span();
    let raw = raw.get_ref();
    let before = problems.len();
    let metric = match &raw.metric {
        Some(m) if !m.get_ref().trim().is_empty() => Some(m.get_ref().clone()),
        Some(m) => {
            problems.add(
                Some(m.span()),
                format!("{field}.metric"),
                "must not be empty",
            );
            None
        }
        None => {
            problems.add(Some(span.clone()), format!("{field}.metric"), "missing");
            None
        }
    };
    let valid_for = match &raw.valid_for {
        None => {
            problems.add(
                Some(span.clone()),
                format!("{field}.valid_for"),
                "missing: how long a reading stays valid (e.g. \"15m\")",
            );
            None
        }
        Some(v) => match humantime::parse_duration(v.get_ref()) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                problems.add(
                    Some(v.span()),
                    format!("{field}.valid_for"),
                    "must be longer than 0",
                );
                None
            }
            Err(e) => {
                problems.add(
                    Some(v.span()),
                    format!("{field}.valid_for"),
                    format!("not a duration: {e}"),
                );
                None
            }
        },
    };
    let score_ok = |problems: &mut Problems<'_>, s: &Spanned<u8>, f: String| {
        if *s.get_ref() > MAX_SUB_SCORE {
            problems.add(Some(s.span()), f, format!("must be 0..={MAX_SUB_SCORE}"));
        }
    };
    let scoring = match (p.categories(), &raw.bands, &raw.categories) {
        (Some(_), Some(b), _) => {
            problems.add(
                Some(b.span()),
                format!("{field}.bands"),
                "a categorical parameter has categories, not bands",
            );
            None
        }
        (None, _, Some(c)) => {
            problems.add(
                Some(c.span()),
                format!("{field}.categories"),
                "a numeric parameter has bands, not categories",
            );
            None
        }
        (Some(_), None, None) | (None, None, None) => {
            let what = if p.categories().is_some() {
                "categories"
            } else {
                "bands"
            };
            problems.add(Some(span), format!("{field}.{what}"), "missing");
            None
        }
        (Some(names), None, Some(cats)) => {
            if let Some(d) = &raw.decimals {
                problems.add(
                    Some(d.span()),
                    format!("{field}.decimals"),
                    "only a numeric parameter has decimals",
                );
            }
            let mut out: Vec<(String, i64, u8)> = Vec::new();
            for (i, c) in cats.get_ref().iter().enumerate() {
                let cf = format!("{field}.categories[{i}]");
                let c = c.get_ref();
                let value = c.value.get_ref();
                score_ok(problems, &c.score, format!("{cf}.score"));
                if !names.contains(&value.as_str()) {
                    problems.add(
                        Some(c.value.span()),
                        format!("{cf}.value"),
                        format!(
                            "unknown category `{value}` (expected one of {})",
                            names.join(", ")
                        ),
                    );
                } else if out.iter().any(|o| &o.0 == value) {
                    problems.add(
                        Some(c.value.span()),
                        format!("{cf}.value"),
                        format!("overlap: category `{value}` is scored twice"),
                    );
                } else if out.iter().any(|o| o.1 == *c.code.get_ref()) {
                    problems.add(
                        Some(c.code.span()),
                        format!("{cf}.code"),
                        "two categories have the same code",
                    );
                } else {
                    out.push((value.clone(), *c.code.get_ref(), *c.score.get_ref()));
                }
            }
            for name in names {
                if !cats
                    .get_ref()
                    .iter()
                    .any(|c| c.get_ref().value.get_ref() == name)
                {
                    problems.add(
                        Some(cats.span()),
                        format!("{field}.categories"),
                        format!("gap: category `{name}` is not scored"),
                    );
                }
            }
            Some(Scoring::Categorical(out))
        }
        (None, Some(bands), None) => {
            let decimals = match &raw.decimals {
                None => 0,
                Some(d) if *d.get_ref() <= MAX_DECIMALS => *d.get_ref(),
                Some(d) => {
                    problems.add(
                        Some(d.span()),
                        format!("{field}.decimals"),
                        format!("must be 0..={MAX_DECIMALS}"),
                    );
                    0
                }
            };
            let mut out = Vec::new();
            for (i, b) in bands.get_ref().iter().enumerate() {
                let bf = format!("{field}.bands[{i}]");
                let bspan = b.span();
                let b = b.get_ref();
                score_ok(problems, &b.score, format!("{bf}.score"));
                let min = b
                    .min
                    .as_ref()
                    .map(|m| bound(problems, m, decimals, &format!("{bf}.min")));
                let max = b
                    .max
                    .as_ref()
                    .map(|m| bound(problems, m, decimals, &format!("{bf}.max")));
                let on = match &b.on {
                    None => Some(None),
                    Some(o) => match o.get_ref().as_str() {
                        "air" => Some(Some(AirOrOxygen::Air)),
                        "oxygen" => Some(Some(AirOrOxygen::Oxygen)),
                        other => {
                            problems.add(
                                Some(o.span()),
                                format!("{bf}.on"),
                                format!("unknown `{other}` (expected air or oxygen)"),
                            );
                            None
                        }
                    },
                };
                let (Some(min), Some(max), Some(on)) = (valid(min), valid(max), on) else {
                    continue;
                };
                if let (Some(lo), Some(hi)) = (min, max)
                    && lo > hi
                {
                    problems.add(Some(bspan), bf, "min is above max");
                    continue;
                }
                out.push((
                    Band {
                        min,
                        max,
                        on,
                        score: *b.score.get_ref(),
                    },
                    bspan,
                ));
            }
            if problems.len() == before {
                let contexts: &[(Option<AirOrOxygen>, &str)] =
                    if out.iter().any(|(b, _)| b.on.is_some()) {
                        &[
                            (Some(AirOrOxygen::Air), " (on air)"),
                            (Some(AirOrOxygen::Oxygen), " (on oxygen)"),
                        ]
                    } else {
                        &[(None, "")]
                    };
                for (ctx, label) in contexts {
                    let applicable: Vec<_> = out
                        .iter()
                        .filter(|(b, _)| ctx.is_none() || b.on.is_none() || b.on == *ctx)
                        .map(|(b, s)| (b.min, b.max, s.clone()))
                        .collect();
                    check_cover(
                        problems,
                        &applicable,
                        decimals,
                        &format!("{field}.bands"),
                        label,
                    );
                }
            }
            Some(Scoring::Numeric {
                decimals,
                bands: out.into_iter().map(|(b, _)| b).collect(),
            })
        }
    };
    if problems.len() > before {
        return None;
    }
    Some(ParameterTable {
        metric: metric?,
        unit: raw.unit.clone(),
        valid_for: valid_for?,
        scoring: scoring?,
    })
}

fn risk_named(problems: &mut Problems<'_>, raw: &Spanned<String>, field: &str) -> Option<Risk> {
    let r = Risk::ALL.into_iter().find(|r| r.as_str() == raw.get_ref());
    if r.is_none() {
        problems.add(
            Some(raw.span()),
            field,
            format!(
                "unknown risk `{}` (expected low, low-medium, medium or high)",
                raw.get_ref()
            ),
        );
    }
    r
}

fn risk_bands(problems: &mut Problems<'_>, agg: &RawAggregate) -> Vec<RiskBand> {
    let before = problems.len();
    let mut out = Vec::new();
    let mut cover = Vec::new();
    for (i, b) in agg.bands.get_ref().iter().enumerate() {
        let span = b.span();
        let b = b.get_ref();
        let risk = risk_named(problems, &b.risk, &format!("aggregate.bands[{i}].risk"));
        let min = b.min.as_ref().map(|m| *m.get_ref());
        let max = b.max.as_ref().map(|m| *m.get_ref());
        // The aggregate starts at 0: a band from 0 is open below.
        let lo = min.filter(|&m| m > 0).map(i64::from);
        cover.push((lo, max.map(i64::from), span.clone()));
        if let (Some(lo), Some(hi)) = (min, max)
            && lo > hi
        {
            problems.add(
                Some(span),
                format!("aggregate.bands[{i}]"),
                "min is above max",
            );
            continue;
        }
        if let Some(risk) = risk {
            out.push(RiskBand {
                min: min.unwrap_or(0),
                max,
                risk,
            });
        }
    }
    if problems.len() == before {
        check_cover(problems, &cover, 0, "aggregate.bands", "");
    }
    out
}

#[cfg(test)]
mod tests;
