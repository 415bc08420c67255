//! The offline ceiling: the server's issuance cycle without gRPC or TLS,
//! on one thread per core.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use time::OffsetDateTime;

use crate::authn::trusted_csr;
use crate::ca::CaBundle;
use crate::csr::VerifiedCsr;
use crate::identity::TrustDomain;
use crate::issuance::{self, TtlPolicy};

use super::*;

pub struct OfflineConfig {
    pub ca: CaSource,
    pub csr_mix: CsrMix,
    pub pool: usize,
    pub rsa_keys: usize,
    pub requests: u64,
    pub duration: Duration,
    pub threads: usize,
    pub trust_domain: TrustDomain,
}

/// Runs the issuance cycle in-process on `threads` threads until either bound.
pub fn run_offline(cfg: &OfflineConfig) -> Result<Report, BenchError> {
    let scratch = ScratchDir::new()?;
    let (dir, ca_source) = ca_dir(&cfg.ca, &scratch)?;
    let bundle = load_bundle(&dir)?;
    let prepared = Instant::now();
    let pool = make_pool(cfg.csr_mix, cfg.pool, cfg.rsa_keys, &cfg.trust_domain)?;
    let mut pool_stats = pool.stats;
    pool_stats.prepare_s = prepared.elapsed().as_secs_f64();
    let cpu0 = proc_cpu_secs("self");
    let run = offline_cycles(
        &bundle,
        &pool.csrs,
        &cfg.trust_domain,
        cfg.threads.max(1),
        cfg.requests,
        cfg.duration,
    )?;
    let cpu = proc_cpu_secs("self").zip(cpu0).map_or(0.0, |(b, a)| b - a);
    Ok(Report {
        mode: "offline",
        backend: backend(),
        ca_key: bundle.signer().key_kind().label(),
        ca_source,
        csr_mix: cfg.csr_mix,
        auth: None,
        concurrency: None,
        connections: None,
        threads: Some(cfg.threads.max(1)),
        pool: pool_stats,
        sent: run.issued + run.errors.values().sum::<u64>(),
        issued: run.issued,
        error_total: run.errors.values().sum(),
        errors: run.errors,
        elapsed_s: run.elapsed.as_secs_f64(),
        issued_per_s: per_sec(run.issued, run.elapsed),
        latency_ms: latency(&run.hist),
        server: None,
        bench_cpu_s: cpu,
        ceiling_per_s: None,
        ratio_to_ceiling: None,
    })
}

/// One thread's issued count, failures by stage, and latencies.
pub(super) type ThreadTally = (u64, BTreeMap<String, u64>, Histogram<u64>);

pub(super) struct CycleRun {
    pub(super) issued: u64,
    pub(super) errors: BTreeMap<String, u64>,
    pub(super) elapsed: Duration,
    pub(super) hist: Histogram<u64>,
}

/// The server's work per request, minus gRPC and TLS: parse and verify the
/// CSR, take the (lab-mode) caller, build and sign the leaf, assemble the chain.
pub(super) fn offline_cycles(
    bundle: &CaBundle,
    csrs: &[String],
    td: &TrustDomain,
    threads: usize,
    max_cycles: u64,
    max_time: Duration,
) -> Result<CycleRun, BenchError> {
    let policy = TtlPolicy {
        default_ttl: crate::duration::parse(crate::config::DEFAULT_WORKLOAD_CERT_TTL)
            .map_err(|e| BenchError::Offline(e.to_string()))?,
        max_ttl: crate::duration::parse(crate::config::MAX_WORKLOAD_CERT_TTL)
            .map_err(|e| BenchError::Offline(e.to_string()))?,
    };
    let next = AtomicU64::new(0);
    let started = Instant::now();
    let deadline = started + max_time;
    let results: Vec<Result<ThreadTally, BenchError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut hist = new_histogram()?;
                    let mut issued = 0u64;
                    let mut errors = BTreeMap::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let t = Instant::now();
                        if i >= max_cycles || t >= deadline {
                            break;
                        }
                        let csr_text = &csrs[(i % csrs.len() as u64) as usize];
                        match one_cycle(bundle, csr_text, td, &policy) {
                            Ok(chain_len) => {
                                std::hint::black_box(chain_len);
                                issued += 1;
                            }
                            Err(stage) => *errors.entry(stage.to_string()).or_insert(0) += 1,
                        }
                        record(&mut hist, t.elapsed());
                    }
                    Ok((issued, errors, hist))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(BenchError::Offline("a thread panicked".into())))
            })
            .collect()
    });
    let elapsed = started.elapsed();
    let mut run = CycleRun {
        issued: 0,
        errors: BTreeMap::new(),
        elapsed,
        hist: new_histogram()?,
    };
    for r in results {
        let (issued, errors, hist) = r?;
        run.issued += issued;
        for (k, v) in errors {
            *run.errors.entry(k).or_insert(0) += v;
        }
        let _ = run.hist.add(&hist);
    }
    Ok(run)
}

/// One issuance; the error names the stage that failed.
pub(super) fn one_cycle(
    bundle: &CaBundle,
    csr_text: &str,
    td: &TrustDomain,
    policy: &TtlPolicy,
) -> Result<usize, &'static str> {
    let csr = VerifiedCsr::parse(csr_text).map_err(|_| "csr")?;
    let caller = trusted_csr::caller_from_csr(&csr, td).map_err(|_| "identity")?;
    let issued = issuance::issue(
        bundle,
        &caller,
        &csr,
        0,
        policy,
        &issuance::LeafOverrides::NONE,
        OffsetDateTime::now_utc(),
    )
    .map_err(|_| "issue")?;
    Ok(issued.cert_chain.len())
}
