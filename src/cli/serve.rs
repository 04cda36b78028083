//! `stockd serve`: logging, signals, start-up and graceful shutdown.

use std::io::Write as _;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::{OnOff, ServeArgs};
use crate::cluster::settings::{self, Settings};
use crate::config::{AdminKey, CustomerRate};
use crate::storage::snapshot::WriteHooks;
use crate::storage::snapshotter::SnapshotPolicy;
use crate::Config;

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
                        // Written directly, not logged: the exit comes before the log
                        // queue would be written (and once is enough).
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

pub(super) async fn serve(args: ServeArgs) -> ExitCode {
    let _logging = crate::logging::init(args.log_format);
    let mut stop = watch_signals();
    let worker = match args.snapshot_worker {
        OnOff::On => this_binary(),
        OnOff::Off => None,
    };
    let admin_key = match admin_key(args.admin_key_file.as_deref()) {
        Ok(key) => key,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "stockd: {err}");
            return ExitCode::FAILURE;
        }
    };
    let cluster = match cluster_settings(&args) {
        Ok(cluster) => cluster,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "stockd: {err}");
            return ExitCode::FAILURE;
        }
    };
    let config = Config {
        admin_key,
        cluster,
        ..config(args, worker)
    };
    let server = match crate::start(config).await {
        Ok(server) => server,
        Err(err) => {
            // One line, written directly (not a log line too: the same error twice reads
            // as two failures).
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

/// The server's configuration from its flags (and `STOCKD_*` variables).
fn config(args: ServeArgs, snapshot_worker: Option<PathBuf>) -> Config {
    Config {
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
        customer_rate: customer_rate(args.customer_rate, args.customer_burst),
        retention: Duration::from_secs(args.retention_seconds),
        snapshot_worker,
        snapshot_hooks: WriteHooks {
            pause_before_rename: args.test_snapshot_pause_ms.map(Duration::from_millis),
        },
        log_fail_from_seq: args.test_log_fail_from_seq,
        events: (args.events == OnOff::On).then_some(crate::feed::Retention {
            age: Duration::from_secs(args.events_retention_seconds),
            max_bytes: args.events_max_bytes,
        }),
        webhooks: crate::webhooks::Schedule {
            timeout: Duration::from_millis(args.webhook_timeout_ms),
            retry_initial: Duration::from_millis(args.webhook_retry_initial_ms),
            retry_max: Duration::from_millis(args.webhook_retry_max_ms),
            give_up: Duration::from_secs(args.webhook_give_up_seconds),
        },
        webhook_ca_file: args.webhook_ca_file,
        ..Config::default()
    }
}

/// The environment variable holding the bootstrap admin key (without `--admin-key-file`).
pub const ADMIN_KEY_VARIABLE: &str = "STOCKD_ADMIN_KEY";

/// The bootstrap admin key: from `--admin-key-file` (which wins), else from
/// `STOCKD_ADMIN_KEY`; one trailing newline trimmed; refused if empty, short or not a
/// bearer token (`AdminKey::new`), naming where it came from.
fn admin_key(file: Option<&std::path::Path>) -> Result<Option<AdminKey>, String> {
    let Some((value, source)) = secret("admin", "--admin-key-file", ADMIN_KEY_VARIABLE, file)?
    else {
        return Ok(None);
    };
    AdminKey::new(&value)
        .map(Some)
        .map_err(|err| format!("{err} ({source})"))
}

/// The environment variable holding the cluster key (without `--cluster-key-file`).
pub const CLUSTER_KEY_VARIABLE: &str = "STOCKD_CLUSTER_KEY";

/// The cluster key: from `--cluster-key-file` (which wins), else from
/// `STOCKD_CLUSTER_KEY`; one trailing newline trimmed; with where it came from.
fn cluster_key(file: Option<&std::path::Path>) -> Result<Option<(String, String)>, String> {
    secret("cluster", "--cluster-key-file", CLUSTER_KEY_VARIABLE, file)
}

/// A secret (the `what` key) read from `file` (named by `flag`), which wins, else from
/// the environment variable `variable`; one trailing newline (or CRLF) trimmed. Returns
/// it with where it came from, for error messages; `None` when neither is given.
fn secret(
    what: &str,
    flag: &str,
    variable: &str,
    file: Option<&std::path::Path>,
) -> Result<Option<(String, String)>, String> {
    let (value, source) = match file {
        Some(path) => {
            let value = std::fs::read_to_string(path).map_err(|e| {
                format!(
                    "cannot read the {what} key file {} ({flag}): {e}",
                    path.display()
                )
            })?;
            (value, format!("in {} ({flag})", path.display()))
        }
        None => match std::env::var(variable) {
            Ok(value) => (value, format!("in the environment variable {variable}")),
            Err(std::env::VarError::NotPresent) => return Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(format!(
                    "the {what} key in the environment variable {variable} is not UTF-8"
                ))
            }
        },
    };
    let value = value.strip_suffix('\n').unwrap_or(&value);
    let value = value.strip_suffix('\r').unwrap_or(value);
    Ok(Some((value.to_string(), source)))
}

/// A cluster node's settings from `--node-id`, `--peers`, `--raft-listen` and the cluster
/// key, checked before anything is opened (`None`: a single server).
fn cluster_settings(args: &ServeArgs) -> Result<Option<Settings>, String> {
    let key = match args.peers {
        // Read only for a cluster: a single server never touches the key file.
        Some(_) => cluster_key(args.cluster_key_file.as_deref())?,
        None => None,
    };
    if args.peers.is_none() && args.cluster_key_file.is_some() {
        return Err("--cluster-key-file needs --peers (it is a cluster flag)".to_string());
    }
    settings::settings(settings::Flags {
        node_id: args.node_id,
        peers: args.peers.clone(),
        raft_listen: args.raft_listen,
        key,
        durability_async: args.durability == crate::config::Durability::Async,
        join: args.join,
    })
}

/// The rate limit of `--customer-rate` and `--customer-burst` (clap refuses 0 for both,
/// and a burst without a rate).
fn customer_rate(rate: Option<u32>, burst: Option<u32>) -> Option<CustomerRate> {
    let rate = NonZeroU32::new(rate?)?;
    Some(CustomerRate::new(rate, burst.and_then(NonZeroU32::new)))
}

/// This binary, to start as the snapshot worker. /proc/self/exe runs the very binary this
/// server runs, even after an upgrade replaced the file (a worker of another version could
/// disagree on formats).
fn this_binary() -> Option<PathBuf> {
    let path = std::path::Path::new("/proc/self/exe")
        .exists()
        .then(|| PathBuf::from("/proc/self/exe"))
        .map_or_else(std::env::current_exe, Ok);
    match path {
        Ok(path) => Some(path),
        Err(err) => {
            tracing::warn!(error = %err, "cannot find this binary; snapshots are built in the server");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::Cli;
    use super::*;

    /// The binary without flags is `Config::default()`: its defaults come from the same
    /// constants, so changing one cannot leave the other behind.
    #[test]
    fn the_flags_default_to_the_library_defaults() {
        let cli = Cli::try_parse_from(["stockd"]).unwrap();
        let from_flags = config(cli.serve, None);
        assert_eq!(
            format!("{from_flags:?}"),
            format!("{:?}", Config::default())
        );
    }

    fn cluster_of(flags: &[&str]) -> Result<Option<Settings>, String> {
        let cli = Cli::try_parse_from(flags.iter().copied()).unwrap();
        cluster_settings(&cli.serve)
    }

    /// A plain `stockd serve` is a single server; the cluster flags are checked as
    /// `settings::settings` checks them (its own tests cover every refusal), with the
    /// cluster key read from its file.
    #[test]
    fn the_cluster_flags_make_a_cluster_node_or_are_refused() {
        assert_eq!(cluster_of(&["stockd"]), Ok(None));
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("cluster.key");
        std::fs::write(&key, "0123456789abcdef0123\n").unwrap();
        let key = key.to_str().unwrap();
        let peers = "1=127.0.0.1:8001@127.0.0.1:9001,2=127.0.0.1:8002@127.0.0.1:9002";
        let node = cluster_of(&[
            "stockd",
            "--node-id",
            "2",
            "--peers",
            peers,
            "--cluster-key-file",
            key,
        ])
        .unwrap()
        .unwrap();
        assert_eq!(node.node_id, 2);
        assert!(node.key.matches(b"0123456789abcdef0123"));
        let err = cluster_of(&[
            "stockd",
            "--node-id",
            "2",
            "--peers",
            peers,
            "--cluster-key-file",
            key,
            "--durability",
            "async",
        ])
        .unwrap_err();
        assert!(err.contains("--durability async"), "{err}");
        let err = cluster_of(&["stockd", "--cluster-key-file", key]).unwrap_err();
        assert!(err.contains("--cluster-key-file needs --peers"), "{err}");
        let missing = dir.path().join("missing.key");
        let err = cluster_of(&[
            "stockd",
            "--node-id",
            "1",
            "--peers",
            peers,
            "--cluster-key-file",
            missing.to_str().unwrap(),
        ])
        .unwrap_err();
        assert!(err.contains("cannot read the cluster key file"), "{err}");
    }
}
