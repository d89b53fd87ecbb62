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

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::Mutex;
use tracing::{debug, warn};

use super::{Batch, Sink, SinkError, SinkFailure};
use crate::config::BrokerLink;
use crate::link::{Link, LinkError};
use crate::window::ReceiptPoint;
use crate::{mqtt, receipt};

/// How long one batch may wait for its acknowledgements and receipts.
const BATCH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new connection may take to be accepted.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A link and the receipts seen on it.
struct Connection {
    link: Link,
    /// Highest receipt seen per device on this connection.
    receipts: HashMap<String, ReceiptPoint>,
}

fn note_receipt(receipts: &mut HashMap<String, ReceiptPoint>, topic: &str, payload: &[u8]) {
    if let (Some(device), Some(point)) = (receipt::topic_device(topic), receipt::decode(payload)) {
        let slot = receipts.entry(device.to_owned()).or_insert(point);
        *slot = (*slot).max(point);
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
    pub fn start(
        name: String,
        link: &BrokerLink,
        client_id: &str,
    ) -> Result<Self, crate::mqtt::MqttSetupError> {
        let mut options = mqtt::options(link, client_id, false)?;
        // Each connection starts clean: redelivery is the drain loop's job.
        options.set_clean_session(true);
        Ok(Self {
            name,
            options,
            connection: Mutex::new(None),
        })
    }

    fn unavailable(&self, detail: SinkFailure) -> SinkError {
        SinkError::unavailable(self.name.clone(), detail)
    }

    fn link_error(&self, e: LinkError) -> SinkError {
        match e {
            LinkError::Failed(_) => self.unavailable(SinkFailure::Link(e)),
            LinkError::Refused(_) => {
                SinkError::refused(self.name.clone(), SinkFailure::ReceiptsRefused(e))
            }
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
        let Connection { link, receipts } = conn;
        let filters: Vec<String> = needed.keys().map(|d| format!("devices/{d}/ack")).collect();
        let items: Vec<(String, bytes::Bytes)> = batch
            .records
            .iter()
            .map(|r| (r.topic.clone(), r.raw.clone()))
            .collect();
        let work = async {
            link.subscribe(filters, |t, p| note_receipt(receipts, &t, &p))
                .await?;
            // Both closures see the receipts; they never run at the same time.
            let receipts = std::sync::Mutex::new(receipts);
            let seen = || {
                receipts
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
            };
            link.publish_confirmed(
                items,
                |t, p| note_receipt(&mut seen(), &t, &p),
                || {
                    let seen = seen();
                    needed
                        .iter()
                        .all(|(d, p)| seen.get(d).is_some_and(|r| r >= p))
                },
            )
            .await
        };
        match tokio::time::timeout(BATCH_TIMEOUT, work).await {
            Ok(result) => result.map_err(|e| self.link_error(e)),
            Err(_) => Err(self.unavailable(SinkFailure::NoReceipt)),
        }
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
                let link = Link::connect(self.options.clone(), CONNECT_TIMEOUT)
                    .await
                    .map_err(|e| self.link_error(e))?;
                *guard = Some(Connection {
                    link,
                    receipts: HashMap::new(),
                });
            }
            let Some(conn) = guard.as_mut() else {
                return Err(self.unavailable(SinkFailure::NotConnected));
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
