//! MQTT over mTLS with rumqttc: the bridge's connection to its broker, and the upstream
//! sink's connection to a cloud broker.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::BrokerLink;

/// A rustls client configuration presenting `link`'s certificate and trusting its CA.
pub fn tls_config(link: &BrokerLink) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(&link.ca).with_context(|| format!("{}", link.ca.display()))?
    {
        roots
            .add(cert.with_context(|| format!("{}", link.ca.display()))?)
            .with_context(|| format!("{}: CA certificate", link.ca.display()))?;
    }
    let chain = CertificateDer::pem_file_iter(&link.cert)
        .with_context(|| format!("{}", link.cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}", link.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&link.key)
        .with_context(|| format!("{}", link.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .with_context(|| format!("{}: client certificate and key", link.cert.display()))?;
    Ok(Arc::new(config))
}

/// Splits `host:port`.
pub fn host_port(address: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) = address
        .rsplit_once(':')
        .with_context(|| format!("{address:?}: expected host:port"))?;
    let port = port
        .parse()
        .with_context(|| format!("{address:?}: bad port"))?;
    Ok((host.trim_matches(['[', ']']).to_owned(), port))
}

/// MQTT 3.1.1 options for a persistent session (clean session off) over mTLS.
/// `manual_acks`: the caller acknowledges each incoming PUBLISH itself, after it is
/// durable.
pub fn options(
    link: &BrokerLink,
    client_id: &str,
    manual_acks: bool,
) -> anyhow::Result<rumqttc::MqttOptions> {
    let (host, port) = host_port(&link.address)?;
    let tls = tls_config(link)?;
    let mut o = rumqttc::MqttOptions::new(client_id, host, port);
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ))
    .set_keep_alive(Duration::from_secs(link.keepalive_s.max(5)))
    .set_clean_session(false)
    .set_manual_acks(manual_acks)
    .set_inflight(1000)
    .set_max_packet_size(1 << 20, 1 << 20);
    Ok(o)
}

/// A client and its event loop for `options`, with Nagle's algorithm off. rumqttc
/// leaves it on and flushes every acknowledgement on its own, so without this each
/// PUBACK can wait for the broker's delayed TCP ACK, and with rumqttd's fixed window of
/// 100 unacknowledged messages per subscriber that wait caps the bridge's throughput.
pub fn client(
    options: rumqttc::MqttOptions,
    capacity: usize,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, capacity);
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    (client, eventloop)
}
