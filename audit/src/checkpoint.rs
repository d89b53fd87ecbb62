//! Signed checkpoints: every so often the writer appends a `checkpoint` record whose
//! Ed25519 signature, by the component's own key, covers the hash of the record before
//! it, and so (through the chain) every record up to there.
//!
//! The hash chain alone shows an edit to anyone who did not also recompute every later
//! hash; a checkpoint shows it to anyone holding the component's public key, because
//! recomputing the chain breaks the signatures and forging them needs the private key.
//! Keep the public key (`<key>.pub`) somewhere the log's custodian cannot change it,
//! and verify with `vitalmq audit verify FILE --trusted-key HEX`.
//!
//! Signed bytes: `vitalmq-audit-checkpoint/v1\n<covers_seq>\n<covers_hash>`.

use std::io::{BufRead, Write as _};
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::{AuditRecord, Component, Event};

const CONTEXT: &str = "vitalmq-audit-checkpoint/v1";

fn signed_bytes(seq: u64, hash: &str) -> Vec<u8> {
    format!("{CONTEXT}\n{seq}\n{hash}").into_bytes()
}

/// Where a component keeps the key that signs the checkpoints of the audit log at
/// `log`: `audit-signing.key.pem` in the same directory.
pub fn signing_key_path(log: &Path) -> PathBuf {
    log.with_file_name("audit-signing.key.pem")
}

/// Short id of a public key: the first 8 bytes of its SHA-256, hex.
pub(crate) fn key_id(public: &[u8; 32]) -> String {
    hex::encode(&Sha256::digest(public)[..8])
}

/// A component's checkpoint signing key.
pub struct CheckpointKey {
    key: SigningKey,
    component: Component,
}

impl std::fmt::Debug for CheckpointKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointKey")
            .field("public", &self.public_hex())
            .finish()
    }
}

/// A key file that cannot be read or created.
#[derive(Debug, thiserror::Error)]
#[error("audit signing key {path}: {why}")]
pub struct KeyError {
    pub path: PathBuf,
    #[source]
    pub why: KeyProblem,
}

/// What went wrong with a key file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyProblem {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Dir(#[from] vitalmq_private_fs::PrivateFsError),
    /// Not a PKCS#8 Ed25519 key, or one that cannot be encoded.
    #[error(transparent)]
    Pkcs8(#[from] ed25519_dalek::pkcs8::Error),
    /// A sealed key file its key provider could not open.
    #[error(transparent)]
    Sealed(#[from] vitalmq_keyring::KeyError),
    #[error("the key file is not UTF-8 PEM")]
    NotPem,
}

impl CheckpointKey {
    /// Loads the PKCS#8 PEM key at `path` (plaintext, or sealed under a key provider:
    /// `vitalmq_keyring::read_secret`), or creates one (mode 0600, never overwriting)
    /// with its public key in hex beside it at `<path>.pub`.
    pub fn load_or_create(path: &Path, component: Component) -> Result<Self, KeyError> {
        Self::load_or_create_at(path, component).map_err(|why| KeyError {
            path: path.to_path_buf(),
            why,
        })
    }

    fn load_or_create_at(path: &Path, component: Component) -> Result<Self, KeyProblem> {
        let key = if path.exists() {
            // Plaintext PEM, or sealed under a key provider (`vitalmq keys seal-file`).
            let pem = vitalmq_keyring::read_secret(path)?;
            let pem = zeroize::Zeroizing::new(
                String::from_utf8(pem.to_vec()).map_err(|_| KeyProblem::NotPem)?,
            );
            SigningKey::from_pkcs8_pem(&pem)?
        } else {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                vitalmq_private_fs::create_dir_all(dir)?;
            }
            let key = SigningKey::generate(&mut rand_core::OsRng);
            let pem = key.to_pkcs8_pem(Default::default())?;
            let mut file = vitalmq_private_fs::create_options()
                .write(true)
                .create_new(true)
                .open(path)?;
            file.write_all(pem.as_bytes())?;
            file.sync_all()?;
            key
        };
        let public = hex::encode(key.verifying_key().as_bytes());
        let pub_path = PathBuf::from(format!("{}.pub", path.display()));
        if !pub_path.exists() {
            std::fs::write(&pub_path, format!("{public}\n"))?;
        }
        Ok(Self { key, component })
    }

    /// The public key, hex.
    pub fn public_hex(&self) -> String {
        hex::encode(self.key.verifying_key().as_bytes())
    }

    /// The checkpoint record covering the record `seq` whose hash is `hash`.
    pub(crate) fn checkpoint(&self, seq: u64, hash: &str) -> AuditRecord {
        let public = self.key.verifying_key();
        let signature = self.key.sign(&signed_bytes(seq, hash));
        AuditRecord::new(self.component, Event::Checkpoint)
            .detail("covers_seq", seq)
            .detail("covers_hash", hash)
            .detail("key_id", key_id(public.as_bytes()))
            .detail("public_key", hex::encode(public.as_bytes()))
            .detail("signature", hex::encode(signature.to_bytes()))
    }
}

/// What the checkpoints of a log say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointReport {
    pub checkpoints: u64,
    /// The last record a checkpoint covers, if any.
    pub last_covered_seq: Option<u64>,
    /// The seq of the last record read (a checkpoint is itself a record, so a log or
    /// segment that ends with one has `last_seq == last_covered_seq + 1`).
    pub last_seq: Option<u64>,
    /// Public keys (hex) that signed, in order of first use.
    pub keys: Vec<String>,
}

/// A checkpoint that does not hold. Lines are 1-based.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    #[error("line {line}: checkpoint is malformed: {why}")]
    Malformed {
        line: usize,
        #[source]
        why: Malformed,
    },
    #[error("line {line}: checkpoint signature does not verify")]
    BadSignature { line: usize },
    #[error("line {line}: checkpoint covers record {seq}, whose hash is not the one signed")]
    Mismatch { line: usize, seq: u64 },
    #[error("line {line}: checkpoint signed by key {key}, which is not a trusted key")]
    Untrusted { line: usize, key: String },
}

/// What is wrong with a checkpoint line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Malformed {
    #[error(transparent)]
    Io(std::io::Error),
    #[error(transparent)]
    Json(serde_json::Error),
    /// A detail that is missing or not of its form, by name.
    #[error("{0}")]
    Field(&'static str),
    #[error("covers_seq is not the record before the checkpoint")]
    NotAdjacent,
}

impl CheckpointError {
    pub fn line(&self) -> usize {
        match self {
            Self::Malformed { line, .. }
            | Self::BadSignature { line }
            | Self::Mismatch { line, .. }
            | Self::Untrusted { line, .. } => *line,
        }
    }
}

/// Checks every checkpoint of a log (run [`crate::verify_chain`] first for the chain).
/// With `trusted` keys given, a checkpoint signed by any other key is an error.
pub fn verify_checkpoints(
    reader: impl BufRead,
    trusted: &[String],
) -> Result<CheckpointReport, CheckpointError> {
    // Hashes by seq, from the first record's seq on (0 for a whole log; a segment
    // starts later), so a checkpoint can only cover a record it follows.
    let mut first_seq: Option<u64> = None;
    let mut hashes: Vec<String> = Vec::new();
    let mut report = CheckpointReport {
        checkpoints: 0,
        last_covered_seq: None,
        last_seq: None,
        keys: Vec::new(),
    };
    for (i, line) in reader.lines().enumerate() {
        let line_no = i + 1;
        let malformed = |why| CheckpointError::Malformed { line: line_no, why };
        let field = |name| malformed(Malformed::Field(name));
        let line = line.map_err(|e| malformed(Malformed::Io(e)))?;
        if line.trim().is_empty() {
            continue;
        }
        let record: AuditRecord =
            serde_json::from_str(&line).map_err(|e| malformed(Malformed::Json(e)))?;
        if record.event == Event::Checkpoint {
            let d = &record.details;
            let text = |k| d.get(k).and_then(Value::as_str).ok_or_else(|| field(k));
            let seq = d
                .get("covers_seq")
                .and_then(Value::as_u64)
                .ok_or_else(|| field("covers_seq"))?;
            // The writer signs the record right before each checkpoint; the signature
            // does not cover the checkpoint's own place, so a copy moved elsewhere
            // would otherwise still verify there.
            if record.seq.checked_sub(1) != Some(seq) {
                return Err(malformed(Malformed::NotAdjacent));
            }
            let covered = text("covers_hash")?;
            let public_hex = text("public_key")?;
            let public: [u8; 32] = hex::decode(public_hex)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| field("public_key"))?;
            let signature: [u8; 64] = hex::decode(text("signature")?)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| field("signature"))?;
            let key = VerifyingKey::from_bytes(&public).map_err(|_| field("public_key"))?;
            key.verify_strict(
                &signed_bytes(seq, covered),
                &Signature::from_bytes(&signature),
            )
            .map_err(|_| CheckpointError::BadSignature { line: line_no })?;
            let actual = seq
                .checked_sub(first_seq.unwrap_or(0))
                .and_then(|i| usize::try_from(i).ok())
                .and_then(|i| hashes.get(i));
            if actual.map(String::as_str) != Some(covered) {
                return Err(CheckpointError::Mismatch { line: line_no, seq });
            }
            if !trusted.is_empty() && !trusted.iter().any(|t| t.eq_ignore_ascii_case(public_hex)) {
                return Err(CheckpointError::Untrusted {
                    line: line_no,
                    key: public_hex.to_owned(),
                });
            }
            if !report.keys.iter().any(|k| k == public_hex) {
                report.keys.push(public_hex.to_owned());
            }
            report.checkpoints += 1;
            report.last_covered_seq = Some(seq);
        }
        first_seq.get_or_insert(record.seq);
        report.last_seq = Some(record.seq);
        hashes.push(record.hash);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::io::BufReader;

    use super::*;
    use crate::{AuditLog, verify_chain};

    #[test]
    fn a_signing_key_sealed_under_a_key_provider_loads_as_the_same_key() {
        let dir = tempfile::tempdir().expect("dir");
        let plain = dir.path().join("audit-signing.key.pem");
        let made = CheckpointKey::load_or_create(&plain, Component::Bridge).expect("key");
        let kek = vitalmq_keyring::LocalKeyFile::create(&dir.path().join("kek.json")).expect("kek");
        let sealed = dir.path().join("sealed.key.pem");
        vitalmq_keyring::seal_file(&kek, &plain, &sealed).expect("seal");
        let loaded = CheckpointKey::load_or_create(&sealed, Component::Bridge).expect("load");
        assert_eq!(loaded.public_hex(), made.public_hex());
        std::fs::remove_file(dir.path().join("kek.json")).expect("rm");
        assert!(CheckpointKey::load_or_create(&sealed, Component::Bridge).is_err());
    }

    fn write_log(dir: &Path, records: u64) -> (PathBuf, String) {
        let path = dir.join("audit.jsonl");
        let key =
            CheckpointKey::load_or_create(&dir.join("audit-signing.key.pem"), Component::Bridge)
                .expect("key");
        let public = key.public_hex();
        let capacity = usize::try_from(records).expect("small") + 64;
        let log = AuditLog::open_signed(&path, capacity, Some(key)).expect("open");
        let auditor = log.auditor();
        for i in 0..records {
            auditor
                .record(AuditRecord::new(Component::Bridge, Event::MessageRefused).detail("i", i))
                .expect("record");
        }
        log.close().expect("close");
        (path, public)
    }

    fn check(path: &Path, trusted: &[String]) -> Result<CheckpointReport, CheckpointError> {
        verify_checkpoints(
            BufReader::new(std::fs::File::open(path).expect("open")),
            trusted,
        )
    }

    #[test]
    fn a_closed_log_ends_with_a_checkpoint_that_verifies_under_the_trusted_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, public) = write_log(dir.path(), 5);
        let report = check(&path, std::slice::from_ref(&public)).expect("checkpoints hold");
        assert_eq!(report.checkpoints, 1);
        assert_eq!(report.last_covered_seq, Some(4));
        assert_eq!(report.keys, std::slice::from_ref(&public));
        // The key is kept (0600) with its public half beside it, and reused on reopen.
        let key_path = dir.path().join("audit-signing.key.pem");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&key_path)
                .expect("key")
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        let again = CheckpointKey::load_or_create(&key_path, Component::Bridge).expect("reload");
        assert_eq!(again.public_hex(), public);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("audit-signing.key.pem.pub"))
                .expect("pub")
                .trim(),
            public
        );
    }

    #[test]
    fn a_rewritten_chain_passes_the_chain_check_but_not_the_checkpoint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, public) = write_log(dir.path(), 3);
        // Someone edits record 1 and recomputes every hash after it, so the chain holds.
        let lines: Vec<String> = std::fs::read_to_string(&path)
            .expect("log")
            .lines()
            .map(str::to_owned)
            .collect();
        let mut prev = crate::GENESIS.to_owned();
        let mut rewritten = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            let mut r: AuditRecord = serde_json::from_str(line).expect("record");
            if i == 1 {
                r.details.insert("i".into(), serde_json::json!(99));
            }
            r.prev = prev.clone();
            r.hash = crate::chain::record_hash(&r);
            prev = r.hash.clone();
            rewritten.push(serde_json::to_string(&r).expect("json"));
        }
        std::fs::write(&path, rewritten.join("\n") + "\n").expect("write");
        assert!(verify_chain(BufReader::new(std::fs::File::open(&path).expect("open"))).is_ok());
        let err = check(&path, &[public]).expect_err("the checkpoint no longer matches");
        assert!(
            matches!(err, CheckpointError::Mismatch { line: 4, seq: 2 }),
            "{err:?}"
        );
    }

    #[test]
    fn a_checkpoint_re_signed_with_another_key_is_untrusted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, public) = write_log(dir.path(), 2);
        let other = tempfile::tempdir().expect("tempdir");
        let (_, stranger) = write_log(other.path(), 1);
        assert!(
            check(&path, &[stranger])
                .is_err_and(|e| matches!(e, CheckpointError::Untrusted { line: 3, .. }))
        );
        assert!(check(&path, &[public]).is_ok());
        // A flipped signature bit is caught whatever the trusted keys.
        let text = std::fs::read_to_string(&path).expect("log");
        let sig_at = text.find("\"signature\":\"").expect("signature") + 13;
        let mut bytes = text.into_bytes();
        bytes[sig_at] = if bytes[sig_at] == b'0' { b'1' } else { b'0' };
        std::fs::write(&path, bytes).expect("write");
        assert!(
            check(&path, &[])
                .is_err_and(|e| matches!(e, CheckpointError::BadSignature { line: 3 }))
        );
    }

    #[test]
    fn a_checkpoint_copied_to_another_place_does_not_vouch_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, public) = write_log(dir.path(), 3);
        let mut lines: Vec<String> = std::fs::read_to_string(&path)
            .expect("log")
            .lines()
            .map(str::to_owned)
            .collect();
        // Someone appends a record and, after it, a copy of the genuine checkpoint,
        // with the chain recomputed, so the new record looks signed.
        let mut forged: AuditRecord = serde_json::from_str(&lines[2]).expect("record");
        let mut copy: AuditRecord = serde_json::from_str(&lines[3]).expect("checkpoint");
        let mut prev: AuditRecord = serde_json::from_str(&lines[3]).expect("checkpoint");
        for (seq, r) in [(4, &mut forged), (5, &mut copy)] {
            r.seq = seq;
            r.prev = prev.hash.clone();
            r.hash = crate::chain::record_hash(r);
            lines.push(serde_json::to_string(r).expect("json"));
            prev = r.clone();
        }
        let text = lines.join("\n") + "\n";
        assert_eq!(verify_chain(text.as_bytes()).expect("intact"), 6);
        assert!(matches!(
            verify_checkpoints(text.as_bytes(), &[public]),
            Err(CheckpointError::Malformed { line: 6, .. })
        ));
    }

    #[test]
    fn a_long_log_gets_a_checkpoint_every_thousand_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, _) = write_log(dir.path(), 2_500);
        let report = check(&path, &[]).expect("checkpoints hold");
        assert!(report.checkpoints >= 3, "{report:?}");
    }

    /// The lines of a log, and the 0-based indexes of its checkpoint lines.
    fn lines_and_checkpoints(path: &Path) -> (Vec<String>, Vec<usize>) {
        let text = std::fs::read_to_string(path).expect("read");
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let checkpoints = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.contains("\"event\":\"checkpoint\""))
            .map(|(i, _)| i)
            .collect();
        (lines, checkpoints)
    }

    #[test]
    fn a_segment_cut_after_a_checkpoint_verifies_on_its_own_and_not_as_a_whole_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, public) = write_log(dir.path(), 2_500);
        let (lines, checkpoints) = lines_and_checkpoints(&path);
        assert!(checkpoints.len() >= 3, "{checkpoints:?}");
        // What a shipper sends: the records after one checkpoint up to the next one.
        let segment = lines[checkpoints[0] + 1..=checkpoints[1]].join("\n") + "\n";
        let n = u64::try_from(checkpoints[1] - checkpoints[0]).expect("small");
        assert_eq!(
            crate::verify_chain_from(segment.as_bytes(), crate::Start::Segment).expect("intact"),
            n
        );
        assert!(matches!(
            verify_chain(segment.as_bytes()),
            Err(crate::ChainError::Sequence { line: 1, .. })
        ));
        let report = verify_checkpoints(segment.as_bytes(), std::slice::from_ref(&public))
            .expect("the segment's checkpoint covers its records");
        assert_eq!(report.checkpoints, 1);
        assert_eq!(
            report.last_seq,
            Some(report.last_covered_seq.expect("covered") + 1)
        );
    }

    #[test]
    fn a_segment_with_a_record_removed_or_a_foreign_checkpoint_does_not_verify() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, public) = write_log(dir.path(), 2_500);
        let (lines, checkpoints) = lines_and_checkpoints(&path);
        let mut cut: Vec<String> = lines[checkpoints[0] + 1..=checkpoints[1]].to_vec();
        cut.remove(10);
        let removed = cut.join("\n") + "\n";
        assert!(matches!(
            crate::verify_chain_from(removed.as_bytes(), crate::Start::Segment),
            Err(crate::ChainError::Sequence { line: 11, .. })
        ));
        // A checkpoint of the *previous* segment cannot vouch for this one's records:
        // the record it covers is not in the segment.
        let with_old = lines[checkpoints[0]..checkpoints[1]].join("\n") + "\n";
        assert!(matches!(
            verify_checkpoints(with_old.as_bytes(), &[public]),
            Err(CheckpointError::Mismatch { line: 1, .. })
        ));
    }
}
