//! The bridge's audit log goes to cloud storage through the objects sinks, as its own
//! plane with its own retention class (issue 7):
//! `{prefix}/audit/retention={class}/component=bridge/date={YYYY-MM-DD}/{first:020}-{last:020}.jsonl`.
//!
//! Every few seconds the shipper asks the audit writer to sync (which appends a signed
//! checkpoint when records were written since the last one), then ships the records
//! after its cursor up to and including the newest checkpoint, so every shipped segment
//! ends with a signature over everything in it. Object names come from the record
//! sequence numbers, so a retry after a crash rewrites the same object with the same
//! bytes; the cursor (per sink, in the store) advances only after the sink confirmed.

use std::io::BufRead as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, warn};
use vitalmq_audit::{AuditRecord, Auditor, Event};

use crate::sink::object::ObjectStoreSink;
use crate::store::{Store, lock};

/// How often the shipper looks for new checkpointed records.
const INTERVAL: Duration = Duration::from_secs(5);

/// The records of `log` with `seq > after`, up to and including the last checkpoint:
/// `(first seq, last seq, bytes)`, or `None` when no checkpoint covers anything new.
pub fn next_segment(
    log: &std::path::Path,
    after: Option<u64>,
) -> std::io::Result<Option<(u64, u64, Vec<u8>)>> {
    let file = std::fs::File::open(log)?;
    let mut pending: Vec<(u64, String)> = Vec::new();
    let mut segment = None;
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        let Ok(record) = serde_json::from_str::<AuditRecord>(&line) else {
            break; // a torn last line: stop at what is complete
        };
        if after.is_some_and(|a| record.seq <= a) {
            continue;
        }
        let is_checkpoint = record.event == Event::Checkpoint;
        pending.push((record.seq, line));
        if is_checkpoint {
            segment = Some(pending.len());
        }
    }
    let Some(n) = segment else { return Ok(None) };
    let first = pending[0].0;
    let last = pending[n - 1].0;
    let mut bytes = Vec::new();
    for (_, line) in &pending[..n] {
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
    }
    Ok(Some((first, last, bytes)))
}

/// Runs until `stop`.
pub async fn ship(
    log: PathBuf,
    retention: String,
    sinks: Vec<Arc<ObjectStoreSink>>,
    store: Arc<Mutex<Store>>,
    auditor: Auditor,
    mut stop: watch::Receiver<bool>,
) {
    if sinks.is_empty() {
        return;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(INTERVAL) => {}
            _ = stop.changed() => return,
        }
        let a = auditor.clone();
        let _ = tokio::task::spawn_blocking(move || a.sync()).await;
        for sink in &sinks {
            let key = format!("audit:{}", sink_name(sink));
            let cursor = {
                let store = Arc::clone(&store);
                let key = key.clone();
                tokio::task::spawn_blocking(move || lock(&store).audit_shipped(&key)).await
            };
            let after = match cursor {
                Ok(Ok(c)) => c,
                _ => continue,
            };
            let segment = match next_segment(&log, after) {
                Ok(Some(s)) => s,
                Ok(None) => continue,
                Err(e) => {
                    warn!(log = %log.display(), error = %e, "cannot read the audit log to ship it");
                    continue;
                }
            };
            let (first, last, bytes) = segment;
            let date = crate::normalize::rfc3339_ms(crate::recorder::now_ms())
                .map(|t| t[..10].to_owned())
                .unwrap_or_else(|| "unknown".to_owned());
            let object = format!(
                "audit/retention={retention}/component=bridge/date={date}/{first:020}-{last:020}.jsonl"
            );
            match sink.put_durable(&object, bytes.into()).await {
                Ok(()) => {
                    let store = Arc::clone(&store);
                    let k = key.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        lock(&store).set_audit_shipped(&k, last)
                    })
                    .await;
                    debug!(object = %object, "audit segment shipped");
                }
                Err(e) => warn!(error = %e, "audit segment not shipped; will retry"),
            }
        }
    }
}

fn sink_name(sink: &ObjectStoreSink) -> &str {
    crate::sink::Sink::name(sink)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vitalmq_audit::{AuditLog, CheckpointKey, Component};

    #[test]
    fn segments_end_at_the_newest_checkpoint_and_continue_after_the_cursor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log_path = dir.path().join("audit.jsonl");
        let key = CheckpointKey::load_or_create(&dir.path().join("k.pem"), Component::Bridge)
            .expect("key");
        let log = AuditLog::open_signed(&log_path, 64, Some(key)).expect("open");
        let auditor = log.auditor();
        for _ in 0..3 {
            auditor
                .record(AuditRecord::new(Component::Bridge, Event::Gap))
                .expect("record");
        }
        auditor.sync().expect("sync"); // records 0..=2, checkpoint 3
        auditor
            .record(AuditRecord::new(Component::Bridge, Event::Gap))
            .expect("record");
        log.close().expect("close"); // record 4, checkpoint 5
        let (first, last, bytes) = next_segment(&log_path, None)
            .expect("read")
            .expect("segment");
        assert_eq!((first, last), (0, 5));
        assert_eq!(bytes.iter().filter(|b| **b == b'\n').count(), 6);
        let (first, last, _) = next_segment(&log_path, Some(3))
            .expect("read")
            .expect("segment");
        assert_eq!((first, last), (4, 5));
        assert!(next_segment(&log_path, Some(5)).expect("read").is_none());
    }
}
