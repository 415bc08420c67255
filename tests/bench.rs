//! `plugca bench` end to end through the binary: small, bounded runs whose
//! JSON line must carry every field and no error. No timing is ever asserted.

use std::process::Command;

use serde_json::Value;

/// Runs `plugca bench <args> --json` and returns its JSON line.
fn bench(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_plugca"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "plugca bench {args:?} failed: {stderr}"
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line on stdout, got {stdout:?}");
    serde_json::from_str(lines[0]).unwrap()
}

fn assert_common_fields(v: &Value, mode: &str, requests: u64) {
    assert_eq!(v["mode"], mode);
    assert!(["ring", "aws-lc-rs"].contains(&v["backend"].as_str().unwrap()));
    assert_eq!(v["ca_key"], "p256");
    assert_eq!(v["error_total"], 0, "errors: {}", v["errors"]);
    assert!(v["errors"].as_object().unwrap().is_empty());
    assert_eq!(v["sent"], requests);
    assert_eq!(v["issued"], requests);
    for field in ["elapsed_s", "issued_per_s", "bench_cpu_s"] {
        assert!(v[field].as_f64().is_some(), "{field} in {v}");
    }
    for q in ["p50", "p90", "p99", "max"] {
        assert!(
            v["latency_ms"][q].as_f64().is_some(),
            "latency_ms.{q} in {v}"
        );
    }
    assert!(v["pool"]["csrs"].as_u64().unwrap() > 0);
}

#[test]
fn an_online_lab_mode_run_against_a_child_server_issues_every_request() {
    let v = bench(&[
        "--auth",
        "lab",
        "--requests",
        "50",
        "--concurrency",
        "4",
        "--connections",
        "2",
        "--csr-mix",
        "mixed",
        "--rsa-keys",
        "1",
        "--duration",
        "60s",
    ]);
    assert_common_fields(&v, "online", 50);
    assert_eq!(v["auth"], "lab");
    assert_eq!(v["concurrency"], 4);
    assert_eq!(v["connections"], 2);
    let server = &v["server"];
    assert_eq!(server["process"], "child");
    assert!(server["pid"].as_u64().is_some());
    for field in [
        "start_to_ready_ms",
        "idle_rss_mb",
        "peak_rss_mb",
        "cpu_s",
        "cpu_us_per_issued",
    ] {
        assert!(server[field].as_f64().is_some(), "server.{field} in {v}");
    }
    // The offline ceiling is measured with the same CA and CSRs.
    assert!(v["ceiling_per_s"].as_f64().is_some());
    assert!(v["ratio_to_ceiling"].as_f64().is_some());
}

#[test]
fn jwt_and_mtls_runs_authenticate_every_request() {
    let jwt = bench(&[
        "--auth",
        "jwt",
        "--jwt-alg",
        "es256",
        "--requests",
        "20",
        "--concurrency",
        "2",
        "--connections",
        "1",
        "--csr-mix",
        "p256",
        "--no-ceiling",
    ]);
    assert_common_fields(&jwt, "online", 20);
    assert_eq!(jwt["auth"], "jwt");
    let mtls = bench(&[
        "--auth",
        "mtls",
        "--jwt-alg",
        "es256",
        "--requests",
        "20",
        "--concurrency",
        "2",
        "--connections",
        "2",
        "--csr-mix",
        "p256",
        "--no-ceiling",
    ]);
    assert_common_fields(&mtls, "online", 20);
    assert_eq!(mtls["auth"], "mtls");
}

#[test]
fn a_burst_uses_one_distinct_csr_per_request() {
    let v = bench(&[
        "--auth",
        "lab",
        "--burst",
        "30",
        "--concurrency",
        "8",
        "--csr-mix",
        "p256",
        "--no-ceiling",
    ]);
    assert_common_fields(&v, "burst", 30);
    assert_eq!(v["pool"]["csrs"], 30);
}

#[test]
fn an_offline_run_measures_the_issuance_cycle_without_a_server() {
    let v = bench(&[
        "--offline",
        "--requests",
        "50",
        "--csr-mix",
        "mixed",
        "--rsa-keys",
        "1",
    ]);
    assert_common_fields(&v, "offline", 50);
    assert!(v["threads"].as_u64().unwrap() >= 1);
    assert!(v["server"].is_null());
}

#[test]
fn a_remote_target_without_a_server_fails_without_touching_other_addresses() {
    // Port 1 on loopback has no plugca: the run must fail on that address alone.
    let dir = std::env::temp_dir();
    let root = dir.join(format!("plugca-bench-test-root-{}.pem", std::process::id()));
    std::fs::write(&root, include_str!("../certs/root-cert.pem")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_plugca"))
        .args(["bench", "--addr", "127.0.0.1:1", "--root-cert"])
        .arg(&root)
        .args([
            "--auth",
            "lab",
            "--csr-mix",
            "p256",
            "--requests",
            "5",
            "--no-ceiling",
            "--timeout",
            "2s",
        ])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&root);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
}
