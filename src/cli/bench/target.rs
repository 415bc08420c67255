//! The server an online run loads: a running plugca (`--addr`), or one this
//! process starts on `127.0.0.1:0`, as a child process of the same binary
//! (its CPU and RSS are then its own) or in-process through [`crate::app::spawn`].

use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;

/// How long a started server may take to answer `/ready`.
pub(super) const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The server an online run talks to.
pub enum Target {
    Remote(Remote),
    Local(Local),
}

/// A plugca that is already running. Only `addr` is ever contacted.
pub struct Remote {
    pub addr: SocketAddr,
    pub root_cert_pem: String,
    pub server_name: Option<String>,
    /// Bearer token sent with every request (`--auth jwt`).
    pub token: Option<String>,
    /// Client certificate chain and key (`--auth mtls`).
    pub client_identity: Option<(String, String)>,
    /// The same bundle the server uses, to measure the offline ceiling.
    pub cacerts_dir: Option<PathBuf>,
}

/// A plugca this process starts on `127.0.0.1:0`.
pub struct Local {
    pub ca: CaSource,
    pub server: ServerMode,
    /// More `plugca serve` flags (`--max-concurrent-signs 4`, ...).
    pub server_args: Vec<String>,
    /// `RUST_LOG` of a child server. It must keep the `listening` line (target
    /// `plugca`, info); `info,plugca::audit=warn` drops the per-issuance audit lines.
    pub server_log: String,
}

/// How a bench-started server runs.
#[derive(Debug, Clone)]
pub enum ServerMode {
    /// `<exe> serve ...` as a child process: its CPU and RSS are its own.
    Child { exe: PathBuf },
    /// In this process: CPU and RSS are shared with the load generator.
    InProcess,
}

/// A server started for the run.
pub(super) struct StartedServer {
    pub(super) grpc: SocketAddr,
    pub(super) start_to_ready: Duration,
    pub(super) idle_rss_kb: u64,
    pub(super) kind: ServerKind,
}

pub(super) enum ServerKind {
    Child { child: ChildGuard, log: Arc<LogTap> },
    InProcess { running: crate::app::Running },
}

impl StartedServer {
    pub(super) fn pid(&self) -> Option<u32> {
        match &self.kind {
            ServerKind::Child { child, .. } => Some(child.0.id()),
            ServerKind::InProcess { .. } => None,
        }
    }

    pub(super) fn proc_key(&self) -> String {
        self.pid().map_or_else(|| "self".into(), |p| p.to_string())
    }

    pub(super) fn process_label(&self) -> &'static str {
        match self.kind {
            ServerKind::Child { .. } => "child",
            ServerKind::InProcess { .. } => "in-process",
        }
    }

    pub(super) fn cpu_secs(&self) -> Option<f64> {
        proc_cpu_secs(&self.proc_key())
    }

    pub(super) fn rss_kb(&self, field: &str) -> u64 {
        proc_status_kb(&self.proc_key(), field).unwrap_or(0)
    }

    pub(super) fn log_lines(&self) -> Option<u64> {
        match &self.kind {
            ServerKind::Child { log, .. } => Some(log.lines.load(Ordering::Relaxed)),
            ServerKind::InProcess { .. } => None,
        }
    }

    pub(super) async fn stop(self) {
        match self.kind {
            ServerKind::Child { child, .. } => drop(child),
            ServerKind::InProcess { running } => {
                let _ = running.stop().await;
            }
        }
    }
}

/// Kills the child server when the run ends, however it ends.
pub(super) struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads the child's log: finds the listening line, then counts lines.
#[derive(Default)]
pub(super) struct LogTap {
    pub(super) lines: AtomicU64,
    /// The last lines, to explain a failed start.
    pub(super) tail: Mutex<std::collections::VecDeque<String>>,
}

pub(super) fn serve_args(
    dir: &Path,
    load: &Load,
    jwks: Option<&Path>,
    extra: &[String],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "serve",
        "--grpc-addr",
        "127.0.0.1:0",
        "--monitoring-addr",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--trust-domain",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(load.trust_domain.to_string());
    args.push("--cacerts-dir".into());
    args.push(dir.display().to_string());
    match (load.auth, jwks) {
        (AuthMode::Lab, _) => args.push("--insecure-trust-csr-identity".into()),
        (_, Some(jwks)) => args.extend([
            "--jwt-issuer".into(),
            JWT_ISSUER.into(),
            "--jwks-file".into(),
            jwks.display().to_string(),
        ]),
        (_, None) => {}
    }
    args.extend(extra.iter().cloned());
    args
}

pub(super) async fn start_server(
    local: &Local,
    dir: &Path,
    load: &Load,
    minter: Option<&JwtMinter>,
) -> Result<StartedServer, BenchError> {
    let jwks = minter.map(|m| m.jwks_path.clone());
    let args = serve_args(dir, load, jwks.as_deref(), &local.server_args);
    let started = Instant::now();
    let (grpc, monitoring, kind) = match &local.server {
        ServerMode::Child { exe } => {
            let mut child = std::process::Command::new(exe)
                .args(&args)
                .env("RUST_LOG", &local.server_log)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| BenchError::ServerStart(format!("{}: {e}", exe.display())))?;
            let stderr = child.stderr.take().expect("stderr is piped");
            let child = ChildGuard(child);
            let log = Arc::new(LogTap::default());
            let (tx, rx) = std::sync::mpsc::channel();
            let tap = log.clone();
            std::thread::spawn(move || read_child_log(stderr, &tap, tx));
            let addrs = tokio::task::spawn_blocking(move || rx.recv_timeout(READY_TIMEOUT))
                .await
                .map_err(|e| BenchError::ServerStart(e.to_string()))?;
            let (grpc, monitoring) = addrs.map_err(|_| {
                let tail: Vec<String> = log
                    .tail
                    .lock()
                    .map(|t| t.iter().cloned().collect())
                    .unwrap_or_default();
                BenchError::ServerStart(format!(
                    "no listening line from the child; its last output:\n{}",
                    tail.join("\n")
                ))
            })?;
            (grpc, monitoring, ServerKind::Child { child, log })
        }
        ServerMode::InProcess => {
            // `serve_args` starts with the subcommand, for the child.
            let config = crate::config::Config::from_args(&args[1..])
                .map_err(|e| BenchError::ServerStart(e.to_string()))?;
            let running = crate::app::spawn(&config)
                .await
                .map_err(|e| BenchError::ServerStart(e.to_string()))?;
            (
                running.grpc_addr(),
                running.monitoring_addr(),
                ServerKind::InProcess { running },
            )
        }
    };
    wait_ready(monitoring).await?;
    let start_to_ready = started.elapsed();
    Ok(StartedServer {
        grpc,
        start_to_ready,
        idle_rss_kb: 0,
        kind,
    })
}

pub(super) fn read_child_log(
    stderr: std::process::ChildStderr,
    tap: &LogTap,
    tx: std::sync::mpsc::Sender<(SocketAddr, SocketAddr)>,
) {
    let mut reader = std::io::BufReader::with_capacity(1 << 16, stderr);
    let mut line = String::new();
    let mut announced = false;
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        tap.lines.fetch_add(1, Ordering::Relaxed);
        if announced {
            continue;
        }
        if let Ok(mut tail) = tap.tail.lock() {
            if tail.len() == 20 {
                tail.pop_front();
            }
            tail.push_back(line.trim_end().to_string());
        }
        if let Some(addrs) = listening_addrs(&line) {
            announced = true;
            let _ = tx.send(addrs);
        }
    }
}

/// The addresses in the server's `listening` JSON log line.
pub(super) fn listening_addrs(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = v.get("fields")?;
    if fields.get("message")?.as_str()? != "listening" {
        return None;
    }
    let grpc = fields.get("grpc")?.as_str()?.parse().ok()?;
    let monitoring = fields.get("monitoring")?.as_str()?.parse().ok()?;
    Some((grpc, monitoring))
}

/// Polls `/ready` every millisecond until it answers 200.
pub(super) async fn wait_ready(addr: SocketAddr) -> Result<(), BenchError> {
    crate::app::wait_ready(addr, READY_TIMEOUT)
        .await
        .map_err(|e| BenchError::ServerStart(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_line_of_a_json_log_gives_both_addresses() {
        let line = r#"{"timestamp":"t","level":"INFO","fields":{"message":"listening","grpc":"127.0.0.1:4000","monitoring":"127.0.0.1:4001"},"target":"plugca"}"#;
        let (grpc, mon) = listening_addrs(line).unwrap();
        assert_eq!(grpc.port(), 4000);
        assert_eq!(mon.port(), 4001);
        assert!(listening_addrs(r#"{"fields":{"message":"serving"}}"#).is_none());
        assert!(listening_addrs("not json").is_none());
    }
}
