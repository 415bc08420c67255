//! An in-process CA for test harnesses (feature `testing`): one call starts a
//! real plugca on `127.0.0.1:0` over real TLS, with a ready gRPC client, a JWT
//! minting helper, a record of every issued certificate, and fault injection.
//!
//! ```no_run
//! # async fn demo() {
//! use plugca::testing::TestCa;
//! let ca = TestCa::builder().jwt().start().await.unwrap();
//! let mut client = ca.client().await.unwrap();
//! let token = ca.mint_token("foo", "httpbin");
//! // ... call client.create_certificate(..) with `authorization: Bearer <token>` ...
//! ca.faults().push_next(vec!["refuse:unavailable".parse().unwrap()]);
//! assert!(ca.issued().is_empty());
//! ca.shutdown().await;
//! # }
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use tonic::transport::Channel;

use crate::app::{self, AppError, Running};
use crate::ca::Current;
use crate::client::{self, ClientError, Connection};
use crate::config::Config;
use crate::jwt_issuer::JwtIssuer;
use crate::metrics::Metrics;
use crate::pb::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::server::harness::{Faults, IssuedLog, IssuedRecord};

/// Issuer of the tokens [`TestCa::mint_token`] makes.
pub const TEST_JWT_ISSUER: &str = "https://plugca.test";

#[derive(Debug, thiserror::Error)]
pub enum TestCaError {
    #[error("invalid test CA settings: {0}")]
    Config(String),
    #[error("{0}")]
    Start(#[from] AppError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Client(#[from] ClientError),
}

/// How callers authenticate to the test CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestAuthn {
    /// Identity from the CSR's SPIFFE URI SAN (`--insecure-trust-csr-identity`).
    LabMode,
    /// Bearer JWTs signed by a generated key; mint them with [`TestCa::mint_token`].
    Jwt,
}

/// Settings of a [`TestCa`].
#[derive(Debug, Clone)]
pub struct TestCaBuilder {
    cacerts_dir: Option<PathBuf>,
    authn: TestAuthn,
    trust_domain: String,
    extra_args: Vec<String>,
}

impl Default for TestCaBuilder {
    fn default() -> Self {
        TestCaBuilder {
            cacerts_dir: None,
            authn: TestAuthn::LabMode,
            trust_domain: "cluster.local".into(),
            extra_args: Vec::new(),
        }
    }
}

impl TestCaBuilder {
    /// Serve this plugged-in bundle instead of a fresh self-signed root.
    pub fn bundle(mut self, cacerts_dir: impl AsRef<Path>) -> Self {
        self.cacerts_dir = Some(cacerts_dir.as_ref().to_path_buf());
        self
    }

    /// Authenticate with generated JWTs instead of lab mode.
    pub fn jwt(mut self) -> Self {
        self.authn = TestAuthn::Jwt;
        self
    }

    pub fn trust_domain(mut self, td: &str) -> Self {
        self.trust_domain = td.into();
        self
    }

    /// Any other `plugca serve` flag (`--max-ttl 1h`, ...).
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    pub async fn start(self) -> Result<TestCa, TestCaError> {
        let scratch = tempfile::tempdir()?;
        let cacerts = match &self.cacerts_dir {
            Some(d) => d.clone(),
            None => scratch.path().join("cacerts-empty"),
        };
        let mut args: Vec<String> = ["--enable-fault-injection", "--trust-domain"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(self.trust_domain.clone());
        args.push("--cacerts-dir".into());
        args.push(cacerts.display().to_string());
        if self.cacerts_dir.is_none() {
            // No bundle: ask for the generated root explicitly (without it
            // an empty cacerts directory is an error at start).
            args.push("--self-signed".into());
        }
        let mut jwt_key = None;
        match self.authn {
            TestAuthn::LabMode => args.push("--insecure-trust-csr-identity".into()),
            TestAuthn::Jwt => {
                let key = JwtIssuer::generate(Algorithm::ES256, "plugca-test")
                    .map_err(|e| TestCaError::Config(e.to_string()))?;
                let jwks_path = scratch.path().join("jwks.json");
                std::fs::write(&jwks_path, JwtIssuer::jwks(&[&key]))?;
                args.extend([
                    "--jwt-issuer".into(),
                    TEST_JWT_ISSUER.into(),
                    "--jwks-file".into(),
                    jwks_path.display().to_string(),
                ]);
                jwt_key = Some(key);
            }
        }
        args.extend(self.extra_args.iter().cloned());
        let server = Server::spawn(&args).await?;
        server
            .running
            .wait_ready(Duration::from_secs(10))
            .await
            .map_err(|_| {
                TestCaError::Config("the test CA did not become ready within 10 s".into())
            })?;
        Ok(TestCa {
            faults: server.running.faults().unwrap_or_default(),
            issued: server.running.issued_log().unwrap_or_default(),
            server,
            jwt_key,
            trust_domain: self.trust_domain,
            _scratch: scratch,
        })
    }
}

/// A running in-process `plugca serve` on loopback port-0 listeners, and
/// what a client needs to reach it: the server the integration tests start.
/// Built on [`app::spawn`], like the binary.
pub struct Server {
    pub grpc: SocketAddr,
    pub monitoring: SocketAddr,
    /// The root bundle clients should trust.
    pub root_pem: String,
    pub metrics: Arc<Metrics>,
    pub ca: Arc<Current>,
    running: Running,
}

impl Server {
    /// Starts `plugca serve` with `args` plus `--grpc-addr 127.0.0.1:0
    /// --monitoring-addr 127.0.0.1:0` and waits (at most 5 s) until it is
    /// ready. Panics when it cannot start: for tests.
    pub async fn start<S: AsRef<str>>(args: &[S]) -> Server {
        let server = match Server::spawn(args).await {
            Ok(server) => server,
            Err(e) => panic!("the test server did not start: {e}"),
        };
        if server
            .running
            .wait_ready(Duration::from_secs(5))
            .await
            .is_err()
        {
            panic!("the server did not become ready within 5 s");
        }
        server
    }

    /// Starts the server without waiting for `/ready`.
    pub async fn spawn<S: AsRef<str>>(args: &[S]) -> Result<Server, TestCaError> {
        let mut all = vec![
            "--grpc-addr",
            "127.0.0.1:0",
            "--monitoring-addr",
            "127.0.0.1:0",
        ];
        all.extend(args.iter().map(AsRef::as_ref));
        let config = Config::from_args(&all).map_err(|e| TestCaError::Config(e.to_string()))?;
        let running = app::spawn(&config).await?;
        Ok(Server {
            grpc: running.grpc_addr(),
            monitoring: running.monitoring_addr(),
            root_pem: running
                .ca()
                .current()
                .map(|b| b.root_bundle().to_string())
                .unwrap_or_default(),
            metrics: running.metrics(),
            ca: running.ca(),
            running,
        })
    }

    /// The running server (reloader, faults, issued log).
    pub fn running(&self) -> &Running {
        &self.running
    }

    /// A connected client that trusts the server's root.
    pub async fn client(&self) -> IstioCertificateServiceClient<Channel> {
        self.client_with(None).await
    }

    /// A connected client presenting `identity` (certificate chain PEM, key PEM).
    pub async fn client_with(
        &self,
        identity: Option<(String, String)>,
    ) -> IstioCertificateServiceClient<Channel> {
        let connected = client::connect(&Connection {
            addr: self.grpc.to_string(),
            root_cert_pem: self.root_pem.clone(),
            server_name: None,
            client_identity: identity,
            timeout: Duration::from_secs(20),
        })
        .await;
        match connected {
            Ok(c) => c,
            Err(e) => panic!("cannot connect to the test server: {e}"),
        }
    }

    /// Stops the server and waits for in-flight requests; panics if it failed.
    pub async fn stop(self) {
        if let Err(e) = self.running.stop().await {
            panic!("the test server failed: {e}");
        }
    }

    /// GET a monitoring path; returns (status, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.monitoring, path).await
    }
}

/// Minimal HTTP/1.1 GET over a raw socket (no extra client dependency);
/// panics on a connection failure or a malformed answer: for tests.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = match tokio::net::TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => panic!("GET {path}: cannot connect to {addr}: {e}"),
    };
    let sent = s
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
    let mut buf = Vec::new();
    if let Err(e) = sent.and(s.read_to_end(&mut buf).await.map(drop)) {
        panic!("GET {path} on {addr}: {e}");
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    let Some(status) = text.get(9..12).and_then(|s| s.parse().ok()) else {
        panic!("GET {path} on {addr}: not an HTTP answer: {text:?}");
    };
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A running in-process CA.
pub struct TestCa {
    server: Server,
    faults: Arc<Faults>,
    issued: Arc<IssuedLog>,
    jwt_key: Option<JwtIssuer>,
    trust_domain: String,
    _scratch: tempfile::TempDir,
}

impl TestCa {
    pub fn builder() -> TestCaBuilder {
        TestCaBuilder::default()
    }

    /// A fresh self-signed CA in lab mode.
    pub async fn start() -> Result<TestCa, TestCaError> {
        Self::builder().start().await
    }

    /// The gRPC (TLS) address.
    pub fn addr(&self) -> SocketAddr {
        self.server.grpc
    }

    /// The monitoring (HTTP) address: `/ready`, `/metrics`, `/faults`, `/issued`.
    pub fn monitoring_addr(&self) -> SocketAddr {
        self.server.monitoring
    }

    /// The root bundle clients should trust (the last response element).
    pub fn root_pem(&self) -> &str {
        &self.server.root_pem
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// `spiffe://<trust domain>/ns/<ns>/sa/<sa>`.
    pub fn spiffe_id(&self, ns: &str, sa: &str) -> String {
        format!("spiffe://{}/ns/{ns}/sa/{sa}", self.trust_domain)
    }

    /// A connected client that trusts the CA's root.
    pub async fn client(&self) -> Result<IstioCertificateServiceClient<Channel>, TestCaError> {
        Ok(client::connect(&Connection {
            addr: self.server.grpc.to_string(),
            root_cert_pem: self.server.root_pem.clone(),
            server_name: None,
            client_identity: None,
            timeout: Duration::from_secs(30),
        })
        .await?)
    }

    /// A bearer token for service account `ns/sa`, valid for an hour
    /// (only with [`TestCaBuilder::jwt`]).
    pub fn mint_token(&self, ns: &str, sa: &str) -> String {
        self.mint_token_with(ns, sa, "istio-ca", 3600)
    }

    /// A bearer token with a chosen audience and lifetime (negative: already expired).
    pub fn mint_token_with(
        &self,
        ns: &str,
        sa: &str,
        audience: &str,
        lifetime_secs: i64,
    ) -> String {
        let Some(key) = &self.jwt_key else {
            panic!("mint_token needs TestCa::builder().jwt()");
        };
        key.mint_service_account(TEST_JWT_ISSUER, audience, ns, sa, lifetime_secs)
            .unwrap_or_default()
    }

    /// Every certificate issued so far, oldest first.
    pub fn issued(&self) -> Vec<IssuedRecord> {
        self.issued.all()
    }

    /// Fault injection: `set_global`, `push_next` (next request only), `clear`.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// The live CA state (swap bundles in tests with [`Current::replace`]).
    pub fn ca_state(&self) -> &Arc<Current> {
        &self.server.ca
    }

    /// The Prometheus text the monitoring port would serve.
    pub fn metrics_text(&self) -> String {
        self.server.metrics.render()
    }

    /// Stops the CA and waits for in-flight requests.
    pub async fn shutdown(self) {
        let _ = self.server.running.stop().await;
    }
}
