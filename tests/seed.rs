//! The seed task: plug Istio's sample CA in, request a certificate as workload
//! foo/httpbin, serve it over TLS, and verify it the way Istio's "Plugging in
//! existing CA Certificates" task does (openssl s_client -showcerts + verify).

mod common;

use std::sync::Arc;

use common::*;
use plugca::client::{CsrShape, RequestOptions};

/// The PEM blocks `openssl s_client -showcerts` printed.
fn showcerts(addr: std::net::SocketAddr) -> Vec<String> {
    let out = std::process::Command::new("openssl")
        .args(["s_client", "-showcerts", "-connect", &addr.to_string()])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    plugca::pem::parse_all(&text)
        .unwrap()
        .into_iter()
        .map(|b| format!("{}\n", b.text))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_istio_plugin_ca_task_verifies_for_foo_httpbin() {
    let keys = JwtKeys::new();
    let server = jwt_server(&keys, std::path::Path::new(SAMPLES), &[]).await;
    let mut client = server.client().await;

    let key = p256();
    let token = mint(
        &keys.ec,
        jsonwebtoken::Algorithm::ES256,
        "ec-1",
        &TokenSpec::default(),
    );
    let chain = request(
        &mut client,
        csr(&key, None, CsrShape::Ztunnel),
        &bearer(token),
    )
    .await
    .unwrap();
    assert_eq!(chain.len(), 3, "leaf, ca-cert, root: {chain:#?}");
    assert_eq!(chain[1], sample("ca-cert.pem"));
    assert_eq!(chain[2], sample("root-cert.pem"));
    assert_eq!(
        leaf_facts(&chain[0]).uris,
        ["spiffe://cluster.local/ns/foo/sa/httpbin"]
    );

    // The workload presents all elements, as istio-agent hands them to Envoy.
    let addr = serve_workload_tls(&chain, key.serialize_der()).await;
    let presented = tokio::task::spawn_blocking(move || showcerts(addr))
        .await
        .unwrap();
    assert_eq!(presented.len(), 3);
    assert_eq!(
        presented[1],
        sample("ca-cert.pem"),
        "cert 2 is the plugged ca-cert.pem"
    );
    assert_eq!(
        presented[2],
        sample("root-cert.pem"),
        "cert 3 is the plugged root-cert.pem"
    );

    // openssl verify -CAfile <(cat ca-cert.pem root-cert.pem) cert1
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write_temp(
        dir.path(),
        "ca.pem",
        &format!("{}{}", sample("ca-cert.pem"), sample("root-cert.pem")),
    );
    let cert1 = write_temp(dir.path(), "cert1.pem", &presented[0]);
    let out = std::process::Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&ca_file)
        .arg(&cert1)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.trim(), format!("{}: OK", cert1.display()));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sidecar_shaped_request_gets_a_verifying_chain() {
    let keys = JwtKeys::new();
    let server = jwt_server(&keys, std::path::Path::new(SAMPLES), &[]).await;
    let mut client = server.client().await;
    let key = rsa(2048);
    let token = mint(
        &keys.rsa,
        jsonwebtoken::Algorithm::RS256,
        "rsa-1",
        &TokenSpec::default(),
    );
    let csr_pem = csr(
        &key,
        Some("spiffe://cluster.local/ns/foo/sa/httpbin"),
        CsrShape::Sidecar,
    );
    let chain = request(
        &mut client,
        csr_pem,
        &RequestOptions {
            bearer_token: Some(token),
            cluster_id: Some("Kubernetes".into()),
            ttl_secs: 86_400,
            cert_signer_metadata: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(chain.len(), 3);
    webpki_verify(&chain);
    for purpose in ["sslclient", "sslserver"] {
        let (ok, text) = openssl_verify(&chain, purpose);
        assert!(ok, "{text}");
    }
    let facts = leaf_facts(&chain[0]);
    assert_eq!(facts.subject, "", "CSR O= is not copied");
    assert_eq!(facts.lifetime_secs, 86_400 + 120);
    server.stop().await;
}

/// A gRPC client that offers only TLS 1.3 with AES-GCM, like ztunnel.
async fn ztunnel_client(
    addr: std::net::SocketAddr,
    root_pem: &str,
) -> plugca::pb::istio_certificate_service_client::IstioCertificateServiceClient<
    tonic::transport::Channel,
> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
    ];
    let mut roots = rustls::RootCertStore::empty();
    for r in der_of(root_pem) {
        roots.add(r).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let service = tower::service_fn(move |_uri: http::Uri| {
        let connector = connector.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = rustls_pki_types::ServerName::try_from("istiod.istio-system.svc").unwrap();
            let tls = connector.connect(name, tcp).await?;
            let (_, session) = tls.get_ref();
            assert_eq!(
                session.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    let channel = tonic::transport::Endpoint::from_static("http://istiod.istio-system.svc:15012")
        .connect_with_connector(service)
        .await
        .unwrap();
    plugca::pb::istio_certificate_service_client::IstioCertificateServiceClient::new(channel)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ztunnel_shaped_request_over_tls13_aes_gcm_only_gets_a_verifying_chain() {
    let keys = JwtKeys::new();
    let server = jwt_server(&keys, std::path::Path::new(CERTS), &[]).await;
    let mut client = ztunnel_client(server.grpc, &server.root_pem).await;
    let key = p256();
    let token = mint(
        &keys.ec,
        jsonwebtoken::Algorithm::ES256,
        "ec-1",
        &TokenSpec::default(),
    );
    let chain = request(
        &mut client,
        csr(
            &key,
            Some("spiffe://cluster.local/ns/foo/sa/httpbin"),
            CsrShape::Ztunnel,
        ),
        &RequestOptions {
            bearer_token: Some(token),
            cluster_id: Some("Kubernetes".into()),
            ttl_secs: 3600,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // certs/ has cert-chain.pem = ca-cert + root: the root is not repeated in the middle.
    assert_eq!(chain.len(), 3, "{chain:#?}");
    assert_eq!(
        chain[2],
        std::fs::read_to_string(format!("{CERTS}/root-cert.pem")).unwrap()
    );
    webpki_verify(&chain);
    let (ok, text) = openssl_verify(&chain, "sslserver");
    assert!(ok, "{text}");
    let facts = leaf_facts(&chain[0]);
    assert_eq!(facts.uris, ["spiffe://cluster.local/ns/foo/sa/httpbin"]);
    assert!(facts.san_critical);
    assert_eq!(facts.lifetime_secs, 3600 + 120);
    server.stop().await;
}
