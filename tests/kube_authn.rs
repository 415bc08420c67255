//! Kubernetes TokenReview authentication (spec 3.2, cases 5-12) and
//! multi-cluster selection, against the in-process fake API server reached
//! through a real kubeconfig: caching, an API server that is down or slow.

mod common;
mod support;

use std::time::{Duration, Instant};

use common::*;
use plugca::client::{CsrShape, RequestOptions};
use support::apiserver::{FakeApiServer, Review, write_dead_kubeconfig};
use support::logs;
use tonic::Code;

fn authn_failure() -> (Code, String) {
    (
        Code::Unauthenticated,
        "request authenticate failure".to_string(),
    )
}

/// A plugca server using `fake` as its local cluster, plus `extra` flags.
async fn kube_server(fake: &FakeApiServer, extra: &[&str]) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = fake.write_kubeconfig(&dir.path().join("kubeconfig"));
    let mut args = server_args(std::path::Path::new(CERTS), &["--kubeconfig"]);
    args.push(kubeconfig.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    (Server::start(&args).await, dir)
}

fn with_cluster(token: String, cluster: Option<&str>) -> RequestOptions {
    RequestOptions {
        bearer_token: Some(token),
        cluster_id: cluster.map(str::to_string),
        ..Default::default()
    }
}

fn ztunnel_csr() -> String {
    csr(&p256(), None, CsrShape::Ztunnel)
}

/// Case 7 and 10: a service-account token of the local cluster, with or
/// without the clusterid header, gives the workload identity.
#[tokio::test(flavor = "multi_thread")]
async fn a_service_account_token_reviewed_by_the_api_server_gives_its_identity() {
    let fake = FakeApiServer::start().await;
    let (server, _dir) = kube_server(&fake, &["--trust-domain", "example.com"]).await;
    let mut client = server.client().await;
    for cluster in [None, Some("Kubernetes"), Some("")] {
        let token = fake.sa_token("default", "example-pod-sa", None);
        let chain = request(&mut client, ztunnel_csr(), &with_cluster(token, cluster))
            .await
            .unwrap_or_else(|e| panic!("{cluster:?}: {e:?}"));
        webpki_verify(&chain);
        assert_eq!(
            leaf_facts(&chain[0]).uris,
            ["spiffe://example.com/ns/default/sa/example-pod-sa"]
        );
    }
    assert_eq!(fake.reviews(), 3);
    assert_eq!(
        fake.review_audiences(),
        vec![vec!["istio-ca".to_string()]; 3],
        "case 10: spec.audiences = TOKEN_AUDIENCES"
    );
    assert_eq!(
        metric(
            &server,
            "plugca_certificates_issued_total{authenticator=\"kube_jwt\",key=\"p256\"}"
        )
        .await
        .as_deref(),
        Some("3")
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn token_audiences_are_configurable() {
    let fake = FakeApiServer::start().await;
    let (server, _dir) = kube_server(&fake, &["--token-audiences", "istio-ca,plugca"]).await;
    let mut client = server.client().await;
    let token = fake.sa_token("foo", "bar", None);
    request(&mut client, ztunnel_csr(), &bearer(token))
        .await
        .unwrap();
    assert_eq!(fake.review_audiences(), [["istio-ca", "plugca"]]);
    server.stop().await;
}

/// Case 11.
#[tokio::test(flavor = "multi_thread")]
async fn an_at_sign_in_the_trust_domain_becomes_a_dot() {
    let fake = FakeApiServer::start().await;
    let (server, _dir) = kube_server(&fake, &["--trust-domain", "a@b"]).await;
    let mut client = server.client().await;
    let token = fake.sa_token("foo", "bar", None);
    let chain = request(&mut client, ztunnel_csr(), &bearer(token))
        .await
        .unwrap();
    assert_eq!(leaf_facts(&chain[0]).uris, ["spiffe://a.b/ns/foo/sa/bar"]);
    server.stop().await;
}

/// Cases 5, 6 and 9: every refusal is opaque on the wire, exact in the log,
/// and counted.
#[tokio::test(flavor = "multi_thread")]
async fn tokens_the_api_server_does_not_vouch_for_are_refused() {
    let logs = logs();
    let fake = FakeApiServer::start().await;
    let (server, _dir) = kube_server(&fake, &[]).await;
    let mut client = server.client().await;

    // Case 6: authenticated=false.
    fake.register("unknown-token-c6", Review::NotAuthenticated);
    let e = request(
        &mut client,
        ztunnel_csr(),
        &bearer("unknown-token-c6".into()),
    )
    .await
    .unwrap_err();
    assert_eq!(e, authn_failure());
    logs.assert_line(&[
        "CreateCertificate refused",
        "failed to validate the JWT from cluster \"Kubernetes\": the token is not authenticated",
    ]);

    // Case 9: authenticated, but not a service account.
    fake.register(
        "user-token-c9",
        Review::User {
            username: "alice-c9".into(),
            groups: vec!["system:authenticated".into()],
        },
    );
    let e = request(&mut client, ztunnel_csr(), &bearer("user-token-c9".into()))
        .await
        .unwrap_err();
    assert_eq!(e, authn_failure());
    logs.assert_line(&[
        "the token is not a service account (user \"alice-c9\" is not in group system:serviceaccounts)",
    ]);
    fake.register(
        "odd-username-c9",
        Review::User {
            username: "system:serviceaccount:c9-ns".into(),
            groups: vec!["system:serviceaccounts".into()],
        },
    );
    let e = request(
        &mut client,
        ztunnel_csr(),
        &bearer("odd-username-c9".into()),
    )
    .await
    .unwrap_err();
    assert_eq!(e, authn_failure());
    logs.assert_line(&["invalid username field \"system:serviceaccount:c9-ns\""]);

    // Case 5: another authorization scheme.
    let e = send_raw(
        &mut client,
        plugca::pb::IstioCertificateRequest {
            csr: ztunnel_csr(),
            validity_duration: 0,
            metadata: None,
        },
        &[("authorization", "Basic eDp5")],
    )
    .await
    .unwrap_err();
    assert_eq!(e, authn_failure());
    logs.assert_line(&[
        "target JWT extraction error: no bearer token exists in HTTP authorization header",
    ]);
    assert_eq!(fake.reviews(), 3, "no TokenReview without a bearer token");
    assert_eq!(
        metric(&server, "citadel_server_authentication_failure_count")
            .await
            .as_deref(),
        Some("4")
    );
    server.stop().await;
}

/// Positive reviews are cached until the token's exp: a renewal storm does
/// not become an API-server storm.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_request_with_the_same_token_does_not_call_token_review() {
    let fake = FakeApiServer::start().await;
    let (server, _dir) = kube_server(&fake, &[]).await;
    let mut client = server.client().await;
    let token = fake.sa_token("foo", "bar", None);
    for _ in 0..5 {
        let chain = request(&mut client, ztunnel_csr(), &bearer(token.clone()))
            .await
            .unwrap();
        assert_eq!(
            leaf_facts(&chain[0]).uris,
            ["spiffe://cluster.local/ns/foo/sa/bar"]
        );
    }
    assert_eq!(fake.reviews(), 1);
    // Another token is reviewed; refused tokens are never cached.
    let other = fake.sa_token("foo", "bar", None);
    request(&mut client, ztunnel_csr(), &bearer(other))
        .await
        .unwrap();
    assert_eq!(fake.reviews(), 2);
    fake.register("bad-cache-token", Review::NotAuthenticated);
    for _ in 0..2 {
        request(
            &mut client,
            ztunnel_csr(),
            &bearer("bad-cache-token".into()),
        )
        .await
        .unwrap_err();
    }
    assert_eq!(fake.reviews(), 4);
    // A token that later turns valid is accepted: only positive results are cached.
    fake.register(
        "bad-cache-token",
        Review::ServiceAccount {
            namespace: "foo".into(),
            name: "bar".into(),
            pod: None,
        },
    );
    request(
        &mut client,
        ztunnel_csr(),
        &bearer("bad-cache-token".into()),
    )
    .await
    .unwrap();
    server.stop().await;
}

/// Case 12: a client certificate with a SAN wins over a bearer token, and
/// the token is not even reviewed.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_takes_precedence_over_a_bearer_token() {
    let fake = FakeApiServer::start().await;
    let (server, _dir) = kube_server(&fake, &[]).await;
    let mut client = server.client().await;
    let key = p256();
    let own = request(
        &mut client,
        csr(&key, None, CsrShape::Ztunnel),
        &bearer(fake.sa_token("cert-ns", "cert-sa", None)),
    )
    .await
    .unwrap();
    assert_eq!(fake.reviews(), 1);
    let mut mtls = server
        .client_with(Some((own[..own.len() - 1].concat(), key.serialize_pem())))
        .await;
    let token = fake.sa_token("token-ns", "token-sa", None);
    let chain = request(&mut mtls, ztunnel_csr(), &bearer(token))
        .await
        .unwrap();
    assert_eq!(
        leaf_facts(&chain[0]).uris,
        ["spiffe://cluster.local/ns/cert-ns/sa/cert-sa"]
    );
    assert_eq!(fake.reviews(), 1);
    server.stop().await;
}

/// Case 7 (remote) and 8: the clusterid header selects the API server.
#[tokio::test(flavor = "multi_thread")]
async fn the_clusterid_header_selects_the_cluster_and_unknown_ones_are_refused() {
    let logs = logs();
    let local = FakeApiServer::start().await;
    let remote = FakeApiServer::start().await;
    let remotes = tempfile::tempdir().unwrap();
    remote.write_kubeconfig(&remotes.path().join("cluster-west"));
    let remotes_arg = remotes.path().display().to_string();
    let (server, _dir) = kube_server(
        &local,
        &[
            "--cluster-id",
            "cluster-east",
            "--remote-kubeconfigs",
            &remotes_arg,
        ],
    )
    .await;
    let mut client = server.client().await;

    let west_token = remote.sa_token("west-ns", "west-sa", None);
    let chain = request(
        &mut client,
        ztunnel_csr(),
        &with_cluster(west_token.clone(), Some("cluster-west")),
    )
    .await
    .unwrap();
    assert_eq!(
        leaf_facts(&chain[0]).uris,
        ["spiffe://cluster.local/ns/west-ns/sa/west-sa"]
    );
    assert_eq!((local.reviews(), remote.reviews()), (0, 1));

    // The same token sent to the local cluster is not known there.
    let e = request(&mut client, ztunnel_csr(), &with_cluster(west_token, None))
        .await
        .unwrap_err();
    assert_eq!(e, authn_failure());
    assert_eq!((local.reviews(), remote.reviews()), (1, 1));
    let east_token = local.sa_token("east-ns", "east-sa", None);
    request(
        &mut client,
        ztunnel_csr(),
        &with_cluster(east_token.clone(), Some("cluster-east")),
    )
    .await
    .unwrap();

    // Case 8.
    let e = request(
        &mut client,
        ztunnel_csr(),
        &with_cluster(east_token, Some("non-exist")),
    )
    .await
    .unwrap_err();
    assert_eq!(e, authn_failure());
    logs.assert_line(&[
        "CreateCertificate refused",
        "client claims to be in cluster \"non-exist\", but we only know about local cluster \"cluster-east\" and remote clusters [cluster-west]",
    ]);
    assert_eq!((local.reviews(), remote.reviews()), (2, 1));
    server.stop().await;
}

/// An unreachable API server fails requests with UNAVAILABLE (clients retry)
/// quickly, and the server keeps serving the clusters that do answer.
#[tokio::test(flavor = "multi_thread")]
async fn an_api_server_that_is_down_gives_unavailable_and_others_keep_working() {
    let logs = logs();
    let local = FakeApiServer::start().await;
    let remotes = tempfile::tempdir().unwrap();
    write_dead_kubeconfig(&remotes.path().join("down-cluster")).await;
    let remotes_arg = remotes.path().display().to_string();
    let (server, _dir) = kube_server(
        &local,
        &[
            "--remote-kubeconfigs",
            &remotes_arg,
            "--kube-api-timeout",
            "2s",
        ],
    )
    .await;
    let mut client = server.client().await;
    let started = Instant::now();
    let e = request(
        &mut client,
        ztunnel_csr(),
        &with_cluster(
            support::apiserver::jwt_shaped("system:serviceaccount:a:b", 3600),
            Some("down-cluster"),
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(
        e,
        (
            Code::Unavailable,
            "request authentication is temporarily unavailable".to_string()
        )
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    logs.assert_line(&[
        "CreateCertificate refused",
        "the API server of cluster \"down-cluster\" is unavailable",
    ]);
    let token = local.sa_token("foo", "bar", None);
    request(&mut client, ztunnel_csr(), &bearer(token))
        .await
        .unwrap();
    assert_eq!(
        metric(&server, "citadel_server_authentication_failure_count")
            .await
            .as_deref(),
        Some("1")
    );
    server.stop().await;
}

/// A slow API server is cut off at --kube-api-timeout with UNAVAILABLE; the
/// next request, once it answers again, succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn an_api_server_slower_than_the_timeout_gives_unavailable_then_recovers() {
    let logs = logs();
    let fake = FakeApiServer::start().await;
    let (server, _dir) = kube_server(&fake, &["--kube-api-timeout", "1s"]).await;
    let mut client = server.client().await;
    fake.slow_reviews(Some(Duration::from_secs(30)));
    let started = Instant::now();
    let e = request(
        &mut client,
        ztunnel_csr(),
        &bearer(fake.sa_token("slow-ns", "slow-sa", None)),
    )
    .await
    .unwrap_err();
    let took = started.elapsed();
    assert_eq!(e.0, Code::Unavailable, "{e:?}");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(8),
        "{took:?}"
    );
    logs.assert_line(&[
        "CreateCertificate refused",
        "did not answer the TokenReview within 1s",
    ]);
    fake.slow_reviews(None);
    let chain = request(
        &mut client,
        ztunnel_csr(),
        &bearer(fake.sa_token("slow-ns", "slow-sa", None)),
    )
    .await
    .unwrap();
    assert_eq!(
        leaf_facts(&chain[0]).uris,
        ["spiffe://cluster.local/ns/slow-ns/sa/slow-sa"]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_kubeconfig_stops_the_server_at_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_temp(dir.path(), "kubeconfig", "not: [a kubeconfig");
    let config = plugca::config::Config::from_args(&[
        "--grpc-addr",
        "127.0.0.1:0",
        "--monitoring-addr",
        "127.0.0.1:0",
        "--cacerts-dir",
        CERTS,
        "--kubeconfig",
        path.to_str().unwrap(),
    ])
    .unwrap();
    let e = match plugca::app::spawn(&config).await {
        Ok(_) => panic!("started with a broken kubeconfig"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.starts_with(&format!("Kubernetes kubeconfig {}: ", path.display())),
        "{e}"
    );
}

/// Issue #12 item 8: a remote kubeconfig whose user runs a command (exec
/// credential plugin) stops the server at start, naming the file and the
/// user, and the command never runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_remote_kubeconfig_that_would_run_a_command_is_refused_without_running_it() {
    let fake = FakeApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let local = fake.write_kubeconfig(&dir.path().join("local"));
    let remotes = dir.path().join("remotes");
    std::fs::create_dir(&remotes).unwrap();
    let marker = dir.path().join("exec-ran");
    let remote = remotes.join("east");
    std::fs::write(
        &remote,
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: east
  cluster:
    server: https://{addr}
    insecure-skip-tls-verify: true
contexts:
- name: east
  context: {{cluster: east, user: pwn}}
current-context: east
users:
- name: pwn
  user:
    exec:
      apiVersion: client.authentication.k8s.io/v1
      command: /bin/sh
      args: [\"-c\", \"touch {marker} && echo '{{\\\"apiVersion\\\":\\\"client.authentication.k8s.io/v1\\\",\\\"kind\\\":\\\"ExecCredential\\\",\\\"status\\\":{{\\\"token\\\":\\\"x\\\"}}}}'\"]
      interactiveMode: Never
",
            addr = fake.addr,
            marker = marker.display()
        ),
    )
    .unwrap();
    let cli = <plugca::cli::Cli as clap::Parser>::try_parse_from([
        "plugca",
        "serve",
        "--grpc-addr",
        "127.0.0.1:0",
        "--monitoring-addr",
        "127.0.0.1:0",
        "--cacerts-dir",
        CERTS,
        "--kubeconfig",
        local.to_str().unwrap(),
        "--remote-kubeconfigs",
        remotes.to_str().unwrap(),
    ])
    .unwrap();
    let plugca::cli::Command::Serve(serve) = cli.command else {
        unreachable!()
    };
    let config = serve.into_config().unwrap();
    let e = match tokio::time::timeout(Duration::from_secs(30), plugca::app::spawn(&config))
        .await
        .expect("start-up is bounded")
    {
        Ok(_) => panic!("started with a remote kubeconfig that runs a command"),
        Err(e) => e.to_string(),
    };
    assert_eq!(
        e,
        format!(
            "--remote-kubeconfigs {}: user \"pwn\" has a credential plugin (users[].user.exec), which would run a command with plugca's privileges; use a token or client certificate, or pass --allow-remote-kubeconfig-exec if the file is trusted",
            remote.display()
        )
    );
    assert!(!marker.exists(), "the exec command ran");
}

/// Issue #12 item 10: 400 requests with the same junk token (which the API
/// server refuses with an error) cost a handful of TokenReviews, not 400,
/// even when sent concurrently; later requests are answered from the cache.
#[tokio::test(flavor = "multi_thread")]
async fn repeated_junk_tokens_cost_a_handful_of_token_reviews() {
    let fake = FakeApiServer::start().await;
    let (server, _dir) = kube_server(&fake, &[]).await;
    // Five workers per connection: a connection carries at most 16 streams.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(server.client().await);
    }
    let csr_text = ztunnel_csr();
    let mut tasks = Vec::new();
    for n in 0..20 {
        let mut client = clients[n % clients.len()].clone();
        let csr_text = csr_text.clone();
        tasks.push(tokio::spawn(async move {
            let mut refused = 0;
            for _ in 0..20 {
                let e = request(
                    &mut client,
                    csr_text.clone(),
                    &bearer("junk-token-x10".into()),
                )
                .await
                .unwrap_err();
                assert_eq!(e, authn_failure());
                refused += 1;
            }
            refused
        }));
    }
    let mut refused = 0;
    for t in tasks {
        refused += tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("bounded")
            .unwrap();
    }
    assert_eq!(refused, 400);
    let reviews = fake.reviews();
    assert!(reviews <= 3, "{reviews} TokenReviews for 400 junk requests");
    assert!(
        metric(
            &server,
            "plugca_token_reviews_total{result=\"cached_refusal\"}"
        )
        .await
        .is_some_and(|v| v.parse::<u64>().unwrap() >= 397)
    );
    server.stop().await;
}

/// Issue #12 item 10: at most 32 reviews are in flight; requests beyond
/// that wait briefly, then get UNAVAILABLE (retried by clients) and are counted.
#[tokio::test(flavor = "multi_thread")]
async fn reviews_beyond_the_concurrency_cap_are_shed_with_unavailable() {
    let fake = FakeApiServer::start().await;
    let (server, _dir) = kube_server(&fake, &["--kube-api-timeout", "20s"]).await;
    fake.slow_reviews(Some(Duration::from_secs(4)));
    // Four connections: one carries at most 16 streams (issue 12 item 1), and
    // 48 concurrent requests must reach the server to exceed the review cap.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(server.client().await);
    }
    let csr_text = ztunnel_csr();
    let mut tasks = Vec::new();
    for n in 0..48 {
        let mut client = clients[n % clients.len()].clone();
        let csr_text = csr_text.clone();
        tasks.push(tokio::spawn(async move {
            request(&mut client, csr_text, &bearer(format!("distinct-junk-{n}")))
                .await
                .unwrap_err()
                .0
        }));
    }
    let mut unavailable = 0;
    for t in tasks {
        let code = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("bounded")
            .unwrap();
        match code {
            Code::Unavailable => unavailable += 1,
            Code::Unauthenticated => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(unavailable >= 1, "nothing was shed");
    assert_eq!(
        fake.reviews() + unavailable,
        48,
        "each request reviewed or shed"
    );
    assert_eq!(
        metric(&server, "plugca_token_reviews_total{result=\"shed\"}")
            .await
            .as_deref(),
        Some(unavailable.to_string().as_str())
    );
    fake.slow_reviews(None);
    server.stop().await;
}

/// Issue #9 item 5: a positive review is remembered at most
/// --token-review-cache-ttl, so a token the API server stops vouching for
/// (its pod was deleted) is refused once that time has passed.
#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_token_is_refused_once_the_cache_lifetime_has_passed() {
    let fake = FakeApiServer::start().await;
    let (server, _dir) = kube_server(&fake, &["--token-review-cache-ttl", "1s"]).await;
    let mut client = server.client().await;
    let token = fake.sa_token("foo", "bar", None);
    request(&mut client, ztunnel_csr(), &bearer(token.clone()))
        .await
        .unwrap();
    request(&mut client, ztunnel_csr(), &bearer(token.clone()))
        .await
        .unwrap();
    assert_eq!(fake.reviews(), 1, "cached within the lifetime");
    // The pod is deleted: the API server no longer authenticates the token.
    fake.register(&token, Review::NotAuthenticated);
    let mut refused = false;
    for _ in 0..100 {
        if request(&mut client, ztunnel_csr(), &bearer(token.clone()))
            .await
            .is_err()
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "the revoked token kept working for 10 s");
    assert!(fake.reviews() >= 2);
    server.stop().await;
}

/// Issue #9 item 5: a review whose echoed status.audiences names none of
/// --token-audiences is refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_review_for_other_audiences_is_refused() {
    let logs = logs();
    let fake = FakeApiServer::start().await;
    let (server, _dir) = kube_server(&fake, &[]).await;
    let mut client = server.client().await;
    fake.register(
        "other-audience-token",
        Review::OtherAudience {
            namespace: "foo".into(),
            name: "bar".into(),
        },
    );
    assert_eq!(
        request(
            &mut client,
            ztunnel_csr(),
            &bearer("other-audience-token".into())
        )
        .await
        .unwrap_err(),
        authn_failure()
    );
    logs.assert_line(&[
        "CreateCertificate refused",
        "the token is for audiences [kubernetes.default.svc], none of ours [istio-ca]",
    ]);
    server.stop().await;
}
