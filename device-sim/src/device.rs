//! A simulated wearable without I/O: its epoch, sequence numbers, signing key, vitals and
//! outbox. The connection shell ([`crate::link`]) moves bytes; this decides them.
//!
//! Invariants (SPEC sections 3 and 4):
//!
//! * The epoch comes from [`EpochStore::advance`], which is durable before it returns; a
//!   device boots (and reboots) through it, so no message of an epoch exists before the
//!   epoch is on disk. `seq` starts at 0 in every epoch and increases by one per message,
//!   vitals and status sharing the sequence.
//! * Every message is signed and stored in the outbox BEFORE anyone can publish it: the
//!   shell only ever sends what [`SimDevice::next_after`] hands out, from the outbox.
//! * The outbox keeps `(epoch, seq)` order, so sending in outbox order sends an older
//!   epoch's backlog before any message of a newer one.
//! * A receipt frees messages only if it decodes strictly and covers nothing the device
//!   never made: a receipt above the newest message made is ignored (and counted), since
//!   no honest bridge can have recorded it.
//! * Overflow drops are reported in every status message (`dropped`, cumulative since the
//!   simulator started, so one lost status loses no information), with the SPEC 3.1
//!   keys `battery` ([`crate::battery`]), `charging` and `interval_s` (the interval the
//!   device really runs with).
//! * Alarm messages ([`crate::alarms`]) take the next `seq` like vitals and status.
//! * A forged-only device ([`DeviceProfile::forged_only`]) signs every message with a
//!   key of its own algorithm that is not its registered one: each is refused as
//!   `bad_signature`, never receipted, so its report says `forged_only` and the run's
//!   `all_receipted` leaves it out. Its messages still take their `seq` and wait in the
//!   outbox (and overflow it, counted), like any device whose messages are not receipted.
//! * Nothing here logs measurement values.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use ciborium::value::Value;
use serde::Serialize;
use vitalmq_envelope::{DeviceId, KeyError, MessageType, Number, SigningKey, Telemetry, sign};

use crate::alarms::AlarmScript;
use crate::battery::Battery;
use crate::epoch::{EpochError, EpochStore};
use crate::receipt::{self, ReceiptError};
use crate::ring::{Channel, Entry, Key, Outbox, PushError, Pushed};
use crate::vitals::VitalsModel;

/// Firmware version the simulated devices report.
pub const DEFAULT_FW: &str = "5.12.1";

/// Why the device cannot go on. Each of these stops the device rather than send
/// something the contract forbids.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    #[error("epoch: {0}")]
    Epoch(#[from] EpochError),
    #[error("signing: {0}")]
    Sign(#[from] KeyError),
    #[error("outbox: {0}")]
    Outbox(#[from] PushError),
    #[error("sequence numbers of epoch {0} exhausted")]
    SeqExhausted(u64),
}

/// A message just made and stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Made {
    pub key: Key,
    /// The oldest message dropped to make room, and whether it had ever been sent.
    pub evicted: Option<(Key, bool)>,
}

/// What a payload on the ack topic did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReceiptOutcome {
    /// A valid receipt; `released` messages were freed (0 for a repeated or old one).
    Applied { receipt: Key, released: usize },
    /// A well-formed receipt for something this device never made.
    BeyondNewest { receipt: Key },
    /// Not a receipt.
    Malformed(ReceiptError),
}

/// A message the shell should publish next.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outgoing<'a> {
    pub key: Key,
    pub channel: Channel,
    pub bytes: &'a [u8],
    /// Whether it was sent before (a resend).
    pub resend: bool,
}

/// Counters of one device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DeviceStats {
    pub vitals_made: u64,
    pub status_made: u64,
    pub alarms_made: u64,
    /// Messages handed to the network for the first time.
    pub sent: u64,
    /// Messages handed to the network again (after a reconnect or a receipt timeout).
    pub resent: u64,
    pub receipts: u64,
    pub receipts_malformed: u64,
    pub receipts_beyond_newest: u64,
    pub reboots: u64,
}

/// How many messages the device made in one epoch: `seq` 0 to `made - 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EpochMade {
    pub epoch: u64,
    pub made: u64,
}

/// Consecutive held messages of one epoch, `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct KeyRange {
    pub epoch: u64,
    pub first: u64,
    pub last: u64,
}

impl KeyRange {
    /// Compresses keys in increasing order into ranges.
    pub fn compress(keys: impl IntoIterator<Item = Key>) -> Vec<Self> {
        let mut out: Vec<Self> = Vec::new();
        for k in keys {
            match out.last_mut() {
                Some(r) if r.epoch == k.epoch && r.last.checked_add(1) == Some(k.seq) => {
                    r.last = k.seq;
                }
                _ => out.push(Self {
                    epoch: k.epoch,
                    first: k.seq,
                    last: k.seq,
                }),
            }
        }
        out
    }
}

/// The end-of-run account of one device (the `vitalmq sim` summary).
#[derive(Debug, Clone, Serialize)]
pub struct DeviceReport {
    pub id: String,
    pub epoch: u64,
    pub sent: u64,
    pub resent: u64,
    /// Highest `seq` made in the current epoch (`null` if none yet).
    pub highest_seq: Option<u64>,
    /// Highest receipt received (`null` if none).
    pub receipted: Option<Key>,
    /// Messages still held: made, not covered by a receipt.
    pub unreceipted: usize,
    pub overflow_dropped: u64,
    pub vitals: u64,
    pub status: u64,
    /// Alarm messages made (raises and clears); absent when none.
    #[serde(skip_serializing_if = "is_zero")]
    pub alarms: u64,
    /// Every message was signed with a key that is not the device's (`--forged-only`):
    /// none can be stored or receipted, so `all_receipted` of the run leaves it out.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub forged_only: bool,
    pub reboots: u64,
    pub connects: u64,
    pub receipts_malformed: u64,
    /// Every message made is covered by a receipt and none was dropped.
    pub all_receipted: bool,
    /// Messages made per epoch, oldest epoch first (each epoch's `seq` starts at 0).
    pub epochs: Vec<EpochMade>,
    /// The messages still held (made, not covered by a receipt), as ranges.
    pub held: Vec<KeyRange>,
    /// The gateway whose connection carried this device's messages (`--via-gateway`);
    /// absent when the device connected itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Faults injected into this device and what became of them (`--fault`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub faults: Vec<crate::faults::FaultReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What a device reports besides its vitals, and how it signs (issue 17).
#[derive(Debug, Clone, Default)]
pub(crate) struct DeviceProfile {
    pub alarms: AlarmScript,
    pub battery: Battery,
    /// The reporting interval it runs with, in whole seconds (`interval_s` in status).
    pub interval_s: Option<u64>,
    /// Sign every message with a foreign key of the same algorithm.
    pub forged_only: bool,
    /// The model (`name/version`) its vitals and alarms report (`--device-model`);
    /// `None`: vitals report none, alarms their script's.
    pub model: Option<String>,
}

/// One simulated wearable; see the module documentation.
#[derive(Debug)]
pub(crate) struct SimDevice {
    id: DeviceId,
    key: SigningKey,
    fw: String,
    /// See [`DeviceProfile::model`].
    model: Option<String>,
    epoch_store: EpochStore,
    epoch: u64,
    next_seq: u64,
    vitals: VitalsModel,
    outbox: Box<Outbox>,
    stats: DeviceStats,
    epochs: Vec<EpochMade>,
    alarms: AlarmScript,
    battery: Battery,
    interval_s: Option<u64>,
    /// `Some` for a forged-only device: the key it signs with instead of `key`.
    forger: Option<SigningKey>,
}

impl SimDevice {
    /// Boots the device: advances its epoch in `state_dir` (durably) and starts at seq 0.
    pub(crate) fn boot(
        id: DeviceId,
        key: SigningKey,
        fw: impl Into<String>,
        vitals: VitalsModel,
        state_dir: &Path,
    ) -> Result<Self, DeviceError> {
        let epoch_store = EpochStore::new(state_dir, id.as_str());
        let epoch = epoch_store.advance()?;
        tracing::info!(device.id = %id, epoch, "device booted");
        Ok(Self {
            id,
            key,
            fw: fw.into(),
            model: None,
            epoch_store,
            epoch,
            next_seq: 0,
            vitals,
            outbox: Box::default(),
            stats: DeviceStats::default(),
            epochs: vec![EpochMade { epoch, made: 0 }],
            alarms: AlarmScript::default(),
            battery: Battery::default(),
            interval_s: None,
            forger: None,
        })
    }

    /// Sets what the device reports besides vitals and whether it forges; a forged-only
    /// device gets a fresh random key of its registered key's algorithm.
    pub(crate) fn with_profile(mut self, profile: DeviceProfile) -> Result<Self, DeviceError> {
        self.alarms = profile.alarms;
        self.battery = profile.battery;
        self.interval_s = profile.interval_s;
        self.model = profile.model;
        self.forger = if profile.forged_only {
            tracing::info!(device.id = %self.id, "forged-only: every message is signed with a foreign key");
            Some(SigningKey::generate(self.key.algorithm())?)
        } else {
            None
        };
        Ok(self)
    }

    pub(crate) fn forged_only(&self) -> bool {
        self.forger.is_some()
    }

    /// A simulated reboot: a new durable epoch, seq back to 0. The outbox survives (it
    /// models retained memory), so its older epoch is sent before the new one.
    pub(crate) fn reboot(&mut self) -> Result<u64, DeviceError> {
        self.epoch = self.epoch_store.advance()?;
        self.next_seq = 0;
        self.stats.reboots += 1;
        self.epochs.push(EpochMade {
            epoch: self.epoch,
            made: 0,
        });
        tracing::info!(device.id = %self.id, epoch = self.epoch, held = self.outbox.len(), "device rebooted");
        Ok(self.epoch)
    }

    pub(crate) fn id(&self) -> &DeviceId {
        &self.id
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    pub(crate) fn stats(&self) -> DeviceStats {
        self.stats
    }

    pub(crate) fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Makes the vitals message for simulated time `t` (device clock `ts_ms`), signs and
    /// stores it. `None` while the sensor has dropped out.
    pub(crate) fn make_vitals(
        &mut self,
        t: Duration,
        ts_ms: u64,
    ) -> Result<Option<Made>, DeviceError> {
        let Some(s) = self.vitals.sample(t) else {
            return Ok(None);
        };
        let m = BTreeMap::from([
            ("spo2".to_owned(), Number::Int(s.spo2.into())),
            ("pulse".to_owned(), Number::Int(s.pulse.into())),
            ("resp".to_owned(), Number::Int(s.resp.into())),
            ("temp".to_owned(), Number::Float(s.temp)),
        ]);
        let made = self.make(
            MessageType::Vitals,
            ts_ms,
            Some(m),
            Some(s.q),
            self.model.clone(),
            BTreeMap::new(),
        )?;
        self.stats.vitals_made += 1;
        Ok(Some(made))
    }

    /// Makes the alarm messages the script has due by device time `t`; how many.
    pub(crate) fn make_alarms(&mut self, t: Duration, ts_ms: u64) -> Result<usize, DeviceError> {
        let due = self.alarms.due(t).to_vec();
        for event in &due {
            let made = self.make(
                MessageType::Alarm,
                ts_ms,
                None,
                None,
                Some(self.model.clone().unwrap_or_else(|| event.model.clone())),
                event.alarm.to_fields().collect(),
            )?;
            self.stats.alarms_made += 1;
            tracing::info!(
                device.id = %self.id,
                epoch = made.key.epoch,
                seq = made.key.seq,
                alarm = %event.alarm.code,
                level = %event.alarm.level,
                active = event.alarm.active,
                "alarm made"
            );
        }
        Ok(due.len())
    }

    /// Makes a status message: `dropped` (overflow drops since start), `battery` and
    /// `charging` at device time `uptime`, `interval_s`, and `held` (messages awaiting a
    /// receipt) and `uptime_s`.
    pub(crate) fn make_status(
        &mut self,
        ts_ms: u64,
        uptime: Duration,
    ) -> Result<Made, DeviceError> {
        let report = vitalmq_envelope::StatusReport {
            battery: Some(self.battery.level(uptime)),
            dropped: Some(self.outbox.counters().overflow_dropped),
            interval_s: self.interval_s,
            charging: Some(self.battery.charging),
        };
        let mut extra = BTreeMap::from([
            (
                "held".to_owned(),
                Value::Integer((self.outbox.len() as u64).into()),
            ),
            (
                "uptime_s".to_owned(),
                Value::Integer(uptime.as_secs().into()),
            ),
        ]);
        extra.extend(report.to_fields());
        let made = self.make(MessageType::Status, ts_ms, None, None, None, extra)?;
        self.stats.status_made += 1;
        Ok(made)
    }

    fn make(
        &mut self,
        kind: MessageType,
        ts: u64,
        m: Option<BTreeMap<String, Number>>,
        q: Option<f64>,
        model: Option<String>,
        extra: BTreeMap<String, Value>,
    ) -> Result<Made, DeviceError> {
        let seq = self.next_seq;
        let next = seq
            .checked_add(1)
            .ok_or(DeviceError::SeqExhausted(self.epoch))?;
        let telemetry = Telemetry {
            dev: self.id.clone(),
            epoch: self.epoch,
            seq,
            ts,
            fw: self.fw.clone(),
            kind,
            m,
            q,
            model,
            schema: None,
            extra,
        };
        let bytes = sign(&telemetry, self.forger.as_ref().unwrap_or(&self.key))?;
        let key = Key::new(self.epoch, seq);
        let channel = match kind {
            MessageType::Status => Channel::Status,
            MessageType::Vitals | MessageType::Alarm => Channel::Telemetry,
        };
        let pushed = self.outbox.push(key, channel, &bytes)?;
        self.next_seq = next;
        if let Some(current) = self.epochs.last_mut() {
            current.made = next;
        }
        let evicted = match pushed {
            Pushed::Stored => None,
            Pushed::Evicted { key: old, was_sent } => {
                tracing::warn!(
                    device.id = %self.id,
                    dropped.epoch = old.epoch,
                    dropped.seq = old.seq,
                    dropped.was_sent = was_sent,
                    "outbox full; oldest message dropped"
                );
                Some((old, was_sent))
            }
        };
        Ok(Made { key, evicted })
    }

    /// Handles a payload from `devices/{id}/ack`.
    pub(crate) fn apply_receipt(&mut self, payload: &[u8]) -> ReceiptOutcome {
        let receipt = match receipt::decode(payload) {
            Ok(k) => k,
            Err(e) => {
                self.stats.receipts_malformed += 1;
                return ReceiptOutcome::Malformed(e);
            }
        };
        if self.outbox.newest().is_none_or(|newest| receipt > newest) {
            self.stats.receipts_beyond_newest += 1;
            return ReceiptOutcome::BeyondNewest { receipt };
        }
        self.stats.receipts += 1;
        let released = self.outbox.release_through(receipt);
        ReceiptOutcome::Applied { receipt, released }
    }

    /// The oldest held message after `cursor` (all of them from `None`), in send order.
    pub(crate) fn next_after(&self, cursor: Option<Key>) -> Option<Outgoing<'_>> {
        self.outbox.next_after(cursor).map(|e: &Entry| Outgoing {
            key: e.key(),
            channel: e.channel(),
            bytes: e.bytes(),
            resend: e.sends() > 0,
        })
    }

    /// Records that `key` was handed to the network.
    pub(crate) fn mark_sent(&mut self, key: Key) {
        match self.outbox.mark_sent(key) {
            Some(0) => self.stats.sent += 1,
            Some(_) => self.stats.resent += 1,
            None => {}
        }
    }

    /// Every message made is covered by a receipt (trivially true before the first).
    pub(crate) fn fully_receipted(&self) -> bool {
        self.outbox.is_empty()
            && match (self.outbox.newest(), self.outbox.covered()) {
                (None, _) => true,
                (Some(newest), Some(covered)) => covered >= newest,
                (Some(_), None) => false,
            }
    }

    /// The account for the summary; `connects` and `error` come from the shell.
    pub(crate) fn report(&self, connects: u64, error: Option<String>) -> DeviceReport {
        let overflow_dropped = self.outbox.counters().overflow_dropped;
        DeviceReport {
            id: self.id.as_str().to_owned(),
            epoch: self.epoch,
            sent: self.stats.sent,
            resent: self.stats.resent,
            highest_seq: self.next_seq.checked_sub(1),
            receipted: self.outbox.covered(),
            unreceipted: self.outbox.len(),
            overflow_dropped,
            vitals: self.stats.vitals_made,
            status: self.stats.status_made,
            alarms: self.stats.alarms_made,
            forged_only: self.forged_only(),
            reboots: self.stats.reboots,
            connects,
            receipts_malformed: self.stats.receipts_malformed,
            all_receipted: error.is_none() && overflow_dropped == 0 && self.fully_receipted(),
            epochs: self.epochs.clone(),
            held: KeyRange::compress(self.outbox.iter().map(Entry::key)),
            gateway: None,
            faults: Vec::new(),
            error,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use vitalmq_envelope::{Algorithm, VerifyingKey, verify};

    use super::*;
    use crate::ring::DEFAULT_CAPACITY;

    struct Fixture {
        _dir: tempfile::TempDir,
        state: std::path::PathBuf,
        keys: HashMap<DeviceId, VerifyingKey>,
        device: SimDevice,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = dir.path().join("state");
        let id = DeviceId::new("dev-00001").expect("id");
        let key = SigningKey::generate(Algorithm::EdDsa).expect("key");
        let keys = HashMap::from([(id.clone(), key.verifying_key())]);
        let vitals = VitalsModel::new(1, id.as_str(), vec![]);
        let device = SimDevice::boot(id, key, DEFAULT_FW, vitals, &state).expect("boot");
        Fixture {
            _dir: dir,
            state,
            keys,
            device,
        }
    }

    fn vitals(d: &mut SimDevice, i: u64) -> Made {
        d.make_vitals(Duration::from_secs(i), 1_700_000_000_000 + i)
            .expect("make")
            .expect("no dropout")
    }

    fn send_all(d: &mut SimDevice, mut cursor: Option<Key>) -> Vec<(Key, bool)> {
        let mut sent = Vec::new();
        while let Some(o) = d.next_after(cursor) {
            let (key, resend) = (o.key, o.resend);
            d.mark_sent(key);
            sent.push((key, resend));
            cursor = Some(key);
        }
        sent
    }

    #[test]
    fn boot_persists_the_epoch_before_any_message() {
        let f = fixture();
        assert_eq!(f.device.epoch(), 1);
        assert_eq!(
            std::fs::read_to_string(f.state.join("dev-00001.epoch")).expect("epoch file"),
            "1\n"
        );
        assert!(f.device.outbox().is_empty());
        assert!(f.device.fully_receipted());
    }

    #[test]
    fn messages_are_signed_sequenced_and_verifiable() {
        let mut f = fixture();
        for i in 0..3 {
            assert_eq!(vitals(&mut f.device, i).key, Key::new(1, i));
        }
        let status = f
            .device
            .make_status(1_700_000_000_500, Duration::from_secs(9))
            .expect("status");
        assert_eq!(status.key, Key::new(1, 3), "status shares the sequence");
        let msgs: Vec<_> = f.device.outbox().iter().collect();
        for (i, e) in msgs.iter().enumerate() {
            let v = verify(e.bytes(), &f.keys, Some(f.device.id())).expect("verifies");
            let t: &Telemetry = &v;
            assert_eq!((t.epoch, t.seq), (1, i as u64));
            assert_eq!(t.fw, DEFAULT_FW);
            if i < 3 {
                assert_eq!(e.channel(), Channel::Telemetry);
                assert_eq!(t.kind, MessageType::Vitals);
                let m = t.m.as_ref().expect("measurements");
                assert!(
                    ["spo2", "pulse", "resp", "temp"]
                        .iter()
                        .all(|k| m.contains_key(*k))
                );
                assert!(t.q.is_some());
            } else {
                assert_eq!(e.channel(), Channel::Status);
                assert_eq!(t.kind, MessageType::Status);
                assert_eq!(t.extra.get("dropped"), Some(&Value::Integer(0.into())));
                assert_eq!(t.extra.get("held"), Some(&Value::Integer(3.into())));
            }
            assert!(e.bytes().len() < crate::ring::MAX_SIGNED - 100, "headroom");
        }
    }

    #[test]
    fn reboot_advances_the_epoch_and_backlog_goes_first() {
        let mut f = fixture();
        vitals(&mut f.device, 0);
        vitals(&mut f.device, 1);
        assert_eq!(f.device.reboot().expect("reboot"), 2);
        assert_eq!(
            std::fs::read_to_string(f.state.join("dev-00001.epoch")).expect("epoch file"),
            "2\n"
        );
        vitals(&mut f.device, 2);
        let order: Vec<Key> = send_all(&mut f.device, None)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(order, [Key::new(1, 0), Key::new(1, 1), Key::new(2, 0)]);
        let r = f.device.report(1, None);
        assert_eq!((r.epoch, r.highest_seq, r.reboots), (2, Some(0), 1));
        // A restarted process boots into the next epoch.
        let key = SigningKey::generate(Algorithm::EdDsa).expect("key");
        let id = DeviceId::new("dev-00001").expect("id");
        let model = VitalsModel::new(1, id.as_str(), vec![]);
        let again = SimDevice::boot(id, key, DEFAULT_FW, model, &f.state).expect("boot");
        assert_eq!(again.epoch(), 3);
    }

    #[test]
    fn the_report_accounts_every_epoch_and_what_is_still_held() {
        let mut f = fixture();
        for i in 0..4 {
            vitals(&mut f.device, i);
        }
        f.device.reboot().expect("reboot");
        f.device.reboot().expect("reboot");
        vitals(&mut f.device, 4);
        vitals(&mut f.device, 5);
        f.device.apply_receipt(&receipt::encode(Key::new(1, 1)));
        let r = f.device.report(1, None);
        assert_eq!(
            r.epochs,
            [
                EpochMade { epoch: 1, made: 4 },
                EpochMade { epoch: 2, made: 0 },
                EpochMade { epoch: 3, made: 2 },
            ]
        );
        assert_eq!(
            r.held,
            [
                KeyRange {
                    epoch: 1,
                    first: 2,
                    last: 3
                },
                KeyRange {
                    epoch: 3,
                    first: 0,
                    last: 1
                },
            ]
        );
        assert!(r.faults.is_empty());
        assert_eq!(
            KeyRange::compress([Key::new(1, 0), Key::new(1, 2), Key::new(1, 3)]).len(),
            2
        );
    }

    #[test]
    fn receipts_release_and_resends_are_counted() {
        let mut f = fixture();
        for i in 0..5 {
            vitals(&mut f.device, i);
        }
        assert!(
            send_all(&mut f.device, None)
                .iter()
                .all(|(_, resend)| !resend)
        );
        let outcome = f.device.apply_receipt(&receipt::encode(Key::new(1, 2)));
        assert_eq!(
            outcome,
            ReceiptOutcome::Applied {
                receipt: Key::new(1, 2),
                released: 3
            }
        );
        // After a reconnect everything unreceipted goes again, as resends.
        let again = send_all(&mut f.device, None);
        assert_eq!(again, [(Key::new(1, 3), true), (Key::new(1, 4), true)]);
        let s = f.device.stats();
        assert_eq!((s.sent, s.resent, s.receipts), (5, 2, 1));
        assert!(!f.device.fully_receipted());
        f.device.apply_receipt(&receipt::encode(Key::new(1, 4)));
        assert!(f.device.fully_receipted());
        let r = f.device.report(2, None);
        assert!(r.all_receipted);
        assert_eq!(r.receipted, Some(Key::new(1, 4)));
        assert_eq!((r.unreceipted, r.highest_seq), (0, Some(4)));
    }

    #[test]
    fn bad_receipts_free_nothing() {
        let mut f = fixture();
        vitals(&mut f.device, 0);
        vitals(&mut f.device, 1);
        assert!(matches!(
            f.device.apply_receipt(b"\xa1\x63seq\x01"),
            ReceiptOutcome::Malformed(ReceiptError::Missing("epoch"))
        ));
        assert!(matches!(
            f.device.apply_receipt(b"not cbor at all"),
            ReceiptOutcome::Malformed(_)
        ));
        // Beyond anything made: a later seq, or a later epoch.
        for beyond in [Key::new(1, 2), Key::new(2, 0)] {
            assert_eq!(
                f.device.apply_receipt(&receipt::encode(beyond)),
                ReceiptOutcome::BeyondNewest { receipt: beyond }
            );
        }
        assert_eq!(f.device.outbox().len(), 2);
        let s = f.device.stats();
        assert_eq!(
            (s.receipts, s.receipts_malformed, s.receipts_beyond_newest),
            (0, 2, 2)
        );
    }

    #[test]
    fn overflow_is_reported_in_the_next_status() {
        let mut f = fixture();
        let extra = 5;
        let mut evicted = Vec::new();
        for i in 0..(DEFAULT_CAPACITY as u64 + extra) {
            if let Some(e) = vitals(&mut f.device, i).evicted {
                evicted.push(e);
            }
        }
        assert_eq!(
            evicted,
            (0..extra)
                .map(|s| (Key::new(1, s), false))
                .collect::<Vec<_>>()
        );
        f.device
            .make_status(1_700_000_001_000, Duration::from_secs(300))
            .expect("status");
        let status = f.device.outbox().iter().last().expect("status held");
        let t = verify(status.bytes(), &f.keys, None)
            .expect("verifies")
            .into_inner();
        // The status itself pushed out one more vitals message.
        assert_eq!(t.extra.get("dropped"), Some(&Value::Integer(extra.into())));
        assert_eq!(f.device.outbox().counters().overflow_dropped, extra + 1);
        let r = f.device.report(0, None);
        assert_eq!(r.overflow_dropped, extra + 1);
        assert!(!r.all_receipted);
        // The oldest still held is the first not dropped.
        assert_eq!(
            f.device.next_after(None).map(|o| o.key),
            Some(Key::new(1, extra + 1))
        );
    }

    fn verified(f: &Fixture, key: Key) -> Telemetry {
        let held = f
            .device
            .outbox()
            .iter()
            .find(|e| e.key() == key)
            .expect("held");
        verify(held.bytes(), &f.keys, None)
            .expect("verifies")
            .into_inner()
    }

    #[test]
    fn scripted_alarms_are_verified_alarm_messages_in_the_sequence() {
        let episodes: Vec<crate::alarms::AlarmEpisodeSpec> = vec![
            "dev-00001:arrhythmia:urgent:at=2s:for=3s"
                .parse()
                .expect("spec"),
        ];
        let f = fixture();
        let mut f = Fixture {
            device: f
                .device
                .with_profile(DeviceProfile {
                    alarms: AlarmScript::new(&episodes),
                    ..DeviceProfile::default()
                })
                .expect("profile"),
            ..f
        };
        let mut made = Vec::new();
        for i in 0..8 {
            let ts = 1_700_000_000_000 + i * 1000;
            if f.device
                .make_alarms(Duration::from_secs(i), ts)
                .expect("alarms")
                > 0
            {
                made.push(Key::new(1, f.device.next_seq - 1));
            }
            vitals(&mut f.device, i);
        }
        // vitals 0, 1, alarm raised at 2 s (seq 2) before vitals 2, ..., cleared at 5 s.
        assert_eq!(made, [Key::new(1, 2), Key::new(1, 6)]);
        assert_eq!(f.device.stats().alarms_made, 2);
        let raised = verified(&f, made[0]);
        assert_eq!(raised.kind, MessageType::Alarm);
        assert_eq!(
            raised.model.as_deref(),
            Some(crate::alarms::DEFAULT_ALARM_MODEL)
        );
        let alarm = raised.alarm().expect("an alarm");
        assert_eq!((alarm.code.as_str(), alarm.active), ("arrhythmia", true));
        assert_eq!(alarm.level, vitalmq_envelope::AlarmLevel::Urgent);
        assert!(alarm.detail.is_some());
        let cleared = verified(&f, made[1]).alarm().expect("an alarm");
        assert!(!cleared.active);
        assert_eq!(f.device.outbox().len(), 10, "alarms wait for receipts too");
        assert_eq!(f.device.report(0, None).alarms, 2);
    }

    #[test]
    fn a_device_model_is_reported_on_vitals_and_alarms() {
        let episodes: Vec<crate::alarms::AlarmEpisodeSpec> =
            vec!["dev-00001:arrhythmia:urgent:at=1s".parse().expect("spec")];
        let f = fixture();
        let rc = "arrhythmia-net/2.2.0-rc1";
        let mut f = Fixture {
            device: f
                .device
                .with_profile(DeviceProfile {
                    alarms: AlarmScript::new(&episodes),
                    model: Some(rc.to_owned()),
                    ..DeviceProfile::default()
                })
                .expect("profile"),
            ..f
        };
        vitals(&mut f.device, 0);
        assert_eq!(
            f.device
                .make_alarms(Duration::from_secs(1), 1_700_000_001_000)
                .expect("alarms"),
            1
        );
        assert_eq!(verified(&f, Key::new(1, 0)).model.as_deref(), Some(rc));
        let alarm = verified(&f, Key::new(1, 1));
        assert_eq!(
            (alarm.kind, alarm.model.as_deref()),
            (MessageType::Alarm, Some(rc))
        );
    }

    #[test]
    fn status_reports_battery_charging_interval_and_dropped() {
        let f = fixture();
        let battery = Battery {
            start: 0.5,
            drain_per_hour: 0.1,
            charging: false,
        };
        let mut f = Fixture {
            device: f
                .device
                .with_profile(DeviceProfile {
                    battery,
                    interval_s: Some(5),
                    ..DeviceProfile::default()
                })
                .expect("profile"),
            ..f
        };
        let first = f
            .device
            .make_status(1_700_000_000_000, Duration::ZERO)
            .expect("status");
        let later = f
            .device
            .make_status(1_700_003_600_000, Duration::from_secs(3600))
            .expect("status");
        let (first, later) = (
            verified(&f, first.key).status(),
            verified(&f, later.key).status(),
        );
        assert_eq!(
            first,
            vitalmq_envelope::StatusReport {
                battery: Some(0.5),
                dropped: Some(0),
                interval_s: Some(5),
                charging: Some(false),
            }
        );
        assert_eq!(later.battery, Some(0.4), "declines over device time");
    }

    #[test]
    fn a_forged_only_device_signs_everything_with_a_foreign_key() {
        let episodes: Vec<crate::alarms::AlarmEpisodeSpec> =
            vec!["dev-00001:fall:review:at=0s".parse().expect("spec")];
        let f = fixture();
        let mut f = Fixture {
            device: f
                .device
                .with_profile(DeviceProfile {
                    alarms: AlarmScript::new(&episodes),
                    forged_only: true,
                    ..DeviceProfile::default()
                })
                .expect("profile"),
            ..f
        };
        assert!(f.device.forged_only());
        f.device
            .make_alarms(Duration::ZERO, 1_700_000_000_000)
            .expect("alarm");
        vitals(&mut f.device, 0);
        f.device
            .make_status(1_700_000_000_000, Duration::ZERO)
            .expect("status");
        // Sequenced and held like any device's messages ...
        let keys: Vec<Key> = f.device.outbox().iter().map(Entry::key).collect();
        assert_eq!(keys, [Key::new(1, 0), Key::new(1, 1), Key::new(1, 2)]);
        // ... and every one refused as bad_signature under the registered key.
        for held in f.device.outbox().iter() {
            let refusal = verify(held.bytes(), &f.keys, None).expect_err("forged");
            assert_eq!(refusal.reason, vitalmq_envelope::ReasonClass::BadSignature);
        }
        let r = f.device.report(0, None);
        assert!(r.forged_only);
        assert!(!r.all_receipted, "its own report stays truthful");
    }
}
