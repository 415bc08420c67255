//! Kubernetes service-account tokens, checked by the API server of the
//! caller's cluster with a TokenReview (`authentication.k8s.io/v1`), as
//! istiod's `KubeJWTAuthenticator` does.
//!
//! Accepted: `status.authenticated`, no `status.error`, group
//! `system:serviceaccounts`, username `system:serviceaccount:<ns>:<sa>`.
//! Identity `spiffe://<td>/ns/<ns>/sa/<sa>`; the pod name and UID of bound
//! tokens are kept for node authorization. When the API server echoes
//! `status.audiences`, one of ours must be in it. Positive reviews are cached
//! for at most `--token-review-cache-ttl` and never past the token's `exp`, so
//! a revoked token (deleted pod) stops working within that time; an API server
//! that is down or slower than the timeout fails the request with UNAVAILABLE
//! (clients retry), never UNAUTHENTICATED.
//!
//! Junk tokens cannot be amplified into API-server load: a definite refusal
//! (`status.error`) is remembered for [`NEGATIVE_CACHE_TTL`], identical tokens
//! in flight share one review, and at most [`MAX_CONCURRENT_TOKEN_REVIEWS`]
//! reviews run at once; a request that cannot get a slot within
//! [`TOKEN_REVIEW_QUEUE_WAIT`] fails with UNAVAILABLE and is counted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use tracing::instrument;

use crate::authn::error_chain;
use crate::authn::jwt::{self, MAX_TOKEN_BYTES};
use crate::authn::token_cache::{TokenCache, unverified_expiry};
use crate::authn::{Authenticator, AuthnError, BoundPod, Caller, RequestContext, ServiceAccount};
use crate::identity::{Identity, SpiffeId, TrustDomain};
use crate::kubernetes::{Clusters, UnknownCluster};
use crate::metrics::{AuthnKind, Metrics, TokenReviewLabels, TokenReviewResult};

/// How long a definite refusal of a token is remembered.
pub const NEGATIVE_CACHE_TTL: Duration = Duration::from_secs(5);
/// Most refused tokens remembered.
pub const NEGATIVE_CACHE_CAPACITY: usize = 4096;
/// TokenReviews in flight at once, over all clusters.
pub const MAX_CONCURRENT_TOKEN_REVIEWS: usize = 32;
/// How long a request waits for a review slot before UNAVAILABLE.
pub const TOKEN_REVIEW_QUEUE_WAIT: Duration = Duration::from_secs(1);

/// `status.user.extra` keys of bound service-account tokens.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const SERVICE_ACCOUNTS_GROUP: &str = "system:serviceaccounts";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KubeJwtError {
    #[error("target JWT extraction error: no bearer token exists in HTTP authorization header")]
    NoBearer,
    #[error("the bearer token is longer than {MAX_TOKEN_BYTES} bytes")]
    TooLong,
    #[error("{0}")]
    UnknownCluster(#[from] UnknownCluster),
    #[error(
        "failed to validate the JWT from cluster {cluster:?}: the service account authentication returns an error: {error}"
    )]
    ReviewError { cluster: String, error: String },
    #[error("failed to validate the JWT from cluster {cluster:?}: the token is not authenticated")]
    NotAuthenticated { cluster: String },
    #[error(
        "failed to validate the JWT from cluster {cluster:?}: the token is not a service account (user {username:?} is not in group system:serviceaccounts)"
    )]
    NotServiceAccount { cluster: String, username: String },
    #[error(
        "failed to validate the JWT from cluster {cluster:?}: token review returned an invalid username field {username:?} (want system:serviceaccount:<namespace>:<name>)"
    )]
    Username { cluster: String, username: String },
    #[error("failed to validate the JWT from cluster {cluster:?}: {reason}")]
    Identity { cluster: String, reason: String },
    #[error(
        "the API server of cluster {cluster:?} refused the TokenReview: HTTP {code}: {message} (may plugca's service account create tokenreviews?)"
    )]
    Refused {
        cluster: String,
        code: u16,
        message: String,
    },
    #[error("the API server of cluster {cluster:?} is unavailable: {reason}")]
    Unavailable { cluster: String, reason: String },
    #[error(
        "the API server of cluster {cluster:?} did not answer the TokenReview within {after:?}"
    )]
    Timeout { cluster: String, after: Duration },
    #[error(
        "failed to validate the JWT from cluster {cluster:?}: the token is for audiences [{got}], none of ours [{want}]"
    )]
    Audience {
        cluster: String,
        got: String,
        want: String,
    },
    #[error(
        "too many TokenReviews in flight ({MAX_CONCURRENT_TOKEN_REVIEWS}); no slot for cluster {cluster:?} within {waited:?}"
    )]
    Busy { cluster: String, waited: Duration },
}

impl KubeJwtError {
    /// The API server could not answer: the client should retry (UNAVAILABLE).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            KubeJwtError::Unavailable { .. }
                | KubeJwtError::Timeout { .. }
                | KubeJwtError::Busy { .. }
        )
    }

    /// A definite verdict on the token itself that cannot turn positive: the
    /// API server could not verify it (bad signature, expired, deleted pod).
    /// Only these are remembered; a bare `authenticated: false` is not, nor
    /// anything transient.
    fn is_cacheable_refusal(&self) -> bool {
        matches!(self, KubeJwtError::ReviewError { .. })
    }
}

/// Validates bearer tokens with TokenReview against the selected cluster.
pub struct KubeJwtAuthenticator {
    clusters: Arc<Clusters>,
    audiences: Vec<String>,
    trust_domain: TrustDomain,
    timeout: Duration,
    cache: TokenCache<Caller>,
    /// Longest a positive review is remembered (never past `exp`).
    cache_ttl: Duration,
    refused: TokenCache<KubeJwtError>,
    slots: Arc<Semaphore>,
    /// One lock per token being reviewed, so identical tokens share one review.
    in_flight: Mutex<HashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>>,
    metrics: Option<Arc<Metrics>>,
}

impl KubeJwtAuthenticator {
    pub fn new(
        clusters: Arc<Clusters>,
        audiences: Vec<String>,
        trust_domain: TrustDomain,
        timeout: Duration,
    ) -> Self {
        KubeJwtAuthenticator {
            clusters,
            audiences,
            trust_domain,
            timeout,
            cache: TokenCache::default(),
            cache_ttl: Duration::from_secs(60),
            refused: TokenCache::with_capacity(NEGATIVE_CACHE_CAPACITY),
            slots: Arc::new(Semaphore::new(MAX_CONCURRENT_TOKEN_REVIEWS)),
            in_flight: Mutex::new(HashMap::new()),
            metrics: None,
        }
    }

    /// Caps how long a positive review is remembered (`--token-review-cache-ttl`).
    pub fn with_cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache_ttl = ttl;
        self
    }

    /// Counts reviews, cache hits and shed requests.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn count(&self, result: TokenReviewResult) {
        if let Some(m) = &self.metrics {
            m.hardening
                .token_reviews
                .get_or_create(&TokenReviewLabels { result })
                .inc();
        }
    }

    fn cached(&self, key: &[u8; 32], now: i64) -> Option<Result<Caller, KubeJwtError>> {
        if let Some(caller) = self.cache.get(key, now) {
            self.count(TokenReviewResult::cached);
            return Some(Ok(caller));
        }
        if let Some(e) = self.refused.get(key, now) {
            self.count(TokenReviewResult::cached_refusal);
            return Some(Err(e));
        }
        None
    }

    fn gate(&self, key: [u8; 32]) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key).or_default().clone()
    }

    fn release_gate(&self, key: &[u8; 32], gate: Arc<tokio::sync::Mutex<()>>) {
        let mut map = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        // Ours and the map's: nobody else waits for this token.
        if Arc::strong_count(&gate) == 2 {
            map.remove(key);
        }
    }

    /// The review of `token` by `cluster`, through the caches, the per-token
    /// gate and the concurrency cap.
    async fn authenticate_token(
        &self,
        cluster: &str,
        client: &kube::Client,
        token: &str,
    ) -> Result<Caller, KubeJwtError> {
        let key = TokenCache::<Caller>::key(cluster, token);
        let now = || time::OffsetDateTime::now_utc().unix_timestamp();
        if let Some(result) = self.cached(&key, now()) {
            return result;
        }
        let gate = self.gate(key);
        let result = async {
            let busy = |waited| KubeJwtError::Busy {
                cluster: cluster.to_string(),
                waited,
            };
            let _same_token = tokio::time::timeout(self.timeout, gate.lock())
                .await
                .map_err(|_| busy(self.timeout))?;
            // Another request may have reviewed this token while we waited.
            if let Some(result) = self.cached(&key, now()) {
                return result;
            }
            let _slot = match tokio::time::timeout(
                TOKEN_REVIEW_QUEUE_WAIT,
                self.slots.clone().acquire_owned(),
            )
            .await
            {
                Ok(Ok(permit)) => permit,
                _ => {
                    self.count(TokenReviewResult::shed);
                    return Err(busy(TOKEN_REVIEW_QUEUE_WAIT));
                }
            };
            self.count(TokenReviewResult::reviewed);
            let status = self.review(client, cluster, token).await?;
            let checked = caller_from_review(&status, cluster, &self.trust_domain)
                .and_then(|c| check_audiences(&status, &self.audiences, cluster).map(|()| c));
            let now = now();
            match &checked {
                Ok(caller) => {
                    let cap = now.saturating_add(self.cache_ttl.as_secs() as i64);
                    if let Some(exp) = unverified_expiry(token) {
                        self.cache.put(key, caller.clone(), exp.min(cap), now);
                    }
                }
                Err(e) if e.is_cacheable_refusal() => {
                    let until = now.saturating_add(NEGATIVE_CACHE_TTL.as_secs() as i64);
                    self.refused.put(key, e.clone(), until, now);
                }
                Err(_) => {}
            }
            checked
        }
        .await;
        self.release_gate(&key, gate);
        result
    }

    #[instrument(skip_all, fields(cluster = %cluster))]
    async fn review(
        &self,
        client: &kube::Client,
        cluster: &str,
        token: &str,
    ) -> Result<TokenReviewStatus, KubeJwtError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(self.audiences.clone()),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(client.clone());
        let created =
            tokio::time::timeout(self.timeout, api.create(&PostParams::default(), &review))
                .await
                .map_err(|_| KubeJwtError::Timeout {
                    cluster: cluster.to_string(),
                    after: self.timeout,
                })?;
        match created {
            Ok(tr) => Ok(tr.status.unwrap_or_default()),
            Err(kube::Error::Api(status)) if status.code < 500 && status.code != 429 => {
                Err(KubeJwtError::Refused {
                    cluster: cluster.to_string(),
                    code: status.code,
                    message: status.message.chars().take(256).collect(),
                })
            }
            Err(e) => Err(KubeJwtError::Unavailable {
                cluster: cluster.to_string(),
                reason: error_chain(&e),
            }),
        }
    }
}

/// When the API server echoes `status.audiences` (the audiences it accepted
/// the token for), one of ours must be among them.
pub fn check_audiences(
    status: &TokenReviewStatus,
    ours: &[String],
    cluster: &str,
) -> Result<(), KubeJwtError> {
    let Some(got) = &status.audiences else {
        return Ok(());
    };
    if got.iter().any(|a| ours.contains(a)) {
        return Ok(());
    }
    Err(KubeJwtError::Audience {
        cluster: cluster.to_string(),
        got: got
            .iter()
            .take(8)
            .map(|a| a.chars().take(64).collect::<String>())
            .collect::<Vec<_>>()
            .join(", "),
        want: ours.join(", "),
    })
}

/// The caller a TokenReview result proves, with istiod's checks.
pub fn caller_from_review(
    status: &TokenReviewStatus,
    cluster: &str,
    trust_domain: &TrustDomain,
) -> Result<Caller, KubeJwtError> {
    let cluster_s = || cluster.to_string();
    if let Some(error) = status.error.as_deref().filter(|e| !e.is_empty()) {
        return Err(KubeJwtError::ReviewError {
            cluster: cluster_s(),
            error: error.chars().take(256).collect(),
        });
    }
    if status.authenticated != Some(true) {
        return Err(KubeJwtError::NotAuthenticated {
            cluster: cluster_s(),
        });
    }
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let in_group = user
        .groups
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|g| g == SERVICE_ACCOUNTS_GROUP);
    if !in_group {
        return Err(KubeJwtError::NotServiceAccount {
            cluster: cluster_s(),
            username,
        });
    }
    let parts: Vec<&str> = username.split(':').collect();
    let ["system", "serviceaccount", ns, sa] = parts.as_slice() else {
        return Err(KubeJwtError::Username {
            cluster: cluster_s(),
            username,
        });
    };
    let id = SpiffeId::workload(trust_domain, ns, sa).map_err(|e| KubeJwtError::Identity {
        cluster: cluster_s(),
        reason: e.to_string(),
    })?;
    let extra = user.extra.unwrap_or_default();
    let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
    let pod = match (first(EXTRA_POD_NAME), first(EXTRA_POD_UID)) {
        (Some(name), Some(uid)) if !name.is_empty() && !uid.is_empty() => {
            Some(BoundPod { name, uid })
        }
        _ => None,
    };
    let detail = match &pod {
        Some(p) => format!("TokenReview by cluster {cluster} (pod {ns}/{})", p.name),
        None => format!("TokenReview by cluster {cluster}"),
    };
    Ok(
        Caller::new(vec![Identity::Spiffe(id)], AuthnKind::kube_jwt, detail).with_service_account(
            ServiceAccount {
                namespace: ns.to_string(),
                name: sa.to_string(),
                pod,
                cluster_id: Some(cluster.to_string()),
            },
        ),
    )
}

#[tonic::async_trait]
impl Authenticator for KubeJwtAuthenticator {
    fn name(&self) -> &'static str {
        "Kubernetes JWT (TokenReview)"
    }

    async fn authenticate(&self, ctx: &RequestContext<'_>) -> Result<Option<Caller>, AuthnError> {
        let token = match jwt::bearer_token(ctx.metadata) {
            Ok(Some(token)) => token,
            Ok(None) => return Ok(None),
            Err(_) => return Err(KubeJwtError::NoBearer.into()),
        };
        if token.len() > MAX_TOKEN_BYTES {
            return Err(KubeJwtError::TooLong.into());
        }
        let header = ctx
            .metadata
            .get("clusterid")
            .map(|v| v.to_str().unwrap_or("<not ASCII>"));
        let (cluster, client) = self.clusters.resolve(header).map_err(KubeJwtError::from)?;
        Ok(Some(self.authenticate_token(cluster, client, token).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;
    use std::collections::BTreeMap;

    fn td() -> TrustDomain {
        TrustDomain::parse("example.com").unwrap()
    }

    fn status(username: &str, groups: &[&str], extra: &[(&str, &str)]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            user: Some(UserInfo {
                username: Some(username.into()),
                groups: Some(groups.iter().map(|g| g.to_string()).collect()),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                        .collect::<BTreeMap<_, _>>(),
                ),
                uid: None,
            }),
            ..Default::default()
        }
    }

    const SA_GROUPS: &[&str] = &["system:serviceaccounts", "system:serviceaccounts:default"];

    #[test]
    fn a_service_account_review_proves_its_spiffe_identity() {
        let c = caller_from_review(
            &status(
                "system:serviceaccount:default:example-pod-sa",
                SA_GROUPS,
                &[(EXTRA_POD_NAME, "pod-1"), (EXTRA_POD_UID, "uid-1")],
            ),
            "Kubernetes",
            &td(),
        )
        .unwrap();
        assert_eq!(
            c.identities(),
            ["spiffe://example.com/ns/default/sa/example-pod-sa"]
        );
        assert_eq!(
            c.service_account(),
            Some(&ServiceAccount {
                namespace: "default".into(),
                name: "example-pod-sa".into(),
                pod: Some(BoundPod {
                    name: "pod-1".into(),
                    uid: "uid-1".into()
                }),
                cluster_id: Some("Kubernetes".into()),
            })
        );
    }

    #[test]
    fn at_signs_in_the_trust_domain_become_dots() {
        let c = caller_from_review(
            &status("system:serviceaccount:ns:sa", SA_GROUPS, &[]),
            "Kubernetes",
            &TrustDomain::parse("a@b").unwrap(),
        )
        .unwrap();
        assert_eq!(c.identities(), ["spiffe://a.b/ns/ns/sa/sa"]);
        assert_eq!(c.service_account().unwrap().pod, None, "legacy token");
    }

    #[test]
    fn every_rejection_names_its_reason() {
        let not_auth = TokenReviewStatus {
            authenticated: Some(false),
            ..Default::default()
        };
        assert_eq!(
            caller_from_review(&not_auth, "Kubernetes", &td())
                .unwrap_err()
                .to_string(),
            "failed to validate the JWT from cluster \"Kubernetes\": the token is not authenticated"
        );
        let errored = TokenReviewStatus {
            authenticated: Some(true),
            error: Some("token expired".into()),
            ..Default::default()
        };
        assert!(matches!(
            caller_from_review(&errored, "c", &td()),
            Err(KubeJwtError::ReviewError { .. })
        ));
        assert!(matches!(
            caller_from_review(
                &status(
                    "system:serviceaccount:ns:sa",
                    &["system:authenticated"],
                    &[]
                ),
                "c",
                &td()
            ),
            Err(KubeJwtError::NotServiceAccount { .. })
        ));
        for bad in [
            "system:serviceaccount:ns",
            "system:serviceaccount:ns:sa:extra",
            "alice",
            "system:node:ns:sa",
        ] {
            assert!(
                matches!(
                    caller_from_review(&status(bad, SA_GROUPS, &[]), "c", &td()),
                    Err(KubeJwtError::Username { .. })
                ),
                "{bad}"
            );
        }
        for bad in [
            "system:serviceaccount::sa",
            "system:serviceaccount:ns:",
            "system:serviceaccount:ns/x:sa",
        ] {
            assert!(
                matches!(
                    caller_from_review(&status(bad, SA_GROUPS, &[]), "c", &td()),
                    Err(KubeJwtError::Identity { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn an_echoed_audience_list_must_name_one_of_ours() {
        let ours = ["istio-ca".to_string()];
        let with = |a: Option<&[&str]>| TokenReviewStatus {
            audiences: a.map(|a| a.iter().map(|s| s.to_string()).collect()),
            ..status("system:serviceaccount:ns:sa", SA_GROUPS, &[])
        };
        assert_eq!(
            check_audiences(&with(None), &ours, "c"),
            Ok(()),
            "not echoed"
        );
        assert_eq!(
            check_audiences(&with(Some(&["other", "istio-ca"])), &ours, "c"),
            Ok(())
        );
        let e = check_audiences(&with(Some(&["kubernetes.default.svc"])), &ours, "c").unwrap_err();
        assert_eq!(
            e.to_string(),
            "failed to validate the JWT from cluster \"c\": the token is for audiences [kubernetes.default.svc], none of ours [istio-ca]"
        );
        assert!(matches!(
            check_audiences(&with(Some(&[])), &ours, "c"),
            Err(KubeJwtError::Audience { .. })
        ));
    }

    #[test]
    fn only_definite_refusals_are_remembered() {
        let c = || "c".to_string();
        assert!(
            KubeJwtError::ReviewError {
                cluster: c(),
                error: "invalid bearer token".into()
            }
            .is_cacheable_refusal()
        );
        for not in [
            KubeJwtError::NotAuthenticated { cluster: c() },
            KubeJwtError::Timeout {
                cluster: c(),
                after: Duration::from_secs(1),
            },
            KubeJwtError::Busy {
                cluster: c(),
                waited: Duration::from_secs(1),
            },
            KubeJwtError::Unavailable {
                cluster: c(),
                reason: "down".into(),
            },
        ] {
            assert!(!not.is_cacheable_refusal(), "{not}");
        }
        assert!(
            KubeJwtError::Busy {
                cluster: c(),
                waited: Duration::from_secs(1)
            }
            .is_transient()
        );
    }

    #[test]
    fn only_unanswered_reviews_are_transient() {
        let c = || "c".to_string();
        assert!(
            KubeJwtError::Timeout {
                cluster: c(),
                after: Duration::from_secs(5)
            }
            .is_transient()
        );
        assert!(
            KubeJwtError::Unavailable {
                cluster: c(),
                reason: "connection refused".into()
            }
            .is_transient()
        );
        assert!(!KubeJwtError::NotAuthenticated { cluster: c() }.is_transient());
        assert!(
            !KubeJwtError::Refused {
                cluster: c(),
                code: 403,
                message: "forbidden".into()
            }
            .is_transient()
        );
    }
}
