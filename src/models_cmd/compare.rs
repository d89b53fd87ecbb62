//! `vitalmq models compare`: two versions of a score model over a period, from the
//! store's `scores` rows (payloads opened) and `alerts` rows. Pure over what was read,
//! so the definitions are tested here:
//!
//! - **Period**: rows the bridge recorded in it (`created_at_ms`, the bridge's clock),
//!   scores and alerts alike, so an alert and the score that raised it (one commit)
//!   are both in or both out.
//! - **Pairs**: a `from` row and a `to` row of the same trigger: both versions score
//!   every reading that changes an input, so the same patient, `observed_at`, trigger
//!   device and set of input event ids observed at that instant (the trigger's
//!   readings; not every input, as versions with different validity windows use
//!   different older ones). A second device's reading at the same instant is another
//!   trigger. A version that did not run for the patient has no row; rows without a
//!   partner are counted (`only_from_rows`, `only_to_rows`). Rows whose patient was
//!   erased are not compared (`erased_rows`; the caller counts them).
//! - **Agreement**: over the pairs, the share with the same risk category (`low`,
//!   `low-medium`, `medium`, `high`, or `unknown` for an incomplete score), Cohen's
//!   kappa, and the confusion matrix (rows `from`, columns `to`).
//! - **Alert counts** per rule and version: `delivered`, the `open` changes in the
//!   `alerts` table with `rule_version` = the version (live or canary), and `shadow`,
//!   the would-be `open` transitions in the version's shadow score payloads.
//! - **Timing**: per patient (the alert body's `patient_ref`), episode starts of each
//!   version: an open with no alert of that version open for the patient just before,
//!   and not the continuation of an escalation (a delivered open right after a
//!   `superseded` resolve, a shadow open that `replaces` a rule); times are the
//!   observed time of the score that opened it. Each `from` start is paired with the first unpaired
//!   `to` start within `window` of it. For the pairs, `to - from` in seconds: median,
//!   min, max; starts without a partner are counted per side.
//!
//! Only aggregates come out: never a patient reference or a value.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

/// Risk categories in matrix order.
pub const CATEGORIES: [&str; 5] = ["low", "low-medium", "medium", "high", "unknown"];

/// One score row as compare needs it.
#[derive(Debug, Clone)]
pub struct ScoreIn {
    pub score_id: String,
    pub patient: String,
    /// The device whose reading triggered the score.
    pub device: String,
    pub version: String,
    pub role: String,
    pub observed_at_ms: u64,
    /// The event ids of the inputs observed at `observed_at_ms` (the trigger's), sorted.
    pub trigger_inputs: Vec<String>,
    /// `None`: incomplete (no proven risk).
    pub risk: Option<String>,
    /// A shadow row's would-be transition: `(rule, transition, replaces)`.
    pub shadow_alert: Option<(String, String, Option<String>)>,
}

/// One alert change of a score (an `alerts` row).
#[derive(Debug, Clone)]
pub struct AlertIn {
    pub alert_id: String,
    pub state: String,
    pub rule: String,
    pub version: String,
    /// The body's `patient_ref` (a `no_data` resolve names no score).
    pub patient: Option<String>,
    /// The body's `reason` (`superseded`, `recovered`, `no_data`, ...).
    pub reason: Option<String>,
    pub score_id: Option<String>,
    pub created_at_ms: u64,
}

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct AlertCounts {
    pub delivered: BTreeMap<String, u64>,
    pub shadow: BTreeMap<String, u64>,
}

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Timing {
    pub matched: usize,
    pub only_from: usize,
    pub only_to: usize,
    pub median_s: Option<f64>,
    pub min_s: Option<f64>,
    pub max_s: Option<f64>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Report {
    pub model: String,
    pub from: String,
    pub to: String,
    /// Score rows read per version and role.
    pub rows: BTreeMap<String, BTreeMap<String, u64>>,
    pub pairs: usize,
    pub agree: usize,
    pub agreement_pct: Option<f64>,
    pub kappa: Option<f64>,
    pub categories: Vec<&'static str>,
    /// `confusion[i][j]`: pairs with `from` in category i and `to` in category j.
    pub confusion: Vec<Vec<u64>>,
    pub only_from_rows: usize,
    pub only_to_rows: usize,
    /// Score rows in the period whose patient was erased: not compared.
    pub erased_rows: u64,
    /// Alert rows in the period whose patient was erased: not counted.
    pub erased_alert_rows: u64,
    pub alerts: BTreeMap<String, AlertCounts>,
    pub timing: Timing,
}

fn category(risk: Option<&str>) -> usize {
    risk.and_then(|r| CATEGORIES.iter().position(|c| *c == r))
        .unwrap_or(CATEGORIES.len() - 1)
}

/// Cohen's kappa of a square confusion matrix; `None` when undefined (no pairs, or
/// chance agreement is total).
pub fn kappa(m: &[Vec<u64>]) -> Option<f64> {
    let n: u64 = m.iter().flatten().sum();
    if n == 0 {
        return None;
    }
    let n = n as f64;
    let observed = (0..m.len()).map(|i| m[i][i]).sum::<u64>() as f64 / n;
    let expected: f64 = (0..m.len())
        .map(|i| {
            let row: u64 = m[i].iter().sum();
            let col: u64 = m.iter().map(|r| r[i]).sum();
            (row as f64 / n) * (col as f64 / n)
        })
        .sum();
    ((1.0 - expected).abs() > f64::EPSILON).then(|| (observed - expected) / (1.0 - expected))
}

fn median(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// Episode starts per patient of one version, in time order.
fn starts(
    version: &str,
    scores: &[ScoreIn],
    alerts: &[AlertIn],
    observed: &HashMap<&str, u64>,
) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    // Delivered: alerts of the version, open ids per patient, and whether the last
    // change was a `superseded` resolve (the open that follows continues the episode).
    let mut open: HashMap<&str, (Vec<&str>, bool)> = HashMap::new();
    for a in alerts.iter().filter(|a| a.version == version) {
        let Some(patient) = a.patient.as_deref() else {
            continue;
        };
        let (ids, escalating) = open.entry(patient).or_default();
        match a.state.as_str() {
            "open" => {
                if ids.is_empty() && !*escalating {
                    let at = a
                        .score_id
                        .as_deref()
                        .and_then(|s| observed.get(s))
                        .copied()
                        .unwrap_or(a.created_at_ms);
                    out.entry(patient.to_owned()).or_default().push(at);
                }
                ids.push(&a.alert_id);
                *escalating = false;
            }
            "resolved" => {
                ids.retain(|id| *id != a.alert_id);
                *escalating = a.reason.as_deref() == Some("superseded");
            }
            _ => {}
        }
    }
    // Shadow: would-be transitions in the rows.
    let mut shadow_open: HashMap<&str, bool> = HashMap::new();
    let mut rows: Vec<&ScoreIn> = scores.iter().filter(|s| s.version == version).collect();
    rows.sort_by_key(|s| s.observed_at_ms);
    for s in rows {
        let Some((_, transition, replaces)) = &s.shadow_alert else {
            continue;
        };
        let was_open = shadow_open.entry(&s.patient).or_default();
        match transition.as_str() {
            "open" => {
                if !*was_open && replaces.is_none() {
                    out.entry(s.patient.clone())
                        .or_default()
                        .push(s.observed_at_ms);
                }
                *was_open = true;
            }
            "resolved" => *was_open = false,
            _ => {}
        }
    }
    for v in out.values_mut() {
        v.sort_unstable();
    }
    out
}

/// The `from` and `to` rows of one trigger.
type Pair<'a> = (Option<&'a ScoreIn>, Option<&'a ScoreIn>);
/// A trigger: patient, observed time, device, the event ids observed at that time.
type Trigger<'a> = (&'a str, u64, &'a str, &'a [String]);

/// The comparison of `from` and `to` (rows already limited to the model and period).
pub fn compare(
    model: &str,
    from: &str,
    to: &str,
    scores: &[ScoreIn],
    alerts: &[AlertIn],
    window_ms: u64,
) -> Report {
    let mut by_trigger: HashMap<Trigger<'_>, Pair<'_>> = HashMap::new();
    for s in scores {
        let slot = by_trigger
            .entry((
                s.patient.as_str(),
                s.observed_at_ms,
                s.device.as_str(),
                s.trigger_inputs.as_slice(),
            ))
            .or_default();
        if s.version == from {
            slot.0 = Some(s);
        } else if s.version == to {
            slot.1 = Some(s);
        }
    }
    let mut rows: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for s in scores {
        *rows
            .entry(s.version.clone())
            .or_default()
            .entry(s.role.clone())
            .or_default() += 1;
    }
    let k = CATEGORIES.len();
    let mut confusion = vec![vec![0u64; k]; k];
    let (mut only_from_rows, mut only_to_rows) = (0, 0);
    for (a, b) in by_trigger.values() {
        match (a, b) {
            (Some(a), Some(b)) => {
                confusion[category(a.risk.as_deref())][category(b.risk.as_deref())] += 1;
            }
            (Some(_), None) => only_from_rows += 1,
            (None, Some(_)) => only_to_rows += 1,
            (None, None) => {}
        }
    }
    let pairs: u64 = confusion.iter().flatten().sum();
    let agree: u64 = (0..k).map(|i| confusion[i][i]).sum();

    let mut counts: BTreeMap<String, AlertCounts> = BTreeMap::new();
    for v in [from, to] {
        let c = counts.entry(v.to_owned()).or_default();
        for a in alerts
            .iter()
            .filter(|a| a.version == v && a.state == "open")
        {
            *c.delivered.entry(a.rule.clone()).or_default() += 1;
        }
        for s in scores.iter().filter(|s| s.version == v) {
            if let Some((rule, transition, _)) = &s.shadow_alert
                && transition == "open"
            {
                *c.shadow.entry(rule.clone()).or_default() += 1;
            }
        }
    }

    let observed: HashMap<&str, u64> = scores
        .iter()
        .map(|s| (s.score_id.as_str(), s.observed_at_ms))
        .collect();
    let a = starts(from, scores, alerts, &observed);
    let mut b = starts(to, scores, alerts, &observed);
    let mut diffs = Vec::new();
    let mut timing = Timing::default();
    for (patient, times) in &a {
        let theirs = b.entry(patient.clone()).or_default();
        for t in times {
            let hit = theirs.iter().position(|u| u.abs_diff(*t) <= window_ms);
            match hit {
                Some(i) => {
                    let u = theirs.remove(i);
                    diffs.push((u as f64 - *t as f64) / 1000.0);
                }
                None => timing.only_from += 1,
            }
        }
    }
    timing.only_to = b.values().map(Vec::len).sum();
    diffs.sort_by(f64::total_cmp);
    timing.matched = diffs.len();
    timing.median_s = median(&diffs);
    timing.min_s = diffs.first().copied();
    timing.max_s = diffs.last().copied();

    Report {
        model: model.to_owned(),
        from: from.to_owned(),
        to: to.to_owned(),
        rows,
        pairs: usize::try_from(pairs).unwrap_or(usize::MAX),
        agree: usize::try_from(agree).unwrap_or(usize::MAX),
        agreement_pct: (pairs > 0).then(|| 100.0 * agree as f64 / pairs as f64),
        kappa: kappa(&confusion),
        categories: CATEGORIES.to_vec(),
        confusion,
        only_from_rows,
        only_to_rows,
        erased_rows: 0,
        erased_alert_rows: 0,
        alerts: counts,
        timing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, p: &str, v: &str, at: u64, risk: Option<&str>) -> ScoreIn {
        ScoreIn {
            score_id: id.into(),
            patient: p.into(),
            device: "dev-1".into(),
            version: v.into(),
            role: "live".into(),
            observed_at_ms: at,
            trigger_inputs: vec![format!("ev-{p}-{at}")],
            risk: risk.map(str::to_owned),
            shadow_alert: None,
        }
    }

    fn shadow(mut s: ScoreIn, transition: &str, rule: &str) -> ScoreIn {
        s.role = "shadow".into();
        s.shadow_alert = Some((rule.into(), transition.into(), None));
        s
    }

    fn alert(
        id: &str,
        state: &str,
        rule: &str,
        v: &str,
        (p, score): (&str, &str),
        at: u64,
    ) -> AlertIn {
        AlertIn {
            alert_id: id.into(),
            state: state.into(),
            rule: rule.into(),
            version: v.into(),
            patient: Some(p.into()),
            reason: None,
            score_id: Some(score.into()),
            created_at_ms: at,
        }
    }

    #[test]
    fn kappa_of_known_matrices() {
        // Perfect agreement over two categories: 1; independent 50/50: 0.
        assert_eq!(kappa(&[vec![5, 0], vec![0, 5]]), Some(1.0));
        assert_eq!(kappa(&[vec![1, 1], vec![1, 1]]), Some(0.0));
        // 20 pairs, observed 14/20, expected from the margins.
        let k = kappa(&[vec![10, 5], vec![1, 4]]).expect("defined");
        let (po, pe) = (
            14.0 / 20.0,
            (15.0 / 20.0) * (11.0 / 20.0) + (5.0 / 20.0) * (9.0 / 20.0),
        );
        assert!((k - (po - pe) / (1.0 - pe)).abs() < 1e-12);
        assert_eq!(kappa(&[vec![3, 0], vec![0, 0]]), None, "all chance");
        assert_eq!(kappa(&[vec![0, 0], vec![0, 0]]), None);
    }

    #[test]
    fn pairs_agreement_counts_and_timing() {
        let scores = vec![
            // pt-a: both medium at t=0 (live opens medium, shadow would open medium).
            row("a1", "pt-a", "v1", 0, Some("medium")),
            shadow(
                row("b1", "pt-a", "v2", 0, Some("medium")),
                "open",
                "news2-medium",
            ),
            // pt-a at 60 s: v1 medium, v2 high (agreement broken).
            row("a2", "pt-a", "v1", 60_000, Some("medium")),
            row("b2", "pt-a", "v2", 60_000, Some("high")),
            // pt-b: v2 opens 120 s before v1.
            shadow(
                row("b3", "pt-b", "v2", 0, Some("high")),
                "open",
                "news2-high",
            ),
            row("a3", "pt-b", "v1", 0, Some("low")),
            row("a4", "pt-b", "v1", 120_000, Some("high")),
            // pt-c: only v1 scored (v2 did not run there), incomplete.
            row("a5", "pt-c", "v1", 0, None),
        ];
        let alerts = vec![
            alert("x1", "open", "news2-medium", "v1", ("pt-a", "a1"), 5),
            alert("x1", "resolved", "news2-medium", "v1", ("pt-a", "a2"), 6),
            alert("x2", "open", "news2-high", "v1", ("pt-b", "a4"), 7),
        ];
        let r = compare("news2", "v1", "v2", &scores, &alerts, 600_000);
        assert_eq!((r.pairs, r.agree), (3, 1));
        assert_eq!(r.rows["v2"]["shadow"], 2);
        assert_eq!(r.rows["v1"]["live"], 5);
        assert_eq!(r.only_from_rows, 2);
        assert_eq!(r.only_to_rows, 0);
        let med = category(Some("medium"));
        let high = category(Some("high"));
        let low = category(Some("low"));
        assert_eq!(r.confusion[med][med], 1);
        assert_eq!(r.confusion[med][high], 1);
        assert_eq!(r.confusion[low][high], 1);
        assert_eq!(r.alerts["v1"].delivered["news2-medium"], 1);
        assert_eq!(r.alerts["v1"].delivered["news2-high"], 1);
        assert!(r.alerts["v1"].shadow.is_empty());
        assert_eq!(r.alerts["v2"].shadow["news2-high"], 1);
        assert!(r.alerts["v2"].delivered.is_empty());
        // pt-a: both at 0 (diff 0); pt-b: v2 at 0, v1 at 120 s (diff -120).
        assert_eq!(r.timing.matched, 2);
        assert_eq!(r.timing.min_s, Some(-120.0));
        assert_eq!(r.timing.max_s, Some(0.0));
        assert_eq!(r.timing.median_s, Some(-60.0));
        assert_eq!((r.timing.only_from, r.timing.only_to), (0, 0));
        // A narrow window leaves pt-b unmatched on both sides.
        let r = compare("news2", "v1", "v2", &scores, &alerts, 1_000);
        assert_eq!(
            (r.timing.matched, r.timing.only_from, r.timing.only_to),
            (1, 1, 1)
        );
    }

    #[test]
    fn an_escalation_continues_the_episode_and_no_data_resolves_close_it() {
        let scores = vec![
            row("a1", "pt-a", "v1", 0, Some("medium")),
            row("a2", "pt-a", "v1", 60_000, Some("high")),
            row("a3", "pt-a", "v1", 600_000, Some("medium")),
            // v2 (shadow) escalates the same way: open medium, then open high replacing it.
            shadow(
                row("b1", "pt-a", "v2", 0, Some("medium")),
                "open",
                "news2-medium",
            ),
            {
                let mut s = row("b2", "pt-a", "v2", 60_000, Some("high"));
                s.role = "shadow".into();
                s.shadow_alert = Some((
                    "news2-high".into(),
                    "open".into(),
                    Some("news2-medium".into()),
                ));
                s
            },
        ];
        let mut superseded = alert("x1", "resolved", "news2-medium", "v1", ("pt-a", "a2"), 2);
        superseded.reason = Some("superseded".into());
        let mut no_data = alert("x2", "resolved", "news2-high", "v1", ("pt-a", ""), 4);
        (no_data.reason, no_data.score_id) = (Some("no_data".into()), None);
        let alerts = vec![
            alert("x1", "open", "news2-medium", "v1", ("pt-a", "a1"), 1),
            // Escalation medium -> high: one episode, as on the shadow side.
            superseded,
            alert("x2", "open", "news2-high", "v1", ("pt-a", "a2"), 3),
            // The tick closes it (no score): the next open is a new episode.
            no_data,
            alert("x3", "open", "news2-medium", "v1", ("pt-a", "a3"), 5),
        ];
        let observed = scores
            .iter()
            .map(|s| (s.score_id.as_str(), s.observed_at_ms))
            .collect();
        let v1 = starts("v1", &scores, &alerts, &observed);
        assert_eq!(v1["pt-a"], vec![0, 600_000]);
        let v2 = starts("v2", &scores, &alerts, &observed);
        assert_eq!(v2["pt-a"], vec![0]);
        let r = compare("news2", "v1", "v2", &scores, &alerts, 1_000);
        // v1 starts at 0 and 600 s, v2 at 0: one matched (diff 0), one v1 only.
        assert_eq!(
            (r.timing.matched, r.timing.only_from, r.timing.only_to),
            (1, 1, 0),
            "{:?}",
            r.timing
        );
        assert_eq!(r.timing.max_s, Some(0.0));
    }

    #[test]
    fn readings_of_two_devices_at_one_instant_are_two_pairs() {
        let mut rows = Vec::new();
        for (v, risks) in [("v1", ["low", "medium"]), ("v2", ["low", "high"])] {
            let mut a = row(&format!("{v}a"), "pt-a", v, 0, Some(risks[0]));
            a.trigger_inputs = vec!["ev-a".into()];
            let mut b = row(&format!("{v}b"), "pt-a", v, 0, Some(risks[1]));
            b.device = "dev-2".into();
            b.trigger_inputs = vec!["ev-a".into(), "ev-b".into()];
            rows.extend([a, b]);
        }
        let r = compare("news2", "v1", "v2", &rows, &[], 1_000);
        assert_eq!((r.pairs, r.agree), (2, 1));
        assert_eq!((r.only_from_rows, r.only_to_rows), (0, 0));
        assert_eq!(
            r.confusion[category(Some("medium"))][category(Some("high"))],
            1
        );
    }
}
