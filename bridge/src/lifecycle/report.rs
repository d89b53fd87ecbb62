//! What one retention run did, and its audit record (`retention_run`).
//!
//! The record carries: `policy_sha256` (the retention file), and in `details`:
//! `holds_sha256` (empty without a holds file), `now` (RFC 3339) and `now_ms`,
//! `dry_run`, `acted` (per plane, per action: `count`, and the instants touched as
//! `from`/`to`, RFC 3339), `held` (per plane: records kept by a hold), `skipped` (per
//! plane, per reason: records due but not acted on, e.g. `unconfirmed`,
//! `no_archive_copy`, `anonymize_unsupported`, `unreadable`), `holds_kept` (the ids of
//! the holds that kept something), `held_by_patient_hold_without_range` (objects kept
//! only because a patient hold without a time range may cover them: such a hold keeps
//! every object of every objects sink forever, since an object's name does not say
//! whose records it holds), and `objects` (`count`, `sha256` over the sorted full list,
//! one name per line, and `names`, the first [`NAMES_CAP`] of them).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};
use sha2::{Digest as _, Sha256};
use vitalmq_audit::{AuditRecord, Component, Event};

/// How many object names the record lists (the count and hash cover all of them).
pub const NAMES_CAP: usize = 100;

/// Count and instant range of the records of one plane and action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub count: u64,
    pub first_ms: u64,
    pub last_ms: u64,
}

/// Everything one run did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// (plane, action) -> tally.
    pub acted: BTreeMap<(String, String), Tally>,
    /// plane -> records kept by a hold.
    pub held: BTreeMap<String, u64>,
    /// (plane, reason) -> records due but not acted on.
    pub skipped: BTreeMap<(String, String), u64>,
    /// Ids of the holds that kept something.
    pub holds_kept: BTreeSet<String>,
    /// Objects kept only by a patient hold without a time range (also in `held`).
    pub patient_hold_without_range: u64,
    /// Objects acted on (full names as stored; an archived one as its original name).
    pub objects: BTreeSet<String>,
}

impl Report {
    pub fn acted(&mut self, plane: &str, action: &str, at_ms: u64) {
        self.acted
            .entry((plane.to_owned(), action.to_owned()))
            .and_modify(|t| {
                t.count += 1;
                t.first_ms = t.first_ms.min(at_ms);
                t.last_ms = t.last_ms.max(at_ms);
            })
            .or_insert(Tally {
                count: 1,
                first_ms: at_ms,
                last_ms: at_ms,
            });
    }

    pub fn held(&mut self, plane: &str, hold: &str) {
        *self.held.entry(plane.to_owned()).or_default() += 1;
        self.holds_kept.insert(hold.to_owned());
    }

    pub fn skipped(&mut self, plane: &str, reason: &str) {
        *self
            .skipped
            .entry((plane.to_owned(), reason.to_owned()))
            .or_default() += 1;
    }

    /// The count acted on for `plane` and `action` (0 when none).
    pub fn count(&self, plane: &str, action: &str) -> u64 {
        self.acted
            .get(&(plane.to_owned(), action.to_owned()))
            .map_or(0, |t| t.count)
    }

    /// SHA-256 (hex) over the sorted object names, one per line.
    pub fn objects_sha256(&self) -> String {
        let mut h = Sha256::new();
        for name in &self.objects {
            h.update(name.as_bytes());
            h.update(b"\n");
        }
        hex::encode(h.finalize())
    }

    /// The run's details, as the audit record holds them.
    pub fn details(&self, holds_sha256: &str, now_ms: u64, dry_run: bool) -> Map<String, Value> {
        let time = |ms: u64| crate::normalize::rfc3339_ms(ms).unwrap_or_default();
        let mut acted = Map::new();
        for ((plane, action), t) in &self.acted {
            let plane = acted
                .entry(plane.clone())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(p) = plane {
                p.insert(
                    action.clone(),
                    json!({"count": t.count, "from": time(t.first_ms), "to": time(t.last_ms)}),
                );
            }
        }
        let mut skipped = Map::new();
        for ((plane, reason), n) in &self.skipped {
            let plane = skipped
                .entry(plane.clone())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(p) = plane {
                p.insert(reason.clone(), json!(n));
            }
        }
        let mut details = Map::new();
        details.insert("holds_sha256".into(), json!(holds_sha256));
        details.insert("now".into(), json!(time(now_ms)));
        details.insert("now_ms".into(), json!(now_ms));
        details.insert("dry_run".into(), json!(dry_run));
        details.insert("acted".into(), Value::Object(acted));
        details.insert("held".into(), json!(self.held));
        details.insert("skipped".into(), Value::Object(skipped));
        details.insert("holds_kept".into(), json!(self.holds_kept));
        details.insert(
            "held_by_patient_hold_without_range".into(),
            json!(self.patient_hold_without_range),
        );
        details.insert(
            "objects".into(),
            json!({
                "count": self.objects.len(),
                "sha256": self.objects_sha256(),
                "names": self.objects.iter().take(NAMES_CAP).collect::<Vec<_>>(),
            }),
        );
        details
    }

    /// The bridge's audit record of the run.
    pub fn record(
        &self,
        policy_sha256: &str,
        holds_sha256: &str,
        now_ms: u64,
        dry_run: bool,
    ) -> AuditRecord {
        let mut record = AuditRecord::new(Component::Bridge, Event::RetentionRun)
            .action("retention_run")
            .policy_sha256(policy_sha256);
        record.details = self.details(holds_sha256, now_ms, dry_run);
        record
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_lists_counts_ranges_holds_and_a_hash_of_every_name() {
        let mut r = Report::default();
        r.acted("raw", "delete", 2_000);
        r.acted("raw", "delete", 1_000);
        r.held("normalized", "lh-1");
        r.skipped("clinical", "no_archive_copy");
        r.patient_hold_without_range = 3;
        for i in 0..(NAMES_CAP + 5) {
            r.objects
                .insert(format!("raw/date=2020-01-01/{i:05}.cborseq"));
        }
        let d = r.details("hh", 5_000, true);
        assert_eq!(d["acted"]["raw"]["delete"]["count"], json!(2));
        assert_eq!(
            d["acted"]["raw"]["delete"]["from"],
            json!("1970-01-01T00:00:01Z")
        );
        assert_eq!(
            d["acted"]["raw"]["delete"]["to"],
            json!("1970-01-01T00:00:02Z")
        );
        assert_eq!(d["held"]["normalized"], json!(1));
        assert_eq!(d["holds_kept"], json!(["lh-1"]));
        assert_eq!(d["skipped"]["clinical"]["no_archive_copy"], json!(1));
        assert_eq!(d["held_by_patient_hold_without_range"], json!(3));
        assert_eq!(d["dry_run"], json!(true));
        assert_eq!(d["objects"]["count"], json!(NAMES_CAP + 5));
        assert_eq!(
            d["objects"]["names"].as_array().map(Vec::len),
            Some(NAMES_CAP)
        );
        let before = r.objects_sha256();
        r.objects.insert("x".into());
        assert_ne!(before, r.objects_sha256(), "the hash covers every name");
    }
}
