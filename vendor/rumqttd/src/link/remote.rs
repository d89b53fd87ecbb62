use crate::link::local::{LinkError, LinkRx, LinkTx};
use crate::link::network;
use crate::link::network::Network;
use crate::local::LinkBuilder;
use crate::protocol::{
    ConnAck, Connect, ConnectReturnCode, Login, Packet, Protocol, PubAck, PubAckReason, PubComp,
    PubCompReason, PubRec, PubRecReason, QoS,
};
use crate::router::{Event, Notification, SessionExpiry};
use crate::{ConnectionId, ConnectionSettings};

use flume::{RecvError, SendError, Sender, TrySendError};
use std::cmp::min;
use std::collections::{HashSet, VecDeque};
use std::io;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::time::error::Elapsed;
use tokio::{select, time};
use tracing::{debug, trace, warn, Span};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O")]
    Io(#[from] io::Error),
    #[error("Zero keep alive")]
    ZeroKeepAlive,
    #[error("Not connect packet")]
    NotConnectPacket(Packet),
    #[error("Network {0}")]
    Network(#[from] network::Error),
    #[error("Timeout")]
    Timeout(#[from] Elapsed),
    #[error("Channel send error")]
    Send(#[from] SendError<(ConnectionId, Event)>),
    #[error("Channel recv error")]
    Recv(#[from] RecvError),
    #[error("Got new session, disconnecting old one")]
    SessionEnd,
    #[error("Persistent session requires valid client id")]
    InvalidClientId,
    #[error("Unexpected router message")]
    NotConnectionAck,
    #[error("ConnAck error {0}")]
    ConnectionAck(String),
    #[error("Authentication error")]
    InvalidAuth,
    #[error("Channel try send error")]
    TrySend(#[from] TrySendError<(ConnectionId, Event)>),
    #[error("Link error = {0}")]
    Link(#[from] LinkError),
}

/// Orchestrates between Router and Network.
pub struct RemoteLink<P> {
    connect: Connect,
    pub(crate) connection_id: ConnectionId,
    network: Network<P>,
    link_tx: LinkTx,
    link_rx: LinkRx,
    notifications: VecDeque<Notification>,
    pub(crate) will_delay_interval: u32,
    /// vitalmq patch 14: QoS 2 deliveries too large for the client, completed towards
    /// the router by the link: their PUBREL is dropped here, not sent.
    undelivered_qos2: UndeliveredQos2,
}

impl<P: Protocol> RemoteLink<P> {
    pub async fn new(
        router_tx: Sender<(ConnectionId, Event)>,
        tenant_id: Option<String>,
        mut network: Network<P>,
        connect_packet: Packet,
        dynamic_filters: bool,
        assigned_client_id: Option<String>,
    ) -> Result<RemoteLink<P>, Error> {
        let Packet::Connect(connect, props, lastwill, lastwill_props, _) = connect_packet else {
            return Err(Error::NotConnectPacket(connect_packet));
        };

        // Register this connection with the router. Router replys with ack which if ok will
        // start the link. Router can sometimes reject the connection (ex max connection limit)
        let client_id = assigned_client_id.as_ref().unwrap_or(&connect.client_id);
        let clean_session = connect.clean_session;

        let topic_alias_max = props.as_ref().and_then(|p| p.topic_alias_max);
        // vitalmq patches 13/14: the client's limits (MQTT 5 3.1.2.11.3/4).
        let receive_maximum = props.as_ref().and_then(|p| p.receive_maximum);
        let max_packet_size = props.as_ref().and_then(|p| p.max_packet_size);
        network.set_max_outgoing_size(max_packet_size.and_then(|m| usize::try_from(m).ok()));
        let session_expiry = props
            .as_ref()
            .and_then(|p| p.session_expiry_interval)
            .unwrap_or(0);

        let delay_interval = lastwill_props
            .as_ref()
            .and_then(|f| f.delay_interval)
            .unwrap_or(0);

        // The Server delays publishing the Client’s Will Message until
        // the Will Delay Interval has passed or the Session ends, whichever happens first
        let will_delay_interval = min(session_expiry, delay_interval);

        let mut builder = LinkBuilder::new(client_id, router_tx)
            .tenant_id(tenant_id)
            .clean_session(clean_session);
        // vitalmq patch 9: in MQTT 5 the Session Expiry Interval (absent = 0) decides
        // how long the session outlives the connection, and Clean Start only whether a
        // saved one is resumed; MQTT 3.1.1 keeps its CleanSession rule (the default).
        if P::PROTOCOL_LEVEL == 5 {
            builder = builder.session_expiry(SessionExpiry::from_interval(session_expiry));
        }
        let (link_tx, link_rx, notification) = builder
            .last_will(lastwill)
            .last_will_properties(lastwill_props)
            .dynamic_filters(dynamic_filters)
            .topic_alias_max(topic_alias_max.unwrap_or(0))
            .receive_maximum(receive_maximum.unwrap_or(u16::MAX))
            // vitalmq patch 4: await the router, do not block the runtime's thread
            .build_async()
            .await?;

        let id = link_rx.id();
        Span::current().record("connection_id", id);

        if let Some(mut packet) = notification.into() {
            if let Packet::ConnAck(_ack, props) = &mut packet {
                let mut new_props = props.clone().unwrap_or_default();
                new_props.assigned_client_identifier = assigned_client_id;
                *props = Some(new_props);
                network.write(packet).await?;
            }
        }

        Ok(RemoteLink {
            connect,
            connection_id: id,
            network,
            link_tx,
            link_rx,
            // vitalmq patch 1: grow on demand.
            notifications: VecDeque::new(),
            will_delay_interval,
            undelivered_qos2: UndeliveredQos2::default(),
        })
    }

    pub async fn start(&mut self) -> Result<(), Error> {
        self.network.set_keepalive(self.connect.keep_alive);

        // Note:
        // Shouldn't result in bounded queue deadlocks because of blocking n/w send
        loop {
            select! {
                o = self.network.read() => {
                    let packet = o?;
                    let len = {
                        let mut buffer = self.link_tx.buffer();
                        buffer.push_back(packet);
                        self.network.readv(&mut buffer)?;
                        buffer.len()
                    };

                    trace!("Packets read from network, count = {}", len);
                    self.link_tx.notify().await?;
                }
                // Receive from router when previous when state isn't in collision
                // due to previously received data request
                o = self.link_rx.exchange(&mut self.notifications) => {
                    o?;
                    let mut packets = VecDeque::new();
                    let mut unscheduled = false;

                    for notif in self.notifications.drain(..) {
                        match notif.into() {
                            // vitalmq patch 14: the PUBREL of a QoS 2 delivery the client
                            // never got is not sent.
                            Some(Packet::PubRel(pubrel, _))
                                if self.undelivered_qos2.takes_pubrel(pubrel.pkid) => {}
                            Some(packet) => packets.push_back(packet),
                            None => unscheduled = true,
                        }
                    }
                    let dropped = self.network.writev(packets).await?;
                    let completions = self.complete_undelivered(dropped);
                    if !completions.is_empty() {
                        self.link_tx.buffer().extend(completions);
                        self.link_tx.notify().await?;
                    }
                    if unscheduled {
                        self.link_rx.wake().await?;
                    }
                }
            }
        }
    }
}

impl<P> RemoteLink<P> {
    /// vitalmq patch 14: packets the client's Maximum Packet Size kept from it. The
    /// server "MUST discard it without sending it and then behave as if it had completed
    /// sending that Application Message" (MQTT-3.1.2-25): for a QoS 1 delivery the link
    /// hands the router the PUBACK, for QoS 2 the PUBREC and PUBCOMP together, as if
    /// the client had sent them, so its in-flight slot is freed and the next messages
    /// flow. Returns those acknowledgements.
    fn complete_undelivered(&mut self, dropped: Vec<Packet>) -> Vec<Packet> {
        let mut completions = Vec::new();
        for packet in dropped {
            let Packet::Publish(publish, _) = packet else {
                warn!(client_id = %self.connect.client_id, packet = ?packet, "packet above the client's maximum packet size not sent");
                continue;
            };
            debug!(
                client_id = %self.connect.client_id,
                topic = ?publish.topic,
                qos = ?publish.qos,
                "PUBLISH above the client's maximum packet size discarded (MQTT-3.1.2-25)"
            );
            let pkid = publish.pkid;
            match publish.qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => completions.push(Packet::PubAck(
                    PubAck {
                        pkid,
                        reason: PubAckReason::Success,
                    },
                    None,
                )),
                QoS::ExactlyOnce => completions.extend(self.undelivered_qos2.complete(pkid)),
            }
        }
        completions
    }
}

/// vitalmq patch 14: the QoS 2 deliveries the link completed for the client because they
/// were too large for it.
///
/// Their flow is completed at once: the router gets the PUBREC and the PUBCOMP in one
/// batch, so its session state never holds a PUBREL for a packet the client never got.
/// (Completing it in two steps, PUBCOMP only when the router's PUBREL came back, left the
/// packet id among the session's unacknowledged PUBRELs if the connection ended in
/// between; on resume the router then sent the client a PUBREL for a packet id it never
/// received, which clients treat as a protocol error, reconnecting in a loop.) The
/// router still answers the PUBREC with a PUBREL: that one is dropped here. The router
/// sends a connection's pending acknowledgements before any further delivery, so it
/// reaches the link before a later delivery could reuse the packet id.
#[derive(Debug, Default)]
struct UndeliveredQos2 {
    awaiting_pubrel: HashSet<u16>,
}

impl UndeliveredQos2 {
    /// The acknowledgements that complete delivery `pkid` towards the router.
    fn complete(&mut self, pkid: u16) -> [Packet; 2] {
        self.awaiting_pubrel.insert(pkid);
        [
            Packet::PubRec(
                PubRec {
                    pkid,
                    reason: PubRecReason::Success,
                },
                None,
            ),
            Packet::PubComp(
                PubComp {
                    pkid,
                    reason: PubCompReason::Success,
                },
                None,
            ),
        ]
    }

    /// Whether the router's PUBREL for `pkid` belongs to a completed delivery (and is
    /// therefore not to be sent); it is expected once.
    fn takes_pubrel(&mut self, pkid: u16) -> bool {
        self.awaiting_pubrel.remove(&pkid)
    }
}

/// Read MQTT connect packet from network and verify it.
/// authentication and checks are done here.
pub async fn mqtt_connect<P>(
    config: Arc<ConnectionSettings>,
    network: &mut Network<P>,
) -> Result<Packet, Error>
where
    P: Protocol,
{
    // Wait for MQTT connect packet and error out if it's not received in time to prevent
    // DOS attacks by filling total connections that the server can handle with idle open
    // connections which results in server rejecting new connections
    let connection_timeout_ms = config.connection_timeout_ms.into();
    let packet = time::timeout(Duration::from_millis(connection_timeout_ms), async {
        let packet = network.read().await?;
        Ok::<_, network::Error>(packet)
    })
    .await??;

    let (connect, _props, login) = match packet {
        Packet::Connect(ref connect, ref props, _, _, ref login) => (connect, props, login),
        packet => return Err(Error::NotConnectPacket(packet)),
    };

    Span::current().record("client_id", &connect.client_id);

    handle_auth(config.clone(), login.as_ref(), &connect.client_id).await?;

    // When keep_alive feature is disabled client can live forever, which is not good in
    // distributed broker context so currenlty we don't allow it.
    if connect.keep_alive == 0 {
        return Err(Error::ZeroKeepAlive);
    }

    let empty_client_id = connect.client_id.is_empty();
    let clean_session = connect.clean_session;

    if empty_client_id && !clean_session {
        let ack = ConnAck {
            session_present: false,
            code: ConnectReturnCode::ClientIdentifierNotValid,
        };

        let packet = Packet::ConnAck(ack, None);
        network.write(packet).await?;

        return Err(Error::InvalidClientId);
    }

    // Ok((connect, props, lastwill, lastwill_props))
    Ok(packet)
}

async fn handle_auth(
    config: Arc<ConnectionSettings>,
    login: Option<&Login>,
    client_id: &str,
) -> Result<(), Error> {
    if config.auth.is_none() && config.external_auth.is_none() {
        return Ok(());
    }

    // if authentication is configured and connect packet doesn't have login details
    // return an error
    let Some(login) = login else {
        return Err(Error::InvalidAuth);
    };

    let username = &login.username;
    let password = &login.password;

    if let Some(auth) = &config.external_auth {
        if !auth(
            client_id.to_owned(),
            username.to_owned(),
            password.to_owned(),
        )
        .await
        {
            return Err(Error::InvalidAuth);
        }

        return Ok(());
    }

    if let Some(pairs) = &config.auth {
        if let Some(stored_password) = pairs.get(username) {
            if stored_password.as_bytes().ct_eq(password.as_bytes()).into() {
                return Ok(());
            }
        }

        return Err(Error::InvalidAuth);
    }

    Err(Error::InvalidAuth)
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, sync::Arc};

    use crate::{protocol::Login, ConnectionSettings};

    use super::{handle_auth, UndeliveredQos2};
    use crate::protocol::Packet;

    /// MQTT-3.1.2-25 / MQTT 5 4.3.3 (vitalmq patch 14): a QoS 2 delivery discarded as
    /// too large is completed towards the router in one batch (PUBREC then PUBCOMP), and
    /// the router's answering PUBREL is kept from the client once; a later delivery
    /// with the same packet id runs its flow normally.
    #[test]
    fn mqtt_3_1_2_25_a_discarded_qos2_delivery_is_completed_at_once() {
        let mut undelivered = UndeliveredQos2::default();
        let acks = undelivered.complete(7);
        assert!(matches!(&acks[0], Packet::PubRec(rec, None) if rec.pkid == 7));
        assert!(matches!(&acks[1], Packet::PubComp(comp, None) if comp.pkid == 7));
        assert!(
            !undelivered.takes_pubrel(8),
            "another delivery's PUBREL is sent"
        );
        assert!(undelivered.takes_pubrel(7), "the completed one's is not");
        assert!(!undelivered.takes_pubrel(7), "only once");
    }

    fn config() -> ConnectionSettings {
        ConnectionSettings {
            connection_timeout_ms: 0,
            max_payload_size: 0,
            max_inflight_count: 0,
            auth: None,
            external_auth: None,
            dynamic_filters: false,
        }
    }

    fn login() -> Login {
        Login {
            username: "u".to_owned(),
            password: "p".to_owned(),
        }
    }

    #[tokio::test]
    async fn no_login_no_auth() {
        let cfg = Arc::new(config());
        let r = handle_auth(cfg, None, "").await;
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn some_login_no_auth() {
        let cfg = Arc::new(config());
        let login = login();
        let r = handle_auth(cfg, Some(&login), "").await;
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn login_matches_static_auth() {
        let login = login();
        let mut map = HashMap::<String, String>::new();
        map.insert(login.username.clone(), login.password.clone());

        let mut cfg = config();
        cfg.auth = Some(map);

        let r = handle_auth(Arc::new(cfg), Some(&login), "").await;
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn login_fails_static_no_external() {
        let login = login();
        let mut map = HashMap::<String, String>::new();
        map.insert("wrong".to_owned(), "wrong".to_owned());

        let mut cfg = config();
        cfg.auth = Some(map);

        let r = handle_auth(Arc::new(cfg), Some(&login), "").await;
        assert!(r.is_err());
    }

    #[tokio::test]
    async fn login_fails_static_matches_external() {
        let login = login();

        let mut map = HashMap::<String, String>::new();
        map.insert("wrong".to_owned(), "wrong".to_owned());

        let dynamic = |_: String, _: String, _: String| async { true };

        let mut cfg = config();
        cfg.auth = Some(map);
        cfg.set_auth_handler(dynamic);

        let r = handle_auth(Arc::new(cfg), Some(&login), "").await;
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn login_fails_static_fails_external() {
        let login = login();

        let mut map = HashMap::<String, String>::new();
        map.insert("wrong".to_owned(), "wrong".to_owned());

        let dynamic = |_: String, _: String, _: String| async { false };

        let mut cfg = config();
        cfg.auth = Some(map);
        cfg.set_auth_handler(dynamic);

        let r = handle_auth(Arc::new(cfg), Some(&login), "").await;
        assert!(r.is_err());
    }

    #[tokio::test]
    async fn external_auth_clousre_or_fnptr_type_check_or_fail_compile() {
        let closure = |_: String, _: String, _: String| async { false };
        async fn fnptr(_: String, _: String, _: String) -> bool {
            true
        }

        let mut cfg = config();
        cfg.set_auth_handler(closure);
        cfg.set_auth_handler(fnptr);
    }
}
