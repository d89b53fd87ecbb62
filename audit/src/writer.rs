//! The append-only writer: a thread that owns the file, fed by a bounded queue.
//!
//! Records are group-committed: the thread writes every record already queued, then
//! flushes and `fdatasync`s once, so a burst of denials costs one sync, not one each.

use std::fs::File;
use std::io::{BufRead as _, BufReader, BufWriter, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::AuditRecord;
use crate::chain::{GENESIS, record_hash};
use crate::checkpoint::CheckpointKey;

/// A signed checkpoint is written after this many records at the latest, and at every
/// sync and at close.
pub const CHECKPOINT_EVERY: u64 = 1000;
/// ... or when this much time passed since the last one and records were written.
const CHECKPOINT_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// Why a record could not be accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "audit log {path}: last record is unreadable or its hash is wrong; refusing to append to a broken chain"
    )]
    BrokenTail { path: PathBuf },
    #[error("audit log is not writable (an earlier write failed)")]
    Unhealthy,
    #[error("audit queue is full")]
    Backlogged,
    #[error("audit writer has stopped")]
    Closed,
}

enum Message {
    Record(Box<AuditRecord>),
    Barrier(std::sync::mpsc::Sender<bool>),
    /// Commit and end the writer; later records from any handle get `Closed`.
    Stop,
}

/// An open audit log and its writer thread.
#[derive(Debug)]
pub struct AuditLog {
    auditor: Auditor,
    thread: Option<JoinHandle<()>>,
}

/// A cheap, cloneable handle for recording; see the crate docs for its guarantees.
#[derive(Debug, Clone)]
pub struct Auditor {
    tx: SyncSender<Message>,
    healthy: Arc<AtomicBool>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Record(_) => "Record",
            Self::Barrier(_) => "Barrier",
            Self::Stop => "Stop",
        })
    }
}

impl AuditLog {
    /// Opens (or creates) the log at `path`, continuing the chain from its last record.
    /// `capacity` bounds the queue between the hot path and the writer.
    pub fn open(path: &Path, capacity: usize) -> Result<Self, AuditError> {
        Self::open_signed(path, capacity, None)
    }

    /// Like [`Self::open`], appending signed checkpoints with `key` (see `checkpoint`).
    pub fn open_signed(
        path: &Path,
        capacity: usize,
        key: Option<CheckpointKey>,
    ) -> Result<Self, AuditError> {
        let io = |source| AuditError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            vitalmq_private_fs::dir_builder()
                .create(parent)
                .map_err(io)?;
        }
        let mut file = vitalmq_private_fs::create_options()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        let (next_seq, prev) = tail(&mut file).map_err(io)?.map_or_else(
            || Ok((0, GENESIS.to_owned())),
            |last| match serde_json::from_str::<AuditRecord>(&last) {
                Ok(r) if record_hash(&r) == r.hash => Ok((r.seq + 1, r.hash)),
                _ => Err(AuditError::BrokenTail {
                    path: path.to_path_buf(),
                }),
            },
        )?;
        let (tx, rx) = sync_channel(capacity.max(1));
        let healthy = Arc::new(AtomicBool::new(true));
        let writer = Writer {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
            next_seq,
            prev,
            healthy: Arc::clone(&healthy),
            key,
            since_checkpoint: 0,
            last_checkpoint: std::time::Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name("vitalmq-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(io)?;
        Ok(Self {
            auditor: Auditor { tx, healthy },
            thread: Some(thread),
        })
    }

    pub fn auditor(&self) -> Auditor {
        self.auditor.clone()
    }

    /// Waits until every queued record is on disk, then stops the writer.
    pub fn close(mut self) -> Result<(), AuditError> {
        let synced = self.auditor.sync();
        self.shutdown();
        synced
    }

    fn shutdown(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.auditor.tx.send(Message::Stop);
            let _ = thread.join();
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Auditor {
    /// Queues a record without blocking.
    pub fn record(&self, record: AuditRecord) -> Result<(), AuditError> {
        if !self.healthy() {
            return Err(AuditError::Unhealthy);
        }
        match self.tx.try_send(Message::Record(Box::new(record))) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(AuditError::Backlogged),
            Err(TrySendError::Disconnected(_)) => Err(AuditError::Closed),
        }
    }

    /// False once a write failed: the component must refuse new work.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Blocks until everything queued so far is written and synced. For shutdown and
    /// tests; async callers use `spawn_blocking`.
    pub fn sync(&self) -> Result<(), AuditError> {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        self.tx
            .send(Message::Barrier(done_tx))
            .map_err(|_| AuditError::Closed)?;
        match done_rx.recv() {
            Ok(true) => Ok(()),
            Ok(false) => Err(AuditError::Unhealthy),
            Err(_) => Err(AuditError::Closed),
        }
    }
}

struct Writer {
    path: PathBuf,
    out: BufWriter<File>,
    next_seq: u64,
    prev: String,
    healthy: Arc<AtomicBool>,
    key: Option<CheckpointKey>,
    /// Records written since the last checkpoint.
    since_checkpoint: u64,
    last_checkpoint: std::time::Instant,
}

impl Writer {
    fn run(mut self, rx: Receiver<Message>) {
        let mut stop = false;
        while !stop {
            let Ok(first) = rx.recv() else { break };
            let mut barriers = Vec::new();
            let mut next = Some(first);
            while let Some(message) = next {
                match message {
                    Message::Record(record) => {
                        self.append(*record);
                        if self.since_checkpoint >= CHECKPOINT_EVERY {
                            self.checkpoint();
                        }
                    }
                    Message::Barrier(done) => barriers.push(done),
                    Message::Stop => stop = true,
                }
                next = if stop { None } else { rx.try_recv().ok() };
            }
            let due = self.since_checkpoint > 0
                && (stop
                    || !barriers.is_empty()
                    || self.last_checkpoint.elapsed() >= CHECKPOINT_MAX_AGE);
            if due {
                self.checkpoint();
            }
            self.commit();
            let ok = self.healthy.load(Ordering::Acquire);
            for done in barriers {
                let _ = done.send(ok);
            }
        }
    }

    fn append(&mut self, mut record: AuditRecord) {
        if !self.healthy.load(Ordering::Acquire) {
            return;
        }
        record.seq = self.next_seq;
        record.at = OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_default();
        record.prev = std::mem::take(&mut self.prev);
        record.hash = record_hash(&record);
        let line = serde_json::to_string(&record).expect("audit record serializes");
        if let Err(e) = writeln!(self.out, "{line}") {
            self.fail(&e);
            return;
        }
        self.prev = record.hash;
        self.next_seq += 1;
        self.since_checkpoint += 1;
    }

    /// Appends a signed checkpoint over the last record written.
    fn checkpoint(&mut self) {
        let Some(key) = &self.key else { return };
        let Some(covered) = self.next_seq.checked_sub(1) else {
            return;
        };
        let record = key.checkpoint(covered, &self.prev);
        self.append(record);
        self.since_checkpoint = 0;
        self.last_checkpoint = std::time::Instant::now();
    }

    fn commit(&mut self) {
        if !self.healthy.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = self
            .out
            .flush()
            .and_then(|()| self.out.get_ref().sync_data())
        {
            self.fail(&e);
        }
    }

    fn fail(&self, e: &std::io::Error) {
        tracing::error!(path = %self.path.display(), error = %e, "audit log write failed; refusing further audited work");
        self.healthy.store(false, Ordering::Release);
    }
}

/// The last non-empty line of the file, if any.
fn tail(file: &mut File) -> std::io::Result<Option<String>> {
    file.seek(SeekFrom::Start(0))?;
    let mut last = None;
    for line in BufReader::new(&mut *file).lines() {
        let line = line?;
        if !line.trim().is_empty() {
            last = Some(line);
        }
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use std::io::BufReader;

    use super::*;
    use crate::{Component, Event, verify_chain};

    fn denial(n: u64) -> AuditRecord {
        AuditRecord::new(Component::Broker, Event::AuthorizationDenied)
            .action("publish")
            .resource(format!("devices/dev-{n}/telemetry"))
            .reason("not_authorized")
    }

    #[test]
    fn appends_a_chain_that_verifies_and_continues_after_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit/audit.jsonl");
        let log = AuditLog::open(&path, 16).expect("open");
        for n in 0..5 {
            log.auditor().record(denial(n)).expect("record");
        }
        log.close().expect("close");
        let log = AuditLog::open(&path, 16).expect("reopen");
        log.auditor().record(denial(5)).expect("record");
        log.close().expect("close");
        let count =
            verify_chain(BufReader::new(File::open(&path).expect("open"))).expect("valid chain");
        assert_eq!(count, 6);
    }

    #[test]
    fn every_kind_of_tampering_is_found_at_its_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, 16).expect("open");
        for n in 0..6 {
            log.auditor().record(denial(n)).expect("record");
        }
        log.close().expect("close");
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        let check =
            |lines: &[String]| verify_chain(lines.join("\n").as_bytes()).map_err(|e| e.line());
        let owned = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();

        let mut edited = owned(&lines);
        edited[3] = edited[3].replace("dev-3", "dev-9");
        assert_eq!(check(&edited), Err(4));

        let mut deleted = owned(&lines);
        deleted.remove(2);
        assert_eq!(check(&deleted), Err(3));

        let mut inserted = owned(&lines);
        inserted.insert(4, lines[1].to_owned());
        assert_eq!(check(&inserted), Err(5));

        let mut swapped = owned(&lines);
        swapped.swap(1, 2);
        assert_eq!(check(&swapped), Err(2));

        assert_eq!(check(&owned(&lines)), Ok(6));
    }

    #[test]
    fn a_broken_tail_is_not_extended() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, "{\"not\":\"a record\"}\n").expect("write");
        assert!(matches!(
            AuditLog::open(&path, 4),
            Err(AuditError::BrokenTail { .. })
        ));
    }

    #[test]
    fn a_full_queue_is_an_error_not_a_silent_drop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = AuditLog::open(&dir.path().join("a.jsonl"), 1).expect("open");
        let auditor = log.auditor();
        // The writer may drain between sends; keep sending until the queue reports full.
        let full = (0..100_000)
            .map(|n| auditor.record(denial(n)))
            .any(|r| matches!(r, Err(AuditError::Backlogged)));
        assert!(full, "a bounded queue must report backlog");
        log.close().expect("close");
    }
}
