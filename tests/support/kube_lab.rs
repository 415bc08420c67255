//! The real peers of issue 9: the tools `interop/tools.sh` builds (etcd,
//! kube-apiserver, kubectl, pilot-agent, istio-agent-client) and one shared
//! Kubernetes lab per test binary (`interop/kube-lab.sh`: etcd + a local and a
//! remote kube-apiserver on loopback, no kubelet).
//!
//! Without the tools a test skips with a printed reason; with `CI=true` it
//! fails instead (the pattern of `tests/lint.rs`). The lab is stopped by the
//! script's watchdog when the test process exits, whatever the exit; its
//! logs are kept (and their tails printed) when any test panics.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// Every kubectl call is bounded (server side and client side).
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(30);

/// The folder with the built tools if every one of `names` is in it; else
/// `None` after printing why (or a panic when `CI=true`).
pub fn tools(names: &[&str]) -> Option<PathBuf> {
    let dir = match std::env::var_os("PLUGCA_INTEROP_BIN") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let out = Command::new(format!("{REPO}/interop/tools.sh"))
                .arg("--bin-dir")
                .output();
            match out {
                Ok(out) if out.status.success() => {
                    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
                }
                other => return missing(&format!("interop/tools.sh --bin-dir failed: {other:?}")),
            }
        }
    };
    let absent: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !dir.join(n).is_file())
        .collect();
    if absent.is_empty() {
        Some(dir)
    } else {
        missing(&format!(
            "{} not built in {} (run interop/tools.sh {})",
            absent.join(", "),
            dir.display(),
            absent.join(" ")
        ))
    }
}

/// `None` after printing why a real-peer test skips, or a panic when `CI=true`.
pub fn missing<T>(reason: &str) -> Option<T> {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("the real-peer tests are required in CI: {reason}");
    }
    eprintln!("skipping a real-peer test: {reason}");
    None
}

/// Which apiserver of the lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cluster {
    Local,
    Remote,
}

impl Cluster {
    fn prefix(self) -> &'static str {
        match self {
            Cluster::Local => "LOCAL",
            Cluster::Remote => "REMOTE",
        }
    }
}

/// The running lab (shared by every test of a binary).
pub struct KubeLab {
    pub state: PathBuf,
    pub bin: PathBuf,
    env: HashMap<String, String>,
}

/// The lab of this test binary, started on first use; `None` when the
/// tools are missing (see [`tools`]).
pub fn lab() -> Option<&'static KubeLab> {
    static LAB: OnceLock<Option<KubeLab>> = OnceLock::new();
    LAB.get_or_init(|| {
        let bin = tools(&["etcd", "kube-apiserver", "kubectl"])?;
        Some(KubeLab::start(bin, true))
    })
    .as_ref()
}

/// A lab of the caller's own (etcd + the local apiserver only), for a test
/// that stops its apiserver; torn down when dropped (kept if a test failed).
/// `None` when the tools are missing (see [`tools`]).
pub fn private_lab() -> Option<KubeLab> {
    let bin = tools(&["etcd", "kube-apiserver", "kubectl"])?;
    Some(KubeLab::start(bin, false))
}

impl Drop for KubeLab {
    fn drop(&mut self) {
        // Only private labs drop (the shared one is a static). A failed test's lab stays for its logs.
        let purge = !std::thread::panicking();
        let mut down = Command::new(format!("{REPO}/interop/kube-lab.sh"));
        down.arg("down").arg(&self.state);
        if purge {
            down.arg("--purge");
        }
        let _ = down.stderr(Stdio::null()).status();
    }
}

impl KubeLab {
    fn start(bin: PathBuf, remote: bool) -> KubeLab {
        // Kept (not deleted on drop): the script's watchdog removes it at exit unless a test failed.
        let state = tempfile::Builder::new()
            .prefix("plugca-kube-lab-")
            .tempdir()
            .unwrap()
            .keep();
        let started = Instant::now();
        let mut up = Command::new(format!("{REPO}/interop/kube-lab.sh"));
        up.arg("up").arg(&state);
        if remote {
            up.arg("--remote");
        }
        let out = up
            .args(["--owner-pid", &std::process::id().to_string()])
            .env("PLUGCA_INTEROP_BIN", &bin)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kube-lab.sh up failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "kube lab up in {:.1?} at {} (logs kept there if a test fails)",
            started.elapsed(),
            state.display()
        );
        let env = std::fs::read_to_string(state.join("env"))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lab = KubeLab { state, bin, env };
        lab.keep_logs_on_panic();
        lab
    }

    /// A panicking test marks the lab to be kept and prints the log tails.
    fn keep_logs_on_panic(&self) {
        let state = self.state.clone();
        let logs: Vec<PathBuf> = self
            .env
            .iter()
            .filter(|(k, _)| k.ends_with("_LOG"))
            .map(|(_, v)| PathBuf::from(v))
            .collect();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let _ = std::fs::write(state.join("keep"), "a test failed\n");
            let mut err = std::io::stderr().lock();
            for log in &logs {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                let _ = writeln!(err, "--- last lines of {} (kept):", log.display());
                for line in tail.iter().rev() {
                    let _ = writeln!(err, "{line}");
                }
            }
            previous(info);
        }));
    }

    fn var(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing from the lab's env file"))
    }

    /// Stops the cluster's kube-apiserver (a real outage: connections drop,
    /// new ones are refused); etcd keeps the cluster's objects.
    pub fn stop_apiserver(&self, cluster: Cluster) {
        self.outage("stop-apiserver", cluster);
    }

    /// Starts the stopped kube-apiserver again on the same port with the same
    /// keys, and waits (bounded) until it is ready.
    pub fn start_apiserver(&self, cluster: Cluster) {
        self.outage("start-apiserver", cluster);
    }

    fn outage(&self, what: &str, cluster: Cluster) {
        let name = match cluster {
            Cluster::Local => "local",
            Cluster::Remote => "remote",
        };
        let out = Command::new(format!("{REPO}/interop/kube-lab.sh"))
            .arg(what)
            .arg(&self.state)
            .arg(name)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kube-lab.sh {what} {name} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn kubeconfig(&self, cluster: Cluster) -> PathBuf {
        PathBuf::from(self.var(&format!("{}_KUBECONFIG", cluster.prefix())))
    }

    pub fn issuer(&self, cluster: Cluster) -> &str {
        self.var(&format!("{}_ISSUER", cluster.prefix()))
    }

    /// The cluster's service-account signing key (PKCS#1 DER, as
    /// `jsonwebtoken::EncodingKey::from_rsa_der` takes it), to forge edge-case tokens.
    pub fn sa_signing_key_der(&self, cluster: Cluster) -> Vec<u8> {
        let dir = match cluster {
            Cluster::Local => "local",
            Cluster::Remote => "remote",
        };
        let out = Command::new("openssl")
            .args(["rsa", "-traditional", "-outform", "DER", "-in"])
            .arg(self.state.join(dir).join("sa.key"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// plugca flags for this lab: the local apiserver as `local_id` (admin
    /// kubeconfig), the remote one as `remote_id` (its kubeconfig copied to
    /// `dir/remotes/<remote_id>`, the layout `--remote-kubeconfigs` reads).
    pub fn plugca_args(&self, dir: &Path, local_id: &str, remote_id: &str) -> Vec<String> {
        let remotes = dir.join("remotes");
        std::fs::create_dir_all(&remotes).unwrap();
        std::fs::copy(self.kubeconfig(Cluster::Remote), remotes.join(remote_id)).unwrap();
        vec![
            "--cluster-id".into(),
            local_id.into(),
            "--kubeconfig".into(),
            self.kubeconfig(Cluster::Local).display().to_string(),
            "--remote-kubeconfigs".into(),
            remotes.display().to_string(),
        ]
    }

    /// `root-cert.pem` of ConfigMap `istio-ca-root-cert` in `ns` of the local
    /// cluster (the one plugca's root distributor writes); `None` when kubectl
    /// fails (no such ConfigMap or namespace).
    pub fn root_configmap(&self, ns: &str) -> Option<String> {
        self.kubectl(
            Cluster::Local,
            &[
                "-n",
                ns,
                "get",
                "configmap",
                "istio-ca-root-cert",
                "-o",
                r"jsonpath={.data.root-cert\.pem}",
            ],
            None,
        )
        .ok()
    }

    /// Runs kubectl (ours, the lab's version) as the cluster's admin; Err is stderr.
    pub fn kubectl(
        &self,
        cluster: Cluster,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, String> {
        let mut child = Command::new(self.bin.join("kubectl"))
            .arg(format!(
                "--kubeconfig={}",
                self.kubeconfig(cluster).display()
            ))
            .arg(format!("--request-timeout={}s", KUBECTL_TIMEOUT.as_secs()))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
        drop(input);
        let out = wait_bounded(child, KUBECTL_TIMEOUT + Duration::from_secs(5));
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).to_string())
        } else {
            Err(format!(
                "kubectl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// kubectl that must succeed.
    pub fn kubectl_ok(&self, cluster: Cluster, args: &[&str], stdin: Option<&str>) -> String {
        self.kubectl(cluster, args, stdin)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A fresh namespace with a unique name starting with `prefix`.
    pub fn namespace(&self, cluster: Cluster, prefix: &str) -> String {
        let name = unique(prefix);
        self.kubectl_ok(cluster, &["create", "namespace", &name], None);
        name
    }

    /// A namespace with a fixed name (for istio-system): created once, reused.
    pub fn ensure_namespace(&self, cluster: Cluster, name: &str) {
        let yaml = format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n");
        // Tests racing to create it: one wins, the others see AlreadyExists.
        match self.kubectl(cluster, &["apply", "-f", "-"], Some(&yaml)) {
            Ok(_) => {}
            Err(e) if e.contains("AlreadyExists") => {}
            Err(e) => panic!("{e}"),
        }
    }

    /// A ServiceAccount (no controller-manager: nothing creates them for us).
    pub fn service_account(&self, cluster: Cluster, namespace: &str, name: &str) {
        let yaml = format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
        );
        self.kubectl_ok(cluster, &["apply", "-f", "-"], Some(&yaml));
    }

    /// A pod of `service_account` assigned to `node` (no kubelet: it stays
    /// Pending); returns its UID.
    pub fn pod_on_node(
        &self,
        cluster: Cluster,
        namespace: &str,
        name: &str,
        service_account: &str,
        node: &str,
    ) -> String {
        let yaml = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
             spec: {{nodeName: {node}, serviceAccountName: {service_account}, \
             containers: [{{name: c, image: none.invalid/none}}]}}\n"
        );
        self.kubectl_ok(
            cluster,
            &["create", "-f", "-", "-o", "jsonpath={.metadata.uid}"],
            Some(&yaml),
        )
    }

    /// Sets the pod's phase through the status subresource (what a kubelet would do).
    pub fn set_pod_phase(&self, cluster: Cluster, namespace: &str, name: &str, phase: &str) {
        let patch = format!(r#"{{"status":{{"phase":"{phase}"}}}}"#);
        self.kubectl_ok(
            cluster,
            &[
                "-n",
                namespace,
                "patch",
                "pod",
                name,
                "--subresource=status",
                "--type=merge",
                "-p",
                &patch,
            ],
            None,
        );
    }

    /// Deletes the pod at once (no kubelet would ever confirm a graceful delete).
    pub fn delete_pod_force(&self, cluster: Cluster, namespace: &str, name: &str) {
        self.kubectl_ok(
            cluster,
            &[
                "-n",
                namespace,
                "delete",
                "pod",
                name,
                "--grace-period=0",
                "--force",
                "--wait=true",
            ],
            None,
        );
    }

    /// A token from the TokenRequest API (`kubectl create token`), bound to
    /// `pod` when given.
    pub fn token(
        &self,
        cluster: Cluster,
        namespace: &str,
        service_account: &str,
        audience: &str,
        pod: Option<&str>,
    ) -> String {
        let mut args = vec![
            "-n",
            namespace,
            "create",
            "token",
            service_account,
            "--audience",
            audience,
            "--duration",
            "1h",
        ];
        if let Some(pod) = pod {
            args.extend(["--bound-object-kind", "Pod", "--bound-object-name", pod]);
        }
        self.kubectl_ok(cluster, &args, None).trim().to_string()
    }

    /// The apiserver's own verdict on a token (TokenReview as admin).
    pub fn token_review(&self, cluster: Cluster, token: &str, audience: &str) -> serde_json::Value {
        let review = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [audience]},
        });
        let out = self.kubectl_ok(
            cluster,
            &["create", "-f", "-", "-o", "json"],
            Some(&review.to_string()),
        );
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["status"].clone()
    }
}

/// A name no other test of this run uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Waits for `child` at most `limit`, killing it after that. Its stdout and
/// stderr are drained meanwhile (a child writing more than a pipe holds
/// would otherwise block and never exit).
pub fn wait_bounded(mut child: Child, limit: Duration) -> std::process::Output {
    fn drain(
        pipe: Option<impl std::io::Read + Send + 'static>,
    ) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = stderr.join().unwrap_or_default();
            panic!(
                "a child process ran longer than {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// A child process killed when the guard drops (a failing test leaves nothing running).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `check` every 100 ms until it returns `Some`, at most `limit`.
pub fn eventually<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A loopback TCP port nobody listens on, picked below the kernel's
/// ephemeral range (as kube-lab.sh does): port-0 listeners and outgoing
/// connections of concurrent tests cannot take it meanwhile. A process
/// started on it may still lose a race; callers retry on "address already in use".
pub fn free_port() -> u16 {
    static N: AtomicU32 = AtomicU32::new(0);
    let low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        ^ std::process::id().wrapping_mul(2_654_435_761)
        ^ N.fetch_add(1, Ordering::Relaxed).wrapping_mul(40_503);
    for i in 0..500u32 {
        let port = 10_000 + (seed.wrapping_add(i.wrapping_mul(7_919))) % (low - 10_000);
        let port = port as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port below {low}");
}
