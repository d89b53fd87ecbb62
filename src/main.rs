//! `vitalmq`: one binary, a subcommand per component.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

mod admin_cmd;
mod audit_cmd;
mod backup_cmd;
mod bridge_cmd;
mod broker_cmd;
mod demo_cmd;
mod envelope_cmd;
mod erase_cmd;
mod export_cmd;
mod fhir_cmd;
mod hold_cmd;
mod keys_cmd;
mod loadgen_cmd;
mod log_format;
mod models_cmd;
mod objects_cmd;
mod operator_audit;
mod registry_cmd;
mod reid_cmd;
mod retention_cmd;
mod sim_cmd;
mod stop;
mod surveil_cmd;
mod trace_cmd;

#[derive(Debug, Parser)]
#[command(
    name = "vitalmq",
    version,
    about = "Trustworthy MQTT ingest for medical-device telemetry"
)]
struct Cli {
    /// Log lines: `text`, or `json` (one JSON object per line, with the structured
    /// fields as keys) for log shippers.
    #[arg(long, global = true, value_enum, default_value_t = log_format::LogFormat::Text)]
    log_format: log_format::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The admin API: patient-linked reads and governance changes over mutual TLS.
    #[command(subcommand)]
    Admin(admin_cmd::AdminCommand),
    /// Check audit logs.
    #[command(subcommand)]
    Audit(audit_cmd::AuditCommand),
    /// Run the bridge: verify, sequence-check, store and forward device telemetry.
    Bridge(bridge_cmd::BridgeArgs),
    /// Run the broker: the mTLS identity gate and topic ACLs in front of rumqttd.
    Broker(broker_cmd::BrokerArgs),
    /// The dev/test PKI: CA, identity certificates, CRLs, device keys, registry.
    #[command(subcommand)]
    Certs(vitalmq_certs::cli::CertsCommand),
    /// Run the system on an embedded default and show it working.
    Demo(demo_cmd::DemoArgs),
    /// Erase one patient by crypto-shredding: destroy their data keys, scrub legacy
    /// plaintext rows (refused under legal hold or while assigned; audited).
    Erase(erase_cmd::EraseArgs),
    /// Verify or inspect signed telemetry (COSE_Sign1) for debugging devices.
    #[command(subcommand)]
    Envelope(envelope_cmd::EnvelopeCommand),
    /// Export one patient's data (events, raw messages, alerts, provenance) with a
    /// manifest of hashes (GDPR access and portability; audited).
    Export(export_cmd::ExportArgs),
    /// FHIR R4: export a patient's or device's data as a Bundle, re-verify the device
    /// signatures a Bundle's Provenance carries (docs/fhir.md).
    #[command(subcommand)]
    Fhir(fhir_cmd::FhirCommand),
    /// Legal holds: place, lift and list them (audited); held records are never
    /// deleted, anonymised, archived or erased.
    #[command(subcommand)]
    Hold(hold_cmd::HoldCommand),
    /// Encryption at rest: key file, data-key and KEK rotation, keyring status (audited).
    #[command(subcommand)]
    Keys(keys_cmd::KeysCommand),
    /// The re-identification store: enrol patients, re-identify pseudonyms (audited).
    #[command(subcommand)]
    Reid(reid_cmd::ReidCommand),
    /// Sealed telemetry objects: open one for an operator (audited).
    #[command(subcommand)]
    Objects(objects_cmd::ObjectsCommand),
    /// Enforce the retention classes once (the bridge runs this on a schedule).
    #[command(subcommand)]
    Retention(retention_cmd::RetentionCommand),
    /// Read a bridge's store: stats, events, quarantine, gaps (JSON lines); back it up
    /// and restore it.
    #[command(subcommand)]
    Store(bridge_cmd::StoreCommand),
    /// Change device assignments in a registry file: assign, unassign, retire (audited).
    #[command(subcommand)]
    Registry(registry_cmd::RegistryCommand),
    /// The model registry: check a models file, the rollout in force, compare two
    /// versions of a score over a period (docs/models.md).
    #[command(subcommand)]
    Models(models_cmd::ModelsCommand),
    /// Load generator: throughput, latency, losses and reconnect storms over mTLS.
    Loadgen(loadgen_cmd::LoadgenArgs),
    /// The provenance chain of an alert or event, from the local records.
    Trace(trace_cmd::TraceArgs),
    /// Surveillance questions over a local store: rates by firmware, model, lot,
    /// region, hardware model and week; outliers; drift (PSI). Audited.
    #[command(subcommand_required = true)]
    Surveil(surveil_cmd::SurveilArgs),
    /// Simulated wearables: signed vitals over mTLS, kept until a receipt covers them.
    Sim(sim_cmd::SimArgs),
}

/// `vitalmq certs ...`, recorded in the operator audit log (see `operator_audit`).
fn certs(cmd: vitalmq_certs::cli::CertsCommand) -> anyhow::Result<std::process::ExitCode> {
    let what = cmd.describe();
    let layout = vitalmq_certs::Layout::new(&what.dir);
    // Nothing to act on, nothing to audit: do not create a directory tree (or an audit
    // log in someone else's directory) for a typo.
    if what.action == "certs.init" {
        anyhow::ensure!(
            vitalmq_certs::layout::is_absent_or_empty(&what.dir)?,
            "{}: directory exists and is not empty; refusing to overwrite a PKI",
            what.dir.display()
        );
    } else if !layout.index().exists() {
        anyhow::bail!(
            "{}: no PKI here (made by `certs init`?)",
            what.dir.display()
        );
    }
    operator_audit::Action::new(
        what.action,
        operator_audit::log_path(layout.operator_audit()),
    )
    .resource(what.resource)
    .detail("dir", crate::operator_audit::absolute(&what.dir))
    .run(|| Ok(((), cmd.run()?)))?;
    Ok(std::process::ExitCode::SUCCESS)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Everything the components write may be patient-linked (store, objects, audit
    // logs, device state): owner-only, including files made by libraries that take the
    // umask's default (SQLite's -wal/-shm, object_store's local files). `certs` sets
    // its files' modes itself: certificates and the registry are meant to be shared.
    if !matches!(cli.command, Command::Certs(_)) {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(
            vitalmq_private_fs::UMASK,
        ));
    }
    // The demo logs to a file in its work directory; everything else to stderr.
    if !matches!(cli.command, Command::Demo(_)) {
        log_format::init_stderr(cli.log_format);
    }
    // With `--log-format json` stderr holds JSON lines only, the final error too (the
    // demo's log is its file, so its error stays a line for the terminal).
    let json_stderr =
        cli.log_format == log_format::LogFormat::Json && !matches!(cli.command, Command::Demo(_));
    let result = match cli.command {
        Command::Admin(cmd) => cmd.run(),
        Command::Certs(cmd) => certs(cmd),
        Command::Envelope(cmd) => cmd.run(),
        Command::Erase(args) => erase_cmd::run(args),
        Command::Export(args) => export_cmd::run(args),
        Command::Fhir(cmd) => cmd.run(),
        Command::Demo(args) => demo_cmd::run(args, cli.log_format),
        Command::Bridge(args) => bridge_cmd::run(args),
        Command::Broker(args) => broker_cmd::run(args, cli.log_format),
        Command::Hold(cmd) => cmd.run(),
        Command::Reid(cmd) => cmd.run(),
        Command::Keys(cmd) => cmd.run(),
        Command::Retention(cmd) => cmd.run(),
        Command::Store(cmd) => cmd.run(),
        Command::Objects(cmd) => cmd.run(),
        Command::Audit(cmd) => cmd.run(),
        Command::Loadgen(args) => loadgen_cmd::run(args),
        Command::Registry(cmd) => cmd.run(),
        Command::Models(cmd) => cmd.run(),
        Command::Sim(args) => sim_cmd::run(args),
        Command::Surveil(args) => surveil_cmd::run(args),
        Command::Trace(args) => trace_cmd::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if json_stderr {
                tracing::error!(error = format!("{e:#}"), "vitalmq failed");
            } else {
                eprintln!("error: {e:#}");
            }
            std::process::ExitCode::from(2)
        }
    }
}
