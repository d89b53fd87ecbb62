//! The live progress line, one every two seconds: devices connected (from the
//! simulator), what the bridge stored and refused (from its store, on a read
//! connection of its own, as `vitalmq store stats` reads it) and alerts seen (from the
//! operator view).

use std::path::Path;
use std::time::Instant;

use vitalmq_bridge::store::{Store, StoreStats};

/// Reads the bridge's store for the progress line.
#[derive(Debug)]
pub struct Progress {
    store: Store,
    started: Instant,
    last: Option<(Instant, u64)>,
}

/// What the store says, reduced to what the line shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub events: u64,
    /// Quarantined messages by SPEC reason class.
    pub refused: Vec<(String, u64)>,
    pub duplicates: u64,
    pub replays: u64,
    pub gaps_open: u64,
    pub gaps_closed: u64,
    pub gaps_lost: u64,
}

impl Counts {
    /// From `Store::stats()`.
    pub fn from_stats(stats: &StoreStats) -> Self {
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        Self {
            events: stats.events,
            refused: stats
                .quarantine
                .iter()
                .map(|(reason, count)| (reason.to_owned(), n(count)))
                .collect(),
            duplicates: n(stats.counters.get("duplicate")),
            replays: n(stats.counters.get("replay")),
            gaps_open: n(stats.gaps.get("open")),
            gaps_closed: n(stats.gaps.get("closed")),
            gaps_lost: n(stats.gaps.get("lost")),
        }
    }

    pub fn refused_text(&self) -> String {
        if self.refused.is_empty() {
            return "none".to_owned();
        }
        self.refused
            .iter()
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Progress {
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            store: Store::open(data_dir)?,
            started: Instant::now(),
            last: None,
        })
    }

    /// The current counts.
    pub fn counts(&self) -> anyhow::Result<Counts> {
        Ok(Counts::from_stats(&self.store.stats()?))
    }

    /// Whether every sink has confirmed everything stored.
    pub fn sink_caught_up(&self) -> anyhow::Result<bool> {
        let stats = self.store.stats()?;
        Ok(stats.sinks.iter().all(|(_, through)| through >= stats.head))
    }

    /// One progress line.
    pub fn line(&mut self, connected: usize, devices: usize, alerts: usize) -> String {
        let now = Instant::now();
        let c = match self.counts() {
            Ok(c) => c,
            Err(e) => return format!("  (store not readable yet: {e})"),
        };
        let (at, before) = self.last.unwrap_or((self.started, 0));
        let rate = match now.duration_since(at).as_secs_f64() {
            secs if secs > 0.0 => c.events.saturating_sub(before) as f64 / secs,
            _ => 0.0,
        };
        self.last = Some((now, c.events));
        format!(
            "  [{:>3}s] devices {connected}/{devices} | accepted {} ({rate:.0}/s) | refused: {} | duplicates {} | replays {} | gaps {} open, {} closed, {} lost | alerts {alerts}",
            self.started.elapsed().as_secs(),
            c.events,
            c.refused_text(),
            c.duplicates,
            c.replays,
            c.gaps_open,
            c.gaps_closed,
            c.gaps_lost,
        )
    }
}

#[cfg(test)]
mod tests {
    use vitalmq_bridge::store::Tally;

    use super::*;

    #[test]
    fn counts_from_store_stats() {
        let stats = StoreStats {
            events: 120,
            devices: 3,
            quarantine: [("bad_signature", 1)].into_iter().collect(),
            counters: [("duplicate", 2), ("replay", 1), ("bad_signature", 1)]
                .into_iter()
                .collect(),
            gaps: [("closed", 1)].into_iter().collect(),
            sinks: [("objects", 100)].into_iter().collect(),
            alerts: Tally::default(),
            alert_handlers: Tally::default(),
            withheld: Tally::default(),
            alerts_withheld: Tally::default(),
            head: 120,
        };
        let c = Counts::from_stats(&stats);
        assert_eq!(
            c,
            Counts {
                events: 120,
                refused: vec![("bad_signature".into(), 1)],
                duplicates: 2,
                replays: 1,
                gaps_open: 0,
                gaps_closed: 1,
                gaps_lost: 0,
            }
        );
        assert_eq!(c.refused_text(), "bad_signature 1");
        assert_eq!(Counts::default().refused_text(), "none");
    }
}
