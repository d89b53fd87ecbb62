//! RFC 3339 instants as registry v2 writes them, to and from Unix milliseconds (the
//! unit of [`crate::UnixMillis`]). Millisecond precision so a file round-trips exactly.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::assignment::UnixMillis;

/// Why an instant was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    #[error("not an RFC 3339 date-time (e.g. 2026-01-31T08:00:00Z): {0}")]
    Syntax(String),
    #[error("before the Unix epoch")]
    BeforeEpoch,
    #[error("more precise than a millisecond")]
    SubMillisecond,
}

/// Parses an RFC 3339 date-time (any offset) into Unix milliseconds.
pub fn parse_rfc3339(text: &str) -> Result<UnixMillis, TimeError> {
    let t = OffsetDateTime::parse(text, &Rfc3339).map_err(|e| TimeError::Syntax(e.to_string()))?;
    let nanos = t.unix_timestamp_nanos();
    if nanos < 0 {
        return Err(TimeError::BeforeEpoch);
    }
    if nanos % 1_000_000 != 0 {
        return Err(TimeError::SubMillisecond);
    }
    u64::try_from(nanos / 1_000_000).map_err(|_| TimeError::Syntax("out of range".into()))
}

/// Formats Unix milliseconds as RFC 3339 in UTC (`Z`), fractional seconds only when
/// there are any.
pub fn format_rfc3339(ms: UnixMillis) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        // Beyond year 9999 RFC 3339 has no form; the number still names the instant.
        .unwrap_or_else(|| format!("@{ms}ms"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_milliseconds_and_reads_offsets() {
        for ms in [0, 1, 1_767_225_600_000, 1_767_225_600_123] {
            assert_eq!(parse_rfc3339(&format_rfc3339(ms)), Ok(ms), "{ms}");
        }
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            parse_rfc3339("2026-01-01T01:00:00+01:00"),
            parse_rfc3339("2026-01-01T00:00:00Z")
        );
        assert_eq!(
            parse_rfc3339("1969-12-31T23:59:59Z"),
            Err(TimeError::BeforeEpoch)
        );
        assert_eq!(
            parse_rfc3339("2026-01-01T00:00:00.0001Z"),
            Err(TimeError::SubMillisecond)
        );
        assert!(matches!(
            parse_rfc3339("2026-01-01"),
            Err(TimeError::Syntax(_))
        ));
    }
}
