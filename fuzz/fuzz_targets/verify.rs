//! Arbitrary bytes through every entry point that reads a message from the network:
//! the strict CBOR scan, `inspect`, the profile verifier and the signature layer.
//!
//! Besides "never panics", it checks the invariants the bridge relies on: a refusal is
//! always one of the SPEC section 3 classes, and an accepted message is also accepted
//! by the bare signature layer under its registry key, can be inspected, and passed the
//! strict CBOR scan.
#![no_main]

use std::collections::HashMap;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use vitalmq_envelope::{
    Algorithm, DeviceId, KeyLookup as _, ReasonClass, VerifyingKey, cbor, inspect, verify,
    verify_signature_only,
};

/// Public keys of the shared vectors' registry (`keys.json`), so the seed corpus holds
/// messages that verify and mutations explore the paths past the signature.
const REGISTRY_KEYS: [(&str, Algorithm, &str); 4] = [
    (
        "dev-00042",
        Algorithm::EdDsa,
        "50163016231421c3895b50daa2c884654e188d01a090529bbddd36d151e50d2f",
    ),
    (
        "dev-00043",
        Algorithm::EdDsa,
        "67c9c67ae12603695c5c7ab629ff06a30834adc771977f4342002c3a552ed92d",
    ),
    (
        "dev-00077",
        Algorithm::Es256,
        "04c4ab6d767fb711b435f28bf142486b566c52f673a6e7c9c7895476600235086d\
         3df23c6dd102778d20ecd11b2620eaa4c8c49169811f067c44f0d8788be24a72",
    ),
    (
        "dev-00078",
        Algorithm::Es256,
        "0407050524e08543eb297e776b534f10c0567a9d3e3f12f62097ff2db7dddfe80d\
         54c2b180e7c77d4717a82344e307a84069d5747ba4924cc8dcae6aeea90ab11b",
    ),
];

static REGISTRY: LazyLock<HashMap<DeviceId, VerifyingKey>> = LazyLock::new(|| {
    REGISTRY_KEYS
        .iter()
        .map(|(kid, alg, public)| {
            // Constants copied from keys.json: valid ids and valid points.
            let id = DeviceId::new(*kid).expect("vector kid is a device id");
            let key = VerifyingKey::from_hex(*alg, public).expect("vector public key");
            (id, key)
        })
        .collect()
});

/// The topic device used for the `expected_device` variant of `verify`.
static TOPIC_DEVICE: LazyLock<DeviceId> =
    LazyLock::new(|| DeviceId::new("dev-00042").expect("constant device id"));

/// Classes `verify` may report; `duplicate` and `replay` belong to the sequence window.
const ENVELOPE_CLASSES: [ReasonClass; 7] = [
    ReasonClass::Oversized,
    ReasonClass::Malformed,
    ReasonClass::BadSignature,
    ReasonClass::UnknownKey,
    ReasonClass::KidMismatch,
    ReasonClass::AlgMismatch,
    ReasonClass::PayloadSchema,
];

fuzz_target!(|data: &[u8]| {
    let strict = cbor::check_single_item(data).is_ok();
    let inspected = inspect(data).is_ok();

    for key in REGISTRY.values() {
        if let Err(refusal) = verify_signature_only(data, key, &[]) {
            assert!(ENVELOPE_CLASSES.contains(&refusal.reason), "{refusal}");
        }
    }
    if let Err(refusal) = verify(data, &*REGISTRY, Some(&TOPIC_DEVICE)) {
        assert!(ENVELOPE_CLASSES.contains(&refusal.reason), "{refusal}");
    }
    match verify(data, &*REGISTRY, None) {
        Ok(verified) => {
            assert!(
                strict && inspected,
                "accepted but not strict CBOR / inspectable"
            );
            let key = REGISTRY
                .key_for(&verified.dev)
                .expect("an accepted message names a registered device");
            assert_eq!(key.algorithm(), verified.algorithm());
            assert!(
                verify_signature_only(data, key, &[]).is_ok(),
                "accepted by verify but not by the signature layer"
            );
        }
        Err(refusal) => assert!(ENVELOPE_CLASSES.contains(&refusal.reason), "{refusal}"),
    }
});
