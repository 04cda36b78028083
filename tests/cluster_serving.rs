//! A three-node cluster serves (`common::cluster`: three real `stockd serve` processes on
//! loopback): the reservation paths through any node, `kill -9` of the leader under load
//! losing nothing acknowledged, an expiry across a failover, and a whole-cluster restart.
//!
//! Clients here act as a shop's checkout would: they send to any node, follow a
//! follower's 307 to the leader, and retry a 503 or a connection error on another node,
//! a reservation always with the same `Idempotency-Key`. Every wait is bounded and waits
//! for a state; times are printed, never asserted.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{Checkout, Cluster, WAIT};
use reqwest::Method;
use serde_json::{json, Value};

async fn start(running: &[u64]) -> Cluster {
    let running = running.to_vec();
    tokio::task::spawn_blocking(move || Cluster::start(&running))
        .await
        .unwrap()
}

/// Every node at the same position holds the same state.
async fn assert_same_state(cluster: &Cluster) {
    let (at, digests) = cluster.digests().await;
    let first = digests.values().next().unwrap();
    assert!(
        digests.values().all(|d| d == first),
        "the same state on every node at {at}: {digests:?}"
    );
}

fn figures(product: &Value) -> (u64, u64, u64) {
    let n = |f: &str| product[f].as_u64().unwrap();
    (n("on_hand"), n("reserved"), n("sold"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_serves_the_reservation_paths_through_any_node() {
    let cluster = start(&[1, 2, 3]).await;
    let leader = cluster.serving().await;
    // Everything goes to a follower first (unless the leadership moves meanwhile).
    let follower = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    let mut nodes = vec![cluster.client(follower).clone()];
    nodes.extend(cluster.nodes.values().map(|n| n.client.clone()));
    let c = Checkout {
        nodes,
        patience: WAIT,
        retried: Arc::default(),
    };

    c.create("A", 10).await;
    c.create("B", 5).await;
    c.post(
        "/v1/products",
        json!({"sku": "A", "name": "A", "on_hand": 1}),
    )
    .await
    .assert_problem(409, "sku_exists");

    // A reservation of two lines, replayed by its key.
    let items = json!([{"sku": "A", "quantity": 2}, {"sku": "B", "quantity": 1}]);
    let first = c.reserve("user-1", items.clone(), "order-1").await;
    assert_eq!(first.status, 201, "{first:?}");
    let replay = c.reserve("user-1", items, "order-1").await;
    assert_eq!(replay.status, 201, "{replay:?}");
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.body, first.body);
    let id = first.body["id"].as_str().unwrap().to_string();
    assert_eq!(
        c.get(&format!("/v1/reservations/{id}")).await.body["status"],
        "pending"
    );
    assert_eq!(figures(&c.product("A").await), (10, 2, 0));
    assert_eq!(figures(&c.product("B").await), (5, 1, 0));

    // Extend, confirm (repeatable), and what a confirmed reservation refuses.
    let a = c
        .post(
            &format!("/v1/reservations/{id}/extend"),
            json!({"ttl_seconds": 900}),
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    let a = c
        .post(
            &format!("/v1/reservations/{id}/confirm"),
            json!({"order_id": "o-1"}),
        )
        .await;
    assert_eq!(
        (a.status.as_u16(), &a.body["status"]),
        (200, &json!("confirmed")),
        "{a:?}"
    );
    let again = c
        .post(&format!("/v1/reservations/{id}/confirm"), json!({}))
        .await;
    assert_eq!(again.body, a.body);
    c.post(&format!("/v1/reservations/{id}/cancel"), json!({}))
        .await
        .assert_problem(409, "reservation_confirmed");
    assert_eq!(figures(&c.product("A").await), (8, 0, 2));

    // A cancel returns the units; a hold beyond the stock changes nothing.
    let r = c
        .reserve("user-2", json!([{"sku": "A", "quantity": 3}]), "order-2")
        .await;
    let id2 = r.body["id"].as_str().unwrap().to_string();
    let a = c
        .post(&format!("/v1/reservations/{id2}/cancel"), json!({}))
        .await;
    assert_eq!(a.body["status"], "cancelled", "{a:?}");
    c.reserve("user-3", json!([{"sku": "A", "quantity": 9}]), "order-3")
        .await
        .assert_problem(409, "insufficient_stock");
    // Stock changes.
    let a = c
        .post("/v1/products/A/replenish", json!({"quantity": 5}))
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(figures(&c.product("A").await), (13, 0, 2));

    // An operator's snapshot is the leader engine's: taken (by the snapshot worker, from
    // the log), then found current.
    let taken = c.post("/v1/admin/snapshot", json!({})).await;
    assert_eq!(taken.status, 201, "{taken:?}");
    assert_eq!(taken.body["worker"], json!(true), "{taken:?}");
    let sequence = taken.body["sequence"].as_u64().unwrap();
    assert!(
        sequence > 0 && taken.body["size_bytes"].as_u64() > Some(0),
        "{taken:?}"
    );
    let again = c.post("/v1/admin/snapshot", json!({})).await;
    assert_eq!(
        (again.status.as_u16(), &again.body["created"]),
        (200, &json!(false)),
        "{again:?}"
    );
    assert_eq!(again.body["sequence"], sequence);
    common::cluster::fits("Snapshot", &taken.body);

    // Every node folded the same log into the same state.
    assert_same_state(&cluster).await;
}

/// What the checkout tasks acknowledged: idempotency key → reservation id.
type Acked = Arc<std::sync::Mutex<BTreeMap<String, String>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_under_load_loses_nothing_acknowledged() {
    const STOCK: u64 = 40;
    const TASKS: usize = 4;
    const PER_TASK: usize = 15;
    let mut cluster = start(&[1, 2, 3]).await;
    let old = cluster.serving().await;
    let c = Checkout::of(&cluster);
    c.create("FLASH", STOCK).await;

    // Buyers, one unit each, each attempt with its own key, retried until a definite
    // answer: 201, or 409 once sold out.
    let acked: Acked = Default::default();
    let count = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let (c, acked, count) = (c.clone(), acked.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0..PER_TASK {
                let key = format!("k-{task}-{n}");
                let a = c
                    .reserve(
                        &format!("buyer-{task}-{n}"),
                        json!([{"sku": "FLASH", "quantity": 1}]),
                        &key,
                    )
                    .await;
                match a.status.as_u16() {
                    201 => {
                        let id = a.body["id"].as_str().unwrap().to_string();
                        acked.lock().unwrap().insert(key, id);
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    409 => {
                        a.assert_problem(409, "insufficient_stock");
                        return;
                    }
                    _ => panic!("{key}: {a:?}"),
                }
            }
        }));
    }
    // The leader dies mid-run.
    let until = Instant::now() + WAIT;
    while count.load(Ordering::SeqCst) < 10 {
        assert!(
            Instant::now() < until,
            "ten holds acknowledged within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut killed = cluster.nodes.remove(&old).unwrap();
    let at_kill = count.load(Ordering::SeqCst);
    let kill = Instant::now();
    killed.kill9();
    for task in tasks {
        task.await.expect("a checkout task");
    }
    let acked = acked.lock().unwrap().clone();
    println!(
        "kill_9_under_load: {} holds acknowledged, {at_kill} before the kill of node {old}; \
         the rest within {:?} after it",
        acked.len(),
        kill.elapsed()
    );
    assert!(
        acked.len() > at_kill,
        "holds were acknowledged after the kill"
    );

    // On the new leader: every acknowledged hold, each once; never above the stock.
    let new = cluster.serving().await;
    assert_ne!(new, old);
    let c = Checkout::of(&cluster);
    let ids: BTreeSet<&String> = acked.values().collect();
    assert_eq!(ids.len(), acked.len(), "one reservation per key");
    for id in &ids {
        let r = c.get(&format!("/v1/reservations/{id}")).await;
        assert_eq!(r.body["status"], "pending", "{r:?}");
    }
    let (on_hand, reserved, sold) = figures(&c.product("FLASH").await);
    assert_eq!(on_hand, STOCK);
    assert_eq!(sold, 0);
    assert_eq!(
        reserved,
        acked.len() as u64,
        "every acknowledged hold, and only those (no retry held twice)"
    );
    assert!(reserved <= STOCK, "never oversold");
    // A retry of any acknowledged key now replays it.
    for (key, id) in acked.iter().take(5) {
        let (task, n) = key[2..].split_once('-').unwrap();
        let a = c
            .reserve(
                &format!("buyer-{task}-{n}"),
                json!([{"sku": "FLASH", "quantity": 1}]),
                key,
            )
            .await;
        assert_eq!(
            (a.status.as_u16(), a.body["id"].as_str()),
            (201, Some(id.as_str())),
            "{a:?}"
        );
        assert_eq!(a.header("idempotent-replayed"), Some("true"));
    }

    // The killed node restarts on its directory and catches up to the same state.
    tokio::task::block_in_place(|| killed.restart()).expect("the old leader restarts");
    cluster.nodes.insert(old, killed);
    assert_same_state(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_across_a_failover_returns_the_units_once() {
    let mut cluster = start(&[1, 2, 3]).await;
    let old = cluster.serving().await;
    let c = Checkout::of(&cluster);
    c.create("E", 5).await;
    let body =
        json!({"customer_id": "u", "items": [{"sku": "E", "quantity": 3}], "ttl_seconds": 2});
    let r = c
        .send(Method::POST, "/v1/reservations", Some(&body), Some("e-1"))
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let id = r.body["id"].as_str().unwrap().to_string();
    // The leader that decided the deadline dies before it passes; the next one expires it.
    let mut killed = cluster.nodes.remove(&old).unwrap();
    killed.kill9();
    let c = Checkout::of(&cluster);
    let expired = common::eventually(WAIT, || async {
        c.get(&format!("/v1/reservations/{id}")).await.body["status"] == "expired"
    })
    .await;
    assert!(expired, "the reservation expires on the new leader");
    assert_eq!(
        figures(&c.product("E").await),
        (5, 0, 0),
        "the units came back once"
    );
    let p = c.product("E").await;
    assert_eq!(p["available"], 5);

    tokio::task::block_in_place(|| killed.restart()).expect("the old leader restarts");
    cluster.nodes.insert(old, killed);
    assert_same_state(&cluster).await;
    let p = Checkout::of(&cluster).product("E").await;
    assert_eq!(
        (p["available"].as_u64(), p["reserved"].as_u64()),
        (Some(5), Some(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_cluster_restart_recovers_every_acknowledged_change() {
    let mut cluster = start(&[1, 2, 3]).await;
    cluster.serving().await;
    let c = Checkout::of(&cluster);
    for (sku, on_hand) in [("X", 10), ("Y", 4)] {
        c.create(sku, on_hand).await;
    }
    let mut ids = Vec::new();
    for n in 0..6 {
        let items = json!([{"sku": "X", "quantity": 1}, {"sku": "Y", "quantity": n % 2}]);
        let items = if n % 2 == 0 {
            json!([{"sku": "X", "quantity": 1}])
        } else {
            items
        };
        let r = c.reserve(&format!("u-{n}"), items, &format!("w-{n}")).await;
        assert_eq!(r.status, 201, "{r:?}");
        ids.push(r.body["id"].as_str().unwrap().to_string());
    }
    let a = c
        .post(&format!("/v1/reservations/{}/confirm", ids[0]), json!({}))
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    let a = c
        .post(&format!("/v1/reservations/{}/cancel", ids[1]), json!({}))
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    let before: Vec<Value> = {
        let mut out = Vec::new();
        for id in &ids {
            out.push(c.get(&format!("/v1/reservations/{id}")).await.body);
        }
        out
    };
    let (x, y) = (c.product("X").await, c.product("Y").await);

    // Every node dies at once, and all start again on their directories.
    for node in cluster.nodes.values_mut() {
        node.kill9();
    }
    for node in cluster.nodes.values_mut() {
        tokio::task::block_in_place(|| node.restart()).expect("a node restarts");
    }
    cluster.serving().await;
    let c = Checkout::of(&cluster);
    for (id, before) in ids.iter().zip(&before) {
        let after = c.get(&format!("/v1/reservations/{id}")).await;
        assert_eq!(&after.body, before, "reservation {id}");
    }
    assert_eq!(figures(&c.product("X").await), figures(&x));
    assert_eq!(figures(&c.product("Y").await), figures(&y));
    assert_eq!(figures(&x), (9, 4, 1));
    assert_same_state(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_acknowledges_nothing_and_rejoins_as_a_follower() {
    let cluster = start(&[1, 2, 3]).await;
    let old = cluster.serving().await;
    let c = Checkout::of(&cluster);
    c.create("P", 5).await;
    // A hold due in a second: the paused leader will find it overdue when it resumes.
    let body =
        json!({"customer_id": "u", "items": [{"sku": "P", "quantity": 2}], "ttl_seconds": 1});
    let r = c
        .send(Method::POST, "/v1/reservations", Some(&body), Some("p-1"))
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let id = r.body["id"].as_str().unwrap().to_string();

    let pid = cluster.nodes[&old]
        .pid()
        .expect("a running leader")
        .to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    };
    signal("-STOP");
    let paused = Instant::now();
    // Requests sent to it while it is paused, answered (if at all) once it resumes; the
    // redirects are not followed, so any 2xx would be its own.
    let http = common::cluster::no_redirects();
    let base = cluster.client(old).base.clone();
    let mut sent = Vec::new();
    for n in 0..4 {
        let (http, base) = (http.clone(), base.clone());
        sent.push(tokio::spawn(async move {
            let body =
                json!({"customer_id": format!("w-{n}"), "items": [{"sku": "P", "quantity": 1}]});
            http.post(format!("{base}/v1/reservations"))
                .json(&body)
                .send()
                .await
                .map(|res| res.status().as_u16())
        }));
    }
    // The others elect a leader of their own and serve. (Reads only: a read sent before
    // the election is redirected to the paused node, and is given up on quickly.)
    let others = Checkout {
        nodes: cluster
            .nodes
            .iter()
            .filter(|(id, _)| **id != old)
            .map(|(_, n)| n.client.clone())
            .collect(),
        patience: Duration::from_secs(1),
        retried: Arc::default(),
    };
    // When a survivor serves, from the pause (printed, not asserted).
    let served = loop {
        let mut ready = false;
        for (id, node) in &cluster.nodes {
            if *id != old && node.client.get("/health?role=leader").await.status == 200 {
                ready = true;
            }
        }
        if ready {
            break paused.elapsed();
        }
        assert!(paused.elapsed() < WAIT, "a survivor serves within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!("sigstop: a survivor serves {served:?} after the pause");
    let expired = common::eventually(WAIT, || async {
        others.get(&format!("/v1/reservations/{id}")).await.body["status"] == "expired"
    })
    .await;
    assert!(expired, "the new leader expires the overdue hold");
    // Long enough past the election for any lease of the old leader to have run out.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    signal("-CONT");
    for task in sent {
        let answer = task.await.unwrap();
        assert!(
            !matches!(answer, Ok(status) if (200..300).contains(&status)),
            "a paused, deposed leader acknowledged a request: {answer:?}"
        );
    }
    // It rejoins as a follower; its overdue-hold expiry (decided in a term that has
    // passed) never committed: the units came back once.
    let statuses = cluster.agreed().await;
    assert_ne!(common::cluster::leader_of(&statuses), old);
    assert_eq!(statuses[&old]["role"], "follower", "{statuses:#?}");
    assert_eq!(figures(&c.product("P").await), (5, 0, 0));
    assert_eq!(c.product("P").await["available"], 5);
    assert_same_state(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_created_on_the_leader_authenticate_on_every_node() {
    let mut cluster = start(&[1, 2, 3]).await;
    let old = cluster.serving().await;
    let c = Checkout::of(&cluster);
    // The first key turns authentication on (the nodes run open on loopback until then).
    let a = c
        .post(
            "/v1/admin/keys",
            json!({"name": "ops", "scopes": ["admin"]}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let admin = format!("Bearer {}", a.body["secret"].as_str().unwrap());
    let auth = [("authorization", admin.as_str())];
    // Every node comes to know it, and refuses a request without it.
    for (id, node) in &cluster.nodes {
        let known = common::eventually(WAIT, || async {
            let without = node.client.get("/v1/cluster").await;
            let with = node
                .client
                .send(Method::GET, "/v1/cluster", None, &auth)
                .await
                .unwrap();
            without.status == 401 && with.status == 200
        })
        .await;
        assert!(known, "node {id} authenticates with the key");
    }
    // A follower checks the key, then redirects.
    let follower = *cluster.nodes.keys().find(|id| **id != old).unwrap();
    let http = common::cluster::no_redirects();
    let base = &cluster.client(follower).base;
    let res = http
        .get(format!("{base}/v1/products"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let res = http
        .get(format!("{base}/v1/products"))
        .header("authorization", &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 307);
    // After a failover, the new leader knows it too.
    let mut killed = cluster.nodes.remove(&old).unwrap();
    killed.kill9();
    // (`/health` needs no key; `GET /v1/cluster`, which `serving` reads, needs one now.)
    let listed = common::eventually(WAIT, || async {
        for node in cluster.nodes.values() {
            if node.client.get("/health?role=leader").await.status == 200 {
                let a = node
                    .client
                    .send(Method::GET, "/v1/admin/keys", None, &auth)
                    .await
                    .unwrap();
                return a.status == 200 && a.body["items"].as_array().map(Vec::len) == Some(1);
            }
        }
        false
    })
    .await;
    assert!(listed, "the new leader lists the key, authenticated by it");
    drop(killed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_down_past_the_leaders_purge_catches_up_by_snapshot() {
    // A snapshot every 100 entries: the leader keeps 1,000 entries behind its snapshots,
    // and purges up to the oldest one it keeps.
    const EVERY_100: &[(&str, &str)] = &[("STOCKD_SNAPSHOT_EVERY_RECORDS", "100")];
    let mut cluster = Cluster::three_with(EVERY_100).await;
    let leader = cluster.serving().await;
    let c = Checkout::of(&cluster);
    c.create("R", 0).await;
    let down = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    let statuses = cluster.caught_up().await;
    let down_at = statuses[&down]["last_seq"].as_u64().unwrap();
    assert_eq!(statuses[&down]["snapshot_seq"], 0, "{statuses:#?}");
    let mut follower = cluster.nodes.remove(&down).unwrap();
    follower.kill9();

    // Changes until the leader has purged past everything the follower holds.
    let c = Checkout::of(&cluster);
    let mut sent = 0u64;
    let purged = loop {
        let mut batch = Vec::new();
        for _ in 0..4 {
            let c = c.clone();
            batch.push(tokio::spawn(async move {
                for _ in 0..50 {
                    let a = c
                        .post("/v1/products/R/replenish", json!({"quantity": 1}))
                        .await;
                    assert_eq!(a.status, 200, "{a:?}");
                }
            }));
        }
        for task in batch {
            task.await.unwrap();
        }
        sent += 200;
        let status = c.get("/v1/cluster").await;
        let purged = status.body["purged_seq"].as_u64().unwrap_or(0);
        if status.body["role"] == "leader" && purged > down_at {
            break purged;
        }
        assert!(
            sent < 10_000,
            "the leader purges within 10,000 changes: {status:?}"
        );
    };
    println!("purge: the leader purged through {purged} after {sent} changes (the follower held {down_at})");

    // Back, it is sent the leader's snapshot, and is killed (-9) in the middle of its
    // install: the snapshot kept, the log not yet moved past it.
    drop(follower);
    let snapshots = cluster.data_dir(down).join("snapshots");
    let installing = [("STOCKD_TEST_INSTALL_PAUSE_MS", "600000"), EVERY_100[0]];
    tokio::task::block_in_place(|| cluster.launch_with(down, &installing))
        .expect("the follower restarts");
    let kept = common::eventually(WAIT, || {
        let snapshots = snapshots.clone();
        async move {
            let listed = stockd::storage::snapshot::list(&snapshots).unwrap_or_default();
            listed.first().is_some_and(|(seq, _)| *seq > down_at)
        }
    })
    .await;
    assert!(kept, "the follower keeps the leader's snapshot");
    cluster.nodes.get_mut(&down).unwrap().kill9();
    let installed = stockd::storage::snapshot::list(&snapshots).unwrap();
    println!("purge: killed mid-install, with snapshots {installed:?}");
    let kept_seq = installed[0].0;

    // Restarted, it starts from that snapshot (its recovery says so) and catches up.
    cluster.nodes.remove(&down);
    let logged = [
        ("RUST_LOG", "warn,stockd::cluster::node=info"),
        EVERY_100[0],
    ];
    tokio::task::block_in_place(|| cluster.launch_capturing(down, &logged))
        .expect("the follower restarts");
    let started_from = tokio::task::block_in_place(|| {
        let node = cluster.nodes.get_mut(&down).unwrap();
        node.find_in_stderr(WAIT, |line| {
            let at = line.find("recovered the committed state")?;
            let field = line[at..]
                .split_whitespace()
                .find(|f| f.starts_with("snapshot="))?;
            field["snapshot=".len()..].parse::<u64>().ok()
        })
    });
    assert_eq!(
        started_from,
        Some(kept_seq),
        "it recovers from the kept snapshot"
    );
    assert_same_state(&cluster).await;
    let status = cluster.client(down).get("/v1/cluster").await;
    assert!(
        status.body["snapshot_seq"].as_u64().unwrap() > down_at,
        "it installed a snapshot: {status:?}"
    );
    // Each replenishment once, or (a retry after a 503 whose change was committed) twice.
    let on_hand = Checkout::of(&cluster).product("R").await["on_hand"]
        .as_u64()
        .unwrap();
    let retried = c.retried.load(Ordering::SeqCst) as u64;
    assert!(
        (sent..=sent + retried).contains(&on_hand),
        "{on_hand} after {sent} and {retried} retries"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_is_its_only_voter_keeps_answering_reads() {
    let mut cluster = start(&[1, 2, 3]).await;
    let leader = cluster.serving().await;
    let c = cluster.client(leader).clone();
    assert_eq!(c.create_product("S", 3).await.status, 201);
    let a = c
        .send(
            Method::PUT,
            "/v1/admin/cluster/voters",
            Some(&json!({"voters": [leader]}).to_string()),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{a:?}");
    // The others are no longer members; they stop.
    let others: Vec<u64> = cluster
        .nodes
        .keys()
        .copied()
        .filter(|id| *id != leader)
        .collect();
    for id in others {
        cluster.nodes.remove(&id).unwrap().kill9();
    }
    // Its own majority: past several leases, it still answers reads and changes.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let p = c.get("/v1/products/S").await;
        assert_eq!(p.status, 200, "{p:?}");
    }
    assert_eq!(c.reserve("u", "S", 1).await.status, 201);
    assert_eq!(c.product("S").await["reserved"], 1);
}
