//! Micro-benchmarks of the core: the fold, the change feed's projection, a product actor
//! round trip, and the log writer's group commit. Run with `cargo bench --bench core`; figures go to docs/PERFORMANCE.md
//! as ratios to a baseline measured in the same run (this machine is noisy).

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use stockd::clock::SystemClock;
use stockd::domain::Line;
use stockd::storage::fold::{apply, State};
use stockd::storage::log::Log;
use stockd::storage::record::Record;
use uuid::Uuid;

/// A realistic record mix: products, then reservations that are confirmed or cancelled.
fn records(n: usize) -> Vec<Record> {
    let mut out = Vec::with_capacity(n);
    for i in 0..100 {
        out.push(Record::ProductCreated {
            by: None,
            rules: Default::default(),
            low_stock_threshold: None,
            sku: format!("SKU-{i}"),
            name: "Thing".into(),
            price: None,
            on_hand: 1_000_000,
            at: 0,
        });
    }
    while out.len() < n {
        let id = Uuid::now_v7();
        out.push(Record::ReservationCreated {
            by: None,
            counted: Default::default(),
            id,
            customer_id: "c".into(),
            items: vec![Line {
                sku: format!("SKU-{}", out.len() % 100),
                quantity: 1,
            }],
            created_at: 1,
            expires_at: 2,
            idempotency: None,
        });
        if out.len() % 3 == 0 {
            out.push(Record::ReservationConfirmed {
                by: None,
                id,
                order_id: None,
                at: 2,
            });
        } else {
            out.push(Record::ReservationCancelled {
                by: None,
                id,
                at: 2,
            });
        }
    }
    out
}

fn fold(c: &mut Criterion) {
    let log = records(100_000);
    let mut group = c.benchmark_group("fold");
    group.throughput(Throughput::Elements(log.len() as u64));
    group.bench_function("apply 100k records", |b| {
        b.iter(|| {
            let mut state = State::default();
            for r in &log {
                apply(&mut state, r).unwrap();
            }
            state
        })
    });
    group.finish();
}

/// The change feed's projector without its thread and store: each record folded on a
/// shadow state, its events derived and written as the JSON the store keeps.
fn feed_projection(c: &mut Criterion) {
    use stockd::feed::event::{project, prune};
    let log = records(100_000);
    let mut group = c.benchmark_group("feed");
    group.throughput(Throughput::Elements(log.len() as u64));
    group.bench_function("project 100k records to event JSON", |b| {
        b.iter(|| {
            let mut state = State::default();
            let mut bytes = 0;
            for (i, r) in log.iter().enumerate() {
                for event in project(&mut state, i as u64 + 1, r).unwrap() {
                    bytes += event.to_json().len();
                }
                prune(&mut state, r);
            }
            bytes
        })
    });
    group.finish();
}

fn actor_round_trip(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = rt.block_on(hot_server(dir.path(), stockd::Durability::Sync));
    let service = server.service().clone();
    let mut group = c.benchmark_group("actors");
    // Baseline in the same run: a round trip to the supervisor alone.
    group.bench_function("supervisor round trip (stats)", |b| {
        b.to_async(&rt)
            .iter(|| async { service.stats().await.unwrap() })
    });
    group.bench_function("product actor round trip (get via supervisor)", |b| {
        b.to_async(&rt)
            .iter(|| async { service.get_product("HOT").await.unwrap() })
    });
    group.finish();
    rt.block_on(server.shutdown()).unwrap();
}

fn group_commit(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut group = c.benchmark_group("log writer");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    let record = Record::Replenished {
        by: None,
        sku: "SKU-1".into(),
        quantity: 1,
        at: 0,
    };
    for batch in [1usize, 64, 1024] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(format!("{batch} records, then wait for all"), |b| {
            b.iter_batched(
                || {
                    let dir = tempfile::tempdir().unwrap();
                    let log = Log::open(&dir.path().join("log")).unwrap();
                    let (handle, join) = log.start_writer(1).unwrap();
                    (dir, handle, join)
                },
                |(dir, handle, join)| {
                    let tickets: Vec<_> =
                        (0..batch).map(|_| handle.append(record.clone())).collect();
                    rt.block_on(async {
                        for t in tickets {
                            t.durable().await.unwrap();
                        }
                    });
                    // Dropped after the measurement: the writer stops when its handles go.
                    (dir, handle, join)
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

/// The API key check of a request (`http::auth::authorize`: read the header, SHA-256 the
/// secret, look it up among 100 stored keys, compare in constant time, check the scope),
/// against a whole reservation made through the service (async durability, so the disk's
/// flush does not enter it; no HTTP either, so the ratio overstates the check's share of a
/// reserve served over HTTP).
fn auth_check(c: &mut Criterion) {
    use stockd::keyring::{secret_hash, AdminKey, ApiKey, Keyring, Scope};
    use warp::http::{header, HeaderMap, HeaderValue};

    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(&dir.path().join("keys-log")).unwrap();
    let (handle, _writer) = log.start_writer(1).unwrap();
    let secret = |i: usize| format!("stk_{i:064x}");
    let keys = (0..100).map(|i| ApiKey {
        id: Uuid::now_v7(),
        name: format!("key {i}"),
        scopes: vec![Scope::Reserve, Scope::Read],
        secret_hash: secret_hash(secret(i).as_bytes()),
        created_at: 0,
    });
    let admin = AdminKey::new("bootstrap-key-of-the-benchmark").unwrap();
    let keyring = Keyring::new(keys, Some(&admin), handle, Arc::new(SystemClock));
    let mut headers = HeaderMap::new();
    let value = format!("Bearer {}", secret(57));
    headers.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&value).unwrap(),
    );

    let server = rt.block_on(hot_server(dir.path(), stockd::Durability::Async));
    let service = server.service().clone();
    let request = stockd::service::ReserveRequest {
        customer_id: "c".into(),
        items: vec![Line {
            sku: "HOT".into(),
            quantity: 1,
        }],
        ttl_seconds: Some(3600),
    };
    let mut group = c.benchmark_group("auth");
    group.bench_function("reserve through the service (async)", |b| {
        b.to_async(&rt)
            .iter(|| async { service.reserve(request.clone(), None, None).await.unwrap() })
    });
    group.bench_function("key check of a request (100 keys)", |b| {
        b.iter(|| stockd::http::auth::authorize(&keyring, &headers, Some(Scope::Reserve)).unwrap())
    });
    group.finish();
    rt.block_on(server.shutdown()).unwrap();
}

/// A server in `dir` (its own clock, on `127.0.0.1:0`) with one product, `HOT`, of a
/// million million units.
async fn hot_server(dir: &std::path::Path, durability: stockd::Durability) -> stockd::Server {
    let config = stockd::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("data"),
        snapshot_dir: dir.join("snapshots"),
        durability,
        clock: Arc::new(SystemClock),
        ..stockd::Config::default()
    };
    let server = stockd::start(config).await.unwrap();
    let hot = stockd::service::NewProduct::new("HOT".into(), "Hot".into(), None, 1_000_000_000_000);
    server.service().create_product(hot, None).await.unwrap();
    server
}

criterion_group!(
    benches,
    fold,
    feed_projection,
    actor_round_trip,
    group_commit,
    auth_check
);
criterion_main!(benches);
