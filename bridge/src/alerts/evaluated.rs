//! The "evaluated" window of a device (issue 17): which `(epoch, seq)` the alert engine
//! has already seen. A message is evaluated only if it is new to this window, not merely
//! new to the sequence window: when the store cannot record a batch, the bridge adopts
//! the alert state (this window included) but not the sequence window, so the devices'
//! resends are recorded and never alerted twice.
//!
//! A 64-message window per epoch, like the default sequence window; a message of an older
//! epoch, or older than the window, counts as evaluated (a resend of something the engine
//! saw, or too late to change an alert: the engine ignores late readings anyway).

use serde::{Deserialize, Serialize};

/// `(epoch, highest seq, bitmap of the 64 seqs up to highest)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evaluated {
    pub epoch: u64,
    pub highest: u64,
    /// Bit `i` set: `highest - i` was evaluated.
    pub bits: u64,
}

impl Evaluated {
    /// Marks `(epoch, seq)` evaluated; false if it already was (or counts as such).
    pub fn admit(slot: &mut Option<Self>, epoch: u64, seq: u64) -> bool {
        let Some(w) = slot else {
            *slot = Some(Self {
                epoch,
                highest: seq,
                bits: 1,
            });
            return true;
        };
        if epoch < w.epoch {
            return false;
        }
        if epoch > w.epoch {
            *w = Self {
                epoch,
                highest: seq,
                bits: 1,
            };
            return true;
        }
        if seq > w.highest {
            let shift = seq - w.highest;
            w.bits = if shift >= 64 { 0 } else { w.bits << shift } | 1;
            w.highest = seq;
            return true;
        }
        let back = w.highest - seq;
        if back >= 64 || w.bits & (1 << back) != 0 {
            return false;
        }
        w.bits |= 1 << back;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_message_is_admitted_once() {
        let mut w = None;
        assert!(Evaluated::admit(&mut w, 1, 10));
        assert!(!Evaluated::admit(&mut w, 1, 10));
        assert!(Evaluated::admit(&mut w, 1, 12));
        assert!(Evaluated::admit(&mut w, 1, 11), "late but new");
        assert!(!Evaluated::admit(&mut w, 1, 11));
        assert!(Evaluated::admit(&mut w, 1, 200));
        assert!(!Evaluated::admit(&mut w, 1, 12), "below the window");
        assert!(!Evaluated::admit(&mut w, 0, 500), "older epoch");
        assert!(Evaluated::admit(&mut w, 2, 0), "new epoch");
    }
}
