//! `plugca verify`: the built binary checks a workload's chain the way Istio's
//! "Plugging in existing CA Certificates" task does, fetched over real TLS
//! from a workload-shaped server or read from a PEM file.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;

use common::*;
use plugca::client::CsrShape;

const PLUGCA: &str = env!("CARGO_BIN_EXE_plugca");
const IDENTITY: &str = "spiffe://cluster.local/ns/foo/sa/httpbin";

/// Like a sidecar in STRICT mTLS: a client certificate is required. Over
/// TLS 1.2 the handshake fails after the server certificate was sent.
async fn serve_mtls12(chain: &[String], key_der: Vec<u8>) -> SocketAddr {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for r in der_of(chain.last().unwrap()) {
        roots.add(r).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_client_cert_verifier(verifier);
    serve_tls(config, chain, key_der).await
}

/// Issues a lab-mode certificate for IDENTITY from a server on `cacerts`
/// and serves it over TLS; returns the response chain and the address.
async fn workload_from(cacerts: &str) -> (Vec<String>, SocketAddr) {
    let (chain, key) = issue(cacerts).await;
    let addr = serve_workload_tls(&chain, key.serialize_der()).await;
    (chain, addr)
}

async fn issue(cacerts: &str) -> (Vec<String>, rcgen::KeyPair) {
    let server = Server::start(&["--cacerts-dir", cacerts, "--insecure-trust-csr-identity"]).await;
    let mut client = server.client().await;
    let key = p256();
    let chain = request(
        &mut client,
        csr(&key, Some(IDENTITY), CsrShape::Ztunnel),
        &lab(3600),
    )
    .await
    .unwrap();
    server.stop().await;
    (chain, key)
}

/// Runs `plugca verify ARGS`; returns the exit code and stdout + stderr.
async fn verify(args: Vec<String>) -> (i32, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(PLUGCA)
            .arg("verify")
            .args(&args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap(), text)
    })
    .await
    .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[track_caller]
fn assert_has(report: &str, needles: &[&str]) {
    for n in needles {
        assert!(report.contains(n), "missing {n:?} in:\n{report}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chain_issued_by_the_plugged_samples_passes_every_step_over_tls() {
    let (chain, addr) = workload_from(SAMPLES).await;
    assert_eq!(chain.len(), 3);
    let (code, report) = verify(args(&[
        "--connect",
        &addr.to_string(),
        "--cacerts-dir",
        SAMPLES,
    ]))
    .await;
    assert_eq!(code, 0, "{report}");
    assert_has(
        &report,
        &[
            &format!("chain presented by {addr} (3 certificate(s)):"),
            &format!("SAN     URI:{IDENTITY}"),
            "PASS the CA certificate (cert 2) is the plugged ca-cert.pem\n",
            "PASS the root certificate (cert 3) is the plugged root-cert.pem #1\n",
            "PASS the workload certificate (cert 1) verifies against the plugged ca-cert.pem and root-cert.pem (webpki, serverAuth and clientAuth)\n",
            "PASS the workload certificate (cert 1) is valid now: ",
            &format!("PASS the workload identity (cert 1 URI SAN) is {IDENTITY}\n"),
            "result: all 5 checks passed",
        ],
    );
    assert!(!report.contains("FAIL"), "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_requiring_a_client_certificate_still_shows_its_chain() {
    let (chain, key) = issue(SAMPLES).await;
    let addr = serve_mtls12(&chain, key.serialize_der()).await;
    let (code, report) = verify(args(&[
        "--connect",
        &addr.to_string(),
        "--cacerts-dir",
        SAMPLES,
    ]))
    .await;
    assert_eq!(code, 0, "{report}");
    assert_has(
        &report,
        &[
            "note: the handshake failed after the certificate was received",
            "result: all 5 checks passed",
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chain_from_another_ca_fails_with_exit_1() {
    // certs/ is the project's own test CA, not Istio's samples.
    let (_, addr) = workload_from(CERTS).await;
    let (code, report) = verify(args(&[
        "--connect",
        &addr.to_string(),
        "--server-name",
        "httpbin.foo.svc.cluster.local",
        "--cacerts-dir",
        SAMPLES,
    ]))
    .await;
    assert_eq!(code, 1, "{report}");
    assert_has(
        &report,
        &[
            "FAIL the CA certificate (cert 2) is not the plugged ca-cert.pem\n",
            "     ca-cert.pem is \"C=US, ST=California, L=Sunnyvale, O=Istio, CN=Istio CA\"",
            "FAIL the root certificate (cert 3) is not in the plugged root-cert.pem\n",
            "FAIL the workload certificate (cert 1) verifies against the plugged ca-cert.pem and root-cert.pem\n",
            "serverAuth: UnknownIssuer",
            &format!("PASS the workload identity (cert 1 URI SAN) is {IDENTITY}"),
            "result: 3 of 5 checks FAILED",
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chain_saved_to_a_file_verifies_like_the_connected_one() {
    let (chain, _) = workload_from(SAMPLES).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_temp(dir.path(), "presented.pem", &chain.concat());
    let (code, report) = verify(args(&[
        &file.display().to_string(),
        "--cacerts-dir",
        SAMPLES,
    ]))
    .await;
    assert_eq!(code, 0, "{report}");
    assert_has(&report, &["result: all 5 checks passed"]);

    // Istio's sample workload chain: leaf + ca-cert, no root presented.
    let (code, report) = verify(args(&[
        &format!("{SAMPLES}/workload-foo-cert.pem"),
        "--cacerts-dir",
        SAMPLES,
    ]))
    .await;
    assert_eq!(code, 0, "{report}");
    assert_has(
        &report,
        &[
            "PASS the chain's root (not presented; issuer of cert 2) is the plugged root-cert.pem #1",
            "PASS the workload identity (cert 1 URI SAN) is spiffe://trust-domain-foo/ns/foo/sa/foo",
        ],
    );

    // The same chain against the alt CA fails.
    let alt = sample_alt_set();
    let (code, report) = verify(vec![
        format!("{SAMPLES}/workload-foo-cert.pem"),
        "--cacerts-dir".into(),
        alt.path().display().to_string(),
    ])
    .await;
    assert_eq!(code, 1, "{report}");
    assert_has(
        &report,
        &["FAIL no root in the plugged root-cert.pem issued cert 2"],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unreadable_input_is_exit_2() {
    let (code, text) = verify(args(&["/nonexistent.pem", "--cacerts-dir", SAMPLES])).await;
    assert_eq!(code, 2, "{text}");
    assert_has(&text, &["/nonexistent.pem: cannot read"]);

    let (code, text) = verify(vec![
        format!("{SAMPLES}/README.md"),
        "--cacerts-dir".into(),
        SAMPLES.into(),
    ])
    .await;
    assert_eq!(code, 2, "{text}");
    assert_has(&text, &["no certificate found"]);

    let empty = tempfile::tempdir().unwrap();
    let (code, text) = verify(vec![
        format!("{SAMPLES}/workload-foo-cert.pem"),
        "--cacerts-dir".into(),
        empty.path().display().to_string(),
    ])
    .await;
    assert_eq!(code, 2, "{text}");
    assert_has(&text, &["no plugged CA files"]);

    // Nothing listens on a just-closed port.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (code, text) = verify(args(&[
        "--connect",
        &format!("127.0.0.1:{port}"),
        "--cacerts-dir",
        SAMPLES,
    ]))
    .await;
    assert_eq!(code, 2, "{text}");
    assert_has(&text, &["cannot connect to 127.0.0.1:"]);
}
