//! A cluster leader's epochs, with three nodes in this process (each its own server,
//! Raft listener and hand-moved clock, on loopback ports picked free): time never runs
//! backwards across a failover, and a proposal refused mid-epoch skips the rest of the
//! epoch on every node, after which the leader serves again in a new epoch.
//!
//! In-process, because both need a hand on a node: its clock, or its epoch's proposer.
//! Every node is shut down at the end; a failing test drops the runtime, which stops them.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{free_ports, KEY, WAIT};
use common::{Client, START_MS};
use serde_json::json;
use stockd::clock::{Clock, ManualClock};
use stockd::cluster::settings::{parse_peers, ClusterKey, Settings};
use stockd::{Config, Durability, Server};

struct Node {
    server: Option<Server>,
    clock: Arc<ManualClock>,
    client: Client,
}

struct Cluster {
    _dir: tempfile::TempDir,
    nodes: BTreeMap<u64, Node>,
}

impl Cluster {
    /// Three nodes, every clock at `START_MS`; a start that fails (a port taken
    /// meanwhile) is retried whole on other ports.
    async fn start() -> Cluster {
        let mut last = String::new();
        for _ in 0..5 {
            match Cluster::try_start().await {
                Ok(cluster) => return cluster,
                Err(err) => last = err,
            }
        }
        panic!("the cluster did not start in 5 tries: {last}");
    }

    async fn try_start() -> Result<Cluster, String> {
        let dir = tempfile::tempdir().unwrap();
        let mut ports = free_ports(6).into_iter();
        let mut port = || ports.next().expect("a port per address");
        let addrs: BTreeMap<u64, (String, String)> = (1..=3)
            .map(|id| {
                let api = format!("127.0.0.1:{}", port());
                (id, (api, format!("127.0.0.1:{}", port())))
            })
            .collect();
        let peers: Vec<String> = addrs
            .iter()
            .map(|(id, (api, raft))| format!("{id}={api}@{raft}"))
            .collect();
        let peers = parse_peers(&peers.join(",")).unwrap();
        let mut nodes = BTreeMap::new();
        for (id, (api, raft)) in &addrs {
            let clock = Arc::new(ManualClock::new(START_MS));
            let config = Config {
                listen: api.parse().unwrap(),
                data_dir: dir.path().join(format!("node-{id}/data")),
                snapshot_dir: dir.path().join(format!("node-{id}/snapshots")),
                durability: Durability::Sync,
                clock: clock.clone(),
                cluster: Some(Settings {
                    node_id: *id,
                    peers: peers.clone(),
                    raft_listen: raft.parse().unwrap(),
                    key: ClusterKey::new(KEY).unwrap(),
                    join: false,
                }),
                ..Config::default()
            };
            let server = stockd::start(config)
                .await
                .map_err(|e| format!("node {id}: {e}"))?;
            let client = Client::new(format!("http://{api}"));
            nodes.insert(
                *id,
                Node {
                    server: Some(server),
                    clock,
                    client,
                },
            );
        }
        Ok(Cluster { _dir: dir, nodes })
    }

    /// The running node that leads and serves.
    async fn serving(&self) -> u64 {
        let deadline = Instant::now() + WAIT;
        loop {
            for (id, node) in &self.nodes {
                if node.server.is_some()
                    && node.client.get("/health?role=leader").await.status == 200
                {
                    return *id;
                }
            }
            assert!(Instant::now() < deadline, "a leader serves within {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(&mut self, id: u64) {
        let server = self.nodes.get_mut(&id).unwrap().server.take().unwrap();
        server.shutdown().await.expect("a clean shutdown");
    }

    async fn stop_all(mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            if self.nodes[&id].server.is_some() {
                self.stop(id).await;
            }
        }
    }

    /// Each running node's digest, once all are at the same position.
    async fn digests(&self) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut seen = Vec::new();
            for node in self.nodes.values().filter(|n| n.server.is_some()) {
                let a = node.client.get("/v1/admin/cluster/digest").await;
                seen.push((a.body["applied_seq"].clone(), a.body["digest"].clone()));
            }
            if seen.iter().all(|s| s.0 == seen[0].0 && !s.0.is_null()) {
                return seen.into_iter().map(|s| s.1.to_string()).collect();
            }
            assert!(
                Instant::now() < deadline,
                "equal positions within {WAIT:?}: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn ms(rfc3339: &serde_json::Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339.as_str().unwrap())
        .unwrap()
        .timestamp_millis()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_never_runs_backwards_across_a_failover() {
    let mut cluster = Cluster::start().await;
    let old = cluster.serving().await;
    // The leader's clock is a minute ahead of the others'.
    cluster.nodes[&old].clock.advance_ms(60_000);
    let c = cluster.nodes[&old].client.clone();
    assert_eq!(c.create_product("T", 5).await.status, 201);
    let first = c
        .post(
            "/v1/reservations",
            json!({"customer_id": "u", "items": [{"sku": "T", "quantity": 1}], "ttl_seconds": 30}),
        )
        .await;
    assert_eq!(first.status, 201, "{first:?}");
    assert_eq!(ms(&first.body["created_at"]), START_MS + 60_000);
    let id = first.body["id"].as_str().unwrap().to_string();

    // It stops; a node whose clock is a minute behind leads next.
    cluster.stop(old).await;
    let new = cluster.serving().await;
    assert_ne!(new, old);
    assert_eq!(cluster.nodes[&new].clock.now_ms(), START_MS);
    let c = cluster.nodes[&new].client.clone();
    let second = c
        .post(
            "/v1/reservations",
            json!({"customer_id": "v", "items": [{"sku": "T", "quantity": 1}], "ttl_seconds": 30}),
        )
        .await;
    assert_eq!(second.status, 201, "{second:?}");
    assert!(
        ms(&second.body["created_at"]) >= START_MS + 60_000,
        "decided no earlier than the newest time in the log: {second:?}"
    );
    // The first deadline stands as logged: not passed yet on the new leader.
    let r = c.get(&format!("/v1/reservations/{id}")).await;
    assert_eq!(r.body["status"], "pending", "{r:?}");
    assert_eq!(ms(&r.body["expires_at"]), START_MS + 90_000);
    // Once the new leader's own clock passes it, it expires.
    for node in cluster.nodes.values() {
        node.clock.advance_ms(100_000);
    }
    let expired = common::eventually(WAIT, || async {
        c.get(&format!("/v1/reservations/{id}")).await.body["status"] == "expired"
    })
    .await;
    assert!(expired, "expired once due on the new leader's clock");
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_proposal_skips_the_rest_of_its_epoch() {
    let cluster = Cluster::start().await;
    let leader = cluster.serving().await;
    let c = cluster.nodes[&leader].client.clone();
    assert_eq!(c.create_product("G", 10).await.status, 201);
    // The next proposal is numbered as if the one before it had been refused: it is
    // appended and committed, and skipped on every node.
    let server = cluster.nodes[&leader].server.as_ref().unwrap();
    server.current_service().journal().inject_proposal_gap();
    let skipped = c.reserve("u", "G", 2).await;
    skipped.assert_problem(503, "unavailable");
    // The leader serves again, in a new epoch, from the committed state.
    let deadline = Instant::now() + WAIT;
    let (leader, held) = loop {
        let leader = cluster.serving().await;
        let a = cluster.nodes[&leader].client.reserve("v", "G", 3).await;
        if a.status == 201 {
            break (leader, a);
        }
        assert_eq!(a.status, 503, "{a:?}");
        assert!(Instant::now() < deadline, "served again within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(held.body["items"][0]["quantity"], 3);
    let p = cluster.nodes[&leader].client.product("G").await;
    assert_eq!(
        (p["reserved"].as_u64(), p["available"].as_u64()),
        (Some(3), Some(7)),
        "the skipped hold is nowhere: {p}"
    );
    let digests = cluster.digests().await;
    assert!(digests.iter().all(|d| d == &digests[0]), "{digests:?}");
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_product_actor_failing_on_the_leader_ends_the_epoch_and_the_next_serves_it() {
    let cluster = Cluster::start().await;
    let leader = cluster.serving().await;
    let c = cluster.nodes[&leader].client.clone();
    assert_eq!(c.create_product("K", 10).await.status, 201);
    // A hold gives the product an actor, which then dies as in a crash.
    assert_eq!(c.reserve("u", "K", 2).await.status, 201);
    let server = cluster.nodes[&leader].server.as_ref().unwrap();
    let epoch = server.current_service();
    epoch.inject_product_kill("K");
    // The epoch ends (its journal stops taking records), and the leader serves again
    // from the committed state: the hold made before the failure is there.
    let ended = common::eventually(WAIT, || async { !epoch.journal().is_healthy() }).await;
    assert!(ended, "the epoch ends");
    let deadline = Instant::now() + WAIT;
    let leader = loop {
        let leader = cluster.serving().await;
        let a = cluster.nodes[&leader].client.reserve("v", "K", 3).await;
        if a.status == 201 {
            break leader;
        }
        assert_eq!(a.status, 503, "{a:?}");
        assert!(Instant::now() < deadline, "served again within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let p = cluster.nodes[&leader].client.product("K").await;
    assert_eq!(
        (p["reserved"].as_u64(), p["available"].as_u64()),
        (Some(5), Some(5)),
        "{p}"
    );
    let digests = cluster.digests().await;
    assert!(digests.iter().all(|d| d == &digests[0]), "{digests:?}");
    cluster.stop_all().await;
}

/// What the leader's actors answer (every product, every reservation) against what its
/// state machine folded from the committed log: `Err` names the first difference.
async fn actors_against_the_committed_fold(
    cluster: &Cluster,
    leader: u64,
    skus: &[String],
    ids: &[String],
) -> Result<(), String> {
    let node = &cluster.nodes[&leader];
    let committed = node
        .server
        .as_ref()
        .unwrap()
        .cluster()
        .expect("a cluster node")
        .applied_state()
        .await
        .expect("the committed state");
    for sku in skus {
        let p = node.client.get(&format!("/v1/products/{sku}")).await;
        let folded = &committed.products[sku.as_str()];
        let served = (
            p.body["on_hand"].as_u64(),
            p.body["reserved"].as_u64(),
            p.body["sold"].as_u64(),
            p.body["version"].as_u64(),
        );
        let folded = (
            Some(folded.on_hand),
            Some(folded.reserved),
            Some(folded.sold),
            Some(folded.version),
        );
        if served != folded {
            return Err(format!(
                "product {sku}: actors {served:?}, committed fold {folded:?}"
            ));
        }
    }
    for id in ids {
        let r = node.client.get(&format!("/v1/reservations/{id}")).await;
        let folded = &committed.reservations[&id.parse::<uuid::Uuid>().unwrap()];
        let served = (
            r.body["status"].as_str().map(str::to_string),
            r.body["expires_at"].clone(),
        );
        if served.0.as_deref() != Some(folded.status.as_str())
            || served.1.is_null()
            || ms(&served.1) != folded.expires_at
        {
            return Err(format!(
                "reservation {id}: actors {served:?}, committed fold {folded:?}"
            ));
        }
    }
    Ok(())
}

/// Asserts that the leader's actors hold the committed fold, once nothing is in flight:
/// an expiry the last clock step made due may still be on its way, so a difference must
/// last (for 5 s) to fail.
async fn assert_actors_hold_the_committed_fold(cluster: &Cluster, skus: &[String], ids: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let leader = cluster.serving().await;
        match actors_against_the_committed_fold(cluster, leader, skus, ids).await {
            Ok(()) => return,
            Err(difference) if Instant::now() > deadline => panic!("{difference}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Sends `body` to `path` on whichever node serves, again on a 503 (a change of leader
/// meanwhile, on a loaded machine); answers the answer and the node that gave it.
async fn to_leader(
    cluster: &Cluster,
    path: &str,
    body: serde_json::Value,
) -> (common::Answer, u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let leader = cluster.serving().await;
        let a = cluster.nodes[&leader].client.post(path, body.clone()).await;
        if a.status != 503 {
            return (a, leader);
        }
        assert!(Instant::now() < deadline, "{path}: 503 for {WAIT:?}: {a:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Random changes through the leader (seeded: the same run each time); after each round,
/// with nothing in flight, the leader's actors hold exactly the fold of the committed log.
/// (The check compares the leader with itself, so a change retried after a 503 whose
/// outcome was unknown does not disturb it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leaders_actors_hold_exactly_the_fold_of_the_committed_log() {
    let cluster = Cluster::start().await;
    cluster.serving().await;
    let skus: Vec<String> = (0..4).map(|i| format!("P{i}")).collect();
    for sku in &skus {
        let body = json!({"sku": sku, "name": sku, "on_hand": 12});
        let (a, _) = to_leader(&cluster, "/v1/products", body).await;
        assert!([201, 409].contains(&a.status.as_u16()), "{a:?}");
    }
    let mut rng = fastrand::Rng::with_seed(0x5eed_0017);
    let mut ids: Vec<String> = Vec::new();
    for round in 0..5 {
        // Time moves first, and the expiries it makes due are carried out before the
        // round's changes (ticks every 100 ms), so nothing is in flight at the check.
        let step = rng.i64(0..4_000);
        for node in cluster.nodes.values() {
            node.clock.advance_ms(step);
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        for _ in 0..30 {
            let pick =
                |rng: &mut fastrand::Rng, ids: &[String]| ids[rng.usize(..ids.len())].clone();
            let (path, body) = match rng.u8(0..8) {
                0..=3 => {
                    let mut lines =
                        vec![json!({"sku": skus[rng.usize(..2)], "quantity": rng.u64(1..4)})];
                    if rng.bool() {
                        lines
                            .push(json!({"sku": skus[rng.usize(2..4)], "quantity": rng.u64(1..3)}));
                    }
                    let body = json!({"customer_id": format!("c{}", rng.u8(0..6)), "items": lines, "ttl_seconds": rng.u64(1..6)});
                    ("/v1/reservations".to_string(), body)
                }
                4 if !ids.is_empty() => (
                    format!("/v1/reservations/{}/confirm", pick(&mut rng, &ids)),
                    json!({}),
                ),
                5 if !ids.is_empty() => (
                    format!("/v1/reservations/{}/cancel", pick(&mut rng, &ids)),
                    json!({}),
                ),
                6 if !ids.is_empty() => (
                    format!("/v1/reservations/{}/extend", pick(&mut rng, &ids)),
                    json!({"ttl_seconds": rng.u64(1..6)}),
                ),
                _ => (
                    format!("/v1/products/{}/replenish", skus[rng.usize(..4)]),
                    json!({"quantity": rng.u64(1..4)}),
                ),
            };
            let (a, _) = to_leader(&cluster, &path, body).await;
            assert!(
                [200, 201, 409].contains(&a.status.as_u16()),
                "round {round}: an answer outside the contract: {a:?}"
            );
            if path == "/v1/reservations" && a.status == 201 {
                ids.push(a.body["id"].as_str().unwrap().to_string());
            }
        }
        assert_actors_hold_the_committed_fold(&cluster, &skus, &ids).await;
    }
    let digests = cluster.digests().await;
    assert!(digests.iter().all(|d| d == &digests[0]), "{digests:?}");
    println!(
        "actors_hold_the_fold: {} reservations over 5 rounds",
        ids.len()
    );
    cluster.stop_all().await;
}
