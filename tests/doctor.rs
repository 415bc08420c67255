//! `plugca doctor`: the built binary on every Istio sample variant and on
//! bundles broken on purpose, asserting exit codes, the specific report text
//! and the JSON shape. Broken bundles are made with `plugca certs`, the
//! library generator, or openssl (RSA keys always with openssl).

mod common;

use std::path::Path;
use std::process::Command;

use common::{SAMPLES, cacerts_from_samples, private_if_key, sample_alt_set, sample_set1};
use plugca::ca::generate::{self, CaSpec, GeneratedCa, KeyChoice};
use time::{Duration, OffsetDateTime};

const PLUGCA: &str = env!("CARGO_BIN_EXE_plugca");

/// Runs `plugca doctor DIR`; returns the exit code and stdout + stderr.
fn doctor(dir: &Path) -> (i32, String) {
    let out = Command::new(PLUGCA)
        .arg("doctor")
        .arg(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap(), text)
}

fn doctor_json(dir: &Path) -> (i32, serde_json::Value) {
    let out = Command::new(PLUGCA)
        .args(["doctor", "--json"])
        .arg(dir)
        .output()
        .unwrap();
    let value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    (out.status.code().unwrap(), value)
}

#[track_caller]
fn assert_has(report: &str, needles: &[&str]) {
    for n in needles {
        assert!(report.contains(n), "missing {n:?} in:\n{report}");
    }
}

/// The report line for a file of the `files:` section.
#[track_caller]
fn file_line<'a>(report: &'a str, name: &str) -> &'a str {
    let prefix = format!("  {name} ");
    report
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no line for {name} in:\n{report}"))
}

fn codes(json: &serde_json::Value) -> Vec<(String, String)> {
    json["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["severity"].as_str().unwrap().to_string(),
                p["code"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn istiod(ca: &str, key: &str, chain: &str, root: &str) -> tempfile::TempDir {
    cacerts_from_samples(&[
        ("ca-cert.pem", ca),
        ("ca-key.pem", key),
        ("cert-chain.pem", chain),
        ("root-cert.pem", root),
    ])
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn plugca(args: &[&str]) {
    let out = Command::new(PLUGCA).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "plugca {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
    private_if_key(&dir.join(name));
}

fn spec(cn: &str, not_before: OffsetDateTime, not_after: OffsetDateTime) -> CaSpec {
    CaSpec {
        organization: Some("Istio".into()),
        common_name: Some(cn.into()),
        locality: None,
        not_before,
        not_after,
        path_len: None,
        dns_sans: Vec::new(),
    }
}

/// A P-256 root valid for a year around now.
fn root() -> GeneratedCa {
    let now = OffsetDateTime::now_utc();
    let key = generate::generate_key(KeyChoice::P256).unwrap();
    generate::self_signed_root(
        &spec(
            "Root CA",
            now - Duration::days(1),
            now + Duration::days(365),
        ),
        key,
    )
    .unwrap()
}

fn intermediate(
    root: &GeneratedCa,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> GeneratedCa {
    let key = generate::generate_key(KeyChoice::P256).unwrap();
    generate::intermediate(
        &spec("Intermediate CA", not_before, not_after),
        key,
        &root.cert_der,
        &root.key,
    )
    .unwrap()
}

/// A cacerts directory for `ca` under `root` (chain = ca-cert only).
fn bundle(ca: &GeneratedCa, root: &GeneratedCa) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "ca-cert.pem", &ca.cert_pem);
    write(dir.path(), "ca-key.pem", &ca.key.secret_pkcs8_pem());
    write(dir.path(), "cert-chain.pem", &ca.cert_pem);
    write(dir.path(), "root-cert.pem", &root.cert_pem);
    dir
}

// ---- Istio's sample variants -------------------------------------------------

#[test]
fn sample_set_1_is_healthy_and_flagged_as_public_sample_material() {
    let dir = sample_set1();
    let (code, report) = doctor(dir.path());
    assert_eq!(code, 0, "{report}");
    assert_has(
        &report,
        &[
            "layout: istiod cacerts (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem)",
            "key: ca-key.pem: RSA 2048 (RSA PRIVATE KEY), matches the signing certificate",
            "ca-cert.pem #1: signing certificate",
            "subject:    C=US, ST=California, L=Sunnyvale, O=Istio, CN=Istio CA",
            "key:        RSA 2048    signature: sha256WithRSAEncryption",
            "valid:      2018-01-24T19:15:51Z to 2117-12-31T19:15:51Z",
            "CA:         yes, no pathlen",
            "key usage:  keyCertSign",
            "SAN:        DNS:ca.istio.io",
            "SKI:        (none)",
            "cert-chain.pem #1: same certificate as ca-cert.pem #1",
            "root-cert.pem #1: root (trust anchor of the chain)",
            "SKI:        39:46:06:B5:4C:A1:7A:EC:4E:E2:51:9E:E0:EA:75:CB:C3:55:A1:A8",
            "  ca-cert.pem #1  \"C=US, ST=California, L=Sunnyvale, O=Istio, CN=Istio CA\"  [signing]\n  └─ root-cert.pem #1  ",
            "warning [istio-sample-ca] root-cert.pem: root-cert.pem trusts Istio's public sample CA: root-cert.pem #1 is samples/certs/root-cert.pem, and samples/certs/ca-key.pem (the key of ca-cert.pem) is public",
            "note [no-subject-key-id] ca-cert.pem: ca-cert.pem has no subjectKeyIdentifier",
            "result: healthy, plugca serve loads this bundle (0 error(s), 1 warning(s), 1 note(s))",
        ],
    );
}

#[test]
fn the_alt_set_notes_that_its_chain_repeats_the_root() {
    let dir = sample_alt_set();
    let (code, report) = doctor(dir.path());
    assert_eq!(code, 0, "{report}");
    assert_has(
        &report,
        &[
            "key: ca-key.pem: RSA 4096 (PRIVATE KEY), matches the signing certificate",
            "CA:         yes, pathlen:0",
            "key usage:  digitalSignature, nonRepudiation, keyEncipherment, keyCertSign",
            "root-cert.pem #1: same certificate as cert-chain.pem #2",
            "note [root-in-cert-chain] cert-chain.pem: cert-chain.pem #2 is the root (the same certificate as root-cert.pem #1)",
            "istiod sends cert-chain.pem and then root-cert.pem, so its workloads receive this root twice; plugca sends only the path below the root, so once",
            "samples/certs/root-cert-alt.pem, and samples/certs/ca-key-alt.pem (the key of ca-cert-alt.pem) is public",
            "result: healthy",
        ],
    );
}

#[test]
fn the_alt_2_pair_is_named_as_istios_mismatched_sample_key() {
    let dir = istiod(
        "ca-cert-alt-2.pem",
        "ca-key-alt-2.pem",
        "cert-chain-alt-2.pem",
        "root-cert-alt.pem",
    );
    let (code, report) = doctor(dir.path());
    assert_eq!(code, 1, "{report}");
    assert_has(
        &report,
        &[
            "key: ca-key.pem: RSA 4096 (PRIVATE KEY), does NOT match the signing certificate nor any certificate here",
            "error [key-mismatch] ca-key.pem: the cert does not match the key: ca-key.pem is the key of another certificate than ca-cert.pem (\"O=Istio, CN=Intermediate CA, L=cluster2\")",
            "ca-key.pem is Istio's samples/certs/ca-key-alt-2.pem, which matches no published certificate",
            "istio/istio#49648",
            "result: PROBLEMS, plugca serve refuses this bundle (1 error(s)",
        ],
    );
}

#[test]
fn combined_roots_warn_about_the_missing_trailing_newline() {
    let dir = istiod(
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert-combined.pem",
    );
    let (code, report) = doctor(dir.path());
    assert_eq!(code, 0, "{report}");
    assert!(
        file_line(&report, "root-cert.pem")
            .ends_with("3245 bytes, CERTIFICATE + CERTIFICATE, no trailing newline"),
        "{report}"
    );
    assert_has(
        &report,
        &[
            "warning [root-missing-trailing-newline] root-cert.pem: root-cert.pem does not end with a newline",
            "istiod passes root-cert.pem through verbatim as the last element of every CreateCertificate response",
            "fix: `echo >> root-cert.pem`",
            "note [multiple-roots] root-cert.pem: root-cert.pem holds 2 distinct roots; ca-cert.pem chains to root-cert.pem #1",
            "root-cert.pem #2: root (not on the chain)",
        ],
    );
    // The alt intermediate chains to the second root of the same bundle.
    let dir = istiod(
        "ca-cert-alt.pem",
        "ca-key-alt.pem",
        "cert-chain-alt.pem",
        "root-cert-combined.pem",
    );
    let (code, report) = doctor(dir.path());
    assert_eq!(code, 0, "{report}");
    assert_has(
        &report,
        &["ca-cert.pem chains to root-cert.pem #2 (\"O=Istio, CN=Root CA\")"],
    );
}

#[test]
fn combined_2_warns_about_the_duplicate_root() {
    let dir = istiod(
        "ca-cert-alt.pem",
        "ca-key-alt.pem",
        "cert-chain-alt.pem",
        "root-cert-combined-2.pem",
    );
    let (code, report) = doctor(dir.path());
    assert_eq!(code, 0, "{report}");
    assert_has(
        &report,
        &[
            "warning [duplicate-root] root-cert.pem: root-cert.pem #3 is a duplicate of root-cert.pem #2 (\"O=Istio, CN=Root CA\")",
            "every workload receives this root twice",
            "warning [root-missing-trailing-newline]",
            "root-cert.pem holds 2 distinct roots",
        ],
    );
}

#[test]
fn the_workload_leaf_as_ca_cert_is_named_with_the_cert_that_belongs_there() {
    // With the real CA key: the key points at the CA certificate in cert-chain.pem.
    let dir = istiod(
        "leaf-workload-foo-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    );
    let (code, report) = doctor(dir.path());
    assert_eq!(code, 1, "{report}");
    assert_has(
        &report,
        &[
            "it is the key of cert-chain.pem #1",
            "error [wrong-signing-certificate] ca-cert.pem: the cert does not match the key",
            "ca-cert.pem holds a leaf (workload) certificate (URI:spiffe://trust-domain-foo/ns/foo/sa/foo), while ca-key.pem is the key of cert-chain.pem #1 (\"C=US, ST=California, L=Sunnyvale, O=Istio, CN=Istio CA\")",
            "fix: put the certificate of cert-chain.pem #1 in ca-cert.pem",
            "error [leaf-as-ca] ca-cert.pem: ca-cert.pem: <empty subject> from ca-cert.pem is not a CA certificate (basicConstraints CA:TRUE missing)",
            "  ca-cert.pem #1  <empty subject>  [signing]",
        ],
    );
    // One explanation for a leaf, not three (its keyUsage also lacks keyCertSign).
    assert!(!report.contains("[no-keycertsign]"), "{report}");
    assert!(
        !report.contains("[cert-chain-without-signing-cert]"),
        "{report}"
    );

    // With the leaf's own key: only the leaf-as-CA error.
    let dir = istiod(
        "leaf-workload-foo-cert.pem",
        "workload-foo-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    );
    let (code, report) = doctor(dir.path());
    assert_eq!(code, 1, "{report}");
    assert_has(
        &report,
        &[
            "error [leaf-as-ca] ca-cert.pem",
            "the CA that issued it is cert-chain.pem #1",
        ],
    );
    assert!(!report.contains("[wrong-signing-certificate]"), "{report}");
}

#[test]
fn json_has_a_stable_shape() {
    let dir = sample_set1();
    let (code, json) = doctor_json(dir.path());
    assert_eq!(code, 0);
    assert_eq!(json["healthy"], true);
    assert_eq!(json["load_error"], serde_json::Value::Null);
    assert_eq!(json["layout"]["id"], "istiod");
    assert_eq!(json["files"].as_array().unwrap().len(), 4);
    assert_eq!(json["files"][3]["name"], "root-cert.pem");
    assert_eq!(json["files"][3]["trailing_newline"], true);
    assert_eq!(json["key"]["key_type"], "RSA 2048");
    assert_eq!(json["key"]["format"], "RSA PRIVATE KEY");
    assert_eq!(json["key"]["matches_signing_cert"], true);
    let certs = json["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 3);
    let ca = &certs[0];
    assert_eq!(ca["file"], "ca-cert.pem");
    assert_eq!(ca["index"], 1);
    assert_eq!(ca["role"], "signing certificate");
    assert_eq!(ca["key_type"], "RSA 2048");
    assert_eq!(ca["is_ca"], true);
    assert_eq!(ca["path_len"], serde_json::Value::Null);
    assert_eq!(ca["key_usage"], serde_json::json!(["keyCertSign"]));
    assert_eq!(ca["subject_key_id"], serde_json::Value::Null);
    assert_eq!(ca["signature_algorithm"], "sha256WithRSAEncryption");
    assert_eq!(
        ca["sha256"],
        "f867174e4a31f1792f8c0354a23f8f049bd4019729cd2ee579d67033065b2dc2"
    );
    assert_eq!(ca["istio_sample"], "samples/certs/ca-cert.pem");
    assert!(ca["days_left"].as_i64().unwrap() > 30_000);
    assert_eq!(certs[1]["same_as"], "ca-cert.pem #1");
    assert_eq!(certs[2]["self_signed"], true);
    let chain = json["chain"].as_array().unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[0]["certificate"], "ca-cert.pem #1");
    assert_eq!(chain[0]["role"], "signing");
    assert_eq!(chain[1]["certificate"], "root-cert.pem #1");
    assert_eq!(chain[1]["role"], "root");
    assert_eq!(json["chain_complete"], true);
    for p in json["problems"].as_array().unwrap() {
        for field in ["severity", "code", "file", "message", "detail", "fix"] {
            assert!(p.get(field).is_some(), "{field} missing in {p}");
        }
    }
    assert_eq!(
        codes(&json),
        [
            ("warning".to_string(), "istio-sample-ca".to_string()),
            ("note".to_string(), "no-subject-key-id".to_string()),
        ]
    );

    let dir = istiod(
        "ca-cert-alt-2.pem",
        "ca-key-alt-2.pem",
        "cert-chain-alt-2.pem",
        "root-cert-alt.pem",
    );
    let (code, json) = doctor_json(dir.path());
    assert_eq!(code, 1);
    assert_eq!(json["healthy"], false);
    assert_eq!(json["problems"][0]["severity"], "error");
    assert_eq!(json["problems"][0]["code"], "key-mismatch");
    assert_eq!(json["problems"][0]["file"], "ca-key.pem");
    assert_eq!(json["problems"][0]["message"], json["load_error"]);
    assert_eq!(json["key"]["matches_certificate"], serde_json::Value::Null);
}

#[test]
fn doctor_reports_the_servers_own_load_error() {
    let variants = [
        istiod(
            "ca-cert-alt-2.pem",
            "ca-key-alt-2.pem",
            "cert-chain-alt-2.pem",
            "root-cert-alt.pem",
        ),
        istiod(
            "leaf-workload-foo-cert.pem",
            "ca-key.pem",
            "cert-chain.pem",
            "root-cert.pem",
        ),
        istiod(
            "leaf-workload-foo-cert.pem",
            "workload-foo-key.pem",
            "cert-chain.pem",
            "root-cert.pem",
        ),
        istiod(
            "ca-cert.pem",
            "ca-key.pem",
            "cert-chain.pem",
            "root-cert-alt.pem",
        ),
        istiod(
            "root-cert.pem",
            "ca-key.pem",
            "cert-chain.pem",
            "root-cert.pem",
        ),
        istiod(
            "ca-key.pem",
            "ca-cert.pem",
            "cert-chain.pem",
            "root-cert.pem",
        ),
        cacerts_from_samples(&[
            ("ca-cert.pem", "ca-cert.pem"),
            ("root-cert.pem", "root-cert.pem"),
        ]),
    ];
    for dir in &variants {
        let server = plugca::ca::CaBundle::load_dir(dir.path(), OffsetDateTime::now_utc())
            .expect_err("the server refuses this bundle")
            .to_string();
        let (code, json) = doctor_json(dir.path());
        assert_eq!(code, 1);
        assert_eq!(json["load_error"], server.as_str());
        assert_eq!(json["problems"][0]["message"], server.as_str());
    }
    for dir in [sample_set1(), sample_alt_set()] {
        assert!(plugca::ca::CaBundle::load_dir(dir.path(), OffsetDateTime::now_utc()).is_ok());
        assert_eq!(doctor_json(dir.path()).1["healthy"], true);
    }
}

// ---- bundles broken on purpose ----------------------------------------------

#[test]
fn a_missing_or_empty_directory_is_exit_2() {
    let (code, text) = doctor(Path::new("/nonexistent/cacerts"));
    assert_eq!(code, 2);
    assert_has(&text, &["cannot read the directory"]);
    let (code, json) = doctor_json(Path::new("/nonexistent/cacerts"));
    assert_eq!(code, 2);
    assert_eq!(json["error"]["code"], "unreadable-directory");
    assert_eq!(json["healthy"], false);

    let empty = tempfile::tempdir().unwrap();
    let (code, text) = doctor(empty.path());
    assert_eq!(code, 2);
    assert_has(&text, &["no CA bundle here", "self-signed root"]);
}

#[test]
fn a_partial_bundle_lists_what_is_missing_and_still_shows_the_certificates() {
    let dir = sample_set1();
    std::fs::remove_file(dir.path().join("ca-key.pem")).unwrap();
    let (code, report) = doctor(dir.path());
    assert_eq!(code, 1, "{report}");
    assert!(
        file_line(&report, "ca-key.pem").ends_with("MISSING"),
        "{report}"
    );
    assert_has(
        &report,
        &[
            "error [incomplete-bundle] incomplete CA bundle in",
            "but ca-key.pem is missing",
            "istiod refuses a partial bundle too",
            "ca-cert.pem #1: unchecked",
            "subject:    C=US, ST=California, L=Sunnyvale, O=Istio, CN=Istio CA",
        ],
    );
}

#[test]
fn unreadable_and_der_files_are_named() {
    let dir = sample_set1();
    std::fs::remove_file(dir.path().join("root-cert.pem")).unwrap();
    std::fs::create_dir(dir.path().join("root-cert.pem")).unwrap();
    let (code, report) = doctor(dir.path());
    assert_eq!(code, 1, "{report}");
    assert!(
        file_line(&report, "root-cert.pem").ends_with("UNREADABLE"),
        "{report}"
    );
    assert_has(
        &report,
        &[
            "error [unreadable-file] root-cert.pem:",
            "make root-cert.pem a regular file readable by the user running plugca",
        ],
    );

    let dir = sample_set1();
    openssl(
        dir.path(),
        &[
            "x509",
            "-in",
            "root-cert.pem",
            "-outform",
            "der",
            "-out",
            "root-cert.pem",
        ],
    );
    let (code, report) = doctor(dir.path());
    assert_eq!(code, 1, "{report}");
    assert_has(
        &report,
        &[
            "error [unreadable-file] root-cert.pem:",
            "not UTF-8 text (is it DER instead of PEM?)",
            "openssl x509 -inform der -in root-cert.pem",
        ],
    );
}

#[test]
fn the_root_in_ca_cert_pem_is_named_as_the_wrong_file() {
    let dir = istiod(
        "root-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    );
    let (code, report) = doctor(dir.path());
    assert_eq!(code, 1, "{report}");
    assert_has(
        &report,
        &[
            "error [wrong-signing-certificate] ca-cert.pem",
            "ca-cert.pem holds the root certificate (the same as the one in the root bundle), while ca-key.pem is the key of cert-chain.pem #1",
        ],
    );
    assert!(!report.contains("[unused-chain-certificate]"), "{report}");
}

#[test]
fn a_root_from_another_ca_is_reported_as_missing_root() {
    let dir = istiod(
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert-alt.pem",
    );
    let (code, report) = doctor(dir.path());
    assert_eq!(code, 1, "{report}");
    assert_has(
        &report,
        &[
            "error [root-missing] root-cert.pem: cannot verify the chain: ca-cert.pem (\"C=US, ST=California, L=Sunnyvale, O=Istio, CN=Istio CA\") was issued by",
            "but root-cert.pem holds a different root with the same CN, \"O=Istio, CN=Root CA\" (root-cert.pem #1)",
            "└─ ✗ the chain stops here",
        ],
    );
}

#[test]
fn a_regenerated_root_with_the_same_name_is_a_name_clash() {
    let work = tempfile::tempdir().unwrap();
    let p = |name: &str| work.path().join(name).display().to_string();
    plugca(&["certs", "root", "--out", &p("rootA")]);
    plugca(&["certs", "root", "--out", &p("rootB")]);
    plugca(&[
        "certs",
        "intermediate",
        "--root",
        &p("rootA"),
        "--name",
        "cluster1",
        "--out",
        &p("cacerts"),
    ]);
    let cacerts = work.path().join("cacerts");
    // A fresh bundle from `plugca certs` is healthy: only the tools/certs-style chain note.
    let (code, report) = doctor(&cacerts);
    assert_eq!(code, 0, "{report}");
    assert!(!report.contains("warning ["), "{report}");
    assert_has(
        &report,
        &[
            "note [root-in-cert-chain]",
            "key: ca-key.pem: ECDSA P-256 (PRIVATE KEY)",
        ],
    );

    // Plug in root B (same O and CN) and keep only ca-cert in the chain.
    std::fs::copy(
        work.path().join("rootB/root-cert.pem"),
        cacerts.join("root-cert.pem"),
    )
    .unwrap();
    std::fs::copy(cacerts.join("ca-cert.pem"), cacerts.join("cert-chain.pem")).unwrap();
    let (code, report) = doctor(&cacerts);
    assert_eq!(code, 1, "{report}");
    assert_has(
        &report,
        &[
            "error [issuer-name-clash] root-cert.pem: cannot verify the chain: the signature of ca-cert.pem",
            "it was signed by a different CA with the same name",
            "its authorityKeyIdentifier",
            "differs from the subjectKeyIdentifier",
        ],
    );
}

#[test]
fn sha1_and_md5_signatures_are_errors_with_the_reissue_command() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "root-key.pem",
            "-subj",
            "/O=Istio/CN=Root CA",
            "-days",
            "30",
            "-sha256",
            "-addext",
            "basicConstraints=critical,CA:true",
            "-addext",
            "keyUsage=critical,keyCertSign",
            "-out",
            "root-cert.pem",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-subj",
            "/O=Istio/CN=Intermediate CA",
            "-out",
            "ca.csr",
        ],
    );
    write(
        d,
        "ext",
        "basicConstraints=critical,CA:true,pathlen:0\nkeyUsage=critical,keyCertSign\n",
    );
    for (md, algorithm) in [
        ("-sha1", "sha1WithRSAEncryption"),
        ("-md5", "md5WithRSAEncryption"),
    ] {
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "ca.csr",
                "-CA",
                "root-cert.pem",
                "-CAkey",
                "root-key.pem",
                "-set_serial",
                "7",
                "-days",
                "20",
                md,
                "-extfile",
                "ext",
                "-out",
                "ca-cert.pem",
            ],
        );
        std::fs::copy(d.join("ca-cert.pem"), d.join("cert-chain.pem")).unwrap();
        let (code, report) = doctor(d);
        assert_eq!(code, 1, "{report}");
        assert_has(
            &report,
            &[
                &format!(
                    "error [weak-signature] ca-cert.pem: ca-cert.pem: \"O=Istio, CN=Intermediate CA\" is signed with {algorithm}, which is not allowed"
                ),
                "re-issue the certificate with SHA-256",
                &format!("signature: {algorithm} (WEAK)"),
            ],
        );
    }

    // ECDSA with SHA-1 cannot even be verified: still named as the weak signature.
    let root = root();
    write(d, "root-cert.pem", &root.cert_pem);
    write(d, "root-key.pem", &root.key.secret_pkcs8_pem());
    openssl(
        d,
        &[
            "ecparam",
            "-genkey",
            "-name",
            "prime256v1",
            "-noout",
            "-out",
            "ca-key.pem",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-new",
            "-key",
            "ca-key.pem",
            "-subj",
            "/O=Istio/CN=Intermediate CA",
            "-out",
            "ca.csr",
        ],
    );
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "ca.csr",
            "-CA",
            "root-cert.pem",
            "-CAkey",
            "root-key.pem",
            "-set_serial",
            "8",
            "-days",
            "20",
            "-sha1",
            "-extfile",
            "ext",
            "-out",
            "ca-cert.pem",
        ],
    );
    std::fs::copy(d.join("ca-cert.pem"), d.join("cert-chain.pem")).unwrap();
    std::fs::remove_file(d.join("root-key.pem")).unwrap();
    let (code, report) = doctor(d);
    assert_eq!(code, 1, "{report}");
    assert_has(
        &report,
        &[
            "error [weak-signature] ca-cert.pem: ca-cert.pem: \"O=Istio, CN=Intermediate CA\" is signed with ecdsa-with-SHA1",
        ],
    );
    assert!(!report.contains("[issuer-name-clash]"), "{report}");
}

#[test]
fn an_expired_intermediate_is_an_error_and_a_nearly_expired_one_a_warning() {
    let now = OffsetDateTime::now_utc();
    let root = root();
    let expired = intermediate(&root, now - Duration::days(30), now - Duration::days(1));
    let dir = bundle(&expired, &root);
    let (code, report) = doctor(dir.path());
    assert_eq!(code, 1, "{report}");
    assert_has(
        &report,
        &[
            "error [expired] ca-cert.pem: ca-cert.pem: \"O=Istio, CN=Intermediate CA\" expired at",
            "EXPIRED 1 day(s) ago",
            "plugca certs intermediate --root ROOT_DIR",
        ],
    );

    let soon = intermediate(
        &root,
        now - Duration::days(1),
        now + Duration::days(10) + Duration::hours(1),
    );
    let dir = bundle(&soon, &root);
    let (code, report) = doctor(dir.path());
    assert_eq!(code, 0, "{report}");
    assert_has(
        &report,
        &[
            "warning [expiring-soon] ca-cert.pem: ca-cert.pem #1 (\"O=Istio, CN=Intermediate CA\") expires in 10 day(s)",
            "(10 day(s) left)",
        ],
    );

    let future = intermediate(&root, now + Duration::days(2), now + Duration::days(90));
    let dir = bundle(&future, &root);
    let (code, report) = doctor(dir.path());
    assert_eq!(code, 1, "{report}");
    assert_has(
        &report,
        &["error [not-yet-valid] ca-cert.pem", "check the clock"],
    );
}

#[test]
fn an_encrypted_key_is_an_error_with_the_openssl_pkey_hint() {
    let dir = sample_set1();
    openssl(
        dir.path(),
        &[
            "pkey",
            "-in",
            "ca-key.pem",
            "-aes256",
            "-passout",
            "pass:secret",
            "-out",
            "encrypted.pem",
        ],
    );
    std::fs::rename(
        dir.path().join("encrypted.pem"),
        dir.path().join("ca-key.pem"),
    )
    .unwrap();
    let (code, report) = doctor(dir.path());
    assert_eq!(code, 1, "{report}");
    assert!(
        file_line(&report, "ca-key.pem").ends_with("ENCRYPTED PRIVATE KEY"),
        "{report}"
    );
    assert_has(
        &report,
        &[
            "error [encrypted-key] ca-key.pem: ca-key.pem: the key is encrypted",
            "fix: decrypt it: `openssl pkey -in ca-key.pem -out ca-key.pem.plain`",
        ],
    );
}

#[test]
fn an_ec_parameters_block_before_the_key_is_a_note_about_istiod() {
    let root = root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "root-cert.pem", &root.cert_pem);
    write(d, "root-key.pem", &root.key.secret_pkcs8_pem());
    // Default `openssl ecparam -genkey` output: EC PARAMETERS, then EC PRIVATE KEY.
    openssl(
        d,
        &[
            "ecparam",
            "-genkey",
            "-name",
            "prime256v1",
            "-out",
            "ca-key.pem",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-new",
            "-key",
            "ca-key.pem",
            "-subj",
            "/O=Istio/CN=Intermediate CA",
            "-out",
            "ca.csr",
        ],
    );
    write(
        d,
        "ext",
        "basicConstraints=critical,CA:true,pathlen:0\nkeyUsage=critical,keyCertSign\nsubjectKeyIdentifier=hash\n",
    );
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "ca.csr",
            "-CA",
            "root-cert.pem",
            "-CAkey",
            "root-key.pem",
            "-set_serial",
            "9",
            "-days",
            "90",
            "-sha256",
            "-extfile",
            "ext",
            "-out",
            "ca-cert.pem",
        ],
    );
    std::fs::copy(d.join("ca-cert.pem"), d.join("cert-chain.pem")).unwrap();
    std::fs::remove_file(d.join("root-key.pem")).unwrap();
    let (code, report) = doctor(d);
    assert_eq!(code, 0, "{report}");
    assert_has(
        &report,
        &[
            "EC PARAMETERS + EC PRIVATE KEY",
            "key: ca-key.pem: ECDSA P-256 (EC PRIVATE KEY after EC PARAMETERS), matches the signing certificate",
            "note [ec-parameters-block] ca-key.pem: ca-key.pem starts with an EC PARAMETERS block",
            "istiod refuses this file (\"unsupported PEM block type for a private key: EC PARAMETERS\")",
        ],
    );
}

#[test]
fn a_chain_without_the_signing_cert_warns_about_istiod() {
    let dir = sample_set1();
    write(dir.path(), "cert-chain.pem", "");
    let (code, report) = doctor(dir.path());
    assert_eq!(code, 0, "{report}");
    assert_has(
        &report,
        &[
            "warning [cert-chain-without-signing-cert] cert-chain.pem: cert-chain.pem does not contain the signing certificate ca-cert.pem",
            "plugca always sends ca-cert.pem",
        ],
    );
}

#[test]
fn swapped_cert_and_key_files_are_recognised() {
    let dir = istiod(
        "ca-key.pem",
        "ca-cert.pem",
        "cert-chain.pem",
        "root-cert.pem",
    );
    let (code, report) = doctor(dir.path());
    assert_eq!(code, 1, "{report}");
    assert_has(
        &report,
        &[
            "error [key-in-certificate-file] ca-cert.pem: ca-cert.pem: block 1 is a \"RSA PRIVATE KEY\" block, not a CERTIFICATE",
            "error [certificate-in-key-file] ca-key.pem",
        ],
    );
}

#[test]
fn the_kubernetes_tls_layout_is_detected() {
    let root = root();
    let now = OffsetDateTime::now_utc();
    let ca = intermediate(&root, now - Duration::days(1), now + Duration::days(200));
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "tls.crt", &ca.cert_pem);
    write(dir.path(), "tls.key", &ca.key.secret_pkcs8_pem());
    write(dir.path(), "ca.crt", &root.cert_pem);
    let (code, report) = doctor(dir.path());
    assert_eq!(code, 0, "{report}");
    assert_has(
        &report,
        &[
            "layout: kubernetes.io/tls (tls.crt, tls.key, ca.crt)",
            "key: tls.key: ECDSA P-256 (PRIVATE KEY), matches the signing certificate",
            "  tls.crt #1  \"O=Istio, CN=Intermediate CA\"  [signing]\n  └─ ca.crt #1  \"O=Istio, CN=Root CA\"  [root]",
            "problems: none",
        ],
    );
    let (_, json) = doctor_json(dir.path());
    assert_eq!(json["layout"]["id"], "kubernetes-tls");
}

#[test]
fn the_samples_directory_itself_loads_as_set_1() {
    // SAMPLES holds every variant; the istiod file names pick set 1.
    let (code, report) = doctor(Path::new(SAMPLES));
    assert_eq!(code, 0, "{report}");
    assert_has(&report, &["ca-cert.pem #1: signing certificate"]);
}
