//! Three nodes in one process: each a `Raft` over its own `ClusterLog` and `StockSm` in a
//! temporary directory, the network a table of the nodes' `Raft` handles that each call
//! goes through directly (no ports). The table can cut a node off (every call to or from
//! it fails as unreachable), or hold back only the entries it sends (its heartbeats still
//! go through, so its followers keep it as leader and it keeps its lease while its new
//! entries stay on its own log, uncommitted).
//!
//! Every wait is bounded (`WAIT`, generous for a loaded machine) and waits for a state,
//! never for a time; nothing asserts on how long anything took.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use openraft::async_runtime::WatchReceiver;
use openraft::error::{
    ClientWriteError, ForwardReason, NetworkError, RPCError, RaftError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::storage::RaftLogStorage;
use openraft::{AnyError, Config, RaftLogReader, ServerState};

use crate::cluster::log_store::ClusterLog;
use crate::cluster::node::recover_catching_up;
use crate::cluster::proposer::Proposer;
use crate::cluster::state_machine::{
    RebuildError, Snapshot, SnapshotFile, SnapshotSource, StockSm,
};
use crate::cluster::types::{Proposal, RaftVote, StockdNode, Tc};
use crate::domain::SaleRules;
use crate::feed::{Feed, Position, Projector, Shadow};
use crate::storage::entry::{Epoch, NodeId, Outcome};
use crate::storage::log::{Log, LogError, LogHandle, OpenError};
use crate::storage::record::{self, Record};

type Raft = openraft::Raft<Tc, StockSm>;

/// How long any one wait may take before the test fails.
const WAIT: Duration = Duration::from_secs(60);

/// The in-memory network: every node's `Raft`, and what is cut.
#[derive(Clone, Default)]
struct Router {
    nodes: Arc<Mutex<BTreeMap<NodeId, Raft>>>,
    /// Nodes cut off from every other.
    cut: Arc<Mutex<BTreeSet<NodeId>>>,
    /// Nodes whose entries are held back (their empty appends, heartbeats, pass).
    held: Arc<Mutex<BTreeSet<NodeId>>>,
}

impl Router {
    /// The target's `Raft`, if the call from `from` to it goes through.
    fn route(&self, from: NodeId, to: NodeId) -> Result<Raft, Unreachable<Tc>> {
        let cut = self.cut.lock().unwrap();
        if cut.contains(&from) || cut.contains(&to) {
            return Err(Unreachable::new(&AnyError::error(format!(
                "{from} -> {to} is cut"
            ))));
        }
        drop(cut);
        self.nodes
            .lock()
            .unwrap()
            .get(&to)
            .cloned()
            .ok_or_else(|| Unreachable::new(&AnyError::error(format!("node {to} is down"))))
    }

    fn set(set: &Mutex<BTreeSet<NodeId>>, id: NodeId, on: bool) {
        let mut set = set.lock().unwrap();
        if on {
            set.insert(id);
        } else {
            set.remove(&id);
        }
    }
}

struct Net {
    from: NodeId,
    router: Router,
}

struct Conn {
    from: NodeId,
    to: NodeId,
    router: Router,
}

impl RaftNetworkFactory<Tc> for Net {
    type Network = Conn;

    async fn new_client(&mut self, target: NodeId, _node: &StockdNode) -> Conn {
        Conn {
            from: self.from,
            to: target,
            router: self.router.clone(),
        }
    }
}

fn remote<E: std::error::Error + 'static>(err: E) -> RPCError<Tc> {
    RPCError::Network(NetworkError::new(&err))
}

impl RaftNetworkV2<Tc> for Conn {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<Tc>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<Tc>, RPCError<Tc>> {
        let raft = self.router.route(self.from, self.to)?;
        if !rpc.entries.is_empty() && self.router.held.lock().unwrap().contains(&self.from) {
            return Err(Unreachable::new(&AnyError::error("entries held back")).into());
        }
        raft.append_entries(rpc).await.map_err(remote)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<Tc>,
        _option: RPCOption,
    ) -> Result<VoteResponse<Tc>, RPCError<Tc>> {
        let raft = self.router.route(self.from, self.to)?;
        raft.vote(rpc).await.map_err(remote)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<Tc>,
        _option: RPCOption,
    ) -> Result<VoteResponse<Tc>, RPCError<Tc>> {
        let raft = self.router.route(self.from, self.to)?;
        raft.pre_vote(rpc).await.map_err(remote)
    }

    async fn full_snapshot(
        &mut self,
        vote: RaftVote,
        snapshot: Snapshot,
        _cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<Tc>, StreamingError<Tc>> {
        let raft = self.router.route(self.from, self.to)?;
        raft.install_full_snapshot(vote, snapshot)
            .await
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))
    }
}

/// One node: its `Raft`, its log's writer, and a reader of its log; and its change feed
/// with its projector, if it has one (`start_fed`).
struct Node {
    raft: Raft,
    writer: LogHandle,
    log: ClusterLog,
    feed: Option<(Feed, Projector)>,
}

fn config() -> Arc<Config> {
    let config = Config {
        heartbeat_interval: 100,
        election_timeout_min: 1_000,
        election_timeout_max: 2_000,
        enable_pre_vote: Some(true),
        ..Config::default()
    };
    Arc::new(config.validate().expect("a valid engine config"))
}

fn member(id: NodeId) -> StockdNode {
    StockdNode {
        api: format!("node-{id}:api"),
        raft: format!("node-{id}:raft"),
    }
}

/// Opens the log in `dir`, waiting while a stopped node's handles let go of its lock.
async fn open_log(dir: &Path) -> ClusterLog {
    open_log_with(dir, false).await
}

/// The log in `log_dir`, once a stopped node's last holders (the engine's tasks, a
/// snapshot build under way) have let go of it.
async fn open_let_go(log_dir: &Path) -> Log {
    tokio::time::timeout(WAIT, async {
        loop {
            match Log::open(log_dir) {
                Err(OpenError::Locked { .. }) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                opened => return opened.expect("opening the node's log"),
            }
        }
    })
    .await
    .expect("the node's log is let go of")
}

/// `open_log`; `bounded`: its purges bounded by the snapshots kept in `dir/snapshots`,
/// as a cluster node's are.
async fn open_log_with(dir: &Path, bounded: bool) -> ClusterLog {
    let log = open_let_go(&dir.join("log")).await;
    let opened = if bounded {
        ClusterLog::open_bounded(log, &dir.join("snapshots"))
    } else {
        ClusterLog::open(log)
    };
    let (log, _writer) = opened.expect("opening the cluster log");
    log
}

/// Starts node `id` on its log, its snapshots in `dir`.
async fn start(router: &Router, id: NodeId, dir: &Path, log: ClusterLog) -> Node {
    start_with(router, id, dir, log, config()).await
}

/// `start` with the engine's settings `config`.
async fn start_with(
    router: &Router,
    id: NodeId,
    dir: &Path,
    log: ClusterLog,
    config: Arc<Config>,
) -> Node {
    start_node(router, id, dir, log, config, false).await
}

/// `start_with`, with a change feed whose store is in `dir/events`.
async fn start_fed(
    router: &Router,
    id: NodeId,
    dir: &Path,
    log: ClusterLog,
    config: Arc<Config>,
) -> Node {
    start_node(router, id, dir, log, config, true).await
}

async fn start_node(
    router: &Router,
    id: NodeId,
    dir: &Path,
    log: ClusterLog,
    config: Arc<Config>,
    events: bool,
) -> Node {
    // As a node starts (`ClusterNode::start`): the state recovered from its snapshot and
    // its log (the feed's store caught up by the same fold), snapshots built from the log
    // (in this process: a test has no worker).
    let snapshots = dir.join("snapshots");
    let store = events.then(|| {
        crate::feed::open(&dir.join("events"), crate::feed::retention_default())
            .expect("opening the feed's store")
    });
    let (recovered, store) = {
        let (reader, dir, committed) =
            (log.reader().clone(), snapshots.clone(), log.committed_seq());
        tokio::task::spawn_blocking(move || {
            let mut store = store;
            let (recovered, caught_up) =
                recover_catching_up(&reader, &dir, committed, store.as_mut());
            caught_up.expect("catching up the feed's store");
            (recovered.expect("recovering the node's state"), store)
        })
        .await
        .unwrap()
    };
    let fed = store.map(|store| {
        (
            Feed::new(store),
            Shadow::of(&recovered.state),
            recovered.state.raft.clone(),
        )
    });
    let after = recovered.last_seq;
    let source = SnapshotSource {
        reader: log.reader().clone(),
        writer: log.handle().clone(),
        program: None,
        last_built: Default::default(),
    };
    let snapshot = recovered
        .snapshot
        .map(|s| s.path)
        .zip(recovered.snapshot_raft);
    let mut sm = StockSm::recovered(&snapshots, recovered.state, source, snapshot);
    let fed = fed.map(|(feed, shadow, raft)| (sm.follow_feed(&feed), feed, shadow, raft));
    let net = Net {
        from: id,
        router: router.clone(),
    };
    let feed = fed.map(|(followed, feed, shadow, raft)| {
        let projector = Projector::start_entries(
            feed.clone(),
            log.reader().clone(),
            log.handle().clone(),
            shadow,
            raft,
            after,
            followed,
        );
        (feed, projector)
    });
    let node = Node {
        writer: log.handle().clone(),
        raft: Raft::new(id, config, net, log.clone(), sm)
            .await
            .expect("starting the engine"),
        log,
        feed,
    };
    router.nodes.lock().unwrap().insert(id, node.raft.clone());
    node
}

/// Stops a node: the engine, then its log (whose directory is then free).
async fn stop(router: &Router, id: NodeId, node: Node) {
    router.nodes.lock().unwrap().remove(&id);
    node.raft.shutdown().await.expect("stopping the engine");
    let Node {
        raft,
        writer,
        log,
        feed,
    } = node;
    // The projector reads the log: it stops before the log does.
    if let Some((_, projector)) = feed {
        tokio::task::spawn_blocking(move || projector.stop())
            .await
            .unwrap();
    }
    drop((raft, log));
    writer.shutdown().await.expect("stopping the log");
}

/// Stops every node of `nodes`.
async fn stop_all(router: &Router, nodes: BTreeMap<NodeId, Node>) {
    for (id, node) in nodes {
        stop(router, id, node).await;
    }
}

/// A record that folds, encoded: product `sku` created, or replenished by `n`.
fn record(sku: &str, n: u64) -> Bytes {
    Bytes::from(record::encode(&plain_record(sku, n)))
}

/// Product `sku` created (10 on hand), or replenished by `n`.
fn plain_record(sku: &str, n: u64) -> Record {
    if n == 0 {
        Record::ProductCreated {
            sku: sku.into(),
            name: format!("product {sku}"),
            price: None,
            on_hand: 10,
            rules: SaleRules::default(),
            low_stock_threshold: None,
            at: 1_000,
            by: None,
        }
    } else {
        Record::Replenished {
            sku: sku.into(),
            quantity: n,
            at: 1_000 + n as i64,
            by: None,
        }
    }
}

/// Three nodes started in `root` (`node-1` to `node-3`), a cluster initialized on node 1;
/// returns them, the leader and its term once elected.
async fn three_started(router: &Router, root: &Path) -> (BTreeMap<NodeId, Node>, NodeId, u64) {
    let mut nodes = BTreeMap::new();
    for id in 1..=3 {
        let dir = root.join(format!("node-{id}"));
        nodes.insert(id, start(router, id, &dir, open_log(&dir).await).await);
    }
    let members: BTreeMap<NodeId, StockdNode> = (1..=3).map(|id| (id, member(id))).collect();
    nodes[&1]
        .raft
        .initialize(members)
        .await
        .expect("initializing");
    let (leader, term) = leader_of(&nodes, &[1, 2, 3]).await;
    (nodes, leader, term)
}

/// Three nodes on logs whose purges are bounded by their snapshots, as a cluster node's
/// are, in `root` (`node-1` to `node-3`), with the engine's settings `config` and change
/// feeds if `fed`; a cluster initialized on node 1. Returns the nodes, their directories,
/// and the leader and its term once elected.
async fn three_bounded(
    router: &Router,
    root: &Path,
    config: Arc<Config>,
    fed: bool,
) -> (
    BTreeMap<NodeId, Node>,
    BTreeMap<NodeId, PathBuf>,
    NodeId,
    u64,
) {
    let dirs: BTreeMap<NodeId, PathBuf> = (1..=3)
        .map(|id| (id, root.join(format!("node-{id}"))))
        .collect();
    let mut nodes = BTreeMap::new();
    for (id, dir) in &dirs {
        let log = open_log_with(dir, true).await;
        let node = start_node(router, *id, dir, log, config.clone(), fed).await;
        nodes.insert(*id, node);
    }
    let members: BTreeMap<NodeId, StockdNode> = (1..=3).map(|id| (id, member(id))).collect();
    nodes[&1]
        .raft
        .initialize(members)
        .await
        .expect("initializing the cluster");
    let (leader, term) = leader_of(&nodes, &[1, 2, 3]).await;
    (nodes, dirs, leader, term)
}

async fn leader_of(nodes: &BTreeMap<NodeId, Node>, among: &[NodeId]) -> (NodeId, u64) {
    let first = &nodes[&among[0]].raft;
    let m = first
        .wait(Some(WAIT))
        .metrics(
            |m| m.current_leader.is_some_and(|l| among.contains(&l)),
            "a leader among the nodes",
        )
        .await
        .expect("a leader is elected");
    let leader = m.current_leader.expect("checked");
    let m = nodes[&leader]
        .raft
        .wait(Some(WAIT))
        .state(ServerState::Leader, "the leader knows it leads")
        .await
        .expect("the leader leads");
    (leader, m.current_term)
}

/// Writes one proposal on the leader `raft` and waits for it to be applied there;
/// returns its index. A leader refuses a proposal until a quorum has acknowledged it
/// recently (its lease: a new leader has none until its first entry is acknowledged):
/// such a refusal appends nothing, so the same proposal is written again once the lease
/// holds.
async fn write(raft: &Raft, proposal: Proposal) -> u64 {
    tokio::time::timeout(WAIT, async {
        loop {
            match raft.client_write(proposal.clone()).await {
                Ok(written) => {
                    assert_eq!(written.data, Outcome::Applied, "{proposal} is applied");
                    return written.log_id.index;
                }
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward)))
                    if forward.reason == ForwardReason::LeaseExpired =>
                {
                    raft.wait(Some(WAIT))
                        .leader_with_quorum_acked(None, "the leader's lease")
                        .await
                        .expect("the leader's lease holds again");
                }
                Err(err) => panic!("{proposal} is refused: {err}"),
            }
        }
    })
    .await
    .expect("the proposal is applied")
}

/// Proposes `records` in `epoch` on `raft`, numbered from `first`; returns the last
/// one's index.
async fn propose(raft: &Raft, epoch: Epoch, first: u64, records: Vec<Bytes>) -> u64 {
    let mut last = 0;
    for (n, record) in (first..).zip(records) {
        last = write(raft, Proposal { epoch, n, record }).await;
    }
    last
}

/// Waits until every node in `ids` has applied through `index`; returns each node's
/// state digest and last applied index.
async fn digests(nodes: &BTreeMap<NodeId, Node>, ids: &[NodeId], index: u64) -> Vec<[u8; 32]> {
    let mut out = Vec::new();
    for id in ids {
        let raft = &nodes[id].raft;
        raft.wait(Some(WAIT))
            .applied_index_at_least(Some(index), format!("node {id} applies {index}"))
            .await
            .expect("every node applies");
        let (digest, applied) = raft
            .with_state_machine(|sm: &mut StockSm| {
                Box::pin(async move {
                    let applied = sm.state().raft.as_ref().and_then(|r| r.last_applied);
                    (sm.state().digest(), applied.map(|p| p.seq))
                })
            })
            .await
            .expect("reading the state machine");
        assert_eq!(applied, Some(index + 1), "node {id} applied past {index}");
        out.push(digest);
    }
    out
}

/// What node `raft`'s state has on hand of `sku` (`None`: no such product).
async fn on_hand(raft: &Raft, sku: &'static str) -> Option<u64> {
    raft.with_state_machine(move |sm: &mut StockSm| {
        Box::pin(async move { sm.state().products.get(sku).map(|p| p.on_hand) })
    })
    .await
    .expect("reading the state machine")
}

/// The SKUs node `raft`'s state keeps in order (`State::keep_sku_order`), after checking
/// that they are its products' (`None`: it keeps none).
async fn kept_skus(raft: &Raft) -> Option<Vec<String>> {
    raft.with_state_machine(move |sm: &mut StockSm| {
        Box::pin(async move {
            let state = sm.state();
            let kept: Vec<String> = state
                .skus
                .0
                .as_ref()?
                .after(None)
                .map(String::from)
                .collect();
            let mut skus: Vec<String> = state.products.keys().cloned().collect();
            skus.sort();
            assert_eq!(kept, skus, "the SKUs kept in order are the products'");
            Some(kept)
        })
    })
    .await
    .expect("reading the state machine")
}

/// The node's log from disk (as a restarted node reads it), as (sequence, term) pairs.
fn stored_terms(dir: &Path) -> Vec<(u64, u64)> {
    let log = Log::open(&dir.join("log")).expect("opening a stopped node's log");
    log.reader()
        .entries_after(0)
        .map(|e| e.map(|e| (e.pos.seq, e.pos.term)))
        .collect::<Result<_, _>>()
        .expect("the log reads back")
}

/// Election, replication of raw proposals and the same digest at the same index on all
/// three; a restart from the data directory that recovers its vote, log and committed
/// mark and catches up; and a forced leader change whose old leader's uncommitted tail is
/// cut from its log (`truncate_after`), after which it agrees with the new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_replicate_recover_and_cut_an_uncommitted_tail() {
    let root = tempfile::tempdir().unwrap();
    let dirs: BTreeMap<NodeId, PathBuf> = (1..=3)
        .map(|id| (id, root.path().join(format!("node-{id}"))))
        .collect();
    let router = Router::default();
    let mut nodes = BTreeMap::new();
    for (id, dir) in &dirs {
        nodes.insert(*id, start(&router, *id, dir, open_log(dir).await).await);
    }
    let members: BTreeMap<NodeId, StockdNode> = (1..=3).map(|id| (id, member(id))).collect();
    nodes[&1]
        .raft
        .initialize(members)
        .await
        .expect("initializing the cluster");

    // Election and replication.
    let all = [1, 2, 3];
    let (leader, term) = leader_of(&nodes, &all).await;
    let epoch = Epoch { term, k: 0 };
    let records = vec![
        record("A", 0),
        record("A", 1),
        record("B", 0),
        record("A", 2),
    ];
    let last = propose(&nodes[&leader].raft, epoch, 1, records).await;
    let found = digests(&nodes, &all, last).await;
    assert!(
        found.windows(2).all(|w| w[0] == w[1]),
        "same digest at {last}"
    );
    for id in all {
        assert_eq!(on_hand(&nodes[&id].raft, "A").await, Some(13), "node {id}");
        assert_eq!(on_hand(&nodes[&id].raft, "B").await, Some(10), "node {id}");
    }

    // A follower restarted from its data directory.
    let follower = *all.iter().find(|id| **id != leader).unwrap();
    let last_before_restart = last;
    let before = nodes[&follower]
        .raft
        .wait(Some(WAIT))
        .metrics(
            |m| m.local_committed.is_some_and(|c| c.index >= last),
            "the follower knows what is committed",
        )
        .await
        .unwrap();
    let stopped = nodes.remove(&follower).unwrap();
    stop(&router, follower, stopped).await;
    let last = propose(
        &nodes[&leader].raft,
        epoch,
        5,
        vec![record("B", 3), record("C", 0)],
    )
    .await;
    let n = 7;
    let mut log = open_log(&dirs[&follower]).await;
    assert_eq!(
        log.read_vote().await.unwrap(),
        Some(before.vote),
        "the vote"
    );
    let state = log.get_log_state().await.unwrap();
    assert_eq!(
        state.last_log_id.map(|id| id.index),
        before.last_log_index,
        "the log"
    );
    let stored = log.try_get_log_entries(..).await.unwrap();
    assert_eq!(Some(stored.len() as u64 - 1), before.last_log_index);
    let committed = log.read_committed().await.unwrap();
    assert!(
        committed.is_some_and(|c| c.index >= last_before_restart),
        "the committed mark: {committed:?}"
    );
    nodes.insert(
        follower,
        start(&router, follower, &dirs[&follower], log).await,
    );
    let found = digests(&nodes, &all, last).await;
    assert!(
        found.windows(2).all(|w| w[0] == w[1]),
        "caught up at {last}"
    );
    assert_eq!(on_hand(&nodes[&follower].raft, "B").await, Some(13));
    assert_eq!(on_hand(&nodes[&follower].raft, "C").await, Some(10));

    // A forced leader change. The leader's entries are held back, so a proposal stays on
    // its own log, uncommitted; then it is cut off, and the other two elect a new leader.
    let old = leader;
    Router::set(&router.held, old, true);
    let stranded = {
        let raft = nodes[&old].raft.clone();
        let proposal = Proposal {
            epoch,
            n,
            record: record("Z", 0),
        };
        tokio::spawn(async move { raft.client_write(proposal).await })
    };
    let stranded_index = last + 1;
    nodes[&old]
        .raft
        .wait(Some(WAIT))
        .log_index_at_least(Some(stranded_index), "the old leader appends its proposal")
        .await
        .expect("the proposal is on the old leader's log");
    Router::set(&router.cut, old, true);
    Router::set(&router.held, old, false);
    let rest: Vec<NodeId> = all.iter().copied().filter(|id| *id != old).collect();
    let (new_leader, new_term) = leader_of(&nodes, &rest).await;
    assert!(new_term > term);
    let new_epoch = Epoch {
        term: new_term,
        k: 0,
    };
    let last = propose(
        &nodes[&new_leader].raft,
        new_epoch,
        1,
        vec![record("N", 0), record("N", 1)],
    )
    .await;
    Router::set(&router.cut, old, false);
    let found = digests(&nodes, &all, last).await;
    assert!(found.windows(2).all(|w| w[0] == w[1]), "agreed at {last}");
    for id in all {
        assert_eq!(on_hand(&nodes[&id].raft, "Z").await, None, "node {id}");
        assert_eq!(on_hand(&nodes[&id].raft, "N").await, Some(11), "node {id}");
    }
    nodes[&old]
        .raft
        .wait(Some(WAIT))
        .current_leader(new_leader, "the old leader follows the new one")
        .await
        .unwrap();
    let answer = tokio::time::timeout(WAIT, stranded)
        .await
        .expect("the stranded proposal is answered")
        .expect("its task ran");
    assert!(
        matches!(
            answer,
            Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(_)))
        ),
        "the stranded proposal was discarded: {answer:?}"
    );

    // On disk, every node holds the same log: the old leader's proposal was cut.
    let ids: Vec<NodeId> = nodes.keys().copied().collect();
    for id in ids {
        let node = nodes.remove(&id).unwrap();
        stop(&router, id, node).await;
    }
    let logs: Vec<Vec<(u64, u64)>> = dirs.values().map(|dir| stored_terms(dir)).collect();
    assert!(
        logs.windows(2).all(|w| w[0] == w[1]),
        "the logs agree: {logs:?}"
    );
    // Where the stranded entry was, the new leader's first entry (its blank).
    let cut_seq = stranded_index + 1;
    assert!(
        logs[0]
            .iter()
            .any(|&(seq, t)| seq == cut_seq && t == new_term),
        "the stranded entry's place holds the new term: {:?}",
        logs[0]
    );
}

/// A leader's `Proposer`: many records in flight at once, their tickets resolved in append
/// order with consecutive sequences once applied, the same state on every node, and a
/// barrier with the last of them. A proposer whose node does not lead in its term fails
/// its first record and is poisoned: everything after fails at once. So is one whose
/// chain has a gap (a second proposer of an epoch the first has moved on in): its entry
/// is committed but skipped on every node, and nothing of it is folded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposer_commits_in_order_and_an_epoch_ends_at_its_first_failure() {
    let root = tempfile::tempdir().unwrap();
    let router = Router::default();
    let (mut nodes, leader, term) = three_started(&router, root.path()).await;
    let all = [1, 2, 3];
    // A new leader refuses proposals until a quorum has acknowledged it (its lease): the
    // node's own start of an epoch waits for that (docs/REPLICATION.md).
    nodes[&leader]
        .raft
        .wait(Some(WAIT))
        .leader_with_quorum_acked(None, "the leader's lease")
        .await
        .expect("the lease");

    let proposer = Proposer::start(nodes[&leader].raft.clone(), Epoch { term, k: 0 });
    let mut tickets = vec![proposer.append(&plain_record("A", 0))];
    tickets.extend((1..=40).map(|n| proposer.append(&plain_record("A", n))));
    let barrier = proposer.barrier();
    let mut seqs = Vec::new();
    for ticket in tickets {
        let seq = tokio::time::timeout(WAIT, ticket.durable())
            .await
            .expect("the ticket resolves")
            .expect("the record is committed");
        seqs.push(seq);
    }
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "consecutive, in append order: {seqs:?}"
    );
    let last = *seqs.last().unwrap();
    assert_eq!(barrier.durable().await.unwrap(), last, "the barrier");
    assert!(proposer.is_healthy());
    let found = digests(&nodes, &all, last - 1).await;
    assert!(
        found.windows(2).all(|w| w[0] == w[1]),
        "same digest at {last}"
    );
    for id in all {
        assert_eq!(
            on_hand(&nodes[&id].raft, "A").await,
            Some(10 + (1..=40).sum::<u64>()),
            "node {id}"
        );
    }

    // A proposer on a node that does not lead.
    let follower = *all.iter().find(|id| **id != leader).unwrap();
    let stale = Proposer::start(nodes[&follower].raft.clone(), Epoch { term, k: 1 });
    let refused = stale.append(&plain_record("A", 100)).durable().await;
    assert!(
        matches!(refused, Err(LogError::NotCommitted(_))),
        "{refused:?}"
    );
    let reason = tokio::time::timeout(WAIT, stale.poisoned()).await.unwrap();
    assert!(reason.contains("no longer leads"), "{reason}");
    assert!(!stale.is_healthy());
    assert!(stale
        .append(&plain_record("A", 101))
        .durable()
        .await
        .is_err());
    assert!(stale.barrier().durable().await.is_err());

    // A second proposer of the leader's epoch starts again at n = 1: a gap in the chain.
    let gap = Proposer::start(nodes[&leader].raft.clone(), Epoch { term, k: 0 });
    let skipped = gap.append(&plain_record("A", 1_000)).durable().await;
    assert!(
        matches!(skipped, Err(LogError::NotCommitted(_))),
        "{skipped:?}"
    );
    let reason = tokio::time::timeout(WAIT, gap.poisoned()).await.unwrap();
    assert!(reason.contains("skipped"), "{reason}");
    assert!(gap
        .append(&plain_record("A", 1_001))
        .durable()
        .await
        .is_err());
    // Its entry is in the log (committed, one past the first proposer's last) and was
    // skipped everywhere: the same digest, and nothing of it on hand.
    let found = digests(&nodes, &all, last).await;
    assert!(
        found.windows(2).all(|w| w[0] == w[1]),
        "same digest at {}",
        last + 1
    );
    for id in all {
        assert_eq!(
            on_hand(&nodes[&id].raft, "A").await,
            Some(10 + (1..=40).sum::<u64>()),
            "node {id}: the skipped proposal folded nothing"
        );
    }

    // The first proposer's epoch goes on: its chain has no gap.
    let more = proposer
        .append(&plain_record("A", 5))
        .durable()
        .await
        .unwrap();
    assert_eq!(more, last + 2);

    // A leader whose entries do not reach its followers (its heartbeats do, so it keeps
    // leading and its lease): the proposal is appended and waits for a quorum that never
    // comes. Past the deadline its outcome is unknown (another leader might still commit
    // it), the epoch ends, and what follows is refused at once.
    Router::set(&router.held, leader, true);
    let stuck = proposer.append(&plain_record("A", 6));
    let barrier = proposer.barrier();
    let waited = tokio::time::timeout(WAIT, stuck.durable())
        .await
        .expect("it resolves");
    assert!(
        matches!(&waited, Err(LogError::OutcomeUnknown(r)) if r.contains("not applied within")),
        "{waited:?}"
    );
    assert!(matches!(
        barrier.durable().await,
        Err(LogError::OutcomeUnknown(_))
    ));
    assert!(!proposer.is_healthy());
    let after = proposer.append(&plain_record("A", 7)).durable().await;
    assert!(matches!(after, Err(LogError::NotCommitted(_))), "{after:?}");
    Router::set(&router.held, leader, false);

    stop_all(&router, std::mem::take(&mut nodes)).await;
}

/// Settings for catching up by snapshot: snapshots only when asked, and the engine asks
/// to purge the log right up to each (none kept behind it).
fn purging_config() -> Arc<Config> {
    let config = Config {
        max_in_snapshot_log_to_keep: 0,
        snapshot_policy: openraft::SnapshotPolicy::Never,
        ..(*config()).clone()
    };
    Arc::new(config.validate().expect("a valid engine config"))
}

/// Asks `raft` for a snapshot and waits until it has one at `index`.
async fn snapshot_at(raft: &Raft, index: u64) {
    raft.trigger()
        .snapshot()
        .await
        .expect("a snapshot is asked for");
    has_snapshot_at(raft, index).await;
}

/// Waits until `raft` has a snapshot at `index`, built or installed; its metrics then.
async fn has_snapshot_at(raft: &Raft, index: u64) -> openraft::RaftMetrics<Tc> {
    raft.wait(Some(WAIT))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index == index),
            format!("a snapshot at {index}"),
        )
        .await
        .expect("a snapshot in time")
}

/// Waits until `raft`'s engine has purged its log through `index`, its newest snapshot.
async fn purged_through(raft: &Raft, index: u64) {
    raft.wait(Some(WAIT))
        .metrics(
            |m| m.purged.is_some_and(|p| p.index == index),
            "the engine purges up to its newest snapshot",
        )
        .await
        .expect("purged in time");
}

/// A follower kept down while the leader snapshots twice and its engine purges the log
/// past the follower's last entry: the leader's log is purged only through the older of
/// its two kept snapshots (never past what a kept snapshot covers), the follower, started
/// again on its directory, is sent the newest snapshot and installs it (its own log, far
/// behind, is purged past its end and its writer numbers on after the snapshot), takes
/// the entries after it, and has the leader's digest at the same applied position; and
/// its log on disk starts after the snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_a_purge_catches_up_by_snapshot() {
    let root = tempfile::tempdir().unwrap();
    let router = Router::default();
    let (mut nodes, dirs, leader, term) =
        three_bounded(&router, root.path(), purging_config(), false).await;
    let all = [1, 2, 3];
    let epoch = Epoch { term, k: 0 };
    let last = propose(
        &nodes[&leader].raft,
        epoch,
        1,
        vec![record("A", 0), record("A", 1)],
    )
    .await;
    digests(&nodes, &all, last).await;

    // The follower goes down; the leader goes on, and snapshots twice.
    let follower = *all.iter().find(|id| **id != leader).unwrap();
    let behind = nodes[&follower]
        .raft
        .metrics()
        .borrow_watched()
        .last_log_index
        .expect("the follower has entries");
    let stopped = nodes.remove(&follower).unwrap();
    stop(&router, follower, stopped).await;
    let raft = nodes[&leader].raft.clone();
    let first = propose(&raft, epoch, 3, (2..=6).map(|n| record("A", n)).collect()).await;
    snapshot_at(&raft, first).await;
    let second = propose(&raft, epoch, 8, (7..=11).map(|n| record("A", n)).collect()).await;
    snapshot_at(&raft, second).await;
    // The engine asks to purge through the newest snapshot; the log is purged only
    // through the older one kept, past the follower's last entry all the same.
    purged_through(&raft, second).await;
    let kept = nodes[&leader]
        .log
        .clone()
        .get_log_state()
        .await
        .unwrap()
        .last_purged_log_id
        .expect("the leader's log is purged");
    assert_eq!(
        kept.index, first,
        "purged only through the oldest kept snapshot"
    );
    assert!(kept.index > behind, "past the follower's last entry");
    let kept_files: Vec<u64> = crate::storage::snapshot::list(&dirs[&leader].join("snapshots"))
        .unwrap()
        .into_iter()
        .map(|(seq, _)| seq)
        .collect();
    assert_eq!(kept_files, vec![second + 1, first + 1]);
    // The log after the oldest kept snapshot is all there: that snapshot plus it rebuilds
    // the state.
    let rest = nodes[&leader]
        .log
        .clone()
        .try_get_log_entries(first + 1..=second)
        .await
        .unwrap();
    assert_eq!(rest.len() as u64, second - first);

    // The follower comes back on its directory and is sent the newest snapshot.
    let log = open_log_with(&dirs[&follower], true).await;
    nodes.insert(
        follower,
        start_with(&router, follower, &dirs[&follower], log, purging_config()).await,
    );
    let m = has_snapshot_at(&nodes[&follower].raft, second).await;
    assert!(m.last_applied.is_some_and(|a| a.index >= second));
    // Entries after the snapshot reach it, appended after the snapshot's last entry.
    let last = propose(&raft, epoch, 13, vec![record("B", 0), record("A", 12)]).await;
    let found = digests(&nodes, &all, last).await;
    assert!(
        found.windows(2).all(|w| w[0] == w[1]),
        "same digest at {last}"
    );
    assert_eq!(
        on_hand(&nodes[&follower].raft, "A").await,
        Some(10 + (1..=12).sum::<u64>())
    );
    assert_eq!(on_hand(&nodes[&follower].raft, "B").await, Some(10));
    // The installed snapshot's SKUs are kept in order, and the entries after it keep them.
    assert_eq!(
        kept_skus(&nodes[&follower].raft).await,
        Some(vec!["A".to_string(), "B".to_string()])
    );

    // On disk, the follower's log starts after the snapshot, and holds what followed it.
    let stopped = nodes.remove(&follower).unwrap();
    stop(&router, follower, stopped).await;
    let log = open_let_go(&dirs[&follower].join("log")).await;
    let purged = log.reader().purged().unwrap().expect("purged");
    assert_eq!(purged.seq, second + 1);
    let after: Vec<u64> = log
        .reader()
        .entries_after(purged.seq)
        .map(|e| e.map(|e| e.pos.seq))
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(after, ((second + 2)..=(last + 1)).collect::<Vec<_>>());
    drop(log);
    stop_all(&router, std::mem::take(&mut nodes)).await;
}

/// The leader's state lent to an epoch (`StockSm::lend`): the state machine keeps
/// answering each entry from its Raft metadata alone; a reclaim that fails leaves it lent;
/// one that succeeds rebuilds it from the snapshot and the log through the entry it began
/// at, folds in the records applied while it ran, and makes the state machine whole, its
/// digest then the followers' at the same position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lent_state_is_given_back_whole_with_what_was_applied_meanwhile() {
    let root = tempfile::tempdir().unwrap();
    let router = Router::default();
    let (nodes, leader, term) = three_started(&router, root.path()).await;
    let all = [1, 2, 3];
    let raft = nodes[&leader].raft.clone();
    let epoch = Epoch { term, k: 1 };
    let mut next_n = 1;
    let mut proposals = |records: Vec<Bytes>| {
        let first = next_n;
        next_n += records.len() as u64;
        (first, records)
    };
    let (first, records) = proposals(vec![record("A", 0), record("A", 1), record("A", 2)]);
    let last = propose(&raft, epoch, first, records).await;
    snapshot_at(&raft, last).await;
    let (first, records) = proposals(vec![record("A", 3)]);
    propose(&raft, epoch, first, records).await;

    let lent = raft
        .with_state_machine(|sm: &mut StockSm| {
            Box::pin(async move { (sm.lend(), sm.lend().is_some(), sm.is_lent()) })
        })
        .await
        .unwrap();
    let (state, lent_twice, is_lent) = lent;
    let state = state.expect("the state is lent");
    assert_eq!(
        state.products["A"].on_hand, 16,
        "the epoch gets the whole state"
    );
    let order: Vec<&str> = state.skus.0.as_ref().expect("kept").after(None).collect();
    assert_eq!(order, ["A"], "with its SKUs in order");
    assert!(!lent_twice && is_lent, "lent once, until it is given back");

    // Lent: entries are answered from the metadata; the products are the epoch's.
    let (first, records) = proposals(vec![record("A", 4), record("B", 0)]);
    propose(&raft, epoch, first, records).await;
    assert_eq!(
        on_hand(&raft, "A").await,
        None,
        "the state machine holds no products"
    );

    // A reclaim that cannot rebuild leaves the state lent.
    let failed = raft
        .with_state_machine(|sm: &mut StockSm| {
            Box::pin(async move {
                let upto = sm.begin_reclaim().expect("lent").upto;
                (
                    sm.finish_reclaim(upto, Err(RebuildError::Failed("no rebuild".into()))),
                    sm.is_lent(),
                )
            })
        })
        .await
        .unwrap();
    assert_eq!(failed, (Err("no rebuild".into()), true));

    let job = raft
        .with_state_machine(|sm: &mut StockSm| Box::pin(async move { sm.begin_reclaim() }))
        .await
        .unwrap()
        .expect("lent");
    // Applied while the state is rebuilt: kept, and folded in at the end.
    let (first, records) = proposals(vec![record("A", 5), record("B", 6)]);
    let last = propose(&raft, epoch, first, records).await;
    assert!(job.upto <= last, "the rebuild is through an earlier entry");
    let rebuilt = job.rebuild().await;
    let upto = job.upto;
    raft.with_state_machine(move |sm: &mut StockSm| {
        Box::pin(async move { sm.finish_reclaim(upto, rebuilt) })
    })
    .await
    .unwrap()
    .expect("the state is given back");
    assert_eq!(on_hand(&raft, "A").await, Some(10 + 1 + 2 + 3 + 4 + 5));
    assert_eq!(on_hand(&raft, "B").await, Some(16));
    // Rebuilt with its SKUs in order ("B" was created while the state was lent).
    assert_eq!(
        kept_skus(&raft).await,
        Some(vec!["A".to_string(), "B".to_string()])
    );
    let found = digests(&nodes, &all, last).await;
    assert!(
        found.windows(2).all(|w| w[0] == w[1]),
        "same digest at {last}"
    );

    // Whole again: what follows is folded as before.
    let (first, records) = proposals(vec![record("B", 7)]);
    let last = propose(&raft, epoch, first, records).await;
    assert_eq!(on_hand(&raft, "B").await, Some(23));
    let found = digests(&nodes, &all, last).await;
    assert!(
        found.windows(2).all(|w| w[0] == w[1]),
        "same digest at {last}"
    );
    stop_all(&router, nodes).await;
}

/// A lent state whose rebuild finds the committed log contradicting itself stops the
/// engine at its next entry, as a fold error does on a state machine that was never lent;
/// the other two nodes go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_that_meets_a_contradiction_stops_the_engine() {
    let root = tempfile::tempdir().unwrap();
    let router = Router::default();
    let (mut nodes, leader, term) = three_started(&router, root.path()).await;
    let all = [1, 2, 3];
    let epoch = Epoch { term, k: 1 };
    let last = propose(&nodes[&leader].raft, epoch, 1, vec![record("A", 0)]).await;
    digests(&nodes, &all, last).await;
    let follower = *all.iter().find(|&&id| id != leader).unwrap();
    let refused = nodes[&follower]
        .raft
        .with_state_machine(|sm: &mut StockSm| {
            Box::pin(async move {
                let lent = sm.lend().is_some();
                let upto = sm.begin_reclaim().expect("lent").upto;
                let why = RebuildError::Contradiction("record 2 does not fold".into());
                (lent, sm.finish_reclaim(upto, Err(why)), sm.is_lent())
            })
        })
        .await
        .unwrap();
    assert_eq!(refused, (true, Err("record 2 does not fold".into()), true));

    let last = propose(&nodes[&leader].raft, epoch, 2, vec![record("A", 1)]).await;
    nodes[&follower]
        .raft
        .wait(Some(WAIT))
        .metrics(|m| m.running_state.is_err(), "the follower's engine stops")
        .await
        .expect("the follower's engine stops at its next entry");
    let others: Vec<NodeId> = all.iter().copied().filter(|&id| id != follower).collect();
    let found = digests(&nodes, &others, last).await;
    assert_eq!(found[0], found[1], "the other two go on");

    let stopped = nodes.remove(&follower).unwrap();
    router.nodes.lock().unwrap().remove(&follower);
    let _ = stopped.raft.shutdown().await; // its engine stopped on its own
    let Node {
        raft, writer, log, ..
    } = stopped;
    drop((raft, log));
    writer.shutdown().await.expect("stopping the log");
    stop_all(&router, nodes).await;
}

/// A node started from a snapshot knows that snapshot's metadata from its recovery: the
/// engine's first question about its current snapshot is answered without decoding the
/// file again (here the metadata handed over differs from the file's, to tell the two
/// apart), and while that file is the newest and verifies only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovered_snapshot_is_known_without_a_second_decode() {
    use openraft::storage::RaftStateMachine;

    use crate::storage::entry::{loopback_membership, LogPos, RaftMeta, StoredMembership};
    use crate::storage::fold::State;
    use crate::storage::snapshot::{self, WriteHooks};

    let root = tempfile::tempdir().unwrap();
    let log = open_log(root.path()).await;
    let snapshots = root.path().join("snapshots");
    let raft_at = |seq| RaftMeta {
        last_applied: Some(LogPos { term: 1, seq }),
        membership: StoredMembership {
            pos: Some(LogPos { term: 1, seq: 1 }),
            membership: loopback_membership(3, &[&[1, 2, 3]]),
        },
        ..RaftMeta::default()
    };
    let state = State {
        raft: Some(raft_at(9)),
        ..State::default()
    };
    let written = snapshot::write(&snapshots, 9, &state, 0, WriteHooks::default()).unwrap();
    let source = SnapshotSource {
        reader: log.reader().clone(),
        writer: log.handle().clone(),
        program: None,
        last_built: Default::default(),
    };
    let told = Some((written.path.clone(), raft_at(8)));
    let mut sm = StockSm::recovered(&snapshots, state, source, told);
    let seq = |s: Option<Snapshot>| {
        let id = s.expect("a snapshot").meta.last_log_id.expect("an entry");
        crate::cluster::types::pos_of(&id).seq
    };
    assert_eq!(
        seq(sm.get_current_snapshot().await.unwrap()),
        8,
        "from memory"
    );

    crate::cluster::state_machine::tests::flip_middle_byte(&written.path);
    assert!(
        sm.get_current_snapshot().await.unwrap().is_none(),
        "verified each time"
    );
    drop(sm);
    log.handle().shutdown().await.expect("stopping the log");
}

/// Node `node`'s change feed once it has projected through entry `seq`: every event it
/// keeps after record `after`, in feed order.
async fn feed_through(node: &Node, seq: u64, after: u64) -> Vec<(Position, String)> {
    let (feed, _) = node.feed.as_ref().expect("a node with a feed");
    tokio::time::timeout(WAIT, async {
        while feed.stats().through < seq {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the feed reaches the entry");
    let mut cursor = Position {
        seq: after,
        index: u32::MAX,
    };
    let mut events = Vec::new();
    loop {
        let found = feed.read_after(cursor, 1000).expect("the events are kept");
        let Some(last) = found.events.last() else {
            return events;
        };
        cursor = last.position;
        events.extend(found.events.into_iter().map(|e| (e.position, e.json)));
    }
}

/// Every event the feeds of `ids` keep, once each has projected through entry `last`: the
/// same on every node (asserted).
async fn feeds_alike(
    nodes: &BTreeMap<NodeId, Node>,
    ids: &[NodeId],
    last: u64,
) -> Vec<(Position, String)> {
    let mut told = Vec::new();
    for id in ids {
        told.push(feed_through(&nodes[id], last, 0).await);
    }
    for (id, other) in ids.iter().zip(&told).skip(1) {
        assert_eq!(
            other, &told[0],
            "node {id} tells what node {} tells",
            ids[0]
        );
    }
    told.swap_remove(0)
}

/// Three nodes with change feeds tell the committed entries alike: the same events at the
/// same positions (entry sequences, blank and membership entries giving none). A follower
/// stopped and started again on its directory derives the events it lacks from its
/// start-up's fold and its projector, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_nodes_change_feed_tells_the_committed_entries_alike() {
    let root = tempfile::tempdir().unwrap();
    let router = Router::default();
    let (mut nodes, dirs, leader, term) = three_bounded(&router, root.path(), config(), true).await;
    let all = [1, 2, 3];
    let epoch = Epoch { term, k: 0 };
    let raft = nodes[&leader].raft.clone();
    let records = vec![
        record("A", 0),
        record("B", 0),
        record("A", 1),
        record("A", 2),
    ];
    let last = propose(&raft, epoch, 1, records).await + 1;
    let told = feeds_alike(&nodes, &all, last).await;
    let kinds: Vec<String> = told
        .iter()
        .map(|(_, json)| {
            serde_json::from_str::<serde_json::Value>(json).unwrap()["type"].to_string()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "\"product.created\"",
            "\"product.created\"",
            "\"stock.replenished\"",
            "\"stock.replenished\""
        ]
    );
    // Positions are the entries' sequences: the first proposal follows the blank entry
    // and the membership entry of the cluster's start.
    assert_eq!(told.last().unwrap().0.seq, last);

    // A follower's projector stops (as if it had fallen behind when the node was
    // killed), its engine goes on applying, then it stops; the others go on; it starts
    // again on its directory, its store behind its log: start-up's fold derives the
    // events the store lacks.
    let follower = *all.iter().find(|id| **id != leader).unwrap();
    let mut stopped = nodes.remove(&follower).unwrap();
    let (_, projector) = stopped.feed.take().unwrap();
    tokio::task::spawn_blocking(move || projector.stop())
        .await
        .unwrap();
    let applied = propose(&raft, epoch, 5, vec![record("A", 3)]).await;
    stopped
        .raft
        .wait(Some(WAIT))
        .applied_index_at_least(Some(applied), "the follower applies")
        .await
        .expect("the follower applies");
    stop(&router, follower, stopped).await;
    let more = propose(&raft, epoch, 6, vec![record("B", 4)]).await + 1;
    let log = open_log_with(&dirs[&follower], true).await;
    let restarted = start_fed(&router, follower, &dirs[&follower], log, config()).await;
    nodes.insert(follower, restarted);
    let last = propose(&raft, epoch, 7, vec![record("C", 0)]).await + 1;
    assert!(last > more);
    let told = feeds_alike(&nodes, &all, last).await;
    assert_eq!(told.len(), 7, "{:#?}", told);
    assert!(
        told.windows(2).all(|w| w[0].0 < w[1].0),
        "in order, none twice"
    );
    stop_all(&router, std::mem::take(&mut nodes)).await;
}

/// A follower down past the leader's purge, with a change feed: the leader builds its
/// snapshots only through what its feed's store holds on disk; the follower installs the
/// leader's snapshot, and its feed starts again after it (the events of the entries the
/// snapshot replaced are not in its log: a read from before is answered `Gone`), then
/// tells what follows as the leader does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_behind_an_installed_snapshot_starts_again_after_it() {
    let root = tempfile::tempdir().unwrap();
    let router = Router::default();
    let (mut nodes, dirs, leader, term) =
        three_bounded(&router, root.path(), purging_config(), true).await;
    let all = [1, 2, 3];
    let epoch = Epoch { term, k: 0 };
    let raft = nodes[&leader].raft.clone();
    let last = propose(&raft, epoch, 1, vec![record("A", 0), record("A", 1)]).await;
    digests(&nodes, &all, last).await;
    let follower = *all.iter().find(|id| **id != leader).unwrap();
    feed_through(&nodes[&follower], last + 1, 0).await;
    let stopped = nodes.remove(&follower).unwrap();
    stop(&router, follower, stopped).await;

    // A snapshot is built only through what the leader's feed holds on disk: none while
    // its projector cannot append.
    let (feed, _) = nodes[&leader].feed.as_ref().unwrap();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (holding, held) = std::sync::mpsc::channel::<()>();
    let holder = {
        let feed = feed.clone();
        std::thread::spawn(move || {
            let _store = feed.hold_store();
            holding.send(()).unwrap();
            let _ = released.recv();
        })
    };
    held.recv().unwrap();
    let first = propose(&raft, epoch, 3, (2..=6).map(|n| record("A", n)).collect()).await;
    raft.trigger()
        .snapshot()
        .await
        .expect("a snapshot is asked for");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let built = raft.metrics().borrow_watched().snapshot;
    assert!(
        built.is_none_or(|s| s.index < first),
        "no snapshot past the feed: {built:?}"
    );
    release.send(()).unwrap();
    holder.join().unwrap();
    snapshot_at(&raft, first).await;
    let second = propose(&raft, epoch, 8, (7..=11).map(|n| record("A", n)).collect()).await;
    snapshot_at(&raft, second).await;
    purged_through(&raft, second).await;

    let log = open_log_with(&dirs[&follower], true).await;
    let restarted = start_fed(&router, follower, &dirs[&follower], log, purging_config()).await;
    nodes.insert(follower, restarted);
    has_snapshot_at(&nodes[&follower].raft, second).await;
    let last = propose(&raft, epoch, 13, vec![record("B", 0), record("A", 12)]).await + 1;
    let installed = second + 1;
    let on_leader = feed_through(&nodes[&leader], last, installed).await;
    let on_follower = feed_through(&nodes[&follower], last, installed).await;
    assert_eq!(on_follower, on_leader);
    assert_eq!(on_follower.len(), 2, "{on_follower:#?}");
    let (feed, _) = nodes[&follower].feed.as_ref().unwrap();
    assert_eq!(
        feed.read_after(Position::default(), 10)
            .map(|f| f.events.len()),
        Err(crate::feed::Gone {
            oldest_seq: installed + 1
        }),
        "the feed starts again after the installed snapshot"
    );
    stop_all(&router, std::mem::take(&mut nodes)).await;
}
