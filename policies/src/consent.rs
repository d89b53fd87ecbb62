//! Consent grants (issue 19, point 3): for which purposes the data of one assignment may
//! flow, each grant with its own validity period.
//!
//! Care is implied: it is granted for the whole period of the assignment and needs no
//! grant in the registry (a `care` grant there is an error). Clinical alerting runs under
//! care, and a device is assigned to a patient precisely so that their care team sees its
//! readings; care ends only when the assignment ends (`vitalmq registry unassign`). Every
//! other purpose needs an explicit grant, which lies inside the assignment's period; two
//! grants of one purpose never overlap, so withdrawing one (closing its period) cannot
//! leave another one open behind it.
//!
//! Pure data and rules, no I/O: the registry loader builds a [`Consent`] per assignment,
//! the bridge asks it whether an event observed at an instant may flow to a sink.

use std::fmt;
use std::str::FromStr;

use crate::assignment::{Period, UnixMillis};

/// What data is processed for. A closed set: a sink or grant naming anything else is a
/// configuration error, not a new purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Purpose {
    /// Direct care of the patient, clinical alerting included; implied by an assignment.
    Care,
    Research,
    Surveillance,
    ModelTraining,
}

impl Purpose {
    /// Every purpose, in a fixed order.
    pub const ALL: [Purpose; 4] = [
        Purpose::Care,
        Purpose::Research,
        Purpose::Surveillance,
        Purpose::ModelTraining,
    ];

    /// The name as written in the registry and the bridge configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Care => "care",
            Purpose::Research => "research",
            Purpose::Surveillance => "surveillance",
            Purpose::ModelTraining => "model-training",
        }
    }
}

/// Care, the purpose of a sink or handler that names none.
impl Default for Purpose {
    fn default() -> Self {
        Purpose::Care
    }
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A purpose name that is not one of [`Purpose::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown purpose `{0}` (expected one of care, research, surveillance, model-training)")]
pub struct UnknownPurpose(pub String);

impl FromStr for Purpose {
    type Err = UnknownPurpose;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Purpose::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownPurpose(s.to_owned()))
    }
}

impl TryFrom<String> for Purpose {
    type Error = UnknownPurpose;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Purpose> for String {
    fn from(p: Purpose) -> Self {
        p.as_str().to_owned()
    }
}

impl serde::Serialize for Purpose {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Purpose {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Consent for one purpose during one period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub purpose: Purpose,
    pub period: Period,
}

/// Why a grant or a withdrawal was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsentError {
    #[error("care is implied by the assignment; it is neither granted nor withdrawn")]
    CareIsImplied,
    #[error("the grant {grant} lies outside its assignment's period {assignment}")]
    OutsideAssignment { grant: Period, assignment: Period },
    #[error("the {purpose} grant {new} overlaps the {purpose} grant {existing}")]
    Overlap {
        purpose: Purpose,
        new: Period,
        existing: Period,
    },
    #[error("no {purpose} grant is in force at {at}")]
    NothingToWithdraw { purpose: Purpose, at: UnixMillis },
}

/// The consent of one assignment: care for its whole period, other purposes by grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consent {
    assignment: Period,
    /// Sorted by (purpose, start); those of one purpose never overlap.
    grants: Vec<Grant>,
}

impl Consent {
    /// The consent of an assignment over `assignment`, with no grant yet (care only).
    pub fn new(assignment: Period) -> Self {
        Self {
            assignment,
            grants: Vec::new(),
        }
    }

    /// The assignment's period (the period of care).
    pub fn assignment(&self) -> Period {
        self.assignment
    }

    /// The explicit grants, by purpose then start.
    pub fn grants(&self) -> &[Grant] {
        &self.grants
    }

    /// Adds a grant; refused for care, outside the assignment, or overlapping a grant of
    /// the same purpose.
    pub fn grant(&mut self, grant: Grant) -> Result<(), ConsentError> {
        if grant.purpose == Purpose::Care {
            return Err(ConsentError::CareIsImplied);
        }
        if !within(&grant.period, &self.assignment) {
            return Err(ConsentError::OutsideAssignment {
                grant: grant.period,
                assignment: self.assignment,
            });
        }
        if let Some(existing) = self
            .grants
            .iter()
            .find(|g| g.purpose == grant.purpose && g.period.overlaps(&grant.period))
        {
            return Err(ConsentError::Overlap {
                purpose: grant.purpose,
                new: grant.period,
                existing: existing.period,
            });
        }
        let i = self
            .grants
            .partition_point(|g| (g.purpose, g.period.from) < (grant.purpose, grant.period.from));
        self.grants.insert(i, grant);
        Ok(())
    }

    /// Whether data observed at `t` may be processed for `purpose`.
    pub fn covers(&self, purpose: Purpose, t: UnixMillis) -> bool {
        if !self.assignment.contains(t) {
            return false;
        }
        if purpose == Purpose::Care {
            return true;
        }
        // Grants of one purpose are sorted by start and disjoint: the last one starting
        // at or before `t` is the only candidate.
        let i = self
            .grants
            .partition_point(|g| (g.purpose, g.period.from) <= (purpose, t));
        self.grants[..i]
            .last()
            .is_some_and(|g| g.purpose == purpose && g.period.contains(t))
    }

    /// Whether a grant for `purpose` had begun by `t` but no longer covers it (it was
    /// withdrawn or expired): what tells "withdrawn" apart from "never granted".
    pub fn lapsed(&self, purpose: Purpose, t: UnixMillis) -> bool {
        !self.covers(purpose, t)
            && self
                .grants
                .iter()
                .any(|g| g.purpose == purpose && g.period.to.is_some_and(|to| to <= t))
    }

    /// Withdraws consent for `purpose` from `at` on: the grant in force at `at` is
    /// closed there (a grant that would become empty is removed); later grants of the
    /// purpose, which the patient gave separately, are not touched. Nothing already
    /// observed before `at` is affected.
    pub fn withdraw(&mut self, purpose: Purpose, at: UnixMillis) -> Result<(), ConsentError> {
        if purpose == Purpose::Care {
            return Err(ConsentError::CareIsImplied);
        }
        let i = self
            .grants
            .iter()
            .position(|g| g.purpose == purpose && g.period.contains(at))
            .ok_or(ConsentError::NothingToWithdraw { purpose, at })?;
        match Period::new(self.grants[i].period.from, Some(at)) {
            Some(closed) => self.grants[i].period = closed,
            None => {
                self.grants.remove(i);
            }
        }
        Ok(())
    }

    /// The same consent for the assignment once its period became `assignment` (closed
    /// by an unassignment, a reassignment or a retirement): grants are cut to it, those
    /// left empty dropped.
    pub fn clipped_to(&self, assignment: Period) -> Self {
        let grants = self
            .grants
            .iter()
            .filter_map(|g| {
                let from = g.period.from.max(assignment.from);
                let to = match (g.period.to, assignment.to) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                Period::new(from, to).map(|period| Grant {
                    purpose: g.purpose,
                    period,
                })
            })
            .collect();
        Self { assignment, grants }
    }
}

/// Whether `inner` lies entirely in `outer`.
fn within(inner: &Period, outer: &Period) -> bool {
    inner.from >= outer.from
        && match (inner.to, outer.to) {
            (_, None) => true,
            (Some(i), Some(o)) => i <= o,
            (None, Some(_)) => false,
        }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn period(from: u64, to: Option<u64>) -> Period {
        Period::new(from, to).expect("non-empty period")
    }

    fn grant(purpose: Purpose, from: u64, to: Option<u64>) -> Grant {
        Grant {
            purpose,
            period: period(from, to),
        }
    }

    #[test]
    fn purposes_parse_and_unknown_ones_are_named() {
        for p in Purpose::ALL {
            assert_eq!(p.as_str().parse::<Purpose>(), Ok(p));
        }
        let err = "marketing".parse::<Purpose>().expect_err("not a purpose");
        assert!(err.to_string().contains("`marketing`"), "{err}");
        assert!("Research".parse::<Purpose>().is_err(), "case matters");
    }

    #[test]
    fn care_is_implied_for_the_assignment_and_nothing_else() {
        let c = Consent::new(period(1_000, Some(5_000)));
        assert!(c.covers(Purpose::Care, 1_000));
        assert!(c.covers(Purpose::Care, 4_999));
        assert!(!c.covers(Purpose::Care, 5_000), "after the assignment");
        assert!(!c.covers(Purpose::Care, 999), "before the assignment");
        assert!(!c.covers(Purpose::Research, 2_000), "no grant, no research");
        let mut c = c;
        assert_eq!(
            c.grant(grant(Purpose::Care, 1_000, None)),
            Err(ConsentError::CareIsImplied)
        );
        assert_eq!(
            c.withdraw(Purpose::Care, 2_000),
            Err(ConsentError::CareIsImplied)
        );
    }

    #[test]
    fn grants_stay_inside_the_assignment_and_never_overlap() {
        let mut c = Consent::new(period(1_000, Some(5_000)));
        assert!(matches!(
            c.grant(grant(Purpose::Research, 900, Some(2_000))),
            Err(ConsentError::OutsideAssignment { .. })
        ));
        assert!(matches!(
            c.grant(grant(Purpose::Research, 1_000, None)),
            Err(ConsentError::OutsideAssignment { .. })
        ));
        c.grant(grant(Purpose::Research, 1_000, Some(2_000)))
            .expect("inside");
        assert!(matches!(
            c.grant(grant(Purpose::Research, 1_999, Some(3_000))),
            Err(ConsentError::Overlap { .. })
        ));
        // Touching is not overlapping; another purpose may overlap freely.
        c.grant(grant(Purpose::Research, 2_000, Some(3_000)))
            .expect("adjacent");
        c.grant(grant(Purpose::Surveillance, 1_500, Some(5_000)))
            .expect("other purpose");
        assert!(c.covers(Purpose::Research, 2_500));
        assert!(!c.covers(Purpose::Research, 3_000));
        assert!(c.covers(Purpose::Surveillance, 4_999));
        assert!(!c.covers(Purpose::ModelTraining, 2_500));
    }

    #[test]
    fn withdrawal_closes_the_grant_from_then_on() {
        let mut c = Consent::new(period(0, None));
        c.grant(grant(Purpose::Research, 1_000, None))
            .expect("grant");
        c.withdraw(Purpose::Research, 3_000).expect("withdraw");
        assert!(c.covers(Purpose::Research, 2_999), "before: still covered");
        assert!(!c.covers(Purpose::Research, 3_000), "from then on: not");
        assert!(c.lapsed(Purpose::Research, 3_000));
        assert!(!c.lapsed(Purpose::Research, 2_999));
        assert!(!c.lapsed(Purpose::Surveillance, 3_000), "never granted");
        assert_eq!(c.grants()[0].period, period(1_000, Some(3_000)));
        assert_eq!(
            c.withdraw(Purpose::Research, 3_000),
            Err(ConsentError::NothingToWithdraw {
                purpose: Purpose::Research,
                at: 3_000
            }),
            "nothing left to withdraw"
        );
        // Withdrawing at the very start removes the grant rather than keep an empty one.
        c.grant(grant(Purpose::Surveillance, 4_000, None))
            .expect("grant");
        c.withdraw(Purpose::Surveillance, 4_000).expect("withdraw");
        assert!(
            c.grants()
                .iter()
                .all(|g| g.purpose != Purpose::Surveillance)
        );
    }

    #[test]
    fn closing_the_assignment_cuts_its_grants() {
        let mut c = Consent::new(period(0, None));
        c.grant(grant(Purpose::Research, 1_000, None))
            .expect("grant");
        c.grant(grant(Purpose::Surveillance, 6_000, None))
            .expect("grant");
        let closed = c.clipped_to(period(0, Some(5_000)));
        assert_eq!(
            closed.grants(),
            &[grant(Purpose::Research, 1_000, Some(5_000))]
        );
        assert!(!closed.covers(Purpose::Research, 5_000));
    }

    fn purpose() -> impl Strategy<Value = Purpose> {
        prop::sample::select(Purpose::ALL.to_vec())
    }

    /// A grant or a withdrawal attempt.
    #[derive(Debug, Clone)]
    enum Change {
        Grant(Purpose, u64, Option<u64>),
        Withdraw(Purpose, u64),
    }

    fn change() -> impl Strategy<Value = Change> {
        prop_oneof![
            3 => (purpose(), 0u64..1_200, proptest::option::of(1u64..300))
                .prop_map(|(p, t, d)| Change::Grant(p, t, d.map(|d| t + d))),
            1 => (purpose(), 0u64..1_200).prop_map(|(p, t)| Change::Withdraw(p, t)),
        ]
    }

    proptest! {
        /// Whatever grants and withdrawals are tried (refused ones included), `covers`
        /// agrees with a linear search over the grants, grants of one purpose stay
        /// disjoint and inside the assignment, and a refused change changes nothing.
        #[test]
        fn covers_agrees_with_a_linear_search(
            from in 0u64..200,
            len in proptest::option::of(200u64..1_000),
            changes in proptest::collection::vec(change(), 0..30),
        ) {
            let assignment = period(from, len.map(|l| from + l));
            let mut c = Consent::new(assignment);
            for ch in changes {
                let before = c.clone();
                let result = match ch {
                    Change::Grant(p, t, to) => match Period::new(t, to) {
                        Some(period) => c.grant(Grant { purpose: p, period }),
                        None => Ok(()),
                    },
                    Change::Withdraw(p, t) => c.withdraw(p, t),
                };
                if result.is_err() {
                    prop_assert_eq!(&c, &before);
                }
                for (i, a) in c.grants().iter().enumerate() {
                    prop_assert!(within(&a.period, &assignment));
                    for b in &c.grants()[i + 1..] {
                        prop_assert!(
                            a.purpose != b.purpose || !a.period.overlaps(&b.period),
                            "{:?}", c.grants()
                        );
                    }
                }
                for p in Purpose::ALL {
                    for t in (0u64..1_600).step_by(11) {
                        let linear = assignment.contains(t)
                            && (p == Purpose::Care
                                || c.grants().iter().any(|g| g.purpose == p && g.period.contains(t)));
                        prop_assert_eq!(c.covers(p, t), linear, "{} at {}: {:?}", p, t, c.grants());
                    }
                }
            }
        }
    }
}
