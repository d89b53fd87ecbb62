//! Service private keys held under the key provider instead of in plaintext on disk.
//!
//! `vitalmq keys seal-file` turns a PEM private key into a sealed secret file: JSON
//! naming the provider that can open it and the secret wrapped under that provider's
//! KEK. Services read their private keys through [`read_secret`], which returns a
//! plaintext file's bytes as they are and opens a sealed one through its provider, so
//! a configuration keeps naming the same path whichever form the key is in.
//!
//! ```json
//! {"format": "vitalmq-sealed-secret/v1", "provider": {"local_key_file": "/etc/vitalmq/kek.json"},
//!  "kek_version": 1, "wrapped": "<base64 nonce, ciphertext and tag>"}
//! ```
//!
//! The wrap is bound to the context `secret-file` (a sealed secret cannot be passed off
//! as a wrapped data key, nor the reverse). A cloud KMS provider would add its own
//! variant of `provider` (a key id) beside `local_key_file`.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::KeyError;
use crate::provider::{KeyProvider, LocalKeyFile, WrappedKey};

const FORMAT: &str = "vitalmq-sealed-secret/v1";
const CONTEXT: &[u8] = b"secret-file";

#[derive(Serialize, Deserialize)]
struct SealedSecret {
    format: String,
    provider: ProviderRef,
    kek_version: u32,
    wrapped: String,
}

/// Which provider holds the KEK of a sealed secret.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ProviderRef {
    LocalKeyFile(PathBuf),
}

/// Whether `bytes` are a sealed secret file (as opposed to a plaintext PEM).
pub fn is_sealed_secret(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    text.trim_start().starts_with('{') && text.contains(FORMAT)
}

/// The bytes of a secret file: a plaintext file as it is, a sealed one opened through
/// the provider it names.
pub fn read_secret(path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let io = |source| KeyError::Io {
        path: path.display().to_string(),
        source,
    };
    let bytes = Zeroizing::new(std::fs::read(path).map_err(io)?);
    if !is_sealed_secret(&bytes) {
        return Ok(bytes);
    }
    let bad = |detail: String| KeyError::KeyFile {
        path: path.display().to_string(),
        detail,
    };
    let sealed: SealedSecret =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("sealed secret: {e}")))?;
    if sealed.format != FORMAT {
        return Err(bad(format!(
            "format {:?}, expected {FORMAT:?}",
            sealed.format
        )));
    }
    let wrapped = WrappedKey {
        kek_version: sealed.kek_version,
        bytes: base64::engine::general_purpose::STANDARD
            .decode(&sealed.wrapped)
            .map_err(|e| bad(format!("wrapped: {e}")))?,
    };
    let provider = match &sealed.provider {
        ProviderRef::LocalKeyFile(kek) => LocalKeyFile::load(kek)?,
    };
    provider.unwrap(CONTEXT, &wrapped)
}

/// Seals the secret in `input` under `kek` into a new file `output` (owner-only);
/// refuses to overwrite. The plaintext input is left for the operator to remove.
pub fn seal_file(kek: &LocalKeyFile, input: &Path, output: &Path) -> Result<(), KeyError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| KeyError::Io { path, source }
    };
    let secret = Zeroizing::new(std::fs::read(input).map_err(io(input))?);
    if is_sealed_secret(&secret) {
        return Err(KeyError::KeyFile {
            path: input.display().to_string(),
            detail: "is already sealed".into(),
        });
    }
    let wrapped = kek.wrap(CONTEXT, &secret)?;
    let kek_path = std::path::absolute(kek.path()).map_err(io(kek.path()))?;
    let doc = SealedSecret {
        format: FORMAT.to_owned(),
        provider: ProviderRef::LocalKeyFile(kek_path),
        kek_version: wrapped.kek_version,
        wrapped: base64::engine::general_purpose::STANDARD.encode(&wrapped.bytes),
    };
    let text = serde_json::to_string_pretty(&doc).map_err(|e| KeyError::KeyFile {
        path: output.display().to_string(),
        detail: e.to_string(),
    })?;
    let mut file = vitalmq_private_fs::create_options()
        .write(true)
        .create_new(true)
        .open(output)
        .map_err(io(output))?;
    file.write_all(text.as_bytes()).map_err(io(output))?;
    file.write_all(b"\n").map_err(io(output))?;
    file.sync_all().map_err(io(output))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &[u8] = b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ+not+a+real+key+at+all+xxxxxxxxxxxxxxx\n-----END PRIVATE KEY-----\n";

    #[test]
    fn a_sealed_key_reads_back_and_holds_no_plaintext() {
        let dir = tempfile::tempdir().expect("dir");
        let kek = LocalKeyFile::create(&dir.path().join("kek.json")).expect("kek");
        let plain = dir.path().join("key.pem");
        std::fs::write(&plain, PEM).expect("write");
        let sealed = dir.path().join("key.pem.sealed");
        seal_file(&kek, &plain, &sealed).expect("seal");
        let on_disk = std::fs::read(&sealed).expect("read");
        assert!(!on_disk.windows(20).any(|w| PEM.windows(20).any(|p| p == w)));
        assert_eq!(&*read_secret(&sealed).expect("open"), PEM);
        // A plaintext file reads as it is.
        assert_eq!(&*read_secret(&plain).expect("plain"), PEM);
        // Not twice, and never over an existing file.
        assert!(seal_file(&kek, &sealed, &dir.path().join("x")).is_err());
        assert!(seal_file(&kek, &plain, &sealed).is_err());
    }

    #[test]
    fn a_sealed_key_does_not_open_without_its_kek() {
        let dir = tempfile::tempdir().expect("dir");
        let kek_path = dir.path().join("kek.json");
        let kek = LocalKeyFile::create(&kek_path).expect("kek");
        let plain = dir.path().join("key.pem");
        std::fs::write(&plain, PEM).expect("write");
        let sealed = dir.path().join("key.pem.sealed");
        seal_file(&kek, &plain, &sealed).expect("seal");
        std::fs::remove_file(&kek_path).expect("rm");
        let err = read_secret(&sealed).expect_err("no kek");
        assert!(err.to_string().contains("kek.json"), "{err}");
    }
}
