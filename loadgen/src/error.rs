//! The one error type of the benchmark drivers.

use vitalmq_device_sim::pki::PkiError;
use vitalmq_mqtt_client::SessionError;

/// Why a benchmark could not run (or finish).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The options ask for something impossible.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// A client did not connect, or lost its connection, or its request was not taken.
    #[error("{who}: {source}")]
    Session { who: String, source: SessionError },
    /// A wait ran out.
    #[error("{0}")]
    Timeout(String),
    /// The broker refused a subscription.
    #[error("subscription to {0} refused")]
    Refused(String),
    #[error("histogram: {0}")]
    Histogram(#[from] hdrhistogram::CreationError),
    #[error("probe: {0}")]
    Io(#[from] std::io::Error),
    #[error("server name: {0}")]
    ServerName(#[from] rustls_pki_types::InvalidDnsNameError),
    #[error(transparent)]
    Sim(#[from] vitalmq_device_sim::runner::RunError),
    #[error(transparent)]
    Plan(#[from] vitalmq_device_sim::gateway::PlanError),
    #[error("site `{0}` has no integrator in the registry to watch its alerts")]
    NoIntegrator(String),
    #[error("signing for {device}: {source}")]
    Sign {
        device: String,
        source: vitalmq_envelope::KeyError,
    },
    #[error("device id {device}: {source}")]
    DeviceId {
        device: String,
        source: vitalmq_envelope::InvalidDeviceId,
    },
    /// The signature reference measured something broken.
    #[error("{0}")]
    Reference(String),
    #[error("task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl Error {
    /// `who`'s session failed.
    pub(crate) fn session(who: impl Into<String>, source: impl Into<SessionError>) -> Self {
        Self::Session {
            who: who.into(),
            source: source.into(),
        }
    }
}
