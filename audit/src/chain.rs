//! The hash chain: computing a record's hash and checking a whole log.

use std::io::BufRead;

use sha2::{Digest as _, Sha256};

use crate::AuditRecord;

/// `prev` of the first record of a log.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The hash a record must carry: SHA-256 of its JSON with `hash` set to "".
pub(crate) fn record_hash(record: &AuditRecord) -> String {
    let mut unhashed = record.clone();
    unhashed.hash.clear();
    // Serializing a struct of strings, numbers and JSON values cannot fail.
    let bytes = serde_json::to_vec(&unhashed).expect("audit record serializes");
    hex::encode(Sha256::digest(bytes))
}

/// Where and why a log stopped being a valid chain. Lines are 1-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    #[error("line {line}: not an audit record: {why}")]
    Unreadable { line: usize, why: String },
    #[error(
        "line {line}: record seq {found}, expected {expected} (a record was deleted, inserted or moved)"
    )]
    Sequence {
        line: usize,
        expected: u64,
        found: u64,
    },
    #[error("line {line}: prev does not match the hash of the record before it")]
    BrokenLink { line: usize },
    #[error("line {line}: record content does not match its hash (edited)")]
    Tampered { line: usize },
}

impl ChainError {
    pub fn line(&self) -> usize {
        match self {
            Self::Unreadable { line, .. }
            | Self::Sequence { line, .. }
            | Self::BrokenLink { line }
            | Self::Tampered { line } => *line,
        }
    }
}

/// Where the records being checked begin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A whole log: the first record is seq 0 and links to [`GENESIS`].
    Genesis,
    /// A segment cut from a log (as shipped to cloud storage): the first record's seq
    /// and `prev` are taken as they are, since what came before is not at hand; every
    /// later record must follow it. Only a signed checkpoint inside the segment
    /// vouches for the records up to the one it covers.
    Segment,
}

/// Checks a log from its first line; returns the number of records on success.
pub fn verify_chain(reader: impl BufRead) -> Result<u64, ChainError> {
    verify_chain_from(reader, Start::Genesis)
}

/// Checks records from `start`; returns the number of records on success.
pub fn verify_chain_from(reader: impl BufRead, start: Start) -> Result<u64, ChainError> {
    let mut prev = GENESIS.to_owned();
    let mut expected = 0u64;
    let mut count = 0u64;
    for (i, line) in reader.lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|e| ChainError::Unreadable {
            line: line_no,
            why: e.to_string(),
        })?;
        let record: AuditRecord =
            serde_json::from_str(&line).map_err(|e| ChainError::Unreadable {
                line: line_no,
                why: e.to_string(),
            })?;
        if record_hash(&record) != record.hash {
            return Err(ChainError::Tampered { line: line_no });
        }
        if count == 0 && start == Start::Segment {
            expected = record.seq;
            prev.clone_from(&record.prev);
        }
        if record.seq != expected {
            return Err(ChainError::Sequence {
                line: line_no,
                expected,
                found: record.seq,
            });
        }
        if record.prev != prev {
            return Err(ChainError::BrokenLink { line: line_no });
        }
        prev = record.hash;
        expected += 1;
        count += 1;
    }
    Ok(count)
}
