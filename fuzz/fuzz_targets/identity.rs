//! Any bytes as a client's leaf certificate (DER): the identity check the TLS verifier
//! runs during every handshake must refuse or accept, never panic.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use vitalmq_broker::identity::cert_identity;
use vitalmq_policies::TrustDomain;

static TRUST_DOMAIN: LazyLock<TrustDomain> =
    LazyLock::new(|| TrustDomain::new("demo.vitalmq").expect("constant trust domain"));

fuzz_target!(|der: &[u8]| {
    for cn_fallback in [false, true] {
        if let Ok(identity) = cert_identity(der, &TRUST_DOMAIN, cn_fallback) {
            // Whatever was accepted carries a well-formed identity.
            assert_eq!(identity.fingerprint_sha256_hex.len(), 64);
        }
    }
});
