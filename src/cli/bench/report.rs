//! What a run measured, as text or one JSON line, and how it is measured
//! (latency histograms, `/proc` CPU and RSS).

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::*;

/// Latencies are recorded in microseconds up to this bound.
pub(super) const MAX_LATENCY_US: u64 = 300_000_000;

/// What a run measured; printed as text or as one JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `online`, `burst` or `offline`.
    pub mode: &'static str,
    /// Crypto backend of this binary (`ring` or `aws-lc-rs`).
    pub backend: &'static str,
    /// Key of the signing CA (`p256`, `rsa2048`, ...; `unknown` for a remote CA without its bundle).
    pub ca_key: String,
    pub ca_source: String,
    pub csr_mix: CsrMix,
    pub auth: Option<AuthMode>,
    pub concurrency: Option<usize>,
    pub connections: Option<usize>,
    pub threads: Option<usize>,
    pub pool: PoolStats,
    pub sent: u64,
    pub issued: u64,
    /// Failures by gRPC code (online) or by stage (offline).
    pub errors: BTreeMap<String, u64>,
    pub error_total: u64,
    pub elapsed_s: f64,
    pub issued_per_s: f64,
    pub latency_ms: Latency,
    pub server: Option<ServerStats>,
    /// CPU seconds of this process during the timed phase.
    pub bench_cpu_s: f64,
    /// Offline issuance ceiling with the same CA and CSRs (online runs).
    pub ceiling_per_s: Option<f64>,
    pub ratio_to_ceiling: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PoolStats {
    pub csrs: usize,
    pub p256_keys: usize,
    pub rsa2048_keys: usize,
    pub prepare_s: f64,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerStats {
    /// `child` (measured on its own) or `in-process` (shared with the load generator).
    pub process: &'static str,
    pub pid: Option<u32>,
    pub start_to_ready_ms: f64,
    pub idle_rss_mb: f64,
    /// Peak RSS over the whole life of the process (VmHWM).
    pub peak_rss_mb: f64,
    /// CPU seconds during the timed phase.
    pub cpu_s: f64,
    pub cpu_us_per_issued: f64,
    /// Log lines the server wrote during the run (child only).
    pub log_lines: Option<u64>,
}

/// The crypto backend compiled into this binary.
pub fn backend() -> &'static str {
    if cfg!(feature = "aws-lc") {
        "aws-lc-rs"
    } else {
        "ring"
    }
}

/// Cores available to this process: the offline thread count.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Report {
    /// A few lines for people.
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let what = match self.mode {
            "offline" => format!(
                "offline issuance ceiling on {} thread(s), no gRPC/TLS",
                self.threads.unwrap_or(1)
            ),
            mode => format!(
                "{mode}, auth {}, {} concurrent over {} connection(s)",
                self.auth
                    .map_or("-".into(), |a| format!("{a:?}").to_lowercase()),
                self.concurrency.unwrap_or(0),
                self.connections.unwrap_or(0)
            ),
        };
        let _ = writeln!(
            out,
            "plugca bench: {what}\n  CA: {} ({}), crypto {}; CSRs: {:?}",
            self.ca_key, self.ca_source, self.backend, self.csr_mix
        );
        let _ = writeln!(
            out,
            "  pool: {} distinct CSRs ({} P-256 keys, {} RSA-2048 keys), prepared in {:.1} s",
            self.pool.csrs, self.pool.p256_keys, self.pool.rsa2048_keys, self.pool.prepare_s
        );
        if let Some(s) = &self.server {
            let _ = writeln!(
                out,
                "  server: {}{}, ready {:.1} ms after start, idle RSS {:.1} MB",
                s.process,
                s.pid.map_or(String::new(), |p| format!(" pid {p}")),
                s.start_to_ready_ms,
                s.idle_rss_mb
            );
        }
        let errors = if self.errors.is_empty() {
            "0 errors".to_string()
        } else {
            let parts: Vec<String> = self
                .errors
                .iter()
                .map(|(code, n)| format!("{code}: {n}"))
                .collect();
            format!("{} errors ({})", self.error_total, parts.join(", "))
        };
        let _ = writeln!(
            out,
            "  {} sent, {} issued, {errors} in {:.2} s\n  issued/s: {:.0}",
            self.sent, self.issued, self.elapsed_s, self.issued_per_s
        );
        let l = self.latency_ms;
        let _ = writeln!(
            out,
            "  latency: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            l.p50, l.p90, l.p99, l.max
        );
        if let Some(s) = &self.server {
            let shared = if s.process == "in-process" {
                " (shared with the load generator)"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "  server CPU: {:.2} s{shared} ({:.0} us per certificate), peak RSS {:.1} MB{}",
                s.cpu_s,
                s.cpu_us_per_issued,
                s.peak_rss_mb,
                s.log_lines
                    .map_or(String::new(), |n| format!(", {n} log lines"))
            );
        }
        let _ = writeln!(out, "  bench process CPU: {:.2} s", self.bench_cpu_s);
        if let (Some(c), Some(r)) = (self.ceiling_per_s, self.ratio_to_ceiling) {
            let _ = writeln!(
                out,
                "  offline ceiling (same CA and CSRs, {} threads): {c:.0}/s -> online reaches {:.0} % of it",
                cores(),
                r * 100.0
            );
        }
        out
    }
}

pub(super) fn new_histogram() -> Result<Histogram<u64>, BenchError> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
        .map_err(|e| BenchError::Setup(format!("histogram: {e}")))
}

pub(super) fn record(hist: &mut Histogram<u64>, elapsed: Duration) {
    let us = (elapsed.as_micros() as u64).clamp(1, MAX_LATENCY_US);
    let _ = hist.record(us);
}

pub(super) fn latency(hist: &Histogram<u64>) -> Latency {
    let ms = |us: u64| us as f64 / 1000.0;
    if hist.is_empty() {
        return Latency::default();
    }
    Latency {
        p50: ms(hist.value_at_quantile(0.50)),
        p90: ms(hist.value_at_quantile(0.90)),
        p99: ms(hist.value_at_quantile(0.99)),
        max: ms(hist.max()),
    }
}

pub(super) fn per_sec(n: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s > 0.0 { n as f64 / s } else { 0.0 }
}

/// User + system CPU seconds of a process (`self` or a pid), from `/proc/<p>/stat`.
pub fn proc_cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // /proc reports clock ticks of USER_HZ, which is 100 on Linux.
    Some((utime + stime) / 100.0)
}

/// A `kB` field (`VmRSS`, `VmHWM`) of `/proc/<p>/status`.
pub fn proc_status_kb(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let value = l.strip_prefix(field)?.strip_prefix(':')?;
        value.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_of_this_process_are_readable() {
        assert!(proc_cpu_secs("self").is_some());
        assert!(proc_status_kb("self", "VmHWM").unwrap() > 0);
        assert!(proc_status_kb("self", "NoSuchField").is_none());
    }
}
