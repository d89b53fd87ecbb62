//! Durations as people type them on the command line (`500ms`, `30s`, `5m`, `1h`, or
//! plain seconds), shared by the episode, fault and schedule options.

//!
//! Not `humantime`: it takes no fractions (`2.5`, `1.5s`) and no bare numbers, and
//! takes days and compound forms (`1h 30m`), so the accepted syntax would change.

use std::time::Duration;

/// A value that is not a duration or offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("`{0}` is not a duration (e.g. 500ms, 30s, 5m, 1h)")]
    NotANumber(String),
    #[error("`{input}`: unknown unit `{unit}` (ms, s, m, h)")]
    UnknownUnit { input: String, unit: String },
    #[error("`{0}` is not a duration")]
    OutOfRange(String),
    #[error("`{0}` is too large")]
    TooLarge(String),
}

/// A duration as `500ms`, `30s`, `5m`, `1h` or plain seconds (`2.5`).
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| DurationError::NotANumber(s.to_owned()))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(DurationError::UnknownUnit {
                input: s.to_owned(),
                unit: unit.to_owned(),
            });
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| DurationError::OutOfRange(s.to_owned()))
}

/// A signed offset as `+90s`, `-2m` or `5m` (positive), in milliseconds.
pub fn parse_offset_ms(s: &str) -> Result<i64, DurationError> {
    let s = s.trim();
    let (sign, magnitude) = match s.strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, s.strip_prefix('+').unwrap_or(s)),
    };
    let d = parse_duration(magnitude)?;
    let ms = i64::try_from(d.as_millis()).map_err(|_| DurationError::TooLarge(s.to_owned()))?;
    Ok(sign * ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2.5"), Ok(Duration::from_millis(2500)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3d").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn offsets() {
        assert_eq!(parse_offset_ms("+90s"), Ok(90_000));
        assert_eq!(parse_offset_ms("-2m"), Ok(-120_000));
        assert_eq!(parse_offset_ms("5m"), Ok(300_000));
        assert!(parse_offset_ms("--1s").is_err());
        assert!(parse_offset_ms("later").is_err());
    }
}
