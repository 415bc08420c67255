//! Kubernetes node authorization (istiod's `ClusterNodeAuthorizer`): a
//! trusted node agent (ztunnel) may impersonate a service account only when
//! its own pod exists with the UID and service account its bound token names,
//! and at least one running pod of the target service account is scheduled on
//! the same node.
//!
//! Pods come from one watch per cluster (kube-runtime's `watcher`: list, then
//! watch, re-listing with backoff after errors), kept as a small index with
//! only the facts needed and a per-node count of service accounts, so a
//! request is two hash lookups and never an API call. kube-runtime's
//! `reflector` store is not used because it keeps whole Pod objects and can
//! only look pods up by name, which would mean scanning every pod per request.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
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
    /// The cache cannot decide yet: UNAVAILABLE (clients retry).
    pub fn is_transient(&self) -> bool {
        matches!(self, NodeAuthError::NotSynced { .. })
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

/// The watch-backed pod index of one cluster; the watch stops when dropped.
struct PodCache {
    index: Arc<RwLock<PodIndex>>,
    synced: tokio::sync::watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PodCache {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PodCache {
    fn start(cluster: String, client: kube::Client) -> PodCache {
        let index = Arc::new(RwLock::new(PodIndex::default()));
        let (synced_tx, synced) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(watch_pods(cluster, client, index.clone(), synced_tx));
        PodCache {
            index,
            synced,
            task,
        }
    }
}

async fn watch_pods(
    cluster: String,
    client: kube::Client,
    index: Arc<RwLock<PodIndex>>,
    synced: tokio::sync::watch::Sender<bool>,
) {
    let api: Api<Pod> = Api::all(client);
    // `any_semantic`: (re)lists are served from the API server's watch cache.
    let stream = watcher::watcher(api, watcher::Config::default().any_semantic()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut relist: Option<PodIndex> = None;
    let write = || index.write().unwrap_or_else(|p| p.into_inner());
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => relist = Some(PodIndex::default()),
            Ok(Event::InitApply(pod)) => {
                if let Some(buf) = relist.as_mut() {
                    buf.apply(&pod);
                }
            }
            Ok(Event::InitDone) => {
                // A (re)list replaces the index at once, dropping pods deleted meanwhile.
                if let Some(buf) = relist.take() {
                    *write() = buf;
                }
                if !*synced.borrow() {
                    let pods = write().len();
                    info!(cluster = %cluster, pods, "pod cache synced; node authorization ready");
                }
                synced.send_replace(true);
            }
            Ok(Event::Apply(pod)) => write().apply(&pod),
            Ok(Event::Delete(pod)) => write().delete(&pod),
            Err(e) => warn!(
                cluster = %cluster,
                error = %e,
                "pod watch failed; retrying with backoff (node authorization keeps the last known pods)"
            ),
        }
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
    /// Starts one pod watch per cluster (needs a tokio runtime).
    pub fn start(clusters: &Clusters) -> NodeAuthorizer {
        NodeAuthorizer {
            caches: clusters
                .all()
                .map(|(id, client)| {
                    (
                        id.to_string(),
                        PodCache::start(id.to_string(), client.clone()),
                    )
                })
                .collect(),
        }
    }

    /// Waits until every cache has completed its first list, or `limit`.
    /// Returns the clusters still not synced.
    pub async fn wait_synced(&self, limit: Duration) -> Vec<String> {
        let waits = self.caches.iter().map(|(id, cache)| {
            let mut rx = cache.synced.clone();
            async move {
                let ok = tokio::time::timeout(limit, rx.wait_for(|s| *s))
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
        if !*cache.synced.borrow() {
            return Err(NodeAuthError::NotSynced {
                cluster: cluster.clone(),
            });
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
}
