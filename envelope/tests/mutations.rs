//! Property tests of the verifier against its own signer.
//!
//! - Random telemetry, both algorithms, round-trips through `sign` -> `verify`
//!   unchanged, including `u64::MAX` counters; `alarm` and `status` messages carry
//!   random SPEC 3.1 keys of their kind.
//! - A signed message, mutated (bit flip, byte change, truncation, insertion, range
//!   deletion, append, swap), is never accepted and never panics, and the refusal is
//!   one of the classes SPEC section 3 gives the envelope layer.
//!
//! Signing keys are the shared vectors' (`keys.json`, `d`). Case counts are modest so
//! the suite takes seconds in a debug build; raise them with `PROPTEST_CASES=...`.

use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;

use ciborium::value::Value;
use proptest::prelude::*;
use proptest::sample::Index;
use vitalmq_envelope::{
    Alarm, AlarmCode, AlarmLevel, Algorithm, DeviceId, MessageType, Number, ReasonClass,
    SigningKey, StatusReport, Telemetry, VerifyingKey, inspect, sign, verify,
    verify_signature_only,
};

/// Private keys from `keys.json`: (kid, algorithm, d).
const KEYS: [(&str, Algorithm, &str); 4] = [
    (
        "dev-00042",
        Algorithm::EdDsa,
        "fd6d89b68975ad7c1243b8e578e3376d50a77a68be5d5aeebbb65fe0d61b3f9b",
    ),
    (
        "dev-00043",
        Algorithm::EdDsa,
        "823cfea5b86960f8e88b34640100c672710ccf309decf8c429871a0f8ac6664f",
    ),
    (
        "dev-00077",
        Algorithm::Es256,
        "2d9b4668dc23f4b7660ca7e8ff50ec70eb749cf19f3ee47de171f1df58902526",
    ),
    (
        "dev-00078",
        Algorithm::Es256,
        "ed22c5b71071b48b5af5e533e9050856aee92fa393049e4ef0fcf3b50b347387",
    ),
];

/// Parsed once: P-256 key set-up is slow in a debug build.
static SIGNERS: LazyLock<Vec<(DeviceId, SigningKey)>> = LazyLock::new(|| {
    KEYS.iter()
        .map(|(kid, alg, d)| {
            // Constants from keys.json: valid ids and in-range private keys.
            let id = DeviceId::new(*kid).expect("vector kid");
            let key = SigningKey::from_private_bytes(*alg, &hex::decode(d).expect("hex d"))
                .expect("vector private key");
            (id, key)
        })
        .collect()
});

static REGISTRY: LazyLock<HashMap<DeviceId, VerifyingKey>> = LazyLock::new(|| {
    SIGNERS
        .iter()
        .map(|(id, key)| (id.clone(), key.verifying_key()))
        .collect()
});

/// The classes `verify` may report; `duplicate` and `replay` are the sequence window's.
const ENVELOPE_CLASSES: [ReasonClass; 7] = [
    ReasonClass::Oversized,
    ReasonClass::Malformed,
    ReasonClass::BadSignature,
    ReasonClass::UnknownKey,
    ReasonClass::KidMismatch,
    ReasonClass::AlgMismatch,
    ReasonClass::PayloadSchema,
];

/// Counters over the full range, with the edges drawn often.
fn counter() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => Just(u64::MAX),
        1 => Just(0u64),
        1 => Just(u64::MAX - 1),
        1 => Just(1u64 << 32),
        6 => any::<u64>(),
    ]
}

fn number() -> impl Strategy<Value = Number> {
    prop_oneof![
        any::<i64>().prop_map(|i| Number::Int(i.into())),
        any::<u64>().prop_map(|u| Number::Int(u.into())),
        // CBOR's negative integers reach -2^64.
        Just(Number::Int(-(1i128 << 64))),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Number::Float),
    ]
}

fn extra_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(|i| Value::Integer(i.into())),
        "[ -~]{0,12}".prop_map(Value::Text),
        any::<bool>().prop_map(Value::Bool),
        proptest::collection::vec(any::<u8>(), 0..8).prop_map(Value::Bytes),
        // A nested map with distinct keys passes through.
        proptest::collection::btree_map("[a-z]{1,4}", any::<i64>(), 0..4).prop_map(|m| {
            Value::Map(
                m.into_iter()
                    .map(|(k, v)| (Value::Text(k), Value::Integer(v.into())))
                    .collect(),
            )
        }),
    ]
}

/// A valid SPEC 3.1 alarm.
fn alarm() -> impl Strategy<Value = Alarm> {
    (
        "[a-z0-9_-]{1,32}",
        prop_oneof![
            Just(AlarmLevel::Info),
            Just(AlarmLevel::Review),
            Just(AlarmLevel::Urgent)
        ],
        any::<bool>(),
        proptest::option::of("[ -~]{0,40}"),
    )
        .prop_map(|(code, level, active, detail)| Alarm {
            code: AlarmCode::new(code).expect("generated from the code alphabet"),
            level,
            active,
            detail,
        })
}

/// A valid SPEC 3.1 status report, every key optional.
fn status() -> impl Strategy<Value = StatusReport> {
    (
        proptest::option::of(0.0f64..=1.0),
        proptest::option::of(counter()),
        proptest::option::of(counter()),
        proptest::option::of(any::<bool>()),
    )
        .prop_map(|(battery, dropped, interval_s, charging)| StatusReport {
            battery,
            dropped,
            interval_s,
            charging,
        })
}

/// Random telemetry for signer `signer` (an index into [`SIGNERS`]).
fn telemetry() -> impl Strategy<Value = (usize, Telemetry)> {
    let kind = prop_oneof![
        Just(MessageType::Vitals),
        Just(MessageType::Status),
        Just(MessageType::Alarm),
    ];
    let m = proptest::collection::btree_map("[a-z][a-z0-9_]{0,7}", number(), 0..6);
    // Unknown keys start with `x-` so they never collide with a schema field.
    let extra = proptest::collection::btree_map("x-[a-z]{1,6}", extra_value(), 0..3);
    (
        (0..KEYS.len(), counter(), counter(), counter()),
        ("[ -~]{0,16}", kind, proptest::option::of(m)),
        (
            proptest::option::of(0.0f64..=1.0),
            proptest::option::of("[ -~]{0,20}"),
            proptest::option::of(counter()),
            extra,
        ),
        (alarm(), status()),
    )
        .prop_map(
            |(
                (signer, epoch, seq, ts),
                (fw, kind, m),
                (q, model, schema, mut extra),
                (alarm, status),
            )| {
                // `vitals` requires `m`; the others may carry it or not.
                let m = match (kind, m) {
                    (MessageType::Vitals, None) => Some(BTreeMap::new()),
                    (_, m) => m,
                };
                // SPEC 3.1: an alarm needs its keys; a status may carry its own.
                match kind {
                    MessageType::Alarm => extra.extend(alarm.to_fields()),
                    MessageType::Status => extra.extend(status.to_fields()),
                    MessageType::Vitals => {}
                }
                let telemetry = Telemetry {
                    dev: SIGNERS[signer].0.clone(),
                    epoch,
                    seq,
                    ts,
                    fw,
                    kind,
                    m,
                    q,
                    model,
                    schema,
                    extra,
                };
                (signer, telemetry)
            },
        )
}

/// One edit of a message. Positions are [`Index`]es, scaled to the message length.
#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    Truncate(Index),
    Insert(Index, Vec<u8>),
    DeleteRange(Index, usize),
    Append(Vec<u8>),
    Swap(Index, Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let bytes = || proptest::collection::vec(any::<u8>(), 1..9);
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(i, bit)| Mutation::FlipBit(i, bit)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        2 => (any::<Index>(), bytes()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (any::<Index>(), 1usize..24).prop_map(|(i, n)| Mutation::DeleteRange(i, n)),
        1 => bytes().prop_map(Mutation::Append),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
    ]
}

impl Mutation {
    fn apply(&self, message: &[u8]) -> Vec<u8> {
        let mut out = message.to_vec();
        let len = out.len();
        // `Index::index(0)` panics; on an empty (stacked-truncated) message only an
        // insertion or an append can change anything.
        if len == 0 && !matches!(self, Self::Insert(..) | Self::Append(_)) {
            return out;
        }
        match self {
            Self::FlipBit(i, bit) => out[i.index(len)] ^= 1 << bit,
            Self::SetByte(i, b) => out[i.index(len)] = *b,
            Self::Truncate(i) => out.truncate(i.index(len)),
            Self::Insert(i, bytes) => {
                let at = i.index(len + 1);
                out.splice(at..at, bytes.iter().copied());
            }
            Self::DeleteRange(i, n) => {
                let start = i.index(len);
                out.drain(start..(start + n).min(len));
            }
            Self::Append(bytes) => out.extend_from_slice(bytes),
            Self::Swap(a, b) => out.swap(a.index(len), b.index(len)),
        }
        out
    }
}

/// The unprotected header and the envelope shape are not signed, so an edit that only
/// re-encodes the unprotected map with the same meaning (0x18 inserted before a small
/// uint label: `04` -> `18 04`, a non-preferred but well-formed encoding of 4) leaves a
/// message that still verifies. The signed parts (protected bytes, payload, signature)
/// and the decoded headers must then be exactly the original's.
fn is_unprotected_reencoding(original: &[u8], mutated: &[u8]) -> bool {
    fn parts(message: &[u8]) -> Option<(Vec<Value>, Value)> {
        let Ok(Value::Tag(18, inner)) = ciborium::de::from_reader::<Value, _>(message) else {
            return None;
        };
        let Value::Array(mut items) = *inner else {
            return None;
        };
        if items.len() != 4 {
            return None;
        }
        let unprotected = items.remove(1);
        Some((items, unprotected))
    }
    match (parts(original), parts(mutated)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

fn assert_refused_class(result: Result<(), ReasonClass>) -> Result<(), TestCaseError> {
    if let Err(class) = result {
        prop_assert!(ENVELOPE_CLASSES.contains(&class), "class {class}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// sign -> verify returns the telemetry unchanged, with the key's algorithm and the
    /// hash of the exact bytes.
    #[test]
    fn valid_telemetry_round_trips((signer, telemetry) in telemetry()) {
        let (dev, key) = &SIGNERS[signer];
        let message = sign(&telemetry, key).expect("signing a valid telemetry record");
        let verified = verify(&message, &*REGISTRY, Some(dev))
            .map_err(|r| TestCaseError::fail(format!("refused: {r}")))?;
        prop_assert_eq!(verified.algorithm(), key.algorithm());
        prop_assert_eq!(verified.into_inner(), telemetry);
        prop_assert!(verify_signature_only(&message, &key.verifying_key(), &[]).is_ok());
        prop_assert!(inspect(&message).is_ok());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A mutated signed message is never accepted (beyond a same-meaning re-encoding of
    /// the unsigned header, see [`is_unprotected_reencoding`]) and never panics, and
    /// every refusal has an envelope class.
    #[test]
    fn mutated_messages_are_refused(
        (signer, telemetry) in telemetry(),
        mutations in proptest::collection::vec(mutation(), 1..6),
    ) {
        let (dev, key) = &SIGNERS[signer];
        let message = sign(&telemetry, key).expect("signing a valid telemetry record");
        for mutation in &mutations {
            let mutated = mutation.apply(&message);
            if mutated == message {
                continue;
            }
            for expected in [None, Some(dev)] {
                match verify(&mutated, &*REGISTRY, expected) {
                    Ok(verified) => {
                        prop_assert!(
                            is_unprotected_reencoding(&message, &mutated),
                            "{mutation:?} accepted: {}", hex::encode(&mutated)
                        );
                        prop_assert_eq!(verified.into_inner(), telemetry.clone());
                    }
                    Err(refusal) => {
                        assert_refused_class(Err(refusal.reason))?;
                    }
                }
            }
            // The other entry points must not panic on it either.
            let _ = inspect(&mutated);
            for verifying in REGISTRY.values() {
                assert_refused_class(
                    verify_signature_only(&mutated, verifying, &[]).map_err(|r| r.reason),
                )?;
            }
        }
    }

    /// A key repeated inside a pass-through map (at any depth) is `payload_schema`, as
    /// at the top level: the normalized event's JSON object would keep only one value.
    #[test]
    fn duplicate_keys_inside_pass_through_maps_are_refused(
        (signer, mut telemetry) in telemetry(),
        key in "[a-z]{1,4}",
        (first, second) in (any::<i64>(), any::<i64>()),
        nested in any::<bool>(),
    ) {
        let (dev, signing) = &SIGNERS[signer];
        let repeated = Value::Map(vec![
            (Value::Text(key.clone()), Value::Integer(first.into())),
            (Value::Text(key), Value::Integer(second.into())),
        ]);
        let value = if nested { Value::Array(vec![Value::Null, repeated]) } else { repeated };
        telemetry.extra.insert("x-dup".into(), value);
        let message = sign(&telemetry, signing).expect("signing");
        let refusal = verify(&message, &*REGISTRY, Some(dev)).expect_err("repeated key");
        prop_assert_eq!(refusal.reason, ReasonClass::PayloadSchema);
        prop_assert!(refusal.detail.contains("x-dup"), "{}", refusal.detail);
    }

    /// Stacking several edits on one message (not each alone) is never accepted either.
    #[test]
    fn stacked_mutations_are_refused(
        (signer, telemetry) in telemetry(),
        mutations in proptest::collection::vec(mutation(), 2..8),
    ) {
        let (_, key) = &SIGNERS[signer];
        let message = sign(&telemetry, key).expect("signing a valid telemetry record");
        let mutated = mutations.iter().fold(message.clone(), |m, edit| edit.apply(&m));
        prop_assume!(mutated != message);
        match verify(&mutated, &*REGISTRY, None) {
            Ok(_) => prop_assert!(
                is_unprotected_reencoding(&message, &mutated),
                "{mutations:?} accepted: {}", hex::encode(&mutated)
            ),
            Err(refusal) => assert_refused_class(Err(refusal.reason))?,
        }
    }
}

/// The found re-encoding case, pinned: a non-preferred encoding of the unprotected
/// `kid` label still verifies (the SPEC asks for definite lengths, not preferred
/// encoding, and the unprotected bucket is unsigned), with the original telemetry.
#[test]
fn unprotected_label_reencoding_is_not_a_forgery() {
    let (dev, key) = &SIGNERS[0];
    let telemetry = Telemetry {
        dev: dev.clone(),
        epoch: 1,
        seq: 2,
        ts: 3,
        fw: "1".into(),
        kind: MessageType::Status,
        m: None,
        q: None,
        model: None,
        schema: None,
        extra: BTreeMap::new(),
    };
    let message = sign(&telemetry, key).expect("signing");
    // d2 84 43 a10127 a1 04 49 <kid> ...: the unprotected map's label 4 is at byte 7.
    assert_eq!(
        &message[..8],
        &[0xd2, 0x84, 0x43, 0xa1, 0x01, 0x27, 0xa1, 0x04]
    );
    let mut reencoded = message.clone();
    reencoded.insert(7, 0x18);
    assert!(is_unprotected_reencoding(&message, &reencoded));
    let verified = verify(&reencoded, &*REGISTRY, Some(dev)).expect("same meaning");
    assert_eq!(verified.into_inner(), telemetry);
}
