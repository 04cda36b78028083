//! Rules of the contract (docs/API.md) that the implementation follows but no other test
//! exercised: default TTL, paging limits, If-Match details, reservation action bodies, the
//! upper limits of every field over HTTP, body errors on the reservation endpoint,
//! Idempotency-Key edge cases, response details, and the command line. Every in-process
//! server runs on 127.0.0.1:0 and is stopped even when its test fails (`with_server`);
//! every child process is killed on drop.

mod common;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::sync::Arc;
use std::time::Duration;

use common::{Answer, ChildServer, Client, TestServer, SERVE_FLAGS, START_MS};
use futures_util::{FutureExt, StreamExt};
use reqwest::header::{HeaderName, HeaderValue};
use reqwest::Method;
use serde_json::{json, Value};
use stockd::clock::ManualClock;
use stockd::{Config, Durability};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// What a test body gets from `with_server`.
struct Ctx {
    client: Client,
    clock: Arc<ManualClock>,
}

/// Starts an in-process server (on 127.0.0.1:0, its configuration adjusted by `tweak`),
/// runs `body`, and stops the server whether `body` passed or panicked.
async fn with_server<F, Fut>(tweak: fn(&mut Config), body: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(START_MS));
    let mut t = TestServer::start_tweaked(dir, clock, Durability::Sync, tweak).await;
    let ctx = Ctx {
        client: t.client.clone(),
        clock: t.clock.clone(),
    };
    let outcome = AssertUnwindSafe(body(ctx)).catch_unwind().await;
    match outcome {
        Ok(()) => t.stop().await,
        Err(panic) => {
            // Best effort: the test's own failure is the one to report.
            if let Some(server) = t.server.take() {
                let _ = server.shutdown().await;
            }
            std::panic::resume_unwind(panic)
        }
    }
}

fn defaults(_: &mut Config) {}

/// A request with full control of the headers (raw bytes) and of the body: no
/// Content-Type is added.
async fn raw(
    base: &str,
    method: Method,
    path: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &[u8])],
) -> Answer {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let mut req = http.request(method, format!("{base}{path}"));
    for (name, value) in headers {
        req = req.header(
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_bytes(value).expect("header value"),
        );
    }
    if let Some(body) = body {
        req = req.body(body.to_vec());
    }
    let res = req.send().await.expect("request");
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = res.bytes().await.expect("body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    Answer {
        status,
        headers,
        body,
    }
}

async fn send(
    c: &Client,
    method: &str,
    path: &str,
    body: Option<&str>,
    h: &[(&str, &str)],
) -> Answer {
    let method = Method::from_bytes(method.as_bytes()).expect("method");
    c.send(method, path, body, h).await.expect("request")
}

/// A timestamp member: asserts the contract's shape (RFC 3339, UTC, milliseconds:
/// `2026-11-22T10:00:00.123Z`) and returns it in milliseconds since the epoch.
fn ms(ts: &Value) -> i64 {
    let s = ts
        .as_str()
        .unwrap_or_else(|| panic!("timestamp is not a string: {ts}"));
    let b = s.as_bytes();
    let shape = b.len() == 24
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            23 => *c == b'Z',
            _ => c.is_ascii_digit(),
        });
    assert!(shape, "{s:?} is not RFC 3339 UTC with milliseconds");
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("{s:?}: {e}"))
        .timestamp_millis()
}

/// `expires_at − created_at` of a reservation view, in milliseconds.
fn ttl_ms(view: &Value) -> i64 {
    ms(&view["expires_at"]) - ms(&view["created_at"])
}

fn id_of(a: &Answer) -> String {
    assert_eq!(a.status, 201, "{:?}", a.body);
    a.body["id"].as_str().expect("id").to_string()
}

fn skus(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items: {page}"))
        .iter()
        .map(|p| p["sku"].as_str().expect("sku").to_string())
        .collect()
}

/// Creates `n` products `P0000`, `P0001`, ... with `on_hand` units each, 16 at a time.
async fn create_many(c: &Client, n: usize, on_hand: u64) {
    futures_util::stream::iter(0..n)
        .map(|i| {
            let c = c.clone();
            async move {
                c.create_product(&format!("P{i:04}"), on_hand).await;
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
}

// ---------------------------------------------------------------------------------------
// 1. Default TTL
// ---------------------------------------------------------------------------------------

/// docs/API.md: "`ttl_seconds`: 1..=86400; default set by the server's configuration (300)."
#[tokio::test]
async fn a_reservation_without_ttl_seconds_lives_300_seconds() {
    with_server(defaults, |t| async move {
        let c = &t.client;
        c.create_product("A", 5).await;
        let a = c.reserve("u", "A", 1).await;
        assert_eq!(a.status, 201, "{:?}", a.body);
        assert_eq!(ttl_ms(&a.body), 300_000, "{:?}", a.body);
        assert_eq!(ms(&a.body["created_at"]), START_MS);
        let id = id_of(&a);
        let got = c.get(&format!("/v1/reservations/{id}")).await;
        assert_eq!(ttl_ms(&got.body), 300_000);
    })
    .await;
}

#[tokio::test]
async fn a_configured_default_ttl_replaces_300() {
    with_server(
        |config| config.default_ttl_seconds = 42,
        |t| async move {
            let c = &t.client;
            c.create_product("A", 5).await;
            let a = c.reserve("u", "A", 1).await;
            assert_eq!(a.status, 201, "{:?}", a.body);
            assert_eq!(ttl_ms(&a.body), 42_000, "{:?}", a.body);
            // A request's own ttl_seconds still wins over the default.
            let a = c
                .post(
                    "/v1/reservations",
                    json!({"customer_id": "u", "items": [{"sku": "A", "quantity": 1}], "ttl_seconds": 7}),
                )
                .await;
            assert_eq!(a.status, 201, "{:?}", a.body);
            assert_eq!(ttl_ms(&a.body), 7_000);
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// 2. Listing products
// ---------------------------------------------------------------------------------------

/// docs/API.md: "`limit` 1..=1000, default 100", "ordered by SKU", `next_after` continues.
#[tokio::test]
async fn listing_pages_by_100_by_default_and_takes_up_to_1000() {
    with_server(defaults, |t| async move {
        let c = &t.client;
        create_many(c, 1001, 1).await;
        let expected = |range: std::ops::Range<usize>| -> Vec<String> {
            range.map(|i| format!("P{i:04}")).collect()
        };

        let first = c.get("/v1/products").await;
        assert_eq!(first.status, 200, "{:?}", first.body);
        assert_eq!(skus(&first.body), expected(0..100));
        assert_eq!(first.body["next_after"], "P0099");
        let second = c.get("/v1/products?after=P0099").await;
        assert_eq!(second.status, 200, "{:?}", second.body);
        assert_eq!(skus(&second.body), expected(100..200));
        assert_eq!(second.body["next_after"], "P0199");

        let big = c.get("/v1/products?limit=1000").await;
        assert_eq!(big.status, 200, "{:?}", big.body);
        assert_eq!(skus(&big.body), expected(0..1000));
        assert_eq!(big.body["next_after"], "P0999");
        let rest = c.get("/v1/products?limit=1000&after=P0999").await;
        assert_eq!(skus(&rest.body), expected(1000..1001));
        assert_eq!(rest.body["next_after"], Value::Null);
    })
    .await;
}

#[tokio::test]
async fn listing_refuses_a_bad_limit_or_after_naming_the_parameter() {
    with_server(defaults, |t| async move {
        let c = &t.client;
        c.create_product("A", 1).await;
        let long_sku = "S".repeat(65);
        let cases = [
            ("limit=0".to_string(), "limit"),
            ("limit=1001".to_string(), "limit"),
            ("limit=-1".to_string(), "limit"),
            ("limit=1.5".to_string(), "limit"),
            ("limit=ten".to_string(), "limit"),
            ("limit=".to_string(), "limit"),
            ("after=bad%20sku".to_string(), "after"),
            ("after=".to_string(), "after"),
            (format!("after={long_sku}"), "after"),
            ("limit=5&after=a%2Fb".to_string(), "after"),
        ];
        for (query, field) in cases {
            let a = c.get(&format!("/v1/products?{query}")).await;
            a.assert_problem(422, "validation_failed");
            assert_eq!(a.body["field"], field, "{query}: {:?}", a.body);
        }
        // The bounds themselves are accepted.
        for query in ["limit=1", "limit=1000", "after=A"] {
            let a = c.get(&format!("/v1/products?{query}")).await;
            assert_eq!(a.status, 200, "{query}: {:?}", a.body);
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 3. If-Match
// ---------------------------------------------------------------------------------------

/// docs/API.md: `PATCH` honours `If-Match: "<version>"`: 412 `version_mismatch`, and "412
/// `version_mismatch` answers carry `current_version`".
#[tokio::test]
async fn patch_with_a_stale_if_match_is_412_with_the_current_version() {
    with_server(defaults, |t| async move {
        let c = &t.client;
        c.create_product("A", 5).await;
        let a = send(
            c,
            "PATCH",
            "/v1/products/A",
            Some(r#"{"name":"second"}"#),
            &[],
        )
        .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        assert_eq!(a.body["version"], 2);

        let stale = send(
            c,
            "PATCH",
            "/v1/products/A",
            Some(r#"{"name":"lost update"}"#),
            &[("if-match", "\"1\"")],
        )
        .await;
        stale.assert_problem(412, "version_mismatch");
        assert_eq!(stale.body["current_version"], 2, "{:?}", stale.body);
        assert_eq!(stale.body["sku"], "A");
        let p = c.product("A").await;
        assert_eq!(
            (p["name"].as_str(), p["version"].as_u64()),
            (Some("second"), Some(2))
        );

        let ok = send(
            c,
            "PATCH",
            "/v1/products/A",
            Some(r#"{"name":"third"}"#),
            &[("if-match", "\"2\"")],
        )
        .await;
        assert_eq!(ok.status, 200, "{:?}", ok.body);
        assert_eq!(
            (ok.body["name"].as_str(), ok.body["version"].as_u64()),
            (Some("third"), Some(3))
        );
        assert_eq!(ok.header("etag"), Some("\"3\""));
    })
    .await;
}

/// docs/API.md: "`If-Match: *` matches any version".
#[tokio::test]
async fn if_match_star_matches_any_version() {
    with_server(defaults, |t| async move {
        let c = &t.client;
        c.create_product("A", 5).await;
        let star = [("if-match", "*")];
        let a = send(c, "PATCH", "/v1/products/A", Some(r#"{"name":"n"}"#), &star).await;
        assert_eq!(
            (a.status.as_u16(), a.body["version"].as_u64()),
            (200, Some(2)),
            "{:?}",
            a.body
        );
        let a = send(
            c,
            "POST",
            "/v1/products/A/replenish",
            Some(r#"{"quantity":3}"#),
            &star,
        )
        .await;
        assert_eq!(
            (a.status.as_u16(), a.body["on_hand"].as_u64()),
            (200, Some(8)),
            "{:?}",
            a.body
        );
        let a = send(
            c,
            "POST",
            "/v1/products/A/adjust",
            Some(r#"{"delta":-2}"#),
            &star,
        )
        .await;
        assert_eq!(
            (a.status.as_u16(), a.body["on_hand"].as_u64()),
            (200, Some(6)),
            "{:?}",
            a.body
        );
        let a = send(c, "DELETE", "/v1/products/A", None, &star).await;
        assert_eq!(a.status, 204, "{:?}", a.body);
        c.get("/v1/products/A")
            .await
            .assert_problem(404, "product_not_found");
    })
    .await;
}

/// docs/API.md: `adjust` honours `If-Match: "<version>"`.
#[tokio::test]
async fn adjust_honours_if_match() {
    with_server(defaults, |t| async move {
        let c = &t.client;
        c.create_product("A", 5).await;
        c.post("/v1/products/A/replenish", json!({"quantity": 1}))
            .await;
        // Now at version 2.
        let stale = send(
            c,
            "POST",
            "/v1/products/A/adjust",
            Some(r#"{"delta":-1,"reason":"damaged"}"#),
            &[("if-match", "\"1\"")],
        )
        .await;
        stale.assert_problem(412, "version_mismatch");
        assert_eq!(stale.body["current_version"], 2, "{:?}", stale.body);
        let p = c.product("A").await;
        assert_eq!(
            (p["on_hand"].as_u64(), p["version"].as_u64()),
            (Some(6), Some(2))
        );

        let ok = send(
            c,
            "POST",
            "/v1/products/A/adjust",
            Some(r#"{"delta":-1,"reason":"damaged"}"#),
            &[("if-match", "\"2\"")],
        )
        .await;
        assert_eq!(ok.status, 200, "{:?}", ok.body);
        assert_eq!(
            (ok.body["on_hand"].as_u64(), ok.body["version"].as_u64()),
            (Some(5), Some(3))
        );
        assert_eq!(ok.header("etag"), Some("\"3\""));
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 4. Reservation actions
// ---------------------------------------------------------------------------------------

/// docs/API.md: confirm `{"order_id"?}` "(body optional)".
#[tokio::test]
async fn confirm_without_any_body_or_content_type_confirms() {
    with_server(defaults, |t| async move {
        let c = &t.client;
        c.create_product("A", 5).await;
        let id = id_of(&c.reserve("u", "A", 2).await);
        let a = raw(
            &c.base,
            Method::POST,
            &format!("/v1/reservations/{id}/confirm"),
            None,
            &[],
        )
        .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        assert_eq!(a.body["status"], "confirmed");
        assert_eq!(a.body["order_id"], Value::Null);
        assert_eq!(ms(&a.body["confirmed_at"]), START_MS);
        let p = c.product("A").await;
        assert_eq!(
            (
                p["on_hand"].as_u64(),
                p["reserved"].as_u64(),
                p["sold"].as_u64()
            ),
            (Some(3), Some(0), Some(2))
        );
    })
    .await;
}

/// docs/API.md: 404 `reservation_not_found` "for any id that names no reservation, including
/// one that is not even a UUID", and for the actions on such an id.
#[tokio::test]
async fn actions_on_an_id_that_is_not_a_uuid_are_404() {
    with_server(defaults, |t| async move {
        let c = &t.client;
        c.create_product("A", 5).await;
        let real = id_of(&c.reserve("u", "A", 1).await);
        let longer = format!("{real}0");
        let not_uuids = ["not-a-uuid", "42", longer.as_str(), &real[..35]];
        for id in not_uuids {
            for (action, body) in [
                ("confirm", json!({"order_id": "o-1"})),
                ("cancel", json!({})),
                ("extend", json!({"ttl_seconds": 60})),
            ] {
                let a = c
                    .post(&format!("/v1/reservations/{id}/{action}"), body)
                    .await;
                a.assert_problem(404, "reservation_not_found");
                assert_eq!(a.body["id"], id, "{action} {id}: {:?}", a.body);
            }
        }
        let r = c.get(&format!("/v1/reservations/{real}")).await;
        assert_eq!(r.body["status"], "pending", "the real one untouched");
        assert_eq!(c.product("A").await["reserved"], 1);
    })
    .await;
}

/// docs/API.md: "`cancel` takes no body; an empty body or `{}` is accepted, anything else
/// is 422."
#[tokio::test]
async fn cancel_with_a_body_other_than_an_empty_object_is_422() {
    with_server(defaults, |t| async move {
        let c = &t.client;
        c.create_product("A", 5).await;
        let id = id_of(&c.reserve("u", "A", 2).await);
        let path = format!("/v1/reservations/{id}/cancel");
        for body in [
            r#"{"reason":"changed my mind"}"#,
            r#"{"order_id":"o"}"#,
            "[]",
            "null",
            "1",
        ] {
            let a = send(c, "POST", &path, Some(body), &[]).await;
            a.assert_problem(422, "validation_failed");
            assert_eq!(a.body["field"], "body", "{body}: {:?}", a.body);
        }
        assert_eq!(
            c.get(&format!("/v1/reservations/{id}")).await.body["status"],
            "pending"
        );
        assert_eq!(c.product("A").await["reserved"], 2, "nothing released");
        let a = send(c, "POST", &path, Some("{}"), &[]).await;
        assert_eq!(
            (a.status.as_u16(), a.body["status"].as_str()),
            (200, Some("cancelled"))
        );
        assert_eq!(c.product("A").await["reserved"], 0);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 5. Field validation over HTTP
// ---------------------------------------------------------------------------------------

/// docs/API.md: "`order_id` 1..=128", "`reason` is 1..=500 characters"; wrong type or out of
/// range is 422 naming the field.
#[tokio::test]
async fn order_id_and_reason_are_checked_naming_the_field() {
    with_server(defaults, |t| async move {
        let c = &t.client;
        c.create_product("A", 50).await;
        let id = id_of(&c.reserve("u", "A", 1).await);
        let confirm = format!("/v1/reservations/{id}/confirm");
        for order_id in [
            json!("o".repeat(129)),
            json!(""),
            json!(5),
            json!(["o"]),
            json!({"id": "o"}),
        ] {
            let a = c.post(&confirm, json!({"order_id": order_id})).await;
            a.assert_problem(422, "validation_failed");
            assert_eq!(a.body["field"], "order_id", "{order_id}: {:?}", a.body);
        }
        assert_eq!(
            c.get(&format!("/v1/reservations/{id}")).await.body["status"],
            "pending"
        );
        let longest = "o".repeat(128);
        let a = c.post(&confirm, json!({"order_id": longest})).await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        assert_eq!(a.body["order_id"], longest);

        for reason in [json!("r".repeat(501)), json!(""), json!(5), json!(true)] {
            let a = c
                .post(
                    "/v1/products/A/adjust",
                    json!({"delta": -1, "reason": reason}),
                )
                .await;
            a.assert_problem(422, "validation_failed");
            assert_eq!(a.body["field"], "reason", "{reason}: {:?}", a.body);
        }
        let version = c.product("A").await["version"].clone();
        let a = c
            .post(
                "/v1/products/A/adjust",
                json!({"delta": -1, "reason": "r".repeat(500)}),
            )
            .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        assert_eq!(a.body["version"], version.as_u64().unwrap() + 1);
    })
    .await;
}

/// docs/API.md: "`name` is 1..=200 characters" (characters, not bytes).
#[tokio::test]
async fn a_product_name_is_1_to_200_characters() {
    with_server(defaults, |t| async move {
        let c = &t.client;
        let a = c
            .post("/v1/products", json!({"sku": "A", "name": "n".repeat(201)}))
            .await;
        a.assert_problem(422, "validation_failed");
        assert_eq!(a.body["field"], "name");
        c.get("/v1/products/A")
            .await
            .assert_problem(404, "product_not_found");
        let a = c
            .post("/v1/products", json!({"sku": "A", "name": "n".repeat(200)}))
            .await;
        assert_eq!(a.status, 201, "{:?}", a.body);
        // 200 two-byte characters: 400 bytes, still 200 characters.
        let accents = "é".repeat(200);
        let a = c
            .post("/v1/products", json!({"sku": "B", "name": accents}))
            .await;
        assert_eq!(a.status, 201, "{:?}", a.body);
        assert_eq!(a.body["name"], accents);
        // PATCH holds the same limit.
        let a = send(
            c,
            "PATCH",
            "/v1/products/A",
            Some(&json!({"name": "n".repeat(201)}).to_string()),
            &[],
        )
        .await;
        a.assert_problem(422, "validation_failed");
        assert_eq!(a.body["field"], "name");
        assert_eq!(c.product("A").await["version"], 1);
    })
    .await;
}

/// docs/API.md: "`items`: 1..=100 lines".
#[tokio::test]
async fn a_reservation_takes_100_lines_and_refuses_101() {
    with_server(defaults, |t| async move {
        let c = &t.client;
        create_many(c, 101, 1).await;
        let lines = |n: usize| -> Vec<Value> {
            (0..n)
                .map(|i| json!({"sku": format!("P{i:04}"), "quantity": 1}))
                .collect()
        };
        let a = c
            .post(
                "/v1/reservations",
                json!({"customer_id": "u", "items": lines(101)}),
            )
            .await;
        a.assert_problem(422, "validation_failed");
        assert_eq!(a.body["field"], "items");
        assert_eq!(c.product("P0000").await["reserved"], 0, "nothing held");

        let a = c
            .post(
                "/v1/reservations",
                json!({"customer_id": "u", "items": lines(100)}),
            )
            .await;
        assert_eq!(a.status, 201, "{:?}", a.body);
        assert_eq!(a.body["items"].as_array().map(Vec::len), Some(100));
        let page = c.get("/v1/products?limit=1000").await;
        let reserved: Vec<u64> = page.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["reserved"].as_u64().unwrap())
            .collect();
        let mut expected = vec![1; 100];
        expected.push(0);
        assert_eq!(reserved, expected);
    })
    .await;
}

/// docs/API.md: "A requested quantity is 1..=1_000_000_000."
#[tokio::test]
async fn a_line_takes_up_to_1_000_000_000_units() {
    with_server(defaults, |t| async move {
        let c = &t.client;
        c.create_product("BIG", 2_000_000_001).await;
        let a = c.reserve("u", "BIG", 1_000_000_000).await;
        assert_eq!(a.status, 201, "{:?}", a.body);
        assert_eq!(a.body["items"][0]["quantity"], 1_000_000_000u64);
        // 1_000_000_001 are still available: the refusal is the limit, not the stock.
        let a = c.reserve("u", "BIG", 1_000_000_001).await;
        a.assert_problem(422, "validation_failed");
        assert_eq!(a.body["field"], "items[0].quantity");
        let p = c.product("BIG").await;
        assert_eq!(
            (p["reserved"].as_u64(), p["available"].as_u64()),
            (Some(1_000_000_000), Some(1_000_000_001))
        );
    })
    .await;
}

/// docs/API.md: "`ttl_seconds`: 1..=86400"; extend takes the same `ttl_seconds`.
#[tokio::test]
async fn ttl_seconds_goes_up_to_86400() {
    with_server(defaults, |t| async move {
        let c = &t.client;
        c.create_product("A", 5).await;
        let body = |ttl: u64| json!({"customer_id": "u", "items": [{"sku": "A", "quantity": 1}], "ttl_seconds": ttl});
        let a = c.post("/v1/reservations", body(86_401)).await;
        a.assert_problem(422, "validation_failed");
        assert_eq!(a.body["field"], "ttl_seconds");
        let a = c.post("/v1/reservations", body(86_400)).await;
        assert_eq!(a.status, 201, "{:?}", a.body);
        assert_eq!(ttl_ms(&a.body), 86_400_000);
        let id = id_of(&a);

        t.clock.advance_ms(1_000);
        let extend = format!("/v1/reservations/{id}/extend");
        let a = c.post(&extend, json!({"ttl_seconds": 86_401})).await;
        a.assert_problem(422, "validation_failed");
        assert_eq!(a.body["field"], "ttl_seconds");
        let a = c.post(&extend, json!({"ttl_seconds": 86_400})).await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        assert_eq!(ms(&a.body["expires_at"]), START_MS + 1_000 + 86_400_000);
    })
    .await;
}

/// docs/API.md: "`customer_id` is 1..=128 printable characters".
#[tokio::test]
async fn customer_id_goes_up_to_128_characters() {
    with_server(defaults, |t| async move {
        let c = &t.client;
        c.create_product("A", 5).await;
        let a = c.reserve(&"c".repeat(129), "A", 1).await;
        a.assert_problem(422, "validation_failed");
        assert_eq!(a.body["field"], "customer_id");
        for customer in ["c".repeat(128), "é".repeat(128)] {
            let a = c.reserve(&customer, "A", 1).await;
            assert_eq!(a.status, 201, "{:?}", a.body);
            assert_eq!(a.body["customer_id"], customer);
        }
        assert_eq!(c.product("A").await["reserved"], 2);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 6. Body errors on the reservation endpoint
// ---------------------------------------------------------------------------------------

/// docs/API.md: syntactically invalid JSON → 400 `bad_request`, and "A body sent with a
/// `Content-Type` other than `application/json` (or `*/*+json`) is 400; a body without
/// `Content-Type` is read as JSON."
#[tokio::test]
async fn reservation_bodies_malformed_or_not_json_are_400() {
    with_server(defaults, |t| async move {
        let c = &t.client;
        c.create_product("A", 5).await;
        let valid = r#"{"customer_id":"u","items":[{"sku":"A","quantity":1}]}"#;
        for bad in [
            r#"{"customer_id":"u","items":[{"sku":"A","quantity":1}]"#,
            r#"{"customer_id":"u","items":[{"sku":"A","quantity":1}],}"#,
            r#"{"customer_id":'u'}"#,
        ] {
            send(c, "POST", "/v1/reservations", Some(bad), &[])
                .await
                .assert_problem(400, "bad_request");
        }
        for content_type in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "application/xml",
        ] {
            send(
                c,
                "POST",
                "/v1/reservations",
                Some(valid),
                &[("content-type", content_type)],
            )
            .await
            .assert_problem(400, "bad_request");
        }
        assert_eq!(c.product("A").await["reserved"], 0, "nothing held");

        // Accepted: a +json type, parameters, and no Content-Type at all.
        for content_type in [
            "application/json; charset=utf-8",
            "application/vnd.stockd+json",
        ] {
            let a = send(
                c,
                "POST",
                "/v1/reservations",
                Some(valid),
                &[("content-type", content_type)],
            )
            .await;
            assert_eq!(a.status, 201, "{content_type}: {:?}", a.body);
        }
        let a = raw(
            &c.base,
            Method::POST,
            "/v1/reservations",
            Some(valid.as_bytes()),
            &[],
        )
        .await;
        assert_eq!(a.status, 201, "no Content-Type: {:?}", a.body);
        assert_eq!(c.product("A").await["reserved"], 3);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 7. Idempotency-Key
// ---------------------------------------------------------------------------------------

// The same key while the first request is still in flight (409
// `idempotency_key_in_flight`, `Retry-After: 1`): tests/http_api.rs,
// `a_key_whose_first_request_is_still_in_flight_answers_409`.

/// docs/API.md: `Idempotency-Key` is "1..=255 printable ASCII"; a malformed header is 400
/// `bad_request` ("malformed JSON or headers").
#[tokio::test]
async fn an_idempotency_key_must_be_1_to_255_printable_ascii() {
    with_server(defaults, |t| async move {
        let c = &t.client;
        c.create_product("A", 10).await;
        let body = br#"{"customer_id":"u","items":[{"sku":"A","quantity":1}]}"#;
        let long = vec![b'k'; 256];
        let bad: [&[u8]; 5] = [b"a\tb", b"caf\xc3\xa9", b"k\xff", b"", &long];
        let reserve_with_key = |key: &[u8]| {
            let (base, key) = (c.base.clone(), key.to_vec());
            async move {
                raw(
                    &base,
                    Method::POST,
                    "/v1/reservations",
                    Some(body),
                    &[
                        ("content-type", &b"application/json"[..]),
                        ("idempotency-key", &key),
                    ],
                )
                .await
            }
        };
        for key in bad {
            let a = reserve_with_key(key).await;
            a.assert_problem(400, "bad_request");
            assert!(
                a.body["detail"]
                    .as_str()
                    .unwrap_or("")
                    .contains("Idempotency-Key"),
                "{:?}",
                a.body
            );
        }
        assert_eq!(c.product("A").await["reserved"], 0, "nothing held");
        let longest = vec![b'k'; 255];
        let good: [&[u8]; 2] = [&longest, b"a b ~!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}"];
        for key in good {
            let a = reserve_with_key(key).await;
            assert_eq!(a.status, 201, "{:?}", a.body);
        }
        assert_eq!(c.product("A").await["reserved"], 2);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 8. Response details
// ---------------------------------------------------------------------------------------

/// docs/API.md: "JSON in and out".
#[tokio::test]
async fn successful_answers_are_application_json() {
    with_server(defaults, |t| async move {
        let c = &t.client;
        let json_ct = Some("application/json");
        let a = c.create_product("A", 5).await;
        assert_eq!(a.header("content-type"), json_ct, "product create");
        let a = c.get("/v1/products/A").await;
        assert_eq!(
            (a.status.as_u16(), a.header("content-type")),
            (200, json_ct),
            "product get"
        );
        let a = c.get("/v1/products").await;
        assert_eq!(
            (a.status.as_u16(), a.header("content-type")),
            (200, json_ct),
            "list"
        );
        let a = c
            .post("/v1/products/A/replenish", json!({"quantity": 1}))
            .await;
        assert_eq!(
            (a.status.as_u16(), a.header("content-type")),
            (200, json_ct),
            "replenish"
        );
        let a = c.reserve("u", "A", 1).await;
        assert_eq!(
            (a.status.as_u16(), a.header("content-type")),
            (201, json_ct),
            "reserve"
        );
        let id = id_of(&a);
        let a = c.get(&format!("/v1/reservations/{id}")).await;
        assert_eq!(
            (a.status.as_u16(), a.header("content-type")),
            (200, json_ct),
            "reservation get"
        );
        let a = c
            .post(&format!("/v1/reservations/{id}/confirm"), json!({}))
            .await;
        assert_eq!(
            (a.status.as_u16(), a.header("content-type")),
            (200, json_ct),
            "confirm"
        );
    })
    .await;
}

/// docs/API.md's reservation view: `"order_id": null` while pending; the confirm's `order_id`
/// afterwards. docs/API.md: an `order_id` sent with a repeated confirm is ignored.
#[tokio::test]
async fn order_id_is_null_until_confirmed_with_one() {
    with_server(defaults, |t| async move {
        let c = &t.client;
        c.create_product("A", 5).await;
        let a = c.reserve("u", "A", 1).await;
        let id = id_of(&a);
        let has_null = |v: &Value, key: &str| {
            v.as_object()
                .is_some_and(|o| o.get(key) == Some(&Value::Null))
        };
        assert!(
            has_null(&a.body, "order_id"),
            "order_id present and null: {:?}",
            a.body
        );
        assert!(has_null(&a.body, "confirmed_at"), "{:?}", a.body);
        let got = c.get(&format!("/v1/reservations/{id}")).await;
        assert!(has_null(&got.body, "order_id"), "{:?}", got.body);

        let a = c
            .post(
                &format!("/v1/reservations/{id}/confirm"),
                json!({"order_id": "ord-1"}),
            )
            .await;
        assert_eq!(
            (a.status.as_u16(), a.body["order_id"].as_str()),
            (200, Some("ord-1")),
            "{:?}",
            a.body
        );
        let got = c.get(&format!("/v1/reservations/{id}")).await;
        assert_eq!(got.body["order_id"], "ord-1");
        let again = c
            .post(
                &format!("/v1/reservations/{id}/confirm"),
                json!({"order_id": "ord-2"}),
            )
            .await;
        assert_eq!(
            (again.status.as_u16(), again.body["order_id"].as_str()),
            (200, Some("ord-1"))
        );

        // Confirmed without one: still null.
        let other = id_of(&c.reserve("u", "A", 1).await);
        let a = c
            .post(&format!("/v1/reservations/{other}/confirm"), json!({}))
            .await;
        assert_eq!(a.body["status"], "confirmed");
        assert!(has_null(&a.body, "order_id"), "{:?}", a.body);
    })
    .await;
}

/// docs/API.md's product view has `updated_at`, a timestamp in the contract's format, which
/// follows the product's changes.
#[tokio::test]
async fn updated_at_is_a_timestamp_that_follows_every_change() {
    with_server(defaults, |t| async move {
        let c = &t.client;
        let p = c.create_product("A", 5).await.body;
        assert_eq!(ms(&p["updated_at"]), START_MS);
        assert_eq!(ms(&p["created_at"]), START_MS);

        t.clock.advance_ms(1_500);
        let p = c
            .post("/v1/products/A/replenish", json!({"quantity": 2}))
            .await
            .body;
        assert_eq!(ms(&p["updated_at"]), START_MS + 1_500, "{p}");
        assert_eq!(p["updated_at"], "2026-11-22T10:00:01.500Z");
        assert_eq!(ms(&p["created_at"]), START_MS, "created_at stays");

        t.clock.advance_ms(2_000);
        let p = c
            .post("/v1/products/A/adjust", json!({"delta": -1}))
            .await
            .body;
        assert_eq!(ms(&p["updated_at"]), START_MS + 3_500, "{p}");

        t.clock.advance_ms(1_000);
        assert_eq!(c.reserve("u", "A", 1).await.status, 201);
        let p = c.product("A").await;
        assert_eq!(
            ms(&p["updated_at"]),
            START_MS + 4_500,
            "a hold changes the product: {p}"
        );
        assert_eq!(p["version"], 4);
        let listed = c.get("/v1/products").await.body;
        assert_eq!(listed["items"][0]["updated_at"], p["updated_at"]);
    })
    .await;
}

/// docs/API.md: 405 `method_not_allowed`; the `Allow` header lists the route's methods, on
/// every route (not only /v1/products), and none of them is refused with 405.
#[tokio::test]
async fn every_route_answers_405_with_its_allow_header() {
    with_server(defaults, |t| async move {
        let c = &t.client;
        c.create_product("A", 5).await;
        let id = id_of(&c.reserve("u", "A", 1).await);
        let r = format!("/v1/reservations/{id}");
        let cases: Vec<(&str, String, &str)> = vec![
            ("DELETE", "/health".into(), "GET, HEAD"),
            ("PUT", "/health".into(), "GET, HEAD"),
            ("PUT", "/v1/products/A".into(), "GET, HEAD, PATCH, DELETE"),
            ("POST", "/v1/products/A".into(), "GET, HEAD, PATCH, DELETE"),
            ("GET", "/v1/products/A/replenish".into(), "POST"),
            ("PUT", "/v1/products/A/adjust".into(), "POST"),
            ("DELETE", "/v1/reservations".into(), "POST"),
            ("POST", r.clone(), "GET, HEAD"),
            ("DELETE", r.clone(), "GET, HEAD"),
            ("GET", format!("{r}/confirm"), "POST"),
            ("PUT", format!("{r}/cancel"), "POST"),
            ("PATCH", format!("{r}/extend"), "POST"),
            ("GET", "/v1/admin/snapshot".into(), "POST"),
        ];
        for (method, path, allow) in &cases {
            let a = send(c, method, path, None, &[]).await;
            a.assert_problem(405, "method_not_allowed");
            assert_eq!(a.header("allow"), Some(*allow), "{method} {path}");
        }
        // Every method listed is routed (whatever the request's own outcome).
        for (_, path, allow) in &cases {
            for method in allow.split(", ") {
                let a = send(c, method, path, None, &[]).await;
                assert_ne!(a.status, 405, "{method} {path}: {:?}", a.body);
                assert_ne!(a.code(), "not_found", "{method} {path}");
            }
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 9. Command line
// ---------------------------------------------------------------------------------------

fn stockd(cwd: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stockd"));
    cmd.current_dir(cwd).env("RUST_LOG", "warn");
    // Only what a test sets: nothing inherited from whoever runs the tests.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("STOCKD_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Runs `cmd` to its end (killed after 20 s, should it start serving instead): exit
/// status, stdout, stderr.
fn run_to_exit(cmd: Command) -> (ExitStatus, String, String) {
    let exited = loadtest::server::run_to_exit(cmd, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("stockd: {e}"));
    (exited.status, exited.stdout, exited.stderr)
}

/// docs/API.md: "`stockd` (same as `stockd serve`) starts the server with embedded defaults:
/// ... write-ahead log in `./data`, snapshots in `./snapshots`." The address comes from
/// `STOCKD_LISTEN` (the default port 8080 may be taken on a test machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_stockd_serves_with_its_data_in_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = stockd(dir.path());
    cmd.env("STOCKD_LISTEN", "127.0.0.1:0");
    let mut server = ChildServer::start(cmd, dir.path().join("data"));
    let c = server.client.clone();
    assert_eq!(c.get("/health").await.status, 200);
    assert!(
        dir.path().join("data").join("log").is_dir(),
        "the log is in ./data"
    );
    assert!(
        dir.path().join("snapshots").is_dir(),
        "snapshots go to ./snapshots"
    );
    c.create_product("A", 5).await;
    let status = server.terminate();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");

    // Started again in the same directory: the same data.
    let mut cmd = stockd(dir.path());
    cmd.env("STOCKD_LISTEN", "127.0.0.1:0");
    let server = ChildServer::start(cmd, dir.path().join("data"));
    assert_eq!(server.client.product("A").await["on_hand"], 5);
}

/// Bare `stockd` takes `serve`'s flags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_stockd_takes_the_serve_flags() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path().join("cwd");
    std::fs::create_dir(&cwd).unwrap();
    let mut cmd = stockd(&cwd);
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--default-ttl",
        "9",
        "--durability",
        "async",
    ])
    .arg("--data-dir")
    .arg(dir.path().join("d"))
    .arg("--snapshot-dir")
    .arg(dir.path().join("s"));
    let mut server = ChildServer::start(cmd, dir.path().join("d"));
    let c = server.client.clone();
    c.create_product("A", 5).await;
    let a = c.reserve("u", "A", 1).await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    assert_eq!(ttl_ms(&a.body), 9_000);
    assert!(dir.path().join("d").join("log").is_dir());
    assert!(dir.path().join("s").is_dir());
    assert!(!cwd.join("data").exists(), "not the default directory");
    let status = server.terminate();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

/// docs/API.md: "`stockd --help` describes every command and flag."
#[test]
fn top_level_help_lists_the_commands_and_the_flags() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = stockd(dir.path());
    cmd.arg("--help");
    let (status, help, stderr) = run_to_exit(cmd);
    assert!(status.success(), "{status:?}: {stderr}");
    // Each command on a line of its own in the Commands section (a flag such as
    // `--snapshot-dir` must not pass for the `snapshot` command).
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for command in ["serve", "snapshot", "log"] {
        assert!(
            commands.contains(&command),
            "{command} missing from the commands {commands:?}:\n{help}"
        );
    }
    for flag in SERVE_FLAGS {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing created"
    );
}

/// docs/API.md: "each flag also has an environment variable (`STOCKD_LISTEN`,
/// `STOCKD_DATA_DIR`, ...)": data and snapshot directories, default TTL, durability.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_variables_configure_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path().join("cwd");
    std::fs::create_dir(&cwd).unwrap();
    let (data, snaps) = (dir.path().join("env-data"), dir.path().join("env-snaps"));
    let command = || {
        let mut cmd = stockd(&cwd);
        cmd.arg("serve")
            .env("STOCKD_LISTEN", "127.0.0.1:0")
            .env("STOCKD_DATA_DIR", &data)
            .env("STOCKD_SNAPSHOT_DIR", &snaps)
            .env("STOCKD_DEFAULT_TTL", "42")
            .env("STOCKD_DURABILITY", "async");
        cmd
    };
    let mut server = ChildServer::start(command(), data.clone());
    let c = server.client.clone();
    assert!(
        data.join("log").is_dir(),
        "the log is where STOCKD_DATA_DIR says"
    );
    assert!(snaps.is_dir());
    assert!(!cwd.join("data").exists() && !cwd.join("snapshots").exists());
    c.create_product("A", 5).await;
    let a = c.reserve("u", "A", 1).await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    assert_eq!(ttl_ms(&a.body), 42_000, "STOCKD_DEFAULT_TTL");
    let id = id_of(&a);
    let snap = c.post("/v1/admin/snapshot", json!({})).await;
    assert_eq!(snap.status, 201, "{:?}", snap.body);
    let file = snap.body["file"].as_str().expect("file");
    assert!(
        snaps.join(file).is_file(),
        "the snapshot is where STOCKD_SNAPSHOT_DIR says"
    );
    let status = server.terminate();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");

    let server = ChildServer::start(command(), data.clone());
    let c = &server.client;
    assert_eq!(c.product("A").await["reserved"], 1);
    assert_eq!(c.get(&format!("/v1/reservations/{id}")).await.status, 200);
}

/// The environment is read: a value a flag would refuse is refused in a variable too.
#[test]
fn an_invalid_environment_value_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (var, value) in [
        ("STOCKD_DURABILITY", "sometimes"),
        ("STOCKD_DEFAULT_TTL", "0"),
        ("STOCKD_DEFAULT_TTL", "86401"),
        ("STOCKD_LISTEN", "not-an-address"),
    ] {
        let mut cmd = stockd(dir.path());
        cmd.arg("serve")
            .env("STOCKD_LISTEN", "127.0.0.1:0")
            .env("STOCKD_DATA_DIR", dir.path().join("d"))
            .env(var, value);
        let (status, _, stderr) = run_to_exit(cmd);
        assert_eq!(status.code(), Some(2), "{var}={value}: {stderr}");
        // clap names the value and the flag the variable stands for.
        let flag = match var {
            "STOCKD_DURABILITY" => "--durability",
            "STOCKD_DEFAULT_TTL" => "--default-ttl",
            _ => "--listen",
        };
        assert!(
            stderr.contains(&format!("invalid value '{value}'")) && stderr.contains(flag),
            "{var}={value}: {stderr}"
        );
    }
    assert!(!dir.path().join("d").exists(), "nothing started");
}

// ---- start-up errors: one line on stderr, exit status 1 -------------------------------

/// `stockd serve --listen LISTEN --data-dir DATA --snapshot-dir SNAPSHOTS`, run in `cwd`.
fn serve_on(cwd: &Path, listen: &str, data: &Path, snapshots: &Path) -> Command {
    let mut cmd = stockd(cwd);
    cmd.args(["serve", "--listen", listen, "--data-dir"])
        .arg(data)
        .arg("--snapshot-dir")
        .arg(snapshots);
    cmd
}

/// `stockd serve` on `dir` (log in `dir/data`, snapshots in `dir/snapshots`) plus `extra`.
fn serve_in(dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = serve_on(
        dir,
        "127.0.0.1:0",
        &dir.join("data"),
        &dir.join("snapshots"),
    );
    cmd.args(extra);
    cmd
}

/// Runs `cmd`, which must refuse to start with exit status 1 and print `expected` on
/// stderr, once, and nothing else.
fn assert_refused(cmd: Command, expected: &str) {
    let (status, stdout, stderr) = run_to_exit(cmd);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(!stdout.contains("listening on"), "{stdout}");
    assert_eq!(stderr, format!("{expected}\n"), "exactly one line");
}

/// docs/API.md (start-up errors): a second server on a data directory in use is refused,
/// naming the likely cause.
#[test]
fn a_second_server_on_the_same_data_directory_is_refused_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let _first = ChildServer::spawn(dir.path(), &[]);
    let log = dir.path().join("data").join("log");
    assert_refused(
        serve_in(dir.path(), &[]),
        &format!(
            "stockd: the log in {} is locked by another stockd process: is another server \
             running on this data directory?",
            log.display()
        ),
    );
}

/// docs/API.md (start-up errors): an address in use is refused before anything else runs
/// (no recovery, no directory created).
#[cfg(target_os = "linux")]
#[test]
fn an_address_in_use_is_refused_before_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let (data, snapshots) = (dir.path().join("data"), dir.path().join("snapshots"));
    let cmd = serve_on(dir.path(), &addr.to_string(), &data, &snapshots);
    assert_refused(
        cmd,
        &format!("stockd: cannot listen on {addr}: Address already in use (os error 98)"),
    );
    assert!(!dir.path().join("data").exists(), "checked before recovery");
    assert!(!dir.path().join("snapshots").exists());
}

/// docs/API.md (start-up errors): a snapshot directory the server cannot write stops
/// start-up, rather than the first snapshot failing (500) hours later.
#[cfg(target_os = "linux")]
#[test]
fn a_snapshot_directory_that_cannot_be_written_is_refused_at_start_up() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let read_only = dir.path().join("read-only");
    std::fs::create_dir(&read_only).unwrap();
    std::fs::set_permissions(&read_only, std::fs::Permissions::from_mode(0o555)).unwrap();
    // root writes whatever the mode says: then a directory even root cannot write in.
    let snapshots = if std::fs::File::create(read_only.join("probe")).is_ok() {
        std::path::PathBuf::from("/sys")
    } else {
        read_only
    };
    let cmd = serve_on(
        dir.path(),
        "127.0.0.1:0",
        &dir.path().join("data"),
        &snapshots,
    );
    assert_refused(
        cmd,
        &format!(
            "stockd: cannot write to the snapshot directory {}: Permission denied (os error 13)",
            snapshots.display()
        ),
    );
}

/// docs/API.md (start-up errors): a file given as a directory is named as such.
#[test]
fn a_file_given_as_the_data_directory_is_refused_as_not_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let cmd = serve_on(dir.path(), "127.0.0.1:0", &file, &dir.path().join("s"));
    assert_refused(
        cmd,
        &format!(
            "stockd: cannot use {} as the data directory: it exists and is not a directory",
            file.display()
        ),
    );
    let cmd = serve_on(dir.path(), "127.0.0.1:0", &dir.path().join("d"), &file);
    assert_refused(
        cmd,
        &format!(
            "stockd: cannot use {} as the snapshot directory: it exists and is not a directory",
            file.display()
        ),
    );
}

/// docs/API.md: a refused value from an environment variable names the variable (clap
/// names the flag it stands for; the tip says where the value came from).
#[test]
fn a_refused_environment_value_names_its_variable() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = serve_in(dir.path(), &[]);
    cmd.env("STOCKD_DURABILITY", "foo");
    let (status, _, stderr) = run_to_exit(cmd);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(
        stderr
            .matches("error: invalid value 'foo' for '--durability <DURABILITY>'")
            .count(),
        1,
        "{stderr}"
    );
    assert_eq!(
        stderr
            .matches("tip: the value comes from the environment variable STOCKD_DURABILITY\n")
            .count(),
        1,
        "{stderr}"
    );
    // On the command line, the flag is where the value came from: no tip.
    let cmd = serve_in(dir.path(), &["--durability", "foo"]);
    let (status, _, stderr) = run_to_exit(cmd);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("invalid value 'foo'"), "{stderr}");
    assert!(!stderr.contains("environment variable"), "{stderr}");
    assert!(!dir.path().join("data").exists(), "nothing started");
}
