//! The demo's checks, made after everything stopped: what the simulated devices say
//! they made, sent, injected and saw (the simulator's summary) against what the bridge
//! stored, refused and alerted (its store and audit log) and what the broker refused
//! (its audit log). The alert checks ([`alert_checks`]) read the alert rows as the
//! bridge published them: the device alarm opened and resolved, the silent device's
//! `no-data`, the operator's acknowledgement and the unacknowledged re-send.
//!
//! Each check is one line, `ok` or `FAIL`; the demo exits 0 only if all pass. Nothing
//! here prints measured values or patient references.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::Context as _;
use vitalmq_audit::{AuditRecord, Event};
use vitalmq_bridge::store::Store;
use vitalmq_bridge::window::Verdict;
use vitalmq_device_sim::device::DeviceReport;
use vitalmq_device_sim::faults::{FaultKind, FaultReport};
use vitalmq_device_sim::ring::Key;
use vitalmq_device_sim::runner::Summary;

use super::operator::{AckSent, OPERATOR};
use super::setup::{self, AlertTimes, TRUST_DOMAIN};

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Failed,
    /// Not checked: the run was stopped (Ctrl-C) before the fault was due.
    Skipped,
}

/// One check and its verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub outcome: Outcome,
    pub text: String,
}

impl Check {
    pub(super) fn new(ok: bool, text: impl Into<String>) -> Self {
        Self {
            outcome: if ok { Outcome::Passed } else { Outcome::Failed },
            text: text.into(),
        }
    }

    pub(super) fn skipped(text: impl Into<String>) -> Self {
        Self {
            outcome: Outcome::Skipped,
            text: text.into(),
        }
    }

    pub fn failed(&self) -> bool {
        self.outcome == Outcome::Failed
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let label = match self.outcome {
            Outcome::Passed => "ok",
            Outcome::Failed => "FAIL",
            Outcome::Skipped => "skip",
        };
        write!(f, "{label:<5} {}", self.text)
    }
}

/// What the bridge's store holds, by device.
#[derive(Debug, Default)]
pub struct StoreView {
    /// Per device, `(epoch, seq) -> verdict`, and how many rows each key has.
    events: BTreeMap<String, BTreeMap<Key, (String, u32)>>,
    quarantine: BTreeMap<(String, String), u64>,
    pub quarantine_by_reason: BTreeMap<String, u64>,
    gaps: BTreeMap<(String, String), u64>,
    counters: BTreeMap<(String, String), u64>,
    pub total_events: u64,
    /// Every alert row (clinical and operational), in the order written.
    alerts: Vec<AlertChange>,
}

/// One alert row: the state change and the body as published.
#[derive(Debug)]
struct AlertChange {
    alert_id: String,
    state: String,
    device: Option<String>,
    rule: Option<String>,
    body: serde_json::Value,
}

impl AlertChange {
    fn text(&self, key: &str) -> Option<&str> {
        self.body.get(key).and_then(serde_json::Value::as_str)
    }
}

impl StoreView {
    pub fn read(store: &Store) -> anyhow::Result<Self> {
        let mut v = Self::default();
        for row in store.list_events()? {
            let slot = v
                .events
                .entry(row.head.device.to_string())
                .or_default()
                .entry(Key::new(row.head.epoch, row.head.seq))
                .or_insert_with(|| (Verdict::Accept(row.head.verdict).to_string(), 0));
            slot.1 += 1;
            v.total_events += 1;
        }
        for row in store.list_quarantine()? {
            let reason = row.reason.as_str().to_owned();
            let device = row
                .device
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            *v.quarantine.entry((device, reason.clone())).or_default() += 1;
            *v.quarantine_by_reason.entry(reason).or_default() += 1;
        }
        for row in store.list_gaps()? {
            *v.gaps
                .entry((row.device.to_string(), row.state.as_str().to_owned()))
                .or_default() += 1;
        }
        for row in store.list_alerts()? {
            v.alerts.push(AlertChange {
                body: serde_json::from_str(&row.body).unwrap_or(serde_json::Value::Null),
                alert_id: row.alert_id,
                state: row.state,
                device: row.device.map(|d| d.to_string()),
                rule: row.rule,
            });
        }
        let devices: BTreeSet<String> = v.events.keys().cloned().collect();
        for device in devices {
            for name in ["duplicate", "replay"] {
                let n = store.counter(&device, name)?;
                v.counters.insert((device.clone(), name.to_owned()), n);
            }
        }
        Ok(v)
    }

    fn counter(&self, device: &str, name: &str) -> u64 {
        self.counters
            .get(&(device.to_owned(), name.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    fn quarantined(&self, device: &str, reason: &str) -> u64 {
        self.quarantine
            .get(&(device.to_owned(), reason.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    fn quarantined_any(&self, device: &str) -> u64 {
        self.quarantine
            .iter()
            .filter(|((d, _), _)| d == device)
            .map(|(_, n)| n)
            .sum()
    }

    fn gaps(&self, device: &str, state: &str) -> u64 {
        self.gaps
            .get(&(device.to_owned(), state.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    fn verdict(&self, device: &str, key: Key) -> Option<&str> {
        self.events.get(device)?.get(&key).map(|(v, _)| v.as_str())
    }

    fn keys(&self, device: &str) -> Option<&BTreeMap<Key, (String, u32)>> {
        self.events.get(device)
    }

    /// The state changes of clinical alerts of `rule` on `device`.
    fn alert_changes<'a>(
        &'a self,
        rule: &'a str,
        device: &'a str,
    ) -> impl Iterator<Item = &'a AlertChange> + 'a {
        self.alerts
            .iter()
            .filter(move |a| a.rule.as_deref() == Some(rule) && a.device.as_deref() == Some(device))
    }

    /// The changes of one alert.
    fn changes_of<'a>(&'a self, alert_id: &'a str) -> impl Iterator<Item = &'a AlertChange> + 'a {
        self.alerts.iter().filter(move |a| a.alert_id == alert_id)
    }
}

/// The records of an audit log (the broker's or the bridge's).
#[derive(Debug, Default)]
pub struct AuditLog {
    records: Vec<AuditRecord>,
}

impl AuditLog {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let records = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str)
            .collect::<Result<Vec<AuditRecord>, _>>()
            .with_context(|| format!("parsing {}", path.display()))?;
        Ok(Self { records })
    }

    /// Records of `event` by device `id` with `reason`.
    fn count(&self, event: Event, device: &str, reason: &str) -> usize {
        let identity = format!("spiffe://{TRUST_DOMAIN}/device/{device}");
        self.records
            .iter()
            .filter(|r| {
                r.event == event
                    && r.reason.as_deref() == Some(reason)
                    && r.actor.as_ref().and_then(|a| a.identity.as_deref()) == Some(&identity)
            })
            .count()
    }

    /// Publish denials of device `id` on topics of device `peer`.
    fn publish_denials(&self, device: &str, peer: &str) -> usize {
        let identity = format!("spiffe://{TRUST_DOMAIN}/device/{device}");
        let prefix = format!("devices/{peer}/");
        self.records
            .iter()
            .filter(|r| {
                r.event == Event::AuthorizationDenied
                    && r.action.as_deref() == Some("publish")
                    && r.resource
                        .as_deref()
                        .is_some_and(|t| t.starts_with(&prefix))
                    && r.actor.as_ref().and_then(|a| a.identity.as_deref()) == Some(&identity)
            })
            .count()
    }

    /// Handshakes refused for a revoked certificate (the identity is unknown then).
    fn revoked_handshakes(&self) -> usize {
        self.records
            .iter()
            .filter(|r| {
                r.event == Event::ConnectionRefused
                    && r.reason.as_deref() == Some("certificate_revoked")
            })
            .count()
    }
}

/// Everything the checks look at.
#[derive(Debug)]
pub struct Evidence<'a> {
    pub sim: &'a Summary,
    pub store: &'a StoreView,
    pub broker: &'a AuditLog,
    pub bridge: &'a AuditLog,
    /// The operator's acknowledgement, if it gave one.
    pub ack: Option<&'a AckSent>,
    /// The alert timings of the demo's rules.
    pub times: AlertTimes,
    pub mqtt5: &'a [String],
    /// When the devices were told to stop generating, seconds after they started.
    pub stopped_at_s: f64,
    /// `(name, path, records or the error)` of each audit log's chain verification.
    pub audit_chains: Vec<(&'static str, &'a Path, anyhow::Result<u64>)>,
}

/// `n thing` or `n things`.
fn count(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}

fn keys_text(keys: &[Key]) -> String {
    keys.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn seen_text(r: &FaultReport) -> String {
    if r.seen.is_empty() {
        return "nothing".to_owned();
    }
    r.seen
        .iter()
        .map(|(what, n)| {
            if *n == 1 {
                what.clone()
            } else {
                format!("{what} ×{n}")
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn seen_with(r: &FaultReport, prefix: &str) -> u32 {
    r.seen
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, n)| n)
        .sum()
}

/// All checks, in the order shown.
pub fn checks(e: &Evidence<'_>) -> Vec<Check> {
    let mut out = Vec::new();
    let devices = &e.sim.devices;
    let connected = devices.iter().filter(|d| d.connects > 0).count();
    let v5 = devices.iter().filter(|d| e.mqtt5.contains(&d.id)).count();
    out.push(Check::new(
        connected == devices.len(),
        format!(
            "every device connected ({connected}/{}; {v5} over MQTT 5, {} over 3.1.1)",
            devices.len(),
            devices.len() - v5
        ),
    ));
    let mut storm: Vec<(&DeviceReport, &FaultReport)> = Vec::new();
    let too_late = |f: &FaultReport| f.injected == 0 && f.at_s >= e.stopped_at_s;
    for d in devices {
        for f in &d.faults {
            if f.fault == FaultKind::ReconnectStorm {
                storm.push((d, f));
            } else if too_late(f) {
                out.push(Check::skipped(format!(
                    "{} on {}: due at {} s, the run stopped at {:.0} s",
                    f.fault, d.id, f.at_s, e.stopped_at_s
                )));
            } else {
                out.push(fault_check(e, d, f));
            }
        }
    }
    if storm.iter().all(|(_, f)| too_late(f)) {
        if let Some((_, f)) = storm.first() {
            out.push(Check::skipped(format!(
                "reconnect storm: due at {} s, the run stopped at {:.0} s",
                f.at_s, e.stopped_at_s
            )));
        }
    } else {
        out.push(storm_check(&storm));
    }
    out.push(quarantine_check(e));
    out.push(nothing_lost(e));
    out.extend(alert_checks(e));
    for (name, path, chain) in &e.audit_chains {
        out.push(match chain {
            Ok(n) => Check::new(
                true,
                format!(
                    "audit log of the {name}: chain intact, {n} records ({})",
                    path.display()
                ),
            ),
            Err(why) => Check::new(false, format!("audit log of the {name}: {why:#}")),
        });
    }
    out
}

fn fault_check(e: &Evidence<'_>, d: &DeviceReport, f: &FaultReport) -> Check {
    let id = d.id.as_str();
    let all_injected = f.injected == f.planned;
    let version = if e.mqtt5.contains(&d.id) {
        "MQTT 5"
    } else {
        "MQTT 3.1.1"
    };
    let head = if f.fault == FaultKind::WrongTopic {
        format!("{} on {id} ({version}):", f.fault)
    } else {
        format!("{} on {id}:", f.fault)
    };
    match f.fault {
        FaultKind::Duplicate => {
            let refused = e.store.counter(id, "duplicate");
            let others = if refused > u64::from(f.injected) {
                " (the rest are resends after reconnects)"
            } else {
                ""
            };
            Check::new(
                all_injected && refused >= u64::from(f.injected),
                format!(
                    "{head} resent {} ({}) -> bridge dropped {} as duplicate{others}",
                    count(f.injected, "receipted message", "receipted messages"),
                    keys_text(&f.messages),
                    count(refused, "message", "messages"),
                ),
            )
        }
        FaultKind::Replay => {
            let refused = e.store.counter(id, "replay");
            Check::new(
                all_injected && refused >= u64::from(f.injected),
                format!(
                    "{head} rebooted, then sent {} of the old epoch ({}) -> bridge refused {} as replay",
                    count(f.injected, "message", "messages"),
                    keys_text(&f.messages),
                    count(refused, "message", "messages"),
                ),
            )
        }
        FaultKind::BadSignature => {
            let refused = e.store.quarantined(id, "bad_signature");
            Check::new(
                all_injected && refused >= u64::from(f.injected),
                format!(
                    "{head} sent {} with one signature bit flipped ({}) -> bridge quarantined {} as bad_signature",
                    count(f.injected, "copy", "copies"),
                    keys_text(&f.messages),
                    count(refused, "message", "messages"),
                ),
            )
        }
        FaultKind::OutOfOrder => {
            let (first, second) = match f.messages.as_slice() {
                [a, b, ..] => (*a, *b),
                _ => {
                    return Check::new(false, format!("{head} not injected ({})", seen_text(f)));
                }
            };
            let late = e.store.verdict(id, second);
            let ok = all_injected
                && late == Some("out_of_order")
                && e.store.gaps(id, "closed") >= 1
                && e.store.gaps(id, "open") == 0;
            Check::new(
                ok,
                format!(
                    "{head} sent {first} before {second} -> bridge accepted {second} late ({}), the gap it opened closed ({} closed, {} open)",
                    late.unwrap_or("not stored"),
                    e.store.gaps(id, "closed"),
                    e.store.gaps(id, "open"),
                ),
            )
        }
        FaultKind::WrongTopic => {
            let peer = f.peer.as_deref().unwrap_or("?");
            let refused = seen_with(f, "PUBACK") + seen_with(f, "connection closed");
            let audited = e.broker.publish_denials(id, peer);
            Check::new(
                all_injected && refused >= f.injected && audited >= f.injected as usize,
                format!(
                    "{head} published a copy on devices/{peer}/... -> device saw: {}; broker audited {}",
                    seen_text(f),
                    count(audited as u64, "publish denial", "publish denials"),
                ),
            )
        }
        FaultKind::ForeignClientId => {
            let peer = f.peer.as_deref().unwrap_or("?");
            let accepted = seen_with(f, "CONNACK accepted");
            let audited = e
                .broker
                .count(Event::ConnectionRefused, id, "client_id_mismatch");
            Check::new(
                all_injected
                    && accepted == 0
                    && !f.seen.is_empty()
                    && audited >= f.injected as usize,
                format!(
                    "{head} connected claiming client id {peer} -> device saw: {}; broker audited {audited} client_id_mismatch",
                    seen_text(f)
                ),
            )
        }
        FaultKind::RevokedCertificate => revoked_check(e, d, f),
        FaultKind::ClockSkew => {
            let stored = e.store.keys(id).map_or(0, BTreeMap::len);
            let refused = e.store.quarantined_any(id);
            Check::new(
                all_injected && refused == 0 && stored > 0,
                format!(
                    "{head} ts offset {:+} s from {} s on -> accepted, as the SPEC has no rule on ts ({stored} events stored, {refused} refused)",
                    f.offset_ms.unwrap_or(0) / 1000,
                    f.at_s
                ),
            )
        }
        FaultKind::RebootStorm => {
            let replays = e.store.counter(id, "replay");
            let made: BTreeSet<u64> = d
                .epochs
                .iter()
                .filter(|m| m.made > 0)
                .map(|m| m.epoch)
                .collect();
            let stored: BTreeSet<u64> = e
                .store
                .keys(id)
                .map(|k| k.keys().map(|k| k.epoch).collect())
                .unwrap_or_default();
            let (lo, hi) = (
                d.epochs.first().map_or(0, |m| m.epoch),
                d.epochs.last().map_or(0, |m| m.epoch),
            );
            Check::new(
                all_injected && replays == 0 && made.is_subset(&stored),
                format!(
                    "{head} {} reboots (epochs {lo} to {hi}) -> every epoch with messages stored ({} of {}), {replays} replays refused",
                    f.injected,
                    made.intersection(&stored).count(),
                    made.len()
                ),
            )
        }
        FaultKind::ReconnectStorm => storm_check(&[(d, f)]),
    }
}

fn revoked_check(e: &Evidence<'_>, d: &DeviceReport, f: &FaultReport) -> Check {
    let id = d.id.as_str();
    let head = format!("{} on {id}:", f.fault);
    let revocation = e.sim.revocations.iter().find(|r| r.device == d.id);
    let Some(revocation) = revocation.filter(|r| r.ok) else {
        return Check::new(
            false,
            format!(
                "{head} not revoked ({})",
                revocation.map_or("never due", |r| r.outcome.as_str())
            ),
        );
    };
    let closed = seen_with(f, "connection closed");
    let refused = seen_with(f, "reconnect refused");
    let accepted = seen_with(f, "connected:");
    let audited_close = e
        .broker
        .count(Event::ConnectionClosed, id, "certificate_no_longer_valid");
    let handshakes = e.broker.revoked_handshakes();
    Check::new(
        closed >= 1 && refused >= 1 && accepted == 0 && audited_close >= 1 && handshakes >= 1,
        format!(
            "{head} {} at {} s, broker reloaded -> device saw: {}; broker audited the close ({audited_close}) and {} refused as certificate_revoked",
            revocation.outcome,
            revocation.at_s,
            seen_text(f),
            count(handshakes as u64, "handshake", "handshakes"),
        ),
    )
}

fn storm_check(storm: &[(&DeviceReport, &FaultReport)]) -> Check {
    let dropped: Vec<_> = storm.iter().filter(|(_, f)| f.injected > 0).collect();
    let offline = storm.len() - dropped.len();
    let reconnected = dropped
        .iter()
        .filter(|(_, f)| f.reconnect_ms.is_some())
        .count();
    let slowest = dropped
        .iter()
        .filter_map(|(_, f)| f.reconnect_ms)
        .max()
        .unwrap_or(0);
    let at = storm.first().map_or(0.0, |(_, f)| f.at_s);
    Check::new(
        !dropped.is_empty() && reconnected == dropped.len(),
        format!(
            "reconnect storm at {at} s: {} dropped their connections at once ({offline} offline) -> {reconnected} reconnected, the slowest after {slowest} ms",
            count(dropped.len() as u64, "device", "devices"),
        ),
    )
}

/// Everything quarantined is explained by an injected fault.
fn quarantine_check(e: &Evidence<'_>) -> Check {
    let injected: u64 = e
        .sim
        .devices
        .iter()
        .flat_map(|d| &d.faults)
        .filter(|f| f.fault == FaultKind::BadSignature)
        .map(|f| u64::from(f.injected))
        .sum();
    let q = &e.store.quarantine_by_reason;
    let bad = q.get("bad_signature").copied().unwrap_or(0);
    let others: u64 = q
        .iter()
        .filter(|(k, _)| *k != "bad_signature")
        .map(|(_, n)| n)
        .sum();
    let shown = if q.is_empty() {
        "empty".to_owned()
    } else {
        q.iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Check::new(
        bad == injected && others == 0,
        format!("the quarantine holds exactly the injected forgeries: {shown}"),
    )
}

/// Every message a device made is stored exactly once, or still held by the device
/// awaiting a receipt; nothing is stored that a device did not make.
fn nothing_lost(e: &Evidence<'_>) -> Check {
    let mut problems = Vec::new();
    let mut held_notes = Vec::new();
    let mut sent_and_stored = 0u64;
    let silent_since = e.times.silent_at.as_secs_f64();
    for d in &e.sim.devices {
        if d.forged_only {
            // Every message it made was forged: refused, never stored (the quarantine
            // check accounts for them).
            continue;
        }
        let revoked = d
            .faults
            .iter()
            .any(|f| f.fault == FaultKind::RevokedCertificate);
        // It publishes nothing once silent, resends included, so what it held then
        // stays held.
        let silent = d.id == setup::SILENT_DEVICE && e.stopped_at_s >= silent_since;
        let made: BTreeSet<Key> = d
            .epochs
            .iter()
            .flat_map(|m| (0..m.made).map(move |s| Key::new(m.epoch, s)))
            .collect();
        let held: BTreeSet<Key> = d
            .held
            .iter()
            .flat_map(|r| (r.first..=r.last).map(move |s| Key::new(r.epoch, s)))
            .collect();
        let empty = BTreeMap::new();
        let stored = e.store.keys(&d.id).unwrap_or(&empty);
        let twice = stored.values().filter(|(_, n)| *n > 1).count();
        let foreign = stored.keys().filter(|k| !made.contains(k)).count();
        let missing = made
            .iter()
            .filter(|k| !stored.contains_key(k) && !held.contains(k))
            .count();
        sent_and_stored += stored.len() as u64;
        if twice + foreign + missing > 0 {
            problems.push(format!(
                "{}: {missing} missing, {twice} stored twice, {foreign} never made",
                d.id
            ));
        }
        if d.overflow_dropped > 0 {
            problems.push(format!(
                "{}: {} dropped from a full outbox",
                d.id, d.overflow_dropped
            ));
        }
        if !held.is_empty() {
            if revoked {
                held_notes.push(format!(
                    "{} still holds {} awaiting receipts it cannot get since its certificate was revoked",
                    d.id,
                    held.len()
                ));
            } else if silent {
                held_notes.push(format!(
                    "{} went silent holding {} it never sent",
                    d.id,
                    held.len()
                ));
            } else {
                problems.push(format!("{}: {} never receipted", d.id, held.len()));
            }
        }
    }
    let mut text = format!(
        "nothing lost: every message a device sent is stored exactly once ({sent_and_stored} events from {} devices)",
        e.sim.devices.len()
    );
    if !held_notes.is_empty() {
        text.push_str(&format!("; {}", held_notes.join("; ")));
    }
    if !problems.is_empty() {
        text.push_str(&format!(" -- but {}", problems.join("; ")));
    }
    Check::new(problems.is_empty(), text)
}

/// The issue 17 checks: every path that must end in an alert did, and an acknowledged
/// alert stopped being re-sent while an unacknowledged one was.
fn alert_checks(e: &Evidence<'_>) -> Vec<Check> {
    vec![
        alarm_check(e),
        silence_check(e),
        ack_check(e),
        escalation_check(e),
    ]
}

/// The devices whose certificate the run revoked (they go offline for good).
fn revoked_devices<'a>(e: &'a Evidence<'_>) -> BTreeSet<&'a str> {
    e.sim
        .revocations
        .iter()
        .filter(|r| r.ok)
        .map(|r| r.device.as_str())
        .collect()
}

fn states_text<'a>(changes: impl Iterator<Item = &'a AlertChange>) -> String {
    changes
        .map(|a| a.state.as_str())
        .collect::<Vec<_>>()
        .join(" -> ")
}

fn alarm_check(e: &Evidence<'_>) -> Check {
    let device = setup::ALARM_DEVICE;
    let rule = format!("device-alarm:{}", setup::ALARM_CODE);
    let cleared_at = setup::ALARM_AFTER + setup::ALARM_FOR;
    let head = format!(
        "device alarm on {device}: {} raised at {} s, cleared at {} s ->",
        setup::ALARM_CODE,
        setup::ALARM_AFTER.as_secs(),
        cleared_at.as_secs()
    );
    if e.stopped_at_s < cleared_at.as_secs_f64() {
        return Check::skipped(format!("{head} the run stopped at {:.0} s", e.stopped_at_s));
    }
    let changes: Vec<&AlertChange> = e.store.alert_changes(&rule, device).collect();
    let ids: BTreeSet<&str> = changes.iter().map(|a| a.alert_id.as_str()).collect();
    let has = |state: &str| changes.iter().filter(|a| a.state == state).count();
    let severity = changes
        .first()
        .and_then(|a| a.text("severity"))
        .unwrap_or("-");
    Check::new(
        ids.len() == 1 && has("open") == 1 && has("resolved") == 1,
        format!(
            "{head} alert {rule} opened ({severity}) and resolved, one episode ({}: {})",
            count(ids.len() as u64, "alert id", "alert ids"),
            states_text(changes.into_iter()),
        ),
    )
}

fn silence_check(e: &Evidence<'_>) -> Check {
    let device = setup::SILENT_DEVICE;
    let t = e.times;
    let head = format!(
        "silence on {device}: connected, publishing nothing from {} s ->",
        t.silent_at.as_secs()
    );
    if e.stopped_at_s < t.silence_alert_due().as_secs_f64() {
        return Check::skipped(format!("{head} the run stopped at {:.0} s", e.stopped_at_s));
    }
    let revoked = revoked_devices(e);
    let opened: Vec<&AlertChange> = e
        .store
        .alerts
        .iter()
        .filter(|a| a.rule.as_deref() == Some("no-data") && a.state == "open")
        .collect();
    let reason = |a: &AlertChange| {
        a.text("silence_reason")
            .or_else(|| a.text("reason"))
            .unwrap_or("-")
            .to_owned()
    };
    let silent: Vec<String> = opened
        .iter()
        .filter(|a| a.device.as_deref() == Some(device))
        .map(|a| reason(a))
        .collect();
    let mut expected_others = Vec::new();
    let mut unexpected = Vec::new();
    for a in opened
        .iter()
        .filter(|a| a.device.as_deref() != Some(device))
    {
        let who = a.device.as_deref().unwrap_or("-");
        if revoked.contains(who) {
            expected_others.push(format!("{who} ({}, its certificate revoked)", reason(a)));
        } else {
            unexpected.push(format!("{who} ({})", reason(a)));
        }
    }
    let mut text = format!(
        "{head} no-data alert opened with reason {} after {} s without data",
        if silent.is_empty() {
            "- (none opened)".to_owned()
        } else {
            silent.join(", ")
        },
        t.silence_after_s
    );
    if !expected_others.is_empty() {
        text.push_str(&format!(
            "; also for {}, as it should",
            expected_others.join(", ")
        ));
    }
    if unexpected.is_empty() {
        text.push_str("; no healthy device alerted");
    } else {
        text.push_str(&format!(" -- but also for {}", unexpected.join(", ")));
    }
    Check::new(silent == ["silent"] && unexpected.is_empty(), text)
}

fn ack_check(e: &Evidence<'_>) -> Check {
    let by = format!("spiffe://{TRUST_DOMAIN}/operator/{OPERATOR}");
    let due = setup::ALARM_AFTER.as_secs_f64() + 1.0;
    let Some(ack) = e.ack else {
        if e.stopped_at_s < due {
            return Check::skipped(format!(
                "acknowledgement: the device alarm was due at {} s, the run stopped at {:.0} s",
                setup::ALARM_AFTER.as_secs(),
                e.stopped_at_s
            ));
        }
        return Check::new(
            false,
            format!("acknowledgement: {OPERATOR} acknowledged nothing (no device alarm seen open)"),
        );
    };
    let changes: Vec<&AlertChange> = e.store.changes_of(&ack.alert_id).collect();
    let acked_at = changes.iter().position(|a| {
        a.state == "acknowledged" && a.body["ack"]["by"].as_str() == Some(by.as_str())
    });
    let nagged_after = acked_at.map_or(0, |i| {
        changes[i..]
            .iter()
            .filter(|a| a.state == "escalated" && a.text("reason") == Some("unacknowledged"))
            .count()
    });
    let audited = e
        .bridge
        .records
        .iter()
        .filter(|r| {
            r.event == Event::AlertAcknowledged
                && r.resource.as_deref() == Some(ack.alert_id.as_str())
                && r.actor.as_ref().and_then(|a| a.identity.as_deref()) == Some(by.as_str())
        })
        .count();
    Check::new(
        ack.refused.is_none() && acked_at.is_some() && audited >= 1 && nagged_after == 0,
        format!(
            "acknowledgement: {OPERATOR} published {} on {} ({}) -> bridge re-sent {} of {} {}, ack.by {by}; audited alert_acknowledged {audited}x; re-sent for want of an ack after it: {nagged_after}",
            super::operator::ack_payload(&ack.alert_id),
            ack.topic,
            ack.refused
                .as_deref()
                .map_or("PUBACK ok".to_owned(), |r| format!("refused: {r}")),
            ack.rule.as_deref().unwrap_or("-"),
            ack.device.as_deref().unwrap_or("-"),
            if acked_at.is_some() {
                "acknowledged"
            } else {
                "NOT acknowledged"
            },
        ),
    )
}

fn escalation_check(e: &Evidence<'_>) -> Check {
    let device = setup::SILENT_DEVICE;
    let t = e.times;
    let head = format!(
        "re-escalation: no-data of {device} (urgent) not acknowledged within {} s ->",
        t.urgent_ack_s
    );
    if e.stopped_at_s < t.escalation_due().as_secs_f64() {
        return Check::skipped(format!("{head} the run stopped at {:.0} s", e.stopped_at_s));
    }
    let escalated: Vec<&AlertChange> = e
        .store
        .alert_changes("no-data", device)
        .filter(|a| a.state == "escalated" && a.text("reason") == Some("unacknowledged"))
        .collect();
    let first = escalated
        .iter()
        .filter_map(|a| a.body["escalation_level"].as_u64())
        .min();
    Check::new(
        first == Some(1),
        format!(
            "{head} re-sent escalated, reason unacknowledged, escalation_level {} ({} in all)",
            first.map_or("-".to_owned(), |l| l.to_string()),
            count(escalated.len() as u64, "re-send", "re-sends"),
        ),
    )
}
