//! A client's PUBLISH: size, rate, MQTT 5 topic alias, authorization (answers cached
//! per connection), the retained-telemetry rule, and the one path that forwards it.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use vitalmq_audit::{Decision, Event};
use vitalmq_policies::{DeniedPublishV311, RetainedTelemetry, is_telemetry_topic};

use super::frame::{Frame, FrameError, Version};
use super::reply::{self, PublishRefusal};
use super::session::{CloseReason, GateSession, Output};
use crate::authz::{Denial, DenyReason, Kind as _, Misdirected, Permit, kind as decision};
use crate::embedded::TOPIC_ALIAS_MAXIMUM;

/// Cached publish decisions per connection; the cache is cleared when it fills, which
/// bounds memory for a client that publishes to many (denied) topics.
const PUBLISH_CACHE_LIMIT: usize = 4_096;

/// A client's PUBLISH, parsed and its topic alias resolved, waiting for a permit.
///
/// Public only to document the gate's guarantee; nothing outside the gate can make one.
/// [`PublishPacket::forward`] is the one way its bytes reach rumqttd, and it takes a
/// [`Permit`] for a publish to this packet's topic:
///
/// ```no_run
/// use bytes::Bytes;
/// use vitalmq_broker::authz::{Misdirected, Permit, kind};
/// use vitalmq_broker::gate::PublishPacket;
///
/// fn forward(publish: &PublishPacket, permit: &Permit<kind::Publish>) -> Result<Bytes, Misdirected> {
///     publish.forward(permit)
/// }
/// ```
///
/// Without a permit it does not compile:
///
/// ```compile_fail,E0061
/// use vitalmq_broker::gate::PublishPacket;
///
/// fn forward(publish: &PublishPacket) {
///     let _ = publish.forward();
/// }
/// ```
///
/// Nor with a permit of another kind: a subscribe permit cannot forward a PUBLISH.
///
/// ```compile_fail,E0308
/// use vitalmq_broker::authz::{Permit, kind};
/// use vitalmq_broker::gate::PublishPacket;
///
/// fn forward(publish: &PublishPacket, permit: &Permit<kind::Subscribe>) {
///     let _ = publish.forward(permit);
/// }
/// ```
#[derive(Debug)]
pub struct PublishPacket {
    topic: String,
    qos: u8,
    retain: bool,
    pkid: u16,
    payload_len: usize,
    original: Bytes,
    /// Set when the packet must be re-encoded (an alias was resolved).
    rewritten: Option<Box<v5::Publish>>,
}

/// An MQTT 5 topic alias the gate cannot resolve (MQTT 5 3.3.2.3.4: a protocol error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum AliasError {
    #[error("topic alias {0} outside 1..={TOPIC_ALIAS_MAXIMUM} (the advertised maximum)")]
    OutOfRange(u16),
    #[error("unknown topic alias {0}")]
    Unknown(u16),
}

impl PublishPacket {
    fn parse(frame: Frame) -> Result<Self, FrameError> {
        let malformed = |e: &dyn std::fmt::Display| FrameError::Malformed(e.to_string());
        match frame {
            Frame::V311 { header, bytes } => {
                let p = v4::Publish::read(header, bytes.clone()).map_err(|e| malformed(&e))?;
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
                let p = v5::Publish::read(header, bytes.clone()).map_err(|e| malformed(&e))?;
                let topic = String::from_utf8(p.topic.to_vec())
                    .map_err(|_| malformed(&"topic is not UTF-8"))?;
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
    fn resolve_alias(&mut self, aliases: &mut HashMap<u16, String>) -> Result<(), AliasError> {
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
            return Err(AliasError::OutOfRange(alias));
        }
        if self.topic.is_empty() {
            let topic = aliases.get(&alias).ok_or(AliasError::Unknown(alias))?;
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

    /// The bytes rumqttd gets, given a permit for this packet's topic.
    pub fn forward(&self, permit: &Permit<decision::Publish>) -> Result<Bytes, Misdirected> {
        permit.covers(&self.topic)?;
        Ok(match &self.rewritten {
            None => self.original.clone(),
            Some(p) => {
                let mut buf = BytesMut::with_capacity(self.original.len() + self.topic.len());
                match p.write(&mut buf) {
                    Ok(_) => buf.freeze(),
                    Err(_) => self.original.clone(),
                }
            }
        })
    }
}

impl GateSession {
    pub(super) fn publish(&mut self, version: Version, frame: Frame, out: &mut Vec<Output>) {
        let raw = frame.clone();
        let mut publish = match PublishPacket::parse(frame) {
            Ok(p) => p,
            Err(e) => return self.refuse_unframeable(e, out),
        };
        if let Err(e) = publish.resolve_alias(&mut self.aliases) {
            // MQTT 5 3.3.2.3.4: an alias of 0, above the Topic Alias Maximum, or unknown
            // is a protocol error: DISCONNECT 0x94.
            out.push(Output::ToClient(reply::disconnect_v5(
                v5::DisconnectReasonCode::TopicAliasInvalid,
            )));
            let record = self
                .record(Event::ConnectionClosed)
                .action(decision::Publish::ACTION)
                .decision(Decision::Deny)
                .reason("topic_alias_invalid")
                .detail("error", e.to_string());
            let _ = self.audit.record(record);
            return self.close(out, CloseReason::new("topic_alias", e.to_string()));
        }
        // In MQTT 5 the frame limit, the Maximum Packet Size, is the size check, before
        // the CONNACK too (`limits`); 3.1.1 has none to announce: the payload is checked.
        if version == Version::V311 && publish.payload_len > self.max_payload {
            let denial = Denial::new(DenyReason::Oversized, "max-payload");
            return self.refuse_publish(version, &publish, denial, out);
        }
        if let Err(wait) = self.rate.admit(publish.payload_len) {
            return self.rate_limited(version, raw, &publish, wait, out);
        }
        let permit = match self.publish_answer(&publish.topic) {
            Ok(permit) => permit,
            Err(denial) => return self.refuse_publish(version, &publish, denial, out),
        };
        if publish.retain && is_telemetry_topic(&publish.topic) {
            match self.authz.retained_telemetry() {
                RetainedTelemetry::Strip => {
                    if !self.retain_stripped_audited(&publish.topic) {
                        return self.audit_failed(out);
                    }
                    publish.strip_retain();
                }
                RetainedTelemetry::Refuse => {
                    let denial = Denial::new(DenyReason::RetainNotSupported, "retained-telemetry");
                    return self.refuse_publish(version, &publish, denial, out);
                }
            }
        }
        if version == Version::V5 && publish.qos > 0 && !self.admit_inbound(publish.pkid, out) {
            return;
        }
        match publish.forward(&permit) {
            Ok(bytes) => {
                self.counters.messages_in.increment(1);
                self.counters.bytes_in.increment(publish.payload_len as u64);
                out.push(Output::ToBroker(bytes));
            }
            Err(e) => self.close(out, CloseReason::new("internal", e.to_string())),
        }
    }

    /// The authorizer's answer for `topic`, from this connection's cache when it has one.
    fn publish_answer(&mut self, topic: &str) -> Result<Permit<decision::Publish>, Denial> {
        if let Some(answer) = self.publish_cache.get(topic) {
            return answer.clone();
        }
        let answer = self.authz.may_publish(&self.peer, topic);
        if self.publish_cache.len() >= PUBLISH_CACHE_LIMIT {
            self.publish_cache.clear();
        }
        self.publish_cache.insert(topic.to_owned(), answer.clone());
        answer
    }

    /// Above the identity's message rate. MQTT 3.1.1 cannot say "slow down": hold the
    /// client's input instead (`raw` is retried after `wait`), which loses nothing. MQTT
    /// 5: audit and answer QoS 1 and 2 with 0x97 quota exceeded.
    fn rate_limited(
        &mut self,
        version: Version,
        raw: Frame,
        publish: &PublishPacket,
        wait: std::time::Duration,
        out: &mut Vec<Output>,
    ) {
        if version == Version::V311 {
            self.deferred = Some(raw);
            return out.push(Output::Pause(wait));
        }
        metrics::counter!("vitalmq_rate_limited_total").increment(1);
        let record = self
            .record(Event::MessageRefused)
            .action(decision::Publish::ACTION)
            .resource(publish.topic.clone())
            .decision(Decision::Deny)
            .reason("rate_limited");
        if self.audit.record(record).is_err() {
            return self.audit_failed(out);
        }
        self.answer_refused(version, publish, PublishRefusal::QuotaExceeded, out);
    }

    /// Audits a refused PUBLISH and answers as its denial calls for: too large closes
    /// (MQTT 5: DISCONNECT 0x95), a refused retained telemetry PUBLISH closes (0x9A),
    /// anything else the policy does not allow closes a 3.1.1 connection or, under
    /// acknowledge-and-drop and in MQTT 5, is acknowledged (0x87) and dropped.
    fn refuse_publish(
        &mut self,
        version: Version,
        publish: &PublishPacket,
        denial: Denial,
        out: &mut Vec<Output>,
    ) {
        let action = decision::Publish::ACTION;
        if !self.audit_denial(action, publish.topic.clone(), &denial) {
            return self.audit_failed(out);
        }
        let disconnect =
            |code| (version == Version::V5).then(|| Output::ToClient(reply::disconnect_v5(code)));
        let (code, close) = match denial.reason {
            DenyReason::Oversized => (
                disconnect(v5::DisconnectReasonCode::PacketTooLarge),
                CloseReason::new(
                    "payload_too_large",
                    format!("{} bytes", publish.payload_len),
                ),
            ),
            DenyReason::RetainNotSupported => (
                disconnect(v5::DisconnectReasonCode::RetainNotSupported),
                CloseReason::new("retain_refused", "retained PUBLISH on a telemetry topic"),
            ),
            _ => match (version, self.authz.denied_publish_v311()) {
                (Version::V311, DeniedPublishV311::Disconnect) => {
                    (None, CloseReason::new("publish_denied", denial.rule))
                }
                (Version::V311, DeniedPublishV311::AckAndDrop) | (Version::V5, _) => {
                    if publish.qos == 2 && version == Version::V311 {
                        self.dropped_qos2.insert(publish.pkid);
                    }
                    return self.answer_refused(
                        version,
                        publish,
                        PublishRefusal::NotAuthorized,
                        out,
                    );
                }
            },
        };
        out.extend(code);
        self.close(out, close);
    }

    /// Acknowledges a QoS 1 or 2 PUBLISH the gate will not route (QoS 0 gets nothing).
    fn answer_refused(
        &mut self,
        version: Version,
        publish: &PublishPacket,
        why: PublishRefusal,
        out: &mut Vec<Output>,
    ) {
        if publish.qos > 0 {
            out.push(Output::ToClient(reply::publish_refused(
                version,
                publish.qos == 2,
                publish.pkid,
                why,
            )));
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
            .action(decision::Publish::ACTION)
            .resource(topic.to_owned())
            .decision(Decision::Deny)
            .reason("retain_stripped")
            .detail("outcome", "routed without the retain flag")
            .detail("policy", "retained_telemetry = strip")
            .detail("later", "counted in vitalmq_retain_stripped_total");
        self.audit.record(record).is_ok()
    }
}
