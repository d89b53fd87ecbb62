//! The embedded rumqttd listens on loopback, but only the gate may use it: a CONNECT
//! without the per-process secret is refused, one with it is accepted.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use vitalmq_broker::embedded::{EmbeddedBroker, EmbeddedSettings};
use vitalmq_broker::gate::Version;

/// Sends a 3.1.1 CONNECT with `password`; returns the CONNACK return code, or `None`
/// when the connection was closed without one.
fn connect_with(addr: std::net::SocketAddr, password: &str) -> Option<u8> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut connect = v4::Connect::new("outsider");
    connect.login = Some(v4::Login::new("anyone", password));
    let mut buf = BytesMut::new();
    connect.write(&mut buf).expect("encode");
    stream.write_all(&buf).expect("send");
    let mut ack = [0u8; 4];
    match stream.read_exact(&mut ack) {
        Ok(()) if ack[0] == 0x20 => Some(ack[3]),
        _ => None,
    }
}

#[test]
fn only_the_gate_secret_opens_the_internal_listeners() {
    let settings = EmbeddedSettings {
        listeners: 2,
        ..EmbeddedSettings::default()
    };
    let embedded = EmbeddedBroker::start(&settings).expect("embedded rumqttd starts");
    let first = embedded.addr(Version::V311);
    let second = embedded.addr(Version::V311);
    assert_ne!(first, second, "round-robin over the internal listeners");
    assert!(first.ip().is_loopback());

    for addr in [first, second] {
        assert_ne!(
            connect_with(addr, "guess"),
            Some(0),
            "a wrong password must not be accepted"
        );
        assert_eq!(
            connect_with(addr, &embedded.password()),
            Some(0),
            "the gate's secret is accepted"
        );
    }
}
