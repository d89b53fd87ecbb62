//! Realistic vital signs for a simulated wearable: a pure function of
//! `(seed, device, t)` plus the episodes scripted for that device.
//!
//! Invariants:
//!
//! * [`VitalsModel::sample`] reads no clock and keeps no state: the same seed, device,
//!   episodes and `t` always give the same [`Sample`], so tests and reruns are exact.
//!   Randomness is a counter-based hash (splitmix64) of `(seed, device, channel, time
//!   bucket)`, not a generator that advances.
//! * Each patient has a baseline drawn from the device id and seed (SpO2 95-99 %, pulse
//!   60-90 /min, respiration 12-18 /min, temperature 36.5-37.2 °C), smooth noise on a few
//!   seconds' scale, a little per-sample jitter and a slow 24 h circadian drift.
//! * Episodes ([`EpisodeKind`]) are trapezoids in time (ramp, hold, recover) added to
//!   the baseline; motion artifacts lower `q` and corrupt the readings in short bursts;
//!   a sensor dropout yields no sample at all (`None`).
//! * Outputs are clamped to physiological bounds and rounded as a device reports them:
//!   SpO2, pulse and respiration as integers, temperature to 0.1 °C, `q` to 0.01.

use std::f64::consts::TAU;
use std::str::FromStr;
use std::time::Duration;

/// A scripted clinical or technical event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EpisodeKind {
    /// SpO2 falls to about 85 % over a minute, holds two minutes, recovers in one;
    /// pulse and respiration rise a little.
    Desaturation,
    /// Pulse climbs to about 135 /min in 30 s, holds three minutes, recovers in one.
    Tachycardia,
    /// Temperature rises to about 39 °C over 10 minutes, holds 30, recovers in 20;
    /// pulse rises about 10 /min per °C.
    Fever,
    /// Two minutes of motion: a 4 s burst every 20 s with `q` 0.15-0.45 and corrupted
    /// SpO2 and pulse.
    Motion,
    /// The sensor loses contact for 30 s: no samples.
    Dropout,
}

impl EpisodeKind {
    pub const ALL: [Self; 5] = [
        Self::Desaturation,
        Self::Tachycardia,
        Self::Fever,
        Self::Motion,
        Self::Dropout,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Desaturation => "desaturation",
            Self::Tachycardia => "tachycardia",
            Self::Fever => "fever",
            Self::Motion => "motion",
            Self::Dropout => "dropout",
        }
    }

    /// `(ramp, hold, recover)` in seconds. Motion and dropout are a plain window of
    /// `hold` seconds.
    const fn shape(self) -> (f64, f64, f64) {
        match self {
            Self::Desaturation => (60.0, 120.0, 60.0),
            Self::Tachycardia => (30.0, 180.0, 60.0),
            Self::Fever => (600.0, 1800.0, 1200.0),
            Self::Motion => (0.0, 120.0, 0.0),
            Self::Dropout => (0.0, 30.0, 0.0),
        }
    }

    /// How long the episode lasts from its start.
    pub fn duration(self) -> Duration {
        let (ramp, hold, recover) = self.shape();
        Duration::from_secs_f64(ramp + hold + recover)
    }
}

/// A name that is not an episode kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown episode `{}` (one of: desaturation, tachycardia, fever, motion, dropout)",
    .0.escape_debug()
)]
pub struct UnknownEpisode(pub String);

impl FromStr for EpisodeKind {
    type Err = UnknownEpisode;
    fn from_str(s: &str) -> Result<Self, UnknownEpisode> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownEpisode(s.to_owned()))
    }
}

impl std::fmt::Display for EpisodeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An episode of one device, starting `start` after the simulation's time zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Episode {
    pub kind: EpisodeKind,
    pub start: Duration,
}

/// A patient's resting values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Baseline {
    pub spo2: f64,
    pub pulse: f64,
    pub resp: f64,
    pub temp: f64,
    /// Phase of the circadian cycle at t = 0, radians.
    pub circadian_phase: f64,
}

/// One reading as the device reports it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Oxygen saturation, %.
    pub spo2: i64,
    /// Pulse rate, /min.
    pub pulse: i64,
    /// Respiration rate, /min.
    pub resp: i64,
    /// Skin temperature, °C, one decimal.
    pub temp: f64,
    /// Signal quality 0..=1, two decimals.
    pub q: f64,
}

// Noise channels, so each measurement draws independent values.
const SPO2: u64 = 1;
const PULSE: u64 = 2;
const RESP: u64 = 3;
const TEMP: u64 = 4;
const QUALITY: u64 = 5;
const ARTIFACT: u64 = 6;
const BASELINE: u64 = 7;

/// The vitals of one simulated patient.
#[derive(Debug, Clone, PartialEq)]
pub struct VitalsModel {
    key: u64,
    baseline: Baseline,
    episodes: Vec<Episode>,
}

impl VitalsModel {
    pub fn new(seed: u64, device: &str, episodes: Vec<Episode>) -> Self {
        let key = mix(seed ^ mix(fnv1a(device.as_bytes())));
        let draw = |i: u64| unit(hash(key, BASELINE, i));
        let baseline = Baseline {
            spo2: 95.0 + 4.0 * draw(0),
            pulse: 60.0 + 30.0 * draw(1),
            resp: 12.0 + 6.0 * draw(2),
            temp: 36.5 + 0.7 * draw(3),
            circadian_phase: TAU * draw(4),
        };
        Self {
            key,
            baseline,
            episodes,
        }
    }

    pub fn baseline(&self) -> Baseline {
        self.baseline
    }

    pub fn episodes(&self) -> &[Episode] {
        &self.episodes
    }

    /// The reading at `t` after time zero, or `None` while the sensor has dropped out.
    pub fn sample(&self, t: Duration) -> Option<Sample> {
        let ts = t.as_secs_f64();
        let ms = u64::try_from(t.as_millis()).unwrap_or(u64::MAX);
        let b = self.baseline;
        let circadian = (TAU * ts / 86_400.0 + b.circadian_phase).sin();
        let jitter = |ch: u64| signed(hash(self.key, ch + 100, ms));

        let mut spo2 = b.spo2 + 0.7 * self.smooth(SPO2, ts, 15.0) + 0.3 * jitter(SPO2);
        let mut pulse =
            b.pulse + 4.0 * circadian + 3.0 * self.smooth(PULSE, ts, 20.0) + jitter(PULSE);
        let mut resp = b.resp + self.smooth(RESP, ts, 30.0) + 0.4 * jitter(RESP);
        let mut temp = b.temp + 0.2 * circadian + 0.05 * self.smooth(TEMP, ts, 120.0);
        let mut q = 0.90 + 0.08 * unit(hash(self.key, QUALITY, ms));

        for episode in &self.episodes {
            let rel = ts - episode.start.as_secs_f64();
            let (ramp, hold, recover) = episode.kind.shape();
            let level = trapezoid(rel, ramp, hold, recover);
            if level <= 0.0 {
                continue;
            }
            match episode.kind {
                EpisodeKind::Desaturation => {
                    // Pull towards 85 %, with less of the resting noise left.
                    spo2 = b.spo2 + (85.0 - b.spo2) * level + (spo2 - b.spo2) * 0.5;
                    pulse += 12.0 * level;
                    resp += 3.0 * level;
                }
                EpisodeKind::Tachycardia => {
                    pulse += (135.0 - b.pulse) * level;
                    resp += 2.0 * level;
                }
                EpisodeKind::Fever => {
                    let rise = (39.0 - b.temp) * level;
                    temp += rise;
                    pulse += 10.0 * rise;
                    resp += 1.5 * rise;
                }
                EpisodeKind::Motion => {
                    if rel.rem_euclid(20.0) < 4.0 {
                        let burst = ms / 250;
                        q = 0.15 + 0.30 * unit(hash(self.key, ARTIFACT, burst));
                        pulse += 25.0 * signed(hash(self.key, ARTIFACT + 10, burst));
                        spo2 -= 8.0 * unit(hash(self.key, ARTIFACT + 20, burst));
                    }
                }
                EpisodeKind::Dropout => return None,
            }
        }
        Some(Sample {
            spo2: spo2.clamp(50.0, 100.0).round() as i64,
            pulse: pulse.clamp(25.0, 240.0).round() as i64,
            resp: resp.clamp(4.0, 60.0).round() as i64,
            temp: (temp.clamp(33.0, 42.5) * 10.0).round() / 10.0,
            q: (q.clamp(0.0, 1.0) * 100.0).round() / 100.0,
        })
    }

    /// Value noise in -1..1: random values every `period` seconds, smoothly interpolated.
    fn smooth(&self, channel: u64, ts: f64, period: f64) -> f64 {
        let x = ts / period;
        let i = x.floor();
        let f = x - i;
        // t is a Duration, so x >= 0 and the bucket index is a non-negative integer.
        let i = i as u64;
        let a = signed(hash(self.key, channel, i));
        let b = signed(hash(self.key, channel, i + 1));
        let s = f * f * (3.0 - 2.0 * f);
        a + (b - a) * s
    }
}

/// 0 before the start, rising linearly over `ramp`, 1 for `hold`, falling over
/// `recover`, 0 after.
fn trapezoid(rel: f64, ramp: f64, hold: f64, recover: f64) -> f64 {
    if rel < 0.0 {
        0.0
    } else if rel < ramp {
        rel / ramp
    } else if rel < ramp + hold {
        1.0
    } else if rel < ramp + hold + recover {
        1.0 - (rel - ramp - hold) / recover
    } else {
        0.0
    }
}

/// splitmix64's finalizer: a bijective 64-bit mix.
const fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const fn hash(key: u64, channel: u64, i: u64) -> u64 {
    mix(key ^ mix(channel.wrapping_mul(0x1000_0000_01b3) ^ mix(i)))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Uniform in 0..1 from the top 53 bits.
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Uniform in -1..1.
fn signed(h: u64) -> f64 {
    2.0 * unit(h) - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn model(kind: EpisodeKind, start: f64) -> VitalsModel {
        VitalsModel::new(
            7,
            "dev-00001",
            vec![Episode {
                kind,
                start: secs(start),
            }],
        )
    }

    /// Samples once a second over `[from, to)`.
    fn series(m: &VitalsModel, from: u64, to: u64) -> Vec<Option<Sample>> {
        (from..to)
            .map(|s| m.sample(Duration::from_secs(s)))
            .collect()
    }

    fn present(v: &[Option<Sample>]) -> Vec<Sample> {
        v.iter().map(|s| s.expect("a sample")).collect()
    }

    fn mean(v: impl Iterator<Item = f64>) -> f64 {
        let (sum, n) = v.fold((0.0, 0.0), |(s, n), x| (s + x, n + 1.0));
        sum / n
    }

    #[test]
    fn same_inputs_same_outputs() {
        let a = VitalsModel::new(1, "dev-00001", vec![]);
        let b = VitalsModel::new(1, "dev-00001", vec![]);
        for ms in [0, 1, 999, 60_000, 3_600_123] {
            let t = Duration::from_millis(ms);
            assert_eq!(a.sample(t), b.sample(t));
        }
        assert_ne!(
            VitalsModel::new(1, "dev-00002", vec![]).baseline(),
            a.baseline()
        );
        assert_ne!(
            VitalsModel::new(2, "dev-00001", vec![]).baseline(),
            a.baseline()
        );
    }

    #[test]
    fn baselines_are_in_range() {
        for i in 0..500 {
            let b = VitalsModel::new(42, &format!("dev-{i:05}"), vec![]).baseline();
            assert!((95.0..=99.0).contains(&b.spo2), "{b:?}");
            assert!((60.0..=90.0).contains(&b.pulse), "{b:?}");
            assert!((12.0..=18.0).contains(&b.resp), "{b:?}");
            assert!((36.5..=37.2).contains(&b.temp), "{b:?}");
        }
    }

    #[test]
    fn resting_readings_are_plausible_and_noisy() {
        let m = VitalsModel::new(3, "dev-00009", vec![]);
        let v = present(&series(&m, 0, 600));
        let b = m.baseline();
        for s in &v {
            assert!((93..=100).contains(&s.spo2), "{s:?}");
            assert!((s.pulse as f64 - b.pulse).abs() <= 9.0, "{s:?}");
            assert!((s.resp as f64 - b.resp).abs() <= 2.0, "{s:?}");
            assert!((s.temp - b.temp).abs() <= 0.31, "{s:?}");
            assert!((0.9..=0.98).contains(&s.q), "{s:?}");
        }
        let distinct = |f: fn(&Sample) -> i64| {
            let mut x: Vec<i64> = v.iter().map(f).collect();
            x.sort_unstable();
            x.dedup();
            x.len()
        };
        assert!(distinct(|s| s.pulse) >= 4, "pulse varies");
        assert!(distinct(|s| s.resp) >= 2, "respiration varies");
    }

    #[test]
    fn circadian_drift_is_slow() {
        let m = VitalsModel::new(5, "dev-00003", vec![]);
        let temp_at = |h: f64| {
            mean((0..60).map(|s| {
                m.sample(secs(h * 3600.0 + f64::from(s)))
                    .map_or(0.0, |x| x.temp)
            }))
        };
        // Over 24 h the temperature swings by about 0.4 °C; within a minute it barely moves.
        let hours: Vec<f64> = (0..24).map(|h| temp_at(f64::from(h))).collect();
        let (lo, hi) = hours
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &t| (lo.min(t), hi.max(t)));
        assert!((0.25..=0.55).contains(&(hi - lo)), "swing {lo}..{hi}");
        let minute = present(&series(&m, 0, 60));
        let (a, b) = (minute[0].temp, minute[59].temp);
        assert!((a - b).abs() <= 0.15, "{a} -> {b}");
    }

    #[test]
    fn desaturation_falls_holds_and_recovers() {
        let m = model(EpisodeKind::Desaturation, 100.0);
        let v = present(&series(&m, 0, 400));
        let spo2 =
            |range: std::ops::Range<usize>| v[range].iter().map(|s| s.spo2).collect::<Vec<_>>();
        // Before: resting.
        assert!(spo2(0..100).iter().all(|&x| x >= 93));
        // Falling over the first minute: each 15 s quarter lower than the one before.
        let quarter = |i: usize| mean(v[100 + 15 * i..115 + 15 * i].iter().map(|s| s.spo2 as f64));
        assert!(quarter(0) > quarter(1) && quarter(1) > quarter(2) && quarter(2) > quarter(3));
        // Holding about 85 % for two minutes.
        assert!(
            spo2(160..280).iter().all(|&x| (83..=87).contains(&x)),
            "{:?}",
            spo2(160..280)
        );
        // Pulse up during the hold.
        let pulse_rest = mean(v[0..100].iter().map(|s| s.pulse as f64));
        let pulse_hold = mean(v[160..280].iter().map(|s| s.pulse as f64));
        assert!(pulse_hold > pulse_rest + 6.0);
        // Recovered a minute later.
        assert!(spo2(340..400).iter().all(|&x| x >= 93));
        // Quality is not affected: this is a real event, not an artifact.
        assert!(v.iter().all(|s| s.q >= 0.9));
    }

    #[test]
    fn tachycardia_raises_pulse() {
        let m = model(EpisodeKind::Tachycardia, 10.0);
        let v = present(&series(&m, 0, 330));
        assert!(v[0..10].iter().all(|s| s.pulse <= 100));
        assert!(
            v[40..220].iter().all(|s| (125..=145).contains(&s.pulse)),
            "hold"
        );
        assert!(v[300..330].iter().all(|s| s.pulse <= 100), "recovered");
    }

    #[test]
    fn fever_raises_temperature_slowly() {
        let m = model(EpisodeKind::Fever, 0.0);
        let at = |min: u64| m.sample(Duration::from_secs(min * 60)).expect("sample");
        assert!(at(0).temp <= 37.5);
        assert!(
            (37.5..=38.5).contains(&at(5).temp),
            "half way up: {:?}",
            at(5)
        );
        for min in 11..40 {
            assert!(
                (38.6..=39.4).contains(&at(min).temp),
                "minute {min}: {:?}",
                at(min)
            );
        }
        assert!(at(20).pulse > at(0).pulse + 10);
        assert!(at(61).temp <= 37.5, "recovered: {:?}", at(61));
    }

    #[test]
    fn motion_bursts_have_low_quality() {
        let m = model(EpisodeKind::Motion, 30.0);
        let v = present(&series(&m, 0, 200));
        for (t, s) in v.iter().enumerate() {
            let rel = t as f64 - 30.0;
            let in_burst = (0.0..120.0).contains(&rel) && rel.rem_euclid(20.0) < 4.0;
            if in_burst {
                assert!((0.15..=0.45).contains(&s.q), "t={t} {s:?}");
            } else {
                assert!(s.q >= 0.9, "t={t} {s:?}");
            }
        }
        // Six bursts of four seconds.
        assert_eq!(v.iter().filter(|s| s.q < 0.5).count(), 24);
    }

    #[test]
    fn dropout_yields_no_samples() {
        let m = model(EpisodeKind::Dropout, 20.0);
        let v = series(&m, 0, 80);
        assert!(v[..20].iter().all(Option::is_some));
        assert!(v[20..50].iter().all(Option::is_none));
        assert!(v[50..].iter().all(Option::is_some));
    }

    #[test]
    fn episodes_parse_by_name() {
        for kind in EpisodeKind::ALL {
            assert_eq!(kind.as_str().parse::<EpisodeKind>(), Ok(kind));
        }
        assert!("seizure".parse::<EpisodeKind>().is_err());
        assert_eq!(
            EpisodeKind::Desaturation.duration(),
            Duration::from_secs(240)
        );
    }

    #[test]
    fn trapezoid_shape() {
        assert_eq!(trapezoid(-1.0, 10.0, 10.0, 10.0), 0.0);
        assert_eq!(trapezoid(5.0, 10.0, 10.0, 10.0), 0.5);
        assert_eq!(trapezoid(15.0, 10.0, 10.0, 10.0), 1.0);
        assert_eq!(trapezoid(25.0, 10.0, 10.0, 10.0), 0.5);
        assert_eq!(trapezoid(30.0, 10.0, 10.0, 10.0), 0.0);
        // A plain window (no ramps).
        assert_eq!(trapezoid(0.0, 0.0, 5.0, 0.0), 1.0);
        assert_eq!(trapezoid(5.0, 0.0, 5.0, 0.0), 0.0);
    }
}
