//! Tests of the shipped policy against every row of SPEC section 2, and of error reporting.

use super::*;
use crate::identity::{PrincipalId, TrustDomain};

const EXAMPLE: &str = include_str!("../../examples/acl.toml");
const KEY: &str = "50163016231421c3895b50daa2c884654e188d01a090529bbddd36d151e50d2f";

fn registry() -> DeviceRegistry {
    let device = |id: &str, site: &str| {
        format!(
            "[[devices]]\nid = \"{id}\"\nsite = \"{site}\"\npatient_ref = \"pt-{id}\"\nalg = \"EdDSA\"\npublic_key = \"{KEY}\"\n"
        )
    };
    let text = format!(
        "format = \"vitalmq-registry/v1\"\ntrust_domain = \"demo.vitalmq\"\n{}{}{}\
         [[gateways]]\nid = \"gw-01\"\nsite = \"site-01\"\n\
         [[gateways]]\nid = \"gw-02\"\nsite = \"site-02\"\n\
         [[integrators]]\nid = \"int-01\"\nsite = \"site-01\"\n\
         [[operators]]\nid = \"ops-alice\"\n",
        device("dev-00001", "site-01"),
        device("dev-00002", "site-01"),
        device("dev-00003", "site-02"),
    );
    DeviceRegistry::parse(&text, Path::new("registry.toml")).expect("test registry is valid")
}

fn policy() -> AclPolicy {
    AclPolicy::parse(EXAMPLE, Path::new("policies/examples/acl.toml"))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn who(role: Role, id: &str) -> SpiffeId {
    SpiffeId::new(
        TrustDomain::new("demo.vitalmq").expect("domain"),
        role,
        PrincipalId::new(id).expect("id"),
    )
}

const DEV: (Role, &str) = (Role::Device, "dev-00001");
const GW: (Role, &str) = (Role::Gateway, "gw-01");
const BRIDGE: (Role, &str) = (Role::Bridge, "bridge-1");
const INT: (Role, &str) = (Role::Integrator, "int-01");
const OP: (Role, &str) = (Role::Operator, "ops-alice");

fn publish(p: &AclPolicy, r: &DeviceRegistry, (role, id): (Role, &str), topic: &str) -> Decision {
    p.publish(&who(role, id), topic, r)
}

fn subscribe(p: &AclPolicy, r: &DeviceRegistry, (role, id): (Role, &str), f: &str) -> Decision {
    p.subscribe(&who(role, id), f, r)
}

#[track_caller]
fn allowed(d: Decision, rule: &str) {
    assert!(d.allowed, "expected allowed by {rule}, got {d:?}");
    assert_eq!(d.rule, rule);
}

#[track_caller]
fn denied(d: Decision, reason: &str) {
    assert!(!d.allowed, "expected denied ({reason}), got {d:?}");
    assert_eq!(d.rule, reason);
}

#[test]
fn example_policy_loads_with_spec_defaults() {
    let p = policy();
    assert!(!p.cn_fallback());
    assert_eq!(p.denied_publish_v311(), DeniedPublishV311::Disconnect);
    let dev = p.limits(Role::Device);
    assert_eq!(dev.max_payload_bytes, 66_000);
    assert!(dev.max_payload_bytes >= 65_536);
    assert_eq!((dev.messages_per_second, dev.burst), (50, 200));
    assert!(p.limits(Role::Bridge).messages_per_second > dev.messages_per_second * 100);
    for role in Role::ALL {
        assert!(p.role_may_connect(role), "{role}");
    }
    assert_eq!(
        p.sha256_hex(),
        hex::encode(Sha256::digest(EXAMPLE.as_bytes()))
    );
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/acl.toml");
    let loaded = AclPolicy::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded, p);
    let rules: Vec<_> = p.rules(Role::Device).collect();
    assert_eq!(
        rules[0],
        ("publish", "device-own-telemetry", "devices/{id}/telemetry")
    );
}

#[test]
fn connect_requires_registration_for_devices_gateways_integrators_operators() {
    let (p, r) = (policy(), registry());
    allowed(
        p.connect(&who(Role::Device, "dev-00001"), &r),
        "device.connect",
    );
    allowed(
        p.connect(&who(Role::Gateway, "gw-01"), &r),
        "gateway.connect",
    );
    allowed(
        p.connect(&who(Role::Integrator, "int-01"), &r),
        "integrator.connect",
    );
    allowed(
        p.connect(&who(Role::Bridge, "bridge-1"), &r),
        "bridge.connect",
    );
    allowed(
        p.connect(&who(Role::Operator, "ops-alice"), &r),
        "operator.connect",
    );
    for (role, id) in [
        (Role::Device, "dev-99999"),
        (Role::Gateway, "gw-99"),
        (Role::Integrator, "int-99"),
        // Registered as a gateway, not as an integrator.
        (Role::Integrator, "gw-01"),
        // An operator certificate alone does not admit its holder.
        (Role::Operator, "ops-mallory"),
        (Role::Operator, "int-01"),
    ] {
        denied(p.connect(&who(role, id), &r), Decision::NOT_REGISTERED);
    }
    // And an unregistered identity can do nothing else either.
    denied(
        publish(
            &p,
            &r,
            (Role::Device, "dev-99999"),
            "devices/dev-99999/telemetry",
        ),
        Decision::NOT_REGISTERED,
    );
}

#[test]
fn other_trust_domains_and_disabled_roles_are_denied() {
    let (p, r) = (policy(), registry());
    let stranger = SpiffeId::new(
        TrustDomain::new("evil.example").expect("domain"),
        Role::Bridge,
        PrincipalId::new("bridge-1").expect("id"),
    );
    denied(p.connect(&stranger, &r), Decision::TRUST_DOMAIN);
    denied(
        p.subscribe(&stranger, "devices/+/telemetry", &r),
        Decision::TRUST_DOMAIN,
    );
    let off = EXAMPLE.replace(
        "[roles.operator]\nconnect = true",
        "[roles.operator]\nconnect = false",
    );
    let p = AclPolicy::parse(&off, Path::new("acl.toml")).unwrap_or_else(|e| panic!("{e}"));
    denied(
        p.connect(&who(Role::Operator, "ops-alice"), &r),
        Decision::ROLE_DISABLED,
    );
    denied(subscribe(&p, &r, OP, "alerts/#"), Decision::ROLE_DISABLED);
}

/// SPEC 2 rows `devices/{id}/telemetry` and `devices/{id}/status`.
#[test]
fn telemetry_and_status() {
    let (p, r) = (policy(), registry());
    allowed(
        publish(&p, &r, DEV, "devices/dev-00001/telemetry"),
        "device-own-telemetry",
    );
    allowed(
        publish(&p, &r, DEV, "devices/dev-00001/status"),
        "device-own-status",
    );
    // Another device's topic, even at the same site.
    denied(
        publish(&p, &r, DEV, "devices/dev-00002/telemetry"),
        Decision::DEFAULT_DENY,
    );
    // Gateway: devices registered to its site only.
    allowed(
        publish(&p, &r, GW, "devices/dev-00002/telemetry"),
        "gateway-site-telemetry",
    );
    allowed(
        publish(&p, &r, GW, "devices/dev-00001/status"),
        "gateway-site-status",
    );
    for topic in [
        "devices/dev-00003/telemetry",
        "devices/dev-99999/telemetry",
        "devices/gw-01/telemetry",
    ] {
        denied(publish(&p, &r, GW, topic), Decision::DEFAULT_DENY);
    }
    allowed(
        publish(
            &p,
            &r,
            (Role::Gateway, "gw-02"),
            "devices/dev-00003/telemetry",
        ),
        "gateway-site-telemetry",
    );
    for who in [BRIDGE, INT, OP] {
        denied(
            publish(&p, &r, who, "devices/dev-00001/telemetry"),
            Decision::DEFAULT_DENY,
        );
    }
    // Only the bridge subscribes.
    allowed(
        subscribe(&p, &r, BRIDGE, "devices/+/telemetry"),
        "bridge-telemetry",
    );
    allowed(
        subscribe(&p, &r, BRIDGE, "devices/dev-00001/telemetry"),
        "bridge-telemetry",
    );
    allowed(
        subscribe(&p, &r, BRIDGE, "devices/+/status"),
        "bridge-status",
    );
    allowed(
        subscribe(&p, &r, BRIDGE, "$share/ingest/devices/+/telemetry"),
        "bridge-telemetry",
    );
    denied(
        subscribe(&p, &r, BRIDGE, "devices/#"),
        Decision::DEFAULT_DENY,
    );
    denied(subscribe(&p, &r, BRIDGE, "#"), Decision::DEFAULT_DENY);
    for who in [DEV, GW, INT, OP] {
        denied(
            subscribe(&p, &r, who, "devices/dev-00001/telemetry"),
            Decision::DEFAULT_DENY,
        );
        denied(
            subscribe(&p, &r, who, "devices/+/status"),
            Decision::DEFAULT_DENY,
        );
    }
}

/// SPEC 2 row `devices/{id}/config`.
#[test]
fn config() {
    let (p, r) = (policy(), registry());
    allowed(
        publish(&p, &r, OP, "devices/dev-00001/config"),
        "operator-config",
    );
    allowed(
        publish(&p, &r, BRIDGE, "devices/dev-00003/config"),
        "bridge-config",
    );
    for who in [DEV, GW, INT] {
        denied(
            publish(&p, &r, who, "devices/dev-00001/config"),
            Decision::DEFAULT_DENY,
        );
    }
    allowed(
        subscribe(&p, &r, DEV, "devices/dev-00001/config"),
        "device-own-config",
    );
    for filter in [
        "devices/dev-00002/config",
        "devices/+/config",
        "devices/dev-00001/#",
        "devices/dev-00001/+",
        "#",
    ] {
        denied(subscribe(&p, &r, DEV, filter), Decision::DEFAULT_DENY);
    }
    for who in [GW, BRIDGE, INT, OP] {
        denied(
            subscribe(&p, &r, who, "devices/dev-00001/config"),
            Decision::DEFAULT_DENY,
        );
    }
}

/// SPEC 2 row `devices/{id}/ack`.
#[test]
fn ack() {
    let (p, r) = (policy(), registry());
    allowed(
        publish(&p, &r, BRIDGE, "devices/dev-00001/ack"),
        "bridge-ack",
    );
    for who in [DEV, GW, INT, OP] {
        denied(
            publish(&p, &r, who, "devices/dev-00001/ack"),
            Decision::DEFAULT_DENY,
        );
    }
    allowed(
        subscribe(&p, &r, DEV, "devices/dev-00001/ack"),
        "device-own-ack",
    );
    denied(
        subscribe(&p, &r, DEV, "devices/dev-00002/ack"),
        Decision::DEFAULT_DENY,
    );
    allowed(
        subscribe(&p, &r, GW, "devices/dev-00001/ack"),
        "gateway-site-ack",
    );
    allowed(
        subscribe(&p, &r, GW, "devices/dev-00002/ack"),
        "gateway-site-ack",
    );
    // Would cover other sites' devices.
    denied(
        subscribe(&p, &r, GW, "devices/+/ack"),
        Decision::DEFAULT_DENY,
    );
    denied(
        subscribe(&p, &r, GW, "devices/dev-00003/ack"),
        Decision::DEFAULT_DENY,
    );
    denied(
        subscribe(&p, &r, GW, "devices/dev-00001/config"),
        Decision::DEFAULT_DENY,
    );
    for who in [BRIDGE, INT, OP] {
        denied(
            subscribe(&p, &r, who, "devices/dev-00001/ack"),
            Decision::DEFAULT_DENY,
        );
    }
}

/// SPEC 2 row `alerts/{site}/{severity}/{device}`.
#[test]
fn alerts() {
    let (p, r) = (policy(), registry());
    allowed(
        publish(&p, &r, BRIDGE, "alerts/site-01/urgent/dev-00001"),
        "bridge-alerts",
    );
    for who in [DEV, GW, INT, OP] {
        denied(
            publish(&p, &r, who, "alerts/site-01/urgent/dev-00001"),
            Decision::DEFAULT_DENY,
        );
    }
    for filter in [
        "alerts/site-01/#",
        "alerts/site-01/urgent/+",
        "alerts/site-01/+/dev-00001",
    ] {
        allowed(subscribe(&p, &r, INT, filter), "integrator-site-alerts");
    }
    for filter in [
        "alerts/+/urgent/#",
        "alerts/#",
        "alerts/site-02/#",
        "#",
        "ops/#",
    ] {
        denied(subscribe(&p, &r, INT, filter), Decision::DEFAULT_DENY);
    }
    allowed(subscribe(&p, &r, OP, "alerts/#"), "operator-alerts");
    allowed(
        subscribe(&p, &r, OP, "alerts/+/urgent/+"),
        "operator-alerts",
    );
    for who in [DEV, GW, BRIDGE] {
        denied(
            subscribe(&p, &r, who, "alerts/site-01/#"),
            Decision::DEFAULT_DENY,
        );
    }
}

/// SPEC 2 row `ops/{component}/{kind}`.
#[test]
fn ops() {
    let (p, r) = (policy(), registry());
    allowed(publish(&p, &r, BRIDGE, "ops/bridge/gap"), "bridge-ops");
    // The broker's own topic is published internally; no client may impersonate it.
    denied(
        publish(&p, &r, BRIDGE, "ops/broker/overload"),
        Decision::DEFAULT_DENY,
    );
    for who in [DEV, GW, INT, OP] {
        denied(
            publish(&p, &r, who, "ops/bridge/gap"),
            Decision::DEFAULT_DENY,
        );
    }
    allowed(subscribe(&p, &r, OP, "ops/#"), "operator-ops");
    allowed(subscribe(&p, &r, OP, "ops/broker/+"), "operator-ops");
    for who in [DEV, GW, BRIDGE, INT] {
        denied(subscribe(&p, &r, who, "ops/#"), Decision::DEFAULT_DENY);
    }
    denied(subscribe(&p, &r, OP, "#"), Decision::DEFAULT_DENY);
}

/// SPEC 2 row `alerts/{site}/ack/{id}` (v1.1): an integrator acknowledges only on its
/// own site under its own id, an operator on any site under its own id; the bridge
/// receives them all.
#[test]
fn alert_acknowledgements() {
    let (p, r) = (policy(), registry());
    allowed(
        publish(&p, &r, INT, "alerts/site-01/ack/int-01"),
        "integrator-ack",
    );
    for topic in [
        // Another site's ack topic, under its own id.
        "alerts/site-02/ack/int-01",
        // Its own site, under another id (an integrator of the site, or not).
        "alerts/site-01/ack/int-02",
        "alerts/site-01/ack/ops-alice",
        // Not an ack topic at all.
        "alerts/site-01/urgent/dev-00001",
        "alerts/site-01/ack/int-01/extra",
    ] {
        denied(publish(&p, &r, INT, topic), Decision::DEFAULT_DENY);
    }
    // An integrator the registry binds to no site matches no site.
    denied(
        publish(
            &p,
            &r,
            (Role::Integrator, "int-99"),
            "alerts/site-01/ack/int-99",
        ),
        Decision::NOT_REGISTERED,
    );
    for site in ["site-01", "site-02"] {
        allowed(
            publish(&p, &r, OP, &format!("alerts/{site}/ack/ops-alice")),
            "operator-ack",
        );
        denied(
            publish(&p, &r, OP, &format!("alerts/{site}/ack/int-01")),
            Decision::DEFAULT_DENY,
        );
    }
    for who in [DEV, GW] {
        denied(
            publish(&p, &r, who, "alerts/site-01/ack/dev-00001"),
            Decision::DEFAULT_DENY,
        );
    }
    allowed(subscribe(&p, &r, BRIDGE, "alerts/+/ack/+"), "bridge-acks");
    allowed(
        subscribe(&p, &r, BRIDGE, "alerts/site-01/ack/int-01"),
        "bridge-acks",
    );
    // The bridge still may not read the alerts it publishes, nor more than acks.
    for filter in ["alerts/#", "alerts/+/+/+", "alerts/site-01/urgent/+"] {
        denied(subscribe(&p, &r, BRIDGE, filter), Decision::DEFAULT_DENY);
    }
    for who in [DEV, GW] {
        denied(
            subscribe(&p, &r, who, "alerts/+/ack/+"),
            Decision::DEFAULT_DENY,
        );
    }
}

/// Presence (`presence/...`) is the broker's own voice: the bridge subscribes to all
/// of it, and no client may publish any of it, not even the bridge.
#[test]
fn presence_is_read_by_the_bridge_and_published_by_nobody() {
    let (p, r) = (policy(), registry());
    for filter in [
        "presence/#",
        "presence/broker/boot",
        "presence/device/+",
        "presence/gateway/gw-01",
    ] {
        allowed(subscribe(&p, &r, BRIDGE, filter), "bridge-presence");
    }
    for who in [DEV, GW, INT, OP] {
        denied(subscribe(&p, &r, who, "presence/#"), Decision::DEFAULT_DENY);
    }
    for who in [DEV, GW, BRIDGE, INT, OP] {
        for topic in [
            "presence/broker/boot",
            "presence/device/dev-00001",
            "presence/gateway/gw-01",
            "presence/device/x",
        ] {
            denied(publish(&p, &r, who, topic), Decision::DEFAULT_DENY);
        }
    }
}

#[test]
fn invalid_topics_and_filters_and_dollar_topics() {
    let (p, r) = (policy(), registry());
    for topic in [
        "",
        "devices/+/telemetry",
        "alerts/#",
        "devices/dev-00001/telemetry\0",
    ] {
        denied(publish(&p, &r, BRIDGE, topic), Decision::INVALID_TOPIC);
    }
    for filter in [
        "",
        "devices/#/telemetry",
        "alerts/site-01#",
        "a+/b",
        "$share//x",
    ] {
        denied(subscribe(&p, &r, OP, filter), Decision::INVALID_FILTER);
    }
    // `$` topics are never matched by a first-level wildcard.
    let all = EXAMPLE.replace(
        "{ name = \"operator-ops\", pattern = \"ops/#\" },",
        "{ name = \"operator-ops\", pattern = \"ops/#\" },\n    { name = \"operator-all\", pattern = \"#\" },\n    { name = \"operator-sys\", pattern = \"$SYS/broker/uptime\" },",
    );
    let p = AclPolicy::parse(&all, Path::new("acl.toml")).unwrap_or_else(|e| panic!("{e}"));
    allowed(subscribe(&p, &r, OP, "#"), "operator-all");
    denied(subscribe(&p, &r, OP, "$SYS/#"), Decision::DEFAULT_DENY);
    denied(
        subscribe(&p, &r, OP, "$SYS/broker/+"),
        Decision::DEFAULT_DENY,
    );
    allowed(subscribe(&p, &r, OP, "$SYS/broker/uptime"), "operator-sys");
}

#[test]
fn options_and_derived_rule_names() {
    let text = EXAMPLE
        .replace("cn_fallback = false", "cn_fallback = true")
        .replace(
            "denied_publish_v311 = \"disconnect\"",
            "denied_publish_v311 = \"ack_and_drop\"",
        )
        .replace("{ name = \"device-own-status\", ", "{ ");
    let p = AclPolicy::parse(&text, Path::new("acl.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert!(p.cn_fallback());
    assert_eq!(p.denied_publish_v311(), DeniedPublishV311::AckAndDrop);
    let (r, _) = (registry(), ());
    allowed(
        publish(&p, &r, DEV, "devices/dev-00001/status"),
        "device.publish[1]",
    );
    assert_ne!(p.sha256_hex(), policy().sha256_hex());
    // Both options default to the safe choice when left out.
    let minimal = EXAMPLE
        .replace("cn_fallback = false\n", "")
        .replace("denied_publish_v311 = \"disconnect\"\n", "");
    let p = AclPolicy::parse(&minimal, Path::new("acl.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert!(!p.cn_fallback());
    assert_eq!(p.denied_publish_v311(), DeniedPublishV311::Disconnect);
}

fn line_of(text: &str, needle: &str) -> usize {
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle} not in text"));
    text[..at].matches('\n').count() + 1
}

#[test]
fn every_validation_problem_is_reported_at_once_with_file_line_and_field() {
    let bad = EXAMPLE
        .replace("\"devices/{id}/status\"", "\"devices/{foo}/status\"")
        .replace("\"devices/{id}/ack\"", "\"devices/#/ack\"")
        .replace(
            "name = \"gateway-site-status\"",
            "name = \"device-own-telemetry\"",
        )
        .replace("\"ops/bridge/#\"", "\"ops/{site}/#\"")
        .replace("messages_per_second = 10,", "messages_per_second = 0,")
        .replace("name = \"operator-config\"", "name = \"default-deny\"");
    let path = Path::new("policies/acl.toml");
    let err = AclPolicy::parse(&bad, path).expect_err("broken policy");
    let text = err.to_string();
    assert_eq!(err.0.len(), 6, "{text}");
    let expect = [
        (
            "{foo}",
            "roles.device.publish[1].pattern",
            "unknown variable `{foo}`",
        ),
        (
            "devices/#/ack",
            "roles.device.subscribe[1].pattern",
            "`#` must be the last level",
        ),
        (
            "name = \"device-own-telemetry\", pattern = \"devices/{site_device}",
            "roles.gateway.publish[1].name",
            "already used by roles.device.publish[0]",
        ),
        (
            "ops/{site}/#",
            "roles.bridge.publish[3].pattern",
            "has no site",
        ),
        (
            "messages_per_second = 0",
            "roles.integrator.limits.messages_per_second",
            "at least 1",
        ),
        (
            "name = \"default-deny\"",
            "roles.operator.publish[0].name",
            "reserved",
        ),
    ];
    for (needle, field, message) in expect {
        let want = format!("policies/acl.toml:{}: {field}: ", line_of(&bad, needle));
        assert!(
            err.0
                .iter()
                .any(|e| e.to_string().starts_with(&want) && e.message.contains(message)),
            "missing `{want}...{message}` in\n{text}"
        );
    }
}

#[test]
fn serde_problems_name_file_and_line() {
    let path = Path::new("acl.toml");
    for (bad, needle, words) in [
        (
            EXAMPLE.replace(
                "[roles.bridge]\nconnect = true",
                "[roles.bridge]\nconnect = true\ncolour = \"red\"",
            ),
            "colour",
            "unknown field `colour`",
        ),
        (
            EXAMPLE.replace("[roles.operator]", "[roles.admin]"),
            "[roles.admin]",
            "unknown field `admin`",
        ),
        (
            EXAMPLE.replace(
                "{ name = \"bridge-ops\", pattern",
                "{ name = \"bridge-ops\", topic",
            ),
            "topic = \"ops/bridge/#\"",
            "unknown field `topic`",
        ),
        (
            EXAMPLE.replace("\"disconnect\"\n", "\"shrug\"\n"),
            "\"shrug\"",
            "unknown variant `shrug`",
        ),
    ] {
        let err = AclPolicy::parse(&bad, path).expect_err(needle);
        let first = &err.0[0];
        assert!(first.message.contains(words), "{err}");
        assert_eq!(first.line, Some(line_of(&bad, needle)), "{err}");
        assert!(err.to_string().contains("acl.toml:"), "{err}");
    }
}

#[test]
fn structural_problems_are_reported() {
    let path = Path::new("acl.toml");
    let missing = EXAMPLE.replace("[roles.integrator]\n", "[roles.integratorx]\n");
    assert!(AclPolicy::parse(&missing, path).is_err());
    let start = EXAMPLE.find("# --- operator").expect("operator section");
    let without_operator = &EXAMPLE[..start];
    let err = AclPolicy::parse(without_operator, path).expect_err("missing role");
    assert!(err.to_string().contains("roles.operator: missing"), "{err}");
    let err = AclPolicy::parse(&EXAMPLE.replace("vitalmq-acl/v1", "vitalmq-acl/v2"), path)
        .expect_err("format");
    let want = format!(
        "acl.toml:{}: format",
        line_of(EXAMPLE, "format = \"vitalmq-acl")
    );
    assert!(err.to_string().contains(&want), "{err}");
    let err = AclPolicy::parse(
        &EXAMPLE.replace("bytes_per_second = 65_536", "bytes_per_second = 100"),
        path,
    )
    .expect_err("bytes");
    assert!(
        err.to_string()
            .contains("roles.integrator.limits.bytes_per_second"),
        "{err}"
    );
    let err = AclPolicy::load(Path::new("/nonexistent/acl.toml")).expect_err("no file");
    assert!(
        err.to_string()
            .contains("/nonexistent/acl.toml: cannot read"),
        "{err}"
    );
}

#[test]
fn subscribe_limits_default_per_role_and_are_validated() {
    let p = policy();
    let dev = p.limits(Role::Device);
    assert_eq!(
        (
            dev.max_subscribe_filters,
            dev.subscribes_per_second,
            dev.subscribe_burst
        ),
        (16, 10, 50)
    );
    assert_eq!(p.limits(Role::Gateway).max_subscribe_filters, 4_096);
    // Not written in the file: the defaults, so older policy files stay valid.
    let bridge = p.limits(Role::Bridge);
    assert_eq!(
        (
            bridge.max_subscribe_filters,
            bridge.subscribes_per_second,
            bridge.subscribe_burst
        ),
        (
            64,
            RoleLimits::DEFAULT_SUBSCRIBES_PER_SECOND,
            RoleLimits::DEFAULT_SUBSCRIBE_BURST
        )
    );
    let path = Path::new("acl.toml");
    for (from, to, field) in [
        (
            "max_subscribe_filters = 16,",
            "max_subscribe_filters = 0,",
            "roles.device.limits.max_subscribe_filters",
        ),
        (
            "max_subscribe_filters = 4_096",
            "max_subscribe_filters = 65_536",
            "roles.gateway.limits.max_subscribe_filters",
        ),
        (
            "subscribes_per_second = 10,",
            "subscribes_per_second = 0,",
            "roles.device.limits.subscribes_per_second",
        ),
        (
            "subscribe_burst = 50 }",
            "subscribe_burst = 0 }",
            "roles.device.limits.subscribe_burst",
        ),
    ] {
        let bad = EXAMPLE.replace(from, to);
        assert_ne!(bad, EXAMPLE, "{from} not in the example");
        let err = AclPolicy::parse(&bad, path).expect_err(field);
        assert!(err.to_string().contains(field), "{err}");
    }
}

#[test]
fn retained_telemetry_is_stripped_unless_the_policy_refuses_it() {
    assert_eq!(policy().retained_telemetry(), RetainedTelemetry::Strip);
    let without = EXAMPLE.replace("retained_telemetry = \"strip\"\n", "");
    assert_ne!(without, EXAMPLE);
    let p = AclPolicy::parse(&without, Path::new("acl.toml")).expect("default");
    assert_eq!(p.retained_telemetry(), RetainedTelemetry::Strip);
    let refuse = EXAMPLE.replace(
        "retained_telemetry = \"strip\"",
        "retained_telemetry = \"refuse\"",
    );
    let p = AclPolicy::parse(&refuse, Path::new("acl.toml")).expect("refuse");
    assert_eq!(p.retained_telemetry(), RetainedTelemetry::Refuse);
    for (topic, is) in [
        ("devices/dev-00001/telemetry", true),
        ("devices/dev-00001/status", true),
        ("devices/dev-00001/config", false),
        ("devices//telemetry", false),
        ("devices/dev-00001/telemetry/x", false),
        ("alerts/site-01/urgent/dev-00001", false),
    ] {
        assert_eq!(is_telemetry_topic(topic), is, "{topic}");
    }
}

/// Issue 19: a retired device is no longer its site's, so its gateway may not relay for
/// it; a retirement still to come changes nothing yet.
#[test]
fn a_gateway_may_not_relay_for_a_retired_device() {
    let p = policy();
    let mut r = registry();
    let retire = |r: &mut DeviceRegistry, id: &str, at: u64| {
        r.change_history(&DeviceId::new(id).expect("id"), |h| h.retire(at))
            .expect("retire");
    };
    retire(&mut r, "dev-00002", 1_000);
    retire(&mut r, "dev-00001", u64::MAX / 2);
    denied(
        publish(&p, &r, GW, "devices/dev-00002/telemetry"),
        Decision::DEFAULT_DENY,
    );
    allowed(
        publish(&p, &r, GW, "devices/dev-00001/telemetry"),
        "gateway-site-telemetry",
    );
}
