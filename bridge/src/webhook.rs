//! Webhook signatures as the Standard Webhooks specification defines them (with its
//! published crate, `standardwebhooks`).
//!
//! What is signed is `{webhook-id}.{webhook-timestamp}.{body}`, so a captured request
//! cannot be replayed later: a receiver refuses a timestamp older than its tolerance
//! (the specification's libraries: five minutes) and deduplicates by `webhook-id`. The
//! id is `<alert_id>/<state>/<16 hex of the body's SHA-256>` (`delivery::change_id`),
//! the same for every retry of one alert change and different for each change, repeated
//! states included (it is also the `Idempotency-Key`); each attempt is signed with its
//! own timestamp.
//!
//! Key rotation: the secret's environment variable holds one or more secrets
//! (`whsec_<base64>`, separated by white space, the newest first); every request
//! carries a signature under each (`webhook-signature: v1,<a> v1,<b>`), so a receiver
//! that knows either key accepts it while it moves to the new one.

use standardwebhooks::Webhook;

pub use standardwebhooks::{HEADER_WEBHOOK_ID, HEADER_WEBHOOK_SIGNATURE, HEADER_WEBHOOK_TIMESTAMP};

/// Shortest key accepted (the specification recommends 24 to 64 random bytes).
pub const MIN_KEY_BYTES: usize = 24;
const SECRET_PREFIX: &str = "whsec_";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebhookSecretError {
    #[error("no secret: the value is empty")]
    Empty,
    #[error("secret {index}: not of the form whsec_<base64> (Standard Webhooks)")]
    NoPrefix { index: usize },
    #[error("secret {index}: not valid base64 after whsec_")]
    NotBase64 { index: usize },
    #[error("secret {index}: {len} bytes; at least {MIN_KEY_BYTES} are required")]
    TooShort { index: usize, len: usize },
}

#[derive(Debug, thiserror::Error)]
#[error("cannot sign the webhook body: {0}")]
pub struct SignError(#[from] standardwebhooks::WebhookError);

/// The three Standard Webhooks headers of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHeaders {
    pub id: String,
    pub timestamp: String,
    pub signature: String,
}

/// The keys an endpoint's requests are signed with, newest first.
pub struct WebhookSigner {
    keys: Vec<Webhook>,
}

impl std::fmt::Debug for WebhookSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WebhookSigner({} keys)", self.keys.len())
    }
}

impl WebhookSigner {
    /// Parses the secret variable's value: `whsec_<base64>` secrets separated by white
    /// space. Refuses short keys and anything but that form, so a plain password is
    /// not silently taken as a key.
    pub fn parse(value: &str) -> Result<Self, WebhookSecretError> {
        use base64::Engine as _;
        let mut keys = Vec::new();
        for (index, secret) in value.split_whitespace().enumerate() {
            let encoded = secret
                .strip_prefix(SECRET_PREFIX)
                .ok_or(WebhookSecretError::NoPrefix { index })?;
            let key = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|_| WebhookSecretError::NotBase64 { index })?;
            if key.len() < MIN_KEY_BYTES {
                return Err(WebhookSecretError::TooShort {
                    index,
                    len: key.len(),
                });
            }
            keys.push(
                Webhook::from_bytes(key).map_err(|_| WebhookSecretError::NotBase64 { index })?,
            );
        }
        if keys.is_empty() {
            return Err(WebhookSecretError::Empty);
        }
        Ok(Self { keys })
    }

    /// Signs `body` for message `id` at `timestamp` (Unix seconds) under every key.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> Result<SignedHeaders, SignError> {
        let signatures = self
            .keys
            .iter()
            .map(|k| k.sign(id, timestamp, body))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SignedHeaders {
            id: id.to_owned(),
            timestamp: timestamp.to_string(),
            signature: signatures.join(" "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn secret(byte: u8) -> String {
        format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode([byte; 32])
        )
    }

    fn headers(h: &SignedHeaders) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for (k, v) in [
            (HEADER_WEBHOOK_ID, &h.id),
            (HEADER_WEBHOOK_TIMESTAMP, &h.timestamp),
            (HEADER_WEBHOOK_SIGNATURE, &h.signature),
        ] {
            map.insert(k, v.parse().expect("header value"));
        }
        map
    }

    fn now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    #[test]
    fn id_timestamp_and_body_are_all_signed() {
        let signer = WebhookSigner::parse(&secret(7)).expect("secret");
        let verifier = Webhook::new(&secret(7)).expect("secret");
        let body = br#"{"alert_id":"a1","state":"open"}"#;
        let signed = signer.sign("a1/open", now(), body).expect("sign");
        verifier.verify(body, &headers(&signed)).expect("verifies");

        let mut other_id = signed.clone();
        other_id.id = "a1/resolved".into();
        assert!(verifier.verify(body, &headers(&other_id)).is_err());
        let mut other_time = signed.clone();
        other_time.timestamp = (now() - 1).to_string();
        assert!(verifier.verify(body, &headers(&other_time)).is_err());
        assert!(verifier.verify(b"{}", &headers(&signed)).is_err());
    }

    #[test]
    fn a_captured_request_replayed_later_is_refused() {
        let signer = WebhookSigner::parse(&secret(7)).expect("secret");
        let verifier = Webhook::new(&secret(7)).expect("secret");
        let body = b"{}";
        // Signed ten minutes ago: what an attacker replays now.
        let old = signer.sign("a1/open", now() - 600, body).expect("sign");
        let err = verifier.verify(body, &headers(&old)).expect_err("stale");
        assert!(matches!(
            err,
            standardwebhooks::WebhookError::TimestampTooOldError
        ));
    }

    #[test]
    fn during_rotation_either_key_verifies() {
        let signer = WebhookSigner::parse(&format!("{}  {}", secret(2), secret(1))).expect("two");
        let signed = signer.sign("a1/open", now(), b"{}").expect("sign");
        assert_eq!(signed.signature.split(' ').count(), 2);
        for key in [secret(1), secret(2)] {
            Webhook::new(&key)
                .expect("secret")
                .verify(b"{}", &headers(&signed))
                .expect("either key verifies");
        }
        assert!(
            Webhook::new(&secret(3))
                .expect("secret")
                .verify(b"{}", &headers(&signed))
                .is_err()
        );
    }

    #[test]
    fn secrets_must_be_standard_webhooks_keys() {
        assert_eq!(
            WebhookSigner::parse("  ").err(),
            Some(WebhookSecretError::Empty)
        );
        assert_eq!(
            WebhookSigner::parse("webhook-test-secret").err(),
            Some(WebhookSecretError::NoPrefix { index: 0 })
        );
        assert_eq!(
            WebhookSigner::parse(&format!("{} whsec_!!", secret(1))).err(),
            Some(WebhookSecretError::NotBase64 { index: 1 })
        );
        assert_eq!(
            WebhookSigner::parse("whsec_c2hvcnQ=").err(),
            Some(WebhookSecretError::TooShort { index: 0, len: 5 })
        );
    }
}
