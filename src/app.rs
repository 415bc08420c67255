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
use crate::authn::jwt::{JwksError, JwtAuthenticator};
use crate::authn::{Authenticator, Authenticators};
use crate::ca::generate::{self, CaSpec, GenerateError, KeyChoice};
use crate::ca::{BundleError, CaBundle};
use crate::config::Config;
use crate::issuance::TtlPolicy;
use crate::metrics::Metrics;
use crate::monitoring::{self, MonitoringState};
use crate::pb::istio_certificate_service_server::IstioCertificateServiceServer;
use crate::server::{CaState, CertificateService, ServiceConfig};
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
    Tls(#[from] TlsError),
    #[error("generating the self-signed root failed: {0}")]
    SelfSigned(#[from] GenerateError),
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
    serving: Arc<AtomicBool>,
}

impl App {
    pub async fn build(config: &Config) -> Result<App, AppError> {
        let now = OffsetDateTime::now_utc();
        let bundle = match CaBundle::load_dir(&config.cacerts_dir, now)? {
            Some(bundle) => {
                info!(
                    dir = %config.cacerts_dir.display(),
                    layout = %bundle.layout(),
                    signing = %bundle.signing_cert().subject,
                    key = %bundle.signer().key_kind(),
                    roots = bundle.roots().len(),
                    "plugged-in CA loaded"
                );
                bundle
            }
            None => {
                warn!(
                    dir = %config.cacerts_dir.display(),
                    "no CA bundle in the directory: using an in-memory self-signed root (it changes on every start)"
                );
                self_signed_bundle(config, now)?
            }
        };
        let metrics = Arc::new(Metrics::new());
        metrics.set_expiry(
            bundle.root_expiry().unix_timestamp(),
            bundle.signing_cert().not_after.unix_timestamp(),
        );
        let tls_config = Arc::new(ArcSwap::new(tls::server_config(
            &bundle,
            &tls::serving_dns_names(&config.server_dns_names),
        )?));
        let ca = Arc::new(CaState::new(Some(bundle)));

        let mut chain: Vec<Box<dyn Authenticator>> = vec![Box::new(ClientCertAuthenticator::new(
            config.trust_domain.clone(),
        ))];
        if let Some(jwt) = &config.jwt {
            chain.push(Box::new(JwtAuthenticator::from_jwks_file(
                &jwt.jwks_file,
                jwt.issuer.clone(),
                jwt.audiences.clone(),
                config.trust_domain.clone(),
            )?));
        }
        if config.insecure_trust_csr_identity {
            warn!(
                trust_domain = %config.trust_domain,
                "LAB MODE: --insecure-trust-csr-identity issues any identity a CSR names in the trust domain, without proof; never use it in a real mesh"
            );
        } else if config.jwt.is_none() {
            warn!(
                "no bootstrap authenticator configured (--jwks-file or --insecure-trust-csr-identity): only mTLS renewals can succeed"
            );
        }
        let authenticators = Authenticators::new(chain);
        info!(authenticators = ?authenticators.names(), lab_mode = config.insecure_trust_csr_identity, "authentication");
        let service = CertificateService::new(
            ca.clone(),
            ServiceConfig {
                authenticators,
                lab_mode: config
                    .insecure_trust_csr_identity
                    .then(|| config.trust_domain.clone()),
                ttl: TtlPolicy {
                    default_ttl: config.default_ttl,
                    max_ttl: config.max_ttl,
                },
                max_concurrent_signs: config.max_concurrent_signs,
                sign_queue_timeout: config.sign_queue_timeout,
            },
            metrics.clone(),
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
        });
        let mut mon_stop = stop_rx.clone();
        let monitoring_task = tokio::spawn(async move {
            let _ = axum::serve(self.monitoring_listener, monitoring)
                .with_graceful_shutdown(async move {
                    let _ = mon_stop.wait_for(|s| *s).await;
                })
                .await;
        });

        let incoming = tls::incoming(self.grpc_listener, self.tls_config.clone());
        let mut grpc_stop = stop_rx.clone();
        let grpc = tonic::transport::Server::builder()
            .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
            .add_service(
                IstioCertificateServiceServer::new(self.service)
                    .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES),
            )
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = grpc_stop.wait_for(|s| *s).await;
            });
        let grpc_task = tokio::spawn(grpc);
        self.serving.store(true, Ordering::Release);
        info!("serving");

        shutdown.await;
        info!("shutting down: no new connections, draining in-flight requests");
        self.serving.store(false, Ordering::Release);
        let _ = stop_tx.send(true);
        let grpc_result = grpc_task.await;
        let _ = monitoring_task.await;
        match grpc_result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(AppError::Serve(e.to_string())),
            Err(e) => Err(AppError::Serve(e.to_string())),
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

/// istiod's self-signed root: subject `O=<trust domain>`, 10 years by default.
fn self_signed_bundle(config: &Config, now: OffsetDateTime) -> Result<CaBundle, AppError> {
    let key = generate::generate_key(KeyChoice::P256)?;
    let ttl =
        time::Duration::try_from(config.self_signed_ttl).unwrap_or(time::Duration::days(3650));
    let root = generate::self_signed_root(
        &CaSpec {
            organization: Some(config.trust_domain.to_string()),
            common_name: None,
            locality: None,
            not_before: now,
            not_after: now + ttl,
            path_len: None,
            dns_sans: Vec::new(),
        },
        key,
    )?;
    Ok(CaBundle::self_signed(root.cert_pem, root.key, now)?)
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
