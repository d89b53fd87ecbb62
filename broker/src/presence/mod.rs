//! The broker's presence signal (SPEC v1.1 section 5.1, design of issue 17): the broker
//! itself publishes, retained and at QoS 1,
//!
//! - `presence/broker/boot` once per start:
//!   `{"format":"vitalmq-presence/v1","boot":"<16 hex>","started_at":"<RFC 3339>"}`;
//! - `presence/{device|gateway}/{id}` when a connection of that identity is admitted
//!   (its successful CONNACK was written to the client, where `connection_accepted` is
//!   audited) and when it ends, whichever way:
//!   `{"format":"vitalmq-presence/v1","role":..,"id":..,"connected":true|false,
//!   "boot":..,"seq":<per-boot counter>,"at":"<RFC 3339 ms>"}`, plus `"reason"` when
//!   it ended (the relay's end code, e.g. `client_closed`, `io_error`,
//!   `broker_closed`, `connect_revoked`, `certificate_revoked`, or `takeover`).
//!
//! The relay of each connection reports through a [`PresenceFeed`] (an unbounded
//! channel: a send never waits, so presence never slows the gate); one task
//! ([`publisher`]) owns the [`book::Book`] and one internal connection to the embedded
//! rumqttd, which it reopens if it drops. Presence messages are not audited (the
//! connections they describe are); they are logged at debug.

pub(crate) mod book;
mod publisher;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use vitalmq_policies::{Role, SpiffeId};

pub use book::{BOOT_TOPIC, FORMAT};
use book::{Book, Change};

use crate::embedded::EmbeddedBroker;

/// Why presence could not start.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("randomness unavailable for the boot id")]
    Random,
}

/// Where connections report that they were admitted; cheap to clone. A disabled feed
/// (tests that run a relay alone) reports nothing.
#[derive(Debug, Clone, Default)]
pub struct PresenceFeed {
    tx: Option<mpsc::UnboundedSender<Change>>,
    next_conn: Arc<AtomicU64>,
}

impl PresenceFeed {
    /// A feed nobody listens to.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// `who`'s connection was admitted (its CONNACK reached the client). Returns what
    /// reports its end (on [`Presence::end`], or when dropped), or `None` for roles
    /// without presence (bridge, integrator, operator) and a disabled feed.
    pub(crate) fn admitted(&self, who: &SpiffeId) -> Option<Presence> {
        if !matches!(who.role, Role::Device | Role::Gateway) {
            return None;
        }
        let tx = self.tx.clone()?;
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let presence = Presence {
            tx,
            role: who.role,
            id: who.id.as_str().to_owned(),
            conn,
            ended: false,
        };
        presence.send(None);
        Some(presence)
    }
}

/// An admitted connection's presence: reports the end of the connection once, with
/// its reason, or as `ended` if dropped without one (a relay task that panicked).
#[derive(Debug)]
pub(crate) struct Presence {
    tx: mpsc::UnboundedSender<Change>,
    role: Role,
    id: String,
    conn: u64,
    ended: bool,
}

impl Presence {
    pub(crate) fn end(mut self, reason: &'static str) {
        self.ended = true;
        self.send(Some(reason));
    }

    fn send(&self, ended: Option<&'static str>) {
        // The publisher is gone only when the broker stops.
        let _ = self.tx.send(Change {
            role: self.role,
            id: self.id.clone(),
            conn: self.conn,
            at: SystemTime::now(),
            ended,
        });
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        if !self.ended {
            self.send(Some("ended"));
        }
    }
}

/// Starts the presence publisher (it publishes `presence/broker/boot` first) and
/// returns the feed the relays report to.
pub(crate) fn start(
    embedded: Arc<EmbeddedBroker>,
    shutdown: watch::Receiver<bool>,
) -> Result<(PresenceFeed, JoinHandle<()>), PresenceError> {
    let mut boot = [0u8; 8];
    rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, &mut boot)
        .map_err(|_| PresenceError::Random)?;
    let book = Book::new(hex::encode(boot), SystemTime::now());
    tracing::info!(boot = book.boot_id(), "presence: this broker boot");
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(publisher::run(embedded, rx, book, shutdown));
    let feed = PresenceFeed {
        tx: Some(tx),
        next_conn: Arc::default(),
    };
    Ok((feed, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Devices and gateways have presence, other roles none; an admitted connection
    /// reports its end once, also when dropped without a reason.
    #[test]
    fn only_devices_and_gateways_are_reported_and_each_end_once() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let feed = PresenceFeed {
            tx: Some(tx),
            next_conn: Arc::default(),
        };
        let who = |uri: &str| SpiffeId::parse(uri).expect("id");
        for role in ["bridge", "integrator", "operator"] {
            let id = who(&format!("spiffe://demo.vitalmq/{role}/x-1"));
            assert!(feed.admitted(&id).is_none(), "{role}");
        }
        assert!(rx.try_recv().is_err());
        let device = feed
            .admitted(&who("spiffe://demo.vitalmq/device/dev-1"))
            .expect("device");
        let gateway = feed
            .admitted(&who("spiffe://demo.vitalmq/gateway/gw-1"))
            .expect("gateway");
        device.end("client_closed");
        drop(gateway);
        let changes: Vec<Change> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        let summary: Vec<_> = changes
            .iter()
            .map(|c| (c.role, c.id.as_str(), c.conn, c.ended))
            .collect();
        assert_eq!(
            summary,
            vec![
                (Role::Device, "dev-1", 0, None),
                (Role::Gateway, "gw-1", 1, None),
                (Role::Device, "dev-1", 0, Some("client_closed")),
                (Role::Gateway, "gw-1", 1, Some("ended")),
            ]
        );
        assert!(
            PresenceFeed::disabled()
                .admitted(&who("spiffe://demo.vitalmq/device/dev-1"))
                .is_none()
        );
    }
}
