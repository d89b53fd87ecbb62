//! The write side: what the recorder commits, in one transaction per batch, and the
//! state it loads back at start (windows, open gaps, alert engine state).

use std::collections::HashMap;

use rusqlite::{OptionalExtension as _, params};
use vitalmq_envelope::{DeviceId, Telemetry, Verified};
use vitalmq_policies::{DeviceEntry, SiteId};

use super::schema::{EVENT_INDEX_BUCKET, event_key};
use super::{Store, StoreError, classify, i2u, u2i};
use crate::gaps::{Gap, GapState};
use crate::normalize::{self, Receipt};
use crate::plausible::Assessment;
use crate::window::{Accepted, DeviceSequence, Verdict, WindowSize};

/// An accepted message, both planes, as the recorder hands it to [`Store::commit`]: the
/// only way an event reaches the store.
///
/// Only [`RecordedEvent::new`] makes one, from a [`Verified`]`<`[`Telemetry`]`>` and the
/// sequence verdict: the raw plane is the exact bytes that were verified (shared with
/// the `Verified` value, not copied), and the normalized plane, the event id, device,
/// epoch and seq are derived from the verified value. Bytes that were never verified
/// cannot be stored; the fields are private, so this does not compile:
///
/// ```compile_fail,E0451
/// use vitalmq_bridge::store::RecordedEvent;
///
/// let forged = RecordedEvent {
///     event_id: "ev1-00000000000000000000000000000000".to_owned(),
///     device: vitalmq_envelope::DeviceId::new("dev-00001").unwrap(),
///     site: vitalmq_policies::SiteId::new("site-01").unwrap(),
///     epoch: 1,
///     seq: 1,
///     observed_at_ms: 0,
///     received_at_ms: 0,
///     verdict: "in_order".to_owned(),
///     broker: String::new(),
///     publisher: String::new(),
///     topic: "devices/dev-00001/telemetry".to_owned(),
///     sha256_hex: String::new(),
///     raw: bytes::Bytes::from_static(b"never verified"),
///     normalized_json: "{}".to_owned(),
/// };
/// ```
#[derive(Debug, Clone)]
pub struct RecordedEvent {
    event_id: String,
    device: DeviceId,
    site: SiteId,
    epoch: u64,
    seq: u64,
    observed_at_ms: u64,
    received_at_ms: u64,
    /// The stored form of the verdict (`in_order`, `missing=3`, ...).
    verdict: String,
    broker: String,
    publisher: String,
    topic: String,
    sha256_hex: String,
    raw: bytes::Bytes,
    normalized_json: String,
    /// The patient the reading is attributed to (the subject its payloads are sealed
    /// for).
    patient_ref: String,
}

impl RecordedEvent {
    /// The event of an accepted message: `verdict` is what the sequence window said,
    /// `entry` the device's registry entry, `receipt` where the bridge received it,
    /// `assessment` what the plausibility and clock policies made of it.
    pub fn new(
        verified: &Verified<Telemetry>,
        verdict: Accepted,
        entry: &DeviceEntry,
        receipt: &Receipt<'_>,
        assessment: &Assessment,
    ) -> Self {
        let t: &Telemetry = verified;
        let verdict = Verdict::Accept(verdict).to_string();
        let event_id = normalize::event_id(&t.dev, t.epoch, t.seq);
        let normalized_json =
            normalize::normalize(verified, &event_id, entry, receipt, &verdict, assessment);
        Self {
            event_id,
            device: t.dev.clone(),
            site: entry.site.clone(),
            epoch: t.epoch,
            seq: t.seq,
            observed_at_ms: assessment.observed_at_ms,
            received_at_ms: receipt.received_at_ms,
            verdict,
            broker: receipt.broker.to_owned(),
            publisher: receipt.publisher.to_owned(),
            topic: receipt.topic.to_owned(),
            sha256_hex: hex::encode(verified.message_sha256()),
            raw: verified.message().clone(),
            normalized_json,
            patient_ref: entry.patient_ref.clone(),
        }
    }

    /// The patient the reading is attributed to.
    pub fn patient_ref(&self) -> &str {
        &self.patient_ref
    }

    /// The deterministic event id of `(device, epoch, seq)`.
    pub fn event_id(&self) -> &str {
        &self.event_id
    }

    pub fn device(&self) -> &DeviceId {
        &self.device
    }

    /// The time the bridge relies on for the reading (see `plausible`).
    pub fn observed_at_ms(&self) -> u64 {
        self.observed_at_ms
    }

    /// The normalized event JSON (plane 2).
    pub fn normalized_json(&self) -> &str {
        &self.normalized_json
    }

    /// For tests of the store: the raw bytes it stores.
    #[cfg(test)]
    pub(crate) fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// For tests of the store: the same event attributed to another patient.
    #[cfg(test)]
    pub(crate) fn for_patient(mut self, patient_ref: &str) -> Self {
        patient_ref.clone_into(&mut self.patient_ref);
        self
    }

    /// For tests of the store: the same event received at another time.
    #[cfg(test)]
    pub(crate) fn received_at(mut self, ms: u64) -> Self {
        self.received_at_ms = ms;
        self
    }

    /// For tests of the store: the same `(device, epoch, seq)` under another id, as
    /// only a bug could make it.
    #[cfg(test)]
    pub(crate) fn with_event_id(mut self, event_id: &str) -> Self {
        event_id.clone_into(&mut self.event_id);
        self
    }
}

/// Events for tests: signed by per-device keys made once, verified, recorded.
#[cfg(test)]
pub(crate) mod test_events {
    use std::collections::{BTreeMap, HashMap};
    use std::sync::LazyLock;

    use vitalmq_envelope::{
        Algorithm, AnyKid, DeviceId, MessageType, Number, SigningKey, Telemetry,
    };
    use vitalmq_policies::{DeviceEntry, SiteId};

    use super::RecordedEvent;
    use crate::normalize::Receipt;
    use crate::plausible::Assessment;
    use crate::window::Accepted;

    static DEVICES: LazyLock<HashMap<&'static str, (SigningKey, DeviceEntry)>> =
        LazyLock::new(|| {
            ["dev-00001", "dev-00002"]
                .into_iter()
                .map(|id| {
                    let key = SigningKey::generate(Algorithm::EdDsa).expect("key");
                    let entry = DeviceEntry {
                        id: DeviceId::new(id).expect("id"),
                        site: SiteId::new("site-01").expect("site"),
                        patient_ref: "pt-7f3a".into(),
                        key: key.verifying_key(),
                        consent: None,
                        processing_policy: None,
                        lot: None,
                        hardware_model: None,
                        region: None,
                    };
                    (id, (key, entry))
                })
                .collect()
        });

    /// `device`'s message `(epoch, seq)`, accepted in order and received at 2 ms.
    pub(crate) fn event(device: &str, epoch: u64, seq: u64) -> RecordedEvent {
        let (key, entry) = &DEVICES[device];
        let telemetry = Telemetry {
            dev: entry.id.clone(),
            epoch,
            seq,
            ts: 1,
            fw: "1.0.0".into(),
            kind: MessageType::Vitals,
            m: Some(BTreeMap::from([("spo2".to_owned(), Number::Int(97))])),
            q: None,
            model: None,
            schema: None,
            extra: BTreeMap::new(),
        };
        let bytes = vitalmq_envelope::sign(&telemetry, key).expect("sign");
        let verified =
            vitalmq_envelope::verify(&bytes, &AnyKid(entry.key.clone()), Some(&entry.id))
                .expect("verify");
        let topic = format!("devices/{device}/telemetry");
        let receipt = Receipt {
            received_at_ms: 2,
            topic: &topic,
            broker: "b",
            publisher: "p",
            bridge: "spiffe://test.vitalmq/bridge/bridge-01",
        };
        let assessment = Assessment::of(&verified, 2, &Default::default(), &Default::default());
        RecordedEvent::new(&verified, Accepted::InOrder, entry, &receipt, &assessment)
    }
}

/// A refused message kept for investigation.
#[derive(Debug, Clone)]
pub struct Quarantined {
    pub received_at_ms: u64,
    pub topic: String,
    pub device: Option<String>,
    pub reason: String,
    pub detail: String,
    pub sha256_hex: String,
    pub raw: bytes::Bytes,
}

/// One alert state change to record and deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAlert {
    pub alert_id: String,
    pub state: String,
    /// `clinical` or `operational`.
    pub kind: String,
    pub topic: String,
    pub device: Option<String>,
    pub rule: Option<String>,
    pub created_at_ms: u64,
    /// The alert JSON exactly as published.
    pub body: String,
    /// The escalation level this change is delivered at (SPEC 5.2): 0 for the first
    /// message of an episode; the policy names the handlers of each level.
    pub level: u32,
}

/// What a commit left out: events and alert changes of an erased patient (a late
/// message from before the erasure). They are not stored (never as plaintext), while
/// the rest of the batch is; the recorder acknowledges, counts and audits them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Committed {
    /// `(event_id, device)` of each event not stored.
    pub erased_events: Vec<(String, String)>,
    /// `(alert_id, state)` of each alert change not stored.
    pub erased_alerts: Vec<(String, String)>,
    /// Patients found erased while sealing: their scoring state was not written, and
    /// the sequencer drops it from memory (`Sequenced::forget_patients`).
    pub erased_patients: Vec<String>,
}

/// A payload as it goes into its column: sealed, or plaintext without a keyring.
pub(super) enum Stored<'a> {
    Plain(&'a [u8]),
    Sealed(Vec<u8>),
}

impl Stored<'_> {
    pub(super) fn value(&self) -> rusqlite::types::ToSqlOutput<'_> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        match self {
            Self::Plain(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
            Self::Sealed(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        }
    }

    fn text(&self) -> rusqlite::types::ToSqlOutput<'_> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        match self {
            Self::Plain(b) => ToSqlOutput::Borrowed(ValueRef::Text(b)),
            Self::Sealed(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        }
    }
}

/// The payloads of one batch, sealed before its transaction starts (the keyring is a
/// database of its own).
struct SealedBatch<'a> {
    /// Per event of the commit: raw and normalized, or `None` when its patient was
    /// erased.
    events: Vec<Option<(Stored<'a>, Stored<'a>)>>,
    quarantine: Vec<Stored<'a>>,
    /// Per alert: the body and its patient, or `None` when the patient was erased.
    alerts: Vec<Option<(Stored<'a>, Option<String>)>>,
    /// Per score: the payload, or `None` when the patient was erased.
    scores: Vec<Option<Stored<'a>>>,
    /// Per patient scoring state: the state, or `None` when the patient was erased
    /// (found so by any payload of the batch): never written back.
    patient_states: Vec<Option<Stored<'a>>>,
    /// Per shadow alert change: the payload, or `None` when the patient was erased.
    shadow_alerts: Vec<Option<Stored<'a>>>,
}

/// Everything one batch changes, written in one transaction.
#[derive(Debug, Default)]
pub struct Commit {
    pub events: Vec<RecordedEvent>,
    pub quarantine: Vec<Quarantined>,
    pub sequences: Vec<(DeviceId, DeviceSequence)>,
    pub gaps: Vec<(DeviceId, Gap)>,
    /// `(device, counter name, increment)`.
    pub counters: Vec<(String, &'static str, u64)>,
    pub alerts: Vec<NewAlert>,
    /// The alert engine's state of each device the batch touched, JSON.
    pub alert_states: Vec<(DeviceId, String)>,
    /// Scores computed from this batch's readings (issue 21).
    pub scores: Vec<crate::score::NewScore>,
    /// The scoring state of each patient the batch touched, JSON.
    pub patient_states: Vec<(String, String)>,
    /// Would-be alert changes of rule-set versions in shadow for their device (issue
    /// 21): stored, never delivered.
    pub shadow_alerts: Vec<super::NewShadowAlert>,
    pub now_ms: u64,
}

impl Commit {
    /// Takes the alert part of the commit: alert rows, alert states, the scores
    /// with the patients' scoring states (clinical outputs like the alerts, which name
    /// their `score_id`, and the state that holds the score alert episodes), and the
    /// shadow alert changes (their engine state is adopted with the alert states, so a
    /// resend does not make them again). What the
    /// recorder writes with [`Store::commit_alerts_only`] while recording is paused;
    /// the events, windows and gaps stay for the devices' resends.
    pub fn take_alert_part(&mut self) -> Commit {
        Commit {
            alerts: std::mem::take(&mut self.alerts),
            alert_states: std::mem::take(&mut self.alert_states),
            scores: std::mem::take(&mut self.scores),
            patient_states: std::mem::take(&mut self.patient_states),
            shadow_alerts: std::mem::take(&mut self.shadow_alerts),
            now_ms: self.now_ms,
            ..Commit::default()
        }
    }
}

impl Store {
    /// The stored sequence windows, converted to `size` if it changed.
    pub fn load_sequences(
        &self,
        size: WindowSize,
    ) -> Result<HashMap<DeviceId, DeviceSequence>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT device, epoch, highest, window, bitmap FROM device_state")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Vec<u8>>(4)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out = HashMap::new();
        for row in rows {
            let (device, epoch, highest, window, bitmap) = row.map_err(|e| self.err(e))?;
            let corrupt = |detail: String| StoreError::Corrupt {
                path: self.path.clone(),
                device: device.clone(),
                detail,
            };
            let id = DeviceId::new(&device).map_err(|e| corrupt(e.to_string()))?;
            let window = u32::try_from(window).map_err(|e| corrupt(e.to_string()))?;
            let state = DeviceSequence::restore(size, window, i2u(epoch), i2u(highest), &bitmap)
                .map_err(|e| corrupt(e.to_string()))?;
            out.insert(id, state);
        }
        Ok(out)
    }

    /// Gaps still open, per device.
    pub fn load_open_gaps(&self) -> Result<HashMap<DeviceId, Vec<Gap>>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT device, epoch, first, last, filled, opened_at_ms FROM gaps
                 WHERE state = 'open'",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out: HashMap<DeviceId, Vec<Gap>> = HashMap::new();
        for row in rows {
            let (device, epoch, first, last, filled, opened) = row.map_err(|e| self.err(e))?;
            let id = DeviceId::new(&device).map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                device: device.clone(),
                detail: e.to_string(),
            })?;
            out.entry(id).or_default().push(Gap {
                epoch: i2u(epoch),
                first: i2u(first),
                last: i2u(last),
                filled: i2u(filled),
                state: GapState::Open,
                opened_at_ms: i2u(opened),
            });
        }
        Ok(out)
    }

    /// Seals the payloads of `c` (a no-op without a keyring). An erased patient's
    /// events and alert changes are left out ([`Committed`]); any other key failure
    /// fails the commit.
    fn seal_batch<'a>(&self, c: &'a Commit) -> Result<(SealedBatch<'a>, Committed), StoreError> {
        use super::sealing::{
            QUARANTINE_SUBJECT, UNATTRIBUTED_SUBJECT, alert_context, alert_patient,
            normalized_context, quarantine_context, raw_context, score_context,
            score_state_context, shadow_alert_context,
        };
        use vitalmq_keyring::KeyError;
        let key_err = |source| StoreError::Key {
            path: self.path.clone(),
            source,
        };
        let stored = |subject: &str, context: String, plain: &'a [u8]| {
            Ok::<_, KeyError>(match self.seal(subject, &context, plain)? {
                Some(sealed) => Stored::Sealed(sealed),
                None => Stored::Plain(plain),
            })
        };
        let mut out = Committed::default();
        let mut erased_patients = std::collections::BTreeSet::new();
        let mut events = Vec::with_capacity(c.events.len());
        for e in &c.events {
            let subject = if e.patient_ref.is_empty() {
                UNATTRIBUTED_SUBJECT
            } else {
                e.patient_ref.as_str()
            };
            let sealed = stored(subject, raw_context(&e.event_id), &e.raw[..]).and_then(|raw| {
                let normalized = stored(
                    subject,
                    normalized_context(&e.event_id),
                    e.normalized_json.as_bytes(),
                )?;
                Ok((raw, normalized))
            });
            match sealed {
                Ok(pair) => events.push(Some(pair)),
                Err(KeyError::Erased { .. }) => {
                    out.erased_events
                        .push((e.event_id.clone(), e.device.to_string()));
                    erased_patients.insert(e.patient_ref.clone());
                    events.push(None);
                }
                Err(e) => return Err(key_err(e)),
            }
        }
        let quarantine = c
            .quarantine
            .iter()
            .map(|m| {
                stored(
                    QUARANTINE_SUBJECT,
                    quarantine_context(&m.sha256_hex),
                    &m.raw[..],
                )
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(key_err)?;
        let mut alerts = Vec::with_capacity(c.alerts.len());
        for a in &c.alerts {
            let patient = alert_patient(&a.body);
            let body = match &patient {
                Some(p) => stored(p, alert_context(&a.alert_id, &a.state), a.body.as_bytes()),
                None => Ok(Stored::Plain(a.body.as_bytes())),
            };
            match body {
                Ok(body) => alerts.push(Some((body, patient))),
                Err(KeyError::Erased { .. }) => {
                    out.erased_alerts
                        .push((a.alert_id.clone(), a.state.clone()));
                    erased_patients.extend(patient);
                    alerts.push(None);
                }
                Err(e) => return Err(key_err(e)),
            }
        }
        let mut scores = Vec::with_capacity(c.scores.len());
        for sc in &c.scores {
            match stored(
                &sc.patient_ref,
                score_context(&sc.score_id),
                sc.payload.as_bytes(),
            ) {
                Ok(p) => scores.push(Some(p)),
                // A late reading of an erased patient makes no score.
                Err(KeyError::Erased { .. }) => {
                    erased_patients.insert(sc.patient_ref.clone());
                    scores.push(None);
                }
                Err(e) => return Err(key_err(e)),
            }
        }
        let mut shadow_alerts = Vec::with_capacity(c.shadow_alerts.len());
        for sa in &c.shadow_alerts {
            let payload = if sa.patient_ref.is_empty() {
                Ok(Stored::Plain(sa.payload.as_bytes()))
            } else {
                stored(
                    &sa.patient_ref,
                    shadow_alert_context(&sa.change_id),
                    sa.payload.as_bytes(),
                )
            };
            match payload {
                Ok(p) => shadow_alerts.push(Some(p)),
                // A late reading of an erased patient makes no shadow alert.
                Err(KeyError::Erased { .. }) => {
                    erased_patients.insert(sa.patient_ref.clone());
                    shadow_alerts.push(None);
                }
                Err(e) => return Err(key_err(e)),
            }
        }
        // The scoring state holds the patient's latest readings and their event ids:
        // sealed for the patient like the readings, and never written back for a
        // patient any payload of the batch found erased.
        let mut patient_states = Vec::with_capacity(c.patient_states.len());
        for (patient, json) in &c.patient_states {
            if erased_patients.contains(patient) {
                patient_states.push(None);
                continue;
            }
            match stored(patient, score_state_context(patient), json.as_bytes()) {
                Ok(p) => patient_states.push(Some(p)),
                Err(KeyError::Erased { .. }) => {
                    erased_patients.insert(patient.clone());
                    patient_states.push(None);
                }
                Err(e) => return Err(key_err(e)),
            }
        }
        out.erased_patients = erased_patients.into_iter().collect();
        Ok((
            SealedBatch {
                events,
                quarantine,
                alerts,
                scores,
                patient_states,
                shadow_alerts,
            },
            out,
        ))
    }

    /// Writes one batch in one transaction, durable when this returns `Ok`; says
    /// which events and alert changes of erased patients it left out.
    pub fn commit(&mut self, c: &Commit) -> Result<Committed, StoreError> {
        let (sealed, committed) = self.seal_batch(c)?;
        let path = self.path.clone();
        let err = |source| classify(&path, source);
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut raw = tx
                .prepare_cached(
                    "INSERT INTO raw_messages (received_at_ms, broker, publisher, topic, sha256, bytes)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(err)?;
            let mut event = tx
                .prepare_cached(
                    "INSERT INTO events (event_id, raw_id, device, site, epoch, seq,
                         observed_at_ms, received_at_ms, verdict, normalized, patient_ref)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                     ON CONFLICT(device, epoch, seq) DO NOTHING",
                )
                .map_err(err)?;
            let mut index = tx
                .prepare_cached(
                    "INSERT INTO event_index (bucket, key, position) VALUES (?1, ?2, ?3)",
                )
                .map_err(err)?;
            for (e, payloads) in c.events.iter().zip(&sealed.events) {
                let Some((raw_bytes, normalized)) = payloads else {
                    continue;
                };
                raw.execute(params![
                    u2i(e.received_at_ms),
                    e.broker,
                    e.publisher,
                    e.topic,
                    e.sha256_hex,
                    raw_bytes.value()
                ])
                .map_err(err)?;
                let raw_id = tx.last_insert_rowid();
                let inserted = event
                    .execute(params![
                        e.event_id,
                        raw_id,
                        e.device.as_str(),
                        e.site.as_str(),
                        u2i(e.epoch),
                        u2i(e.seq),
                        u2i(e.observed_at_ms),
                        u2i(e.received_at_ms),
                        e.verdict,
                        normalized.text(),
                        (!e.patient_ref.is_empty()).then_some(e.patient_ref.as_str())
                    ])
                    .map_err(err)?;
                if inserted == 0 {
                    // Already stored: only reachable after an operator reset the
                    // device's window (`resets`). A duplicate, not a second event, and
                    // never a failed commit that would stop the recorder.
                    tx.execute("DELETE FROM raw_messages WHERE id = ?1", params![raw_id])
                        .map_err(err)?;
                    tx.execute(
                        "INSERT INTO counters (device, name, value) VALUES (?1, 'duplicate', 1)
                         ON CONFLICT(device, name) DO UPDATE SET value = value + 1",
                        params![e.device.as_str()],
                    )
                    .map_err(err)?;
                    continue;
                }
                let position = tx.last_insert_rowid();
                index
                    .execute(params![
                        position / EVENT_INDEX_BUCKET,
                        event_key(&e.event_id),
                        position
                    ])
                    .map_err(err)?;
            }
            let mut q = tx
                .prepare_cached(
                    "INSERT INTO quarantine (received_at_ms, topic, device, reason, detail, sha256, bytes)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(err)?;
            for (m, bytes) in c.quarantine.iter().zip(&sealed.quarantine) {
                q.execute(params![
                    u2i(m.received_at_ms),
                    m.topic,
                    m.device,
                    m.reason,
                    m.detail,
                    m.sha256_hex,
                    bytes.value()
                ])
                .map_err(err)?;
            }
            let mut state = tx
                .prepare_cached(
                    "INSERT INTO device_state (device, epoch, highest, window, bitmap)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT(device) DO UPDATE SET epoch = ?2, highest = ?3, window = ?4, bitmap = ?5",
                )
                .map_err(err)?;
            for (device, s) in &c.sequences {
                state
                    .execute(params![
                        device.as_str(),
                        u2i(s.epoch()),
                        u2i(s.highest()),
                        s.size().get(),
                        s.bitmap_bytes()
                    ])
                    .map_err(err)?;
            }
            let mut gap = tx
                .prepare_cached(
                    "INSERT INTO gaps (device, epoch, first, last, filled, state, opened_at_ms, changed_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT(device, epoch, first) DO UPDATE SET filled = ?5, state = ?6, changed_at_ms = ?8",
                )
                .map_err(err)?;
            for (device, g) in &c.gaps {
                gap.execute(params![
                    device.as_str(),
                    u2i(g.epoch),
                    u2i(g.first),
                    u2i(g.last),
                    u2i(g.filled),
                    g.state.as_str(),
                    u2i(g.opened_at_ms),
                    u2i(c.now_ms)
                ])
                .map_err(err)?;
            }
            let mut counter = tx
                .prepare_cached(
                    "INSERT INTO counters (device, name, value) VALUES (?1, ?2, ?3)
                     ON CONFLICT(device, name) DO UPDATE SET value = value + ?3",
                )
                .map_err(err)?;
            for (device, name, n) in &c.counters {
                counter
                    .execute(params![device, name, u2i(*n)])
                    .map_err(err)?;
            }
        }
        write_alerts(&tx, c, &sealed.alerts).map_err(err)?;
        super::scores::write_scores(&tx, c, &sealed.scores, &sealed.patient_states).map_err(err)?;
        super::shadow_alerts::write_shadow_alerts(&tx, c, &sealed.shadow_alerts).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(committed)
    }

    /// Writes only the alert part of `c` (alert rows, alert states, scores and the
    /// patients' scoring states, shadow alert changes; see [`Commit::take_alert_part`]), in one transaction:
    /// what the recorder commits while recording is paused (the outbox at
    /// `max_backlog`, or a store that refused the whole batch), so the alert handlers
    /// deliver as usual while events, quarantine, windows, gaps and counters wait for
    /// the devices to resend.
    ///
    /// The scores go with the alerts: a `news2-*` alert names its `score_id`, and the
    /// resent reading is not scored again (its evaluation was adopted with the alert
    /// state), so a score left out here would never exist. A score already stored
    /// (`score_id` is deterministic) is kept once.
    pub fn commit_alerts_only(&mut self, c: &Commit) -> Result<Committed, StoreError> {
        let alert_part = Commit {
            alerts: c.alerts.clone(),
            scores: c.scores.clone(),
            patient_states: c.patient_states.clone(),
            shadow_alerts: c.shadow_alerts.clone(),
            ..Commit::default()
        };
        let (sealed, committed) = self.seal_batch(&alert_part)?;
        let path = self.path.clone();
        let err = |source| classify(&path, source);
        let tx = self.conn.transaction().map_err(err)?;
        write_alerts(&tx, c, &sealed.alerts).map_err(err)?;
        super::scores::write_scores(&tx, &alert_part, &sealed.scores, &sealed.patient_states)
            .map_err(err)?;
        super::shadow_alerts::write_shadow_alerts(&tx, &alert_part, &sealed.shadow_alerts)
            .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(committed)
    }

    /// The alert engine's stored state per device (JSON).
    pub fn load_alert_states(&self) -> Result<HashMap<DeviceId, String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT device, state FROM alert_state")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(|e| self.err(e))?;
        let mut out = HashMap::new();
        for row in rows {
            let (device, state) = row.map_err(|e| self.err(e))?;
            let id = DeviceId::new(&device).map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                device: device.clone(),
                detail: e.to_string(),
            })?;
            out.insert(id, state);
        }
        Ok(out)
    }

    /// A counter's value for one device (0 when never incremented).
    pub fn counter(&self, device: &str, name: &str) -> Result<u64, StoreError> {
        let v: Option<i64> = self
            .conn
            .query_row(
                "SELECT value FROM counters WHERE device = ?1 AND name = ?2",
                params![device, name],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(v.map_or(0, i2u))
    }
}

/// The alert rows and alert states of `c`, inside the caller's transaction.
fn write_alerts(
    tx: &rusqlite::Transaction<'_>,
    c: &Commit,
    sealed: &[Option<(Stored<'_>, Option<String>)>],
) -> rusqlite::Result<()> {
    let mut alert = tx.prepare_cached(
        "INSERT INTO alerts (alert_id, state, kind, topic, device, rule, created_at_ms, body, level,
             patient_ref)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?;
    for (a, body) in c.alerts.iter().zip(sealed) {
        let Some((body, patient)) = body else {
            continue;
        };
        alert.execute(params![
            a.alert_id,
            a.state,
            a.kind,
            a.topic,
            a.device,
            a.rule,
            u2i(a.created_at_ms),
            body.text(),
            a.level,
            patient
        ])?;
    }
    let mut alert_state = tx.prepare_cached(
        "INSERT INTO alert_state (device, state) VALUES (?1, ?2)
         ON CONFLICT(device) DO UPDATE SET state = ?2",
    )?;
    for (device, state) in &c.alert_states {
        alert_state.execute(params![device.as_str(), state])?;
    }
    Ok(())
}
