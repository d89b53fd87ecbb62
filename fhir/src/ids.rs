//! Identifier systems (one base, `urn:vitalmq:`) and the deterministic Bundle ids.
//!
//! Every resource a Bundle carries gets `fullUrl = urn:uuid:<v5>` where the UUID is
//! name-based (RFC 9562 v5) on `<system>|<value>` of its business identifier, under a
//! fixed vitalmq namespace: the same event, device or alert change always gives the same
//! fullUrl, so the same input gives a byte-identical Bundle.

use serde_json::{Value as Json, json};
use uuid::Uuid;

/// Observation: `<event id>/<metric>`; the blood-pressure panel `<event id>:bp`.
pub const OBSERVATION: &str = "urn:vitalmq:observation";
/// The event a resource comes from (`ev1-...`, SPEC section 4's deterministic id).
pub const EVENT: &str = "urn:vitalmq:event";
/// Device: the registered device id.
pub const DEVICE: &str = "urn:vitalmq:device";
/// The patient, only ever by pseudonym (`pt-...`), never a direct identifier.
pub const PATIENT: &str = "urn:vitalmq:patient-pseudonym";
/// The site a device is registered to.
pub const SITE: &str = "urn:vitalmq:site";
/// A clinical alert episode (DetectedIssue, Task): the `alert_id`.
pub const ALERT: &str = "urn:vitalmq:alert";
/// One state change of an alert (Communication): `<alert_id>/<state>/<recorded ms>`.
pub const ALERT_CHANGE: &str = "urn:vitalmq:alert-change";
/// SHA-256 (hex) of the raw COSE_Sign1 bytes as received.
pub const RAW_SHA256: &str = "urn:vitalmq:raw-sha256";
/// A vitalmq component (the bridge that verified and recorded).
pub const COMPONENT: &str = "urn:vitalmq:component";
/// URIs as identifier values (SPIFFE ids of gateways, bridges, acknowledgers): FHIR's
/// own system for "the value is a URI".
pub const URI: &str = "urn:ietf:rfc:3986";

/// The namespace of vitalmq's name-based UUIDs: v5 of `urn:vitalmq` in the URL namespace.
fn namespace() -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_URL, b"urn:vitalmq")
}

/// The deterministic `urn:uuid:` fullUrl of the resource of `resource_type` identified
/// by `system|value`.
pub fn full_url(resource_type: &str, system: &str, value: &str) -> String {
    let name = format!("{resource_type}|{system}|{value}");
    format!("urn:uuid:{}", Uuid::new_v5(&namespace(), name.as_bytes()))
}

/// What FHIR search parameter values must escape (R4 3.1.1.5.7 "Escaping Search
/// Parameters"): `\\`, `,` (OR), `|` (system separator), `$` (composite).
fn search_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '\\' | ',' | '|' | '$') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Percent-encoded in a URL query: everything but RFC 3986 unreserved characters and
/// the `:`/`/` URIs are made of (so `&`, `#`, `%`, `+`, `=`, spaces and the search
/// escapes cannot break the query).
const QUERY_VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b':')
    .remove(b'/');

/// The token search `system|value` as it goes into a URL query (`ifNoneExist`,
/// a conditional update's URL): each part FHIR-escaped, then percent-encoded; the
/// separating `|` stays. A metric, device or alert name is arbitrary text: unescaped,
/// `a,b` would search for `a` OR `b` (two matches: 412, the batch stuck).
pub fn token_query(system: &str, value: &str) -> String {
    let enc =
        |s: &str| percent_encoding::utf8_percent_encode(&search_escape(s), QUERY_VALUE).to_string();
    format!("{}|{}", enc(system), enc(value))
}

/// An Identifier.
pub fn identifier(system: &str, value: &str) -> Json {
    json!({"system": system, "value": value})
}

/// A Reference by business identifier only (logical reference), with its type.
pub fn logical(resource_type: &str, system: &str, value: &str) -> Json {
    json!({"type": resource_type, "identifier": identifier(system, value)})
}

/// A Reference to a resource in the same Bundle, with its identifier too so it still
/// means something when the resource travels alone.
pub fn local(resource_type: &str, system: &str, value: &str) -> Json {
    json!({
        "reference": full_url(resource_type, system, value),
        "type": resource_type,
        "identifier": identifier(system, value),
    })
}

/// The patient, by pseudonym only.
pub fn patient(patient_ref: &str) -> Json {
    logical("Patient", PATIENT, patient_ref)
}

/// The device, as a resource of the same Bundle.
pub fn device(device: &str) -> Json {
    local("Device", DEVICE, device)
}

/// RFC 3339 UTC text (milliseconds) of a Unix time in ms.
pub fn instant(ms: u64) -> Result<String, crate::Error> {
    let secs = ms / 1000;
    let millis = ms % 1000;
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let days = i64::try_from(secs / 86_400).map_err(|_| crate::Error::Time(ms))?;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    if y > 9999 {
        return Err(crate::Error::Time(ms));
    }
    Ok(format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_urls_are_deterministic_and_distinct() {
        let a = full_url("Device", DEVICE, "dev-1");
        assert_eq!(a, full_url("Device", DEVICE, "dev-1"));
        assert_ne!(a, full_url("Device", DEVICE, "dev-2"));
        assert_ne!(a, full_url("Observation", DEVICE, "dev-1"));
        assert!(a.starts_with("urn:uuid:"));
        let u = Uuid::parse_str(&a["urn:uuid:".len()..]).expect("uuid");
        assert_eq!(u.get_version_num(), 5);
    }

    #[test]
    fn instants() {
        assert_eq!(instant(0).expect("t"), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            instant(1_763_726_405_123).expect("t"),
            "2025-11-21T12:00:05.123Z"
        );
        assert_eq!(
            instant(951_782_400_000).expect("t"),
            "2000-02-29T00:00:00.000Z"
        );
        assert!(instant(u64::MAX).is_err());
    }
}
