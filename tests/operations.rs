//! Running the CA: overload answers RESOURCE_EXHAUSTED quickly while /ready
//! stays answered, SIGTERM drains in-flight requests, gRPC health and
//! reflection are served, and input bounds hold.

mod common;

use std::time::{Duration, Instant};

use common::*;
use plugca::client::CsrShape;
use plugca::testing::http_get;

const ID: &str = "spiffe://cluster.local/ns/foo/sa/bar";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn excess_requests_get_resource_exhausted_before_the_slow_one_finishes() {
    let server = Server::start(&[
        "--cacerts-dir",
        CERTS,
        "--insecure-trust-csr-identity",
        "--max-concurrent-signs",
        "1",
        "--sign-queue-timeout",
        "100ms",
        "--enable-fault-injection",
    ])
    .await;
    let mut client = server.client().await;
    // The first request holds the only signing slot for 1.5 s.
    server_faults_next(&server, "latency:1500ms").await;
    let slow = {
        let mut c = client.clone();
        tokio::spawn(async move {
            let r = request(&mut c, csr(&p256(), Some(ID), CsrShape::Ztunnel), &lab(0)).await;
            (r, Instant::now())
        })
    };
    // Wait until it is in flight.
    let mut seen_in_flight = false;
    for _ in 0..1000 {
        let (_, text) = server.http_get("/metrics").await;
        if text.contains("plugca_inflight_requests 1") {
            seen_in_flight = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen_in_flight, "the slow request never became in flight");
    let mut refused = Vec::new();
    for _ in 0..4 {
        let mut c = client.clone();
        refused.push(tokio::spawn(async move {
            let r = request(&mut c, csr(&p256(), Some(ID), CsrShape::Ztunnel), &lab(0)).await;
            (r, Instant::now())
        }));
    }
    // Readiness is answered while the signer is saturated.
    let (status, body) = server.http_get("/ready").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let mut refused_at = Vec::new();
    for r in refused {
        let (result, at) = r.await.unwrap();
        let (code, message) = result.unwrap_err();
        assert_eq!(code, tonic::Code::ResourceExhausted, "{message}");
        assert!(message.contains("retry"), "{message}");
        refused_at.push(at);
    }
    let (slow_result, slow_done) = slow.await.unwrap();
    webpki_verify(&slow_result.unwrap());
    assert!(
        refused_at.iter().all(|t| *t < slow_done),
        "refusals did not wait for the slot"
    );
    // And the server still issues afterwards.
    webpki_verify(
        &request(
            &mut client,
            csr(&p256(), Some(ID), CsrShape::Ztunnel),
            &lab(0),
        )
        .await
        .unwrap(),
    );
    let (_, text) = server.http_get("/metrics").await;
    assert!(
        text.contains("plugca_request_duration_seconds_count{outcome=\"overloaded\"} 4"),
        "{text}"
    );
    server.stop().await;
}

async fn server_faults_next(server: &Server, spec: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(server.monitoring)
        .await
        .unwrap();
    let req = format!(
        "POST /faults/next HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{spec}",
        spec.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    assert!(buf.starts_with(b"HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_in_flight_requests_then_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_plugca"))
        .args([
            "serve",
            "--cacerts-dir",
            CERTS,
            "--grpc-addr",
            "127.0.0.1:0",
            "--monitoring-addr",
            "127.0.0.1:0",
            "--insecure-trust-csr-identity",
            "--enable-fault-injection",
        ])
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Read the bound addresses from the log.
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut grpc, mut mon) = (None, None);
    while grpc.is_none() || mon.is_none() {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("log line");
        let plain = strip_ansi(&line);
        if plain.contains("listening") {
            grpc = field(&plain, "grpc=");
            mon = field(&plain, "monitoring=");
        }
    }
    let (grpc, mon): (std::net::SocketAddr, std::net::SocketAddr) = (
        grpc.unwrap().parse().unwrap(),
        mon.unwrap().parse().unwrap(),
    );
    let stderr_task = tokio::spawn(async move {
        let mut all = String::new();
        while let Ok(Some(l)) = lines.next_line().await {
            all.push_str(&strip_ansi(&l));
            all.push('\n');
        }
        all
    });
    let root = std::fs::read_to_string(format!("{CERTS}/root-cert.pem")).unwrap();
    let mut client = plugca::client::connect(&plugca::client::Connection {
        addr: grpc.to_string(),
        root_cert_pem: root,
        server_name: None,
        client_identity: None,
        timeout: Duration::from_secs(20),
    })
    .await
    .unwrap();
    let _ = write_temp(dir.path(), "unused", "");
    let body = "latency:1s";
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(mon).await.unwrap();
        s.write_all(format!("POST /faults/next HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
    }
    let in_flight = tokio::spawn(async move {
        request(
            &mut client,
            csr(&p256(), Some(ID), CsrShape::Ztunnel),
            &lab(0),
        )
        .await
    });
    let mut seen_in_flight = false;
    for _ in 0..1000 {
        let (_, text) = http_get(mon, "/metrics").await;
        if text.contains("plugca_inflight_requests 1") {
            seen_in_flight = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen_in_flight, "the slow request never became in flight");
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let chain = in_flight
        .await
        .unwrap()
        .expect("the in-flight request completes");
    webpki_verify(&chain);
    let exit = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.code(), Some(0));
    let log = stderr_task.await.unwrap();
    assert!(
        log.contains("draining in-flight requests") && log.contains("drained"),
        "{log}"
    );
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(grpc).await.is_err());
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c2 in chars.by_ref() {
                if c2.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(key)? + key.len();
    Some(line[start..].split_whitespace().next()?.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_health_and_reflection_are_served_on_the_grpc_port() {
    let server = Server::start(&["--cacerts-dir", CERTS]).await;
    // tonic's client TLS uses rustls' process default provider.
    plugca::tls::crypto_provider();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&server.root_pem));
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", server.grpc))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "istio.v1.auth.IstioCertificateService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let msg = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"istio.v1.auth.IstioCertificateService".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_requests_are_refused_and_the_server_keeps_serving() {
    let server = Server::start(&["--cacerts-dir", CERTS, "--insecure-trust-csr-identity"]).await;
    let mut client = server.client().await;
    // Over the gRPC message limit.
    let huge = "A".repeat(plugca::app::MAX_GRPC_MESSAGE_BYTES + 1024);
    let err = request(&mut client, huge, &lab(0)).await.unwrap_err();
    assert!(
        matches!(
            err.0,
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted | tonic::Code::InvalidArgument
        ),
        "{err:?}"
    );
    // Under the message limit but over the CSR limit.
    let big = "A".repeat(plugca::csr::MAX_CSR_BYTES + 1);
    let err = request(&mut client, big, &lab(0)).await.unwrap_err();
    assert_eq!(err.0, tonic::Code::InvalidArgument);
    assert!(err.1.contains("larger than"), "{}", err.1);
    // A chain of junk PEM blocks does not panic the server.
    let junk = "-----BEGIN CERTIFICATE REQUEST-----\n!!!!\n-----END CERTIFICATE REQUEST-----\n"
        .repeat(100);
    let err = request(&mut client, junk, &lab(0)).await.unwrap_err();
    assert_eq!(err.0, tonic::Code::InvalidArgument);
    webpki_verify(
        &request(
            &mut client,
            csr(&p256(), Some(ID), CsrShape::Ztunnel),
            &lab(0),
        )
        .await
        .unwrap(),
    );
    server.stop().await;
}

/// Copies an istiod-layout bundle made by plugca's generator into `dir`.
fn write_generated_bundle(dir: &std::path::Path, cn: &str) -> Vec<u8> {
    use plugca::ca::generate::{self, CaSpec, KeyChoice};
    let now = time::OffsetDateTime::now_utc();
    let spec = |cn: &str, path_len| CaSpec {
        organization: Some("sighup test".into()),
        common_name: Some(cn.into()),
        locality: None,
        not_before: now - time::Duration::minutes(5),
        not_after: now + time::Duration::days(30),
        path_len,
        dns_sans: vec![],
    };
    let root = generate::self_signed_root(
        &spec("root", None),
        generate::generate_key(KeyChoice::P256).unwrap(),
    )
    .unwrap();
    let ca = generate::intermediate(
        &spec(cn, Some(0)),
        generate::generate_key(KeyChoice::P256).unwrap(),
        &root.cert_der,
        &root.key,
    )
    .unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), &ca.cert_pem).unwrap();
    std::fs::write(dir.join("ca-key.pem"), ca.key.secret_pkcs8_pem().as_bytes()).unwrap();
    std::fs::write(dir.join("cert-chain.pem"), &ca.cert_pem).unwrap();
    std::fs::write(dir.join("root-cert.pem"), &root.cert_pem).unwrap();
    ca.cert_der
}

/// The cacerts files are symlinks into a directory plugca does not watch, so
/// only SIGHUP can make it notice the change. Logs are JSON: the audit lines
/// carry the issuance facts and no secrets.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_forces_a_reload_and_json_audit_lines_carry_the_facts() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real");
    let watched = tmp.path().join("cacerts");
    write_generated_bundle(&real, "first");
    std::fs::create_dir_all(&watched).unwrap();
    for f in [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ] {
        std::os::unix::fs::symlink(real.join(f), watched.join(f)).unwrap();
    }
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_plugca"))
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--monitoring-addr",
            "127.0.0.1:0",
        ])
        .args([
            "--insecure-trust-csr-identity",
            "--log-format",
            "json",
            "--reload-interval",
            "1h",
        ])
        .arg("--cacerts-dir")
        .arg(&watched)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut next_json = async move || -> serde_json::Value {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("a log line within 20 s")
            .unwrap()
            .expect("the server is still running");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    };
    let listening = loop {
        let v = next_json().await;
        if v["fields"]["message"] == "listening" {
            break v;
        }
    };
    let grpc: std::net::SocketAddr = listening["fields"]["grpc"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let root_pem = std::fs::read_to_string(real.join("root-cert.pem")).unwrap();
    let issue = async |roots: &str| {
        let mut client = plugca::client::connect(&plugca::client::Connection {
            addr: grpc.to_string(),
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
            &lab(3600),
        )
        .await
        .unwrap()
    };
    let chain = issue(&root_pem).await;
    let audit = loop {
        let v = next_json().await;
        if v["target"] == "plugca::audit" {
            break v;
        }
    };
    let f = &audit["fields"];
    assert_eq!(f["outcome"], "issued");
    assert_eq!(f["identity"], ID);
    assert_eq!(f["sans"], format!("URI:{ID}"));
    assert_eq!(f["unproven"], true);
    let serial = f["serial"].as_str().unwrap();
    assert_eq!(serial.len(), 32);
    assert!(f["not_after"].as_str().is_some() && f["ca_key_id"].as_str().is_some());
    let text = audit.to_string();
    assert!(!text.contains("BEGIN"), "no PEM in the audit line: {text}");

    // Change the real files: nothing in the watched directory changes.
    let second = write_generated_bundle(&real, "second");
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let reloaded = loop {
        let v = next_json().await;
        if v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("CA bundle reload"))
        {
            break v;
        }
    };
    assert_eq!(reloaded["fields"]["trigger"], "SIGHUP", "{reloaded}");
    // The new bundle has a new root: the reload was refused as a disjoint root change.
    assert_eq!(reloaded["level"], "ERROR", "{reloaded}");
    assert!(
        reloaded["fields"]["error"]
            .as_str()
            .unwrap()
            .contains("--allow-root-replacement")
    );
    webpki_verify(&issue(&root_pem).await);
    assert_ne!(der_of(&chain[1])[0].as_ref(), second.as_slice());
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    let exit = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.code(), Some(0));
}
