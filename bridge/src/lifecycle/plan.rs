//! The pure half of a retention run: from a record's metadata, the policy, the holds
//! and `now`, what to do with it. No I/O here; `super` reads the rows and objects and
//! applies what these functions return.
//!
//! Decisions per record:
//! * a hold on either of an event's planes keeps the whole row (raw and normalized);
//! * a due action on a store row the sinks (events) or alert handlers (alerts) have not
//!   all confirmed is skipped as `unconfirmed`: it is acted on at a later run, once
//!   delivered;
//! * `archive` of a store row needs the archive copy: an event is archived (deleted
//!   from the store) once every objects sink of purpose care has it (its cursor is past
//!   the event); otherwise, and for alerts and quarantine, which no objects sink holds,
//!   it is skipped as `no_archive_copy`;
//! * `anonymize` of raw bytes or of a quarantined message (signed bytes naming the
//!   device) deletes them; of a normalized object is skipped as `anonymize_unsupported`
//!   (reported, never silent); of an audit segment likewise (a chain cannot lose fields);
//! * alerts are decided per alert (all its state rows, [`alert`]): `anonymize` waits
//!   until its last state is due and none is held, then anonymizes every state in one
//!   transaction under one new id; an erased patient's alert is deleted instead
//!   (nothing readable is left to keep). `delete` goes row by row;
//! * an object is held by a patient hold whenever the hold's range (if any) overlaps
//!   its day, since its name does not say whose records it holds: a patient hold
//!   without a range keeps every object forever. Such objects are counted apart
//!   ([`Report::patient_hold_without_range`]) so the cost of that hold is visible.

use vitalmq_envelope::DeviceId;
use vitalmq_policies::{
    Action, AuditLog, Disposition, Hold, LegalHolds, Period, Plane, Purpose, RecordMeta,
    RetentionPolicy, disposition,
};

use super::anonymize;
use super::report::Report;
use crate::store::{
    RetainedAlert, RetainedEvent, RetainedQuarantine, RetainedScore, RetainedShadowAlert, StoreAct,
};

/// One day in milliseconds.
pub const DAY_MS: u64 = 86_400_000;

/// What a run decides with: fixed for the whole run.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub policy: &'a RetentionPolicy,
    pub holds: &'a LegalHolds,
    pub now: u64,
    /// The outbox position every sink has confirmed (`None`: no sinks).
    pub sinks_through: Option<i64>,
    /// The outbox position every objects sink of purpose care has confirmed (`None`:
    /// there is none, so nothing has an archive copy).
    pub archived_through: Option<i64>,
    /// The alert position every alert handler has confirmed (`None`: no handlers).
    pub handlers_through: Option<i64>,
}

/// What happens to one event row (both planes).
pub fn event(ctx: &Context<'_>, row: &RetainedEvent, report: &mut Report) -> Option<StoreAct> {
    // An anonymized event names nobody: it is no longer subject to the event planes.
    if row.anonymized {
        return None;
    }
    let json = row.normalized.as_deref();
    // An erased patient's row can still be deleted or archived; one that is merely
    // unreadable here (sealed, no key) is left for a run that can read it.
    if json.is_none() && !row.erased {
        report.skipped("normalized", "unreadable");
        return None;
    }
    let patient = row.patient_ref.as_deref();
    let device = DeviceId::new(&row.device).ok();
    let meta = |plane, at| RecordMeta {
        plane,
        purpose: Some(Purpose::Care),
        at,
        patient_ref: patient,
        device: device.as_ref(),
    };
    let normalized = disposition(
        ctx.policy,
        ctx.holds,
        &meta(Plane::Normalized, row.observed_at_ms),
        ctx.now,
    );
    let raw = disposition(
        ctx.policy,
        ctx.holds,
        &meta(Plane::Raw, row.received_at_ms),
        ctx.now,
    );
    if let Disposition::Held(h) = normalized {
        report.held("normalized", &h.id);
        return None;
    }
    if let Disposition::Held(h) = raw {
        report.held("raw", &h.id);
        return None;
    }
    let confirmed = ctx.sinks_through.is_none_or(|t| row.position <= t);
    let archived = ctx.archived_through.is_some_and(|t| row.position <= t);
    if let Disposition::Due(action) = normalized {
        if !confirmed {
            report.skipped("normalized", "unconfirmed");
            return None;
        }
        let (plane, at) = ("normalized", row.observed_at_ms);
        match action {
            Action::Delete => {
                report.acted(plane, "delete", at);
                return Some(StoreAct::DeleteEvent {
                    position: row.position,
                    raw_id: row.raw_id,
                });
            }
            Action::Anonymize => match json.and_then(|j| anonymize::event(j, row.observed_at_ms)) {
                Some(json) => {
                    report.acted(plane, "anonymize", at);
                    return Some(StoreAct::AnonymizeEvent {
                        position: row.position,
                        raw_id: row.raw_id,
                        json,
                        hour_ms: anonymize::hour_of(row.observed_at_ms),
                    });
                }
                // Nothing readable is left to keep: the husk (ids and ciphertext) goes.
                None if row.erased => {
                    report.acted(plane, "delete_erased", at);
                    return Some(StoreAct::DeleteEvent {
                        position: row.position,
                        raw_id: row.raw_id,
                    });
                }
                None => report.skipped(plane, "unreadable"),
            },
            Action::Archive { .. } if archived => {
                report.acted(plane, "archive", at);
                return Some(StoreAct::DeleteEvent {
                    position: row.position,
                    raw_id: row.raw_id,
                });
            }
            Action::Archive { .. } => report.skipped(plane, "no_archive_copy"),
        }
    }
    match raw {
        Disposition::Due(action) if row.raw_present => {
            if !confirmed {
                report.skipped("raw", "unconfirmed");
                return None;
            }
            if matches!(action, Action::Archive { .. }) && !archived {
                report.skipped("raw", "no_archive_copy");
                return None;
            }
            report.acted("raw", action.as_str(), row.received_at_ms);
            Some(StoreAct::PurgeRaw { raw_id: row.raw_id })
        }
        _ => None,
    }
}

/// What happens to one alert: `rows` are all its state rows, in position order.
pub fn alert(ctx: &Context<'_>, rows: &[RetainedAlert], report: &mut Report) -> Vec<StoreAct> {
    let plane = "clinical";
    let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
        return Vec::new();
    };
    // An anonymized alert names nobody: it is no longer subject to the plane.
    if first.anonymized {
        return Vec::new();
    }
    let dispositions: Vec<Disposition<'_>> = rows
        .iter()
        .map(|row| {
            let device = row.device.as_deref().and_then(|d| DeviceId::new(d).ok());
            let meta = RecordMeta {
                plane: Plane::Clinical,
                purpose: Some(Purpose::Care),
                at: row.created_at_ms,
                patient_ref: row.patient_ref.as_deref(),
                device: device.as_ref(),
            };
            disposition(ctx.policy, ctx.holds, &meta, ctx.now)
        })
        .collect();
    let confirmed = |row: &RetainedAlert| ctx.handlers_through.is_none_or(|t| row.position <= t);
    let mut any_held = false;
    for d in &dispositions {
        if let Disposition::Held(h) = d {
            report.held(plane, &h.id);
            any_held = true;
        }
    }
    let action = &ctx
        .policy
        .class(Plane::Clinical, Some(Purpose::Care))
        .action;
    if *action != Action::Anonymize {
        // Row by row: each state goes when it is due.
        let mut acts = Vec::new();
        for (row, d) in rows.iter().zip(&dispositions) {
            match d {
                Disposition::Due(_) if !confirmed(row) => report.skipped(plane, "unconfirmed"),
                Disposition::Due(Action::Delete) => {
                    report.acted(plane, "delete", row.created_at_ms);
                    acts.push(StoreAct::DeleteAlert {
                        position: row.position,
                    });
                }
                Disposition::Due(_) => report.skipped(plane, "no_archive_copy"),
                Disposition::Held(_) | Disposition::Keep => {}
            }
        }
        return acts;
    }
    // Anonymize: the whole alert, once it is over (its last state `resolved`: an open
    // alert's later states would be written under its old id, with its patient), its
    // last state is due and nothing of it is held.
    if any_held || !matches!(dispositions.last(), Some(Disposition::Due(_))) {
        return Vec::new();
    }
    if last.state != "resolved" && !rows.iter().any(|r| r.erased) {
        report.skipped(plane, "open");
        return Vec::new();
    }
    if !confirmed(last) {
        (0..rows.len()).for_each(|_| report.skipped(plane, "unconfirmed"));
        return Vec::new();
    }
    if rows.iter().any(|r| r.erased) {
        // Nothing readable is left to keep: the husks (ids and ciphertext) go.
        return rows
            .iter()
            .map(|row| {
                report.acted(plane, "delete_erased", row.created_at_ms);
                StoreAct::DeleteAlert {
                    position: row.position,
                }
            })
            .collect();
    }
    let alert_id = crate::store::anonymized_alert_id(first.position);
    let anonymized: Option<Vec<StoreAct>> = rows
        .iter()
        .map(|row| {
            let body = anonymize::alert(&row.body, &alert_id)?;
            Some(StoreAct::AnonymizeAlert {
                position: row.position,
                alert_id: alert_id.clone(),
                state: row.state.clone(),
                topic: anonymize::alert_topic(&row.topic),
                created_at_ms: anonymize::hour_of(row.created_at_ms),
                body,
            })
        })
        .collect();
    match anonymized {
        Some(acts) => {
            rows.iter()
                .for_each(|row| report.acted(plane, "anonymize", row.created_at_ms));
            acts
        }
        // Sealed without a key here (or not JSON): left for a run that can read it.
        None => {
            (0..rows.len()).for_each(|_| report.skipped(plane, "unreadable"));
            Vec::new()
        }
    }
}

/// What happens to one score row (clinical plane, purpose care, like an alert):
/// `delete` deletes it, `anonymize` replaces it by [`anonymize::score`] (an erased
/// patient's score is deleted: nothing readable is left), `archive` is skipped as
/// `no_archive_copy` (no objects sink holds scores yet).
pub fn score(ctx: &Context<'_>, row: &RetainedScore, report: &mut Report) -> Option<StoreAct> {
    let plane = "clinical";
    if row.anonymized {
        return None;
    }
    let device = DeviceId::new(&row.device).ok();
    let meta = RecordMeta {
        plane: Plane::Clinical,
        purpose: Some(Purpose::Care),
        at: row.observed_at_ms,
        patient_ref: row.patient_ref.as_deref(),
        device: device.as_ref(),
    };
    match disposition(ctx.policy, ctx.holds, &meta, ctx.now) {
        Disposition::Held(h) => {
            report.held(plane, &h.id);
            None
        }
        Disposition::Keep => None,
        Disposition::Due(Action::Delete) => {
            report.acted(plane, "delete", row.observed_at_ms);
            Some(StoreAct::DeleteScore { id: row.id })
        }
        Disposition::Due(Action::Anonymize) if row.erased => {
            report.acted(plane, "delete_erased", row.observed_at_ms);
            Some(StoreAct::DeleteScore { id: row.id })
        }
        Disposition::Due(Action::Anonymize) => {
            let id = crate::store::anonymized_score_id(row.id);
            match row
                .payload
                .as_deref()
                .and_then(|p| anonymize::score(p, &id, row.observed_at_ms))
            {
                Some(json) => {
                    report.acted(plane, "anonymize", row.observed_at_ms);
                    Some(StoreAct::AnonymizeScore {
                        id: row.id,
                        json,
                        hour_ms: anonymize::hour_of(row.observed_at_ms),
                    })
                }
                None => {
                    report.skipped(plane, "unreadable");
                    None
                }
            }
        }
        Disposition::Due(_) => {
            report.skipped(plane, "no_archive_copy");
            None
        }
    }
}

/// What happens to one shadow alert episode (clinical plane, purpose care, like an
/// alert; `rows` are all its changes, in id order). No handler delivers shadow alerts,
/// so nothing waits for a confirmation. `delete` goes row by row; `anonymize` waits
/// until the episode is over (its last change `resolved`) and its last change is due
/// with nothing held, then anonymizes every change under one new id
/// ([`crate::store::anonymized_shadow_alert_id`]); an erased patient's episode is
/// deleted instead; `archive` is skipped as `no_archive_copy`.
pub fn shadow_alert(
    ctx: &Context<'_>,
    rows: &[RetainedShadowAlert],
    report: &mut Report,
) -> Vec<StoreAct> {
    let plane = "clinical";
    let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
        return Vec::new();
    };
    if first.anonymized {
        return Vec::new();
    }
    let dispositions: Vec<Disposition<'_>> = rows
        .iter()
        .map(|row| {
            let device = DeviceId::new(&row.device).ok();
            let meta = RecordMeta {
                plane: Plane::Clinical,
                purpose: Some(Purpose::Care),
                at: row.created_at_ms,
                patient_ref: row.patient_ref.as_deref(),
                device: device.as_ref(),
            };
            disposition(ctx.policy, ctx.holds, &meta, ctx.now)
        })
        .collect();
    let mut any_held = false;
    for d in &dispositions {
        if let Disposition::Held(h) = d {
            report.held(plane, &h.id);
            any_held = true;
        }
    }
    let action = &ctx
        .policy
        .class(Plane::Clinical, Some(Purpose::Care))
        .action;
    if *action != Action::Anonymize {
        let mut acts = Vec::new();
        for (row, d) in rows.iter().zip(&dispositions) {
            match d {
                Disposition::Due(Action::Delete) => {
                    report.acted(plane, "delete", row.created_at_ms);
                    acts.push(StoreAct::DeleteShadowAlert { id: row.id });
                }
                Disposition::Due(_) => report.skipped(plane, "no_archive_copy"),
                Disposition::Held(_) | Disposition::Keep => {}
            }
        }
        return acts;
    }
    if any_held || !matches!(dispositions.last(), Some(Disposition::Due(_))) {
        return Vec::new();
    }
    let erased = rows.iter().any(|r| r.erased);
    if last.state != "resolved" && !erased {
        report.skipped(plane, "open");
        return Vec::new();
    }
    if erased {
        return rows
            .iter()
            .map(|row| {
                report.acted(plane, "delete_erased", row.created_at_ms);
                StoreAct::DeleteShadowAlert { id: row.id }
            })
            .collect();
    }
    let alert_id = crate::store::anonymized_shadow_alert_id(first.id);
    let anonymized: Option<Vec<StoreAct>> = rows
        .iter()
        .map(|row| {
            Some(StoreAct::AnonymizeShadowAlert {
                id: row.id,
                alert_id: alert_id.clone(),
                json: anonymize::alert(&row.payload, &alert_id)?,
                hour_ms: anonymize::hour_of(row.created_at_ms),
            })
        })
        .collect();
    match anonymized {
        Some(acts) => {
            rows.iter()
                .for_each(|row| report.acted(plane, "anonymize", row.created_at_ms));
            acts
        }
        None => {
            (0..rows.len()).for_each(|_| report.skipped(plane, "unreadable"));
            Vec::new()
        }
    }
}

/// What happens to one quarantine row.
pub fn quarantine(
    ctx: &Context<'_>,
    row: &RetainedQuarantine,
    report: &mut Report,
) -> Option<StoreAct> {
    let plane = "quarantine";
    let device = row.device.as_deref().and_then(|d| DeviceId::new(d).ok());
    let meta = RecordMeta {
        plane: Plane::Quarantine,
        purpose: None,
        at: row.received_at_ms,
        patient_ref: None,
        device: device.as_ref(),
    };
    match disposition(ctx.policy, ctx.holds, &meta, ctx.now) {
        Disposition::Held(h) => {
            report.held(plane, &h.id);
            None
        }
        Disposition::Keep => None,
        Disposition::Due(Action::Archive { .. }) => {
            report.skipped(plane, "no_archive_copy");
            None
        }
        // The refused bytes are all there is; anonymizing them leaves nothing.
        Disposition::Due(action) => {
            report.acted(plane, action.as_str(), row.received_at_ms);
            Some(StoreAct::DeleteQuarantine { id: row.id })
        }
    }
}

/// What an object's name says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectName {
    /// The sink's key prefix (empty or ending in `/`).
    pub prefix: String,
    /// The name under the prefix (`raw/...`, `normalized/...`, `audit/...`).
    pub relative: String,
    pub plane: Plane,
    pub device: Option<DeviceId>,
    /// Start of its `date=` day (UTC), milliseconds.
    pub day_ms: u64,
}

impl ObjectName {
    /// Parses a full object name of the sink layout; `None` for anything else
    /// (including an audit segment of a component that is not a retention plane).
    pub fn parse(full: &str) -> Option<Self> {
        let parts: Vec<&str> = full.split('/').collect();
        // The last kind segment, as the sealing context takes it: a sink prefix may
        // itself contain one (`vm/raw`).
        let top = parts
            .iter()
            .rposition(|p| matches!(*p, "raw" | "normalized" | "audit"))?;
        let mut plane = match parts[top] {
            "raw" => Plane::Raw,
            "normalized" => Plane::Normalized,
            _ => Plane::Audit(AuditLog::Bridge),
        };
        let mut device = None;
        let mut day_ms = None;
        for part in &parts[top + 1..] {
            if let Some(d) = part.strip_prefix("device=") {
                device = Some(DeviceId::new(d).ok()?);
            } else if let Some(d) = part.strip_prefix("date=") {
                day_ms = Some(day_start(d)?);
            } else if let Some(c) = part.strip_prefix("component=") {
                plane = Plane::Audit(match c {
                    "broker" => AuditLog::Broker,
                    "bridge" => AuditLog::Bridge,
                    "admin" => AuditLog::Admin,
                    "operator" => AuditLog::Operator,
                    _ => return None,
                });
            }
        }
        let prefix = parts[..top].iter().map(|p| format!("{p}/")).collect();
        Some(Self {
            prefix,
            relative: parts[top..].join("/"),
            plane,
            device,
            day_ms: day_ms?,
        })
    }
}

/// Milliseconds at the start of UTC day `YYYY-MM-DD`.
fn day_start(date: &str) -> Option<u64> {
    let mut parts = date.splitn(3, '-');
    let year: i32 = parts.next()?.parse().ok()?;
    let month: u8 = parts.next()?.parse().ok()?;
    let dom: u8 = parts.next()?.parse().ok()?;
    let month = time::Month::try_from(month).ok()?;
    let day = time::Date::from_calendar_date(year, month, dom).ok()?;
    let secs = day.midnight().assume_utc().unix_timestamp();
    u64::try_from(secs).ok()?.checked_mul(1000)
}

/// What to do with one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectAct {
    Delete,
    /// Copy to this full name, then delete the original.
    Move(String),
}

/// What happens to the object `name` of an objects sink serving `purpose`. Its instant
/// is the end of its `date=` day: no record in it is younger.
pub fn object(
    ctx: &Context<'_>,
    name: &ObjectName,
    purpose: Purpose,
    report: &mut Report,
) -> Option<ObjectAct> {
    let plane = name.plane.as_str();
    let end = name.day_ms + DAY_MS - 1;
    if let Some(h) = object_hold(ctx.holds, name) {
        report.held(plane, &h.id);
        if h.patient_ref.is_some() && h.during.is_none() {
            report.patient_hold_without_range += 1;
        }
        return None;
    }
    let purpose = name.plane.has_purpose().then_some(purpose);
    let action = ctx.policy.due(name.plane, purpose, end, ctx.now)?;
    let act = match (action, name.plane) {
        (Action::Delete, _) | (Action::Anonymize, Plane::Raw) => ObjectAct::Delete,
        (Action::Anonymize, _) => {
            report.skipped(plane, "anonymize_unsupported");
            return None;
        }
        (Action::Archive { prefix: to }, _) => {
            let to = to.trim_start_matches('/');
            let sep = if to.is_empty() || to.ends_with('/') {
                ""
            } else {
                "/"
            };
            ObjectAct::Move(format!("{}{to}{sep}{}", name.prefix, name.relative))
        }
    };
    report.acted(plane, action.as_str(), end);
    Some(act)
}

/// A hold that may cover a record in the object: its range (if any) overlaps the
/// object's day, its device (if any) is the object's or the object has no device
/// level, and a patient hold always may (an object's name does not say whose records
/// it holds). Audit segments are kept by any hold whose range overlaps their day: they
/// name devices and patients' alerts. A hold that covers the object without being a
/// patient hold without a range is preferred, so the report counts under
/// [`Report::patient_hold_without_range`] only what nothing else would keep.
fn object_hold<'a>(holds: &'a LegalHolds, name: &ObjectName) -> Option<&'a Hold> {
    let day = Period::new(name.day_ms, Some(name.day_ms + DAY_MS))?;
    let mut covering = holds.holds().iter().filter(|h| {
        h.during.is_none_or(|p| p.overlaps(&day))
            && (matches!(name.plane, Plane::Audit(_))
                || h.device
                    .as_ref()
                    .is_none_or(|d| name.device.as_ref().is_none_or(|n| n == d)))
    });
    let first = covering.next()?;
    if first.patient_ref.is_some() && first.during.is_none() {
        return Some(
            covering
                .find(|h| h.patient_ref.is_none() || h.during.is_some())
                .unwrap_or(first),
        );
    }
    Some(first)
}

/// Whether `relative` (a name under a sink's prefix) lies under an archive target of
/// the policy: archived objects are not listed again.
pub fn archived(policy: &RetentionPolicy, relative: &str) -> bool {
    Plane::ALL.iter().any(|plane| {
        std::iter::once(None)
            .chain(Purpose::ALL.map(Some))
            .any(|purpose| match &policy.class(*plane, purpose).action {
                Action::Archive { prefix } => relative.starts_with(prefix.trim_start_matches('/')),
                _ => false,
            })
    })
}
