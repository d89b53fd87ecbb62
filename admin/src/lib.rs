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
//! Architecture invariants:
//! - nothing is served unaudited: every answer that reaches the router, a handler's
//!   or one axum or an extractor makes (405, 400, 408, 413), leaves only once its
//!   record is on disk; when the log cannot be written the answer is 503 and serves
//!   nothing. Not audited, because hyper answers them itself before any request
//!   exists (no data is served): a malformed request head (400), an oversized one
//!   (431), a head not read within [`HEADER_READ_TIMEOUT`] (the connection is closed),
//!   and an operator's connection closed because no operator slot freed within that
//!   time (logged). A refused or timed-out TLS handshake is audited (`connect`);
//! - a call refused for its caller, role, purpose or request never reaches the
//!   [`backend::Backend`];
//! - a change or re-identification reaches the backend only once its `allowed` record
//!   is on disk (its outcome is recorded after); for a site-scoped role the registry is
//!   read first (`device_sites`) to decide the scope, and the backend checks the scope
//!   again on the registry it reads under its lock, before changing anything
//!   ([`backend::ScopeCheck`]; refused: 403 `outside_scope`, the call's outcome);
//! - a change whose registry lock stays held past its deadline answers 503 `busy`,
//!   its outcome audited;
//! - connections are capped in two: [`MAX_HANDSHAKES`] before the peer has shown an
//!   operator certificate, [`MAX_CONNECTIONS`] operators' calls after, so peers that
//!   never finish a handshake cannot keep an operator out;
//! - a read reaches the backend before its record, because the scope is decided on
//!   the sites of what was read: a read refused for its scope was read, never served.
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
pub use server::{
    HANDSHAKE_TIMEOUT, HEADER_READ_TIMEOUT, MAX_CONNECTIONS, MAX_HANDSHAKES, ServeError, serve,
};
