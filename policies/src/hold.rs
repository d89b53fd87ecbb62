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

use std::collections::BTreeSet;
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use toml::Spanned;
use vitalmq_envelope::DeviceId;

use crate::assignment::{Period, UnixMillis};
use crate::consent::Purpose;
use crate::error::{PolicyErrors, Problems, read_policy_file};
use crate::pseudonym::is_pseudonym;
use crate::registry::parse_rfc3339;
use crate::retention::{Action, Plane, RetentionPolicy};
use crate::{PSEUDONYM_PREFIX, PrincipalId};

const FORMAT: &str = "vitalmq-holds/v1";

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

/// The validated set of legal holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LegalHolds {
    holds: Vec<Hold>,
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
                if is_pseudonym(p.get_ref()) {
                    Some(p.get_ref().clone())
                } else {
                    problems.add(
                        Some(p.span()),
                        field("patient_ref"),
                        format!("not a patient pseudonym (`{PSEUDONYM_PREFIX}` + hex)"),
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
            if problems.len() == before
                && let (Some(placed_by), Some(placed_at)) = (placed_by, placed_at)
            {
                set.holds.push(Hold {
                    id,
                    reason: h.reason.get_ref().clone(),
                    placed_by,
                    placed_at,
                    patient_ref,
                    device,
                    during,
                });
            }
        }
        problems.finish(set)
    }

    /// The first hold that covers `record`, if any.
    pub fn held(&self, record: &RecordMeta<'_>) -> Option<&Hold> {
        self.holds.iter().find(|h| h.covers(record))
    }

    /// Every hold, in file order.
    pub fn holds(&self) -> &[Hold] {
        &self.holds
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
