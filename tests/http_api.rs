//! The HTTP contract of docs/API.md, endpoint by endpoint, against an in-process
//! server on 127.0.0.1:0.

mod common;

use std::time::Duration;

use common::{eventually, holdable_becomes, restarts_reach, TestServer};
use reqwest::Method;
use serde_json::{json, Value};

#[tokio::test]
async fn health_and_unknown_routes() {
    let t = TestServer::start().await;
    let c = &t.client;
    let a = c.get("/health").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body, json!({"status": "ok", "role": "single"}));
    c.get("/nope").await.assert_problem(404, "not_found");
    c.get("/v1/products/A/nope")
        .await
        .assert_problem(404, "not_found");
    let a = c
        .send(Method::PUT, "/v1/products", None, &[])
        .await
        .unwrap();
    a.assert_problem(405, "method_not_allowed");
    assert_eq!(a.header("allow"), Some("GET, HEAD, POST"));
    let a = c
        .send(Method::GET, "/v1/reservations", None, &[])
        .await
        .unwrap();
    a.assert_problem(405, "method_not_allowed");
    assert_eq!(a.header("allow"), Some("POST"));
    let a = c.send(Method::POST, "/health", None, &[]).await.unwrap();
    a.assert_problem(405, "method_not_allowed");
    assert_eq!(a.header("allow"), Some("GET, HEAD"));
    // HEAD answers as GET would, without the body.
    let a = c.send(Method::HEAD, "/health", None, &[]).await.unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(a.body, Value::Null);
    assert_eq!(a.header("content-type"), Some("application/json"));
    t.stop().await;
}

/// `GET /v1/cluster` on a server without a cluster: node 1, role `single`, itself as the
/// only member and the leader, and one position for last, durable, committed and applied,
/// which follows the log; the newest snapshot's sequence; HEAD, 405, and still answered
/// once the log has failed (a read, like `/metrics`).
#[tokio::test]
async fn get_v1_cluster_describes_a_single_node() {
    let t = TestServer::start().await;
    let c = &t.client;
    let positions = |body: &Value| {
        ["last_seq", "durable_seq", "committed_seq", "applied_seq"]
            .map(|k| body[k].as_u64().unwrap_or_else(|| panic!("{k}: {body}")))
    };
    let a = c.get("/v1/cluster").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.header("content-type"), Some("application/json"));
    let api = c.base.strip_prefix("http://").unwrap();
    assert_eq!(
        a.body,
        json!({
            "node_id": 1,
            "role": "single",
            "term": 0,
            "leader": 1,
            "members": [{"id": 1, "api": api, "raft": null, "voter": true}],
            "last_seq": 0,
            "durable_seq": 0,
            "committed_seq": 0,
            "applied_seq": 0,
            "snapshot_seq": 0,
        })
    );
    // Each acknowledged change (sync) moves every position to its record.
    c.create_product("A", 5).await;
    c.reserve("u", "A", 2).await;
    assert_eq!(positions(&c.get("/v1/cluster").await.body), [2; 4]);
    let snap = c.post("/v1/admin/snapshot", json!({})).await;
    assert_eq!(snap.status, 201, "{:?}", snap.body);
    let a = c.get("/v1/cluster").await;
    assert_eq!(a.body["snapshot_seq"], snap.body["sequence"]);
    assert_eq!(a.body["snapshot_seq"], 2);
    let a = c
        .send(Method::HEAD, "/v1/cluster", None, &[])
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(a.body, Value::Null);
    let a = c
        .send(Method::POST, "/v1/cluster", Some("{}"), &[])
        .await
        .unwrap();
    a.assert_problem(405, "method_not_allowed");
    assert_eq!(a.header("allow"), Some("GET, HEAD"));
    t.service().inject_log_failure();
    c.post("/v1/products", json!({"sku": "B", "name": "b"}))
        .await
        .assert_problem(503, "unavailable");
    c.get("/health").await.assert_problem(503, "unavailable");
    let a = c.get("/v1/cluster").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["role"], "single");
    assert_eq!(
        positions(&a.body),
        [2; 4],
        "the refused record is not durable"
    );
    assert!(
        t.shutdown().await.is_err(),
        "shutdown reports the failed log"
    );
}

/// The membership routes on a server without a cluster: a body of the wrong shape is
/// 422 naming the field, as anywhere; a valid one is 409 `membership_conflict` (a single
/// node has no membership to change); the other methods 405. Nothing changes.
#[tokio::test]
async fn membership_changes_on_a_single_node_are_refused() {
    let t = TestServer::start().await;
    let c = &t.client;
    let before = c.get("/v1/cluster").await.body;
    let a = c
        .post(
            "/v1/admin/cluster/learners",
            json!({"id": 2, "api": "127.0.0.1:8082", "raft": "127.0.0.1:9082"}),
        )
        .await;
    a.assert_problem(409, "membership_conflict");
    assert!(
        a.body["detail"].as_str().unwrap().contains("--peers"),
        "{a:?}"
    );
    let a = c
        .post(
            "/v1/admin/cluster/learners",
            json!({"id": 2, "api": "127.0.0.1", "raft": "127.0.0.1:9082"}),
        )
        .await;
    a.assert_problem(422, "validation_failed");
    assert_eq!(a.body["field"], "api");
    let put = |body: &'static str| c.send(Method::PUT, "/v1/admin/cluster/voters", Some(body), &[]);
    put(r#"{"voters": [1]}"#)
        .await
        .unwrap()
        .assert_problem(409, "membership_conflict");
    let a = put(r#"{"voters": []}"#).await.unwrap();
    a.assert_problem(422, "validation_failed");
    assert_eq!(a.body["field"], "voters");
    put("[").await.unwrap().assert_problem(400, "bad_request");
    let a = c
        .send(Method::GET, "/v1/admin/cluster/voters", None, &[])
        .await
        .unwrap();
    a.assert_problem(405, "method_not_allowed");
    assert_eq!(a.header("allow"), Some("PUT"));
    let a = c
        .send(Method::PUT, "/v1/admin/cluster/learners", Some("{}"), &[])
        .await
        .unwrap();
    assert_eq!(a.header("allow"), Some("POST"));
    assert_eq!(c.get("/v1/cluster").await.body, before);
}

#[tokio::test]
async fn skus_in_urls_are_reachable_however_a_client_spells_them() {
    let t = TestServer::start().await;
    let c = &t.client;
    // `.` and `..` would be collapsed by URL clients as dot segments: refused up front.
    for sku in [".", ".."] {
        let a = c
            .post(
                "/v1/products",
                json!({"sku": sku, "name": "dots", "on_hand": 1}),
            )
            .await;
        a.assert_problem(422, "validation_failed");
        assert_eq!(a.body["field"], "sku");
    }
    c.create_product("...", 1).await;
    c.create_product("A-B.c_d", 4).await;
    // A percent-encoded unreserved character is the character itself (RFC 3986 6.2.2.2).
    let a = c.get("/v1/products/A%2DB%2ec%5Fd").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["sku"], "A-B.c_d");
    assert_eq!(c.get("/v1/products/%2E%2E%2E").await.body["sku"], "...");
    let a = c.get("/v1/products?after=A%2DB.c_d&limit=%31").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["items"], json!([]));
    // Anything else stays encoded, and so is no SKU.
    c.get("/v1/products/A%20B")
        .await
        .assert_problem(404, "product_not_found");
    let a = c
        .send(Method::HEAD, "/v1/products/A-B.c_d", None, &[])
        .await
        .unwrap();
    assert_eq!((a.status.as_u16(), a.body.clone()), (200, Value::Null));
    assert_eq!(a.header("etag"), Some("\"1\""));
    t.stop().await;
}

#[tokio::test]
async fn create_get_and_list_products() {
    let t = TestServer::start().await;
    let c = &t.client;
    let a = c
        .post(
            "/v1/products",
            json!({"sku": "LAPTOP-001", "name": "Premium Laptop Pro",
                   "price": {"amount_minor": 129999, "currency": "USD"}, "on_hand": 5}),
        )
        .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    assert_eq!(a.header("location"), Some("/v1/products/LAPTOP-001"));
    assert_eq!(a.body["available"], 5);
    assert_eq!(a.body["reserved"], 0);
    assert_eq!(a.body["sold"], 0);
    assert_eq!(a.body["version"], 1);
    assert_eq!(
        a.body["price"],
        json!({"amount_minor": 129999, "currency": "USD"})
    );
    assert_eq!(a.body["created_at"], "2026-11-22T10:00:00.000Z");

    let a = c.get("/v1/products/LAPTOP-001").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("etag"), Some("\"1\""));
    assert_eq!(a.body["name"], "Premium Laptop Pro");

    c.post(
        "/v1/products",
        json!({"sku": "LAPTOP-001", "name": "again"}),
    )
    .await
    .assert_problem(409, "sku_exists");
    let a = c.get("/v1/products/NOPE").await;
    a.assert_problem(404, "product_not_found");
    assert_eq!(a.body["sku"], "NOPE");
    c.get("/v1/products/bad%20sku")
        .await
        .assert_problem(404, "product_not_found");

    // No price and no on_hand: defaults.
    let a = c
        .post("/v1/products", json!({"sku": "B", "name": "Bee"}))
        .await;
    assert_eq!(a.status, 201);
    assert_eq!(a.body["price"], json!(null));
    assert_eq!(a.body["on_hand"], 0);

    for sku in ["C", "D", "E"] {
        c.create_product(sku, 1).await;
    }
    let a = c.get("/v1/products?limit=2").await;
    assert_eq!(a.status, 200);
    let skus: Vec<_> = a.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["sku"].clone())
        .collect();
    assert_eq!(skus, vec![json!("B"), json!("C")]);
    assert_eq!(a.body["next_after"], "C");
    let a = c.get("/v1/products?limit=2&after=C").await;
    let skus: Vec<_> = a.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["sku"].clone())
        .collect();
    assert_eq!(skus, vec![json!("D"), json!("E")]);
    assert_eq!(
        a.body["next_after"],
        "LAPTOP-001".to_string().replace("LAPTOP-001", "E")
    );
    let a = c.get("/v1/products?after=E").await;
    assert_eq!(a.body["items"].as_array().unwrap().len(), 1);
    assert_eq!(a.body["next_after"], json!(null));
    let a = c.get("/v1/products").await;
    assert_eq!(a.body["items"].as_array().unwrap().len(), 5);
    c.get("/v1/products?limit=0")
        .await
        .assert_problem(422, "validation_failed");
    c.get("/v1/products?limit=1001")
        .await
        .assert_problem(422, "validation_failed");
    c.get("/v1/products?limmit=5")
        .await
        .assert_problem(422, "validation_failed");
    t.stop().await;
}

#[tokio::test]
async fn malformed_and_invalid_bodies_change_nothing() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.create_product("A", 3).await;
    let bad_json = c
        .send(Method::POST, "/v1/products", Some("{\"sku\": "), &[])
        .await
        .unwrap();
    bad_json.assert_problem(400, "bad_request");
    let cases = [
        (json!({"name": "x"}), "sku"),
        (json!({"sku": "X", "name": "x", "colour": "red"}), "colour"),
        (json!({"sku": "X", "name": 5}), "name"),
        (json!({"sku": "X", "name": ""}), "name"),
        (json!({"sku": "X Y", "name": "x"}), "sku"),
        (json!({"sku": "X", "name": "x", "on_hand": 1.5}), "on_hand"),
        (json!({"sku": "X", "name": "x", "on_hand": "5"}), "on_hand"),
        (json!({"sku": "X", "name": "x", "on_hand": -1}), "on_hand"),
        (
            json!({"sku": "X", "name": "x", "on_hand": 9007199254740992u64}),
            "on_hand",
        ),
        (
            json!({"sku": "X", "name": "x", "price": {"amount_minor": 1, "currency": "usd"}}),
            "price.currency",
        ),
        (
            json!({"sku": "X", "name": "x", "price": {"amount_minor": -1, "currency": "USD"}}),
            "price.amount_minor",
        ),
        (
            json!({"sku": "X", "name": "x", "price": {"amount_minor": 1, "currency": "USD", "tax": 1}}),
            "price.tax",
        ),
        (json!([1, 2]), "body"),
    ];
    for (body, field) in cases {
        let a = c.post("/v1/products", body.clone()).await;
        a.assert_problem(422, "validation_failed");
        assert_eq!(a.body["field"], field, "{body}");
    }
    let reserve_cases = [
        (
            json!({"items": [{"sku": "A", "quantity": 1}]}),
            "customer_id",
        ),
        (json!({"customer_id": "u", "items": []}), "items"),
        (
            json!({"customer_id": "u", "items": [{"sku": "A", "quantity": 0}]}),
            "items[0].quantity",
        ),
        (
            json!({"customer_id": "u", "items": [{"sku": "A", "quantity": 1000000001u64}]}),
            "items[0].quantity",
        ),
        (
            json!({"customer_id": "u", "items": [{"sku": "A", "quantity": 1}, {"sku": "A", "quantity": 1}]}),
            "items[1].sku",
        ),
        (
            json!({"customer_id": "u", "items": [{"sku": "A", "qty": 1}]}),
            "items[0].qty",
        ),
        (
            json!({"customer_id": "u", "items": [{"sku": "A", "quantity": 1}], "ttl_seconds": 0}),
            "ttl_seconds",
        ),
        (
            json!({"customer_id": "u", "items": [{"sku": "A", "quantity": 1}], "ttl_seconds": 86401}),
            "ttl_seconds",
        ),
        (
            json!({"customer_id": "u\u{1}", "items": [{"sku": "A", "quantity": 1}]}),
            "customer_id",
        ),
        (
            json!({"customer_id": "x".repeat(129), "items": [{"sku": "A", "quantity": 1}]}),
            "customer_id",
        ),
        // The fields as arrays, in order: not objects, whatever a struct parser accepts.
        (json!(["u", [{"sku": "A", "quantity": 1}]]), "body"),
        (json!({"customer_id": "u", "items": [["A", 1]]}), "items[0]"),
    ];
    for (body, field) in reserve_cases {
        let a = c.post("/v1/reservations", body.clone()).await;
        a.assert_problem(422, "validation_failed");
        assert_eq!(a.body["field"], field, "{body}");
    }
    let too_many: Vec<_> = (0..101)
        .map(|i| json!({"sku": format!("S{i}"), "quantity": 1}))
        .collect();
    c.post(
        "/v1/reservations",
        json!({"customer_id": "u", "items": too_many}),
    )
    .await
    .assert_problem(422, "validation_failed");
    let wrong_type = c
        .send(
            Method::POST,
            "/v1/products",
            Some("{\"sku\":\"Q\",\"name\":\"q\"}"),
            &[("content-type", "text/plain")],
        )
        .await
        .unwrap();
    assert_eq!(wrong_type.status, 400);
    let big = format!("{{\"sku\":\"X\",\"name\":\"{}\"}}", "x".repeat(70 * 1024));
    c.send(Method::POST, "/v1/products", Some(&big), &[])
        .await
        .unwrap()
        .assert_problem(413, "payload_too_large");
    c.send(Method::POST, "/v1/reservations", None, &[])
        .await
        .unwrap()
        .assert_problem(400, "bad_request");

    let p = c.product("A").await;
    assert_eq!(
        (
            p["on_hand"].as_u64(),
            p["reserved"].as_u64(),
            p["version"].as_u64()
        ),
        (Some(3), Some(0), Some(1))
    );
    let list = c.get("/v1/products").await;
    assert_eq!(
        list.body["items"].as_array().unwrap().len(),
        1,
        "no invalid product was created"
    );
    t.stop().await;
}

#[tokio::test]
async fn patch_replenish_adjust_and_if_match() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.post("/v1/products", json!({"sku": "A", "name": "a", "price": {"amount_minor": 100, "currency": "EUR"}, "on_hand": 5}))
        .await;
    let send = |m: Method,
                path: &'static str,
                body: serde_json::Value,
                h: Vec<(&'static str, &'static str)>| {
        let c = c.clone();
        async move { c.send(m, path, Some(&body.to_string()), &h).await.unwrap() }
    };
    let a = send(
        Method::PATCH,
        "/v1/products/A",
        json!({"name": "Renamed"}),
        vec![],
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(
        (a.body["name"].as_str(), a.body["version"].as_u64()),
        (Some("Renamed"), Some(2))
    );
    assert_eq!(a.body["price"]["currency"], "EUR");
    let a = send(
        Method::PATCH,
        "/v1/products/A",
        json!({"price": null}),
        vec![],
    )
    .await;
    assert_eq!(a.body["price"], json!(null));
    send(Method::PATCH, "/v1/products/A", json!({}), vec![])
        .await
        .assert_problem(422, "validation_failed");
    send(Method::PATCH, "/v1/products/A", json!({"sku": "B"}), vec![])
        .await
        .assert_problem(422, "validation_failed");
    send(
        Method::PATCH,
        "/v1/products/Z",
        json!({"name": "z"}),
        vec![],
    )
    .await
    .assert_problem(404, "product_not_found");

    let a = c
        .post("/v1/products/A/replenish", json!({"quantity": 10}))
        .await;
    assert_eq!(
        (a.status.as_u16(), a.body["on_hand"].as_u64()),
        (200, Some(15))
    );
    c.post("/v1/products/A/replenish", json!({"quantity": 0}))
        .await
        .assert_problem(422, "validation_failed");
    c.post("/v1/products/A/replenish", json!({}))
        .await
        .assert_problem(422, "validation_failed");

    let a = c
        .post(
            "/v1/products/A/adjust",
            json!({"delta": -4, "reason": "damaged"}),
        )
        .await;
    assert_eq!(a.body["on_hand"], 11);
    c.post("/v1/products/A/adjust", json!({"delta": 0}))
        .await
        .assert_problem(422, "validation_failed");
    c.reserve("u", "A", 10).await;
    let a = c.post("/v1/products/A/adjust", json!({"delta": -2})).await;
    a.assert_problem(409, "insufficient_stock");
    assert_eq!(a.body["available"], 1);
    assert_eq!(
        c.post("/v1/products/A/adjust", json!({"delta": -1}))
            .await
            .body["on_hand"],
        10
    );

    // Stock never exceeds 2^53 - 1.
    c.create_product("BIG", 9007199254740991).await;
    let a = c
        .post("/v1/products/BIG/replenish", json!({"quantity": 1}))
        .await;
    a.assert_problem(422, "validation_failed");
    assert_eq!(a.body["field"], "quantity");
    c.post("/v1/products/BIG/adjust", json!({"delta": 1}))
        .await
        .assert_problem(422, "validation_failed");
    // ... nor does what has been sold: units sold count toward the limit.
    const MAX: u64 = 9007199254740991;
    c.create_product("SOLD", MAX).await;
    let r = c.reserve("cust", "SOLD", 2).await;
    let id = r.body["id"].as_str().unwrap().to_string();
    assert_eq!(
        c.post(&format!("/v1/reservations/{id}/confirm"), json!({}))
            .await
            .status,
        200
    );
    let view = c.product("SOLD").await;
    assert_eq!(
        (&view["on_hand"], &view["sold"]),
        (&json!(MAX - 2), &json!(2))
    );
    let a = c
        .post("/v1/products/SOLD/replenish", json!({"quantity": 1}))
        .await;
    a.assert_problem(422, "validation_failed");
    assert_eq!(a.body["field"], "quantity");
    let a = c
        .post("/v1/products/SOLD/adjust", json!({"delta": 1}))
        .await;
    a.assert_problem(422, "validation_failed");
    assert_eq!(a.body["field"], "delta");
    assert_eq!(
        c.product("SOLD").await,
        view,
        "a refused change changes nothing"
    );
    c.post("/v1/products/SOLD/adjust", json!({"delta": -1}))
        .await;
    let a = c
        .post("/v1/products/SOLD/replenish", json!({"quantity": 1}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["on_hand"], json!(MAX - 2));

    // If-Match.
    let version = c.product("A").await["version"].as_u64().unwrap();
    let stale = format!("\"{}\"", version - 1);
    let current = format!("\"{version}\"");
    let a = c
        .send(
            Method::POST,
            "/v1/products/A/replenish",
            Some("{\"quantity\":1}"),
            &[("if-match", &stale)],
        )
        .await
        .unwrap();
    a.assert_problem(412, "version_mismatch");
    let a = c
        .send(
            Method::POST,
            "/v1/products/A/replenish",
            Some("{\"quantity\":1}"),
            &[("if-match", &current)],
        )
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(
        a.header("etag"),
        Some(format!("\"{}\"", version + 1).as_str())
    );
    c.send(
        Method::PATCH,
        "/v1/products/A",
        Some("{\"name\":\"n\"}"),
        &[("if-match", "seven")],
    )
    .await
    .unwrap()
    .assert_problem(400, "bad_request");
    // A list matches if any strong tag in it does; a weak tag never matches (RFC 9110).
    let version = version + 1;
    let patch = |tags: String| {
        let c = c.clone();
        async move {
            c.send(
                Method::PATCH,
                "/v1/products/A",
                Some("{\"name\":\"listed\"}"),
                &[("if-match", &tags)],
            )
            .await
            .unwrap()
        }
    };
    for tags in [
        format!("W/\"{version}\""),
        format!("\"{}\", W/\"{version}\"", version - 1),
        format!("\"{}\", \"{}\"", version - 2, version - 1),
    ] {
        let a = patch(tags.clone()).await;
        a.assert_problem(412, "version_mismatch");
        assert_eq!(a.body["current_version"], version, "{tags}");
    }
    assert_eq!(c.product("A").await["version"], version, "nothing changed");
    // A tag that is no version of ours is well-formed and simply does not match.
    let a = patch(format!("\"abc\", \"{version}\"")).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["name"], "listed");
    assert_eq!(a.body["version"], version + 1);
    // Tags may come on several header lines, which form one list.
    let version = version + 1;
    let a = c
        .send(
            Method::POST,
            "/v1/products/A/replenish",
            Some("{\"quantity\":1}"),
            &[
                ("if-match", &format!("\"{}\"", version - 1)),
                ("if-match", &format!("\"{version}\"")),
            ],
        )
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["version"], version + 1);
    t.stop().await;
}

#[tokio::test]
async fn delete_product() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.create_product("A", 2).await;
    c.create_product("B", 2).await;
    let r = c.reserve("u", "A", 1).await;
    let del = |sku: &'static str, h: Vec<(&'static str, &'static str)>| {
        let c = c.clone();
        async move {
            c.send(Method::DELETE, &format!("/v1/products/{sku}"), None, &h)
                .await
                .unwrap()
        }
    };
    let a = del("A", vec![]).await;
    a.assert_problem(409, "product_has_reservations");
    del("B", vec![("if-match", "\"9\"")])
        .await
        .assert_problem(412, "version_mismatch");
    let a = del("B", vec![("if-match", "\"1\"")]).await;
    assert_eq!(a.status, 204);
    c.get("/v1/products/B")
        .await
        .assert_problem(404, "product_not_found");
    del("B", vec![])
        .await
        .assert_problem(404, "product_not_found");
    c.reserve("u", "B", 1)
        .await
        .assert_problem(404, "product_not_found");
    // A deleted SKU can be created again.
    c.create_product("B", 7).await;
    assert_eq!(c.product("B").await["on_hand"], 7);

    let id = r.body["id"].as_str().unwrap();
    c.post(&format!("/v1/reservations/{id}/cancel"), json!({}))
        .await;
    assert_eq!(del("A", vec![]).await.status, 204);
    t.stop().await;
}

#[tokio::test]
async fn reservation_life_cycle() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.create_product("A", 5).await;
    c.create_product("B", 1).await;
    let a = c
        .post(
            "/v1/reservations",
            json!({"customer_id": "user-1", "items": [{"sku": "A", "quantity": 2}, {"sku": "B", "quantity": 1}], "ttl_seconds": 60}),
        )
        .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    let id = a.body["id"].as_str().unwrap().to_string();
    assert_eq!(
        a.header("location"),
        Some(format!("/v1/reservations/{id}").as_str())
    );
    assert_eq!(a.body["status"], "pending");
    assert_eq!(a.body["expires_at"], "2026-11-22T10:01:00.000Z");
    assert_eq!(a.body["confirmed_at"], json!(null));
    let p = c.product("A").await;
    assert_eq!(
        (p["reserved"].as_u64(), p["available"].as_u64()),
        (Some(2), Some(3))
    );

    // All or nothing: B has no unit left, so A's line is not held either.
    let a = c
        .post(
            "/v1/reservations",
            json!({"customer_id": "user-2", "items": [{"sku": "A", "quantity": 1}, {"sku": "B", "quantity": 1}]}),
        )
        .await;
    a.assert_problem(409, "insufficient_stock");
    assert_eq!(
        (
            a.body["sku"].as_str(),
            a.body["requested"].as_u64(),
            a.body["available"].as_u64()
        ),
        (Some("B"), Some(1), Some(0))
    );
    assert_eq!(c.product("A").await["reserved"], 2);
    let a = c
        .post("/v1/reservations", json!({"customer_id": "u", "items": [{"sku": "A", "quantity": 1}, {"sku": "GHOST", "quantity": 1}]}))
        .await;
    a.assert_problem(404, "product_not_found");
    assert_eq!(a.body["sku"], "GHOST");
    assert_eq!(c.product("A").await["reserved"], 2);

    assert_eq!(
        c.get(&format!("/v1/reservations/{id}")).await.body["status"],
        "pending"
    );
    c.get("/v1/reservations/not-a-uuid")
        .await
        .assert_problem(404, "reservation_not_found");
    c.get("/v1/reservations/0193a1b2-0000-7000-8000-000000000000")
        .await
        .assert_problem(404, "reservation_not_found");
    c.post(
        "/v1/reservations/0193a1b2-0000-7000-8000-000000000000/confirm",
        json!({}),
    )
    .await
    .assert_problem(404, "reservation_not_found");

    t.clock.advance_ms(10_000);
    let a = c
        .post(
            &format!("/v1/reservations/{id}/extend"),
            json!({"ttl_seconds": 120}),
        )
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["expires_at"], "2026-11-22T10:02:10.000Z");
    c.post(&format!("/v1/reservations/{id}/extend"), json!({}))
        .await
        .assert_problem(422, "validation_failed");

    let a = c
        .post(
            &format!("/v1/reservations/{id}/confirm"),
            json!({"order_id": "order-9"}),
        )
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["status"], "confirmed");
    assert_eq!(a.body["order_id"], "order-9");
    assert_eq!(a.body["confirmed_at"], "2026-11-22T10:00:10.000Z");
    let again = c
        .post(&format!("/v1/reservations/{id}/confirm"), json!({}))
        .await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body, a.body);
    let p = c.product("A").await;
    assert_eq!(
        (
            p["on_hand"].as_u64(),
            p["reserved"].as_u64(),
            p["sold"].as_u64()
        ),
        (Some(3), Some(0), Some(2))
    );
    assert_eq!(c.product("B").await["sold"], 1);
    c.post(&format!("/v1/reservations/{id}/cancel"), json!({}))
        .await
        .assert_problem(409, "reservation_confirmed");
    c.post(
        &format!("/v1/reservations/{id}/extend"),
        json!({"ttl_seconds": 5}),
    )
    .await
    .assert_problem(409, "reservation_confirmed");

    // Cancel releases stock, is repeatable, and blocks confirm.
    let r2 = c.reserve("user-3", "A", 3).await;
    let id2 = r2.body["id"].as_str().unwrap().to_string();
    assert_eq!(c.product("A").await["available"], 0);
    let a = c
        .send(
            Method::POST,
            &format!("/v1/reservations/{id2}/cancel"),
            None,
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (a.status.as_u16(), a.body["status"].as_str()),
        (200, Some("cancelled"))
    );
    assert_eq!(
        c.post(&format!("/v1/reservations/{id2}/cancel"), json!({}))
            .await
            .status,
        200
    );
    assert_eq!(c.product("A").await["available"], 3);
    c.post(&format!("/v1/reservations/{id2}/confirm"), json!({}))
        .await
        .assert_problem(409, "reservation_cancelled");
    c.post(
        &format!("/v1/reservations/{id2}/extend"),
        json!({"ttl_seconds": 5}),
    )
    .await
    .assert_problem(409, "reservation_cancelled");
    t.stop().await;
}

#[tokio::test]
async fn expiry_is_authoritative_and_releases_stock() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.create_product("A", 2).await;
    let r1 = c
        .post(
            "/v1/reservations",
            json!({"customer_id": "u", "items": [{"sku": "A", "quantity": 1}], "ttl_seconds": 30}),
        )
        .await;
    let r2 = c
        .post(
            "/v1/reservations",
            json!({"customer_id": "u", "items": [{"sku": "A", "quantity": 1}], "ttl_seconds": 30}),
        )
        .await;
    let (id1, id2) = (
        r1.body["id"].as_str().unwrap(),
        r2.body["id"].as_str().unwrap(),
    );
    assert_eq!(c.product("A").await["available"], 0);

    t.clock.advance_ms(30_000);
    // Past the deadline: confirm is refused whether or not the timer has fired.
    c.post(&format!("/v1/reservations/{id1}/confirm"), json!({}))
        .await
        .assert_problem(409, "reservation_expired");
    c.post(&format!("/v1/reservations/{id1}/cancel"), json!({}))
        .await
        .assert_problem(409, "reservation_expired");
    c.post(
        &format!("/v1/reservations/{id1}/extend"),
        json!({"ttl_seconds": 60}),
    )
    .await
    .assert_problem(409, "reservation_expired");
    // The other one is expired by the supervisor's timer, within a second.
    let client = c.clone();
    let expired = eventually(Duration::from_secs(5), || {
        let client = client.clone();
        async move { client.product("A").await["available"] == 2 }
    })
    .await;
    assert!(expired, "expiry released the stock");
    assert_eq!(
        c.get(&format!("/v1/reservations/{id2}")).await.body["status"],
        "expired"
    );
    assert_eq!(c.product("A").await["reserved"], 0);
    t.stop().await;
}

#[tokio::test]
async fn idempotency_key_replays_and_refuses_reuse() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.create_product("A", 10).await;
    let body = json!({"customer_id": "user-1", "items": [{"sku": "A", "quantity": 2}]});
    let key = [("idempotency-key", "order-123")];
    let first = c.post_with("/v1/reservations", body.clone(), &key).await;
    assert_eq!(first.status, 201);
    assert_eq!(first.header("idempotent-replayed"), None);
    let id = first.body["id"].as_str().unwrap();
    c.post(&format!("/v1/reservations/{id}/confirm"), json!({}))
        .await;

    let replay = c.post_with("/v1/reservations", body.clone(), &key).await;
    assert_eq!(replay.status, 201);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(
        replay.body, first.body,
        "the original answer, not the current state"
    );
    assert_eq!(c.product("A").await["sold"], 2, "nothing more was held");
    assert_eq!(c.product("A").await["reserved"], 0);

    let other = json!({"customer_id": "user-1", "items": [{"sku": "A", "quantity": 3}]});
    c.post_with("/v1/reservations", other, &key)
        .await
        .assert_problem(422, "idempotency_key_reused");
    // The key is scoped to the customer.
    let b = c
        .post_with(
            "/v1/reservations",
            json!({"customer_id": "user-2", "items": [{"sku": "A", "quantity": 1}]}),
            &key,
        )
        .await;
    assert_eq!(b.status, 201);
    assert_ne!(b.body["id"], first.body["id"]);
    // A failed attempt is not remembered: the same key may be retried.
    let k2 = [("idempotency-key", "k2")];
    c.post_with(
        "/v1/reservations",
        json!({"customer_id": "u3", "items": [{"sku": "A", "quantity": 50}]}),
        &k2,
    )
    .await
    .assert_problem(409, "insufficient_stock");
    assert_eq!(
        c.post_with(
            "/v1/reservations",
            json!({"customer_id": "u3", "items": [{"sku": "A", "quantity": 5}]}),
            &k2
        )
        .await
        .status,
        201
    );
    let bad = c
        .post_with("/v1/reservations", body.clone(), &[("idempotency-key", "")])
        .await;
    bad.assert_problem(400, "bad_request");
    let long = "k".repeat(256);
    c.post_with(
        "/v1/reservations",
        body,
        &[("idempotency-key", long.as_str())],
    )
    .await
    .assert_problem(400, "bad_request");

    // Remembered across a restart.
    let t = t.restart().await;
    let c = &t.client;
    let replay = c
        .post_with(
            "/v1/reservations",
            json!({"customer_id": "user-1", "items": [{"sku": "A", "quantity": 2}]}),
            &key,
        )
        .await;
    assert_eq!(replay.status, 201);
    assert_eq!(replay.body["id"], first.body["id"]);
    t.stop().await;
}

#[tokio::test]
async fn concurrent_requests_with_one_key_hold_once() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.create_product("A", 100).await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.post_with(
                "/v1/reservations",
                json!({"customer_id": "u", "items": [{"sku": "A", "quantity": 1}]}),
                &[("idempotency-key", "same")],
            )
            .await
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for task in tasks {
        let a = task.await.unwrap();
        match a.status.as_u16() {
            201 => {
                ids.insert(a.body["id"].as_str().unwrap().to_string());
            }
            409 => a.assert_problem(409, "idempotency_key_in_flight"),
            other => panic!("unexpected {other}: {:?}", a.body),
        }
    }
    assert_eq!(ids.len(), 1, "one reservation for one key");
    assert_eq!(c.product("A").await["reserved"], 1);
    t.stop().await;
}

#[tokio::test]
async fn state_survives_a_restart() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.create_product("A", 10).await;
    let keep = c.reserve("u", "A", 2).await.body["id"]
        .as_str()
        .unwrap()
        .to_string();
    let sold = c.reserve("u", "A", 3).await.body["id"]
        .as_str()
        .unwrap()
        .to_string();
    let gone = c.reserve("u", "A", 1).await.body["id"]
        .as_str()
        .unwrap()
        .to_string();
    c.post(&format!("/v1/reservations/{sold}/confirm"), json!({}))
        .await;
    c.post(&format!("/v1/reservations/{gone}/cancel"), json!({}))
        .await;
    let before = c.product("A").await;

    let t = t.restart().await;
    let c = &t.client;
    assert_eq!(
        c.product("A").await,
        before,
        "including version and timestamps"
    );
    assert_eq!(
        c.get(&format!("/v1/reservations/{keep}")).await.body["status"],
        "pending"
    );
    assert_eq!(
        c.get(&format!("/v1/reservations/{sold}")).await.body["status"],
        "confirmed"
    );
    assert_eq!(
        c.get(&format!("/v1/reservations/{gone}")).await.body["status"],
        "cancelled"
    );
    t.stop().await;
}

#[tokio::test]
async fn a_reservation_that_expired_while_down_is_expired_at_start_up() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.create_product("A", 1).await;
    let id = c
        .post(
            "/v1/reservations",
            json!({"customer_id": "u", "items": [{"sku": "A", "quantity": 1}], "ttl_seconds": 5}),
        )
        .await
        .body["id"]
        .as_str()
        .unwrap()
        .to_string();
    let clock = t.clock.clone();
    let mut t = t;
    t.server.take().unwrap().shutdown().await.unwrap();
    clock.advance_ms(60_000);
    let t = TestServer::start_in(t.dir, clock, stockd::Durability::Sync).await;
    let c = &t.client;
    assert_eq!(c.product("A").await["available"], 1);
    assert_eq!(
        c.get(&format!("/v1/reservations/{id}")).await.body["status"],
        "expired"
    );
    t.stop().await;
}

#[tokio::test]
async fn a_panicking_product_actor_answers_500_and_keeps_its_state() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.create_product("A", 5).await;
    c.reserve("u", "A", 2).await;
    let before = c.product("A").await;
    let outcome = t.service().inject_product_panic("A").await;
    assert!(
        matches!(outcome, Err(stockd::error::Error::Internal(_))),
        "{outcome:?}"
    );
    assert_eq!(c.product("A").await, before);
    assert_eq!(
        c.reserve("u", "A", 3).await.status,
        201,
        "the actor still serves"
    );
    assert_eq!(c.reserve("u", "A", 1).await.status, 409);
    assert_eq!(t.service().stats().await.unwrap().product_panics, 1);
    t.stop().await;
}

#[tokio::test]
async fn a_killed_product_actor_is_restarted_from_the_log() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.create_product("A", 5).await;
    let r = c.reserve("u", "A", 2).await;
    let before = c.product("A").await;
    t.service().inject_product_kill("A");
    let restarted = restarts_reach(t.service(), 1, Duration::from_secs(5)).await;
    assert!(restarted, "the supervisor restarted the actor");
    assert_eq!(
        c.product("A").await,
        before,
        "from the last acknowledged state"
    );
    let id = r.body["id"].as_str().unwrap();
    assert_eq!(
        c.post(&format!("/v1/reservations/{id}/confirm"), json!({}))
            .await
            .status,
        200
    );
    assert_eq!(c.product("A").await["sold"], 2);
    assert_eq!(
        c.get("/health").await.status,
        200,
        "the server keeps serving"
    );
    t.stop().await;
}

#[tokio::test]
async fn a_product_killed_with_a_reservation_in_its_mailbox_rolls_back_the_other_holds() {
    let t = TestServer::start().await;
    let c = t.client.clone();
    c.create_product("A", 5).await;
    c.create_product("B", 5).await;
    // B stops reading its mailbox: the reservation waits there, with A's line held. (Never
    // released: the kill below ends the stall.)
    t.service()
        .stall_product("B", std::sync::Arc::new(tokio::sync::Notify::new()));
    let body = json!({"customer_id": "u", "items": [
        {"sku": "A", "quantity": 2}, {"sku": "B", "quantity": 1}]});
    let first = {
        let (c, body) = (c.clone(), body.clone());
        tokio::spawn(async move {
            c.post_with("/v1/reservations", body, &[("idempotency-key", "k")])
                .await
        })
    };
    assert!(
        holdable_becomes(&c, "A", 3).await,
        "A holds its line while B stalls"
    );
    // Killed: B's mailbox goes with it, and the reservation in it.
    t.service().inject_product_kill("B");
    first.await.unwrap().assert_problem(500, "internal_error");
    assert!(
        holdable_becomes(&c, "A", 5).await,
        "A's hold was rolled back"
    );
    assert_eq!(c.product("A").await["reserved"], 0);
    assert!(restarts_reach(t.service(), 1, Duration::from_secs(5)).await);
    // The key was forgotten with it: the retry is a new reservation, not "in flight".
    let retry = c
        .post_with("/v1/reservations", body, &[("idempotency-key", "k")])
        .await;
    assert_eq!(retry.status, 201, "{:?}", retry.body);
    assert_eq!(retry.header("idempotent-replayed"), None);
    assert_eq!(c.product("A").await["reserved"], 2);
    assert_eq!(c.product("B").await["reserved"], 1);
    t.stop().await;
}

#[tokio::test]
async fn a_reservation_is_stamped_when_its_holds_are_done_not_when_asked() {
    let t = TestServer::start().await;
    let c = t.client.clone();
    c.create_product("A", 5).await;
    c.create_product("B", 5).await;
    // B answers only when released; meanwhile the clock moves past the requested TTL.
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    t.service().stall_product("B", release.clone());
    let body = json!({"customer_id": "u", "ttl_seconds": 60, "items": [
        {"sku": "A", "quantity": 1}, {"sku": "B", "quantity": 1}]});
    let asked = {
        let c = c.clone();
        tokio::spawn(async move { c.post("/v1/reservations", body).await })
    };
    // A's hold shows: the reservation was asked for, and waits for B.
    assert!(holdable_becomes(&c, "A", 4).await, "A holds its line");
    t.clock.advance_ms(120_000);
    release.notify_one();
    let r = asked.await.unwrap();
    assert_eq!(r.status, 201, "{:?}", r.body);
    // Stamped after the clock moved: the whole TTL ahead, and still pending.
    assert_eq!(
        r.body["created_at"], "2026-11-22T10:02:00.000Z",
        "{:?}",
        r.body
    );
    assert_eq!(r.body["expires_at"], "2026-11-22T10:03:00.000Z");
    assert_eq!(r.body["status"], "pending");
    t.stop().await;
}

#[tokio::test]
async fn a_panic_holding_a_later_line_releases_the_earlier_ones_and_the_key() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.create_product("A", 5).await;
    c.create_product("B", 5).await;
    t.service().arm_product_panic("B");
    let body = json!({"customer_id": "u", "items": [
        {"sku": "A", "quantity": 2}, {"sku": "B", "quantity": 1}]});
    c.post_with(
        "/v1/reservations",
        body.clone(),
        &[("idempotency-key", "k")],
    )
    .await
    .assert_problem(500, "internal_error");
    // A's hold is released (a request for more than A has says what it could hold).
    assert!(
        holdable_becomes(c, "A", 5).await,
        "A's hold was rolled back"
    );
    let b = c.reserve("probe", "B", 6).await;
    assert_eq!(
        b.body["available"], 5,
        "B's state was restored: {:?}",
        b.body
    );
    let retry = c
        .post_with("/v1/reservations", body, &[("idempotency-key", "k")])
        .await;
    assert_eq!(retry.status, 201, "the key was forgotten: {:?}", retry.body);
    assert_eq!(c.product("A").await["reserved"], 2);
    assert_eq!(c.product("B").await["reserved"], 1);
    t.stop().await;
}

/// `GET /metrics`, parsed: series (name and labels, as written) → value. Asserts the text
/// format on the way: a HELP and a TYPE line for every metric, before its samples.
async fn metrics(c: &common::Client) -> std::collections::HashMap<String, f64> {
    let res = reqwest::get(format!("{}/metrics", c.base)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = res.text().await.unwrap();
    let mut typed = std::collections::HashSet::new();
    let mut series = std::collections::HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(kind == "counter" || kind == "gauge", "{line}");
            typed.insert(name.to_string());
        } else if !line.starts_with("# HELP ") {
            let (key, value) = line.rsplit_once(' ').unwrap();
            let name = key.split('{').next().unwrap();
            assert!(typed.contains(name), "{line}: no TYPE before it");
            series.insert(key.to_string(), value.parse::<f64>().unwrap());
        }
    }
    series
}

#[tokio::test]
async fn metrics_count_what_the_server_did() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.create_product("A", 5).await;
    c.create_product("B", 5).await;
    let r1 = c.reserve("u", "A", 2).await;
    let r2 = c.reserve("u", "B", 1).await;
    c.reserve("u", "A", 9)
        .await
        .assert_problem(409, "insufficient_stock");
    let id = |r: &common::Answer| r.body["id"].as_str().unwrap().to_string();
    let confirm = format!("/v1/reservations/{}/confirm", id(&r1));
    assert_eq!(c.post(&confirm, json!({})).await.status, 200);
    assert_eq!(c.post(&confirm, json!({})).await.status, 200, "a repeat");
    let cancel = format!("/v1/reservations/{}/cancel", id(&r2));
    assert_eq!(c.post(&cancel, json!({})).await.status, 200);
    c.reserve("u", "B", 1).await;
    c.get("/nope").await.assert_problem(404, "not_found");

    let m = metrics(c).await;
    let at = |key: &str| *m.get(key).unwrap_or_else(|| panic!("no {key} in {m:?}"));
    assert_eq!(at("stockd_http_responses_total{code=\"201\"}"), 5.0);
    assert_eq!(at("stockd_http_responses_total{code=\"200\"}"), 3.0);
    assert_eq!(at("stockd_http_responses_total{code=\"409\"}"), 1.0);
    assert_eq!(at("stockd_http_responses_total{code=\"404\"}"), 1.0);
    assert_eq!(at("stockd_reservations_created_total"), 3.0);
    assert_eq!(
        at("stockd_reservations_ended_total{outcome=\"confirmed\"}"),
        1.0
    );
    assert_eq!(
        at("stockd_reservations_ended_total{outcome=\"cancelled\"}"),
        1.0
    );
    assert_eq!(
        at("stockd_reservations_ended_total{outcome=\"expired\"}"),
        0.0
    );
    assert_eq!(at("stockd_reservations_pending"), 1.0);
    assert_eq!(at("stockd_products"), 2.0);
    assert_eq!(at("stockd_log_healthy"), 1.0);
    // Two products, three reservations, a confirm and a cancel: seven records, all
    // durable (sync mode answered each after its flush).
    assert_eq!(at("stockd_log_records_total"), 7.0);
    assert_eq!(at("stockd_log_durable_sequence"), 7.0);
    assert!((1.0..=7.0).contains(&at("stockd_log_batches_total")));
    assert!(at("stockd_log_write_seconds_total") > 0.0);
    assert_eq!(at("stockd_snapshot_sequence"), 0.0);
    assert!(at("stockd_start_time_seconds") > 1.7e9);
    // Nothing else is in flight, and the scrape is not admitted against the limit.
    assert_eq!(at("stockd_http_requests_in_flight"), 0.0);
    // The scrape itself is counted once it is answered.
    let again = metrics(c).await;
    assert_eq!(again["stockd_http_responses_total{code=\"200\"}"], 4.0);
    t.stop().await;
}

#[tokio::test]
async fn an_unwritable_log_refuses_changes_with_503() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.create_product("A", 5).await;
    t.service().inject_log_failure();
    c.reserve("u", "A", 1)
        .await
        .assert_problem(503, "unavailable");
    c.post("/v1/products", json!({"sku": "B", "name": "b"}))
        .await
        .assert_problem(503, "unavailable");
    c.get("/health").await.assert_problem(503, "unavailable");
    // Metrics are still served: they are how an operator sees the failure.
    let m = metrics(c).await;
    assert_eq!(m["stockd_log_healthy"], 0.0);
    // Reads are answered from memory (the refused reservation may show there: docs/API.md).
    let a = c.get("/v1/products/A").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["on_hand"].as_u64(), Some(5));
    assert_eq!(c.get("/v1/products").await.status, 200);
    c.post("/v1/products/A/replenish", json!({"quantity": 1}))
        .await
        .assert_problem(503, "unavailable");
    let mut t = t;
    let server = t.server.take().unwrap();
    assert!(
        server.shutdown().await.is_err(),
        "shutdown reports the failed log"
    );
    // Nothing that was refused is in the log.
    let t = TestServer::start_in(t.dir, t.clock, stockd::Durability::Sync).await;
    let c = &t.client;
    let p = c.product("A").await;
    assert_eq!(
        (p["reserved"].as_u64(), p["version"].as_u64()),
        (Some(0), Some(1))
    );
    c.get("/v1/products/B")
        .await
        .assert_problem(404, "product_not_found");
    t.stop().await;
}

/// With async durability changes are acknowledged and still reach the log: after a
/// graceful restart (which keeps the durability) every acknowledged change is there, twice.
#[tokio::test]
async fn async_durability_answers_and_still_logs() {
    let t = TestServer::start_with(stockd::Durability::Async).await;
    let c = &t.client;
    c.create_product("A", 5).await;
    assert_eq!(c.reserve("u", "A", 2).await.status, 201);
    let t = t.restart().await;
    assert_eq!(t.config.durability, stockd::Durability::Async);
    assert_eq!(t.client.product("A").await["reserved"], 2);
    assert_eq!(t.client.reserve("u", "A", 1).await.status, 201);
    let t = t.restart().await;
    assert_eq!(t.client.product("A").await["reserved"], 3);
    t.stop().await;
}

/// A restarted async server still answers before the record is written: with its log made
/// unwritable, the next reserve is acknowledged (a sync server answers 503, see
/// `an_unwritable_log_refuses_changes_with_503`), and only the write failing afterwards
/// makes the server refuse changes.
#[tokio::test]
async fn a_restart_keeps_async_durability() {
    let t = TestServer::start_with(stockd::Durability::Async).await;
    t.client.create_product("A", 5).await;
    let t = t.restart().await;
    let c = t.client.clone();
    t.service().inject_log_failure();
    let a = c.reserve("u", "A", 1).await;
    assert_eq!(a.status, 201, "acknowledged once queued: {:?}", a.body);
    assert!(
        eventually(Duration::from_secs(5), || {
            let c = c.clone();
            async move { c.reserve("u", "A", 1).await.status == 503 }
        })
        .await,
        "the record's write failed after its answer"
    );
    assert!(
        t.shutdown().await.is_err(),
        "shutdown reports the failed log"
    );
}

#[tokio::test]
async fn patch_semantics_and_skus_named_like_actions() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.create_product("A", 1).await;
    let patch = |path: &'static str, body: serde_json::Value| {
        let c = c.clone();
        async move {
            c.send(Method::PATCH, path, Some(&body.to_string()), &[])
                .await
                .unwrap()
        }
    };
    patch("/v1/products/A", json!({"name": null}))
        .await
        .assert_problem(422, "validation_failed");
    let a = patch(
        "/v1/products/A",
        json!({"name": null, "price": {"amount_minor": 5, "currency": "JPY"}}),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["name"], "Product A", "null name means absent");
    assert_eq!(a.body["price"]["currency"], "JPY");

    // A SKU may be called "replenish" or "adjust": PATCH on it is still a PATCH.
    c.create_product("replenish", 4).await;
    let a = patch("/v1/products/replenish", json!({"name": "odd sku"})).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["name"], "odd sku");
    patch("/v1/products/replenish", json!({"quantity": 5}))
        .await
        .assert_problem(422, "validation_failed");
    assert_eq!(c.product("replenish").await["on_hand"], 4);
    let a = c
        .post("/v1/products/replenish/replenish", json!({"quantity": 5}))
        .await;
    assert_eq!(a.body["on_hand"], 9);
    t.stop().await;
}

#[tokio::test]
async fn a_panic_inside_the_server_is_a_500_problem_and_nothing_more() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.create_product("A", 5).await;
    t.service().arm_product_panic("A");
    let a = c.reserve("u", "A", 1).await;
    a.assert_problem(500, "internal_error");
    let p = c.product("A").await;
    assert_eq!(
        (p["reserved"].as_u64(), p["available"].as_u64()),
        (Some(0), Some(5))
    );
    assert_eq!(c.reserve("u", "A", 1).await.status, 201);
    t.stop().await;
}

#[tokio::test]
async fn a_key_whose_first_request_is_still_in_flight_answers_409() {
    let t = TestServer::start().await;
    let c = t.client.clone();
    c.create_product("A", 5).await;
    c.create_product("B", 5).await;
    // B stops reading its mailbox until released: the first request holds A, then waits
    // for B. That A's hold shows is the proof, without a timed guess, that the first
    // request is in flight; it stays so until the release.
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    t.service().stall_product("B", release.clone());
    let body = json!({"customer_id": "u", "items": [
        {"sku": "A", "quantity": 2}, {"sku": "B", "quantity": 1}]});
    let first = {
        let (c, body) = (c.clone(), body.clone());
        tokio::spawn(async move {
            c.post_with("/v1/reservations", body, &[("idempotency-key", "k")])
                .await
        })
    };
    assert!(
        holdable_becomes(&c, "A", 3).await,
        "the first request holds A, waiting for B"
    );
    let second = c
        .post_with(
            "/v1/reservations",
            body.clone(),
            &[("idempotency-key", "k")],
        )
        .await;
    assert!(
        !first.is_finished(),
        "the first request was still in flight"
    );
    second.assert_problem(409, "idempotency_key_in_flight");
    assert_eq!(second.header("retry-after"), Some("1"));
    release.notify_one();
    let first = first.await.unwrap();
    assert_eq!(first.status, 201);
    let third = c
        .post_with("/v1/reservations", body, &[("idempotency-key", "k")])
        .await;
    assert_eq!(
        (third.status.as_u16(), third.header("idempotent-replayed")),
        (201, Some("true"))
    );
    assert_eq!(c.product("A").await["reserved"], 2);
    assert_eq!(c.product("B").await["reserved"], 1);
    t.stop().await;
}

#[tokio::test]
async fn a_panic_on_a_logged_stock_effect_rebuilds_the_product_from_the_log() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.create_product("A", 2).await;
    let r1 = c.reserve("u", "A", 1).await.body["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r2 = c.reserve("u", "A", 1).await.body["id"]
        .as_str()
        .unwrap()
        .to_string();
    // The next message A handles is the Release of r1's cancel, already logged: restoring
    // the state from before it would forget the release; the actor must be rebuilt instead.
    t.service().arm_product_panic("A");
    let a = c
        .post(&format!("/v1/reservations/{r1}/cancel"), json!({}))
        .await;
    assert_eq!(a.status, 200);
    let rebuilt = restarts_reach(t.service(), 1, Duration::from_secs(5)).await;
    assert!(rebuilt, "the product was rebuilt from the log");
    let p = c.product("A").await;
    assert_eq!(
        (p["reserved"].as_u64(), p["available"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(
        c.reserve("u", "A", 1).await.status,
        201,
        "the released unit"
    );
    c.reserve("u", "A", 1)
        .await
        .assert_problem(409, "insufficient_stock");
    let confirm = c
        .post(&format!("/v1/reservations/{r2}/confirm"), json!({}))
        .await;
    assert_eq!(confirm.status, 200);
    assert_eq!(c.product("A").await["sold"], 1);
    // And the log agrees with memory: a restart shows the same product.
    let before = c.product("A").await;
    let t = t.restart().await;
    assert_eq!(t.client.product("A").await, before);
    t.stop().await;
}
