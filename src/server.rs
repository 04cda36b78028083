//! Start-up and shutdown: open the log, recover, start the actors, serve HTTP.
//!
//! `start` is what the binary and the tests call. `Server::shutdown` is graceful: stop
//! accepting, let requests in flight finish, stop the actors, then flush and close the log
//! (last, so every change made while draining is durable).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorRef};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::actors::supervisor::{Supervisor, SupervisorArgs, SupervisorMsg};
use crate::cluster::node::ClusterNode;
use crate::cluster::settings::Settings;
use crate::cluster::{Journal, Role};
use crate::config::{Config, Durability};
use crate::feed::{Catchup, Feed, Projector, Shadow};
use crate::service::Service;
use crate::storage::log::OpenError as LogOpenError;
use crate::storage::log::{Log, LogHandle, OpenError};
use crate::storage::recovery::{self, Recovered, RecoveryError};
use crate::storage::snapshotter::{Priority, Snapshotter, SnapshotterArgs};

/// How long shutdown waits for requests in flight before closing connections anyway.
const SHUTDOWN_DRAIN_TIMEOUT_MS: u64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create directory {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    /// `--data-dir` or `--snapshot-dir` names something that exists and is not a directory.
    #[error("cannot use {path} as the {what}: it exists and is not a directory")]
    NotADirectory { what: &'static str, path: String },
    /// The snapshot directory cannot be written: found at start-up rather than by the
    /// first snapshot.
    #[error("cannot write to the snapshot directory {path}: {source}")]
    SnapshotDirNotWritable {
        path: String,
        source: std::io::Error,
    },
    /// The log's lock is held: almost always another server on the same data directory.
    #[error("{0}: is another server running on this data directory?")]
    Locked(OpenError),
    #[error(transparent)]
    Open(OpenError),
    /// A damaged log record, without `--truncate-damaged-log`.
    #[error(
        "{0}; refusing to start (--truncate-damaged-log would start after removing it and \
         every later record, losing the changes they hold)"
    )]
    Damaged(RecoveryError),
    #[error(transparent)]
    Recovery(RecoveryError),
    #[error("cannot start the actors: {0}")]
    Actors(String),
    #[error("cannot expire overdue reservations at start-up: {0}")]
    Expiry(crate::error::Error),
    /// No admin key and no key in the log, on an address other than loopback.
    #[error(
        "refusing to serve on {addr} without authentication: configure an admin key with \
         --admin-key-file PATH or the environment variable STOCKD_ADMIN_KEY (only a loopback \
         address may run without one)"
    )]
    Unprotected { addr: SocketAddr },
    /// The change feed's store cannot be opened or caught up.
    #[error("cannot open the change feed's store in {path}: {source}")]
    Feed {
        path: String,
        source: std::io::Error,
    },
    /// `--webhook-ca-file` names a file that cannot be read or holds no usable
    /// certificate.
    #[error("cannot use {path} as the webhooks' CA file (--webhook-ca-file): {detail}")]
    WebhookCa { path: String, detail: String },
    /// The webhooks' store cannot be opened.
    #[error("cannot open the webhooks' store in {path}: {source}")]
    Webhooks {
        path: String,
        source: std::io::Error,
    },
    /// A cluster node's engine or log could not start (`--peers`).
    #[error(transparent)]
    Cluster(crate::cluster::node::NodeError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl From<OpenError> for StartError {
    fn from(err: OpenError) -> StartError {
        match err {
            LogOpenError::Locked { .. } => StartError::Locked(err),
            err => StartError::Open(err),
        }
    }
}

impl From<RecoveryError> for StartError {
    fn from(err: RecoveryError) -> StartError {
        match err {
            RecoveryError::Open(err @ LogOpenError::Locked { .. }) => StartError::Locked(err),
            err if err.damaged_seq().is_some() => StartError::Damaged(err),
            err => StartError::Recovery(err),
        }
    }
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    service: Service,
    supervisor: ActorRef<SupervisorMsg>,
    log: LogHandle,
    snapshotter: Snapshotter,
    snapshot_on_shutdown: bool,
    snapshot_thread: std::thread::JoinHandle<()>,
    stop_http: Option<oneshot::Sender<()>>,
    http: JoinHandle<()>,
    writer: std::thread::JoinHandle<()>,
    /// The change feed and its projector (`None`: `--events off`).
    feed: Option<(Feed, Projector)>,
    /// This node's role as HTTP sees it (`Role::Single` for a single server, whose role
    /// never changes; a cluster node's engine publishes its own).
    role: tokio::sync::watch::Receiver<Role>,
    /// A cluster node's engine and Raft listener (`None`: a single server).
    cluster: Option<ClusterParts>,
    /// Webhook deliveries (`None` with the feed off).
    webhooks: Option<crate::webhooks::Webhooks>,
    /// The service HTTP answers with now (a cluster node's changes with its leadership).
    serving: std::sync::Arc<arc_swap::ArcSwap<Service>>,
}

/// What a cluster node runs besides a single server's parts.
struct ClusterParts {
    node: std::sync::Arc<ClusterNode>,
    /// Its epochs of serving while it leads (`None` once stopped).
    leadership: Option<crate::leadership::Leadership>,
    stop_raft: oneshot::Sender<()>,
    raft_http: JoinHandle<()>,
}

/// Creates the directory `path` (the `what`) if it is missing; refuses a path that is
/// something else than a directory.
fn create_dir(path: &std::path::Path, what: &'static str) -> Result<(), StartError> {
    if path.exists() && !path.is_dir() {
        return Err(StartError::NotADirectory {
            what,
            path: path.display().to_string(),
        });
    }
    std::fs::create_dir_all(path).map_err(|source| StartError::Dir {
        path: path.display().to_string(),
        source,
    })
}

/// Creates and removes a file in the snapshot directory, so that one the server cannot
/// write stops start-up instead of failing the first snapshot, maybe hours later.
fn check_writable(dir: &std::path::Path) -> Result<(), StartError> {
    let probe = dir.join(format!(".write-check-{}", std::process::id()));
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&probe);
    match created {
        Ok(file) => {
            drop(file);
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(source) => Err(StartError::SnapshotDirNotWritable {
            path: dir.display().to_string(),
            source,
        }),
    }
}

/// The address to serve on, bound (but not yet listening) before anything else: an
/// address in use stops start-up at once, before recovery runs, while connections are
/// still refused until the server listens, once recovery is done.
fn bind(addr: SocketAddr) -> Result<TcpSocket, StartError> {
    let err = |source| StartError::Listen { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    // As `TcpListener::bind` does: a restart need not wait for the old connections'
    // TIME_WAIT. Linux still refuses an address another socket listens on.
    #[cfg(unix)]
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    Ok(socket)
}

/// Connections waiting to be accepted, at most (what `TcpListener::bind` uses).
const LISTEN_BACKLOG: u32 = 1024;

/// Starts listening on a socket `bind` made for `addr`; returns the listener and the
/// address it got (the port, when `addr` asked for port 0).
fn listen(socket: TcpSocket, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let err = |source| StartError::Listen { addr, source };
    let listener = socket.listen(LISTEN_BACKLOG).map_err(err)?;
    let local = listener.local_addr().map_err(err)?;
    Ok((listener, local))
}

/// Recovers from `config.data_dir` and starts serving on `config.listen`.
pub async fn start(config: Config) -> Result<Server, StartError> {
    let started = Instant::now();
    if config.retention < Duration::from_secs(24 * 3600) {
        tracing::warn!(
            retention_seconds = config.retention.as_secs(),
            "retention is under the API's 24 hours: idempotency keys and ended reservations \
             are forgotten sooner than clients may expect"
        );
    }
    if let Some(settings) = config.cluster.clone() {
        return start_cluster(config, settings, started).await;
    }
    // A server that would run open on a public address is refused before anything is
    // bound or created, when it is sure to be (no admin key and no log that could hold
    // keys); once recovered, with no key in the log either.
    let unprotected = config.admin_key.is_none() && !config.listen.ip().is_loopback();
    if unprotected && !config.data_dir.join("log").exists() {
        return Err(StartError::Unprotected {
            addr: config.listen,
        });
    }
    let socket = bind(config.listen)?;
    let webhook_roots = load_webhook_roots(&config)?;
    create_dir(&config.data_dir, "data directory")?;
    create_dir(&config.snapshot_dir, "snapshot directory")?;
    check_writable(&config.snapshot_dir)?;
    let flush_interval = match config.durability {
        Durability::Sync => Duration::from_micros(crate::limits::SYNC_FLUSH_INTERVAL_US),
        Durability::Async => Duration::from_millis(crate::limits::ASYNC_FLUSH_INTERVAL_MS),
    };
    let log = Log::open(&config.data_dir.join("log"))?
        .with_segment_records(config.log_segment_records)
        .with_flush_interval(flush_interval);
    let events_dir = config.data_dir.join("events");
    let feed_err = |source| StartError::Feed {
        path: events_dir.display().to_string(),
        source,
    };
    let mut store = match config.events {
        Some(retention) => Some(crate::feed::open(&events_dir, retention).map_err(feed_err)?),
        None => None,
    };
    let recovered = recover(&log, &config, store.as_mut())?;
    let feed = store.map(Feed::new);
    // The keyring gets a copy of the keys: the state keeps them, since the projector's
    // copy of it folds later key records (the supervisor ignores them).
    let keys: Vec<_> = recovered.state.keys.values().cloned().collect();
    if unprotected && keys.is_empty() {
        return Err(StartError::Unprotected {
            addr: config.listen,
        });
    }
    let next_seq = log.last_seq()?.max(recovered.last_seq) + 1;
    let reader = log.reader();
    let projector_reader = log.reader();
    let (log_handle, writer) = log.start_writer(next_seq)?;
    if let Some(seq) = config.log_fail_from_seq {
        log_handle.inject_write_failure_from(seq);
    }
    let (snapshotter, snapshot_thread) = Snapshotter::start(SnapshotterArgs {
        reader,
        log: log_handle.clone(),
        dir: config.snapshot_dir.clone(),
        policy: config.snapshots.clone(),
        clock: config.clock.clone(),
        hooks: config.snapshot_hooks,
        newest: recovered.snapshot.as_ref().map_or(0, |s| s.seq),
        worker: config.snapshot_worker.clone(),
        ceiling: feed.as_ref().map(Feed::synced),
    });
    // The projector follows the log from where recovery ended, on a shadow of its state.
    let feed = feed.map(|feed| {
        let started = std::time::Instant::now();
        let shadow = Shadow::of(&recovered.state);
        tracing::info!(
            products = shadow.products(),
            pending_reservations = shadow.reservations(),
            ms = started.elapsed().as_millis() as u64,
            "the change feed's shadow state is built"
        );
        let projector = Projector::start(
            feed.clone(),
            projector_reader,
            log_handle.clone(),
            shadow,
            recovered.last_seq,
        );
        (feed, projector)
    });
    // What the supervisor, the actors, the service and the keyring append through: on a
    // single node, the local log.
    let journal = Journal::Local(log_handle.clone());
    let supervisor = Supervisor {
        log: journal.clone(),
        clock: config.clock.clone(),
        snapshotter: snapshotter.clone(),
        passivate_after: config.passivate_after,
        retention_ms: config.retention.as_millis().min(i64::MAX as u128) as i64,
    };
    let args = SupervisorArgs::from_state(recovered.state);
    let (supervisor, _join) = Actor::spawn(None, supervisor, args)
        .await
        .map_err(|e| StartError::Actors(e.to_string()))?;
    let service = Service {
        supervisor: supervisor.clone(),
        log: journal.clone(),
        durability: config.durability,
        default_ttl_seconds: config.default_ttl_seconds,
        snapshotter: snapshotter.clone(),
        feed: feed.as_ref().map(|(feed, _)| feed.clone()),
        // A single server's webhooks are the App's (started once the feed is).
        webhooks: None,
        serves: true,
    };
    // Reservations whose deadline passed while we were down: expired (and logged) first.
    service.expire_due_now().await.map_err(StartError::Expiry)?;
    // Recovery's transient memory (the decoded snapshot's tables, the log batches, the
    // state's conversion into the supervisor's routes) goes back to the OS now, before
    // serving, rather than by the allocator's delayed purge on a request thread.
    crate::memory::release_freed_memory();
    let (listener, addr) = listen(socket, config.listen)?;
    // Webhooks deliver the feed's events: none without it.
    let webhooks = match &feed {
        Some((feed, _)) => {
            let dir = config.data_dir.join("webhooks");
            let started = crate::webhooks::Webhooks::start(
                &dir,
                feed.clone(),
                log_handle.clone(),
                config.webhooks,
                &webhook_roots,
            );
            Some(started.map_err(|source| StartError::Webhooks {
                path: dir.display().to_string(),
                source,
            })?)
        }
        None => None,
    };
    let (stop_http, stopped) = oneshot::channel::<()>();
    let keyring = std::sync::Arc::new(crate::keyring::Keyring::new(
        keys,
        config.admin_key.as_ref(),
        journal,
        config.clock.clone(),
    ));
    announce_authentication(&keyring, addr);
    // A single node's role never changes.
    let (_, role_rx) = tokio::sync::watch::channel(Role::Single);
    let app = crate::http::App::new(
        service.clone(),
        keyring,
        config.customer_rate,
        role_rx.clone(),
        addr,
        webhooks.clone(),
    );
    let serving = app.service.clone();
    let routes = crate::http::routes(app);
    let http = tokio::spawn(
        warp::serve(routes)
            .incoming(listener)
            .graceful(async move {
                let _ = stopped.await;
            })
            .run(),
    );
    tracing::info!(%addr, durability = %config.durability.as_str(), elapsed_ms = started.elapsed().as_millis() as u64, "serving");
    Ok(Server {
        addr,
        service,
        supervisor,
        log: log_handle,
        snapshotter,
        snapshot_on_shutdown: config.snapshots.on_shutdown,
        snapshot_thread,
        stop_http: Some(stop_http),
        http,
        writer,
        feed,
        role: role_rx,
        cluster: None,
        webhooks,
        serving,
    })
}

/// Starts a cluster node (`--peers`): its log opened as the engine's (`ClusterLog`), the
/// engine started and, when new, initialized with `--peers`, the Raft listener, the
/// change feed's projector following the applied entries (`--events on`), and the public
/// API. While the node leads, its leadership serves in epochs (`leadership`), each with
/// its own actors and webhooks; otherwise the standby service answers a follower's 307
/// or a 503: its actors run on an empty state and its journal refuses every record.
/// Snapshots are the engine's.
async fn start_cluster(
    config: Config,
    settings: Settings,
    started: Instant,
) -> Result<Server, StartError> {
    // A cluster node has no API keys of its own yet: without an admin key, only on a
    // loopback address.
    if config.admin_key.is_none() && !config.listen.ip().is_loopback() {
        return Err(StartError::Unprotected {
            addr: config.listen,
        });
    }
    let socket = bind(config.listen)?;
    let raft_socket = bind(settings.raft_listen)?;
    let webhook_roots = load_webhook_roots(&config)?;
    create_dir(&config.data_dir, "data directory")?;
    create_dir(&config.snapshot_dir, "snapshot directory")?;
    check_writable(&config.snapshot_dir)?;
    let log = Log::open(&config.data_dir.join("log"))?
        .with_segment_records(config.log_segment_records)
        .with_flush_interval(Duration::from_micros(crate::limits::SYNC_FLUSH_INTERVAL_US));
    let reader = log.reader();
    let projector_reader = log.reader();
    let events_dir = config.data_dir.join("events");
    let feed_err = |source| StartError::Feed {
        path: events_dir.display().to_string(),
        source,
    };
    let store = match config.events {
        Some(retention) => Some(crate::feed::open(&events_dir, retention).map_err(feed_err)?),
        None => None,
    };
    let (role_tx, role_rx) = tokio::sync::watch::channel(Role::Leaderless);
    let (node, writer, feed) = ClusterNode::start(
        &settings,
        log,
        &config.snapshot_dir,
        &config.snapshots,
        config.snapshot_worker.clone(),
        role_tx,
        store,
    )
    .await
    .map_err(|err| match err {
        crate::cluster::node::NodeError::Feed(source) => feed_err(source),
        err => StartError::Cluster(err),
    })?;
    let node = std::sync::Arc::new(node);
    let log_handle = node.log().clone();
    // The projector follows the entries the state machine applies, from where recovery
    // ended, on a shadow of its state.
    let feed = feed.map(|start| {
        let projector = Projector::start_entries(
            start.feed.clone(),
            projector_reader,
            log_handle.clone(),
            start.shadow,
            start.raft,
            start.after,
            start.followed,
        );
        (start.feed, projector)
    });
    // The Raft listener first: the other nodes' votes and appends reach this one as soon
    // as possible.
    let (raft_listener, raft_addr) = listen(raft_socket, settings.raft_listen)?;
    let (stop_raft, raft_stopped) = oneshot::channel::<()>();
    let raft_routes = crate::cluster::transport::routes(
        node.raft().clone(),
        settings.key.clone(),
        node.cluster_ids(),
        config.data_dir.join("raft-incoming"),
    );
    let raft_http = tokio::spawn(
        warp::serve(raft_routes)
            .incoming(raft_listener)
            .graceful(async move {
                let _ = raft_stopped.await;
            })
            .run(),
    );
    // Snapshots are the engine's: this snapshotter takes none on its own (the service
    // and the supervisor hold one; step 6 builds the engine's on it).
    let (snapshotter, snapshot_thread) = Snapshotter::start(SnapshotterArgs {
        reader,
        log: log_handle.clone(),
        dir: config.snapshot_dir.clone(),
        policy: crate::storage::snapshotter::SnapshotPolicy {
            every_records: 0,
            every: None,
            keep: config.snapshots.keep,
            on_shutdown: false,
        },
        clock: config.clock.clone(),
        hooks: config.snapshot_hooks,
        newest: 0,
        worker: None,
        ceiling: None,
    });
    let journal = Journal::Cluster(log_handle.clone());
    let supervisor = Supervisor {
        log: journal.clone(),
        clock: config.clock.clone(),
        snapshotter: snapshotter.clone(),
        passivate_after: config.passivate_after,
        retention_ms: config.retention.as_millis().min(i64::MAX as u128) as i64,
    };
    let args = SupervisorArgs::from_state(crate::storage::fold::State::default());
    let (supervisor, _join) = Actor::spawn(None, supervisor, args)
        .await
        .map_err(|e| StartError::Actors(e.to_string()))?;
    let service = Service {
        supervisor: supervisor.clone(),
        log: journal.clone(),
        durability: Durability::Sync,
        default_ttl_seconds: config.default_ttl_seconds,
        snapshotter: snapshotter.clone(),
        feed: feed.as_ref().map(|(feed, _)| feed.clone()),
        // Each epoch of a leader has its own.
        webhooks: None,
        serves: false,
    };
    let (listener, addr) = listen(socket, config.listen)?;
    // Followers send clients to the leader's address as --peers names it.
    let named = &settings.peers[&settings.node_id].api;
    if named
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|named| named != addr)
    {
        tracing::warn!(
            %addr,
            peers = %named,
            "this node serves on another address than --peers names for it: followers \
             redirect clients to the address in --peers"
        );
    }
    let keyring = std::sync::Arc::new(crate::keyring::Keyring::new(
        Vec::new(),
        config.admin_key.as_ref(),
        journal,
        config.clock.clone(),
    ));
    announce_authentication(&keyring, addr);
    let mut app = crate::http::App::new(
        service.clone(),
        keyring.clone(),
        config.customer_rate,
        role_rx.clone(),
        addr,
        None,
    );
    app.cluster = Some(node.clone());
    let serving = app.service.clone();
    // While this node leads, it serves in epochs, each with a service of its own; the
    // standby answers between them.
    let leadership = crate::leadership::Leadership::start(crate::leadership::LeadershipArgs {
        node: node.clone(),
        slot: app.service.clone(),
        standby: std::sync::Arc::new(service.clone()),
        keyring,
        clock: config.clock.clone(),
        log: log_handle.clone(),
        snapshotter: snapshotter.clone(),
        passivate_after: config.passivate_after,
        retention_ms: config.retention.as_millis().min(i64::MAX as u128) as i64,
        default_ttl_seconds: config.default_ttl_seconds,
        feed: feed.as_ref().map(|(feed, _)| feed.clone()),
        webhook_schedule: config.webhooks,
        webhook_roots,
    });
    let (stop_http, stopped) = oneshot::channel::<()>();
    let http = tokio::spawn(
        warp::serve(crate::http::routes(app))
            .incoming(listener)
            .graceful(async move {
                let _ = stopped.await;
            })
            .run(),
    );
    tracing::info!(
        %addr,
        raft = %raft_addr,
        node = settings.node_id,
        peers = settings.peers.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "serving as a cluster node"
    );
    Ok(Server {
        addr,
        service,
        supervisor,
        log: log_handle,
        snapshotter,
        snapshot_on_shutdown: false,
        snapshot_thread,
        stop_http: Some(stop_http),
        http,
        writer,
        feed,
        role: role_rx,
        cluster: Some(ClusterParts {
            node,
            leadership: Some(leadership),
            stop_raft,
            raft_http,
        }),
        webhooks: None,
        serving,
    })
}

/// The roots of `--webhook-ca-file`. Loaded before anything is created or recovered: a
/// wrong file is the operator's to fix, and a server that started without it would fail
/// every https delivery to that CA.
fn load_webhook_roots(config: &Config) -> Result<crate::webhooks::Roots, StartError> {
    match &config.webhook_ca_file {
        Some(path) => crate::webhooks::Roots::load(path).map_err(|detail| StartError::WebhookCa {
            path: path.display().to_string(),
            detail,
        }),
        None => Ok(crate::webhooks::Roots::default()),
    }
}

/// Says at start-up how requests are authenticated.
fn announce_authentication(keyring: &crate::keyring::Keyring, addr: SocketAddr) {
    let stored = keyring.list();
    let admins = stored
        .iter()
        .filter(|k| k.scopes.contains(&crate::keyring::Scope::Admin))
        .count();
    if !keyring.enforced() {
        tracing::warn!(
            %addr,
            "no API key: serving WITHOUT authentication (allowed on a loopback address only); \
             configure an admin key with --admin-key-file PATH or STOCKD_ADMIN_KEY"
        );
    } else if !keyring.has_bootstrap() && admins == 0 {
        tracing::warn!(
            keys = stored.len(),
            "no admin key: no key can be created or revoked over HTTP (use `stockd keys` with \
             the server stopped, or configure an admin key)"
        );
    } else {
        tracing::info!(
            keys = stored.len(),
            bootstrap = keyring.has_bootstrap(),
            "API keys required"
        );
    }
}

/// Renames every snapshot at or after `seq` to `discarded-<name>` (kept for the
/// operator, ignored by recovery).
fn set_aside_snapshots_from(dir: &std::path::Path, seq: u64) -> Result<(), StartError> {
    let io = |source| StartError::Dir {
        path: dir.display().to_string(),
        source,
    };
    for (at, path) in crate::storage::snapshot::list(dir).map_err(io)? {
        if at >= seq {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let aside = dir.join(format!("discarded-{name}"));
            std::fs::rename(&path, &aside).map_err(io)?;
            tracing::warn!(file = %aside.display(), "set aside a snapshot past the truncated log");
        }
    }
    Ok(())
}

/// Recovers the state: the newest verifying snapshot plus the log after it. A damaged
/// log record stops start-up, unless the operator asked to truncate the log there. With
/// the change feed's `store`, the events of the records after its end are derived from
/// recovery's fold as it runs (`feed::Catchup`).
fn recover(
    log: &Log,
    config: &Config,
    mut store: Option<&mut crate::feed::store::Store>,
) -> Result<Recovered, StartError> {
    let feed_err = |source| StartError::Feed {
        path: config.data_dir.join("events").display().to_string(),
        source,
    };
    let started = Instant::now();
    crate::storage::snapshot::remove_temp_files(&config.snapshot_dir).map_err(|source| {
        StartError::Dir {
            path: config.snapshot_dir.display().to_string(),
            source,
        }
    })?;
    // With the feed's store, its catch-up watches the fold (what it appended before an
    // error is whole: a second recovery continues after it).
    let recover_catching_up = |store: Option<&mut crate::feed::store::Store>| {
        let mut catchup = store.map(Catchup::new);
        let observer = catchup
            .as_mut()
            .map(|c| c as &mut dyn recovery::FoldObserver);
        let result =
            recovery::recover_observed(&log.reader(), &config.snapshot_dir, u64::MAX, observer);
        match catchup.map(Catchup::finish_partial) {
            Some(Err(err)) => Err(feed_err(err)),
            _ => Ok(result),
        }
    };
    let recovered = match recover_catching_up(store.as_deref_mut())? {
        Err(err) if config.truncate_damaged_log && err.damaged_seq().is_some() => {
            let seq = err.damaged_seq().expect("checked above");
            let removed = log.truncate_from(seq)?;
            // Snapshots at or past the cut describe a history the log no longer has (their
            // sequence numbers will be reused): set aside, never loaded again.
            set_aside_snapshots_from(&config.snapshot_dir, seq)?;
            tracing::warn!(
                seq,
                removed,
                error = %err,
                "log truncated at a damaged record, as asked (--truncate-damaged-log)"
            );
            recover_catching_up(store.as_deref_mut())??
        }
        result => result?,
    };
    if let Some(store) = store {
        let snapshot_seq = recovered.snapshot.as_ref().map_or(0, |s| s.seq);
        Catchup::new(store)
            .finish(snapshot_seq, recovered.last_seq)
            .map_err(feed_err)?;
    }
    // Each snapshot skipped was logged by recovery, once.
    let what = match (&recovered.snapshot, recovered.records) {
        (None, 0) => "no snapshot and an empty log: starting empty",
        (None, _) => "no snapshot: recovered the state by replaying the log",
        (Some(_), 0) => "recovered the state from the snapshot (no log records after it)",
        (Some(_), _) => "recovered the state from the snapshot and the log records after it",
    };
    tracing::info!(
        snapshot = recovered.snapshot.as_ref().map(|s| s.seq),
        records = recovered.records,
        last_seq = recovered.last_seq,
        products = recovered.state.products.len(),
        reservations = recovered.state.reservations.len(),
        replay_ms = recovered.replay.as_millis() as u64,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "{what}"
    );
    Ok(recovered)
}

impl Server {
    /// A snapshot of the final state, so the next start replays no log.
    async fn final_snapshot(&self) {
        let seq = match self.log.barrier().durable().await {
            Ok(seq) => seq,
            Err(err) => return tracing::error!(error = %err, "no snapshot at shutdown"),
        };
        if seq <= self.snapshotter.newest_seq() {
            return;
        }
        match self.snapshotter.take(seq, Priority::Urgent).await {
            Ok(taken) => tracing::info!(
                sequence = taken.sequence,
                size_bytes = taken.size_bytes,
                elapsed_ms = taken.elapsed_ms,
                "snapshot taken at shutdown"
            ),
            // The log still holds everything: the next start replays it.
            Err(err) => tracing::error!(error = %err, "cannot take a snapshot at shutdown"),
        }
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The service requests are answered by now: a single node's, or a cluster node's
    /// epoch's while it leads and serves (its standby otherwise).
    pub fn current_service(&self) -> std::sync::Arc<Service> {
        self.serving.load_full()
    }

    /// The service the server started with: a single node's only one, a cluster node's
    /// standby (`current_service` is the one serving).
    pub fn service(&self) -> &Service {
        &self.service
    }

    /// This node's role in its cluster, as HTTP sees it (`Role::Single` without one).
    pub fn role(&self) -> Role {
        *self.role.borrow()
    }

    /// A cluster node's engine (`None`: a single server).
    pub fn cluster(&self) -> Option<&ClusterNode> {
        self.cluster.as_ref().map(|c| &*c.node)
    }

    /// Graceful shutdown: drain HTTP, stop the actors, flush the log.
    pub async fn shutdown(mut self) -> Result<(), crate::storage::log::LogError> {
        // Live readers' streams never end by themselves: they end first, so that the
        // drain below does not wait for them.
        if let Some((feed, _)) = &self.feed {
            feed.close_readers();
        }
        if let Some(stop) = self.stop_http.take() {
            let _ = stop.send(());
        }
        let drain = Duration::from_millis(SHUTDOWN_DRAIN_TIMEOUT_MS);
        if tokio::time::timeout(drain, &mut self.http).await.is_err() {
            tracing::warn!("requests still in flight after the drain timeout; closing");
            self.http.abort();
        }
        // Deliveries in flight are abandoned (sent again after the restart); positions
        // are fsynced.
        if let Some(webhooks) = self.webhooks.take() {
            webhooks.shutdown().await;
        }
        // A cluster leader's epoch ends (its actors stop) before the engine does, so the
        // records it proposed get their answers.
        let mut cluster = self.cluster.take();
        if let Some(cluster) = cluster.as_mut() {
            if let Some(leadership) = cluster.leadership.take() {
                leadership.stop().await;
            }
        }
        let stop_timeout = Some(Duration::from_secs(5));
        let _ = crate::actors::ask(&self.supervisor, SupervisorMsg::PrepareShutdown).await;
        self.supervisor
            .stop_children_and_wait(Some("shutdown".into()), stop_timeout)
            .await;
        let _ = self
            .supervisor
            .stop_and_wait(Some("shutdown".into()), stop_timeout)
            .await;
        if self.snapshot_on_shutdown && self.log.is_healthy() {
            self.final_snapshot().await;
        }
        // A cluster node's engine stops before its log: it answers no peer once stopped.
        if let Some(cluster) = cluster {
            let _ = cluster.stop_raft.send(());
            let mut raft_http = cluster.raft_http;
            if tokio::time::timeout(drain, &mut raft_http).await.is_err() {
                raft_http.abort();
            }
            cluster.node.shutdown().await;
        }
        // The projector reads the log too: it projects what is durable (on a cluster node,
        // what the stopped engine applied), syncs and stops.
        if let Some((_, projector)) = self.feed.take() {
            let _ = tokio::task::spawn_blocking(move || projector.stop()).await;
        }
        // The snapshot thread reads the log: it stops first, so the log closes with the writer.
        self.snapshotter.stop();
        let snapshot_thread = self.snapshot_thread;
        let _ = tokio::task::spawn_blocking(move || snapshot_thread.join()).await;
        let result = self.log.shutdown().await;
        let writer = self.writer;
        let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        match &result {
            Ok(seq) => tracing::info!(last_seq = seq, "log flushed; stopped"),
            Err(err) => tracing::error!(error = %err, "stopped with an unwritable log"),
        }
        result.map(drop)
    }
}
