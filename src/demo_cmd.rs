//! `vitalmq demo`: what the foundation does, end to end on one machine, in seconds.
//!
//! Today this is the PKI and the signed wire format: it creates a dev PKI, has every
//! device sign a reading with its own COSE key, verifies each against the registry file
//! exactly as the bridge will (key from the registry, topic device pinned), and shows how
//! the verifier refuses forged, misrouted, unknown, oversized and malformed messages.
//! The broker, bridge and simulator join this command as their issues land.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, ensure};
use vitalmq_certs::{FleetPlan, Layout, Pki};
use vitalmq_envelope::{
    DeviceId, MessageType, Number, ReasonClass, SigningKey, Telemetry, sign, verify,
};
use vitalmq_policies::{DeviceRegistry, PrincipalId, TrustDomain};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Work directory for the PKI; defaults to a new `vitalmq-demo/run-<time>`.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Number of simulated devices.
    #[arg(long, default_value_t = 24)]
    devices: u32,
    /// Number of sites the devices are spread over.
    #[arg(long, default_value_t = 2)]
    sites: u32,
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let now_ms = u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis())?;
    let dir = args
        .dir
        .unwrap_or_else(|| PathBuf::from(format!("vitalmq-demo/run-{}", now_ms / 1000)));

    println!("vitalmq demo: PKI and signed telemetry\n");
    let mut plan = FleetPlan::new(TrustDomain::new("demo.vitalmq")?, args.devices, args.sites);
    plan.es256_every = Some(3);
    let summary = Pki::init(&dir, &plan, time::OffsetDateTime::now_utc())
        .with_context(|| format!("creating the demo PKI in {}", dir.display()))?;
    let layout = Layout::new(&dir);
    println!(
        "  PKI      {} devices ({} ES256, the rest Ed25519) on {} sites, {} identity certificates",
        summary.devices, summary.es256_devices, summary.sites, summary.identities
    );

    // The bridge's view: the registry file, nothing else.
    let registry = DeviceRegistry::load(&layout.registry())?;
    let mut accepted = 0usize;
    let mut devices = Vec::new();
    for entry in registry.devices() {
        let pem_path = layout.cose_key(&PrincipalId::from(entry.id.clone()));
        let pem = std::fs::read_to_string(&pem_path)
            .with_context(|| format!("reading {}", pem_path.display()))?;
        let key = SigningKey::from_pkcs8_pem(&pem)?;
        let message = sign(&reading(&entry.id, 1, now_ms), &key)?;
        let verified = verify(&message, &registry, Some(&entry.id))
            .map_err(|r| anyhow::anyhow!("{}: {r}", entry.id))?;
        ensure!(verified.seq == 1, "round trip changed the reading");
        accepted += 1;
        devices.push((entry.id.clone(), key, message));
    }
    println!("  signed   {accepted} readings, one per device, each with the device's own key");
    println!(
        "  verified {accepted}/{} against {} (as the bridge will)",
        devices.len(),
        layout.registry().display()
    );

    let faults = injected_faults(&devices, &registry, now_ms)?;
    println!("\n  refused, as SPEC section 3 requires:");
    for (what, reason) in &faults {
        println!("    {:<14} {what}", reason.as_str());
    }

    println!("\n  look around:");
    println!("    PKI and registry   {}", dir.display());
    println!(
        "    check a cert       openssl verify -CAfile {} {}",
        layout.ca_cert().display(),
        layout
            .identity_cert(
                vitalmq_policies::Role::Device,
                &PrincipalId::from(devices[0].0.clone())
            )
            .display()
    );
    println!(
        "    sign and verify    vitalmq envelope sign --key {} --dev {} --seq 2 --m spo2=97 -o /tmp/m.cose",
        layout
            .cose_key(&PrincipalId::from(devices[0].0.clone()))
            .display(),
        devices[0].0
    );
    println!(
        "                       vitalmq envelope verify --registry {} /tmp/m.cose",
        layout.registry().display()
    );
    println!(
        "\ndemo ok: {accepted} accepted, {} refused with the expected reason",
        faults.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn reading(dev: &DeviceId, seq: u64, ts: u64) -> Telemetry {
    Telemetry {
        dev: dev.clone(),
        epoch: 1,
        seq,
        ts,
        fw: "5.12.1".into(),
        kind: MessageType::Vitals,
        m: Some(BTreeMap::from([
            ("spo2".into(), Number::Int(97)),
            ("pulse".into(), Number::Int(72)),
        ])),
        q: Some(0.95),
        model: None,
        schema: None,
        extra: BTreeMap::new(),
    }
}

/// Each fault once, checked for the reason class the SPEC gives it.
fn injected_faults(
    devices: &[(DeviceId, SigningKey, Vec<u8>)],
    registry: &DeviceRegistry,
    now_ms: u64,
) -> anyhow::Result<Vec<(&'static str, ReasonClass)>> {
    let (first, _, message) = &devices[0];
    let (second, second_key, _) = &devices[1];
    let mut tampered = message.clone();
    let at = tampered.len() - 70; // inside the payload, before the 64-byte signature
    tampered[at] ^= 0x01;
    let rogue_id = DeviceId::new("dev-rogue")?;
    let rogue = sign(
        &reading(&rogue_id, 1, now_ms),
        &SigningKey::generate(vitalmq_envelope::Algorithm::EdDsa)?,
    )?;
    // Signed by the second device (its kid, its key) but the payload names the first.
    let impostor = reading(first, 9, now_ms);
    let impostor = vitalmq_envelope::sign_payload(&impostor.to_cbor(), second, second_key)?;
    let cases: Vec<(&'static str, Vec<u8>, &DeviceId, ReasonClass)> = vec![
        (
            "one bit flipped in transit",
            tampered,
            first,
            ReasonClass::BadSignature,
        ),
        (
            "a valid message on another device's topic",
            message.clone(),
            second,
            ReasonClass::KidMismatch,
        ),
        (
            "a device not in the registry",
            rogue,
            &rogue_id,
            ReasonClass::UnknownKey,
        ),
        (
            "a device claiming another's reading",
            impostor,
            second,
            ReasonClass::KidMismatch,
        ),
        (
            "70 KB payload",
            vec![0u8; 70_000],
            first,
            ReasonClass::Oversized,
        ),
        (
            "JSON instead of COSE",
            br#"{"spo2":97}"#.to_vec(),
            first,
            ReasonClass::Malformed,
        ),
    ];
    let mut seen = Vec::new();
    for (what, bytes, topic_device, expected) in cases {
        let refusal = match verify(&bytes, registry, Some(topic_device)) {
            Ok(_) => anyhow::bail!("{what}: accepted, expected {expected}"),
            Err(r) => r,
        };
        ensure!(
            refusal.reason == expected,
            "{what}: {refusal}, expected {expected}"
        );
        seen.push((what, refusal.reason));
    }
    Ok(seen)
}
