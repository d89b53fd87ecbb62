//! The rates questions as pure functions over rows, with the definitions of
//! `queries/views.sql` (one place to read them: `queries/README.md`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use super::rows::{DataSet, Dims, Event, iso_week};

pub const MEASURES: [&str; 5] = ["alerts", "device_alarms", "gaps", "refusals", "dropped"];
pub const DIMENSIONS: [&str; 7] = [
    "firmware",
    "model",
    "model_status",
    "lot",
    "region",
    "hardware_model",
    "week",
];

/// One group's rate (a row of `rates_by.sql`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rate {
    pub measure: String,
    pub dimension: String,
    pub value: String,
    pub device_weeks: u64,
    pub readings: u64,
    pub n: i64,
    pub per_device_week: Option<f64>,
    pub per_1000_readings: Option<f64>,
}

/// One group against the fleet (a row of `outliers.sql`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outlier {
    pub measure: String,
    pub dimension: String,
    pub value: String,
    pub device_weeks: u64,
    pub n: i64,
    pub expected: f64,
    pub ratio: Option<f64>,
    pub z: Option<f64>,
    pub stands_out: bool,
}

fn text(v: Option<&str>) -> String {
    v.unwrap_or("(none)").to_owned()
}

/// The (dimension, value) pairs of a row in week `week`.
fn groups(d: &Dims, week: &str) -> [(&'static str, String); 7] {
    [
        ("firmware", text(d.fw.as_deref())),
        (
            "model",
            format!(
                "{} [{}]",
                text(d.model.as_deref()),
                text(d.model_status.as_deref())
            ),
        ),
        ("model_status", text(d.model_status.as_deref())),
        ("lot", text(d.lot.as_deref())),
        ("region", text(d.region.as_deref())),
        ("hardware_model", text(d.hardware_model.as_deref())),
        ("week", week.to_owned()),
    ]
}

/// Messages dropped per status event (`dropped_increases` of `views.sql`): `dropped`
/// is cumulative per boot, so each status adds its increase over the highest value of
/// the same (device, epoch) before it (a boot's first status adds its whole value, a
/// lower value nothing). Rows without an epoch fall back to a guess, per device: a
/// value lower than the previous one is a new boot (then the whole value is new).
/// Returns (index into `events`, increase).
pub fn dropped_increases(events: &[Event]) -> Vec<(usize, i64)> {
    let mut status: Vec<usize> = (0..events.len())
        .filter(|&i| events[i].kind == "status" && events[i].dropped.is_some())
        .collect();
    status.sort_by(|&a, &b| {
        let (x, y) = (&events[a], &events[b]);
        (&x.device, x.epoch, x.observed_at, &x.event_id).cmp(&(
            &y.device,
            y.epoch,
            y.observed_at,
            &y.event_id,
        ))
    });
    // Per (device, epoch): (highest value so far, previous value).
    type Boot<'a> = (Option<&'a str>, Option<u64>);
    let mut last: HashMap<Boot<'_>, (i64, i64)> = HashMap::new();
    let mut out = Vec::with_capacity(status.len());
    for i in status {
        let e = &events[i];
        let d = e.dropped.unwrap_or(0);
        let key = (e.device.as_deref(), e.epoch);
        let seen = last.get(&key).copied();
        let increase = match (e.epoch, seen) {
            (Some(_), None) => d.max(0),
            (Some(_), Some((highest, _))) => (d - highest).max(0),
            (None, None) => d,
            (None, Some((_, previous))) if d < previous => d,
            (None, Some((_, previous))) => d - previous,
        };
        let highest = seen.map_or(d, |(h, _)| h.max(d));
        last.insert(key, (highest, d));
        out.push((i, increase));
    }
    out
}

/// Per measure, (device, week, dims, n) occurrences.
fn occurrences(data: &DataSet) -> Vec<(&'static str, Option<&str>, String, Dims, i64)> {
    let mut out = Vec::new();
    let mut alerts: BTreeMap<(Option<&str>, String, &Dims), BTreeSet<&str>> = BTreeMap::new();
    for a in &data.alerts {
        if a.state == "open"
            && a.role.as_deref() != Some("shadow")
            && a.source.as_deref() != Some("ops")
        {
            alerts
                .entry((a.device.as_deref(), iso_week(a.at), &a.dims))
                .or_default()
                .insert(&a.alert_id);
        }
    }
    for ((device, week, dims), ids) in alerts {
        out.push(("alerts", device, week, dims.clone(), ids.len() as i64));
    }
    for e in &data.events {
        if e.kind == "alarm" && e.alarm_active == Some(true) {
            out.push((
                "device_alarms",
                e.device.as_deref(),
                iso_week(e.observed_at),
                e.dims.clone(),
                1,
            ));
        }
    }
    for (measure, rows) in [("gaps", &data.gaps), ("refusals", &data.refusals)] {
        for r in rows {
            // Gaps and refusals carry no model (views.sql: NULL).
            let dims = Dims {
                model: None,
                model_status: None,
                ..r.dims.clone()
            };
            out.push((measure, r.device.as_deref(), iso_week(r.at), dims, 1));
        }
    }
    for (i, increase) in dropped_increases(&data.events) {
        let e = &data.events[i];
        out.push((
            "dropped",
            e.device.as_deref(),
            iso_week(e.observed_at),
            e.dims.clone(),
            increase,
        ));
    }
    out
}

/// Distinct (device, ISO week) pairs.
type DeviceWeeks<'a> = BTreeSet<(Option<&'a str>, String)>;

/// The exposure rows (`exposure` of `views.sql`): every row of events, refusals and
/// gaps that names a device, as (device, week, dims, is a reading). A device-week
/// counts when the device left any row in it, so a group whose messages were all
/// refused (a lot with a bad key) still has exposure and can stand out.
fn exposure_rows(data: &DataSet) -> Vec<(&str, String, Dims, bool)> {
    let mut out = Vec::new();
    for e in &data.events {
        if let Some(d) = e.device.as_deref() {
            out.push((
                d,
                iso_week(e.observed_at),
                e.dims.clone(),
                e.kind == "vitals",
            ));
        }
    }
    for r in data.refusals.iter().chain(&data.gaps) {
        if let Some(d) = r.device.as_deref() {
            // Gaps and refusals carry no model (views.sql: NULL).
            let dims = Dims {
                model: None,
                model_status: None,
                ..r.dims.clone()
            };
            out.push((d, iso_week(r.at), dims, false));
        }
    }
    out
}

/// Rates per measure, dimension and value, ordered as `rates_by.sql` orders them.
pub fn rates(data: &DataSet) -> Vec<Rate> {
    type Key = (&'static str, String);
    let mut exposure: BTreeMap<Key, (DeviceWeeks<'_>, u64)> = BTreeMap::new();
    for (device, week, dims, reading) in exposure_rows(data) {
        for g in groups(&dims, &week) {
            let x = exposure.entry(g).or_default();
            x.0.insert((Some(device), week.clone()));
            x.1 += u64::from(reading);
        }
    }
    let mut counts: BTreeMap<(&str, Key), i64> = BTreeMap::new();
    for (measure, _, week, dims, n) in occurrences(data) {
        for g in groups(&dims, &week) {
            *counts.entry((measure, g)).or_default() += n;
        }
    }
    let mut keys: BTreeSet<(&str, Key)> = counts.keys().cloned().collect();
    for m in MEASURES {
        keys.extend(exposure.keys().map(|g| (m, g.clone())));
    }
    let mut out: Vec<Rate> = keys
        .into_iter()
        .map(|(measure, (dimension, value))| {
            let (device_weeks, readings) = exposure
                .get(&(dimension, value.clone()))
                .map_or((0, 0), |(dw, r)| (dw.len() as u64, *r));
            let n = counts
                .get(&(measure, (dimension, value.clone())))
                .copied()
                .unwrap_or(0);
            Rate {
                measure: measure.to_owned(),
                dimension: dimension.to_owned(),
                value,
                device_weeks,
                readings,
                n,
                per_device_week: (device_weeks > 0)
                    .then(|| round(n as f64 / device_weeks as f64, 4)),
                per_1000_readings: (readings > 0)
                    .then(|| round(1000.0 * n as f64 / readings as f64, 4)),
            }
        })
        .collect();
    out.sort_by(|a, b| {
        (&a.measure, &a.dimension, &a.value).cmp(&(&b.measure, &b.dimension, &b.value))
    });
    out
}

/// Fleet device-weeks (each once) and occurrences per measure.
fn fleet(data: &DataSet) -> (u64, BTreeMap<&'static str, i64>) {
    let device_weeks: DeviceWeeks<'_> = exposure_rows(data)
        .into_iter()
        .map(|(device, week, _, _)| (Some(device), week))
        .collect();
    let mut n = BTreeMap::new();
    for (measure, _, _, _, k) in occurrences(data) {
        *n.entry(measure).or_default() += k;
    }
    (device_weeks.len() as u64, n)
}

/// Groups against the fleet rate, most surprising first (see `outliers.sql`).
pub fn outliers(data: &DataSet, rates: &[Rate]) -> Vec<Outlier> {
    let (device_weeks, totals) = fleet(data);
    if device_weeks == 0 {
        return Vec::new();
    }
    let mut out: Vec<Outlier> = rates
        .iter()
        .filter(|r| r.device_weeks > 0)
        .map(|r| {
            let rate =
                totals.get(r.measure.as_str()).copied().unwrap_or(0) as f64 / device_weeks as f64;
            let expected = rate * r.device_weeks as f64;
            let n = r.n as f64;
            let (ratio, z) = if expected > 0.0 {
                (Some(n / expected), Some((n - expected) / expected.sqrt()))
            } else {
                (None, None)
            };
            Outlier {
                measure: r.measure.clone(),
                dimension: r.dimension.clone(),
                value: r.value.clone(),
                device_weeks: r.device_weeks,
                n: r.n,
                expected: round(expected, 3),
                stands_out: matches!((z, ratio), (Some(z), Some(q)) if z >= 3.0 && q >= 1.5),
                ratio: ratio.map(|q| round(q, 3)),
                z: z.map(|z| round(z, 3)),
            }
        })
        .collect();
    out.sort_by(|a, b| {
        let z = |o: &Outlier| o.z.unwrap_or(f64::NEG_INFINITY);
        z(b).total_cmp(&z(a)).then_with(|| {
            (&a.measure, &a.dimension, &a.value).cmp(&(&b.measure, &b.dimension, &b.value))
        })
    });
    out
}

/// `x` rounded to `places` decimals, half away from zero (as DuckDB's `round`).
pub fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::surveil_cmd::rows::{Alert, Occurrence};

    const W47: i64 = 1_794_787_200_000;
    const DAY: i64 = 86_400_000;

    fn status(device: &str, at: i64, dropped: i64, epoch: Option<u64>) -> Event {
        Event {
            event_id: format!("{device}-{at}"),
            kind: "status".into(),
            observed_at: at,
            device: Some(device.into()),
            dropped: Some(dropped),
            epoch,
            ..Event::default()
        }
    }

    fn increases(events: &[Event]) -> Vec<i64> {
        let mut v = dropped_increases(events);
        v.sort();
        v.into_iter().map(|(_, n)| n).collect()
    }

    #[test]
    fn dropped_counts_increases_per_boot() {
        // Without epochs: 2 -> 1 is a new boot, which adds its whole value.
        let e: Vec<Event> = [0, 1, 2, 1, 1, 2]
            .iter()
            .enumerate()
            .map(|(k, &d)| status("dev-1", W47 + k as i64 * DAY, d, None))
            .collect();
        assert_eq!(increases(&e), [0, 1, 1, 1, 0, 1]);
        // With epochs: a new epoch starts from zero; a lower value in the same epoch
        // (reordered) adds nothing and is not a boot.
        let e = vec![
            status("dev-1", W47, 3, Some(1)),
            status("dev-1", W47 + 1, 5, Some(1)),
            status("dev-1", W47 + 2, 4, Some(1)),
            status("dev-1", W47 + 3, 6, Some(1)),
            status("dev-1", W47 + 4, 2, Some(2)),
        ];
        assert_eq!(increases(&e), [3, 2, 0, 1, 2]);
        // A new boot whose counter is not lower than the last boot's: only the epoch
        // tells (the guess without epochs would add 1).
        let e = vec![
            status("dev-1", W47, 2, Some(1)),
            status("dev-1", W47 + 1, 3, Some(2)),
        ];
        assert_eq!(increases(&e), [2, 3]);
        // Devices do not mix.
        let e = vec![status("a", W47, 4, None), status("b", W47 + 1, 1, None)];
        assert_eq!(increases(&e), [4, 1]);
    }

    #[test]
    fn rates_normalise_by_device_weeks_and_readings() {
        let dims = |lot: &str| Dims {
            lot: Some(lot.into()),
            ..Dims::default()
        };
        let mut events = Vec::new();
        for (device, lot) in [("a", "L1"), ("b", "L2")] {
            for w in 0..2 {
                for k in 0..4 {
                    events.push(Event {
                        event_id: format!("{device}{w}{k}"),
                        kind: "vitals".into(),
                        observed_at: W47 + w * 7 * DAY + k,
                        device: Some(device.into()),
                        dims: dims(lot),
                        ..Event::default()
                    });
                }
            }
        }
        let gap = |device: &str, lot: &str| Occurrence {
            at: W47 + DAY,
            device: Some(device.into()),
            dims: dims(lot),
        };
        let data = DataSet {
            events,
            gaps: vec![gap("a", "L1"), gap("a", "L1"), gap("b", "L2")],
            alerts: vec![
                Alert {
                    alert_id: "x".into(),
                    state: "open".into(),
                    at: W47,
                    device: Some("a".into()),
                    dims: dims("L1"),
                    ..Alert::default()
                },
                Alert {
                    alert_id: "y".into(),
                    state: "open".into(),
                    role: Some("shadow".into()),
                    at: W47,
                    device: Some("a".into()),
                    dims: dims("L1"),
                    ..Alert::default()
                },
                Alert {
                    alert_id: "z".into(),
                    state: "open".into(),
                    source: Some("ops".into()),
                    at: W47,
                    device: Some("a".into()),
                    dims: dims("L1"),
                    ..Alert::default()
                },
            ],
            ..DataSet::default()
        };
        let r = rates(&data);
        let get = |m: &str, d: &str, v: &str| {
            r.iter()
                .find(|x| x.measure == m && x.dimension == d && x.value == v)
                .unwrap_or_else(|| panic!("{m} {d} {v}"))
                .clone()
        };
        let l1 = get("gaps", "lot", "L1");
        assert_eq!((l1.device_weeks, l1.readings, l1.n), (2, 8, 2));
        assert_eq!(l1.per_device_week, Some(1.0));
        assert_eq!(l1.per_1000_readings, Some(250.0));
        assert_eq!(get("gaps", "week", "2026-W47").n, 3);
        assert_eq!(get("gaps", "week", "2026-W48").n, 0);
        // The shadow alert and the operational one are not counted.
        assert_eq!(get("alerts", "lot", "L1").n, 1);
        let o = outliers(&data, &r);
        // Fleet: 3 gaps over 4 device-weeks; W47 holds them all over 2 device-weeks:
        // expected 1.5, ratio 2, z = 1.5 / sqrt(1.5): the top, but not standing out.
        let top = &o[0];
        assert_eq!(
            (top.measure.as_str(), top.value.as_str()),
            ("gaps", "2026-W47")
        );
        assert_eq!(
            (top.expected, top.ratio, top.z),
            (1.5, Some(2.0), Some(1.225))
        );
        assert!(o.iter().all(|x| !x.stands_out));
    }
}
