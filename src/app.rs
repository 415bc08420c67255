//! Wiring: load the CA, build the authenticators, bind every listener first
//! (so port 0 works in tests), then serve until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::authn::client_cert::ClientCertAuthenticator;
use crate::authn::jwks::{JwksSetupError, RemoteJwks};
use crate::authn::jwt::{JwksError, JwtAuthenticator, KeySource as _};
use crate::authn::kube::KubeJwtAuthenticator;
use crate::authn::xfcc::XfccAuthenticator;
use crate::authn::{Authenticator, Authenticators};
use crate::ca::Current;
use crate::ca::selfsigned::SelfSignedSpec;
use crate::ca::{BundleError, CaBundle, Layout};
use crate::config::Config;
use crate::controllers::shared_root::SharedRoot;
use crate::identity::TrustDomains;
use crate::impersonation::Impersonation;
use crate::impersonation::node::{INITIAL_POD_SYNC_WAIT, NodeAuthorizer};
use crate::impersonation::policy::{Policy, PolicyError};
use crate::issuance::TtlPolicy;
use crate::kubernetes::{Clusters, KubeSetupError};
use crate::metrics::Metrics;
use crate::monitoring::{self, MonitoringState};
use crate::pb::istio_certificate_service_server::IstioCertificateServiceServer;
use crate::reload::{ReloadError, ReloadSettings, Reloader};
use crate::server::harness::{Faults, IssuedLog};
use crate::server::{CertificateService, ServiceConfig};
use crate::tls::{self, TlsError};

/// Largest gRPC message accepted (a CSR is a few KiB; istiod allows 4 MiB).
pub const MAX_GRPC_MESSAGE_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Bundle(#[from] BundleError),
    #[error("{0}")]
    Jwks(#[from] JwksError),
    #[error("{0}")]
    Kubernetes(#[from] KubeSetupError),
    #[error("{0}")]
    JwtRule(#[from] JwksSetupError),
    #[error("--impersonation-policy {0}")]
    ImpersonationPolicy(#[from] PolicyError),
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Ca(#[from] ReloadError),
    #[error("cannot listen on {addr} ({what}): {reason}")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        reason: String,
    },
    #[error("gRPC server failed: {0}")]
    Serve(String),
    #[error("{addr}/ready did not answer 200 within {within:?}")]
    NotReady { addr: SocketAddr, within: Duration },
    #[error("{0}")]
    Controllers(#[from] crate::controllers::StartError),
    #[error("{0}")]
    SharedRoot(#[from] crate::controllers::shared_root::SharedRootError),
}

/// Starts a server: loads the CA, builds the authenticators and the
/// impersonation checks, binds every listener, logs `listening` and serves in
/// a spawned task until [`Running::stop`] or [`Running::run_until`]'s signal.
/// The one way to start a server: `main`, `plugca bench`, `plugca::testing`
/// and the integration tests all come through here.
pub async fn spawn(config: &Config) -> Result<Running, AppError> {
    // The build's TLS backend as the process default before any client or
    // server config is made (an embedding harness does not run main()).
    crate::tls::crypto_provider();
    let app = App::build(config).await?;
    let (grpc_addr, monitoring_addr) = (app.grpc_addr(), app.monitoring_addr());
    // Target `plugca` as when the binary logged it: `plugca bench` reads it.
    info!(target: "plugca", grpc = %grpc_addr, monitoring = %monitoring_addr, "listening");
    let (ca, metrics, reloader) = (app.ca.clone(), app.metrics.clone(), app.reloader.clone());
    let (faults, issued_log) = (app.faults.clone(), app.issued_log.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // Dropping `stop` (the `Running`) also completes `stopped`: the server
    // then shuts down, as it did when the harnesses held the sender.
    let task = tokio::spawn(app.run(async move {
        let _ = stopped.await;
    }));
    Ok(Running {
        grpc_addr,
        monitoring_addr,
        ca,
        metrics,
        faults,
        issued_log,
        reloader,
        stop,
        task,
    })
}

/// A server started by [`spawn`]: its listeners are bound and it serves until
/// stopped (or dropped).
pub struct Running {
    grpc_addr: SocketAddr,
    monitoring_addr: SocketAddr,
    ca: Arc<Current>,
    metrics: Arc<Metrics>,
    faults: Option<Arc<Faults>>,
    issued_log: Option<Arc<IssuedLog>>,
    reloader: Arc<Reloader>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), AppError>>,
}

impl Running {
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn monitoring_addr(&self) -> SocketAddr {
        self.monitoring_addr
    }

    pub fn ca(&self) -> Arc<Current> {
        self.ca.clone()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The fault switchboard, when fault injection is enabled.
    pub fn faults(&self) -> Option<Arc<Faults>> {
        self.faults.clone()
    }

    /// Every certificate issued, when fault injection (harness mode) is enabled.
    pub fn issued_log(&self) -> Option<Arc<IssuedLog>> {
        self.issued_log.clone()
    }

    /// The reloader, to force a reload (tests, SIGHUP).
    pub fn reloader(&self) -> Arc<Reloader> {
        self.reloader.clone()
    }

    /// Waits until `/ready` answers 200 (the gRPC port serves and the reload
    /// watcher is in place), polling every millisecond for at most `within`.
    pub async fn wait_ready(&self, within: Duration) -> Result<(), AppError> {
        wait_ready(self.monitoring_addr, within).await
    }

    /// Serves until `shutdown` completes, then drains in-flight requests.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        let Running { stop, mut task, .. } = self;
        let result = tokio::select! {
            _ = shutdown => {
                let _ = stop.send(());
                task.await
            }
            result = &mut task => result,
        };
        result.map_err(|e| AppError::Serve(e.to_string()))?
    }

    /// Stops accepting, drains in-flight requests and waits for the server.
    pub async fn stop(self) -> Result<(), AppError> {
        let _ = self.stop.send(());
        self.task
            .await
            .map_err(|e| AppError::Serve(e.to_string()))?
    }
}

/// Waits until `addr` answers `GET /ready` with 200, polling every
/// millisecond for at most `within`; also for servers in child processes.
pub async fn wait_ready(addr: SocketAddr, within: Duration) -> Result<(), AppError> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            let _ = s
                .write_all(b"GET /ready HTTP/1.1\r\nHost: plugca\r\nConnection: close\r\n\r\n")
                .await;
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf).await;
            if buf.starts_with(b"HTTP/1.1 200") {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Err(AppError::NotReady { addr, within })
}

/// A built server whose listeners are bound but not yet serving.
struct App {
    grpc_listener: TcpListener,
    monitoring_listener: TcpListener,
    service: CertificateService,
    tls_config: Arc<ArcSwap<rustls::ServerConfig>>,
    ca: Arc<Current>,
    metrics: Arc<Metrics>,
    reloader: Arc<Reloader>,
    faults: Option<Arc<Faults>>,
    issued_log: Option<Arc<IssuedLog>>,
    reload_interval: Duration,
    drain_timeout: Duration,
    serving: Arc<AtomicBool>,
    /// The in-cluster controllers to start in `run`, with the local cluster's client.
    controllers: Option<(kube::Client, crate::controllers::ControllersConfig)>,
    /// `--self-signed-secret`: kept in sync in `run`.
    shared_root: Option<SharedRoot>,
    limits: crate::limits::Limits,
}

impl App {
    /// The steps in order: CA, serving TLS and reloader, authenticators,
    /// impersonation, fault harness, handler, listeners.
    async fn build(config: &Config) -> Result<App, AppError> {
        let now = OffsetDateTime::now_utc();
        // Before the CA: a self-signed root kept in a Secret is read through it.
        let clusters = match &config.authn.kubernetes {
            Some(k) => Some(Arc::new(Clusters::load(k).await?)),
            None => None,
        };
        let shared_root = shared_root(config, clusters.as_deref());
        let (bundle, self_signed) = match &shared_root {
            Some(shared) => load_shared_ca(config, shared, now).await?,
            None => load_ca(config, now)?,
        };
        let metrics = Arc::new(Metrics::new());
        let dns_names = tls::serving_dns_names(&config.server.server_dns_names);
        let tls_config = Arc::new(ArcSwap::new(tls::server_config(&bundle, &dns_names)?));
        let ca = Arc::new(Current::new(Some(bundle)));
        let reloader = Arc::new(Reloader::new(
            ReloadSettings {
                dir: config.ca.cacerts_dir.clone(),
                dns_names,
                allow_root_replacement: config.ca.allow_root_replacement,
                extra_trust_roots: config.ca.extra_trust_roots.clone(),
                self_signed,
                self_signed_shared: shared_root.is_some(),
                expiry_warning: config.ca.expiry_warning,
            },
            ca.clone(),
            tls_config.clone(),
            metrics.clone(),
        ));
        reloader.check_expiry(now);

        let authenticators = authenticators(config, &ca, clusters.clone(), &metrics).await?;
        // In-cluster controllers (issue 10): checked and announced here, started in `run`.
        crate::controllers::check_shared_root(
            &config.controllers,
            ca.current().as_deref(),
            shared_root.is_some(),
        )?;
        let local_client = clusters
            .as_ref()
            .and_then(|c| c.resolve(None).ok())
            .map(|(_, client)| client.clone());
        let controllers = crate::controllers::announce(&config.controllers, local_client)
            .map(|client| (client, config.controllers.clone()));
        let impersonation = impersonation(config, clusters.as_deref(), &metrics).await?;
        let (faults, issued_log) = fault_harness(config);
        info!(authenticators = ?authenticators.names(), lab_mode = config.authn.insecure_trust_csr_identity, "authentication");
        let service = CertificateService::new(
            ca.clone(),
            ServiceConfig {
                authenticators,
                lab_mode: config
                    .authn
                    .insecure_trust_csr_identity
                    .then(|| config.trust_domain.clone()),
                impersonation,
                ttl: TtlPolicy {
                    default_ttl: config.issuance.default_ttl,
                    max_ttl: config.issuance.max_ttl,
                },
                max_concurrent_signs: config.issuance.max_concurrent_signs,
                sign_queue_timeout: config.issuance.sign_queue_timeout,
                trust_domains: TrustDomains::new(
                    config.trust_domain.clone(),
                    config.trust_domain_aliases.clone(),
                ),
            },
            metrics.clone(),
            faults.clone(),
            issued_log.clone(),
        );

        let grpc_listener = bind(config.server.grpc_addr, "gRPC").await?;
        let monitoring_listener = bind(config.server.monitoring_addr, "monitoring").await?;
        Ok(App {
            grpc_listener,
            monitoring_listener,
            service,
            tls_config,
            ca,
            metrics,
            reloader,
            faults,
            issued_log,
            reload_interval: config.ca.reload_interval,
            drain_timeout: config.server.drain_timeout,
            serving: Arc::new(AtomicBool::new(false)),
            controllers,
            shared_root,
            limits: crate::limits::Limits::for_this_process(&config.net),
        })
    }

    fn grpc_addr(&self) -> SocketAddr {
        self.grpc_listener
            .local_addr()
            .expect("a bound listener has a local address")
    }

    fn monitoring_addr(&self) -> SocketAddr {
        self.monitoring_listener
            .local_addr()
            .expect("a bound listener has a local address")
    }

    /// Serves until `shutdown` completes, then drains in-flight requests.
    async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let monitoring = monitoring::router(MonitoringState {
            ca: self.ca.clone(),
            metrics: self.metrics.clone(),
            serving: self.serving.clone(),
            faults: self.faults.clone(),
            issued_log: self.issued_log.clone(),
        });
        info!(limits = ?self.limits, "connection limits (caps from the open-file limit)");
        let monitoring_task = tokio::spawn(monitoring::serve(
            self.monitoring_listener,
            monitoring,
            self.limits.clone(),
            self.metrics.clone(),
            stop_rx.clone(),
        ));

        let reload_task = self
            .reloader
            .clone()
            .spawn(self.reload_interval, stop_rx.clone());
        let shared_root_task = self.shared_root.map(|shared| {
            tokio::spawn(crate::controllers::shared_root::keep_in_sync(
                shared,
                self.reloader.clone(),
                self.reload_interval,
                self.metrics.controllers.clone(),
                stop_rx.clone(),
            ))
        });
        let controllers = self.controllers.map(|(client, config)| {
            crate::controllers::spawn(
                client,
                config,
                self.ca.clone(),
                self.reloader.subscribe(),
                self.metrics.controllers.clone(),
                stop_rx.clone(),
            )
        });
        let incoming = tls::incoming(
            self.grpc_listener,
            self.tls_config.clone(),
            &self.limits,
            self.metrics.clone(),
            stop_rx.clone(),
        );
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<IstioCertificateServiceServer<CertificateService>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| AppError::Serve(format!("reflection: {e}")))?;
        let routes = tonic::service::Routes::new(health_service)
            .add_service(reflection)
            .add_service(
                IstioCertificateServiceServer::new(self.service)
                    .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES),
            );
        let grpc = crate::net::serve(
            incoming,
            routes,
            self.limits.clone(),
            self.ca.clone(),
            self.metrics.clone(),
            stop_rx.clone(),
        );
        let mut grpc_task = tokio::spawn(async move {
            grpc.await;
            Ok::<(), std::convert::Infallible>(())
        });
        self.serving.store(true, Ordering::Release);
        info!("serving");

        tokio::select! {
            _ = shutdown => {}
            result = &mut grpc_task => {
                let _ = stop_tx.send(true);
                let _ = monitoring_task.await;
                return match result {
                    Ok(Ok(())) => Err(AppError::Serve("the gRPC server stopped unexpectedly".into())),
                    Ok(Err(e)) => Err(AppError::Serve(e.to_string())),
                    Err(e) => Err(AppError::Serve(e.to_string())),
                };
            }
        }
        info!(drain_timeout = ?self.drain_timeout, "shutting down: no new connections, draining in-flight requests");
        self.serving.store(false, Ordering::Release);
        health_reporter
            .set_not_serving::<IstioCertificateServiceServer<CertificateService>>()
            .await;
        let _ = stop_tx.send(true);
        let grpc_result = tokio::time::timeout(self.drain_timeout, &mut grpc_task).await;
        let _ = reload_task.await;
        if let Some(controllers) = controllers {
            controllers.join().await;
        }
        if let Some(task) = shared_root_task {
            let _ = task.await;
        }
        let _ = monitoring_task.await;
        match grpc_result {
            Ok(Ok(Ok(()))) => {
                info!("drained; exiting");
                Ok(())
            }
            Ok(Ok(Err(e))) => Err(AppError::Serve(e.to_string())),
            Ok(Err(e)) => Err(AppError::Serve(e.to_string())),
            Err(_) => {
                grpc_task.abort();
                warn!("drain timeout reached; exiting with requests still in flight");
                Ok(())
            }
        }
    }
}

/// The CA to start with: the plugged-in bundle, else the self-signed root
/// (whose spec the reloader keeps, to renew it).
fn load_ca(
    config: &Config,
    now: OffsetDateTime,
) -> Result<(CaBundle, SelfSignedSpec), ReloadError> {
    let self_signed = self_signed_spec(config);
    let bundle = Reloader::initial_bundle(
        &config.ca.cacerts_dir,
        config.ca.self_signed.then_some(&self_signed),
        config.ca.extra_trust_roots.as_deref(),
        now,
    )?;
    log_plugged(config, &bundle);
    Ok((bundle, self_signed))
}

fn self_signed_spec(config: &Config) -> SelfSignedSpec {
    SelfSignedSpec {
        dir: config.ca.self_signed_dir.clone(),
        key: config.ca.self_signed_key,
        ttl: config.ca.self_signed_ttl,
        organization: config.trust_domain.to_string(),
    }
}

fn log_plugged(config: &Config, bundle: &CaBundle) {
    if bundle.layout() != Layout::SelfSigned {
        info!(
            dir = %config.ca.cacerts_dir.display(),
            layout = %bundle.layout(),
            signing = %bundle.signing_cert().subject,
            key = %bundle.signer().key_kind(),
            roots = bundle.roots().len(),
            "plugged-in CA loaded"
        );
        warn_if_key_exposed(&config.ca.cacerts_dir, bundle.layout());
    }
}

/// `--self-signed-secret` through the local cluster's client (the config
/// refuses the flag without Kubernetes access).
fn shared_root(config: &Config, clusters: Option<&Clusters>) -> Option<SharedRoot> {
    let secret = config.ca.self_signed_secret.clone()?;
    let (_, client) = clusters?.resolve(None).ok()?;
    let timeout = config.authn.kubernetes.as_ref()?.api_timeout;
    Some(SharedRoot::new(client.clone(), secret, timeout))
}

/// [`load_ca`] with the self-signed root kept in a Secret all replicas
/// share: a plugged-in bundle still wins; otherwise the Secret's root, or a
/// new one this replica creates the Secret with (create-only).
async fn load_shared_ca(
    config: &Config,
    shared: &SharedRoot,
    now: OffsetDateTime,
) -> Result<(CaBundle, SelfSignedSpec), AppError> {
    let (spec, dir) = (self_signed_spec(config), &config.ca.cacerts_dir);
    // A shared root is asked for, but an unreadable cacerts directory is
    // still a mistake to report, not "no bundle".
    let (_, files) = crate::reload::read_at_start(dir)?;
    let bundle = match files.map(|f| CaBundle::from_files(f, now)).transpose()? {
        Some(plugged) => plugged,
        None => {
            let (root, origin) = shared.load_or_create(&spec, now).await?;
            warn!(
                dir = %dir.display(),
                secret = %shared.secret(),
                origin = ?origin,
                root = %root.signing_cert().subject,
                "no plugged-in CA bundle: using the self-signed root kept in a Secret all replicas share"
            );
            root
        }
    };
    let bundle = crate::reload::with_extra_roots(bundle, config.ca.extra_trust_roots.as_deref())?;
    log_plugged(config, &bundle);
    Ok((bundle, spec))
}

/// A CA key other users can read is a leaked CA: say so at start (the
/// doctor reports it too). Never refused, since the operator may have reasons
/// (a read-only mount whose mode they cannot change).
fn warn_if_key_exposed(dir: &std::path::Path, layout: Layout) {
    let name = match layout {
        Layout::KubernetesTls => crate::ca::bundle::TLS_KEY,
        Layout::Istiod | Layout::SelfSigned => crate::ca::bundle::CA_KEY,
    };
    let file = dir.join(name);
    if let Some(exposure) = crate::fsutil::key_exposure(&file) {
        warn!(
            file = %file.display(),
            mode = %format!("{:04o}", exposure.mode),
            "the CA key file is readable by other users ({exposure}); chmod 600 it (or 0440 with only plugca's group)"
        );
    }
}

/// The authenticator chain in the order requests try it (client certificate
/// first), with TokenReview over `clusters` when Kubernetes is on.
async fn authenticators(
    config: &Config,
    ca: &Arc<Current>,
    clusters: Option<Arc<Clusters>>,
    metrics: &Arc<Metrics>,
) -> Result<Authenticators, AppError> {
    let mut chain: Vec<Box<dyn Authenticator>> = vec![Box::new(ClientCertAuthenticator::new(
        config.trust_domain.clone(),
        ca.clone(),
    ))];
    if let Some(jr) = &config.authn.jwt_rule {
        let source = Arc::new(RemoteJwks::new(jr.rule.clone(), jr.ca_file.as_deref())?);
        // Fetch once now so the first request does not wait; failure is
        // not fatal (the endpoint may come up later) and is logged.
        if source.fetch(None).await.is_ok() {
            info!(issuer = %jr.rule.issuer, keys = %source.describe(), "JWT_RULE authentication");
        }
        chain.push(Box::new(JwtAuthenticator::with_source(
            source,
            "JWT (JWT_RULE)",
            jr.rule.issuer.clone(),
            jr.rule.audiences(),
            config.trust_domain.clone(),
        )));
    }
    if let Some(jwt) = &config.authn.jwt {
        chain.push(Box::new(JwtAuthenticator::from_jwks_file(
            &jwt.jwks_file,
            jwt.issuer.clone(),
            jwt.audiences.clone(),
            config.trust_domain.clone(),
        )?));
    }
    let clusters = match (&config.authn.kubernetes, clusters) {
        (Some(k), Some(clusters)) => {
            info!(source = %k.local, clusters = ?clusters.ids(), audiences = ?k.token_audiences, "Kubernetes TokenReview authentication");
            chain.push(Box::new(
                KubeJwtAuthenticator::new(
                    clusters.clone(),
                    k.token_audiences.clone(),
                    config.trust_domain.clone(),
                    k.api_timeout,
                )
                .with_cache_ttl(k.token_review_cache_ttl)
                .with_metrics(metrics.clone()),
            ));
            Some(clusters)
        }
        _ => None,
    };
    if let Some(cidrs) = &config.authn.trusted_gateway_cidrs {
        info!(cidrs = ?cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(), "XFCC identities accepted from these gateways and loopback");
        chain.push(Box::new(XfccAuthenticator::new(cidrs.clone()).reserving(
            &tls::serving_dns_names(&config.server.server_dns_names),
        )));
    }
    if config.authn.insecure_trust_csr_identity {
        warn!(
            trust_domain = %config.trust_domain,
            "LAB MODE: --insecure-trust-csr-identity issues any identity a CSR names in the trust domain, without proof; never use it in a real mesh"
        );
    } else if config.authn.jwt.is_none()
        && config.authn.jwt_rule.is_none()
        && clusters.is_none()
        && config.authn.trusted_gateway_cidrs.is_none()
    {
        warn!(
            "no bootstrap authenticator configured (--kubeconfig, --jwks-file or --insecure-trust-csr-identity): only mTLS renewals can succeed"
        );
    }
    Ok(Authenticators::new(chain))
}

/// Who may ask for other identities' certificates: off without trusted node
/// accounts; otherwise the policy file and/or node authorization over the
/// clusters' pod caches (waited for, briefly, so the first requests succeed).
async fn impersonation(
    config: &Config,
    clusters: Option<&Clusters>,
    metrics: &Metrics,
) -> Result<Impersonation, AppError> {
    let trusted = config.impersonation.trusted_node_accounts.clone();
    if trusted.is_empty() {
        return Ok(Impersonation::disabled());
    }
    let policy = config
        .impersonation
        .policy_file
        .as_deref()
        .map(|p| Policy::load(p, &trusted))
        .transpose()?;
    let node = clusters.map(|c| {
        NodeAuthorizer::start(
            c,
            config.impersonation.node_authz_max_staleness,
            &metrics.node_authz,
        )
    });
    if let Some(node) = &node {
        let pending = node.wait_synced(INITIAL_POD_SYNC_WAIT).await;
        if !pending.is_empty() {
            warn!(clusters = ?pending, waited = ?INITIAL_POD_SYNC_WAIT, "pod caches not synced yet: impersonation requests get UNAVAILABLE until they are");
        }
    }
    info!(
        trusted = ?trusted.iter().map(ToString::to_string).collect::<Vec<_>>(),
        policy = ?config.impersonation.policy_file,
        node_authorization = node.is_some(),
        max_staleness = ?config.impersonation.node_authz_max_staleness,
        "impersonation enabled"
    );
    Ok(Impersonation::new(trusted, policy, node))
}

/// The fault switchboard and the issued-certificate log, only in test
/// harness mode (`--enable-fault-injection` or a `--fault`).
fn fault_harness(config: &Config) -> (Option<Arc<Faults>>, Option<Arc<IssuedLog>>) {
    let faults = config.faults.as_ref().map(|initial| {
        warn!(faults = ?initial, "FAULT INJECTION enabled (test harness mode): admin endpoints /faults and /issued are open on the monitoring port");
        let f = Arc::new(Faults::with_max_ttl(config.issuance.max_ttl));
        f.set_global(initial.clone());
        f
    });
    let issued_log = faults.as_ref().map(|_| Arc::new(IssuedLog::default()));
    (faults, issued_log)
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr).await.map_err(|e| AppError::Bind {
        addr,
        what,
        reason: e.to_string(),
    })
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
