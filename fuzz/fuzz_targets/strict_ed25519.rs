//! vitalmq's strict Ed25519 check (AWS-LC plus the small-order rules, see
//! `envelope/src/keys.rs`) against the definition the SPEC names, ed25519-dalek's
//! `verify_strict`, on arbitrary input: the two verdicts must agree.
//!
//! Input: one mode byte, 64 signature bytes, then the message. Mode bit 0 clear: the 64
//! bytes are the signature as given (mostly refused, through every early exit). Set: a
//! valid signature over the message is XOR-ed with them, so an all-zero mask keeps it
//! valid and sparse masks explore near-valid signatures.
#![no_main]

use std::sync::LazyLock;

use ed25519_dalek::{Signer as _, SigningKey};
use libfuzzer_sys::fuzz_target;
use vitalmq_envelope::{Algorithm, VerifyingKey};

static KEYS: LazyLock<(SigningKey, VerifyingKey)> = LazyLock::new(|| {
    let signing = SigningKey::from_bytes(&[0x5a; 32]);
    let verifying = VerifyingKey::from_bytes(Algorithm::EdDsa, signing.verifying_key().as_bytes())
        .expect("a generated key is canonical and of large order");
    (signing, verifying)
});

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if rest.len() < 64 {
        return;
    }
    let (given, message) = rest.split_at(64);
    let (signing, ours) = &*KEYS;
    let mut signature = [0u8; 64];
    if mode & 1 == 0 {
        signature.copy_from_slice(given);
    } else {
        signature = signing.sign(message).to_bytes();
        for (byte, mask) in signature.iter_mut().zip(given) {
            *byte ^= mask;
        }
    }
    let dalek = signing
        .verifying_key()
        .verify_strict(message, &ed25519_dalek::Signature::from_bytes(&signature))
        .is_ok();
    let vitalmq = ours.verify(message, &signature).is_ok();
    assert_eq!(
        vitalmq, dalek,
        "verdicts differ: vitalmq {vitalmq}, dalek verify_strict {dalek}"
    );
});
