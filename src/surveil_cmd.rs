//! `vitalmq surveil <question>`: the surveillance questions of `queries/` (rates by a
//! dimension, outliers, PSI of a vital sign or of a score between versions) answered
//! over a bridge's local store, with the same definitions (`queries/README.md`).
//!
//! The store is opened as `vitalmq store` opens it (`--data`, `--key-file` for sealed
//! payloads); lot, region and hardware model come from the device registry
//! (`--registry`, required), and so do the consents: the command reads only what the
//! surveillance sink would write (`store`), under the `surveillance` purpose and no
//! other, and reports what consent withheld per table and reason (stderr and the
//! audit record, counts only). Output is aggregates only, never a subject: a text table, or JSON
//! (`--json`, an array of the rows the SQL returns, same column names). Each run is an
//! operator action (`surveil.<question>`) recording what was asked (question and
//! parameters, data directory, purpose) and how many rows came out, never values.
//!
//! `vitalmq surveil generate` is not a question: it writes a synthetic fleet as a data
//! set for the shipped SQL's tests and benchmark (`generate`).

mod generate;
mod measures;
mod psi;
mod rows;
mod store;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use serde_json::{Map, Value as Json};

use crate::operator_audit::{self, Action};
use rows::DataSet;

#[derive(Debug, clap::Args)]
pub struct SurveilArgs {
    #[command(subcommand)]
    question: Question,
    /// The bridge's data directory.
    #[arg(long, global = true)]
    data: Option<PathBuf>,
    /// The device registry: the assignments and consents rows are judged by (required
    /// with `--data`), and the lot, region and hardware model of each device.
    #[arg(long, global = true)]
    registry: Option<PathBuf>,
    /// The key file of `[encryption]`, to open sealed payloads.
    #[arg(long, global = true)]
    key_file: Option<PathBuf>,
    /// The purpose the data is read under: surveillance only (the consent every row
    /// is judged by; recorded in the operator audit log).
    #[arg(long, global = true, default_value = "surveillance",
          value_parser = clap::builder::PossibleValuesParser::new(["surveillance"]))]
    purpose: String,
    /// Print JSON (an array of rows) instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Read the rows from a JSON file of the data set's tables instead of a store (the
    /// test fleet of `tests/py/surveil_queries.py`); nothing patient-linked, not audited.
    #[arg(long, global = true, hide = true, conflicts_with = "data")]
    rows: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Subcommand)]
enum Question {
    /// Rates per device-week and per 1000 readings, by dimension (`rates_by.sql`).
    Rates(Filter),
    /// Which group stands out from the fleet rate (`outliers.sql`).
    Outliers(Filter),
    /// Population stability index of a vital sign between two periods (`psi.sql`).
    Psi {
        /// spo2, pulse, resp, temp, sbp or dbp.
        #[arg(long)]
        metric: String,
        /// ISO weeks, `2026-W47..2026-W48` or one week.
        #[arg(long)]
        reference: psi::Weeks,
        #[arg(long)]
        compare: psi::Weeks,
    },
    /// PSI of a score's aggregate between two model versions (`psi_score.sql`).
    PsiScore {
        #[arg(long, default_value = "news2")]
        model: String,
        #[arg(long)]
        reference_version: String,
        #[arg(long)]
        compare_version: String,
        /// Only these ISO weeks.
        #[arg(long)]
        weeks: Option<psi::Weeks>,
    },
    /// Write a synthetic fleet (planted LOT-C defect) as a surveillance data set, for
    /// the shipped queries' benchmark (`scripts/bench-surveil`); not a question.
    Generate(generate::GenerateArgs),
}

#[derive(Debug, Clone, clap::Args)]
struct Filter {
    /// alerts, device_alarms, gaps, refusals or dropped (default all).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(measures::MEASURES))]
    measure: Option<String>,
    /// firmware, model, model_status, lot, region, hardware_model or week (default all).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(measures::DIMENSIONS))]
    dimension: Option<String>,
}

impl Filter {
    fn keeps(&self, measure: &str, dimension: &str) -> bool {
        self.measure.as_deref().is_none_or(|m| m == measure)
            && self.dimension.as_deref().is_none_or(|d| d == dimension)
    }
}

impl Question {
    fn name(&self) -> &'static str {
        match self {
            Self::Rates(_) => "rates",
            Self::Outliers(_) => "outliers",
            Self::Psi { .. } => "psi",
            Self::PsiScore { .. } => "psi-score",
            Self::Generate(_) => "generate",
        }
    }

    /// What was asked, for the audit record.
    fn parameters(&self) -> Map<String, Json> {
        let mut m = Map::new();
        match self {
            Self::Rates(f) | Self::Outliers(f) => {
                m.insert("measure".into(), f.measure.clone().into());
                m.insert("dimension".into(), f.dimension.clone().into());
            }
            Self::Psi {
                metric,
                reference,
                compare,
            } => {
                m.insert("metric".into(), metric.clone().into());
                m.insert(
                    "reference".into(),
                    format!("{}..{}", reference.from, reference.to).into(),
                );
                m.insert(
                    "compare".into(),
                    format!("{}..{}", compare.from, compare.to).into(),
                );
            }
            Self::PsiScore {
                model,
                reference_version,
                compare_version,
                weeks,
            } => {
                m.insert("model".into(), model.clone().into());
                m.insert("reference_version".into(), reference_version.clone().into());
                m.insert("compare_version".into(), compare_version.clone().into());
                m.insert(
                    "weeks".into(),
                    weeks
                        .as_ref()
                        .map(|w| format!("{}..{}", w.from, w.to))
                        .into(),
                );
            }
            Self::Generate(_) => {}
        }
        m
    }

    /// The answer as rows (JSON objects, in the SQL's column order).
    fn answer(&self, data: &DataSet) -> anyhow::Result<Vec<Json>> {
        let rows = match self {
            Self::Rates(f) => to_rows(
                measures::rates(data)
                    .into_iter()
                    .filter(|r| f.keeps(&r.measure, &r.dimension)),
            )?,
            Self::Outliers(f) => {
                let rates = measures::rates(data);
                to_rows(
                    measures::outliers(data, &rates)
                        .into_iter()
                        .filter(|r| f.keeps(&r.measure, &r.dimension)),
                )?
            }
            Self::Psi {
                metric,
                reference,
                compare,
            } => {
                let p = psi::vital(data, metric, reference, compare).with_context(|| {
                    format!("--metric {metric}: one of {}", psi::METRICS.join(", "))
                })?;
                let mut row = Map::new();
                row.insert("metric".into(), metric.clone().into());
                row.extend(as_object(&p)?);
                vec![Json::Object(row)]
            }
            Self::PsiScore {
                model,
                reference_version,
                compare_version,
                weeks,
            } => {
                let p = psi::score(
                    data,
                    model,
                    reference_version,
                    compare_version,
                    weeks.as_ref(),
                );
                let mut row = Map::new();
                row.insert("model".into(), model.clone().into());
                row.insert("reference_version".into(), reference_version.clone().into());
                row.insert("compare_version".into(), compare_version.clone().into());
                row.extend(as_object(&p)?);
                vec![Json::Object(row)]
            }
            Self::Generate(_) => anyhow::bail!("generate writes a data set, it asks nothing"),
        };
        Ok(rows)
    }
}

fn as_object<T: serde::Serialize>(v: &T) -> anyhow::Result<Map<String, Json>> {
    match serde_json::to_value(v)? {
        Json::Object(m) => Ok(m),
        other => anyhow::bail!("not a row: {other}"),
    }
}

fn to_rows<T: serde::Serialize>(rows: impl Iterator<Item = T>) -> anyhow::Result<Vec<Json>> {
    rows.map(|r| as_object(&r).map(Json::Object)).collect()
}

pub fn run(args: SurveilArgs) -> anyhow::Result<ExitCode> {
    if let Question::Generate(g) = &args.question {
        generate::run(g, args.json)?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows = if let Some(file) = &args.rows {
        let data: DataSet = serde_json::from_slice(
            &std::fs::read(file).with_context(|| format!("{}", file.display()))?,
        )
        .with_context(|| format!("{}: not the data set's rows", file.display()))?;
        args.question.answer(&data)?
    } else {
        let data_dir = args
            .data
            .as_ref()
            .context("--data (the bridge's data directory) is required")?;
        let registry = vitalmq_policies::DeviceRegistry::load(args.registry.as_ref().context(
            "--registry is required: each row is judged by the surveillance consent it records",
        )?)?;
        let store = crate::bridge_cmd::open_existing_with(data_dir, args.key_file.as_deref())?;
        let mut action = Action::new(
            format!("surveil.{}", args.question.name()),
            operator_audit::log_path(operator_audit::data_dir_log(data_dir)),
        )
        .detail("data_dir", operator_audit::absolute(data_dir))
        .detail("purpose", args.purpose.clone());
        for (k, v) in args.question.parameters() {
            action = action.detail(&k, v);
        }
        action.run(|| {
            let (data, withheld) = store::load(&store, &registry)?;
            let rows = args.question.answer(&data)?;
            // Counts only, on stderr: stdout stays the rows.
            if withheld.total() > 0 {
                eprintln!(
                    "withheld under surveillance consent (not counted): {}",
                    withheld.to_json()
                );
            }
            let mut done = Map::new();
            done.insert("rows".into(), rows.len().into());
            done.insert("withheld".into(), withheld.to_json());
            Ok((rows, done))
        })?
    };
    if args.json {
        println!("{}", serde_json::to_string(&rows)?);
    } else {
        print!("{}", table(&rows));
    }
    Ok(ExitCode::SUCCESS)
}

/// Rows as an aligned text table (columns in the rows' order).
fn table(rows: &[Json]) -> String {
    let Some(Json::Object(first)) = rows.first() else {
        return "(no rows)\n".into();
    };
    let columns: Vec<&String> = first.keys().collect();
    let cell = |v: Option<&Json>| match v {
        None | Some(Json::Null) => String::new(),
        Some(Json::String(s)) => s.clone(),
        Some(Json::Array(a)) => format!("[{} bins]", a.len()),
        Some(v) => v.to_string(),
    };
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|c| cell(r.get(c.as_str()))).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| cells.iter().map(|r| r[i].len()).fold(c.len(), usize::max))
        .collect();
    let line = |values: Vec<&str>| {
        let mut s = values
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(columns.iter().map(|c| c.as_str()).collect());
    for r in &cells {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let rows = vec![
            serde_json::json!({"value": "LOT-C", "n": 150}),
            serde_json::json!({"value": "(none)", "n": null}),
        ];
        let t = table(&rows);
        assert_eq!(t, "value   n\nLOT-C   150\n(none)\n");
        assert_eq!(table(&[]), "(no rows)\n");
    }
}
