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

use clap::Parser as _;
use tonic::transport::Channel;

use crate::app::{App, AppError};
use crate::ca::Current;
use crate::cli::{Cli, Command};
use crate::client::{self, ClientError, Connection};
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
        let mut args: Vec<String> = [
            "plugca",
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--monitoring-addr",
            "127.0.0.1:0",
            "--enable-fault-injection",
            "--trust-domain",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(self.trust_domain.clone());
        args.push("--cacerts-dir".into());
        args.push(cacerts.display().to_string());
        let mut jwt_key = None;
        match self.authn {
            TestAuthn::LabMode => args.push("--insecure-trust-csr-identity".into()),
            TestAuthn::Jwt => {
                let (key, jwks) = jwt_key_and_jwks().map_err(TestCaError::Config)?;
                let jwks_path = scratch.path().join("jwks.json");
                std::fs::write(&jwks_path, jwks)?;
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
        let cli = Cli::try_parse_from(&args).map_err(|e| TestCaError::Config(e.to_string()))?;
        let Command::Serve(serve) = cli.command else {
            return Err(TestCaError::Config("not a serve command".into()));
        };
        let config = serve
            .into_config()
            .map_err(|e| TestCaError::Config(e.to_string()))?;
        let app = App::build(&config).await?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut ca = TestCa {
            addr: app.grpc_addr(),
            monitoring_addr: app.monitoring_addr(),
            root_pem: app
                .ca()
                .current()
                .map(|b| b.root_bundle().to_string())
                .unwrap_or_default(),
            ca_state: app.ca(),
            metrics: app.metrics(),
            faults: app.faults().unwrap_or_default(),
            issued: app.issued_log().unwrap_or_default(),
            jwt_key,
            trust_domain: self.trust_domain,
            stop: Some(stop),
            task: None,
            _scratch: scratch,
        };
        ca.task = Some(tokio::spawn(app.run(async move {
            let _ = stopped.await;
        })));
        wait_ready(ca.monitoring_addr).await?;
        Ok(ca)
    }
}

/// A running in-process CA.
pub struct TestCa {
    addr: SocketAddr,
    monitoring_addr: SocketAddr,
    root_pem: String,
    ca_state: Arc<Current>,
    metrics: Arc<Metrics>,
    faults: Arc<Faults>,
    issued: Arc<IssuedLog>,
    jwt_key: Option<jsonwebtoken::EncodingKey>,
    trust_domain: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), AppError>>>,
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
        self.addr
    }

    /// The monitoring (HTTP) address: `/ready`, `/metrics`, `/faults`, `/issued`.
    pub fn monitoring_addr(&self) -> SocketAddr {
        self.monitoring_addr
    }

    /// The root bundle clients should trust (the last response element).
    pub fn root_pem(&self) -> &str {
        &self.root_pem
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
            addr: self.addr.to_string(),
            root_cert_pem: self.root_pem.clone(),
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
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("plugca-test".into());
        let claims = serde_json::json!({
            "iss": TEST_JWT_ISSUER,
            "aud": [audience],
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "iat": now,
            "nbf": now - 60,
            "exp": now + lifetime_secs,
        });
        jsonwebtoken::encode(&header, &claims, key).unwrap_or_default()
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
        &self.ca_state
    }

    /// The Prometheus text the monitoring port would serve.
    pub fn metrics_text(&self) -> String {
        self.metrics.render()
    }

    /// Stops the CA and waits for in-flight requests.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Waits (at most 10 s) until `/ready` answers 200.
async fn wait_ready(addr: SocketAddr) -> Result<(), TestCaError> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    for _ in 0..400 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            let _ = s
                .write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf).await;
            if buf.starts_with(b"HTTP/1.1 200") {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err(TestCaError::Config(
        "the test CA did not become ready within 10 s".into(),
    ))
}

/// A P-256 signing key and a JWKS naming it `plugca-test`.
fn jwt_key_and_jwks() -> Result<(jsonwebtoken::EncodingKey, Vec<u8>), String> {
    let kp =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let key = jsonwebtoken::EncodingKey::from_ec_der(&kp.serialize_der());
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, jsonwebtoken::Algorithm::ES256)
        .map_err(|e| e.to_string())?;
    jwk.common.key_id = Some("plugca-test".into());
    let set = jsonwebtoken::jwk::JwkSet { keys: vec![jwk] };
    Ok((key, serde_json::to_vec(&set).map_err(|e| e.to_string())?))
}
