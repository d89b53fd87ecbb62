//! The device registry: which devices exist, their site, their pseudonymous patient
//! reference and their COSE public key; which gateways and integrators serve which site;
//! which operators are enrolled (an operator certificate alone does not admit its holder).
//!
//! The file is TOML, `vitalmq-registry/v2` (see `policies/examples/registry.toml`): each
//! device has a history of time-bound assignments (`[[devices.assignments]]`, RFC 3339
//! `valid_from`/`valid_to`, a patient pseudonym and a site) and may be `retired_at` an
//! instant, loaded into a [`History`] per device. `vitalmq-registry/v1` files (one `site`
//! and `patient_ref` per device) keep loading: each v1 device is one open assignment from
//! the Unix epoch. [`DeviceRegistry::to_toml`] always writes v2.
//!
//! Each v2 assignment may carry consent grants, `consent = [{ purpose = "research",
//! valid_from = ..., valid_to = ... }]` (see [`crate::Consent`]): care is implied for the
//! assignment's whole period; a grant lies inside its assignment's period and never
//! overlaps another grant of its purpose. [`DeviceRegistry::consent_at`] is the consent
//! in force for what a device observed at an instant.
//!
//! The bridge verifies telemetry against it (it implements [`KeyLookup`]) and the broker
//! uses the site bindings for gateway and integrator ACLs and refuses retired devices.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use toml::Spanned;
use vitalmq_envelope::{Algorithm, DeviceId, KeyLookup, VerifyingKey};

use crate::assignment::{Assignment, AssignmentError, History, Period, UnixMillis, Use};
use crate::consent::{Consent, ConsentError, Grant, Purpose};
use crate::error::{PolicyErrors, Problems};
use crate::identity::{PrincipalId, TrustDomain};

mod rfc3339;

pub use rfc3339::{TimeError, format_rfc3339, parse_rfc3339};

const FORMAT_V1: &str = "vitalmq-registry/v1";
const FORMAT_V2: &str = "vitalmq-registry/v2";

/// Why [`DeviceRegistry::change_history`] refused a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryChangeError {
    #[error("device `{0}` is not registered")]
    UnknownDevice(DeviceId),
    #[error("device `{device}`: {}", explain(source))]
    Assignment {
        device: DeviceId,
        #[source]
        source: AssignmentError,
    },
    #[error("device `{device}`: {}", explain_consent(source))]
    Consent {
        device: DeviceId,
        #[source]
        source: ConsentError,
    },
    #[error("device `{device}` has no assignment at {}", format_rfc3339(*at))]
    Unassigned { device: DeviceId, at: UnixMillis },
}

/// A site (a hospital-at-home region, a ward): same grammar as an id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SiteId(String);

impl SiteId {
    pub fn new(s: impl Into<String>) -> Result<Self, crate::IdentityError> {
        PrincipalId::new(s).map(|p| Self(p.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SiteId {
    type Error = crate::IdentityError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<SiteId> for String {
    fn from(s: SiteId) -> Self {
        s.0
    }
}

impl fmt::Display for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One registered device.
///
/// `site` and `patient_ref` are the device's latest assignment: the open one while it
/// has one (what v1 meant), the last closed one after an unassignment or retirement.
/// What the device served at a given instant is [`DeviceRegistry::assignment_at`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEntry {
    pub id: DeviceId,
    pub site: SiteId,
    /// Pseudonym of the patient wearing the device; never a direct identifier.
    pub patient_ref: String,
    /// The COSE verification key; its algorithm is the one the device must use.
    pub key: VerifyingKey,
    /// Consent context under which the data is processed (e.g. `care`, `research`).
    pub consent: Option<String>,
    /// Name of the processing policy the data falls under (retention, permitted use).
    pub processing_policy: Option<String>,
    /// Manufacturing lot or batch (v2, optional; `[A-Za-z0-9._-]{1,64}`): lets
    /// surveillance compare lots.
    pub lot: Option<String>,
    /// Hardware model, e.g. `vw-band-3` (v2, optional; same charset); model approvals
    /// may name hardware models.
    pub hardware_model: Option<String>,
    /// Deployment region, e.g. `eu-west` (v2, optional; same charset).
    pub region: Option<String>,
}

/// A gateway or integrator bound to a site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteBound {
    pub id: PrincipalId,
    pub site: SiteId,
}

/// The validated registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRegistry {
    trust_domain: TrustDomain,
    devices: BTreeMap<DeviceId, DeviceEntry>,
    /// Every registered device has one (the invariant `insert_device` keeps).
    histories: BTreeMap<DeviceId, History>,
    /// The consent of each assigned period, by device and the period's start; every
    /// assigned period of `histories` has exactly one, over that very period.
    consents: BTreeMap<DeviceId, BTreeMap<UnixMillis, Consent>>,
    gateways: BTreeMap<PrincipalId, SiteId>,
    integrators: BTreeMap<PrincipalId, SiteId>,
    operators: std::collections::BTreeSet<PrincipalId>,
}

/// The registry file as written on disk.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegistryFile {
    pub format: String,
    pub trust_domain: String,
    #[serde(default)]
    pub devices: Vec<Spanned<RawDevice>>,
    #[serde(default)]
    pub gateways: Vec<Spanned<RawSiteBound>>,
    #[serde(default)]
    pub integrators: Vec<Spanned<RawSiteBound>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operators: Vec<Spanned<RawOperator>>,
}

/// An enrolled operator (SPEC section 5.2 names operators next to integrators; the
/// registry is where a principal's enrolment lives).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOperator {
    pub id: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDevice {
    pub id: String,
    /// v1 only (v2: in `assignments`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// v1 only (v2: in `assignments`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient_ref: Option<String>,
    pub alg: String,
    /// Hex: 32 bytes for EdDSA, the 65-byte uncompressed SEC1 point for ES256.
    pub public_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processing_policy: Option<String>,
    /// v2: manufacturing lot or batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lot: Option<Spanned<String>>,
    /// v2: hardware model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware_model: Option<Spanned<String>>,
    /// v2: deployment region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<Spanned<String>>,
    /// v2: RFC 3339; from then on the device may not publish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<Spanned<String>>,
    /// v2: the device's assignment periods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub assignments: Vec<Spanned<RawAssignment>>,
}

/// One `[[devices.assignments]]` entry (v2).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAssignment {
    pub valid_from: Spanned<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_to: Option<Spanned<String>>,
    pub patient_ref: String,
    pub site: String,
    /// Consent grants for purposes other than care (care is implied).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consent: Vec<Spanned<RawGrant>>,
}

/// One `consent = [{ purpose, valid_from, valid_to }]` entry of an assignment (v2).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGrant {
    pub purpose: Spanned<String>,
    pub valid_from: Spanned<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_to: Option<Spanned<String>>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSiteBound {
    pub id: String,
    pub site: String,
}

impl DeviceRegistry {
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            devices: BTreeMap::new(),
            histories: BTreeMap::new(),
            consents: BTreeMap::new(),
            gateways: BTreeMap::new(),
            integrators: BTreeMap::new(),
            operators: std::collections::BTreeSet::new(),
        }
    }

    /// Reads and validates a registry file.
    pub fn load(path: &Path) -> Result<Self, PolicyErrors> {
        let text = crate::error::read_policy_file(path)?;
        Self::parse(&text, path)
    }

    /// Validates registry text; `path` is used in error messages only.
    pub fn parse(text: &str, path: &Path) -> Result<Self, PolicyErrors> {
        let mut problems = Problems::new(path, text);
        let raw: RegistryFile = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                problems.toml(&e);
                return problems.finish(Self::new(placeholder_domain()));
            }
        };
        let v2 = match raw.format.as_str() {
            FORMAT_V1 => false,
            FORMAT_V2 => true,
            _ => {
                problems.add(
                    None,
                    "format",
                    format!("expected \"{FORMAT_V2}\" (or \"{FORMAT_V1}\")"),
                );
                true
            }
        };
        let trust_domain = TrustDomain::new(raw.trust_domain).unwrap_or_else(|e| {
            problems.add(None, "trust_domain", e.to_string());
            placeholder_domain()
        });
        let mut registry = Self::new(trust_domain);
        for (i, entry) in raw.devices.iter().enumerate() {
            let span = Some(entry.span());
            let d = entry.get_ref();
            let field = |name: &str| format!("devices[{i}].{name}");
            let id = DeviceId::new(d.id.clone())
                .map_err(|e| problems.add(span.clone(), field("id"), e.to_string()));
            let history = if v2 {
                device_history_v2(&mut problems, i, entry)
            } else {
                device_history_v1(&mut problems, i, entry)
            };
            let key = d
                .alg
                .parse::<Algorithm>()
                .map_err(|e| problems.add(span.clone(), field("alg"), e.to_string()))
                .and_then(|alg| {
                    VerifyingKey::from_hex(alg, &d.public_key)
                        .map_err(|e| problems.add(span.clone(), field("public_key"), e.to_string()))
                });
            let fleet = fleet_facts(&mut problems, i, d, v2);
            if let (Ok(id), Some((history, (site, patient_ref), consents)), Ok(key), Some(fleet)) =
                (id, history, key, fleet)
            {
                let [lot, hardware_model, region] = fleet;
                let device = DeviceEntry {
                    id,
                    site,
                    patient_ref,
                    key,
                    consent: d.consent.clone(),
                    processing_policy: d.processing_policy.clone(),
                    lot,
                    hardware_model,
                    region,
                };
                if let Err(dup) = registry.insert_device_with_history(device, history, consents) {
                    problems.add(
                        span,
                        field("id"),
                        format!("device `{dup}` is registered twice"),
                    );
                }
            }
        }
        for (list, entries) in [
            ("gateways", &raw.gateways),
            ("integrators", &raw.integrators),
        ] {
            for (i, entry) in entries.iter().enumerate() {
                let span = Some(entry.span());
                let e = entry.get_ref();
                let id = PrincipalId::new(e.id.clone()).map_err(|err| {
                    problems.add(span.clone(), format!("{list}[{i}].id"), err.to_string())
                });
                let site = SiteId::new(e.site.clone()).map_err(|err| {
                    problems.add(span.clone(), format!("{list}[{i}].site"), err.to_string())
                });
                if let (Ok(id), Ok(site)) = (id, site) {
                    let map = if list == "gateways" {
                        &mut registry.gateways
                    } else {
                        &mut registry.integrators
                    };
                    if map.insert(id.clone(), site).is_some() {
                        problems.add(
                            span,
                            format!("{list}[{i}].id"),
                            format!("`{id}` is listed twice"),
                        );
                    }
                }
            }
        }
        for (i, entry) in raw.operators.iter().enumerate() {
            let span = Some(entry.span());
            match PrincipalId::new(entry.get_ref().id.clone()) {
                Ok(id) => {
                    if !registry.operators.insert(id.clone()) {
                        problems.add(
                            span,
                            format!("operators[{i}].id"),
                            format!("`{id}` is listed twice"),
                        );
                    }
                }
                Err(err) => problems.add(span, format!("operators[{i}].id"), err.to_string()),
            }
        }
        problems.finish(registry)
    }

    /// Adds a device, assigned to its `patient_ref` and `site` from the Unix epoch on
    /// (what a v1 entry means); returns its id back if it was already registered.
    pub fn insert_device(&mut self, device: DeviceEntry) -> Result<(), DeviceId> {
        let history = history_from_epoch(device.patient_ref.clone(), device.site.clone());
        self.insert_device_with_history(device, history, BTreeMap::new())
    }

    fn insert_device_with_history(
        &mut self,
        device: DeviceEntry,
        history: History,
        consents: BTreeMap<UnixMillis, Consent>,
    ) -> Result<(), DeviceId> {
        if self.devices.contains_key(&device.id) {
            return Err(device.id);
        }
        self.consents
            .insert(device.id.clone(), consents_for(&history, &consents));
        self.histories.insert(device.id.clone(), history);
        self.devices.insert(device.id.clone(), device);
        Ok(())
    }

    /// A device's assignment history.
    pub fn history(&self, id: &DeviceId) -> Option<&History> {
        self.histories.get(id)
    }

    /// What the device served at `t` (Unix ms): the assignment, or the retirement,
    /// whose period contains `t`; `None` for an unknown device or an unassigned time.
    pub fn assignment_at(&self, id: &DeviceId, t: UnixMillis) -> Option<&Assignment> {
        self.histories.get(id)?.at(t)
    }

    /// The consent in force for what the device observed at `t`: that of the assignment
    /// whose period contains `t`; `None` for an unknown device, an unassigned time or
    /// a retired device (no assignment, so no purpose, not even care).
    pub fn consent_at(&self, id: &DeviceId, t: UnixMillis) -> Option<&Consent> {
        let a = self.assignment_at(id, t)?;
        match a.serves {
            Use::Assigned { .. } => self.consents.get(id)?.get(&a.period.from),
            Use::Retired => None,
        }
    }

    /// Adds a consent grant to the assignment whose period contains the grant's start.
    pub fn grant_consent(
        &mut self,
        id: &DeviceId,
        grant: Grant,
    ) -> Result<(), RegistryChangeError> {
        self.change_consent(id, grant.period.from, |c| c.grant(grant))
    }

    /// Withdraws consent for `purpose` from `at` on (see [`Consent::withdraw`]): events
    /// observed from then on no longer flow to sinks of that purpose.
    pub fn withdraw_consent(
        &mut self,
        id: &DeviceId,
        purpose: Purpose,
        at: UnixMillis,
    ) -> Result<(), RegistryChangeError> {
        self.change_consent(id, at, |c| c.withdraw(purpose, at))
    }

    fn change_consent(
        &mut self,
        id: &DeviceId,
        at: UnixMillis,
        change: impl FnOnce(&mut Consent) -> Result<(), ConsentError>,
    ) -> Result<(), RegistryChangeError> {
        let from = match self.assignment_at(id, at) {
            Some(Assignment {
                period,
                serves: Use::Assigned { .. },
            }) => period.from,
            _ if !self.devices.contains_key(id) => {
                return Err(RegistryChangeError::UnknownDevice(id.clone()));
            }
            _ => {
                return Err(RegistryChangeError::Unassigned {
                    device: id.clone(),
                    at,
                });
            }
        };
        let consent = self
            .consents
            .get_mut(id)
            .and_then(|c| c.get_mut(&from))
            .expect("every assigned period has its consent");
        let mut next = consent.clone();
        change(&mut next).map_err(|source| RegistryChangeError::Consent {
            device: id.clone(),
            source,
        })?;
        *consent = next;
        Ok(())
    }

    /// Since when the device is retired, if it is.
    pub fn retired_since(&self, id: &DeviceId) -> Option<UnixMillis> {
        self.histories.get(id)?.retired_since()
    }

    /// Whether the device is retired at `t` (its retirement began at or before `t`).
    pub fn retired_by(&self, id: &DeviceId, t: UnixMillis) -> bool {
        self.retired_since(id).is_some_and(|since| since <= t)
    }

    /// Whether the device is retired now (by the system clock): the broker refuses it
    /// at CONNECT and a gateway may no longer relay for it.
    pub fn retired_now(&self, id: &DeviceId) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| {
                UnixMillis::try_from(d.as_millis()).unwrap_or(UnixMillis::MAX)
            });
        self.retired_by(id, now)
    }

    /// Applies `change` to a device's history (see [`History`]'s `reassign`, `close`,
    /// `retire`); a refused change leaves the registry as it was. The entry's `site`
    /// and `patient_ref` follow the latest assignment.
    pub fn change_history(
        &mut self,
        id: &DeviceId,
        change: impl FnOnce(&mut History) -> Result<(), AssignmentError>,
    ) -> Result<(), RegistryChangeError> {
        let (Some(history), Some(entry)) = (self.histories.get_mut(id), self.devices.get_mut(id))
        else {
            return Err(RegistryChangeError::UnknownDevice(id.clone()));
        };
        let mut next = history.clone();
        change(&mut next).map_err(|source| RegistryChangeError::Assignment {
            device: id.clone(),
            source,
        })?;
        if let Some((site, patient_ref)) = latest_assigned(&next) {
            entry.site = site;
            entry.patient_ref = patient_ref;
        }
        // A period closed by the change takes its grants with it, cut to its new end.
        if let Some(consents) = self.consents.get_mut(id) {
            *consents = consents_for(&next, consents);
        }
        *history = next;
        Ok(())
    }

    pub fn insert_gateway(&mut self, id: PrincipalId, site: SiteId) {
        self.gateways.insert(id, site);
    }

    pub fn insert_integrator(&mut self, id: PrincipalId, site: SiteId) {
        self.integrators.insert(id, site);
    }

    pub fn insert_operator(&mut self, id: PrincipalId) {
        self.operators.insert(id);
    }

    /// Is this operator enrolled?
    pub fn is_operator(&self, id: &PrincipalId) -> bool {
        self.operators.contains(id)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn device(&self, id: &DeviceId) -> Option<&DeviceEntry> {
        self.devices.get(id)
    }

    pub fn devices(&self) -> impl Iterator<Item = &DeviceEntry> {
        self.devices.values()
    }

    pub fn gateway_site(&self, id: &PrincipalId) -> Option<&SiteId> {
        self.gateways.get(id)
    }

    pub fn integrator_site(&self, id: &PrincipalId) -> Option<&SiteId> {
        self.integrators.get(id)
    }

    pub fn gateways(&self) -> impl Iterator<Item = SiteBound> + '_ {
        self.gateways.iter().map(|(id, site)| SiteBound {
            id: id.clone(),
            site: site.clone(),
        })
    }

    pub fn integrators(&self) -> impl Iterator<Item = SiteBound> + '_ {
        self.integrators.iter().map(|(id, site)| SiteBound {
            id: id.clone(),
            site: site.clone(),
        })
    }

    /// Renders the registry in its file format (round-trips through [`Self::parse`]).
    pub fn to_toml(&self) -> String {
        let raw_site_bound = |b: SiteBound| {
            let (id, site) = (b.id.to_string(), b.site.to_string());
            Spanned::new(0..0, RawSiteBound { id, site })
        };
        let file = RegistryFile {
            format: FORMAT_V2.to_owned(),
            trust_domain: self.trust_domain.to_string(),
            devices: self
                .devices
                .values()
                .map(|d| {
                    let history = self.histories.get(&d.id);
                    let periods = history.map(History::periods).unwrap_or_default();
                    let unspanned = |s: String| Spanned::new(0..0, s);
                    Spanned::new(
                        0..0,
                        RawDevice {
                            id: d.id.to_string(),
                            site: None,
                            patient_ref: None,
                            alg: d.key.algorithm().name().to_owned(),
                            public_key: d.key.to_hex(),
                            consent: d.consent.clone(),
                            processing_policy: d.processing_policy.clone(),
                            lot: d.lot.clone().map(unspanned),
                            hardware_model: d.hardware_model.clone().map(unspanned),
                            region: d.region.clone().map(unspanned),
                            retired_at: history
                                .and_then(History::retired_since)
                                .map(|t| unspanned(format_rfc3339(t))),
                            assignments: periods
                                .iter()
                                .filter_map(|a| match &a.serves {
                                    Use::Assigned { patient_ref, site } => Some(Spanned::new(
                                        0..0,
                                        RawAssignment {
                                            valid_from: unspanned(format_rfc3339(a.period.from)),
                                            valid_to: a
                                                .period
                                                .to
                                                .map(|t| unspanned(format_rfc3339(t))),
                                            patient_ref: patient_ref.clone(),
                                            site: site.to_string(),
                                            consent: self
                                                .consents
                                                .get(&d.id)
                                                .and_then(|c| c.get(&a.period.from))
                                                .map(raw_grants)
                                                .unwrap_or_default(),
                                        },
                                    )),
                                    Use::Retired => None,
                                })
                                .collect(),
                        },
                    )
                })
                .collect(),
            gateways: self.gateways().map(raw_site_bound).collect(),
            integrators: self.integrators().map(raw_site_bound).collect(),
            operators: self
                .operators
                .iter()
                .map(|id| Spanned::new(0..0, RawOperator { id: id.to_string() }))
                .collect(),
        };
        let body = toml::to_string(&file).expect("the registry model always serializes to TOML");
        format!("# vitalmq device registry (SPEC sections 1 and 3). Public keys only.\n{body}")
    }
}

/// A period in RFC 3339, as the file and the operator write it.
fn show(p: &Period) -> String {
    let until = p.to.map_or("open".to_owned(), format_rfc3339);
    format!("[{} .. {until})", format_rfc3339(p.from))
}

/// An [`AssignmentError`] with its instants in RFC 3339 rather than Unix milliseconds.
fn explain(e: &AssignmentError) -> String {
    match e {
        AssignmentError::Overlap { new, existing } => format!(
            "the period {} overlaps the existing period {}",
            show(new),
            show(existing)
        ),
        AssignmentError::Retired { since } => format!(
            "the device is retired since {}; a retired device is not assigned again",
            format_rfc3339(*since)
        ),
        AssignmentError::NothingOpen { at } => {
            format!("no assignment is open at {}", format_rfc3339(*at))
        }
        AssignmentError::NotAfterStart { at, open } => format!(
            "{} is not after the start of the open period {}",
            format_rfc3339(*at),
            show(open)
        ),
        AssignmentError::Empty { from, to } => format!(
            "an empty period (from {} to {})",
            format_rfc3339(*from),
            format_rfc3339(*to)
        ),
    }
}

/// The grants of a consent as the file writes them.
fn raw_grants(c: &Consent) -> Vec<Spanned<RawGrant>> {
    let unspanned = |s: String| Spanned::new(0..0, s);
    c.grants()
        .iter()
        .map(|g| {
            Spanned::new(
                0..0,
                RawGrant {
                    purpose: unspanned(g.purpose.to_string()),
                    valid_from: unspanned(format_rfc3339(g.period.from)),
                    valid_to: g.period.to.map(|t| unspanned(format_rfc3339(t))),
                },
            )
        })
        .collect()
}

/// One consent per assigned period of `history`: the one in `old` for a period of the
/// same start (cut to the period as it is now), else care only.
fn consents_for(
    history: &History,
    old: &BTreeMap<UnixMillis, Consent>,
) -> BTreeMap<UnixMillis, Consent> {
    history
        .periods()
        .iter()
        .filter(|a| matches!(a.serves, Use::Assigned { .. }))
        .map(|a| {
            let consent = old
                .get(&a.period.from)
                .map_or_else(|| Consent::new(a.period), |c| c.clipped_to(a.period));
            (a.period.from, consent)
        })
        .collect()
}

/// A [`ConsentError`] with its instants in RFC 3339 rather than Unix milliseconds.
fn explain_consent(e: &ConsentError) -> String {
    match e {
        ConsentError::CareIsImplied => e.to_string(),
        ConsentError::OutsideAssignment { grant, assignment } => format!(
            "the grant {} lies outside its assignment's period {}",
            show(grant),
            show(assignment)
        ),
        ConsentError::Overlap {
            purpose,
            new,
            existing,
        } => format!(
            "the {purpose} grant {} overlaps the {purpose} grant {}",
            show(new),
            show(existing)
        ),
        ConsentError::NothingToWithdraw { purpose, at } => {
            format!("no {purpose} grant is in force at {}", format_rfc3339(*at))
        }
    }
}

/// One open assignment from the Unix epoch: a v1 device.
fn history_from_epoch(patient_ref: String, site: SiteId) -> History {
    let mut history = History::default();
    history
        .insert(Assignment {
            period: Period { from: 0, to: None },
            serves: Use::Assigned { patient_ref, site },
        })
        .expect("an empty history accepts any period");
    history
}

/// The site and patient of the latest assigned period.
fn latest_assigned(history: &History) -> Option<(SiteId, String)> {
    history
        .periods()
        .iter()
        .rev()
        .find_map(|a| match &a.serves {
            Use::Assigned { patient_ref, site } => Some((site.clone(), patient_ref.clone())),
            Use::Retired => None,
        })
}

/// The optional `lot`, `hardware_model` and `region` of a device entry, each checked
/// against `[A-Za-z0-9._-]{1,64}`; v2 only. `None` when any is wrong (each reported).
fn fleet_facts(
    problems: &mut Problems<'_>,
    i: usize,
    d: &RawDevice,
    v2: bool,
) -> Option<[Option<String>; 3]> {
    let mut ok = true;
    let mut out = [None, None, None];
    for (slot, (name, value)) in out.iter_mut().zip([
        ("lot", &d.lot),
        ("hardware_model", &d.hardware_model),
        ("region", &d.region),
    ]) {
        let Some(value) = value else { continue };
        let field = format!("devices[{i}].{name}");
        if !v2 {
            problems.add(
                Some(value.span()),
                field,
                format!("only in \"{FORMAT_V2}\" files"),
            );
            ok = false;
        } else if !fleet_value_ok(value.get_ref()) {
            problems.add(Some(value.span()), field, FLEET_RULE);
            ok = false;
        } else {
            *slot = Some(value.get_ref().clone());
        }
    }
    ok.then_some(out)
}

const FLEET_RULE: &str = "must match [A-Za-z0-9._-]{1,64}";

/// `[A-Za-z0-9._-]{1,64}`.
fn fleet_value_ok(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A checked patient pseudonym.
fn patient_ref_ok(p: &str) -> bool {
    PrincipalId::new(p.to_owned()).is_ok()
}

const PATIENT_REF_RULE: &str = "must be a pseudonymous token ([A-Za-z0-9][A-Za-z0-9._-]{0,63}), never a name or direct identifier";

/// What a device entry yields: its history, its latest site and patient, and the consent
/// of each assigned period by the period's start.
type LoadedHistory = (History, (SiteId, String), BTreeMap<UnixMillis, Consent>);

/// A v1 device: `site` and `patient_ref` on the device, one open period from the epoch.
fn device_history_v1(
    problems: &mut Problems<'_>,
    i: usize,
    entry: &Spanned<RawDevice>,
) -> Option<LoadedHistory> {
    let span = Some(entry.span());
    let d = entry.get_ref();
    let field = |name: &str| format!("devices[{i}].{name}");
    if d.retired_at.is_some() || !d.assignments.is_empty() {
        problems.add(
            span.clone(),
            field(if d.retired_at.is_some() {
                "retired_at"
            } else {
                "assignments"
            }),
            format!("only in \"{FORMAT_V2}\" files"),
        );
    }
    let site = match &d.site {
        Some(s) => SiteId::new(s.clone())
            .map_err(|e| problems.add(span.clone(), field("site"), e.to_string()))
            .ok(),
        None => {
            problems.add(span.clone(), field("site"), "missing (required in v1)");
            None
        }
    };
    let patient_ref = match &d.patient_ref {
        Some(p) if patient_ref_ok(p) => Some(p.clone()),
        Some(_) => {
            problems.add(span.clone(), field("patient_ref"), PATIENT_REF_RULE);
            None
        }
        None => {
            problems.add(span, field("patient_ref"), "missing (required in v1)");
            None
        }
    };
    let (site, patient_ref) = (site?, patient_ref?);
    let history = history_from_epoch(patient_ref.clone(), site.clone());
    Some((history, (site, patient_ref), BTreeMap::new()))
}

/// A v2 device: its `[[devices.assignments]]` and `retired_at` as a [`History`]; every
/// problem (bad time, empty or overlapping period, retirement not last, a consent grant
/// that is unknown, outside its assignment or overlapping another) reported.
fn device_history_v2(
    problems: &mut Problems<'_>,
    i: usize,
    entry: &Spanned<RawDevice>,
) -> Option<LoadedHistory> {
    let span = Some(entry.span());
    let d = entry.get_ref();
    let field = |name: &str| format!("devices[{i}].{name}");
    let mut ok = true;
    for (name, present) in [
        ("site", d.site.is_some()),
        ("patient_ref", d.patient_ref.is_some()),
    ] {
        if present {
            problems.add(
                span.clone(),
                field(name),
                format!("in v2, `{name}` belongs in [[devices.assignments]]"),
            );
            ok = false;
        }
    }
    if d.assignments.is_empty() {
        problems.add(
            span.clone(),
            field("assignments"),
            "at least one [[devices.assignments]] entry is needed",
        );
        ok = false;
    }
    let time = |problems: &mut Problems<'_>, s: &Spanned<String>, name: String, ok: &mut bool| {
        parse_rfc3339(s.get_ref())
            .map_err(|e| {
                problems.add(Some(s.span()), name, e.to_string());
                *ok = false;
            })
            .ok()
    };
    let mut periods = Vec::new();
    for (j, a) in d.assignments.iter().enumerate() {
        let at = |name: &str| format!("devices[{i}].assignments[{j}].{name}");
        let r = a.get_ref();
        let from = time(problems, &r.valid_from, at("valid_from"), &mut ok);
        let to = match &r.valid_to {
            Some(t) => time(problems, t, at("valid_to"), &mut ok).map(Some),
            None => Some(None),
        };
        let site = SiteId::new(r.site.clone())
            .map_err(|e| problems.add(Some(a.span()), at("site"), e.to_string()))
            .ok();
        if !patient_ref_ok(&r.patient_ref) {
            problems.add(Some(a.span()), at("patient_ref"), PATIENT_REF_RULE);
        }
        let (Some(from), Some(to), Some(site)) = (from, to, site) else {
            ok = false;
            continue;
        };
        let Some(period) = Period::new(from, to) else {
            let to_span = r.valid_to.as_ref().map(Spanned::span);
            problems.add(to_span, at("valid_to"), "must be after valid_from");
            ok = false;
            continue;
        };
        let serves = Use::Assigned {
            patient_ref: r.patient_ref.clone(),
            site,
        };
        let mut consent = Consent::new(period);
        for (k, g) in r.consent.iter().enumerate() {
            let at = |name: &str| format!("devices[{i}].assignments[{j}].consent[{k}]{name}");
            let g = g.get_ref();
            let purpose = g
                .purpose
                .get_ref()
                .parse::<Purpose>()
                .map_err(|e| problems.add(Some(g.purpose.span()), at(".purpose"), e.to_string()))
                .ok();
            let from = time(problems, &g.valid_from, at(".valid_from"), &mut ok);
            let to = match &g.valid_to {
                Some(t) => time(problems, t, at(".valid_to"), &mut ok).map(Some),
                None => Some(None),
            };
            let (Some(purpose), Some(from), Some(to)) = (purpose, from, to) else {
                ok = false;
                continue;
            };
            let Some(period) = Period::new(from, to) else {
                let to_span = g.valid_to.as_ref().map(Spanned::span);
                problems.add(to_span, at(".valid_to"), "must be after valid_from");
                ok = false;
                continue;
            };
            if let Err(e) = consent.grant(Grant { purpose, period }) {
                problems.add(Some(g.purpose.span()), at(""), explain_consent(&e));
                ok = false;
            }
        }
        periods.push((a.span(), at(""), Assignment { period, serves }, consent));
    }
    let retired = d
        .retired_at
        .as_ref()
        .and_then(|t| Some((t.span(), time(problems, t, field("retired_at"), &mut ok)?)));
    let mut history = History::default();
    let mut consents = BTreeMap::new();
    for (span, name, a, consent) in periods {
        let from = a.period.from;
        if let Err(e) = history.insert(a) {
            problems.add(
                Some(span),
                name.trim_end_matches('.').to_owned(),
                explain(&e),
            );
            ok = false;
        } else {
            consents.insert(from, consent);
        }
    }
    if let Some((span, since)) = retired {
        let retirement = Assignment {
            period: Period {
                from: since,
                to: None,
            },
            serves: Use::Retired,
        };
        if let Err(e) = history.insert(retirement) {
            problems.add(
                Some(span),
                field("retired_at"),
                format!(
                    "a retirement is last, after every assignment has ended: {}",
                    explain(&e)
                ),
            );
            ok = false;
        }
    }
    let current = latest_assigned(&history);
    if !ok {
        return None;
    }
    Some((history, current?, consents))
}

fn placeholder_domain() -> TrustDomain {
    TrustDomain::new("invalid").expect("constant is a valid trust domain")
}

impl KeyLookup for DeviceRegistry {
    fn key_for(&self, device: &DeviceId) -> Option<&VerifyingKey> {
        self.devices.get(device).map(|d| &d.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
format = "vitalmq-registry/v1"
trust_domain = "demo.vitalmq"

[[devices]]
id = "dev-00042"
site = "site-a"
patient_ref = "pt-3f9c2a1b"
alg = "EdDSA"
public_key = "50163016231421c3895b50daa2c884654e188d01a090529bbddd36d151e50d2f"

[[devices]]
id = "dev-00077"
site = "site-b"
patient_ref = "pt-77"
alg = "ES256"
public_key = "04c4ab6d767fb711b435f28bf142486b566c52f673a6e7c9c7895476600235086d3df23c6dd102778d20ecd11b2620eaa4c8c49169811f067c44f0d8788be24a72"
consent = "care"

[[gateways]]
id = "gw-site-a"
site = "site-a"

[[integrators]]
id = "int-site-a"
site = "site-a"

[[operators]]
id = "ops-01"
"#;

    #[test]
    fn loads_and_round_trips() {
        let reg = DeviceRegistry::parse(GOOD, Path::new("registry.toml")).expect("valid registry");
        let id = DeviceId::new("dev-00077").expect("id");
        assert_eq!(
            reg.key_for(&id).map(VerifyingKey::algorithm),
            Some(Algorithm::Es256)
        );
        assert_eq!(
            reg.gateway_site(&PrincipalId::new("gw-site-a").expect("id"))
                .map(SiteId::as_str),
            Some("site-a")
        );
        assert!(reg.is_operator(&PrincipalId::new("ops-01").expect("id")));
        assert!(!reg.is_operator(&PrincipalId::new("ops-02").expect("id")));
        let again =
            DeviceRegistry::parse(&reg.to_toml(), Path::new("out.toml")).expect("round trip");
        assert_eq!(again, reg);
    }

    #[test]
    fn fleet_facts_load_round_trip_and_are_checked() {
        let text = include_str!("../examples/registry.toml");
        let reg = DeviceRegistry::parse(text, Path::new("registry.toml")).expect("example");
        let d = reg.device(&dev("dev-00042")).expect("dev-00042");
        assert_eq!(
            (
                d.lot.as_deref(),
                d.hardware_model.as_deref(),
                d.region.as_deref()
            ),
            (Some("LOT-A"), Some("vw-band-3"), Some("eu-west"))
        );
        let other = reg.device(&dev("dev-00077")).expect("dev-00077");
        assert_eq!(
            (&other.lot, &other.hardware_model, &other.region),
            (&None, &None, &None)
        );
        let out = reg.to_toml();
        assert!(out.contains("lot = \"LOT-A\""), "{out}");
        let again = DeviceRegistry::parse(&out, Path::new("out.toml")).expect("round trip");
        assert_eq!(again, reg);
        // A history change (what `vitalmq registry` commands do) keeps them.
        let mut changed = reg.clone();
        changed
            .change_history(&dev("dev-00042"), |h| h.retire(ms("2026-04-01T00:00:00Z")))
            .expect("retire");
        let again = DeviceRegistry::parse(&changed.to_toml(), Path::new("out.toml")).expect("ok");
        let d = again.device(&dev("dev-00042")).expect("dev-00042");
        assert_eq!(d.lot.as_deref(), Some("LOT-A"));
        assert_eq!(d.region.as_deref(), Some("eu-west"));

        let bad = text
            .replacen("lot = \"LOT-A\"", "lot = \"LOT A\"", 1)
            .replacen("hardware_model = \"vw-band-3\"", "hardware_model = \"\"", 1)
            .replacen(
                "region = \"eu-west\"",
                &format!("region = \"{}\"", "r".repeat(65)),
                1,
            );
        let err = DeviceRegistry::parse(&bad, Path::new("registry.toml")).unwrap_err();
        for (field, needle) in [
            ("devices[0].lot", "lot = "),
            ("devices[0].hardware_model", "hardware_model = "),
            ("devices[0].region", "region = "),
        ] {
            let line = bad[..bad.find(needle).expect("needle")]
                .matches('\n')
                .count()
                + 1;
            assert!(
                err.0.iter().any(|e| e.to_string()
                    == format!("registry.toml:{line}: {field}: must match [A-Za-z0-9._-]{{1,64}}")),
                "{field}: {err}"
            );
        }
        assert_eq!(err.0.len(), 3, "{err}");
        let v1 = GOOD.replacen(
            "consent = \"care\"",
            "consent = \"care\"\nlot = \"LOT-B\"",
            1,
        );
        let err = DeviceRegistry::parse(&v1, Path::new("registry.toml")).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert_eq!(err.0[0].field.as_deref(), Some("devices[1].lot"));
        assert!(err.0[0].message.contains("only in"), "{err}");
    }

    #[test]
    fn reports_every_problem_with_file_line_and_field() {
        let bad = GOOD
            .replace("alg = \"ES256\"", "alg = \"ES384\"")
            .replace(
                "patient_ref = \"pt-3f9c2a1b\"",
                "patient_ref = \"Jane Doe\"",
            )
            .replace("id = \"gw-site-a\"", "id = \"gw site\"");
        let err =
            DeviceRegistry::parse(&bad, Path::new("policies/registry.toml")).expect_err("invalid");
        let text = err.to_string();
        assert_eq!(err.0.len(), 3, "{text}");
        assert!(
            text.contains("policies/registry.toml:5: devices[0].patient_ref"),
            "{text}"
        );
        assert!(
            text.contains("policies/registry.toml:12: devices[1].alg"),
            "{text}"
        );
        assert!(text.contains("gateways[0].id"), "{text}");
    }

    #[test]
    fn toml_syntax_and_unknown_fields_are_placed() {
        let err = DeviceRegistry::parse(
            &GOOD.replace("consent = \"care\"", "colour = 1"),
            Path::new("r.toml"),
        )
        .expect_err("unknown field");
        assert_eq!(err.0[0].line, Some(18), "{err}");
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn weak_and_off_curve_keys_are_refused() {
        let small_order = "0100000000000000000000000000000000000000000000000000000000000000";
        let bad = GOOD.replace(
            "50163016231421c3895b50daa2c884654e188d01a090529bbddd36d151e50d2f",
            small_order,
        );
        let err = DeviceRegistry::parse(&bad, Path::new("r.toml")).expect_err("weak key");
        assert!(err.to_string().contains("devices[0].public_key"), "{err}");
        let off_curve = GOOD.replace("04c4ab", "04c4ac");
        assert!(DeviceRegistry::parse(&off_curve, Path::new("r.toml")).is_err());
    }

    const EXAMPLE: &str = include_str!("../examples/registry.toml");

    fn ms(t: &str) -> UnixMillis {
        parse_rfc3339(t).expect("test time")
    }

    fn dev(id: &str) -> DeviceId {
        DeviceId::new(id).expect("id")
    }

    fn patient_at(reg: &DeviceRegistry, id: &str, t: &str) -> Option<String> {
        match &reg.assignment_at(&dev(id), ms(t))?.serves {
            Use::Assigned { patient_ref, .. } => Some(patient_ref.clone()),
            Use::Retired => Some("retired".into()),
        }
    }

    #[test]
    fn a_v1_device_is_one_open_assignment_from_the_epoch() {
        let reg = DeviceRegistry::parse(GOOD, Path::new("registry.toml")).expect("v1 loads");
        assert_eq!(
            patient_at(&reg, "dev-00042", "1970-01-01T00:00:00Z").as_deref(),
            Some("pt-3f9c2a1b")
        );
        assert_eq!(
            patient_at(&reg, "dev-00042", "2099-01-01T00:00:00Z").as_deref(),
            Some("pt-3f9c2a1b")
        );
        assert_eq!(reg.retired_since(&dev("dev-00042")), None);
        // Written back as v2, it reads back the same.
        let text = reg.to_toml();
        assert!(text.contains("format = \"vitalmq-registry/v2\""), "{text}");
        assert!(
            text.contains("valid_from = \"1970-01-01T00:00:00Z\""),
            "{text}"
        );
        assert_eq!(
            DeviceRegistry::parse(&text, Path::new("out.toml")).expect("v2"),
            reg
        );
    }

    #[test]
    fn the_v2_example_loads_with_its_history() {
        let reg = DeviceRegistry::parse(EXAMPLE, Path::new("policies/examples/registry.toml"))
            .expect("the example is valid");
        assert_eq!(
            patient_at(&reg, "dev-00042", "2026-02-10T12:29:59.999Z").as_deref(),
            Some("pt-3f9c2a1b")
        );
        assert_eq!(
            patient_at(&reg, "dev-00042", "2026-02-10T12:30:00Z").as_deref(),
            Some("pt-81d07e44")
        );
        assert_eq!(patient_at(&reg, "dev-00042", "2026-01-01T00:00:00Z"), None);
        let d = reg.device(&dev("dev-00042")).expect("device");
        assert_eq!(
            (d.site.as_str(), d.patient_ref.as_str()),
            ("site-a", "pt-81d07e44"),
            "the entry's site and patient are the open assignment's"
        );
        assert_eq!(
            reg.retired_since(&dev("dev-00077")),
            Some(ms("2026-03-01T00:00:00Z"))
        );
        assert_eq!(
            patient_at(&reg, "dev-00077", "2026-01-20T08:00:00Z").as_deref(),
            Some("pt-77"),
            "09:00+01:00 is 08:00Z"
        );
        assert_eq!(
            patient_at(&reg, "dev-00077", "2026-03-01T00:00:00Z").as_deref(),
            Some("retired")
        );
        let again =
            DeviceRegistry::parse(&reg.to_toml(), Path::new("out.toml")).expect("round trip");
        assert_eq!(again, reg);
    }

    #[test]
    fn v2_problems_are_each_reported_with_line_and_field() {
        // Line numbers: the example's lines as they are (the replacements keep them).
        let bad = EXAMPLE
            .replace(
                "valid_from = \"2026-02-10T12:30:00Z\"",
                "valid_from = \"2026-02-10T12:00:00Z\"",
            )
            .replace(
                "retired_at = \"2026-03-01T00:00:00Z\"",
                "retired_at = \"2026-02-01T00:00:00Z\"",
            )
            .replace(
                "valid_from = \"2026-01-20T09:00:00+01:00\"",
                "valid_from = \"2026-01-20 nine\"",
            );
        let err = DeviceRegistry::parse(&bad, Path::new("r.toml")).expect_err("invalid");
        let text = err.to_string();
        assert_eq!(err.0.len(), 2, "{text}");
        assert!(
            text.contains("r.toml:32: devices[0].assignments[1]: the period [2026-02-10T12:00:00Z .. open) overlaps the existing period [2026-01-05T08:00:00Z .. 2026-02-10T12:30:00Z)"),
            "overlap: {text}"
        );
        assert!(
            text.contains("r.toml:45: devices[1].assignments[0].valid_from: not an RFC 3339"),
            "bad time: {text}"
        );

        // A retirement before an assignment has ended.
        let early = EXAMPLE.replace(
            "retired_at = \"2026-03-01T00:00:00Z\"",
            "retired_at = \"2026-02-01T00:00:00Z\"",
        );
        let err = DeviceRegistry::parse(&early, Path::new("r.toml")).expect_err("not last");
        assert!(
            err.to_string()
                .contains("r.toml:42: devices[1].retired_at: a retirement is last"),
            "{err}"
        );

        // An empty period, an assignment without a valid pseudonym, v1 fields in v2.
        let more = EXAMPLE
            .replace(
                "valid_to = \"2026-03-01T00:00:00Z\"",
                "valid_to = \"2026-01-01T00:00:00Z\"",
            )
            .replace(
                "patient_ref = \"pt-81d07e44\"",
                "patient_ref = \"Jane Doe\"",
            )
            .replace(
                "consent = \"care\"",
                "consent = \"care\"\nsite = \"site-a\"",
            );
        let err = DeviceRegistry::parse(&more, Path::new("r.toml")).expect_err("invalid");
        let text = err.to_string();
        assert_eq!(err.0.len(), 3, "{text}");
        assert!(text.contains("devices[0].site: in v2"), "{text}");
        assert!(
            text.contains("devices[0].assignments[1].patient_ref"),
            "{text}"
        );
        assert!(
            text.contains("devices[1].assignments[0].valid_to: must be after valid_from"),
            "{text}"
        );

        // A v2 device needs an assignment; v1 has no history fields.
        let none = "format = \"vitalmq-registry/v2\"\ntrust_domain = \"d\"\n[[devices]]\nid = \"dev-1\"\nalg = \"EdDSA\"\npublic_key = \"50163016231421c3895b50daa2c884654e188d01a090529bbddd36d151e50d2f\"\n";
        let err = DeviceRegistry::parse(none, Path::new("r.toml")).expect_err("no assignment");
        assert!(
            err.to_string().contains("r.toml:3: devices[0].assignments"),
            "{err}"
        );
        let v1 = GOOD.replace(
            "consent = \"care\"",
            "retired_at = \"2026-01-01T00:00:00Z\"",
        );
        let err = DeviceRegistry::parse(&v1, Path::new("r.toml")).expect_err("v1");
        assert!(
            err.to_string().contains("devices[1].retired_at: only in"),
            "{err}"
        );
    }

    #[test]
    fn changes_keep_history_and_refused_ones_change_nothing() {
        let mut reg = DeviceRegistry::parse(EXAMPLE, Path::new("r.toml")).expect("example");
        let id = dev("dev-00042");
        let site = SiteId::new("site-c").expect("site");
        reg.change_history(&id, |h| {
            h.reassign(
                ms("2026-04-01T00:00:00Z"),
                None,
                "pt-new".into(),
                site.clone(),
            )
        })
        .expect("reassign");
        assert_eq!(reg.history(&id).expect("history").periods().len(), 3);
        let d = reg.device(&id).expect("device");
        assert_eq!(
            (d.site.as_str(), d.patient_ref.as_str()),
            ("site-c", "pt-new")
        );
        let before = reg.clone();
        let err = reg
            .change_history(&dev("dev-00077"), |h| {
                h.reassign(
                    ms("2026-04-01T00:00:00Z"),
                    None,
                    "pt-x".into(),
                    site.clone(),
                )
            })
            .expect_err("retired");
        assert!(matches!(
            err,
            RegistryChangeError::Assignment {
                source: AssignmentError::Retired { .. },
                ..
            }
        ));
        assert_eq!(
            reg.change_history(&dev("dev-99999"), |h| h.close(1)),
            Err(RegistryChangeError::UnknownDevice(dev("dev-99999")))
        );
        assert_eq!(reg, before);
    }

    /// Line numbers in the tests below are this text's.
    const CONSENTS: &str = r#"format = "vitalmq-registry/v2"
trust_domain = "demo.vitalmq"

[[devices]]
id = "dev-00042"
alg = "EdDSA"
public_key = "50163016231421c3895b50daa2c884654e188d01a090529bbddd36d151e50d2f"

[[devices.assignments]]
valid_from = "2026-01-01T00:00:00Z"
patient_ref = "pt-a"
site = "site-a"
consent = [
  { purpose = "research", valid_from = "2026-01-10T00:00:00Z", valid_to = "2026-02-01T00:00:00Z" },
  { purpose = "surveillance", valid_from = "2026-01-01T00:00:00Z" },
]
"#;

    #[test]
    fn consent_grants_load_per_assignment_and_round_trip() {
        let reg = DeviceRegistry::parse(CONSENTS, Path::new("r.toml")).expect("valid");
        let id = dev("dev-00042");
        let covers = |p: Purpose, t: &str| {
            reg.consent_at(&id, ms(t))
                .is_some_and(|c| c.covers(p, ms(t)))
        };
        assert!(
            covers(Purpose::Care, "2026-01-01T00:00:00Z"),
            "care implied"
        );
        assert!(!covers(Purpose::Research, "2026-01-09T23:59:59.999Z"));
        assert!(covers(Purpose::Research, "2026-01-10T00:00:00Z"));
        assert!(!covers(Purpose::Research, "2026-02-01T00:00:00Z"));
        assert!(covers(Purpose::Surveillance, "2030-01-01T00:00:00Z"));
        assert!(!covers(Purpose::ModelTraining, "2026-01-15T00:00:00Z"));
        assert!(
            reg.consent_at(&id, ms("2025-12-31T23:59:59Z")).is_none(),
            "before the assignment: no consent at all"
        );
        let text = reg.to_toml();
        assert!(text.contains("purpose = \"research\""), "{text}");
        assert_eq!(
            DeviceRegistry::parse(&text, Path::new("out.toml")).expect("round trip"),
            reg
        );
        // A v1 device: care only, for its open period from the epoch.
        let v1 = DeviceRegistry::parse(GOOD, Path::new("v1.toml")).expect("v1");
        let c = v1
            .consent_at(&id, ms("2026-01-01T00:00:00Z"))
            .expect("assigned");
        assert!(c.covers(Purpose::Care, ms("2026-01-01T00:00:00Z")));
        assert!(c.grants().is_empty());
    }

    #[test]
    fn consent_problems_are_each_reported_with_line_and_field() {
        let bad = CONSENTS
            .replace("purpose = \"research\"", "purpose = \"marketing\"")
            .replace(
                "{ purpose = \"surveillance\", valid_from = \"2026-01-01T00:00:00Z\" }",
                "{ purpose = \"care\", valid_from = \"2026-01-01T00:00:00Z\" }",
            )
            .replace(
                "valid_from = \"2026-01-01T00:00:00Z\"\npatient_ref",
                "valid_from = \"2026-01-01T00:00:00Z\"\nvalid_to = \"2026-01-20T00:00:00Z\"\npatient_ref",
            );
        let err = DeviceRegistry::parse(&bad, Path::new("r.toml")).expect_err("invalid");
        let text = err.to_string();
        assert_eq!(err.0.len(), 2, "{text}");
        assert!(
            text.contains("r.toml:15: devices[0].assignments[0].consent[0].purpose: unknown purpose `marketing`"),
            "{text}"
        );
        assert!(
            text.contains("r.toml:16: devices[0].assignments[0].consent[1]: care is implied"),
            "{text}"
        );

        // Grants running past their assignment's end (the open one too).
        let bad = CONSENTS.replace(
            "valid_from = \"2026-01-01T00:00:00Z\"\npatient_ref",
            "valid_from = \"2026-01-01T00:00:00Z\"\nvalid_to = \"2026-01-20T00:00:00Z\"\npatient_ref",
        );
        let err = DeviceRegistry::parse(&bad, Path::new("r.toml")).expect_err("invalid");
        let text = err.to_string();
        assert_eq!(err.0.len(), 2, "{text}");
        assert!(
            text.contains("r.toml:15: devices[0].assignments[0].consent[0]: the grant [2026-01-10T00:00:00Z .. 2026-02-01T00:00:00Z) lies outside its assignment's period [2026-01-01T00:00:00Z .. 2026-01-20T00:00:00Z)"),
            "{text}"
        );
        assert!(
            text.contains("r.toml:16: devices[0].assignments[0].consent[1]: the grant [2026-01-01T00:00:00Z .. open) lies outside"),
            "{text}"
        );

        // Two grants of one purpose that overlap.
        let bad = CONSENTS.replace(
            "{ purpose = \"surveillance\", valid_from = \"2026-01-01T00:00:00Z\" }",
            "{ purpose = \"research\", valid_from = \"2026-01-05T00:00:00Z\", valid_to = \"2026-01-11T00:00:00Z\" }",
        );
        let err = DeviceRegistry::parse(&bad, Path::new("r.toml")).expect_err("overlap");
        assert_eq!(err.0.len(), 1, "{err}");
        assert!(
            err.to_string().contains("r.toml:15: devices[0].assignments[0].consent[1]: the research grant [2026-01-05T00:00:00Z .. 2026-01-11T00:00:00Z) overlaps the research grant [2026-01-10T00:00:00Z .. 2026-02-01T00:00:00Z)"),
            "{err}"
        );

        // Times are checked like the assignment's.
        let bad = CONSENTS.replace(
            "valid_to = \"2026-02-01T00:00:00Z\"",
            "valid_to = \"2026-01-05T00:00:00Z\"",
        );
        let err = DeviceRegistry::parse(&bad, Path::new("r.toml")).expect_err("empty");
        assert!(
            err.to_string().contains(
                "devices[0].assignments[0].consent[0].valid_to: must be after valid_from"
            ),
            "{err}"
        );
    }

    #[test]
    fn withdrawal_and_unassignment_end_consent_from_then_on() {
        let mut reg = DeviceRegistry::parse(CONSENTS, Path::new("r.toml")).expect("valid");
        let id = dev("dev-00042");
        let covers = |reg: &DeviceRegistry, p: Purpose, t: &str| {
            reg.consent_at(&id, ms(t))
                .is_some_and(|c| c.covers(p, ms(t)))
        };
        reg.withdraw_consent(&id, Purpose::Surveillance, ms("2026-03-01T00:00:00Z"))
            .expect("withdraw");
        assert!(covers(&reg, Purpose::Surveillance, "2026-02-28T23:59:59Z"));
        assert!(!covers(&reg, Purpose::Surveillance, "2026-03-01T00:00:00Z"));
        let before = reg.clone();
        let err = reg
            .withdraw_consent(&id, Purpose::Surveillance, ms("2026-03-02T00:00:00Z"))
            .expect_err("nothing in force");
        assert!(
            err.to_string()
                .contains("no surveillance grant is in force at 2026-03-02T00:00:00Z"),
            "{err}"
        );
        assert_eq!(
            reg.withdraw_consent(&id, Purpose::Research, ms("2025-01-01T00:00:00Z")),
            Err(RegistryChangeError::Unassigned {
                device: id.clone(),
                at: ms("2025-01-01T00:00:00Z")
            })
        );
        assert_eq!(reg, before, "refused changes change nothing");

        // Grant model training anew, then unassign: the open grant ends with the
        // assignment, and the registry written out stays loadable.
        reg.grant_consent(
            &id,
            Grant {
                purpose: Purpose::ModelTraining,
                period: Period::new(ms("2026-04-01T00:00:00Z"), None).expect("period"),
            },
        )
        .expect("grant");
        assert!(covers(&reg, Purpose::ModelTraining, "2026-04-02T00:00:00Z"));
        reg.change_history(&id, |h| h.close(ms("2026-05-01T00:00:00Z")))
            .expect("unassign");
        assert!(covers(&reg, Purpose::ModelTraining, "2026-04-30T00:00:00Z"));
        assert!(reg.consent_at(&id, ms("2026-05-01T00:00:00Z")).is_none());
        let c = reg
            .consent_at(&id, ms("2026-04-30T00:00:00Z"))
            .expect("assigned");
        assert!(
            c.grants().iter().all(|g| g
                .period
                .to
                .is_some_and(|to| to <= ms("2026-05-01T00:00:00Z"))),
            "{c:?}"
        );
        let again = DeviceRegistry::parse(&reg.to_toml(), Path::new("out.toml"))
            .expect("still valid after the unassignment");
        assert_eq!(again, reg);
    }
}
