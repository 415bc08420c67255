//! Helpers for the Kubernetes, impersonation and XFCC tests: log capture
//! (refusal reasons are only in the log) and, in `apiserver`, an in-process
//! fake Kubernetes API server over real TLS; in `jwks`, a fake OIDC issuer.
#![allow(dead_code)]

pub mod apiserver;
pub mod jwks;
pub mod kube_lab;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

/// Everything the process logs, captured once per test binary so tests can
/// assert on refusal reasons (each test looks for its own unique strings).
#[derive(Clone)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the capturing subscriber (once) and returns the shared buffer.
pub fn logs() -> Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_env_filter("info")
            .with_writer(move || Sink(writer.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        Logs(buf)
    })
    .clone()
}

impl Logs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).to_string()
    }

    /// The lines containing every one of `needles`.
    pub fn lines_with(&self, needles: &[&str]) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_string)
            .collect()
    }

    /// Panics unless some line contains every one of `needles`.
    pub fn assert_line(&self, needles: &[&str]) -> String {
        let found = self.lines_with(needles);
        assert!(
            !found.is_empty(),
            "no log line with {needles:?}; log:\n{}",
            self.text()
        );
        found[0].clone()
    }
}
