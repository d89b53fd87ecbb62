//! The signed readings a Bundle (or a lone Provenance) carries: what a verifier needs
//! to check each device signature and that the Observations say what was signed.

use std::collections::HashMap;

use base64::Engine as _;
use serde_json::Value as Json;

use crate::{codes, ids, provenance};

/// One Provenance carrying a device's COSE_Sign1.
#[derive(Debug, Clone)]
pub struct SignedReading {
    /// Index of the Provenance among the resources read (0-based).
    pub index: usize,
    /// The device named by `signature.who` (its `urn:vitalmq:device` identifier).
    pub device: Option<String>,
    /// The device named as `author` agent.
    pub author: Option<String>,
    /// The COSE_Sign1 bytes.
    pub cose: Vec<u8>,
    /// The raw message SHA-256 the entity names (hex).
    pub entity_sha256: Option<String>,
    /// References of the Provenance whose `reference` and `identifier` disagree.
    pub problems: Vec<String>,
    /// The target Observations found: identifier value -> their metric values.
    pub observations: Vec<TargetObservation>,
    /// Targets that could not be found among the resources.
    pub missing_targets: Vec<String>,
}

/// A target Observation's claims.
#[derive(Debug, Clone)]
pub struct TargetObservation {
    /// Its index among the resources read ([`resources`]): coverage is per resource,
    /// not per identifier, so a copy under the same identifier is not covered.
    pub index: usize,
    /// Its `urn:vitalmq:observation` identifier value (empty when it has none).
    pub key: String,
    /// Its `urn:vitalmq:event` identifier value.
    pub event: Option<String>,
    pub effective: Option<String>,
    /// The device-time extension (the device clock, when beyond RFC 3339).
    pub device_time: Option<String>,
    pub device: Option<String>,
    /// (metric, value) pairs; `None` when absent (dataAbsentReason).
    pub values: Vec<(String, Option<f64>)>,
    /// The `urn:vitalmq:observation` identifier the mapping gives such an Observation
    /// of event `event_id` ([`Self::expected_key`]): a panel's, or its metric's.
    pub panel: bool,
    pub metric: Option<String>,
    /// What the mapping never produces: `value[x]` next to `component`, a unit other
    /// than the mapping table's.
    pub problems: Vec<String>,
    /// Its [`projection`]: what the mapping derives from the signed message.
    pub projection: Json,
}

/// The resources of `doc`: a Bundle's entry resources, or the document itself.
pub fn resources(doc: &Json) -> Vec<&Json> {
    if doc["resourceType"] == "Bundle" {
        doc["entry"]
            .as_array()
            .map(|es| es.iter().map(|e| &e["resource"]).collect())
            .unwrap_or_default()
    } else {
        vec![doc]
    }
}

fn identifier_value<'a>(identifiers: &'a Json, system: &str) -> Option<&'a str> {
    identifiers
        .as_array()?
        .iter()
        .find(|i| i["system"] == system)
        .and_then(|i| i["value"].as_str())
}

/// The business key of an Observation.
pub fn observation_key(o: &Json) -> Option<&str> {
    identifier_value(&o["identifier"], ids::OBSERVATION)
}

/// Where Reference `r` has both a `reference` and an `identifier`, what is wrong when
/// they name different resources: a reader resolves the reference, a checker reading
/// only the identifier would vouch for another resource. The reference must be the
/// mapping's fullUrl of its `type` (else `resource_type`) with that identifier (or its
/// `Type/id`).
pub fn reference_problem(r: &Json, resource_type: &str) -> Option<String> {
    let reference = r["reference"].as_str()?;
    let resource_type = r["type"].as_str().unwrap_or(resource_type);
    let (system, value) = (
        r["identifier"]["system"].as_str()?,
        r["identifier"]["value"].as_str()?,
    );
    let url = ids::full_url(resource_type, system, value);
    let relative = format!("{resource_type}/{}", url.trim_start_matches("urn:uuid:"));
    (reference != url && reference != relative).then(|| {
        format!("reference {reference} is not the {resource_type} of its identifier {system}|{value} ({url})")
    })
}

fn reference_device(r: &Json) -> Option<String> {
    (r["identifier"]["system"] == ids::DEVICE)
        .then(|| r["identifier"]["value"].as_str().map(str::to_owned))
        .flatten()
}

/// The metric values an Observation claims (the components of a panel, else its
/// `valueQuantity`); see [`problems`] for what makes such a reading ambiguous.
pub fn values(o: &Json) -> Vec<(String, Option<f64>)> {
    let mut out = Vec::new();
    if let Some(components) = o["component"].as_array() {
        for c in components {
            if let Some(m) = metric_of(&c["code"]) {
                out.push((m, c["valueQuantity"]["value"].as_f64()));
            }
        }
    } else if let Some(m) = metric_of(&o["code"]) {
        out.push((m, o["valueQuantity"]["value"].as_f64()));
    }
    out
}

fn metric_of(code: &Json) -> Option<String> {
    let codings = code["coding"].as_array()?;
    codings.iter().find_map(|c| {
        let code = c["code"].as_str()?;
        if c["system"] == codes::LOINC {
            codes::metric_of(code).map(str::to_owned)
        } else if c["system"] == codes::METRIC {
            codes::metric_name(code)
        } else {
            None
        }
    })
}

/// The unit (UCUM code) the mapping gives `metric`; `None` for a metric SPEC does not
/// list (its Quantity carries no unit).
fn expected_ucum(metric: &str) -> Option<&'static str> {
    codes::vital(metric).map(|v| v.ucum).or_else(|| {
        codes::BP_PARTS
            .iter()
            .any(|(m, _)| *m == metric)
            .then_some(codes::MM_HG)
    })
}

fn unit_problem(metric: &str, quantity: &Json) -> Option<String> {
    if quantity.is_null() {
        return None;
    }
    let (system, code) = (quantity["system"].as_str(), quantity["code"].as_str());
    match expected_ucum(metric) {
        Some(ucum) if system == Some(codes::UCUM) && code == Some(ucum) => None,
        None if system.is_none() && code.is_none() => None,
        expected => Some(format!(
            "{metric}: unit {system:?}|{code:?}, the mapping's is {:?}",
            expected.map(|u| format!("{}|{u}", codes::UCUM))
        )),
    }
}

/// What makes an Observation's claims differ from what the mapping produces: a
/// `value[x]` next to `component` (a reader could take either), a unit other than the
/// mapping table's (a value is only the signed one in the signed unit).
pub fn problems(o: &Json) -> Vec<String> {
    let mut out = Vec::new();
    let components = o["component"].as_array();
    let value_x = o
        .as_object()
        .map(|m| {
            m.keys()
                .filter(|k| k.starts_with("value"))
                .cloned()
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    if components.is_some() && !value_x.is_empty() {
        out.push(format!("{} together with component", value_x.join(", ")));
    }
    if components.is_none() && value_x.iter().any(|k| k != "valueQuantity") {
        out.push(format!("{} is not a valueQuantity", value_x.join(", ")));
    }
    if let Some(components) = components {
        for c in components {
            if let Some(m) = metric_of(&c["code"]) {
                out.extend(unit_problem(&m, &c["valueQuantity"]));
            }
        }
    } else if let Some(m) = metric_of(&o["code"]) {
        out.extend(unit_problem(&m, &o["valueQuantity"]));
    }
    out
}

/// The fields of an Observation that are unsigned (identifiers, subject, device,
/// times, bridge-side notes and extensions, narrative, server metadata): checked apart
/// or not at all; everything else the mapping derives from the signed message.
const UNSIGNED_FIELDS: [&str; 10] = [
    "id",
    "identifier",
    "subject",
    "device",
    "issued",
    "effectiveDateTime",
    "extension",
    "note",
    "text",
    "meta",
];

/// What of Observation `o` the mapping derives from the signed message: `o` without
/// its [`UNSIGNED_FIELDS`] (but with `meta.profile`), codings as a set (sorted),
/// numbers as f64. Two Observations with equal projections say the same thing to any
/// reader (same codes, values, units, components, status, category), so a verifier
/// compares the given one's with the projection of what the mapping makes of the
/// signed payload ([`expected_projections`]): nothing recoded, added or left over.
pub fn projection(o: &Json) -> Json {
    let Some(map) = o.as_object() else {
        return o.clone();
    };
    let mut out = serde_json::Map::new();
    for (k, v) in map {
        if !UNSIGNED_FIELDS.contains(&k.as_str()) {
            out.insert(k.clone(), canonical(v));
        }
    }
    if let Some(profile) = o["meta"].get("profile") {
        out.insert("meta.profile".into(), canonical(profile));
    }
    Json::Object(out)
}

/// Numbers as f64 (`120` and `120.0` are one value), every `coding` array sorted.
fn canonical(v: &Json) -> Json {
    match v {
        Json::Number(n) => n.as_f64().map_or_else(|| v.clone(), Json::from),
        Json::Array(a) => Json::Array(a.iter().map(canonical).collect()),
        Json::Object(m) => Json::Object(
            m.iter()
                .map(|(k, v)| {
                    let mut v = canonical(v);
                    if k == "coding"
                        && let Some(a) = v.as_array_mut()
                    {
                        a.sort_by_key(Json::to_string);
                    }
                    (k.clone(), v)
                })
                .collect(),
        ),
        _ => v.clone(),
    }
}

/// The [`projection`]s of the Observations the mapping makes of a signed `vitals`
/// message (`m`: metric -> value, `None` for a non-finite one), by their
/// `urn:vitalmq:observation` identifier value.
pub fn expected_projections(
    event_id: &str,
    device: &str,
    ts: u64,
    m: &std::collections::BTreeMap<String, Option<f64>>,
) -> Result<HashMap<String, Json>, crate::Error> {
    // Only what the device signed matters; the unsigned fields are placeholders the
    // projection leaves out.
    let m: serde_json::Map<String, Json> = m
        .iter()
        .map(|(k, v)| (k.clone(), v.map_or(Json::Null, Json::from)))
        .collect();
    let event = crate::event::Event::from_json(&serde_json::json!({
        "event_id": event_id, "device": device, "site": "", "patient_ref": "",
        "epoch": 0, "seq": 0, "type": "vitals", "ts": ts,
        "observed_at": "1970-01-01T00:00:00Z", "received_at": null,
        "m": m, "q": null, "fw": "", "model": null,
        "provenance": {"kid": device, "alg": "", "raw_sha256": "", "publisher": "",
            "bridge": "", "transformation": "", "consent": null},
    }))?;
    Ok(crate::observation::observations(&event)?
        .into_iter()
        .map(|o| (o.key, projection(&o.resource)))
        .collect())
}

impl TargetObservation {
    /// The identifier value the mapping gives this Observation in event `event_id`.
    pub fn expected_key(&self, event_id: &str) -> Option<String> {
        if self.panel {
            Some(crate::observation::panel_key(event_id))
        } else {
            self.metric
                .as_deref()
                .map(|m| crate::observation::key(event_id, m))
        }
    }
}

/// The resources of a document, indexed for resolving Provenance targets.
struct Index<'a> {
    all: Vec<&'a Json>,
    by_url: HashMap<&'a str, &'a Json>,
    by_key: HashMap<&'a str, &'a Json>,
}

impl<'a> Index<'a> {
    fn new(doc: &'a Json) -> Self {
        let mut by_url: HashMap<&str, &Json> = HashMap::new();
        if let Some(es) = doc["entry"].as_array() {
            for e in es {
                if let Some(u) = e["fullUrl"].as_str() {
                    by_url.insert(u, &e["resource"]);
                }
            }
        }
        let all = resources(doc);
        let mut by_key: HashMap<&str, &Json> = HashMap::new();
        for r in &all {
            if r["resourceType"] == "Observation"
                && let Some(k) = observation_key(r)
            {
                by_key.insert(k, r);
            }
        }
        Self {
            all,
            by_url,
            by_key,
        }
    }

    /// The target Observations of Provenance `p` found (by fullUrl within a Bundle,
    /// else by identifier), and the targets not found.
    fn targets(&self, p: &Json) -> (Vec<TargetObservation>, Vec<String>) {
        let (all, by_url, by_key) = (&self.all, &self.by_url, &self.by_key);
        let mut observations = Vec::new();
        let mut missing_targets = Vec::new();
        for t in p["target"].as_array().into_iter().flatten() {
            let found = t["reference"]
                .as_str()
                .and_then(|u| by_url.get(u).copied())
                .or_else(|| {
                    (t["identifier"]["system"] == ids::OBSERVATION)
                        .then(|| t["identifier"]["value"].as_str())
                        .flatten()
                        .and_then(|k| by_key.get(k).copied())
                });
            match found.filter(|o| o["resourceType"] == "Observation") {
                Some(o) => observations.push({
                    let mut problems = problems(o);
                    problems.extend(reference_problem(&o["device"], "Device"));
                    // Resolved by reference: its identifier must name that resource.
                    if t["reference"].is_string() && !t["identifier"].is_null() {
                        let key = observation_key(o);
                        if t["identifier"]["system"] != ids::OBSERVATION
                            || t["identifier"]["value"].as_str() != key
                        {
                            problems.push(format!(
                                "the Provenance target {} names identifier {}, the resource it references has {key:?}",
                                t["reference"], t["identifier"]
                            ));
                        }
                    }
                    TargetObservation {
                    index: all
                        .iter()
                        .position(|r| std::ptr::eq(*r, o))
                        .unwrap_or(usize::MAX),
                    key: observation_key(o).unwrap_or_default().to_owned(),
                    event: identifier_value(&o["identifier"], ids::EVENT).map(str::to_owned),
                    panel: o["component"].is_array(),
                    metric: metric_of(&o["code"]),
                    problems,
                    effective: o["effectiveDateTime"].as_str().map(str::to_owned),
                    device_time: o["extension"].as_array().and_then(|ext| {
                        ext.iter()
                            .find(|x| x["url"] == crate::observation::EXT_DEVICE_TIME)
                            .and_then(|x| x["valueString"].as_str().map(str::to_owned))
                    }),
                    device: reference_device(&o["device"]),
                    values: values(o),
                    projection: projection(o),
                }
                }),
                None => missing_targets.push(
                    t["reference"]
                        .as_str()
                        .or_else(|| t["identifier"]["value"].as_str())
                        .unwrap_or("?")
                        .to_owned(),
                ),
            }
        }
        (observations, missing_targets)
    }
}

/// The device of Provenance `p`'s `author` agent.
fn author_of(p: &Json) -> Option<String> {
    p["agent"].as_array().and_then(|agents| {
        agents.iter().find_map(|a| {
            let author = a["type"]["coding"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["code"] == "author"));
            if author {
                reference_device(&a["who"])
            } else {
                None
            }
        })
    })
}

/// The raw-message SHA-256 (hex) Provenance `p`'s entity names.
fn entity_sha256_of(p: &Json) -> Option<String> {
    p["entity"].as_array().and_then(|es| {
        es.iter().find_map(|e| {
            (e["what"]["identifier"]["system"] == ids::RAW_SHA256)
                .then(|| e["what"]["identifier"]["value"].as_str().map(str::to_owned))
                .flatten()
        })
    })
}

fn agent_problems(p: &Json) -> Vec<String> {
    p["agent"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| reference_problem(&a["who"], "Device").map(|x| format!("agent.who: {x}")))
        .collect()
}

/// A Provenance of a reading whose raw message retention purged ([`provenance::RAW_PURGED`]):
/// no signature to verify, its targets are unsigned, not tampered with.
#[derive(Debug, Clone)]
pub struct PurgedReading {
    pub index: usize,
    /// The device named as `author` agent.
    pub author: Option<String>,
    /// The raw message SHA-256 the entity names (hex).
    pub entity_sha256: Option<String>,
    /// References whose `reference` and `identifier` disagree.
    pub problems: Vec<String>,
    pub observations: Vec<TargetObservation>,
    pub missing_targets: Vec<String>,
}

/// Every Provenance in `doc` without a COSE signature that says its raw message was
/// purged by retention.
pub fn purged_readings(doc: &Json) -> Vec<PurgedReading> {
    let idx = Index::new(doc);
    let mut out = Vec::new();
    for (index, p) in idx.all.iter().enumerate() {
        let signed = p["signature"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["sigFormat"] == provenance::COSE));
        let purged = p["policy"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|x| x == provenance::RAW_PURGED));
        if p["resourceType"] != "Provenance" || signed || !purged {
            continue;
        }
        let (observations, missing_targets) = idx.targets(p);
        out.push(PurgedReading {
            index,
            author: author_of(p),
            entity_sha256: entity_sha256_of(p),
            problems: agent_problems(p),
            observations,
            missing_targets,
        });
    }
    out
}

/// Every Provenance in `doc` with a COSE signature, with its target Observations
/// resolved (by fullUrl within a Bundle, else by identifier).
pub fn signed_readings(doc: &Json) -> Result<Vec<SignedReading>, crate::Error> {
    let idx = Index::new(doc);
    let mut out = Vec::new();
    for (index, p) in idx.all.iter().enumerate() {
        if p["resourceType"] != "Provenance" {
            continue;
        }
        let Some(sig) = p["signature"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["sigFormat"] == provenance::COSE))
        else {
            continue;
        };
        let data = sig["data"].as_str().ok_or_else(|| {
            crate::Error::Bundle(format!(
                "Provenance #{index}: a COSE signature without data"
            ))
        })?;
        let cose = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| {
                crate::Error::Bundle(format!("Provenance #{index}: signature data: {e}"))
            })?;
        let author = author_of(p);
        let entity_sha256 = entity_sha256_of(p);
        let mut problems: Vec<String> = reference_problem(&sig["who"], "Device")
            .into_iter()
            .map(|x| format!("signature.who: {x}"))
            .collect();
        problems.extend(agent_problems(p));
        let (observations, missing_targets) = idx.targets(p);
        out.push(SignedReading {
            index,
            device: reference_device(&sig["who"]),
            author,
            cose,
            entity_sha256,
            problems,
            observations,
            missing_targets,
        });
    }
    Ok(out)
}
