//! Tests of the real `stockd` binary: spawned on 127.0.0.1:0, loaded concurrently, killed
//! with SIGKILL, restarted on the same data directory. Every child is killed on drop, so a
//! failing test leaves no server behind. Load is bounded in count and time.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{eventually, serve_command, snapshot_being_written, ChildServer, Client, SERVE_FLAGS};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_buyers_get_exactly_the_stock() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::spawn(dir.path(), &[]);
    let c = server.client.clone();
    c.create_product("HOT", 50).await;
    let buyers = 300;
    let mut tasks = Vec::new();
    for i in 0..buyers {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.reserve(&format!("buyer-{i}"), "HOT", 1)
                .await
                .status
                .as_u16()
        }));
    }
    let mut won = 0;
    for task in tasks {
        match task.await.unwrap() {
            201 => won += 1,
            409 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(won, 50, "exactly the stock is sold");
    let p = c.product("HOT").await;
    assert_eq!(
        (p["reserved"].as_u64(), p["available"].as_u64()),
        (Some(50), Some(0))
    );
}

/// What a client was told, per reservation.
#[derive(Clone, Debug)]
struct Acked {
    sku: String,
    quantity: u64,
    /// The last status a 2xx answer showed.
    status: &'static str,
    /// A transition was sent but its answer never came (it may or may not have happened).
    unsure: bool,
}

async fn buyer(c: Client, seed: u64, stop_at: Instant, acked: Arc<Mutex<HashMap<String, Acked>>>) {
    let mut rng = fastrand::Rng::with_seed(seed);
    while Instant::now() < stop_at {
        let sku = ["A", "B", "C"][rng.usize(..3)];
        let quantity = rng.u64(1..=2);
        let body = json!({"customer_id": format!("c{seed}"), "items": [{"sku": sku, "quantity": quantity}], "ttl_seconds": 3600});
        let Ok(a) = c
            .send(
                reqwest::Method::POST,
                "/v1/reservations",
                Some(&body.to_string()),
                &[],
            )
            .await
        else {
            return; // the server is gone
        };
        if a.status != 201 {
            continue;
        }
        let id = a.body["id"].as_str().unwrap().to_string();
        acked.lock().unwrap().insert(
            id.clone(),
            Acked {
                sku: sku.to_string(),
                quantity,
                status: "pending",
                unsure: false,
            },
        );
        let (action, status) = match rng.u8(..3) {
            0 => ("confirm", "confirmed"),
            1 => ("cancel", "cancelled"),
            _ => continue,
        };
        acked.lock().unwrap().get_mut(&id).unwrap().unsure = true;
        let path = format!("/v1/reservations/{id}/{action}");
        match c.send(reqwest::Method::POST, &path, Some("{}"), &[]).await {
            Ok(a) if a.status == 200 => {
                let mut acked = acked.lock().unwrap();
                let entry = acked.get_mut(&id).unwrap();
                entry.status = status;
                entry.unsure = false;
            }
            Ok(a) => panic!("{action} answered {}: {:?}", a.status, a.body),
            Err(_) => return,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::spawn(dir.path(), &[]);
    let c = server.client.clone();
    let initial = 400u64;
    for sku in ["A", "B", "C"] {
        c.create_product(sku, initial).await;
    }
    let acked = Arc::new(Mutex::new(HashMap::new()));
    let stop_at = Instant::now() + Duration::from_secs(5);
    let mut workers = Vec::new();
    for seed in 0..32u64 {
        workers.push(tokio::spawn(buyer(
            c.clone(),
            seed * 7919 + 1,
            stop_at,
            acked.clone(),
        )));
    }
    // Kill in the middle of the load.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    server.kill9();
    for w in workers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 20,
        "the load made progress before the kill ({})",
        acked.len()
    );

    let restart = Instant::now();
    let server = ChildServer::spawn(dir.path(), &[]);
    let restart_ms = restart.elapsed().as_millis();
    eprintln!(
        "restart to serving after kill -9: {restart_ms} ms ({} acknowledged reservations)",
        acked.len()
    );
    let c = server.client.clone();
    let mut sold_at_least: HashMap<&str, u64> = HashMap::new();
    let mut held_at_least: HashMap<&str, u64> = HashMap::new();
    for (id, a) in &acked {
        let r = c.get(&format!("/v1/reservations/{id}")).await;
        assert_eq!(r.status, 200, "acknowledged reservation {id} survived");
        let status = r.body["status"].as_str().unwrap();
        if a.unsure {
            assert!(
                status == "pending" || status == "confirmed" || status == "cancelled",
                "{status}"
            );
        } else {
            assert_eq!(status, a.status, "reservation {id}");
        }
        let sku = a.sku.as_str();
        match status {
            "confirmed" => *sold_at_least.entry(sku).or_default() += a.quantity,
            "pending" => *held_at_least.entry(sku).or_default() += a.quantity,
            _ => {}
        }
    }
    for sku in ["A", "B", "C"] {
        let p = c.product(sku).await;
        let (on_hand, reserved, sold) = (
            p["on_hand"].as_u64().unwrap(),
            p["reserved"].as_u64().unwrap(),
            p["sold"].as_u64().unwrap(),
        );
        assert!(reserved <= on_hand, "never oversold: {p}");
        assert_eq!(on_hand + sold, initial, "units are conserved: {p}");
        assert!(sold >= sold_at_least.get(sku).copied().unwrap_or(0), "{p}");
        assert!(
            reserved >= held_at_least.get(sku).copied().unwrap_or(0),
            "{p}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_second_ttl_expires_while_running_and_while_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::spawn(dir.path(), &[]);
    let c = server.client.clone();
    c.create_product("A", 2).await;
    let body =
        json!({"customer_id": "u", "items": [{"sku": "A", "quantity": 1}], "ttl_seconds": 1});
    let running = c.post("/v1/reservations", body.clone()).await;
    assert_eq!(running.status, 201);
    let client = c.clone();
    let released = eventually(Duration::from_secs(5), || {
        let c = client.clone();
        async move { c.product("A").await["available"] == 2 }
    })
    .await;
    assert!(released, "expired within its deadline plus a second");
    let id = running.body["id"].as_str().unwrap();
    assert_eq!(
        c.get(&format!("/v1/reservations/{id}")).await.body["status"],
        "expired"
    );

    // Now one that expires while the server is down.
    let down = c.post("/v1/reservations", body).await;
    let id = down.body["id"].as_str().unwrap().to_string();
    server.kill9();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let server = ChildServer::spawn(dir.path(), &[]);
    let c = server.client.clone();
    let p = c.product("A").await;
    assert_eq!(
        (p["available"].as_u64(), p["reserved"].as_u64()),
        (Some(2), Some(0))
    );
    assert_eq!(
        c.get(&format!("/v1/reservations/{id}")).await.body["status"],
        "expired"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_replays_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::spawn(dir.path(), &[]);
    let c = server.client.clone();
    c.create_product("A", 5).await;
    let body = json!({"customer_id": "u", "items": [{"sku": "A", "quantity": 2}]});
    let first = c
        .post_with(
            "/v1/reservations",
            body.clone(),
            &[("idempotency-key", "k-1")],
        )
        .await;
    assert_eq!(first.status, 201);
    server.kill9();
    let server = ChildServer::spawn(dir.path(), &[]);
    let c = server.client.clone();
    let again = c
        .post_with("/v1/reservations", body, &[("idempotency-key", "k-1")])
        .await;
    assert_eq!(again.status, 201);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, first.body);
    assert_eq!(c.product("A").await["reserved"], 2, "held once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_flushes_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::spawn(dir.path(), &["--durability", "async"]);
    let c = server.client.clone();
    c.create_product("A", 5).await;
    assert_eq!(c.reserve("u", "A", 3).await.status, 201);
    let status = server.terminate().expect("exited");
    assert!(status.success(), "graceful exit: {status:?}");
    let server = ChildServer::spawn(dir.path(), &[]);
    assert_eq!(
        server.client.product("A").await["reserved"],
        3,
        "flushed at shutdown"
    );
}

/// A SIGTERM that arrives while the server is still starting is caught, not left to the
/// signal's default (an abrupt exit): the server finishes starting (without announcing an
/// address), then shuts down gracefully and exits 0. Start-up creates the data directory
/// after the handlers are installed and well before it serves, so the signal is sent as
/// soon as that appears. (With the handlers installed after the announcement, as before,
/// this failed in three runs of three.)
#[test]
fn sigterm_during_start_up_is_a_graceful_shutdown() {
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut child = Killed(
        serve_command(dir.path(), &[])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn stockd"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !data.exists() {
        assert!(Instant::now() < deadline, "start-up never began");
        std::thread::sleep(Duration::from_millis(1));
    }
    let pid = child.0.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit 30 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        status.success(),
        "a graceful exit, not the signal's: {status:?}"
    );
}

/// A second SIGTERM while the graceful shutdown runs ends the process at once (status 1):
/// here the shutdown's final snapshot is held before its rename for a minute. Everything
/// acknowledged is still there after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_during_shutdown_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let snapshots = dir.path().join("snapshots");
    let logged = dir.path().join("stderr.txt");
    let mut server = ChildServer::start_with_stderr(
        serve_command(dir.path(), &["--test-snapshot-pause-ms", "60000"]),
        dir.path().join("data"),
        std::process::Stdio::from(std::fs::File::create(&logged).unwrap()),
    );
    let c = server.client.clone();
    c.create_product("A", 5).await;
    assert_eq!(c.reserve("u", "A", 2).await.status, 201);
    let pid = server.pid().expect("running").to_string();
    let term = || {
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
    };
    assert!(term().success());
    // The shutdown has reached its final snapshot, which now waits before its rename.
    assert!(
        snapshot_being_written(&snapshots, Duration::from_secs(20)).await,
        "the final snapshot is being written"
    );
    // `terminate` sends the second SIGTERM and waits 20 s at most (then SIGKILL).
    let status = server.terminate().expect("exited");
    assert_eq!(
        status.code(),
        Some(1),
        "ended by the second signal: {status:?}"
    );
    // Said once (it was also logged, the same words twice).
    let said = std::fs::read_to_string(&logged).unwrap();
    assert_eq!(
        said.matches("a second signal during shutdown: exiting now")
            .count(),
        1,
        "{said}"
    );
    assert!(said.contains("stockd: a second signal during shutdown: exiting now\n"));
    let server = ChildServer::spawn(dir.path(), &[]);
    assert_eq!(server.client.product("A").await["reserved"], 2);
}

/// `async` answers before the flush; the writer flushes within a few milliseconds (it
/// starts a flush at most every ASYNC_FLUSH_INTERVAL_MS, so batches grow). Well past that
/// window, a `kill -9` loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_changes_reach_the_disk_within_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::spawn(dir.path(), &["--durability", "async"]);
    let c = server.client.clone();
    c.create_product("A", 50).await;
    for i in 0..20 {
        assert_eq!(c.reserve(&format!("u{i}"), "A", 1).await.status, 201);
    }
    tokio::time::sleep(Duration::from_millis(
        100 * stockd::limits::ASYNC_FLUSH_INTERVAL_MS,
    ))
    .await;
    server.kill9();
    let server = ChildServer::spawn(dir.path(), &[]);
    assert_eq!(server.client.product("A").await["reserved"], 20);
}

#[test]
fn help_describes_every_flag() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stockd"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in SERVE_FLAGS.into_iter().chain(["STOCKD_LISTEN"]) {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_stockd"))
        .args(["--default-ttl", "0"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

/// The server turns transparent huge pages off for itself (see `stockd::memory`), and
/// refuses a setting it does not know rather than guessing.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn transparent_huge_pages_are_off_unless_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::spawn(dir.path(), &[]);
    let pid = server.pid().expect("running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(
        thp_line(&status),
        "THP_enabled:\t0",
        "the server's /proc status:\n{status}"
    );
    assert_eq!(server.client.get("/health").await.status, 200);

    // `on` keeps whatever this process has (the kernel's setting).
    let own = thp_line(&std::fs::read_to_string("/proc/self/status").unwrap());
    let kept = ChildServer::spawn_with_env(
        &dir.path().join("kept"),
        &[],
        &[("STOCKD_TRANSPARENT_HUGE_PAGES", "on")],
    );
    let pid = kept.pid().expect("running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(thp_line(&status), own);

    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_stockd"));
    cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("other"))
        .env("STOCKD_TRANSPARENT_HUGE_PAGES", "maybe");
    // Bounded: were the check to regress, this would serve instead of exiting.
    let bad = loadtest::server::run_to_exit(cmd, Duration::from_secs(20)).unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let stderr = &bad.stderr;
    assert!(
        stderr.contains("STOCKD_TRANSPARENT_HUGE_PAGES must be on or off"),
        "{stderr}"
    );
    assert!(!dir.path().join("other").exists(), "nothing was created");
}

/// A snapshot worker whose server is already gone stops before it reads anything.
#[cfg(target_os = "linux")]
#[test]
fn a_snapshot_worker_without_its_server_stops_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stockd"))
        .arg("snapshot-worker")
        .arg(format!("--snapshot-dir={}", dir.path().display()))
        .args(["--upto=1", "--truncated-through=0", "--now=0"])
        // Not its parent: this test process is.
        .arg(format!("--parent-pid={}", u32::MAX))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the server that started it is gone"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[cfg(target_os = "linux")]
fn thp_line(status: &str) -> String {
    status
        .lines()
        .find(|l| l.starts_with("THP_enabled:"))
        .unwrap_or_default()
        .to_string()
}

/// The start-up log says what happened: a first start on an empty directory did not recover
/// from a snapshot; a restart after a clean shutdown did, and replayed no record; the
/// durability is spelled as on the command line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_logs_say_what_recovery_did() {
    let dir = tempfile::tempdir().unwrap();
    let start = |name: &str| {
        let logged = dir.path().join(name);
        let mut cmd = serve_command(dir.path(), &[]);
        cmd.env("RUST_LOG", "info");
        let server = ChildServer::start_with_stderr(
            cmd,
            dir.path().join("data"),
            std::process::Stdio::from(std::fs::File::create(&logged).unwrap()),
        );
        (server, logged)
    };
    async fn logged_once(file: &std::path::Path, text: &str) -> String {
        let read = || std::fs::read_to_string(file).unwrap_or_default();
        eventually(Duration::from_secs(5), || async { read().contains(text) }).await;
        let logged = read();
        assert_eq!(logged.matches(text).count(), 1, "{text:?} in:\n{logged}");
        logged
    }

    let (mut server, logged) = start("first.txt");
    let first = logged_once(&logged, "no snapshot and an empty log: starting empty").await;
    let first = first + &logged_once(&logged, "durability=sync").await;
    assert!(!first.contains("from the snapshot"), "{first}");
    assert!(!first.contains("Sync"), "{first}");
    server.client.create_product("A", 5).await;
    assert!(server.terminate().is_some_and(|s| s.success()));

    let (_server, logged) = start("second.txt");
    logged_once(
        &logged,
        "recovered the state from the snapshot (no log records after it)",
    )
    .await;
}
