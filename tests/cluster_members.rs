//! Membership changes through the admin API on real `stockd serve` processes on loopback
//! (`common::cluster`): a cluster of three grows to five (two new nodes started on empty
//! data directories, added as learners, then made voters) and shrinks back to three,
//! leaving out its leader, while a checkout keeps reserving through it. Nothing
//! acknowledged is lost, and the three that remain hold the same state.
//!
//! Every wait is bounded and waits for a state; times are printed, never asserted.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{fits, leader_of, no_redirects, Checkout, Cluster, WAIT};
use common::Client;
use reqwest::Method;
use serde_json::{json, Value};

/// The body that adds node `id` as a learner, at its own addresses.
fn learner(cluster: &Cluster, id: u64) -> Value {
    json!({"id": id, "api": cluster.addrs[&id].api, "raft": cluster.addrs[&id].raft})
}

/// The members a status lists: id → voter.
fn members(status: &Value) -> BTreeMap<u64, bool> {
    status["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| (m["id"].as_u64().unwrap(), m["voter"].as_bool().unwrap()))
        .collect()
}

/// Waits until every running node agrees on the leader and lists exactly `expected` as
/// members (id → voter). Returns the statuses.
async fn agree_on_members(
    cluster: &Cluster,
    expected: &BTreeMap<u64, bool>,
) -> BTreeMap<u64, Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let statuses = cluster.agreed().await;
        if statuses.values().all(|s| &members(s) == expected) {
            return statuses;
        }
        assert!(
            Instant::now() < deadline,
            "every node lists the members {expected:?} within {WAIT:?}: {statuses:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the checkout acknowledged: idempotency key → reservation id.
type Acked = Arc<std::sync::Mutex<BTreeMap<String, String>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_grow_to_five_and_shrink_to_three_without_the_leader_under_load() {
    const STOCK: u64 = 100_000;
    let mut cluster = tokio::task::spawn_blocking(|| Cluster::start_sized(5, &[1, 2, 3], &[]))
        .await
        .unwrap();
    let first = cluster.serving().await;
    let c = Checkout::of(&cluster);
    let a = c
        .send(
            Method::POST,
            "/v1/products",
            Some(&json!({"sku": "M", "name": "M", "on_hand": STOCK})),
            None,
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");

    // A checkout reserving one unit at a time, each with its own key, until stopped;
    // through every node there is, old and new (the new ones redirect to the leader).
    let acked: Acked = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (acked, stop) = (acked.clone(), stop.clone());
        let addrs = cluster.addrs.clone();
        tokio::spawn(async move {
            let c = Checkout {
                nodes: addrs
                    .values()
                    .map(|a| Client::new(format!("http://{}", a.api)))
                    .collect(),
                patience: WAIT,
                retried: Arc::default(),
            };
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let key = format!("m-{n}");
                let body = json!({"customer_id": format!("buyer-{n}"), "items": [{"sku": "M", "quantity": 1}], "ttl_seconds": 3600});
                let a = c
                    .send(Method::POST, "/v1/reservations", Some(&body), Some(&key))
                    .await;
                assert_eq!(a.status, 201, "{key}: {a:?}");
                let id = a.body["id"].as_str().unwrap().to_string();
                acked.lock().unwrap().insert(key, id);
                n += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let acked_now = || acked.lock().unwrap().len();

    // Nodes 4 and 5 start on empty data directories, and wait for the leader.
    for id in [4, 5] {
        let started = tokio::task::block_in_place(|| cluster.launch(id));
        started.unwrap_or_else(|e| panic!("node {id} starts: {e}"));
        let s = cluster.client(id).get("/v1/cluster").await;
        assert_eq!(s.status, 200, "{s:?}");
        assert_eq!(
            (&s.body["cluster_id"], &s.body["leader"], &s.body["members"]),
            (&Value::Null, &Value::Null, &json!([])),
            "a new node, before it is added: {s:?}"
        );
    }

    // Refusals, on the live cluster, change nothing. (The client follows a 307, should
    // the leadership have moved.)
    let leader = first;
    let admin = cluster.client(leader).clone();
    let put = |body: Value| {
        let admin = admin.clone();
        async move {
            admin
                .send(
                    Method::PUT,
                    "/v1/admin/cluster/voters",
                    Some(&body.to_string()),
                    &[],
                )
                .await
                .unwrap()
        }
    };
    let a = put(json!({"voters": [1, 2, 3, 4]})).await;
    a.assert_problem(422, "validation_failed");
    assert_eq!(a.body["field"], "voters");
    assert!(
        a.body["detail"].as_str().unwrap().contains("learner first"),
        "{a:?}"
    );
    put(json!({"voters": []}))
        .await
        .assert_problem(422, "validation_failed");
    let a = admin
        .post("/v1/admin/cluster/learners", learner(&cluster, 2))
        .await;
    a.assert_problem(409, "membership_conflict");
    let a = admin
        .post(
            "/v1/admin/cluster/learners",
            json!({"id": 4, "api": cluster.addrs[&1].api, "raft": cluster.addrs[&4].raft}),
        )
        .await;
    a.assert_problem(422, "validation_failed");
    assert_eq!(a.body["field"], "api");
    // A follower sends the change to its leader, like any change.
    let follower = *cluster
        .nodes
        .keys()
        .find(|id| **id != leader && **id <= 3)
        .unwrap();
    let res = no_redirects()
        .post(format!(
            "{}/v1/admin/cluster/learners",
            cluster.client(follower).base
        ))
        .json(&learner(&cluster, 4))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 307);
    let to: u64 = res.headers()["stockd-leader"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        res.headers()["location"].to_str().unwrap(),
        format!(
            "http://{}/v1/admin/cluster/learners",
            cluster.addrs[&to].api
        )
    );
    let founders: BTreeMap<u64, bool> = [(1, true), (2, true), (3, true)].into();
    assert_eq!(members(&admin.get("/v1/cluster").await.body), founders);

    // Grow: 4 and 5 as learners (each answered once it has caught up), then voters.
    let grow = Instant::now();
    let before = acked_now();
    let mut expected = founders.clone();
    for id in [4, 5] {
        let a = c
            .post("/v1/admin/cluster/learners", learner(&cluster, id))
            .await;
        assert_eq!(a.status, 200, "{a:?}");
        fits("Cluster", &a.body);
        expected.insert(id, false);
        assert_eq!(members(&a.body), expected, "{a:?}");
        println!(
            "members: node {id} added as a learner after {:?}",
            grow.elapsed()
        );
    }
    // A learner follows the leader, and lists itself as no voter.
    let statuses = agree_on_members(&cluster, &expected).await;
    assert_eq!(statuses[&4]["role"], "follower", "{statuses:#?}");
    assert!(
        statuses[&4]["cluster_id"].is_string()
            && statuses[&4]["cluster_id"] == statuses[&1]["cluster_id"]
    );
    // A learner removed, then added again (its node still runs on its directory).
    let a = admin
        .send(Method::DELETE, "/v1/admin/cluster/learners/5", None, &[])
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{a:?}");
    let mut without = expected.clone();
    without.remove(&5);
    assert_eq!(members(&a.body), without, "{a:?}");
    let running_five = cluster.nodes.remove(&5).unwrap();
    agree_on_members(&cluster, &without).await;
    cluster.nodes.insert(5, running_five);
    for (path, code) in [
        ("/v1/admin/cluster/learners/5", "membership_conflict"),
        ("/v1/admin/cluster/learners/2", "membership_conflict"),
        ("/v1/admin/cluster/learners/x", "validation_failed"),
    ] {
        let a = admin.send(Method::DELETE, path, None, &[]).await.unwrap();
        a.assert_problem(
            if code == "validation_failed" {
                422
            } else {
                409
            },
            code,
        );
    }
    let a = c
        .post("/v1/admin/cluster/learners", learner(&cluster, 5))
        .await;
    assert_eq!(
        (a.status.as_u16(), members(&a.body)),
        (200, expected.clone()),
        "{a:?}"
    );
    agree_on_members(&cluster, &expected).await;
    // Adding it again with the same addresses only waits for it.
    let a = c
        .post("/v1/admin/cluster/learners", learner(&cluster, 4))
        .await;
    assert_eq!(
        (a.status.as_u16(), members(&a.body)),
        (200, expected.clone()),
        "{a:?}"
    );

    let a = c
        .send(
            Method::PUT,
            "/v1/admin/cluster/voters",
            Some(&json!({"voters": [1, 2, 3, 4, 5]})),
            None,
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    fits("Cluster", &a.body);
    let five: BTreeMap<u64, bool> = (1..=5).map(|id| (id, true)).collect();
    assert_eq!(members(&a.body), five, "{a:?}");
    let statuses = agree_on_members(&cluster, &five).await;
    println!(
        "members: five voters agreed {:?} after the first add; {} holds acknowledged meanwhile",
        grow.elapsed(),
        acked_now() - before
    );
    // A voter now: a new node is no learner to add.
    c.post("/v1/admin/cluster/learners", learner(&cluster, 5))
        .await
        .assert_problem(409, "membership_conflict");

    // Shrink to three, leaving out the leader and another founder: the new nodes and one
    // founder remain.
    let leader = leader_of(&statuses);
    let kept_founder = *[1, 2, 3].iter().find(|id| **id != leader).unwrap();
    let keep: Vec<u64> = vec![kept_founder, 4, 5];
    let removed: Vec<u64> = (1..=5).filter(|id| !keep.contains(id)).collect();
    assert!(removed.contains(&leader));
    let shrink = Instant::now();
    let before = acked_now();
    let a = c
        .send(
            Method::PUT,
            "/v1/admin/cluster/voters",
            Some(&json!({"voters": keep})),
            None,
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    let three: BTreeMap<u64, bool> = keep.iter().map(|id| (*id, true)).collect();
    assert_eq!(members(&a.body), three, "{a:?}");
    // The leader left out hands the leadership to one of the three.
    let kept = keep.clone();
    let handed = common::eventually(WAIT, || {
        let nodes: Vec<Client> = kept.iter().map(|id| cluster.client(*id).clone()).collect();
        let kept = kept.clone();
        async move {
            for node in &nodes {
                let s = node.get("/v1/cluster").await;
                if !s.body["leader"].as_u64().is_some_and(|l| kept.contains(&l)) {
                    return false;
                }
            }
            true
        }
    })
    .await;
    assert!(handed, "the three that remain know a leader among them");
    println!(
        "members: a leader among {keep:?} {:?} after the request",
        shrink.elapsed()
    );
    // The removed nodes are stopped, as an operator would once the change is answered.
    for id in &removed {
        cluster.nodes.remove(id).unwrap().kill9();
    }
    let statuses = agree_on_members(&cluster, &three).await;
    let new_leader = leader_of(&statuses);
    assert!(keep.contains(&new_leader), "{statuses:#?}");
    let serving = cluster.serving().await;
    // The checkout keeps being served by the new leader.
    let until = Instant::now() + WAIT;
    let after_change = acked_now();
    while acked_now() < after_change + 5 {
        assert!(
            Instant::now() < until,
            "holds acknowledged after the shrink within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "members: shrunk to {keep:?} (left out {removed:?}, leader {leader}); node {serving} \
         serves {:?} after the request; {} holds acknowledged meanwhile",
        shrink.elapsed(),
        acked_now() - before
    );
    stop.store(true, Ordering::SeqCst);
    load.await.expect("the checkout");

    // Every acknowledged hold is there, once; nothing else was held.
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 10, "{}", acked.len());
    let c = Checkout::of(&cluster);
    let ids: BTreeSet<&String> = acked.values().collect();
    assert_eq!(ids.len(), acked.len(), "one reservation per key");
    for id in &ids {
        let r = c
            .send(Method::GET, &format!("/v1/reservations/{id}"), None, None)
            .await;
        assert_eq!(r.body["status"], "pending", "{r:?}");
    }
    let p = c.send(Method::GET, "/v1/products/M", None, None).await;
    assert_eq!(
        (p.body["on_hand"].as_u64(), p.body["reserved"].as_u64()),
        (Some(STOCK), Some(acked.len() as u64)),
        "every acknowledged hold, and only those: {p:?}"
    );
    // A retry of an acknowledged key replays it.
    let (key, id) = acked.iter().next().unwrap();
    let n = &key[2..];
    let body = json!({"customer_id": format!("buyer-{n}"), "items": [{"sku": "M", "quantity": 1}], "ttl_seconds": 3600});
    let a = c
        .send(Method::POST, "/v1/reservations", Some(&body), Some(key))
        .await;
    assert_eq!(
        (a.status.as_u16(), a.body["id"].as_str()),
        (201, Some(id.as_str())),
        "{a:?}"
    );
    assert_eq!(a.header("idempotent-replayed"), Some("true"));

    // The three that remain hold the same state at the same position.
    let (at, digests) = cluster.digests().await;
    assert_eq!(digests.keys().copied().collect::<Vec<_>>(), keep);
    let one = digests.values().next().unwrap();
    assert!(
        digests.values().all(|d| d == one),
        "the same state on every node at {at}: {digests:?}"
    );
    println!(
        "members: {} holds acknowledged in all, the founder {first} led first",
        acked.len()
    );
}
