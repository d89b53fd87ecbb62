//! Runs N simulated devices together (`vitalmq sim`) and sums up what became of their
//! messages.
//!
//! The devices are the first N device identities of a PKI made by `vitalmq certs init`
//! (sorted by id), each with its certificate, its COSE key and its own epoch file in the
//! state directory. They share one time zero, so scripted episodes line up. The summary
//! says, per device and in total, what was sent, resent, receipted and still held;
//! `all_receipted` is true only when every device's every message is covered by a
//! receipt and no device dropped one from a full outbox.
//!
//! Faults (`--fault`, [`crate::faults`]) are injected by each device's shell, except the
//! one thing a device cannot do to itself: for `revoked-certificate` the runner revokes
//! the device's certificate in the PKI directory (as `vitalmq certs revoke` does) at
//! the fault's time, and tells `SimOptions::revoked` so that whoever runs the broker can
//! make it reload (a broker watching its files reloads by itself).
//!
//! Load mode (`vitalmq sim --aggregate-rate/--latency-report`, run by
//! `vitalmq-loadgen`) shapes a run through [`Spread`]: the devices' generation schedules
//! are spread evenly over one period (device `i` of `n` starts `i / n` of a period
//! late), so an aggregate rate arrives as a steady stream instead of `n` messages at
//! every tick; first connections are paced at `connect_rate` a second, under the gate's
//! per-source-address limit; and each device tells its [`SendObserver`] of its first
//! publishes and receipts.

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use vitalmq_envelope::DeviceId;

use crate::alarms::{AlarmEpisodeSpec, AlarmScript};
use crate::battery::Battery;
use crate::device::{DeviceError, DeviceProfile, DeviceReport, SimDevice};
use crate::duration::DurationError;
use crate::faults::{FaultKind, FaultSpec, Injector, NoPeer, Scope};
use crate::gateway::{GatewayLink, GatewayReport, PlanError, load_registry, plan_sites};
pub use crate::link::{Control, LiveCounts, SendObserver};
use crate::link::{DeviceLink, LinkOptions, Schedule};
use crate::modes::{SilentSpec, silent_after};
use crate::pki::{Pki, PkiError};
use crate::vitals::{Episode, EpisodeKind, UnknownEpisode, VitalsModel};
use vitalmq_mqtt_client::MqttVersion;

/// Why a run could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The options ask for something impossible; the message names the option.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Fault(#[from] NoPeer),
    #[error("state directory {}: {source}", path.display())]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("device identity `{device}`: {source}")]
    DeviceId {
        device: String,
        source: vitalmq_envelope::InvalidDeviceId,
    },
    #[error("booting {device}: {source}")]
    Boot { device: String, source: DeviceError },
    #[error("gateway identity of {site}: {source}")]
    GatewayIdentity { site: String, source: PkiError },
    #[error("device task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Why an `--episode` value does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EpisodeSpecError {
    #[error("episode `{0}`: expected KIND:DEVICE[@START]")]
    Syntax(String),
    #[error("episode `{0}`: {1}")]
    Start(String, DurationError),
    #[error("episode `{0}`: `{1}` is not a device id")]
    NotADevice(String, String),
    #[error(transparent)]
    Kind(#[from] UnknownEpisode),
}

/// When an episode starts if `@START` is not given.
pub const DEFAULT_EPISODE_START: Duration = Duration::from_secs(10);

/// `KIND:DEVICE[@START]` from the command line, e.g. `desaturation:dev-00001@30s`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpisodeSpec {
    pub kind: EpisodeKind,
    pub device: String,
    pub start: Duration,
}

impl FromStr for EpisodeSpec {
    type Err = EpisodeSpecError;
    fn from_str(s: &str) -> Result<Self, EpisodeSpecError> {
        use EpisodeSpecError as E;
        let (kind, rest) = s.split_once(':').ok_or_else(|| E::Syntax(s.to_owned()))?;
        let (device, start) = match rest.split_once('@') {
            Some((d, t)) => (d, parse_duration(t).map_err(|e| E::Start(s.to_owned(), e))?),
            None => (rest, DEFAULT_EPISODE_START),
        };
        DeviceId::new(device).map_err(|_| E::NotADevice(s.to_owned(), device.to_owned()))?;
        Ok(Self {
            kind: kind.parse()?,
            device: device.to_owned(),
            start,
        })
    }
}

pub use crate::duration::parse_duration;

/// What `vitalmq sim` runs.
#[derive(Debug, Clone)]
pub struct SimOptions {
    pub pki: PathBuf,
    pub state: PathBuf,
    pub devices: usize,
    pub seed: u64,
    pub fw: String,
    pub episodes: Vec<EpisodeSpec>,
    /// Scripted device alarms (`--alarm-episode`).
    pub alarm_episodes: Vec<AlarmEpisodeSpec>,
    /// Charge at the start and drain per hour of device time; `charging` is per device.
    pub battery: Battery,
    /// Devices on external power (`--charging`).
    pub charging: Vec<Scope>,
    /// Devices that go silent while staying connected (`--silent-after`).
    pub silent: Vec<SilentSpec>,
    /// Devices whose every message is signed with a foreign key (`--forged-only`).
    pub forged_only: Vec<Scope>,
    /// The model devices report on vitals and alarms (`--device-model`); the first
    /// scope that includes a device wins.
    pub device_models: Vec<(Scope, String)>,
    pub faults: Vec<FaultSpec>,
    /// Devices that speak MQTT 5 whatever `link.target.version` says.
    pub mqtt5: Vec<String>,
    pub link: LinkOptions,
    pub schedule: Schedule,
    /// Kept up to date with how many devices are connected.
    pub live: Option<Arc<LiveCounts>>,
    /// Told the id of every device whose certificate the runner revoked.
    pub revoked: Option<mpsc::UnboundedSender<String>>,
    /// The devices do not connect themselves: one gateway per site (its identity from
    /// the registry) relays their messages ([`crate::gateway`]).
    pub via_gateway: bool,
    /// Load mode: spread schedules, paced connects, observed sends.
    pub spread: Option<Spread>,
}

/// How load mode shapes a run (see the module documentation).
#[derive(Debug, Clone, Default)]
pub struct Spread {
    /// New device connections per second at start-up; `None`: all at once.
    pub connect_rate: Option<f64>,
    /// Told of each device's first publishes and receipts, by device id.
    pub observers: HashMap<String, Arc<dyn SendObserver>>,
}

impl SimOptions {
    /// Options with no episodes, faults, MQTT 5 devices or observers.
    pub fn new(
        pki: PathBuf,
        state: PathBuf,
        devices: usize,
        link: LinkOptions,
        schedule: Schedule,
    ) -> Self {
        Self {
            pki,
            state,
            devices,
            seed: 1,
            fw: crate::device::DEFAULT_FW.to_owned(),
            episodes: Vec::new(),
            alarm_episodes: Vec::new(),
            battery: Battery::default(),
            charging: Vec::new(),
            silent: Vec::new(),
            forged_only: Vec::new(),
            device_models: Vec::new(),
            faults: Vec::new(),
            mqtt5: Vec::new(),
            link,
            schedule,
            live: None,
            revoked: None,
            via_gateway: false,
            spread: None,
        }
    }
}

/// A certificate revocation the runner carried out for a `revoked-certificate` fault.
#[derive(Debug, Clone, Serialize)]
pub struct Revocation {
    pub device: String,
    pub at_s: f64,
    /// `revoked serial ...` or why the revocation failed.
    pub outcome: String,
    pub ok: bool,
}

/// Sums over all devices.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    pub devices: usize,
    pub sent: u64,
    pub resent: u64,
    pub unreceipted: usize,
    pub overflow_dropped: u64,
    pub vitals: u64,
    pub status: u64,
    pub connects: u64,
    pub errors: usize,
    pub faults_injected: u64,
}

/// The one-line JSON summary of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub all_receipted: bool,
    pub elapsed_s: f64,
    pub totals: Totals,
    pub devices: Vec<DeviceReport>,
    /// The gateways that carried the devices (`--via-gateway`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<GatewayReport>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub revocations: Vec<Revocation>,
    /// From the first device starting until every device was connected and subscribed
    /// (not in the summary line; load mode reports it).
    #[serde(skip)]
    pub all_connected: Option<Duration>,
}

impl Summary {
    fn new(devices: Vec<DeviceReport>, revocations: Vec<Revocation>, elapsed: Duration) -> Self {
        let mut totals = Totals {
            devices: devices.len(),
            ..Totals::default()
        };
        // A forged-only device can never be receipted: it is there to be refused.
        let all_receipted = devices
            .iter()
            .filter(|d| !d.forged_only)
            .all(|d| d.all_receipted);
        for d in &devices {
            totals.sent += d.sent;
            totals.resent += d.resent;
            totals.unreceipted += d.unreceipted;
            totals.overflow_dropped += d.overflow_dropped;
            totals.vitals += d.vitals;
            totals.status += d.status;
            totals.connects += d.connects;
            totals.errors += usize::from(d.error.is_some());
            totals.faults_injected += d.faults.iter().map(|f| u64::from(f.injected)).sum::<u64>();
        }
        Self {
            all_receipted,
            elapsed_s: (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            totals,
            devices,
            gateways: Vec::new(),
            revocations,
            all_connected: None,
        }
    }
}

/// Checks the options that need no PKI: the counts and rates, and load mode's.
pub fn validate(opts: &SimOptions) -> Result<(), RunError> {
    let invalid = |m: &str| Err(RunError::Invalid(m.to_owned()));
    if opts.devices == 0 {
        return invalid("--devices must be at least 1");
    }
    if !(opts.schedule.rate.is_finite() && opts.schedule.rate > 0.0) {
        return invalid("--rate must be a positive number of messages per second");
    }
    if !(opts.link.send_rate.is_finite() && opts.link.send_rate > 0.0) {
        return invalid("--resend-rate must be a positive number of messages per second");
    }
    if !(opts.schedule.time_scale.is_finite() && opts.schedule.time_scale > 0.0) {
        return invalid("--time-scale must be a positive number");
    }
    if !(opts.battery.start.is_finite() && (0.0..=1.0).contains(&opts.battery.start)) {
        return invalid("--battery must be a charge from 0 to 1");
    }
    if !(opts.battery.drain_per_hour.is_finite() && opts.battery.drain_per_hour >= 0.0) {
        return invalid("--battery-drain must be a non-negative fraction per hour");
    }
    if opts.via_gateway && !(opts.silent.is_empty() && opts.forged_only.is_empty()) {
        return invalid(
            "--silent-after and --forged-only are not supported with --via-gateway (a gateway's devices share its connection)",
        );
    }
    if !opts.silent.is_empty() && opts.schedule.count.is_some() && opts.schedule.duration.is_none()
    {
        return invalid(
            "--silent-after with --count needs --duration (a silent device never reaches its count)",
        );
    }
    if let Some(spread) = &opts.spread {
        if opts.via_gateway {
            return invalid(
                "load mode (--aggregate-rate, --latency-report) is not supported with --via-gateway",
            );
        }
        if let Some(r) = spread.connect_rate
            && !(r.is_finite() && r > 0.0)
        {
            return invalid("--connect-rate must be a positive number of connections per second");
        }
    }
    Ok(())
}

/// Checks that every device the options name is one of `fleet`.
fn check_named_devices(opts: &SimOptions, fleet: &[String]) -> Result<(), RunError> {
    let n = opts.devices;
    let not_simulated = |what: String| {
        Err(RunError::Invalid(format!(
            "{what}: not one of the {n} simulated devices"
        )))
    };
    for e in &opts.episodes {
        if !fleet.contains(&e.device) {
            return not_simulated(format!("--episode {}:{}", e.kind, e.device));
        }
    }
    for a in &opts.alarm_episodes {
        if !fleet.contains(&a.device) {
            return not_simulated(format!("--alarm-episode {}:{}", a.device, a.code));
        }
    }
    let scopes = [
        ("--charging", opts.charging.iter().collect::<Vec<_>>()),
        (
            "--silent-after",
            opts.silent.iter().map(|s| &s.scope).collect(),
        ),
        ("--forged-only", opts.forged_only.iter().collect()),
    ];
    for (option, scopes) in scopes {
        for scope in scopes {
            if let Scope::Device(d) = scope
                && !fleet.contains(d)
            {
                return not_simulated(format!("{option} {d}"));
            }
        }
    }
    for f in &opts.faults {
        if let Scope::Device(d) = &f.scope
            && !fleet.contains(d)
        {
            return not_simulated(format!("--fault {}:{d}", f.kind));
        }
        if let Some(p) = &f.peer
            && !fleet.contains(p)
        {
            return not_simulated(format!("--fault {}={p}", f.kind));
        }
    }
    for d in &opts.mqtt5 {
        if !fleet.contains(d) {
            return not_simulated(format!("--mqtt5 {d}"));
        }
    }
    Ok(())
}

/// Boots the devices and runs them until their schedule is done or `stop` turns true.
/// `on_ready(n)` is called once, when all `n` devices have connected the first time.
pub async fn run(
    opts: SimOptions,
    control: watch::Receiver<Control>,
    on_ready: impl FnOnce(usize) + Send + 'static,
) -> Result<Summary, RunError> {
    validate(&opts)?;
    let pki = Pki::open(&opts.pki)?;
    let identities = pki.devices(opts.devices)?;
    let fleet: Vec<String> = identities.iter().map(|i| i.id.clone()).collect();
    check_named_devices(&opts, &fleet)?;
    std::fs::create_dir_all(&opts.state).map_err(|source| RunError::StateDir {
        path: opts.state.clone(),
        source,
    })?;
    if opts.via_gateway {
        return run_via_gateways(&opts, &pki, &fleet, control, on_ready).await;
    }

    let link = Arc::new(opts.link.clone());
    let link_v5 = Arc::new(LinkOptions {
        target: vitalmq_mqtt_client::Target {
            version: MqttVersion::V5,
            ..opts.link.target.clone()
        },
        ..opts.link.clone()
    });
    let schedule = Arc::new(opts.schedule.clone());
    let t0 = tokio::time::Instant::now();
    let started = std::time::Instant::now();
    let revocations = revoke_on_schedule(&opts, &fleet, t0);
    let mut tasks = Vec::with_capacity(identities.len());
    let mut ready = Vec::with_capacity(identities.len());
    let period = Duration::from_secs_f64(1.0 / opts.schedule.rate);
    let n_devices = identities.len();
    for (i, identity) in identities.into_iter().enumerate() {
        let identity_id = identity.id.clone();
        let injector = Injector::new(&identity.id, &opts.faults, &fleet)?;
        let device = boot_device(&opts, &pki, &identity.id)?;
        let (tx, rx) = oneshot::channel();
        let revoked = injector
            .reports()
            .iter()
            .any(|r| r.fault == FaultKind::RevokedCertificate);
        if !revoked {
            // A device whose certificate gets revoked may never connect.
            ready.push(rx);
        }
        let link = if opts.mqtt5.contains(&identity.id) {
            Arc::clone(&link_v5)
        } else {
            Arc::clone(&link)
        };
        let observer = opts
            .spread
            .as_ref()
            .and_then(|s| s.observers.get(&identity.id))
            .map(Arc::clone);
        let mut shell = DeviceLink::new(device, identity, link, Arc::clone(&schedule), t0, tx)
            .with_faults(injector);
        if let Some(after) = silent_after(&opts.silent, &identity_id) {
            shell = shell.silent_after(after);
        }
        if let Some(live) = &opts.live {
            shell = shell.with_live(Arc::clone(live));
        }
        if let Some(spread) = &opts.spread {
            let phase = period.mul_f64(i as f64 / n_devices as f64);
            let first_attempt = spread
                .connect_rate
                .map_or(t0, |r| t0 + Duration::from_secs_f64(i as f64 / r));
            shell = shell.with_start(phase, first_attempt);
        }
        if let Some(observer) = observer {
            shell = shell.with_observer(observer);
        }
        tasks.push(tokio::spawn(shell.run(control.clone())));
    }
    let n = ready.len();
    let connected: Arc<std::sync::OnceLock<Duration>> = Arc::default();
    let connected_at = Arc::clone(&connected);
    tokio::spawn(async move {
        for rx in ready {
            if rx.await.is_err() {
                // A device ended before it ever connected: there will be no ready line.
                return;
            }
        }
        let _ = connected_at.set(t0.elapsed());
        on_ready(n);
    });
    let mut reports = Vec::with_capacity(tasks.len());
    for task in tasks {
        reports.push(task.await?);
    }
    let mut done = Vec::new();
    for r in revocations {
        // A revocation not yet due when the devices finished never happens.
        if r.is_finished() {
            done.push(r.await?);
        } else {
            r.abort();
        }
    }
    let mut summary = Summary::new(reports, done, started.elapsed());
    summary.all_connected = connected.get().copied();
    Ok(summary)
}

/// The `--via-gateway` fleet: the devices are grouped by their registered site and each
/// site's gateway carries them over one connection.
async fn run_via_gateways(
    opts: &SimOptions,
    pki: &Pki,
    fleet: &[String],
    control: watch::Receiver<Control>,
    on_ready: impl FnOnce(usize) + Send + 'static,
) -> Result<Summary, RunError> {
    if !opts.faults.is_empty() {
        return Err(RunError::Invalid(
            "--fault is not supported with --via-gateway (faults are injected by a device's own connection)".into(),
        ));
    }
    if !opts.mqtt5.is_empty() {
        return Err(RunError::Invalid(
            "--mqtt5 is not supported with --via-gateway (use --mqtt-version for the gateways)"
                .into(),
        ));
    }
    let sites = plan_sites(fleet, &load_registry(pki)?)?;
    let schedule = Arc::new(opts.schedule.clone());
    let t0 = tokio::time::Instant::now();
    let started = std::time::Instant::now();
    let mut tasks = Vec::with_capacity(sites.len());
    let mut ready = Vec::with_capacity(sites.len());
    for site in sites {
        let identity =
            pki.identity("gateway", &site.gateway)
                .map_err(|source| RunError::GatewayIdentity {
                    site: site.site.clone(),
                    source,
                })?;
        let mut devices = Vec::with_capacity(site.devices.len());
        for d in &site.devices {
            devices.push(boot_device(opts, pki, d)?);
        }
        tracing::info!(gateway.id = %site.gateway, site = %site.site, devices = ?site.devices, "gateway carries");
        let (tx, rx) = oneshot::channel();
        ready.push(rx);
        let mut shell = GatewayLink::new(
            identity,
            site.site,
            devices,
            &opts.link,
            Arc::clone(&schedule),
            t0,
            tx,
        );
        if let Some(live) = &opts.live {
            shell = shell.with_live(Arc::clone(live));
        }
        tasks.push(tokio::spawn(shell.run(control.clone())));
    }
    let n = fleet.len();
    tokio::spawn(async move {
        for rx in ready {
            if rx.await.is_err() {
                return;
            }
        }
        on_ready(n);
    });
    let mut reports = Vec::with_capacity(n);
    let mut gateways = Vec::with_capacity(tasks.len());
    for task in tasks {
        let (gateway, devices) = task.await?;
        gateways.push(gateway);
        reports.extend(devices);
    }
    reports.sort_by_key(|r| fleet.iter().position(|d| *d == r.id));
    let mut summary = Summary::new(reports, Vec::new(), started.elapsed());
    summary.gateways = gateways;
    Ok(summary)
}

/// Boots one device (durable epoch, COSE key, vitals model with its episodes).
fn boot_device(opts: &SimOptions, pki: &Pki, device: &str) -> Result<SimDevice, RunError> {
    let id = DeviceId::new(device.to_owned()).map_err(|source| RunError::DeviceId {
        device: device.to_owned(),
        source,
    })?;
    let key = pki.signing_key(device)?;
    let episodes = opts
        .episodes
        .iter()
        .filter(|e| e.device == device)
        .map(|e| Episode {
            kind: e.kind,
            start: e.start,
        })
        .collect();
    let model = VitalsModel::new(opts.seed, device, episodes);
    let profile = DeviceProfile {
        alarms: AlarmScript::new(opts.alarm_episodes.iter().filter(|a| a.device == device)),
        battery: Battery {
            charging: opts.charging.iter().any(|s| s.includes(device)),
            ..opts.battery
        },
        interval_s: Some(interval_s(opts.schedule.rate)),
        forged_only: opts.forged_only.iter().any(|s| s.includes(device)),
        model: opts
            .device_models
            .iter()
            .find(|(s, _)| s.includes(device))
            .map(|(_, m)| m.clone()),
    };
    SimDevice::boot(id, key, opts.fw.clone(), model, &opts.state)
        .and_then(|d| d.with_profile(profile))
        .map_err(|source| RunError::Boot {
            device: device.to_owned(),
            source,
        })
}

/// The vitals interval a device runs with at `rate` a second, in whole seconds (at least
/// 1): what its status reports as `interval_s`.
fn interval_s(rate: f64) -> u64 {
    // A validated rate is positive and finite; the cast saturates for absurdly low ones.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let seconds = (1.0 / rate).ceil() as u64;
    seconds.max(1)
}

/// Starts one task per `revoked-certificate` fault that revokes the device's identity
/// certificate in the PKI directory at the fault's time.
fn revoke_on_schedule(
    opts: &SimOptions,
    fleet: &[String],
    t0: tokio::time::Instant,
) -> Vec<tokio::task::JoinHandle<Revocation>> {
    let mut tasks = Vec::new();
    for spec in opts
        .faults
        .iter()
        .filter(|f| f.kind == FaultKind::RevokedCertificate)
    {
        for device in fleet.iter().filter(|d| spec.scope.includes(d)) {
            let (device, at, pki) = (device.clone(), spec.at, opts.pki.clone());
            let notify = opts.revoked.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(t0 + at).await;
                let revoking = device.clone();
                let outcome = tokio::task::spawn_blocking(move || revoke(&pki, &revoking))
                    .await
                    .map_err(RevokeError::from)
                    .and_then(|r| r);
                match &outcome {
                    Ok(serial) => {
                        tracing::info!(device.id = %device, serial = %serial, "fault: certificate revoked");
                        if let Some(tx) = notify {
                            let _ = tx.send(device.clone());
                        }
                    }
                    Err(e) => tracing::error!(device.id = %device, error = %e, "fault: cannot revoke the certificate"),
                }
                Revocation {
                    device,
                    at_s: at.as_secs_f64(),
                    ok: outcome.is_ok(),
                    outcome: match outcome {
                        Ok(serial) => format!("revoked serial {serial}"),
                        Err(e) => e.to_string(),
                    },
                }
            }));
        }
    }
    tasks
}

/// Why a `revoked-certificate` fault could not revoke.
#[derive(Debug, thiserror::Error)]
enum RevokeError {
    #[error(transparent)]
    Id(#[from] vitalmq_policies::IdentityError),
    #[error("{}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: vitalmq_certs::CertsError,
    },
    #[error(transparent)]
    Revoke(#[from] vitalmq_certs::CertsError),
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
}

/// Revokes a device's identity certificate (reason key compromise) and re-signs the
/// CRL; returns the serial.
fn revoke(pki: &std::path::Path, device: &str) -> Result<String, RevokeError> {
    use vitalmq_certs::index::Target;
    let id = vitalmq_policies::PrincipalId::new(device)?;
    let mut store = vitalmq_certs::Pki::open(pki).map_err(|source| RevokeError::Open {
        path: pki.to_path_buf(),
        source,
    })?;
    let entry = store.revoke(
        &Target::Identity {
            role: vitalmq_policies::Role::Device,
            id,
        },
        vitalmq_certs::Reason::KeyCompromise,
        time::OffsetDateTime::now_utc(),
    )?;
    Ok(entry.serial)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn episode_specs() {
        assert_eq!(
            "desaturation:dev-00001".parse(),
            Ok(EpisodeSpec {
                kind: EpisodeKind::Desaturation,
                device: "dev-00001".into(),
                start: DEFAULT_EPISODE_START
            })
        );
        assert_eq!(
            "fever:dev-00002@90s"
                .parse::<EpisodeSpec>()
                .map(|e| e.start),
            Ok(Duration::from_secs(90))
        );
        assert!("fever".parse::<EpisodeSpec>().is_err());
        assert!("seizure:dev-00001".parse::<EpisodeSpec>().is_err());
        assert!("fever:dev 1".parse::<EpisodeSpec>().is_err());
        assert!("fever:dev-00001@later".parse::<EpisodeSpec>().is_err());
    }

    #[test]
    fn status_reports_the_interval_in_whole_seconds() {
        assert_eq!(interval_s(1.0), 1);
        assert_eq!(interval_s(10.0), 1);
        assert_eq!(interval_s(0.2), 5);
        assert_eq!(interval_s(0.3), 4);
    }

    fn report(id: &str, all_receipted: bool, forged_only: bool) -> DeviceReport {
        DeviceReport {
            id: id.into(),
            epoch: 1,
            sent: 3,
            resent: 0,
            highest_seq: Some(2),
            receipted: None,
            unreceipted: 3,
            overflow_dropped: 0,
            vitals: 3,
            status: 0,
            alarms: 0,
            forged_only,
            reboots: 0,
            connects: 1,
            receipts_malformed: 0,
            all_receipted,
            epochs: Vec::new(),
            held: Vec::new(),
            gateway: None,
            faults: Vec::new(),
            error: None,
        }
    }

    #[test]
    fn a_forged_only_device_is_left_out_of_all_receipted() {
        let forged = report("dev-00002", false, true);
        let s = Summary::new(
            vec![report("dev-00001", true, false), forged.clone()],
            Vec::new(),
            Duration::ZERO,
        );
        assert!(s.all_receipted);
        assert_eq!(s.totals.unreceipted, 6, "totals still count everything");
        let s = Summary::new(
            vec![report("dev-00001", false, false), forged],
            Vec::new(),
            Duration::ZERO,
        );
        assert!(!s.all_receipted, "an honest device still counts");
    }
}
