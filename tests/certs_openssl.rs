//! `vitalmq certs` checked against OpenSSL: every certificate chains to the CA, the
//! SANs are exactly the SPIFFE URIs (and localhost/127.0.0.1 for the broker), keys are
//! private, the registry matches the COSE keys, and revocation and expiry are seen by
//! `openssl verify`.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Ran, run, temp_dir};
use vitalmq_envelope::{Algorithm, DeviceId, SigningKey};
use vitalmq_policies::{DeviceRegistry, PrincipalId};

const TIMEOUT: Duration = Duration::from_secs(60);
const OPENSSL: &str = "/usr/bin/openssl";

fn vitalmq(args: &[&str]) -> Ran {
    run(
        Command::new(env!("CARGO_BIN_EXE_vitalmq")).args(args),
        TIMEOUT,
    )
}

fn openssl(args: &[&str]) -> Ran {
    run(Command::new(OPENSSL).args(args), TIMEOUT)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// `openssl verify` of `cert` against the CA, optionally with the CRL.
fn verify(dir: &Path, cert: &Path, crl: bool) -> Ran {
    let ca = dir.join("ca/ca.pem");
    let crl_path = dir.join("crl.pem");
    let mut args = vec!["verify"];
    if crl {
        args.extend(["-crl_check", "-CRLfile", s(&crl_path)]);
    }
    args.extend(["-CAfile", s(&ca), s(cert)]);
    openssl(&args)
}

/// The serial as `openssl x509 -serial` prints it, without the `serial=` prefix.
fn serial_of(cert: &Path) -> String {
    let ran = openssl(&["x509", "-in", s(cert), "-noout", "-serial"]);
    assert!(ran.success, "{}", ran.all());
    ran.stdout
        .trim()
        .strip_prefix("serial=")
        .unwrap_or_else(|| panic!("unexpected output {:?}", ran.stdout))
        .to_owned()
}

fn san_of(cert: &Path) -> String {
    let ran = openssl(&["x509", "-in", s(cert), "-noout", "-ext", "subjectAltName"]);
    assert!(ran.success, "{}", ran.all());
    ran.stdout
}

fn all_certs(dir: &Path) -> Vec<PathBuf> {
    let mut certs = vec![dir.join("broker/server.pem")];
    for role in std::fs::read_dir(dir.join("identities")).expect("identities dir") {
        for file in std::fs::read_dir(role.expect("entry").path()).expect("role dir") {
            let path = file.expect("entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".pem") && !name.ends_with(".key.pem") {
                certs.push(path);
            }
        }
    }
    certs.sort();
    certs
}

fn key_files(dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.to_string_lossy().ends_with(".key.pem") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out
}

#[test]
fn certs_init_issue_revoke_against_openssl() {
    assert!(
        Path::new(OPENSSL).exists(),
        "this test needs {OPENSSL} (apt-get install openssl)"
    );
    let tmp = temp_dir("vitalmq-certs-openssl");
    let dir = tmp.path().join("pki");
    let d = s(&dir);

    // --- init ---
    let ran = vitalmq(&[
        "certs",
        "init",
        "--dir",
        d,
        "--trust-domain",
        "demo.vitalmq",
        "--devices",
        "4",
        "--sites",
        "2",
        "--es256",
        "dev-00002",
    ]);
    assert!(ran.success, "init failed: {}", ran.all());
    assert!(
        ran.stdout.contains("registry.toml"),
        "summary: {}",
        ran.stdout
    );

    // Every certificate chains to the CA: server + 4 devices + 2 gateways + 2 integrators
    // + bridge and its alert publisher + operator.
    let certs = all_certs(&dir);
    assert_eq!(certs.len(), 1 + 4 + 2 + 2 + 2 + 1, "{certs:?}");
    for cert in &certs {
        let ran = verify(&dir, cert, false);
        assert!(ran.success, "{}: {}", cert.display(), ran.all());
        assert!(ran.stdout.contains(": OK"), "{}", ran.all());
        // The initial (empty) CRL is valid and revokes nothing.
        let ran = verify(&dir, cert, true);
        assert!(ran.success, "with CRL {}: {}", cert.display(), ran.all());
    }

    // SANs: exactly one SPIFFE URI per identity; localhost and 127.0.0.1 for the broker.
    for (rel, uri) in [
        (
            "identities/device/dev-00002.pem",
            "spiffe://demo.vitalmq/device/dev-00002",
        ),
        (
            "identities/gateway/gw-site-02.pem",
            "spiffe://demo.vitalmq/gateway/gw-site-02",
        ),
        (
            "identities/integrator/int-site-01.pem",
            "spiffe://demo.vitalmq/integrator/int-site-01",
        ),
        (
            "identities/bridge/bridge-01.pem",
            "spiffe://demo.vitalmq/bridge/bridge-01",
        ),
        (
            "identities/operator/ops-01.pem",
            "spiffe://demo.vitalmq/operator/ops-01",
        ),
    ] {
        let san = san_of(&dir.join(rel));
        let names: Vec<&str> = san
            .lines()
            .skip(1)
            .flat_map(|l| l.split(','))
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .collect();
        assert_eq!(names, [format!("URI:{uri}")], "{rel}: {san}");
        let subject = openssl(&[
            "x509",
            "-in",
            s(&dir.join(rel)),
            "-noout",
            "-subject",
            "-ext",
            "extendedKeyUsage",
        ]);
        let id = uri.rsplit('/').next().expect("id");
        assert!(
            subject.stdout.contains(&format!("CN = {id}")),
            "{}",
            subject.stdout
        );
        assert!(
            subject.stdout.contains("TLS Web Client Authentication"),
            "{}",
            subject.stdout
        );
    }
    let server_san = san_of(&dir.join("broker/server.pem"));
    assert!(server_san.contains("DNS:localhost"), "{server_san}");
    assert!(server_san.contains("IP Address:127.0.0.1"), "{server_san}");
    let eku = openssl(&[
        "x509",
        "-in",
        s(&dir.join("broker/server.pem")),
        "-noout",
        "-ext",
        "extendedKeyUsage",
    ]);
    assert!(
        eku.stdout.contains("TLS Web Server Authentication"),
        "{}",
        eku.stdout
    );

    // Private keys: mode 0600, and OpenSSL reads every one (COSE keys included).
    // CA, broker, 11 identities, 4 COSE keys, and the operator audit log's checkpoint
    // key (audit/audit-signing.key.pem).
    let keys = key_files(&dir);
    assert_eq!(keys.len(), 1 + 1 + 11 + 4 + 1, "{keys:?}");
    for key in &keys {
        let mode = std::fs::metadata(key).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", key.display());
        if key.parent() == Some(&dir.join("audit")) {
            // ed25519-dalek's PKCS#8 v2 (with the public key), which OpenSSL 3 does not
            // load; the audit crate reads it, and it is no part of the PKI proper.
            continue;
        }
        let ran = openssl(&["pkey", "-in", s(key), "-noout"]);
        assert!(
            ran.success,
            "openssl cannot read {}: {}",
            key.display(),
            ran.all()
        );
    }
    for public in ["ca/ca.pem", "crl.pem", "registry.toml", "ca/index.json"] {
        let mode = std::fs::metadata(dir.join(public))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o022, 0, "{public} is writable by others");
    }

    // The registry: 4 devices, dev-00002 ES256, keys match the COSE key files.
    let registry = DeviceRegistry::load(&dir.join("registry.toml")).expect("registry loads");
    assert_eq!(registry.trust_domain().as_str(), "demo.vitalmq");
    let devices: Vec<_> = registry.devices().collect();
    assert_eq!(devices.len(), 4);
    for device in devices {
        let expected = if device.id.as_str() == "dev-00002" {
            Algorithm::Es256
        } else {
            Algorithm::EdDsa
        };
        assert_eq!(device.key.algorithm(), expected, "{}", device.id);
        assert!(
            device.patient_ref.starts_with("pt-"),
            "{}",
            device.patient_ref
        );
        let pem = std::fs::read_to_string(dir.join(format!("devices/{}/cose.key.pem", device.id)))
            .expect("cose key");
        let key = SigningKey::from_pkcs8_pem(&pem).expect("COSE key parses");
        assert_eq!(key.verifying_key(), device.key, "{}", device.id);
    }
    assert_eq!(registry.gateways().count(), 2);
    assert_eq!(registry.integrators().count(), 2);

    // init never overwrites.
    let ca_before = std::fs::read(dir.join("ca/ca.pem")).expect("ca");
    let again = vitalmq(&["certs", "init", "--dir", d, "--devices", "1"]);
    assert!(!again.success, "second init must fail");
    assert!(again.stderr.contains("not empty"), "{}", again.stderr);
    assert_eq!(std::fs::read(dir.join("ca/ca.pem")).expect("ca"), ca_before);

    // --- revoke dev-00003 ---
    let revoked = dir.join("identities/device/dev-00003.pem");
    let other = dir.join("identities/device/dev-00004.pem");
    let serial = serial_of(&revoked);
    let ran = vitalmq(&[
        "certs",
        "revoke",
        "--dir",
        d,
        "--id",
        "dev-00003",
        "--role",
        "device",
        "--reason",
        "key-compromise",
    ]);
    assert!(ran.success, "revoke failed: {}", ran.all());
    let crl = openssl(&["crl", "-in", s(&dir.join("crl.pem")), "-noout", "-text"]);
    assert!(crl.success, "{}", crl.all());
    assert!(
        crl.stdout.contains(&format!("Serial Number: {serial}")),
        "CRL does not list {serial}:\n{}",
        crl.stdout
    );
    assert!(crl.stdout.contains("Key Compromise"), "{}", crl.stdout);
    assert!(
        crl.stdout
            .contains("X509v3 CRL Number: \n                2"),
        "{}",
        crl.stdout
    );
    let ran = verify(&dir, &revoked, true);
    assert!(!ran.success, "revoked cert accepted: {}", ran.all());
    assert!(ran.all().contains("certificate revoked"), "{}", ran.all());
    let ran = verify(&dir, &other, true);
    assert!(ran.success, "unrevoked cert refused: {}", ran.all());

    // Revoking twice is an error; revoking by serial works and bumps the CRL number.
    let twice = vitalmq(&["certs", "revoke", "--dir", d, "--serial", &serial]);
    assert!(
        !twice.success && twice.stderr.contains("already revoked"),
        "{}",
        twice.all()
    );
    let gw = dir.join("identities/gateway/gw-site-01.pem");
    let gw_serial = serial_of(&gw).to_lowercase();
    let ran = vitalmq(&["certs", "revoke", "--dir", d, "--serial", &gw_serial]);
    assert!(ran.success, "{}", ran.all());
    assert!(!verify(&dir, &gw, true).success, "revoked gateway accepted");
    let crl = openssl(&["crl", "-in", s(&dir.join("crl.pem")), "-noout", "-text"]);
    assert!(
        crl.stdout.contains(&format!("Serial Number: {serial}")),
        "{}",
        crl.stdout
    );
    assert!(
        crl.stdout
            .contains("X509v3 CRL Number: \n                3"),
        "{}",
        crl.stdout
    );

    // --- issue: an already expired device ---
    let ran = vitalmq(&[
        "certs",
        "issue",
        "--dir",
        d,
        "--role",
        "device",
        "--id",
        "dev-expired",
        "--site",
        "site-01",
        "--not-after",
        "2020-01-01T00:00:00Z",
    ]);
    assert!(ran.success, "issue failed: {}", ran.all());
    let expired = dir.join("identities/device/dev-expired.pem");
    let ran = verify(&dir, &expired, false);
    assert!(!ran.success, "expired cert accepted: {}", ran.all());
    assert!(
        ran.all().contains("certificate has expired"),
        "{}",
        ran.all()
    );
    assert_eq!(
        san_of(&expired).lines().nth(1).map(str::trim),
        Some("URI:spiffe://demo.vitalmq/device/dev-expired")
    );

    // ... a not-yet-valid one, and a fresh ES256 device that verifies.
    let ran = vitalmq(&[
        "certs",
        "issue",
        "--dir",
        d,
        "--role",
        "operator",
        "--id",
        "ops-future",
        "--not-before",
        "2999-01-01T00:00:00Z",
        "--days",
        "1",
    ]);
    assert!(ran.success, "{}", ran.all());
    let ran = verify(&dir, &dir.join("identities/operator/ops-future.pem"), false);
    assert!(
        ran.all().contains("certificate is not yet valid"),
        "{}",
        ran.all()
    );
    let ran = vitalmq(&[
        "certs",
        "issue",
        "--dir",
        d,
        "--role",
        "device",
        "--id",
        "dev-00100",
        "--site",
        "site-02",
        "--alg",
        "ES256",
    ]);
    assert!(ran.success, "{}", ran.all());
    assert!(verify(&dir, &dir.join("identities/device/dev-00100.pem"), true).success);
    let registry = DeviceRegistry::load(&dir.join("registry.toml")).expect("registry");
    assert_eq!(registry.devices().count(), 6);
    let new = registry
        .device(&DeviceId::new("dev-00100").expect("id"))
        .expect("registered");
    assert_eq!(new.key.algorithm(), Algorithm::Es256);
    assert_eq!(new.site.as_str(), "site-02");
    // Operators are enrolled too: the broker admits only listed ones.
    for operator in ["ops-01", "ops-future"] {
        assert!(
            registry.is_operator(&PrincipalId::new(operator).expect("id")),
            "{operator} not in the registry"
        );
    }

    // issue never replaces an identity, and site rules are enforced.
    let dup = vitalmq(&[
        "certs",
        "issue",
        "--dir",
        d,
        "--role",
        "device",
        "--id",
        "dev-00001",
        "--site",
        "site-01",
    ]);
    assert!(
        !dup.success && dup.stderr.contains("already been issued"),
        "{}",
        dup.all()
    );
    let no_site = vitalmq(&[
        "certs", "issue", "--dir", d, "--role", "gateway", "--id", "gw-x",
    ]);
    assert!(
        !no_site.success && no_site.stderr.contains("--site"),
        "{}",
        no_site.all()
    );
    let bad_role = vitalmq(&["certs", "issue", "--dir", d, "--role", "admin", "--id", "x"]);
    assert!(
        !bad_role.success && bad_role.stderr.contains("not a role"),
        "{}",
        bad_role.all()
    );
}

#[test]
fn certs_help_documents_the_layout() {
    let ran = vitalmq(&["certs", "init", "--help"]);
    assert!(ran.success, "{}", ran.all());
    for needle in [
        "ca/ca.key.pem",
        "ca/index.json",
        "identities/<role>/<id>.pem",
        "devices/<id>/cose.key.pem",
        "0600",
    ] {
        assert!(
            ran.stdout.contains(needle),
            "--help lacks {needle}:\n{}",
            ran.stdout
        );
    }
}
