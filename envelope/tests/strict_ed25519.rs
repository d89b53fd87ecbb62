//! vitalmq's strict Ed25519 check (AWS-LC plus the small-order rules, see `keys.rs`)
//! against the definition the SPEC names: ed25519-dalek's `verify_strict`. Every case
//! asserts that both give the same verdict, on signatures only a key holder can make as
//! well as on tampered ones.

use curve25519_dalek::constants::{ED25519_BASEPOINT_POINT, EIGHT_TORSION};
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use ed25519_dalek::hazmat::ExpandedSecretKey;
use ed25519_dalek::{Signer as _, SigningKey};
use proptest::prelude::*;
use sha2::{Digest as _, Sha512};
use vitalmq_envelope::{Algorithm, KeyError, VerifyingKey};

/// The order of the prime subgroup, little endian.
const ELL: [u8; 32] = [
    0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];

fn signing_key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// Both verdicts for one (key, message, signature); panics if they differ.
fn verdict(key: &SigningKey, message: &[u8], signature: &[u8; 64]) -> bool {
    let dalek = key
        .verifying_key()
        .verify_strict(message, &ed25519_dalek::Signature::from_bytes(signature))
        .is_ok();
    let ours = VerifyingKey::from_bytes(Algorithm::EdDsa, key.verifying_key().as_bytes())
        .expect("a generated key is valid")
        .verify(message, signature)
        .is_ok();
    assert_eq!(
        ours,
        dalek,
        "verdicts differ for signature {}",
        hex::encode(signature)
    );
    ours
}

/// `k = SHA-512(R || A || M) mod l`, as both verifiers compute it.
fn challenge(r: &[u8; 32], a: &[u8; 32], message: &[u8]) -> Scalar {
    let digest: [u8; 64] = Sha512::new()
        .chain_update(r)
        .chain_update(a)
        .chain_update(message)
        .finalize()
        .into();
    Scalar::from_bytes_mod_order_wide(&digest)
}

/// A signature whose `R` is `r_bytes` exactly, with `S = r + k a` made by the key
/// holder: the cofactorless equation holds for `R = [r]B` whatever extra component the
/// encoding carries.
fn signature_with_r(key: &SigningKey, r: Scalar, r_bytes: [u8; 32], message: &[u8]) -> [u8; 64] {
    let a = ExpandedSecretKey::from(key.as_bytes()).scalar;
    let k = challenge(&r_bytes, key.verifying_key().as_bytes(), message);
    let s = r + k * a;
    let mut sig = [0u8; 64];
    sig[..32].copy_from_slice(&r_bytes);
    sig[32..].copy_from_slice(s.as_bytes());
    sig
}

#[test]
fn valid_signatures_verify_in_both() {
    for seed in 1..=20u8 {
        let key = signing_key(seed);
        let message = vec![seed; usize::from(seed) * 13];
        assert!(verdict(&key, &message, &key.sign(&message).to_bytes()));
    }
}

/// The torsion trick: `R' = [r]B + T`. Cofactored and batch verifiers accept some of
/// these; strict ones accept only `T = 0`.
#[test]
fn a_torsion_component_in_r_is_refused_as_in_dalek() {
    let key = signing_key(7);
    let message = b"torsion";
    let r = Scalar::from_bytes_mod_order([42; 32]);
    for (i, t) in EIGHT_TORSION.iter().enumerate() {
        let r_point: EdwardsPoint = ED25519_BASEPOINT_POINT * r + t;
        let sig = signature_with_r(&key, r, r_point.compress().to_bytes(), message);
        assert_eq!(verdict(&key, message, &sig), i == 0, "torsion point {i}");
    }
}

/// `R` of small order with an equation that holds (`r = 0`, so `[S]B - [k]A` is the
/// identity): only the small-order rule refuses it; AWS-LC alone would accept.
#[test]
fn a_small_order_r_is_refused_even_when_the_equation_holds() {
    let key = signing_key(9);
    let message = b"small order R";
    let identity = EdwardsPoint::default().compress().to_bytes();
    let sig = signature_with_r(&key, Scalar::ZERO, identity, message);
    assert!(!verdict(&key, message, &sig));
    // Every small-order encoding as R, with S made over it.
    for t in EIGHT_TORSION {
        let sig = signature_with_r(&key, Scalar::ZERO, t.compress().to_bytes(), message);
        assert!(!verdict(&key, message, &sig));
    }
}

/// `y + p` and the "negative zero" sign bit: encodings of the identity that are not
/// canonical. dalek decodes them; AWS-LC's computed encoding never equals them.
#[test]
fn non_canonical_r_encodings_are_refused_in_both() {
    let key = signing_key(11);
    let message = b"non-canonical R";
    // p = 2^255 - 19; y = 1 + p = 2^255 - 18, little endian.
    let mut y_plus_p = [0xff; 32];
    y_plus_p[0] = 0xee;
    y_plus_p[31] = 0x7f;
    let mut negative_zero = EdwardsPoint::default().compress().to_bytes();
    negative_zero[31] |= 0x80;
    for r_bytes in [y_plus_p, negative_zero] {
        let sig = signature_with_r(&key, Scalar::ZERO, r_bytes, message);
        assert!(!verdict(&key, message, &sig));
    }
}

/// `S + l` verifies the same equation but is not canonical: both refuse it.
#[test]
fn a_non_canonical_s_is_refused_in_both() {
    let key = signing_key(13);
    let message = b"malleable";
    let mut sig = key.sign(message).to_bytes();
    let mut carry = 0u16;
    for i in 0..32 {
        let sum = u16::from(sig[32 + i]) + u16::from(ELL[i]) + carry;
        sig[32 + i] = sum as u8;
        carry = sum >> 8;
    }
    assert_eq!(carry, 0, "S + l fits 256 bits");
    assert!(!verdict(&key, message, &sig));
}

/// Keys are checked at load: small order and non-canonical encodings are refused, so
/// the two libraries never meet a key they would decode differently.
#[test]
fn weak_and_non_canonical_keys_are_refused_at_load() {
    for t in EIGHT_TORSION {
        assert_eq!(
            VerifyingKey::from_bytes(Algorithm::EdDsa, t.compress().as_bytes()),
            Err(KeyError::WeakOrInvalidEd25519)
        );
    }
    // A point with a small y (< 19) not of small order has a second encoding, y + p.
    let mut found = false;
    for y in 2u8..19 {
        let mut canonical = [0u8; 32];
        canonical[0] = y;
        let Some(point) = CompressedEdwardsY(canonical).decompress() else {
            continue;
        };
        if point.is_small_order() {
            continue;
        }
        // y + p = y - 19 + 2^255, little endian, top bit (the sign of x) clear.
        let mut plus_p = [0xff; 32];
        plus_p[0] = 0xed + y;
        plus_p[31] = 0x7f;
        assert!(
            ed25519_dalek::VerifyingKey::from_bytes(&plus_p).is_ok(),
            "dalek decodes y + p"
        );
        assert_eq!(
            VerifyingKey::from_bytes(Algorithm::EdDsa, &plus_p),
            Err(KeyError::WeakOrInvalidEd25519)
        );
        assert!(VerifyingKey::from_bytes(Algorithm::EdDsa, &canonical).is_ok());
        found = true;
    }
    assert!(found, "some y below 19 is a point of large order");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any byte of a valid signature or message changed: the same verdict in both.
    #[test]
    fn tampered_signatures_get_the_same_verdict(
        seed in 1u8..=255,
        message in proptest::collection::vec(any::<u8>(), 0..300),
        position in 0usize..64,
        xor in 1u8..=255,
        tamper_message in any::<bool>(),
    ) {
        let key = signing_key(seed);
        let mut sig = key.sign(&message).to_bytes();
        let mut message = message;
        if tamper_message && !message.is_empty() {
            let i = position % message.len();
            message[i] ^= xor;
        } else {
            sig[position] ^= xor;
        }
        prop_assert!(!verdict(&key, &message, &sig));
    }

    /// Random `R` and `S` bytes (most are not points, or not canonical).
    #[test]
    fn random_signatures_get_the_same_verdict(sig in proptest::array::uniform32(any::<u8>()), s in proptest::array::uniform32(any::<u8>())) {
        let key = signing_key(3);
        let mut full = [0u8; 64];
        full[..32].copy_from_slice(&sig);
        full[32..].copy_from_slice(&s);
        verdict(&key, b"random", &full);
    }
}
