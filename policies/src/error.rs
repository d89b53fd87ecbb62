//! Policy errors that point at the file, line and field, all reported at once.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem in a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    /// 1-based line, when the problem can be placed.
    pub line: Option<usize>,
    /// Dotted path of the field, e.g. `devices[3].public_key`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in one load; never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(f, "{n} problem{} in policy", if n == 1 { "" } else { "s" })?;
        for e in &self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// Reads a policy file as UTF-8 text; a failure is one problem naming the file.
pub(crate) fn read_policy_file(path: &Path) -> Result<String, PolicyErrors> {
    let cannot = |message: String| {
        PolicyErrors(vec![PolicyError {
            file: path.to_path_buf(),
            line: None,
            field: None,
            message,
        }])
    };
    let bytes = std::fs::read(path).map_err(|e| cannot(format!("cannot read: {e}")))?;
    String::from_utf8(bytes).map_err(|e| cannot(format!("not UTF-8: {e}")))
}

/// Collects problems for one file, turning byte spans into line numbers.
#[derive(Debug)]
pub(crate) struct Problems<'a> {
    file: &'a Path,
    text: &'a str,
    found: Vec<PolicyError>,
}

impl<'a> Problems<'a> {
    pub(crate) fn new(file: &'a Path, text: &'a str) -> Self {
        Self {
            file,
            text,
            found: Vec::new(),
        }
    }

    pub(crate) fn line_of(&self, byte: usize) -> usize {
        self.text[..byte.min(self.text.len())].matches('\n').count() + 1
    }

    pub(crate) fn add(
        &mut self,
        span: Option<std::ops::Range<usize>>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) {
        let line = span.map(|s| self.line_of(s.start));
        self.found.push(PolicyError {
            file: self.file.to_path_buf(),
            line,
            field: Some(field.into()),
            message: message.into(),
        });
    }

    pub(crate) fn toml(&mut self, error: &toml::de::Error) {
        let line = error.span().map(|s| self.line_of(s.start));
        self.found.push(PolicyError {
            file: self.file.to_path_buf(),
            line,
            field: None,
            message: error.message().to_owned(),
        });
    }

    /// How many problems were found so far.
    pub(crate) fn len(&self) -> usize {
        self.found.len()
    }

    pub(crate) fn finish<T>(self, value: T) -> Result<T, PolicyErrors> {
        if self.found.is_empty() {
            Ok(value)
        } else {
            Err(PolicyErrors(self.found))
        }
    }
}
