//! The hash chain: computing a record's hash and checking a whole log.

use std::io::BufRead;

use sha2::{Digest as _, Sha256};

use crate::AuditRecord;

/// `prev` of the first record of a log.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Length of a hash in hex.
const HASH_HEX: usize = 64;
/// How a line ends after its hash: the writer serializes `hash` as the last field.
const LINE_END: &str = "\"}";

/// The hash a record must carry: SHA-256 of its JSON with `hash` set to "" (the line
/// the writer writes, with the hash value left out).
#[cfg(test)]
pub(crate) fn record_hash(record: &AuditRecord) -> String {
    let mut unhashed = record.clone();
    unhashed.hash.clear();
    // Serializing a struct of strings, numbers and JSON values cannot fail.
    let bytes = serde_json::to_vec(&unhashed).expect("audit record serializes");
    hex::encode(Sha256::digest(bytes))
}

/// Serializes `record` (its `hash` is ignored) into the line the writer appends, with
/// the hash filled in; returns the line and the hash.
pub(crate) fn seal(record: &mut AuditRecord) -> Result<String, serde_json::Error> {
    record.hash.clear();
    let mut unhashed = serde_json::to_string(record)?;
    let hash = hex::encode(Sha256::digest(unhashed.as_bytes()));
    // `"hash":""}` ends the text: insert the value between the two quotes.
    unhashed.insert_str(unhashed.len() - LINE_END.len(), &hash);
    record.hash = hash;
    Ok(unhashed)
}

/// The hash a line's own bytes call for: SHA-256 over the line exactly as it is, with
/// only the 64 hex digits of its (last) `hash` value taken out, so any byte added,
/// removed or changed anywhere else (an inserted field, a space, a reordered key)
/// changes it. This is the hash [`seal`] computes: for every line the writer wrote it
/// equals the hash of the record re-serialized, so logs written before the check moved
/// from the re-serialized record to the line's bytes verify unchanged. `None` when the
/// line does not end with a hash value.
pub(crate) fn line_hash(line: &str) -> Option<String> {
    let body = line.strip_suffix(LINE_END)?;
    let split = body.len().checked_sub(HASH_HEX)?;
    let (head, claimed) = (body.get(..split)?, body.get(split..)?);
    if !head.ends_with("\"hash\":\"") || !claimed.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut hasher = Sha256::new();
    hasher.update(head.as_bytes());
    hasher.update(LINE_END.as_bytes());
    Some(hex::encode(hasher.finalize()))
}

/// Parses one line as a record of the known format and checks that its hash covers
/// the line's exact bytes.
pub(crate) fn read_line(line: &str, line_no: usize) -> Result<AuditRecord, ChainError> {
    let record: AuditRecord = serde_json::from_str(line).map_err(|e| ChainError::Unreadable {
        line: line_no,
        why: Unreadable::Json(e),
    })?;
    if record.format != crate::record::FORMAT {
        return Err(ChainError::Unreadable {
            line: line_no,
            why: Unreadable::Format(record.format),
        });
    }
    if line_hash(line).as_deref() != Some(record.hash.as_str()) {
        return Err(ChainError::Tampered { line: line_no });
    }
    Ok(record)
}

/// Where and why a log stopped being a valid chain. Lines are 1-based.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    #[error("line {line}: not an audit record: {why}")]
    Unreadable {
        line: usize,
        #[source]
        why: Unreadable,
    },
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

/// Why a line is not a record of this format.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Unreadable {
    #[error(transparent)]
    Io(std::io::Error),
    #[error(transparent)]
    Json(serde_json::Error),
    #[error("unknown format {0:?}")]
    Format(String),
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
            why: Unreadable::Io(e),
        })?;
        let record = read_line(&line, line_no)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The first records of a broker log written by the writer before the hash check
    /// moved to the line's bytes (main at e9b1351): they verify unchanged.
    const WRITTEN_BEFORE: [&str; 3] = [
        r#"{"format":"vitalmq-audit/v1","seq":0,"at":"2026-12-04T22:21:59.650490681Z","component":"broker","event":"component_started","policy_sha256":"d2d3ad3461212d00db444dcb680434d1d824eff67dbe8f96e1ad7319693a8ee9","details":{"listen":"127.0.0.1:40895"},"prev":"0000000000000000000000000000000000000000000000000000000000000000","hash":"7ea0cace8778c89ea66d9787b0950663b4e061f27ded82dd33664c77c97c99c6"}"#,
        r#"{"format":"vitalmq-audit/v1","seq":1,"at":"2026-12-04T22:21:59.796198416Z","component":"broker","event":"connection_refused","actor":{"addr":"127.0.0.1:55530"},"action":"handshake","decision":"deny","reason":"invalid_message","details":{"class":"tls"},"prev":"7ea0cace8778c89ea66d9787b0950663b4e061f27ded82dd33664c77c97c99c6","hash":"510be532f243c20632e3fe5f5d019ac0fff706e2b8616927821c7a401c22dcfb"}"#,
        r#"{"format":"vitalmq-audit/v1","seq":2,"at":"2026-12-04T22:21:59.796768902Z","component":"broker","event":"connection_refused","actor":{"addr":"127.0.0.1:55544"},"action":"handshake","decision":"deny","reason":"invalid_message","details":{"class":"tls"},"prev":"510be532f243c20632e3fe5f5d019ac0fff706e2b8616927821c7a401c22dcfb","hash":"a5c47659363f7d1863c40584162e77545613e284914435ece4c7c0fea01dfd30"}"#,
    ];

    #[test]
    fn a_log_written_before_the_line_hash_still_verifies() {
        let log = WRITTEN_BEFORE.join("\n") + "\n";
        assert_eq!(verify_chain(log.as_bytes()).expect("intact"), 3);
    }

    #[test]
    fn any_byte_outside_the_hash_value_counts() {
        let edits = [
            // An extra field, a space, keys in another order: same record, other bytes.
            WRITTEN_BEFORE[1].replacen('{', "{\"note\":\"operator approved this\",", 1),
            WRITTEN_BEFORE[1].replacen("\"seq\":1,", "\"seq\": 1,", 1),
            WRITTEN_BEFORE[1].replacen(
                "\"format\":\"vitalmq-audit/v1\",\"seq\":1,",
                "\"seq\":1,\"format\":\"vitalmq-audit/v1\",",
                1,
            ),
        ];
        for edited in edits {
            let log = [WRITTEN_BEFORE[0], edited.as_str(), WRITTEN_BEFORE[2]].join("\n");
            assert_eq!(
                verify_chain(log.as_bytes()).map_err(|e| e.line()),
                Err(2),
                "{edited}"
            );
        }
    }
}
