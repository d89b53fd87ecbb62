//! One client connection's frame filter, as a sans-IO state machine.
//!
//! The relay task feeds it the bytes each side sent and carries out the [`Output`]s it
//! returns; nothing here touches a socket or a clock (rate limits come in through the
//! [`RateGate`] seam), so the whole policy behaviour is unit-testable and fuzzable.
//!
//! This module holds the session's state, the dispatch of each side's packets and what
//! every refusal shares (audit, close). What happens to each kind of packet lives in the
//! sibling modules: `connect` (CONNECT, will, CONNACK, keepalive), `publish` (client
//! PUBLISH), `filters` (SUBSCRIBE and UNSUBSCRIBE, SUBACK and UNSUBACK), `acks`
//! (packet ids the client acknowledges or releases), `delivery` (PUBLISH to the
//! client), `limits` (what the MQTT 5 CONNACK announces and the gate enforces) and
//! `client_limit` (what the gate writes held to the client's own Maximum Packet Size,
//! which every packet for the client passes on its way out). Client frames reach
//! rumqttd only through their module's forwarding path, which takes the
//! [`Permit`](crate::authz::Permit) of its kind.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5;
use vitalmq_audit::{Actor, AuditRecord, Component, Decision, Event};

use super::audit::AuditSink;
use super::connect::INTERNAL_KEEPALIVE_S;
use super::frame::{
    Frame, FrameError, Version, check_fixed_header, connect_version, kind, next_frame,
};
use super::limits::{self, Announced};
use super::rate::RateGate;
use super::reply;
use crate::authz::{Authorizer, Denial, DenyReason, Kind as _, Permit, kind as decision};
use crate::identity::PeerIdentity;

/// Room for a topic and properties on top of the largest payload a role may send.
const HEADER_ROOM: usize = 66_000;
/// How often the gate pings rumqttd for a client with keepalive 0 (half the keepalive,
/// well inside rumqttd's 1.5 x keepalive read timeout).
pub(crate) const BROKER_PING_EVERY: Duration = Duration::from_secs(INTERNAL_KEEPALIVE_S as u64 / 2);

/// What the relay must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Open the internal connection to rumqttd for this protocol version; comes first.
    OpenBroker(Version),
    ToBroker(Bytes),
    ToClient(Bytes),
    /// Stop reading from the client this long before going on (rate-limit
    /// back-pressure for MQTT 3.1.1, which has no reason code to say "slow down").
    Pause(Duration),
    /// Write what came before, then close both sides.
    Close(CloseReason),
}

/// Why the gate ended a connection; `code` is stable (audit, metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    pub code: &'static str,
    pub detail: String,
}

impl CloseReason {
    pub(super) fn new(code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    AwaitConnect,
    Connected(Version),
    Closed,
}

/// A SUBSCRIBE or UNSUBSCRIBE whose filters were partly refused: per requested filter,
/// `true` if it was forwarded, so the broker's answer can be spread back.
#[derive(Debug)]
pub(super) struct Pending {
    pub(super) forwarded: Vec<bool>,
}

/// Everything the gate needs to know about one connection.
#[derive(Debug)]
pub struct GateSession {
    pub(super) peer: PeerIdentity,
    addr: String,
    pub(super) authz: Arc<dyn Authorizer>,
    pub(super) audit: Arc<dyn AuditSink>,
    pub(super) rate: Arc<dyn RateGate>,
    pub(super) internal_password: Arc<str>,
    pub(super) state: State,
    pub(super) max_payload: usize,
    /// Most filters one SUBSCRIBE may carry (role limit).
    pub(super) max_subscribe_filters: usize,
    /// A retained telemetry PUBLISH was stripped and audited on this connection (later
    /// ones are only counted).
    pub(super) retain_stripped: bool,
    /// The authorizer's answers per topic, until it is replaced.
    pub(super) publish_cache: HashMap<String, Result<Permit<decision::Publish>, Denial>>,
    /// Filters the broker was asked to subscribe (re-checked when the policy changes).
    pub(super) subscriptions: HashSet<String>,
    pub(super) pending_subacks: HashMap<u16, Pending>,
    pub(super) pending_unsubacks: HashMap<u16, Pending>,
    /// MQTT 5 topic aliases the client set, resolved here so the ACL sees real topics.
    pub(super) aliases: HashMap<u16, String>,
    /// QoS 2 packet ids the gate acknowledged and dropped (3.1.1 ack-and-drop policy).
    pub(super) dropped_qos2: HashSet<u16>,
    /// The client sent an empty client id (MQTT 5: tell it the id it was given).
    pub(super) assign_client_id: bool,
    /// CONNECT was forwarded to rumqttd.
    pub(super) opened_broker: bool,
    /// A 3.1.1 PUBLISH held back by the rate limit, retried (and re-admitted) before
    /// anything the client sent after it.
    pub(super) deferred: Option<Frame>,
    /// rumqttd has answered the forwarded CONNECT.
    pub(super) broker_connack_seen: bool,
    /// The permit of the forwarded CONNECT, until rumqttd's CONNACK decides the
    /// outcome: `connection_accepted` is audited only for a successful CONNACK that
    /// reaches the client; a connection that ends first gets a record saying so.
    pub(super) connect_pending: Option<Permit<decision::Connect>>,
    /// A successful CONNACK was audited and passed to the client.
    pub(super) accepted: bool,
    /// The client asked for keepalive 0: the gate pings rumqttd (see
    /// [`BROKER_PING_EVERY`]) and swallows this many PINGRESPs answering its own pings.
    pub(super) gate_pings: Option<u32>,
    /// No earlier session was resumed, so every packet id the client may release was
    /// seen on this connection. Set from the client's CleanSession / Clean Start at
    /// CONNECT, then from rumqttd's CONNACK (`session_present` = 0): in MQTT 5 a session
    /// is resumed by Clean Start=0 only if one was kept (Session Expiry), and in either
    /// version only CONNACK says whether one was.
    pub(super) clean_session: bool,
    /// Packet ids of QoS 1 PUBLISHes passed to the client and not yet acknowledged.
    pub(super) unacked_to_client: HashSet<u16>,
    /// Packet ids rumqttd answered with PUBREC, awaiting the client's PUBREL.
    pub(super) awaiting_pubrel: HashSet<u16>,
    /// The limits the MQTT 5 CONNACK the client got announced (enforced from then on,
    /// for the whole connection); `None` until it has gone out.
    pub(super) announced: Option<Announced>,
    /// The Maximum Packet Size the MQTT 5 client set in its CONNECT: nothing the gate
    /// writes to it is larger (see `client_limit`).
    pub(super) client_max_packet: Option<usize>,
    /// A CONNACK with a code below 0x80 has gone to the client (only then may a
    /// DISCONNECT, MQTT-3.14.0-1).
    pub(super) connack_to_client: bool,
    /// Packet ids of the client's QoS 1 and 2 PUBLISHes rumqttd has not completed
    /// (MQTT 5 Receive Maximum, see `limits`).
    pub(super) inbound_unacked: HashSet<u16>,
    /// Per-message counters, resolved once per connection rather than per PUBLISH.
    pub(super) counters: Counters,
}

#[derive(Debug)]
pub(super) struct Counters {
    pub(super) messages_in: metrics::Counter,
    pub(super) bytes_in: metrics::Counter,
    pub(super) messages_out: metrics::Counter,
}

impl Counters {
    fn new() -> Self {
        Self {
            messages_in: metrics::counter!("vitalmq_messages_total", "direction" => "in"),
            bytes_in: metrics::counter!("vitalmq_bytes_total", "direction" => "in"),
            messages_out: metrics::counter!("vitalmq_messages_total", "direction" => "out"),
        }
    }
}

impl GateSession {
    pub fn new(
        peer: PeerIdentity,
        addr: impl Into<String>,
        authz: Arc<dyn Authorizer>,
        audit: Arc<dyn AuditSink>,
        rate: Arc<dyn RateGate>,
        internal_password: Arc<str>,
    ) -> Self {
        let limits = authz.limits(&peer);
        Self {
            peer,
            addr: addr.into(),
            authz,
            audit,
            rate,
            internal_password,
            state: State::AwaitConnect,
            max_payload: limits.max_payload_bytes,
            max_subscribe_filters: limits.max_subscribe_filters,
            retain_stripped: false,
            publish_cache: HashMap::new(),
            subscriptions: HashSet::new(),
            pending_subacks: HashMap::new(),
            pending_unsubacks: HashMap::new(),
            aliases: HashMap::new(),
            dropped_qos2: HashSet::new(),
            assign_client_id: false,
            opened_broker: false,
            broker_connack_seen: false,
            connect_pending: None,
            accepted: false,
            gate_pings: None,
            clean_session: true,
            unacked_to_client: HashSet::new(),
            awaiting_pubrel: HashSet::new(),
            announced: None,
            client_max_packet: None,
            connack_to_client: false,
            inbound_unacked: HashSet::new(),
            deferred: None,
            counters: Counters::new(),
        }
    }

    /// True between forwarding CONNECT and seeing rumqttd's CONNACK. The relay must not
    /// close the internal connection in that window: rumqttd 0.20 registers the client's
    /// will handler before writing CONNACK and left it behind if that write failed, and
    /// the next CONNECT with the same client id then panicked while holding the
    /// will-handler lock (patched: `vendor/rumqttd/VITALMQ-PATCHES.md` 5). Waiting for
    /// CONNACK keeps rumqttd on its normal path anyway.
    pub(crate) fn awaiting_broker_connack(&self) -> bool {
        matches!(self.state, State::Connected(_) | State::Closed)
            && self.opened_broker
            && !self.broker_connack_seen
    }

    pub(crate) fn version(&self) -> Option<Version> {
        match self.state {
            State::Connected(v) => Some(v),
            _ => None,
        }
    }

    /// A successful CONNACK was audited as `connection_accepted` and handed to the
    /// relay for the client.
    pub(crate) fn is_accepted(&self) -> bool {
        self.accepted
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The largest packet the client may send. MQTT 5: the Maximum Packet Size the
    /// CONNACK announced (MQTT-3.2.2-15), and before it has gone out the one it will
    /// announce, so a packet sent before the CONNACK is held to no stricter a limit
    /// (see `limits`). A CONNECT, and MQTT 3.1.1: the role's payload limit plus room
    /// for a topic and properties (3.1.1 checks the payload itself, `publish`).
    pub(super) fn max_packet(&self) -> usize {
        match (self.announced, self.state) {
            (Some(announced), _) => announced.max_packet,
            (None, State::Connected(Version::V5)) => {
                limits::max_packet_size(self.max_payload) as usize
            }
            _ => self.max_payload.saturating_add(HEADER_ROOM),
        }
    }

    /// True while a rate-limited PUBLISH waits: the relay pauses, then calls
    /// [`Self::on_client_bytes`] again (with or without new bytes) to retry it.
    pub(crate) fn has_deferred(&self) -> bool {
        self.deferred.is_some()
    }

    /// Consumes every complete packet the client sent.
    pub fn on_client_bytes(&mut self, buf: &mut BytesMut, out: &mut Vec<Output>) {
        let from = out.len();
        self.client_bytes(buf, out);
        self.hold_to_client(out, from);
    }

    fn client_bytes(&mut self, buf: &mut BytesMut, out: &mut Vec<Output>) {
        if let Some(frame) = self.deferred.take() {
            if let State::Connected(version) = self.state {
                self.client_frame(version, frame, out);
            }
        }
        while self.state != State::Closed && self.deferred.is_none() {
            let version = match self.state {
                State::Connected(v) => v,
                State::AwaitConnect => match connect_version(buf) {
                    Ok(Some(v)) => v,
                    Ok(None) => return,
                    Err(e) => return self.refuse_unframeable(e, out),
                },
                State::Closed => return,
            };
            match next_frame(buf, version, self.max_packet()) {
                Ok(Some(frame)) => {
                    if let Err(e) = check_fixed_header(&frame, version) {
                        return self.refuse_unframeable(e, out);
                    }
                    self.client_frame(version, frame, out)
                }
                Ok(None) => return,
                Err(e) => return self.refuse_unframeable(e, out),
            }
        }
    }

    /// Consumes every complete packet rumqttd sent.
    pub fn on_broker_bytes(&mut self, buf: &mut BytesMut, out: &mut Vec<Output>) {
        let from = out.len();
        self.broker_bytes(buf, out);
        self.hold_to_client(out, from);
    }

    fn broker_bytes(&mut self, buf: &mut BytesMut, out: &mut Vec<Output>) {
        let State::Connected(version) = self.state else {
            // Closed: only watch for the CONNACK the relay may be waiting for.
            if self.opened_broker
                && !self.broker_connack_seen
                && buf.first().is_some_and(|b| b >> 4 == kind::CONNACK)
            {
                self.broker_connack_seen = true;
            }
            buf.clear();
            return;
        };
        // rumqttd only sends what its own limits allow; the cap guards the gate anyway.
        let max = self.max_packet().max(1 << 20);
        loop {
            match next_frame(buf, version, max) {
                Ok(Some(frame)) => self.broker_frame(version, frame, out),
                Ok(None) => return,
                Err(e) => {
                    return self.close(out, CloseReason::new("broker_protocol", e.to_string()));
                }
            }
            if self.state == State::Closed {
                return;
            }
        }
    }

    /// A new policy (or authorizer) is in force: forget cached answers, and close the
    /// connection if the identity may no longer connect or holds a subscription the new
    /// policy denies. Revocation takes effect at once, not at the next reconnect.
    pub(crate) fn replace_authorizer(&mut self, authz: Arc<dyn Authorizer>, out: &mut Vec<Output>) {
        self.authz = authz;
        self.publish_cache.clear();
        let limits = self.authz.limits(&self.peer);
        self.max_payload = limits.max_payload_bytes;
        self.max_subscribe_filters = limits.max_subscribe_filters;
        if !matches!(self.state, State::Connected(_)) {
            return;
        }
        if let Err(denial) = self.authz.may_connect(&self.peer) {
            let revoked = Denial::new(DenyReason::RevokedByPolicy, denial.rule);
            self.audit_denial(decision::Connect::ACTION, self.peer.spiffe.uri(), &revoked);
            return self.close(out, CloseReason::new("connect_revoked", revoked.rule));
        }
        let mut revoked: Vec<(String, Denial)> = self
            .subscriptions
            .iter()
            .filter_map(|f| {
                let denial = self.authz.may_subscribe(&self.peer, f).err()?;
                Some((
                    f.clone(),
                    Denial::new(DenyReason::RevokedByPolicy, denial.rule),
                ))
            })
            .collect();
        revoked.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some((filter, denial)) = revoked.first() {
            for (f, d) in &revoked {
                self.audit_denial(decision::Subscribe::ACTION, f.clone(), d);
            }
            let detail = format!("subscription {filter} no longer allowed ({})", denial.rule);
            self.close(out, CloseReason::new("subscription_revoked", detail));
        }
    }

    /// The certificate of this connection is no longer valid (revoked, expired).
    pub(crate) fn certificate_revoked(&mut self, why: &str, out: &mut Vec<Output>) {
        let record = self
            .record(Event::ConnectionClosed)
            .action("connect")
            .decision(Decision::Deny)
            .reason("certificate_no_longer_valid")
            .detail("why", why.to_owned());
        let _ = self.audit.record(record);
        self.close(out, CloseReason::new("certificate_revoked", why));
    }

    pub(super) fn close(&mut self, out: &mut Vec<Output>, reason: CloseReason) {
        metrics::counter!("vitalmq_gate_closes_total", "reason" => reason.code).increment(1);
        self.state = State::Closed;
        out.push(Output::Close(reason));
    }

    pub(super) fn refuse_unframeable(&mut self, e: FrameError, out: &mut Vec<Output>) {
        let (code, event) = match (&e, self.state) {
            (FrameError::TooLarge(_), State::Connected(_)) => {
                ("packet_too_large", Event::MessageRefused)
            }
            (_, State::AwaitConnect) => ("malformed_connect", Event::ConnectionRefused),
            _ => ("malformed_packet", Event::ConnectionClosed),
        };
        if let State::Connected(Version::V5) = self.state {
            let code = match &e {
                FrameError::TooLarge(_) => v5::DisconnectReasonCode::PacketTooLarge,
                _ => v5::DisconnectReasonCode::MalformedPacket,
            };
            out.push(Output::ToClient(reply::disconnect_v5(code)));
        }
        let record = self
            .record(event)
            .decision(Decision::Deny)
            .reason(code)
            .detail("error", e.to_string());
        let _ = self.audit.record(record);
        self.close(out, CloseReason::new(code, e.to_string()));
    }

    /// The client broke the protocol on an established connection: audit why, tell a
    /// 5 client (DISCONNECT 0x82) and close.
    pub(super) fn protocol_violation(
        &mut self,
        version: Version,
        reason: &'static str,
        detail: String,
        out: &mut Vec<Output>,
    ) {
        let record = self
            .record(Event::ConnectionClosed)
            .decision(Decision::Deny)
            .reason(reason)
            .detail("error", detail.clone());
        let _ = self.audit.record(record);
        if version == Version::V5 {
            out.push(Output::ToClient(reply::disconnect_v5(
                v5::DisconnectReasonCode::ProtocolError,
            )));
        }
        self.close(out, CloseReason::new(reason, detail));
    }

    pub(super) fn record(&self, event: Event) -> AuditRecord {
        AuditRecord::new(Component::Broker, event)
            .actor(Actor {
                identity: Some(self.peer.spiffe.uri()),
                cert_serial: Some(self.peer.serial_hex.clone()),
                cert_sha256: Some(self.peer.fingerprint_sha256_hex.clone()),
                addr: Some(self.addr.clone()),
                client_id: None,
            })
            .policy_sha256(self.authz.policy_sha256())
    }

    /// Audits a denial of `action` on `resource`; returns false when the audit log
    /// refused the record, in which case the caller must stop (see [`Self::audit_failed`]).
    pub(super) fn audit_denial(&mut self, action: &str, resource: String, denial: &Denial) -> bool {
        let reason = denial.reason.as_str();
        metrics::counter!("vitalmq_denials_total", "kind" => action.to_owned()).increment(1);
        tracing::info!(
            peer.id = %self.peer.spiffe.id,
            peer.role = %self.peer.spiffe.role,
            action,
            rule = %denial.rule,
            reason,
            "denied"
        );
        let record = self
            .record(Event::AuthorizationDenied)
            .action(action)
            .resource(resource)
            .decision(Decision::Deny)
            .reason(reason)
            .rule(denial.rule.clone());
        self.audit.record(record).is_ok()
    }

    pub(super) fn audit_failed(&mut self, out: &mut Vec<Output>) {
        self.close(
            out,
            CloseReason::new(
                "audit_unavailable",
                "audit log not writable; refusing unaudited work",
            ),
        );
    }

    // ---------------------------------------------------------------- dispatch

    fn client_frame(&mut self, version: Version, frame: Frame, out: &mut Vec<Output>) {
        let packet_type = frame.packet_type();
        match (self.state, packet_type) {
            (State::AwaitConnect, kind::CONNECT) => self.connect(version, frame, out),
            (State::AwaitConnect, _) => self.close(
                out,
                CloseReason::new("protocol", "first packet must be CONNECT"),
            ),
            (State::Connected(_), kind::CONNECT) => {
                self.protocol_violation(version, "second_connect", "second CONNECT".into(), out)
            }
            (State::Connected(_), kind::PUBLISH) => self.publish(version, frame, out),
            (State::Connected(_), kind::SUBSCRIBE) => self.subscribe(frame, out),
            (State::Connected(_), kind::UNSUBSCRIBE) => self.unsubscribe(frame, out),
            (State::Connected(_), kind::PUBREL) => self.pubrel(version, frame, out),
            (State::Connected(_), kind::PUBACK) => self.puback(version, frame, out),
            (State::Connected(_), kind::AUTH) => {
                out.push(Output::ToClient(reply::disconnect_v5(
                    v5::DisconnectReasonCode::ProtocolError,
                )));
                self.close(
                    out,
                    CloseReason::new("protocol", "enhanced authentication is not supported"),
                )
            }
            (State::Connected(_), kind::CONNACK | kind::SUBACK | kind::UNSUBACK)
            | (State::Connected(_), kind::PINGRESP) => self.close(
                out,
                CloseReason::new(
                    "protocol",
                    format!("client sent server packet type {packet_type}"),
                ),
            ),
            // PUBACK, PUBREC, PUBCOMP, PINGREQ, DISCONNECT: the broker's business.
            (State::Connected(_), _) => out.push(Output::ToBroker(frame.bytes().clone())),
            (State::Closed, _) => {}
        }
    }

    fn broker_frame(&mut self, version: Version, frame: Frame, out: &mut Vec<Output>) {
        if frame.packet_type() == kind::CONNACK {
            self.broker_connack_seen = true;
            return self.connack(version, frame, out);
        }
        if frame.packet_type() == kind::PINGRESP && self.own_pingresp() {
            return;
        }
        self.track_packet_id(&frame);
        if version == Version::V5 {
            self.release_inbound(&frame);
        }
        match frame.packet_type() {
            kind::SUBACK | kind::UNSUBACK => self.merge_ack(frame, out),
            kind::PUBLISH => self.deliver(frame, out),
            _ => out.push(Output::ToClient(frame.bytes().clone())),
        }
    }
}
