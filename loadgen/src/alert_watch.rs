//! The integrators of the simulator's load mode: per site with simulated devices, one
//! connection with the site's integrator identity (`identities/integrator/int-<site>`,
//! bound to the site in the registry) subscribed to `alerts/{site}/#`, the most the
//! shipped ACL lets an integrator see. Every alert received is handed to
//! [`Recorder::on_alert`] with the receive instant; the matching and the arithmetic are
//! there.
//!
//! A watcher is subscribed before any device starts (the runner waits for it), so no
//! alert of the run can be published before someone listens. It reconnects after a lost
//! connection (alerts published meanwhile are missed, and the report shows the extra
//! connects).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use vitalmq_device_sim::gateway::site_of;
use vitalmq_device_sim::pki::{Identity, Pki};
use vitalmq_mqtt_client::{Event, Session, SessionOptions, Target};

use crate::Error;
use crate::latency::{Recorder, SendTimes};

/// Each simulated device's send times, by device id; fixed once the devices exist.
pub(crate) type FleetTimes = HashMap<String, Arc<Mutex<SendTimes>>>;

/// One site to watch and the integrator that watches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SiteWatch {
    pub site: String,
    pub integrator: String,
}

/// The sites of `devices` (registry order is irrelevant: sorted by site) and, for each,
/// the first integrator the registry binds to it.
pub(crate) fn plan(
    devices: &[String],
    registry: &vitalmq_policies::DeviceRegistry,
) -> Result<Vec<SiteWatch>, Error> {
    let mut sites: Vec<String> = Vec::new();
    for d in devices {
        let site = site_of(d, registry)?;
        if !sites.contains(&site) {
            sites.push(site);
        }
    }
    sites.sort();
    sites
        .into_iter()
        .map(|site| {
            let integrator = registry
                .integrators()
                .filter(|i| i.site.to_string() == site)
                .map(|i| i.id.to_string())
                .min()
                .ok_or_else(|| Error::NoIntegrator(site.clone()))?;
            Ok(SiteWatch { site, integrator })
        })
        .collect()
}

/// What one watcher saw.
#[derive(Debug, Clone, Serialize)]
pub struct WatchReport {
    pub site: String,
    pub integrator: String,
    pub filter: String,
    pub connects: u64,
    pub alerts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Running watchers; [`Watchers::stop`] ends them and returns their reports.
#[derive(Debug)]
pub(crate) struct Watchers {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<WatchReport>>,
}

/// Starts one watcher per site and returns once every one is subscribed (or fails if
/// one is not within `timeout`, or its subscription is refused).
pub(crate) async fn start(
    pki: &Pki,
    target: &Target,
    sites: Vec<SiteWatch>,
    recorder: Arc<Recorder>,
    fleet: Arc<FleetTimes>,
    timeout: Duration,
) -> Result<Watchers, Error> {
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::with_capacity(sites.len());
    let mut ready = Vec::with_capacity(sites.len());
    for s in sites {
        let identity = pki.identity("integrator", &s.integrator)?;
        let (tx, rx) = oneshot::channel();
        ready.push((s.site.clone(), rx));
        let watcher = Watcher {
            filter: format!("alerts/{}/#", s.site),
            site: s,
            identity,
            target: target.clone(),
            recorder: Arc::clone(&recorder),
            fleet: Arc::clone(&fleet),
        };
        tasks.push(tokio::spawn(watcher.run(tx, stopped.clone())));
    }
    let watchers = Watchers { stop, tasks };
    for (site, rx) in ready {
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                watchers.stop().await;
                return Err(Error::Refused(format!("alert watcher of {site}: {e}")));
            }
            Ok(Err(_)) | Err(_) => {
                watchers.stop().await;
                return Err(Error::Timeout(format!(
                    "alert watcher of {site}: not subscribed within {timeout:?}"
                )));
            }
        }
    }
    Ok(watchers)
}

impl Watchers {
    /// Stops every watcher (closing its connection) and returns what each saw.
    pub(crate) async fn stop(self) -> Vec<WatchReport> {
        let _ = self.stop.send(true);
        let mut out = Vec::with_capacity(self.tasks.len());
        for t in self.tasks {
            if let Ok(r) = t.await {
                out.push(r);
            }
        }
        out
    }
}

struct Watcher {
    site: SiteWatch,
    filter: String,
    identity: Identity,
    target: Target,
    recorder: Arc<Recorder>,
    fleet: Arc<FleetTimes>,
}

impl Watcher {
    async fn run(
        self,
        ready: oneshot::Sender<Result<(), String>>,
        mut stop: watch::Receiver<bool>,
    ) -> WatchReport {
        let mut report = WatchReport {
            site: self.site.site.clone(),
            integrator: self.site.integrator.clone(),
            filter: self.filter.clone(),
            connects: 0,
            alerts: 0,
            error: None,
        };
        let mut ready = Some(ready);
        let options = SessionOptions::default();
        loop {
            let mut session = Session::open(
                &self.target,
                &self.identity.id,
                &self.identity.tls,
                &options,
            );
            loop {
                let event = tokio::select! {
                    _ = stop.changed() => {
                        session.close(Duration::from_millis(500)).await;
                        return report;
                    }
                    e = session.next() => e,
                };
                match event {
                    Event::Connected => {
                        if let Err(e) = session.subscribe(&self.filter) {
                            tracing::warn!(site = %report.site, error = %e, "alert subscription not sent");
                            break;
                        }
                    }
                    Event::Subscribed { granted } => {
                        if !granted {
                            let e = format!(
                                "subscription to {} refused for {}",
                                self.filter, self.identity.id
                            );
                            report.error = Some(e.clone());
                            if let Some(tx) = ready.take() {
                                let _ = tx.send(Err(e));
                            }
                            return report;
                        }
                        report.connects += 1;
                        tracing::info!(site = %report.site, integrator = %report.integrator, filter = %self.filter, "watching alerts");
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(Ok(()));
                        }
                    }
                    Event::Message { payload, .. } => {
                        let now = Instant::now();
                        report.alerts += 1;
                        let outcome = self
                            .recorder
                            .on_alert(&payload, now, |d| self.fleet.get(d).map(|t| &**t));
                        tracing::debug!(site = %report.site, outcome = ?outcome, "alert received");
                    }
                    Event::Acked { .. } => {}
                    Event::Down { reason } => {
                        tracing::warn!(site = %report.site, reason, "alert watcher connection lost");
                        break;
                    }
                }
            }
            // Reconnect after a pause, unless told to stop meanwhile.
            tokio::select! {
                _ = stop.changed() => return report,
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry_of(devices: u32, sites: u32) -> vitalmq_policies::DeviceRegistry {
        let domain = vitalmq_policies::TrustDomain::new("demo.vitalmq").expect("trust domain");
        vitalmq_certs::device_registry(domain, devices, sites).expect("registry")
    }

    #[test]
    fn plans_one_integrator_per_site_of_the_fleet() {
        let mut registry = registry_of(5, 3);
        for (id, site) in [("int-b", 2), ("int-a", 2), ("int-site-01", 1)] {
            let id = vitalmq_policies::PrincipalId::new(id).expect("id");
            registry.insert_integrator(id, vitalmq_certs::site_id(site));
        }
        // Devices 1 and 4 are at site-01, 2 at site-02: site-03 (device 3) is not run.
        let devices: Vec<String> = [4, 2, 1].iter().map(|i| format!("dev-{i:05}")).collect();
        assert_eq!(
            plan(&devices, &registry).expect("plan"),
            [
                SiteWatch {
                    site: "site-01".into(),
                    integrator: "int-site-01".into()
                },
                SiteWatch {
                    site: "site-02".into(),
                    integrator: "int-a".into()
                },
            ]
        );
        // Device 3's site has no integrator: a clear error, not a silent gap.
        let err = plan(&["dev-00003".to_owned()], &registry)
            .expect_err("no integrator")
            .to_string();
        assert!(
            err.contains("site-03") && err.contains("no integrator"),
            "{err}"
        );
        assert!(plan(&["dev-00009".to_owned()], &registry).is_err());
    }
}
