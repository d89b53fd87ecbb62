//! The demo's governance scenario (issue 19): research consent for most devices, a
//! research sink that receives only consented, minimised events, one device's research
//! consent withdrawn mid-run, and one device reassigned to another patient mid-run
//! (readings observed before the change, however late they arrive, stay with the earlier
//! patient).
//!
//! Every change goes through the same function as `vitalmq registry` (locked, validated,
//! atomic, operator-audited); the bridge picks the file up by itself, the broker is
//! reloaded as an operator would. Changes name an instant on the devices' clock: at
//! `--time-scale` X the simulated clocks run X times faster than the wall clock, and a
//! reading is judged by its `observed_at`, so a change takes effect `LEAD` of wall time
//! after it is made, when the devices' clocks reach it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use serde_json::Value;
use vitalmq_bridge::sink::object::sealed as object_sealed;
use vitalmq_keyring::Keyring;
use vitalmq_policies::{Use, format_rfc3339, parse_rfc3339};

use super::report::Check;
use super::setup::{WorkDir, device};
use crate::registry_cmd::{self, Actor, Change};

/// The device reassigned to another patient mid-run.
pub const REASSIGNED_DEVICE: &str = "dev-00012";
/// The patient pseudonym it is reassigned to.
pub const NEW_PATIENT: &str = "pt-demo-reassigned";
/// The device whose research consent is withdrawn mid-run.
pub const WITHDRAWN_DEVICE: &str = "dev-00013";
/// The purpose of the second sink.
pub const RESEARCH: &str = "research";
/// The research sink's directory, beside the care sink's `objects/`.
pub const RESEARCH_DIR: &str = "objects-research";
/// What the research sink receives: measurements and their context, no patient
/// reference, no payload keys the schema does not know, no raw bytes.
pub const RESEARCH_FIELDS: &[&str] = &[
    "device",
    "site",
    "type",
    "observed_at",
    "m",
    "q",
    "fw",
    "model",
];

/// How long after a change is made it takes effect (wall time): the bridge's file
/// watch must have reloaded the registry before the devices' clocks reach it.
const LEAD: Duration = Duration::from_secs(3);

/// Whether device number `n` consented to research: all but every fifth, whose
/// events are withheld from the research sink as `no_consent`.
pub fn consents_to_research(n: u32) -> bool {
    n % 5 != 0
}

/// The research sink's section of the bridge configuration.
pub fn research_sink_toml() -> String {
    let fields: Vec<String> = RESEARCH_FIELDS.iter().map(|f| format!("{f:?}")).collect();
    format!(
        r#"
# A research data set: only events whose patient consented to research at the time
# they were observed, and only these fields (no patient reference, no unknown keys).
[[sinks]]
kind = "objects"
name = "research"
path = "{RESEARCH_DIR}"
purpose = "{RESEARCH}"
fields = [{}]
"#,
        fields.join(", ")
    )
}

/// Grants research consent, from now, to every device that gives it.
pub fn grant_research_consent(work: &WorkDir, devices: u32) -> anyhow::Result<u32> {
    let mut granted = 0;
    for n in (1..=devices).filter(|n| consents_to_research(*n)) {
        change(
            work,
            &device(n),
            Change::ConsentGrant {
                purpose: RESEARCH.into(),
                from: None,
                until: None,
            },
        )?;
        granted += 1;
    }
    Ok(granted)
}

/// Maps wall time to the simulated devices' clock.
#[derive(Debug, Clone, Copy)]
pub struct DeviceClock {
    origin_ms: u64,
    scale: f64,
}

impl DeviceClock {
    /// The devices' clock, started now at `scale` times real time.
    pub fn starting_now(scale: f64) -> anyhow::Result<Self> {
        Ok(Self {
            origin_ms: wall_ms()?,
            scale,
        })
    }

    /// What the devices' clocks read now.
    pub fn now_ms(&self) -> anyhow::Result<u64> {
        self.reads_in(Duration::ZERO)
    }

    /// What the devices' clocks read `ahead` of wall time from now.
    fn reads_in(&self, ahead: Duration) -> anyhow::Result<u64> {
        let elapsed = Duration::from_millis(wall_ms()?.saturating_sub(self.origin_ms)) + ahead;
        Ok(self.origin_ms + u64::try_from(elapsed.mul_f64(self.scale).as_millis())?)
    }

    /// The wall time at which the devices' clocks read `device_ms`.
    fn wall_at(&self, device_ms: u64) -> u64 {
        let since = Duration::from_millis(device_ms.saturating_sub(self.origin_ms));
        self.origin_ms + u64::try_from(since.div_f64(self.scale).as_millis()).unwrap_or(0)
    }
}

/// The two changes made while the devices run, with the instant each takes effect.
#[derive(Debug, Default, Clone)]
pub struct Changes {
    pub withdrawn_at: Option<u64>,
    pub reassigned: Option<Reassigned>,
}

#[derive(Debug, Clone)]
pub struct Reassigned {
    /// Device time from which the device serves [`NEW_PATIENT`].
    pub at: u64,
    /// Wall time at which the devices' clocks reached it.
    pub wall_at: u64,
    pub previous_patient: String,
}

/// Withdraws [`WITHDRAWN_DEVICE`]'s research consent, effective [`LEAD`] from now.
pub fn withdraw(work: &WorkDir, clock: &DeviceClock) -> anyhow::Result<u64> {
    let at = clock.reads_in(LEAD)?;
    change(
        work,
        WITHDRAWN_DEVICE,
        Change::ConsentWithdraw {
            purpose: RESEARCH.into(),
            at: Some(format_rfc3339(at)),
        },
    )?;
    Ok(at)
}

/// Reassigns [`REASSIGNED_DEVICE`] to [`NEW_PATIENT`] on its site, effective when the
/// devices' clocks reach wall time `effective` from now (at least [`LEAD`]).
pub fn reassign(
    work: &WorkDir,
    clock: &DeviceClock,
    effective: Duration,
) -> anyhow::Result<Reassigned> {
    let registry = vitalmq_policies::DeviceRegistry::load(&work.registry())?;
    let at = clock.reads_in(effective.max(LEAD))?;
    let id = vitalmq_envelope::DeviceId::new(REASSIGNED_DEVICE)?;
    let Some(Use::Assigned { patient_ref, site }) =
        registry.assignment_at(&id, at).map(|a| &a.serves)
    else {
        anyhow::bail!("{REASSIGNED_DEVICE} is not assigned");
    };
    let (previous_patient, site) = (patient_ref.to_string(), site.to_string());
    change(
        work,
        REASSIGNED_DEVICE,
        Change::Assign {
            patient_ref: NEW_PATIENT.into(),
            site,
            at: Some(format_rfc3339(at)),
        },
    )?;
    Ok(Reassigned {
        at,
        wall_at: clock.wall_at(at),
        previous_patient,
    })
}

fn change(work: &WorkDir, device: &str, change: Change) -> anyhow::Result<()> {
    registry_cmd::apply(&work.registry(), device, &change, &Actor::default())
        .with_context(|| format!("{} of {device}", change.action()))?;
    Ok(())
}

fn wall_ms() -> anyhow::Result<u64> {
    Ok(u64::try_from(
        SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis(),
    )?)
}

/// One record of an objects sink, as read from its files.
struct SinkRecord {
    device: String,
    observed_at: u64,
    received_at: u64,
    patient_ref: Option<String>,
    keys: BTreeSet<String>,
}

/// Every record of the `.ndjson` objects of the objects sink in `dir`; sealed ones
/// (`.ndjson.vmqs`, encryption at rest) opened with `keyring`.
fn sink_records(dir: &Path, keyring: &Keyring) -> anyhow::Result<Vec<SinkRecord>> {
    let mut out = Vec::new();
    let normalized = dir.join("normalized");
    if !normalized.exists() {
        return Ok(out);
    }
    for entry in walkdir(&normalized)? {
        let name = entry.display().to_string();
        let bytes = if name.ends_with(".ndjson") {
            std::fs::read(&entry).with_context(|| format!("reading {name}"))?
        } else if name.ends_with(".ndjson.vmqs") {
            let sealed = std::fs::read(&entry).with_context(|| format!("reading {name}"))?;
            object_sealed::open(keyring, &name, &sealed)
                .with_context(|| format!("opening {name}"))?
        } else {
            continue;
        };
        let text = String::from_utf8(bytes).with_context(|| format!("{name}: not UTF-8"))?;
        for line in text.lines() {
            let v: serde_json::Map<String, Value> = serde_json::from_str(line)
                .with_context(|| format!("a line of {}", entry.display()))?;
            let text = |key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
            let instant = |key: &str| {
                v.get(key)
                    .and_then(Value::as_str)
                    .and_then(|t| parse_rfc3339(t).ok())
                    .unwrap_or(0)
            };
            out.push(SinkRecord {
                device: text("device").unwrap_or_default(),
                observed_at: instant("observed_at"),
                received_at: instant("received_at"),
                patient_ref: text("patient_ref"),
                keys: v.keys().cloned().collect(),
            });
        }
    }
    Ok(out)
}

pub(super) fn walkdir(dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| d.display().to_string())? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    Ok(files)
}

/// The governance checks, from what the care sink (`objects/`, every event) and the
/// research sink wrote and the research sink's withheld counts per reason.
pub fn checks(
    work: &WorkDir,
    keyring: &Keyring,
    changes: &Changes,
    withheld: &BTreeMap<String, u64>,
) -> anyhow::Result<Vec<Check>> {
    let records = sink_records(&work.root.join(RESEARCH_DIR), keyring)?;
    let mut stored: BTreeMap<String, Vec<(u64, u64, Option<String>)>> = BTreeMap::new();
    for r in sink_records(&work.objects(), keyring)? {
        stored
            .entry(r.device)
            .or_default()
            .push((r.observed_at, r.received_at, r.patient_ref));
    }
    let allowed: BTreeSet<&str> = RESEARCH_FIELDS
        .iter()
        .chain(vitalmq_bridge::governance::ALWAYS_KEPT)
        .copied()
        .collect();
    let mut checks = Vec::new();

    let extra: BTreeSet<&String> = records
        .iter()
        .flat_map(|r| r.keys.iter())
        .filter(|k| !allowed.contains(k.as_str()))
        .collect();
    checks.push(Check::new(
        !records.is_empty() && extra.is_empty(),
        format!(
            "research sink: {} events, each with only the allowed fields{}",
            records.len(),
            if extra.is_empty() {
                String::new()
            } else {
                format!(" (found {extra:?})")
            }
        ),
    ));

    let unconsented: BTreeSet<&str> = records
        .iter()
        .map(|r| r.device.as_str())
        .filter(|d| {
            d.trim_start_matches("dev-")
                .parse::<u32>()
                .is_ok_and(|n| !consents_to_research(n))
        })
        .collect();
    checks.push(Check::new(
        unconsented.is_empty(),
        format!(
            "research sink: nothing from devices without research consent (every fifth){}",
            if unconsented.is_empty() {
                String::new()
            } else {
                format!(" (found {unconsented:?})")
            }
        ),
    ));

    if let Some(at) = changes.withdrawn_at {
        let after = records
            .iter()
            .filter(|r| r.device == WITHDRAWN_DEVICE && r.observed_at >= at)
            .count();
        let before = records
            .iter()
            .filter(|r| r.device == WITHDRAWN_DEVICE && r.observed_at < at)
            .count();
        let stored_after = stored
            .get(WITHDRAWN_DEVICE)
            .map_or(0, |v| v.iter().filter(|(o, _, _)| *o >= at).count());
        checks.push(Check::new(
            after == 0 && before > 0 && stored_after > 0,
            format!(
                "consent withdrawal: {WITHDRAWN_DEVICE}'s {before} events observed before it reached research, none of the {stored_after} observed after ({after})"
            ),
        ));
    } else {
        checks.push(Check::skipped(
            "consent withdrawal (stopped before it was due)",
        ));
    }

    let stored_total: u64 = stored.values().map(|v| v.len() as u64).sum();
    let withheld_total: u64 = withheld.values().sum();
    let research_total = records.len() as u64;
    checks.push(Check::new(
        research_total + withheld_total == stored_total,
        format!(
            "withheld from research, counted: {} ({}) + {research_total} delivered = {stored_total} stored",
            withheld_total,
            withheld
                .iter()
                .map(|(r, n)| format!("{r} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ));

    if let Some(r) = &changes.reassigned {
        let events = stored.get(REASSIGNED_DEVICE).map_or(&[][..], Vec::as_slice);
        let wrong = events
            .iter()
            .filter(|(observed, _, patient)| {
                let expected = if *observed < r.at {
                    r.previous_patient.as_str()
                } else {
                    NEW_PATIENT
                };
                patient.as_deref() != Some(expected)
            })
            .count();
        let after = events.iter().filter(|(o, _, _)| *o >= r.at).count();
        let late = events
            .iter()
            .filter(|(observed, received, _)| *observed < r.at && *received >= r.wall_at)
            .count();
        checks.push(Check::new(
            wrong == 0 && after > 0 && after < events.len(),
            format!(
                "reassignment: {REASSIGNED_DEVICE}'s {} events observed before it stay with {}, {after} after go to {NEW_PATIENT}, {late} received after it took effect attributed by observation time ({wrong} misattributed)",
                events.len() - after,
                r.previous_patient
            ),
        ));
    } else {
        checks.push(Check::skipped("reassignment (stopped before it was due)"));
    }
    Ok(checks)
}
