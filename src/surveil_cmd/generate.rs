//! `vitalmq surveil generate`: a synthetic fleet written in the surveillance data set's
//! layout (`vitalmq_bridge::surveillance::synth`, with the planted LOT-C defect), for
//! the shipped queries' benchmark (`scripts/bench-surveil`) and tests. Nothing in it is
//! patient-linked (subjects are synthetic pseudonyms), so it is not an audited access.
//!
//! The output directory is created owner-only and must be new or empty (files of an
//! earlier, larger run would otherwise stay in the data set). Besides the tables it
//! holds `synth.json`: the parameters and the generator's truth (what it wrote, per
//! lot, in the queries' terms), also printed with `--json`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;
use vitalmq_bridge::surveillance::synth::{self, SynthConfig};

/// The truth file written next to the tables.
pub const TRUTH_FILE: &str = "synth.json";

#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    /// Devices in the fleet (lots LOT-A, LOT-B, LOT-C in turn).
    #[arg(long, default_value_t = 1000)]
    devices: u32,
    /// Days of data, from --start.
    #[arg(long, default_value_t = 7)]
    days: u32,
    /// Time between two readings of a device (whole seconds, at least 1s).
    #[arg(long, default_value = "60s", value_parser = vitalmq_device_sim::runner::parse_duration)]
    interval: Duration,
    /// Seed: the same seed writes the same files.
    #[arg(long, default_value_t = 21)]
    seed: u64,
    /// First day (UTC, `YYYY-MM-DD`); a Monday keeps ISO weeks whole.
    #[arg(long, default_value = "2026-01-05")]
    start: String,
    /// Most rows in one Parquet file.
    #[arg(long, default_value_t = 250_000)]
    max_rows: usize,
    /// The data set's root directory (new or empty).
    #[arg(long)]
    out: PathBuf,
}

fn start_ms(day: &str) -> anyhow::Result<i64> {
    let format = time::format_description::parse("[year]-[month]-[day]")?;
    let date = time::Date::parse(day, &format)
        .with_context(|| format!("--start {day}: not a date YYYY-MM-DD"))?;
    let at = date.midnight().assume_utc();
    Ok(i64::try_from(at.unix_timestamp_nanos() / 1_000_000)?)
}

fn ensure_empty(dir: &Path) -> anyhow::Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            anyhow::ensure!(
                entries.next().is_none(),
                "{}: not empty (generate into a new directory)",
                dir.display()
            );
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| dir.display().to_string()),
    }
}

pub fn run(args: &GenerateArgs, json_out: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.interval.as_secs() >= 1 && args.interval.subsec_nanos() == 0,
        "--interval: whole seconds, at least 1s"
    );
    ensure_empty(&args.out)?;
    vitalmq_private_fs::create_dir_all(&args.out)?;
    let config = SynthConfig {
        devices: args.devices,
        days: args.days,
        interval_s: u32::try_from(args.interval.as_secs()).context("--interval: too long")?,
        seed: args.seed,
        start_ms: start_ms(&args.start)?,
        max_rows: args.max_rows.max(1),
    };
    let started = std::time::Instant::now();
    let summary = synth::generate(&config, &args.out)
        .with_context(|| format!("generating into {}", args.out.display()))?;
    let elapsed = started.elapsed();
    let bytes: u64 = summary
        .files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let truth = json!({
        "format": "vitalmq-synth/v1",
        "parameters": {
            "devices": args.devices, "days": args.days,
            "interval_s": config.interval_s, "seed": args.seed,
            "start": args.start, "max_rows": config.max_rows,
        },
        "defect_lot": synth::DEFECT_LOT,
        "score_model": synth::SCORE_MODEL,
        "live_version": synth::LIVE_VERSION,
        "candidate_version": synth::CANDIDATE_VERSION,
        "files": summary.files.len(),
        "bytes": bytes,
        "truth": summary,
    });
    let text = serde_json::to_string_pretty(&truth)?;
    let path = args.out.join(TRUTH_FILE);
    {
        use std::io::Write as _;
        let mut f = vitalmq_private_fs::create_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .with_context(|| path.display().to_string())?;
        f.write_all(text.as_bytes())
            .with_context(|| path.display().to_string())?;
    }
    tracing::info!(
        devices = args.devices,
        days = args.days,
        events = summary.events,
        files = summary.files.len(),
        bytes,
        elapsed_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
        "synthetic fleet written"
    );
    if json_out {
        println!("{}", serde_json::to_string(&truth)?);
    } else {
        println!(
            "{} events, {} alerts rows, {} scores, {} refusals, {} gaps ({} dropped) in {} files, {bytes} bytes, {:.1?}: {}",
            summary.events,
            summary.alerts,
            summary.scores,
            summary.refusals,
            summary.gaps,
            summary.dropped,
            summary.files.len(),
            elapsed,
            args.out.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_days_are_utc_midnights() {
        assert_eq!(start_ms("2026-01-05").expect("date"), 1_767_571_200_000);
        assert!(start_ms("5 Jan").is_err());
    }
}
