//! Impersonation (spec section 4, cases 14-21): ztunnel-shaped requests
//! (P-256 CSR with an empty subject, `clusterid` header, `ImpersonatedIdentity`)
//! authorized by the policy file (labs without Kubernetes) and by Kubernetes
//! node authorization against the in-process fake API server.

mod common;
mod support;

use common::*;
use plugca::client::{CsrShape, RequestOptions};
use support::apiserver::{FakeApiServer, FakePod};
use support::logs;
use tonic::Code;

const ZTUNNEL_SUB: &str = "system:serviceaccount:istio-system:ztunnel";
const ZTUNNEL_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/ztunnel";
const TARGET_A: &str = "spiffe://cluster.local/ns/ns-a/sa/sa-a";
const TARGET_B: &str = "spiffe://cluster.local/ns/ns-b/sa/sa-b";
const POLICY: &str =
    r#"[{"caller": "istio-system/ztunnel", "may_impersonate": ["ns-a/*", "*/default"]}]"#;

fn impersonation_failure() -> (Code, String) {
    (
        Code::Unauthenticated,
        "request impersonation authentication failure".to_string(),
    )
}

/// A lab server: JWKS-file JWTs prove service accounts, the policy file says
/// what istio-system/ztunnel may impersonate.
async fn policy_server(
    keys: &JwtKeys,
    policy: &str,
    extra: &[&str],
) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let policy_path = write_temp(dir.path(), "policy.json", policy);
    let mut args = server_args(
        std::path::Path::new(CERTS),
        &[
            "--trusted-node-accounts",
            "istio-system/ztunnel",
            "--impersonation-policy",
        ],
    );
    args.push(policy_path.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(keys.server_args());
    (Server::start(&args).await, dir)
}

fn token_for(keys: &JwtKeys, sub: &str) -> String {
    mint(
        &keys.ec,
        jsonwebtoken::Algorithm::ES256,
        "ec-1",
        &TokenSpec {
            sub,
            ..Default::default()
        },
    )
}

/// What ztunnel sends in shared mode: its own token, its cluster, and the
/// workload identity in metadata; the CSR names the workload too.
fn ztunnel_request(token: String, target: &str, cluster: Option<&str>) -> (String, RequestOptions) {
    let csr_pem = csr(&p256(), Some(target), CsrShape::Ztunnel);
    let opts = RequestOptions {
        bearer_token: Some(token),
        cluster_id: cluster.map(str::to_string),
        ttl_secs: 86_400,
        impersonate: Some(target.to_string()),
        ..Default::default()
    };
    (csr_pem, opts)
}

async fn authn_failures(server: &Server) -> u64 {
    metric(server, "citadel_server_authentication_failure_count")
        .await
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn ztunnel_gets_exactly_the_identity_the_policy_allows() {
    let logs = logs();
    let keys = JwtKeys::new();
    let (server, _dir) = policy_server(&keys, POLICY, &[]).await;
    let mut client = server.client().await;
    let (csr_pem, opts) =
        ztunnel_request(token_for(&keys, ZTUNNEL_SUB), TARGET_A, Some("Kubernetes"));
    let chain = request(&mut client, csr_pem, &opts).await.unwrap();
    webpki_verify(&chain);
    let facts = leaf_facts(&chain[0]);
    assert_eq!(
        facts.uris,
        [TARGET_A],
        "one URI SAN: the impersonated identity"
    );
    assert!(facts.dns.is_empty());
    assert!(facts.san_critical);
    assert_eq!(facts.subject, "");
    logs.assert_line(&[
        "certificate issued",
        &format!("identity={TARGET_A}"),
        &format!("impersonation by {ZTUNNEL_ID}"),
    ]);

    // `*/default` in the policy; no clusterid header means the local cluster.
    let target = "spiffe://cluster.local/ns/anything/sa/default";
    let (csr_pem, opts) = ztunnel_request(token_for(&keys, ZTUNNEL_SUB), target, None);
    let chain = request(&mut client, csr_pem, &opts).await.unwrap();
    assert_eq!(leaf_facts(&chain[0]).uris, [target]);
    assert_eq!(authn_failures(&server).await, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_outside_the_policy_is_refused_and_the_log_says_which_rule() {
    let logs = logs();
    let keys = JwtKeys::new();
    let (server, _dir) = policy_server(&keys, POLICY, &[]).await;
    let mut client = server.client().await;
    let (csr_pem, opts) =
        ztunnel_request(token_for(&keys, ZTUNNEL_SUB), TARGET_B, Some("Kubernetes"));
    assert_eq!(
        request(&mut client, csr_pem, &opts).await.unwrap_err(),
        impersonation_failure()
    );
    assert_eq!(authn_failures(&server).await, 1);
    logs.assert_line(&[
        "CreateCertificate refused",
        &format!(
            "caller {ZTUNNEL_ID} may not impersonate ns-b/sa-b: policy allows ns-a/*,*/default"
        ),
    ]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_caller_outside_the_trusted_node_accounts_cannot_impersonate() {
    let logs = logs();
    let keys = JwtKeys::new();
    let (server, _dir) = policy_server(&keys, POLICY, &[]).await;
    let mut client = server.client().await;
    let (csr_pem, opts) = ztunnel_request(
        token_for(&keys, "system:serviceaccount:pol-untrusted:sleep"),
        TARGET_A,
        Some("Kubernetes"),
    );
    assert_eq!(
        request(&mut client, csr_pem, &opts).await.unwrap_err(),
        impersonation_failure()
    );
    logs.assert_line(&[
        "CreateCertificate refused",
        "(service account pol-untrusted/sleep) is not allowed to impersonate: not in --trusted-node-accounts (istio-system/ztunnel)",
    ]);
    // The same caller still gets its own identity without ImpersonatedIdentity.
    let chain = request(
        &mut client,
        csr(&p256(), None, CsrShape::Ztunnel),
        &bearer(token_for(
            &keys,
            "system:serviceaccount:pol-untrusted:sleep",
        )),
    )
    .await
    .unwrap();
    assert_eq!(
        leaf_facts(&chain[0]).uris,
        ["spiffe://cluster.local/ns/pol-untrusted/sa/sleep"]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_impersonated_identities_are_refused() {
    let logs = logs();
    let keys = JwtKeys::new();
    let (server, _dir) = policy_server(
        &keys,
        r#"[{"caller": "istio-system/ztunnel", "may_impersonate": ["*/*"]}]"#,
        &[],
    )
    .await;
    let mut client = server.client().await;
    for bad in [
        "not-spiffe-idenditity",
        "spiffe://cluster.local/ns/ns-a/sa/sa-a/extra",
        "spiffe://cluster.local/ns//sa/sa-a",
    ] {
        let mut opts = ztunnel_request(token_for(&keys, ZTUNNEL_SUB), TARGET_A, None).1;
        opts.impersonate = Some(bad.to_string());
        assert_eq!(
            request(&mut client, csr(&p256(), None, CsrShape::Ztunnel), &opts)
                .await
                .unwrap_err(),
            impersonation_failure(),
            "{bad}"
        );
        logs.assert_line(&[
            "CreateCertificate refused",
            &format!("failed to validate impersonated identity {bad:?}"),
        ]);
    }
    server.stop().await;
}

/// Case 20: a client-certificate caller has no service-account proof, even
/// when its certificate names a trusted node account and it also sends a token
/// (the certificate wins, case 12).
#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_caller_cannot_impersonate() {
    let logs = logs();
    let keys = JwtKeys::new();
    let (server, _dir) = policy_server(&keys, POLICY, &[]).await;
    let mut client = server.client().await;
    // ztunnel's own certificate, obtained with its token.
    let key = p256();
    let own = request(
        &mut client,
        csr(&key, None, CsrShape::Ztunnel),
        &bearer(token_for(&keys, ZTUNNEL_SUB)),
    )
    .await
    .unwrap();
    assert_eq!(leaf_facts(&own[0]).uris, [ZTUNNEL_ID]);
    let mut mtls = server
        .client_with(Some((own[..own.len() - 1].concat(), key.serialize_pem())))
        .await;
    let (csr_pem, opts) =
        ztunnel_request(token_for(&keys, ZTUNNEL_SUB), TARGET_A, Some("Kubernetes"));
    assert_eq!(
        request(&mut mtls, csr_pem, &opts).await.unwrap_err(),
        impersonation_failure()
    );
    logs.assert_line(&[
        "CreateCertificate refused",
        &format!("caller {ZTUNNEL_ID} (client certificate serial"),
        "has no service-account proof",
    ]);
    server.stop().await;
}

/// Case 20 for lab mode: an identity taken from the CSR proves nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_lab_mode_caller_cannot_impersonate() {
    let logs = logs();
    let keys = JwtKeys::new();
    let (server, _dir) = policy_server(&keys, POLICY, &["--insecure-trust-csr-identity"]).await;
    let mut client = server.client().await;
    let opts = RequestOptions {
        impersonate: Some(TARGET_A.into()),
        ..Default::default()
    };
    assert_eq!(
        request(
            &mut client,
            csr(&p256(), Some(ZTUNNEL_ID), CsrShape::Ztunnel),
            &opts
        )
        .await
        .unwrap_err(),
        impersonation_failure()
    );
    logs.assert_line(&[
        "CreateCertificate refused",
        "lab mode: identity taken from the CSR",
    ]);
    server.stop().await;
}

/// Case 21 with impersonation configured: a non-string value is ignored.
#[tokio::test(flavor = "multi_thread")]
async fn a_numeric_impersonated_identity_is_ignored() {
    let keys = JwtKeys::new();
    let (server, _dir) = policy_server(&keys, POLICY, &[]).await;
    let mut client = server.client().await;
    let token = token_for(&keys, ZTUNNEL_SUB);
    let auth = format!("Bearer {token}");
    let chain = send_raw(
        &mut client,
        plugca::pb::IstioCertificateRequest {
            csr: csr(&p256(), None, CsrShape::Ztunnel),
            validity_duration: 0,
            metadata: metadata(vec![(
                "ImpersonatedIdentity",
                prost_types::value::Kind::NumberValue(7.0),
            )]),
        },
        &[("authorization", &auth)],
    )
    .await
    .unwrap();
    assert_eq!(leaf_facts(&chain[0]).uris, [ZTUNNEL_ID]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_naming_an_untrusted_caller_stops_the_server_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_temp(
        dir.path(),
        "policy.json",
        r#"[{"caller": "default/sleep", "may_impersonate": ["ns-a/*"]}]"#,
    );
    let config = plugca::config::Config::from_args(&[
        "--grpc-addr",
        "127.0.0.1:0",
        "--monitoring-addr",
        "127.0.0.1:0",
        "--cacerts-dir",
        CERTS,
        "--trusted-node-accounts",
        "istio-system/ztunnel",
        "--impersonation-policy",
        policy.to_str().unwrap(),
    ])
    .unwrap();
    let e = match plugca::app::spawn(&config).await {
        Ok(_) => panic!("the server started with an invalid policy"),
        Err(e) => e.to_string(),
    };
    assert_eq!(
        e,
        format!(
            "--impersonation-policy {}: rule 1: caller default/sleep is not in --trusted-node-accounts (istio-system/ztunnel); add it there or remove the rule",
            policy.display()
        )
    );
}

// ------------------------------------------------------------ Kubernetes node authorization

const ZT_NODE: &str = "zt-node";

/// A server whose local cluster `fake` is `local` (and `fake-remote` is
/// `remote`), trusting istio-system/ztunnel, with node authorization.
async fn node_server(
    local: &FakeApiServer,
    remote: Option<&FakeApiServer>,
    extra: &[&str],
) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = local.write_kubeconfig(&dir.path().join("kubeconfig"));
    let mut args = server_args(
        std::path::Path::new(CERTS),
        &[
            "--cluster-id",
            "fake",
            "--trusted-node-accounts",
            "istio-system/ztunnel",
            "--kubeconfig",
        ],
    );
    args.push(kubeconfig.display().to_string());
    if let Some(remote) = remote {
        let remotes = dir.path().join("remotes");
        std::fs::create_dir(&remotes).unwrap();
        remote.write_kubeconfig(&remotes.join("fake-remote"));
        args.push("--remote-kubeconfigs".into());
        args.push(remotes.display().to_string());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    (Server::start(&args).await, dir)
}

/// A cluster with ztunnel-a on zt-node; returns ztunnel's pod.
fn with_ztunnel(fake: &FakeApiServer) -> FakePod {
    let zt = FakePod::running("istio-system", "ztunnel-a", "ztunnel", ZT_NODE);
    fake.put_pod(zt.clone());
    zt
}

/// Cases 15 and 16 end to end: the pod of the target must run on ztunnel's node.
#[tokio::test(flavor = "multi_thread")]
async fn ztunnel_may_impersonate_only_workloads_on_its_node() {
    let logs = logs();
    let fake = FakeApiServer::start().await;
    let zt = with_ztunnel(&fake);
    fake.put_pod(FakePod::running("ns-a", "sa-a-pod", "sa-a", "other-node"));
    let (server, _dir) = node_server(&fake, None, &[]).await;
    let mut client = server.client().await;
    let token = fake.sa_token("istio-system", "ztunnel", Some(&zt));

    // Case 15: the only pod of ns-a/sa-a runs on another node.
    let (csr_pem, opts) = ztunnel_request(token.clone(), TARGET_A, Some("fake"));
    assert_eq!(
        request(&mut client, csr_pem, &opts).await.unwrap_err(),
        impersonation_failure()
    );
    logs.assert_line(&[
        "CreateCertificate refused",
        &format!(
            "caller {ZTUNNEL_ID} may not impersonate ns-a/sa-a: no instances of \"ns-a/sa-a\" found on node \"zt-node\" in cluster \"fake\""
        ),
    ]);

    // Case 16: one appears on zt-node; the watch brings it in without a re-list.
    fake.put_pod(FakePod::running("ns-a", "sa-a-pod-2", "sa-a", ZT_NODE));
    let chain = eventually_issued(&mut client, &token, TARGET_A, Some("fake")).await;
    webpki_verify(&chain);
    let facts = leaf_facts(&chain[0]);
    assert_eq!(facts.uris, [TARGET_A], "exactly the impersonated identity");
    assert!(facts.dns.is_empty());
    assert_eq!(facts.subject, "");

    // Unlike istiod (case 18), no clusterid header means the local cluster.
    let (csr_pem, opts) = ztunnel_request(token.clone(), TARGET_A, None);
    let chain = request(&mut client, csr_pem, &opts).await.unwrap();
    assert_eq!(leaf_facts(&chain[0]).uris, [TARGET_A]);

    // The pod leaves: refused again.
    fake.delete_pod("ns-a", "sa-a-pod-2");
    eventually_refused(&mut client, &token, TARGET_A).await;

    // The cache is watch-backed: one list at start, not one per request; the
    // ztunnel token was reviewed once and then cached.
    assert_eq!(fake.pod_lists(), 1);
    assert_eq!(fake.reviews(), 1);
    server.stop().await;
}

/// Retries while the watch event travels (bounded), then returns the chain.
async fn eventually_issued(
    client: &mut plugca::pb::istio_certificate_service_client::IstioCertificateServiceClient<
        tonic::transport::Channel,
    >,
    token: &str,
    target: &str,
    cluster: Option<&str>,
) -> Vec<String> {
    for _ in 0..100 {
        let (csr_pem, opts) = ztunnel_request(token.to_string(), target, cluster);
        match request(client, csr_pem, &opts).await {
            Ok(chain) => return chain,
            Err(e) => assert_eq!(e, impersonation_failure()),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{target} was never issued");
}

async fn eventually_refused(
    client: &mut plugca::pb::istio_certificate_service_client::IstioCertificateServiceClient<
        tonic::transport::Channel,
    >,
    token: &str,
    target: &str,
) {
    for _ in 0..100 {
        let (csr_pem, opts) = ztunnel_request(token.to_string(), target, None);
        if request(client, csr_pem, &opts).await.is_err() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{target} was never refused");
}

/// Case 19 end to end: the token's pod must exist with the same UID and
/// service account; a token not bound to a pod proves no node.
#[tokio::test(flavor = "multi_thread")]
async fn the_caller_pod_must_match_its_bound_token() {
    let logs = logs();
    let fake = FakeApiServer::start().await;
    let zt = with_ztunnel(&fake);
    fake.put_pod(FakePod::running("ns-a", "sa-a-pod", "sa-a", ZT_NODE));
    fake.put_pod(FakePod::running(
        "istio-system",
        "ztunnel-b",
        "default",
        ZT_NODE,
    ));
    let (server, _dir) = node_server(&fake, None, &[]).await;
    let mut client = server.client().await;
    let cases = [
        (
            FakePod {
                uid: "a-stale-uid".into(),
                ..zt.clone()
            },
            "pod istio-system/ztunnel-a found in cluster \"fake\", but UID does not match (token \"a-stale-uid\", pod \"uid-istio-system-ztunnel-a\")",
        ),
        (
            FakePod {
                name: "ztunnel-gone".into(),
                ..zt.clone()
            },
            "pod istio-system/ztunnel-gone not found in cluster \"fake\"",
        ),
    ];
    for (bound_to, reason) in cases {
        let token = fake.sa_token("istio-system", "ztunnel", Some(&bound_to));
        let (csr_pem, opts) = ztunnel_request(token, TARGET_A, Some("fake"));
        assert_eq!(
            request(&mut client, csr_pem, &opts).await.unwrap_err(),
            impersonation_failure()
        );
        logs.assert_line(&["CreateCertificate refused", reason]);
    }
    // A pod named like ztunnel's but running another service account.
    let impostor = FakePod::running("istio-system", "ztunnel-b", "default", ZT_NODE);
    let token = fake.sa_token("istio-system", "ztunnel", Some(&impostor));
    let (csr_pem, opts) = ztunnel_request(token, TARGET_A, Some("fake"));
    assert_eq!(
        request(&mut client, csr_pem, &opts).await.unwrap_err(),
        impersonation_failure()
    );
    logs.assert_line(&[
        "pod istio-system/ztunnel-b found in cluster \"fake\", but ServiceAccount does not match",
    ]);
    // A legacy (unbound) token.
    let token = fake.sa_token("istio-system", "ztunnel", None);
    let (csr_pem, opts) = ztunnel_request(token, TARGET_A, Some("fake"));
    assert_eq!(
        request(&mut client, csr_pem, &opts).await.unwrap_err(),
        impersonation_failure()
    );
    logs.assert_line(&["caller istio-system/ztunnel has no Kubernetes pod proof"]);
    // The real ztunnel token still works.
    let token = fake.sa_token("istio-system", "ztunnel", Some(&zt));
    let (csr_pem, opts) = ztunnel_request(token, TARGET_A, Some("fake"));
    request(&mut client, csr_pem, &opts).await.unwrap();
    assert_eq!(authn_failures(&server).await, 4);
    server.stop().await;
}

/// Case 17: node authorization happens in the caller's own cluster.
#[tokio::test(flavor = "multi_thread")]
async fn impersonation_is_checked_in_the_callers_cluster() {
    let logs = logs();
    let local = FakeApiServer::start().await;
    let remote = FakeApiServer::start().await;
    let zt_local = with_ztunnel(&local);
    let zt_remote = with_ztunnel(&remote);
    remote.put_pod(FakePod::running("ns-a", "sa-a-remote", "sa-a", ZT_NODE));
    let (server, _dir) = node_server(&local, Some(&remote), &[]).await;
    let mut client = server.client().await;

    let token = local.sa_token("istio-system", "ztunnel", Some(&zt_local));
    let (csr_pem, opts) = ztunnel_request(token, TARGET_A, Some("fake"));
    assert_eq!(
        request(&mut client, csr_pem, &opts).await.unwrap_err(),
        impersonation_failure()
    );
    logs.assert_line(&[
        "no instances of \"ns-a/sa-a\" found on node \"zt-node\" in cluster \"fake\"",
    ]);

    let token = remote.sa_token("istio-system", "ztunnel", Some(&zt_remote));
    let (csr_pem, opts) = ztunnel_request(token, TARGET_A, Some("fake-remote"));
    let chain = request(&mut client, csr_pem, &opts).await.unwrap();
    assert_eq!(leaf_facts(&chain[0]).uris, [TARGET_A]);
    assert_eq!((local.pod_lists(), remote.pod_lists()), (1, 1));
    server.stop().await;
}

/// With Kubernetes and a policy file, both must allow.
#[tokio::test(flavor = "multi_thread")]
async fn a_policy_file_narrows_node_authorization() {
    let logs = logs();
    let fake = FakeApiServer::start().await;
    let zt = with_ztunnel(&fake);
    fake.put_pod(FakePod::running("ns-a", "a", "sa-a", ZT_NODE));
    fake.put_pod(FakePod::running("ns-b", "b", "sa-b", ZT_NODE));
    let dir = tempfile::tempdir().unwrap();
    let policy = write_temp(dir.path(), "policy.json", POLICY);
    let (server, _dir) = node_server(
        &fake,
        None,
        &["--impersonation-policy", policy.to_str().unwrap()],
    )
    .await;
    let mut client = server.client().await;
    let token = fake.sa_token("istio-system", "ztunnel", Some(&zt));
    let (csr_pem, opts) = ztunnel_request(token.clone(), TARGET_A, Some("fake"));
    request(&mut client, csr_pem, &opts).await.unwrap();
    let (csr_pem, opts) = ztunnel_request(token, TARGET_B, Some("fake"));
    assert_eq!(
        request(&mut client, csr_pem, &opts).await.unwrap_err(),
        impersonation_failure()
    );
    logs.assert_line(&[
        "CreateCertificate refused",
        "may not impersonate ns-b/sa-b: policy allows ns-a/*,*/default",
    ]);
    server.stop().await;
}

/// Case 14 with Kubernetes on: without trusted node accounts nobody may impersonate.
#[tokio::test(flavor = "multi_thread")]
async fn without_trusted_node_accounts_kubernetes_callers_cannot_impersonate() {
    let logs = logs();
    let fake = FakeApiServer::start().await;
    let zt = with_ztunnel(&fake);
    fake.put_pod(FakePod::running("ns-a", "a", "sa-a", ZT_NODE));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = fake.write_kubeconfig(&dir.path().join("kubeconfig"));
    let server = Server::start(&[
        "--cacerts-dir",
        CERTS,
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ])
    .await;
    let mut client = server.client().await;
    let token = fake.sa_token("istio-system", "ztunnel", Some(&zt));
    let (csr_pem, opts) = ztunnel_request(token, "spiffe://cluster.local/ns/ns-a/sa/c14", None);
    assert_eq!(
        request(&mut client, csr_pem, &opts).await.unwrap_err(),
        impersonation_failure()
    );
    logs.assert_line(&[
        "caller asked to impersonate \"spiffe://cluster.local/ns/ns-a/sa/c14\" but impersonation is not configured",
    ]);
    assert_eq!(
        fake.pod_lists(),
        0,
        "no pod watch without node authorization"
    );
    server.stop().await;
}

/// Issue #12 item 7: a trusted ztunnel whose policy allows the target's
/// namespace still cannot get an identity of another trust domain; an
/// explicitly configured alias is allowed.
#[tokio::test(flavor = "multi_thread")]
async fn a_trusted_ztunnel_cannot_impersonate_an_identity_outside_the_trust_domain() {
    let logs = logs();
    let keys = JwtKeys::new();
    let policy = r#"[{"caller": "istio-system/ztunnel", "may_impersonate": ["default/*"]}]"#;
    let evil = "spiffe://evil.example/ns/default/sa/x";
    let (server, _dir) = policy_server(&keys, policy, &[]).await;
    let mut client = server.client().await;
    let (csr_pem, opts) = ztunnel_request(token_for(&keys, ZTUNNEL_SUB), evil, None);
    assert_eq!(
        request(&mut client, csr_pem, &opts).await.unwrap_err(),
        (
            Code::Unauthenticated,
            "request authenticate failure".to_string()
        )
    );
    logs.assert_line(&[
        "CreateCertificate refused",
        "identity \"spiffe://evil.example/ns/default/sa/x\" is in trust domain \"evil.example\", not in cluster.local",
    ]);
    assert_eq!(authn_failures(&server).await, 1);
    assert!(
        metric(&server, "citadel_server_success_cert_issuance_count")
            .await
            .as_deref()
            == Some("0")
    );
    server.stop().await;

    let (server, _dir) =
        policy_server(&keys, policy, &["--trust-domain-aliases", "evil.example"]).await;
    let mut client = server.client().await;
    let (csr_pem, opts) = ztunnel_request(token_for(&keys, ZTUNNEL_SUB), evil, None);
    let chain = request(&mut client, csr_pem, &opts).await.unwrap();
    assert_eq!(leaf_facts(&chain[0]).uris, [evil]);
    server.stop().await;
}
