//! The alert publisher's connection: MQTT 5, so that each alert carries its Message
//! Expiry Interval, Content Type and Payload Format Indicator, with every PUBLISH
//! confirmed as on [`crate::link::Link`] (the upstream sink's 3.1.1 connection).
//!
//! The same guarantees as there: a fresh clean-start connection (no session kept) with
//! its own event loop, so every PUBACK on it answers one of its own PUBLISHes; on any
//! failure the caller drops the link and connects a new one, rumqttc never retransmits
//! an old attempt's PUBLISH on a new connection, and an acknowledgement of an old
//! attempt is never counted for a new one. Under MQTT 5 a PUBACK can refuse: a reason
//! code of 0x80 or more (rumqttc's `PubAckReason` other than `Success` and
//! `NoMatchingSubscribers`, 0x10, which is a success: nobody subscribed yet) fails the
//! whole call, like a lost connection.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::Outgoing;
use rumqttc::v5::Event;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, PublishProperties};
use tokio::sync::mpsc;

use crate::link::LinkError;
use crate::mqtt::V5Endpoint;

/// What the event loop saw.
enum Note {
    Connected,
    Sent(u16),
    Acked(u16),
    Refused(u16, PubAckReason),
    Failed(String),
}

/// One PUBLISH of the alert publisher: QoS 1, not retained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish5 {
    pub topic: String,
    pub payload: Bytes,
    pub properties: PublishProperties,
}

/// Whether a PUBACK reason is a success (MQTT 5 section 3.4.2.1).
fn accepted(reason: &PubAckReason) -> bool {
    matches!(
        reason,
        PubAckReason::Success | PubAckReason::NoMatchingSubscribers
    )
}

/// One confirmed-publish MQTT 5 connection.
pub struct Link5 {
    client: rumqttc::v5::AsyncClient,
    notes: mpsc::UnboundedReceiver<Note>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Link5 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link5").finish_non_exhaustive()
    }
}

impl Drop for Link5 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Link5 {
    /// Connects to `endpoint` (clean start, no session) and waits for a successful
    /// CONNACK.
    pub async fn connect(endpoint: &V5Endpoint, timeout: Duration) -> Result<Self, LinkError> {
        let (client, mut eventloop) = endpoint.client(1024);
        let (tx, mut notes) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let note = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => Note::Connected,
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Note::Sent(pkid),
                    Ok(Event::Incoming(Packet::PubAck(ack))) if accepted(&ack.reason) => {
                        Note::Acked(ack.pkid)
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => Note::Refused(ack.pkid, ack.reason),
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(Note::Failed(e.to_string()));
                        return;
                    }
                };
                if tx.send(note).is_err() {
                    return;
                }
            }
        });
        let first = tokio::time::timeout(timeout, notes.recv()).await;
        let link = Self {
            client,
            notes,
            task,
        };
        match first {
            Ok(Some(Note::Connected)) => Ok(link),
            Ok(Some(Note::Failed(e))) => Err(LinkError::Failed(format!("connect: {e}"))),
            Ok(_) => Err(LinkError::Failed("connect: connection closed".into())),
            Err(_) => Err(LinkError::Failed("connect: timed out".into())),
        }
    }

    /// Publishes every item at QoS 1 and waits until the broker accepted each. No
    /// timeout here: the caller bounds the whole call.
    pub async fn publish_confirmed(
        &mut self,
        items: impl IntoIterator<Item = Publish5>,
    ) -> Result<(), LinkError> {
        let mut need = 0usize;
        for p in items {
            self.client
                .publish_with_properties(p.topic, QoS::AtLeastOnce, false, p.payload, p.properties)
                .await
                .map_err(|e| LinkError::Failed(format!("publish: {e}")))?;
            need += 1;
        }
        let mut sent = 0usize;
        let mut outstanding = HashSet::new();
        while sent < need || !outstanding.is_empty() {
            match self.next().await? {
                Note::Sent(pkid) => {
                    sent += 1;
                    outstanding.insert(pkid);
                }
                Note::Acked(pkid) => {
                    outstanding.remove(&pkid);
                }
                Note::Refused(pkid, reason) => {
                    return Err(LinkError::Failed(format!(
                        "PUBACK of packet {pkid}: {reason:?}"
                    )));
                }
                Note::Connected | Note::Failed(_) => {}
            }
        }
        Ok(())
    }

    async fn next(&mut self) -> Result<Note, LinkError> {
        match self.notes.recv().await {
            Some(Note::Failed(e)) => Err(LinkError::Failed(e)),
            Some(n) => Ok(n),
            None => Err(LinkError::Failed("connection closed".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MQTT 5 section 3.4.2.1: 0x00 and 0x10 (no matching subscribers) accept the
    /// message; every reason code of 0x80 or more refuses it.
    #[test]
    fn only_success_and_no_matching_subscribers_accept_a_publish() {
        assert!(accepted(&PubAckReason::Success));
        assert!(accepted(&PubAckReason::NoMatchingSubscribers));
        for refused in [
            PubAckReason::UnspecifiedError,
            PubAckReason::ImplementationSpecificError,
            PubAckReason::NotAuthorized,
            PubAckReason::TopicNameInvalid,
            PubAckReason::PacketIdentifierInUse,
            PubAckReason::QuotaExceeded,
            PubAckReason::PayloadFormatInvalid,
        ] {
            assert!(!accepted(&refused), "{refused:?}");
        }
    }
}
