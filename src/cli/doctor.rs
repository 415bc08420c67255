//! `plugca doctor DIR`: run every load check on a cacerts directory and explain
//! each problem. (Being written: see issue 5.)

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The cacerts directory to check.
    pub dir: PathBuf,
    /// Print a JSON report instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: DoctorArgs) -> ExitCode {
    match crate::ca::CaBundle::load_dir(&args.dir, time::OffsetDateTime::now_utc()) {
        Ok(Some(_)) => ExitCode::SUCCESS,
        Ok(None) => {
            eprintln!("{}: no CA bundle found", args.dir.display());
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}
