//! Strict CBOR well-formedness (RFC 8949 section 5.3.1) for the telemetry profile.
//!
//! `ciborium` happily decodes indefinite-length items and ignores what follows the first
//! item, while the profile (SPEC section 3) wants exactly one definite-length item. This
//! module checks that before any decoder builds values, without allocating: it walks the
//! item heads with an explicit, depth-bounded stack, so hostile input cannot recurse or
//! make it loop longer than the input is long (every item consumes at least one byte).

use std::fmt;

/// Deepest nesting of arrays and maps accepted. Telemetry is at most three levels deep
/// (envelope array, payload map, measurement map); headroom is left for unknown keys.
pub(crate) const MAX_DEPTH: usize = 16;

/// Why bytes are not exactly one strict CBOR data item. Offsets are byte positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CborError {
    /// The input ends inside a data item.
    Truncated { offset: usize },
    /// An indefinite-length string, array or map, or a break code.
    Indefinite { offset: usize },
    /// Additional information 28 to 30, or a two-byte simple value below 32.
    Reserved { offset: usize },
    /// A text string that is not UTF-8.
    InvalidUtf8 { offset: usize },
    /// Arrays and maps nested deeper than [`MAX_DEPTH`].
    TooDeep { offset: usize },
    /// Bytes left over after the first complete item.
    Trailing { offset: usize, extra: usize },
    /// No bytes at all.
    Empty,
}

impl fmt::Display for CborError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { offset } => write!(f, "CBOR ends inside an item (byte {offset})"),
            Self::Indefinite { offset } => {
                write!(f, "indefinite-length CBOR item at byte {offset}")
            }
            Self::Reserved { offset } => write!(f, "reserved CBOR encoding at byte {offset}"),
            Self::InvalidUtf8 { offset } => write!(f, "text string at byte {offset} is not UTF-8"),
            Self::TooDeep { offset } => {
                write!(f, "CBOR nested deeper than {MAX_DEPTH} at byte {offset}")
            }
            Self::Trailing { offset, extra } => {
                write!(
                    f,
                    "{extra} byte(s) after the CBOR item (from byte {offset})"
                )
            }
            Self::Empty => f.write_str("no CBOR data"),
        }
    }
}

impl std::error::Error for CborError {}

/// The head of one data item: major type, argument, and the head's length in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    pub major: u8,
    pub argument: u64,
    pub len: usize,
}

/// Reads the head at `offset`; indefinite lengths and breaks are refused here.
pub(crate) fn read_head(bytes: &[u8], offset: usize) -> Result<Head, CborError> {
    let initial = *bytes.get(offset).ok_or(CborError::Truncated { offset })?;
    let major = initial >> 5;
    let info = initial & 0x1f;
    let extra = match info {
        0..=23 => 0,
        24 => 1,
        25 => 2,
        26 => 4,
        27 => 8,
        28..=30 => return Err(CborError::Reserved { offset }),
        _ => return Err(CborError::Indefinite { offset }),
    };
    let argument = if extra == 0 {
        u64::from(info)
    } else {
        let field = bytes
            .get(offset + 1..offset + 1 + extra)
            .ok_or(CborError::Truncated { offset })?;
        field.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
    };
    if major == 7 && info == 24 && argument < 32 {
        return Err(CborError::Reserved { offset });
    }
    Ok(Head {
        major,
        argument,
        len: 1 + extra,
    })
}

/// Checks that `bytes` hold exactly one well-formed, definite-length CBOR data item with
/// UTF-8 text strings, nested at most [`MAX_DEPTH`] deep, and nothing after it.
pub fn check_single_item(bytes: &[u8]) -> Result<(), CborError> {
    if bytes.is_empty() {
        return Err(CborError::Empty);
    }
    let end = item_end(bytes, 0)?;
    if end != bytes.len() {
        return Err(CborError::Trailing {
            offset: end,
            extra: bytes.len() - end,
        });
    }
    Ok(())
}

/// Returns the offset just past the strict data item starting at `start`.
pub(crate) fn item_end(bytes: &[u8], start: usize) -> Result<usize, CborError> {
    // pending[d] = items still expected at nesting level d; level 0 is the one top item.
    let mut pending = [0u64; MAX_DEPTH + 1];
    let mut depth = 0usize;
    pending[0] = 1;
    let mut offset = start;
    loop {
        while depth > 0 && pending[depth] == 0 {
            depth -= 1;
        }
        if pending[depth] == 0 {
            return Ok(offset);
        }
        pending[depth] -= 1;
        let head = read_head(bytes, offset)?;
        let item_offset = offset;
        offset += head.len;
        match head.major {
            2 | 3 => {
                let len = usize::try_from(head.argument).map_err(|_| CborError::Truncated {
                    offset: item_offset,
                })?;
                let content = offset
                    .checked_add(len)
                    .and_then(|stop| bytes.get(offset..stop))
                    .ok_or(CborError::Truncated {
                        offset: item_offset,
                    })?;
                if head.major == 3 && std::str::from_utf8(content).is_err() {
                    return Err(CborError::InvalidUtf8 {
                        offset: item_offset,
                    });
                }
                offset += len;
            }
            4 | 5 => {
                let children = if head.major == 5 {
                    head.argument.checked_mul(2).ok_or(CborError::Truncated {
                        offset: item_offset,
                    })?
                } else {
                    head.argument
                };
                if children > 0 {
                    if depth == MAX_DEPTH {
                        return Err(CborError::TooDeep {
                            offset: item_offset,
                        });
                    }
                    depth += 1;
                    pending[depth] = children;
                }
            }
            // A tag is followed by exactly one item at the same level.
            6 => pending[depth] += 1,
            // Integers, simple values and floats carry everything in the head.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(hex_str: &str) -> Result<(), CborError> {
        check_single_item(&hex::decode(hex_str).expect("test hex"))
    }

    #[test]
    fn accepts_definite_items() {
        assert_eq!(check("00"), Ok(()));
        assert_eq!(check("1bffffffffffffffff"), Ok(()));
        assert_eq!(check("d28440a0f640"), Ok(()));
        assert_eq!(check("a1616101"), Ok(()));
        assert_eq!(check("fb3fef0a3d70a3d70a"), Ok(()));
        assert_eq!(check("80"), Ok(()));
    }

    #[test]
    fn refuses_indefinite_lengths_and_breaks() {
        assert_eq!(check("9f00ff"), Err(CborError::Indefinite { offset: 0 }));
        assert_eq!(
            check("bf616100ff"),
            Err(CborError::Indefinite { offset: 0 })
        );
        assert_eq!(check("5f4100ff"), Err(CborError::Indefinite { offset: 0 }));
        assert_eq!(check("ff"), Err(CborError::Indefinite { offset: 0 }));
    }

    #[test]
    fn refuses_truncation_trailing_and_reserved() {
        assert_eq!(check(""), Err(CborError::Empty));
        assert_eq!(check("8201"), Err(CborError::Truncated { offset: 2 }));
        assert_eq!(check("43aabb"), Err(CborError::Truncated { offset: 0 }));
        assert_eq!(check("1b00"), Err(CborError::Truncated { offset: 0 }));
        assert_eq!(
            check("0000"),
            Err(CborError::Trailing {
                offset: 1,
                extra: 1
            })
        );
        assert_eq!(check("1c"), Err(CborError::Reserved { offset: 0 }));
        assert_eq!(check("f810"), Err(CborError::Reserved { offset: 0 }));
        assert_eq!(check("62c328"), Err(CborError::InvalidUtf8 { offset: 0 }));
    }

    #[test]
    fn huge_declared_lengths_are_truncation_not_allocation() {
        assert_eq!(
            check("9bffffffffffffffff"),
            Err(CborError::Truncated { offset: 9 })
        );
        assert_eq!(
            check("bbffffffffffffffff"),
            Err(CborError::Truncated { offset: 0 })
        );
        assert_eq!(
            check("5bffffffffffffffff"),
            Err(CborError::Truncated { offset: 0 })
        );
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = "81".repeat(MAX_DEPTH) + "00";
        assert_eq!(check(&deep), Ok(()));
        let too_deep = "81".repeat(MAX_DEPTH + 1) + "00";
        assert_eq!(
            check(&too_deep),
            Err(CborError::TooDeep { offset: MAX_DEPTH })
        );
    }
}
