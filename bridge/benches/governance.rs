//! The per-record consent work of a research sink: what `SinkGovernance::judge` in
//! `bridge/src/drain.rs` does for each record of a batch.
//!
//! Run (not part of CI; `cargo test` does not run benches):
//!
//! ```text
//! cargo bench -p vitalmq-bridge --bench governance -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! For one realistic normalized event (about 600 bytes of JSON, the shape `normalize`
//! writes) of a device in a registry of 200 devices with research grants:
//!
//! - `judge`: reading the recorded `patient_ref` and judging consent
//!   ([`judge_recorded`]) under the registry;
//! - `minimise`: cutting the event to a 5-field allow-list ([`minimise`]);
//! - `pseudonym`: replacing `patient_ref` by the research pseudonym
//!   ([`substitute_patient_ref`] with [`PurposePseudonym`]);
//! - `batch_1000`: the whole path ([`govern`]) over a batch of 1000 records of the 200
//!   devices (criterion reports it per element too).

use std::collections::BTreeSet;
use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use vitalmq_bridge::governance::{
    Fields, PurposePseudonym, govern, judge_recorded, minimise, substitute_patient_ref,
};
use vitalmq_bridge::sink::OutboxRecord;
use vitalmq_envelope::{Algorithm, SigningKey};
use vitalmq_policies::{DeviceRegistry, Purpose};

const DEVICES: usize = 200;
/// 2026-03-01T00:00:00Z: inside every assignment and research grant.
const OBSERVED_AT: u64 = 1_772_323_200_000;

fn registry() -> DeviceRegistry {
    let key = SigningKey::generate(Algorithm::EdDsa)
        .expect("key")
        .verifying_key()
        .to_hex();
    let mut text =
        String::from("format = \"vitalmq-registry/v2\"\ntrust_domain = \"bench.vitalmq\"\n");
    for n in 0..DEVICES {
        text.push_str(&format!(
            "[[devices]]\nid = \"dev-{n:05}\"\nalg = \"EdDSA\"\npublic_key = \"{key}\"\n\
             [[devices.assignments]]\nvalid_from = \"2025-01-01T00:00:00Z\"\n\
             patient_ref = \"pt-{n:08x}\"\nsite = \"north\"\n\
             consent = [{{ purpose = \"surveillance\", valid_from = \"2025-01-01T00:00:00Z\" }}, \
             {{ purpose = \"research\", valid_from = \"2025-06-01T00:00:00Z\" }}]\n"
        ));
    }
    DeviceRegistry::parse(&text, Path::new("registry.toml")).expect("registry")
}

/// A normalized vitals event of device `n`, as `normalize` writes it.
fn event(n: usize, seq: u64) -> String {
    format!(
        r#"{{"format":"vitalmq-event/v1","event_id":"ev-dev-{n:05}-3-{seq}","device":"dev-{n:05}","site":"north","patient_ref":"pt-{n:08x}","epoch":3,"seq":{seq},"type":"vitals","ts":{OBSERVED_AT},"observed_at":"2026-03-01T00:00:00.000Z","received_at":"2026-03-01T00:00:00.184Z","m":{{"hr":72,"spo2":97.5,"rr":16,"temp":36.8,"sbp":121,"dbp":79}},"q":0.97,"fw":"2.4.1","model":"vm-300","schema":1,"extra":{{"lead":"II","posture":"supine"}},"provenance":{{"broker":"broker-01:8883","publisher":"spiffe://bench.vitalmq/device/dev-{n:05}","bridge":"spiffe://bench.vitalmq/bridge/bridge-01","alg":"EdDSA","consent":"research-2025","processing_policy":"pp-7"}}}}"#
    )
}

fn record(n: usize, seq: u64) -> OutboxRecord {
    OutboxRecord {
        position: seq as i64,
        event_id: format!("ev-dev-{n:05}-3-{seq}"),
        device: format!("dev-{n:05}"),
        site: "north".into(),
        epoch: 3,
        seq,
        observed_at_ms: OBSERVED_AT,
        received_at_ms: OBSERVED_AT + 184,
        topic: format!("telemetry/north/dev-{n:05}"),
        raw: bytes::Bytes::from_static(&[0u8; 180]),
        normalized_json: event(n, seq),
        ingest_patient: None,
    }
}

fn governance(c: &mut Criterion) {
    let registry = registry();
    let fields = Fields::Only(BTreeSet::from(
        ["device", "ts", "m", "q", "patient_ref"].map(str::to_owned),
    ));
    let pseudonym = PurposePseudonym::new([7; 32], Purpose::Research);
    let of = |care: &str| pseudonym.of(care);
    let one = record(123, 42);
    eprintln!("normalized event: {} bytes", one.normalized_json.len());
    // The same flow the drain gives `govern`.
    let flow = |r: &OutboxRecord| {
        let recorded = r.recorded();
        judge_recorded(
            &registry,
            &r.device,
            recorded.as_ref().map(|(p, s)| (p.as_ref(), *s)),
            Purpose::Research,
            r.observed_at_ms,
        )
    };

    let mut g = c.benchmark_group("governance");
    g.bench_function("judge", |b| b.iter(|| flow(black_box(&one))));
    g.bench_function("minimise", |b| {
        b.iter(|| minimise(black_box(&one.normalized_json), &fields).expect("minimised"))
    });
    let minimised = minimise(&one.normalized_json, &fields).expect("minimised");
    g.bench_function("pseudonym", |b| {
        b.iter(|| substitute_patient_ref(black_box(&minimised), of).expect("substituted"))
    });
    let batch: Vec<OutboxRecord> = (0..1000).map(|i| record(i % DEVICES, i as u64)).collect();
    g.throughput(Throughput::Elements(batch.len() as u64));
    g.bench_function("batch_1000", |b| {
        b.iter(|| {
            let (kept, withheld) =
                govern(black_box(&batch), flow, &fields, Some(&of)).expect("governed");
            assert!(withheld.is_empty());
            kept
        })
    });
    g.finish();
}

criterion_group!(benches, governance);
criterion_main!(benches);
