//! `plugca certs istiod`: the files istiod mounts, checked with openssl
//! (names, chain to the plugged root, key matches the leaf), create-new
//! semantics and the key's mode.

use std::path::Path;
use std::process::{Command, Output};

fn plugca(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_plugca"))
        .args(args)
        .output()
        .unwrap()
}

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl").args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn certs_dir() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("certs")
        .display()
        .to_string()
}

#[test]
fn istiod_files_verify_with_openssl_and_carry_istiods_names() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().to_str().unwrap();
    let run = plugca(&[
        "certs",
        "istiod",
        "--cacerts-dir",
        &certs_dir(),
        "--out",
        out,
        "--revision",
        "canary",
        "--dns-name",
        "istiod.example.com",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let crt = format!("{out}/tls.crt");
    let key = format!("{out}/tls.key");
    let ca = format!("{out}/ca.crt");

    // tls.crt = leaf + intermediates; ca.crt = the roots: openssl builds the path.
    let (ok, text) = openssl(&[
        "verify",
        "-CAfile",
        &ca,
        "-untrusted",
        &crt,
        "-purpose",
        "sslserver",
        &crt,
    ]);
    assert!(ok, "{text}");
    let (ok, text) = openssl(&["x509", "-in", &crt, "-noout", "-ext", "subjectAltName"]);
    assert!(ok, "{text}");
    for name in [
        "DNS:istiod.istio-system.svc",
        "DNS:istiod-canary.istio-system.svc",
        "DNS:istiod.example.com",
        "URI:spiffe://cluster.local/ns/istio-system/sa/istiod",
    ] {
        assert!(text.contains(name), "{name} missing: {text}");
    }
    // The key belongs to the leaf.
    let (ok, leaf_pub) = openssl(&["x509", "-in", &crt, "-noout", "-pubkey"]);
    assert!(ok, "{leaf_pub}");
    let (ok, key_pub) = openssl(&["pkey", "-in", &key, "-pubout"]);
    assert!(ok, "{key_pub}");
    assert_eq!(leaf_pub, key_pub);
    // Same root bundle as root-cert.pem of the plugged CA.
    let roots = std::fs::read_to_string(format!("{}/root-cert.pem", certs_dir())).unwrap();
    let ca_text = std::fs::read_to_string(&ca).unwrap();
    assert_eq!(ca_text.trim(), roots.trim());

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    // A second run never overwrites.
    let again = plugca(&[
        "certs",
        "istiod",
        "--cacerts-dir",
        &certs_dir(),
        "--out",
        out,
    ]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("refusing to overwrite"), "{err}");
}

#[test]
fn k8s_secret_prints_an_istiod_tls_secret_of_type_tls() {
    let run = plugca(&[
        "certs",
        "istiod",
        "--cacerts-dir",
        &certs_dir(),
        "--namespace",
        "mesh",
        "--k8s-secret",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let yaml = String::from_utf8(run.stdout).unwrap();
    assert!(
        yaml.contains("  name: istiod-tls\n  namespace: mesh\ntype: kubernetes.io/tls\n"),
        "{yaml}"
    );
    for key in ["tls.crt: ", "tls.key: ", "ca.crt: "] {
        assert!(yaml.contains(key), "{key}: {yaml}");
    }
}

#[test]
fn without_a_plugged_bundle_it_refuses() {
    let empty = tempfile::tempdir().unwrap();
    let run = plugca(&[
        "certs",
        "istiod",
        "--cacerts-dir",
        empty.path().to_str().unwrap(),
        "--k8s-secret",
    ]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("no CA bundle"));
}
