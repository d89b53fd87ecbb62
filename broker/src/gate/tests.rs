//! The gate session driven with real MQTT packets (encoded by rumqttc) against the
//! shipped ACL policy: what is forwarded, what is answered, what is closed, what is
//! audited.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{QoS, v4};
use rumqttc::v5::mqttbytes::v5;
use vitalmq_audit::{AuditRecord, Event};
use vitalmq_envelope::{Algorithm, DeviceId, SigningKey};
use vitalmq_policies::{
    AclPolicy, DeviceEntry, DeviceRegistry, PrincipalId, Role, SiteId, SpiffeId, TrustDomain,
};

use super::*;
use crate::authz::{Ask, Authorizer, Denial, Permit, PolicyAuthorizer, kind as decision};
use crate::embedded::TOPIC_ALIAS_MAXIMUM;
use crate::identity::{IdentitySource, PeerIdentity};

const PASSWORD: &str = "internal-secret";

#[derive(Debug, Default)]
struct Audit(Mutex<Vec<AuditRecord>>);

impl AuditSink for Audit {
    fn record(&self, record: AuditRecord) -> Result<(), AuditUnavailable> {
        self.0.lock().expect("audit lock").push(record);
        Ok(())
    }
}

impl Audit {
    fn events(&self) -> Vec<(Event, Option<String>, Option<String>)> {
        self.0
            .lock()
            .expect("audit lock")
            .iter()
            .map(|r| (r.event, r.action.clone(), r.reason.clone()))
            .collect()
    }
}

/// Refuses the first admission, then admits everything; counts admissions.
#[derive(Debug, Default)]
struct LimitedOnce {
    calls: std::sync::atomic::AtomicUsize,
}

impl RateGate for LimitedOnce {
    fn admit(&self, _bytes: usize) -> Result<(), Duration> {
        if self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            Err(Duration::from_millis(250))
        } else {
            Ok(())
        }
    }
}

#[derive(Debug)]
struct AlwaysLimited;

impl RateGate for AlwaysLimited {
    fn admit(&self, _bytes: usize) -> Result<(), Duration> {
        Err(Duration::from_millis(250))
    }
}

fn registry() -> DeviceRegistry {
    let mut registry = DeviceRegistry::new(TrustDomain::new("demo.vitalmq").expect("td"));
    for (id, site) in [("dev-00001", "site-01"), ("dev-00002", "site-02")] {
        registry
            .insert_device(DeviceEntry {
                id: DeviceId::new(id).expect("id"),
                site: SiteId::new(site).expect("site"),
                patient_ref: format!("pt-{id}"),
                key: SigningKey::generate(Algorithm::EdDsa)
                    .expect("key")
                    .verifying_key(),
                consent: None,
                processing_policy: None,
                lot: None,
                hardware_model: None,
                region: None,
            })
            .expect("unique");
    }
    registry.insert_integrator(
        PrincipalId::new("int-site-01").expect("id"),
        SiteId::new("site-01").expect("site"),
    );
    registry
}

fn acl(text_edit: impl Fn(String) -> String) -> Arc<AclPolicy> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/examples/acl.toml");
    let text = text_edit(std::fs::read_to_string(&path).expect("example acl"));
    Arc::new(AclPolicy::parse(&text, &path).expect("valid acl"))
}

fn authorizer() -> Arc<dyn Authorizer> {
    Arc::new(PolicyAuthorizer::new(acl(|t| t), Arc::new(registry())))
}

fn peer(role: Role, id: &str) -> PeerIdentity {
    PeerIdentity {
        spiffe: SpiffeId::new(
            TrustDomain::new("demo.vitalmq").expect("td"),
            role,
            PrincipalId::new(id).expect("id"),
        ),
        source: IdentitySource::SanUri,
        serial_hex: "01AB".into(),
        fingerprint_sha256_hex: "ff".repeat(32),
        not_after: time::OffsetDateTime::now_utc() + time::Duration::days(1),
    }
}

struct Harness {
    session: GateSession,
    audit: Arc<Audit>,
}

impl Harness {
    fn new(role: Role, id: &str) -> Self {
        Self::with_rate(role, id, Arc::new(Unlimited))
    }

    fn with_rate(role: Role, id: &str, rate: Arc<dyn RateGate>) -> Self {
        let audit = Arc::new(Audit::default());
        let session = GateSession::new(
            peer(role, id),
            "127.0.0.1:5555",
            authorizer(),
            audit.clone(),
            rate,
            PASSWORD.into(),
        );
        Self { session, audit }
    }

    fn client(&mut self, bytes: Bytes) -> Vec<Output> {
        let mut buf = BytesMut::from(&bytes[..]);
        let mut out = Vec::new();
        self.session.on_client_bytes(&mut buf, &mut out);
        assert!(
            buf.is_empty() || self.session.is_closed(),
            "unconsumed client bytes"
        );
        out
    }

    fn broker(&mut self, bytes: Bytes) -> Vec<Output> {
        let mut buf = BytesMut::from(&bytes[..]);
        let mut out = Vec::new();
        self.session.on_broker_bytes(&mut buf, &mut out);
        out
    }
}

fn v4_bytes(write: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut buf = BytesMut::new();
    write(&mut buf);
    buf.freeze()
}

fn v4_connect(client_id: &str, will: Option<&str>) -> Bytes {
    let mut c = v4::Connect::new(client_id);
    c.last_will = will.map(|t| v4::LastWill::new(t, "bye", QoS::AtLeastOnce, false));
    c.login = Some(v4::Login::new("claimed-user", "claimed-pass"));
    v4_bytes(|b| {
        c.write(b).expect("encode");
    })
}

fn v5_connect(client_id: &str) -> Bytes {
    v5_connect_with(client_id, true, None)
}

/// An MQTT 5 CONNECT with `clean_start` and CONNECT properties.
fn v5_connect_with(
    client_id: &str,
    clean_start: bool,
    properties: Option<v5::ConnectProperties>,
) -> Bytes {
    let c = v5::Connect {
        keep_alive: 30,
        client_id: client_id.into(),
        clean_start,
        properties,
    };
    v4_bytes(|b| {
        c.write(&None, &None, b).expect("encode");
    })
}

fn v4_publish(topic: &str, qos: QoS, pkid: u16, payload: &[u8]) -> Bytes {
    let mut p = v4::Publish::new(topic, qos, payload.to_vec());
    p.pkid = pkid;
    v4_bytes(|b| {
        p.write(b).expect("encode");
    })
}

fn v5_publish(topic: &str, alias: Option<u16>, pkid: u16) -> Bytes {
    let mut p = v5::Publish::new(
        topic,
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        b"cose".to_vec(),
        None,
    );
    p.pkid = pkid;
    if let Some(alias) = alias {
        p.properties = Some(v5::PublishProperties {
            topic_alias: Some(alias),
            ..Default::default()
        });
    }
    v4_bytes(|b| {
        p.write(b).expect("encode");
    })
}

fn to_broker(out: &[Output]) -> Vec<Bytes> {
    out.iter()
        .filter_map(|o| {
            if let Output::ToBroker(b) = o {
                Some(b.clone())
            } else {
                None
            }
        })
        .collect()
}

fn to_client(out: &[Output]) -> Vec<Bytes> {
    out.iter()
        .filter_map(|o| {
            if let Output::ToClient(b) = o {
                Some(b.clone())
            } else {
                None
            }
        })
        .collect()
}

fn closed(out: &[Output]) -> Option<&'static str> {
    out.iter().find_map(|o| {
        if let Output::Close(r) = o {
            Some(r.code)
        } else {
            None
        }
    })
}

fn read_v4(bytes: &Bytes) -> v4::Packet {
    v4::Packet::read(&mut BytesMut::from(&bytes[..]), 1 << 20).expect("valid packet")
}

fn read_v5(bytes: &Bytes) -> v5::Packet {
    v5::Packet::read(&mut BytesMut::from(&bytes[..]), None).expect("valid packet")
}

fn connected_v4(role: Role, id: &str) -> Harness {
    let mut h = Harness::new(role, id);
    let out = h.client(v4_connect(id, None));
    assert_eq!(out.first(), Some(&Output::OpenBroker(Version::V311)));
    h
}

#[test]
fn connect_binds_the_certificate_id_and_replaces_credentials() {
    let mut h = Harness::new(Role::Device, "dev-00001");
    let out = h.client(v4_connect("", None));
    assert_eq!(out[0], Output::OpenBroker(Version::V311));
    let v4::Packet::Connect(c) = read_v4(&to_broker(&out)[0]) else {
        panic!("not a CONNECT")
    };
    assert_eq!(
        c.client_id, "dev-00001",
        "empty id gets the certificate's id"
    );
    let login = c.login.expect("gate credentials");
    assert_eq!(login.username, "spiffe://demo.vitalmq/device/dev-00001");
    assert_eq!(
        login.password, PASSWORD,
        "the client's claimed password never reaches rumqttd"
    );
    assert!(
        h.audit.events().is_empty(),
        "accepted only once rumqttd's CONNACK says so"
    );
    let out = h.broker(v4_connack(v4::ConnectReturnCode::Success));
    assert!(matches!(
        read_v4(&to_client(&out)[0]),
        v4::Packet::ConnAck(_)
    ));
    assert_eq!(
        h.audit.events(),
        vec![(Event::ConnectionAccepted, Some("connect".into()), None)]
    );
}

#[test]
fn claiming_another_client_id_is_refused_with_connack_5() {
    let mut h = Harness::new(Role::Device, "dev-00001");
    let out = h.client(v4_connect("dev-00002", None));
    assert!(to_broker(&out).is_empty());
    let v4::Packet::ConnAck(ack) = read_v4(&to_client(&out)[0]) else {
        panic!("not a CONNACK")
    };
    assert_eq!(ack.code, v4::ConnectReturnCode::NotAuthorized);
    assert_eq!(closed(&out), Some("connect_denied"));
    assert_eq!(
        h.audit.events(),
        vec![(
            Event::ConnectionRefused,
            Some("connect".into()),
            Some("client_id_mismatch".into())
        )]
    );
}

#[test]
fn mqtt5_refusals_use_reason_0x87_and_an_empty_id_is_assigned() {
    let mut h = Harness::new(Role::Device, "dev-00001");
    let out = h.client(v5_connect("dev-00099"));
    let v5::Packet::ConnAck(ack) = read_v5(&to_client(&out)[0]) else {
        panic!("not a CONNACK")
    };
    assert_eq!(ack.code, v5::ConnectReturnCode::NotAuthorized);

    let mut h = Harness::new(Role::Device, "dev-00001");
    let out = h.client(v5_connect(""));
    assert_eq!(out[0], Output::OpenBroker(Version::V5));
    let broker_ack = v4_bytes(|b| {
        v5::ConnAck {
            session_present: false,
            code: v5::ConnectReturnCode::Success,
            properties: None,
        }
        .write(b)
        .expect("encode");
    });
    let out = h.broker(broker_ack);
    let v5::Packet::ConnAck(ack) = read_v5(&to_client(&out)[0]) else {
        panic!("not a CONNACK")
    };
    let assigned = ack.properties.and_then(|p| p.assigned_client_identifier);
    assert_eq!(assigned.as_deref(), Some("dev-00001"));
}

#[test]
fn an_unregistered_device_and_a_foreign_will_topic_are_refused() {
    let mut h = Harness::new(Role::Device, "dev-77777");
    assert_eq!(
        closed(&h.client(v4_connect("dev-77777", None))),
        Some("connect_denied")
    );

    let mut h = Harness::new(Role::Device, "dev-00001");
    let out = h.client(v4_connect("dev-00001", Some("devices/dev-00002/status")));
    assert_eq!(closed(&out), Some("connect_denied"));
    assert!(
        h.audit
            .events()
            .iter()
            .any(|e| e.1.as_deref() == Some("will"))
    );
}

#[test]
fn own_telemetry_is_forwarded_byte_for_byte() {
    let mut h = connected_v4(Role::Device, "dev-00001");
    let publish = v4_publish(
        "devices/dev-00001/telemetry",
        QoS::AtLeastOnce,
        7,
        b"cose bytes",
    );
    let out = h.client(publish.clone());
    assert_eq!(to_broker(&out), vec![publish]);
}

#[test]
fn another_devices_topic_closes_a_311_connection_and_is_audited() {
    let mut h = connected_v4(Role::Device, "dev-00001");
    let out = h.client(v4_publish(
        "devices/dev-00002/telemetry",
        QoS::AtLeastOnce,
        7,
        b"x",
    ));
    assert!(
        to_broker(&out).is_empty(),
        "a denied PUBLISH is never routed"
    );
    assert_eq!(closed(&out), Some("publish_denied"));
    let denial = h
        .audit
        .0
        .lock()
        .expect("lock")
        .last()
        .cloned()
        .expect("audited");
    assert_eq!(denial.event, Event::AuthorizationDenied);
    assert_eq!(
        denial.resource.as_deref(),
        Some("devices/dev-00002/telemetry")
    );
    assert_eq!(denial.rule.as_deref(), Some("default-deny"));
}

#[test]
fn mqtt5_denied_publish_gets_puback_0x87_and_topic_aliases_cannot_bypass_the_acl() {
    let mut h = Harness::new(Role::Device, "dev-00001");
    h.client(v5_connect("dev-00001"));
    // Alias 1 -> own telemetry: forwarded with the alias stripped.
    let out = h.client(v5_publish("devices/dev-00001/telemetry", Some(1), 1));
    let v5::Packet::Publish(p) = read_v5(&to_broker(&out)[0]) else {
        panic!("not a PUBLISH")
    };
    assert!(
        p.properties
            .as_ref()
            .is_none_or(|pr| pr.topic_alias.is_none())
    );
    // Alias only: resolved to the full topic.
    let out = h.client(v5_publish("", Some(1), 2));
    let v5::Packet::Publish(p) = read_v5(&to_broker(&out)[0]) else {
        panic!("not a PUBLISH")
    };
    assert_eq!(&p.topic[..], b"devices/dev-00001/telemetry");
    // Alias 2 -> another device's topic: denied, and stays denied when used alone.
    for (topic, pkid) in [("devices/dev-00002/telemetry", 3), ("", 4)] {
        let out = h.client(v5_publish(topic, Some(2), pkid));
        assert!(to_broker(&out).is_empty(), "alias {topic:?} routed");
        let v5::Packet::PubAck(ack) = read_v5(&to_client(&out)[0]) else {
            panic!("not a PUBACK")
        };
        assert_eq!(
            (ack.pkid, ack.reason),
            (pkid, v5::PubAckReason::NotAuthorized)
        );
        assert_eq!(closed(&out), None, "MQTT 5 keeps the connection");
    }
    // An alias never set is a protocol error.
    let out = h.client(v5_publish("", Some(9), 5));
    assert_eq!(closed(&out), Some("topic_alias"));
}

#[test]
fn denied_filters_get_0x80_in_place_and_allowed_ones_are_granted() {
    let mut h = connected_v4(Role::Device, "dev-00001");
    let subscribe = v4::Subscribe::new_many([
        v4::SubscribeFilter::new("devices/dev-00001/config".into(), QoS::AtLeastOnce),
        v4::SubscribeFilter::new("#".into(), QoS::AtLeastOnce),
        v4::SubscribeFilter::new("devices/dev-00001/ack".into(), QoS::AtLeastOnce),
    ]);
    let mut subscribe = subscribe;
    subscribe.pkid = 11;
    let out = h.client(v4_bytes(|b| {
        subscribe.write(b).expect("encode");
    }));
    let v4::Packet::Subscribe(forwarded) = read_v4(&to_broker(&out)[0]) else {
        panic!("not a SUBSCRIBE")
    };
    let paths: Vec<_> = forwarded.filters.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["devices/dev-00001/config", "devices/dev-00001/ack"]);

    let broker_ack = v4::SubAck::new(
        11,
        vec![v4::SubscribeReasonCode::Success(QoS::AtLeastOnce); 2],
    );
    let out = h.broker(v4_bytes(|b| {
        broker_ack.write(b).expect("encode");
    }));
    let v4::Packet::SubAck(ack) = read_v4(&to_client(&out)[0]) else {
        panic!("not a SUBACK")
    };
    assert_eq!(
        ack.return_codes,
        vec![
            v4::SubscribeReasonCode::Success(QoS::AtLeastOnce),
            v4::SubscribeReasonCode::Failure,
            v4::SubscribeReasonCode::Success(QoS::AtLeastOnce),
        ]
    );
}

#[test]
fn a_fully_denied_subscribe_is_answered_by_the_gate_with_0x87_in_mqtt5() {
    let mut h = Harness::new(Role::Integrator, "int-site-01");
    h.client(v5_connect("int-site-01"));
    let mut subscribe = v5::Subscribe::new(
        v5::Filter::new("alerts/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce),
        None,
    );
    subscribe.pkid = 3;
    let out = h.client(v4_bytes(|b| {
        subscribe.write(b).expect("encode");
    }));
    assert!(to_broker(&out).is_empty());
    let v5::Packet::SubAck(ack) = read_v5(&to_client(&out)[0]) else {
        panic!("not a SUBACK")
    };
    assert_eq!(
        ack.return_codes,
        vec![v5::SubscribeReasonCode::NotAuthorized]
    );
}

#[test]
fn oversized_payloads_and_garbage_end_the_connection() {
    let mut h = connected_v4(Role::Device, "dev-00001");
    let huge = vec![0u8; 70_000];
    let out = h.client(v4_publish(
        "devices/dev-00001/telemetry",
        QoS::AtLeastOnce,
        1,
        &huge,
    ));
    assert!(to_broker(&out).is_empty());
    assert_eq!(closed(&out), Some("payload_too_large"));

    let mut h = Harness::new(Role::Device, "dev-00001");
    assert_eq!(
        closed(&h.client(Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n"))),
        Some("malformed_connect")
    );

    // A packet announcing 200 MB is refused from its header, without buffering it.
    let mut h = connected_v4(Role::Device, "dev-00001");
    assert_eq!(
        closed(&h.client(Bytes::from_static(&[0x30, 0xff, 0xff, 0xff, 0x7f]))),
        Some("packet_too_large")
    );
}

#[test]
fn rate_limits_pause_311_and_answer_0x97_in_mqtt5() {
    let limited_once = Arc::new(LimitedOnce::default());
    let mut h = Harness::with_rate(Role::Device, "dev-00001", limited_once.clone());
    h.client(v4_connect("dev-00001", None));
    let first = v4_publish("devices/dev-00001/telemetry", QoS::AtLeastOnce, 1, b"x");
    let second = v4_publish("devices/dev-00001/telemetry", QoS::AtLeastOnce, 2, b"y");
    let mut buf = BytesMut::from(&first[..]);
    buf.extend_from_slice(&second);
    let mut out = Vec::new();
    h.session.on_client_bytes(&mut buf, &mut out);
    assert_eq!(
        out,
        vec![Output::Pause(Duration::from_millis(250))],
        "held, not forwarded"
    );
    assert!(h.session.has_deferred());
    // After the pause the relay calls again: the held PUBLISH is admitted anew and goes
    // first, then the one queued behind it. Nothing dropped, order kept.
    let mut out = Vec::new();
    h.session.on_client_bytes(&mut buf, &mut out);
    assert_eq!(out, vec![Output::ToBroker(first), Output::ToBroker(second)]);
    assert_eq!(
        limited_once.calls.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "every forward took a token"
    );

    let mut h = Harness::with_rate(Role::Device, "dev-00001", Arc::new(AlwaysLimited));
    h.client(v5_connect("dev-00001"));
    let out = h.client(v5_publish("devices/dev-00001/telemetry", None, 4));
    let v5::Packet::PubAck(ack) = read_v5(&to_client(&out)[0]) else {
        panic!("not a PUBACK")
    };
    assert_eq!(ack.reason, v5::PubAckReason::QuotaExceeded);
}

#[test]
fn a_new_policy_revokes_live_subscriptions_and_connections() {
    let mut h = connected_v4(Role::Device, "dev-00001");
    let sub = v4::Subscribe::new("devices/dev-00001/config", QoS::AtLeastOnce);
    h.client(v4_bytes(|b| {
        sub.write(b).expect("encode");
    }));
    // The same policy: nothing happens.
    let mut out = Vec::new();
    h.session.replace_authorizer(authorizer(), &mut out);
    assert!(out.is_empty());
    // A policy without the device config rule: the connection goes.
    let stricter = acl(|t| t.replace("\"devices/{id}/config\"", "\"devices/{id}/nothing\""));
    h.session.replace_authorizer(
        Arc::new(PolicyAuthorizer::new(stricter, Arc::new(registry()))),
        &mut out,
    );
    assert_eq!(closed(&out), Some("subscription_revoked"));

    // A registry without the device: the connection goes too.
    let mut h = connected_v4(Role::Device, "dev-00002");
    let mut out = Vec::new();
    let mut smaller = DeviceRegistry::new(TrustDomain::new("demo.vitalmq").expect("td"));
    smaller.insert_integrator(
        PrincipalId::new("int-site-01").expect("id"),
        SiteId::new("site-01").expect("site"),
    );
    h.session.replace_authorizer(
        Arc::new(PolicyAuthorizer::new(acl(|t| t), Arc::new(smaller))),
        &mut out,
    );
    assert_eq!(closed(&out), Some("connect_revoked"));
}

/// The test registry with `id` retired from `since` (Unix ms).
fn registry_retiring(id: &str, since: u64) -> Arc<DeviceRegistry> {
    let mut registry = registry();
    registry
        .change_history(&DeviceId::new(id).expect("id"), |h| h.retire(since))
        .expect("retire");
    Arc::new(registry)
}

#[test]
fn a_retired_device_is_refused_at_connect_and_a_reload_that_retires_it_closes_it() {
    // Retired in the past: CONNECT refused, audited as device_retired.
    let retired = registry_retiring("dev-00001", 1_000);
    let mut h = Harness::new(Role::Device, "dev-00001");
    h.session.authz = Arc::new(PolicyAuthorizer::new(acl(|t| t), retired.clone()));
    let out = h.client(v4_connect("dev-00001", None));
    assert_eq!(closed(&out), Some("connect_denied"));
    assert!(to_broker(&out).is_empty(), "nothing reaches rumqttd");
    let refused = h.audit.0.lock().expect("audit lock").clone();
    assert!(
        refused.iter().any(|r| r.event == Event::ConnectionRefused
            && r.reason.as_deref() == Some("device_retired")
            && r.rule.as_deref() == Some(crate::authz::RETIRED_RULE)),
        "{refused:?}"
    );
    // Another device of the same registry still connects.
    let mut h = Harness::new(Role::Device, "dev-00002");
    h.session.authz = Arc::new(PolicyAuthorizer::new(acl(|t| t), retired));
    let out = h.client(v4_connect("dev-00002", None));
    assert_eq!(out.first(), Some(&Output::OpenBroker(Version::V311)));

    // Retired only from a future instant: still admitted now.
    let mut h = Harness::new(Role::Device, "dev-00001");
    h.session.authz = Arc::new(PolicyAuthorizer::new(
        acl(|t| t),
        registry_retiring("dev-00001", u64::MAX / 2),
    ));
    let out = h.client(v4_connect("dev-00001", None));
    assert_eq!(out.first(), Some(&Output::OpenBroker(Version::V311)));

    // A reload whose registry retires a connected device closes its connection.
    let mut h = connected_v4(Role::Device, "dev-00001");
    let mut out = Vec::new();
    h.session.replace_authorizer(
        Arc::new(PolicyAuthorizer::new(
            acl(|t| t),
            registry_retiring("dev-00001", 1_000),
        )),
        &mut out,
    );
    assert_eq!(closed(&out), Some("connect_revoked"));
}

#[test]
fn acknowledge_and_drop_completes_qos2_without_routing() {
    let lenient = acl(|t| {
        t.replace(
            "denied_publish_v311 = \"disconnect\"",
            "denied_publish_v311 = \"ack_and_drop\"",
        )
    });
    let audit = Arc::new(Audit::default());
    let authz = Arc::new(PolicyAuthorizer::new(lenient, Arc::new(registry())));
    let mut h = Harness {
        session: GateSession::new(
            peer(Role::Device, "dev-00001"),
            "a",
            authz,
            audit.clone(),
            Arc::new(Unlimited),
            PASSWORD.into(),
        ),
        audit,
    };
    h.client(v4_connect("dev-00001", None));
    let out = h.client(v4_publish(
        "devices/dev-00002/telemetry",
        QoS::ExactlyOnce,
        9,
        b"x",
    ));
    assert!(to_broker(&out).is_empty());
    assert!(matches!(read_v4(&to_client(&out)[0]), v4::Packet::PubRec(r) if r.pkid == 9));
    let pubrel = v4::PubRel::new(9);
    let out = h.client(v4_bytes(|b| {
        pubrel.write(b).expect("encode");
    }));
    assert!(to_broker(&out).is_empty(), "the broker never saw pkid 9");
    assert!(matches!(read_v4(&to_client(&out)[0]), v4::Packet::PubComp(c) if c.pkid == 9));
}

#[test]
fn the_relay_is_told_to_wait_for_rumqttds_connack_before_closing() {
    // CONNECT and a denied PUBLISH in one read (pipelining): the gate closes the session
    // before rumqttd has answered the forwarded CONNECT.
    let mut h = Harness::new(Role::Device, "dev-00001");
    let mut both = BytesMut::from(&v4_connect("dev-00001", None)[..]);
    both.extend_from_slice(&v4_publish(
        "devices/dev-00002/telemetry",
        QoS::AtLeastOnce,
        1,
        b"x",
    ));
    let out = h.client(both.freeze());
    assert_eq!(closed(&out), Some("publish_denied"));
    assert!(
        h.session.awaiting_broker_connack(),
        "must not drop the internal connection yet"
    );
    let connack = v4_bytes(|b| {
        v4::ConnAck::new(v4::ConnectReturnCode::Success, false)
            .write(b)
            .expect("encode");
    });
    h.broker(connack);
    assert!(!h.session.awaiting_broker_connack());

    // A refused CONNECT never reached rumqttd: nothing to wait for.
    let mut h = Harness::new(Role::Device, "dev-00001");
    h.client(v4_connect("dev-00002", None));
    assert!(!h.session.awaiting_broker_connack());
}

// ---------------------------------------------------------------- connect outcome (issue 15)

fn v4_connack(code: v4::ConnectReturnCode) -> Bytes {
    v4_bytes(|b| {
        v4::ConnAck::new(code, false).write(b).expect("encode");
    })
}

fn v5_connack() -> Bytes {
    v4_bytes(|b| {
        v5::ConnAck {
            session_present: false,
            code: v5::ConnectReturnCode::Success,
            properties: None,
        }
        .write(b)
        .expect("encode");
    })
}

/// Takes records until it is told to fail, like an audit log whose disk filled up.
#[derive(Debug, Default)]
struct BreakableAudit {
    inner: Audit,
    broken: std::sync::atomic::AtomicBool,
}

impl AuditSink for BreakableAudit {
    fn record(&self, record: AuditRecord) -> Result<(), AuditUnavailable> {
        if self.broken.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(AuditUnavailable);
        }
        self.inner.record(record)
    }

    fn healthy(&self) -> bool {
        !self.broken.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[test]
fn a_connection_that_ends_before_rumqttds_connack_is_never_audited_as_accepted() {
    for ended in ["client_closed", "broker_closed", "handover_busy"] {
        let mut h = connected_v4(Role::Device, "dev-00001");
        h.session.finish(ended);
        h.session.finish(ended);
        let records = h.audit.0.lock().expect("audit lock").clone();
        assert_eq!(records.len(), 1, "{ended}: one record, once");
        assert_eq!(records[0].event, Event::ConnectionClosed);
        assert_eq!(records[0].reason.as_deref(), Some("closed_before_connack"));
        assert_eq!(
            records[0].details.get("ended").and_then(|v| v.as_str()),
            Some(ended)
        );
    }

    // The client left; rumqttd's CONNACK came while the relay waited for it: the
    // client never saw it, so the connection was not accepted either.
    let mut h = Harness::new(Role::Device, "dev-00001");
    let mut both = BytesMut::from(&v4_connect("dev-00001", None)[..]);
    both.extend_from_slice(&v4_publish(
        "devices/dev-00002/telemetry",
        QoS::AtLeastOnce,
        1,
        b"x",
    ));
    h.client(both.freeze());
    h.broker(v4_connack(v4::ConnectReturnCode::Success));
    h.session.finish("publish_denied");
    let events = h.audit.events();
    assert!(
        !events.iter().any(|e| e.0 == Event::ConnectionAccepted),
        "{events:?}"
    );
    assert_eq!(
        events.last(),
        Some(&(
            Event::ConnectionClosed,
            Some("connect".into()),
            Some("closed_before_connack".into())
        ))
    );
}

#[test]
fn a_connack_refusal_from_rumqttd_is_audited_as_refused_and_passed_on() {
    let mut h = connected_v4(Role::Device, "dev-00001");
    let out = h.broker(v4_connack(v4::ConnectReturnCode::ServiceUnavailable));
    assert!(matches!(
        read_v4(&to_client(&out)[0]),
        v4::Packet::ConnAck(a) if a.code == v4::ConnectReturnCode::ServiceUnavailable
    ));
    assert_eq!(closed(&out), Some("broker_refused"));
    h.session.finish("broker_refused");
    assert_eq!(
        h.audit.events(),
        vec![(
            Event::ConnectionRefused,
            Some("connect".into()),
            Some("broker_refused".into())
        )]
    );
}

#[test]
fn no_connack_reaches_the_client_when_its_accepted_record_cannot_be_written() {
    let audit = Arc::new(BreakableAudit::default());
    let mut session = GateSession::new(
        peer(Role::Device, "dev-00001"),
        "127.0.0.1:5555",
        authorizer(),
        audit.clone(),
        Arc::new(Unlimited),
        PASSWORD.into(),
    );
    let mut out = Vec::new();
    session.on_client_bytes(
        &mut BytesMut::from(&v4_connect("dev-00001", None)[..]),
        &mut out,
    );
    assert_eq!(out[0], Output::OpenBroker(Version::V311));
    audit
        .broken
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mut out = Vec::new();
    let connack = v4_connack(v4::ConnectReturnCode::Success);
    session.on_broker_bytes(&mut BytesMut::from(&connack[..]), &mut out);
    assert!(to_client(&out).is_empty(), "fail closed: no CONNACK");
    assert_eq!(closed(&out), Some("audit_unavailable"));
    assert!(session.is_closed());
    assert!(!session.awaiting_broker_connack(), "the pipe may close");

    // While the log is known broken, a CONNECT does not even reach rumqttd.
    for version in [Version::V311, Version::V5] {
        let mut session = GateSession::new(
            peer(Role::Device, "dev-00001"),
            "127.0.0.1:5555",
            authorizer(),
            audit.clone(),
            Arc::new(Unlimited),
            PASSWORD.into(),
        );
        let connect = match version {
            Version::V311 => v4_connect("dev-00001", None),
            Version::V5 => v5_connect("dev-00001"),
        };
        let mut out = Vec::new();
        session.on_client_bytes(&mut BytesMut::from(&connect[..]), &mut out);
        assert!(to_broker(&out).is_empty(), "{version:?}");
        assert!(!out.contains(&Output::OpenBroker(version)), "{version:?}");
        assert_eq!(closed(&out), Some("audit_unavailable"), "{version:?}");
        let refused = &to_client(&out)[0];
        match version {
            Version::V311 => assert!(matches!(
                read_v4(refused),
                v4::Packet::ConnAck(a) if a.code == v4::ConnectReturnCode::ServiceUnavailable
            )),
            Version::V5 => assert!(matches!(
                read_v5(refused),
                v5::Packet::ConnAck(a) if a.code == v5::ConnectReturnCode::ServerUnavailable
            )),
        }
    }
}

/// MQTT 3.1.1 3.1.2.10 and MQTT 5 3.1.2.10: a Keep Alive of 0 turns the mechanism off,
/// a valid CONNECT in both versions (issue 18 point 2); rumqttd refuses it, so the gate
/// owns liveness towards rumqttd.
#[test]
fn keepalive_0_is_accepted_and_the_gate_keeps_rumqttd_alive() {
    for version in [Version::V311, Version::V5] {
        let mut h = Harness::new(Role::Device, "dev-00001");
        let connect = match version {
            Version::V311 => {
                let mut c = v4::Connect::new("dev-00001");
                c.keep_alive = 0;
                v4_bytes(|b| {
                    c.write(b).expect("encode");
                })
            }
            Version::V5 => {
                let c = v5::Connect {
                    keep_alive: 0,
                    client_id: "dev-00001".into(),
                    clean_start: true,
                    properties: None,
                };
                v4_bytes(|b| {
                    c.write(&None, &None, b).expect("encode");
                })
            }
        };
        let out = h.client(connect);
        let forwarded = &to_broker(&out)[0];
        let keep_alive = match version {
            Version::V311 => match read_v4(forwarded) {
                v4::Packet::Connect(c) => c.keep_alive,
                other => panic!("{other:?}"),
            },
            Version::V5 => match read_v5(forwarded) {
                v5::Packet::Connect(c, _, _) => c.keep_alive,
                other => panic!("{other:?}"),
            },
        };
        assert!(keep_alive > 0, "{version:?}: rumqttd refuses keepalive 0");
        assert!(h.session.pings_broker());
        let connack = match version {
            Version::V311 => v4_connack(v4::ConnectReturnCode::Success),
            Version::V5 => v5_connack(),
        };
        assert_eq!(to_client(&h.broker(connack)).len(), 1);

        let mut out = Vec::new();
        h.session.ping_broker(&mut out);
        assert_eq!(to_broker(&out), vec![Bytes::from_static(&[0xC0, 0])]);
        // The client pings too: one PINGRESP is the gate's, one the client's.
        let out = h.client(Bytes::from_static(&[0xC0, 0]));
        assert_eq!(to_broker(&out), vec![Bytes::from_static(&[0xC0, 0])]);
        let pingresp = Bytes::from_static(&[0xD0, 0]);
        assert!(
            h.broker(pingresp.clone()).is_empty(),
            "the gate's own answer"
        );
        assert_eq!(
            to_client(&h.broker(pingresp)),
            vec![Bytes::from_static(&[0xD0, 0])]
        );
    }

    // A client with a keepalive keeps its own liveness.
    let h = connected_v4(Role::Device, "dev-00001");
    assert!(!h.session.pings_broker());
}

#[test]
fn a_second_connect_is_audited_and_closes_the_connection() {
    let mut h = connected_v4(Role::Device, "dev-00001");
    h.broker(v4_connack(v4::ConnectReturnCode::Success));
    let out = h.client(v4_connect("dev-00001", None));
    assert!(to_broker(&out).is_empty());
    assert_eq!(closed(&out), Some("second_connect"));
    assert_eq!(
        h.audit.events().last(),
        Some(&(Event::ConnectionClosed, None, Some("second_connect".into())))
    );

    let mut h = Harness::new(Role::Device, "dev-00001");
    h.client(v5_connect("dev-00001"));
    h.broker(v5_connack());
    let out = h.client(v5_connect("dev-00001"));
    assert_eq!(
        to_client(&out),
        vec![reply::disconnect_v5(
            v5::DisconnectReasonCode::ProtocolError
        )]
    );
    assert_eq!(closed(&out), Some("second_connect"));
}

#[test]
fn an_unknown_puback_is_audited_and_closes_the_connection_an_unknown_pubrel_gets_pubcomp() {
    let puback = |pkid| {
        v4_bytes(|b| {
            v4::PubAck::new(pkid).write(b).expect("encode");
        })
    };
    let pubrel = |pkid| {
        v4_bytes(|b| {
            v4::PubRel::new(pkid).write(b).expect("encode");
        })
    };
    let mut h = connected_v4(Role::Device, "dev-00001");
    h.broker(v4_connack(v4::ConnectReturnCode::Success));
    // Known ids pass: a QoS 1 PUBLISH delivered to the client, a PUBREC rumqttd sent.
    h.broker(v4_publish(
        "devices/dev-00001/ack",
        QoS::AtLeastOnce,
        7,
        b"r",
    ));
    assert_eq!(to_broker(&h.client(puback(7))), vec![puback(7)]);
    h.client(v4_publish(
        "devices/dev-00001/telemetry",
        QoS::ExactlyOnce,
        3,
        b"x",
    ));
    h.broker(v4_bytes(|b| {
        v4::PubRec::new(3).write(b).expect("encode");
    }));
    assert_eq!(to_broker(&h.client(pubrel(3))), vec![pubrel(3)]);

    // The same ids again are unknown now: a PUBACK for nothing delivered is refused; a
    // PUBREL is answered with PUBCOMP, as 3.1.1 4.3.3 requires of every PUBREL.
    let mut h = connected_v4(Role::Device, "dev-00001");
    h.broker(v4_connack(v4::ConnectReturnCode::Success));
    let out = h.client(pubrel(3));
    assert!(to_broker(&out).is_empty());
    assert_eq!(closed(&out), None);
    assert_eq!(
        to_client(&out),
        vec![reply::pubcomp_not_found(Version::V311, 3)]
    );
    let mut h = connected_v4(Role::Device, "dev-00001");
    h.broker(v4_connack(v4::ConnectReturnCode::Success));
    let out = h.client(puback(7));
    assert!(to_broker(&out).is_empty());
    assert_eq!(closed(&out), Some("unknown_packet_id"));
    let records = h.audit.0.lock().expect("audit lock").clone();
    let last = records.last().expect("a record");
    assert_eq!(last.event, Event::ConnectionClosed);
    assert_eq!(last.reason.as_deref(), Some("unknown_packet_id"));
}

// ------------------------------------------------------------- SUBSCRIBE limits

fn v4_subscribe_many(n: usize, pkid: u16) -> Bytes {
    let mut subscribe = v4::Subscribe::new_many(
        (0..n).map(|i| v4::SubscribeFilter::new(format!("d/{i}"), QoS::AtLeastOnce)),
    );
    subscribe.pkid = pkid;
    v4_bytes(|b| {
        subscribe.write(b).expect("encode");
    })
}

#[test]
fn a_subscribe_over_the_filter_limit_is_refused_whole_with_one_audit_record() {
    // The shipped policy allows a device 16 filters per SUBSCRIBE.
    let mut h = connected_v4(Role::Device, "dev-00001");
    let before = h.audit.events().len();
    let out = h.client(v4_subscribe_many(10_000, 7));
    assert!(to_broker(&out).is_empty(), "nothing reaches rumqttd");
    assert_eq!(closed(&out), None, "the connection stays");
    let v4::Packet::SubAck(ack) = read_v4(&to_client(&out)[0]) else {
        panic!("not a SUBACK")
    };
    assert_eq!(ack.pkid, 7);
    assert_eq!(ack.return_codes.len(), 10_000);
    assert!(
        ack.return_codes
            .iter()
            .all(|c| *c == v4::SubscribeReasonCode::Failure)
    );
    assert_eq!(
        h.audit.events()[before..],
        [(
            Event::AuthorizationDenied,
            Some("subscribe".into()),
            Some("too_many_filters".into())
        )]
    );

    // MQTT 5: 0x97 quota exceeded per filter.
    let mut h = Harness::new(Role::Device, "dev-00001");
    h.client(v5_connect("dev-00001"));
    let mut subscribe = v5::Subscribe::new_many(
        (0..17).map(|i| {
            v5::Filter::new(
                format!("devices/dev-00001/x{i}"),
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            )
        }),
        None,
    );
    subscribe.pkid = 8;
    let out = h.client(v4_bytes(|b| {
        subscribe.write(b).expect("encode");
    }));
    assert!(to_broker(&out).is_empty());
    let v5::Packet::SubAck(ack) = read_v5(&to_client(&out)[0]) else {
        panic!("not a SUBACK")
    };
    assert_eq!(ack.return_codes.len(), 17);
    assert!(
        ack.return_codes
            .iter()
            .all(|c| *c == v5::SubscribeReasonCode::QuotaExceeded)
    );
    // The one refusal record: the connection itself is audited only at rumqttd's
    // CONNACK, which this harness did not send.
    assert_eq!(h.audit.0.lock().expect("audit").len(), 1);
}

/// Refuses every SUBSCRIBE admission once, then admits; publishes always pass.
#[derive(Debug, Default)]
struct SubscribeLimitedOnce {
    calls: std::sync::atomic::AtomicUsize,
}

impl RateGate for SubscribeLimitedOnce {
    fn admit(&self, _bytes: usize) -> Result<(), Duration> {
        Ok(())
    }

    fn admit_subscribe(&self) -> Result<(), Duration> {
        if self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            Err(Duration::from_millis(100))
        } else {
            Ok(())
        }
    }
}

#[test]
fn a_subscribe_above_the_rate_waits_and_is_then_handled() {
    let mut h = Harness::with_rate(
        Role::Device,
        "dev-00001",
        Arc::new(SubscribeLimitedOnce::default()),
    );
    h.client(v4_connect("dev-00001", None));
    let mut sub = v4::Subscribe::new("devices/dev-00001/config", QoS::AtLeastOnce);
    sub.pkid = 3;
    let out = h.client(v4_bytes(|b| {
        sub.write(b).expect("encode");
    }));
    assert_eq!(out, vec![Output::Pause(Duration::from_millis(100))]);
    assert!(h.session.has_deferred());
    // The relay retries after the pause: now it is forwarded, nothing was audited (the
    // connection is audited only at rumqttd's CONNACK, which this harness did not send).
    let out = h.client(Bytes::new());
    assert_eq!(to_broker(&out).len(), 1);
    assert!(h.audit.events().is_empty(), "{:?}", h.audit.events());
}

// ------------------------------------------------------------- malformed packets

#[test]
fn malformed_fixed_headers_close_with_an_audit_record_and_0x81_in_mqtt5() {
    let publish_qos0_dup = {
        let mut b = BytesMut::from(
            &v4_publish("devices/dev-00001/telemetry", QoS::AtMostOnce, 0, b"x")[..],
        );
        b[0] |= 0b1000;
        b.freeze()
    };
    let subscribe_bad_flags = {
        let mut sub = v4::Subscribe::new("devices/dev-00001/config", QoS::AtLeastOnce);
        sub.pkid = 1;
        let mut b = BytesMut::from(
            &v4_bytes(|b| {
                sub.write(b).expect("encode");
            })[..],
        );
        b[0] = 0x80; // flags 0000 instead of 0010
        b.freeze()
    };
    let pingreq_with_body = Bytes::from_static(&[0xC0, 0x01, 0x00]);
    let unsubscribe_bad_flags = Bytes::from_static(&[0xA0, 0x05, 0x00, 0x01, 0x00, 0x01, b'a']);
    for (name, packet) in [
        ("QoS 0 with DUP", publish_qos0_dup),
        ("SUBSCRIBE flags", subscribe_bad_flags),
        ("PINGREQ body", pingreq_with_body),
        ("UNSUBSCRIBE flags", unsubscribe_bad_flags),
    ] {
        for v5 in [false, true] {
            let mut h = Harness::new(Role::Device, "dev-00001");
            if v5 {
                h.client(v5_connect("dev-00001"));
                // After the CONNACK: no DISCONNECT may come before it (MQTT-3.14.0-1).
                h.broker(v5_connack());
            } else {
                h.client(v4_connect("dev-00001", None));
            }
            let out = h.client(packet.clone());
            assert!(to_broker(&out).is_empty(), "{name}: forwarded");
            assert_eq!(closed(&out), Some("malformed_packet"), "{name}");
            if v5 {
                let v5::Packet::Disconnect(d) = read_v5(&to_client(&out)[0]) else {
                    panic!("{name}: not a DISCONNECT")
                };
                assert_eq!(d.reason_code, v5::DisconnectReasonCode::MalformedPacket);
            } else {
                assert!(to_client(&out).is_empty(), "{name}: 3.1.1 just closes");
            }
            assert_eq!(
                h.audit.events().last(),
                Some(&(
                    Event::ConnectionClosed,
                    None,
                    Some("malformed_packet".into())
                )),
                "{name}"
            );
        }
    }
}

#[test]
fn a_topic_alias_above_the_advertised_maximum_is_refused_with_0x94() {
    let (mut h, _) = connected_v5(Role::Device, "dev-00001", v5_connack());
    let max = crate::embedded::TOPIC_ALIAS_MAXIMUM;
    let out = h.client(v5_publish("devices/dev-00001/telemetry", Some(max), 1));
    assert_eq!(to_broker(&out).len(), 1, "the largest alias is fine");
    let out = h.client(v5_publish("devices/dev-00001/telemetry", Some(max + 1), 2));
    assert!(to_broker(&out).is_empty());
    let v5::Packet::Disconnect(d) = read_v5(&to_client(&out)[0]) else {
        panic!("not a DISCONNECT")
    };
    assert_eq!(d.reason_code, v5::DisconnectReasonCode::TopicAliasInvalid);
    assert_eq!(closed(&out), Some("topic_alias"));
    assert_eq!(
        h.audit.events().last(),
        Some(&(
            Event::ConnectionClosed,
            Some("publish".into()),
            Some("topic_alias_invalid".into())
        ))
    );
}

// ------------------------------------------------------------- retained telemetry

fn retained(bytes: Bytes) -> Bytes {
    let mut b = BytesMut::from(&bytes[..]);
    b[0] |= 0x01;
    b.freeze()
}

#[test]
fn retained_telemetry_is_stripped_and_audited_once_per_connection() {
    let mut h = connected_v4(Role::Device, "dev-00001");
    for pkid in 1..=3 {
        let out = h.client(retained(v4_publish(
            "devices/dev-00001/telemetry",
            QoS::AtLeastOnce,
            pkid,
            b"cose",
        )));
        let v4::Packet::Publish(p) = read_v4(&to_broker(&out)[0]) else {
            panic!("not a PUBLISH")
        };
        assert!(!p.retain, "retain flag reached rumqttd");
        assert_eq!((p.pkid, &p.payload[..]), (pkid, &b"cose"[..]));
    }
    let stripped = h
        .audit
        .events()
        .into_iter()
        .filter(|e| e.2.as_deref() == Some("retain_stripped"))
        .count();
    assert_eq!(stripped, 1);
}

#[test]
fn retained_telemetry_closes_the_connection_when_the_policy_refuses_it() {
    let authz: Arc<dyn Authorizer> = Arc::new(PolicyAuthorizer::new(
        acl(|t| {
            t.replace(
                "retained_telemetry = \"strip\"",
                "retained_telemetry = \"refuse\"",
            )
        }),
        Arc::new(registry()),
    ));
    for v5 in [false, true] {
        let audit = Arc::new(Audit::default());
        let mut h = Harness {
            session: GateSession::new(
                peer(Role::Device, "dev-00001"),
                "127.0.0.1:5555",
                Arc::clone(&authz),
                audit.clone(),
                Arc::new(Unlimited),
                PASSWORD.into(),
            ),
            audit,
        };
        let publish = if v5 {
            h.client(v5_connect("dev-00001"));
            h.broker(v5_connack());
            v5_publish("devices/dev-00001/telemetry", None, 1)
        } else {
            h.client(v4_connect("dev-00001", None));
            v4_publish("devices/dev-00001/telemetry", QoS::AtLeastOnce, 1, b"cose")
        };
        let out = h.client(retained(publish));
        assert!(to_broker(&out).is_empty());
        assert_eq!(closed(&out), Some("retain_refused"));
        if v5 {
            let v5::Packet::Disconnect(d) = read_v5(&to_client(&out)[0]) else {
                panic!("not a DISCONNECT")
            };
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::RetainNotSupported);
        }
        assert_eq!(
            h.audit.events().last(),
            Some(&(
                Event::AuthorizationDenied,
                Some("publish".into()),
                Some("retain_not_supported".into())
            ))
        );
    }
}

/// Grants publishes (and so wills) on `site/` topics only; everything else by default.
#[derive(Debug)]
struct SiteOnly;

impl Authorizer for SiteOnly {
    fn connect(
        &self,
        _who: &PeerIdentity,
        ask: Ask<'_, decision::Connect>,
    ) -> Result<Permit<decision::Connect>, Denial> {
        Ok(ask.grant("site-connect"))
    }

    fn publish(
        &self,
        _who: &PeerIdentity,
        ask: Ask<'_, decision::Publish>,
    ) -> Result<Permit<decision::Publish>, Denial> {
        if ask.resource().starts_with("site/") {
            Ok(ask.grant("site-publish"))
        } else {
            Err(Denial::not_authorized("site-only"))
        }
    }

    fn subscribe(
        &self,
        _who: &PeerIdentity,
        _ask: Ask<'_, decision::Subscribe>,
    ) -> Result<Permit<decision::Subscribe>, Denial> {
        Err(Denial::not_authorized("site-only"))
    }

    fn limits(&self, _who: &PeerIdentity) -> vitalmq_policies::RoleLimits {
        *acl(|t| t).limits(Role::Device)
    }

    fn policy_sha256(&self) -> &str {
        "00"
    }
}

/// An authorizer of its own answers through its asks: its permits forward (the will
/// by the default rule, a publish), its denials are audited with its rule.
#[test]
fn a_third_party_authorizer_grants_and_denies_through_its_asks() {
    let audit = Arc::new(Audit::default());
    let mut session = GateSession::new(
        peer(Role::Device, "dev-00001"),
        "127.0.0.1:5555",
        Arc::new(SiteOnly),
        audit.clone(),
        Arc::new(Unlimited),
        PASSWORD.into(),
    );
    let mut out = Vec::new();
    session.on_client_bytes(
        &mut BytesMut::from(&v4_connect("dev-00001", Some("site/will"))[..]),
        &mut out,
    );
    assert_eq!(out.first(), Some(&Output::OpenBroker(Version::V311)));
    let allowed = v4_publish("site/a", QoS::AtLeastOnce, 1, b"x");
    out.clear();
    session.on_client_bytes(&mut BytesMut::from(&allowed[..]), &mut out);
    assert_eq!(to_broker(&out), vec![allowed]);
    out.clear();
    session.on_client_bytes(
        &mut BytesMut::from(&v4_publish("other/a", QoS::AtLeastOnce, 2, b"x")[..]),
        &mut out,
    );
    assert!(to_broker(&out).is_empty());
    assert_eq!(closed(&out), Some("publish_denied"));
    let records = audit.0.lock().expect("audit lock");
    let denied = records.last().expect("a record");
    assert_eq!(denied.event, Event::AuthorizationDenied);
    assert_eq!(denied.rule.as_deref(), Some("site-only"));
    assert_eq!(denied.reason.as_deref(), Some("not_authorized"));
}

// ------------------------------------------------- MQTT 5 sessions (issue 18, point 4)

fn v5_connect_resuming(client_id: &str, session_expiry: u32) -> Bytes {
    let properties = v5::ConnectProperties {
        session_expiry_interval: Some(session_expiry),
        ..v5::ConnectProperties::new()
    };
    v5_connect_with(client_id, false, Some(properties))
}

fn v5_connack_session(session_present: bool) -> Bytes {
    v4_bytes(|b| {
        v5::ConnAck {
            session_present,
            code: v5::ConnectReturnCode::Success,
            properties: None,
        }
        .write(b)
        .expect("encode");
    })
}

fn v5_pubrel(pkid: u16) -> Bytes {
    v4_bytes(|b| {
        v5::PubRel::new(pkid, None).write(b).expect("encode");
    })
}

/// MQTT 5 3.1.2.4 / 3.2.2.1.1: with Clean Start=0 a session is resumed only if one was
/// kept, which only CONNACK's Session Present says. A PUBREL for a QoS 2 flow of an
/// earlier connection is legitimate in a resumed session (MQTT-4.4.0-1) and an unknown
/// packet id otherwise.
#[test]
fn mqtt5_3_2_2_1_1_a_pubrel_from_an_earlier_connection_passes_only_when_the_session_was_resumed() {
    let mut h = Harness::new(Role::Device, "dev-00001");
    h.client(v5_connect_resuming("dev-00001", 3600));
    h.broker(v5_connack_session(true));
    assert_eq!(to_broker(&h.client(v5_pubrel(4))), vec![v5_pubrel(4)]);

    // Clean Start=0, but rumqttd had no session to resume (none kept or it expired).
    let mut h = Harness::new(Role::Device, "dev-00001");
    h.client(v5_connect_resuming("dev-00001", 3600));
    h.broker(v5_connack_session(false));
    let out = h.client(v5_pubrel(4));
    assert!(to_broker(&out).is_empty());
    assert_eq!(closed(&out), None);
    // MQTT 5 3.7.2.1: PUBCOMP 0x92, Packet Identifier not found.
    assert_eq!(
        to_client(&out),
        vec![v4_bytes(|b| {
            v5::PubComp {
                pkid: 4,
                reason: v5::PubCompReason::PacketIdentifierNotFound,
                properties: None,
            }
            .write(b)
            .expect("encode");
        })]
    );
}

/// MQTT 5 3.14.2.2.2: the Session Expiry Interval a client sets on DISCONNECT reaches
/// rumqttd unchanged (it decides whether the session is kept).
#[test]
fn mqtt5_3_14_2_2_2_a_disconnect_with_session_expiry_reaches_the_broker_unchanged() {
    let mut h = Harness::new(Role::Device, "dev-00001");
    h.client(v5_connect_resuming("dev-00001", 3600));
    h.broker(v5_connack_session(false));
    let disconnect = v4_bytes(|b| {
        v5::Disconnect {
            reason_code: v5::DisconnectReasonCode::NormalDisconnection,
            properties: Some(v5::DisconnectProperties {
                session_expiry_interval: Some(0),
                reason_string: None,
                user_properties: vec![("k".into(), "v".into())],
                server_reference: None,
            }),
        }
        .write(b)
        .expect("encode");
    });
    let out = h.client(disconnect.clone());
    assert_eq!(to_broker(&out), vec![disconnect]);
    assert_eq!(closed(&out), None);
}

// ---------------------------------------------------------------- issue 18: client id, CONNACK limits

/// MQTT-3.1.3-8 (3.1.1): an empty client id with CleanSession = 0 is refused with CONNACK
/// 0x02 and audited, before the gate binds the certificate's id (which would hand the
/// client that id's persistent session). MQTT 5 3.1.3.1: the same CONNECT gets the
/// assigned id.
#[test]
fn mqtt_3_1_3_8_an_empty_id_without_clean_session_is_refused_with_0x02_in_311() {
    let mut h = Harness::new(Role::Device, "dev-00001");
    let mut c = v4::Connect::new("");
    c.clean_session = false;
    let out = h.client(v4_bytes(|b| {
        c.write(b).expect("encode");
    }));
    assert!(to_broker(&out).is_empty(), "rumqttd never sees it");
    let v4::Packet::ConnAck(ack) = read_v4(&to_client(&out)[0]) else {
        panic!("not a CONNACK")
    };
    assert_eq!(ack.code, v4::ConnectReturnCode::BadClientId);
    assert_eq!(closed(&out), Some("connect_denied"));
    assert_eq!(
        h.audit.events(),
        vec![(
            Event::ConnectionRefused,
            Some("connect".into()),
            Some("identifier_rejected".into())
        )]
    );

    // MQTT 5: Clean Start 0 with an empty id is answered with the assigned id.
    let mut h = Harness::new(Role::Device, "dev-00001");
    let out = h.client(v5_connect_with("", false, None));
    let v5::Packet::Connect(forwarded, _, _) = read_v5(&to_broker(&out)[0]) else {
        panic!("not a CONNECT")
    };
    assert_eq!(forwarded.client_id, "dev-00001");
    let v5::Packet::ConnAck(ack) = read_v5(&to_client(&h.broker(v5_connack()))[0]) else {
        panic!("not a CONNACK")
    };
    assert_eq!(ack.code, v5::ConnectReturnCode::Success);
    assert_eq!(
        ack.properties
            .and_then(|p| p.assigned_client_identifier)
            .as_deref(),
        Some("dev-00001")
    );
}

/// A connected MQTT 5 session of `role`/`id`; returns the CONNACK the client got.
fn connected_v5(role: Role, id: &str, broker_connack: Bytes) -> (Harness, v5::ConnAck) {
    let mut h = Harness::new(role, id);
    let out = h.client(v5_connect(id));
    assert_eq!(out.first(), Some(&Output::OpenBroker(Version::V5)));
    let v5::Packet::ConnAck(ack) = read_v5(&to_client(&h.broker(broker_connack))[0]) else {
        panic!("not a CONNACK")
    };
    (h, ack)
}

/// MQTT 5 3.2.2.3 (CONNACK properties): Maximum Packet Size (3.2.2.3.6), Receive
/// Maximum (3.2.2.3.3) and Topic Alias Maximum (3.2.2.3.8) are the limits the gate
/// enforces; availability flags stay absent (= available); rumqttd's own properties
/// are kept.
#[test]
fn mqtt5_3_2_2_3_connack_announces_the_limits_the_gate_enforces() {
    let broker_connack = v4_bytes(|b| {
        v5::ConnAck {
            session_present: true,
            code: v5::ConnectReturnCode::Success,
            properties: Some(v5::ConnAckProperties {
                session_expiry_interval: Some(3600),
                topic_alias_max: Some(TOPIC_ALIAS_MAXIMUM),
                ..super::connect::empty_connack_properties()
            }),
        }
        .write(b)
        .expect("encode");
    });
    let (_, ack) = connected_v5(Role::Integrator, "int-site-01", broker_connack);
    assert!(ack.session_present);
    let props = ack.properties.expect("CONNACK properties");
    assert_eq!(
        props.max_packet_size,
        Some(4096 + 1024),
        "role limit + headroom"
    );
    assert_eq!(props.receive_max, Some(1000));
    assert_eq!(props.topic_alias_max, Some(TOPIC_ALIAS_MAXIMUM));
    assert_eq!(props.session_expiry_interval, Some(3600), "rumqttd's kept");
    assert_eq!(
        props.assigned_client_identifier, None,
        "the client chose its id"
    );
    assert_eq!(props.max_qos, None, "QoS 2 is available");
    assert_eq!(props.retain_available, None);
    assert_eq!(props.wildcard_subscription_available, None);
    assert_eq!(props.subscription_identifiers_available, None);
    assert_eq!(props.shared_subscription_available, None);

    // Without properties from rumqttd, the limits are announced all the same.
    let (_, ack) = connected_v5(Role::Device, "dev-00001", v5_connack());
    let props = ack.properties.expect("CONNACK properties");
    assert_eq!(props.max_packet_size, Some(66_000 + 1024));
}

/// An MQTT 5 QoS 1 PUBLISH of `topic` whose whole packet is exactly `size` bytes.
fn v5_publish_of_size(topic: &str, pkid: u16, size: usize) -> Bytes {
    let encode = |payload_len: usize| {
        let mut p = v5::Publish::new(
            topic,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            vec![b'y'; payload_len],
            None,
        );
        p.pkid = pkid;
        v4_bytes(|b| {
            p.write(b).expect("encode");
        })
    };
    let overhead = encode(0).len();
    // The remaining length's own size grows with the packet; settle it.
    let mut payload = size - overhead;
    loop {
        let len = encode(payload).len();
        if len == size {
            return encode(payload);
        }
        payload = payload + size - len;
    }
}

/// MQTT-3.2.2-15 / MQTT 5 3.2.2.3.6: the gate enforces the Maximum Packet Size it
/// announced, on the whole packet: a PUBLISH of exactly that size passes (even with a
/// payload above the role's `max_payload_bytes`, which the headroom covers), one byte
/// more gets DISCONNECT 0x95 and an audit record.
#[test]
fn mqtt_3_2_2_15_the_announced_maximum_packet_size_is_what_is_enforced() {
    let topic = "alerts/site-01/ack/int-site-01";
    let (mut h, ack) = connected_v5(Role::Integrator, "int-site-01", v5_connack());
    let announced = ack
        .properties
        .and_then(|p| p.max_packet_size)
        .expect("announced") as usize;
    let at_limit = v5_publish_of_size(topic, 1, announced);
    assert_eq!(at_limit.len(), announced);
    let out = h.client(at_limit.clone());
    assert_eq!(to_broker(&out), vec![at_limit], "one at the limit passes");
    assert_eq!(closed(&out), None);
    let payload_over_role_limit = v5_publish_of_size(topic, 2, 4096 + 200);
    let out = h.client(payload_over_role_limit);
    assert_eq!(to_broker(&out).len(), 1, "whole-packet check, not payload");

    let out = h.client(v5_publish_of_size(topic, 3, announced + 1));
    assert!(to_broker(&out).is_empty());
    let v5::Packet::Disconnect(d) = read_v5(&to_client(&out)[0]) else {
        panic!("not a DISCONNECT")
    };
    assert_eq!(d.reason_code, v5::DisconnectReasonCode::PacketTooLarge);
    assert_eq!(closed(&out), Some("packet_too_large"));
    assert!(h.audit.events().contains(&(
        Event::MessageRefused,
        None,
        Some("packet_too_large".into())
    )));

    // 3.1.1 announces nothing: the role's payload limit applies as before.
    let mut h = connected_v4(Role::Integrator, "int-site-01");
    h.broker(v4_connack(v4::ConnectReturnCode::Success));
    let out = h.client(v4_publish(topic, QoS::AtLeastOnce, 1, &[0u8; 4097]));
    assert_eq!(closed(&out), Some("payload_too_large"));
}

fn v5_puback(pkid: u16) -> Bytes {
    v4_bytes(|b| {
        v5::PubAck::new(pkid, None).write(b).expect("encode");
    })
}

/// MQTT 5 3.3.4 (MQTT-3.3.4-7) and 4.9 flow control: the gate announces a Receive
/// Maximum and counts the client's QoS 1/2 PUBLISHes until rumqttd's PUBACK (PUBCOMP,
/// or PUBREC >= 0x80) reaches the client; one more than announced gets DISCONNECT 0x93.
#[test]
fn mqtt5_4_9_more_unacknowledged_publishes_than_the_receive_maximum_get_0x93() {
    let topic = "devices/dev-00001/telemetry";
    let (mut h, ack) = connected_v5(Role::Device, "dev-00001", v5_connack());
    let receive_max = ack
        .properties
        .and_then(|p| p.receive_max)
        .expect("announced");
    for pkid in 1..=receive_max {
        let out = h.client(v5_publish(topic, None, pkid));
        assert_eq!(to_broker(&out).len(), 1, "pkid {pkid} within the window");
    }
    assert_eq!(h.session.inbound_in_flight(), usize::from(receive_max));
    // A retransmission of a counted packet id is not a new one.
    assert_eq!(to_broker(&h.client(v5_publish(topic, None, 1))).len(), 1);
    // rumqttd's PUBACK reaching the client frees a place.
    assert_eq!(to_client(&h.broker(v5_puback(1))).len(), 1);
    let next = receive_max + 1;
    assert_eq!(to_broker(&h.client(v5_publish(topic, None, next))).len(), 1);
    // The window is full again: one more is a protocol violation.
    let out = h.client(v5_publish(topic, None, next + 1));
    assert!(to_broker(&out).is_empty());
    let v5::Packet::Disconnect(d) = read_v5(&to_client(&out)[0]) else {
        panic!("not a DISCONNECT")
    };
    assert_eq!(
        d.reason_code,
        v5::DisconnectReasonCode::ReceiveMaximumExceeded
    );
    assert_eq!(closed(&out), Some("receive_maximum_exceeded"));
    assert!(h.audit.events().contains(&(
        Event::ConnectionClosed,
        Some("publish".into()),
        Some("receive_maximum_exceeded".into())
    )));
}

/// MQTT 5 3.2.2.3.3 (Receive Maximum, absent = 65,535) and 3.1.4 (a client need not
/// wait for CONNACK): until the CONNACK announcing the gate's Receive Maximum has gone
/// to the client, the client may have up to 65,535 QoS 1/2 PUBLISHes in flight, so
/// the gate counts them but does not hold them to its own limit. Once announced, the
/// limit applies to what is in flight, including what came before the CONNACK.
#[test]
fn mqtt5_3_2_2_3_3_publishes_sent_before_the_connack_are_held_to_65535_not_the_announced_limit() {
    let topic = "devices/dev-00001/telemetry";
    let mut h = Harness::new(Role::Device, "dev-00001");
    let out = h.client(v5_connect("dev-00001"));
    assert_eq!(out.first(), Some(&Output::OpenBroker(Version::V5)));
    let early = super::limits::RECEIVE_MAXIMUM + 5;
    for pkid in 1..=early {
        let out = h.client(v5_publish(topic, None, pkid));
        assert_eq!(closed(&out), None, "pkid {pkid} sent before the CONNACK");
        assert_eq!(to_broker(&out).len(), 1, "pkid {pkid} forwarded");
    }
    assert_eq!(h.session.inbound_in_flight(), usize::from(early));
    let v5::Packet::ConnAck(ack) = read_v5(&to_client(&h.broker(v5_connack()))[0]) else {
        panic!("not a CONNACK")
    };
    let receive_max = ack
        .properties
        .and_then(|p| p.receive_max)
        .expect("announced");
    assert_eq!(receive_max, super::limits::RECEIVE_MAXIMUM);
    // Told the limit, the client waits until fewer than that are in flight.
    for pkid in 1..=6 {
        assert_eq!(to_client(&h.broker(v5_puback(pkid))).len(), 1);
    }
    let out = h.client(v5_publish(topic, None, early + 1));
    assert_eq!(
        closed(&out),
        None,
        "one below the limit again: room for one"
    );
    assert_eq!(to_broker(&out).len(), 1);
    // Now at the announced limit: one more is a protocol violation.
    let out = h.client(v5_publish(topic, None, early + 2));
    assert!(to_broker(&out).is_empty());
    let v5::Packet::Disconnect(d) = read_v5(&to_client(&out)[0]) else {
        panic!("not a DISCONNECT")
    };
    assert_eq!(
        d.reason_code,
        v5::DisconnectReasonCode::ReceiveMaximumExceeded
    );
}

/// MQTT 5 3.2.2.3.6 (Maximum Packet Size, absent = no limit) and 3.1.4: a PUBLISH sent
/// before the CONNACK is held to the same whole-packet limit the CONNACK then announces,
/// never to the stricter payload check of MQTT 3.1.1 (a payload above the role's
/// `max_payload_bytes` that fits the announced size passes, before and after).
#[test]
fn mqtt5_3_2_2_3_6_before_the_connack_the_size_check_is_no_stricter_than_the_announced_one() {
    let topic = "alerts/site-01/ack/int-site-01";
    let mut h = Harness::new(Role::Integrator, "int-site-01");
    h.client(v5_connect("int-site-01"));
    let announced = super::limits::max_packet_size(4096) as usize;
    let early = v5_publish_of_size(topic, 1, announced);
    let out = h.client(early.clone());
    assert_eq!(
        closed(&out),
        None,
        "a payload over the role limit, within the size"
    );
    assert_eq!(to_broker(&out), vec![early]);
    let out = h.client(v5_publish_of_size(topic, 2, announced + 1));
    assert_eq!(
        closed(&out),
        Some("packet_too_large"),
        "same limit as after"
    );
    // MQTT-3.14.0-1: no DISCONNECT before a CONNACK; the connection just closes
    // (MQTT 5 4.13.1).
    assert!(
        to_client(&out).is_empty(),
        "no DISCONNECT before the CONNACK"
    );
}

// ------------------------------------- the client's Maximum Packet Size (issue 18, 8)

/// An MQTT 5 CONNECT announcing the Maximum Packet Size `limit`.
fn v5_connect_with_limit(client_id: &str, limit: u32) -> Bytes {
    let properties = v5::ConnectProperties {
        max_packet_size: Some(limit),
        ..v5::ConnectProperties::new()
    };
    v5_connect_with(client_id, true, Some(properties))
}

/// rumqttd's successful CONNACK with a session expiry and a reason string.
fn v5_connack_with_reason(reason: &str) -> Bytes {
    v4_bytes(|b| {
        v5::ConnAck {
            session_present: false,
            code: v5::ConnectReturnCode::Success,
            properties: Some(v5::ConnAckProperties {
                session_expiry_interval: Some(60),
                reason_string: Some(reason.into()),
                user_properties: vec![("from".into(), "rumqttd".into())],
                ..super::connect::empty_connack_properties()
            }),
        }
        .write(b)
        .expect("encode");
    })
}

/// MQTT-3.1.2-24 / MQTT-3.2.2-19/20: the CONNACK the gate enlarges with its limits
/// stays within the client's Maximum Packet Size, its Reason String and User
/// Properties left out when they would not fit; one that cannot fit at all is not
/// sent: the connection closes (no DISCONNECT may precede a CONNACK, MQTT-3.14.0-1) and
/// is audited as refused, never as accepted.
#[test]
fn mqtt_3_1_2_24_the_connack_fits_the_clients_maximum_packet_size_or_is_not_sent() {
    let limit = 24;
    let mut h = Harness::new(Role::Device, "dev-00001");
    h.client(v5_connect_with_limit("dev-00001", limit));
    let out = h.broker(v5_connack_with_reason("session created on this connection"));
    let sent = to_client(&out);
    assert_eq!(sent.len(), 1, "a CONNACK");
    assert!(sent[0].len() <= limit as usize, "{} bytes", sent[0].len());
    let v5::Packet::ConnAck(ack) = read_v5(&sent[0]) else {
        panic!("not a CONNACK")
    };
    let props = ack.properties.expect("the limits");
    assert_eq!(props.reason_string, None, "left out to fit");
    assert!(props.user_properties.is_empty(), "left out to fit");
    assert_eq!(props.session_expiry_interval, Some(60), "kept");
    assert_eq!(props.receive_max, Some(super::limits::RECEIVE_MAXIMUM));
    assert!(props.max_packet_size.is_some());
    assert_eq!(closed(&out), None);
    assert!(h.session.is_accepted());

    // Smaller than the CONNACK's limits alone: nothing legal to leave out.
    let mut h = Harness::new(Role::Device, "dev-00001");
    h.client(v5_connect_with_limit("dev-00001", 12));
    let out = h.broker(v5_connack());
    assert!(to_client(&out).is_empty(), "no CONNACK, no DISCONNECT");
    assert_eq!(closed(&out), Some("connack_too_large"));
    assert!(!h.session.is_accepted());
    h.session.finish("client_closed");
    let events = h.audit.events();
    assert!(events.contains(&(
        Event::ConnectionRefused,
        Some("connect".into()),
        Some("connack_too_large".into())
    )));
    assert!(
        events.iter().all(|e| e.0 != Event::ConnectionAccepted),
        "{events:?}"
    );

    // A refusal the gate writes itself is held to the limit too.
    let mut h = Harness::new(Role::Device, "dev-00001");
    let out = h.client(v5_connect_with_limit("dev-00002", 4));
    assert!(to_client(&out).is_empty(), "a 5-byte CONNACK is too large");
    assert_eq!(closed(&out), Some("connect_denied"));
}

/// MQTT-3.1.2-24/25 and MQTT-3.9.2-1/2: a SUBACK the gate enlarges (refused filters
/// merged back) or writes itself stays within the client's Maximum Packet Size, without
/// rumqttd's Reason String and User Properties if need be; one that cannot fit is
/// discarded without being sent and the connection goes on.
#[test]
fn mqtt_3_1_2_25_a_suback_the_gate_enlarges_fits_the_clients_limit_or_is_discarded() {
    // Just the CONNACK with the gate's limits (16 bytes).
    let limit = 16;
    let mut h = Harness::new(Role::Device, "dev-00001");
    h.client(v5_connect_with_limit("dev-00001", limit));
    assert_eq!(
        to_client(&h.broker(v5_connack())).len(),
        1,
        "the CONNACK fits"
    );
    let qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
    let mut subscribe = v5::Subscribe::new_many(
        [
            v5::Filter::new("devices/dev-00001/config", qos),
            v5::Filter::new("#", qos),
            v5::Filter::new("devices/+/config", qos),
        ],
        None,
    );
    subscribe.pkid = 7;
    let out = h.client(v4_bytes(|b| {
        subscribe.write(b).expect("encode");
    }));
    assert_eq!(to_broker(&out).len(), 1, "the allowed filter is forwarded");
    // rumqttd measured its own SUBACK (one code, a reason string) against the limit
    // before the gate merged two refused codes into it.
    let broker_ack = v4_bytes(|b| {
        v5::SubAck {
            pkid: 7,
            return_codes: vec![v5::SubscribeReasonCode::Success(qos)],
            properties: Some(v5::SubAckProperties {
                reason_string: Some("granted".into()),
                user_properties: Vec::new(),
            }),
        }
        .write(b)
        .expect("encode");
    });
    let sent = to_client(&h.broker(broker_ack));
    assert_eq!(sent.len(), 1, "a SUBACK");
    assert!(sent[0].len() <= limit as usize, "{} bytes", sent[0].len());
    let v5::Packet::SubAck(ack) = read_v5(&sent[0]) else {
        panic!("not a SUBACK")
    };
    assert_eq!(ack.return_codes.len(), 3);
    assert_eq!(ack.properties.and_then(|p| p.reason_string), None);

    // Twelve refused filters: the gate's own SUBACK is 17 bytes, nothing to leave out.
    let mut subscribe = v5::Subscribe::new_many(
        (0..12).map(|i| v5::Filter::new(format!("other/{i}/#"), qos)),
        None,
    );
    subscribe.pkid = 8;
    let out = h.client(v4_bytes(|b| {
        subscribe.write(b).expect("encode");
    }));
    assert!(to_broker(&out).is_empty());
    assert!(to_client(&out).is_empty(), "discarded, not sent");
    assert_eq!(closed(&out), None, "the connection goes on");
}
