//! Sealed objects: telemetry objects encrypted under their patient's data key (issue 20,
//! points 3 and 4), so erasing the patient (destroying the key in the keyring) makes
//! every object of theirs unreadable, wherever it was copied.
//!
//! A sink with a keyring ([`super::ObjectStoreSink::with_keyring`]) writes each object
//! as one [`Keyring::seal`] blob (`VMQS` header naming the subject and key version,
//! nonce, AES-256-GCM ciphertext; see `vitalmq_keyring::sealed`) of the bytes the plain
//! object would hold. The subject is the care `patient_ref` the object's records were
//! attributed to at ingest, or [`UNATTRIBUTED`]; the sealing context is
//! [`CONTEXT_PREFIX`] followed by the object's name from its `raw/` or `normalized/`
//! level on, so a blob renamed to another object's name (another patient, partition or
//! range) does not open, while moving the whole tree under another prefix or bucket
//! (archiving) keeps it readable. Names end in `.{cborseq|ndjson}.vmqs` and the media
//! type is [`SEALED_MEDIA_TYPE`], so no reader mistakes the ciphertext for data.

use vitalmq_keyring::{KeyError, Keyring, SealedHeader};

/// Extension after the plain one (`.ndjson.vmqs`, `.cborseq.vmqs`).
pub const SEALED_EXTENSION: &str = "vmqs";
/// Content-Type of sealed objects (where the store keeps one).
pub const SEALED_MEDIA_TYPE: &str = "application/vnd.vitalmq.sealed";
/// Subject of records no patient was attributed to.
pub const UNATTRIBUTED: &str = "sys:unattributed";
/// Start of every object's sealing context (domain separation from the store's).
pub const CONTEXT_PREFIX: &str = "vitalmq-object/v1|";

/// Why a sealed object did not open.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The name has no `raw` or `normalized` level, so its context is unknown.
    #[error("{0:?} is not the name of a telemetry object (no raw/ or normalized/ level)")]
    NotAnObjectName(String),
    /// The name does not end in `.vmqs`: a plain object, nothing to open.
    #[error("{0:?} is not a sealed object (its name does not end in .{SEALED_EXTENSION})")]
    NotSealedName(String),
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// The sealing context of the object named `name` (a full object name, or a path in
/// a local sink's directory): [`CONTEXT_PREFIX`] and the name from its last `raw` or
/// `normalized` segment on. Partition segments are `key=value` and file names hold no
/// `/`, so the last such segment is the kind level whatever the prefix holds.
pub fn context(name: &str) -> Result<Vec<u8>, OpenError> {
    let segments: Vec<&str> = name.split('/').collect();
    let kind = segments
        .iter()
        .rposition(|s| matches!(*s, "raw" | "normalized"))
        .filter(|at| at + 1 < segments.len())
        .ok_or_else(|| OpenError::NotAnObjectName(name.to_owned()))?;
    Ok(format!("{CONTEXT_PREFIX}{}", segments[kind..].join("/")).into_bytes())
}

/// The readable header of a sealed object: whose data it holds, under which key
/// version; no key needed.
pub fn header(bytes: &[u8]) -> Result<SealedHeader, KeyError> {
    vitalmq_keyring::sealed::header(bytes)
}

/// The plain bytes of the sealed object named `name`. [`KeyError::Erased`] (in
/// [`OpenError::Key`]) when its subject was erased; [`KeyError::Unauthentic`] when the
/// bytes were altered or belong to another name.
pub fn open(keyring: &Keyring, name: &str, bytes: &[u8]) -> Result<Vec<u8>, OpenError> {
    if !name.ends_with(&format!(".{SEALED_EXTENSION}")) {
        return Err(OpenError::NotSealedName(name.to_owned()));
    }
    Ok(keyring.unseal(bytes, &context(name)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_context_starts_at_the_kind_level_whatever_the_prefix() {
        let name = "raw/site=n/device=d/date=2025-03-01/1-2-1.cborseq.vmqs";
        let expected = format!("{CONTEXT_PREFIX}{name}").into_bytes();
        assert_eq!(context(name).expect("context"), expected);
        assert_eq!(context(&format!("a/raw/b/{name}")).expect("c"), expected);
        assert_eq!(
            context(&format!("/tmp/x/objects/{name}")).expect("c"),
            expected
        );
        assert!(context("audit/bridge/seg.jsonl").is_err());
        assert!(context("exports/raw").is_err());
    }
}
