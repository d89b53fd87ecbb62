//! rumqttd, embedded in the process. The gate hands each authorized client connection
//! to it as one end of an in-memory byte pipe (`tokio::io::duplex`), so rumqttd does
//! all the MQTT work exactly as for a socket, without a loopback TCP hop: no kernel
//! TCP stack, no extra descriptors and no accept loop per message path, and no
//! listener anyone else on the machine could reach. (Loopback listeners cost about
//! half of the broker's CPU at 10,000 msg/s, in the TCP stack and thread switches.)
//!
//! Every CONNECT the gate forwards still carries a per-process random password that
//! rumqttd's auth handler checks: a stream that did not pass the gate's CONNECT rewrite
//! is refused. Segments are kept small so a burst does not leave a large message log
//! in memory.

use std::sync::Arc;

use rumqttd::protocol::{v4::V4, v5::V5};
use rumqttd::{Config, ConnectionSettings, RouterConfig, StreamServer};
use serde::Deserialize;
use subtle::ConstantTimeEq as _;
use tokio::io::DuplexStream;

use crate::gate::Version;
use crate::handover::{Handover, HandoverBusy, Handovers};

/// Tuning of the embedded broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedSettings {
    pub max_connections: usize,
    /// Largest PUBLISH payload rumqttd accepts (the gate enforces per-role limits first).
    pub max_payload_bytes: usize,
    pub max_inflight: usize,
    /// Bytes per commit-log segment and segments kept per topic log. rumqttd skips a
    /// subscriber that lags by more than this ahead, losing QoS 1 messages it has
    /// already acknowledged to their publisher; 64 KiB x 2 lost messages at 20,000
    /// msg/s in the benchmark, 4 MiB x 4 none up to 120,000. End-to-end receipts (SPEC
    /// section 4) are what make such a loss recoverable.
    pub segment_bytes: usize,
    pub segment_count: usize,
    pub max_outgoing_packets: u64,
    /// Bytes each direction of a gate <-> rumqttd pipe holds before the writer waits:
    /// the backpressure a socket buffer gave. Pipes start empty and grow to this.
    pub pipe_bytes: usize,
}

impl Default for EmbeddedSettings {
    fn default() -> Self {
        Self {
            max_connections: 50_000,
            max_payload_bytes: 1 << 20,
            max_inflight: 100,
            segment_bytes: 4 << 20,
            segment_count: 4,
            max_outgoing_packets: 200,
            pipe_bytes: 64 << 10,
        }
    }
}

/// The Topic Alias Maximum rumqttd advertises in its MQTT 5 CONNACK (which the gate
/// passes on); the gate resolves client aliases itself and refuses larger ones.
pub(crate) const TOPIC_ALIAS_MAXIMUM: u16 = rumqttd::TOPIC_ALIAS_MAX;

/// A running embedded rumqttd: its router thread, and one in-process server per MQTT
/// version (rumqttd keeps pending will messages per server, so all connections of a
/// version share one for will-delay cancellation and session takeover to behave as
/// the protocol says).
pub struct EmbeddedBroker {
    v4: StreamServer<V4>,
    v5: StreamServer<V5>,
    password: Arc<str>,
    pipe_bytes: usize,
    handovers: Handovers,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("pipe_bytes", &self.pipe_bytes)
            .finish_non_exhaustive()
    }
}

/// Why the embedded broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("randomness unavailable for the internal secret")]
    Random,
}

impl EmbeddedBroker {
    /// Starts rumqttd's router (its own thread). Connections are served on the tokio
    /// runtime that calls [`Self::connect`].
    pub fn start(settings: &EmbeddedSettings) -> Result<Self, EmbeddedError> {
        let mut secret = [0u8; 32];
        rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, &mut secret)
            .map_err(|_| EmbeddedError::Random)?;
        let password: Arc<str> = hex::encode(secret).into();
        let connections = || {
            let expected = Arc::clone(&password);
            let mut connections = ConnectionSettings {
                connection_timeout_ms: 10_000,
                max_payload_size: settings.max_payload_bytes,
                max_inflight_count: settings.max_inflight,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            };
            connections.set_auth_handler(move |_client: String, _user: String, pass: String| {
                let ok = bool::from(pass.as_bytes().ct_eq(expected.as_bytes()));
                async move { ok }
            });
            connections
        };
        let config = Config {
            id: 0,
            router: RouterConfig {
                max_connections: settings.max_connections,
                max_outgoing_packet_count: settings.max_outgoing_packets,
                max_segment_size: settings.segment_bytes,
                max_segment_count: settings.segment_count,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: Default::default(),
            },
            ..Config::default()
        };
        let broker = rumqttd::Broker::new(config);
        tracing::info!("embedded rumqttd started (in-process connections)");
        Ok(Self {
            v4: broker.stream_server_v4(connections()),
            v5: broker.stream_server_v5(connections()),
            password,
            pipe_bytes: settings.pipe_bytes.max(4096),
            handovers: Handovers::default(),
        })
    }

    /// Opens a connection to rumqttd for a client speaking `version`: returns the
    /// gate's end of the pipe; rumqttd serves the other end on this tokio runtime.
    pub fn connect(&self, version: Version) -> DuplexStream {
        let (gate, broker) = tokio::io::duplex(self.pipe_bytes);
        match version {
            Version::V311 => self.v4.serve(broker),
            Version::V5 => self.v5.serve(broker),
        };
        gate
    }

    /// [`Self::connect`] for `client_id` once no other connection of that client id is
    /// being handed over (waiting at most `wait`); the caller holds the [`Handover`]
    /// until rumqttd's CONNACK or the end of the connection. See [`crate::handover`].
    pub(crate) async fn hand_over(
        &self,
        client_id: &str,
        version: Version,
        wait: std::time::Duration,
    ) -> Result<(DuplexStream, Handover), HandoverBusy> {
        let handover = self.handovers.begin(client_id, wait).await?;
        Ok((self.connect(version), handover))
    }

    /// Waits (at most `wait`) until no connection of `client_id` is being handed over,
    /// for closing one: the caller holds the [`Handover`] until rumqttd has closed its
    /// end, so rumqttd has queued the old connection's disconnect before a new CONNECT
    /// of the client id can reach it (see [`crate::handover`]).
    pub(crate) async fn hand_back(
        &self,
        client_id: &str,
        wait: std::time::Duration,
    ) -> Result<Handover, HandoverBusy> {
        self.handovers.begin(client_id, wait).await
    }

    /// The password the gate puts into every forwarded CONNECT.
    pub fn password(&self) -> Arc<str> {
        Arc::clone(&self.password)
    }
}
