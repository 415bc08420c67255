//! The online run: prepare CSRs, tokens, client certificates and
//! connections, then drive the target from `concurrency` workers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

use crate::ca::generate::KeyChoice;
use crate::client::{self, Connection, CsrShape};
use crate::identity::TrustDomain;
use crate::jwt_issuer::JwtIssuer;
use crate::pb::IstioCertificateRequest;
use crate::pb::istio_certificate_service_client::IstioCertificateServiceClient;

use super::*;

/// Connections (TLS handshakes) opened at once while preparing.
pub(super) const CONNECT_PARALLELISM: usize = 64;

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

/// Client certificates for `n` identities, issued with JWTs (mTLS runs).
pub(super) async fn bootstrap_identities(
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
pub(super) async fn connect_all(
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
pub(super) struct PreparedRequest {
    pub(super) csr: String,
    pub(super) auth: Option<MetadataValue<Ascii>>,
}

pub(super) struct DriveResult {
    pub(super) issued: u64,
    pub(super) errors: BTreeMap<String, u64>,
    pub(super) elapsed: Duration,
    pub(super) hist: Histogram<u64>,
}

/// The timed phase: `concurrency` workers spread over the channels, each
/// sending one request at a time until either bound is reached.
pub(super) async fn drive(
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

pub(super) fn bearer(token: &str) -> Result<MetadataValue<Ascii>, BenchError> {
    MetadataValue::try_from(format!("Bearer {}", token.trim()))
        .map_err(|_| BenchError::Setup("the token is not a valid header value".into()))
}

// ---------------------------------------------------------------------------
// JWTs for a bench-started server: a generated key and its JWKS.

/// The bench's [`JwtIssuer`] and where its JWKS is written for the server.
#[derive(Clone)]
pub(super) struct JwtMinter {
    issuer: Arc<JwtIssuer>,
    pub(super) jwks_path: PathBuf,
}

impl JwtMinter {
    /// A fresh signing key; its JWKS is written to `jwks_path`.
    pub(super) fn generate(alg: JwtAlg, jwks_path: &Path) -> Result<JwtMinter, BenchError> {
        let alg = match alg {
            JwtAlg::Rs256 => jsonwebtoken::Algorithm::RS256,
            JwtAlg::Es256 => jsonwebtoken::Algorithm::ES256,
        };
        let issuer =
            JwtIssuer::generate(alg, JWT_KID).map_err(|e| BenchError::Setup(e.to_string()))?;
        crate::fsutil::write_file(jwks_path, JwtIssuer::jwks(&[&issuer]).as_bytes(), false)
            .map_err(|e| BenchError::Io {
                path: jwks_path.to_path_buf(),
                reason: e.to_string(),
            })?;
        Ok(JwtMinter {
            issuer: Arc::new(issuer),
            jwks_path: jwks_path.to_path_buf(),
        })
    }

    /// A token for service account `ns/sa`, valid for an hour.
    pub(super) fn mint(&self, ns: &str, sa: &str) -> Result<String, BenchError> {
        self.issuer
            .mint_service_account(JWT_ISSUER, JWT_AUDIENCE, ns, sa, 3600)
            .map_err(|e| BenchError::Setup(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
