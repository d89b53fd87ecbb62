//! Data keys for encryption at rest, and erasure by destroying them (crypto-shredding).
//!
//! Every patient-linked payload vitalmq keeps (raw COSE bytes, normalized events, alert
//! bodies, object-sink contents) is sealed with AES-256-GCM under a data key of its
//! *subject*: the patient's care pseudonym (`pt-...`), or a system subject such as
//! `sys:quarantine` for data no patient is attributed to. Erasing a patient destroys the
//! patient's data keys; every copy of the ciphertext, in the store, in objects and in
//! backups, becomes unreadable at once, while audit chains (hashes and ids only) still
//! verify.
//!
//! Three pieces, one module each:
//!
//! - [`provider`]: the [`KeyProvider`] trait, which wraps and unwraps data keys under a
//!   versioned key-encryption key (KEK) it never hands out, and [`LocalKeyFile`], the
//!   default provider (an owner-only key file). A cloud KMS implements the same trait.
//! - [`sealed`]: the self-describing sealed format (magic, subject, key version, nonce,
//!   ciphertext and tag), pure functions without I/O.
//! - [`keyring`](mod@keyring): [`Keyring`], the wrapped data keys and erasure tombstones
//!   in their own SQLite file (`keyring.sqlite3`), apart from the store. That separation
//!   is what makes erasure reach backups: a store backup holds ciphertext only, and the
//!   key it needs is gone from the keyring after the erasure.
//!
//! - [`secret_file`]: service private keys (TLS, audit signing) sealed under the
//!   provider's KEK, read through [`read_secret`] whatever their form.
//!
//! Rotation: [`Keyring::rotate`] starts a new data-key version for a subject (new data is
//! sealed under it, old data still opens under the old version); a KEK rotation
//! ([`LocalKeyFile::rotate`] then [`Keyring::rewrap_all`]) re-wraps every data key under
//! the new KEK version without touching any ciphertext.

#[cfg(feature = "store")]
pub mod keyring;
pub mod provider;
pub mod sealed;
pub mod secret_file;
mod subject;

#[cfg(feature = "store")]
pub use keyring::{CHECKPOINT_WITHIN, Erasure, Keyring, Tombstone, checkpoint_wal_with};
pub use provider::{DataKey, KeyProvider, LocalKeyFile, WrappedKey};
pub use sealed::{SealedHeader, is_sealed};
pub use secret_file::{read_secret, seal_file};
pub use subject::Subject;

/// File name of the keyring inside a data directory, when the configuration names no
/// other place.
pub const KEYRING_FILE: &str = "keyring.sqlite3";

/// Why a key operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The subject was erased: its data keys are destroyed and its data is unreadable
    /// for good. Not a fault; readers report the data as erased.
    #[error("subject {subject} was erased at {erased_at_ms} ms (data keys destroyed)")]
    Erased { subject: String, erased_at_ms: u64 },
    /// No data key of this version exists and the subject was not erased: the keyring
    /// does not belong to this data (or was restored from an older copy).
    #[error("no data key version {version} for subject {subject} in this keyring")]
    UnknownKey { subject: String, version: u32 },
    /// The key provider has no key-encryption key of this version.
    #[error("the key provider has no key-encryption key version {version}")]
    UnknownKek { version: u32 },
    /// Authentication failed: the ciphertext, its header or its context was altered, or
    /// the key is not the one it was sealed with.
    #[error("sealed data does not authenticate ({what}): altered, or sealed for another context")]
    Unauthentic { what: &'static str },
    /// Bytes that are not a sealed blob of this format.
    #[error("not sealed data: {0}")]
    Malformed(String),
    #[error("invalid subject {0:?}: 1 to 64 of [0-9A-Za-z._:-]")]
    InvalidSubject(String),
    #[error("{path}: {detail}")]
    KeyFile { path: String, detail: String },
    #[cfg(feature = "store")]
    #[error("keyring {path}: {source}")]
    Sqlite {
        path: String,
        source: rusqlite::Error,
    },
    #[error("keyring {path}: migrating its schema: {detail}")]
    Migration { path: String, detail: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The system's random source or the cipher failed (should not happen).
    #[error("cryptographic operation failed: {0}")]
    Crypto(&'static str),
}
