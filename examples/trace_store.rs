//! Builds a realistic bridge store for `scripts/bench-trace`: N devices over H hours of
//! device time, through the bridge's own code path, plus a broker audit log for the day.
//!
//! Each device (keys from `vitalmq certs init`) signs one vitals reading every
//! `--interval` seconds with the simulator's patient model (`device_sim::vitals`) and its
//! scripted episodes; the messages go, in batches, through what the bridge's recorder
//! runs: `classify::verify` (full COSE verify against the registry), `Sequencer::sequence`
//! (windows, gaps, normalization, the alert engine with the shipped rules),
//! `Store::commit`, `Sequencer::adopt`. Only the MQTT hop is left out; device time is
//! the clock, so the day takes minutes.
//!
//! The broker audit log has the broker's record shapes (`broker/src/gate/`):
//! every device connects at the start and reconnects every `--reconnect` seconds
//! (jittered; wearables on mobile links), each alert change is delivered to two
//! subscribers (the site's integrator and the operator). Its `at` times are device
//! time, so it is hash-chained here rather than by the live writer (which stamps the
//! wall clock); it has no checkpoints. `vitalmq audit verify --allow-unsigned-tail`
//! accepts its chain.
//!
//! Prints one JSON summary line: counts, and an alert id and event ids to trace.
//!
//!   cargo run --release --example trace_store -- --pki PKI --data DIR \
//!       --broker-audit FILE [--devices 100] [--hours 24] [--interval 5] [--reconnect 1800]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Write as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use vitalmq_bridge::classify::{self, Incoming, Origin, Sequencer};
use vitalmq_bridge::store::Store;
use vitalmq_bridge::window::WindowSize;
use vitalmq_device_sim::vitals::{Episode, EpisodeKind, VitalsModel};
use vitalmq_envelope::{DeviceId, MessageType, Number, Telemetry, sign};
use vitalmq_policies::{DeviceRegistry, RuleSet};

#[derive(Debug)]
struct Args {
    pki: PathBuf,
    data: PathBuf,
    broker_audit: PathBuf,
    rules: PathBuf,
    devices: usize,
    hours: u64,
    interval_s: u64,
    reconnect_s: u64,
    /// Days of broker log: the store's day and the days before it (connections only).
    broker_days: u64,
    /// Keep the store, (re)write only the broker log (from the store's alerts).
    broker_only: bool,
    seed: u64,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        pki: PathBuf::new(),
        data: PathBuf::new(),
        broker_audit: PathBuf::new(),
        rules: PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/policies/examples/rules.toml"
        )),
        devices: 100,
        hours: 24,
        interval_s: 5,
        reconnect_s: 1800,
        broker_days: 1,
        broker_only: false,
        seed: 7,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--pki" => a.pki = value()?.into(),
            "--data" => a.data = value()?.into(),
            "--broker-audit" => a.broker_audit = value()?.into(),
            "--rules" => a.rules = value()?.into(),
            "--devices" => a.devices = value()?.parse().context("--devices")?,
            "--hours" => a.hours = value()?.parse().context("--hours")?,
            "--interval" => a.interval_s = value()?.parse().context("--interval")?,
            "--reconnect" => a.reconnect_s = value()?.parse().context("--reconnect")?,
            "--broker-days" => a.broker_days = value()?.parse().context("--broker-days")?,
            "--broker-only" => a.broker_only = true,
            "--seed" => a.seed = value()?.parse().context("--seed")?,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    anyhow::ensure!(
        !a.pki.as_os_str().is_empty()
            && !a.data.as_os_str().is_empty()
            && !a.broker_audit.as_os_str().is_empty(),
        "--pki, --data and --broker-audit are required"
    );
    anyhow::ensure!(
        a.interval_s > 0 && a.reconnect_s > 0 && a.broker_days > 0,
        "--interval, --reconnect and --broker-days must be positive"
    );
    Ok(a)
}

/// splitmix64: deterministic choices from (seed, n).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A day's episodes for device `i`: on average one or two clinical episodes
/// (desaturation, tachycardia, fever), a few motion artefacts and a sensor dropout.
fn episodes(seed: u64, i: u64, span: Duration) -> Vec<Episode> {
    let span_s = span.as_secs().max(600);
    let mut out = Vec::new();
    let mut draw = {
        let mut n = 0;
        move || {
            n += 1;
            mix(seed ^ (i << 20) ^ n)
        }
    };
    let clinical = [
        EpisodeKind::Desaturation,
        EpisodeKind::Tachycardia,
        EpisodeKind::Fever,
    ];
    for _ in 0..(draw() % 3) {
        let kind = clinical[usize::try_from(draw() % 3).unwrap_or(0)];
        out.push(Episode {
            kind,
            start: Duration::from_secs(draw() % (span_s * 7 / 8)),
        });
    }
    for _ in 0..(2 + draw() % 4) {
        out.push(Episode {
            kind: EpisodeKind::Motion,
            start: Duration::from_secs(draw() % span_s),
        });
    }
    out.push(Episode {
        kind: EpisodeKind::Dropout,
        start: Duration::from_secs(draw() % span_s),
    });
    out
}

/// A broker audit log in the broker's record shapes, hash-chained like the writer's.
struct BrokerLog {
    out: BufWriter<std::fs::File>,
    seq: u64,
    prev: String,
}

impl BrokerLog {
    fn create(path: &std::path::Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        Ok(Self {
            out: BufWriter::new(std::fs::File::create(path)?),
            seq: 0,
            prev: vitalmq_audit::GENESIS.to_owned(),
        })
    }

    fn append(&mut self, mut r: vitalmq_audit::AuditRecord, at_ms: u64) -> anyhow::Result<()> {
        r.seq = self.seq;
        r.at = vitalmq_bridge::normalize::rfc3339_ms(at_ms).context("time")?;
        r.prev = std::mem::take(&mut self.prev);
        r.hash.clear();
        // The chain's rule (audit/src/chain.rs): SHA-256 of the record with `hash` "".
        r.hash = hex::encode(Sha256::digest(serde_json::to_vec(&r)?));
        writeln!(self.out, "{}", serde_json::to_string(&r)?)?;
        self.prev = r.hash;
        self.seq += 1;
        Ok(())
    }
}

struct Peer {
    identity: String,
    serial: String,
    sha256: String,
    addr: String,
}

impl Peer {
    fn record(&self, event: vitalmq_audit::Event) -> vitalmq_audit::AuditRecord {
        vitalmq_audit::AuditRecord::new(vitalmq_audit::Component::Broker, event)
            .actor(vitalmq_audit::Actor {
                identity: Some(self.identity.clone()),
                cert_serial: Some(self.serial.clone()),
                cert_sha256: Some(self.sha256.clone()),
                addr: Some(self.addr.clone()),
                client_id: None,
            })
            .policy_sha256("0".repeat(64))
    }
}

struct Dev {
    id: DeviceId,
    key: vitalmq_envelope::SigningKey,
    vitals: VitalsModel,
    seq: u64,
    peer: Peer,
}

/// Runs the day's readings through the bridge's path into `store`; returns the time
/// zero of device time and collects every alert change into `changes`.
#[allow(clippy::too_many_arguments)]
fn build_store(
    args: &Args,
    registry: &DeviceRegistry,
    rules: Arc<RuleSet>,
    td: &str,
    devices: &mut [Dev],
    store: &mut Store,
    t0_ms: u64,
    changes: &mut Vec<(u64, String, String, String)>,
) -> anyhow::Result<u64> {
    store.register_sink("objects")?;
    let window = WindowSize::new(1024).map_err(|e| anyhow::anyhow!(e))?;
    let mut sequencer = Sequencer::new(
        window,
        HashMap::new(),
        HashMap::new(),
        HashMap::new(),
        Some(rules),
    );
    let origin = Origin {
        broker: "127.0.0.1:8883".into(),
        bridge: format!("spiffe://{td}/bridge/bridge-01"),
    };
    // A batch is what the bridge might take at once: every reading of 10 ticks.
    let ticks_per_batch = 10;
    let interval_ms = args.interval_s * 1000;
    let ticks = args.hours * 3600 * 1000 / interval_ms;
    let n = devices.len() as u64;
    let started = std::time::Instant::now();
    let mut events = 0u64;
    let mut tick = 0;
    while tick < ticks {
        let mut batch = Vec::new();
        let last = (tick + ticks_per_batch).min(ticks);
        for t in tick..last {
            for (i, d) in devices.iter_mut().enumerate() {
                // Devices do not tick in lockstep: spread them over the interval.
                let at_ms = t * interval_ms + (i as u64 * interval_ms) / n;
                let Some(s) = d.vitals.sample(Duration::from_millis(at_ms)) else {
                    continue;
                };
                let telemetry = Telemetry {
                    dev: d.id.clone(),
                    epoch: 1,
                    seq: d.seq,
                    ts: t0_ms + at_ms,
                    fw: "2.4.1".into(),
                    kind: MessageType::Vitals,
                    m: Some(BTreeMap::from([
                        ("spo2".to_owned(), Number::Int(s.spo2.into())),
                        ("pulse".to_owned(), Number::Int(s.pulse.into())),
                        ("resp".to_owned(), Number::Int(s.resp.into())),
                        ("temp".to_owned(), Number::Float(s.temp)),
                    ])),
                    q: Some(s.q),
                    model: None,
                    schema: None,
                    extra: BTreeMap::new(),
                };
                d.seq += 1;
                batch.push(Incoming {
                    topic: format!("devices/{}/telemetry", d.id),
                    payload: Bytes::from(sign(&telemetry, &d.key)?),
                    // Received some tens of milliseconds after the reading.
                    received_at_ms: t0_ms + at_ms + 20 + mix(at_ms) % 80,
                    token: (),
                });
            }
        }
        let now_ms = batch.last().map_or(t0_ms, |m| m.received_at_ms);
        let checked: Vec<_> = batch
            .into_iter()
            .map(|m| classify::verify(registry, m))
            .collect();
        let mut sequenced = sequencer.sequence(registry, &origin, checked, now_ms);
        store.commit(&sequenced.commit)?;
        sequencer.adopt(&mut sequenced);
        events += sequenced.commit.events.len() as u64;
        for a in &sequenced.commit.alerts {
            changes.push((now_ms, a.alert_id.clone(), a.state.clone(), a.topic.clone()));
        }
        // The objects sink keeps up: its cursor is at the head.
        let head = store.head()?;
        store.batch_delivered("objects", head)?;
        tick = last;
        if tick % (ticks / 20).max(1) < ticks_per_batch {
            eprintln!(
                "[trace_store] {:>3}% device time, {events} events, {} alert changes, {:.0} s",
                tick * 100 / ticks,
                changes.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(t0_ms)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let registry = Arc::new(
        DeviceRegistry::load(&args.pki.join("registry.toml"))
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let rules = Arc::new(RuleSet::load(&args.rules).map_err(|e| anyhow::anyhow!("{e}"))?);
    let pki = vitalmq_device_sim::pki::Pki::open(&args.pki)?;
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(args.pki.join("ca/index.json"))?)?;
    let serial_of = |id: &str| -> String {
        index["certs"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["id"] == id)
            .and_then(|c| c["serial"].as_str())
            .unwrap_or("")
            .to_owned()
    };
    let td = registry.trust_domain().to_string();
    let span = Duration::from_secs(args.hours * 3600);
    let span_ms = u64::try_from(span.as_millis())?;
    // The day ends now: the store holds the last `hours` hours.
    let t0_ms = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis(),
    )? - span_ms;

    let mut devices = Vec::new();
    for (i, id) in pki
        .ids("device")?
        .into_iter()
        .take(args.devices)
        .enumerate()
    {
        let i = i as u64;
        let serial = serial_of(&id);
        devices.push(Dev {
            key: pki.signing_key(&id)?,
            vitals: VitalsModel::new(args.seed, &id, episodes(args.seed, i, span)),
            seq: 0,
            peer: Peer {
                identity: format!("spiffe://{td}/device/{id}"),
                sha256: hex::encode(Sha256::digest(serial.as_bytes())),
                serial,
                addr: format!("10.0.{}.{}:{}", i / 250, i % 250 + 1, 40_000 + i),
            },
            id: DeviceId::new(&id)?,
        });
    }
    anyhow::ensure!(
        devices.len() == args.devices,
        "the PKI has {} devices, {} wanted",
        devices.len(),
        args.devices
    );
    let subscribers: Vec<Peer> = ["operator/ops-01", "integrator/int-site-01"]
        .iter()
        .map(|who| Peer {
            identity: format!("spiffe://{td}/{who}"),
            serial: serial_of(who.split('/').nth(1).unwrap_or("")),
            sha256: "0".repeat(64),
            addr: "10.1.0.1:50000".into(),
        })
        .collect();

    let mut store = Store::open(&args.data)?;
    let started = std::time::Instant::now();
    // (time, alert id, state, topic) of every alert change, for the deliveries.
    let mut changes: Vec<(u64, String, String, String)> = Vec::new();
    let t0_ms = if args.broker_only {
        let first = store.read_range(1, 1)?;
        let first = first.first().context("--broker-only: the store is empty")?;
        for a in store.list_alerts()? {
            changes.push((a.created_at_ms, a.alert_id, a.state, a.topic));
        }
        first.observed_at_ms
    } else {
        build_store(
            &args,
            &registry,
            rules,
            &td,
            &mut devices,
            &mut store,
            t0_ms,
            &mut changes,
        )?
    };
    let events = store.head()?;

    // The broker log: `broker_days` days of connections ending with the store's day,
    // and on that day the deliveries of every alert change, in time order.
    let mut broker = BrokerLog::create(&args.broker_audit)?;
    let day_ms = 24 * 3600 * 1000;
    for day in (0..args.broker_days).rev() {
        let from = t0_ms.saturating_sub(day * day_ms);
        let until = if day == 0 {
            t0_ms + span_ms
        } else {
            from + day_ms.min(span_ms)
        };
        let mut day_records: Vec<(u64, vitalmq_audit::AuditRecord)> = Vec::new();
        for s in &subscribers {
            day_records.push((
                from,
                s.record(vitalmq_audit::Event::ConnectionAccepted)
                    .action("connect")
                    .decision(vitalmq_audit::Decision::Allow)
                    .rule("operator.connect")
                    .detail("mqtt", "5"),
            ));
        }
        for (i, d) in devices.iter().enumerate() {
            let i = i as u64;
            // Connected at the start of the day (spread over the first reading interval),
            // then reconnecting every `reconnect` s on average.
            let mut at = from + i * args.interval_s * 1000 / args.devices as u64;
            let mut first = true;
            while at < until {
                if !first {
                    day_records.push((
                        at - 1,
                        d.peer
                            .record(vitalmq_audit::Event::ConnectionClosed)
                            .action("connect")
                            .reason("client_disconnected"),
                    ));
                }
                first = false;
                day_records.push((
                    at,
                    d.peer
                        .record(vitalmq_audit::Event::ConnectionAccepted)
                        .action("connect")
                        .decision(vitalmq_audit::Decision::Allow)
                        .rule("device.connect")
                        .detail("mqtt", "3.1.1"),
                ));
                let jitter = mix(args.seed ^ at ^ (i << 40)) % (args.reconnect_s * 1000);
                at += args.reconnect_s * 500 + jitter;
            }
        }
        if day == 0 {
            for (at, id, state, topic) in &changes {
                for s in &subscribers {
                    day_records.push((
                        at + 15,
                        s.record(vitalmq_audit::Event::AlertDelivered)
                            .action("deliver")
                            .resource(id.clone())
                            .reason(state.clone())
                            .detail("topic", topic.clone())
                            .detail("qos", 1),
                    ));
                }
            }
        }
        day_records.sort_by_key(|(at, _)| *at);
        for (at, r) in day_records {
            broker.append(r, at)?;
        }
    }
    broker.out.flush()?;
    broker.out.get_ref().sync_all()?;
    let mut alert_ids: BTreeMap<String, u64> = BTreeMap::new();
    for (_, id, _, _) in &changes {
        *alert_ids.entry(id.clone()).or_default() += 1;
    }
    let alerts = changes.len();
    // An alert with the most changes (raise, escalations, resolve) to trace.
    let alert = alert_ids
        .iter()
        .filter(|(id, _)| id.starts_with("al-"))
        .max_by_key(|(_, n)| **n)
        .map(|(id, _)| id.clone());
    // Events to trace: the alert's first evidence, and one from the middle of the day.
    let mut event_ids = Vec::new();
    if let Some(id) = &alert
        && let Some(first) = store.alert_history(id)?.first()
        && let Some(e) = first.body["evidence"][0].as_str()
    {
        event_ids.push(e.to_owned());
    }
    let middle = store.head()? / 2;
    if let Some(r) = store.read_range(middle, middle)?.first() {
        event_ids.push(r.event_id.clone());
    }
    println!(
        "{}",
        json!({
            "devices": args.devices, "hours": args.hours, "interval_s": args.interval_s,
            "events": events, "alert_changes": alerts, "alerts": alert_ids.len(),
            "broker_audit_records": broker.seq, "alert_id": alert,
            "event_ids": event_ids, "seconds": started.elapsed().as_secs_f64(),
        })
    );
    Ok(())
}
