//! The `stockd` command line: `serve` (the default), the operator's offline commands
//! (`snapshot`, `snapshot inspect`, `log dump`, `keys`) and the internal `snapshot-worker`.
//! `src/main.rs` only sets the allocator and calls `main` here.
//!
//! Every default comes from `crate::config` or `crate::limits`, the same constants
//! `Config::default()` uses, so the binary and the library cannot disagree.

mod keys;
mod offline;
mod serve;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

use crate::config::{self, Durability};
use crate::limits::{
    PASSIVATE_AFTER_SECONDS_DEFAULT, RETENTION_SECONDS_DEFAULT, RETENTION_SECONDS_MAX,
    SNAPSHOTS_KEPT_DEFAULT, SNAPSHOTS_KEPT_MAX, SNAPSHOT_EVERY_RECORDS_DEFAULT,
    SNAPSHOT_EVERY_SECONDS_DEFAULT, TTL_SECONDS_DEFAULT, TTL_SECONDS_MAX, TTL_SECONDS_MIN,
};

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
    Serve(Box<ServeArgs>),
    /// Take a snapshot of a stopped server's data (or `inspect` a snapshot file).
    Snapshot(SnapshotCommand),
    /// Inspect the write-ahead log of a stopped server.
    Log {
        #[command(subcommand)]
        action: LogAction,
    },
    /// Manage the API keys of a stopped server's data: create, list, revoke.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
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
    /// A cluster node's log: Raft entries are sent, not records.
    #[arg(long)]
    entries: bool,
    /// The Raft metadata (JSON) the folded state must hold before it is written.
    #[arg(long)]
    expect_raft: Option<String>,
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
    #[arg(long, env = "STOCKD_DATA_DIR", default_value = config::DATA_DIR_DEFAULT)]
    data_dir: PathBuf,
    /// Directory of snapshots.
    #[arg(long, env = "STOCKD_SNAPSHOT_DIR", default_value = config::SNAPSHOT_DIR_DEFAULT)]
    snapshot_dir: PathBuf,
    /// Snapshots kept; the log keeps the records after the oldest of them.
    #[arg(long, env = "STOCKD_SNAPSHOTS_KEEP", default_value_t = SNAPSHOTS_KEPT_DEFAULT as u64,
          value_parser = clap::value_parser!(u64).range(1..=SNAPSHOTS_KEPT_MAX))]
    snapshots_keep: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum KeysAction {
    /// Create a key and print its id and secret; the secret is shown this once (only its
    /// SHA-256 is kept).
    Create {
        /// The key's name: 1 to 100 printable characters.
        #[arg(long)]
        name: String,
        /// A scope of the key: read, reserve, stock or admin (admin implies the others).
        /// Repeat the flag, or separate scopes with commas.
        #[arg(
            long = "scope",
            value_name = "SCOPE",
            required = true,
            value_delimiter = ','
        )]
        scopes: Vec<String>,
        #[command(flatten)]
        args: KeysArgs,
    },
    /// List the keys: id, creation time, scopes, name (never a secret).
    List {
        #[command(flatten)]
        args: KeysArgs,
    },
    /// Revoke a key: the server refuses it from its next start.
    Revoke {
        /// The key's id, as `stockd keys list` shows it.
        id: String,
        #[command(flatten)]
        args: KeysArgs,
    },
}

/// Where `stockd keys` finds the keys: the log and the snapshots of a stopped server.
#[derive(Args)]
struct KeysArgs {
    /// Directory of the write-ahead log.
    #[arg(long, env = "STOCKD_DATA_DIR", default_value = config::DATA_DIR_DEFAULT)]
    data_dir: PathBuf,
    /// Directory of snapshots.
    #[arg(long, env = "STOCKD_SNAPSHOT_DIR", default_value = config::SNAPSHOT_DIR_DEFAULT)]
    snapshot_dir: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum LogAction {
    /// Sequence range, record counts per kind and sizes of the log.
    Dump {
        /// Directory of the write-ahead log.
        #[arg(long, env = "STOCKD_DATA_DIR", default_value = config::DATA_DIR_DEFAULT)]
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
    #[arg(long, env = "STOCKD_LISTEN", default_value = config::LISTEN_DEFAULT)]
    listen: SocketAddr,
    /// Directory of the write-ahead log.
    #[arg(long, env = "STOCKD_DATA_DIR", default_value = config::DATA_DIR_DEFAULT)]
    data_dir: PathBuf,
    /// Directory of snapshots.
    #[arg(long, env = "STOCKD_SNAPSHOT_DIR", default_value = config::SNAPSHOT_DIR_DEFAULT)]
    snapshot_dir: PathBuf,
    /// Reservation time-to-live when a request gives none, in seconds (1..=86400).
    #[arg(long, env = "STOCKD_DEFAULT_TTL", default_value_t = TTL_SECONDS_DEFAULT,
          value_parser = clap::value_parser!(u64).range(TTL_SECONDS_MIN..=TTL_SECONDS_MAX))]
    default_ttl: u64,
    /// sync: a 2xx means the change is flushed to disk. async: answered before the flush
    /// (a crash can lose the last few milliseconds of acknowledged changes).
    #[arg(long, env = "STOCKD_DURABILITY", value_enum, default_value = "sync")]
    durability: Durability,
    /// Log format on stderr.
    #[arg(long, env = "STOCKD_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: crate::logging::Format,
    /// Take a snapshot once this many log records were written since the newest one
    /// (0: never by count).
    #[arg(long, env = "STOCKD_SNAPSHOT_EVERY_RECORDS", default_value_t = SNAPSHOT_EVERY_RECORDS_DEFAULT)]
    snapshot_every_records: u64,
    /// Take a snapshot this often, in seconds, if anything changed (0: never by time).
    #[arg(long, env = "STOCKD_SNAPSHOT_EVERY_SECONDS", default_value_t = SNAPSHOT_EVERY_SECONDS_DEFAULT)]
    snapshot_every_seconds: u64,
    /// Snapshots kept; the log keeps the records after the oldest of them.
    #[arg(long, env = "STOCKD_SNAPSHOTS_KEEP", default_value_t = SNAPSHOTS_KEPT_DEFAULT as u64,
          value_parser = clap::value_parser!(u64).range(1..=SNAPSHOTS_KEPT_MAX))]
    snapshots_keep: u64,
    /// A product actor idle this many seconds is passivated (its state kept as plain
    /// data) until its next request (0: never).
    #[arg(long, env = "STOCKD_PASSIVATE_AFTER", default_value_t = PASSIVATE_AFTER_SECONDS_DEFAULT)]
    passivate_after: u64,
    /// How long ended reservations (after their deadline) and idempotency keys (after
    /// their reservation was created) are remembered, in seconds; then they are forgotten.
    #[arg(long, env = "STOCKD_RETENTION_SECONDS", default_value_t = RETENTION_SECONDS_DEFAULT,
          value_parser = clap::value_parser!(u64).range(1..=RETENTION_SECONDS_MAX))]
    retention_seconds: u64,
    /// Reservation attempts per second per customer_id; beyond it (and its burst)
    /// POST /v1/reservations answers 429 rate_limited. Unset: no limit.
    #[arg(long, env = "STOCKD_CUSTOMER_RATE",
          value_parser = clap::value_parser!(u32).range(1..))]
    customer_rate: Option<u32>,
    /// Attempts a customer may make at once before --customer-rate applies
    /// [default: twice --customer-rate].
    #[arg(long, env = "STOCKD_CUSTOMER_BURST", requires = "customer_rate",
          value_parser = clap::value_parser!(u32).range(1..))]
    customer_burst: Option<u32>,
    /// Read the first admin key from PATH (one trailing newline is trimmed): a bearer
    /// secret of 16 to 256 visible ASCII characters with every scope, never stored (its
    /// id is the nil UUID, its name "bootstrap"). Without this flag the environment
    /// variable STOCKD_ADMIN_KEY holds it. With no admin key and no key in the log, the
    /// server runs without authentication, and only on a loopback address.
    #[arg(long, env = "STOCKD_ADMIN_KEY_FILE", value_name = "PATH")]
    admin_key_file: Option<PathBuf>,
    /// Cluster: this node's id among --peers.
    #[arg(long, env = "STOCKD_NODE_ID", value_name = "N")]
    node_id: Option<u64>,
    /// Cluster: every voter, this node included, as ID=API@RAFT separated by commas
    /// (API: the node's public HOST:PORT, RAFT: its Raft listener's HOST:PORT), the same
    /// list on every node. A node never part of a cluster starts one with it; a node that
    /// is keeps its stored membership (a different --peers is warned about and ignored).
    /// Without --peers the server is a single node.
    #[arg(long, env = "STOCKD_PEERS", value_name = "LIST")]
    peers: Option<String>,
    /// Cluster: where the Raft listener binds [default: this node's RAFT address in
    /// --peers].
    #[arg(long, env = "STOCKD_RAFT_LISTEN", value_name = "ADDR")]
    raft_listen: Option<SocketAddr>,
    /// Cluster: this node joins a running cluster (the leader adds it with POST
    /// /v1/admin/cluster/learners) and never starts one, even when its id is the lowest
    /// in --peers. Without it, a new node with the lowest id starts a new cluster if no
    /// leader reaches it within 2 s.
    #[arg(long, env = "STOCKD_JOIN")]
    join: bool,
    /// Cluster: read the cluster key, which every Raft request carries, from PATH (one
    /// trailing newline is trimmed): at least 16 visible ASCII characters, the same on
    /// every node. Without this flag the environment variable STOCKD_CLUSTER_KEY holds
    /// it. Needed with --peers.
    #[arg(long, env = "STOCKD_CLUSTER_KEY_FILE", value_name = "PATH")]
    cluster_key_file: Option<PathBuf>,
    /// If a log record is damaged, remove it and every later record and start, instead of
    /// refusing to start. Acknowledged changes in the removed records are lost.
    #[arg(long)]
    truncate_damaged_log: bool,
    /// on: snapshots are built in a child process (this binary again), so the server
    /// never holds the second copy of the state a snapshot needs; off: in the server.
    #[arg(long, env = "STOCKD_SNAPSHOT_WORKER", value_enum, default_value = "on")]
    snapshot_worker: OnOff,
    /// on: the change feed (GET /v1/events) follows the log and keeps its events in
    /// DIR/events, at the cost of a compact second copy of the products and pending holds
    /// in memory (~140-250 bytes each) and a few per cent of the server's CPU under load;
    /// off: no feed (GET /v1/events answers 404).
    #[arg(long, env = "STOCKD_EVENTS", value_enum, default_value = "off")]
    events: OnOff,
    /// How long the change feed keeps events, in seconds (whole segments go once older).
    #[arg(long, env = "STOCKD_EVENTS_RETENTION_SECONDS",
          default_value_t = crate::feed::EVENTS_RETENTION_SECONDS_DEFAULT,
          value_parser = clap::value_parser!(u64).range(1..))]
    events_retention_seconds: u64,
    /// The most bytes the change feed's store keeps (oldest segments go first).
    #[arg(long, env = "STOCKD_EVENTS_MAX_BYTES",
          default_value_t = crate::feed::EVENTS_MAX_BYTES_DEFAULT,
          value_parser = clap::value_parser!(u64).range(1024..))]
    events_max_bytes: u64,
    /// Webhooks: every delivery's deadline (connect, send, answer), in milliseconds.
    #[arg(long, env = "STOCKD_WEBHOOK_TIMEOUT_MS",
          default_value_t = crate::webhooks::TIMEOUT_MS_DEFAULT,
          value_parser = clap::value_parser!(u64).range(1..))]
    webhook_timeout_ms: u64,
    /// Webhooks: the wait before the first retry of a failed delivery, in milliseconds;
    /// it doubles with each failure (times a random 0.5 to 1), up to --webhook-retry-max-ms.
    #[arg(long, env = "STOCKD_WEBHOOK_RETRY_INITIAL_MS",
          default_value_t = crate::webhooks::RETRY_INITIAL_MS_DEFAULT,
          value_parser = clap::value_parser!(u64).range(1..))]
    webhook_retry_initial_ms: u64,
    /// Webhooks: the longest wait between two retries, in milliseconds.
    #[arg(long, env = "STOCKD_WEBHOOK_RETRY_MAX_MS",
          default_value_t = crate::webhooks::RETRY_MAX_MS_DEFAULT,
          value_parser = clap::value_parser!(u64).range(1..))]
    webhook_retry_max_ms: u64,
    /// Webhooks: an endpoint whose deliveries have failed for this many seconds is
    /// disabled (until POST /v1/webhooks/{id}/enable).
    #[arg(long, env = "STOCKD_WEBHOOK_GIVE_UP_SECONDS",
          default_value_t = crate::webhooks::GIVE_UP_SECONDS_DEFAULT,
          value_parser = clap::value_parser!(u64).range(1..))]
    webhook_give_up_seconds: u64,
    /// Webhooks: trust the certificates in PATH (PEM, one or more) for https endpoints,
    /// beside the public (webpki) roots: a shop's own CA. A file that cannot be read or
    /// holds no certificate stops start-up.
    #[arg(long, env = "STOCKD_WEBHOOK_CA_FILE", value_name = "PATH")]
    webhook_ca_file: Option<PathBuf>,
    /// Test hook: pause this long while writing each snapshot file (to test crashes).
    #[arg(long, hide = true, env = "STOCKD_TEST_SNAPSHOT_PAUSE_MS")]
    test_snapshot_pause_ms: Option<u64>,
    /// Test hook: log writes fail from the record with this sequence on (a failed log).
    #[arg(long, hide = true, env = "STOCKD_TEST_LOG_FAIL_FROM_SEQ")]
    test_log_fail_from_seq: Option<u64>,
}

/// The environment variable a refused value came from: the variable of the flag the error
/// names, when it is set and the flag is not on the command line.
fn value_from_environment(err: &clap::Error) -> Option<String> {
    if !matches!(
        err.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return None;
    }
    let Some(ContextValue::String(arg)) = err.get(ContextKind::InvalidArg) else {
        return None;
    };
    // "--durability <DURABILITY>"
    let long = arg.strip_prefix("--")?.split([' ', '=']).next()?;
    let on_command_line = std::env::args_os().skip(1).any(|a| {
        let a = a.to_string_lossy();
        a.strip_prefix("--")
            .is_some_and(|a| a == long || a.starts_with(&format!("{long}=")))
    });
    if on_command_line {
        return None;
    }
    fn env_of(cmd: &clap::Command, long: &str) -> Option<String> {
        cmd.get_arguments()
            .find(|a| a.get_long() == Some(long))
            .and_then(|a| a.get_env())
            .map(|var| var.to_string_lossy().into_owned())
            .or_else(|| cmd.get_subcommands().find_map(|sub| env_of(sub, long)))
    }
    let var = env_of(&Cli::command(), long)?;
    std::env::var_os(&var).is_some().then_some(var)
}

/// The `stockd` binary's entry point.
pub fn main() -> ExitCode {
    // Before any large allocation: see `crate::memory`.
    if let Err(err) = crate::memory::apply_transparent_huge_pages_setting() {
        let _ = writeln!(std::io::stderr(), "stockd: {err}");
        return ExitCode::from(2);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(mut err) => {
            if let Some(var) = value_from_environment(&err) {
                // clap names the flag a refused value was for, even when the value came
                // from the flag's environment variable: say which one it was.
                let tip = format!("the value comes from the environment variable {var}");
                err.insert(
                    ContextKind::Suggested,
                    ContextValue::StyledStrs(vec![tip.into()]),
                );
            }
            err.exit()
        }
    };
    let args = match cli.command {
        Some(Command::Serve(args)) => *args,
        Some(Command::Snapshot(cmd)) => {
            return match cmd.action {
                Some(SnapshotAction::Inspect { file, json }) => {
                    offline::inspect_snapshot(&file, json)
                }
                None => offline::offline_snapshot(cmd.take),
            }
        }
        Some(Command::Log {
            action:
                LogAction::Dump {
                    data_dir,
                    records,
                    json,
                },
        }) => return offline::dump_log(&data_dir, records, json),
        Some(Command::Keys { action }) => {
            let (action, args) = match action {
                KeysAction::Create { name, scopes, args } => {
                    (keys::Action::Create { name, scopes }, args)
                }
                KeysAction::List { args } => (keys::Action::List, args),
                KeysAction::Revoke { id, args } => (keys::Action::Revoke { id }, args),
            };
            return keys::keys(action, args);
        }
        Some(Command::SnapshotWorker(args)) => return offline::snapshot_worker(args),
        None => cli.serve,
    };
    // A worker that parks returns its freed memory when asked to (after a large
    // passivation sweep): mimalloc collects a thread's heap only on that thread.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(crate::memory::release_freed_memory_if_asked)
        .build();
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "stockd: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve::serve(args))
}
