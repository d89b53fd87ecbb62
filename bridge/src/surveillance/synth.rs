//! A synthetic fleet written straight to the surveillance layout: `devices` devices,
//! `days` days, one vitals reading per `interval_s`, deterministic from `seed`, for
//! the shipped queries' tests and benchmarks (issue 21: "a simulated year of 1,000
//! devices at one reading per minute"; `vitalmq surveil generate`).
//!
//! The planted defect: devices of lot [`DEFECT_LOT`] drop [`DEFECT_FACTOR`] times more
//! messages than the others, and have as many times more gaps and refusals. Every
//! third device is of that lot (`LOT-A`, `LOT-B`, `LOT-C` in turn).
//!
//! What a device does per reading: with probability `drop` the reading is lost (counted
//! by the boot's `dropped` counter; one in four losses is also a `lost` gap row), with
//! probability `refuse` it arrives but is refused (a `refusals` row), else it is a
//! `vitals` event. An hourly `status` event carries `battery` and `dropped`, the
//! boot's cumulative count of lost messages (as a device reports it, SPEC section 4),
//! and with it a NEWS2-style `scores` row of the hour's last reading by the live
//! version [`LIVE_VERSION`] and one by the shadow candidate [`CANDIDATE_VERSION`]
//! (one point higher); a live score of [`ALERT_AGGREGATE`] or more raises an alert,
//! as does a rare device `alarm` event (raised, then resolved).
//!
//! Boots: every device boots at the start of each generated week (so a week does not
//! depend on the ones before it) and reboots after a status with probability
//! [`REBOOT_P`]; each boot has a new `epoch` and its counter starts from zero. A new
//! boot's first counter is often not lower than the previous boot's last one: only the
//! `epoch` column tells them apart.
//!
//! [`generate`] returns its truth ([`SynthSummary`]): what it wrote, per lot, in the
//! terms of the shipped queries (device-weeks, readings, and each measure), so tests
//! compare the queries' answers with it.
//!
//! Rows are generated week by week and written in files of at most
//! [`SynthConfig::max_rows`] rows, named by consecutive synthetic ids as the sink names
//! its files by store ids, so memory stays flat for a year of a large fleet.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::rows::{AlertRow, DeviceFacts, EventRow, GapRow, RefusalRow, Rows, ScoreRow};
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
/// Probability that a device reboots after a status event.
pub const REBOOT_P: f64 = 0.01;
/// The score model of the `scores` rows, its live and its candidate (shadow) version.
pub const SCORE_MODEL: &str = "news2";
pub const LIVE_VERSION: &str = "1.0.0";
pub const CANDIDATE_VERSION: &str = "1.1.0";
/// A score at least this high raises an alert (`news2-medium`).
pub const ALERT_AGGREGATE: i32 = 5;

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

/// What was written for one group of devices (a lot, or the whole fleet), in the
/// shipped queries' terms (`queries/views.sql`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub devices: u64,
    /// (device, ISO week) pairs with any event.
    pub device_weeks: u64,
    /// `vitals` events.
    pub readings: u64,
    /// Every `events` row (vitals, status, alarm).
    pub events: u64,
    pub status: u64,
    /// Boots seen (distinct (device, epoch)).
    pub boots: u64,
    /// `alarm` events with `alarm_active` (measure `device_alarms`).
    pub device_alarms: u64,
    /// Messages lost (measure `dropped`: the counters' increases).
    pub dropped: u64,
    pub gaps: u64,
    pub refusals: u64,
    /// Alerts raised, shadow ones left out (measure `alerts`).
    pub alerts: u64,
    /// Alert rows written (every state change, shadow ones included).
    pub alert_rows: u64,
    /// Score rows of the live and of the candidate version.
    pub live_scores: u64,
    pub candidate_scores: u64,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        self.devices += other.devices;
        self.device_weeks += other.device_weeks;
        self.readings += other.readings;
        self.events += other.events;
        self.status += other.status;
        self.boots += other.boots;
        self.device_alarms += other.device_alarms;
        self.dropped += other.dropped;
        self.gaps += other.gaps;
        self.refusals += other.refusals;
        self.alerts += other.alerts;
        self.alert_rows += other.alert_rows;
        self.live_scores += other.live_scores;
        self.candidate_scores += other.candidate_scores;
    }
}

/// What was written: the generator's truth.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SynthSummary {
    /// Rows of `events`.
    pub events: u64,
    pub refusals: u64,
    pub gaps: u64,
    /// Messages lost (all reported by a status row's counter).
    pub dropped: u64,
    /// Rows of `alerts` and `scores`.
    pub alerts: u64,
    pub scores: u64,
    /// ISO weeks written, in order.
    pub weeks: Vec<String>,
    /// The whole fleet and each lot.
    pub fleet: Counts,
    pub lots: BTreeMap<String, Counts>,
    #[serde(skip)]
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

impl SynthDevice {
    fn lot(&self) -> &str {
        self.facts.lot.as_deref().unwrap_or_default()
    }
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

/// The five tables' buffers, in [`Table::ALL`] order.
struct Outs<'a>([Out<'a>; 5]);

impl<'a> Outs<'a> {
    fn new(root: &'a Path, max_rows: usize) -> Self {
        Self(Table::ALL.map(|table| Out {
            root,
            table,
            week: String::new(),
            rows: empty(table),
            next_id: 1,
            max_rows,
        }))
    }

    fn set_week(&mut self, week: &str) {
        for out in &mut self.0 {
            out.week = week.to_owned();
        }
    }

    // Each buffer holds its table's rows (set up in `new`), so each push lands.
    fn event(&mut self, row: EventRow) {
        if let Rows::Events(rows) = &mut self.0[0].rows {
            rows.push(row);
        }
    }

    fn alert(&mut self, row: AlertRow) {
        if let Rows::Alerts(rows) = &mut self.0[1].rows {
            rows.push(row);
        }
    }

    fn score(&mut self, row: ScoreRow) {
        if let Rows::Scores(rows) = &mut self.0[2].rows {
            rows.push(row);
        }
    }

    fn refusal(&mut self, row: RefusalRow) {
        if let Rows::Refusals(rows) = &mut self.0[3].rows {
            rows.push(row);
        }
    }

    fn gap(&mut self, row: GapRow) {
        if let Rows::Gaps(rows) = &mut self.0[4].rows {
            rows.push(row);
        }
    }

    fn flush_full(&mut self, summary: &mut SynthSummary) -> Result<(), SynthError> {
        for out in &mut self.0 {
            if out.full() {
                out.flush(summary)?;
            }
        }
        Ok(())
    }

    fn flush_all(&mut self, summary: &mut SynthSummary) -> Result<(), SynthError> {
        for out in &mut self.0 {
            out.flush(summary)?;
        }
        Ok(())
    }
}

/// Generates the fleet of `config` into `root` (created owner-only), in the layout of
/// the surveillance sink, and returns what it wrote.
pub fn generate(config: &SynthConfig, root: &Path) -> Result<SynthSummary, SynthError> {
    let fleet = fleet(config);
    let mut summary = SynthSummary::default();
    let mut lots: BTreeMap<String, Counts> = BTreeMap::new();
    for device in &fleet {
        lots.entry(device.lot().to_owned()).or_default().devices += 1;
    }
    let interval_ms = i64::from(config.interval_s.max(1)) * 1000;
    let end_ms = config.start_ms + i64::from(config.days) * 86_400_000;
    let week_ms = 7 * 86_400_000;
    let mut outs = Outs::new(root, config.max_rows.max(1));
    let mut week_start = config.start_ms;
    let mut week_index = 0u64;
    while week_start < end_ms {
        let week_end = (week_start + week_ms).min(end_ms);
        let week = iso_week(week_start).ok_or(SynthError::Time(week_start))?;
        outs.set_week(&week);
        summary.weeks.push(week);
        for (index, device) in fleet.iter().enumerate() {
            let counts = lots.entry(device.lot().to_owned()).or_default();
            let mut state = DeviceWeek {
                device,
                // Per device and week, so a week is the same whatever came before it.
                rng: Rng(config.seed
                    ^ (index as u64).wrapping_mul(0x1000_0000_01B3)
                    ^ (week_start as u64).rotate_left(17)),
                factor: if device.lot() == DEFECT_LOT {
                    DEFECT_FACTOR
                } else {
                    1.0
                },
                // A boot per week (epochs of week w are 1 + 1000 w, 2 + 1000 w, ...).
                epoch: 1 + 1000 * week_index,
                seq: 0,
                dropped: 0,
                baseline: 0.0,
                last_vitals: None,
                counts: Counts {
                    boots: 1,
                    ..Counts::default()
                },
            };
            state.baseline = state.rng.normal() * 2.0;
            let mut at = week_start;
            while at < week_end {
                state.reading(&mut outs, at);
                if (at - config.start_ms) % 3_600_000 + interval_ms >= 3_600_000 {
                    state.hour_end(&mut outs, at);
                }
                outs.flush_full(&mut summary)?;
                at += interval_ms;
            }
            // Exposure as `queries/views.sql` counts it: any row of the device-week.
            if state.counts.events + state.counts.refusals + state.counts.gaps > 0 {
                state.counts.device_weeks = 1;
            }
            counts.add(&state.counts);
        }
        outs.flush_all(&mut summary)?;
        week_start = week_end;
        week_index += 1;
    }
    for counts in lots.values() {
        summary.fleet.add(counts);
    }
    summary.events = summary.fleet.events;
    summary.refusals = summary.fleet.refusals;
    summary.gaps = summary.fleet.gaps;
    summary.dropped = summary.fleet.dropped;
    summary.alerts = summary.fleet.alert_rows;
    summary.scores = summary.fleet.live_scores + summary.fleet.candidate_scores;
    summary.lots = lots;
    Ok(summary)
}

/// One device's generated week.
struct DeviceWeek<'d> {
    device: &'d SynthDevice,
    rng: Rng,
    factor: f64,
    baseline: f64,
    epoch: u64,
    seq: u64,
    /// This boot's lost messages so far (the status counter).
    dropped: i64,
    /// The hour's last vitals reading (time, values) for its score.
    last_vitals: Option<(i64, Vitals)>,
    counts: Counts,
}

#[derive(Debug, Clone, Copy)]
struct Vitals {
    spo2: f64,
    pulse: f64,
    resp: f64,
    temp: f64,
    sbp: f64,
}

impl DeviceWeek<'_> {
    fn reading(&mut self, outs: &mut Outs<'_>, at: i64) {
        self.seq += 1;
        let r = self.rng.unit();
        if r < BASE_DROP * self.factor {
            self.dropped += 1;
            self.counts.dropped += 1;
            if self.rng.unit() < 0.25 {
                let seq = i64::try_from(self.seq).unwrap_or(i64::MAX);
                outs.gap(GapRow {
                    device: Some(self.device.id.clone()),
                    facts: self.device.facts.clone(),
                    fw: Some(self.device.fw.clone()),
                    epoch: i64::try_from(self.epoch).ok(),
                    from_seq: Some(seq),
                    to_seq: Some(seq),
                    state: Some("lost".to_owned()),
                    opened_at: Some(at + 150),
                });
                self.counts.gaps += 1;
            }
        } else if r < (BASE_DROP + BASE_REFUSE) * self.factor {
            let reason =
                ["bad_signature", "replay", "schema", "clock"][(self.rng.next() % 4) as usize];
            outs.refusal(RefusalRow {
                at: Some(at + 150),
                device: Some(self.device.id.clone()),
                facts: self.device.facts.clone(),
                fw: Some(self.device.fw.clone()),
                reason: Some(reason.to_owned()),
            });
            self.counts.refusals += 1;
        } else {
            self.vitals(outs, at);
            if self.rng.unit() < 0.0005 {
                self.alarm(outs, at);
            }
        }
    }

    fn row(&self, at: i64, kind: &str) -> EventRow {
        EventRow {
            event_id: format!("syn-{}-{}-{}-{kind}", self.device.id, self.epoch, self.seq),
            kind: Some(kind.to_owned()),
            observed_at: Some(at),
            received_at: Some(at + 150),
            device: Some(self.device.id.clone()),
            subject: Some(self.device.subject.clone()),
            facts: self.device.facts.clone(),
            fw: Some(self.device.fw.clone()),
            model: Some(self.device.model.clone()),
            model_status: Some(self.device.model_status.clone()),
            implausible: Some(false),
            epoch: i64::try_from(self.epoch).ok(),
            ..EventRow::default()
        }
    }

    fn vitals(&mut self, outs: &mut Outs<'_>, at: i64) {
        let rng = &mut self.rng;
        let round = |x: f64| (x * 10.0).round() / 10.0;
        let v = Vitals {
            spo2: (96.0 + self.baseline * 0.5 + rng.normal() * 1.5)
                .clamp(70.0, 100.0)
                .round(),
            pulse: (72.0 + self.baseline * 3.0 + rng.normal() * 8.0).round(),
            resp: (15.0 + rng.normal() * 2.0).round(),
            temp: round(36.8 + rng.normal() * 0.3),
            sbp: (122.0 + rng.normal() * 12.0).round(),
        };
        let q = round(0.9 + rng.normal() * 0.03).min(1.0);
        let mut row = self.row(at, "vitals");
        row.spo2 = Some(v.spo2);
        row.pulse = Some(v.pulse);
        row.resp = Some(v.resp);
        row.temp = Some(v.temp);
        row.sbp = Some(v.sbp);
        row.q = Some(q);
        outs.event(row);
        self.last_vitals = Some((at, v));
        self.counts.events += 1;
        self.counts.readings += 1;
    }

    fn alarm(&mut self, outs: &mut Outs<'_>, at: i64) {
        for active in [true, false] {
            let mut row = self.row(at + if active { 0 } else { 1 }, "alarm");
            row.event_id.push_str(if active { "-on" } else { "-off" });
            row.alarm_code = Some("arrhythmia".to_owned());
            row.alarm_level = Some("urgent".to_owned());
            row.alarm_active = Some(active);
            outs.event(row);
            self.counts.events += 1;
        }
        self.counts.device_alarms += 1;
        let id = format!("syn-al-{}-{}-{}", self.device.id, self.epoch, self.seq);
        self.alert(outs, &id, "device-alarm", "device-alarm", "1", "live", at);
    }

    #[allow(clippy::too_many_arguments)]
    fn alert(
        &mut self,
        outs: &mut Outs<'_>,
        id: &str,
        rule: &str,
        source: &str,
        version: &str,
        role: &str,
        at: i64,
    ) {
        for (state, t) in [("open", at + 200), ("resolved", at + 500)] {
            outs.alert(AlertRow {
                alert_id: id.to_owned(),
                state: Some(state.to_owned()),
                rule: Some(rule.to_owned()),
                rule_version: Some(version.to_owned()),
                severity: Some("high".to_owned()),
                source: Some(source.to_owned()),
                role: Some(role.to_owned()),
                at: Some(t),
                device: Some(self.device.id.clone()),
                subject: Some(self.device.subject.clone()),
                facts: self.device.facts.clone(),
                fw: Some(self.device.fw.clone()),
                model: Some(self.device.model.clone()),
                model_status: Some(self.device.model_status.clone()),
                rule_set_version: None,
            });
            self.counts.alert_rows += 1;
        }
        if role != "shadow" {
            self.counts.alerts += 1;
        }
    }

    /// The hour's status (the boot's counter), its scores, and maybe a reboot.
    fn hour_end(&mut self, outs: &mut Outs<'_>, at: i64) {
        let mut status = self.row(at + 1, "status");
        status.battery = Some(100.0 - ((at / 3_600_000) % 24) as f64 * 3.0);
        status.dropped = Some(self.dropped);
        outs.event(status);
        self.counts.events += 1;
        self.counts.status += 1;
        if let Some((observed, v)) = self.last_vitals.take() {
            let live = news2_like(&v);
            for (version, role, aggregate) in [
                (LIVE_VERSION, "live", live),
                (CANDIDATE_VERSION, "shadow", (live + 1).min(20)),
            ] {
                let score_id = format!(
                    "syn-sc-{}-{}-{}-{version}",
                    self.device.id, self.epoch, self.seq
                );
                outs.score(ScoreRow {
                    score_id: score_id.clone(),
                    model: Some(SCORE_MODEL.to_owned()),
                    version: Some(version.to_owned()),
                    config_sha256: Some(format!("{:064x}", u8::from(role == "live"))),
                    role: Some(role.to_owned()),
                    observed_at: Some(observed),
                    subject: Some(self.device.subject.clone()),
                    facts: self.device.facts.clone(),
                    device: Some(self.device.id.clone()),
                    fw: Some(self.device.fw.clone()),
                    aggregate: Some(aggregate),
                    risk: Some(
                        if aggregate >= ALERT_AGGREGATE {
                            "medium"
                        } else {
                            "low"
                        }
                        .to_owned(),
                    ),
                    complete: Some(true),
                    red: Some(false),
                    missing: Some(String::new()),
                });
                if role == "live" {
                    self.counts.live_scores += 1;
                } else {
                    self.counts.candidate_scores += 1;
                }
                if aggregate >= ALERT_AGGREGATE {
                    let id = format!("syn-al-{score_id}");
                    self.alert(outs, &id, "news2-medium", "score", version, role, at);
                }
            }
        }
        if self.rng.unit() < REBOOT_P {
            self.epoch += 1;
            self.seq = 0;
            self.dropped = 0;
            self.counts.boots += 1;
        }
    }
}

/// The NEWS2 (RCP 2017) points of a synthetic reading's five parameters (SpO2 scale 1;
/// no consciousness or oxygen): data for the score tables, not the bridge's scorer.
fn news2_like(v: &Vitals) -> i32 {
    let band = |x: f64, bands: &[(f64, i32)], top: i32| {
        bands
            .iter()
            .find(|(hi, _)| x < *hi)
            .map_or(top, |(_, points)| *points)
    };
    band(v.spo2, &[(92.0, 3), (94.0, 2), (96.0, 1)], 0)
        + band(v.resp, &[(9.0, 3), (12.0, 1), (21.0, 0), (25.0, 2)], 3)
        + band(
            v.pulse,
            &[(41.0, 3), (51.0, 1), (91.0, 0), (111.0, 1), (131.0, 2)],
            3,
        )
        + band(v.temp, &[(35.05, 3), (36.05, 1), (38.05, 0), (39.05, 1)], 2)
        + band(v.sbp, &[(91.0, 3), (101.0, 2), (111.0, 1), (220.0, 0)], 3)
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
        use arrow_array::Array as _;

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
        // Every drop is reported by a status row's per-boot counter, as a device does:
        // the last (highest) value of each (device, epoch) sums to the drops.
        let mut boots: BTreeMap<(String, i64), i64> = BTreeMap::new();
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
                let column = |name| {
                    batch
                        .column_by_name(name)
                        .unwrap_or_else(|| panic!("{name}"))
                        .clone()
                };
                let dropped = column("dropped");
                let dropped = dropped
                    .as_any()
                    .downcast_ref::<arrow_array::Int64Array>()
                    .expect("int64");
                let epoch = column("epoch");
                let epoch = epoch
                    .as_any()
                    .downcast_ref::<arrow_array::Int64Array>()
                    .expect("int64");
                let device = column("device");
                let device = device
                    .as_any()
                    .downcast_ref::<arrow_array::StringArray>()
                    .expect("utf8");
                for i in 0..batch.num_rows() {
                    if dropped.is_valid(i) {
                        let top = boots
                            .entry((device.value(i).to_owned(), epoch.value(i)))
                            .or_default();
                        *top = (*top).max(dropped.value(i));
                    }
                }
            }
        }
        let reported: i64 = boots.values().sum();
        assert!(
            summary.fleet.boots > 30,
            "a boot per device-week at least: {}",
            summary.fleet.boots
        );
        assert_eq!(u64::try_from(boots.len()).ok(), Some(summary.fleet.boots));
        assert_eq!(u64::try_from(reported).ok(), Some(summary.dropped));
    }
}
