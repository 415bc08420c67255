//! `--jwt-rule` (istiod's JWT_RULE): tokens of an OIDC issuer whose JWKS is
//! fetched over HTTPS from an in-process fake issuer, with key caching,
//! rate-limited refetch on an unknown kid, OIDC discovery, and UNAVAILABLE
//! while no keys can be fetched.

mod common;
mod support;

use std::time::Duration;

use common::*;
use jsonwebtoken::Algorithm;
use plugca::client::CsrShape;
use serde_json::Value;
use support::jwks::FakeIssuer;
use support::logs;
use tonic::Code;

fn jwks_of(keys: &JwtKeys) -> Value {
    serde_json::from_slice(&std::fs::read(&keys.jwks_path).unwrap()).unwrap()
}

/// A server trusting `issuer` through --jwt-rule (with `jwks_uri` unless `discover`).
async fn rule_server(issuer: &FakeIssuer, discover: bool) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let ca = write_temp(dir.path(), "issuer-ca.pem", &issuer.ca_pem);
    let rule = if discover {
        serde_json::json!({"issuer": issuer.issuer(), "audiences": ["istio-ca"]})
    } else {
        serde_json::json!({"issuer": issuer.issuer(), "jwks_uri": issuer.jwks_uri(), "audiences": ["istio-ca"]})
    };
    let args = server_args(
        std::path::Path::new(CERTS),
        &[
            "--jwt-rule",
            &rule.to_string(),
            "--jwt-rule-ca-file",
            ca.to_str().unwrap(),
        ],
    );
    (Server::start(&args).await, dir)
}

fn token(key: &plugca::jwt_issuer::JwtIssuer, kid: &str, issuer: &str, sub: &str) -> String {
    mint(
        key,
        Algorithm::ES256,
        kid,
        &TokenSpec {
            iss: issuer,
            sub,
            ..Default::default()
        },
    )
}

fn a_csr() -> String {
    csr(&p256(), None, CsrShape::Ztunnel)
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_verify_with_keys_fetched_once_over_https() {
    let keys = JwtKeys::new();
    let issuer = FakeIssuer::start(jwks_of(&keys)).await;
    let (server, _dir) = rule_server(&issuer, false).await;
    assert_eq!(issuer.key_fetches(), 1, "fetched at start");
    let mut client = server.client().await;
    for sa in ["a", "b", "c"] {
        let t = token(
            &keys.ec,
            "ec-1",
            &issuer.issuer(),
            &format!("system:serviceaccount:rule-ns:{sa}"),
        );
        let chain = request(&mut client, a_csr(), &bearer(t)).await.unwrap();
        assert_eq!(
            leaf_facts(&chain[0]).uris,
            [format!("spiffe://cluster.local/ns/rule-ns/sa/{sa}")]
        );
    }
    let rsa = mint(
        &keys.rsa,
        Algorithm::RS256,
        "rsa-1",
        &TokenSpec {
            iss: &issuer.issuer(),
            ..Default::default()
        },
    );
    request(&mut client, a_csr(), &bearer(rsa)).await.unwrap();
    assert_eq!(issuer.key_fetches(), 1, "keys are cached");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_key_is_fetched_and_made_up_kids_do_not_cause_a_fetch_storm() {
    let logs = logs();
    let keys = JwtKeys::new();
    let issuer = FakeIssuer::start(jwks_of(&keys)).await;
    let (server, _dir) = rule_server(&issuer, false).await;
    let mut client = server.client().await;
    // The issuer rotates in a new key "ec-2".
    let next = JwtKeys::new();
    let mut jwks = jwks_of(&keys);
    let mut new_key = jwks_of(&next)["keys"][0].clone();
    new_key["kid"] = "ec-2".into();
    jwks["keys"].as_array_mut().unwrap().push(new_key);
    issuer.set_jwks(jwks);
    let t = token(
        &next.ec,
        "ec-2",
        &issuer.issuer(),
        "system:serviceaccount:rot:new",
    );
    let chain = request(&mut client, a_csr(), &bearer(t)).await.unwrap();
    assert_eq!(
        leaf_facts(&chain[0]).uris,
        ["spiffe://cluster.local/ns/rot/sa/new"]
    );
    assert_eq!(issuer.key_fetches(), 2, "one refetch for the new kid");
    for _ in 0..5 {
        let t = token(
            &keys.stranger,
            "made-up-kid",
            &issuer.issuer(),
            "system:serviceaccount:rot:x",
        );
        assert_eq!(
            request(&mut client, a_csr(), &bearer(t)).await.unwrap_err(),
            (Code::Unauthenticated, "request authenticate failure".into())
        );
    }
    assert_eq!(issuer.key_fetches(), 2, "unknown kids are rate-limited");
    logs.assert_line(&[
        "CreateCertificate refused",
        "JWT: no key with kid \"made-up-kid\" in the JWKS",
    ]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_jwks_gives_unavailable_until_it_answers() {
    let logs = logs();
    let keys = JwtKeys::new();
    let issuer = FakeIssuer::start(jwks_of(&keys)).await;
    issuer.set_failing(true);
    let (server, _dir) = rule_server(&issuer, false).await;
    let mut client = server.client().await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let t = token(
        &keys.ec,
        "ec-1",
        &issuer.issuer(),
        "system:serviceaccount:down:sa",
    );
    assert_eq!(
        request(&mut client, a_csr(), &bearer(t.clone()))
            .await
            .unwrap_err(),
        (
            Code::Unavailable,
            "request authentication is temporarily unavailable".into()
        )
    );
    logs.assert_line(&[
        "CreateCertificate refused",
        "are unavailable: GET https://",
        "HTTP 503 Service Unavailable",
    ]);
    issuer.set_failing(false);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let chain = request(&mut client, a_csr(), &bearer(t)).await.unwrap();
    assert_eq!(
        leaf_facts(&chain[0]).uris,
        ["spiffe://cluster.local/ns/down/sa/sa"]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_jwks_uri_the_issuer_is_discovered() {
    let keys = JwtKeys::new();
    let issuer = FakeIssuer::start(jwks_of(&keys)).await;
    let (server, _dir) = rule_server(&issuer, true).await;
    let mut client = server.client().await;
    let t = token(
        &keys.ec,
        "ec-1",
        &issuer.issuer(),
        "system:serviceaccount:disc:sa",
    );
    let chain = request(&mut client, a_csr(), &bearer(t)).await.unwrap();
    assert_eq!(
        leaf_facts(&chain[0]).uris,
        ["spiffe://cluster.local/ns/disc/sa/sa"]
    );
    assert_eq!((issuer.discoveries(), issuer.key_fetches()), (1, 1));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_for_another_audience_or_issuer_are_refused() {
    let logs = logs();
    let keys = JwtKeys::new();
    let issuer = FakeIssuer::start(jwks_of(&keys)).await;
    let (server, _dir) = rule_server(&issuer, false).await;
    let mut client = server.client().await;
    let iss = issuer.issuer();
    let wrong_aud = mint(
        &keys.ec,
        Algorithm::ES256,
        "ec-1",
        &TokenSpec {
            iss: &iss,
            aud: "someone-else",
            ..Default::default()
        },
    );
    let wrong_iss = mint(
        &keys.ec,
        Algorithm::ES256,
        "ec-1",
        &TokenSpec {
            iss: "https://other.issuer",
            ..Default::default()
        },
    );
    for (t, why) in [(wrong_aud, "InvalidAudience"), (wrong_iss, "InvalidIssuer")] {
        assert_eq!(
            request(&mut client, a_csr(), &bearer(t)).await.unwrap_err(),
            (Code::Unauthenticated, "request authenticate failure".into())
        );
        logs.assert_line(&["CreateCertificate refused", why]);
    }
    server.stop().await;
}
