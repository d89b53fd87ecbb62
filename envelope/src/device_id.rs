//! The device identifier shared by certificates, topics, `kid` and the payload's `dev`.

use std::fmt;
use std::str::FromStr;

/// A device id as SPEC section 1 defines it: `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`.
///
/// Holding a `DeviceId` proves the grammar was checked, so topic and path code can
/// interpolate it without escaping.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

/// A string that is not a valid device id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{shown}` is not a device id: it must match [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}")]
pub struct InvalidDeviceId {
    /// The offending input, escaped and cut to a printable length.
    pub shown: String,
}

impl DeviceId {
    /// Longest id the grammar allows.
    pub const MAX_LEN: usize = 64;

    /// Checks the grammar and wraps the id.
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidDeviceId> {
        let id = id.into();
        if is_valid(&id) {
            Ok(Self(id))
        } else {
            let shown: String = id.escape_debug().take(80).collect();
            Err(InvalidDeviceId { shown })
        }
    }

    /// Parses a `kid` byte string (UTF-8 device id).
    pub fn from_utf8(bytes: &[u8]) -> Result<Self, InvalidDeviceId> {
        match std::str::from_utf8(bytes) {
            Ok(text) => Self::new(text),
            Err(_) => Err(InvalidDeviceId {
                shown: format!("0x{}", hex::encode(&bytes[..bytes.len().min(40)])),
            }),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_valid(id: &str) -> bool {
    let bytes = id.as_bytes();
    match bytes.split_first() {
        Some((first, rest)) => {
            bytes.len() <= DeviceId::MAX_LEN
                && first.is_ascii_alphanumeric()
                && rest
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        }
        None => false,
    }
}

impl FromStr for DeviceId {
    type Err = InvalidDeviceId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for DeviceId {
    type Error = InvalidDeviceId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<DeviceId> for String {
    fn from(id: DeviceId) -> Self {
        id.0
    }
}

impl AsRef<str> for DeviceId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar() {
        for ok in ["dev-00042", "a", "A.b_c-9", &"x".repeat(64)] {
            assert!(DeviceId::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-dev",
            ".x",
            "dev/1",
            "dev+",
            "dév",
            &"x".repeat(65),
            "a b",
        ] {
            assert!(DeviceId::new(bad).is_err(), "{bad}");
        }
        assert!(DeviceId::from_utf8(&[0xff, 0x00]).is_err());
    }
}
