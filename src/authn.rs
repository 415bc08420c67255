//! Who is calling: a [`Caller`] can only be built by an authenticator. Each
//! authenticator is its own module behind the [`Authenticator`] trait and runs
//! in istiod's order (client certificate first); the first success wins.

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

use crate::asn1::GeneralName;
use crate::metrics::AuthnKind;

/// What an authenticator may look at. Never logged: it holds tokens.
pub struct RequestContext<'a> {
    pub metadata: &'a MetadataMap,
    /// The verified client chain, leaf first, when the peer sent one.
    pub peer_certs: Option<&'a [CertificateDer<'static>]>,
    pub remote_addr: Option<SocketAddr>,
}

/// An authenticated caller and the identities it proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    identities: Vec<String>,
    kind: AuthnKind,
    /// A short, non-secret description of the proof (issuer, cert serial) for logs.
    detail: String,
    service_account: Option<ServiceAccount>,
}

/// The Kubernetes service account a token proved, which impersonation needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
    /// The pod a bound token belongs to (Kubernetes TokenReview only).
    pub pod: Option<BoundPod>,
    /// The cluster whose API server reviewed the token (Kubernetes only).
    pub cluster_id: Option<String>,
}

/// Pod name and UID from a bound service-account token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundPod {
    pub name: String,
    pub uid: String,
}

impl Caller {
    /// Only authenticators build callers.
    pub(crate) fn new(identities: Vec<String>, kind: AuthnKind, detail: String) -> Self {
        Caller {
            identities,
            kind,
            detail,
            service_account: None,
        }
    }

    /// Adds what a service-account token proved.
    pub(crate) fn with_service_account(self, service_account: ServiceAccount) -> Self {
        Caller {
            service_account: Some(service_account),
            ..self
        }
    }

    /// The caller a certificate for `target` is issued to once impersonation is
    /// authorized: exactly that identity, no service account (so it cannot be
    /// impersonated further), and the real caller in the detail for the audit.
    pub(crate) fn impersonating(&self, target: &crate::identity::SpiffeId) -> Self {
        Caller {
            identities: vec![target.to_string()],
            kind: self.kind,
            detail: format!(
                "impersonation by {} ({})",
                self.identities.join(","),
                self.detail
            ),
            service_account: None,
        }
    }

    pub fn service_account(&self) -> Option<&ServiceAccount> {
        self.service_account.as_ref()
    }

    pub fn identities(&self) -> &[String] {
        &self.identities
    }

    pub fn kind(&self) -> AuthnKind {
        self.kind
    }

    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// The SANs the leaf gets, in istiod's mapping: IP literal -> iPAddress,
    /// `spiffe://` -> URI, anything else -> dNSName.
    pub fn sans(&self) -> Vec<GeneralName> {
        self.identities
            .iter()
            .map(|id| {
                if let Ok(ip) = id.parse() {
                    GeneralName::Ip(ip)
                } else if id.starts_with("spiffe://") {
                    GeneralName::Uri(id.clone())
                } else {
                    GeneralName::Dns(id.clone())
                }
            })
            .collect()
    }
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
                Ok(Some(caller)) if !caller.identities.is_empty() => {
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
