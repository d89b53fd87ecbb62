//! `vitalmq`: one binary, a subcommand per component.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

mod audit_cmd;
mod bridge_cmd;
mod broker_cmd;
mod demo_cmd;
mod envelope_cmd;
mod loadgen_cmd;
mod sim_cmd;
mod stop;
mod trace_cmd;

#[derive(Debug, Parser)]
#[command(
    name = "vitalmq",
    version,
    about = "Trustworthy MQTT ingest for medical-device telemetry"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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
    /// Verify or inspect signed telemetry (COSE_Sign1) for debugging devices.
    #[command(subcommand)]
    Envelope(envelope_cmd::EnvelopeCommand),
    /// Read a bridge's store: stats, events, quarantine, gaps (JSON lines).
    #[command(subcommand)]
    Store(bridge_cmd::StoreCommand),
    /// Load generator: throughput, latency, losses and reconnect storms over mTLS.
    Loadgen(loadgen_cmd::LoadgenArgs),
    /// The provenance chain of an alert or event, from the local records.
    Trace(trace_cmd::TraceArgs),
    /// Simulated wearables: signed vitals over mTLS, kept until a receipt covers them.
    Sim(sim_cmd::SimArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The demo logs to a file in its work directory; everything else to stderr.
    if !matches!(cli.command, Command::Demo(_)) {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            )
            .with_writer(std::io::stderr)
            .init();
    }
    let result = match cli.command {
        Command::Certs(cmd) => cmd.run().map(|()| std::process::ExitCode::SUCCESS),
        Command::Envelope(cmd) => cmd.run(),
        Command::Demo(args) => demo_cmd::run(args),
        Command::Bridge(args) => bridge_cmd::run(args),
        Command::Broker(args) => broker_cmd::run(args),
        Command::Store(cmd) => cmd.run(),
        Command::Audit(cmd) => cmd.run(),
        Command::Loadgen(args) => loadgen_cmd::run(args),
        Command::Sim(args) => sim_cmd::run(args),
        Command::Trace(args) => trace_cmd::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
