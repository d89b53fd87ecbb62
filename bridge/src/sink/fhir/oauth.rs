//! OAuth 2.0 client credentials (RFC 6749 section 4.4): the bearer token the FHIR sink
//! sends, fetched from the token endpoint with HTTP Basic client authentication
//! (section 2.3.1: id and secret form-urlencoded, then base64), cached until shortly
//! before its `expires_in`, fetched again on demand (a 401 from the FHIR server).
//!
//! The secret and the tokens are never logged: [`TokenSource`]'s `Debug` names the
//! endpoint and the client id only.

use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::FhirFailure;

/// A token is used until this long before it expires (at most a tenth of its life).
const REFRESH_MARGIN: Duration = Duration::from_secs(30);

/// Fetches and caches client-credentials tokens.
pub struct TokenSource {
    client: reqwest::Client,
    token_url: String,
    client_id: String,
    /// `Basic base64(urlencode(id) ":" urlencode(secret))`.
    authorization: Zeroizing<String>,
    scope: Option<String>,
    cached: Mutex<Option<Cached>>,
}

struct Cached {
    token: Zeroizing<String>,
    use_until: Instant,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    token_type: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl TokenSource {
    pub fn new(
        client: reqwest::Client,
        token_url: String,
        client_id: String,
        secret: &[u8],
        scope: Option<String>,
    ) -> Self {
        let enc =
            |b: &[u8]| Zeroizing::new(url::form_urlencoded::byte_serialize(b).collect::<String>());
        let pair = Zeroizing::new(format!(
            "{}:{}",
            enc(client_id.as_bytes()).as_str(),
            enc(secret).as_str()
        ));
        let authorization = Zeroizing::new(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair.as_bytes())
        ));
        Self {
            client,
            token_url,
            client_id,
            authorization,
            scope,
            cached: Mutex::new(None),
        }
    }

    /// A token: the cached one while it is fresh, else a new one (`fresh`: a new one
    /// whatever the cache holds, after the server refused the cached one).
    pub async fn token(&self, fresh: bool) -> Result<Zeroizing<String>, FhirFailure> {
        let mut cached = self.cached.lock().await;
        if !fresh
            && let Some(c) = cached.as_ref()
            && Instant::now() < c.use_until
        {
            return Ok(c.token.clone());
        }
        *cached = None;
        let (token, lifetime) = self.fetch().await?;
        *cached = Some(Cached {
            token: token.clone(),
            use_until: Instant::now() + usable_for(lifetime),
        });
        Ok(token)
    }

    async fn fetch(&self) -> Result<(Zeroizing<String>, Option<Duration>), FhirFailure> {
        let mut form = vec![("grant_type", "client_credentials")];
        if let Some(scope) = &self.scope {
            form.push(("scope", scope.as_str()));
        }
        let response = self
            .client
            .post(&self.token_url)
            .header(reqwest::header::AUTHORIZATION, self.authorization.as_str())
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form)
            .send()
            .await
            .map_err(FhirFailure::Http)?;
        let status = response.status();
        let body = response.bytes().await.map_err(FhirFailure::Http)?;
        if !status.is_success() {
            // RFC 6749 5.2: `error` names what is wrong; never echo the body whole.
            let error = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or_default();
            return Err(FhirFailure::Token {
                status: status.as_u16(),
                error,
            });
        }
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| FhirFailure::TokenResponse(e.to_string()))?;
        if !parsed.token_type.eq_ignore_ascii_case("bearer") {
            return Err(FhirFailure::TokenResponse(format!(
                "token_type {:?}, expected Bearer",
                parsed.token_type
            )));
        }
        Ok((
            Zeroizing::new(parsed.access_token),
            parsed.expires_in.map(Duration::from_secs),
        ))
    }
}

/// How long a token that lives `lifetime` is used: until [`REFRESH_MARGIN`] (at most a
/// tenth of its life) before it expires; a token without `expires_in` until the server
/// refuses it.
pub(super) fn usable_for(lifetime: Option<Duration>) -> Duration {
    match lifetime {
        Some(l) => l.saturating_sub(REFRESH_MARGIN.min(l / 10)),
        None => Duration::from_secs(24 * 3600),
    }
}
