//! The PKI as a directory (see [`crate::layout`] for the files): `init` creates one from
//! a [`FleetPlan`], [`Pki::open`] reloads the CA and its index so that later `issue` and
//! `revoke` calls keep the same CA, serial bookkeeping and CRL numbering.

use std::path::Path;

use time::OffsetDateTime;
use vitalmq_envelope::{Algorithm, DeviceId};
use vitalmq_policies::{DeviceRegistry, PrincipalId, Role, SiteId, SpiffeId};

use crate::ca::{Ca, Validity, rfc3339};
use crate::crl::{DEFAULT_CRL_DAYS, Reason};
use crate::error::CertsError;
use crate::fleet::{Fleet, FleetPlan, enroll_device};
use crate::index::{CertKind, Index, IndexEntry, Target};
use crate::issue::IssuedCert;
use crate::layout::{self, Layout, Mode};

/// An opened PKI directory.
#[derive(Debug)]
pub struct Pki {
    layout: Layout,
    ca: Ca,
    index: Index,
}

/// What `init` produced, for the summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitSummary {
    pub devices: usize,
    pub es256_devices: usize,
    pub sites: usize,
    pub identities: usize,
}

/// One more identity to issue from an existing CA.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub role: Role,
    pub id: PrincipalId,
    /// Required for devices, gateways and integrators (they are bound to a site in the
    /// registry); refused for the other roles.
    pub site: Option<SiteId>,
    pub validity: Validity,
    /// COSE algorithm of a new device's signing key.
    pub device_alg: Algorithm,
}

impl Pki {
    /// Builds `plan` and writes it into `dir`, which must be missing or empty.
    pub fn init(
        dir: &Path,
        plan: &FleetPlan,
        now: OffsetDateTime,
    ) -> Result<InitSummary, CertsError> {
        if !layout::is_absent_or_empty(dir)? {
            return Err(CertsError::NotEmpty(dir.to_path_buf()));
        }
        // Everything is generated before the first file is written.
        let fleet = Fleet::build(plan, now)?;
        let layout = Layout::new(dir);
        layout::write_new(&layout.ca_key(), &fleet.ca.key_pem(), Mode::Secret)?;
        layout::write_new(&layout.ca_cert(), fleet.ca.cert_pem(), Mode::Public)?;
        let mut index = Index::new(plan.trust_domain.clone());
        write_leaf(&layout.server_cert(), &layout.server_key(), &fleet.server)?;
        index.certs.push(entry(
            &layout,
            CertKind::Server,
            None,
            "broker",
            &layout.server_cert(),
            &fleet.server,
        ));
        for identity in &fleet.identities {
            let (role, id) = (identity.id.role, &identity.id.id);
            let cert_path = layout.identity_cert(role, id);
            write_leaf(&cert_path, &layout.identity_key(role, id), &identity.cert)?;
            index.certs.push(entry(
                &layout,
                CertKind::Identity,
                Some(role),
                id.as_str(),
                &cert_path,
                &identity.cert,
            ));
        }
        for device in &fleet.device_keys {
            let path = layout.cose_key(&PrincipalId::from(device.id.clone()));
            layout::write_new(&path, &device.key.to_pkcs8_pem()?, Mode::Secret)?;
        }
        // The registry links devices to patient pseudonyms and consent: owner-only, as
        // `vitalmq registry` writes it.
        layout::write_new(&layout.registry(), &fleet.registry.to_toml(), Mode::Secret)?;
        let mut pki = Self {
            layout,
            ca: fleet.ca,
            index,
        };
        pki.sign_crl(now)?;
        Ok(InitSummary {
            devices: fleet.device_keys.len(),
            es256_devices: fleet
                .device_keys
                .iter()
                .filter(|d| d.key.algorithm() == Algorithm::Es256)
                .count(),
            sites: plan.sites as usize,
            identities: fleet.identities.len(),
        })
    }

    /// Reloads the CA and its index from `dir`.
    pub fn open(dir: &Path) -> Result<Self, CertsError> {
        let layout = Layout::new(dir);
        let index_path = layout.index();
        let index = Index::parse(&layout::read(&index_path)?, &index_path)?;
        let ca = Ca::from_pem(
            index.trust_domain.clone(),
            &layout::read(&layout.ca_cert())?,
            &layout::read(&layout.ca_key())?,
        )?;
        Ok(Self { layout, ca, index })
    }

    pub(crate) fn layout(&self) -> &Layout {
        &self.layout
    }

    pub(crate) fn index(&self) -> &Index {
        &self.index
    }

    /// Issues one identity; a device also gets a COSE key and a registry entry, a
    /// gateway or integrator a registry binding to its site. Refuses to replace anything.
    pub fn issue(&mut self, req: &IssueRequest) -> Result<IndexEntry, CertsError> {
        // Held until the index (and registry) changes are in place; every check below
        // is made on the state read under it.
        let _turn = self.take_turn()?;
        let needs_site = matches!(req.role, Role::Device | Role::Gateway | Role::Integrator);
        let site = match (&req.site, needs_site) {
            (Some(site), true) => Some(site.clone()),
            (None, false) => None,
            (None, true) => {
                return Err(CertsError::SiteRequired(req.role));
            }
            (Some(_), false) => {
                return Err(CertsError::SiteNotAllowed(req.role));
            }
        };
        if let Some(live) = self.index.live_identity(req.role, &req.id) {
            return Err(CertsError::AlreadyIssued {
                role: req.role,
                id: req.id.clone(),
                serial: live.serial.clone(),
            });
        }
        let cert_path = self.layout.identity_cert(req.role, &req.id);
        let key_path = self.layout.identity_key(req.role, &req.id);
        let cose_path = self.layout.cose_key(&req.id);
        let mut must_be_new = vec![&cert_path, &key_path];
        if req.role == Role::Device {
            must_be_new.push(&cose_path);
        }
        if let Some(path) = must_be_new.into_iter().find(|p| p.exists()) {
            return Err(CertsError::Exists { path: path.clone() });
        }

        // The registry change is prepared (and checked) before anything is written,
        // under the turn taken above (the lock every registry writer takes: `vitalmq
        // registry`, the admin API), held until the changed registry is in place: the
        // registry is read under it, so a consent or assignment change made meanwhile
        // is kept, not overwritten.
        let registry_path = self.layout.registry();
        let registry = match (site, req.role) {
            (Some(site), _) => Some(self.registry_with(req, site)?),
            // Operators are enrolled in the registry too (no site): the broker admits
            // only listed ones.
            (None, Role::Operator) => Some(self.registry_with_operator(req)?),
            (None, _) => None,
        };
        let spiffe = SpiffeId::new(self.index.trust_domain.clone(), req.role, req.id.clone());
        let issued = self.ca.issue_identity(&spiffe, req.validity)?;
        write_leaf(&cert_path, &key_path, &issued)?;
        if let Some((registry, device_key)) = registry {
            if let Some(key) = device_key {
                layout::write_new(&cose_path, &key.to_pkcs8_pem()?, Mode::Secret)?;
            }
            layout::replace(&registry_path, &registry.to_toml(), Mode::Secret)?;
        }
        let new = entry(
            &self.layout,
            CertKind::Identity,
            Some(req.role),
            req.id.as_str(),
            &cert_path,
            &issued,
        );
        self.index.certs.push(new.clone());
        self.save_index()?;
        Ok(new)
    }

    /// The registry with the operator of `req` added.
    fn registry_with_operator(
        &self,
        req: &IssueRequest,
    ) -> Result<(DeviceRegistry, Option<vitalmq_envelope::SigningKey>), CertsError> {
        let path = self.layout.registry();
        let mut registry = self.load_registry()?;
        if registry.is_operator(&req.id) {
            return Err(CertsError::InRegistry {
                role: req.role,
                id: req.id.clone(),
                path,
            });
        }
        registry.insert_operator(req.id.clone());
        Ok((registry, None))
    }

    /// The registry file, checked to be of this CA's trust domain.
    fn load_registry(&self) -> Result<DeviceRegistry, CertsError> {
        let path = self.layout.registry();
        let registry = DeviceRegistry::load(&path).map_err(|source| CertsError::Registry {
            path: path.clone(),
            source,
        })?;
        if registry.trust_domain() != &self.index.trust_domain {
            return Err(CertsError::RegistryDomain {
                path,
                found: registry.trust_domain().clone(),
                ca: self.index.trust_domain.clone(),
            });
        }
        Ok(registry)
    }

    /// The registry with `req` added, and the new device's COSE key if it is a device.
    fn registry_with(
        &self,
        req: &IssueRequest,
        site: SiteId,
    ) -> Result<(DeviceRegistry, Option<vitalmq_envelope::SigningKey>), CertsError> {
        let path = self.layout.registry();
        let mut registry = self.load_registry()?;
        let taken = || CertsError::InRegistry {
            role: req.role,
            id: req.id.clone(),
            path: path.clone(),
        };
        match req.role {
            Role::Device => {
                let id: DeviceId = req.id.to_device_id();
                if registry.device(&id).is_some() {
                    return Err(taken());
                }
                let (key, entry) = enroll_device(id, site, req.device_alg)?;
                registry.insert_device(entry).map_err(|_| taken())?;
                Ok((registry, Some(key.key)))
            }
            Role::Gateway => {
                if registry.gateway_site(&req.id).is_some() {
                    return Err(taken());
                }
                registry.insert_gateway(req.id.clone(), site);
                Ok((registry, None))
            }
            Role::Integrator => {
                if registry.integrator_site(&req.id).is_some() {
                    return Err(taken());
                }
                registry.insert_integrator(req.id.clone(), site);
                Ok((registry, None))
            }
            // Not reached: `issue` calls this only for roles bound to a site.
            Role::Bridge | Role::Operator => Ok((registry, None)),
        }
    }

    /// Revokes a certificate and re-signs `crl.pem` with the next CRL number.
    pub fn revoke(
        &mut self,
        target: &Target,
        reason: Reason,
        now: OffsetDateTime,
    ) -> Result<IndexEntry, CertsError> {
        let _turn = self.take_turn()?;
        let revoked = self.index.revoke(target, now, reason)?.clone();
        self.sign_crl(now)?;
        Ok(revoked)
    }

    /// Takes the PKI's turn (the lock on its directory, the one the registry's writers
    /// take: the registry is `<dir>/registry.toml`) and reads the index again under
    /// it: the index read by [`Pki::open`] may be stale by now, and saving a change
    /// made to it would drop what a concurrent `certs issue` or `revoke` added.
    fn take_turn(&mut self) -> Result<vitalmq_private_fs::DirLock, CertsError> {
        let turn = vitalmq_private_fs::lock_dir(self.layout.root())?;
        let index_path = self.layout.index();
        self.index = Index::parse(&layout::read(&index_path)?, &index_path)?;
        Ok(turn)
    }

    /// Signs a fresh CRL of everything revoked so far (number + 1), valid for
    /// [`DEFAULT_CRL_DAYS`], then saves the index. Also used to refresh an ageing CRL.
    pub fn write_crl(&mut self, now: OffsetDateTime) -> Result<u64, CertsError> {
        let _turn = self.take_turn()?;
        self.sign_crl(now)
    }

    /// [`Pki::write_crl`] for a caller that holds the turn.
    fn sign_crl(&mut self, now: OffsetDateTime) -> Result<u64, CertsError> {
        let number = self.index.crl_number + 1;
        let pem = self
            .ca
            .sign_crl(&self.index.revoked()?, number, now, DEFAULT_CRL_DAYS)?;
        layout::replace(&self.layout.crl(), &pem, Mode::Public)?;
        self.index.crl_number = number;
        self.save_index()?;
        Ok(number)
    }

    fn save_index(&self) -> Result<(), CertsError> {
        layout::replace(&self.layout.index(), &self.index.to_json(), Mode::Public)
    }
}

fn write_leaf(cert: &Path, key: &Path, issued: &IssuedCert) -> Result<(), CertsError> {
    layout::write_new(key, &issued.key_pem, Mode::Secret)?;
    layout::write_new(cert, &issued.cert_pem, Mode::Public)
}

fn entry(
    layout: &Layout,
    kind: CertKind,
    role: Option<Role>,
    id: &str,
    cert: &Path,
    issued: &IssuedCert,
) -> IndexEntry {
    IndexEntry {
        serial: issued.serial.to_hex(),
        kind,
        role,
        id: id.to_owned(),
        cert: layout.relative(cert),
        not_before: rfc3339(issued.validity.not_before()),
        not_after: rfc3339(issued.validity.not_after()),
        revoked_at: None,
        reason: None,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use vitalmq_policies::TrustDomain;

    use super::*;
    use crate::fleet::device_id;

    #[test]
    fn init_issue_revoke_round_trip_on_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("pki");
        let td = TrustDomain::new("demo.vitalmq").expect("td");
        let mut plan = FleetPlan::new(td, 3, 2);
        plan.es256.insert(device_id(2));
        let now = OffsetDateTime::now_utc();
        let summary = Pki::init(&root, &plan, now).expect("init");
        assert_eq!(
            summary,
            InitSummary {
                devices: 3,
                es256_devices: 1,
                sites: 2,
                identities: 3 + 2 + 2 + 3
            }
        );
        assert!(Pki::init(&root, &plan, now).is_err(), "second init refused");

        let mut pki = Pki::open(&root).expect("open");
        assert_eq!(pki.index().crl_number, 1);
        assert_eq!(pki.index().certs.len(), 1 + 10);
        let req = IssueRequest {
            role: Role::Device,
            id: PrincipalId::new("dev-00100").expect("id"),
            site: Some(SiteId::new("site-02").expect("site")),
            validity: Validity::days_from(now, 1),
            device_alg: Algorithm::Es256,
        };
        let issued = pki.issue(&req).expect("issue");
        assert!(matches!(
            pki.issue(&req),
            Err(CertsError::AlreadyIssued { .. })
        ));
        let registry = DeviceRegistry::load(&pki.layout().registry()).expect("registry");
        let dev = registry
            .device(&DeviceId::new("dev-00100").expect("id"))
            .expect("registered");
        assert_eq!(dev.key.algorithm(), Algorithm::Es256);
        let cose = pki.layout().cose_key(&req.id);
        let key = vitalmq_envelope::SigningKey::from_pkcs8_pem(&layout::read(&cose).expect("read"))
            .expect("pem");
        assert_eq!(key.verifying_key(), dev.key);
        let mode = std::fs::metadata(&cose).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let registry_mode = std::fs::metadata(pki.layout().registry())
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(
            registry_mode, 0o600,
            "patient pseudonyms and consent: owner only"
        );

        let no_site = IssueRequest {
            site: None,
            id: PrincipalId::new("gw-x").expect("id"),
            role: Role::Gateway,
            ..req.clone()
        };
        assert!(matches!(
            pki.issue(&no_site),
            Err(CertsError::SiteRequired(Role::Gateway))
        ));

        let target = Target::Identity {
            role: Role::Device,
            id: req.id.clone(),
        };
        let revoked = pki
            .revoke(&target, Reason::KeyCompromise, now)
            .expect("revoke");
        assert_eq!(revoked.serial, issued.serial);
        let reopened = Pki::open(&root).expect("reopen");
        assert_eq!(reopened.index().crl_number, 2);
        assert_eq!(reopened.index().revoked().expect("revoked").len(), 1);
    }
}
