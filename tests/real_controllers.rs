//! The deployment's RBAC and the in-cluster controllers against a real
//! kube-apiserver (issue 9 item 3, last bullet; issue 10 item 7): plugca runs
//! as ServiceAccount istio-system/plugca with exactly the RBAC the project
//! ships (`deploy/rbac`, `deploy/kubernetes`), authenticated by a token from
//! the TokenRequest API in a kubeconfig of its own, never as admin.
//!
//! - the `kubectl auth can-i` matrix of `deploy/rbac/plugca-rbac.yaml`, and a
//!   real issuance with that ServiceAccount's kubeconfig;
//! - the root ConfigMap distributor and the `istiod-tls` writer with the
//!   kustomize base's RBAC (the whole render is accepted by a server-side
//!   dry-run first);
//! - two plugca processes on one Lease: one writes, a killed leader hands over;
//! - two replicas on one `--self-signed-secret`: one root, created once;
//! - the chart with every feature on, applied for real and run with its
//!   ServiceAccount and the flags of the applied Deployment.
//!
//! The controller tests share istio-system, its Lease and `istiod-tls`, and
//! write into every namespace: they take [`SERIAL`] so they never overlap.
//! Needs `interop/tools.sh etcd kube-apiserver kubectl`; skips without them
//! (fails with CI=true).

mod common;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use plugca::ca::generate::{GeneratedCa, KeyChoice};
use plugca::client::{CsrShape, RequestOptions};
use support::kube_lab::{self, Cluster, KillOnDrop, KubeLab, eventually, unique};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const LOCAL_ID: &str = "lab-local";
const NS: &str = "istio-system";
const CONFIGMAP: &str = "istio-ca-root-cert";
/// How long a controller may take to see a change and write.
const CONTROLLER_DELAY: Duration = Duration::from_secs(20);
/// The Lease lives 15 s; a killed leader's Lease must expire and be taken.
const HANDOVER: Duration = Duration::from_secs(30);

/// The controller tests write into every namespace and share the Lease
/// (an async mutex: each test holds it across awaits, and a failed test
/// must not poison it for the next).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Server-side applies `yaml` as admin.
fn apply(lab: &KubeLab, yaml: &str) -> String {
    lab.kubectl_ok(
        Cluster::Local,
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=plugca-tests",
            "-f",
            "-",
        ],
        Some(yaml),
    )
}

/// A kubeconfig for `namespace/service_account` with a token from the
/// TokenRequest API (default audience: the apiserver's own), as a pod's
/// projected token would be.
fn service_account_kubeconfig(
    lab: &KubeLab,
    namespace: &str,
    service_account: &str,
    dir: &Path,
) -> PathBuf {
    let token = lab
        .kubectl_ok(
            Cluster::Local,
            &[
                "-n",
                namespace,
                "create",
                "token",
                service_account,
                "--duration",
                "1h",
            ],
            None,
        )
        .trim()
        .to_string();
    let admin = std::fs::read_to_string(lab.kubeconfig(Cluster::Local)).unwrap();
    let field = |key: &str| -> String {
        admin
            .lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .unwrap_or_else(|| panic!("{key} not in the lab's kubeconfig"))
            .trim()
            .to_string()
    };
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\n\
         clusters:\n- name: lab\n  cluster:\n    server: {}\n    certificate-authority-data: {}\n\
         users:\n- name: {service_account}\n  user:\n    token: {token}\n\
         contexts:\n- name: lab\n  context:\n    cluster: lab\n    user: {service_account}\n\
         current-context: lab\n",
        field("server:"),
        field("certificate-authority-data:"),
    );
    let path = dir.join(format!("{service_account}.kubeconfig"));
    std::fs::write(&path, kubeconfig).unwrap();
    path
}

/// kubectl with another kubeconfig than the admin's; (success, stdout + stderr).
fn kubectl_as(lab: &KubeLab, kubeconfig: &Path, args: &[&str]) -> (bool, String) {
    let child = Command::new(lab.bin.join("kubectl"))
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg("--request-timeout=30s")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = kube_lab::wait_bounded(child, Duration::from_secs(40));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The ServiceAccount's own view: `kubectl auth can-i` with its token.
fn can_i(lab: &KubeLab, kubeconfig: &Path, args: &[&str]) -> bool {
    let mut all = vec!["auth", "can-i"];
    all.extend(args);
    let (ok, text) = kubectl_as(lab, kubeconfig, &all);
    // The answer is the first line; kubectl may add warnings after it (e.g.
    // "resource 'tokenreviews' is not namespace scoped").
    match (ok, text.lines().next().unwrap_or("").trim()) {
        (true, "yes") => true,
        (false, t) if t.starts_with("no") => false,
        other => panic!("kubectl auth can-i {args:?}: {other:?}"),
    }
}

fn with_token(token: &str) -> RequestOptions {
    RequestOptions {
        bearer_token: Some(token.to_string()),
        ttl_secs: 3600,
        ..Default::default()
    }
}

/// A workload ServiceAccount in a fresh namespace and its istio-ca token.
fn workload_token(lab: &KubeLab, prefix: &str) -> (String, String) {
    let ns = lab.namespace(Cluster::Local, prefix);
    lab.service_account(Cluster::Local, &ns, "workload");
    let token = lab.token(Cluster::Local, &ns, "workload", "istio-ca", None);
    (ns, token)
}

fn assert_issues_for(chain: &[String], ns: &str) {
    webpki_verify(chain);
    let (ok, text) = openssl_verify(chain, "sslclient");
    assert!(ok, "{text}");
    assert_eq!(
        leaf_facts(&chain[0]).uris,
        [format!("spiffe://cluster.local/ns/{ns}/sa/workload")]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_rbac_allows_exactly_token_review_and_the_pod_watch_and_suffices_to_sign() {
    let Some(lab) = kube_lab::lab() else { return };
    lab.ensure_namespace(Cluster::Local, NS);
    let rbac = std::fs::read_to_string(format!("{REPO}/deploy/rbac/plugca-rbac.yaml")).unwrap();
    apply(lab, &rbac);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = service_account_kubeconfig(lab, NS, "plugca", dir.path());

    let (ok, whoami) = kubectl_as(lab, &kubeconfig, &["auth", "whoami", "-o", "name"]);
    assert!(ok, "{whoami}");
    let (ok, whoami) = kubectl_as(
        lab,
        &kubeconfig,
        &[
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ],
    );
    assert!(ok, "{whoami}");
    assert_eq!(whoami.trim(), "system:serviceaccount:istio-system:plugca");

    // Must.
    for args in [
        &["create", "tokenreviews.authentication.k8s.io"][..],
        &["list", "pods", "--all-namespaces"],
        &["watch", "pods", "--all-namespaces"],
    ] {
        assert!(can_i(lab, &kubeconfig, args), "plugca may not {args:?}");
    }
    // Must not.
    for args in [
        &["get", "secrets", "-n", NS][..],
        &["list", "secrets", "-n", NS],
        &["list", "secrets", "--all-namespaces"],
        &["watch", "secrets", "--all-namespaces"],
        &["get", "secrets", "-n", "default"],
        &["create", "pods", "-n", NS],
        &["create", "pods", "-n", "default"],
        &["delete", "pods", "--all-namespaces"],
        &["create", "serviceaccounts/token", "-n", NS],
        &["create", "tokenrequests.authentication.k8s.io"],
        &["impersonate", "serviceaccounts"],
        &["create", "certificatesigningrequests.certificates.k8s.io"],
    ] {
        assert!(!can_i(lab, &kubeconfig, args), "plugca may {args:?}");
    }
    // And the apiserver really refuses, not only the review.
    let (ok, text) = kubectl_as(lab, &kubeconfig, &["-n", NS, "get", "secrets"]);
    assert!(!ok && text.contains("Forbidden"), "{text}");

    // Signing with that kubeconfig: TokenReview of a workload's token, and
    // node authorization's pod watch (which needs list/watch pods).
    let (ns, token) = workload_token(lab, "rbac");
    let server = Server::start(&server_args(
        Path::new(CERTS),
        &[
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--cluster-id",
            LOCAL_ID,
            "--trusted-node-accounts",
            "istio-system/ztunnel",
        ],
    ))
    .await;
    let mut client = server.client().await;
    let chain = request(
        &mut client,
        csr(&p256(), None, CsrShape::Sidecar),
        &with_token(&token),
    )
    .await
    .unwrap();
    assert_issues_for(&chain, &ns);
    server.stop().await;
}

/// `kubectl kustomize deploy/kubernetes`, split into its objects.
fn kustomize(lab: &KubeLab) -> Vec<String> {
    let out = lab.kubectl_ok(
        Cluster::Local,
        &["kustomize", &format!("{REPO}/deploy/kubernetes")],
        None,
    );
    out.split("\n---\n").map(str::to_string).collect()
}

fn kind_of(object: &str) -> &str {
    object
        .lines()
        .find_map(|l| l.strip_prefix("kind: "))
        .unwrap_or("")
        .trim()
}

/// Applies the whole render with `--dry-run=server`, then its RBAC objects
/// for real (there is no kubelet: the Deployment would never run).
fn apply_kustomize_rbac(lab: &KubeLab) {
    lab.ensure_namespace(Cluster::Local, NS);
    let objects = kustomize(lab);
    let kinds: Vec<&str> = objects.iter().map(|o| kind_of(o)).collect();
    for kind in [
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ClusterRole",
        "Role",
    ] {
        assert!(kinds.contains(&kind), "{kind} not in the render: {kinds:?}");
    }
    let all = objects.join("\n---\n");
    lab.kubectl_ok(
        Cluster::Local,
        &[
            "apply",
            "--server-side",
            "--dry-run=server",
            "--field-manager=plugca-tests",
            "-f",
            "-",
        ],
        Some(&all),
    );
    let rbac: Vec<String> = objects
        .into_iter()
        .filter(|o| {
            matches!(
                kind_of(o),
                "ServiceAccount" | "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding"
            )
        })
        .collect();
    apply(lab, &rbac.join("\n---\n"));
}

/// The chart too, when helm is built: its render passes a server-side dry-run.
fn helm_dry_run(lab: &KubeLab) {
    let helm = lab.bin.join("helm");
    if !helm.is_file() {
        eprintln!(
            "helm not built: the chart's server-side dry-run is skipped (kustomize base done)"
        );
        return;
    }
    let out = Command::new(&helm)
        .args([
            "template",
            "plugca",
            &format!("{REPO}/deploy/charts/plugca"),
        ])
        .args(["--namespace", NS, "--kube-version", "1.34.0"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    lab.kubectl_ok(
        Cluster::Local,
        &[
            "apply",
            "--server-side",
            "--dry-run=server",
            "--field-manager=plugca-tests",
            "-f",
            "-",
        ],
        Some(&String::from_utf8_lossy(&out.stdout)),
    );
}

fn root(cn: &str) -> GeneratedCa {
    long_lived_root(cn)
}

fn intermediate(parent: &GeneratedCa, cn: &str) -> GeneratedCa {
    let now = time::OffsetDateTime::now_utc();
    let mut spec = ca_spec(
        cn,
        now - time::Duration::minutes(5),
        now + time::Duration::days(300),
    );
    spec.path_len = Some(0);
    gen_intermediate(&spec, KeyChoice::P256, parent)
}

/// Writes an istiod-layout bundle (temporary names, then renames).
fn write_bundle(dir: &Path, ca: &GeneratedCa, roots: &[&GeneratedCa]) {
    let root_text: String = roots.iter().map(|r| r.cert_pem.clone()).collect();
    for (name, text) in [
        ("ca-key.pem", key_pem(ca)),
        ("ca-cert.pem", ca.cert_pem.clone()),
        ("cert-chain.pem", ca.cert_pem.clone()),
        ("root-cert.pem", root_text),
    ] {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
}

/// Every Active namespace, by name.
fn namespaces(lab: &KubeLab) -> Vec<String> {
    lab.kubectl_ok(
        Cluster::Local,
        &[
            "get",
            "namespaces",
            "--field-selector=status.phase=Active",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ],
        None,
    )
    .split_whitespace()
    .map(str::to_string)
    .collect()
}

/// Waits until every namespace's ConfigMap holds exactly `roots`.
fn wait_everywhere(lab: &KubeLab, roots: &str, what: &str) {
    eventually(CONTROLLER_DELAY, what, || {
        namespaces(lab)
            .iter()
            .all(|ns| lab.root_configmap(ns).as_deref() == Some(roots))
            .then_some(())
    });
}

/// The istiod-tls Secret's files, written into `dir`: (type, serial).
fn istiod_tls(lab: &KubeLab, dir: &Path) -> Option<(String, String)> {
    istiod_tls_in(lab, NS, dir)
}

fn istiod_tls_in(lab: &KubeLab, namespace: &str, dir: &Path) -> Option<(String, String)> {
    let out = lab
        .kubectl(
            Cluster::Local,
            &["-n", namespace, "get", "secret", "istiod-tls", "-o", "json"],
            None,
        )
        .ok()?;
    let secret: serde_json::Value = serde_json::from_str(&out).unwrap();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    for key in ["tls.crt", "tls.key", "ca.crt"] {
        let value = secret["data"][key].as_str()?;
        std::fs::write(dir.join(key), b64.decode(value).unwrap()).unwrap();
    }
    let serial = openssl_in(dir, &["x509", "-in", "tls.crt", "-noout", "-serial"]);
    Some((
        secret["type"].as_str().unwrap_or("").to_string(),
        serial.trim().to_string(),
    ))
}

/// The openssl checks of istiod's Secret: names, chain to `root`, key match.
fn check_istiod_tls(dir: &Path, root: &GeneratedCa, roots: &str) {
    check_istiod_tls_names(
        dir,
        &root.cert_pem,
        roots,
        &[
            "DNS:istiod.istio-system.svc",
            "URI:spiffe://cluster.local/ns/istio-system/sa/istiod",
        ],
    );
}

fn check_istiod_tls_names(dir: &Path, root_pem: &str, roots: &str, names: &[&str]) {
    let text = openssl_in(dir, &["x509", "-in", "tls.crt", "-noout", "-text"]);
    for name in names {
        assert!(
            text.contains(name),
            "{name} not in istiod's certificate:\n{text}"
        );
    }
    std::fs::write(dir.join("root.pem"), root_pem).unwrap();
    // tls.crt = leaf + intermediates; verify the leaf through them to the root.
    let verify = Command::new("openssl")
        .current_dir(dir)
        .args([
            "verify",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "tls.crt",
            "-purpose",
            "sslserver",
            "tls.crt",
        ])
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let cert_key = openssl_in(dir, &["x509", "-in", "tls.crt", "-noout", "-pubkey"]);
    let key = openssl_in(dir, &["pkey", "-in", "tls.key", "-pubout"]);
    assert_eq!(cert_key, key, "tls.key does not match tls.crt");
    assert_eq!(
        std::fs::read_to_string(dir.join("ca.crt")).unwrap().trim(),
        roots.trim()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_controllers_with_the_shipped_rbac_keep_the_root_configmap_and_istiod_tls_current() {
    let Some(lab) = kube_lab::lab() else { return };
    let _serial = SERIAL.lock().await;
    apply_kustomize_rbac(lab);
    helm_dry_run(lab);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = service_account_kubeconfig(lab, NS, "plugca", dir.path());
    let existing = lab.namespace(Cluster::Local, "existing");

    // The controllers' RBAC is by name: istio-ca-root-cert, istiod-tls and
    // the Lease plugca-leader, nothing else (creates cannot be named).
    for args in [
        &["get", "configmaps/istio-ca-root-cert", "-n", &existing][..],
        &["list", "configmaps/istio-ca-root-cert", "--all-namespaces"],
        &["watch", "configmaps/istio-ca-root-cert", "--all-namespaces"],
        &[
            "patch",
            "configmaps/istio-ca-root-cert",
            "-n",
            "kube-system",
        ],
        &["create", "configmaps", "-n", &existing],
        &["list", "namespaces"],
        &["watch", "namespaces"],
        &["get", "secrets/istiod-tls", "-n", NS],
        &["delete", "secrets/istiod-tls", "-n", NS],
        &[
            "patch",
            "leases.coordination.k8s.io/plugca-leader",
            "-n",
            NS,
        ],
        &["create", "leases.coordination.k8s.io", "-n", NS],
    ] {
        assert!(can_i(lab, &kubeconfig, args), "plugca may not {args:?}");
    }
    for args in [
        &["get", "configmaps/other", "-n", &existing][..],
        &["list", "configmaps", "--all-namespaces"],
        &["delete", "configmaps/istio-ca-root-cert", "-n", &existing],
        &["get", "secrets/cacerts", "-n", NS],
        &["list", "secrets", "-n", NS],
        &["get", "secrets/istiod-tls", "-n", "default"],
        &["patch", "leases.coordination.k8s.io/other", "-n", NS],
        &[
            "patch",
            "leases.coordination.k8s.io/plugca-leader",
            "-n",
            "kube-system",
        ],
        &["delete", "namespaces"],
    ] {
        assert!(!can_i(lab, &kubeconfig, args), "plugca may {args:?}");
    }

    // An Opaque Secret where istiod-tls goes (type is immutable): plugca
    // must delete it and create a kubernetes.io/tls one.
    lab.kubectl_ok(
        Cluster::Local,
        &[
            "-n",
            NS,
            "delete",
            "secret",
            "istiod-tls",
            "--ignore-not-found",
        ],
        None,
    );
    lab.kubectl_ok(
        Cluster::Local,
        &[
            "-n",
            NS,
            "create",
            "secret",
            "generic",
            "istiod-tls",
            "--from-literal=tls.crt=x",
        ],
        None,
    );

    let r1 = root("ctl-root-1");
    let i1 = intermediate(&r1, "ctl-ica-1");
    let cacerts = dir.path().join("cacerts");
    std::fs::create_dir(&cacerts).unwrap();
    write_bundle(&cacerts, &i1, &[&r1]);
    let server = Server::start(&server_args(
        &cacerts,
        &[
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--cluster-id",
            LOCAL_ID,
            "--trusted-node-accounts",
            "istio-system/ztunnel",
            "--root-configmap",
            "--istiod-tls-secret",
            "--istiod-namespace",
            NS,
            "--leader-election-namespace",
            NS,
            "--leader-election-lease",
            "plugca-leader",
            "--pod-name",
            "plugca-ctl-0",
            "--reload-interval",
            "2s",
        ],
    ))
    .await;
    let roots1 = server.root_pem.clone();
    assert!(roots1.contains(r1.cert_pem.trim()));

    // Existing namespaces (kube-system and default too), then a new one.
    wait_everywhere(lab, &roots1, "the ConfigMap in every existing namespace");
    assert_eq!(
        lab.root_configmap(&existing).as_deref(),
        Some(roots1.as_str())
    );
    let created = lab.namespace(Cluster::Local, "created");
    eventually(CONTROLLER_DELAY, "the ConfigMap in a new namespace", || {
        (lab.root_configmap(&created).as_deref() == Some(roots1.as_str())).then_some(())
    });
    let labels = lab.kubectl_ok(
        Cluster::Local,
        &[
            "-n",
            &created,
            "get",
            "configmap",
            CONFIGMAP,
            "-o",
            "jsonpath={.metadata.labels}",
        ],
        None,
    );
    assert!(labels.contains(r#""istio.io/config":"true""#), "{labels}");

    // Deleted: re-created. Edited: restored.
    lab.kubectl_ok(
        Cluster::Local,
        &["-n", &existing, "delete", "configmap", CONFIGMAP],
        None,
    );
    eventually(CONTROLLER_DELAY, "the deleted ConfigMap re-created", || {
        (lab.root_configmap(&existing).as_deref() == Some(roots1.as_str())).then_some(())
    });
    lab.kubectl_ok(
        Cluster::Local,
        &[
            "-n",
            &existing,
            "patch",
            "configmap",
            CONFIGMAP,
            "--type=merge",
            "-p",
            r#"{"data":{"root-cert.pem":"edited"}}"#,
        ],
        None,
    );
    eventually(CONTROLLER_DELAY, "the edited ConfigMap restored", || {
        (lab.root_configmap(&existing).as_deref() == Some(roots1.as_str())).then_some(())
    });

    // istiod-tls.
    let tls = dir.path().join("tls");
    std::fs::create_dir(&tls).unwrap();
    let (_, serial1) = eventually(
        CONTROLLER_DELAY,
        "the Opaque Secret replaced by istiod-tls of type kubernetes.io/tls",
        || istiod_tls(lab, &tls).filter(|(t, _)| t == "kubernetes.io/tls"),
    );
    check_istiod_tls(&tls, &r1, &roots1);

    // Deleted: re-created.
    lab.kubectl_ok(
        Cluster::Local,
        &["-n", NS, "delete", "secret", "istiod-tls"],
        None,
    );
    let (_, serial_recreated) = eventually(CONTROLLER_DELAY, "istiod-tls re-created", || {
        istiod_tls(lab, &tls).filter(|(_, s)| *s != serial1)
    });
    let serial1 = serial_recreated;
    check_istiod_tls(&tls, &r1, &roots1);

    // A Terminating namespace (no namespace controller here: it stays so)
    // whose ConfigMap is gone: the apiserver refuses creates in it, plugca
    // must not try (no write error below).
    let terminating = lab.namespace(Cluster::Local, "terminating");
    eventually(
        CONTROLLER_DELAY,
        "the ConfigMap in a namespace to be deleted",
        || lab.root_configmap(&terminating).map(|_| ()),
    );
    lab.kubectl_ok(
        Cluster::Local,
        &["delete", "namespace", &terminating, "--wait=false"],
        None,
    );
    lab.kubectl_ok(
        Cluster::Local,
        &["-n", &terminating, "delete", "configmap", CONFIGMAP],
        None,
    );

    // A root added to the bundle: every ConfigMap updated, istiod-tls re-issued.
    let r2 = root("ctl-root-2");
    write_bundle(&cacerts, &i1, &[&r1, &r2]);
    let roots2 = eventually(CONTROLLER_DELAY, "the reload of the added root", || {
        server
            .ca
            .current()
            .map(|b| b.root_bundle().to_string())
            .filter(|r| r.contains(r2.cert_pem.trim()))
    });
    wait_everywhere(
        lab,
        &roots2,
        "the added root in every namespace's ConfigMap",
    );
    let serial2 = eventually(
        CONTROLLER_DELAY,
        "istiod-tls re-issued after the reload",
        || {
            istiod_tls(lab, &tls).filter(|(_, s)| {
                *s != serial1
                    && std::fs::read_to_string(tls.join("ca.crt"))
                        .unwrap()
                        .contains(r2.cert_pem.trim())
            })
        },
    );
    check_istiod_tls(&tls, &r1, &roots2);
    eprintln!("istiod-tls {serial1} -> {serial2:?}");

    assert_eq!(
        lab.root_configmap(&terminating),
        None,
        "written into a Terminating namespace"
    );
    let (_, metrics) = server.http_get("/metrics").await;
    assert!(
        metrics.contains("plugca_controller_leader 1\n"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("plugca_controller_errors_total{"),
        "no controller errors:\n{metrics}"
    );
    server.stop().await;
}

/// A plugca process (the built binary) logging JSON to a file.
struct Process {
    name: String,
    child: KillOnDrop,
    log: PathBuf,
    grpc: String,
    monitoring: String,
}

fn spawn_plugca(name: &str, args: &[String], dir: &Path) -> Process {
    launch_plugca(name, args, dir).listening()
}

/// A started plugca process that may not listen yet.
struct Launched {
    name: String,
    child: KillOnDrop,
    log: PathBuf,
}

/// Starts plugca without waiting, so several can start at once.
fn launch_plugca(name: &str, args: &[String], dir: &Path) -> Launched {
    launch_plugca_env(name, args, &[], dir)
}

/// [`launch_plugca`] with more environment (set last, so it wins).
fn launch_plugca_env(
    name: &str,
    args: &[String],
    env: &[(String, String)],
    dir: &Path,
) -> Launched {
    let log = dir.join(format!("{name}.log"));
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_plugca"))
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--monitoring-addr",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .args(args)
        .env("POD_NAME", name)
        .env("POD_NAMESPACE", NS)
        .env("RUST_LOG", "info")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    Launched {
        name: name.to_string(),
        child: KillOnDrop(child),
        log,
    }
}

impl Launched {
    /// Waits until it logs `listening`, with its addresses.
    fn listening(self) -> Process {
        let Launched { name, child, log } = self;
        let (grpc, monitoring) = eventually(
            Duration::from_secs(30),
            &format!("{name} listening"),
            || {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                text.lines().find(|l| l.contains("\"listening\"")).map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    let fields = if v["fields"].is_object() {
                        &v["fields"]
                    } else {
                        &v
                    };
                    (
                        fields["grpc"].as_str().unwrap().to_string(),
                        fields["monitoring"].as_str().unwrap().to_string(),
                    )
                })
            },
        );
        Process {
            name,
            child,
            log,
            grpc,
            monitoring,
        }
    }
}

impl Process {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The first sample line starting with `prefix`.
    async fn metric(&self, prefix: &str) -> Option<String> {
        let addr = self.monitoring.parse().unwrap();
        let (_, text) = plugca::testing::http_get(addr, "/metrics").await;
        text.lines()
            .find(|l| l.starts_with(prefix))
            .map(str::to_string)
    }

    async fn leader_metric(&self) -> Option<String> {
        let addr = self.monitoring.parse().unwrap();
        let (_, text) = plugca::testing::http_get(addr, "/metrics").await;
        text.lines()
            .find_map(|l| l.strip_prefix("plugca_controller_leader "))
            .map(str::to_string)
    }

    async fn sign(&self, roots: &str, token: &str, ns: &str) {
        assert_issues_for(&self.chain(roots, token).await, ns);
    }

    /// A certificate for `token`'s identity, over TLS checked against `roots`.
    async fn chain(&self, roots: &str, token: &str) -> Vec<String> {
        let mut client = plugca::client::connect(&plugca::client::Connection {
            addr: self.grpc.clone(),
            root_cert_pem: roots.to_string(),
            server_name: None,
            client_identity: None,
            timeout: Duration::from_secs(20),
        })
        .await
        .unwrap_or_else(|e| panic!("{}: no TLS connection trusting {roots}: {e:?}", self.name));
        request(
            &mut client,
            csr(&p256(), None, CsrShape::Sidecar),
            &with_token(token),
        )
        .await
        .unwrap_or_else(|e| panic!("{} did not sign: {e:?}", self.name))
    }
}

fn lease_holder(lab: &KubeLab) -> String {
    lab.kubectl(
        Cluster::Local,
        &[
            "-n",
            NS,
            "get",
            "lease",
            "plugca-leader",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
        None,
    )
    .unwrap_or_default()
}

const WRITE_LOG: &str = "istio-ca-root-cert written";

#[tokio::test(flavor = "multi_thread")]
async fn two_processes_on_one_lease_one_writes_and_a_killed_leader_hands_over() {
    let Some(lab) = kube_lab::lab() else { return };
    let _serial = SERIAL.lock().await;
    apply_kustomize_rbac(lab);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = service_account_kubeconfig(lab, NS, "plugca", dir.path());
    let args: Vec<String> = [
        "--cacerts-dir",
        CERTS,
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--cluster-id",
        LOCAL_ID,
        "--root-configmap",
        "--istiod-tls-secret",
        "--leader-election-lease",
        "plugca-leader",
        "--replicas",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let roots = std::fs::read_to_string(format!("{CERTS}/root-cert.pem")).unwrap();
    let (ns, token) = workload_token(lab, "leader");

    let a = spawn_plugca(&unique("plugca-a"), &args, dir.path());
    let b = spawn_plugca(&unique("plugca-b"), &args, dir.path());
    let holder = eventually(HANDOVER, "one of the two holds the Lease", || {
        let h = lease_holder(lab);
        (h == a.name || h == b.name).then_some(h)
    });
    let (leader, follower) = if holder == a.name { (a, b) } else { (b, a) };
    // Leadership settles (the metric follows the Lease), then: one writes.
    let deadline = Instant::now() + CONTROLLER_DELAY;
    loop {
        let (l, f) = (leader.leader_metric().await, follower.leader_metric().await);
        if l.as_deref() == Some("1") && f.as_deref() == Some("0") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leader metric {l:?}, follower {f:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let probe = lab.namespace(Cluster::Local, "probe");
    eventually(
        CONTROLLER_DELAY,
        "the leader writes into a new namespace",
        || {
            lab.root_configmap(&probe)
                .filter(|r| r.contains(roots.trim()))
                .map(|_| ())
        },
    );
    leader.sign(&roots, &token, &ns).await;
    follower.sign(&roots, &token, &ns).await;
    assert!(leader.log_text().contains("took the controllers' Lease"));
    assert!(
        !follower.log_text().contains("took the controllers' Lease"),
        "{}",
        follower.log_text()
    );
    assert!(
        !follower.log_text().contains(WRITE_LOG),
        "the follower wrote:\n{}",
        follower.log_text()
    );
    assert!(
        !follower.log_text().contains("istiod-tls written"),
        "the follower wrote:\n{}",
        follower.log_text()
    );
    assert_eq!(
        follower.metric("plugca_controller_writes_total{").await,
        None
    );
    assert!(
        leader
            .metric("plugca_controller_writes_total{")
            .await
            .is_some()
    );

    // Kill the leader (SIGKILL: no release): the follower takes over once the
    // Lease expires, and writes; it signed all along.
    let Process {
        child: mut killed,
        name: killed_name,
        ..
    } = leader;
    let _ = killed.0.kill();
    let _ = killed.0.wait();
    let killed_at = Instant::now();
    follower.sign(&roots, &token, &ns).await;
    eventually(HANDOVER, "the follower takes the Lease", || {
        (lease_holder(lab) == follower.name).then_some(())
    });
    let handover = killed_at.elapsed();
    eprintln!(
        "handover from {killed_name} to {} in {handover:.1?}",
        follower.name
    );
    assert!(
        handover < Duration::from_secs(25),
        "handover took {handover:?}"
    );
    let after = lab.namespace(Cluster::Local, "after");
    eventually(
        CONTROLLER_DELAY,
        "the new leader writes into a new namespace",
        || {
            lab.root_configmap(&after)
                .filter(|r| r.contains(roots.trim()))
                .map(|_| ())
        },
    );
    assert_eq!(follower.leader_metric().await.as_deref(), Some("1"));
    assert!(follower.log_text().contains("took the controllers' Lease"));
    follower.sign(&roots, &token, &ns).await;

    // A stopped leader (SIGTERM, as the kubelet stops a pod) releases the
    // Lease on its way out: a third process takes it at once, not after expiry.
    let c = spawn_plugca(&unique("plugca-c"), &args, dir.path());
    c.sign(&roots, &token, &ns).await;
    assert_eq!(c.leader_metric().await.as_deref(), Some("0"));
    let pid = follower.child.0.id().to_string();
    let term = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(term.success());
    let stopped_at = Instant::now();
    eventually(
        HANDOVER,
        "the third process takes the released Lease",
        || (lease_holder(lab) == c.name).then_some(()),
    );
    let handover = stopped_at.elapsed();
    eprintln!(
        "handover after SIGTERM from {} to {} in {handover:.1?}",
        follower.name, c.name
    );
    assert!(
        handover < Duration::from_secs(8),
        "a released Lease took {handover:?}"
    );
    c.sign(&roots, &token, &ns).await;
    let last = lab.namespace(Cluster::Local, "last");
    eventually(CONTROLLER_DELAY, "the third process writes", || {
        lab.root_configmap(&last)
            .filter(|r| r.contains(roots.trim()))
            .map(|_| ())
    });

    // Nothing the apiserver refused along the way (RBAC, patch types, selectors).
    for p in [&follower, &c] {
        let text = p.log_text();
        let bad: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("\"WARN\"") || l.contains("\"ERROR\""))
            .collect();
        eprintln!("{} warnings: {bad:#?}", p.name);
        assert!(
            !bad.iter()
                .any(|l| l.contains("orbidden") || l.contains("cannot")),
            "{}: {bad:#?}",
            p.name
        );
    }
}

/// The Secret of the shared self-signed root, as deploy/kubernetes-self-signed names it.
const SHARED_ROOT_SECRET: &str = "plugca-root";

/// One key of a Secret in istio-system, decoded; `None` when there is no Secret.
fn secret_key(lab: &KubeLab, name: &str, key: &str) -> Option<String> {
    let out = lab
        .kubectl(
            Cluster::Local,
            &["-n", NS, "get", "secret", name, "-o", "json"],
            None,
        )
        .ok()?;
    let secret: serde_json::Value = serde_json::from_str(&out).unwrap();
    use base64::Engine;
    let value = secret["data"][key].as_str().unwrap_or("");
    Some(
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(value)
                .unwrap(),
        )
        .unwrap(),
    )
}

fn delete_secret(lab: &KubeLab, name: &str) {
    lab.kubectl_ok(
        Cluster::Local,
        &["-n", NS, "delete", "secret", name, "--ignore-not-found"],
        None,
    );
}

/// `openssl x509 -fingerprint -sha256` of a PEM certificate.
fn fingerprint(dir: &Path, pem_text: &str) -> String {
    std::fs::write(dir.join("fp.pem"), pem_text).unwrap();
    openssl_in(
        dir,
        &["x509", "-in", "fp.pem", "-noout", "-fingerprint", "-sha256"],
    )
    .trim()
    .to_string()
}

/// How each process's log says it got the root: "Created", "Existing", "LostRace".
fn shared_root_origin(p: &Process) -> String {
    p.log_text()
        .lines()
        .find(|l| l.contains("self-signed root kept in a Secret all replicas share"))
        .and_then(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            let fields = if v["fields"].is_object() {
                &v["fields"]
            } else {
                &v
            };
            fields["origin"].as_str().map(str::to_string)
        })
        .unwrap_or_else(|| {
            panic!(
                "{} did not log its root's origin:\n{}",
                p.name,
                p.log_text()
            )
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_started_at_once_on_one_self_signed_secret_share_one_root() {
    let Some(lab) = kube_lab::lab() else { return };
    let _serial = SERIAL.lock().await;
    apply_kustomize_rbac(lab);
    // The overlay's RBAC: get Secret plugca-root by name, create Secrets.
    let overlay = std::fs::read_to_string(format!(
        "{REPO}/deploy/kubernetes-self-signed/rbac-self-signed.yaml"
    ))
    .unwrap();
    apply(lab, &overlay);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = service_account_kubeconfig(lab, NS, "plugca", dir.path());

    // The shipped RBAC allows exactly this: get on that one Secret, and
    // create (which RBAC cannot limit by name); nothing else on Secrets.
    let named = format!("secrets/{SHARED_ROOT_SECRET}");
    for args in [
        &["get", named.as_str(), "-n", NS][..],
        &["create", "secrets", "-n", NS],
    ] {
        assert!(can_i(lab, &kubeconfig, args), "plugca may not {args:?}");
    }
    for args in [
        &["get", "secrets/cacerts", "-n", NS][..],
        &["get", "secrets/istio-ca-secret", "-n", NS],
        &["get", "secrets", "-n", NS],
        &["list", "secrets", "-n", NS],
        &["watch", "secrets", "-n", NS],
        &["update", named.as_str(), "-n", NS],
        &["patch", named.as_str(), "-n", NS],
        &["delete", named.as_str(), "-n", NS],
        &["get", named.as_str(), "-n", "default"],
        &["create", "secrets", "-n", "default"],
    ] {
        assert!(!can_i(lab, &kubeconfig, args), "plugca may {args:?}");
    }

    delete_secret(lab, SHARED_ROOT_SECRET);
    let empty_cacerts = dir.path().join("cacerts");
    std::fs::create_dir(&empty_cacerts).unwrap();
    let shared = format!("{NS}/{SHARED_ROOT_SECRET}");
    let args: Vec<String> = [
        "--cacerts-dir",
        empty_cacerts.to_str().unwrap(),
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--cluster-id",
        LOCAL_ID,
        "--replicas",
        "2",
        "--self-signed-secret",
        &shared,
        "--reload-interval",
        "2s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (ns, token) = workload_token(lab, "shared");

    // Both at once: each finds no Secret, generates a root and creates it;
    // the apiserver lets exactly one create succeed.
    let a = launch_plugca(&unique("plugca-ss-a"), &args, dir.path());
    let b = launch_plugca(&unique("plugca-ss-b"), &args, dir.path());
    let (a, b) = (a.listening(), b.listening());
    let origins = [shared_root_origin(&a), shared_root_origin(&b)];
    eprintln!("shared root origins: {origins:?}");
    assert_eq!(
        origins.iter().filter(|o| *o == "Created").count(),
        1,
        "exactly one replica creates the Secret: {origins:?}"
    );
    let root = secret_key(lab, SHARED_ROOT_SECRET, "ca-cert.pem").expect("the Secret exists");
    assert_eq!(
        secret_key(lab, SHARED_ROOT_SECRET, "root-cert.pem").as_deref(),
        Some(root.as_str())
    );
    let secret_type = lab.kubectl_ok(
        Cluster::Local,
        &[
            "-n",
            NS,
            "get",
            "secret",
            SHARED_ROOT_SECRET,
            "-o",
            "jsonpath={.type}",
        ],
        None,
    );
    assert_eq!(secret_type, "istio.io/ca-root");
    // Each serves that root: TLS verified against it, and it is the root
    // bundle of each response (compared by openssl's fingerprint).
    let want = fingerprint(dir.path(), &root);
    for p in [&a, &b] {
        let chain = p.chain(&root, &token).await;
        assert_issues_for(&chain, &ns);
        assert_eq!(
            fingerprint(dir.path(), chain.last().unwrap()),
            want,
            "{} serves another root",
            p.name
        );
    }

    // What a replica that lost the race meets, in-process with the
    // ServiceAccount's kubeconfig: its create is answered 409 (RBAC lets the
    // create through to the existence check) and writes nothing; a replica
    // starting now reads the same root.
    {
        use plugca::controllers::shared_root::{Origin, SecretRef, SharedRoot};
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
            &Default::default(),
        )
        .await
        .unwrap();
        // kube's client TLS uses rustls' process default provider.
        plugca::tls::crypto_provider();
        let shared_root = SharedRoot::new(
            kube::Client::try_from(config).unwrap(),
            SecretRef::parse(&shared).unwrap(),
            Duration::from_secs(10),
        );
        let now = time::OffsetDateTime::now_utc();
        let spec = plugca::ca::selfsigned::SelfSignedSpec {
            dir: None,
            key: KeyChoice::P256,
            ttl: Duration::from_secs(86_400),
            organization: "cluster.local".into(),
        };
        let (mine, _) = plugca::ca::selfsigned::load_or_create(&spec, now).unwrap();
        assert!(
            !shared_root.create(&mine).await.unwrap(),
            "a second create succeeded"
        );
        assert_eq!(
            secret_key(lab, SHARED_ROOT_SECRET, "ca-cert.pem").as_deref(),
            Some(root.as_str()),
            "the losing create overwrote the Secret"
        );
        let (third, origin) = shared_root.load_or_create(&spec, now).await.unwrap();
        assert_eq!(origin, Origin::Existing);
        assert_eq!(fingerprint(dir.path(), &third.signing_cert().text), want);
    }

    // An operator replaces the root in the Secret: both adopt it within the
    // reload interval (no restart), and still sign.
    // Replaced in place (kubectl replace): deleting it first would let a
    // replica re-create it with the old root in between.
    let replacement = long_lived_root("shared-replacement");
    use base64::Engine;
    let b64 = |t: &str| base64::engine::general_purpose::STANDARD.encode(t);
    let replaced = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SHARED_ROOT_SECRET, "namespace": NS},
        "type": "istio.io/ca-root",
        "data": {
            "ca-cert.pem": b64(&replacement.cert_pem),
            "ca-key.pem": b64(&key_pem(&replacement)),
            "root-cert.pem": b64(&replacement.cert_pem),
            "cert-chain.pem": "",
            "key.pem": "",
        },
    });
    lab.kubectl_ok(
        Cluster::Local,
        &["replace", "-f", "-"],
        Some(&replaced.to_string()),
    );
    let new_root = secret_key(lab, SHARED_ROOT_SECRET, "ca-cert.pem").unwrap();
    for p in [&a, &b] {
        let deadline = Instant::now() + CONTROLLER_DELAY;
        loop {
            let text = p.log_text();
            if text.contains("shared self-signed root changed in its Secret: adopted") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} kept its root:\n{text}",
                p.name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let chain = p.chain(&new_root, &token).await;
        assert_eq!(
            fingerprint(dir.path(), chain.last().unwrap()),
            fingerprint(dir.path(), &replacement.cert_pem)
        );
    }

    // Deleted: re-created with the root serving now, so a restarted replica
    // finds it instead of minting another.
    delete_secret(lab, SHARED_ROOT_SECRET);
    let recreated = eventually(CONTROLLER_DELAY, "the deleted Secret re-created", || {
        secret_key(lab, SHARED_ROOT_SECRET, "ca-cert.pem")
    });
    assert_eq!(
        fingerprint(dir.path(), &recreated),
        fingerprint(dir.path(), &replacement.cert_pem)
    );
    // Counted where it was written: one replica re-created it, the other got 409.
    let mut recreations = 0;
    for p in [&a, &b] {
        if let Some(line) = p
            .metric(
                r#"plugca_controller_writes_total{controller="self_signed_secret",kind="create"}"#,
            )
            .await
        {
            recreations += line.rsplit(' ').next().unwrap().parse::<u64>().unwrap();
        }
    }
    assert_eq!(recreations, 1, "re-created once, counted once");
    for p in [&a, &b] {
        let bad: Vec<String> = p
            .log_text()
            .lines()
            .filter(|l| l.contains("\"ERROR\""))
            .map(str::to_string)
            .collect();
        assert!(bad.is_empty(), "{}: {bad:#?}", p.name);
    }
    drop((a, b));

    // Garbage in the Secret: the start fails naming the Secret and the key,
    // and the Secret is left as it was.
    delete_secret(lab, SHARED_ROOT_SECRET);
    lab.kubectl_ok(
        Cluster::Local,
        &[
            "-n",
            NS,
            "create",
            "secret",
            "generic",
            SHARED_ROOT_SECRET,
            "--from-literal=ca-cert.pem=garbage",
            "--from-literal=ca-key.pem=garbage",
        ],
        None,
    );
    let child = Command::new(env!("CARGO_BIN_EXE_plugca"))
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--monitoring-addr",
            "127.0.0.1:0",
        ])
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = kube_lab::wait_bounded(child, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let want = format!(
        "plugca: error: --self-signed-secret {NS}/{SHARED_ROOT_SECRET}: Secret key ca-cert.pem"
    );
    assert!(stderr.contains(&want), "want {want:?} in:\n{stderr}");
    assert_eq!(
        secret_key(lab, SHARED_ROOT_SECRET, "ca-cert.pem").as_deref(),
        Some("garbage"),
        "the bad Secret was overwritten"
    );
    delete_secret(lab, SHARED_ROOT_SECRET);
}

/// `helm template` of the chart with `values` (a file under the chart), split
/// into its objects.
fn helm_render(helm: &Path, values: &str) -> Vec<String> {
    let out = Command::new(helm)
        .args([
            "template",
            "plugca",
            &format!("{REPO}/deploy/charts/plugca"),
        ])
        .args(["--namespace", NS, "--kube-version", "1.34.0"])
        .args(["-f", &format!("{REPO}/deploy/charts/plugca/{values}")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .split("\n---\n")
        .filter(|o| !kind_of(o).is_empty())
        .map(str::to_string)
        .collect()
}

/// The flags and environment of the rendered Deployment as the apiserver
/// stored it, made runnable here: only what names a place in the pod
/// changes (mounted paths become temp dirs, listeners go to 127.0.0.1:0 and
/// the log to JSON for the test to read; in-cluster credentials become a
/// kubeconfig with the chart's ServiceAccount token). Everything else is
/// passed as rendered.
struct RenderedPod {
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Flags replaced, for the log of the test.
    replaced: Vec<String>,
}

fn rendered_pod(
    deployment: &serde_json::Value,
    name: &str,
    paths: &[(&str, String)],
) -> RenderedPod {
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let mut args = Vec::new();
    let mut replaced = Vec::new();
    let rendered: Vec<&str> = container["args"]
        .as_array()
        .expect("the Deployment has args")
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(rendered.first(), Some(&"serve"), "{rendered:?}");
    for arg in &rendered[1..] {
        let flag = arg.split('=').next().unwrap();
        match flag {
            // launch_plugca passes its own (port 0, JSON).
            "--grpc-addr" | "--monitoring-addr" | "--log-format" => replaced.push(arg.to_string()),
            _ => match paths.iter().find(|(f, _)| *f == flag) {
                Some((f, local)) => {
                    replaced.push(arg.to_string());
                    args.push(format!("{f}={local}"));
                }
                None => args.push(arg.to_string()),
            },
        }
    }
    let mut env = Vec::new();
    for e in container["env"].as_array().unwrap() {
        let key = e["name"].as_str().unwrap().to_string();
        if let Some(v) = e["value"].as_str() {
            env.push((key, v.to_string()));
            continue;
        }
        let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("metadata.name") => name.to_string(),
            Some("metadata.namespace") => deployment["metadata"]["namespace"]
                .as_str()
                .unwrap()
                .to_string(),
            other => panic!("env {key} from {other:?}: not handled by the test"),
        };
        env.push((key, value));
    }
    RenderedPod {
        args,
        env,
        replaced,
    }
}

fn label_namespace(lab: &KubeLab, ns: &str, label: &str) {
    lab.kubectl_ok(
        Cluster::Local,
        &["label", "namespace", ns, label, "--overwrite"],
        None,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chart_with_every_feature_on_applies_for_real_and_runs_with_its_flags_and_service_account()
 {
    let Some(lab) = kube_lab::lab() else { return };
    let Some(bin) = kube_lab::tools(&["helm"]) else {
        return;
    };
    let _serial = SERIAL.lock().await;
    // The values file deploy/check.sh checks offline: 3 replicas on a
    // self-signed root kept in Secret plugca-root-east, istiod in
    // istio-control with revisions, the Lease in plugca-leases, root
    // distribution by selector with exclusions, node authorization, remote
    // clusters, extra trust roots, a ServiceMonitor.
    const ISTIOD_NS: &str = "istio-control";
    const LEASE_NS: &str = "plugca-leases";
    const SECRET: &str = "plugca-root-east";
    for ns in [NS, ISTIOD_NS, LEASE_NS] {
        lab.ensure_namespace(Cluster::Local, ns);
    }
    let objects = helm_render(&bin.join("helm"), "ci/all-features-values.yaml");
    let kinds: Vec<&str> = objects.iter().map(|o| kind_of(o)).collect();
    for kind in [
        "Deployment",
        "Service",
        "ServiceAccount",
        "PodDisruptionBudget",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ServiceMonitor",
    ] {
        assert!(kinds.contains(&kind), "{kind} not in the render: {kinds:?}");
    }
    // No CRD of the Prometheus operator here (its source is not in this
    // repository and is not fetched): the ServiceMonitor is left out of the
    // apply; deploy/check-manifests.py checks it against the Service offline.
    eprintln!(
        "ServiceMonitor not applied: the Prometheus operator's CRD is not installed in the lab"
    );
    let applicable = objects
        .iter()
        .filter(|o| kind_of(o) != "ServiceMonitor")
        .cloned()
        .collect::<Vec<_>>()
        .join("\n---\n");
    let ssa = [
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=plugca-tests",
        "-o",
        "json",
        "-f",
        "-",
    ];
    let mut dry_run = ssa.to_vec();
    dry_run.insert(1, "--dry-run=server");
    lab.kubectl_ok(Cluster::Local, &dry_run, Some(&applicable));
    // For real (there is no kubelet: the Deployment never gets pods).
    let applied: serde_json::Value =
        serde_json::from_str(&lab.kubectl_ok(Cluster::Local, &ssa, Some(&applicable))).unwrap();
    let items = applied["items"].as_array().expect("kubectl prints a List");
    assert_eq!(items.len(), objects.len() - 1, "every object applied");
    let deployment = items
        .iter()
        .find(|o| o["kind"] == "Deployment")
        .expect("the Deployment was applied");
    assert_eq!(deployment["spec"]["replicas"], 3);

    // Run plugca as the pod would: the chart's ServiceAccount (token from
    // TokenRequest) and the rendered flags and environment.
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = service_account_kubeconfig(lab, NS, "plugca", dir.path());
    let cacerts = dir.path().join("cacerts");
    std::fs::create_dir(&cacerts).unwrap();
    let remotes = dir.path().join("remotes");
    std::fs::create_dir(&remotes).unwrap();
    std::fs::copy(lab.kubeconfig(Cluster::Remote), remotes.join("west")).unwrap();
    let extra = long_lived_root("chart-extra-root");
    let extra_file = dir.path().join("extra-roots.pem");
    std::fs::write(&extra_file, &extra.cert_pem).unwrap();
    let name = unique("plugca-chart");
    let pod = rendered_pod(
        deployment,
        &name,
        &[
            ("--cacerts-dir", cacerts.display().to_string()),
            ("--remote-kubeconfigs", remotes.display().to_string()),
            ("--extra-trust-roots", extra_file.display().to_string()),
        ],
    );
    let mut args = pod.args.clone();
    args.extend(["--kubeconfig".to_string(), kubeconfig.display().to_string()]);
    eprintln!(
        "rendered flags: {:?}\nreplaced for this machine: {:?}\nenv: {:?}",
        pod.args, pod.replaced, pod.env
    );
    for want in [
        "--self-signed-secret=istio-system/plugca-root-east",
        "--root-configmap",
        "--root-configmap-namespace-selector=mesh=enabled",
        "--root-configmap-exclude-namespaces=kube-system,kube-public",
        "--istiod-tls-secret",
        "--istiod-namespace=istio-control",
        "--istiod-revisions=canary,stable",
        "--leader-election-namespace=plugca-leases",
        "--leader-election-lease=plugca-east",
        "--self-signed-key=p384",
    ] {
        assert!(
            pod.args.iter().any(|a| a == want),
            "{want} not rendered: {:?}",
            pod.args
        );
    }
    assert!(
        pod.env.contains(&("PLUGCA_REPLICAS".into(), "3".into())),
        "{:?}",
        pod.env
    );
    delete_secret(lab, SECRET);
    let selected = lab.namespace(Cluster::Local, "mesh");
    label_namespace(lab, &selected, "mesh=enabled");
    let unselected = lab.namespace(Cluster::Local, "nomesh");
    label_namespace(lab, "kube-public", "mesh=enabled");

    let p = launch_plugca_env(&name, &args, &pod.env, dir.path()).listening();

    // The shared root: created in its Secret, P-384 (--self-signed-key from
    // extraArgs), and what plugca serves.
    let root = eventually(CONTROLLER_DELAY, "the self-signed Secret", || {
        secret_key(lab, SECRET, "ca-cert.pem")
    });
    std::fs::write(dir.path().join("shared-root.pem"), &root).unwrap();
    let text = openssl_in(
        dir.path(),
        &["x509", "-in", "shared-root.pem", "-noout", "-text"],
    );
    assert!(
        text.contains("secp384r1") || text.contains("P-384"),
        "{text}"
    );
    assert!(
        text.contains("O=east.example") || text.contains("O = east.example"),
        "{text}"
    );
    let workload_ns = lab.namespace(Cluster::Local, "chartwl");
    lab.service_account(Cluster::Local, &workload_ns, "workload");
    let token = lab.token(Cluster::Local, &workload_ns, "workload", "istio-ca", None);
    let chain = p.chain(&root, &token).await;
    assert_eq!(
        leaf_facts(&chain[0]).uris,
        [format!(
            "spiffe://east.example/ns/{workload_ns}/sa/workload"
        )]
    );
    let (ok, verify) = openssl_verify(&chain, "sslclient");
    assert!(ok, "{verify}");
    let trust = chain.last().unwrap().clone();
    assert!(
        trust.contains(root.trim()) && trust.contains(extra.cert_pem.trim()),
        "{trust}"
    );

    // Root distribution: the selected namespace gets it, an unselected one
    // and an excluded one (kube-public, labelled to match) do not.
    eventually(
        CONTROLLER_DELAY,
        "the ConfigMap in the selected namespace",
        || (lab.root_configmap(&selected).as_deref() == Some(trust.as_str())).then_some(()),
    );
    // Written in the namespace (istio-system is not labelled) where plugca
    // runs? Only selected ones: the label decides.
    assert_eq!(
        lab.root_configmap(&unselected),
        None,
        "written into an unselected namespace"
    );
    assert_ne!(
        lab.root_configmap("kube-public").as_deref(),
        Some(trust.as_str()),
        "written into an excluded namespace"
    );

    // istiod-tls in istiod's namespace, with the revisions and extra names.
    let tls = dir.path().join("tls");
    std::fs::create_dir(&tls).unwrap();
    eventually(CONTROLLER_DELAY, "istiod-tls in istio-control", || {
        istiod_tls_in(lab, ISTIOD_NS, &tls).filter(|(t, _)| t == "kubernetes.io/tls")
    });
    check_istiod_tls_names(
        &tls,
        &root,
        &trust,
        &[
            "DNS:istiod.istio-control.svc",
            "DNS:istiod-canary.istio-control.svc",
            "DNS:istiod-stable.istio-control.svc",
            "DNS:istiod.example.com",
            "URI:spiffe://east.example/ns/istio-control/sa/istiod",
        ],
    );
    // The Lease in its own namespace, held by this process.
    let holder = lab.kubectl_ok(
        Cluster::Local,
        &[
            "-n",
            LEASE_NS,
            "get",
            "lease",
            "plugca-east",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
        None,
    );
    assert_eq!(holder, name);
    let (_, metrics) = plugca::testing::http_get(p.monitoring.parse().unwrap(), "/metrics").await;
    assert!(
        metrics.contains("plugca_controller_leader 1\n"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("plugca_controller_errors_total{"),
        "no controller errors:\n{metrics}"
    );
    let log = p.log_text();
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"ERROR\"") || l.contains("orbidden"))
        .collect();
    assert!(bad.is_empty(), "{bad:#?}");
    drop(p);
    lab.kubectl_ok(
        Cluster::Local,
        &["label", "namespace", "kube-public", "mesh-"],
        None,
    );
    delete_secret(lab, SECRET);
}

#[test]
fn several_replicas_without_a_shared_root_refuse_to_start_and_name_both_ways_out() {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_plugca"))
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--monitoring-addr",
            "127.0.0.1:0",
        ])
        .args([
            "--cacerts-dir",
            dir.path().to_str().unwrap(),
            // Self-signed mode asked for (without it an empty cacerts
            // directory is refused before the replica check).
            "--self-signed",
            "--replicas",
            "2",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = kube_lab::wait_bounded(child, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for way_out in [
        "--replicas 2 (env PLUGCA_REPLICAS) with no plugged-in CA bundle",
        "plug the same cacerts bundle into every replica",
        "--self-signed-secret <namespace>/<name>",
    ] {
        assert!(stderr.contains(way_out), "{way_out:?} not in:\n{stderr}");
    }
    // And the flag needs Kubernetes access (a usage error, exit 64).
    let out = Command::new(env!("CARGO_BIN_EXE_plugca"))
        .args(["serve", "--self-signed-secret", "istio-system/plugca-root"])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("--self-signed-secret needs Kubernetes API access"),
        "{stderr}"
    );
}
