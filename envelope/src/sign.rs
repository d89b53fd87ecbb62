//! Signing telemetry into the profile's COSE_Sign1 form: tag 18, `{1: alg}` protected,
//! `{4: kid}` unprotected, embedded payload, empty external AAD.

use coset::{CoseSign1Builder, HeaderBuilder, TaggedCborSerializable as _, iana};

use crate::{Algorithm, DeviceId, KeyError, SigningKey, Telemetry};

/// Signs `telemetry` with the device key; the `kid` is `telemetry.dev`.
pub fn sign(telemetry: &Telemetry, key: &SigningKey) -> Result<Vec<u8>, KeyError> {
    sign_payload(&telemetry.to_cbor(), &telemetry.dev, key)
}

/// Signs arbitrary payload bytes under `kid`. Devices use [`sign`]; this exists for
/// fault injection and tests that need payloads the schema would refuse.
pub fn sign_payload(payload: &[u8], kid: &DeviceId, key: &SigningKey) -> Result<Vec<u8>, KeyError> {
    let alg = match key.algorithm() {
        Algorithm::EdDsa => iana::Algorithm::EdDSA,
        Algorithm::Es256 => iana::Algorithm::ES256,
    };
    let sign1 = CoseSign1Builder::new()
        .protected(HeaderBuilder::new().algorithm(alg).build())
        .unprotected(
            HeaderBuilder::new()
                .key_id(kid.as_str().as_bytes().to_vec())
                .build(),
        )
        .payload(payload.to_vec())
        .try_create_signature(&[], |tbs| key.sign(tbs))?
        .build();
    sign1
        .to_tagged_vec()
        .map_err(|e| KeyError::Private(format!("COSE encoding failed: {e}")))
}
