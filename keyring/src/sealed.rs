//! The sealed format: what a payload encrypted under a subject's data key looks like.
//!
//! ```text
//! magic "VMQS" | format 0x01 | subject length (1 byte) | subject (ASCII)
//!   | data-key version (u32, big endian) | nonce (12 bytes) | ciphertext | tag (16 bytes)
//! ```
//!
//! The AEAD is AES-256-GCM; its associated data is the header (magic through key
//! version) followed by the caller's context (for example `raw|<event id>`), so neither
//! the owner, the key version nor the place a blob was sealed for can be changed
//! without the open failing. The header is readable without a key: a reader learns
//! whose data it holds (and so that it was erased) without decrypting.

// Without the keyring only the header readers are used.
#![cfg_attr(not(feature = "store"), allow(dead_code))]

use crate::subject::MAX_SUBJECT_LEN;
use crate::{KeyError, Subject};

/// The first bytes of every sealed blob.
pub const MAGIC: &[u8; 4] = b"VMQS";
/// The format version after the magic.
pub const FORMAT: u8 = 1;
/// AES-GCM nonce length.
pub const NONCE_LEN: usize = 12;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;

/// The readable part of a sealed blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedHeader {
    pub subject: Subject,
    pub key_version: u32,
}

/// A parsed blob: its header, the authenticated header bytes, nonce and ciphertext.
#[derive(Debug)]
pub(crate) struct Parsed<'a> {
    pub header: SealedHeader,
    pub header_bytes: &'a [u8],
    pub nonce: [u8; NONCE_LEN],
    pub ciphertext_and_tag: &'a [u8],
}

/// Whether `bytes` start like a sealed blob (the check readers use to tell sealed rows
/// from plaintext ones written before encryption was on).
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.len() > MAGIC.len() && &bytes[..MAGIC.len()] == MAGIC && bytes[MAGIC.len()] == FORMAT
}

/// The header bytes for `subject` and `key_version`.
pub(crate) fn header_bytes(subject: &Subject, key_version: u32) -> Vec<u8> {
    let name = subject.as_str().as_bytes();
    let mut out = Vec::with_capacity(MAGIC.len() + 2 + name.len() + 4);
    out.extend_from_slice(MAGIC);
    out.push(FORMAT);
    // `Subject` guarantees the length fits one byte.
    out.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(name);
    out.extend_from_slice(&key_version.to_be_bytes());
    out
}

/// The associated data of a seal: header, then the caller's context.
pub(crate) fn aad(header_bytes: &[u8], context: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header_bytes.len() + context.len());
    aad.extend_from_slice(header_bytes);
    aad.extend_from_slice(context);
    aad
}

/// Reads the header from the first bytes of a sealed blob (a prefix is enough: the
/// nonce and ciphertext need not be there).
pub fn header_only(bytes: &[u8]) -> Result<SealedHeader, KeyError> {
    let malformed = |what: &str| KeyError::Malformed(what.to_owned());
    if !is_sealed(bytes) {
        return Err(malformed("no VMQS magic and format 1"));
    }
    let len_at = MAGIC.len() + 1;
    let name_len = usize::from(*bytes.get(len_at).ok_or_else(|| malformed("truncated"))?);
    let name_end = len_at + 1 + name_len;
    let version = bytes
        .get(name_end..name_end + 4)
        .ok_or_else(|| malformed("truncated"))?;
    let name = std::str::from_utf8(&bytes[len_at + 1..name_end])
        .map_err(|_| malformed("subject is not ASCII"))?;
    Ok(SealedHeader {
        subject: Subject::new(name)?,
        key_version: u32::from_be_bytes([version[0], version[1], version[2], version[3]]),
    })
}

/// Reads the header of a sealed blob without opening it.
pub fn header(bytes: &[u8]) -> Result<SealedHeader, KeyError> {
    parse(bytes).map(|p| p.header)
}

pub(crate) fn parse(bytes: &[u8]) -> Result<Parsed<'_>, KeyError> {
    let malformed = |what: &str| KeyError::Malformed(what.to_owned());
    if !is_sealed(bytes) {
        return Err(malformed("no VMQS magic and format 1"));
    }
    let len_at = MAGIC.len() + 1;
    let name_len = usize::from(*bytes.get(len_at).ok_or_else(|| malformed("truncated"))?);
    if name_len == 0 || name_len > MAX_SUBJECT_LEN {
        return Err(malformed("subject length out of range"));
    }
    let name_end = len_at + 1 + name_len;
    let version_end = name_end + 4;
    let nonce_end = version_end + NONCE_LEN;
    if bytes.len() < nonce_end + TAG_LEN {
        return Err(malformed("truncated"));
    }
    let name = std::str::from_utf8(&bytes[len_at + 1..name_end])
        .map_err(|_| malformed("subject is not ASCII"))?;
    let subject = Subject::new(name)?;
    let mut version = [0u8; 4];
    version.copy_from_slice(&bytes[name_end..version_end]);
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&bytes[version_end..nonce_end]);
    Ok(Parsed {
        header: SealedHeader {
            subject,
            key_version: u32::from_be_bytes(version),
        },
        header_bytes: &bytes[..version_end],
        nonce,
        ciphertext_and_tag: &bytes[nonce_end..],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(subject: &str, version: u32, body: &[u8]) -> Vec<u8> {
        let mut out = header_bytes(&Subject::new(subject).expect("subject"), version);
        out.extend_from_slice(&[7u8; NONCE_LEN]);
        out.extend_from_slice(body);
        out.extend_from_slice(&[0u8; TAG_LEN]);
        out
    }

    #[test]
    fn header_round_trips() {
        let bytes = blob("pt-7f3a9c2e", 3, b"ciphertext");
        let parsed = parse(&bytes).expect("parse");
        assert_eq!(parsed.header.subject.as_str(), "pt-7f3a9c2e");
        assert_eq!(parsed.header.key_version, 3);
        assert_eq!(parsed.nonce, [7u8; NONCE_LEN]);
        assert_eq!(
            parsed.ciphertext_and_tag.len(),
            b"ciphertext".len() + TAG_LEN
        );
    }

    #[test]
    fn plaintext_json_and_cose_are_not_sealed() {
        assert!(!is_sealed(br#"{"event_id":"ev1-..."}"#));
        assert!(!is_sealed(&[0xd2, 0x84, 0x43]));
        assert!(!is_sealed(b"VMQS"));
    }

    #[test]
    fn truncated_and_bad_headers_are_malformed() {
        let bytes = blob("pt-7f3a9c2e", 1, b"");
        for cut in 0..bytes.len() - 1 {
            assert!(parse(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut zero_len = bytes.clone();
        zero_len[5] = 0;
        assert!(parse(&zero_len).is_err());
        let mut odd = bytes;
        odd[6] = b' ';
        assert!(parse(&odd).is_err());
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..128)) {
            let mut with_magic = b"VMQS\x01".to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = parse(&bytes);
            let _ = parse(&with_magic);
        }
    }
}
