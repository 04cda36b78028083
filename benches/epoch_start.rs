//! What a new leader's epoch pays to build its supervisor's table from the committed
//! catalogue. Now the state machine lends the epoch its state (`StockSm::lend`): the
//! products are taken and moved into the table once (`Routes::from_items`, which sorts
//! only the SKUs' keys). Before, the epoch copied them (the references sorted by an 8-byte
//! SKU prefix, the products cloned in that order) and built the table from the copy
//! (here with the same `from_items`, whose sort of keys already in order is one pass),
//! and the state machine kept its own. Rounds alternate (this machine is noisy), and the
//! state a lend takes is cloned before its clock starts.
//!
//! `cargo bench --bench epoch_start` (release build). `EPOCH_PRODUCTS` (default
//! 1,000,000) products named like the cluster load test's (`S-<n>`), `EPOCH_ROUNDS` (3).

use std::time::{Duration, Instant};

use stockd::actors::routes::Routes;
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

/// Before: the references sorted by an 8-byte prefix of the SKU (big-endian, so that it
/// orders as the SKU does, the whole SKU deciding ties), the products cloned in order.
fn copied_in_order(state: &State) -> Vec<(String, Product)> {
    let prefix = |sku: &str| {
        let mut bytes = [0u8; 8];
        let n = sku.len().min(8);
        bytes[..n].copy_from_slice(&sku.as_bytes()[..n]);
        u64::from_be_bytes(bytes)
    };
    let mut refs: Vec<(u64, &String, &Product)> = state
        .products
        .iter()
        .map(|(sku, p)| (prefix(sku), sku, p))
        .collect();
    refs.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
    refs.into_iter()
        .map(|(_, sku, p)| (sku.clone(), p.clone()))
        .collect()
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
    println!("{products} products, into a supervisor's table (Routes)");
    let (mut before, mut after) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        for lend in [false, true] {
            // What a lend takes (the state machine's own state, untimed).
            let taken = lend.then(|| state.products.clone());
            let started = Instant::now();
            let table = match taken {
                None => Routes::from_items(copied_in_order(&state)),
                Some(taken) => Routes::from_items(taken),
            };
            let built = started.elapsed();
            assert_eq!(table.len() as u64, products);
            drop(table);
            let name = if lend { "lend" } else { "copy" };
            println!("round {round} {name:<5} {:>7.1} ms", ms(built));
            match lend {
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
        "median total: copy {:.1} ms, lend {:.1} ms: {:.2}× the time",
        ms(b),
        ms(a),
        a.as_secs_f64() / b.as_secs_f64()
    );
}
