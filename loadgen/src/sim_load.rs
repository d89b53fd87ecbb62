//! The load mode of `vitalmq sim` (`--aggregate-rate`, `--latency-report`): the
//! simulator's fleet ([`vitalmq_device_sim::runner`]) with its schedules spread over one
//! period and its first connections paced ([`Spread`]), every device's first publishes
//! and receipts timed into a shared [`Recorder`], and one integrator per site
//! ([`crate::alert_watch`]) subscribed to the alerts before the first device starts.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use vitalmq_device_sim::gateway::load_registry;
use vitalmq_device_sim::pki::Pki;
use vitalmq_device_sim::ring::Key;
use vitalmq_device_sim::runner::{self, Control, SendObserver, SimOptions, Spread, Summary};

use crate::Error;
use crate::alert_watch::{self, FleetTimes, WatchReport};
use crate::latency::{Recorder, SendTimes};
use crate::process::proc_sample;

/// What load mode adds to a run.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// New device connections per second at start-up; `None`: all at once.
    pub connect_rate: Option<f64>,
    /// Where first publishes, receipts and alerts are timed.
    pub recorder: Arc<Recorder>,
    /// How long the alert watchers keep listening after the devices finished, for alerts
    /// still on their way.
    pub alert_grace: Duration,
    /// Longest wait for the alert watchers' subscriptions before the devices start.
    pub watch_timeout: Duration,
}

/// What a load run observed besides the recorder's figures.
#[derive(Debug, Clone, Default)]
pub struct LoadObserved {
    /// This process's resident set when every device was connected, KiB.
    pub rss_connected_kib: Option<u64>,
    /// One per site: the integrators that watched the alerts.
    pub watchers: Vec<WatchReport>,
}

/// One device's send times, timed into the shared recorder.
#[derive(Debug)]
struct Timed {
    recorder: Arc<Recorder>,
    times: Arc<Mutex<SendTimes>>,
}

impl SendObserver for Timed {
    fn on_sent(&self, key: Key, at: Instant) {
        self.recorder.on_sent(&self.times, key, at);
    }

    fn on_receipt(&self, receipt: Key, released: usize, at: Instant) {
        self.recorder.on_receipt(&self.times, receipt, released, at);
    }
}

/// Runs the fleet of `opts` in load mode; `on_ready` as for [`runner::run`].
pub async fn run(
    mut opts: SimOptions,
    load: &LoadOptions,
    control: watch::Receiver<Control>,
    on_ready: impl FnOnce(usize) + Send + 'static,
) -> Result<(Summary, LoadObserved), Error> {
    opts.spread = Some(Spread {
        connect_rate: load.connect_rate,
        ..Spread::default()
    });
    runner::validate(&opts)?;
    // Every device's send times, and the alert watchers, before any device.
    let pki = Pki::open(&opts.pki)?;
    let fleet: Vec<String> = pki.ids("device")?.into_iter().take(opts.devices).collect();
    let times: Arc<FleetTimes> = Arc::new(
        fleet
            .iter()
            .map(|d| (d.clone(), Arc::new(Mutex::new(SendTimes::new()))))
            .collect(),
    );
    let sites = alert_watch::plan(&fleet, &load_registry(&pki)?)?;
    let watchers = alert_watch::start(
        &pki,
        &opts.link.target,
        sites,
        Arc::clone(&load.recorder),
        Arc::clone(&times),
        load.watch_timeout,
    )
    .await?;
    if let Some(spread) = &mut opts.spread {
        for (device, times) in times.iter() {
            let timed = Timed {
                recorder: Arc::clone(&load.recorder),
                times: Arc::clone(times),
            };
            spread.observers.insert(device.clone(), Arc::new(timed));
        }
    }
    let rss_connected: Arc<OnceLock<Option<u64>>> = Arc::default();
    let rss_at_ready = Arc::clone(&rss_connected);
    let summary = runner::run(opts, control, move |n| {
        let _ = rss_at_ready.set(proc_sample(None).map(|p| p.rss_kib));
        on_ready(n);
    })
    .await;
    let summary = match summary {
        Ok(summary) => summary,
        Err(e) => {
            watchers.stop().await;
            return Err(e.into());
        }
    };
    // Alerts for the last messages may still be on their way.
    tokio::time::sleep(load.alert_grace).await;
    let observed = LoadObserved {
        rss_connected_kib: rss_connected.get().copied().flatten(),
        watchers: watchers.stop().await,
    };
    Ok((summary, observed))
}
