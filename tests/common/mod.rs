//! Shared fixtures and assertions for the integration tests: CA material,
//! CSRs and JWTs, and checks of issued chains with webpki and the openssl CLI
//! (second implementations). Servers come from [`plugca::testing::Server`]
//! (the real server on 127.0.0.1:0 over real TLS, started by `app::spawn`).
#![allow(dead_code)]

#[cfg(not(feature = "testing"))]
compile_error!(
    "the integration tests start servers with plugca::testing: cargo test --features testing"
);

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use plugca::ca::generate::{self, CaSpec, GeneratedCa, KeyChoice};
use plugca::client::{self, CsrShape, RequestOptions};
use plugca::jwt_issuer::{Claims, JwtIssuer};
use plugca::pb::istio_certificate_service_client::IstioCertificateServiceClient;
pub use plugca::testing::Server;
use rcgen::KeyPair;
use rustls_pki_types::{CertificateDer, UnixTime};
use tonic::transport::Channel;

pub const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/istio-sample-certs");
pub const CERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/certs");
pub const JWT_ISSUER: &str = "https://issuer.plugca.test";

pub fn sample(name: &str) -> String {
    std::fs::read_to_string(format!("{SAMPLES}/{name}")).unwrap()
}

/// A cacerts directory assembled from the sample files: (dest name, sample name).
pub fn cacerts_from_samples(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (dest, src) in files {
        std::fs::copy(format!("{SAMPLES}/{src}"), dir.path().join(dest)).unwrap();
        private_if_key(&dir.path().join(dest));
    }
    dir
}

/// Key files get mode 0600 as a deployed bundle has them (a checkout's
/// 0644 would make plugca and doctor warn about a readable key).
pub fn private_if_key(path: &Path) {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    if name.ends_with("key.pem") || name == "tls.key" {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

pub fn sample_set1() -> tempfile::TempDir {
    cacerts_from_samples(&[
        ("ca-cert.pem", "ca-cert.pem"),
        ("ca-key.pem", "ca-key.pem"),
        ("cert-chain.pem", "cert-chain.pem"),
        ("root-cert.pem", "root-cert.pem"),
    ])
}

pub fn sample_alt_set() -> tempfile::TempDir {
    cacerts_from_samples(&[
        ("ca-cert.pem", "ca-cert-alt.pem"),
        ("ca-key.pem", "ca-key-alt.pem"),
        ("cert-chain.pem", "cert-chain-alt.pem"),
        ("root-cert.pem", "root-cert-alt.pem"),
    ])
}

pub fn p256() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

/// RSA keys are slow to generate: make them with openssl.
pub fn rsa(bits: u32) -> KeyPair {
    let out = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            &format!("rsa_keygen_bits:{bits}"),
        ])
        .output()
        .unwrap();
    KeyPair::from_pem(&String::from_utf8(out.stdout).unwrap()).unwrap()
}

pub fn csr(key: &KeyPair, identity: Option<&str>, shape: CsrShape) -> String {
    client::build_csr(key, identity, shape).unwrap()
}

/// Sends one CreateCertificate call.
pub async fn request(
    client: &mut IstioCertificateServiceClient<Channel>,
    csr: String,
    opts: &RequestOptions,
) -> Result<Vec<String>, (tonic::Code, String)> {
    client::create_certificate(client, csr, opts)
        .await
        .map_err(|e| match e {
            client::ClientError::Rpc { code, message } => (code, message),
            other => panic!("unexpected client error: {other}"),
        })
}

pub fn lab(ttl_secs: i64) -> RequestOptions {
    RequestOptions {
        ttl_secs,
        ..Default::default()
    }
}

pub fn der_of(pem_text: &str) -> Vec<CertificateDer<'static>> {
    plugca::pem::parse_all(pem_text)
        .unwrap()
        .into_iter()
        .map(|b| CertificateDer::from(b.der))
        .collect()
}

/// Verifies `chain` (response elements) with webpki for both client and server use.
pub fn webpki_verify(chain: &[String]) {
    let leaf = der_of(&chain[0]).remove(0);
    let intermediates: Vec<CertificateDer<'static>> = chain[1..chain.len() - 1]
        .iter()
        .flat_map(|e| der_of(e))
        .collect();
    let roots = der_of(chain.last().unwrap());
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap().to_owned())
        .collect();
    let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .expect("webpki verifies the issued chain");
    }
}

/// `openssl verify` of the leaf against the last element (roots) and the middle
/// elements (untrusted intermediates), for the given purpose. Returns stdout+stderr.
pub fn openssl_verify(chain: &[String], purpose: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let w = |n: &str, s: &str| {
        let p = dir.path().join(n);
        std::fs::write(&p, s).unwrap();
        p
    };
    let leaf = w("leaf.pem", &chain[0]);
    let roots = w("roots.pem", chain.last().unwrap());
    let mut args: Vec<String> = vec![
        "verify".into(),
        "-purpose".into(),
        purpose.into(),
        "-CAfile".into(),
        roots.display().to_string(),
    ];
    if chain.len() > 2 {
        let mid = w("mid.pem", &chain[1..chain.len() - 1].concat());
        args.push("-untrusted".into());
        args.push(mid.display().to_string());
    }
    args.push(leaf.display().to_string());
    let out = Command::new("openssl").args(&args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && text.contains(": OK"), text)
}

/// `openssl x509 -text` of a PEM certificate.
pub fn openssl_text(pem_text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.pem");
    std::fs::write(&p, pem_text).unwrap();
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&p)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

/// Signing keys for test JWTs, and the JWKS file the server reads.
pub struct JwtKeys {
    /// ES256, kid `ec-1`.
    pub ec: JwtIssuer,
    /// RS256, kid `rsa-1`.
    pub rsa: JwtIssuer,
    /// A key the server does not know.
    pub stranger: JwtIssuer,
    pub jwks_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl JwtKeys {
    pub fn new() -> JwtKeys {
        let ec = JwtIssuer::generate(jsonwebtoken::Algorithm::ES256, "ec-1").unwrap();
        let rsa = JwtIssuer::generate(jsonwebtoken::Algorithm::RS256, "rsa-1").unwrap();
        let stranger = JwtIssuer::generate(jsonwebtoken::Algorithm::ES256, "ec-1").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let jwks_path = dir.path().join("jwks.json");
        std::fs::write(&jwks_path, JwtIssuer::jwks(&[&ec, &rsa])).unwrap();
        JwtKeys {
            ec,
            rsa,
            stranger,
            jwks_path,
            _dir: dir,
        }
    }

    pub fn server_args(&self) -> Vec<String> {
        vec![
            "--jwt-issuer".into(),
            JWT_ISSUER.into(),
            "--jwks-file".into(),
            self.jwks_path.display().to_string(),
        ]
    }
}

/// Claims of a test token; `exp` and `nbf` are offsets from now in seconds.
pub struct TokenSpec<'a> {
    pub iss: &'a str,
    pub aud: &'a str,
    pub sub: &'a str,
    pub exp_in: i64,
    pub nbf_in: i64,
}

impl Default for TokenSpec<'_> {
    fn default() -> Self {
        TokenSpec {
            iss: JWT_ISSUER,
            aud: "istio-ca",
            sub: "system:serviceaccount:foo:httpbin",
            exp_in: 3600,
            nbf_in: -60,
        }
    }
}

/// A token signed by `key` naming `kid`; `alg` must be the key's (it is
/// spelled out so each call shows what it sends).
pub fn mint(key: &JwtIssuer, alg: jsonwebtoken::Algorithm, kid: &str, spec: &TokenSpec) -> String {
    assert_eq!(key.algorithm(), alg, "the key signs with its own algorithm");
    key.mint_as(
        kid,
        &Claims {
            iss: spec.iss,
            aud: spec.aud,
            sub: spec.sub,
            exp_in: spec.exp_in,
            nbf_in: spec.nbf_in,
        },
    )
    .unwrap()
}

pub fn bearer(token: String) -> RequestOptions {
    RequestOptions {
        bearer_token: Some(token),
        ..Default::default()
    }
}

pub fn write_temp(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

/// Parsed facts of an issued leaf, read with x509-parser (our parser) for field checks.
pub struct LeafFacts {
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    pub san_critical: bool,
    pub subject: String,
    pub lifetime_secs: i64,
    pub not_after: i64,
    pub is_ca: bool,
    pub bc_critical: bool,
    pub ku_critical: bool,
    pub serial: Vec<u8>,
    pub aki: Option<Vec<u8>>,
    pub sig_oid: String,
    pub issuer_raw: Vec<u8>,
}

pub fn leaf_facts(pem_text: &str) -> LeafFacts {
    use x509_parser::prelude::*;
    let der = der_of(pem_text).remove(0);
    let (_, c) = X509Certificate::from_der(&der).unwrap();
    let san = c.subject_alternative_name().unwrap().unwrap();
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    for n in &san.value.general_names {
        match n {
            GeneralName::URI(u) => uris.push(u.to_string()),
            GeneralName::DNSName(d) => dns.push(d.to_string()),
            _ => {}
        }
    }
    let bc = c.basic_constraints().unwrap().unwrap();
    let ku = c.key_usage().unwrap().unwrap();
    assert!(ku.value.digital_signature() && !ku.value.key_cert_sign());
    // keyEncipherment only for RSA keys (RFC 8813 prohibits it for EC).
    let rsa_key = matches!(
        c.public_key().parsed(),
        Ok(x509_parser::public_key::PublicKey::RSA(_))
    );
    assert_eq!(
        ku.value.key_encipherment(),
        rsa_key,
        "keyEncipherment iff RSA key"
    );
    let eku = c.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.server_auth && eku.value.client_auth);
    let mut aki = None;
    for ext in c.extensions() {
        if let ParsedExtension::AuthorityKeyIdentifier(a) = ext.parsed_extension() {
            aki = a.key_identifier.as_ref().map(|k| k.0.to_vec());
        }
    }
    LeafFacts {
        uris,
        dns,
        san_critical: san.critical,
        subject: c.subject().to_string(),
        lifetime_secs: c.validity().not_after.timestamp() - c.validity().not_before.timestamp(),
        not_after: c.validity().not_after.timestamp(),
        is_ca: bc.value.ca,
        bc_critical: bc.critical,
        ku_critical: ku.critical,
        serial: c.raw_serial().to_vec(),
        aki,
        sig_oid: c.signature_algorithm.algorithm.to_id_string(),
        issuer_raw: c.issuer().as_raw().to_vec(),
    }
}

/// `["--cacerts-dir", dir]` followed by `extra`.
pub fn server_args(cacerts_dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--cacerts-dir".to_string(),
        cacerts_dir.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The identity lab-mode tests put in their CSRs.
pub const LAB_ID: &str = "spiffe://cluster.local/ns/foo/sa/bar";
/// The identity `TokenSpec::default()` proves.
pub const JWT_ID: &str = "spiffe://cluster.local/ns/foo/sa/httpbin";

/// A CSR with an optional subject CN and any number of URI SANs (built with rcgen).
pub fn csr_with(key: &KeyPair, cn: Option<&str>, uris: &[&str]) -> String {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(cn) = cn {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
    }
    params.subject_alt_names = uris
        .iter()
        .map(|u| rcgen::SanType::URI((*u).try_into().unwrap()))
        .collect();
    params.serialize_request(key).unwrap().pem().unwrap()
}

/// Sends a hand-built request plus raw metadata headers, for what
/// [`RequestOptions`] cannot express (odd metadata values, other auth schemes).
pub async fn send_raw(
    client: &mut IstioCertificateServiceClient<Channel>,
    body: plugca::pb::IstioCertificateRequest,
    headers: &[(&'static str, &str)],
) -> Result<Vec<String>, (tonic::Code, String)> {
    let mut request = tonic::Request::new(body);
    for (name, value) in headers {
        request.metadata_mut().append(*name, value.parse().unwrap());
    }
    client
        .create_certificate(request)
        .await
        .map(|r| r.into_inner().cert_chain)
        .map_err(|s| (s.code(), s.message().to_string()))
}

/// Request metadata (`google.protobuf.Struct`) from key/value pairs.
pub fn metadata(fields: Vec<(&str, prost_types::value::Kind)>) -> Option<prost_types::Struct> {
    Some(prost_types::Struct {
        fields: fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), prost_types::Value { kind: Some(v) }))
            .collect(),
    })
}

/// Runs openssl with `args` in `dir`, asserting success; returns stdout.
pub fn openssl_in(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Midnight UTC of a calendar day (certificate times with whole seconds).
pub fn utc(year: i32, month: u8, day: u8) -> time::OffsetDateTime {
    time::Date::from_calendar_date(year, time::Month::try_from(month).unwrap(), day)
        .unwrap()
        .midnight()
        .assume_utc()
}

/// Now, truncated to whole seconds as certificates store it.
pub fn now_secs() -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(time::OffsetDateTime::now_utc().unix_timestamp())
        .unwrap()
}

/// A CA certificate profile for the project's generator.
pub fn ca_spec(
    common_name: &str,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> CaSpec {
    CaSpec {
        organization: Some("plugca tests".into()),
        common_name: Some(common_name.into()),
        locality: None,
        not_before,
        not_after,
        path_len: None,
        dns_sans: Vec::new(),
    }
}

/// A self-signed root made by the project's generator.
pub fn gen_root(spec: &CaSpec, key: KeyChoice) -> GeneratedCa {
    generate::self_signed_root(spec, generate::generate_key(key).unwrap()).unwrap()
}

/// A CA certificate signed by `parent`, made by the project's generator.
pub fn gen_intermediate(spec: &CaSpec, key: KeyChoice, parent: &GeneratedCa) -> GeneratedCa {
    generate::intermediate(
        spec,
        generate::generate_key(key).unwrap(),
        &parent.cert_der,
        &parent.key,
    )
    .unwrap()
}

/// A root valid from 2019 to 2100 (P-256).
pub fn long_lived_root(common_name: &str) -> GeneratedCa {
    gen_root(
        &ca_spec(common_name, utc(2019, 1, 1), utc(2100, 1, 1)),
        KeyChoice::P256,
    )
}

/// PKCS#8 PEM of a generated CA's key.
pub fn key_pem(ca: &GeneratedCa) -> String {
    ca.key.secret_pkcs8_pem().to_string()
}

/// Writes the four istiod plug-in files into `dir`.
pub fn write_cacerts(dir: &Path, ca_cert: &str, ca_key: &str, cert_chain: &str, root_cert: &str) {
    for (name, contents) in [
        ("ca-cert.pem", ca_cert),
        ("ca-key.pem", ca_key),
        ("cert-chain.pem", cert_chain),
        ("root-cert.pem", root_cert),
    ] {
        std::fs::write(dir.join(name), contents).unwrap();
        private_if_key(&dir.join(name));
    }
}

/// A cacerts directory for `signing` (signed directly by `root`): chain = signing cert.
pub fn two_level_cacerts(signing: &GeneratedCa, root: &GeneratedCa) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_cacerts(
        dir.path(),
        &signing.cert_pem,
        &key_pem(signing),
        &signing.cert_pem,
        &root.cert_pem,
    );
    dir
}

/// Scrapes `/metrics` and returns the value of the sample line `series` (name plus labels).
pub async fn metric(server: &Server, series: &str) -> Option<String> {
    let (status, body) = server.http_get("/metrics").await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(str::to_string)
}

/// The subject key identifier of a PEM certificate, read with x509-parser.
pub fn ski_of(pem_text: &str) -> Option<Vec<u8>> {
    use x509_parser::prelude::*;
    let der = der_of(pem_text).remove(0);
    let (_, c) = X509Certificate::from_der(&der).unwrap();
    c.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        })
}

/// Serves `chain` with `key` on 127.0.0.1:0 for one connection, like a
/// sidecar presents istio-agent's chain (all elements, root included).
pub async fn serve_workload_tls(chain: &[String], key_der: Vec<u8>) -> SocketAddr {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth();
    serve_tls(config, chain, key_der).await
}

/// Serves `chain` with `key` and the given TLS settings for one connection.
pub async fn serve_tls(
    config: rustls::ConfigBuilder<rustls::ServerConfig, rustls::server::WantsServerCert>,
    chain: &[String],
    key_der: Vec<u8>,
) -> SocketAddr {
    let certs: Vec<CertificateDer<'static>> = chain.iter().flat_map(|e| der_of(e)).collect();
    let config = config
        .with_single_cert(
            certs,
            rustls_pki_types::PrivateKeyDer::Pkcs8(rustls_pki_types::PrivatePkcs8KeyDer::from(
                key_der,
            )),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        if let Ok(mut tls) = acceptor.accept(tcp).await {
            use tokio::io::AsyncWriteExt;
            let _ = tls.write_all(b"hello\n").await;
            let _ = tls.shutdown().await;
        }
    });
    addr
}

/// The Istio sample certificates directory.
pub fn samples() -> &'static Path {
    Path::new(SAMPLES)
}

/// A JWT-authenticating server on `dir` (issuer and JWKS of `keys`), plus `extra` flags.
pub async fn jwt_server(keys: &JwtKeys, dir: &std::path::Path, extra: &[&str]) -> Server {
    let mut args = server_args(dir, extra);
    args.extend(keys.server_args());
    Server::start(&args).await
}

/// A P-256 root valid for a year (rotation and attack tests).
pub fn rotation_root(cn: &str) -> GeneratedCa {
    let now = time::OffsetDateTime::now_utc();
    generate::self_signed_root(
        &CaSpec {
            organization: Some("plugca test".into()),
            common_name: Some(cn.into()),
            locality: None,
            not_before: now - time::Duration::minutes(5),
            not_after: now + time::Duration::days(365),
            path_len: None,
            dns_sans: vec![],
        },
        generate::generate_key(KeyChoice::P256).unwrap(),
    )
    .unwrap()
}

/// A P-256 intermediate (pathlen 0) under `parent`, valid for 300 days.
pub fn rotation_intermediate(parent: &GeneratedCa, cn: &str) -> GeneratedCa {
    let now = time::OffsetDateTime::now_utc();
    generate::intermediate(
        &CaSpec {
            organization: Some("plugca test".into()),
            common_name: Some(cn.into()),
            locality: None,
            not_before: now - time::Duration::minutes(5),
            not_after: now + time::Duration::days(300),
            path_len: Some(0),
            dns_sans: vec![],
        },
        generate::generate_key(KeyChoice::P256).unwrap(),
        &parent.cert_der,
        &parent.key,
    )
    .unwrap()
}

/// Writes an istiod-layout bundle into `dir` (each file renamed into place).
pub fn write_rotation_bundle(dir: &Path, ca: &GeneratedCa, roots: &[&GeneratedCa]) {
    std::fs::create_dir_all(dir).unwrap();
    let root_text: String = roots.iter().map(|r| r.cert_pem.clone()).collect();
    // Write to temporary names and rename, as a careful operator would.
    for (name, text) in [
        ("ca-key.pem", ca.key.secret_pkcs8_pem().to_string()),
        ("ca-cert.pem", ca.cert_pem.clone()),
        ("cert-chain.pem", ca.cert_pem.clone()),
        ("root-cert.pem", root_text),
    ] {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
}

/// Waits at most `within` for a `plugca` process that is expected to refuse to
/// start, and returns its exit status and stderr (which the caller piped). A
/// process still running at the deadline started instead of refusing: it is
/// killed and the test fails with `started`.
pub fn refusal_of(
    mut child: std::process::Child,
    within: std::time::Duration,
    started: &str,
) -> (std::process::ExitStatus, String) {
    let deadline = std::time::Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("{started}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        std::io::Read::read_to_string(&mut pipe, &mut stderr).unwrap();
    }
    (status, stderr)
}
