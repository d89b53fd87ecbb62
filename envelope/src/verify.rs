//! Verification of signed telemetry (SPEC section 3), in the reference order:
//! size, envelope CBOR, tag/shape/types, header rules, alg, kid, registry lookup,
//! alg against the key, signature, payload schema, `dev` against `kid`.
//!
//! The first failing step decides the refusal class. Nothing here panics on any input:
//! the strict CBOR scan runs before any decoder and bounds nesting and lengths.

use std::ops::Deref;

use bytes::Bytes;
use coset::iana::EnumI64 as _;
use coset::{
    CborSerializable as _, CoseSign1, Header, Label, RegisteredLabelWithPrivate,
    TaggedCborSerializable as _, iana,
};
use sha2::{Digest as _, Sha256};

use crate::refusal::{ReasonClass, Refusal};
use crate::telemetry::{Telemetry, parse_payload};
use crate::{Algorithm, DeviceId, KeyLookup, VerifyingKey, cbor};

/// Largest encoded message accepted, checked before parsing.
pub const MAX_MESSAGE_BYTES: usize = 65_536;

/// CBOR tag of COSE_Sign1 (RFC 9052).
pub const COSE_SIGN1_TAG: u64 = 18;

/// A value that passed verification. Only this crate can make one, so code that holds a
/// `Verified<Telemetry>` holds proof that the signature, key binding and schema held,
/// and holds the exact signed bytes they held for ([`Verified::message`]): whoever
/// stores or forwards "the verified message" takes these, not bytes from elsewhere.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified<T> {
    value: T,
    algorithm: Algorithm,
    message: Bytes,
    message_sha256: [u8; 32],
}

impl<T> Verified<T> {
    /// The exact message bytes that were verified (a cheap, shared handle).
    pub fn message(&self) -> &Bytes {
        &self.message
    }

    /// SHA-256 of the exact message bytes that were verified.
    pub fn message_sha256(&self) -> &[u8; 32] {
        &self.message_sha256
    }

    /// The algorithm the registry key and the message agreed on.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    pub fn into_inner(self) -> T {
        self.value
    }
}

impl<T> Deref for Verified<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

/// Verifies one telemetry message.
///
/// `expected_device` is the device the message must belong to: the `{id}` of the topic
/// it arrived on (or `--kid` on the command line). When given, a message whose `kid`
/// names another device is `kid_mismatch` before any signature work is spent on it.
///
/// An accepted message's bytes are copied into the [`Verified`] value; a caller that
/// already holds them in [`Bytes`] (the bridge, from its MQTT client) uses
/// [`verify_bytes`], which shares them instead.
pub fn verify<K: KeyLookup + ?Sized>(
    message: &[u8],
    keys: &K,
    expected_device: Option<&DeviceId>,
) -> Result<Verified<Telemetry>, Refusal> {
    verify_profile(
        message,
        keys,
        expected_device,
        SignatureCheck::Verify,
        || Bytes::copy_from_slice(message),
    )
}

/// [`verify`] of a message held in [`Bytes`]: the [`Verified`] value keeps a handle on
/// the same buffer (no copy).
pub fn verify_bytes<K: KeyLookup + ?Sized>(
    message: &Bytes,
    keys: &K,
    expected_device: Option<&DeviceId>,
) -> Result<Verified<Telemetry>, Refusal> {
    verify_profile(
        message,
        keys,
        expected_device,
        SignatureCheck::Verify,
        || message.clone(),
    )
}

/// Runs every step of [`verify`] except the cryptographic signature check (the
/// Sig_structure is still built), so the benchmark can measure what COSE and CBOR
/// handling cost on top of the signature. Not for production use: a message that
/// passes this is NOT verified.
#[doc(hidden)]
pub fn decode_unverified_for_bench<K: KeyLookup + ?Sized>(
    message: &[u8],
    keys: &K,
    expected_device: Option<&DeviceId>,
) -> Result<Telemetry, Refusal> {
    verify_profile(
        message,
        keys,
        expected_device,
        SignatureCheck::SkipForBench,
        Bytes::new,
    )
    .map(Verified::into_inner)
}

/// Whether [`verify_profile`] runs the signature primitive; only the benchmark skips it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SignatureCheck {
    Verify,
    SkipForBench,
}

/// The profile pipeline shared by [`verify`] and [`decode_unverified_for_bench`].
fn verify_profile<K: KeyLookup + ?Sized>(
    message: &[u8],
    keys: &K,
    expected_device: Option<&DeviceId>,
    signature_check: SignatureCheck,
    keep: impl FnOnce() -> Bytes,
) -> Result<Verified<Telemetry>, Refusal> {
    let sign1 = parse_envelope(message, TagRule::Required)?;
    check_profile_headers(&sign1)?;

    let alg = protected_alg(&sign1)?;
    let kid = kid_of(&sign1)?;
    if let Some(expected) = expected_device {
        if &kid != expected {
            return Err(Refusal::new(
                ReasonClass::KidMismatch,
                format!("kid `{kid}` does not belong to device `{expected}`"),
            ));
        }
    }
    let key = keys.key_for(&kid).ok_or_else(|| {
        Refusal::new(
            ReasonClass::UnknownKey,
            format!("kid `{kid}` is not in the key registry"),
        )
    })?;
    if key.algorithm() != alg {
        return Err(Refusal::new(
            ReasonClass::AlgMismatch,
            format!(
                "message says {alg} but `{kid}` is registered with {}",
                key.algorithm()
            ),
        ));
    }
    let tbs = to_be_signed(&sign1, &[]);
    if signature_check == SignatureCheck::Verify {
        check_signature(key, &tbs, &sign1.signature)?;
    } else {
        std::hint::black_box((&tbs, key));
    }

    let payload = sign1.payload.as_deref().unwrap_or_default();
    let telemetry = parse_payload(payload)
        .map_err(|e| Refusal::new(ReasonClass::PayloadSchema, e.to_string()))?;
    if telemetry.dev != kid {
        return Err(Refusal::new(
            ReasonClass::KidMismatch,
            format!("payload dev `{}` differs from kid `{kid}`", telemetry.dev),
        ));
    }
    Ok(Verified {
        value: telemetry,
        algorithm: alg,
        message_sha256: Sha256::digest(message).into(),
        message: keep(),
    })
}

/// Checks the signature layer alone, as a generic COSE_Sign1 verifier would: tagged or
/// untagged, `alg` in either bucket, an empty protected map signed as `h''` (RFC 9052
/// section 4.4), no telemetry schema and no kid binding. The cose-wg examples test this.
pub fn verify_signature_only(
    message: &[u8],
    key: &VerifyingKey,
    external_aad: &[u8],
) -> Result<(), Refusal> {
    let mut sign1 = parse_envelope(message, TagRule::Optional)?;
    let alg_label = sign1
        .protected
        .header
        .alg
        .as_ref()
        .or(sign1.unprotected.alg.as_ref())
        .ok_or_else(|| Refusal::new(ReasonClass::AlgMismatch, "no alg header"))?;
    let alg = algorithm_of(alg_label)?;
    if alg != key.algorithm() {
        return Err(Refusal::new(
            ReasonClass::AlgMismatch,
            format!("message says {alg}, the key is {}", key.algorithm()),
        ));
    }
    if sign1.payload.is_none() {
        return Err(Refusal::new(ReasonClass::Malformed, "detached payload"));
    }
    if sign1.protected.header.is_empty() {
        sign1.protected.original_data = None;
    }
    check_signature(key, &to_be_signed(&sign1, external_aad), &sign1.signature)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TagRule {
    Required,
    Optional,
}

fn malformed(detail: impl Into<String>) -> Refusal {
    Refusal::new(ReasonClass::Malformed, detail)
}

/// The 64 KiB cap, checked before any parsing.
pub(crate) fn check_size(message: &[u8]) -> Result<(), Refusal> {
    if message.len() > MAX_MESSAGE_BYTES {
        return Err(Refusal::new(
            ReasonClass::Oversized,
            format!(
                "message is {} bytes; the limit is {MAX_MESSAGE_BYTES}",
                message.len()
            ),
        ));
    }
    Ok(())
}

/// Size, strict CBOR, tag and COSE_Sign1 shape.
fn parse_envelope(message: &[u8], tag_rule: TagRule) -> Result<CoseSign1, Refusal> {
    check_size(message)?;
    cbor::check_single_item(message).map_err(|e| malformed(e.to_string()))?;
    let head = cbor::read_head(message, 0).map_err(|e| malformed(e.to_string()))?;
    let tagged = head.major == 6;
    if tagged && head.argument != COSE_SIGN1_TAG {
        return Err(malformed(format!(
            "CBOR tag {} is not COSE_Sign1 (18)",
            head.argument
        )));
    }
    if !tagged && tag_rule == TagRule::Required {
        return Err(malformed("COSE_Sign1 tag 18 is required"));
    }
    let parsed = if tagged {
        CoseSign1::from_tagged_slice(message)
    } else {
        CoseSign1::from_slice(message)
    };
    parsed.map_err(|e| {
        if let Some(alg) = unregistered_protected_alg(message) {
            Refusal::new(
                ReasonClass::AlgMismatch,
                format!("unsupported alg {alg} (EdDSA -8 or ES256 -7)"),
            )
        } else {
            malformed(format!("not a COSE_Sign1 of this profile: {e}"))
        }
    })
}

/// coset refuses `alg` values outside the IANA registry while parsing, which would make
/// them `malformed`; the SPEC calls an unsupported alg `alg_mismatch`. Called only once
/// coset has failed, to tell the two apart.
fn unregistered_protected_alg(message: &[u8]) -> Option<String> {
    use ciborium::value::Value;
    let value: Value = ciborium::de::from_reader(message).ok()?;
    let array = match value {
        Value::Tag(_, inner) => *inner,
        other => other,
    };
    let Value::Array(items) = array else {
        return None;
    };
    let Some(Value::Bytes(protected)) = items.first() else {
        return None;
    };
    let Value::Map(entries) = ciborium::de::from_reader::<Value, _>(protected.as_slice()).ok()?
    else {
        return None;
    };
    entries.iter().find_map(|(label, alg)| match (label, alg) {
        (Value::Integer(l), Value::Integer(a)) if i128::from(*l) == 1 => {
            let a = i128::from(*a);
            (a != -7 && a != -8).then(|| a.to_string())
        }
        (Value::Integer(l), Value::Text(t)) if i128::from(*l) == 1 => Some(format!("{t:?}")),
        _ => None,
    })
}

/// Header rules of the profile: no label in both buckets, `crit` only protected and only
/// naming labels this verifier acts on, embedded payload.
fn check_profile_headers(sign1: &CoseSign1) -> Result<(), Refusal> {
    let protected = header_labels(&sign1.protected.header);
    if let Some(both) = header_labels(&sign1.unprotected)
        .into_iter()
        .find(|label| protected.contains(label))
    {
        return Err(malformed(format!(
            "header label {} is in both buckets",
            label_text(&both)
        )));
    }
    if !sign1.unprotected.crit.is_empty() {
        return Err(malformed("crit must be in the protected bucket"));
    }
    for label in &sign1.protected.header.crit {
        let understood = matches!(
            label,
            RegisteredLabelWithPrivate::Assigned(iana::HeaderParameter::Alg)
        );
        if !understood {
            return Err(malformed(format!(
                "crit names label {label:?}, which this verifier does not understand"
            )));
        }
    }
    if sign1.payload.is_none() {
        return Err(malformed(
            "detached (nil) payload; the payload must be embedded",
        ));
    }
    Ok(())
}

fn header_labels(header: &Header) -> Vec<Label> {
    use iana::HeaderParameter as P;
    let mut labels = Vec::new();
    let mut known = |present: bool, param: P| {
        if present {
            labels.push(Label::Int(param.to_i64()));
        }
    };
    known(header.alg.is_some(), P::Alg);
    known(!header.crit.is_empty(), P::Crit);
    known(header.content_type.is_some(), P::ContentType);
    known(!header.key_id.is_empty(), P::Kid);
    known(!header.iv.is_empty(), P::Iv);
    known(!header.partial_iv.is_empty(), P::PartialIv);
    known(!header.counter_signatures.is_empty(), P::CounterSignature);
    labels.extend(header.rest.iter().map(|(label, _)| label.clone()));
    labels
}

fn label_text(label: &Label) -> String {
    match label {
        Label::Int(i) => i.to_string(),
        Label::Text(t) => format!("{t:?}"),
    }
}

fn algorithm_of(alg: &coset::Algorithm) -> Result<Algorithm, Refusal> {
    match alg {
        RegisteredLabelWithPrivate::Assigned(iana::Algorithm::EdDSA) => Ok(Algorithm::EdDsa),
        RegisteredLabelWithPrivate::Assigned(iana::Algorithm::ES256) => Ok(Algorithm::Es256),
        other => Err(Refusal::new(
            ReasonClass::AlgMismatch,
            format!("unsupported alg {other:?} (EdDSA -8 or ES256 -7)"),
        )),
    }
}

fn protected_alg(sign1: &CoseSign1) -> Result<Algorithm, Refusal> {
    match &sign1.protected.header.alg {
        Some(alg) => algorithm_of(alg),
        None if sign1.unprotected.alg.is_some() => Err(Refusal::new(
            ReasonClass::AlgMismatch,
            "alg is only in the unprotected bucket; it must be protected",
        )),
        None => Err(Refusal::new(
            ReasonClass::AlgMismatch,
            "alg missing from the protected bucket",
        )),
    }
}

/// The kid (unprotected per the profile; a protected kid is accepted too, it is only
/// more strongly bound) as a device id.
fn kid_of(sign1: &CoseSign1) -> Result<DeviceId, Refusal> {
    let raw = if sign1.unprotected.key_id.is_empty() {
        &sign1.protected.header.key_id
    } else {
        &sign1.unprotected.key_id
    };
    if raw.is_empty() {
        return Err(Refusal::new(ReasonClass::UnknownKey, "no kid header"));
    }
    DeviceId::from_utf8(raw).map_err(|e| {
        Refusal::new(
            ReasonClass::UnknownKey,
            format!("kid is not a registered device id: {e}"),
        )
    })
}

/// The bytes the signature covers: the Sig_structure with the protected header as
/// transmitted.
fn to_be_signed(sign1: &CoseSign1, external_aad: &[u8]) -> Vec<u8> {
    match &sign1.protected.original_data {
        Some(protected) => sig_structure1(
            protected,
            external_aad,
            sign1.payload.as_deref().unwrap_or_default(),
        ),
        // Only `verify_signature_only` clears the original bytes (an empty protected map
        // is signed as `h''`); let coset encode that rare case.
        None => sign1.tbs_data(external_aad),
    }
}

/// Encodes the COSE_Sign1 Sig_structure (RFC 9052 section 4.4),
/// `["Signature1", protected, external_aad, payload]`, straight into bytes.
///
/// Byte for byte what coset's `CoseSign1::tbs_data` produces (preferred-length heads;
/// the unit tests compare the two), without coset's detour of cloning the protected
/// bytes and the payload into a `Value` tree and serializing that: it was a tenth of
/// the envelope overhead on the hot path.
fn sig_structure1(protected: &[u8], external_aad: &[u8], payload: &[u8]) -> Vec<u8> {
    const CONTEXT: &[u8] = b"Signature1";
    let parts = [protected, external_aad, payload];
    let capacity = 1 + 1 + CONTEXT.len() + parts.iter().map(|p| 9 + p.len()).sum::<usize>();
    let mut out = Vec::with_capacity(capacity);
    out.push(0x84); // array of 4
    push_head(&mut out, 3, CONTEXT.len());
    out.extend_from_slice(CONTEXT);
    for part in parts {
        push_head(&mut out, 2, part.len());
        out.extend_from_slice(part);
    }
    out
}

/// Appends a CBOR head of major type `major` with length `len`, in the shortest form.
fn push_head(out: &mut Vec<u8>, major: u8, len: usize) {
    let major = major << 5;
    // usize is at most 64 bits on every target Rust supports.
    let len = len as u64;
    if let Ok(small) = u8::try_from(len) {
        if small < 24 {
            out.push(major | small);
        } else {
            out.extend_from_slice(&[major | 24, small]);
        }
    } else if let Ok(short) = u16::try_from(len) {
        out.push(major | 25);
        out.extend_from_slice(&short.to_be_bytes());
    } else if let Ok(word) = u32::try_from(len) {
        out.push(major | 26);
        out.extend_from_slice(&word.to_be_bytes());
    } else {
        out.push(major | 27);
        out.extend_from_slice(&len.to_be_bytes());
    }
}

fn check_signature(key: &VerifyingKey, tbs: &[u8], signature: &[u8]) -> Result<(), Refusal> {
    key.verify(tbs, signature)
        .map_err(|why| Refusal::new(ReasonClass::BadSignature, why.to_string()))
}

#[cfg(test)]
mod tests {
    use coset::{CoseSign1Builder, HeaderBuilder};
    use proptest::prelude::*;

    use super::*;

    /// A COSE_Sign1 as a verifier sees it: encoded and parsed back, so the protected
    /// header carries its transmitted bytes.
    fn parsed(protected_kid: &[u8], payload: Vec<u8>, signature_len: usize) -> CoseSign1 {
        let sign1 = CoseSign1Builder::new()
            .protected(
                HeaderBuilder::new()
                    .algorithm(iana::Algorithm::EdDSA)
                    .key_id(protected_kid.to_vec())
                    .build(),
            )
            .payload(payload)
            .signature(vec![0x5a; signature_len])
            .build();
        let bytes = sign1.to_tagged_vec().expect("encodes");
        CoseSign1::from_tagged_slice(&bytes).expect("parses")
    }

    #[test]
    fn sig_structure_matches_coset_at_every_head_width() {
        // Lengths on both sides of each CBOR head width (1, 2, 3 and 5 bytes).
        let lengths = [0usize, 1, 23, 24, 255, 256, 65_535, 65_536];
        for &protected_len in &[0usize, 1, 23, 24, 300] {
            for &payload_len in &lengths {
                for &aad_len in &[0usize, 24, 256] {
                    let kid = vec![0x41; protected_len];
                    let sign1 = parsed(&kid, vec![0xa0; payload_len], 64);
                    let aad = vec![0x07; aad_len];
                    assert_eq!(
                        to_be_signed(&sign1, &aad),
                        sign1.tbs_data(&aad),
                        "protected {protected_len} payload {payload_len} aad {aad_len}"
                    );
                }
            }
        }
    }

    #[test]
    fn empty_protected_header_is_signed_as_empty_bstr() {
        let mut sign1 = CoseSign1::from_tagged_slice(
            &CoseSign1Builder::new()
                .payload(b"x".to_vec())
                .build()
                .to_tagged_vec()
                .expect("encodes"),
        )
        .expect("parses");
        assert_eq!(to_be_signed(&sign1, &[]), sign1.tbs_data(&[]));
        sign1.protected.original_data = None;
        assert_eq!(to_be_signed(&sign1, &[]), sign1.tbs_data(&[]));
    }

    #[test]
    fn head_widths_are_preferred() {
        let head = |len| {
            let mut out = Vec::new();
            push_head(&mut out, 2, len);
            out
        };
        assert_eq!(head(23), [0x57]);
        assert_eq!(head(24), [0x58, 24]);
        assert_eq!(head(256), [0x59, 1, 0]);
        assert_eq!(head(65_536), [0x5a, 0, 1, 0, 0]);
        assert_eq!(head(1 << 32), [0x5b, 0, 0, 0, 1, 0, 0, 0, 0]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn sig_structure_matches_coset(
            kid in proptest::collection::vec(any::<u8>(), 0..40),
            payload in proptest::collection::vec(any::<u8>(), 0..600),
            aad in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let sign1 = parsed(&kid, payload, 64);
            prop_assert_eq!(to_be_signed(&sign1, &aad), sign1.tbs_data(&aad));
        }
    }
}
