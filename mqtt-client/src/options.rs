//! From a target, a client id, a TLS client configuration and a few choices to rumqttc's
//! options and client: the only place in vitalmq that configures rumqttc.

use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use serde::Serialize;

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MqttVersion {
    #[serde(rename = "3.1.1")]
    V311,
    #[serde(rename = "5")]
    V5,
}

/// A version string that is neither 3.1.1 nor 5.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown MQTT version {0:?} (3.1.1 or 5)")]
pub struct UnknownVersion(pub String);

impl std::str::FromStr for MqttVersion {
    type Err = UnknownVersion;
    fn from_str(s: &str) -> Result<Self, UnknownVersion> {
        match s {
            "3.1.1" | "311" | "4" | "v4" => Ok(Self::V311),
            "5" | "v5" | "5.0" => Ok(Self::V5),
            _ => Err(UnknownVersion(s.to_owned())),
        }
    }
}

/// Where to connect.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub version: MqttVersion,
}

/// An address that is not `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?}: expected host:port")]
pub struct BadAddress(pub String);

/// Splits `host:port` (an IPv6 host in brackets loses them).
pub fn host_port(address: &str) -> Result<(String, u16), BadAddress> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| BadAddress(address.to_owned()))?;
    let port = port.parse().map_err(|_| BadAddress(address.to_owned()))?;
    Ok((host.trim_matches(['[', ']']).to_owned(), port))
}

/// Quality of service of a PUBLISH or subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    AtMostOnce,
    AtLeastOnce,
    ExactlyOnce,
}

impl Qos {
    /// 0, 1, or (anything higher) 2.
    pub fn from_level(level: u8) -> Self {
        match level {
            0 => Self::AtMostOnce,
            1 => Self::AtLeastOnce,
            _ => Self::ExactlyOnce,
        }
    }

    pub(crate) fn v4(self) -> rumqttc::QoS {
        match self {
            Self::AtMostOnce => rumqttc::QoS::AtMostOnce,
            Self::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
            Self::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
        }
    }

    pub(crate) fn v5(self) -> rumqttc::v5::mqttbytes::QoS {
        use rumqttc::v5::mqttbytes::QoS;
        match self {
            Self::AtMostOnce => QoS::AtMostOnce,
            Self::AtLeastOnce => QoS::AtLeastOnce,
            Self::ExactlyOnce => QoS::ExactlyOnce,
        }
    }
}

/// What differs between vitalmq's connections.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub keep_alive: Duration,
    /// TCP, TLS and CONNACK together must complete within this.
    pub connect_timeout: Duration,
    /// Clean session (3.1.1) / clean start (5).
    pub clean: bool,
    /// Largest packet either way, bytes.
    pub max_packet_size: usize,
    /// Outgoing QoS 1/2 PUBLISHes without acknowledgement (3.1.1); rumqttc's default
    /// when `None`.
    pub inflight: Option<u16>,
    /// The caller acknowledges each incoming PUBLISH itself (3.1.1).
    pub manual_acks: bool,
    /// Nagle's algorithm off. rumqttc leaves it on and flushes every acknowledgement on
    /// its own, so each PUBACK can wait for the peer's delayed TCP ACK.
    pub tcp_nodelay: bool,
}

impl Default for ConnectOptions {
    /// A clean session with a 15 s keep-alive, 10 s to connect and 128 KiB packets.
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(10),
            clean: true,
            max_packet_size: 1 << 17,
            inflight: None,
            manual_acks: false,
            tcp_nodelay: false,
        }
    }
}

impl ConnectOptions {
    fn timeout_s(&self) -> u64 {
        self.connect_timeout.as_secs().max(1)
    }
}

fn transport(tls: &Arc<ClientConfig>) -> rumqttc::Transport {
    rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::clone(tls)))
}

/// MQTT 3.1.1 options over mTLS with `tls`.
pub fn v4_options(
    host: &str,
    port: u16,
    client_id: &str,
    tls: &Arc<ClientConfig>,
    o: &ConnectOptions,
) -> rumqttc::MqttOptions {
    let mut m = rumqttc::MqttOptions::new(client_id, host, port);
    m.set_transport(transport(tls))
        .set_keep_alive(o.keep_alive)
        .set_clean_session(o.clean)
        .set_manual_acks(o.manual_acks)
        .set_max_packet_size(o.max_packet_size, o.max_packet_size);
    if let Some(n) = o.inflight {
        m.set_inflight(n);
    }
    m
}

/// A 3.1.1 client and its event loop for `options`, with the network options of `o`.
pub fn v4_client(
    options: rumqttc::MqttOptions,
    capacity: usize,
    o: &ConnectOptions,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, capacity);
    let mut network = eventloop.network_options();
    network.set_connection_timeout(o.timeout_s());
    network.set_tcp_nodelay(o.tcp_nodelay);
    eventloop.set_network_options(network);
    (client, eventloop)
}

/// An MQTT 5 client and its event loop over mTLS with `tls`.
pub fn v5_client(
    host: &str,
    port: u16,
    client_id: &str,
    tls: &Arc<ClientConfig>,
    o: &ConnectOptions,
    capacity: usize,
) -> (rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop) {
    let mut m = rumqttc::v5::MqttOptions::new(client_id, host, port);
    m.set_transport(transport(tls))
        .set_keep_alive(o.keep_alive)
        .set_clean_start(o.clean)
        .set_manual_acks(o.manual_acks)
        .set_connection_timeout(o.timeout_s())
        .set_max_packet_size(Some(u32::try_from(o.max_packet_size).unwrap_or(u32::MAX)));
    let mut network = m.network_options();
    network.set_tcp_nodelay(o.tcp_nodelay);
    m.set_network_options(network);
    rumqttc::v5::AsyncClient::new(m, capacity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_addresses_parse() {
        assert_eq!("3.1.1".parse(), Ok(MqttVersion::V311));
        assert_eq!("v5".parse(), Ok(MqttVersion::V5));
        assert!("6".parse::<MqttVersion>().is_err());
        assert_eq!(host_port("[::1]:8883"), Ok(("::1".to_owned(), 8883)));
        assert_eq!(host_port("broker:1883"), Ok(("broker".to_owned(), 1883)));
        assert!(host_port("broker").is_err());
        assert!(host_port("broker:x").is_err());
    }
}
