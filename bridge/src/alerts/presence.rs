//! Who is connected to the broker, from its retained `presence/...` messages (design §1):
//! `presence/broker/boot` names the broker's boot; `presence/{device|gateway}/{id}` says
//! whether an identity is connected, with a `seq` that orders the messages of one boot.
//! In memory only: the messages are retained, so a bridge that (re)subscribes learns the
//! current presence again.
//!
//! Boot-aware: a new boot id means every identity of an older boot is disconnected; a
//! message of an older boot, or with a seq not higher than the one already applied for
//! the identity, changes nothing. A device counts as connected when its own identity is,
//! or any gateway of its site is (the broker cannot know which devices a gateway
//! carries).

use std::collections::HashMap;

use serde::Deserialize;
use vitalmq_policies::{DeviceRegistry, PrincipalId, SiteId};

const FORMAT: &str = "vitalmq-presence/v1";

#[derive(Debug, Deserialize)]
struct Message {
    format: String,
    boot: String,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    connected: Option<bool>,
    #[serde(default)]
    seq: Option<u64>,
}

/// Why a presence message was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PresenceError {
    #[error("not a presence topic")]
    Topic,
    #[error("malformed presence payload: {0}")]
    Payload(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Device,
    Gateway,
}

/// The presence the broker reported.
#[derive(Debug, Default)]
pub struct Presence {
    boot: Option<String>,
    /// `(kind, id)` -> `(seq, connected)` within the current boot.
    seen: HashMap<(Kind, String), (u64, bool)>,
}

impl Presence {
    /// Applies one presence message; `Ok(true)` if it changed anything.
    pub fn apply(&mut self, topic: &str, payload: &[u8]) -> Result<bool, PresenceError> {
        let rest = topic
            .strip_prefix("presence/")
            .ok_or(PresenceError::Topic)?;
        let m: Message =
            serde_json::from_slice(payload).map_err(|e| PresenceError::Payload(e.to_string()))?;
        if m.format != FORMAT {
            return Err(PresenceError::Payload(format!("format {}", m.format)));
        }
        if rest == "broker/boot" {
            if self.boot.as_deref() == Some(m.boot.as_str()) {
                return Ok(false);
            }
            self.boot = Some(m.boot);
            self.seen.clear();
            return Ok(true);
        }
        let (role, id) = rest.split_once('/').ok_or(PresenceError::Topic)?;
        let kind = match role {
            "device" => Kind::Device,
            "gateway" => Kind::Gateway,
            _ => return Err(PresenceError::Topic),
        };
        if m.role.as_deref().is_some_and(|r| r != role) || m.id.as_deref().is_some_and(|i| i != id)
        {
            return Err(PresenceError::Payload(
                "role or id differs from the topic".into(),
            ));
        }
        let (Some(connected), Some(seq)) = (m.connected, m.seq) else {
            return Err(PresenceError::Payload(
                "connected and seq are required".into(),
            ));
        };
        match &self.boot {
            Some(b) if *b != m.boot => return Ok(false),
            Some(_) => {}
            // The boot message may come after the identities' (retained, any order).
            None => self.boot = Some(m.boot),
        }
        let slot = self.seen.entry((kind, id.to_owned())).or_insert((0, false));
        if seq < slot.0 || (seq == slot.0 && slot.0 != 0) {
            return Ok(false);
        }
        let changed = slot.1 != connected;
        *slot = (seq, connected);
        Ok(changed)
    }

    fn is_up(&self, kind: Kind, id: &str) -> bool {
        self.seen
            .get(&(kind, id.to_owned()))
            .is_some_and(|(_, c)| *c)
    }

    /// Whether a device counts as connected: its own connection, or a gateway of its site.
    pub fn device_connected(&self, registry: &DeviceRegistry, device: &str, site: &SiteId) -> bool {
        if self.is_up(Kind::Device, device) {
            return true;
        }
        self.seen.iter().any(|((k, id), (_, up))| {
            *k == Kind::Gateway
                && *up
                && PrincipalId::new(id.clone())
                    .ok()
                    .and_then(|p| registry.gateway_site(&p).cloned())
                    .is_some_and(|s| s == *site)
        })
    }
}
