//! The change feed on a cluster (`common::cluster`: three real `stockd serve` processes on
//! loopback, each with `--events on`): every node keeps the feed of the committed log at
//! the same positions, so a reader that resumes on a new leader after `kill -9` of the old
//! one, with the last position it read, misses nothing and reads nothing twice. Webhooks
//! registered on a leader are replicated, with their positions: the next leader delivers
//! from where the last one stopped, every event at least once. Every wait is bounded and
//! waits for a state.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::cluster::{Checkout, Cluster, WAIT};
use reqwest::Method;
use serde_json::{json, Value};
use warp::Filter as _;

/// Every event after `after`, page by page, through any node; and the feed's
/// `next_after` at its end.
async fn events_after(c: &Checkout, after: u64) -> (Vec<Value>, u64) {
    let mut events = Vec::new();
    let mut cursor = after;
    loop {
        let a = c
            .get(&format!("/v1/events?after={cursor}&limit=1000"))
            .await;
        assert_eq!(a.status, 200, "{a:?}");
        let page = a.body["events"].as_array().unwrap().clone();
        let next = a.body["next_after"].as_u64().unwrap();
        if page.is_empty() {
            return (events, next.max(cursor));
        }
        events.extend(page);
        cursor = next;
    }
}

/// `events_after`, once the feed holds at least `types` (in that order, among others).
async fn until_told(c: &Checkout, after: u64, types: &[&str]) -> (Vec<Value>, u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (events, next) = events_after(c, after).await;
        let told: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        let mut wanted = types.iter().peekable();
        for t in &told {
            if wanted.peek() == Some(&t) {
                wanted.next();
            }
        }
        if wanted.peek().is_none() {
            return (events, next);
        }
        assert!(
            Instant::now() < deadline,
            "the feed tells {types:?} within {WAIT:?}: {told:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Every node's environment here: the change feed on.
const EVENTS_ON: &[(&str, &str)] = &[("STOCKD_EVENTS", "on")];

fn ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_reader_resumes_on_the_new_leader_after_kill_9_missing_nothing() {
    let mut cluster = Cluster::three_with(EVENTS_ON).await;
    let leader = cluster.serving().await;
    let c = Checkout::of(&cluster);
    c.create("F", 10).await;
    for n in 0..3 {
        let a = c
            .reserve(
                &format!("customer-{n}"),
                json!([{"sku": "F", "quantity": 2}]),
                &format!("feed-{n}"),
            )
            .await;
        assert_eq!(a.status, 201, "{a:?}");
    }
    let (before, read_to) = until_told(
        &c,
        0,
        &[
            "product.created",
            "reservation.created",
            "reservation.created",
            "reservation.created",
        ],
    )
    .await;

    cluster.nodes.remove(&leader).unwrap().kill9();
    cluster.serving().await;
    let c = Checkout::of(&cluster);
    let a = c
        .post("/v1/products/F/replenish", json!({"quantity": 5}))
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    c.create("G", 1).await;

    // Resumed where the reader stopped: what was committed after it, and nothing else.
    let (after, _) = until_told(&c, read_to, &["stock.replenished", "product.created"]).await;
    assert_eq!(
        after.len(),
        2,
        "only the changes made after the kill: {after:#?}"
    );
    // From the start: what the old leader told, exactly, then the rest.
    let (whole, _) = events_after(&c, 0).await;
    assert_eq!(
        whole[..before.len()],
        before[..],
        "the new leader tells what the old one told"
    );
    assert_eq!(ids(&whole[before.len()..]), ids(&after));
    let unique: BTreeSet<String> = ids(&whole).into_iter().collect();
    assert_eq!(unique.len(), whole.len(), "no event twice");
}

/// A webhook receiver on 127.0.0.1:0 that answers 204 and keeps each delivery's
/// `webhook-id`, or, while `refusing`, answers 503 and counts the attempt; stopped when
/// dropped.
struct Receiver {
    addr: SocketAddr,
    ids: Arc<Mutex<Vec<String>>>,
    refusing: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start() -> Receiver {
        let ids: Arc<Mutex<Vec<String>>> = Arc::default();
        let refusing: Arc<AtomicBool> = Arc::default();
        let refused: Arc<AtomicUsize> = Arc::default();
        let route = warp::post().and(warp::header::<String>("webhook-id")).map({
            let (ids, refusing, refused) = (ids.clone(), refusing.clone(), refused.clone());
            move |id: String| {
                if refusing.load(Ordering::SeqCst) {
                    refused.fetch_add(1, Ordering::SeqCst);
                    return warp::http::StatusCode::SERVICE_UNAVAILABLE;
                }
                ids.lock().unwrap().push(id);
                warp::http::StatusCode::NO_CONTENT
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(warp::serve(route).incoming(listener).run());
        Receiver {
            addr,
            ids,
            refusing,
            refused,
            task,
        }
    }

    fn ids(&self) -> Vec<String> {
        self.ids.lock().unwrap().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until the receiver has had every one of `ids`; returns what it had.
async fn until_delivered(receiver: &Receiver, ids: &[String]) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = receiver.ids();
        let had: BTreeSet<&String> = got.iter().collect();
        if ids.iter().all(|id| had.contains(id)) {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{ids:?} delivered within {WAIT:?}; got {got:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_replicated_and_the_next_leader_delivers_from_their_position() {
    let mut cluster = Cluster::three_with(EVENTS_ON).await;
    let leader = cluster.serving().await;
    let receiver = Receiver::start().await;
    let c = Checkout::of(&cluster);
    let url = format!("http://{}/hook", receiver.addr);
    let a = c
        .send(
            Method::POST,
            "/v1/webhooks",
            Some(&json!({"url": url})),
            None,
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let id = a.body["id"].as_str().unwrap().to_string();
    let after = a.body["started_after_seq"].as_u64().unwrap();
    assert!(
        after > 0,
        "it starts after what was committed before: {a:?}"
    );
    c.create("W", 10).await;
    for n in 0..3 {
        let a = c
            .reserve(
                &format!("customer-{n}"),
                json!([{"sku": "W", "quantity": 1}]),
                &format!("hook-{n}"),
            )
            .await;
        assert_eq!(a.status, 201, "{a:?}");
    }
    let (told, _) = until_told(&c, after, &["product.created", "reservation.created"]).await;
    until_delivered(&receiver, &ids(&told)).await;

    // The leader is killed; the next one knows the endpoint, and delivers what follows.
    cluster.nodes.remove(&leader).unwrap().kill9();
    cluster.serving().await;
    let c = Checkout::of(&cluster);
    let a = c.get(&format!("/v1/webhooks/{id}")).await;
    assert_eq!(a.status, 200, "the registration was replicated: {a:?}");
    assert_eq!(a.body["url"], url.as_str());
    let a = c
        .post("/v1/products/W/replenish", json!({"quantity": 5}))
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    let (told, _) = until_told(&c, after, &["product.created", "stock.replenished"]).await;
    let got = until_delivered(&receiver, &ids(&told)).await;
    // At least once, in feed order: each event first arrives after the ones before it.
    let mut first_seen: Vec<&String> = Vec::new();
    for id in &got {
        if !first_seen.contains(&id) {
            first_seen.push(id);
        }
    }
    let expected = ids(&told);
    assert_eq!(
        first_seen,
        expected.iter().collect::<Vec<_>>(),
        "every event once at least, in feed order: {got:?}"
    );
    println!(
        "webhooks: {} events, {} deliveries across the failover",
        expected.len(),
        got.len()
    );

    // The killed node comes back; the serving leader stops gracefully: its last positions
    // are committed as its epoch ends, so the next leader sends nothing twice. Meanwhile
    // the receiver refuses everything: the next leader's view can only show a position
    // it was handed, and any repeat would be an attempt.
    let killed = leader;
    tokio::task::block_in_place(|| cluster.launch_with(killed, EVENTS_ON))
        .expect("the killed node restarts");
    cluster.caught_up().await;
    receiver.refusing.store(true, Ordering::SeqCst);
    let second = cluster.serving().await;
    let stopped = cluster.nodes.remove(&second).unwrap();
    tokio::task::spawn_blocking(move || {
        let mut stopped = stopped;
        stopped.terminate()
    })
    .await
    .unwrap();
    cluster.serving().await;
    let c = Checkout::of(&cluster);
    let a = c.get(&format!("/v1/webhooks/{id}")).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        a.body["position"].as_str(),
        expected.last().map(String::as_str),
        "the last position was committed: {a:?}"
    );
    assert_eq!(a.body["failures"], 0, "nothing was sent again: {a:?}");
    assert_eq!(receiver.refused.load(Ordering::SeqCst), 0);
    receiver.refusing.store(false, Ordering::SeqCst);
    let delivered = receiver.ids().len();
    let a = c
        .post("/v1/products/W/replenish", json!({"quantity": 1}))
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    let (told, _) = until_told(
        &c,
        after,
        &["product.created", "stock.replenished", "stock.replenished"],
    )
    .await;
    let newest = ids(&told[expected.len()..]);
    until_delivered(&receiver, &newest).await;
    assert_eq!(
        receiver.ids()[delivered..],
        newest[..],
        "only the new events after a graceful change of leader"
    );

    // The new leader removes it for good.
    let a = c
        .send(Method::DELETE, &format!("/v1/webhooks/{id}"), None, None)
        .await;
    assert_eq!(a.status, 204, "{a:?}");
    let a = c.get(&format!("/v1/webhooks/{id}")).await;
    assert_eq!(a.status, 404, "{a:?}");
}
