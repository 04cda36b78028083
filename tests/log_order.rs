//! DESIGN.md invariant 3, tested on the real concurrent code: under contended traffic that
//! frees and takes the same units (cancel, expire, replenish, adjust vs. reserve), the log
//! the server wrote must fold, record by record, without ever breaking invariant 1, and its
//! full fold must equal what the live actors show.

mod common;

use common::TestServer;
use serde_json::json;
use stockd::fold::{apply, State};
use stockd::log::Log;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_prefix_of_a_contended_log_folds_to_a_valid_state() {
    let t = TestServer::start().await;
    let c = t.client.clone();
    for sku in ["A", "B"] {
        c.create_product(sku, 3).await;
    }
    let mut workers = Vec::new();
    for seed in 1..=16u64 {
        let c = c.clone();
        workers.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed);
            for _ in 0..60 {
                let items = match rng.u8(..3) {
                    0 => json!([{"sku": "A", "quantity": 1}]),
                    1 => json!([{"sku": "B", "quantity": 2}]),
                    _ => json!([{"sku": "A", "quantity": 1}, {"sku": "B", "quantity": 1}]),
                };
                let a = c
                    .post(
                        "/v1/reservations",
                        json!({"customer_id": "c", "items": items}),
                    )
                    .await;
                match rng.u8(..8) {
                    0 => drop(
                        c.post("/v1/products/A/replenish", json!({"quantity": 1}))
                            .await,
                    ),
                    1 => drop(c.post("/v1/products/B/adjust", json!({"delta": -1})).await),
                    2 => drop(c.post("/v1/products/B/adjust", json!({"delta": 1})).await),
                    _ => {}
                }
                if a.status == 201 {
                    let id = a.body["id"].as_str().unwrap();
                    let action = if rng.u8(..4) == 0 {
                        "confirm"
                    } else {
                        "cancel"
                    };
                    let r = c
                        .post(&format!("/v1/reservations/{id}/{action}"), json!({}))
                        .await;
                    assert_eq!(r.status, 200, "{:?}", r.body);
                } else {
                    assert_eq!(a.status, 409, "{:?}", a.body);
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let live = [c.product("A").await, c.product("B").await];
    let dir = t.dir.path().join("data").join("log");
    let mut t = t;
    t.server.take().unwrap().shutdown().await.unwrap();

    let log = Log::open(&dir).unwrap();
    let mut state = State::default();
    let mut records = 0;
    for item in log.reader().records() {
        let (seq, record) = item.unwrap();
        apply(&mut state, &record).unwrap_or_else(|e| panic!("record {seq}: {e}"));
        assert!(state.invariant_holds(), "prefix ending at {seq} oversells");
        records += 1;
    }
    assert!(
        records > 100,
        "the workload wrote a real log ({records} records)"
    );
    for view in live {
        let p = &state.products[view["sku"].as_str().unwrap()];
        assert_eq!(view["on_hand"], p.on_hand);
        assert_eq!(view["reserved"], p.reserved);
        assert_eq!(view["sold"], p.sold);
        assert_eq!(view["version"], p.version);
    }
}
