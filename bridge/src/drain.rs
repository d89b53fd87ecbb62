//! Drains the outbox into one sink, in outbox order, with its own cursor.
//!
//! A batch's range is persisted before the first delivery attempt (see
//! [`Store::next_batch`]); the cursor advances only after the sink confirmed the whole
//! batch. Failures are retried with capped exponential backoff; a sink that keeps
//! failing raises an operational alert and an audit record, and its recovery another.
//!
//! Consent as a data-flow control (issue 19): at each delivery attempt the batch is
//! judged record by record with the registry in force at that moment
//! ([`crate::governance::govern`]), so a withdrawal the bridge reloaded a moment ago
//! also stops the backlog; the sink gets only what may flow to its purpose, minimised
//! to its allow-list. A record flows to a purpose other than care only under the
//! consent of the patient it was recorded for: if the registry now attributes its
//! observation time to someone else or to no one (a backdated change), it is withheld
//! as `reattributed` ([`crate::governance::judge_recorded`]). A care sink withholds
//! nothing: it is the clinical record of every event as attributed at ingest. What was withheld is counted per reason in the store in the
//! transaction that advances the cursor (so a batch delivered again is counted once),
//! then in `vitalmq_bridge_withheld_total{sink,reason}` and in one `events_withheld`
//! audit record per batch.
//!
//! A sink of a purpose other than care waits [`REGISTRY_SETTLE`] after the bridge
//! received a batch's newest record before judging it: a withdrawal written to the
//! registry when the bridge received an event has been reloaded by then (the reload
//! waits 200 ms for the writer to finish), so an event observed after the withdrawal
//! cannot slip out under the registry that was in force a moment before it.
//!
//! Fail closed: while the last reload of the registry failed
//! ([`crate::reload::RegistryWatch::stale`]), a sink of a purpose other than care
//! delivers nothing and keeps its cursor until a reload succeeds (logged per sink; the
//! bridge raises `ops/bridge/registry_stale`). Care sinks go on.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, json};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};
use vitalmq_audit::{AuditRecord, Auditor, Component, Event};
use vitalmq_policies::{DeviceRegistry, Purpose};

use crate::governance::{
    Fields, Flow, MinimiseError, PurposePseudonym, Withheld, govern, judge_recorded,
};
use crate::ops::{Episodes, OpsAlert, OpsKind};
use crate::recorder::now_ms;
use crate::sink::{Batch, OutboxRecord, Sink};
use crate::store::{Store, StoreError, lock};

/// How long a sink of a purpose other than care waits after the bridge received a
/// batch's newest record before judging the batch (see the module docs).
pub const REGISTRY_SETTLE: Duration = Duration::from_secs(2);

/// What a sink may receive: its purpose, its field allow-list, and the registry in
/// force (reloaded by [`crate::reload::watch_registry`]).
#[derive(Debug, Clone)]
pub struct SinkGovernance {
    pub purpose: Purpose,
    pub fields: Fields,
    pub registry: watch::Receiver<Arc<DeviceRegistry>>,
    /// How long to wait after the newest record of a batch was received before
    /// judging it; [`REGISTRY_SETTLE`] for purposes other than care, else zero.
    pub settle: Duration,
    /// Replaces `patient_ref` for a sink whose fields allow it (research pseudonyms).
    pub pseudonym: Option<PurposePseudonym>,
    /// True while the last reload of the registry failed
    /// ([`crate::reload::RegistryWatch::stale`]): a sink of a purpose other than care
    /// then delivers nothing and does not advance (fail closed) until a reload succeeds.
    pub stale: Option<watch::Receiver<bool>>,
}

impl SinkGovernance {
    /// A sink of `purpose` receiving `fields`, judged by `registry`.
    pub fn new(
        purpose: Purpose,
        fields: Fields,
        registry: watch::Receiver<Arc<DeviceRegistry>>,
    ) -> Self {
        let settle = if purpose == Purpose::Care {
            Duration::ZERO
        } else {
            REGISTRY_SETTLE
        };
        Self {
            purpose,
            fields,
            registry,
            settle,
            pseudonym: None,
            stale: None,
        }
    }

    /// What of `batch` the sink receives now, and what it does not, per reason.
    #[cfg(test)]
    pub fn apply(&self, batch: &Batch) -> Result<(Batch, Withheld), MinimiseError> {
        let (sent, withheld) = self.judge(batch)?;
        Ok((sent.unwrap_or_else(|| batch.clone()), withheld))
    }

    /// What of `batch` the sink receives now (`None`: the batch as it is, every record
    /// flowing whole, the common case of a care sink, without a copy), and what it does
    /// not, per reason.
    pub fn judge(&self, batch: &Batch) -> Result<(Option<Batch>, Withheld), MinimiseError> {
        let registry = Arc::clone(&self.registry.borrow());
        let purpose = self.purpose;
        let flow = |r: &OutboxRecord| {
            let recorded = r.recorded();
            judge_recorded(
                &registry,
                &r.device,
                recorded.as_ref().map(|(p, s)| (p.as_ref(), *s)),
                purpose,
                r.observed_at_ms,
            )
        };
        // Care never withholds (see `judge_recorded`): a care sink without an
        // allow-list gets the batch as it is, without reading a record.
        if self.fields == Fields::All
            && self.pseudonym.is_none()
            && (purpose == Purpose::Care || batch.records.iter().all(|r| flow(r) == Flow::Send))
        {
            return Ok((None, Withheld::default()));
        }
        let of = |care: &str| self.pseudonym.as_ref().and_then(|p| p.of(care));
        let pseudonym = self
            .pseudonym
            .as_ref()
            .map(|_| &of as &dyn Fn(&str) -> Option<String>);
        let (records, withheld) = govern(&batch.records, flow, &self.fields, pseudonym)?;
        Ok((
            Some(Batch {
                first: batch.first,
                last: batch.last,
                records,
            }),
            withheld,
        ))
    }
}

/// How one sink is drained.
#[derive(Debug, Clone)]
pub struct DrainSettings {
    pub batch_max_events: usize,
    /// A partial batch waits at most this long for more events.
    pub batch_max_age: Duration,
    /// Consecutive failures before the sink is reported down.
    pub down_after: u32,
}

/// Runs until `stop` turns true, then returns after the batch in progress.
pub async fn drain(
    sink: Arc<dyn Sink>,
    store: Arc<Mutex<Store>>,
    settings: DrainSettings,
    governance: SinkGovernance,
    auditor: Auditor,
    ops: mpsc::UnboundedSender<OpsAlert>,
    mut stop: watch::Receiver<bool>,
) {
    let name = sink.name().to_owned();
    let mut episodes = Episodes::default();
    let mut waiting_since: Option<Instant> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        let planned = {
            let store = Arc::clone(&store);
            let name = name.clone();
            let s = settings.clone();
            let since = waiting_since;
            tokio::task::spawn_blocking(move || plan(&store, &name, &s, since)).await
        };
        let batch = match planned {
            Ok(Ok(Plan::Deliver(b))) => {
                waiting_since = None;
                b
            }
            Ok(Ok(Plan::Wait { partial })) => {
                if partial && waiting_since.is_none() {
                    waiting_since = Some(Instant::now());
                }
                let _ = tokio::time::timeout(Duration::from_millis(50), stop.changed()).await;
                continue;
            }
            Ok(Err(e)) => {
                warn!(sink = %name, error = %e, "cannot read the outbox");
                let _ = tokio::time::timeout(Duration::from_secs(1), stop.changed()).await;
                continue;
            }
            Err(e) => {
                warn!(sink = %name, error = %e, "outbox reader task failed");
                continue;
            }
        };
        if !settle(&batch, governance.settle, &mut stop).await {
            return;
        }
        let Some((delivered, withheld)) = deliver_until_confirmed(
            &*sink,
            &batch,
            &governance,
            &settings,
            &auditor,
            &ops,
            &mut episodes,
            &mut stop,
        )
        .await
        else {
            return; // stopping while the sink fails: the batch stays pending
        };
        let store = Arc::clone(&store);
        let n = name.clone();
        let last = batch.last;
        let counts = withheld.counts();
        let persisted = counts.clone();
        match tokio::task::spawn_blocking(move || {
            lock(&store).batch_delivered_withheld(&n, last, &persisted)
        })
        .await
        {
            Ok(Ok(moved)) => {
                metrics::counter!("vitalmq_bridge_sink_delivered_total", "sink" => name.clone())
                    .increment(delivered as u64);
                debug!(sink = %name, first = batch.first, last = batch.last, delivered, "batch delivered");
                if moved && !withheld.is_empty() {
                    report_withheld(&name, governance.purpose, &batch, &counts, &auditor);
                }
            }
            Ok(Err(e)) => {
                warn!(sink = %name, error = %e, "cannot advance the cursor; the batch will be delivered again")
            }
            Err(e) => warn!(sink = %name, error = %e, "cursor task failed"),
        }
    }
}

/// Counts, logs (counts only) and audits what consent withheld from one delivered batch.
fn report_withheld(
    name: &str,
    purpose: Purpose,
    batch: &Batch,
    counts: &[(&'static str, u64)],
    auditor: &Auditor,
) {
    let mut per_reason = Map::new();
    for (reason, n) in counts {
        metrics::counter!("vitalmq_bridge_withheld_total", "sink" => name.to_owned(), "reason" => *reason)
            .increment(*n);
        per_reason.insert((*reason).to_owned(), json!(n));
    }
    let total: u64 = counts.iter().map(|(_, n)| n).sum();
    info!(sink = %name, purpose = %purpose, first = batch.first, last = batch.last, withheld = total, "events withheld by consent");
    let _ = auditor.record(
        AuditRecord::new(Component::Bridge, Event::EventsWithheld)
            .resource(name)
            .action("deliver")
            .detail("purpose", purpose.as_str())
            .detail("first", batch.first)
            .detail("last", batch.last)
            .detail("withheld", serde_json::Value::Object(per_reason)),
    );
}

/// Waits until `settle` passed since the bridge received the batch's newest record;
/// false when stopping meanwhile.
async fn settle(batch: &Batch, settle: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    let newest = batch.records.iter().map(|r| r.received_at_ms).max();
    settle_after(newest, settle, stop).await
}

/// Waits until `settle` passed since `newest` (ms since the Unix epoch, the bridge's
/// clock; `None`: nothing to wait for); false when stopping meanwhile.
pub(crate) async fn settle_after(
    newest: Option<u64>,
    settle: Duration,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    if settle.is_zero() {
        return true;
    }
    let Some(due) = newest.map(|t| t.saturating_add(settle.as_millis() as u64)) else {
        return true;
    };
    loop {
        if *stop.borrow() {
            return false;
        }
        let now = now_ms();
        if now >= due {
            return true;
        }
        let _ = tokio::time::timeout(Duration::from_millis(due - now), stop.changed()).await;
    }
}

/// Waits while `stale` says the last reload of the registry failed (`None`: not
/// watched); false when stopping meanwhile. `who` (a sink or handler) is logged when
/// it pauses and resumes.
pub(crate) async fn registry_fresh(
    stale: Option<&watch::Receiver<bool>>,
    who: &str,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let Some(stale) = stale else {
        return true;
    };
    let mut stale = stale.clone();
    let mut paused = false;
    loop {
        if *stop.borrow() {
            return false;
        }
        if !*stale.borrow_and_update() {
            if paused {
                info!(to = %who, "registry reloaded: delivery resumes");
            }
            return true;
        }
        if !paused {
            paused = true;
            warn!(to = %who, "registry stale: delivery paused until a reload succeeds");
        }
        tokio::select! {
            changed = stale.changed() => if changed.is_err() {
                // The watch ended (shutting down): look again in a while.
                if let Ok(Err(_)) = tokio::time::timeout(Duration::from_secs(1), stop.changed()).await {
                    return false;
                }
            },
            // A stop sender dropped without sending is a stop too (else this spins).
            changed = stop.changed() => if changed.is_err() {
                return false;
            },
        }
    }
}

enum Plan {
    Deliver(Batch),
    Wait { partial: bool },
}

fn plan(
    store: &Mutex<Store>,
    sink: &str,
    s: &DrainSettings,
    waiting_since: Option<Instant>,
) -> Result<Plan, StoreError> {
    let mut store = lock(store);
    let cursor = store.cursor(sink)?;
    if cursor.pending.is_none() {
        let waiting = store.head()? - cursor.delivered_through;
        if waiting <= 0 {
            return Ok(Plan::Wait { partial: false });
        }
        let full = usize::try_from(waiting).unwrap_or(usize::MAX) >= s.batch_max_events;
        let aged = waiting_since.is_some_and(|t| t.elapsed() >= s.batch_max_age);
        if !full && !aged {
            return Ok(Plan::Wait { partial: true });
        }
    }
    Ok(store
        .next_batch(sink, s.batch_max_events)?
        .map_or(Plan::Wait { partial: false }, Plan::Deliver))
}

/// Delivers what of `batch` may flow, judged again at each attempt; the number
/// delivered and what was withheld at the confirmed attempt, `None` when stopping.
#[allow(clippy::too_many_arguments)]
async fn deliver_until_confirmed(
    sink: &dyn Sink,
    batch: &Batch,
    governance: &SinkGovernance,
    settings: &DrainSettings,
    auditor: &Auditor,
    ops: &mpsc::UnboundedSender<OpsAlert>,
    episodes: &mut Episodes,
    stop: &mut watch::Receiver<bool>,
) -> Option<(usize, Withheld)> {
    let name = sink.name();
    let mut failures = 0u32;
    let mut delay = Duration::from_millis(200);
    loop {
        if governance.purpose != Purpose::Care
            && !registry_fresh(governance.stale.as_ref(), name, stop).await
        {
            return None;
        }
        let attempt = match governance.judge(batch) {
            Ok((allowed, withheld)) => {
                let allowed = allowed.as_ref().unwrap_or(batch);
                if allowed.records.is_empty() {
                    Ok((0, withheld))
                } else {
                    sink.deliver(allowed)
                        .await
                        .map(|()| (allowed.records.len(), withheld))
                        .map_err(|e| e.to_string())
                }
            }
            Err(e) => Err(format!("cannot minimise the batch: {e}")),
        };
        match attempt {
            Ok(done) => {
                if let Some(a) = episodes.resolve(OpsKind::Sink, name, now_ms()) {
                    info!(sink = %name, "sink recovered");
                    let _ = auditor.record(
                        AuditRecord::new(Component::Bridge, Event::SinkRecovered)
                            .resource(name)
                            .detail("failures", failures),
                    );
                    let _ = ops.send(a);
                }
                return Some(done);
            }
            Err(e) => {
                failures += 1;
                metrics::counter!("vitalmq_bridge_sink_failures_total", "sink" => name.to_owned())
                    .increment(1);
                warn!(sink = %name, error = %e, failures, retry_in_ms = delay.as_millis() as u64, "sink delivery failed");
                if failures >= settings.down_after {
                    let mut details = Map::new();
                    details.insert("sink".into(), json!(name));
                    details.insert("error".into(), json!(e.clone()));
                    if let Some(a) =
                        episodes.raise(OpsKind::Sink, name, "sink_down", details, now_ms())
                    {
                        let _ = auditor.record(
                            AuditRecord::new(Component::Bridge, Event::SinkFailed)
                                .resource(name)
                                .reason("sink_down")
                                .detail("error", e),
                        );
                        let _ = ops.send(a);
                    }
                }
                if tokio::time::timeout(delay, stop.changed()).await.is_ok() && *stop.borrow() {
                    return None;
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use vitalmq_envelope::{Algorithm, SigningKey};

    use super::*;
    use crate::governance::Reason;

    /// `dev-1` assigned from 2025 with research granted from 2026-01-01; `dev-2`
    /// assigned, no research grant.
    pub(crate) fn registry(withdrawn: Option<&str>) -> Arc<DeviceRegistry> {
        let key = SigningKey::generate(Algorithm::EdDsa)
            .expect("key")
            .verifying_key()
            .to_hex();
        let to = withdrawn.map_or(String::new(), |t| format!(", valid_to = \"{t}\""));
        let text = format!(
            "format = \"vitalmq-registry/v2\"\ntrust_domain = \"t.vitalmq\"\n\
             [[devices]]\nid = \"dev-1\"\nalg = \"EdDSA\"\npublic_key = \"{key}\"\n\
             [[devices.assignments]]\nvalid_from = \"2025-01-01T00:00:00Z\"\npatient_ref = \"pt-a\"\nsite = \"north\"\n\
             consent = [{{ purpose = \"research\", valid_from = \"2026-01-01T00:00:00Z\"{to} }}]\n\
             [[devices]]\nid = \"dev-2\"\nalg = \"EdDSA\"\npublic_key = \"{key}\"\n\
             [[devices.assignments]]\nvalid_from = \"2025-01-01T00:00:00Z\"\npatient_ref = \"pt-b\"\nsite = \"north\"\n"
        );
        Arc::new(
            DeviceRegistry::parse(&text, std::path::Path::new("registry.toml")).expect("registry"),
        )
    }

    /// A stop sender dropped without sending stops a paused sink; it must not spin.
    /// Judged from another thread: a spinning wait never yields to a timer.
    #[test]
    fn a_paused_sink_stops_when_the_stop_sender_is_gone() {
        let (done_tx, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("runtime");
            let fresh = rt.block_on(async {
                let (_stale_tx, stale) = watch::channel(true);
                let (stop_tx, mut stop) = watch::channel(false);
                drop(stop_tx);
                registry_fresh(Some(&stale), "sink", &mut stop).await
            });
            let _ = done_tx.send(fresh);
        });
        assert_eq!(
            done.recv_timeout(Duration::from_secs(10)),
            Ok(false),
            "stopped, not spinning"
        );
    }

    pub(crate) const JAN_2026: u64 = 1_767_225_600_000;

    /// A record as ingest attributed it: `dev-1` to `pt-a`, `dev-2` to `pt-b`, others
    /// to `pt-x`, all on `north`.
    fn record(position: i64, device: &str, observed_at_ms: u64) -> OutboxRecord {
        let patient = match device {
            "dev-1" => "pt-a",
            "dev-2" => "pt-b",
            _ => "pt-x",
        };
        attributed(position, device, patient, observed_at_ms)
    }

    fn attributed(position: i64, device: &str, patient: &str, observed_at_ms: u64) -> OutboxRecord {
        OutboxRecord {
            position,
            event_id: format!("ev-{position}"),
            device: device.into(),
            site: "north".into(),
            epoch: 1,
            seq: position as u64,
            observed_at_ms,
            received_at_ms: observed_at_ms,
            topic: format!("devices/{device}/telemetry"),
            raw: bytes::Bytes::from_static(&[0xf6]),
            normalized_json: format!(
                r#"{{"format":"vitalmq-event/v1","event_id":"ev-{position}","device":"{device}","patient_ref":"{patient}","m":{{"hr":60}},"extra":{{"x":1}}}}"#
            ),
            ingest_patient: None,
        }
    }

    fn batch() -> Batch {
        Batch {
            first: 1,
            last: 5,
            records: vec![
                record(1, "dev-1", JAN_2026 - 1),      // before the grant
                record(2, "dev-1", JAN_2026 + 1_000),  // granted
                record(3, "dev-2", JAN_2026 + 1_000),  // no grant
                record(4, "dev-1", JAN_2026 + 60_000), // granted, until withdrawn
                record(5, "dev-9", JAN_2026 + 1_000),  // not in the registry
            ],
        }
    }

    /// A research sink gets only what consent covers, minimised; judged with the
    /// registry in force when asked, so a withdrawal reloaded meanwhile applies to a
    /// batch planned before it.
    #[test]
    fn a_research_sink_gets_what_consent_covers_minimised_and_judged_by_the_registry_now() {
        let (tx, rx) = watch::channel(registry(None));
        let gov = SinkGovernance::new(
            Purpose::Research,
            Fields::Only(["m", "device"].map(String::from).into()),
            rx,
        );
        assert_eq!(
            gov.settle, REGISTRY_SETTLE,
            "non-care sinks wait for reloads"
        );
        let batch = batch();
        let (sent, withheld) = gov.apply(&batch).expect("govern");
        assert_eq!((sent.first, sent.last), (1, 5), "the batch's range stays");
        assert_eq!(
            sent.records.iter().map(|r| r.position).collect::<Vec<_>>(),
            [2, 4]
        );
        assert_eq!(
            sent.records[0].normalized_json,
            r#"{"format":"vitalmq-event/v1","event_id":"ev-2","device":"dev-1","m":{"hr":60}}"#
        );
        assert_eq!(
            withheld.counts(),
            [("no_consent", 2), ("reattributed", 1)],
            "dev-1 before its grant and dev-2; dev-9 is no longer in the registry"
        );

        // Withdrawn 30 s after the grant's start, reloaded: the same batch again.
        tx.send(registry(Some("2026-01-01T00:00:30Z")))
            .expect("reload");
        let (sent, withheld) = gov.apply(&batch).expect("govern");
        assert_eq!(
            sent.records.iter().map(|r| r.position).collect::<Vec<_>>(),
            [2]
        );
        assert_eq!(
            withheld.counts(),
            [("no_consent", 2), ("withdrawn", 1), ("reattributed", 1)]
        );
    }

    /// A research sink that lists `patient_ref` gets the research pseudonym of the care
    /// reference, never the care one.
    #[test]
    fn a_listed_patient_ref_becomes_the_purpose_pseudonym() {
        let (_tx, rx) = watch::channel(registry(None));
        let mut gov = SinkGovernance::new(
            Purpose::Research,
            Fields::Only(["patient_ref"].map(String::from).into()),
            rx,
        );
        gov.pseudonym = Some(PurposePseudonym::new([7; 32], Purpose::Research));
        let (sent, _) = gov.apply(&batch()).expect("govern");
        let expected = vitalmq_policies::Pseudonymiser::new([7; 32])
            .pseudonym("pt-a", Some("research"))
            .expect("pseudonym");
        assert_eq!(
            sent.records[0].normalized_json,
            format!(
                r#"{{"format":"vitalmq-event/v1","event_id":"ev-2","patient_ref":"{expected}"}}"#
            )
        );
        assert_ne!(
            Some(expected),
            PurposePseudonym::new([7; 32], Purpose::ModelTraining).of("pt-a"),
            "another purpose, another pseudonym"
        );
    }

    /// Care sees every recorded event whole, without waiting: the clinical record is
    /// what ingest attributed, whatever the registry says later.
    #[test]
    fn a_care_sink_gets_every_recorded_event_whole() {
        let (tx, rx) = watch::channel(registry(None));
        let gov = SinkGovernance::new(Purpose::Care, Fields::All, rx);
        assert_eq!(gov.settle, Duration::ZERO);
        let batch = batch();
        let (as_is, withheld) = gov.judge(&batch).expect("govern");
        assert!(as_is.is_none(), "delivered as it is, without a copy");
        assert!(withheld.is_empty());
        // Backdated: dev-1 reassigned to another patient from 2025 on. Care still
        // gets every event, as recorded.
        tx.send(reassigned("pt-z", "north")).expect("reload");
        let (as_is, withheld) = gov.judge(&batch).expect("govern");
        assert!(as_is.is_none());
        assert!(withheld.is_empty(), "{withheld:?}");
        // An allow-list minimises care but withholds nothing.
        let gov = SinkGovernance::new(
            Purpose::Care,
            Fields::Only(["m"].map(String::from).into()),
            gov.registry.clone(),
        );
        let (sent, withheld) = gov.apply(&batch).expect("govern");
        assert_eq!(sent.records.len(), 5);
        assert!(withheld.is_empty());
    }

    /// The registry of [`registry`] with `dev-1`'s assignment (and its research grant)
    /// naming `patient` on `site` instead: a backdated reassignment.
    fn reassigned(patient: &str, site: &str) -> Arc<DeviceRegistry> {
        let text = registry(None).to_toml();
        let text = text.replacen(
            "patient_ref = \"pt-a\"",
            &format!("patient_ref = \"{patient}\""),
            1,
        );
        let text = if site == "north" {
            text
        } else {
            text.replacen("site = \"north\"", &format!("site = \"{site}\""), 1)
        };
        Arc::new(DeviceRegistry::parse(&text, std::path::Path::new("r.toml")).expect("registry"))
    }

    /// A backdated reassignment: events stored as `pt-a` never flow under the grant of
    /// whoever the registry names now, nor when the site changed; they are withheld as
    /// `reattributed`. Events stored as the patient the registry still names flow.
    #[test]
    fn a_research_sink_never_sends_an_event_under_another_patients_consent() {
        let (tx, rx) = watch::channel(reassigned("pt-z", "north"));
        let gov = SinkGovernance::new(Purpose::Research, Fields::All, rx);
        let batch = Batch {
            first: 1,
            last: 2,
            records: vec![
                record(1, "dev-1", JAN_2026 + 1_000),
                attributed(2, "dev-1", "pt-z", JAN_2026 + 2_000),
            ],
        };
        let (sent, withheld) = gov.apply(&batch).expect("govern");
        assert_eq!(
            sent.records.iter().map(|r| r.position).collect::<Vec<_>>(),
            [2],
            "only the event recorded as the patient whose grant covers it"
        );
        assert_eq!(withheld.counts(), [("reattributed", 1)]);
        assert_eq!(Reason::Reattributed.as_str(), "reattributed");

        tx.send(reassigned("pt-a", "south")).expect("reload");
        let (sent, withheld) = gov.apply(&batch).expect("govern");
        assert!(sent.records.is_empty(), "another site, another attribution");
        assert_eq!(withheld.counts(), [("reattributed", 2)]);
    }
}
