//! `vitalmq fhir verify FILE --registry REGISTRY`: for every Provenance carrying a
//! COSE_Sign1 (`sigFormat` application/cose), offline:
//!
//! 1. the signature verifies with the registry's key of the device `signature.who`
//!    names, which must be the kid, the payload's `dev` and the `author` agent;
//! 2. the SHA-256 of the bytes equals the raw-message entity's;
//! 3. every target Observation found in the file names that device, has
//!    `effectiveDateTime` = the signed `ts`, and claims exactly the signed values (no
//!    value changed, added or dropped).
//!
//! Then every Observation of the file that no verified Provenance covers is a failure
//! too (an unsigned reading slipped in). One JSON line per Provenance, a summary line;
//! exit 1 on any failure. Reads no store: nothing patient-linked is accessed beyond
//! the file the operator already holds.

use std::collections::{BTreeMap, HashSet};
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
}

/// The outcome for one Provenance.
struct Checked {
    index: usize,
    device: Option<String>,
    covered: Vec<String>,
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
    let mut covered: HashSet<String> = HashSet::new();
    for r in &readings {
        let c = check(r, &registry);
        if c.errors.is_empty() {
            covered.extend(c.covered.iter().cloned());
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
    let unsigned: Vec<&str> = read::resources(&doc)
        .into_iter()
        .filter(|r| r["resourceType"] == "Observation")
        .filter_map(read::observation_key)
        .filter(|k| !covered.contains(*k))
        .collect();
    let ok = failed == 0 && unsigned.is_empty() && !readings.is_empty();
    println!(
        "{}",
        json!({
            "ok": ok,
            "signed_provenances": readings.len(),
            "failed": failed,
            "observations_without_a_verified_signature": unsigned,
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

fn check(r: &SignedReading, registry: &DeviceRegistry) -> Checked {
    let mut c = Checked {
        index: r.index,
        device: r.device.clone(),
        covered: Vec::new(),
        errors: Vec::new(),
        unchecked_targets: r.missing_targets.clone(),
    };
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
    let mut claimed: BTreeMap<String, Option<f64>> = BTreeMap::new();
    for o in &r.observations {
        if o.device.as_deref() != Some(device) {
            c.errors.push(format!(
                "Observation {}: another device {:?}",
                o.key, o.device
            ));
        }
        if o.effective != ts {
            c.errors.push(format!(
                "Observation {}: effectiveDateTime {:?} is not the signed time {ts:?}",
                o.key, o.effective
            ));
        }
        for (metric, value) in &o.values {
            if claimed.insert(metric.clone(), *value).is_some() {
                c.errors
                    .push(format!("Observation {}: {metric} claimed twice", o.key));
            }
        }
        c.covered.push(o.key.clone());
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
