//! The authenticated caller: the identities it proved and how. Free of gRPC, so
//! the signer can take a [`Caller`] and only an authenticator can make one.

use crate::asn1::GeneralName;
use crate::authn::trusted_csr;
use crate::csr::VerifiedCsr;
use crate::identity::{Identity, SpiffeId, TrustDomain};
use crate::metrics::AuthnKind;

/// An authenticated caller and the identities it proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    identities: Vec<Identity>,
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
    pub(in crate::authn) fn new(
        identities: Vec<Identity>,
        kind: AuthnKind,
        detail: String,
    ) -> Self {
        Caller {
            identities,
            kind,
            detail,
            service_account: None,
        }
    }

    /// Adds what a service-account token proved.
    pub(in crate::authn) fn with_service_account(self, service_account: ServiceAccount) -> Self {
        Caller {
            service_account: Some(service_account),
            ..self
        }
    }

    /// The caller a certificate for `target` is issued to once impersonation is
    /// authorized: exactly that identity, no service account (so it cannot be
    /// impersonated further), and the real caller in the detail for the audit.
    pub(crate) fn impersonating(&self, target: &SpiffeId) -> Self {
        Caller {
            identities: vec![Identity::Spiffe(target.clone())],
            kind: self.kind,
            detail: format!(
                "impersonation by {} ({})",
                self.identity_list(),
                self.detail
            ),
            service_account: None,
        }
    }

    pub fn service_account(&self) -> Option<&ServiceAccount> {
        self.service_account.as_ref()
    }

    pub fn identities(&self) -> &[Identity] {
        &self.identities
    }

    /// The identities, comma-separated, for logs and error messages.
    pub fn identity_list(&self) -> String {
        let texts: Vec<String> = self.identities.iter().map(ToString::to_string).collect();
        texts.join(",")
    }

    pub fn kind(&self) -> AuthnKind {
        self.kind
    }

    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// The SANs the leaf gets: one per identity, of its kind.
    pub fn sans(&self) -> Vec<GeneralName> {
        self.identities
            .iter()
            .map(|id| match id {
                Identity::Spiffe(id) => GeneralName::Uri(id.to_string()),
                Identity::Dns(name) => GeneralName::Dns(name.to_string()),
                Identity::Ip(ip) => GeneralName::Ip(*ip),
            })
            .collect()
    }

    /// A caller for unit tests outside `authn`.
    #[cfg(test)]
    pub(crate) fn for_tests(
        identities: &[&str],
        kind: AuthnKind,
        detail: &str,
        service_account: Option<ServiceAccount>,
    ) -> Self {
        Caller {
            identities: identities
                .iter()
                .map(|id| Identity::parse(id).expect("test identities are valid"))
                .collect(),
            kind,
            detail: detail.to_string(),
            service_account,
        }
    }
}

/// Who a certificate is for, known before the CSR is read: a proven caller, or
/// in lab mode whoever the CSR names. Signing resolves it to a [`Caller`] once
/// the CSR is verified, so every leaf is issued to a `Caller`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimant {
    Proven(Caller),
    /// `--insecure-trust-csr-identity`: the CSR's SPIFFE ID in this trust domain.
    LabMode(TrustDomain),
}

impl Claimant {
    /// The proven caller; `None` in lab mode until the CSR is read.
    pub fn caller(&self) -> Option<&Caller> {
        match self {
            Claimant::Proven(caller) => Some(caller),
            Claimant::LabMode(_) => None,
        }
    }

    /// The caller the leaf is issued to.
    pub fn resolve(self, csr: &VerifiedCsr) -> Result<Caller, trusted_csr::TrustedCsrError> {
        match self {
            Claimant::Proven(caller) => Ok(caller),
            Claimant::LabMode(td) => trusted_csr::caller_from_csr(csr, &td),
        }
    }
}
