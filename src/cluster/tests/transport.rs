//! The Raft listener's routes on a real engine (one node, its own leader), served on a
//! loopback port: what a peer could send that must change nothing.

use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use tokio::sync::watch;

use crate::cluster::log_store::ClusterLog;
use crate::cluster::net::{self, ClusterNet, SnapshotRequest, KEY_HEADER};
use crate::cluster::node::ClusterNode;
use crate::cluster::node::{engine_config, Raft};
use crate::cluster::settings::{ClusterKey, Peer, Settings};
use crate::cluster::state_machine::SnapshotMeta;
use crate::cluster::state_machine::StockSm;
use crate::cluster::types::StockdNode;
use crate::cluster::types::{LogId, RaftVote};
use crate::cluster::{transport, Role};
use crate::storage::log::Log;

const KEY: &str = "a-cluster-key-for-this-test";

/// A damaged snapshot is refused (400) before the engine sees it: the engine keeps
/// running, installs nothing, and the received file is gone.
#[tokio::test]
async fn a_snapshot_that_does_not_verify_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
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
        key: ClusterKey::new(KEY).unwrap(),
    };
    let log = Log::open(&dir.path().join("log")).unwrap();
    let (role, mut roles) = watch::channel(Role::Leaderless);
    let (node, writer) = ClusterNode::start(&settings, log, &dir.path().join("snapshots"), 0, role)
        .await
        .expect("the node starts");
    // Alone in its cluster, it leads.
    tokio::time::timeout(
        Duration::from_secs(60),
        roles.wait_for(|r| *r == Role::Leader { ready: false }),
    )
    .await
    .expect("it leads in time")
    .expect("the role is published");
    // Its membership (index 0) and first entry (index 1) applied: nothing moves after.
    node.raft()
        .wait(Some(Duration::from_secs(60)))
        .applied_index_at_least(Some(1), "the leader's first entry is applied")
        .await
        .expect("applied in time");
    let before = node.raft().metrics().borrow_watched().clone();
    let incoming = dir.path().join("incoming");
    let routes = transport::routes(node.raft().clone(), settings.key.clone(), incoming.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/raft/snapshot", listener.local_addr().unwrap());
    let server = tokio::spawn(warp::serve(routes).incoming(listener).run());
    let http = reqwest::Client::new();
    // In the name of node 2, leading a later term: past the check of the sender's name,
    // and a vote this node would follow, were the snapshot handed to the engine.
    let request = SnapshotRequest {
        vote: RaftVote::new_committed(before.current_term + 1, 2),
        meta: SnapshotMeta {
            last_log_id: Some(LogId::new_term_index(before.current_term, 100)),
            last_membership: (*before.membership_config).clone(),
        },
        data: bytes::Bytes::from_static(b"not a snapshot"),
    };
    let reply = http
        .post(&url)
        .header(KEY_HEADER, KEY)
        .body(net::encode(&request).unwrap())
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
    // The same request without the key is refused before anything is written.
    let reply = http
        .post(&url)
        .body(net::encode(&request).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 401);
    // A message in this node's own name (its own vote as leader) is refused: the engine
    // would stop on it.
    let own = SnapshotRequest {
        vote: before.vote,
        ..request
    };
    let reply = http
        .post(&url)
        .header(KEY_HEADER, KEY)
        .body(net::encode(&own).unwrap())
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

/// A full snapshot over HTTP: node 1 (alone, its own leader) builds one, and its network
/// client sends it to a fresh node 2's Raft listener, which installs it: node 2's state
/// machine then holds node 1's applied entries and membership.
#[tokio::test]
async fn a_snapshot_travels_over_http_and_is_installed() {
    use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
    let dir = tempfile::tempdir().unwrap();
    let key = ClusterKey::new(KEY).unwrap();
    // Node 2: a fresh engine (never initialized) behind its Raft listener.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let raft2_addr = listener.local_addr().unwrap().to_string();
    let (log2, writer2) =
        ClusterLog::open(Log::open(&dir.path().join("2/log")).unwrap()).expect("node 2's log");
    let sm2 = StockSm::new(&dir.path().join("2/snapshots"));
    let raft2 = Raft::new(
        2,
        engine_config(0).unwrap(),
        ClusterNet::new(key.clone()),
        log2.clone(),
        sm2,
    )
    .await
    .expect("node 2 starts");
    let routes = transport::routes(raft2.clone(), key.clone(), dir.path().join("2/incoming"));
    let server = tokio::spawn(warp::serve(routes).incoming(listener).run());
    // Node 1: alone in its cluster, it leads, applies its first entries, and snapshots.
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
    };
    let (role, _roles) = watch::channel(Role::Leaderless);
    let log1 = Log::open(&dir.path().join("1/log")).unwrap();
    let (node1, writer1) =
        ClusterNode::start(&settings, log1, &dir.path().join("1/snapshots"), 0, role)
            .await
            .expect("node 1 starts");
    let raft1 = node1.raft();
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
    // Sent by node 1's network client, as the engine would.
    let mut net = ClusterNet::new(key.clone());
    let target = StockdNode {
        api: "127.0.0.1:1".into(),
        raft: raft2_addr,
    };
    let mut conn = net.new_client(2, &target).await;
    let answer = conn
        .full_snapshot(
            vote,
            snapshot,
            std::future::pending(),
            RPCOption::new(Duration::from_secs(60)),
        )
        .await
        .expect("node 2 answers");
    assert_eq!(answer.vote, vote, "node 2 took node 1's vote");
    let m = raft2
        .wait(wait)
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
    let seq = raft2
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
        .unwrap();
    assert_eq!(seq, Some(applied.index + 1));
    assert_eq!(
        std::fs::read_dir(dir.path().join("2/incoming"))
            .unwrap()
            .count(),
        0
    );
    server.abort();
    node1.shutdown().await;
    raft2.shutdown().await.unwrap();
    let _ = node1.log().shutdown().await;
    let _ = log2.handle().shutdown().await;
    writer1.join().unwrap();
    writer2.join().unwrap();
}
