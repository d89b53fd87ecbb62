//! One MQTT connection (3.1.1 or 5, over mTLS) behind a small interface, for the
//! simulated devices and gateways, the load generator and the demo's operator.
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
use rustls::ClientConfig;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::options::{self, ConnectOptions, MqttVersion, Qos, Target};

/// Why a session did not get where it was asked to.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The connection ended first (refused, lost or closed).
    #[error("{0}")]
    Down(String),
    #[error(transparent)]
    Request(#[from] RequestError),
}

/// A request the event loop could not take (its queue is full, or it has ended).
/// Boxed: rumqttc's errors carry the whole request.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    V4(Box<rumqttc::ClientError>),
    #[error(transparent)]
    V5(Box<rumqttc::v5::ClientError>),
}

impl From<rumqttc::ClientError> for RequestError {
    fn from(e: rumqttc::ClientError) -> Self {
        Self::V4(Box::new(e))
    }
}

impl From<rumqttc::v5::ClientError> for RequestError {
    fn from(e: rumqttc::v5::ClientError) -> Self {
        Self::V5(Box::new(e))
    }
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
    /// Largest packet either way, bytes.
    pub max_packet_size: usize,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(10),
            request_capacity: 64,
            max_packet_size: 1 << 17,
        }
    }
}

#[derive(Debug, Clone)]
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
        let connect = ConnectOptions {
            keep_alive: options.keep_alive,
            connect_timeout: options.connect_timeout,
            max_packet_size: options.max_packet_size,
            ..ConnectOptions::default()
        };
        let (tx, events) = mpsc::channel(options.request_capacity.max(8) * 2);
        let (host, port) = (target.host.as_str(), target.port);
        let (client, driver) = match target.version {
            MqttVersion::V311 => {
                let o = options::v4_options(host, port, client_id, tls, &connect);
                let (client, eventloop) = options::v4_client(o, options.request_capacity, &connect);
                (Client::V4(client), tokio::spawn(drive(eventloop, tx)))
            }
            MqttVersion::V5 => {
                let (client, eventloop) = options::v5_client(
                    host,
                    port,
                    client_id,
                    tls,
                    &connect,
                    options.request_capacity,
                );
                (Client::V5(client), tokio::spawn(drive(eventloop, tx)))
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
    pub fn publish(&self, topic: String, payload: Vec<u8>) -> Result<(), RequestError> {
        let qos = Qos::AtLeastOnce;
        match &self.client {
            Client::V4(c) => c.try_publish(topic, qos.v4(), false, payload)?,
            Client::V5(c) => c.try_publish(topic, qos.v5(), false, payload)?,
        }
        Ok(())
    }

    /// A handle that publishes on this session from another task.
    pub fn publisher(&self) -> Publisher {
        Publisher(self.client.clone())
    }

    /// Waits for CONNACK; other events before it are dropped.
    pub async fn connected(&mut self) -> Result<(), SessionError> {
        loop {
            match self.next().await {
                Event::Connected => return Ok(()),
                Event::Down { reason } => return Err(SessionError::Down(reason)),
                _ => {}
            }
        }
    }

    /// Subscribes to `filter` at `qos` and waits for the SUBACK: whether it was
    /// granted. Other events before it are dropped.
    pub async fn subscribed(&mut self, filter: &str, qos: Qos) -> Result<bool, SessionError> {
        self.subscribe_at(filter, qos)?;
        loop {
            match self.next().await {
                Event::Subscribed { granted } => return Ok(granted),
                Event::Down { reason } => return Err(SessionError::Down(reason)),
                _ => {}
            }
        }
    }

    /// Queues a QoS 1 SUBSCRIBE to one filter without waiting.
    pub fn subscribe(&self, filter: &str) -> Result<(), RequestError> {
        self.subscribe_at(filter, Qos::AtLeastOnce)
    }

    /// Queues a SUBSCRIBE to one filter at `qos` without waiting.
    pub fn subscribe_at(&self, filter: &str, qos: Qos) -> Result<(), RequestError> {
        match &self.client {
            Client::V4(c) => c.try_subscribe(filter, qos.v4())?,
            Client::V5(c) => c.try_subscribe(filter, qos.v5())?,
        }
        Ok(())
    }

    /// Queues one QoS 1 SUBSCRIBE with all of `filters` without waiting (a gateway's
    /// per-device receipt topics); its SUBACK is one [`Event::Subscribed`].
    pub fn subscribe_many(&self, filters: &[String]) -> Result<(), RequestError> {
        let qos = Qos::AtLeastOnce;
        match &self.client {
            Client::V4(c) => c.try_subscribe_many(
                filters
                    .iter()
                    .map(|f| rumqttc::SubscribeFilter::new(f.clone(), qos.v4())),
            )?,
            Client::V5(c) => c.try_subscribe_many(
                filters
                    .iter()
                    .map(|f| rumqttc::v5::mqttbytes::v5::Filter::new(f.clone(), qos.v5())),
            )?,
        }
        Ok(())
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

/// Publishes on a [`Session`] from another task than the one taking its events.
#[derive(Debug, Clone)]
pub struct Publisher(Client);

impl Publisher {
    /// Queues a PUBLISH at `qos`, waiting while the request queue is full.
    pub async fn send(&self, topic: &str, qos: Qos, payload: Vec<u8>) -> Result<(), RequestError> {
        match &self.0 {
            Client::V4(c) => c.publish(topic, qos.v4(), false, payload).await?,
            Client::V5(c) => c.publish(topic, qos.v5(), false, payload).await?,
        }
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// One version's event loop, seen by the one driver loop.
trait EventSource: Send + 'static {
    type Polled: Send;
    type Error: std::fmt::Display + Send;
    fn poll(&mut self) -> impl Future<Output = Result<Self::Polled, Self::Error>> + Send;
    /// What an event means to the session; `None` for those it ignores.
    fn translate(polled: Self::Polled) -> Option<Event>;
}

/// CONNACK: accepted, or the end of the session with its code.
fn connack(accepted: bool, code: impl std::fmt::Debug) -> Event {
    if accepted {
        Event::Connected
    } else {
        Event::Down {
            reason: format!("CONNACK {code:?}"),
        }
    }
}

/// The DISCONNECT the session sent itself.
fn closed() -> Event {
    Event::Down {
        reason: "closed".into(),
    }
}

impl EventSource for rumqttc::EventLoop {
    type Polled = rumqttc::Event;
    type Error = rumqttc::ConnectionError;

    fn poll(&mut self) -> impl Future<Output = Result<Self::Polled, Self::Error>> + Send {
        rumqttc::EventLoop::poll(self)
    }

    fn translate(polled: rumqttc::Event) -> Option<Event> {
        use rumqttc::{ConnectReturnCode, Event as E, Outgoing, Packet, SubscribeReasonCode};
        Some(match polled {
            E::Incoming(Packet::ConnAck(c)) => {
                connack(c.code == ConnectReturnCode::Success, c.code)
            }
            E::Incoming(Packet::SubAck(s)) => Event::Subscribed {
                granted: s
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_))),
            },
            E::Incoming(Packet::PubAck(_)) => Event::Acked { refused: None },
            E::Incoming(Packet::Publish(p)) => Event::Message {
                topic: p.topic,
                payload: p.payload,
            },
            E::Outgoing(Outgoing::Disconnect) => closed(),
            _ => return None,
        })
    }
}

impl EventSource for rumqttc::v5::EventLoop {
    type Polled = rumqttc::v5::Event;
    type Error = rumqttc::v5::ConnectionError;

    fn poll(&mut self) -> impl Future<Output = Result<Self::Polled, Self::Error>> + Send {
        rumqttc::v5::EventLoop::poll(self)
    }

    fn translate(polled: rumqttc::v5::Event) -> Option<Event> {
        use rumqttc::Outgoing;
        use rumqttc::v5::Event as E;
        use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode;
        use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as Code, Packet, PubAckReason};
        Some(match polled {
            E::Incoming(Packet::ConnAck(c)) => connack(c.code == Code::Success, c.code),
            E::Incoming(Packet::SubAck(s)) => Event::Subscribed {
                granted: s
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_))),
            },
            E::Incoming(Packet::PubAck(a)) => Event::Acked {
                refused: match a.reason {
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                    other => Some(format!("{other:?}")),
                },
            },
            E::Incoming(Packet::Publish(p)) => Event::Message {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload,
            },
            E::Outgoing(Outgoing::Disconnect) => closed(),
            _ => return None,
        })
    }
}

/// Polls the event loop and forwards what the session reports, until the connection
/// ends (the last event is [`Event::Down`]) or nobody listens.
async fn drive<S: EventSource>(mut source: S, tx: mpsc::Sender<Event>) {
    loop {
        let event = match source.poll().await {
            Ok(polled) => match S::translate(polled) {
                Some(event) => event,
                None => continue,
            },
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
