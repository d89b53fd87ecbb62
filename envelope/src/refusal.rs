//! The SPEC's refusal classes and the typed refusal a verifier returns.

use std::fmt;

/// Refusal reason classes of SPEC section 3 and, from the sequence rules of section 4,
/// `duplicate` and `replay` (which the bridge's sequence window reports, not envelope),
/// and `unassigned` (issue 19; not in SPEC section 3): a verified reading observed when
/// no assignment of the device covers it (unassigned, or retired), which the bridge
/// cannot attribute to a patient and site.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ReasonClass {
    Oversized,
    Malformed,
    BadSignature,
    UnknownKey,
    KidMismatch,
    AlgMismatch,
    PayloadSchema,
    Duplicate,
    Replay,
    Unassigned,
}

impl ReasonClass {
    /// Every class, in SPEC order, then `unassigned`.
    pub const ALL: [Self; 10] = [
        Self::Oversized,
        Self::Malformed,
        Self::BadSignature,
        Self::UnknownKey,
        Self::KidMismatch,
        Self::AlgMismatch,
        Self::PayloadSchema,
        Self::Duplicate,
        Self::Replay,
        Self::Unassigned,
    ];

    /// The SPEC's spelling, used in audit records, metrics labels and JSON.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Oversized => "oversized",
            Self::Malformed => "malformed",
            Self::BadSignature => "bad_signature",
            Self::UnknownKey => "unknown_key",
            Self::KidMismatch => "kid_mismatch",
            Self::AlgMismatch => "alg_mismatch",
            Self::PayloadSchema => "payload_schema",
            Self::Duplicate => "duplicate",
            Self::Replay => "replay",
            Self::Unassigned => "unassigned",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for ReasonClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused message: the class a machine acts on and a detail a person reads.
///
/// The detail describes structure only (which field, which rule); it never quotes
/// measurement values, so it is safe to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: ReasonClass,
    pub detail: String,
}

impl Refusal {
    pub fn new(reason: ReasonClass, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

impl std::error::Error for Refusal {}
