//! Who is calling: a [`Caller`] can only be built by an authenticator. Each
//! authenticator is its own module behind the [`Authenticator`] trait and runs
//! in istiod's order (client certificate first); the first success wins.
//! [`Caller`] and [`Claimant`] (in `caller.rs`) need no tonic, so the signer can take them.

mod caller;
pub mod client_cert;
pub mod jwks;
pub mod jwt;
pub mod kube;
pub mod token_cache;
pub mod trusted_csr;
pub mod xfcc;

use std::net::SocketAddr;

use rustls_pki_types::CertificateDer;
use tonic::metadata::MetadataMap;

pub use caller::{BoundPod, Caller, Claimant, ServiceAccount};

/// What an authenticator may look at. Never logged: it holds tokens.
pub struct RequestContext<'a> {
    pub metadata: &'a MetadataMap,
    /// The verified client chain, leaf first, when the peer sent one.
    pub peer_certs: Option<&'a [CertificateDer<'static>]>,
    pub remote_addr: Option<SocketAddr>,
}

/// Why an authenticator refused. Logged, never sent to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthnError {
    #[error("client certificate: {0}")]
    ClientCert(#[from] client_cert::ClientCertError),
    #[error("JWT: {0}")]
    Jwt(#[from] jwt::JwtError),
    #[error("CSR identity (lab mode): {0}")]
    TrustedCsr(#[from] trusted_csr::TrustedCsrError),
    #[error("Kubernetes JWT: {0}")]
    Kube(#[from] kube::KubeJwtError),
    #[error("XFCC: {0}")]
    Xfcc(#[from] xfcc::XfccError),
}

impl AuthnError {
    /// The authenticator could not decide (its backend did not answer): the
    /// request fails with UNAVAILABLE, which clients retry, instead of
    /// UNAUTHENTICATED, which they do not.
    pub fn is_transient(&self) -> bool {
        match self {
            AuthnError::Kube(e) => e.is_transient(),
            AuthnError::Jwt(e) => e.is_transient(),
            AuthnError::ClientCert(_) | AuthnError::TrustedCsr(_) | AuthnError::Xfcc(_) => false,
        }
    }
}

/// One way to authenticate a request.
#[tonic::async_trait]
pub trait Authenticator: Send + Sync {
    /// Name used in logs.
    fn name(&self) -> &'static str;

    /// `Ok(None)` when the request carries nothing for this authenticator
    /// (no client certificate, no bearer token); `Err` when it does but it fails.
    async fn authenticate(&self, ctx: &RequestContext<'_>) -> Result<Option<Caller>, AuthnError>;
}

/// The authenticators of a server, in order.
pub struct Authenticators {
    chain: Vec<Box<dyn Authenticator>>,
}

/// The outcome of running every authenticator.
#[derive(Debug)]
pub enum AuthnOutcome {
    Authenticated(Caller),
    /// No authenticator accepted; each failure that was reported, in order.
    Refused(Vec<AuthnError>),
}

impl Authenticators {
    pub fn new(chain: Vec<Box<dyn Authenticator>>) -> Self {
        Authenticators { chain }
    }

    pub fn is_empty(&self) -> bool {
        self.chain.is_empty()
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.chain.iter().map(|a| a.name()).collect()
    }

    pub async fn authenticate(&self, ctx: &RequestContext<'_>) -> AuthnOutcome {
        let mut failures = Vec::new();
        for a in &self.chain {
            match a.authenticate(ctx).await {
                Ok(Some(caller)) if !caller.identities().is_empty() => {
                    return AuthnOutcome::Authenticated(caller);
                }
                Ok(_) => {}
                Err(e) => failures.push(e),
            }
        }
        AuthnOutcome::Refused(failures)
    }
}

/// An error with its sources, each said once (for log lines about remote calls).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let s = s.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cur = cur.and_then(|c| c.source());
    }
    text
}
