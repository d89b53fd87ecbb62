//! Upstream sink: forwards accepted messages, byte for byte, to a cloud broker over
//! mTLS with this site's certificate, on the topic they arrived on. The device
//! signature stays verifiable, and the cloud-side bridge verifies and sequences them
//! again; it drops a redelivered message as a `duplicate` by `(device, epoch, seq)`,
//! which is what makes redelivery after a failure idempotent.
//!
//! A batch is confirmed end to end, not by the upstream broker's PUBACK: a broker
//! acknowledges before anything is durable, and drops what no session is subscribed
//! to (a restarted cloud broker before the cloud bridge is back). So, like a device
//! (SPEC section 4), the sink subscribes to `devices/{id}/ack` for the devices it
//! forwards for, and a batch is confirmed when the cloud bridge's receipts cover the
//! last `(epoch, seq)` of every device in it. Until then the batch is redelivered
//! after a timeout; the cloud bridge drops what it already has as `duplicate` and
//! fills what it missed. The cloud bridge should run a window at least as large as the
//! batches, so a message missed at the start of a batch is still inside it.
//!
//! If the connection fails midway, the connection and all its in-flight state are
//! dropped and the next attempt starts a fresh one, so acknowledgements of an old
//! attempt can never be counted for a new one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use futures::future::BoxFuture;
use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
use tokio::sync::{Mutex, mpsc};
use tracing::{debug, warn};

use super::{Batch, Sink, SinkError};
use crate::config::BrokerLink;
use crate::window::ReceiptPoint;
use crate::{mqtt, receipt};

/// How long one batch may wait for its acknowledgements and receipts.
const BATCH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new connection may take to be accepted.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

enum Note {
    Connected,
    Sent(u16),
    Acked(u16),
    Subscribed(bool),
    Receipt(String, ReceiptPoint),
    Failed(String),
}

struct Connection {
    client: AsyncClient,
    notes: mpsc::UnboundedReceiver<Note>,
    task: tokio::task::JoinHandle<()>,
    /// Devices whose receipt topic this connection is subscribed to.
    subscribed: HashSet<String>,
    /// Highest receipt seen per device on this connection.
    receipts: HashMap<String, ReceiptPoint>,
}

impl Connection {
    fn note_receipt(&mut self, device: String, point: ReceiptPoint) {
        let slot = self.receipts.entry(device).or_insert(point);
        *slot = (*slot).max(point);
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Forwards to an upstream MQTT broker.
pub struct UpstreamSink {
    name: String,
    options: rumqttc::MqttOptions,
    connection: Mutex<Option<Connection>>,
}

impl std::fmt::Debug for UpstreamSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamSink")
            .field("name", &self.name)
            .field("broker", &self.options.broker_address())
            .finish()
    }
}

impl UpstreamSink {
    /// Prepares the sink; it connects on the first delivery.
    pub fn start(name: String, link: &BrokerLink, client_id: &str) -> anyhow::Result<Self> {
        let mut options = mqtt::options(link, client_id, false)?;
        // Each connection starts clean: redelivery is the drain loop's job.
        options.set_clean_session(true);
        Ok(Self {
            name,
            options,
            connection: Mutex::new(None),
        })
    }

    fn unavailable(&self, detail: impl Into<String>) -> SinkError {
        SinkError::Unavailable {
            sink: self.name.clone(),
            detail: detail.into(),
        }
    }

    async fn connect(&self) -> Result<Connection, SinkError> {
        let (client, mut eventloop) = AsyncClient::new(self.options.clone(), 1024);
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
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        match (receipt::topic_device(&p.topic), receipt::decode(&p.payload)) {
                            (Some(device), Some(point)) => Note::Receipt(device.to_owned(), point),
                            _ => continue,
                        }
                    }
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
        let first = tokio::time::timeout(CONNECT_TIMEOUT, notes.recv()).await;
        let connection = Connection {
            client,
            notes,
            task,
            subscribed: HashSet::new(),
            receipts: HashMap::new(),
        };
        match first {
            Ok(Some(Note::Connected)) => Ok(connection),
            Ok(Some(Note::Failed(e))) => Err(self.unavailable(format!("connect: {e}"))),
            Ok(_) => Err(self.unavailable("connect: connection closed")),
            Err(_) => Err(self.unavailable("connect: timed out")),
        }
    }

    async fn forward(&self, conn: &mut Connection, batch: &Batch) -> Result<(), SinkError> {
        // What the receipts must cover: the last (epoch, seq) per device.
        let mut needed: BTreeMap<String, ReceiptPoint> = BTreeMap::new();
        for r in &batch.records {
            let p = ReceiptPoint {
                epoch: r.epoch,
                seq: r.seq,
            };
            let slot = needed.entry(r.device.clone()).or_insert(p);
            *slot = (*slot).max(p);
        }
        let wait = async {
            self.subscribe(conn, needed.keys()).await?;
            for r in &batch.records {
                conn.client
                    .publish(r.topic.clone(), QoS::AtLeastOnce, false, r.raw.clone())
                    .await
                    .map_err(|e| self.unavailable(format!("publish: {e}")))?;
            }
            let need = batch.records.len();
            let mut sent = 0usize;
            let mut outstanding = HashSet::new();
            let covered = |conn: &Connection| {
                needed
                    .iter()
                    .all(|(d, p)| conn.receipts.get(d).is_some_and(|r| r >= p))
            };
            while sent < need || !outstanding.is_empty() || !covered(conn) {
                match conn.notes.recv().await {
                    Some(Note::Sent(pkid)) => {
                        sent += 1;
                        outstanding.insert(pkid);
                    }
                    Some(Note::Acked(pkid)) => {
                        outstanding.remove(&pkid);
                    }
                    Some(Note::Receipt(device, point)) => conn.note_receipt(device, point),
                    Some(Note::Connected | Note::Subscribed(_)) => {}
                    Some(Note::Failed(e)) => return Err(self.unavailable(e)),
                    None => return Err(self.unavailable("connection closed")),
                }
            }
            Ok(())
        };
        tokio::time::timeout(BATCH_TIMEOUT, wait)
            .await
            .map_err(|_| {
                self.unavailable("the upstream bridge did not receipt the batch in time")
            })?
    }

    /// Subscribes to the receipt topics of `devices` not yet subscribed to.
    async fn subscribe<'d>(
        &self,
        conn: &mut Connection,
        devices: impl Iterator<Item = &'d String>,
    ) -> Result<(), SinkError> {
        let new: Vec<String> = devices
            .filter(|d| !conn.subscribed.contains(*d))
            .cloned()
            .collect();
        for d in &new {
            conn.client
                .subscribe(format!("devices/{d}/ack"), QoS::AtLeastOnce)
                .await
                .map_err(|e| self.unavailable(format!("subscribe: {e}")))?;
        }
        let mut acked = 0;
        while acked < new.len() {
            match conn.notes.recv().await {
                Some(Note::Subscribed(true)) => acked += 1,
                Some(Note::Subscribed(false)) => {
                    return Err(SinkError::Refused {
                        sink: self.name.clone(),
                        detail: "the upstream broker refused a receipt subscription: is the gateway certificate's site the devices' site?".into(),
                    });
                }
                Some(Note::Receipt(device, point)) => conn.note_receipt(device, point),
                Some(Note::Failed(e)) => return Err(self.unavailable(e)),
                None => return Err(self.unavailable("connection closed")),
                Some(_) => {}
            }
        }
        conn.subscribed.extend(new);
        Ok(())
    }
}

impl Sink for UpstreamSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn deliver<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let mut guard = self.connection.lock().await;
            if guard.is_none() {
                *guard = Some(self.connect().await?);
            }
            let Some(conn) = guard.as_mut() else {
                return Err(self.unavailable("no connection"));
            };
            match self.forward(conn, batch).await {
                Ok(()) => {
                    debug!(sink = %self.name, n = batch.records.len(), "forwarded upstream");
                    Ok(())
                }
                Err(e) => {
                    warn!(sink = %self.name, error = %e, "upstream batch failed; reconnecting on the next attempt");
                    *guard = None;
                    Err(e)
                }
            }
        })
    }
}
