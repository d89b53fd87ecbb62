//! Drains the outbox into one sink, in outbox order, with its own cursor.
//!
//! A batch's range is persisted before the first delivery attempt (see
//! [`Store::next_batch`]); the cursor advances only after the sink confirmed the whole
//! batch. Failures are retried with capped exponential backoff; a sink that keeps
//! failing raises an operational alert and an audit record, and its recovery another.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, json};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};
use vitalmq_audit::{AuditRecord, Auditor, Component, Event};

use crate::ops::{Episodes, OpsAlert, OpsKind};
use crate::recorder::now_ms;
use crate::sink::{Batch, Sink};
use crate::store::{Store, StoreError, lock};

/// How one sink is drained.
#[derive(Debug, Clone)]
pub struct DrainSettings {
    pub batch_max_events: usize,
    /// A partial batch waits at most this long for more events.
    pub batch_max_age: Duration,
    /// Consecutive failures before the sink is reported down.
    pub down_after: u32,
}

/// Runs until `stop` turns true, then returns after the batch in progress.
pub async fn drain(
    sink: Arc<dyn Sink>,
    store: Arc<Mutex<Store>>,
    settings: DrainSettings,
    auditor: Auditor,
    ops: mpsc::UnboundedSender<OpsAlert>,
    mut stop: watch::Receiver<bool>,
) {
    let name = sink.name().to_owned();
    let mut episodes = Episodes::default();
    let mut waiting_since: Option<Instant> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        let planned = {
            let store = Arc::clone(&store);
            let name = name.clone();
            let s = settings.clone();
            let since = waiting_since;
            tokio::task::spawn_blocking(move || plan(&store, &name, &s, since)).await
        };
        let batch = match planned {
            Ok(Ok(Plan::Deliver(b))) => {
                waiting_since = None;
                b
            }
            Ok(Ok(Plan::Wait { partial })) => {
                if partial && waiting_since.is_none() {
                    waiting_since = Some(Instant::now());
                }
                let _ = tokio::time::timeout(Duration::from_millis(50), stop.changed()).await;
                continue;
            }
            Ok(Err(e)) => {
                warn!(sink = %name, error = %e, "cannot read the outbox");
                let _ = tokio::time::timeout(Duration::from_secs(1), stop.changed()).await;
                continue;
            }
            Err(e) => {
                warn!(sink = %name, error = %e, "outbox reader task failed");
                continue;
            }
        };
        let confirmed = deliver_until_confirmed(
            &*sink,
            &batch,
            &settings,
            &auditor,
            &ops,
            &mut episodes,
            &mut stop,
        )
        .await;
        if !confirmed {
            return; // stopping while the sink fails: the batch stays pending
        }
        let store = Arc::clone(&store);
        let n = name.clone();
        let last = batch.last;
        match tokio::task::spawn_blocking(move || lock(&store).batch_delivered(&n, last)).await {
            Ok(Ok(())) => {
                metrics::counter!("vitalmq_bridge_sink_delivered_total", "sink" => name.clone())
                    .increment(batch.records.len() as u64);
                debug!(sink = %name, first = batch.first, last = batch.last, "batch delivered");
            }
            Ok(Err(e)) => {
                warn!(sink = %name, error = %e, "cannot advance the cursor; the batch will be delivered again")
            }
            Err(e) => warn!(sink = %name, error = %e, "cursor task failed"),
        }
    }
}

enum Plan {
    Deliver(Batch),
    Wait { partial: bool },
}

fn plan(
    store: &Mutex<Store>,
    sink: &str,
    s: &DrainSettings,
    waiting_since: Option<Instant>,
) -> Result<Plan, StoreError> {
    let mut store = lock(store);
    let cursor = store.cursor(sink)?;
    if cursor.pending.is_none() {
        let waiting = store.head()? - cursor.delivered_through;
        if waiting <= 0 {
            return Ok(Plan::Wait { partial: false });
        }
        let full = usize::try_from(waiting).unwrap_or(usize::MAX) >= s.batch_max_events;
        let aged = waiting_since.is_some_and(|t| t.elapsed() >= s.batch_max_age);
        if !full && !aged {
            return Ok(Plan::Wait { partial: true });
        }
    }
    Ok(store
        .next_batch(sink, s.batch_max_events)?
        .map_or(Plan::Wait { partial: false }, Plan::Deliver))
}

async fn deliver_until_confirmed(
    sink: &dyn Sink,
    batch: &Batch,
    settings: &DrainSettings,
    auditor: &Auditor,
    ops: &mpsc::UnboundedSender<OpsAlert>,
    episodes: &mut Episodes,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let name = sink.name();
    let mut failures = 0u32;
    let mut delay = Duration::from_millis(200);
    loop {
        match sink.deliver(batch).await {
            Ok(()) => {
                if let Some(a) = episodes.resolve(OpsKind::Sink, name, now_ms()) {
                    info!(sink = %name, "sink recovered");
                    let _ = auditor.record(
                        AuditRecord::new(Component::Bridge, Event::SinkRecovered)
                            .resource(name)
                            .detail("failures", failures),
                    );
                    let _ = ops.send(a);
                }
                return true;
            }
            Err(e) => {
                failures += 1;
                metrics::counter!("vitalmq_bridge_sink_failures_total", "sink" => name.to_owned())
                    .increment(1);
                warn!(sink = %name, error = %e, failures, retry_in_ms = delay.as_millis() as u64, "sink delivery failed");
                if failures >= settings.down_after {
                    let mut details = Map::new();
                    details.insert("sink".into(), json!(name));
                    details.insert("error".into(), json!(e.to_string()));
                    if let Some(a) =
                        episodes.raise(OpsKind::Sink, name, "sink_down", details, now_ms())
                    {
                        let _ = auditor.record(
                            AuditRecord::new(Component::Bridge, Event::SinkFailed)
                                .resource(name)
                                .reason("sink_down")
                                .detail("error", e.to_string()),
                        );
                        let _ = ops.send(a);
                    }
                }
                if tokio::time::timeout(delay, stop.changed()).await.is_ok() && *stop.borrow() {
                    return false;
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}
