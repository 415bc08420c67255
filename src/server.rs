//! The `IstioCertificateService` gRPC handler and the one place where errors
//! become gRPC statuses.
//!
//! The handler reads top to bottom: count -> authenticate -> refuse
//! impersonation -> wait for a signing slot -> (off the reactor) parse CSR,
//! check TTL, sign -> assemble the chain -> count the outcome.

pub mod error;

use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::authn::trusted_csr;
use crate::authn::{Authenticators, AuthnError, AuthnOutcome, Caller, RequestContext};
use crate::ca::Current;
use crate::csr::VerifiedCsr;
use crate::fault::{self, Fault, Faults};
use crate::identity::TrustDomain;
use crate::impersonation::Impersonation;
use crate::issuance::{self, Issued, TtlPolicy};
use crate::metrics::{IssuedLabels, Metrics, Outcome, OutcomeLabels, SignErrorLabels};
use crate::pb::istio_certificate_service_server::IstioCertificateService;
use crate::pb::{IstioCertificateRequest, IstioCertificateResponse};
pub use error::{
    MSG_AUTHN_FAILURE, MSG_AUTHN_UNAVAILABLE, MSG_IMPERSONATION_FAILURE, ServiceError,
};

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
        let leaf = fault::leaf_overrides(faults);
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
                let issued = issuance::issue(
                    &bundle,
                    who,
                    &csr,
                    requested_ttl,
                    &policy,
                    &leaf,
                    OffsetDateTime::now_utc(),
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
        let class = error.classify();
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
        warn!(
            target: "plugca::audit",
            outcome = "refused",
            code = ?class.status.code(),
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
            .map_or_else(|| "-".into(), Caller::identity_list)
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
                        outcome: error.classify().outcome,
                    })
                    .observe(elapsed);
                self.record_failure(&error, &audit);
                Err(error.classify().status)
            }
        }
    }
}
