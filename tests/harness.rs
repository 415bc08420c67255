//! The in-process CA for test harnesses (`plugca::testing`, feature
//! `testing`) and fault injection, from Rust and from the binary.
#![cfg(feature = "testing")]

mod common;

use std::time::{Duration, Instant};

use common::*;
use plugca::client::{CsrShape, RequestOptions};
use plugca::server::harness::Fault;
use plugca::testing::TestCa;

/// The README example: a real CA in one call, a token, a certificate.
#[tokio::test(flavor = "multi_thread")]
async fn a_test_suite_gets_a_real_ca_with_one_call() {
    let ca = TestCa::builder().jwt().start().await.unwrap();
    let mut client = ca.client().await.unwrap();
    let key = p256();
    let token = ca.mint_token("foo", "httpbin");
    let chain = request(
        &mut client,
        csr(&key, None, CsrShape::Ztunnel),
        &bearer(token),
    )
    .await
    .unwrap();
    assert_eq!(chain.last().unwrap(), ca.root_pem());
    webpki_verify(&chain);
    let issued = ca.issued();
    assert_eq!(issued.len(), 1);
    assert_eq!(
        issued[0].sans,
        [format!("URI:{}", ca.spiffe_id("foo", "httpbin"))]
    );
    assert_eq!(issued[0].leaf_pem, chain[0]);
    // An expired token is refused like a real CA refuses it.
    let expired = ca.mint_token_with("foo", "httpbin", "istio-ca", -3600);
    let err = request(
        &mut client,
        csr(&key, None, CsrShape::Ztunnel),
        &bearer(expired),
    )
    .await
    .unwrap_err();
    assert_eq!(err.0, tonic::Code::Unauthenticated);
    ca.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_fault_misbehaves_as_named_and_queued_faults_apply_once() {
    let ca = TestCa::builder().bundle(CERTS).start().await.unwrap();
    let mut client = ca.client().await.unwrap();
    let id = ca.spiffe_id("foo", "bar");
    let key = p256();
    let ask = |ttl| {
        let csr_pem = csr(&key, Some(&id), CsrShape::Ztunnel);
        (csr_pem, lab(ttl))
    };

    ca.faults()
        .push_next(vec!["refuse:unavailable:CA down".parse().unwrap()]);
    let (c, o) = ask(0);
    let err = request(&mut client, c, &o).await.unwrap_err();
    assert_eq!(err, (tonic::Code::Unavailable, "CA down".to_string()));
    let (c, o) = ask(0);
    assert_eq!(
        request(&mut client, c, &o).await.unwrap().len(),
        3,
        "queued faults apply once"
    );

    ca.faults().push_next(vec![Fault::EmptyChain]);
    let (c, o) = ask(0);
    assert!(request(&mut client, c, &o).await.unwrap().is_empty());

    ca.faults().push_next(vec![Fault::LeafOnly]);
    let (c, o) = ask(0);
    assert_eq!(request(&mut client, c, &o).await.unwrap().len(), 1);

    ca.faults()
        .push_next(vec![Fault::Latency(Duration::from_millis(300))]);
    let started = Instant::now();
    let (c, o) = ask(0);
    request(&mut client, c, &o).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "latency was injected"
    );

    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    ca.faults().push_next(vec![Fault::Expired]);
    let (c, o) = ask(0);
    let chain = request(&mut client, c, &o).await.unwrap();
    assert!(leaf_facts(&chain[0]).not_after < now);
    let (ok, text) = openssl_verify(&chain, "sslclient");
    assert!(!ok && text.contains("expired"), "{text}");

    ca.faults().push_next(vec![Fault::NotYetValid]);
    let (c, o) = ask(0);
    let chain = request(&mut client, c, &o).await.unwrap();
    let (ok, text) = openssl_verify(&chain, "sslclient");
    assert!(!ok && text.contains("not yet valid"), "{text}");

    ca.faults()
        .push_next(vec![Fault::ShortTtl(Duration::from_secs(5))]);
    let (c, o) = ask(3600);
    let chain = request(&mut client, c, &o).await.unwrap();
    assert_eq!(leaf_facts(&chain[0]).lifetime_secs, 5 + 120);

    ca.faults().push_next(vec![Fault::WrongKey]);
    let (c, o) = ask(0);
    let chain = request(&mut client, c, &o).await.unwrap();
    let leaf_der = der_of(&chain[0]).remove(0);
    let (_, leaf) = <x509_parser::certificate::X509Certificate as x509_parser::prelude::FromDer<
        _,
    >>::from_der(&leaf_der)
    .unwrap();
    assert_ne!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    webpki_verify(&chain);

    // Global faults apply to every request until cleared.
    ca.faults().set_global(vec![Fault::LeafOnly]);
    for _ in 0..2 {
        let (c, o) = ask(0);
        assert_eq!(request(&mut client, c, &o).await.unwrap().len(), 1);
    }
    ca.faults().clear();
    let (c, o) = ask(0);
    assert_eq!(request(&mut client, c, &o).await.unwrap().len(), 3);
    ca.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn non_rust_harnesses_reach_the_faults_through_flags_and_the_admin_endpoint() {
    let server = Server::start(&[
        "--cacerts-dir",
        CERTS,
        "--insecure-trust-csr-identity",
        "--fault",
        "refuse:resource-exhausted",
    ])
    .await;
    let mut client = server.client().await;
    let id = "spiffe://cluster.local/ns/foo/sa/bar";
    let err = request(
        &mut client,
        csr(&p256(), Some(id), CsrShape::Ztunnel),
        &RequestOptions::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.0, tonic::Code::ResourceExhausted);

    assert_eq!(
        http_send(server.monitoring, "PUT", "/faults", "leaf-only")
            .await
            .0,
        200
    );
    let chain = request(
        &mut client,
        csr(&p256(), Some(id), CsrShape::Ztunnel),
        &RequestOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(chain.len(), 1);
    assert_eq!(
        http_send(server.monitoring, "PUT", "/faults", "explode")
            .await
            .0,
        400
    );
    assert_eq!(
        http_send(server.monitoring, "DELETE", "/faults", "")
            .await
            .0,
        200
    );
    assert_eq!(
        http_send(server.monitoring, "POST", "/faults/next", "empty-chain")
            .await
            .0,
        200
    );
    let chain = request(
        &mut client,
        csr(&p256(), Some(id), CsrShape::Ztunnel),
        &RequestOptions::default(),
    )
    .await
    .unwrap();
    assert!(chain.is_empty());
    let chain = request(
        &mut client,
        csr(&p256(), Some(id), CsrShape::Ztunnel),
        &RequestOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(chain.len(), 3);
    let (status, body) = server.http_get("/issued").await;
    assert_eq!(status, 200);
    let issued: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(issued.as_array().unwrap().len(), 3);
    server.stop().await;

    // Without fault injection the admin endpoints do not exist.
    let plain = Server::start(&["--cacerts-dir", CERTS]).await;
    assert_eq!(
        http_send(plain.monitoring, "PUT", "/faults", "leaf-only")
            .await
            .0,
        404
    );
    assert_eq!(plain.http_get("/issued").await.0, 404);
    plain.stop().await;
}

async fn http_send(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    (text[9..12].parse().unwrap(), text)
}

/// Issue 12, item 9: fault injection cannot mint a leaf longer than
/// `--max-ttl`, through any of its three doors.
#[tokio::test(flavor = "multi_thread")]
async fn ttl_faults_never_exceed_max_ttl() {
    // At start: a usage error naming both flags (a server that starts
    // instead is killed after 30 s and fails the test).
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_plugca"))
        .args([
            "serve",
            "--cacerts-dir",
            CERTS,
            "--grpc-addr",
            "127.0.0.1:0",
            "--monitoring-addr",
            "127.0.0.1:0",
            "--max-ttl",
            "1h",
            "--fault",
            "ttl:48h",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (status, stderr) = common::refusal_of(
        child,
        Duration::from_secs(30),
        "plugca serve started with a ttl: fault past --max-ttl",
    );
    assert_eq!(status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("--fault (env PLUGCA_FAULTS): \"ttl:48h\": fault ttl:48h0m0s is longer than --max-ttl 1h0m0s"),
        "{stderr}"
    );

    let ca = TestCa::builder()
        .arg("--max-ttl")
        .arg("1h")
        .start()
        .await
        .unwrap();
    // The admin endpoints refuse it (global and queued).
    for (method, path) in [("PUT", "/faults"), ("POST", "/faults/next")] {
        let (status, text) = http_send(ca.monitoring_addr(), method, path, "ttl:2h").await;
        assert_eq!(status, 400, "{method} {path}: {text}");
        assert!(text.contains("longer than --max-ttl 1h0m0s"), "{text}");
    }
    // The Rust API cannot be refused; the signer clamps to --max-ttl.
    ca.faults()
        .set_global(vec![Fault::ShortTtl(Duration::from_secs(48 * 3600))]);
    let mut client = ca.client().await.unwrap();
    let chain = request(
        &mut client,
        csr(&p256(), Some(LAB_ID), CsrShape::Ztunnel),
        &lab(0),
    )
    .await
    .unwrap();
    let facts = leaf_facts(&chain[0]);
    let left = facts.not_after - time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(
        left <= 3600,
        "the leaf lives {left} s more, past --max-ttl 1h"
    );
    assert!(left > 3500, "clamped to --max-ttl, not refused: {left} s");
    // A ttl: fault within --max-ttl still shapes the leaf.
    ca.faults()
        .set_global(vec![Fault::ShortTtl(Duration::from_secs(600))]);
    let chain = request(
        &mut client,
        csr(&p256(), Some(LAB_ID), CsrShape::Ztunnel),
        &lab(0),
    )
    .await
    .unwrap();
    let left = leaf_facts(&chain[0]).not_after - time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((590..=600).contains(&left), "{left}");
    ca.shutdown().await;
}
