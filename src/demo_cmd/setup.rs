//! The demo's embedded default: a work directory holding a dev PKI, the shipped ACL and
//! the broker's and bridge's configuration files (written out, so that what the demo
//! ran can be read and rerun by hand), and the scripted scenario: which device has the
//! clinical episode and the device alarm, which one goes silent, which faults are
//! injected when, and the alert timings the demo's rules use so that all of it happens
//! within the run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use vitalmq_certs::{FleetPlan, InitSummary, Pki};
use vitalmq_device_sim::alarms::AlarmEpisodeSpec;
use vitalmq_device_sim::faults::{FaultKind, FaultSpec, Scope};
use vitalmq_device_sim::modes::SilentSpec;
use vitalmq_device_sim::runner::EpisodeSpec;
use vitalmq_device_sim::vitals::EpisodeKind;
use vitalmq_policies::TrustDomain;

/// Trust domain of the demo PKI.
pub const TRUST_DOMAIN: &str = "demo.vitalmq";

/// The shipped topic ACL, embedded so that the demo runs from any directory.
const SHIPPED_ACL: &str = include_str!("../../policies/examples/acl.toml");
/// The shipped alert rules, embedded for the same reason.
const SHIPPED_RULES: &str = include_str!("../../policies/examples/rules.toml");
/// The shipped retention classes (issue 20), the demo's retention policy as shipped.
const SHIPPED_RETENTION: &str = include_str!("../../policies/examples/retention.toml");
/// The demo's legal holds file before the lifecycle step places one: no hold.
const NO_HOLDS: &str = "# Written by `vitalmq demo`; change with `vitalmq hold place|lift`.\nformat = \"vitalmq-holds/v1\"\n";

/// The device with the scripted clinical episode.
pub const EPISODE_DEVICE: &str = "dev-00001";

/// The scripted episode starts this long (wall clock) after the devices start.
pub const EPISODE_AFTER: Duration = Duration::from_secs(6);

/// The device whose on-device model raises an alarm (SPEC 5.1), which the demo's
/// operator acknowledges.
pub const ALARM_DEVICE: &str = "dev-00001";
/// The alarm's code and level (`level` urgent: an urgent clinical alert).
pub const ALARM_CODE: &str = "arrhythmia";
/// The alarm is raised this long (wall clock) after the devices start...
pub const ALARM_AFTER: Duration = Duration::from_secs(2);
/// ... and cleared this long after it was raised.
pub const ALARM_FOR: Duration = Duration::from_secs(6);

/// The device that goes silent: it stays connected and publishes nothing more, so the
/// bridge raises `no-data` with reason `silent` for it.
pub const SILENT_DEVICE: &str = "dev-00002";

/// Fewest devices the scenario needs: one with the episode and the alarm, one that goes
/// silent, one per fault (3 to 11), the reassigned one and the one whose research
/// consent is withdrawn (12 and 13, see `governance`), and the one whose certificate is
/// revoked (the last).
pub const MIN_DEVICES: u32 = 14;

/// Shortest run the scenario fits in.
pub const MIN_DURATION: Duration = Duration::from_secs(15);

/// Where everything of one demo run lives.
#[derive(Debug, Clone)]
pub struct WorkDir {
    pub root: PathBuf,
}

impl WorkDir {
    pub fn pki(&self) -> PathBuf {
        self.root.join("pki")
    }
    pub fn registry(&self) -> PathBuf {
        self.pki().join("registry.toml")
    }
    pub fn acl(&self) -> PathBuf {
        self.root.join("acl.toml")
    }
    pub fn broker_config(&self) -> PathBuf {
        self.root.join("broker.toml")
    }
    pub fn broker_audit(&self) -> PathBuf {
        self.root.join("broker/audit.jsonl")
    }
    pub fn bridge_config(&self) -> PathBuf {
        self.root.join("bridge.toml")
    }
    pub fn bridge_data(&self) -> PathBuf {
        self.root.join("bridge-data")
    }
    pub fn bridge_audit(&self) -> PathBuf {
        self.bridge_data().join("audit.jsonl")
    }
    pub fn objects(&self) -> PathBuf {
        self.root.join("objects")
    }
    pub fn sim_state(&self) -> PathBuf {
        self.root.join("sim-state")
    }
    pub fn log(&self) -> PathBuf {
        self.root.join("demo.log")
    }
    /// The key-encryption key file (`vitalmq-kek/v1`, 0600) the bridge's keyring wraps
    /// its data keys with.
    pub fn key_file(&self) -> PathBuf {
        self.root.join("kek.json")
    }
    /// The bridge's keyring, at its default place in the data directory.
    pub fn keyring(&self) -> PathBuf {
        self.bridge_data().join(vitalmq_keyring::KEYRING_FILE)
    }
    pub fn retention(&self) -> PathBuf {
        self.root.join("retention.toml")
    }
    pub fn holds(&self) -> PathBuf {
        self.root.join("holds.toml")
    }
}

/// Creates the work directory (which must be missing or empty) with the PKI, the ACL,
/// the rules (timed for a run of `duration`) and the broker configuration.
/// `clock_ahead` is how far the simulated device clocks will run ahead of real time
/// (`--time-scale` x `--duration`).
pub fn create(
    root: &Path,
    devices: u32,
    sites: u32,
    duration: Duration,
    clock_ahead: Duration,
) -> anyhow::Result<(WorkDir, InitSummary)> {
    let empty = match std::fs::read_dir(root) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(e).with_context(|| format!("{}", root.display())),
    };
    ensure!(
        empty,
        "{}: directory exists and is not empty; give another --dir",
        root.display()
    );
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let work = WorkDir {
        root: root.to_path_buf(),
    };
    let mut plan = FleetPlan::new(TrustDomain::new(TRUST_DOMAIN)?, devices, sites);
    plan.es256_every = Some(3);
    let summary = Pki::init(&work.pki(), &plan, time::OffsetDateTime::now_utc())
        .with_context(|| format!("creating the demo PKI in {}", work.pki().display()))?;
    write(&work.acl(), SHIPPED_ACL)?;
    write(
        &work.root.join("rules.toml"),
        &demo_rules(clock_ahead, AlertTimes::for_run(duration)),
    )?;
    write(&work.broker_config(), &broker_config_toml())?;
    vitalmq_keyring::LocalKeyFile::create(&work.key_file())
        .with_context(|| format!("creating {}", work.key_file().display()))?;
    write(&work.retention(), SHIPPED_RETENTION)?;
    crate::registry_cmd::write_atomically(&work.holds(), NO_HOLDS)?;
    super::governance::grant_research_consent(&work, devices)?;
    super::admin::setup(&work)?;
    Ok((work, summary))
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The broker's configuration: mTLS on a free port of 127.0.0.1, the shipped ACL, the
/// PKI's CRL, no per-IP connection rate limit (every simulated device connects from
/// 127.0.0.1, all at once in a reconnect storm). No file watching: the demo reloads the
/// broker itself after revoking a certificate, as an operator would with SIGHUP.
pub fn broker_config_toml() -> String {
    format!(
        r#"# Written by `vitalmq demo`; paths are relative to this file.
# Port 0 takes any free port; the demo prints the one it got.
listen = "127.0.0.1:0"
connect_timeout_ms = 10000

[tls]
server_cert = "pki/broker/server.pem"
server_key = "pki/broker/server.key.pem"
client_ca = ["pki/ca/ca.pem"]
crls = ["pki/crl.pem"]
trust_domain = "{TRUST_DOMAIN}"
per_ip_per_second = 0

[policy]
acl = "acl.toml"
registry = "pki/registry.toml"
watch = false

[audit]
path = "broker/audit.jsonl"

"#
    )
}

/// The bridge's configuration: the PKI's bridge identity, its store, quarantine and
/// audit log in `bridge-data/`, and one local object sink in `objects/`, which also
/// receives the broker's audit log (`objects/audit/.../component=broker/`); encryption
/// at rest under the work directory's key file (the keyring in `bridge-data/`), and the
/// retention job with the shipped retention classes and the demo's holds file.
///
/// This is the one place to change when the bridge gains settings the demo should use
/// (e.g. `rules = "rules.toml"` for clinical alert rules).
pub fn bridge_config_toml(broker_port: u16) -> String {
    format!(
        r#"# Written by `vitalmq demo`; paths are relative to this file.
id = "bridge-01"
data_dir = "bridge-data"
registry = "pki/registry.toml"

[broker]
address = "127.0.0.1:{broker_port}"
ca = "pki/ca/ca.pem"
cert = "pki/identities/bridge/bridge-01.pem"
key = "pki/identities/bridge/bridge-01.key.pem"

[pipeline]
receipt_interval_ms = 100

# Encryption at rest: every patient-linked payload (store and objects) is sealed under
# the patient's data key; the keyring is bridge-data/keyring.sqlite3.
[encryption]
key_file = "kek.json"

# The retention job: the shipped retention classes, under the legal holds of holds.toml.
[lifecycle]
retention = "retention.toml"
holds = "holds.toml"
every = "1h"

# The broker's audit log goes to the objects sink too, beside the bridge's own.
[[audit_ship]]
component = "broker"
path = "broker/audit.jsonl"
retention = "audit-7y"

# So does the operator log of `vitalmq store` and `vitalmq trace` on this store (who
# read which patient-linked records), once someone has used them.
[[audit_ship]]
component = "operator"
path = "bridge-data/operator-audit/operator.jsonl"
retention = "audit-7y"

[[sinks]]
kind = "objects"
name = "objects"
path = "objects"
{research}
[alerts]
rules = "rules.toml"
publisher = {{ client_id = "bridge-01-alerts", cert = "pki/identities/bridge/bridge-01-alerts.pem", key = "pki/identities/bridge/bridge-01-alerts.key.pem" }}
"#,
        research = super::governance::research_sink_toml()
    )
}

/// The shipped rules with `[clock] max_ahead_s` widened by `clock_ahead`: at
/// `--time-scale` X a device's `ts` advances X times faster than real time, so it runs
/// ahead of reception, which the shipped 300 s would mark as clock skew (and the rules
/// would then evaluate at reception time, slowing the scripted episode down X times).
/// `[silence] after_s` and `[acknowledge] urgent_s` come from `times` (the shipped
/// 300 s each would not happen within a demo run); both are on the bridge's clock, so
/// `--time-scale` does not shorten them.
fn demo_rules(clock_ahead: Duration, times: AlertTimes) -> String {
    let ahead = clock_ahead
        .as_secs()
        .saturating_add(300)
        .min(vitalmq_policies::MAX_SECONDS);
    SHIPPED_RULES
        .replacen("max_ahead_s = 300", &format!("max_ahead_s = {ahead}"), 1)
        .replacen(
            "[silence]\nafter_s = 300",
            &format!("[silence]\nafter_s = {}", times.silence_after_s),
            1,
        )
        .replacen(
            "[acknowledge]\nurgent_s = 300",
            &format!("[acknowledge]\nurgent_s = {}", times.urgent_ack_s),
            1,
        )
}

/// When the silent device goes quiet and how long the bridge waits before it says so
/// and before it re-sends an unacknowledged urgent alert, for a run of a given length:
/// short enough that the silence alert opens and is re-sent once within the run, long
/// enough that no healthy device (reconnecting after the storm, rebooting, or between
/// the end of generation and the bridge stopping) looks silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlertTimes {
    /// When [`SILENT_DEVICE`] goes silent (wall clock after the devices start).
    pub silent_at: Duration,
    /// `[silence] after_s` of the demo's rules.
    pub silence_after_s: u64,
    /// `[acknowledge] urgent_s` of the demo's rules.
    pub urgent_ack_s: u64,
}

impl AlertTimes {
    pub fn for_run(duration: Duration) -> Self {
        let secs = duration.as_secs();
        Self {
            silent_at: Duration::from_secs((secs / 10).max(3)),
            silence_after_s: (secs / 5).clamp(6, 10),
            urgent_ack_s: (secs / 4).clamp(5, 15),
        }
    }

    /// When the silent device's `no-data` alert is due (before the bridge's next tick).
    pub fn silence_alert_due(&self) -> Duration {
        self.silent_at + Duration::from_secs(self.silence_after_s)
    }

    /// When its unacknowledged re-send is due.
    pub fn escalation_due(&self) -> Duration {
        self.silence_alert_due() + Duration::from_secs(self.urgent_ack_s)
    }
}

/// The scripted device alarm on [`ALARM_DEVICE`]: raised [`ALARM_AFTER`] into the run
/// and cleared [`ALARM_FOR`] later (given in device time, so scaled).
pub fn alarm_episode(time_scale: f64) -> anyhow::Result<AlarmEpisodeSpec> {
    let ms = |d: Duration| (d.as_secs_f64() * time_scale * 1000.0).round();
    let spec = format!(
        "{ALARM_DEVICE}:{ALARM_CODE}:urgent:at={}ms:for={}ms",
        ms(ALARM_AFTER),
        ms(ALARM_FOR)
    );
    spec.parse()
        .with_context(|| format!("the demo's alarm episode {spec}"))
}

/// [`SILENT_DEVICE`] goes silent at `times.silent_at`.
pub fn silent(times: AlertTimes) -> SilentSpec {
    SilentSpec {
        scope: Scope::Device(SILENT_DEVICE.to_owned()),
        after: times.silent_at,
    }
}

/// Device `n` (1-based) of the PKI.
pub fn device(n: u32) -> String {
    vitalmq_certs::device_id(n).to_string()
}

/// The scripted clinical episode: a desaturation on [`EPISODE_DEVICE`], starting
/// [`EPISODE_AFTER`] into the run (in device time, so scaled).
pub fn episode(time_scale: f64) -> EpisodeSpec {
    EpisodeSpec {
        kind: EpisodeKind::Desaturation,
        device: EPISODE_DEVICE.to_owned(),
        start: EPISODE_AFTER.mul_f64(time_scale),
    }
}

/// The devices that speak MQTT 5 (every fourth); the rest speak 3.1.1.
pub fn mqtt5_devices(devices: u32) -> Vec<String> {
    (4..=devices).step_by(4).map(device).collect()
}

/// The faults of the scenario, on devices 3 to 11 and the last one, and a reconnect
/// storm of the whole fleet. Times are wall clock; the revocation and the storm come
/// at 40 % and 60 % of the run so that the devices reconnect while still generating.
pub fn faults(devices: u32, duration: Duration) -> Vec<FaultSpec> {
    let at = |s: u64| Duration::from_secs(s);
    let fault = |kind, n, when| FaultSpec::new(kind, &device(n), when);
    vec![
        FaultSpec {
            count: 2,
            ..fault(FaultKind::Duplicate, 3, at(3))
        },
        fault(FaultKind::Replay, 4, at(4)),
        fault(FaultKind::BadSignature, 5, at(5)),
        fault(FaultKind::OutOfOrder, 6, at(5)),
        // Device 7 speaks MQTT 3.1.1 (the broker closes its connection), device 8
        // MQTT 5 (PUBACK 0x87).
        fault(FaultKind::WrongTopic, 7, at(6)),
        fault(FaultKind::WrongTopic, 8, at(6)),
        fault(FaultKind::ForeignClientId, 9, at(7)),
        fault(FaultKind::ClockSkew, 10, at(3)),
        FaultSpec {
            count: 3,
            ..fault(FaultKind::RebootStorm, 11, at(8))
        },
        fault(
            FaultKind::RevokedCertificate,
            devices,
            duration.mul_f64(0.4).max(at(9)),
        ),
        FaultSpec {
            scope: Scope::All,
            ..FaultSpec::new(
                FaultKind::ReconnectStorm,
                "",
                duration.mul_f64(0.6).max(at(11)),
            )
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_rules_allow_its_fast_device_clocks() {
        let times = AlertTimes::for_run(Duration::from_secs(60));
        let text = demo_rules(Duration::from_secs(25 * 30), times);
        let rules = vitalmq_policies::RuleSet::parse(&text, Path::new("rules.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rules.clock().max_ahead_s, 25 * 30 + 300);
        assert_eq!(rules.rules().len(), 5, "otherwise the shipped rules");
        let alerting = rules.alerting();
        assert_eq!(alerting.silence.after_s, 10);
        assert_eq!(
            alerting.ack_after_s(vitalmq_policies::Severity::Urgent),
            Some(15)
        );
        assert_eq!(
            alerting.ack_after_s(vitalmq_policies::Severity::Review),
            Some(1800),
            "the rest as shipped"
        );
    }

    #[test]
    fn the_alert_timings_happen_within_every_run() {
        for secs in [15, 20, 60, 600] {
            let duration = Duration::from_secs(secs);
            let t = AlertTimes::for_run(duration);
            assert!(t.escalation_due() < duration, "{secs} s: {t:?}");
            assert!(
                t.silence_after_s >= 6,
                "healthy devices reconnect within it"
            );
            assert!(ALARM_AFTER + ALARM_FOR < MIN_DURATION);
        }
        let alarm = alarm_episode(30.0).expect("alarm spec");
        assert_eq!(alarm.device, ALARM_DEVICE);
        assert_eq!(alarm.start, Duration::from_secs(60));
        assert_eq!(alarm.duration, Some(Duration::from_secs(180)));
    }

    #[test]
    fn the_embedded_configs_parse() {
        let dir = tempfile::tempdir().expect("tempdir");
        let broker = dir.path().join("broker.toml");
        std::fs::write(&broker, broker_config_toml()).expect("write");
        let b = vitalmq_broker::BrokerConfig::load(&broker).expect("broker config");
        assert_eq!(b.listen.port(), 0);
        assert!(b.policy.acl.starts_with(dir.path()));
        let bridge = dir.path().join("bridge.toml");
        std::fs::write(&bridge, bridge_config_toml(8883)).expect("write");
        let c = vitalmq_bridge::BridgeConfig::load(&bridge).expect("bridge config");
        assert_eq!(c.broker.address, "127.0.0.1:8883");
        assert_eq!(c.sinks.len(), 2, "care and research");
        let e = c.encryption.as_ref().expect("[encryption]");
        assert_eq!(e.key_file, dir.path().join("kek.json"));
        assert_eq!(
            e.keyring_path(&c.data_dir),
            dir.path().join("bridge-data/keyring.sqlite3")
        );
        let l = c.lifecycle.as_ref().expect("[lifecycle]");
        assert_eq!(l.retention, dir.path().join("retention.toml"));
        assert_eq!(
            l.holds.as_deref(),
            Some(dir.path().join("holds.toml").as_path())
        );
        vitalmq_policies::RetentionPolicy::parse(SHIPPED_RETENTION, Path::new("r.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        vitalmq_policies::LegalHolds::parse(NO_HOLDS, Path::new("h.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.audit_ship.len(), 2);
        assert_eq!(c.audit_ship[0].component, "broker");
        assert_eq!(
            c.audit_ship[0].path, b.audit.path,
            "the bridge ships the log the broker writes"
        );
        assert!(SHIPPED_ACL.contains("vitalmq-acl/v1"));
    }

    #[test]
    fn the_scenario_fits_the_smallest_fleet() {
        let specs = faults(MIN_DEVICES, MIN_DURATION);
        for spec in &specs {
            if let Scope::Device(d) = &spec.scope {
                let n: u32 = d.trim_start_matches("dev-").parse().expect("number");
                assert!((3..=MIN_DEVICES).contains(&n), "{d}");
                assert!(spec.at < MIN_DURATION, "{spec:?}");
            }
        }
        let faulted = |d: &str| {
            specs
                .iter()
                .any(|s| matches!(&s.scope, Scope::Device(x) if x == d))
        };
        assert!(
            !faulted(SILENT_DEVICE) && !faulted(ALARM_DEVICE),
            "the silence and the alarm are alone on their devices' alerts"
        );
        assert_ne!(SILENT_DEVICE, ALARM_DEVICE);
        assert!(mqtt5_devices(MIN_DEVICES).contains(&device(8)));
        assert!(!mqtt5_devices(MIN_DEVICES).contains(&device(7)));
        assert_eq!(episode(30.0).start, Duration::from_secs(180));
    }
}
