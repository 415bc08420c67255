//! Istio's control plane on one box with plugca as its CA (issue 11): a real
//! kube-apiserver (`tests/support/kube_lab.rs`), Istio's CRDs and istiod chart
//! from the pinned `istio.io/istio` module, real `pilot-discovery` with
//! `ENABLE_CA_SERVER=false` serving the `istiod-tls` plugca wrote, and real
//! `pilot-agent` sidecars that get their certificates from plugca and hold
//! XDS streams to that istiod, through a CA rotation.
//!
//! There is no kubelet. The test does the kubelet's part by hand: it projects
//! the Secret `istiod-tls` and the ConfigMap `istio-ca-root-cert` into the
//! folders where the chart and the injector mount them (kubelet's atomic
//! `..data` symlink swap, which Istio's file watchers are written for), and
//! the pods' bound tokens into `./var/run/secrets/tokens/istio-token`.
//! There is no Envoy either: each agent runs with `DISABLE_ENVOY=true`, and a
//! small ADS client (`istio-agent-client xds`) connects to the agent's local
//! XDS socket the way Envoy would, so the agent's XDS proxy dials istiod with
//! its own TLS settings (root = the projected ConfigMap) and bearer token.
//!
//! Needs `interop/tools.sh` (etcd, kube-apiserver, kubectl, pilot-agent,
//! pilot-discovery, istio-agent-client, helm) and Istio's module source in the
//! Go module cache (tools.sh fetched it); skips without them, fails with CI=true.

mod common;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;
use plugca::ca::generate::GeneratedCa;
use support::kube_lab::{self, Cluster, KillOnDrop, KubeLab, free_port, wait_bounded};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const NS: &str = "istio-system";
/// Istio's default cluster id: istiod's CLUSTER_ID, the agents' ISTIO_META_CLUSTER_ID, plugca's --cluster-id.
const CLUSTER_ID: &str = "Kubernetes";
const ISTIOD_NAME: &str = "istiod.istio-system.svc";
/// What docs/istio-with-plugca.md recommends for the istiod chart.
const CA_ADDRESS: &str = "plugca.istio-system.svc:15012";
const CRDS: &str = "manifests/charts/base/files/crd-all.gen.yaml";
const CHART: &str = "manifests/charts/istio-control/istio-discovery";
/// The agents' SECRET_TTL: istio-agent renews at half of it (secretcache.go rotateTime).
const AGENT_SECRET_TTL: &str = "20s";
/// The bound of every wait for one step (a reload, a write, a renewal, a reconnect).
const STEP: Duration = Duration::from_secs(90);
const TOOLS: &[&str] = &[
    "etcd",
    "kube-apiserver",
    "kubectl",
    "pilot-agent",
    "pilot-discovery",
    "istio-agent-client",
    "helm",
];

// ------------------------------------------------------------ helpers

/// Istio's source at the pinned version, from the Go module cache.
fn istio_source() -> Option<PathBuf> {
    let versions = std::fs::read_to_string(format!("{REPO}/interop/versions.env")).unwrap();
    let version = versions
        .lines()
        .find_map(|l| l.strip_prefix("ISTIO_VERSION="))
        .expect("ISTIO_VERSION in interop/versions.env")
        .trim()
        .to_string();
    let modcache = Command::new("go")
        .args(["env", "GOMODCACHE"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join("go/pkg/mod")))?;
    let dir = modcache.join(format!("istio.io/istio@{version}"));
    if dir.join(CRDS).is_file() && dir.join(CHART).is_dir() {
        Some(dir)
    } else {
        kube_lab::missing(&format!(
            "Istio's source is not in the Go module cache ({}; interop/tools.sh pilot-discovery fetches it)",
            dir.display()
        ))
    }
}

/// Writes `files` into `dir` as the kubelet updates a Secret or ConfigMap
/// volume: a new `..<version>` folder, `..data` swapped to it in one rename,
/// each file a symlink through `..data`; older versions removed.
fn project(dir: &Path, files: &[(&str, &[u8])]) {
    static N: AtomicU32 = AtomicU32::new(0);
    std::fs::create_dir_all(dir).unwrap();
    let version = format!(
        "..{}_{}",
        time::OffsetDateTime::now_utc().unix_timestamp_nanos(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let vdir = dir.join(&version);
    std::fs::create_dir(&vdir).unwrap();
    for (name, data) in files {
        std::fs::write(vdir.join(name), data).unwrap();
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&version, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with("..") && name != "..data" && name != version {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The PEM certificates of a text, re-encoded.
fn pem_blocks(text: &str) -> Vec<String> {
    plugca::pem::parse_all(text)
        .unwrap_or_default()
        .into_iter()
        .map(|b| plugca::pem::encode(&b.label, &b.der))
        .collect()
}

/// Whether the PEM bundle `bundle` holds the certificate `cert`.
fn holds(bundle: &str, cert: &GeneratedCa) -> bool {
    pem_blocks(bundle).contains(&pem_blocks(&cert.cert_pem)[0])
}

fn serial_of(pem_text: &str) -> String {
    hex(&leaf_facts(pem_text).serial)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `leaf` was signed by `ca` (authority key id = its subject key id).
fn signed_by(leaf: &str, ca: &GeneratedCa) -> bool {
    leaf_facts(leaf).aki.is_some() && leaf_facts(leaf).aki == ski_of(&ca.cert_pem)
}

/// `curl` of a plain-HTTP loopback endpoint (bounded); None unless 2xx.
fn http(port: u16, path: &str) -> Option<String> {
    let child = Command::new("curl")
        .args(["-fsS", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_bounded(child, Duration::from_secs(10));
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).to_string())
}

/// The whole test's budget: every wait also ends when it is spent, so the
/// test takes at most this long however many steps hang (about 90 s normally).
const TOTAL: Duration = Duration::from_secs(600);

fn test_started() -> Instant {
    static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *STARTED.get_or_init(Instant::now)
}

/// Polls `check` every 250 ms at most `limit` (and within the test's
/// [`TOTAL`] budget); returns the value and how long it took.
fn wait_for<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> (T, Duration) {
    let started = Instant::now();
    loop {
        if let Some(v) = check() {
            let took = started.elapsed();
            eprintln!("[{took:>6.1?}] {what}");
            return (v, took);
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        assert!(
            test_started().elapsed() < TOTAL,
            "{what}: the test's {TOTAL:?} budget is spent"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn configmap_roots(lab: &KubeLab, ns: &str) -> Option<String> {
    lab.root_configmap(ns).filter(|t| !t.trim().is_empty())
}

/// The Secret istiod-tls: (tls.crt, tls.key, ca.crt).
fn istiod_tls(lab: &KubeLab) -> Option<(String, String, String)> {
    let out = lab
        .kubectl(
            Cluster::Local,
            &["-n", NS, "get", "secret", "istiod-tls", "-o", "json"],
            None,
        )
        .ok()?;
    let secret: serde_json::Value = serde_json::from_str(&out).unwrap();
    use base64::Engine;
    let field = |k: &str| -> Option<String> {
        let b = base64::engine::general_purpose::STANDARD
            .decode(secret["data"][k].as_str()?)
            .ok()?;
        String::from_utf8(b).ok()
    };
    Some((field("tls.crt")?, field("tls.key")?, field("ca.crt")?))
}

/// Every JSON object of a multi-document kubectl `-o json` output.
fn json_objects(text: &str) -> Vec<serde_json::Value> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<serde_json::Value>()
        .map(Result::unwrap)
        .collect()
}

/// CreateCertificate calls by outcome, from plugca's metrics.
async fn outcomes(server: &Server) -> Vec<(String, f64)> {
    let (_, text) = server.http_get("/metrics").await;
    text.lines()
        .filter_map(|l| l.strip_prefix("plugca_request_duration_seconds_count{outcome=\""))
        .filter_map(|l| {
            let (outcome, rest) = l.split_once('"')?;
            let value = rest.rsplit(' ').next()?.parse().ok()?;
            Some((outcome.to_string(), value))
        })
        .collect()
}

async fn assert_no_failed_calls(server: &Server, when: &str) -> f64 {
    let all = outcomes(server).await;
    let failed: Vec<_> = all
        .iter()
        .filter(|(o, v)| o != "issued" && *v > 0.0)
        .collect();
    assert!(
        failed.is_empty(),
        "{when}: failed CreateCertificate calls {failed:?}"
    );
    all.iter()
        .find(|(o, _)| o == "issued")
        .map(|(_, v)| *v)
        .unwrap_or(0.0)
}

/// Whether the built istio-agent-client has its `xds` mode (a binary built
/// before it would run its certificate mode instead): `xds -h` must print
/// the mode's flags and exit within 10 s.
fn client_has_xds_mode(bin: &Path) -> Option<()> {
    let mut child = Command::new(bin.join("istio-agent-client"))
        .args(["xds", "-h"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    if String::from_utf8_lossy(&out.stderr).contains("-uds") {
        Some(())
    } else {
        kube_lab::missing(&format!(
            "{}/istio-agent-client has no xds mode (built from older source: run interop/tools.sh istio-agent-client)",
            bin.display()
        ))
    }
}

// ------------------------------------------------------------ the chart

/// `helm template` of Istio's istiod chart with the values the docs recommend,
/// as JSON objects (kubectl converts the YAML client-side).
fn render_istiod_chart(lab: &KubeLab, istio: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(lab.bin.join("helm"))
        .args(["template", "istiod"])
        .arg(istio.join(CHART))
        .args(["--namespace", NS])
        .args(["--set", &format!("global.caAddress={CA_ADDRESS}")])
        .args(["--set", "env.ENABLE_CA_SERVER=false"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = lab.kubectl_ok(
        Cluster::Local,
        &["create", "--dry-run=client", "-o", "json", "-f", "-"],
        Some(&String::from_utf8_lossy(&out.stdout)),
    );
    json_objects(&json)
}

fn object<'a>(objects: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind}/{name} not in the istiod chart's render"))
}

/// The static checks of the render: istiod runs with its CA off and mounts
/// istiod-tls and istio-ca-root-cert; the injector's values and template
/// carry plugca's address and the root ConfigMap.
fn check_render(objects: &[serde_json::Value]) {
    let deployment = object(objects, "Deployment", "istiod");
    let pod = &deployment["spec"]["template"]["spec"];
    let env = &pod["containers"][0]["env"];
    assert!(
        env.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "ENABLE_CA_SERVER" && e["value"] == "false"),
        "istiod's env: {env}"
    );
    let volumes = pod["volumes"].to_string();
    assert!(
        volumes.contains(r#""secretName":"istiod-tls""#),
        "{volumes}"
    );
    assert!(
        volumes.contains(r#""name":"istio-ca-root-cert""#),
        "{volumes}"
    );
    let mounts = pod["containers"][0]["volumeMounts"].to_string();
    for path in ["/var/run/secrets/istiod/tls", "/var/run/secrets/istiod/ca"] {
        assert!(mounts.contains(path), "{path} not mounted: {mounts}");
    }
    let injector = object(objects, "ConfigMap", "istio-sidecar-injector");
    let values: serde_json::Value =
        serde_json::from_str(injector["data"]["values"].as_str().unwrap()).unwrap();
    assert_eq!(values["global"]["caAddress"], CA_ADDRESS);
    assert_eq!(values["global"]["pilotCertProvider"], "istiod");
    let config = injector["data"]["config"].as_str().unwrap();
    for needle in [
        "name: CA_ADDR",
        ".Values.global.caAddress",
        "istio-ca-root-cert",
        "name: istiod-ca-cert",
    ] {
        assert!(
            config.contains(needle),
            "{needle} not in the injection template"
        );
    }
}

// ------------------------------------------------------------ istiod

struct Istiod {
    dir: PathBuf,
    child: KillOnDrop,
    http: u16,
    secure: u16,
    https: u16,
    monitoring: u16,
}

impl Istiod {
    fn tls_dir(dir: &Path) -> PathBuf {
        dir.join("var/run/secrets/istiod/tls")
    }

    fn ca_dir(dir: &Path) -> PathBuf {
        dir.join("var/run/secrets/istiod/ca")
    }

    /// The kubelet's part: Secret istiod-tls → ./var/run/secrets/istiod/tls,
    /// ConfigMap istio-ca-root-cert → ./var/run/secrets/istiod/ca (both as the
    /// chart mounts them). Returns the serial of the certificate projected.
    fn project_certs(lab: &KubeLab, dir: &Path) -> Option<String> {
        let (crt, key, ca) = istiod_tls(lab)?;
        let roots = configmap_roots(lab, NS)?;
        project(
            &Self::tls_dir(dir),
            &[
                ("tls.crt", crt.as_bytes()),
                ("tls.key", key.as_bytes()),
                ("ca.crt", ca.as_bytes()),
            ],
        );
        project(&Self::ca_dir(dir), &[("root-cert.pem", roots.as_bytes())]);
        Some(serial_of(&crt))
    }

    /// pilot-discovery with the chart's env and args, ports moved to free ones
    /// (off plugca's and each other's); retried when a port was taken meanwhile.
    fn start(lab: &KubeLab, dir: &Path, render: &[serde_json::Value]) -> Istiod {
        let deployment = object(render, "Deployment", "istiod");
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        // Plain values only; the downward-API ones are set below as the kubelet would.
        let env: Vec<(String, String)> = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"] != "KUBECONFIG")
            .filter_map(|e| {
                Some((
                    e["name"].as_str()?.to_string(),
                    e["value"].as_str()?.to_string(),
                ))
            })
            .collect();
        let args: Vec<String> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .filter(|a| !a.starts_with("--monitoringAddr"))
            .collect();
        assert_eq!(args[0], "discovery");
        for attempt in 1..=3 {
            let [http, grpc, secure, https, monitoring, ctrlz] = [(); 6].map(|_| free_port());
            let log = dir.join("istiod.log");
            let file = std::fs::File::create(&log).unwrap();
            let child = Command::new(lab.bin.join("pilot-discovery"))
                .args(&args)
                .arg(format!(
                    "--kubeconfig={}",
                    lab.kubeconfig(Cluster::Local).display()
                ))
                .arg(format!("--httpAddr=127.0.0.1:{http}"))
                .arg(format!("--grpcAddr=127.0.0.1:{grpc}"))
                .arg(format!("--secureGRPCAddr=127.0.0.1:{secure}"))
                .arg(format!("--httpsAddr=127.0.0.1:{https}"))
                .arg(format!("--monitoringAddr=127.0.0.1:{monitoring}"))
                .arg(format!("--ctrlz_port={ctrlz}"))
                .current_dir(dir)
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .env("HOME", dir)
                .envs(env.iter().map(|(k, v)| (k, v)))
                .env("POD_NAME", "istiod-lab-0")
                .env("POD_NAMESPACE", NS)
                .env("SERVICE_ACCOUNT", "istiod")
                .stdin(Stdio::null())
                .stdout(file.try_clone().unwrap())
                .stderr(file)
                .spawn()
                .unwrap();
            let mut istiod = Istiod {
                dir: dir.to_path_buf(),
                child: KillOnDrop(child),
                http,
                secure,
                https,
                monitoring,
            };
            let started = Instant::now();
            loop {
                let text = istiod.log();
                if text.contains("starting secure gRPC discovery service") && http_ready(http) {
                    eprintln!(
                        "istiod ready in {:.1?} (attempt {attempt})",
                        started.elapsed()
                    );
                    return istiod;
                }
                let exited = istiod.child.0.try_wait().unwrap().is_some();
                if exited && text.contains("address already in use") && attempt < 3 {
                    eprintln!("istiod lost a port race; retrying with new ports");
                    break;
                }
                assert!(
                    !exited && started.elapsed() < STEP,
                    "istiod not ready within {STEP:?} (exited: {exited}); log tail:\n{}",
                    istiod.log_tail()
                );
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        unreachable!()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("istiod.log")).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// `openssl s_client` against the secure XDS port, trusting `roots` and
    /// checking the name: the served leaf when `Verify return code: 0`, else Err(output).
    fn served_leaf(&self, roots: &str) -> Result<String, String> {
        let ca = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(ca.path(), roots).unwrap();
        let child = Command::new("openssl")
            .args(["s_client", "-connect"])
            .arg(format!("127.0.0.1:{}", self.secure))
            .args(["-servername", ISTIOD_NAME, "-verify_hostname", ISTIOD_NAME])
            .arg("-CAfile")
            .arg(ca.path())
            .arg("-showcerts")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = wait_bounded(child, Duration::from_secs(20));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if !text.contains("Verify return code: 0 (ok)") {
            return Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)));
        }
        pem_blocks(&text)
            .into_iter()
            .next()
            .ok_or_else(|| format!("no certificate in:\n{text}"))
    }

    /// istiod's own view of its XDS clients (`/debug/connections` on the HTTP port).
    fn connections(&self) -> Vec<String> {
        let Some(text) = http(self.http, "/debug/connections") else {
            return vec![];
        };
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["clients"]
            .as_array()
            .map(|c| {
                c.iter()
                    .filter_map(|c| c["connectionId"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn http_ready(port: u16) -> bool {
    http(port, "/ready").is_some()
}

// ------------------------------------------------------------ the sidecars

/// One injected pod and its pilot-agent, in a folder laid out like the pod
/// (every path the agent uses is relative: ./var/run/secrets/..., ./etc/istio/proxy).
struct Sidecar {
    ns: String,
    pod: String,
    sa: String,
    dir: PathBuf,
    agent: Option<KillOnDrop>,
    xds: Option<KillOnDrop>,
    xds_runs: u32,
}

impl Sidecar {
    fn spiffe_id(&self) -> String {
        format!("spiffe://cluster.local/ns/{}/sa/{}", self.ns, self.sa)
    }

    fn roots_dir(&self) -> PathBuf {
        self.dir.join("var/run/secrets/istio")
    }

    /// The kubelet's part: the namespace's istio-ca-root-cert at the
    /// injector's mount, and a bound istio-ca token.
    fn project_roots(&self, lab: &KubeLab) -> String {
        let roots = configmap_roots(lab, &self.ns)
            .unwrap_or_else(|| panic!("no istio-ca-root-cert in {}", self.ns));
        project(&self.roots_dir(), &[("root-cert.pem", roots.as_bytes())]);
        roots
    }

    fn project_token(&self, lab: &KubeLab) {
        let token = lab.token(
            Cluster::Local,
            &self.ns,
            &self.sa,
            "istio-ca",
            Some(&self.pod),
        );
        project(
            &self.dir.join("var/run/secrets/tokens"),
            &[("istio-token", token.as_bytes())],
        );
    }

    /// Starts pilot-agent with the env the injector gave the pod's istio-proxy
    /// container, except what cannot hold on one box: CA_ADDR and the
    /// discovery address become localhost ports (no cluster DNS; a host with
    /// "localhost" makes Istio's client check the name istiod.istio-system.svc),
    /// the status port a free one, and no Envoy.
    fn start_agent(
        &mut self,
        lab: &KubeLab,
        injected_env: &[(String, String)],
        plugca_port: u16,
        istiod_port: u16,
    ) {
        let mut proxy_config: serde_json::Value = injected_env
            .iter()
            .find(|(k, _)| k == "PROXY_CONFIG")
            .map(|(_, v)| serde_json::from_str(v).unwrap())
            .unwrap_or_else(|| serde_json::json!({}));
        proxy_config["discoveryAddress"] = format!("localhost:{istiod_port}").into();
        proxy_config["statusPort"] = free_port().into();
        std::fs::create_dir_all(self.dir.join("etc/istio/proxy")).unwrap();
        std::fs::create_dir_all(self.dir.join("out")).unwrap();
        let log = std::fs::File::create(self.dir.join("agent.log")).unwrap();
        let child = Command::new(lab.bin.join("pilot-agent"))
            .args(["proxy", "sidecar"])
            .current_dir(&self.dir)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &self.dir)
            .envs(injected_env.iter().map(|(k, v)| (k, v)))
            // The downward API.
            .env("POD_NAME", &self.pod)
            .env("POD_NAMESPACE", &self.ns)
            .env("SERVICE_ACCOUNT", &self.sa)
            .env("INSTANCE_IP", "127.0.0.1")
            .env("HOST_IP", "127.0.0.1")
            .env("ISTIO_META_NODE_NAME", "lab-node")
            // One box, no Envoy.
            .env("CA_ADDR", format!("localhost:{plugca_port}"))
            .env("PROXY_CONFIG", proxy_config.to_string())
            .env("DISABLE_ENVOY", "true")
            .env("OUTPUT_CERTS", self.dir.join("out"))
            .env("SECRET_TTL", AGENT_SECRET_TTL)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agent = Some(KillOnDrop(child));
    }

    /// (Re)starts the downstream ADS client on the agent's XDS socket.
    fn start_xds(&mut self, lab: &KubeLab) {
        self.xds = None;
        self.xds_runs += 1;
        let log =
            std::fs::File::create(self.dir.join(format!("xds-{}.log", self.xds_runs))).unwrap();
        let child = Command::new(lab.bin.join("istio-agent-client"))
            .args(["xds", "-uds", "etc/istio/proxy/XDS"])
            .args(["-pod-namespace", &self.ns, "-pod-name", &self.pod])
            .args(["-service-account", &self.sa, "-cluster-id", CLUSTER_ID])
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.xds = Some(KillOnDrop(child));
    }

    /// The XDS responses the downstream client of its current run got.
    fn xds_responses(&self) -> usize {
        std::fs::read_to_string(self.dir.join(format!("xds-{}.log", self.xds_runs)))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(r#""event":"xds-response""#))
            .count()
    }

    /// The broken streams the downstream client of its current run saw.
    fn xds_errors(&self) -> usize {
        std::fs::read_to_string(self.dir.join(format!("xds-{}.log", self.xds_runs)))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(r#""event":"xds-error""#))
            .count()
    }

    fn leaf(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.dir.join("out/cert-chain.pem")).ok()?;
        pem_blocks(&text).into_iter().next()
    }

    fn written_roots(&self) -> String {
        std::fs::read_to_string(self.dir.join("out/root-cert.pem")).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The written chain verifies with openssl against `root` (not against
    /// the root the agent wrote) and names the pod's service account.
    fn check_chain(&self, root: &GeneratedCa) {
        let chain =
            pem_blocks(&std::fs::read_to_string(self.dir.join("out/cert-chain.pem")).unwrap());
        assert!(
            chain.len() >= 2,
            "{}: cert-chain.pem is the whole chain",
            self.pod
        );
        let mut to_verify = chain[..chain.len() - 1].to_vec();
        to_verify.push(root.cert_pem.clone());
        let (ok, text) = openssl_verify(&to_verify, "sslclient");
        assert!(ok, "{}: {text}", self.pod);
        assert_eq!(
            leaf_facts(&chain[0]).uris,
            [self.spiffe_id()],
            "{}",
            self.pod
        );
    }
}

/// The injected pod's istio-proxy container (a native sidecar among the
/// init containers, or a regular container).
fn istio_proxy(pod: &serde_json::Value) -> &serde_json::Value {
    ["initContainers", "containers"]
        .iter()
        .filter_map(|k| pod["spec"][k].as_array())
        .flatten()
        .find(|c| c["name"] == "istio-proxy")
        .unwrap_or_else(|| panic!("no istio-proxy injected: {pod}"))
}

/// The checks of a pod injected by the real webhook: CA_ADDR is plugca, the
/// root comes from istio-ca-root-cert, the token has audience istio-ca.
/// Returns the container's plain env.
fn check_injected(pod: &serde_json::Value) -> Vec<(String, String)> {
    let proxy = istio_proxy(pod);
    let env: Vec<(String, String)> = proxy["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_string(),
                e["value"].as_str()?.to_string(),
            ))
        })
        .collect();
    let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(get("CA_ADDR"), Some(CA_ADDRESS), "injected env: {env:?}");
    assert_eq!(get("PILOT_CERT_PROVIDER"), Some("istiod"));
    let volumes = pod["spec"]["volumes"].as_array().unwrap();
    let root_volume = volumes
        .iter()
        .find(|v| v["configMap"]["name"] == "istio-ca-root-cert")
        .unwrap_or_else(|| panic!("no istio-ca-root-cert volume: {volumes:?}"));
    let mounts = proxy["volumeMounts"].as_array().unwrap();
    assert!(
        mounts
            .iter()
            .any(|m| m["name"] == root_volume["name"] && m["mountPath"] == "/var/run/secrets/istio"),
        "istio-ca-root-cert not mounted at /var/run/secrets/istio: {mounts:?}"
    );
    let token = volumes
        .iter()
        .find(|v| v["name"] == "istio-token")
        .expect("istio-token volume");
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "istio-ca"
    );
    env
}

// ------------------------------------------------------------ the test

/// The plugca bundle folder and what is in it now.
struct Bundle {
    dir: PathBuf,
}

impl Bundle {
    fn write(&self, signing: &GeneratedCa, roots: &[&GeneratedCa]) {
        write_rotation_bundle(&self.dir, signing, roots);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn istiod_and_sidecars_run_on_plugca_through_a_ca_rotation() {
    let Some(bin) = kube_lab::tools(TOOLS) else {
        return;
    };
    let Some(()) = client_has_xds_mode(&bin) else {
        return;
    };
    let Some(istio) = istio_source() else { return };
    let Some(lab) = kube_lab::lab() else { return };
    let test_started = test_started();
    let work = tempfile::Builder::new()
        .prefix("plugca-mesh-")
        .tempdir()
        .unwrap();
    let w = work.path();
    eprintln!("mesh folders in {}", w.display());

    // Istio's CRDs and istio-system, as `helm install istio-base` would.
    let crds_started = Instant::now();
    lab.kubectl_ok(
        Cluster::Local,
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            istio.join(CRDS).to_str().unwrap(),
        ],
        None,
    );
    eprintln!("Istio's CRDs applied in {:.1?}", crds_started.elapsed());
    lab.ensure_namespace(Cluster::Local, NS);

    // The istiod chart with plugca's values: checked, its mesh and injector
    // ConfigMaps applied (istiod reads both from the apiserver at start).
    let render = render_istiod_chart(lab, &istio);
    check_render(&render);
    for name in ["istio", "istio-sidecar-injector"] {
        lab.kubectl_ok(
            Cluster::Local,
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            Some(&object(&render, "ConfigMap", name).to_string()),
        );
    }

    // plugca with a plugged intermediate (r1 → i1) and its controllers.
    let r1 = rotation_root("mesh-root-1");
    let i1 = rotation_intermediate(&r1, "mesh-ica-1");
    let bundle = Bundle {
        dir: w.join("cacerts"),
    };
    bundle.write(&i1, &[&r1]);
    let server = Server::start(&server_args(
        &bundle.dir,
        &[
            "--kubeconfig",
            lab.kubeconfig(Cluster::Local).to_str().unwrap(),
            "--cluster-id",
            CLUSTER_ID,
            "--root-configmap",
            "--istiod-tls-secret",
            "--istiod-namespace",
            NS,
            // The apiserver calls the injection webhook at https://localhost:<port>
            // (no Services route here): istiod's certificate must carry that name too.
            "--istiod-extra-dns-names",
            "localhost",
            "--leader-election-namespace",
            NS,
            "--pod-name",
            "plugca-mesh-0",
            "--reload-interval",
            "2s",
        ],
    ))
    .await;
    let plugca_port = server.grpc.port();

    // Its istiod-tls, projected where the chart mounts it.
    let istiod_dir = w.join("istiod");
    std::fs::create_dir_all(&istiod_dir).unwrap();
    let (serial1, _) = wait_for(
        STEP,
        "plugca wrote istiod-tls and istio-system's ConfigMap",
        || Istiod::project_certs(lab, &istiod_dir),
    );
    let (crt, _, ca) = istiod_tls(lab).unwrap();
    assert!(
        signed_by(&crt, &i1),
        "istiod-tls is issued by the plugged intermediate"
    );
    assert!(holds(&ca, &r1));

    // 1. istiod on plugca's certificate.
    let istiod = Istiod::start(lab, &istiod_dir, &render);
    let leaf = istiod
        .served_leaf(&r1.cert_pem)
        .unwrap_or_else(|e| panic!("s_client against istiod with plugca's root:\n{e}"));
    assert_eq!(
        serial_of(&leaf),
        serial1,
        "istiod serves the istiod-tls plugca wrote"
    );
    assert!(
        istiod
            .log()
            .contains("./var/run/secrets/istiod/ca/root-cert.pem"),
        "istiod watches the projected ConfigMap as its CA file"
    );
    eprintln!(
        "istiod: secure XDS 127.0.0.1:{} (Verify return code: 0 with plugca's root, name {ISTIOD_NAME}), \
         http {}, webhooks {}, monitoring {}",
        istiod.secure, istiod.http, istiod.https, istiod.monitoring
    );

    // 2. Sidecars: pods injected by istiod through the apiserver's webhook.
    let ca_bundle = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(&server.root_pem)
    };
    let webhook = serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "istio-sidecar-injector-lab"},
        "webhooks": [{
            "name": "sidecar-injector.istio.io",
            "clientConfig": {
                "url": format!("https://localhost:{}/inject", istiod.https),
                "caBundle": ca_bundle,
            },
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"istio-injection": "enabled"}},
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "failurePolicy": "Fail",
            "timeoutSeconds": 10,
        }],
    });
    lab.kubectl_ok(
        Cluster::Local,
        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
        Some(&webhook.to_string()),
    );
    let mut sidecars: Vec<Sidecar> = Vec::new();
    for (prefix, sa, pods) in [("mesh-a", "sleep", 2), ("mesh-b", "httpbin", 1)] {
        let ns = lab.namespace(Cluster::Local, prefix);
        lab.kubectl_ok(
            Cluster::Local,
            &["label", "namespace", &ns, "istio-injection=enabled"],
            None,
        );
        lab.service_account(Cluster::Local, &ns, sa);
        for n in 1..=pods {
            let pod = format!("{sa}-{n}");
            let yaml = serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod, "namespace": ns, "labels": {"app": sa}},
                "spec": {"nodeName": "lab-node", "serviceAccountName": sa,
                         "containers": [{"name": sa, "image": "none.invalid/none"}]},
            });
            let dir = w.join(format!("{ns}-{pod}"));
            std::fs::create_dir_all(&dir).unwrap();
            sidecars.push(Sidecar {
                ns: ns.clone(),
                pod: pod.clone(),
                sa: sa.to_string(),
                dir,
                agent: None,
                xds: None,
                xds_runs: 0,
            });
            // The webhook may still be warming up in the apiserver: bounded retries.
            wait_for(
                STEP,
                &format!("pod {ns}/{pod} created through the webhook"),
                || {
                    lab.kubectl(
                        Cluster::Local,
                        &["create", "-f", "-"],
                        Some(&yaml.to_string()),
                    )
                    .map_err(|e| eprintln!("{e}"))
                    .ok()
                },
            );
        }
    }
    wait_for(
        STEP,
        "plugca's ConfigMap in the sidecars' namespaces",
        || {
            sidecars
                .iter()
                .all(|s| configmap_roots(lab, &s.ns).is_some())
                .then_some(())
        },
    );
    for s in &mut sidecars {
        let pod = lab.kubectl_ok(
            Cluster::Local,
            &["-n", &s.ns, "get", "pod", &s.pod, "-o", "json"],
            None,
        );
        let env = check_injected(&serde_json::from_str(&pod).unwrap());
        let roots = s.project_roots(lab);
        assert!(holds(&roots, &r1));
        s.project_token(lab);
        s.start_agent(lab, &env, plugca_port, istiod.secure);
    }
    let agents_started = Instant::now();
    for s in &sidecars {
        let leaf = wait_for(
            STEP,
            &format!("{}/{}: certificate from plugca", s.ns, s.pod),
            || s.leaf(),
        )
        .0;
        assert!(signed_by(&leaf, &i1), "{}", s.log_tail());
        s.check_chain(&r1);
        assert!(holds(&s.written_roots(), &r1));
    }
    for s in &mut sidecars {
        s.start_xds(lab);
    }
    let expect_connected = |istiod: &Istiod, sidecars: &[Sidecar], what: &str| {
        wait_for(STEP, what, || {
            let ids = istiod.connections();
            sidecars
                .iter()
                .all(|s| {
                    ids.iter()
                        .any(|id| id.starts_with(&format!("{}.{}-", s.pod, s.ns)))
                        && s.xds_responses() > 0
                })
                .then_some(ids)
        })
    };
    let (ids, _) = expect_connected(
        &istiod,
        &sidecars,
        "istiod lists every sidecar's XDS stream",
    );
    eprintln!(
        "agents certified and connected {:.1?} after start; istiod's connections: {ids:?}",
        agents_started.elapsed()
    );
    assert!(
        !istiod.log().contains("Unauthorized XDS"),
        "istiod refused an agent's identity:\n{}",
        istiod.log_tail()
    );
    assert_no_failed_calls(&server, "after the first issuance").await;

    // 3. Rotation under traffic.
    let rotation_started = Instant::now();
    let ids_before = istiod.connections();

    // 3a. A new intermediate under the same root.
    let i2 = rotation_intermediate(&r1, "mesh-ica-2");
    bundle.write(&i2, &[&r1]);
    let step = Instant::now();
    let (serial2, _) = wait_for(
        STEP,
        "a: istiod-tls re-issued by the new intermediate",
        || {
            let (crt, _, _) = istiod_tls(lab)?;
            signed_by(&crt, &i2).then(|| serial_of(&crt))
        },
    );
    assert_ne!(serial2, serial1);
    Istiod::project_certs(lab, &istiod_dir).unwrap();
    wait_for(STEP, "a: istiod serves the renewed certificate", || {
        istiod
            .served_leaf(&r1.cert_pem)
            .ok()
            .filter(|l| serial_of(l) == serial2)
    });
    for s in &sidecars {
        wait_for(
            STEP,
            &format!("a: {}/{} renewed under the new intermediate", s.ns, s.pod),
            || s.leaf().filter(|l| signed_by(l, &i2)),
        );
        s.check_chain(&r1);
    }
    let still = istiod.connections();
    eprintln!(
        "a: intermediate swapped in {:.1?}; XDS streams before {ids_before:?}, after {still:?}",
        step.elapsed()
    );
    expect_connected(&istiod, &sidecars, "a: every sidecar still connected");
    assert_no_failed_calls(&server, "after the intermediate swap").await;

    // 3b. A second root added to the bundle (still signing with i2 under r1).
    let r2 = rotation_root("mesh-root-2");
    bundle.write(&i2, &[&r1, &r2]);
    let step = Instant::now();
    wait_for(STEP, "b: every ConfigMap holds both roots", || {
        let mut namespaces: Vec<&str> = sidecars.iter().map(|s| s.ns.as_str()).collect();
        namespaces.push(NS);
        namespaces
            .iter()
            .all(|ns| configmap_roots(lab, ns).is_some_and(|r| holds(&r, &r1) && holds(&r, &r2)))
            .then_some(())
    });
    let (serial3, _) = wait_for(
        STEP,
        "b: istiod-tls re-issued with both roots in ca.crt",
        || {
            let (crt, _, ca) = istiod_tls(lab)?;
            (holds(&ca, &r2) && serial_of(&crt) != serial2).then(|| serial_of(&crt))
        },
    );
    Istiod::project_certs(lab, &istiod_dir).unwrap();
    wait_for(STEP, "b: istiod serves the re-issued certificate", || {
        istiod
            .served_leaf(&r1.cert_pem)
            .ok()
            .filter(|l| serial_of(l) == serial3)
    });
    for s in &sidecars {
        let roots = s.project_roots(lab);
        assert!(holds(&roots, &r2));
    }
    for s in &sidecars {
        wait_for(
            STEP,
            &format!("b: {}/{} got both roots from plugca", s.ns, s.pod),
            || {
                let roots = s.written_roots();
                (holds(&roots, &r1) && holds(&roots, &r2)).then_some(())
            },
        );
    }
    eprintln!("b: second root added in {:.1?}", step.elapsed());
    expect_connected(&istiod, &sidecars, "b: every sidecar still connected");
    assert_no_failed_calls(&server, "after adding a root").await;

    // 3c. The first root retired: a new intermediate under r2, r2 alone.
    let i3 = rotation_intermediate(&r2, "mesh-ica-3");
    bundle.write(&i3, &[&r2]);
    let step = Instant::now();
    wait_for(STEP, "c: every ConfigMap holds the new root only", || {
        let mut namespaces: Vec<&str> = sidecars.iter().map(|s| s.ns.as_str()).collect();
        namespaces.push(NS);
        namespaces
            .iter()
            .all(|ns| configmap_roots(lab, ns).is_some_and(|r| !holds(&r, &r1) && holds(&r, &r2)))
            .then_some(())
    });
    let (serial4, _) = wait_for(STEP, "c: istiod-tls re-issued under the new root", || {
        let (crt, _, ca) = istiod_tls(lab)?;
        (signed_by(&crt, &i3) && !holds(&ca, &r1)).then(|| serial_of(&crt))
    });
    Istiod::project_certs(lab, &istiod_dir).unwrap();
    wait_for(
        STEP,
        "c: istiod serves a certificate that verifies with the new root alone",
        || {
            istiod
                .served_leaf(&r2.cert_pem)
                .ok()
                .filter(|l| serial_of(l) == serial4)
        },
    );
    assert!(
        istiod.served_leaf(&r1.cert_pem).is_err(),
        "istiod's certificate still verifies with the retired root"
    );
    for s in &sidecars {
        s.project_roots(lab);
    }
    for s in &sidecars {
        wait_for(
            STEP,
            &format!("c: {}/{} renewed under the new root", s.ns, s.pod),
            || s.leaf().filter(|l| signed_by(l, &i3)),
        );
        s.check_chain(&r2);
        wait_for(
            STEP,
            &format!("c: {}/{} trusts the new root only", s.ns, s.pod),
            || {
                let roots = s.written_roots();
                (holds(&roots, &r2) && !holds(&roots, &r1)).then_some(())
            },
        );
    }
    // New XDS streams: the agents dial istiod again, trusting only the new root.
    for s in &mut sidecars {
        s.start_xds(lab);
    }
    let (ids_after, _) = expect_connected(
        &istiod,
        &sidecars,
        "c: every sidecar reconnected to istiod trusting only the new root",
    );
    eprintln!(
        "c: first root retired in {:.1?}; XDS streams now {ids_after:?}",
        step.elapsed()
    );
    for s in &sidecars {
        let file = std::fs::read_to_string(s.roots_dir().join("root-cert.pem")).unwrap();
        assert!(
            holds(&file, &r2) && !holds(&file, &r1),
            "{}: mounted roots",
            s.pod
        );
        assert!(holds(&s.written_roots(), &r2), "{}: agent roots", s.pod);
    }
    // The control: a sidecar left trusting only the retired root cannot
    // reach istiod any more (the agent verifies istiod with the mounted root),
    // and the current ConfigMap brings it back.
    let stale = &mut sidecars[0];
    project(
        &stale.roots_dir(),
        &[("root-cert.pem", r1.cert_pem.as_bytes())],
    );
    wait_for(
        STEP,
        "control: a sidecar trusting only the retired root is refused by istiod's TLS",
        || {
            stale.start_xds(lab);
            std::thread::sleep(Duration::from_secs(3));
            (stale.xds_errors() > 0 && stale.xds_responses() == 0).then_some(())
        },
    );
    let refusal = std::fs::read_to_string(stale.dir.join(format!("xds-{}.log", stale.xds_runs)))
        .unwrap_or_default()
        .lines()
        .find(|l| l.contains(r#""event":"xds-error""#))
        .unwrap_or_default()
        .to_string();
    eprintln!("control: what the stale sidecar's downstream saw: {refusal}");
    stale.project_roots(lab);
    wait_for(
        STEP,
        "control: with the current ConfigMap it connects again",
        || {
            stale.start_xds(lab);
            std::thread::sleep(Duration::from_secs(2));
            (stale.xds_responses() > 0).then_some(())
        },
    );
    expect_connected(&istiod, &sidecars, "control: every sidecar connected");
    let issued = assert_no_failed_calls(&server, "after retiring the first root").await;
    let (_, metrics) = server.http_get("/metrics").await;
    let reloads: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("plugca_ca_reloads_total"))
        .collect();
    let reloaded: f64 = reloads
        .iter()
        .find(|l| l.contains(r#"result="success""#))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    assert!(
        reloaded >= 3.0,
        "three bundle changes, three reloads: {reloads:?}"
    );
    assert!(
        !metrics.contains("plugca_controller_errors_total{"),
        "controller errors:\n{metrics}"
    );
    assert!(
        !istiod.log().contains("Unauthorized XDS"),
        "{}",
        istiod.log_tail()
    );
    eprintln!(
        "rotation (swap, add, retire) under traffic in {:.1?}; {issued} certificates issued, none refused; \
         reloads {reloads:?}; whole test {:.1?}",
        rotation_started.elapsed(),
        test_started.elapsed()
    );

    for s in &mut sidecars {
        s.xds = None;
        s.agent = None;
    }
    drop(istiod);
    server.stop().await;
}
