//! One hand-over to rumqttd at a time per client id.
//!
//! A hand-over is the window from forwarding a connection's CONNECT to rumqttd until
//! rumqttd's CONNACK (or the end of that connection). rumqttd 0.20 keeps per-client-id
//! state (will handlers, the router's client id map) that two CONNECTs of one client id
//! in flight at once can leave inconsistent: a device reconnecting in a loop on a
//! flapping link took a whole MQTT version down that way (issue 15; rumqttd itself is
//! patched too, `vendor/rumqttd/VITALMQ-PATCHES.md` patch 5). So the gate lets a
//! second connection of a client id start its hand-over only once the first one's has
//! finished; rumqttd then sees an ordinary takeover of a connected session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;

type Slot = Arc<tokio::sync::Mutex<()>>;

/// The client ids whose hand-over is under way (or waited for).
#[derive(Debug, Default)]
pub(crate) struct Handovers {
    slots: Arc<Mutex<HashMap<String, Slot>>>,
}

/// Another connection of this client id did not finish its hand-over in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("another connection of this client id is still being handed over")]
pub(crate) struct HandoverBusy;

/// Held while a connection is being handed over; dropping it lets the next one start.
#[derive(Debug)]
pub(crate) struct Handover {
    slots: Arc<Mutex<HashMap<String, Slot>>>,
    client_id: String,
    slot: Slot,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Handovers {
    /// Waits (at most `wait`) until no other hand-over of `client_id` is under way.
    /// Waiters are served in arrival order (tokio's mutex is fair).
    pub(crate) async fn begin(
        &self,
        client_id: &str,
        wait: Duration,
    ) -> Result<Handover, HandoverBusy> {
        let slot = Arc::clone(lock(&self.slots).entry(client_id.to_owned()).or_default());
        let mut handover = Handover {
            slots: Arc::clone(&self.slots),
            client_id: client_id.to_owned(),
            slot: Arc::clone(&slot),
            guard: None,
        };
        // On timeout `handover` is dropped without a guard: it still cleans up its slot.
        let guard = tokio::time::timeout(wait, slot.lock_owned())
            .await
            .map_err(|_| HandoverBusy)?;
        handover.guard = Some(guard);
        Ok(handover)
    }

    /// No client id has a hand-over under way or waited for.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        lock(&self.slots).is_empty()
    }
}

impl Drop for Handover {
    fn drop(&mut self) {
        let mut slots = lock(&self.slots);
        self.guard = None;
        // The map and this handle are the only owners: nobody waits, forget the id.
        // New waiters clone the slot under the map lock, so the count cannot grow here.
        if Arc::strong_count(&self.slot) == 2 {
            slots.remove(&self.client_id);
        }
    }
}

/// The map is only ever changed by single inserts and removes: a panic elsewhere while
/// holding it cannot leave it half-changed.
fn lock(slots: &Mutex<HashMap<String, Slot>>) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
    slots.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(3600);

    #[tokio::test(start_paused = true)]
    async fn a_second_handover_of_one_client_id_waits_for_the_first() {
        let handovers = Arc::new(Handovers::default());
        let first = handovers.begin("dev-1", LONG).await.expect("free");
        let other = handovers
            .begin("dev-2", LONG)
            .await
            .expect("other ids do not wait");

        let h = Arc::clone(&handovers);
        let mut second = tokio::spawn(async move { h.begin("dev-1", LONG).await });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!second.is_finished(), "waits while the first is under way");

        drop(first);
        let second = (&mut second)
            .await
            .expect("task")
            .expect("starts after the first");
        drop(second);
        drop(other);
        assert!(
            handovers.is_empty(),
            "finished hand-overs leave nothing behind"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_handover_that_waits_too_long_is_refused_and_leaves_nothing() {
        let handovers = Handovers::default();
        let first = handovers.begin("dev-1", LONG).await.expect("free");
        let busy = handovers.begin("dev-1", Duration::from_secs(10)).await;
        assert_eq!(busy.err(), Some(HandoverBusy));
        drop(first);
        assert!(handovers.is_empty());
        let again = handovers.begin("dev-1", Duration::from_secs(10)).await;
        assert!(again.is_ok(), "free again");
    }
}
