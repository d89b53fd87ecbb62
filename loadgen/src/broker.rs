//! The load generator behind `vitalmq loadgen`: many device identities publishing over
//! mTLS, one subscriber receiving everything, and the numbers that matter for a broker.
//!
//! Three modes, all bounded in count and time:
//!
//! * [`run`]: N publishers (each its own device identity, client id = device id,
//!   topic `devices/{id}/telemetry`) at a target aggregate rate (0 = as fast as the
//!   broker takes them), one subscriber (the bridge identity) on a filter. Every payload
//!   starts with a 20-byte header: send time (ns on a monotonic clock shared in this
//!   process), publisher index and sequence number, so the subscriber computes
//!   publish -> receive latency and counts losses and duplicates. A message counts as
//!   delivered only when the subscriber got it.
//! * [`storm`]: N identities connect (bounded concurrency), all drop their TCP connection
//!   at once (no DISCONNECT, as in a network outage) and reconnect; reports the time until
//!   every one has its CONNACK again. Each identity keeps one `Arc<ClientConfig>` across
//!   its reconnects, so TLS session resumption is used if the server offers it.
//! * [`idle`]: N identities connect and stay idle, to measure the broker's memory per
//!   connection (when given its pid).
//!
//! [`probe_resumption`] tells whether the server resumes TLS sessions.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rustls_pki_types::ServerName;
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsConnector;
pub use vitalmq_device_sim::pki::{Identity, Pki};
use vitalmq_mqtt_client::{Event, Qos, Session, SessionOptions};
pub use vitalmq_mqtt_client::{MqttVersion, Target};

use crate::Error;
use crate::process::{loadavg, proc_sample};

/// Length of the header every generated payload starts with.
pub(crate) const HEADER_LEN: usize = 20;

// ---------------------------------------------------------------------------------------
// Clock and payload

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds on the process-wide monotonic clock.
pub(crate) fn now_ns() -> u64 {
    u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// A payload of `size` bytes (at least [`HEADER_LEN`]): send time, publisher, sequence.
pub(crate) fn make_payload(size: usize, publisher: u32, seq: u64) -> Vec<u8> {
    let mut p = vec![0u8; size.max(HEADER_LEN)];
    p[0..8].copy_from_slice(&now_ns().to_be_bytes());
    p[8..12].copy_from_slice(&publisher.to_be_bytes());
    p[12..20].copy_from_slice(&seq.to_be_bytes());
    p
}

/// `(send time ns, publisher, seq)` of a generated payload.
pub(crate) fn parse_payload(p: &[u8]) -> Option<(u64, u32, u64)> {
    if p.len() < HEADER_LEN {
        return None;
    }
    let ts = u64::from_be_bytes(p[0..8].try_into().ok()?);
    let publisher = u32::from_be_bytes(p[8..12].try_into().ok()?);
    let seq = u64::from_be_bytes(p[12..20].try_into().ok()?);
    Some((ts, publisher, seq))
}

// ---------------------------------------------------------------------------------------
// Connections

/// A clean session with room for 1 MiB packets. TCP, TLS and CONNACK within 5 s with
/// MQTT 3.1.1 and 10 s with MQTT 5, as the benchmark has always measured (rumqttc's
/// defaults then), so reconnect-storm retries stay comparable.
fn session_options(
    version: MqttVersion,
    keep_alive: Duration,
    request_capacity: usize,
) -> SessionOptions {
    SessionOptions {
        keep_alive,
        connect_timeout: Duration::from_secs(match version {
            MqttVersion::V311 => 5,
            MqttVersion::V5 => 10,
        }),
        request_capacity,
        max_packet_size: 1 << 20,
    }
}

/// Opens a session for `ident` and waits (until `deadline`) for its CONNACK.
async fn connect(
    target: &Target,
    ident: &Identity,
    options: &SessionOptions,
    deadline: Instant,
) -> Result<Session, Error> {
    let mut session = Session::open(target, &ident.id, &ident.tls, options);
    match tokio::time::timeout_at(deadline.into(), session.connected()).await {
        Ok(Ok(())) => Ok(session),
        Ok(Err(e)) => Err(Error::session(&ident.id, e)),
        Err(_) => Err(Error::Timeout(format!("{}: no CONNACK in time", ident.id))),
    }
}

// ---------------------------------------------------------------------------------------
// Throughput / latency run

/// What [`run`] does.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub target: Target,
    pub publishers: usize,
    /// Aggregate messages per second; 0 = as fast as possible.
    pub rate: u64,
    pub duration: Duration,
    pub qos: u8,
    pub payload_bytes: usize,
    pub subscriber_filter: String,
    /// Bridge identity used by the subscriber (first one in the PKI when `None`).
    pub subscriber_id: Option<String>,
    /// Longest wait after publishing for acknowledgements and deliveries.
    pub drain: Duration,
    /// Broker process to sample (CPU, RSS).
    pub broker_pid: Option<u32>,
    /// Skip the first part of the run in the latency histogram (warm-up).
    pub warmup: Duration,
}

/// Latency summary in microseconds.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct Latency {
    pub samples: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl Latency {
    pub fn from_hist(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            samples: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: (h.mean() * 10.0).round() / 10.0,
        }
    }
}

/// The JSON report of [`run`].
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub mode: &'static str,
    pub host: String,
    pub port: u16,
    pub mqtt_version: MqttVersion,
    pub publishers: usize,
    pub target_rate: u64,
    pub duration_s: f64,
    pub qos: u8,
    pub payload_bytes: usize,
    pub subscriber_filter: String,
    /// Messages handed to the MQTT clients.
    pub sent: u64,
    /// PUBACKs received (QoS 1); equal to `sent` for QoS 0.
    pub acked: u64,
    /// Distinct messages the subscriber received.
    pub delivered: u64,
    /// `sent - delivered`.
    pub lost: u64,
    pub duplicates: u64,
    /// Payloads the subscriber could not attribute (not from this run).
    pub foreign: u64,
    pub publisher_errors: u64,
    pub send_rate: f64,
    /// Delivered messages per second, from the first send to the last delivery.
    pub delivered_per_s: f64,
    /// Delivered messages per second within the publishing window only.
    pub delivered_per_s_in_window: f64,
    pub latency: Latency,
    pub connect_ms_mean: f64,
    pub connect_ms_max: f64,
    pub all_connected_ms: f64,
    pub broker_pid: Option<u32>,
    pub broker_cpu_s: Option<f64>,
    /// Broker CPU per delivered message.
    pub broker_cpu_us_per_msg: Option<f64>,
    pub broker_rss_kib_before: Option<u64>,
    pub broker_rss_kib_connected: Option<u64>,
    pub broker_rss_kib_after: Option<u64>,
    pub loadgen_cpu_s: Option<f64>,
    pub loadavg_1m_start: f64,
    pub loadavg_1m_end: f64,
}

struct SubState {
    seen: Vec<Vec<u64>>,
    delivered: u64,
    duplicates: u64,
    foreign: u64,
    hist: Histogram<u64>,
    first_ns: u64,
    last_ns: u64,
    in_window: u64,
}

impl SubState {
    fn new(publishers: usize) -> Result<Self, Error> {
        Ok(Self {
            seen: vec![Vec::new(); publishers],
            delivered: 0,
            duplicates: 0,
            foreign: 0,
            hist: Histogram::new_with_bounds(1, 120_000_000, 3)?,
            first_ns: 0,
            last_ns: 0,
            in_window: 0,
        })
    }

    fn record(&mut self, payload: &[u8], run_id_ok: bool, warm_from_ns: u64, window_end_ns: u64) {
        let now = now_ns();
        let Some((ts, publisher, seq)) = parse_payload(payload) else {
            self.foreign += 1;
            return;
        };
        let Some(bits) = self.seen.get_mut(publisher as usize) else {
            self.foreign += 1;
            return;
        };
        if !run_id_ok || ts > now {
            self.foreign += 1;
            return;
        }
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= bits.len() {
            if word > 1 << 26 {
                self.foreign += 1;
                return;
            }
            bits.resize(word + 1 + bits.len() / 2, 0);
        }
        if bits[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return;
        }
        bits[word] |= 1 << bit;
        self.delivered += 1;
        if self.first_ns == 0 {
            self.first_ns = now;
        }
        self.last_ns = now;
        if now <= window_end_ns {
            self.in_window += 1;
        }
        if ts >= warm_from_ns {
            let us = ((now - ts) / 1_000).max(1);
            let _ = self.hist.record(us.min(120_000_000));
        }
    }
}

/// Publishes with N device identities and receives everything with one subscriber.
pub async fn run(pki: &Pki, opts: &RunOptions) -> Result<RunReport, Error> {
    if opts.publishers == 0 {
        return Err(Error::Invalid("--publishers must be at least 1".into()));
    }
    if opts.duration > Duration::from_secs(3600) || opts.drain > Duration::from_secs(600) {
        return Err(Error::Invalid(
            "duration at most 3600 s, drain at most 600 s".into(),
        ));
    }
    let loadavg_start = loadavg();
    let devices = pki.devices(opts.publishers)?;
    let sub_id = match &opts.subscriber_id {
        Some(id) => id.clone(),
        None => pki
            .ids("bridge")?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Invalid("no bridge identity in the PKI".into()))?,
    };
    let sub_identity = pki.identity("bridge", &sub_id)?;
    let rss_before = opts.broker_pid.and_then(|p| proc_sample(Some(p)));
    let _ = now_ns();

    // Subscriber first.
    let state = Arc::new(Mutex::new(SubState::new(opts.publishers)?));
    let (stop_tx, stop_rx) = watch::channel(false);
    let window = Arc::new(Mutex::new((u64::MAX, u64::MAX))); // (warm_from, window_end)
    let mut sub = connect(
        &opts.target,
        &sub_identity,
        &session_options(opts.target.version, Duration::from_secs(30), 16),
        Instant::now() + Duration::from_secs(15),
    )
    .await?;
    let granted = tokio::time::timeout(
        Duration::from_secs(10),
        sub.subscribed(&opts.subscriber_filter, Qos::from_level(opts.qos)),
    )
    .await
    .map_err(|_| Error::Timeout("subscriber: no SUBACK within 10 s".into()))?
    .map_err(|e| Error::session("subscriber", e))?;
    if !granted {
        return Err(Error::Refused(opts.subscriber_filter.clone()));
    }
    let sub_task = {
        let state = Arc::clone(&state);
        let window = Arc::clone(&window);
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    ev = sub.next() => match ev {
                        Event::Message { payload, .. } => {
                            let (warm, end) = *window.lock().unwrap_or_else(|e| e.into_inner());
                            state.lock().unwrap_or_else(|e| e.into_inner()).record(&payload, true, warm, end);
                        }
                        Event::Down { reason } => {
                            tracing::warn!(error = %reason, "subscriber connection lost");
                            break;
                        }
                        _ => {}
                    },
                    _ = stop.changed() => break,
                }
            }
            // Let the DISCONNECT go out.
            sub.close(Duration::from_millis(500)).await;
        })
    };

    // Publishers: connect all, then start together.
    let connect_start = Instant::now();
    let mut publishers = Vec::new();
    let mut connect_ms = Vec::new();
    let sem = Arc::new(Semaphore::new(64));
    let mut handles = Vec::new();
    for (i, dev) in devices.iter().enumerate() {
        let target = opts.target.clone();
        let dev = dev.clone();
        let sem = Arc::clone(&sem);
        handles.push(tokio::spawn(async move {
            let _permit = sem.acquire().await;
            let t = Instant::now();
            let options = session_options(target.version, Duration::from_secs(30), 64);
            let session = connect(&target, &dev, &options, t + Duration::from_secs(15)).await?;
            Ok::<_, Error>((i, dev.id, session, t.elapsed()))
        }));
    }
    for h in handles {
        let (i, id, session, took) = h.await??;
        connect_ms.push(took.as_secs_f64() * 1e3);
        publishers.push((i, id, session));
    }
    let all_connected_ms = connect_start.elapsed().as_secs_f64() * 1e3;
    let rss_connected = opts.broker_pid.and_then(|p| proc_sample(Some(p)));

    // Go.
    let cpu_start = opts.broker_pid.and_then(|p| proc_sample(Some(p)));
    let self_start = proc_sample(None);
    let start = Instant::now();
    let start_ns = now_ns();
    let end = start + opts.duration;
    *window.lock().unwrap_or_else(|e| e.into_inner()) = (
        start_ns + u64::try_from(opts.warmup.as_nanos()).unwrap_or(0),
        start_ns + u64::try_from(opts.duration.as_nanos()).unwrap_or(u64::MAX),
    );
    let sent_total = Arc::new(AtomicU64::new(0));
    let acked_total = Arc::new(AtomicU64::new(0));
    let errors_total = Arc::new(AtomicU64::new(0));
    let drain_deadline = end + opts.drain;
    let per_pub_interval = if opts.rate > 0 {
        Some(Duration::from_secs_f64(
            opts.publishers as f64 / opts.rate as f64,
        ))
    } else {
        None
    };
    let mut tasks = Vec::new();
    for (i, id, mut session) in publishers {
        let sent_total = Arc::clone(&sent_total);
        let acked_total = Arc::clone(&acked_total);
        let errors_total = Arc::clone(&errors_total);
        let qos = opts.qos;
        let size = opts.payload_bytes;
        let n = opts.publishers;
        tasks.push(tokio::spawn(async move {
            let topic = format!("devices/{id}/telemetry");
            let sent = Arc::new(AtomicU64::new(0));
            let done = Arc::new(AtomicBool::new(false));
            let acked = Arc::new(AtomicU64::new(0));
            let publisher = session.publisher();
            // The session's events: acknowledgements.
            let loop_task = {
                let sent = Arc::clone(&sent);
                let done = Arc::clone(&done);
                let acked = Arc::clone(&acked);
                let errors_total = Arc::clone(&errors_total);
                tokio::spawn(async move {
                    loop {
                        let finished = done.load(Ordering::Acquire)
                            && (qos == 0 || acked.load(Ordering::Acquire) >= sent.load(Ordering::Acquire));
                        if finished || Instant::now() > drain_deadline {
                            break;
                        }
                        // A short wait, so that the end of publishing is noticed.
                        match tokio::time::timeout(Duration::from_millis(100), session.next()).await {
                            Ok(Event::Acked { .. }) => {
                                acked.fetch_add(1, Ordering::AcqRel);
                            }
                            Ok(Event::Down { reason }) => {
                                errors_total.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(publisher = i, error = %reason, "publisher connection error");
                                break;
                            }
                            Ok(_) | Err(_) => {}
                        }
                    }
                    session
                })
            };
            let phase = if let Some(iv) = per_pub_interval {
                // Spread the publishers' send instants over one interval.
                iv.mul_f64(i as f64 / n as f64)
            } else {
                Duration::ZERO
            };
            let mut k: u64 = 0;
            let idx = u32::try_from(i).unwrap_or(u32::MAX);
            loop {
                let now = Instant::now();
                if now >= end || loop_task.is_finished() {
                    break;
                }
                if let Some(iv) = per_pub_interval {
                    let due = start + phase + iv.mul_f64(k as f64);
                    if due >= end {
                        break;
                    }
                    if due > now {
                        tokio::time::sleep_until(due.into()).await;
                    }
                }
                let payload = make_payload(size, idx, k);
                match tokio::time::timeout_at(drain_deadline.into(), publisher.send(&topic, Qos::from_level(qos), payload)).await {
                    Ok(Ok(())) => {
                        k += 1;
                        sent.fetch_add(1, Ordering::AcqRel);
                    }
                    _ => break,
                }
            }
            done.store(true, Ordering::Release);
            if let Ok(session) = loop_task.await {
                session.close(Duration::from_millis(300)).await;
            }
            let s = sent.load(Ordering::Acquire);
            let a = if qos == 0 { s } else { acked.load(Ordering::Acquire) };
            sent_total.fetch_add(s, Ordering::Relaxed);
            acked_total.fetch_add(a, Ordering::Relaxed);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let publish_done = Instant::now();
    let sent = sent_total.load(Ordering::Relaxed);
    let acked = acked_total.load(Ordering::Relaxed);
    // Wait for deliveries: until all sent arrived, 2 s without progress, or the deadline.
    let mut last = (0u64, Instant::now());
    loop {
        let d = state.lock().unwrap_or_else(|e| e.into_inner()).delivered;
        if d >= sent {
            break;
        }
        if d != last.0 {
            last = (d, Instant::now());
        }
        if last.1.elapsed() > Duration::from_secs(2)
            || Instant::now() > drain_deadline.max(publish_done + Duration::from_secs(3))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu_end = opts.broker_pid.and_then(|p| proc_sample(Some(p)));
    let self_end = proc_sample(None);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(3), sub_task).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = opts.broker_pid.and_then(|p| proc_sample(Some(p)));

    let st = state.lock().unwrap_or_else(|e| e.into_inner());
    let elapsed_s = opts.duration.as_secs_f64();
    let span_s = if st.last_ns > start_ns {
        (st.last_ns - start_ns) as f64 / 1e9
    } else {
        f64::NAN
    };
    let broker_cpu = match (cpu_start, cpu_end) {
        (Some(a), Some(b)) => Some(((b.cpu_s - a.cpu_s) * 100.0).round() / 100.0),
        _ => None,
    };
    let round1 = |x: f64| (x * 10.0).round() / 10.0;
    Ok(RunReport {
        mode: "run",
        host: opts.target.host.clone(),
        port: opts.target.port,
        mqtt_version: opts.target.version,
        publishers: opts.publishers,
        target_rate: opts.rate,
        duration_s: elapsed_s,
        qos: opts.qos,
        payload_bytes: opts.payload_bytes.max(HEADER_LEN),
        subscriber_filter: opts.subscriber_filter.clone(),
        sent,
        acked,
        delivered: st.delivered,
        lost: sent.saturating_sub(st.delivered),
        duplicates: st.duplicates,
        foreign: st.foreign,
        publisher_errors: errors_total.load(Ordering::Relaxed),
        send_rate: round1(sent as f64 / elapsed_s),
        delivered_per_s: round1(st.delivered as f64 / span_s),
        delivered_per_s_in_window: round1(st.in_window as f64 / elapsed_s),
        latency: Latency::from_hist(&st.hist),
        connect_ms_mean: round1(connect_ms.iter().sum::<f64>() / connect_ms.len().max(1) as f64),
        connect_ms_max: round1(connect_ms.iter().copied().fold(0.0, f64::max)),
        all_connected_ms: round1(all_connected_ms),
        broker_pid: opts.broker_pid,
        broker_cpu_s: broker_cpu,
        broker_cpu_us_per_msg: broker_cpu
            .filter(|_| st.delivered > 0)
            .map(|c| round1(c * 1e6 / st.delivered as f64)),
        broker_rss_kib_before: rss_before.map(|s| s.rss_kib),
        broker_rss_kib_connected: rss_connected.map(|s| s.rss_kib),
        broker_rss_kib_after: rss_after.map(|s| s.rss_kib),
        loadgen_cpu_s: match (self_start, self_end) {
            (Some(a), Some(b)) => Some(((b.cpu_s - a.cpu_s) * 100.0).round() / 100.0),
            _ => None,
        },
        loadavg_1m_start: loadavg_start,
        loadavg_1m_end: loadavg(),
    })
}

// ---------------------------------------------------------------------------------------
// Reconnect storm and idle connections

/// What [`storm`] and [`idle`] do.
#[derive(Debug, Clone)]
pub struct ConnOptions {
    pub target: Target,
    pub connections: usize,
    /// Connections being set up at once.
    pub concurrency: usize,
    /// Longest time for each phase.
    pub timeout: Duration,
    /// How long [`idle`] holds the connections (and [`storm`] after reconnecting).
    pub hold: Duration,
    pub broker_pid: Option<u32>,
}

/// The JSON report of [`storm`] and [`idle`].
#[derive(Debug, Clone, Serialize, Default)]
pub struct ConnReport {
    pub mode: &'static str,
    pub host: String,
    pub port: u16,
    pub connections: usize,
    pub concurrency: usize,
    /// Time until every identity had its first CONNACK.
    pub first_connect_ms: f64,
    pub first_connected: usize,
    /// Storm: time from the simultaneous drop until every identity had its CONNACK again.
    pub reconnect_ms: Option<f64>,
    pub reconnected: Option<usize>,
    /// Connection attempts that failed and were retried.
    pub retries: u64,
    pub failed: usize,
    /// Whether the server resumed a TLS session for a returning client (probe).
    pub tls_resumption: Option<ResumptionProbe>,
    pub broker_rss_kib_before: Option<u64>,
    pub broker_rss_kib_connected: Option<u64>,
    pub broker_rss_kib_after_close: Option<u64>,
    pub broker_kib_per_connection: Option<f64>,
    pub broker_cpu_s_first_connect: Option<f64>,
    pub broker_cpu_s_reconnect: Option<f64>,
    pub loadavg_1m_start: f64,
    pub loadavg_1m_end: f64,
}

/// Connects until CONNACK, retrying with a short pause until `deadline`.
async fn connect_until(
    target: &Target,
    ident: &Identity,
    deadline: Instant,
    sem: &Semaphore,
    retries: &AtomicU64,
) -> Option<Session> {
    let options = session_options(target.version, Duration::from_secs(120), 4);
    loop {
        {
            let _permit = sem.acquire().await.ok()?;
            match connect(target, ident, &options, deadline).await {
                Ok(session) => return Some(session),
                Err(Error::Timeout(_)) => return None,
                Err(e) => tracing::debug!(id = %ident.id, error = %e, "connect failed; retrying"),
            }
        }
        retries.fetch_add(1, Ordering::Relaxed);
        if Instant::now() + Duration::from_millis(100) > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `stop` reaches `at_least`; the session keeps its connection alive
/// meanwhile.
async fn hold(mut stop: watch::Receiver<u8>, at_least: u8) {
    while *stop.borrow() < at_least {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// Connects `connections` device identities, drops them all at once, reconnects them
/// (`storm = true`), or just holds them idle (`storm = false`).
pub async fn connections(pki: &Pki, opts: &ConnOptions, storm: bool) -> Result<ConnReport, Error> {
    if opts.connections == 0 || opts.concurrency == 0 {
        return Err(Error::Invalid(
            "connections and concurrency must be at least 1".into(),
        ));
    }
    if opts.timeout > Duration::from_secs(600) || opts.hold > Duration::from_secs(3600) {
        return Err(Error::Invalid(
            "timeout at most 600 s, hold at most 3600 s".into(),
        ));
    }
    let mut report = ConnReport {
        mode: if storm { "reconnect-storm" } else { "idle" },
        host: opts.target.host.clone(),
        port: opts.target.port,
        connections: opts.connections,
        concurrency: opts.concurrency,
        loadavg_1m_start: loadavg(),
        ..ConnReport::default()
    };
    let load_start = Instant::now();
    let idents = pki.devices(opts.connections)?;
    tracing::info!(
        n = idents.len(),
        took_ms = load_start.elapsed().as_millis() as u64,
        "identities loaded"
    );
    if storm {
        report.tls_resumption = probe_resumption(&opts.target, &idents[0]).await.ok();
    }
    let sample = |pid: Option<u32>| pid.and_then(|p| proc_sample(Some(p)));
    let before = sample(opts.broker_pid);
    report.broker_rss_kib_before = before.map(|s| s.rss_kib);

    let sem = Arc::new(Semaphore::new(opts.concurrency));
    let retries = Arc::new(AtomicU64::new(0));
    // Phases: 0 = connecting, 1 = drop now, 2 = stop (close cleanly).
    let (phase_tx, phase_rx) = watch::channel(0u8);
    let (first_tx, mut first_rx) = tokio::sync::mpsc::channel::<bool>(opts.connections);
    let (second_tx, mut second_rx) = tokio::sync::mpsc::channel::<bool>(opts.connections);
    let t0 = Instant::now();
    let phase1_deadline = t0 + opts.timeout;
    let second_deadline = Arc::new(Mutex::new(t0 + opts.timeout * 2));
    let mut tasks = Vec::with_capacity(idents.len());
    for ident in idents {
        let target = opts.target.clone();
        let sem = Arc::clone(&sem);
        let retries = Arc::clone(&retries);
        let phase = phase_rx.clone();
        let first_tx = first_tx.clone();
        let second_tx = second_tx.clone();
        let second_deadline = Arc::clone(&second_deadline);
        tasks.push(tokio::spawn(async move {
            let Some(session) =
                connect_until(&target, &ident, phase1_deadline, &sem, &retries).await
            else {
                let _ = first_tx.send(false).await;
                return;
            };
            let _ = first_tx.send(true).await;
            let session = if storm {
                hold(phase.clone(), 1).await;
                if *phase.borrow() >= 2 {
                    session.close(Duration::ZERO).await;
                    return;
                }
                // Abrupt close: no DISCONNECT.
                drop(session);
                let deadline = *second_deadline.lock().unwrap_or_else(|e| e.into_inner());
                let Some(session) = connect_until(&target, &ident, deadline, &sem, &retries).await
                else {
                    let _ = second_tx.send(false).await;
                    return;
                };
                let _ = second_tx.send(true).await;
                session
            } else {
                session
            };
            hold(phase, 2).await;
            session.close(Duration::from_millis(200)).await;
        }));
    }
    drop(first_tx);
    drop(second_tx);
    let cpu0 = sample(opts.broker_pid);
    let mut ok = 0usize;
    let mut n = 0usize;
    while n < opts.connections {
        match first_rx.recv().await {
            Some(good) => {
                n += 1;
                ok += usize::from(good);
            }
            None => break,
        }
    }
    report.first_connect_ms = (t0.elapsed().as_secs_f64() * 1e4).round() / 10.0;
    report.first_connected = ok;
    report.failed = opts.connections - ok;
    tracing::info!(ok, ms = report.first_connect_ms, "first connect done");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let connected = sample(opts.broker_pid);
    report.broker_rss_kib_connected = connected.map(|s| s.rss_kib);
    report.broker_cpu_s_first_connect = match (cpu0, connected) {
        (Some(a), Some(b)) => Some(((b.cpu_s - a.cpu_s) * 100.0).round() / 100.0),
        _ => None,
    };
    if let (Some(a), Some(b)) = (before, connected) {
        report.broker_kib_per_connection = Some(
            ((b.rss_kib as f64 - a.rss_kib as f64) / ok.max(1) as f64 * 100.0).round() / 100.0,
        );
    }
    if storm {
        let t1 = Instant::now();
        *second_deadline.lock().unwrap_or_else(|e| e.into_inner()) = t1 + opts.timeout;
        let cpu1 = sample(opts.broker_pid);
        let _ = phase_tx.send(1);
        let mut again = 0usize;
        let mut m = 0usize;
        while m < ok {
            match tokio::time::timeout_at(
                (t1 + opts.timeout + Duration::from_secs(1)).into(),
                second_rx.recv(),
            )
            .await
            {
                Ok(Some(good)) => {
                    m += 1;
                    again += usize::from(good);
                }
                _ => break,
            }
        }
        report.reconnect_ms = Some((t1.elapsed().as_secs_f64() * 1e4).round() / 10.0);
        report.reconnected = Some(again);
        report.failed += ok - again;
        let cpu2 = sample(opts.broker_pid);
        report.broker_cpu_s_reconnect = match (cpu1, cpu2) {
            (Some(a), Some(b)) => Some(((b.cpu_s - a.cpu_s) * 100.0).round() / 100.0),
            _ => None,
        };
        tracing::info!(again, ms = report.reconnect_ms, "reconnect done");
    }
    if !opts.hold.is_zero() {
        eprintln!("loadgen: {ok} connections held for {:?}", opts.hold);
        tokio::time::sleep(opts.hold).await;
    }
    let _ = phase_tx.send(2);
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        for t in tasks {
            let _ = t.await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    report.broker_rss_kib_after_close = sample(opts.broker_pid).map(|s| s.rss_kib);
    report.retries = retries.load(Ordering::Relaxed);
    report.loadavg_1m_end = loadavg();
    Ok(report)
}

// ---------------------------------------------------------------------------------------
// TLS resumption probe

/// Result of [`probe_resumption`].
#[derive(Debug, Clone, Serialize)]
pub struct ResumptionProbe {
    pub first: String,
    pub second: String,
    pub resumed: bool,
    pub protocol: String,
    pub first_handshake_us: u64,
    pub second_handshake_us: u64,
}

/// A minimal MQTT 3.1.1 CONNECT (clean session, keep-alive 60 s) for `client_id`.
fn connect_packet(client_id: &str) -> Vec<u8> {
    let id = client_id.as_bytes();
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend_from_slice(&u16::try_from(id.len()).unwrap_or(0).to_be_bytes());
    body.extend_from_slice(id);
    let mut p = vec![0x10];
    let mut len = body.len();
    loop {
        let mut b = u8::try_from(len % 128).unwrap_or(0);
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        p.push(b);
        if len == 0 {
            break;
        }
    }
    p.extend_from_slice(&body);
    p
}

/// Two TLS connections with the same client configuration, each sending CONNECT and
/// reading CONNACK (which also makes the client take the TLS 1.3 session tickets); tells
/// whether the second handshake was a resumption.
pub(crate) async fn probe_resumption(
    target: &Target,
    ident: &Identity,
) -> Result<ResumptionProbe, Error> {
    let connector = TlsConnector::from(Arc::clone(&ident.tls));
    let name = ServerName::try_from(target.host.clone())?;
    let mut kinds = Vec::new();
    let mut times = Vec::new();
    let mut protocol = String::new();
    for _ in 0..2 {
        let tcp = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect((target.host.as_str(), target.port)),
        )
        .await
        .map_err(|_| Error::Timeout("probe: connect timeout".into()))??;
        let t = Instant::now();
        let mut tls =
            tokio::time::timeout(Duration::from_secs(5), connector.connect(name.clone(), tcp))
                .await
                .map_err(|_| Error::Timeout("probe: handshake timeout".into()))??;
        times.push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
        let conn = tls.get_ref().1;
        kinds.push(format!("{:?}", conn.handshake_kind()));
        protocol = format!("{:?}", conn.protocol_version());
        tls.write_all(&connect_packet(&ident.id)).await?;
        tls.flush().await?;
        let mut buf = [0u8; 4];
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut buf)).await;
        // A DISCONNECT, then close.
        let _ = tls.write_all(&[0xe0, 0]).await;
        let _ = tls.shutdown().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(ResumptionProbe {
        resumed: kinds[1].contains("Resumed"),
        first: kinds[0].clone(),
        second: kinds[1].clone(),
        protocol,
        first_handshake_us: times[0],
        second_handshake_us: times[1],
    })
}

/// Human one-paragraph summary of a run report.
pub fn summary(r: &RunReport) -> String {
    let mut s = format!(
        "{}:{} MQTT {:?} QoS {} {} publishers, {} B, rate {} for {:.0} s\n",
        r.host,
        r.port,
        r.mqtt_version,
        r.qos,
        r.publishers,
        r.payload_bytes,
        if r.target_rate == 0 {
            "max".to_owned()
        } else {
            format!("{}/s", r.target_rate)
        },
        r.duration_s
    );
    s += &format!(
        "sent {} acked {} delivered {} lost {} duplicates {} foreign {} errors {}\n",
        r.sent, r.acked, r.delivered, r.lost, r.duplicates, r.foreign, r.publisher_errors
    );
    s += &format!(
        "delivered {:.0} msg/s (in window {:.0}); latency p50 {} us p90 {} us p99 {} us max {} us\n",
        r.delivered_per_s,
        r.delivered_per_s_in_window,
        r.latency.p50_us,
        r.latency.p90_us,
        r.latency.p99_us,
        r.latency.max_us
    );
    s += &format!(
        "connect mean {:.1} ms max {:.1} ms; broker cpu {:?} s ({:?} us/msg); loadgen cpu {:?} s; load {:.2} -> {:.2}",
        r.connect_ms_mean,
        r.connect_ms_max,
        r.broker_cpu_s,
        r.broker_cpu_us_per_msg,
        r.loadgen_cpu_s,
        r.loadavg_1m_start,
        r.loadavg_1m_end
    );
    s
}

/// Human summary of a connection report.
pub fn conn_summary(r: &ConnReport) -> String {
    let mut s = format!(
        "{}:{} {} x{} (concurrency {}): first connect {:.0} ms ({} ok)",
        r.host, r.port, r.mode, r.connections, r.concurrency, r.first_connect_ms, r.first_connected
    );
    if let Some(ms) = r.reconnect_ms {
        s += &format!("; reconnect {ms:.0} ms ({} ok)", r.reconnected.unwrap_or(0));
    }
    s += &format!("; retries {} failed {}", r.retries, r.failed);
    if let Some(k) = r.broker_kib_per_connection {
        s += &format!("; broker {k:.1} KiB/connection");
    }
    if let Some(p) = &r.tls_resumption {
        s += &format!(
            "; TLS resumption: {} ({} -> {})",
            p.resumed, p.first, p.second
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips() {
        let p = make_payload(150, 7, 42);
        assert_eq!(p.len(), 150);
        let (ts, publisher, seq) = parse_payload(&p).expect("header");
        assert!(ts <= now_ns());
        assert_eq!((publisher, seq), (7, 42));
        assert_eq!(make_payload(3, 0, 0).len(), HEADER_LEN);
    }

    #[test]
    fn connect_packet_is_well_formed() {
        let p = connect_packet("dev-00001");
        assert_eq!(p[0], 0x10);
        assert_eq!(usize::from(p[1]), p.len() - 2);
    }

    #[test]
    fn subscriber_counts_duplicates_and_foreign() {
        let mut s = SubState::new(2).expect("state");
        let a = make_payload(30, 1, 5);
        s.record(&a, true, 0, u64::MAX);
        s.record(&a, true, 0, u64::MAX);
        s.record(&make_payload(30, 9, 1), true, 0, u64::MAX);
        s.record(b"short", true, 0, u64::MAX);
        assert_eq!((s.delivered, s.duplicates, s.foreign), (1, 1, 2));
    }
}
