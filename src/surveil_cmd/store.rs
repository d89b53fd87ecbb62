//! The data set's rows read from a bridge's local store: events (payloads opened with
//! the keyring), alert changes, gaps, refusals and scores (sealed payloads opened with
//! the keyring, an erased patient's left out), with lot, region and hardware model
//! from the device registry. Subjects are not read: the questions are aggregates.

use std::collections::HashMap;

use serde_json::Value as Json;
use vitalmq_bridge::store::Store;
use vitalmq_policies::{DeviceEntry, DeviceRegistry};

use super::rows::{Alert, DataSet, Dims, Event, Occurrence, Score};

/// Events read per store query.
const PAGE: i64 = 5_000;

/// Lot, region and hardware model of a device (registry v2 fields).
fn device_facts(entry: &DeviceEntry) -> (Option<String>, Option<String>, Option<String>) {
    (
        entry.lot.clone(),
        entry.region.clone(),
        entry.hardware_model.clone(),
    )
}

/// What a device's rows carry from the registry.
fn registry_dims(registry: Option<&DeviceRegistry>, device: Option<&str>) -> Dims {
    let entry = registry.zip(device).and_then(|(r, d)| {
        let id = vitalmq_envelope::DeviceId::new(d).ok()?;
        r.device(&id).cloned()
    });
    let (lot, region, hardware_model) = entry.as_ref().map(device_facts).unwrap_or_default();
    Dims {
        lot,
        region,
        hardware_model,
        ..Dims::default()
    }
}

fn text(v: &Json, key: &str) -> Option<String> {
    v.get(key).and_then(Json::as_str).map(str::to_owned)
}

/// The registry's judgement of the reported model, where the bridge recorded it.
fn model_status(v: &Json) -> Option<String> {
    text(v, "model_status").or_else(|| v.get("provenance").and_then(|p| text(p, "model_status")))
}

/// A device's firmware and model over time, to attribute rows that do not carry them
/// (gaps, refusals, alerts) to what the device last reported.
#[derive(Default)]
struct Timeline(HashMap<String, Vec<(i64, Dims)>>);

impl Timeline {
    fn at(&self, device: Option<&str>, t: i64) -> Option<&Dims> {
        let seen = self.0.get(device?)?;
        let k = seen.partition_point(|(at, _)| *at <= t);
        seen.get(k.saturating_sub(1)).map(|(_, d)| d)
    }
}

fn with_reported(base: Dims, reported: Option<&Dims>) -> Dims {
    match reported {
        Some(r) => Dims {
            fw: r.fw.clone(),
            model: r.model.clone(),
            model_status: r.model_status.clone(),
            ..base
        },
        None => base,
    }
}

/// Reads every row of the store into the data set's shape.
pub fn load(store: &Store, registry: Option<&DeviceRegistry>) -> anyhow::Result<DataSet> {
    let mut data = DataSet::default();
    let head = store.head()?;
    let mut first = 1;
    while first <= head {
        let last = (first + PAGE - 1).min(head);
        for rec in store.read_range(first, last)? {
            let v: Json = serde_json::from_str(&rec.normalized_json)?;
            let m = v.get("m").cloned().unwrap_or(Json::Null);
            let extra = v.get("extra").cloned().unwrap_or(Json::Null);
            let metric = |k: &str| m.get(k).and_then(Json::as_f64);
            let kind = text(&v, "type").unwrap_or_default();
            data.events.push(Event {
                observed_at: i64::try_from(rec.observed_at_ms)?,
                dims: Dims {
                    fw: text(&v, "fw"),
                    model: text(&v, "model"),
                    model_status: model_status(&v),
                    ..registry_dims(registry, Some(&rec.device))
                },
                spo2: metric("spo2"),
                pulse: metric("pulse"),
                resp: metric("resp"),
                temp: metric("temp"),
                sbp: metric("sbp"),
                dbp: metric("dbp"),
                implausible: Some(v.get("implausible").is_some()),
                dropped: (kind == "status")
                    .then(|| extra.get("dropped").and_then(Json::as_i64))
                    .flatten(),
                alarm_active: (kind == "alarm")
                    .then(|| extra.get("active").and_then(Json::as_bool))
                    .flatten(),
                epoch: Some(rec.epoch),
                event_id: rec.event_id,
                kind,
                device: Some(rec.device),
            });
        }
        first = last + 1;
    }
    let mut timeline = Timeline::default();
    for e in &data.events {
        if let Some(d) = &e.device {
            timeline
                .0
                .entry(d.clone())
                .or_default()
                .push((e.observed_at, e.dims.clone()));
        }
    }
    for seen in timeline.0.values_mut() {
        seen.sort_by_key(|(at, _)| *at);
    }
    for a in store.list_alerts()? {
        let body: Json = serde_json::from_str(&a.body).unwrap_or(Json::Null);
        let device = a.device.as_ref().map(|d| d.as_str().to_owned());
        let at = i64::try_from(a.created_at_ms)?;
        let base = registry_dims(registry, device.as_deref());
        let dims = if body.get("fw").is_some() || body.get("model").is_some() {
            Dims {
                fw: text(&body, "fw"),
                model: text(&body, "model"),
                model_status: model_status(&body),
                ..base
            }
        } else {
            with_reported(base, timeline.at(device.as_deref(), at))
        };
        data.alerts.push(Alert {
            alert_id: a.alert_id,
            state: a.state,
            role: text(&body, "role"),
            at,
            device,
            dims,
        });
    }
    for g in store.list_gaps()? {
        let device = g.device.as_str().to_owned();
        let at = i64::try_from(g.opened_at_ms)?;
        let dims = with_reported(
            registry_dims(registry, Some(&device)),
            timeline.at(Some(&device), at),
        );
        data.gaps.push(Occurrence {
            at,
            device: Some(device),
            dims,
        });
    }
    for q in store.list_quarantine()? {
        let device = q.device.as_ref().map(|d| d.as_str().to_owned());
        let at = i64::try_from(q.received_at_ms)?;
        let dims = with_reported(
            registry_dims(registry, device.as_deref()),
            timeline.at(device.as_deref(), at),
        );
        data.refusals.push(Occurrence { at, device, dims });
    }
    data.scores = scores(store)?;
    Ok(data)
}

/// Every score of the store (the `scores` table, payloads opened), as the data set's
/// `scores` rows: model and version, observation time, aggregate, completeness.
fn scores(store: &Store) -> anyhow::Result<Vec<Score>> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = store.surveil_scores_after(after, usize::try_from(PAGE)?)?;
        let Some(last) = page.last() else {
            return Ok(out);
        };
        after = last.id;
        for s in page {
            let p: Json = serde_json::from_str(&s.payload)?;
            out.push(Score {
                model: text(&p, "model").unwrap_or_default(),
                version: text(&p, "version").unwrap_or_default(),
                observed_at: i64::try_from(s.observed_at_ms)?,
                aggregate: p
                    .get("aggregate")
                    .and_then(Json::as_i64)
                    .unwrap_or_default(),
                complete: p.get("complete").and_then(Json::as_bool).unwrap_or(false),
            });
        }
    }
}
