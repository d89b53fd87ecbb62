//! The device's outbox: every signed message it made that no receipt covers yet
//! (SPEC section 4), in a fixed-size ring that never allocates after it is made.
//!
//! A wearable has a few kilobytes of RAM for this, so the outbox is a
//! [`heapless::Deque`] of `CAP` entries, each holding up to `MAX` bytes of signed
//! message inline. Its invariants:
//!
//! * Entries are in strictly increasing `(epoch, seq)` order (lexicographic, [`Key`]'s
//!   `Ord`), the front being the oldest. [`Outbox::push`] refuses a key that is not above
//!   every key ever pushed, so the order holds even after the ring was emptied.
//! * A message leaves the ring only two ways: a receipt covers it
//!   ([`Outbox::release_through`], cumulative: everything `<=` the receipt goes), or the
//!   ring is full when a newer one arrives and the OLDEST is dropped and counted
//!   ([`Counters::overflow_dropped`]). Nothing else ever forgets a message.
//! * Receipts only move forward: [`Outbox::covered`] is the highest receipt applied; an
//!   older receipt arriving after a newer one changes nothing (and cannot bring anything
//!   back, since released entries are gone).
//!
//! The ring knows nothing about MQTT or signing; it stores opaque bytes with the key and
//! the [`Channel`] they were made for.

use heapless::Deque;
use serde::Serialize;

/// Largest signed message an entry holds. A signed vitals or status message is about
/// 230 bytes; the rest is headroom for longer ids, firmware strings and extra keys.
pub const MAX_SIGNED: usize = 384;

/// Entries in a device's outbox by default: at one message a second, four minutes
/// offline before the oldest is dropped.
pub const DEFAULT_CAPACITY: usize = 256;

/// The event identity of a message within its device: `(epoch, seq)`, ordered
/// lexicographically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Key {
    pub epoch: u64,
    pub seq: u64,
}

impl Key {
    pub const fn new(epoch: u64, seq: u64) -> Self {
        Self { epoch, seq }
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.epoch, self.seq)
    }
}

/// The topic a message was made for (`devices/{id}/telemetry` or `devices/{id}/status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Telemetry,
    Status,
}

impl Channel {
    pub fn topic(self, device: &str) -> String {
        match self {
            Self::Telemetry => format!("devices/{device}/telemetry"),
            Self::Status => format!("devices/{device}/status"),
        }
    }
}

/// One held message.
#[derive(Debug, Clone)]
pub struct Entry<const MAX: usize = MAX_SIGNED> {
    key: Key,
    channel: Channel,
    sends: u32,
    bytes: heapless::Vec<u8, MAX>,
}

impl<const MAX: usize> Entry<MAX> {
    pub fn key(&self) -> Key {
        self.key
    }

    pub fn channel(&self) -> Channel {
        self.channel
    }

    /// How often it was handed to the network so far.
    pub fn sends(&self) -> u32 {
        self.sends
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Why a message was not stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    #[error("message {key} is not newer than {newest}, the newest ever held")]
    OutOfOrder { key: Key, newest: Key },
    #[error("message {key} has {len} bytes, more than the {max} an entry holds")]
    TooLarge { key: Key, len: usize, max: usize },
}

/// What the ring did over its lifetime.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Messages stored.
    pub pushed: u64,
    /// Messages a receipt covered.
    pub released: u64,
    /// Messages dropped because the ring was full (the oldest goes first).
    pub overflow_dropped: u64,
    /// Of those, the ones that had never been sent.
    pub overflow_dropped_unsent: u64,
}

/// What [`Outbox::push`] did besides storing the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Stored,
    /// The ring was full: this (oldest) message was dropped to make room.
    Evicted {
        key: Key,
        was_sent: bool,
    },
}

/// The bounded outbox; see the module documentation for its invariants.
#[derive(Debug)]
pub struct Outbox<const CAP: usize = DEFAULT_CAPACITY, const MAX: usize = MAX_SIGNED> {
    entries: Deque<Entry<MAX>, CAP>,
    newest: Option<Key>,
    covered: Option<Key>,
    counters: Counters,
}

impl<const CAP: usize, const MAX: usize> Default for Outbox<CAP, MAX> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const CAP: usize, const MAX: usize> Outbox<CAP, MAX> {
    pub const fn new() -> Self {
        const { assert!(CAP > 0, "an outbox holds at least one message") };
        Self {
            entries: Deque::new(),
            newest: None,
            covered: None,
            counters: Counters {
                pushed: 0,
                released: 0,
                overflow_dropped: 0,
                overflow_dropped_unsent: 0,
            },
        }
    }

    /// Stores a signed message. `key` must be above every key pushed before. When the
    /// ring is full the oldest entry is dropped and counted.
    pub fn push(&mut self, key: Key, channel: Channel, bytes: &[u8]) -> Result<Pushed, PushError> {
        if let Some(newest) = self.newest
            && key <= newest
        {
            return Err(PushError::OutOfOrder { key, newest });
        }
        let bytes = heapless::Vec::from_slice(bytes).map_err(|()| PushError::TooLarge {
            key,
            len: bytes.len(),
            max: MAX,
        })?;
        let mut pushed = Pushed::Stored;
        if self.entries.is_full()
            && let Some(old) = self.entries.pop_front()
        {
            self.counters.overflow_dropped += 1;
            if old.sends == 0 {
                self.counters.overflow_dropped_unsent += 1;
            }
            pushed = Pushed::Evicted {
                key: old.key,
                was_sent: old.sends > 0,
            };
        }
        let entry = Entry {
            key,
            channel,
            sends: 0,
            bytes,
        };
        if self.entries.push_back(entry).is_err() {
            // Unreachable: a full ring was made one shorter just above. Kept as a
            // counted drop rather than a panic.
            self.counters.overflow_dropped += 1;
            self.counters.overflow_dropped_unsent += 1;
        }
        self.newest = Some(key);
        self.counters.pushed += 1;
        Ok(pushed)
    }

    /// Applies a cumulative receipt: frees every entry with `(epoch, seq) <= upto`.
    /// Returns how many were freed (0 for a receipt older than one applied before).
    pub fn release_through(&mut self, upto: Key) -> usize {
        if self.covered.is_none_or(|c| upto > c) {
            self.covered = Some(upto);
        }
        let mut freed = 0;
        while self.entries.front().is_some_and(|e| e.key <= upto) {
            self.entries.pop_front();
            freed += 1;
        }
        self.counters.released += freed as u64;
        freed
    }

    /// The held messages, oldest first: the order they are resent in.
    pub fn iter(&self) -> impl Iterator<Item = &Entry<MAX>> {
        self.entries.iter()
    }

    /// The oldest held message with a key above `cursor` (the first one for `None`).
    pub fn next_after(&self, cursor: Option<Key>) -> Option<&Entry<MAX>> {
        self.entries
            .iter()
            .find(|e| cursor.is_none_or(|c| e.key > c))
    }

    /// Records that the message `key` was handed to the network; returns how often it
    /// had been before, or `None` if it is not held (released or dropped meanwhile).
    pub fn mark_sent(&mut self, key: Key) -> Option<u32> {
        let entry = self.entries.iter_mut().find(|e| e.key == key)?;
        let before = entry.sends;
        entry.sends = entry.sends.saturating_add(1);
        Some(before)
    }

    pub fn front(&self) -> Option<&Entry<MAX>> {
        self.entries.front()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub const fn capacity(&self) -> usize {
        CAP
    }

    /// The newest key ever pushed.
    pub fn newest(&self) -> Option<Key> {
        self.newest
    }

    /// The highest receipt applied.
    pub fn covered(&self) -> Option<Key> {
        self.covered
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Small = Outbox<4, 8>;

    fn k(epoch: u64, seq: u64) -> Key {
        Key::new(epoch, seq)
    }

    fn keys<const C: usize, const M: usize>(o: &Outbox<C, M>) -> Vec<(u64, u64)> {
        o.iter().map(|e| (e.key.epoch, e.key.seq)).collect()
    }

    fn filled(pairs: &[(u64, u64)]) -> Small {
        let mut o = Small::new();
        for &(e, s) in pairs {
            o.push(k(e, s), Channel::Telemetry, &[s as u8])
                .expect("in order");
        }
        o
    }

    #[test]
    fn key_order_is_lexicographic() {
        assert!(k(1, 1000) < k(2, 0));
        assert!(k(2, 0) < k(2, 1));
        assert!(k(0, u64::MAX) < k(1, 0));
    }

    #[test]
    fn push_keeps_order_and_bytes() {
        let o = filled(&[(1, 0), (1, 1), (2, 0)]);
        assert_eq!(keys(&o), [(1, 0), (1, 1), (2, 0)]);
        assert_eq!(o.front().map(Entry::bytes), Some(&[0u8][..]));
        assert_eq!(o.len(), 3);
        assert_eq!(o.newest(), Some(k(2, 0)));
        assert_eq!(o.counters().pushed, 3);
    }

    #[test]
    fn push_refuses_old_or_equal_keys_even_after_release() {
        let mut o = filled(&[(1, 5)]);
        assert_eq!(
            o.push(k(1, 5), Channel::Telemetry, b""),
            Err(PushError::OutOfOrder {
                key: k(1, 5),
                newest: k(1, 5)
            })
        );
        assert!(o.push(k(0, 9), Channel::Telemetry, b"").is_err());
        o.release_through(k(1, 5));
        assert!(o.is_empty());
        assert!(o.push(k(1, 4), Channel::Telemetry, b"").is_err());
        assert!(o.push(k(1, 6), Channel::Telemetry, b"").is_ok());
    }

    #[test]
    fn push_refuses_oversized_messages_without_storing() {
        let mut o = Small::new();
        assert_eq!(
            o.push(k(1, 0), Channel::Telemetry, &[0; 9]),
            Err(PushError::TooLarge {
                key: k(1, 0),
                len: 9,
                max: 8
            })
        );
        assert!(o.is_empty());
        assert_eq!(o.newest(), None);
        assert!(o.push(k(1, 0), Channel::Telemetry, &[0; 8]).is_ok());
    }

    #[test]
    fn overflow_drops_the_oldest_and_counts_it() {
        let mut o = filled(&[(1, 0), (1, 1), (1, 2), (1, 3)]);
        assert_eq!(o.mark_sent(k(1, 0)), Some(0));
        assert_eq!(
            o.push(k(1, 4), Channel::Telemetry, b""),
            Ok(Pushed::Evicted {
                key: k(1, 0),
                was_sent: true
            })
        );
        assert_eq!(
            o.push(k(2, 0), Channel::Status, b""),
            Ok(Pushed::Evicted {
                key: k(1, 1),
                was_sent: false
            })
        );
        assert_eq!(keys(&o), [(1, 2), (1, 3), (1, 4), (2, 0)]);
        assert_eq!(o.len(), o.capacity());
        let c = o.counters();
        assert_eq!(
            (c.pushed, c.overflow_dropped, c.overflow_dropped_unsent),
            (6, 2, 1)
        );
    }

    #[test]
    fn long_overflow_keeps_the_newest_window() {
        let mut o = Small::new();
        for s in 0..1000 {
            o.push(k(7, s), Channel::Telemetry, b"x").expect("in order");
        }
        assert_eq!(keys(&o), [(7, 996), (7, 997), (7, 998), (7, 999)]);
        assert_eq!(o.counters().overflow_dropped, 996);
    }

    #[test]
    fn receipt_frees_through_its_key_inclusive() {
        let mut o = filled(&[(1, 0), (1, 1), (1, 2), (1, 3)]);
        assert_eq!(o.release_through(k(1, 1)), 2);
        assert_eq!(keys(&o), [(1, 2), (1, 3)]);
        assert_eq!(o.covered(), Some(k(1, 1)));
        assert_eq!(o.counters().released, 2);
    }

    #[test]
    fn receipt_across_epochs() {
        let mut o = filled(&[(1, 7), (1, 8), (2, 0), (2, 1)]);
        // A receipt in the old epoch frees only the old epoch's prefix.
        assert_eq!(o.release_through(k(1, 7)), 1);
        assert_eq!(keys(&o), [(1, 8), (2, 0), (2, 1)]);
        // A receipt in the new epoch covers the rest of the old epoch as well.
        assert_eq!(o.release_through(k(2, 0)), 2);
        assert_eq!(keys(&o), [(2, 1)]);
        // A receipt for a high seq of an older epoch covers nothing of the newer one.
        assert_eq!(o.release_through(k(1, u64::MAX)), 0);
        assert_eq!(keys(&o), [(2, 1)]);
    }

    #[test]
    fn receipt_for_a_key_not_held() {
        // Between held keys (a gap, e.g. a dropout or an overflow-dropped message).
        let mut o = filled(&[(1, 0), (1, 5), (1, 9)]);
        assert_eq!(o.release_through(k(1, 6)), 2);
        assert_eq!(keys(&o), [(1, 9)]);
        // Below everything held.
        assert_eq!(o.release_through(k(0, 100)), 0);
        assert_eq!(keys(&o), [(1, 9)]);
        // Above everything held: all freed.
        assert_eq!(o.release_through(k(3, 0)), 1);
        assert!(o.is_empty());
        // On an empty ring.
        assert_eq!(o.release_through(k(4, 0)), 0);
        assert_eq!(o.covered(), Some(k(4, 0)));
    }

    #[test]
    fn older_receipt_after_newer_changes_nothing() {
        let mut o = filled(&[(1, 0), (1, 1), (1, 2)]);
        assert_eq!(o.release_through(k(1, 1)), 2);
        assert_eq!(o.release_through(k(1, 0)), 0);
        assert_eq!(keys(&o), [(1, 2)]);
        assert_eq!(o.covered(), Some(k(1, 1)), "covered never moves back");
        // Newer messages after the older receipt stay held too.
        o.push(k(1, 3), Channel::Telemetry, b"").expect("in order");
        assert_eq!(o.release_through(k(0, 0)), 0);
        assert_eq!(keys(&o), [(1, 2), (1, 3)]);
        assert_eq!(o.counters().released, 2);
    }

    #[test]
    fn next_after_walks_in_order_and_skips_released() {
        let mut o = filled(&[(1, 0), (1, 1), (2, 0)]);
        assert_eq!(o.next_after(None).map(Entry::key), Some(k(1, 0)));
        assert_eq!(o.next_after(Some(k(1, 0))).map(Entry::key), Some(k(1, 1)));
        assert_eq!(o.next_after(Some(k(1, 1))).map(Entry::key), Some(k(2, 0)));
        assert_eq!(o.next_after(Some(k(2, 0))).map(Entry::key), None);
        o.release_through(k(1, 1));
        // A cursor on a released key still finds the next one.
        assert_eq!(o.next_after(Some(k(1, 0))).map(Entry::key), Some(k(2, 0)));
    }

    #[test]
    fn mark_sent_counts_sends_of_held_entries_only() {
        let mut o = filled(&[(1, 0), (1, 1)]);
        assert_eq!(o.mark_sent(k(1, 1)), Some(0));
        assert_eq!(o.mark_sent(k(1, 1)), Some(1));
        assert_eq!(o.iter().map(Entry::sends).collect::<Vec<_>>(), [0, 2]);
        assert_eq!(o.mark_sent(k(9, 9)), None);
        o.release_through(k(1, 1));
        assert_eq!(o.mark_sent(k(1, 1)), None);
    }

    #[test]
    fn default_sizes_fit_a_device() {
        let o: Box<Outbox> = Box::default();
        assert_eq!(o.capacity(), DEFAULT_CAPACITY);
        // The whole ring is inline: about CAP * MAX bytes, no heap behind it.
        assert!(size_of::<Outbox>() < DEFAULT_CAPACITY * (MAX_SIGNED + 64));
    }
}
