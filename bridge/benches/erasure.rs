//! Erasure time against store size (issue 20): how long erasing one patient takes the
//! way `vitalmq erase` does it (`src/erase_cmd.rs`), in a sealed store of D devices x E
//! events, one patient per device.
//!
//! Not criterion: an erasure cannot be repeated on the same patient, and the store has
//! to be built first (minutes at full size), so this is a measured run (`harness =
//! false`) that builds the store once and erases `ERASURE_SAMPLES` patients spread over
//! it, timing every step. Not part of CI (`cargo test` does not run benches).
//!
//! ```text
//! ERASURE_DEVICES=100  ERASURE_EVENTS=720 cargo bench -p vitalmq-bridge --bench erasure
//! ERASURE_DEVICES=1000 ERASURE_EVENTS=720 cargo bench -p vitalmq-bridge --bench erasure
//! ```
//!
//! Environment: `ERASURE_DEVICES` (100), `ERASURE_EVENTS` per device (720: one hour at one
//! reading per 5 s), `ERASURE_SAMPLES` patients erased (20), `ERASURE_BATCH` events per
//! store transaction (5000), `ERASURE_DIR` where the scratch store goes (the system temp
//! directory; deleted at the end; about 1.3 KB per event).
//!
//! Build: every event is a real signed and verified COSE message of its device
//! ([`RecordedEvent::new`] takes nothing else), interleaved over the devices as the
//! bridge records them (so each patient's rows are spread over the whole store), and
//! committed through [`Store::commit`] with a keyring: raw and normalized payloads
//! sealed under the patient's data key, as with `[encryption]` on. The build rate is
//! that of the commits (sealing and SQLite, durability on); signing and verifying the
//! messages is timed apart.
//!
//! Erasure, per patient, the steps of `erase_cmd::erase_in`: the tombstone check and the
//! store lookups of the legal-hold check (`Store::patient_span`), `Keyring::erase` (the
//! point of no return), `Store::scrub_patient` (plaintext cleanup: here nothing to
//! scrub, but the same queries and the WAL checkpoint) and the unreadable-row count
//! (`Store::patient_rows`). Afterwards one erased and one untouched event are read back:
//! the first must be erased, the second must still open.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vitalmq_bridge::normalize::Receipt;
use vitalmq_bridge::plausible::Assessment;
use vitalmq_bridge::store::{Commit, RecordedEvent, Store};
use vitalmq_bridge::window::Accepted;
use vitalmq_envelope::{Algorithm, AnyKid, DeviceId, MessageType, Number, SigningKey, Telemetry};
use vitalmq_keyring::{Keyring, LocalKeyFile, Subject};
use vitalmq_policies::{DeviceEntry, SiteId};

/// 2026-03-01T00:00:00Z: the first reading.
const START_MS: u64 = 1_772_323_200_000;
/// One reading per 5 s.
const PERIOD_MS: u64 = 5_000;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|v| v.replace('_', "").parse().expect("a number"))
        .unwrap_or(default)
}

struct Device {
    key: SigningKey,
    entry: DeviceEntry,
    topic: String,
}

fn devices(n: usize) -> Vec<Device> {
    (0..n)
        .map(|i| {
            let key = SigningKey::generate(Algorithm::EdDsa).expect("key");
            let id = format!("dev-{i:05}");
            Device {
                entry: DeviceEntry {
                    id: DeviceId::new(&id).expect("device id"),
                    site: SiteId::new(if i % 2 == 0 { "north" } else { "south" }).expect("site"),
                    patient_ref: patient(i),
                    key: key.verifying_key(),
                    consent: Some("care".into()),
                    processing_policy: None,
                    lot: None,
                    hardware_model: None,
                    region: None,
                },
                key,
                topic: format!("devices/{id}/telemetry"),
            }
        })
        .collect()
}

fn patient(i: usize) -> String {
    format!("pt-{i:08x}")
}

/// Device `d`'s reading number `seq` (from 1): signed, verified, normalized.
fn event(d: &Device, seq: u64) -> RecordedEvent {
    let ts = START_MS + (seq - 1) * PERIOD_MS;
    let v = |x: i128| Number::Int(x + i128::from(seq % 7));
    let telemetry = Telemetry {
        dev: d.entry.id.clone(),
        epoch: 1,
        seq,
        ts,
        fw: "2.4.1".into(),
        kind: MessageType::Vitals,
        m: Some(
            [
                ("hr", v(68)),
                ("spo2", v(92)),
                ("rr", v(14)),
                ("sbp", v(118)),
            ]
            .into_iter()
            .map(|(k, n)| (k.to_owned(), n))
            .collect(),
        ),
        q: None,
        model: Some("vm-300".into()),
        schema: None,
        extra: Default::default(),
    };
    let bytes = vitalmq_envelope::sign(&telemetry, &d.key).expect("sign");
    let verified =
        vitalmq_envelope::verify(&bytes, &AnyKid(d.entry.key.clone()), Some(&d.entry.id))
            .expect("verify");
    let received_at_ms = ts + 180;
    let receipt = Receipt {
        received_at_ms,
        topic: &d.topic,
        broker: "127.0.0.1:8883",
        publisher: "spiffe://bench.vitalmq/device",
        bridge: "spiffe://bench.vitalmq/bridge/bridge-01",
    };
    let assessment = Assessment::of(
        &verified,
        received_at_ms,
        &Default::default(),
        &Default::default(),
    );
    let accepted = if seq == 1 {
        Accepted::FirstSeen
    } else {
        Accepted::InOrder
    };
    RecordedEvent::new(&verified, accepted, &d.entry, &receipt, &assessment)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Median, 90th percentile and maximum of `v` (ms).
fn spread(v: &mut [f64]) -> String {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    format!(
        "median {:8.2}  p90 {:8.2}  max {:8.2}",
        at(0.5),
        at(0.9),
        at(1.0)
    )
}

fn main() {
    let n_devices = env("ERASURE_DEVICES", 100);
    let per_device = env("ERASURE_EVENTS", 720);
    let samples = env("ERASURE_SAMPLES", 20).clamp(1, n_devices);
    let batch = env("ERASURE_BATCH", 5000).max(1);
    let scratch = match std::env::var_os("ERASURE_DIR") {
        Some(dir) => tempfile::tempdir_in(dir),
        None => tempfile::tempdir(),
    }
    .expect("scratch directory");
    let data = scratch.path().join("data");
    let total = n_devices * per_device;
    eprintln!(
        "erasure bench: {n_devices} devices x {per_device} events = {total} events, \
         {samples} erasures, {batch} events per transaction, in {}",
        scratch.path().display()
    );

    let provider = Arc::new(LocalKeyFile::create(&scratch.path().join("kek.json")).expect("kek"));
    let mut store = Store::open(&data).expect("store");
    let keyring = Arc::new(
        Keyring::open(&data.join(vitalmq_keyring::KEYRING_FILE), provider).expect("keyring"),
    );
    store = store.with_keyring(Arc::clone(&keyring));

    // --- build -----------------------------------------------------------------------
    let devices = devices(n_devices);
    let (mut prepare, mut commit) = (Duration::ZERO, Duration::ZERO);
    let mut pending = Vec::with_capacity(batch);
    let mut written = 0usize;
    let mut last_report = Instant::now();
    for seq in 1..=per_device as u64 {
        for d in &devices {
            let t = Instant::now();
            pending.push(event(d, seq));
            prepare += t.elapsed();
            if pending.len() == batch {
                written += pending.len();
                let t = Instant::now();
                store
                    .commit(&Commit {
                        events: std::mem::take(&mut pending),
                        now_ms: START_MS + seq * PERIOD_MS,
                        ..Commit::default()
                    })
                    .expect("commit");
                commit += t.elapsed();
                if last_report.elapsed() > Duration::from_secs(30) {
                    eprintln!(
                        "  {written}/{total} events, {:.0} events/s committed",
                        written as f64 / secs(commit)
                    );
                    last_report = Instant::now();
                }
            }
        }
    }
    if !pending.is_empty() {
        written += pending.len();
        let t = Instant::now();
        store
            .commit(&Commit {
                events: std::mem::take(&mut pending),
                now_ms: START_MS + per_device as u64 * PERIOD_MS,
                ..Commit::default()
            })
            .expect("commit");
        commit += t.elapsed();
    }
    assert_eq!(written, total);
    let db_bytes: u64 = std::fs::read_dir(&data)
        .expect("data dir")
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    eprintln!(
        "built: {total} events in {:.1} s of commits ({:.0} events/s, sealing included; \
         signing and verifying apart: {:.1} s), {:.1} MiB on disk ({:.0} bytes/event)",
        secs(commit),
        total as f64 / secs(commit),
        secs(prepare),
        db_bytes as f64 / 1048576.0,
        db_bytes as f64 / total as f64,
    );

    // --- erasures ---------------------------------------------------------------------
    let (mut lookup, mut shred, mut scrub, mut count, mut whole) =
        (vec![], vec![], vec![], vec![], vec![]);
    let stride = n_devices / samples;
    for k in 0..samples {
        let p = patient(k * stride);
        let subject = Subject::new(&p).expect("subject");
        let t0 = Instant::now();
        assert!(keyring.erased(&subject).expect("tombstone").is_none());
        let (stored_devices, span) = store.patient_span(&p).expect("span");
        assert_eq!(stored_devices.len(), 1);
        assert!(span.is_some());
        let t1 = Instant::now();
        let tomb = keyring
            .erase(&subject, "bench", "erasure bench", START_MS)
            .expect("erase");
        assert_eq!(tomb.keys_destroyed, 1);
        let t2 = Instant::now();
        let scrubbed = store.scrub_patient(&p).expect("scrub");
        assert_eq!(scrubbed, 0, "everything was sealed");
        let t3 = Instant::now();
        let (events, raw, _alerts) = store.patient_rows(&p).expect("rows");
        let t4 = Instant::now();
        assert_eq!((events, raw), (per_device as u64, per_device as u64));
        lookup.push(ms(t1 - t0));
        shred.push(ms(t2 - t1));
        scrub.push(ms(t3 - t2));
        count.push(ms(t4 - t3));
        whole.push(ms(t4 - t0));
    }

    // The erased patient's data no longer opens; another patient's still does.
    let erased_event = vitalmq_bridge::normalize::event_id(&devices[0].entry.id, 1, 1);
    let detail = store
        .event_detail(&erased_event)
        .expect("read")
        .expect("stored");
    assert!(detail.marks.erased && detail.normalized.is_null());
    if let Some(other) = devices.get(1).filter(|_| stride > 1) {
        let kept = vitalmq_bridge::normalize::event_id(&other.entry.id, 1, 1);
        let detail = store.event_detail(&kept).expect("read").expect("stored");
        assert!(!detail.marks.erased && detail.normalized.is_object());
    }

    println!("\nerasure of one patient ({per_device} events of {total}; {samples} patients), ms:");
    println!("  tombstone + hold lookups   {}", spread(&mut lookup));
    println!("  Keyring::erase             {}", spread(&mut shred));
    println!("  Store::scrub_patient       {}", spread(&mut scrub));
    println!("  unreadable-row count       {}", spread(&mut count));
    println!("  whole erasure              {}", spread(&mut whole));
    println!(
        "build: {total} events, {:.0} events/s committed (sealed), {:.0} bytes/event on disk",
        total as f64 / secs(commit),
        db_bytes as f64 / total as f64
    );
}
