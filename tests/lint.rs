//! Issued certificates checked by an independent RFC 5280 linter (pkilint's
//! `lint_pkix_cert`), not by our own parser. `.ci/run` installs pkilint; a
//! local run without it skips with a message, CI (CI=true) fails instead.

mod common;

use common::*;
use plugca::client::CsrShape;

/// ERROR/FATAL findings, minus pkilint's known false positive on `spiffe://` URIs.
fn lint_errors(pem_text: &str) -> Option<Vec<String>> {
    let dir = tempfile::tempdir().unwrap();
    let path = write_temp(dir.path(), "c.pem", pem_text);
    let out = match std::process::Command::new("lint_pkix_cert")
        .args(["lint", "-s", "ERROR"])
        .arg(&path)
        .output()
    {
        Ok(out) => out,
        Err(_) if std::env::var_os("CI").is_none() => {
            eprintln!("lint_pkix_cert not installed (pip install pkilint): skipping");
            return None;
        }
        Err(e) => panic!("pkilint is required in CI: {e}"),
    };
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    Some(
        text.lines()
            .filter(|l| l.contains("(ERROR)") || l.contains("(FATAL)"))
            .filter(|l| !(l.contains("pkix.invalid_uri_syntax") && l.contains("spiffe://")))
            .map(str::to_string)
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn issued_leaves_and_generated_cas_pass_pkilint() {
    let mut certs_to_lint = vec![
        std::fs::read_to_string(format!("{CERTS}/ca-cert.pem")).unwrap(),
        std::fs::read_to_string(format!("{CERTS}/root-cert.pem")).unwrap(),
    ];
    for dir in [CERTS, SAMPLES] {
        let server = Server::start(&["--cacerts-dir", dir, "--insecure-trust-csr-identity"]).await;
        let mut client = server.client().await;
        let id = "spiffe://cluster.local/ns/foo/sa/bar";
        for key in [
            p256(),
            rsa(2048),
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap(),
        ] {
            for shape in [CsrShape::Ztunnel, CsrShape::Sidecar] {
                let chain = request(&mut client, csr(&key, Some(id), shape), &lab(3600))
                    .await
                    .unwrap();
                certs_to_lint.push(chain[0].clone());
            }
        }
        server.stop().await;
    }
    for pem_text in &certs_to_lint {
        let Some(errors) = lint_errors(pem_text) else {
            return;
        };
        assert!(
            errors.is_empty(),
            "pkilint errors: {errors:#?}\n{}",
            openssl_text(pem_text)
        );
    }
}
