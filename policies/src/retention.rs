//! Retention classes (issue 20 groundwork): how long each kind of record is kept and what
//! happens to it then, as validated data.
//!
//! The file is TOML, `vitalmq-retention/v1` (see `policies/examples/retention.toml`).
//! Every [`Plane`] must have a class, so nothing is kept forever because it was left
//! out; a data plane may override its class per [`Purpose`]:
//!
//! ```toml
//! format = "vitalmq-retention/v1"
//! [planes.raw]
//! keep_for = "30days"
//! action = "delete"
//! [planes.normalized.purposes.research]
//! keep_for = "5years"
//! action = "archive"
//! archive_to = "archive/research/"
//! ```
//!
//! `keep_for` is a `humantime` duration (`30days`, `2years`; a year is 365.25 days).
//! [`RetentionPolicy::due`] is pure: the action is due once `now - at >= keep_for`,
//! never before. Legal holds ([`crate::LegalHolds`]) win over every action; combine the
//! two with [`crate::disposition`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use toml::Spanned;

use crate::assignment::UnixMillis;
use crate::consent::Purpose;
use crate::error::{PolicyErrors, Problems, read_policy_file};

const FORMAT: &str = "vitalmq-retention/v1";

/// Which audit log a record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AuditLog {
    Broker,
    Bridge,
    Admin,
    Operator,
}

/// Where a record lives. A closed set: a policy naming anything else is an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Plane {
    /// Verified envelopes as received.
    Raw,
    /// Decoded, normalised readings.
    Normalized,
    /// Clinical alerts.
    Clinical,
    /// Messages refused by the bridge and kept for inspection.
    Quarantine,
    /// One component's audit log.
    Audit(AuditLog),
}

impl Plane {
    /// Every plane, in a fixed order.
    pub const ALL: [Plane; 8] = [
        Plane::Raw,
        Plane::Normalized,
        Plane::Clinical,
        Plane::Quarantine,
        Plane::Audit(AuditLog::Broker),
        Plane::Audit(AuditLog::Bridge),
        Plane::Audit(AuditLog::Admin),
        Plane::Audit(AuditLog::Operator),
    ];

    /// The name in the policy file.
    pub fn as_str(self) -> &'static str {
        match self {
            Plane::Raw => "raw",
            Plane::Normalized => "normalized",
            Plane::Clinical => "clinical",
            Plane::Quarantine => "quarantine",
            Plane::Audit(AuditLog::Broker) => "audit:broker",
            Plane::Audit(AuditLog::Bridge) => "audit:bridge",
            Plane::Audit(AuditLog::Admin) => "audit:admin",
            Plane::Audit(AuditLog::Operator) => "audit:operator",
        }
    }

    /// Whether records of the plane carry a purpose (audit records do not).
    pub fn has_purpose(self) -> bool {
        !matches!(self, Plane::Audit(_))
    }
}

impl fmt::Display for Plane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A plane name that is not one of [`Plane::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown plane `{0}` (expected one of raw, normalized, clinical, quarantine, \
     audit:broker, audit:bridge, audit:admin, audit:operator)"
)]
pub struct UnknownPlane(pub String);

impl FromStr for Plane {
    type Err = UnknownPlane;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Plane::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownPlane(s.to_owned()))
    }
}

/// What happens to a record once its class's `keep_for` has passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Delete,
    /// Strip what links the record to a patient, keep the rest.
    Anonymize,
    /// Move the record under this target prefix.
    Archive {
        prefix: String,
    },
}

impl Action {
    /// The name in the policy file.
    pub fn as_str(&self) -> &'static str {
        match self {
            Action::Delete => "delete",
            Action::Anonymize => "anonymize",
            Action::Archive { .. } => "archive",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Archive { prefix } => write!(f, "archive to `{prefix}`"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// How long a record is kept and what is done to it then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionClass {
    /// Whole milliseconds, never zero.
    pub keep_for_ms: u64,
    pub action: Action,
}

impl RetentionClass {
    /// The action, if it is due at `now` for a record of instant `at`: only once
    /// `keep_for` has fully passed; a record from the future is never due.
    pub fn due(&self, at: UnixMillis, now: UnixMillis) -> Option<&Action> {
        let age = now.checked_sub(at)?;
        (age >= self.keep_for_ms).then_some(&self.action)
    }
}

/// One plane's class and its per-purpose overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PlaneClasses {
    default: RetentionClass,
    purposes: BTreeMap<Purpose, RetentionClass>,
}

/// The validated retention policy: a class for every plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionPolicy {
    planes: BTreeMap<Plane, PlaneClasses>,
    sha256: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    format: Spanned<String>,
    #[serde(default)]
    planes: BTreeMap<Spanned<String>, Spanned<RawPlane>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlane {
    keep_for: Option<Spanned<String>>,
    action: Option<Spanned<String>>,
    archive_to: Option<Spanned<String>>,
    #[serde(default)]
    purposes: BTreeMap<Spanned<String>, Spanned<RawClass>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClass {
    keep_for: Option<Spanned<String>>,
    action: Option<Spanned<String>>,
    archive_to: Option<Spanned<String>>,
}

impl RetentionPolicy {
    pub fn load(path: &Path) -> Result<Self, PolicyErrors> {
        Self::parse(&read_policy_file(path)?, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, PolicyErrors> {
        let mut problems = Problems::new(path, text);
        let mut policy = Self {
            planes: BTreeMap::new(),
            sha256: hex::encode(Sha256::digest(text.as_bytes())),
        };
        let raw: RawPolicy = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                problems.toml(&e);
                return problems.finish(policy);
            }
        };
        if raw.format.get_ref() != FORMAT {
            problems.add(
                Some(raw.format.span()),
                "format",
                format!("expected \"{FORMAT}\""),
            );
        }
        for (name, plane_raw) in &raw.planes {
            let field = format!("planes.\"{}\"", name.get_ref());
            let plane = match name.get_ref().parse::<Plane>() {
                Ok(p) => Some(p),
                Err(e) => {
                    problems.add(Some(name.span()), &field, e.to_string());
                    None
                }
            };
            let span = plane_raw.span();
            let plane_raw = plane_raw.get_ref();
            let own = RawClass {
                keep_for: plane_raw.keep_for.clone(),
                action: plane_raw.action.clone(),
                archive_to: plane_raw.archive_to.clone(),
            };
            let default = class(&mut problems, &own, span, &field);
            let mut purposes = BTreeMap::new();
            for (pname, praw) in &plane_raw.purposes {
                let pfield = format!("{field}.purposes.{}", pname.get_ref());
                if plane.is_some_and(|p| !p.has_purpose()) {
                    problems.add(
                        Some(pname.span()),
                        &pfield,
                        "audit records have no purpose; give the plane one class",
                    );
                    continue;
                }
                let purpose = match pname.get_ref().parse::<Purpose>() {
                    Ok(p) => Some(p),
                    Err(e) => {
                        problems.add(Some(pname.span()), &pfield, e.to_string());
                        None
                    }
                };
                let c = class(&mut problems, praw.get_ref(), praw.span(), &pfield);
                if let (Some(p), Some(c)) = (purpose, c) {
                    purposes.insert(p, c);
                }
            }
            if let (Some(plane), Some(default)) = (plane, default) {
                policy
                    .planes
                    .insert(plane, PlaneClasses { default, purposes });
            }
        }
        for plane in Plane::ALL {
            let named = raw
                .planes
                .keys()
                .any(|k| k.get_ref().parse::<Plane>() == Ok(plane));
            if !named {
                problems.add(
                    None,
                    format!("planes.\"{plane}\""),
                    "missing: every plane needs a retention class",
                );
            }
        }
        problems.finish(policy)
    }

    /// The class that applies to a record of `plane` processed for `purpose`: the
    /// purpose's override if the plane has one, else the plane's class.
    pub fn class(&self, plane: Plane, purpose: Option<Purpose>) -> &RetentionClass {
        let classes = self
            .planes
            .get(&plane)
            .expect("a loaded policy has a class for every plane");
        purpose
            .and_then(|p| classes.purposes.get(&p))
            .unwrap_or(&classes.default)
    }

    /// The action due at `now` for a record of `plane` and `purpose` from instant `at`,
    /// if any. Ignores legal holds: use [`crate::disposition`] for the full decision.
    pub fn due(
        &self,
        plane: Plane,
        purpose: Option<Purpose>,
        at: UnixMillis,
        now: UnixMillis,
    ) -> Option<&Action> {
        self.class(plane, purpose).due(at, now)
    }

    /// SHA-256 (hex) of the file's text, for audit records.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }
}

/// Validates one class; every problem is recorded, `None` when there was one.
fn class(
    problems: &mut Problems<'_>,
    raw: &RawClass,
    span: std::ops::Range<usize>,
    field: &str,
) -> Option<RetentionClass> {
    let at = |f: &str| format!("{field}.{f}");
    let keep_for_ms = match &raw.keep_for {
        None => {
            problems.add(Some(span.clone()), at("keep_for"), "missing");
            None
        }
        Some(k) => match humantime::parse_duration(k.get_ref()) {
            Err(e) => {
                problems.add(Some(k.span()), at("keep_for"), e.to_string());
                None
            }
            Ok(d) if d.is_zero() => {
                problems.add(Some(k.span()), at("keep_for"), "must be longer than zero");
                None
            }
            Ok(d) => match u64::try_from(d.as_millis()) {
                Ok(ms) if ms > 0 => Some(ms),
                _ => {
                    problems.add(
                        Some(k.span()),
                        at("keep_for"),
                        "must be at least 1ms and fit in 64-bit milliseconds",
                    );
                    None
                }
            },
        },
    };
    let action = match &raw.action {
        None => {
            problems.add(Some(span), at("action"), "missing");
            None
        }
        Some(a) => match (a.get_ref().as_str(), &raw.archive_to) {
            ("archive", Some(to)) if to.get_ref().trim().is_empty() => {
                problems.add(Some(to.span()), at("archive_to"), "must not be empty");
                None
            }
            ("archive", Some(to)) => Some(Action::Archive {
                prefix: to.get_ref().clone(),
            }),
            ("archive", None) => {
                problems.add(
                    Some(a.span()),
                    at("archive_to"),
                    "archive needs a target prefix",
                );
                None
            }
            (name @ ("delete" | "anonymize"), Some(to)) => {
                problems.add(
                    Some(to.span()),
                    at("archive_to"),
                    format!("only archive has a target; the action is {name}"),
                );
                None
            }
            ("delete", None) => Some(Action::Delete),
            ("anonymize", None) => Some(Action::Anonymize),
            (other, _) => {
                problems.add(
                    Some(a.span()),
                    at("action"),
                    format!("unknown action `{other}` (expected delete, anonymize or archive)"),
                );
                None
            }
        },
    };
    Some(RetentionClass {
        keep_for_ms: keep_for_ms?,
        action: action?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../examples/retention.toml");
    const DAY: u64 = 86_400_000;

    fn example() -> RetentionPolicy {
        RetentionPolicy::parse(EXAMPLE, Path::new("retention.toml")).expect("valid example")
    }

    #[test]
    fn the_example_loads_with_a_class_for_every_plane() {
        let p = example();
        for plane in Plane::ALL {
            assert!(p.class(plane, None).keep_for_ms > 0, "{plane}");
        }
        assert_eq!(p.class(Plane::Raw, None).keep_for_ms, 30 * DAY);
        assert_eq!(p.class(Plane::Raw, None).action, Action::Delete);
        let research = p.class(Plane::Normalized, Some(Purpose::Research));
        assert!(matches!(research.action, Action::Archive { .. }));
        assert_ne!(research, p.class(Plane::Normalized, None));
        // A purpose without an override falls back to the plane's class.
        assert_eq!(
            p.class(Plane::Normalized, Some(Purpose::Surveillance)),
            p.class(Plane::Normalized, None)
        );
    }

    #[test]
    fn an_action_is_due_exactly_once_keep_for_has_passed() {
        let p = example();
        let at = 1_700_000_000_000;
        let keep = p.class(Plane::Raw, None).keep_for_ms;
        assert_eq!(p.due(Plane::Raw, None, at, at + keep - 1), None);
        assert_eq!(
            p.due(Plane::Raw, None, at, at + keep),
            Some(&Action::Delete)
        );
        // A record stamped in the future is never due.
        assert_eq!(p.due(Plane::Raw, None, at + 10 * keep, at), None);
    }

    #[test]
    fn problems_name_file_line_and_field() {
        let text = "format = \"vitalmq-retention/v1\"\n\
                    [planes.raw]\n\
                    keep_for = \"thirty days\"\n\
                    action = \"delete\"\n\
                    [planes.normalized]\n\
                    keep_for = \"1year\"\n\
                    action = \"archive\"\n\
                    [planes.\"audit:broker\"]\n\
                    keep_for = \"6years\"\n\
                    action = \"shred\"\n\
                    [planes.\"audit:admin\".purposes.research]\n\
                    keep_for = \"1day\"\n\
                    action = \"delete\"\n\
                    [planes.clinical.purposes.gossip]\n\
                    keep_for = \"1day\"\n\
                    action = \"delete\"\n";
        let err = RetentionPolicy::parse(text, Path::new("r.toml")).expect_err("invalid");
        let shown = err.to_string();
        for want in [
            "r.toml:3: planes.\"raw\".keep_for:",
            "r.toml:7: planes.\"normalized\".archive_to: archive needs a target",
            "r.toml:10: planes.\"audit:broker\".action: unknown action `shred`",
            "r.toml:11: planes.\"audit:admin\".purposes.research: audit records have no purpose",
            "r.toml:14: planes.\"clinical\".purposes.gossip: unknown purpose",
            "planes.\"quarantine\": missing",
            "planes.\"audit:operator\": missing",
        ] {
            assert!(shown.contains(want), "want `{want}` in:\n{shown}");
        }
        let err = RetentionPolicy::parse("format = \"x\"\n", Path::new("r.toml")).expect_err("x");
        assert!(err.to_string().contains("r.toml:1: format"), "{err}");
    }

    #[test]
    fn zero_keep_for_and_unknown_planes_are_refused() {
        let mut text = String::from("format = \"vitalmq-retention/v1\"\n");
        for plane in Plane::ALL {
            text.push_str(&format!(
                "[planes.\"{plane}\"]\nkeep_for = \"1day\"\naction = \"delete\"\n"
            ));
        }
        RetentionPolicy::parse(&text, Path::new("r.toml")).expect("complete policy loads");
        let zero = text.replacen("\"1day\"", "\"0s\"", 1);
        let err = RetentionPolicy::parse(&zero, Path::new("r.toml")).expect_err("zero");
        assert!(err.to_string().contains("longer than zero"), "{err}");
        let extra = format!("{text}[planes.cold]\nkeep_for = \"1day\"\naction = \"delete\"\n");
        let err = RetentionPolicy::parse(&extra, Path::new("r.toml")).expect_err("plane");
        assert!(err.to_string().contains("unknown plane `cold`"), "{err}");
    }
}
