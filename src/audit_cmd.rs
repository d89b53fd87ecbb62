//! `vitalmq audit verify FILE`: checks an audit log's hash chain and names the first
//! record where an edit, deletion, insertion or reordering broke it.

use std::io::BufReader;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Verify the hash chain of an audit log (exit 1 when it is broken).
    Verify {
        /// The audit log (JSON lines), e.g. data/broker/audit.jsonl.
        file: PathBuf,
    },
}

impl AuditCommand {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            Self::Verify { file } => {
                let reader = BufReader::new(
                    std::fs::File::open(&file)
                        .with_context(|| format!("opening {}", file.display()))?,
                );
                match vitalmq_audit::verify_chain(reader) {
                    Ok(n) => {
                        println!("{}: chain intact, {n} records", file.display());
                        Ok(ExitCode::SUCCESS)
                    }
                    Err(e) => {
                        println!("{}: chain broken at {e}", file.display());
                        Ok(ExitCode::from(1))
                    }
                }
            }
        }
    }
}
