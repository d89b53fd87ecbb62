//! The vitalmq admin API (issue 19, point 4): patient-linked reads (events, alerts,
//! traces, the quarantine), governance changes (assignments, consent) and
//! re-identification over HTTPS with mutual TLS, for operators only.
//!
//! - [`config`]: `vitalmq-admin/v1`, the listen address, the TLS edge (the broker's
//!   `[tls]` table: same CA, CRLs and trust domain), the roles policy, the audit log,
//!   the break-glass outbox and what the API serves from;
//! - [`edge`]: TLS accept with client certificates checked by the broker's verifier
//!   (chain, validity, CRL), rebuilt when a CA or CRL file changes;
//! - [`access`]: who the caller is (an operator of the trust domain, with a role from
//!   [`vitalmq_policies::AdminRoles`]), the purpose it states, its scope and
//!   break-glass;
//! - [`audit`]: one chained, signed record per call, allowed or refused;
//! - [`backend`]: what the API reads and changes, provided by the binary (the store read
//!   code, the registry change function and the re-identification store live there);
//! - [`api`]: the routes.
//!
//! Architecture invariant: no call reaches the [`backend::Backend`] before its audit
//! record of the decision is on disk, and no refused call reaches it at all.
#![forbid(unsafe_code)]

pub mod access;
pub mod api;
pub mod audit;
pub mod backend;
pub mod config;
pub mod edge;
pub mod ops_alert;
mod server;

pub use config::{AdminConfig, ConfigError};
pub use server::{ServeError, serve};
