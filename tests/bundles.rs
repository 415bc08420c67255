//! Every CA bundle layout plugca accepts and every load check it makes, each
//! rejection with its exact message. Broken bundles are built in temp dirs with
//! the project's generator or the openssl CLI (RSA keys always with openssl).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use plugca::ca::generate::{self, GeneratedCa, KeyChoice};
use plugca::ca::keys::{CaKey, KeyKind};
use plugca::ca::{CaBundle, Layout};

const ISTIOD_FILES: [&str; 4] = [
    "ca-cert.pem",
    "ca-key.pem",
    "cert-chain.pem",
    "root-cert.pem",
];

fn load(dir: &Path) -> Result<Option<CaBundle>, plugca::ca::BundleError> {
    CaBundle::load_dir(dir, time::OffsetDateTime::now_utc())
}

fn load_ok(dir: &Path) -> CaBundle {
    match load(dir) {
        Ok(Some(bundle)) => bundle,
        Ok(None) => panic!("no bundle found in {}", dir.display()),
        Err(e) => panic!("bundle in {} refused: {e}", dir.display()),
    }
}

fn load_err(dir: &Path) -> String {
    match load(dir) {
        Ok(Some(b)) => panic!("bundle loaded but should be refused: {b:?}"),
        Ok(None) => panic!("no bundle found in {}", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// A P-256 key made by openssl in the given form.
fn openssl_key(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    openssl_in(dir.path(), args)
}

/// A CA certificate for `key_pem` signed by `parent` with the generator.
fn intermediate_for_key(spec_cn: &str, key_pem: &str, parent: &GeneratedCa) -> GeneratedCa {
    let key = CaKey::from_pem(key_pem).unwrap();
    generate::intermediate(
        &ca_spec(spec_cn, utc(2019, 1, 1), utc(2100, 1, 1)),
        key,
        &parent.cert_der,
        &parent.key,
    )
    .unwrap()
}

/// A certificate made by `openssl x509 -req`: a fresh P-256 key, `subject`,
/// exactly the extensions given, signed by (`issuer_cert`, `issuer_key`) with `digest`.
/// Returns (certificate PEM, key PEM).
fn openssl_signed(
    issuer_cert: &str,
    issuer_key: &str,
    subject: &str,
    extensions: &str,
    digest: &str,
) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_temp(d, "issuer.pem", issuer_cert);
    write_temp(d, "issuer-key.pem", issuer_key);
    write_temp(d, "ext.cnf", &format!("[v3]\n{extensions}\n"));
    openssl_in(
        d,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "key.pem",
        ],
    );
    openssl_in(
        d,
        &[
            "req", "-new", "-key", "key.pem", "-subj", subject, "-out", "req.csr",
        ],
    );
    openssl_in(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "req.csr",
            "-CA",
            "issuer.pem",
            "-CAkey",
            "issuer-key.pem",
            "-set_serial",
            "4660",
            "-days",
            "365",
            &format!("-{digest}"),
            "-extfile",
            "ext.cnf",
            "-extensions",
            "v3",
            "-out",
            "cert.pem",
        ],
    );
    (
        std::fs::read_to_string(d.join("cert.pem")).unwrap(),
        std::fs::read_to_string(d.join("key.pem")).unwrap(),
    )
}

/// A self-signed RSA-2048 root made entirely by openssl. Returns (cert, key).
fn openssl_rsa_root(subject: &str) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_temp(
        d,
        "root.cnf",
        "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = unused\n\
         [v3]\nbasicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign\n\
         subjectKeyIdentifier = hash\n",
    );
    openssl_in(d, &["genrsa", "-traditional", "-out", "key.pem", "2048"]);
    openssl_in(
        d,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "key.pem",
            "-config",
            "root.cnf",
            "-extensions",
            "v3",
            "-subj",
            subject,
            "-days",
            "3650",
            "-sha256",
            "-out",
            "root.pem",
        ],
    );
    (
        std::fs::read_to_string(d.join("root.pem")).unwrap(),
        std::fs::read_to_string(d.join("key.pem")).unwrap(),
    )
}

const CA_EXTENSIONS: &str =
    "basicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign";

// ---------------------------------------------------------------- accepted

#[test]
fn sample_set_one_loads_and_serves_ca_cert_then_root_cert() {
    let dir = sample_set1();
    let bundle = load_ok(dir.path());
    assert_eq!(bundle.layout(), Layout::Istiod);
    assert_eq!(
        bundle.response_tail(),
        [sample("ca-cert.pem"), sample("root-cert.pem")]
    );
    assert_eq!(bundle.signer().key_kind(), KeyKind::Rsa { bits: 2048 });
}

#[test]
fn the_alt_set_loads_an_rsa_4096_pkcs8_ca_and_does_not_repeat_the_root_of_its_chain_file() {
    let dir = sample_alt_set();
    let bundle = load_ok(dir.path());
    // cert-chain-alt.pem is ca-cert-alt + root-cert-alt; the root is served once, as the last element.
    assert_eq!(
        bundle.response_tail(),
        [sample("ca-cert-alt.pem"), sample("root-cert-alt.pem")]
    );
    assert_eq!(bundle.signer().key_kind(), KeyKind::Rsa { bits: 4096 });
}

#[test]
fn a_combined_root_file_loads_with_either_intermediate_and_is_served_byte_for_byte() {
    let combined = sample("root-cert-combined.pem");
    assert!(!combined.ends_with('\n'), "the sample has no final newline");
    for (cert, key, chain) in [
        ("ca-cert.pem", "ca-key.pem", "cert-chain.pem"),
        ("ca-cert-alt.pem", "ca-key-alt.pem", "cert-chain-alt.pem"),
    ] {
        let dir = cacerts_from_samples(&[
            ("ca-cert.pem", cert),
            ("ca-key.pem", key),
            ("cert-chain.pem", chain),
            ("root-cert.pem", "root-cert-combined.pem"),
        ]);
        let bundle = load_ok(dir.path());
        assert_eq!(bundle.roots().len(), 2, "{cert}");
        assert_eq!(
            bundle.response_tail(),
            [sample(cert), combined.clone()],
            "{cert}"
        );
        assert_eq!(bundle.root_bundle(), combined);
    }
}

#[test]
fn a_root_file_with_a_duplicate_root_loads() {
    let dir = cacerts_from_samples(&[
        ("ca-cert.pem", "ca-cert-alt.pem"),
        ("ca-key.pem", "ca-key-alt.pem"),
        ("cert-chain.pem", "cert-chain-alt.pem"),
        ("root-cert.pem", "root-cert-combined-2.pem"),
    ]);
    let bundle = load_ok(dir.path());
    assert_eq!(bundle.roots().len(), 3);
    assert_eq!(
        bundle.response_tail().last().unwrap(),
        &sample("root-cert-combined-2.pem")
    );
}

#[test]
fn the_kubernetes_tls_layout_loads_and_wins_over_istiod_files_in_the_same_dir() {
    let dir = sample_set1();
    for (dest, src) in [
        ("tls.crt", "ca-cert-alt.pem"),
        ("tls.key", "ca-key-alt.pem"),
        ("ca.crt", "root-cert-alt.pem"),
    ] {
        std::fs::copy(format!("{SAMPLES}/{src}"), dir.path().join(dest)).unwrap();
    }
    let bundle = load_ok(dir.path());
    assert_eq!(bundle.layout(), Layout::KubernetesTls);
    assert_eq!(
        bundle.signing_cert().subject,
        "O=Istio, CN=Intermediate CA, L=cluster1"
    );
    assert_eq!(
        bundle.response_tail(),
        [sample("ca-cert-alt.pem"), sample("root-cert-alt.pem")]
    );
}

#[test]
fn an_empty_cert_chain_loads_when_the_root_signed_the_ca_cert_and_the_ca_cert_is_still_served() {
    let dir = sample_set1();
    std::fs::write(dir.path().join("cert-chain.pem"), "").unwrap();
    let bundle = load_ok(dir.path());
    assert_eq!(bundle.served_chain(), [sample("ca-cert.pem")]);
    assert_eq!(
        bundle.response_tail(),
        [sample("ca-cert.pem"), sample("root-cert.pem")]
    );
}

#[test]
fn a_one_level_ca_whose_signing_cert_is_the_root_serves_only_the_root() {
    let root = long_lived_root("root");
    let dir = tempfile::tempdir().unwrap();
    write_cacerts(
        dir.path(),
        &root.cert_pem,
        &key_pem(&root),
        "",
        &root.cert_pem,
    );
    let bundle = load_ok(dir.path());
    assert_eq!(bundle.path().len(), 1);
    assert_eq!(bundle.response_tail(), std::slice::from_ref(&root.cert_pem));
    assert!(bundle.served_chain().is_empty());
}

#[test]
fn a_three_level_ca_loads_with_its_middle_intermediate_in_the_chain_file() {
    let root = long_lived_root("root");
    let mid = gen_intermediate(
        &ca_spec("mid", utc(2019, 1, 1), utc(2100, 1, 1)),
        KeyChoice::P256,
        &root,
    );
    let signing = gen_intermediate(
        &ca_spec("signing", utc(2019, 1, 1), utc(2100, 1, 1)),
        KeyChoice::P256,
        &mid,
    );
    let dir = tempfile::tempdir().unwrap();
    let chain = format!("{}{}", signing.cert_pem, mid.cert_pem);
    write_cacerts(
        dir.path(),
        &signing.cert_pem,
        &key_pem(&signing),
        &chain,
        &root.cert_pem,
    );
    let bundle = load_ok(dir.path());
    assert_eq!(
        bundle.response_tail(),
        [
            signing.cert_pem.clone(),
            mid.cert_pem.clone(),
            root.cert_pem.clone()
        ]
    );
}

#[test]
fn nothing_in_the_directory_means_no_bundle() {
    let dir = tempfile::tempdir().unwrap();
    assert!(load(dir.path()).unwrap().is_none());
    std::fs::write(dir.path().join("README"), "unrelated").unwrap();
    assert!(load(dir.path()).unwrap().is_none());
}

#[test]
fn ca_keys_load_as_pkcs1_sec1_with_or_without_ec_parameters_and_pkcs8() {
    let root = long_lived_root("root");
    let cases: [(&str, Vec<&str>, KeyKind, &str); 5] = [
        (
            "SEC1 after EC PARAMETERS (openssl ecparam -genkey)",
            vec!["ecparam", "-genkey", "-name", "prime256v1"],
            KeyKind::EcdsaP256,
            "-----BEGIN EC PARAMETERS-----",
        ),
        (
            "SEC1 P-384 alone",
            vec!["ecparam", "-genkey", "-name", "secp384r1", "-noout"],
            KeyKind::EcdsaP384,
            "-----BEGIN EC PRIVATE KEY-----",
        ),
        (
            "PKCS#8 EC",
            vec![
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ],
            KeyKind::EcdsaP256,
            "-----BEGIN PRIVATE KEY-----",
        ),
        (
            "PKCS#1 RSA",
            vec!["genrsa", "-traditional", "2048"],
            KeyKind::Rsa { bits: 2048 },
            "-----BEGIN RSA PRIVATE KEY-----",
        ),
        (
            "PKCS#8 RSA",
            vec![
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ],
            KeyKind::Rsa { bits: 2048 },
            "-----BEGIN PRIVATE KEY-----",
        ),
    ];
    for (name, args, kind, first_line) in cases {
        let key = openssl_key(&args);
        assert!(key.starts_with(first_line), "{name}: {key}");
        let signing = intermediate_for_key("signing", &key, &root);
        let dir = tempfile::tempdir().unwrap();
        write_cacerts(
            dir.path(),
            &signing.cert_pem,
            &key,
            &signing.cert_pem,
            &root.cert_pem,
        );
        let bundle = load_ok(dir.path());
        assert_eq!(bundle.signer().key_kind(), kind, "{name}");
    }
}

#[test]
fn a_p384_ca_loads() {
    let root = gen_root(
        &ca_spec("root", utc(2019, 1, 1), utc(2100, 1, 1)),
        KeyChoice::P384,
    );
    let signing = gen_intermediate(
        &ca_spec("signing", utc(2019, 1, 1), utc(2100, 1, 1)),
        KeyChoice::P384,
        &root,
    );
    let dir = two_level_cacerts(&signing, &root);
    assert_eq!(load_ok(dir.path()).signer().key_kind(), KeyKind::EcdsaP384);
}

#[test]
fn validity_is_judged_at_the_time_given_to_the_loader() {
    let root = long_lived_root("root");
    let signing = gen_intermediate(
        &ca_spec("signing", utc(2019, 1, 1), utc(2020, 1, 1)),
        KeyChoice::P256,
        &root,
    );
    let dir = two_level_cacerts(&signing, &root);
    let bundle = CaBundle::load_dir(dir.path(), utc(2019, 6, 1))
        .unwrap()
        .unwrap();
    assert_eq!(bundle.not_after_limit(), utc(2020, 1, 1));
    assert!(load(dir.path()).is_err());
}

// ---------------------------------------------------------------- refused: files

#[test]
fn a_partial_istiod_bundle_names_the_missing_file() {
    for missing in ISTIOD_FILES {
        let dir = sample_set1();
        std::fs::remove_file(dir.path().join(missing)).unwrap();
        let present: Vec<&str> = ISTIOD_FILES
            .iter()
            .copied()
            .filter(|f| *f != missing)
            .collect();
        assert_eq!(
            load_err(dir.path()),
            format!(
                "incomplete CA bundle in {}: found {} but {missing} is missing (a plugged-in CA needs all of ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem)",
                dir.path().display(),
                present.join(", ")
            )
        );
    }
}

#[test]
fn a_partial_kubernetes_tls_bundle_names_the_missing_files() {
    let dir = cacerts_from_samples(&[("tls.crt", "ca-cert-alt.pem")]);
    assert_eq!(
        load_err(dir.path()),
        format!(
            "incomplete CA bundle in {}: found tls.crt but tls.key, ca.crt are missing (a plugged-in CA needs all of tls.crt, tls.key, ca.crt)",
            dir.path().display()
        )
    );
}

#[test]
fn a_file_larger_than_one_mebibyte_is_refused() {
    let dir = sample_set1();
    let padded = format!("{}{}", sample("cert-chain.pem"), "#".repeat(1024 * 1024));
    std::fs::write(dir.path().join("cert-chain.pem"), padded).unwrap();
    assert_eq!(
        load_err(dir.path()),
        format!(
            "{}: larger than 1048576 bytes",
            dir.path().join("cert-chain.pem").display()
        )
    );
}

#[test]
fn a_der_certificate_file_is_refused_as_not_pem() {
    let dir = sample_set1();
    let der = der_of(&sample("ca-cert.pem")).remove(0);
    std::fs::write(dir.path().join("ca-cert.pem"), der.as_ref()).unwrap();
    assert_eq!(
        load_err(dir.path()),
        format!(
            "{}: cannot read: not UTF-8 text (is it DER instead of PEM?)",
            dir.path().join("ca-cert.pem").display()
        )
    );
}

#[test]
fn garbage_certificate_pem_is_refused_with_the_reason() {
    let cases = [
        (
            "no PEM at all",
            "garbage".to_string(),
            "ca-cert.pem: no certificate found",
        ),
        (
            "bad base64",
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n".to_string(),
            "ca-cert.pem: PEM block 0 (\"CERTIFICATE\") is not valid base64",
        ),
        (
            "no END line",
            "-----BEGIN CERTIFICATE-----\nAAAA\n".to_string(),
            "ca-cert.pem: PEM block 0 (\"CERTIFICATE\") has no END line",
        ),
    ];
    for (name, text, expected) in cases {
        let dir = sample_set1();
        std::fs::write(dir.path().join("ca-cert.pem"), text).unwrap();
        assert_eq!(load_err(dir.path()), expected, "{name}");
    }
    // Valid PEM whose DER is not a certificate.
    let dir = sample_set1();
    std::fs::write(
        dir.path().join("ca-cert.pem"),
        plugca::pem::encode("CERTIFICATE", b"\x30\x03\x02\x01\x00"),
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(
        err.starts_with("ca-cert.pem: not a valid X.509 certificate: "),
        "{err}"
    );
}

#[test]
fn a_private_key_inside_root_cert_pem_is_refused() {
    let root = long_lived_root("root");
    let signing = gen_intermediate(
        &ca_spec("signing", utc(2019, 1, 1), utc(2100, 1, 1)),
        KeyChoice::P256,
        &root,
    );
    let dir = two_level_cacerts(&signing, &root);
    std::fs::write(
        dir.path().join("root-cert.pem"),
        format!("{}{}", root.cert_pem, key_pem(&root)),
    )
    .unwrap();
    assert_eq!(
        load_err(dir.path()),
        "root-cert.pem: block 2 is a \"PRIVATE KEY\" block, not a CERTIFICATE"
    );
}

// ---------------------------------------------------------------- refused: keys

#[test]
fn the_alt_2_sample_key_does_not_match_its_certificate() {
    let dir = cacerts_from_samples(&[
        ("ca-cert.pem", "ca-cert-alt-2.pem"),
        ("ca-key.pem", "ca-key-alt-2.pem"),
        ("cert-chain.pem", "cert-chain-alt-2.pem"),
        ("root-cert.pem", "root-cert-alt.pem"),
    ]);
    let err = load_err(dir.path());
    assert!(err.contains("does not match the key"), "{err}");
    assert_eq!(
        err,
        "the cert does not match the key: ca-key.pem is the key of another certificate than ca-cert.pem (\"O=Istio, CN=Intermediate CA, L=cluster2\")"
    );
}

#[test]
fn an_encrypted_ca_key_is_refused_with_a_hint_to_decrypt_it() {
    let pkcs8 = openssl_key(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-aes256",
        "-pass",
        "pass:secret",
    ]);
    assert!(pkcs8.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));
    let tmp = tempfile::tempdir().unwrap();
    let plain = write_temp(
        tmp.path(),
        "plain.pem",
        &openssl_key(&["ecparam", "-genkey", "-name", "prime256v1", "-noout"]),
    );
    let legacy = openssl_in(
        tmp.path(),
        &[
            "ec",
            "-in",
            plain.to_str().unwrap(),
            "-aes256",
            "-passout",
            "pass:secret",
        ],
    );
    assert!(legacy.contains("Proc-Type: 4,ENCRYPTED"), "{legacy}");
    for key in [pkcs8, legacy] {
        let dir = sample_set1();
        std::fs::write(dir.path().join("ca-key.pem"), key).unwrap();
        assert_eq!(
            load_err(dir.path()),
            "ca-key.pem: the key is encrypted; plugca needs an unencrypted key (decrypt it with `openssl pkey -in KEY -out KEY.plain`)"
        );
    }
}

#[test]
fn a_key_file_holding_a_certificate_is_refused() {
    let dir = sample_set1();
    std::fs::copy(
        format!("{SAMPLES}/ca-cert.pem"),
        dir.path().join("ca-key.pem"),
    )
    .unwrap();
    assert_eq!(
        load_err(dir.path()),
        "ca-key.pem: unsupported PEM block type for a private key: CERTIFICATE"
    );
}

#[test]
fn an_ed25519_ca_key_is_refused() {
    let root = long_lived_root("root");
    let key = openssl_key(&["genpkey", "-algorithm", "ED25519"]);
    let signing = intermediate_for_key("signing", &key, &root);
    let dir = tempfile::tempdir().unwrap();
    write_cacerts(
        dir.path(),
        &signing.cert_pem,
        &key,
        &signing.cert_pem,
        &root.cert_pem,
    );
    assert_eq!(
        load_err(dir.path()),
        "ca-key.pem: unsupported CA key Ed25519 (supported: RSA 2048-4096, ECDSA P-256, ECDSA P-384)"
    );
}

// ---------------------------------------------------------------- refused: chain

#[test]
fn a_three_level_ca_without_its_middle_intermediate_names_the_missing_issuer() {
    let root = long_lived_root("root");
    let mid = gen_intermediate(
        &ca_spec("mid", utc(2019, 1, 1), utc(2100, 1, 1)),
        KeyChoice::P256,
        &root,
    );
    let signing = gen_intermediate(
        &ca_spec("signing", utc(2019, 1, 1), utc(2100, 1, 1)),
        KeyChoice::P256,
        &mid,
    );
    for chain in [signing.cert_pem.as_str(), ""] {
        let dir = tempfile::tempdir().unwrap();
        write_cacerts(
            dir.path(),
            &signing.cert_pem,
            &key_pem(&signing),
            chain,
            &root.cert_pem,
        );
        assert_eq!(
            load_err(dir.path()),
            "cannot verify the chain: ca-cert.pem (\"O=plugca tests, CN=signing\") was issued by \"O=plugca tests, CN=mid\", which is in neither cert-chain.pem nor root-cert.pem"
        );
    }
}

#[test]
fn a_root_with_the_right_name_but_another_key_fails_the_signature_check() {
    let root = long_lived_root("root");
    let impostor = long_lived_root("root");
    let signing = gen_intermediate(
        &ca_spec("signing", utc(2019, 1, 1), utc(2100, 1, 1)),
        KeyChoice::P256,
        &root,
    );
    let dir = two_level_cacerts(&signing, &impostor);
    assert_eq!(
        load_err(dir.path()),
        "cannot verify the chain: the signature of ca-cert.pem (\"O=plugca tests, CN=signing\") does not verify with the key of root-cert.pem (\"O=plugca tests, CN=root\"): it was signed by another CA with the same name"
    );
}

#[test]
fn a_signing_cert_that_is_not_a_ca_is_refused() {
    let root = long_lived_root("root");
    for extensions in [
        "basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature, keyCertSign",
        "keyUsage = critical, digitalSignature, keyCertSign",
    ] {
        let (cert, key) = openssl_signed(
            &root.cert_pem,
            &key_pem(&root),
            "/O=plugca tests/CN=leafish",
            extensions,
            "sha256",
        );
        let dir = tempfile::tempdir().unwrap();
        write_cacerts(dir.path(), &cert, &key, &cert, &root.cert_pem);
        assert_eq!(
            load_err(dir.path()),
            "ca-cert.pem: \"O=plugca tests, CN=leafish\" is not a CA certificate (basicConstraints CA:TRUE missing): it is not authorized to sign other certificates",
            "{extensions}"
        );
    }
}

#[test]
fn a_ca_whose_key_usage_lacks_key_cert_sign_is_refused() {
    let root = long_lived_root("root");
    let (cert, key) = openssl_signed(
        &root.cert_pem,
        &key_pem(&root),
        "/O=plugca tests/CN=no certsign",
        "basicConstraints = critical, CA:TRUE\nkeyUsage = critical, digitalSignature, cRLSign",
        "sha256",
    );
    let dir = tempfile::tempdir().unwrap();
    write_cacerts(dir.path(), &cert, &key, &cert, &root.cert_pem);
    assert_eq!(
        load_err(dir.path()),
        "ca-cert.pem: \"O=plugca tests, CN=no certsign\" has a keyUsage without keyCertSign: it may not sign certificates"
    );
}

#[test]
fn a_ca_whose_extended_key_usage_lacks_server_auth_is_refused() {
    let root = long_lived_root("root");
    let (cert, key) = openssl_signed(
        &root.cert_pem,
        &key_pem(&root),
        "/O=plugca tests/CN=client only",
        &format!("{CA_EXTENSIONS}\nextendedKeyUsage = clientAuth"),
        "sha256",
    );
    let dir = tempfile::tempdir().unwrap();
    write_cacerts(dir.path(), &cert, &key, &cert, &root.cert_pem);
    assert_eq!(
        load_err(dir.path()),
        "ca-cert.pem: \"O=plugca tests, CN=client only\" has an extendedKeyUsage without serverAuth, so certificates it issues would not verify as TLS certificates"
    );
}

#[test]
fn an_expired_signing_cert_is_refused() {
    let root = long_lived_root("root");
    let signing = gen_intermediate(
        &ca_spec("signing", utc(2019, 1, 1), utc(2020, 1, 1)),
        KeyChoice::P256,
        &root,
    );
    let dir = two_level_cacerts(&signing, &root);
    assert_eq!(
        load_err(dir.path()),
        "ca-cert.pem: \"O=plugca tests, CN=signing\" expired at 2020-01-01T00:00:00Z"
    );
}

#[test]
fn a_signing_cert_that_is_not_yet_valid_is_refused() {
    let root = long_lived_root("root");
    let signing = gen_intermediate(
        &ca_spec("signing", utc(2099, 1, 1), utc(2100, 1, 1)),
        KeyChoice::P256,
        &root,
    );
    let dir = two_level_cacerts(&signing, &root);
    assert_eq!(
        load_err(dir.path()),
        "ca-cert.pem: \"O=plugca tests, CN=signing\" is not valid before 2099-01-01T00:00:00Z"
    );
}

#[test]
fn an_expired_root_is_refused() {
    let root = gen_root(
        &ca_spec("old root", utc(2019, 1, 1), utc(2020, 1, 1)),
        KeyChoice::P256,
    );
    let signing = gen_intermediate(
        &ca_spec("signing", utc(2019, 1, 1), utc(2100, 1, 1)),
        KeyChoice::P256,
        &root,
    );
    let dir = two_level_cacerts(&signing, &root);
    assert_eq!(
        load_err(dir.path()),
        "root-cert.pem: \"O=plugca tests, CN=old root\" expired at 2020-01-01T00:00:00Z"
    );
}

#[test]
fn a_sha1_signed_rsa_intermediate_is_refused() {
    let (root_cert, root_key) = openssl_rsa_root("/O=plugca tests/CN=rsa root");
    let (cert, key) = openssl_signed(
        &root_cert,
        &root_key,
        "/O=plugca tests/CN=sha1 signer",
        CA_EXTENSIONS,
        "sha1",
    );
    assert!(openssl_text(&cert).contains("Signature Algorithm: sha1WithRSAEncryption"));
    let dir = tempfile::tempdir().unwrap();
    write_cacerts(dir.path(), &cert, &key, &cert, &root_cert);
    assert_eq!(
        load_err(dir.path()),
        "ca-cert.pem: \"O=plugca tests, CN=sha1 signer\" is signed with sha1WithRSAEncryption, which is not allowed (use SHA-256 or better)"
    );
}

#[test]
fn a_sha1_signed_ecdsa_intermediate_is_refused_as_weak() {
    let root = long_lived_root("root");
    let (cert, key) = openssl_signed(
        &root.cert_pem,
        &key_pem(&root),
        "/O=plugca tests/CN=sha1 signer",
        CA_EXTENSIONS,
        "sha1",
    );
    assert!(openssl_text(&cert).contains("Signature Algorithm: ecdsa-with-SHA1"));
    let dir = tempfile::tempdir().unwrap();
    write_cacerts(dir.path(), &cert, &key, &cert, &root.cert_pem);
    let expected = "ca-cert.pem: \"O=plugca tests, CN=sha1 signer\" is signed with ecdsa-with-SHA1, which is not allowed (use SHA-256 or better)";
    assert_eq!(load_err(dir.path()), expected);
    // The full inspection (what `plugca doctor` reports) names it once, and nothing else.
    let files = plugca::ca::bundle::read_files(dir.path()).unwrap().unwrap();
    let problems: Vec<String> =
        plugca::ca::bundle::inspect(&files, time::OffsetDateTime::now_utc())
            .problems
            .iter()
            .map(ToString::to_string)
            .collect();
    assert_eq!(problems, [expected]);
}

#[test]
fn an_intermediate_with_pathlen_zero_cannot_have_a_ca_below_it() {
    let root = long_lived_root("root");
    let mut mid_spec = ca_spec("mid", utc(2019, 1, 1), utc(2100, 1, 1));
    mid_spec.path_len = Some(0);
    let mid = gen_intermediate(&mid_spec, KeyChoice::P256, &root);
    let signing = gen_intermediate(
        &ca_spec("signing", utc(2019, 1, 1), utc(2100, 1, 1)),
        KeyChoice::P256,
        &mid,
    );
    let dir = tempfile::tempdir().unwrap();
    write_cacerts(
        dir.path(),
        &signing.cert_pem,
        &key_pem(&signing),
        &format!("{}{}", signing.cert_pem, mid.cert_pem),
        &root.cert_pem,
    );
    assert_eq!(
        load_err(dir.path()),
        "cert-chain.pem (certificate 2): \"O=plugca tests, CN=mid\" has pathlen:0 but 1 CA certificate(s) sit below it in the chain"
    );

    // pathlen:1 leaves room for the signing CA.
    mid_spec.path_len = Some(1);
    let mid = gen_intermediate(&mid_spec, KeyChoice::P256, &root);
    let signing = gen_intermediate(
        &ca_spec("signing", utc(2019, 1, 1), utc(2100, 1, 1)),
        KeyChoice::P256,
        &mid,
    );
    write_cacerts(
        dir.path(),
        &signing.cert_pem,
        &key_pem(&signing),
        &format!("{}{}", signing.cert_pem, mid.cert_pem),
        &root.cert_pem,
    );
    load_ok(dir.path());
}

// ---------------------------------------------------------------- the binary

/// Runs `plugca serve` on a bad cacerts dir; the process must exit by itself.
fn serve_and_expect_exit(cacerts: &Path) -> (Option<i32>, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_plugca"))
        .args(["serve", "--cacerts-dir"])
        .arg(cacerts)
        .args([
            "--grpc-addr",
            "127.0.0.1:0",
            "--monitoring-addr",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Guard against a server that starts instead of failing: kill it and fail the test.
    let (status, stderr) = common::refusal_of(
        child,
        Duration::from_secs(60),
        &format!(
            "plugca serve started on a bad bundle in {}",
            cacerts.display()
        ),
    );
    (status.code(), stderr)
}

#[test]
fn plugca_serve_exits_non_zero_naming_the_file_and_the_problem() {
    let mismatch = cacerts_from_samples(&[
        ("ca-cert.pem", "ca-cert-alt-2.pem"),
        ("ca-key.pem", "ca-key-alt-2.pem"),
        ("cert-chain.pem", "cert-chain-alt-2.pem"),
        ("root-cert.pem", "root-cert-alt.pem"),
    ]);
    let (code, stderr) = serve_and_expect_exit(mismatch.path());
    assert_eq!(code, Some(i32::from(plugca::cli::EXIT_START)), "{stderr}");
    assert!(
        stderr.contains(
            "plugca: error: the cert does not match the key: ca-key.pem is the key of another certificate than ca-cert.pem"
        ),
        "{stderr}"
    );

    let partial = sample_set1();
    std::fs::remove_file(partial.path().join("ca-key.pem")).unwrap();
    let (code, stderr) = serve_and_expect_exit(partial.path());
    assert_eq!(code, Some(i32::from(plugca::cli::EXIT_START)), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "plugca: error: incomplete CA bundle in {}",
            partial.path().display()
        )) && stderr.contains("but ca-key.pem is missing"),
        "{stderr}"
    );
}
