//! The change feed on a cluster (`common::cluster`: three real `stockd serve` processes on
//! loopback, each with `--events on`): every node keeps the feed of the committed log at
//! the same positions, so a reader that resumes on a new leader after `kill -9` of the old
//! one, with the last position it read, misses nothing and reads nothing twice. Webhooks
//! are refused on a cluster. Every wait is bounded and waits for a state.

mod common;

use std::collections::BTreeSet;
use std::time::Instant;

use common::cluster::{Checkout, Cluster, WAIT};
use reqwest::Method;
use serde_json::{json, Value};

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

fn ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_reader_resumes_on_the_new_leader_after_kill_9_missing_nothing() {
    let env = [("STOCKD_EVENTS", "on")];
    let mut cluster = tokio::task::spawn_blocking(move || Cluster::start_with(&[1, 2, 3], &env))
        .await
        .unwrap();
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

    // Webhooks are refused on a cluster, with a problem that says why.
    let a = c
        .send(
            Method::POST,
            "/v1/webhooks",
            Some(&json!({"url": "http://127.0.0.1:9/hook"})),
            None,
        )
        .await;
    assert_eq!(a.status, 501, "{a:?}");
    assert_eq!(a.code(), "webhooks_unavailable", "{a:?}");

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
