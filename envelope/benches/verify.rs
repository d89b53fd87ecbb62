//! What COSE and CBOR handling cost on top of the signature, per algorithm.
//!
//! For a realistic vitals message (178 bytes, like the vectors') of each algorithm, three measurements in
//! the same run:
//!
//! - `full`: [`vitalmq_envelope::verify`], everything a bridge does per message;
//! - `decode_only`: the same pipeline minus the signature primitive
//!   ([`vitalmq_envelope::decode_unverified_for_bench`]);
//! - `signature_check`: the signature check `full` runs, alone on the same to-be-signed
//!   bytes ([`VerifyingKey::verify`]: AWS-LC, with the strict small-order rules for
//!   Ed25519);
//! - `bare_signature`: the reference crates alone on the same bytes (ed25519-dalek
//!   `verify_strict` on a parsed key, ring `ECDSA_P256_SHA256_FIXED`).
//!
//! The overhead we hold ourselves to is `(full - signature_check) / signature_check`
//! under 15%; `scripts/bench-envelope` prints it from criterion's estimates.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::hint::black_box;

use coset::{CoseSign1, TaggedCborSerializable as _};
use criterion::{Criterion, criterion_group};
use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
use vitalmq_envelope::{
    Algorithm, DeviceId, MessageType, Number, SigningKey, Telemetry, VerifyingKey,
    decode_unverified_for_bench, sign, verify,
};

/// Private keys of the shared vectors (`keys.json`, `d`): dev-00042 and dev-00077.
const ED25519_D: &str = "fd6d89b68975ad7c1243b8e578e3376d50a77a68be5d5aeebbb65fe0d61b3f9b";
const P256_D: &str = "2d9b4668dc23f4b7660ca7e8ff50ec70eb749cf19f3ee47de171f1df58902526";

/// One algorithm's fixture: the signed message, its registry and the Sig_structure.
struct Fixture {
    name: &'static str,
    dev: DeviceId,
    message: Vec<u8>,
    registry: HashMap<DeviceId, VerifyingKey>,
    tbs: Vec<u8>,
    signature: Vec<u8>,
    public: VerifyingKey,
}

fn fixture(name: &'static str, alg: Algorithm, d_hex: &str, dev: &str) -> Fixture {
    // The constants above are valid hex private keys and device ids; a failure here is
    // a broken benchmark, not a measurement.
    let key = SigningKey::from_private_bytes(alg, &hex::decode(d_hex).expect("hex key"))
        .expect("vector private key");
    let dev = DeviceId::new(dev).expect("device id");
    let telemetry = Telemetry {
        dev: dev.clone(),
        epoch: 3,
        seq: 1001,
        ts: 1_718_260_201_000,
        fw: "5.12.1".into(),
        kind: MessageType::Vitals,
        m: Some(BTreeMap::from([
            ("spo2".into(), Number::Int(93)),
            ("pulse".into(), Number::Int(108)),
        ])),
        q: Some(0.97),
        model: None,
        schema: None,
        extra: BTreeMap::new(),
    };
    let message = sign(&telemetry, &key).expect("signing");
    // The reference to-be-signed bytes come from coset, independent of our verifier.
    let parsed = CoseSign1::from_tagged_slice(&message).expect("own message parses");
    let public = key.verifying_key();
    Fixture {
        name,
        dev: dev.clone(),
        registry: HashMap::from([(dev, public.clone())]),
        tbs: parsed.tbs_data(&[]),
        signature: parsed.signature,
        message,
        public,
    }
}

/// The measured operations on one fixture, shared by criterion and the counted
/// (callgrind) mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Full,
    DecodeOnly,
    SignatureCheck,
    BareSignature,
}

impl Op {
    const ALL: [Self; 4] = [
        Self::Full,
        Self::DecodeOnly,
        Self::SignatureCheck,
        Self::BareSignature,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::DecodeOnly => "decode_only",
            Self::SignatureCheck => "signature_check",
            Self::BareSignature => "bare_signature",
        }
    }

    /// Runs the operation once; `true` when it accepted (every op accepts the fixture).
    fn run(self, f: &Fixture) -> bool {
        let message = black_box(f.message.as_slice());
        match self {
            Self::Full => verify(message, &f.registry, Some(&f.dev)).is_ok(),
            Self::DecodeOnly => {
                decode_unverified_for_bench(message, &f.registry, Some(&f.dev)).is_ok()
            }
            Self::SignatureCheck => f.public.verify(black_box(&f.tbs), &f.signature).is_ok(),
            Self::BareSignature => bare_verify(&f.public, black_box(&f.tbs), &f.signature),
        }
    }
}

/// The crypto crate alone, as a caller holding a parsed key would call it.
fn bare_verify(public: &VerifyingKey, tbs: &[u8], signature: &[u8]) -> bool {
    match public {
        VerifyingKey::Ed25519(key) => {
            let Ok(raw) = <&[u8; 64]>::try_from(signature) else {
                return false;
            };
            let signature = ed25519_dalek::Signature::from_bytes(raw);
            key.verify_strict(tbs, &signature).is_ok()
        }
        VerifyingKey::Es256(key) => {
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &key.point()[..])
                .verify(tbs, signature)
                .is_ok()
        }
    }
}

fn fixtures() -> [Fixture; 2] {
    [
        fixture("verify_eddsa", Algorithm::EdDsa, ED25519_D, "dev-00042"),
        fixture("verify_es256", Algorithm::Es256, P256_D, "dev-00077"),
    ]
}

fn benches(c: &mut Criterion) {
    for f in &fixtures() {
        eprintln!("{}: message {} bytes", f.name, f.message.len());
        let mut group = c.benchmark_group(f.name);
        for op in Op::ALL {
            // The fixture is valid, so every op measures the accepting path.
            assert!(op.run(f), "{} {} refused the fixture", f.name, op.name());
            group.bench_function(op.name(), |b| b.iter(|| op.run(f)));
        }
        group.finish();
    }
}

/// `ENVELOPE_BENCH_COUNTED=<fixture>/<op>/<n>` (e.g. `verify_eddsa/full/1000`) runs one
/// operation `n` times and exits, for instruction counting under
/// `valgrind --tool=callgrind`: the count at `n` minus the count at 0, divided by `n`,
/// is the noise-free cost of one operation. `scripts/bench-envelope` does this.
fn run_counted(spec: &str) {
    let parts: Vec<&str> = spec.split('/').collect();
    let [fixture_name, op_name, n] = parts[..] else {
        panic!("ENVELOPE_BENCH_COUNTED wants <fixture>/<op>/<n>, got {spec:?}");
    };
    let n: u64 = n.parse().expect("iteration count");
    let fixtures = fixtures();
    let f = fixtures
        .iter()
        .find(|f| f.name == fixture_name)
        .expect("fixture is verify_eddsa or verify_es256");
    let op = Op::ALL
        .into_iter()
        .find(|op| op.name() == op_name)
        .expect("op is full, decode_only or bare_signature");
    let mut accepted = 0u64;
    for _ in 0..n {
        accepted += u64::from(op.run(f));
    }
    assert_eq!(accepted, n);
}

criterion_group!(verify_benches, benches);

fn main() {
    if let Ok(spec) = std::env::var("ENVELOPE_BENCH_COUNTED") {
        run_counted(&spec);
        return;
    }
    verify_benches();
    Criterion::default().configure_from_args().final_summary();
}
