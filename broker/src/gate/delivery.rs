//! PUBLISHes rumqttd delivers to the client: counted, and alerts audited (issue 7: who
//! was handed which alert).

use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use vitalmq_audit::Event;

use super::frame::Frame;
use super::session::{GateSession, Output};

/// An alert on its way to a subscriber (SPEC section 5).
struct AlertDelivery {
    topic: String,
    alert_id: String,
    state: String,
    qos: u8,
}

impl GateSession {
    /// Passes a PUBLISH from rumqttd to the client, auditing it first if it carries an
    /// alert (the connection closes when that record cannot be written).
    pub(super) fn deliver(&mut self, frame: Frame, out: &mut Vec<Output>) {
        self.counters.messages_out.increment(1);
        if let Some(delivery) = alert_delivery(&frame) {
            let record = self
                .record(Event::AlertDelivered)
                .action("deliver")
                .resource(delivery.alert_id)
                .reason(delivery.state)
                .detail("topic", delivery.topic)
                .detail("qos", delivery.qos);
            if self.audit.record(record).is_err() {
                return self.audit_failed(out);
            }
        }
        out.push(Output::ToClient(frame.bytes().clone()));
    }
}

/// For a PUBLISH on `alerts/...` or `ops/...`: the alert it carries. Other topics are
/// told apart by their first bytes without decoding the packet.
fn alert_delivery(frame: &Frame) -> Option<AlertDelivery> {
    let at = frame.header_len() + 2;
    let head = frame.bytes().get(at..at + 7)?;
    if !(head.starts_with(b"alerts/") || head.starts_with(b"ops/")) {
        return None;
    }
    let (topic, qos, payload) = match frame {
        Frame::V311 { header, bytes } => {
            let p = v4::Publish::read(*header, bytes.clone()).ok()?;
            (p.topic, p.qos as u8, p.payload)
        }
        Frame::V5 { header, bytes } => {
            let p = v5::Publish::read(*header, bytes.clone()).ok()?;
            (
                String::from_utf8(p.topic.to_vec()).ok()?,
                p.qos as u8,
                p.payload,
            )
        }
    };
    #[derive(serde::Deserialize)]
    struct Alert {
        alert_id: String,
        state: String,
    }
    let alert: Alert = serde_json::from_slice(&payload).ok()?;
    Some(AlertDelivery {
        topic,
        alert_id: alert.alert_id,
        state: alert.state,
        qos,
    })
}
