//! The report of a load run (`vitalmq sim --latency-report FILE`): the machine-readable
//! JSON (format `vitalmq-sim-load/v1`) and a short human summary, both made from the
//! run's [`Summary`] and its [`Recorded`] latencies. Pure: the caller writes them.
//!
//! Accounting: `made` counts every vitals and status message the devices signed;
//! `receipted` the ones a bridge receipt released from an outbox; `lost` is
//! `made - receipted`, i.e. still held at the end or dropped from a full outbox.
//! `bridge.latency.samples + untimed` equals `receipted` unless an outbox overflowed.

use serde::Serialize;

use vitalmq_device_sim::runner::Summary;

use crate::alert_watch::WatchReport;
use crate::latency::{Percentiles, Recorded};
use crate::sim_load::LoadObserved;

/// How the load run was set up (echoed into the report).
#[derive(Debug, Clone, Serialize)]
pub struct LoadSetup {
    pub devices: usize,
    /// Vitals messages per second over all devices.
    pub aggregate_rate: f64,
    pub per_device_rate: f64,
    /// New connections per second at start-up (`null`: all at once).
    pub connect_rate: Option<f64>,
    pub time_scale: f64,
    /// Generation time, seconds (`null`: `--count` or until interrupted).
    pub duration_s: Option<f64>,
    /// The bridge's `receipt_interval_ms` as given by `--receipt-interval` (`null`: not
    /// given). Receipts are coalesced over this interval, so it bounds the part of the
    /// bridge latency that is deliberate delay.
    pub receipt_interval_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Connect {
    /// From the first device starting to every device connected and subscribed.
    pub all_connected_ms: Option<f64>,
    /// Connections made, reconnects included.
    pub connects: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Messages {
    pub made: u64,
    /// First publishes.
    pub sent: u64,
    pub resent: u64,
    pub receipted: u64,
    /// `made - receipted`.
    pub lost: u64,
    pub held_at_end: usize,
    pub overflow_dropped: u64,
    /// Receipted, but the publish time was no longer held (not in `bridge.latency`).
    pub untimed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Bridge {
    /// Receipts applied; `messages.receipted / receipts` is the coalescing factor.
    pub receipts: u64,
    /// First publish -> the first receipt covering the message, per message.
    pub latency: Percentiles,
}

#[derive(Debug, Clone, Serialize)]
pub struct Alerts {
    pub watchers: Vec<WatchReport>,
    pub received: u64,
    pub unmatched: u64,
    pub malformed: u64,
    pub by_state: std::collections::BTreeMap<String, u64>,
    /// First publish of the alert's newest evidence -> the alert at the integrator.
    pub latency: Percentiles,
}

#[derive(Debug, Clone, Serialize)]
pub struct Process {
    pub rss_connected_kib: Option<u64>,
    pub rss_end_kib: Option<u64>,
    pub rss_peak_kib: Option<u64>,
}

/// The JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub format: &'static str,
    pub setup: LoadSetup,
    pub elapsed_s: f64,
    pub connect: Connect,
    pub messages: Messages,
    pub bridge: Bridge,
    pub alerts: Alerts,
    pub process: Process,
    /// Devices that stopped on an error (see the summary on stdout).
    pub device_errors: usize,
}

impl LoadReport {
    /// Assembles the report; `rss_end_kib` and `rss_peak_kib` are sampled by the caller.
    pub fn new(
        setup: LoadSetup,
        summary: &Summary,
        load: LoadObserved,
        recorded: Recorded,
        rss_end_kib: Option<u64>,
        rss_peak_kib: Option<u64>,
    ) -> Self {
        let t = &summary.totals;
        let made = t.vitals + t.status;
        Self {
            format: "vitalmq-sim-load/v1",
            setup,
            elapsed_s: summary.elapsed_s,
            connect: Connect {
                all_connected_ms: summary
                    .all_connected
                    .map(|d| (d.as_secs_f64() * 10_000.0).round() / 10.0),
                connects: t.connects,
            },
            messages: Messages {
                made,
                sent: t.sent,
                resent: t.resent,
                receipted: recorded.receipted,
                lost: made.saturating_sub(recorded.receipted),
                held_at_end: t.unreceipted,
                overflow_dropped: t.overflow_dropped,
                untimed: recorded.untimed,
            },
            bridge: Bridge {
                receipts: recorded.receipts,
                latency: recorded.bridge,
            },
            alerts: Alerts {
                watchers: load.watchers,
                received: recorded.alerts_received,
                unmatched: recorded.alerts_unmatched,
                malformed: recorded.alerts_malformed,
                by_state: recorded.alerts_by_state,
                latency: recorded.alerts,
            },
            process: Process {
                rss_connected_kib: load.rss_connected_kib,
                rss_end_kib,
                rss_peak_kib,
            },
            device_errors: t.errors,
        }
    }

    /// A few lines for people (stderr).
    pub fn human(&self) -> String {
        let ms = |us: u64| us as f64 / 1000.0;
        let s = &self.setup;
        let m = &self.messages;
        let b = &self.bridge.latency;
        let a = &self.alerts.latency;
        let interval = s
            .receipt_interval_ms
            .map_or_else(|| "not given".to_owned(), |v| format!("{v} ms"));
        let mut out = format!(
            "load: {} devices, {} msg/s in total ({:.3}/s each), all connected in {}\n",
            s.devices,
            s.aggregate_rate,
            s.per_device_rate,
            self.connect
                .all_connected_ms
                .map_or_else(|| "-".to_owned(), |v| format!("{:.1} s", v / 1000.0)),
        );
        out += &format!(
            "messages: made {} sent {} resent {} receipted {} lost {} (untimed {})\n",
            m.made, m.sent, m.resent, m.receipted, m.lost, m.untimed
        );
        out += &format!(
            "to the bridge (publish -> receipt, receipt interval {interval}): n {} p50 {:.1} ms p90 {:.1} p99 {:.1} p99.9 {:.1} max {:.1} ms; {} receipts\n",
            b.samples,
            ms(b.p50_us),
            ms(b.p90_us),
            ms(b.p99_us),
            ms(b.p999_us),
            ms(b.max_us),
            self.bridge.receipts
        );
        out += &format!(
            "to the alert topics (publish -> integrator): n {} p50 {:.1} ms p99 {:.1} max {:.1} ms; {} alerts received, {} unmatched\n",
            a.samples,
            ms(a.p50_us),
            ms(a.p99_us),
            ms(a.max_us),
            self.alerts.received,
            self.alerts.unmatched
        );
        out += &format!(
            "process RSS: {} KiB connected, {} KiB peak",
            self.process
                .rss_connected_kib
                .map_or_else(|| "-".to_owned(), |v| v.to_string()),
            self.process
                .rss_peak_kib
                .map_or_else(|| "-".to_owned(), |v| v.to_string()),
        );
        out
    }
}
