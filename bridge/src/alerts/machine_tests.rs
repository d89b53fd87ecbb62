//! The issue 17 state machines on their own, on explicit bridge time: the alert book
//! (ack, re-escalation) and silence. Properties: a state that goes through serde between
//! every step behaves exactly like one that does not, and the state stays bounded.

use std::path::Path;

use proptest::prelude::*;
use serde_json::Value as Json;
use vitalmq_envelope::DeviceId;
use vitalmq_policies::{Alerting, DeviceRegistry, Severity};

use super::book::{Book, BookState, Outgoing, RESOLVED_KEPT};
use super::silence::SilenceState;

const T0: u64 = 1_718_260_200_000;

fn policy() -> Alerting {
    Alerting::default()
}

fn entry() -> vitalmq_policies::DeviceEntry {
    let registry = DeviceRegistry::parse(
        "format = \"vitalmq-registry/v1\"\ntrust_domain = \"demo.vitalmq\"\n\
         [[devices]]\nid = \"dev-00042\"\nsite = \"site-a\"\npatient_ref = \"pt-1\"\n\
         alg = \"EdDSA\"\n\
         public_key = \"50163016231421c3895b50daa2c884654e188d01a090529bbddd36d151e50d2f\"\n",
        Path::new("registry.toml"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    registry
        .device(&DeviceId::new("dev-00042").expect("id"))
        .expect("registered")
        .clone()
}

fn change(id: &str, state: &str, severity: Severity) -> Outgoing {
    Outgoing {
        alert_id: id.to_owned(),
        state: state.to_owned(),
        kind: "clinical",
        topic: format!("alerts/site-a/{severity}/dev-00042"),
        device: "dev-00042".into(),
        rule: Some("spo2-low".into()),
        severity: Some(severity),
        body: format!(
            r#"{{"alert_id":"{id}","kind":"clinical","state":"{state}","severity":"{severity}"}}"#
        ),
        level: 0,
    }
}

fn json(o: &Outgoing) -> Json {
    serde_json::from_str(&o.body).expect("json")
}

#[test]
fn the_book_acknowledges_re_escalates_by_level_and_forgets_on_resolution() {
    let p = policy();
    let mut b = Book::default();
    let mut open = change("al-1", "open", Severity::Urgent);
    b.record(&mut open, T0);
    assert_eq!(open.level, 0);
    assert_eq!(b.next_due_ms(&p), Some(T0 + 300_000));
    assert!(b.due(&p, "dev-00042", T0 + 299_999).is_empty());
    let up = b.due(&p, "dev-00042", T0 + 300_000);
    assert_eq!(up.len(), 1);
    assert_eq!((up[0].state.as_str(), up[0].level), ("escalated", 1));
    let j = json(&up[0]);
    assert_eq!(j["reason"], "unacknowledged");
    assert_eq!(j["escalation_level"], 1);
    // The next period counts from the re-send.
    assert!(b.due(&p, "dev-00042", T0 + 599_999).is_empty());
    assert_eq!(b.due(&p, "dev-00042", T0 + 600_000)[0].level, 2);
    // An ack stops it; the re-sent body says who and when, not why it escalated.
    let (_, acked) = b.acknowledge(
        "al-1",
        "spiffe://demo.vitalmq/integrator/int-1",
        "dev-00042",
        T0 + 601_000,
    );
    let acked = acked.expect("re-sent");
    let j = json(&acked);
    assert_eq!(j["state"], "acknowledged");
    assert_eq!(j["ack"]["by"], "spiffe://demo.vitalmq/integrator/int-1");
    assert!(j.get("reason").is_none());
    assert_eq!(acked.level, 2);
    assert_eq!(b.next_due_ms(&p), None);
    assert!(b.due(&p, "dev-00042", T0 + 99_000_000).is_empty());
    // Worse from the source: escalated, ack cleared, due again.
    let mut worse = change("al-1", "escalated", Severity::Urgent);
    b.record(&mut worse, T0 + 700_000);
    assert_eq!(worse.level, 2);
    assert_eq!(json(&worse)["escalation_level"], 2);
    assert_eq!(b.get("al-1").map(|e| e.state), Some(BookState::Escalated));
    assert_eq!(b.next_due_ms(&p), Some(T0 + 1_000_000));
    // Info alerts are never re-sent by default.
    let mut quiet = Book::default();
    let mut info = change("al-2", "open", Severity::Info);
    quiet.record(&mut info, T0);
    assert!(quiet.due(&p, "dev-00042", u64::MAX).is_empty());
    assert_eq!(quiet.next_due_ms(&p), None);
    // Resolution: gone from the book, remembered as resolved, delivered at its level.
    let mut done = change("al-1", "resolved", Severity::Urgent);
    b.record(&mut done, T0 + 800_000);
    assert_eq!(done.level, 2);
    assert!(b.get("al-1").is_none() && b.was_resolved("al-1"));
}

#[test]
fn silence_measures_from_the_watch_start_or_the_last_message() {
    let p = policy();
    let e = entry();
    let mut s = SilenceState::default();
    assert_eq!(s.on_tick(&p, "h", &e, false, T0), None, "not watched yet");
    assert!(s.watch(T0));
    assert!(!s.watch(T0 + 1), "the start is kept");
    assert!(s.on_tick(&p, "h", &e, false, T0 + 299_999).is_none());
    let open = s.on_tick(&p, "h", &e, false, T0 + 300_000).expect("opens");
    let j = json(&open);
    assert_eq!(
        (j["reason"].as_str(), j["last_seen_at"].is_null()),
        (Some("offline"), true)
    );
    assert!(
        s.on_tick(&p, "h", &e, false, T0 + 900_000).is_none(),
        "once"
    );
    let done = s.on_accepted("h", &e, T0 + 1_000_000).expect("resolves");
    assert_eq!(done.alert_id, open.alert_id);
    assert_eq!(json(&done)["window_s"], 1000);
    s.on_refused("bad_signature");
    let refused = s.on_tick(&p, "h", &e, true, T0 + 1_300_000).expect("opens");
    let j = json(&refused);
    assert_eq!(
        (j["reason"].as_str(), j["refusal"].as_str()),
        (Some("refused"), Some("bad_signature"))
    );
    assert_ne!(refused.alert_id, open.alert_id, "a new episode");
}

#[derive(Debug, Clone)]
enum Step {
    Open(u8, bool),
    Escalate(u8),
    Resolve(u8),
    Ack(u8),
    Wait(u32),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u8..6, any::<bool>()).prop_map(|(i, u)| Step::Open(i, u)),
        (0u8..6).prop_map(Step::Escalate),
        (0u8..40).prop_map(Step::Resolve),
        (0u8..6).prop_map(Step::Ack),
        (0u32..2_000_000).prop_map(Step::Wait),
    ]
}

/// Runs the steps; with `serde`, the book goes through JSON after every step.
fn drive(steps: &[Step], serde: bool) -> (Vec<(String, String, u32, String)>, Book) {
    let p = policy();
    let mut b = Book::default();
    let mut now = T0;
    let mut out = Vec::new();
    for s in steps {
        let sev = |u: bool| {
            if u {
                Severity::Urgent
            } else {
                Severity::Review
            }
        };
        let mut sent: Vec<Outgoing> = match s {
            Step::Open(i, u) => vec![change(&format!("al-{i}"), "open", sev(*u))],
            Step::Escalate(i) => vec![change(&format!("al-{i}"), "escalated", Severity::Urgent)],
            Step::Resolve(i) => vec![change(&format!("al-{i}"), "resolved", Severity::Urgent)],
            Step::Ack(i) => b
                .acknowledge(
                    &format!("al-{i}"),
                    "spiffe://d/operator/o",
                    "dev-00042",
                    now,
                )
                .1
                .into_iter()
                .collect(),
            Step::Wait(ms) => {
                now += u64::from(*ms);
                b.due(&p, "dev-00042", now)
            }
        };
        for o in &mut sent {
            if matches!(s, Step::Open(..) | Step::Escalate(_) | Step::Resolve(_)) {
                b.record(o, now);
            }
            out.push((o.alert_id.clone(), o.state.clone(), o.level, o.body.clone()));
        }
        if serde {
            let j = serde_json::to_string(&b).expect("json");
            b = serde_json::from_str(&j).expect("back");
        }
    }
    (out, b)
}

proptest! {
    #[test]
    fn the_book_through_serde_behaves_the_same_and_stays_bounded(steps in prop::collection::vec(step(), 0..60)) {
        let (plain, book) = drive(&steps, false);
        let (durable, _) = drive(&steps, true);
        prop_assert_eq!(plain, durable);
        prop_assert!(book.entries().count() <= 6);
        prop_assert!(book.resolved.len() <= RESOLVED_KEPT);
    }

    #[test]
    fn silence_through_serde_behaves_the_same(steps in prop::collection::vec((0u8..4, 0u32..400_000), 0..60)) {
        let p = policy();
        let e = entry();
        let run = |serde: bool| {
            let mut s = SilenceState::default();
            let mut now = T0;
            let mut out = Vec::new();
            for (kind, dt) in &steps {
                now += u64::from(*dt);
                let sent = match kind {
                    0 => s.on_accepted("h", &e, now),
                    1 => { s.on_refused("bad_signature"); None }
                    2 => { s.watch(now); None }
                    _ => s.on_tick(&p, "h", &e, dt % 2 == 0, now),
                };
                out.extend(sent.map(|o| (o.alert_id, o.state, o.body)));
                if serde {
                    s = serde_json::from_str(&serde_json::to_string(&s).expect("json")).expect("back");
                }
            }
            out
        };
        let plain = run(false);
        prop_assert_eq!(&plain, &run(true));
        // Open and resolved alternate: never two opens in a row.
        for pair in plain.windows(2) {
            prop_assert!(pair[0].1 != pair[1].1);
        }
    }
}
