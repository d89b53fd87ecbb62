//! `vitalmq audit verify FILE`: checks an audit log's hash chain and names the first
//! record where an edit, deletion, insertion or reordering broke it.

use std::io::BufReader;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Verify the hash chain and the signed checkpoints of an audit log (exit 1 when
    /// either is broken, or a checkpoint is signed by a key not given as trusted).
    Verify {
        /// The audit log (JSON lines), e.g. data/broker/audit.jsonl.
        file: PathBuf,
        /// Public key (hex, from `audit-signing.key.pem.pub`) whose checkpoints to accept;
        /// repeat for several. Without it, checkpoints are checked against the key they name.
        #[arg(long = "trusted-key")]
        trusted_keys: Vec<String>,
    },
}

impl AuditCommand {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            Self::Verify { file, trusted_keys } => {
                let open = || -> anyhow::Result<BufReader<std::fs::File>> {
                    Ok(BufReader::new(
                        std::fs::File::open(&file)
                            .with_context(|| format!("opening {}", file.display()))?,
                    ))
                };
                let n = match vitalmq_audit::verify_chain(open()?) {
                    Ok(n) => n,
                    Err(e) => {
                        println!("{}: chain broken at {e}", file.display());
                        return Ok(ExitCode::from(1));
                    }
                };
                println!("{}: chain intact, {n} records", file.display());
                match vitalmq_audit::verify_checkpoints(open()?, &trusted_keys) {
                    Ok(r) if r.checkpoints == 0 => {
                        println!("  no signed checkpoints");
                        Ok(if trusted_keys.is_empty() {
                            ExitCode::SUCCESS
                        } else {
                            ExitCode::from(1)
                        })
                    }
                    Ok(r) => {
                        let trust = if trusted_keys.is_empty() {
                            "key not checked against a trusted one (--trusted-key)"
                        } else {
                            "trusted key"
                        };
                        println!(
                            "  {} signed checkpoints, the last covering record {}; signed by {} ({trust})",
                            r.checkpoints,
                            r.last_covered_seq.unwrap_or(0),
                            r.keys.join(", ")
                        );
                        Ok(ExitCode::SUCCESS)
                    }
                    Err(e) => {
                        println!("  checkpoint broken at {e}");
                        Ok(ExitCode::from(1))
                    }
                }
            }
        }
    }
}
