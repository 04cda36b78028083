//! The change feed, `GET /v1/events`, from outside: pages and filters, every event type
//! from the API call that makes it, live Server-Sent Events and their resumption, a slow
//! reader dropped without slowing reservations, retention's 410, `kill -9` without a gap
//! or a duplicate, and a data directory written before the feed existed.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::feed::{start_with_feed, with_feed, Sse};
use common::{eventually, ChildServer, Client, TestServer, START_MS};
use serde_json::{json, Value};
use stockd::clock::ManualClock;
use stockd::Durability;

/// The feed is off by default: these servers turn it on.
/// Every event after `after` (all pages), with the `next_after` of the last page.
async fn all_events(c: &Client, after: u64, filter: &str) -> (Vec<Value>, u64) {
    let mut events = Vec::new();
    let mut after = after;
    loop {
        let a = c
            .get(&format!("/v1/events?after={after}&limit=3{filter}"))
            .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        let page = a.body["events"].as_array().unwrap().clone();
        let next = a.body["next_after"].as_u64().unwrap();
        assert!(next >= after);
        if page.is_empty() {
            return (events, next);
        }
        events.extend(page);
        after = next;
    }
}

/// Waits until the feed holds the events of every record durable now (the projector
/// follows the log every few milliseconds).
async fn feed_caught_up(c: &Client) {
    let target = c.metric("stockd_log_durable_sequence").await;
    let reached = eventually(Duration::from_secs(10), || {
        let c = c.clone();
        async move { c.metric("stockd_events_through_seq").await >= target }
    })
    .await;
    assert!(reached, "the feed did not reach record {target}");
}

fn types(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect()
}

/// `data.products[0]` figures: (on_hand, reserved, available, sold).
fn figures(e: &Value) -> (u64, u64, u64, u64) {
    let p = &e["data"]["products"][0];
    let n = |k: &str| p[k].as_u64().unwrap();
    (n("on_hand"), n("reserved"), n("available"), n("sold"))
}

/// Cancels reservation `id`; its answer.
async fn cancel(c: &Client, id: &str) -> common::Answer {
    let path = format!("/v1/reservations/{id}/cancel");
    c.send(reqwest::Method::POST, &path, None, &[])
        .await
        .unwrap()
}

#[tokio::test]
async fn every_change_gives_its_event_in_log_order_with_its_figures() {
    let ts = start_with_feed().await;
    let c = &ts.client;
    c.create_product("A", 2).await;
    assert_eq!(
        c.post("/v1/products/A/replenish", json!({"quantity": 3}))
            .await
            .status,
        200
    );
    let adjust = json!({"delta": -1, "reason": "damaged"});
    assert_eq!(c.post("/v1/products/A/adjust", adjust).await.status, 200);
    let patch = c
        .send(
            reqwest::Method::PATCH,
            "/v1/products/A",
            Some(r#"{"name":"Renamed"}"#),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(patch.status, 200);
    let r = c.reserve("buyer-1", "A", 4).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    let extend = json!({"ttl_seconds": 900});
    let extended = c
        .post(&format!("/v1/reservations/{id}/extend"), extend)
        .await;
    assert_eq!(extended.status, 200);
    let confirm = json!({"order_id": "order-1"});
    let confirmed = c
        .post(&format!("/v1/reservations/{id}/confirm"), confirm)
        .await;
    assert_eq!(confirmed.status, 200);
    c.create_product("B", 1).await;
    let r = c.reserve("buyer-2", "B", 1).await;
    let cancelled_id = r.body["id"].as_str().unwrap().to_string();
    assert_eq!(cancel(c, &cancelled_id).await.status, 200);
    // An expiry: the hold's deadline passes on the server's clock.
    let r = c
        .post(
            "/v1/reservations",
            json!({"customer_id": "buyer-3", "items": [{"sku": "B", "quantity": 1}], "ttl_seconds": 1}),
        )
        .await;
    assert_eq!(r.status, 201);
    let expired_id = r.body["id"].as_str().unwrap().to_string();
    ts.clock.advance_ms(2_000);
    ts.service().expire_due_now().await.unwrap();
    let deleted = c
        .send(reqwest::Method::DELETE, "/v1/products/B", None, &[])
        .await
        .unwrap();
    assert_eq!(deleted.status, 204);
    feed_caught_up(c).await;

    let (events, next_after) = all_events(c, 0, "").await;
    assert_eq!(
        types(&events),
        [
            "product.created",
            "stock.replenished",
            "stock.adjusted",
            "product.updated",
            "reservation.created",
            "stock.sold_out",
            "reservation.extended",
            "reservation.confirmed",
            "product.created",
            "reservation.created",
            "stock.sold_out",
            "reservation.cancelled",
            "stock.back_in_stock",
            "reservation.created",
            "stock.sold_out",
            "reservation.expired",
            "stock.back_in_stock",
            "product.deleted",
        ]
    );
    // Log order, each event once; derived events share their record's seq.
    let positions: Vec<(u64, String)> = events
        .iter()
        .map(|e| (e["seq"].as_u64().unwrap(), e["id"].as_str().unwrap().into()))
        .collect();
    let unique: BTreeSet<_> = positions.iter().map(|p| p.1.clone()).collect();
    assert_eq!(unique.len(), events.len());
    assert!(positions.windows(2).all(|w| w[0].0 <= w[1].0));
    assert_eq!(events[5]["id"], format!("{}.1", events[5]["seq"]));
    assert_eq!(next_after, events.last().unwrap()["seq"].as_u64().unwrap());
    for e in &events {
        assert_eq!(e["specversion"], "1.0");
        assert_eq!(e["source"], "stockd");
        assert!(e["time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(e["data"]["by"], Value::Null, "the server runs open");
    }
    assert_eq!(events[1]["data"]["quantity"], 3);
    assert_eq!(figures(&events[1]), (5, 0, 5, 0));
    assert_eq!(events[2]["data"]["reason"], "damaged");
    assert_eq!(figures(&events[2]), (4, 0, 4, 0));
    assert_eq!(events[3]["data"]["name"], "Renamed");
    assert_eq!(events[4]["subject"], id.as_str());
    assert_eq!(events[4]["data"]["customer_id"], "buyer-1");
    assert_eq!(
        events[4]["data"]["lines"],
        json!([{"sku": "A", "quantity": 4}])
    );
    assert_eq!(figures(&events[4]), (4, 4, 0, 0));
    assert_eq!(events[5]["subject"], "A");
    assert_eq!(events[7]["data"]["order_id"], "order-1");
    assert_eq!(figures(&events[7]), (0, 0, 0, 4));
    assert_eq!(events[11]["subject"], cancelled_id.as_str());
    assert_eq!(figures(&events[12]), (1, 0, 1, 0));
    assert_eq!(events[15]["subject"], expired_id.as_str());
    assert_eq!(events[15]["time"], stockd::clock::rfc3339(START_MS + 2_000));
    assert_eq!(events[17]["subject"], "B");

    // Filters: by type, by SKU, both; pages of filtered events still continue exactly.
    let (sold_out, _) = all_events(c, 0, "&type=stock.sold_out,stock.back_in_stock").await;
    assert_eq!(sold_out.len(), 5);
    let (only_b, _) = all_events(c, 0, "&sku=B").await;
    assert_eq!(only_b.len(), 10, "{:?}", types(&only_b));
    assert!(only_b
        .iter()
        .all(|e| e["subject"] == "B" || e["data"]["products"][0]["sku"] == "B"));
    let (b_created, _) = all_events(c, 0, "&sku=B&type=reservation.created").await;
    assert_eq!(b_created.len(), 2);
    // The rest of the feed after a position; a bad query is 422.
    let seq = events[8]["seq"].as_u64().unwrap();
    let (rest, _) = all_events(c, seq, "").await;
    assert_eq!(rest.len(), events.len() - 9);
    c.get("/v1/events?type=nope")
        .await
        .assert_problem(422, "validation_failed");
    c.get("/v1/events?limit=0")
        .await
        .assert_problem(422, "validation_failed");
    ts.stop().await;
}

#[tokio::test]
async fn live_events_arrive_and_a_reconnect_resumes_exactly_after_the_last_id() {
    let ts = start_with_feed().await;
    let c = &ts.client;
    c.create_product("A", 1).await;
    let mut sse = Sse::open(&c.base, "", None).await;
    let first = sse
        .next(Duration::from_secs(10))
        .await
        .expect("the backlog");
    assert_eq!(first.kind, "product.created");
    assert_eq!(first.id, first.data["id"].as_str().unwrap());
    // Made after connecting: delivered live, with the sold-out it causes.
    let r = c.reserve("buyer-1", "A", 1).await;
    assert_eq!(r.status, 201);
    let created = sse.next(Duration::from_secs(10)).await.expect("live");
    assert_eq!(created.kind, "reservation.created");
    assert_eq!(created.data["subject"], r.body["id"]);
    drop(sse);
    // Changes while disconnected, then a reconnect from the last id received: the
    // sold-out (same record, index 1) and what follows, each once.
    let id = r.body["id"].as_str().unwrap();
    assert_eq!(cancel(c, id).await.status, 200);
    let mut sse = Sse::open(&c.base, "", Some(&created.id)).await;
    let mut kinds = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let e = sse.next(Duration::from_secs(10)).await.expect("resumed");
        kinds.push(e.kind);
        ids.push(e.id);
    }
    assert_eq!(
        kinds,
        [
            "stock.sold_out",
            "reservation.cancelled",
            "stock.back_in_stock"
        ]
    );
    assert_eq!(ids[0], format!("{}.1", created.id));
    // A filtered stream gets only what it asked for.
    let mut sold_out = Sse::open(&c.base, "?after=0&type=stock.sold_out", None).await;
    let e = sold_out.next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(e.kind, "stock.sold_out");
    assert_eq!(c.metric("stockd_events_sse_clients").await, 2.0);
    // Shutdown ends live streams rather than wait for them.
    let started = Instant::now();
    ts.stop().await;
    assert!(started.elapsed() < Duration::from_secs(8));
    assert!(sse.next(Duration::from_secs(5)).await.is_none());
}

#[tokio::test]
async fn a_reader_that_stops_reading_is_dropped_and_reservations_go_on() {
    let ts = start_with_feed().await;
    let c = &ts.client;
    // Reservations of 100 lines: large events, so that the reader's socket fills early.
    let skus: Vec<String> = (0..100).map(|i| format!("S-{i:03}")).collect();
    for sku in &skus {
        c.create_product(sku, 1_000_000).await;
    }
    let items: Vec<Value> = skus
        .iter()
        .map(|s| json!({"sku": s, "quantity": 1}))
        .collect();
    let stalled = Sse::open(&c.base, "", None).await; // never read
    let started = Instant::now();
    let mut rounds = 0;
    while c.metric("stockd_events_sse_dropped_total").await < 1.0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the stalled reader was never dropped"
        );
        for _ in 0..100 {
            let r = c
                .post(
                    "/v1/reservations",
                    json!({"customer_id": "c", "items": items}),
                )
                .await;
            assert_eq!(r.status, 201, "{:?}", r.body);
            let id = r.body["id"].as_str().unwrap();
            assert_eq!(cancel(c, id).await.status, 200);
        }
        rounds += 1;
    }
    assert!(rounds >= 1);
    let gone = eventually(Duration::from_secs(5), || {
        let c = c.clone();
        async move { c.metric("stockd_events_sse_clients").await == 0.0 }
    })
    .await;
    assert!(gone, "the dropped reader still counts as connected");
    // What it had been sent ends; it never gets everything.
    let mut stalled = stalled;
    let mut received = 0;
    while stalled.next(Duration::from_secs(10)).await.is_some() {
        received += 1;
    }
    let written = c.metric("stockd_events_written_total").await as usize;
    assert!(received < written, "{received} of {written}");
    ts.stop().await;
}

#[tokio::test]
async fn events_removed_by_retention_answer_410_with_the_oldest_kept() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START_MS));
    let ts = TestServer::start_tweaked(dir, clock, Durability::Sync, |config| {
        config.events = Some(stockd::feed::Retention {
            age: Duration::from_secs(3600),
            max_bytes: 8 * 1024,
        });
    })
    .await;
    let c = &ts.client;
    c.create_product("A", 1).await;
    for _ in 0..200 {
        let r = c
            .post("/v1/products/A/replenish", json!({"quantity": 1}))
            .await;
        assert_eq!(r.status, 200);
    }
    feed_caught_up(c).await;
    let gone = c.get("/v1/events?after=0").await;
    gone.assert_problem(410, "events_gone");
    let oldest = gone.body["oldest_seq"].as_u64().unwrap();
    assert!(oldest > 2, "{oldest}");
    assert_eq!(c.metric("stockd_events_oldest_seq").await, oldest as f64);
    assert!(c.metric("stockd_events_store_bytes").await <= 16.0 * 1024.0);
    let (kept, next_after) = all_events(c, oldest - 1, "").await;
    let page = c.get(&format!("/v1/events?after={}", oldest - 1)).await;
    assert!(!kept.is_empty(), "{oldest}: {:?}", page.body);
    assert_eq!(kept[0]["seq"], oldest);
    assert_eq!(next_after, 201);
    // Without `after`, the feed starts at the oldest kept.
    let first = c.get("/v1/events?limit=1").await;
    assert_eq!(first.body["events"][0]["seq"], oldest);
    ts.stop().await;
}

#[tokio::test]
async fn a_data_directory_from_before_the_feed_starts_it_after_its_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START_MS));
    let ts = TestServer::start_tweaked(dir, clock, Durability::Sync, |config| {
        config.events = None;
    })
    .await;
    ts.client.create_product("A", 5).await;
    ts.client.reserve("c", "A", 1).await;
    ts.client
        .get("/v1/events")
        .await
        .assert_problem(404, "events_disabled");
    let (dir, clock) = {
        let TestServer {
            server, dir, clock, ..
        } = ts;
        server.unwrap().shutdown().await.unwrap(); // with its snapshot at shutdown
        (dir, clock)
    };
    let ts = TestServer::start_tweaked(dir, clock, Durability::Sync, with_feed).await;
    let c = &ts.client;
    let (events, next_after) = all_events(c, 2, "").await;
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(next_after, 2);
    c.get("/v1/events?after=0")
        .await
        .assert_problem(410, "events_gone");
    let r = c.reserve("c", "A", 1).await;
    assert_eq!(r.status, 201);
    feed_caught_up(c).await;
    let (events, _) = all_events(c, 2, "").await;
    assert_eq!(types(&events), ["reservation.created"]);
    assert_eq!(events[0]["seq"], 3);
    assert_eq!(figures(&events[0]), (5, 2, 3, 0));
    ts.stop().await;
}

/// What the feed must hold for the log in `data_dir`: its last record, and the event ids
/// of the records after its newest snapshot, derived offline with the one fold from that
/// snapshot (snapshots let the log drop its front).
fn expected_ids(data_dir: &std::path::Path, snapshot_dir: &std::path::Path) -> (u64, Vec<String>) {
    let log = stockd::storage::log::Log::open(&data_dir.join("log")).unwrap();
    let reader = log.reader();
    let base = stockd::storage::recovery::base_snapshot(
        snapshot_dir,
        u64::MAX,
        reader.truncated_through(),
    )
    .unwrap();
    let after = base.snapshot.map_or(0, |s| s.seq);
    let mut state = base.state;
    let mut ids = Vec::new();
    for item in reader.records_after(after) {
        let (seq, record) = item.unwrap();
        for e in stockd::feed::event::project(&mut state, seq, &record).unwrap() {
            ids.push(e.position.id());
        }
    }
    (log.last_seq().unwrap(), ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_lose_and_repeat_no_event() {
    let dir = tempfile::tempdir().unwrap();
    // Snapshots while the reader follows: none may pass the feed's store.
    let mut server = ChildServer::spawn(
        dir.path(),
        &["--snapshot-every-records", "300", "--events", "on"],
    );
    let c = server.client.clone();
    for sku in ["A", "B", "C"] {
        c.create_product(sku, 1_000_000).await;
    }
    // A reader follows live while buyers reserve and cancel.
    let base = c.base.clone();
    let follower = tokio::spawn(async move {
        let mut sse = Sse::open(&base, "?after=0", None).await;
        let mut ids = Vec::new();
        while let Some(e) = sse.next(Duration::from_secs(30)).await {
            ids.push(e.id);
        }
        ids
    });
    let buyers: Vec<_> = (0..4)
        .map(|b| {
            let c = c.clone();
            tokio::spawn(async move {
                for i in 0.. {
                    let sku = ["A", "B", "C"][i % 3];
                    let Ok(r) = c
                        .send(
                            reqwest::Method::POST,
                            "/v1/reservations",
                            Some(&json!({"customer_id": format!("b-{b}"), "items": [{"sku": sku, "quantity": 1}]}).to_string()),
                            &[],
                        )
                        .await
                    else {
                        return;
                    };
                    if i % 2 == 0 {
                        if let Some(id) = r.body["id"].as_str() {
                            let path = format!("/v1/reservations/{id}/cancel");
                            if c.send(reqwest::Method::POST, &path, None, &[]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    server.kill9();
    for buyer in buyers {
        let _ = buyer.await;
    }
    let before_kill = follower.await.unwrap();
    assert!(before_kill.len() > 10, "{}", before_kill.len());

    let server = ChildServer::spawn(dir.path(), &["--events", "on"]);
    let c = server.client.clone();
    c.create_product("MARKER", 1).await;
    let mut sse = Sse::open(&c.base, "", before_kill.last().map(String::as_str)).await;
    let mut after_restart = Vec::new();
    loop {
        let e = sse
            .next(Duration::from_secs(30))
            .await
            .expect("the stream reaches the marker");
        after_restart.push(e.id.clone());
        if e.kind == "product.created" && e.data["subject"] == "MARKER" {
            break;
        }
    }
    drop(sse);
    drop(server); // SIGKILL: the log is closed for the offline read below
    let seen: Vec<String> = before_kill.into_iter().chain(after_restart).collect();
    let (last_seq, tail) = expected_ids(&dir.path().join("data"), &dir.path().join("snapshots"));
    // Every record here gives at least one event: each seq 1..=last, once, in order; and
    // the records after the newest snapshot give exactly the events the fold derives.
    let positions: Vec<stockd::feed::Position> = seen
        .iter()
        .map(|id| stockd::feed::Position::parse(id).unwrap())
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "in order, no duplicate"
    );
    let seqs: BTreeSet<u64> = positions.iter().map(|p| p.seq).collect();
    assert_eq!(seqs, (1..=last_seq).collect::<BTreeSet<u64>>(), "no gap");
    assert!(!tail.is_empty());
    assert_eq!(seen[seen.len() - tail.len()..], tail[..]);
}

/// A key revoked after a restart: the projector's copy of the recovered state still holds
/// the keys, so it folds the revocation and the feed goes on.
#[tokio::test]
async fn the_feed_goes_on_past_a_key_revoked_after_a_restart() {
    let t = start_with_feed().await;
    // The first key turns authentication on: the second is made with it.
    let mut keys: Vec<(String, String)> = Vec::new();
    for name in ["ops", "spare"] {
        let bearer = keys.first().map(|(_, secret)| format!("Bearer {secret}"));
        let auth: Vec<(&str, &str)> = bearer
            .iter()
            .map(|b| ("authorization", b.as_str()))
            .collect();
        let body = json!({"name": name, "scopes": ["admin"]});
        let a = t.client.post_with("/v1/admin/keys", body, &auth).await;
        assert_eq!(a.status, 201, "{:?}", a.body);
        keys.push((
            a.body["id"].as_str().unwrap().to_string(),
            a.body["secret"].as_str().unwrap().to_string(),
        ));
    }
    let t = t.restart().await;
    let bearer = format!("Bearer {}", keys[0].1);
    let auth = [("authorization", bearer.as_str())];
    let a = t
        .client
        .send(
            reqwest::Method::DELETE,
            &format!("/v1/admin/keys/{}", keys[1].0),
            None,
            &auth,
        )
        .await
        .unwrap();
    assert_eq!(a.status, 204, "{:?}", a.body);
    let body = json!({"sku": "AFTER", "name": "After the revocation", "on_hand": 1});
    let a = t.client.post_with("/v1/products", body, &auth).await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    let arrived = eventually(Duration::from_secs(10), || async {
        let a = t
            .client
            .send(reqwest::Method::GET, "/v1/events?sku=AFTER", None, &auth)
            .await
            .unwrap();
        a.body["events"]
            .as_array()
            .is_some_and(|events| events.iter().any(|e| e["type"] == "product.created"))
    })
    .await;
    assert!(arrived, "the projector stopped at the revocation");
    t.stop().await;
}
