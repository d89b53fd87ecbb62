//! Who is calling and what they may do: the caller's certificate identity, its role
//! from the roles policy (re-read when the file changes), the purpose it states and
//! the break-glass reason it may give.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::http::HeaderMap;
use vitalmq_policies::{AdminRoles, PolicyErrors, Role, SpiffeId};

/// Header (or query parameter `purpose`) stating why the call is made. Required.
pub const PURPOSE_HEADER: &str = "x-vitalmq-purpose";
/// Header (or query parameter `break_glass`) with the reason for a read outside the
/// caller's scope.
pub const BREAK_GLASS_HEADER: &str = "x-vitalmq-break-glass";
/// Longest purpose or break-glass reason accepted, in bytes.
pub const MAX_STATEMENT: usize = 256;

/// The party at the other end of a connection, as its verified certificate says.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The SPIFFE id, when the certificate carries one of the trust domain.
    pub identity: Option<SpiffeId>,
    /// SHA-256 of the leaf certificate (hex).
    pub cert_sha256: Option<String>,
    pub cert_serial: Option<String>,
    pub addr: SocketAddr,
}

impl Caller {
    /// The operator id, if the caller is an operator.
    pub fn operator(&self) -> Option<&vitalmq_policies::PrincipalId> {
        self.identity
            .as_ref()
            .filter(|id| id.role == Role::Operator)
            .map(|id| &id.id)
    }
}

/// A statement (purpose or break-glass reason) from a header or the query; blank or
/// oversized ones count as absent or invalid.
pub fn statement(
    headers: &HeaderMap,
    header: &str,
    query: Option<&String>,
) -> Result<Option<String>, &'static str> {
    let raw = match headers.get(header) {
        Some(v) => Some(v.to_str().map_err(|_| "not text")?.to_owned()),
        None => query.cloned(),
    };
    let Some(raw) = raw else { return Ok(None) };
    let text = raw.trim();
    if text.is_empty() {
        return Ok(None);
    }
    if text.len() > MAX_STATEMENT || text.chars().any(char::is_control) {
        return Err("longer than 256 bytes or has control characters");
    }
    Ok(Some(text.to_owned()))
}

/// The roles policy, re-read when its file changes (a file that does not load keeps
/// the policy that did, logged).
#[derive(Debug)]
pub struct RolesFile {
    path: PathBuf,
    current: Mutex<(Option<Stamp>, Arc<AdminRoles>)>,
}

impl RolesFile {
    pub fn load(path: PathBuf) -> Result<Self, PolicyErrors> {
        let stamp = stamp(&path);
        let roles = AdminRoles::load(&path)?;
        Ok(Self {
            path,
            current: Mutex::new((stamp, Arc::new(roles))),
        })
    }

    /// The policy in force (reloaded first if the file changed).
    pub fn current(&self) -> Arc<AdminRoles> {
        let now = stamp(&self.path);
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.0 != now {
            current.0 = now;
            match AdminRoles::load(&self.path) {
                Ok(roles) => {
                    tracing::info!(policy_sha256 = roles.sha256(), "admin roles reloaded");
                    current.1 = Arc::new(roles);
                }
                Err(e) => {
                    tracing::error!(error = %e, "admin roles changed but do not load; keeping the previous policy");
                }
            }
        }
        Arc::clone(&current.1)
    }
}

/// What tells a changed file: modification time and length.
type Stamp = (SystemTime, u64);

fn stamp(path: &std::path::Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn a_statement_comes_from_the_header_first_and_must_be_plain_text() {
        let mut headers = HeaderMap::new();
        let query = "from the query".to_owned();
        assert_eq!(statement(&headers, PURPOSE_HEADER, None), Ok(None));
        assert_eq!(
            statement(&headers, PURPOSE_HEADER, Some(&query)),
            Ok(Some(query.clone()))
        );
        headers.insert(PURPOSE_HEADER, HeaderValue::from_static("  care  "));
        assert_eq!(
            statement(&headers, PURPOSE_HEADER, Some(&query)),
            Ok(Some("care".into()))
        );
        headers.insert(PURPOSE_HEADER, HeaderValue::from_static("   "));
        assert_eq!(
            statement(&headers, PURPOSE_HEADER, None),
            Ok(None),
            "blank is absent"
        );
        let long = "x".repeat(MAX_STATEMENT + 1);
        assert!(statement(&HeaderMap::new(), PURPOSE_HEADER, Some(&long)).is_err());
        let control = "a\u{7}b".to_owned();
        assert!(statement(&HeaderMap::new(), PURPOSE_HEADER, Some(&control)).is_err());
    }
}
