//! The "evaluated" window of a device (issue 17): which `(epoch, seq)` the alert engine
//! has already seen. A message is evaluated only if it is new to this window, not merely
//! new to the sequence window: when the store cannot record a batch, the bridge adopts
//! the alert state (this window included) but not the sequence window, so the devices'
//! resends are recorded and never alerted twice.
//!
//! As wide as the bridge's sequence window W (SPEC section 4, a multiple of 64): anything
//! the sequence window still accepts as late is also judged here, so a late alarm is
//! evaluated. A message of an older epoch, or older than the window, counts as evaluated
//! (the sequence window refuses it as a replay anyway). A stored window narrower or wider
//! than the configured W is resized, keeping what it can.

use serde::{Deserialize, Serialize};

/// `(epoch, highest seq, bitmap of the W seqs up to highest)`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evaluated {
    pub epoch: u64,
    pub highest: u64,
    /// Bit `i % 64` of word `i / 64` set: `highest - i` was evaluated.
    pub words: Vec<u64>,
}

impl Evaluated {
    fn fresh(epoch: u64, seq: u64, width_words: usize) -> Self {
        let mut words = vec![0; width_words.max(1)];
        words[0] = 1;
        Self {
            epoch,
            highest: seq,
            words,
        }
    }

    fn bit(&self, back: u64) -> bool {
        let (w, b) = ((back / 64) as usize, back % 64);
        self.words.get(w).is_some_and(|x| x & (1 << b) != 0)
    }

    fn set(&mut self, back: u64) {
        let (w, b) = ((back / 64) as usize, back % 64);
        if let Some(x) = self.words.get_mut(w) {
            *x |= 1 << b;
        }
    }

    /// Moves `highest` up by `shift`: every bit `i` becomes bit `i + shift`.
    fn shift_up(&mut self, shift: u64) {
        let width = self.words.len() as u64 * 64;
        if shift >= width {
            self.words.iter_mut().for_each(|w| *w = 0);
            return;
        }
        let (whole, part) = ((shift / 64) as usize, shift % 64);
        for i in (0..self.words.len()).rev() {
            let from = i.checked_sub(whole);
            let hi = from.map_or(0, |f| self.words[f]);
            let lo = from
                .and_then(|f| f.checked_sub(1))
                .map_or(0, |f| self.words[f]);
            self.words[i] = if part == 0 {
                hi
            } else {
                (hi << part) | (lo >> (64 - part))
            };
        }
    }

    /// Marks `(epoch, seq)` evaluated in a window of `width_words` x 64 sequence
    /// numbers; false if it already was (or counts as such).
    pub fn admit(slot: &mut Option<Self>, epoch: u64, seq: u64, width_words: usize) -> bool {
        let width_words = width_words.max(1);
        let Some(w) = slot else {
            *slot = Some(Self::fresh(epoch, seq, width_words));
            return true;
        };
        w.words.resize(width_words, 0);
        if epoch < w.epoch {
            return false;
        }
        if epoch > w.epoch {
            *w = Self::fresh(epoch, seq, width_words);
            return true;
        }
        if seq > w.highest {
            w.shift_up(seq - w.highest);
            w.words[0] |= 1;
            w.highest = seq;
            return true;
        }
        let back = w.highest - seq;
        if back >= width_words as u64 * 64 || w.bit(back) {
            return false;
        }
        w.set(back);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_message_is_admitted_once() {
        let mut w = None;
        assert!(Evaluated::admit(&mut w, 1, 10, 1));
        assert!(!Evaluated::admit(&mut w, 1, 10, 1));
        assert!(Evaluated::admit(&mut w, 1, 12, 1));
        assert!(Evaluated::admit(&mut w, 1, 11, 1), "late but new");
        assert!(!Evaluated::admit(&mut w, 1, 11, 1));
        assert!(Evaluated::admit(&mut w, 1, 200, 1));
        assert!(!Evaluated::admit(&mut w, 1, 12, 1), "below the window");
        assert!(!Evaluated::admit(&mut w, 0, 500, 1), "older epoch");
        assert!(Evaluated::admit(&mut w, 2, 0, 1), "new epoch");
    }

    /// A device back in range sends a live message 300 ahead before its backlog: with
    /// the bridge's W = 1024 the backlog (a late alarm among it) is still evaluated,
    /// once, and what was evaluated before the jump stays evaluated.
    #[test]
    fn the_window_is_as_wide_as_the_sequence_window() {
        let words = 1024 / 64;
        let mut w = None;
        for seq in 0..=999 {
            assert!(Evaluated::admit(&mut w, 1, seq, words));
        }
        assert!(Evaluated::admit(&mut w, 1, 1300, words), "live, ahead");
        assert!(
            !Evaluated::admit(&mut w, 1, 999, words),
            "seen before the jump"
        );
        assert!(!Evaluated::admit(&mut w, 1, 300, words), "seen, 1000 back");
        for seq in 1000..1300 {
            assert!(Evaluated::admit(&mut w, 1, seq, words), "backlog {seq}");
            assert!(!Evaluated::admit(&mut w, 1, seq, words), "once: {seq}");
        }
        assert!(!Evaluated::admit(&mut w, 1, 276, words), "older than W");
        // Shifts by whole words and by parts agree with a plain set.
        let mut a = None;
        let mut seen = std::collections::BTreeSet::new();
        for seq in [5u64, 70, 71, 200, 130, 131, 600, 599, 1100, 1099, 650] {
            let fresh = Evaluated::admit(&mut a, 1, seq, 8);
            let top = seen.iter().max().copied().unwrap_or(0).max(seq);
            let within = top - seq < 512;
            assert_eq!(fresh, within && seen.insert(seq), "seq {seq}");
        }
    }
}
