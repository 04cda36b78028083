//! The million-SKU benchmark of bounded recovery: restart time from a snapshot plus a log
//! tail, log replay rate, resident memory, and a snapshot written while reserves are served.
//!
//! `cargo bench --bench catalogue` (release build). Sizes via environment variables:
//! `CATALOGUE_PRODUCTS` (default 1,000,000), `CATALOGUE_RESERVATIONS` (1,000,000),
//! `CATALOGUE_TAIL` (100,000 log records after the snapshot), `CATALOGUE_LOAD_SECONDS`
//! (10), `CATALOGUE_CONNECTIONS` (64), `CATALOGUE_HOT` (1,000: the SKUs the load reserves,
//! spread over the catalogue: a flash sale touches few products, the rest stay idle),
//! `CATALOGUE_RATE` (5,000 reserves/s, open loop: latency from when each request was due;
//! 0 for a closed loop that saturates the machine), `CATALOGUE_JSON` (write the figures),
//! `CATALOGUE_KEEP=1` (keep the data directory).
//!
//! Steps: (1) write the log of N products and M pending reservations with the real log
//! writer (the records the server writes; generating them over HTTP would take minutes
//! and measure nothing more); (2) start the real binary on the whole log (no snapshot):
//! the replay rate of a fresh process, then kill it;
//! (3) `stockd snapshot` offline: the time to write a snapshot of that state; (4) append a
//! tail of replenish records; (5) start the real binary on it: exec to `listening on` is the
//! restart time, then VmRSS; (6) reserves on random SKUs for a while (baseline p99), then
//! the same while `POST /v1/admin/snapshot` runs (p99 during a snapshot, its duration);
//! (7) peak RSS (VmHWM). The server is killed at the end; the data is a temp directory.

mod support;
use support::procfs::{children_of, status_kb};
use support::{dir_bytes, env_u64};

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use loadtest::driver::{run_phase, timed, Limits, PhaseStats};
use loadtest::scenarios::post_json_body;
use loadtest::server::{Launch, ServerProcess};
use stockd::domain::Line;
use stockd::storage::log::Log;
use stockd::storage::record::Record;

/// The server's allocator, for the offline snapshot taken in-process.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn sku(i: u64) -> String {
    format!("SKU-{i:08}")
}

/// Appends records through the real writer in chunks, waiting for each chunk's last one.
fn append_all(dir: &Path, first_seq: u64, records: impl Iterator<Item = Record>) -> u64 {
    let log = Log::open(dir).expect("open log");
    let (handle, join) = log.start_writer(first_seq).expect("start the writer");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut written = 0;
    runtime.block_on(async {
        let mut last = None;
        for record in records {
            last = Some(handle.append(record));
            written += 1;
            if written % 4096 == 0 {
                last.take().unwrap().durable().await.expect("durable");
            }
        }
        if let Some(ticket) = last {
            ticket.durable().await.expect("durable");
        }
        handle.shutdown().await.expect("flushed");
    });
    join.join().unwrap();
    written
}

struct Server {
    process: ServerProcess,
    base: String,
    /// The server's start-up log line about recovery (JSON), once it has been read.
    recovered: serde_json::Value,
}

/// Starts the real binary on `dir` (JSON logs on stderr, kept); answers the time from
/// exec to `listening on`.
fn start_server(dir: &Path, extra: &[&str]) -> (Server, Duration) {
    let mut process = Launch::serve(env!("CARGO_BIN_EXE_stockd"), dir)
        .args(["--log-format", "json"])
        .args(extra)
        .env("RUST_LOG", "info")
        .capture_stderr()
        // A replay of millions of records: no test's limit.
        .timeout(Duration::from_secs(3600))
        .start()
        .expect("stockd starts");
    // Recovery is logged before `listening on`, so the line is already on its way. It is
    // the one with `replay_ms` (its message says which way the state was recovered).
    let recovered = process
        .find_in_stderr(Duration::from_secs(60), |line| {
            let v = serde_json::from_str::<serde_json::Value>(line).ok()?;
            v["fields"]
                .get("replay_ms")
                .is_some()
                .then(|| v["fields"].clone())
        })
        .expect("the server logs its recovery");
    let took = process.startup_time();
    let base = process.base_url.clone();
    (
        Server {
            process,
            base,
            recovered,
        },
        took,
    )
}

async fn reserve_phase(base: &str, products: u64, hot: u64, limits: Limits) -> PhaseStats {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(limits.connections)
        .build()
        .unwrap();
    let url = Arc::new(format!("{base}/v1/reservations"));
    run_phase(limits, move |worker, n| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let seed = (worker as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (n + 1);
            let x = fastrand::Rng::with_seed(seed).u64(..hot);
            let body = format!(
                r#"{{"customer_id":"load-{worker}","items":[{{"sku":"{}","quantity":1}}],"ttl_seconds":600}}"#,
                sku(x * (products / hot))
            );
            let sample = timed(post_json_body(&client, &url, body.into_bytes())).await;
            vec![sample]
        }
    })
    .await
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn p99_ms(stats: &PhaseStats) -> f64 {
    stats.latency_us.value_at_quantile(0.99) as f64 / 1000.0
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list`
    }
    // As the server does, for the offline snapshot taken in-process.
    stockd::memory::apply_transparent_huge_pages_setting().expect("THP setting");
    // RUST_LOG=stockd::storage::recovery=debug shows where replay time goes (the fold waiting for
    // the log reader, or not).
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let products = env_u64("CATALOGUE_PRODUCTS", 1_000_000).max(1);
    let reservations = env_u64("CATALOGUE_RESERVATIONS", 1_000_000);
    let tail = env_u64("CATALOGUE_TAIL", 100_000);
    let load = Duration::from_secs(env_u64("CATALOGUE_LOAD_SECONDS", 10));
    let connections = env_u64("CATALOGUE_CONNECTIONS", 64) as usize;
    let hot = env_u64("CATALOGUE_HOT", 1_000).clamp(1, products);
    let rate = env_u64("CATALOGUE_RATE", 5_000);
    let tmp = tempfile::tempdir().unwrap();
    // CATALOGUE_KEEP=1 keeps the data directory (its path is printed) for a closer look.
    let keep = env_u64("CATALOGUE_KEEP", 0) == 1;
    let dir = if keep {
        tmp.keep()
    } else {
        tmp.path().to_path_buf()
    };
    let dir = dir.as_path();
    if keep {
        println!("  data kept in {}", dir.display());
    }
    let log_dir = dir.join("data").join("log");
    let snapshots = dir.join("snapshots");
    let now = chrono::Utc::now().timestamp_millis();
    println!(
        "catalogue: {products} products, {reservations} pending reservations, tail {tail}, load {}",
        if rate > 0 {
            format!("{rate} reserves/s (open loop)")
        } else {
            format!("closed loop, {connections} connections")
        }
    );

    // (1) The log.
    let t = Instant::now();
    let creates = (0..products).map(|i| Record::ProductCreated {
        by: None,
        rules: Default::default(),
        low_stock_threshold: None,
        sku: sku(i),
        name: format!("Product {i}"),
        price: None,
        on_hand: 1_000,
        at: now,
    });
    let holds = (0..reservations).map(|i| Record::ReservationCreated {
        by: None,
        counted: Default::default(),
        id: uuid::Uuid::now_v7(),
        customer_id: format!("customer-{i}"),
        items: vec![Line {
            sku: sku(i % products),
            quantity: 1,
        }],
        created_at: now,
        expires_at: now + 86_400_000,
        idempotency: None,
    });
    let written = append_all(&log_dir, 1, creates.chain(holds));
    let generate = t.elapsed();
    println!(
        "  wrote {written} records in {:.1} s",
        generate.as_secs_f64()
    );

    // (2) Replay rate: the real binary started on the whole log, no snapshot yet. A fresh
    // process, as at a restart: folding in this process instead, right after it wrote the
    // log, measured its allocator returning the writer's memory (mimalloc's purge was 17 %
    // of the reading thread) rather than the replay.
    let no_snapshots = [
        "--snapshot-every-records",
        "0",
        "--snapshot-every-seconds",
        "0",
    ];
    let (server, from_scratch) = start_server(dir, &no_snapshots);
    let replayed = server.recovered["records"].as_u64().unwrap_or(0);
    let replay_ms = server.recovered["replay_ms"].as_u64().unwrap_or(0);
    let replay_rate = replayed as f64 / (replay_ms.max(1) as f64 / 1000.0);
    // SIGKILL: a clean stop would take a snapshot, and step (3) takes the first one.
    drop(server);
    println!(
        "  replay: {replayed} records in {replay_ms} ms = {:.2}M records/s (restart from the log alone: {:.0} ms)",
        replay_rate / 1e6,
        ms(from_scratch)
    );
    assert_eq!(replayed, written, "the server replayed the whole log");

    // (3) A snapshot of that state, offline.
    let t = Instant::now();
    let taken =
        stockd::storage::snapshotter::take_offline(&log_dir, &snapshots, 3, now, &|_| Ok(None))
            .expect("snapshot");
    let offline_snapshot = t.elapsed();
    println!(
        "  offline snapshot: {} bytes in {:.0} ms",
        taken.size_bytes,
        ms(offline_snapshot)
    );

    // (4) A log tail after the snapshot.
    let mut rng = fastrand::Rng::with_seed(88172645463325252);
    let tail_records = (0..tail).map(move |_| Record::Replenished {
        by: None,
        sku: sku(rng.u64(..products)),
        quantity: 1,
        at: now,
    });
    append_all(&log_dir, written + 1, tail_records);

    // (5) Restart to serving.
    let (server, restart) = start_server(dir, &[]);
    let pid = server.process.pid().expect("running");
    let rss_started_kb = status_kb(pid, "VmRSS:");
    let rss_peak_at_start_kb = status_kb(pid, "VmHWM:");
    let tail_replayed = server.recovered["records"].as_u64().unwrap_or(0);
    let tail_replay_ms = server.recovered["replay_ms"].as_u64().unwrap_or(0);
    let tail_replay_rate = tail_replayed as f64 / (tail_replay_ms.max(1) as f64 / 1000.0);
    println!(
        "  restart to serving: {:.0} ms (of which the log tail: {tail_replayed} records in {tail_replay_ms} ms = {:.2}M records/s); RSS {} MB",
        ms(restart),
        tail_replay_rate / 1e6,
        rss_started_kb / 1024
    );

    // (6) Reserves, then reserves during a snapshot.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let limits = Limits {
        connections,
        duration: load,
        requests_max: None,
        stop_on_error: false,
        rate: (rate > 0).then_some(rate as f64),
    };
    let base = server.base.clone();
    // The snapshot worker (a child process of the server) and its peak resident memory.
    let sampling = Arc::new(AtomicBool::new(true));
    let worker_peak = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while sampling.load(Ordering::Relaxed) {
                for child in children_of(pid) {
                    peak = peak.max(status_kb(child, "VmHWM:"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        })
    };
    let (baseline, during, after, snapshot_ms, snapshot_status) = runtime.block_on(async {
        // Warm-up (connections, first activations of the hot products), not measured.
        let warm = Limits {
            duration: Duration::from_secs(3),
            ..limits
        };
        reserve_phase(&base, products, hot, warm).await;
        let baseline = reserve_phase(&base, products, hot, limits).await;
        let url = format!("{base}/v1/admin/snapshot");
        let snap = tokio::spawn(async move {
            // Let the second phase warm up first.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let t = Instant::now();
            let res = reqwest::Client::new()
                .post(url)
                .timeout(Duration::from_secs(300))
                .send()
                .await;
            let (status, body) = match res {
                Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                Err(e) => (0, e.to_string()),
            };
            println!("  online snapshot answer: {body}");
            (t.elapsed(), status)
        });
        let during = reserve_phase(&base, products, hot, limits).await;
        let (took, status) = snap.await.unwrap();
        let after = reserve_phase(&base, products, hot, limits).await;
        (baseline, during, after, ms(took), status)
    });
    sampling.store(false, Ordering::Relaxed);
    let worker_peak_kb = worker_peak.join().unwrap_or(0);
    let rss_end_kb = status_kb(pid, "VmRSS:");
    let rss_peak_kb = status_kb(pid, "VmHWM:");
    let p99_ratio = p99_ms(&during) / p99_ms(&baseline);
    println!(
        "  reserves: baseline {:.0} req/s p99 {:.2} ms; during the snapshot {:.0} req/s p99 {:.2} ms ({p99_ratio:.2}x); after it {:.0} req/s p99 {:.2} ms; snapshot {snapshot_ms:.0} ms (HTTP {snapshot_status})",
        baseline.throughput_rps(),
        p99_ms(&baseline),
        during.throughput_rps(),
        p99_ms(&during),
        after.throughput_rps(),
        p99_ms(&after),
    );
    // Which part of the snapshot hurts: the worst latency in each second of the phase
    // (the snapshot starts 0.5 s in; its answer above gives build_ms and write_ms, the
    // rest of elapsed_ms is pruning and log truncation).
    let worst: Vec<String> = during
        .timeline
        .iter()
        .map(|s| format!("{:.1}", s.latency_max_us as f64 / 1000.0))
        .collect();
    println!(
        "  during the snapshot, worst latency per second (ms): {}",
        worst.join(" ")
    );
    println!(
        "  RSS: {} MB after start (peak {} MB during start-up), {} MB at the end, peak {} MB; snapshot worker peak {} MB; disk: log {} MB, snapshots {} MB",
        rss_started_kb / 1024,
        rss_peak_at_start_kb / 1024,
        rss_end_kb / 1024,
        rss_peak_kb / 1024,
        worker_peak_kb / 1024,
        dir_bytes(&dir.join("data")) / (1 << 20),
        dir_bytes(&snapshots) / (1 << 20)
    );
    let figures = serde_json::json!({
        "products": products,
        "reservations": reservations,
        "tail_records": tail,
        "load_rate": rate,
        "connections": connections,
        "log_records": written + tail,
        "replay_records_per_s": replay_rate,
        "restart_from_log_alone_ms": ms(from_scratch),
        "offline_snapshot_ms": ms(offline_snapshot),
        "snapshot_bytes": taken.size_bytes,
        "restart_to_serving_ms": ms(restart),
        "restart_tail_records": tail_replayed,
        "restart_tail_replay_ms": tail_replay_ms,
        "restart_tail_replay_records_per_s": tail_replay_rate,
        "rss_after_start_mb": rss_started_kb / 1024,
        "rss_end_mb": rss_end_kb / 1024,
        "rss_peak_mb": rss_peak_kb / 1024,
        "rss_peak_at_start_mb": rss_peak_at_start_kb / 1024,
        "snapshot_worker_peak_mb": worker_peak_kb / 1024,
        "baseline_rps": baseline.throughput_rps(),
        "baseline_p99_ms": p99_ms(&baseline),
        "during_snapshot_rps": during.throughput_rps(),
        "during_snapshot_p99_ms": p99_ms(&during),
        "p99_ratio": p99_ratio,
        "after_snapshot_rps": after.throughput_rps(),
        "after_snapshot_p99_ms": p99_ms(&after),
        "online_snapshot_ms": snapshot_ms,
        "online_snapshot_status": snapshot_status,
    });
    if let Ok(path) = std::env::var("CATALOGUE_JSON") {
        std::fs::write(path, serde_json::to_string_pretty(&figures).unwrap()).unwrap();
    }
    drop(server);
}
