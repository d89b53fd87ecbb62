//! Time-bound device assignments (issue 19, point 1): which patient pseudonym and site a
//! device serves during which period. A device's history is a list of half-open periods
//! `[valid_from, valid_to)` in Unix milliseconds, sorted and never overlapping, so every
//! instant maps to at most one assignment. Changes close one period and open another;
//! nothing is overwritten, so a reading is attributed by the instant it was observed
//! (`observed_at`), also when it arrives after a reassignment.
//!
//! Pure data and rules, no I/O: the registry loader, the `vitalmq registry` commands and
//! broker and bridge build on it.

use std::fmt;

use crate::registry::SiteId;

/// Milliseconds since the Unix epoch (UTC), the unit of `ts` and `observed_at`.
pub type UnixMillis = u64;

/// A half-open validity period: from `from` (inclusive) until `to` (exclusive), or
/// without end while `to` is `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub from: UnixMillis,
    pub to: Option<UnixMillis>,
}

impl Period {
    /// A period; `None` when it would be empty (`to <= from`).
    pub fn new(from: UnixMillis, to: Option<UnixMillis>) -> Option<Self> {
        match to {
            Some(to) if to <= from => None,
            _ => Some(Self { from, to }),
        }
    }

    /// Whether `t` lies in the period.
    pub fn contains(&self, t: UnixMillis) -> bool {
        t >= self.from && self.to.is_none_or(|to| t < to)
    }

    /// Whether the two periods share an instant.
    pub fn overlaps(&self, other: &Period) -> bool {
        let ends_after = |p: &Period, t: UnixMillis| p.to.is_none_or(|to| to > t);
        ends_after(self, other.from) && ends_after(other, self.from)
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to {
            Some(to) => write!(f, "[{}, {})", self.from, to),
            None => write!(f, "[{}, open)", self.from),
        }
    }
}

/// What a device serves during one period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Use {
    /// Worn by the patient with this pseudonym, on this site.
    Assigned { patient_ref: String, site: SiteId },
    /// Retired: the device may not publish from then on. Always the last period.
    Retired,
}

/// One period of a device's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub period: Period,
    pub serves: Use,
}

/// Why a change to a device's history was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssignmentError {
    #[error("the period {new} overlaps the existing period {existing}")]
    Overlap { new: Period, existing: Period },
    #[error("the device is retired since {since}; a retired device is not assigned again")]
    Retired { since: UnixMillis },
    #[error("no assignment is open at {at}")]
    NothingOpen { at: UnixMillis },
    #[error("{at} is not after the start of the open period {open}")]
    NotAfterStart { at: UnixMillis, open: Period },
    #[error("an empty period (from {from} to {to})")]
    Empty { from: UnixMillis, to: UnixMillis },
}

/// One device's assignment history: sorted by start, never overlapping, at most one
/// retirement, which is last.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    periods: Vec<Assignment>,
}

impl History {
    /// The periods, oldest first.
    pub fn periods(&self) -> &[Assignment] {
        &self.periods
    }

    /// What the device served at `t`: the assignment whose period contains it.
    pub fn at(&self, t: UnixMillis) -> Option<&Assignment> {
        // Periods are sorted by start and disjoint: the last one starting at or before
        // `t` is the only candidate.
        let i = self.periods.partition_point(|a| a.period.from <= t);
        self.periods[..i].last().filter(|a| a.period.contains(t))
    }

    /// The retirement instant, if retired.
    pub fn retired_since(&self) -> Option<UnixMillis> {
        self.periods
            .last()
            .filter(|a| a.serves == Use::Retired)
            .map(|a| a.period.from)
    }

    /// A retired device's history is final.
    fn refuse_if_retired(&self) -> Result<(), AssignmentError> {
        match self.retired_since() {
            Some(since) => Err(AssignmentError::Retired { since }),
            None => Ok(()),
        }
    }

    /// Adds a period (a migrated entry, or one a command made); refused if it overlaps
    /// one already there or follows the retirement.
    pub fn insert(&mut self, assignment: Assignment) -> Result<(), AssignmentError> {
        if let Some(since) = self.retired_since() {
            if assignment.serves != Use::Retired || assignment.period.from >= since {
                return Err(AssignmentError::Retired { since });
            }
        }
        if let Some(existing) = self
            .periods
            .iter()
            .find(|a| a.period.overlaps(&assignment.period))
        {
            return Err(AssignmentError::Overlap {
                new: assignment.period,
                existing: existing.period,
            });
        }
        if assignment.serves == Use::Retired && assignment.period.to.is_some() {
            // A retirement has no end; a bounded one would let the device back in.
            return Err(AssignmentError::Retired {
                since: assignment.period.from,
            });
        }
        let i = self
            .periods
            .partition_point(|a| a.period.from < assignment.period.from);
        self.periods.insert(i, assignment);
        Ok(())
    }

    /// Ends the period open at `at` (unassign, or before a reassignment or a repair).
    pub fn close(&mut self, at: UnixMillis) -> Result<(), AssignmentError> {
        let open = self
            .periods
            .iter_mut()
            .find(|a| a.period.contains(at) && a.serves != Use::Retired)
            .ok_or(AssignmentError::NothingOpen { at })?;
        if at <= open.period.from {
            return Err(AssignmentError::NotAfterStart {
                at,
                open: open.period,
            });
        }
        open.period.to = Some(at);
        Ok(())
    }

    /// Reassigns from `at`: closes what is open then (if anything) and opens a period
    /// for `patient_ref` on `site`, until `until` or without end.
    pub fn reassign(
        &mut self,
        at: UnixMillis,
        until: Option<UnixMillis>,
        patient_ref: String,
        site: SiteId,
    ) -> Result<(), AssignmentError> {
        self.refuse_if_retired()?;
        let period = Period::new(at, until).ok_or(AssignmentError::Empty {
            from: at,
            to: until.unwrap_or(at),
        })?;
        let mut next = self.clone();
        if next.at(at).is_some() {
            next.close(at)?;
        }
        next.insert(Assignment {
            period,
            serves: Use::Assigned { patient_ref, site },
        })?;
        *self = next;
        Ok(())
    }

    /// Retires the device from `at`: whatever is open then is closed; nothing may be
    /// assigned after it.
    pub fn retire(&mut self, at: UnixMillis) -> Result<(), AssignmentError> {
        self.refuse_if_retired()?;
        let mut next = self.clone();
        if next.at(at).is_some() {
            next.close(at)?;
        }
        next.insert(Assignment {
            period: Period { from: at, to: None },
            serves: Use::Retired,
        })?;
        *self = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn site() -> SiteId {
        SiteId::new("site-01").expect("site")
    }

    fn assigned(p: &str) -> Use {
        Use::Assigned {
            patient_ref: p.into(),
            site: site(),
        }
    }

    #[test]
    fn a_late_reading_stays_with_the_patient_of_its_observation_time() {
        let mut h = History::default();
        h.reassign(1_000, None, "pt-a".into(), site())
            .expect("assign a");
        h.reassign(5_000, None, "pt-b".into(), site())
            .expect("reassign to b");
        // Observed at 4,999 (before the reassignment), arriving whenever: patient a.
        assert_eq!(h.at(4_999).map(|a| &a.serves), Some(&assigned("pt-a")));
        assert_eq!(h.at(5_000).map(|a| &a.serves), Some(&assigned("pt-b")));
        assert_eq!(h.at(999), None, "before the first assignment");
        assert_eq!(h.periods().len(), 2, "history kept, not overwritten");
    }

    #[test]
    fn overlapping_periods_are_refused() {
        let mut h = History::default();
        h.insert(Assignment {
            period: Period::new(1_000, Some(2_000)).expect("period"),
            serves: assigned("pt-a"),
        })
        .expect("first");
        let err = h
            .insert(Assignment {
                period: Period::new(1_999, Some(3_000)).expect("period"),
                serves: assigned("pt-b"),
            })
            .expect_err("overlap");
        assert!(matches!(err, AssignmentError::Overlap { .. }), "{err}");
        // Touching is not overlapping: [1000, 2000) then [2000, 3000).
        h.insert(Assignment {
            period: Period::new(2_000, Some(3_000)).expect("period"),
            serves: assigned("pt-b"),
        })
        .expect("adjacent");
    }

    #[test]
    fn a_retired_device_is_not_assigned_again() {
        let mut h = History::default();
        h.reassign(1_000, None, "pt-a".into(), site())
            .expect("assign");
        h.retire(2_000).expect("retire");
        assert_eq!(h.retired_since(), Some(2_000));
        assert_eq!(h.at(3_000).map(|a| &a.serves), Some(&Use::Retired));
        let err = h
            .reassign(3_000, None, "pt-b".into(), site())
            .expect_err("retired");
        assert_eq!(err, AssignmentError::Retired { since: 2_000 });
        // A refused change leaves the history as it was.
        assert_eq!(h.periods().len(), 2);
    }

    /// A change: reassign at t (optionally until t + d), close at t, or retire at t.
    #[derive(Debug, Clone)]
    enum Change {
        Reassign(u64, Option<u64>, u8),
        Close(u64),
        Retire(u64),
    }

    fn change() -> impl Strategy<Value = Change> {
        prop_oneof![
            4 => (0u64..1_000, proptest::option::of(1u64..200), 0u8..4)
                .prop_map(|(t, d, p)| Change::Reassign(t, d, p)),
            2 => (0u64..1_000).prop_map(Change::Close),
            1 => (0u64..1_000).prop_map(Change::Retire),
        ]
    }

    proptest! {
        /// Whatever sequence of changes is tried (refused ones included), the history
        /// stays sorted and disjoint, every instant maps to at most one period, `at`
        /// agrees with a linear search, and a retirement is last and open.
        #[test]
        fn every_instant_maps_to_at_most_one_assignment(changes in proptest::collection::vec(change(), 0..40)) {
            let mut h = History::default();
            for c in changes {
                let before = h.clone();
                let result = match c {
                    Change::Reassign(t, d, p) => {
                        h.reassign(t, d.map(|d| t + d), format!("pt-{p}"), site())
                    }
                    Change::Close(t) => h.close(t),
                    Change::Retire(t) => h.retire(t),
                };
                if result.is_err() {
                    prop_assert_eq!(&h, &before, "a refused change leaves the history as it was");
                }
                let ps = h.periods();
                for w in ps.windows(2) {
                    prop_assert!(w[0].period.from < w[1].period.from, "sorted: {:?}", ps);
                    prop_assert!(!w[0].period.overlaps(&w[1].period), "disjoint: {:?}", ps);
                }
                if let Some(i) = ps.iter().position(|a| a.serves == Use::Retired) {
                    prop_assert_eq!(i, ps.len() - 1, "retirement last");
                    prop_assert_eq!(ps[i].period.to, None, "retirement open");
                }
                for t in (0u64..1_300).step_by(7) {
                    let holding: Vec<_> = ps.iter().filter(|a| a.period.contains(t)).collect();
                    prop_assert!(holding.len() <= 1, "t={}: {:?}", t, holding);
                    prop_assert_eq!(h.at(t), holding.first().copied());
                }
            }
        }
    }
}
