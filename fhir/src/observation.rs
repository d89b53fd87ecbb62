//! One accepted `vitals` reading to FHIR R4 Observations: one per measurement SPEC
//! lists, `sbp`/`dbp` as one blood-pressure panel, each conforming to its R4
//! vital-signs profile; measurements SPEC does not list become plain Observations
//! (no profile) so nothing the device signed is dropped.

use serde_json::{Value as Json, json};

use crate::codes::{self, Loinc};
use crate::event::Event;
use crate::ids;

/// Extension: signal quality (0..1) of the sample, the payload's `q`.
pub const EXT_SIGNAL_QUALITY: &str = "urn:vitalmq:fhir:extension:signal-quality";
/// Extension: the device firmware version the reading was made with.
pub const EXT_FIRMWARE: &str = "urn:vitalmq:fhir:extension:firmware";
/// Extension: the device clock (ms since the Unix epoch, decimal text: R4 has no
/// 64-bit integer) when it is beyond RFC 3339 and `effectiveDateTime` is the bridge's
/// `observed_at` instead.
pub const EXT_DEVICE_TIME: &str = "urn:vitalmq:fhir:extension:device-time";
/// Extension: the on-device model (`name/version`) that produced or filtered it.
pub const EXT_DEVICE_MODEL: &str = "urn:vitalmq:fhir:extension:device-model";

/// One Observation with its business identifier value (`<event id>/<metric>`).
#[derive(Debug, Clone, PartialEq)]
pub struct MappedObservation {
    /// `spo2`, `pulse`, `resp`, `temp`, `bp` or an unlisted metric's name.
    pub metric: String,
    /// The identifier value under [`ids::OBSERVATION`].
    pub key: String,
    pub resource: Json,
}

/// The Observations of one event: none for `status` and `alarm` events.
pub fn observations(event: &Event) -> Result<Vec<MappedObservation>, crate::Error> {
    if event.kind != "vitals" {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for (metric, value) in &event.m {
        if codes::BP_PARTS.iter().any(|(m, _)| m == metric) {
            continue;
        }
        let resource = match codes::vital(metric) {
            Some(v) => {
                let codings: Vec<Json> = v.codes.iter().map(loinc).collect();
                let mut o = base(event, Some(metric), Some(v.profile))?;
                o["code"] = json!({"coding": codings, "text": v.codes[0].display});
                put_value(&mut o, value, v.ucum, v.unit);
                o
            }
            None => {
                let mut o = base(event, Some(metric), None)?;
                o["code"] = json!({
                    "coding": [{"system": codes::METRIC, "code": codes::metric_code(metric)}],
                });
                // An R4 string is never empty (nor all whitespace).
                if !metric.trim().is_empty() {
                    o["code"]["text"] = metric.as_str().into();
                }
                put_value(&mut o, value, "", "");
                o
            }
        };
        out.push(MappedObservation {
            metric: metric.clone(),
            key: key(&event.event_id, metric),
            resource,
        });
    }
    if let Some(panel) = bp_panel(event)? {
        out.push(panel);
    }
    // Fixed order: the panel last, the rest by metric name (the map's order).
    Ok(out)
}

/// The identifier value of the Observation of `metric` in event `event_id`.
pub fn key(event_id: &str, metric: &str) -> String {
    format!("{event_id}/{}", codes::metric_code(metric))
}

/// The identifier value of the blood-pressure panel of event `event_id`:
/// `<event id>:bp`. A device may name a metric anything (SPEC: a map of text), `bp`
/// included, so the panel's key is outside the `<event id>/<metric>` space.
pub fn panel_key(event_id: &str) -> String {
    format!("{event_id}:{}", codes::BP)
}

/// The blood-pressure panel, when the event carries `sbp` or `dbp` (a missing half is a
/// component with `dataAbsentReason`, as the bp profile requires both components).
fn bp_panel(event: &Event) -> Result<Option<MappedObservation>, crate::Error> {
    if !codes::BP_PARTS
        .iter()
        .any(|(m, _)| event.m.contains_key(*m))
    {
        return Ok(None);
    }
    let mut o = base(event, None, Some(codes::BP_PROFILE))?;
    o["code"] = json!({"coding": [loinc(&codes::BP_PANEL)], "text": "Blood pressure"});
    let components: Vec<Json> = codes::BP_PARTS
        .iter()
        .map(|(m, c)| {
            let mut component = json!({"code": {"coding": [loinc(c)], "text": c.display}});
            match event.m.get(*m) {
                Some(v) => put_value(&mut component, v, codes::MM_HG, "mmHg"),
                None => component["dataAbsentReason"] = absent("not-performed", "Not Performed"),
            }
            component
        })
        .collect();
    o["component"] = Json::Array(components);
    Ok(Some(MappedObservation {
        metric: codes::BP.into(),
        key: panel_key(&event.event_id),
        resource: o,
    }))
}

fn loinc(c: &Loinc) -> Json {
    json!({"system": codes::LOINC, "code": c.code, "display": c.display})
}

fn absent(code: &str, display: &str) -> Json {
    json!({"coding": [{"system": codes::DATA_ABSENT, "code": code, "display": display}]})
}

/// `valueQuantity`, or `dataAbsentReason` `error` for a value the bridge stored as
/// `null` (a non-finite float) or that is not a number.
fn put_value(o: &mut Json, value: &Json, ucum: &str, unit: &str) {
    match value {
        Json::Number(n) => {
            let mut q = json!({"value": n});
            if !ucum.is_empty() {
                q["unit"] = unit.into();
                q["system"] = codes::UCUM.into();
                q["code"] = ucum.into();
            }
            o["valueQuantity"] = q;
        }
        _ => o["dataAbsentReason"] = absent("error", "Error"),
    }
}

/// What every Observation of the event shares; `metric` `None` for the BP panel.
fn base(event: &Event, metric: Option<&str>, profile: Option<&str>) -> Result<Json, crate::Error> {
    let mut o = json!({"resourceType": "Observation"});
    if let Some(p) = profile {
        o["meta"] = json!({"profile": [codes::profile_url(p)]});
    }
    let mut extension = Vec::new();
    if let Some(q) = event.q {
        extension.push(json!({"url": EXT_SIGNAL_QUALITY, "valueDecimal": q}));
    }
    // An R4 string is never empty: a device that sends `fw = ""` names no firmware.
    if !event.fw.trim().is_empty() {
        extension.push(json!({"url": EXT_FIRMWARE, "valueString": event.fw}));
    }
    if let Some(model) = &event.model {
        extension.push(json!({"url": EXT_DEVICE_MODEL, "valueString": model}));
    }
    o["extension"] = Json::Array(extension);
    o["identifier"] = json!([
        ids::identifier(
            ids::OBSERVATION,
            &metric.map_or_else(|| panel_key(&event.event_id), |m| key(&event.event_id, m)),
        ),
        ids::identifier(ids::EVENT, &event.event_id),
    ]);
    o["status"] = "final".into();
    if profile.is_some() {
        o["category"] = json!([{
            "coding": [{"system": codes::CATEGORY, "code": "vital-signs", "display": "Vital Signs"}],
            "text": "Vital Signs",
        }]);
    }
    o["subject"] = ids::patient(&event.patient_ref);
    let (effective, substituted) = event.effective()?;
    o["effectiveDateTime"] = effective.into();
    if substituted && let Some(ext) = o["extension"].as_array_mut() {
        ext.push(json!({"url": EXT_DEVICE_TIME, "valueString": event.ts.to_string()}));
    }
    if let Some(issued) = &event.received_at {
        o["issued"] = issued.as_str().into();
    }
    o["device"] = ids::device(&event.device);
    let mut notes = Vec::new();
    let parts: Vec<&str> = match metric {
        Some(m) => vec![m],
        None => codes::BP_PARTS.iter().map(|(m, _)| *m).collect(),
    };
    for part in parts {
        if let Some(limits) = event.implausible.get(part) {
            notes.push(json!({"text": format!(
                "{part} outside the plausible range {limits} (the value is kept as the device signed it)"
            )}));
        }
    }
    if substituted {
        notes.push(json!({"text": format!(
            "device clock {} ms is beyond what FHIR can date; effectiveDateTime is the bridge's observation time, the device's time is in the device-time extension",
            event.ts
        )}));
    } else if let Some(skew) = &event.clock_skew {
        notes.push(json!({"text": format!(
            "device clock outside the policy ({skew}); effectiveDateTime is the device's time, issued the reception time"
        )}));
    }
    if !notes.is_empty() {
        o["note"] = Json::Array(notes);
    }
    Ok(o)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn event_json(m: Json) -> Json {
        json!({
            "format": "vitalmq-event/v1", "event_id": "ev1-0123", "device": "dev-1",
            "site": "site-01", "patient_ref": "pt-aaaa1111", "epoch": 1, "seq": 7,
            "type": "vitals", "ts": 1_763_726_405_123u64,
            "observed_at": "2025-11-21T12:00:05.123Z", "received_at": "2025-11-21T12:00:05.2Z",
            "m": m, "q": 0.93, "fw": "5.12.1", "model": "arrhythmia-net/2.1.0", "schema": 1,
            "extra": {},
            "provenance": {"kid": "dev-1", "alg": "EdDSA", "raw_sha256": "aa".repeat(32),
                "topic": "devices/dev-1/telemetry", "broker": "127.0.0.1:1",
                "publisher": "spiffe://demo.vitalmq/gateway/gw-1",
                "bridge": "spiffe://demo.vitalmq/bridge/b-1", "sequence": "in_order",
                "transformation": "vitalmq-normalize/2", "consent": "care",
                "processing_policy": null},
        })
    }

    fn map(m: Json) -> Vec<MappedObservation> {
        observations(&Event::from_json(&event_json(m)).expect("event")).expect("maps")
    }

    #[test]
    fn each_vital_has_its_loinc_ucum_and_profile() {
        for (metric, loinc, ucum, profile) in [
            ("spo2", "59408-5", "%", "oxygensat"),
            ("pulse", "8867-4", "/min", "heartrate"),
            ("resp", "9279-1", "/min", "resprate"),
            ("temp", "8310-5", "Cel", "bodytemp"),
        ] {
            let obs = map(json!({metric: 37.5}));
            assert_eq!(obs.len(), 1, "{metric}");
            let o = &obs[0].resource;
            assert_eq!(o["code"]["coding"][0]["code"], loinc);
            assert_eq!(o["code"]["coding"][0]["system"], "http://loinc.org");
            assert_eq!(o["valueQuantity"]["code"], ucum);
            assert_eq!(o["valueQuantity"]["system"], "http://unitsofmeasure.org");
            assert_eq!(o["valueQuantity"]["value"], 37.5);
            assert_eq!(
                o["meta"]["profile"][0],
                format!("http://hl7.org/fhir/StructureDefinition/{profile}")
            );
            assert_eq!(o["category"][0]["coding"][0]["code"], "vital-signs");
            assert_eq!(o["status"], "final");
            assert_eq!(o["effectiveDateTime"], "2025-11-21T12:00:05.123Z");
            assert_eq!(o["issued"], "2025-11-21T12:00:05.2Z");
            assert_eq!(o["identifier"][0]["value"], format!("ev1-0123/{metric}"));
            assert_eq!(o["identifier"][1]["value"], "ev1-0123");
            assert_eq!(o["subject"]["identifier"]["value"], "pt-aaaa1111");
            assert!(
                o["subject"].get("reference").is_none(),
                "the patient only by pseudonym"
            );
            assert_eq!(o["extension"][0]["valueDecimal"], 0.93);
            assert_eq!(obs[0].key, format!("ev1-0123/{metric}"));
        }
        // Pulse oximetry carries the generic SpO2 code the oxygensat profile requires.
        assert_eq!(
            map(json!({"spo2": 95}))[0].resource["code"]["coding"][1]["code"],
            "2708-6"
        );
    }

    #[test]
    fn blood_pressure_is_one_panel() {
        let obs = map(json!({"sbp": 120, "dbp": 80, "pulse": 70}));
        assert_eq!(obs.len(), 2);
        let bp = &obs[1];
        assert_eq!(bp.metric, "bp");
        let o = &bp.resource;
        assert_eq!(o["code"]["coding"][0]["code"], "85354-9");
        assert_eq!(
            o["meta"]["profile"][0],
            "http://hl7.org/fhir/StructureDefinition/bp"
        );
        assert!(o.get("valueQuantity").is_none());
        assert_eq!(o["component"][0]["code"]["coding"][0]["code"], "8480-6");
        assert_eq!(o["component"][0]["valueQuantity"]["value"], 120);
        assert_eq!(o["component"][0]["valueQuantity"]["code"], "mm[Hg]");
        assert_eq!(o["component"][1]["code"]["coding"][0]["code"], "8462-4");
        assert_eq!(o["component"][1]["valueQuantity"]["value"], 80);
    }

    #[test]
    fn a_metric_named_bp_does_not_clash_with_the_panel() {
        let obs = map(json!({"bp": 1, "sbp": 120, "dbp": 80}));
        assert_eq!(obs.len(), 2);
        let keys: Vec<&str> = obs.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, ["ev1-0123/bp", "ev1-0123:bp"]);
        let ids: Vec<&Json> = obs
            .iter()
            .map(|o| &o.resource["identifier"][0]["value"])
            .collect();
        assert_ne!(ids[0], ids[1]);
        assert_eq!(obs[1].resource["identifier"][0]["value"], "ev1-0123:bp");
        // The device's own `bp` gets no blood-pressure notes.
        let mut e = event_json(json!({"bp": 1, "sbp": 300}));
        e["implausible"] = json!({"sbp": {"min": 40, "max": 260, "unit": "mm[Hg]"}});
        let obs = observations(&Event::from_json(&e).expect("event")).expect("maps");
        assert!(obs[0].resource.get("note").is_none(), "{}", obs[0].resource);
        assert!(obs[1].resource["note"].is_array());
    }

    #[test]
    fn missing_values_are_said_so() {
        // Half a blood pressure: the other half is absent, not made up.
        let obs = map(json!({"sbp": 120}));
        let c = &obs[0].resource["component"][1];
        assert_eq!(c["dataAbsentReason"]["coding"][0]["code"], "not-performed");
        assert!(c.get("valueQuantity").is_none());
        // A value stored as null (non-finite).
        let obs = map(json!({"temp": null}));
        assert_eq!(
            obs[0].resource["dataAbsentReason"]["coding"][0]["code"],
            "error"
        );
        assert!(obs[0].resource.get("valueQuantity").is_none());
        // No measurement at all: no Observation.
        assert!(map(json!({})).is_empty());
    }

    #[test]
    fn unlisted_metrics_are_kept_without_a_profile() {
        let obs = map(json!({"etco2": 35}));
        let o = &obs[0].resource;
        assert!(o.get("meta").is_none());
        assert!(o.get("category").is_none());
        assert_eq!(o["code"]["coding"][0]["system"], "urn:vitalmq:metric");
        assert_eq!(o["valueQuantity"]["value"], 35);
    }

    #[test]
    fn status_and_alarm_events_have_no_observations() {
        for kind in ["status", "alarm"] {
            let mut e = event_json(json!({}));
            e["type"] = kind.into();
            assert!(
                observations(&Event::from_json(&e).expect("event"))
                    .expect("maps")
                    .is_empty()
            );
        }
    }

    #[test]
    fn a_clock_beyond_year_9999_still_maps() {
        let mut e = event_json(json!({"spo2": 95, "sbp": 120}));
        e["ts"] = json!(u64::MAX);
        e["clock_skew"] = json!({"direction": "ahead", "by_ms": 1, "allowed_ms": 60000});
        let event = Event::from_json(&e).expect("event");
        let obs = observations(&event).expect("maps");
        assert_eq!(obs.len(), 2);
        for o in &obs {
            let o = &o.resource;
            assert_eq!(o["effectiveDateTime"], "2025-11-21T12:00:05.123Z");
            let ext = o["extension"].as_array().expect("extensions");
            assert!(
                ext.contains(&json!({"url": EXT_DEVICE_TIME, "valueString": u64::MAX.to_string()}))
            );
        }
        let p = crate::provenance::reading(&event, &obs, b"x").expect("provenance");
        assert_eq!(p["occurredDateTime"], "2025-11-21T12:00:05.123Z");
        // An ordinary clock has no such extension.
        let o = &map(json!({"spo2": 95}))[0].resource;
        assert!(!o.to_string().contains(EXT_DEVICE_TIME));
    }

    #[test]
    fn implausible_values_and_skewed_clocks_are_noted() {
        let mut e = event_json(json!({"spo2": 140}));
        e["implausible"] = json!({"spo2": {"min": 50, "max": 100, "unit": "%"}});
        e["clock_skew"] = json!({"direction": "ahead", "by_ms": 90000, "allowed_ms": 60000});
        let obs = observations(&Event::from_json(&e).expect("event")).expect("maps");
        let notes = obs[0].resource["note"].as_array().expect("notes");
        assert_eq!(notes.len(), 2);
        assert_eq!(obs[0].resource["valueQuantity"]["value"], 140);
    }
}
