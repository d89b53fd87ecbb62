//! The TLS edge against real tokio-rustls clients on 127.0.0.1 (SPEC section 1).
//!
//! Certificates come from `vitalmq_certs` in memory (written to a tempdir only because
//! the server configuration reads files); the odd ones the dev PKI refuses to make (no
//! URI SAN, two URIs, a bad role) are signed by the same CA with rcgen directly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsConnector;
use tokio_rustls::server::TlsStream;
use vitalmq_broker::accept::{
    AcceptLimits, AcceptedPeer, Acceptor, HandshakeRefusal, verify_peer_again,
};
use vitalmq_broker::identity::IdentitySource;
use vitalmq_broker::tls::{self, TlsEdge, TlsError, TlsSettings, tls_reason};
use vitalmq_certs::{Ca, Fleet, FleetPlan, IssuedCert, Reason, Revoked, Validity};
use vitalmq_policies::{DeviceRegistry, PrincipalId, Role, SpiffeId, TrustDomain};

const WAIT: Duration = Duration::from_secs(10);

fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).expect("trust domain")
}

/// A deployment: CA, server certificate, identities and registry, plus the files.
struct Pki {
    fleet: Fleet,
    dir: tempfile::TempDir,
    now: OffsetDateTime,
}

impl Pki {
    fn new() -> Self {
        let now = OffsetDateTime::now_utc();
        let fleet = Fleet::build(&FleetPlan::new(td("demo.vitalmq"), 2, 1), now).expect("fleet");
        Self {
            fleet,
            dir: tempfile::tempdir().expect("tempdir"),
            now,
        }
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).expect("write");
        path
    }

    fn identity(&self, role: Role, id: &str) -> &IssuedCert {
        let uri = format!("spiffe://demo.vitalmq/{role}/{id}");
        &self
            .fleet
            .identities
            .iter()
            .find(|i| i.id.uri() == uri)
            .expect("identity in the fleet")
            .cert
    }

    fn issue(&self, trust_domain: &str, role: Role, id: &str, validity: Validity) -> IssuedCert {
        let spiffe = SpiffeId::new(td(trust_domain), role, PrincipalId::new(id).expect("id"));
        self.fleet
            .ca
            .issue_identity(&spiffe, validity)
            .expect("issue")
    }

    fn crl(&self, revoked: &[&IssuedCert], number: u64) -> String {
        let revoked: Vec<_> = revoked
            .iter()
            .map(|c| Revoked {
                serial: c.serial.clone(),
                revoked_at: self.now,
                reason: Reason::KeyCompromise,
            })
            .collect();
        self.fleet
            .ca
            .sign_crl(&revoked, number, self.now, 30)
            .expect("crl")
    }

    /// Settings with a CRL revoking `revoked`.
    fn settings(&self, revoked: &[&IssuedCert], crl_number: u64) -> TlsSettings {
        let mut s = TlsSettings::new(
            self.write("server.pem", &self.fleet.server.cert_pem),
            self.write("server.key.pem", &self.fleet.server.key_pem),
            vec![self.write("ca.pem", self.fleet.ca.cert_pem())],
            td("demo.vitalmq"),
        );
        let crl = self.crl(revoked, crl_number);
        s.crls = vec![self.write(&format!("crl-{crl_number}.pem"), &crl)];
        s
    }
}

/// A leaf signed by the CA of `ca`, with arbitrary URIs and CN (what the PKI won't make).
fn odd_leaf(ca: &Ca, uris: &[&str], cn: &str, now: OffsetDateTime) -> (String, String) {
    use rcgen::{
        CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose,
        SanType,
    };
    let ca_key = KeyPair::from_pem(&ca.key_pem()).expect("ca key");
    let issuer = Issuer::from_ca_cert_pem(ca.cert_pem(), ca_key).expect("issuer");
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().expect("ia5")))
        .collect();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(1);
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &issuer).expect("sign");
    (cert.pem(), key.serialize_pem())
}

struct Event {
    remote: SocketAddr,
    result: Result<(TlsStream<TcpStream>, AcceptedPeer), HandshakeRefusal>,
}

struct Server {
    addr: SocketAddr,
    events: mpsc::UnboundedReceiver<Event>,
    edge: watch::Sender<Arc<TlsEdge>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    async fn start(settings: &TlsSettings, limits: AcceptLimits) -> Self {
        Self::start_with(settings, limits, None).await
    }

    async fn start_with(
        settings: &TlsSettings,
        limits: AcceptLimits,
        registry: Option<DeviceRegistry>,
    ) -> Self {
        let edge = tls::build(settings).expect("tls config");
        let (edge_tx, edge_rx) = watch::channel(Arc::new(edge));
        let mut acceptor = Acceptor::new(edge_rx, limits);
        if let Some(registry) = registry {
            // The sender may drop: the receiver keeps the last value.
            acceptor = acceptor.with_registry(watch::channel(Arc::new(registry)).1);
        }
        let acceptor = Arc::new(acceptor);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((tcp, remote)) = listener.accept().await {
                let (acceptor, tx) = (Arc::clone(&acceptor), tx.clone());
                tokio::spawn(async move {
                    let result = acceptor.accept(tcp, remote).await;
                    let _ = tx.send(Event { remote, result });
                });
            }
        });
        Self {
            addr,
            events,
            edge: edge_tx,
            task,
        }
    }

    async fn next(&mut self) -> Event {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("an accept outcome in time")
            .expect("server running")
    }
}

fn limits() -> AcceptLimits {
    AcceptLimits {
        first_byte_timeout: Duration::from_secs(5),
        handshake_timeout: Duration::from_secs(5),
        max_concurrent_handshakes: 8,
        per_ip_per_second: 1000,
        per_ip_burst: 1000,
    }
}

fn client_config(
    ca: &Ca,
    identity: Option<(&str, &str)>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.cert_der().to_vec()))
        .expect("root");
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots);
    let config = match identity {
        Some((cert_pem, key_pem)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .expect("cert pem"),
                PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key pem"),
            )
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// Connects and handshakes; returns the client's local address and the outcome.
async fn connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> (
    SocketAddr,
    std::io::Result<tokio_rustls::client::TlsStream<TcpStream>>,
) {
    let tcp = TcpStream::connect(addr).await.expect("tcp connect");
    let local = tcp.local_addr().expect("local addr");
    let name = ServerName::try_from("localhost").expect("name");
    let result = tokio::time::timeout(WAIT, TlsConnector::from(config).connect(name, tcp))
        .await
        .expect("client handshake bounded");
    (local, result)
}

fn full(cert: &IssuedCert) -> (&str, &str) {
    (&cert.cert_pem, &cert.key_pem)
}

const BOTH: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

#[tokio::test]
async fn valid_identities_complete_the_handshake_with_the_right_identity() {
    let pki = Pki::new();
    let mut server = Server::start(&pki.settings(&[], 1), limits()).await;
    let cases = [
        (Role::Device, "dev-00001", BOTH),
        (Role::Bridge, "bridge-01", BOTH),
        (Role::Gateway, "gw-site-01", &[&rustls::version::TLS12][..]),
    ];
    for (role, id, versions) in cases {
        let cert = pki.identity(role, id);
        let config = client_config(&pki.fleet.ca, Some(full(cert)), versions);
        let (local, client) = connect(server.addr, config).await;
        client.expect("client handshake");
        let event = server.next().await;
        assert_eq!(event.remote, local);
        let (_stream, peer) = event.result.expect("accepted");
        let identity = &peer.identity;
        assert_eq!(identity.spiffe.role, role);
        assert_eq!(identity.spiffe.id.as_str(), id);
        assert_eq!(identity.spiffe.trust_domain.as_str(), "demo.vitalmq");
        assert_eq!(identity.source, IdentitySource::SanUri);
        assert_eq!(identity.serial_hex, cert.serial.to_hex());
        assert_eq!(
            identity.fingerprint_sha256_hex,
            hex::encode(Sha256::digest(&cert.cert_der))
        );
        assert_eq!(identity.not_after, cert.validity.not_after());
        assert_eq!(peer.leaf.as_ref(), cert.cert_der.as_slice());
        assert_eq!(peer.remote, local);
    }
}

/// A server key sealed under a key provider (`vitalmq keys seal-file`) serves the same
/// handshakes, and the sealed file on disk holds no plaintext key.
#[tokio::test]
async fn a_server_key_sealed_under_a_key_provider_serves_handshakes() {
    let pki = Pki::new();
    let mut settings = pki.settings(&[], 1);
    let kek = vitalmq_keyring::LocalKeyFile::create(&pki.dir.path().join("kek.json")).expect("kek");
    let sealed = pki.dir.path().join("server.key.sealed");
    vitalmq_keyring::seal_file(&kek, &settings.server_key, &sealed).expect("seal");
    let on_disk = std::fs::read_to_string(&sealed).expect("read");
    assert!(!on_disk.contains("PRIVATE KEY"), "{on_disk}");
    std::fs::remove_file(&settings.server_key).expect("remove the plaintext key");
    settings.server_key = sealed;
    let mut server = Server::start(&settings, limits()).await;
    let cert = pki.identity(Role::Device, "dev-00001");
    let config = client_config(&pki.fleet.ca, Some(full(cert)), BOTH);
    let (_local, client) = connect(server.addr, config).await;
    client.expect("client handshake");
    let (_stream, peer) = server.next().await.result.expect("accepted");
    assert_eq!(peer.identity.spiffe.id.as_str(), "dev-00001");
    // Without its KEK the sealed key is a clear configuration error, not a panic.
    std::fs::remove_file(pki.dir.path().join("kek.json")).expect("remove kek");
    let err = vitalmq_broker::tls::build(&settings).expect_err("no kek");
    assert!(err.to_string().contains("kek.json"), "{err}");
}

/// Name, client certificate and key (PEM), expected `reason()` and `detail()`.
type Case<'a> = (&'a str, Option<(&'a str, &'a str)>, &'a str, &'a str);

#[tokio::test]
async fn bad_certificates_fail_the_handshake_with_their_reason() {
    let pki = Pki::new();
    let now = pki.now;
    let day = time::Duration::days(1);
    let expired = pki.issue(
        "demo.vitalmq",
        Role::Device,
        "dev-old",
        Validity::new(now - 10 * day, now - day).expect("validity"),
    );
    let future = pki.issue(
        "demo.vitalmq",
        Role::Device,
        "dev-new",
        Validity::new(now + day, now + 10 * day).expect("validity"),
    );
    let revoked = pki.issue(
        "demo.vitalmq",
        Role::Device,
        "dev-rev",
        Validity::days_from(now, 1),
    );
    let other_domain = pki.issue(
        "other.vitalmq",
        Role::Device,
        "dev-00001",
        Validity::days_from(now, 1),
    );
    // A CA of another name, and an impostor CA with the same name as ours.
    let foreign_ca = Ca::generate(td("evil.vitalmq"), Validity::days_from(now, 2)).expect("ca");
    let impostor_ca = impostor_of(&pki.fleet.ca);
    let impostor = impostor_ca
        .issue_identity(
            &SpiffeId::parse("spiffe://demo.vitalmq/device/dev-00001").expect("id"),
            Validity::days_from(now, 1),
        )
        .expect("issue");
    let foreign = foreign_ca
        .issue_identity(
            &SpiffeId::parse("spiffe://demo.vitalmq/device/dev-00001").expect("id"),
            Validity::days_from(now, 1),
        )
        .expect("issue");
    let ca = &pki.fleet.ca;
    let no_uri = odd_leaf(ca, &[], "dev-00001", now);
    let two_uris = odd_leaf(
        ca,
        &[
            "spiffe://demo.vitalmq/device/dev-00001",
            "spiffe://demo.vitalmq/device/dev-00002",
        ],
        "dev-00001",
        now,
    );
    let bad_role = odd_leaf(ca, &["spiffe://demo.vitalmq/admin/dev-00001"], "x", now);
    let bad_id = odd_leaf(ca, &["spiffe://demo.vitalmq/device/-dev"], "x", now);

    let mut server = Server::start(&pki.settings(&[&revoked], 1), limits()).await;
    let cases: Vec<Case<'_>> = vec![
        (
            "expired",
            Some(full(&expired)),
            "tls",
            "certificate_expired",
        ),
        (
            "not yet valid",
            Some(full(&future)),
            "tls",
            "certificate_not_yet_valid",
        ),
        (
            "revoked",
            Some(full(&revoked)),
            "tls",
            "certificate_revoked",
        ),
        ("foreign CA", Some(full(&foreign)), "tls", "unknown_issuer"),
        (
            "impostor CA",
            Some(full(&impostor)),
            "tls",
            "certificate_bad_signature",
        ),
        ("no client certificate", None, "tls", "no_certificate"),
        (
            "other trust domain",
            Some(full(&other_domain)),
            "identity",
            "foreign_trust_domain",
        ),
        (
            "no URI SAN",
            Some((&no_uri.0, &no_uri.1)),
            "identity",
            "no_spiffe_uri",
        ),
        (
            "two URIs",
            Some((&two_uris.0, &two_uris.1)),
            "identity",
            "multiple_uris",
        ),
        (
            "bad role",
            Some((&bad_role.0, &bad_role.1)),
            "identity",
            "bad_role",
        ),
        ("bad id", Some((&bad_id.0, &bad_id.1)), "identity", "bad_id"),
    ];
    for (name, identity, reason, detail) in cases {
        for versions in [
            &[&rustls::version::TLS13][..],
            &[&rustls::version::TLS12][..],
        ] {
            let config = client_config(ca, identity, versions);
            let (local, client) = connect(server.addr, config).await;
            let event = server.next().await;
            assert_eq!(event.remote, local, "{name}");
            let refusal = match event.result {
                Ok((_, peer)) => panic!("{name}: accepted as {}", peer.identity.spiffe),
                Err(refusal) => refusal,
            };
            assert_eq!(
                (refusal.reason(), refusal.detail()),
                (reason, detail),
                "{name} ({versions:?}): {refusal}"
            );
            // The client never gets a usable connection: in TLS 1.2 its handshake fails,
            // in TLS 1.3 (where it finishes first) the server's alert ends the stream.
            if let Ok(mut stream) = client {
                let mut buf = [0u8; 1];
                let read = tokio::time::timeout(WAIT, stream.read(&mut buf))
                    .await
                    .expect("alert in time");
                assert!(matches!(read, Err(_) | Ok(0)), "{name}: {read:?}");
            }
        }
    }
}

#[tokio::test]
async fn cn_fallback_takes_the_role_from_the_registry() {
    let pki = Pki::new();
    let mut settings = pki.settings(&[], 1);
    settings.cn_fallback = true;
    let registry = pki.fleet.registry.clone();
    let mut server = Server::start_with(&settings, limits(), Some(registry)).await;
    let ca = &pki.fleet.ca;
    for (cn, expected) in [
        ("gw-site-01", Ok(Role::Gateway)),
        ("dev-00002", Ok(Role::Device)),
        ("nobody", Err("cn_role_unknown")),
        ("not a valid id", Err("bad_common_name")),
    ] {
        let (cert, key) = odd_leaf(ca, &[], cn, pki.now);
        let config = client_config(ca, Some((&cert, &key)), BOTH);
        let (local, _client) = connect(server.addr, config).await;
        let event = server.next().await;
        assert_eq!(event.remote, local);
        match (event.result, expected) {
            (Ok((_, peer)), Ok(role)) => {
                assert_eq!(peer.identity.spiffe.role, role, "{cn}");
                assert_eq!(peer.identity.spiffe.id.as_str(), cn);
                assert_eq!(peer.identity.source, IdentitySource::CommonName);
            }
            (Err(refusal), Err(detail)) => {
                assert_eq!(
                    (refusal.reason(), refusal.detail()),
                    ("identity", detail),
                    "{cn}"
                );
            }
            (Ok((_, peer)), Err(_)) => panic!("{cn}: accepted as {}", peer.identity.spiffe),
            (Err(refusal), Ok(_)) => panic!("{cn}: refused: {refusal}"),
        }
    }
    // A SPIFFE URI still wins over the CN when the fallback is on.
    let cert = pki.identity(Role::Bridge, "bridge-01");
    let (_, client) = connect(server.addr, client_config(ca, Some(full(cert)), BOTH)).await;
    client.expect("handshake");
    let (_, peer) = server.next().await.result.expect("accepted");
    assert_eq!(peer.identity.source, IdentitySource::SanUri);
    assert_eq!(peer.identity.spiffe.role, Role::Bridge);
}

#[tokio::test]
async fn a_silent_client_does_not_delay_a_real_one_and_is_cut_off() {
    let pki = Pki::new();
    let limits = AcceptLimits {
        first_byte_timeout: Duration::from_millis(300),
        handshake_timeout: Duration::from_millis(300),
        ..limits()
    };
    let mut server = Server::start(&pki.settings(&[], 1), limits).await;
    let mut silent = TcpStream::connect(server.addr)
        .await
        .expect("silent connect");
    let silent_local = silent.local_addr().expect("addr");
    let cert = pki.identity(Role::Device, "dev-00001");
    let (real_local, client) = connect(
        server.addr,
        client_config(&pki.fleet.ca, Some(full(cert)), BOTH),
    )
    .await;
    client.expect("real client handshake");

    // The real client is accepted while the silent one is still held...
    let first = server.next().await;
    assert_eq!(first.remote, real_local);
    assert!(first.result.is_ok());
    // ...and the silent one is then cut off by the first-byte timeout.
    let second = server.next().await;
    assert_eq!(second.remote, silent_local);
    match second.result {
        Err(refusal @ HandshakeRefusal::Silent { .. }) => assert_eq!(refusal.reason(), "silent"),
        Err(other) => panic!("expected a first-byte timeout, got {other}"),
        Ok(_) => panic!("a silent client was accepted"),
    }
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(WAIT, silent.read(&mut buf))
        .await
        .expect("the server closes the silent connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test]
async fn silent_sockets_hold_no_handshake_slot_and_are_cut_off_after_the_first_byte_timeout() {
    let pki = Pki::new();
    let limits = AcceptLimits {
        first_byte_timeout: Duration::from_millis(1_500),
        // Far beyond the test's deadline: a slot taken by a silent socket would never
        // come back in time, so the real client could not finish.
        handshake_timeout: Duration::from_secs(120),
        max_concurrent_handshakes: 4,
        ..limits()
    };
    let mut server = Server::start(&pki.settings(&[], 1), limits).await;
    let silent_count = 12;
    let mut silent = Vec::new();
    for _ in 0..silent_count {
        silent.push(
            TcpStream::connect(server.addr)
                .await
                .expect("silent connect"),
        );
    }
    let cert = pki.identity(Role::Device, "dev-00001");
    let (real_local, client) = connect(
        server.addr,
        client_config(&pki.fleet.ca, Some(full(cert)), BOTH),
    )
    .await;
    client.expect("the real client completes while the silent sockets are open");
    let mut silent_refused = 0;
    for _ in 0..=silent_count {
        let event = server.next().await;
        if event.remote == real_local {
            assert!(event.result.is_ok(), "{:?}", event.result.err());
        } else {
            assert_eq!(event.result.err().map(|r| r.reason()), Some("silent"));
            silent_refused += 1;
        }
    }
    assert_eq!(silent_refused, silent_count);
    for mut socket in silent {
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(WAIT, socket.read(&mut buf))
            .await
            .expect("the server closed the silent socket");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
}

#[tokio::test]
async fn waiting_for_a_handshake_slot_counts_against_the_timeout() {
    let pki = Pki::new();
    let limits = AcceptLimits {
        handshake_timeout: Duration::from_secs(2),
        max_concurrent_handshakes: 1,
        ..limits()
    };
    let mut server = Server::start(&pki.settings(&[], 1), limits).await;
    // The first client to start a ClientHello (one byte of it) takes the only slot;
    // the second waits for it. (A client that sends nothing takes no slot at all.)
    let mut a = TcpStream::connect(server.addr).await.expect("connect");
    a.write_all(&[0x16]).await.expect("first byte");
    let mut b = TcpStream::connect(server.addr).await.expect("connect");
    b.write_all(&[0x16]).await.expect("first byte");
    let started = std::time::Instant::now();
    for _ in 0..2 {
        let event = server.next().await;
        assert_eq!(event.result.err().map(|r| r.reason()), Some("timeout"));
    }
    // Both are cut off by their own deadline, about 2 s from now. Had the wait for the
    // slot not counted, the second would have been held for two timeouts (4 s); the
    // bound sits between the two with a wide margin for a loaded machine.
    assert!(
        started.elapsed() < Duration::from_millis(3_500),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_per_ip_rate_limit_refuses_the_connection_after_the_burst() {
    let pki = Pki::new();
    let burst = 4;
    let limits = AcceptLimits {
        first_byte_timeout: Duration::from_millis(300),
        handshake_timeout: Duration::from_millis(300),
        per_ip_per_second: 1,
        per_ip_burst: burst,
        ..limits()
    };
    let mut server = Server::start(&pki.settings(&[], 1), limits).await;
    let mut held = Vec::new();
    for _ in 0..=burst {
        held.push(TcpStream::connect(server.addr).await.expect("connect"));
    }
    let mut reasons = Vec::new();
    for _ in 0..=burst {
        reasons.push(server.next().await.result.err().map(|r| r.reason()));
    }
    // The refusal comes first (no handshake is attempted), then the held ones, which
    // sent nothing, are cut off by the first-byte timeout.
    assert_eq!(reasons[0], Some("rate_limited"), "{reasons:?}");
    assert_eq!(
        reasons
            .iter()
            .filter(|r| **r == Some("rate_limited"))
            .count(),
        1,
        "{reasons:?}"
    );
    assert_eq!(
        reasons.iter().filter(|r| **r == Some("silent")).count(),
        burst as usize,
        "{reasons:?}"
    );
}

#[tokio::test]
async fn a_live_peer_is_refused_after_its_certificate_is_revoked() {
    let pki = Pki::new();
    let settings = pki.settings(&[], 1);
    let mut server = Server::start(&settings, limits()).await;
    let cert = pki.identity(Role::Device, "dev-00002");
    let config = client_config(&pki.fleet.ca, Some(full(cert)), BOTH);
    let (_, client) = connect(server.addr, Arc::clone(&config)).await;
    let _client = client.expect("handshake");
    let (_stream, peer) = server.next().await.result.expect("accepted");

    let old = tls::build(&settings).expect("same config");
    verify_peer_again(&old.verifier, &peer, UnixTime::now()).expect("still valid");

    // Reload: a new CRL (number 2) revokes the device.
    let reloaded = tls::build(&pki.settings(&[cert], 2)).expect("reloaded config");
    let err = verify_peer_again(&reloaded.verifier, &peer, UnixTime::now()).expect_err("revoked");
    assert_eq!(tls_reason(&err), "certificate_revoked", "{err}");

    // And new handshakes use the reloaded configuration.
    server.edge.send_replace(Arc::new(reloaded));
    let (_, _client) = connect(server.addr, config).await;
    let refusal = server.next().await.result.expect_err("refused");
    assert_eq!(refusal.detail(), "certificate_revoked", "{refusal}");

    // Verification time matters too: the same peer long after its not_after.
    let later = UnixTime::since_unix_epoch(Duration::from_secs(
        u64::try_from((cert.validity.not_after() + time::Duration::days(1)).unix_timestamp())
            .expect("positive"),
    ));
    let err = verify_peer_again(&old.verifier, &peer, later).expect_err("expired");
    assert_eq!(tls_reason(&err), "certificate_expired", "{err}");
}

#[test]
fn configuration_errors_name_the_file() {
    let pki = Pki::new();
    let mut settings = pki.settings(&[], 1);
    settings.crls = vec![pki.write(
        "bad-crl.pem",
        "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
    )];
    let err = tls::build(&settings).expect_err("bad CRL");
    assert!(matches!(err, TlsError::BadFile { .. }), "{err}");
    assert!(err.to_string().contains("bad-crl.pem"), "{err}");

    let mut settings = pki.settings(&[], 1);
    settings.client_ca = vec![pki.write("empty-ca.pem", "")];
    let err = tls::build(&settings).expect_err("empty CA file");
    assert!(err.to_string().contains("empty-ca.pem"), "{err}");

    let mut settings = pki.settings(&[], 1);
    settings.server_key = pki.write(
        "wrong.key.pem",
        &pki.identity(Role::Bridge, "bridge-01").key_pem,
    );
    let err = tls::build(&settings).expect_err("key does not match");
    assert!(err.to_string().contains("wrong.key.pem"), "{err}");
}

/// Reconnect storms rely on TLS 1.3 resumption; a resumed session must carry the same
/// verified identity, and a reload (new ticket key) must force a full handshake, so a
/// certificate revoked since cannot ride an old ticket back in.
#[tokio::test]
async fn sessions_resume_with_their_identity_until_a_reload() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let pki = Pki::new();
    let settings = pki.settings(&[], 1);
    let mut server = Server::start(&settings, limits()).await;
    let cert = pki.identity(Role::Device, "dev-00001");
    let config = client_config(&pki.fleet.ca, Some(full(cert)), &[&rustls::version::TLS13]);

    let mut kinds = Vec::new();
    for round in 0..3 {
        if round == 2 {
            server
                .edge
                .send_replace(Arc::new(tls::build(&settings).expect("reloaded config")));
        }
        let (_, client) = connect(server.addr, Arc::clone(&config)).await;
        let mut client = client.expect("handshake");
        let (mut stream, peer) = server.next().await.result.expect("accepted");
        assert_eq!(
            peer.identity.spiffe.id.as_str(),
            "dev-00001",
            "round {round}"
        );
        assert_eq!(
            peer.identity.serial_hex,
            cert.serial.to_hex(),
            "round {round}"
        );
        kinds.push(client.get_ref().1.handshake_kind());
        // Let the client read past the server's session tickets.
        stream.write_all(b"x").await.expect("server write");
        stream.flush().await.expect("flush");
        let mut byte = [0u8; 1];
        tokio::time::timeout(WAIT, client.read_exact(&mut byte))
            .await
            .expect("bounded")
            .expect("read");
    }
    use rustls::HandshakeKind::{Full, Resumed};
    assert_eq!(kinds, vec![Some(Full), Some(Resumed), Some(Full)]);
}

/// A CA that copies our CA's subject name with a key of its own: a forgery that name
/// matching alone would take for ours.
fn impostor_of(ca: &Ca) -> Ca {
    use x509_parser::prelude::FromDer as _;
    let (_, ours) =
        x509_parser::certificate::X509Certificate::from_der(ca.cert_der()).expect("our CA parses");
    let mut dn = rcgen::DistinguishedName::new();
    for attr in ours.subject().iter_attributes() {
        let value = attr.as_str().expect("text attribute").to_owned();
        if attr.attr_type() == &x509_parser::oid_registry::OID_X509_COMMON_NAME {
            dn.push(rcgen::DnType::CommonName, value);
        } else if attr.attr_type() == &x509_parser::oid_registry::OID_X509_ORGANIZATION_NAME {
            dn.push(rcgen::DnType::OrganizationName, value);
        }
    }
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = dn;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params.not_before = OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = OffsetDateTime::now_utc() + time::Duration::days(2);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let cert = params.self_signed(&key).expect("self-signed");
    Ca::from_pem(td("demo.vitalmq"), &cert.pem(), &key.serialize_pem()).expect("impostor CA loads")
}
