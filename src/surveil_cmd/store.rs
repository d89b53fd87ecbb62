//! The data set's rows read from a bridge's local store: events (payloads opened with
//! the keyring), alert changes, gaps, refusals and scores (sealed payloads opened with
//! the keyring, an erased patient's left out), with lot, region and hardware model
//! from the device registry. Only the rows the surveillance sink would write: each is
//! judged under the `surveillance` purpose by the sink's own rules, the withheld
//! counted per table and reason. Subjects are not read: the questions are aggregates.

use std::collections::BTreeMap;

use serde_json::Value as Json;
use vitalmq_bridge::governance::{Flow, Withheld};
use vitalmq_bridge::store::Store;
use vitalmq_bridge::surveillance::consent;
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

/// What the rows of one table withheld under surveillance consent, per reason.
#[derive(Debug, Default)]
pub struct WithheldRows(pub BTreeMap<&'static str, Withheld>);

impl WithheldRows {
    fn add(&mut self, table: &'static str, flow: &Flow) -> bool {
        match flow {
            Flow::Send => false,
            Flow::Withheld(reason) => {
                self.0.entry(table).or_default().add(*reason);
                true
            }
        }
    }

    /// `{table: {reason: n}}`, for the output and the audit record (counts only).
    pub fn to_json(&self) -> Json {
        Json::Object(
            self.0
                .iter()
                .map(|(table, w)| {
                    let reasons = w
                        .counts()
                        .into_iter()
                        .map(|(r, n)| (r.to_owned(), Json::from(n)))
                        .collect();
                    ((*table).to_owned(), Json::Object(reasons))
                })
                .collect(),
        )
    }

    pub fn total(&self) -> u64 {
        self.0.values().map(Withheld::total).sum()
    }
}

/// Firmware and model a row that carries none takes from what its device last
/// reported at or before the row's time ([`Store::reported_at`], the sink's rule).
fn reported_dims(store: &Store, base: Dims, device: Option<&str>, at: u64) -> anyhow::Result<Dims> {
    let Some(device) = device else {
        return Ok(base);
    };
    let r = store.reported_at(device, at)?;
    Ok(Dims {
        fw: r.fw,
        model: r.model,
        model_status: r.model_status,
        ..base
    })
}

/// Reads the rows of the store the surveillance data set would hold: each judged under
/// the `surveillance` purpose as the Parquet sink judges it
/// ([`vitalmq_bridge::surveillance::consent`]); what consent withholds is counted, never
/// read into an answer.
pub fn load(store: &Store, registry: &DeviceRegistry) -> anyhow::Result<(DataSet, WithheldRows)> {
    let mut data = DataSet::default();
    let mut withheld = WithheldRows::default();
    let head = store.head()?;
    let mut first = 1;
    while first <= head {
        let last = (first + PAGE - 1).min(head);
        for rec in store.read_range(first, last)? {
            let recorded = rec.recorded();
            let flow = consent::event_flow(
                registry,
                &rec.device,
                recorded.as_ref().map(|(p, s)| (p.as_ref(), *s)),
                rec.observed_at_ms,
            );
            if withheld.add("events", &flow) {
                continue;
            }
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
                    ..registry_dims(Some(registry), Some(&rec.device))
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
    for a in store.list_alerts()? {
        let body: Json = serde_json::from_str(&a.body).unwrap_or(Json::Null);
        let flow = consent::alert_change_flow(registry, store, &a.topic, &body, a.created_at_ms)?;
        if withheld.add("alerts", &flow) {
            continue;
        }
        let device = a.device.as_ref().map(|d| d.as_str().to_owned());
        let at = i64::try_from(a.created_at_ms)?;
        let base = registry_dims(Some(registry), device.as_deref());
        let dims = if body.get("fw").is_some() || body.get("model").is_some() {
            Dims {
                fw: text(&body, "fw"),
                model: text(&body, "model"),
                model_status: model_status(&body),
                ..base
            }
        } else {
            reported_dims(store, base, device.as_deref(), a.created_at_ms)?
        };
        data.alerts.push(Alert {
            alert_id: a.alert_id,
            state: a.state,
            role: text(&body, "role"),
            source: a.topic.starts_with("ops/").then(|| "ops".to_owned()),
            at,
            device,
            dims,
        });
    }
    // The sink's readers of gaps and refusals, from the start.
    let mut after = 0;
    loop {
        let page = store.gaps_after(after, usize::try_from(PAGE)?)?;
        let Some(last) = page.last() else { break };
        after = last.rowid;
        for g in page {
            let flow = consent::device_flow(registry, Some(&g.device), g.opened_at_ms);
            if withheld.add("gaps", &flow) {
                continue;
            }
            let dims = reported_dims(
                store,
                registry_dims(Some(registry), Some(&g.device)),
                Some(&g.device),
                g.opened_at_ms,
            )?;
            data.gaps.push(Occurrence {
                at: i64::try_from(g.opened_at_ms)?,
                device: Some(g.device),
                dims,
            });
        }
    }
    let mut after = 0;
    loop {
        let page = store.refusals_after(after, usize::try_from(PAGE)?)?;
        let Some(last) = page.last() else { break };
        after = last.id;
        for q in page {
            let flow = consent::device_flow(registry, q.device.as_deref(), q.received_at_ms);
            if withheld.add("refusals", &flow) {
                continue;
            }
            let dims = reported_dims(
                store,
                registry_dims(Some(registry), q.device.as_deref()),
                q.device.as_deref(),
                q.received_at_ms,
            )?;
            data.refusals.push(Occurrence {
                at: i64::try_from(q.received_at_ms)?,
                device: q.device,
                dims,
            });
        }
    }
    data.scores = scores(store, registry, &mut withheld)?;
    Ok((data, withheld))
}

/// Every score of the store (the `scores` table, payloads opened), as the data set's
/// `scores` rows: model and version, observation time, aggregate, completeness.
fn scores(
    store: &Store,
    registry: &DeviceRegistry,
    withheld: &mut WithheldRows,
) -> anyhow::Result<Vec<Score>> {
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
            let flow = consent::score_flow(registry, store, &p, &s.device, s.observed_at_ms)?;
            if withheld.add("scores", &flow) {
                continue;
            }
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
