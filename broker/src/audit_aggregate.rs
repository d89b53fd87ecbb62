//! Repeated connection refusals, aggregated: one record per kind and source per
//! interval instead of one per connection (issue 15: 10,569 unauthenticated connects
//! in 5 s wrote 10,581 records).
//!
//! Within an interval, the first refusal of a kind (`class`, `reason`) from a source
//! address (IP, without the port) is written as before; the repeats are only counted,
//! and at the interval's end one summary record per (source, kind) carries their
//! number (`details.repeats`). Nothing is hidden: every refusal is in a record or in a
//! count. Memory is bounded by `max_sources` keys per interval: refusals of keys beyond
//! it are counted per class in one overflow record (`reason` `aggregate_overflow`),
//! whose `details.refusals` is their number. Summaries are written at every interval's
//! end and on shutdown; one that cannot be written is carried into the next interval.
//!
//! [`Aggregator`] is the sans-IO core (time passed in); [`RefusalAudit`] the shell the
//! accept loop calls, with [`RefusalAudit::run`] as its timer.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use vitalmq_audit::{Actor, AuditRecord, Component, Decision, Event};

use crate::gate::{AuditSink, AuditUnavailable};

/// The kind of a refusal and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct RefusalKey {
    pub(crate) source: IpAddr,
    /// Coarse class (`tls`, `rate_limited`, `max_connections`, ...).
    pub(crate) class: String,
    /// The finer reason token the record carries.
    pub(crate) reason: String,
}

/// What to do with one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// The first of its kind from its source this interval: write its record.
    Write,
    /// A repeat (or past the bound): counted into a summary.
    Counted,
}

/// A summary due at an interval's end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Summary {
    /// `repeats` refusals of `key` after the one written.
    Repeats { key: RefusalKey, repeats: u64 },
    /// Refusals of keys beyond the bound, per class.
    Overflow { by_class: BTreeMap<String, u64> },
}

/// Counts per interval; see the module docs.
#[derive(Debug)]
pub(crate) struct Aggregator {
    max_sources: usize,
    repeats: HashMap<RefusalKey, u64>,
    overflow: BTreeMap<String, u64>,
}

impl Aggregator {
    pub(crate) fn new(max_sources: usize) -> Self {
        Self {
            max_sources,
            repeats: HashMap::new(),
            overflow: BTreeMap::new(),
        }
    }

    pub(crate) fn offer(&mut self, key: RefusalKey) -> Admit {
        if let Some(n) = self.repeats.get_mut(&key) {
            *n += 1;
            return Admit::Counted;
        }
        if self.repeats.len() < self.max_sources {
            self.repeats.insert(key, 0);
            return Admit::Write;
        }
        self.count_overflow(key.class, 1);
        Admit::Counted
    }

    /// Ends the interval: the summaries to write, in a stable order.
    pub(crate) fn flush(&mut self) -> Vec<Summary> {
        let mut repeats: Vec<Summary> = std::mem::take(&mut self.repeats)
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(key, repeats)| Summary::Repeats { key, repeats })
            .collect();
        repeats.sort_by(|a, b| match (a, b) {
            (Summary::Repeats { key: a, .. }, Summary::Repeats { key: b, .. }) => a.cmp(b),
            _ => std::cmp::Ordering::Equal,
        });
        let overflow = std::mem::take(&mut self.overflow);
        if !overflow.is_empty() {
            repeats.push(Summary::Overflow { by_class: overflow });
        }
        repeats
    }

    /// Takes back a summary that could not be written, into the current interval.
    pub(crate) fn carry(&mut self, summary: Summary) {
        match summary {
            Summary::Repeats { key, repeats } => {
                if let Some(n) = self.repeats.get_mut(&key) {
                    *n += repeats;
                } else if self.repeats.len() < self.max_sources {
                    self.repeats.insert(key, repeats);
                } else {
                    self.count_overflow(key.class, repeats);
                }
            }
            Summary::Overflow { by_class } => {
                for (class, n) in by_class {
                    self.count_overflow(class, n);
                }
            }
        }
    }

    fn count_overflow(&mut self, class: String, n: u64) {
        // Classes are a small fixed set of tokens, so this map stays small.
        *self.overflow.entry(class).or_default() += n;
    }
}

/// The record of one refused connection, as the accept loop has always written it.
pub(crate) fn refusal_record(remote: SocketAddr, class: &str, reason: &str) -> AuditRecord {
    AuditRecord::new(Component::Broker, Event::ConnectionRefused)
        .actor(Actor {
            addr: Some(remote.to_string()),
            ..Actor::default()
        })
        .action("handshake")
        .decision(Decision::Deny)
        .reason(reason.to_owned())
        .detail("class", class.to_owned())
}

fn summary_record(summary: &Summary, interval: Duration, max_sources: usize) -> AuditRecord {
    let interval_s = interval.as_secs_f64();
    match summary {
        Summary::Repeats { key, repeats } => {
            AuditRecord::new(Component::Broker, Event::ConnectionRefused)
                .actor(Actor {
                    addr: Some(key.source.to_string()),
                    ..Actor::default()
                })
                .action("handshake")
                .decision(Decision::Deny)
                .reason(key.reason.clone())
                .detail("class", key.class.clone())
                .detail("repeats", *repeats)
                .detail("interval_s", interval_s)
        }
        Summary::Overflow { by_class } => {
            let total: u64 = by_class.values().sum();
            let classes: serde_json::Map<String, serde_json::Value> = by_class
                .iter()
                .map(|(c, n)| (c.clone(), (*n).into()))
                .collect();
            AuditRecord::new(Component::Broker, Event::ConnectionRefused)
                .action("handshake")
                .decision(Decision::Deny)
                .reason("aggregate_overflow")
                .detail("refusals", total)
                .detail("by_class", serde_json::Value::Object(classes))
                .detail("max_sources", max_sources as u64)
                .detail("interval_s", interval_s)
        }
    }
}

/// Writes refusal records through an [`Aggregator`] (off when `interval` is zero).
#[derive(Debug)]
pub(crate) struct RefusalAudit {
    sink: Arc<dyn AuditSink>,
    interval: Duration,
    max_sources: usize,
    core: Mutex<Aggregator>,
}

impl RefusalAudit {
    pub(crate) fn new(sink: Arc<dyn AuditSink>, interval: Duration, max_sources: usize) -> Self {
        Self {
            sink,
            interval,
            max_sources,
            core: Mutex::new(Aggregator::new(max_sources)),
        }
    }

    /// Audits one refused connection: its record now ([`Admit::Write`]), or a count for
    /// the summary ([`Admit::Counted`]).
    pub(crate) fn refused(
        &self,
        remote: SocketAddr,
        class: &str,
        reason: &str,
    ) -> Result<Admit, AuditUnavailable> {
        if !self.interval.is_zero() {
            let key = RefusalKey {
                source: remote.ip(),
                class: class.to_owned(),
                reason: reason.to_owned(),
            };
            let admit = self
                .core
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .offer(key);
            if admit == Admit::Counted {
                metrics::counter!("vitalmq_audit_refusals_aggregated_total").increment(1);
                return Ok(Admit::Counted);
            }
        }
        self.sink
            .record(refusal_record(remote, class, reason))
            .map(|()| Admit::Write)
    }

    /// Writes the summaries of the interval that ends now.
    pub(crate) fn flush(&self) {
        let summaries = self
            .core
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .flush();
        for summary in summaries {
            let record = summary_record(&summary, self.interval, self.max_sources);
            if self.sink.record(record).is_err() {
                tracing::warn!(
                    ?summary,
                    "refusal summary not written; carried to the next interval"
                );
                self.core
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .carry(summary);
            }
        }
    }

    /// Flushes at the end of every interval, and once more when `shutdown` turns.
    pub(crate) async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        if self.interval.is_zero() {
            return;
        }
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = ticks.tick() => self.flush(),
                _ = shutdown.changed() => {
                    self.flush();
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ip: &str, class: &str) -> RefusalKey {
        RefusalKey {
            source: ip.parse().expect("ip"),
            class: class.to_owned(),
            reason: format!("{class}-reason"),
        }
    }

    #[test]
    fn the_first_of_a_kind_is_written_and_its_repeats_counted_per_interval() {
        let mut agg = Aggregator::new(8);
        assert_eq!(agg.offer(key("10.0.0.1", "tls")), Admit::Write);
        for _ in 0..999 {
            assert_eq!(agg.offer(key("10.0.0.1", "tls")), Admit::Counted);
        }
        // Another kind, or another source, is its own first.
        assert_eq!(agg.offer(key("10.0.0.1", "rate_limited")), Admit::Write);
        assert_eq!(agg.offer(key("10.0.0.2", "tls")), Admit::Write);
        assert_eq!(
            agg.flush(),
            [Summary::Repeats {
                key: key("10.0.0.1", "tls"),
                repeats: 999
            }]
        );
        // A new interval starts afresh.
        assert_eq!(agg.offer(key("10.0.0.1", "tls")), Admit::Write);
        assert_eq!(agg.flush(), []);
    }

    #[test]
    fn keys_past_the_bound_go_to_one_overflow_count() {
        let mut agg = Aggregator::new(2);
        assert_eq!(agg.offer(key("10.0.0.1", "tls")), Admit::Write);
        assert_eq!(agg.offer(key("10.0.0.2", "tls")), Admit::Write);
        for i in 3..103 {
            assert_eq!(
                agg.offer(key(&format!("10.0.1.{i}"), "tls")),
                Admit::Counted
            );
        }
        assert_eq!(agg.offer(key("10.0.0.9", "timeout")), Admit::Counted);
        assert_eq!(agg.repeats.len(), 2, "memory stays bounded");
        assert_eq!(
            agg.flush(),
            [Summary::Overflow {
                by_class: BTreeMap::from([("timeout".to_owned(), 1), ("tls".to_owned(), 100)])
            }]
        );
    }

    #[test]
    fn a_summary_carried_over_is_added_to_the_next() {
        let mut agg = Aggregator::new(4);
        agg.offer(key("10.0.0.1", "tls"));
        agg.offer(key("10.0.0.1", "tls"));
        let unwritten = agg.flush();
        agg.offer(key("10.0.0.1", "tls"));
        agg.offer(key("10.0.0.1", "tls"));
        for s in unwritten {
            agg.carry(s);
        }
        assert_eq!(
            agg.flush(),
            [Summary::Repeats {
                key: key("10.0.0.1", "tls"),
                repeats: 2
            }]
        );
    }

    #[derive(Debug, Default)]
    struct Captured(Mutex<Vec<AuditRecord>>);

    impl AuditSink for Captured {
        fn record(&self, record: AuditRecord) -> Result<(), AuditUnavailable> {
            self.0.lock().expect("lock").push(record);
            Ok(())
        }
    }

    impl Captured {
        fn records(&self) -> Vec<AuditRecord> {
            self.0.lock().expect("lock").clone()
        }
    }

    /// A flood from one address: one record at once, one summary at the interval's
    /// end (tokio's paused clock), and what is left is flushed at shutdown.
    #[tokio::test(start_paused = true)]
    async fn a_flood_becomes_a_record_and_a_summary_per_interval() {
        let sink = Arc::new(Captured::default());
        let audit = Arc::new(RefusalAudit::new(
            Arc::clone(&sink) as Arc<dyn AuditSink>,
            Duration::from_secs(10),
            1024,
        ));
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(Arc::clone(&audit).run(stop_rx));
        tokio::task::yield_now().await;
        let remote = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        for port in 0..10_000u16 {
            audit
                .refused(remote(port), "tls", "invalid_message")
                .expect("audited");
        }
        assert_eq!(sink.records().len(), 1);
        tokio::time::sleep(Duration::from_secs(10)).await;
        // The timer's flush runs at the interval's end: wait for its record.
        for _ in 0..1_000 {
            if sink.records().len() >= 2 {
                break;
            }
            tokio::task::yield_now().await;
        }
        let records = sink.records();
        assert_eq!(records[1].details["repeats"], 9_999);
        assert_eq!(
            records[1].actor.as_ref().and_then(|a| a.addr.as_deref()),
            Some("127.0.0.1")
        );
        assert_eq!(records[1].reason.as_deref(), Some("invalid_message"));

        for port in 0..5u16 {
            audit
                .refused(remote(port), "tls", "invalid_message")
                .expect("audited");
        }
        let _ = stop_tx.send(true);
        task.await.expect("task");
        let records = sink.records();
        assert_eq!(records.len(), 4, "{records:#?}");
        assert_eq!(records[3].details["repeats"], 4);
    }
}
