//! Runs N simulated devices together (`vitalmq sim`) and sums up what became of their
//! messages.
//!
//! The devices are the first N device identities of a PKI made by `vitalmq certs init`
//! (sorted by id), each with its certificate, its COSE key and its own epoch file in the
//! state directory. They share one time zero, so scripted episodes line up. The summary
//! says, per device and in total, what was sent, resent, receipted and still held;
//! `all_receipted` is true only when every device's every message is covered by a
//! receipt and no device dropped one from a full outbox.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Serialize;
use tokio::sync::{oneshot, watch};
use vitalmq_envelope::DeviceId;

use crate::device::{DeviceReport, SimDevice};
use crate::link::{DeviceLink, LinkOptions, Schedule};
use crate::pki::Pki;
use crate::vitals::{Episode, EpisodeKind, VitalsModel};

/// When an episode starts if `@START` is not given.
pub const DEFAULT_EPISODE_START: Duration = Duration::from_secs(10);

/// `KIND:DEVICE[@START]` from the command line, e.g. `desaturation:dev-00001@30s`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpisodeSpec {
    pub kind: EpisodeKind,
    pub device: String,
    pub start: Duration,
}

impl FromStr for EpisodeSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, rest) = s
            .split_once(':')
            .ok_or_else(|| format!("episode `{s}`: expected KIND:DEVICE[@START]"))?;
        let (device, start) = match rest.split_once('@') {
            Some((d, t)) => (
                d,
                parse_duration(t).map_err(|e| format!("episode `{s}`: {e}"))?,
            ),
            None => (rest, DEFAULT_EPISODE_START),
        };
        DeviceId::new(device)
            .map_err(|_| format!("episode `{s}`: `{device}` is not a device id"))?;
        Ok(Self {
            kind: kind.parse()?,
            device: device.to_owned(),
            start,
        })
    }
}

/// A duration as `500ms`, `30s`, `5m`, `1h` or plain seconds (`2.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 500ms, 30s, 5m, 1h)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("`{s}` is not a duration"))
}

/// What `vitalmq sim` runs.
#[derive(Debug, Clone)]
pub struct SimOptions {
    pub pki: PathBuf,
    pub state: PathBuf,
    pub devices: usize,
    pub seed: u64,
    pub fw: String,
    pub episodes: Vec<EpisodeSpec>,
    pub link: LinkOptions,
    pub schedule: Schedule,
}

/// Sums over all devices.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    pub devices: usize,
    pub sent: u64,
    pub resent: u64,
    pub unreceipted: usize,
    pub overflow_dropped: u64,
    pub vitals: u64,
    pub status: u64,
    pub connects: u64,
    pub errors: usize,
}

/// The one-line JSON summary of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub all_receipted: bool,
    pub elapsed_s: f64,
    pub totals: Totals,
    pub devices: Vec<DeviceReport>,
}

impl Summary {
    fn new(devices: Vec<DeviceReport>, elapsed: Duration) -> Self {
        let mut totals = Totals {
            devices: devices.len(),
            ..Totals::default()
        };
        for d in &devices {
            totals.sent += d.sent;
            totals.resent += d.resent;
            totals.unreceipted += d.unreceipted;
            totals.overflow_dropped += d.overflow_dropped;
            totals.vitals += d.vitals;
            totals.status += d.status;
            totals.connects += d.connects;
            totals.errors += usize::from(d.error.is_some());
        }
        Self {
            all_receipted: devices.iter().all(|d| d.all_receipted),
            elapsed_s: (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            totals,
            devices,
        }
    }
}

/// Boots the devices and runs them until their schedule is done or `stop` turns true.
/// `on_ready(n)` is called once, when all `n` devices have connected the first time.
pub async fn run(
    opts: SimOptions,
    stop: watch::Receiver<bool>,
    on_ready: impl FnOnce(usize) + Send + 'static,
) -> anyhow::Result<Summary> {
    if opts.devices == 0 {
        bail!("--devices must be at least 1");
    }
    if !(opts.schedule.rate.is_finite() && opts.schedule.rate > 0.0) {
        bail!("--rate must be a positive number of messages per second");
    }
    if !(opts.link.send_rate.is_finite() && opts.link.send_rate > 0.0) {
        bail!("--resend-rate must be a positive number of messages per second");
    }
    let pki = Pki::open(&opts.pki)?;
    let identities = pki.devices(opts.devices)?;
    for e in &opts.episodes {
        if !identities.iter().any(|i| i.id == e.device) {
            bail!(
                "--episode {}:{}: not one of the {} simulated devices",
                e.kind,
                e.device,
                opts.devices
            );
        }
    }
    std::fs::create_dir_all(&opts.state)
        .with_context(|| format!("state directory {}", opts.state.display()))?;

    let link = std::sync::Arc::new(opts.link.clone());
    let schedule = std::sync::Arc::new(opts.schedule.clone());
    let t0 = tokio::time::Instant::now();
    let started = std::time::Instant::now();
    let mut tasks = Vec::with_capacity(identities.len());
    let mut ready = Vec::with_capacity(identities.len());
    for identity in identities {
        let id = DeviceId::new(identity.id.clone())
            .map_err(|e| anyhow::anyhow!("device identity `{}`: {e}", identity.id))?;
        let key = pki.signing_key(&identity.id)?;
        let episodes = opts
            .episodes
            .iter()
            .filter(|e| e.device == identity.id)
            .map(|e| Episode {
                kind: e.kind,
                start: e.start,
            })
            .collect();
        let model = VitalsModel::new(opts.seed, &identity.id, episodes);
        let device = SimDevice::boot(id, key, opts.fw.clone(), model, &opts.state)
            .with_context(|| format!("booting {}", identity.id))?;
        let (tx, rx) = oneshot::channel();
        ready.push(rx);
        let shell = DeviceLink::new(
            device,
            identity,
            std::sync::Arc::clone(&link),
            std::sync::Arc::clone(&schedule),
            t0,
            tx,
        );
        tasks.push(tokio::spawn(shell.run(stop.clone())));
    }
    let n = tasks.len();
    tokio::spawn(async move {
        for rx in ready {
            if rx.await.is_err() {
                // A device ended before it ever connected: there will be no ready line.
                return;
            }
        }
        on_ready(n);
    });
    let mut reports = Vec::with_capacity(n);
    for task in tasks {
        reports.push(task.await.context("device task")?);
    }
    Ok(Summary::new(reports, started.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2.5"), Ok(Duration::from_millis(2500)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3d").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn episode_specs() {
        assert_eq!(
            "desaturation:dev-00001".parse(),
            Ok(EpisodeSpec {
                kind: EpisodeKind::Desaturation,
                device: "dev-00001".into(),
                start: DEFAULT_EPISODE_START
            })
        );
        assert_eq!(
            "fever:dev-00002@90s"
                .parse::<EpisodeSpec>()
                .map(|e| e.start),
            Ok(Duration::from_secs(90))
        );
        assert!("fever".parse::<EpisodeSpec>().is_err());
        assert!("seizure:dev-00001".parse::<EpisodeSpec>().is_err());
        assert!("fever:dev 1".parse::<EpisodeSpec>().is_err());
        assert!("fever:dev-00001@later".parse::<EpisodeSpec>().is_err());
    }
}
