//! Topic names, topic filters and ACL patterns (MQTT 3.1.1 section 4.7, MQTT 5 section
//! 4.7), matched level by level on `/`: no regex, no allocation on the hot path.
//!
//! A *pattern* is an MQTT filter whose levels may also be identity variables
//! (`{id}`, `{site}`, `{site_device}`); a variable is always a whole level. Two questions
//! are asked of a pattern:
//!
//! - [`Pattern::matches_topic`]: does the pattern match this concrete topic name?
//! - [`Pattern::covers_filter`]: is every topic the filter can match also matched by the
//!   pattern (filter ⊆ pattern)?
//!
//! Both follow the MQTT rule that a topic starting with `$` is never matched by a
//! wildcard (`+` or `#`) in the first level.

/// Longest topic name or filter MQTT can carry (a UTF-8 string with a 16-bit length).
pub(crate) const MAX_TOPIC_BYTES: usize = 65_535;

/// Values the identity variables take for one caller.
pub(crate) trait Bindings {
    /// `{id}`: the caller's id.
    fn id(&self) -> &str;
    /// `{site}`: the caller's site, if it has one.
    fn site(&self) -> Option<&str>;
    /// `{site_device}`: is `level` a device registered at the caller's site?
    /// Only asked when [`Self::site`] is `Some`.
    fn is_site_device(&self, level: &str) -> bool;
}

/// Why a topic name or filter is not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TopicError {
    #[error("is empty")]
    Empty,
    #[error("is longer than 65535 bytes")]
    TooLong,
    #[error("contains a NUL character")]
    Nul,
    /// A topic name (PUBLISH) with `+` or `#`.
    #[error("a topic name cannot contain `+` or `#`")]
    WildcardInName,
    /// `#` that is not alone in the last level, or `+` not alone in its level.
    #[error("`#` must be alone in the last level and `+` alone in its level")]
    MisplacedWildcard,
    /// `$share/<group>/<filter>` with an empty or wildcard group, or no filter.
    #[error("a shared subscription must be `$share/<group>/<filter>`")]
    BadShare,
}

/// Checks a PUBLISH topic name: non-empty, no NUL, no wildcards.
pub(crate) fn check_topic_name(topic: &str) -> Result<(), TopicError> {
    check_common(topic)?;
    if topic.bytes().any(|b| b == b'+' || b == b'#') {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Checks a SUBSCRIBE topic filter (MQTT wildcard syntax).
pub(crate) fn check_topic_filter(filter: &str) -> Result<(), TopicError> {
    check_common(filter)?;
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        if level.contains('#') && (level != "#" || !last) {
            return Err(TopicError::MisplacedWildcard);
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::MisplacedWildcard);
        }
    }
    Ok(())
}

/// Splits an MQTT 5 shared subscription `$share/<group>/<filter>` into its filter; other
/// filters are returned unchanged. The group must be non-empty and wildcard-free.
pub(crate) fn strip_share(filter: &str) -> Result<&str, TopicError> {
    let Some(rest) = filter.strip_prefix("$share/") else {
        return Ok(filter);
    };
    match rest.split_once('/') {
        Some((group, inner))
            if !group.is_empty()
                && !inner.is_empty()
                && !group.bytes().any(|b| b == b'+' || b == b'#') =>
        {
            Ok(inner)
        }
        _ => Err(TopicError::BadShare),
    }
}

fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        Err(TopicError::Empty)
    } else if s.len() > MAX_TOPIC_BYTES {
        Err(TopicError::TooLong)
    } else if s.contains('\0') {
        Err(TopicError::Nul)
    } else {
        Ok(())
    }
}

/// One level of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Level {
    Literal(Box<str>),
    /// `+`
    Plus,
    /// `#`, always the last level.
    Hash,
    /// `{id}`
    Id,
    /// `{site}`
    Site,
    /// `{site_device}`
    SiteDevice,
}

/// Why an ACL pattern is not acceptable; levels are shown escaped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PatternError {
    #[error("pattern {0}")]
    Topic(#[from] TopicError),
    #[error("`#` must be the last level")]
    HashNotLast,
    #[error("level `{0}`: `+` and `#` must be alone in their level")]
    Wildcard(String),
    #[error("unknown variable `{0}` (known: {VARIABLES})")]
    UnknownVariable(String),
    #[error("level `{0}`: a variable must be a whole level, e.g. `devices/{{id}}/status`")]
    PartialVariable(String),
}

/// A validated ACL pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pattern {
    levels: Box<[Level]>,
    has_site_device: bool,
    needs_site: bool,
}

/// The variables a pattern may use, as written.
pub(crate) const VARIABLES: &str = "{id}, {site}, {site_device}";

impl Pattern {
    /// Parses pattern text; the error becomes a policy problem's message.
    pub(crate) fn parse(text: &str) -> Result<Self, PatternError> {
        check_common(text)?;
        let mut levels = Vec::new();
        let mut iter = text.split('/').peekable();
        while let Some(level) = iter.next() {
            let last = iter.peek().is_none();
            let shown = || level.escape_debug().to_string();
            let parsed = match level {
                "#" if last => Level::Hash,
                "#" => return Err(PatternError::HashNotLast),
                "+" => Level::Plus,
                "{id}" => Level::Id,
                "{site}" => Level::Site,
                "{site_device}" => Level::SiteDevice,
                _ if level.contains(['+', '#']) => return Err(PatternError::Wildcard(shown())),
                _ if level.starts_with('{') && level.ends_with('}') => {
                    return Err(PatternError::UnknownVariable(shown()));
                }
                _ if level.contains(['{', '}']) => {
                    return Err(PatternError::PartialVariable(shown()));
                }
                _ => Level::Literal(level.into()),
            };
            levels.push(parsed);
        }
        let has_site_device = levels.contains(&Level::SiteDevice);
        let needs_site = has_site_device || levels.contains(&Level::Site);
        Ok(Self {
            levels: levels.into_boxed_slice(),
            has_site_device,
            needs_site,
        })
    }

    /// Does the pattern use `{site}` or `{site_device}`?
    pub(crate) fn needs_site(&self) -> bool {
        self.needs_site
    }

    /// Does the pattern match the concrete topic name? `topic` must already have passed
    /// [`check_topic_name`].
    pub(crate) fn matches_topic(&self, topic: &str, b: &impl Bindings) -> bool {
        if self.needs_site && b.site().is_none() {
            return false;
        }
        let dollar = topic.starts_with('$');
        let mut levels = topic.split('/');
        for (i, p) in self.levels.iter().enumerate() {
            if *p == Level::Hash {
                // `#` also matches the parent level: `a/#` matches `a`.
                return !(i == 0 && dollar);
            }
            let Some(t) = levels.next() else {
                return false;
            };
            let ok = match p {
                Level::Plus => !(i == 0 && dollar),
                Level::Literal(l) => **l == *t,
                Level::Id => t == b.id(),
                Level::Site => b.site() == Some(t),
                // Checked in the second pass, once everything cheap has matched.
                Level::SiteDevice => !t.is_empty(),
                Level::Hash => return false,
            };
            if !ok {
                return false;
            }
        }
        if levels.next().is_some() {
            return false;
        }
        !self.has_site_device || self.site_devices_ok(topic, b)
    }

    /// Is every topic matched by `filter` also matched by the pattern? `filter` must
    /// already have passed [`check_topic_filter`].
    pub(crate) fn covers_filter(&self, filter: &str, b: &impl Bindings) -> bool {
        if self.needs_site && b.site().is_none() {
            return false;
        }
        let dollar = filter.starts_with('$');
        let mut levels = filter.split('/');
        for (i, p) in self.levels.iter().enumerate() {
            if *p == Level::Hash {
                return !(i == 0 && dollar);
            }
            let Some(f) = levels.next() else {
                // The filter stops here; the pattern still requires a level.
                return false;
            };
            let ok = match (p, f) {
                // A filter `#` matches zero or more levels, but never so few that the
                // topic name would be empty: at the top, and right under an empty first
                // level (`/#` cannot match the empty topic ""), it means one or more.
                // Only a pattern `#` covers that, or `+/#` there.
                (Level::Plus, "#") if i == 0 || (i == 1 && filter.starts_with('/')) => {
                    return self.levels.get(i + 1) == Some(&Level::Hash);
                }
                (_, "#") => false,
                (Level::Plus, _) => !(i == 0 && dollar),
                // A filter `+` is covered only by a pattern `+` (or `#`).
                (_, "+") => false,
                (Level::Literal(l), f) => **l == *f,
                (Level::Id, f) => f == b.id(),
                (Level::Site, f) => b.site() == Some(f),
                (Level::SiteDevice, f) => !f.is_empty(),
                (Level::Hash, _) => return false,
            };
            if !ok {
                return false;
            }
        }
        if levels.next().is_some() {
            return false;
        }
        !self.has_site_device || self.site_devices_ok(filter, b)
    }

    /// Second pass: the levels under `{site_device}` name devices of the caller's site.
    /// `text` has already matched level by level, so the zip lines up.
    fn site_devices_ok(&self, text: &str, b: &impl Bindings) -> bool {
        self.levels
            .iter()
            .zip(text.split('/'))
            .all(|(p, t)| *p != Level::SiteDevice || b.is_site_device(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bindings for tests: `{id}` = dev-1, `{site}` = site-01 whose devices are dev-1 and
    /// dev-2.
    pub(super) struct Fixed {
        pub(super) id: &'static str,
        pub(super) site: Option<&'static str>,
    }

    impl Bindings for Fixed {
        fn id(&self) -> &str {
            self.id
        }
        fn site(&self) -> Option<&str> {
            self.site
        }
        fn is_site_device(&self, level: &str) -> bool {
            self.site == Some("site-01") && matches!(level, "dev-1" | "dev-2")
        }
    }

    const B: Fixed = Fixed {
        id: "dev-1",
        site: Some("site-01"),
    };
    const NO_SITE: Fixed = Fixed {
        id: "dev-1",
        site: None,
    };

    fn pat(s: &str) -> Pattern {
        Pattern::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn topic_names_are_checked() {
        assert_eq!(check_topic_name("a/b"), Ok(()));
        assert_eq!(check_topic_name("/"), Ok(()));
        assert_eq!(check_topic_name(""), Err(TopicError::Empty));
        assert_eq!(check_topic_name("a/\0"), Err(TopicError::Nul));
        assert_eq!(check_topic_name("a/+"), Err(TopicError::WildcardInName));
        assert_eq!(check_topic_name("a/#"), Err(TopicError::WildcardInName));
        assert_eq!(check_topic_name("a/b#"), Err(TopicError::WildcardInName));
        let long = "a".repeat(MAX_TOPIC_BYTES + 1);
        assert_eq!(check_topic_name(&long), Err(TopicError::TooLong));
    }

    #[test]
    fn topic_filters_are_checked() {
        for ok in [
            "#", "+", "a/#", "+/+", "a/+/b", "/", "a//b", "+/#", "$SYS/#",
        ] {
            assert_eq!(check_topic_filter(ok), Ok(()), "{ok}");
        }
        for bad in ["a/#/b", "a#", "a/b#", "a+/b", "a/+b", "#/a", "##"] {
            assert_eq!(
                check_topic_filter(bad),
                Err(TopicError::MisplacedWildcard),
                "{bad}"
            );
        }
        assert_eq!(check_topic_filter(""), Err(TopicError::Empty));
        assert_eq!(check_topic_filter("a\0"), Err(TopicError::Nul));
    }

    #[test]
    fn shared_subscriptions_are_unwrapped() {
        assert_eq!(strip_share("$share/g/a/+"), Ok("a/+"));
        assert_eq!(strip_share("a/+"), Ok("a/+"));
        assert_eq!(strip_share("$share//a"), Err(TopicError::BadShare));
        assert_eq!(strip_share("$share/g+/a"), Err(TopicError::BadShare));
        assert_eq!(strip_share("$share/g"), Err(TopicError::BadShare));
        assert_eq!(strip_share("$share/g/"), Err(TopicError::BadShare));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for (bad, needle) in [
            ("a/{foo}", "unknown variable `{foo}`"),
            ("a/#/b", "`#` must be the last level"),
            ("a/b+", "must be alone"),
            ("dev-{id}", "whole level"),
            ("", "empty"),
        ] {
            let err = Pattern::parse(bad).expect_err(bad).to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn topics_match_patterns() {
        let cases = [
            ("devices/{id}/telemetry", "devices/dev-1/telemetry", true),
            ("devices/{id}/telemetry", "devices/dev-2/telemetry", false),
            ("devices/{id}/telemetry", "devices/dev-1/telemetry/x", false),
            ("devices/{id}/telemetry", "devices/dev-1", false),
            ("devices/{site_device}/status", "devices/dev-2/status", true),
            (
                "devices/{site_device}/status",
                "devices/dev-3/status",
                false,
            ),
            ("alerts/{site}/#", "alerts/site-01/urgent/dev-1", true),
            ("alerts/{site}/#", "alerts/site-01", true),
            ("alerts/{site}/#", "alerts/site-02/urgent/dev-1", false),
            ("a/+/c", "a//c", true),
            ("a/+", "a/b/c", false),
            ("#", "anything/at/all", true),
            ("#", "$SYS/broker", false),
            ("+/broker", "$SYS/broker", false),
            ("$SYS/#", "$SYS/broker", true),
            ("$SYS/broker", "$SYS/broker", true),
        ];
        for (p, t, want) in cases {
            assert_eq!(pat(p).matches_topic(t, &B), want, "{p} vs {t}");
        }
        assert!(!pat("alerts/{site}/#").matches_topic("alerts/site-01/x", &NO_SITE));
        assert!(!pat("devices/{site_device}/ack").matches_topic("devices/dev-1/ack", &NO_SITE));
    }

    #[test]
    fn filters_are_covered_only_when_every_topic_is() {
        let cases = [
            ("devices/+/telemetry", "devices/+/telemetry", true),
            ("devices/+/telemetry", "devices/dev-9/telemetry", true),
            ("devices/+/telemetry", "devices/#", false),
            ("devices/+/telemetry", "devices/+/+", false),
            ("devices/{id}/config", "devices/dev-1/config", true),
            ("devices/{id}/config", "devices/+/config", false),
            ("devices/{id}/config", "#", false),
            ("devices/{site_device}/ack", "devices/+/ack", false),
            ("devices/{site_device}/ack", "devices/dev-1/ack", true),
            ("devices/{site_device}/ack", "devices/dev-3/ack", false),
            ("alerts/{site}/#", "alerts/site-01/#", true),
            ("alerts/{site}/#", "alerts/site-01/urgent/+", true),
            ("alerts/{site}/#", "alerts/site-01", true),
            ("alerts/{site}/#", "alerts/+/urgent/#", false),
            ("alerts/{site}/#", "alerts/#", false),
            ("alerts/#", "alerts/#", true),
            ("alerts/#", "alerts", true),
            ("alerts/#", "#", false),
            ("a/+/#", "a/#", false),
            ("a/+/#", "a/+", true),
            ("a/b", "a", false),
            ("a", "a/b", false),
            ("#", "#", true),
            ("+/#", "#", true),
            ("+/+/#", "#", false),
            ("a/+/#", "a/#", false),
            ("#", "$SYS/#", false),
            ("+/#", "$SYS/x", false),
            ("$SYS/#", "$SYS/#", true),
        ];
        for (p, f, want) in cases {
            assert_eq!(pat(p).covers_filter(f, &B), want, "{p} vs {f}");
        }
        assert!(!pat("alerts/{site}/#").covers_filter("alerts/site-01/#", &NO_SITE));
    }

    mod props {
        use super::super::*;
        use super::{B, pat};
        use proptest::prelude::*;

        fn level(wild: bool) -> impl Strategy<Value = String> {
            let lits = prop_oneof![
                Just("a".to_owned()),
                Just("b".to_owned()),
                Just(String::new()),
                Just("$s".to_owned()),
            ];
            if wild {
                prop_oneof![3 => lits, 1 => Just("+".to_owned())].boxed()
            } else {
                lits.boxed()
            }
        }

        /// A filter (or a variable-free pattern): up to 4 levels, maybe a final `#`.
        fn filter() -> impl Strategy<Value = String> {
            (prop::collection::vec(level(true), 0..4), any::<bool>()).prop_filter_map(
                "non-empty",
                |(mut levels, hash)| {
                    if hash {
                        levels.push("#".to_owned());
                    }
                    let text = levels.join("/");
                    (!text.is_empty()).then_some(text)
                },
            )
        }

        /// Every non-empty topic over a small alphabet, up to 6 levels (a fresh literal
        /// `z` stands for "anything else").
        static TOPICS: std::sync::LazyLock<Vec<String>> =
            std::sync::LazyLock::new(|| all_topics(6));

        fn all_topics(max: usize) -> Vec<String> {
            let alphabet = ["a", "b", "", "$s", "z"];
            let mut out = Vec::new();
            let mut frontier = vec![Vec::<&str>::new()];
            for _ in 0..max {
                let mut next = Vec::new();
                for prefix in &frontier {
                    for l in alphabet {
                        let mut t = prefix.clone();
                        t.push(l);
                        let topic = t.join("/");
                        if !topic.is_empty() {
                            out.push(topic);
                        }
                        next.push(t);
                    }
                }
                frontier = next;
            }
            out
        }

        proptest! {
            /// filter ⊆ pattern exactly when every topic the filter matches, the pattern
            /// matches (checked over every topic of up to 6 levels, which includes a
            /// witness whenever coverage fails).
            #[test]
            fn covers_agrees_with_brute_force(p in filter(), f in filter()) {
                let pattern = pat(&p);
                let as_filter = pat(&f);
                let covered = pattern.covers_filter(&f, &B);
                let brute = TOPICS.iter().all(|t| {
                    !as_filter.matches_topic(t, &B) || pattern.matches_topic(t, &B)
                });
                prop_assert_eq!(covered, brute, "pattern {} filter {}", p, f);
            }

            /// Filter syntax checking accepts exactly what the pattern parser accepts for
            /// wildcard-only text.
            #[test]
            fn filter_check_agrees_with_pattern_parse(levels in prop::collection::vec(
                prop_oneof![Just("a"), Just("+"), Just("#"), Just("a#"), Just("+b"), Just("")], 1..5)
            ) {
                let f = levels.join("/");
                prop_assert_eq!(check_topic_filter(&f).is_ok(), Pattern::parse(&f).is_ok(), "{}", f);
            }
        }
    }
}
