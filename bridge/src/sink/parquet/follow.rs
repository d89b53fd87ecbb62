//! The tables of the surveillance data set besides `events`: `alerts`, `refusals`,
//! `gaps` and `scores`, each followed in the store after a durable cursor of its own.
//!
//! Cursors live in `handler_cursors` as `surveil:<sink>:<table>` ([`cursor_name`]),
//! with the batch planned before its files are written as `surveil:<sink>:<table>:pending`:
//! a pass first records the last id of its batch as pending, writes one file per ISO
//! week named by the batch's id range (`part-<cursor+1>-<pending>`), then moves the
//! cursor. After a kill -9 between the two, the next pass re-reads exactly the pending
//! range and overwrites the same names, so a reader never sees a row twice.
//!
//! Alerts carry a patient: they go through the same governance as an alert handler of
//! the `surveillance` purpose ([`crate::delivery::govern_alerts`]: consent must cover
//! the evidence's observation times, `patient_ref` becomes the purpose pseudonym) and
//! withheld changes are counted with the cursor. Scores, refusals and gaps are judged
//! by [`crate::surveillance::consent`] (scores at every input's observation time with
//! the input's device; refusals and gaps by their device's assignment and consent at
//! their time), their withheld rows counted and audited likewise. Rows that do not
//! carry the device's firmware (gaps, refusals) take it from what the device last
//! reported at or before their time ([`Store::reported_at`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value as Json;
use tokio::sync::watch;
use tracing::{debug, warn};
use vitalmq_audit::Auditor;
use vitalmq_policies::{DeviceRegistry, Purpose};

use super::ParquetSink;
use crate::delivery::{AlertGovernance, govern_alerts, report_alerts_withheld};
use crate::governance::{Fields, Flow, PurposePseudonym, Withheld};
use crate::sink::{Sink as _, SinkError, SinkFailure};
use crate::store::{Store, StoreError, lock};
use crate::surveillance::consent::{device_flow, score_flow};
use crate::surveillance::rows::{AlertRow, DeviceFacts, GapRow, RefusalRow, Rows, ScoreRow};
use crate::surveillance::write::to_parquet;
use crate::surveillance::{Table, file_name, iso_week};

/// The alert body fields the sink reads (its allow-list; `patient_ref` only as the
/// purpose pseudonym).
pub const ALERT_FIELDS: &[&str] = &[
    "rule",
    "rule_version",
    "severity",
    "kind",
    "role",
    "device",
    "site",
    "patient_ref",
    "fw",
    "model",
    "model_status",
    "alarm",
    "rule_set_version",
];

/// The cursor of `table` for sink `sink` in `handler_cursors`.
pub fn cursor_name(sink: &str, table: Table) -> String {
    format!("surveil:{sink}:{}", table.dir())
}

fn pending_name(sink: &str, table: Table) -> String {
    format!("{}:pending", cursor_name(sink, table))
}

/// The Hive partition of each table's zero-row file ([`Follower::write_schemas`]):
/// `<table>/week=0000-W00/part-0-0.parquet`, before any real ISO week.
pub const EMPTY_WEEK: &str = "0000-W00";

fn empty_rows(table: Table) -> Rows {
    match table {
        Table::Events => Rows::Events(Vec::new()),
        Table::Alerts => Rows::Alerts(Vec::new()),
        Table::Scores => Rows::Scores(Vec::new()),
        Table::Refusals => Rows::Refusals(Vec::new()),
        Table::Gaps => Rows::Gaps(Vec::new()),
    }
}

/// Why a pass stopped (its cursor stays; the next pass tries again).
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sink(#[from] SinkError),
}

/// Follows the side tables for one parquet sink.
#[derive(Debug)]
pub struct Follower {
    pub sink: Arc<ParquetSink>,
    pub store: Arc<Mutex<Store>>,
    pub registry: watch::Receiver<Arc<DeviceRegistry>>,
    /// The surveillance pseudonym of a care reference (none: no subject column).
    pub pseudonym: Option<PurposePseudonym>,
    pub auditor: Auditor,
    /// Rows per table and pass at most.
    pub batch_max: usize,
}

/// One table's batch: the id range it covers and its rows per ISO week.
struct Planned {
    first: i64,
    last: i64,
    weeks: BTreeMap<String, Rows>,
}

fn push(weeks: &mut BTreeMap<String, Rows>, at_ms: u64, rows: Rows) {
    let Some(week) = i64::try_from(at_ms).ok().and_then(iso_week) else {
        return;
    };
    match (weeks.get_mut(&week), rows) {
        (Some(Rows::Alerts(a)), Rows::Alerts(b)) => a.extend(b),
        (Some(Rows::Scores(a)), Rows::Scores(b)) => a.extend(b),
        (Some(Rows::Refusals(a)), Rows::Refusals(b)) => a.extend(b),
        (Some(Rows::Gaps(a)), Rows::Gaps(b)) => a.extend(b),
        (Some(Rows::Events(a)), Rows::Events(b)) => a.extend(b),
        (_, rows) => {
            weeks.insert(week, rows);
        }
    }
}

impl Follower {
    fn name(&self) -> String {
        self.sink.files().name().to_owned()
    }

    /// The `(cursor, pending)` of `table`: pending only when above the cursor.
    fn cursors(&self, table: Table) -> Result<(i64, Option<i64>), StoreError> {
        let name = self.name();
        let store = lock(&self.store);
        let through = store.handler_cursor(&cursor_name(&name, table))?;
        let pending = store.handler_cursor(&pending_name(&name, table))?;
        Ok((through, (pending > through).then_some(pending)))
    }

    /// One pass over every table; the number of rows written.
    pub async fn pass(&self) -> Result<usize, FollowError> {
        let mut written = 0;
        for table in [Table::Alerts, Table::Refusals, Table::Gaps, Table::Scores] {
            written += self.pass_table(table).await?;
        }
        Ok(written)
    }

    async fn pass_table(&self, table: Table) -> Result<usize, FollowError> {
        let name = self.name();
        let (through, pending) = self.cursors(table)?;
        let registry = Arc::clone(&self.registry.borrow());
        let (planned, withheld) = match table {
            Table::Alerts => self.plan_alerts(through, pending, &registry)?,
            Table::Refusals => self.plan_refusals(through, pending, &registry)?,
            Table::Gaps => self.plan_gaps(through, pending, &registry)?,
            Table::Scores => self.plan_scores(through, pending, &registry)?,
            Table::Events => return Ok(0),
        };
        let Some(planned) = planned else {
            return Ok(0);
        };
        if pending.is_none() {
            lock(&self.store).alert_delivered(&pending_name(&name, table), planned.last)?;
        }
        let mut rows = 0;
        for (week, week_rows) in planned.weeks {
            rows += week_rows.len();
            let bytes = to_parquet(&week_rows)
                .map_err(|e| SinkError::refused(name.clone(), SinkFailure::Parquet(e)))?;
            let file = file_name(table, &week, planned.first, planned.last);
            self.sink.files().put_durable(&file, bytes.into()).await?;
        }
        let cursor = cursor_name(&name, table);
        match (table, &withheld) {
            (Table::Alerts, Some(w)) => {
                let moved = lock(&self.store).alert_delivered_withheld(
                    &cursor,
                    planned.last,
                    &w.counts(),
                )?;
                if moved && !w.is_empty() {
                    report_alerts_withheld(
                        &cursor,
                        Purpose::Surveillance,
                        planned.last,
                        w,
                        &self.auditor,
                    );
                }
            }
            _ => {
                lock(&self.store).alert_delivered(&cursor, planned.last)?;
                if let Some(w) = withheld.filter(|w| !w.is_empty()) {
                    report_alerts_withheld(
                        &cursor,
                        Purpose::Surveillance,
                        planned.last,
                        &w,
                        &self.auditor,
                    );
                }
            }
        }
        debug!(sink = %name, table = table.dir(), rows, through = planned.last, "surveillance rows written");
        Ok(rows)
    }

    /// The range of a batch read after `through`: up to the pending id when one was
    /// planned, else up to its last row's id.
    fn range(through: i64, pending: Option<i64>, last_id: Option<i64>) -> Option<(i64, i64)> {
        match (pending, last_id) {
            (Some(p), _) => Some((through + 1, p)),
            (None, Some(l)) => Some((through + 1, l)),
            (None, None) => None,
        }
    }

    fn plan_alerts(
        &self,
        through: i64,
        pending: Option<i64>,
        registry: &DeviceRegistry,
    ) -> Result<(Option<Planned>, Option<Withheld>), StoreError> {
        let cursor = cursor_name(&self.name(), Table::Alerts);
        let mut rows = lock(&self.store).alerts_after(&cursor, self.batch_max)?;
        if let Some(p) = pending {
            rows.retain(|a| a.position <= p);
        }
        let Some((first, last)) = Self::range(through, pending, rows.last().map(|a| a.position))
        else {
            return Ok((None, None));
        };
        let governance = AlertGovernance {
            purpose: Purpose::Surveillance,
            fields: Fields::Only(ALERT_FIELDS.iter().map(|f| (*f).to_owned()).collect()),
            registry: self.registry.clone(),
            pseudonym: self.pseudonym.clone(),
            stale: None,
        };
        let (sent, withheld, _) = govern_alerts(rows, &governance, &self.store)?;
        let mut weeks = BTreeMap::new();
        for a in sent {
            let body: Json = serde_json::from_str(&a.body).unwrap_or_default();
            // Governance replaced the care reference by the pseudonym (or removed it).
            let subject = if self.pseudonym.is_some() {
                body.get("patient_ref")
                    .and_then(Json::as_str)
                    .map(str::to_owned)
            } else {
                None
            };
            let device = body.get("device").and_then(Json::as_str).unwrap_or("");
            let facts = DeviceFacts::of(registry, device);
            let mut row = AlertRow::from_alert(
                &a.alert_id,
                &a.state,
                a.created_at_ms,
                &a.topic,
                &body,
                subject,
                facts,
            );
            // An alert body without firmware and model (no-data, older bodies) takes
            // what the device last reported, as `vitalmq surveil` does.
            if row.fw.is_none() && row.model.is_none() && !device.is_empty() {
                let r = lock(&self.store).reported_at(device, a.created_at_ms)?;
                row.fw = r.fw;
                row.model = r.model;
                row.model_status = r.model_status;
            }
            push(&mut weeks, a.created_at_ms, Rows::Alerts(vec![row]));
        }
        Ok((Some(Planned { first, last, weeks }), Some(withheld)))
    }

    fn plan_refusals(
        &self,
        through: i64,
        pending: Option<i64>,
        registry: &DeviceRegistry,
    ) -> Result<(Option<Planned>, Option<Withheld>), StoreError> {
        let store = lock(&self.store);
        let mut rows = store.refusals_after(through, self.batch_max)?;
        if let Some(p) = pending {
            rows.retain(|r| r.id <= p);
        }
        let Some((first, last)) = Self::range(through, pending, rows.last().map(|r| r.id)) else {
            return Ok((None, None));
        };
        let mut weeks = BTreeMap::new();
        let mut withheld = Withheld::default();
        for r in rows {
            if let Flow::Withheld(reason) =
                device_flow(registry, r.device.as_deref(), r.received_at_ms)
            {
                withheld.add(reason);
                continue;
            }
            let (facts, reported) = match r.device.as_deref() {
                Some(d) => (
                    DeviceFacts::of(registry, d),
                    store.reported_at(d, r.received_at_ms)?,
                ),
                None => Default::default(),
            };
            let row = RefusalRow {
                at: i64::try_from(r.received_at_ms).ok(),
                device: r.device,
                facts,
                fw: reported.fw,
                reason: Some(r.reason),
            };
            push(&mut weeks, r.received_at_ms, Rows::Refusals(vec![row]));
        }
        Ok((Some(Planned { first, last, weeks }), Some(withheld)))
    }

    fn plan_gaps(
        &self,
        through: i64,
        pending: Option<i64>,
        registry: &DeviceRegistry,
    ) -> Result<(Option<Planned>, Option<Withheld>), StoreError> {
        let store = lock(&self.store);
        let mut rows = store.gaps_after(through, self.batch_max)?;
        if let Some(p) = pending {
            rows.retain(|g| g.rowid <= p);
        }
        let Some((first, last)) = Self::range(through, pending, rows.last().map(|g| g.rowid))
        else {
            return Ok((None, None));
        };
        let mut weeks = BTreeMap::new();
        let mut withheld = Withheld::default();
        for g in rows {
            if let Flow::Withheld(reason) = device_flow(registry, Some(&g.device), g.opened_at_ms) {
                withheld.add(reason);
                continue;
            }
            let reported = store.reported_at(&g.device, g.opened_at_ms)?;
            let row = GapRow {
                facts: DeviceFacts::of(registry, &g.device),
                device: Some(g.device),
                fw: reported.fw,
                epoch: Some(g.epoch),
                from_seq: Some(g.first),
                to_seq: Some(g.last),
                state: Some(g.state),
                opened_at: i64::try_from(g.opened_at_ms).ok(),
            };
            push(&mut weeks, g.opened_at_ms, Rows::Gaps(vec![row]));
        }
        Ok((Some(Planned { first, last, weeks }), Some(withheld)))
    }

    fn plan_scores(
        &self,
        through: i64,
        pending: Option<i64>,
        registry: &DeviceRegistry,
    ) -> Result<(Option<Planned>, Option<Withheld>), StoreError> {
        let mut rows = read_scores(&self.store, through, self.batch_max)?;
        if let Some(p) = pending {
            rows.retain(|s| s.id <= p);
        }
        let Some((first, last)) = Self::range(through, pending, rows.last().map(|s| s.id)) else {
            return Ok((None, None));
        };
        let mut weeks = BTreeMap::new();
        let mut withheld = Withheld::default();
        for s in rows {
            let payload: Json = serde_json::from_str(&s.payload).unwrap_or_default();
            let care = payload.get("patient_ref").and_then(Json::as_str);
            let flow = score_flow(
                registry,
                &lock(&self.store),
                &payload,
                &s.device,
                s.observed_at_ms,
            )?;
            if let Flow::Withheld(reason) = flow {
                withheld.add(reason);
                continue;
            }
            let subject = care.zip(self.pseudonym.as_ref()).and_then(|(c, p)| p.of(c));
            let row = ScoreRow::from_payload(
                &payload,
                &s.device,
                s.observed_at_ms,
                None,
                subject,
                DeviceFacts::of(registry, &s.device),
            );
            push(&mut weeks, s.observed_at_ms, Rows::Scores(vec![row]));
        }
        Ok((Some(Planned { first, last, weeks }), Some(withheld)))
    }

    /// Writes the zero-row file of every table ([`EMPTY_WEEK`]), so the data set's
    /// readers bind all five tables before each has rows (DuckDB's `read_parquet`
    /// fails on a glob without files; `queries/views.sql` reads all five). The same
    /// names each time: idempotent.
    pub async fn write_schemas(&self) -> Result<(), FollowError> {
        for table in Table::ALL {
            let bytes = to_parquet(&empty_rows(table))
                .map_err(|e| SinkError::refused(self.name(), SinkFailure::Parquet(e)))?;
            let file = file_name(table, EMPTY_WEEK, 0, 0);
            self.sink.files().put_durable(&file, bytes.into()).await?;
        }
        Ok(())
    }

    /// Passes every `every` until `stop` turns true; a failed pass is logged and tried
    /// again at the next tick (its cursors did not move).
    pub async fn run(self, every: Duration, mut stop: watch::Receiver<bool>) {
        let mut schemas = false;
        loop {
            if !schemas {
                match self.write_schemas().await {
                    Ok(()) => schemas = true,
                    Err(e) => {
                        warn!(sink = %self.name(), error = %e, "surveillance table schemas not written; retrying");
                    }
                }
            }
            if let Err(e) = self.pass().await {
                warn!(sink = %self.name(), error = %e, "surveillance tables not written; retrying");
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                _ = stop.changed() => {}
            }
            if *stop.borrow() {
                return;
            }
        }
    }
}

/// The scores after `after` (the `scores` table, schema v5): the one place the sink
/// reads them.
pub fn read_scores(
    store: &Mutex<Store>,
    after: i64,
    max: usize,
) -> Result<Vec<crate::store::SurveilScore>, StoreError> {
    lock(store).surveil_scores_after(after, max)
}
