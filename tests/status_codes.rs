//! Spec section 14, cases 22-50 that apply without Kubernetes: exact gRPC
//! codes and messages, the issued leaf's profile, and the response layout, over
//! the real server on 127.0.0.1:0 with a real tonic client. Issued chains are
//! checked with webpki and openssl, not only with our own parser.

mod common;

use common::*;
use plugca::ca::CaBundle;
use plugca::ca::generate::KeyChoice;
use plugca::client::{CsrShape, RequestOptions};
use plugca::pb::IstioCertificateRequest;
use prost_types::value::Kind;
use tonic::Code;

/// A lab-mode server (identity from the CSR) on `dir`, plus `extra` flags.
async fn lab_server(dir: &std::path::Path, extra: &[&str]) -> Server {
    let mut flags = vec!["--insecure-trust-csr-identity"];
    flags.extend_from_slice(extra);
    Server::start(&server_args(dir, &flags)).await
}

/// A valid P-256 CSR naming the lab identity.
fn lab_csr() -> String {
    csr(&p256(), Some(LAB_ID), CsrShape::Ztunnel)
}

fn good_token(keys: &JwtKeys) -> String {
    mint(
        &keys.ec,
        jsonwebtoken::Algorithm::ES256,
        "ec-1",
        &TokenSpec::default(),
    )
}

/// Asserts a chain verifies with webpki and with openssl for client and server use.
fn verify_both_ways(chain: &[String]) {
    webpki_verify(chain);
    for purpose in ["sslclient", "sslserver"] {
        let (ok, text) = openssl_verify(chain, purpose);
        assert!(ok, "openssl verify -purpose {purpose}: {text}");
    }
}

/// A P-256 CSR whose self-signature no longer verifies (one bit of `s` flipped).
fn corrupted_signature_csr() -> String {
    let block = plugca::pem::parse_first(&lab_csr()).unwrap();
    let mut der = block.der;
    let last = der.len() - 1;
    der[last] ^= 0x01;
    plugca::pem::encode("CERTIFICATE REQUEST", &der)
}

/// An RSA-1024 CSR made by openssl (ring refuses to sign with keys that small).
fn rsa_1024_csr() -> String {
    let dir = tempfile::tempdir().unwrap();
    openssl_in(
        dir.path(),
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:1024",
            "-out",
            "k.pem",
        ],
    );
    openssl_in(
        dir.path(),
        &[
            "req",
            "-new",
            "-key",
            "k.pem",
            "-subj",
            "/O=test",
            "-addext",
            &format!("subjectAltName=URI:{LAB_ID}"),
        ],
    )
}

const NOT_ENCODED: &str = "CSR signing error (certificate signing request is not properly encoded)";
const NOT_A_CSR: &str = "CSR signing error (failed to parse X.509 certificate signing request)";

// ---------------------------------------------------------------- CSR errors (cases 23-26)

#[tokio::test(flavor = "multi_thread")]
async fn malformed_csrs_are_invalid_argument_with_istio_messages() {
    let server = lab_server(samples(), &[]).await;
    let mut client = server.client().await;
    let cert_as_csr = sample("ca-cert.pem").replace("CERTIFICATE", "CERTIFICATE REQUEST");
    let cases: Vec<(&str, String, String)> = vec![
        ("not PEM", "dumb CSR".into(), NOT_ENCODED.into()),
        ("empty", String::new(), NOT_ENCODED.into()),
        (
            "PEM of a tiny non-CSR DER",
            plugca::pem::encode("CERTIFICATE REQUEST", b"\x30\x03\x02\x01\x00"),
            NOT_A_CSR.into(),
        ),
        (
            "PEM of a certificate",
            cert_as_csr,
            NOT_A_CSR.into(),
        ),
        (
            "corrupted signature",
            corrupted_signature_csr(),
            "CSR signing error (the certificate signing request signature does not verify: signature verification error)".into(),
        ),
        (
            "RSA 1024",
            rsa_1024_csr(),
            "CSR signing error (RSA key of 1024 bits in the certificate signing request is below the 2048-bit minimum)".into(),
        ),
    ];
    for (name, csr_text, message) in cases {
        let result = request(&mut client, csr_text, &lab(0)).await;
        assert_eq!(
            result.unwrap_err(),
            (Code::InvalidArgument, message),
            "{name}"
        );
    }
    assert_eq!(
        metric(
            &server,
            "citadel_server_csr_sign_err_count{error=\"CSR_ERROR\"}"
        )
        .await
        .as_deref(),
        Some("6")
    );
    // Same connection, then a fresh one: the server still issues.
    verify_both_ways(&request(&mut client, lab_csr(), &lab(0)).await.unwrap());
    let mut fresh = server.client().await;
    verify_both_ways(&request(&mut fresh, lab_csr(), &lab(0)).await.unwrap());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_csr_under_another_pem_label_with_leading_text_is_accepted() {
    let server = lab_server(samples(), &[]).await;
    let mut client = server.client().await;
    let relabelled = format!(
        "some leading text\n{}trailing junk",
        lab_csr().replace("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST")
    );
    let chain = request(&mut client, relabelled, &lab(0)).await.unwrap();
    assert_eq!(leaf_facts(&chain[0]).uris, [LAB_ID]);
    verify_both_ways(&chain);
    server.stop().await;
}

// ---------------------------------------------------------------- TTL (cases 27-29, 31)

#[tokio::test(flavor = "multi_thread")]
async fn a_ttl_above_the_max_is_invalid_argument_in_go_duration_format_for_rsa_and_ec_csrs() {
    let server = lab_server(samples(), &["--max-ttl", "2h"]).await;
    let mut client = server.client().await;
    for key in [rsa(2048), p256()] {
        let result = request(
            &mut client,
            csr(&key, Some(LAB_ID), CsrShape::Sidecar),
            &lab(10_800),
        )
        .await;
        assert_eq!(
            result.unwrap_err(),
            (
                Code::InvalidArgument,
                "CSR signing error (requested TTL 3h0m0s is greater than the max allowed TTL 2h0m0s)"
                    .to_string()
            )
        );
    }
    assert_eq!(
        metric(
            &server,
            "citadel_server_csr_sign_err_count{error=\"TTL_ERROR\"}"
        )
        .await
        .as_deref(),
        Some("2")
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ttl_equal_to_the_max_is_accepted() {
    let server = lab_server(samples(), &["--max-ttl", "2h"]).await;
    let mut client = server.client().await;
    let chain = request(&mut client, lab_csr(), &lab(7200)).await.unwrap();
    assert_eq!(leaf_facts(&chain[0]).lifetime_secs, 7200 + 120);
    verify_both_ways(&chain);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_csr_with_a_huge_ttl_reports_the_csr_error() {
    let server = lab_server(samples(), &["--max-ttl", "2h"]).await;
    let mut client = server.client().await;
    for ttl in [10_800, i64::MAX] {
        assert_eq!(
            request(&mut client, "dumb CSR".into(), &lab(ttl))
                .await
                .unwrap_err(),
            (Code::InvalidArgument, NOT_ENCODED.to_string())
        );
    }
    assert_eq!(
        metric(
            &server,
            "citadel_server_csr_sign_err_count{error=\"TTL_ERROR\"}"
        )
        .await,
        None,
        "no TTL error was counted"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn zero_or_negative_validity_gets_the_default_ttl_which_is_not_checked_against_the_max() {
    let server = lab_server(samples(), &["--default-ttl", "3h", "--max-ttl", "1h"]).await;
    let mut client = server.client().await;
    for ttl in [0, -1, i64::MIN] {
        let chain = request(&mut client, lab_csr(), &lab(ttl)).await.unwrap();
        assert_eq!(leaf_facts(&chain[0]).lifetime_secs, 3 * 3600 + 120, "{ttl}");
    }
    server.stop().await;
}

// ---------------------------------------------------------------- leaf profile (cases 30, 35, 38, 39)

#[tokio::test(flavor = "multi_thread")]
async fn a_30_minute_request_gets_the_workload_leaf_profile_and_the_csr_san_is_ignored() {
    let keys = JwtKeys::new();
    let server = jwt_server(&keys, samples(), &["--max-ttl", "1h"]).await;
    let mut client = server.client().await;
    // keyEncipherment only for RSA keys: istiod sets it for EC keys too, which
    // RFC 8813 prohibits, so plugca deliberately differs there.
    for (name, key, key_usage) in [
        ("RSA", rsa(2048), "Digital Signature, Key Encipherment"),
        ("ECDSA", p256(), "Digital Signature"),
    ] {
        let csr_text = csr(&key, Some("spiffe://different.com/test"), CsrShape::Sidecar);
        let chain = request(
            &mut client,
            csr_text,
            &RequestOptions {
                bearer_token: Some(good_token(&keys)),
                ttl_secs: 1800,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let facts = leaf_facts(&chain[0]);
        assert_eq!(facts.lifetime_secs, 1800 + 120, "{name}");
        assert_eq!(facts.uris, [JWT_ID], "{name}");
        assert!(facts.dns.is_empty(), "{name}");
        assert!(
            facts.san_critical && facts.ku_critical && facts.bc_critical,
            "{name}"
        );
        assert!(!facts.is_ca, "{name}");
        assert_eq!(facts.subject, "", "{name}");
        // The same profile as openssl prints it.
        let text = openssl_text(&chain[0]);
        for expected in [
            &format!("X509v3 Key Usage: critical\n                {key_usage}\n"),
            "X509v3 Extended Key Usage: \n                TLS Web Server Authentication, TLS Web Client Authentication\n",
            "X509v3 Basic Constraints: critical\n                CA:FALSE\n",
            &format!("X509v3 Subject Alternative Name: critical\n                URI:{JWT_ID}\n"),
        ] {
            assert!(
                text.contains(expected),
                "{name}: {expected:?} not in\n{text}"
            );
        }
        assert!(!text.contains("different.com"), "{name}: {text}");
        verify_both_ways(&chain);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_leaf_cn_is_the_identity_only_when_the_csr_has_one_and_it_fits_64_bytes() {
    let server = lab_server(samples(), &[]).await;
    let mut client = server.client().await;
    let long_id = format!("spiffe://cluster.local/ns/foo/sa/{}", "a".repeat(40));
    assert!(long_id.len() > 64);
    let cases = [
        (Some("ignored-cn"), LAB_ID, format!("CN={LAB_ID}")),
        (None, LAB_ID, String::new()),
        (Some("ignored-cn"), long_id.as_str(), String::new()),
    ];
    for (cn, id, subject) in cases {
        let chain = request(&mut client, csr_with(&p256(), cn, &[id]), &lab(0))
            .await
            .unwrap();
        let facts = leaf_facts(&chain[0]);
        assert_eq!(facts.subject, subject, "{cn:?} {id}");
        assert_eq!(facts.uris, [id]);
        assert!(facts.san_critical);
        verify_both_ways(&chain);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ed25519_and_p256_csr_keys_are_accepted() {
    let server = lab_server(samples(), &[]).await;
    let mut client = server.client().await;
    for key in [
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap(),
        p256(),
    ] {
        let chain = request(
            &mut client,
            csr(&key, Some(LAB_ID), CsrShape::Ztunnel),
            &lab(0),
        )
        .await
        .unwrap();
        let leaf = der_of(&chain[0]).remove(0);
        use x509_parser::prelude::FromDer as _;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&leaf).unwrap();
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            rcgen::PublicKeyData::der_bytes(&key),
            "the leaf carries the CSR's key"
        );
        verify_both_ways(&chain);
    }
    server.stop().await;
}

// ---------------------------------------------------------------- clamping and expiry (cases 32-34)

#[tokio::test(flavor = "multi_thread")]
async fn a_leaf_never_outlives_a_signing_cert_that_expires_first() {
    let root = long_lived_root("root");
    let not_after = now_secs() + time::Duration::hours(1);
    let signing = gen_intermediate(
        &ca_spec("short-lived", utc(2019, 1, 1), not_after),
        KeyChoice::P256,
        &root,
    );
    let dir = two_level_cacerts(&signing, &root);
    let server = lab_server(dir.path(), &["--max-ttl", "3h"]).await;
    let mut client = server.client().await;
    // Asked for 2h (allowed), and for the 24h default: both end with the signing cert.
    for ttl in [7200, 0] {
        let chain = request(&mut client, lab_csr(), &lab(ttl)).await.unwrap();
        assert_eq!(
            leaf_facts(&chain[0]).not_after,
            not_after.unix_timestamp(),
            "ttl {ttl}"
        );
        verify_both_ways(&chain);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_signing_cert_is_internal_naming_when_it_expired() {
    let server = lab_server(samples(), &[]).await;
    let mut client = server.client().await;
    // A bundle that was valid in 2020, loaded as of then and swapped in.
    let root = long_lived_root("root");
    let signing = gen_intermediate(
        &ca_spec("signing", utc(2020, 1, 1), utc(2021, 1, 1)),
        KeyChoice::P256,
        &root,
    );
    let dir = two_level_cacerts(&signing, &root);
    let expired = CaBundle::load_dir(dir.path(), utc(2020, 6, 1))
        .unwrap()
        .unwrap();
    server.ca.replace(expired);
    assert_eq!(
        request(&mut client, lab_csr(), &lab(0)).await.unwrap_err(),
        (
            Code::Internal,
            "CSR signing error (signing certificate has expired at 2021-01-01 00:00:00 +0000 UTC)"
                .to_string()
        )
    );
    assert_eq!(
        metric(
            &server,
            "citadel_server_csr_sign_err_count{error=\"CERT_GEN_ERROR\"}"
        )
        .await
        .as_deref(),
        Some("1")
    );
    // Swapping a valid bundle back in makes the server issue again.
    server.ca.replace(load_samples_set1());
    verify_both_ways(&request(&mut client, lab_csr(), &lab(0)).await.unwrap());
    server.stop().await;
}

fn load_samples_set1() -> CaBundle {
    let dir = sample_set1();
    CaBundle::load_dir(dir.path(), time::OffsetDateTime::now_utc())
        .unwrap()
        .unwrap()
}

// ---------------------------------------------------------------- signature, serial, AKI (cases 40-42)

#[tokio::test(flavor = "multi_thread")]
async fn the_leaf_signature_algorithm_follows_the_ca_key() {
    let p384_root = gen_root(
        &ca_spec("p384 root", utc(2019, 1, 1), utc(2100, 1, 1)),
        KeyChoice::P384,
    );
    let p384_signing = gen_intermediate(
        &ca_spec("p384 signing", utc(2019, 1, 1), utc(2100, 1, 1)),
        KeyChoice::P384,
        &p384_root,
    );
    let p384_dir = two_level_cacerts(&p384_signing, &p384_root);
    let cases = [
        (
            "RSA samples",
            std::path::PathBuf::from(SAMPLES),
            "1.2.840.113549.1.1.11",
        ),
        (
            "P-256 certs/",
            std::path::PathBuf::from(CERTS),
            "1.2.840.10045.4.3.2",
        ),
        (
            "P-384 generated",
            p384_dir.path().to_path_buf(),
            "1.2.840.10045.4.3.3",
        ),
    ];
    for (name, dir, oid) in cases {
        let server = lab_server(&dir, &[]).await;
        let mut client = server.client().await;
        let chain = request(&mut client, lab_csr(), &lab(0)).await.unwrap();
        assert_eq!(leaf_facts(&chain[0]).sig_oid, oid, "{name}");
        verify_both_ways(&chain);
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn serials_differ_between_issuances_and_are_positive_below_2_to_the_128() {
    let server = lab_server(samples(), &[]).await;
    let mut client = server.client().await;
    let mut serials = Vec::new();
    for _ in 0..2 {
        let chain = request(&mut client, lab_csr(), &lab(0)).await.unwrap();
        let serial = leaf_facts(&chain[0]).serial;
        // DER INTEGER content: positive, minimal, and at most 128 bits of value.
        assert!(serial[0] & 0x80 == 0, "negative serial {serial:02x?}");
        let value: Vec<u8> = serial.iter().copied().skip_while(|b| *b == 0).collect();
        assert!(!value.is_empty() && value.len() <= 16, "{serial:02x?}");
        assert!(
            serial.len() == value.len()
                || (serial.len() == value.len() + 1 && value[0] & 0x80 != 0),
            "non-minimal serial encoding {serial:02x?}"
        );
        serials.push(serial);
    }
    assert_ne!(serials[0], serials[1]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_leaf_aki_is_the_ca_ski_or_a_key_id_derived_from_the_ca_key() {
    // Alt set: ca-cert-alt.pem carries an SKI, which the leaf AKI repeats.
    let alt = sample_alt_set();
    let server = lab_server(alt.path(), &[]).await;
    let mut client = server.client().await;
    let chain = request(&mut client, lab_csr(), &lab(0)).await.unwrap();
    let ca_ski = ski_of(&sample("ca-cert-alt.pem")).expect("ca-cert-alt.pem has an SKI");
    assert_eq!(leaf_facts(&chain[0]).aki, Some(ca_ski));
    verify_both_ways(&chain);
    server.stop().await;

    // Set 1: ca-cert.pem has no SKI; the AKI is the truncated SHA-256 of its key (RFC 7093).
    let server = lab_server(samples(), &[]).await;
    let mut client = server.client().await;
    let chain = request(&mut client, lab_csr(), &lab(0)).await.unwrap();
    assert_eq!(ski_of(&sample("ca-cert.pem")), None);
    let ca_der = der_of(&sample("ca-cert.pem")).remove(0);
    use x509_parser::prelude::FromDer as _;
    let (_, ca) = x509_parser::certificate::X509Certificate::from_der(&ca_der).unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, ca.public_key().raw);
    assert_eq!(
        leaf_facts(&chain[0]).aki,
        Some(digest.as_ref()[..20].to_vec())
    );
    verify_both_ways(&chain);
    server.stop().await;
}

// ---------------------------------------------------------------- response layout (cases 43-50)

#[tokio::test(flavor = "multi_thread")]
async fn the_response_layout_follows_the_plugged_files() {
    let combined = cacerts_from_samples(&[
        ("ca-cert.pem", "ca-cert.pem"),
        ("ca-key.pem", "ca-key.pem"),
        ("cert-chain.pem", "cert-chain.pem"),
        ("root-cert.pem", "root-cert-combined.pem"),
    ]);
    let empty_chain = sample_set1();
    std::fs::write(empty_chain.path().join("cert-chain.pem"), "").unwrap();
    let root = long_lived_root("root");
    let one_level = tempfile::tempdir().unwrap();
    write_cacerts(
        one_level.path(),
        &root.cert_pem,
        &key_pem(&root),
        "",
        &root.cert_pem,
    );
    let alt = sample_alt_set();
    let cases: Vec<(&str, &std::path::Path, Vec<String>)> = vec![
        (
            "set 1",
            samples(),
            vec![sample("ca-cert.pem"), sample("root-cert.pem")],
        ),
        (
            "alt set (root of the chain file not repeated)",
            alt.path(),
            vec![sample("ca-cert-alt.pem"), sample("root-cert-alt.pem")],
        ),
        (
            "combined roots, verbatim without final newline",
            combined.path(),
            vec![sample("ca-cert.pem"), sample("root-cert-combined.pem")],
        ),
        (
            "empty cert-chain.pem, ca-cert signed by the root",
            empty_chain.path(),
            vec![sample("ca-cert.pem"), sample("root-cert.pem")],
        ),
        (
            "one level, empty cert-chain.pem",
            one_level.path(),
            vec![root.cert_pem.clone()],
        ),
    ];
    for (name, dir, tail) in cases {
        let server = lab_server(dir, &[]).await;
        let mut client = server.client().await;
        let chain = request(&mut client, lab_csr(), &lab(0)).await.unwrap();
        assert_eq!(chain.len(), tail.len() + 1, "{name}: {chain:#?}");
        assert_eq!(chain[1..], tail[..], "{name}");
        // Leaf and intermediates: one certificate each, ending with exactly one newline.
        for element in &chain[..chain.len() - 1] {
            assert!(
                element.ends_with("-----\n") && !element.ends_with("\n\n"),
                "{name}"
            );
            assert_eq!(der_of(element).len(), 1, "{name}");
        }
        verify_both_ways(&chain);

        // CertSigner metadata, empty or not, changes nothing.
        for signer in ["", "x"] {
            let with_signer = send_raw(
                &mut client,
                IstioCertificateRequest {
                    csr: lab_csr(),
                    validity_duration: 0,
                    metadata: metadata(vec![("CertSigner", Kind::StringValue(signer.into()))]),
                },
                &[],
            )
            .await
            .unwrap();
            assert_eq!(with_signer[1..], tail[..], "{name} CertSigner {signer:?}");
        }
        server.stop().await;
    }
    assert!(!sample("root-cert-combined.pem").ends_with('\n'));
}

// ---------------------------------------------------------------- impersonation and authn (cases 1, 14, 21)

#[tokio::test(flavor = "multi_thread")]
async fn a_string_impersonated_identity_is_refused_as_impersonation_failure() {
    let keys = JwtKeys::new();
    let server = jwt_server(&keys, samples(), &["--insecure-trust-csr-identity"]).await;
    let mut client = server.client().await;
    let impersonate = |bearer: Option<String>| RequestOptions {
        bearer_token: bearer,
        impersonate: Some("spiffe://cluster.local/ns/ns-a/sa/sa-a".into()),
        ..Default::default()
    };
    for bearer in [Some(good_token(&keys)), None] {
        assert_eq!(
            request(&mut client, lab_csr(), &impersonate(bearer))
                .await
                .unwrap_err(),
            (
                Code::Unauthenticated,
                "request impersonation authentication failure".to_string()
            )
        );
    }
    assert_eq!(
        metric(&server, "citadel_server_authentication_failure_count")
            .await
            .as_deref(),
        Some("2")
    );
    verify_both_ways(&request(&mut client, lab_csr(), &lab(0)).await.unwrap());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_impersonated_identity_that_is_not_a_non_empty_string_is_ignored() {
    let server = lab_server(samples(), &[]).await;
    let mut client = server.client().await;
    for value in [
        Kind::NumberValue(42.0),
        Kind::BoolValue(true),
        Kind::StringValue(String::new()),
    ] {
        let chain = send_raw(
            &mut client,
            IstioCertificateRequest {
                csr: lab_csr(),
                validity_duration: 0,
                metadata: metadata(vec![("ImpersonatedIdentity", value.clone())]),
            },
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{value:?}: {e:?}"));
        assert_eq!(leaf_facts(&chain[0]).uris, [LAB_ID], "{value:?}");
        verify_both_ways(&chain);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_an_authenticator_every_request_is_unauthenticated_before_the_csr_is_read() {
    let server = Server::start(&server_args(samples(), &[])).await;
    let mut client = server.client().await;
    let unauthenticated = (
        Code::Unauthenticated,
        "request authenticate failure".to_string(),
    );
    // A valid CSR, a bearer token nobody checks, and a CSR that is not even PEM.
    assert_eq!(
        request(&mut client, lab_csr(), &lab(0)).await.unwrap_err(),
        unauthenticated
    );
    assert_eq!(
        request(&mut client, lab_csr(), &bearer("a.b.c".into()))
            .await
            .unwrap_err(),
        unauthenticated
    );
    assert_eq!(
        request(&mut client, "dumb CSR".into(), &lab(0))
            .await
            .unwrap_err(),
        unauthenticated
    );
    assert_eq!(
        metric(&server, "citadel_server_authentication_failure_count")
            .await
            .as_deref(),
        Some("3")
    );
    assert_eq!(
        metric(
            &server,
            "citadel_server_csr_sign_err_count{error=\"CSR_ERROR\"}"
        )
        .await,
        None
    );
    server.stop().await;
}

// ---------------------------------------------------------------- metrics and resilience (case 58)

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_every_call_and_each_outcome_and_the_server_keeps_serving() {
    let server = lab_server(samples(), &["--max-ttl", "2h"]).await;
    let mut client = server.client().await;
    let bad: Vec<(&str, String, RequestOptions, Code)> = vec![
        (
            "TTL too long",
            lab_csr(),
            lab(10_800),
            Code::InvalidArgument,
        ),
        ("not PEM", "dumb CSR".into(), lab(0), Code::InvalidArgument),
        (
            "identity outside the trust domain",
            csr(
                &p256(),
                Some("spiffe://other.td/ns/foo/sa/bar"),
                CsrShape::Ztunnel,
            ),
            lab(0),
            Code::Unauthenticated,
        ),
        (
            "impersonation",
            lab_csr(),
            RequestOptions {
                impersonate: Some(LAB_ID.into()),
                ..Default::default()
            },
            Code::Unauthenticated,
        ),
    ];
    for (name, csr_text, opts, code) in bad {
        assert_eq!(
            request(&mut client, csr_text, &opts).await.unwrap_err().0,
            code,
            "{name}"
        );
        // Every bad request is followed by a good one on the same connection.
        let chain = request(&mut client, lab_csr(), &lab(0)).await.unwrap();
        assert_eq!(leaf_facts(&chain[0]).uris, [LAB_ID], "after {name}");
    }
    let expectations = [
        ("citadel_server_csr_count", "8"),
        ("citadel_server_success_cert_issuance_count", "4"),
        ("citadel_server_authentication_failure_count", "2"),
        (
            "citadel_server_csr_sign_err_count{error=\"TTL_ERROR\"}",
            "1",
        ),
        (
            "citadel_server_csr_sign_err_count{error=\"CSR_ERROR\"}",
            "1",
        ),
    ];
    for (series, value) in expectations {
        assert_eq!(
            metric(&server, series).await.as_deref(),
            Some(value),
            "{series}"
        );
    }
    let mut fresh = server.client().await;
    verify_both_ways(&request(&mut fresh, lab_csr(), &lab(0)).await.unwrap());
    assert_eq!(
        metric(&server, "citadel_server_csr_count").await.as_deref(),
        Some("9")
    );
    server.stop().await;
}
