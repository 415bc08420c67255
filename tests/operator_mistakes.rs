//! Operator mistakes (issue 12, item 9), made with the real binary: a
//! self-signed directory that is the cacerts directory under another
//! spelling, a mistyped, empty or unreadable cacerts directory, a CA key
//! other users can read, and `plugca certs --force` over a planted symlink.
//! (`ttl:` faults past `--max-ttl` are in `harness.rs`.)

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use plugca::client::CsrShape;

const BIN: &str = env!("CARGO_BIN_EXE_plugca");
const ISTIOD_FILES: [&str; 4] = [
    "ca-cert.pem",
    "ca-key.pem",
    "cert-chain.pem",
    "root-cert.pem",
];

/// Runs `plugca serve <args>` in `cwd` and expects it to exit by itself
/// within 30 s: (exit code, stderr).
fn serve_expecting_exit(cwd: &Path, args: &[&str], as_nobody: bool) -> (Option<i32>, String) {
    let mut cmd = if as_nobody {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN]);
        c
    } else {
        Command::new(BIN)
    };
    let child = cmd
        .arg("serve")
        .args(args)
        .args([
            "--grpc-addr",
            "127.0.0.1:0",
            "--monitoring-addr",
            "127.0.0.1:0",
        ])
        .current_dir(cwd)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, stderr) = common::refusal_of(
        child,
        Duration::from_secs(30),
        &format!("plugca serve {args:?} started instead of refusing to"),
    );
    (status.code(), stderr)
}

/// [`serve_expecting_exit`] for a start that must fail with the start-error
/// exit code; returns its stderr.
fn start_error(cwd: &Path, args: &[&str], as_nobody: bool) -> String {
    let (code, stderr) = serve_expecting_exit(cwd, args, as_nobody);
    assert_eq!(code, Some(i32::from(plugca::cli::EXIT_START)), "{stderr}");
    stderr
}

/// Starts `plugca serve <args>` and returns its log up to the `listening`
/// line (then stops it).
fn serve_log_until_listening(args: &[&str]) -> String {
    use std::io::BufRead as _;
    let mut child = Command::new(BIN)
        .arg("serve")
        .args(args)
        .args([
            "--grpc-addr",
            "127.0.0.1:0",
            "--monitoring-addr",
            "127.0.0.1:0",
            "--insecure-trust-csr-identity",
        ])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = String::new();
    for line in std::io::BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if line.contains("listening") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(log.contains("listening"), "the server did not start: {log}");
    log
}

fn copy_sample_bundle(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for name in ISTIOD_FILES {
        std::fs::copy(Path::new(CERTS).join(name), dir.join(name)).unwrap();
    }
}

#[cfg(unix)]
fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

// ------------------------------------------------------------ (a)

#[test]
fn a_self_signed_dir_that_is_the_cacerts_dir_under_another_spelling_is_refused() {
    let base = tempfile::tempdir().unwrap();
    std::fs::create_dir(base.path().join("cacerts")).unwrap();
    for (self_signed_dir, relation) in [
        ("./cacerts", "the same directory as"),
        ("x/../cacerts/", "the same directory as"),
        ("cacerts/keep", "inside"),
    ] {
        let (code, stderr) = serve_expecting_exit(
            base.path(),
            &[
                "--cacerts-dir",
                "cacerts",
                "--self-signed-dir",
                self_signed_dir,
            ],
            false,
        );
        assert_eq!(code, Some(64), "{self_signed_dir}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "--self-signed-dir {self_signed_dir} resolves to {}",
                base.path()
                    .canonicalize()
                    .unwrap()
                    .join("cacerts")
                    .display()
            )) && stderr.contains(&format!("which is {relation} --cacerts-dir cacerts")),
            "{self_signed_dir}: {stderr}"
        );
    }
    // Nothing was written into the plugged-in CA directory.
    assert_eq!(
        std::fs::read_dir(base.path().join("cacerts"))
            .unwrap()
            .count(),
        0
    );
}

// ------------------------------------------------------------ (b)

#[test]
fn a_missing_empty_or_unreadable_cacerts_dir_stops_the_server_naming_it() {
    let base = tempfile::tempdir().unwrap();
    let typo = base.path().join("cacert");
    let stderr = start_error(
        base.path(),
        &["--cacerts-dir", typo.to_str().unwrap()],
        false,
    );
    assert!(
        stderr.contains(&format!(
            "plugca: error: --cacerts-dir {}: no such directory; check the path (env ROOT_CA_DIR), or pass --self-signed",
            typo.display()
        )),
        "{stderr}"
    );

    let empty = base.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let stderr = start_error(
        base.path(),
        &["--cacerts-dir", empty.to_str().unwrap()],
        false,
    );
    assert!(
        stderr.contains(&format!(
            "plugca: error: --cacerts-dir {}: no CA bundle here",
            empty.display()
        )),
        "{stderr}"
    );

    // Unreadable even with --self-signed: a file where the directory should be.
    let file = write_temp(base.path(), "not-a-dir", "x");
    let stderr = start_error(
        base.path(),
        &["--cacerts-dir", file.to_str().unwrap(), "--self-signed"],
        false,
    );
    assert!(
        stderr.contains(&format!(
            "plugca: error: --cacerts-dir {}: cannot read the directory: Not a directory",
            file.display()
        )),
        "{stderr}"
    );
}

#[cfg(unix)]
#[test]
fn a_cacerts_dir_without_read_permission_is_an_error_not_a_self_signed_start() {
    // Root reads every directory: run the server as nobody then.
    let as_nobody = is_root();
    if as_nobody && Command::new("setpriv").arg("--version").output().is_err() {
        assert!(
            std::env::var("CI").is_err(),
            "CI=true: setpriv (util-linux) is needed to drop root"
        );
        eprintln!("SKIP: running as root and setpriv is missing");
        return;
    }
    let base = tempfile::tempdir().unwrap();
    chmod(base.path(), 0o755);
    let cacerts = base.path().join("cacerts");
    copy_sample_bundle(&cacerts);
    chmod(&cacerts, 0o000);
    let stderr = start_error(
        base.path(),
        &["--cacerts-dir", cacerts.to_str().unwrap(), "--self-signed"],
        as_nobody,
    );
    chmod(&cacerts, 0o755);
    assert!(
        stderr.contains(&format!(
            "plugca: error: --cacerts-dir {}: cannot read the directory: Permission denied",
            cacerts.display()
        )),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_self_signed_asked_for_a_missing_cacerts_dir_runs_on_a_generated_root() {
    let base = tempfile::tempdir().unwrap();
    let missing = base.path().join("not-yet");
    let args = [
        "--cacerts-dir",
        missing.to_str().unwrap(),
        "--insecure-trust-csr-identity",
    ];
    let refused = Server::spawn(&args)
        .await
        .err()
        .expect("refused without --self-signed");
    assert!(
        refused.to_string().contains("no such directory"),
        "{refused}"
    );
    let mut with = args.to_vec();
    with.push("--self-signed");
    let server = Server::start(&with).await;
    let mut client = server.client().await;
    let chain = request(
        &mut client,
        csr(&p256(), Some(LAB_ID), CsrShape::Ztunnel),
        &lab(0),
    )
    .await
    .unwrap();
    assert_eq!(chain.len(), 2, "self-signed: [leaf, root]");
    webpki_verify(&chain);
    server.stop().await;
}

// ------------------------------------------------------------ (c)

#[cfg(unix)]
#[test]
fn a_world_readable_ca_key_is_named_at_start_and_by_doctor() {
    let base = tempfile::tempdir().unwrap();
    let cacerts = base.path().join("cacerts");
    copy_sample_bundle(&cacerts);
    let key = cacerts.join("ca-key.pem");
    chmod(&key, 0o644);
    let log = serve_log_until_listening(&["--cacerts-dir", cacerts.to_str().unwrap()]);
    let warning = log
        .lines()
        .find(|l| l.contains("the CA key file is readable by other users"))
        .unwrap_or_else(|| panic!("no warning: {log}"));
    assert!(
        warning.contains(&format!("file={}", key.display()))
            && warning.contains("mode=0644")
            && warning.contains("readable by every user"),
        "{warning}"
    );
    let doctor = Command::new(BIN)
        .args(["doctor", "--json"])
        .arg(&cacerts)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap();
    let finding = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["code"] == "key-readable-by-others")
        .unwrap_or_else(|| panic!("no finding: {report:#}"));
    assert_eq!(finding["severity"], "warning");
    assert_eq!(finding["file"], "ca-key.pem");
    assert!(
        finding["message"]
            .as_str()
            .unwrap()
            .contains("mode 0644: readable by every user"),
        "{finding}"
    );
    // A warning does not make the bundle unhealthy.
    assert_eq!(doctor.status.code(), Some(0));

    // Mode 0600: no warning, no finding.
    chmod(&key, 0o600);
    let log = serve_log_until_listening(&["--cacerts-dir", cacerts.to_str().unwrap()]);
    assert!(!log.contains("readable by other users"), "{log}");
    let doctor = Command::new(BIN)
        .args(["doctor", "--json"])
        .arg(&cacerts)
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&doctor.stdout).contains("key-readable-by-others"),
        "finding for a 0600 key"
    );
}

// ------------------------------------------------------------ (d)

#[cfg(unix)]
#[test]
fn certs_force_replaces_a_planted_symlink_and_never_writes_its_target() {
    use std::os::unix::fs::PermissionsExt as _;
    let base = tempfile::tempdir().unwrap();
    let victim = write_temp(base.path(), "victim", "do not overwrite me\n");
    chmod(&victim, 0o644);
    let certs = |args: &[&str]| {
        let out = Command::new(BIN).arg("certs").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "plugca certs {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let root = base.path().join("root");
    let cacerts = base.path().join("cacerts");
    let (root_s, cacerts_s) = (root.to_str().unwrap(), cacerts.to_str().unwrap());
    certs(&["root", "--out", root_s]);
    certs(&[
        "intermediate",
        "--root",
        root_s,
        "--name",
        "c1",
        "--out",
        cacerts_s,
    ]);
    // An attacker who can write the output directory plants links to the victim.
    for planted in [root.join("root-key.pem"), cacerts.join("ca-key.pem")] {
        std::fs::remove_file(&planted).unwrap();
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
    }
    certs(&["root", "--out", root_s, "--force"]);
    certs(&[
        "intermediate",
        "--root",
        root_s,
        "--name",
        "c1",
        "--out",
        cacerts_s,
        "--force",
    ]);
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "do not overwrite me\n"
    );
    assert_eq!(
        std::fs::metadata(&victim).unwrap().permissions().mode() & 0o777,
        0o644
    );
    for key in [root.join("root-key.pem"), cacerts.join("ca-key.pem")] {
        let meta = std::fs::symlink_metadata(&key).unwrap();
        assert!(
            meta.file_type().is_file(),
            "{} is still a link",
            key.display()
        );
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(
            std::fs::read_to_string(&key)
                .unwrap()
                .contains("PRIVATE KEY")
        );
    }
    // The rewritten directory is a bundle plugca loads.
    let bundle = plugca::ca::CaBundle::load_dir(&cacerts, time::OffsetDateTime::now_utc());
    assert!(matches!(bundle, Ok(Some(_))), "{bundle:?}");
}
