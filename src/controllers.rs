//! In-cluster controllers that let plugca replace istiod's CA (issue 10):
//! - [`root_configmap`]: ConfigMap `istio-ca-root-cert` in every selected namespace;
//! - [`istiod_tls`]: istiod's serving certificate, Secret `istiod-tls`;
//! - [`leader`]: Lease-based leader election, so exactly one replica writes.
//!
//! Signing is active-active and never waits for any of this: the controllers
//! only read the CA currently serving ([`CurrentCa`]) and a reload counter.
//! Without Kubernetes API access, or with both features off, nothing is
//! started and [`announce`] logs that once.

pub mod args;
pub mod istiod_tls;
pub mod leader;
pub mod metrics;
pub mod root_configmap;
pub mod selector;
pub mod shared_root;

use std::sync::Arc;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::ca::CaBundle;

pub use istiod_tls::IstiodTlsConfig;
pub use leader::{LeaderConfig, Leadership};
pub use metrics::ControllerMetrics;
pub use root_configmap::RootConfigMapConfig;

/// Field manager of our server-side applies (shown in `managedFields`).
pub const FIELD_MANAGER: &str = "plugca";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "plugca";
/// Where istiod, the Lease and the shared root live when `POD_NAMESPACE` is unset.
pub const DEFAULT_NAMESPACE: &str = "istio-system";
pub const DEFAULT_LEASE_NAME: &str = "plugca-leader";

/// What to run; built by the config from the `--root-configmap*`,
/// `--istiod-*` and `--leader-election-*` flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllersConfig {
    pub root_configmap: Option<RootConfigMapConfig>,
    pub istiod_tls: Option<IstiodTlsConfig>,
    pub leader: LeaderConfig,
    /// How many replicas the deployment runs (`--replicas`, from the chart).
    pub replicas: u32,
}

impl ControllersConfig {
    pub fn any_enabled(&self) -> bool {
        self.root_configmap.is_some() || self.istiod_tls.is_some()
    }
}

/// The CA the controllers read: whatever bundle serves now.
pub trait CurrentCa: Send + Sync + 'static {
    fn current(&self) -> Option<Arc<CaBundle>>;
}

impl CurrentCa for crate::ca::Current {
    fn current(&self) -> Option<Arc<CaBundle>> {
        crate::ca::Current::current(self)
    }
}

/// The root bundle workloads trust: exactly the last element plugca returns
/// in every CreateCertificate response (plugged roots plus `--extra-trust-roots`).
pub fn trust_bundle(bundle: &CaBundle) -> String {
    bundle.response_tail().last().cloned().unwrap_or_default()
}

/// The running controllers.
pub struct Running {
    pub leadership: Leadership,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Waits until every controller has stopped (after `shutdown` flipped).
    pub async fn join(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Logs once what the controllers will do, or why they do nothing.
/// Returns the client to start them with, if they are to run.
pub fn announce(config: &ControllersConfig, client: Option<kube::Client>) -> Option<kube::Client> {
    match (config.any_enabled(), client) {
        (false, _) => {
            info!(
                "in-cluster controllers off (--root-configmap, --istiod-tls-secret): plugca writes no ConfigMap or Secret"
            );
            None
        }
        (true, None) => {
            warn!(
                root_configmap = config.root_configmap.is_some(),
                istiod_tls = config.istiod_tls.is_some(),
                "no Kubernetes API access (--kubeconfig, or running in a pod; --no-kubernetes is set or neither is there): nothing is written; use `plugca certs istiod` for istiod's certificate"
            );
            None
        }
        (true, Some(client)) => {
            info!(
                root_configmap = config.root_configmap.is_some(),
                istiod_tls = config.istiod_tls.is_some(),
                lease = %config.leader.lease_name,
                lease_namespace = %config.leader.namespace,
                identity = %config.leader.identity,
                "in-cluster controllers on; the Lease holder writes"
            );
            Some(client)
        }
    }
}

/// Why the server refuses to start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    #[error(
        "--replicas {replicas} (env PLUGCA_REPLICAS) with no plugged-in CA bundle: each replica would generate its own self-signed root and workloads would not trust each other; plug the same cacerts bundle into every replica (Secret cacerts), keep the self-signed root in a Secret all replicas share (--self-signed-secret <namespace>/<name>), or run one replica"
    )]
    UnsharedSelfSignedRoot { replicas: u32 },
}

/// Item 3 of issue 10: with more than one replica, a self-signed root made
/// by each replica would split the mesh. plugca cannot count the replicas
/// itself; the chart passes `--replicas` (its `replicaCount`). A root kept
/// in a shared Secret (`--self-signed-secret`, [`shared_root`]) is the same
/// on every replica.
pub fn check_shared_root(
    config: &ControllersConfig,
    bundle: Option<&CaBundle>,
    kept_in_secret: bool,
) -> Result<(), StartError> {
    let self_signed = bundle.is_none_or(|b| b.layout() == crate::ca::Layout::SelfSigned);
    if config.replicas > 1 && self_signed && !kept_in_secret {
        return Err(StartError::UnsharedSelfSignedRoot {
            replicas: config.replicas,
        });
    }
    Ok(())
}

/// Starts leader election and the enabled controllers. They stop when
/// `shutdown` flips; losing the Lease pauses the writers only.
pub fn spawn(
    client: kube::Client,
    config: ControllersConfig,
    ca: Arc<dyn CurrentCa>,
    reloads: watch::Receiver<u64>,
    metrics: Arc<ControllerMetrics>,
    shutdown: watch::Receiver<bool>,
) -> Running {
    let (leadership, elector) = leader::spawn(
        client.clone(),
        config.leader.clone(),
        metrics.clone(),
        shutdown.clone(),
    );
    let mut tasks = vec![elector];
    if let Some(rc) = config.root_configmap {
        tasks.push(tokio::spawn(root_configmap::run(
            client.clone(),
            rc,
            ca.clone(),
            reloads.clone(),
            leadership.clone(),
            metrics.clone(),
            shutdown.clone(),
        )));
    }
    if let Some(it) = config.istiod_tls {
        tasks.push(tokio::spawn(istiod_tls::run(
            client,
            it,
            ca,
            reloads,
            leadership.clone(),
            metrics,
            shutdown,
        )));
    }
    Running { leadership, tasks }
}

/// `rx.changed()`, pending forever once the sender is gone (instead of
/// returning at once and spinning a `select!` loop).
pub(crate) async fn changed_or_pending<T>(rx: &mut watch::Receiver<T>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Completes once `shutdown` is true (or its sender is gone), holding no
/// borrow of the channel across the caller's awaits.
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::selfsigned::{self, SelfSignedSpec};

    fn config(replicas: u32) -> ControllersConfig {
        ControllersConfig {
            root_configmap: None,
            istiod_tls: None,
            leader: LeaderConfig {
                namespace: DEFAULT_NAMESPACE.into(),
                lease_name: DEFAULT_LEASE_NAME.into(),
                identity: "me".into(),
            },
            replicas,
        }
    }

    #[test]
    fn several_replicas_refuse_a_self_signed_root_and_say_why() {
        let now = time::OffsetDateTime::now_utc();
        let spec = SelfSignedSpec {
            dir: None,
            key: crate::ca::generate::KeyChoice::P256,
            ttl: std::time::Duration::from_secs(86_400),
            organization: "cluster.local".into(),
        };
        let self_signed = selfsigned::load_or_create(&spec, now).unwrap().0;
        let plugged = CaBundle::load_dir(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("certs"),
            now,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            check_shared_root(&config(1), Some(&self_signed), false),
            Ok(())
        );
        assert_eq!(check_shared_root(&config(2), Some(&plugged), false), Ok(()));
        assert_eq!(
            check_shared_root(&config(2), Some(&self_signed), true),
            Ok(()),
            "a root kept in a shared Secret is the same on every replica"
        );
        let err = check_shared_root(&config(2), Some(&self_signed), false).unwrap_err();
        assert_eq!(err, StartError::UnsharedSelfSignedRoot { replicas: 2 });
        for option in ["plug the same cacerts bundle", "--self-signed-secret"] {
            assert!(err.to_string().contains(option), "{err}");
        }
    }

    #[test]
    fn the_trust_bundle_is_the_last_response_element() {
        let now = time::OffsetDateTime::now_utc();
        let plugged = CaBundle::load_dir(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("certs"),
            now,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            &trust_bundle(&plugged),
            plugged.response_tail().last().unwrap()
        );
        assert!(trust_bundle(&plugged).contains("BEGIN CERTIFICATE"));
    }
}
