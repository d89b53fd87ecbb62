//! Per-device anti-replay window (SPEC section 4; RFC 4303 section 3.4.3 semantics).
//!
//! Pure logic, no I/O: [`DeviceSequence::check`] classifies an authenticated
//! `(epoch, seq)` without changing anything, [`DeviceSequence::apply`] records an
//! accepted one. Callers run `check` on a staged copy and swap it in only after the
//! batch is durably committed, so a failed commit never moves the window.
//!
//! Bitmap layout: one bit per sequence number of the window, bit `seq % size` of a ring
//! of `size / 64` words. A number is in the window when `highest - size < seq <= highest`.
//! All arithmetic is on `u64` without overflow: `epoch` and `seq` use the full range.

use std::fmt;

/// Default window size W (SPEC section 4).
pub(crate) const DEFAULT_WINDOW: u32 = 64;
/// Largest window the bridge accepts (the SPEC asks for at least 1024).
pub(crate) const MAX_WINDOW: u32 = 4096;

/// A window size: a multiple of 64 in `64..=MAX_WINDOW`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSize(u32);

/// A window size or stored window state the bridge cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("window size {0}: must be a multiple of 64 between 64 and {MAX_WINDOW}")]
    Size(u32),
    #[error("stored bitmap has {len} bytes, window {window} needs {}", window / 8)]
    Bitmap { len: usize, window: u32 },
}

impl WindowSize {
    pub fn new(size: u32) -> Result<Self, WindowError> {
        if size == 0 || size % 64 != 0 || size > MAX_WINDOW {
            return Err(WindowError::Size(size));
        }
        Ok(Self(size))
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl Default for WindowSize {
    fn default() -> Self {
        Self(DEFAULT_WINDOW)
    }
}

/// Why an authenticated message was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// The first message ever seen of this device.
    FirstSeen,
    /// The first message of a higher epoch (a reboot); the window restarted.
    NewEpoch,
    /// `seq == highest + 1`.
    InOrder,
    /// Inside the window and not seen before (late, out of order).
    OutOfOrder,
    /// Beyond `highest + 1`: `missing` numbers were skipped over.
    Gap { missing: u64 },
}

/// Why an authenticated message was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Already seen inside the window: dropped, counted, acknowledged.
    Duplicate,
    /// Older than the window.
    TooOld,
    /// From an epoch lower than the device's current one.
    StaleEpoch,
}

impl Rejected {
    /// The SPEC refusal class.
    pub fn class(self) -> &'static str {
        match self {
            Self::Duplicate => "duplicate",
            Self::TooOld | Self::StaleEpoch => "replay",
        }
    }

    /// The detail as the replay vectors spell it.
    pub fn detail(self) -> &'static str {
        match self {
            Self::Duplicate => "seen",
            Self::TooOld => "too_old",
            Self::StaleEpoch => "stale_epoch",
        }
    }
}

/// The verdict on one authenticated message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept(Accepted),
    Reject(Rejected),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Accept(Accepted::FirstSeen) => f.write_str("first_seen"),
            Self::Accept(Accepted::NewEpoch) => f.write_str("new_epoch"),
            Self::Accept(Accepted::InOrder) => f.write_str("in_order"),
            Self::Accept(Accepted::OutOfOrder) => f.write_str("out_of_order"),
            Self::Accept(Accepted::Gap { missing }) => write!(f, "missing={missing}"),
            Self::Reject(r) => f.write_str(r.detail()),
        }
    }
}

/// A cumulative receipt point (SPEC section 4): every message of the device up to and
/// including `(epoch, seq)` is durably recorded, or fell out of the window unseen and
/// was reported lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReceiptPoint {
    pub epoch: u64,
    pub seq: u64,
}

/// The sequence state of one device: current epoch, highest seq, seen-bitmap.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceSequence {
    size: WindowSize,
    epoch: u64,
    highest: u64,
    bits: Vec<u64>,
}

impl fmt::Debug for DeviceSequence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceSequence")
            .field("epoch", &self.epoch)
            .field("highest", &self.highest)
            .field("window", &self.size.get())
            .field("recent", &format_args!("{:016x}", self.recent_bitmap()))
            .finish()
    }
}

impl DeviceSequence {
    /// The state right after the first accepted message `(epoch, seq)` of a device.
    pub fn first(size: WindowSize, epoch: u64, seq: u64) -> Self {
        let mut s = Self {
            size,
            epoch,
            highest: seq,
            bits: vec![0; (size.get() / 64) as usize],
        };
        s.set(seq);
        s
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn highest(&self) -> u64 {
        self.highest
    }

    pub fn size(&self) -> WindowSize {
        self.size
    }

    /// Lowest sequence number inside the window.
    pub(crate) fn low(&self) -> u64 {
        self.highest.saturating_sub(u64::from(self.size.get()) - 1)
    }

    /// Classifies an authenticated message without changing the state.
    pub fn check(&self, epoch: u64, seq: u64) -> Verdict {
        if epoch < self.epoch {
            return Verdict::Reject(Rejected::StaleEpoch);
        }
        if epoch > self.epoch {
            return Verdict::Accept(Accepted::NewEpoch);
        }
        if seq > self.highest {
            // seq > highest, so highest + 1 cannot overflow.
            let missing = seq - self.highest - 1;
            return Verdict::Accept(if missing == 0 {
                Accepted::InOrder
            } else {
                Accepted::Gap { missing }
            });
        }
        if seq < self.low() {
            return Verdict::Reject(Rejected::TooOld);
        }
        if self.seen(seq) {
            Verdict::Reject(Rejected::Duplicate)
        } else {
            Verdict::Accept(Accepted::OutOfOrder)
        }
    }

    /// Records an accepted `(epoch, seq)`; `verdict` must be what [`Self::check`]
    /// returned for it on this state.
    pub fn apply(&mut self, epoch: u64, seq: u64, verdict: Accepted) {
        match verdict {
            Accepted::FirstSeen | Accepted::NewEpoch => *self = Self::first(self.size, epoch, seq),
            Accepted::InOrder | Accepted::Gap { .. } => {
                let advance = seq - self.highest;
                if advance >= u64::from(self.size.get()) {
                    self.bits.fill(0);
                } else {
                    // Clear the slots of the numbers the window slides over.
                    let mut s = self.highest;
                    for _ in 0..advance {
                        s += 1;
                        self.clear(s);
                    }
                }
                self.highest = seq;
                self.set(seq);
            }
            Accepted::OutOfOrder => self.set(seq),
        }
    }

    /// Whether `seq` of the current epoch was seen; false outside the window.
    pub(crate) fn seen(&self, seq: u64) -> bool {
        if seq > self.highest || seq < self.low() {
            return false;
        }
        let (word, bit) = self.slot(seq);
        self.bits[word] & (1 << bit) != 0
    }

    /// The 64 most recent positions as the replay vectors print them: bit `i` set when
    /// `highest - i` was seen.
    pub fn recent_bitmap(&self) -> u64 {
        (0..64u64)
            .filter(|&i| i <= self.highest && self.seen(self.highest - i))
            .fold(0, |acc, i| acc | (1 << i))
    }

    /// The cumulative receipt this state supports (SPEC section 4).
    ///
    /// Every epoch is expected to start at seq 0, so numbers below the window that were
    /// never seen count as lost, and the receipt stops just before the lowest unseen
    /// number inside the window. If even seq 0 of the current epoch may still arrive,
    /// only the previous epochs are covered (`(epoch - 1, u64::MAX)`: anything older is
    /// a replay now), or nothing at all in epoch 0.
    pub(crate) fn receipt(&self) -> Option<ReceiptPoint> {
        let mut s = self.low();
        loop {
            if !self.seen(s) {
                break;
            }
            if s == self.highest {
                return Some(ReceiptPoint {
                    epoch: self.epoch,
                    seq: s,
                });
            }
            s += 1;
        }
        if s > 0 {
            Some(ReceiptPoint {
                epoch: self.epoch,
                seq: s - 1,
            })
        } else if self.epoch > 0 {
            Some(ReceiptPoint {
                epoch: self.epoch - 1,
                seq: u64::MAX,
            })
        } else {
            None
        }
    }

    /// Serialized state for the store: the bitmap words, little-endian.
    pub fn bitmap_bytes(&self) -> Vec<u8> {
        self.bits.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// Rebuilds a stored state. When the configured window size changed since it was
    /// stored, numbers the old window cannot vouch for are treated as seen, so a
    /// resize can never accept a message twice (it may call a late one a duplicate).
    pub(crate) fn restore(
        size: WindowSize,
        stored_size: u32,
        epoch: u64,
        highest: u64,
        bitmap: &[u8],
    ) -> Result<Self, WindowError> {
        let stored = WindowSize::new(stored_size)?;
        if bitmap.len() != (stored.get() / 8) as usize {
            return Err(WindowError::Bitmap {
                len: bitmap.len(),
                window: stored.get(),
            });
        }
        let old = Self {
            size: stored,
            epoch,
            highest,
            bits: bitmap
                .chunks_exact(8)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    u64::from_le_bytes(b)
                })
                .collect(),
        };
        if stored == size {
            return Ok(old);
        }
        let mut new = Self::first(size, epoch, highest);
        let mut s = new.low();
        while s < highest {
            if s < old.low() || old.seen(s) {
                new.set(s);
            }
            s += 1;
        }
        Ok(new)
    }

    fn slot(&self, seq: u64) -> (usize, u32) {
        let pos = seq % u64::from(self.size.get());
        ((pos / 64) as usize, (pos % 64) as u32)
    }

    fn set(&mut self, seq: u64) {
        let (word, bit) = self.slot(seq);
        self.bits[word] |= 1 << bit;
    }

    fn clear(&mut self, seq: u64) {
        let (word, bit) = self.slot(seq);
        self.bits[word] &= !(1 << bit);
    }
}

/// Classifies a message for a device that may have no state yet.
pub fn check(state: Option<&DeviceSequence>, epoch: u64, seq: u64) -> Verdict {
    state.map_or(Verdict::Accept(Accepted::FirstSeen), |s| {
        s.check(epoch, seq)
    })
}

#[cfg(test)]
mod tests;
