//! The live progress line, one every two seconds: devices connected (from the
//! simulator), what the bridge stored and refused (from its store, on a read
//! connection of its own, as `vitalmq store stats` reads it) and alerts seen (from the
//! operator view).

use std::path::Path;
use std::time::Instant;

use serde_json::Value as Json;
use vitalmq_bridge::store::Store;

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
    pub fn from_stats(stats: &Json) -> Self {
        let n = |v: &Json| v.as_u64().unwrap_or(0);
        let counters = &stats["counters"];
        let gaps = &stats["gaps"];
        Self {
            events: n(&stats["events"]),
            refused: stats["quarantine"]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), n(v))).collect())
                .unwrap_or_default(),
            duplicates: n(&counters["duplicate"]),
            replays: n(&counters["replay"]),
            gaps_open: n(&gaps["open"]),
            gaps_closed: n(&gaps["closed"]),
            gaps_lost: n(&gaps["lost"]),
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
        let head = stats["head"].as_i64().unwrap_or(0);
        Ok(stats["sinks"]
            .as_object()
            .is_some_and(|m| m.values().all(|v| v.as_i64().unwrap_or(0) >= head)))
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
    use super::*;

    #[test]
    fn counts_from_store_stats() {
        let stats = serde_json::json!({
            "events": 120, "devices": 3,
            "quarantine": {"bad_signature": 1},
            "counters": {"duplicate": 2, "replay": 1, "bad_signature": 1},
            "gaps": {"closed": 1},
            "sinks": {"objects": 100}, "head": 120
        });
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
