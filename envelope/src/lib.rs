//! The vitalmq signed telemetry wire format (SPEC section 3), shared by every signer and
//! verifier: devices and the simulator sign with it, the bridge verifies with it.
//!
//! A message is a tagged COSE_Sign1 (RFC 9052) whose payload is a CBOR map of vital
//! signs. [`verify`] returns either a [`Verified`]`<`[`Telemetry`]`>` (only this crate can
//! make one) or a [`Refusal`] carrying one of the SPEC's [`ReasonClass`]es.
//!
//! Architecture invariant: this crate does no I/O and keeps no state; keys arrive through
//! the [`KeyLookup`] seam, time is not consulted. That is what lets the fuzz target and
//! the property tests drive it directly.
#![forbid(unsafe_code)]

mod alarm;
pub mod cbor;
mod device_id;
mod inspect;
pub mod json;
mod keys;
mod refusal;
mod sign;
mod status;
mod telemetry;
mod verify;

pub use alarm::{
    Alarm, AlarmCode, AlarmLevel, InvalidAlarmCode, InvalidAlarmLevel, MAX_ALARM_DETAIL_BYTES,
};
pub use device_id::{DeviceId, InvalidDeviceId};
pub use inspect::{Headers, Inspection, inspect};
pub use keys::{
    Algorithm, AnyKid, BadSignature, Es256Signer, KeyError, KeyLookup, P256Key, SigningKey,
    VerifyingKey,
};
pub use refusal::{ReasonClass, Refusal};
pub use sign::{sign, sign_payload};
pub use status::StatusReport;
pub use telemetry::{MessageType, Number, SchemaError, Telemetry, parse_payload};
#[doc(hidden)]
pub use verify::decode_unverified_for_bench;
pub use verify::{MAX_MESSAGE_BYTES, Verified, verify, verify_bytes, verify_signature_only};
