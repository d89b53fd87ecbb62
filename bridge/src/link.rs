//! A publishing MQTT connection whose every PUBLISH is confirmed: a fresh clean-session
//! rumqttc connection with its own event loop, reporting what it sent, what the broker
//! acknowledged, and what arrived on its subscriptions. Used by the upstream sink, which
//! owns its connection, so every PUBACK on it is its own. (The alert publisher has the
//! MQTT 5 counterpart, `crate::link5`, with the same guarantees.)
//!
//! On any failure the caller drops the link and connects a new one: rumqttc would
//! otherwise retransmit the old in-flight PUBLISHes on reconnect, and acknowledgements
//! of an old attempt could be counted for a new one.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
use tokio::sync::mpsc;

/// What the event loop saw.
enum Note {
    Connected,
    Sent(u16),
    Acked(u16),
    Subscribed(bool),
    Message(String, Bytes),
    Failed(String),
}

/// Why a link operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The connection failed or timed out: reconnect and retry.
    #[error("{0}")]
    Failed(String),
    /// The broker refused a subscription: retrying will not help.
    #[error("subscription refused: {0}")]
    Refused(String),
}

/// One confirmed-publish connection.
pub struct Link {
    client: AsyncClient,
    notes: mpsc::UnboundedReceiver<Note>,
    task: tokio::task::JoinHandle<()>,
    subscribed: HashSet<String>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("subscribed", &self.subscribed)
            .finish()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Link {
    /// Connects with `options` (clean session is forced on) and waits for CONNACK.
    pub async fn connect(
        mut options: rumqttc::MqttOptions,
        timeout: Duration,
    ) -> Result<Self, LinkError> {
        options.set_clean_session(true).set_manual_acks(false);
        let (client, mut eventloop) = crate::mqtt::client(options, 1024);
        let (tx, mut notes) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let note = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => Note::Connected,
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Note::Sent(pkid),
                    Ok(Event::Incoming(Packet::PubAck(ack))) => Note::Acked(ack.pkid),
                    Ok(Event::Incoming(Packet::SubAck(ack))) => Note::Subscribed(
                        ack.return_codes
                            .iter()
                            .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))),
                    ),
                    Ok(Event::Incoming(Packet::Publish(p))) => Note::Message(p.topic, p.payload),
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
            subscribed: HashSet::new(),
        };
        match first {
            Ok(Some(Note::Connected)) => Ok(link),
            Ok(Some(Note::Failed(e))) => Err(LinkError::Failed(format!("connect: {e}"))),
            Ok(_) => Err(LinkError::Failed("connect: connection closed".into())),
            Err(_) => Err(LinkError::Failed("connect: timed out".into())),
        }
    }

    /// Subscribes (QoS 1) to the filters not yet subscribed to on this link and waits
    /// for the SUBACKs; messages arriving meanwhile go to `on_message`.
    pub async fn subscribe(
        &mut self,
        filters: impl IntoIterator<Item = String>,
        mut on_message: impl FnMut(String, Bytes),
    ) -> Result<(), LinkError> {
        let new: Vec<String> = filters
            .into_iter()
            .filter(|f| !self.subscribed.contains(f))
            .collect();
        for f in &new {
            self.client
                .subscribe(f.clone(), QoS::AtLeastOnce)
                .await
                .map_err(|e| LinkError::Failed(format!("subscribe: {e}")))?;
        }
        let mut acked = 0;
        while acked < new.len() {
            match self.next().await? {
                Note::Subscribed(true) => acked += 1,
                Note::Subscribed(false) => return Err(LinkError::Refused(new.join(", "))),
                Note::Message(t, p) => on_message(t, p),
                _ => {}
            }
        }
        self.subscribed.extend(new);
        Ok(())
    }

    /// Publishes every item at QoS 1, then waits until all are acknowledged and
    /// `done()` holds; messages arriving meanwhile go to `on_message` (before `done` is
    /// asked again). No timeout here: the caller bounds the whole call.
    pub async fn publish_confirmed(
        &mut self,
        items: impl IntoIterator<Item = (String, Bytes)>,
        mut on_message: impl FnMut(String, Bytes),
        mut done: impl FnMut() -> bool,
    ) -> Result<(), LinkError> {
        let mut need = 0usize;
        for (topic, payload) in items {
            self.client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .map_err(|e| LinkError::Failed(format!("publish: {e}")))?;
            need += 1;
        }
        let mut sent = 0usize;
        let mut outstanding = HashSet::new();
        while sent < need || !outstanding.is_empty() || !done() {
            match self.next().await? {
                Note::Sent(pkid) => {
                    sent += 1;
                    outstanding.insert(pkid);
                }
                Note::Acked(pkid) => {
                    outstanding.remove(&pkid);
                }
                Note::Message(t, p) => on_message(t, p),
                Note::Connected | Note::Subscribed(_) => {}
                Note::Failed(e) => return Err(LinkError::Failed(e)),
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
