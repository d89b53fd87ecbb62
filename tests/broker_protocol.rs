//! MQTT protocol edges of the real `vitalmq broker` (issue 15, items 3 and 6): packets a
//! stock client will not send go over mutual TLS from `tests/py/raw_mqtt.py` (Python's
//! `ssl`, raw frames encoded here with rumqttc's codecs). Each test has its own PKI
//! (`vitalmq certs init`), the shipped ACL and its own broker on a free 127.0.0.1 port;
//! every outcome is read back from what the client received and the broker's audit log.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{BrokerProcess, broker_config, run, run_with_input, temp_dir};
use rumqttc::mqttbytes::{QoS, v4};
use rumqttc::v5::mqttbytes::{QoS as QoS5, v5};
use serde_json::Value as Json;

const TRUST_DOMAIN: &str = "demo.vitalmq";
/// Deadline of one client run or CLI command.
const CLIENT: Duration = Duration::from_secs(30);
/// How long to wait for an audit record that should come.
const EVENTUALLY: Duration = Duration::from_secs(10);

struct Broker {
    tmp: tempfile::TempDir,
    broker: BrokerProcess,
}

impl Broker {
    fn start(name: &str) -> Self {
        Self::start_with(name, |acl| acl)
    }

    /// With the shipped ACL edited by `edit_acl`.
    fn start_with(name: &str, edit_acl: impl FnOnce(String) -> String) -> Self {
        Self::start_configured(name, edit_acl, |config| config)
    }

    /// With the shipped ACL and the test broker configuration edited.
    fn start_configured(
        name: &str,
        edit_acl: impl FnOnce(String) -> String,
        edit_config: impl FnOnce(String) -> String,
    ) -> Self {
        let tmp = temp_dir(&format!("vitalmq-broker-protocol-{name}"));
        let pki = tmp.path().join("pki");
        let ran = run(
            Command::new(env!("CARGO_BIN_EXE_vitalmq")).args([
                "certs",
                "init",
                "--dir",
                pki.to_str().expect("UTF-8 path"),
                "--trust-domain",
                TRUST_DOMAIN,
                "--devices",
                "2",
                "--sites",
                "1",
            ]),
            CLIENT,
        );
        assert!(ran.success, "certs init: {}", ran.all());
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/examples/acl.toml");
        let acl = edit_acl(std::fs::read_to_string(shipped).expect("shipped ACL"));
        std::fs::write(tmp.path().join("acl.toml"), acl).expect("write ACL");
        let broker = BrokerProcess::start(
            Path::new(env!("CARGO_BIN_EXE_vitalmq")),
            tmp.path(),
            &edit_config(broker_config(TRUST_DOMAIN)),
            Duration::from_secs(20),
        );
        Self { tmp, broker }
    }

    fn pki(&self) -> PathBuf {
        self.tmp.path().join("pki")
    }

    fn audit_path(&self) -> PathBuf {
        self.tmp.path().join("broker-audit.jsonl")
    }

    /// Runs the raw client as `role/id` through `steps`.
    fn raw(&self, role: &str, id: &str, steps: &[Step]) -> Session {
        let ids = self.pki().join("identities").join(role);
        let steps: Vec<Json> = steps.iter().map(Step::json).collect();
        let input = serde_json::to_vec(&steps).expect("steps JSON");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/raw_mqtt.py");
        let ran = run_with_input(
            Command::new("python3")
                .arg(script)
                .arg("--port")
                .arg(self.broker.port.to_string())
                .arg("--ca")
                .arg(self.pki().join("ca/ca.pem"))
                .arg("--cert")
                .arg(ids.join(format!("{id}.pem")))
                .arg("--key")
                .arg(ids.join(format!("{id}.key.pem"))),
            Some(&input),
            CLIENT,
        );
        assert!(ran.success, "raw_mqtt.py: {}", ran.all());
        let out: Json = serde_json::from_str(ran.stdout.trim())
            .unwrap_or_else(|e| panic!("raw_mqtt.py output {e}: {}", ran.all()));
        Session {
            packets: out["packets"]
                .as_array()
                .expect("packets")
                .iter()
                .map(|p| hex::decode(p.as_str().expect("hex")).expect("hex"))
                .collect(),
            closed: out["closed"].as_bool().expect("closed"),
            error: out["error"].as_str().map(str::to_owned),
        }
    }

    fn records(&self) -> Vec<Json> {
        common::audit_records(&self.audit_path())
    }

    fn count(&self, fields: &[(&str, &str)]) -> usize {
        self.records()
            .iter()
            .filter(|r| common::has_fields(r, fields))
            .count()
    }

    /// Waits (with a deadline) until an audit record with these fields exists.
    fn audited(&self, fields: &[(&str, &str)]) {
        let deadline = Instant::now() + EVENTUALLY;
        while self.count(fields) == 0 {
            assert!(
                Instant::now() < deadline,
                "no audit record with {fields:?}; the log has:\n{}\nbroker:\n{}",
                self.records()
                    .iter()
                    .map(Json::to_string)
                    .collect::<Vec<_>>()
                    .join("\n"),
                self.broker.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

enum Step {
    Send(Vec<u8>),
    Recv(usize),
    Eof,
}

impl Step {
    fn json(&self) -> Json {
        match self {
            Self::Send(bytes) => serde_json::json!({ "send": hex::encode(bytes) }),
            Self::Recv(n) => serde_json::json!({ "recv": n }),
            Self::Eof => serde_json::json!({ "eof": true }),
        }
    }
}

/// What the raw client saw.
#[derive(Debug)]
struct Session {
    packets: Vec<Vec<u8>>,
    closed: bool,
    error: Option<String>,
}

impl Session {
    #[track_caller]
    fn ok(self) -> Self {
        assert_eq!(self.error, None, "{self:?}");
        self
    }
}

fn encode(write: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
    let mut buf = BytesMut::new();
    write(&mut buf);
    buf.to_vec()
}

fn connect_v4(id: &str) -> Vec<u8> {
    encode(|b| {
        v4::Connect::new(id).write(b).expect("CONNECT");
    })
}

fn connect_v5(id: &str) -> Vec<u8> {
    encode(|b| {
        v5::Connect {
            keep_alive: 30,
            client_id: id.into(),
            clean_start: true,
            properties: None,
        }
        .write(&None, &None, b)
        .expect("CONNECT");
    })
}

fn connect(v5: bool, id: &str) -> Vec<u8> {
    if v5 { connect_v5(id) } else { connect_v4(id) }
}

fn subscribe(v5: bool, pkid: u16, filters: &[String]) -> Vec<u8> {
    encode(|b| {
        if v5 {
            let mut s = v5::Subscribe::new_many(
                filters
                    .iter()
                    .map(|f| v5::Filter::new(f.clone(), QoS5::AtLeastOnce)),
                None,
            );
            s.pkid = pkid;
            s.write(b).expect("SUBSCRIBE");
        } else {
            let mut s = v4::Subscribe::new_many(
                filters
                    .iter()
                    .map(|f| v4::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
            );
            s.pkid = pkid;
            s.write(b).expect("SUBSCRIBE");
        }
    })
}

fn unsubscribe(v5: bool, pkid: u16, filters: &[&str]) -> Vec<u8> {
    encode(|b| {
        if v5 {
            let mut u = v5::Unsubscribe::new(filters[0], None);
            u.filters = filters.iter().map(|f| (*f).to_owned()).collect();
            u.pkid = pkid;
            u.write(b).expect("UNSUBSCRIBE");
        } else {
            let mut u = v4::Unsubscribe::new(filters[0]);
            u.topics = filters.iter().map(|f| (*f).to_owned()).collect();
            u.pkid = pkid;
            u.write(b).expect("UNSUBSCRIBE");
        }
    })
}

fn publish(v5: bool, topic: &str, pkid: u16, payload: &[u8], retain: bool) -> Vec<u8> {
    encode(|b| {
        if v5 {
            let mut p = v5::Publish::new(topic, QoS5::AtLeastOnce, payload.to_vec(), None);
            p.pkid = pkid;
            p.retain = retain;
            p.write(b).expect("PUBLISH");
        } else {
            let mut p = v4::Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
            p.pkid = pkid;
            p.retain = retain;
            p.write(b).expect("PUBLISH");
        }
    })
}

fn version(v5: bool) -> &'static str {
    if v5 { "5" } else { "3.1.1" }
}

fn spiffe(role: &str, id: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/{role}/{id}")
}

/// The packet type nibble.
fn kind(packet: &[u8]) -> u8 {
    packet[0] >> 4
}

/// The payload of a SUBACK or UNSUBACK (after packet id and, in MQTT 5, properties).
fn ack_codes(v5: bool, packet: &[u8]) -> Vec<u8> {
    let mut at = 1;
    while packet[at] & 0x80 != 0 {
        at += 1;
    }
    at += 1 + 2; // last length byte, packet id
    if v5 {
        assert_eq!(packet[at], 0, "no properties expected");
        at += 1;
    }
    packet[at..].to_vec()
}

// ------------------------------------------------------------------------ UNSUBACK

#[test]
fn unsubscribe_gets_one_unsuback_also_for_filters_not_held() {
    let broker = Broker::start("unsuback");
    for v5 in [false, true] {
        let id = "dev-00001";
        let session = broker
            .raw(
                "device",
                id,
                &[
                    Step::Send(connect(v5, id)),
                    Step::Recv(1),
                    // Never subscribed: the standard still requires an UNSUBACK.
                    Step::Send(unsubscribe(v5, 1, &["devices/dev-00001/config"])),
                    Step::Recv(1),
                    // One held, one not: one UNSUBACK with a reason each.
                    Step::Send(subscribe(v5, 2, &["devices/dev-00001/ack".into()])),
                    Step::Recv(1),
                    Step::Send(unsubscribe(
                        v5,
                        3,
                        &["devices/dev-00001/ack", "devices/dev-00001/config"],
                    )),
                    Step::Recv(1),
                    // Nothing else follows: the next answer is the PINGRESP.
                    Step::Send(vec![0xC0, 0x00]),
                    Step::Recv(1),
                ],
            )
            .ok();
        let p = &session.packets;
        assert_eq!(p.len(), 5, "{}: {p:02x?}", version(v5));
        assert_eq!(kind(&p[1]), 11, "UNSUBACK for a filter not held");
        assert_eq!(&p[1][2..4], &[0, 1], "packet id 1");
        assert_eq!(kind(&p[2]), 9, "SUBACK");
        assert_eq!(kind(&p[3]), 11, "UNSUBACK");
        assert_eq!(&p[3][2..4], &[0, 3], "packet id 3");
        assert_eq!(kind(&p[4]), 13, "PINGRESP, no second UNSUBACK");
        if v5 {
            assert_eq!(ack_codes(true, &p[1]), [0x11], "No subscription existed");
            assert_eq!(ack_codes(true, &p[3]), [0x00, 0x11]);
        } else {
            assert_eq!(p[1].len(), 4, "a 3.1.1 UNSUBACK carries no codes");
        }
    }
}

// ------------------------------------------------------------------------ retained telemetry

#[test]
fn retained_telemetry_is_not_stored_or_replayed_as_retained() {
    let broker = Broker::start("retain");
    let device = "dev-00001";
    let topic = "devices/dev-00001/telemetry";
    for v5 in [false, true] {
        broker
            .raw(
                "device",
                device,
                &[
                    Step::Send(connect(v5, device)),
                    Step::Recv(1),
                    Step::Send(publish(v5, topic, 1, b"retained-reading", true)),
                    Step::Recv(1), // PUBACK: the reading itself is routed
                ],
            )
            .ok();
    }
    // A later subscriber gets no retained copy: after its SUBACK the first PUBLISH it
    // sees is a fresh one sent after it subscribed (rumqttd sends retained messages
    // right after the SUBACK, so a stored one would come first).
    let fresh = publish(false, topic, 1, b"fresh", false);
    let watcher = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            broker.raw(
                "bridge",
                "bridge-01",
                &[
                    Step::Send(connect_v4("bridge-01")),
                    Step::Recv(1),
                    Step::Send(subscribe(false, 1, &["devices/+/telemetry".into()])),
                    Step::Recv(2), // SUBACK, then the first PUBLISH
                ],
            )
        });
        // Publish until the watcher has subscribed and seen it (it may subscribe
        // after our first try); each try is one whole connection.
        let deadline = Instant::now() + EVENTUALLY;
        while !watcher.is_finished() && Instant::now() < deadline {
            broker
                .raw(
                    "device",
                    device,
                    &[
                        Step::Send(connect_v4(device)),
                        Step::Recv(1),
                        Step::Send(fresh.clone()),
                        Step::Recv(1),
                    ],
                )
                .ok();
        }
        watcher.join().expect("watcher thread")
    })
    .ok();
    let first = &watcher.packets[2]; // after CONNACK and SUBACK
    assert_eq!(kind(first), 3, "a PUBLISH: {first:02x?}");
    assert_eq!(first[0] & 0x01, 0, "delivered as retained: {first:02x?}");
    assert!(
        first.ends_with(b"fresh"),
        "the stored retained reading came first: {first:02x?}"
    );
    broker.audited(&[
        ("/event", "message_refused"),
        ("/reason", "retain_stripped"),
        ("/actor/identity", &spiffe("device", device)),
    ]);
}

#[test]
fn retained_telemetry_closes_the_connection_when_the_policy_refuses_it() {
    let broker = Broker::start_with("retain-refuse", |acl| {
        acl.replace(
            "retained_telemetry = \"strip\"",
            "retained_telemetry = \"refuse\"",
        )
    });
    let device = "dev-00001";
    for v5 in [false, true] {
        let session = broker
            .raw(
                "device",
                device,
                &[
                    Step::Send(connect(v5, device)),
                    Step::Recv(1),
                    Step::Send(publish(v5, "devices/dev-00001/telemetry", 1, b"r", true)),
                    Step::Eof,
                ],
            )
            .ok();
        assert!(session.closed);
        if v5 {
            assert_eq!(
                session.packets[1][..3],
                [0xE0, 0x02, 0x9A],
                "DISCONNECT 0x9A"
            );
        } else {
            assert_eq!(
                session.packets.len(),
                1,
                "no PUBACK: {:02x?}",
                session.packets
            );
        }
    }
    broker.audited(&[
        ("/event", "authorization_denied"),
        ("/reason", "retain_not_supported"),
    ]);
}

// ------------------------------------------------------------------------ malformed packets

#[test]
fn malformed_packets_close_the_connection_with_the_standards_reason_and_an_audit_record() {
    let broker = Broker::start("malformed");
    let device = "dev-00001";
    let qos0_dup = {
        let mut p = encode(|b| {
            v4::Publish::new(
                "devices/dev-00001/telemetry",
                QoS::AtMostOnce,
                b"x".to_vec(),
            )
            .write(b)
            .expect("PUBLISH");
        });
        p[0] |= 0b1000;
        p
    };
    let subscribe_flags = {
        let mut s = subscribe(false, 1, &["devices/dev-00001/config".into()]);
        s[0] = 0x80; // SUBSCRIBE with flags 0000 instead of 0010
        s
    };
    let pingreq_body = vec![0xC0, 0x01, 0x00];
    let alias_above_max = encode(|b| {
        let mut p = v5::Publish::new(
            "devices/dev-00001/telemetry",
            QoS5::AtLeastOnce,
            b"x".to_vec(),
            Some(v5::PublishProperties {
                // rumqttd's CONNACK (passed on by the gate) advertises 64.
                topic_alias: Some(65),
                ..Default::default()
            }),
        );
        p.pkid = 1;
        p.write(b).expect("PUBLISH");
    });
    // (what, packet, MQTT 5, the DISCONNECT reason MQTT 5 gets)
    let cases: [(&str, Vec<u8>, bool, u8); 7] = [
        ("QoS 0 with DUP", qos0_dup.clone(), false, 0),
        ("QoS 0 with DUP", qos0_dup, true, 0x81),
        ("SUBSCRIBE flags", subscribe_flags.clone(), false, 0),
        ("SUBSCRIBE flags", subscribe_flags, true, 0x81),
        ("PINGREQ with a body", pingreq_body.clone(), false, 0),
        ("PINGREQ with a body", pingreq_body, true, 0x81),
        ("topic alias above the maximum", alias_above_max, true, 0x94),
    ];
    for (name, packet, v5, code) in cases {
        let session = broker
            .raw(
                "device",
                device,
                &[
                    Step::Send(connect(v5, device)),
                    Step::Recv(1),
                    Step::Send(packet),
                    Step::Eof,
                ],
            )
            .ok();
        assert!(session.closed, "{name}");
        let after_connack = &session.packets[1..];
        if v5 {
            assert_eq!(
                after_connack,
                [vec![0xE0, 0x02, code, 0x00]],
                "{name} (5): DISCONNECT 0x{code:02x}"
            );
        } else {
            assert!(
                after_connack.is_empty(),
                "{name} (3.1.1): {after_connack:02x?}"
            );
        }
    }
    let closed = |reason: &str| {
        broker.count(&[
            ("/event", "connection_closed"),
            ("/reason", reason),
            ("/actor/identity", &spiffe("device", device)),
        ])
    };
    let deadline = Instant::now() + EVENTUALLY;
    while (closed("malformed_packet") < 6 || closed("topic_alias_invalid") < 1)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(closed("malformed_packet"), 6);
    assert_eq!(closed("topic_alias_invalid"), 1);
}

// ------------------------------------------------------------------------ operators

#[test]
fn an_operator_not_in_the_registry_is_refused() {
    let broker = Broker::start("operator");
    let operator = "ops-01";
    // Enrolled by `certs init`: admitted.
    let session = broker
        .raw(
            "operator",
            operator,
            &[Step::Send(connect_v4(operator)), Step::Recv(1)],
        )
        .ok();
    assert_eq!(
        session.packets[0],
        [0x20, 0x02, 0x00, 0x00],
        "CONNACK accepted"
    );

    // Taken out of the registry (the certificate stays valid): refused after a reload.
    let registry = broker.pki().join("registry.toml");
    let text = std::fs::read_to_string(&registry).expect("registry");
    let without = text.replace("[[operators]]\nid = \"ops-01\"\n", "");
    assert_ne!(without, text, "certs init enrols its operator:\n{text}");
    std::fs::write(&registry, without).expect("write registry");
    let reloads = broker.count(&[("/event", "policy_reloaded")]);
    broker.broker.sighup();
    let deadline = Instant::now() + EVENTUALLY;
    while broker.count(&[("/event", "policy_reloaded")]) == reloads {
        assert!(
            Instant::now() < deadline,
            "no reload:\n{}",
            broker.broker.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for v5 in [false, true] {
        let session = broker
            .raw(
                "operator",
                operator,
                &[Step::Send(connect(v5, operator)), Step::Eof],
            )
            .ok();
        // CONNACK 0x05 not authorized (3.1.1) or 0x87 (5), then the close.
        let code = if v5 { 0x87 } else { 0x05 };
        assert!(session.closed);
        assert_eq!(session.packets.len(), 1, "{:02x?}", session.packets);
        assert_eq!(kind(&session.packets[0]), 2, "CONNACK");
        assert_eq!(session.packets[0][3], code, "{}", version(v5));
    }
    broker.audited(&[
        ("/event", "connection_refused"),
        ("/rule", "not-registered"),
        ("/actor/identity", &spiffe("operator", operator)),
    ]);
}

// ------------------------------------------------------------------------ retirement

/// Issue 19: `vitalmq registry retire` on the broker's registry, then a reload: the
/// retired device's CONNECT is refused (audited `device_retired`); the other device is
/// still admitted.
#[test]
fn a_device_retired_by_command_is_refused_after_a_reload() {
    let broker = Broker::start("retired");
    let device = "dev-00002";
    let accepted = [0x20, 0x02, 0x00, 0x00];
    let before = broker
        .raw(
            "device",
            device,
            &[Step::Send(connect_v4(device)), Step::Recv(1)],
        )
        .ok();
    assert_eq!(before.packets[0], accepted, "admitted before retirement");

    let registry = broker.pki().join("registry.toml");
    let reloads = broker.count(&[("/event", "policy_reloaded")]);
    let ran = run(
        Command::new(env!("CARGO_BIN_EXE_vitalmq")).args([
            "registry",
            "retire",
            "--registry",
            registry.to_str().expect("UTF-8 path"),
            "--device",
            device,
        ]),
        CLIENT,
    );
    assert!(ran.success, "registry retire: {}", ran.all());
    broker.broker.sighup();
    let deadline = Instant::now() + EVENTUALLY;
    while broker.count(&[("/event", "policy_reloaded")]) == reloads {
        assert!(
            Instant::now() < deadline,
            "no reload:\n{}",
            broker.broker.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for v5 in [false, true] {
        let session = broker
            .raw(
                "device",
                device,
                &[Step::Send(connect(v5, device)), Step::Eof],
            )
            .ok();
        let code = if v5 { 0x87 } else { 0x05 };
        assert!(session.closed);
        assert_eq!(session.packets.len(), 1, "{:02x?}", session.packets);
        assert_eq!(kind(&session.packets[0]), 2, "CONNACK");
        assert_eq!(session.packets[0][3], code, "{}", version(v5));
    }
    broker.audited(&[
        ("/event", "connection_refused"),
        ("/reason", "device_retired"),
        ("/rule", "registry.retired"),
        ("/actor/identity", &spiffe("device", device)),
    ]);
    let other = "dev-00001";
    let session = broker
        .raw(
            "device",
            other,
            &[Step::Send(connect_v4(other)), Step::Recv(1)],
        )
        .ok();
    assert_eq!(
        session.packets[0], accepted,
        "the other device is not retired"
    );
}

// ------------------------------------------------------------------------ SUBSCRIBE limits

/// The issue's probe: one SUBSCRIBE with 10,000 filters, five times. In MQTT 5 with
/// 5,000: 10,000 make a packet (~79 KB) above the Maximum Packet Size the CONNACK
/// announces for a device (its 66,000-byte payload limit plus 1,024), which is
/// DISCONNECT 0x95 (MQTT-3.2.2-15, issue 18), not a filter-limit refusal.
#[test]
fn a_subscribe_over_the_filter_limit_costs_one_audit_record() {
    let broker = Broker::start("filters");
    let device = "dev-00001";
    let audit_before = std::fs::metadata(broker.audit_path()).map_or(0, |m| m.len());
    for v5 in [false, true] {
        let count = if v5 { 5_000 } else { 10_000 };
        let filters: Vec<String> = (0..count).map(|i| format!("x/{i}")).collect();
        let mut steps = vec![Step::Send(connect(v5, device)), Step::Recv(1)];
        for pkid in 1..=5 {
            steps.push(Step::Send(subscribe(v5, pkid, &filters)));
            steps.push(Step::Recv(1));
        }
        let session = broker.raw("device", device, &steps).ok();
        assert!(!session.closed, "the connection stays");
        let refused = if v5 { 0x97 } else { 0x80 };
        for suback in &session.packets[1..] {
            assert_eq!(kind(suback), 9, "SUBACK");
            let codes = ack_codes(v5, suback);
            assert_eq!(codes.len(), count);
            assert!(codes.iter().all(|c| *c == refused), "{}", version(v5));
        }
    }
    let who = spiffe("device", device);
    let refused = [
        ("/event", "authorization_denied"),
        ("/reason", "too_many_filters"),
        ("/actor/identity", who.as_str()),
    ];
    let deadline = Instant::now() + EVENTUALLY;
    while broker.count(&refused) < 10 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(broker.count(&refused), 10, "one record per SUBSCRIBE");
    assert_eq!(
        broker.count(&[("/event", "authorization_denied"), ("/action", "subscribe")]),
        10,
        "no record per filter"
    );
    let audit_after = std::fs::metadata(broker.audit_path()).map_or(0, |m| m.len());
    eprintln!(
        "audit bytes for 5 SUBSCRIBEs of 10,000 and 5 of 5,000 filters (and 2 connects): {}",
        audit_after - audit_before
    );
}

// ------------------------------------------------------------------------ silent sockets

#[test]
fn silent_sockets_do_not_hold_back_a_real_client_and_are_closed() {
    use std::io::Read as _;
    // Few handshake slots and a handshake timeout far beyond the client's deadline: a
    // slot held by a silent socket would not come back in time.
    let broker = Broker::start_configured(
        "silent",
        |acl| acl,
        |config| {
            // Repeated refusals from one address are one record plus a count at the end
            // of the aggregation interval: a short one, so the count comes soon.
            config
                .replace(
                    "handshake_timeout_ms = 30000\n",
                    "handshake_timeout_ms = 120000\nfirst_byte_timeout_ms = 1500\nmax_concurrent_handshakes = 4\n",
                )
                .replace(
                    "path = \"broker-audit.jsonl\"",
                    "path = \"broker-audit.jsonl\"\naggregate_interval_s = 1",
                )
        },
    );
    let silent: Vec<std::net::TcpStream> = (0..20)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", broker.broker.port)).expect("connect"))
        .collect();
    let device = "dev-00001";
    let session = broker
        .raw(
            "device",
            device,
            &[Step::Send(connect_v4(device)), Step::Recv(1)],
        )
        .ok();
    assert_eq!(
        session.packets[0],
        [0x20, 0x02, 0x00, 0x00],
        "CONNACK accepted"
    );
    for mut socket in silent {
        socket
            .set_read_timeout(Some(EVENTUALLY))
            .expect("read timeout");
        let mut buf = [0u8; 1];
        match socket.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("silent socket not closed: {other:?}"),
        }
    }
    // Each refusal is a record of its own or counted in a summary's `details.repeats`.
    let silent_refusals = || -> u64 {
        broker
            .records()
            .iter()
            .filter(|r| r["event"] == "connection_refused" && r["reason"] == "silent")
            .map(common::refusals_represented)
            .sum()
    };
    let deadline = Instant::now() + EVENTUALLY;
    while silent_refusals() < 20 {
        assert!(
            Instant::now() < deadline,
            "not all silent sockets audited: {}",
            silent_refusals()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(silent_refusals(), 20);
}
