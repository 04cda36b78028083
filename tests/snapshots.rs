//! Snapshots, bounded recovery and passivation (docs/ARCHITECTURE.md, "Snapshots and the
//! log's length"): the on-demand endpoint, the automatic policy keeping the log bounded, a
//! passive product behaving like a resident one, and, against the real binary, kill -9
//! during a snapshot, a corrupted newest snapshot, a damaged log record, and the operator
//! commands.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::procfs::{children_of, is_alive};
use common::{
    eventually, restarts_reach, serve_command, snapshot_being_written, ChildServer, Client,
    TestServer, START_MS,
};
use serde_json::{json, Value};
use stockd::clock::ManualClock;
use stockd::service::NewProduct;
use stockd::{Config, Durability};

fn snapshot_files(dir: &Path) -> Vec<PathBuf> {
    stockd::storage::snapshot::list(dir)
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

fn flip_middle_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(path, bytes).unwrap();
}

/// The stock figures of a product view (what must agree between two products).
fn figures(view: &Value) -> Value {
    json!({
        "on_hand": view["on_hand"], "reserved": view["reserved"],
        "available": view["available"], "sold": view["sold"], "version": view["version"],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_snapshot_answers_sequence_file_and_size_and_restart_uses_it() {
    let t = TestServer::start().await;
    let c = t.client.clone();
    c.create_product("A", 10).await;
    assert_eq!(c.reserve("u1", "A", 3).await.status, 201);

    let a = c.post("/v1/admin/snapshot", json!({})).await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    assert_eq!(a.body["sequence"], 2, "{:?}", a.body);
    assert_eq!(a.body["created"], true);
    let file = a.body["file"].as_str().unwrap().to_string();
    let path = t.dir.path().join("snapshots").join(&file);
    assert_eq!(
        a.body["size_bytes"].as_u64(),
        Some(std::fs::metadata(&path).unwrap().len())
    );
    let inspected = stockd::storage::snapshot::inspect(&path).unwrap();
    assert_eq!(
        (
            inspected.sequence,
            inspected.products,
            inspected.units_reserved
        ),
        (2, 1, 3)
    );

    // Nothing changed since: the same snapshot, 200.
    let again = c.post("/v1/admin/snapshot", json!({})).await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert_eq!(
        (
            again.body["sequence"].clone(),
            again.body["created"].clone()
        ),
        (json!(2), json!(false))
    );
    c.post("/v1/admin/snapshot", json!({"now": true}))
        .await
        .assert_problem(422, "validation_failed");
    c.get("/v1/admin/snapshot")
        .await
        .assert_problem(405, "method_not_allowed");

    assert_eq!(c.reserve("u2", "A", 2).await.status, 201);
    let before = c.product("A").await;
    let t = t.restart().await;
    assert_eq!(figures(&t.client.product("A").await), figures(&before));
    assert_eq!(before["reserved"], 5);
    t.stop().await;
}

fn small_snapshots(config: &mut Config) {
    config.snapshots.every_records = 40;
    config.snapshots.every = None;
    config.snapshots.keep = 2;
    config.log_segment_records = 16;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_and_snapshots_stay_bounded_under_a_steady_workload() {
    let dir = tempfile::tempdir().unwrap();
    let clock = std::sync::Arc::new(ManualClock::new(START_MS));
    let t = TestServer::start_tweaked(dir, clock, Durability::Sync, small_snapshots).await;
    let c = t.client.clone();
    c.create_product("A", 1_000).await;
    let snapshots = t.dir.path().join("snapshots");
    let mut written = 1u64;
    for round in 0..8 {
        for i in 0..40 {
            let r = c.reserve(&format!("u{round}-{i}"), "A", 1).await;
            assert_eq!(r.status, 201, "{:?}", r.body);
            let id = r.body["id"].as_str().unwrap().to_string();
            let x = c
                .post(&format!("/v1/reservations/{id}/cancel"), json!({}))
                .await;
            assert_eq!(x.status, 200);
        }
        written += 80;
        // The snapshotter takes one within its next check (every 500 ms).
        let caught_up = eventually(Duration::from_secs(10), || {
            let snapshots = snapshots.clone();
            async move {
                stockd::storage::snapshot::list(&snapshots)
                    .unwrap()
                    .first()
                    .is_some_and(|(seq, _)| written - seq < 40)
            }
        })
        .await;
        assert!(caught_up, "no automatic snapshot after round {round}");
        // The new file is renamed into place before the oldest is pruned: 3 for a moment.
        let pruned = eventually(Duration::from_secs(10), || {
            let snapshots = snapshots.clone();
            async move { snapshot_files(&snapshots).len() <= 2 }
        })
        .await;
        assert!(pruned, "keeps 2 snapshots");
    }
    let before = c.product("A").await;
    let dir_path = t.dir.path().to_path_buf();
    let t = t.restart().await;
    assert_eq!(figures(&t.client.product("A").await), figures(&before));
    let mut t = t;
    t.server.take().unwrap().shutdown().await.unwrap();

    let log = stockd::storage::log::Log::open(&dir_path.join("data").join("log")).unwrap();
    let summary = log.reader().summary().unwrap();
    assert_eq!(summary.last_seq, Some(written));
    // Whole segments (16 records here) are dropped: at most one straddles the mark.
    assert!(
        summary.records <= 160 + 16 && summary.first_seq > Some(1),
        "{written} records written, the log keeps only those after the oldest kept snapshot: {summary:?}"
    );
    let first = summary.first_seq.unwrap();
    assert!(first <= summary.truncated_through + 1 && first + 16 > summary.truncated_through);
    assert!(snapshot_files(&dir_path.join("snapshots")).len() <= 2);
}

fn passivate_after_60s(config: &mut Config) {
    config.passivate_after = Some(Duration::from_secs(60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passive_product_behaves_exactly_like_a_resident_one() {
    let dir = tempfile::tempdir().unwrap();
    let clock = std::sync::Arc::new(ManualClock::new(START_MS));
    let t = TestServer::start_tweaked(dir, clock, Durability::Sync, passivate_after_60s).await;
    let client = t.client.clone();
    let c = &client;
    // "P" is passivated before every step; "R" stays resident (it is touched first).
    c.create_product("P", 10).await;
    c.create_product("R", 10).await;
    // Both start passive; a reserve refused for want of stock activates R (it needs the
    // actor to hold) without changing its figures.
    assert_eq!(t.service().stats().await.unwrap().active_products, 0);
    assert_eq!(c.reserve("u", "R", 11).await.status, 409);
    assert_eq!(t.service().stats().await.unwrap().active_products, 1);
    let passivate_p = || async {
        // P idle for 62 s, R for at most 31 s: the periodic check may passivate P before
        // the explicit call below does, but never R.
        for _ in 0..2 {
            t.clock.advance_ms(31_000);
            c.product("R").await;
        }
        let done = t.service().passivate_idle().await.unwrap();
        assert!(done <= 1);
        let stats = t.service().stats().await.unwrap();
        assert_eq!(stats.active_products, 1, "only R is resident: {stats:?}");
    };
    let same = |step: &'static str| async move {
        let (p, r) = (c.product("P").await, c.product("R").await);
        assert_eq!(figures(&p), figures(&r), "after {step}");
    };
    let reserve = |sku: &'static str, quantity: u64, ttl: u64| async move {
        let a = c
            .post(
                "/v1/reservations",
                json!({"customer_id": "u", "items": [{"sku": sku, "quantity": quantity}], "ttl_seconds": ttl}),
            )
            .await;
        assert_eq!(a.status, 201, "{:?}", a.body);
        a.body["id"].as_str().unwrap().to_string()
    };
    let post = |path: String| async move {
        let a = c.post(&path, json!({})).await;
        assert_eq!(a.status, 200, "{path}: {:?}", a.body);
        a.body
    };

    passivate_p().await;
    let (p1, r1) = (reserve("P", 3, 86_400).await, reserve("R", 3, 86_400).await);
    same("a reserve that activates P").await;

    passivate_p().await;
    let activations = t.service().stats().await.unwrap().activations;
    post(format!("/v1/reservations/{p1}/confirm")).await;
    post(format!("/v1/reservations/{r1}/confirm")).await;
    same("a confirm while passive").await;

    let (p2, r2) = (reserve("P", 2, 86_400).await, reserve("R", 2, 86_400).await);
    passivate_p().await;
    post(format!("/v1/reservations/{p2}/cancel")).await;
    post(format!("/v1/reservations/{r2}/cancel")).await;
    same("a cancel while passive").await;

    let (p3, r3) = (reserve("P", 4, 100).await, reserve("R", 4, 100).await);
    passivate_p().await; // 61 s of the 100 s TTL gone
    let activations_before_expiry = t.service().stats().await.unwrap().activations;
    t.clock.advance_ms(40_000);
    // The expiry timer fires (100 ms tick) for both, without waking P.
    let fired = eventually(Duration::from_secs(5), || async {
        let p = c.product("P").await;
        let r = c.product("R").await;
        p["reserved"] == 0 && r["reserved"] == 0
    })
    .await;
    assert!(
        fired,
        "expiry fired for the passive and the resident product"
    );
    assert_eq!(
        c.get(&format!("/v1/reservations/{p3}")).await.body["status"],
        "expired"
    );
    assert_eq!(
        c.get(&format!("/v1/reservations/{r3}")).await.body["status"],
        "expired"
    );
    let stats = t.service().stats().await.unwrap();
    assert_eq!(
        stats.activations, activations_before_expiry,
        "reads and expiry do not activate"
    );
    assert_eq!(stats.active_products, 1);
    assert!(activations > 0);
    same("an expiry while passive").await;

    passivate_p().await;
    for sku in ["P", "R"] {
        let a = c
            .post(
                &format!("/v1/products/{sku}/replenish"),
                json!({"quantity": 5}),
            )
            .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
    }
    same("a replenish that activates P").await;

    // Listing shows the same figures for a passive and a resident product.
    passivate_p().await;
    let page = c.get("/v1/products").await;
    let items = page.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(figures(&items[0]), figures(&items[1]));

    // After a restart every product starts passive, with the same figures.
    let t = t.restart().await;
    let stats = t.service().stats().await.unwrap();
    assert_eq!(
        stats.active_products, 0,
        "start-up spawns no actor per product"
    );
    let (p, r) = (t.client.product("P").await, t.client.product("R").await);
    assert_eq!(figures(&p), figures(&r));
    assert_eq!(
        (p["on_hand"].clone(), p["sold"].clone()),
        (json!(12), json!(3))
    );
    t.stop().await;
}

/// A created product is plain data, like a recovered one: reads do not wake it; its first
/// stock change or reservation spawns its actor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_created_product_has_no_actor_until_its_first_change_or_reservation() {
    let t = TestServer::start().await;
    let c = &t.client;
    for sku in ["A", "B", "C", "D"] {
        c.create_product(sku, 10).await;
    }
    let stats = || async { t.service().stats().await.unwrap() };
    let s = stats().await;
    assert_eq!(
        (s.products, s.active_products, s.activations),
        (4, 0, 0),
        "{s:?}"
    );
    // Reads, one by one and listed, are answered from the plain data.
    assert_eq!(c.product("A").await["available"], 10);
    let page = c.get("/v1/products").await;
    assert_eq!(page.body["items"].as_array().unwrap().len(), 4);
    assert_eq!(stats().await.active_products, 0);
    // A reservation activates its product.
    assert_eq!(c.reserve("u", "A", 2).await.status, 201);
    let s = stats().await;
    assert_eq!((s.active_products, s.activations), (1, 1), "{s:?}");
    // So do stock changes.
    let replenish = c
        .post("/v1/products/B/replenish", json!({"quantity": 5}))
        .await;
    assert_eq!(replenish.status, 200, "{:?}", replenish.body);
    let adjust = c.post("/v1/products/C/adjust", json!({"delta": -3})).await;
    assert_eq!(adjust.status, 200, "{:?}", adjust.body);
    let s = stats().await;
    assert_eq!((s.active_products, s.activations), (3, 3), "{s:?}");
    assert_eq!(
        (
            c.product("A").await["available"].clone(),
            c.product("B").await["on_hand"].clone(),
            c.product("C").await["on_hand"].clone(),
            c.product("D").await["on_hand"].clone(),
        ),
        (json!(8), json!(15), json!(7), json!(10))
    );
    // D was never touched: still no actor, and it is in the log like the others.
    let t = t.restart().await;
    assert_eq!(t.client.product("D").await["on_hand"], 10);
    assert_eq!(t.client.product("B").await["on_hand"], 15);
    t.stop().await;
}

/// A server with more idle actors than one message passivates
/// (`PASSIVATIONS_PER_MESSAGE_MAX`): 1,000 products ("IDLE-i", created passive) activated
/// by a replenish each, then the clock moved past `passivate_after`. Answers how many.
async fn idle_backlog() -> (TestServer, usize) {
    let n = stockd::limits::PASSIVATIONS_PER_MESSAGE_MAX * 7 + 104; // 1,000
    let t = TestServer::start().await;
    let service = t.service();
    for chunk in (0..n).collect::<Vec<_>>().chunks(64) {
        futures_util::future::join_all(chunk.iter().map(|i| async move {
            let sku = format!("IDLE-{i:05}");
            service
                .create_product(NewProduct::new(sku.clone(), sku.clone(), None, 1), None)
                .await
                .unwrap();
            let change = stockd::actors::product::Change::Replenish { quantity: 1 };
            service
                .change_product(&sku, change, None, None)
                .await
                .unwrap();
        }))
        .await;
    }
    let stats = service.stats().await.unwrap();
    assert_eq!(stats.active_products, n, "{stats:?}");
    t.clock.advance_ms(61_000);
    (t, n)
}

/// More idle actors than one message passivates (`PASSIVATIONS_PER_MESSAGE_MAX`): one
/// `PassivateIdle` call answers once every one of them is passive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_call_passivates_a_backlog_larger_than_a_batch() {
    let (t, n) = idle_backlog().await;
    let done = t.service().passivate_idle().await.unwrap();
    let stats = t.service().stats().await.unwrap();
    // The periodic check may have passivated some of them first; none is left either way.
    assert!(done <= n);
    assert_eq!(
        (stats.active_products, stats.passivations),
        (0, n as u64),
        "{stats:?}"
    );
    // Passive products still serve, and activate again.
    assert_eq!(t.client.product("IDLE-00999").await["on_hand"], 2);
    assert_eq!(t.client.reserve("u", "IDLE-00999", 2).await.status, 201);
    assert_eq!(t.service().stats().await.unwrap().active_products, 1);
    t.stop().await;
}

/// The periodic check drains a backlog larger than one batch on its own: after one step of
/// the clock, its continuation messages passivate them all (without the clock moving on to
/// more checks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_periodic_check_passivates_a_backlog_larger_than_a_batch() {
    let (t, n) = idle_backlog().await;
    let service = t.service();
    let drained = eventually(Duration::from_secs(30), || async {
        service.stats().await.unwrap().active_products == 0
    })
    .await;
    let stats = service.stats().await.unwrap();
    assert!(drained, "{stats:?}");
    assert_eq!(stats.passivations, n as u64);
    t.stop().await;
}

// ---- the real binary ----------------------------------------------------------------

fn stockd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stockd"));
    cmd.env("RUST_LOG", "warn");
    // As every server the tests start: an admin key of the developer's is not passed on.
    for var in loadtest::server::ADMIN_KEY_VARIABLES {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs `stockd serve` expecting it to refuse to start; returns its stderr. A server that
/// starts after all is killed after 20 s, and the test fails.
fn start_refused(dir: &Path, extra: &[&str]) -> String {
    let mut cmd = stockd();
    cmd.arg("serve")
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--snapshot-dir")
        .arg(dir.join("snapshots"))
        .args(extra);
    let exited = loadtest::server::run_to_exit(cmd, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("stockd should have refused to start: {e}"));
    assert!(!exited.status.success());
    exited.stderr
}

fn run(args: &[&str]) -> Output {
    stockd().args(args).output().unwrap()
}

fn json_of(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {:?}, stderr {:?}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

async fn reserve_ok(c: &Client, customer: &str, sku: &str) -> String {
    let a = c.reserve(customer, sku, 1).await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    a.body["id"].as_str().unwrap().to_string()
}

async fn assert_statuses(c: &Client, expected: &[(String, &str)]) {
    for (id, status) in expected {
        let a = c.get(&format!("/v1/reservations/{id}")).await;
        assert_eq!(
            a.status, 200,
            "acknowledged reservation {id} lost: {:?}",
            a.body
        );
        assert_eq!(a.body["status"], *status, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_a_snapshot_is_written_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let snapshots = dir.path().join("snapshots");
    let mut s = ChildServer::spawn(dir.path(), &["--test-snapshot-pause-ms", "1500"]);
    let c = s.client.clone();
    c.create_product("A", 100).await;
    let mut acked = Vec::new();
    for i in 0..5 {
        acked.push((reserve_ok(&c, &format!("a{i}"), "A").await, "pending"));
    }
    let first = c.post("/v1/admin/snapshot", json!({})).await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    for i in 0..5 {
        acked.push((reserve_ok(&c, &format!("b{i}"), "A").await, "pending"));
    }
    // A second snapshot, killed while its file is being written.
    let background = c.clone();
    let second = tokio::spawn(async move {
        background
            .send(reqwest::Method::POST, "/v1/admin/snapshot", Some("{}"), &[])
            .await
    });
    assert!(
        snapshot_being_written(&snapshots, Duration::from_secs(10)).await,
        "the snapshot file is being written"
    );
    // Traffic is served while the snapshot is being built: nothing pauses.
    for i in 0..3 {
        acked.push((reserve_ok(&c, &format!("c{i}"), "A").await, "pending"));
    }
    let workers = children_of(s.pid().expect("running"));
    assert_eq!(workers.len(), 1, "one snapshot worker: {workers:?}");
    s.kill9();
    assert!(
        second.await.unwrap().is_err(),
        "the killed snapshot was never answered"
    );
    // The worker dies with the server. (A worker that survived would also end, after its
    // pause; what tells the two apart is the file check below.)
    let worker_gone = eventually(Duration::from_secs(10), || async {
        workers.iter().all(|pid| !is_alive(*pid))
    })
    .await;
    assert!(worker_gone, "the snapshot worker outlived the server");
    // Killed, not finished: its file was never renamed into place.
    let finished = snapshot_files(&snapshots);
    assert_eq!(finished.len(), 1, "only the first snapshot: {finished:?}");

    let s = ChildServer::spawn(dir.path(), &[]);
    assert_statuses(&s.client, &acked).await;
    let a = s.client.product("A").await;
    assert_eq!(
        (a["reserved"].clone(), a["on_hand"].clone()),
        (json!(13), json!(100))
    );
    let left: Vec<_> = std::fs::read_dir(&snapshots)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left,
        vec![first.body["file"].as_str().unwrap().to_string()],
        "the unfinished file is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_newest_snapshot_falls_back_to_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let snapshots = dir.path().join("snapshots");
    let mut s = ChildServer::spawn(dir.path(), &[]);
    let c = s.client.clone();
    c.create_product("A", 100).await;
    let mut acked = Vec::new();
    for i in 0..4 {
        acked.push((reserve_ok(&c, &format!("a{i}"), "A").await, "pending"));
    }
    assert_eq!(c.post("/v1/admin/snapshot", json!({})).await.status, 201);
    for i in 0..4 {
        acked.push((reserve_ok(&c, &format!("b{i}"), "A").await, "pending"));
    }
    for (id, status) in acked.iter_mut().take(2) {
        let a = c
            .post(&format!("/v1/reservations/{id}/confirm"), json!({}))
            .await;
        assert_eq!(a.status, 200);
        *status = "confirmed";
    }
    // The second snapshot truncates the log through the first (its fallback).
    assert_eq!(c.post("/v1/admin/snapshot", json!({})).await.status, 201);
    for i in 0..3 {
        acked.push((reserve_ok(&c, &format!("c{i}"), "A").await, "pending"));
    }
    let id = acked[2].0.clone();
    assert_eq!(
        c.post(&format!("/v1/reservations/{id}/cancel"), json!({}))
            .await
            .status,
        200
    );
    acked[2].1 = "cancelled";
    s.kill9();

    let files = snapshot_files(&snapshots);
    assert_eq!(files.len(), 2);
    flip_middle_byte(&files[0]);
    let logged = dir.path().join("stderr.txt");
    let s = ChildServer::start_with_stderr(
        serve_command(dir.path(), &[]),
        dir.path().join("data"),
        Stdio::from(std::fs::File::create(&logged).unwrap()),
    );
    assert_statuses(&s.client, &acked).await;
    // Said once, naming the file and why.
    let warning = format!(
        "skipping a snapshot that does not verify error={} fails its checksum",
        files[0].display()
    );
    let read = || std::fs::read_to_string(&logged).unwrap_or_default();
    eventually(Duration::from_secs(5), || async {
        read().contains(&warning)
    })
    .await;
    assert_eq!(read().matches("does not verify").count(), 1, "{}", read());
    assert!(read().contains(&warning), "{}", read());
    let a = s.client.product("A").await;
    assert_eq!(
        (
            a["reserved"].clone(),
            a["sold"].clone(),
            a["on_hand"].clone()
        ),
        (json!(8), json!(2), json!(98))
    );
    drop(s);

    // With the fallback damaged too, the log alone cannot rebuild the state: refuse.
    let files = snapshot_files(&snapshots);
    for file in &files {
        if stockd::storage::snapshot::read(file).is_ok() {
            flip_middle_byte(file);
        }
    }
    let stderr = start_refused(dir.path(), &[]);
    assert!(
        stderr.contains("no snapshot at or after it verifies"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_log_record_stops_start_up_unless_truncation_is_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = ChildServer::spawn(dir.path(), &[]);
    let c = s.client.clone();
    c.create_product("A", 100).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(reserve_ok(&c, &format!("u{i}"), "A").await);
    }
    // A snapshot after the damaged record, itself damaged: recovery must read the log.
    assert_eq!(c.post("/v1/admin/snapshot", json!({})).await.status, 201);
    s.kill9();
    let snapshots = dir.path().join("snapshots");
    let files = snapshot_files(&snapshots);
    assert_eq!(files.len(), 1);
    flip_middle_byte(&files[0]);
    stockd::storage::log::damage_record(&dir.path().join("data").join("log"), 4).unwrap();

    let stderr = start_refused(dir.path(), &[]);
    assert!(stderr.contains("log record 4 is damaged"), "{stderr}");
    assert_eq!(
        stderr.matches("log record 4 is damaged").count(),
        1,
        "{stderr}"
    );
    assert!(
        stderr.contains("; refusing to start (--truncate-damaged-log would start"),
        "{stderr}"
    );

    // Its warning says what happened, not that it refuses to start (it starts).
    let logged = dir.path().join("stderr.txt");
    let s = ChildServer::start_with_stderr(
        serve_command(dir.path(), &["--truncate-damaged-log"]),
        dir.path().join("data"),
        Stdio::from(std::fs::File::create(&logged).unwrap()),
    );
    let said =
        |text: &str| std::fs::read_to_string(&logged).is_ok_and(|logged| logged.contains(text));
    assert!(
        eventually(Duration::from_secs(5), || async {
            said("log truncated at a damaged record, as asked (--truncate-damaged-log)")
        })
        .await,
        "{:?}",
        std::fs::read_to_string(&logged)
    );
    assert!(said("log record 4 is damaged"));
    assert!(
        !said("refusing to start"),
        "{:?}",
        std::fs::read_to_string(&logged)
    );
    assert_eq!(
        s.client.product("A").await["reserved"],
        2,
        "records 2 and 3 survive"
    );
    assert_eq!(
        s.client
            .get(&format!("/v1/reservations/{}", ids[1]))
            .await
            .status,
        200
    );
    assert_eq!(
        s.client
            .get(&format!("/v1/reservations/{}", ids[2]))
            .await
            .status,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_snapshot_inspect_and_dump() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let snapshots = dir.path().join("snapshots");
    let (data_s, snap_s) = (data.to_str().unwrap(), snapshots.to_str().unwrap());
    let mut s = ChildServer::spawn(dir.path(), &[]);
    let c = s.client.clone();
    c.create_product("A", 10).await;
    reserve_ok(&c, "u1", "A").await;
    reserve_ok(&c, "u2", "A").await;

    let busy = run(&["snapshot", "--data-dir", data_s, "--snapshot-dir", snap_s]);
    assert!(!busy.status.success());
    assert!(String::from_utf8_lossy(&busy.stderr).contains("is a server running"));
    s.kill9();

    let dump = run(&["log", "dump", "--data-dir", data_s, "--json"]);
    assert!(dump.status.success());
    let dump = json_of(&dump);
    assert_eq!(
        (
            dump["first_seq"].clone(),
            dump["last_seq"].clone(),
            dump["records"].clone()
        ),
        (json!(1), json!(3), json!(3))
    );
    assert_eq!(dump["kinds"]["ReservationCreated"], 2);
    assert!(dump["record_bytes"].as_u64().unwrap() > 0);
    let lines = run(&["log", "dump", "--data-dir", data_s, "--records"]);
    let lines: Vec<Value> = String::from_utf8_lossy(&lines.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(
        (lines[0]["seq"].clone(), lines[0]["kind"].clone()),
        (json!(1), json!("ProductCreated"))
    );

    let taken = run(&[
        "snapshot",
        "--data-dir",
        data_s,
        "--snapshot-dir",
        snap_s,
        "--json",
    ]);
    assert!(taken.status.success(), "{taken:?}");
    let taken = json_of(&taken);
    assert_eq!(
        (taken["sequence"].clone(), taken["created"].clone()),
        (json!(3), json!(true))
    );
    let file = snapshots.join(taken["file"].as_str().unwrap());
    let inspect = run(&["snapshot", "inspect", file.to_str().unwrap(), "--json"]);
    assert!(inspect.status.success());
    let inspect = json_of(&inspect);
    assert_eq!(inspect["valid"], true);
    assert_eq!(
        (
            inspect["sequence"].clone(),
            inspect["products"].clone(),
            inspect["reservations"].clone()
        ),
        (json!(3), json!(1), json!(2))
    );
    assert_eq!(inspect["units_reserved"], 2);
    let text = run(&["snapshot", "inspect", file.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("verified"));

    flip_middle_byte(&file);
    let bad = run(&["snapshot", "inspect", file.to_str().unwrap()]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("checksum"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_reservations_and_old_keys_are_forgotten_in_memory_and_in_the_log() {
    let t = TestServer::start().await;
    let c = t.client.clone();
    c.create_product("A", 10).await;
    let body =
        json!({"customer_id": "u1", "items": [{"sku": "A", "quantity": 1}], "ttl_seconds": 60});
    let keyed = c
        .post_with(
            "/v1/reservations",
            body.clone(),
            &[("idempotency-key", "k1")],
        )
        .await;
    assert_eq!(keyed.status, 201);
    let ended = keyed.body["id"].as_str().unwrap().to_string();
    let confirmed = c
        .post(&format!("/v1/reservations/{ended}/confirm"), json!({}))
        .await;
    assert_eq!(confirmed.status, 200);
    let long = c
        .post(
            "/v1/reservations",
            json!({"customer_id": "u2", "items": [{"sku": "A", "quantity": 2}], "ttl_seconds": 86_400}),
        )
        .await;
    let long = long.body["id"].as_str().unwrap().to_string();

    // 26 h later: the confirmed one ended more than 24 h ago; the long one expired 2 h ago.
    t.clock.advance_ms(26 * 3_600_000);
    let forgotten = eventually(Duration::from_secs(5), || async {
        c.get(&format!("/v1/reservations/{ended}")).await.status == 404
    })
    .await;
    assert!(
        forgotten,
        "an ended reservation is forgotten after retention"
    );
    let kept = c.get(&format!("/v1/reservations/{long}")).await;
    assert_eq!(kept.body["status"], "expired", "{:?}", kept.body);
    let a = c.product("A").await;
    assert_eq!(
        (a["sold"].clone(), a["reserved"].clone()),
        (json!(1), json!(0))
    );
    // The key is forgotten too: the same request is a new reservation, not a replay.
    let again = c
        .post_with("/v1/reservations", body, &[("idempotency-key", "k1")])
        .await;
    assert_eq!(again.status, 201);
    assert_eq!(again.header("idempotent-replayed"), None);

    // The fold forgets the same (a `Forgotten` record), from the log and from a snapshot.
    assert_eq!(c.post("/v1/admin/snapshot", json!({})).await.status, 201);
    let t = t.restart().await;
    let c = t.client.clone();
    assert_eq!(
        c.get(&format!("/v1/reservations/{ended}")).await.status,
        404
    );
    assert_eq!(c.get(&format!("/v1/reservations/{long}")).await.status, 200);
    t.stop().await;
}

/// A failed product's rebuild does not wait for a snapshot being built: the product serves
/// again while the snapshot is still on its way (here held up before its rename).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_does_not_wait_behind_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let clock = std::sync::Arc::new(ManualClock::new(START_MS));
    let t = TestServer::start_tweaked(dir, clock, Durability::Sync, |config: &mut Config| {
        config.snapshot_hooks.pause_before_rename = Some(Duration::from_secs(4));
    })
    .await;
    let c = t.client.clone();
    c.create_product("A", 5).await;
    assert_eq!(c.reserve("u", "A", 2).await.status, 201);
    let before = c.product("A").await;

    let snapshot = {
        let c = c.clone();
        tokio::spawn(async move { c.post("/v1/admin/snapshot", json!({})).await })
    };
    // The snapshot has started (its file is being written) before the product fails.
    let snapshots = t.dir.path().join("snapshots");
    let writing = eventually(Duration::from_secs(3), || {
        let snapshots = snapshots.clone();
        async move {
            std::fs::read_dir(&snapshots)
                .map(|entries| entries.count() > 0)
                .unwrap_or(false)
        }
    })
    .await;
    assert!(writing, "the snapshot's temporary file appears");

    t.service().inject_product_kill("A");
    let restarted = restarts_reach(t.service(), 1, Duration::from_secs(3)).await;
    assert!(restarted, "the product was rebuilt");
    assert_eq!(
        c.product("A").await,
        before,
        "from the last acknowledged state"
    );
    assert!(
        !snapshot.is_finished(),
        "the rebuild finished while the snapshot was still being written"
    );
    let taken = snapshot.await.unwrap();
    assert_eq!(taken.status, 201, "{:?}", taken.body);
    t.stop().await;
}

/// The binary builds snapshots in a worker process (its default): the server sends it the
/// log after the newest snapshot, and a restart from what it wrote has the same state. With
/// `--snapshot-worker off` the server builds them itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_built_in_a_worker_process() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = ChildServer::spawn(dir.path(), &[]);
    let c = s.client.clone();
    c.create_product("A", 10).await;
    c.create_product("B", 5).await;
    reserve_ok(&c, "u1", "A").await;
    let first = c.post("/v1/admin/snapshot", json!({})).await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    assert_eq!(first.body["worker"], true, "{:?}", first.body);
    assert_eq!(first.body["records_folded"], 3);
    reserve_ok(&c, "u2", "B").await;
    reserve_ok(&c, "u3", "A").await;
    let second = c.post("/v1/admin/snapshot", json!({})).await;
    assert_eq!(second.status, 201, "{:?}", second.body);
    assert_eq!(second.body["worker"], true);
    assert_eq!(
        (
            second.body["sequence"].clone(),
            second.body["records_folded"].clone()
        ),
        (json!(5), json!(2)),
        "the second is the first plus the two records after it"
    );
    let (a, b) = (c.product("A").await, c.product("B").await);
    s.kill9();
    // The log after the second snapshot is empty: the state is the worker's alone.
    let s = ChildServer::spawn(dir.path(), &["--snapshot-worker", "off"]);
    let c = s.client.clone();
    assert_eq!(figures(&c.product("A").await), figures(&a));
    assert_eq!(figures(&c.product("B").await), figures(&b));
    reserve_ok(&c, "u4", "A").await;
    let third = c.post("/v1/admin/snapshot", json!({})).await;
    assert_eq!(third.status, 201, "{:?}", third.body);
    assert_eq!(third.body["worker"], false);
}

/// A restart after a long outage finds more overdue reservations than the supervisor
/// expires in one message (`EXPIRIES_PER_MESSAGE_MAX`): start-up still expires every one
/// of them, exactly once, before it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_expires_more_overdue_reservations_than_one_message_takes() {
    let holds = stockd::limits::EXPIRIES_PER_MESSAGE_MAX * 2 + 100;
    let t = TestServer::start().await;
    assert_eq!(
        t.client.create_product("BULK", holds as u64).await.status,
        201
    );
    let mut made = 0;
    for chunk in (0..holds).collect::<Vec<_>>().chunks(32) {
        let answers = futures_util::future::join_all(chunk.iter().map(|i| {
            t.client.post(
                "/v1/reservations",
                json!({"customer_id": format!("c{i}"), "items": [{"sku": "BULK", "quantity": 1}], "ttl_seconds": 60}),
            )
        }))
        .await;
        made += answers.iter().filter(|a| a.status == 201).count();
    }
    assert_eq!(made, holds);
    let mut t = t;
    t.server.take().unwrap().shutdown().await.unwrap();
    // Down for longer than every hold's TTL.
    t.clock.advance_ms(120_000);
    let server = stockd::start(t.config.clone())
        .await
        .expect("server starts");
    t.client = common::Client::new(format!("http://{}", server.local_addr()));
    t.server = Some(server);
    let p = t.client.product("BULK").await;
    assert_eq!(
        (p["reserved"].as_u64(), p["available"].as_u64()),
        (Some(0), Some(holds as u64))
    );
    let stats = t.service().stats().await.unwrap();
    assert_eq!((stats.pending, stats.events.expired), (0, holds as u64));
    t.stop().await;
}
