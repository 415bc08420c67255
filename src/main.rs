//! The `plugca` binary: parse flags, set up logging, run the chosen command.

use std::process::ExitCode;

use clap::Parser;
use plugca::cli::{Cli, Command, EXIT_START, EXIT_USAGE};
use plugca::config::LogFormat;

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
        let _log = init_tracing(LogFormat::Text, level);
        return plugca::cli::run(cli.command).await;
    };
    let log_format = args.log_format;
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("plugca: error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Flushes buffered log lines when main returns.
    let _log = init_tracing(log_format, "info");
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

/// Logs go to stderr through a background writer so request threads do not
/// wait on the terminal or pipe; it is not lossy (a full buffer applies
/// backpressure), so no audit line is dropped.
fn init_tracing(
    format: LogFormat,
    default_level: &str,
) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    guard
}
