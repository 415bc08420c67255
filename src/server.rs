//! The `IstioCertificateService` gRPC handler.
//!
//! The handler reads top to bottom: count -> authenticate -> refuse
//! impersonation -> wait for a signing slot -> (off the reactor for an RSA CA) parse CSR,
//! resolve the caller, check TTL, sign -> count the outcome. Errors become
//! statuses in [`error`]; the audit line is [`audit`]; test harnesses wrap the
//! handler from [`harness`].

mod audit;
pub mod error;
pub mod harness;

use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Response, Status};
use tracing::info;

use crate::authn::{Authenticators, AuthnError, AuthnOutcome, Caller, Claimant, RequestContext};
use crate::ca::keys::KeyKind;
use crate::ca::{CaBundle, Current};
use crate::csr::VerifiedCsr;
use crate::identity::{TrustDomain, TrustDomains};
use crate::impersonation::Impersonation;
use crate::issuance::{self, Issued, LeafOverrides, TtlPolicy};
use crate::metrics::{Metrics, OutcomeLabels, SignErrorLabels};
use crate::pb::istio_certificate_service_server::IstioCertificateService;
use crate::pb::{IstioCertificateRequest, IstioCertificateResponse};
use audit::Audit;
use error::Class;
pub use error::{
    MSG_AUTHN_FAILURE, MSG_AUTHN_UNAVAILABLE, MSG_IMPERSONATION_FAILURE, ServiceError,
};
use harness::{Faults, Harness, IssuedLog, Overrides};

const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

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
    ca: Arc<Current>,
    config: ServiceConfig,
    metrics: Arc<Metrics>,
    limiter: Arc<Semaphore>,
    /// Fault injection and the issued log; `None` serves the plain handler.
    harness: Option<Harness>,
    /// Refusal audit lines per second (an unauthenticated flood must not
    /// fill the log queue).
    refusal_log: crate::logging::RefusalLogLimit,
}

/// A signed leaf and who it was issued to.
struct Signed {
    issued: Issued,
    caller: Caller,
    key: KeyKind,
    ca_key_id: String,
}

/// A failed request and what was known when it failed, for the audit line.
/// Boxed on the way up: a `Caller` and a `Status` make it large.
struct Refused {
    error: ServiceError,
    caller: Option<Caller>,
    ca_key_id: Option<String>,
}

impl ServiceError {
    /// This error, with the caller and CA key known when it happened.
    fn known(self, caller: Option<&Caller>, ca_key_id: Option<&str>) -> Box<Refused> {
        Box::new(Refused {
            error: self,
            caller: caller.cloned(),
            ca_key_id: ca_key_id.map(str::to_string),
        })
    }
}

impl CertificateService {
    pub fn new(
        ca: Arc<Current>,
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
                harness: Harness::new(faults, issued_log),
                refusal_log: Default::default(),
            }),
        }
    }

    /// One counted request: the handler between the metrics and one audit line.
    async fn serve(
        &self,
        request: &Request<IstioCertificateRequest>,
        overrides: &Overrides,
    ) -> Result<Issued, Status> {
        let started = Instant::now();
        let m = &self.inner.metrics;
        m.csr_count.inc();
        m.inflight.inc();
        let result = match &overrides.refuse {
            Some(status) => Err(ServiceError::Injected(status.clone()).known(None, None)),
            None => self.handle(request, overrides).await,
        };
        m.inflight.dec();
        let elapsed = started.elapsed().as_secs_f64();
        match result {
            Ok(signed) => {
                self.count_issued(&signed, elapsed);
                Audit::new(request, Some(&signed.caller), Some(&signed.ca_key_id))
                    .issued(&signed.issued, overrides.faults);
                Ok(signed.issued)
            }
            Err(refused) => {
                let class = refused.error.classify();
                self.count_refused(&refused.error, &class, elapsed);
                // Over the rate the line is counted instead of formatted.
                if let Some(suppressed) = self.inner.refusal_log.admit(Instant::now()) {
                    let caller = refused.caller.as_ref();
                    Audit::new(request, caller, refused.ca_key_id.as_deref()).refused(
                        &refused.error,
                        class.status.code(),
                        suppressed,
                    );
                }
                Err(class.status)
            }
        }
    }

    /// The handler: authenticate, authorize impersonation, take a signing
    /// slot, then sign (off the reactor for an RSA CA key).
    async fn handle(
        &self,
        request: &Request<IstioCertificateRequest>,
        overrides: &Overrides,
    ) -> Result<Signed, Box<Refused>> {
        let inner = &*self.inner;
        let claimant = self
            .authenticate(request)
            .await
            .map_err(|e| e.known(None, None))?;
        let claimant = match impersonated_identity(request.get_ref()) {
            Some(target) => inner
                .config
                .impersonation
                .authorize(claimant.caller(), target)
                .map(Claimant::Proven)
                .map_err(|e| ServiceError::Impersonation(e).known(claimant.caller(), None))?,
            None => claimant,
        };
        let bundle = (inner.ca.current())
            .ok_or_else(|| ServiceError::CaNotReady.known(claimant.caller(), None))?;
        let permit = self
            .signing_slot(overrides.slow_signing)
            .await
            .map_err(|e| e.known(claimant.caller(), Some(bundle.signer().key_id_hex())))?;
        self.sign(permit, bundle, claimant, request.get_ref(), overrides.leaf)
            .await
    }

    fn count_issued(&self, signed: &Signed, elapsed: f64) {
        let m = &self.inner.metrics;
        m.record_issued(signed.caller.kind(), signed.key, elapsed);
        m.success_cert_issuance_count.inc();
    }

    fn count_refused(&self, error: &ServiceError, class: &Class, elapsed: f64) {
        let m = &self.inner.metrics;
        m.request_duration
            .get_or_create(&OutcomeLabels {
                outcome: class.outcome,
            })
            .observe(elapsed);
        if class.authn_failure {
            m.authentication_failure_count.inc();
        }
        if let Some(kind) = class.sign_error {
            m.csr_sign_err_count
                .get_or_create(&SignErrorLabels { error: kind })
                .inc();
        }
        if matches!(error, ServiceError::Csr(_)) {
            m.csr_parsing_err_count.inc();
        }
    }

    /// The caller the headers prove, or the lab-mode claimant when none does.
    async fn authenticate(
        &self,
        request: &Request<IstioCertificateRequest>,
    ) -> Result<Claimant, ServiceError> {
        let peer_certs = request.peer_certs();
        let ctx = RequestContext {
            metadata: request.metadata(),
            peer_certs: peer_certs.as_deref().map(Vec::as_slice),
            remote_addr: request.remote_addr(),
        };
        match self.inner.config.authenticators.authenticate(&ctx).await {
            AuthnOutcome::Authenticated(caller) => Ok(Claimant::Proven(caller)),
            AuthnOutcome::Refused(failures) if failures.iter().any(AuthnError::is_transient) => {
                Err(ServiceError::AuthnUnavailable(failures))
            }
            AuthnOutcome::Refused(failures) => match &self.inner.config.lab_mode {
                None => Err(ServiceError::Unauthenticated(failures)),
                Some(td) => {
                    for f in &failures {
                        info!(reason = %f, "authenticator refused; falling back to lab mode");
                    }
                    Ok(Claimant::LabMode(td.clone()))
                }
            },
        }
    }

    /// A signing slot, within the queue timeout. `slow_signing` (a harness
    /// fault) models a slow signer, so it holds the slot.
    async fn signing_slot(
        &self,
        slow_signing: Duration,
    ) -> Result<OwnedSemaphorePermit, ServiceError> {
        let started = Instant::now();
        let timeout = self.inner.config.sign_queue_timeout;
        let permit = tokio::time::timeout(timeout, self.inner.limiter.clone().acquire_owned())
            .await
            .map_err(|_| ServiceError::Overloaded {
                waited: started.elapsed(),
            })?
            .map_err(|_| ServiceError::WorkerFailed("signing limiter closed".into()))?;
        if !slow_signing.is_zero() {
            tokio::time::sleep(slow_signing).await;
        }
        Ok(permit)
    }

    /// Holding `permit`: parse the CSR, resolve who the leaf is for, issue;
    /// off the reactor for an RSA CA key (see [`signs_inline`]).
    async fn sign(
        &self,
        permit: OwnedSemaphorePermit,
        bundle: Arc<CaBundle>,
        claimant: Claimant,
        body: &IstioCertificateRequest,
        overrides: LeafOverrides,
    ) -> Result<Signed, Box<Refused>> {
        let csr_text = body.csr.clone();
        let requested_ttl = body.validity_duration;
        let policy = self.inner.config.ttl;
        let trust_domains = self.inner.config.trust_domains.clone();
        let ca_key_id = bundle.signer().key_id_hex().to_string();
        // For a worker that panicked: what was known before it started.
        let (seen, seen_key) = (claimant.caller().cloned(), ca_key_id.clone());
        let inline = signs_inline(bundle.signer().key_kind());
        let work = move || {
            let _permit = permit;
            let known = Some(ca_key_id.as_str());
            let csr = VerifiedCsr::parse(&csr_text)
                .map_err(|e| ServiceError::Csr(e).known(claimant.caller(), known))?;
            let caller = claimant
                .resolve(&csr)
                .map_err(|e| ServiceError::LabModeIdentity(e).known(None, known))?;
            // The one trust-domain check every authenticator, impersonation
            // and lab mode pass: nothing else may reach the signer.
            trust_domains
                .check(caller.identities())
                .map_err(|e| ServiceError::OutsideTrustDomain(e).known(Some(&caller), known))?;
            let now = OffsetDateTime::now_utc();
            match issuance::issue(
                &bundle,
                &caller,
                &csr,
                requested_ttl,
                &policy,
                &overrides,
                now,
            ) {
                Ok(issued) => Ok(Signed {
                    issued,
                    caller,
                    key: csr.key_kind(),
                    ca_key_id,
                }),
                Err(e) => Err(ServiceError::Issue(e).known(Some(&caller), known)),
            }
        };
        let failed = |reason: String| {
            ServiceError::WorkerFailed(reason).known(seen.as_ref(), Some(&seen_key))
        };
        if inline {
            // A panic is caught here as the blocking pool would catch it.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
                .map_err(|_| failed("signing panicked".into()))?
        } else {
            tokio::task::spawn_blocking(work)
                .await
                .map_err(|e| failed(e.to_string()))?
        }
    }
}

/// Whether a CA key signs on the request's own thread instead of the
/// blocking pool. An ECDSA or Ed25519 signature plus the CSR check take tens
/// of microseconds, about what handing the work to a pool thread and back
/// costs in wake-ups and context switches (measured in docs/performance.md);
/// an RSA signature takes milliseconds (RSA-4096: ~4 ms), which would stall
/// the other requests of that reactor thread. The signing slot (semaphore)
/// bounds both the same way.
fn signs_inline(ca_key: KeyKind) -> bool {
    !matches!(ca_key, KeyKind::Rsa { .. })
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
        let issued = match &self.inner.harness {
            None => self.serve(&request, &Overrides::NONE).await?,
            Some(harness) => harness.serve(self, &request).await?,
        };
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: issued.cert_chain,
        }))
    }
}
