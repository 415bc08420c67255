//! `plugca request`: get a workload certificate the way a sidecar does.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::ca::generate::KeyChoice;
use crate::client::{self, Connection, CsrShape, RequestOptions};
use crate::duration;

#[derive(Debug, Clone, Args)]
pub struct RequestArgs {
    /// CA address (host:port).
    #[arg(long, env = "CA_ADDR", default_value = "localhost:15012")]
    pub ca_addr: String,
    /// PEM file with the root(s) that verify the CA's serving certificate.
    #[arg(long, env = "CA_ROOT_CA")]
    pub root_cert: PathBuf,
    /// TLS name to verify the CA as [default: the host of --ca-addr].
    #[arg(long)]
    pub server_name: Option<String>,
    /// File with a bearer token (e.g. a service-account JWT) to authenticate with.
    #[arg(long, env = "AUTH_TOKEN")]
    pub token_file: Option<PathBuf>,
    /// SPIFFE ID to put in the CSR (what lab mode issues for).
    #[arg(long)]
    pub identity: Option<String>,
    /// Requested lifetime (Go duration, e.g. 1h); 0 asks for the server default.
    #[arg(long, default_value = "0")]
    pub ttl: String,
    /// Workload key type.
    #[arg(long, value_enum, default_value_t = KeyChoice::P256)]
    pub key: KeyChoice,
    /// CSR shape: ztunnel (empty subject) or sidecar (empty O=).
    #[arg(long, value_enum, default_value_t = CsrShape::Ztunnel)]
    pub csr_shape: CsrShape,
    /// `clusterid` header to send.
    #[arg(long, env = "CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// Ask for this identity on behalf of a workload (ztunnel shared mode).
    #[arg(long)]
    pub impersonate: Option<String>,
    /// Client certificate chain (PEM) for mTLS renewal; needs --client-key.
    #[arg(long, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// Client private key (PEM) for mTLS renewal.
    #[arg(long, requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// Output directory for key.pem, cert-chain.pem and root-cert.pem.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// Connect and request timeout.
    #[arg(long, default_value = "10s")]
    pub timeout: String,
}

pub async fn run(args: RequestArgs) -> Result<(), String> {
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).map_err(|e| format!("{}: cannot read: {e}", p.display()))
    };
    let ttl = duration::parse(&args.ttl).map_err(|e| format!("--ttl: {e}"))?;
    let timeout: Duration =
        duration::parse(&args.timeout).map_err(|e| format!("--timeout: {e}"))?;
    let token = match &args.token_file {
        Some(p) => Some(read(p)?.trim().to_string()),
        None => None,
    };
    let client_identity = match (&args.client_cert, &args.client_key) {
        (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
        _ => None,
    };
    let conn = Connection {
        addr: args.ca_addr.clone(),
        root_cert_pem: read(&args.root_cert)?,
        server_name: args.server_name.clone(),
        client_identity,
        timeout,
    };
    let key = client::workload_key(args.key).map_err(|e| e.to_string())?;
    let csr = client::build_csr(&key, args.identity.as_deref(), args.csr_shape)
        .map_err(|e| e.to_string())?;
    let mut grpc = client::connect(&conn).await.map_err(|e| e.to_string())?;
    let chain = client::create_certificate(
        &mut grpc,
        csr,
        &RequestOptions {
            bearer_token: token,
            cluster_id: args.cluster_id.clone(),
            ttl_secs: ttl.as_secs() as i64,
            impersonate: args.impersonate.clone(),
            cert_signer_metadata: args.csr_shape == CsrShape::Sidecar,
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    client::write_outputs(&args.out, &key.serialize_pem(), &chain).map_err(|e| e.to_string())?;
    println!(
        "wrote {0}/key.pem, {0}/cert-chain.pem ({1} certificate(s)) and {0}/root-cert.pem",
        args.out.display(),
        chain.len() - 1
    );
    Ok(())
}
