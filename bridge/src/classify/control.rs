//! Inputs of the recorder other than device messages (issue 17): acknowledgements of
//! alerts, presence changes the broker reports, and the passing of time (silence,
//! re-escalation). Each is turned into a [`Sequenced`] like a batch of messages, so the
//! recorder stages, commits (or, when the store cannot take it, delivers from memory),
//! adopts, audits and publishes it on one path.

use bytes::Bytes;
use vitalmq_policies::DeviceRegistry;

use super::{Sequenced, Sequencer};

/// One input to the recorder that is not a device message.
#[derive(Debug, Clone)]
pub enum Control {
    /// A PUBLISH on `alerts/{site}/ack/{id}` (SPEC section 5.2).
    Ack {
        topic: String,
        payload: Bytes,
        received_at_ms: u64,
    },
    /// A presence message of the broker (`presence/...`, see ARCHITECTURE.md).
    Presence {
        topic: String,
        payload: Bytes,
        received_at_ms: u64,
    },
    /// The bridge's wall clock, about once a second: silence and re-escalation timers.
    Tick { now_ms: u64 },
}

/// The alert figures the bridge exports as gauges, after every adopted change.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AlertGauges {
    /// Open clinical alerts (any state but resolved) per severity: info, review, urgent.
    pub open_by_severity: [u64; 3],
    /// Devices with an open silence (`no-data`) alert.
    pub silent_devices: u64,
    /// Open clinical alerts not acknowledged.
    pub unacknowledged: u64,
    /// Age in seconds, on the bridge's clock, of the oldest unacknowledged urgent alert.
    pub oldest_unacknowledged_urgent_s: Option<f64>,
}

impl Sequencer {
    /// Stages what one control input changes. `T` is `()`: a control input has no
    /// acknowledgement token; the recorder acknowledges its PUBLISH itself.
    ///
    /// SEAM (issue 17): returns nothing yet.
    pub fn control(
        &self,
        registry: &DeviceRegistry,
        control: Control,
        now_ms: u64,
    ) -> Sequenced<()> {
        let _ = (registry, control);
        Sequenced {
            commit: crate::store::Commit {
                now_ms,
                ..crate::store::Commit::default()
            },
            dispositions: Vec::new(),
            audit: Vec::new(),
            ops: Vec::new(),
            staged: Default::default(),
        }
    }

    /// The figures of [`AlertGauges`] for the adopted state.
    ///
    /// SEAM (issue 17): zeros yet.
    pub fn gauges(&self) -> AlertGauges {
        AlertGauges::default()
    }
}
