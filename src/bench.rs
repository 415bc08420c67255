//! `plugca bench`: a load generator over the real protocol, and the offline
//! ceiling of the same issuance cycle.
//!
//! - **Online** ([`run_online`]): gRPC over TLS to one address only — a running
//!   plugca ([`Target::Remote`]) or one this process starts on `127.0.0.1:0`
//!   ([`Target::Local`]), by default as a child process of the same binary so
//!   its CPU time and RSS are read separately from `/proc/<pid>`.
//! - **Offline** ([`run_offline`]): the server's cycle without gRPC or TLS —
//!   [`VerifiedCsr::parse`], the lab-mode caller, [`issuance::issue`] — on one
//!   thread per core. That is the crypto ceiling the online number is compared to.
//!
//! Everything that is not the server's work (keys, CSRs, tokens, client
//! certificates, connections) is prepared before the clock starts. Both runs
//! stop at whichever bound comes first: request count or duration.

use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hdrhistogram::Histogram;
use serde::Serialize;
use time::OffsetDateTime;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

use crate::authn::trusted_csr;
use crate::ca::CaBundle;
use crate::ca::generate::{self, CaSpec, KeyChoice};
use crate::client::{self, Connection, CsrShape};
use crate::csr::VerifiedCsr;
use crate::identity::TrustDomain;
use crate::issuance::{self, TtlPolicy};
use crate::pb::IstioCertificateRequest;
use crate::pb::istio_certificate_service_client::IstioCertificateServiceClient;

/// Where `--addr` points by default: istiod's port on loopback.
pub const DEFAULT_ADDR: &str = "127.0.0.1:15012";
/// Issuer of the tokens a bench-started server accepts.
pub const JWT_ISSUER: &str = "https://plugca.bench";
const JWT_KID: &str = "plugca-bench";
const JWT_AUDIENCE: &str = "istio-ca";
/// Namespace of every bench identity (`spiffe://<td>/ns/bench/sa/w<i>`).
const BENCH_NAMESPACE: &str = "bench";
/// Latencies are recorded in microseconds up to this bound.
const MAX_LATENCY_US: u64 = 300_000_000;
/// The ceiling measured before an online run stops after this long or this many cycles.
const CEILING_MAX_TIME: Duration = Duration::from_secs(3);
const CEILING_MAX_CYCLES: u64 = 50_000;
/// Connections (TLS handshakes) opened at once while preparing.
const CONNECT_PARALLELISM: usize = 64;
/// How long a started server may take to answer `/ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Setup(String),
    #[error("generating the CA: {0}")]
    Generate(#[from] generate::GenerateError),
    #[error("{0}")]
    Bundle(#[from] crate::ca::BundleError),
    #[error("{dir}: holds no CA bundle (ca-cert.pem/ca-key.pem/... or tls.crt/tls.key/ca.crt)")]
    NoBundle { dir: PathBuf },
    #[error("{0}")]
    Client(#[from] client::ClientError),
    #[error("the server did not start: {0}")]
    ServerStart(String),
    #[error("offline cycle failed: {0}")]
    Offline(String),
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
}

/// CSR keys in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CsrMix {
    /// ECDSA P-256 keys, ztunnel-shaped CSRs.
    P256,
    /// RSA-2048 keys, sidecar-shaped CSRs.
    Rsa2048,
    /// Half of each, interleaved.
    Mixed,
}

/// How bench requests authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// A bearer service-account JWT per request.
    Jwt,
    /// Renewal with a client certificate (one identity per connection).
    Mtls,
    /// The CSR's SPIFFE ID, unproven (`--insecure-trust-csr-identity`).
    Lab,
}

/// Signature algorithm of the tokens minted for a bench-started server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JwtAlg {
    /// RSA-2048, what Kubernetes service-account tokens usually are.
    Rs256,
    Es256,
}

/// The server an online run talks to.
pub enum Target {
    Remote(Remote),
    Local(Local),
}

/// A plugca that is already running. Only `addr` is ever contacted.
pub struct Remote {
    pub addr: SocketAddr,
    pub root_cert_pem: String,
    pub server_name: Option<String>,
    /// Bearer token sent with every request (`--auth jwt`).
    pub token: Option<String>,
    /// Client certificate chain and key (`--auth mtls`).
    pub client_identity: Option<(String, String)>,
    /// The same bundle the server uses, to measure the offline ceiling.
    pub cacerts_dir: Option<PathBuf>,
}

/// A plugca this process starts on `127.0.0.1:0`.
pub struct Local {
    pub ca: CaSource,
    pub server: ServerMode,
    /// More `plugca serve` flags (`--max-concurrent-signs 4`, ...).
    pub server_args: Vec<String>,
    /// `RUST_LOG` of a child server. It must keep the `listening` line (target
    /// `plugca`, info); `info,plugca::audit=warn` drops the per-issuance audit lines.
    pub server_log: String,
}

/// The CA bundle a bench-started server (and the offline ceiling) signs with.
#[derive(Debug, Clone)]
pub enum CaSource {
    Dir(PathBuf),
    /// A fresh root and intermediate, both of this key type.
    Generate(KeyChoice),
}

/// How a bench-started server runs.
#[derive(Debug, Clone)]
pub enum ServerMode {
    /// `<exe> serve ...` as a child process: its CPU and RSS are its own.
    Child { exe: PathBuf },
    /// In this process: CPU and RSS are shared with the load generator.
    InProcess,
}

/// The request side of an online run.
#[derive(Debug, Clone)]
pub struct Load {
    pub csr_mix: CsrMix,
    pub auth: AuthMode,
    pub jwt_alg: JwtAlg,
    pub concurrency: usize,
    pub connections: usize,
    pub requests: u64,
    pub duration: Duration,
    /// Distinct CSRs prepared; requests cycle through them.
    pub pool: usize,
    /// Distinct RSA keys behind the RSA CSRs (generating RSA keys is slow;
    /// CSRs stay distinct through their identities).
    pub rsa_keys: usize,
    pub timeout: Duration,
    pub trust_domain: TrustDomain,
    /// Measure the offline ceiling first (needs the bundle locally).
    pub ceiling: bool,
    /// Report as a burst (every request its own CSR and identity).
    pub burst: bool,
}

pub struct OnlineConfig {
    pub target: Target,
    pub load: Load,
}

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

/// Prepares the pool, starts (or reaches) the server, connects, then sends
/// requests from `concurrency` workers until either bound.
pub async fn run_online(cfg: OnlineConfig) -> Result<Report, BenchError> {
    let load = cfg.load;
    let scratch = ScratchDir::new()?;
    let prepared = Instant::now();

    // The CA: the bundle directory the server uses, when we have it.
    let (dir, ca_source) = match &cfg.target {
        Target::Local(local) => {
            let (d, s) = ca_dir(&local.ca, &scratch)?;
            (Some(d), s)
        }
        Target::Remote(remote) => (
            remote.cacerts_dir.clone(),
            format!("remote {}", remote.addr),
        ),
    };
    let bundle = match &dir {
        Some(d) => Some(Arc::new(load_bundle(d)?)),
        None => None,
    };

    // Tokens are minted only for a server we configure; a remote one gets --token-file.
    let minter = match (&cfg.target, load.auth) {
        (Target::Local(_), AuthMode::Jwt | AuthMode::Mtls) => Some(JwtMinter::generate(
            load.jwt_alg,
            &scratch.path().join("jwks.json"),
        )?),
        _ => None,
    };
    let pool_load = load.clone();
    let pool = tokio::task::spawn_blocking(move || {
        make_pool(
            pool_load.csr_mix,
            pool_load.pool,
            pool_load.rsa_keys,
            &pool_load.trust_domain,
        )
    })
    .await
    .map_err(|e| BenchError::Setup(e.to_string()))??;
    let auth_headers = match (&cfg.target, load.auth) {
        (Target::Remote(remote), AuthMode::Jwt) => {
            let token = remote.token.as_deref().ok_or_else(|| {
                BenchError::Setup(
                    "--auth jwt against --addr needs --token-file (or use --auth lab / mtls)"
                        .into(),
                )
            })?;
            vec![bearer(token)?]
        }
        (Target::Local(_), AuthMode::Jwt) => {
            let minter = minter.as_ref().expect("minted for local JWT runs");
            let sas = pool.sas.clone();
            let minter = minter.clone();
            tokio::task::spawn_blocking(move || {
                parallel_map(sas.len(), |i| {
                    bearer(&minter.mint(BENCH_NAMESPACE, &sas[i])?)
                })
            })
            .await
            .map_err(|e| BenchError::Setup(e.to_string()))??
        }
        _ => Vec::new(),
    };

    let ceiling = match (&bundle, load.ceiling) {
        (Some(b), true) => {
            let (b, csrs, td) = (b.clone(), pool.csrs.clone(), load.trust_domain.clone());
            let cycles = load.requests.min(CEILING_MAX_CYCLES);
            let time = load.duration.min(CEILING_MAX_TIME);
            let run = tokio::task::spawn_blocking(move || {
                offline_cycles(&b, &csrs, &td, cores(), cycles, time)
            })
            .await
            .map_err(|e| BenchError::Offline(e.to_string()))??;
            Some(per_sec(run.issued, run.elapsed))
        }
        _ => None,
    };

    // The server.
    let mut server = match &cfg.target {
        Target::Local(local) => {
            let dir = dir
                .as_deref()
                .expect("a local target always has a bundle dir");
            Some(start_server(local, dir, &load, minter.as_ref()).await?)
        }
        Target::Remote(_) => None,
    };
    let (addr, root_pem, server_name, shared_identity) = match &cfg.target {
        Target::Local(_) => {
            let s = server.as_ref().expect("started above");
            (
                s.grpc,
                bundle
                    .as_ref()
                    .map(|b| b.root_bundle().to_string())
                    .unwrap_or_default(),
                None,
                None,
            )
        }
        Target::Remote(r) => (
            r.addr,
            r.root_cert_pem.clone(),
            r.server_name.clone(),
            r.client_identity.clone(),
        ),
    };
    let conn = Connection {
        addr: addr.to_string(),
        root_cert_pem: root_pem,
        server_name,
        client_identity: shared_identity,
        timeout: load.timeout,
    };
    if load.auth == AuthMode::Mtls && conn.client_identity.is_none() && minter.is_none() {
        return Err(BenchError::Setup(
            "--auth mtls against --addr needs --client-cert and --client-key".into(),
        ));
    }

    // Connections (and, for mTLS, one bootstrapped client certificate each).
    let identities = match (&minter, load.auth) {
        (Some(m), AuthMode::Mtls) => {
            bootstrap_identities(&conn, m, load.connections, &load.trust_domain).await?
        }
        _ => vec![conn.client_identity.clone(); load.connections.max(1)],
    };
    let channels = connect_all(&conn, identities).await?;
    if let Some(s) = server.as_mut() {
        s.idle_rss_kb = s.rss_kb("VmRSS");
    }
    let pool_stats = PoolStats {
        prepare_s: prepared.elapsed().as_secs_f64(),
        ..pool.stats
    };

    // The timed phase.
    let requests = Arc::new(
        pool.csrs
            .iter()
            .enumerate()
            .map(|(i, csr)| PreparedRequest {
                csr: csr.clone(),
                auth: auth_headers.get(i % auth_headers.len().max(1)).cloned(),
            })
            .collect::<Vec<_>>(),
    );
    let server_cpu0 = server.as_ref().and_then(|s| s.cpu_secs());
    let log_lines0 = server.as_ref().and_then(|s| s.log_lines());
    let bench_cpu0 = proc_cpu_secs("self");
    let run = drive(&channels, requests, &load).await;
    let bench_cpu1 = proc_cpu_secs("self");
    let server_stats = server.as_ref().map(|s| {
        let cpu = s.cpu_secs().zip(server_cpu0).map_or(0.0, |(b, a)| b - a);
        ServerStats {
            process: s.process_label(),
            pid: s.pid(),
            start_to_ready_ms: s.start_to_ready.as_secs_f64() * 1000.0,
            idle_rss_mb: s.idle_rss_kb as f64 / 1024.0,
            peak_rss_mb: s.rss_kb("VmHWM") as f64 / 1024.0,
            cpu_s: cpu,
            cpu_us_per_issued: if run.issued > 0 {
                cpu * 1e6 / run.issued as f64
            } else {
                0.0
            },
            log_lines: s.log_lines().zip(log_lines0).map(|(b, a)| b - a),
        }
    });
    drop(channels);
    if let Some(s) = server.take() {
        s.stop().await;
    }
    let issued_per_s = per_sec(run.issued, run.elapsed);
    let error_total = run.errors.values().sum();
    Ok(Report {
        mode: if load.burst { "burst" } else { "online" },
        backend: backend(),
        ca_key: bundle
            .as_ref()
            .map_or_else(|| "unknown".into(), |b| b.signer().key_kind().label()),
        ca_source,
        csr_mix: load.csr_mix,
        auth: Some(load.auth),
        concurrency: Some(load.concurrency),
        connections: Some(load.connections),
        threads: None,
        pool: pool_stats,
        sent: run.issued + error_total,
        issued: run.issued,
        errors: run.errors,
        error_total,
        elapsed_s: run.elapsed.as_secs_f64(),
        issued_per_s,
        latency_ms: latency(&run.hist),
        server: server_stats,
        bench_cpu_s: bench_cpu1.zip(bench_cpu0).map_or(0.0, |(b, a)| b - a),
        ceiling_per_s: ceiling,
        ratio_to_ceiling: ceiling.filter(|c| *c > 0.0).map(|c| issued_per_s / c),
    })
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

// ---------------------------------------------------------------------------
// Pool: keys, CSRs, identities.

struct Pool {
    csrs: Vec<String>,
    /// Service account of entry i (`w<i>`); the CSR names the same identity.
    sas: Vec<String>,
    stats: PoolStats,
}

/// `n` distinct CSRs, each naming its own identity, built on every core.
fn make_pool(mix: CsrMix, n: usize, rsa_keys: usize, td: &TrustDomain) -> Result<Pool, BenchError> {
    let n = n.max(1);
    let is_rsa = |i: usize| match mix {
        CsrMix::P256 => false,
        CsrMix::Rsa2048 => true,
        CsrMix::Mixed => i % 2 == 1,
    };
    let rsa_count = (0..n).filter(|i| is_rsa(*i)).count();
    let rsa_keys = if rsa_count == 0 {
        0
    } else {
        rsa_keys.clamp(1, rsa_count)
    };
    let rsa: Vec<rcgen::KeyPair> =
        parallel_map(rsa_keys, |_| Ok(client::workload_key(KeyChoice::Rsa2048)?))?;
    let sas: Vec<String> = (0..n).map(|i| format!("w{i}")).collect();
    let csrs = parallel_map(n, |i| {
        let id = format!("spiffe://{td}/ns/{BENCH_NAMESPACE}/sa/{}", sas[i]);
        if is_rsa(i) {
            Ok(client::build_csr(
                &rsa[i % rsa.len()],
                Some(&id),
                CsrShape::Sidecar,
            )?)
        } else {
            let key = client::workload_key(KeyChoice::P256)?;
            Ok(client::build_csr(&key, Some(&id), CsrShape::Ztunnel)?)
        }
    })?;
    Ok(Pool {
        csrs,
        sas,
        stats: PoolStats {
            csrs: n,
            p256_keys: n - rsa_count,
            rsa2048_keys: rsa_keys,
            prepare_s: 0.0,
        },
    })
}

/// `f(0..n)` on every core, results in order.
fn parallel_map<T, F>(n: usize, f: F) -> Result<Vec<T>, BenchError>
where
    T: Send,
    F: Fn(usize) -> Result<T, BenchError> + Sync,
{
    if n == 0 {
        return Ok(Vec::new());
    }
    let threads = cores().min(n);
    let chunk = n.div_ceil(threads);
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = out
            .chunks_mut(chunk)
            .enumerate()
            .map(|(c, slots)| {
                s.spawn(move || {
                    for (j, slot) in slots.iter_mut().enumerate() {
                        *slot = Some(f(c * chunk + j)?);
                    }
                    Ok::<(), BenchError>(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| BenchError::Setup("a preparation thread panicked".into()))??;
        }
        Ok::<(), BenchError>(())
    })?;
    Ok(out
        .into_iter()
        .map(|slot| slot.expect("every slot is filled when no thread failed"))
        .collect())
}

// ---------------------------------------------------------------------------
// The CA bundle.

/// The bundle directory for `source` (generated into `scratch` when asked) and a label.
fn ca_dir(source: &CaSource, scratch: &ScratchDir) -> Result<(PathBuf, String), BenchError> {
    match source {
        CaSource::Dir(d) => Ok((d.clone(), d.display().to_string())),
        CaSource::Generate(key) => {
            let dir = scratch.path().join("cacerts");
            generate_bundle(*key, &dir)?;
            Ok((dir, format!("generated {key} root and intermediate")))
        }
    }
}

/// A root and a plug-in intermediate of `key`'s type, written as Istio's cacerts files.
pub fn generate_bundle(key: KeyChoice, dir: &Path) -> Result<(), BenchError> {
    let now = OffsetDateTime::now_utc();
    let spec = |cn: &str, path_len| CaSpec {
        organization: Some("plugca bench".into()),
        common_name: Some(cn.into()),
        locality: None,
        not_before: now - time::Duration::hours(1),
        not_after: now + time::Duration::days(30),
        path_len,
        dns_sans: Vec::new(),
    };
    let (root_key, ca_key) = std::thread::scope(|s| {
        let a = s.spawn(|| generate::generate_key(key));
        let b = generate::generate_key(key);
        (a.join(), b)
    });
    let root_key =
        root_key.map_err(|_| BenchError::Setup("key generation thread panicked".into()))??;
    let root = generate::self_signed_root(&spec("bench root", None), root_key)?;
    let ca = generate::intermediate(
        &spec("bench intermediate", Some(0)),
        ca_key?,
        &root.cert_der,
        &root.key,
    )?;
    let io = |path: PathBuf| {
        move |e: std::io::Error| BenchError::Io {
            path: path.clone(),
            reason: e.to_string(),
        }
    };
    std::fs::create_dir_all(dir).map_err(io(dir.to_path_buf()))?;
    let chain = format!("{}{}", ca.cert_pem, root.cert_pem);
    for (name, text, secret) in [
        ("ca-cert.pem", ca.cert_pem.as_str(), false),
        ("ca-key.pem", ca.key.secret_pkcs8_pem().as_str(), true),
        ("cert-chain.pem", chain.as_str(), false),
        ("root-cert.pem", root.cert_pem.as_str(), false),
    ] {
        let path = dir.join(name);
        crate::fsutil::write_file(&path, text.as_bytes(), secret).map_err(io(path.clone()))?;
    }
    Ok(())
}

fn load_bundle(dir: &Path) -> Result<CaBundle, BenchError> {
    CaBundle::load_dir(dir, OffsetDateTime::now_utc())?.ok_or_else(|| BenchError::NoBundle {
        dir: dir.to_path_buf(),
    })
}

// ---------------------------------------------------------------------------
// Offline cycles.

/// One thread's issued count, failures by stage, and latencies.
type ThreadTally = (u64, BTreeMap<String, u64>, Histogram<u64>);

struct CycleRun {
    issued: u64,
    errors: BTreeMap<String, u64>,
    elapsed: Duration,
    hist: Histogram<u64>,
}

/// The server's work per request, minus gRPC and TLS: parse and verify the
/// CSR, take the (lab-mode) caller, build and sign the leaf, assemble the chain.
fn offline_cycles(
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
fn one_cycle(
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

// ---------------------------------------------------------------------------
// Online: the server, connections, workers.

/// A server started for the run.
struct StartedServer {
    grpc: SocketAddr,
    start_to_ready: Duration,
    idle_rss_kb: u64,
    kind: ServerKind,
}

enum ServerKind {
    Child {
        child: ChildGuard,
        log: Arc<LogTap>,
    },
    InProcess {
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<Result<(), crate::app::AppError>>,
    },
}

impl StartedServer {
    fn pid(&self) -> Option<u32> {
        match &self.kind {
            ServerKind::Child { child, .. } => Some(child.0.id()),
            ServerKind::InProcess { .. } => None,
        }
    }

    fn proc_key(&self) -> String {
        self.pid().map_or_else(|| "self".into(), |p| p.to_string())
    }

    fn process_label(&self) -> &'static str {
        match self.kind {
            ServerKind::Child { .. } => "child",
            ServerKind::InProcess { .. } => "in-process",
        }
    }

    fn cpu_secs(&self) -> Option<f64> {
        proc_cpu_secs(&self.proc_key())
    }

    fn rss_kb(&self, field: &str) -> u64 {
        proc_status_kb(&self.proc_key(), field).unwrap_or(0)
    }

    fn log_lines(&self) -> Option<u64> {
        match &self.kind {
            ServerKind::Child { log, .. } => Some(log.lines.load(Ordering::Relaxed)),
            ServerKind::InProcess { .. } => None,
        }
    }

    async fn stop(self) {
        match self.kind {
            ServerKind::Child { child, .. } => drop(child),
            ServerKind::InProcess { mut stop, task } => {
                if let Some(s) = stop.take() {
                    let _ = s.send(());
                }
                let _ = task.await;
            }
        }
    }
}

/// Kills the child server when the run ends, however it ends.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads the child's log: finds the listening line, then counts lines.
#[derive(Default)]
struct LogTap {
    lines: AtomicU64,
    /// The last lines, to explain a failed start.
    tail: Mutex<std::collections::VecDeque<String>>,
}

fn serve_args(dir: &Path, load: &Load, jwks: Option<&Path>, extra: &[String]) -> Vec<String> {
    let mut args: Vec<String> = [
        "serve",
        "--grpc-addr",
        "127.0.0.1:0",
        "--monitoring-addr",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--trust-domain",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(load.trust_domain.to_string());
    args.push("--cacerts-dir".into());
    args.push(dir.display().to_string());
    match (load.auth, jwks) {
        (AuthMode::Lab, _) => args.push("--insecure-trust-csr-identity".into()),
        (_, Some(jwks)) => args.extend([
            "--jwt-issuer".into(),
            JWT_ISSUER.into(),
            "--jwks-file".into(),
            jwks.display().to_string(),
        ]),
        (_, None) => {}
    }
    args.extend(extra.iter().cloned());
    args
}

async fn start_server(
    local: &Local,
    dir: &Path,
    load: &Load,
    minter: Option<&JwtMinter>,
) -> Result<StartedServer, BenchError> {
    let jwks = minter.map(|m| m.jwks_path.clone());
    let args = serve_args(dir, load, jwks.as_deref(), &local.server_args);
    let started = Instant::now();
    let (grpc, monitoring, kind) = match &local.server {
        ServerMode::Child { exe } => {
            let mut child = std::process::Command::new(exe)
                .args(&args)
                .env("RUST_LOG", &local.server_log)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| BenchError::ServerStart(format!("{}: {e}", exe.display())))?;
            let stderr = child.stderr.take().expect("stderr is piped");
            let child = ChildGuard(child);
            let log = Arc::new(LogTap::default());
            let (tx, rx) = std::sync::mpsc::channel();
            let tap = log.clone();
            std::thread::spawn(move || read_child_log(stderr, &tap, tx));
            let addrs = tokio::task::spawn_blocking(move || rx.recv_timeout(READY_TIMEOUT))
                .await
                .map_err(|e| BenchError::ServerStart(e.to_string()))?;
            let (grpc, monitoring) = addrs.map_err(|_| {
                let tail: Vec<String> = log
                    .tail
                    .lock()
                    .map(|t| t.iter().cloned().collect())
                    .unwrap_or_default();
                BenchError::ServerStart(format!(
                    "no listening line from the child; its last output:\n{}",
                    tail.join("\n")
                ))
            })?;
            (grpc, monitoring, ServerKind::Child { child, log })
        }
        ServerMode::InProcess => {
            use clap::Parser as _;
            let mut argv = vec!["plugca".to_string()];
            argv.extend(args);
            let cli = crate::cli::Cli::try_parse_from(&argv)
                .map_err(|e| BenchError::ServerStart(e.to_string()))?;
            let crate::cli::Command::Serve(serve) = cli.command else {
                return Err(BenchError::ServerStart("not a serve command".into()));
            };
            let config = serve
                .into_config()
                .map_err(|e| BenchError::ServerStart(e.to_string()))?;
            let app = crate::app::App::build(&config)
                .await
                .map_err(|e| BenchError::ServerStart(e.to_string()))?;
            let (grpc, monitoring) = (app.grpc_addr(), app.monitoring_addr());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(app.run(async move {
                let _ = stopped.await;
            }));
            (
                grpc,
                monitoring,
                ServerKind::InProcess {
                    stop: Some(stop),
                    task,
                },
            )
        }
    };
    wait_ready(monitoring).await?;
    let start_to_ready = started.elapsed();
    Ok(StartedServer {
        grpc,
        start_to_ready,
        idle_rss_kb: 0,
        kind,
    })
}

fn read_child_log(
    stderr: std::process::ChildStderr,
    tap: &LogTap,
    tx: std::sync::mpsc::Sender<(SocketAddr, SocketAddr)>,
) {
    let mut reader = std::io::BufReader::with_capacity(1 << 16, stderr);
    let mut line = String::new();
    let mut announced = false;
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        tap.lines.fetch_add(1, Ordering::Relaxed);
        if announced {
            continue;
        }
        if let Ok(mut tail) = tap.tail.lock() {
            if tail.len() == 20 {
                tail.pop_front();
            }
            tail.push_back(line.trim_end().to_string());
        }
        if let Some(addrs) = listening_addrs(&line) {
            announced = true;
            let _ = tx.send(addrs);
        }
    }
}

/// The addresses in the server's `listening` JSON log line.
fn listening_addrs(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = v.get("fields")?;
    if fields.get("message")?.as_str()? != "listening" {
        return None;
    }
    let grpc = fields.get("grpc")?.as_str()?.parse().ok()?;
    let monitoring = fields.get("monitoring")?.as_str()?.parse().ok()?;
    Some((grpc, monitoring))
}

/// Polls `/ready` every millisecond until it answers 200.
async fn wait_ready(addr: SocketAddr) -> Result<(), BenchError> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            let _ = s
                .write_all(b"GET /ready HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                .await;
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf).await;
            if buf.starts_with(b"HTTP/1.1 200") {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Err(BenchError::ServerStart(format!(
        "{addr}/ready did not answer 200 within {READY_TIMEOUT:?}"
    )))
}

/// Client certificates for `n` identities, issued with JWTs (mTLS runs).
async fn bootstrap_identities(
    conn: &Connection,
    minter: &JwtMinter,
    n: usize,
    td: &TrustDomain,
) -> Result<Vec<Option<(String, String)>>, BenchError> {
    let channel = client::connect(conn).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..n.max(1) {
        let mut grpc = channel.clone();
        let sa = format!("conn{c}");
        let token = minter.mint(BENCH_NAMESPACE, &sa)?;
        let id = format!("spiffe://{td}/ns/{BENCH_NAMESPACE}/sa/{sa}");
        tasks.spawn(async move {
            let key = client::workload_key(KeyChoice::P256)?;
            let csr = client::build_csr(&key, Some(&id), CsrShape::Ztunnel)?;
            let chain = client::create_certificate(
                &mut grpc,
                csr,
                &client::RequestOptions {
                    bearer_token: Some(token),
                    ..Default::default()
                },
            )
            .await?;
            let certs = chain[..chain.len().saturating_sub(1)].concat();
            Ok::<_, BenchError>((c, Some((certs, key.serialize_pem()))))
        });
    }
    let mut out = vec![None; n.max(1)];
    while let Some(r) = tasks.join_next().await {
        let (c, identity) = r.map_err(|e| BenchError::Setup(e.to_string()))??;
        out[c] = identity;
    }
    Ok(out)
}

/// One channel (HTTP/2 connection) per identity, opened a few dozen at a time.
async fn connect_all(
    conn: &Connection,
    identities: Vec<Option<(String, String)>>,
) -> Result<Vec<IstioCertificateServiceClient<Channel>>, BenchError> {
    let limit = Arc::new(tokio::sync::Semaphore::new(CONNECT_PARALLELISM));
    let mut tasks = tokio::task::JoinSet::new();
    let n = identities.len();
    for (i, identity) in identities.into_iter().enumerate() {
        let mut c = conn.clone();
        c.client_identity = identity;
        let limit = limit.clone();
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await;
            Ok::<_, BenchError>((i, client::connect(&c).await?))
        });
    }
    let mut out: Vec<Option<IstioCertificateServiceClient<Channel>>> = vec![None; n];
    while let Some(r) = tasks.join_next().await {
        let (i, ch) = r.map_err(|e| BenchError::Setup(e.to_string()))??;
        out[i] = Some(ch);
    }
    Ok(out.into_iter().flatten().collect())
}

#[derive(Clone)]
struct PreparedRequest {
    csr: String,
    auth: Option<MetadataValue<Ascii>>,
}

struct DriveResult {
    issued: u64,
    errors: BTreeMap<String, u64>,
    elapsed: Duration,
    hist: Histogram<u64>,
}

/// The timed phase: `concurrency` workers spread over the channels, each
/// sending one request at a time until either bound is reached.
async fn drive(
    channels: &[IstioCertificateServiceClient<Channel>],
    pool: Arc<Vec<PreparedRequest>>,
    load: &Load,
) -> DriveResult {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + load.duration;
    let max = load.requests;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..load.concurrency.max(1) {
        let mut grpc = channels[w % channels.len()].clone();
        let pool = pool.clone();
        let next = next.clone();
        tasks.spawn(async move {
            let mut hist = new_histogram().expect("histogram bounds are constant and valid");
            let mut issued = 0u64;
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= max || Instant::now() >= deadline {
                    break;
                }
                let entry = &pool[(i % pool.len() as u64) as usize];
                let mut request = tonic::Request::new(IstioCertificateRequest {
                    csr: entry.csr.clone(),
                    validity_duration: 0,
                    metadata: None,
                });
                if let Some(auth) = &entry.auth {
                    request.metadata_mut().insert("authorization", auth.clone());
                }
                let t = Instant::now();
                match grpc.create_certificate(request).await {
                    Ok(response) if response.get_ref().cert_chain.len() >= 2 => issued += 1,
                    Ok(_) => *errors.entry("ShortChain".into()).or_insert(0) += 1,
                    Err(status) => *errors.entry(format!("{:?}", status.code())).or_insert(0) += 1,
                }
                record(&mut hist, t.elapsed());
            }
            (issued, errors, hist)
        });
    }
    let mut out = DriveResult {
        issued: 0,
        errors: BTreeMap::new(),
        elapsed: Duration::ZERO,
        hist: new_histogram().expect("histogram bounds are constant and valid"),
    };
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok((issued, errors, hist)) => {
                out.issued += issued;
                for (k, v) in errors {
                    *out.errors.entry(k).or_insert(0) += v;
                }
                let _ = out.hist.add(&hist);
            }
            Err(_) => *out.errors.entry("WorkerPanicked".into()).or_insert(0) += 1,
        }
    }
    out.elapsed = started.elapsed();
    out
}

fn bearer(token: &str) -> Result<MetadataValue<Ascii>, BenchError> {
    MetadataValue::try_from(format!("Bearer {}", token.trim()))
        .map_err(|_| BenchError::Setup("the token is not a valid header value".into()))
}

// ---------------------------------------------------------------------------
// JWTs for a bench-started server: a generated key, its JWKS, ring-signed tokens.

#[derive(Clone)]
struct JwtMinter {
    key: Arc<JwtKey>,
    header_b64: String,
    jwks_path: PathBuf,
}

enum JwtKey {
    Rsa(ring::signature::RsaKeyPair),
    Ec(ring::signature::EcdsaKeyPair),
}

impl JwtMinter {
    /// A fresh signing key; its JWKS is written to `jwks_path`.
    fn generate(alg: JwtAlg, jwks_path: &Path) -> Result<JwtMinter, BenchError> {
        let bad = |e: String| BenchError::Setup(format!("JWT key: {e}"));
        let ca_key = generate::generate_key(match alg {
            JwtAlg::Rs256 => KeyChoice::Rsa2048,
            JwtAlg::Es256 => KeyChoice::P256,
        })?;
        use rcgen::PublicKeyData as _;
        let kp = ca_key.secret_key_pair();
        let pkcs8 = kp.serialized_der();
        let spki = kp.subject_public_key_info();
        let (key, jwk, alg_name) = match alg {
            JwtAlg::Rs256 => {
                let key = ring::signature::RsaKeyPair::from_pkcs8(pkcs8)
                    .map_err(|e| bad(e.to_string()))?;
                let (n, e) = rsa_public(&spki).ok_or_else(|| bad("not an RSA key".into()))?;
                let jwk = serde_json::json!({
                    "kty": "RSA", "use": "sig", "alg": "RS256", "kid": JWT_KID,
                    "n": b64(&n), "e": b64(&e),
                });
                (JwtKey::Rsa(key), jwk, "RS256")
            }
            JwtAlg::Es256 => {
                let key = ring::signature::EcdsaKeyPair::from_pkcs8(
                    &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    pkcs8,
                    &ring::rand::SystemRandom::new(),
                )
                .map_err(|e| bad(e.to_string()))?;
                let point = ec_point(&spki).ok_or_else(|| bad("not a P-256 key".into()))?;
                let jwk = serde_json::json!({
                    "kty": "EC", "use": "sig", "alg": "ES256", "kid": JWT_KID, "crv": "P-256",
                    "x": b64(&point[1..33]), "y": b64(&point[33..65]),
                });
                (JwtKey::Ec(key), jwk, "ES256")
            }
        };
        let jwks = serde_json::json!({ "keys": [jwk] });
        crate::fsutil::write_file(jwks_path, jwks.to_string().as_bytes(), false).map_err(|e| {
            BenchError::Io {
                path: jwks_path.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
        let header = serde_json::json!({ "alg": alg_name, "typ": "JWT", "kid": JWT_KID });
        Ok(JwtMinter {
            key: Arc::new(key),
            header_b64: b64(header.to_string().as_bytes()),
            jwks_path: jwks_path.to_path_buf(),
        })
    }

    /// A token for service account `ns/sa`, valid for an hour.
    fn mint(&self, ns: &str, sa: &str) -> Result<String, BenchError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let claims = serde_json::json!({
            "iss": JWT_ISSUER,
            "aud": [JWT_AUDIENCE],
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "iat": now,
            "nbf": now - 60,
            "exp": now + 3600,
        });
        let input = format!("{}.{}", self.header_b64, b64(claims.to_string().as_bytes()));
        let rng = ring::rand::SystemRandom::new();
        let fail = |_| BenchError::Setup("signing a token failed".into());
        let sig = match &*self.key {
            JwtKey::Rsa(k) => {
                let mut sig = vec![0u8; k.public().modulus_len()];
                k.sign(
                    &ring::signature::RSA_PKCS1_SHA256,
                    &rng,
                    input.as_bytes(),
                    &mut sig,
                )
                .map_err(fail)?;
                sig
            }
            JwtKey::Ec(k) => k
                .sign(&rng, input.as_bytes())
                .map_err(fail)?
                .as_ref()
                .to_vec(),
        };
        Ok(format!("{input}.{}", b64(&sig)))
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// (modulus, exponent) of an RSA SubjectPublicKeyInfo, without leading zeros.
fn rsa_public(spki_der: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    use x509_parser::prelude::FromDer as _;
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki_der).ok()?;
    match spki.parsed().ok()? {
        x509_parser::public_key::PublicKey::RSA(rsa) => {
            let trim = |b: &[u8]| {
                let start = b.iter().position(|x| *x != 0).unwrap_or(b.len());
                b[start..].to_vec()
            };
            Some((trim(rsa.modulus), trim(rsa.exponent)))
        }
        _ => None,
    }
}

/// The uncompressed point (0x04 || x || y) of a P-256 SubjectPublicKeyInfo.
fn ec_point(spki_der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::prelude::FromDer as _;
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki_der).ok()?;
    match spki.parsed().ok()? {
        x509_parser::public_key::PublicKey::EC(point) if point.data().len() == 65 => {
            Some(point.data().to_vec())
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Measurement helpers.

fn new_histogram() -> Result<Histogram<u64>, BenchError> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
        .map_err(|e| BenchError::Setup(format!("histogram: {e}")))
}

fn record(hist: &mut Histogram<u64>, elapsed: Duration) {
    let us = (elapsed.as_micros() as u64).clamp(1, MAX_LATENCY_US);
    let _ = hist.record(us);
}

fn latency(hist: &Histogram<u64>) -> Latency {
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

fn per_sec(n: u64, elapsed: Duration) -> f64 {
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

/// A private scratch directory, removed when the run ends.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Result<Self, BenchError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path =
            std::env::temp_dir().join(format!("plugca-bench-{}-{nanos:09}", std::process::id()));
        let io = |e: std::io::Error| BenchError::Io {
            path: path.clone(),
            reason: e.to_string(),
        };
        std::fs::create_dir(&path).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
        Ok(ScratchDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_line_of_a_json_log_gives_both_addresses() {
        let line = r#"{"timestamp":"t","level":"INFO","fields":{"message":"listening","grpc":"127.0.0.1:4000","monitoring":"127.0.0.1:4001"},"target":"plugca"}"#;
        let (grpc, mon) = listening_addrs(line).unwrap();
        assert_eq!(grpc.port(), 4000);
        assert_eq!(mon.port(), 4001);
        assert!(listening_addrs(r#"{"fields":{"message":"serving"}}"#).is_none());
        assert!(listening_addrs("not json").is_none());
    }

    #[test]
    fn proc_files_of_this_process_are_readable() {
        assert!(proc_cpu_secs("self").is_some());
        assert!(proc_status_kb("self", "VmHWM").unwrap() > 0);
        assert!(proc_status_kb("self", "NoSuchField").is_none());
    }

    #[test]
    fn a_mixed_pool_alternates_key_types_with_distinct_identities() {
        let td = TrustDomain::parse("cluster.local").unwrap();
        let pool = make_pool(CsrMix::Mixed, 4, 1, &td).unwrap();
        assert_eq!(pool.stats.p256_keys, 2);
        assert_eq!(pool.stats.rsa2048_keys, 1);
        let kinds: Vec<String> = pool
            .csrs
            .iter()
            .map(|c| VerifiedCsr::parse(c).unwrap().key_kind().label())
            .collect();
        assert_eq!(kinds, ["p256", "rsa2048", "p256", "rsa2048"]);
        let mut ids: Vec<&String> = pool.sas.iter().collect();
        ids.dedup();
        assert_eq!(ids.len(), 4);
    }

    #[test]
    fn minted_tokens_verify_with_the_written_jwks() {
        let scratch = ScratchDir::new().unwrap();
        let td = TrustDomain::parse("cluster.local").unwrap();
        for alg in [JwtAlg::Rs256, JwtAlg::Es256] {
            let path = scratch.path().join(format!("{alg:?}.json"));
            let minter = JwtMinter::generate(alg, &path).unwrap();
            let authn = crate::authn::jwt::JwtAuthenticator::from_jwks_file(
                &path,
                JWT_ISSUER.into(),
                vec![JWT_AUDIENCE.into()],
                td.clone(),
            )
            .unwrap();
            let id = authn.verify(&minter.mint("bench", "w7").unwrap()).unwrap();
            assert_eq!(id.to_string(), "spiffe://cluster.local/ns/bench/sa/w7");
        }
    }
}
