//! `vitalmq fhir export|verify`: FHIR R4 out of a store, and the offline re-check of
//! what a FHIR consumer received (mapping: the `vitalmq-fhir` crate, `docs/fhir.md`).

mod export;
mod verify;

use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum FhirCommand {
    /// Export one patient's (or one device's) readings and clinical alert changes over
    /// a time range as a FHIR R4 transaction Bundle (and NDJSON per resource type);
    /// patient-linked, so recorded in the operator audit log.
    Export(export::ExportArgs),
    /// Re-verify every device signature a Provenance (or a Bundle) carries against the
    /// device registry, offline, and check the Observations say what was signed.
    Verify(verify::VerifyArgs),
}

impl FhirCommand {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            Self::Export(args) => export::run(args),
            Self::Verify(args) => verify::run(&args),
        }
    }
}
