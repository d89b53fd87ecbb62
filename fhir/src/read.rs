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
    /// The target Observations found: identifier value -> their metric values.
    pub observations: Vec<TargetObservation>,
    /// Targets that could not be found among the resources.
    pub missing_targets: Vec<String>,
}

/// A target Observation's claims.
#[derive(Debug, Clone)]
pub struct TargetObservation {
    /// Its `urn:vitalmq:observation` identifier value.
    pub key: String,
    pub effective: Option<String>,
    pub device: Option<String>,
    /// (metric, value) pairs; `None` when absent (dataAbsentReason).
    pub values: Vec<(String, Option<f64>)>,
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

fn reference_device(r: &Json) -> Option<String> {
    (r["identifier"]["system"] == ids::DEVICE)
        .then(|| r["identifier"]["value"].as_str().map(str::to_owned))
        .flatten()
}

/// The metric values an Observation claims.
pub fn values(o: &Json) -> Vec<(String, Option<f64>)> {
    let metric_of = |code: &Json| -> Option<String> {
        let codings = code["coding"].as_array()?;
        codings.iter().find_map(|c| {
            let code = c["code"].as_str()?;
            if c["system"] == codes::LOINC {
                codes::metric_of(code).map(str::to_owned)
            } else if c["system"] == codes::METRIC {
                Some(code.to_owned())
            } else {
                None
            }
        })
    };
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

/// Every Provenance in `doc` with a COSE signature, with its target Observations
/// resolved (by fullUrl within a Bundle, else by identifier).
pub fn signed_readings(doc: &Json) -> Result<Vec<SignedReading>, crate::Error> {
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
    let mut out = Vec::new();
    for (index, p) in all.iter().enumerate() {
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
        let author = p["agent"].as_array().and_then(|agents| {
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
        });
        let entity_sha256 = p["entity"].as_array().and_then(|es| {
            es.iter().find_map(|e| {
                (e["what"]["identifier"]["system"] == ids::RAW_SHA256)
                    .then(|| e["what"]["identifier"]["value"].as_str().map(str::to_owned))
                    .flatten()
            })
        });
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
                Some(o) => observations.push(TargetObservation {
                    key: observation_key(o).unwrap_or_default().to_owned(),
                    effective: o["effectiveDateTime"].as_str().map(str::to_owned),
                    device: reference_device(&o["device"]),
                    values: values(o),
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
        out.push(SignedReading {
            index,
            device: reference_device(&sig["who"]),
            author,
            cose,
            entity_sha256,
            observations,
            missing_targets,
        });
    }
    Ok(out)
}
