//! Who may get a certificate: bearer JWTs checked against a JWKS file, mTLS
//! renewal with a certificate this CA issued, and lab mode (identity from the
//! CSR). Every refusal is istiod's opaque `request authenticate failure`.

mod common;

use std::time::Duration;

use common::*;
use jsonwebtoken::Algorithm;
use plugca::client::{Connection, CsrShape, RequestOptions};
use plugca::pb::IstioCertificateRequest;
use tonic::Code;

const AUTHN_FAILURE: &str = "request authenticate failure";

fn es256(keys: &JwtKeys, spec: &TokenSpec) -> String {
    mint(&keys.ec, Algorithm::ES256, "ec-1", spec)
}

fn verify_both_ways(chain: &[String]) {
    webpki_verify(chain);
    for purpose in ["sslclient", "sslserver"] {
        let (ok, text) = openssl_verify(chain, purpose);
        assert!(ok, "openssl verify -purpose {purpose}: {text}");
    }
}

/// A CSR for a fresh P-256 key whose own SAN says nothing useful.
fn plain_csr() -> String {
    csr(&p256(), None, CsrShape::Ztunnel)
}

/// Issues a certificate for the default token's identity; returns the
/// response and the key, as a workload would keep them.
async fn jwt_issued(server: &Server, keys: &JwtKeys) -> (Vec<String>, rcgen::KeyPair) {
    let mut client = server.client().await;
    let key = p256();
    let chain = request(
        &mut client,
        csr(&key, None, CsrShape::Ztunnel),
        &bearer(es256(keys, &TokenSpec::default())),
    )
    .await
    .unwrap();
    (chain, key)
}

/// The client identity a workload presents: every element but the root bundle, and its key.
fn client_identity(chain: &[String], key: &rcgen::KeyPair) -> (String, String) {
    (chain[..chain.len() - 1].concat(), key.serialize_pem())
}

// ---------------------------------------------------------------- JWT

#[tokio::test(flavor = "multi_thread")]
async fn good_es256_and_rs256_tokens_issue_the_service_account_identity() {
    let keys = JwtKeys::new();
    let server = jwt_server(&keys, samples(), &[]).await;
    let mut client = server.client().await;
    let tokens = [
        mint(&keys.ec, Algorithm::ES256, "ec-1", &TokenSpec::default()),
        mint(&keys.rsa, Algorithm::RS256, "rsa-1", &TokenSpec::default()),
    ];
    for token in tokens {
        let chain = request(&mut client, plain_csr(), &bearer(token))
            .await
            .unwrap();
        assert_eq!(leaf_facts(&chain[0]).uris, [JWT_ID]);
        verify_both_ways(&chain);
    }
    assert_eq!(
        metric(&server, "citadel_server_success_cert_issuance_count")
            .await
            .as_deref(),
        Some("2")
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_or_missing_tokens_are_unauthenticated_and_counted() {
    let keys = JwtKeys::new();
    let server = jwt_server(&keys, samples(), &[]).await;
    let mut client = server.client().await;
    let spec = TokenSpec::default;
    let hs256 = jsonwebtoken::encode(
        &{
            let mut h = jsonwebtoken::Header::new(Algorithm::HS256);
            h.kid = Some("ec-1".into());
            h
        },
        &serde_json::json!({
            "iss": JWT_ISSUER, "aud": ["istio-ca"], "sub": "system:serviceaccount:foo:httpbin",
            "exp": time::OffsetDateTime::now_utc().unix_timestamp() + 3600,
        }),
        &jsonwebtoken::EncodingKey::from_secret(b"guessable").unwrap(),
    )
    .unwrap();
    let tokens: Vec<(&str, String)> = vec![
        (
            "expired",
            es256(
                &keys,
                &TokenSpec {
                    exp_in: -3600,
                    nbf_in: -7200,
                    ..spec()
                },
            ),
        ),
        (
            "not valid before 10 minutes from now",
            es256(
                &keys,
                &TokenSpec {
                    nbf_in: 600,
                    ..spec()
                },
            ),
        ),
        (
            "wrong audience",
            es256(
                &keys,
                &TokenSpec {
                    aud: "someone-else",
                    ..spec()
                },
            ),
        ),
        (
            "wrong issuer",
            es256(
                &keys,
                &TokenSpec {
                    iss: "https://evil.test",
                    ..spec()
                },
            ),
        ),
        (
            "unknown key under a known kid",
            mint(&keys.stranger, Algorithm::ES256, "ec-1", &spec()),
        ),
        (
            "unknown kid",
            mint(&keys.ec, Algorithm::ES256, "ec-2", &spec()),
        ),
        (
            "RSA key under the EC kid",
            mint(&keys.rsa, Algorithm::RS256, "ec-1", &spec()),
        ),
        ("HS256 (symmetric) token", hs256),
        ("not a JWT", "not-a-jwt".into()),
    ];
    let subjects = [
        "alice",
        "system:serviceaccount:foo",
        "system:serviceaccount:foo:bar:baz",
        "system:serviceaccount::bar",
        "system:serviceaccount:Foo:bar",
        "system:node:foo:bar",
    ];
    let mut refused = 0;
    for (name, token) in tokens {
        assert_eq!(
            request(&mut client, plain_csr(), &bearer(token))
                .await
                .unwrap_err(),
            (Code::Unauthenticated, AUTHN_FAILURE.to_string()),
            "{name}"
        );
        refused += 1;
    }
    for sub in subjects {
        let token = es256(&keys, &TokenSpec { sub, ..spec() });
        assert_eq!(
            request(&mut client, plain_csr(), &bearer(token))
                .await
                .unwrap_err(),
            (Code::Unauthenticated, AUTHN_FAILURE.to_string()),
            "sub {sub:?}"
        );
        refused += 1;
    }
    // Headers the client helper cannot send: no token, other schemes, wrong case.
    let good = es256(&keys, &spec());
    let lowercase = format!("bearer {good}");
    let headers: [(&str, Vec<(&'static str, &str)>); 3] = [
        ("no authorization header", vec![]),
        ("Basic scheme", vec![("authorization", "Basic x")]),
        (
            "lower-case bearer",
            vec![("authorization", lowercase.as_str())],
        ),
    ];
    for (name, headers) in headers {
        let result = send_raw(
            &mut client,
            IstioCertificateRequest {
                csr: plain_csr(),
                validity_duration: 0,
                metadata: None,
            },
            &headers,
        )
        .await;
        assert_eq!(
            result.unwrap_err(),
            (Code::Unauthenticated, AUTHN_FAILURE.to_string()),
            "{name}"
        );
        refused += 1;
    }
    assert_eq!(
        metric(&server, "citadel_server_authentication_failure_count")
            .await
            .as_deref(),
        Some(refused.to_string().as_str())
    );
    assert_eq!(
        server.metrics.authentication_failure_count.get(),
        refused as u64
    );
    // The first Bearer value wins even after a Basic one; and the server still issues.
    let chain = send_raw(
        &mut client,
        IstioCertificateRequest {
            csr: plain_csr(),
            validity_duration: 0,
            metadata: None,
        },
        &[
            ("authorization", "Basic x"),
            ("authorization", format!("Bearer {good}").as_str()),
        ],
    )
    .await
    .unwrap();
    assert_eq!(leaf_facts(&chain[0]).uris, [JWT_ID]);
    verify_both_ways(&chain);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_at_sign_in_the_trust_domain_becomes_a_dot() {
    let keys = JwtKeys::new();
    let server = jwt_server(&keys, samples(), &["--trust-domain", "a@b"]).await;
    let mut client = server.client().await;
    let chain = request(
        &mut client,
        plain_csr(),
        &bearer(es256(&keys, &TokenSpec::default())),
    )
    .await
    .unwrap();
    assert_eq!(
        leaf_facts(&chain[0]).uris,
        ["spiffe://a.b/ns/foo/sa/httpbin"]
    );
    verify_both_ways(&chain);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_custom_jwt_audience_replaces_istio_ca() {
    let keys = JwtKeys::new();
    let server = jwt_server(&keys, samples(), &["--jwt-audience", "custom-aud"]).await;
    let mut client = server.client().await;
    let custom = es256(
        &keys,
        &TokenSpec {
            aud: "custom-aud",
            ..TokenSpec::default()
        },
    );
    let chain = request(&mut client, plain_csr(), &bearer(custom))
        .await
        .unwrap();
    assert_eq!(leaf_facts(&chain[0]).uris, [JWT_ID]);
    verify_both_ways(&chain);
    assert_eq!(
        request(
            &mut client,
            plain_csr(),
            &bearer(es256(&keys, &TokenSpec::default()))
        )
        .await
        .unwrap_err(),
        (Code::Unauthenticated, AUTHN_FAILURE.to_string()),
        "the default audience istio-ca is no longer accepted"
    );
    server.stop().await;
}

// ---------------------------------------------------------------- mTLS renewal

#[tokio::test(flavor = "multi_thread")]
async fn a_workload_renews_over_mtls_with_its_certificate_and_no_token() {
    let keys = JwtKeys::new();
    let server = jwt_server(&keys, samples(), &[]).await;
    let (chain, key) = jwt_issued(&server, &keys).await;
    let mut mtls = server
        .client_with(Some(client_identity(&chain, &key)))
        .await;
    let new_key = p256();
    let renewed = request(
        &mut mtls,
        csr(&new_key, None, CsrShape::Ztunnel),
        &RequestOptions::default(),
    )
    .await
    .unwrap();
    let facts = leaf_facts(&renewed[0]);
    assert_eq!(facts.uris, [JWT_ID]);
    assert_ne!(facts.serial, leaf_facts(&chain[0]).serial);
    verify_both_ways(&renewed);
    // And again with the renewed certificate.
    let mut again = server
        .client_with(Some(client_identity(&renewed, &new_key)))
        .await;
    let chain3 = request(&mut again, plain_csr(), &RequestOptions::default())
        .await
        .unwrap();
    assert_eq!(leaf_facts(&chain3[0]).uris, [JWT_ID]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_wins_over_a_token_for_another_identity() {
    let keys = JwtKeys::new();
    let server = jwt_server(&keys, samples(), &[]).await;
    let (chain, key) = jwt_issued(&server, &keys).await;
    let mut mtls = server
        .client_with(Some(client_identity(&chain, &key)))
        .await;
    let other = es256(
        &keys,
        &TokenSpec {
            sub: "system:serviceaccount:bar:other",
            ..TokenSpec::default()
        },
    );
    let expired_other = es256(
        &keys,
        &TokenSpec {
            sub: "system:serviceaccount:bar:other",
            exp_in: -3600,
            nbf_in: -7200,
            ..TokenSpec::default()
        },
    );
    for token in [other, expired_other] {
        let renewed = request(&mut mtls, plain_csr(), &bearer(token))
            .await
            .unwrap();
        assert_eq!(leaf_facts(&renewed[0]).uris, [JWT_ID]);
        verify_both_ways(&renewed);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_from_another_ca_is_refused() {
    let keys = JwtKeys::new();
    let server = jwt_server(&keys, samples(), &[]).await;
    // Same identity, issued by the P-256 CA in certs/ which this server does not trust.
    let foreign_ca = jwt_server(&keys, std::path::Path::new(CERTS), &[]).await;
    let (foreign_chain, foreign_key) = jwt_issued(&foreign_ca, &keys).await;
    assert_eq!(leaf_facts(&foreign_chain[0]).uris, [JWT_ID]);
    foreign_ca.stop().await;

    let connected = plugca::client::connect(&Connection {
        addr: server.grpc.to_string(),
        root_cert_pem: server.root_pem.clone(),
        server_name: None,
        client_identity: Some(client_identity(&foreign_chain, &foreign_key)),
        timeout: Duration::from_secs(20),
    })
    .await;
    // Refused in the TLS handshake: either connecting or the first call fails.
    if let Ok(mut client) = connected {
        let result = plugca::client::create_certificate(
            &mut client,
            plain_csr(),
            &RequestOptions::default(),
        )
        .await;
        assert!(result.is_err(), "a foreign client certificate was accepted");
    }
    assert_eq!(server.metrics.success_cert_issuance_count.get(), 0);
    // The server still serves well-behaved clients.
    let (chain, _) = jwt_issued(&server, &keys).await;
    verify_both_ways(&chain);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_from_our_ca_for_another_trust_domain_is_unauthenticated() {
    let keys = JwtKeys::new();
    let server = jwt_server(&keys, samples(), &[]).await;
    // Same CA files, other trust domain: the TLS layer accepts the certificate.
    let other_td = jwt_server(&keys, samples(), &["--trust-domain", "other.td"]).await;
    let (chain, key) = jwt_issued(&other_td, &keys).await;
    assert_eq!(
        leaf_facts(&chain[0]).uris,
        ["spiffe://other.td/ns/foo/sa/httpbin"]
    );
    other_td.stop().await;
    let mut mtls = server
        .client_with(Some(client_identity(&chain, &key)))
        .await;
    assert_eq!(
        request(&mut mtls, plain_csr(), &RequestOptions::default())
            .await
            .unwrap_err(),
        (Code::Unauthenticated, AUTHN_FAILURE.to_string())
    );
    server.stop().await;
}

// ---------------------------------------------------------------- lab mode

#[tokio::test(flavor = "multi_thread")]
async fn lab_mode_issues_the_csr_identity_when_it_is_in_the_trust_domain() {
    let server = Server::start(&server_args(samples(), &["--insecure-trust-csr-identity"])).await;
    let mut client = server.client().await;
    let chain = request(
        &mut client,
        csr(&p256(), Some(LAB_ID), CsrShape::Ztunnel),
        &lab(0),
    )
    .await
    .unwrap();
    assert_eq!(leaf_facts(&chain[0]).uris, [LAB_ID]);
    verify_both_ways(&chain);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn lab_mode_refuses_csrs_without_exactly_one_spiffe_id_in_the_trust_domain() {
    let server = Server::start(&server_args(samples(), &["--insecure-trust-csr-identity"])).await;
    let mut client = server.client().await;
    let cases: [(&str, Vec<&str>); 5] = [
        (
            "other trust domain",
            vec!["spiffe://other.td/ns/foo/sa/bar"],
        ),
        (
            "two URI SANs",
            vec![LAB_ID, "spiffe://cluster.local/ns/foo/sa/baz"],
        ),
        ("no SAN", vec![]),
        ("not SPIFFE", vec!["https://cluster.local/ns/foo/sa/bar"]),
        (
            "empty path segment",
            vec!["spiffe://cluster.local/ns//sa/bar"],
        ),
    ];
    let count = cases.len();
    for (name, uris) in cases {
        assert_eq!(
            request(&mut client, csr_with(&p256(), None, &uris), &lab(0))
                .await
                .unwrap_err(),
            (Code::Unauthenticated, AUTHN_FAILURE.to_string()),
            "{name}"
        );
    }
    assert_eq!(
        metric(&server, "citadel_server_authentication_failure_count")
            .await
            .as_deref(),
        Some(count.to_string().as_str())
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_lab_mode_and_jwt_a_valid_token_wins_over_the_csr_san() {
    let keys = JwtKeys::new();
    let server = jwt_server(&keys, samples(), &["--insecure-trust-csr-identity"]).await;
    let mut client = server.client().await;
    let chain = request(
        &mut client,
        csr(&p256(), Some(LAB_ID), CsrShape::Ztunnel),
        &bearer(es256(&keys, &TokenSpec::default())),
    )
    .await
    .unwrap();
    assert_eq!(leaf_facts(&chain[0]).uris, [JWT_ID]);
    verify_both_ways(&chain);

    // As the flag documents, lab mode is the fallback when no authenticator accepts:
    // a refused token leaves the CSR's identity.
    let expired = es256(
        &keys,
        &TokenSpec {
            exp_in: -3600,
            nbf_in: -7200,
            ..TokenSpec::default()
        },
    );
    let chain = request(
        &mut client,
        csr(&p256(), Some(LAB_ID), CsrShape::Ztunnel),
        &bearer(expired),
    )
    .await
    .unwrap();
    assert_eq!(leaf_facts(&chain[0]).uris, [LAB_ID]);
    server.stop().await;
}
