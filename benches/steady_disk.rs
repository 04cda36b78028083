//! Disk use under a steady workload: with snapshots, log truncation and
//! retention, the bytes of the log and of the snapshots level off instead of growing.
//!
//! `cargo bench --bench steady_disk`. Starts the real binary with small thresholds
//! (`--snapshot-every-records`, `--retention-seconds`) so the plateau shows within a
//! couple of minutes, runs reserve → confirm|cancel on 50 products from `STEADY_CONNECTIONS`
//! (16) connections for `STEADY_SECONDS` (90), and prints the bytes of the data directory
//! (the sled log) and of the snapshot directory every 5 seconds. Sizes via environment:
//! `STEADY_SNAPSHOT_EVERY` (20,000 records), `STEADY_RETENTION` (20 s).

mod support;
use support::{dir_bytes, env_u64};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use loadtest::server::Launch;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let seconds = env_u64("STEADY_SECONDS", 90);
    let connections = env_u64("STEADY_CONNECTIONS", 16);
    let every = env_u64("STEADY_SNAPSHOT_EVERY", 20_000);
    let retention = env_u64("STEADY_RETENTION", 20);
    let tmp = tempfile::tempdir().unwrap();
    let (data, snapshots) = (tmp.path().join("data"), tmp.path().join("snapshots"));
    let server = Launch::serve(env!("CARGO_BIN_EXE_stockd"), tmp.path())
        .args(["--snapshot-every-records", &every.to_string()])
        .args(["--snapshot-every-seconds", "0"])
        .args(["--retention-seconds", &retention.to_string()])
        .start()
        .expect("stockd starts");
    let base = server.base_url.clone();
    println!(
        "steady disk: {seconds} s, {connections} connections, snapshot every {every} records, retention {retention} s"
    );
    println!("| s | records (approx.) | log MB | snapshots MB | snapshot files |");
    println!("| ---: | ---: | ---: | ---: | ---: |");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = reqwest::Client::new();
        for i in 0..50 {
            let r = client
                .post(format!("{base}/v1/products"))
                .header("content-type", "application/json")
                .body(format!(
                    r#"{{"sku":"S{i}","name":"steady {i}","on_hand":1000000000}}"#
                ))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
        }
        let records = Arc::new(AtomicU64::new(50));
        let stop_at = Instant::now() + Duration::from_secs(seconds);
        let mut workers = Vec::new();
        for w in 0..connections {
            let (client, base, records) = (client.clone(), base.clone(), records.clone());
            workers.push(tokio::spawn(async move {
                let mut n = w;
                while Instant::now() < stop_at {
                    n += connections;
                    let body = format!(
                        r#"{{"customer_id":"c{w}","items":[{{"sku":"S{}","quantity":1}}],"ttl_seconds":10}}"#,
                        n % 50
                    );
                    let Ok(r) = client
                        .post(format!("{base}/v1/reservations"))
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                    else {
                        continue;
                    };
                    let Ok(v) = r.json::<serde_json::Value>().await else {
                        continue;
                    };
                    let Some(id) = v["id"].as_str() else { continue };
                    let verb = if n % 2 == 0 { "confirm" } else { "cancel" };
                    let _ = client
                        .post(format!("{base}/v1/reservations/{id}/{verb}"))
                        .send()
                        .await;
                    records.fetch_add(2, Ordering::Relaxed);
                }
            }));
        }
        let started = Instant::now();
        let mut peak = (0, 0);
        while Instant::now() < stop_at {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let (log, snap) = (dir_bytes(&data), dir_bytes(&snapshots));
            peak = (peak.0.max(log), peak.1.max(snap));
            let files = stockd::storage::snapshot::list(&snapshots).map_or(0, |l| l.len());
            println!(
                "| {} | {} | {:.1} | {:.1} | {files} |",
                started.elapsed().as_secs(),
                records.load(Ordering::Relaxed),
                log as f64 / 1e6,
                snap as f64 / 1e6
            );
        }
        for w in workers {
            let _ = w.await;
        }
        println!(
            "peak: log {:.1} MB, snapshots {:.1} MB, after {} records",
            peak.0 as f64 / 1e6,
            peak.1 as f64 / 1e6,
            records.load(Ordering::Relaxed)
        );
    });
    drop(server);
}
