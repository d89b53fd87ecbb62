//! The clinical alerts a score raises (RCP 2017, table 2 "clinical response"):
//!
//! | risk                                        | rule           | severity |
//! |---------------------------------------------|----------------|----------|
//! | low-medium (a single parameter scores 3)    | `news2-medium` | review   |
//! | medium (aggregate 5-6)                      | `news2-medium` | review   |
//! | high (aggregate 7 or more)                  | `news2-high`   | urgent   |
//!
//! A single red parameter is `news2-medium`, not a rule of its own: RCP asks for the
//! same "urgent ward-based response" (a registered nurse's review) for both, and the
//! alert body says which (`score.red`, `score.aggregate`). The thresholds are the score
//! table's `aggregate` bands and `red_score`: this module maps risks, never numbers.
//!
//! One episode per patient and version, at the highest rule its score proves:
//! - a score proves its risk when complete, its lower bound when partial (`AtLeast`);
//!   an `Incomplete` score proves nothing;
//! - a higher proven rule opens at once (the lower one, if open, resolves as
//!   `superseded`);
//! - a lower one takes over (or the episode resolves as `recovered`) only on a
//!   complete score: missing parameters are never evidence of recovery;
//! - when every input of the version expired (devices stopped, patient discharged),
//!   the tick resolves the episode with reason `no_data` (`engine::on_expiry`).

use vitalmq_policies::{Assessment, Risk, Severity};

/// A score alert rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ScoreRule {
    Medium,
    High,
}

impl ScoreRule {
    pub const fn id(self) -> &'static str {
        match self {
            Self::Medium => "news2-medium",
            Self::High => "news2-high",
        }
    }

    pub const fn severity(self) -> Severity {
        match self {
            Self::Medium => Severity::Review,
            Self::High => Severity::Urgent,
        }
    }

    pub fn parse(id: &str) -> Option<Self> {
        [Self::Medium, Self::High]
            .into_iter()
            .find(|r| r.id() == id)
    }

    /// The rule a risk calls for.
    pub fn of_risk(risk: Risk) -> Option<Self> {
        match risk {
            Risk::Low => None,
            Risk::LowMedium | Risk::Medium => Some(Self::Medium),
            Risk::High => Some(Self::High),
        }
    }
}

/// What happens to a version's episode after a score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Unchanged,
    /// Opens `to`; resolves `from` (superseded) first when it was open.
    Open {
        from: Option<ScoreRule>,
        to: ScoreRule,
    },
    /// Resolves the open `from` (recovered).
    Resolve {
        from: ScoreRule,
    },
}

/// The transition from the open rule `current` given a new score's assessment.
pub fn transition(current: Option<ScoreRule>, assessment: Assessment) -> Transition {
    let proven = assessment.risk().and_then(ScoreRule::of_risk);
    let complete = matches!(assessment, Assessment::Exact(_));
    match (current, proven) {
        (None, None) => Transition::Unchanged,
        (None, Some(to)) => Transition::Open { from: None, to },
        (Some(c), Some(p)) if p > c => Transition::Open {
            from: Some(c),
            to: p,
        },
        (Some(c), Some(p)) if p < c && complete => Transition::Open {
            from: Some(c),
            to: p,
        },
        (Some(from), None) if complete => Transition::Resolve { from },
        _ => Transition::Unchanged,
    }
}
