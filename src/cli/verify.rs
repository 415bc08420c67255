//! `plugca verify`: the Istio task's verification section as one command.
//! (Being written: see issue 5.)

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// PEM file with the chain a workload presents (leaf first).
    pub chain: Option<PathBuf>,
    /// Fetch the chain over TLS from host:port instead.
    #[arg(long)]
    pub connect: Option<String>,
    /// The plugged cacerts directory to compare with.
    #[arg(long)]
    pub cacerts_dir: PathBuf,
}

pub async fn run(_args: VerifyArgs) -> ExitCode {
    eprintln!("plugca verify: not implemented yet");
    ExitCode::from(2)
}
