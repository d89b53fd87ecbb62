//! rumqttd, embedded in the process on internal loopback listeners only the gate uses.
//!
//! Every CONNECT the gate forwards carries a per-process random password that rumqttd's
//! auth handler checks, so nothing else on the machine can use these listeners even
//! though they are plain TCP on 127.0.0.1. Several listeners per protocol version are
//! opened and used round-robin, each with no delay after accept (rumqttd's default
//! sleeps after every accept, capping a listener near 1,000 connections per second).
//! Segments are kept small so a burst does not leave a large message log in memory.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};
use serde::Deserialize;

use crate::gate::Version;

/// Tuning of the embedded broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedSettings {
    /// Internal listeners per protocol version.
    pub listeners: usize,
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
}

impl Default for EmbeddedSettings {
    fn default() -> Self {
        Self {
            listeners: 4,
            max_connections: 50_000,
            max_payload_bytes: 1 << 20,
            max_inflight: 100,
            segment_bytes: 4 << 20,
            segment_count: 4,
            max_outgoing_packets: 200,
        }
    }
}

/// A running embedded rumqttd.
#[derive(Debug)]
pub struct EmbeddedBroker {
    v4: Vec<SocketAddr>,
    v5: Vec<SocketAddr>,
    password: Arc<str>,
    next: AtomicUsize,
}

/// Why the embedded broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("no free internal port: {0}")]
    Port(std::io::Error),
    #[error("randomness unavailable for the internal secret")]
    Random,
    #[error("rumqttd did not start listening within {0:?}")]
    NotListening(Duration),
    #[error("starting the rumqttd thread: {0}")]
    Thread(std::io::Error),
}

impl EmbeddedBroker {
    pub fn start(settings: &EmbeddedSettings) -> Result<Self, EmbeddedError> {
        let mut secret = [0u8; 32];
        rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, &mut secret)
            .map_err(|_| EmbeddedError::Random)?;
        let password: Arc<str> = hex::encode(secret).into();
        let listeners = settings.listeners.max(1);
        let v4 = free_ports(listeners)?;
        let v5 = free_ports(listeners)?;

        let server = |name: String, listen: SocketAddr| {
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
                let ok = constant_time_eq(pass.as_bytes(), expected.as_bytes());
                async move { ok }
            });
            (
                name.clone(),
                ServerSettings {
                    name,
                    listen,
                    tls: None,
                    next_connection_delay_ms: 0,
                    connections,
                },
            )
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
            v4: Some(
                v4.iter()
                    .enumerate()
                    .map(|(i, a)| server(format!("v4-{i}"), *a))
                    .collect::<HashMap<_, _>>(),
            ),
            v5: Some(
                v5.iter()
                    .enumerate()
                    .map(|(i, a)| server(format!("v5-{i}"), *a))
                    .collect::<HashMap<_, _>>(),
            ),
            ..Config::default()
        };
        std::thread::Builder::new()
            .name("rumqttd".into())
            .spawn(move || {
                let mut broker = rumqttd::Broker::new(config);
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "embedded rumqttd stopped");
                }
            })
            .map_err(EmbeddedError::Thread)?;
        let deadline = Duration::from_secs(10);
        let started = Instant::now();
        for (addr, version) in v4
            .iter()
            .map(|a| (a, Version::V311))
            .chain(v5.iter().map(|a| (a, Version::V5)))
        {
            let mut attempt = 0u32;
            while !probe(addr, version, &password, attempt) {
                attempt += 1;
                if started.elapsed() > deadline {
                    return Err(EmbeddedError::NotListening(deadline));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        tracing::info!(listeners, "embedded rumqttd listening on loopback");
        Ok(Self {
            v4,
            v5,
            password,
            next: AtomicUsize::new(0),
        })
    }

    /// The next internal listener for `version`, round-robin.
    pub fn addr(&self, version: Version) -> SocketAddr {
        let list = self.listeners(version);
        list[self.next.fetch_add(1, Ordering::Relaxed) % list.len()]
    }

    /// The internal listener for a client id: always the same one. rumqttd keeps
    /// pending will messages per listener, so a reconnecting client must land where its
    /// previous connection was for MQTT 5 will-delay cancellation and session takeover
    /// to behave as the protocol says.
    pub fn addr_for(&self, version: Version, client_id: &str) -> SocketAddr {
        use std::hash::{Hash as _, Hasher as _};
        let list = self.listeners(version);
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        client_id.hash(&mut hasher);
        list[(hasher.finish() % list.len() as u64) as usize]
    }

    fn listeners(&self, version: Version) -> &[SocketAddr] {
        match version {
            Version::V311 => &self.v4,
            Version::V5 => &self.v5,
        }
    }

    /// The password the gate puts into every forwarded CONNECT.
    pub fn password(&self) -> Arc<str> {
        Arc::clone(&self.password)
    }
}

/// Connects to an internal listener as the gate does (CONNECT with the secret), waits
/// for a successful CONNACK and disconnects cleanly: proves the listener is up and the
/// auth handler admits the gate.
fn probe(addr: &SocketAddr, version: Version, password: &str, attempt: u32) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut stream) = StdStream::connect_timeout(addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    // A fresh client id per attempt: an abandoned attempt must not collide (see
    // GateSession::awaiting_broker_connack for what a collision does to rumqttd 0.20).
    let client_id = format!("vitalmq-gate-probe-{addr}-{attempt}");
    let mut buf = bytes::BytesMut::new();
    let encoded = match version {
        Version::V311 => {
            let mut c = rumqttc::mqttbytes::v4::Connect::new(client_id);
            c.login = Some(rumqttc::mqttbytes::v4::Login::new("vitalmq-gate", password));
            c.write(&mut buf).is_ok()
        }
        Version::V5 => {
            let c = rumqttc::v5::mqttbytes::v5::Connect {
                keep_alive: 10,
                client_id,
                clean_start: true,
                properties: None,
            };
            let login = Some(rumqttc::v5::mqttbytes::v5::Login::new(
                "vitalmq-gate",
                password,
            ));
            c.write(&None, &login, &mut buf).is_ok()
        }
    };
    if !encoded || stream.write_all(&buf).is_err() {
        return false;
    }
    // CONNACK: type 0x20, then (3.1.1) flags and return code 0 / (5) flags, reason 0.
    let mut ack = [0u8; 4];
    let accepted = stream.read_exact(&mut ack).is_ok() && ack[0] == 0x20 && ack[3] == 0;
    let disconnect: &[u8] = if version == Version::V5 {
        &[0xe0, 0x01, 0x00]
    } else {
        &[0xe0, 0x00]
    };
    let _ = stream.write_all(disconnect);
    accepted
}

/// Reserves `n` loopback ports by binding and releasing them; rumqttd binds them right
/// after. (rumqttd takes addresses, not listeners, so a short race is unavoidable.)
fn free_ports(n: usize) -> Result<Vec<SocketAddr>, EmbeddedError> {
    let listeners: Vec<StdListener> = (0..n)
        .map(|_| StdListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(EmbeddedError::Port)?;
    listeners
        .iter()
        .map(|l| l.local_addr().map_err(EmbeddedError::Port))
        .collect()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
