//! The low-stock threshold (`low_stock_threshold`, a product field) and the change feed's
//! `stock.low` and `stock.low_cleared` events, from outside: set on create and by PATCH,
//! validated, driven across by holds, cancels, expiries, replenishment and threshold
//! changes, read back from `GET /v1/events`, and kept across restarts (from the log, and
//! from a snapshot) with no event lost or repeated.

mod common;

use std::time::Duration;

use common::feed::{start_with_feed, Sse};
use common::{eventually, Answer, ChildServer, Client, TestServer};
use reqwest::Method;
use serde_json::{json, Value};

async fn patch(c: &Client, sku: &str, body: Value, headers: &[(&str, &str)]) -> Answer {
    c.send(
        Method::PATCH,
        &format!("/v1/products/{sku}"),
        Some(&body.to_string()),
        headers,
    )
    .await
    .unwrap()
}

async fn cancel(c: &Client, id: &str) {
    let path = format!("/v1/reservations/{id}/cancel");
    let a = c.send(Method::POST, &path, None, &[]).await.unwrap();
    assert_eq!(a.status, 200, "{:?}", a.body);
}

async fn hold(c: &Client, sku: &str, quantity: u64) -> String {
    let a = c.reserve("buyer", sku, quantity).await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    a.body["id"].as_str().unwrap().to_string()
}

/// Waits until the feed holds the events of every record durable now.
async fn feed_caught_up(c: &Client) {
    let target = c.metric("stockd_log_durable_sequence").await;
    let reached = eventually(Duration::from_secs(10), || {
        let c = c.clone();
        async move { c.metric("stockd_events_through_seq").await >= target }
    })
    .await;
    assert!(reached, "the feed did not reach record {target}");
}

/// Every event after `after` that `filter` lets through (all pages).
async fn all_events(c: &Client, filter: &str) -> Vec<Value> {
    feed_caught_up(c).await;
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let a = c
            .get(&format!("/v1/events?after={after}&limit=50{filter}"))
            .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        let page = a.body["events"].as_array().unwrap().clone();
        after = a.body["next_after"].as_u64().unwrap();
        if page.is_empty() {
            return events;
        }
        events.extend(page);
    }
}

/// (type, available, threshold) of each low-stock event.
fn lows(events: &[Value]) -> Vec<(String, u64, Value)> {
    events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_string(),
                e["data"]["products"][0]["available"].as_u64().unwrap(),
                e["data"]["low_stock_threshold"].clone(),
            )
        })
        .collect()
}

fn low(kind: &str, available: u64, threshold: Value) -> (String, u64, Value) {
    (kind.to_string(), available, threshold)
}

#[tokio::test]
async fn stock_crossing_the_threshold_reaches_the_feed_and_survives_a_restart() {
    let ts = start_with_feed().await;
    let c = &ts.client;
    let a = c
        .post(
            "/v1/products",
            json!({"sku": "P", "name": "p", "on_hand": 10, "low_stock_threshold": 3}),
        )
        .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    assert_eq!(a.body["low_stock_threshold"], 3);
    assert_eq!(c.product("P").await["low_stock_threshold"], 3);
    let big = hold(c, "P", 6).await; // 4 available: not low yet
    let one = hold(c, "P", 1).await; // 3: low
    hold(c, "P", 1).await; // 2: still low, nothing
    cancel(c, &one).await; // 3: still low, nothing
    let other = hold(c, "P", 1).await; // 2: still low
    cancel(c, &other).await; // 3
                             // A hold that expires: back above the threshold by the expiry.
    let r = c
        .post(
            "/v1/reservations",
            json!({"customer_id": "late", "items": [{"sku": "P", "quantity": 1}], "ttl_seconds": 1}),
        )
        .await;
    assert_eq!(r.status, 201);
    ts.clock.advance_ms(2_000);
    ts.service().expire_due_now().await.unwrap(); // 3 again: low still
    cancel(c, &big).await; // 9: cleared
                           // Threshold changes alone.
    assert_eq!(
        patch(c, "P", json!({"low_stock_threshold": 9}), &[])
            .await
            .status,
        200
    ); // 9 ≤ 9: low
    let a = patch(c, "P", json!({"low_stock_threshold": null}), &[]).await; // cleared
    assert_eq!(a.body["low_stock_threshold"], Value::Null);
    patch(c, "P", json!({"low_stock_threshold": 8}), &[]).await; // 9 > 8: nothing
    patch(c, "P", json!({"name": "renamed"}), &[]).await; // absent: kept
    assert_eq!(c.product("P").await["low_stock_threshold"], 8);
    let adjust = c.post("/v1/products/P/adjust", json!({"delta": -2})).await; // 7: low
    assert_eq!(adjust.status, 200);
    let replenish = c
        .post("/v1/products/P/replenish", json!({"quantity": 2}))
        .await; // 9: cleared
    assert_eq!(replenish.status, 200);
    // Low and sold out at once: low first, then sold out.
    let all = hold(c, "P", 9).await;

    let filter = "&type=stock.low,stock.low_cleared";
    let events = all_events(c, filter).await;
    assert_eq!(
        lows(&events),
        vec![
            low("stock.low", 3, json!(3)),
            low("stock.low_cleared", 9, json!(3)),
            low("stock.low", 9, json!(9)),
            low("stock.low_cleared", 9, Value::Null),
            low("stock.low", 7, json!(8)),
            low("stock.low_cleared", 9, json!(8)),
            low("stock.low", 0, json!(8)),
        ]
    );
    assert!(events.iter().all(|e| e["subject"] == "P"));
    // In the whole feed: a derived event right after its record's own, low then sold out.
    let everything = all_events(c, "").await;
    let at = everything
        .iter()
        .position(|e| e["type"] == "stock.low")
        .unwrap();
    assert_eq!(everything[at - 1]["type"], "reservation.created");
    assert_eq!(
        everything[at]["id"],
        format!("{}.1", everything[at - 1]["seq"])
    );
    let tail: Vec<&str> = everything[everything.len() - 3..]
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(tail, ["reservation.created", "stock.low", "stock.sold_out"]);

    // A restart (the snapshot at shutdown, then the log after it): the threshold is
    // kept, the feed neither repeats nor loses an event, and the next crossing is derived
    // from the threshold recovered.
    let ts = ts.restart().await;
    let c = &ts.client;
    assert_eq!(c.product("P").await["low_stock_threshold"], 8);
    assert_eq!(all_events(c, "").await, everything);
    cancel(c, &all).await; // 9: back in stock, then cleared
    let after: Vec<Value> = all_events(c, "").await[everything.len()..].to_vec();
    let kinds: Vec<&str> = after.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "reservation.cancelled",
            "stock.back_in_stock",
            "stock.low_cleared"
        ]
    );
    assert_eq!(after[2]["data"]["low_stock_threshold"], 8);
    // Filters by SKU and type take the new types like the others.
    let only = all_events(c, "&type=stock.low_cleared&sku=P").await;
    assert_eq!(only.len(), 4);
    ts.stop().await;
}

#[tokio::test]
async fn a_bad_threshold_is_422_naming_it_and_changes_nothing() {
    let ts = TestServer::start().await;
    let c = &ts.client;
    let bad = [
        json!(-1),
        json!(1.5),
        json!("3"),
        json!(true),
        json!({}),
        json!(9_007_199_254_740_992u64), // 2^53: past every stock figure
        json!(18_446_744_073_709_551_615u64),
    ];
    for value in &bad {
        let a = c
            .post(
                "/v1/products",
                json!({"sku": "V", "name": "v", "low_stock_threshold": value}),
            )
            .await;
        a.assert_problem(422, "validation_failed");
        assert_eq!(a.body["field"], "low_stock_threshold", "{value}");
        assert_eq!(c.get("/v1/products/V").await.status, 404, "{value}");
    }
    let a = c
        .post(
            "/v1/products",
            json!({"sku": "V", "name": "v", "on_hand": 4, "low_stock_threshold": null}),
        )
        .await;
    assert_eq!(a.status, 201);
    assert_eq!(a.body["low_stock_threshold"], Value::Null, "null: none");
    let before = c.product("V").await;
    for value in &bad {
        let a = patch(c, "V", json!({"low_stock_threshold": value}), &[]).await;
        a.assert_problem(422, "validation_failed");
        assert_eq!(a.body["field"], "low_stock_threshold", "{value}");
        // Nothing changed, the other fields of the same body included.
        let a = patch(
            c,
            "V",
            json!({"name": "changed", "low_stock_threshold": value}),
            &[],
        )
        .await;
        a.assert_problem(422, "validation_failed");
    }
    assert_eq!(c.product("V").await, before);
    // If-Match as for every other field: a stale version changes nothing.
    let a = patch(
        c,
        "V",
        json!({"low_stock_threshold": 2}),
        &[("if-match", "\"7\"")],
    )
    .await;
    a.assert_problem(412, "version_mismatch");
    assert_eq!(c.product("V").await, before);
    let a = patch(
        c,
        "V",
        json!({"low_stock_threshold": 0}),
        &[("if-match", "\"1\"")],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["low_stock_threshold"], 0, "0 is a threshold");
    assert_eq!(a.body["version"], 2);
    assert_eq!(a.header("etag"), Some("\"2\""));
    // The largest figure is accepted.
    let a = patch(
        c,
        "V",
        json!({"low_stock_threshold": 9_007_199_254_740_991u64}),
        &[],
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["low_stock_threshold"], 9_007_199_254_740_991u64);
    let page = c.get("/v1/products").await;
    assert_eq!(
        page.body["items"][0]["low_stock_threshold"], 9_007_199_254_740_991u64,
        "in every product view"
    );
    ts.stop().await;
}

/// The real binary, killed with SIGKILL: a threshold set by create and by PATCH (and one
/// cleared) comes back from the log's replay, then from a snapshot alone; the feed goes on
/// from it with no event lost or repeated.
#[tokio::test]
async fn the_threshold_survives_log_replay_and_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::spawn(dir.path(), &["--events", "on"]);
    let c = server.client.clone();
    let a = c
        .post(
            "/v1/products",
            json!({"sku": "A", "name": "a", "on_hand": 5, "low_stock_threshold": 3}),
        )
        .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    c.create_product("B", 5).await;
    c.create_product("C", 5).await;
    assert_eq!(
        patch(&c, "B", json!({"low_stock_threshold": 7}), &[])
            .await
            .status,
        200
    ); // B low
    patch(&c, "C", json!({"low_stock_threshold": 1}), &[]).await;
    patch(&c, "C", json!({"low_stock_threshold": null}), &[]).await;
    let thresholds = |c: Client| async move {
        let mut out = Vec::new();
        for sku in ["A", "B", "C"] {
            out.push(c.product(sku).await["low_stock_threshold"].clone());
        }
        out
    };
    let expected = vec![json!(3), json!(7), Value::Null];
    assert_eq!(thresholds(c.clone()).await, expected);
    feed_caught_up(&c).await;
    server.kill9();
    drop(server);

    // From the log alone (no snapshot was taken).
    let mut server = ChildServer::spawn(dir.path(), &["--events", "on"]);
    let c = server.client.clone();
    assert_eq!(c.metric("stockd_snapshot_sequence").await, 0.0);
    assert_eq!(thresholds(c.clone()).await, expected);
    hold(&c, "A", 2).await; // 3: low, from the replayed threshold
    let a = c.post("/v1/admin/snapshot", json!({})).await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    let before_kill = all_events(&c, "").await;
    server.kill9();
    drop(server);

    // From the snapshot: nothing was logged after it.
    let server = ChildServer::spawn(dir.path(), &["--events", "on"]);
    let c = server.client.clone();
    assert!(c.metric("stockd_snapshot_sequence").await > 0.0);
    assert_eq!(
        c.metric("stockd_snapshot_sequence").await,
        c.metric("stockd_log_durable_sequence").await
    );
    assert_eq!(thresholds(c.clone()).await, expected);
    let a = c
        .post("/v1/products/B/replenish", json!({"quantity": 3}))
        .await; // 8 > 7: cleared, from the threshold in the snapshot
    assert_eq!(a.status, 200);
    let events = all_events(&c, "").await;
    assert_eq!(
        events[..before_kill.len()],
        before_kill[..],
        "nothing repeated"
    );
    let new: Vec<&str> = events[before_kill.len()..]
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(new, ["stock.replenished", "stock.low_cleared"]);
    let lows: Vec<(String, String)> = events
        .iter()
        .filter(|e| e["type"].as_str().unwrap().starts_with("stock.low"))
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_string(),
                e["subject"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let pair = |k: &str, s: &str| (k.to_string(), s.to_string());
    assert_eq!(
        lows,
        vec![
            pair("stock.low", "B"),
            pair("stock.low", "A"),
            pair("stock.low_cleared", "B"),
        ]
    );
}

/// A live reader that reconnects with `Last-Event-ID`, between a `stock.low` and the
/// `stock.sold_out` of the same record, and again across a restart, gets each derived
/// event once, in order.
#[tokio::test]
async fn a_live_reader_resumes_between_low_and_sold_out_and_across_a_restart() {
    let ts = start_with_feed().await;
    let c = &ts.client;
    let a = c
        .post(
            "/v1/products",
            json!({"sku": "Q", "name": "q", "on_hand": 3, "low_stock_threshold": 1}),
        )
        .await;
    assert_eq!(a.status, 201);
    let query = "?type=stock.low,stock.low_cleared,stock.sold_out,stock.back_in_stock";
    let mut live = Sse::open(&c.base, query, None).await;
    let id = hold(c, "Q", 3).await; // low and sold out at once
    let short = Duration::from_secs(10);
    let low = live.next_id_and_type(short).await.expect("stock.low, live");
    assert_eq!(low.1, "stock.low");
    drop(live);
    cancel(c, &id).await; // back in stock, cleared: while nobody listens
    let mut live = Sse::open(&c.base, query, Some(&low.0)).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(live.next_id_and_type(short).await.expect("resumed"));
    }
    let seq = low.0.split('.').next().unwrap().to_string();
    assert_eq!(got[0], (format!("{seq}.2"), "stock.sold_out".to_string()));
    let kinds: Vec<&str> = got.iter().map(|(_, k)| k.as_str()).collect();
    assert_eq!(
        kinds,
        ["stock.sold_out", "stock.back_in_stock", "stock.low_cleared"]
    );
    assert_eq!(
        live.next_id_and_type(Duration::from_millis(300)).await,
        None,
        "no more"
    );
    drop(live);
    // Across a restart: resumed after the sold-out, the rest comes once more, and then
    // what the recovered threshold makes of new changes.
    let ts = ts.restart().await;
    let c = &ts.client;
    hold(c, "Q", 2).await; // 1 left: low again
    let mut live = Sse::open(&c.base, query, Some(&got[0].0)).await;
    let mut again = Vec::new();
    for _ in 0..3 {
        again.push(
            live.next_id_and_type(short)
                .await
                .expect("resumed after the restart"),
        );
    }
    assert_eq!(again[..2], got[1..]);
    assert_eq!(again[2].1, "stock.low");
    assert_eq!(
        live.next_id_and_type(Duration::from_millis(300)).await,
        None,
        "no more"
    );
    drop(live);
    ts.stop().await;
}
