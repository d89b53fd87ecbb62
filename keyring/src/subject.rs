//! Whose data a key protects.

use crate::KeyError;

/// The owner of a data key: a patient's care pseudonym (`pt-...`) or a system subject
/// (`sys:quarantine`, ...). Short ASCII only: it is written into every sealed header.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subject(String);

/// Longest subject name; it must fit the sealed header's one-byte length.
pub const MAX_SUBJECT_LEN: usize = 64;

impl Subject {
    pub fn new(name: &str) -> Result<Self, KeyError> {
        let valid = !name.is_empty()
            && name.len() <= MAX_SUBJECT_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        if valid {
            Ok(Self(name.to_owned()))
        } else {
            Err(KeyError::InvalidSubject(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patient_and_system_subjects_are_valid() {
        assert!(Subject::new("pt-7f3a9c2e").is_ok());
        assert!(Subject::new("sys:quarantine").is_ok());
    }

    #[test]
    fn empty_long_or_odd_subjects_are_refused() {
        assert!(Subject::new("").is_err());
        assert!(Subject::new(&"a".repeat(MAX_SUBJECT_LEN + 1)).is_err());
        assert!(Subject::new("pt 1").is_err());
        assert!(Subject::new("pt/1").is_err());
        assert!(Subject::new("pé").is_err());
    }
}
