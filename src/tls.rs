//! TLS on the gRPC port: a serving certificate issued by the CA itself, client
//! certificates requested and verified against the CA roots when sent, and an
//! accept loop that never waits: it closes sockets over the caps at once and
//! handshakes each of the others in its own task under a deadline.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::debug;

use crate::asn1::GeneralName;
use crate::ca::{CaBundle, LeafSpec};
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::net::{GaugeGuard, PerIp, PerIpGuard, Port, RejectReason};

/// DNS names istiod's serving certificate carries by default.
pub const DEFAULT_DNS_NAMES: [&str; 4] = [
    "istiod.istio-system.svc",
    "istiod-remote.istio-system.svc",
    "istio-pilot.istio-system.svc",
    "localhost",
];
/// Serving certificate lifetime (clamped to the CA's).
pub const SERVING_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("serving key generation failed: {0}")]
    Key(String),
    #[error("issuing the serving certificate failed: {0}")]
    Issue(String),
    #[error("building the TLS configuration failed: {0}")]
    Config(String),
}

/// The rustls crypto provider of this build: aws-lc-rs with the `aws-lc`
/// feature, ring otherwise.
///
/// With `aws-lc` both providers are compiled into rustls, so this also makes
/// aws-lc-rs the process default (first call wins): code that builds a config
/// without naming a provider (tonic's client TLS, kube's client) would
/// otherwise fall back to ring or panic.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    #[cfg(feature = "aws-lc")]
    let provider = {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let _ = provider.clone().install_default();
        provider
    };
    #[cfg(not(feature = "aws-lc"))]
    let provider = rustls::crypto::ring::default_provider();
    Arc::new(provider)
}

/// Sorted, de-duplicated serving DNS names: istiod's defaults plus `extra`.
pub fn serving_dns_names(extra: &[String]) -> Vec<String> {
    let mut names: Vec<String> = DEFAULT_DNS_NAMES.iter().map(|s| s.to_string()).collect();
    names.extend(extra.iter().filter(|s| !s.is_empty()).cloned());
    names.sort();
    names.dedup();
    names
}

/// A serving certificate issued by the CA with the server's own leaf profile,
/// and its fresh P-256 key. `Debug` elides the key.
pub struct ServingCert {
    pub leaf: crate::ca::IssuedLeaf,
    /// The intermediates served after the leaf (DER), as in CreateCertificate.
    pub chain_der: Vec<Vec<u8>>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    key: rcgen::KeyPair,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("serial", &self.leaf.serial_hex)
            .field("key", &"[elided]")
            .finish_non_exhaustive()
    }
}

impl ServingCert {
    /// The key as PKCS#8 DER.
    pub fn secret_key_der(&self) -> Vec<u8> {
        self.key.serialize_der()
    }

    /// The key as PKCS#8 PEM (`BEGIN PRIVATE KEY`).
    pub fn secret_key_pem(&self) -> zeroize::Zeroizing<String> {
        zeroize::Zeroizing::new(self.key.serialize_pem())
    }
}

/// Issues a serving certificate for `sans` from `bundle`: this server's own
/// gRPC certificate and istiod's `istiod-tls` both come from here.
pub fn issue_serving(
    bundle: &CaBundle,
    sans: &[GeneralName],
    ttl: Duration,
    now: OffsetDateTime,
) -> Result<ServingCert, TlsError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| TlsError::Key(e.to_string()))?;
    let (not_before, not_after) = crate::issuance::validity(now, ttl, bundle.not_after_limit());
    let leaf = bundle
        .signer()
        .issue(&LeafSpec::serving(
            &key,
            sans.to_vec(),
            (not_before, not_after),
        ))
        .map_err(|e| TlsError::Issue(e.to_string()))?;
    Ok(ServingCert {
        leaf,
        chain_der: bundle.served_chain_der(),
        not_before,
        not_after,
        key,
    })
}

/// Issues a serving certificate from `bundle` and builds the rustls config.
pub fn server_config(
    bundle: &CaBundle,
    dns_names: &[String],
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = crypto_provider();
    let mut sans: Vec<GeneralName> = dns_names.iter().cloned().map(GeneralName::Dns).collect();
    sans.push(GeneralName::Ip(IpAddr::from([127, 0, 0, 1])));
    sans.push(GeneralName::Ip(IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])));
    let serving = issue_serving(bundle, &sans, SERVING_CERT_TTL, OffsetDateTime::now_utc())?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(serving.secret_key_der()));
    let mut chain = vec![CertificateDer::from(serving.leaf.der)];
    chain.extend(serving.chain_der.into_iter().map(CertificateDer::from));

    let mut roots = rustls::RootCertStore::empty();
    for root in bundle.roots() {
        roots
            .add(CertificateDer::from(root.der.clone()))
            .map_err(|e| TlsError::Config(format!("root {}: {e}", root.name())))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key_der)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A finished TLS connection and the connection slots it holds (released
/// when it is dropped).
pub struct Accepted {
    pub stream: TlsStream<TcpStream>,
    pub peer: SocketAddr,
    pub slot: ConnectionSlot,
}

/// Accepts TCP connections and yields finished TLS streams. `accept` never
/// waits: a socket over the connection or handshake caps (global or per
/// source address) is closed at once and counted. Each handshake runs in its
/// own task under [`Limits::handshake_timeout`]. The config is read per
/// connection, so a swapped config applies to new ones.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ArcSwap<ServerConfig>>,
    limits: &Limits,
    metrics: Arc<Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> mpsc::Receiver<Accepted> {
    let (tx, rx) = mpsc::channel(1024);
    let connections = Arc::new(Semaphore::new(limits.max_grpc_connections));
    let handshakes = Arc::new(Semaphore::new(limits.max_handshakes));
    let connections_per_ip = Arc::new(PerIp::default());
    let handshakes_per_ip = Arc::new(PerIp::default());
    let limits = limits.clone();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => break,
            };
            let (tcp, peer) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    // Out of file descriptors and similar: back off briefly.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                break;
            }
            let reject = |reason| {
                metrics.net.rejected(Port::grpc, reason);
                debug!(%peer, ?reason, "connection closed at once");
            };
            // Dropping `tcp` closes it: nothing is read, nothing is waited for.
            let Ok(global) = connections.clone().try_acquire_owned() else {
                reject(RejectReason::connection_limit);
                continue;
            };
            let Some(per_ip) =
                connections_per_ip.try_acquire(peer.ip(), limits.max_connections_per_ip)
            else {
                reject(RejectReason::connection_limit_per_ip);
                continue;
            };
            let Ok(handshake) = handshakes.clone().try_acquire_owned() else {
                reject(RejectReason::handshake_limit);
                continue;
            };
            let Some(handshake_per_ip) =
                handshakes_per_ip.try_acquire(peer.ip(), limits.max_handshakes_per_ip)
            else {
                reject(RejectReason::handshake_limit_per_ip);
                continue;
            };
            let slot = ConnectionSlot {
                _global: global,
                _per_ip: per_ip,
                _open: metrics.net.grpc_connections.clone().into(),
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(config.load_full());
            let tx = tx.clone();
            let metrics = metrics.clone();
            let timeout = limits.handshake_timeout;
            tokio::spawn(async move {
                let in_progress = GaugeGuard::from(metrics.net.grpc_handshakes.clone());
                let result = tokio::time::timeout(timeout, acceptor.accept(tcp)).await;
                drop((handshake, handshake_per_ip, in_progress));
                match result {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Accepted { stream, peer, slot }).await;
                    }
                    Ok(Err(e)) => {
                        metrics
                            .net
                            .rejected(Port::grpc, RejectReason::handshake_failed);
                        debug!(%peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        metrics
                            .net
                            .rejected(Port::grpc, RejectReason::handshake_timeout);
                        debug!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    rx
}

/// A gRPC connection's share of the connection caps.
pub struct ConnectionSlot {
    _global: OwnedSemaphorePermit,
    _per_ip: PerIpGuard,
    _open: GaugeGuard,
}
