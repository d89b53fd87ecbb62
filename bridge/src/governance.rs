//! Consent as a data-flow control (issue 19, point 3), as pure decisions: whether an
//! event may flow to a sink of a given purpose ([`decide`]), and what of it the sink may
//! see ([`minimise`]). No I/O and no state: the delivery path asks these per event and
//! sink, counts what is withheld per sink and reason, and audits it (never silently).
//!
//! An event is judged by its `observed_at`, not by when it arrives: consent withdrawn
//! at `t` stops every event observed from `t` on, also one that arrives late, and never
//! reaches back to events observed before `t`.

use std::collections::BTreeSet;

use serde_json::{Map, Value};
use vitalmq_envelope::DeviceId;
use vitalmq_policies::{Consent, DeviceRegistry, Pseudonymiser, Purpose, UnixMillis, Use};

/// The top-level fields of a normalized event (`vitalmq-event/v1`, see
/// [`crate::normalize`]): what a field allow-list may name.
pub const EVENT_FIELDS: &[&str] = &[
    "format",
    "event_id",
    "device",
    "site",
    "patient_ref",
    "epoch",
    "seq",
    "type",
    "ts",
    "observed_at",
    "received_at",
    "m",
    "q",
    "fw",
    "model",
    "schema",
    "extra",
    "provenance",
    "implausible",
    "clock_skew",
];

/// The top-level fields of an alert message (SPEC section 5, `crate::alerts::message`):
/// what the default allow-list of an alert handler of a purpose other than care is
/// made of ([`Fields::alert_default_for`]).
pub const ALERT_FIELDS: &[&str] = &[
    "alert_id",
    "kind",
    "state",
    "severity",
    "rule",
    "rule_version",
    "policy_sha256",
    "device",
    "site",
    "patient_ref",
    "metric",
    "value",
    "threshold",
    "window_s",
    "evidence",
    "fw",
    "model",
    "raised_at",
    "measure",
    "measured",
    "baseline",
    "escalation",
    "reason",
    "suppressed",
    "suppressed_reasons",
];

/// Kept whatever the allow-list says: the format tag says what the record is, and the
/// event id (a hash of device, epoch and sequence number, no patient data) is what
/// makes redelivery to a sink idempotent.
pub const ALWAYS_KEPT: &[&str] = &["format", "event_id"];

/// The event field that names the patient (their care pseudonym).
pub const PATIENT_REF: &str = "patient_ref";
/// The event field holding payload keys the schema does not know.
pub const UNKNOWN_PAYLOAD: &str = "extra";
/// Not an event field: the name a sink's allow-list uses for the signed COSE bytes as
/// the device published them. They carry every payload key (unknown ones included)
/// and the device id, and cannot be cut down without breaking the signature, so a sink
/// whose fields are restricted receives them only when its list names `raw`: an
/// objects sink writes its `raw/` objects only then; an upstream sink, which forwards
/// nothing else, must name it (see `crate::config`).
pub const RAW_FIELD: &str = "raw";

/// Whether an event flows to a sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Send,
    Withheld(Reason),
}

/// Why an event was withheld from a sink; a label of the withheld-events count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// No grant for the sink's purpose covered the event's observation time, and none
    /// had ended before it.
    NoConsent,
    /// A grant for the purpose had been in force earlier in the assignment but was
    /// withdrawn (or ran out) by the event's observation time.
    Withdrawn,
    /// The device served no patient at the observation time (before its first
    /// assignment, between two, or retired): there is no consent of anyone to flow under.
    Unassigned,
    /// The registry in force no longer attributes the observation time to the patient
    /// and site the stored record names (a backdated reassignment, unassignment or
    /// retirement, or a device removed): the consent of whoever the registry names now
    /// is not the recorded patient's, so nothing flows to a purpose other than care.
    Reattributed,
    /// A clinical alert change some of whose evidence readings are not in the store:
    /// when they were observed, and so whose consent covered them, cannot be told.
    EvidenceMissing,
}

impl Reason {
    /// The label in metrics, store statistics and audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoConsent => "no_consent",
            Reason::Withdrawn => "withdrawn",
            Reason::Unassigned => "unassigned",
            Reason::Reattributed => "reattributed",
            Reason::EvidenceMissing => "evidence_missing",
        }
    }
}

/// Whether an event observed at `observed_at` may flow to a sink serving `purpose`,
/// given the consent of the assignment open then (`None`: none was; see
/// `DeviceRegistry::consent_at`).
pub fn decide(consent: Option<&Consent>, purpose: Purpose, observed_at: UnixMillis) -> Flow {
    let Some(consent) = consent else {
        return Flow::Withheld(Reason::Unassigned);
    };
    if !consent.assignment().contains(observed_at) {
        return Flow::Withheld(Reason::Unassigned);
    }
    if consent.covers(purpose, observed_at) {
        Flow::Send
    } else if consent.lapsed(purpose, observed_at) {
        Flow::Withheld(Reason::Withdrawn)
    } else {
        Flow::Withheld(Reason::NoConsent)
    }
}

/// Whether a record attributed at ingest to `recorded` (its `patient_ref` and site;
/// `None`: it names no patient), observed by `device` at `observed_at`, may flow to a
/// sink or handler serving `purpose` under `registry` as it stands now.
///
/// Care always flows: the care record is every event as attributed at ingest (which
/// already refused what no assignment covered), whatever the registry says later. Any
/// other purpose flows only under the consent of the recorded patient: the assignment
/// at `observed_at` must still name that patient and site ([`Reason::Reattributed`]
/// otherwise), and its consent must cover the purpose then ([`decide`]).
pub fn judge_recorded(
    registry: &DeviceRegistry,
    device: &str,
    recorded: Option<(&str, &str)>,
    purpose: Purpose,
    observed_at: UnixMillis,
) -> Flow {
    if purpose == Purpose::Care {
        return Flow::Send;
    }
    let Some((patient, site)) = recorded else {
        return Flow::Withheld(Reason::Unassigned);
    };
    let Ok(id) = DeviceId::new(device) else {
        return Flow::Withheld(Reason::Unassigned);
    };
    match registry.assignment_at(&id, observed_at).map(|a| &a.serves) {
        Some(Use::Assigned {
            patient_ref,
            site: now_site,
        }) if patient_ref == patient && now_site.as_str() == site => {
            decide(registry.consent_at(&id, observed_at), purpose, observed_at)
        }
        _ => Flow::Withheld(Reason::Reattributed),
    }
}

/// Which event fields a sink receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fields {
    /// The whole event.
    All,
    /// Only these (and [`ALWAYS_KEPT`]).
    Only(BTreeSet<String>),
}

impl Fields {
    /// What a sink of `purpose` receives when its configuration lists no fields: the
    /// whole event for care; for any other purpose everything but the patient's
    /// pseudonym and the payload keys the schema does not know (minimisation: what is
    /// not needed and not understood is not passed on).
    pub fn default_for(purpose: Purpose) -> Self {
        match purpose {
            Purpose::Care => Fields::All,
            _ => Fields::Only(
                EVENT_FIELDS
                    .iter()
                    .filter(|f| ![PATIENT_REF, UNKNOWN_PAYLOAD].contains(f))
                    .map(|f| (*f).to_owned())
                    .collect(),
            ),
        }
    }

    /// What an alert handler of `purpose` receives when its configuration lists no
    /// fields: the whole alert for care; for any other purpose every alert field but
    /// the patient's pseudonym.
    pub fn alert_default_for(purpose: Purpose) -> Self {
        match purpose {
            Purpose::Care => Fields::All,
            _ => Fields::Only(
                ALERT_FIELDS
                    .iter()
                    .filter(|f| **f != PATIENT_REF)
                    .map(|f| (*f).to_owned())
                    .collect(),
            ),
        }
    }

    /// Whether the raw signed messages are passed on (see [`RAW_FIELD`]).
    pub fn allows_raw(&self) -> bool {
        match self {
            Fields::All => true,
            Fields::Only(set) => set.contains(RAW_FIELD),
        }
    }

    /// Whether `field` is passed on.
    pub fn allows(&self, field: &str) -> bool {
        match self {
            Fields::All => true,
            Fields::Only(set) => ALWAYS_KEPT.contains(&field) || set.contains(field),
        }
    }
}

/// Why an event could not be minimised.
#[derive(Debug, thiserror::Error)]
pub enum MinimiseError {
    #[error("the event is not JSON")]
    NotJson(#[from] serde_json::Error),
    #[error("the event is not a JSON object")]
    NotAnObject,
}

/// The event with every field `fields` does not allow removed, the others in their
/// order. An allow-list, so a field added to events later reaches no restricted sink
/// until it is listed.
///
/// A sink of another purpose than care gets `patient_ref` only when its list names it,
/// and then as its purpose's pseudonym of the care reference ([`PurposePseudonym`],
/// applied by [`govern`] through [`substitute_patient_ref`]; the configuration refuses
/// such a list without `[pseudonyms]`).
pub fn minimise(event_json: &str, fields: &Fields) -> Result<String, MinimiseError> {
    if *fields == Fields::All {
        return Ok(event_json.to_owned());
    }
    reshape(event_json, fields, None)
}

/// The event minimised to `fields` and, when `pseudonym` is given and `fields` allows
/// `patient_ref`, with `patient_ref` replaced through it: one parse, one serialisation.
/// What a sink (through [`govern`]) or a handler of another purpose receives.
pub fn reshape(
    event_json: &str,
    fields: &Fields,
    pseudonym: Option<PseudonymOf<'_>>,
) -> Result<String, MinimiseError> {
    let event: Map<String, Value> = match serde_json::from_str(event_json)? {
        Value::Object(map) => map,
        _ => return Err(MinimiseError::NotAnObject),
    };
    let mut kept: Map<String, Value> = event
        .into_iter()
        .filter(|(k, _)| fields.allows(k))
        .collect();
    if let Some(p) = pseudonym
        && fields.allows(PATIENT_REF)
    {
        pseudonymise(&mut kept, p);
    }
    Ok(serde_json::to_string(&kept)?)
}

/// Replaces `patient_ref` (when the event has one) by `pseudonym(care_ref)`, or removes
/// it when that gives none; the field keeps its place.
fn pseudonymise(event: &mut Map<String, Value>, pseudonym: impl FnOnce(&str) -> Option<String>) {
    let Some(care_ref) = event.get(PATIENT_REF).and_then(Value::as_str) else {
        return;
    };
    match pseudonym(care_ref) {
        Some(p) => {
            event.insert(PATIENT_REF.to_owned(), Value::String(p));
        }
        None => {
            event.shift_remove(PATIENT_REF);
        }
    }
}

/// The seam for per-purpose pseudonyms: the event (minimised or not) with its
/// `patient_ref` replaced by `pseudonym(care_ref)`, or removed when that gives none.
pub fn substitute_patient_ref(
    event_json: &str,
    pseudonym: impl FnOnce(&str) -> Option<String>,
) -> Result<String, MinimiseError> {
    let mut event: Map<String, Value> = match serde_json::from_str(event_json)? {
        Value::Object(map) => map,
        _ => return Err(MinimiseError::NotAnObject),
    };
    if !event.contains_key(PATIENT_REF) {
        return Ok(event_json.to_owned());
    }
    pseudonymise(&mut event, pseudonym);
    Ok(serde_json::to_string(&event)?)
}

/// How many records were withheld, per reason (the labels of [`Reason::as_str`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Withheld(std::collections::BTreeMap<Reason, u64>);

impl Withheld {
    pub fn add(&mut self, reason: Reason) {
        *self.0.entry(reason).or_default() += 1;
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `(label, count)` per reason, in a fixed order.
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        self.0.iter().map(|(r, n)| (r.as_str(), *n)).collect()
    }
}

/// What one sink may receive of `records`: those `flow` lets through (in the bridge:
/// [`judge_recorded`] under the registry in force), each minimised to `fields` and, when `pseudonym` is given
/// and `fields` allows `patient_ref`, with `patient_ref` replaced through it; and the
/// count of the others per reason.
pub fn govern<'a, R, F>(
    records: impl IntoIterator<Item = &'a R>,
    flow: F,
    fields: &Fields,
    pseudonym: Option<PseudonymOf<'_>>,
) -> Result<(Vec<R>, Withheld), MinimiseError>
where
    R: Governed + Clone + 'a,
    F: Fn(&R) -> Flow,
{
    let mut kept = Vec::new();
    let mut withheld = Withheld::default();
    for r in records {
        match flow(r) {
            Flow::Withheld(reason) => withheld.add(reason),
            Flow::Send => {
                let mut r = r.clone();
                if *fields != Fields::All || pseudonym.is_some() {
                    let json = reshape(r.event_json(), fields, pseudonym)?;
                    r.set_event_json(json);
                }
                kept.push(r);
            }
        }
    }
    Ok((kept, withheld))
}

/// The pseudonym for a sink's purpose of a care `patient_ref` (`None`: remove it).
pub type PseudonymOf<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Per-purpose pseudonyms of care references (issue 19, point 4; bridge config
/// `[pseudonyms]`): `vitalmq_policies::Pseudonymiser` under the bridge's key, with the
/// care `patient_ref` as input and the sink's purpose as the purpose, so one patient's
/// events link within a research data set that never holds the care pseudonym.
#[derive(Debug, Clone)]
pub struct PurposePseudonym {
    pseudonymiser: Pseudonymiser,
    purpose: Purpose,
}

impl PurposePseudonym {
    pub fn new(key: [u8; 32], purpose: Purpose) -> Self {
        Self {
            pseudonymiser: Pseudonymiser::new(key),
            purpose,
        }
    }

    /// The purpose's pseudonym of `care_ref`; `None` (the field is then removed) only
    /// for an empty reference.
    pub fn of(&self, care_ref: &str) -> Option<String> {
        self.pseudonymiser
            .pseudonym(care_ref, Some(self.purpose.as_str()))
            .ok()
    }
}

/// A record [`govern`] can judge and minimise.
pub trait Governed {
    fn device(&self) -> &str;
    fn observed_at(&self) -> UnixMillis;
    fn event_json(&self) -> &str;
    fn set_event_json(&mut self, json: String);
}

#[cfg(test)]
mod tests {
    use vitalmq_policies::{Grant, Period};

    use super::*;

    fn period(from: u64, to: Option<u64>) -> Period {
        Period::new(from, to).expect("non-empty period")
    }

    /// Assigned [1000, 10000); research granted [2000, open), withdrawn at 5000.
    fn consent() -> Consent {
        let mut c = Consent::new(period(1_000, Some(10_000)));
        c.grant(Grant {
            purpose: Purpose::Research,
            period: period(2_000, Some(10_000)),
        })
        .expect("grant");
        c.withdraw(Purpose::Research, 5_000).expect("withdraw");
        c
    }

    #[test]
    fn care_flows_for_the_whole_assignment() {
        let c = consent();
        assert_eq!(decide(Some(&c), Purpose::Care, 1_000), Flow::Send);
        assert_eq!(decide(Some(&c), Purpose::Care, 9_999), Flow::Send);
        assert_eq!(
            decide(Some(&c), Purpose::Care, 10_000),
            Flow::Withheld(Reason::Unassigned)
        );
        assert_eq!(
            decide(None, Purpose::Care, 5_000),
            Flow::Withheld(Reason::Unassigned),
            "no assignment, not even care"
        );
    }

    #[test]
    fn other_purposes_flow_only_under_a_grant_and_stop_at_withdrawal() {
        let c = consent();
        assert_eq!(
            decide(Some(&c), Purpose::Research, 1_999),
            Flow::Withheld(Reason::NoConsent),
            "before the grant"
        );
        assert_eq!(decide(Some(&c), Purpose::Research, 2_000), Flow::Send);
        assert_eq!(
            decide(Some(&c), Purpose::Research, 4_999),
            Flow::Send,
            "observed before the withdrawal: still flows, however late it arrives"
        );
        assert_eq!(
            decide(Some(&c), Purpose::Research, 5_000),
            Flow::Withheld(Reason::Withdrawn)
        );
        assert_eq!(
            decide(Some(&c), Purpose::ModelTraining, 3_000),
            Flow::Withheld(Reason::NoConsent)
        );
        assert_eq!(
            decide(Some(&c), Purpose::Surveillance, 500),
            Flow::Withheld(Reason::Unassigned)
        );
        assert_eq!(Reason::Withdrawn.as_str(), "withdrawn");
    }

    proptest::proptest! {
        /// `decide` sends exactly what the consent covers; it says `Unassigned` exactly
        /// outside the assignment and `Withdrawn` only after a grant of the purpose
        /// ended.
        #[test]
        fn decide_sends_exactly_what_consent_covers(
            grants in proptest::collection::vec((0usize..4, 0u64..1_000, 1u64..400), 0..8),
            withdrawals in proptest::collection::vec((0usize..4, 0u64..1_000), 0..4),
        ) {
            let mut c = Consent::new(period(100, Some(900)));
            for (p, from, len) in grants {
                if let Some(period) = Period::new(from, Some(from + len)) {
                    let _refused_or_not = c.grant(Grant { purpose: Purpose::ALL[p], period });
                }
            }
            for (p, at) in withdrawals {
                let _refused_or_not = c.withdraw(Purpose::ALL[p], at);
            }
            for p in Purpose::ALL {
                for t in (0u64..1_000).step_by(7) {
                    let flow = decide(Some(&c), p, t);
                    proptest::prop_assert_eq!(flow == Flow::Send, c.covers(p, t));
                    proptest::prop_assert_eq!(
                        flow == Flow::Withheld(Reason::Unassigned),
                        !c.assignment().contains(t)
                    );
                    if flow == Flow::Withheld(Reason::Withdrawn) {
                        proptest::prop_assert!(c.grants().iter().any(|g| g.purpose == p
                            && g.period.to.is_some_and(|to| to <= t)));
                    }
                }
            }
        }
    }

    const EVENT: &str = r#"{"format":"vitalmq-event/v1","event_id":"ev1-00","device":"dev-1","site":"site-a","patient_ref":"pt-a","ts":1,"m":{"hr":60},"extra":{"note":"x"},"provenance":{"kid":"dev-1"}}"#;

    #[test]
    fn care_gets_the_event_as_it_is() {
        assert_eq!(
            minimise(EVENT, &Fields::default_for(Purpose::Care)).expect("json"),
            EVENT
        );
    }

    #[test]
    fn other_purposes_lose_the_patient_and_unknown_payload_keys_by_default() {
        let out = minimise(EVENT, &Fields::default_for(Purpose::Research)).expect("json");
        assert_eq!(
            out,
            r#"{"format":"vitalmq-event/v1","event_id":"ev1-00","device":"dev-1","site":"site-a","ts":1,"m":{"hr":60},"provenance":{"kid":"dev-1"}}"#
        );
    }

    #[test]
    fn an_allow_list_keeps_only_what_it_names_and_the_event_identity() {
        let fields = Fields::Only(["m", "patient_ref"].map(String::from).into());
        let out = minimise(EVENT, &fields).expect("json");
        assert_eq!(
            out,
            r#"{"format":"vitalmq-event/v1","event_id":"ev1-00","patient_ref":"pt-a","m":{"hr":60}}"#
        );
        assert!(matches!(
            minimise("[1]", &fields),
            Err(MinimiseError::NotAnObject)
        ));
        assert!(matches!(
            minimise("{", &fields),
            Err(MinimiseError::NotJson(_))
        ));
    }

    #[test]
    fn the_pseudonym_seam_replaces_or_removes_the_patient() {
        let out = substitute_patient_ref(EVENT, |care| {
            assert_eq!(care, "pt-a");
            Some("pt-research".into())
        })
        .expect("json");
        assert!(out.contains(r#""patient_ref":"pt-research""#), "{out}");
        assert!(!out.contains("pt-a\""), "{out}");
        let out = substitute_patient_ref(EVENT, |_| None).expect("json");
        assert!(!out.contains("patient_ref"), "{out}");
    }
}
