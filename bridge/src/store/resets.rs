//! Operator requests to reset a device's sequence state (issue 15), e.g. after the
//! device was re-keyed or sent `epoch` = u64::MAX, which no later message can exceed
//! (SPEC section 4: a lower epoch is `replay`), so it is locked out for good.
//!
//! The running bridge holds the windows in memory and writes them back with every
//! batch, so the CLI never edits `device_state` itself: `vitalmq store reset-sequence`
//! only records a request here (`sequence_resets`), and the bridge's recorder applies
//! it between two batches (or at start): in one transaction it forgets the device's
//! window, marks its open gaps lost and stamps the request applied; then it drops the
//! in-memory window and audits the reset. Requests are never deleted: the table is the
//! history of resets. The device's next message is then its first one.

use rusqlite::{OptionalExtension as _, params};

use super::{Store, StoreError, i2u, u2i};

/// One reset request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SequenceReset {
    pub id: i64,
    pub device: String,
    pub requested_at_ms: u64,
    /// The operator as the CLI saw them (`user` or `user (sudo from x)`).
    pub requested_by: String,
    pub reason: String,
    /// When the bridge applied it; `None` while pending.
    pub applied_at_ms: Option<u64>,
    /// The window the reset removed, `epoch:highest`, when the device had one.
    pub previous: Option<String>,
}

const COLUMNS: &str = "id, device, requested_at_ms, requested_by, reason, applied_at_ms, previous";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SequenceReset> {
    Ok(SequenceReset {
        id: r.get(0)?,
        device: r.get(1)?,
        requested_at_ms: i2u(r.get(2)?),
        requested_by: r.get(3)?,
        reason: r.get(4)?,
        applied_at_ms: r.get::<_, Option<i64>>(5)?.map(i2u),
        previous: r.get(6)?,
    })
}

impl Store {
    /// Records a request to reset `device`'s sequence state; the bridge applies it.
    pub fn request_sequence_reset(
        &self,
        device: &str,
        requested_by: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<SequenceReset, StoreError> {
        self.conn
            .execute(
                "INSERT INTO sequence_resets (device, requested_at_ms, requested_by, reason)
                 VALUES (?1, ?2, ?3, ?4)",
                params![device, u2i(now_ms), requested_by, reason],
            )
            .map_err(|e| self.err(e))?;
        let id = self.conn.last_insert_rowid();
        self.sequence_reset(id)?
            .ok_or_else(|| self.err(rusqlite::Error::QueryReturnedNoRows))
    }

    /// One request by id.
    pub fn sequence_reset(&self, id: i64) -> Result<Option<SequenceReset>, StoreError> {
        self.conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM sequence_resets WHERE id = ?1"),
                params![id],
                row,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Requests not yet applied, oldest first.
    pub fn pending_sequence_resets(&self) -> Result<Vec<SequenceReset>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM sequence_resets WHERE applied_at_ms IS NULL ORDER BY id"
            ))
            .map_err(|e| self.err(e))?;
        stmt.query_map([], row)
            .and_then(Iterator::collect)
            .map_err(|e| self.err(e))
    }

    /// SQLite's `data_version`: changes when another connection (the CLI) committed
    /// since this one last looked. Cheap; the recorder polls it between batches.
    pub fn data_version(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    /// Applies a request: forgets the device's window, marks its open gaps lost and
    /// stamps the request, in one transaction. Returns the request as applied.
    pub fn apply_sequence_reset(
        &mut self,
        id: i64,
        now_ms: u64,
    ) -> Result<Option<SequenceReset>, StoreError> {
        let tx = rusqlite::Transaction::new_unchecked(
            &self.conn,
            rusqlite::TransactionBehavior::Immediate,
        )
        .map_err(|e| self.err(e))?;
        let pending: Option<String> = tx
            .query_row(
                "SELECT device FROM sequence_resets WHERE id = ?1 AND applied_at_ms IS NULL",
                params![id],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let Some(device) = pending else {
            return Ok(None);
        };
        let previous: Option<String> = tx
            .query_row(
                "SELECT epoch, highest FROM device_state WHERE device = ?1",
                params![device],
                |r| Ok(format!("{}:{}", i2u(r.get(0)?), i2u(r.get(1)?))),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        tx.execute(
            "DELETE FROM device_state WHERE device = ?1",
            params![device],
        )
        .map_err(|e| self.err(e))?;
        // The alert engine's evaluated window follows the sequence: left in the stored
        // alert state, a restart before the device's next message would count every
        // message of its new (lower) epoch as evaluated and raise no alert.
        tx.execute(
            "UPDATE alert_state SET state = json_remove(state, '$.evaluated') WHERE device = ?1",
            params![device],
        )
        .map_err(|e| self.err(e))?;
        tx.execute(
            "UPDATE gaps SET state = 'lost', changed_at_ms = ?2 WHERE device = ?1 AND state = 'open'",
            params![device, u2i(now_ms)],
        )
        .map_err(|e| self.err(e))?;
        tx.execute(
            "UPDATE sequence_resets SET applied_at_ms = ?2, previous = ?3 WHERE id = ?1",
            params![id, u2i(now_ms), previous],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        self.sequence_reset(id)
    }
}

#[cfg(test)]
mod tests {
    use vitalmq_envelope::DeviceId;

    use super::super::Commit;
    use super::*;
    use crate::gaps::{Gap, GapState};
    use crate::window::{DeviceSequence, WindowSize};

    #[test]
    fn a_reset_forgets_the_window_loses_open_gaps_and_is_applied_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = DeviceId::new("dev-00001").expect("id");
        let other = DeviceId::new("dev-00002").expect("id");
        let mut store = Store::open(dir.path()).expect("open");
        // Locked out: epoch u64::MAX, which no later message can exceed.
        let locked = DeviceSequence::first(WindowSize::default(), u64::MAX, 7);
        let gap = Gap {
            epoch: u64::MAX,
            first: 1,
            last: 6,
            filled: 0,
            state: GapState::Open,
            opened_at_ms: 1,
        };
        store
            .commit(&Commit {
                sequences: vec![(dev.clone(), locked.clone()), (other.clone(), locked)],
                gaps: vec![(dev.clone(), gap.clone()), (other.clone(), gap)],
                alert_states: [&dev, &other]
                    .map(|d| {
                        let state =
                            r#"{"evaluated":{"epoch":9,"highest":7,"words":[1]},"late_ignored":2}"#;
                        (d.clone(), state.to_owned())
                    })
                    .to_vec(),
                ..Commit::default()
            })
            .expect("commit");
        // Another connection (the CLI) records the request.
        let before = store.data_version().expect("version");
        let cli = Store::open(dir.path()).expect("open as the CLI");
        let request = cli
            .request_sequence_reset("dev-00001", "op@host", "re-keyed", 5)
            .expect("request");
        assert_eq!(request.applied_at_ms, None);
        assert_ne!(
            store.data_version().expect("version"),
            before,
            "seen by the bridge"
        );
        assert_eq!(
            store.pending_sequence_resets().expect("pending"),
            std::slice::from_ref(&request)
        );

        let applied = store
            .apply_sequence_reset(request.id, 9)
            .expect("apply")
            .expect("was pending");
        assert_eq!(applied.applied_at_ms, Some(9));
        assert_eq!(applied.previous.as_deref(), Some("18446744073709551615:7"));
        assert!(store.pending_sequence_resets().expect("pending").is_empty());
        assert_eq!(
            store.apply_sequence_reset(request.id, 10).expect("again"),
            None
        );
        let windows = store
            .load_sequences(WindowSize::default())
            .expect("windows");
        assert!(!windows.contains_key(&dev), "the device's window is gone");
        assert!(windows.contains_key(&other), "other devices keep theirs");
        let open = store.load_open_gaps().expect("gaps");
        assert!(!open.contains_key(&dev) && open.contains_key(&other));
        // The alert engine's evaluated window goes with it (durably: a restart before
        // the device's next message must not count its new epoch as evaluated).
        let states = store.load_alert_states().expect("alert states");
        assert_eq!(states[&dev], r#"{"late_ignored":2}"#);
        assert!(states[&other].contains("evaluated"));
        assert_eq!(cli.sequence_reset(request.id).expect("read"), Some(applied));
    }

    /// After a reset the window no longer knows what is stored: a resent message that
    /// is stored already must be a duplicate, not a failed commit (the recorder retries
    /// a failed commit for ever, so the whole bridge would stop).
    #[test]
    fn an_event_stored_before_a_reset_is_a_duplicate_not_a_failed_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(dir.path()).expect("open");
        let event = |seq: u64| super::super::write::test_events::event("dev-00001", 1, seq);
        for events in [vec![event(0)], vec![event(0), event(1)]] {
            store
                .commit(&Commit {
                    events,
                    ..Commit::default()
                })
                .expect("commit");
        }
        let stats = store.stats().expect("stats");
        assert_eq!(stats.events, 2, "{stats:?}");
        assert_eq!(stats.counters.get("duplicate"), 1, "{stats:?}");
        let raw: i64 = store
            .conn
            .query_row("SELECT COUNT(*) FROM raw_messages", [], |r| r.get(0))
            .expect("count");
        assert_eq!(raw, 2, "no raw row without its event");
    }

    #[test]
    fn a_store_made_before_resets_gains_the_table_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            store
                .conn
                .execute_batch("DROP TABLE sequence_resets; PRAGMA user_version = 0;")
                .expect("an older store");
        }
        let store = Store::open(dir.path()).expect("reopen");
        assert!(store.pending_sequence_resets().expect("table").is_empty());
    }
}
