//! Population stability index with the fixed bins of `queries/views.sql`
//! (`vital_bins`, one bin per score aggregate 0..20) and its empty-bin epsilon.

use serde::Serialize;

use super::measures::round;
use super::rows::{DataSet, Event, iso_week};

/// The share an empty bin is given (its logarithm would be undefined).
pub const EPSILON: f64 = 0.0001;

/// The vital signs with bins.
pub const METRICS: [&str; 6] = ["spo2", "pulse", "resp", "temp", "sbp", "dbp"];

/// The bins' inner edges of a metric: a value v is in bin k when
/// edge[k-1] <= v < edge[k]. The NEWS2 (RCP 2017) bands (SpO2 scale 1); dbp by the
/// blood pressure categories. Kept equal to `vital_bins` in `queries/views.sql`.
pub fn edges(metric: &str) -> Option<&'static [f64]> {
    Some(match metric {
        "spo2" => &[92.0, 94.0, 96.0],
        "resp" => &[9.0, 12.0, 21.0, 25.0],
        "pulse" => &[41.0, 51.0, 91.0, 111.0, 131.0],
        "temp" => &[35.05, 36.05, 38.05, 39.05],
        "sbp" => &[91.0, 101.0, 111.0, 220.0],
        "dbp" => &[60.0, 80.0, 90.0, 100.0],
        _ => return None,
    })
}

fn value(e: &Event, metric: &str) -> Option<f64> {
    match metric {
        "spo2" => e.spo2,
        "pulse" => e.pulse,
        "resp" => e.resp,
        "temp" => e.temp,
        "sbp" => e.sbp,
        "dbp" => e.dbp,
        _ => None,
    }
}

/// One bin of a comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bin {
    pub bin: usize,
    pub reference_share: f64,
    pub compare_share: f64,
}

/// A PSI between two populations.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Psi {
    pub reference_n: u64,
    pub compare_n: u64,
    pub psi: f64,
    pub bins: Vec<Bin>,
}

/// The PSI of two histograms over the same bins: sum of (c - r) ln(c / r) over the
/// bins' shares, an empty bin's share [`EPSILON`].
pub fn psi(reference: &[u64], compare: &[u64]) -> Psi {
    let (rn, cn): (u64, u64) = (reference.iter().sum(), compare.iter().sum());
    let share = |k: u64, n: u64| {
        if n == 0 {
            EPSILON
        } else {
            (k as f64 / n as f64).max(EPSILON)
        }
    };
    let mut total = 0.0;
    let mut bins = Vec::with_capacity(reference.len());
    for (i, (&r, &c)) in reference.iter().zip(compare).enumerate() {
        let (rs, cs) = (share(r, rn), share(c, cn));
        total += (cs - rs) * (cs / rs).ln();
        bins.push(Bin {
            bin: i,
            reference_share: round(rs, 6),
            compare_share: round(cs, 6),
        });
    }
    Psi {
        reference_n: rn,
        compare_n: cn,
        psi: round(total, 6),
        bins,
    }
}

/// An inclusive range of ISO weeks, `YYYY-Www..YYYY-Www` (or one week).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Weeks {
    pub from: String,
    pub to: String,
}

impl std::str::FromStr for Weeks {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (from, to) = s.split_once("..").unwrap_or((s, s));
        let ok = |w: &str| {
            w.len() == 8 && w.as_bytes()[4] == b'-' && w.as_bytes()[5] == b'W' && {
                let (y, n) = (&w[..4], &w[6..]);
                y.bytes().all(|b| b.is_ascii_digit()) && n.bytes().all(|b| b.is_ascii_digit())
            }
        };
        if !ok(from) || !ok(to) {
            return Err(format!("{s:?} is not YYYY-Www or YYYY-Www..YYYY-Www"));
        }
        Ok(Self {
            from: from.into(),
            to: to.into(),
        })
    }
}

impl Weeks {
    fn holds(&self, week: &str) -> bool {
        self.from.as_str() <= week && week <= self.to.as_str()
    }
}

/// PSI of a vital sign between two periods (`psi.sql`); implausible readings left out.
pub fn vital(data: &DataSet, metric: &str, reference: &Weeks, compare: &Weeks) -> Option<Psi> {
    let edges = edges(metric)?;
    let mut r = vec![0u64; edges.len() + 1];
    let mut c = r.clone();
    for e in &data.events {
        if e.kind != "vitals" || e.implausible == Some(true) {
            continue;
        }
        let Some(v) = value(e, metric) else { continue };
        let bin = edges.iter().take_while(|&&edge| v >= edge).count();
        let week = iso_week(e.observed_at);
        if reference.holds(&week) {
            r[bin] += 1;
        }
        if compare.holds(&week) {
            c[bin] += 1;
        }
    }
    Some(psi(&r, &c))
}

/// PSI of a score's aggregate between two versions (`psi_score.sql`): complete scores,
/// one bin per aggregate 0..20 (clamped).
pub fn score(
    data: &DataSet,
    model: &str,
    reference: &str,
    compare: &str,
    weeks: Option<&Weeks>,
) -> Psi {
    let mut r = vec![0u64; 21];
    let mut c = r.clone();
    for s in &data.scores {
        if s.model != model || !s.complete {
            continue;
        }
        if weeks.is_some_and(|w| !w.holds(&iso_week(s.observed_at))) {
            continue;
        }
        let bin = usize::try_from(s.aggregate.clamp(0, 20)).unwrap_or(0);
        if s.version == reference {
            r[bin] += 1;
        }
        if s.version == compare {
            c[bin] += 1;
        }
    }
    psi(&r, &c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_populations_have_no_shift() {
        let p = psi(&[10, 20, 30, 0], &[1, 2, 3, 0]);
        assert_eq!(p.psi, 0.0);
        assert_eq!((p.reference_n, p.compare_n), (60, 6));
    }

    #[test]
    fn a_shift_is_measured_with_epsilon_for_empty_bins() {
        // The SpO2 shift of the test fleet: [0, .25, .25, .5] -> [.25, .5, .25, 0].
        let p = psi(&[0, 1, 1, 2], &[1, 2, 1, 0]);
        let e = EPSILON;
        let want = (0.25 - e) * (0.25 / e).ln() + 0.25 * 2f64.ln() + (e - 0.5) * (e / 0.5).ln();
        assert!((p.psi - want).abs() < 1e-5, "{} vs {want}", p.psi);
        assert!(p.psi > 0.25);
        assert_eq!(p.bins[0].reference_share, EPSILON);
    }

    #[test]
    fn bins_are_the_news2_bands() {
        let bin = |m: &str, v: f64| {
            edges(m)
                .expect("metric")
                .iter()
                .take_while(|&&e| v >= e)
                .count()
        };
        assert_eq!(bin("spo2", 91.0), 0);
        assert_eq!(bin("spo2", 92.0), 1);
        assert_eq!(bin("spo2", 96.0), 3);
        assert_eq!(bin("temp", 35.0), 0);
        assert_eq!(bin("temp", 35.1), 1);
        assert_eq!(bin("pulse", 131.0), 5);
        assert_eq!(edges("glucose"), None);
    }

    #[test]
    fn week_ranges_parse() {
        let w: Weeks = "2026-W47..2026-W48".parse().expect("range");
        assert!(w.holds("2026-W48") && !w.holds("2026-W49"));
        let one: Weeks = "2026-W49".parse().expect("one week");
        assert_eq!(one.from, one.to);
        assert!("2026-49".parse::<Weeks>().is_err());
    }
}
