//! Operating the CA: hot reload (plain files and Kubernetes' `..data` symlink
//! swap) under load, refusal of bad bundles, root rotation rules, the
//! self-signed fallback, extra trust roots, and expiry metrics.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use plugca::ca::generate::{self, CaSpec, GeneratedCa, KeyChoice};
use plugca::client::CsrShape;
use time::OffsetDateTime;

const ID: &str = "spiffe://cluster.local/ns/foo/sa/bar";

use common::{
    rotation_intermediate as intermediate, rotation_root as root,
    write_rotation_bundle as write_bundle,
};

/// Waits (bounded) until the server's signing certificate is `ca`'s.
async fn wait_for_signing(server: &Server, ca: &GeneratedCa) {
    for _ in 0..200 {
        if server.ca.current().unwrap().signing_cert().der == ca.cert_der {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the server did not load the new bundle within 10 s");
}

/// Waits (bounded) until a metrics line with `prefix` has at least `min`.
async fn wait_for_metric(server: &Server, prefix: &str, min: f64) -> String {
    for _ in 0..200 {
        let (_, text) = server.http_get("/metrics").await;
        if metric(&text, prefix).is_some_and(|v| v >= min) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("metric {prefix} did not reach {min} within 10 s");
}

fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn issue_one(server: &Server) -> Vec<String> {
    issue_trusting(server, &server.root_pem).await
}

/// Issues one certificate, trusting `roots` for the server's TLS certificate
/// (after a root rotation a client trusts the root bundle it last received).
async fn issue_trusting(server: &Server, roots: &str) -> Vec<String> {
    let mut client = plugca::client::connect(&plugca::client::Connection {
        addr: server.grpc.to_string(),
        root_cert_pem: roots.to_string(),
        server_name: None,
        client_identity: None,
        timeout: Duration::from_secs(20),
    })
    .await
    .unwrap();
    request(
        &mut client,
        csr(&p256(), Some(ID), CsrShape::Ztunnel),
        &lab(0),
    )
    .await
    .unwrap()
}

/// Points the Kubernetes-style `..data` symlink at `version` atomically.
fn k8s_swap(dir: &Path, version: &str) {
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(version, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubernetes_symlink_swaps_under_load_fail_no_request_and_never_mix_bundles() {
    let r = root("root");
    let bundles = [intermediate(&r, "ica-0"), intermediate(&r, "ica-1")];
    let dir = tempfile::tempdir().unwrap();
    // Kubelet's layout: versioned dirs, `..data` -> current one, files -> `..data/<file>`.
    for (i, b) in bundles.iter().enumerate() {
        write_bundle(&dir.path().join(format!("..v{i}")), b, &[&r]);
    }
    k8s_swap(dir.path(), "..v0");
    for name in [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ] {
        std::os::unix::fs::symlink(format!("..data/{name}"), dir.path().join(name)).unwrap();
    }
    let server = Arc::new(
        Server::start(&[
            "--cacerts-dir",
            dir.path().to_str().unwrap(),
            "--insecure-trust-csr-identity",
        ])
        .await,
    );
    wait_for_signing(&server, &bundles[0]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let issued = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (server, stop, issued) = (server.clone(), stop.clone(), issued.clone());
        workers.push(tokio::spawn(async move {
            let mut client = server.client().await;
            let mut chains = Vec::new();
            // Bounded: at most 2000 requests per worker.
            for _ in 0..2000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let chain = request(
                    &mut client,
                    csr(&p256(), Some(ID), CsrShape::Ztunnel),
                    &lab(0),
                )
                .await
                .expect("no request fails during a reload");
                issued.fetch_add(1, Ordering::Relaxed);
                chains.push(chain);
            }
            chains
        }));
    }
    for swap in 1..=4 {
        let next = swap % 2;
        k8s_swap(dir.path(), &format!("..v{next}"));
        wait_for_signing(&server, &bundles[next]).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut seen = [0usize; 2];
    for w in workers {
        for chain in w.await.unwrap() {
            // Each leaf verifies with the chain it came with: key and chain never mix.
            webpki_verify(&chain);
            let which = bundles
                .iter()
                .position(|b| der_of(&chain[1])[0].as_ref() == b.cert_der.as_slice())
                .expect("the chain holds one of the two intermediates");
            seen[which] += 1;
        }
    }
    assert!(seen[0] > 0 && seen[1] > 0, "both bundles issued: {seen:?}");
    let (_, text) = server.http_get("/metrics").await;
    assert!(
        metric(&text, "plugca_ca_reloads_total{result=\"success\"}").unwrap() >= 4.0,
        "{text}"
    );
    Arc::try_unwrap(server).ok().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_bundle_is_refused_counted_and_the_old_one_keeps_serving() {
    let r = root("root");
    let good = intermediate(&r, "good");
    let dir = tempfile::tempdir().unwrap();
    write_bundle(dir.path(), &good, &[&r]);
    let server = Server::start(&[
        "--cacerts-dir",
        dir.path().to_str().unwrap(),
        "--insecure-trust-csr-identity",
    ])
    .await;
    // A key from another CA: the bundle fails the key check.
    let other = intermediate(&r, "other");
    std::fs::write(
        dir.path().join("ca-key.pem"),
        other.key.secret_pkcs8_pem().as_bytes(),
    )
    .unwrap();
    let text = wait_for_metric(&server, "plugca_ca_reloads_total{result=\"failure\"}", 1.0).await;
    assert!(metric(&text, "plugca_ca_reloads_total{result=\"success\"}").is_none_or(|v| v == 0.0));
    assert_eq!(
        server.ca.current().unwrap().signing_cert().der,
        good.cert_der
    );
    let chain = issue_one(&server).await;
    assert_eq!(der_of(&chain[1])[0].as_ref(), good.cert_der.as_slice());
    webpki_verify(&chain);
    // Garbage PEM is refused the same way.
    std::fs::write(dir.path().join("ca-cert.pem"), "not a certificate").unwrap();
    wait_for_metric(&server, "plugca_ca_reloads_total{result=\"failure\"}", 2.0).await;
    webpki_verify(&issue_one(&server).await);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn roots_can_be_added_then_removed_but_not_replaced_without_opt_in() {
    let r1 = root("root-1");
    let r2 = root("root-2");
    let r3 = root("root-3");
    let i1 = intermediate(&r1, "ica-1");
    let i2 = intermediate(&r2, "ica-2");
    let dir = tempfile::tempdir().unwrap();
    write_bundle(dir.path(), &i1, &[&r1]);
    let server = Server::start(&[
        "--cacerts-dir",
        dir.path().to_str().unwrap(),
        "--insecure-trust-csr-identity",
    ])
    .await;

    // Step 1: add the new root next to the old one.
    write_bundle(dir.path(), &i1, &[&r1, &r2]);
    wait_for_metric(&server, "plugca_ca_reloads_total{result=\"success\"}", 1.0).await;
    let chain = issue_one(&server).await;
    assert_eq!(
        der_of(chain.last().unwrap()).len(),
        2,
        "both roots are distributed"
    );
    webpki_verify(&chain);
    let both_roots = chain.last().unwrap().clone();
    // Step 2: switch to the intermediate of the new root; clients trust both roots by now.
    write_bundle(dir.path(), &i2, &[&r1, &r2]);
    wait_for_signing(&server, &i2).await;
    webpki_verify(&issue_trusting(&server, &both_roots).await);
    // Step 3: drop the old root.
    write_bundle(dir.path(), &i2, &[&r2]);
    wait_for_metric(&server, "plugca_ca_reloads_total{result=\"success\"}", 3.0).await;
    let chain = issue_trusting(&server, &both_roots).await;
    assert_eq!(der_of(chain.last().unwrap()).len(), 1);
    // A disjoint root change is refused and i2 keeps serving.
    let i3 = intermediate(&r3, "ica-3");
    write_bundle(dir.path(), &i3, &[&r3]);
    wait_for_metric(&server, "plugca_ca_reloads_total{result=\"failure\"}", 1.0).await;
    assert_eq!(server.ca.current().unwrap().signing_cert().der, i2.cert_der);
    server.stop().await;

    // With --allow-root-replacement the same change is accepted.
    let server = Server::start(&[
        "--cacerts-dir",
        dir.path().to_str().unwrap(),
        "--insecure-trust-csr-identity",
        "--allow-root-replacement",
    ])
    .await;
    let r4 = root("root-4");
    let i4 = intermediate(&r4, "ica-4");
    write_bundle(dir.path(), &i4, &[&r4]);
    wait_for_signing(&server, &i4).await;
    webpki_verify(&issue_trusting(&server, &r4.cert_pem).await);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bundle_that_appears_after_start_replaces_the_self_signed_root() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&[
        "--cacerts-dir",
        dir.path().to_str().unwrap(),
        "--self-signed",
        "--insecure-trust-csr-identity",
        "--trust-domain",
        "cluster.local",
    ])
    .await;
    let first = issue_one(&server).await;
    assert_eq!(first.len(), 2, "self-signed: [leaf, root]");
    let root_der = der_of(&first[1]).remove(0);
    let (_, root_cert) =
        <x509_parser::certificate::X509Certificate as x509_parser::prelude::FromDer<_>>::from_der(
            &root_der,
        )
        .unwrap();
    assert_eq!(root_cert.subject().to_string(), "O=cluster.local");
    let r = root("root");
    let i = intermediate(&r, "ica");
    write_bundle(dir.path(), &i, &[&r]);
    wait_for_signing(&server, &i).await;
    let chain = issue_trusting(&server, &r.cert_pem).await;
    assert_eq!(chain.len(), 3);
    webpki_verify(&chain);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_persisted_self_signed_root_survives_a_restart() {
    let empty = tempfile::tempdir().unwrap();
    let keep = tempfile::tempdir().unwrap();
    let args = [
        "--cacerts-dir",
        empty.path().to_str().unwrap(),
        "--self-signed-dir",
        keep.path().to_str().unwrap(),
        "--insecure-trust-csr-identity",
        "--self-signed-key",
        "p384",
    ];
    let server = Server::start(&args).await;
    let root_before = server.root_pem.clone();
    let chain = issue_one(&server).await;
    // ecdsa-with-SHA384: the leaf is signed by the P-384 root.
    assert_eq!(leaf_facts(&chain[0]).sig_oid, "1.2.840.10045.4.3.3");
    server.stop().await;
    let server = Server::start(&args).await;
    assert_eq!(server.root_pem, root_before);
    webpki_verify(&issue_one(&server).await);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn extra_trust_roots_are_appended_to_the_root_bundle() {
    let r = root("root");
    let old = root("old root");
    let i = intermediate(&r, "ica");
    let dir = tempfile::tempdir().unwrap();
    write_bundle(dir.path(), &i, &[&r]);
    let extra = tempfile::tempdir().unwrap();
    let extra_file = write_temp(extra.path(), "extra.pem", &old.cert_pem);
    let server = Server::start(&[
        "--cacerts-dir",
        dir.path().to_str().unwrap(),
        "--insecure-trust-csr-identity",
        "--extra-trust-roots",
        extra_file.to_str().unwrap(),
    ])
    .await;
    let chain = issue_one(&server).await;
    let roots = der_of(chain.last().unwrap());
    assert_eq!(roots.len(), 2);
    assert_eq!(roots[1].as_ref(), old.cert_der.as_slice());
    webpki_verify(&chain);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn expiry_metrics_and_warnings_follow_the_loaded_bundle() {
    let r = root("root");
    let now = OffsetDateTime::now_utc();
    let soon = generate::intermediate(
        &CaSpec {
            organization: Some("reload test".into()),
            common_name: Some("short".into()),
            locality: None,
            not_before: now - time::Duration::minutes(5),
            not_after: now + time::Duration::hours(2),
            path_len: Some(0),
            dns_sans: vec![],
        },
        generate::generate_key(KeyChoice::P256).unwrap(),
        &r.cert_der,
        &r.key,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_bundle(dir.path(), &soon, &[&r]);
    let server = Server::start(&["--cacerts-dir", dir.path().to_str().unwrap()]).await;
    let (_, text) = server.http_get("/metrics").await;
    let chain_secs = metric(&text, "citadel_server_cert_chain_expiry_seconds ").unwrap();
    assert!((chain_secs - 7200.0).abs() < 120.0, "{chain_secs}");
    let root_ts = metric(&text, "citadel_server_root_cert_expiry_timestamp ").unwrap();
    assert!((root_ts - (now + time::Duration::days(365)).unix_timestamp() as f64).abs() < 120.0);
    assert_eq!(
        metric(&text, "plugca_ca_cert_expiring{cert=\"signing\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "plugca_ca_cert_expiring{cert=\"root\"}"),
        Some(0.0)
    );
    // After a reload to a long-lived intermediate the gauges move.
    let long = intermediate(&r, "long");
    write_bundle(dir.path(), &long, &[&r]);
    wait_for_signing(&server, &long).await;
    let (_, text) = server.http_get("/metrics").await;
    assert_eq!(
        metric(&text, "plugca_ca_cert_expiring{cert=\"signing\"}"),
        Some(0.0)
    );
    assert!(metric(&text, "citadel_server_cert_chain_expiry_seconds ").unwrap() > 86_400.0 * 200.0);
    server.stop().await;
}

/// Unblocks anything stuck reading the FIFO at `path` (the code before issue
/// #12 item 5 blocked forever in open()), so a failing test cannot hang.
struct FifoGuard(std::path::PathBuf);

impl Drop for FifoGuard {
    fn drop(&mut self) {
        let path = self.0.clone();
        // Opening for writing blocks until a reader exists; detached, so it
        // never holds up the test when nobody is stuck.
        std::thread::spawn(move || drop(std::fs::OpenOptions::new().write(true).open(path)));
    }
}

/// Issue #12 item 5: a named pipe in place of ca-cert.pem is refused with an
/// error naming the file (it used to block the reload thread forever, holding
/// the lock), the reload metrics say so, and a later good bundle is served.
#[tokio::test(flavor = "multi_thread")]
async fn a_fifo_in_place_of_a_bundle_file_is_refused_and_a_later_good_bundle_is_served() {
    let r = root("root");
    let good = intermediate(&r, "good");
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("cacerts");
    write_bundle(&dir, &good, &[&r]);
    let server = Server::start(&[
        "--cacerts-dir",
        dir.to_str().unwrap(),
        "--insecure-trust-csr-identity",
    ])
    .await;
    let fifo = scratch.path().join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let _guard = FifoGuard(fifo.clone());
    std::fs::hard_link(&fifo, dir.join(".fifo")).unwrap();
    std::fs::rename(dir.join(".fifo"), dir.join("ca-cert.pem")).unwrap();
    let text = wait_for_metric(&server, "plugca_ca_reloads_total{result=\"failure\"}", 1.0).await;
    assert!(
        metric(&text, "plugca_ca_reload_last_attempt_timestamp_seconds").is_some_and(|v| v > 0.0)
    );
    let err = plugca::ca::CaBundle::load_dir(&dir, OffsetDateTime::now_utc()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: is a named pipe (FIFO), not a regular file (bundle files must be regular files)",
            dir.join("ca-cert.pem").display()
        )
    );
    webpki_verify(&issue_one(&server).await);
    // A later good bundle (same root, new intermediate) is picked up.
    let next = intermediate(&r, "next");
    write_bundle(&dir, &next, &[&r]);
    wait_for_signing(&server, &next).await;
    let text = wait_for_metric(&server, "plugca_ca_reloads_total{result=\"success\"}", 1.0).await;
    assert!(
        metric(&text, "plugca_ca_reload_last_success_timestamp_seconds").is_some_and(|v| v > 0.0)
    );
    let chain = issue_one(&server).await;
    assert_eq!(der_of(&chain[1])[0].as_ref(), next.cert_der.as_slice());
    server.stop().await;
}
