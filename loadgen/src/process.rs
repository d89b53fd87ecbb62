//! CPU and memory of this and other processes, from Linux `/proc`, for the reports.

use std::io::Read as _;
use std::path::PathBuf;
use std::sync::OnceLock;

use serde::Serialize;

/// CPU time (user + system, seconds) and RSS (KiB) of a process.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct ProcSample {
    pub cpu_s: f64,
    pub rss_kib: u64,
}

fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Samples `/proc/PID` (`None` for this process).
pub fn proc_sample(pid: Option<u32>) -> Option<ProcSample> {
    let base = match pid {
        Some(p) => PathBuf::from(format!("/proc/{p}")),
        None => PathBuf::from("/proc/self"),
    };
    let mut stat = String::new();
    std::fs::File::open(base.join("stat"))
        .ok()?
        .read_to_string(&mut stat)
        .ok()?;
    // Fields after the command name (which may contain spaces) start at field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let rss_kib = status_kib(&base, "VmRSS:").unwrap_or(0);
    Some(ProcSample {
        cpu_s: (utime + stime) / clock_ticks(),
        rss_kib,
    })
}

/// This process's peak resident set (`VmHWM`), KiB.
pub fn rss_peak_kib() -> Option<u64> {
    status_kib(&PathBuf::from("/proc/self"), "VmHWM:")
}

/// A `kB` field of `/proc/.../status`.
fn status_kib(base: &std::path::Path, field: &str) -> Option<u64> {
    std::fs::read_to_string(base.join("status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The 1-minute load average.
pub(crate) fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(-1.0)
}
