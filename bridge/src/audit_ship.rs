//! Audit logs go to cloud storage through the objects sinks, as their own plane with
//! their own retention class (issue 7): the bridge's own log, and every log configured
//! in `[[audit_ship]]` (the broker's, on the same host), each under its component label:
//! `{prefix}/audit/retention={class}/component={label}/date={YYYY-MM-DD}/{first:020}-{last:020}.jsonl`.
//!
//! A log on disk is the durable outbox of its records. Every few seconds the shipper asks
//! the bridge's own audit writer to sync (which appends a signed checkpoint when records
//! were written since the last one; the broker checkpoints on its own timer), then per
//! (sink, log) ships the records after the cursor up to and including the newest
//! checkpoint ([`tail`]), so every segment ends with a signature over everything in it.
//!
//! Exactly-once across crashes, like the outbox drains: a segment's range is persisted
//! as pending before its first write and re-read whole after a crash; its object name
//! comes only from its record sequence numbers and the first record's date, and its
//! bytes only from the log, so a retry rewrites the same object with the same bytes; the
//! cursor (per sink and log, in the store) advances only after the sink confirmed.
//!
//! A log that no longer continues the shipped chain (rotated, replaced, truncated,
//! edited) is not shipped: the shipper raises `ops/bridge/audit_ship` and a `sink_failed`
//! audit record, and resolves both if the log lines up again. Shipping a new chain under
//! the same label would overwrite shipped objects with other records; give a new log a
//! new component label instead.

pub mod tail;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, json};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};
use vitalmq_audit::{AuditRecord, Auditor, Component, Event};

use crate::ops::{Episodes, OpsAlert, OpsKind};
use crate::recorder::now_ms;
use crate::sink::object::ObjectStoreSink;
use crate::store::{Store, StoreError, lock};
use tail::{Divergence, Limits, Segment, Tail, TailError};

/// How often the shipper looks for new checkpointed records.
const INTERVAL: Duration = Duration::from_secs(5);

/// A segment ends at the first checkpoint once it holds this many records (a writer
/// checkpoints at least every 1,000), so a long backlog ships in bounded objects.
const MAX_SEGMENT_RECORDS: usize = 10_000;

/// Segments shipped per (sink, log) in one pass before the others get their turn.
const MAX_SEGMENTS_PER_PASS: usize = 64;

/// One audit log to ship.
#[derive(Debug, Clone)]
pub struct ShippedLog {
    /// Label in object names (`component=<label>`) and in cursors.
    pub component: String,
    pub path: PathBuf,
    /// Retention class in object names (`retention=<class>`).
    pub retention: String,
    /// The bridge's own writer, synced before each pass so its records get a checkpoint.
    pub own: Option<Auditor>,
}

/// What went wrong in one shipping step.
#[derive(Debug, thiserror::Error)]
enum PassError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tail(#[from] TailError),
}

/// Runs until `stop`.
pub async fn ship(
    logs: Vec<ShippedLog>,
    sinks: Vec<Arc<ObjectStoreSink>>,
    store: Arc<Mutex<Store>>,
    auditor: Auditor,
    ops: mpsc::UnboundedSender<OpsAlert>,
    mut stop: watch::Receiver<bool>,
) {
    if sinks.is_empty() || logs.is_empty() {
        return;
    }
    let mut episodes = Episodes::default();
    let mut missing = std::collections::HashSet::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(INTERVAL) => {}
            _ = stop.changed() => return,
        }
        for log in &logs {
            if let Some(own) = log.own.clone() {
                let _ = tokio::task::spawn_blocking(move || own.sync()).await;
            }
        }
        for sink in &sinks {
            for log in &logs {
                if *stop.borrow() {
                    return;
                }
                let outcome = ship_log(sink, log, &store).await;
                let sink_name = crate::sink::Sink::name(&**sink);
                let subject = format!("{sink_name}-{}", log.component);
                match outcome {
                    Ok(found) => {
                        if found == Found::Missing {
                            if missing.insert(log.component.clone()) {
                                info!(component = %log.component, log = %log.path.display(), "audit log not there yet; will ship it once it is");
                            }
                        } else {
                            missing.remove(&log.component);
                        }
                        if let Some(a) = episodes.resolve(OpsKind::AuditShip, &subject, now_ms()) {
                            info!(component = %log.component, sink = %sink_name, "audit log lines up again; shipping resumed");
                            let _ = auditor.record(
                                AuditRecord::new(Component::Bridge, Event::SinkRecovered)
                                    .action("audit_ship")
                                    .resource(log.component.clone())
                                    .detail("sink", sink_name),
                            );
                            let _ = ops.send(a);
                        }
                    }
                    Err(PassError::Tail(
                        e @ (TailError::Diverged(_) | TailError::Broken { .. }),
                    )) => {
                        let reason = match e {
                            TailError::Diverged(_) => "audit_log_diverged",
                            _ => "audit_log_broken",
                        };
                        let mut details = Map::new();
                        details.insert("sink".into(), json!(sink_name));
                        details.insert("component".into(), json!(log.component));
                        details.insert("log".into(), json!(log.path.display().to_string()));
                        details.insert("error".into(), json!(e.to_string()));
                        if let Some(a) =
                            episodes.raise(OpsKind::AuditShip, &subject, reason, details, now_ms())
                        {
                            warn!(component = %log.component, sink = %sink_name, reason, error = %e, "audit log not shipped: it does not continue the shipped chain");
                            let _ = auditor.record(
                                AuditRecord::new(Component::Bridge, Event::SinkFailed)
                                    .action("audit_ship")
                                    .resource(log.component.clone())
                                    .reason(reason)
                                    .detail("sink", sink_name)
                                    .detail("error", e.to_string()),
                            );
                            let _ = ops.send(a);
                        }
                    }
                    Err(e) => {
                        warn!(component = %log.component, sink = %sink_name, error = %e, "audit segment not shipped; will retry");
                    }
                }
            }
        }
    }
}

/// What a (sink, log) pass found.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    Missing,
    Shipped,
}

/// Ships the segments of `log` waiting for `sink`, up to [`MAX_SEGMENTS_PER_PASS`].
async fn ship_log(
    sink: &Arc<ObjectStoreSink>,
    log: &ShippedLog,
    store: &Arc<Mutex<Store>>,
) -> Result<Found, PassError> {
    let sink_name = crate::sink::Sink::name(&**sink).to_owned();
    for _ in 0..MAX_SEGMENTS_PER_PASS {
        let planned = {
            let store = Arc::clone(store);
            let (sink_name, log) = (sink_name.clone(), log.clone());
            tokio::task::spawn_blocking(move || plan(&store, &sink_name, &log))
                .await
                .map_err(|e| TailError::Io(std::io::Error::other(e)))??
        };
        let segment = match planned {
            Tail::Segment(s) => s,
            Tail::Nothing => return Ok(Found::Shipped),
            Tail::Missing => return Ok(Found::Missing),
        };
        let object = object_name(&log.retention, &log.component, &segment);
        let records = segment.last - segment.first + 1;
        if let Err(e) = sink.put_durable(&object, segment.bytes.into()).await {
            warn!(component = %log.component, sink = %sink_name, error = %e, "audit segment not shipped; will retry");
            return Ok(Found::Shipped);
        }
        let store = Arc::clone(store);
        let (s, c, end) = (sink_name.clone(), log.component.clone(), segment.end);
        tokio::task::spawn_blocking(move || lock(&store).set_audit_shipped(&s, &c, &end))
            .await
            .map_err(|e| TailError::Io(std::io::Error::other(e)))??;
        metrics::counter!("vitalmq_bridge_audit_shipped_records_total", "sink" => sink_name.clone(), "component" => log.component.clone())
            .increment(records);
        debug!(object = %object, records, "audit segment shipped");
    }
    Ok(Found::Shipped)
}

/// The next segment of `log` for `sink`: the one in flight before a crash (the same
/// range), else the next one, persisted as in flight before it is returned.
fn plan(store: &Mutex<Store>, sink: &str, log: &ShippedLog) -> Result<Tail, PassError> {
    let store = lock(store);
    let cursor = store.audit_cursor(sink, &log.component)?;
    let limits = Limits {
        max_records: MAX_SEGMENT_RECORDS,
        until: cursor.pending.map(|(_, last)| last),
    };
    let found = tail::next_segment(&log.path, cursor.shipped.as_ref(), limits)?;
    match (cursor.pending, &found) {
        (None, Tail::Segment(s)) => store.audit_pending(sink, &log.component, s.first, s.last)?,
        (Some((first, last)), Tail::Segment(s)) if (s.first, s.last) == (first, last) => {}
        (Some((first, last)), _) => {
            return Err(TailError::Diverged(Divergence::InFlightGone { first, last }).into());
        }
        (None, _) => {}
    }
    Ok(found)
}

/// The object a segment is written to (see the module docs).
pub fn object_name(retention: &str, component: &str, s: &Segment) -> String {
    format!(
        "audit/retention={retention}/component={component}/date={}/{:020}-{:020}.jsonl",
        s.date, s.first, s.last
    )
}

#[cfg(test)]
mod tests;
