//! The `IstioCertificateService` gRPC handler and the one place where errors
//! become gRPC statuses.
//!
//! The handler reads top to bottom: count -> authenticate -> refuse
//! impersonation -> wait for a signing slot -> (off the reactor) parse CSR,
//! check TTL, sign -> assemble the chain -> count the outcome.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::authn::trusted_csr::{self, TrustedCsrError};
use crate::authn::{Authenticators, AuthnError, AuthnOutcome, Caller, RequestContext};
use crate::ca::CaBundle;
use crate::csr::{CsrError, VerifiedCsr};
use crate::fault::{Fault, Faults, LeafFaults};
use crate::identity::{TrustDomain, TrustDomainError, TrustDomains};
use crate::impersonation::{Impersonation, ImpersonationError};
use crate::issuance::{self, IssueError, Issued, TtlPolicy};
use crate::metrics::{
    IssuedLabels, Metrics, Outcome, OutcomeLabels, SignErrorLabels, SignErrorType,
};
use crate::pb::istio_certificate_service_server::IstioCertificateService;
use crate::pb::{IstioCertificateRequest, IstioCertificateResponse};

/// istiod's opaque authentication failure message.
pub const MSG_AUTHN_FAILURE: &str = "request authenticate failure";
/// When an authenticator's backend (API server, JWKS endpoint) did not
/// answer; UNAVAILABLE makes istio-agent and ztunnel retry.
pub const MSG_AUTHN_UNAVAILABLE: &str = "request authentication is temporarily unavailable";
/// istiod's opaque impersonation failure message.
pub const MSG_IMPERSONATION_FAILURE: &str = "request impersonation authentication failure";
const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// The CA currently serving; `None` until a bundle is loaded. Swapped whole on reload.
#[derive(Debug, Default)]
pub struct CaState {
    bundle: ArcSwapOption<CaBundle>,
}

impl CaState {
    pub fn new(bundle: Option<CaBundle>) -> Self {
        CaState {
            bundle: ArcSwapOption::from(bundle.map(Arc::new)),
        }
    }

    pub fn current(&self) -> Option<Arc<CaBundle>> {
        self.bundle.load_full()
    }

    pub fn replace(&self, bundle: CaBundle) {
        self.bundle.store(Some(Arc::new(bundle)));
    }
}

/// Everything the handler needs; built once by the app.
pub struct ServiceConfig {
    pub authenticators: Authenticators,
    /// `Some(trust domain)` when `--insecure-trust-csr-identity` is on.
    pub lab_mode: Option<TrustDomain>,
    /// Who may ask for another identity (`ImpersonatedIdentity`).
    pub impersonation: Impersonation,
    pub ttl: TtlPolicy,
    pub max_concurrent_signs: usize,
    pub sign_queue_timeout: Duration,
    /// Where SPIFFE identities may be issued; checked for every caller.
    pub trust_domains: TrustDomains,
}

#[derive(Clone)]
pub struct CertificateService {
    inner: Arc<Inner>,
}

struct Inner {
    ca: Arc<CaState>,
    config: ServiceConfig,
    metrics: Arc<Metrics>,
    limiter: Arc<Semaphore>,
    faults: Option<Arc<Faults>>,
    issued_log: Option<Arc<IssuedLog>>,
}

/// Every certificate issued, kept for test harnesses to inspect (bounded).
#[derive(Debug, Default)]
pub struct IssuedLog {
    entries: std::sync::Mutex<std::collections::VecDeque<IssuedRecord>>,
}

/// One issued certificate as a harness sees it.
#[derive(Debug, Clone)]
pub struct IssuedRecord {
    pub leaf_pem: String,
    pub cert_chain: Vec<String>,
    pub sans: Vec<String>,
    pub serial_hex: String,
}

impl IssuedLog {
    /// Most records kept; the oldest are dropped first.
    pub const CAPACITY: usize = 10_000;

    fn record(&self, issued: &Issued) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() == Self::CAPACITY {
            entries.pop_front();
        }
        entries.push_back(IssuedRecord {
            leaf_pem: issued.leaf.pem.clone(),
            cert_chain: issued.cert_chain.clone(),
            sans: issued.sans.iter().map(ToString::to_string).collect(),
            serial_hex: issued.leaf.serial_hex.clone(),
        });
    }

    pub fn all(&self) -> Vec<IssuedRecord> {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

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

impl ServiceError {
    /// The one error-to-status mapping. Authentication details stay in the log.
    pub fn to_status(&self) -> Status {
        match self {
            ServiceError::Unauthenticated(_)
            | ServiceError::LabModeIdentity(_)
            | ServiceError::OutsideTrustDomain(_) => Status::unauthenticated(MSG_AUTHN_FAILURE),
            ServiceError::AuthnUnavailable(_) => Status::unavailable(MSG_AUTHN_UNAVAILABLE),
            ServiceError::Impersonation(e) if e.is_transient() => {
                Status::unavailable(MSG_AUTHN_UNAVAILABLE)
            }
            ServiceError::Impersonation(_) => Status::unauthenticated(MSG_IMPERSONATION_FAILURE),
            ServiceError::CaNotReady => {
                Status::internal("CSR signing error (Istio CA is not ready)")
            }
            ServiceError::Csr(e) => Status::invalid_argument(format!("CSR signing error ({e})")),
            ServiceError::Issue(e @ IssueError::Ttl { .. }) => {
                Status::invalid_argument(format!("CSR signing error ({e})"))
            }
            ServiceError::Issue(e @ (IssueError::SignerExpired { .. } | IssueError::Sign(_))) => {
                Status::internal(format!("CSR signing error ({e})"))
            }
            ServiceError::Overloaded { waited } => Status::resource_exhausted(format!(
                "CA is at its concurrent signing limit; waited {} ms, retry later",
                waited.as_millis()
            )),
            ServiceError::WorkerFailed(_) => Status::internal("CSR signing error (internal error)"),
            ServiceError::Injected(status) => status.clone(),
        }
    }

    /// istiod's `citadel_server_csr_sign_err_count` label, for signing-stage errors.
    fn sign_error_type(&self) -> Option<SignErrorType> {
        match self {
            ServiceError::Unauthenticated(_)
            | ServiceError::AuthnUnavailable(_)
            | ServiceError::LabModeIdentity(_)
            | ServiceError::Impersonation(_)
            | ServiceError::OutsideTrustDomain(_)
            | ServiceError::Overloaded { .. }
            | ServiceError::Injected(_) => None,
            ServiceError::CaNotReady => Some(SignErrorType::CA_NOT_READY),
            ServiceError::Csr(_) => Some(SignErrorType::CSR_ERROR),
            ServiceError::Issue(IssueError::Ttl { .. }) => Some(SignErrorType::TTL_ERROR),
            ServiceError::Issue(IssueError::SignerExpired { .. } | IssueError::Sign(_)) => {
                Some(SignErrorType::CERT_GEN_ERROR)
            }
            ServiceError::WorkerFailed(_) => Some(SignErrorType::UNKNOWN),
        }
    }

    fn outcome(&self) -> Outcome {
        match self.to_status().code() {
            tonic::Code::Unauthenticated => Outcome::unauthenticated,
            tonic::Code::InvalidArgument => Outcome::invalid_argument,
            tonic::Code::ResourceExhausted => Outcome::overloaded,
            tonic::Code::Unavailable => Outcome::unavailable,
            _ => Outcome::internal,
        }
    }

    fn is_authn_failure(&self) -> bool {
        matches!(
            self,
            ServiceError::Unauthenticated(_)
                | ServiceError::AuthnUnavailable(_)
                | ServiceError::LabModeIdentity(_)
                | ServiceError::Impersonation(_)
                | ServiceError::OutsideTrustDomain(_)
        )
    }

    /// The full reason, for the log.
    fn reason(&self) -> String {
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

impl CertificateService {
    pub fn new(
        ca: Arc<CaState>,
        config: ServiceConfig,
        metrics: Arc<Metrics>,
        faults: Option<Arc<Faults>>,
        issued_log: Option<Arc<IssuedLog>>,
    ) -> Self {
        let limiter = Arc::new(Semaphore::new(config.max_concurrent_signs.max(1)));
        CertificateService {
            inner: Arc::new(Inner {
                ca,
                config,
                metrics,
                limiter,
                faults,
                issued_log,
            }),
        }
    }

    async fn handle(
        &self,
        request: &Request<IstioCertificateRequest>,
        faults: &[Fault],
        audit: &mut Audit,
    ) -> Result<Issued, ServiceError> {
        let inner = &self.inner;
        for fault in faults {
            if let Fault::Refuse { code, message } = fault {
                return Err(ServiceError::Injected(Status::new(*code, message.clone())));
            }
        }
        let peer_certs = request.peer_certs();
        let ctx = RequestContext {
            metadata: request.metadata(),
            peer_certs: peer_certs.as_deref().map(Vec::as_slice),
            remote_addr: request.remote_addr(),
        };
        let header_caller = match inner.config.authenticators.authenticate(&ctx).await {
            AuthnOutcome::Authenticated(caller) => Some(caller),
            AuthnOutcome::Refused(failures) if failures.iter().any(AuthnError::is_transient) => {
                return Err(ServiceError::AuthnUnavailable(failures));
            }
            AuthnOutcome::Refused(failures) if inner.config.lab_mode.is_none() => {
                return Err(ServiceError::Unauthenticated(failures));
            }
            AuthnOutcome::Refused(failures) => {
                for f in &failures {
                    info!(reason = %f, "authenticator refused; falling back to lab mode");
                }
                None
            }
        };
        audit.caller = header_caller.clone();
        let body = request.get_ref();
        let header_caller = match impersonated_identity(body) {
            Some(requested) => Some(
                inner
                    .config
                    .impersonation
                    .authorize(header_caller.as_ref(), requested)
                    .map_err(ServiceError::Impersonation)?,
            ),
            None => header_caller,
        };
        audit.caller = header_caller.clone();

        let bundle = inner.ca.current().ok_or(ServiceError::CaNotReady)?;
        audit.ca_key_id = Some(bundle.signer().key_id_hex().to_string());
        let started = Instant::now();
        let timeout = inner.config.sign_queue_timeout;
        let permit = tokio::time::timeout(timeout, inner.limiter.clone().acquire_owned())
            .await
            .map_err(|_| ServiceError::Overloaded {
                waited: started.elapsed(),
            })?
            .map_err(|_| ServiceError::WorkerFailed("signing limiter closed".into()))?;
        // Injected latency models a slow signer: it holds the signing slot.
        for fault in faults {
            if let Fault::Latency(d) = fault {
                tokio::time::sleep(*d).await;
            }
        }

        let csr_text = body.csr.clone();
        let requested_ttl = body.validity_duration;
        let lab_mode = inner.config.lab_mode.clone();
        let policy = inner.config.ttl;
        let leaf_faults = LeafFaults::from_faults(faults);
        let trust_domains = inner.config.trust_domains.clone();
        let work = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let mut caller = header_caller;
            let result = (|| {
                let csr = VerifiedCsr::parse(&csr_text).map_err(ServiceError::Csr)?;
                if caller.is_none() {
                    let td = lab_mode.ok_or(ServiceError::Unauthenticated(Vec::new()))?;
                    caller = Some(
                        trusted_csr::caller_from_csr(&csr, &td)
                            .map_err(ServiceError::LabModeIdentity)?,
                    );
                }
                let who = caller
                    .as_ref()
                    .ok_or(ServiceError::Unauthenticated(Vec::new()))?;
                // The one trust-domain check every authenticator, impersonation
                // and lab mode pass: nothing else may reach the signer.
                trust_domains
                    .check(who.identities())
                    .map_err(ServiceError::OutsideTrustDomain)?;
                let issued = issuance::issue_with_faults(
                    &bundle,
                    who,
                    &csr,
                    requested_ttl,
                    &policy,
                    OffsetDateTime::now_utc(),
                    &leaf_faults,
                )
                .map_err(ServiceError::Issue)?;
                Ok((issued, csr.key_kind()))
            })();
            (caller, result)
        });
        let (caller, result) = work
            .await
            .map_err(|e| ServiceError::WorkerFailed(e.to_string()))?;
        audit.caller = caller;
        let (mut issued, key_kind) = result?;
        if let Some(caller) = &audit.caller {
            inner
                .metrics
                .issued
                .get_or_create(&IssuedLabels {
                    authenticator: caller.kind(),
                    key: key_kind.label(),
                })
                .inc();
        }
        for fault in faults {
            match fault {
                Fault::EmptyChain => issued.cert_chain.clear(),
                Fault::LeafOnly => issued.cert_chain.truncate(1),
                _ => {}
            }
        }
        Ok(issued)
    }

    fn record_failure(&self, error: &ServiceError, audit: &Audit) {
        let m = &self.inner.metrics;
        if error.is_authn_failure() {
            m.authentication_failure_count.inc();
        }
        if let Some(kind) = error.sign_error_type() {
            m.csr_sign_err_count
                .get_or_create(&SignErrorLabels { error: kind })
                .inc();
        }
        if matches!(error, ServiceError::Csr(_)) {
            m.csr_parsing_err_count.inc();
        }
        warn!(
            target: "plugca::audit",
            outcome = "refused",
            code = ?error.to_status().code(),
            reason = %error.reason(),
            identity = %audit.identity(),
            authn = %audit.authn(),
            cluster = %audit.cluster,
            peer = %audit.peer,
            ca_key_id = %audit.ca_key_id.as_deref().unwrap_or("-"),
            "CreateCertificate refused"
        );
    }
}

/// Non-secret facts about one request, for its audit line.
#[derive(Debug, Default)]
pub struct Audit {
    caller: Option<Caller>,
    cluster: String,
    peer: String,
    ca_key_id: Option<String>,
}

impl Audit {
    fn new(request: &Request<IstioCertificateRequest>) -> Self {
        let cluster = request
            .metadata()
            .get("clusterid")
            .and_then(|v| v.to_str().ok())
            .map(|c| c.chars().take(64).collect())
            .unwrap_or_else(|| "-".into());
        Audit {
            caller: None,
            cluster,
            peer: request
                .remote_addr()
                .map_or_else(|| "-".into(), |a| a.to_string()),
            ca_key_id: None,
        }
    }

    fn identity(&self) -> String {
        self.caller
            .as_ref()
            .map_or_else(|| "-".into(), |c| c.identities().join(","))
    }

    fn authn(&self) -> &str {
        self.caller.as_ref().map_or("-", |c| c.detail())
    }
}

/// `metadata["ImpersonatedIdentity"]` when it is a non-empty string (istiod
/// treats any other value as absent).
fn impersonated_identity(req: &IstioCertificateRequest) -> Option<&str> {
    let value = req.metadata.as_ref()?.fields.get(IMPERSONATED_IDENTITY)?;
    match value.kind.as_ref()? {
        prost_types::value::Kind::StringValue(s) if !s.is_empty() => Some(s),
        _ => None,
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CertificateService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let started = Instant::now();
        let m = &self.inner.metrics;
        m.csr_count.inc();
        m.inflight.inc();
        let mut audit = Audit::new(&request);
        let faults = match &self.inner.faults {
            Some(f) => f.take_for_request(),
            None => Vec::new(),
        };
        let result = self.handle(&request, &faults, &mut audit).await;
        m.inflight.dec();
        let elapsed = started.elapsed().as_secs_f64();
        match result {
            Ok(issued) => {
                m.success_cert_issuance_count.inc();
                m.request_duration
                    .get_or_create(&OutcomeLabels {
                        outcome: Outcome::issued,
                    })
                    .observe(elapsed);
                let sans: Vec<String> = issued.sans.iter().map(ToString::to_string).collect();
                info!(
                    target: "plugca::audit",
                    outcome = "issued",
                    identity = %audit.identity(),
                    authn = %audit.authn(),
                    unproven = audit.caller.as_ref().is_some_and(|c| matches!(c.kind(), crate::metrics::AuthnKind::trusted_csr)),
                    cluster = %audit.cluster,
                    peer = %audit.peer,
                    sans = %sans.join(","),
                    serial = %issued.leaf.serial_hex,
                    not_before = %crate::ca::cert::rfc3339(issued.not_before),
                    not_after = %crate::ca::cert::rfc3339(issued.not_after),
                    ca_key_id = %audit.ca_key_id.as_deref().unwrap_or("-"),
                    faults = faults.len(),
                    "certificate issued"
                );
                if let Some(log) = &self.inner.issued_log {
                    log.record(&issued);
                }
                Ok(Response::new(IstioCertificateResponse {
                    cert_chain: issued.cert_chain,
                }))
            }
            Err(error) => {
                m.request_duration
                    .get_or_create(&OutcomeLabels {
                        outcome: error.outcome(),
                    })
                    .observe(elapsed);
                self.record_failure(&error, &audit);
                Err(error.to_status())
            }
        }
    }
}
