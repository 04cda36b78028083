//! What a new leader's epoch pays to copy the committed catalogue into its supervisor's
//! table (`SupervisorArgs::copy_of`): the products sorted by reference and cloned in SKU
//! order (`routes::sorted_copy`), against what the epoch did before, in the same run: a
//! clone of the whole state, its products collected and sorted by SKU. Both end in the
//! same `Routes::from_sorted`, timed apart. Rounds alternate (this machine is noisy).
//!
//! `cargo bench --bench epoch_start` (release build). `EPOCH_PRODUCTS` (default
//! 1,000,000) products named like the cluster load test's (`S-<n>`), `EPOCH_ROUNDS` (3).

use std::time::{Duration, Instant};

use stockd::actors::routes::{self, Routes};
use stockd::domain::Product;
use stockd::storage::fold::{self, State};
use stockd::storage::record::Record;

/// The server's allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Before: the whole state cloned, then its products collected and sorted.
fn cloned_then_sorted(state: &State) -> Vec<(String, Product)> {
    let copy = state.clone();
    let mut sorted: Vec<(String, Product)> = copy.products.into_iter().collect();
    sorted.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    sorted
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let products = env_u64("EPOCH_PRODUCTS", 1_000_000);
    let rounds = env_u64("EPOCH_ROUNDS", 3);
    let mut state = State::default();
    for k in 0..products {
        let created = Record::ProductCreated {
            by: None,
            rules: Default::default(),
            low_stock_threshold: None,
            sku: format!("S-{k}"),
            name: "x".into(),
            price: None,
            on_hand: 100,
            at: 1,
        };
        fold::apply_owned(&mut state, created).expect("a new product");
    }
    println!("{products} products; copy = into SKU order, table = Routes::from_sorted");
    let (mut before, mut after) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        for new in [false, true] {
            let started = Instant::now();
            let sorted = match new {
                false => cloned_then_sorted(&state),
                true => routes::sorted_copy(state.products.iter()),
            };
            let copied = started.elapsed();
            let table = Routes::from_sorted(sorted.into_iter());
            let built = started.elapsed();
            assert_eq!(table.len() as u64, products);
            drop(table);
            let name = if new { "sorted_copy" } else { "clone, sort" };
            println!(
                "round {round} {name:<12} copy {:>7.1} ms  table {:>7.1} ms  total {:>7.1} ms",
                ms(copied),
                ms(built - copied),
                ms(built)
            );
            match new {
                false => before.push(built),
                true => after.push(built),
            }
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (b, a) = (median(&mut before), median(&mut after));
    println!(
        "median total: before {:.1} ms, sorted_copy {:.1} ms: {:.2}× the time",
        ms(b),
        ms(a),
        a.as_secs_f64() / b.as_secs_f64()
    );
}
