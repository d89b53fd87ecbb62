//! SUBSCRIBE and UNSUBSCRIBE: the SUBSCRIBE rate and filter limit, per-filter
//! authorization, the one path that forwards the permitted filters, and the broker's
//! SUBACK/UNSUBACK codes spread back to the positions the client asked for.

use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use vitalmq_audit::{Decision, Event};

use super::frame::{Frame, FrameError, kind};
use super::reply::{self, EncodeError};
use super::session::{CloseReason, GateSession, Output, Pending};
use crate::authz::{Authorizer, Denial, Kind, Misdirected, Permit, kind as decision};
use crate::identity::PeerIdentity;

/// Why permitted filters could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub(super) enum ForwardFiltersError {
    #[error(transparent)]
    Misdirected(#[from] Misdirected),
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// The two filter requests, as decision kinds: how each is parsed and asked about,
/// and what the session remembers of a forwarded one.
pub(super) trait FilterKind: Kind + Sized {
    /// SUBSCRIBE (true) or UNSUBSCRIBE.
    const SUBSCRIBE: bool;
    fn ask(
        authz: &dyn Authorizer,
        who: &PeerIdentity,
        filter: &str,
    ) -> Result<Permit<Self>, Denial>;
    /// Updates the filters the broker was asked to subscribe.
    fn track(subscriptions: &mut HashSet<String>, filter: &str);
    /// Requests awaiting the broker's acknowledgement to spread back.
    fn pending(session: &mut GateSession) -> &mut HashMap<u16, Pending>;
}

impl FilterKind for decision::Subscribe {
    const SUBSCRIBE: bool = true;

    fn ask(
        authz: &dyn Authorizer,
        who: &PeerIdentity,
        filter: &str,
    ) -> Result<Permit<Self>, Denial> {
        authz.may_subscribe(who, filter)
    }

    fn track(subscriptions: &mut HashSet<String>, filter: &str) {
        subscriptions.insert(filter.to_owned());
    }

    fn pending(session: &mut GateSession) -> &mut HashMap<u16, Pending> {
        &mut session.pending_subacks
    }
}

impl FilterKind for decision::Unsubscribe {
    const SUBSCRIBE: bool = false;

    fn ask(
        authz: &dyn Authorizer,
        who: &PeerIdentity,
        filter: &str,
    ) -> Result<Permit<Self>, Denial> {
        authz.may_unsubscribe(who, filter)
    }

    fn track(subscriptions: &mut HashSet<String>, filter: &str) {
        subscriptions.remove(filter);
    }

    fn pending(session: &mut GateSession) -> &mut HashMap<u16, Pending> {
        &mut session.pending_unsubacks
    }
}

enum Packet {
    Subscribe311(v4::Subscribe),
    Subscribe5(v5::Subscribe),
    Unsubscribe311(v4::Unsubscribe),
    Unsubscribe5(v5::Unsubscribe),
}

/// A SUBSCRIBE (`K` = subscribe) or UNSUBSCRIBE (`K` = unsubscribe) in either protocol
/// version; only `parse` makes one, so its packet matches its kind.
pub(super) struct FilterPacket<K> {
    packet: Packet,
    kind: PhantomData<fn() -> K>,
}

impl<K: FilterKind> FilterPacket<K> {
    fn parse(frame: Frame) -> Result<Self, FrameError> {
        let malformed = |e: &dyn std::fmt::Display| FrameError::Malformed(e.to_string());
        let packet = match (K::SUBSCRIBE, frame) {
            (true, Frame::V311 { header, bytes }) => v4::Subscribe::read(header, bytes)
                .map(Packet::Subscribe311)
                .map_err(|e| malformed(&e)),
            (true, Frame::V5 { header, bytes }) => v5::Subscribe::read(header, bytes)
                .map(Packet::Subscribe5)
                .map_err(|e| malformed(&e)),
            (false, Frame::V311 { header, bytes }) => v4::Unsubscribe::read(header, bytes)
                .map(Packet::Unsubscribe311)
                .map_err(|e| malformed(&e)),
            (false, Frame::V5 { header, bytes }) => v5::Unsubscribe::read(header, bytes)
                .map(Packet::Unsubscribe5)
                .map_err(|e| malformed(&e)),
        }?;
        Ok(Self {
            packet,
            kind: PhantomData,
        })
    }

    fn pkid(&self) -> u16 {
        match &self.packet {
            Packet::Subscribe311(r) => r.pkid,
            Packet::Subscribe5(r) => r.pkid,
            Packet::Unsubscribe311(r) => r.pkid,
            Packet::Unsubscribe5(r) => r.pkid,
        }
    }

    /// Number of filters requested.
    fn len(&self) -> usize {
        match &self.packet {
            Packet::Subscribe311(r) => r.filters.len(),
            Packet::Subscribe5(r) => r.filters.len(),
            Packet::Unsubscribe311(r) => r.topics.len(),
            Packet::Unsubscribe5(r) => r.filters.len(),
        }
    }

    fn filters(&self) -> Vec<String> {
        match &self.packet {
            Packet::Subscribe311(r) => r.filters.iter().map(|f| f.path.clone()).collect(),
            Packet::Subscribe5(r) => r.filters.iter().map(|f| f.path.clone()).collect(),
            Packet::Unsubscribe311(r) => r.topics.clone(),
            Packet::Unsubscribe5(r) => r.filters.clone(),
        }
    }

    /// The broker's acknowledgement carries a code per filter (all but a 3.1.1
    /// UNSUBACK), which must be spread back when some filters were refused.
    fn acked_per_filter(&self) -> bool {
        !matches!(self.packet, Packet::Unsubscribe311(_))
    }

    /// The gate's own answer when every filter was refused: 0x80 (3.1.1) or 0x87 (5)
    /// per filter; a 3.1.1 UNSUBACK has no codes.
    fn all_denied(&self) -> Bytes {
        match &self.packet {
            Packet::Subscribe311(r) => reply::suback_v311(
                r.pkid,
                vec![v4::SubscribeReasonCode::Failure; r.filters.len()],
            ),
            Packet::Subscribe5(r) => reply::suback_v5(
                r.pkid,
                vec![v5::SubscribeReasonCode::NotAuthorized; r.filters.len()],
                None,
            ),
            Packet::Unsubscribe311(r) => reply::unsuback_v311(r.pkid),
            Packet::Unsubscribe5(r) => reply::unsuback_v5(
                r.pkid,
                vec![v5::UnsubAckReason::NotAuthorized; r.filters.len()],
                None,
            ),
        }
    }

    /// The request with only the filters that hold a permit at their position, encoded:
    /// the one way a filter reaches rumqttd.
    fn forward(self, permits: &[Option<Permit<K>>]) -> Result<Bytes, ForwardFiltersError> {
        for (filter, permit) in self.filters().iter().zip(permits) {
            if let Some(permit) = permit {
                permit.covers(filter)?;
            }
        }
        let keep: Vec<bool> = permits.iter().map(Option::is_some).collect();
        let mut buf = BytesMut::new();
        match self.packet {
            Packet::Subscribe311(mut r) => {
                retain_forwarded(&mut r.filters, &keep);
                r.write(&mut buf).map_err(EncodeError::from)?;
            }
            Packet::Subscribe5(mut r) => {
                retain_forwarded(&mut r.filters, &keep);
                r.write(&mut buf).map_err(EncodeError::from)?;
            }
            Packet::Unsubscribe311(mut r) => {
                retain_forwarded(&mut r.topics, &keep);
                r.write(&mut buf).map_err(EncodeError::from)?;
            }
            Packet::Unsubscribe5(mut r) => {
                retain_forwarded(&mut r.filters, &keep);
                r.write(&mut buf).map_err(EncodeError::from)?;
            }
        }
        Ok(buf.freeze())
    }
}

impl FilterPacket<decision::Subscribe> {
    /// The gate's answer to a SUBSCRIBE over the filter limit: 0x80 (3.1.1) or 0x97
    /// quota exceeded (5) per filter.
    fn all_refused_over_quota(&self) -> Bytes {
        match &self.packet {
            Packet::Subscribe5(r) => reply::suback_v5(
                r.pkid,
                vec![v5::SubscribeReasonCode::QuotaExceeded; r.filters.len()],
                None,
            ),
            _ => self.all_denied(),
        }
    }
}

impl GateSession {
    pub(super) fn subscribe(&mut self, frame: Frame, out: &mut Vec<Output>) {
        if let Err(wait) = self.rate.admit_subscribe() {
            // Above the SUBSCRIBE rate: stop reading from the client and retry this
            // packet after the wait (loses nothing, writes nothing).
            metrics::counter!("vitalmq_subscribe_throttled_total").increment(1);
            self.deferred = Some(frame);
            return out.push(Output::Pause(wait));
        }
        let request = match FilterPacket::<decision::Subscribe>::parse(frame) {
            Ok(r) => r,
            Err(e) => return self.refuse_unframeable(e, out),
        };
        if request.len() > self.max_subscribe_filters {
            return self.too_many_filters(&request, out);
        }
        self.forward_filters(request, out);
    }

    pub(super) fn unsubscribe(&mut self, frame: Frame, out: &mut Vec<Output>) {
        let request = match FilterPacket::<decision::Unsubscribe>::parse(frame) {
            Ok(r) => r,
            Err(e) => return self.refuse_unframeable(e, out),
        };
        self.forward_filters(request, out);
    }

    /// Authorizes (and audits) each filter, forwards the permitted ones, answers alone
    /// when none is, and remembers the positions of refused ones so the broker's
    /// acknowledgement can be spread back.
    fn forward_filters<K: FilterKind>(&mut self, request: FilterPacket<K>, out: &mut Vec<Output>) {
        let filters = request.filters();
        let mut permits = Vec::with_capacity(filters.len());
        for filter in &filters {
            match K::ask(self.authz.as_ref(), &self.peer, filter) {
                Ok(permit) => permits.push(Some(permit)),
                Err(denial) => {
                    if !self.audit_denial(K::ACTION, filter.clone(), &denial) {
                        return self.audit_failed(out);
                    }
                    permits.push(None);
                }
            }
        }
        if permits.iter().all(Option::is_none) {
            return out.push(Output::ToClient(request.all_denied()));
        }
        for permit in permits.iter().flatten() {
            K::track(&mut self.subscriptions, permit.resource());
        }
        let pkid = request.pkid();
        let acked_per_filter = request.acked_per_filter();
        match request.forward(&permits) {
            Ok(bytes) => out.push(Output::ToBroker(bytes)),
            Err(e) => return self.close(out, CloseReason::new("internal", e.to_string())),
        }
        let forwarded: Vec<bool> = permits.iter().map(Option::is_some).collect();
        if acked_per_filter && forwarded.iter().any(|f| !f) {
            K::pending(self).insert(pkid, Pending { forwarded });
        }
    }

    /// A SUBSCRIBE with more filters than the role allows is refused as a whole, before
    /// any filter is looked at: one audit record (not one per filter) and every code
    /// 0x80 (3.1.1) or 0x97 quota exceeded (5). The connection stays.
    fn too_many_filters(
        &mut self,
        request: &FilterPacket<decision::Subscribe>,
        out: &mut Vec<Output>,
    ) {
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
            .action(decision::Subscribe::ACTION)
            .resource(format!("{count} filters"))
            .decision(Decision::Deny)
            .reason(crate::authz::DenyReason::TooManyFilters.as_str())
            .rule("max-subscribe-filters")
            .detail("filters", count)
            .detail("limit", self.max_subscribe_filters);
        if self.audit.record(record).is_err() {
            return self.audit_failed(out);
        }
        out.push(Output::ToClient(request.all_refused_over_quota()));
    }

    /// rumqttd's SUBACK (or MQTT 5 UNSUBACK) for a request with refused filters: its
    /// codes go back to the positions of the forwarded filters, 0x80 (3.1.1) or 0x87
    /// (5) everywhere else. Other acknowledgements pass unchanged.
    pub(super) fn merge_ack(&mut self, frame: Frame, out: &mut Vec<Output>) {
        let merged = match frame.packet_type() {
            kind::SUBACK => self.merged_suback(&frame),
            _ => self.merged_unsuback(&frame),
        };
        out.push(Output::ToClient(
            merged.unwrap_or_else(|| frame.bytes().clone()),
        ));
    }

    fn merged_suback(&mut self, frame: &Frame) -> Option<Bytes> {
        let pending = &mut self.pending_subacks;
        Some(match frame {
            Frame::V311 { header, bytes } => {
                let ack = v4::SubAck::read(*header, bytes.clone()).ok()?;
                let denied = v4::SubscribeReasonCode::Failure;
                let codes = spread(pending, ack.pkid, ack.return_codes, denied)?;
                reply::suback_v311(ack.pkid, codes)
            }
            Frame::V5 { header, bytes } => {
                let ack = v5::SubAck::read(*header, bytes.clone()).ok()?;
                let denied = v5::SubscribeReasonCode::NotAuthorized;
                let codes = spread(pending, ack.pkid, ack.return_codes, denied)?;
                reply::suback_v5(ack.pkid, codes, ack.properties)
            }
        })
    }

    fn merged_unsuback(&mut self, frame: &Frame) -> Option<Bytes> {
        let Frame::V5 { header, bytes } = frame else {
            return None;
        };
        let ack = v5::UnsubAck::read(*header, bytes.clone()).ok()?;
        let denied = v5::UnsubAckReason::NotAuthorized;
        let reasons = spread(&mut self.pending_unsubacks, ack.pkid, ack.reasons, denied)?;
        Some(reply::unsuback_v5(ack.pkid, reasons, ack.properties))
    }
}

/// Keeps the items whose position is marked forwarded.
fn retain_forwarded<T>(items: &mut Vec<T>, forwarded: &[bool]) {
    let mut keep = forwarded.iter();
    items.retain(|_| keep.next().copied().unwrap_or(false));
}

/// For a request `pkid` that had refused filters: the broker's answers for the
/// forwarded ones back at their positions and `denied` everywhere else (a broker answer
/// with too few codes leaves the rest denied). `None` when nothing was refused.
fn spread<T: Clone>(
    pending: &mut HashMap<u16, Pending>,
    pkid: u16,
    answers: Vec<T>,
    denied: T,
) -> Option<Vec<T>> {
    let pending = pending.remove(&pkid)?;
    let mut answers = answers.into_iter();
    let spread = pending
        .forwarded
        .iter()
        .map(|f| {
            if *f {
                answers.next().unwrap_or_else(|| denied.clone())
            } else {
                denied.clone()
            }
        })
        .collect();
    Some(spread)
}
