//! A catalogue import over HTTP: the server's resident memory while N products are
//! created with `POST /v1/products`, against the same catalogue restored from a snapshot.
//!
//! `cargo bench --bench import` (release build). Sizes via environment variables:
//! `IMPORT_PRODUCTS` (default 1,000,000), `IMPORT_CLIENTS` (32 concurrent clients, each
//! creating one product after another), `IMPORT_PASSIVATE_AFTER` (the server's
//! `--passivate-after`, seconds; its default unless set), `IMPORT_DURABILITY` (`sync`),
//! `IMPORT_ACTIVATE=1` (each client also replenishes every product it created, so every
//! product gets an actor: the passivation backlog an import made when a create spawned
//! one, to measure its drain and the memory it returns), `IMPORT_JSON` (write the figures
//! there), `IMPORT_STOCKD` (the path of another `stockd` binary to measure, e.g. a
//! copy built from an earlier commit, to alternate two builds in one session; default the
//! one cargo built), `IMPORT_PROBE=1` (with a server built `--features memory-probe`: its held bytes
//! and mimalloc's pages printed after the drain, the snapshot and the restart).
//!
//! Steps: (1) start the real binary on an empty directory; (2) create the products from
//! the clients, sampling the server's VmRSS every 0.5 s: import rate, peak RSS, the RSS
//! curve; (3) RSS after the import, then once no product actor is resident any more (the
//! passivation backlog drained, `stockd_products_resident` 0) and the stopped actors'
//! memory was returned; (4) `POST /v1/admin/snapshot`, then kill -9 and restart on it:
//! the RSS of the same catalogue restored from a snapshot, and the ratio. The server is
//! killed at the end; the data is a temp directory.

mod support;
use support::env_u64;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use loadtest::server::Launch;

/// How often the server's RSS is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// A passivated actor stops this long after it answered (`RETIRE_GRACE_MS`), and its
/// memory is returned 1–1.5 s after that (two collections): waited for before "after the
/// drain".
const RETIRED_AND_RELEASED: Duration =
    Duration::from_millis(stockd::limits::RETIRE_GRACE_MS + 2_000);

fn vm_rss_kb(pid: u32) -> u64 {
    support::procfs::status_kb(pid, "VmRSS:")
}

/// The server's resident memory by kind (KiB): anonymous (the heap), file-backed (the
/// binary, mapped files) and shared memory.
fn rss_split(pid: u32) -> String {
    let kb = |field| support::procfs::status_kb(pid, field);
    format!(
        "anon {:.0}, file {:.0}, shmem {:.0} MiB",
        mib(kb("RssAnon:")),
        mib(kb("RssFile:")),
        mib(kb("RssShmem:"))
    )
}

/// The log segments (sled databases) the server has open: the directories of its open
/// files named `segment-*`.
fn open_segments(pid: u32) -> Vec<String> {
    let mut dirs: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .filter_map(|target| {
                    target
                        .ancestors()
                        .filter_map(|a| a.file_name()?.to_str())
                        .find(|name| name.starts_with("segment-"))
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// With `IMPORT_PROBE=1`, asks a `memory-probe` build of the server to print its figures
/// (SIGUSR1; the default action would kill any other build), and waits a moment for it.
fn probe(pid: u32, at: &str) {
    if env_u64("IMPORT_PROBE", 0) == 1 {
        eprintln!("  probe {at}:");
        let _ = std::process::Command::new("kill")
            .args(["-USR1", &pid.to_string()])
            .status();
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// A metric's value from `GET /metrics` (0 if absent).
async fn metric(client: &reqwest::Client, base: &str, name: &str) -> f64 {
    let Ok(res) = client.get(format!("{base}/metrics")).send().await else {
        return 0.0;
    };
    let text = res.text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Samples `pid`'s VmRSS every `SAMPLE_EVERY` until `stop`: (seconds since start, KiB).
fn sample_rss(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<(f64, u64)>> {
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut samples = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            samples.push((start.elapsed().as_secs_f64(), vm_rss_kb(pid)));
            std::thread::sleep(SAMPLE_EVERY);
        }
        samples.push((start.elapsed().as_secs_f64(), vm_rss_kb(pid)));
        samples
    })
}

/// One request; its HTTP status (0 if there was no answer).
async fn post(client: &reqwest::Client, url: &str, body: String) -> u16 {
    match client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
    {
        Ok(res) => {
            let status = res.status().as_u16();
            let _ = res.bytes().await;
            status
        }
        Err(_) => 0,
    }
}

/// Creates products `0..n` from `clients` concurrent clients (and replenishes each, when
/// `activate`); answers how many were not created (any answer but 201) or not replenished.
async fn import(base: &str, n: u64, clients: usize, activate: bool) -> u64 {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()
        .unwrap();
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let url = Arc::new(format!("{base}/v1/products"));
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (client, next, failed, url) =
                (client.clone(), next.clone(), failed.clone(), url.clone());
            let base = base.to_string();
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return;
                    }
                    let body = format!(
                        r#"{{"sku":"SKU-{i:08}","name":"Product {i}","price":{{"amount_minor":{},"currency":"EUR"}},"on_hand":1000}}"#,
                        100 + i % 10_000
                    );
                    let mut status = post(&client, url.as_str(), body).await;
                    if activate && status == 201 {
                        let replenish = format!("{base}/v1/products/SKU-{i:08}/replenish");
                        let body = r#"{"quantity":1}"#.to_string();
                        status = match post(&client, &replenish, body).await {
                            200 => 201,
                            other => other,
                        };
                    }
                    // The first few failures are shown; all are counted.
                    if status != 201 && failed.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("  SKU-{i:08}: HTTP {status}");
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    failed.load(Ordering::Relaxed)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list`
    }
    let products = env_u64("IMPORT_PRODUCTS", 1_000_000).max(1);
    let clients = env_u64("IMPORT_CLIENTS", 32).max(1) as usize;
    let durability = std::env::var("IMPORT_DURABILITY").unwrap_or_else(|_| "sync".into());
    let passivate_after = std::env::var("IMPORT_PASSIVATE_AFTER").ok();
    let activate = env_u64("IMPORT_ACTIVATE", 0) == 1;
    let tmp = tempfile::tempdir().unwrap();
    let binary = std::env::var("IMPORT_STOCKD").unwrap_or(env!("CARGO_BIN_EXE_stockd").into());
    let mut launch = Launch::serve(&binary, tmp.path())
        .durability(&durability)
        .timeout(Duration::from_secs(600));
    if let Some(seconds) = &passivate_after {
        launch = launch.args(["--passivate-after", seconds]);
    }
    let mut server = launch.start().expect("stockd starts");
    let pid = server.pid().expect("running");
    let base = server.base_url.clone();
    let rss_empty_kb = vm_rss_kb(pid);
    println!(
        "import: {products} products over HTTP{}, {clients} clients, durability {durability}, passivate after {}",
        if activate { ", each replenished once" } else { "" },
        passivate_after
            .as_deref()
            .map_or("the default".to_string(), |s| format!("{s} s"))
    );

    // (2) The import, with RSS sampled throughout.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_rss(pid, stop.clone());
    let started = Instant::now();
    let failed = runtime.block_on(import(&base, products, clients, activate));
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().unwrap();
    let rate = (products - failed) as f64 / took.as_secs_f64();
    let peak_kb = samples.iter().map(|s| s.1).max().unwrap_or(0);
    println!(
        "  created {} in {:.1} s = {rate:.0} products/s ({failed} failed)",
        products - failed,
        took.as_secs_f64()
    );
    // The curve, at every tenth of the import.
    let curve: Vec<String> = (1..=10)
        .filter_map(|tenth| {
            let at = took.as_secs_f64() * tenth as f64 / 10.0;
            let sample = samples.iter().rev().find(|s| s.0 <= at + 1e-9)?;
            Some(format!("{:.0}", mib(sample.1)))
        })
        .collect();
    println!(
        "  RSS (MiB): empty {:.0}; at each tenth of the import {}; peak {:.0} ({} samples)",
        mib(rss_empty_kb),
        curve.join(" "),
        mib(peak_kb),
        samples.len()
    );

    // (3) After the import, and once the passivation backlog drained.
    let rss_after_import_kb = vm_rss_kb(pid);
    let client = reqwest::Client::new();
    let drain_started = Instant::now();
    let (resident_after_import, passivations) = runtime.block_on(async {
        let resident = metric(&client, &base, "stockd_products_resident").await;
        while metric(&client, &base, "stockd_products_resident").await > 0.0 {
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
        let passivations = metric(&client, &base, "stockd_product_passivations_total").await;
        (resident, passivations)
    });
    let drained_in = drain_started.elapsed();
    if passivations > 0.0 {
        std::thread::sleep(RETIRED_AND_RELEASED);
    }
    let rss_drained_kb = vm_rss_kb(pid);
    println!(
        "  RSS after the import {:.0} MiB ({resident_after_import} resident actors); after the passivation backlog drained ({passivations} passivated, {:.1} s) {:.0} MiB",
        mib(rss_after_import_kb),
        drained_in.as_secs_f64(),
        mib(rss_drained_kb)
    );
    println!(
        "  after the drain: {}; log segments open {:?}",
        rss_split(pid),
        open_segments(pid)
    );
    probe(pid, "after the drain");

    // (4) A snapshot, and a restart from it.
    let snapshot = runtime.block_on(async {
        let res = client
            .post(format!("{base}/v1/admin/snapshot"))
            .timeout(Duration::from_secs(600))
            .send()
            .await
            .expect("snapshot answer");
        assert!(res.status().is_success(), "snapshot: {}", res.status());
        res.text().await.unwrap_or_default()
    });
    // Taking it returns the memory the server freed meanwhile (`mi_collect`).
    let rss_after_snapshot_kb = vm_rss_kb(pid);
    println!(
        "  snapshot: {snapshot}; RSS after it {:.0} MiB",
        mib(rss_after_snapshot_kb)
    );
    println!(
        "  after the snapshot: {}; log segments open {:?}",
        rss_split(pid),
        open_segments(pid)
    );
    probe(pid, "after the snapshot");
    let restart = server.restart().expect("restarts");
    let pid = server.pid().expect("running");
    std::thread::sleep(Duration::from_secs(1));
    let rss_restarted_kb = vm_rss_kb(pid);
    println!("  restarted: {}", rss_split(pid));
    probe(pid, "restarted");
    let listed = runtime.block_on(metric(&client, &server.base_url, "stockd_products"));
    assert_eq!(listed as u64, products - failed, "every product restored");
    let ratio = rss_drained_kb as f64 / rss_restarted_kb.max(1) as f64;
    println!(
        "  restart from the snapshot: {:.1} s to serving, RSS {:.0} MiB; after the import / restarted = {ratio:.2}",
        restart.as_secs_f64(),
        mib(rss_restarted_kb)
    );
    let figures = serde_json::json!({
        "products": products,
        "clients": clients,
        "activate": activate,
        "durability": durability,
        "failed": failed,
        "import_s": took.as_secs_f64(),
        "products_per_s": rate,
        "rss_empty_mib": mib(rss_empty_kb),
        "rss_peak_mib": mib(peak_kb),
        "rss_curve_mib": samples.iter().map(|s| [s.0, mib(s.1)]).collect::<Vec<_>>(),
        "rss_after_import_mib": mib(rss_after_import_kb),
        "rss_after_drain_mib": mib(rss_drained_kb),
        "resident_actors_after_import": resident_after_import,
        "rss_after_snapshot_mib": mib(rss_after_snapshot_kb),
        "rss_restarted_mib": mib(rss_restarted_kb),
        "ratio_after_import_to_restarted": ratio,
    });
    if let Ok(path) = std::env::var("IMPORT_JSON") {
        std::fs::write(path, serde_json::to_string_pretty(&figures).unwrap()).unwrap();
    }
    drop(server);
}
