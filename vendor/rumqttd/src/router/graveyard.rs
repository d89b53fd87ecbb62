use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Instant;

use super::{
    connection::Unreleased,
    scheduler::{PauseReason, Tracker},
    ConnectionEvents,
};

/// Saved state of connections that ended: metrics of every client id, and the session
/// of those whose session outlives the connection.
///
/// vitalmq patch 9: a session carries its expiry (MQTT 5 Session Expiry Interval). An
/// expired session is never resumed ([`Graveyard::retrieve`] checks) and is freed by
/// [`Graveyard::expire`], which the router calls as time passes (it wakes up at
/// [`Graveyard::next_expiry`]).
pub struct Graveyard {
    connections: HashMap<String, SavedState>,
    /// Sessions that expire, by expiry then client id: exactly those of `connections`
    /// whose `session_state` has `expires_at: Some(..)`.
    expiries: BTreeSet<(Instant, String)>,
}

impl Graveyard {
    pub fn new() -> Graveyard {
        Graveyard {
            connections: HashMap::new(),
            expiries: BTreeSet::new(),
        }
    }

    /// Takes the saved state of `id`; its session only if it has not expired at `now`.
    pub fn retrieve(&mut self, id: &str, now: Instant) -> Option<SavedState> {
        let mut saved = self.connections.remove(id)?;
        if let Some(expires_at) = saved.session_state.as_ref().and_then(|s| s.expires_at) {
            self.expiries.remove(&(expires_at, id.to_owned()));
            if expires_at <= now {
                saved.session_state = None;
            }
        }
        Some(saved)
    }

    /// Save connection tracker, keeping the session until `expires_at` (`None`: for ever).
    pub fn save_state(
        &mut self,
        mut tracker: Tracker,
        subscriptions: HashSet<String>,
        metrics: ConnectionEvents,
        unacked_pubrels: VecDeque<u16>,
        unreleased: Unreleased,
        expires_at: Option<Instant>,
    ) {
        tracker.pause(PauseReason::Busy);
        let id = tracker.id.clone();

        let session_state = SessionState {
            tracker,
            subscriptions,
            unacked_pubrels,
            unreleased,
            expires_at,
        };

        self.forget_expiry(&id);
        if let Some(at) = expires_at {
            self.expiries.insert((at, id.clone()));
        }
        self.connections.insert(
            id,
            SavedState {
                session_state: Some(session_state),
                metrics,
            },
        );
    }

    /// Save only metrics for connection
    pub fn save_metrics(&mut self, id: String, metrics: ConnectionEvents) {
        self.forget_expiry(&id);
        self.connections.insert(
            id,
            SavedState {
                session_state: None,
                metrics,
            },
        );
    }

    /// vitalmq patch 9: the earliest time a saved session expires.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.expiries.first().map(|(at, _)| *at)
    }

    /// vitalmq patch 9: frees every session expired at `now` (its subscriptions,
    /// cursors and unacknowledged packet ids; the client id's metrics stay). Returns the
    /// client ids whose session ended.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let mut expired = Vec::new();
        while let Some((at, _)) = self.expiries.first() {
            if *at > now {
                break;
            }
            let Some((_, id)) = self.expiries.pop_first() else {
                break;
            };
            if let Some(saved) = self.connections.get_mut(&id) {
                saved.session_state = None;
            }
            expired.push(id);
        }
        expired
    }

    /// Whether `id` has a saved session (expired or not).
    #[cfg(test)]
    pub fn has_session(&self, id: &str) -> bool {
        self.connections
            .get(id)
            .is_some_and(|s| s.session_state.is_some())
    }

    fn forget_expiry(&mut self, id: &str) {
        let previous = self
            .connections
            .get(id)
            .and_then(|s| s.session_state.as_ref())
            .and_then(|s| s.expires_at);
        if let Some(at) = previous {
            self.expiries.remove(&(at, id.to_owned()));
        }
    }
}

#[derive(Debug)]
pub struct SavedState {
    pub session_state: Option<SessionState>,
    pub metrics: ConnectionEvents,
}

#[derive(Debug)]
pub struct SessionState {
    pub tracker: Tracker,
    pub subscriptions: HashSet<String>,
    // used for pubrel in qos2
    pub unacked_pubrels: VecDeque<u16>,
    /// vitalmq patch 16: incoming QoS 2 messages not yet released by PUBREL
    pub unreleased: Unreleased,
    /// vitalmq patch 9: when the session expires (`None`: never).
    pub expires_at: Option<Instant>,
}
