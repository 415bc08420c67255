//! A CreateCertificate client that behaves like a sidecar or ztunnel: it makes
//! a key and CSR, calls the CA over TLS, and splits the response into
//! `cert-chain.pem` (leaf first) and `root-cert.pem` (the last element).

use std::path::Path;
use std::time::Duration;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::ca::generate::{self, KeyChoice};
use crate::pb::IstioCertificateRequest;
use crate::pb::istio_certificate_service_client::IstioCertificateServiceClient;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Input(String),
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("CreateCertificate failed: {code:?}: {message}")]
    Rpc { code: tonic::Code, message: String },
    #[error("the CA returned {0} element(s); at least 2 (leaf and root) are required")]
    ShortChain(usize),
    #[error("{path}: {reason}")]
    Write { path: String, reason: String },
}

/// CSR shapes of the real clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CsrShape {
    /// Empty subject, critical SAN (ztunnel).
    Ztunnel,
    /// Subject `O=` with an empty value (istio-agent).
    Sidecar,
}

/// Builds a PEM CSR for `key` naming `identity` (if any) as URI SAN.
pub fn build_csr(
    key: &KeyPair,
    identity: Option<&str>,
    shape: CsrShape,
) -> Result<String, ClientError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    if shape == CsrShape::Sidecar {
        params.distinguished_name.push(DnType::OrganizationName, "");
    }
    if let Some(id) = identity {
        let uri = id
            .try_into()
            .map_err(|e| ClientError::Input(format!("identity {id:?}: {e}")))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
    }
    params
        .serialize_request(key)
        .and_then(|csr| csr.pem())
        .map_err(|e| ClientError::Input(format!("cannot build the CSR: {e}")))
}

/// Generates a workload key (ECDSA P-256 like ztunnel, or RSA like istio-agent).
pub fn workload_key(choice: KeyChoice) -> Result<KeyPair, ClientError> {
    let key = generate::generate_key(choice).map_err(|e| ClientError::Input(e.to_string()))?;
    KeyPair::try_from(key.secret_key_pair().serialized_der())
        .map_err(|e| ClientError::Input(e.to_string()))
}

/// Where and how to reach the CA. `Debug` elides the client key.
#[derive(Clone)]
pub struct Connection {
    /// `host:port` or `https://host:port`.
    pub addr: String,
    pub root_cert_pem: String,
    /// TLS server name to verify; default the host of `addr`.
    pub server_name: Option<String>,
    /// Client certificate chain and key (PEM) for mTLS renewal.
    pub client_identity: Option<(String, String)>,
    pub timeout: Duration,
}

/// Opens a TLS gRPC channel to the CA.
pub async fn connect(
    conn: &Connection,
) -> Result<IstioCertificateServiceClient<Channel>, ClientError> {
    let uri = if conn.addr.contains("://") {
        conn.addr.clone()
    } else {
        format!("https://{}", conn.addr)
    };
    // tonic's client TLS takes no provider: it uses the process default, which
    // this makes the build's backend.
    crate::tls::crypto_provider();
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&conn.root_cert_pem));
    if let Some(name) = &conn.server_name {
        tls = tls.domain_name(name.clone());
    }
    if let Some((chain, key)) = &conn.client_identity {
        tls = tls.identity(Identity::from_pem(chain, key));
    }
    let connect_err = |reason: String| ClientError::Connect {
        addr: conn.addr.clone(),
        reason,
    };
    let channel = Endpoint::from_shared(uri)
        .map_err(|e| connect_err(e.to_string()))?
        .tls_config(tls)
        .map_err(|e| connect_err(e.to_string()))?
        .connect_timeout(conn.timeout)
        .timeout(conn.timeout)
        .connect()
        .await
        .map_err(|e| connect_err(crate::authn::error_chain(&e)))?;
    Ok(IstioCertificateServiceClient::new(channel))
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("addr", &self.addr)
            .field("server_name", &self.server_name)
            .field(
                "client_identity",
                &self.client_identity.as_ref().map(|_| "[elided]"),
            )
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// What one request carries besides the CSR. `Debug` elides the token.
#[derive(Clone, Default)]
pub struct RequestOptions {
    pub bearer_token: Option<String>,
    pub cluster_id: Option<String>,
    pub ttl_secs: i64,
    pub impersonate: Option<String>,
    /// Send `CertSigner: ""` like istio-agent.
    pub cert_signer_metadata: bool,
}

impl std::fmt::Debug for RequestOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestOptions")
            .field(
                "bearer_token",
                &self.bearer_token.as_ref().map(|_| "[elided]"),
            )
            .field("cluster_id", &self.cluster_id)
            .field("ttl_secs", &self.ttl_secs)
            .field("impersonate", &self.impersonate)
            .field("cert_signer_metadata", &self.cert_signer_metadata)
            .finish()
    }
}

/// Calls CreateCertificate and returns the response elements.
pub async fn create_certificate(
    client: &mut IstioCertificateServiceClient<Channel>,
    csr_pem: String,
    opts: &RequestOptions,
) -> Result<Vec<String>, ClientError> {
    use prost_types::{Struct, Value, value::Kind};
    let mut fields = std::collections::BTreeMap::new();
    if let Some(id) = &opts.impersonate {
        fields.insert(
            "ImpersonatedIdentity".to_string(),
            Value {
                kind: Some(Kind::StringValue(id.clone())),
            },
        );
    }
    if opts.cert_signer_metadata {
        fields.insert(
            "CertSigner".to_string(),
            Value {
                kind: Some(Kind::StringValue(String::new())),
            },
        );
    }
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr: csr_pem,
        validity_duration: opts.ttl_secs,
        metadata: (!fields.is_empty()).then_some(Struct { fields }),
    });
    if let Some(token) = &opts.bearer_token {
        let value = MetadataValue::try_from(format!("Bearer {}", token.trim()))
            .map_err(|_| ClientError::Input("the token is not a valid header value".into()))?;
        request.metadata_mut().insert("authorization", value);
    }
    if let Some(cluster) = &opts.cluster_id {
        let value = MetadataValue::try_from(cluster.as_str())
            .map_err(|_| ClientError::Input("the cluster id is not a valid header value".into()))?;
        request.metadata_mut().insert("clusterid", value);
    }
    let response = client
        .create_certificate(request)
        .await
        .map_err(|s| ClientError::Rpc {
            code: s.code(),
            message: s.message().to_string(),
        })?;
    Ok(response.into_inner().cert_chain)
}

/// Writes `key.pem` (mode 0600), `cert-chain.pem` and `root-cert.pem` like istio-agent.
pub fn write_outputs(dir: &Path, key_pem: &str, chain: &[String]) -> Result<(), ClientError> {
    if chain.len() < 2 {
        return Err(ClientError::ShortChain(chain.len()));
    }
    let (root, certs) = chain.split_last().expect("length checked above");
    let mut cert_chain = String::new();
    for element in certs {
        cert_chain.push_str(element);
        if !element.ends_with('\n') {
            cert_chain.push('\n');
        }
    }
    let write = |name: &str, contents: &str, secret: bool| -> Result<(), ClientError> {
        let path = dir.join(name);
        let err = |e: std::io::Error| ClientError::Write {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        crate::fsutil::write_file(&path, contents.as_bytes(), secret).map_err(err)
    };
    std::fs::create_dir_all(dir).map_err(|e| ClientError::Write {
        path: dir.display().to_string(),
        reason: e.to_string(),
    })?;
    write("key.pem", key_pem, true)?;
    write("cert-chain.pem", &cert_chain, false)?;
    write("root-cert.pem", root, false)?;
    Ok(())
}
