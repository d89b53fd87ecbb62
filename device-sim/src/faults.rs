//! Fault injection for simulated devices (issue 6): which faults exist, how they are
//! selected on the command line (`--fault KIND[=ARG]:DEVICE[@AT]`), and the per-device
//! [`Injector`] that decides when each is injected and accounts for what became of it.
//!
//! Sans-IO: the injector reads no clock and opens no connection. The device shell
//! ([`crate::link`]) tells it the time, what it sent and what the network answered, and
//! carries out the [`Action`]s it returns. Message faults work on copies of messages
//! the device really sent (byte for byte, or with one bit flipped by
//! [`flip_signature_bit`]); they never take a sequence number, so the device's own
//! messages stay complete, and whatever is refused is an extra copy.
//!
//! | fault | what the device does | expected refusal |
//! |---|---|---|
//! | `duplicate` | resends a copy of a message a receipt already covers | bridge: `duplicate` |
//! | `replay` | reboots; once the new epoch is receipted, sends a copy of an old-epoch message | bridge: `replay` |
//! | `out-of-order` | sends the next two messages of an epoch in swapped order | none: the later one is accepted late and the gap it opened closes |
//! | `bad-signature` | sends a copy of its last message with one signature bit flipped | bridge: `bad_signature` |
//! | `wrong-topic` | publishes a copy of its last message on another device's topic | broker ACL: PUBACK 0x87 (MQTT 5) or the connection closed (3.1.1) |
//! | `foreign-client-id` | opens a second connection claiming another device's client id | broker: CONNACK refused |
//! | `revoked-certificate` | its certificate is revoked (by the runner); expects its connection closed and every reconnect refused | broker: TLS handshake |
//! | `clock-skew` | offsets its `ts` from then on | none: the SPEC has no rule on `ts` |
//! | `reboot-storm` | reboots N times, half a second apart | none: every new epoch is accepted |
//! | `reconnect-storm` | drops its connection without goodbye and reconnects at once (`all`: the whole fleet together) | none: backlogs are resent, duplicates dropped |
//!
//! Times (`@AT`) are wall-clock time since the simulation started, unlike episode starts,
//! which are device time (see [`crate::clock`]).

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use crate::duration::{DurationError, parse_duration, parse_offset_ms};
use crate::ring::{Channel, Key};

/// When a fault is injected if `@AT` is not given.
pub const DEFAULT_FAULT_AT: Duration = Duration::from_secs(5);

/// Time between two injections of the same fault (`=N` repeats).
pub const REPEAT_SPACING: Duration = Duration::from_secs(1);

/// Time between two reboots of a reboot storm.
pub const REBOOT_STORM_SPACING: Duration = Duration::from_millis(500);

/// Reboots in a reboot storm unless `=N` says otherwise.
pub const DEFAULT_REBOOT_STORM: u32 = 5;

/// Clock offset of `clock-skew` unless `=OFFSET` says otherwise.
pub const DEFAULT_CLOCK_SKEW_MS: i64 = 5 * 60 * 1000;

/// One kind of fault; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    Duplicate,
    Replay,
    OutOfOrder,
    BadSignature,
    WrongTopic,
    ForeignClientId,
    RevokedCertificate,
    ClockSkew,
    RebootStorm,
    ReconnectStorm,
}

/// What the `=ARG` of a fault means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArgKind {
    Count,
    Peer,
    Offset,
    None,
}

impl FaultKind {
    pub const ALL: [Self; 10] = [
        Self::Duplicate,
        Self::Replay,
        Self::OutOfOrder,
        Self::BadSignature,
        Self::WrongTopic,
        Self::ForeignClientId,
        Self::RevokedCertificate,
        Self::ClockSkew,
        Self::RebootStorm,
        Self::ReconnectStorm,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Duplicate => "duplicate",
            Self::Replay => "replay",
            Self::OutOfOrder => "out-of-order",
            Self::BadSignature => "bad-signature",
            Self::WrongTopic => "wrong-topic",
            Self::ForeignClientId => "foreign-client-id",
            Self::RevokedCertificate => "revoked-certificate",
            Self::ClockSkew => "clock-skew",
            Self::RebootStorm => "reboot-storm",
            Self::ReconnectStorm => "reconnect-storm",
        }
    }

    /// Who is expected to refuse it, and how (SPEC sections 1 to 4).
    pub const fn expected(self) -> &'static str {
        match self {
            Self::Duplicate => "bridge refuses: duplicate",
            Self::Replay => "bridge refuses: replay",
            Self::OutOfOrder => "accepted late; the gap it opens closes",
            Self::BadSignature => "bridge refuses: bad_signature",
            Self::WrongTopic => {
                "broker ACL refuses: PUBACK 0x87 (MQTT 5) or connection closed (MQTT 3.1.1)"
            }
            Self::ForeignClientId => "broker refuses: CONNACK not authorized (client id binding)",
            Self::RevokedCertificate => {
                "broker refuses: connection closed at reload, reconnects refused in the TLS handshake"
            }
            Self::ClockSkew => "accepted: the SPEC has no rule on ts",
            Self::RebootStorm => "accepted: every new epoch restarts the window",
            Self::ReconnectStorm => "accepted: backlogs resent, duplicates dropped",
        }
    }

    const fn arg(self) -> ArgKind {
        match self {
            Self::WrongTopic | Self::ForeignClientId => ArgKind::Peer,
            Self::ClockSkew => ArgKind::Offset,
            Self::RevokedCertificate => ArgKind::None,
            _ => ArgKind::Count,
        }
    }

    const fn default_count(self) -> u32 {
        match self {
            Self::RebootStorm => DEFAULT_REBOOT_STORM,
            _ => 1,
        }
    }

    const fn spacing(self) -> Duration {
        match self {
            Self::RebootStorm => REBOOT_STORM_SPACING,
            _ => REPEAT_SPACING,
        }
    }

    /// Whether the injector needs copies of what the device sends.
    const fn needs_copies(self) -> bool {
        matches!(
            self,
            Self::Duplicate | Self::Replay | Self::BadSignature | Self::WrongTopic
        )
    }
}

/// A name that is not a fault kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown fault `{}` (one of: {})", .0.escape_debug(), FaultKind::names())]
pub struct UnknownFault(pub String);

/// Why a `--fault` value does not parse (`fault `SPEC`: ...`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultSpecError {
    #[error("fault `{0}`: expected KIND[=ARG]:DEVICE[@AT]")]
    Syntax(String),
    #[error("fault `{0}`: {1}")]
    Kind(String, UnknownFault),
    #[error("fault `{0}`: {1}")]
    Duration(String, DurationError),
    #[error("fault `{0}`: `{1}` is not a device id (or `all`)")]
    NotADevice(String, String),
    #[error("fault `{0}`: `{1}` is not a positive count")]
    NotACount(String, String),
    #[error("fault `{0}`: `{1}` is not a device id")]
    NotAPeer(String, String),
    #[error("fault `{0}`: {1} takes no `=ARG`")]
    NoArgument(String, FaultKind),
    #[error("fault `{0}`: the other device must not be the device itself")]
    OwnPeer(String),
}

/// A fault that cannot apply to a device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fault {kind} on {device}: needs another device")]
pub struct NoPeer {
    pub kind: FaultKind,
    pub device: String,
}

impl FaultKind {
    /// Every kind's name, comma-separated.
    fn names() -> String {
        let names: Vec<&str> = Self::ALL.iter().map(|k| k.as_str()).collect();
        names.join(", ")
    }
}

impl FromStr for FaultKind {
    type Err = UnknownFault;
    fn from_str(s: &str) -> Result<Self, UnknownFault> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownFault(s.to_owned()))
    }
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which devices a fault applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Device(String),
    /// Every simulated device (`all`), at the same time.
    All,
}

impl Scope {
    pub fn includes(&self, device: &str) -> bool {
        match self {
            Self::Device(d) => d == device,
            Self::All => true,
        }
    }
}

/// `KIND[=ARG]:DEVICE[@AT]` from the command line, e.g. `duplicate=2:dev-00003@10s`,
/// `wrong-topic=dev-00001:dev-00004`, `clock-skew=-2m:dev-00005`,
/// `reconnect-storm:all@30s`. `ARG` is a count for most faults, the other device for
/// `wrong-topic` and `foreign-client-id` (default: the next device of the fleet), and
/// the offset for `clock-skew` (default +5m).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultSpec {
    pub kind: FaultKind,
    pub scope: Scope,
    pub at: Duration,
    pub count: u32,
    pub peer: Option<String>,
    pub offset_ms: Option<i64>,
}

impl FaultSpec {
    /// The fault with its defaults, on one device at `at`.
    pub fn new(kind: FaultKind, device: &str, at: Duration) -> Self {
        Self {
            kind,
            scope: Scope::Device(device.to_owned()),
            at,
            count: kind.default_count(),
            peer: None,
            offset_ms: None,
        }
    }
}

fn valid_device_id(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl FromStr for FaultSpec {
    type Err = FaultSpecError;
    fn from_str(s: &str) -> Result<Self, FaultSpecError> {
        use FaultSpecError as E;
        let input = || s.to_owned();
        let (head, rest) = s.split_once(':').ok_or_else(|| E::Syntax(input()))?;
        let (kind, arg) = match head.split_once('=') {
            Some((k, a)) => (k, Some(a)),
            None => (head, None),
        };
        let kind: FaultKind = kind.parse().map_err(|e| E::Kind(input(), e))?;
        let (device, at) = match rest.split_once('@') {
            Some((d, t)) => (d, parse_duration(t).map_err(|e| E::Duration(input(), e))?),
            None => (rest, DEFAULT_FAULT_AT),
        };
        let scope = if device == "all" {
            Scope::All
        } else if valid_device_id(device) {
            Scope::Device(device.to_owned())
        } else {
            return Err(E::NotADevice(input(), device.to_owned()));
        };
        let mut spec = Self {
            scope,
            ..Self::new(kind, "", at)
        };
        match (kind.arg(), arg) {
            (_, None) => {}
            (ArgKind::Count, Some(a)) => {
                spec.count = a
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| E::NotACount(input(), a.to_owned()))?;
            }
            (ArgKind::Peer, Some(a)) if valid_device_id(a) => spec.peer = Some(a.to_owned()),
            (ArgKind::Peer, Some(a)) => return Err(E::NotAPeer(input(), a.to_owned())),
            (ArgKind::Offset, Some(a)) => {
                spec.offset_ms = Some(parse_offset_ms(a).map_err(|e| E::Duration(input(), e))?);
            }
            (ArgKind::None, Some(_)) => return Err(E::NoArgument(input(), kind)),
        }
        if let (Some(peer), Scope::Device(device)) = (&spec.peer, &spec.scope)
            && peer == device
        {
            return Err(E::OwnPeer(input()));
        }
        Ok(spec)
    }
}

/// A copy of a COSE_Sign1 message with the lowest bit of its signature's first byte
/// flipped. The signature is the last element of the COSE_Sign1 array, a byte string of
/// 64 bytes for both EdDSA and ES256 (raw `r || s`), so it is the last 64 bytes of the
/// message; flipping a bit of `R` (EdDSA) or `r` (ES256) keeps the encoding well formed
/// and makes the signature wrong.
pub fn flip_signature_bit(message: &[u8]) -> Vec<u8> {
    let mut copy = message.to_vec();
    let at = copy.len().saturating_sub(64);
    if let Some(b) = copy.get_mut(at) {
        *b ^= 0x01;
    }
    copy
}

/// What the shell must do for a fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Publish `bytes` (QoS 1) on `topic` on the device's connection, outside the outbox.
    Publish { topic: String, bytes: Vec<u8> },
    /// Open a second, short-lived connection with the device's certificate claiming
    /// `client_id`, and report its outcome with [`Injector::on_side_outcome`].
    ConnectAs { client_id: String },
    /// Send the next two fresh messages of one epoch in swapped order, then report with
    /// [`Injector::on_swapped`].
    SwapNext,
    /// Power cycle now: new durable epoch, connection dropped, outbox kept.
    Reboot,
    /// Drop the connection without goodbye and reconnect at once.
    DropConnection,
    /// Offset the device clock by this many milliseconds from now on.
    SkewClock { ms: i64 },
}

/// What the shell knows about its connection when it asks for the next action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LinkState {
    /// Connected and subscribed to receipts.
    pub connected: bool,
    /// The highest receipt applied.
    pub covered: Option<Key>,
}

/// The account of one fault on one device, for the summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultReport {
    pub fault: FaultKind,
    /// Planned time of the first injection, wall seconds since the start.
    pub at_s: f64,
    pub planned: u32,
    pub injected: u32,
    /// Who is expected to refuse it, and how.
    pub expected: &'static str,
    /// The other device (`wrong-topic`, `foreign-client-id`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The clock offset (`clock-skew`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset_ms: Option<i64>,
    /// `(epoch, seq)` of the messages the injected copies carried, or of the swapped
    /// pair in the order sent.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<Key>,
    /// What the device saw, with how often: e.g. `PUBACK NotAuthorized`,
    /// `CONNACK NotAuthorized`, `connection closed by the broker`.
    pub seen: BTreeMap<String, u32>,
    /// Time from dropping the connection to being connected again (`reconnect-storm`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconnect_ms: Option<u64>,
}

impl FaultReport {
    fn saw(&mut self, what: impl Into<String>) {
        *self.seen.entry(what.into()).or_default() += 1;
    }
}

#[derive(Debug, Clone)]
struct Step {
    report: usize,
    kind: FaultKind,
    due: Duration,
    remaining: u32,
}

/// A copy of a message the device sent.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SentCopy {
    key: Key,
    channel: Channel,
    bytes: Vec<u8>,
}

/// The faults of one device; see the module documentation.
#[derive(Debug, Clone)]
pub(crate) struct Injector {
    device: String,
    steps: Vec<Step>,
    reports: Vec<FaultReport>,
    keeps_copies: bool,
    last_sent: Option<SentCopy>,
    /// `replay`: the old-epoch copy, waiting for a receipt of a newer epoch.
    replay_waiting: Option<(usize, SentCopy)>,
    /// `wrong-topic`: injected, the broker's answer not seen yet.
    awaiting_refusal: Option<usize>,
    /// `foreign-client-id`: the second connection is open.
    side: Option<usize>,
    /// `out-of-order`: the swap asked for and not done yet.
    swap: Option<usize>,
    /// `revoked-certificate`: due, so every connection is expected to be refused.
    revoked: Option<usize>,
    /// `reconnect-storm`: when the connection was dropped.
    storm: Option<(usize, Duration)>,
    /// Last `wrong-topic` report, for refusals that arrive after the wait ended.
    last_wrong_topic: Option<usize>,
}

impl Injector {
    /// The faults of `specs` that apply to `device`. `fleet` lists every simulated
    /// device; the default other device of `wrong-topic` and `foreign-client-id` is the
    /// one after `device` in it.
    pub(crate) fn new(device: &str, specs: &[FaultSpec], fleet: &[String]) -> Result<Self, NoPeer> {
        let mut injector = Self::none(device);
        let (steps, reports) = (&mut injector.steps, &mut injector.reports);
        for spec in specs.iter().filter(|s| s.scope.includes(device)) {
            let peer = match spec.kind.arg() {
                ArgKind::Peer => Some(match &spec.peer {
                    Some(p) => p.clone(),
                    None => next_in_fleet(device, fleet).ok_or_else(|| NoPeer {
                        kind: spec.kind,
                        device: device.to_owned(),
                    })?,
                }),
                _ => None,
            };
            let offset_ms = (spec.kind == FaultKind::ClockSkew)
                .then(|| spec.offset_ms.unwrap_or(DEFAULT_CLOCK_SKEW_MS));
            let count = if spec.kind == FaultKind::RevokedCertificate {
                1
            } else {
                spec.count
            };
            steps.push(Step {
                report: reports.len(),
                kind: spec.kind,
                due: spec.at,
                remaining: count,
            });
            reports.push(FaultReport {
                fault: spec.kind,
                at_s: spec.at.as_secs_f64(),
                planned: count,
                injected: 0,
                expected: spec.kind.expected(),
                peer,
                offset_ms,
                messages: Vec::new(),
                seen: BTreeMap::new(),
                reconnect_ms: None,
            });
        }
        injector.keeps_copies = injector.steps.iter().any(|s| s.kind.needs_copies());
        Ok(injector)
    }

    /// An injector with no faults.
    pub(crate) fn none(device: &str) -> Self {
        Self {
            device: device.to_owned(),
            keeps_copies: false,
            steps: Vec::new(),
            reports: Vec::new(),
            last_sent: None,
            replay_waiting: None,
            awaiting_refusal: None,
            side: None,
            swap: None,
            revoked: None,
            storm: None,
            last_wrong_topic: None,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.reports.is_empty()
    }

    /// A message was handed to the network for the first time.
    pub(crate) fn on_sent(&mut self, key: Key, channel: Channel, bytes: &[u8]) {
        if self.keeps_copies {
            self.last_sent = Some(SentCopy {
                key,
                channel,
                bytes: bytes.to_vec(),
            });
        }
    }

    /// The next action due at `now` (wall time since the start), if any. Call until it
    /// returns `None`.
    pub(crate) fn poll(&mut self, now: Duration, link: LinkState) -> Option<Action> {
        if let Some(action) = self.replay_second_half(link) {
            return Some(action);
        }
        for i in 0..self.steps.len() {
            let step = &self.steps[i];
            if step.remaining == 0 || now < step.due {
                continue;
            }
            let (kind, report) = (step.kind, step.report);
            let Some(action) = self.attempt(kind, report, now, link) else {
                continue;
            };
            let step = &mut self.steps[i];
            step.remaining -= 1;
            step.due = now + kind.spacing();
            match action {
                Attempt::Act(action) => return Some(action),
                Attempt::Done => {}
            }
        }
        None
    }

    fn attempt(
        &mut self,
        kind: FaultKind,
        report: usize,
        now: Duration,
        link: LinkState,
    ) -> Option<Attempt> {
        let receipted = |c: &SentCopy| link.covered.is_some_and(|cov| c.key <= cov);
        let act = match kind {
            FaultKind::Duplicate => {
                let copy = self.last_sent.as_ref().filter(|c| receipted(c))?;
                if !link.connected {
                    return None;
                }
                self.reports[report].messages.push(copy.key);
                Action::Publish {
                    topic: copy.channel.topic(&self.device),
                    bytes: copy.bytes.clone(),
                }
            }
            FaultKind::Replay => {
                if self.replay_waiting.is_some() || !link.connected {
                    return None;
                }
                let copy = self.last_sent.clone().filter(|c| receipted(c))?;
                self.replay_waiting = Some((report, copy));
                // Counted when the copy goes out (the second half).
                return Some(Attempt::Act(Action::Reboot));
            }
            FaultKind::BadSignature => {
                let copy = self.last_sent.as_ref()?;
                if !link.connected {
                    return None;
                }
                self.reports[report].messages.push(copy.key);
                Action::Publish {
                    topic: copy.channel.topic(&self.device),
                    bytes: flip_signature_bit(&copy.bytes),
                }
            }
            FaultKind::WrongTopic => {
                let copy = self.last_sent.as_ref()?;
                if !link.connected || self.awaiting_refusal.is_some() {
                    return None;
                }
                let peer = self.reports[report].peer.clone().unwrap_or_default();
                self.reports[report].messages.push(copy.key);
                self.awaiting_refusal = Some(report);
                self.last_wrong_topic = Some(report);
                Action::Publish {
                    topic: copy.channel.topic(&peer),
                    bytes: copy.bytes.clone(),
                }
            }
            FaultKind::ForeignClientId => {
                if self.side.is_some() {
                    return None;
                }
                self.side = Some(report);
                Action::ConnectAs {
                    client_id: self.reports[report].peer.clone().unwrap_or_default(),
                }
            }
            FaultKind::OutOfOrder => {
                if !link.connected || self.swap.is_some() {
                    return None;
                }
                self.swap = Some(report);
                // Counted when the swap happened (`on_swapped`).
                return Some(Attempt::Act(Action::SwapNext));
            }
            FaultKind::RevokedCertificate => {
                self.revocation_due(now);
                return None;
            }
            FaultKind::ClockSkew => Action::SkewClock {
                ms: self.reports[report]
                    .offset_ms
                    .unwrap_or(DEFAULT_CLOCK_SKEW_MS),
            },
            FaultKind::RebootStorm => Action::Reboot,
            FaultKind::ReconnectStorm => {
                if !link.connected {
                    self.reports[report].saw("offline at the time; nothing to drop");
                    return Some(Attempt::Done);
                }
                self.storm = Some((report, now));
                Action::DropConnection
            }
        };
        self.reports[report].injected += 1;
        Some(Attempt::Act(act))
    }

    /// Starts expecting refusals once a revocation is due, whenever the shell asks
    /// next: the runner revokes at the fault's time, so whatever the connection does
    /// from then on is the broker's answer to it.
    fn revocation_due(&mut self, now: Duration) {
        for step in &mut self.steps {
            if step.kind == FaultKind::RevokedCertificate && step.remaining > 0 && now >= step.due {
                step.remaining = 0;
                self.revoked = Some(step.report);
                self.reports[step.report].injected += 1;
            }
        }
    }

    fn replay_second_half(&mut self, link: LinkState) -> Option<Action> {
        let (report, copy) = self.replay_waiting.as_ref()?;
        let newer_receipted = link.covered.is_some_and(|c| c.epoch > copy.key.epoch);
        if !(link.connected && newer_receipted) {
            return None;
        }
        let (report, copy) = (*report, copy.clone());
        self.replay_waiting = None;
        let r = &mut self.reports[report];
        r.injected += 1;
        r.messages.push(copy.key);
        Some(Action::Publish {
            topic: copy.channel.topic(&self.device),
            bytes: copy.bytes,
        })
    }

    /// A PUBACK refused a publish (MQTT 5), with its reason.
    pub(crate) fn on_puback_refused(&mut self, reason: &str) {
        let report = self.awaiting_refusal.take().or(self.last_wrong_topic);
        match report {
            Some(r) => self.reports[r].saw(format!("PUBACK {reason}")),
            None => {
                tracing::warn!(device.id = %self.device, reason, "publish refused without a fault injected")
            }
        }
    }

    /// The device's connection ended at `now`; `was_ready` if it had been fully up.
    pub(crate) fn on_connection_lost(&mut self, now: Duration, reason: &str, was_ready: bool) {
        self.revocation_due(now);
        if let Some(r) = self.awaiting_refusal.take() {
            self.reports[r].saw("connection closed by the broker");
            tracing::debug!(device.id = %self.device, reason, "wrong-topic publish ended the connection");
        }
        if let Some(r) = self.revoked {
            if was_ready {
                self.reports[r].saw("connection closed by the broker");
            } else {
                self.reports[r].saw(format!("reconnect refused ({})", short_reason(reason)));
            }
        }
    }

    /// The device is connected and subscribed; `now` is wall time since the start.
    pub(crate) fn on_connected(&mut self, now: Duration) {
        self.revocation_due(now);
        if let Some(r) = self.revoked {
            self.reports[r].saw("connected: certificate still accepted");
        }
        if let Some((r, dropped)) = self.storm.take() {
            let ms = u64::try_from(now.saturating_sub(dropped).as_millis()).unwrap_or(u64::MAX);
            let report = &mut self.reports[r];
            report.reconnect_ms = Some(report.reconnect_ms.map_or(ms, |m| m.max(ms)));
            report.saw("reconnected");
        }
    }

    /// The outcome of a [`Action::ConnectAs`] connection: `Ok` if the broker accepted it,
    /// else what refused it.
    pub(crate) fn on_side_outcome(&mut self, outcome: Result<(), String>) {
        let Some(r) = self.side.take() else {
            return;
        };
        match outcome {
            Ok(()) => self.reports[r].saw("CONNACK accepted: client id binding not enforced"),
            Err(reason) => self.reports[r].saw(short_reason(&reason)),
        }
    }

    /// The swap asked for by [`Action::SwapNext`] happened: `first` was sent before
    /// `second`, though `second` is the older.
    pub(crate) fn on_swapped(&mut self, first: Key, second: Key) {
        if let Some(r) = self.swap.take() {
            let report = &mut self.reports[r];
            report.injected += 1;
            report.messages.extend([first, second]);
            report.saw("sent in swapped order");
        }
    }

    /// The swap asked for cannot happen any more (generation ended).
    pub(crate) fn cancel_swap(&mut self) {
        if let Some(r) = self.swap.take() {
            self.reports[r].saw("not injected: no two fresh messages left");
        }
    }

    /// A swap was asked for and is not done yet.
    pub(crate) fn swap_pending(&self) -> bool {
        self.swap.is_some()
    }

    /// The device's certificate is revoked: it is not expected to connect again, so the
    /// shell need not wait for receipts it cannot get.
    pub(crate) fn revoked(&self) -> bool {
        self.revoked.is_some()
    }

    /// The account of every fault, in the order given.
    pub(crate) fn reports(&self) -> Vec<FaultReport> {
        self.reports.clone()
    }
}

#[derive(Debug)]
enum Attempt {
    Act(Action),
    /// Accounted without anything for the shell to do.
    Done,
}

fn next_in_fleet(device: &str, fleet: &[String]) -> Option<String> {
    let i = fleet.iter().position(|d| d == device)?;
    let next = &fleet[(i + 1) % fleet.len()];
    (next != device).then(|| next.clone())
}

/// What a connection error says, short, so that repeats count together: the TLS alert
/// or the CONNACK code when there is one (rumqttc wraps both in layers of context),
/// else the first line without the OS error number.
fn short_reason(reason: &str) -> String {
    let line = reason.lines().next().unwrap_or(reason);
    if let Some((_, alert)) = line.split_once("fatal alert: ") {
        return format!("TLS alert {}", alert.trim());
    }
    if let Some((_, code)) = line.split_once("return code: ") {
        return format!("CONNACK {}", code.trim().trim_matches('`'));
    }
    match line.find(" (os error") {
        Some(i) => line[..i].to_owned(),
        None => line.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use vitalmq_envelope::{
        Algorithm, DeviceId, MessageType, ReasonClass, SigningKey, Telemetry, VerifyingKey, sign,
        verify,
    };

    use super::*;

    const DEV: &str = "dev-00003";

    fn fleet() -> Vec<String> {
        ["dev-00001", "dev-00002", DEV].map(String::from).to_vec()
    }

    fn spec(s: &str) -> FaultSpec {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn injector(specs: &[&str]) -> Injector {
        let specs: Vec<FaultSpec> = specs.iter().map(|s| spec(s)).collect();
        Injector::new(DEV, &specs, &fleet()).expect("injector")
    }

    fn up(covered: Option<Key>) -> LinkState {
        LinkState {
            connected: true,
            covered,
        }
    }

    const DOWN: LinkState = LinkState {
        connected: false,
        covered: None,
    };

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn signed(alg: Algorithm, epoch: u64, seq: u64) -> (Vec<u8>, HashMap<DeviceId, VerifyingKey>) {
        let id = DeviceId::new(DEV).expect("id");
        let key = SigningKey::generate(alg).expect("key");
        let t = Telemetry {
            dev: id.clone(),
            epoch,
            seq,
            ts: 1_700_000_000_000,
            fw: "5.12.1".into(),
            kind: MessageType::Vitals,
            m: Some(BTreeMap::from([(
                "spo2".to_owned(),
                vitalmq_envelope::Number::Int(97),
            )])),
            q: None,
            model: None,
            schema: None,
            extra: BTreeMap::new(),
        };
        let bytes = sign(&t, &key).expect("sign");
        (bytes, HashMap::from([(id, key.verifying_key())]))
    }

    #[test]
    fn specs_parse_with_defaults() {
        let s = spec("duplicate:dev-00003");
        assert_eq!(
            (s.kind, &s.scope, s.at, s.count),
            (
                FaultKind::Duplicate,
                &Scope::Device(DEV.into()),
                DEFAULT_FAULT_AT,
                1
            )
        );
        let s = spec("duplicate=3:dev-00003@12s");
        assert_eq!((s.count, s.at), (3, secs(12)));
        assert_eq!(spec("reboot-storm:dev-1").count, DEFAULT_REBOOT_STORM);
        assert_eq!(
            spec("wrong-topic=dev-00001:dev-00003").peer.as_deref(),
            Some("dev-00001")
        );
        assert_eq!(spec("clock-skew=-2m:dev-1").offset_ms, Some(-120_000));
        assert_eq!(spec("reconnect-storm:all@30s").scope, Scope::All);
        for kind in FaultKind::ALL {
            assert_eq!(kind.as_str().parse::<FaultKind>(), Ok(kind));
            assert_eq!(spec(&format!("{kind}:dev-1")).kind, kind);
        }
    }

    #[test]
    fn bad_specs_say_why() {
        for (s, why) in [
            ("duplicate", "expected KIND"),
            ("meltdown:dev-1", "unknown fault"),
            ("duplicate:dev 1", "not a device id"),
            ("duplicate=0:dev-1", "positive count"),
            ("duplicate:dev-1@soon", "not a duration"),
            ("wrong-topic=x y:dev-1", "not a device id"),
            ("wrong-topic=dev-1:dev-1", "must not be the device itself"),
            ("revoked-certificate=2:dev-1", "takes no"),
            ("clock-skew=later:dev-1", "not a duration"),
        ] {
            let err = s.parse::<FaultSpec>().expect_err(s);
            let err = err.to_string();
            assert!(err.contains(why) && err.contains(s), "{s}: {err}");
        }
    }

    #[test]
    fn only_the_devices_faults_and_peers_default_to_the_next_device() {
        let specs = [
            spec("duplicate:dev-00001"),
            spec("wrong-topic:dev-00003"),
            spec("reconnect-storm:all"),
        ];
        let i = Injector::new(DEV, &specs, &fleet()).expect("injector");
        let kinds: Vec<FaultKind> = i.reports().iter().map(|r| r.fault).collect();
        assert_eq!(kinds, [FaultKind::WrongTopic, FaultKind::ReconnectStorm]);
        assert_eq!(
            i.reports()[0].peer.as_deref(),
            Some("dev-00001"),
            "wraps around"
        );
        let alone = Injector::new(DEV, &specs, &[DEV.to_owned()]);
        assert!(
            alone
                .expect_err("no peer")
                .to_string()
                .contains("needs another device")
        );
        assert!(Injector::none(DEV).is_empty());
    }

    #[test]
    fn nothing_before_its_time() {
        let mut i = injector(&["clock-skew:dev-00003@10s"]);
        assert_eq!(i.poll(secs(9), up(None)), None);
        assert_eq!(
            i.poll(secs(10), up(None)),
            Some(Action::SkewClock {
                ms: DEFAULT_CLOCK_SKEW_MS
            })
        );
        assert_eq!(i.poll(secs(20), up(None)), None, "once");
        assert_eq!(i.reports()[0].injected, 1);
    }

    #[test]
    fn duplicate_resends_a_receipted_message_byte_for_byte() {
        let mut i = injector(&["duplicate=2:dev-00003@1s"]);
        assert_eq!(i.poll(secs(1), up(None)), None, "nothing sent yet");
        i.on_sent(Key::new(1, 4), Channel::Telemetry, b"message 1/4");
        assert_eq!(
            i.poll(secs(1), up(Some(Key::new(1, 3)))),
            None,
            "not receipted"
        );
        assert_eq!(i.poll(secs(1), DOWN), None, "offline");
        let a = i.poll(secs(2), up(Some(Key::new(1, 4))));
        assert_eq!(
            a,
            Some(Action::Publish {
                topic: "devices/dev-00003/telemetry".into(),
                bytes: b"message 1/4".to_vec()
            })
        );
        assert_eq!(i.poll(secs(2), up(Some(Key::new(1, 4)))), None, "spaced");
        i.on_sent(Key::new(1, 5), Channel::Status, b"status 1/5");
        let b = i.poll(secs(3), up(Some(Key::new(1, 5))));
        assert_eq!(
            b,
            Some(Action::Publish {
                topic: "devices/dev-00003/status".into(),
                bytes: b"status 1/5".to_vec()
            })
        );
        let r = &i.reports()[0];
        assert_eq!((r.planned, r.injected), (2, 2));
        assert_eq!(r.messages, [Key::new(1, 4), Key::new(1, 5)]);
    }

    #[test]
    fn replay_reboots_then_sends_the_old_epoch_once_the_new_one_is_receipted() {
        let mut i = injector(&["replay:dev-00003@1s"]);
        i.on_sent(Key::new(1, 7), Channel::Telemetry, b"old 1/7");
        assert_eq!(
            i.poll(secs(1), up(Some(Key::new(1, 7)))),
            Some(Action::Reboot)
        );
        assert_eq!(i.reports()[0].injected, 0, "counted when the copy goes");
        i.on_sent(Key::new(2, 0), Channel::Telemetry, b"new 2/0");
        assert_eq!(
            i.poll(secs(2), up(Some(Key::new(1, 7)))),
            None,
            "new epoch not receipted"
        );
        assert_eq!(i.poll(secs(2), DOWN), None);
        assert_eq!(
            i.poll(secs(3), up(Some(Key::new(2, 0)))),
            Some(Action::Publish {
                topic: "devices/dev-00003/telemetry".into(),
                bytes: b"old 1/7".to_vec()
            })
        );
        assert_eq!(i.poll(secs(9), up(Some(Key::new(2, 0)))), None);
        let r = &i.reports()[0];
        assert_eq!(
            (r.injected, r.messages.as_slice()),
            (1, &[Key::new(1, 7)][..])
        );
    }

    #[test]
    fn bad_signature_flips_one_bit_and_the_verifier_refuses_it() {
        for alg in [Algorithm::EdDsa, Algorithm::Es256] {
            let (bytes, keys) = signed(alg, 1, 2);
            let dev = DeviceId::new(DEV).expect("id");
            assert!(verify(&bytes, &keys, Some(&dev)).is_ok());
            let mut i = injector(&["bad-signature:dev-00003@0s"]);
            i.on_sent(Key::new(1, 2), Channel::Telemetry, &bytes);
            let Some(Action::Publish { topic, bytes: bad }) = i.poll(secs(0), up(None)) else {
                panic!("no publish");
            };
            assert_eq!(topic, "devices/dev-00003/telemetry");
            assert_eq!(bad.len(), bytes.len());
            let differing: u32 = bad
                .iter()
                .zip(&bytes)
                .map(|(a, b)| (a ^ b).count_ones())
                .sum();
            assert_eq!(differing, 1, "{alg:?}");
            let refusal = verify(&bad, &keys, Some(&dev)).expect_err("refused");
            assert_eq!(
                refusal.reason,
                ReasonClass::BadSignature,
                "{alg:?}: {refusal}"
            );
        }
    }

    #[test]
    fn wrong_topic_publishes_on_the_other_devices_topic_and_records_the_answer() {
        let (bytes, keys) = signed(Algorithm::EdDsa, 1, 0);
        let mut i = injector(&["wrong-topic=dev-00001:dev-00003@0s"]);
        i.on_sent(Key::new(1, 0), Channel::Telemetry, &bytes);
        let Some(Action::Publish { topic, bytes: copy }) = i.poll(secs(0), up(None)) else {
            panic!("no publish");
        };
        assert_eq!(topic, "devices/dev-00001/telemetry");
        assert_eq!(copy, bytes);
        // Were it routed, the bridge would refuse it too: the topic names another device.
        let other = DeviceId::new("dev-00001").expect("id");
        let refusal = verify(&copy, &keys, Some(&other)).expect_err("refused");
        assert_eq!(refusal.reason, ReasonClass::KidMismatch);
        i.on_puback_refused("NotAuthorized");
        let mut v311 = injector(&["wrong-topic:dev-00003@0s"]);
        v311.on_sent(Key::new(1, 0), Channel::Telemetry, &bytes);
        assert!(v311.poll(secs(0), up(None)).is_some());
        v311.on_connection_lost(secs(0), "connection reset", true);
        assert_eq!(
            i.reports()[0].seen,
            BTreeMap::from([("PUBACK NotAuthorized".to_owned(), 1)])
        );
        assert_eq!(
            v311.reports()[0].seen,
            BTreeMap::from([("connection closed by the broker".to_owned(), 1)])
        );
        assert_eq!(v311.reports()[0].peer.as_deref(), Some("dev-00001"));
    }

    #[test]
    fn foreign_client_id_claims_the_other_device_on_a_second_connection() {
        let mut i = injector(&["foreign-client-id=dev-00002:dev-00003@0s"]);
        assert_eq!(
            i.poll(secs(0), DOWN),
            Some(Action::ConnectAs {
                client_id: "dev-00002".into()
            }),
            "needs no connection of its own"
        );
        i.on_side_outcome(Err(
            "Connection refused, return code: `NotAuthorized`".into()
        ));
        let r = &i.reports()[0];
        assert_eq!(r.injected, 1);
        assert_eq!(
            r.seen,
            BTreeMap::from([("CONNACK NotAuthorized".to_owned(), 1)])
        );
    }

    #[test]
    fn out_of_order_asks_for_a_swap_and_counts_it_when_done() {
        let mut i = injector(&["out-of-order:dev-00003@0s"]);
        assert_eq!(i.poll(secs(0), DOWN), None);
        assert_eq!(i.poll(secs(0), up(None)), Some(Action::SwapNext));
        assert!(i.swap_pending());
        assert_eq!(i.poll(secs(5), up(None)), None);
        i.on_swapped(Key::new(1, 5), Key::new(1, 4));
        assert!(!i.swap_pending());
        let r = &i.reports()[0];
        assert_eq!(r.injected, 1);
        assert_eq!(r.messages, [Key::new(1, 5), Key::new(1, 4)]);
        let mut late = injector(&["out-of-order:dev-00003@0s"]);
        assert_eq!(late.poll(secs(0), up(None)), Some(Action::SwapNext));
        late.cancel_swap();
        assert_eq!(late.reports()[0].injected, 0);
    }

    #[test]
    fn revoked_certificate_expects_refusals_from_its_time_on() {
        let mut i = injector(&["revoked-certificate:dev-00003@4s"]);
        i.on_connection_lost(secs(3), "network down", true);
        assert!(!i.revoked());
        assert_eq!(
            i.poll(secs(4), up(None)),
            None,
            "nothing for the shell to do"
        );
        assert!(i.revoked());
        i.on_connection_lost(secs(4), "closed", true);
        for _ in 0..2 {
            i.on_connection_lost(
                secs(5),
                "Mqtt state: IO: received fatal alert: CertificateRevoked",
                false,
            );
        }
        i.on_connection_lost(
            secs(6),
            "I/O: Connection reset by peer (os error 104)\nmore",
            false,
        );
        let r = &i.reports()[0];
        assert_eq!(r.injected, 1);
        assert_eq!(
            r.seen,
            BTreeMap::from([
                ("connection closed by the broker".to_owned(), 1),
                (
                    "reconnect refused (I/O: Connection reset by peer)".to_owned(),
                    1
                ),
                (
                    "reconnect refused (TLS alert CertificateRevoked)".to_owned(),
                    2
                ),
            ])
        );
        // The broker may close the connection before the shell polls again: the loss
        // itself tells the time.
        let mut early = injector(&["revoked-certificate:dev-00003@4s"]);
        early.on_connection_lost(Duration::from_millis(4010), "closed", true);
        assert!(early.revoked());
        assert_eq!(
            early.reports()[0].seen,
            BTreeMap::from([("connection closed by the broker".to_owned(), 1)])
        );
        assert_eq!(early.poll(secs(5), up(None)), None);
        assert_eq!(early.reports()[0].injected, 1, "counted once");
    }

    #[test]
    fn storms() {
        let mut i = injector(&["reboot-storm=3:dev-00003@1s", "reconnect-storm:all@10s"]);
        let mut reboots = Vec::new();
        for ms in (1000..4000).step_by(100) {
            let t = Duration::from_millis(ms);
            if let Some(a) = i.poll(t, DOWN) {
                assert_eq!(a, Action::Reboot);
                reboots.push(ms);
            }
        }
        assert_eq!(reboots, [1000, 1500, 2000], "half a second apart");
        assert_eq!(i.poll(secs(10), up(None)), Some(Action::DropConnection));
        i.on_connected(Duration::from_millis(10_250));
        let r = &i.reports()[1];
        assert_eq!((r.injected, r.reconnect_ms), (1, Some(250)));
        let mut offline = injector(&["reconnect-storm:all@0s"]);
        assert_eq!(offline.poll(secs(0), DOWN), None);
        assert_eq!(offline.reports()[0].injected, 0);
        assert_eq!(offline.reports()[0].seen.len(), 1);
    }
}
