//! Signed load for the bridge benchmark (`vitalmq loadgen --signed`), and the one-core
//! signature reference it is compared with (`vitalmq loadgen --verify-reference`).
//!
//! [`run`]: N device identities of a PKI, each publishing PRE-SIGNED COSE_Sign1 vitals
//! (its own COSE key, one epoch, `seq` 0, 1, 2, ...) to `devices/{id}/telemetry` at QoS 1,
//! and subscribed to its own `devices/{id}/ack`. A message counts when a bridge receipt
//! covers it: the bridge sends receipts only after the message is durable, but a receipt
//! also covers messages the bridge has reported lost (a sequence gap it gave up on, SPEC
//! section 4), e.g. when the broker dropped them after its PUBACK. So "all receipted" is
//! "all verified and recorded" only if the bridge's store holds every message: a
//! benchmark checks that too (`scripts/bench-bridge` does). Reported: the receipted rate
//! from the first publish to the last receipt, the same over the middle of the run (10%
//! to 90% receipted), and CPU and memory of the broker and bridge processes.
//!
//! * Signing happens before the clock starts, on all cores; the timed phase only moves
//!   bytes, so the signer cannot limit the rate.
//! * Each publisher keeps at most [`MAX_UNACKED`] PUBLISHes without PUBACK (closed loop,
//!   as fast as the broker takes them) and, with `window > 0`, at most `window`
//!   messages without a receipt (as fast as the bridge records them, and without a
//!   backlog at the broker: rumqttd drops what a lagging subscriber has not read beyond
//!   its log size, see `broker/examples/broker.toml`).
//! * Every wait is bounded: connecting by [`CONNECT_TIMEOUT`], the whole run by
//!   `timeout`; a run that times out reports what was receipted (`complete: false`).
//!
//! [`verify_reference`] times the bare signature primitive the bridge runs per message
//! (ed25519-dalek `verify_strict`, ring ECDSA P-256) and the full [`verify`] on one
//! thread, on a message of the same shape, for the ratios the benchmark reports.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use coset::{CoseSign1, TaggedCborSerializable as _};
use serde::Serialize;
use tokio::sync::Semaphore;
use vitalmq_envelope::{
    Algorithm, DeviceId, MessageType, Number, SigningKey, Telemetry, VerifyingKey, sign, verify,
};

use vitalmq_device_sim::device::DEFAULT_FW;
use vitalmq_device_sim::pki::{Identity, Pki};
use vitalmq_device_sim::vitals::VitalsModel;
use vitalmq_mqtt_client::{Event, Qos, Session, SessionOptions, Target};

use crate::Error;
use crate::process::{loadavg, proc_sample};

/// PUBLISHes a publisher keeps without PUBACK (rumqttc's default in-flight limit).
pub(crate) const MAX_UNACKED: u64 = 100;
/// TCP, TLS, CONNACK and SUBACK of one publisher.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Device clock of the first message (2024-06-13T06:30:01Z); one reading per second.
const FIRST_TS_MS: u64 = 1_718_260_201_000;
/// Seed of the simulated patients' vitals.
const VITALS_SEED: u64 = 4;

/// Which devices publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlgFilter {
    Any,
    EdDsa,
    Es256,
}

impl AlgFilter {
    fn admits(self, alg: Algorithm) -> bool {
        match self {
            Self::Any => true,
            Self::EdDsa => alg == Algorithm::EdDsa,
            Self::Es256 => alg == Algorithm::Es256,
        }
    }
}

/// A name that is not an algorithm filter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown algorithm {0:?} (any, eddsa or es256)")]
pub struct UnknownAlgorithm(pub String);

impl std::str::FromStr for AlgFilter {
    type Err = UnknownAlgorithm;
    fn from_str(s: &str) -> Result<Self, UnknownAlgorithm> {
        match s.to_ascii_lowercase().as_str() {
            "any" => Ok(Self::Any),
            "eddsa" | "ed25519" => Ok(Self::EdDsa),
            "es256" => Ok(Self::Es256),
            _ => Err(UnknownAlgorithm(s.to_owned())),
        }
    }
}

/// The vitals message `seq` of device `dev` in `epoch`, as a wearable would make it:
/// spo2, pulse, resp, temp and signal quality from the simulated patient.
pub(crate) fn telemetry(dev: &DeviceId, model: &VitalsModel, epoch: u64, seq: u64) -> Telemetry {
    let t = Duration::from_secs(seq);
    let (spo2, pulse, resp, temp, q) = model.sample(t).map_or((97, 72, 14, 36.8, 0.95), |s| {
        (s.spo2, s.pulse, s.resp, s.temp, s.q)
    });
    Telemetry {
        dev: dev.clone(),
        epoch,
        seq,
        ts: FIRST_TS_MS + seq * 1000,
        fw: DEFAULT_FW.into(),
        kind: MessageType::Vitals,
        m: Some(BTreeMap::from([
            ("spo2".to_owned(), Number::Int(spo2.into())),
            ("pulse".to_owned(), Number::Int(pulse.into())),
            ("resp".to_owned(), Number::Int(resp.into())),
            ("temp".to_owned(), Number::Float(temp)),
        ])),
        q: Some(q),
        model: None,
        schema: None,
        extra: BTreeMap::new(),
    }
}

/// A device chosen for the run, with its key.
struct Chosen {
    identity: Identity,
    key: SigningKey,
}

/// The first `n` devices of the PKI whose COSE key `filter` admits.
fn choose(pki: &Pki, n: usize, filter: AlgFilter) -> Result<Vec<Chosen>, Error> {
    let mut out = Vec::with_capacity(n);
    for id in pki.ids("device")? {
        if out.len() == n {
            break;
        }
        let key = pki.signing_key(&id)?;
        if filter.admits(key.algorithm()) {
            out.push(Chosen {
                identity: pki.identity("device", &id)?,
                key,
            });
        }
    }
    if out.len() < n {
        return Err(Error::Invalid(format!(
            "{} has {} devices with {filter:?} keys, {n} needed",
            pki.dir.display(),
            out.len()
        )));
    }
    Ok(out)
}

/// Signs `counts[i]` messages for device `i`, on every available core.
fn presign(devices: &[Chosen], counts: &[u64], epoch: u64) -> Result<Vec<Vec<Vec<u8>>>, Error> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = devices.len().div_ceil(threads).max(1);
    let jobs: Vec<_> = devices.iter().zip(counts).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .chunks(per_thread)
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|&(d, &count)| {
                            let dev = device_id(&d.identity.id)?;
                            let model = VitalsModel::new(VITALS_SEED, dev.as_str(), Vec::new());
                            (0..count)
                                .map(|seq| {
                                    sign(&telemetry(&dev, &model, epoch, seq), &d.key).map_err(
                                        |source| Error::Sign {
                                            device: dev.to_string(),
                                            source,
                                        },
                                    )
                                })
                                .collect::<Result<Vec<_>, Error>>()
                        })
                        .collect::<Result<Vec<_>, Error>>()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(devices.len());
        for h in handles {
            match h.join() {
                Ok(part) => all.extend(part?),
                Err(_) => return Err(Error::Invalid("a signing thread panicked".into())),
            }
        }
        Ok(all)
    })
}

// ---------------------------------------------------------------------------------------
// The signed run

/// What [`run`] does.
#[derive(Debug, Clone)]
pub struct SignedOptions {
    pub target: Target,
    pub publishers: usize,
    pub alg: AlgFilter,
    /// Messages in total, spread evenly over the publishers.
    pub messages: u64,
    /// Aggregate messages per second; 0 = as fast as acknowledged.
    pub rate: u64,
    /// Most messages a publisher keeps without a receipt; 0 = no limit.
    pub window: u64,
    pub epoch: u64,
    /// Longest time from the first publish until every message is receipted.
    pub timeout: Duration,
    pub broker_pid: Option<u32>,
    pub bridge_pid: Option<u32>,
}

/// One point of the run's timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t_s: f64,
    pub sent: u64,
    pub acked: u64,
    pub receipted: u64,
    pub broker_cpu_s: Option<f64>,
    pub bridge_cpu_s: Option<f64>,
    pub bridge_rss_kib: Option<u64>,
}

/// The JSON report of [`run`].
#[derive(Debug, Clone, Serialize)]
pub struct SignedReport {
    pub mode: &'static str,
    pub host: String,
    pub port: u16,
    pub alg: AlgFilter,
    pub publishers: usize,
    pub ed25519_publishers: usize,
    pub es256_publishers: usize,
    pub messages: u64,
    pub message_bytes_min: usize,
    pub message_bytes_max: usize,
    pub message_bytes_mean: f64,
    pub window: u64,
    pub target_rate: u64,
    pub epoch: u64,
    /// Time spent signing before the run (not part of it).
    pub sign_s: f64,
    /// Wall clock (Unix ms) of the first publish, to line up other observers.
    pub start_unix_ms: u64,
    pub sent: u64,
    pub acked: u64,
    /// Messages covered by a receipt: recorded, or reported lost by the bridge.
    pub receipted: u64,
    /// Every message receipted within the timeout.
    pub complete: bool,
    pub publisher_errors: u64,
    pub bad_receipts: u64,
    /// First publish to the last PUBACK.
    pub publish_s: f64,
    pub acked_per_s: f64,
    /// First publish to the receipt that covered the last message.
    pub receipted_s: f64,
    /// `receipted / receipted_s`: verified and recorded messages per second, end to end
    /// (if the bridge's store holds all of them; see the module documentation).
    pub recorded_per_s: f64,
    /// The same between 10% and 90% receipted (the timeline, interpolated).
    pub recorded_per_s_10_90: Option<f64>,
    pub broker_pid: Option<u32>,
    pub bridge_pid: Option<u32>,
    pub broker_cpu_s: Option<f64>,
    pub bridge_cpu_s: Option<f64>,
    pub loadgen_cpu_s: Option<f64>,
    pub broker_cpu_us_per_msg: Option<f64>,
    pub bridge_cpu_us_per_msg: Option<f64>,
    pub bridge_rss_kib_before: Option<u64>,
    pub bridge_rss_kib_max: Option<u64>,
    pub broker_rss_kib_after: Option<u64>,
    pub loadavg_1m_start: f64,
    pub loadavg_1m_end: f64,
    pub timeline: Vec<Sample>,
}

/// Counters the publishers share with the sampler.
#[derive(Debug, Default)]
struct Shared {
    sent: AtomicU64,
    acked: AtomicU64,
    receipted: AtomicU64,
    errors: AtomicU64,
    bad_receipts: AtomicU64,
    /// Latest PUBACK and completing receipt, ns since the start.
    last_ack_ns: AtomicU64,
    last_receipt_ns: AtomicU64,
}

/// One publisher's connection with its pre-signed messages.
struct Publisher {
    id: String,
    session: Session,
    messages: Vec<Vec<u8>>,
}

/// Connects, subscribes to the publisher's receipts and waits for the SUBACK.
async fn connect(target: &Target, identity: &Identity) -> Result<Session, Error> {
    let options = SessionOptions {
        keep_alive: Duration::from_secs(30),
        connect_timeout: CONNECT_TIMEOUT,
        // Above MAX_UNACKED, so a publish never finds the request channel full.
        request_capacity: usize::try_from(MAX_UNACKED).unwrap_or(100) + 28,
        ..SessionOptions::default()
    };
    let mut session = Session::open(target, &identity.id, &identity.tls, &options);
    let id = &identity.id;
    let filter = format!("devices/{id}/ack");
    let granted = tokio::time::timeout(CONNECT_TIMEOUT, async {
        session.connected().await?;
        session.subscribed(&filter, Qos::AtLeastOnce).await
    })
    .await
    .map_err(|_| {
        Error::Timeout(format!(
            "{id}: not connected and subscribed within {CONNECT_TIMEOUT:?}"
        ))
    })?
    .map_err(|e| Error::session(id, e))?;
    if !granted {
        return Err(Error::Refused(filter));
    }
    Ok(session)
}

/// A device id of the PKI.
fn device_id(id: &str) -> Result<DeviceId, Error> {
    DeviceId::new(id).map_err(|source| Error::DeviceId {
        device: id.to_owned(),
        source,
    })
}

/// Wall-clock milliseconds since the Unix epoch.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ns_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// What all publishers of a run share: the epoch, the limits and the clock.
#[derive(Debug, Clone, Copy)]
struct Pace {
    epoch: u64,
    window: u64,
    interval: Option<Duration>,
    start: Instant,
    deadline: Instant,
}

/// Publishes one device's messages until a receipt covers the last one, the
/// connection fails or `deadline` passes. With `interval`, message k is due at
/// `start + phase + k * interval`.
async fn publish(p: Publisher, pace: Pace, phase: Duration, shared: Arc<Shared>) -> Session {
    let Pace {
        epoch,
        window,
        interval,
        start,
        deadline,
    } = pace;
    let Publisher {
        id,
        mut session,
        mut messages,
    } = p;
    let topic = format!("devices/{id}/telemetry");
    let total = messages.len() as u64;
    let (mut next, mut acked, mut covered) = (0u64, 0u64, 0u64);
    while covered < total {
        // Publish what the limits allow now.
        let mut due_at = None;
        while next < total && next - acked < MAX_UNACKED && (window == 0 || next - covered < window)
        {
            if let Some(iv) = interval {
                let due = start + phase + iv.mul_f64(next as f64);
                if due > Instant::now() {
                    due_at = Some(due);
                    break;
                }
            }
            // `next < total`, so the index exists.
            let payload = std::mem::take(&mut messages[next as usize]);
            if let Err(e) = session.publish(topic.clone(), payload) {
                tracing::warn!(device = %id, error = %e, "publish failed");
                shared.errors.fetch_add(1, Ordering::Relaxed);
                return session;
            }
            next += 1;
            shared.sent.fetch_add(1, Ordering::Relaxed);
        }
        let wake = due_at.unwrap_or(deadline).min(deadline);
        tokio::select! {
            event = session.next() => match event {
                // A refused PUBLISH (MQTT 5 reason 0x87) is not counted as delivered.
                Event::Acked { refused: None } => {
                    acked += 1;
                    shared.acked.fetch_add(1, Ordering::Relaxed);
                    shared.last_ack_ns.fetch_max(ns_since(start), Ordering::Relaxed);
                }
                Event::Acked { refused: Some(reason) } => {
                    tracing::warn!(device = %id, %reason, "publish refused by the broker");
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                }
                Event::Message { payload, .. } => match vitalmq_device_sim::receipt::decode(&payload) {
                    Ok(key) if key.epoch == epoch && key.seq < total => {
                        let now_covered = key.seq + 1;
                        if now_covered > covered {
                            shared.receipted.fetch_add(now_covered - covered, Ordering::Relaxed);
                            covered = now_covered;
                            if covered == total {
                                shared.last_receipt_ns.fetch_max(ns_since(start), Ordering::Relaxed);
                            }
                        }
                    }
                    // A receipt for the epoch before ours: nothing of ours recorded yet.
                    Ok(key) if key.epoch < epoch => {}
                    _ => {
                        shared.bad_receipts.fetch_add(1, Ordering::Relaxed);
                    }
                },
                Event::Down { reason } => {
                    tracing::warn!(device = %id, %reason, "publisher connection lost");
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                    return session;
                }
                Event::Connected | Event::Subscribed { .. } => {}
            },
            () = tokio::time::sleep_until(wake.into()) => {
                if Instant::now() >= deadline {
                    tracing::warn!(device = %id, sent = next, acked, covered, "timed out");
                    return session;
                }
            }
        }
    }
    session
}

fn cpu(pid: Option<u32>) -> Option<f64> {
    pid.and_then(|p| proc_sample(Some(p))).map(|s| s.cpu_s)
}

fn delta(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    a.zip(b).map(|(a, b)| ((b - a) * 100.0).round() / 100.0)
}

/// When the timeline crossed `level` receipted messages (linear between samples).
fn crossing(timeline: &[Sample], level: f64) -> Option<f64> {
    let i = timeline.iter().position(|s| s.receipted as f64 >= level)?;
    let b = &timeline[i];
    let Some(a) = i.checked_sub(1).map(|j| &timeline[j]) else {
        return Some(b.t_s);
    };
    let span = (b.receipted - a.receipted) as f64;
    Some(a.t_s + (b.t_s - a.t_s) * (level - a.receipted as f64) / span.max(1.0))
}

/// Runs the signed load; see the module documentation.
pub async fn run(pki: &Pki, opts: &SignedOptions) -> Result<SignedReport, Error> {
    if opts.publishers == 0 || opts.messages == 0 {
        return Err(Error::Invalid(
            "--publishers and --messages must be at least 1".into(),
        ));
    }
    if opts.timeout > Duration::from_secs(3600) {
        return Err(Error::Invalid("timeout at most 3600 s".into()));
    }
    let chosen = choose(pki, opts.publishers, opts.alg)?;
    let n = opts.publishers as u64;
    let counts: Vec<u64> = (0..n)
        .map(|i| opts.messages / n + u64::from(i < opts.messages % n))
        .collect();
    let signing = Instant::now();
    let signed = {
        let epoch = opts.epoch;
        tokio::task::block_in_place(|| presign(&chosen, &counts, epoch))?
    };
    let sign_s = signing.elapsed().as_secs_f64();
    let sizes: Vec<usize> = signed.iter().flatten().map(Vec::len).collect();
    tracing::info!(
        messages = sizes.len(),
        sign_s,
        "messages signed; connecting publishers"
    );
    let ed25519 = chosen
        .iter()
        .filter(|c| c.key.algorithm() == Algorithm::EdDsa)
        .count();

    // Connect everyone first (64 at a time), then start together.
    let sem = Arc::new(Semaphore::new(64));
    let mut handles = Vec::with_capacity(chosen.len());
    for (c, messages) in chosen.iter().zip(signed) {
        let target = opts.target.clone();
        let identity = c.identity.clone();
        let sem = Arc::clone(&sem);
        handles.push(tokio::spawn(async move {
            let _permit = sem.acquire().await;
            let session = connect(&target, &identity).await?;
            Ok::<_, Error>(Publisher {
                id: identity.id,
                session,
                messages,
            })
        }));
    }
    let mut publishers = Vec::with_capacity(handles.len());
    for h in handles {
        publishers.push(h.await??);
    }

    let loadavg_start = loadavg();
    let bridge_rss_before = opts
        .bridge_pid
        .and_then(|p| proc_sample(Some(p)))
        .map(|s| s.rss_kib);
    let (broker0, bridge0, self0) = (
        cpu(opts.broker_pid),
        cpu(opts.bridge_pid),
        proc_sample(None).map(|s| s.cpu_s),
    );
    let shared = Arc::new(Shared::default());
    let start = Instant::now();
    let start_unix_ms = unix_ms();
    let deadline = start + opts.timeout;
    let interval = (opts.rate > 0).then(|| Duration::from_secs_f64(n as f64 / opts.rate as f64));
    let pace = Pace {
        epoch: opts.epoch,
        window: opts.window,
        interval,
        start,
        deadline,
    };
    let tasks: Vec<_> = publishers
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            // Publisher i sends at start + (k + i/n) * interval: spread, not in step.
            let phase = interval.map_or(Duration::ZERO, |iv| iv.mul_f64(i as f64 / n as f64));
            tokio::spawn(publish(p, pace, phase, Arc::clone(&shared)))
        })
        .collect();

    // Timeline, every 500 ms, until every publisher is done.
    let sample = |shared: &Shared| Sample {
        t_s: (start.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
        sent: shared.sent.load(Ordering::Relaxed),
        acked: shared.acked.load(Ordering::Relaxed),
        receipted: shared.receipted.load(Ordering::Relaxed),
        broker_cpu_s: delta(broker0, cpu(opts.broker_pid)),
        bridge_cpu_s: delta(bridge0, cpu(opts.bridge_pid)),
        bridge_rss_kib: opts
            .bridge_pid
            .and_then(|p| proc_sample(Some(p)))
            .map(|s| s.rss_kib),
    };
    let mut timeline = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    while !tasks.iter().all(tokio::task::JoinHandle::is_finished) {
        tick.tick().await;
        timeline.push(sample(&shared));
    }
    timeline.push(sample(&shared));
    let (broker1, bridge1, self1) = (
        cpu(opts.broker_pid),
        cpu(opts.bridge_pid),
        proc_sample(None).map(|s| s.cpu_s),
    );
    let mut sessions = Vec::with_capacity(tasks.len());
    for t in tasks {
        sessions.push(t.await?);
    }
    for s in sessions {
        s.close(Duration::from_millis(300)).await;
    }

    let receipted = shared.receipted.load(Ordering::Relaxed);
    let acked = shared.acked.load(Ordering::Relaxed);
    let complete = receipted == opts.messages;
    let secs = |ns: u64| ns as f64 / 1e9;
    let publish_s = secs(shared.last_ack_ns.load(Ordering::Relaxed));
    let receipted_s = if complete {
        secs(shared.last_receipt_ns.load(Ordering::Relaxed))
    } else {
        timeline.last().map_or(0.0, |s| s.t_s)
    };
    let total = opts.messages as f64;
    let middle = crossing(&timeline, 0.1 * total)
        .zip(crossing(&timeline, 0.9 * total))
        .filter(|(a, b)| b > a)
        .map(|(a, b)| 0.8 * total / (b - a));
    let round1 = |x: f64| (x * 10.0).round() / 10.0;
    let rate = |count: u64, s: f64| {
        if s > 0.0 {
            round1(count as f64 / s)
        } else {
            0.0
        }
    };
    let broker_cpu_s = delta(broker0, broker1);
    let bridge_cpu_s = delta(bridge0, bridge1);
    let per_msg = |c: Option<f64>| {
        c.filter(|_| receipted > 0)
            .map(|c| round1(c * 1e6 / receipted as f64))
    };
    Ok(SignedReport {
        mode: "signed",
        host: opts.target.host.clone(),
        port: opts.target.port,
        alg: opts.alg,
        publishers: opts.publishers,
        ed25519_publishers: ed25519,
        es256_publishers: opts.publishers - ed25519,
        messages: opts.messages,
        message_bytes_min: sizes.iter().copied().min().unwrap_or(0),
        message_bytes_max: sizes.iter().copied().max().unwrap_or(0),
        message_bytes_mean: round1(sizes.iter().sum::<usize>() as f64 / sizes.len().max(1) as f64),
        window: opts.window,
        target_rate: opts.rate,
        epoch: opts.epoch,
        sign_s: (sign_s * 100.0).round() / 100.0,
        start_unix_ms,
        sent: shared.sent.load(Ordering::Relaxed),
        acked,
        receipted,
        complete,
        publisher_errors: shared.errors.load(Ordering::Relaxed),
        bad_receipts: shared.bad_receipts.load(Ordering::Relaxed),
        publish_s: (publish_s * 1000.0).round() / 1000.0,
        acked_per_s: rate(acked, publish_s),
        receipted_s: (receipted_s * 1000.0).round() / 1000.0,
        recorded_per_s: rate(receipted, receipted_s),
        recorded_per_s_10_90: middle.map(round1),
        broker_pid: opts.broker_pid,
        bridge_pid: opts.bridge_pid,
        broker_cpu_s,
        bridge_cpu_s,
        loadgen_cpu_s: delta(self0, self1),
        broker_cpu_us_per_msg: per_msg(broker_cpu_s),
        bridge_cpu_us_per_msg: per_msg(bridge_cpu_s),
        bridge_rss_kib_before: bridge_rss_before,
        bridge_rss_kib_max: timeline.iter().filter_map(|s| s.bridge_rss_kib).max(),
        broker_rss_kib_after: opts
            .broker_pid
            .and_then(|p| proc_sample(Some(p)))
            .map(|s| s.rss_kib),
        loadavg_1m_start: loadavg_start,
        loadavg_1m_end: loadavg(),
        timeline,
    })
}

/// Human summary of a signed run.
pub fn summary(r: &SignedReport) -> String {
    let opt = |x: Option<f64>| x.map_or_else(|| "-".to_owned(), |v| format!("{v}"));
    format!(
        "{}:{} signed {:?}: {} publishers ({} Ed25519, {} ES256), {} messages of {}..{} B (signed in {:.1} s), window {}, rate {}\n\
         sent {} acked {} receipted {} complete {} errors {} bad receipts {}\n\
         acked {:.0} msg/s over {:.2} s; recorded {:.0} msg/s end to end over {:.2} s ({} msg/s from 10% to 90%)\n\
         CPU s: broker {} bridge {} loadgen {} (us/msg: broker {} bridge {}); bridge RSS {} -> max {} KiB; load {:.2} -> {:.2}",
        r.host,
        r.port,
        r.alg,
        r.publishers,
        r.ed25519_publishers,
        r.es256_publishers,
        r.messages,
        r.message_bytes_min,
        r.message_bytes_max,
        r.sign_s,
        r.window,
        if r.target_rate == 0 {
            "max".to_owned()
        } else {
            format!("{}/s", r.target_rate)
        },
        r.sent,
        r.acked,
        r.receipted,
        r.complete,
        r.publisher_errors,
        r.bad_receipts,
        r.acked_per_s,
        r.publish_s,
        r.recorded_per_s,
        r.receipted_s,
        opt(r.recorded_per_s_10_90),
        opt(r.broker_cpu_s),
        opt(r.bridge_cpu_s),
        opt(r.loadgen_cpu_s),
        opt(r.broker_cpu_us_per_msg),
        opt(r.bridge_cpu_us_per_msg),
        r.bridge_rss_kib_before
            .map_or_else(|| "-".to_owned(), |v| v.to_string()),
        r.bridge_rss_kib_max
            .map_or_else(|| "-".to_owned(), |v| v.to_string()),
        r.loadavg_1m_start,
        r.loadavg_1m_end,
    )
}

// ---------------------------------------------------------------------------------------
// One-core reference

/// Verification rates of one algorithm on one thread.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyRate {
    pub alg: String,
    pub device: String,
    pub message_bytes: usize,
    /// ed25519-dalek `verify_strict` / ring ECDSA P-256 on the Sig_structure: the
    /// reference the bridge's throughput aim is stated against.
    pub bare_verify_per_s: f64,
    /// The signature check the bridge runs, `VerifyingKey::verify` (AWS-LC, with the
    /// strict small-order rules for Ed25519), on the same Sig_structure.
    pub vitalmq_verify_per_s: f64,
    /// `vitalmq_envelope::verify` (strict CBOR, headers, key lookup, signature, schema).
    pub full_verify_per_s: f64,
}

/// Rounds of [`verify_reference`]; each rate is the best round's (the least disturbed by
/// other work on a shared machine).
pub const REFERENCE_ROUNDS: u32 = 3;

/// The JSON report of [`verify_reference`].
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReference {
    pub mode: &'static str,
    pub rounds: u32,
    pub seconds_per_measurement: f64,
    pub rates: Vec<VerifyRate>,
    pub loadavg_1m_start: f64,
    pub loadavg_1m_end: f64,
}

/// The bare primitive, as a caller holding a parsed key calls it.
fn bare_verify(key: &VerifyingKey, tbs: &[u8], signature: &[u8]) -> bool {
    match key {
        VerifyingKey::Ed25519(k) => <&[u8; 64]>::try_from(signature).is_ok_and(|raw| {
            k.verify_strict(tbs, &ed25519_dalek::Signature::from_bytes(raw))
                .is_ok()
        }),
        VerifyingKey::Es256(key) => ::ring::signature::UnparsedPublicKey::new(
            &::ring::signature::ECDSA_P256_SHA256_FIXED,
            &key.point()[..],
        )
        .verify(tbs, signature)
        .is_ok(),
    }
}

/// Calls `op` in rounds of 64 until `seconds` passed; operations per second. Fails if
/// `op` ever refuses (the fixture is valid, so that is a broken measurement).
fn per_second(seconds: f64, mut op: impl FnMut() -> bool) -> Result<f64, Error> {
    let limit = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < limit {
        for _ in 0..64 {
            if !op() {
                return Err(Error::Reference(
                    "the reference message did not verify".into(),
                ));
            }
        }
        n += 64;
    }
    Ok((n as f64 / start.elapsed().as_secs_f64()).round())
}

/// One algorithm's reference message: signed bytes, Sig_structure and key.
struct Fixture {
    alg: Algorithm,
    id: String,
    dev: DeviceId,
    message: Vec<u8>,
    tbs: Vec<u8>,
    signature: Vec<u8>,
    public: VerifyingKey,
    registry: HashMap<DeviceId, VerifyingKey>,
}

/// The first device of the PKI with an `alg` key, and a vitals message it signed.
fn fixture(pki: &Pki, alg: Algorithm) -> Result<Option<Fixture>, Error> {
    for id in pki.ids("device")? {
        let key = pki.signing_key(&id)?;
        if key.algorithm() != alg {
            continue;
        }
        let dev = device_id(&id)?;
        let model = VitalsModel::new(VITALS_SEED, dev.as_str(), Vec::new());
        let message =
            sign(&telemetry(&dev, &model, 1, 1000), &key).map_err(|source| Error::Sign {
                device: id.clone(),
                source,
            })?;
        let parsed = CoseSign1::from_tagged_slice(&message)
            .map_err(|e| Error::Reference(format!("own message does not parse: {e}")))?;
        let public = key.verifying_key();
        return Ok(Some(Fixture {
            alg,
            id,
            registry: HashMap::from([(dev.clone(), public.clone())]),
            dev,
            tbs: parsed.tbs_data(&[]),
            signature: parsed.signature,
            message,
            public,
        }));
    }
    Ok(None)
}

/// Times one-core verification of a vitals message of the first Ed25519 and the first
/// ES256 device of the PKI on the calling thread: [`REFERENCE_ROUNDS`] rounds of
/// `seconds` per measurement, the best round kept.
pub fn verify_reference(pki: &Pki, seconds: f64) -> Result<VerifyReference, Error> {
    if !(0.1..=60.0).contains(&seconds) {
        return Err(Error::Invalid(
            "--verify-reference: 0.1 to 60 seconds per measurement".into(),
        ));
    }
    let loadavg_start = loadavg();
    let mut fixtures = Vec::new();
    for alg in [Algorithm::EdDsa, Algorithm::Es256] {
        match fixture(pki, alg)? {
            Some(f) => fixtures.push(f),
            None => tracing::warn!(%alg, "no device with this algorithm in the PKI"),
        }
    }
    let mut best = vec![(0.0f64, 0.0f64, 0.0f64); fixtures.len()];
    for _ in 0..REFERENCE_ROUNDS {
        for (f, (bare, primitive, full)) in fixtures.iter().zip(best.iter_mut()) {
            let b = per_second(seconds, || {
                bare_verify(
                    &f.public,
                    std::hint::black_box(&f.tbs),
                    std::hint::black_box(&f.signature),
                )
            })?;
            let p = per_second(seconds, || {
                f.public
                    .verify(
                        std::hint::black_box(&f.tbs),
                        std::hint::black_box(&f.signature),
                    )
                    .is_ok()
            })?;
            let v = per_second(seconds, || {
                verify(std::hint::black_box(&f.message), &f.registry, Some(&f.dev)).is_ok()
            })?;
            *bare = bare.max(b);
            *primitive = primitive.max(p);
            *full = full.max(v);
        }
    }
    let rates = fixtures
        .into_iter()
        .zip(best)
        .map(|(f, (bare, primitive, full))| VerifyRate {
            alg: f.alg.to_string(),
            device: f.id,
            message_bytes: f.message.len(),
            bare_verify_per_s: bare,
            vitalmq_verify_per_s: primitive,
            full_verify_per_s: full,
        })
        .collect();
    Ok(VerifyReference {
        mode: "verify-reference",
        rounds: REFERENCE_ROUNDS,
        seconds_per_measurement: seconds,
        rates,
        loadavg_1m_start: loadavg_start,
        loadavg_1m_end: loadavg(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presigned_vitals_verify_and_have_the_realistic_size() {
        let key = SigningKey::from_private_bytes(Algorithm::EdDsa, &[7u8; 32]).expect("key");
        let dev = DeviceId::new("dev-00001").expect("id");
        let model = VitalsModel::new(VITALS_SEED, dev.as_str(), Vec::new());
        let registry = HashMap::from([(dev.clone(), key.verifying_key())]);
        for seq in [0, 1, 59, 86_400] {
            let m = sign(&telemetry(&dev, &model, 1, seq), &key).expect("sign");
            assert!((150..=220).contains(&m.len()), "{} bytes", m.len());
            let v = verify(&m, &registry, Some(&dev)).expect("verifies");
            assert_eq!((v.epoch, v.seq), (1, seq));
        }
    }

    #[test]
    fn crossing_interpolates_the_timeline() {
        let s = |t_s, receipted| Sample {
            t_s,
            sent: 0,
            acked: 0,
            receipted,
            broker_cpu_s: None,
            bridge_cpu_s: None,
            bridge_rss_kib: None,
        };
        let tl = [s(0.0, 0), s(1.0, 100), s(2.0, 300)];
        assert_eq!(crossing(&tl, 50.0), Some(0.5));
        assert_eq!(crossing(&tl, 200.0), Some(1.5));
        assert_eq!(crossing(&tl, 400.0), None);
    }

    #[test]
    fn alg_filter_parses() {
        assert_eq!("EdDSA".parse(), Ok(AlgFilter::EdDsa));
        assert_eq!("es256".parse(), Ok(AlgFilter::Es256));
        assert!("rsa".parse::<AlgFilter>().is_err());
    }
}
