//! Purchase limits and sale windows (docs/API.md, "Purchase limits and sale windows"):
//! in-process servers on a hand-moved clock, and the real binary across `kill -9`.

mod common;

use common::{Answer, ChildServer, Client, TestServer, START_MS};
use reqwest::Method;
use serde_json::{json, Value};
use stockd::clock::rfc3339;

/// Creates `sku` with `on_hand` units and the sale-rule fields in `rules`.
async fn create_with(c: &Client, sku: &str, on_hand: u64, rules: Value) -> Answer {
    let mut body = json!({"sku": sku, "name": format!("Product {sku}"), "on_hand": on_hand});
    for (k, v) in rules.as_object().unwrap() {
        body[k] = v.clone();
    }
    c.post("/v1/products", body).await
}

async fn patch(c: &Client, sku: &str, body: Value) -> Answer {
    c.send(
        Method::PATCH,
        &format!("/v1/products/{sku}"),
        Some(&body.to_string()),
        &[],
    )
    .await
    .expect("PATCH")
}

async fn reserve_lines(c: &Client, customer: &str, lines: &[(&str, u64)]) -> Answer {
    let items: Vec<Value> = lines
        .iter()
        .map(|(sku, q)| json!({"sku": sku, "quantity": q}))
        .collect();
    c.post(
        "/v1/reservations",
        json!({"customer_id": customer, "items": items}),
    )
    .await
}

fn id_of(a: &Answer) -> String {
    assert_eq!(a.status, 201, "{:?}", a.body);
    a.body["id"].as_str().unwrap().to_string()
}

/// Asserts a 409 `customer_limit_exceeded` naming these figures.
fn assert_over_limit(a: &Answer, sku: &str, limit: u64, held: u64, requested: u64) {
    a.assert_problem(409, "customer_limit_exceeded");
    assert_eq!(
        (
            &a.body["sku"],
            &a.body["limit"],
            &a.body["held"],
            &a.body["requested"]
        ),
        (&json!(sku), &json!(limit), &json!(held), &json!(requested)),
        "{:?}",
        a.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_parallel_reservations_from_one_customer_get_exactly_the_limit() {
    let t = TestServer::start().await;
    let c = t.client.clone();
    let a = create_with(&c, "DROP", 1_000, json!({"max_per_customer": 2})).await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    assert_eq!(a.body["max_per_customer"], 2);
    let answers = futures_util::future::join_all((0..50).map(|_| {
        let c = c.clone();
        async move { c.reserve("greedy", "DROP", 1).await }
    }))
    .await;
    let created = answers.iter().filter(|a| a.status == 201).count();
    assert_eq!(created, 2, "exactly the limit, whatever the interleaving");
    for a in answers.iter().filter(|a| a.status != 201) {
        assert_over_limit(a, "DROP", 2, 2, 1);
    }
    // Others are not held back by the greedy customer.
    assert_eq!(c.reserve("fair", "DROP", 2).await.status, 201);
    let p = c.product("DROP").await;
    assert_eq!((&p["reserved"], &p["available"]), (&json!(4), &json!(996)));
    t.stop().await;
}

#[tokio::test]
async fn a_reservation_over_the_limit_is_refused_whole_and_changes_nothing() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.create_product("FREE", 10).await;
    create_with(c, "CAP", 10, json!({"max_per_customer": 2})).await;
    let before = (c.product("FREE").await, c.product("CAP").await);
    let a = reserve_lines(c, "u", &[("FREE", 1), ("CAP", 3)]).await;
    assert_over_limit(&a, "CAP", 2, 0, 3);
    assert_eq!(
        (c.product("FREE").await, c.product("CAP").await),
        before,
        "no line held, no version moved"
    );
    assert_eq!(
        reserve_lines(c, "u", &[("FREE", 1), ("CAP", 2)])
            .await
            .status,
        201
    );
    t.stop().await;
}

#[tokio::test]
async fn cancels_and_expiries_give_units_back_and_confirms_keep_them() {
    let t = TestServer::start().await;
    let c = &t.client;
    create_with(c, "CAP", 100, json!({"max_per_customer": 3})).await;
    let bought = id_of(&c.reserve("u", "CAP", 1).await);
    let cancelled = id_of(&c.reserve("u", "CAP", 1).await);
    let expiring = c
        .post(
            "/v1/reservations",
            json!({"customer_id": "u", "items": [{"sku": "CAP", "quantity": 1}], "ttl_seconds": 5}),
        )
        .await;
    let _expiring = id_of(&expiring);
    assert_over_limit(&c.reserve("u", "CAP", 1).await, "CAP", 3, 3, 1);

    let a = c
        .post(&format!("/v1/reservations/{bought}/confirm"), json!({}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let a = c
        .post(&format!("/v1/reservations/{cancelled}/cancel"), json!({}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_over_limit(&c.reserve("u", "CAP", 2).await, "CAP", 3, 2, 2);
    t.clock.advance_ms(6_000);
    t.service().expire_due_now().await.unwrap();
    // Bought 1 (kept); the cancel and the expiry gave 2 back.
    assert_eq!(c.reserve("u", "CAP", 2).await.status, 201);
    assert_over_limit(&c.reserve("u", "CAP", 1).await, "CAP", 3, 3, 1);
    t.stop().await;
}

#[tokio::test]
async fn changing_a_limit_never_changes_the_counts() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.create_product("P", 100).await;
    // Holds made without a limit are not counted.
    assert_eq!(c.reserve("u", "P", 5).await.status, 201);
    let a = patch(c, "P", json!({"max_per_customer": 2})).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["max_per_customer"], 2);
    assert_eq!(c.reserve("u", "P", 2).await.status, 201);
    assert_over_limit(&c.reserve("u", "P", 1).await, "P", 2, 2, 1);
    // Lowered: nothing is taken back, nothing more is held.
    assert_eq!(
        patch(c, "P", json!({"max_per_customer": 1})).await.status,
        200
    );
    assert_over_limit(&c.reserve("u", "P", 1).await, "P", 1, 2, 1);
    // Raised: up to the new figure at once.
    assert_eq!(
        patch(c, "P", json!({"max_per_customer": 4})).await.status,
        200
    );
    assert_eq!(c.reserve("u", "P", 2).await.status, 201);
    assert_over_limit(&c.reserve("u", "P", 1).await, "P", 4, 4, 1);
    // Removed: no check; set again, the earlier count still stands.
    let a = patch(c, "P", json!({"max_per_customer": null})).await;
    assert_eq!(a.body["max_per_customer"], Value::Null, "{:?}", a.body);
    assert_eq!(c.reserve("u", "P", 10).await.status, 201);
    assert_eq!(
        patch(c, "P", json!({"max_per_customer": 5})).await.status,
        200
    );
    assert_eq!(c.reserve("u", "P", 1).await.status, 201);
    assert_over_limit(&c.reserve("u", "P", 1).await, "P", 5, 5, 1);
    t.stop().await;
}

#[tokio::test]
async fn the_window_refuses_holds_before_its_start_and_from_its_end() {
    let t = TestServer::start().await;
    let c = &t.client;
    let starts = START_MS + 90_500;
    let ends = START_MS + 200_000;
    let a = create_with(
        c,
        "W",
        10,
        json!({"sale_starts_at": rfc3339(starts), "sale_ends_at": rfc3339(ends)}),
    )
    .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    assert_eq!(
        (&a.body["sale_starts_at"], &a.body["sale_ends_at"]),
        (&json!(rfc3339(starts)), &json!(rfc3339(ends)))
    );
    let early = c.reserve("u", "W", 1).await;
    early.assert_problem(409, "sale_not_started");
    assert_eq!(early.body["starts_at"], rfc3339(starts));
    assert_eq!(early.header("retry-after"), Some("91"), "rounded up");
    t.clock.advance_ms(90_499);
    let a = c.reserve("u", "W", 1).await;
    a.assert_problem(409, "sale_not_started");
    assert_eq!(a.header("retry-after"), Some("1"));
    t.clock.advance_ms(1);
    let inside = id_of(&c.reserve("u", "W", 1).await);
    let also_inside = id_of(&c.reserve("v", "W", 1).await);
    t.clock.advance_ms(ends - starts);
    let late = c.reserve("u", "W", 1).await;
    late.assert_problem(409, "sale_ended");
    assert_eq!(late.body["ended_at"], rfc3339(ends));
    // Holds made inside the window are still confirmed and cancelled after it; stock
    // changes and reads go on.
    let a = c
        .post(&format!("/v1/reservations/{inside}/confirm"), json!({}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let a = c
        .post(&format!("/v1/reservations/{also_inside}/cancel"), json!({}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let a = c
        .post("/v1/products/W/replenish", json!({"quantity": 5}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(c.product("W").await["sold"], 1);
    // Reopened by removing the end.
    assert_eq!(
        patch(c, "W", json!({"sale_ends_at": null})).await.status,
        200
    );
    assert_eq!(c.reserve("u", "W", 1).await.status, 201);
    t.stop().await;
}

#[tokio::test]
async fn bad_rules_are_refused_with_the_field_named_and_change_nothing() {
    let t = TestServer::start().await;
    let c = &t.client;
    for (rules, field) in [
        (json!({"max_per_customer": 0}), "max_per_customer"),
        (json!({"max_per_customer": -1}), "max_per_customer"),
        (json!({"max_per_customer": "2"}), "max_per_customer"),
        (json!({"sale_starts_at": "tomorrow"}), "sale_starts_at"),
        (
            json!({"sale_starts_at": "2026-13-01T00:00:00Z"}),
            "sale_starts_at",
        ),
        (json!({"sale_ends_at": 1795341600000u64}), "sale_ends_at"),
        (
            json!({"sale_ends_at": "1969-12-31T23:59:59Z"}),
            "sale_ends_at",
        ),
        (
            json!({"sale_starts_at": "2026-12-06T18:00:00Z", "sale_ends_at": "2026-12-06T18:00:00Z"}),
            "sale_ends_at",
        ),
    ] {
        let a = create_with(c, "X", 1, rules.clone()).await;
        a.assert_problem(422, "validation_failed");
        assert_eq!(a.body["field"], field, "{rules}: {:?}", a.body);
    }
    assert_eq!(c.get("/v1/products/X").await.status, 404, "nothing created");
    // A PATCH is judged against the product's rules as they are.
    let a = create_with(
        c,
        "X",
        1,
        json!({"sale_starts_at": "2026-12-06T18:00:00+01:00"}),
    )
    .await;
    assert_eq!(a.body["sale_starts_at"], "2026-12-06T17:00:00.000Z");
    let a = patch(c, "X", json!({"sale_ends_at": "2026-12-06T16:59:59Z"})).await;
    a.assert_problem(422, "validation_failed");
    assert_eq!(a.body["field"], "sale_ends_at");
    assert_eq!(c.product("X").await["version"], 1, "nothing changed");
    let a = patch(c, "X", json!({})).await;
    a.assert_problem(422, "validation_failed");
    t.stop().await;
}

#[tokio::test]
async fn limits_windows_and_counts_survive_a_restart() {
    let t = TestServer::start().await;
    let c = &t.client;
    let ends = START_MS + 3_600_000;
    create_with(
        c,
        "R",
        50,
        json!({"max_per_customer": 3, "sale_ends_at": rfc3339(ends)}),
    )
    .await;
    let first = id_of(&c.reserve("u", "R", 2).await);
    assert_eq!(
        c.post(&format!("/v1/reservations/{first}/confirm"), json!({}))
            .await
            .status,
        200
    );
    let second = id_of(&c.reserve("u", "R", 1).await);
    let t = t.restart().await;
    let c = &t.client;
    let p = c.product("R").await;
    assert_eq!(
        (&p["max_per_customer"], &p["sale_ends_at"]),
        (&json!(3), &json!(rfc3339(ends)))
    );
    assert_over_limit(&c.reserve("u", "R", 1).await, "R", 3, 3, 1);
    // The count of a hold made before the restart is given back by a cancel after it.
    let a = c
        .post(&format!("/v1/reservations/{second}/cancel"), json!({}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(c.reserve("u", "R", 1).await.status, 201);
    // And from a snapshot: the counts are in it.
    let a = c.post("/v1/admin/snapshot", json!({})).await;
    assert!(a.status.is_success(), "{:?}", a.body);
    let t = t.restart().await;
    assert_over_limit(&t.client.reserve("u", "R", 1).await, "R", 3, 3, 1);
    t.clock.advance_ms(3_600_000);
    t.client
        .reserve("v", "R", 1)
        .await
        .assert_problem(409, "sale_ended");
    t.stop().await;
}

/// Across `kill -9`, parallel greedy buyers never end above the limit, and the counts
/// after the restart are the ones acknowledged before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_after_kill_9_are_the_acknowledged_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::spawn(dir.path(), &[]);
    let c = server.client.clone();
    let a = create_with(&c, "HOT", 10_000, json!({"max_per_customer": 2})).await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    let buyers: Vec<String> = (0..20).map(|i| format!("buyer-{i}")).collect();
    let answers = futures_util::future::join_all(buyers.iter().flat_map(|b| {
        let c = c.clone();
        (0..5).map(move |_| {
            let c = c.clone();
            let b = b.clone();
            async move { (b.clone(), c.reserve(&b, "HOT", 1).await) }
        })
    }))
    .await;
    for b in &buyers {
        let created = answers
            .iter()
            .filter(|(who, a)| who == b && a.status == 201)
            .count();
        assert_eq!(created, 2, "{b}");
    }
    server.kill9();
    let server = ChildServer::spawn(dir.path(), &[]);
    let c = server.client.clone();
    assert_eq!(c.product("HOT").await["reserved"], 40);
    for b in &buyers {
        assert_over_limit(&c.reserve(b, "HOT", 1).await, "HOT", 2, 2, 1);
    }
    assert_eq!(c.reserve("newcomer", "HOT", 2).await.status, 201);
    drop(server);
}
