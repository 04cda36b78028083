//! Invariant 3 in docs/ARCHITECTURE.md (the log order rule), tested on the real concurrent
//! code: under contended traffic that frees and takes the same units (cancel, expire,
//! replenish, adjust vs. reserve), the log the server wrote must fold, record by record,
//! without ever breaking invariant 1 there (never oversell: 0 <= reserved <= on_hand), and
//! its full fold must equal what the live actors show.
//!
//! Expiry is real: some reservations are abandoned with a 1 s TTL while the server's
//! (manual) clock moves on and due deadlines are swept during the traffic; the test checks
//! that expiries were logged in the middle of it.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::TestServer;
use serde_json::json;
use stockd::storage::fold::{apply, State};
use stockd::storage::log::Log;
use stockd::storage::record::Record;

/// TTL of an abandoned reservation: it expires once the clock has moved this far.
const ABANDONED_TTL_SECONDS: u64 = 1;
/// TTL of the others, which are confirmed or cancelled: the clock never moves this far.
const KEPT_TTL_SECONDS: u64 = 3_600;
/// How far the clock moves at each step while the traffic runs, and at most in all.
const CLOCK_STEP_MS: i64 = 250;
const CLOCK_MOVE_MAX_MS: i64 = (KEPT_TTL_SECONDS as i64 / 2) * 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_prefix_of_a_contended_log_folds_to_a_valid_state() {
    let t = TestServer::start().await;
    let c = t.client.clone();
    for sku in ["A", "B"] {
        c.create_product(sku, 3).await;
    }
    // Moves the clock on and sweeps due deadlines while the buyers run, so that abandoned
    // holds expire (and free their units) in the middle of the traffic.
    let traffic = Arc::new(AtomicBool::new(true));
    let clock_mover = {
        let (traffic, clock, service) = (traffic.clone(), t.clock.clone(), t.service().clone());
        tokio::spawn(async move {
            let mut moved = 0;
            while traffic.load(Ordering::SeqCst) && moved < CLOCK_MOVE_MAX_MS {
                clock.advance_ms(CLOCK_STEP_MS);
                moved += CLOCK_STEP_MS;
                service.expire_due_now().await.expect("expiry sweep");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
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
                let abandon = rng.u8(..4) == 0;
                let ttl = if abandon {
                    ABANDONED_TTL_SECONDS
                } else {
                    KEPT_TTL_SECONDS
                };
                let a = c
                    .post(
                        "/v1/reservations",
                        json!({"customer_id": "c", "items": items, "ttl_seconds": ttl}),
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
                if a.status != 201 {
                    assert_eq!(a.status, 409, "{:?}", a.body);
                } else if !abandon {
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
                }
                // An abandoned hold is left to expire.
            }
        }));
    }
    let mut outcome = Ok(());
    for w in workers {
        outcome = outcome.and(w.await);
    }
    traffic.store(false, Ordering::SeqCst);
    clock_mover.await.unwrap();
    outcome.unwrap();
    // Whatever fell due at the last clock step, so that nothing expires from here on.
    t.service().expire_due_now().await.unwrap();
    let expired_live = t.service().stats().await.unwrap().events.expired;
    let live = [c.product("A").await, c.product("B").await];
    let dir = t.dir.path().join("data").join("log");
    let mut t = t;
    t.server.take().unwrap().shutdown().await.unwrap();

    let log = Log::open(&dir).unwrap();
    let mut state = State::default();
    let mut records = 0;
    let (mut expired, mut first_expiry, mut last_reserve) = (0, None, 0);
    for item in log.reader().records() {
        let (seq, record) = item.unwrap();
        apply(&mut state, &record).unwrap_or_else(|e| panic!("record {seq}: {e}"));
        assert!(state.invariant_holds(), "prefix ending at {seq} oversells");
        records += 1;
        match record {
            Record::ReservationExpired { .. } => {
                expired += 1;
                first_expiry.get_or_insert(seq);
            }
            Record::ReservationCreated { .. } => last_reserve = seq,
            _ => {}
        }
    }
    assert!(
        records > 100,
        "the workload wrote a real log ({records} records)"
    );
    assert!(expired > 0, "reservations expired during the traffic");
    assert_eq!(
        expired, expired_live,
        "every expiry the server counted is logged"
    );
    assert!(
        first_expiry.is_some_and(|first| first < last_reserve),
        "expiries were interleaved with reserves (first expiry at {first_expiry:?}, last reserve at {last_reserve})"
    );
    for view in live {
        let p = &state.products[view["sku"].as_str().unwrap()];
        assert_eq!(view["on_hand"], p.on_hand);
        assert_eq!(view["reserved"], p.reserved);
        assert_eq!(view["sold"], p.sold);
        assert_eq!(view["version"], p.version);
    }
}
