//! Three real `stockd serve` processes on loopback, started with `--peers`
//! (`common::cluster`): the election, `GET /v1/cluster` on every node, a follower's 307 to
//! its leader and a change stored through it on every node, a new leader after `kill -9`
//! of the old one, `/health` without a quorum, and the Raft listener's cluster key.
//!
//! Every process is a `ChildServer`, killed (SIGKILL) when dropped, so also when a test
//! fails. Every wait is bounded and generous (a loaded two-core machine), and waits for
//! a state, never for a time: the times measured are printed, never asserted.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{fits, free_ports, leader_of, no_redirects, Cluster, KEY, WAIT};
use common::ChildServer;
use loadtest::server::Launch;
use serde_json::Value;

/// Fails unless `$cond`, with the message.
macro_rules! check {
    ($cond:expr, $($why:tt)+) => {
        if !$cond {
            return Err(format!($($why)+));
        }
    };
}

/// With `leader` leading and serving: `/health` on the leader and on a follower (naming
/// its leader), `?role=leader` 200 on the leader only, and the follower's 307s to the
/// leader, with the same path and query.
async fn roles_and_redirects(cluster: &Cluster, leader: u64) -> Result<(), String> {
    let health = cluster.client(leader).get("/health").await;
    check!(
        health.status == 200 && health.body["role"] == "leader",
        "the leader's /health: {health:?}"
    );
    fits("Health", &health.body);
    let follower = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    let health = cluster.client(follower).get("/health").await;
    check!(
        health.status == 200
            && health.body["role"] == "follower"
            && health.body["leader"] == leader,
        "a follower's /health: {health:?}"
    );
    fits("Health", &health.body);
    let a = cluster.client(leader).get("/health?role=leader").await;
    check!(
        a.status == 200 && a.body["role"] == "leader",
        "the leader's /health?role=leader: {a:?}"
    );
    let a = cluster.client(follower).get("/health?role=leader").await;
    check!(
        a.status == 503 && a.code() == "unavailable" && a.header("retry-after") == Some("1"),
        "a follower's /health?role=leader: {a:?}"
    );
    let base = &cluster.client(follower).base;
    let leader_api = &cluster.addrs[&leader].api;
    let http = no_redirects();
    let res = http
        .get(format!("{base}/v1/products?limit=5"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let location = res.headers().get("location").and_then(|v| v.to_str().ok());
    let named = res
        .headers()
        .get("stockd-leader")
        .and_then(|v| v.to_str().ok());
    check!(
        res.status() == 307
            && location == Some(&format!("http://{leader_api}/v1/products?limit=5"))
            && named == Some(&leader.to_string()),
        "a follower's GET: {res:?}"
    );
    let res = http
        .post(format!("{base}/v1/products"))
        .header("content-type", "application/json")
        .body(r#"{"sku":"A-1","name":"A","on_hand":1}"#)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let location = res.headers().get("location").and_then(|v| v.to_str().ok());
    check!(
        res.status() == 307 && location == Some(&format!("http://{leader_api}/v1/products")),
        "a follower's POST: {res:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_a_leader_and_agree_on_the_cluster() {
    let started = Instant::now();
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(&[1, 2, 3]))
        .await
        .unwrap();
    cluster.agreed().await;
    println!(
        "three_nodes: a leader agreed on by all three {:?} after the first start",
        started.elapsed()
    );
    let statuses = cluster.caught_up().await;
    let leader = leader_of(&statuses);
    // One cluster id, made when node 1 initialized the cluster, known to all three.
    let cluster_id = statuses[&1]["cluster_id"].clone();
    assert!(
        cluster_id.as_str().is_some_and(|id| id.len() == 36),
        "{statuses:#?}"
    );
    for (id, status) in &statuses {
        fits("Cluster", status);
        assert_eq!(status["cluster_id"], cluster_id, "{status}");
        assert_eq!(status["node_id"], *id, "{status}");
        let role = if *id == leader { "leader" } else { "follower" };
        assert_eq!(status["role"], role, "{status}");
        assert!(status["term"].as_u64().unwrap() >= 1, "{status}");
        // Every node lists the three members with the addresses --peers gave them.
        let members = status["members"].as_array().unwrap();
        assert_eq!(members.len(), 3, "{status}");
        for member in members {
            let id = member["id"].as_u64().unwrap();
            assert_eq!(member["api"], cluster.addrs[&id].api, "{member}");
            assert_eq!(member["raft"], cluster.addrs[&id].raft, "{member}");
            assert_eq!(member["voter"], true, "{member}");
        }
        // The membership and the leader's first entry are in the log, flushed, committed
        // and applied everywhere.
        let last = status["last_seq"].as_u64().unwrap();
        assert!(last >= 2, "{status}");
        for field in ["durable_seq", "committed_seq", "applied_seq"] {
            assert_eq!(status[field], last, "{field}: {status}");
        }
        assert_eq!(status["snapshot_seq"], 0, "{status}");
        assert_eq!(status["purged_seq"], 0, "{status}");
        assert!(
            status["cluster_committed_seq"].as_u64().unwrap() <= last,
            "{status}"
        );
        // Only the leader tracks its quorum and each voter's log.
        let leads = *id == leader_of(&statuses);
        assert_eq!(status.get("replication").is_some(), leads, "{status}");
        assert_eq!(
            status.get("millis_since_quorum_ack").is_some(),
            leads,
            "{status}"
        );
        if leads {
            let replication = status["replication"].as_object().unwrap();
            assert_eq!(replication.len(), 3, "{status}");
            assert!(
                replication.values().all(|m| m.as_u64().unwrap() <= last),
                "{status}"
            );
        }
    }

    // /health, and a follower's redirects, by role. A leader change meanwhile (a loaded
    // machine) makes one try fail: it is tried again with the leader serving then.
    let mut tries = 0;
    let leader = loop {
        let leader = cluster.serving().await;
        match roles_and_redirects(&cluster, leader).await {
            Ok(()) => break leader,
            Err(err) if tries < 5 => {
                tries += 1;
                println!("three_nodes: tried again ({err})");
            }
            Err(err) => panic!("{err}"),
        }
    };
    let follower = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    // A change sent to a follower follows its redirect to the leader, which stores it on
    // a majority before it answers; every node then holds it.
    let created = cluster
        .client(follower)
        .post(
            "/v1/products",
            serde_json::json!({"sku": "A-1", "name": "A", "on_hand": 1}),
        )
        .await;
    assert_eq!(created.status, 201, "{created:?}");
    let followed = cluster.client(follower).get("/v1/products?limit=5").await;
    assert_eq!(followed.status, 200, "{followed:?}");
    assert_eq!(followed.body["items"][0]["sku"], "A-1", "{followed:?}");
    let after = cluster.caught_up().await;
    for (id, status) in &after {
        assert!(
            status["last_seq"].as_u64().unwrap() > statuses[id]["last_seq"].as_u64().unwrap(),
            "node {id}: {status} after {}",
            statuses[id]
        );
    }
    let (at, digests) = cluster.digests().await;
    let first = digests.values().next().unwrap();
    assert!(
        digests.values().all(|d| d == first),
        "the same state at {at}: {digests:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_is_elected_after_kill_9_of_the_leader() {
    let mut cluster = tokio::task::spawn_blocking(|| Cluster::start(&[1, 2, 3]))
        .await
        .unwrap();
    let before = cluster.agreed().await;
    let old = leader_of(&before);
    let old_term = before[&old]["term"].as_u64().unwrap();
    let killed = Instant::now();
    let mut old_node = cluster.nodes.remove(&old).unwrap();
    old_node.kill9();
    let after = cluster.agreed().await;
    let new = leader_of(&after);
    println!(
        "failover: node {new} leads term {} {:?} after kill -9 of node {old} (term {old_term})",
        after[&new]["term"],
        killed.elapsed()
    );
    assert_ne!(new, old);
    assert!(
        after[&new]["term"].as_u64().unwrap() > old_term,
        "{after:#?}"
    );
    assert_eq!(after[&new]["role"], "leader");
    // The survivor follows the new leader, and redirects to it (tried again with the
    // leader agreed on then, should the two elect another meanwhile).
    let mut tries = 0;
    loop {
        let leader = cluster.serving().await;
        match roles_and_redirects(&cluster, leader).await {
            Ok(()) => break,
            Err(err) if tries < 5 => {
                tries += 1;
                println!("failover: tried again ({err})");
            }
            Err(err) => panic!("{err}"),
        }
    }

    // The killed node starts again on its data directory (its vote, log and membership
    // recovered; --peers is not applied again) and follows the new leader.
    let restarted = Instant::now();
    tokio::task::block_in_place(|| old_node.restart()).expect("the old leader restarts");
    cluster.nodes.insert(old, old_node);
    let rejoined = cluster.agreed().await;
    println!(
        "rejoin: node {old} follows node {} {:?} after its restart",
        leader_of(&rejoined),
        restarted.elapsed()
    );
    let old_status = &rejoined[&old];
    assert_eq!(old_status["role"], "follower", "{rejoined:#?}");
    assert!(before[&old]["cluster_id"].is_string(), "{before:#?}");
    assert!(
        rejoined
            .values()
            .all(|s| s["cluster_id"] == before[&old]["cluster_id"]),
        "the cluster id is kept across the restart: {rejoined:#?}"
    );
    assert!(
        old_status["term"].as_u64().unwrap() >= after[&new]["term"].as_u64().unwrap(),
        "{rejoined:#?}"
    );
    assert_eq!(old_status["members"].as_array().unwrap().len(), 3);
    // It holds at least the log it had acknowledged before the kill.
    assert!(
        old_status["last_seq"].as_u64().unwrap() >= before[&old]["committed_seq"].as_u64().unwrap(),
        "{rejoined:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_of_three_has_no_leader_and_says_so() {
    let mut cluster = tokio::task::spawn_blocking(|| Cluster::start(&[1]))
        .await
        .unwrap();
    let client = cluster.client(1);
    // The membership it was initialized with shows once the engine has published it.
    let members = common::eventually(WAIT, || async {
        let status = client.get("/v1/cluster").await;
        status.body["members"]
            .as_array()
            .is_some_and(|m| m.len() == 3)
    })
    .await;
    assert!(members, "the node lists the three members of --peers");
    // Several election timeouts pass: it stays without a leader, every time asked.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let health = client.get("/health").await;
        health.assert_problem(503, "unavailable");
        fits("Problem.unavailable", &health.body);
        assert_eq!(health.body["role"], "leaderless");
        assert_eq!(health.header("retry-after"), Some("1"));
        let status = client.get("/v1/cluster").await;
        assert_eq!(status.status, 200);
        fits("Cluster", &status.body);
        assert_eq!(status.body["role"], "leaderless");
        assert_eq!(status.body["leader"], Value::Null);
        assert_eq!(status.body["members"].as_array().unwrap().len(), 3);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Application requests: 503, no leader to send them to.
    let a = client.get("/v1/products").await;
    a.assert_problem(503, "unavailable");
    assert_eq!(a.header("retry-after"), Some("1"));
    // /metrics is answered in every role.
    assert_eq!(client.get("/metrics").await.status, 200);
    // SIGTERM: a graceful stop (the engine, then the log), exit status 0.
    let node = cluster.nodes.get_mut(&1).unwrap();
    let status = tokio::task::block_in_place(|| node.terminate());
    assert!(status.is_some_and(|s| s.success()), "{status:?}");

    // Started again with a --peers naming a fourth node: the stored membership stands,
    // and the difference is warned about.
    let ports = free_ports(2);
    let peers = format!(
        "{},4=127.0.0.1:{}@127.0.0.1:{}",
        cluster.peers(),
        ports[0],
        ports[1]
    );
    let launch = Launch::command(cluster.command_with(1, &peers))
        .capture_stderr()
        .timeout(WAIT);
    let mut node = tokio::task::block_in_place(|| {
        ChildServer::try_start(launch, cluster.data_dir(1).join("data"))
    })
    .expect("node 1 starts again");
    let warned = tokio::task::block_in_place(|| {
        node.find_in_stderr(WAIT, |line| {
            line.contains("--peers differs from the cluster's stored membership")
                .then_some(())
        })
    });
    assert!(warned.is_some(), "the differing --peers is warned about");
    let client = node.client.clone();
    let three = common::eventually(WAIT, || async {
        let status = client.get("/v1/cluster").await;
        status.body["members"]
            .as_array()
            .is_some_and(|m| m.len() == 3)
    })
    .await;
    assert!(three, "the stored membership of three stands");
    let status = client.get("/v1/cluster").await;
    assert_eq!(status.body["members"].as_array().unwrap().len(), 3);
    assert_eq!(status.body["role"], "leaderless");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_requests_need_the_cluster_key() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(&[1]))
        .await
        .unwrap();
    let raft = format!("http://{}/raft/vote", cluster.addrs[&1].raft);
    let http = no_redirects();
    // Node 1, the lowest id, makes the cluster's id when it initializes the cluster.
    let client = cluster.client(1);
    let named = common::eventually(WAIT, || async {
        client.get("/v1/cluster").await.body["cluster_id"].is_string()
    })
    .await;
    assert!(named, "node 1 has a cluster id");
    let status = client.get("/v1/cluster").await.body;
    fits("Cluster", &status);
    let cluster_id = status["cluster_id"].as_str().unwrap().to_string();
    let term_before = status["term"].clone();
    for key in [
        None,
        Some("the-wrong-key-of-the-same-length"),
        Some(&KEY[1..]),
    ] {
        let mut req = http.post(&raft).body(vec![1u8, 2, 3]);
        if let Some(key) = key {
            req = req.header("stockd-cluster-key", key);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 401, "key {key:?}");
        assert_eq!(
            res.headers()["content-type"],
            "application/problem+json",
            "key {key:?}"
        );
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["code"], "unauthorized");
        assert_eq!(body["status"], 401);
    }
    // The right key gets past the check; a request must then name its cluster, this
    // node's (another is 409, before the body is read).
    let res = http
        .post(&raft)
        .header("stockd-cluster-key", KEY)
        .body(vec![1u8, 2, 3])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], "bad_request");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("Stockd-Cluster-Id"),
        "{body}"
    );
    let res = http
        .post(&raft)
        .header("stockd-cluster-key", KEY)
        .header("stockd-cluster-id", "0190a6a0-0000-7000-8000-000000000000")
        .body(vec![1u8, 2, 3])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 409);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], "wrong_cluster");
    assert!(
        body["detail"].as_str().unwrap().contains(&cluster_id),
        "{body}"
    );
    // With both: a body that is no vote is then a 400.
    let res = http
        .post(&raft)
        .header("stockd-cluster-key", KEY)
        .header("stockd-cluster-id", &cluster_id)
        .body(vec![1u8, 2, 3])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], "bad_request");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("not this route's message"),
        "{body}"
    );
    // Unknown routes and methods.
    let res = http
        .post(format!("http://{}/raft/nothing", cluster.addrs[&1].raft))
        .header("stockd-cluster-key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let res = http.get(&raft).send().await.unwrap();
    assert_eq!(res.status(), 405);
    // None of it reached the engine.
    let status = cluster.client(1).get("/v1/cluster").await.body;
    assert_eq!(status["term"], term_before);
}

/// Runs `stockd serve` with `args` to its exit (it must fail before serving); answers
/// its stderr.
fn refused_start(args: &[&str], dir: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_stockd"))
        .arg("serve")
        .args(args)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--snapshot-dir")
        .arg(dir.join("snapshots"))
        .env_remove("STOCKD_CLUSTER_KEY")
        .env_remove("STOCKD_ADMIN_KEY")
        .env("RUST_LOG", "warn")
        .output()
        .expect("runs");
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty(), "never listened: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn peers_on_a_single_servers_data_directory_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut single = ChildServer::spawn(dir.path(), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(single.client.create_product("A-1", 5));
    single.terminate();
    std::fs::write(dir.path().join("cluster.key"), KEY).unwrap();
    let key = dir.path().join("cluster.key");
    let p = free_ports(4);
    let peers = format!(
        "1=127.0.0.1:{}@127.0.0.1:{},2=127.0.0.1:{}@127.0.0.1:{}",
        p[0], p[1], p[2], p[3]
    );
    let listen = peers[2..].split('@').next().unwrap().to_string();
    let stderr = refused_start(
        &[
            "--listen",
            &listen,
            "--node-id",
            "1",
            "--peers",
            &peers,
            "--cluster-key-file",
            key.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(
        stderr.contains("written by a single-node server"),
        "{stderr}"
    );
    // The single server's data is untouched: it starts again with its product.
    let single = ChildServer::spawn(dir.path(), &[]);
    let product = rt.block_on(single.client.product("A-1"));
    assert_eq!(product["on_hand"], 5);
}

#[test]
fn cluster_flags_are_checked_before_anything_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    let peers = "1=127.0.0.1:1@127.0.0.1:2,2=127.0.0.1:3@127.0.0.1:4";
    let stderr = refused_start(&["--peers", peers], dir.path());
    assert!(stderr.contains("--peers needs --node-id"), "{stderr}");
    let stderr = refused_start(&["--peers", peers, "--node-id", "1"], dir.path());
    assert!(stderr.contains("--peers needs a cluster key"), "{stderr}");
    let stderr = refused_start(&["--node-id", "1"], dir.path());
    assert!(stderr.contains("--node-id needs --peers"), "{stderr}");
    // Nothing was created.
    assert!(!dir.path().join("data").exists());
    assert!(!dir.path().join("snapshots").exists());
}

/// A leader that cannot begin serving hands its leadership to another voter rather than
/// keep it, with the cluster answering 503 for as long: every node here refuses to serve
/// in term 1 (a test hook), so the first leader, elected in term 1, must hand over (after
/// 15 s of trying), and the cluster then serves in a later term.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_cannot_begin_serving_hands_its_leadership_over() {
    let cluster = Cluster::three_with(&[("STOCKD_TEST_FAIL_TERMS_UPTO", "1")]).await;
    let first = cluster.agreed().await;
    let first_term = first[&leader_of(&first)]["term"].as_u64().unwrap();
    let started = Instant::now();
    let leader = cluster.serving().await;
    let status = cluster.client(leader).get("/v1/cluster").await;
    let term = status.body["term"].as_u64().unwrap();
    assert!(term >= 2, "no node serves in term 1: {status:?}");
    println!(
        "hand-over: a leader served in term {term} {} ms after the first agreed in term {first_term}",
        started.elapsed().as_millis()
    );
    let a = common::cluster::Checkout::of(&cluster)
        .post(
            "/v1/products",
            serde_json::json!({"sku": "H", "name": "H", "on_hand": 1}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
}

/// `--snapshot-every-seconds` on a cluster: every node asks its engine for a snapshot on
/// its timer once it has applied something since its newest, long before
/// `--snapshot-every-records` (500,000 by default) would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_takes_a_snapshot_on_its_timer() {
    let cluster = Cluster::three_with(&[("STOCKD_SNAPSHOT_EVERY_SECONDS", "1")]).await;
    cluster.serving().await;
    let c = common::cluster::Checkout::of(&cluster);
    let a = c
        .post(
            "/v1/products",
            serde_json::json!({"sku": "T", "name": "T", "on_hand": 1}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let statuses = cluster.caught_up().await;
    let applied = statuses.values().next().unwrap()["applied_seq"]
        .as_u64()
        .unwrap();
    for (id, node) in &cluster.nodes {
        let snapshotted = common::eventually(WAIT, || async {
            let status = node.client.get("/v1/cluster").await;
            status.body["snapshot_seq"].as_u64().unwrap_or(0) >= applied
        })
        .await;
        assert!(snapshotted, "node {id} takes a snapshot through {applied}");
    }
}
