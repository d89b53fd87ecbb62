//! FHIR R4 Bundles of mapped resources.
//!
//! Every entry has a deterministic `urn:uuid:` fullUrl ([`ids::full_url`]) and a
//! transaction request that makes re-sending harmless:
//!
//! | resource | request |
//! |---|---|
//! | Observation, DetectedIssue, Communication | `POST`, `ifNoneExist: identifier=<system>\|<value>` |
//! | Provenance of a reading | `PUT Provenance/<uuid v5 of urn:vitalmq:raw-sha256\|<hex>>` |
//! | Provenance of a reading whose raw message was purged (unsigned) | `PUT Provenance/<uuid v5 of urn:vitalmq:raw-purged\|<hex>>`: never the signed one's id |
//! | Provenance of an alert change | `PUT Provenance/<uuid v5 of urn:vitalmq:alert-change\|<key>>` |
//! | Device, Task (sink) | `PUT Device?identifier=...` / `PUT Task?identifier=...` (conditional update: firmware and the alert workflow move on) |
//! | Device, Task (export, [`BundleBuilder::for_export`]) | `POST`, `ifNoneExist: identifier=...` (an old range must not roll a live server back) |
//!
//! R4 Provenance has no `identifier`, and servers do not support chained
//! `:identifier` searches in `ifNoneExist` (HAPI answers HAPI-2498, Azure has none):
//! a Provenance gets a client-assigned id, the deterministic UUID of its fullUrl, and
//! an update-as-create `PUT` to it (the same content again changes nothing).
//!
//! A resource added twice (the same device for many readings, the same alert's Task
//! for each change) is one entry holding the newest version: a transaction may not
//! touch one resource twice.

use std::collections::{HashMap, HashSet};

use serde_json::{Value as Json, json};

use crate::alert::AlertChange;
use crate::device::{self, DeviceFacts};
use crate::event::Event;
use crate::ids;
use crate::{observation, provenance};

/// A transaction request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Conditional create.
    Create { if_none_exist: String },
    /// Conditional update on the identifier.
    Update { identifier: String },
    /// Update-as-create of a client-assigned id (the fullUrl's UUID).
    Put,
}

/// One Bundle entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub full_url: String,
    pub resource_type: String,
    pub resource: Json,
    pub request: Request,
}

impl Entry {
    fn new(
        resource_type: &str,
        system: &str,
        value: &str,
        resource: Json,
        request: Request,
    ) -> Self {
        Self {
            full_url: ids::full_url(resource_type, system, value),
            resource_type: resource_type.into(),
            resource,
            request,
        }
    }

    fn create(resource_type: &str, system: &str, value: &str, resource: Json) -> Self {
        let if_none_exist = format!("identifier={}", ids::token_query(system, value));
        Self::new(
            resource_type,
            system,
            value,
            resource,
            Request::Create { if_none_exist },
        )
    }

    fn update(resource_type: &str, system: &str, value: &str, resource: Json) -> Self {
        let identifier = ids::token_query(system, value);
        Self::new(
            resource_type,
            system,
            value,
            resource,
            Request::Update { identifier },
        )
    }

    /// The UUID of its fullUrl: the id a client-assigned resource gets.
    pub fn id(&self) -> &str {
        self.full_url.trim_start_matches("urn:uuid:")
    }

    /// An update-as-create of `resource` under the id derived from `system|value`.
    fn put(resource_type: &str, system: &str, value: &str, mut resource: Json) -> Self {
        let mut e = Self::new(resource_type, system, value, Json::Null, Request::Put);
        resource["id"] = e.id().into();
        e.resource = resource;
        e
    }

    /// The entry as it appears in a transaction Bundle.
    pub fn to_json(&self) -> Json {
        let request = match &self.request {
            Request::Create { if_none_exist } => json!({
                "method": "POST", "url": self.resource_type, "ifNoneExist": if_none_exist,
            }),
            Request::Update { identifier } => json!({
                "method": "PUT", "url": format!("{}?identifier={identifier}", self.resource_type),
            }),
            Request::Put => json!({
                "method": "PUT", "url": format!("{}/{}", self.resource_type, self.id()),
            }),
        };
        json!({"fullUrl": self.full_url, "resource": self.resource, "request": request})
    }
}

/// Collects mapped resources into one Bundle.
#[derive(Debug, Default)]
pub struct BundleBuilder {
    entries: Vec<Entry>,
    by_url: HashMap<String, usize>,
    /// Device and Task as conditional creates, not updates ([`Self::for_export`]).
    create_only: bool,
}

impl BundleBuilder {
    /// The sink's builder: Device and Task are conditional updates, since the sink
    /// sends in store order and they only move forward.
    pub fn new() -> Self {
        Self::default()
    }

    /// The export's builder: Device and Task are conditional creates (`ifNoneExist`),
    /// since an export of an old range loaded into a live server must not roll the
    /// Device's wearer and firmware or the alert's Task status back.
    pub fn for_export() -> Self {
        Self {
            create_only: true,
            ..Self::default()
        }
    }

    /// Device or Task: updated by the sink, created only if absent by the export.
    fn current(&self, resource_type: &str, system: &str, value: &str, resource: Json) -> Entry {
        if self.create_only {
            Entry::create(resource_type, system, value, resource)
        } else {
            Entry::update(resource_type, system, value, resource)
        }
    }

    /// Adds an entry, replacing an earlier one with the same fullUrl in place.
    pub fn push(&mut self, entry: Entry) {
        match self.by_url.get(&entry.full_url) {
            Some(&i) => self.entries[i] = entry,
            None => {
                self.by_url
                    .insert(entry.full_url.clone(), self.entries.len());
                self.entries.push(entry);
            }
        }
    }

    /// The Device.
    pub fn device(&mut self, facts: &DeviceFacts) {
        let entry = self.current("Device", ids::DEVICE, &facts.id, device::device(facts));
        self.push(entry);
    }

    /// One accepted reading: its Observations and their Provenance carrying `raw` (the
    /// COSE_Sign1 bytes as received). The device's entry is the caller's (see
    /// [`Self::device`]). A `status` or `alarm` event has no Observation and adds
    /// nothing; returns how many Observations were added.
    pub fn reading(&mut self, event: &Event, raw: &[u8]) -> Result<usize, crate::Error> {
        self.add_reading(event, Some(raw))
    }

    /// A reading whose raw message retention purged (the event is kept): its
    /// Observations, each with a note saying so, and a Provenance without signature
    /// ([`provenance::reading_raw_purged`]).
    pub fn reading_raw_purged(&mut self, event: &Event) -> Result<usize, crate::Error> {
        self.add_reading(event, None)
    }

    fn add_reading(&mut self, event: &Event, raw: Option<&[u8]>) -> Result<usize, crate::Error> {
        let mut observations = observation::observations(event)?;
        if observations.is_empty() {
            return Ok(0);
        }
        let prov = match raw {
            Some(raw) => provenance::reading(event, &observations, raw)?,
            None => {
                for o in &mut observations {
                    let note = json!({"text": "the raw message and its device signature were purged by retention: this reading can no longer be re-verified"});
                    match o.resource["note"].as_array_mut() {
                        Some(notes) => notes.push(note),
                        None => o.resource["note"] = Json::Array(vec![note]),
                    }
                }
                provenance::reading_raw_purged(event, &observations)?
            }
        };
        for o in &observations {
            self.push(Entry::create(
                "Observation",
                ids::OBSERVATION,
                &o.key,
                o.resource.clone(),
            ));
        }
        // The unsigned Provenance of a purged reading has its own id: under the signed
        // one's, loading an export into a server the sink fed would replace the
        // signature a consumer re-verifies with a Provenance vouching for nothing.
        let system = match raw {
            Some(_) => ids::RAW_SHA256,
            None => provenance::RAW_PURGED,
        };
        self.push(Entry::put(
            "Provenance",
            system,
            &event.provenance.raw_sha256,
            prov,
        ));
        Ok(observations.len())
    }

    /// One clinical alert state change.
    pub fn alert(&mut self, change: &AlertChange) -> Result<(), crate::Error> {
        let r = change.map()?;
        let prov = provenance::alert(&r)?;
        let id = &r.alert.alert_id;
        // The implicated Device, when no fuller entry of it is in the Bundle: a minimal
        // conditional create (identifier only), so `implicated` resolves on a real
        // server (an identifier-only Reference is not resolved by HAPI and the like),
        // while a server that has the Device keeps it untouched. A later
        // [`Self::device`] replaces it in place with the full one.
        if let Some(dev) = &r.alert.device {
            let url = ids::full_url("Device", ids::DEVICE, dev);
            if !self.by_url.contains_key(&url) {
                self.push(Entry::create(
                    "Device",
                    ids::DEVICE,
                    dev,
                    json!({"resourceType": "Device", "identifier": [ids::identifier(ids::DEVICE, dev)]}),
                ));
            }
        }
        self.push(Entry::create(
            "DetectedIssue",
            ids::ALERT,
            id,
            r.detected_issue.clone(),
        ));
        if let Some(task) = &r.task {
            let entry = self.current("Task", ids::ALERT, id, task.clone());
            self.push(entry);
        }
        self.push(Entry::create(
            "Communication",
            ids::ALERT_CHANGE,
            &r.change_key,
            r.communication.clone(),
        ));
        self.push(Entry::put(
            "Provenance",
            ids::ALERT_CHANGE,
            &r.change_key,
            prov,
        ));
        Ok(())
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A `transaction` Bundle of the entries, in the order they were first added. A
    /// reference to a resource the Bundle does not hold (the Device of an alert whose
    /// device had no reading in the batch) keeps only its identifier: a server refuses
    /// a transaction with an unresolvable `urn:uuid:` placeholder.
    pub fn transaction(&self) -> Json {
        let local: HashSet<&str> = self.entries.iter().map(|e| e.full_url.as_str()).collect();
        let entries: Vec<Json> = self
            .entries
            .iter()
            .map(|e| {
                let mut j = e.to_json();
                drop_unresolved(&mut j["resource"], &local);
                j
            })
            .collect();
        json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    }

    /// The resources grouped by type, in entry order (bulk-export NDJSON: one file per
    /// type, one resource per line). Each resource gets `id` = its fullUrl's UUID and
    /// references to other entries become `Type/id`, as resources on a server would.
    pub fn by_type(&self) -> Vec<(String, Vec<Json>)> {
        let local: HashMap<&str, String> = self
            .entries
            .iter()
            .map(|e| {
                let id = e.full_url.trim_start_matches("urn:uuid:");
                (e.full_url.as_str(), format!("{}/{id}", e.resource_type))
            })
            .collect();
        let mut out: Vec<(String, Vec<Json>)> = Vec::new();
        for e in &self.entries {
            let mut r = e.resource.clone();
            relative_references(&mut r, &local);
            drop_unresolved(&mut r, &HashSet::new());
            r["id"] = e.full_url.trim_start_matches("urn:uuid:").into();
            match out.iter_mut().find(|(t, _)| *t == e.resource_type) {
                Some((_, list)) => list.push(r),
                None => out.push((e.resource_type.clone(), vec![r])),
            }
        }
        out
    }
}

/// Removes every `"reference": "urn:uuid:..."` that is not in `local`, leaving the
/// Reference logical (type and identifier, which [`ids::local`] always sets).
fn drop_unresolved(value: &mut Json, local: &HashSet<&str>) {
    match value {
        Json::Object(map) => {
            let unresolved = map
                .get("reference")
                .and_then(Json::as_str)
                .is_some_and(|r| r.starts_with("urn:uuid:") && !local.contains(r));
            if unresolved {
                map.remove("reference");
            }
            map.values_mut().for_each(|v| drop_unresolved(v, local));
        }
        Json::Array(items) => items.iter_mut().for_each(|v| drop_unresolved(v, local)),
        _ => {}
    }
}

/// Rewrites every `"reference": "urn:uuid:..."` naming an entry to its `Type/id`.
fn relative_references(value: &mut Json, local: &HashMap<&str, String>) {
    match value {
        Json::Object(map) => {
            for (k, v) in map.iter_mut() {
                match v {
                    Json::String(s) if k == "reference" => {
                        if let Some(r) = local.get(s.as_str()) {
                            *s = r.clone();
                        }
                    }
                    _ => relative_references(v, local),
                }
            }
        }
        Json::Array(items) => items.iter_mut().for_each(|v| relative_references(v, local)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observation::tests::event_json;

    fn facts() -> DeviceFacts {
        DeviceFacts {
            id: "dev-1".into(),
            site: "site-01".into(),
            patient_ref: Some("pt-aaaa1111".into()),
            fw: Some("5.12.1".into()),
            model: Some("arrhythmia-net/2.1.0".into()),
            lot: Some("L-7".into()),
            hardware_model: Some("vw-200".into()),
            region: Some("uk-south".into()),
        }
    }

    fn bundle() -> Json {
        let mut b = BundleBuilder::new();
        b.device(&facts());
        let e = Event::from_json(&event_json(json!({"spo2": 95, "sbp": 120, "dbp": 80})))
            .expect("event");
        assert_eq!(b.reading(&e, b"\xd2\x84cose").expect("reading"), 2);
        for (i, state) in crate::alert::STATES.iter().enumerate() {
            let mut body = json!({
                "alert_id": "al-1", "kind": "clinical", "state": state, "severity": "urgent",
                "rule": "spo2-low", "rule_version": "3", "policy_sha256": "ab12",
                "device": "dev-1", "patient_ref": "pt-aaaa1111", "evidence": ["ev1-0123"],
                "raised_at": "2025-11-21T12:00:05Z",
            });
            if *state == "acknowledged" {
                body["ack"] =
                    json!({"by": "spiffe://d/integrator/n-1", "at": "2025-11-21T12:01:00Z"});
            }
            b.alert(&AlertChange {
                body,
                recorded_at_ms: 1_763_726_460_000 + i as u64,
            })
            .expect("alert");
        }
        b.transaction()
    }

    #[test]
    fn search_values_are_escaped_and_odd_metric_names_stay_valid() {
        let mut e = event_json(json!({"spo2,x": 1, "a&b#c%+=": 2, "": 3, "a  b": 4}));
        e["fw"] = json!("");
        let e = Event::from_json(&e).expect("event");
        let mut b = BundleBuilder::new();
        assert_eq!(b.reading(&e, b"x").expect("reading"), 4);
        b.device(&DeviceFacts {
            id: "dev,1|x".into(),
            fw: Some(String::new()),
            ..facts()
        });
        let t = b.transaction();
        let entries = t["entry"].as_array().expect("entries");
        let requests: Vec<String> = entries
            .iter()
            .map(|e| {
                let r = &e["request"];
                r["ifNoneExist"]
                    .as_str()
                    .map_or_else(|| r["url"].as_str().unwrap_or("").to_owned(), str::to_owned)
            })
            .collect();
        for want in [
            r"identifier=urn:vitalmq:observation|ev1-0123/spo2%5C%2Cx",
            "identifier=urn:vitalmq:observation|ev1-0123/a%26b%23c%2525%2B%3D",
            "identifier=urn:vitalmq:observation|ev1-0123/%25",
            "identifier=urn:vitalmq:observation|ev1-0123/a%2520%2520b",
            "Device?identifier=urn:vitalmq:device|dev%5C%2C1%5C%7Cx",
        ] {
            assert!(requests.iter().any(|r| r == want), "{want}: {requests:#?}");
        }
        for o in entries
            .iter()
            .filter(|e| e["resource"]["resourceType"] == "Observation")
        {
            let o = &o["resource"];
            let code = o["code"]["coding"][0]["code"].as_str().expect("code");
            assert!(!code.is_empty() && !code.contains("  "), "{o}");
            assert!(o["code"]["text"] != "", "{o}");
            assert!(
                !o.to_string().contains(crate::observation::EXT_FIRMWARE),
                "{o}"
            );
        }
        let device = entries
            .iter()
            .find(|e| e["resource"]["resourceType"] == "Device")
            .expect("device");
        assert!(
            device["resource"]["version"]
                .as_array()
                .is_none_or(|v| v.iter().all(|x| x["value"] != "")),
            "{device}"
        );
        // The verifier reads the original names back.
        let obs: Vec<(String, Option<f64>)> = entries
            .iter()
            .filter(|e| e["resource"]["resourceType"] == "Observation")
            .flat_map(|e| crate::read::values(&e["resource"]))
            .collect();
        let names: HashSet<&str> = obs.iter().map(|(m, _)| m.as_str()).collect();
        assert_eq!(names, HashSet::from(["spo2,x", "a&b#c%+=", "", "a  b"]));
    }

    #[test]
    fn transaction_entries_are_idempotent_requests() {
        let b = bundle();
        assert_eq!(b, bundle(), "the same input gives the same Bundle");
        let entries = b["entry"].as_array().expect("entries");
        let types: Vec<&str> = entries
            .iter()
            .map(|e| e["resource"]["resourceType"].as_str().expect("type"))
            .collect();
        // Device, 2 Observations, Provenance; DetectedIssue and Task once; a
        // Communication and a Provenance per change.
        assert_eq!(types.iter().filter(|t| **t == "Observation").count(), 2);
        assert_eq!(types.iter().filter(|t| **t == "DetectedIssue").count(), 1);
        assert_eq!(types.iter().filter(|t| **t == "Task").count(), 1);
        assert_eq!(types.iter().filter(|t| **t == "Communication").count(), 4);
        assert_eq!(types.iter().filter(|t| **t == "Provenance").count(), 5);
        let task = entries
            .iter()
            .find(|e| e["resource"]["resourceType"] == "Task")
            .expect("task");
        assert_eq!(
            task["resource"]["status"], "completed",
            "the newest state wins"
        );
        assert_eq!(task["request"]["method"], "PUT");
        assert_eq!(
            task["request"]["url"],
            "Task?identifier=urn:vitalmq:alert|al-1"
        );
        let obs = entries
            .iter()
            .find(|e| e["resource"]["resourceType"] == "Observation")
            .expect("obs");
        assert_eq!(obs["request"]["method"], "POST");
        assert_eq!(
            obs["request"]["ifNoneExist"],
            "identifier=urn:vitalmq:observation|ev1-0123/spo2"
        );
        // Provenance: no identifier to search on, no chained search (HAPI-2498): PUT
        // to the id derived from the raw message's hash, the same id as the fullUrl.
        let provs: Vec<&Json> = entries
            .iter()
            .filter(|e| e["resource"]["resourceType"] == "Provenance")
            .collect();
        for p in &provs {
            assert_eq!(p["request"]["method"], "PUT", "{p}");
            assert!(p["request"].get("ifNoneExist").is_none(), "{p}");
            let id = p["resource"]["id"].as_str().expect("id");
            assert_eq!(p["request"]["url"], format!("Provenance/{id}"));
            assert_eq!(p["fullUrl"], format!("urn:uuid:{id}"));
        }
        assert_eq!(
            provs[0]["fullUrl"],
            ids::full_url("Provenance", ids::RAW_SHA256, &"aa".repeat(32)).as_str()
        );
        assert!(
            !b.to_string().contains(":identifier="),
            "no chained identifier search anywhere"
        );
        for e in entries {
            assert!(
                e["fullUrl"]
                    .as_str()
                    .is_some_and(|u| u.starts_with("urn:uuid:"))
            );
        }
        // References to resources of the Bundle resolve to their fullUrls.
        let device_url = ids::full_url("Device", ids::DEVICE, "dev-1");
        assert_eq!(obs["resource"]["device"]["reference"], device_url.as_str());
    }

    #[test]
    fn signed_readings_resolve_their_observations() {
        let b = bundle();
        let readings = crate::read::signed_readings(&b).expect("reads");
        assert_eq!(readings.len(), 1);
        let r = &readings[0];
        assert_eq!(r.cose, b"\xd2\x84cose");
        assert_eq!(r.device.as_deref(), Some("dev-1"));
        assert_eq!(r.author.as_deref(), Some("dev-1"));
        assert_eq!(r.entity_sha256.as_deref(), Some("aa".repeat(32).as_str()));
        assert!(r.missing_targets.is_empty());
        let mut values: Vec<(String, Option<f64>)> = r
            .observations
            .iter()
            .flat_map(|o| o.values.clone())
            .collect();
        values.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            values,
            vec![
                ("dbp".into(), Some(80.0)),
                ("sbp".into(), Some(120.0)),
                ("spo2".into(), Some(95.0))
            ]
        );
        // The gateway that relayed it and the bridge are agents too.
        let prov = b["entry"]
            .as_array()
            .and_then(|es| es.iter().find(|e| e["resource"]["signature"].is_array()))
            .expect("provenance");
        let agents = prov["resource"]["agent"].as_array().expect("agents");
        assert_eq!(agents.len(), 3);
        assert_eq!(
            prov["resource"]["signature"][0]["type"][0]["code"],
            "1.2.840.10065.1.12.1.1"
        );
        assert_eq!(
            prov["resource"]["signature"][0]["sigFormat"],
            "application/cose"
        );
    }

    /// Every `urn:uuid:` reference of a Bundle names one of its entries.
    fn placeholders_resolve(b: &Json) -> Vec<String> {
        fn refs(v: &Json, out: &mut Vec<String>) {
            match v {
                Json::Object(m) => m.iter().for_each(|(k, v)| match v.as_str() {
                    Some(r) if k == "reference" => out.push(r.to_owned()),
                    _ => refs(v, out),
                }),
                Json::Array(a) => a.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let entries = b["entry"].as_array().expect("entries");
        let urls: Vec<&str> = entries
            .iter()
            .filter_map(|e| e["fullUrl"].as_str())
            .collect();
        let mut out = Vec::new();
        entries.iter().for_each(|e| refs(&e["resource"], &mut out));
        out.retain(|r| r.starts_with("urn:uuid:") && !urls.contains(&r.as_str()));
        out
    }

    #[test]
    fn an_alert_brings_its_device_as_a_minimal_conditional_create() {
        let change = AlertChange {
            body: json!({
                "alert_id": "al-1", "kind": "clinical", "state": "open", "severity": "urgent",
                "rule": "spo2-low", "rule_version": "3", "device": "dev-1",
                "patient_ref": "pt-aaaa1111", "evidence": ["ev1-0123"],
                "raised_at": "2025-11-21T12:00:05Z",
            }),
            recorded_at_ms: 1_763_726_460_000,
        };
        let mut alone = BundleBuilder::new();
        alone.alert(&change).expect("alert");
        let b = alone.transaction();
        assert_eq!(placeholders_resolve(&b), Vec::<String>::new(), "{b}");
        let issue = b["entry"]
            .as_array()
            .and_then(|es| {
                es.iter()
                    .find(|e| e["resource"]["resourceType"] == "DetectedIssue")
            })
            .expect("issue");
        // `implicated` resolves, to a minimal Device created only if absent.
        let dev_url = ids::full_url("Device", ids::DEVICE, "dev-1");
        assert_eq!(
            issue["resource"]["implicated"][0]["reference"],
            dev_url.as_str()
        );
        let device = b["entry"]
            .as_array()
            .and_then(|es| es.iter().find(|e| e["fullUrl"] == dev_url.as_str()))
            .expect("the implicated Device");
        assert_eq!(
            device["resource"],
            json!({"resourceType": "Device", "identifier": [{"system": ids::DEVICE, "value": "dev-1"}]})
        );
        assert_eq!(device["request"]["method"], "POST");
        assert_eq!(
            device["request"]["ifNoneExist"],
            "identifier=urn:vitalmq:device|dev-1"
        );
        // NDJSON: no placeholder either.
        for (_, list) in alone.by_type() {
            assert!(
                !serde_json::to_string(&list)
                    .expect("json")
                    .contains("urn:uuid:")
            );
        }
        // With the Device in the Bundle, the reference resolves to it, before or after
        // the alert: the full entry, never the minimal one.
        let mut after = BundleBuilder::new();
        after.alert(&change).expect("alert");
        after.device(&facts());
        let mut with = BundleBuilder::new();
        with.device(&facts());
        with.alert(&change).expect("alert");
        for b in [&after, &with] {
            let d = b
                .entries()
                .iter()
                .filter(|e| e.resource_type == "Device")
                .collect::<Vec<_>>();
            assert_eq!(d.len(), 1);
            assert_eq!(d[0].resource["status"], "active", "the full Device");
        }
        let b = with.transaction();
        assert_eq!(placeholders_resolve(&b), Vec::<String>::new());
        assert!(
            b.to_string()
                .contains(&ids::full_url("Device", ids::DEVICE, "dev-1"))
        );
        assert_eq!(placeholders_resolve(&bundle()), Vec::<String>::new());
    }

    #[test]
    fn a_purged_raw_message_gives_an_unsigned_provenance() {
        let mut b = BundleBuilder::new();
        let e = Event::from_json(&event_json(json!({"spo2": 95}))).expect("event");
        assert_eq!(b.reading_raw_purged(&e).expect("reading"), 1);
        let t = b.transaction();
        let p = t["entry"]
            .as_array()
            .and_then(|es| {
                es.iter()
                    .find(|e| e["resource"]["resourceType"] == "Provenance")
            })
            .expect("provenance");
        assert!(p["resource"].get("signature").is_none());
        assert_eq!(
            p["resource"]["entity"][0]["what"]["identifier"]["value"],
            "aa".repeat(32)
        );
        assert!(
            p["resource"]["policy"]
                .as_array()
                .expect("policy")
                .contains(&json!(provenance::RAW_PURGED))
        );
        assert!(
            t["entry"][0]["resource"]["note"][0]["text"]
                .as_str()
                .is_some_and(|n| n.contains("purged"))
        );
        assert!(crate::read::signed_readings(&t).expect("reads").is_empty());
        let purged = crate::read::purged_readings(&t);
        assert_eq!(purged.len(), 1);
        assert_eq!(purged[0].observations.len(), 1);
        // Never under the signed Provenance's id: a purged export loaded into a server
        // the sink fed must not replace the signature there.
        let mut signed = BundleBuilder::new();
        signed.reading(&e, b"\xd2\x84cose").expect("reading");
        let s = signed.transaction();
        let s = s["entry"]
            .as_array()
            .and_then(|es| {
                es.iter()
                    .find(|e| e["resource"]["resourceType"] == "Provenance")
            })
            .expect("signed provenance")
            .clone();
        assert_ne!(s["fullUrl"], p["fullUrl"]);
        assert_ne!(s["resource"]["id"], p["resource"]["id"]);
        assert_ne!(s["request"]["url"], p["request"]["url"]);
        assert_eq!(
            p["request"]["url"],
            format!(
                "Provenance/{}",
                ids::full_url("Provenance", provenance::RAW_PURGED, &"aa".repeat(32))
                    .trim_start_matches("urn:uuid:")
            )
        );
    }

    #[test]
    fn an_export_creates_device_and_task_only_if_absent() {
        let mut b = BundleBuilder::for_export();
        b.device(&facts());
        b.alert(&AlertChange {
            body: json!({
                "alert_id": "al-1", "kind": "clinical", "state": "open", "severity": "urgent",
                "rule": "spo2-low", "rule_version": "3", "device": "dev-1",
                "patient_ref": "pt-aaaa1111", "evidence": ["ev1-0123"],
                "raised_at": "2025-11-21T12:00:05Z",
            }),
            recorded_at_ms: 1_763_726_460_000,
        })
        .expect("alert");
        let t = b.transaction();
        for (rt, key) in [
            ("Device", "urn:vitalmq:device|dev-1"),
            ("Task", "urn:vitalmq:alert|al-1"),
        ] {
            let e = t["entry"]
                .as_array()
                .and_then(|es| es.iter().find(|e| e["resource"]["resourceType"] == rt))
                .expect(rt);
            assert_eq!(e["request"]["method"], "POST", "{e}");
            assert_eq!(e["request"]["ifNoneExist"], format!("identifier={key}"));
        }
        // The sink's builder keeps updating them.
        let t = bundle();
        let device = t["entry"]
            .as_array()
            .and_then(|es| {
                es.iter()
                    .find(|e| e["resource"]["resourceType"] == "Device")
            })
            .expect("device");
        assert_eq!(device["request"]["method"], "PUT");
    }

    #[test]
    fn ndjson_references_are_relative() {
        let mut b = BundleBuilder::new();
        b.device(&facts());
        let e = Event::from_json(&event_json(json!({"pulse": 70}))).expect("event");
        b.reading(&e, b"x").expect("reading");
        let groups = b.by_type();
        let (t, obs) = &groups[1];
        assert_eq!(t, "Observation");
        let device_id = groups[0].1[0]["id"].as_str().expect("id");
        assert_eq!(obs[0]["device"]["reference"], format!("Device/{device_id}"));
        let (_, prov) = &groups[2];
        let obs_id = obs[0]["id"].as_str().expect("id");
        assert_eq!(
            prov[0]["target"][0]["reference"],
            format!("Observation/{obs_id}")
        );
    }

    #[test]
    fn device_carries_its_facts() {
        let d = device::device(&facts());
        assert_eq!(d["lotNumber"], "L-7");
        assert_eq!(d["modelNumber"], "vw-200");
        assert_eq!(d["version"][0]["value"], "5.12.1");
        assert_eq!(d["version"][1]["value"], "arrhythmia-net/2.1.0");
        assert_eq!(d["property"][0]["valueCode"][0]["text"], "uk-south");
        assert_eq!(d["location"]["identifier"]["value"], "site-01");
        assert_eq!(d["patient"]["identifier"]["system"], ids::PATIENT);
        let bare = device::device(&DeviceFacts {
            id: "d".into(),
            site: "s".into(),
            ..Default::default()
        });
        assert!(bare.get("lotNumber").is_none() && bare.get("version").is_none());
    }
}
