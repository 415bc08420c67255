//! Wiring: load the CA, build the authenticators, bind every listener first
//! (so port 0 works in tests), then serve until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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
use crate::ca::selfsigned::SelfSignedSpec;
use crate::ca::{BundleError, Layout};
use crate::config::Config;
use crate::fault::Faults;
use crate::identity::TrustDomains;
use crate::impersonation::Impersonation;
use crate::impersonation::node::{INITIAL_POD_SYNC_WAIT, NodeAuthorizer};
use crate::impersonation::policy::{Policy, PolicyError};
use crate::issuance::TtlPolicy;
use crate::kubernetes::{Clusters, KubeSetupError};
use crate::metrics::Metrics;
use crate::monitoring::{self, MonitoringState};
use crate::pb::istio_certificate_service_server::IstioCertificateServiceServer;
use crate::reload::{ReloadError, Reloader};
use crate::server::{CaState, CertificateService, IssuedLog, ServiceConfig};
use crate::tls::{self, TlsError};

/// Largest gRPC message accepted (a CSR is a few KiB; istiod allows 4 MiB).
pub const MAX_GRPC_MESSAGE_BYTES: usize = 256 * 1024;
/// HTTP/2 streams per connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;

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
}

/// A built server whose listeners are bound but not yet serving.
pub struct App {
    grpc_listener: TcpListener,
    monitoring_listener: TcpListener,
    service: CertificateService,
    tls_config: Arc<ArcSwap<rustls::ServerConfig>>,
    ca: Arc<CaState>,
    metrics: Arc<Metrics>,
    reloader: Arc<Reloader>,
    faults: Option<Arc<Faults>>,
    issued_log: Option<Arc<IssuedLog>>,
    reload_interval: std::time::Duration,
    drain_timeout: std::time::Duration,
    serving: Arc<AtomicBool>,
}

impl App {
    pub async fn build(config: &Config) -> Result<App, AppError> {
        let now = OffsetDateTime::now_utc();
        let self_signed = SelfSignedSpec {
            dir: config.self_signed_dir.clone(),
            key: config.self_signed_key,
            ttl: config.self_signed_ttl,
            organization: config.trust_domain.to_string(),
        };
        let bundle = Reloader::initial_bundle(
            &config.cacerts_dir,
            &self_signed,
            config.extra_trust_roots.as_deref(),
            now,
        )?;
        if bundle.layout() != Layout::SelfSigned {
            info!(
                dir = %config.cacerts_dir.display(),
                layout = %bundle.layout(),
                signing = %bundle.signing_cert().subject,
                key = %bundle.signer().key_kind(),
                roots = bundle.roots().len(),
                "plugged-in CA loaded"
            );
        }
        let metrics = Arc::new(Metrics::new());
        let dns_names = tls::serving_dns_names(&config.server_dns_names);
        let tls_config = Arc::new(ArcSwap::new(tls::server_config(&bundle, &dns_names)?));
        let ca = Arc::new(CaState::new(Some(bundle)));
        let reloader = Arc::new(Reloader::new(
            config.cacerts_dir.clone(),
            ca.clone(),
            tls_config.clone(),
            dns_names,
            metrics.clone(),
            config.allow_root_replacement,
            config.extra_trust_roots.clone(),
            self_signed,
            config.expiry_warning,
        ));
        reloader.check_expiry(now);

        let mut chain: Vec<Box<dyn Authenticator>> = vec![Box::new(ClientCertAuthenticator::new(
            config.trust_domain.clone(),
        ))];
        if let Some(jr) = &config.jwt_rule {
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
        if let Some(jwt) = &config.jwt {
            chain.push(Box::new(JwtAuthenticator::from_jwks_file(
                &jwt.jwks_file,
                jwt.issuer.clone(),
                jwt.audiences.clone(),
                config.trust_domain.clone(),
            )?));
        }
        let clusters = match &config.kubernetes {
            Some(k) => {
                let clusters = Arc::new(Clusters::load(k).await?);
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
            None => None,
        };
        if let Some(cidrs) = &config.trusted_gateway_cidrs {
            info!(cidrs = ?cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(), "XFCC identities accepted from these gateways and loopback");
            chain.push(Box::new(
                XfccAuthenticator::new(cidrs.clone())
                    .reserving(&tls::serving_dns_names(&config.server_dns_names)),
            ));
        }
        if config.insecure_trust_csr_identity {
            warn!(
                trust_domain = %config.trust_domain,
                "LAB MODE: --insecure-trust-csr-identity issues any identity a CSR names in the trust domain, without proof; never use it in a real mesh"
            );
        } else if config.jwt.is_none()
            && config.jwt_rule.is_none()
            && clusters.is_none()
            && config.trusted_gateway_cidrs.is_none()
        {
            warn!(
                "no bootstrap authenticator configured (--kubeconfig, --jwks-file or --insecure-trust-csr-identity): only mTLS renewals can succeed"
            );
        }
        let authenticators = Authenticators::new(chain);
        let trusted = config.impersonation.trusted_node_accounts.clone();
        let impersonation = if trusted.is_empty() {
            Impersonation::disabled()
        } else {
            let policy = config
                .impersonation
                .policy_file
                .as_deref()
                .map(|p| Policy::load(p, &trusted))
                .transpose()?;
            let node = clusters.as_deref().map(NodeAuthorizer::start);
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
                "impersonation enabled"
            );
            Impersonation::new(trusted, policy, node)
        };
        let faults = config.faults.as_ref().map(|initial| {
            warn!(faults = ?initial, "FAULT INJECTION enabled (test harness mode): admin endpoints /faults and /issued are open on the monitoring port");
            let f = Arc::new(Faults::default());
            f.set_global(initial.clone());
            f
        });
        let issued_log = faults.as_ref().map(|_| Arc::new(IssuedLog::default()));
        info!(authenticators = ?authenticators.names(), lab_mode = config.insecure_trust_csr_identity, "authentication");
        let service = CertificateService::new(
            ca.clone(),
            ServiceConfig {
                authenticators,
                lab_mode: config
                    .insecure_trust_csr_identity
                    .then(|| config.trust_domain.clone()),
                impersonation,
                ttl: TtlPolicy {
                    default_ttl: config.default_ttl,
                    max_ttl: config.max_ttl,
                },
                max_concurrent_signs: config.max_concurrent_signs,
                sign_queue_timeout: config.sign_queue_timeout,
                trust_domains: TrustDomains::new(
                    config.trust_domain.clone(),
                    config.trust_domain_aliases.clone(),
                ),
            },
            metrics.clone(),
            faults.clone(),
            issued_log.clone(),
        );

        let grpc_listener = bind(config.grpc_addr, "gRPC").await?;
        let monitoring_listener = bind(config.monitoring_addr, "monitoring").await?;
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
            reload_interval: config.reload_interval,
            drain_timeout: config.drain_timeout,
            serving: Arc::new(AtomicBool::new(false)),
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_listener
            .local_addr()
            .expect("a bound listener has a local address")
    }

    pub fn monitoring_addr(&self) -> SocketAddr {
        self.monitoring_listener
            .local_addr()
            .expect("a bound listener has a local address")
    }

    pub fn ca(&self) -> Arc<CaState> {
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

    /// Serves until `shutdown` completes, then drains in-flight requests.
    pub async fn run(
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
        let mut mon_stop = stop_rx.clone();
        let monitoring_task = tokio::spawn(async move {
            let _ = axum::serve(self.monitoring_listener, monitoring)
                .with_graceful_shutdown(async move {
                    let _ = mon_stop.wait_for(|s| *s).await;
                })
                .await;
        });

        let reload_task = self
            .reloader
            .clone()
            .spawn(self.reload_interval, stop_rx.clone());
        let incoming = tls::incoming(self.grpc_listener, self.tls_config.clone(), stop_rx.clone());
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<IstioCertificateServiceServer<CertificateService>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| AppError::Serve(format!("reflection: {e}")))?;
        let mut grpc_stop = stop_rx.clone();
        let grpc = tonic::transport::Server::builder()
            .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(
                IstioCertificateServiceServer::new(self.service)
                    .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES),
            )
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = grpc_stop.wait_for(|s| *s).await;
            });
        let mut grpc_task = tokio::spawn(grpc);
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
