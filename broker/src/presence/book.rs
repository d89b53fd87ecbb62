//! What the broker says about presence, decided without I/O: one `presence/...`
//! message per change, numbered by one per-boot counter, and which connection of an
//! identity is the current one.
//!
//! A takeover (a second connection of the same id, which rumqttd lets replace the
//! first) can reach the book in either order: the old connection's end may be seen
//! after the new one was admitted. The book keeps, per connected identity, the number
//! of the connection that holds it: a new connection of a held identity ends the
//! holder first (`connected:false`, reason `takeover`, then `connected:true`), and the
//! end of a connection that no longer holds its identity says nothing. So the last
//! retained message of an identity is always the state of its current connection.

use std::collections::HashMap;
use std::time::SystemTime;

use serde::Serialize;
use vitalmq_policies::Role;

/// The `format` of every presence payload.
pub const FORMAT: &str = "vitalmq-presence/v1";
/// The topic of the per-boot message.
pub const BOOT_TOPIC: &str = "presence/broker/boot";

/// A connection of an identity with presence (a device or a gateway) was admitted or
/// ended, as the gate saw it at `at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change {
    pub(crate) role: Role,
    pub(crate) id: String,
    /// Unique per connection for the life of the process.
    pub(crate) conn: u64,
    pub(crate) at: SystemTime,
    /// `None`: admitted; `Some(reason)`: ended.
    pub(crate) ended: Option<&'static str>,
}

/// One retained QoS 1 message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Message {
    pub(crate) topic: String,
    pub(crate) payload: Vec<u8>,
}

#[derive(Serialize)]
struct BootPayload<'a> {
    format: &'static str,
    boot: &'a str,
    started_at: String,
}

#[derive(Serialize)]
struct PresencePayload<'a> {
    format: &'static str,
    role: &'static str,
    id: &'a str,
    connected: bool,
    boot: &'a str,
    seq: u64,
    at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

/// The presence state of one broker boot.
#[derive(Debug)]
pub(crate) struct Book {
    boot: String,
    started_at: SystemTime,
    seq: u64,
    /// Connected identities and the connection that holds each. Only connected ones:
    /// the entry goes when its connection ends.
    holders: HashMap<(Role, String), u64>,
}

impl Book {
    pub(crate) fn new(boot: String, started_at: SystemTime) -> Self {
        Self {
            boot,
            started_at,
            seq: 0,
            holders: HashMap::new(),
        }
    }

    pub(crate) fn boot_id(&self) -> &str {
        &self.boot
    }

    /// Identities connected now.
    pub(crate) fn connected(&self) -> usize {
        self.holders.len()
    }

    /// `presence/broker/boot`, published first.
    pub(crate) fn boot_message(&self) -> Message {
        let payload = BootPayload {
            format: FORMAT,
            boot: &self.boot,
            started_at: rfc3339_ms(self.started_at),
        };
        Message {
            topic: BOOT_TOPIC.to_owned(),
            payload: to_json(&payload),
        }
    }

    /// The messages `change` calls for, in the order they must be published.
    pub(crate) fn apply(&mut self, change: Change) -> Vec<Message> {
        let key = (change.role, change.id);
        match change.ended {
            None => {
                let mut out = Vec::with_capacity(2);
                if let Some(previous) = self.holders.insert(key.clone(), change.conn)
                    && previous != change.conn
                {
                    out.push(self.message(&key, false, change.at, Some("takeover")));
                }
                out.push(self.message(&key, true, change.at, None));
                out
            }
            Some(reason) => {
                if self.holders.get(&key) != Some(&change.conn) {
                    // Superseded by a newer connection (or never admitted): its end
                    // changes nothing.
                    return Vec::new();
                }
                self.holders.remove(&key);
                vec![self.message(&key, false, change.at, Some(reason))]
            }
        }
    }

    fn message(
        &mut self,
        (role, id): &(Role, String),
        connected: bool,
        at: SystemTime,
        reason: Option<&str>,
    ) -> Message {
        self.seq += 1;
        let payload = PresencePayload {
            format: FORMAT,
            role: role.as_str(),
            id,
            connected,
            boot: &self.boot,
            seq: self.seq,
            at: rfc3339_ms(at),
            reason,
        };
        Message {
            topic: format!("presence/{}/{id}", role.as_str()),
            payload: to_json(&payload),
        }
    }
}

fn to_json(payload: &impl Serialize) -> Vec<u8> {
    // Strings, booleans and integers only: serializing cannot fail.
    serde_json::to_vec(payload).expect("a presence payload serializes")
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-12-05T04:23:36.123Z`.
pub(crate) fn rfc3339_ms(at: SystemTime) -> String {
    let t = time::OffsetDateTime::from(at);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use serde_json::{Value, json};

    use super::*;

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_796_000_000_000 + ms)
    }

    fn change(role: Role, id: &str, conn: u64, ended: Option<&'static str>) -> Change {
        Change {
            role,
            id: id.to_owned(),
            conn,
            at: at(conn),
            ended,
        }
    }

    fn decoded(messages: &[Message]) -> Vec<(String, Value)> {
        messages
            .iter()
            .map(|m| {
                let v: Value = serde_json::from_slice(&m.payload).expect("JSON");
                (m.topic.clone(), v)
            })
            .collect()
    }

    fn book() -> Book {
        Book::new("0123456789abcdef".into(), at(0))
    }

    #[test]
    fn payloads_are_the_documented_ones() {
        let mut b = book();
        assert_eq!(
            decoded(&[b.boot_message()]),
            vec![(
                "presence/broker/boot".into(),
                json!({"format":"vitalmq-presence/v1","boot":"0123456789abcdef","started_at":"2026-11-30T00:53:20.000Z"})
            )]
        );
        let up = b.apply(change(Role::Device, "dev-00042", 7, None));
        assert_eq!(
            String::from_utf8(up[0].payload.clone()).expect("utf-8"),
            r#"{"format":"vitalmq-presence/v1","role":"device","id":"dev-00042","connected":true,"boot":"0123456789abcdef","seq":1,"at":"2026-11-30T00:53:20.007Z"}"#,
            "field order as documented"
        );
        let down = b.apply(change(Role::Gateway, "gw-01", 8, None));
        assert_eq!(down[0].topic, "presence/gateway/gw-01");
        let down = b.apply(change(Role::Device, "dev-00042", 7, Some("client_closed")));
        assert_eq!(
            decoded(&down),
            vec![(
                "presence/device/dev-00042".into(),
                json!({"format":"vitalmq-presence/v1","role":"device","id":"dev-00042","connected":false,"boot":"0123456789abcdef","seq":3,"at":"2026-11-30T00:53:20.007Z","reason":"client_closed"})
            )]
        );
        assert_eq!(b.connected(), 1, "the gateway");
    }

    /// Either order of "new connection admitted" and "old connection ended" leaves the
    /// identity connected, and the sequence numbers follow the publishing order.
    #[test]
    fn a_takeover_ends_connected_in_either_order() {
        let mut b = book();
        b.apply(change(Role::Device, "dev-1", 1, None));
        let new_first = [
            b.apply(change(Role::Device, "dev-1", 2, None)),
            b.apply(change(Role::Device, "dev-1", 1, Some("broker_closed"))),
        ]
        .concat();
        let d = decoded(&new_first);
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!(
            (&d[0].1["connected"], &d[0].1["reason"], &d[0].1["seq"]),
            (&json!(false), &json!("takeover"), &json!(2))
        );
        assert_eq!(
            (&d[1].1["connected"], &d[1].1["seq"]),
            (&json!(true), &json!(3))
        );

        let old_first = [
            b.apply(change(Role::Device, "dev-1", 2, Some("broker_closed"))),
            b.apply(change(Role::Device, "dev-1", 3, None)),
        ]
        .concat();
        let d = decoded(&old_first);
        assert_eq!(d.len(), 2);
        assert_eq!(
            (&d[0].1["connected"], &d[0].1["reason"]),
            (&json!(false), &json!("broker_closed"))
        );
        assert_eq!(
            (&d[1].1["connected"], &d[1].1["seq"]),
            (&json!(true), &json!(5))
        );
        assert_eq!(b.connected(), 1);
    }

    #[test]
    fn an_unknown_end_says_nothing_and_state_goes_with_the_connection() {
        let mut b = book();
        assert!(
            b.apply(change(Role::Device, "dev-1", 9, Some("io_error")))
                .is_empty()
        );
        b.apply(change(Role::Device, "dev-1", 1, None));
        b.apply(change(Role::Device, "dev-1", 1, Some("io_error")));
        assert_eq!(
            b.connected(),
            0,
            "no state kept for a disconnected identity"
        );
        assert!(
            b.apply(change(Role::Device, "dev-1", 1, Some("io_error")))
                .is_empty()
        );
    }
}
