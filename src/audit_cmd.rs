//! `vitalmq audit verify FILE...`: checks an audit log's hash chain and signed
//! checkpoints and names the first record where an edit, deletion, insertion or
//! reordering broke them. Several files are read as one log, in the order given (the
//! segments shipped to cloud storage, for example); `--segment` accepts records that
//! start in the middle of a chain.
//!
//! Records after the last signed checkpoint are reported as unsigned and fail the check
//! unless `--allow-unsigned-tail` is given: without a signature, a record there can be
//! edited with the chain recomputed, or cut off, without a trace. `--shipped DIR`
//! compares the log with the segments shipped from it, which catches a log cut or
//! edited after shipping.

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
      --trusted-key <hex>
  # a live log (records since the last checkpoint are not signed yet), and against
  # what was shipped from it:
  vitalmq audit verify data/broker/audit.jsonl --trusted-key <hex> --allow-unsigned-tail \\
      --shipped objects/audit/retention=audit-7y/component=broker")]
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
        /// Accept records after the last signed checkpoint (a live log: the broker signs
        /// every `checkpoint_interval_s`). They are still listed as unsigned; nothing
        /// vouches for them, so they may have been edited or cut.
        #[arg(long)]
        allow_unsigned_tail: bool,
        /// Directory of the segments shipped from this log (searched recursively for
        /// `{first}-{last}.jsonl`, e.g. `objects/audit/retention=audit-7y/component=broker`):
        /// every shipped record must still be in the log, unchanged.
        #[arg(long, value_name = "DIR", conflicts_with = "segment")]
        shipped: Option<PathBuf>,
    },
}

/// What `verify` accepts beyond an intact, fully signed log.
#[derive(Debug, Clone, Copy, Default)]
struct Options {
    segment: bool,
    allow_unsigned_tail: bool,
}

impl AuditCommand {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            Self::Verify {
                files,
                trusted_keys,
                segment,
                allow_unsigned_tail,
                shipped,
            } => {
                let options = Options {
                    segment,
                    allow_unsigned_tail,
                };
                let snapshot = Snapshot::take(&files)?;
                let code = verify(&snapshot, &trusted_keys, options)?;
                match shipped {
                    Some(dir) if code == ExitCode::SUCCESS => compare_shipped(&snapshot, &dir),
                    _ => Ok(code),
                }
            }
        }
    }
}

/// The files as they were when verification started, so the chain pass, the
/// checkpoint pass and the shipped comparison read the same records while a live log
/// grows: each file up to its length then, the last one up to its last complete line
/// (the writer may be half-way through one).
struct Snapshot {
    files: Vec<(PathBuf, u64)>,
    /// Bytes after the last complete line of the last file.
    partial: u64,
}

impl Snapshot {
    fn take(files: &[PathBuf]) -> anyhow::Result<Self> {
        let mut taken = Vec::with_capacity(files.len());
        for f in files {
            let len = std::fs::metadata(f)
                .with_context(|| format!("opening {}", f.display()))?
                .len();
            taken.push((f.clone(), len));
        }
        let mut partial = 0;
        if let Some((last, len)) = taken.last_mut() {
            let complete =
                complete_len(last, *len).with_context(|| format!("reading {}", last.display()))?;
            partial = *len - complete;
            *len = complete;
        }
        Ok(Self {
            files: taken,
            partial,
        })
    }

    /// The files joined as one reader.
    fn open(&self) -> anyhow::Result<BufReader<Box<dyn Read>>> {
        let mut reader: Box<dyn Read> = Box::new(std::io::empty());
        for (f, len) in &self.files {
            let file =
                std::fs::File::open(f).with_context(|| format!("opening {}", f.display()))?;
            reader = Box::new(reader.chain(file.take(*len)));
        }
        Ok(BufReader::new(reader))
    }
}

/// The length of `path`'s first `len` bytes up to and including their last newline.
fn complete_len(path: &std::path::Path, len: u64) -> std::io::Result<u64> {
    use std::io::{Seek as _, SeekFrom};
    const CHUNK: u64 = 64 * 1024;
    let mut file = std::fs::File::open(path)?;
    let mut end = len;
    let mut buf = Vec::new();
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        file.seek(SeekFrom::Start(start))?;
        buf.clear();
        (&mut file).take(end - start).read_to_end(&mut buf)?;
        if let Some(i) = buf.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// `--shipped DIR`: the log (already verified) against the segments shipped from it.
fn compare_shipped(snapshot: &Snapshot, dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    let mut segments = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if let Some(segment) = vitalmq_audit::ShippedSegment::from_path(&path) {
                segments.push(segment);
            }
        }
    }
    match vitalmq_audit::compare_shipped(snapshot.open()?, &mut segments) {
        Ok(r) => {
            println!(
                "  shipped: {} segments, records {}..={}, all in the local log unchanged",
                r.segments, r.first, r.last
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("  shipped ({}): {e}", dir.display());
            Ok(ExitCode::from(1))
        }
    }
}

fn verify(
    snapshot: &Snapshot,
    trusted_keys: &[String],
    options: Options,
) -> anyhow::Result<ExitCode> {
    let Options {
        segment,
        allow_unsigned_tail,
    } = options;
    let files: Vec<PathBuf> = snapshot.files.iter().map(|(f, _)| f.clone()).collect();
    let open = || snapshot.open();
    // Lines per file, to name the file and its own line when several are joined.
    let mut lines = Vec::with_capacity(files.len());
    if files.len() > 1 {
        for (f, len) in &snapshot.files {
            let file =
                std::fs::File::open(f).with_context(|| format!("opening {}", f.display()))?;
            lines.push(BufReader::new(file.take(*len)).lines().count());
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
    let report = match vitalmq_audit::verify_checkpoints(open()?, trusted_keys) {
        Ok(r) => r,
        Err(e) => {
            if files.len() > 1 {
                println!("  checkpoint broken in {}: {e}", place(e.line()));
            } else {
                println!("  checkpoint broken at {e}");
            }
            return Ok(ExitCode::from(1));
        }
    };
    let trust = if trusted_keys.is_empty() {
        "key not checked against a trusted one (--trusted-key)"
    } else {
        "trusted key"
    };
    match report.last_covered_seq {
        None => println!("  no signed checkpoints"),
        Some(covered) => println!(
            "  {} signed checkpoints, the last covering record {covered}; signed by {} ({trust})",
            report.checkpoints,
            report.keys.join(", ")
        ),
    }
    // Records after the last checkpoint (which is itself the record after the one it
    // covers) have no signature: all of them when there is no checkpoint.
    let unsigned_from = report
        .last_covered_seq
        .map_or(report.last_seq.map(|last| last + 1 - n), |covered| {
            Some(covered + 2)
        });
    let unsigned = match (unsigned_from, report.last_seq) {
        (Some(from), Some(last)) if last >= from => Some((from, last)),
        _ => None,
    };
    if report.checkpoints == 0 && !trusted_keys.is_empty() && n > 0 {
        println!("  nothing is signed by a trusted key");
        return Ok(ExitCode::from(1));
    }
    if snapshot.partial > 0 {
        println!(
            "  UNSIGNED: an incomplete last line ({} bytes) was not checked: a record being \
             written, or one cut",
            snapshot.partial
        );
    }
    if let Some((from, last)) = unsigned {
        println!(
            "  UNSIGNED: {} records after the last signed checkpoint (seq {from}..={last}); \
             nothing vouches for them: they may have been edited or cut",
            last - from + 1
        );
    }
    if unsigned.is_some() || snapshot.partial > 0 {
        if !allow_unsigned_tail {
            println!(
                "  refused (a live log gets a checkpoint every checkpoint_interval_s: verify \
                 again after it, or accept the tail with --allow-unsigned-tail)"
            );
            return Ok(ExitCode::from(1));
        }
        println!("  unsigned tail accepted (--allow-unsigned-tail)");
    }
    Ok(ExitCode::SUCCESS)
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

    const WHOLE: Options = Options {
        segment: false,
        allow_unsigned_tail: false,
    };
    const SEGMENT: Options = Options {
        segment: true,
        allow_unsigned_tail: false,
    };

    fn verify(files: &[PathBuf], trusted: &[String], options: Options) -> anyhow::Result<ExitCode> {
        super::verify(&Snapshot::take(files)?, trusted, options)
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

        assert_eq!(code(verify(&files, trusted, WHOLE).expect("runs")), ok);
        // A later segment alone is not a whole log, but verifies as a segment.
        assert_eq!(
            code(verify(&files[1..2], trusted, WHOLE).expect("runs")),
            failed
        );
        assert_eq!(
            code(verify(&files[1..2], trusted, SEGMENT).expect("runs")),
            ok
        );
        assert_eq!(
            code(verify(&files[1..], trusted, SEGMENT).expect("runs")),
            ok
        );
        // Out of order, a hole, or another key: refused.
        let swapped = vec![files[1].clone(), files[0].clone()];
        assert_eq!(
            code(verify(&swapped, trusted, SEGMENT).expect("runs")),
            failed
        );
        let hole = vec![files[0].clone(), files[2].clone()];
        assert_eq!(code(verify(&hole, trusted, WHOLE).expect("runs")), failed);
        let other = "00".repeat(32);
        assert_eq!(
            code(verify(&files[1..2], &[other], SEGMENT).expect("runs")),
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
            code(verify(&[tail], &[key], SEGMENT).expect("runs")),
            code(ExitCode::from(1))
        );
    }
}
