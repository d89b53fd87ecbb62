//! Simulated wearables and the gateways that relay them (issue 6).
//!
//! * [`runner`] runs N simulated devices (`vitalmq sim`): each a [`device::SimDevice`]
//!   (epoch, sequence, signing, [`vitals`], the bounded [`ring`] outbox, [`receipt`]s)
//!   inside a [`link::DeviceLink`] that keeps it connected over mTLS (`vitalmq_mqtt_client`) and
//!   resends whatever no receipt covers yet (SPEC section 4).
//! * [`gateway`] is `vitalmq sim --via-gateway`: one connection per site, with the
//!   site's gateway identity, relays the signed messages of the devices at that site and
//!   routes their receipts back to each device's outbox.
//! * `connection` is the one reconnecting connection both of them use (backoff,
//!   connect and subscribe deadlines, the in-flight window).
//! * [`pki`] reads the identities of a PKI made by `vitalmq certs init`.
//! * [`faults`] injects the faults a trustworthy ingest path must refuse or survive
//!   (`--fault`); `clock` is the device clock, optionally faster than real time
//!   (`--time-scale`) or skewed; [`duration`] parses the durations of the options.
//! * [`alarms`] scripts device alarm episodes (`--alarm-episode`), [`battery`] is the
//!   charge `status` reports, [`modes`] the silent (`--silent-after`) and forged-only
//!   (`--forged-only`) devices (issue 17).
//!
//! The benchmark drivers (`vitalmq loadgen`, the load mode of `vitalmq sim`) are in
//! `vitalmq-loadgen`, which uses this crate; this crate does not know them. Load mode
//! reaches in only through [`runner::Spread`]: a start offset per device, paced first
//! connections, and a [`link::SendObserver`] per device.
//!
//! Layering: `ring`, `vitals`, `alarms`, `battery`, `modes`, `receipt`, `epoch`, `device`,
//! `clock` and `faults` do no
//! network I/O and read no clock (time is an argument), so they are tested directly;
//! `connection`, `link`, `gateway` (apart from its routing and planning) and `runner`
//! are the async shell around them.
#![forbid(unsafe_code)]

pub mod alarms;
pub mod battery;
mod clock;
mod connection;
pub mod device;
pub mod duration;
pub mod epoch;
pub mod faults;
pub mod gateway;
pub mod link;
pub mod modes;
pub mod pki;
pub mod receipt;
pub mod ring;
pub mod runner;
pub mod vitals;
