//! Any byte stream, from either side, through the gate's frame filter: no panic, and the
//! buffered bytes never exceed one maximum-size packet (no unbounded memory).
#![no_main]

use std::path::Path;
use std::sync::{Arc, LazyLock};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use vitalmq_audit::AuditRecord;
use vitalmq_broker::authz::{Authorizer, PolicyAuthorizer};
use vitalmq_broker::gate::{AuditSink, AuditUnavailable, GateSession, Output, Unlimited};
use vitalmq_broker::identity::{IdentitySource, PeerIdentity};
use vitalmq_envelope::{DeviceId, SigningKey};
use vitalmq_policies::{AclPolicy, DeviceEntry, DeviceRegistry, PrincipalId, Role, SiteId, SpiffeId, TrustDomain};

#[derive(Debug)]
struct Discard;

impl AuditSink for Discard {
    fn record(&self, _record: AuditRecord) -> Result<(), AuditUnavailable> {
        Ok(())
    }
}

/// The largest packet the gate buffers: the biggest role payload plus header room.
const MAX_BUFFERED: usize = (1 << 20) + 66_000 + 5;

static SETUP: LazyLock<(Arc<dyn Authorizer>, PeerIdentity)> = LazyLock::new(|| {
    let td = TrustDomain::new("demo.vitalmq").expect("constant trust domain");
    let acl = AclPolicy::parse(include_str!("../../policies/examples/acl.toml"), Path::new("acl.toml"))
        .expect("the shipped ACL is valid");
    let mut registry = DeviceRegistry::new(td.clone());
    registry
        .insert_device(DeviceEntry {
            id: DeviceId::new("dev-00001").expect("constant id"),
            site: SiteId::new("site-01").expect("constant site"),
            patient_ref: "pt-1".into(),
            key: SigningKey::from_private_bytes(vitalmq_envelope::Algorithm::EdDsa, &[7u8; 32])
                .expect("constant key")
                .verifying_key(),
            consent: None,
            processing_policy: None,
            lot: None,
            hardware_model: None,
            region: None,
        })
        .expect("one device");
    let authz: Arc<dyn Authorizer> = Arc::new(PolicyAuthorizer::new(Arc::new(acl), Arc::new(registry)));
    let peer = PeerIdentity {
        spiffe: SpiffeId::new(td, Role::Device, PrincipalId::new("dev-00001").expect("constant id")),
        source: IdentitySource::SanUri,
        serial_hex: "01".into(),
        fingerprint_sha256_hex: "00".repeat(32),
        not_after: time::OffsetDateTime::UNIX_EPOCH,
    };
    (authz, peer)
});

fuzz_target!(|data: &[u8]| {
    let (authz, peer) = &*SETUP;
    let mut session =
        GateSession::new(peer.clone(), "fuzz", Arc::clone(authz), Arc::new(Discard), Arc::new(Unlimited), "pw".into());
    // The first byte picks the chunk size; chunks go to the client side, except every
    // third, which is what the broker sends back.
    let Some((&shape, rest)) = data.split_first() else { return };
    let chunk = usize::from(shape % 64) + 1;
    let (mut from_client, mut from_broker) = (BytesMut::new(), BytesMut::new());
    let mut out: Vec<Output> = Vec::new();
    for (i, piece) in rest.chunks(chunk).enumerate() {
        if i % 3 == 2 {
            from_broker.extend_from_slice(piece);
            session.on_broker_bytes(&mut from_broker, &mut out);
        } else {
            from_client.extend_from_slice(piece);
            session.on_client_bytes(&mut from_client, &mut out);
        }
        assert!(from_client.len() <= MAX_BUFFERED && from_broker.len() <= MAX_BUFFERED);
        if session.is_closed() {
            return;
        }
        out.clear();
    }
});
