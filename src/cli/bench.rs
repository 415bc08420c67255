//! `plugca bench`: a load generator over the real protocol, and the offline
//! ceiling of the same issuance cycle.
//!
//! - **Online** ([`run_online`]): gRPC over TLS to one address only — a running
//!   plugca ([`Target::Remote`]) or one this process starts on `127.0.0.1:0`
//!   ([`Target::Local`]), by default as a child process of the same binary so
//!   its CPU time and RSS are read separately from `/proc/<pid>`.
//! - **Offline** ([`run_offline`]): the server's cycle without gRPC or TLS —
//!   [`crate::csr::VerifiedCsr::parse`], the lab-mode caller,
//!   [`crate::issuance::issue`] — on one thread per core. That is the crypto ceiling the online number is compared to.
//!
//! Everything that is not the server's work (keys, CSRs, tokens, client
//! certificates, connections) is prepared before the clock starts. Both runs
//! stop at whichever bound comes first: request count or duration.
//!
//! This module holds the flags and what every part shares; `online`,
//! `offline` and `target` the runs, `pool` and `report` what they prepare
//! and measure.

mod offline;
mod online;
mod pool;
mod report;
mod target;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use serde::Serialize;

pub use self::offline::{OfflineConfig, run_offline};
pub use self::online::{Load, OnlineConfig, run_online};
pub use self::pool::{CaSource, generate_bundle};
pub use self::report::{
    Latency, PoolStats, Report, ServerStats, backend, cores, proc_cpu_secs, proc_status_kb,
};
pub use self::target::{Local, Remote, ServerMode, Target};
// The parts share their `pub(super)` items with each other through
// `use super::*`; nothing of them is public beyond the re-exports above.
use self::{offline::*, online::*, pool::*, report::*, target::*};
use crate::ca::generate::{self, KeyChoice};
use crate::client;
use crate::duration;
use crate::identity::TrustDomain;

/// Pool size when neither --pool nor --burst says otherwise.
pub const DEFAULT_POOL: u64 = 4096;
/// Where `--addr` points by default: istiod's port on loopback.
pub const DEFAULT_ADDR: &str = "127.0.0.1:15012";
/// Issuer of the tokens a bench-started server accepts.
pub const JWT_ISSUER: &str = "https://plugca.bench";
const JWT_KID: &str = "plugca-bench";
const JWT_AUDIENCE: &str = "istio-ca";
/// Namespace of every bench identity (`spiffe://<td>/ns/bench/sa/w<i>`).
const BENCH_NAMESPACE: &str = "bench";
/// The ceiling measured before an online run stops after this long or this many cycles.
const CEILING_MAX_TIME: Duration = Duration::from_secs(3);
const CEILING_MAX_CYCLES: u64 = 50_000;

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

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// A running plugca to load (IP:port; nothing else is ever contacted).
    /// Without it, bench starts its own server on 127.0.0.1:0.
    #[arg(long, requires = "root_cert")]
    pub addr: Option<SocketAddr>,
    /// PEM root(s) that verify the --addr server's certificate.
    #[arg(long)]
    pub root_cert: Option<PathBuf>,
    /// TLS name to verify the --addr server as [default: its IP].
    #[arg(long, requires = "addr")]
    pub server_name: Option<String>,
    /// Bearer token sent with every request to --addr (--auth jwt).
    #[arg(long, requires = "addr")]
    pub token_file: Option<PathBuf>,
    /// Client certificate chain for --auth mtls against --addr.
    #[arg(long, requires_all = ["addr", "client_key"])]
    pub client_cert: Option<PathBuf>,
    /// Client key for --auth mtls against --addr.
    #[arg(long, requires = "client_cert")]
    pub client_key: Option<PathBuf>,

    /// CA bundle to serve (bench-started server) or that --addr serves (for the
    /// offline ceiling). Default: a generated one of --ca-key.
    #[arg(long, conflicts_with = "ca_key")]
    pub cacerts_dir: Option<PathBuf>,
    /// Key type of the generated root and intermediate.
    #[arg(long, value_enum)]
    pub ca_key: Option<KeyChoice>,
    /// CSR keys: P-256 (ztunnel), RSA-2048 (sidecars) or half of each.
    #[arg(long, value_enum, default_value_t = CsrMix::Mixed)]
    pub csr_mix: CsrMix,
    /// Authentication of each request.
    #[arg(long, value_enum, default_value_t = AuthMode::Jwt)]
    pub auth: AuthMode,
    /// Algorithm of the minted service-account tokens (bench-started server).
    #[arg(long, value_enum, default_value_t = JwtAlg::Rs256)]
    pub jwt_alg: JwtAlg,

    /// Requests in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// HTTP/2 connections the requests are spread over.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Stop after this many requests...
    #[arg(long, default_value_t = 100_000)]
    pub requests: u64,
    /// ...or after this long, whichever comes first (Go duration).
    #[arg(long, default_value = "10s")]
    pub duration: String,
    /// Burst: this many distinct CSRs (and identities) fired at once with
    /// --concurrency; reports the total time and p99.
    #[arg(long, conflicts_with_all = ["requests", "pool"])]
    pub burst: Option<u64>,
    /// Distinct CSRs prepared; requests cycle through them
    /// [default: --requests, at most 4096].
    #[arg(long)]
    pub pool: Option<usize>,
    /// Distinct RSA-2048 keys behind the RSA CSRs (RSA key generation is slow;
    /// CSRs still differ by identity and signature).
    #[arg(long, default_value_t = 8)]
    pub rsa_keys: usize,
    /// Per-request timeout.
    #[arg(long, default_value = "10s")]
    pub timeout: String,
    /// Trust domain of the bench identities.
    #[arg(long, default_value = crate::config::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// Run the issuance cycle in-process without gRPC or TLS on --threads
    /// threads: the ceiling.
    #[arg(long, conflicts_with_all = ["addr", "burst"])]
    pub offline: bool,
    /// Threads of an --offline run [default: one per core].
    #[arg(long, requires = "offline")]
    pub threads: Option<usize>,
    /// Skip the offline ceiling an online run measures first.
    #[arg(long)]
    pub no_ceiling: bool,
    /// Run the bench-started server inside this process (CPU and RSS are then
    /// shared with the load generator) instead of as a child process.
    #[arg(long, conflicts_with = "addr")]
    pub in_process: bool,
    /// Extra `plugca serve` flag for the bench-started server; repeatable
    /// (e.g. --server-arg=--max-concurrent-signs=4).
    #[arg(long, allow_hyphen_values = true, conflicts_with = "addr")]
    pub server_arg: Vec<String>,

    /// RUST_LOG of the bench-started child server. Keep the `listening` line
    /// (target `plugca`, info); `info,plugca::audit=warn` drops the audit line
    /// written per issued certificate.
    #[arg(long, default_value = "info", conflicts_with = "addr")]
    pub server_log: String,

    /// Runtime threads of the load generator. One thread drives every
    /// connection without cross-thread wake-ups, leaving the other cores to a
    /// server on the same box (in-process servers share this runtime).
    #[arg(long, default_value_t = 1)]
    pub client_threads: usize,

    /// Print one JSON line on stdout (the text report goes to stderr).
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: BenchArgs) -> Result<(), String> {
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).map_err(|e| format!("{}: cannot read: {e}", p.display()))
    };
    let duration = duration::parse(&args.duration).map_err(|e| format!("--duration: {e}"))?;
    let timeout = duration::parse(&args.timeout).map_err(|e| format!("--timeout: {e}"))?;
    let trust_domain =
        TrustDomain::parse(&args.trust_domain).map_err(|e| format!("--trust-domain: {e}"))?;
    if args.concurrency == 0 || args.connections == 0 {
        return Err("--concurrency and --connections must be at least 1".into());
    }
    let requests = args.burst.unwrap_or(args.requests);
    let pool = match (args.burst, args.pool) {
        (Some(n), _) => n as usize,
        (None, Some(p)) => p,
        (None, None) => requests.min(DEFAULT_POOL) as usize,
    };
    let ca = match (&args.cacerts_dir, args.ca_key) {
        (Some(d), _) => CaSource::Dir(d.clone()),
        (None, key) => CaSource::Generate(key.unwrap_or(KeyChoice::P256)),
    };

    let report = if args.offline {
        let cfg = OfflineConfig {
            ca,
            csr_mix: args.csr_mix,
            pool,
            rsa_keys: args.rsa_keys,
            requests,
            duration,
            threads: args.threads.unwrap_or_else(cores),
            trust_domain,
        };
        tokio::task::spawn_blocking(move || run_offline(&cfg))
            .await
            .map_err(|e| e.to_string())?
    } else {
        let target = match args.addr {
            Some(addr) => Target::Remote(Remote {
                addr,
                root_cert_pem: read(args.root_cert.as_ref().expect("clap: --addr requires it"))?,
                server_name: args.server_name.clone(),
                token: args.token_file.as_ref().map(read).transpose()?,
                client_identity: match (&args.client_cert, &args.client_key) {
                    (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
                    _ => None,
                },
                cacerts_dir: args.cacerts_dir.clone(),
            }),
            None => Target::Local(Local {
                ca,
                server: if args.in_process {
                    ServerMode::InProcess
                } else {
                    ServerMode::Child {
                        exe: std::env::current_exe()
                            .map_err(|e| format!("cannot find the plugca binary: {e}"))?,
                    }
                },
                server_args: args.server_arg.clone(),
                server_log: args.server_log.clone(),
            }),
        };
        let client_threads = args.client_threads.max(1);
        let cfg = OnlineConfig {
            target,
            load: Load {
                csr_mix: args.csr_mix,
                auth: args.auth,
                jwt_alg: args.jwt_alg,
                concurrency: args.concurrency,
                connections: args.connections,
                requests,
                duration,
                pool,
                rsa_keys: args.rsa_keys,
                timeout,
                trust_domain,
                ceiling: !args.no_ceiling,
                burst: args.burst.is_some(),
            },
        };
        tokio::task::spawn_blocking(move || {
            let mut builder = if client_threads == 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(client_threads);
                b
            };
            let runtime = builder
                .enable_all()
                .build()
                .map_err(|e| BenchError::Setup(format!("load generator runtime: {e}")))?;
            runtime.block_on(run_online(cfg))
        })
        .await
        .map_err(|e| e.to_string())?
    }
    .map_err(|e| e.to_string())?;

    if args.json {
        eprint!("{}", report.text());
        println!(
            "{}",
            serde_json::to_string(&report).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", report.text());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser as _;

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        let mut all = vec!["plugca", "bench"];
        all.extend_from_slice(args);
        match Cli::try_parse_from(all)?.command {
            Command::Bench(b) => Ok(b),
            _ => unreachable!("bench parses as bench"),
        }
    }

    #[test]
    fn defaults_start_a_local_server_with_jwt_and_mixed_csrs() {
        let a = parse(&[]).unwrap();
        assert!(a.addr.is_none());
        assert_eq!(a.auth, AuthMode::Jwt);
        assert_eq!(a.csr_mix, CsrMix::Mixed);
        assert_eq!(a.concurrency, 64);
    }

    #[test]
    fn addr_needs_a_root_and_cannot_be_combined_with_offline_or_in_process() {
        assert!(parse(&["--addr", "127.0.0.1:15012"]).is_err());
        let ok = parse(&["--addr", "127.0.0.1:15012", "--root-cert", "r.pem"]).unwrap();
        assert_eq!(ok.addr.unwrap().port(), 15012);
        assert!(parse(&["--addr", "127.0.0.1:1", "--root-cert", "r", "--offline"]).is_err());
        assert!(parse(&["--addr", "127.0.0.1:1", "--root-cert", "r", "--in-process"]).is_err());
        assert!(parse(&["--addr", "not-an-ip:1", "--root-cert", "r"]).is_err());
    }

    #[test]
    fn burst_excludes_requests_and_pool() {
        assert!(parse(&["--burst", "10", "--requests", "5"]).is_err());
        assert!(parse(&["--burst", "10", "--pool", "5"]).is_err());
        assert_eq!(parse(&["--burst", "10"]).unwrap().burst, Some(10));
    }

    #[test]
    fn a_bundle_dir_and_a_generated_key_are_exclusive() {
        assert!(parse(&["--cacerts-dir", "d", "--ca-key", "rsa2048"]).is_err());
    }
}
