//! The `plugca` binary: parse flags, set up logging, run the chosen command.

use std::process::ExitCode;

use clap::Parser;
use plugca::cli::{Cli, Command, EXIT_START, EXIT_USAGE};
use plugca::config::LogFormat;
use plugca::logging;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Select this build's TLS crypto backend as the process default up front.
    plugca::tls::crypto_provider();
    let Command::Serve(args) = cli.command else {
        // An in-process bench server would otherwise print an audit line per request.
        let level = if matches!(cli.command, Command::Bench(_)) {
            "warn"
        } else {
            "info"
        };
        let _log = logging::init(LogFormat::Text, level, logging::DEFAULT_BUFFER_LINES);
        return plugca::cli::run(cli.command).await;
    };
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("plugca: error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Lines go through a bounded queue that never blocks a request; the
    // guard writes out what is queued when main returns.
    let _log = logging::init(config.log_format, "info", config.log_buffer_lines);
    let running = match plugca::app::spawn(&config).await {
        Ok(running) => running,
        Err(e) => {
            eprintln!("plugca: error: {e}");
            return ExitCode::from(EXIT_START);
        }
    };
    match running.run_until(plugca::app::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("plugca: error: {e}");
            ExitCode::FAILURE
        }
    }
}
