//! Device behaviours for the tests of issue 17 that are not faults of single messages:
//! a device that goes silent while staying connected (`--silent-after`) and a device
//! whose every message is forged (`--forged-only`). Both keep the accounting invariant
//! of [`crate::faults`]: no message is made outside the device's own sequence and outbox.

use std::str::FromStr;
use std::time::Duration;

use vitalmq_envelope::DeviceId;

use crate::duration::{DurationError, parse_duration};
use crate::faults::Scope;

/// Why a device selection does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModeSpecError {
    #[error("`{0}`: expected DURATION or DEVICE@DURATION")]
    Syntax(String),
    #[error("`{0}`: {1}")]
    Time(String, DurationError),
    #[error("`{0}` is neither `all` nor a device id")]
    NotADevice(String),
}

/// `all` or a device id.
pub fn parse_scope(s: &str) -> Result<Scope, ModeSpecError> {
    if s == "all" {
        return Ok(Scope::All);
    }
    DeviceId::new(s).map_err(|_| ModeSpecError::NotADevice(s.to_owned()))?;
    Ok(Scope::Device(s.to_owned()))
}

/// `--silent-after DURATION` (every device) or `DEVICE@DURATION`: from that wall-clock
/// time after the start the device publishes nothing more (no vitals, status, alarms,
/// resends or faults) but keeps its connection, answering keepalive, until the run ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SilentSpec {
    pub scope: Scope,
    pub after: Duration,
}

impl FromStr for SilentSpec {
    type Err = ModeSpecError;
    fn from_str(s: &str) -> Result<Self, ModeSpecError> {
        let (scope, after) = match s.split_once('@') {
            Some((device, after)) => (parse_scope(device)?, after),
            None => (Scope::All, s),
        };
        if after.is_empty() {
            return Err(ModeSpecError::Syntax(s.to_owned()));
        }
        let after = parse_duration(after).map_err(|e| ModeSpecError::Time(s.to_owned(), e))?;
        Ok(Self { scope, after })
    }
}

/// When `device` goes silent: the earliest of the specs that include it.
pub fn silent_after(specs: &[SilentSpec], device: &str) -> Option<Duration> {
    specs
        .iter()
        .filter(|s| s.scope.includes(device))
        .map(|s| s.after)
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_specs_name_all_or_one_device() {
        let all: SilentSpec = "30s".parse().expect("all");
        assert_eq!(
            all,
            SilentSpec {
                scope: Scope::All,
                after: Duration::from_secs(30)
            }
        );
        let one: SilentSpec = "dev-00002@1.5s".parse().expect("one");
        assert_eq!(one.scope, Scope::Device("dev-00002".into()));
        assert_eq!(one.after, Duration::from_millis(1500));
        for bad in ["", "soon", "dev 2@1s", "dev-00002@", "dev-00002@x"] {
            assert!(bad.parse::<SilentSpec>().is_err(), "{bad}");
        }
        let specs = [one, all];
        assert_eq!(
            silent_after(&specs, "dev-00002"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            silent_after(&specs, "dev-00001"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(silent_after(&specs[..1], "dev-00001"), None);
    }

    #[test]
    fn scopes() {
        assert_eq!(parse_scope("all"), Ok(Scope::All));
        assert_eq!(
            parse_scope("dev-00003"),
            Ok(Scope::Device("dev-00003".into()))
        );
        assert!(parse_scope("dev 3").is_err());
    }
}
