//! The command line end to end: `plugca certs` makes a plug-in bundle that
//! openssl accepts, `plugca serve` loads it, `plugca request` gets a
//! certificate like a sidecar and writes the files istio-agent writes.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn plugca(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_plugca"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
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

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn certs_makes_an_istio_plugin_bundle_that_openssl_accepts() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let cluster = tmp.path().join("cluster1");
    for key in ["p384", "rsa2048"] {
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_dir_all(&cluster);
        ok(&plugca(&["certs", "root", "--out", p(&root), "--key", key]));
        let stdout = ok(&plugca(&[
            "certs",
            "intermediate",
            "--root",
            p(&root),
            "--name",
            "cluster1",
            "--out",
            p(&cluster),
            "--key",
            key,
        ]));
        assert!(
            stdout.contains("kubectl create secret generic cacerts -n istio-system"),
            "{stdout}"
        );
        for f in [
            "ca-cert.pem",
            "ca-key.pem",
            "cert-chain.pem",
            "root-cert.pem",
        ] {
            assert!(cluster.join(f).exists(), "{f}");
        }
        #[cfg(unix)]
        for key_file in [root.join("root-key.pem"), cluster.join("ca-key.pem")] {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", key_file.display());
        }
        let (verified, text) = openssl(&[
            "verify",
            "-CAfile",
            p(&cluster.join("root-cert.pem")),
            p(&cluster.join("ca-cert.pem")),
        ]);
        assert!(verified && text.contains(": OK"), "{text}");
        let (_, ca_text) = openssl(&[
            "x509",
            "-noout",
            "-text",
            "-in",
            p(&cluster.join("ca-cert.pem")),
        ]);
        assert!(ca_text.contains("CA:TRUE, pathlen:0"), "{ca_text}");
        assert!(
            ca_text.contains("X509v3 Basic Constraints: critical"),
            "{ca_text}"
        );
        assert!(ca_text.contains("Certificate Sign"), "{ca_text}");
        assert!(
            ca_text.contains("X509v3 Subject Key Identifier"),
            "{ca_text}"
        );
        assert!(
            ca_text.contains("X509v3 Authority Key Identifier"),
            "{ca_text}"
        );
        assert!(ca_text.contains("DNS:istiod.istio-system.svc"), "{ca_text}");
        assert!(
            ca_text.contains("L = cluster1") || ca_text.contains("L=cluster1"),
            "{ca_text}"
        );
        let expected_sig = if key == "p384" {
            "ecdsa-with-SHA384"
        } else {
            "sha256WithRSAEncryption"
        };
        assert!(ca_text.contains(expected_sig), "{ca_text}");
        assert!(!ca_text.to_lowercase().contains("sha1with"), "{ca_text}");
        // cert-chain.pem = ca-cert + root, like Istio's Makefile.
        let chain = std::fs::read_to_string(cluster.join("cert-chain.pem")).unwrap();
        assert_eq!(
            chain,
            std::fs::read_to_string(cluster.join("ca-cert.pem")).unwrap()
                + &std::fs::read_to_string(cluster.join("root-cert.pem")).unwrap()
        );
        // It loads with every server check.
        assert!(
            plugca::ca::CaBundle::load_dir(&cluster, time::OffsetDateTime::now_utc())
                .unwrap()
                .is_some()
        );
    }
}

#[test]
fn certs_refuses_to_overwrite_without_force_and_prints_a_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    ok(&plugca(&["certs", "root", "--out", p(&root)]));
    let again = plugca(&["certs", "root", "--out", p(&root)]);
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("refusing to overwrite") && stderr.contains("root-cert.pem"),
        "{stderr}"
    );
    ok(&plugca(&["certs", "root", "--out", p(&root), "--force"]));
    let yaml = ok(&plugca(&[
        "certs",
        "intermediate",
        "--root",
        p(&root),
        "--name",
        "east",
        "--out",
        p(&tmp.path().join("unused")),
        "--k8s-secret",
    ]));
    assert!(yaml.starts_with("apiVersion: v1\nkind: Secret\n"), "{yaml}");
    for key in [
        "ca-cert.pem:",
        "ca-key.pem:",
        "cert-chain.pem:",
        "root-cert.pem:",
    ] {
        assert!(yaml.contains(key), "{key} in {yaml}");
    }
    assert!(
        !tmp.path().join("unused").exists(),
        "--k8s-secret writes no files"
    );
    // A root directory whose key does not match its certificate is refused.
    let other = tmp.path().join("other");
    ok(&plugca(&["certs", "root", "--out", p(&other)]));
    std::fs::copy(other.join("root-key.pem"), root.join("root-key.pem")).unwrap();
    let bad = plugca(&[
        "certs",
        "intermediate",
        "--root",
        p(&root),
        "--name",
        "x",
        "--out",
        p(&tmp.path().join("x")),
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not the key of"));
}

#[tokio::test(flavor = "multi_thread")]
async fn request_writes_key_chain_and_root_like_istio_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let cacerts = tmp.path().join("cacerts");
    ok(&plugca(&["certs", "root", "--out", p(&root)]));
    ok(&plugca(&[
        "certs",
        "intermediate",
        "--root",
        p(&root),
        "--name",
        "c1",
        "--out",
        p(&cacerts),
    ]));
    let server = Server::start(&[
        "--cacerts-dir",
        p(&cacerts),
        "--insecure-trust-csr-identity",
    ])
    .await;
    let out_dir = tmp.path().join("httpbin");
    let addr = server.grpc.to_string();
    let root_file = cacerts.join("root-cert.pem");
    for key in ["p256", "rsa2048"] {
        let args = [
            "request",
            "--ca-addr",
            &addr,
            "--root-cert",
            p(&root_file),
            "--identity",
            "spiffe://cluster.local/ns/foo/sa/httpbin",
            "--out",
            p(&out_dir),
            "--key",
            key,
            "--ttl",
            "1h",
        ];
        let out = tokio::task::spawn_blocking({
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            move || {
                Command::new(env!("CARGO_BIN_EXE_plugca"))
                    .args(&args)
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        ok(&out);
        let chain = std::fs::read_to_string(out_dir.join("cert-chain.pem")).unwrap();
        let roots = std::fs::read_to_string(out_dir.join("root-cert.pem")).unwrap();
        assert_eq!(roots, std::fs::read_to_string(&root_file).unwrap());
        assert_eq!(der_of(&chain).len(), 2, "leaf + intermediate");
        // istio-agent's view: leaf first, root last; openssl verifies it.
        let (verified, text) = openssl(&[
            "verify",
            "-CAfile",
            p(&out_dir.join("root-cert.pem")),
            "-untrusted",
            p(&out_dir.join("cert-chain.pem")),
            p(&out_dir.join("cert-chain.pem")),
        ]);
        assert!(verified, "{text}");
        let facts = leaf_facts(&chain);
        assert_eq!(facts.uris, ["spiffe://cluster.local/ns/foo/sa/httpbin"]);
        assert_eq!(facts.lifetime_secs, 3600 + 120);
        // The key matches the leaf.
        let (_, key_pub) = openssl(&["pkey", "-in", p(&out_dir.join("key.pem")), "-pubout"]);
        let (_, cert_pub) = openssl(&[
            "x509",
            "-in",
            p(&out_dir.join("cert-chain.pem")),
            "-noout",
            "-pubkey",
        ]);
        assert_eq!(key_pub, cert_pub);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(out_dir.join("key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
    // A refusal is reported with the gRPC code and a non-zero exit.
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_plugca"))
            .args([
                "request",
                "--ca-addr",
                &addr,
                "--root-cert",
                root_file.to_str().unwrap(),
                "--identity",
                "spiffe://other.domain/ns/a/sa/b",
                "--out",
            ])
            .arg(tmp.path().join("refused"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Unauthenticated") && stderr.contains("request authenticate failure"),
        "{stderr}"
    );
    server.stop().await;
}

#[test]
fn bad_flags_exit_64_naming_the_flag() {
    let out = plugca(&["serve", "--default-ttl", "soon", "--cacerts-dir", CERTS]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--default-ttl") && stderr.contains("DEFAULT_WORKLOAD_CERT_TTL"),
        "{stderr}"
    );
    let help = ok(&plugca(&["serve", "--help"]));
    for flag in [
        "--cacerts-dir",
        "[env: ROOT_CA_DIR=]",
        "[default: /etc/cacerts]",
        "--grpc-addr",
        "[default: 0.0.0.0:15012]",
        "--monitoring-addr",
        "--trust-domain",
        "[env: TRUST_DOMAIN=]",
        "--default-ttl",
        "[default: 24h]",
        "--max-ttl",
        "[default: 2160h]",
        "--jwt-issuer",
        "--jwks-file",
        "--jwt-audience",
        "[default: istio-ca]",
        "--server-dns-names",
        "[env: ISTIOD_CUSTOM_HOST=]",
        "--insecure-trust-csr-identity",
    ] {
        assert!(help.contains(flag), "{flag} missing from serve --help");
    }
}
