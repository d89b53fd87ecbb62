//! Comparing a local log with the segments shipped from it to object storage, so a log
//! cut (or edited) on the host after its records were shipped is caught.
//!
//! The bridge ships a log in segments named `{first:020}-{last:020}.jsonl` by the seqs
//! of their first and last records, each a byte-for-byte copy of those lines of the log
//! (`bridge/src/audit_ship.rs`). So every shipped line must still be in the local log
//! at its seq, unchanged, and the local log must reach at least the last shipped seq.

use std::io::BufRead;
use std::path::{Path, PathBuf};

/// One shipped segment: its file and the seqs its name says it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShippedSegment {
    pub path: PathBuf,
    pub first: u64,
    pub last: u64,
}

impl ShippedSegment {
    /// The segment at `path`, if its file name is `{first}-{last}.jsonl`.
    pub fn from_path(path: &Path) -> Option<Self> {
        let stem = path.file_name()?.to_str()?.strip_suffix(".jsonl")?;
        let (first, last) = stem.split_once('-')?;
        let (first, last) = (first.parse().ok()?, last.parse().ok()?);
        (first <= last).then(|| Self {
            path: path.to_path_buf(),
            first,
            last,
        })
    }
}

/// What the comparison found when local and shipped records agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShippedReport {
    pub segments: usize,
    /// First and last shipped seq.
    pub first: u64,
    pub last: u64,
    /// Seq of the last local record.
    pub local_last: Option<u64>,
}

/// Where the local log and the shipped segments disagree.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShippedError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no shipped segments ({{first}}-{{last}}.jsonl) found")]
    NoSegments,
    #[error(
        "shipped segments are not contiguous: {before} ends at seq {end}, {after} starts at seq {start}"
    )]
    NotContiguous {
        before: PathBuf,
        end: u64,
        after: PathBuf,
        start: u64,
    },
    #[error("{path}: holds {found} records, its name says {expected}")]
    Mislabelled {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error(
        "{path}, line {line}: shipped record seq {seq} differs from the local log's record {seq}"
    )]
    Differs {
        path: PathBuf,
        line: usize,
        seq: u64,
    },
    #[error(
        "the local log ends {}, but records up to seq {shipped_last} were shipped: it was cut after shipping",
        local_last.map_or_else(|| "before its first record".to_owned(), |s| format!("at seq {s}"))
    )]
    Truncated {
        local_last: Option<u64>,
        shipped_last: u64,
    },
}

/// Compares `local` (a whole log, from seq 0) with `segments`, in any order.
pub fn compare_shipped(
    local: impl BufRead,
    segments: &mut [ShippedSegment],
) -> Result<ShippedReport, ShippedError> {
    segments.sort_by_key(|s| s.first);
    let (Some(head), Some(tail)) = (segments.first(), segments.last()) else {
        return Err(ShippedError::NoSegments);
    };
    let (first, last) = (head.first, tail.last);
    for pair in segments.windows(2) {
        if pair[0].last.checked_add(1) != Some(pair[1].first) {
            return Err(ShippedError::NotContiguous {
                before: pair[0].path.clone(),
                end: pair[0].last,
                after: pair[1].path.clone(),
                start: pair[1].first,
            });
        }
    }
    let mut local_lines = local.lines();
    let mut local_last: Option<u64> = None;
    let mut next_local = |local_last: &mut Option<u64>| -> Result<Option<String>, ShippedError> {
        match local_lines.next() {
            None => Ok(None),
            Some(Err(source)) => Err(ShippedError::Io {
                path: PathBuf::from("local log"),
                source,
            }),
            Some(Ok(line)) => {
                *local_last = Some(local_last.map_or(0, |s| s + 1));
                Ok(Some(line))
            }
        }
    };
    // Local records before the first shipped one (older segments may have expired).
    for _ in 0..first {
        if next_local(&mut local_last)?.is_none() {
            return Err(ShippedError::Truncated {
                local_last,
                shipped_last: last,
            });
        }
    }
    for segment in segments.iter() {
        let io = |source| ShippedError::Io {
            path: segment.path.clone(),
            source,
        };
        let file = std::fs::File::open(&segment.path).map_err(io)?;
        let mut found = 0u64;
        for (i, shipped) in std::io::BufReader::new(file).lines().enumerate() {
            let shipped = shipped.map_err(io)?;
            let seq = segment.first + found;
            found += 1;
            if seq > segment.last {
                continue;
            }
            let Some(local) = next_local(&mut local_last)? else {
                return Err(ShippedError::Truncated {
                    local_last,
                    shipped_last: last,
                });
            };
            if local != shipped {
                return Err(ShippedError::Differs {
                    path: segment.path.clone(),
                    line: i + 1,
                    seq,
                });
            }
        }
        let expected = segment.last - segment.first + 1;
        if found != expected {
            return Err(ShippedError::Mislabelled {
                path: segment.path.clone(),
                expected,
                found,
            });
        }
    }
    while next_local(&mut local_last)?.is_some() {}
    Ok(ShippedReport {
        segments: segments.len(),
        first,
        last,
        local_last,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `lines` of a fake log as segments split after the given line counts.
    fn ship(dir: &Path, lines: &[String], sizes: &[usize]) -> Vec<ShippedSegment> {
        let mut at = 0;
        sizes
            .iter()
            .map(|&n| {
                let (first, last) = (at as u64, (at + n - 1) as u64);
                let path = dir.join(format!("{first:020}-{last:020}.jsonl"));
                std::fs::write(&path, lines[at..at + n].join("\n") + "\n").expect("write");
                at += n;
                ShippedSegment::from_path(&path).expect("name")
            })
            .collect()
    }

    #[test]
    fn a_log_cut_or_changed_after_shipping_is_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lines: Vec<String> = (0..10).map(|i| format!("{{\"seq\":{i}}}")).collect();
        let mut segments = ship(dir.path(), &lines, &[4, 3]);
        let local = |n: usize| lines[..n].join("\n") + "\n";

        let report = compare_shipped(local(10).as_bytes(), &mut segments).expect("agree");
        assert_eq!(
            (report.first, report.last, report.local_last),
            (0, 6, Some(9))
        );
        // Cut after shipping, even at a record boundary.
        assert!(matches!(
            compare_shipped(local(6).as_bytes(), &mut segments),
            Err(ShippedError::Truncated {
                local_last: Some(5),
                shipped_last: 6
            })
        ));
        // A shipped record changed locally.
        let mut edited = lines.clone();
        edited[5] = "{\"seq\":5,\"x\":1}".into();
        assert!(matches!(
            compare_shipped((edited.join("\n") + "\n").as_bytes(), &mut segments),
            Err(ShippedError::Differs {
                seq: 5,
                line: 2,
                ..
            })
        ));
        // A missing segment is a hole, not a shorter history.
        let mut holed = vec![segments[0].clone(), segments[1].clone()];
        holed[1].first += 1;
        assert!(matches!(
            compare_shipped(local(10).as_bytes(), &mut holed),
            Err(ShippedError::NotContiguous { .. })
        ));
        assert!(ShippedSegment::from_path(Path::new("notes.jsonl")).is_none());
    }
}
