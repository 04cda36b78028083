//! The `stockd` binary: parses the command line, starts the server, waits for a signal.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use stockd::{Config, Durability};

/// stockd: an inventory reservation server for flash-sale traffic.
///
/// Holds every product's stock in memory, serializes changes per product in an actor, and
/// acknowledges a change only once its write-ahead log record is flushed.
#[derive(Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Start the server (the default when no command is given).
    Serve(ServeArgs),
}

#[derive(Args, Clone)]
struct ServeArgs {
    /// Address to listen on; port 0 picks a free port (printed as `listening on ADDR`).
    #[arg(long, env = "STOCKD_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Directory of the write-ahead log.
    #[arg(long, env = "STOCKD_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// Directory of snapshots.
    #[arg(long, env = "STOCKD_SNAPSHOT_DIR", default_value = "./snapshots")]
    snapshot_dir: PathBuf,
    /// Reservation time-to-live when a request gives none, in seconds (1..=86400).
    #[arg(long, env = "STOCKD_DEFAULT_TTL", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=86400))]
    default_ttl: u64,
    /// sync: a 2xx means the change is flushed to disk. async: answered before the flush
    /// (a crash can lose the last few milliseconds of acknowledged changes).
    #[arg(long, env = "STOCKD_DURABILITY", value_enum, default_value = "sync")]
    durability: Durability,
    /// Log format on stderr.
    #[arg(long, env = "STOCKD_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    init_tracing(args.log_format);
    let config = Config {
        listen: args.listen,
        data_dir: args.data_dir,
        snapshot_dir: args.snapshot_dir,
        default_ttl_seconds: args.default_ttl,
        durability: args.durability,
        ..Config::default()
    };
    let server = match stockd::start(config).await {
        Ok(server) => server,
        Err(err) => {
            tracing::error!(error = %err, "cannot start");
            eprintln!("stockd: {err}");
            return ExitCode::FAILURE;
        }
    };
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {}", server.local_addr());
        let _ = out.flush();
    }
    wait_for_signal().await;
    tracing::info!("shutting down");
    match server.shutdown().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("stockd: {err}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Serve(args)) => args,
        None => cli.serve,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("stockd: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(args))
}
