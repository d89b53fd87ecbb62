//! A whole demo/test deployment built in memory: CA, broker certificate, one identity
//! per party, a COSE key per device and the device registry. [`crate::layout`] writes it
//! out; broker and bridge tests may use it directly.
//!
//! Naming: sites `site-01`.., devices `dev-00001`.. assigned to sites round-robin
//! (device *i* goes to site `((i - 1) mod S) + 1`), one gateway `gw-<site>` and one
//! integrator `int-<site>` per site, one bridge `bridge-01` with its alert publisher
//! `bridge-01-alerts` (a second identity of role bridge: see bridge/src/alerts), one
//! operator `ops-01`.

use std::collections::BTreeSet;

use time::OffsetDateTime;
use vitalmq_envelope::{Algorithm, DeviceId, SigningKey};
use vitalmq_policies::{
    DeviceEntry, DeviceRegistry, PrincipalId, Role, SiteId, SpiffeId, TrustDomain,
};

use crate::ca::{Ca, Validity};
use crate::error::CertsError;
use crate::issue::{IssuedCert, ServerName};

/// What to build.
#[derive(Debug, Clone)]
pub struct FleetPlan {
    pub trust_domain: TrustDomain,
    pub devices: u32,
    pub sites: u32,
    /// Devices that sign with ES256 instead of the default Ed25519.
    pub es256: BTreeSet<DeviceId>,
    /// Also every K-th device (`dev-0000K`, `dev-000(2K)`, ..) signs with ES256.
    pub es256_every: Option<u32>,
    /// Validity of the CA, in days.
    pub ca_days: u32,
    /// Validity of the leaf certificates, in days.
    pub leaf_days: u32,
    pub server_names: Vec<ServerName>,
}

impl FleetPlan {
    pub fn new(trust_domain: TrustDomain, devices: u32, sites: u32) -> Self {
        Self {
            trust_domain,
            devices,
            sites,
            es256: BTreeSet::new(),
            es256_every: None,
            ca_days: 3650,
            leaf_days: 365,
            server_names: ServerName::local_defaults(),
        }
    }

    /// The COSE algorithm of device number `n` (1-based) called `id`.
    pub fn algorithm_of(&self, n: u32, id: &DeviceId) -> Algorithm {
        let every = self.es256_every.is_some_and(|k| k > 0 && n % k == 0);
        if every || self.es256.contains(id) {
            Algorithm::Es256
        } else {
            Algorithm::EdDsa
        }
    }
}

/// An identity certificate together with who it is for.
#[derive(Debug, Clone)]
pub struct IssuedIdentity {
    pub id: SpiffeId,
    pub cert: IssuedCert,
}

/// A device's COSE signing key (its public half is in the registry).
#[derive(Debug)]
pub struct DeviceKey {
    pub id: DeviceId,
    pub key: SigningKey,
}

/// The built deployment.
#[derive(Debug)]
pub struct Fleet {
    pub ca: Ca,
    pub server: IssuedCert,
    pub identities: Vec<IssuedIdentity>,
    pub device_keys: Vec<DeviceKey>,
    pub registry: DeviceRegistry,
}

/// `dev-00001` for `n = 1`.
pub fn device_id(n: u32) -> DeviceId {
    // The format always matches the id grammar (letters, digits, '-').
    DeviceId::new(format!("dev-{n:05}")).expect("dev-NNNNN is a valid device id")
}

/// `site-01` for `n = 1`.
pub fn site_id(n: u32) -> SiteId {
    SiteId::new(format!("site-{n:02}")).expect("site-NN is a valid site id")
}

fn principal(s: String) -> Result<PrincipalId, CertsError> {
    Ok(PrincipalId::new(s)?)
}

/// A random pseudonymous patient reference, `pt-` and 16 hex digits: no meaning, no
/// link to a person (the mapping, if any, lives outside vitalmq).
pub(crate) fn random_patient_ref() -> Result<String, CertsError> {
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| CertsError::Random)?;
    Ok(format!("pt-{}", hex::encode(bytes)))
}

/// A new COSE key for a device and its registry entry.
pub fn enroll_device(
    id: DeviceId,
    site: SiteId,
    alg: Algorithm,
) -> Result<(DeviceKey, DeviceEntry), CertsError> {
    let key = SigningKey::generate(alg)?;
    let entry = DeviceEntry {
        id: id.clone(),
        site,
        patient_ref: random_patient_ref()?,
        key: key.verifying_key(),
        consent: None,
        processing_policy: None,
        lot: None,
        hardware_model: None,
        region: None,
    };
    Ok((DeviceKey { id, key }, entry))
}

/// Lot, hardware model and region of simulated device `n` at site number `site`,
/// deterministic so tests and surveillance queries know them in advance:
/// - lot `LOT-A`, `LOT-B`, `LOT-C`, `LOT-D` round-robin by device (device n has lot
///   `(n - 1) mod 4`): `LOT-C` (devices 3, 7, 11, ...) is the lot surveillance tests
///   plant a defect in;
/// - hardware model `vw-band-2` for devices 1-4, `vw-band-3` for 5-8, and so on in
///   blocks of four (so every lot has both);
/// - region `eu-west` for odd site numbers, `eu-north` for even ones.
pub fn simulated_fleet_facts(n: u32, site: u32) -> (String, String, String) {
    let lot = ["LOT-A", "LOT-B", "LOT-C", "LOT-D"][(n.saturating_sub(1) % 4) as usize];
    let hardware = if (n.saturating_sub(1) / 4) % 2 == 0 {
        "vw-band-2"
    } else {
        "vw-band-3"
    };
    let region = if site % 2 == 1 { "eu-west" } else { "eu-north" };
    (lot.to_owned(), hardware.to_owned(), region.to_owned())
}

/// `entry` with the lot, hardware model and region of simulated device `n` at site
/// number `site` ([`simulated_fleet_facts`]).
fn with_fleet_facts(mut entry: DeviceEntry, n: u32, site: u32) -> DeviceEntry {
    let (lot, hardware_model, region) = simulated_fleet_facts(n, site);
    entry.lot = Some(lot);
    entry.hardware_model = Some(hardware_model);
    entry.region = Some(region);
    entry
}

/// A registry (trust domain `trust_domain`) of devices 1..=`devices`, device n at site
/// `(n - 1) % sites + 1` as [`Fleet::build`] assigns them, each with a new Ed25519 key;
/// no certificates, gateways or operators. For tests that need only the registry.
pub fn device_registry(
    trust_domain: TrustDomain,
    devices: u32,
    sites: u32,
) -> Result<DeviceRegistry, CertsError> {
    let mut registry = DeviceRegistry::new(trust_domain);
    for n in 1..=devices {
        let s = (n - 1) % sites.max(1) + 1;
        let (_, entry) = enroll_device(device_id(n), site_id(s), Algorithm::EdDsa)?;
        registry
            .insert_device(with_fleet_facts(entry, n, s))
            .map_err(CertsError::DuplicateDevice)?;
    }
    Ok(registry)
}

impl Fleet {
    /// Builds everything in `plan`, valid from `now`.
    pub fn build(plan: &FleetPlan, now: OffsetDateTime) -> Result<Self, CertsError> {
        if plan.sites == 0 {
            return Err(CertsError::NoSites);
        }
        if plan.sites > 99 || plan.devices > 99_999 {
            return Err(CertsError::TooMany);
        }
        if let Some(unknown) = plan
            .es256
            .iter()
            .find(|d| !(1..=plan.devices).any(|n| device_id(n) == **d))
        {
            return Err(CertsError::UnknownEs256 {
                device: unknown.clone(),
                devices: plan.devices,
            });
        }
        let td = &plan.trust_domain;
        let ca = Ca::generate(td.clone(), Validity::days_from(now, plan.ca_days))?;
        let leaf = Validity::days_from(now, plan.leaf_days);
        let server = ca.issue_server(&plan.server_names, leaf)?;
        let mut registry = DeviceRegistry::new(td.clone());
        let mut parties: Vec<(Role, PrincipalId)> = Vec::new();
        let mut device_keys = Vec::new();
        for n in 1..=plan.devices {
            let id = device_id(n);
            let s = (n - 1) % plan.sites + 1;
            let (key, entry) = enroll_device(id.clone(), site_id(s), plan.algorithm_of(n, &id))?;
            // Ids are distinct by construction, so the registry cannot refuse one.
            registry
                .insert_device(with_fleet_facts(entry, n, s))
                .map_err(CertsError::DuplicateDevice)?;
            device_keys.push(key);
            parties.push((Role::Device, PrincipalId::from(id)));
        }
        for s in 1..=plan.sites {
            let site = site_id(s);
            let gw = principal(format!("gw-{site}"))?;
            let int = principal(format!("int-{site}"))?;
            registry.insert_gateway(gw.clone(), site.clone());
            registry.insert_integrator(int.clone(), site);
            parties.push((Role::Gateway, gw));
            parties.push((Role::Integrator, int));
        }
        parties.push((Role::Bridge, principal("bridge-01".into())?));
        parties.push((Role::Bridge, principal("bridge-01-alerts".into())?));
        let operator = principal("ops-01".into())?;
        registry.insert_operator(operator.clone());
        parties.push((Role::Operator, operator));
        let identities = parties
            .into_iter()
            .map(|(role, id)| {
                let id = SpiffeId::new(td.clone(), role, id);
                let cert = ca.issue_identity(&id, leaf)?;
                Ok(IssuedIdentity { id, cert })
            })
            .collect::<Result<_, CertsError>>()?;
        Ok(Self {
            ca,
            server,
            identities,
            device_keys,
            registry,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_is_followed() {
        let td = TrustDomain::new("demo.vitalmq").expect("td");
        let mut plan = FleetPlan::new(td, 5, 2);
        plan.es256.insert(device_id(2));
        plan.es256_every = Some(5);
        let fleet = Fleet::build(&plan, OffsetDateTime::now_utc()).expect("fleet");
        let algs: Vec<_> = fleet
            .registry
            .devices()
            .map(|d| d.key.algorithm())
            .collect();
        use Algorithm::{EdDsa, Es256};
        assert_eq!(algs, [EdDsa, Es256, EdDsa, EdDsa, Es256]);
        let sites: Vec<_> = fleet
            .registry
            .devices()
            .map(|d| d.site.to_string())
            .collect();
        assert_eq!(
            sites,
            ["site-01", "site-02", "site-01", "site-02", "site-01"]
        );
        let facts: Vec<_> = fleet
            .registry
            .devices()
            .map(|d| {
                [&d.lot, &d.hardware_model, &d.region]
                    .map(|f| f.clone().unwrap_or_default())
                    .join(" ")
            })
            .collect();
        assert_eq!(
            facts,
            [
                "LOT-A vw-band-2 eu-west",
                "LOT-B vw-band-2 eu-north",
                "LOT-C vw-band-2 eu-west",
                "LOT-D vw-band-2 eu-north",
                "LOT-A vw-band-3 eu-west",
            ]
        );
        // The registry file keeps them.
        let again = DeviceRegistry::parse(&fleet.registry.to_toml(), std::path::Path::new("r"))
            .expect("round trip");
        assert_eq!(again, fleet.registry);
        for key in &fleet.device_keys {
            let entry = fleet.registry.device(&key.id).expect("registered");
            assert_eq!(entry.key, key.key.verifying_key());
            assert!(entry.patient_ref.starts_with("pt-") && entry.patient_ref.len() == 19);
        }
        let uris: Vec<_> = fleet.identities.iter().map(|i| i.id.uri()).collect();
        assert_eq!(uris.len(), 5 + 2 * 2 + 3);
        for expected in [
            "spiffe://demo.vitalmq/device/dev-00005",
            "spiffe://demo.vitalmq/gateway/gw-site-02",
            "spiffe://demo.vitalmq/integrator/int-site-01",
            "spiffe://demo.vitalmq/bridge/bridge-01",
            "spiffe://demo.vitalmq/bridge/bridge-01-alerts",
            "spiffe://demo.vitalmq/operator/ops-01",
        ] {
            assert!(uris.iter().any(|u| u == expected), "{expected} missing");
        }
        assert!(
            fleet
                .registry
                .is_operator(&PrincipalId::new("ops-01").expect("id"))
        );
        let gw = PrincipalId::new("gw-site-02").expect("id");
        assert_eq!(
            fleet.registry.gateway_site(&gw).map(|s| s.to_string()),
            Some("site-02".into())
        );
        let serials: BTreeSet<_> = fleet.identities.iter().map(|i| &i.cert.serial).collect();
        assert_eq!(serials.len(), fleet.identities.len(), "serials are unique");
    }

    #[test]
    fn device_key_pem_round_trips_and_ed25519_uses_pkcs8_v1() {
        for alg in [Algorithm::EdDsa, Algorithm::Es256] {
            let key = SigningKey::generate(alg).expect("key");
            let pem = key.to_pkcs8_pem().expect("pem");
            assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
            let back = SigningKey::from_pkcs8_pem(&pem).expect("reload");
            assert_eq!(back.verifying_key(), key.verifying_key());
            if alg == Algorithm::EdDsa {
                let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
                // RFC 8410 v1: SEQUENCE { 0, { id-Ed25519 }, OCTET STRING { OCTET STRING seed } }
                assert_eq!(block.contents.len(), 48);
                assert_eq!(&block.contents[..5], &[0x30, 0x2e, 0x02, 0x01, 0x00]);
            }
        }
    }

    #[test]
    fn an_unknown_es256_device_is_refused() {
        let td = TrustDomain::new("demo.vitalmq").expect("td");
        let mut plan = FleetPlan::new(td, 2, 1);
        plan.es256.insert(device_id(3));
        let err = Fleet::build(&plan, OffsetDateTime::now_utc()).expect_err("refused");
        assert!(err.to_string().contains("dev-00003"), "{err}");
    }
}
