//! Reads the part of an audit log after a shipping cursor, incrementally.
//!
//! The log may belong to another process (the broker) that is appending to it while we
//! read, so: a last line without its `\n` is torn and not read yet; a log that does not
//! exist is "not there yet"; and the cursor is checked against the chain before anything
//! is read after it. The cursor remembers the last shipped record's seq, hash and the
//! byte offset where its line starts: a pass seeks there, re-reads that one line, and if
//! it is still the same record reads only the tail after it. If the line there is
//! anything else, the log is scanned from the start for the record; when the record is
//! gone or has another hash, the log was replaced, rotated or truncated, and the reader
//! says so ([`TailError::Diverged`]) instead of shipping another chain under the same
//! object names.
//!
//! A segment always ends with a checkpoint record, so every shipped segment ends with a
//! signature over everything before it.

use std::io::{BufRead as _, BufReader, Seek as _, SeekFrom};
use std::path::Path;

use vitalmq_audit::{AuditRecord, Event, GENESIS};

use crate::store::ShippedAudit;

/// The records `first..=last` of a log, as they are in the file, ending at a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub first: u64,
    pub last: u64,
    /// The complete lines, each with its `\n`.
    pub bytes: Vec<u8>,
    /// UTC date (`YYYY-MM-DD`) of the first record's `at`, for the object name.
    pub date: String,
    /// The cursor once this segment is shipped (the checkpoint that ends it).
    pub end: ShippedAudit,
}

/// What a pass found to ship.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// Records up to (and including) a checkpoint after the cursor.
    Segment(Segment),
    /// Nothing new that a checkpoint covers yet.
    Nothing,
    /// The log file does not exist (yet).
    Missing,
}

/// Why a log cannot be shipped from where its cursor stands.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TailError {
    #[error("cannot read the log: {0}")]
    Io(#[from] std::io::Error),
    /// The log no longer continues the chain the cursor is on.
    #[error("the log no longer continues the shipped chain: {0}")]
    Diverged(#[source] Divergence),
    /// A complete line that is not the next record of the chain.
    #[error("at byte {offset}: {why}")]
    Broken {
        offset: u64,
        #[source]
        why: BrokenLine,
    },
}

/// How the log parted from the shipped chain.
#[derive(Debug, thiserror::Error)]
pub enum Divergence {
    #[error("the segment in flight ended at seq {0}, which is no longer a checkpoint")]
    NotCheckpoint(u64),
    #[error("the segment in flight, seq {first} to {last}, is no longer in the log as it was")]
    InFlightGone { first: u64, last: u64 },
    #[error("record seq {0} is not in the log (truncated, or replaced by a shorter log)")]
    Missing(u64),
    #[error("while looking for record seq {seq}: {source}")]
    Unreadable { seq: u64, source: NotARecord },
    #[error("record seq {0} has another hash than the one shipped (the log was replaced)")]
    Replaced(u64),
    #[error("record seq {seq} is not in the log (it continues at seq {continues})")]
    Skipped { seq: u64, continues: u64 },
}

/// Why a complete line is not the next record of the chain.
#[derive(Debug, thiserror::Error)]
pub enum BrokenLine {
    #[error(transparent)]
    NotARecord(#[from] NotARecord),
    #[error("the log does not start a chain (first record seq {0})")]
    NoStart(u64),
    #[error("record seq {seq} does not follow seq {after} of the chain")]
    OutOfChain { seq: u64, after: u64 },
}

/// A line that does not parse as an audit record.
#[derive(Debug, thiserror::Error)]
#[error("not an audit record: {0}")]
pub struct NotARecord(#[source] serde_json::Error);

/// Limits of one read.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Stop at the first checkpoint once the segment holds this many records.
    pub max_records: usize,
    /// Read exactly up to this seq (a segment in flight before a crash); it must be a
    /// checkpoint.
    pub until: Option<u64>,
}

/// The next segment of `log` after `after` (from the start when `None`).
pub fn next_segment(
    log: &Path,
    after: Option<&ShippedAudit>,
    limits: Limits,
) -> Result<Tail, TailError> {
    let file = match std::fs::File::open(log) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Tail::Missing),
        Err(e) => return Err(e.into()),
    };
    let mut reader = BufReader::new(file);
    let (mut offset, mut expect_seq, mut prev) = match after {
        None => (0, 0, GENESIS.to_owned()),
        Some(cursor) => {
            let (end, hash) = locate(&mut reader, cursor)?;
            (end, cursor.seq + 1, hash)
        }
    };
    reader.seek(SeekFrom::Start(offset))?;
    let mut bytes = Vec::new();
    let mut first = None;
    let mut done: Option<Done> = None;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            break; // end of the log, or a torn last line the writer has not finished
        }
        let line_start = offset;
        offset += n as u64;
        let record = match parse(&line) {
            Ok(r) => r,
            Err(why) => return broken(done, bytes, line_start, why.into()),
        };
        if record.seq != expect_seq || record.prev != prev {
            let why = if expect_seq == 0 && after.is_none() {
                BrokenLine::NoStart(record.seq)
            } else {
                BrokenLine::OutOfChain {
                    seq: record.seq,
                    after: expect_seq.wrapping_sub(1),
                }
            };
            return broken(done, bytes, line_start, why);
        }
        first.get_or_insert(record.seq);
        bytes.extend_from_slice(&line);
        let records = record.seq - first.unwrap_or(record.seq) + 1;
        expect_seq = record.seq + 1;
        prev.clone_from(&record.hash);
        if record.event == Event::Checkpoint {
            done = Some(Done {
                first: first.unwrap_or(record.seq),
                len: bytes.len(),
                end: ShippedAudit {
                    seq: record.seq,
                    hash: Some(record.hash.clone()),
                    line_start,
                },
            });
            let full = usize::try_from(records).unwrap_or(usize::MAX) >= limits.max_records;
            if full || limits.until == Some(record.seq) {
                break;
            }
        }
        if limits.until == Some(record.seq) {
            return Err(TailError::Diverged(Divergence::NotCheckpoint(record.seq)));
        }
    }
    match done {
        // The segment in flight must be read whole: a shorter one would get a new name.
        Some(d) if limits.until.is_none_or(|u| u == d.end.seq) => {
            Ok(Tail::Segment(d.into_segment(bytes)))
        }
        _ => Ok(Tail::Nothing),
    }
}

/// The segment read so far, up to its last checkpoint.
struct Done {
    first: u64,
    /// Bytes up to and including the checkpoint's line.
    len: usize,
    end: ShippedAudit,
}

impl Done {
    fn into_segment(self, mut bytes: Vec<u8>) -> Segment {
        bytes.truncate(self.len);
        Segment {
            first: self.first,
            last: self.end.seq,
            date: date_of_first(&bytes),
            bytes,
            end: self.end,
        }
    }
}

/// The offset just after the cursor's record and its hash: at `line_start` if the same
/// record is still there, else found by scanning the log from the start.
fn locate(
    reader: &mut BufReader<std::fs::File>,
    cursor: &ShippedAudit,
) -> Result<(u64, String), TailError> {
    let matches =
        |r: &AuditRecord| r.seq == cursor.seq && cursor.hash.as_ref().is_none_or(|h| *h == r.hash);
    let mut line = Vec::new();
    reader.seek(SeekFrom::Start(cursor.line_start))?;
    let n = reader.read_until(b'\n', &mut line)?;
    if line.last() == Some(&b'\n')
        && let Ok(r) = parse(&line)
        && matches(&r)
    {
        return Ok((cursor.line_start + n as u64, r.hash));
    }
    tracing::debug!(
        seq = cursor.seq,
        line_start = cursor.line_start,
        "audit cursor offset does not line up; scanning the log"
    );
    reader.seek(SeekFrom::Start(0))?;
    let mut offset = 0u64;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            return Err(TailError::Diverged(Divergence::Missing(cursor.seq)));
        }
        offset += n as u64;
        let r = parse(&line).map_err(|source| {
            TailError::Diverged(Divergence::Unreadable {
                seq: cursor.seq,
                source,
            })
        })?;
        if r.seq == cursor.seq {
            if matches(&r) {
                return Ok((offset, r.hash));
            }
            return Err(TailError::Diverged(Divergence::Replaced(cursor.seq)));
        }
        if r.seq > cursor.seq {
            return Err(TailError::Diverged(Divergence::Skipped {
                seq: cursor.seq,
                continues: r.seq,
            }));
        }
    }
}

fn parse(line: &[u8]) -> Result<AuditRecord, NotARecord> {
    serde_json::from_slice::<AuditRecord>(line).map_err(NotARecord)
}

/// A complete line that breaks the chain: ship what ended at a checkpoint before it (the
/// next pass reports the break), or report it now.
fn broken(
    done: Option<Done>,
    bytes: Vec<u8>,
    offset: u64,
    why: BrokenLine,
) -> Result<Tail, TailError> {
    match done {
        Some(d) => Ok(Tail::Segment(d.into_segment(bytes))),
        None => Err(TailError::Broken { offset, why }),
    }
}

/// `YYYY-MM-DD` of the first record's `at`, or `unknown`; from the record, not the clock,
/// so a retry names the same object.
fn date_of_first(bytes: &[u8]) -> String {
    let first = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
    parse(first)
        .ok()
        .and_then(|r| {
            let date = r.at.get(..10)?;
            let ok = date.bytes().enumerate().all(|(i, b)| {
                if i == 4 || i == 7 {
                    b == b'-'
                } else {
                    b.is_ascii_digit()
                }
            });
            ok.then(|| date.to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}
