//! `vitalmq sim`: simulated wearables that sign realistic vitals, publish them over mTLS
//! and keep every message until a receipt covers it (see `vitalmq_device_sim::runner`).
//! Prints a ready line on stderr once every device is connected, and one JSON summary
//! line on stdout at the end.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use vitalmq_device_sim::device::DEFAULT_FW;
use vitalmq_device_sim::link::{LinkOptions, Schedule};
use vitalmq_device_sim::mqtt::{MqttVersion, Target};
use vitalmq_device_sim::runner::{self, EpisodeSpec, SimOptions, parse_duration};

#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Each device is one device identity of the PKI (the first N by id): client id = its id,
mTLS with its certificate, COSE_Sign1 messages signed with devices/<id>/cose.key.pem.
It publishes vitals QoS 1 to devices/<id>/telemetry (status to devices/<id>/status),
keeps every message in a bounded outbox until a receipt on devices/<id>/ack covers it,
and after every reconnect resends what is not covered, oldest first. Its epoch is kept
in <state>/<id>.epoch and advanced (durably) on every start and simulated reboot.

Episodes: desaturation, tachycardia, fever, motion, dropout, as KIND:DEVICE[@START]
(START after the simulation starts, default 10s), comma-separated or repeated.

Exit status: 0 when done (with --until-receipted: only if every message of every device
was receipted and none was dropped from a full outbox), 1 if not or if a device stopped
on an error (see its `error` in the summary), 2 if the run could not start.

Examples:
  vitalmq sim --pki pki --broker 127.0.0.1:8883 --state sim-state --devices 10 --rate 1
  vitalmq sim --pki pki --broker 127.0.0.1:8883 --state s --devices 2 --count 50 \\
      --rate 10 --episode desaturation:dev-00001@5s --until-receipted 30s")]
pub struct SimArgs {
    /// PKI directory made by `vitalmq certs init`.
    #[arg(long)]
    pki: PathBuf,
    /// Broker address, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    broker: String,
    /// Directory for the devices' epoch files (created if missing).
    #[arg(long)]
    state: PathBuf,
    /// Number of devices: the first N device identities of the PKI.
    #[arg(long, default_value_t = 1)]
    devices: usize,
    /// Vitals messages per device, then stop generating.
    #[arg(long, value_name = "M")]
    count: Option<u64>,
    /// Vitals messages per second per device.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Stop generating after this long (e.g. 30s, 5m).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Scripted episodes, KIND:DEVICE[@START].
    #[arg(
        long = "episode",
        value_delimiter = ',',
        value_name = "KIND:DEVICE[@START]"
    )]
    episodes: Vec<EpisodeSpec>,
    /// After generating, run until every message is receipted, at most this long.
    #[arg(long = "until-receipted", value_name = "TIMEOUT", value_parser = parse_duration)]
    until_receipted: Option<Duration>,
    /// A status message per device this often (0 = none).
    #[arg(long = "status-every", default_value = "60s", value_parser = parse_duration)]
    status_every: Duration,
    /// Simulate a reboot (new epoch, connection dropped, outbox kept) every N vitals.
    #[arg(long = "reboot-every", value_name = "N")]
    reboot_every: Option<u64>,
    /// Most messages a second per device when catching up (resends included).
    #[arg(long = "resend-rate", default_value_t = 40.0)]
    resend_rate: f64,
    /// Resend the backlog when no receipt came for this long while messages wait.
    #[arg(long = "resend-after", default_value = "10s", value_parser = parse_duration)]
    resend_after: Duration,
    /// Longest pause between reconnect attempts.
    #[arg(long = "backoff-max", default_value = "5s", value_parser = parse_duration)]
    backoff_max: Duration,
    /// MQTT version: 3.1.1 or 5.
    #[arg(long = "mqtt-version", default_value = "3.1.1")]
    mqtt_version: MqttVersion,
    /// Seed of the vitals model (same seed, same readings).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Firmware version the devices report.
    #[arg(long, default_value = DEFAULT_FW)]
    fw: String,
}

pub fn run(args: SimArgs) -> anyhow::Result<ExitCode> {
    let (host, port) = args
        .broker
        .rsplit_once(':')
        .context("--broker: expected HOST:PORT")?;
    let port: u16 = port.parse().context("--broker: bad port")?;
    let target = Target {
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
        version: args.mqtt_version,
    };
    let mut link = LinkOptions::new(target.clone());
    // Catching up must at least keep pace with generation.
    link.send_rate = args.resend_rate.max(args.rate);
    link.resend_after = args.resend_after;
    link.backoff_max = args.backoff_max;
    let until_receipted = args.until_receipted.is_some();
    let opts = SimOptions {
        pki: args.pki,
        state: args.state,
        devices: args.devices,
        seed: args.seed,
        fw: args.fw,
        episodes: args.episodes,
        link,
        schedule: Schedule {
            rate: args.rate,
            count: args.count,
            duration: args.duration,
            status_every: (!args.status_every.is_zero()).then_some(args.status_every),
            reboot_every: args.reboot_every,
            until_receipted: args.until_receipted,
            drain: Duration::from_secs(5),
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let summary = runtime.block_on(async {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::info!("interrupted; stopping the devices");
                let _ = stop_tx.send(true);
            }
        });
        runner::run(opts, stop_rx, move |n| {
            eprintln!(
                "vitalmq sim: {n} devices connected to {}:{}",
                target.host, target.port
            );
        })
        .await
    })?;
    runtime.shutdown_timeout(Duration::from_secs(2));
    println!("{}", serde_json::to_string(&summary)?);
    let ok = summary.totals.errors == 0 && (!until_receipted || summary.all_receipted);
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
