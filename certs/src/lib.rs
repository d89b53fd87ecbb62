//! The vitalmq dev/test PKI (SPEC section 1): a CA, SPIFFE identity certificates for
//! every party, the broker's server certificate, CRLs, device COSE keys and the device
//! registry.
//!
//! The building blocks are pure and in memory ([`Ca`], [`Ca::issue_identity`],
//! [`Ca::sign_crl`], [`Fleet::build`]), so broker and bridge tests can make certificates
//! without touching the disk; [`Pki`] persists them in the directory described in
//! [`layout`], and [`cli`] is `vitalmq certs ...`.
#![forbid(unsafe_code)]

mod ca;
pub mod cli;
mod crl;
mod error;
mod fleet;
pub mod index;
mod issue;
pub mod layout;
mod store;

pub use ca::{Ca, Serial, Validity};
pub use crl::{Reason, Revoked};
pub use error::CertsError;
pub use fleet::{
    DeviceKey, Fleet, FleetPlan, IssuedIdentity, device_id, device_registry, enroll_device,
    simulated_fleet_facts, site_id,
};
pub use issue::{IssuedCert, ServerName};
pub use layout::Layout;
pub use store::{InitSummary, IssueRequest, Pki};
