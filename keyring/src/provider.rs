//! Key providers: who holds the key-encryption key (KEK).
//!
//! A provider wraps and unwraps secrets (data keys, service private keys) under a KEK it
//! never hands out. The trait is small so a cloud KMS (whose `Encrypt`/`Decrypt` calls
//! take a key id and an encryption context) can implement it: `context` maps to the
//! KMS encryption context, `version` to the KMS key version. [`LocalKeyFile`] is the
//! default: AES-256-GCM KEKs in an owner-only JSON file, one entry per version.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use aws_lc_rs::aead::{AES_256_GCM, Aad, Nonce, RandomizedNonceKey};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::KeyError;
use crate::sealed::NONCE_LEN;

/// Length of data keys and KEKs (AES-256).
pub const KEY_LEN: usize = 32;

/// A data key in memory; zeroed when dropped.
pub struct DataKey(Zeroizing<[u8; KEY_LEN]>);

impl DataKey {
    /// A fresh random key from the system's CSPRNG.
    pub fn generate() -> Result<Self, KeyError> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        aws_lc_rs::rand::fill(key.as_mut()).map_err(|_| KeyError::Crypto("random"))?;
        Ok(Self(key))
    }

    pub(crate) fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        if bytes.len() != KEY_LEN {
            return Err(KeyError::Malformed(format!(
                "a data key is {KEY_LEN} bytes, not {}",
                bytes.len()
            )));
        }
        key.copy_from_slice(bytes);
        Ok(Self(key))
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_ref()
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

/// A secret wrapped under one KEK version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    pub kek_version: u32,
    pub bytes: Vec<u8>,
}

/// Wraps and unwraps secrets under a key-encryption key that stays with the provider.
///
/// `context` binds a wrapped secret to what it is for (the keyring passes the subject
/// and data-key version): unwrapping under another context fails.
pub trait KeyProvider: Send + Sync + std::fmt::Debug {
    /// A short description for logs and audit records (never key material).
    fn describe(&self) -> String;
    /// The KEK version new wraps use.
    fn current_version(&self) -> u32;
    fn wrap(&self, context: &[u8], secret: &[u8]) -> Result<WrappedKey, KeyError>;
    fn unwrap(&self, context: &[u8], wrapped: &WrappedKey) -> Result<Zeroizing<Vec<u8>>, KeyError>;
}

const FORMAT: &str = "vitalmq-kek/v1";
const WRAP_LABEL: &[u8] = b"vitalmq-kek-wrap|";

#[derive(Serialize, Deserialize)]
struct KeyFileDoc {
    format: String,
    keys: Vec<KeyEntry>,
}

#[derive(Serialize, Deserialize)]
struct KeyEntry {
    version: u32,
    created_at_ms: u64,
    /// Base64 of the 32 key bytes.
    key: String,
}

/// KEK versions and their key bytes.
type Keks = Vec<(u32, Zeroizing<[u8; KEY_LEN]>)>;

/// The default provider: KEKs in an owner-only file (`vitalmq keys init`).
///
/// Unwrapping under a version this process has not loaded re-reads the file once, so a
/// KEK rotated by `vitalmq keys rotate-kek` while a service runs is picked up.
pub struct LocalKeyFile {
    path: PathBuf,
    keys: RwLock<Keks>,
}

impl std::fmt::Debug for LocalKeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalKeyFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn key_file_error(path: &Path, detail: impl Into<String>) -> KeyError {
    KeyError::KeyFile {
        path: path.display().to_string(),
        detail: detail.into(),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl LocalKeyFile {
    /// Makes a new key file with KEK version 1; refuses to overwrite one.
    pub fn create(path: &Path) -> Result<Self, KeyError> {
        if path.exists() {
            return Err(key_file_error(
                path,
                "exists; refusing to overwrite a key file (data wrapped under it would be lost)",
            ));
        }
        let key = DataKey::generate()?;
        let doc = KeyFileDoc {
            format: FORMAT.to_owned(),
            keys: vec![entry(1, &key)],
        };
        write_atomic(path, &doc)?;
        Self::load(path)
    }

    /// Loads a key file; refuses one other local users can read.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let keys = read_keys(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            keys: RwLock::new(keys),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds a new KEK version to the file (under the directory lock) and returns it.
    /// New wraps use it once a provider (re)loads the file; old versions stay so data
    /// keys wrapped under them still unwrap until [`crate::Keyring::rewrap_all`] moves
    /// them.
    pub fn rotate(path: &Path) -> Result<u32, KeyError> {
        let _lock = vitalmq_private_fs::lock_dir(vitalmq_private_fs::dir_of(path))
            .map_err(|e| key_file_error(path, e.to_string()))?;
        let text = read_private(path)?;
        let mut doc: KeyFileDoc =
            serde_json::from_str(&text).map_err(|e| key_file_error(path, e.to_string()))?;
        let next = doc.keys.iter().map(|k| k.version).max().unwrap_or(0) + 1;
        doc.keys.push(entry(next, &DataKey::generate()?));
        write_atomic(path, &doc)?;
        Ok(next)
    }

    fn reload(&self) -> Result<(), KeyError> {
        let keys = read_keys(&self.path)?;
        *self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = keys;
        Ok(())
    }

    fn with_kek<T>(
        &self,
        version: u32,
        f: impl FnOnce(&RandomizedNonceKey) -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        let find = |this: &Self| -> Option<Result<RandomizedNonceKey, KeyError>> {
            let keys = this
                .keys
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            keys.iter().find(|(v, _)| *v == version).map(|(_, key)| {
                RandomizedNonceKey::new(&AES_256_GCM, key.as_ref())
                    .map_err(|_| KeyError::Crypto("kek"))
            })
        };
        let key = match find(self) {
            Some(key) => key?,
            None => {
                self.reload()?;
                find(self).ok_or(KeyError::UnknownKek { version })??
            }
        };
        f(&key)
    }
}

fn entry(version: u32, key: &DataKey) -> KeyEntry {
    KeyEntry {
        version,
        created_at_ms: now_ms(),
        key: base64::engine::general_purpose::STANDARD.encode(key.as_bytes()),
    }
}

fn read_private(path: &Path) -> Result<String, KeyError> {
    let meta = std::fs::metadata(path).map_err(|e| key_file_error(path, e.to_string()))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(key_file_error(
            path,
            format!("is {mode:04o}, readable by other local users; a key file must be 0600"),
        ));
    }
    std::fs::read_to_string(path).map_err(|e| key_file_error(path, e.to_string()))
}

fn read_keys(path: &Path) -> Result<Keks, KeyError> {
    let text = Zeroizing::new(read_private(path)?);
    let doc: KeyFileDoc =
        serde_json::from_str(&text).map_err(|e| key_file_error(path, e.to_string()))?;
    if doc.format != FORMAT {
        return Err(key_file_error(
            path,
            format!("format is {:?}, expected {FORMAT:?}", doc.format),
        ));
    }
    if doc.keys.is_empty() {
        return Err(key_file_error(path, "holds no key"));
    }
    let mut keys = Vec::with_capacity(doc.keys.len());
    for k in &doc.keys {
        let bytes = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(&k.key)
                .map_err(|e| key_file_error(path, format!("version {}: {e}", k.version)))?,
        );
        let key = DataKey::from_slice(&bytes)
            .map_err(|e| key_file_error(path, format!("version {}: {e}", k.version)))?;
        if keys.iter().any(|(v, _)| *v == k.version) {
            return Err(key_file_error(
                path,
                format!("version {} appears twice", k.version),
            ));
        }
        keys.push((k.version, key.0));
    }
    Ok(keys)
}

/// Writes the key file through a temporary owner-only sibling, fsynced, renamed over.
fn write_atomic(path: &Path, doc: &KeyFileDoc) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: path.display().to_string(),
        source,
    };
    vitalmq_private_fs::create_parent(path).map_err(io)?;
    let text = Zeroizing::new(
        serde_json::to_string_pretty(doc).map_err(|e| key_file_error(path, e.to_string()))?,
    );
    let tmp = path.with_extension("tmp");
    let mut file = vitalmq_private_fs::create_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

fn wrap_aad(context: &[u8], version: u32) -> Vec<u8> {
    let mut aad = WRAP_LABEL.to_vec();
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(context);
    aad
}

impl KeyProvider for LocalKeyFile {
    fn describe(&self) -> String {
        format!("local key file {}", self.path.display())
    }

    fn current_version(&self) -> u32 {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(v, _)| *v)
            .max()
            .unwrap_or(0)
    }

    fn wrap(&self, context: &[u8], secret: &[u8]) -> Result<WrappedKey, KeyError> {
        let version = self.current_version();
        self.with_kek(version, |kek| {
            let mut in_out = secret.to_vec();
            let nonce = kek
                .seal_in_place_append_tag(Aad::from(wrap_aad(context, version)), &mut in_out)
                .map_err(|_| KeyError::Crypto("wrap"))?;
            let mut bytes = nonce.as_ref().to_vec();
            bytes.extend_from_slice(&in_out);
            Ok(WrappedKey {
                kek_version: version,
                bytes,
            })
        })
    }

    fn unwrap(&self, context: &[u8], wrapped: &WrappedKey) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        if wrapped.bytes.len() < NONCE_LEN {
            return Err(KeyError::Malformed("wrapped key too short".into()));
        }
        self.with_kek(wrapped.kek_version, |kek| {
            let (nonce, body) = wrapped.bytes.split_at(NONCE_LEN);
            let nonce = Nonce::try_assume_unique_for_key(nonce)
                .map_err(|_| KeyError::Malformed("nonce".into()))?;
            let mut in_out = Zeroizing::new(body.to_vec());
            let plain = kek
                .open_in_place(
                    nonce,
                    Aad::from(wrap_aad(context, wrapped.kek_version)),
                    &mut in_out,
                )
                .map_err(|_| KeyError::Unauthentic {
                    what: "wrapped data key",
                })?;
            Ok(Zeroizing::new(plain.to_vec()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_unwrap_round_trip_and_context_binding() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("kek.json");
        let kek = LocalKeyFile::create(&path).expect("create");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let wrapped = kek.wrap(b"pt-1|1", b"secret bytes").expect("wrap");
        assert_eq!(wrapped.kek_version, 1);
        assert_eq!(
            &*kek.unwrap(b"pt-1|1", &wrapped).expect("unwrap"),
            b"secret bytes"
        );
        assert!(matches!(
            kek.unwrap(b"pt-2|1", &wrapped),
            Err(KeyError::Unauthentic { .. })
        ));
        let mut tampered = wrapped.clone();
        let last = tampered.bytes.len() - 1;
        tampered.bytes[last] ^= 1;
        assert!(kek.unwrap(b"pt-1|1", &tampered).is_err());
    }

    #[test]
    fn refuses_to_overwrite_and_refuses_an_exposed_file() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("kek.json");
        LocalKeyFile::create(&path).expect("create");
        assert!(LocalKeyFile::create(&path).is_err());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = LocalKeyFile::load(&path).expect_err("exposed");
        assert!(err.to_string().contains("0644"), "{err}");
    }

    #[test]
    fn rotation_adds_a_version_and_old_wraps_still_unwrap() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("kek.json");
        let kek = LocalKeyFile::create(&path).expect("create");
        let old = kek.wrap(b"c", b"one").expect("wrap");
        assert_eq!(LocalKeyFile::rotate(&path).expect("rotate"), 2);
        // A running provider learns version 2 when it meets it.
        let reloaded = LocalKeyFile::load(&path).expect("load");
        let new = reloaded.wrap(b"c", b"two").expect("wrap");
        assert_eq!(new.kek_version, 2);
        assert_eq!(&*kek.unwrap(b"c", &new).expect("picked up"), b"two");
        assert_eq!(&*reloaded.unwrap(b"c", &old).expect("old"), b"one");
    }

    #[test]
    fn an_unknown_kek_version_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("dir");
        let kek = LocalKeyFile::create(&dir.path().join("kek.json")).expect("create");
        let wrapped = WrappedKey {
            kek_version: 9,
            bytes: vec![0; 40],
        };
        assert!(matches!(
            kek.unwrap(b"c", &wrapped),
            Err(KeyError::UnknownKek { version: 9 })
        ));
    }
}
