//! Legal holds (issue 20 groundwork): records that must not be deleted, anonymized or
//! archived, whatever their retention class says, as validated data.
//!
//! The file is TOML, `vitalmq-holds/v1` (see `policies/examples/holds.toml`). A hold
//! names a patient pseudonym, a device, a time range, or a combination; a record is held
//! when it matches every criterion the hold names. A record that lacks an attribute
//! (a quarantined message has no patient) does not match a criterion on it.
//!
//! [`disposition`] combines holds with a [`RetentionPolicy`]: a held record is never due
//! for an action.
//!
//! Changes are made here, validated, and written back with [`LegalHolds::to_toml`]:
//! [`LegalHolds::place`] adds a hold (a new id, a patient pseudonym, a valid device, a
//! non-empty range, at least one criterion), [`LegalHolds::lift`] lifts one. A lifted
//! hold is kept in the file (`lifted_at`, `lifted_by`, `lift_reason`): the history of
//! holds is evidence, and an id once used is never reused. A lifted hold holds nothing.

use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use toml::Spanned;
use vitalmq_envelope::DeviceId;

use crate::assignment::{Period, UnixMillis};
use crate::consent::Purpose;
use crate::error::{PolicyErrors, Problems, read_policy_file};
use crate::registry::{format_rfc3339, parse_rfc3339};
use crate::retention::{Action, Plane, RetentionPolicy};
use crate::{PSEUDONYM_PREFIX, PrincipalId};

const FORMAT: &str = "vitalmq-holds/v1";

/// Fewest characters after [`PSEUDONYM_PREFIX`] in a hold's patient reference.
const MIN_PSEUDONYM_BODY: usize = 8;
/// Longest reason a change accepts, in bytes.
pub const MAX_REASON: usize = 512;

/// Whether `s` is a patient reference a hold may name: `pt-` then at least 8 of
/// `[0-9a-z-]`, 64 characters in all at most (the rule `vitalmq registry assign`
/// applies), so that a name or a record number is refused. The pseudonymiser's
/// `pt-` + 32 hex digits is one such reference.
pub fn is_patient_ref(s: &str) -> bool {
    s.len() <= DeviceId::MAX_LEN
        && s.strip_prefix(PSEUDONYM_PREFIX).is_some_and(|body| {
            body.len() >= MIN_PSEUDONYM_BODY
                && body
                    .bytes()
                    .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase() || c == b'-')
        })
}

/// What retention needs to know about one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordMeta<'a> {
    pub plane: Plane,
    /// The purpose it was processed for; `None` for audit records and unattributed data.
    pub purpose: Option<Purpose>,
    /// The record's instant (`observed_at` for readings, the write time for audit).
    pub at: UnixMillis,
    /// The patient pseudonym it is attributed to, if any.
    pub patient_ref: Option<&'a str>,
    /// The device it came from or concerns, if any.
    pub device: Option<&'a DeviceId>,
}

/// One legal hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub id: String,
    pub reason: String,
    pub placed_by: PrincipalId,
    pub placed_at: UnixMillis,
    /// Holds records of this patient pseudonym.
    pub patient_ref: Option<String>,
    /// Holds records of this device.
    pub device: Option<DeviceId>,
    /// Holds records whose instant lies in this half-open range.
    pub during: Option<Period>,
}

impl Hold {
    /// Whether the hold covers `record`: every criterion it names matches.
    pub fn covers(&self, record: &RecordMeta<'_>) -> bool {
        self.patient_ref
            .as_deref()
            .is_none_or(|p| record.patient_ref == Some(p))
            && self
                .device
                .as_ref()
                .is_none_or(|d| record.device == Some(d))
            && self.during.is_none_or(|period| period.contains(record.at))
    }
}

/// A hold that was lifted: it holds nothing any more and is kept as evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiftedHold {
    pub hold: Hold,
    pub lifted_at: UnixMillis,
    pub lifted_by: PrincipalId,
    pub reason: String,
}

/// A hold to place, as an operator asks for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HoldRequest {
    pub id: String,
    pub reason: String,
    pub patient_ref: Option<String>,
    pub device: Option<String>,
    /// Start of the held range (inclusive); open when absent.
    pub from: Option<UnixMillis>,
    /// End of the held range (exclusive); open when absent.
    pub to: Option<UnixMillis>,
}

/// Why a hold was not placed or lifted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HoldError {
    #[error("hold id `{0}` is invalid: it must match [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}")]
    BadId(String),
    #[error("hold `{0}` exists already (ids of lifted holds are not reused either)")]
    DuplicateId(String),
    #[error(
        "the reason must not be empty, longer than {MAX_REASON} bytes or hold control characters"
    )]
    BadReason,
    #[error(
        "the patient reference must be a pseudonymous token: `{PSEUDONYM_PREFIX}` then at least \
         {MIN_PSEUDONYM_BODY} characters of [0-9a-z-], 64 in all at most, never a name, record \
         number or other direct identifier"
    )]
    BadPatientRef,
    #[error("{0}")]
    BadDevice(String),
    #[error("the range is empty: `to` must be after `from`")]
    EmptyRange,
    #[error("a hold names a patient, a device, a time range (from/to), or several")]
    NoCriterion,
    #[error("no hold `{0}`")]
    UnknownHold(String),
    #[error("hold `{id}` was lifted already")]
    AlreadyLifted { id: String },
}

/// The validated set of legal holds: the active ones and, kept as evidence, the lifted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LegalHolds {
    holds: Vec<Hold>,
    lifted: Vec<LiftedHold>,
    sha256: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHolds {
    format: Spanned<String>,
    #[serde(default)]
    holds: Vec<Spanned<RawHold>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHold {
    id: Spanned<String>,
    reason: Spanned<String>,
    placed_by: Spanned<String>,
    placed_at: Spanned<String>,
    patient_ref: Option<Spanned<String>>,
    device: Option<Spanned<String>>,
    from: Option<Spanned<String>>,
    to: Option<Spanned<String>>,
    lifted_at: Option<Spanned<String>>,
    lifted_by: Option<Spanned<String>>,
    lift_reason: Option<Spanned<String>>,
}

/// The file as [`LegalHolds::to_toml`] writes it.
#[derive(Serialize)]
struct FileOut<'a> {
    format: &'a str,
    holds: Vec<HoldOut<'a>>,
}

#[derive(Serialize)]
struct HoldOut<'a> {
    id: &'a str,
    reason: &'a str,
    placed_by: &'a str,
    placed_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    patient_ref: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lifted_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lifted_by: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lift_reason: Option<&'a str>,
}

impl<'a> HoldOut<'a> {
    fn of(hold: &'a Hold, lifted: Option<&'a LiftedHold>) -> Self {
        let during = hold.during;
        Self {
            id: &hold.id,
            reason: &hold.reason,
            placed_by: hold.placed_by.as_str(),
            placed_at: format_rfc3339(hold.placed_at),
            patient_ref: hold.patient_ref.as_deref(),
            device: hold.device.as_ref().map(DeviceId::as_str),
            // An absent `from` reads as the epoch: written only when it says more.
            from: during
                .filter(|p| p.from != 0 || p.to.is_none())
                .map(|p| format_rfc3339(p.from)),
            to: during.and_then(|p| p.to).map(format_rfc3339),
            lifted_at: lifted.map(|l| format_rfc3339(l.lifted_at)),
            lifted_by: lifted.map(|l| l.lifted_by.as_str()),
            lift_reason: lifted.map(|l| l.reason.as_str()),
        }
    }
}

/// Whether `reason` is a reason a change accepts.
fn reason_ok(reason: &str) -> bool {
    !reason.trim().is_empty() && reason.len() <= MAX_REASON && !reason.chars().any(char::is_control)
}

impl LegalHolds {
    /// No holds at all.
    pub fn none() -> Self {
        Self::default()
    }

    /// Holds built in code (tests, an admin command that places one); ids must differ.
    pub fn from_holds(holds: Vec<Hold>) -> Self {
        Self {
            holds,
            lifted: Vec::new(),
            sha256: String::new(),
        }
    }

    pub fn load(path: &Path) -> Result<Self, PolicyErrors> {
        Self::parse(&read_policy_file(path)?, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, PolicyErrors> {
        let mut problems = Problems::new(path, text);
        let mut set = Self {
            holds: Vec::new(),
            lifted: Vec::new(),
            sha256: hex::encode(Sha256::digest(text.as_bytes())),
        };
        let raw: RawHolds = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                problems.toml(&e);
                return problems.finish(set);
            }
        };
        if raw.format.get_ref() != FORMAT {
            problems.add(
                Some(raw.format.span()),
                "format",
                format!("expected \"{FORMAT}\""),
            );
        }
        let mut ids = BTreeSet::new();
        for (i, spanned) in raw.holds.iter().enumerate() {
            let h = spanned.get_ref();
            let field = |f: &str| format!("holds[{i}].{f}");
            let before = problems.len();
            let id = h.id.get_ref().trim().to_owned();
            if id.is_empty() {
                problems.add(Some(h.id.span()), field("id"), "must not be empty");
            } else if !ids.insert(id.clone()) {
                problems.add(
                    Some(h.id.span()),
                    field("id"),
                    format!("hold `{id}` is listed twice"),
                );
            }
            if h.reason.get_ref().trim().is_empty() {
                problems.add(Some(h.reason.span()), field("reason"), "must not be empty");
            }
            let placed_by = PrincipalId::new(h.placed_by.get_ref().clone())
                .map_err(|e| {
                    problems.add(Some(h.placed_by.span()), field("placed_by"), e.to_string())
                })
                .ok();
            let time = |s: &Spanned<String>, f: &str, problems: &mut Problems<'_>| {
                parse_rfc3339(s.get_ref())
                    .map_err(|e| problems.add(Some(s.span()), field(f), e.to_string()))
                    .ok()
            };
            let placed_at = time(&h.placed_at, "placed_at", &mut problems);
            let patient_ref = h.patient_ref.as_ref().and_then(|p| {
                if is_patient_ref(p.get_ref()) {
                    Some(p.get_ref().clone())
                } else {
                    problems.add(
                        Some(p.span()),
                        field("patient_ref"),
                        format!(
                            "not a patient pseudonym (`{PSEUDONYM_PREFIX}` then at least \
                             {MIN_PSEUDONYM_BODY} of [0-9a-z-])"
                        ),
                    );
                    None
                }
            });
            let device = h.device.as_ref().and_then(|d| {
                DeviceId::new(d.get_ref())
                    .map_err(|e| problems.add(Some(d.span()), field("device"), e.to_string()))
                    .ok()
            });
            let from = h.from.as_ref().map(|s| time(s, "from", &mut problems));
            let to = h.to.as_ref().map(|s| time(s, "to", &mut problems));
            let during = match (from, to) {
                (None, None) => None,
                (from, to) => {
                    let from = from.flatten().unwrap_or(0);
                    let to = to.flatten();
                    let period = Period::new(from, to);
                    if period.is_none() {
                        let span = h.to.as_ref().map(|s| s.span());
                        problems.add(span, field("to"), "must be after `from`");
                    }
                    period
                }
            };
            if h.patient_ref.is_none() && h.device.is_none() && h.from.is_none() && h.to.is_none() {
                problems.add(
                    Some(spanned.span()),
                    field("patient_ref"),
                    "a hold names a patient_ref, a device, a time range (from/to), or several",
                );
            }
            let lift = match (&h.lifted_at, &h.lifted_by, &h.lift_reason) {
                (None, None, None) => None,
                (Some(at), Some(by), Some(why)) => {
                    let at = time(at, "lifted_at", &mut problems);
                    let by = PrincipalId::new(by.get_ref().clone())
                        .map_err(|e| {
                            problems.add(Some(by.span()), field("lifted_by"), e.to_string())
                        })
                        .ok();
                    if why.get_ref().trim().is_empty() {
                        problems.add(Some(why.span()), field("lift_reason"), "must not be empty");
                    }
                    Some((at, by, why.get_ref().clone()))
                }
                _ => {
                    problems.add(
                        Some(spanned.span()),
                        field("lifted_at"),
                        "a lifted hold has lifted_at, lifted_by and lift_reason, all three",
                    );
                    None
                }
            };
            if problems.len() == before
                && let (Some(placed_by), Some(placed_at)) = (placed_by, placed_at)
            {
                let hold = Hold {
                    id,
                    reason: h.reason.get_ref().clone(),
                    placed_by,
                    placed_at,
                    patient_ref,
                    device,
                    during,
                };
                match lift {
                    None => set.holds.push(hold),
                    Some((Some(lifted_at), Some(lifted_by), reason)) => {
                        set.lifted.push(LiftedHold {
                            hold,
                            lifted_at,
                            lifted_by,
                            reason,
                        });
                    }
                    Some(_) => {}
                }
            }
        }
        problems.finish(set)
    }

    /// The first active hold that covers `record`, if any (a lifted hold holds nothing).
    pub fn held(&self, record: &RecordMeta<'_>) -> Option<&Hold> {
        self.holds.iter().find(|h| h.covers(record))
    }

    /// Every active hold, in file order.
    pub fn holds(&self) -> &[Hold] {
        &self.holds
    }

    /// Every lifted hold, in file order.
    pub fn lifted(&self) -> &[LiftedHold] {
        &self.lifted
    }

    /// Whether any hold, active or lifted, has this id.
    fn has_id(&self, id: &str) -> bool {
        self.holds.iter().any(|h| h.id == id) || self.lifted.iter().any(|l| l.hold.id == id)
    }

    /// Places the hold `request` asks for, by `placed_by` at `placed_at`, after checking
    /// it: a new id of the id grammar, a reason, a patient pseudonym
    /// ([`is_patient_ref`]), a valid device, a non-empty range, at least one criterion.
    pub fn place(
        &mut self,
        request: HoldRequest,
        placed_by: PrincipalId,
        placed_at: UnixMillis,
    ) -> Result<&Hold, HoldError> {
        let HoldRequest {
            id,
            reason,
            patient_ref,
            device,
            from,
            to,
        } = request;
        if DeviceId::new(id.as_str()).is_err() {
            return Err(HoldError::BadId(id.chars().take(80).collect()));
        }
        if self.has_id(&id) {
            return Err(HoldError::DuplicateId(id));
        }
        if !reason_ok(&reason) {
            return Err(HoldError::BadReason);
        }
        if patient_ref.as_deref().is_some_and(|p| !is_patient_ref(p)) {
            return Err(HoldError::BadPatientRef);
        }
        let device = device
            .map(DeviceId::new)
            .transpose()
            .map_err(|e| HoldError::BadDevice(e.to_string()))?;
        let during = match (from, to) {
            (None, None) => None,
            (from, to) => Some(Period::new(from.unwrap_or(0), to).ok_or(HoldError::EmptyRange)?),
        };
        if patient_ref.is_none() && device.is_none() && during.is_none() {
            return Err(HoldError::NoCriterion);
        }
        self.holds.push(Hold {
            id,
            reason,
            placed_by,
            placed_at,
            patient_ref,
            device,
            during,
        });
        Ok(self.holds.last().expect("a hold was just pushed"))
    }

    /// Lifts the active hold `id`, by `lifted_by` at `lifted_at` for `reason`: it holds
    /// nothing from now on and is kept, with who lifted it, when and why.
    pub fn lift(
        &mut self,
        id: &str,
        reason: &str,
        lifted_by: PrincipalId,
        lifted_at: UnixMillis,
    ) -> Result<&LiftedHold, HoldError> {
        if !reason_ok(reason) {
            return Err(HoldError::BadReason);
        }
        let Some(at) = self.holds.iter().position(|h| h.id == id) else {
            return Err(if self.lifted.iter().any(|l| l.hold.id == id) {
                HoldError::AlreadyLifted { id: id.to_owned() }
            } else {
                HoldError::UnknownHold(id.to_owned())
            });
        };
        let hold = self.holds.remove(at);
        self.lifted.push(LiftedHold {
            hold,
            lifted_at,
            lifted_by,
            reason: reason.to_owned(),
        });
        Ok(self.lifted.last().expect("a lifted hold was just pushed"))
    }

    /// The holds as a `vitalmq-holds/v1` file: the active ones, then the lifted ones;
    /// [`LegalHolds::parse`] reads it back to the same holds.
    pub fn to_toml(&self) -> String {
        let file = FileOut {
            format: FORMAT,
            holds: self
                .holds
                .iter()
                .map(|h| HoldOut::of(h, None))
                .chain(self.lifted.iter().map(|l| HoldOut::of(&l.hold, Some(l))))
                .collect(),
        };
        let body = toml::to_string(&file).expect("the holds model always serializes to TOML");
        format!(
            "# vitalmq legal holds, written by `vitalmq hold` (place, lift). A lifted hold is\n\
             # kept, with lifted_at, lifted_by and lift_reason: it holds nothing any more.\n{body}"
        )
    }

    /// SHA-256 (hex) of the file's text, for audit records; empty for holds built in code.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }
}

/// What retention does with one record at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition<'a> {
    /// Under a legal hold: nothing is done, whatever the class says.
    Held(&'a Hold),
    /// The class's `keep_for` has passed: this action is due.
    Due(&'a Action),
    /// Kept as it is for now.
    Keep,
}

/// The decision for `record` at `now`: a hold wins over every action; otherwise the
/// action of the record's class once its `keep_for` has passed.
pub fn disposition<'a>(
    policy: &'a RetentionPolicy,
    holds: &'a LegalHolds,
    record: &RecordMeta<'_>,
    now: UnixMillis,
) -> Disposition<'a> {
    if let Some(hold) = holds.held(record) {
        return Disposition::Held(hold);
    }
    match policy.due(record.plane, record.purpose, record.at, now) {
        Some(action) => Disposition::Due(action),
        None => Disposition::Keep,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../examples/holds.toml");
    const RETENTION: &str = include_str!("../examples/retention.toml");
    const PATIENT: &str = "pt-0123456789abcdef0123456789abcdef";

    fn example() -> LegalHolds {
        LegalHolds::parse(EXAMPLE, Path::new("holds.toml")).expect("valid example")
    }

    fn record<'a>(
        plane: Plane,
        at: UnixMillis,
        patient_ref: Option<&'a str>,
        device: Option<&'a DeviceId>,
    ) -> RecordMeta<'a> {
        RecordMeta {
            plane,
            purpose: None,
            at,
            patient_ref,
            device,
        }
    }

    #[test]
    fn the_example_holds_a_patient_and_a_device_during_a_range() {
        let holds = example();
        assert_eq!(holds.holds().len(), 2);
        let dev = DeviceId::new("dev-0042").expect("device");
        let other = DeviceId::new("dev-0043").expect("device");
        let sept = parse_rfc3339("2026-09-10T00:00:00Z").expect("time");
        let nov = parse_rfc3339("2026-11-10T00:00:00Z").expect("time");
        let end = parse_rfc3339("2026-10-15T00:00:00Z").expect("time");

        let by_patient = holds.held(&record(Plane::Clinical, nov, Some(PATIENT), None));
        assert_eq!(by_patient.map(|h| h.id.as_str()), Some("lh-2026-001"));
        let by_device = holds.held(&record(Plane::Raw, sept, None, Some(&dev)));
        assert_eq!(by_device.map(|h| h.id.as_str()), Some("lh-2026-002"));
        // Every criterion must match: the device outside the range, another device in
        // it, and the range's exclusive end are not held.
        assert!(
            holds
                .held(&record(Plane::Raw, nov, None, Some(&dev)))
                .is_none()
        );
        assert!(
            holds
                .held(&record(Plane::Raw, sept, None, Some(&other)))
                .is_none()
        );
        assert!(
            holds
                .held(&record(Plane::Raw, end, None, Some(&dev)))
                .is_none()
        );
        assert!(
            holds
                .held(&record(Plane::Raw, end - 1, None, Some(&dev)))
                .is_some()
        );
        // A record without a patient is not matched by a patient hold.
        assert!(
            holds
                .held(&record(Plane::Quarantine, nov, None, None))
                .is_none()
        );
    }

    #[test]
    fn a_hold_wins_over_a_due_action() {
        let policy =
            RetentionPolicy::parse(RETENTION, Path::new("retention.toml")).expect("policy");
        let holds = example();
        let at = 1_000;
        let now = at + 100 * 365 * 86_400_000;
        let held = record(Plane::Raw, at, Some(PATIENT), None);
        assert!(matches!(
            disposition(&policy, &holds, &held, now),
            Disposition::Held(h) if h.id == "lh-2026-001"
        ));
        let free = record(
            Plane::Raw,
            at,
            Some("pt-ffffffffffffffffffffffffffffffff"),
            None,
        );
        assert_eq!(
            disposition(&policy, &holds, &free, now),
            Disposition::Due(&Action::Delete)
        );
        assert_eq!(
            disposition(&policy, &holds, &free, at + 1),
            Disposition::Keep
        );
        assert_eq!(
            disposition(&policy, &LegalHolds::none(), &held, now),
            Disposition::Due(&Action::Delete)
        );
    }

    #[test]
    fn problems_name_file_line_and_field() {
        let text = "format = \"vitalmq-holds/v1\"\n\
                    [[holds]]\n\
                    id = \"h1\"\n\
                    reason = \"x\"\n\
                    placed_by = \"alice\"\n\
                    placed_at = \"yesterday\"\n\
                    patient_ref = \"Jane Doe\"\n\
                    [[holds]]\n\
                    id = \"h1\"\n\
                    reason = \" \"\n\
                    placed_by = \"bob\"\n\
                    placed_at = \"2026-01-01T00:00:00Z\"\n\
                    from = \"2026-02-01T00:00:00Z\"\n\
                    to = \"2026-01-01T00:00:00Z\"\n\
                    [[holds]]\n\
                    id = \"h3\"\n\
                    reason = \"everything?\"\n\
                    placed_by = \"carol\"\n\
                    placed_at = \"2026-01-01T00:00:00Z\"\n";
        let err = LegalHolds::parse(text, Path::new("h.toml")).expect_err("invalid");
        let shown = err.to_string();
        for want in [
            "h.toml:6: holds[0].placed_at:",
            "h.toml:7: holds[0].patient_ref: not a patient pseudonym",
            "h.toml:9: holds[1].id: hold `h1` is listed twice",
            "h.toml:10: holds[1].reason: must not be empty",
            "h.toml:14: holds[1].to: must be after `from`",
            "holds[2].patient_ref: a hold names a patient_ref, a device, a time range",
        ] {
            assert!(shown.contains(want), "want `{want}` in:\n{shown}");
        }
    }

    fn officer() -> PrincipalId {
        PrincipalId::new("priya").expect("id")
    }

    fn request(id: &str) -> HoldRequest {
        HoldRequest {
            id: id.into(),
            reason: "claim 2027/4".into(),
            patient_ref: Some("pt-7f3a91c2".into()),
            ..HoldRequest::default()
        }
    }

    #[test]
    fn the_example_keeps_a_lifted_hold_that_holds_nothing() {
        let holds = example();
        let lifted = holds.lifted();
        assert_eq!(lifted.len(), 1);
        assert_eq!(lifted[0].hold.id, "lh-2026-000");
        assert_eq!(lifted[0].reason, "audit closed, report 2026/31");
        let dev = DeviceId::new("dev-0017").expect("device");
        let in_range = parse_rfc3339("2026-04-01T00:00:00Z").expect("time");
        assert!(
            lifted[0]
                .hold
                .covers(&record(Plane::Raw, in_range, None, Some(&dev)))
        );
        assert!(
            holds
                .held(&record(Plane::Raw, in_range, None, Some(&dev)))
                .is_none(),
            "a lifted hold holds nothing"
        );
    }

    #[test]
    fn placing_checks_every_field_and_changes_nothing_when_refused() {
        let mut holds = example();
        let before = holds.clone();
        let cases = [
            (
                HoldRequest {
                    id: "lh-2026-001".into(),
                    ..request("x")
                },
                HoldError::DuplicateId("lh-2026-001".into()),
            ),
            (
                request("lh-2026-000"),
                HoldError::DuplicateId("lh-2026-000".into()),
            ),
            (
                HoldRequest {
                    id: "has space".into(),
                    ..request("x")
                },
                HoldError::BadId("has space".into()),
            ),
            (
                HoldRequest {
                    id: String::new(),
                    ..request("x")
                },
                HoldError::BadId(String::new()),
            ),
            (
                HoldRequest {
                    reason: "  ".into(),
                    ..request("h1")
                },
                HoldError::BadReason,
            ),
            (
                HoldRequest {
                    reason: "a\nb".into(),
                    ..request("h1")
                },
                HoldError::BadReason,
            ),
            (
                HoldRequest {
                    patient_ref: Some("Jane Doe".into()),
                    ..request("h1")
                },
                HoldError::BadPatientRef,
            ),
            (
                HoldRequest {
                    patient_ref: Some("pt-short".into()),
                    ..request("h1")
                },
                HoldError::BadPatientRef,
            ),
            (
                HoldRequest {
                    patient_ref: Some("pt-MRN12345".into()),
                    ..request("h1")
                },
                HoldError::BadPatientRef,
            ),
            (
                HoldRequest {
                    from: Some(10),
                    to: Some(10),
                    ..request("h1")
                },
                HoldError::EmptyRange,
            ),
            (
                HoldRequest {
                    patient_ref: None,
                    ..request("h1")
                },
                HoldError::NoCriterion,
            ),
        ];
        for (req, want) in cases {
            let got = holds.place(req.clone(), officer(), 5).expect_err("refused");
            assert_eq!(got, want, "{req:?}");
            assert_eq!(holds, before, "a refused hold changes nothing");
        }
        let bad_device = holds.place(
            HoldRequest {
                patient_ref: None,
                device: Some("dev/1".into()),
                ..request("h1")
            },
            officer(),
            5,
        );
        assert!(
            matches!(bad_device, Err(HoldError::BadDevice(_))),
            "{bad_device:?}"
        );
        assert_eq!(holds, before);

        // A device alone, a range alone (either end open), a pseudonym of the
        // pseudonymiser's form: each is a hold.
        let dev = DeviceId::new("dev-9").expect("device");
        let placed = holds
            .place(
                HoldRequest {
                    patient_ref: None,
                    device: Some("dev-9".into()),
                    ..request("h-dev")
                },
                officer(),
                7,
            )
            .expect("device hold")
            .clone();
        assert_eq!(placed.placed_by, officer());
        assert_eq!(placed.placed_at, 7);
        assert!(
            holds
                .held(&record(Plane::Raw, 1, None, Some(&dev)))
                .is_some()
        );
        holds
            .place(
                HoldRequest {
                    patient_ref: None,
                    to: Some(100),
                    ..request("h-range")
                },
                officer(),
                7,
            )
            .expect("range hold");
        assert!(
            holds
                .held(&record(Plane::Quarantine, 99, None, None))
                .is_some()
        );
        assert!(
            holds
                .held(&record(Plane::Quarantine, 100, None, None))
                .is_none()
        );
        holds
            .place(
                HoldRequest {
                    patient_ref: Some(PATIENT.into()),
                    ..request("h-pt")
                },
                officer(),
                7,
            )
            .expect("pseudonymiser's form");
    }

    #[test]
    fn a_lifted_hold_holds_nothing_and_is_kept_with_who_when_and_why() {
        let mut holds = LegalHolds::none();
        holds.place(request("h1"), officer(), 1).expect("placed");
        let rec = record(Plane::Normalized, 50, Some("pt-7f3a91c2"), None);
        assert!(holds.held(&rec).is_some());
        assert_eq!(
            holds.lift("h1", "  ", officer(), 2),
            Err(HoldError::BadReason)
        );
        let lifted = holds
            .lift("h1", "claim settled", officer(), 2)
            .expect("lifted")
            .clone();
        assert_eq!(lifted.lifted_at, 2);
        assert_eq!(lifted.reason, "claim settled");
        assert_eq!(lifted.hold.placed_at, 1);
        assert!(holds.held(&rec).is_none(), "lifted: holds nothing");
        assert!(holds.holds().is_empty());
        assert_eq!(holds.lifted(), [lifted]);
        assert_eq!(
            holds.lift("h1", "again", officer(), 3),
            Err(HoldError::AlreadyLifted { id: "h1".into() })
        );
        assert_eq!(
            holds.lift("h9", "no such", officer(), 3),
            Err(HoldError::UnknownHold("h9".into()))
        );
        assert_eq!(
            holds
                .place(request("h1"), officer(), 4)
                .map(|h| h.id.clone()),
            Err(HoldError::DuplicateId("h1".into())),
            "an id is never reused"
        );
        // The policy's verdict follows: due again once lifted.
        let policy =
            RetentionPolicy::parse(RETENTION, Path::new("retention.toml")).expect("policy");
        let now = 100 * 365 * 86_400_000;
        assert!(matches!(
            disposition(&policy, &holds, &rec, now),
            Disposition::Due(_)
        ));
    }

    #[test]
    fn the_written_file_reads_back_to_the_same_holds() {
        let mut holds = example();
        holds
            .place(
                HoldRequest {
                    id: "lh-2027-001".into(),
                    reason: "quote \" and # hash".into(),
                    patient_ref: Some("pt-7f3a91c2".into()),
                    device: Some("dev-0042".into()),
                    from: Some(1_767_225_600_123),
                    to: None,
                },
                officer(),
                1_767_225_600_999,
            )
            .expect("placed");
        holds
            .place(
                HoldRequest {
                    id: "lh-2027-002".into(),
                    patient_ref: None,
                    to: Some(1_767_225_600_000),
                    ..request("x")
                },
                officer(),
                1_767_225_601_000,
            )
            .expect("placed");
        holds
            .lift("lh-2026-001", "claim settled", officer(), 1_767_225_602_000)
            .expect("lifted");
        let text = holds.to_toml();
        let back = LegalHolds::parse(&text, Path::new("holds.toml")).expect("valid");
        assert_eq!(back.holds(), holds.holds(), "{text}");
        assert_eq!(back.lifted(), holds.lifted(), "{text}");
        assert_eq!(back.to_toml(), text, "stable");
    }

    #[test]
    fn a_lift_needs_all_three_fields_in_the_file() {
        let text = "format = \"vitalmq-holds/v1\"\n\
                    [[holds]]\n\
                    id = \"h1\"\n\
                    reason = \"x\"\n\
                    placed_by = \"alice\"\n\
                    placed_at = \"2026-01-01T00:00:00Z\"\n\
                    device = \"dev-1\"\n\
                    lifted_at = \"2026-02-01T00:00:00Z\"\n";
        let err = LegalHolds::parse(text, Path::new("h.toml")).expect_err("half a lift");
        assert!(
            err.to_string()
                .contains("holds[0].lifted_at: a lifted hold has"),
            "{err}"
        );
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        const DEVICES: [&str; 3] = ["dev-a", "dev-b", "dev-c"];
        const PATIENTS: [&str; 3] = [
            "pt-00000000000000000000000000000000",
            "pt-11111111111111111111111111111111",
            "pt-22222222222222222222222222222222",
        ];

        /// A complete policy with a random class per plane and one purpose override.
        fn policy() -> impl Strategy<Value = RetentionPolicy> {
            (
                proptest::collection::vec((1u64..5_000, 0usize..3), Plane::ALL.len()),
                (1u64..5_000, 0usize..3),
            )
                .prop_map(|(classes, research)| {
                    let action = |a: usize| match a {
                        0 => "action = \"delete\"".to_owned(),
                        1 => "action = \"anonymize\"".to_owned(),
                        _ => "action = \"archive\"\narchive_to = \"arch/\"".to_owned(),
                    };
                    let mut text = String::from("format = \"vitalmq-retention/v1\"\n");
                    for (plane, (ms, a)) in Plane::ALL.iter().zip(&classes) {
                        text.push_str(&format!(
                            "[planes.\"{plane}\"]\nkeep_for = \"{ms}ms\"\n{}\n",
                            action(*a)
                        ));
                    }
                    text.push_str(&format!(
                        "[planes.normalized.purposes.research]\nkeep_for = \"{}ms\"\n{}\n",
                        research.0,
                        action(research.1)
                    ));
                    RetentionPolicy::parse(&text, Path::new("p.toml"))
                        .expect("generated policy is valid")
                })
        }

        fn holds() -> impl Strategy<Value = LegalHolds> {
            let hold = (
                proptest::option::of(0usize..3),
                proptest::option::of(0usize..3),
                proptest::option::of((0u64..20_000, proptest::option::of(1u64..10_000))),
            );
            proptest::collection::vec(hold, 0..4).prop_map(|hs| {
                let holds = hs
                    .into_iter()
                    .enumerate()
                    .map(|(i, (patient, device, range))| Hold {
                        id: format!("h{i}"),
                        reason: "test".into(),
                        placed_by: PrincipalId::new("tester").expect("id"),
                        placed_at: 0,
                        patient_ref: patient.map(|p| PATIENTS[p].to_owned()),
                        device: device.map(|d| DeviceId::new(DEVICES[d]).expect("device")),
                        during: range
                            .and_then(|(from, len)| Period::new(from, len.map(|l| from + l))),
                    })
                    .collect();
                LegalHolds::from_holds(holds)
            })
        }

        proptest! {
            #[test]
            fn written_holds_read_back_the_same(
                holds in holds(),
                lift in proptest::collection::vec(any::<bool>(), 4),
                at in 0u64..4_000_000_000_000,
            ) {
                // A hold without a criterion is refused by the loader (tested above).
                prop_assume!(holds.holds().iter().all(|h| {
                    h.patient_ref.is_some() || h.device.is_some() || h.during.is_some()
                }));
                let mut holds = holds;
                let ids: Vec<String> = holds.holds().iter().map(|h| h.id.clone()).collect();
                for (id, lift) in ids.iter().zip(lift) {
                    if lift {
                        holds
                            .lift(id, "done", PrincipalId::new("lifter").expect("id"), at)
                            .expect("an active hold lifts");
                    }
                }
                let text = holds.to_toml();
                let back = LegalHolds::parse(&text, Path::new("h.toml"));
                prop_assert!(back.is_ok(), "{text}");
                let back = back.expect("checked");
                prop_assert_eq!(back.holds(), holds.holds());
                prop_assert_eq!(back.lifted(), holds.lifted());
            }

            #[test]
            fn held_records_are_never_due_and_nothing_is_due_early(
                policy in policy(),
                holds in holds(),
                plane in 0usize..Plane::ALL.len(),
                research in any::<bool>(),
                patient in proptest::option::of(0usize..3),
                device in proptest::option::of(0usize..3),
                at in 0u64..30_000,
                now in 0u64..40_000,
                near in proptest::option::of(-2i64..=2),
            ) {
                let plane = Plane::ALL[plane];
                let device = device.map(|d| DeviceId::new(DEVICES[d]).expect("device"));
                let rec = RecordMeta {
                    plane,
                    purpose: (research && plane.has_purpose()).then_some(Purpose::Research),
                    at,
                    patient_ref: patient.map(|p| PATIENTS[p]),
                    device: device.as_ref(),
                };
                let keep = policy.class(rec.plane, rec.purpose).keep_for_ms;
                // Half the cases land right at the boundary, where an off-by-one shows.
                let now = near.map_or(now, |d| (at + keep).saturating_add_signed(d));
                match disposition(&policy, &holds, &rec, now) {
                    Disposition::Held(h) => prop_assert!(h.covers(&rec)),
                    Disposition::Due(action) => {
                        prop_assert!(holds.held(&rec).is_none(), "due under a hold");
                        prop_assert!(now >= at && now - at >= keep, "due before keep_for");
                        prop_assert_eq!(action, &policy.class(rec.plane, rec.purpose).action);
                    }
                    Disposition::Keep => {
                        prop_assert!(holds.held(&rec).is_none());
                        prop_assert!(now < at || now - at < keep, "not due after keep_for");
                    }
                }
            }
        }
    }
}
