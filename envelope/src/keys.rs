//! Signature algorithms, device keys and the key-lookup seam.
//!
//! Verification keys are parsed and validated once, when a registry is loaded, so the
//! per-message path never re-validates a point and never meets a weak key.
//!
//! # Strict Ed25519, computed by AWS-LC
//!
//! The SPEC's strict verification is ed25519-dalek's `verify_strict`: `S` canonical,
//! neither `A` nor `R` of small order, and the cofactorless equation, compared as the
//! canonical encoding of `[S]B - [k]A` against the bytes of `R`. AWS-LC's `ED25519_verify`
//! (formally verified s2n-bignum arithmetic, about 1.27x dalek's rate on this project's
//! machines) checks all of that except the two small-order rules, so they are added here:
//! `A` when the key is loaded (with its encoding required to be canonical, so that both
//! libraries hash and decode the same key), `R` per message against the eight canonical
//! encodings of the small-order points. A non-canonical `R` never equals the encoding
//! AWS-LC computes, so it fails as in dalek. `tests/strict_ed25519.rs` compares both on
//! valid, tampered, torsion-carrying and small-order signatures.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;

use aws_lc_rs::signature as lc_sig;
use ring::signature::{self as ring_sig, KeyPair as _};

use crate::DeviceId;

/// The two algorithms of the profile (SPEC section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Algorithm {
    /// EdDSA with Ed25519 only, COSE id -8, verified strictly.
    #[serde(rename = "EdDSA")]
    EdDsa,
    /// ECDSA P-256 with SHA-256, COSE id -7, signature as raw `r || s`.
    #[serde(rename = "ES256")]
    Es256,
}

impl Algorithm {
    /// The COSE algorithm identifier.
    pub const fn cose_id(self) -> i64 {
        match self {
            Self::EdDsa => -8,
            Self::Es256 => -7,
        }
    }

    pub fn from_cose_id(id: i64) -> Option<Self> {
        match id {
            -8 => Some(Self::EdDsa),
            -7 => Some(Self::Es256),
            _ => None,
        }
    }

    /// The name used in the registry, the CLI and JSON output.
    pub const fn name(self) -> &'static str {
        match self {
            Self::EdDsa => "EdDSA",
            Self::Es256 => "ES256",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Algorithm {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "EdDSA" | "eddsa" | "Ed25519" | "ed25519" => Ok(Self::EdDsa),
            "ES256" | "es256" => Ok(Self::Es256),
            other => Err(KeyError::UnknownAlgorithm(other.escape_debug().to_string())),
        }
    }
}

/// Why key material was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("unknown algorithm `{0}` (expected EdDSA or ES256)")]
    UnknownAlgorithm(String),
    #[error("{alg} public key must be {expected} bytes, got {got}")]
    Length {
        alg: Algorithm,
        expected: usize,
        got: usize,
    },
    #[error("Ed25519 public key is not a canonically encoded point or has small order")]
    WeakOrInvalidEd25519,
    #[error("ES256 public key is not an uncompressed point on P-256")]
    InvalidP256Point,
    #[error("private key: {0}")]
    Private(String),
}

/// A device's public key, validated for its algorithm.
#[derive(Clone, PartialEq, Eq)]
pub enum VerifyingKey {
    Ed25519(ed25519_dalek::VerifyingKey),
    /// The uncompressed SEC1 point `04 || x || y`, checked to lie on P-256.
    Es256(Box<P256Key>),
}

/// A P-256 public key: its uncompressed SEC1 point, and AWS-LC's parsed form of it, so
/// that a verification does not decode and check the point again (about 10% of an
/// ES256 verify).
#[derive(Clone)]
pub struct P256Key {
    point: [u8; 65],
    parsed: lc_sig::ParsedPublicKey,
}

impl P256Key {
    /// `04 || x || y`.
    pub fn point(&self) -> &[u8; 65] {
        &self.point
    }
}

impl fmt::Debug for P256Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "P256Key({})", hex::encode(self.point))
    }
}

impl PartialEq for P256Key {
    fn eq(&self, other: &Self) -> bool {
        self.point == other.point
    }
}

impl Eq for P256Key {}

impl VerifyingKey {
    /// Parses a public key: 32 bytes for Ed25519; the 65-byte uncompressed SEC1 point
    /// for ES256. Small-order or non-canonically encoded Ed25519 keys and points off the
    /// curve are refused.
    pub fn from_bytes(alg: Algorithm, bytes: &[u8]) -> Result<Self, KeyError> {
        match alg {
            Algorithm::EdDsa => {
                let raw: &[u8; 32] = bytes.try_into().map_err(|_| KeyError::Length {
                    alg,
                    expected: 32,
                    got: bytes.len(),
                })?;
                let key = ed25519_dalek::VerifyingKey::from_bytes(raw)
                    .map_err(|_| KeyError::WeakOrInvalidEd25519)?;
                if key.is_weak() || key.to_edwards().compress().as_bytes() != raw {
                    return Err(KeyError::WeakOrInvalidEd25519);
                }
                Ok(Self::Ed25519(key))
            }
            Algorithm::Es256 => {
                let raw: [u8; 65] = bytes.try_into().map_err(|_| KeyError::Length {
                    alg,
                    expected: 65,
                    got: bytes.len(),
                })?;
                if raw[0] != 0x04 {
                    return Err(KeyError::InvalidP256Point);
                }
                // AWS-LC's parse checks that the point lies on the curve.
                let parsed = lc_sig::ParsedPublicKey::new(&lc_sig::ECDSA_P256_SHA256_FIXED, raw)
                    .map_err(|_| KeyError::InvalidP256Point)?;
                Ok(Self::Es256(Box::new(P256Key { point: raw, parsed })))
            }
        }
    }

    /// Parses the hex form used by the registry and the CLI.
    pub fn from_hex(alg: Algorithm, hex_str: &str) -> Result<Self, KeyError> {
        let bytes = hex::decode(hex_str.trim()).map_err(|_| KeyError::Length {
            alg,
            expected: if alg == Algorithm::EdDsa { 32 } else { 65 },
            got: 0,
        })?;
        Self::from_bytes(alg, &bytes)
    }

    pub fn algorithm(&self) -> Algorithm {
        match self {
            Self::Ed25519(_) => Algorithm::EdDsa,
            Self::Es256(_) => Algorithm::Es256,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Self::Ed25519(key) => key.to_bytes().to_vec(),
            Self::Es256(key) => key.point.to_vec(),
        }
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.to_bytes())
    }

    /// Verifies `signature` over `message`. Ed25519 is strict, with the semantics of
    /// ed25519-dalek's `verify_strict` (module docs); ES256 wants exactly 64 bytes of
    /// `r || s`. Both are computed by AWS-LC.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), BadSignature> {
        match self {
            Self::Ed25519(key) => {
                let raw: &[u8; 64] = signature
                    .try_into()
                    .map_err(|_| BadSignature::Ed25519Length)?;
                if SMALL_ORDER_ENCODINGS.iter().any(|r| raw[..32] == r[..]) {
                    return Err(BadSignature::Ed25519SmallOrder);
                }
                lc_sig::UnparsedPublicKey::new(&lc_sig::ED25519, key.as_bytes())
                    .verify(message, raw)
                    .map_err(|_| BadSignature::Ed25519)
            }
            Self::Es256(key) => {
                if signature.len() != 64 {
                    return Err(BadSignature::Es256Length);
                }
                key.parsed
                    .verify_sig(message, signature)
                    .map_err(|_| BadSignature::Es256)
            }
        }
    }
}

/// Why a signature does not verify under a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadSignature {
    #[error("Ed25519 signature is not 64 bytes")]
    Ed25519Length,
    #[error("Ed25519 signature does not verify (strict): R has small order")]
    Ed25519SmallOrder,
    #[error("Ed25519 signature does not verify (strict)")]
    Ed25519,
    #[error("ES256 signature is not 64 bytes of raw r || s")]
    Es256Length,
    #[error("ES256 signature does not verify")]
    Es256,
}

/// The canonical encodings of the eight points of small order, taken from
/// curve25519-dalek's torsion subgroup: what `verify_strict` refuses as `R`.
static SMALL_ORDER_ENCODINGS: LazyLock<[[u8; 32]; 8]> = LazyLock::new(|| {
    curve25519_dalek::constants::EIGHT_TORSION.map(|point| point.compress().to_bytes())
});

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifyingKey({}, {})", self.algorithm(), self.to_hex())
    }
}

/// A device's private COSE signing key (held by devices and the simulator, never by
/// the bridge).
// The Ed25519 variant is a few hundred bytes; there is one key per device, so boxing it
// would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum SigningKey {
    Ed25519(ed25519_dalek::SigningKey),
    Es256(Box<Es256Signer>),
}

/// A P-256 key: `ring` signs (fast, constant time), the scalar is kept for export.
pub struct Es256Signer {
    pair: ring_sig::EcdsaKeyPair,
    secret: p256::SecretKey,
}

impl SigningKey {
    /// A fresh random key.
    pub fn generate(alg: Algorithm) -> Result<Self, KeyError> {
        match alg {
            Algorithm::EdDsa => {
                let mut seed = [0u8; 32];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
                    .map_err(|_| KeyError::Private("system randomness unavailable".into()))?;
                Ok(Self::Ed25519(ed25519_dalek::SigningKey::from_bytes(&seed)))
            }
            Algorithm::Es256 => {
                let secret = p256::SecretKey::random(&mut rand_core::OsRng);
                Self::from_private_bytes(alg, &secret.to_bytes())
            }
        }
    }

    /// From the raw private scalar: the 32-byte RFC 8032 seed for Ed25519, the 32-byte
    /// big-endian `d` for P-256.
    pub fn from_private_bytes(alg: Algorithm, bytes: &[u8]) -> Result<Self, KeyError> {
        let raw: &[u8; 32] = bytes
            .try_into()
            .map_err(|_| KeyError::Private(format!("{alg} private key must be 32 bytes")))?;
        match alg {
            Algorithm::EdDsa => Ok(Self::Ed25519(ed25519_dalek::SigningKey::from_bytes(raw))),
            Algorithm::Es256 => {
                let secret = p256::SecretKey::from_slice(raw)
                    .map_err(|_| KeyError::Private("P-256 scalar out of range".into()))?;
                let point = p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(
                    &secret.public_key(),
                    false,
                );
                ring_sig::EcdsaKeyPair::from_private_key_and_public_key(
                    &ring_sig::ECDSA_P256_SHA256_FIXED_SIGNING,
                    raw,
                    point.as_bytes(),
                    &ring::rand::SystemRandom::new(),
                )
                .map(|pair| Self::Es256(Box::new(Es256Signer { pair, secret })))
                .map_err(|e| KeyError::Private(format!("P-256 key rejected: {e}")))
            }
        }
    }

    /// Reads a PKCS#8 PEM private key ("PRIVATE KEY"), as `certs` writes them.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, KeyError> {
        use ed25519_dalek::pkcs8::DecodePrivateKey as _;
        if let Ok(key) = ed25519_dalek::SigningKey::from_pkcs8_pem(pem) {
            return Ok(Self::Ed25519(key));
        }
        let secret = <p256::SecretKey as p256::pkcs8::DecodePrivateKey>::from_pkcs8_pem(pem)
            .map_err(|_| {
                KeyError::Private("not a PKCS#8 PEM Ed25519 or P-256 private key".into())
            })?;
        Self::from_private_bytes(Algorithm::Es256, &secret.to_bytes())
    }

    /// Writes the key as PKCS#8 PEM, readable by openssl and pycose. Ed25519 keys use
    /// the version 1 form (RFC 8410, seed only): OpenSSL 3.0 cannot read the v2 form
    /// with the public key attached. [`Self::from_pkcs8_pem`] reads both.
    pub fn to_pkcs8_pem(&self) -> Result<String, KeyError> {
        let pem = match self {
            Self::Ed25519(key) => {
                use ed25519_dalek::pkcs8::{EncodePrivateKey as _, KeypairBytes};
                KeypairBytes {
                    secret_key: key.to_bytes(),
                    public_key: None,
                }
                .to_pkcs8_pem(Default::default())
            }
            Self::Es256(signer) => {
                use p256::pkcs8::EncodePrivateKey as _;
                signer.secret.to_pkcs8_pem(Default::default())
            }
        };
        pem.map(|pem| pem.to_string())
            .map_err(|e| KeyError::Private(e.to_string()))
    }

    pub fn algorithm(&self) -> Algorithm {
        match self {
            Self::Ed25519(_) => Algorithm::EdDsa,
            Self::Es256(_) => Algorithm::Es256,
        }
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        match self {
            Self::Ed25519(key) => VerifyingKey::Ed25519(key.verifying_key()),
            Self::Es256(signer) => {
                VerifyingKey::from_bytes(Algorithm::Es256, signer.pair.public_key().as_ref())
                    .expect("ring's P-256 public key is an uncompressed point on the curve")
            }
        }
    }

    /// Signs `message`: 64 bytes, `R || S` for Ed25519 and raw `r || s` for ES256.
    pub(crate) fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        match self {
            Self::Ed25519(key) => {
                use ed25519_dalek::Signer as _;
                Ok(key.sign(message).to_bytes().to_vec())
            }
            Self::Es256(signer) => signer
                .pair
                .sign(&ring::rand::SystemRandom::new(), message)
                .map(|sig| sig.as_ref().to_vec())
                .map_err(|_| KeyError::Private("ES256 signing failed".into())),
        }
    }
}

impl fmt::Debug for Es256Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Es256Signer(<secret>)")
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({}, <secret>)", self.algorithm())
    }
}

/// Where a verifier finds the key for a `kid`: the device registry in the bridge, a
/// single key on the command line, a map in tests. The key always comes from here,
/// never from the message (SPEC section 3).
pub trait KeyLookup {
    /// The registered key of `device`, or `None` when the device is not registered.
    fn key_for(&self, device: &DeviceId) -> Option<&VerifyingKey>;
}

impl KeyLookup for HashMap<DeviceId, VerifyingKey> {
    fn key_for(&self, device: &DeviceId) -> Option<&VerifyingKey> {
        self.get(device)
    }
}

impl KeyLookup for BTreeMap<DeviceId, VerifyingKey> {
    fn key_for(&self, device: &DeviceId) -> Option<&VerifyingKey> {
        self.get(device)
    }
}

impl<T: KeyLookup + ?Sized> KeyLookup for &T {
    fn key_for(&self, device: &DeviceId) -> Option<&VerifyingKey> {
        (**self).key_for(device)
    }
}

impl<T: KeyLookup + ?Sized> KeyLookup for std::sync::Arc<T> {
    fn key_for(&self, device: &DeviceId) -> Option<&VerifyingKey> {
        (**self).key_for(device)
    }
}

/// One key that serves any `kid`: for `vitalmq envelope verify --pubkey-hex`, where
/// the integrator names the key, and `--kid` (if given) pins the device.
#[derive(Debug, Clone)]
pub struct AnyKid(pub VerifyingKey);

impl KeyLookup for AnyKid {
    fn key_for(&self, _device: &DeviceId) -> Option<&VerifyingKey> {
        Some(&self.0)
    }
}
