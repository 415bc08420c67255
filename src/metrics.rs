//! Prometheus metrics. The `citadel_server_*` families keep istiod's exact
//! names, labels and semantics (no `_total` suffix) so Istio dashboards work;
//! `plugca_*` families add what istiod lacks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::ca::keys::KeyKind;

/// A counter exported under its exact name (istiod's counters have no `_total`).
#[derive(Debug, Default, Clone)]
pub struct PlainCounter(Arc<AtomicU64>);

impl PlainCounter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl TypedMetric for PlainCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for PlainCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // Encoded as a plain sample so the name stays exactly istiod's.
        encoder.encode_gauge(&(self.get() as i64))
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// istiod's `error` label values of `citadel_server_csr_sign_err_count`.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
pub enum SignErrorType {
    CA_NOT_READY,
    CSR_ERROR,
    TTL_ERROR,
    CERT_GEN_ERROR,
    UNKNOWN,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignErrorLabels {
    pub error: SignErrorType,
}

/// Outcome of one CreateCertificate call.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    issued,
    unauthenticated,
    invalid_argument,
    internal,
    overloaded,
    /// An authentication backend (API server, JWKS endpoint) did not answer.
    unavailable,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: Outcome,
}

/// How the caller proved its identity.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum AuthnKind {
    client_cert,
    jwt,
    kube_jwt,
    xfcc,
    trusted_csr,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuedLabels {
    pub authenticator: AuthnKind,
    /// CSR key type: rsa2048, p256, ... (a small closed set).
    pub key: String,
}

/// Result of a CA reload attempt.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ReloadResult {
    success,
    failure,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: ReloadResult,
}

/// Which CA certificate an expiry warning is about.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CaCertKind {
    signing,
    root,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaCertLabels {
    pub cert: CaCertKind,
}

// Authentication and reload hardening (issue #12 items 5, 10).
/// What happened to a bearer token the Kubernetes authenticator saw.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum TokenReviewResult {
    /// A TokenReview was sent.
    reviewed,
    /// Answered from the positive cache.
    cached,
    /// Answered from the short cache of definite refusals.
    cached_refusal,
    /// No review slot in time: UNAVAILABLE.
    shed,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenReviewLabels {
    pub result: TokenReviewResult,
}

/// Metrics of the hardening items, registered by [`Metrics::new`].
#[derive(Debug, Default)]
pub struct HardeningMetrics {
    pub token_reviews: Family<TokenReviewLabels, prometheus_client::metrics::counter::Counter>,
    pub reload_last_success: Gauge<f64, AtomicU64>,
    pub reload_last_attempt: Gauge<f64, AtomicU64>,
    /// 1 while a bundle read has not returned within its deadline.
    pub reload_stuck: Gauge,
}

impl HardeningMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "plugca_token_reviews",
            "Bearer tokens seen by the Kubernetes authenticator: reviewed, answered from a cache, or shed (UNAVAILABLE)",
            self.token_reviews.clone(),
        );
        registry.register(
            "plugca_ca_reload_last_success_timestamp_seconds",
            "Unix time of the last reload attempt that completed (bundle swapped or unchanged)",
            self.reload_last_success.clone(),
        );
        registry.register(
            "plugca_ca_reload_last_attempt_timestamp_seconds",
            "Unix time of the last reload attempt, whatever its result",
            self.reload_last_attempt.clone(),
        );
        registry.register(
            "plugca_ca_reload_stuck",
            "1 while reading the cacerts directory has not returned within its deadline",
            self.reload_stuck.clone(),
        );
    }
}

/// Every metric, registered once.
pub struct Metrics {
    registry: Registry,
    pub csr_count: PlainCounter,
    pub authentication_failure_count: PlainCounter,
    pub csr_sign_err_count: Family<SignErrorLabels, PlainCounter>,
    pub success_cert_issuance_count: PlainCounter,
    pub csr_parsing_err_count: PlainCounter,
    pub id_extraction_err_count: PlainCounter,
    pub root_cert_expiry_timestamp: Gauge<f64, AtomicU64>,
    pub root_cert_expiry_seconds: Gauge<f64, AtomicU64>,
    pub cert_chain_expiry_timestamp: Gauge<f64, AtomicU64>,
    pub cert_chain_expiry_seconds: Gauge<f64, AtomicU64>,
    pub request_duration: Family<OutcomeLabels, Histogram>,
    pub issued: Family<IssuedLabels, prometheus_client::metrics::counter::Counter>,
    /// Handles into the two families above for the issuance path, resolved
    /// once (see [`Metrics::record_issued`]).
    issued_handles: IssuedHandles,
    pub inflight: Gauge,
    pub reloads: Family<ReloadLabels, prometheus_client::metrics::counter::Counter>,
    pub expiring: Family<CaCertLabels, Gauge>,
    /// Leadership, writes and errors of the in-cluster controllers.
    pub controllers: std::sync::Arc<crate::controllers::ControllerMetrics>,
    /// Connections, streams and refusals of the listeners.
    pub net: crate::net::NetMetrics,
    pub hardening: HardeningMetrics,
    /// Health of the pod caches behind Kubernetes node authorization.
    pub node_authz: crate::impersonation::node::NodeAuthMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            csr_count: PlainCounter::default(),
            authentication_failure_count: PlainCounter::default(),
            csr_sign_err_count: Family::default(),
            success_cert_issuance_count: PlainCounter::default(),
            csr_parsing_err_count: PlainCounter::default(),
            id_extraction_err_count: PlainCounter::default(),
            root_cert_expiry_timestamp: Gauge::default(),
            root_cert_expiry_seconds: Gauge::default(),
            cert_chain_expiry_timestamp: Gauge::default(),
            cert_chain_expiry_seconds: Gauge::default(),
            request_duration: Family::new_with_constructor(|| {
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    0.0005, 2.0, 16,
                ))
            }),
            issued: Family::default(),
            issued_handles: IssuedHandles::default(),
            inflight: Gauge::default(),
            reloads: Family::default(),
            expiring: Family::default(),
            controllers: Default::default(),
            net: crate::net::NetMetrics::default(),
            hardening: HardeningMetrics::default(),
            node_authz: Default::default(),
            registry: Registry::default(),
        };
        m.controllers.register(&mut registry);
        m.net.register(&mut registry);
        m.hardening.register(&mut registry);
        crate::logging::register(&mut registry);
        m.node_authz.register(&mut registry);
        registry.register(
            "citadel_server_csr_count",
            "The number of CSRs received by Citadel server",
            m.csr_count.clone(),
        );
        registry.register(
            "citadel_server_authentication_failure_count",
            "The number of authentication failures",
            m.authentication_failure_count.clone(),
        );
        registry.register(
            "citadel_server_csr_sign_err_count",
            "The number of errors occurred when signing the CSR",
            m.csr_sign_err_count.clone(),
        );
        registry.register(
            "citadel_server_success_cert_issuance_count",
            "The number of certificates issuances that have succeeded",
            m.success_cert_issuance_count.clone(),
        );
        registry.register(
            "citadel_server_csr_parsing_err_count",
            "The number of errors occurred when parsing the CSR",
            m.csr_parsing_err_count.clone(),
        );
        registry.register(
            "citadel_server_id_extraction_err_count",
            "The number of errors occurred when extracting the ID from CSR",
            m.id_extraction_err_count.clone(),
        );
        registry.register(
            "citadel_server_root_cert_expiry_timestamp",
            "The unix timestamp, in seconds, when Citadel root cert will expire",
            m.root_cert_expiry_timestamp.clone(),
        );
        registry.register(
            "citadel_server_root_cert_expiry_seconds",
            "The time remaining, in seconds, before the root cert will expire",
            m.root_cert_expiry_seconds.clone(),
        );
        registry.register(
            "citadel_server_cert_chain_expiry_timestamp",
            "The unix timestamp, in seconds, when Citadel cert chain will expire",
            m.cert_chain_expiry_timestamp.clone(),
        );
        registry.register(
            "citadel_server_cert_chain_expiry_seconds",
            "The time remaining, in seconds, before the cert chain will expire",
            m.cert_chain_expiry_seconds.clone(),
        );
        registry.register(
            "plugca_request_duration_seconds",
            "CreateCertificate latency by outcome",
            m.request_duration.clone(),
        );
        registry.register(
            "plugca_certificates_issued",
            "Certificates issued, by authenticator and CSR key type",
            m.issued.clone(),
        );
        registry.register(
            "plugca_inflight_requests",
            "CreateCertificate calls in progress",
            m.inflight.clone(),
        );
        registry.register(
            "plugca_ca_reloads",
            "CA bundle reload attempts that changed the CA (success) or were refused (failure)",
            m.reloads.clone(),
        );
        registry.register(
            "plugca_ca_cert_expiring",
            "1 when the signing certificate or a root is within --expiry-warning of NotAfter",
            m.expiring.clone(),
        );
        Metrics { registry, ..m }
    }

    /// One issued certificate: `plugca_certificates_issued{authenticator,key}`
    /// and `plugca_request_duration_seconds{outcome="issued"}`. The label
    /// sets of the usual keys are looked up in their family once, on first
    /// use (so /metrics still shows only what happened); after that an
    /// issuance costs two atomic updates, no lock, hash or allocation.
    pub fn record_issued(&self, authenticator: AuthnKind, key: KeyKind, seconds: f64) {
        let h = &self.issued_handles;
        h.duration
            .get_or_init(|| {
                self.request_duration
                    .get_or_create(&OutcomeLabels {
                        outcome: Outcome::issued,
                    })
                    .clone()
            })
            .observe(seconds);
        let labels = || IssuedLabels {
            authenticator,
            key: key.label(),
        };
        match IssuedHandles::slot(authenticator, key) {
            Some(i) => h.issued[i]
                .get_or_init(|| self.issued.get_or_create(&labels()).clone())
                .inc(),
            None => self.issued.get_or_create(&labels()).inc(),
        };
    }

    /// Records the expiry of a newly loaded bundle.
    pub fn set_expiry(&self, root_not_after: i64, chain_not_after: i64) {
        self.root_cert_expiry_timestamp.set(root_not_after as f64);
        self.cert_chain_expiry_timestamp.set(chain_not_after as f64);
    }

    /// Prometheus text (exposition format 0.0.4, which also accepts the
    /// OpenMetrics comments prometheus-client writes).
    pub fn render(&self) -> String {
        let now = time::OffsetDateTime::now_utc().unix_timestamp() as f64;
        let root = self.root_cert_expiry_timestamp.get();
        if root > 0.0 {
            self.root_cert_expiry_seconds.set(root - now);
        }
        let chain = self.cert_chain_expiry_timestamp.get();
        if chain > 0.0 {
            self.cert_chain_expiry_seconds.set(chain - now);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry);
        out
    }
}

/// Common CSR keys with a pre-resolved `plugca_certificates_issued` slot.
const HANDLE_KEYS: [KeyKind; 5] = [
    KeyKind::EcdsaP256,
    KeyKind::Rsa { bits: 2048 },
    KeyKind::EcdsaP384,
    KeyKind::Rsa { bits: 3072 },
    KeyKind::Rsa { bits: 4096 },
];
const HANDLE_AUTHNS: [AuthnKind; 5] = [
    AuthnKind::client_cert,
    AuthnKind::jwt,
    AuthnKind::kube_jwt,
    AuthnKind::xfcc,
    AuthnKind::trusted_csr,
];

type Counter = prometheus_client::metrics::counter::Counter;

#[derive(Debug, Default)]
struct IssuedHandles {
    duration: OnceLock<Histogram>,
    issued: [OnceLock<Counter>; HANDLE_KEYS.len() * HANDLE_AUTHNS.len()],
}

impl IssuedHandles {
    fn slot(authenticator: AuthnKind, key: KeyKind) -> Option<usize> {
        let a = HANDLE_AUTHNS.iter().position(|x| *x == authenticator)?;
        let k = HANDLE_KEYS.iter().position(|x| *x == key)?;
        Some(a * HANDLE_KEYS.len() + k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_handles_count_into_the_families_and_show_only_what_was_used() {
        let m = Metrics::new();
        m.record_issued(AuthnKind::kube_jwt, KeyKind::EcdsaP256, 0.001);
        m.record_issued(AuthnKind::kube_jwt, KeyKind::EcdsaP256, 0.001);
        m.record_issued(AuthnKind::jwt, KeyKind::Rsa { bits: 2304 }, 0.001);
        let text = m.render();
        assert!(
            text.contains(
                "plugca_certificates_issued_total{authenticator=\"kube_jwt\",key=\"p256\"} 2\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "plugca_certificates_issued_total{authenticator=\"jwt\",key=\"rsa2304\"} 1\n"
            ),
            "{text}"
        );
        assert!(!text.contains("key=\"rsa2048\""), "{text}");
        assert!(
            text.contains("plugca_request_duration_seconds_count{outcome=\"issued\"} 3\n"),
            "{text}"
        );
    }

    #[test]
    fn istio_counters_keep_their_exact_names() {
        let m = Metrics::new();
        m.csr_count.inc();
        m.csr_sign_err_count
            .get_or_create(&SignErrorLabels {
                error: SignErrorType::TTL_ERROR,
            })
            .inc();
        let text = m.render();
        assert!(text.contains("\ncitadel_server_csr_count 1\n"), "{text}");
        assert!(
            text.contains("# TYPE citadel_server_csr_count counter\n"),
            "{text}"
        );
        assert!(
            text.contains("citadel_server_csr_sign_err_count{error=\"TTL_ERROR\"} 1\n"),
            "{text}"
        );
        assert!(!text.contains("citadel_server_csr_count_total"));
    }

    #[test]
    fn expiry_seconds_are_derived_at_scrape_time() {
        let m = Metrics::new();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        m.set_expiry(now + 3600, now + 1800);
        let text = m.render();
        let secs = |name: &str| -> f64 {
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .unwrap();
            line.split(' ').nth(1).unwrap().parse().unwrap()
        };
        assert!((secs("citadel_server_root_cert_expiry_seconds") - 3600.0).abs() < 5.0);
        assert!((secs("citadel_server_cert_chain_expiry_seconds") - 1800.0).abs() < 5.0);
    }
}
