//! Data-completeness events: sequence ranges a device skipped (SPEC section 4).
//!
//! A gap opens when a message jumps past `highest + 1`. Late messages that arrive while
//! still inside the window fill it; when every number arrived it is `closed`. When the
//! window slides past its last number, or the device starts a new epoch, whatever is
//! still missing can never be accepted any more and the gap is `lost`. Pure logic: the
//! caller persists every [`Gap`] this returns as changed.

/// Where a gap stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapState {
    Open,
    /// Every missing number arrived late.
    Closed,
    /// The window moved on; `missing() - filled` messages are lost.
    Lost,
}

impl GapState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Closed => "closed",
            Self::Lost => "lost",
        }
    }
}

/// One skipped range `first..=last` of an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub epoch: u64,
    pub first: u64,
    pub last: u64,
    /// How many of the missing numbers arrived late.
    pub filled: u64,
    pub state: GapState,
    pub opened_at_ms: u64,
}

impl Gap {
    /// How many numbers the range holds (`last - first + 1`; saturates at `u64::MAX`
    /// for the one range that would need 2^64).
    pub fn missing(&self) -> u64 {
        (self.last - self.first).saturating_add(1)
    }

    /// Numbers never received (for a lost gap: the messages lost).
    pub fn unfilled(&self) -> u64 {
        self.missing() - self.filled
    }
}

/// The open gaps of one device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenGaps {
    gaps: Vec<Gap>,
}

impl OpenGaps {
    pub fn new(gaps: Vec<Gap>) -> Self {
        Self { gaps }
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.gaps.is_empty()
    }

    /// A new epoch started: every open gap of an older epoch is lost.
    pub fn on_new_epoch(&mut self, epoch: u64, changed: &mut Vec<Gap>) {
        self.gaps.retain_mut(|g| {
            if g.epoch < epoch {
                g.state = GapState::Lost;
                changed.push(g.clone());
                false
            } else {
                true
            }
        });
    }

    /// `first..=last` was skipped over in `epoch`.
    pub fn open(&mut self, epoch: u64, first: u64, last: u64, now_ms: u64, changed: &mut Vec<Gap>) {
        let gap = Gap {
            epoch,
            first,
            last,
            filled: 0,
            state: GapState::Open,
            opened_at_ms: now_ms,
        };
        changed.push(gap.clone());
        self.gaps.push(gap);
    }

    /// A late message `seq` of `epoch` arrived inside the window.
    pub fn fill(&mut self, epoch: u64, seq: u64, changed: &mut Vec<Gap>) {
        let Some(i) = self
            .gaps
            .iter()
            .position(|g| g.epoch == epoch && g.first <= seq && seq <= g.last)
        else {
            return;
        };
        let gap = &mut self.gaps[i];
        gap.filled += 1;
        if gap.filled == gap.missing() {
            gap.state = GapState::Closed;
            changed.push(self.gaps.swap_remove(i));
        } else {
            changed.push(gap.clone());
        }
    }

    /// The window of `epoch` now starts at `low`: gaps entirely below it are lost.
    pub fn slide(&mut self, epoch: u64, low: u64, changed: &mut Vec<Gap>) {
        self.gaps.retain_mut(|g| {
            if g.epoch == epoch && g.last < low {
                g.state = GapState::Lost;
                changed.push(g.clone());
                false
            } else {
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_closes_when_every_missing_number_arrives() {
        let mut gaps = OpenGaps::default();
        let mut changed = Vec::new();
        gaps.open(5, 3, 4, 10, &mut changed);
        gaps.fill(5, 3, &mut changed);
        assert_eq!(changed.last().map(|g| g.state), Some(GapState::Open));
        gaps.fill(5, 4, &mut changed);
        let closed = changed.last().expect("closed gap");
        assert_eq!(
            (closed.state, closed.filled, closed.unfilled()),
            (GapState::Closed, 2, 0)
        );
        assert!(gaps.is_empty());
    }

    #[test]
    fn a_gap_the_window_passes_is_lost_with_what_never_came() {
        let mut gaps = OpenGaps::default();
        let mut changed = Vec::new();
        gaps.open(5, 6, 69, 10, &mut changed);
        gaps.fill(5, 7, &mut changed);
        gaps.slide(5, 69, &mut changed);
        assert!(!gaps.is_empty(), "69 is still inside the window");
        gaps.slide(5, 70, &mut changed);
        let lost = changed.last().expect("lost gap");
        assert_eq!((lost.state, lost.unfilled()), (GapState::Lost, 63));
        assert!(gaps.is_empty());
    }

    #[test]
    fn a_new_epoch_loses_the_older_epochs_gaps_only() {
        let mut gaps = OpenGaps::default();
        let mut changed = Vec::new();
        gaps.open(1, 3, 3, 0, &mut changed);
        gaps.open(2, 8, 9, 0, &mut changed);
        changed.clear();
        gaps.on_new_epoch(2, &mut changed);
        assert_eq!(changed.len(), 1);
        assert_eq!((changed[0].epoch, changed[0].state), (1, GapState::Lost));
        gaps.fill(2, 9, &mut changed);
        assert_eq!(changed.last().map(|g| g.filled), Some(1));
    }

    #[test]
    fn the_widest_possible_gap_does_not_overflow() {
        let mut gaps = OpenGaps::default();
        let mut changed = Vec::new();
        gaps.open(0, 0, u64::MAX - 1, 0, &mut changed);
        assert_eq!(changed[0].missing(), u64::MAX);
        gaps.open(1, 0, u64::MAX, 0, &mut changed);
        assert_eq!(changed[1].missing(), u64::MAX, "saturates");
    }
}
