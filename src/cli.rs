//! The `plugca` command line: `serve`, `request`, `certs`, `doctor`, `verify`, `bench`.

pub mod bench;
pub mod certs;
pub mod doctor;
pub mod istiod_cert;
pub mod request;
pub mod verify;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::ServeArgs;

/// Exit code for bad flags or configuration (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;
/// Exit code when the server cannot start (bad CA bundle, port in use).
pub const EXIT_START: u8 = 1;

#[derive(Debug, Parser)]
#[command(
    name = "plugca",
    version,
    about = "An Istio-compatible CA for plugged-in CA certificates"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
// Parsed once at startup; boxing the big `serve` flags buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the CA: gRPC IstioCertificateService over TLS plus a monitoring port.
    Serve(ServeArgs),
    /// Request a workload certificate like a sidecar or ztunnel does.
    Request(request::RequestArgs),
    /// Generate a root CA or a plug-in intermediate (a `cacerts` directory).
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Check a cacerts directory and explain every problem (exit 0 healthy, 1 problems, 2 unreadable).
    Doctor(doctor::DoctorArgs),
    /// Verify a workload's presented chain against the plugged CA files, like Istio's task.
    Verify(verify::VerifyArgs),
    /// Load-test a CA over the real protocol (gRPC/TLS), or measure the offline issuance ceiling.
    Bench(bench::BenchArgs),
}

/// Runs a non-serve subcommand; `serve` is driven by `main`.
pub async fn run(command: Command) -> ExitCode {
    let result = match command {
        Command::Serve(_) => unreachable!("serve is handled by main"),
        Command::Request(args) => request::run(args).await,
        Command::Certs(cmd) => certs::run(cmd),
        Command::Doctor(args) => return doctor::run(args),
        Command::Verify(args) => return verify::run(args).await,
        Command::Bench(args) => bench::run(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("plugca: error: {message}");
            ExitCode::FAILURE
        }
    }
}
