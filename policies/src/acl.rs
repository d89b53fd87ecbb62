//! The topic ACL (SPEC sections 1 and 2): who may connect, publish and subscribe, and the
//! per-role rate limits.
//!
//! The file is TOML (`vitalmq-acl/v1`); `policies/examples/acl.toml` is the shipped
//! default and documents every field. It is parsed into raw serde types, then validated
//! into an [`AclPolicy`]; every problem is reported at once with file, line and field.
//!
//! Decisions are pure functions of the policy, the caller's [`SpiffeId`], the topic and the
//! [`DeviceRegistry`]: default deny, first matching rule wins, and the [`Decision`] names
//! the rule (for audit) or the reason for the denial (see the `Decision::*` constants).
//!
//! Patterns are MQTT filters whose levels may be identity variables:
//! `{id}` (the caller's id), `{site}` (the caller's registered site) and `{site_device}`
//! (any device registered at the caller's site, looked up per call). A publish topic is
//! allowed when a publish pattern matches it; a subscribe filter is allowed only when one
//! subscribe pattern matches every topic the filter can match (filter ⊆ pattern).

mod topic;

use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::Spanned;
use vitalmq_envelope::DeviceId;

use crate::error::{PolicyErrors, Problems};
use crate::identity::{Role, SpiffeId};
use crate::registry::{DeviceRegistry, SiteId};

use topic::{Bindings, Pattern};
use topic::{check_topic_filter, check_topic_name, strip_share};

const FORMAT: &str = "vitalmq-acl/v1";

/// Largest payload an MQTT packet can carry (its remaining length is at most 268,435,455).
const MAX_PACKET: u64 = 268_435_455;

/// What to do with a denied PUBLISH on an MQTT 3.1.1 connection (MQTT 5 always answers
/// with reason 0x87). SPEC section 2: disconnect unless the policy says otherwise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeniedPublishV311 {
    /// Close the connection.
    #[default]
    Disconnect,
    /// Acknowledge the PUBLISH (PUBACK for QoS 1) and drop it.
    AckAndDrop,
}

/// What to do with a PUBLISH that has the retain flag set on a device's telemetry or
/// status topic (SPEC section 2: `devices/{id}/telemetry`, `devices/{id}/status`).
/// Telemetry is a stream of signed readings for the bridge; a retained copy would be
/// handed to every later subscriber as if it were current.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetainedTelemetry {
    /// Clear the retain flag and route the message (the reading still reaches the
    /// bridge; the first stripped message of a connection is audited).
    #[default]
    Strip,
    /// Close the connection (MQTT 5: DISCONNECT 0x9A, retain not supported), audited.
    Refuse,
}

/// Rate and size limits for one role, applied per connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct RoleLimits {
    /// Largest PUBLISH payload accepted.
    pub max_payload_bytes: usize,
    /// Sustained PUBLISH rate.
    pub messages_per_second: u32,
    /// Sustained payload bytes per second.
    pub bytes_per_second: u64,
    /// Messages that may arrive at once above the sustained rate (token-bucket depth).
    pub burst: u32,
    /// Most topic filters one SUBSCRIBE may carry; a larger one is refused as a whole.
    pub max_subscribe_filters: usize,
    /// Sustained SUBSCRIBE rate (packets, not filters).
    pub subscribes_per_second: u32,
    /// SUBSCRIBE packets that may arrive at once above the sustained rate.
    pub subscribe_burst: u32,
}

impl RoleLimits {
    /// Upper bound of `max_subscribe_filters`.
    pub(crate) const MAX_SUBSCRIBE_FILTERS: u64 = 65_535;

    /// `max_subscribe_filters` when the policy does not say: a device needs two
    /// filters (config, ack); a gateway subscribes to one ack topic per device of its
    /// site in one SUBSCRIBE (`device-sim/src/gateway.rs`); the others need a handful.
    pub(crate) const fn default_max_subscribe_filters(role: Role) -> u64 {
        match role {
            Role::Device => 16,
            Role::Gateway => 4_096,
            Role::Bridge | Role::Integrator | Role::Operator => 64,
        }
    }

    /// `subscribes_per_second` when the policy does not say. Clients subscribe after
    /// each CONNACK; the bridge sends one SUBSCRIBE per filter.
    pub(crate) const DEFAULT_SUBSCRIBES_PER_SECOND: u32 = 10;
    /// `subscribe_burst` when the policy does not say.
    pub(crate) const DEFAULT_SUBSCRIBE_BURST: u32 = 50;
}

/// The answer to one authorization question.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Decision {
    pub allowed: bool,
    /// The rule that allowed it (e.g. `device-own-telemetry`, `device.connect`), or why it
    /// was denied (one of the `Decision::*` reason constants).
    pub rule: String,
}

impl Decision {
    /// No rule allows it.
    pub const DEFAULT_DENY: &'static str = "default-deny";
    /// The policy has `connect = false` for the caller's role.
    pub const ROLE_DISABLED: &'static str = "role-disabled";
    /// A device not in the registry, a gateway or integrator without a registered site,
    /// or an operator the registry does not list.
    pub const NOT_REGISTERED: &'static str = "not-registered";
    /// The caller's trust domain is not the registry's.
    pub const TRUST_DOMAIN: &'static str = "trust-domain-mismatch";
    /// A PUBLISH topic that is empty, too long, has NUL or a wildcard.
    pub const INVALID_TOPIC: &'static str = "invalid-topic";
    /// A SUBSCRIBE filter that breaks MQTT filter syntax.
    pub const INVALID_FILTER: &'static str = "invalid-filter";

    /// Every reason a decision can be denied with; no rule may use these names.
    pub(crate) const REASONS: [&'static str; 6] = [
        Self::DEFAULT_DENY,
        Self::ROLE_DISABLED,
        Self::NOT_REGISTERED,
        Self::TRUST_DOMAIN,
        Self::INVALID_TOPIC,
        Self::INVALID_FILTER,
    ];

    fn allow(rule: &str) -> Self {
        Self {
            allowed: true,
            rule: rule.to_owned(),
        }
    }

    fn deny(reason: &'static str) -> Self {
        Self {
            allowed: false,
            rule: reason.to_owned(),
        }
    }
}

/// A named rule.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    name: Box<str>,
    pattern_text: Box<str>,
    pattern: Pattern,
}

/// Everything the policy says about one role.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct RolePolicy {
    connect: bool,
    limits: RoleLimits,
    publish: Vec<Rule>,
    subscribe: Vec<Rule>,
}

/// A validated, immutable ACL policy; share it in an `Arc` and swap the `Arc` on reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclPolicy {
    sha256: String,
    cn_fallback: bool,
    denied_publish_v311: DeniedPublishV311,
    retained_telemetry: RetainedTelemetry,
    /// Indexed by [`role_index`].
    roles: [RolePolicy; 5],
}

fn role_index(role: Role) -> usize {
    match role {
        Role::Device => 0,
        Role::Gateway => 1,
        Role::Bridge => 2,
        Role::Integrator => 3,
        Role::Operator => 4,
    }
}

// ---- the file as written ---------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    format: Spanned<String>,
    #[serde(default)]
    cn_fallback: bool,
    #[serde(default)]
    denied_publish_v311: DeniedPublishV311,
    #[serde(default)]
    retained_telemetry: RetainedTelemetry,
    roles: RawRoles,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoles {
    device: Option<Spanned<RawRole>>,
    gateway: Option<Spanned<RawRole>>,
    bridge: Option<Spanned<RawRole>>,
    integrator: Option<Spanned<RawRole>>,
    operator: Option<Spanned<RawRole>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRole {
    connect: bool,
    limits: Option<Spanned<RawLimits>>,
    #[serde(default)]
    publish: Vec<Spanned<RawRule>>,
    #[serde(default)]
    subscribe: Vec<Spanned<RawRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_payload_bytes: u64,
    messages_per_second: u32,
    bytes_per_second: u64,
    burst: u32,
    /// Optional, so policy files written before these limits existed stay valid.
    max_subscribe_filters: Option<u64>,
    subscribes_per_second: Option<u32>,
    subscribe_burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<Spanned<String>>,
    pattern: Spanned<String>,
}

// ---- loading and validation ------------------------------------------------------------

impl AclPolicy {
    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyErrors> {
        let text = crate::error::read_policy_file(path)?;
        Self::parse(&text, path)
    }

    /// Validates policy text; `path` is used in error messages only. The hash is of
    /// `text`'s bytes, i.e. the file as loaded.
    pub fn parse(text: &str, path: &Path) -> Result<Self, PolicyErrors> {
        let mut problems = Problems::new(path, text);
        let mut policy = Self {
            sha256: hex::encode(Sha256::digest(text.as_bytes())),
            cn_fallback: false,
            denied_publish_v311: DeniedPublishV311::Disconnect,
            retained_telemetry: RetainedTelemetry::Strip,
            roles: Default::default(),
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
        policy.cn_fallback = raw.cn_fallback;
        policy.denied_publish_v311 = raw.denied_publish_v311;
        policy.retained_telemetry = raw.retained_telemetry;

        let mut names = std::collections::BTreeMap::<String, String>::new();
        let RawRoles {
            device,
            gateway,
            bridge,
            integrator,
            operator,
        } = raw.roles;
        for (role, entry) in [
            (Role::Device, device),
            (Role::Gateway, gateway),
            (Role::Bridge, bridge),
            (Role::Integrator, integrator),
            (Role::Operator, operator),
        ] {
            let Some(entry) = entry else {
                problems.add(
                    None,
                    format!("roles.{role}"),
                    "missing: every role must be stated (use `connect = false` to refuse it)",
                );
                continue;
            };
            let span = entry.span();
            let raw_role = entry.into_inner();
            policy.roles[role_index(role)] =
                validate_role(role, raw_role, span, &mut names, &mut problems);
        }
        problems.finish(policy)
    }
}

fn validate_role(
    role: Role,
    raw: RawRole,
    span: std::ops::Range<usize>,
    names: &mut std::collections::BTreeMap<String, String>,
    problems: &mut Problems<'_>,
) -> RolePolicy {
    let mut out = RolePolicy {
        connect: raw.connect,
        ..RolePolicy::default()
    };
    match raw.limits {
        Some(limits) => out.limits = validate_limits(role, &limits, problems),
        None if raw.connect => problems.add(
            Some(span),
            format!("roles.{role}.limits"),
            "missing: a role that may connect needs limits",
        ),
        None => {}
    }
    for (kind, rules) in [("publish", raw.publish), ("subscribe", raw.subscribe)] {
        let mut valid = Vec::with_capacity(rules.len());
        for (i, rule) in rules.into_iter().enumerate() {
            let field = format!("roles.{role}.{kind}[{i}]");
            let rule_span = rule.span();
            let rule = rule.into_inner();
            let name = match &rule.name {
                Some(name) => {
                    let text = name.get_ref();
                    if let Err(why) = check_rule_name(text) {
                        problems.add(Some(name.span()), format!("{field}.name"), why.to_string());
                    }
                    (text.clone(), Some(name.span()))
                }
                None => (format!("{role}.{kind}[{i}]"), Some(rule_span.clone())),
            };
            if let Some(first) = names.get(&name.0) {
                problems.add(
                    name.1,
                    format!("{field}.name"),
                    format!("rule name `{}` is already used by {first}", name.0),
                );
            } else {
                names.insert(name.0.clone(), field.clone());
            }
            let pattern_field = format!("{field}.pattern");
            let text = rule.pattern.get_ref();
            match Pattern::parse(text) {
                Ok(pattern) => {
                    if pattern.needs_site() && matches!(role, Role::Bridge | Role::Operator) {
                        problems.add(
                            Some(rule.pattern.span()),
                            pattern_field,
                            format!(
                                "a {role} has no site, so {{site}} and {{site_device}} would never match"
                            ),
                        );
                    } else {
                        valid.push(Rule {
                            name: name.0.into(),
                            pattern_text: text.as_str().into(),
                            pattern,
                        });
                    }
                }
                Err(why) => problems.add(Some(rule.pattern.span()), pattern_field, why.to_string()),
            }
        }
        if kind == "publish" {
            out.publish = valid;
        } else {
            out.subscribe = valid;
        }
    }
    out
}

fn validate_limits(
    role: Role,
    limits: &Spanned<RawLimits>,
    problems: &mut Problems<'_>,
) -> RoleLimits {
    let span = Some(limits.span());
    let l = limits.get_ref();
    let field = |name: &str| format!("roles.{role}.limits.{name}");
    if l.max_payload_bytes == 0 || l.max_payload_bytes > MAX_PACKET {
        problems.add(
            span.clone(),
            field("max_payload_bytes"),
            format!("must be between 1 and {MAX_PACKET}"),
        );
    }
    if l.messages_per_second == 0 {
        problems.add(
            span.clone(),
            field("messages_per_second"),
            "must be at least 1",
        );
    }
    if l.burst == 0 {
        problems.add(span.clone(), field("burst"), "must be at least 1");
    }
    if l.bytes_per_second < l.max_payload_bytes {
        problems.add(
            span.clone(),
            field("bytes_per_second"),
            "must be at least max_payload_bytes, or a largest message could never pass",
        );
    }
    let max_filters = l
        .max_subscribe_filters
        .unwrap_or(RoleLimits::default_max_subscribe_filters(role));
    if max_filters == 0 || max_filters > RoleLimits::MAX_SUBSCRIBE_FILTERS {
        problems.add(
            span.clone(),
            field("max_subscribe_filters"),
            format!(
                "must be between 1 and {}",
                RoleLimits::MAX_SUBSCRIBE_FILTERS
            ),
        );
    }
    let subscribes = l
        .subscribes_per_second
        .unwrap_or(RoleLimits::DEFAULT_SUBSCRIBES_PER_SECOND);
    if subscribes == 0 {
        problems.add(
            span.clone(),
            field("subscribes_per_second"),
            "must be at least 1",
        );
    }
    let subscribe_burst = l
        .subscribe_burst
        .unwrap_or(RoleLimits::DEFAULT_SUBSCRIBE_BURST);
    if subscribe_burst == 0 {
        problems.add(span, field("subscribe_burst"), "must be at least 1");
    }
    RoleLimits {
        max_payload_bytes: usize::try_from(l.max_payload_bytes).unwrap_or(usize::MAX),
        messages_per_second: l.messages_per_second,
        bytes_per_second: l.bytes_per_second,
        burst: l.burst,
        max_subscribe_filters: usize::try_from(max_filters).unwrap_or(usize::MAX),
        subscribes_per_second: subscribes,
        subscribe_burst,
    }
}

/// Why a rule name cannot be used.
#[derive(Debug, thiserror::Error)]
enum BadRuleName {
    #[error("a rule name must match [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}")]
    Grammar,
    #[error("`{0}` is reserved for decisions the broker makes")]
    Reserved(String),
}

/// Rule names are audit keys: `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`, not a denial reason and
/// not a derived `<role>.connect` name.
fn check_rule_name(name: &str) -> Result<(), BadRuleName> {
    crate::rules::check_name(name, 64).map_err(|_| BadRuleName::Grammar)?;
    let connect = Role::ALL
        .iter()
        .any(|r| name.strip_prefix(r.as_str()) == Some(".connect"));
    if Decision::REASONS.contains(&name) || connect {
        return Err(BadRuleName::Reserved(name.to_owned()));
    }
    Ok(())
}

/// Is `topic` a device's telemetry or status topic (`devices/{id}/telemetry`,
/// `devices/{id}/status`, SPEC section 2), the topics [`RetainedTelemetry`] is about?
pub fn is_telemetry_topic(topic: &str) -> bool {
    let mut levels = topic.split('/');
    matches!(
        (levels.next(), levels.next(), levels.next(), levels.next()),
        (Some("devices"), Some(id), Some("telemetry" | "status"), None) if !id.is_empty()
    )
}

// ---- decisions -------------------------------------------------------------------------

/// The caller, with its variables resolved through the registry.
struct Subject<'a> {
    id: &'a str,
    site: Option<&'a SiteId>,
    registry: &'a DeviceRegistry,
}

impl Bindings for Subject<'_> {
    fn id(&self) -> &str {
        self.id
    }

    fn site(&self) -> Option<&str> {
        self.site.map(SiteId::as_str)
    }

    fn is_site_device(&self, level: &str) -> bool {
        let Some(site) = self.site else {
            return false;
        };
        // Not a device id means not a device; no lookup needed. A retired device is no
        // longer any site's (issue 19): a gateway may not relay for it.
        DeviceId::new(level)
            .ok()
            .and_then(|id| self.registry.device(&id))
            .is_some_and(|d| d.site == *site && !self.registry.retired_now(&d.id))
    }
}

impl AclPolicy {
    /// SHA-256 of the file bytes as loaded, lowercase hex.
    pub fn sha256_hex(&self) -> &str {
        &self.sha256
    }

    /// May a certificate without a SPIFFE URI be identified by its Common Name? (SPEC
    /// section 1: only when enabled explicitly.)
    pub fn cn_fallback(&self) -> bool {
        self.cn_fallback
    }

    pub fn denied_publish_v311(&self) -> DeniedPublishV311 {
        self.denied_publish_v311
    }

    pub fn retained_telemetry(&self) -> RetainedTelemetry {
        self.retained_telemetry
    }

    pub fn limits(&self, role: Role) -> &RoleLimits {
        &self.roles[role_index(role)].limits
    }

    fn role(&self, role: Role) -> &RolePolicy {
        &self.roles[role_index(role)]
    }

    /// Checks trust domain, the role's `connect` and registration, and resolves `{site}`.
    fn admit<'a>(
        &self,
        who: &'a SpiffeId,
        registry: &'a DeviceRegistry,
    ) -> Result<Subject<'a>, Decision> {
        if who.trust_domain != *registry.trust_domain() {
            return Err(Decision::deny(Decision::TRUST_DOMAIN));
        }
        if !self.role(who.role).connect {
            return Err(Decision::deny(Decision::ROLE_DISABLED));
        }
        let site = match who.role {
            Role::Device => Some(
                registry
                    .device(&who.id.to_device_id())
                    .map(|d| &d.site)
                    .ok_or_else(|| Decision::deny(Decision::NOT_REGISTERED))?,
            ),
            Role::Gateway => Some(
                registry
                    .gateway_site(&who.id)
                    .ok_or_else(|| Decision::deny(Decision::NOT_REGISTERED))?,
            ),
            Role::Integrator => Some(
                registry
                    .integrator_site(&who.id)
                    .ok_or_else(|| Decision::deny(Decision::NOT_REGISTERED))?,
            ),
            // Operators are enrolled in the registry (no site: they see every site).
            Role::Operator => {
                if !registry.is_operator(&who.id) {
                    return Err(Decision::deny(Decision::NOT_REGISTERED));
                }
                None
            }
            Role::Bridge => None,
        };
        Ok(Subject {
            id: who.id.as_str(),
            site,
            registry,
        })
    }

    /// May this identity connect? Allowed decisions are named `<role>.connect`.
    pub fn connect(&self, who: &SpiffeId, registry: &DeviceRegistry) -> Decision {
        match self.admit(who, registry) {
            Ok(_) => Decision {
                allowed: true,
                rule: format!("{}.connect", who.role),
            },
            Err(denied) => denied,
        }
    }

    /// May this identity publish to this concrete topic name?
    pub fn publish(&self, who: &SpiffeId, topic: &str, registry: &DeviceRegistry) -> Decision {
        if check_topic_name(topic).is_err() {
            return Decision::deny(Decision::INVALID_TOPIC);
        }
        let subject = match self.admit(who, registry) {
            Ok(s) => s,
            Err(denied) => return denied,
        };
        self.role(who.role)
            .publish
            .iter()
            .find(|r| r.pattern.matches_topic(topic, &subject))
            .map_or_else(
                || Decision::deny(Decision::DEFAULT_DENY),
                |r| Decision::allow(&r.name),
            )
    }

    /// May this identity subscribe to this filter? Only if one subscribe pattern matches
    /// every topic the filter can match. `$share/<group>/<filter>` is judged by `<filter>`.
    pub fn subscribe(&self, who: &SpiffeId, filter: &str, registry: &DeviceRegistry) -> Decision {
        let Ok(filter) = strip_share(filter) else {
            return Decision::deny(Decision::INVALID_FILTER);
        };
        if check_topic_filter(filter).is_err() {
            return Decision::deny(Decision::INVALID_FILTER);
        }
        let subject = match self.admit(who, registry) {
            Ok(s) => s,
            Err(denied) => return denied,
        };
        self.role(who.role)
            .subscribe
            .iter()
            .find(|r| r.pattern.covers_filter(filter, &subject))
            .map_or_else(
                || Decision::deny(Decision::DEFAULT_DENY),
                |r| Decision::allow(&r.name),
            )
    }

    /// The rules of one role as `(kind, name, pattern)` with kind `publish` or
    /// `subscribe`, in file order, publish rules first; for listings and audit.
    pub fn rules(&self, role: Role) -> impl Iterator<Item = (&str, &str, &str)> {
        let r = self.role(role);
        r.publish
            .iter()
            .map(|x| ("publish", &*x.name, &*x.pattern_text))
            .chain(
                r.subscribe
                    .iter()
                    .map(|x| ("subscribe", &*x.name, &*x.pattern_text)),
            )
    }

    /// May this role connect at all (before registration checks)?
    #[cfg(test)]
    pub(crate) fn role_may_connect(&self, role: Role) -> bool {
        self.role(role).connect
    }
}

#[cfg(test)]
mod tests;
