//! What `/readyz` answers: named checks, each a flag the process sets or a closure
//! asked at every request.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

type Check = Arc<dyn Fn() -> bool + Send + Sync>;

/// Named checks; the process is ready when all of them hold (and when there are none).
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Vec<(String, Check)>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// A check that holds while `flag` is true (read with `Acquire`).
    #[must_use]
    pub fn flag(self, name: impl Into<String>, flag: Arc<AtomicBool>) -> Self {
        self.check(name, move || flag.load(Ordering::Acquire))
    }

    /// A check that holds while `check` returns true; asked at every request, so it
    /// must be cheap and must not block.
    #[must_use]
    pub fn check(
        mut self,
        name: impl Into<String>,
        check: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Self {
        self.checks.push((name.into(), Arc::new(check)));
        self
    }

    /// The names of the checks that do not hold now, in the order they were added.
    pub fn failing(&self) -> Vec<&str> {
        self.checks
            .iter()
            .filter(|(_, check)| !check())
            .map(|(name, _)| name.as_str())
            .collect()
    }
}

impl fmt::Debug for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.checks.iter().map(|(name, _)| name))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_names_follow_flags_and_closures() {
        let connected = Arc::new(AtomicBool::new(false));
        let writable = Arc::new(AtomicBool::new(true));
        let r = Readiness::new()
            .flag("connected", Arc::clone(&connected))
            .flag("store_writable", Arc::clone(&writable))
            .check("never", || false);
        assert_eq!(r.failing(), ["connected", "never"]);
        connected.store(true, Ordering::Release);
        writable.store(false, Ordering::Release);
        assert_eq!(r.failing(), ["store_writable", "never"]);
        assert!(Readiness::new().failing().is_empty());
    }
}
