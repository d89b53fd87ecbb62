//! The device registry: which devices exist, their site, their pseudonymous patient
//! reference and their COSE public key; which gateways and integrators serve which site;
//! which operators are enrolled (an operator certificate alone does not admit its holder).
//!
//! The file is TOML (`vitalmq-registry/v1`); see `policies/examples/registry.toml`.
//! The bridge verifies telemetry against it (it implements [`KeyLookup`]) and the broker
//! uses the site bindings for gateway and integrator ACLs.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use toml::Spanned;
use vitalmq_envelope::{Algorithm, DeviceId, KeyLookup, VerifyingKey};

use crate::error::{PolicyErrors, Problems};
use crate::identity::{PrincipalId, TrustDomain};

const FORMAT: &str = "vitalmq-registry/v1";

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
    pub site: String,
    pub patient_ref: String,
    pub alg: String,
    /// Hex: 32 bytes for EdDSA, the 65-byte uncompressed SEC1 point for ES256.
    pub public_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processing_policy: Option<String>,
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
        if raw.format != FORMAT {
            problems.add(None, "format", format!("expected \"{FORMAT}\""));
        }
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
            let site = SiteId::new(d.site.clone())
                .map_err(|e| problems.add(span.clone(), field("site"), e.to_string()));
            if PrincipalId::new(d.patient_ref.clone()).is_err() {
                problems.add(
                    span.clone(),
                    field("patient_ref"),
                    "must be a pseudonymous token ([A-Za-z0-9][A-Za-z0-9._-]{0,63}), never a name or direct identifier",
                );
            }
            let key = d
                .alg
                .parse::<Algorithm>()
                .map_err(|e| problems.add(span.clone(), field("alg"), e.to_string()))
                .and_then(|alg| {
                    VerifyingKey::from_hex(alg, &d.public_key)
                        .map_err(|e| problems.add(span.clone(), field("public_key"), e.to_string()))
                });
            if let (Ok(id), Ok(site), Ok(key)) = (id, site, key) {
                let device = DeviceEntry {
                    id,
                    site,
                    patient_ref: d.patient_ref.clone(),
                    key,
                    consent: d.consent.clone(),
                    processing_policy: d.processing_policy.clone(),
                };
                if let Err(dup) = registry.insert_device(device) {
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

    /// Adds a device; returns its id back if it was already registered.
    pub fn insert_device(&mut self, device: DeviceEntry) -> Result<(), DeviceId> {
        if self.devices.contains_key(&device.id) {
            return Err(device.id);
        }
        self.devices.insert(device.id.clone(), device);
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
            format: FORMAT.to_owned(),
            trust_domain: self.trust_domain.to_string(),
            devices: self
                .devices
                .values()
                .map(|d| {
                    Spanned::new(
                        0..0,
                        RawDevice {
                            id: d.id.to_string(),
                            site: d.site.to_string(),
                            patient_ref: d.patient_ref.clone(),
                            alg: d.key.algorithm().name().to_owned(),
                            public_key: d.key.to_hex(),
                            consent: d.consent.clone(),
                            processing_policy: d.processing_policy.clone(),
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
}
