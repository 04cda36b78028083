//! A cluster node's engine: started on the node's log (`ClusterLog`) and state machine
//! (`StockSm`) with the design's settings, initialized with `--peers` when new, its
//! metrics turned into the `Role` that HTTP reads, and into `GET /v1/cluster`'s `Status`
//! (docs/REPLICATION.md, step 4 of the plan).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::async_runtime::WatchReceiver;
use openraft::error::{InitializeError, RaftError};
use openraft::{Config, Instant as _, RaftMetrics, ServerState, SnapshotPolicy};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::cluster_id::ClusterId;
use super::log_store::{seq_of, ClusterLog};
use super::net::ClusterNet;
use super::settings::Settings;
use super::state_machine::{RebuildError, SnapshotSource, StockSm};
use super::types::{StockdNode, Tc};
use super::{Member, NodeId, Role, Status};
use crate::storage::log::{Log, LogHandle, OpenError};
use crate::storage::recovery;

/// The engine, over stockd's log and state machine.
pub type Raft = openraft::Raft<Tc, StockSm>;

/// The engine's settings (docs/REPLICATION.md, "HTTP surface, flags and settings"):
/// heartbeats every 50 ms, elections after 200 to 400 ms without one (the engine's lease is
/// the longer; stockd's read lease the shorter, `lease_holds`), pre-vote
/// (a node back from isolation cannot depose a healthy leader), at most 1,024 entries per
/// append, and a snapshot every `snapshot_every_records` entries (0: only when asked).
pub fn engine_config(snapshot_every_records: u64) -> Result<Arc<Config>, String> {
    let config = Config {
        cluster_name: "stockd".to_string(),
        heartbeat_interval: 50,
        // A failover's gap is mostly these: the survivors' detection takes the last
        // heartbeat + the engine's lease (the max) + an election timeout, and their
        // pre-vote round. 250/500 gave gaps of 1.0 to 1.2 s after kill -9 of the leader
        // (docs/PERFORMANCE.md, "Cluster").
        election_timeout_min: 200,
        election_timeout_max: 400,
        enable_pre_vote: Some(true),
        max_payload_entries: 1024,
        max_append_entries: Some(4096),
        snapshot_policy: match snapshot_every_records {
            0 => SnapshotPolicy::Never,
            n => SnapshotPolicy::LogsSinceLast(n),
        },
        max_in_snapshot_log_to_keep: snapshot_every_records.max(1_000),
        replication_lag_threshold: snapshot_every_records.max(1_000) * 2,
        ..Config::default()
    };
    config.validate().map(Arc::new).map_err(|e| e.to_string())
}

/// Why a cluster node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(
        "--peers cannot use this data directory: {0}. It was written by a single-node server; \
         seeding a cluster from one is not possible yet (start the node on an empty data \
         directory)"
    )]
    SingleServerLog(OpenError),
    #[error(transparent)]
    Open(OpenError),
    #[error("cannot start the Raft engine: {0}")]
    Engine(String),
    #[error("cannot read the cluster id: {0}")]
    ClusterId(std::io::Error),
    /// The change feed's store cannot be caught up.
    #[error("cannot catch up the change feed's store: {0}")]
    Feed(std::io::Error),
}

/// A cluster node's change feed as start-up leaves it: the store caught up through the
/// entries recovery folded, and what the projector starts from
/// (`feed::Projector::start_entries`).
pub struct FeedStart {
    pub feed: crate::feed::Feed,
    /// The state after entry `after`, as the projector keeps it.
    pub shadow: crate::feed::Shadow,
    /// The Raft metadata after entry `after`.
    pub raft: Option<crate::storage::entry::RaftMeta>,
    pub after: u64,
    pub followed: crate::feed::Followed,
}

/// How long a new node that would initialize its cluster (the lowest id in `--peers`)
/// first waits for a leader to reach it: a node whose data directory was replaced joins
/// its running cluster rather than starting a new one (a leader's heartbeats reach a node
/// that is back within the engine's backoff, 500 ms).
pub const JOIN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Reclaims before a read of the state machine's state, at most (`read_state`).
const READ_TRIES: usize = 3;

/// After a failed rebuild of a lent state, reclaims of a state still lent fail at once for
/// this long, doubled after each further failure up to the maximum (`ClusterNode::reclaim`).
/// The maximum is short: a leader whose state cannot be rebuilt does not serve.
const RECLAIM_RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
const RECLAIM_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// Held while a lent state is given back (one at a time): the last failure, if the last
/// rebuild failed, and how long to wait after it.
type Reclaiming = Arc<tokio::sync::Mutex<Option<(std::time::Instant, std::time::Duration)>>>;

/// `ClusterNode::reclaim`'s work.
async fn reclaim(
    raft: Raft,
    reclaiming: Reclaiming,
    stopping: tokio_util::sync::CancellationToken,
) -> Result<(), String> {
    let mut failed = reclaiming.lock().await;
    // How long the last failure still holds rebuilds back (zero: not at all).
    let wait = failed.map_or(std::time::Duration::ZERO, |(at, wait)| {
        wait.saturating_sub(at.elapsed())
    });
    let job = raft
        .with_state_machine(move |sm: &mut StockSm| {
            Box::pin(async move {
                match sm.is_lent() {
                    // Whole (never lent, or a snapshot was installed): nothing to wait for.
                    false => Ok(None),
                    true if !wait.is_zero() => Err(wait),
                    true => Ok(sm.begin_reclaim()),
                }
            })
        })
        .await
        .map_err(|err| format!("cannot read the state machine: {err}"))?
        .map_err(|wait| {
            format!("the state machine's state could not be rebuilt; trying again in {wait:?}")
        })?;
    let Some(job) = job else {
        *failed = None;
        return Ok(());
    };
    let started = std::time::Instant::now();
    let upto = job.upto;
    let rebuilt = if stopping.is_cancelled() {
        Err(RebuildError::Failed("the node is stopping".into()))
    } else {
        job.rebuild().await
    };
    let rebuild_ms = started.elapsed().as_millis() as u64;
    let finished = raft
        .with_state_machine(move |sm: &mut StockSm| {
            Box::pin(async move { sm.finish_reclaim(upto, rebuilt) })
        })
        .await
        .map_err(|err| format!("cannot read the state machine: {err}"))?;
    match finished {
        Ok(()) => {
            *failed = None;
            tracing::info!(
                rebuilt_through = upto,
                rebuild_ms,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "the state machine's state is whole again"
            );
            Ok(())
        }
        Err(err) => {
            let wait = failed.map_or(RECLAIM_RETRY_FIRST, |(_, wait)| {
                (wait * 2).min(RECLAIM_RETRY_MAX)
            });
            *failed = Some((std::time::Instant::now(), wait));
            tracing::error!(error = %err, retry_in = ?wait, "cannot rebuild the state machine's state");
            Err(err)
        }
    }
}

/// Recovers a cluster node's committed state (`recovery::recover_entries`) and, with the
/// change feed's `store`, derives the events of the entries the store lacks from the fold
/// as it runs. The store may reach past the fold (the committed mark on disk can lag what
/// the state machine applied before a crash): the projector leaves out what it holds.
pub(crate) fn recover_catching_up(
    reader: &crate::storage::log::LogReader,
    dir: &Path,
    committed: u64,
    store: Option<&mut crate::feed::store::Store>,
) -> (
    Result<recovery::Recovered, recovery::RecoveryError>,
    std::io::Result<()>,
) {
    let Some(store) = store else {
        return (recovery::recover_entries(reader, dir, committed), Ok(()));
    };
    let mut catchup = crate::feed::Catchup::new(store);
    let recovered = recovery::recover_entries_observed(reader, dir, committed, Some(&mut catchup));
    let caught_up = match &recovered {
        // Every entry in the store was committed: it is never cut (`u64::MAX`).
        Ok(recovered) => catchup.finish(recovered.snapshot.as_ref().map_or(0, |s| s.seq), u64::MAX),
        Err(_) => catchup.finish_partial(),
    };
    (recovered, caught_up)
}

/// A running cluster node's engine.
pub struct ClusterNode {
    raft: Raft,
    id: NodeId,
    log: ClusterLog,
    roles: JoinHandle<()>,
    /// The term in which this node's leadership serves (`None`: it does not); its role is
    /// `Leader { ready: true }` only while this is the engine's current term.
    serving: watch::Sender<Option<u64>>,
    /// How long after a majority last acknowledged it this node may still answer reads
    /// as the leader (`lease_holds`).
    lease: std::time::Duration,
    /// The cluster id, once this node has one (the Raft listener checks it).
    ids: Arc<ClusterId>,
    /// Initializing a new cluster, after `JOIN_WAIT` (none once done).
    initializing: Option<JoinHandle<()>>,
    /// Held while a membership change runs (`membership`): one at a time.
    changing: tokio::sync::Mutex<()>,
    /// Held while the state machine's lent state is given back (`reclaim`): one at a time.
    reclaiming: Reclaiming,
    /// Cancelled when the node stops: a reclaim under way starts no rebuild then.
    stopping: tokio_util::sync::CancellationToken,
    /// The last snapshot the state machine built (`snapshot` reports it).
    last_built: Arc<std::sync::Mutex<Option<(crate::storage::snapshot_worker::Built, bool)>>>,
    /// Asks for a snapshot every `--snapshot-every-seconds` (`None`: never by time).
    snapshot_timer: Option<JoinHandle<()>>,
}

/// Asks the engine for a snapshot every `every` if it applied anything since its newest
/// one (`--snapshot-every-seconds`; the engine's own policy counts entries). A build
/// under way when it asks is not started twice: the engine ignores the request.
async fn snapshot_timer(raft: Raft, every: std::time::Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is at once
    loop {
        ticks.tick().await;
        let behind = {
            let m = raft.metrics();
            let m = m.borrow_watched();
            m.last_applied.as_ref().map(|l| l.index) > m.snapshot.as_ref().map(|l| l.index)
        };
        if behind && raft.trigger().snapshot().await.is_err() {
            return; // the engine stopped
        }
    }
}

impl ClusterNode {
    /// Starts the engine on `log` (a cluster node's, or a new one), its snapshots in
    /// `snapshot_dir` (built by `snapshot_worker`, the `stockd` binary, or in this process
    /// if `None`); publishes its role on `role`. With the change feed's `store`, the
    /// events of the entries it lacks are derived from recovery's fold as it runs
    /// (`feed::Catchup`), and the state machine is linked to the feed. Returns the node,
    /// its log writer's thread, and the feed.
    pub async fn start(
        settings: &Settings,
        log: Log,
        snapshot_dir: &Path,
        snapshots: &crate::storage::snapshotter::SnapshotPolicy,
        snapshot_worker: Option<PathBuf>,
        role: watch::Sender<Role>,
        store: Option<crate::feed::store::Store>,
    ) -> Result<(ClusterNode, std::thread::JoinHandle<()>, Option<FeedStart>), NodeError> {
        let ids = ClusterId::load(log.dir())
            .map(Arc::new)
            .map_err(NodeError::ClusterId)?;
        let (log, writer) =
            ClusterLog::open_bounded(log, snapshot_dir).map_err(|err| match err {
                err @ OpenError::NotAnEntry { .. } => NodeError::SingleServerLog(err),
                err => NodeError::Open(err),
            })?;
        // Start-up ends with `err`: the log's writer is asked to stop (its thread is not
        // waited for: the server does not start).
        let stop_with = |log: &ClusterLog, err: NodeError| {
            let handle = log.handle().clone();
            tokio::spawn(async move {
                let _ = handle.shutdown().await;
            });
            err
        };
        let fail = |log: &ClusterLog, why: String| stop_with(log, NodeError::Engine(why));
        let config = match engine_config(snapshots.every_records) {
            Ok(config) => config,
            Err(err) => return Err(fail(&log, err)),
        };
        // The newest snapshot and the log through the committed mark, with stockd's own
        // two-thread recovery (the engine would replay the log in short reads, an entry
        // at a time through its apply loop).
        // With the feed's store, its catch-up watches the fold.
        let recovered = {
            let (reader, dir) = (log.reader().clone(), snapshot_dir.to_path_buf());
            let committed = log.committed_seq();
            tokio::task::spawn_blocking(move || {
                let mut store = store;
                let (recovered, caught_up) =
                    recover_catching_up(&reader, &dir, committed, store.as_mut());
                (recovered, caught_up, store)
            })
            .await
        };
        let (recovered, store) = match recovered {
            Ok((Ok(recovered), Ok(()), store)) => (recovered, store),
            Ok((Ok(_), Err(err), _)) => return Err(stop_with(&log, NodeError::Feed(err))),
            Ok((Err(err), _, _)) => return Err(fail(&log, format!("cannot recover: {err}"))),
            Err(err) => return Err(fail(&log, format!("cannot recover: {err}"))),
        };
        tracing::info!(
            snapshot = recovered.snapshot.as_ref().map_or(0, |s| s.seq),
            entries = recovered.records,
            applied_seq = recovered.last_seq,
            replay_ms = recovered.replay.as_millis() as u64,
            "recovered the committed state"
        );
        let source = SnapshotSource {
            reader: log.reader().clone(),
            writer: log.handle().clone(),
            program: snapshot_worker,
            last_built: Arc::default(),
        };
        let last_built = source.last_built.clone();
        let snapshot = recovered
            .snapshot
            .map(|s| s.path)
            .zip(recovered.snapshot_raft);
        // The projector's shadow is built before the state moves into the state machine.
        let feed = store.map(|store| {
            let started = std::time::Instant::now();
            let shadow = crate::feed::Shadow::of(&recovered.state);
            tracing::info!(
                products = shadow.products(),
                pending_reservations = shadow.reservations(),
                ms = started.elapsed().as_millis() as u64,
                "the change feed's shadow state is built"
            );
            (
                crate::feed::Feed::new(store),
                shadow,
                recovered.state.raft.clone(),
            )
        });
        let after = recovered.last_seq;
        let mut sm = StockSm::recovered(snapshot_dir, recovered.state, source, snapshot);
        let feed = feed.map(|(feed, shadow, raft)| FeedStart {
            followed: sm.follow_feed(&feed),
            feed,
            shadow,
            raft,
            after,
        });
        let net = ClusterNet::new(settings.key.clone(), ids.clone());
        let raft = match Raft::new(settings.node_id, config, net, log.clone(), sm).await {
            Ok(raft) => raft,
            Err(err) => return Err(fail(&log, err.to_string())),
        };
        let (serving, serving_rx) = watch::channel(None);
        let lease = std::time::Duration::from_millis(raft.config().election_timeout_min);
        let mut node = ClusterNode {
            roles: tokio::spawn(publish_roles(
                raft.clone(),
                settings.node_id,
                role,
                serving_rx,
            )),
            raft,
            id: settings.node_id,
            log,
            serving,
            lease,
            ids,
            initializing: None,
            changing: tokio::sync::Mutex::new(()),
            reclaiming: Reclaiming::default(),
            stopping: tokio_util::sync::CancellationToken::new(),
            last_built,
            snapshot_timer: None,
        };
        node.snapshot_timer = snapshots
            .every
            .map(|every| tokio::spawn(snapshot_timer(node.raft.clone(), every)));
        match node.initialize(settings).await {
            Ok(None) => {}
            Ok(Some(later)) => node.initializing = Some(tokio::spawn(later)),
            Err(err) => {
                node.shutdown().await;
                return Err(NodeError::Engine(err));
            }
        }
        Ok((node, writer, feed))
    }

    /// This node's cluster id (none yet: never initialized, and no leader reached it).
    pub fn cluster_ids(&self) -> Arc<ClusterId> {
        self.ids.clone()
    }

    /// Starts the cluster with `--peers` on a node that was never part of one; on one
    /// that was, only warns if `--peers` names other members than its stored membership
    /// (later changes go through the engine's membership changes, not flags).
    ///
    /// Only the lowest id in `--peers` initializes a new cluster, and makes its id
    /// (`ClusterId::generate`) before it does, so that a cluster has one id, not one per
    /// node: the other new nodes wait for its leader to reach them, and take the id then.
    /// A new lowest node first waits `JOIN_WAIT` for a leader (its cluster may be running
    /// already): that wait runs after start-up, so that the Raft listener can serve
    /// meanwhile; it is returned, for the caller to spawn.
    async fn initialize(
        &self,
        settings: &Settings,
    ) -> Result<Option<impl std::future::Future<Output = ()> + Send + 'static>, String> {
        let peers: BTreeMap<NodeId, StockdNode> = settings
            .peers
            .iter()
            .map(|(id, p)| {
                let node = StockdNode {
                    api: p.api.clone(),
                    raft: p.raft.clone(),
                };
                (*id, node)
            })
            .collect();
        let initialized = self
            .raft
            .is_initialized()
            .await
            .map_err(|e| e.to_string())?;
        if !initialized {
            // A node added to a running cluster (`--join`, or not the lowest id) waits for
            // its leader: the admin API's `POST /v1/admin/cluster/learners` makes the
            // leader reach it, and it takes the cluster's id from that first append.
            let lowest = peers.keys().next() == Some(&self.id);
            if !lowest || settings.join {
                tracing::info!(
                    cluster = ?self.ids.get(),
                    "a new node: waiting for the cluster's leader to reach it"
                );
                return Ok(None);
            }
            if self.ids.get().is_none() && peers.len() > 1 {
                let (raft, ids) = (self.raft.clone(), self.ids.clone());
                return Ok(Some(async move {
                    if ids.wait(JOIN_WAIT).await.is_some() {
                        return;
                    }
                    if let Err(err) = initialize_new(&raft, &ids, peers).await {
                        tracing::error!(error = %err, "cannot initialize the cluster");
                    }
                }));
            }
            initialize_new(&self.raft, &self.ids, peers.clone()).await?;
            return Ok(None);
        }
        // A node in a cluster has its id: it made it before initializing, or took it
        // before its first entry reached the engine. Only a log written before cluster
        // ids existed has none, and no node would ever talk to it.
        if self.ids.get().is_none() {
            return Err(format!(
                "this node's log belongs to a cluster but there is no cluster id in {}: it \
                 was written by a version without cluster ids; start the cluster on empty \
                 data directories",
                self.ids.path().display()
            ));
        }
        let stored = self
            .raft
            .with_raft_state(|st| st.membership_state.effective().membership().clone())
            .await
            .map_err(|e| e.to_string())?;
        let stored_nodes: BTreeMap<NodeId, StockdNode> =
            stored.nodes().map(|(id, n)| (*id, n.clone())).collect();
        let voters: Vec<NodeId> = stored.voter_ids().collect();
        if stored_nodes != peers || voters.len() != peers.len() {
            tracing::warn!(
                stored = ?stored_nodes,
                peers = ?peers,
                "--peers differs from the cluster's stored membership: --peers is ignored \
                 (membership changes go through the cluster, not flags)"
            );
        }
        Ok(None)
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The lock a membership change holds while it runs.
    pub(super) fn changing(&self) -> &tokio::sync::Mutex<()> {
        &self.changing
    }

    /// The term this node leads in now (`None`: it does not lead, or its engine stopped).
    pub fn leading_term(&self) -> Option<u64> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        (m.state == ServerState::Leader && m.running_state.is_ok()).then_some(m.current_term)
    }

    /// Waits until this node leads; returns the term (`None`: the engine stopped).
    pub async fn leading(&self) -> Option<u64> {
        let mut metrics = self.raft.metrics();
        loop {
            if let Some(term) = self.leading_term() {
                return Some(term);
            }
            if metrics.borrow_watched().running_state.is_err() || metrics.changed().await.is_err() {
                return None;
            }
        }
    }

    /// Hands this node's leadership to another voter: the one whose log it has seen reach
    /// furthest (a leader that cannot begin serving, whose cluster would otherwise answer
    /// 503 for as long as it keeps the leadership). Returns the voter it was handed to;
    /// `None` if it does not lead, or is the only voter.
    pub async fn hand_over(&self) -> Option<NodeId> {
        let to = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            if m.state != ServerState::Leader {
                return None;
            }
            let matched = |id: &NodeId| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(id).cloned().flatten())
                    .map(|log_id| log_id.index)
            };
            m.membership_config
                .membership()
                .voter_ids()
                .filter(|id| *id != self.id)
                .max_by_key(|id| (matched(id), std::cmp::Reverse(*id)))?
        };
        self.raft.trigger().transfer_leader(to).await.ok()?;
        Some(to)
    }

    /// Resolves once this node no longer leads in `term` (or its engine stopped).
    pub async fn deposed(&self, term: u64) {
        let mut metrics = self.raft.metrics();
        while self.leading_term() == Some(term) {
            if metrics.changed().await.is_err() {
                return;
            }
        }
    }

    /// Writes a blank entry and waits until it is applied here: every entry before it is
    /// then applied too. Returns its log sequence. Fails if this node does not lead, or
    /// the entry is not applied within `proposer::COMMIT_DEADLINE`.
    pub async fn write_blank(&self) -> Result<u64, String> {
        let deadline = super::proposer::COMMIT_DEADLINE;
        let written = tokio::time::timeout(deadline, self.raft.write_blank())
            .await
            .map_err(|_| format!("a blank entry was not applied within {deadline:?}"))?
            .map_err(|err| format!("a blank entry failed: {err}"))?;
        Ok(seq_of(written.log_id.index))
    }

    /// Gives the state machine's state back if it is lent to an epoch
    /// (`state_machine`'s documentation): rebuilds it from the newest snapshot at or before
    /// the last entry applied and the log through that entry, off the state machine's
    /// task, then folds in what was applied meanwhile. A node that led a million products
    /// takes seconds; the state machine goes on applying meanwhile. Runs in a task of its
    /// own, so a caller that stops waiting does not stop it halfway. After a failure, the
    /// next tries fail at once for a while (`RECLAIM_RETRY_*`): each rebuild reads the
    /// whole snapshot.
    pub async fn reclaim(&self) -> Result<(), String> {
        let (raft, reclaiming) = (self.raft.clone(), self.reclaiming.clone());
        tokio::spawn(reclaim(raft, reclaiming, self.stopping.clone()))
            .await
            .map_err(|err| format!("the rebuild stopped: {err}"))?
    }

    /// Reads the state the state machine has folded with `read`, on its task (nothing is
    /// applied meanwhile), reclaiming the state first if it is lent.
    async fn read_state<T, F>(&self, read: F) -> Result<T, String>
    where
        T: Send + 'static,
        F: FnOnce(&crate::storage::fold::State) -> T + Send + 'static,
    {
        let mut read = read;
        // An epoch may begin, and borrow the state, between the reclaim and the read.
        for _ in 0..READ_TRIES {
            self.reclaim().await?;
            let answer = self
                .raft
                .with_state_machine(move |sm: &mut StockSm| {
                    Box::pin(async move {
                        if sm.is_lent() {
                            Err(read)
                        } else {
                            Ok(read(sm.state()))
                        }
                    })
                })
                .await
                .map_err(|err| format!("cannot read the state machine: {err}"))?;
            match answer {
                Ok(answer) => return Ok(answer),
                Err(unread) => read = unread,
            }
        }
        Err("the state machine's state is lent to an epoch; try again".into())
    }

    /// A copy of the state the state machine has folded (every entry applied so far).
    pub async fn applied_state(&self) -> Result<crate::storage::fold::State, String> {
        self.read_state(|state| state.clone()).await
    }

    /// What a leader's epoch starts from (`crate::leadership`): the state the state machine
    /// has folded, lent (`StockSm::lend`: taken, not copied), its products and SKUs in
    /// order made the supervisor's table on a blocking thread (`SupervisorArgs::from_state`:
    /// nothing is moved or sorted, since the state machine keeps the order), with its Raft
    /// metadata and API keys. Lent only once the state machine has applied the epoch's
    /// blank entry, `blank_seq`: an epoch that cannot begin leaves the state whole.
    pub async fn epoch_start(
        &self,
        blank_seq: u64,
    ) -> Result<
        (
            crate::actors::supervisor::SupervisorArgs,
            crate::storage::entry::RaftMeta,
            Vec<crate::domain::key::ApiKey>,
            crate::domain::WebhookBook,
        ),
        String,
    > {
        for _ in 0..READ_TRIES {
            self.reclaim().await?;
            let started = std::time::Instant::now();
            let lent = self
                .raft
                .with_state_machine(move |sm: &mut StockSm| {
                    Box::pin(async move {
                        let applied = sm.state().raft.as_ref().and_then(|r| r.last_applied);
                        match applied.map_or(0, |pos| pos.seq) {
                            applied if applied < blank_seq => Err(format!(
                                "the state machine has applied {applied}, before the blank \
                                 entry {blank_seq}"
                            )),
                            _ => Ok(sm.lend()),
                        }
                    })
                })
                .await
                .map_err(|err| format!("cannot read the state machine: {err}"))??;
            let Some(mut state) = lent else {
                continue;
            };
            let lent_ms = started.elapsed().as_millis() as u64;
            let meta = state.raft.clone().unwrap_or_default();
            let keys = std::mem::take(&mut state.keys).into_values().collect();
            let webhooks = std::mem::take(&mut state.webhooks);
            let products = state.products.len();
            let args = tokio::task::spawn_blocking(move || {
                crate::actors::supervisor::SupervisorArgs::from_state(state)
            })
            .await
            .map_err(|err| format!("cannot build the supervisor's table: {err}"))?;
            tracing::info!(
                products,
                lent_ms,
                table_ms = started.elapsed().as_millis() as u64 - lent_ms,
                "the state machine lent its state to the epoch"
            );
            return Ok((args, meta, keys, webhooks));
        }
        Err("the state machine's state is lent to an epoch".into())
    }

    /// The digest of the state the state machine has folded, and the last entry it folded
    /// (`GET /v1/admin/cluster/digest`): equal on every node at the same position. On a
    /// leader, whose state is lent to its epoch, the state machine's is rebuilt first
    /// (`reclaim`), and stays whole until the next epoch.
    pub async fn digest(&self) -> Result<(u64, [u8; 32]), String> {
        self.read_state(|state| {
            let applied = state.raft.as_ref().and_then(|r| r.last_applied);
            (applied.map_or(0, |pos| pos.seq), state.digest())
        })
        .await
    }

    /// The API keys of the state the state machine has folded, and the last entry it
    /// folded: what a node that does not serve authenticates with.
    pub async fn applied_keys(&self) -> Result<(u64, Vec<crate::domain::key::ApiKey>), String> {
        self.read_state(|state| {
            let applied = state.raft.as_ref().and_then(|r| r.last_applied);
            let keys = state.keys.values().cloned().collect();
            (applied.map_or(0, |pos| pos.seq), keys)
        })
        .await
    }

    /// The last entry the state machine has applied (0: none), from the metrics.
    pub fn applied_seq(&self) -> u64 {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        seq(m.last_applied.as_ref().map(|l| l.index))
    }

    /// Has the engine take a snapshot of everything applied (`POST /v1/admin/snapshot` on
    /// a cluster node) and waits for it, at most `within`. A node whose newest snapshot
    /// already covers what it applied takes none (`created: false`).
    pub async fn snapshot(
        &self,
        within: std::time::Duration,
    ) -> Result<crate::storage::snapshotter::Taken, String> {
        let started = std::time::Instant::now();
        let snapshot_seq = |m: &RaftMetrics<Tc>| seq(m.snapshot.as_ref().map(|l| l.index));
        let (before, applied) = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            (
                snapshot_seq(&m),
                seq(m.last_applied.as_ref().map(|l| l.index)),
            )
        };
        let created = before < applied;
        if created {
            self.raft
                .trigger()
                .snapshot()
                .await
                .map_err(|err| format!("the engine stopped: {err}"))?;
            let mut metrics = self.raft.metrics();
            let waited = tokio::time::timeout(within, async {
                while snapshot_seq(&metrics.borrow_watched()) < applied {
                    if metrics.changed().await.is_err() {
                        return Err("the engine stopped".to_string());
                    }
                }
                Ok(())
            })
            .await;
            match waited {
                Ok(result) => result?,
                Err(_) => return Err(format!("the snapshot was not taken within {within:?}")),
            }
        }
        let current = self
            .raft
            .get_snapshot()
            .await
            .map_err(|err| format!("the engine stopped: {err}"))?
            .ok_or("the engine has no snapshot")?;
        let path = current.snapshot.path;
        let size_bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
        let sequence = current
            .meta
            .last_log_id
            .as_ref()
            .map_or(0, |id| seq_of(id.index));
        let elapsed_ms = started.elapsed().as_millis() as u64;
        // How it was built, if this node built it (not if it installed the leader's).
        let built = match &*self.last_built.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((built, worker)) if created && built.sequence == sequence => {
                Some((built.clone(), *worker))
            }
            _ => None,
        };
        let (build_ms, write_ms, worker) =
            built.as_ref().map_or((elapsed_ms, 0, false), |(b, w)| {
                (b.build_ms, b.write_ms, *w)
            });
        Ok(crate::storage::snapshotter::Taken {
            sequence,
            file: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            size_bytes,
            created,
            records_folded: if created {
                sequence.saturating_sub(before)
            } else {
                0
            },
            // The engine purges its log on its own schedule, a snapshot interval behind.
            log_records_dropped: 0,
            elapsed_ms,
            build_ms,
            write_ms,
            worker,
        })
    }

    /// A proposer for `epoch`, which this node must lead in (its proposals are refused
    /// otherwise).
    pub fn proposer(&self, epoch: crate::storage::entry::Epoch) -> super::proposer::Proposer {
        super::proposer::Proposer::start(self.raft.clone(), epoch)
    }

    /// Says that this node's leadership serves in `term` (`None`: it stopped serving).
    /// The role becomes `Leader { ready: true }` while `term` is the engine's current
    /// term and this node leads in it.
    pub fn set_serving(&self, term: Option<u64>) {
        self.serving.send_replace(term);
    }

    /// Whether this node may answer a read as the leader now: it leads, it is a voter of
    /// the membership in force (a leader that removed itself hands over at once, without
    /// waiting for its lease), and a majority acknowledged it less than a lease ago (the
    /// shortest election timeout: no other node can have been elected since), or it is
    /// the only voter (its own majority: the engine counts no acknowledgement from
    /// itself). Read from the engine's metrics, with no round trip (docs/REPLICATION.md,
    /// "Reads and expiry on the leader").
    pub fn lease_holds(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        if m.state != ServerState::Leader || m.running_state.is_err() {
            return false;
        }
        let membership = m.membership_config.membership();
        let mut voters = membership.voter_ids();
        let (first, second) = (voters.next(), voters.next());
        if !membership.voter_ids().any(|id| id == m.id) {
            return false;
        }
        if first == Some(m.id) && second.is_none() {
            return true;
        }
        m.last_quorum_acked
            .as_ref()
            .is_some_and(|at| at.elapsed() < self.lease)
    }

    /// The local log's writer.
    pub fn log(&self) -> &LogHandle {
        self.log.handle()
    }

    /// What `GET /v1/cluster` answers, from the engine's metrics.
    pub fn status(&self) -> Status {
        let m = self.raft.metrics().borrow_watched().clone();
        let mut status = status_of(&m, self.log.handle().durable_seq());
        status.cluster_id = Some(self.ids.get().map(|id| id.to_string()));
        status
    }

    /// The `api` address of node `id`, as the membership names it.
    pub fn api_of(&self, id: NodeId) -> Option<String> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        m.membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.api.clone())
    }

    /// Stops the engine (the log's writer is the caller's to stop, after this).
    pub async fn shutdown(&self) {
        if let Some(initializing) = &self.initializing {
            initializing.abort();
        }
        // A reclaim under way ends before the engine (which it needs) and the log (which
        // its rebuild reads) stop; one that has not begun its rebuild starts none.
        self.stopping.cancel();
        let _reclaims_done = self.reclaiming.lock().await;
        if let Err(err) = self.raft.shutdown().await {
            tracing::warn!(error = %err, "the Raft engine stopped with an error");
        }
        self.roles.abort();
        if let Some(timer) = &self.snapshot_timer {
            timer.abort();
        }
        tracing::info!(node = self.id, "the Raft engine stopped");
    }
}

/// Initializes a new cluster of `peers` on this node: its id made and kept first (or the
/// one it has: a node stopped after making it and before initializing), then the engine
/// initialized. An engine that a leader reached meanwhile refuses, which is no error.
async fn initialize_new(
    raft: &Raft,
    ids: &ClusterId,
    peers: BTreeMap<NodeId, StockdNode>,
) -> Result<(), String> {
    let id = ids
        .generate()
        .map_err(|e| format!("cannot make the cluster id: {e}"))?;
    match raft.initialize(peers.clone()).await {
        Ok(()) => {
            tracing::info!(
                members = peers.len(),
                cluster = %id,
                "initialized the cluster from --peers"
            );
            Ok(())
        }
        // Another node's leader reached this one first: it is in a cluster now.
        Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
        Err(err) => Err(format!("cannot initialize the cluster: {err}")),
    }
}

/// The role the engine's metrics show, with the term this node's leadership serves in
/// (`serving`): an engine that stopped has no leader.
fn role_of(m: &RaftMetrics<Tc>, serving: Option<u64>) -> Role {
    if m.running_state.is_err() {
        return Role::Leaderless;
    }
    match (m.state, m.current_leader) {
        (ServerState::Leader, _) => Role::Leader {
            ready: serving == Some(m.current_term),
        },
        (_, Some(leader)) if leader != m.id => Role::Follower { leader },
        _ => Role::Leaderless,
    }
}

/// Publishes the role each time the engine's metrics or the serving term change, until
/// the engine stops.
async fn publish_roles(
    raft: Raft,
    id: NodeId,
    role: watch::Sender<Role>,
    mut serving: watch::Receiver<Option<u64>>,
) {
    let mut metrics = raft.metrics();
    loop {
        let term = *serving.borrow_and_update();
        let now = role_of(&metrics.borrow_and_update(), term);
        let before = role.send_replace(now);
        if before != now {
            tracing::info!(
                node = id,
                role = now.as_str(),
                leader = now.leader(id),
                "role"
            );
        }
        let stopped = tokio::select! {
            changed = metrics.changed() => changed.is_err(),
            // The sender lives as long as the node: an error here is its end too.
            changed = serving.changed() => changed.is_err(),
        };
        if stopped {
            role.send_replace(Role::Leaderless);
            return;
        }
    }
}

fn seq(index: Option<u64>) -> u64 {
    index.map_or(0, seq_of)
}

/// `GET /v1/cluster` from the engine's metrics; `durable` is the local log's.
fn status_of(m: &RaftMetrics<Tc>, durable: u64) -> Status {
    let membership = m.membership_config.membership();
    let voters: Vec<NodeId> = membership.voter_ids().collect();
    let members = membership
        .nodes()
        .map(|(id, node)| Member {
            id: *id,
            api: node.api.clone(),
            raft: Some(node.raft.clone()),
            voter: voters.contains(id),
        })
        .collect();
    Status {
        cluster_id: None,
        node_id: m.id,
        role: role_of(m, None).as_str(),
        term: m.current_term,
        leader: m.current_leader,
        members,
        last_seq: seq(m.last_log_index),
        durable_seq: durable,
        committed_seq: seq(m.local_committed.as_ref().map(|l| l.index)),
        applied_seq: seq(m.last_applied.as_ref().map(|l| l.index)),
        snapshot_seq: seq(m.snapshot.as_ref().map(|l| l.index)),
        cluster_committed_seq: Some(seq(m.cluster_committed.as_ref().map(|l| l.index))),
        purged_seq: Some(seq(m.purged.as_ref().map(|l| l.index))),
        millis_since_quorum_ack: m
            .last_quorum_acked
            .as_ref()
            .map(|at| at.elapsed().as_millis().min(u64::MAX as u128) as u64),
        replication: m.replication.as_ref().map(|r| {
            r.iter()
                .map(|(id, matched)| (*id, seq(matched.as_ref().map(|l| l.index))))
                .collect()
        }),
    }
}
