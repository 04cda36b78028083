//! Webhooks (`/v1/webhooks`), against a receiver each test starts on `127.0.0.1:0` that
//! records what it gets and answers 2xx, 500 or nothing on demand: order, signatures
//! checked by an independent computation, retries after 500s and after a timeout, the
//! endpoint disabled once the give-up time passed (and enabled again), filters, bad input,
//! the admin scope, the feed off, and neither a gap nor a repeat of an acknowledged event
//! across a restart and across `kill -9`.

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use common::{eventually, ChildServer, Client, TestServer, START_MS};
use hmac::{Hmac, Mac};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::Sha256;
use stockd::clock::ManualClock;
use stockd::{Config, Durability};
use warp::Filter as _;

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Delivery {
    id: String,
    timestamp: String,
    signature: String,
    content_type: String,
    body: String,
    /// What the receiver answered (0: it never answered: stalled, or the server hung up).
    answered: u16,
}

/// What the receiver does with a request.
#[derive(Clone, Copy, Debug)]
enum Action {
    Answer(u16),
    /// Answers nothing for this long (the server's timeout ends the request first).
    Stall(Duration),
}

#[derive(Default)]
struct Script {
    /// Actions for the next requests, in order; then `otherwise`.
    next: VecDeque<Action>,
    otherwise: Option<Action>,
}

/// A webhook receiver on 127.0.0.1:0; stopped when dropped.
struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Delivery>>>,
    script: Arc<Mutex<Script>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start() -> Receiver {
        let got: Arc<Mutex<Vec<Delivery>>> = Arc::default();
        let script: Arc<Mutex<Script>> = Arc::default();
        let route = warp::post()
            .and(warp::header::headers_cloned())
            .and(warp::body::bytes())
            .then({
                let (got, script) = (got.clone(), script.clone());
                move |headers: warp::http::HeaderMap, body: bytes::Bytes| {
                    let (got, script) = (got.clone(), script.clone());
                    async move {
                        let header = |name: &str| {
                            headers
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string()
                        };
                        let mut delivery = Delivery {
                            id: header("webhook-id"),
                            timestamp: header("webhook-timestamp"),
                            signature: header("webhook-signature"),
                            content_type: header("content-type"),
                            body: String::from_utf8_lossy(&body).into_owned(),
                            answered: 0,
                        };
                        let action = {
                            let mut s = script.lock().unwrap();
                            s.next
                                .pop_front()
                                .or(s.otherwise)
                                .unwrap_or(Action::Answer(204))
                        };
                        let index = {
                            let mut got = got.lock().unwrap();
                            got.push(delivery.clone());
                            got.len() - 1
                        };
                        let status = match action {
                            Action::Answer(status) => status,
                            Action::Stall(long) => {
                                tokio::time::sleep(long).await;
                                504
                            }
                        };
                        delivery.answered = status;
                        got.lock().unwrap()[index].answered = status;
                        warp::http::Response::builder()
                            .status(status)
                            .body(String::from("ok"))
                            .unwrap()
                    }
                }
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(
            warp::serve(route)
                .incoming(listener)
                .graceful(async move {
                    let _ = stopped.await;
                })
                .run(),
        );
        Receiver {
            addr,
            got,
            script,
            stop: Some(stop),
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks", self.addr)
    }

    fn all(&self) -> Vec<Delivery> {
        self.got.lock().unwrap().clone()
    }

    /// The deliveries it answered with a 2xx, in order.
    fn acknowledged(&self) -> Vec<Delivery> {
        self.all()
            .into_iter()
            .filter(|d| (200..300).contains(&d.answered))
            .collect()
    }

    fn acknowledged_ids(&self) -> Vec<String> {
        self.acknowledged().into_iter().map(|d| d.id).collect()
    }

    fn script(&self, change: impl FnOnce(&mut Script)) {
        change(&mut self.script.lock().unwrap());
    }

    /// Waits (20 s at most) until `n` deliveries were acknowledged.
    async fn wait_acknowledged(&self, n: usize) -> Vec<Delivery> {
        let reached = eventually(Duration::from_secs(20), || async {
            self.acknowledged().len() >= n
        })
        .await;
        let got = self.acknowledged();
        assert!(
            reached,
            "{} of {n} acknowledged: {:#?}",
            got.len(),
            self.all()
        );
        got
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

/// A short schedule, so that tests see retries and give-ups in well under a second.
fn fast(config: &mut Config) {
    config.events = Some(stockd::feed::retention_default());
    config.webhooks = stockd::webhooks::Schedule {
        // Long enough that a loaded machine's loopback answer never misses it (a 2xx the
        // server gave up on would be sent again), short enough for the timeout tests.
        timeout: Duration::from_millis(2000),
        retry_initial: Duration::from_millis(20),
        retry_max: Duration::from_millis(100),
        give_up: Duration::from_secs(3600),
    };
}

fn give_up_fast(config: &mut Config) {
    fast(config);
    config.webhooks.give_up = Duration::from_millis(1500);
}

fn feed_off(config: &mut Config) {
    config.events = None;
}

async fn start(tweak: fn(&mut Config)) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START_MS));
    TestServer::start_tweaked(dir, clock, Durability::Sync, tweak).await
}

async fn register(c: &Client, body: Value) -> Value {
    let a = c.post("/v1/webhooks", body).await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    assert_eq!(
        a.header("location"),
        Some(format!("/v1/webhooks/{}", a.body["id"].as_str().unwrap()).as_str())
    );
    a.body
}

/// Every event of the feed after record `after` (all pages), as (id, the event's JSON),
/// once the feed holds the events of every record durable now.
async fn events_after(c: &Client, after: u64) -> Vec<(String, Value)> {
    let target = c.metric("stockd_log_durable_sequence").await;
    let reached = eventually(Duration::from_secs(10), || async {
        c.metric("stockd_events_through_seq").await >= target
    })
    .await;
    assert!(reached, "the feed did not reach record {target}");
    let mut out = Vec::new();
    let mut after = after;
    loop {
        let a = c.get(&format!("/v1/events?after={after}&limit=1000")).await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        let page = a.body["events"].as_array().unwrap().clone();
        if page.is_empty() {
            return out;
        }
        for e in page {
            out.push((e["id"].as_str().unwrap().to_string(), e));
        }
        after = a.body["next_after"].as_u64().unwrap();
    }
}

/// The Standard Webhooks check, computed here from the secret alone: HMAC-SHA256 with the
/// base64-decoded key after `whsec_`, over `{id}.{timestamp}.{body}`, base64, `v1,`.
fn verify(secret: &str, d: &Delivery) -> bool {
    let key = BASE64
        .decode(secret.strip_prefix("whsec_").expect("whsec_ prefix"))
        .expect("base64 secret");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.{}", d.id, d.timestamp, d.body).as_bytes());
    let expected = format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()));
    // The header may carry several signatures, separated by spaces.
    d.signature.split(' ').any(|s| s == expected)
}

async fn some_changes(c: &Client, skus: &[&str]) {
    for sku in skus {
        c.create_product(sku, 2).await;
    }
    for sku in skus {
        let a = c.reserve("buyer-1", sku, 2).await; // reservation.created + stock.sold_out
        assert_eq!(a.status, 201, "{:?}", a.body);
    }
}

#[tokio::test]
async fn deliveries_come_in_feed_order_signed_and_start_after_the_registration() {
    let s = start(fast).await;
    let c = &s.client;
    let receiver = Receiver::start().await;
    // Before the registration: never delivered.
    some_changes(c, &["OLD"]).await;
    let hook = register(c, json!({"url": receiver.url()})).await;
    let secret = hook["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"));
    assert!(BASE64.decode(&secret[6..]).unwrap().len() >= 24);
    let after = hook["started_after_seq"].as_u64().unwrap();
    assert!(after >= 2, "{hook}");
    assert_eq!(hook["state"], "active");
    assert_eq!(hook["position"], Value::Null);

    some_changes(c, &["A", "B", "C"]).await;
    let expected = events_after(c, after).await;
    assert_eq!(expected.len(), 9, "3 created, 3 reserved, 3 sold out");
    let got = receiver.wait_acknowledged(expected.len()).await;
    let ids: Vec<&str> = got.iter().map(|d| d.id.as_str()).collect();
    let expected_ids: Vec<&str> = expected.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids, expected_ids,
        "every event after the registration, in order, once"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for (d, (id, event)) in got.iter().zip(&expected) {
        assert!(verify(&secret, d), "the signature verifies: {d:?}");
        assert_eq!(&d.id, id);
        assert_eq!(d.content_type, "application/json");
        let body: Value = serde_json::from_str(&d.body).unwrap();
        assert_eq!(&body, event, "the body is the event as the feed serves it");
        let ts: i64 = d.timestamp.parse().unwrap();
        assert!(
            (now - ts).abs() < 60,
            "webhook-timestamp is unix seconds: {ts}"
        );
        // A signature made with another secret, or over another body, does not verify.
        let mut forged = d.clone();
        forged.body.push(' ');
        assert!(!verify(&secret, &forged));
    }
    // The endpoint's state: its position is the last event (once the last 2xx reached the
    // server, just after the receiver sent it), nothing behind.
    let path = format!("/v1/webhooks/{}", hook["id"].as_str().unwrap());
    let last = expected.last().unwrap().0.as_str();
    assert!(
        eventually(Duration::from_secs(10), || async {
            c.get(&path).await.body["position"] == last
        })
        .await
    );
    let view = c.get(&path).await;
    assert_eq!(view.status, 200);
    assert_eq!(view.body["lag_records"], 0);
    assert_eq!(view.body["deliveries"], 9);
    assert!(view.body.get("secret").is_none(), "never shown again");
    let list = c.get("/v1/webhooks").await;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 1);
    assert!(list.body["items"][0].get("secret").is_none());
    assert_eq!(c.metric("stockd_webhook_deliveries_total").await, 9.0);
    assert_eq!(c.metric("stockd_webhook_endpoints").await, 1.0);
    // Deleted: no more deliveries.
    let a = c.send(Method::DELETE, &path, None, &[]).await.unwrap();
    assert_eq!(a.status, 204);
    c.get(&path).await.assert_problem(404, "webhook_not_found");
    c.create_product("AFTER-DELETE", 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.all().len(), 9);
    s.stop().await;
}

#[tokio::test]
async fn failures_are_retried_after_500s_and_after_a_timeout_with_the_same_id() {
    let s = start(fast).await;
    let c = &s.client;
    let receiver = Receiver::start().await;
    // The first event: 500, 503, then no answer within the timeout (2 s), then 2xx.
    receiver.script(|s| {
        s.next = VecDeque::from([
            Action::Answer(500),
            Action::Answer(503),
            Action::Stall(Duration::from_secs(5)),
        ])
    });
    let hook = register(c, json!({"url": receiver.url()})).await;
    c.create_product("A", 1).await;
    c.create_product("B", 1).await;
    let got = receiver.wait_acknowledged(2).await;
    let all = receiver.all();
    assert_eq!(all.len(), 5, "{all:#?}");
    assert!(
        all[..4].iter().all(|d| d.id == all[0].id),
        "retries keep the id"
    );
    assert_eq!(
        all.iter().map(|d| d.answered).collect::<Vec<_>>()[..2],
        [500, 503]
    );
    assert_eq!(got[0].id, all[0].id);
    assert_ne!(got[1].id, got[0].id, "the next event only after the first");
    let secret = hook["secret"].as_str().unwrap();
    assert!(
        all.iter().all(|d| verify(secret, d)),
        "each retry signed anew"
    );
    let view = c
        .get(&format!("/v1/webhooks/{}", hook["id"].as_str().unwrap()))
        .await
        .body;
    assert_eq!(view["state"], "active");
    assert_eq!(view["failures"], 3);
    assert_eq!(view["failing_since"], Value::Null);
    assert!(
        view["last_error"].as_str().unwrap().contains("timeout"),
        "{view}"
    );
    assert_eq!(
        c.metric("stockd_webhook_delivery_failures_total").await,
        3.0
    );
    s.stop().await;
}

#[tokio::test]
async fn an_endpoint_failing_past_the_give_up_time_is_disabled_until_enabled() {
    let s = start(give_up_fast).await;
    let c = &s.client;
    let receiver = Receiver::start().await;
    receiver.script(|s| s.otherwise = Some(Action::Answer(500)));
    let hook = register(c, json!({"url": receiver.url()})).await;
    let path = format!("/v1/webhooks/{}", hook["id"].as_str().unwrap());
    c.create_product("A", 1).await;
    let disabled = eventually(Duration::from_secs(10), || async {
        c.get(&path).await.body["state"] == "disabled"
    })
    .await;
    assert!(disabled, "{:?}", c.get(&path).await.body);
    let view = c.get(&path).await.body;
    assert_eq!(view["disabled_reason"], "failing");
    assert!(view["disabled_detail"].as_str().unwrap().contains("500"));
    assert!(view["failing_since"].is_string());
    let attempts = receiver.all().len();
    assert!(attempts >= 3, "retried before giving up: {attempts}");
    assert_eq!(c.metric("stockd_webhook_endpoints_disabled").await, 1.0);
    // Disabled: no more attempts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.all().len(), attempts);
    // Enabled again, with a receiver that now answers: the event comes, then the next.
    receiver.script(|s| s.otherwise = None);
    let a = c
        .send(Method::POST, &format!("{path}/enable"), None, &[])
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["state"], "active");
    c.create_product("B", 1).await;
    let got = receiver.wait_acknowledged(2).await;
    assert_eq!(
        got[0].id,
        receiver.all()[0].id,
        "the event it gave up on first"
    );
    assert_eq!(c.metric("stockd_webhook_endpoints_disabled").await, 0.0);
    // Disabled stays disabled across a restart.
    receiver.script(|s| s.otherwise = Some(Action::Answer(500)));
    c.create_product("C", 1).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            c.get(&path).await.body["state"] == "disabled"
        })
        .await
    );
    let s = s.restart().await;
    let view = s.client.get(&path).await.body;
    assert_eq!(view["state"], "disabled", "{view}");
    assert_eq!(view["disabled_reason"], "failing");
    s.stop().await;
}

#[tokio::test]
async fn filters_by_type_and_by_sku() {
    let s = start(fast).await;
    let c = &s.client;
    let sold_out = Receiver::start().await;
    let sku_b = Receiver::start().await;
    let both = Receiver::start().await;
    register(
        c,
        json!({"url": sold_out.url(), "types": ["stock.sold_out", "stock.back_in_stock"]}),
    )
    .await;
    register(c, json!({"url": sku_b.url(), "skus": ["B"]})).await;
    register(
        c,
        json!({"url": both.url(), "types": ["stock.sold_out"], "skus": ["A", "C"]}),
    )
    .await;
    some_changes(c, &["A", "B", "C"]).await;
    // A marker every endpoint's filter passes, so that each has seen everything before it.
    c.post("/v1/products/B/replenish", json!({"quantity": 1}))
        .await;
    let got = sold_out.wait_acknowledged(4).await;
    let types: Vec<String> = got
        .iter()
        .map(|d| serde_json::from_str::<Value>(&d.body).unwrap()["type"].to_string())
        .collect();
    assert_eq!(
        types,
        [
            "\"stock.sold_out\"",
            "\"stock.sold_out\"",
            "\"stock.sold_out\"",
            "\"stock.back_in_stock\""
        ]
    );
    let got = sku_b.wait_acknowledged(5).await;
    for d in &got {
        let e: Value = serde_json::from_str(&d.body).unwrap();
        let touches_b = e["subject"] == "B" || e["data"]["products"][0]["sku"] == "B";
        assert!(touches_b, "{e}");
    }
    assert_eq!(
        got.len(),
        5,
        "created, reserved, sold out, replenished, back in stock"
    );
    let got = both.wait_acknowledged(2).await;
    let subjects: Vec<Value> = got
        .iter()
        .map(|d| serde_json::from_str::<Value>(&d.body).unwrap()["subject"].clone())
        .collect();
    assert_eq!(subjects, [json!("A"), json!("C")]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(both.all().len(), 2);
    s.stop().await;
}

#[tokio::test]
async fn bad_registrations_are_422_naming_the_field_and_change_nothing() {
    let s = start(fast).await;
    let c = &s.client;
    let cases = [
        (json!({}), "url"),
        (json!({"url": 7}), "url"),
        (json!({"url": "not a url"}), "url"),
        (json!({"url": "/relative/path"}), "url"),
        (json!({"url": "ftp://127.0.0.1/hooks"}), "url"),
        (json!({"url": "file:///etc/passwd"}), "url"),
        (json!({"url": "http://user:pw@127.0.0.1/hooks"}), "url"),
        (json!({"url": "http://127.0.0.1/hooks#x"}), "url"),
        (
            json!({"url": format!("http://127.0.0.1/{}", "a".repeat(2100))}),
            "url",
        ),
        (json!({"url": "http://127.0.0.1/", "types": []}), "types"),
        (
            json!({"url": "http://127.0.0.1/", "types": "stock.sold_out"}),
            "types",
        ),
        (
            json!({"url": "http://127.0.0.1/", "types": ["stock.sold_out", "stock.lowish"]}),
            "types[1]",
        ),
        (
            json!({"url": "http://127.0.0.1/", "types": ["stock.sold_out", "stock.sold_out"]}),
            "types[1]",
        ),
        (
            json!({"url": "http://127.0.0.1/", "skus": ["A", "not a sku"]}),
            "skus[1]",
        ),
        (json!({"url": "http://127.0.0.1/", "skus": []}), "skus"),
        (
            json!({"url": "http://127.0.0.1/", "secret": "mine"}),
            "secret",
        ),
    ];
    for (body, field) in cases {
        let a = c.post("/v1/webhooks", body.clone()).await;
        a.assert_problem(422, "validation_failed");
        assert_eq!(a.body["field"], field, "{body}: {:?}", a.body);
    }
    let a = c
        .send(Method::POST, "/v1/webhooks", Some("{not json"), &[])
        .await
        .unwrap();
    a.assert_problem(400, "bad_request");
    let list = c.get("/v1/webhooks").await;
    assert_eq!(list.body["items"], json!([]), "nothing registered");
    assert!(!s.dir.path().join("data/webhooks/endpoints.json").exists());
    // Ids that name nothing; a body on enable.
    c.get("/v1/webhooks/not-a-uuid")
        .await
        .assert_problem(404, "webhook_not_found");
    let nobody = "/v1/webhooks/0193a4b2-7c1e-7d3a-9f10-2b3c4d5e6f70";
    c.get(nobody).await.assert_problem(404, "webhook_not_found");
    c.send(Method::DELETE, nobody, None, &[])
        .await
        .unwrap()
        .assert_problem(404, "webhook_not_found");
    let hook = register(c, json!({"url": "http://127.0.0.1:9/x"})).await;
    let enable = format!("/v1/webhooks/{}/enable", hook["id"].as_str().unwrap());
    c.post(&enable, json!({"now": true}))
        .await
        .assert_problem(422, "validation_failed");
    s.stop().await;
}

#[tokio::test]
async fn webhooks_need_the_admin_scope() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START_MS));
    let s = TestServer::start_tweaked(dir, clock, Durability::Sync, |config| {
        fast(config);
        config.admin_key = Some(stockd::config::AdminKey::new("admin-secret-0123456789").unwrap());
    })
    .await;
    let c = &s.client;
    let admin = [("authorization", "Bearer admin-secret-0123456789")];
    let a = c
        .post_with(
            "/v1/admin/keys",
            json!({"name": "reader", "scopes": ["read", "reserve", "stock"]}),
            &admin,
        )
        .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    let reader = format!("Bearer {}", a.body["secret"].as_str().unwrap());
    let reader = [("authorization", reader.as_str())];
    let body = json!({"url": "http://127.0.0.1:9/x"}).to_string();
    for (method, path) in [
        (Method::POST, "/v1/webhooks"),
        (Method::GET, "/v1/webhooks"),
        (
            Method::GET,
            "/v1/webhooks/0193a4b2-7c1e-7d3a-9f10-2b3c4d5e6f70",
        ),
        (
            Method::DELETE,
            "/v1/webhooks/0193a4b2-7c1e-7d3a-9f10-2b3c4d5e6f70",
        ),
        (
            Method::POST,
            "/v1/webhooks/0193a4b2-7c1e-7d3a-9f10-2b3c4d5e6f70/enable",
        ),
    ] {
        let none = c
            .send(method.clone(), path, Some(&body), &[])
            .await
            .unwrap();
        none.assert_problem(401, "unauthorized");
        let a = c
            .send(method.clone(), path, Some(&body), &reader)
            .await
            .unwrap();
        a.assert_problem(403, "forbidden");
        assert_eq!(a.body["scope"], "admin", "{method} {path}");
    }
    let a = c
        .send(Method::GET, "/v1/webhooks", None, &admin)
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(
        a.body["items"],
        json!([]),
        "the refused POSTs registered nothing"
    );
    let a = c
        .post_with(
            "/v1/webhooks",
            json!({"url": "http://127.0.0.1:9/x"}),
            &admin,
        )
        .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    s.stop().await;
}

#[tokio::test]
async fn with_the_feed_off_webhooks_answer_events_disabled() {
    let s = start(feed_off).await;
    let c = &s.client;
    c.post("/v1/webhooks", json!({"url": "http://127.0.0.1:9/x"}))
        .await
        .assert_problem(404, "events_disabled");
    c.get("/v1/webhooks")
        .await
        .assert_problem(404, "events_disabled");
    assert!(!c
        .get("/metrics")
        .await
        .body
        .as_str()
        .unwrap()
        .contains("stockd_webhook_"));
    s.stop().await;
}

/// Every event after `after`, each acknowledged exactly once and in order.
fn assert_no_gap_no_repeat(acknowledged: &[String], expected: &[(String, Value)]) {
    let expected: Vec<&str> = expected.iter().map(|(id, _)| id.as_str()).collect();
    let got: Vec<&str> = acknowledged.iter().map(String::as_str).collect();
    assert_eq!(got, expected);
}

#[tokio::test]
async fn a_restart_mid_delivery_neither_skips_nor_repeats_an_acknowledged_event() {
    let s = start(fast).await;
    let receiver = Receiver::start().await;
    // The fourth delivery stalls: the server shuts down with it in flight.
    receiver.script(|r| {
        r.next = VecDeque::from([Action::Answer(200); 3]);
        r.next.push_back(Action::Stall(Duration::from_secs(60)));
    });
    let hook = register(&s.client, json!({"url": receiver.url()})).await;
    let after = hook["started_after_seq"].as_u64().unwrap();
    for i in 0..5 {
        s.client.create_product(&format!("P{i}"), 1).await;
    }
    let _ = receiver.wait_acknowledged(3).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            receiver.all().len() == 4
        })
        .await
    );
    let s = s.restart().await;
    for i in 5..8 {
        s.client.create_product(&format!("P{i}"), 1).await;
    }
    let events = events_after(&s.client, after).await;
    assert_eq!(events.len(), 8);
    receiver.wait_acknowledged(8).await;
    assert_no_gap_no_repeat(&receiver.acknowledged_ids(), &events);
    let all = receiver.all();
    assert_eq!(
        all.len(),
        9,
        "only the event in flight was sent twice: {all:#?}"
    );
    assert_eq!(all[3].id, all[4].id, "{all:#?}");
    s.stop().await;
}

/// An `https` endpoint is spoken to in TLS (no certificate tooling here for a full
/// handshake: the listener reads the client's first bytes, a TLS ClientHello, and closes,
/// which the endpoint's view reports as a failed attempt).
#[tokio::test]
async fn an_https_endpoint_gets_a_tls_handshake_and_a_failure_is_reported() {
    use tokio::io::AsyncReadExt;
    let s = start(fast).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let first_bytes = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 3];
        socket.read_exact(&mut buf).await.unwrap();
        buf // dropped here: the connection closes mid-handshake
    });
    let hook = register(
        &s.client,
        json!({"url": format!("https://127.0.0.1:{port}/hooks")}),
    )
    .await;
    s.client.create_product("A", 1).await;
    let hello = tokio::time::timeout(Duration::from_secs(20), first_bytes)
        .await
        .expect("the endpoint was called")
        .unwrap();
    // A TLS record of type handshake (22), protocol major version 3.
    assert_eq!(hello[..2], [22, 3], "{hello:?}");
    let path = format!("/v1/webhooks/{}", hook["id"].as_str().unwrap());
    let failed = eventually(Duration::from_secs(10), || async {
        let view = s.client.get(&path).await.body;
        view["failures"].as_u64().unwrap_or(0) >= 1 && view["last_error"].is_string()
    })
    .await;
    assert!(failed, "{:?}", s.client.get(&path).await.body);
    s.stop().await;
}

#[tokio::test]
async fn a_position_past_the_end_of_a_log_cut_short_goes_back_to_its_end() {
    let s = start(fast).await;
    let receiver = Receiver::start().await;
    let hook = register(&s.client, json!({"url": receiver.url()})).await;
    let id: uuid::Uuid = hook["id"].as_str().unwrap().parse().unwrap();
    s.client.create_product("A", 1).await;
    receiver.wait_acknowledged(1).await;
    let (dir, clock) = {
        let TestServer {
            server, dir, clock, ..
        } = s;
        server.unwrap().shutdown().await.unwrap();
        (dir, clock)
    };
    // As after --truncate-damaged-log: the endpoint was acknowledged events of records
    // that are no longer in the log (here: a position far past its end).
    {
        let opened = stockd::webhooks::store::Store::open(&dir.path().join("data/webhooks"))
            .expect("the webhooks' store opens");
        let mut store = opened.store;
        let past = stockd::feed::Position {
            seq: 1_000,
            index: u32::MAX,
        };
        store.record(id, past).unwrap();
        if let Some(file) = store.to_sync().unwrap() {
            file.sync_all().unwrap();
        }
    }
    let s = TestServer::start_tweaked(dir, clock, Durability::Sync, fast).await;
    let view = s.client.get(&format!("/v1/webhooks/{id}")).await;
    assert_eq!(view.status, 200, "{:?}", view.body);
    // Back at the log's end (after record 1, nothing of record 2 yet): no id to show.
    assert_eq!(view.body["position"], Value::Null, "{:?}", view.body);
    // The next record, numbered 2, is delivered (not skipped as one before 1,000).
    s.client.create_product("B", 1).await;
    receiver.wait_acknowledged(2).await;
    let ids = receiver.acknowledged_ids();
    assert_eq!(ids, ["1", "2"]);
    s.stop().await;
}

#[tokio::test]
async fn kill_9_neither_skips_nor_resends_an_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--events", "on", "--webhook-timeout-ms", "30000"];
    let mut server = ChildServer::spawn(dir.path(), &flags);
    let receiver = Receiver::start().await;
    // The 21st delivery is never answered: the server is killed while it waits for it.
    receiver.script(|r| {
        r.next = VecDeque::from([Action::Answer(200); 20]);
        r.next.push_back(Action::Stall(Duration::from_secs(60)));
    });
    let c = server.client.clone();
    let hook = register(&c, json!({"url": receiver.url()})).await;
    let after = hook["started_after_seq"].as_u64().unwrap();
    for i in 0..30 {
        c.create_product(&format!("P{i}"), 1).await;
    }
    let events = events_after(&c, after).await;
    assert_eq!(events.len(), 30);
    receiver.wait_acknowledged(20).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            receiver.all().len() == 21
        })
        .await
    );
    server.kill9();
    let server = ChildServer::spawn(dir.path(), &flags);
    let c = server.client.clone();
    c.create_product("AFTER", 1).await;
    let events = events_after(&c, after).await;
    assert_eq!(events.len(), 31);
    receiver.wait_acknowledged(31).await;
    assert_no_gap_no_repeat(&receiver.acknowledged_ids(), &events);
    let all = receiver.all();
    assert_eq!(
        all.len(),
        32,
        "only the event in flight at the kill was sent again: {all:#?}"
    );
    // The server records its position once the 2xx reached it, just after the receiver
    // answered.
    let path = format!("/v1/webhooks/{}", hook["id"].as_str().unwrap());
    let last = events.last().unwrap().0.as_str();
    assert!(
        eventually(Duration::from_secs(10), || async {
            c.get(&path).await.body["position"] == last
        })
        .await,
        "{:?}",
        c.get(&path).await.body
    );
    drop(server);
}

/// A feed that keeps 4 KiB of events (segments of 1 KiB): retention passes a stalled
/// endpoint after a few dozen events.
fn tiny_feed(config: &mut Config) {
    fast(config);
    config.events = Some(stockd::feed::Retention {
        age: Duration::from_secs(86_400),
        max_bytes: 4096,
    });
}

#[tokio::test]
async fn an_endpoint_behind_the_feeds_retention_is_disabled_not_looping_and_enable_skips_the_gap() {
    let s = start(tiny_feed).await;
    let c = &s.client;
    let receiver = Receiver::start().await;
    receiver.script(|r| r.otherwise = Some(Action::Answer(500)));
    let hook = register(c, json!({"url": receiver.url()})).await;
    let path = format!("/v1/webhooks/{}", hook["id"].as_str().unwrap());
    c.create_product("FIRST", 1).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            !receiver.all().is_empty()
        })
        .await
    );
    let first = receiver.all()[0].id.clone();
    // While the endpoint fails on its first event, the feed moves on and drops the rest of
    // what the endpoint has not seen.
    for i in 0..60 {
        c.create_product(&format!("P{i:02}"), 1).await;
    }
    let first_seq: f64 = first.parse().unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            c.metric("stockd_events_oldest_seq").await > first_seq + 1.0
        })
        .await,
        "retention removed the events after the endpoint's"
    );
    // The endpoint answers again: its event is acknowledged, the next read finds the
    // events gone, and it is disabled rather than asking again and again.
    receiver.script(|r| r.otherwise = None);
    assert!(
        eventually(Duration::from_secs(10), || async {
            c.get(&path).await.body["state"] == "disabled"
        })
        .await,
        "{:?}",
        c.get(&path).await.body
    );
    let view = c.get(&path).await.body;
    assert_eq!(view["disabled_reason"], "events_gone", "{view}");
    assert_eq!(view["position"], first.as_str());
    assert_eq!(receiver.acknowledged_ids(), std::slice::from_ref(&first));
    let attempts = receiver.all().len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.all().len(), attempts, "no loop while disabled");
    // Enabled: it goes on at the oldest event kept, and says what it skipped.
    let a = c
        .send(Method::POST, &format!("{path}/enable"), None, &[])
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert!(
        a.body["last_error"].as_str().unwrap().contains("skipped"),
        "{:?}",
        a.body
    );
    let oldest = c.metric("stockd_events_oldest_seq").await as u64;
    c.create_product("LAST", 1).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            receiver
                .acknowledged()
                .last()
                .is_some_and(|d| d.body.contains("\"LAST\""))
        })
        .await
    );
    let resumed = receiver.acknowledged_ids();
    let seq = |id: &str| id.split('.').next().unwrap().parse::<u64>().unwrap();
    assert!(seq(&resumed[1]) >= oldest, "{resumed:?} from {oldest}");
    s.stop().await;
}

#[tokio::test]
async fn a_stalled_endpoint_holds_up_neither_another_endpoint_nor_reservations() {
    let s = start(fast).await;
    let c = &s.client;
    let stalled = Receiver::start().await;
    stalled.script(|r| r.otherwise = Some(Action::Stall(Duration::from_secs(60))));
    let healthy = Receiver::start().await;
    let hook = register(c, json!({"url": stalled.url()})).await;
    register(c, json!({"url": healthy.url()})).await;
    let after = hook["started_after_seq"].as_u64().unwrap();
    c.create_product("A", 100).await;
    for i in 0..20 {
        let a = c.reserve(&format!("buyer-{i}"), "A", 1).await;
        assert_eq!(a.status, 201, "{:?}", a.body);
    }
    let expected = events_after(c, after).await;
    assert_eq!(expected.len(), 21);
    let got = healthy.wait_acknowledged(expected.len()).await;
    let ids: Vec<&str> = got.iter().map(|d| d.id.as_str()).collect();
    let expected_ids: Vec<&str> = expected.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, expected_ids);
    // The stalled endpoint is still on its first event, timing out (2 s) and retrying.
    let path = format!("/v1/webhooks/{}", hook["id"].as_str().unwrap());
    assert!(
        eventually(Duration::from_secs(10), || async {
            c.get(&path).await.body["state"] == "failing"
        })
        .await
    );
    assert!(stalled.acknowledged().is_empty());
    assert!(stalled.all().iter().all(|d| d.id == expected[0].0));
    let view = c.get(&path).await.body;
    assert!(
        view["last_error"].as_str().unwrap().contains("timeout"),
        "{view}"
    );
    assert_eq!(view["position"], Value::Null);
    assert!(view["lag_records"].as_u64().unwrap() >= 20, "{view}");
    s.stop().await;
}

/// An endpoint may subscribe to the low-stock events: it gets `stock.low` and
/// `stock.low_cleared`, signed, and nothing else.
#[tokio::test]
async fn an_endpoint_subscribed_to_low_stock_gets_low_and_low_cleared() {
    let s = start(fast).await;
    let c = &s.client;
    let low = Receiver::start().await;
    let hook = register(
        c,
        json!({"url": low.url(), "types": ["stock.low", "stock.low_cleared"]}),
    )
    .await;
    assert_eq!(hook["types"], json!(["stock.low", "stock.low_cleared"]));
    let secret = hook["secret"].as_str().unwrap().to_string();
    let a = c
        .post(
            "/v1/products",
            json!({"sku": "L", "name": "l", "on_hand": 4, "low_stock_threshold": 2}),
        )
        .await;
    assert_eq!(a.status, 201);
    let r = c.reserve("buyer", "L", 2).await; // 2 available: low
    let id = r.body["id"].as_str().unwrap().to_string();
    let path = format!("/v1/reservations/{id}/cancel");
    let a = c.send(Method::POST, &path, None, &[]).await.unwrap(); // 4: cleared
    assert_eq!(a.status, 200);
    let got = low.wait_acknowledged(2).await;
    let events: Vec<Value> = got
        .iter()
        .map(|d| serde_json::from_str(&d.body).unwrap())
        .collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["stock.low", "stock.low_cleared"]);
    assert_eq!(events[0]["data"]["low_stock_threshold"], 2);
    assert_eq!(events[0]["data"]["products"][0]["available"], 2);
    assert!(got.iter().all(|d| verify(&secret, d)));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(low.all().len(), 2, "nothing else");
    s.stop().await;
}

/// A CA made for the test, and a server certificate it signed for `127.0.0.1` and
/// `localhost`, with its key.
struct TestPki {
    ca_pem: String,
    server_cert: tokio_rustls::rustls::pki_types::CertificateDer<'static>,
    server_key: Vec<u8>,
}

fn test_pki() -> TestPki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "stockd test shop CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let mut server =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    server
        .distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    server.use_authority_key_identifier_extension = true;
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate().unwrap();
    let server_cert = server.signed_by(&server_key, &issuer).unwrap();
    TestPki {
        ca_pem: ca_cert.pem(),
        server_cert: server_cert.der().clone(),
        server_key: server_key.serialize_der(),
    }
}

/// A webhook receiver over https on `127.0.0.1:0`, with the test CA's certificate: it
/// records each delivery and answers 204, and records each handshake that failed (a
/// client that does not trust the certificate hangs up in the handshake). Stopped when
/// dropped.
struct TlsReceiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Delivery>>>,
    failed_handshakes: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsReceiver {
    async fn start(pki: &TestPki) -> TlsReceiver {
        use tokio_rustls::rustls;
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
            rustls::pki_types::PrivatePkcs8KeyDer::from(pki.server_key.clone()),
        );
        // The process's crypto provider: ring, the only one built (as for reqwest's side).
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![pki.server_cert.clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got: Arc<Mutex<Vec<Delivery>>> = Arc::default();
        let failed_handshakes: Arc<Mutex<Vec<String>>> = Arc::default();
        let task = tokio::spawn({
            let (got, failed) = (got.clone(), failed_handshakes.clone());
            async move {
                let mut connections = tokio::task::JoinSet::new();
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    let (acceptor, got, failed) = (acceptor.clone(), got.clone(), failed.clone());
                    connections.spawn(async move {
                        let tls = match acceptor.accept(tcp).await {
                            Ok(tls) => tls,
                            Err(e) => {
                                failed.lock().unwrap().push(e.to_string());
                                return;
                            }
                        };
                        let service = hyper::service::service_fn(
                            move |request: hyper::Request<hyper::body::Incoming>| {
                                let got = got.clone();
                                async move {
                                    use http_body_util::BodyExt as _;
                                    let (parts, body) = request.into_parts();
                                    let body = body.collect().await?.to_bytes();
                                    let header = |name: &str| {
                                        parts
                                            .headers
                                            .get(name)
                                            .and_then(|v| v.to_str().ok())
                                            .unwrap_or("")
                                            .to_string()
                                    };
                                    got.lock().unwrap().push(Delivery {
                                        id: header("webhook-id"),
                                        timestamp: header("webhook-timestamp"),
                                        signature: header("webhook-signature"),
                                        content_type: header("content-type"),
                                        body: String::from_utf8_lossy(&body).into_owned(),
                                        answered: 204,
                                    });
                                    Ok::<_, hyper::Error>(
                                        hyper::Response::builder()
                                            .status(204)
                                            .body(http_body_util::Empty::<bytes::Bytes>::new())
                                            .unwrap(),
                                    )
                                }
                            },
                        );
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                            .await;
                    });
                }
            }
        });
        TlsReceiver {
            addr,
            got,
            failed_handshakes,
            task,
        }
    }

    /// The receiver's URL, by IP address or by name (`localhost`).
    fn url(&self, host: &str) -> String {
        format!("https://{host}:{}/hooks", self.addr.port())
    }

    fn got(&self) -> Vec<Delivery> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for TlsReceiver {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection.
        self.task.abort();
    }
}

/// The real binary, started with `--webhook-ca-file` holding the shop's CA: an https
/// endpoint whose certificate that CA signed gets its deliveries, signed, by IP address and
/// by name; the CA is added to the public roots, not put in their place.
#[tokio::test]
async fn an_https_endpoint_of_a_private_ca_gets_deliveries_with_webhook_ca_file() {
    let pki = test_pki();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("shop-ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let receiver = TlsReceiver::start(&pki).await;
    let server = ChildServer::spawn(
        dir.path(),
        &[
            "--events",
            "on",
            "--webhook-retry-initial-ms",
            "50",
            "--webhook-retry-max-ms",
            "200",
            "--webhook-ca-file",
            ca_file.to_str().unwrap(),
        ],
    );
    let c = server.client.clone();
    let by_ip = register(&c, json!({"url": receiver.url("127.0.0.1")})).await;
    let by_name = register(&c, json!({"url": receiver.url("localhost")})).await;
    c.create_product("A", 1).await;
    let arrived = eventually(Duration::from_secs(20), || async {
        receiver.got().len() >= 2
    })
    .await;
    if !arrived {
        let hooks = c.get("/v1/webhooks").await.body;
        let failed = receiver.failed_handshakes.lock().unwrap().clone();
        panic!(
            "{:?}; failed handshakes: {failed:?}; {hooks}",
            receiver.got()
        );
    }
    let got = receiver.got();
    assert_eq!(got.len(), 2, "{got:?}");
    for d in &got {
        assert_eq!(d.id, "1");
        assert_eq!(d.content_type, "application/json");
        let event: Value = serde_json::from_str(&d.body).unwrap();
        assert_eq!(event["type"], "product.created");
    }
    let secrets = [&by_ip, &by_name].map(|h| h["secret"].as_str().unwrap().to_string());
    for d in &got {
        assert!(
            secrets.iter().any(|s| verify(s, d)),
            "signed by one of the endpoints' secrets: {d:?}"
        );
    }
    for hook in [&by_ip, &by_name] {
        let view = c
            .get(&format!("/v1/webhooks/{}", hook["id"].as_str().unwrap()))
            .await
            .body;
        let delivered = eventually(Duration::from_secs(10), || async {
            let view = c
                .get(&format!("/v1/webhooks/{}", hook["id"].as_str().unwrap()))
                .await
                .body;
            view["deliveries"] == 1
        })
        .await;
        assert!(delivered, "{view}");
    }
    assert!(receiver.failed_handshakes.lock().unwrap().is_empty());
}

/// Without `--webhook-ca-file` the same endpoint is not trusted: the delivery fails in the
/// handshake, and the endpoint's view says it was the certificate.
#[tokio::test]
async fn without_the_ca_file_a_private_ca_endpoint_fails_with_a_certificate_error() {
    let pki = test_pki();
    let receiver = TlsReceiver::start(&pki).await;
    let s = start(fast).await;
    let c = &s.client;
    let hook = register(c, json!({"url": receiver.url("127.0.0.1")})).await;
    c.create_product("A", 1).await;
    let path = format!("/v1/webhooks/{}", hook["id"].as_str().unwrap());
    let failed = eventually(Duration::from_secs(20), || async {
        let view = c.get(&path).await.body;
        view["failures"].as_u64().unwrap_or(0) >= 1 && view["last_error"].is_string()
    })
    .await;
    let view = c.get(&path).await.body;
    assert!(failed, "{view}");
    let error = view["last_error"].as_str().unwrap().to_lowercase();
    assert!(
        error.contains("invalid peer certificate") && error.contains("unknownissuer"),
        "the certificate's issuer is not trusted: {error}"
    );
    assert_eq!(view["state"], "failing");
    assert_eq!(view["deliveries"], 0);
    assert!(receiver.got().is_empty(), "nothing was delivered");
    s.stop().await;
}

/// `--webhook-ca-file` (and `STOCKD_WEBHOOK_CA_FILE`) naming a file that is missing, or
/// that holds no certificate, stops start-up with one line naming the file and why,
/// before recovery runs (no data directory is created).
#[test]
fn a_webhook_ca_file_that_is_missing_or_holds_no_certificate_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let empty = dir.path().join("no-certificate.pem");
    std::fs::write(
        &empty,
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let run = |flag: bool, file: &std::path::Path| {
        let mut cmd = common::serve_command(dir.path(), &[]);
        if flag {
            cmd.arg("--webhook-ca-file").arg(file);
        } else {
            cmd.env("STOCKD_WEBHOOK_CA_FILE", file);
        }
        let exited = loadtest::server::run_to_exit(cmd, Duration::from_secs(20)).unwrap();
        assert_eq!(exited.status.code(), Some(1), "{}", exited.stderr);
        assert!(!exited.stdout.contains("listening on"), "{}", exited.stdout);
        assert_eq!(exited.stderr.lines().count(), 1, "{}", exited.stderr);
        exited.stderr
    };
    for flag in [true, false] {
        let stderr = run(flag, &missing);
        assert!(
            stderr.starts_with(&format!(
                "stockd: cannot use {} as the webhooks' CA file (--webhook-ca-file): cannot \
                 read it: No such file or directory",
                missing.display()
            )),
            "{stderr}"
        );
        let stderr = run(flag, &empty);
        assert_eq!(
            stderr,
            format!(
                "stockd: cannot use {} as the webhooks' CA file (--webhook-ca-file): it holds \
                 no PEM certificate (-----BEGIN CERTIFICATE-----)\n",
                empty.display()
            )
        );
        let stderr = run(flag, &garbage);
        assert!(
            stderr.starts_with(&format!(
                "stockd: cannot use {} as the webhooks' CA file (--webhook-ca-file): a \
                 certificate in it cannot be used",
                garbage.display()
            )),
            "{stderr}"
        );
    }
    assert!(!dir.path().join("data").exists(), "refused before recovery");
    assert!(!dir.path().join("snapshots").exists());
}
