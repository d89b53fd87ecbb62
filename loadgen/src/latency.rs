//! Publish-to-receive latency of the simulator's load mode (`vitalmq sim
//! --latency-report`), without I/O: when each message was first published, which
//! receipt or alert covers it, and histograms of the differences.
//!
//! Two latencies are measured per message, both from the instant the device first
//! handed the PUBLISH to its MQTT client:
//!
//! * **to the bridge**: until the device applies the first receipt that covers the
//!   message. The bridge publishes receipts only after its durable commit and coalesces
//!   them (`receipt_interval_ms`, SPEC section 4), so this includes up to one receipt
//!   interval of deliberate delay.
//! * **to the alert topics**: until an integrator subscribed to `alerts/{site}/#` receives
//!   the alert whose newest evidence event id (SPEC section 5, newest last) is the
//!   message's event id. Event ids are one-way hashes of `(device, epoch, seq)`
//!   ([`event_id`]), so the match is made by hashing the device's recently published
//!   keys.
//!
//! Memory stays bounded per device: [`SendTimes`] is a fixed-size `heapless` ring (the
//! outbox's capacity), and latencies go into HDR histograms (fixed size, no sample is
//! stored). A message whose publish time fell out of the ring before its receipt came is
//! counted as `untimed` rather than guessed.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use heapless::Deque;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tokio::time::Instant;

use vitalmq_device_sim::ring::{DEFAULT_CAPACITY, Key};

/// Publish instants kept per device: as many as the outbox holds.
pub(crate) const SEND_TIMES: usize = DEFAULT_CAPACITY;

/// Highest latency a histogram records exactly (one hour, in microseconds); larger
/// values are clamped to it.
const HIGHEST_US: u64 = 3_600_000_000;

/// The bridge's event id of `(device, epoch, seq)`: `ev1-` and the first 16 bytes of
/// SHA-256 over a domain tag, the device id, a zero byte and the big-endian epoch and
/// seq (as `bridge/src/normalize.rs` makes it).
pub(crate) fn event_id(device: &str, key: Key) -> String {
    let mut h = Sha256::new();
    h.update(b"vitalmq/event/v1\0");
    h.update(device.as_bytes());
    h.update([0]);
    h.update(key.epoch.to_be_bytes());
    h.update(key.seq.to_be_bytes());
    let digest = h.finalize();
    format!("ev1-{}", hex::encode(&digest[..16]))
}

#[derive(Debug, Clone, Copy)]
struct Sent {
    key: Key,
    at: Instant,
    receipted: bool,
}

/// One device's first-publish instants, oldest first, in a fixed-size ring. Receipted
/// entries stay until pushed out, so that an alert arriving after the receipt can still
/// be matched to its trigger.
#[derive(Debug)]
pub(crate) struct SendTimes {
    ring: Deque<Sent, SEND_TIMES>,
    /// Entries not yet receipted (they are at the back, apart from a swapped pair).
    pending: usize,
}

impl Default for SendTimes {
    fn default() -> Self {
        Self::new()
    }
}

impl SendTimes {
    pub(crate) const fn new() -> Self {
        Self {
            ring: Deque::new(),
            pending: 0,
        }
    }

    /// Records the first publish of `key` at `at`. Returns true when the ring was full
    /// and the oldest entry dropped had no receipt yet (its latency is lost: untimed).
    pub(crate) fn sent(&mut self, key: Key, at: Instant) -> bool {
        let mut untimed = false;
        if self.ring.is_full()
            && let Some(old) = self.ring.pop_front()
            && !old.receipted
        {
            self.pending -= 1;
            untimed = true;
        }
        // Cannot fail: a full ring was made one shorter just above.
        let _ = self.ring.push_back(Sent {
            key,
            at,
            receipted: false,
        });
        self.pending += 1;
        untimed
    }

    /// A receipt covering everything up to `receipt` arrived at `now`: calls `each` with
    /// the latency of every entry it covers for the first time; returns how many.
    pub(crate) fn receipted_through(
        &mut self,
        receipt: Key,
        now: Instant,
        mut each: impl FnMut(Duration),
    ) -> usize {
        let mut timed = 0;
        let mut unreceipted_seen = 0;
        // Pending entries are at the back; stop once all of them were looked at.
        for s in self.ring.iter_mut().rev() {
            if unreceipted_seen == self.pending {
                break;
            }
            if s.receipted {
                continue;
            }
            unreceipted_seen += 1;
            if s.key <= receipt {
                s.receipted = true;
                timed += 1;
                each(now.saturating_duration_since(s.at));
            }
        }
        self.pending -= timed;
        timed
    }

    /// The first-publish instant of the message of `device` whose event id is `id`,
    /// newest first (an alert's trigger is a recent message).
    pub(crate) fn find(&self, device: &str, id: &str) -> Option<(Key, Instant)> {
        self.ring
            .iter()
            .rev()
            .find(|s| event_id(device, s.key) == id)
            .map(|s| (s.key, s.at))
    }

    /// Entries still waiting for a receipt.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.pending
    }
}

/// Latency percentiles in microseconds: the load generator's summary, so every report
/// of the project reads the same way.
pub use crate::broker::Latency as Percentiles;

/// What became of one alert message received by an integrator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlertOutcome {
    /// Matched to the publish of its newest evidence.
    Timed { device: String, key: Key },
    /// Well-formed, but its newest evidence is none of the device's recent publishes
    /// (a device not simulated here, or pushed out of [`SendTimes`]).
    Unmatched,
    /// Not alert JSON with a `device` and a non-empty `evidence` list.
    Malformed,
}

/// The shared recorder of a load run: histograms and counters, safe to use from every
/// device task. Locks are held only to record a few values.
#[derive(Debug)]
pub struct Recorder {
    bridge: Mutex<Histogram<u64>>,
    alerts: Mutex<Histogram<u64>>,
    receipted: AtomicU64,
    receipts: AtomicU64,
    untimed: AtomicU64,
    alerts_received: AtomicU64,
    alerts_unmatched: AtomicU64,
    alerts_malformed: AtomicU64,
    alerts_by_state: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

fn histogram() -> Histogram<u64> {
    // 3 significant digits over 1 us .. 1 h: about 40 KiB, allocated once.
    Histogram::new_with_bounds(1, HIGHEST_US, 3).unwrap_or_else(|_| {
        // Unreachable with these constant bounds; an auto-resizing one is the fallback.
        Histogram::new(3).unwrap_or_else(|e| unreachable!("3 significant digits: {e}"))
    })
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(u64::MAX)
        .clamp(1, HIGHEST_US)
}

impl Recorder {
    pub fn new() -> Self {
        Self {
            bridge: Mutex::new(histogram()),
            alerts: Mutex::new(histogram()),
            receipted: AtomicU64::new(0),
            receipts: AtomicU64::new(0),
            untimed: AtomicU64::new(0),
            alerts_received: AtomicU64::new(0),
            alerts_unmatched: AtomicU64::new(0),
            alerts_malformed: AtomicU64::new(0),
            alerts_by_state: Mutex::new(std::collections::BTreeMap::new()),
        }
    }

    /// A device published `key` for the first time at `at`.
    pub(crate) fn on_sent(&self, times: &Mutex<SendTimes>, key: Key, at: Instant) {
        if lock(times).sent(key, at) {
            self.untimed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A device applied a receipt through `receipt` at `now` that released `released`
    /// messages from its outbox.
    pub(crate) fn on_receipt(
        &self,
        times: &Mutex<SendTimes>,
        receipt: Key,
        released: usize,
        now: Instant,
    ) {
        self.receipts.fetch_add(1, Ordering::Relaxed);
        self.receipted.fetch_add(released as u64, Ordering::Relaxed);
        let mut samples: heapless::Vec<u64, SEND_TIMES> = heapless::Vec::new();
        lock(times).receipted_through(receipt, now, |d| {
            // Cannot overflow: at most SEND_TIMES entries exist.
            let _ = samples.push(micros(d));
        });
        if !samples.is_empty() {
            let mut h = lock(&self.bridge);
            for v in samples {
                h.saturating_record(v);
            }
        }
    }

    /// An integrator received `payload` on an alert topic at `now`; `times` finds the
    /// send times of a simulated device.
    pub(crate) fn on_alert<'a>(
        &self,
        payload: &[u8],
        now: Instant,
        times: impl Fn(&str) -> Option<&'a Mutex<SendTimes>>,
    ) -> AlertOutcome {
        self.alerts_received.fetch_add(1, Ordering::Relaxed);
        let parsed = serde_json::from_slice::<serde_json::Value>(payload).ok();
        let fields = parsed.as_ref().and_then(|v| {
            let device = v.get("device")?.as_str()?;
            let newest = v.get("evidence")?.as_array()?.last()?.as_str()?;
            let state = v.get("state").and_then(|s| s.as_str()).unwrap_or("?");
            Some((device, newest, state))
        });
        let Some((device, newest, state)) = fields else {
            self.alerts_malformed.fetch_add(1, Ordering::Relaxed);
            return AlertOutcome::Malformed;
        };
        *lock(&self.alerts_by_state)
            .entry(state.to_owned())
            .or_default() += 1;
        let found = times(device).and_then(|t| lock(t).find(device, newest));
        match found {
            Some((key, at)) => {
                lock(&self.alerts).saturating_record(micros(now.saturating_duration_since(at)));
                AlertOutcome::Timed {
                    device: device.to_owned(),
                    key,
                }
            }
            None => {
                self.alerts_unmatched.fetch_add(1, Ordering::Relaxed);
                AlertOutcome::Unmatched
            }
        }
    }

    /// What was recorded so far.
    pub fn snapshot(&self) -> Recorded {
        let by_state = lock(&self.alerts_by_state).clone();
        Recorded {
            receipted: self.receipted.load(Ordering::Relaxed),
            receipts: self.receipts.load(Ordering::Relaxed),
            untimed: self.untimed.load(Ordering::Relaxed),
            bridge: Percentiles::from_hist(&lock(&self.bridge)),
            alerts_received: self.alerts_received.load(Ordering::Relaxed),
            alerts_unmatched: self.alerts_unmatched.load(Ordering::Relaxed),
            alerts_malformed: self.alerts_malformed.load(Ordering::Relaxed),
            alerts_by_state: by_state,
            alerts: Percentiles::from_hist(&lock(&self.alerts)),
        }
    }
}

/// A snapshot of a [`Recorder`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Recorded {
    /// Messages released from outboxes by receipts.
    pub receipted: u64,
    /// Receipts applied (each covers one or more messages: the coalescing).
    pub receipts: u64,
    /// Receipted messages whose publish time was no longer held (not in `bridge`).
    pub untimed: u64,
    pub bridge: Percentiles,
    pub alerts_received: u64,
    pub alerts_unmatched: u64,
    pub alerts_malformed: u64,
    pub alerts_by_state: std::collections::BTreeMap<String, u64>,
    pub alerts: Percentiles,
}

/// Locks, taking over a poisoned lock: every value behind these locks is valid after
/// any partial update (counters, histograms, a ring).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(seq: u64) -> Key {
        Key::new(1, seq)
    }

    #[test]
    fn event_ids_match_the_bridges_vector() {
        // The construction of bridge/src/normalize.rs, recomputed with Python's hashlib:
        // "ev1-" + sha256(b"vitalmq/event/v1\0" + b"dev-00042" + b"\0"
        //                 + (5).to_bytes(8, "big") + (17).to_bytes(8, "big")).hexdigest()[:32]
        let id = event_id("dev-00042", Key::new(5, 17));
        assert_eq!(id, "ev1-6d8b9f96dd8adb6fb6824459af7b5703");
        assert_ne!(id, event_id("dev-00042", Key::new(5, 18)));
        assert_ne!(
            event_id("dev-00042", Key::new(1, 23)),
            event_id("dev-00042", Key::new(12, 3))
        );
    }

    #[test]
    fn a_receipt_times_each_covered_message_once() {
        let t0 = Instant::now();
        let mut times = SendTimes::new();
        for s in 0..5 {
            assert!(!times.sent(k(s), t0 + Duration::from_millis(s * 10)));
        }
        let mut got = Vec::new();
        let now = t0 + Duration::from_millis(100);
        assert_eq!(times.receipted_through(k(2), now, |d| got.push(d)), 3);
        got.sort();
        assert_eq!(
            got,
            [80, 90, 100].map(Duration::from_millis).to_vec(),
            "latency = receipt time - publish time"
        );
        assert_eq!(times.pending(), 2);
        // A repeated or older receipt times nothing again.
        assert_eq!(
            times.receipted_through(k(2), now, |_| panic!("timed twice")),
            0
        );
        assert_eq!(
            times.receipted_through(k(1), now, |_| panic!("timed twice")),
            0
        );
        assert_eq!(times.receipted_through(k(4), now, |_| {}), 2);
        assert_eq!(times.pending(), 0);
    }

    #[test]
    fn a_swapped_pair_is_timed_when_covered() {
        let t0 = Instant::now();
        let mut times = SendTimes::new();
        times.sent(k(0), t0);
        times.sent(k(2), t0);
        times.sent(k(1), t0);
        assert_eq!(times.receipted_through(k(1), t0, |_| {}), 2);
        assert_eq!(times.pending(), 1);
        assert_eq!(times.receipted_through(k(2), t0, |_| {}), 1);
    }

    #[test]
    fn a_full_ring_drops_the_oldest_and_says_when_it_was_untimed() {
        let t0 = Instant::now();
        let mut times = SendTimes::new();
        for s in 0..SEND_TIMES as u64 {
            assert!(!times.sent(k(s), t0));
        }
        assert_eq!(times.receipted_through(k(0), t0, |_| {}), 1);
        // The receipted oldest goes first: nothing untimed.
        assert!(!times.sent(k(SEND_TIMES as u64), t0));
        // Now the oldest (seq 1) has no receipt yet.
        assert!(times.sent(k(SEND_TIMES as u64 + 1), t0));
        assert_eq!(times.pending(), SEND_TIMES);
    }

    #[test]
    fn alerts_are_matched_by_their_newest_evidence() {
        let t0 = Instant::now();
        let times = Mutex::new(SendTimes::new());
        for s in 0..10 {
            lock(&times).sent(k(s), t0 + Duration::from_millis(s));
        }
        let rec = Recorder::new();
        let lookup = |d: &str| (d == "dev-00001").then_some(&times);
        let alert = serde_json::json!({
            "device": "dev-00001",
            "state": "open",
            "evidence": [event_id("dev-00001", k(6)), event_id("dev-00001", k(7))],
        });
        let now = t0 + Duration::from_millis(50);
        let out = rec.on_alert(alert.to_string().as_bytes(), now, lookup);
        assert_eq!(
            out,
            AlertOutcome::Timed {
                device: "dev-00001".into(),
                key: k(7)
            }
        );
        let other =
            serde_json::json!({"device": "dev-00009", "state": "open", "evidence": ["ev1-00"]});
        assert_eq!(
            rec.on_alert(other.to_string().as_bytes(), now, lookup),
            AlertOutcome::Unmatched
        );
        assert_eq!(
            rec.on_alert(b"{\"evidence\": []}", now, lookup),
            AlertOutcome::Malformed
        );
        let snap = rec.snapshot();
        assert_eq!(snap.alerts_received, 3);
        assert_eq!(snap.alerts.samples, 1);
        // 50 ms - 7 ms, within the histogram's 3 significant digits.
        assert!((42_950..=43_050).contains(&snap.alerts.max_us), "{snap:?}");
        assert_eq!(snap.alerts_unmatched, 1);
        assert_eq!(snap.alerts_malformed, 1);
        assert_eq!(snap.alerts_by_state.get("open"), Some(&2));
    }

    #[test]
    fn receipts_feed_the_bridge_histogram_and_counters() {
        let t0 = Instant::now();
        let times = Mutex::new(SendTimes::new());
        let rec = Recorder::new();
        for s in 0..4 {
            rec.on_sent(&times, k(s), t0);
        }
        rec.on_receipt(&times, k(3), 4, t0 + Duration::from_millis(5));
        let snap = rec.snapshot();
        assert_eq!(
            (snap.receipted, snap.receipts, snap.bridge.samples),
            (4, 1, 4)
        );
        assert!((4_990..=5_010).contains(&snap.bridge.p50_us), "{snap:?}");
    }
}
