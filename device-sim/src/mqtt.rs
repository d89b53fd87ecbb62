//! One MQTT connection (3.1.1 or 5, over mTLS) behind a small interface, for the
//! simulated devices.
//!
//! Invariants:
//!
//! * A [`Session`] is exactly one network connection with a clean session. rumqttc's
//!   event loop would otherwise reconnect by itself and replay or drop what it had queued
//!   on its own terms; here, when the connection ends, the session reports
//!   [`Event::Down`] once and is finished. The caller opens a new session to reconnect,
//!   so everything sent on a connection was handed to it after that connection's
//!   CONNACK, and the caller alone decides what is resent (from its outbox).
//! * The event loop runs on its own task and is never cancelled mid-poll; the caller
//!   receives its events from a channel, which is safe to `select!` on.
//! * Publishing never blocks: the request channel is sized above the caller's own
//!   in-flight window, and a full channel is reported as an error, not waited on.
//! * Dropping a session drops the TCP connection without DISCONNECT (like a device losing
//!   power or radio); [`Session::close`] says goodbye first.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::tokio_rustls::rustls::ClientConfig;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MqttVersion {
    #[serde(rename = "3.1.1")]
    V311,
    #[serde(rename = "5")]
    V5,
}

impl std::str::FromStr for MqttVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "3.1.1" | "311" | "4" | "v4" => Ok(Self::V311),
            "5" | "v5" | "5.0" => Ok(Self::V5),
            _ => Err(format!("unknown MQTT version {s:?} (3.1.1 or 5)")),
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

/// What happened on a session's connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The broker accepted the connection.
    Connected,
    /// SUBACK: whether every filter was granted.
    Subscribed { granted: bool },
    /// PUBACK of one QoS 1 publish; `refused` holds the reason when an MQTT 5 broker
    /// refused it (e.g. `NotAuthorized`, 0x87). MQTT 3.1.1 cannot refuse in a PUBACK.
    Acked { refused: Option<String> },
    /// An incoming PUBLISH (acknowledged by rumqttc).
    Message { topic: String, payload: Bytes },
    /// The connection ended (refused, lost, or closed); the session is finished.
    Down { reason: String },
}

/// Options of one connection.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub keep_alive: Duration,
    /// TCP, TLS and CONNACK together must complete within this.
    pub connect_timeout: Duration,
    /// Requests (publishes, subscribes) that may wait for the event loop.
    pub request_capacity: usize,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(10),
            request_capacity: 64,
        }
    }
}

#[derive(Debug)]
enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// One connection: see the module documentation.
#[derive(Debug)]
pub struct Session {
    client: Client,
    events: mpsc::Receiver<Event>,
    driver: JoinHandle<()>,
    down: bool,
}

impl Session {
    /// Starts connecting as `client_id` with `tls`; the first event is
    /// [`Event::Connected`] or [`Event::Down`]. Must run inside a tokio runtime.
    pub fn open(
        target: &Target,
        client_id: &str,
        tls: &Arc<ClientConfig>,
        options: &SessionOptions,
    ) -> Self {
        let transport =
            rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::clone(tls)));
        let timeout_s = options.connect_timeout.as_secs().max(1);
        let (tx, events) = mpsc::channel(options.request_capacity.max(8) * 2);
        let (client, driver) = match target.version {
            MqttVersion::V311 => {
                let mut o = rumqttc::MqttOptions::new(client_id, target.host.clone(), target.port);
                o.set_transport(transport)
                    .set_keep_alive(options.keep_alive)
                    .set_clean_session(true)
                    .set_max_packet_size(1 << 17, 1 << 17);
                let (client, mut eventloop) =
                    rumqttc::AsyncClient::new(o, options.request_capacity);
                let mut network = eventloop.network_options();
                network.set_connection_timeout(timeout_s);
                eventloop.set_network_options(network);
                (Client::V4(client), tokio::spawn(drive_v4(eventloop, tx)))
            }
            MqttVersion::V5 => {
                let mut o =
                    rumqttc::v5::MqttOptions::new(client_id, target.host.clone(), target.port);
                o.set_transport(transport)
                    .set_keep_alive(options.keep_alive)
                    .set_clean_start(true)
                    .set_connection_timeout(timeout_s)
                    .set_max_packet_size(Some(1 << 17));
                let (client, eventloop) =
                    rumqttc::v5::AsyncClient::new(o, options.request_capacity);
                (Client::V5(client), tokio::spawn(drive_v5(eventloop, tx)))
            }
        };
        Self {
            client,
            events,
            driver,
            down: false,
        }
    }

    /// The next event. After [`Event::Down`] this keeps returning `Down`.
    /// Cancel-safe (a channel receive).
    pub async fn next(&mut self) -> Event {
        if self.down {
            return Event::Down {
                reason: "session finished".into(),
            };
        }
        let event = self.events.recv().await.unwrap_or_else(|| Event::Down {
            reason: "event loop ended".into(),
        });
        if matches!(event, Event::Down { .. }) {
            self.down = true;
        }
        event
    }

    /// Queues a QoS 1 PUBLISH without waiting.
    pub fn publish(&self, topic: String, payload: Vec<u8>) -> Result<(), String> {
        match &self.client {
            Client::V4(c) => c
                .try_publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .try_publish(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .map_err(|e| e.to_string()),
        }
    }

    /// Queues a QoS 1 SUBSCRIBE to one filter without waiting.
    pub fn subscribe(&self, filter: &str) -> Result<(), String> {
        match &self.client {
            Client::V4(c) => c
                .try_subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .try_subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                .map_err(|e| e.to_string()),
        }
    }

    /// Queues one QoS 1 SUBSCRIBE with all of `filters` without waiting (a gateway's
    /// per-device receipt topics); its SUBACK is one [`Event::Subscribed`].
    pub fn subscribe_many(&self, filters: &[String]) -> Result<(), String> {
        match &self.client {
            Client::V4(c) => c
                .try_subscribe_many(
                    filters.iter().map(|f| {
                        rumqttc::SubscribeFilter::new(f.clone(), rumqttc::QoS::AtLeastOnce)
                    }),
                )
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .try_subscribe_many(filters.iter().map(|f| {
                    rumqttc::v5::mqttbytes::v5::Filter::new(
                        f.clone(),
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    )
                }))
                .map_err(|e| e.to_string()),
        }
    }

    /// Sends DISCONNECT and waits (up to `grace`) for it to go out, then drops the
    /// connection.
    pub async fn close(mut self, grace: Duration) {
        let sent = match &self.client {
            Client::V4(c) => c.try_disconnect().is_ok(),
            Client::V5(c) => c.try_disconnect().is_ok(),
        };
        if sent && !self.down {
            let _ = tokio::time::timeout(grace, &mut self.driver).await;
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

async fn drive_v4(mut eventloop: rumqttc::EventLoop, tx: mpsc::Sender<Event>) {
    use rumqttc::{ConnectReturnCode, Event as E, Outgoing, Packet, SubscribeReasonCode};
    loop {
        let event = match eventloop.poll().await {
            Ok(E::Incoming(Packet::ConnAck(c))) if c.code == ConnectReturnCode::Success => {
                Event::Connected
            }
            Ok(E::Incoming(Packet::ConnAck(c))) => Event::Down {
                reason: format!("CONNACK {:?}", c.code),
            },
            Ok(E::Incoming(Packet::SubAck(s))) => Event::Subscribed {
                granted: s
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_))),
            },
            Ok(E::Incoming(Packet::PubAck(_))) => Event::Acked { refused: None },
            Ok(E::Incoming(Packet::Publish(p))) => Event::Message {
                topic: p.topic,
                payload: p.payload,
            },
            Ok(E::Outgoing(Outgoing::Disconnect)) => Event::Down {
                reason: "closed".into(),
            },
            Ok(_) => continue,
            Err(e) => Event::Down {
                reason: e.to_string(),
            },
        };
        let last = matches!(event, Event::Down { .. });
        if tx.send(event).await.is_err() || last {
            return;
        }
    }
}

async fn drive_v5(mut eventloop: rumqttc::v5::EventLoop, tx: mpsc::Sender<Event>) {
    use rumqttc::Outgoing;
    use rumqttc::v5::Event as E;
    use rumqttc::v5::mqttbytes::v5::{
        ConnectReturnCode, Packet, PubAckReason, SubscribeReasonCode,
    };
    loop {
        let event = match eventloop.poll().await {
            Ok(E::Incoming(Packet::ConnAck(c))) if c.code == ConnectReturnCode::Success => {
                Event::Connected
            }
            Ok(E::Incoming(Packet::ConnAck(c))) => Event::Down {
                reason: format!("CONNACK {:?}", c.code),
            },
            Ok(E::Incoming(Packet::SubAck(s))) => Event::Subscribed {
                granted: s
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_))),
            },
            Ok(E::Incoming(Packet::PubAck(a))) => Event::Acked {
                refused: match a.reason {
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                    other => Some(format!("{other:?}")),
                },
            },
            Ok(E::Incoming(Packet::Publish(p))) => Event::Message {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload,
            },
            Ok(E::Outgoing(Outgoing::Disconnect)) => Event::Down {
                reason: "closed".into(),
            },
            Ok(_) => continue,
            Err(e) => Event::Down {
                reason: e.to_string(),
            },
        };
        let last = matches!(event, Event::Down { .. });
        if tx.send(event).await.is_err() || last {
            return;
        }
    }
}
