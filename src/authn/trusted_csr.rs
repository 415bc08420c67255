//! Lab mode (`--insecure-trust-csr-identity`): the identity is the CSR's single
//! SPIFFE URI SAN in our trust domain. Nothing proves it; the server warns at
//! start and marks every such issuance.

use crate::authn::Caller;
use crate::csr::VerifiedCsr;
use crate::identity::{Identity, SpiffeId, TrustDomain};
use crate::metrics::AuthnKind;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustedCsrError {
    #[error("the CSR has {0} URI SANs; lab mode needs exactly one SPIFFE ID")]
    UriCount(usize),
    #[error("the CSR URI SAN is not a valid SPIFFE ID: {0}")]
    NotSpiffe(String),
    #[error("the CSR identity {id} is not in trust domain {expected:?}")]
    WrongTrustDomain { id: String, expected: String },
}

/// Takes the caller identity from a verified CSR. Only reachable when lab mode is on.
pub fn caller_from_csr(csr: &VerifiedCsr, td: &TrustDomain) -> Result<Caller, TrustedCsrError> {
    let [uri] = csr.requested_uri_sans() else {
        return Err(TrustedCsrError::UriCount(csr.requested_uri_sans().len()));
    };
    let id = SpiffeId::parse(uri).map_err(|e| TrustedCsrError::NotSpiffe(e.to_string()))?;
    if id.trust_domain() != td.as_str() {
        return Err(TrustedCsrError::WrongTrustDomain {
            id: id.to_string(),
            expected: td.to_string(),
        });
    }
    Ok(Caller::new(
        vec![Identity::Spiffe(id)],
        AuthnKind::trusted_csr,
        "identity taken from the CSR (lab mode, unproven)".into(),
    ))
}
