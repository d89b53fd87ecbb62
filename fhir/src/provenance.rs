//! Chain of custody as FHIR R4 Provenance.
//!
//! A reading: targets = its Observations; agents = the device (author), the gateway
//! that relayed it if one did (informant), the bridge that verified and recorded it
//! (custodian); entity = the raw message by its SHA-256; signature = the device's own
//! COSE_Sign1 bytes, so any FHIR consumer can re-verify the reading with the device's
//! public key, without vitalmq.
//!
//! An alert state change: targets = its Communication (and the episode's DetectedIssue
//! and Task); agents = the bridge (author) and, for an acknowledgement, the
//! acknowledger (verifier); entities = the evidence events; `policy` = the rule and its
//! version, the policy digest and the on-device model the alert names.

use base64::Engine as _;
use serde_json::{Value as Json, json};

use crate::alert::AlertResources;
use crate::event::Event;
use crate::ids;
use crate::observation::MappedObservation;

/// ASTM E1762-95 signature types; `1.2.840.10065.1.12.1.1` is "Author's Signature":
/// the device signed its own message as its originator (it is the `author` agent);
/// nobody signs as a verifier ("Verification Signature", `...1.5`, would say someone
/// attested content they did not author).
pub const SIGNATURE_TYPE_SYSTEM: &str = "urn:iso-astm:E1762-95:2013";
pub const AUTHOR_SIGNATURE: &str = "1.2.840.10065.1.12.1.1";
/// `Provenance.signature.sigFormat` of a COSE_Sign1 (RFC 9052).
pub const COSE: &str = "application/cose";
const PARTICIPANT: &str = "http://terminology.hl7.org/CodeSystem/provenance-participant-type";

fn agent(code: &str, who: Json) -> Json {
    json!({"type": {"coding": [{"system": PARTICIPANT, "code": code}]}, "who": who})
}

/// A URI-identified system or person (a SPIFFE id) as a Reference.
fn by_uri(resource_type: Option<&str>, uri: &str) -> Json {
    let mut r = json!({"identifier": ids::identifier(ids::URI, uri), "display": uri});
    if let Some(t) = resource_type {
        r["type"] = t.into();
    }
    r
}

/// `Provenance.policy` of a reading whose raw message retention purged: no
/// `signature` (the COSE bytes are gone), the entity keeps its SHA-256.
pub const RAW_PURGED: &str = "urn:vitalmq:raw-purged";

/// The Provenance of a reading, with `raw` = the COSE_Sign1 bytes as received (their
/// SHA-256 is the event's `raw_sha256`; the caller checks that before calling).
pub fn reading(
    event: &Event,
    observations: &[MappedObservation],
    raw: &[u8],
) -> Result<Json, crate::Error> {
    of_reading(event, observations, Some(raw))
}

/// The Provenance of a reading whose raw message retention purged (the event is kept):
/// the same chain of custody without `signature`, the entity naming the SHA-256 the
/// message had, `policy` [`RAW_PURGED`]. Nobody can re-verify it: verifiers report it
/// apart from tampering.
pub fn reading_raw_purged(
    event: &Event,
    observations: &[MappedObservation],
) -> Result<Json, crate::Error> {
    of_reading(event, observations, None)
}

fn of_reading(
    event: &Event,
    observations: &[MappedObservation],
    raw: Option<&[u8]>,
) -> Result<Json, crate::Error> {
    let (occurred, _) = event.effective()?;
    let recorded = match &event.received_at {
        Some(t) => t.clone(),
        None => occurred.clone(),
    };
    let targets: Vec<Json> = observations
        .iter()
        .map(|o| ids::local("Observation", ids::OBSERVATION, &o.key))
        .collect();
    let mut agents = vec![agent("author", ids::device(&event.device))];
    if let Some(gateway) = event.relayed_by() {
        agents.push(agent("informant", by_uri(Some("Device"), gateway)));
    }
    agents.push(agent(
        "custodian",
        by_uri(Some("Device"), &event.provenance.bridge),
    ));
    let mut p = json!({
        "resourceType": "Provenance",
        "target": targets,
        "occurredDateTime": occurred,
        "recorded": recorded,
        "policy": [format!("urn:vitalmq:transformation:{}", event.provenance.transformation)],
        "agent": agents,
        "entity": [{
            "role": "source",
            "what": {
                "identifier": ids::identifier(ids::RAW_SHA256, &event.provenance.raw_sha256),
                "display": format!("COSE_Sign1 message {} seq {} epoch {}", event.event_id, event.seq, event.epoch),
            },
        }],
        "signature": raw.map(|raw| json!([{
            "type": [{
                "system": SIGNATURE_TYPE_SYSTEM,
                "code": AUTHOR_SIGNATURE,
                "display": "Author's Signature",
            }],
            "when": recorded,
            "who": ids::device(&event.device),
            "targetFormat": "application/cbor",
            "sigFormat": COSE,
            "data": base64::engine::general_purpose::STANDARD.encode(raw),
        }])),
    });
    if raw.is_none() {
        if let Some(o) = p.as_object_mut() {
            o.remove("signature");
        }
        p["entity"][0]["what"]["display"] = format!(
            "COSE_Sign1 message {} seq {} epoch {}, purged by retention (only its SHA-256 remains)",
            event.event_id, event.seq, event.epoch
        )
        .into();
        if let Some(policy) = p["policy"].as_array_mut() {
            policy.push(RAW_PURGED.into());
        }
    }
    if let (Some(c), Some(policy)) = (&event.provenance.consent, p["policy"].as_array_mut()) {
        policy.push(format!("urn:vitalmq:consent:{c}").into());
    }
    Ok(p)
}

/// The Provenance of an alert state change.
pub fn alert(r: &AlertResources) -> Result<Json, crate::Error> {
    let a = &r.alert;
    let recorded = r.communication["sent"].clone();
    let mut targets = vec![ids::local(
        "Communication",
        ids::ALERT_CHANGE,
        &r.change_key,
    )];
    targets.push(ids::local("DetectedIssue", ids::ALERT, &a.alert_id));
    if r.task.is_some() {
        targets.push(ids::local("Task", ids::ALERT, &a.alert_id));
    }
    let mut agents = vec![agent(
        "author",
        ids::logical("Device", ids::COMPONENT, "bridge"),
    )];
    if let Some(dev) = &a.device {
        agents.push(agent("informant", ids::device(dev)));
    }
    if let Some(ack) = &a.ack {
        agents.push(agent("verifier", by_uri(None, &ack.by)));
    }
    let mut policy = Vec::new();
    if let Some(rule) = &a.rule {
        policy.push(format!(
            "urn:vitalmq:rule:{rule}:{}",
            a.rule_version.as_deref().unwrap_or("unversioned")
        ));
    }
    if let Some(digest) = &a.policy_sha256 {
        policy.push(format!("urn:vitalmq:policy-sha256:{digest}"));
    }
    if let Some(model) = &a.model {
        policy.push(format!("urn:vitalmq:model:{model}"));
    }
    if let Some(fw) = &a.fw {
        policy.push(format!("urn:vitalmq:firmware:{fw}"));
    }
    let entities: Vec<Json> = a
        .evidence
        .iter()
        .map(|e| json!({"role": "source", "what": ids::logical("Observation", ids::EVENT, e)}))
        .collect();
    let mut p = json!({
        "resourceType": "Provenance",
        "target": targets,
        "recorded": recorded,
        "policy": policy,
        "activity": {"coding": [{
            "system": "urn:vitalmq:alert-state",
            "code": a.state,
        }], "text": format!("alert {}", a.state)},
        "agent": agents,
    });
    if let Some(at) = &a.raised_at {
        p["occurredDateTime"] = at.as_str().into();
    }
    if !entities.is_empty() {
        p["entity"] = Json::Array(entities);
    }
    Ok(p)
}
