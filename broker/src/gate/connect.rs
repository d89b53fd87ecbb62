//! CONNECT and its outcome: the identity binding of the client id, connect and will
//! authorization, the rewrite rumqttd sees (verified id, internal credentials), the
//! CONNACK that decides whether the connection was accepted, and the keepalive the
//! gate keeps for clients that asked for none.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use vitalmq_audit::{Decision, Event};

use super::client_limit;
use super::frame::{Frame, FrameError, Version, kind};
use super::limits;
use super::reply;
use super::session::{CloseReason, GateSession, Output, State};
use crate::authz::{Denial, DenyReason, Kind as _, Misdirected, Permit, kind as decision};
use crate::embedded::TOPIC_ALIAS_MAXIMUM;

/// Keepalive the gate asks rumqttd for when the client asked for none (MQTT keepalive
/// 0, which rumqttd refuses); the gate then keeps the internal connection alive itself
/// with a PINGREQ every [`BROKER_PING_EVERY`](super::BROKER_PING_EVERY).
pub(super) const INTERNAL_KEEPALIVE_S: u16 = 60;

/// Why a permitted CONNECT could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub(super) enum ForwardConnectError {
    #[error(transparent)]
    Misdirected(#[from] Misdirected),
    #[error("CONNECT carries a will on {0:?} but no will permit")]
    WillWithoutPermit(String),
    #[error(transparent)]
    Encode(#[from] super::reply::EncodeError),
}

/// A CONNECT in either protocol version.
pub(super) enum ConnectPacket {
    V311(Box<v4::Connect>),
    V5(Box<(v5::Connect, Option<v5::LastWill>, Option<v5::Login>)>),
}

impl ConnectPacket {
    fn parse(frame: Frame) -> Result<Self, FrameError> {
        match frame {
            Frame::V311 { header, bytes } => v4::Connect::read(header, bytes)
                .map(|c| Self::V311(Box::new(c)))
                .map_err(|e| FrameError::Malformed(e.to_string())),
            Frame::V5 { header, bytes } => v5::Connect::read(header, bytes)
                .map(|(c, will, login)| Self::V5(Box::new((c, will, login))))
                .map_err(|e| FrameError::Malformed(e.to_string())),
        }
    }

    fn client_id(&self) -> &str {
        match self {
            Self::V311(c) => &c.client_id,
            Self::V5(c) => &c.0.client_id,
        }
    }

    /// MQTT 5 enhanced authentication (an authentication method) was asked for.
    fn asks_enhanced_auth(&self) -> bool {
        match self {
            Self::V311(_) => false,
            Self::V5(c) => {
                c.0.properties
                    .as_ref()
                    .is_some_and(|p| p.authentication_method.is_some())
            }
        }
    }

    fn will_topic(&self) -> Option<String> {
        match self {
            Self::V311(c) => c.last_will.as_ref().map(|w| w.topic.clone()),
            Self::V5(c) => {
                c.1.as_ref()
                    .map(|w| String::from_utf8_lossy(&w.topic).into_owned())
            }
        }
    }

    fn will_payload_len(&self) -> Option<usize> {
        match self {
            Self::V311(c) => c.last_will.as_ref().map(|w| w.message.len()),
            Self::V5(c) => c.1.as_ref().map(|w| w.message.len()),
        }
    }

    /// The Maximum Packet Size an MQTT 5 client will take (MQTT 5 3.1.2.11.4).
    fn max_packet_size(&self) -> Option<usize> {
        match self {
            Self::V311(_) => None,
            Self::V5(c) => {
                let limit = c.0.properties.as_ref()?.max_packet_size?;
                Some(usize::try_from(limit).unwrap_or(usize::MAX))
            }
        }
    }

    fn keep_alive(&self) -> u16 {
        match self {
            Self::V311(c) => c.keep_alive,
            Self::V5(c) => c.0.keep_alive,
        }
    }

    fn set_keep_alive(&mut self, seconds: u16) {
        match self {
            Self::V311(c) => c.keep_alive = seconds,
            Self::V5(c) => c.0.keep_alive = seconds,
        }
    }

    fn clean_session(&self) -> bool {
        match self {
            Self::V311(c) => c.clean_session,
            Self::V5(c) => c.0.clean_start,
        }
    }

    /// The CONNECT rumqttd gets, for the identity `permit` admits and the will `will`
    /// allows: the client id bound to `id`, and the client's credentials replaced with
    /// the gate's own (the permit's identity URI and the internal password), which
    /// rumqttd's auth handler checks.
    fn forward(
        mut self,
        permit: &Permit<decision::Connect>,
        will: Option<&Permit<decision::Will>>,
        id: &str,
        password: &str,
    ) -> Result<Bytes, ForwardConnectError> {
        if let Some(topic) = self.will_topic() {
            will.ok_or_else(|| ForwardConnectError::WillWithoutPermit(topic.clone()))?
                .covers(&topic)?;
        }
        let username = permit.resource().to_owned();
        let mut buf = BytesMut::new();
        match &mut self {
            Self::V311(c) => {
                c.client_id = id.to_owned();
                c.login = Some(v4::Login::new(username, password));
                c.write(&mut buf).map_err(reply::EncodeError::from)?;
            }
            Self::V5(c) => {
                c.0.client_id = id.to_owned();
                c.2 = Some(v5::Login::new(username, password));
                c.0.write(&c.1, &c.2, &mut buf)
                    .map_err(reply::EncodeError::from)?;
            }
        }
        Ok(buf.freeze())
    }
}

impl GateSession {
    pub(super) fn connect(&mut self, version: Version, frame: Frame, out: &mut Vec<Output>) {
        let mut connect = match ConnectPacket::parse(frame) {
            Ok(c) => c,
            Err(e) => return self.refuse_unframeable(e, out),
        };
        let claimed = connect.client_id().to_owned();
        // Binds what the gate writes from here on, refusals included (`client_limit`).
        self.client_max_packet = connect.max_packet_size();
        let permit = match self.admit(&connect) {
            Ok(permit) => permit,
            Err(denial) => {
                let reason = denial.reason.as_str();
                return self.connection_refused(version, reason, &claimed, denial, out);
            }
        };
        let will = match self.admit_will(&connect) {
            Ok(will) => will,
            Err((resource, denial)) => {
                self.audit_denial(decision::Will::ACTION, resource, &denial);
                let reason = match denial.reason {
                    DenyReason::Oversized => "will_too_large",
                    _ => "will_not_authorized",
                };
                return self.connection_refused(version, reason, &claimed, denial, out);
            }
        };
        if !self.audit.healthy() {
            // Fail closed: nothing reaches rumqttd (not even a takeover of the client
            // id's live session) while its acceptance could not be recorded.
            tracing::error!(peer.id = %self.peer.spiffe.id, "audit log unavailable: connection refused");
            out.push(Output::ToClient(reply::connack_unavailable(version)));
            return self.audit_failed(out);
        }
        self.assign_client_id = claimed.is_empty();
        self.clean_session = connect.clean_session();
        if connect.keep_alive() == 0 {
            // Valid MQTT ("no keepalive"), refused by rumqttd: the gate owns liveness.
            connect.set_keep_alive(INTERNAL_KEEPALIVE_S);
            self.gate_pings = Some(0);
        }
        let own_id = self.peer.spiffe.id.as_str().to_owned();
        let encoded =
            match connect.forward(&permit, will.as_ref(), &own_id, &self.internal_password) {
                Ok(b) => b,
                Err(e) => return self.close(out, CloseReason::new("internal", e.to_string())),
            };
        // Audited once rumqttd's CONNACK says how it went (`connack`), or when the
        // connection ends before that (`finish`).
        tracing::debug!(peer.id = %self.peer.spiffe.id, mqtt = version.as_str(), "CONNECT forwarded");
        self.connect_pending = Some(permit);
        self.state = State::Connected(version);
        self.opened_broker = true;
        out.push(Output::OpenBroker(version));
        out.push(Output::ToBroker(encoded));
    }

    /// SPEC section 1 first (the client id is empty or the certificate's id), then
    /// the standard's rule for an empty id (3.1.1 only), then enhanced authentication
    /// (not offered), then the authorizer.
    fn admit(&self, connect: &ConnectPacket) -> Result<Permit<decision::Connect>, Denial> {
        let claimed = connect.client_id();
        if !claimed.is_empty() && claimed != self.peer.spiffe.id.as_str() {
            return Err(Denial::new(
                DenyReason::ClientIdMismatch,
                "client-id-binding",
            ));
        }
        // MQTT-3.1.3-8: a 3.1.1 client without an id cannot resume a session, so it
        // must not ask for one; refused before the gate binds the certificate's id,
        // which would otherwise hand it that id's persistent session. MQTT 5 assigns
        // the id instead (3.1.3.1: Clean Start 0 with an assigned id is allowed).
        if claimed.is_empty()
            && !connect.clean_session()
            && matches!(connect, ConnectPacket::V311(_))
        {
            return Err(Denial::new(DenyReason::IdentifierRejected, "mqtt-3.1.3-8"));
        }
        if connect.asks_enhanced_auth() {
            return Err(Denial::new(DenyReason::EnhancedAuth, "enhanced-auth"));
        }
        self.authz.may_connect(&self.peer)
    }

    /// The will's permit (none without a will), or what was refused and why: the
    /// authorizer's answer on its topic first, then its size against the role's limit.
    fn admit_will(
        &self,
        connect: &ConnectPacket,
    ) -> Result<Option<Permit<decision::Will>>, (String, Denial)> {
        let Some(topic) = connect.will_topic() else {
            return Ok(None);
        };
        let permit = match self.authz.may_will(&self.peer, &topic) {
            Ok(permit) => permit,
            Err(denial) => return Err((topic, denial)),
        };
        if let Some(len) = connect.will_payload_len().filter(|n| *n > self.max_payload) {
            let denial = Denial::new(DenyReason::Oversized, "max-payload");
            return Err((format!("{len} bytes"), denial));
        }
        Ok(Some(permit))
    }

    /// Audits a refused CONNECT as `reason`, answers with the CONNACK its denial calls
    /// for and closes.
    fn connection_refused(
        &mut self,
        version: Version,
        reason: &str,
        claimed: &str,
        denial: Denial,
        out: &mut Vec<Output>,
    ) {
        metrics::counter!("vitalmq_denials_total", "kind" => "connect").increment(1);
        tracing::info!(peer.id = %self.peer.spiffe.id, reason, rule = %denial.rule, "connection refused");
        let connack = match denial.reason {
            DenyReason::EnhancedAuth => reply::connack_bad_auth_method(),
            DenyReason::IdentifierRejected => reply::connack_identifier_rejected(version),
            _ => reply::connack_not_authorized(version),
        };
        let mut record = self
            .record(Event::ConnectionRefused)
            .action(decision::Connect::ACTION)
            .decision(Decision::Deny)
            .reason(reason)
            .rule(denial.rule);
        if let Some(actor) = record.actor.as_mut() {
            actor.client_id = Some(claimed.chars().take(128).collect());
        }
        let _ = self.audit.record(record);
        out.push(Output::ToClient(connack));
        self.close(out, CloseReason::new("connect_denied", reason.to_owned()));
    }

    /// rumqttd answered the forwarded CONNECT. Success: the CONNACK as the client gets
    /// it (MQTT 5: with the gate's limits, [`Self::connack_v5`]) within the client's
    /// Maximum Packet Size; audit `connection_accepted` and pass it on. The connection
    /// closes instead, never audited as accepted, when the audit log cannot take the
    /// record or the CONNACK does not fit (see `client_limit`). Failure: audit the
    /// refusal, pass the CONNACK on and close.
    pub(super) fn connack(&mut self, version: Version, frame: Frame, out: &mut Vec<Output>) {
        let code = connack_code(&frame);
        let pending = self.connect_pending.take();
        if code != Some(0) && pending.is_some() {
            return self.broker_refused(version, code, frame, out);
        }
        let session_present = session_present(&frame);
        let (connack, announced) = match version {
            Version::V5 => self.connack_v5(frame),
            Version::V311 => (frame.bytes().clone(), None),
        };
        let connack = match client_limit::fit(connack, self.client_max_packet) {
            Ok(connack) => connack,
            Err(too_large) => return self.connack_too_large(version, pending, too_large, out),
        };
        if let Some(permit) = pending {
            let record = self
                .record(Event::ConnectionAccepted)
                .action(decision::Connect::ACTION)
                .decision(Decision::Allow)
                .rule(permit.rule().to_owned())
                .detail("mqtt", version.as_str());
            if self.audit.record(record).is_err() {
                return self.audit_failed(out);
            }
            self.accepted = true;
            tracing::info!(peer.id = %self.peer.spiffe.id, peer.role = %self.peer.spiffe.role, mqtt = version.as_str(), "connected");
        }
        self.clean_session = !session_present;
        self.announced = announced;
        out.push(Output::ToClient(connack));
    }

    /// rumqttd refused the forwarded CONNECT (`code`): audited, passed on, closed.
    fn broker_refused(
        &mut self,
        version: Version,
        code: Option<u8>,
        frame: Frame,
        out: &mut Vec<Output>,
    ) {
        let code = code.map_or_else(|| "unreadable".to_owned(), |c| format!("0x{c:02x}"));
        tracing::info!(peer.id = %self.peer.spiffe.id, code, "broker refused connection");
        let record = self
            .record(Event::ConnectionRefused)
            .action(decision::Connect::ACTION)
            .decision(Decision::Deny)
            .reason("broker_refused")
            .detail("connack", code.clone())
            .detail("mqtt", version.as_str());
        let _ = self.audit.record(record);
        out.push(Output::ToClient(frame.bytes().clone()));
        self.close(out, CloseReason::new("broker_refused", code));
    }

    /// The successful CONNACK does not fit the client's Maximum Packet Size even
    /// without its optional properties: it must not be sent (MQTT-3.1.2-24), the
    /// connection cannot go on without it, and no DISCONNECT may precede it
    /// (MQTT-3.14.0-1), so the connection is closed and audited as refused.
    fn connack_too_large(
        &mut self,
        version: Version,
        pending: Option<Permit<decision::Connect>>,
        too_large: client_limit::TooLarge,
        out: &mut Vec<Output>,
    ) {
        tracing::info!(
            peer.id = %self.peer.spiffe.id,
            size = too_large.size,
            limit = too_large.limit,
            "CONNACK larger than the client's Maximum Packet Size: connection closed"
        );
        if let Some(permit) = pending {
            let record = self
                .record(Event::ConnectionRefused)
                .action(decision::Connect::ACTION)
                .decision(Decision::Deny)
                .reason("connack_too_large")
                .rule(permit.rule().to_owned())
                .detail("connack_bytes", too_large.size)
                .detail("client_maximum_packet_size", too_large.limit)
                .detail("mqtt", version.as_str());
            let _ = self.audit.record(record);
        }
        let detail = format!(
            "CONNACK of {} bytes, client maximum {}",
            too_large.size, too_large.limit
        );
        self.close(out, CloseReason::new("connack_too_large", detail));
    }

    /// rumqttd's successful MQTT 5 CONNACK as the client gets it, with the limits it
    /// announces: rumqttd's own properties (session expiry, ...) kept, plus the limits
    /// the gate enforces on this connection (MQTT 5 3.2.2.3): Maximum Packet Size,
    /// Receive Maximum and Topic Alias Maximum (see [`super::limits`]), and, for a
    /// client that sent an empty client id, the id it was given (the certificate's).
    /// Availability flags stay absent: retain, wildcards, subscription identifiers and
    /// shared subscriptions are all available, and absent means available. From the
    /// moment it goes out the announced limits are the ones the gate enforces on this
    /// connection (`None`: rumqttd's CONNACK passed as it was).
    fn connack_v5(&self, frame: Frame) -> (Bytes, Option<limits::Announced>) {
        let Frame::V5 { header, bytes } = frame else {
            return (frame.bytes().clone(), None);
        };
        let Ok(mut ack) = v5::ConnAck::read(header, bytes.clone()) else {
            return (bytes, None);
        };
        let max_packet_size = limits::max_packet_size(self.max_payload);
        let announced = limits::Announced {
            max_packet: max_packet_size as usize,
            receive_max: limits::RECEIVE_MAXIMUM,
        };
        let props = ack.properties.get_or_insert_with(empty_connack_properties);
        props.max_packet_size = Some(max_packet_size);
        props.receive_max = Some(announced.receive_max);
        props.topic_alias_max = Some(TOPIC_ALIAS_MAXIMUM);
        if self.assign_client_id {
            props.assigned_client_identifier = Some(self.peer.spiffe.id.as_str().to_owned());
        }
        let mut buf = BytesMut::new();
        match ack.write(&mut buf) {
            Ok(_) => (buf.freeze(), Some(announced)),
            Err(_) => (bytes, None),
        }
    }

    /// The relay is done with this connection (`ended` says why, e.g. `client_closed`).
    /// A CONNECT that was forwarded but never answered with a successful CONNACK the
    /// client saw is audited as such, never as accepted; an accepted connection that
    /// rumqttd ended (keepalive expiry, a newer connection of the client id, a packet
    /// it refused) is audited too. Idempotent.
    pub(crate) fn finish(&mut self, ended: &str) {
        let record = if self.connect_pending.take().is_some() {
            tracing::info!(peer.id = %self.peer.spiffe.id, ended, "connection ended before CONNACK");
            self.record(Event::ConnectionClosed)
                .action(decision::Connect::ACTION)
                .reason("closed_before_connack")
                .detail("ended", ended.to_owned())
        } else if self.accepted && ended == "broker_closed" {
            self.record(Event::ConnectionClosed)
                .reason("broker_closed")
                .detail("ended", ended.to_owned())
        } else {
            return;
        };
        self.accepted = false;
        let _ = self.audit.record(record);
    }

    /// True while the gate keeps the internal connection alive for a client that asked
    /// for keepalive 0: the relay calls [`Self::ping_broker`] every
    /// [`BROKER_PING_EVERY`](super::BROKER_PING_EVERY).
    pub(crate) fn pings_broker(&self) -> bool {
        self.gate_pings.is_some() && matches!(self.state, State::Connected(_))
    }

    /// Sends rumqttd a PINGREQ on the client's behalf; its PINGRESP is not forwarded.
    pub(crate) fn ping_broker(&mut self, out: &mut Vec<Output>) {
        if let Some(pending) = self.gate_pings.as_mut()
            && matches!(self.state, State::Connected(_))
        {
            *pending = pending.saturating_add(1);
            out.push(Output::ToBroker(Bytes::from_static(&[
                kind::PINGREQ << 4,
                0,
            ])));
        }
    }

    /// A PINGRESP from rumqttd answering the gate's own PINGREQ (`ping_broker`): it is
    /// counted off and not passed to the client.
    pub(super) fn own_pingresp(&mut self) -> bool {
        match self.gate_pings.as_mut() {
            Some(pending) if *pending > 0 => {
                *pending -= 1;
                true
            }
            _ => false,
        }
    }
}

/// The Session Present flag of a CONNACK (bit 0 of its first variable-header byte, in
/// both versions).
fn session_present(connack: &Frame) -> bool {
    connack
        .bytes()
        .get(connack.header_len())
        .is_some_and(|flags| flags & 1 == 1)
}

/// The return code (3.1.1) or reason code (5) of a framed CONNACK.
fn connack_code(frame: &Frame) -> Option<u8> {
    match frame {
        Frame::V311 { header, bytes } => v4::ConnAck::read(*header, bytes.clone())
            .ok()
            .map(|a| a.code as u8),
        Frame::V5 { header, bytes } => v5::ConnAck::read(*header, bytes.clone())
            .ok()
            .map(|a| a.code as u8),
    }
}

pub(super) fn empty_connack_properties() -> v5::ConnAckProperties {
    v5::ConnAckProperties {
        session_expiry_interval: None,
        receive_max: None,
        max_qos: None,
        retain_available: None,
        max_packet_size: None,
        assigned_client_identifier: None,
        topic_alias_max: None,
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: None,
        subscription_identifiers_available: None,
        shared_subscription_available: None,
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    }
}
