//! `vitalmq certs ...`: thin argument handling over [`crate::Pki`].
//!
//! Every subcommand writes keys, certificates or CRLs, so the binary records each in
//! the operator audit log: [`CertsCommand::describe`] says what is about to happen
//! (recorded before it runs), and [`CertsCommand::run`] returns what it did (serials,
//! CRL number) for the outcome record.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};
use vitalmq_envelope::{Algorithm, DeviceId, InvalidDeviceId};
use vitalmq_policies::{IdentityError, PrincipalId, Role, SiteId, TrustDomain};

use crate::ca::{CLOCK_SKEW, Validity, rfc3339};
use crate::crl::{DEFAULT_CRL_DAYS, Reason};
use crate::fleet::FleetPlan;
use crate::index::Target;
use crate::issue::ServerName;
use crate::store::{IssueRequest, Pki};
use crate::{CertsError, Serial};

const LAYOUT_HELP: &str = "\
Files in DIR:
  ca/ca.pem                       root CA certificate (trust anchor)
  ca/ca.key.pem                   CA private key (0600)
  ca/index.json                   CA state: issued certs, revocations, CRL number
  crl.pem                         current CRL, signed by the CA
  broker/server.pem, .key.pem     broker TLS certificate (localhost, 127.0.0.1) and key
  identities/<role>/<id>.pem      identity certificate, SAN URI spiffe://<td>/<role>/<id>
  identities/<role>/<id>.key.pem  its private key (0600)
  devices/<id>/cose.key.pem       device COSE signing key, PKCS#8 (0600)
  registry.toml                   device registry (public keys, sites, patient pseudonyms)

Private keys are created with mode 0600; existing files are never overwritten.";

/// `vitalmq certs` subcommands.
#[derive(Debug, clap::Subcommand)]
#[command(after_long_help = LAYOUT_HELP)]
pub enum CertsCommand {
    /// Create a CA, broker certificate, identities for every party, device COSE keys,
    /// the registry and an empty CRL in a new directory.
    #[command(after_long_help = LAYOUT_HELP)]
    Init(InitArgs),
    /// Issue one more identity from an existing CA (devices also get a COSE key and a
    /// registry entry; gateways and integrators a site binding).
    #[command(after_long_help = LAYOUT_HELP)]
    Issue(IssueArgs),
    /// Revoke a certificate and re-sign DIR/crl.pem with the next CRL number.
    #[command(after_long_help = LAYOUT_HELP)]
    Revoke(RevokeArgs),
    /// Re-sign DIR/crl.pem (same revocations, next CRL number, fresh validity).
    Crl {
        /// The PKI directory.
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Directory to create (must be missing or empty).
    #[arg(long)]
    pub dir: PathBuf,
    /// SPIFFE trust domain of every identity.
    #[arg(long, default_value = "demo.vitalmq")]
    pub trust_domain: String,
    /// Number of devices (dev-00001, dev-00002, ...).
    #[arg(long, default_value_t = 10)]
    pub devices: u32,
    /// Number of sites (site-01, ...); devices are assigned round-robin.
    #[arg(long, default_value_t = 1)]
    pub sites: u32,
    /// Devices whose COSE key is ES256 instead of Ed25519 (comma-separated ids).
    #[arg(long, value_delimiter = ',')]
    pub es256: Vec<String>,
    /// Every K-th device (dev-0000K, dev-000(2K), ...) gets an ES256 key too.
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(1..))]
    pub es256_every: Option<u32>,
    /// Validity of the leaf certificates, in days.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
    /// Validity of the CA certificate, in days.
    #[arg(long, default_value_t = 3650)]
    pub ca_days: u32,
    /// Extra DNS names or IP addresses for the broker certificate (besides localhost
    /// and 127.0.0.1); repeatable.
    #[arg(long = "server-name")]
    pub server_names: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct IssueArgs {
    /// The PKI directory (made by `certs init`).
    #[arg(long)]
    pub dir: PathBuf,
    /// device, gateway, bridge, integrator or operator.
    #[arg(long)]
    pub role: String,
    /// The identity's id ([A-Za-z0-9][A-Za-z0-9._-]{0,63}).
    #[arg(long)]
    pub id: String,
    /// Site of a device, gateway or integrator (required for those roles).
    #[arg(long)]
    pub site: Option<String>,
    /// Validity in days (from now, or from --not-before).
    #[arg(long, default_value_t = 365)]
    pub days: u32,
    /// Start of validity, RFC 3339 (e.g. 2030-01-01T00:00:00Z for a not-yet-valid cert).
    #[arg(long, value_parser = parse_time)]
    pub not_before: Option<OffsetDateTime>,
    /// End of validity, RFC 3339 (e.g. a past time for an expired cert).
    #[arg(long, value_parser = parse_time)]
    pub not_after: Option<OffsetDateTime>,
    /// COSE algorithm of a new device's signing key.
    #[arg(long, default_value = "EdDSA")]
    pub alg: Algorithm,
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["id", "serial"])))]
pub struct RevokeArgs {
    /// The PKI directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// Id of the identity to revoke (with --role).
    #[arg(long, requires = "role")]
    pub id: Option<String>,
    /// Role of the identity to revoke (with --id).
    #[arg(long, requires = "id")]
    pub role: Option<String>,
    /// Serial number in hex (as `openssl x509 -serial` prints it).
    #[arg(long, conflicts_with_all = ["id", "role"])]
    pub serial: Option<String>,
    /// Revocation reason.
    #[arg(long, value_enum, default_value_t = Reason::Unspecified)]
    pub reason: Reason,
}

/// Why a `vitalmq certs` command failed: the argument or step, with the cause as source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// `--trust-domain`, `--role`, `--id` or `--site` is not a valid identity part.
    #[error("{arg}")]
    Identity {
        arg: &'static str,
        #[source]
        source: IdentityError,
    },
    #[error("--es256")]
    Es256(#[source] InvalidDeviceId),
    /// `--server-name`, `--not-before/--not-after` or `--serial` is refused by the PKI.
    #[error("{arg}")]
    Arg {
        arg: &'static str,
        #[source]
        source: Box<CertsError>,
    },
    #[error("pass either --id and --role, or --serial")]
    Target,
    #[error("opening the PKI in {} (made by `certs init`?)", dir.display())]
    Open {
        dir: PathBuf,
        #[source]
        source: Box<CertsError>,
    },
    #[error("creating the PKI in {}", dir.display())]
    Init {
        dir: PathBuf,
        #[source]
        source: Box<CertsError>,
    },
    #[error("issuing {role} `{id}` in {}", dir.display())]
    Issue {
        role: Role,
        id: PrincipalId,
        dir: PathBuf,
        #[source]
        source: Box<CertsError>,
    },
    #[error("revoking {target} in {}", dir.display())]
    Revoke {
        target: Target,
        dir: PathBuf,
        #[source]
        source: Box<CertsError>,
    },
    #[error("re-signing the CRL in {}", dir.display())]
    Crl {
        dir: PathBuf,
        #[source]
        source: Box<CertsError>,
    },
}

/// A `--not-before`/`--not-after` value that is not RFC 3339.
#[derive(Debug, thiserror::Error)]
#[error("not an RFC 3339 time: {0}")]
struct NotRfc3339(time::error::Parse);

fn parse_time(s: &str) -> Result<OffsetDateTime, NotRfc3339> {
    OffsetDateTime::parse(s, &Rfc3339).map_err(NotRfc3339)
}

fn identity<T>(arg: &'static str, r: Result<T, IdentityError>) -> Result<T, CliError> {
    r.map_err(|source| CliError::Identity { arg, source })
}

fn certs_arg<T>(arg: &'static str, r: Result<T, CertsError>) -> Result<T, CliError> {
    r.map_err(|source| CliError::Arg {
        arg,
        source: Box::new(source),
    })
}

/// What a certs command is about to do, for the operator audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    /// `certs.init`, `certs.issue`, `certs.revoke` or `certs.crl`.
    pub action: &'static str,
    /// The PKI directory acted on.
    pub dir: PathBuf,
    /// The identity (`<role>/<id>`) or serial (`serial:<hex>`) acted on, as given.
    pub resource: Option<String>,
}

impl CertsCommand {
    /// What this command will act on, before it runs (arguments as given, unchecked).
    pub fn describe(&self) -> Described {
        let (action, dir, resource) = match self {
            Self::Init(a) => ("certs.init", &a.dir, None),
            Self::Issue(a) => ("certs.issue", &a.dir, Some(format!("{}/{}", a.role, a.id))),
            Self::Revoke(a) => (
                "certs.revoke",
                &a.dir,
                match (&a.role, &a.id, &a.serial) {
                    (_, _, Some(serial)) => Some(format!("serial:{serial}")),
                    (Some(role), Some(id), None) => Some(format!("{role}/{id}")),
                    _ => None,
                },
            ),
            Self::Crl { dir } => ("certs.crl", dir, None),
        };
        Described {
            action,
            dir: dir.clone(),
            resource,
        }
    }

    /// Runs the command; returns what it did (no secrets): serials, identities, CRL
    /// number.
    pub fn run(self) -> Result<Map<String, Value>, CliError> {
        match self {
            Self::Init(args) => init(args),
            Self::Issue(args) => issue(args),
            Self::Revoke(args) => revoke(args),
            Self::Crl { dir } => {
                let mut pki = open(&dir)?;
                let number =
                    pki.write_crl(OffsetDateTime::now_utc())
                        .map_err(|source| CliError::Crl {
                            dir: dir.clone(),
                            source: Box::new(source),
                        })?;
                println!(
                    "wrote {} (CRL number {number}, valid {DEFAULT_CRL_DAYS} days)",
                    pki.layout().crl().display()
                );
                Ok(done([("crl_number", Value::from(number))]))
            }
        }
    }
}

fn done<const N: usize>(fields: [(&str, Value); N]) -> Map<String, Value> {
    fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

fn open(dir: &Path) -> Result<Pki, CliError> {
    Pki::open(dir).map_err(|source| CliError::Open {
        dir: dir.to_path_buf(),
        source: Box::new(source),
    })
}

fn init(args: InitArgs) -> Result<Map<String, Value>, CliError> {
    let td = identity("--trust-domain", TrustDomain::new(args.trust_domain))?;
    let mut plan = FleetPlan::new(td, args.devices, args.sites);
    plan.es256 = args
        .es256
        .iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| DeviceId::new(s.trim()).map_err(CliError::Es256))
        .collect::<Result<BTreeSet<_>, _>>()?;
    plan.es256_every = args.es256_every;
    plan.leaf_days = args.days;
    plan.ca_days = args.ca_days;
    for name in &args.server_names {
        plan.server_names
            .push(certs_arg("--server-name", ServerName::parse(name))?);
    }
    let summary = Pki::init(&args.dir, &plan, OffsetDateTime::now_utc()).map_err(|source| {
        CliError::Init {
            dir: args.dir.clone(),
            source: Box::new(source),
        }
    })?;
    let d = args.dir.display();
    println!(
        "vitalmq PKI for trust domain {} in {d}:\n  \
         CA            {d}/ca/ca.pem (key ca/ca.key.pem, state ca/index.json)\n  \
         CRL           {d}/crl.pem (empty)\n  \
         broker        {d}/broker/server.pem\n  \
         identities    {} in {d}/identities/<role>/<id>.pem: {} devices, {} gateways, {} integrators, 1 bridge, 1 operator\n  \
         device keys   {} COSE keys in {d}/devices/<id>/cose.key.pem ({} ES256, {} EdDSA)\n  \
         registry      {d}/registry.toml ({} sites)",
        plan.trust_domain,
        summary.identities,
        summary.devices,
        summary.sites,
        summary.sites,
        summary.devices,
        summary.es256_devices,
        summary.devices - summary.es256_devices,
        summary.sites,
    );
    Ok(done([
        ("trust_domain", Value::from(plan.trust_domain.to_string())),
        ("identities", Value::from(summary.identities)),
        ("devices", Value::from(summary.devices)),
        ("sites", Value::from(summary.sites)),
    ]))
}

fn issue(args: IssueArgs) -> Result<Map<String, Value>, CliError> {
    let role: Role = identity("--role", args.role.parse())?;
    let id = identity("--id", PrincipalId::new(args.id))?;
    let site = identity("--site", args.site.map(SiteId::new).transpose())?;
    let now = OffsetDateTime::now_utc();
    let days = Duration::days(i64::from(args.days.max(1)));
    let (not_before, not_after) = match (args.not_before, args.not_after) {
        (Some(nb), Some(na)) => (nb, na),
        (Some(nb), None) => (nb, nb + days),
        // A window that ends in the past must also start before it ends.
        (None, Some(na)) => ((now - CLOCK_SKEW).min(na - days), na),
        (None, None) => (now - CLOCK_SKEW, now + days),
    };
    let validity = certs_arg(
        "--not-before/--not-after",
        Validity::new(not_before, not_after),
    )?;
    let mut pki = open(&args.dir)?;
    let req = IssueRequest {
        role,
        id,
        site,
        validity,
        device_alg: args.alg,
    };
    let entry = pki.issue(&req).map_err(|source| CliError::Issue {
        role: req.role,
        id: req.id.clone(),
        dir: args.dir.clone(),
        source: Box::new(source),
    })?;
    println!(
        "issued spiffe://{}/{}/{} serial {} valid {} .. {}\n  certificate {}",
        pki.index().trust_domain,
        req.role,
        req.id,
        entry.serial,
        rfc3339(validity.not_before()),
        rfc3339(validity.not_after()),
        args.dir.join(&entry.cert).display(),
    );
    if req.role == Role::Device {
        println!(
            "  COSE key    {} ({}), added to {}",
            pki.layout().cose_key(&req.id).display(),
            req.device_alg,
            pki.layout().registry().display()
        );
    }
    Ok(done([
        (
            "identity",
            Value::from(format!(
                "spiffe://{}/{}/{}",
                pki.index().trust_domain,
                req.role,
                req.id
            )),
        ),
        ("serial", Value::from(entry.serial.clone())),
        ("not_before", Value::from(rfc3339(validity.not_before()))),
        ("not_after", Value::from(rfc3339(validity.not_after()))),
    ]))
}

fn revoke(args: RevokeArgs) -> Result<Map<String, Value>, CliError> {
    let target = match (args.id, args.role, args.serial) {
        (Some(id), Some(role), None) => Target::Identity {
            role: identity("--role", role.parse())?,
            id: identity("--id", PrincipalId::new(id))?,
        },
        (None, None, Some(serial)) => {
            Target::Serial(certs_arg("--serial", Serial::from_hex(&serial))?)
        }
        _ => return Err(CliError::Target),
    };
    let mut pki = open(&args.dir)?;
    let entry = pki
        .revoke(&target, args.reason, OffsetDateTime::now_utc())
        .map_err(|source| CliError::Revoke {
            target: target.clone(),
            dir: args.dir.clone(),
            source: Box::new(source),
        })?;
    println!(
        "revoked serial {} ({}), wrote {} (CRL number {})",
        entry.serial,
        entry.cert.display(),
        pki.layout().crl().display(),
        pki.index().crl_number
    );
    Ok(done([
        ("serial", Value::from(entry.serial.clone())),
        (
            "identity",
            Value::from(match entry.role {
                Some(role) => format!("spiffe://{}/{role}/{}", pki.index().trust_domain, entry.id),
                None => entry.id.clone(),
            }),
        ),
        (
            "reason",
            serde_json::to_value(args.reason).unwrap_or(Value::Null),
        ),
        ("crl_number", Value::from(pki.index().crl_number)),
    ]))
}
