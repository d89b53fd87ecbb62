//! `vitalmq demo`: the whole system in one process, on an embedded default.
//!
//! It creates a work directory with a dev PKI ([`setup`]), starts the broker gate on a
//! free port of 127.0.0.1 with the shipped ACL, the bridge with its store and a local
//! object sink, an operator's subscription to `alerts/#` and `ops/#` ([`operator`]), and
//! a fleet of simulated wearables on two sites with one scripted clinical episode, a
//! device alarm (which the operator acknowledges), a device that goes silent (and is
//! not acknowledged, so its alert is re-sent escalated) and a set of injected faults. While it runs it prints a progress line ([`progress`]) and
//! every alert as it arrives; after `--duration` (or Ctrl-C) it stops the devices (they
//! send what they hold and wait for receipts), then the bridge, then the broker, and
//! checks what happened ([`report`]): every device connected, every fault refused by
//! the party and with the reason the SPEC gives, nothing lost, every alert path taken
//! (alarm, silence, acknowledgement, re-escalation), audit chains intact. Then the data
//! lifecycle step ([`lifecycle`]): encryption at rest, backup, legal hold, erasure,
//! export and retention, each checked.
//! Logs go to `demo.log` in the work directory ([`log`]).

mod admin;
mod governance;
mod lifecycle;
mod log;
mod operator;
mod progress;
mod report;
mod setup;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use tokio::sync::{mpsc, watch};
use vitalmq_bridge::BridgeConfig;
use vitalmq_broker::{Broker, BrokerConfig};
use vitalmq_device_sim::faults::{FaultSpec, Scope};
use vitalmq_device_sim::link::{LinkOptions, Schedule};
use vitalmq_device_sim::runner::{self, Control, LiveCounts, SimOptions, Summary, parse_duration};
use vitalmq_mqtt_client::{MqttVersion, Target};

use self::operator::{AckSent, AlertSeen, Note, OperatorView};
use self::progress::Progress;
use self::report::{AuditLog, Check, Evidence, StoreView};
use self::setup::{AlertTimes, WorkDir};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Work directory (must be new or empty); defaults to `vitalmq-demo/run-<time>`.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Number of simulated devices (at least 14: the scenario uses devices 1 to 13 and
    /// the last one).
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u32).range(i64::from(setup::MIN_DEVICES)..=5000))]
    devices: u32,
    /// Number of sites the devices are spread over.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100))]
    sites: u32,
    /// How long the devices generate (at least 15s); Ctrl-C stops earlier.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Run the device clock and the vitals model this many times faster than real time
    /// (at 30, the 4-minute desaturation episode plays in 8 seconds).
    #[arg(long = "time-scale", default_value_t = 30.0, value_name = "X")]
    time_scale: f64,
    /// Vitals messages per second per device.
    #[arg(long, default_value_t = 2.0)]
    rate: f64,
}

/// How long devices may take, after generating, for their last receipts.
const UNTIL_RECEIPTED: Duration = Duration::from_secs(20);

pub fn run(args: DemoArgs, log_format: crate::log_format::LogFormat) -> anyhow::Result<ExitCode> {
    if args.duration < setup::MIN_DURATION {
        bail!(
            "--duration: at least {} s (the scenario needs the time)",
            setup::MIN_DURATION.as_secs()
        );
    }
    if !(args.time_scale.is_finite() && args.time_scale > 0.0) {
        bail!("--time-scale must be a positive number");
    }
    if !(args.rate.is_finite() && args.rate > 0.0 && args.rate <= 20.0) {
        bail!("--rate must be between 0 and 20 messages per second");
    }
    let now_s = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("vitalmq-demo/run-{now_s}")));
    let (work, pki) = setup::create(
        &dir,
        args.devices,
        args.sites,
        args.duration,
        args.duration.mul_f64(args.time_scale),
    )?;
    let bridge_ready = log::init(&work.log(), log_format)?;
    println!(
        "vitalmq demo: {} simulated wearables on {} sites, through the broker gate and the bridge\n",
        args.devices, args.sites
    );
    println!("  work dir  {}", work.root.display());
    println!(
        "  PKI       {} devices ({} ES256, the rest Ed25519) on {} sites, {} identity certificates, trust domain {}",
        pki.devices,
        pki.es256_devices,
        pki.sites,
        pki.identities,
        setup::TRUST_DOMAIN
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let code = runtime.block_on(demo(&args, &work, bridge_ready))?;
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(code)
}

/// Everything started, in the order it must stop in reverse.
async fn demo(
    args: &DemoArgs,
    work: &WorkDir,
    mut bridge_ready: watch::Receiver<bool>,
) -> anyhow::Result<ExitCode> {
    let broker_config = BrokerConfig::load(&work.broker_config())?;
    let broker = Broker::start(broker_config).await.with_context(|| {
        format!(
            "starting the broker from {}",
            work.broker_config().display()
        )
    })?;
    let port = broker.local_addr().port();
    println!(
        "  broker    mTLS on 127.0.0.1:{port}, shipped ACL {}, audit {}",
        work.acl().display(),
        work.broker_audit().display()
    );

    std::fs::write(work.bridge_config(), setup::bridge_config_toml(port))
        .with_context(|| format!("writing {}", work.bridge_config().display()))?;
    let bridge_config = BridgeConfig::load(&work.bridge_config())?;
    let (bridge_stop, bridge_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut bridge = tokio::spawn(vitalmq_bridge::run(bridge_config, async {
        let _ = bridge_stopped.await;
    }));
    tokio::select! {
        ready = tokio::time::timeout(Duration::from_secs(30), bridge_ready.wait_for(|r| *r)) => {
            if !matches!(ready, Ok(Ok(_))) {
                bail!("the bridge did not subscribe within 30 s (see {})", work.log().display());
            }
        }
        ended = &mut bridge => bail!("the bridge stopped at start: {:?}", ended.map(|r| r.map_err(|e| format!("{e:#}")))),
    }
    println!(
        "  bridge    subscribed; store, quarantine and audit in {}, objects in {}",
        work.bridge_data().display(),
        work.objects().display()
    );
    let mut view = OperatorView::start(&work.pki(), port).await?;
    println!(
        "  operator  {} watching {}",
        operator::OPERATOR,
        operator::FILTERS.join(" and ")
    );

    let (sim_opts, live, mut revoked) = sim_options(args, work, port)?;
    describe_scenario(args, &sim_opts);
    let (control, control_rx) = watch::channel(Control::Run);
    let devices = args.devices as usize;
    let device_clock = governance::DeviceClock::starting_now(args.time_scale)?;
    let mut changes = governance::Changes::default();
    let withdraw_due = tokio::time::sleep(args.duration.mul_f64(0.3));
    let reassign_due = tokio::time::sleep(args.duration.mul_f64(0.45));
    tokio::pin!(withdraw_due, reassign_due);
    let (mut withdraw_tried, mut reassign_tried) = (false, false);
    let connected = Arc::clone(&live);
    let sim_started = tokio::time::Instant::now();
    let mut stopped_at = args.duration;
    let mut sim = tokio::spawn(runner::run(sim_opts.clone(), control_rx, move |_| {
        println!(
            "  {}/{devices} devices connected and subscribed to their receipts",
            connected.connected()
        );
    }));

    let mut progress = Progress::open(&work.bridge_data())?;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.tick().await;
    let deadline = tokio::time::sleep(args.duration);
    tokio::pin!(deadline);
    let (interrupt_tx, mut interrupts) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            if interrupt_tx.send(()).is_err() {
                return;
            }
        }
    });
    let mut alerts: Vec<AlertSeen> = Vec::new();
    let mut ack: Option<AckSent> = None;
    let mut finishing = false;
    let summary: Summary = loop {
        tokio::select! {
            done = &mut sim => break done.context("the simulator")??,
            () = &mut deadline, if !finishing => {
                finishing = true;
                println!("  {} s: devices stop generating, send what they hold and wait for their receipts", args.duration.as_secs());
            }
            Some(()) = interrupts.recv() => {
                if finishing {
                    println!("  interrupted again: stopping the devices at once");
                    let _ = control.send(Control::Stop);
                } else {
                    finishing = true;
                    stopped_at = sim_started.elapsed();
                    println!("  interrupted: devices stop generating, send what they hold and wait for their receipts (Ctrl-C again stops at once)");
                    let _ = control.send(Control::Finish);
                }
            }
            () = &mut withdraw_due, if !withdraw_tried && !finishing => {
                withdraw_tried = true;
                match governance::withdraw(work, &device_clock) {
                    Ok(at) => {
                        changes.withdrawn_at = Some(at);
                        println!("  research consent for {} withdrawn from {} (device time); the bridge reloads the registry by itself", governance::WITHDRAWN_DEVICE, vitalmq_policies::format_rfc3339(at));
                    }
                    Err(e) => println!("  withdrawing research consent failed: {e:#}"),
                }
            }
            () = &mut reassign_due, if !reassign_tried && !finishing => {
                reassign_tried = true;
                // Effective when the reconnect storm starts: what the devices still hold
                // then arrives after the change, observed before it.
                match governance::reassign(work, &device_clock, args.duration.mul_f64(0.15)) {
                    Ok(r) => {
                        println!("  {} reassigned from {} to {} from {} (device time)", governance::REASSIGNED_DEVICE, r.previous_patient, governance::NEW_PATIENT, vitalmq_policies::format_rfc3339(r.at));
                        if let Err(e) = broker.reload().await {
                            println!("  the broker did not reload the registry: {e}");
                        }
                        changes.reassigned = Some(r);
                    }
                    Err(e) => println!("  the reassignment failed: {e:#}"),
                }
            }
            Some(device) = revoked.recv() => match broker.reload().await {
                Ok(()) => println!("  revoked the certificate of {device}; the broker reloaded its CRL"),
                Err(e) => println!("  revoked the certificate of {device}, but the broker reload failed: {e}"),
            },
            Some(note) = view.next() => {
                println!("  {note}");
                keep(note, &mut alerts, &mut ack);
            }
            _ = tick.tick() => println!("{}", progress.line(live.connected(), devices, alerts.len())),
        }
    };
    println!("{}", progress.line(live.connected(), devices, alerts.len()));

    println!(
        "\nstopping: devices done; waiting for the object sink, then the bridge, then the broker"
    );
    wait_for_sink(&progress).await;
    let _ = bridge_stop.send(());
    match tokio::time::timeout(Duration::from_secs(30), bridge).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => println!("  the bridge stopped with an error: {e:#}"),
        Ok(Err(e)) => println!("  the bridge task failed: {e}"),
        Err(_) => println!("  the bridge did not stop within 30 s"),
    }
    let reads = clinician_reads(args, work, port, &mut view, &mut alerts, &mut ack).await;
    for note in view.stop().await {
        println!("  {note}");
        keep(note, &mut alerts, &mut ack);
    }
    broker.shutdown().await;
    println!("  stopped cleanly");

    let times = AlertTimes::for_run(args.duration);
    let mut checks = evidence_and_checks(
        work,
        &summary,
        &sim_opts.mqtt5,
        stopped_at,
        times,
        ack.as_ref(),
        &changes,
    )?;
    checks.extend(admin::checks(work, reads.as_ref(), &alerts));
    // After every other check: the erasure makes a patient's data unreadable.
    let erased = changes
        .reassigned
        .as_ref()
        .map(|r| r.previous_patient.clone());
    let step_work = work.clone();
    let device_now = device_clock.now_ms()?;
    let step = tokio::task::spawn_blocking(move || {
        lifecycle::step(
            &step_work,
            erased.as_deref(),
            lifecycle::wall_now(),
            device_now,
        )
    })
    .await
    .context("the lifecycle step")?;
    match step {
        Ok(done) => checks.extend(done),
        Err(e) => {
            println!("  the lifecycle step failed: {e:#}");
            checks.push(Check::new(false, format!("lifecycle step: {e:#}")));
        }
    }
    print_summary(work, port, &summary, &checks, &alerts)?;
    let failed = checks.iter().filter(|c| c.failed()).count();
    let skipped = checks
        .iter()
        .filter(|c| c.outcome == report::Outcome::Skipped)
        .count();
    if failed > 0 {
        println!(
            "\ndemo FAILED: {failed} of {} checks failed (details in {})",
            checks.len(),
            work.log().display()
        );
        return Ok(ExitCode::from(1));
    }
    if skipped == 0 {
        println!("\ndemo ok: all {} checks passed", checks.len());
    } else {
        println!(
            "\ndemo ok: {} checks passed, {skipped} skipped (stopped before those faults were due)",
            checks.len() - skipped
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The admin API step (see [`admin`]): a clinician's refused and break-glass reads of
/// a device of another site, and the operator seeing the break-glass alert. `None`
/// with one site (nothing is outside the clinician's scope).
async fn clinician_reads(
    args: &DemoArgs,
    work: &WorkDir,
    port: u16,
    view: &mut OperatorView,
    alerts: &mut Vec<AlertSeen>,
    ack: &mut Option<AckSent>,
) -> Option<anyhow::Result<admin::Reads>> {
    if args.sites < 2 {
        return None;
    }
    // Devices are spread over the sites round-robin: device 2 is on site-02.
    let device = setup::device(2);
    println!(
        "\nadmin API: clinician {} of {} asks for the events of {device} (site-02)",
        admin::CLINICIAN,
        admin::CLINICIAN_SITE
    );
    let reads = match admin::write_config(work, port) {
        Ok(()) => admin::clinician_reads(work, &device).await,
        Err(e) => Err(e),
    };
    match &reads {
        Ok(r) => {
            println!(
                "  without a reason: {}",
                r.refused.as_deref().unwrap_or("answered (not refused!)")
            );
            match &r.break_glass {
                Ok(n) => println!(
                    "  break-glass ({:?}): {n} events, audited, operators alerted",
                    admin::BREAK_GLASS_REASON
                ),
                Err(e) => println!("  break-glass: {e}"),
            }
        }
        Err(e) => println!("  the admin API step failed: {e:#}"),
    }
    // The break-glass alert reaches the operator's ops/# subscription.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !alerts.iter().any(|a| a.topic == admin::BREAK_GLASS_TOPIC) {
        match tokio::time::timeout_at(deadline, view.next()).await {
            Ok(Some(note)) => {
                println!("  {note}");
                keep(note, alerts, ack);
            }
            _ => break,
        }
    }
    Some(reads)
}

/// Files what the operator view reported.
fn keep(note: Note, alerts: &mut Vec<AlertSeen>, ack: &mut Option<AckSent>) {
    match note {
        Note::Alert(a) => alerts.push(a),
        Note::Ack(a) => *ack = Some(a),
    }
}

/// The simulator's options for the scenario, with the live counts and the channel on
/// which it reports revocations.
fn sim_options(
    args: &DemoArgs,
    work: &WorkDir,
    port: u16,
) -> anyhow::Result<(SimOptions, Arc<LiveCounts>, mpsc::UnboundedReceiver<String>)> {
    let mut link = LinkOptions::new(Target {
        host: "127.0.0.1".into(),
        port,
        version: MqttVersion::V311,
    });
    link.resend_after = Duration::from_secs(2);
    link.backoff_max = Duration::from_secs(2);
    let schedule = Schedule {
        rate: args.rate,
        count: None,
        duration: Some(args.duration),
        status_every: Some(Duration::from_secs(10)),
        reboot_every: None,
        until_receipted: Some(UNTIL_RECEIPTED),
        drain: Duration::from_secs(5),
        time_scale: args.time_scale,
    };
    let live = Arc::new(LiveCounts::default());
    let (revoked_tx, revoked_rx) = mpsc::unbounded_channel();
    let opts = SimOptions {
        episodes: vec![setup::episode(args.time_scale)],
        alarm_episodes: vec![setup::alarm_episode(args.time_scale)?],
        silent: vec![setup::silent(AlertTimes::for_run(args.duration))],
        faults: setup::faults(args.devices, args.duration),
        mqtt5: setup::mqtt5_devices(args.devices),
        live: Some(Arc::clone(&live)),
        revoked: Some(revoked_tx),
        ..SimOptions::new(
            work.pki(),
            work.sim_state(),
            args.devices as usize,
            link,
            schedule,
        )
    };
    Ok((opts, live, revoked_rx))
}

fn describe_scenario(args: &DemoArgs, opts: &SimOptions) {
    let episode = setup::episode(args.time_scale);
    let length = episode.kind.duration();
    println!(
        "  devices   {} at {} msg/s each for {} s ({} over MQTT 5); device clock x{}",
        args.devices,
        args.rate,
        args.duration.as_secs(),
        opts.mqtt5.len(),
        args.time_scale
    );
    println!(
        "  episode   {} on {}, {} s in, lasting {} s of device time ({:.0} s here)",
        episode.kind,
        episode.device,
        setup::EPISODE_AFTER.as_secs(),
        length.as_secs(),
        length.as_secs_f64() / args.time_scale
    );
    println!(
        "  alarm     {} (urgent) on {} at {} s, cleared {} s later; {} acknowledges it",
        setup::ALARM_CODE,
        setup::ALARM_DEVICE,
        setup::ALARM_AFTER.as_secs(),
        setup::ALARM_FOR.as_secs(),
        operator::OPERATOR
    );
    let times = AlertTimes::for_run(args.duration);
    println!(
        "  silence   {} stays connected and publishes nothing from {} s; rules: no-data after {} s, unacknowledged urgent alerts re-sent after {} s",
        setup::SILENT_DEVICE,
        times.silent_at.as_secs(),
        times.silence_after_s,
        times.urgent_ack_s
    );
    let faults: Vec<String> = opts.faults.iter().map(fault_label).collect();
    println!("  faults    {}", faults.join(", "));
    println!("  Ctrl-C stops early; either way everything stops cleanly\n");
}

fn fault_label(f: &FaultSpec) -> String {
    let who = match &f.scope {
        Scope::Device(d) => d.as_str(),
        Scope::All => "all",
    };
    format!("{} {who} @{}s", f.kind, f.at.as_secs())
}

/// Waits (up to 15 s) until the object sink has confirmed everything stored.
async fn wait_for_sink(progress: &Progress) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < deadline {
        if progress.sink_caught_up().unwrap_or(false) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "  the object sink had not caught up after 15 s; it resumes when the bridge runs again"
    );
}

fn evidence_and_checks(
    work: &WorkDir,
    summary: &Summary,
    mqtt5: &[String],
    stopped_at: Duration,
    times: AlertTimes,
    ack: Option<&AckSent>,
    changes: &governance::Changes,
) -> anyhow::Result<Vec<Check>> {
    let keyring = lifecycle::open_keyring(work)?;
    let store = lifecycle::open_store(work, &keyring)?;
    let view = StoreView::read(&store)?;
    let broker = AuditLog::read(&work.broker_audit())?;
    let bridge = AuditLog::read(&work.bridge_audit())?;
    let (broker_audit, bridge_audit) = (work.broker_audit(), work.bridge_audit());
    let evidence = Evidence {
        sim: summary,
        store: &view,
        broker: &broker,
        bridge: &bridge,
        ack,
        times,
        mqtt5,
        stopped_at_s: stopped_at.as_secs_f64(),
        audit_chains: vec![
            (
                "broker",
                broker_audit.as_path(),
                verify_chain(&broker_audit),
            ),
            (
                "bridge",
                bridge_audit.as_path(),
                verify_chain(&bridge_audit),
            ),
        ],
    };
    let mut checks = report::checks(&evidence);
    let withheld = store
        .stats()?
        .withheld
        .iter()
        .filter_map(|(key, n)| {
            let reason = key.strip_prefix("research/")?;
            Some((reason.to_owned(), u64::try_from(n).unwrap_or(0)))
        })
        .collect();
    checks.extend(governance::checks(work, &keyring, changes, &withheld)?);
    Ok(checks)
}

fn verify_chain(path: &Path) -> anyhow::Result<u64> {
    let file = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    vitalmq_audit::verify_chain(std::io::BufReader::new(file))
        .map_err(|e| anyhow::anyhow!("chain broken at {e}"))
}

fn print_summary(
    work: &WorkDir,
    port: u16,
    summary: &Summary,
    checks: &[Check],
    alerts: &[AlertSeen],
) -> anyhow::Result<()> {
    let store = vitalmq_bridge::store::Store::open(&work.bridge_data())?;
    let counts = progress::Counts::from_stats(&store.stats()?);
    let t = &summary.totals;
    let made: u64 = summary
        .devices
        .iter()
        .flat_map(|d| &d.epochs)
        .map(|e| e.made)
        .sum();
    let clinical = alerts.iter().filter(|a| a.clinical).count();
    let episode = alerts
        .iter()
        .filter(|a| {
            a.clinical
                && a.device.as_deref() == Some(setup::EPISODE_DEVICE)
                && !a
                    .rule
                    .as_deref()
                    .is_some_and(|r| r.starts_with(operator::ACK_RULE_PREFIX))
        })
        .count();
    let connected = summary.devices.iter().filter(|d| d.connects > 0).count();
    println!("\nsummary");
    let revoked: Vec<String> = summary
        .revocations
        .iter()
        .filter(|r| r.ok)
        .map(|r| format!("{} at {} s", r.device, r.at_s))
        .collect();
    println!(
        "  devices     {connected}/{} connected; certificates revoked during the run: {}",
        summary.devices.len(),
        if revoked.is_empty() {
            "none".to_owned()
        } else {
            revoked.join(", ")
        }
    );
    println!(
        "  messages    {made} made, {} sent ({} resent after reconnects), {} stored",
        t.sent, t.resent, counts.events
    );
    println!(
        "  refused     {} (kept in the quarantine)",
        counts.refused_text()
    );
    println!(
        "  sequence    duplicates dropped {}, replays refused {}; gaps: {} closed, {} open, {} lost",
        counts.duplicates, counts.replays, counts.gaps_closed, counts.gaps_open, counts.gaps_lost
    );
    println!(
        "  faults      {} injected; each matched with its refusal below",
        t.faults_injected
    );
    println!(
        "  alerts seen: {} (clinical {clinical}, operational {})",
        alerts.len(),
        alerts.len() - clinical
    );
    println!(
        "  alerts for the scripted episode (desaturation on {}): {episode}",
        setup::EPISODE_DEVICE
    );
    println!("\nchecks");
    for c in checks {
        println!("  {c}");
    }
    let data = work.bridge_data();
    println!("\nlook around");
    println!("  work dir     {}", work.root.display());
    println!(
        "  store        vitalmq store stats --data {}   (also: events, gaps, alerts)",
        data.display()
    );
    println!(
        "  objects      {} (care), {} (research: consented, minimised)",
        work.objects().display(),
        work.root.join(governance::RESEARCH_DIR).display()
    );
    println!(
        "  registry     vitalmq registry consent withdraw --registry {} --device {} --purpose research",
        work.registry().display(),
        governance::WITHDRAWN_DEVICE
    );
    println!(
        "               (also: assign, unassign, retire, consent grant; audited in {})",
        work.pki().join("audit/operator.jsonl").display()
    );
    let (cert, key) = work.clinician();
    println!(
        "  admin API    vitalmq admin serve --config {}   (prints its address)",
        work.admin_config().display()
    );
    println!(
        "               curl --cert {} --key {} --cacert {} -H 'X-Vitalmq-Purpose: care' \\\n                 -H 'X-Vitalmq-Break-Glass: <reason>' 'https://<address>/v1/events?device={}'",
        cert.display(),
        key.display(),
        work.pki().join("ca/ca.pem").display(),
        setup::device(2)
    );
    println!(
        "               (or: vitalmq store events --server https://<address> --cert ... --key ... --ca ... --purpose care; audited in {})",
        work.admin_audit().display()
    );
    println!(
        "  shipped      {}   (broker and bridge audit logs)",
        work.objects().join("audit/retention=audit-7y").display()
    );
    println!(
        "  quarantine   vitalmq store quarantine --data {}",
        data.display()
    );
    println!(
        "  provenance   vitalmq trace <alert id from `store alerts`> --data {} --broker-audit {}",
        data.display(),
        work.broker_audit().display()
    );
    let (export, verify) = fhir_commands(work)?;
    println!("  fhir         {export}");
    println!("               {verify}");
    let (command, what) = ack_command(work, port, alerts);
    println!("  acknowledge  {command}");
    println!(
        "               ({what}, as {}; with this run's broker and bridge running)",
        operator::OPERATOR
    );
    println!(
        "  audit logs   vitalmq audit verify {}",
        work.broker_audit().display()
    );
    println!(
        "               vitalmq audit verify {}",
        work.bridge_audit().display()
    );
    println!(
        "  configs      {} and {} (vitalmq broker/bridge --config ...)",
        work.broker_config().display(),
        work.bridge_config().display()
    );
    println!(
        "  sealed       vitalmq objects open --key-file {} --keyring {} <objects/normalized/.../*.vmqs>",
        work.key_file().display(),
        work.keyring().display()
    );
    println!(
        "  lifecycle    vitalmq hold list --holds {}   (also: hold place|lift, erase, export)",
        work.holds().display()
    );
    println!(
        "               vitalmq retention run --config {} --dry-run --now <RFC 3339>",
        work.bridge_config().display()
    );
    println!("  log          {}", work.log().display());
    Ok(())
}

/// `vitalmq fhir export` of the scripted episode's patient (the wearer of
/// [`setup::EPISODE_DEVICE`]: its desaturation, device alarm, acknowledgement and
/// escalation; under legal hold, so never the erased one) into a new file of the work
/// dir, and the `vitalmq fhir verify` of that file.
fn fhir_commands(work: &WorkDir) -> anyhow::Result<(String, String)> {
    let registry = vitalmq_policies::DeviceRegistry::load(&work.registry())
        .map_err(|e| anyhow::anyhow!("{}: {e}", work.registry().display()))?;
    let device = vitalmq_envelope::DeviceId::new(setup::EPISODE_DEVICE)?;
    let patient = registry
        .device(&device)
        .map(|d| d.patient_ref.clone())
        .with_context(|| format!("{}: not in the registry", setup::EPISODE_DEVICE))?;
    let bundle = work.root.join(format!("fhir-{patient}.json"));
    Ok((
        format!(
            "vitalmq fhir export --config {} --patient {patient} --out {}",
            work.bridge_config().display(),
            bundle.display()
        ),
        format!(
            "vitalmq fhir verify {} --registry {}",
            bundle.display(),
            work.registry().display()
        ),
    ))
}

/// A ready-to-run `mosquitto_pub` that acknowledges an alert as the demo's operator
/// (SPEC 5.2), and which alert: the silent device's `no-data` if it was raised (still
/// open, nobody acknowledged it), else the last clinical alert seen.
fn ack_command(work: &WorkDir, port: u16, alerts: &[AlertSeen]) -> (String, String) {
    let clinical = || alerts.iter().rev().filter(|a| a.clinical);
    let target = clinical()
        .find(|a| {
            a.device.as_deref() == Some(setup::SILENT_DEVICE)
                && a.rule.as_deref() == Some("no-data")
        })
        .or_else(|| clinical().next());
    let (alert_id, site, what) =
        match target.and_then(|a| Some((a, a.alert_id.as_deref()?, a.site.as_deref()?))) {
            Some((a, id, site)) => (
                id,
                site,
                format!(
                    "acknowledges the {} alert of {}",
                    a.rule.as_deref().unwrap_or("-"),
                    a.device.as_deref().unwrap_or("-")
                ),
            ),
            None => (
                "<alert id>",
                "site-01",
                "acknowledges an alert of site-01".to_owned(),
            ),
        };
    let identities = work.pki().join("identities/operator");
    let command = format!(
        "mosquitto_pub -h 127.0.0.1 -p {port} --cafile {} --cert {} --key {} -i {op} -V mqttv5 -q 1 -t {} -m '{}'",
        work.pki().join("ca/ca.pem").display(),
        identities
            .join(format!("{}.pem", operator::OPERATOR))
            .display(),
        identities
            .join(format!("{}.key.pem", operator::OPERATOR))
            .display(),
        operator::ack_topic(site),
        operator::ack_payload(alert_id),
        op = operator::OPERATOR,
    );
    (command, what)
}
