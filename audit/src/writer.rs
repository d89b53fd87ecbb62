//! The append-only writer: a thread that owns the file, fed by a bounded queue.
//!
//! Records are group-committed: the thread writes every record already queued, then
//! `fdatasync`s once, so a burst of denials costs one sync, not one each.
//!
//! A failed write or sync turns the log unhealthy: [`Auditor::record`] refuses (and
//! counts) new records, so the component refuses the work they would document. The
//! records already accepted stay in memory, chained. The writer retries with
//! exponential backoff (`backon`): it reopens the file, cuts it back to the length
//! that held exactly the records synced before (a failed write may have left part of a
//! line), writes the held records and syncs. On success the log is healthy again and
//! its next record (`audit_recovered`) says for how long it failed and how many records
//! were refused meanwhile; the chain runs on unbroken.

use std::fs::File;
use std::io::{BufRead as _, BufReader, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use backon::BackoffBuilder as _;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::chain::{GENESIS, line_hash, seal};
use crate::checkpoint::CheckpointKey;
use crate::{AuditRecord, Component, Event};

/// A signed checkpoint is written after this many records at the latest, and at every
/// sync and at close.
pub const CHECKPOINT_EVERY: u64 = 1000;
/// ... or when this much time passed since the last one and records were written.
const CHECKPOINT_MAX_AGE: Duration = Duration::from_secs(60);
/// First and longest wait between attempts to write again after a failure.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(5);

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
    #[error("audit log is not writable (a write failed; retrying)")]
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

/// State the writer shares with every [`Auditor`].
#[derive(Debug)]
struct Shared {
    healthy: AtomicBool,
    /// Records refused because the log was unhealthy, since the last recovery.
    refused: AtomicU64,
    /// Bytes of the log file that hold synced records.
    bytes: AtomicU64,
}

/// A cheap, cloneable handle for recording; see the crate docs for its guarantees.
#[derive(Debug, Clone)]
pub struct Auditor {
    tx: SyncSender<Message>,
    shared: Arc<Shared>,
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

/// Where the writer's bytes go: the log file, or in tests a file that fails on demand.
pub(crate) trait LogFile: Send {
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    fn sync(&mut self) -> std::io::Result<()>;
    fn len(&self) -> std::io::Result<u64>;
    fn truncate(&mut self, len: u64) -> std::io::Result<()>;
}

impl LogFile for File {
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.write_all(bytes)
    }
    fn sync(&mut self) -> std::io::Result<()> {
        self.sync_data()
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn truncate(&mut self, len: u64) -> std::io::Result<()> {
        self.set_len(len)
    }
}

/// Opens the log for appending (the writer reopens it to recover from a failure).
pub(crate) type Opener = Box<dyn FnMut(&Path) -> std::io::Result<Box<dyn LogFile>> + Send>;

fn open_file(path: &Path) -> std::io::Result<Box<dyn LogFile>> {
    let file = vitalmq_private_fs::create_options()
        .create(true)
        .read(true)
        .append(true)
        .open(path)?;
    Ok(Box::new(file))
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
        Self::open_with(path, capacity, key, Box::new(open_file))
    }

    pub(crate) fn open_with(
        path: &Path,
        capacity: usize,
        key: Option<CheckpointKey>,
        mut opener: Opener,
    ) -> Result<Self, AuditError> {
        let io = |source| AuditError::Io {
            path: path.to_path_buf(),
            source,
        };
        vitalmq_private_fs::create_parent(path).map_err(io)?;
        let (next_seq, prev) = {
            let mut file = vitalmq_private_fs::create_options()
                .create(true)
                .read(true)
                .append(true)
                .open(path)
                .map_err(io)?;
            tail(&mut file).map_err(io)?.map_or_else(
                || Ok((0, GENESIS.to_owned())),
                |last| match serde_json::from_str::<AuditRecord>(&last) {
                    Ok(r) if line_hash(&last).as_deref() == Some(r.hash.as_str()) => {
                        Ok((r.seq + 1, r.hash))
                    }
                    _ => Err(AuditError::BrokenTail {
                        path: path.to_path_buf(),
                    }),
                },
            )?
        };
        let file = opener(path).map_err(io)?;
        let committed_len = file.len().map_err(io)?;
        let (tx, rx) = sync_channel(capacity.max(1));
        let shared = Arc::new(Shared {
            healthy: AtomicBool::new(true),
            refused: AtomicU64::new(0),
            bytes: AtomicU64::new(committed_len),
        });
        let writer = Writer {
            path: path.to_path_buf(),
            file: Some(file),
            opener,
            pending: Vec::new(),
            committed_len,
            next_seq,
            prev,
            shared: Arc::clone(&shared),
            key,
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            failure: None,
            component: Component::Broker,
        };
        let thread = std::thread::Builder::new()
            .name("vitalmq-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(io)?;
        Ok(Self {
            auditor: Auditor { tx, shared },
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
            self.shared.refused.fetch_add(1, Ordering::Relaxed);
            return Err(AuditError::Unhealthy);
        }
        match self.tx.try_send(Message::Record(Box::new(record))) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(AuditError::Backlogged),
            Err(TrySendError::Disconnected(_)) => Err(AuditError::Closed),
        }
    }

    /// False while writes fail: the component must refuse new work. It turns true
    /// again on its own once the writer could write and sync the records it held.
    pub fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Acquire)
    }

    /// Size in bytes of the log file's synced records (for the disk-use metric).
    pub fn bytes(&self) -> u64 {
        self.shared.bytes.load(Ordering::Relaxed)
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

/// A write failure the writer has not recovered from yet.
struct Failure {
    since: Instant,
    error: String,
    delays: backon::ExponentialBackoff,
}

struct Writer {
    path: PathBuf,
    /// None after a failure, until reopened.
    file: Option<Box<dyn LogFile>>,
    opener: Opener,
    /// Lines chained but not yet written and synced.
    pending: Vec<u8>,
    /// Length of the file holding exactly the synced records.
    committed_len: u64,
    next_seq: u64,
    prev: String,
    shared: Arc<Shared>,
    key: Option<CheckpointKey>,
    /// Records written since the last checkpoint.
    since_checkpoint: u64,
    last_checkpoint: Instant,
    failure: Option<Failure>,
    /// The component whose records this log holds (of the last one written).
    component: Component,
}

impl Writer {
    fn run(mut self, rx: Receiver<Message>) {
        let mut stop = false;
        while !stop {
            // While failed, wake up to retry even when nothing arrives.
            let first = match self.failure.as_mut() {
                None => match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => break,
                },
                Some(f) => match rx.recv_timeout(f.delays.next().unwrap_or(RETRY_MAX)) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        stop = true;
                        None
                    }
                },
            };
            let mut barriers = Vec::new();
            let mut next = first;
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
            let ok = self.failure.is_none();
            for done in barriers {
                let _ = done.send(ok);
            }
        }
        if self.failure.is_some() {
            tracing::error!(
                path = %self.path.display(),
                bytes = self.pending.len(),
                "audit writer stopped while the log was failing; records not written"
            );
        }
    }

    /// Stamps and chains `record` and holds its line until the next commit.
    fn append(&mut self, mut record: AuditRecord) {
        self.component = record.component;
        record.seq = self.next_seq;
        record.at = OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_default();
        record.prev = std::mem::take(&mut self.prev);
        let line = match seal(&mut record) {
            Ok(line) => line,
            Err(e) => {
                // A struct of strings, numbers and JSON values always serializes.
                tracing::error!(error = %e, "audit record does not serialize; not written");
                self.prev = record.prev;
                return;
            }
        };
        self.pending.extend_from_slice(line.as_bytes());
        self.pending.push(b'\n');
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
        self.last_checkpoint = Instant::now();
    }

    /// Writes and syncs the held lines; after a failure, first reopens the file.
    fn commit(&mut self) {
        if self.file.is_none() {
            match self.reopen() {
                Ok(file) => self.file = Some(file),
                Err(e) => return self.fail(&e),
            }
        }
        if self.pending.is_empty() && self.failure.is_none() {
            return;
        }
        let Some(file) = self.file.as_mut() else {
            return;
        };
        if let Err(e) = file.append(&self.pending).and_then(|()| file.sync()) {
            return self.fail(&e);
        }
        self.committed_len += self.pending.len() as u64;
        self.pending.clear();
        self.shared
            .bytes
            .store(self.committed_len, Ordering::Relaxed);
        if let Some(failure) = self.failure.take() {
            self.recovered(&failure);
        }
    }

    /// The file, cut back to the records synced before the failure.
    fn reopen(&mut self) -> std::io::Result<Box<dyn LogFile>> {
        let mut file = (self.opener)(&self.path)?;
        let len = file.len()?;
        if len < self.committed_len {
            return Err(std::io::Error::other(format!(
                "the log is shorter ({len} bytes) than what was synced ({} bytes)",
                self.committed_len
            )));
        }
        if len > self.committed_len {
            file.truncate(self.committed_len)?;
        }
        Ok(file)
    }

    fn recovered(&mut self, failure: &Failure) {
        let refused = self.shared.refused.swap(0, Ordering::Relaxed);
        let failed_for = failure.since.elapsed();
        tracing::warn!(
            path = %self.path.display(),
            failed_for_ms = failed_for.as_millis() as u64,
            refused,
            "audit log writable again"
        );
        self.shared.healthy.store(true, Ordering::Release);
        let record = AuditRecord::new(self.component, Event::AuditRecovered)
            .reason("write_failed")
            .detail("failed_for_ms", failed_for.as_millis() as u64)
            .detail("refused_records", refused)
            .detail("error", failure.error.clone());
        self.append(record);
        self.commit();
    }

    fn fail(&mut self, e: &std::io::Error) {
        self.file = None;
        if self.failure.is_none() {
            tracing::error!(path = %self.path.display(), error = %e, "audit log write failed; refusing audited work until it can write again");
            self.shared.healthy.store(false, Ordering::Release);
            self.failure = Some(Failure {
                since: Instant::now(),
                error: e.to_string(),
                delays: backon::ExponentialBuilder::default()
                    .with_min_delay(RETRY_MIN)
                    .with_max_delay(RETRY_MAX)
                    .with_jitter()
                    .without_max_times()
                    .build(),
            });
        } else {
            tracing::debug!(path = %self.path.display(), error = %e, "audit log still not writable");
        }
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

/// Recovery after failed writes, through the writer's file seam: a file that fails
/// on demand (root ignores permissions, and a full file system cannot be made here).
#[cfg(test)]
mod recovery_tests {
    use std::io::BufReader;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::{Component, Event, verify_chain};

    /// The real file, failing while `broken` is set: a write gets half its bytes
    /// through and then "no space", as on a full disk; syncs and opens fail.
    struct Faulty {
        file: File,
        broken: Arc<AtomicBool>,
    }

    fn no_space() -> std::io::Error {
        std::io::Error::from_raw_os_error(28)
    }

    impl LogFile for Faulty {
        fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
            if self.broken.load(Ordering::SeqCst) {
                self.file.write_all(&bytes[..bytes.len() / 2])?;
                return Err(no_space());
            }
            self.file.write_all(bytes)
        }
        fn sync(&mut self) -> std::io::Result<()> {
            if self.broken.load(Ordering::SeqCst) {
                return Err(no_space());
            }
            self.file.sync_data()
        }
        fn len(&self) -> std::io::Result<u64> {
            Ok(self.file.metadata()?.len())
        }
        fn truncate(&mut self, len: u64) -> std::io::Result<()> {
            self.file.set_len(len)
        }
    }

    fn faulty_opener(broken: &Arc<AtomicBool>) -> Opener {
        counted_opener(broken, &Arc::default())
    }

    /// Counts the writer's attempts to open the log in `opens`.
    fn counted_opener(broken: &Arc<AtomicBool>, opens: &Arc<AtomicU64>) -> Opener {
        let broken = Arc::clone(broken);
        let opens = Arc::clone(opens);
        Box::new(move |path: &Path| {
            opens.fetch_add(1, Ordering::SeqCst);
            if broken.load(Ordering::SeqCst) {
                return Err(no_space());
            }
            let file = std::fs::OpenOptions::new().append(true).open(path)?;
            Ok(Box::new(Faulty {
                file,
                broken: Arc::clone(&broken),
            }) as Box<dyn LogFile>)
        })
    }

    fn refusal(n: u64) -> AuditRecord {
        AuditRecord::new(Component::Broker, Event::ConnectionRefused).detail("n", n)
    }

    /// Waits (bounded) for `done`, polling the writer's observable state.
    fn wait_for(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_failed_write_refuses_records_then_recovers_on_its_own_with_the_chain_unbroken() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let broken = Arc::new(AtomicBool::new(false));
        let log = AuditLog::open_with(&path, 64, None, faulty_opener(&broken)).expect("open");
        let auditor = log.auditor();
        for n in 0..3 {
            auditor.record(refusal(n)).expect("record");
        }
        auditor.sync().expect("synced");
        let synced_len = std::fs::metadata(&path).expect("log").len();
        assert_eq!(auditor.bytes(), synced_len);

        broken.store(true, Ordering::SeqCst);
        // Accepted before the failure is known: held, not lost.
        auditor.record(refusal(3)).expect("queued");
        assert!(matches!(auditor.sync(), Err(AuditError::Unhealthy)));
        assert!(!auditor.healthy());
        // While failing, new records are refused, so the work they document is too.
        for n in 4..7 {
            assert!(matches!(
                auditor.record(refusal(n)),
                Err(AuditError::Unhealthy)
            ));
        }

        broken.store(false, Ordering::SeqCst);
        wait_for("the writer to recover", || auditor.healthy());
        auditor.record(refusal(7)).expect("record after recovery");
        log.close().expect("close");

        let text = std::fs::read_to_string(&path).expect("read");
        let count = verify_chain(BufReader::new(text.as_bytes())).expect("one unbroken chain");
        let records: Vec<AuditRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("whole lines only"))
            .collect();
        assert_eq!(count, 6, "{text}");
        let ns: Vec<_> = records.iter().filter_map(|r| r.details.get("n")).collect();
        assert_eq!(ns, [0, 1, 2, 3, 7]);
        let recovered = &records[4];
        assert_eq!(recovered.event, Event::AuditRecovered);
        assert_eq!(recovered.details["refused_records"], 3);
        assert!(
            recovered.details["error"]
                .as_str()
                .is_some_and(|e| e.contains("No space")),
            "{recovered:?}"
        );
    }

    #[test]
    fn a_log_cut_shorter_while_failing_is_not_papered_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let broken = Arc::new(AtomicBool::new(false));
        let opens = Arc::new(AtomicU64::new(0));
        let log =
            AuditLog::open_with(&path, 64, None, counted_opener(&broken, &opens)).expect("open");
        let auditor = log.auditor();
        for n in 0..3 {
            auditor.record(refusal(n)).expect("record");
        }
        auditor.sync().expect("synced");
        broken.store(true, Ordering::SeqCst);
        auditor.record(refusal(3)).expect("queued");
        assert!(auditor.sync().is_err());
        std::fs::write(&path, "").expect("cut");
        broken.store(false, Ordering::SeqCst);
        // Retries keep failing: writing on would leave a chain that starts mid-way.
        let before = opens.load(Ordering::SeqCst);
        wait_for("three more attempts", || {
            opens.load(Ordering::SeqCst) >= before + 3
        });
        assert!(!auditor.healthy());
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "");
    }
}
