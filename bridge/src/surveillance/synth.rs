//! A synthetic fleet written straight to the surveillance layout: `devices` devices,
//! `days` days, one vitals reading per `interval_s`, deterministic from `seed`, for
//! the shipped queries' tests and benchmarks (issue 21: "a simulated year of 1,000
//! devices at one reading per minute").
//!
//! The planted defect: devices of lot [`DEFECT_LOT`] drop [`DEFECT_FACTOR`] times more
//! messages than the others, and have as many times more gaps and refusals. Every
//! third device is of that lot (`LOT-A`, `LOT-B`, `LOT-C` in turn).
//!
//! What a device does per reading: with probability `drop` the reading is lost (counted
//! in the next hourly `status` event's `dropped`; one in four losses is also an open
//! `gap` row), with probability `refuse` it arrives but is refused (a `refusals` row),
//! else it is a `vitals` event. An hourly `status` event carries `battery` and
//! `dropped`; a rare `alarm` event carries a device alarm.
//!
//! Rows are generated week by week and written in files of at most
//! [`SynthConfig::max_rows`] rows, named by consecutive synthetic ids as the sink names
//! its files by store ids, so memory stays flat for a year of a large fleet.

use std::path::{Path, PathBuf};

use super::rows::{DeviceFacts, EventRow, GapRow, RefusalRow, Rows};
use super::write::{WriteError, to_parquet};
use super::{Table, file_name, iso_week};

/// The lot with the planted defect.
pub const DEFECT_LOT: &str = "LOT-C";
/// How many times more messages the defective lot drops (and gaps and refusals).
pub const DEFECT_FACTOR: f64 = 5.0;
/// Base probability that a reading is lost.
pub const BASE_DROP: f64 = 0.002;
/// Base probability that a reading is refused.
pub const BASE_REFUSE: f64 = 0.0005;

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthConfig {
    pub devices: u32,
    pub days: u32,
    /// Seconds between two readings of a device.
    pub interval_s: u32,
    pub seed: u64,
    /// First reading's time, ms since the Unix epoch (a Monday 00:00 UTC keeps weeks whole).
    pub start_ms: i64,
    /// Most rows in one file.
    pub max_rows: usize,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            devices: 10,
            days: 7,
            interval_s: 60,
            seed: 21,
            // 2026-01-05T00:00:00Z, a Monday (2026-W02).
            start_ms: 1_767_571_200_000,
            max_rows: 250_000,
        }
    }
}

/// What was written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SynthSummary {
    pub events: u64,
    pub refusals: u64,
    pub gaps: u64,
    pub dropped: u64,
    pub files: Vec<PathBuf>,
}

/// Why generating failed.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("writing {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("creating {}: {source}", path.display())]
    Dir {
        path: PathBuf,
        source: vitalmq_private_fs::PrivateFsError,
    },
    #[error("time {0} ms is out of range")]
    Time(i64),
}

/// splitmix64: a tiny, fixed, seedable generator, so a seed gives the same fleet on
/// every platform and version (a general-purpose RNG crate does not promise that).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Roughly normal (sum of four uniforms), mean 0, standard deviation ~1.
    fn normal(&mut self) -> f64 {
        ((self.unit() + self.unit() + self.unit() + self.unit()) - 2.0) * 1.732
    }
}

/// One synthetic device's fixed facts.
#[derive(Debug, Clone)]
pub struct SynthDevice {
    pub id: String,
    pub subject: String,
    pub facts: DeviceFacts,
    pub fw: String,
    pub model: String,
    pub model_status: String,
}

/// The fleet of `config`: lots in turn, four sites over two regions, two hardware
/// models, two firmware versions, two model versions (one of them unapproved).
pub fn fleet(config: &SynthConfig) -> Vec<SynthDevice> {
    (0..config.devices)
        .map(|i| {
            let lot = ["LOT-A", "LOT-B", DEFECT_LOT][i as usize % 3];
            let site = ["north", "south", "east", "west"][(i / 3) as usize % 4];
            let region = if matches!(site, "north" | "east") {
                "eu-1"
            } else {
                "eu-2"
            };
            let unapproved = i % 5 == 4;
            SynthDevice {
                id: format!("syn-{i:05}"),
                subject: format!("sv-{:016x}", Rng(config.seed ^ u64::from(i)).next()),
                facts: DeviceFacts {
                    site: Some(site.to_owned()),
                    region: Some(region.to_owned()),
                    lot: Some(lot.to_owned()),
                    hardware_model: Some(["hm-100", "hm-200"][i as usize % 2].to_owned()),
                },
                fw: ["1.4.2", "1.5.0"][(i / 2) as usize % 2].to_owned(),
                model: if unapproved {
                    "arrhythmia-net/2.2.0-rc1".to_owned()
                } else {
                    "arrhythmia-net/2.1.0".to_owned()
                },
                model_status: if unapproved { "unapproved" } else { "approved" }.to_owned(),
            }
        })
        .collect()
}

/// Buffers one table's rows of one week and writes them in files of `max_rows`.
struct Out<'a> {
    root: &'a Path,
    table: Table,
    week: String,
    rows: Rows,
    next_id: i64,
    max_rows: usize,
}

impl Out<'_> {
    fn flush(&mut self, summary: &mut SynthSummary) -> Result<(), SynthError> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let n = i64::try_from(self.rows.len()).unwrap_or(i64::MAX);
        let (first, last) = (self.next_id, self.next_id + n - 1);
        self.next_id = last + 1;
        let path = self
            .root
            .join(file_name(self.table, &self.week, first, last));
        let bytes = to_parquet(&self.rows)?;
        write_file(&path, &bytes)?;
        summary.files.push(path);
        self.rows = empty(self.table);
        Ok(())
    }

    fn full(&self) -> bool {
        self.rows.len() >= self.max_rows
    }
}

fn empty(table: Table) -> Rows {
    match table {
        Table::Events => Rows::Events(Vec::new()),
        Table::Alerts => Rows::Alerts(Vec::new()),
        Table::Scores => Rows::Scores(Vec::new()),
        Table::Refusals => Rows::Refusals(Vec::new()),
        Table::Gaps => Rows::Gaps(Vec::new()),
    }
}

/// Writes `bytes` at `path` owner-only, under a temporary name renamed into place, so
/// a reader never sees half a file.
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), SynthError> {
    let io = |source| SynthError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        vitalmq_private_fs::create_dir_all(dir).map_err(|source| SynthError::Dir {
            path: dir.to_owned(),
            source,
        })?;
    }
    let tmp = path.with_extension("parquet.tmp");
    {
        use std::io::Write as _;
        let mut f = vitalmq_private_fs::create_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(bytes).map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}

/// Generates the fleet of `config` into `root` (created owner-only), in the layout of
/// the surveillance sink.
pub fn generate(config: &SynthConfig, root: &Path) -> Result<SynthSummary, SynthError> {
    let fleet = fleet(config);
    let mut summary = SynthSummary::default();
    let interval_ms = i64::from(config.interval_s.max(1)) * 1000;
    let end_ms = config.start_ms + i64::from(config.days) * 86_400_000;
    let week_ms = 7 * 86_400_000;
    let max_rows = config.max_rows.max(1);
    let mut outs: Vec<Out<'_>> = [Table::Events, Table::Refusals, Table::Gaps]
        .into_iter()
        .map(|table| Out {
            root,
            table,
            week: String::new(),
            rows: empty(table),
            next_id: 1,
            max_rows,
        })
        .collect();
    let mut week_start = config.start_ms;
    while week_start < end_ms {
        let week_end = (week_start + week_ms).min(end_ms);
        let week = iso_week(week_start).ok_or(SynthError::Time(week_start))?;
        for out in &mut outs {
            out.week.clone_from(&week);
        }
        for (index, device) in fleet.iter().enumerate() {
            let defect = device.facts.lot.as_deref() == Some(DEFECT_LOT);
            let factor = if defect { DEFECT_FACTOR } else { 1.0 };
            // Per device and week, so a week is the same whatever came before it.
            let mut rng = Rng(config.seed
                ^ (index as u64).wrapping_mul(0x1000_0000_01B3)
                ^ (week_start as u64).rotate_left(17));
            let mut seq = ((week_start - config.start_ms) / interval_ms) as u64;
            let mut dropped_this_hour = 0i64;
            let mut at = week_start;
            let baseline = rng.normal() * 2.0;
            while at < week_end {
                seq += 1;
                let r = rng.unit();
                if r < BASE_DROP * factor {
                    dropped_this_hour += 1;
                    summary.dropped += 1;
                    if rng.unit() < 0.25 {
                        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
                        push_gap(&mut outs[2], device, seq, at);
                        summary.gaps += 1;
                    }
                } else if r < (BASE_DROP + BASE_REFUSE) * factor {
                    push_refusal(&mut outs[1], device, at, &mut rng);
                    summary.refusals += 1;
                } else {
                    push_event(&mut outs[0], device, seq, at, "vitals", &mut rng, baseline);
                    summary.events += 1;
                    if rng.unit() < 0.0005 {
                        push_event(&mut outs[0], device, seq, at, "alarm", &mut rng, baseline);
                        summary.events += 1;
                    }
                }
                if (at - config.start_ms) % 3_600_000 + interval_ms >= 3_600_000 {
                    if let Rows::Events(rows) = &mut outs[0].rows {
                        let mut status = base_row(device, seq, at, "status");
                        status.battery = Some(100.0 - ((at / 3_600_000) % 24) as f64 * 3.0);
                        status.dropped = Some(dropped_this_hour);
                        rows.push(status);
                    }
                    summary.events += 1;
                    dropped_this_hour = 0;
                }
                for out in &mut outs {
                    if out.full() {
                        out.flush(&mut summary)?;
                    }
                }
                at += interval_ms;
            }
        }
        for out in &mut outs {
            out.flush(&mut summary)?;
        }
        week_start = week_end;
    }
    Ok(summary)
}

fn base_row(device: &SynthDevice, seq: u64, at: i64, kind: &str) -> EventRow {
    EventRow {
        event_id: format!("syn-{}-{seq}-{kind}", device.id),
        kind: Some(kind.to_owned()),
        observed_at: Some(at),
        received_at: Some(at + 150),
        device: Some(device.id.clone()),
        subject: Some(device.subject.clone()),
        facts: device.facts.clone(),
        fw: Some(device.fw.clone()),
        model: Some(device.model.clone()),
        model_status: Some(device.model_status.clone()),
        implausible: Some(false),
        ..EventRow::default()
    }
}

#[allow(clippy::too_many_arguments)]
fn push_event(
    out: &mut Out<'_>,
    device: &SynthDevice,
    seq: u64,
    at: i64,
    kind: &str,
    rng: &mut Rng,
    baseline: f64,
) {
    let mut row = base_row(device, seq, at, kind);
    if kind == "alarm" {
        row.alarm_code = Some("arrhythmia".to_owned());
        row.alarm_level = Some("urgent".to_owned());
        row.alarm_active = Some(true);
    } else {
        let round = |x: f64| (x * 10.0).round() / 10.0;
        row.spo2 = Some(
            (96.0 + baseline * 0.5 + rng.normal() * 1.5)
                .clamp(70.0, 100.0)
                .round(),
        );
        row.pulse = Some((72.0 + baseline * 3.0 + rng.normal() * 8.0).round());
        row.resp = Some((15.0 + rng.normal() * 2.0).round());
        row.temp = Some(round(36.8 + rng.normal() * 0.3));
        row.q = Some(round(0.9 + rng.normal() * 0.03).min(1.0));
    }
    if let Rows::Events(rows) = &mut out.rows {
        rows.push(row);
    }
}

fn push_refusal(out: &mut Out<'_>, device: &SynthDevice, at: i64, rng: &mut Rng) {
    let reason = ["bad_signature", "replay", "schema", "clock"][(rng.next() % 4) as usize];
    if let Rows::Refusals(rows) = &mut out.rows {
        rows.push(RefusalRow {
            at: Some(at + 150),
            device: Some(device.id.clone()),
            facts: device.facts.clone(),
            fw: Some(device.fw.clone()),
            reason: Some(reason.to_owned()),
        });
    }
}

fn push_gap(out: &mut Out<'_>, device: &SynthDevice, seq: i64, at: i64) {
    if let Rows::Gaps(rows) = &mut out.rows {
        rows.push(GapRow {
            device: Some(device.id.clone()),
            facts: device.facts.clone(),
            fw: Some(device.fw.clone()),
            epoch: Some(1),
            from_seq: Some(seq),
            to_seq: Some(seq),
            state: Some("lost".to_owned()),
            opened_at: Some(at),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> SynthConfig {
        SynthConfig {
            devices: 6,
            days: 2,
            interval_s: 60,
            ..SynthConfig::default()
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_files() {
        let (a, b) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        let sa = generate(&small(), a.path()).expect("generate");
        let sb = generate(&small(), b.path()).expect("generate");
        assert_eq!(
            (sa.events, sa.refusals, sa.gaps),
            (sb.events, sb.refusals, sb.gaps)
        );
        assert!(
            sa.events > 6 * 2 * 1400,
            "about one reading a minute: {}",
            sa.events
        );
        for (fa, fb) in sa.files.iter().zip(&sb.files) {
            assert_eq!(
                fa.strip_prefix(a.path()).ok(),
                fb.strip_prefix(b.path()).ok()
            );
            assert_eq!(std::fs::read(fa).expect("a"), std::fs::read(fb).expect("b"));
        }
        assert!(
            sa.files[0]
                .to_string_lossy()
                .contains("events/week=2026-W02/part-1-"),
            "{:?}",
            sa.files[0]
        );
    }

    #[test]
    fn the_defective_lot_drops_more() {
        let config = SynthConfig {
            devices: 30,
            days: 3,
            ..SynthConfig::default()
        };
        let fleet = fleet(&config);
        assert_eq!(
            fleet
                .iter()
                .filter(|d| d.facts.lot.as_deref() == Some(DEFECT_LOT))
                .count(),
            10
        );
        let dir = tempfile::tempdir().expect("dir");
        let summary = generate(&config, dir.path()).expect("generate");
        // Expected drops: 20 devices x p + 10 devices x 5p; LOT-C holds 5/7 of them.
        let readings = 30.0 * 3.0 * 1440.0;
        let expected = readings * BASE_DROP * (20.0 + 50.0) / 30.0;
        let got = summary.dropped as f64;
        assert!(
            (got - expected).abs() < expected * 0.25,
            "{got} vs {expected}"
        );
        // Every drop is reported by the hour's status row, as a device does.
        let mut reported = 0;
        for file in summary
            .files
            .iter()
            .filter(|f| f.to_string_lossy().contains("events"))
        {
            let bytes = bytes::Bytes::from(std::fs::read(file).expect("read"));
            let reader =
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
                    .expect("parquet")
                    .build()
                    .expect("reader");
            for batch in reader {
                let batch = batch.expect("batch");
                let dropped = batch
                    .column_by_name("dropped")
                    .expect("dropped")
                    .as_any()
                    .downcast_ref::<arrow_array::Int64Array>()
                    .expect("int64");
                reported += dropped.iter().flatten().sum::<i64>();
            }
        }
        assert_eq!(u64::try_from(reported).ok(), Some(summary.dropped));
    }
}
