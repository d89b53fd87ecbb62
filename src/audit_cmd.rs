//! `vitalmq audit verify FILE...`: checks an audit log's hash chain and signed
//! checkpoints and names the first record where an edit, deletion, insertion or
//! reordering broke them. Several files are read as one log, in the order given (the
//! segments shipped to cloud storage, for example); `--segment` accepts records that
//! start in the middle of a chain.

use std::io::{BufRead as _, BufReader, Read};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use vitalmq_audit::Start;

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Verify the hash chain and the signed checkpoints of an audit log (exit 1 when
    /// either is broken, or a checkpoint is signed by a key not given as trusted).
    #[command(after_long_help = "\
Examples:
  vitalmq audit verify data/broker/audit.jsonl --trusted-key <hex>
  # shipped segments, joined in order from the first:
  vitalmq audit verify objects/audit/retention=audit-7y/component=broker/date=*/*.jsonl
  # one shipped segment on its own (it must end with a signed checkpoint):
  vitalmq audit verify --segment objects/audit/.../00000000000000000100-00000000000000000199.jsonl \\
      --trusted-key <hex>")]
    Verify {
        /// The audit log (JSON lines), e.g. data/broker/audit.jsonl; several files are
        /// checked as one log, in the order given.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Public key (hex, from `audit-signing.key.pem.pub`) whose checkpoints to accept;
        /// repeat for several. Without it, checkpoints are checked against the key they name.
        #[arg(long = "trusted-key")]
        trusted_keys: Vec<String>,
        /// The records may start in the middle of a chain (a shipped segment): the first
        /// record's seq and link are taken as given, and every record must then be
        /// covered by a signed checkpoint, the only thing that vouches for them.
        #[arg(long)]
        segment: bool,
    },
}

impl AuditCommand {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            Self::Verify {
                files,
                trusted_keys,
                segment,
            } => verify(&files, &trusted_keys, segment),
        }
    }
}

fn verify(files: &[PathBuf], trusted_keys: &[String], segment: bool) -> anyhow::Result<ExitCode> {
    let open = || -> anyhow::Result<BufReader<Box<dyn Read>>> {
        let mut reader: Box<dyn Read> = Box::new(std::io::empty());
        for f in files {
            let file =
                std::fs::File::open(f).with_context(|| format!("opening {}", f.display()))?;
            reader = Box::new(reader.chain(file));
        }
        Ok(BufReader::new(reader))
    };
    // Lines per file, to name the file and its own line when several are joined.
    let mut lines = Vec::with_capacity(files.len());
    if files.len() > 1 {
        for f in files {
            let file =
                std::fs::File::open(f).with_context(|| format!("opening {}", f.display()))?;
            lines.push(BufReader::new(file).lines().count());
        }
    }
    let place = |line: usize| -> String {
        let mut before = 0;
        for (f, n) in files.iter().zip(&lines) {
            if line <= before + n {
                return format!("{}, line {}", f.display(), line - before);
            }
            before += n;
        }
        format!("{}", files[0].display())
    };
    let name = if files.len() == 1 {
        files[0].display().to_string()
    } else {
        format!("{} files", files.len())
    };
    let start = if segment {
        Start::Segment
    } else {
        Start::Genesis
    };
    let n = match vitalmq_audit::verify_chain_from(open()?, start) {
        Ok(n) => n,
        Err(e) => {
            if files.len() > 1 {
                println!("{name}: chain broken in {}: {e}", place(e.line()));
            } else {
                println!("{name}: chain broken at {e}");
            }
            return Ok(ExitCode::from(1));
        }
    };
    println!("{name}: chain intact, {n} records");
    match vitalmq_audit::verify_checkpoints(open()?, trusted_keys) {
        Ok(r) if r.checkpoints == 0 => {
            println!("  no signed checkpoints");
            Ok(if trusted_keys.is_empty() && !segment {
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
            let covered = r.last_covered_seq.unwrap_or(0);
            println!(
                "  {} signed checkpoints, the last covering record {covered}; signed by {} ({trust})",
                r.checkpoints,
                r.keys.join(", ")
            );
            // The last checkpoint is itself the record after the one it covers.
            let unsigned = r
                .last_seq
                .map_or(0, |last| last.saturating_sub(covered + 1));
            if segment && unsigned > 0 {
                println!(
                    "  {unsigned} records after the last checkpoint are not vouched for by any signature"
                );
                return Ok(ExitCode::from(1));
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if files.len() > 1 {
                println!("  checkpoint broken in {}: {e}", place(e.line()));
            } else {
                println!("  checkpoint broken at {e}");
            }
            Ok(ExitCode::from(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use vitalmq_audit::{AuditLog, AuditRecord, CheckpointKey, Component, Event};

    use super::*;

    /// A closed, signed log of `records` records, split into files at its checkpoints
    /// (each file ends with one, as shipped segments do), and the signing key.
    fn shipped_segments(dir: &Path, records: u64) -> (Vec<PathBuf>, String) {
        let log_path = dir.join("audit.jsonl");
        let key =
            CheckpointKey::load_or_create(&dir.join("key.pem"), Component::Broker).expect("key");
        let public = key.public_hex();
        let log = AuditLog::open_signed(&log_path, 4096, Some(key)).expect("open");
        let auditor = log.auditor();
        for i in 0..records {
            auditor
                .record(
                    AuditRecord::new(Component::Broker, Event::ConnectionRefused).detail("i", i),
                )
                .expect("record");
        }
        log.close().expect("close");
        let text = std::fs::read_to_string(&log_path).expect("read");
        let mut files = Vec::new();
        let mut current = String::new();
        for line in text.lines() {
            current.push_str(line);
            current.push('\n');
            if line.contains("\"event\":\"checkpoint\"") {
                let f = dir.join(format!("segment-{}.jsonl", files.len()));
                std::fs::write(&f, std::mem::take(&mut current)).expect("write");
                files.push(f);
            }
        }
        assert!(current.is_empty(), "a closed log ends with a checkpoint");
        (files, public)
    }

    fn code(c: ExitCode) -> String {
        format!("{c:?}")
    }

    #[test]
    fn shipped_segments_verify_joined_in_order_or_alone_with_segment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (files, key) = shipped_segments(dir.path(), 2_500);
        assert!(files.len() >= 3, "{files:?}");
        let trusted = std::slice::from_ref(&key);
        let ok = code(ExitCode::SUCCESS);
        let failed = code(ExitCode::from(1));

        assert_eq!(code(verify(&files, trusted, false).expect("runs")), ok);
        // A later segment alone is not a whole log, but verifies as a segment.
        assert_eq!(
            code(verify(&files[1..2], trusted, false).expect("runs")),
            failed
        );
        assert_eq!(code(verify(&files[1..2], trusted, true).expect("runs")), ok);
        assert_eq!(code(verify(&files[1..], trusted, true).expect("runs")), ok);
        // Out of order, a hole, or another key: refused.
        let swapped = vec![files[1].clone(), files[0].clone()];
        assert_eq!(code(verify(&swapped, trusted, true).expect("runs")), failed);
        let hole = vec![files[0].clone(), files[2].clone()];
        assert_eq!(code(verify(&hole, trusted, false).expect("runs")), failed);
        let other = "00".repeat(32);
        assert_eq!(
            code(verify(&files[1..2], &[other], true).expect("runs")),
            failed
        );
    }

    #[test]
    fn a_segment_whose_tail_no_checkpoint_covers_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (files, key) = shipped_segments(dir.path(), 1_500);
        // The records of segment 1 without its closing checkpoint.
        let text = std::fs::read_to_string(&files[1]).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        let tail = dir.path().join("tail.jsonl");
        std::fs::write(&tail, lines[..lines.len() - 1].join("\n") + "\n").expect("write");
        assert_eq!(
            code(verify(&[tail], &[key], true).expect("runs")),
            code(ExitCode::from(1))
        );
    }
}
