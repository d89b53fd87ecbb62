//! `vitalmq loadgen`: drives a broker over mTLS with device identities from a PKI made by
//! `vitalmq certs init` and reports throughput, latency, losses, connect and reconnect
//! times as JSON (see `vitalmq_loadgen::broker`); with `--signed`, drives a bridge
//! with pre-signed telemetry (see `vitalmq_loadgen::signed`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use vitalmq_loadgen::broker::{self as loadgen, ConnOptions, MqttVersion, Pki, RunOptions, Target};
use vitalmq_loadgen::signed::{self, AlgFilter, SignedOptions};

#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Modes:
  (default)              N publishers (device identities, client id = device id, topic
                         devices/{id}/telemetry) and one subscriber (bridge identity) on
                         --subscriber-filter; reports sent, delivered, lost, duplicates,
                         delivered msg/s and publish->receive latency.
  --reconnect-storm N    N device identities connect (--concurrency at a time), all drop
                         their TCP connection at once and reconnect; reports the time until
                         every one has its CONNACK again, and whether TLS sessions resume.
  --idle N               N device identities connect and stay idle for --hold seconds
                         (with --broker-pid: broker RSS per connection).
  --signed               N publishers (device identities whose COSE key is --alg) publish
                         --messages pre-signed COSE_Sign1 vitals in total (epoch --epoch,
                         seq 0..) at QoS 1, each subscribed to its devices/{id}/ack; a
                         message counts when a bridge receipt covers it (recorded, or
                         reported lost: compare with the bridge's store). Reports the
                         receipted rate and broker/bridge CPU (--bridge-pid).
  --verify-reference S   One-core verification rates (bare ed25519-dalek verify_strict /
                         ring P-256, the bridge's own AWS-LC signature check, and the
                         full envelope verify) of a message from the PKI: 3 rounds of S
                         seconds per measurement, the best round kept.

Examples:
  vitalmq loadgen --pki pki --port 8883 --publishers 10 --rate 0 --duration 20 --report r.json
  vitalmq loadgen --pki pki --port 8883 --rate 10000 --duration 30 --broker-pid $PID
  vitalmq loadgen --pki pki --port 8883 --reconnect-storm 10000 --concurrency 512
  vitalmq loadgen --pki pki --port 8883 --signed --alg eddsa --publishers 100 --messages 50000
  vitalmq loadgen --pki pki --verify-reference 2")]
pub struct LoadgenArgs {
    /// PKI directory made by `vitalmq certs init` (identities/device/*.pem, bridge, CA).
    #[arg(long)]
    pki: PathBuf,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8883)]
    port: u16,
    /// MQTT version: 3.1.1 or 5.
    #[arg(long = "mqtt-version", default_value = "3.1.1")]
    mqtt_version: MqttVersion,
    /// Number of publishers (device identities dev-00001..).
    #[arg(long, default_value_t = 10)]
    publishers: usize,
    /// Target aggregate rate in messages per second (0 = as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Publishing time in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds at the start left out of the latency histogram.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Longest wait after publishing for acknowledgements and deliveries, seconds.
    #[arg(long, default_value_t = 15.0)]
    drain: f64,
    /// QoS of publishes and of the subscription: 0 or 1 (QoS 2 is not measured).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// Payload size in bytes (at least 20: timestamp, publisher, sequence).
    #[arg(long = "payload-size", default_value_t = 150)]
    payload_size: usize,
    /// The subscriber's filter.
    #[arg(long = "subscriber-filter", default_value = "devices/+/telemetry")]
    subscriber_filter: String,
    /// Bridge identity for the subscriber (default: the first in the PKI).
    #[arg(long = "subscriber-id")]
    subscriber_id: Option<String>,
    /// Reconnect-storm mode with N identities.
    #[arg(long = "reconnect-storm", value_name = "N", conflicts_with = "idle")]
    reconnect_storm: Option<usize>,
    /// Idle-connections mode with N identities.
    #[arg(long, value_name = "N", conflicts_with = "signed")]
    idle: Option<usize>,
    /// Signed mode: pre-signed telemetry for a bridge, counted by its receipts.
    #[arg(long, conflicts_with = "reconnect_storm")]
    signed: bool,
    /// Signed mode: devices whose COSE key is eddsa, es256, or any.
    #[arg(long, default_value = "any", requires = "signed")]
    alg: AlgFilter,
    /// Signed mode: messages in total, spread evenly over the publishers.
    #[arg(long, default_value_t = 10_000, requires = "signed")]
    messages: u64,
    /// Signed mode: most messages per publisher without a receipt (0 = no limit).
    #[arg(long, default_value_t = 0, requires = "signed")]
    window: u64,
    /// Signed mode: the devices' epoch (a bridge refuses an epoch it has seen end).
    #[arg(long, default_value_t = 1, requires = "signed")]
    epoch: u64,
    /// Signed mode: the bridge process id, sampled like --broker-pid.
    #[arg(long = "bridge-pid", requires = "signed")]
    bridge_pid: Option<u32>,
    /// Time one-core verification (best of 3 rounds of S seconds each) and exit.
    #[arg(long = "verify-reference", value_name = "S", conflicts_with_all = ["signed", "idle", "reconnect_storm"])]
    verify_reference: Option<f64>,
    /// Connections being set up at once (storm and idle modes).
    #[arg(long, default_value_t = 512)]
    concurrency: usize,
    /// Seconds to hold connections after they are up (idle and storm modes).
    #[arg(long, default_value_t = 0.0)]
    hold: f64,
    /// Longest time per connect phase, seconds (storm and idle modes); in signed mode,
    /// from the first publish until every message is receipted.
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
    /// Broker process id: its CPU time and RSS are sampled from /proc.
    #[arg(long = "broker-pid")]
    broker_pid: Option<u32>,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
}

fn secs(s: f64, what: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("--{what}: not a duration"))
}

pub fn run(args: LoadgenArgs) -> anyhow::Result<std::process::ExitCode> {
    let pki = Pki::open(&args.pki)?;
    let target = Target {
        host: args.host.clone(),
        port: args.port,
        version: args.mqtt_version,
    };
    if let Some(seconds) = args.verify_reference {
        let report = signed::verify_reference(&pki, seconds)?;
        let json = serde_json::to_string_pretty(&report)?;
        if let Some(path) = &args.report {
            std::fs::write(path, format!("{json}\n"))
                .with_context(|| format!("{}", path.display()))?;
        }
        println!("{json}");
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let (json, text) = if args.signed {
        let opts = SignedOptions {
            target,
            publishers: args.publishers,
            alg: args.alg,
            messages: args.messages,
            rate: args.rate,
            window: args.window,
            epoch: args.epoch,
            timeout: secs(args.timeout, "timeout")?,
            broker_pid: args.broker_pid,
            bridge_pid: args.bridge_pid,
        };
        let report = runtime.block_on(signed::run(&pki, &opts))?;
        (
            serde_json::to_string_pretty(&report)?,
            signed::summary(&report),
        )
    } else if let Some(n) = args.reconnect_storm.or(args.idle) {
        let opts = ConnOptions {
            target,
            connections: n,
            concurrency: args.concurrency,
            timeout: secs(args.timeout, "timeout")?,
            hold: secs(args.hold, "hold")?,
            broker_pid: args.broker_pid,
        };
        let storm = args.reconnect_storm.is_some();
        let report = runtime.block_on(loadgen::connections(&pki, &opts, storm))?;
        (
            serde_json::to_string_pretty(&report)?,
            loadgen::conn_summary(&report),
        )
    } else {
        let opts = RunOptions {
            target,
            publishers: args.publishers,
            rate: args.rate,
            duration: secs(args.duration, "duration")?,
            qos: args.qos,
            payload_bytes: args.payload_size,
            subscriber_filter: args.subscriber_filter.clone(),
            subscriber_id: args.subscriber_id.clone(),
            drain: secs(args.drain, "drain")?,
            broker_pid: args.broker_pid,
            warmup: secs(args.warmup, "warmup")?,
        };
        let report = runtime.block_on(loadgen::run(&pki, &opts))?;
        (
            serde_json::to_string_pretty(&report)?,
            loadgen::summary(&report),
        )
    };
    runtime.shutdown_timeout(Duration::from_secs(2));
    if let Some(path) = &args.report {
        std::fs::write(path, format!("{json}\n")).with_context(|| format!("{}", path.display()))?;
    }
    println!("{text}");
    Ok(std::process::ExitCode::SUCCESS)
}
