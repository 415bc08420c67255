//! Root distribution, as istiod's namespace controller does with its own CA:
//! ConfigMap `istio-ca-root-cert` (key `root-cert.pem`) in every selected
//! namespace, holding exactly the root bundle plugca returns as the last
//! element of every CreateCertificate response. Sidecars and ztunnel mount it;
//! without it new pods hang in ContainerCreating.
//!
//! Namespaces and the ConfigMaps of that name are watched (reflector stores);
//! every change, CA reload, leadership change and a periodic resync
//! reconciles: a missing ConfigMap is created, an edited or stale one is
//! restored with server-side apply. Only the leader writes; followers keep
//! their stores warm so a takeover reconciles at once. A namespace that stops
//! being selected keeps its ConfigMap (istiod does not delete them either).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use tokio::sync::{Notify, watch};
use tokio_stream::StreamExt as _;
use tracing::{debug, info, warn};

use crate::controllers::leader::Leadership;
use crate::controllers::metrics::{Controller, ControllerMetrics, ErrorKind, WriteKind};
use crate::controllers::selector::LabelSelector;
use crate::controllers::{
    CurrentCa, FIELD_MANAGER, MANAGED_BY_LABEL, MANAGED_BY_VALUE, changed_or_pending, trust_bundle,
};

/// istiod's name for the ConfigMap (`global.trustBundleName` renames it in the charts).
pub const CONFIGMAP_NAME: &str = "istio-ca-root-cert";
/// The key sidecars and ztunnel read.
pub const ROOT_CERT_KEY: &str = "root-cert.pem";
/// istiod labels its root ConfigMaps with this.
pub const ISTIO_CONFIG_LABEL: &str = "istio.io/config";
/// Full reconcile even without events (a missed watch event heals by then).
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(300);
/// After a failed write, try again this soon.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// Events closer together than this are reconciled once.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// Which namespaces get the ConfigMap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootConfigMapConfig {
    /// `None` selects every namespace.
    pub namespace_selector: Option<LabelSelector>,
    /// Never written into these, whatever their labels.
    pub exclude_namespaces: BTreeSet<String>,
}

impl RootConfigMapConfig {
    /// Whether `ns` should hold the ConfigMap: selected, not excluded, and
    /// not terminating (the API server refuses creates there).
    pub fn wants(&self, ns: &Namespace) -> bool {
        let Some(name) = ns.metadata.name.as_deref() else {
            return false;
        };
        if self.exclude_namespaces.contains(name) {
            return false;
        }
        let terminating = ns.metadata.deletion_timestamp.is_some()
            || ns
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|p| p == "Terminating");
        if terminating {
            return false;
        }
        match &self.namespace_selector {
            None => true,
            Some(sel) => sel.matches(ns.metadata.labels.as_ref().unwrap_or(&BTreeMap::new())),
        }
    }
}

/// The ConfigMap as we want it in `namespace`.
pub fn desired(namespace: &str, roots_pem: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(CONFIGMAP_NAME.into()),
            namespace: Some(namespace.into()),
            labels: Some(labels()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(ROOT_CERT_KEY.into(), roots_pem.into())])),
        ..ConfigMap::default()
    }
}

/// Whether `existing` already carries our key and labels (other keys and
/// labels are someone else's and left alone).
pub fn in_sync(existing: &ConfigMap, roots_pem: &str) -> bool {
    let data_ok = existing
        .data
        .as_ref()
        .and_then(|d| d.get(ROOT_CERT_KEY))
        .is_some_and(|v| v == roots_pem);
    let have = existing.metadata.labels.as_ref();
    let labels_ok = labels()
        .iter()
        .all(|(k, v)| have.and_then(|h| h.get(k)) == Some(v));
    data_ok && labels_ok
}

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (ISTIO_CONFIG_LABEL.into(), "true".into()),
        (MANAGED_BY_LABEL.into(), MANAGED_BY_VALUE.into()),
    ])
}

/// Runs the distributor until `shutdown` flips.
pub async fn run(
    client: kube::Client,
    config: RootConfigMapConfig,
    ca: Arc<dyn CurrentCa>,
    mut reloads: watch::Receiver<u64>,
    mut leadership: Leadership,
    metrics: Arc<ControllerMetrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let events = Arc::new(Notify::new());
    let namespaces = watch_into_store(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
        events.clone(),
        metrics.clone(),
        "namespaces",
    );
    let configmaps = watch_into_store(
        Api::<ConfigMap>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={CONFIGMAP_NAME}")),
        events.clone(),
        metrics.clone(),
        "configmaps",
    );
    info!(
        selector = config.namespace_selector.as_ref().map_or("(every namespace)", |s| s.as_str()),
        excluded = ?config.exclude_namespaces,
        "root ConfigMap distribution: {CONFIGMAP_NAME} key {ROOT_CERT_KEY}"
    );
    tokio::select! {
        r = async { tokio::try_join!(namespaces.store.wait_until_ready(), configmaps.store.wait_until_ready()) } => {
            if r.is_err() { return; }
        }
        _ = crate::controllers::stopped(&mut shutdown) => return,
    }
    let mut next = Duration::ZERO;
    loop {
        tokio::select! {
            _ = events.notified() => tokio::time::sleep(DEBOUNCE).await,
            _ = changed_or_pending(&mut reloads) => {}
            _ = leadership.changed() => {}
            _ = tokio::time::sleep(next) => {}
            _ = crate::controllers::stopped(&mut shutdown) => break,
        }
        next = RESYNC_INTERVAL;
        if !leadership.is_leader() {
            continue;
        }
        let Some(bundle) = ca.current() else {
            continue;
        };
        let roots = trust_bundle(&bundle);
        let outcome = reconcile_all(
            &config,
            &namespaces.store,
            &configmaps.store,
            &roots,
            &leadership,
            |ns: String, cm: ConfigMap| {
                let api = Api::<ConfigMap>::namespaced(client.clone(), &ns);
                async move {
                    api.patch(
                        CONFIGMAP_NAME,
                        &PatchParams::apply(FIELD_MANAGER).force(),
                        &Patch::Apply(&cm),
                    )
                    .await
                    .map(|_| ())
                }
            },
        )
        .await;
        for (ns, kind) in &outcome.written {
            metrics.wrote(Controller::root_configmap, *kind);
            debug!(namespace = %ns, kind = ?kind, "{CONFIGMAP_NAME} written");
        }
        if !outcome.written.is_empty() {
            info!(
                written = outcome.written.len(),
                "{CONFIGMAP_NAME} written where missing or out of date"
            );
        }
        for (ns, error) in &outcome.failed {
            metrics.failed(Controller::root_configmap, ErrorKind::write);
            warn!(namespace = %ns, error = %error, "cannot write {CONFIGMAP_NAME}; retrying");
        }
        if !outcome.failed.is_empty() {
            next = RETRY_INTERVAL;
        }
    }
    namespaces.task.abort();
    configmaps.task.abort();
}

/// What one pass wrote and what failed.
#[derive(Debug, Default)]
pub struct Outcome {
    pub written: Vec<(String, WriteKind)>,
    pub failed: Vec<(String, String)>,
}

/// One pass over every namespace in the store: writes (with `write`) the
/// ConfigMap where it is missing or differs. Stops early if leadership ends.
pub async fn reconcile_all<F, Fut>(
    config: &RootConfigMapConfig,
    namespaces: &Store<Namespace>,
    configmaps: &Store<ConfigMap>,
    roots: &str,
    leadership: &Leadership,
    write: F,
) -> Outcome
where
    F: Fn(String, ConfigMap) -> Fut,
    Fut: std::future::Future<Output = Result<(), kube::Error>>,
{
    let mut outcome = Outcome::default();
    let mut names: Vec<String> = namespaces
        .state()
        .iter()
        .filter(|ns| config.wants(ns))
        .filter_map(|ns| ns.metadata.name.clone())
        .collect();
    names.sort();
    for ns in names {
        let existing = configmaps.get(&ObjectRef::new(CONFIGMAP_NAME).within(&ns));
        let kind = match existing.as_deref() {
            Some(cm) if in_sync(cm, roots) => continue,
            Some(_) => WriteKind::update,
            None => WriteKind::create,
        };
        if !leadership.is_leader() {
            break;
        }
        match write(ns.clone(), desired(&ns, roots)).await {
            Ok(()) => outcome.written.push((ns, kind)),
            Err(e) => outcome.failed.push((ns, e.to_string())),
        }
    }
    outcome
}

/// A reflector store fed by a watch in its own task; `events` fires on each change.
pub(crate) struct Watched<K: kube::Resource + 'static>
where
    K::DynamicType: std::hash::Hash + Eq,
{
    pub store: Store<K>,
    pub task: tokio::task::JoinHandle<()>,
}

pub(crate) fn watch_into_store<K>(
    api: Api<K>,
    config: watcher::Config,
    events: Arc<Notify>,
    metrics: Arc<ControllerMetrics>,
    what: &'static str,
) -> Watched<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + std::hash::Hash + Eq + Clone + Send + Sync,
{
    let (store, writer) = reflector::store();
    let task = tokio::spawn(async move {
        let stream = reflector::reflector(writer, watcher::watcher(api, config)).default_backoff();
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => events.notify_one(),
                Err(e) => {
                    metrics.failed(controller_of(what), ErrorKind::watch);
                    warn!(watch = what, error = %e, "watch failed; retrying with backoff");
                }
            }
        }
    });
    Watched { store, task }
}

fn controller_of(what: &str) -> Controller {
    if what == "istiod-tls" {
        Controller::istiod_tls
    } else {
        Controller::root_configmap
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NamespaceStatus;
    use kube::runtime::watcher::Event;

    const ROOTS: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn ns(name: &str, labels: &[(&str, &str)]) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        }
    }

    fn config(selector: Option<&str>, exclude: &[&str]) -> RootConfigMapConfig {
        RootConfigMapConfig {
            namespace_selector: selector.map(|s| LabelSelector::parse(s).unwrap()),
            exclude_namespaces: exclude.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn every_namespace_is_wanted_by_default_even_kube_system() {
        let c = config(None, &[]);
        assert!(c.wants(&ns("default", &[])));
        assert!(c.wants(&ns("kube-system", &[])));
    }

    #[test]
    fn the_selector_picks_and_the_exclusions_win() {
        let c = config(Some("istio-injection=enabled"), &["legacy"]);
        assert!(c.wants(&ns("shop", &[("istio-injection", "enabled")])));
        assert!(!c.wants(&ns("batch", &[])));
        assert!(!c.wants(&ns("legacy", &[("istio-injection", "enabled")])));
        let c = config(None, &["legacy"]);
        assert!(!c.wants(&ns("legacy", &[])));
        assert!(c.wants(&ns("shop", &[])));
    }

    #[test]
    fn terminating_and_nameless_namespaces_are_skipped() {
        let c = config(None, &[]);
        let mut gone = ns("gone", &[]);
        gone.status = Some(NamespaceStatus {
            phase: Some("Terminating".into()),
            ..NamespaceStatus::default()
        });
        assert!(!c.wants(&gone));
        let mut deleting = ns("deleting", &[]);
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert!(!c.wants(&deleting));
        assert!(!c.wants(&Namespace::default()));
    }

    #[test]
    fn the_configmap_holds_the_roots_under_istios_key_and_labels() {
        let cm = desired("shop", ROOTS);
        assert_eq!(cm.metadata.name.as_deref(), Some("istio-ca-root-cert"));
        assert_eq!(cm.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(cm.data.as_ref().unwrap()["root-cert.pem"], ROOTS);
        let labels = cm.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["istio.io/config"], "true");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "plugca");
        let json = serde_json::to_value(&cm).unwrap();
        assert_eq!(json["apiVersion"], "v1");
        assert_eq!(json["kind"], "ConfigMap");
        assert!(in_sync(&cm, ROOTS));
    }

    #[test]
    fn edits_to_our_key_or_labels_are_drift_but_other_keys_are_not() {
        let mut cm = desired("shop", ROOTS);
        cm.data
            .as_mut()
            .unwrap()
            .insert("extra".into(), "theirs".into());
        cm.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("team".into(), "a".into());
        assert!(in_sync(&cm, ROOTS));
        assert!(!in_sync(&cm, "other roots"));
        let mut edited = desired("shop", ROOTS);
        edited
            .data
            .as_mut()
            .unwrap()
            .insert(ROOT_CERT_KEY.into(), "tampered".into());
        assert!(!in_sync(&edited, ROOTS));
        let mut unlabelled = desired("shop", ROOTS);
        unlabelled.metadata.labels = None;
        assert!(!in_sync(&unlabelled, ROOTS));
        let mut empty = desired("shop", ROOTS);
        empty.data = None;
        assert!(!in_sync(&empty, ROOTS));
    }

    fn store<K>(objects: Vec<K>) -> Store<K>
    where
        K: kube::Resource + Clone + 'static,
        K::DynamicType: Default + std::hash::Hash + Eq + Clone,
    {
        let (reader, mut writer) = reflector::store();
        writer.apply_watcher_event(&Event::Init);
        for o in objects {
            writer.apply_watcher_event(&Event::InitApply(o));
        }
        writer.apply_watcher_event(&Event::InitDone);
        reader
    }

    fn cm_in(namespace: &str, roots: &str) -> ConfigMap {
        desired(namespace, roots)
    }

    #[tokio::test]
    async fn a_pass_creates_missing_restores_edited_and_skips_current_and_excluded() {
        let namespaces = store(vec![
            ns("a-missing", &[]),
            ns("b-current", &[]),
            ns("c-stale", &[]),
            ns("d-excluded", &[]),
        ]);
        let configmaps = store(vec![
            cm_in("b-current", ROOTS),
            cm_in("c-stale", "old roots"),
        ]);
        let (leader, _tx) = Leadership::fixed(true);
        let writes = std::sync::Mutex::new(Vec::new());
        let outcome = reconcile_all(
            &config(None, &["d-excluded"]),
            &namespaces,
            &configmaps,
            ROOTS,
            &leader,
            |ns, cm| {
                writes.lock().unwrap().push((ns, cm));
                async { Ok(()) }
            },
        )
        .await;
        assert_eq!(
            outcome.written,
            [
                ("a-missing".to_string(), WriteKind::create),
                ("c-stale".to_string(), WriteKind::update)
            ]
        );
        let writes = writes.into_inner().unwrap();
        assert_eq!(writes.len(), 2);
        assert!(
            writes.iter().all(|(ns, cm)| in_sync(cm, ROOTS)
                && cm.metadata.namespace.as_deref() == Some(ns.as_str()))
        );
    }

    #[tokio::test]
    async fn a_follower_writes_nothing() {
        let namespaces = store(vec![ns("a", &[]), ns("b", &[])]);
        let configmaps = store::<ConfigMap>(Vec::new());
        let (follower, _tx) = Leadership::fixed(false);
        let outcome = reconcile_all(
            &config(None, &[]),
            &namespaces,
            &configmaps,
            ROOTS,
            &follower,
            |_, _| async { panic!("a follower must not write") },
        )
        .await;
        assert!(outcome.written.is_empty() && outcome.failed.is_empty());
    }

    #[tokio::test]
    async fn failed_writes_are_reported_per_namespace_and_the_rest_continue() {
        let namespaces = store(vec![ns("a", &[]), ns("b", &[])]);
        let configmaps = store::<ConfigMap>(Vec::new());
        let (leader, _tx) = Leadership::fixed(true);
        let outcome = reconcile_all(
            &config(None, &[]),
            &namespaces,
            &configmaps,
            ROOTS,
            &leader,
            |ns, _| async move {
                if ns == "a" {
                    Err(kube::Error::Service("connection refused".into()))
                } else {
                    Ok(())
                }
            },
        )
        .await;
        assert_eq!(outcome.written, [("b".to_string(), WriteKind::create)]);
        assert_eq!(outcome.failed.len(), 1);
        assert_eq!(outcome.failed[0].0, "a");
    }
}
