//! The surveillance data set (issue 21, point 5): normalized events, alerts, scores,
//! refusals and gaps as Parquet files, partitioned Hive-style by ISO week, with
//! per-device facts (site, region, lot, hardware model, firmware, model version) and
//! purpose-cleared pseudonyms only. The layout and every column are documented in
//! `docs/surveillance.md`; this module is its one definition in code:
//!
//! * [`rows`]: one row type per table, its builders from what the store holds, and its
//!   Arrow schema;
//! * [`write`]: rows to Parquet bytes (snappy);
//! * [`synth`]: a deterministic synthetic fleet written straight to the same layout.
//!
//! File names: `<table>/week=YYYY-Www/part-<first id>-<last id>.parquet`, the ids of
//! the store rows the file covers ([`file_name`]); a redelivery writes the same name.

pub mod consent;
pub mod rows;
pub mod synth;
pub mod write;

use time::OffsetDateTime;

/// The tables of the data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Events,
    Alerts,
    Scores,
    Refusals,
    Gaps,
}

impl Table {
    pub const ALL: [Table; 5] = [
        Table::Events,
        Table::Alerts,
        Table::Scores,
        Table::Refusals,
        Table::Gaps,
    ];

    /// The table's directory under the sink's root.
    pub fn dir(self) -> &'static str {
        match self {
            Table::Events => "events",
            Table::Alerts => "alerts",
            Table::Scores => "scores",
            Table::Refusals => "refusals",
            Table::Gaps => "gaps",
        }
    }
}

/// The ISO week of a Unix time in ms, as its Hive partition value (`2026-W49`); `None`
/// when the time is out of range.
pub fn iso_week(ms: i64) -> Option<String> {
    let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()?;
    let (year, week, _) = at.to_iso_week_date();
    Some(format!("{year:04}-W{week:02}"))
}

/// The name of the file of `table` for `week` covering store ids `first..=last`,
/// relative to the sink's root.
pub fn file_name(table: Table, week: &str, first: i64, last: i64) -> String {
    format!("{}/week={week}/part-{first}-{last}.parquet", table.dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_weeks_follow_iso_8601_across_year_ends() {
        // 2026-12-05 is a Saturday in ISO week 49.
        assert_eq!(iso_week(1_796_428_800_000).as_deref(), Some("2026-W49"));
        // 2021-01-03 (Sunday) still belongs to 2020-W53.
        assert_eq!(iso_week(1_609_632_000_000).as_deref(), Some("2020-W53"));
        // 2024-12-30 (Monday) is 2025-W01.
        assert_eq!(iso_week(1_735_516_800_000).as_deref(), Some("2025-W01"));
        assert_eq!(iso_week(i64::MAX), None);
    }

    #[test]
    fn file_names_are_hive_partitions_named_by_the_id_range() {
        assert_eq!(
            file_name(Table::Events, "2026-W49", 7, 42),
            "events/week=2026-W49/part-7-42.parquet"
        );
        assert_eq!(
            Table::ALL.map(Table::dir),
            ["events", "alerts", "scores", "refusals", "gaps"]
        );
    }
}
