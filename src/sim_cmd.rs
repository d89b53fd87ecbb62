//! `vitalmq sim`: simulated wearables that sign realistic vitals, publish them over mTLS
//! and keep every message until a receipt covers it (see `vitalmq_device_sim::runner`;
//! load mode is `vitalmq_loadgen::sim_load`).
//! Prints a ready line on stderr once every device is connected, and one JSON summary
//! line on stdout at the end. In load mode (`--aggregate-rate`, `--latency-report`) it
//! also times every message to the bridge's receipt and to the alert topics, writes the
//! JSON report and prints a human summary on stderr.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use vitalmq_device_sim::alarms::AlarmEpisodeSpec;
use vitalmq_device_sim::battery::{Battery, DEFAULT_BATTERY_DRAIN_PER_HOUR, DEFAULT_BATTERY_START};
use vitalmq_device_sim::device::DEFAULT_FW;
use vitalmq_device_sim::faults::{FaultSpec, Scope};
use vitalmq_device_sim::link::{LinkOptions, Schedule};
use vitalmq_device_sim::modes::{SilentSpec, parse_scope};
use vitalmq_device_sim::runner::{self, Control, EpisodeSpec, SimOptions, parse_duration};
use vitalmq_loadgen::latency::Recorder;
use vitalmq_loadgen::load_report::{LoadReport, LoadSetup};
use vitalmq_loadgen::process::{proc_sample, rss_peak_kib};
use vitalmq_loadgen::sim_load::{self, LoadOptions};
use vitalmq_mqtt_client::{MqttVersion, Target};

/// How long the alert watchers keep listening after the devices finished.
const ALERT_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Each device is one device identity of the PKI (the first N by id): client id = its id,
mTLS with its certificate, COSE_Sign1 messages signed with devices/<id>/cose.key.pem.
It publishes vitals QoS 1 to devices/<id>/telemetry (status to devices/<id>/status),
keeps every message in a bounded outbox until a receipt on devices/<id>/ack covers it,
and after every reconnect resends what is not covered, oldest first. Its epoch is kept
in <state>/<id>.epoch and advanced (durably) on every start and simulated reboot.

Episodes: desaturation, tachycardia, fever, motion, dropout, as KIND:DEVICE[@START]
(START in device time after the simulation starts, default 10s), comma-separated or
repeated. --time-scale X runs the device clock (ts) and the vitals model X times faster
than the wall clock; rates, --duration and fault times stay wall-clock.

Faults, as KIND[=ARG]:DEVICE[@AT] (AT wall-clock after the start, default 5s; DEVICE may
be `all`), comma-separated or repeated; each is accounted in the device's `faults`:
  duplicate[=N]            resend a copy of a receipted message       bridge: duplicate
  replay[=N]               reboot, then send an old-epoch copy        bridge: replay
  out-of-order[=N]         send two consecutive messages swapped      accepted late
  bad-signature[=N]        a copy with one signature bit flipped      bridge: bad_signature
  wrong-topic[=DEV]        a copy on DEV's topic (default: next)      broker ACL: 0x87 / close
  foreign-client-id[=DEV]  a 2nd connection claiming DEV's client id  broker: CONNACK refused
  revoked-certificate      revoke its certificate in --pki at AT      broker: TLS handshake
  clock-skew[=OFFSET]      offset ts, e.g. =-2m (default +5m)         accepted (no ts rule)
  reboot-storm[=N]         N reboots half a second apart (default 5)  accepted
  reconnect-storm[=N]      drop the connection and reconnect at once  accepted
Device alarms (SPEC 3.1), as DEVICE:CODE:LEVEL[:at=START][:for=DURATION|never][:model=NAME]
(LEVEL info, review or urgent; START in device time like the episodes, default 10s;
cleared after --for, default 60s, or never), comma-separated or repeated, e.g.
  --alarm-episode dev-00001:arrhythmia:urgent:at=20s:for=30s
The device sends an `alarm` message (active true, `model` default arrhythmia-net/2.1.0)
at START and one with active false at START + DURATION, on its telemetry topic, each
with the next seq like any message. Every status message carries `dropped`, `battery`
(--battery at the start, minus --battery-drain per hour of device time; devices listed
in --charging report charging true and charge up), `charging` and `interval_s` (the
vitals interval in whole seconds, at least 1).

Modes for alerting tests (not with --via-gateway):
  --silent-after DURATION | DEVICE@DURATION   from then on (wall-clock after the start)
      the device publishes nothing more (no vitals, status, alarms, resends, faults) but
      stays connected and answers keepalive until the run ends; with --count it needs
      --duration, since a silent device never reaches its count.
  --forged-only DEVICE|all   every message the device makes is signed with a random key
      of its own algorithm: the bridge refuses each as bad_signature. Its messages still
      take their seq and wait in the outbox (never receipted; they may overflow it).
      Its summary entry says `forged_only: true` and the run's all_receipted (and the
      exit status of --until-receipted) leaves it out: exclude such devices from any
      `stored exactly once` accounting, none of their messages is stored.

For wrong-topic under MQTT 3.1.1 the shipped ACL closes the connection; list the device
in --mqtt5 to see PUBACK 0x87 instead. revoked-certificate needs the broker to reload
its CRL (it does when it watches its files, or on SIGHUP).

Exit status: 0 when done (with --until-receipted: only if every message of every device
was receipted and none was dropped from a full outbox), 1 if not or if a device stopped
on an error (see its `error` in the summary), 2 if the run could not start.

Examples:
  vitalmq sim --pki pki --broker 127.0.0.1:8883 --state sim-state --devices 10 --rate 1
  vitalmq sim --pki pki --broker 127.0.0.1:8883 --state s --devices 2 --count 50 \\
      --rate 10 --episode desaturation:dev-00001@5s --until-receipted 30s
  vitalmq sim --pki pki --broker 127.0.0.1:8883 --state s --devices 4 --duration 30s \
      --rate 2 --fault duplicate:dev-00002,bad-signature:dev-00003@8s --time-scale 30

Gateways (--via-gateway): the devices do not connect. For each site of the registry
(<pki>/registry.toml) that has simulated devices, one connection with the site's gateway
identity (identities/gateway/gw-<site>.pem, client id gw-<site>) publishes the devices'
messages, still signed with each device's own COSE key, to devices/<id>/telemetry, and
subscribes to devices/<id>/ack for each of them (one filter per device), routing every
receipt to its device's outbox. After a gateway reconnect each device's unreceipted
messages are resent oldest first. Each device in the summary names its `gateway`;
`gateways` lists them. --fault and --mqtt5 are not available with --via-gateway.

Load mode (--aggregate-rate R and/or --latency-report FILE): thousands of devices at a
set aggregate rate, with publish-to-receive latency measured per message.
  * Each device makes R / N vitals a second (N = --devices); device i of N starts i/N of
    a period late, so the broker and bridge see a steady R a second, not N messages at
    every tick.
  * --connect-rate C paces the first connections to C a second. The gate limits new
    connections per source address (broker config [tls] per_ip_per_second and
    per_ip_burst: 200/s with a burst of 1000 in broker/examples/broker.toml, 20/s and 50
    by default); everything here comes from one address, so stay below it, or raise it
    for a benchmark. Devices generate from time zero whether connected or not, but
    latency counts from the first PUBLISH, so waiting to connect is not in it.
  * To the bridge: for every message, first PUBLISH -> the first receipt on
    devices/<id>/ack covering it. The bridge sends receipts only after the durable commit
    and coalesces them every receipt_interval_ms, so up to one interval of the figure is
    deliberate; pass that interval as --receipt-interval to have it in the report.
  * To the alert topics: per site of the simulated devices, the site's integrator
    identity (identities/integrator/<id>, bound to the site in <pki>/registry.toml)
    subscribes to alerts/<site>/# before any device starts. For each alert received, its
    newest evidence event id (SPEC section 5) is matched to the device's recent publishes
    (event id = hash of device, epoch, seq, as the bridge computes it): latency =
    receive time - first PUBLISH of that message. Alerts need a bridge with [alerts]
    configured and something to alert on, e.g. --episode desaturation:dev-00001.
  * The report (JSON, format vitalmq-sim-load/v1) has the setup, the time until all
    devices were connected, messages made / sent / resent / receipted / lost, receipts,
    p50/p90/p99/p99.9/max/mean in microseconds for both latencies, alerts by state,
    this process's RSS; a summary goes to stderr. Latencies are kept in HDR histograms
    and per device a fixed ring of the last 256 publish times, so memory stays bounded.
  * Not with --via-gateway. A device holds about 110 KB (its 256-message outbox), and one
    connection each: check `ulimit -n` for thousands of devices.

  vitalmq sim --pki pki --broker 127.0.0.1:8883 --state s --devices 3000 \
      --aggregate-rate 1000 --duration 60s --connect-rate 150 --until-receipted 60s \
      --receipt-interval 250ms --latency-report load.json

Ctrl-C stops generating and finishes as at the end of the schedule; a second Ctrl-C
stops at once.")]
#[command(group = clap::ArgGroup::new("load").multiple(true).args(["aggregate_rate", "latency_report"]))]
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
    #[arg(long, default_value_t = 1.0, conflicts_with = "aggregate_rate")]
    rate: f64,
    /// Load mode: vitals messages per second over all devices (each makes R / N).
    #[arg(long = "aggregate-rate", value_name = "R")]
    aggregate_rate: Option<f64>,
    /// Load mode: write the latency report (JSON) here.
    #[arg(long = "latency-report", value_name = "FILE")]
    latency_report: Option<PathBuf>,
    /// Load mode: first connections per second at start-up (default: all at once).
    #[arg(long = "connect-rate", value_name = "C", requires = "load")]
    connect_rate: Option<f64>,
    /// Load mode: the bridge's receipt interval, recorded in the report beside the
    /// figures it bounds (e.g. 250ms).
    #[arg(long = "receipt-interval", value_name = "DURATION", value_parser = parse_duration, requires = "load")]
    receipt_interval: Option<Duration>,
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
    /// Alarms, battery, silent and forged-only devices (boxed: `Command` stays small).
    #[command(flatten)]
    behaviour: Box<Behaviour>,
    /// Faults to inject, KIND[=ARG]:DEVICE[@AT] (see below).
    #[arg(
        long = "fault",
        value_delimiter = ',',
        value_name = "KIND[=ARG]:DEVICE[@AT]"
    )]
    faults: Vec<FaultSpec>,
    /// Devices that use MQTT 5 whatever --mqtt-version says.
    #[arg(long = "mqtt5", value_delimiter = ',', value_name = "DEVICE")]
    mqtt5: Vec<String>,
    /// Run the device clock and the vitals model this many times faster than real time.
    #[arg(long = "time-scale", default_value_t = 1.0, value_name = "X")]
    time_scale: f64,
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
    /// Devices do not connect themselves: per site, one connection with the site's
    /// gateway identity relays their signed messages and routes back their receipts.
    #[arg(long = "via-gateway", alias = "gateways")]
    via_gateway: bool,
}

/// What the devices do besides vitals (issue 17).
#[derive(Debug, clap::Args)]
struct Behaviour {
    /// Scripted device alarms, DEVICE:CODE:LEVEL[:at=START][:for=DURATION|never][:model=NAME]
    /// (see below).
    #[arg(
        long = "alarm-episode",
        value_delimiter = ',',
        value_name = "DEVICE:CODE:LEVEL[:at=START][:for=DURATION]"
    )]
    alarm_episodes: Vec<AlarmEpisodeSpec>,
    /// Battery charge at the start, 0..1, reported in every status.
    #[arg(long, default_value_t = DEFAULT_BATTERY_START, value_name = "CHARGE")]
    battery: f64,
    /// Battery used per hour of device time (a fraction of a full charge).
    #[arg(long = "battery-drain", default_value_t = DEFAULT_BATTERY_DRAIN_PER_HOUR, value_name = "PER_HOUR")]
    battery_drain: f64,
    /// Devices on external power (`charging` true), or `all`.
    #[arg(long, value_delimiter = ',', value_name = "DEVICE", value_parser = parse_scope)]
    charging: Vec<Scope>,
    /// The model a device reports on vitals and alarms, DEVICE=NAME/VERSION (or
    /// all=NAME/VERSION); repeatable, the first that names a device wins. E.g.
    /// `--device-model dev-00003=arrhythmia-net/2.2.0-rc1`.
    #[arg(long = "device-model", value_name = "DEVICE=MODEL", value_parser = parse_device_model)]
    device_model: Vec<(Scope, String)>,
    /// Devices that stop publishing but stay connected, DURATION (all) or DEVICE@DURATION.
    #[arg(
        long = "silent-after",
        value_delimiter = ',',
        value_name = "[DEVICE@]DURATION"
    )]
    silent_after: Vec<SilentSpec>,
    /// Devices whose every message is signed with a wrong key, or `all`.
    #[arg(long = "forged-only", value_delimiter = ',', value_name = "DEVICE", value_parser = parse_scope)]
    forged_only: Vec<Scope>,
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
    link.resend_after = args.resend_after;
    link.backoff_max = args.backoff_max;
    let until_receipted = args.until_receipted.is_some();
    let load_mode = args.aggregate_rate.is_some() || args.latency_report.is_some();
    let rate = match args.aggregate_rate {
        Some(r) if !(r.is_finite() && r > 0.0) => {
            anyhow::bail!("--aggregate-rate must be a positive number of messages per second")
        }
        Some(r) => r / args.devices.max(1) as f64,
        None => args.rate,
    };
    // Catching up must at least keep pace with generation.
    link.send_rate = args.resend_rate.max(rate);
    let schedule = Schedule {
        rate,
        count: args.count,
        duration: args.duration,
        status_every: (!args.status_every.is_zero()).then_some(args.status_every),
        reboot_every: args.reboot_every,
        until_receipted: args.until_receipted,
        drain: Duration::from_secs(5),
        time_scale: args.time_scale,
    };
    let recorder = Arc::new(Recorder::new());
    let setup = LoadSetup {
        devices: args.devices,
        aggregate_rate: args.aggregate_rate.unwrap_or(rate * args.devices as f64),
        per_device_rate: rate,
        connect_rate: args.connect_rate,
        time_scale: args.time_scale,
        duration_s: args.duration.map(|d| d.as_secs_f64()),
        receipt_interval_ms: args
            .receipt_interval
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    };
    let load = load_mode.then(|| LoadOptions {
        connect_rate: args.connect_rate,
        recorder: Arc::clone(&recorder),
        alert_grace: ALERT_GRACE,
        watch_timeout: Duration::from_secs(30),
    });
    let opts = SimOptions {
        seed: args.seed,
        fw: args.fw,
        episodes: args.episodes,
        alarm_episodes: args.behaviour.alarm_episodes,
        battery: Battery {
            start: args.behaviour.battery,
            drain_per_hour: args.behaviour.battery_drain,
            charging: false,
        },
        charging: args.behaviour.charging,
        silent: args.behaviour.silent_after,
        forged_only: args.behaviour.forged_only,
        device_models: args.behaviour.device_model,
        faults: args.faults,
        mqtt5: args.mqtt5,
        via_gateway: args.via_gateway,
        ..SimOptions::new(args.pki, args.state, args.devices, link, schedule)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let (summary, observed) = runtime.block_on(async {
        let (control_tx, control_rx) = tokio::sync::watch::channel(Control::Run);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::info!("interrupted; finishing (Ctrl-C again stops at once)");
                let _ = control_tx.send(Control::Finish);
            }
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::info!("interrupted again; stopping the devices");
                let _ = control_tx.send(Control::Stop);
            }
        });
        let on_ready = move |n| {
            eprintln!(
                "vitalmq sim: {n} devices connected to {}:{}",
                target.host, target.port
            );
        };
        anyhow::Ok(match &load {
            Some(load) => {
                let (summary, observed) = sim_load::run(opts, load, control_rx, on_ready).await?;
                (summary, Some(observed))
            }
            None => (runner::run(opts, control_rx, on_ready).await?, None),
        })
    })?;
    runtime.shutdown_timeout(Duration::from_secs(2));
    if let Some(observed) = observed {
        let rss_end = proc_sample(None).map(|p| p.rss_kib);
        let report = LoadReport::new(
            setup,
            &summary,
            observed,
            recorder.snapshot(),
            rss_end,
            rss_peak_kib(),
        );
        if let Some(path) = &args.latency_report {
            std::fs::write(
                path,
                format!("{}\n", serde_json::to_string_pretty(&report)?),
            )
            .with_context(|| format!("--latency-report {}", path.display()))?;
        }
        eprintln!("{}", report.human());
    }
    println!("{}", serde_json::to_string(&summary)?);
    let ok = summary.totals.errors == 0 && (!until_receipted || summary.all_receipted);
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `DEVICE=NAME/VERSION` (or `all=NAME/VERSION`) of `--device-model`.
fn parse_device_model(s: &str) -> Result<(Scope, String), String> {
    let (scope, model) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected DEVICE=NAME/VERSION"))?;
    let valid = model
        .split_once('/')
        .is_some_and(|(n, v)| !n.is_empty() && !v.is_empty())
        && model.len() <= 129
        && model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
    if !valid {
        return Err(format!(
            "`{model}`: expected NAME/VERSION, e.g. arrhythmia-net/2.1.0"
        ));
    }
    Ok((
        parse_scope(scope).map_err(|e| e.to_string())?,
        model.to_owned(),
    ))
}
