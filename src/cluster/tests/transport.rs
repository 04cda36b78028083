//! The Raft listener's routes on a real engine (one node, its own leader), served on a
//! loopback port: what a peer could send that must change nothing; and a snapshot sent
//! by one engine's network client to another engine's listener: installed when whole and
//! of the same cluster, refused with nothing installed and no file left when cut short
//! or of another cluster.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::cluster::cluster_id::{ClusterId, ID_HEADER};
use crate::cluster::log_store::ClusterLog;
use crate::cluster::net::{self, ClusterNet, SnapshotHeader, KEY_HEADER};
use crate::cluster::node::ClusterNode;
use crate::cluster::node::{engine_config, Raft};
use crate::cluster::settings::{ClusterKey, Peer, Settings};
use crate::cluster::state_machine::Snapshot;
use crate::cluster::state_machine::SnapshotMeta;
use crate::cluster::state_machine::StockSm;
use crate::cluster::types::StockdNode;
use crate::cluster::types::{LogId, RaftVote};
use crate::cluster::{transport, Role};
use crate::storage::log::Log;

const KEY: &str = "a-cluster-key-for-this-test";

/// The settings of node 1, alone in its `--peers`, its Raft listener on a free port.
/// No snapshot by count nor by time (the engine's storage cases take their own).
fn no_snapshots() -> crate::storage::snapshotter::SnapshotPolicy {
    crate::storage::snapshotter::SnapshotPolicy {
        every_records: 0,
        every: None,
        ..Default::default()
    }
}

/// A node alone in its `--peers` (`lone_node`), on `dir/log` and `dir/snapshots`: the
/// node, its log's writer thread, and its role.
async fn start_lone(
    dir: &Path,
    join: bool,
) -> (
    ClusterNode,
    std::thread::JoinHandle<()>,
    watch::Receiver<Role>,
) {
    let log = Log::open(&dir.join("log")).unwrap();
    let (role, roles) = watch::channel(Role::Leaderless);
    let (node, writer, _) = ClusterNode::start(
        &lone_node(join),
        log,
        &dir.join("snapshots"),
        &no_snapshots(),
        None,
        role,
        None,
    )
    .await
    .expect("the node starts");
    (node, writer, roles)
}

/// A node alone in its cluster, on `dir/log` and `dir/snapshots`, once it leads.
async fn lone_leader(
    dir: &Path,
) -> (
    ClusterNode,
    std::thread::JoinHandle<()>,
    watch::Receiver<Role>,
) {
    let (node, writer, mut roles) = start_lone(dir, false).await;
    tokio::time::timeout(
        Duration::from_secs(60),
        roles.wait_for(|r| *r == Role::Leader { ready: false }),
    )
    .await
    .expect("it leads in time")
    .expect("the role is published");
    (node, writer, roles)
}

fn lone_node(join: bool) -> Settings {
    Settings {
        node_id: 1,
        peers: [(
            1,
            Peer {
                api: "127.0.0.1:1".into(),
                raft: "127.0.0.1:2".into(),
            },
        )]
        .into(),
        raft_listen: "127.0.0.1:0".parse().unwrap(),
        key: ClusterKey::new(KEY).unwrap(),
        join,
    }
}

/// A damaged snapshot is refused (400) before the engine sees it: the engine keeps
/// running, installs nothing, and the received file is gone.
#[tokio::test]
async fn a_snapshot_that_does_not_verify_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let settings = lone_node(false);
    // Alone in its cluster, it leads.
    let (node, writer, roles) = lone_leader(dir.path()).await;
    // Its membership (index 0) and first entry (index 1) applied: nothing moves after.
    node.raft()
        .wait(Some(Duration::from_secs(60)))
        .applied_index_at_least(Some(1), "the leader's first entry is applied")
        .await
        .expect("applied in time");
    let before = node.raft().metrics().borrow_watched().clone();
    let incoming = dir.path().join("incoming");
    let ids = node.cluster_ids();
    let cluster = ids
        .get()
        .expect("a node that initialized its cluster has its id");
    // A file a process killed while receiving a snapshot left behind goes when the
    // routes are made again.
    std::fs::create_dir_all(&incoming).unwrap();
    let left = incoming.join("received-1-0.snapshot");
    std::fs::write(&left, b"half a snapshot").unwrap();
    let routes = transport::routes(
        node.raft().clone(),
        settings.key.clone(),
        ids,
        incoming.clone(),
    );
    assert!(!left.exists(), "a left-over received file is removed");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/raft/snapshot", listener.local_addr().unwrap());
    let server = tokio::spawn(warp::serve(routes).incoming(listener).run());
    let http = reqwest::Client::new();
    // In the name of node 2, leading a later term: past the check of the sender's name,
    // and a vote this node would follow, were the snapshot handed to the engine.
    let data = b"not a snapshot";
    let header = SnapshotHeader {
        vote: RaftVote::new_committed(before.current_term + 1, 2),
        meta: SnapshotMeta {
            last_log_id: Some(LogId::new_term_index(before.current_term, 100)),
            last_membership: (*before.membership_config).clone(),
        },
        len: data.len() as u64,
    };
    let wire = |header: &SnapshotHeader| {
        let mut body = net::snapshot_prefix(header).unwrap();
        body.extend_from_slice(data);
        body
    };
    let reply = http
        .post(&url)
        .header(KEY_HEADER, KEY)
        .header(ID_HEADER, cluster.to_string())
        .body(wire(&header))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 400);
    let body: serde_json::Value = serde_json::from_slice(&reply.bytes().await.unwrap()).unwrap();
    assert_eq!(body["code"], "bad_request");
    assert!(
        body["detail"].as_str().unwrap().contains("does not verify"),
        "{body}"
    );
    let after = node.raft().metrics().borrow_watched().clone();
    assert!(after.running_state.is_ok());
    assert_eq!(after.snapshot, None);
    assert_eq!(after.last_applied, before.last_applied);
    assert_eq!(
        after.current_term, before.current_term,
        "the vote was not taken"
    );
    assert_eq!(*roles.borrow(), Role::Leader { ready: false });
    assert_eq!(
        std::fs::read_dir(&incoming).unwrap().count(),
        0,
        "the file is removed"
    );
    // The same request without the key is refused before anything is written, and so is
    // one that names no cluster.
    let reply = http
        .post(&url)
        .header(ID_HEADER, cluster.to_string())
        .body(wire(&header))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 401);
    let reply = http
        .post(&url)
        .header(KEY_HEADER, KEY)
        .body(wire(&header))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 400);
    let problem: serde_json::Value = serde_json::from_slice(&reply.bytes().await.unwrap()).unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("Stockd-Cluster-Id"),
        "{problem}"
    );
    // A message in this node's own name (its own vote as leader) is refused: the engine
    // would stop on it.
    let own = SnapshotHeader {
        vote: before.vote,
        ..header
    };
    let reply = http
        .post(&url)
        .header(KEY_HEADER, KEY)
        .header(ID_HEADER, cluster.to_string())
        .body(wire(&own))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 400);
    let body: serde_json::Value = serde_json::from_slice(&reply.bytes().await.unwrap()).unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("own name"),
        "{body}"
    );
    let after = node.raft().metrics().borrow_watched().clone();
    assert!(after.running_state.is_ok());
    assert_eq!(*roles.borrow(), Role::Leader { ready: false });
    server.abort();
    node.shutdown().await;
    let _ = node.log().shutdown().await;
    writer.join().unwrap();
}

/// Node 1, alone in its cluster (so its own leader), with a snapshot of what it applied.
struct Sender {
    node: ClusterNode,
    writer: std::thread::JoinHandle<()>,
    snapshot: Snapshot,
    vote: RaftVote,
    /// The last entry it applied, which its snapshot covers.
    applied: LogId,
}

async fn sender(dir: &Path, key: &ClusterKey) -> Sender {
    let settings = Settings {
        node_id: 1,
        peers: [(
            1,
            Peer {
                api: "127.0.0.1:1".into(),
                raft: "127.0.0.1:2".into(),
            },
        )]
        .into(),
        raft_listen: "127.0.0.1:0".parse().unwrap(),
        key: key.clone(),
        join: false,
    };
    let (role, _roles) = watch::channel(Role::Leaderless);
    let log1 = Log::open(&dir.join("1/log")).unwrap();
    let (node, writer, _) = ClusterNode::start(
        &settings,
        log1,
        &dir.join("1/snapshots"),
        &no_snapshots(),
        None,
        role,
        None,
    )
    .await
    .expect("node 1 starts");
    let raft1 = node.raft();
    let wait = Some(Duration::from_secs(60));
    let m = raft1
        .wait(wait)
        .applied_index_at_least(Some(1), "node 1 applies its first entry")
        .await
        .expect("applied in time");
    let applied = m.last_applied.expect("applied");
    raft1
        .trigger()
        .snapshot()
        .await
        .expect("a snapshot is asked for");
    raft1
        .wait(wait)
        .snapshot(applied, "node 1's snapshot")
        .await
        .expect("node 1 snapshots in time");
    let snapshot = raft1
        .get_snapshot()
        .await
        .unwrap()
        .expect("node 1 has a snapshot");
    let vote = raft1.metrics().borrow_watched().vote;
    Sender {
        node,
        writer,
        snapshot,
        vote,
        applied,
    }
}

impl Sender {
    async fn stop(self) {
        self.node.shutdown().await;
        let _ = self.node.log().shutdown().await;
        self.writer.join().unwrap();
    }
}

/// Node 2: a fresh engine (never initialized) behind its Raft listener on a loopback port.
struct Receiver {
    raft: Raft,
    log: ClusterLog,
    writer: std::thread::JoinHandle<()>,
    ids: Arc<ClusterId>,
    addr: String,
    incoming: std::path::PathBuf,
    server: tokio::task::JoinHandle<()>,
}

async fn receiver(dir: &Path, key: &ClusterKey) -> Receiver {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let log_dir = dir.join("2/log");
    let (log, writer) = ClusterLog::open(Log::open(&log_dir).unwrap()).expect("node 2's log");
    let ids = Arc::new(ClusterId::load(&log_dir).unwrap());
    let sm = StockSm::new(&dir.join("2/snapshots"));
    let raft = Raft::new(
        2,
        engine_config(0).unwrap(),
        ClusterNet::new(key.clone(), ids.clone()),
        log.clone(),
        sm,
    )
    .await
    .expect("node 2 starts");
    let incoming = dir.join("2/incoming");
    let routes = transport::routes(raft.clone(), key.clone(), ids.clone(), incoming.clone());
    let server = tokio::spawn(warp::serve(routes).incoming(listener).run());
    Receiver {
        raft,
        log,
        writer,
        ids,
        addr,
        incoming,
        server,
    }
}

impl Receiver {
    /// The received files still in its incoming directory.
    fn incoming_files(&self) -> usize {
        std::fs::read_dir(&self.incoming).map_or(0, |d| d.count())
    }

    /// What its state machine applied, by log sequence.
    async fn applied_seq(&self) -> Option<u64> {
        self.raft
            .with_state_machine(|sm: &mut StockSm| {
                Box::pin(async move {
                    sm.state()
                        .raft
                        .as_ref()
                        .and_then(|r| r.last_applied)
                        .map(|p| p.seq)
                })
            })
            .await
            .unwrap()
    }

    /// Nothing installed: no snapshot, nothing applied.
    async fn assert_untouched(&self) {
        let m = self.raft.metrics().borrow_watched().clone();
        assert!(m.running_state.is_ok());
        assert_eq!(m.snapshot, None);
        assert_eq!(m.last_applied, None);
        assert_eq!(self.applied_seq().await, None);
    }

    async fn stop(self) {
        self.server.abort();
        self.raft.shutdown().await.unwrap();
        let _ = self.log.handle().shutdown().await;
        self.writer.join().unwrap();
    }
}

/// Node 1's network client, as the engine would use it, sending to node 2.
async fn send(
    key: &ClusterKey,
    from: &Sender,
    to: &Receiver,
) -> Result<openraft::raft::SnapshotResponse<crate::cluster::types::Tc>, String> {
    use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
    let mut net = ClusterNet::new(key.clone(), from.node.cluster_ids());
    let target = StockdNode {
        api: "127.0.0.1:1".into(),
        raft: to.addr.clone(),
    };
    let mut conn = net.new_client(2, &target).await;
    conn.full_snapshot(
        from.vote,
        from.snapshot.clone(),
        std::future::pending(),
        RPCOption::new(Duration::from_secs(60)),
    )
    .await
    .map_err(|e| e.to_string())
}

/// A full snapshot over HTTP: node 1 (alone, its own leader) builds one, and its network
/// client streams it to a fresh node 2's Raft listener, which installs it: node 2's state
/// machine then holds node 1's applied entries and membership, and node 2 has taken node
/// 1's cluster id, the first leader to reach it.
#[tokio::test]
async fn a_snapshot_travels_over_http_and_is_installed() {
    let dir = tempfile::tempdir().unwrap();
    let key = ClusterKey::new(KEY).unwrap();
    let node2 = receiver(dir.path(), &key).await;
    let node1 = sender(dir.path(), &key).await;
    assert_eq!(node2.ids.get(), None, "a new node has no cluster id");
    let answer = send(&key, &node1, &node2).await.expect("node 2 answers");
    assert_eq!(answer.vote, node1.vote, "node 2 took node 1's vote");
    let applied = node1.applied;
    let m = node2
        .raft
        .wait(Some(Duration::from_secs(60)))
        .snapshot(applied, "node 2 installs it")
        .await
        .expect("installed in time");
    assert_eq!(m.last_applied, Some(applied));
    let members = m
        .membership_config
        .membership()
        .voter_ids()
        .collect::<Vec<_>>();
    assert_eq!(members, vec![1]);
    // Node 2's state machine holds it, and the received file is gone.
    assert_eq!(node2.applied_seq().await, Some(applied.index + 1));
    assert_eq!(node2.incoming_files(), 0);
    assert_eq!(node2.ids.get(), node1.node.cluster_ids().get());
    assert!(node2.ids.get().is_some());
    node1.stop().await;
    node2.stop().await;
}

/// A snapshot from another cluster (a node 2 that belongs to one cluster, sent a snapshot
/// by the leader of another, same key and all) is refused with 409 before its body is
/// read: the engine never sees it, nothing is installed, no file is left, and node 2
/// keeps its cluster id.
#[tokio::test]
async fn a_snapshot_from_another_cluster_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let key = ClusterKey::new(KEY).unwrap();
    let node2 = receiver(dir.path(), &key).await;
    let theirs = node2.ids.generate().unwrap();
    let node1 = sender(dir.path(), &key).await;
    let ours = node1.node.cluster_ids().get().unwrap();
    assert_ne!(ours, theirs);
    let refused = send(&key, &node1, &node2).await.expect_err("refused");
    assert!(refused.contains("409"), "{refused}");
    assert!(refused.contains("wrong_cluster"), "{refused}");
    assert!(refused.contains(&theirs.to_string()), "{refused}");
    node2.assert_untouched().await;
    assert_eq!(node2.incoming_files(), 0);
    assert_eq!(node2.ids.get(), Some(theirs));
    // Every other route is refused the same way, before its body is read.
    let http = reqwest::Client::new();
    for rpc in ["append", "vote", "pre-vote", "transfer-leader"] {
        let reply = http
            .post(format!("http://{}/raft/{rpc}", node2.addr))
            .header(KEY_HEADER, KEY)
            .header(ID_HEADER, ours.to_string())
            .body(vec![1u8, 2, 3])
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 409, "{rpc}");
        assert_eq!(
            reply.headers()["content-type"],
            "application/problem+json",
            "{rpc}"
        );
    }
    node2.assert_untouched().await;
    node1.stop().await;
    node2.stop().await;
}

/// A snapshot whose connection closes mid-body (the sender stopped) installs nothing, and
/// its partly written file is removed; the same snapshot sent whole afterwards is
/// installed.
#[tokio::test]
async fn a_snapshot_cut_off_mid_body_installs_nothing_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let key = ClusterKey::new(KEY).unwrap();
    let node2 = receiver(dir.path(), &key).await;
    let node1 = sender(dir.path(), &key).await;
    let cluster = node1.node.cluster_ids().get().unwrap();
    let file = std::fs::read(&node1.snapshot.snapshot.path).unwrap();
    assert!(file.len() > 64, "a snapshot of {} bytes", file.len());
    let prefix = net::snapshot_prefix(&SnapshotHeader {
        vote: node1.vote,
        meta: node1.snapshot.meta.clone(),
        len: file.len() as u64,
    })
    .unwrap();
    // By hand on a socket: the whole length announced, half the file sent, then closed.
    let mut socket = tokio::net::TcpStream::connect(&node2.addr).await.unwrap();
    let head = format!(
        "POST /raft/snapshot HTTP/1.1\r\nhost: {}\r\n{KEY_HEADER}: {KEY}\r\n{ID_HEADER}: \
         {cluster}\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
        node2.addr,
        prefix.len() + file.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(&prefix).await.unwrap();
    socket.write_all(&file[..file.len() / 2]).await.unwrap();
    socket.flush().await.unwrap();
    // The receiver has begun writing the file before the connection goes.
    let wait = Duration::from_secs(60);
    tokio::time::timeout(wait, async {
        while node2.incoming_files() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the received file is begun");
    drop(socket);
    tokio::time::timeout(wait, async {
        while node2.incoming_files() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the partial file is removed");
    node2.assert_untouched().await;
    // Whole, it installs.
    send(&key, &node1, &node2).await.expect("node 2 answers");
    assert_eq!(node2.applied_seq().await, Some(node1.applied.index + 1));
    assert_eq!(node2.incoming_files(), 0);
    node1.stop().await;
    node2.stop().await;
}

/// A node started with `--join` never initializes a cluster, even with the lowest id in
/// its `--peers` (here, alone in them, where a node without it initializes at once): it
/// waits for a leader to add it, and has no cluster id until one reaches it.
#[tokio::test]
async fn a_joining_node_initializes_no_cluster_even_with_the_lowest_id() {
    for join in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (node, writer, _roles) = start_lone(dir.path(), join).await;
        let initialized = node.raft().is_initialized().await.unwrap();
        assert_eq!(initialized, !join, "join: {join}");
        assert_eq!(node.cluster_ids().get().is_some(), !join, "join: {join}");
        if join {
            let status = node.status();
            assert_eq!(
                (status.leader, status.members.len(), status.cluster_id),
                (None, 0, Some(None))
            );
        }
        node.shutdown().await;
        let _ = node.log().shutdown().await;
        writer.join().unwrap();
    }
}

/// A lent state whose rebuild fails stays lent, and the reclaims after it fail at once,
/// without a rebuild, until the backoff has passed (1 s after a first failure); once the
/// cause is gone, a reclaim after the backoff makes the state whole again, and the digest
/// can be read.
#[tokio::test]
async fn a_failed_rebuild_holds_reclaims_back_until_its_backoff_passes() {
    let dir = tempfile::tempdir().unwrap();
    let snapshots = dir.path().join("snapshots");
    let (node, writer, _) = lone_leader(dir.path()).await;
    let blank = node.write_blank().await.expect("the blank entry commits");
    let (lent, ..) = node.epoch_start(blank).await.expect("the state is lent");
    drop(lent);

    // The snapshot directory replaced by a file: a rebuild cannot list it.
    let _ = std::fs::remove_dir_all(&snapshots);
    std::fs::write(&snapshots, b"not a directory").unwrap();
    let first = node.reclaim().await.expect_err("the rebuild fails");
    assert!(
        !first.contains("trying again in"),
        "a rebuild was tried: {first}"
    );
    let held = node.reclaim().await.expect_err("held back");
    assert!(
        held.contains("trying again in"),
        "no rebuild this time: {held}"
    );
    assert!(node.digest().await.is_err(), "the state is still lent");

    // The cause goes: a reclaim once the backoff has passed rebuilds the state.
    std::fs::remove_file(&snapshots).unwrap();
    std::fs::create_dir(&snapshots).unwrap();
    let whole = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match node.reclaim().await {
                Ok(()) => return,
                Err(err) => assert!(err.contains("trying again in"), "{err}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(whole.is_ok(), "whole again once the backoff passed");
    let (applied, _) = node.digest().await.expect("the digest of the whole state");
    assert!(applied >= blank, "through the blank entry: {applied}");

    node.shutdown().await;
    let _ = node.log().shutdown().await;
    writer.join().unwrap();
}
