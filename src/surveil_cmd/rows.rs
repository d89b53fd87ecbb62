//! The rows the questions are asked of, in the shape of the surveillance data set's
//! tables (`docs/surveillance.md`): the same columns the Parquet sink writes, so the
//! command and the shipped SQL answer over the same facts. Times are milliseconds
//! since the Unix epoch (UTC). Deserializable from the test fleet's JSON rows
//! (`tests/py/surveil_queries.py`), where an absent column is NULL.

use serde::Deserialize;

/// The grouping columns a row carries.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(default)]
pub struct Dims {
    pub fw: Option<String>,
    pub model: Option<String>,
    pub model_status: Option<String>,
    pub lot: Option<String>,
    pub region: Option<String>,
    pub hardware_model: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Event {
    pub event_id: String,
    /// `vitals`, `status` or `alarm`.
    pub kind: String,
    pub observed_at: i64,
    pub device: Option<String>,
    #[serde(flatten)]
    pub dims: Dims,
    pub spo2: Option<f64>,
    pub pulse: Option<f64>,
    pub resp: Option<f64>,
    pub temp: Option<f64>,
    pub sbp: Option<f64>,
    pub dbp: Option<f64>,
    pub implausible: Option<bool>,
    pub dropped: Option<i64>,
    pub alarm_active: Option<bool>,
    /// The device's boot epoch (`dropped` counts per boot); absent in rows written
    /// before the data set had the column.
    pub epoch: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Alert {
    pub alert_id: String,
    pub state: String,
    pub role: Option<String>,
    /// `ops` for an operational alert (not counted as an alert); otherwise the
    /// clinical sources (`rule`, `device-alarm`, `no-data`, `score`).
    pub source: Option<String>,
    pub at: i64,
    pub device: Option<String>,
    #[serde(flatten)]
    pub dims: Dims,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Score {
    pub model: String,
    pub version: String,
    pub observed_at: i64,
    pub aggregate: i64,
    pub complete: bool,
}

/// A refused message or a gap: a device-level occurrence at a time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Occurrence {
    /// `at` (refusals) or `opened_at` (gaps).
    #[serde(alias = "opened_at")]
    pub at: i64,
    pub device: Option<String>,
    #[serde(flatten)]
    pub dims: Dims,
}

/// The five tables.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct DataSet {
    pub events: Vec<Event>,
    pub alerts: Vec<Alert>,
    pub scores: Vec<Score>,
    pub refusals: Vec<Occurrence>,
    pub gaps: Vec<Occurrence>,
}

/// The ISO week (`YYYY-Www`) of a time, the data set's partition.
pub fn iso_week(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let (year, week, _) = t.to_iso_week_date();
    format!("{year}-W{week:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_weeks_across_the_year_end() {
        // 2026-11-16 is a Monday of W47; 2027-01-01 (a Friday) is in 2026-W53.
        assert_eq!(iso_week(1_794_787_200_000), "2026-W47");
        assert_eq!(iso_week(1_798_761_600_000), "2026-W53");
    }

    #[test]
    fn rows_read_from_the_fleet_json() {
        let d: DataSet = serde_json::from_str(
            r#"{"events": [{"event_id": "e", "kind": "status", "observed_at": 5,
                 "device": "dev-1", "lot": "LOT-C", "dropped": 3, "battery": 0.5}],
                "gaps": [{"device": "dev-1", "opened_at": 9, "epoch": 1}]}"#,
        )
        .expect("rows");
        assert_eq!(d.events[0].dims.lot.as_deref(), Some("LOT-C"));
        assert_eq!(d.events[0].dropped, Some(3));
        assert_eq!(d.gaps[0].at, 9);
    }
}
