//! Kubernetes node authorization (istiod's `ClusterNodeAuthorizer`): a
//! trusted node agent (ztunnel) may impersonate a service account only when
//! its own pod exists with the UID and service account its bound token names,
//! and at least one running pod of the target service account is scheduled on
//! the same node.
//!
//! Pods come from one watch per cluster (kube-runtime's `watcher`: list, then
//! watch), kept as a small index with only the facts needed and a per-node
//! count of service accounts, so a request is two hash lookups and never an
//! API call. kube-runtime's `reflector` store is not used because it keeps
//! whole Pod objects and can only look pods up by name, which would mean
//! scanning every pod per request.
//!
//! The cache fails closed. After a watch error the watcher is started afresh
//! (with backoff), so the next success is a complete re-list, as client-go's
//! reflector does; until then the last known pods still answer, but only for
//! `--node-authz-max-staleness`. Past that, impersonation in that cluster gets
//! UNAVAILABLE (clients retry) and `plugca_node_authz_pod_cache_stale` is 1,
//! until a re-list completes. A watch that hangs without an error is ended
//! by kube-runtime's idle timeout (the server-side watch timeout, 290 s, plus
//! 5 s); the next watch start then fails or succeeds like any other.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::watcher::{self, DefaultBackoff, Event};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_stream::StreamExt as _;
use tracing::{info, warn};

use crate::authn::{BoundPod, ServiceAccount};
use crate::kubernetes::Clusters;

/// How long start-up waits for the first pod list of every cluster; after it
/// the server serves anyway and impersonation answers UNAVAILABLE until synced.
pub const INITIAL_POD_SYNC_WAIT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeAuthError {
    #[error(
        "caller {account} has no Kubernetes pod proof: node authorization needs a pod-bound service-account token reviewed by a cluster's API server"
    )]
    NoPodProof { account: String },
    #[error("no node authorizer for cluster {cluster:?}")]
    NoClusterAuthorizer { cluster: String },
    #[error(
        "the pod cache of cluster {cluster:?} has not completed its first list yet; retry later"
    )]
    NotSynced { cluster: String },
    #[error(
        "the pod cache of cluster {cluster:?} is stale: its watch has been failing for {failing_secs} s, longer than --node-authz-max-staleness ({max_staleness:?}); retry later"
    )]
    Stale {
        cluster: String,
        failing_secs: u64,
        max_staleness: Duration,
    },
    #[error("pod {namespace}/{name} not found in cluster {cluster:?}")]
    PodNotFound {
        cluster: String,
        namespace: String,
        name: String,
    },
    #[error(
        "pod {namespace}/{name} found in cluster {cluster:?}, but UID does not match (token {token_uid:?}, pod {pod_uid:?})"
    )]
    UidMismatch {
        cluster: String,
        namespace: String,
        name: String,
        token_uid: String,
        pod_uid: String,
    },
    #[error(
        "pod {namespace}/{name} found in cluster {cluster:?}, but ServiceAccount does not match (token {token_sa:?}, pod {pod_sa:?})"
    )]
    ServiceAccountMismatch {
        cluster: String,
        namespace: String,
        name: String,
        token_sa: String,
        pod_sa: String,
    },
    #[error("caller pod {namespace}/{name} in cluster {cluster:?} is not scheduled on a node")]
    NotScheduled {
        cluster: String,
        namespace: String,
        name: String,
    },
    #[error("no instances of \"{target}\" found on node \"{node}\" in cluster {cluster:?}")]
    NoInstancesOnNode {
        cluster: String,
        target: String,
        node: String,
    },
}

impl NodeAuthError {
    /// The cache cannot decide (not listed yet, or stale): UNAVAILABLE (clients retry).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            NodeAuthError::NotSynced { .. } | NodeAuthError::Stale { .. }
        )
    }
}

/// What node authorization needs to know of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodFacts {
    uid: String,
    service_account: String,
    node: Option<String>,
    failed: bool,
}

impl PodFacts {
    /// Counts as an instance of its service account on its node (istiod:
    /// not Failed, scheduled, with a service account).
    fn instance(&self) -> Option<&str> {
        match &self.node {
            Some(node) if !self.failed && !self.service_account.is_empty() => Some(node),
            _ => None,
        }
    }
}

/// The pods of one cluster, indexed by name and by node.
#[derive(Debug, Default)]
pub struct PodIndex {
    pods: HashMap<(String, String), PodFacts>,
    /// node -> (namespace, service account) -> number of instances.
    by_node: HashMap<String, HashMap<(String, String), usize>>,
}

impl PodIndex {
    fn key(pod: &Pod) -> Option<(String, String)> {
        Some((pod.metadata.namespace.clone()?, pod.metadata.name.clone()?))
    }

    fn facts(pod: &Pod) -> PodFacts {
        let spec = pod.spec.as_ref();
        PodFacts {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_default(),
            node: spec
                .and_then(|s| s.node_name.clone())
                .filter(|n| !n.is_empty()),
            failed: pod
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|p| p == "Failed"),
        }
    }

    /// Adds or replaces a pod.
    pub fn apply(&mut self, pod: &Pod) {
        let Some(key) = Self::key(pod) else { return };
        self.remove_key(&key);
        let facts = Self::facts(pod);
        if let Some(node) = facts.instance() {
            *self
                .by_node
                .entry(node.to_string())
                .or_default()
                .entry((key.0.clone(), facts.service_account.clone()))
                .or_default() += 1;
        }
        self.pods.insert(key, facts);
    }

    pub fn delete(&mut self, pod: &Pod) {
        if let Some(key) = Self::key(pod) {
            self.remove_key(&key);
        }
    }

    fn remove_key(&mut self, key: &(String, String)) {
        let Some(old) = self.pods.remove(key) else {
            return;
        };
        let Some(node) = old.instance() else { return };
        let Some(accounts) = self.by_node.get_mut(node) else {
            return;
        };
        let sa_key = (key.0.clone(), old.service_account.clone());
        if let Some(n) = accounts.get_mut(&sa_key) {
            *n -= 1;
            if *n == 0 {
                accounts.remove(&sa_key);
            }
        }
        if accounts.is_empty() {
            self.by_node.remove(node);
        }
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// istiod's checks, in its order, for a caller proven by a token bound to `pod`.
    pub fn authorize(
        &self,
        cluster: &str,
        caller: &ServiceAccount,
        pod: &BoundPod,
        target_namespace: &str,
        target_service_account: &str,
    ) -> Result<(), NodeAuthError> {
        let cluster_s = || cluster.to_string();
        let found = self
            .pods
            .get(&(caller.namespace.clone(), pod.name.clone()))
            .ok_or_else(|| NodeAuthError::PodNotFound {
                cluster: cluster_s(),
                namespace: caller.namespace.clone(),
                name: pod.name.clone(),
            })?;
        if found.uid != pod.uid {
            return Err(NodeAuthError::UidMismatch {
                cluster: cluster_s(),
                namespace: caller.namespace.clone(),
                name: pod.name.clone(),
                token_uid: pod.uid.clone(),
                pod_uid: found.uid.clone(),
            });
        }
        if found.service_account != caller.name {
            return Err(NodeAuthError::ServiceAccountMismatch {
                cluster: cluster_s(),
                namespace: caller.namespace.clone(),
                name: pod.name.clone(),
                token_sa: caller.name.clone(),
                pod_sa: found.service_account.clone(),
            });
        }
        let node = found
            .node
            .as_deref()
            .ok_or_else(|| NodeAuthError::NotScheduled {
                cluster: cluster_s(),
                namespace: caller.namespace.clone(),
                name: pod.name.clone(),
            })?;
        let present = self
            .by_node
            .get(node)
            .and_then(|a| {
                a.get(&(
                    target_namespace.to_string(),
                    target_service_account.to_string(),
                ))
            })
            .is_some_and(|n| *n > 0);
        if present {
            Ok(())
        } else {
            Err(NodeAuthError::NoInstancesOnNode {
                cluster: cluster_s(),
                target: format!("{target_namespace}/{target_service_account}"),
                node: node.to_string(),
            })
        }
    }
}

/// Metrics of node authorization, one series per cluster id (the configured
/// clusters, so the label is bounded).
#[derive(Debug, Default)]
pub struct NodeAuthMetrics {
    stale: Family<ClusterLabels, Gauge>,
    watch_errors: Family<ClusterLabels, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabels {
    cluster: String,
}

impl NodeAuthMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "plugca_node_authz_pod_cache_stale",
            "1 while a cluster's pod watch has been failing for longer than --node-authz-max-staleness: impersonation there gets UNAVAILABLE",
            self.stale.clone(),
        );
        registry.register(
            "plugca_node_authz_pod_watch_errors",
            "Errors of a cluster's pod watch (each one restarts it with a full re-list after a backoff)",
            self.watch_errors.clone(),
        );
    }

    fn stale_gauge(&self, cluster: &str) -> Gauge {
        self.stale
            .get_or_create(&ClusterLabels {
                cluster: cluster.to_string(),
            })
            .clone()
    }

    fn errors_counter(&self, cluster: &str) -> Counter {
        self.watch_errors
            .get_or_create(&ClusterLabels {
                cluster: cluster.to_string(),
            })
            .clone()
    }
}

/// What requests may trust of a cluster's pod cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CacheState {
    /// No list has completed yet (failed first lists included).
    Listing,
    /// Listed, and the watch has not failed since.
    Synced,
    /// Listed once, but the watch failed at `since` and no re-list has
    /// completed after it.
    Failing { since: Instant },
}

impl CacheState {
    /// Whether requests may still be answered from the index at `now`.
    fn check(
        self,
        cluster: &str,
        max_staleness: Duration,
        now: Instant,
    ) -> Result<(), NodeAuthError> {
        match self {
            CacheState::Listing => Err(NodeAuthError::NotSynced {
                cluster: cluster.to_string(),
            }),
            CacheState::Synced => Ok(()),
            CacheState::Failing { since } => {
                let failing = now.saturating_duration_since(since);
                if failing > max_staleness {
                    Err(NodeAuthError::Stale {
                        cluster: cluster.to_string(),
                        failing_secs: failing.as_secs(),
                        max_staleness,
                    })
                } else {
                    Ok(())
                }
            }
        }
    }

    /// The state after a watch error at `now`.
    fn failed(self, now: Instant) -> CacheState {
        match self {
            CacheState::Listing => CacheState::Listing,
            CacheState::Synced => CacheState::Failing { since: now },
            failing @ CacheState::Failing { .. } => failing,
        }
    }
}

/// The watch-backed pod index of one cluster; the watch stops when dropped.
struct PodCache {
    index: Arc<RwLock<PodIndex>>,
    state: tokio::sync::watch::Receiver<CacheState>,
    max_staleness: Duration,
    stale: Gauge,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PodCache {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PodCache {
    fn start(
        cluster: String,
        client: kube::Client,
        max_staleness: Duration,
        metrics: &NodeAuthMetrics,
    ) -> PodCache {
        let index = Arc::new(RwLock::new(PodIndex::default()));
        let (state_tx, state) = tokio::sync::watch::channel(CacheState::Listing);
        let stale = metrics.stale_gauge(&cluster);
        let health = Health {
            errors: metrics.errors_counter(&cluster),
            stale: stale.clone(),
            cluster,
            state: state_tx,
            max_staleness,
        };
        let task = tokio::spawn(watch_pods(client, index.clone(), health));
        PodCache {
            index,
            state,
            max_staleness,
            stale,
            task,
        }
    }
}

/// The watch task's side of [`CacheState`]: publishes it, logs the
/// transitions and keeps the metrics.
struct Health {
    cluster: String,
    state: tokio::sync::watch::Sender<CacheState>,
    max_staleness: Duration,
    stale: Gauge,
    errors: Counter,
}

impl Health {
    fn current(&self) -> CacheState {
        *self.state.borrow()
    }

    fn synced(&self, pods: usize) {
        let before = self.state.send_replace(CacheState::Synced);
        self.stale.set(0);
        match before {
            CacheState::Listing => {
                info!(cluster = %self.cluster, pods, "pod cache synced; node authorization ready");
            }
            CacheState::Failing { since } => info!(
                cluster = %self.cluster,
                pods,
                failed_for = ?since.elapsed(),
                "pod watch re-synced; node authorization answers from the new list"
            ),
            CacheState::Synced => {}
        }
    }

    fn failed(&self, error: &watcher::Error, retry_in: Duration) {
        self.errors.inc();
        let state = self.current().failed(Instant::now());
        self.state.send_replace(state);
        match state {
            CacheState::Failing { since } => warn!(
                cluster = %self.cluster,
                error = %error,
                failing_for = ?since.elapsed(),
                ?retry_in,
                max_staleness = ?self.max_staleness,
                "pod watch failed; re-listing after a backoff (node authorization keeps the last known pods for at most --node-authz-max-staleness, then answers UNAVAILABLE)"
            ),
            _ => warn!(
                cluster = %self.cluster,
                error = %error,
                ?retry_in,
                "pod list failed; retrying after a backoff (impersonation gets UNAVAILABLE until the first list completes)"
            ),
        }
    }

    /// Runs `work`; when the cache turns stale meanwhile, says so once (log
    /// and gauge) and keeps waiting for `work`.
    async fn run<F: Future>(&self, work: F) -> F::Output {
        let CacheState::Failing { since } = self.current() else {
            return work.await;
        };
        if self.stale.get() == 1 {
            return work.await;
        }
        let mut work = std::pin::pin!(work);
        tokio::select! {
            out = &mut work => out,
            () = tokio::time::sleep_until((since + self.max_staleness).into()) => {
                self.stale.set(1);
                warn!(
                    cluster = %self.cluster,
                    failing_for = ?since.elapsed(),
                    max_staleness = ?self.max_staleness,
                    "pod cache stale: node authorization answers UNAVAILABLE until the watch re-syncs"
                );
                work.await
            }
        }
    }
}

async fn watch_pods(client: kube::Client, index: Arc<RwLock<PodIndex>>, health: Health) {
    let api: Api<Pod> = Api::all(client);
    // kube-runtime's (and client-go's) backoff: 0.8 s doubling to 30 s, reset after 2 min without errors.
    let mut backoff = DefaultBackoff::default();
    let write = || index.write().unwrap_or_else(|p| p.into_inner());
    loop {
        // `any_semantic`: (re)lists are served from the API server's watch cache.
        let stream = watcher::watcher(api.clone(), watcher::Config::default().any_semantic());
        let mut stream = std::pin::pin!(stream);
        let mut relist: Option<PodIndex> = None;
        let error = loop {
            match health.run(stream.next()).await {
                Some(Ok(Event::Init)) => relist = Some(PodIndex::default()),
                Some(Ok(Event::InitApply(pod))) => {
                    if let Some(buf) = relist.as_mut() {
                        buf.apply(&pod);
                    }
                }
                Some(Ok(Event::InitDone)) => {
                    // A (re)list replaces the index at once, dropping pods deleted meanwhile.
                    let pods = relist.as_ref().map_or(0, PodIndex::len);
                    if let Some(buf) = relist.take() {
                        *write() = buf;
                    }
                    health.synced(pods);
                }
                Some(Ok(Event::Apply(pod))) => write().apply(&pod),
                Some(Ok(Event::Delete(pod))) => write().delete(&pod),
                Some(Err(e)) => break Some(e),
                // A watcher stream does not end; if it did, start a new one.
                None => break None,
            }
        };
        let retry_in = backoff.next().unwrap_or(Duration::from_secs(30));
        if let Some(e) = &error {
            // The watcher would only re-watch from its last resource version, which
            // gives no event when nothing changed: a fresh watcher re-lists, so a
            // recovery is always seen (InitDone).
            health.failed(e, retry_in);
        }
        health.run(tokio::time::sleep(retry_in)).await;
    }
}

/// Node authorization for every known cluster.
pub struct NodeAuthorizer {
    caches: BTreeMap<String, PodCache>,
}

impl std::fmt::Debug for NodeAuthorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeAuthorizer")
            .field("clusters", &self.caches.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl NodeAuthorizer {
    /// Starts one pod watch per cluster (needs a tokio runtime). A cluster
    /// whose watch has been failing for longer than `max_staleness` answers
    /// UNAVAILABLE until it re-syncs.
    pub fn start(
        clusters: &Clusters,
        max_staleness: Duration,
        metrics: &NodeAuthMetrics,
    ) -> NodeAuthorizer {
        NodeAuthorizer {
            caches: clusters
                .all()
                .map(|(id, client)| {
                    (
                        id.to_string(),
                        PodCache::start(id.to_string(), client.clone(), max_staleness, metrics),
                    )
                })
                .collect(),
        }
    }

    /// Waits until every cache has completed its first list, or `limit`.
    /// Returns the clusters still not synced.
    pub async fn wait_synced(&self, limit: Duration) -> Vec<String> {
        let waits = self.caches.iter().map(|(id, cache)| {
            let mut rx = cache.state.clone();
            async move {
                let ok = tokio::time::timeout(limit, rx.wait_for(|s| *s != CacheState::Listing))
                    .await
                    .is_ok_and(|r| r.is_ok());
                (!ok).then(|| id.clone())
            }
        });
        let mut pending = Vec::new();
        for w in waits {
            if let Some(id) = w.await {
                pending.push(id);
            }
        }
        pending
    }

    /// May the caller proven by `account` impersonate `target_ns/target_sa`?
    pub fn authorize(
        &self,
        account: &ServiceAccount,
        target_namespace: &str,
        target_service_account: &str,
    ) -> Result<(), NodeAuthError> {
        let (Some(cluster), Some(pod)) = (&account.cluster_id, &account.pod) else {
            return Err(NodeAuthError::NoPodProof {
                account: format!("{}/{}", account.namespace, account.name),
            });
        };
        let cache = self
            .caches
            .get(cluster)
            .ok_or_else(|| NodeAuthError::NoClusterAuthorizer {
                cluster: cluster.clone(),
            })?;
        let state = *cache.state.borrow();
        if let Err(e) = state.check(cluster, cache.max_staleness, Instant::now()) {
            if matches!(e, NodeAuthError::Stale { .. }) {
                // The watch task sets it too; a request may see the deadline first.
                cache.stale.set(1);
            }
            return Err(e);
        }
        let index = cache.index.read().unwrap_or_else(|p| p.into_inner());
        index.authorize(
            cluster,
            account,
            pod,
            target_namespace,
            target_service_account,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
    use kube::api::ObjectMeta;

    fn pod(ns: &str, name: &str, sa: &str, node: Option<&str>, phase: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                uid: Some(format!("uid-{name}")),
                ..Default::default()
            },
            spec: Some(PodSpec {
                service_account_name: Some(sa.into()),
                node_name: node.map(Into::into),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                ..Default::default()
            }),
        }
    }

    fn ztunnel() -> (ServiceAccount, BoundPod) {
        (
            ServiceAccount {
                namespace: "istio-system".into(),
                name: "ztunnel".into(),
                pod: None,
                cluster_id: Some("fake".into()),
            },
            BoundPod {
                name: "ztunnel-a".into(),
                uid: "uid-ztunnel-a".into(),
            },
        )
    }

    fn index(pods: &[Pod]) -> PodIndex {
        let mut idx = PodIndex::default();
        for p in pods {
            idx.apply(p);
        }
        idx
    }

    fn check(idx: &PodIndex, pod: &BoundPod) -> Result<(), NodeAuthError> {
        idx.authorize("fake", &ztunnel().0, pod, "ns-a", "sa-a")
    }

    /// Case 19, the node-authorizer table.
    #[test]
    fn the_node_authorizer_checks_the_caller_pod_and_the_target_node() {
        let caller = pod(
            "istio-system",
            "ztunnel-a",
            "ztunnel",
            Some("zt-node"),
            "Running",
        );
        let (_, bound) = ztunnel();
        let err = |idx: &PodIndex, b: &BoundPod| check(idx, b).unwrap_err().to_string();

        assert_eq!(
            err(&index(&[]), &bound),
            "pod istio-system/ztunnel-a not found in cluster \"fake\""
        );
        let wrong_uid = BoundPod {
            uid: "other".into(),
            ..bound.clone()
        };
        assert!(
            err(&index(std::slice::from_ref(&caller)), &wrong_uid)
                .contains("found in cluster \"fake\", but UID does not match"),
        );
        let other_sa = pod(
            "istio-system",
            "ztunnel-a",
            "default",
            Some("zt-node"),
            "Running",
        );
        assert!(err(&index(&[other_sa]), &bound).contains("but ServiceAccount does not match"));
        let unscheduled = pod("istio-system", "ztunnel-a", "ztunnel", None, "Pending");
        assert!(err(&index(&[unscheduled]), &bound).contains("is not scheduled on a node"));

        let elsewhere = pod("ns-a", "sa-a-pod", "sa-a", Some("other-node"), "Running");
        assert_eq!(
            err(&index(&[caller.clone(), elsewhere.clone()]), &bound),
            "no instances of \"ns-a/sa-a\" found on node \"zt-node\" in cluster \"fake\""
        );
        let here = pod("ns-a", "sa-a-pod-2", "sa-a", Some("zt-node"), "Running");
        assert_eq!(
            check(&index(&[caller.clone(), elsewhere, here]), &bound),
            Ok(())
        );
    }

    #[test]
    fn failed_pods_and_deleted_pods_are_not_instances() {
        let caller = pod(
            "istio-system",
            "ztunnel-a",
            "ztunnel",
            Some("zt-node"),
            "Running",
        );
        let (_, bound) = ztunnel();
        let failed = pod("ns-a", "p", "sa-a", Some("zt-node"), "Failed");
        assert!(check(&index(&[caller.clone(), failed]), &bound).is_err());
        let mut idx = index(std::slice::from_ref(&caller));
        let running = pod("ns-a", "p", "sa-a", Some("zt-node"), "Running");
        idx.apply(&running);
        assert_eq!(check(&idx, &bound), Ok(()));
        // An update moving the pod to Failed, then back, then a delete.
        idx.apply(&pod("ns-a", "p", "sa-a", Some("zt-node"), "Failed"));
        assert!(check(&idx, &bound).is_err());
        idx.apply(&running);
        assert_eq!(check(&idx, &bound), Ok(()));
        idx.delete(&running);
        assert!(check(&idx, &bound).is_err());
        assert_eq!(idx.len(), 1);
        assert_eq!(idx.by_node.len(), 1, "empty node entries are dropped");
    }

    #[test]
    fn two_instances_on_a_node_count_separately() {
        let caller = pod(
            "istio-system",
            "ztunnel-a",
            "ztunnel",
            Some("zt-node"),
            "Running",
        );
        let (_, bound) = ztunnel();
        let a = pod("ns-a", "a", "sa-a", Some("zt-node"), "Running");
        let b = pod("ns-a", "b", "sa-a", Some("zt-node"), "Running");
        let mut idx = index(&[caller, a.clone(), b]);
        idx.delete(&a);
        assert_eq!(check(&idx, &bound), Ok(()));
    }

    #[test]
    fn a_failing_watch_keeps_answering_only_within_the_staleness_window() {
        let t0 = Instant::now();
        let max = Duration::from_secs(30);
        let at = |secs| t0 + Duration::from_secs(secs);
        assert_eq!(
            CacheState::Listing.check("c", max, t0).unwrap_err(),
            NodeAuthError::NotSynced {
                cluster: "c".into()
            }
        );
        // A failing first list stays "not synced": there are no pods to trust.
        assert_eq!(CacheState::Listing.failed(t0), CacheState::Listing);
        assert_eq!(CacheState::Synced.check("c", max, at(3600)), Ok(()));

        let failing = CacheState::Synced.failed(t0);
        assert_eq!(failing, CacheState::Failing { since: t0 });
        // Further errors do not move the start of the failure.
        assert_eq!(failing.failed(at(20)), failing);
        assert_eq!(failing.check("c", max, at(30)), Ok(()));
        let e = failing.check("c", max, at(31)).unwrap_err();
        assert!(e.is_transient());
        assert_eq!(
            e.to_string(),
            "the pod cache of cluster \"c\" is stale: its watch has been failing for 31 s, longer than --node-authz-max-staleness (30s); retry later"
        );
    }
}
