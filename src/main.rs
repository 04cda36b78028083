//! The `stockd` binary: parses the command line, starts the server, waits for a signal.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use stockd::storage::snapshot::WriteHooks;
use stockd::storage::snapshotter::{take_offline, SnapshotPolicy};
use stockd::{Config, Durability};

/// mimalloc rather than the system allocator: a request, a log record and a replayed
/// record each make many small allocations, and glibc's malloc/free were ~17 % of a
/// reserve's CPU and ~25 % of log replay's (perf; see docs/PERFORMANCE.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// stockd: an inventory reservation server for flash-sale traffic.
///
/// Holds every product's stock in memory, serializes changes per product in an actor, and
/// acknowledges a change only once its write-ahead log record is flushed.
#[derive(Parser)]
#[command(
    version,
    args_conflicts_with_subcommands = true,
    after_help = "Environment: STOCKD_TRANSPARENT_HUGE_PAGES=on|off (default off) keeps or turns \
                  off the kernel's transparent huge pages for stockd; read before the arguments, \
                  any other value exits with code 2."
)]
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
    /// Take a snapshot of a stopped server's data (or `inspect` a snapshot file).
    Snapshot(SnapshotCommand),
    /// Inspect the write-ahead log of a stopped server.
    Log {
        #[command(subcommand)]
        action: LogAction,
    },
    /// Internal: builds one snapshot for a running server, which starts it and feeds it
    /// the log over stdin (see `stockd::storage::snapshot_worker`).
    #[command(name = "snapshot-worker", hide = true)]
    SnapshotWorker(WorkerArgs),
}

#[derive(Args)]
struct WorkerArgs {
    #[arg(long)]
    snapshot_dir: PathBuf,
    #[arg(long)]
    upto: u64,
    #[arg(long)]
    truncated_through: u64,
    #[arg(long)]
    now: i64,
    #[arg(long)]
    pause_before_rename_ms: Option<u64>,
    /// The server process that started this worker (it dies with it).
    #[arg(long)]
    parent_pid: Option<u32>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct SnapshotCommand {
    #[command(subcommand)]
    action: Option<SnapshotAction>,
    #[command(flatten)]
    take: OfflineSnapshotArgs,
}

#[derive(Subcommand)]
enum SnapshotAction {
    /// Verify a snapshot file and describe it: sequence, time, counts, size.
    Inspect {
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct OfflineSnapshotArgs {
    /// Directory of the write-ahead log.
    #[arg(long, env = "STOCKD_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// Directory of snapshots.
    #[arg(long, env = "STOCKD_SNAPSHOT_DIR", default_value = "./snapshots")]
    snapshot_dir: PathBuf,
    /// Snapshots kept; the log keeps the records after the oldest of them.
    #[arg(long, env = "STOCKD_SNAPSHOTS_KEEP", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    snapshots_keep: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum LogAction {
    /// Sequence range, record counts per kind and sizes of the log.
    Dump {
        /// Directory of the write-ahead log.
        #[arg(long, env = "STOCKD_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
        /// Also print every record, one JSON object per line.
        #[arg(long)]
        records: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
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
    /// Take a snapshot once this many log records were written since the newest one
    /// (0: never by count).
    #[arg(long, env = "STOCKD_SNAPSHOT_EVERY_RECORDS", default_value_t = 500_000)]
    snapshot_every_records: u64,
    /// Take a snapshot this often, in seconds, if anything changed (0: never by time).
    #[arg(long, env = "STOCKD_SNAPSHOT_EVERY_SECONDS", default_value_t = 600)]
    snapshot_every_seconds: u64,
    /// Snapshots kept; the log keeps the records after the oldest of them.
    #[arg(long, env = "STOCKD_SNAPSHOTS_KEEP", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    snapshots_keep: u64,
    /// A product actor idle this many seconds is passivated (its state kept as plain
    /// data) until its next request (0: never).
    #[arg(long, env = "STOCKD_PASSIVATE_AFTER", default_value_t = 60)]
    passivate_after: u64,
    /// How long ended reservations (after their deadline) and idempotency keys (after
    /// their reservation was created) are remembered, in seconds; then they are forgotten.
    #[arg(long, env = "STOCKD_RETENTION_SECONDS", default_value_t = 86_400,
          value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
    retention_seconds: u64,
    /// If a log record is damaged, remove it and every later record and start, instead of
    /// refusing to start. Acknowledged changes in the removed records are lost.
    #[arg(long)]
    truncate_damaged_log: bool,
    /// on: snapshots are built in a child process (this binary again), so the server
    /// never holds the second copy of the state a snapshot needs; off: in the server.
    #[arg(long, env = "STOCKD_SNAPSHOT_WORKER", value_enum, default_value = "on")]
    snapshot_worker: OnOff,
    /// Test hook: pause this long while writing each snapshot file (to test crashes).
    #[arg(long, hide = true, env = "STOCKD_TEST_SNAPSHOT_PAUSE_MS")]
    test_snapshot_pause_ms: Option<u64>,
    /// Test hook: log writes fail from the record with this sequence on (a failed log).
    #[arg(long, hide = true, env = "STOCKD_TEST_LOG_FAIL_FROM_SEQ")]
    test_log_fail_from_seq: Option<u64>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_tracing(format: LogFormat) -> stockd::logging::Guard {
    stockd::logging::init(match format {
        LogFormat::Text => stockd::logging::Format::Text,
        LogFormat::Json => stockd::logging::Format::Json,
    })
}

/// SIGTERM and SIGINT (Ctrl-C), caught from the start of `serve`, so that no signal ever
/// takes its default action (an abrupt exit) on a server that may have acknowledged
/// changes: the first starts a graceful shutdown, once start-up is done (start-up cannot be
/// cut short safely once it has begun to serve; a signal during it takes effect when it
/// ends, without announcing an address); a second one, while that shutdown runs, ends the
/// process at once with status 1 (the operator's explicit choice).
///
/// Returns the receiver of the first signal.
fn watch_signals() -> tokio::sync::oneshot::Receiver<()> {
    let (first, received) = tokio::sync::oneshot::channel();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        // Made here, not in the task: a stream catches its signal from when it is made.
        let catch = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(stream) => Some(stream),
            Err(err) => {
                tracing::warn!(error = %err, signal = name, "cannot catch the signal");
                None
            }
        };
        let mut term = catch(SignalKind::terminate(), "SIGTERM");
        let mut int = catch(SignalKind::interrupt(), "SIGINT");
        tokio::spawn(async move {
            async fn recv(stream: &mut Option<tokio::signal::unix::Signal>) {
                match stream {
                    Some(stream) => {
                        stream.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            let mut first = Some(first);
            loop {
                tokio::select! {
                    _ = recv(&mut term) => {},
                    _ = recv(&mut int) => {},
                }
                match first.take() {
                    Some(first) => drop(first.send(())),
                    None => {
                        tracing::error!("a second signal during shutdown: exiting now");
                        let _ = writeln!(
                            std::io::stderr(),
                            "stockd: a second signal during shutdown: exiting now"
                        );
                        std::process::exit(1);
                    }
                }
            }
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = first.send(());
        }
    });
    received
}

async fn serve(args: ServeArgs) -> ExitCode {
    let _logging = init_tracing(args.log_format);
    let mut stop = watch_signals();
    let config = Config {
        listen: args.listen,
        data_dir: args.data_dir,
        snapshot_dir: args.snapshot_dir,
        default_ttl_seconds: args.default_ttl,
        durability: args.durability,
        snapshots: SnapshotPolicy {
            every_records: args.snapshot_every_records,
            every: (args.snapshot_every_seconds > 0)
                .then(|| Duration::from_secs(args.snapshot_every_seconds)),
            keep: args.snapshots_keep as usize,
            on_shutdown: true,
        },
        passivate_after: (args.passivate_after > 0)
            .then(|| Duration::from_secs(args.passivate_after)),
        truncate_damaged_log: args.truncate_damaged_log,
        retention: Duration::from_secs(args.retention_seconds),
        snapshot_worker: match args.snapshot_worker {
            // /proc/self/exe runs the very binary this server runs, even after an upgrade
            // replaced the file (a worker of another version could disagree on formats).
            OnOff::On => match std::path::Path::new("/proc/self/exe")
                .exists()
                .then(|| PathBuf::from("/proc/self/exe"))
                .map_or_else(std::env::current_exe, Ok)
            {
                Ok(path) => Some(path),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot find this binary; snapshots are built in the server");
                    None
                }
            },
            OnOff::Off => None,
        },
        snapshot_hooks: WriteHooks {
            pause_before_rename: args.test_snapshot_pause_ms.map(Duration::from_millis),
        },
        log_fail_from_seq: args.test_log_fail_from_seq,
        ..Config::default()
    };
    let server = match stockd::start(config).await {
        Ok(server) => server,
        Err(err) => {
            tracing::error!(error = %err, "cannot start");
            let _ = writeln!(std::io::stderr(), "stockd: {err}");
            return ExitCode::FAILURE;
        }
    };
    if stop.try_recv().is_ok() {
        tracing::info!("a signal arrived during start-up");
    } else {
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "listening on {}", server.local_addr());
            let _ = out.flush();
        }
        let _ = (&mut stop).await;
    }
    tracing::info!("shutting down");
    match server.shutdown().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "stockd: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Prints `value` as JSON, or `text` for people.
fn print(json: bool, value: &impl serde::Serialize, text: impl FnOnce() -> String) {
    if json {
        match serde_json::to_string_pretty(value) {
            Ok(out) => println!("{out}"),
            Err(err) => eprintln!("stockd: {err}"),
        }
    } else {
        print!("{}", text());
    }
}

/// Names the usual cause of an error opening a log that a server has open.
fn explain(err: String) -> String {
    if err.contains("lock") {
        format!("{err} (is a server running on this data directory? stop it first)")
    } else {
        err
    }
}

fn offline_snapshot(args: OfflineSnapshotArgs) -> ExitCode {
    let now = chrono::Utc::now().timestamp_millis();
    let log_dir = args.data_dir.join("log");
    if !log_dir.exists() {
        eprintln!("stockd: no log in {}", log_dir.display());
        return ExitCode::FAILURE;
    }
    match take_offline(
        &log_dir,
        &args.snapshot_dir,
        args.snapshots_keep as usize,
        now,
    ) {
        Ok(taken) => {
            print(args.json, &taken, || {
                format!(
                    "{} {} after log record {} ({} bytes, {} records folded, {} log records dropped, {} ms)\n",
                    if taken.created { "wrote" } else { "already current:" },
                    args.snapshot_dir.join(&taken.file).display(),
                    taken.sequence,
                    taken.size_bytes,
                    taken.records_folded,
                    taken.log_records_dropped,
                    taken.elapsed_ms
                )
            });
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("stockd: {}", explain(err));
            ExitCode::FAILURE
        }
    }
}

fn inspect_snapshot(file: &std::path::Path, json: bool) -> ExitCode {
    match stockd::storage::snapshot::inspect(file) {
        Ok(report) => {
            print(json, &report, || report.to_string());
            ExitCode::SUCCESS
        }
        Err(err) => {
            if json {
                print(
                    true,
                    &serde_json::json!({"file": file, "valid": false, "error": err.to_string()}),
                    String::new,
                );
            }
            eprintln!("stockd: {err}");
            ExitCode::FAILURE
        }
    }
}

fn dump_log(data_dir: &std::path::Path, records: bool, json: bool) -> ExitCode {
    let log_dir = data_dir.join("log");
    if !log_dir.exists() {
        eprintln!("stockd: no log in {}", log_dir.display());
        return ExitCode::FAILURE;
    }
    let log = match stockd::storage::log::Log::open(&log_dir) {
        Ok(log) => log,
        Err(err) => {
            eprintln!("stockd: {}", explain(err.to_string()));
            return ExitCode::FAILURE;
        }
    };
    let reader = log.reader();
    if records {
        for item in reader.records() {
            match item {
                Ok((seq, record)) => {
                    let line =
                        serde_json::json!({"seq": seq, "kind": record.kind(), "record": record});
                    println!("{line}");
                }
                Err(err) => {
                    eprintln!("stockd: {err}");
                    return ExitCode::FAILURE;
                }
            }
        }
        return ExitCode::SUCCESS;
    }
    match reader.summary() {
        Ok(summary) => {
            print(json, &summary, || summary.to_string());
            if summary.damaged_at.is_some() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(err) => {
            eprintln!("stockd: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `stockd snapshot-worker`: one snapshot for the server that started this process.
fn snapshot_worker(args: WorkerArgs) -> ExitCode {
    if let Some(parent) = args.parent_pid {
        if let Err(err) = stockd::storage::snapshot_worker::die_with_parent(parent) {
            let _ = writeln!(std::io::stderr(), "snapshot worker: {err}");
            return ExitCode::FAILURE;
        }
    }
    let job = stockd::storage::snapshot_worker::Job {
        snapshot_dir: args.snapshot_dir,
        upto: args.upto,
        truncated_through: args.truncated_through,
        now: args.now,
        pause_before_rename: args.pause_before_rename_ms.map(Duration::from_millis),
    };
    match stockd::storage::snapshot_worker::run(&job, std::io::stdin(), std::io::stdout().lock()) {
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "{err}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    // Before any large allocation: see `stockd::memory`.
    if let Err(err) = stockd::memory::apply_transparent_huge_pages_setting() {
        let _ = writeln!(std::io::stderr(), "stockd: {err}");
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Serve(args)) => args,
        Some(Command::Snapshot(cmd)) => {
            return match cmd.action {
                Some(SnapshotAction::Inspect { file, json }) => inspect_snapshot(&file, json),
                None => offline_snapshot(cmd.take),
            }
        }
        Some(Command::Log {
            action:
                LogAction::Dump {
                    data_dir,
                    records,
                    json,
                },
        }) => return dump_log(&data_dir, records, json),
        Some(Command::SnapshotWorker(args)) => return snapshot_worker(args),
        None => cli.serve,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "stockd: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(args))
}
