//! Every way a CreateCertificate request can fail, and the one place where a
//! failure becomes a gRPC status and its metric labels.

use std::time::Duration;

use tonic::Status;

use crate::authn::AuthnError;
use crate::authn::trusted_csr::TrustedCsrError;
use crate::csr::CsrError;
use crate::identity::TrustDomainError;
use crate::impersonation::ImpersonationError;
use crate::issuance::IssueError;
use crate::metrics::{Outcome, SignErrorType};

/// istiod's opaque authentication failure message.
pub const MSG_AUTHN_FAILURE: &str = "request authenticate failure";
/// When an authenticator's backend (API server, JWKS endpoint) did not
/// answer; UNAVAILABLE makes istio-agent and ztunnel retry.
pub const MSG_AUTHN_UNAVAILABLE: &str = "request authentication is temporarily unavailable";
/// istiod's opaque impersonation failure message.
pub const MSG_IMPERSONATION_FAILURE: &str = "request impersonation authentication failure";

/// Every way a request can fail, one variant per reason.
#[derive(Debug)]
pub enum ServiceError {
    Unauthenticated(Vec<AuthnError>),
    /// An authenticator's backend (API server, JWKS endpoint) did not answer.
    AuthnUnavailable(Vec<AuthnError>),
    LabModeIdentity(TrustedCsrError),
    Impersonation(ImpersonationError),
    /// The (possibly impersonated) identity is outside our trust domains.
    OutsideTrustDomain(TrustDomainError),
    CaNotReady,
    Csr(CsrError),
    Issue(IssueError),
    Overloaded {
        waited: Duration,
    },
    WorkerFailed(String),
    /// A fault injected on purpose (test harnesses).
    Injected(Status),
}

/// What a failure means to the client and to the metrics.
#[derive(Debug)]
pub struct Class {
    /// What the client gets. Authentication details stay in the log.
    pub status: Status,
    /// The `outcome` label of the request duration histogram.
    pub outcome: Outcome,
    /// istiod's `citadel_server_csr_sign_err_count` label, for signing-stage errors.
    pub sign_error: Option<SignErrorType>,
    /// Counted in istiod's `citadel_server_authentication_failure_count`.
    pub authn_failure: bool,
}

impl ServiceError {
    /// The one error-to-status mapping: exhaustive, so a new variant forces a decision.
    pub fn classify(&self) -> Class {
        use Outcome as O;
        use SignErrorType as S;
        let class = |status, outcome, sign_error, authn_failure| Class {
            status,
            outcome,
            sign_error,
            authn_failure,
        };
        let signing = |e: &dyn std::fmt::Display| format!("CSR signing error ({e})");
        match self {
            ServiceError::Unauthenticated(_)
            | ServiceError::LabModeIdentity(_)
            | ServiceError::OutsideTrustDomain(_) => class(
                Status::unauthenticated(MSG_AUTHN_FAILURE),
                O::unauthenticated,
                None,
                true,
            ),
            ServiceError::AuthnUnavailable(_) => class(
                Status::unavailable(MSG_AUTHN_UNAVAILABLE),
                O::unavailable,
                None,
                true,
            ),
            ServiceError::Impersonation(e) if e.is_transient() => class(
                Status::unavailable(MSG_AUTHN_UNAVAILABLE),
                O::unavailable,
                None,
                true,
            ),
            ServiceError::Impersonation(_) => class(
                Status::unauthenticated(MSG_IMPERSONATION_FAILURE),
                O::unauthenticated,
                None,
                true,
            ),
            ServiceError::CaNotReady => class(
                Status::internal("CSR signing error (Istio CA is not ready)"),
                O::internal,
                Some(S::CA_NOT_READY),
                false,
            ),
            ServiceError::Csr(e) => class(
                Status::invalid_argument(signing(e)),
                O::invalid_argument,
                Some(S::CSR_ERROR),
                false,
            ),
            ServiceError::Issue(e @ IssueError::Ttl { .. }) => class(
                Status::invalid_argument(signing(e)),
                O::invalid_argument,
                Some(S::TTL_ERROR),
                false,
            ),
            ServiceError::Issue(e @ (IssueError::SignerExpired { .. } | IssueError::Sign(_))) => {
                class(
                    Status::internal(signing(e)),
                    O::internal,
                    Some(S::CERT_GEN_ERROR),
                    false,
                )
            }
            ServiceError::Overloaded { waited } => class(
                Status::resource_exhausted(format!(
                    "CA is at its concurrent signing limit; waited {} ms, retry later",
                    waited.as_millis()
                )),
                O::overloaded,
                None,
                false,
            ),
            ServiceError::WorkerFailed(_) => class(
                Status::internal("CSR signing error (internal error)"),
                O::internal,
                Some(S::UNKNOWN),
                false,
            ),
            ServiceError::Injected(status) => {
                class(status.clone(), injected_outcome(status.code()), None, false)
            }
        }
    }

    /// The full reason, for the log.
    pub fn reason(&self) -> String {
        match self {
            ServiceError::Unauthenticated(failures) if failures.is_empty() => {
                "no credentials: no client certificate, no bearer token, and lab mode is off".into()
            }
            ServiceError::Unauthenticated(failures) | ServiceError::AuthnUnavailable(failures) => {
                failures
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            }
            ServiceError::LabModeIdentity(e) => e.to_string(),
            ServiceError::Impersonation(e) => e.to_string(),
            ServiceError::OutsideTrustDomain(e) => e.to_string(),
            ServiceError::CaNotReady => "no CA bundle is loaded".into(),
            ServiceError::Csr(e) => e.to_string(),
            ServiceError::Issue(e) => e.to_string(),
            ServiceError::Overloaded { waited } => {
                format!("no signing slot within {} ms", waited.as_millis())
            }
            ServiceError::WorkerFailed(e) => e.clone(),
            ServiceError::Injected(status) => format!("injected fault: {status:?}"),
        }
    }
}

/// An injected status is counted like the real failure with that code would be.
fn injected_outcome(code: tonic::Code) -> Outcome {
    match code {
        tonic::Code::Unauthenticated => Outcome::unauthenticated,
        tonic::Code::InvalidArgument => Outcome::invalid_argument,
        tonic::Code::ResourceExhausted => Outcome::overloaded,
        tonic::Code::Unavailable => Outcome::unavailable,
        _ => Outcome::internal,
    }
}
