//! One client connection's frame filter, as a sans-IO state machine.
//!
//! The relay task feeds it the bytes each side sent and carries out the [`Output`]s it
//! returns; nothing here touches a socket or a clock (rate limits come in through the
//! [`RateGate`] seam), so the whole policy behaviour is unit-testable and fuzzable.
//!
//! Client to broker: CONNECT is checked (identity binding, connect and will
//! authorization) and rewritten with the verified id and the gate's internal
//! credentials; PUBLISH is size-checked, rate-limited, topic-alias-resolved and
//! authorized; SUBSCRIBE and UNSUBSCRIBE are filtered per filter. Broker to client:
//! SUBACK/UNSUBACK codes of filtered requests are merged back into the positions the
//! client expects; everything else passes through unchanged.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use vitalmq_audit::{Actor, AuditRecord, Component, Decision, Event};
use vitalmq_policies::{DeniedPublishV311, RetainedTelemetry, is_telemetry_topic};

use super::frame::{
    Frame, FrameError, Version, check_fixed_header, connect_version, kind, next_frame,
};
use super::reply::{self, PublishRefusal};
use crate::authz::{Authorizer, Verdict};
use crate::embedded::TOPIC_ALIAS_MAXIMUM;
use crate::identity::PeerIdentity;

/// Room for a topic and properties on top of the largest payload a role may send.
const HEADER_ROOM: usize = 66_000;
/// Cached publish decisions per connection; the cache is cleared when it fills, which
/// bounds memory for a client that publishes to many (denied) topics.
const PUBLISH_CACHE_LIMIT: usize = 4_096;
/// Keepalive the gate asks rumqttd for when the client asked for none (MQTT keepalive
/// 0, which rumqttd refuses); the gate then keeps the internal connection alive itself
/// with a PINGREQ every [`BROKER_PING_EVERY`].
const INTERNAL_KEEPALIVE_S: u16 = 60;
/// How often the gate pings rumqttd for a client with keepalive 0 (half the keepalive,
/// well inside rumqttd's 1.5 x keepalive read timeout).
pub const BROKER_PING_EVERY: Duration = Duration::from_secs(INTERNAL_KEEPALIVE_S as u64 / 2);

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
    fn new(code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
        }
    }
}

/// Where audit records go; the server passes the audit log's handle.
pub trait AuditSink: Send + Sync + std::fmt::Debug {
    /// Err means the record could not be queued: the caller must stop the work.
    fn record(&self, record: AuditRecord) -> Result<(), AuditUnavailable>;

    /// False while the log is known not to be writing (a write failed): the gate then
    /// hands no new connection to rumqttd.
    fn healthy(&self) -> bool {
        true
    }
}

/// The audit log cannot take the record (full queue, failed write, stopped writer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("audit log unavailable")]
pub struct AuditUnavailable;

impl AuditSink for vitalmq_audit::Auditor {
    fn record(&self, record: AuditRecord) -> Result<(), AuditUnavailable> {
        vitalmq_audit::Auditor::record(self, record).map_err(|e| {
            tracing::error!(error = %e, "audit record could not be queued");
            AuditUnavailable
        })
    }

    fn healthy(&self) -> bool {
        vitalmq_audit::Auditor::healthy(self)
    }
}

/// Per-identity publish and SUBSCRIBE rate limits.
pub trait RateGate: Send + Sync + std::fmt::Debug {
    /// `Ok` to admit one message of `bytes` now, or how long to wait.
    fn admit(&self, bytes: usize) -> Result<(), Duration>;
    /// `Ok` to admit one SUBSCRIBE now, or how long to wait.
    fn admit_subscribe(&self) -> Result<(), Duration> {
        Ok(())
    }
}

/// A rate gate that admits everything (tests, and roles without limits).
#[derive(Debug, Clone, Copy, Default)]
pub struct Unlimited;

impl RateGate for Unlimited {
    fn admit(&self, _bytes: usize) -> Result<(), Duration> {
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitConnect,
    Connected(Version),
    Closed,
}

/// A SUBSCRIBE or UNSUBSCRIBE whose filters were partly refused: per requested filter,
/// `true` if it was forwarded, so the broker's answer can be spread back.
#[derive(Debug)]
struct Pending {
    forwarded: Vec<bool>,
}

/// Everything the gate needs to know about one connection.
#[derive(Debug)]
pub struct GateSession {
    peer: PeerIdentity,
    addr: String,
    authz: Arc<dyn Authorizer>,
    audit: Arc<dyn AuditSink>,
    rate: Arc<dyn RateGate>,
    internal_password: Arc<str>,
    state: State,
    max_payload: usize,
    /// Most filters one SUBSCRIBE may carry (role limit).
    max_subscribe_filters: usize,
    /// A retained telemetry PUBLISH was stripped and audited on this connection (later
    /// ones are only counted).
    retain_stripped: bool,
    publish_cache: HashMap<String, Verdict>,
    /// Filters the broker was asked to subscribe (re-checked when the policy changes).
    subscriptions: HashSet<String>,
    pending_subacks: HashMap<u16, Pending>,
    pending_unsubacks: HashMap<u16, Pending>,
    /// MQTT 5 topic aliases the client set, resolved here so the ACL sees real topics.
    aliases: HashMap<u16, String>,
    /// QoS 2 packet ids the gate acknowledged and dropped (3.1.1 ack-and-drop policy).
    dropped_qos2: HashSet<u16>,
    /// The client sent an empty client id (MQTT 5: tell it the id it was given).
    assign_client_id: bool,
    /// CONNECT was forwarded to rumqttd.
    opened_broker: bool,
    /// A 3.1.1 PUBLISH held back by the rate limit, retried (and re-admitted) before
    /// anything the client sent after it.
    deferred: Option<Frame>,
    /// rumqttd has answered the forwarded CONNECT.
    broker_connack_seen: bool,
    /// The rule that allowed the forwarded CONNECT, until rumqttd's CONNACK decides the
    /// outcome: `connection_accepted` is audited only for a successful CONNACK that
    /// reaches the client; a connection that ends first gets a record saying so.
    connect_pending: Option<String>,
    /// A successful CONNACK was audited and passed to the client.
    accepted: bool,
    /// The client asked for keepalive 0: the gate pings rumqttd (see
    /// [`BROKER_PING_EVERY`]) and swallows this many PINGRESPs answering its own pings.
    gate_pings: Option<u32>,
    /// The client's session is clean (3.1.1 clean session, 5 clean start): every
    /// packet id it may acknowledge was seen on this connection.
    clean_session: bool,
    /// Packet ids of QoS 1 PUBLISHes passed to the client and not yet acknowledged.
    unacked_to_client: HashSet<u16>,
    /// Packet ids rumqttd answered with PUBREC, awaiting the client's PUBREL.
    awaiting_pubrel: HashSet<u16>,
    /// Per-message counters, resolved once per connection rather than per PUBLISH.
    counters: Counters,
}

#[derive(Debug)]
struct Counters {
    messages_in: metrics::Counter,
    bytes_in: metrics::Counter,
    messages_out: metrics::Counter,
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
    pub fn awaiting_broker_connack(&self) -> bool {
        matches!(self.state, State::Connected(_) | State::Closed)
            && self.opened_broker
            && !self.broker_connack_seen
    }

    pub fn peer(&self) -> &PeerIdentity {
        &self.peer
    }

    pub fn version(&self) -> Option<Version> {
        match self.state {
            State::Connected(v) => Some(v),
            _ => None,
        }
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The username the gate presents to rumqttd (with the internal password).
    pub fn internal_username(&self) -> String {
        self.peer.spiffe.uri()
    }

    fn max_packet(&self) -> usize {
        self.max_payload.saturating_add(HEADER_ROOM)
    }

    /// True while a rate-limited PUBLISH waits: the relay pauses, then calls
    /// [`Self::on_client_bytes`] again (with or without new bytes) to retry it.
    pub fn has_deferred(&self) -> bool {
        self.deferred.is_some()
    }

    /// Consumes every complete packet the client sent.
    pub fn on_client_bytes(&mut self, buf: &mut BytesMut, out: &mut Vec<Output>) {
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
    pub fn replace_authorizer(&mut self, authz: Arc<dyn Authorizer>, out: &mut Vec<Output>) {
        self.authz = authz;
        self.publish_cache.clear();
        let limits = self.authz.limits(&self.peer);
        self.max_payload = limits.max_payload_bytes;
        self.max_subscribe_filters = limits.max_subscribe_filters;
        if !matches!(self.state, State::Connected(_)) {
            return;
        }
        let verdict = self.authz.connect(&self.peer);
        if !verdict.allowed {
            self.audit_denial(
                "connect",
                self.peer.spiffe.uri(),
                &verdict,
                "revoked_by_policy",
            );
            return self.close(out, CloseReason::new("connect_revoked", verdict.rule));
        }
        let mut revoked: Vec<(String, Verdict)> = self
            .subscriptions
            .iter()
            .map(|f| (f.clone(), self.authz.subscribe(&self.peer, f)))
            .filter(|(_, v)| !v.allowed)
            .collect();
        revoked.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some((filter, verdict)) = revoked.first() {
            for (f, v) in &revoked {
                self.audit_denial("subscribe", f.clone(), v, "revoked_by_policy");
            }
            let detail = format!("subscription {filter} no longer allowed ({})", verdict.rule);
            self.close(out, CloseReason::new("subscription_revoked", detail));
        }
    }

    /// The certificate of this connection is no longer valid (revoked, expired).
    pub fn certificate_revoked(&mut self, why: &str, out: &mut Vec<Output>) {
        let record = self
            .record(Event::ConnectionClosed)
            .action("connect")
            .decision(Decision::Deny)
            .reason("certificate_no_longer_valid")
            .detail("why", why.to_owned());
        let _ = self.audit.record(record);
        self.close(out, CloseReason::new("certificate_revoked", why));
    }

    fn close(&mut self, out: &mut Vec<Output>, reason: CloseReason) {
        metrics::counter!("vitalmq_gate_closes_total", "reason" => reason.code).increment(1);
        self.state = State::Closed;
        out.push(Output::Close(reason));
    }

    fn refuse_unframeable(&mut self, e: FrameError, out: &mut Vec<Output>) {
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

    fn record(&self, event: Event) -> AuditRecord {
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

    /// Audits a denial; returns false when the audit log refused the record, in which
    /// case the caller must stop (the connection is closed here).
    fn audit_denial(
        &mut self,
        action: &str,
        resource: String,
        verdict: &Verdict,
        reason: &str,
    ) -> bool {
        metrics::counter!("vitalmq_denials_total", "kind" => action.to_owned()).increment(1);
        tracing::info!(
            peer.id = %self.peer.spiffe.id,
            peer.role = %self.peer.spiffe.role,
            action,
            rule = %verdict.rule,
            reason,
            "denied"
        );
        let record = self
            .record(Event::AuthorizationDenied)
            .action(action)
            .resource(resource)
            .decision(Decision::Deny)
            .reason(reason)
            .rule(verdict.rule.clone());
        self.audit.record(record).is_ok()
    }

    fn audit_failed(&mut self, out: &mut Vec<Output>) {
        self.close(
            out,
            CloseReason::new(
                "audit_unavailable",
                "audit log not writable; refusing unaudited work",
            ),
        );
    }

    // ---------------------------------------------------------------- client side

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
            (State::Connected(_), kind::SUBSCRIBE) => {
                self.filter_request(FilterAction::Subscribe, frame, out)
            }
            (State::Connected(_), kind::UNSUBSCRIBE) => {
                self.filter_request(FilterAction::Unsubscribe, frame, out)
            }
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
            | (State::Connected(_), 13) => self.close(
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

    fn connect(&mut self, version: Version, frame: Frame, out: &mut Vec<Output>) {
        let parsed = match frame {
            Frame::V311 { header, bytes } => v4::Connect::read(header, bytes)
                .map(|c| ConnectView::V311(Box::new(c)))
                .map_err(|e| e.to_string()),
            Frame::V5 { header, bytes } => v5::Connect::read(header, bytes)
                .map(|(c, will, login)| ConnectView::V5(Box::new((c, will, login))))
                .map_err(|e| e.to_string()),
        };
        let mut connect = match parsed {
            Ok(c) => c,
            Err(e) => return self.refuse_unframeable(FrameError::Malformed(e), out),
        };
        let claimed = connect.client_id().to_owned();
        let own_id = self.peer.spiffe.id.as_str().to_owned();

        // SPEC section 1: the client id is empty or the certificate's id.
        let verdict = if !claimed.is_empty() && claimed != own_id {
            Verdict::deny("client-id-binding")
        } else if let ConnectView::V5(c) = &connect
            && c.0
                .properties
                .as_ref()
                .is_some_and(|p| p.authentication_method.is_some())
        {
            let connack = reply::connack_bad_auth_method();
            return self.connection_refused(
                connack,
                "enhanced_auth",
                &claimed,
                Verdict::deny("enhanced-auth"),
                out,
            );
        } else {
            self.authz.connect(&self.peer)
        };
        if !verdict.allowed {
            let reason = if verdict.rule == "client-id-binding" {
                "client_id_mismatch"
            } else {
                "not_authorized"
            };
            return self.connection_refused(
                reply::connack_not_authorized(version),
                reason,
                &claimed,
                verdict,
                out,
            );
        }
        if let Some(topic) = connect.will_topic() {
            let will = self.authz.will(&self.peer, &topic);
            if !will.allowed {
                self.audit_denial("will", topic, &will, "not_authorized");
                let connack = reply::connack_not_authorized(version);
                return self.connection_refused(
                    connack,
                    "will_not_authorized",
                    &claimed,
                    will,
                    out,
                );
            }
        }
        if let Some(max) = connect.will_payload_len().filter(|n| *n > self.max_payload) {
            let verdict = Verdict::deny("max-payload");
            self.audit_denial("will", format!("{max} bytes"), &verdict, "oversized");
            let connack = reply::connack_not_authorized(version);
            return self.connection_refused(connack, "will_too_large", &claimed, verdict, out);
        }
        if !self.audit.healthy() {
            // Fail closed: nothing reaches rumqttd (not even a takeover of the client
            // id's live session) while its acceptance could not be recorded.
            tracing::error!(peer.id = %self.peer.spiffe.id, "audit log unavailable: connection refused");
            out.push(Output::ToClient(reply::connack_unavailable(version)));
            return self.audit_failed(out);
        }
        self.assign_client_id = claimed.is_empty();
        self.clean_session = connect.clean_session();
        connect.rewrite(&own_id, self.internal_username(), &self.internal_password);
        if connect.keep_alive() == 0 {
            // Valid MQTT ("no keepalive"), refused by rumqttd: the gate owns liveness.
            connect.set_keep_alive(INTERNAL_KEEPALIVE_S);
            self.gate_pings = Some(0);
        }
        let encoded = match connect.encode() {
            Ok(b) => b,
            Err(e) => return self.close(out, CloseReason::new("internal", e)),
        };
        // Audited once rumqttd's CONNACK says how it went (`connack`), or when the
        // connection ends before that (`finish`).
        tracing::debug!(peer.id = %self.peer.spiffe.id, mqtt = version.as_str(), "CONNECT forwarded");
        self.connect_pending = Some(verdict.rule);
        self.state = State::Connected(version);
        self.opened_broker = true;
        out.push(Output::OpenBroker(version));
        out.push(Output::ToBroker(encoded));
    }

    /// rumqttd answered the forwarded CONNECT. Success: audit `connection_accepted`
    /// and let the CONNACK through (false, and the connection closed, when the audit
    /// log cannot take the record: no unaudited connection). Failure: audit the
    /// refusal, pass the CONNACK on and close.
    fn connack(&mut self, version: Version, frame: &Frame, out: &mut Vec<Output>) -> bool {
        let Some(rule) = self.connect_pending.take() else {
            return true;
        };
        let code = connack_code(frame);
        if code == Some(0) {
            let record = self
                .record(Event::ConnectionAccepted)
                .action("connect")
                .decision(Decision::Allow)
                .rule(rule)
                .detail("mqtt", version.as_str());
            if self.audit.record(record).is_err() {
                self.audit_failed(out);
                return false;
            }
            self.accepted = true;
            tracing::info!(peer.id = %self.peer.spiffe.id, peer.role = %self.peer.spiffe.role, mqtt = version.as_str(), "connected");
            return true;
        }
        let code = code.map_or_else(|| "unreadable".to_owned(), |c| format!("0x{c:02x}"));
        tracing::info!(peer.id = %self.peer.spiffe.id, code, "broker refused connection");
        let record = self
            .record(Event::ConnectionRefused)
            .action("connect")
            .decision(Decision::Deny)
            .reason("broker_refused")
            .detail("connack", code.clone())
            .detail("mqtt", version.as_str());
        let _ = self.audit.record(record);
        out.push(Output::ToClient(frame.bytes().clone()));
        self.close(out, CloseReason::new("broker_refused", code));
        false
    }

    /// The relay is done with this connection (`ended` says why, e.g. `client_closed`).
    /// A CONNECT that was forwarded but never answered with a successful CONNACK the
    /// client saw is audited as such, never as accepted; an accepted connection that
    /// rumqttd ended (keepalive expiry, a newer connection of the client id, a packet
    /// it refused) is audited too. Idempotent.
    pub fn finish(&mut self, ended: &str) {
        let record = if self.connect_pending.take().is_some() {
            tracing::info!(peer.id = %self.peer.spiffe.id, ended, "connection ended before CONNACK");
            self.record(Event::ConnectionClosed)
                .action("connect")
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

    /// The client broke the protocol on an established connection: audit why, tell a
    /// 5 client (DISCONNECT 0x82) and close.
    fn protocol_violation(
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

    /// True while the gate keeps the internal connection alive for a client that asked
    /// for keepalive 0: the relay calls [`Self::ping_broker`] every [`BROKER_PING_EVERY`].
    pub fn pings_broker(&self) -> bool {
        self.gate_pings.is_some() && matches!(self.state, State::Connected(_))
    }

    /// Sends rumqttd a PINGREQ on the client's behalf; its PINGRESP is not forwarded.
    pub fn ping_broker(&mut self, out: &mut Vec<Output>) {
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

    /// A client PUBACK must acknowledge a QoS 1 PUBLISH this connection delivered.
    fn puback(&mut self, version: Version, frame: Frame, out: &mut Vec<Output>) {
        let bytes = frame.bytes();
        let header_len = fixed_header_len(bytes);
        match bytes
            .get(header_len..header_len + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
        {
            Some(pkid) if self.unacked_to_client.remove(&pkid) => {
                out.push(Output::ToBroker(bytes.clone()))
            }
            Some(pkid) => self.protocol_violation(
                version,
                "unknown_packet_id",
                format!("PUBACK for packet id {pkid}, which was not delivered"),
                out,
            ),
            None => self.refuse_unframeable(FrameError::Malformed("short PUBACK".into()), out),
        }
    }

    /// Remembers the packet ids the client must acknowledge (QoS 1 PUBLISH to it) or
    /// may release (PUBREC to it), as they pass from rumqttd.
    fn track_packet_id(&mut self, frame: &Frame) {
        let bytes = frame.bytes();
        let header_len = fixed_header_len(bytes);
        match frame.packet_type() {
            kind::PUBLISH if bytes.first().is_some_and(|b| (b >> 1) & 0b11 == 1) => {
                let topic_len = bytes
                    .get(header_len..header_len + 2)
                    .map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])));
                let at = header_len + 2 + topic_len;
                if let Some(b) = bytes.get(at..at + 2) {
                    self.unacked_to_client
                        .insert(u16::from_be_bytes([b[0], b[1]]));
                }
            }
            kind::PUBREC => {
                if let Some(b) = bytes.get(header_len..header_len + 2) {
                    self.awaiting_pubrel
                        .insert(u16::from_be_bytes([b[0], b[1]]));
                }
            }
            _ => {}
        }
    }

    fn connection_refused(
        &mut self,
        connack: Bytes,
        reason: &str,
        claimed: &str,
        verdict: Verdict,
        out: &mut Vec<Output>,
    ) {
        metrics::counter!("vitalmq_denials_total", "kind" => "connect").increment(1);
        tracing::info!(peer.id = %self.peer.spiffe.id, reason, rule = %verdict.rule, "connection refused");
        let mut record = self
            .record(Event::ConnectionRefused)
            .action("connect")
            .decision(Decision::Deny)
            .reason(reason)
            .rule(verdict.rule);
        if let Some(actor) = record.actor.as_mut() {
            actor.client_id = Some(claimed.chars().take(128).collect());
        }
        let _ = self.audit.record(record);
        out.push(Output::ToClient(connack));
        self.close(out, CloseReason::new("connect_denied", reason.to_owned()));
    }

    fn publish(&mut self, version: Version, frame: Frame, out: &mut Vec<Output>) {
        let raw = frame.clone();
        let publish = match PublishView::parse(frame) {
            Ok(p) => p,
            Err(e) => return self.refuse_unframeable(FrameError::Malformed(e), out),
        };
        let mut publish = publish;
        if let Err(e) = publish.resolve_alias(&mut self.aliases) {
            // MQTT 5 3.3.2.3.4: an alias of 0, above the Topic Alias Maximum, or unknown
            // is a protocol error: DISCONNECT 0x94.
            out.push(Output::ToClient(reply::disconnect_v5(
                v5::DisconnectReasonCode::TopicAliasInvalid,
            )));
            let record = self
                .record(Event::ConnectionClosed)
                .action("publish")
                .decision(Decision::Deny)
                .reason("topic_alias_invalid")
                .detail("error", e.clone());
            let _ = self.audit.record(record);
            return self.close(out, CloseReason::new("topic_alias", e));
        }
        let topic = publish.topic.clone();
        if publish.payload_len > self.max_payload {
            let verdict = Verdict::deny("max-payload");
            if !self.audit_denial("publish", topic, &verdict, "oversized") {
                return self.audit_failed(out);
            }
            if version == Version::V5 {
                out.push(Output::ToClient(reply::disconnect_v5(
                    v5::DisconnectReasonCode::PacketTooLarge,
                )));
            }
            return self.close(
                out,
                CloseReason::new(
                    "payload_too_large",
                    format!("{} bytes", publish.payload_len),
                ),
            );
        }
        if let Err(wait) = self.rate.admit(publish.payload_len) {
            match version {
                // MQTT 3.1.1 cannot say "slow down": hold the client's input instead,
                // which loses nothing.
                Version::V311 => {
                    self.deferred = Some(raw);
                    return out.push(Output::Pause(wait));
                }
                Version::V5 => {
                    metrics::counter!("vitalmq_rate_limited_total").increment(1);
                    let record = self
                        .record(Event::MessageRefused)
                        .action("publish")
                        .resource(topic)
                        .decision(Decision::Deny)
                        .reason("rate_limited");
                    if self.audit.record(record).is_err() {
                        return self.audit_failed(out);
                    }
                    if publish.qos > 0 {
                        out.push(Output::ToClient(reply::publish_refused(
                            version,
                            publish.qos == 2,
                            publish.pkid,
                            PublishRefusal::QuotaExceeded,
                        )));
                    }
                    return;
                }
            }
        }
        let verdict = match self.publish_cache.get(&topic) {
            Some(v) => v.clone(),
            None => {
                let v = self.authz.publish(&self.peer, &topic);
                if self.publish_cache.len() >= PUBLISH_CACHE_LIMIT {
                    self.publish_cache.clear();
                }
                self.publish_cache.insert(topic.clone(), v.clone());
                v
            }
        };
        if verdict.allowed {
            if publish.retain && is_telemetry_topic(&topic) {
                match self.authz.retained_telemetry() {
                    RetainedTelemetry::Strip => {
                        if !self.retain_stripped_audited(&topic) {
                            return self.audit_failed(out);
                        }
                        publish.strip_retain();
                    }
                    RetainedTelemetry::Refuse => {
                        return self.refuse_retained_telemetry(version, topic, out);
                    }
                }
            }
            self.counters.messages_in.increment(1);
            self.counters.bytes_in.increment(publish.payload_len as u64);
            return out.push(Output::ToBroker(publish.forwardable()));
        }
        if !self.audit_denial("publish", topic, &verdict, "not_authorized") {
            return self.audit_failed(out);
        }
        match (version, self.authz.denied_publish_v311()) {
            (Version::V311, DeniedPublishV311::Disconnect) => {
                self.close(out, CloseReason::new("publish_denied", verdict.rule))
            }
            (Version::V311, DeniedPublishV311::AckAndDrop) | (Version::V5, _) => {
                if publish.qos > 0 {
                    if publish.qos == 2 && version == Version::V311 {
                        self.dropped_qos2.insert(publish.pkid);
                    }
                    out.push(Output::ToClient(reply::publish_refused(
                        version,
                        publish.qos == 2,
                        publish.pkid,
                        PublishRefusal::NotAuthorized,
                    )));
                }
            }
        }
    }

    /// Counts a retained telemetry PUBLISH whose flag is cleared; the first one of a
    /// connection is audited. False when the audit log refused that record.
    fn retain_stripped_audited(&mut self, topic: &str) -> bool {
        metrics::counter!("vitalmq_retain_stripped_total").increment(1);
        if std::mem::replace(&mut self.retain_stripped, true) {
            return true;
        }
        tracing::info!(peer.id = %self.peer.spiffe.id, "retain flag stripped from telemetry");
        let record = self
            .record(Event::MessageRefused)
            .action("publish")
            .resource(topic.to_owned())
            .decision(Decision::Deny)
            .reason("retain_stripped")
            .detail("outcome", "routed without the retain flag")
            .detail("policy", "retained_telemetry = strip")
            .detail("later", "counted in vitalmq_retain_stripped_total");
        self.audit.record(record).is_ok()
    }

    /// `retained_telemetry = "refuse"`: close (MQTT 5: DISCONNECT 0x9A), audited.
    fn refuse_retained_telemetry(
        &mut self,
        version: Version,
        topic: String,
        out: &mut Vec<Output>,
    ) {
        let verdict = Verdict::deny("retained-telemetry");
        if !self.audit_denial("publish", topic, &verdict, "retain_not_supported") {
            return self.audit_failed(out);
        }
        if version == Version::V5 {
            out.push(Output::ToClient(reply::disconnect_v5(
                v5::DisconnectReasonCode::RetainNotSupported,
            )));
        }
        self.close(
            out,
            CloseReason::new("retain_refused", "retained PUBLISH on a telemetry topic"),
        );
    }

    fn pubrel(&mut self, version: Version, frame: Frame, out: &mut Vec<Output>) {
        // PUBREL: the fixed header, then the packet id in the two bytes after it.
        let bytes = frame.bytes();
        let header_len = fixed_header_len(bytes);
        let pkid = bytes
            .get(header_len..header_len + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]));
        match pkid {
            Some(pkid) if self.dropped_qos2.remove(&pkid) => {
                out.push(Output::ToClient(reply::pubcomp(version, pkid)))
            }
            // A resumed session may release what it published on an earlier connection.
            Some(pkid) if !self.awaiting_pubrel.remove(&pkid) && self.clean_session => self
                .protocol_violation(
                    version,
                    "unknown_packet_id",
                    format!("PUBREL for packet id {pkid}, which has no PUBREC"),
                    out,
                ),
            Some(_) => out.push(Output::ToBroker(bytes.clone())),
            None => self.refuse_unframeable(FrameError::Malformed("short PUBREL".into()), out),
        }
    }

    /// SUBSCRIBE and UNSUBSCRIBE: authorize (and audit) each filter, forward the
    /// allowed ones, answer alone when none is, and remember the positions of refused
    /// ones so the broker's acknowledgement can be spread back.
    fn filter_request(&mut self, action: FilterAction, frame: Frame, out: &mut Vec<Output>) {
        if action == FilterAction::Subscribe
            && let Err(wait) = self.rate.admit_subscribe()
        {
            // Above the SUBSCRIBE rate: stop reading from the client and retry this
            // packet after the wait (loses nothing, writes nothing).
            metrics::counter!("vitalmq_subscribe_throttled_total").increment(1);
            self.deferred = Some(frame);
            return out.push(Output::Pause(wait));
        }
        let request = match FilterRequest::parse(action, frame) {
            Ok(r) => r,
            Err(e) => return self.refuse_unframeable(FrameError::Malformed(e), out),
        };
        if action == FilterAction::Subscribe && request.len() > self.max_subscribe_filters {
            return self.too_many_filters(request, out);
        }
        let filters = request.filters();
        let mut forwarded = Vec::with_capacity(filters.len());
        for filter in &filters {
            let verdict = match action {
                FilterAction::Subscribe => self.authz.subscribe(&self.peer, filter),
                FilterAction::Unsubscribe => self.authz.unsubscribe(&self.peer, filter),
            };
            if !verdict.allowed
                && !self.audit_denial(action.as_str(), filter.clone(), &verdict, "not_authorized")
            {
                return self.audit_failed(out);
            }
            forwarded.push(verdict.allowed);
        }
        if forwarded.iter().all(|f| !f) {
            return out.push(Output::ToClient(request.all_denied()));
        }
        for (filter, _) in filters.iter().zip(&forwarded).filter(|(_, f)| **f) {
            match action {
                FilterAction::Subscribe => self.subscriptions.insert(filter.clone()),
                FilterAction::Unsubscribe => self.subscriptions.remove(filter),
            };
        }
        let pkid = request.pkid();
        // A 3.1.1 UNSUBACK carries no per-filter codes: nothing to spread back.
        let spread_back = !matches!(request, FilterRequest::Unsubscribe311(_));
        match request.keep(&forwarded) {
            Ok(bytes) => out.push(Output::ToBroker(bytes)),
            Err(e) => return self.close(out, CloseReason::new("internal", e)),
        }
        if spread_back && forwarded.iter().any(|f| !f) {
            let pending = match action {
                FilterAction::Subscribe => &mut self.pending_subacks,
                FilterAction::Unsubscribe => &mut self.pending_unsubacks,
            };
            pending.insert(pkid, Pending { forwarded });
        }
    }

    /// A SUBSCRIBE with more filters than the role allows is refused as a whole, before
    /// any filter is looked at: one audit record (not one per filter) and every code
    /// 0x80 (3.1.1) or 0x97 quota exceeded (5). The connection stays.
    fn too_many_filters(&mut self, request: FilterRequest, out: &mut Vec<Output>) {
        let count = request.len();
        metrics::counter!("vitalmq_denials_total", "kind" => "subscribe").increment(1);
        tracing::info!(
            peer.id = %self.peer.spiffe.id,
            filters = count,
            limit = self.max_subscribe_filters,
            "SUBSCRIBE refused: too many filters"
        );
        let record = self
            .record(Event::AuthorizationDenied)
            .action("subscribe")
            .resource(format!("{count} filters"))
            .decision(Decision::Deny)
            .reason("too_many_filters")
            .rule("max-subscribe-filters")
            .detail("filters", count)
            .detail("limit", self.max_subscribe_filters);
        if self.audit.record(record).is_err() {
            return self.audit_failed(out);
        }
        out.push(Output::ToClient(request.all_refused_over_quota()));
    }

    // ---------------------------------------------------------------- broker side

    fn broker_frame(&mut self, version: Version, frame: Frame, out: &mut Vec<Output>) {
        if frame.packet_type() == kind::CONNACK {
            self.broker_connack_seen = true;
            if !self.connack(version, &frame, out) {
                return;
            }
        }
        if frame.packet_type() == kind::PINGRESP
            && let Some(pending) = self.gate_pings.as_mut()
            && *pending > 0
        {
            // The answer to the gate's own PINGREQ (`ping_broker`).
            *pending -= 1;
            return;
        }
        self.track_packet_id(&frame);
        match frame.packet_type() {
            kind::CONNACK if version == Version::V5 && self.assign_client_id => {
                let Frame::V5 { header, bytes } = frame else {
                    return;
                };
                match v5::ConnAck::read(header, bytes.clone()) {
                    Ok(mut ack) => {
                        let props = ack.properties.get_or_insert_with(empty_connack_properties);
                        props.assigned_client_identifier =
                            Some(self.peer.spiffe.id.as_str().to_owned());
                        let mut buf = BytesMut::new();
                        match ack.write(&mut buf) {
                            Ok(_) => out.push(Output::ToClient(buf.freeze())),
                            Err(_) => out.push(Output::ToClient(bytes)),
                        }
                    }
                    Err(_) => out.push(Output::ToClient(bytes)),
                }
            }
            kind::SUBACK => self.merge_suback(frame, out),
            kind::UNSUBACK if version == Version::V5 => self.merge_unsuback(frame, out),
            kind::PUBLISH => {
                self.counters.messages_out.increment(1);
                if let Some(delivery) = alert_delivery(&frame) {
                    let record = self
                        .record(Event::AlertDelivered)
                        .action("deliver")
                        .resource(delivery.alert_id)
                        .reason(delivery.state)
                        .detail("topic", delivery.topic)
                        .detail("qos", delivery.qos);
                    if self.audit.record(record).is_err() {
                        return self.audit_failed(out);
                    }
                }
                out.push(Output::ToClient(frame.bytes().clone()));
            }
            _ => out.push(Output::ToClient(frame.bytes().clone())),
        }
    }

    fn merge_suback(&mut self, frame: Frame, out: &mut Vec<Output>) {
        match frame {
            Frame::V311 { header, bytes } => {
                let Ok(ack) = v4::SubAck::read(header, bytes.clone()) else {
                    return out.push(Output::ToClient(bytes));
                };
                let Some(pending) = self.pending_subacks.remove(&ack.pkid) else {
                    return out.push(Output::ToClient(bytes));
                };
                let codes = spread(
                    &pending.forwarded,
                    ack.return_codes,
                    v4::SubscribeReasonCode::Failure,
                );
                out.push(Output::ToClient(reply::suback_v311(ack.pkid, codes)));
            }
            Frame::V5 { header, bytes } => {
                let Ok(ack) = v5::SubAck::read(header, bytes.clone()) else {
                    return out.push(Output::ToClient(bytes));
                };
                let Some(pending) = self.pending_subacks.remove(&ack.pkid) else {
                    return out.push(Output::ToClient(bytes));
                };
                let codes = spread(
                    &pending.forwarded,
                    ack.return_codes,
                    v5::SubscribeReasonCode::NotAuthorized,
                );
                out.push(Output::ToClient(reply::suback_v5(
                    ack.pkid,
                    codes,
                    ack.properties,
                )));
            }
        }
    }

    fn merge_unsuback(&mut self, frame: Frame, out: &mut Vec<Output>) {
        let Frame::V5 { header, bytes } = frame else {
            return;
        };
        let Ok(ack) = v5::UnsubAck::read(header, bytes.clone()) else {
            return out.push(Output::ToClient(bytes));
        };
        let Some(pending) = self.pending_unsubacks.remove(&ack.pkid) else {
            return out.push(Output::ToClient(bytes));
        };
        let reasons = spread(
            &pending.forwarded,
            ack.reasons,
            v5::UnsubAckReason::NotAuthorized,
        );
        out.push(Output::ToClient(reply::unsuback_v5(
            ack.pkid,
            reasons,
            ack.properties,
        )));
    }
}

/// Keeps the items whose position is marked forwarded.
fn retain_forwarded<T>(items: &mut Vec<T>, forwarded: &[bool]) {
    let mut keep = forwarded.iter();
    items.retain(|_| keep.next().copied().unwrap_or(false));
}

/// Puts the broker's answers for forwarded filters back at their positions and `denied`
/// everywhere else. A broker answer with too few codes leaves the rest denied.
fn spread<T: Clone>(forwarded: &[bool], answers: Vec<T>, denied: T) -> Vec<T> {
    let mut answers = answers.into_iter();
    forwarded
        .iter()
        .map(|f| {
            if *f {
                answers.next().unwrap_or_else(|| denied.clone())
            } else {
                denied.clone()
            }
        })
        .collect()
}

/// Length of a framed packet's fixed header: the type byte and the 1 to 4 bytes of the
/// remaining length (the frame was already validated by `next_frame`).
/// An alert on its way to a subscriber (SPEC section 5).
struct AlertDelivery {
    topic: String,
    alert_id: String,
    state: String,
    qos: u8,
}

/// For a PUBLISH on `alerts/...` or `ops/...`: the alert it carries, so the gate can
/// audit which identity was handed which alert (issue 7: who saw it). Other topics are
/// told apart by their first bytes without decoding the packet.
fn alert_delivery(frame: &Frame) -> Option<AlertDelivery> {
    let bytes = frame.bytes();
    let at = fixed_header_len(bytes) + 2;
    let head = bytes.get(at..at + 7)?;
    if !(head.starts_with(b"alerts/") || head.starts_with(b"ops/")) {
        return None;
    }
    let (topic, qos, payload) = match frame {
        Frame::V311 { header, bytes } => {
            let p = v4::Publish::read(*header, bytes.clone()).ok()?;
            (p.topic, p.qos as u8, p.payload)
        }
        Frame::V5 { header, bytes } => {
            let p = v5::Publish::read(*header, bytes.clone()).ok()?;
            (
                String::from_utf8(p.topic.to_vec()).ok()?,
                p.qos as u8,
                p.payload,
            )
        }
    };
    #[derive(serde::Deserialize)]
    struct Alert {
        alert_id: String,
        state: String,
    }
    let alert: Alert = serde_json::from_slice(&payload).ok()?;
    Some(AlertDelivery {
        topic,
        alert_id: alert.alert_id,
        state: alert.state,
        qos,
    })
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

fn fixed_header_len(bytes: &Bytes) -> usize {
    let continued = bytes
        .iter()
        .skip(1)
        .take(4)
        .take_while(|b| *b & 0x80 != 0)
        .count();
    2 + continued
}

fn empty_connack_properties() -> v5::ConnAckProperties {
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

// ---------------------------------------------------------------- version views

enum ConnectView {
    V311(Box<v4::Connect>),
    V5(Box<(v5::Connect, Option<v5::LastWill>, Option<v5::Login>)>),
}

impl ConnectView {
    fn client_id(&self) -> &str {
        match self {
            Self::V311(c) => &c.client_id,
            Self::V5(c) => &c.0.client_id,
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

    /// Binds the verified id and replaces the credentials with the gate's own, which
    /// rumqttd's auth handler checks (username and password from clients are ignored).
    fn rewrite(&mut self, id: &str, username: String, password: &str) {
        match self {
            Self::V311(c) => {
                c.client_id = id.to_owned();
                c.login = Some(v4::Login::new(username, password));
            }
            Self::V5(c) => {
                c.0.client_id = id.to_owned();
                c.2 = Some(v5::Login::new(username, password));
            }
        }
    }

    fn encode(&self) -> Result<Bytes, String> {
        let mut buf = BytesMut::new();
        match self {
            Self::V311(c) => c.write(&mut buf).map_err(|e| e.to_string())?,
            Self::V5(c) => c.0.write(&c.1, &c.2, &mut buf).map_err(|e| e.to_string())?,
        };
        Ok(buf.freeze())
    }
}

struct PublishView {
    topic: String,
    qos: u8,
    retain: bool,
    pkid: u16,
    payload_len: usize,
    original: Bytes,
    /// Set when the packet must be re-encoded (an alias was resolved).
    rewritten: Option<Box<v5::Publish>>,
}

impl PublishView {
    fn parse(frame: Frame) -> Result<Self, String> {
        match frame {
            Frame::V311 { header, bytes } => {
                let p = v4::Publish::read(header, bytes.clone()).map_err(|e| e.to_string())?;
                Ok(Self {
                    topic: p.topic,
                    qos: p.qos as u8,
                    retain: p.retain,
                    pkid: p.pkid,
                    payload_len: p.payload.len(),
                    original: bytes,
                    rewritten: None,
                })
            }
            Frame::V5 { header, bytes } => {
                let p = v5::Publish::read(header, bytes.clone()).map_err(|e| e.to_string())?;
                let topic = String::from_utf8(p.topic.to_vec())
                    .map_err(|_| "topic is not UTF-8".to_owned())?;
                let has_alias = p
                    .properties
                    .as_ref()
                    .is_some_and(|pr| pr.topic_alias.is_some());
                Ok(Self {
                    topic,
                    qos: p.qos as u8,
                    retain: p.retain,
                    pkid: p.pkid,
                    payload_len: p.payload.len(),
                    original: bytes,
                    rewritten: has_alias.then(|| Box::new(p)),
                })
            }
        }
    }

    /// MQTT 5 topic aliases: remember `alias -> topic`, or look the topic up, then strip
    /// the alias so rumqttd and the ACL only ever see full topic names.
    fn resolve_alias(&mut self, aliases: &mut HashMap<u16, String>) -> Result<(), String> {
        let Some(p) = self.rewritten.as_mut() else {
            return Ok(());
        };
        let Some(props) = p.properties.as_mut() else {
            return Ok(());
        };
        let Some(alias) = props.topic_alias.take() else {
            return Ok(());
        };
        if alias == 0 || alias > TOPIC_ALIAS_MAXIMUM {
            return Err(format!(
                "topic alias {alias} outside 1..={TOPIC_ALIAS_MAXIMUM} (the advertised maximum)"
            ));
        }
        if self.topic.is_empty() {
            let topic = aliases
                .get(&alias)
                .ok_or_else(|| format!("unknown topic alias {alias}"))?;
            self.topic = topic.clone();
            p.topic = Bytes::from(topic.clone());
        } else {
            // At most TOPIC_ALIAS_MAXIMUM entries: the alias range bounds the map.
            aliases.insert(alias, self.topic.clone());
        }
        Ok(())
    }

    /// Clears the retain flag (bit 0 of the fixed header, in both versions).
    fn strip_retain(&mut self) {
        self.retain = false;
        if let Some(p) = self.rewritten.as_mut() {
            p.retain = false;
        }
        let mut bytes = BytesMut::from(&self.original[..]);
        bytes[0] &= !0x01;
        self.original = bytes.freeze();
    }

    fn forwardable(&self) -> Bytes {
        match &self.rewritten {
            None => self.original.clone(),
            Some(p) => {
                let mut buf = BytesMut::with_capacity(self.original.len() + self.topic.len());
                match p.write(&mut buf) {
                    Ok(_) => buf.freeze(),
                    Err(_) => self.original.clone(),
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FilterAction {
    Subscribe,
    Unsubscribe,
}

impl FilterAction {
    const fn as_str(self) -> &'static str {
        match self {
            Self::Subscribe => "subscribe",
            Self::Unsubscribe => "unsubscribe",
        }
    }
}

/// A SUBSCRIBE or UNSUBSCRIBE in either protocol version.
enum FilterRequest {
    Subscribe311(v4::Subscribe),
    Subscribe5(v5::Subscribe),
    Unsubscribe311(v4::Unsubscribe),
    Unsubscribe5(v5::Unsubscribe),
}

impl FilterRequest {
    fn parse(action: FilterAction, frame: Frame) -> Result<Self, String> {
        match (action, frame) {
            (FilterAction::Subscribe, Frame::V311 { header, bytes }) => {
                v4::Subscribe::read(header, bytes)
                    .map(Self::Subscribe311)
                    .map_err(|e| e.to_string())
            }
            (FilterAction::Subscribe, Frame::V5 { header, bytes }) => {
                v5::Subscribe::read(header, bytes)
                    .map(Self::Subscribe5)
                    .map_err(|e| e.to_string())
            }
            (FilterAction::Unsubscribe, Frame::V311 { header, bytes }) => {
                v4::Unsubscribe::read(header, bytes)
                    .map(Self::Unsubscribe311)
                    .map_err(|e| e.to_string())
            }
            (FilterAction::Unsubscribe, Frame::V5 { header, bytes }) => {
                v5::Unsubscribe::read(header, bytes)
                    .map(Self::Unsubscribe5)
                    .map_err(|e| e.to_string())
            }
        }
    }

    fn pkid(&self) -> u16 {
        match self {
            Self::Subscribe311(r) => r.pkid,
            Self::Subscribe5(r) => r.pkid,
            Self::Unsubscribe311(r) => r.pkid,
            Self::Unsubscribe5(r) => r.pkid,
        }
    }

    /// Number of filters requested.
    fn len(&self) -> usize {
        match self {
            Self::Subscribe311(r) => r.filters.len(),
            Self::Subscribe5(r) => r.filters.len(),
            Self::Unsubscribe311(r) => r.topics.len(),
            Self::Unsubscribe5(r) => r.filters.len(),
        }
    }

    fn filters(&self) -> Vec<String> {
        match self {
            Self::Subscribe311(r) => r.filters.iter().map(|f| f.path.clone()).collect(),
            Self::Subscribe5(r) => r.filters.iter().map(|f| f.path.clone()).collect(),
            Self::Unsubscribe311(r) => r.topics.clone(),
            Self::Unsubscribe5(r) => r.filters.clone(),
        }
    }

    /// The gate's own answer when every filter was refused: 0x80 (3.1.1) or 0x87 (5)
    /// per filter; a 3.1.1 UNSUBACK has no codes.
    fn all_denied(&self) -> Bytes {
        match self {
            Self::Subscribe311(r) => reply::suback_v311(
                r.pkid,
                vec![v4::SubscribeReasonCode::Failure; r.filters.len()],
            ),
            Self::Subscribe5(r) => reply::suback_v5(
                r.pkid,
                vec![v5::SubscribeReasonCode::NotAuthorized; r.filters.len()],
                None,
            ),
            Self::Unsubscribe311(r) => reply::unsuback_v311(r.pkid),
            Self::Unsubscribe5(r) => reply::unsuback_v5(
                r.pkid,
                vec![v5::UnsubAckReason::NotAuthorized; r.filters.len()],
                None,
            ),
        }
    }

    /// The gate's answer to a SUBSCRIBE over the filter limit: 0x80 (3.1.1) or 0x97
    /// quota exceeded (5) per filter. Not used for UNSUBSCRIBE.
    fn all_refused_over_quota(&self) -> Bytes {
        match self {
            Self::Subscribe5(r) => reply::suback_v5(
                r.pkid,
                vec![v5::SubscribeReasonCode::QuotaExceeded; r.filters.len()],
                None,
            ),
            _ => self.all_denied(),
        }
    }

    /// The request with only the forwarded filters, encoded.
    fn keep(self, forwarded: &[bool]) -> Result<Bytes, String> {
        let mut buf = BytesMut::new();
        let written = match self {
            Self::Subscribe311(mut r) => {
                retain_forwarded(&mut r.filters, forwarded);
                r.write(&mut buf).map_err(|e| e.to_string())
            }
            Self::Subscribe5(mut r) => {
                retain_forwarded(&mut r.filters, forwarded);
                r.write(&mut buf).map_err(|e| e.to_string())
            }
            Self::Unsubscribe311(mut r) => {
                retain_forwarded(&mut r.topics, forwarded);
                r.write(&mut buf).map_err(|e| e.to_string())
            }
            Self::Unsubscribe5(mut r) => {
                retain_forwarded(&mut r.filters, forwarded);
                r.write(&mut buf).map_err(|e| e.to_string())
            }
        };
        written.map(|_| buf.freeze())
    }
}
