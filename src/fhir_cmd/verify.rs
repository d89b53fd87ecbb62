//! `vitalmq fhir verify FILE --registry REGISTRY`: for every Provenance carrying a
//! COSE_Sign1 (`sigFormat` application/cose), offline:
//!
//! 1. the signature verifies with the registry's key of the device `signature.who`
//!    names, which must be the kid, the payload's `dev` and the `author` agent;
//! 2. the SHA-256 of the bytes equals the raw-message entity's;
//! 3. every target Observation found in the file names that device, has
//!    `effectiveDateTime` = the signed `ts`, carries the event id recomputed from the
//!    signed `dev`/`epoch`/`seq` (and the identifier the mapping derives from it), and
//!    claims exactly the signed values in the mapping table's units (no value changed,
//!    added or dropped; no `value[x]` next to `component`, which a reader could take
//!    instead of the checked one).
//!
//! Then every Observation resource of the file that no verified Provenance targets is
//! a failure too (an unsigned reading slipped in, with or without an identifier), and
//! so is an Observation identifier that occurs twice (a copy next to the signed one).
//! A reading whose raw message retention purged (Provenance without signature, policy
//! `urn:vitalmq:raw-purged`) cannot be re-verified: reported as "unsigned (raw
//! purged)", apart from tampering; a failure unless `--allow-unsigned`.
//! The `subject` is not covered: the device does not sign the patient; the attribution
//! is the bridge's (see `docs/fhir.md`). One JSON line per Provenance, a summary line;
//! exit 1 on any failure. Reads no store: nothing patient-linked is accessed beyond
//! the file the operator already holds.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use serde_json::{Value as Json, json};
use vitalmq_envelope::{DeviceId, Telemetry};
use vitalmq_fhir::read::{self, SignedReading};
use vitalmq_policies::DeviceRegistry;

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// A FHIR Bundle or a Provenance (JSON).
    file: PathBuf,
    /// The device registry (`vitalmq-registry/v2`) holding the devices' public keys.
    #[arg(long)]
    registry: PathBuf,
    /// Accept readings whose raw message retention purged (a Provenance without
    /// signature, policy `urn:vitalmq:raw-purged`): reported as "unsigned (raw purged)"
    /// either way, a failure without this flag.
    #[arg(long)]
    allow_unsigned: bool,
}

/// The outcome for one Provenance.
struct Checked {
    index: usize,
    device: Option<String>,
    covered: Vec<String>,
    covered_resources: Vec<usize>,
    errors: Vec<String>,
    unchecked_targets: Vec<String>,
}

pub fn run(args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read(&args.file).with_context(|| format!("{}", args.file.display()))?;
    let doc: Json = serde_json::from_slice(&text)
        .with_context(|| format!("{}: not JSON", args.file.display()))?;
    let registry = DeviceRegistry::load(&args.registry)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.registry.display()))?;
    let readings = read::signed_readings(&doc)?;
    let mut failed = 0usize;
    let mut covered: HashSet<usize> = HashSet::new();
    for r in &readings {
        let c = check(r, &registry);
        if c.errors.is_empty() {
            covered.extend(c.covered_resources.iter().copied());
        } else {
            failed += 1;
        }
        println!(
            "{}",
            json!({
                "provenance": c.index,
                "device": c.device,
                "ok": c.errors.is_empty(),
                "observations": c.covered,
                "targets_not_in_file": c.unchecked_targets,
                "errors": c.errors,
            })
        );
    }
    // Retention purged the raw message: nothing to verify, reported apart from
    // tampering, and covered only when the operator accepts unsigned readings.
    // What is checked is only the structure (the mapping's identifiers, one device,
    // no ambiguous claim): `--allow-unsigned` vouches for nothing signed.
    let mut purged: Vec<String> = Vec::new();
    for p in read::purged_readings(&doc) {
        let keys: Vec<&str> = p.observations.iter().map(|o| o.key.as_str()).collect();
        let errors = purged_errors(&p);
        if !errors.is_empty() {
            failed += 1;
        }
        println!(
            "{}",
            json!({
                "provenance": p.index,
                "ok": args.allow_unsigned && errors.is_empty(),
                "unsigned": "raw purged",
                "observations": keys,
                "targets_not_in_file": p.missing_targets,
                "errors": errors,
            })
        );
        if !errors.is_empty() {
            continue;
        }
        for o in &p.observations {
            if covered.contains(&o.index) {
                continue;
            }
            purged.push(o.key.clone());
            if args.allow_unsigned {
                covered.insert(o.index);
            }
        }
    }
    let observations: Vec<(usize, Option<&str>)> = read::resources(&doc)
        .into_iter()
        .enumerate()
        .filter(|(_, r)| r["resourceType"] == "Observation")
        .map(|(i, r)| (i, read::observation_key(r)))
        .collect();
    let name = |i: usize, key: Option<&str>| match key {
        Some(k) => k.to_owned(),
        None => format!("resource #{i} (no urn:vitalmq:observation identifier)"),
    };
    let purged_set: HashSet<&str> = purged.iter().map(String::as_str).collect();
    let unsigned: Vec<String> = observations
        .iter()
        .filter(|(i, k)| !covered.contains(i) && !k.is_some_and(|k| purged_set.contains(k)))
        .map(|(i, k)| name(*i, *k))
        .collect();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (_, k) in &observations {
        if let Some(k) = k {
            *seen.entry(k).or_default() += 1;
        }
    }
    let duplicated: Vec<&str> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, _)| *k)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let ok = failed == 0
        && unsigned.is_empty()
        && duplicated.is_empty()
        && (args.allow_unsigned || purged.is_empty())
        && (!readings.is_empty() || (args.allow_unsigned && !purged.is_empty()));
    println!(
        "{}",
        json!({
            "ok": ok,
            "signed_provenances": readings.len(),
            "failed": failed,
            "observations_without_a_verified_signature": unsigned,
            "observation_identifiers_duplicated": duplicated,
            "unsigned_raw_purged": purged,
        })
    );
    tracing::info!(
        provenances = readings.len(),
        failed,
        unsigned = unsigned.len(),
        "fhir verify"
    );
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The structural checks of a purged reading's Provenance (nothing signed to verify):
/// the raw message's SHA-256 named, every target of the `author` device, identified as
/// the mapping identifies it from its event id, and without the ambiguities
/// [`read::problems`] finds.
fn purged_errors(p: &read::PurgedReading) -> Vec<String> {
    let mut errors = p.problems.clone();
    let sha_ok = p
        .entity_sha256
        .as_deref()
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    if !sha_ok {
        errors.push(format!(
            "no raw-message SHA-256 entity ({:?})",
            p.entity_sha256
        ));
    }
    if p.author.is_none() {
        errors.push("no author device agent".into());
    }
    for o in &p.observations {
        if o.device.is_none() || o.device != p.author {
            errors.push(format!(
                "Observation {}: device {:?} is not the author {:?}",
                o.key, o.device, p.author
            ));
        }
        let expected = o.event.as_deref().and_then(|e| o.expected_key(e));
        if expected.as_deref() != Some(o.key.as_str()) {
            errors.push(format!(
                "Observation {:?}: its event {:?} identifies it as {expected:?}",
                o.key, o.event
            ));
        }
        errors.extend(
            o.problems
                .iter()
                .map(|x| format!("Observation {}: {x}", o.key)),
        );
    }
    errors
}

fn check(r: &SignedReading, registry: &DeviceRegistry) -> Checked {
    let mut c = Checked {
        index: r.index,
        device: r.device.clone(),
        covered: Vec::new(),
        covered_resources: Vec::new(),
        errors: Vec::new(),
        unchecked_targets: r.missing_targets.clone(),
    };
    c.errors.extend(r.problems.iter().cloned());
    let Some(device) = r.device.as_deref() else {
        c.errors
            .push("signature.who names no urn:vitalmq:device".into());
        return c;
    };
    if r.author.as_deref() != Some(device) {
        c.errors.push(format!(
            "the author agent {:?} is not the signing device {device}",
            r.author
        ));
    }
    let id = match DeviceId::new(device) {
        Ok(id) => id,
        Err(e) => {
            c.errors.push(format!("device id: {e}"));
            return c;
        }
    };
    let verified = match vitalmq_envelope::verify(&r.cose, registry, Some(&id)) {
        Ok(v) => v,
        Err(refusal) => {
            c.errors.push(format!("signature refused: {refusal}"));
            return c;
        }
    };
    let sha = hex::encode(verified.message_sha256());
    if r.entity_sha256.as_deref() != Some(sha.as_str()) {
        c.errors.push(format!(
            "the raw-message entity's SHA-256 {:?} is not the signed bytes' {sha}",
            r.entity_sha256
        ));
    }
    let t: &Telemetry = &verified;
    let signed: BTreeMap<&str, Option<f64>> =
        t.m.iter()
            .flatten()
            .map(|(k, v)| {
                let x = v.as_f64();
                (k.as_str(), x.is_finite().then_some(x))
            })
            .collect();
    let ts = vitalmq_fhir::ids::instant(t.ts).ok();
    // The event id is a function of what the device signed: recomputed, not trusted.
    let event_id = vitalmq_bridge::normalize::event_id(&t.dev, t.epoch, t.seq);
    let owned: BTreeMap<String, Option<f64>> =
        signed.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect();
    // What the mapping makes of the signed message, compared as a whole: no coding
    // added or recoded, no component, unit or value[x] beyond the mapping's.
    let expected = match vitalmq_fhir::read::expected_projections(&event_id, device, t.ts, &owned) {
        Ok(e) => e,
        Err(e) => {
            c.errors
                .push(format!("the signed message does not map: {e}"));
            HashMap::new()
        }
    };
    let mut claimed: BTreeMap<String, Option<f64>> = BTreeMap::new();
    for o in &r.observations {
        if let Some(want) = expected.get(&o.key)
            && *want != o.projection
        {
            c.errors.push(format!(
                "Observation {}: not what the mapping makes of the signed message (codes, units, components, status or category differ): {} instead of {want}",
                o.key, o.projection
            ));
        }
        if o.device.as_deref() != Some(device) {
            c.errors.push(format!(
                "Observation {}: another device {:?}",
                o.key, o.device
            ));
        }
        if ts.is_some() && o.effective != ts {
            c.errors.push(format!(
                "Observation {}: effectiveDateTime {:?} is not the signed time {ts:?}",
                o.key, o.effective
            ));
        }
        // A device clock beyond RFC 3339: the mapping dates it by the bridge's time
        // and keeps the signed one in the device-time extension.
        // A datable clock has no such extension: a reader might take it for the time.
        if ts.is_some() && o.device_time.is_some() {
            c.errors.push(format!(
                "Observation {}: a device-time extension {:?} though the signed time {ts:?} is datable",
                o.key, o.device_time
            ));
        }
        if ts.is_none() && o.device_time != Some(t.ts.to_string()) {
            c.errors.push(format!(
                "Observation {}: device time {:?} is not the signed {}",
                o.key, o.device_time, t.ts
            ));
        }
        if o.event.as_deref() != Some(event_id.as_str()) {
            c.errors.push(format!(
                "Observation {}: event {:?} is not the signed message's {event_id}",
                o.key, o.event
            ));
        }
        let expected = o.expected_key(&event_id);
        if expected.as_deref() != Some(o.key.as_str()) {
            c.errors.push(format!(
                "Observation {:?}: the mapping of the signed message identifies it as {expected:?}",
                o.key
            ));
        }
        for p in &o.problems {
            c.errors.push(format!("Observation {}: {p}", o.key));
        }
        for (metric, value) in &o.values {
            if claimed.insert(metric.clone(), *value).is_some() {
                c.errors
                    .push(format!("Observation {}: {metric} claimed twice", o.key));
            }
        }
        c.covered.push(o.key.clone());
        c.covered_resources.push(o.index);
    }
    if !r.observations.is_empty() {
        for (metric, value) in &claimed {
            match signed.get(metric.as_str()) {
                Some(s) if s == value => {}
                // A panel half the device did not send is an absent component.
                None if value.is_none() => {}
                Some(s) => c.errors.push(format!(
                    "{metric}: the Observation says {value:?}, the device signed {s:?}"
                )),
                None => c.errors.push(format!(
                    "{metric}: the Observation says {value:?}, the device signed no {metric}"
                )),
            }
        }
        for metric in signed.keys() {
            if !claimed.contains_key(*metric) {
                c.errors
                    .push(format!("{metric}: signed but in no target Observation"));
            }
        }
    }
    c
}
