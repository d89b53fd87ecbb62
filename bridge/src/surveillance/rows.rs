//! One row type per table of the data set, built from what the store holds, and the
//! Arrow columns of each (names, types and nullability as `docs/surveillance.md`
//! documents them; [`schema`] is the one definition).
//!
//! A row never carries a care `patient_ref`: its `subject` is the surveillance-purpose
//! pseudonym the caller passes in (or none).

use std::sync::Arc;

use arrow_array::{
    ArrayRef, BooleanArray, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMillisecondArray,
};
use arrow_schema::{ArrowError, DataType, Field, Schema, SchemaRef, TimeUnit};
use serde_json::Value as Json;

use super::Table;

/// What the registry knows of a device, repeated on every row of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceFacts {
    pub site: Option<String>,
    pub region: Option<String>,
    pub lot: Option<String>,
    pub hardware_model: Option<String>,
}

impl DeviceFacts {
    /// The facts of `device` in `registry` (none when it is not there): its site and
    /// the optional `region`, `lot` and `hardware_model` of its registry entry.
    pub fn of(registry: &vitalmq_policies::DeviceRegistry, device: &str) -> Self {
        let Ok(id) = vitalmq_envelope::DeviceId::new(device) else {
            return Self::default();
        };
        match registry.device(&id) {
            Some(entry) => Self {
                site: Some(entry.site.as_str().to_owned()),
                region: entry.region.clone(),
                lot: entry.lot.clone(),
                hardware_model: entry.hardware_model.clone(),
            },
            None => Self::default(),
        }
    }
}

/// A row of `events`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventRow {
    pub event_id: String,
    pub kind: Option<String>,
    pub observed_at: Option<i64>,
    pub received_at: Option<i64>,
    pub device: Option<String>,
    pub subject: Option<String>,
    pub facts: DeviceFacts,
    pub fw: Option<String>,
    pub model: Option<String>,
    pub model_status: Option<String>,
    pub spo2: Option<f64>,
    pub pulse: Option<f64>,
    pub resp: Option<f64>,
    pub temp: Option<f64>,
    pub sbp: Option<f64>,
    pub dbp: Option<f64>,
    pub q: Option<f64>,
    pub implausible: Option<bool>,
    pub battery: Option<f64>,
    pub dropped: Option<i64>,
    pub alarm_code: Option<String>,
    pub alarm_level: Option<String>,
    pub alarm_active: Option<bool>,
    /// The device's boot epoch (SPEC section 4): `dropped` is cumulative per boot, so
    /// queries take its increases per (device, epoch).
    pub epoch: Option<i64>,
}

fn text(v: &Json, key: &str) -> Option<String> {
    v.get(key).and_then(Json::as_str).map(str::to_owned)
}

fn number(v: &Json, key: &str) -> Option<f64> {
    v.get(key).and_then(Json::as_f64)
}

impl EventRow {
    /// The row of one normalized event (`vitalmq-event/v1` JSON). `subject` is the
    /// surveillance pseudonym (never the care reference); `facts` the device's.
    pub fn from_event(
        event: &Json,
        observed_at_ms: u64,
        received_at_ms: u64,
        subject: Option<String>,
        facts: DeviceFacts,
    ) -> Self {
        let m = event.get("m").cloned().unwrap_or(Json::Null);
        let extra = event.get("extra").cloned().unwrap_or(Json::Null);
        let provenance = event.get("provenance").cloned().unwrap_or(Json::Null);
        let model_status = text(&provenance, "model_status").or_else(|| {
            provenance
                .get("model")
                .and_then(|m| m.get("status"))
                .and_then(Json::as_str)
                .map(str::to_owned)
        });
        let implausible = event
            .get("implausible")
            .map(|v| v.as_array().is_some_and(|a| !a.is_empty()) || v.as_bool() == Some(true))
            .unwrap_or(false);
        Self {
            event_id: text(event, "event_id").unwrap_or_default(),
            kind: text(event, "type"),
            observed_at: i64::try_from(observed_at_ms).ok(),
            received_at: i64::try_from(received_at_ms).ok(),
            device: text(event, "device"),
            subject,
            // The site the row was recorded at, not the registry's now: a device
            // moved between sites must not rewrite history (nor a redelivery differ).
            facts: DeviceFacts {
                site: text(event, "site").or(facts.site),
                ..facts
            },
            fw: text(event, "fw"),
            model: text(event, "model"),
            model_status,
            spo2: number(&m, "spo2"),
            pulse: number(&m, "pulse"),
            resp: number(&m, "resp"),
            temp: number(&m, "temp"),
            sbp: number(&m, "sbp"),
            dbp: number(&m, "dbp"),
            q: number(event, "q"),
            implausible: Some(implausible),
            battery: number(&extra, "battery"),
            dropped: extra.get("dropped").and_then(Json::as_i64),
            alarm_code: text(&extra, "alarm"),
            alarm_level: text(&extra, "level"),
            alarm_active: extra.get("active").and_then(Json::as_bool),
            epoch: event.get("epoch").and_then(Json::as_i64),
        }
    }
}

/// A row of `alerts`: one state change of an alert.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AlertRow {
    pub alert_id: String,
    pub state: Option<String>,
    pub rule: Option<String>,
    pub rule_version: Option<String>,
    pub severity: Option<String>,
    pub source: Option<String>,
    pub role: Option<String>,
    pub at: Option<i64>,
    pub device: Option<String>,
    pub subject: Option<String>,
    pub facts: DeviceFacts,
    pub fw: Option<String>,
    pub model: Option<String>,
    pub model_status: Option<String>,
    /// The rule set version that delivered the alert, when the rule engine ran
    /// candidate rule sets (the body's `rule_set_version`); null otherwise.
    pub rule_set_version: Option<String>,
}

impl AlertRow {
    /// The row of one stored alert change: its topic and body as published, the
    /// change's time. Operational alerts (`ops/...`) are source `ops`: not clinical,
    /// the data set's `alerts` measure leaves them out.
    pub fn from_alert(
        alert_id: &str,
        state: &str,
        at_ms: u64,
        topic: &str,
        body: &Json,
        subject: Option<String>,
        facts: DeviceFacts,
    ) -> Self {
        let rule = text(body, "rule");
        let source = if topic.starts_with("ops/") {
            "ops"
        } else if body.get("alarm").is_some_and(|a| !a.is_null()) {
            "device-alarm"
        } else if rule.as_deref().is_some_and(|r| r.starts_with("news2")) {
            "score"
        } else if rule.as_deref() == Some("no-data")
            || text(body, "kind").as_deref() == Some("no_data")
        {
            "no-data"
        } else {
            "rule"
        };
        Self {
            alert_id: alert_id.to_owned(),
            state: Some(state.to_owned()),
            rule,
            rule_version: text(body, "rule_version").or_else(|| {
                body.get("rule_version")
                    .filter(|v| v.is_number())
                    .map(Json::to_string)
            }),
            severity: text(body, "severity"),
            source: Some(source.to_owned()),
            role: Some(text(body, "role").unwrap_or_else(|| "live".to_owned())),
            at: i64::try_from(at_ms).ok(),
            device: text(body, "device"),
            subject,
            // The site the row was recorded at, not the registry's now: a device
            // moved between sites must not rewrite history (nor a redelivery differ).
            facts: DeviceFacts {
                site: text(body, "site").or(facts.site),
                ..facts
            },
            fw: text(body, "fw"),
            model: text(body, "model"),
            model_status: text(body, "model_status"),
            rule_set_version: text(body, "rule_set_version"),
        }
    }
}

/// A row of `scores` (from a `vitalmq-score/v1` payload, pinned in issue 21's design).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScoreRow {
    pub score_id: String,
    pub model: Option<String>,
    pub version: Option<String>,
    pub config_sha256: Option<String>,
    pub role: Option<String>,
    pub observed_at: Option<i64>,
    pub subject: Option<String>,
    pub facts: DeviceFacts,
    pub device: Option<String>,
    pub fw: Option<String>,
    pub aggregate: Option<i32>,
    pub risk: Option<String>,
    pub complete: Option<bool>,
    pub red: Option<bool>,
    pub missing: Option<String>,
}

impl ScoreRow {
    /// The row of one opened score payload; `observed_at_ms` and `device` from the
    /// `scores` table's columns, `fw` from the newest input event when known.
    pub fn from_payload(
        payload: &Json,
        device: &str,
        observed_at_ms: u64,
        fw: Option<String>,
        subject: Option<String>,
        facts: DeviceFacts,
    ) -> Self {
        let missing = payload.get("missing").and_then(Json::as_array).map(|a| {
            a.iter()
                .filter_map(Json::as_str)
                .collect::<Vec<_>>()
                .join(",")
        });
        Self {
            score_id: text(payload, "score_id").unwrap_or_default(),
            model: text(payload, "model"),
            version: text(payload, "version"),
            config_sha256: text(payload, "config_sha256"),
            role: text(payload, "role"),
            observed_at: i64::try_from(observed_at_ms).ok(),
            subject,
            // The site the row was recorded at, not the registry's now: a device
            // moved between sites must not rewrite history (nor a redelivery differ).
            facts: DeviceFacts {
                site: text(payload, "site").or(facts.site),
                ..facts
            },
            device: Some(device.to_owned()),
            fw,
            aggregate: payload
                .get("aggregate")
                .and_then(Json::as_i64)
                .and_then(|a| i32::try_from(a).ok()),
            risk: text(payload, "risk"),
            complete: payload.get("complete").and_then(Json::as_bool),
            red: payload.get("red").and_then(Json::as_bool),
            missing,
        }
    }
}

/// A row of `refusals`: one quarantined message (no patient).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RefusalRow {
    pub at: Option<i64>,
    pub device: Option<String>,
    pub facts: DeviceFacts,
    pub fw: Option<String>,
    pub reason: Option<String>,
}

/// A row of `gaps`: a range of sequence numbers a device never delivered (no patient).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GapRow {
    pub device: Option<String>,
    pub facts: DeviceFacts,
    pub fw: Option<String>,
    pub epoch: Option<i64>,
    pub from_seq: Option<i64>,
    pub to_seq: Option<i64>,
    pub state: Option<String>,
    pub opened_at: Option<i64>,
}

/// The values of one column.
enum Values {
    Str(Vec<Option<String>>),
    Time(Vec<Option<i64>>),
    F64(Vec<Option<f64>>),
    I64(Vec<Option<i64>>),
    I32(Vec<Option<i32>>),
    Bool(Vec<Option<bool>>),
}

struct Column {
    name: &'static str,
    nullable: bool,
    values: Values,
}

fn col(name: &'static str, values: Values) -> Column {
    Column {
        name,
        nullable: true,
        values,
    }
}

fn required(name: &'static str, values: Values) -> Column {
    Column {
        name,
        nullable: false,
        values,
    }
}

/// Time zone of every timestamp column.
pub const UTC: &str = "UTC";

impl Column {
    fn field(&self) -> Field {
        let ty = match self.values {
            Values::Str(_) => DataType::Utf8,
            Values::Time(_) => DataType::Timestamp(TimeUnit::Millisecond, Some(UTC.into())),
            Values::F64(_) => DataType::Float64,
            Values::I64(_) => DataType::Int64,
            Values::I32(_) => DataType::Int32,
            Values::Bool(_) => DataType::Boolean,
        };
        Field::new(self.name, ty, self.nullable)
    }

    fn array(self) -> ArrayRef {
        match self.values {
            Values::Str(v) => Arc::new(StringArray::from(v)),
            Values::Time(v) => Arc::new(TimestampMillisecondArray::from(v).with_timezone(UTC)),
            Values::F64(v) => Arc::new(Float64Array::from(v)),
            Values::I64(v) => Arc::new(Int64Array::from(v)),
            Values::I32(v) => Arc::new(Int32Array::from(v)),
            Values::Bool(v) => Arc::new(BooleanArray::from(v)),
        }
    }
}

macro_rules! values {
    ($rows:expr, $kind:ident, |$r:ident| $e:expr) => {
        Values::$kind($rows.iter().map(|$r| $e).collect())
    };
}

fn facts_columns<'a, R: 'a>(rows: &'a [R], facts: impl Fn(&R) -> &DeviceFacts) -> [Column; 4] {
    [
        col("site", values!(rows, Str, |r| facts(r).site.clone())),
        col("region", values!(rows, Str, |r| facts(r).region.clone())),
        col("lot", values!(rows, Str, |r| facts(r).lot.clone())),
        col(
            "hardware_model",
            values!(rows, Str, |r| facts(r).hardware_model.clone()),
        ),
    ]
}

fn event_columns(rows: &[EventRow]) -> Vec<Column> {
    let [site, region, lot, hardware_model] = facts_columns(rows, |r| &r.facts);
    vec![
        required("event_id", values!(rows, Str, |r| Some(r.event_id.clone()))),
        col("kind", values!(rows, Str, |r| r.kind.clone())),
        col("observed_at", values!(rows, Time, |r| r.observed_at)),
        col("received_at", values!(rows, Time, |r| r.received_at)),
        col("device", values!(rows, Str, |r| r.device.clone())),
        col("subject", values!(rows, Str, |r| r.subject.clone())),
        site,
        region,
        lot,
        hardware_model,
        col("fw", values!(rows, Str, |r| r.fw.clone())),
        col("model", values!(rows, Str, |r| r.model.clone())),
        col(
            "model_status",
            values!(rows, Str, |r| r.model_status.clone()),
        ),
        col("spo2", values!(rows, F64, |r| r.spo2)),
        col("pulse", values!(rows, F64, |r| r.pulse)),
        col("resp", values!(rows, F64, |r| r.resp)),
        col("temp", values!(rows, F64, |r| r.temp)),
        col("sbp", values!(rows, F64, |r| r.sbp)),
        col("dbp", values!(rows, F64, |r| r.dbp)),
        col("q", values!(rows, F64, |r| r.q)),
        col("implausible", values!(rows, Bool, |r| r.implausible)),
        col("battery", values!(rows, F64, |r| r.battery)),
        col("dropped", values!(rows, I64, |r| r.dropped)),
        col("alarm_code", values!(rows, Str, |r| r.alarm_code.clone())),
        col("alarm_level", values!(rows, Str, |r| r.alarm_level.clone())),
        col("alarm_active", values!(rows, Bool, |r| r.alarm_active)),
        col("epoch", values!(rows, I64, |r| r.epoch)),
    ]
}

fn alert_columns(rows: &[AlertRow]) -> Vec<Column> {
    let [site, region, lot, hardware_model] = facts_columns(rows, |r| &r.facts);
    vec![
        required("alert_id", values!(rows, Str, |r| Some(r.alert_id.clone()))),
        col("state", values!(rows, Str, |r| r.state.clone())),
        col("rule", values!(rows, Str, |r| r.rule.clone())),
        col(
            "rule_version",
            values!(rows, Str, |r| r.rule_version.clone()),
        ),
        col("severity", values!(rows, Str, |r| r.severity.clone())),
        col("source", values!(rows, Str, |r| r.source.clone())),
        col("role", values!(rows, Str, |r| r.role.clone())),
        col("at", values!(rows, Time, |r| r.at)),
        col("device", values!(rows, Str, |r| r.device.clone())),
        col("subject", values!(rows, Str, |r| r.subject.clone())),
        site,
        region,
        lot,
        hardware_model,
        col("fw", values!(rows, Str, |r| r.fw.clone())),
        col("model", values!(rows, Str, |r| r.model.clone())),
        col(
            "model_status",
            values!(rows, Str, |r| r.model_status.clone()),
        ),
        // Appended: files written before it read it as null (readers union by name).
        col(
            "rule_set_version",
            values!(rows, Str, |r| r.rule_set_version.clone()),
        ),
    ]
}

fn score_columns(rows: &[ScoreRow]) -> Vec<Column> {
    let [site, region, lot, hardware_model] = facts_columns(rows, |r| &r.facts);
    vec![
        required("score_id", values!(rows, Str, |r| Some(r.score_id.clone()))),
        col("model", values!(rows, Str, |r| r.model.clone())),
        col("version", values!(rows, Str, |r| r.version.clone())),
        col(
            "config_sha256",
            values!(rows, Str, |r| r.config_sha256.clone()),
        ),
        col("role", values!(rows, Str, |r| r.role.clone())),
        col("observed_at", values!(rows, Time, |r| r.observed_at)),
        col("subject", values!(rows, Str, |r| r.subject.clone())),
        site,
        region,
        col("device", values!(rows, Str, |r| r.device.clone())),
        lot,
        hardware_model,
        col("fw", values!(rows, Str, |r| r.fw.clone())),
        col("aggregate", values!(rows, I32, |r| r.aggregate)),
        col("risk", values!(rows, Str, |r| r.risk.clone())),
        col("complete", values!(rows, Bool, |r| r.complete)),
        col("red", values!(rows, Bool, |r| r.red)),
        col("missing", values!(rows, Str, |r| r.missing.clone())),
    ]
}

fn refusal_columns(rows: &[RefusalRow]) -> Vec<Column> {
    let [site, region, lot, hardware_model] = facts_columns(rows, |r| &r.facts);
    vec![
        col("at", values!(rows, Time, |r| r.at)),
        col("device", values!(rows, Str, |r| r.device.clone())),
        site,
        region,
        lot,
        hardware_model,
        col("fw", values!(rows, Str, |r| r.fw.clone())),
        col("reason", values!(rows, Str, |r| r.reason.clone())),
    ]
}

fn gap_columns(rows: &[GapRow]) -> Vec<Column> {
    let [site, region, lot, hardware_model] = facts_columns(rows, |r| &r.facts);
    vec![
        col("device", values!(rows, Str, |r| r.device.clone())),
        site,
        region,
        lot,
        hardware_model,
        col("fw", values!(rows, Str, |r| r.fw.clone())),
        col("epoch", values!(rows, I64, |r| r.epoch)),
        col("from_seq", values!(rows, I64, |r| r.from_seq)),
        col("to_seq", values!(rows, I64, |r| r.to_seq)),
        col("state", values!(rows, Str, |r| r.state.clone())),
        col("opened_at", values!(rows, Time, |r| r.opened_at)),
    ]
}

fn batch_of(columns: Vec<Column>) -> Result<RecordBatch, ArrowError> {
    let schema = Arc::new(Schema::new(
        columns.iter().map(Column::field).collect::<Vec<_>>(),
    ));
    RecordBatch::try_new(schema, columns.into_iter().map(Column::array).collect())
}

/// The Arrow schema of `table`.
pub fn schema(table: Table) -> SchemaRef {
    let columns = match table {
        Table::Events => event_columns(&[]),
        Table::Alerts => alert_columns(&[]),
        Table::Scores => score_columns(&[]),
        Table::Refusals => refusal_columns(&[]),
        Table::Gaps => gap_columns(&[]),
    };
    Arc::new(Schema::new(
        columns.iter().map(Column::field).collect::<Vec<_>>(),
    ))
}

/// Rows of one table, ready to be written.
#[derive(Debug, Clone, PartialEq)]
pub enum Rows {
    Events(Vec<EventRow>),
    Alerts(Vec<AlertRow>),
    Scores(Vec<ScoreRow>),
    Refusals(Vec<RefusalRow>),
    Gaps(Vec<GapRow>),
}

impl Rows {
    pub fn table(&self) -> Table {
        match self {
            Rows::Events(_) => Table::Events,
            Rows::Alerts(_) => Table::Alerts,
            Rows::Scores(_) => Table::Scores,
            Rows::Refusals(_) => Table::Refusals,
            Rows::Gaps(_) => Table::Gaps,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Rows::Events(r) => r.len(),
            Rows::Alerts(r) => r.len(),
            Rows::Scores(r) => r.len(),
            Rows::Refusals(r) => r.len(),
            Rows::Gaps(r) => r.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows as one Arrow record batch of the table's [`schema`].
    pub fn to_batch(&self) -> Result<RecordBatch, ArrowError> {
        batch_of(match self {
            Rows::Events(r) => event_columns(r),
            Rows::Alerts(r) => alert_columns(r),
            Rows::Scores(r) => score_columns(r),
            Rows::Refusals(r) => refusal_columns(r),
            Rows::Gaps(r) => gap_columns(r),
        })
    }
}

#[cfg(test)]
mod tests {
    use arrow_array::Array as _;
    use serde_json::json;

    use super::*;

    fn event() -> Json {
        json!({
            "format": "vitalmq-event/v1", "event_id": "ev1-a", "device": "dev-1",
            "site": "north", "patient_ref": "pt-care", "type": "vitals",
            "m": {"spo2": 97, "pulse": 61, "resp": 14, "temp": 36.9},
            "q": 0.9, "fw": "1.2.0", "model": "arrhythmia-net/2.1.0", "epoch": 4,
            "extra": {"battery": 81, "dropped": 3},
            "implausible": ["spo2"],
            "provenance": {"model_status": "approved"}
        })
    }

    #[test]
    fn an_event_row_takes_the_measurements_facts_and_provenance() {
        let facts = DeviceFacts {
            site: None,
            region: Some("eu".into()),
            lot: Some("LOT-C".into()),
            hardware_model: Some("hm-2".into()),
        };
        let row = EventRow::from_event(&event(), 5, 6, Some("ps-1".into()), facts);
        assert_eq!(row.event_id, "ev1-a");
        assert_eq!(row.kind.as_deref(), Some("vitals"));
        assert_eq!((row.observed_at, row.received_at), (Some(5), Some(6)));
        assert_eq!(row.facts.site.as_deref(), Some("north"), "from the event");
        assert_eq!(row.facts.lot.as_deref(), Some("LOT-C"));
        assert_eq!(
            (row.spo2, row.pulse, row.resp, row.temp, row.sbp),
            (Some(97.0), Some(61.0), Some(14.0), Some(36.9), None)
        );
        assert_eq!((row.battery, row.dropped), (Some(81.0), Some(3)));
        assert_eq!(row.epoch, Some(4), "the boot the counter belongs to");
        assert_eq!(row.implausible, Some(true));
        assert_eq!(row.model_status.as_deref(), Some("approved"));
        assert_eq!(row.subject.as_deref(), Some("ps-1"), "what the caller gave");
    }

    #[test]
    fn device_facts_come_from_the_registry_entry() {
        let key = vitalmq_envelope::SigningKey::generate(vitalmq_envelope::Algorithm::EdDsa)
            .expect("key")
            .verifying_key()
            .to_hex();
        let text = format!(
            "format = \"vitalmq-registry/v2\"\ntrust_domain = \"t.vitalmq\"\n\
             [[devices]]\nid = \"dev-1\"\nalg = \"EdDSA\"\npublic_key = \"{key}\"\n\
             lot = \"LOT-C\"\nhardware_model = \"hm-2\"\nregion = \"eu-west\"\n\
             [[devices.assignments]]\nvalid_from = \"2025-01-01T00:00:00Z\"\npatient_ref = \"pt-a\"\nsite = \"north\"\n"
        );
        let registry =
            vitalmq_policies::DeviceRegistry::parse(&text, std::path::Path::new("r.toml"))
                .expect("registry");
        assert_eq!(
            DeviceFacts::of(&registry, "dev-1"),
            DeviceFacts {
                site: Some("north".into()),
                region: Some("eu-west".into()),
                lot: Some("LOT-C".into()),
                hardware_model: Some("hm-2".into()),
            }
        );
        assert_eq!(DeviceFacts::of(&registry, "dev-9"), DeviceFacts::default());
    }

    #[test]
    fn an_alarm_event_fills_the_alarm_columns() {
        let mut e = event();
        e["type"] = json!("alarm");
        e["extra"] = json!({"alarm": "arrhythmia", "level": "urgent", "active": true});
        let row = EventRow::from_event(&e, 0, 0, None, DeviceFacts::default());
        assert_eq!(row.alarm_code.as_deref(), Some("arrhythmia"));
        assert_eq!(row.alarm_level.as_deref(), Some("urgent"));
        assert_eq!(row.alarm_active, Some(true));
        assert_eq!(row.subject, None);
    }

    #[test]
    fn alert_rows_name_their_source() {
        let body = json!({"rule": "spo2-low", "rule_version": "3", "severity": "high",
            "device": "dev-1", "site": "north", "fw": "1.2.0", "patient_ref": "pt-care"});
        let row = AlertRow::from_alert(
            "al-1",
            "open",
            9,
            "alerts/north/high/dev-1",
            &body,
            None,
            DeviceFacts::default(),
        );
        assert_eq!(row.source.as_deref(), Some("rule"));
        assert_eq!(row.role.as_deref(), Some("live"), "the default role");
        assert_eq!(row.rule_version.as_deref(), Some("3"));
        let alarm = json!({"rule": "device-alarm", "alarm": {"code": "x"}});
        let row = AlertRow::from_alert(
            "al-2",
            "open",
            9,
            "alerts/north/high/dev-1",
            &alarm,
            None,
            DeviceFacts::default(),
        );
        assert_eq!(row.source.as_deref(), Some("device-alarm"));
        let score = json!({"rule": "news2-high", "rule_version": "1.0.0", "role": "shadow"});
        let row = AlertRow::from_alert(
            "al-3",
            "open",
            9,
            "alerts/north/high/dev-1",
            &score,
            None,
            DeviceFacts::default(),
        );
        assert_eq!(
            (row.source.as_deref(), row.role.as_deref()),
            (Some("score"), Some("shadow"))
        );
        let ops = json!({"type": "store", "state": "open"});
        let row = AlertRow::from_alert(
            "op-1",
            "open",
            9,
            "ops/bridge/store",
            &ops,
            None,
            DeviceFacts::default(),
        );
        assert_eq!(row.source.as_deref(), Some("ops"), "not a clinical alert");
    }

    /// A row keeps the site it was recorded at: the registry's site now (a device
    /// moved since) does not rewrite history.
    #[test]
    fn rows_keep_the_recorded_site() {
        let moved = DeviceFacts {
            site: Some("south".into()),
            ..DeviceFacts::default()
        };
        let row = EventRow::from_event(&event(), 5, 6, None, moved.clone());
        assert_eq!(row.facts.site.as_deref(), Some("north"));
        let body = json!({"rule": "spo2-low", "device": "dev-1", "site": "north"});
        let row = AlertRow::from_alert(
            "al-1",
            "open",
            9,
            "alerts/north/high/dev-1",
            &body,
            None,
            moved.clone(),
        );
        assert_eq!(row.facts.site.as_deref(), Some("north"));
        let payload = json!({"score_id": "sc-1", "site": "north"});
        let row = ScoreRow::from_payload(&payload, "dev-1", 9, None, None, moved.clone());
        assert_eq!(row.facts.site.as_deref(), Some("north"));
        let row = EventRow::from_event(&json!({"event_id": "e"}), 5, 6, None, moved);
        assert_eq!(
            row.facts.site.as_deref(),
            Some("south"),
            "the registry's when the row names none"
        );
    }

    #[test]
    fn a_score_row_reads_the_pinned_payload() {
        let payload = json!({"format": "vitalmq-score/v1", "score_id": "sc-1",
            "model": "news2", "version": "1.0.0", "config_sha256": "ab", "role": "live",
            "patient_ref": "pt-care", "site": "north", "aggregate": 7, "risk": "high",
            "complete": false, "red": true, "missing": ["sbp", "temp"]});
        let row = ScoreRow::from_payload(
            &payload,
            "dev-1",
            11,
            None,
            Some("ps".into()),
            DeviceFacts::default(),
        );
        assert_eq!(row.score_id, "sc-1");
        assert_eq!(row.aggregate, Some(7));
        assert_eq!(row.missing.as_deref(), Some("sbp,temp"));
        assert_eq!(row.facts.site.as_deref(), Some("north"));
        assert_eq!((row.complete, row.red), (Some(false), Some(true)));
    }

    /// An alert the rule engine delivered under candidate rule sets names the rule
    /// set version and its role; one without those keys has a null version and the
    /// role `live`, as before. Both reach the Parquet column.
    #[test]
    fn alert_rows_carry_the_rule_set_version_and_role() {
        let alert = |body: &Json| {
            AlertRow::from_alert(
                "al-1",
                "open",
                9,
                "alerts/north/high/dev-1",
                body,
                None,
                DeviceFacts::default(),
            )
        };
        let candidate = alert(&json!({"rule": "spo2-low", "rule_version": "3",
            "rule_set_version": "2026-01-01.2", "role": "canary", "device": "dev-1"}));
        assert_eq!(
            (
                candidate.rule_set_version.as_deref(),
                candidate.role.as_deref()
            ),
            (Some("2026-01-01.2"), Some("canary"))
        );
        let before = alert(&json!({"rule": "spo2-low", "rule_version": "3", "device": "dev-1"}));
        assert_eq!(
            (before.rule_set_version.as_deref(), before.role.as_deref()),
            (None, Some("live"))
        );
        let batch = Rows::Alerts(vec![candidate, before])
            .to_batch()
            .expect("batch");
        assert_eq!(batch.schema(), schema(Table::Alerts));
        let field = schema(Table::Alerts);
        let field = field.field_with_name("rule_set_version").expect("column");
        assert_eq!(field.data_type(), &DataType::Utf8);
        assert!(field.is_nullable());
        let column = batch
            .column_by_name("rule_set_version")
            .expect("column")
            .as_any()
            .downcast_ref::<arrow_array::StringArray>()
            .expect("strings");
        assert_eq!(
            column.iter().collect::<Vec<_>>(),
            [Some("2026-01-01.2"), None]
        );
    }

    #[test]
    fn batches_have_the_documented_schema() {
        let row = EventRow::from_event(&event(), 5, 6, None, DeviceFacts::default());
        let batch = Rows::Events(vec![row]).to_batch().expect("batch");
        assert_eq!(batch.schema(), schema(Table::Events));
        assert_eq!(batch.num_rows(), 1);
        let names: Vec<_> = schema(Table::Gaps)
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(
            names,
            [
                "device",
                "site",
                "region",
                "lot",
                "hardware_model",
                "fw",
                "epoch",
                "from_seq",
                "to_seq",
                "state",
                "opened_at"
            ]
        );
        let observed = schema(Table::Events);
        let observed = observed.field_with_name("observed_at").expect("column");
        assert_eq!(
            observed.data_type(),
            &DataType::Timestamp(TimeUnit::Millisecond, Some(UTC.into()))
        );
        assert!(!schema(Table::Events).field(0).is_nullable(), "event_id");
        assert!(batch.column(5).is_null(0), "no subject given, none written");
    }
}
