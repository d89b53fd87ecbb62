//! MQTT over mTLS with rumqttc: the bridge's connection to its broker and the upstream
//! sink's connection to a cloud broker (MQTT 3.1.1), and the alert publisher's
//! connection (MQTT 5, [`V5Endpoint`]: an alert's Message Expiry Interval, Content Type
//! and Payload Format Indicator are MQTT 5 properties). The TLS client configuration
//! and the rumqttc options come from `vitalmq_mqtt_client`, as for every vitalmq client.

use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use vitalmq_mqtt_client::{BadAddress, ConnectOptions, TlsError, options, tls};

use crate::config::BrokerLink;

/// Why the options of a broker link could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MqttSetupError {
    #[error(transparent)]
    Address(#[from] BadAddress),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A rustls client configuration presenting `link`'s certificate and trusting its CA.
pub fn tls_config(link: &BrokerLink) -> Result<Arc<ClientConfig>, TlsError> {
    tls::client_config_from_files(&link.ca, &link.cert, &link.key)
}

/// How the bridge connects: a persistent session with room for a large in-flight
/// window, rumqttc's 5 s connect timeout, and Nagle's algorithm off. Without the last,
/// each PUBACK can wait for the broker's delayed TCP ACK, and with rumqttd's fixed
/// window of 100 unacknowledged messages per subscriber that wait caps the bridge's
/// throughput.
fn connect_options(link: &BrokerLink, manual_acks: bool) -> ConnectOptions {
    ConnectOptions {
        keep_alive: Duration::from_secs(link.keepalive_s.max(5)),
        clean: false,
        max_packet_size: 1 << 20,
        inflight: Some(1000),
        manual_acks,
        ..network()
    }
}

/// The network part of [`connect_options`].
fn network() -> ConnectOptions {
    ConnectOptions {
        connect_timeout: Duration::from_secs(5),
        tcp_nodelay: true,
        ..ConnectOptions::default()
    }
}

/// MQTT 3.1.1 options for a persistent session (clean session off) over mTLS.
/// `manual_acks`: the caller acknowledges each incoming PUBLISH itself, after it is
/// durable.
pub fn options(
    link: &BrokerLink,
    client_id: &str,
    manual_acks: bool,
) -> Result<rumqttc::MqttOptions, MqttSetupError> {
    let (host, port) = vitalmq_mqtt_client::host_port(&link.address)?;
    let tls = tls_config(link)?;
    Ok(options::v4_options(
        &host,
        port,
        client_id,
        &tls,
        &connect_options(link, manual_acks),
    ))
}

/// A client and its event loop for `options`, with the bridge's network options
/// (Nagle's algorithm off).
pub fn client(
    options: rumqttc::MqttOptions,
    capacity: usize,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    options::v4_client(options, capacity, &network())
}

/// Where and as whom the alert publisher connects: MQTT 5 over mTLS, a clean start and
/// no session kept (Session Expiry Interval 0), so that no PUBLISH of a failed
/// connection is retransmitted on a new one (see `crate::link5`).
#[derive(Clone)]
pub struct V5Endpoint {
    host: String,
    port: u16,
    client_id: String,
    tls: Arc<ClientConfig>,
    connect: ConnectOptions,
}

impl std::fmt::Debug for V5Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("V5Endpoint")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl V5Endpoint {
    /// The endpoint of `link` (address, CA, certificate and key) as `client_id`, with
    /// the bridge's keep-alive, packet size and network options.
    pub fn new(link: &BrokerLink, client_id: &str) -> Result<Self, MqttSetupError> {
        let (host, port) = vitalmq_mqtt_client::host_port(&link.address)?;
        Ok(Self {
            host,
            port,
            client_id: client_id.to_owned(),
            tls: tls_config(link)?,
            connect: ConnectOptions {
                clean: true,
                manual_acks: false,
                ..connect_options(link, false)
            },
        })
    }

    /// A new client and its event loop (not connected until polled).
    pub fn client(&self, capacity: usize) -> (rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop) {
        options::v5_client(
            &self.host,
            self.port,
            &self.client_id,
            &self.tls,
            &self.connect,
            capacity,
        )
    }
}
