//! What a new leader's epoch pays to build its supervisor's table from the committed
//! catalogue the state machine lends it (`StockSm::lend`), three ways, in alternating
//! rounds (this machine is noisy):
//!
//! - `moved`, the table before the state's own map became it: each product moved into a
//!   slot of a dense vector, the SKUs' keys (an 8-byte prefix and the SKU) sorted, and a
//!   B-tree of key → slot built from them in one pass (the code of `Routes::from_items`
//!   as it was, inlined here);
//! - `sorted`, the table now, from a state that kept no SKU order (a single server's
//!   start-up): the state's map taken as it is, and the SKUs sorted into an index
//!   (`SkuIndex::of`);
//! - `kept`, the table now, from a cluster node's state, which keeps its SKUs in order as
//!   it folds (`State::keep_sku_order`): nothing is built.
//!
//! What each way takes (the state machine's own state, with its index) is cloned before
//! its clock starts, and the table is dropped after it stops.
//!
//! `cargo bench --bench epoch_start` (release build). `EPOCH_PRODUCTS` (default
//! 1,000,000) products named like the cluster load test's (`S-<n>`), `EPOCH_ROUNDS` (3).

use std::collections::BTreeMap;
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

fn sku_prefix(sku: &str) -> u64 {
    let mut bytes = [0u8; 8];
    let n = sku.len().min(8);
    bytes[..n].copy_from_slice(&sku.as_bytes()[..n]);
    u64::from_be_bytes(bytes)
}

/// The table as it was built before: slots, and an index of (prefix, SKU) → slot.
struct Moved {
    index: BTreeMap<(u64, Box<str>), usize>,
    slots: Vec<Product>,
}

fn moved(state: State) -> Moved {
    let mut slots = Vec::with_capacity(state.products.len());
    let mut keys: Vec<((u64, Box<str>), usize)> = state
        .products
        .into_iter()
        .map(|(sku, product)| {
            slots.push(product);
            ((sku_prefix(&sku), sku.into_boxed_str()), slots.len() - 1)
        })
        .collect();
    keys.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let index: BTreeMap<_, _> = keys.into_iter().collect();
    assert_eq!(index.len(), slots.len(), "each SKU once");
    Moved { index, slots }
}

fn table(mut state: State) -> Routes<()> {
    let index = state.take_sku_index();
    Routes::new(std::mem::take(&mut state.products), index)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let products = env_u64("EPOCH_PRODUCTS", 1_000_000);
    let rounds = env_u64("EPOCH_ROUNDS", 3);
    let mut state = State::default();
    state.keep_sku_order();
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
    println!("{products} products, into a supervisor's table");
    let ways = ["moved", "sorted", "kept"];
    let mut took: Vec<Vec<Duration>> = vec![Vec::new(); ways.len()];
    for round in 1..=rounds {
        for (way, name) in ways.iter().enumerate() {
            let mut taken = state.clone();
            if *name == "sorted" {
                taken.skus.0 = None;
            }
            let started = Instant::now();
            let len = match *name {
                "moved" => {
                    let t = moved(taken);
                    let len = t.index.len();
                    let elapsed = started.elapsed();
                    assert_eq!(t.slots.len(), len);
                    drop(t);
                    took[way].push(elapsed);
                    len
                }
                _ => {
                    let t = table(taken);
                    let elapsed = started.elapsed();
                    let len = t.len();
                    drop(t);
                    took[way].push(elapsed);
                    len
                }
            };
            assert_eq!(len as u64, products);
            println!(
                "round {round} {name:<6} {:>8.1} ms",
                ms(*took[way].last().unwrap())
            );
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let m: Vec<Duration> = took.iter_mut().map(median).collect();
    println!(
        "median: moved {:.1} ms, sorted {:.1} ms ({:.2}×), kept {:.3} ms ({:.4}×)",
        ms(m[0]),
        ms(m[1]),
        m[1].as_secs_f64() / m[0].as_secs_f64(),
        ms(m[2]),
        m[2].as_secs_f64() / m[0].as_secs_f64()
    );
}
