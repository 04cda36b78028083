//! Helpers shared by the integration tests: an in-process server on `127.0.0.1:0`, the real
//! binary as a child process (killed on drop, even when a test fails), and a small client.

#![allow(dead_code)]

pub mod cluster;
pub mod feed;
pub mod procfs;

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use loadtest::server::{Launch, ServerProcess};
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use stockd::clock::ManualClock;
use stockd::{Config, Durability, Server};

/// A JSON answer: status, headers, body (`Value::Null` when empty).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }

    /// Asserts an RFC 9457 problem with this status and code.
    pub fn assert_problem(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "{:?}", self.body);
        assert_eq!(self.code(), code, "{:?}", self.body);
        assert_eq!(
            self.body["status"], status,
            "status member equals HTTP status"
        );
        assert_eq!(self.body["type"], format!("/problems/{code}"));
        assert!(self.body["title"].is_string() && self.body["detail"].is_string());
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json")
        );
    }
}

#[derive(Clone)]
pub struct Client {
    pub base: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: String) -> Client {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        Client { base, http }
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> reqwest::Result<Answer> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            if !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            {
                req = req.header("content-type", "application/json");
            }
            req = req.body(body.to_string());
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = req.send().await?;
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res.bytes().await?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, None, &[]).await.expect("GET")
    }

    pub async fn post(&self, path: &str, body: Value) -> Answer {
        self.send(Method::POST, path, Some(&body.to_string()), &[])
            .await
            .expect("POST")
    }

    pub async fn post_with(&self, path: &str, body: Value, headers: &[(&str, &str)]) -> Answer {
        self.send(Method::POST, path, Some(&body.to_string()), headers)
            .await
            .expect("POST")
    }

    pub async fn create_product(&self, sku: &str, on_hand: u64) -> Answer {
        let a = self
            .post(
                "/v1/products",
                serde_json::json!({"sku": sku, "name": format!("Product {sku}"), "on_hand": on_hand}),
            )
            .await;
        assert_eq!(a.status, 201, "{:?}", a.body);
        a
    }

    pub async fn reserve(&self, customer: &str, sku: &str, quantity: u64) -> Answer {
        self.post(
            "/v1/reservations",
            serde_json::json!({"customer_id": customer, "items": [{"sku": sku, "quantity": quantity}]}),
        )
        .await
    }

    /// One figure of `GET /metrics` (the series `name`, without labels).
    pub async fn metric(&self, name: &str) -> f64 {
        let a = self.get("/metrics").await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        let text = a.body.as_str().expect("metrics text");
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .parse()
            .unwrap()
    }

    pub async fn product(&self, sku: &str) -> Value {
        let a = self.get(&format!("/v1/products/{sku}")).await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        a.body
    }
}

/// An in-process server with its own data directory and a hand-moved clock.
pub struct TestServer {
    pub server: Option<Server>,
    pub client: Client,
    pub clock: Arc<ManualClock>,
    pub dir: tempfile::TempDir,
    /// The configuration it was started with (durability, tweaks, clock): `restart` starts
    /// it again with the same one.
    pub config: Config,
}

pub const START_MS: i64 = 1_795_341_600_000; // 2026-11-22T10:00:00Z

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(Durability::Sync).await
    }

    pub async fn start_with(durability: Durability) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(START_MS));
        TestServer::start_in(dir, clock, durability).await
    }

    pub async fn start_in(
        dir: tempfile::TempDir,
        clock: Arc<ManualClock>,
        durability: Durability,
    ) -> TestServer {
        TestServer::start_tweaked(dir, clock, durability, |_| {}).await
    }

    /// A server whose configuration `tweak` adjusts (kept by `restart`).
    pub async fn start_tweaked(
        dir: tempfile::TempDir,
        clock: Arc<ManualClock>,
        durability: Durability,
        tweak: fn(&mut Config),
    ) -> TestServer {
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().join("data"),
            snapshot_dir: dir.path().join("snapshots"),
            durability,
            clock: clock.clone(),
            ..Config::default()
        };
        tweak(&mut config);
        TestServer::start_configured(dir, clock, config).await
    }

    /// A server started with `config` (whose clock is `clock`, data in `dir`).
    async fn start_configured(
        dir: tempfile::TempDir,
        clock: Arc<ManualClock>,
        config: Config,
    ) -> TestServer {
        let server = stockd::start(config.clone()).await.expect("server starts");
        let client = Client::new(format!("http://{}", server.local_addr()));
        TestServer {
            server: Some(server),
            client,
            clock,
            dir,
            config,
        }
    }

    pub fn service(&self) -> &stockd::service::Service {
        self.server.as_ref().expect("running").service()
    }

    /// Graceful stop, then a fresh start on the same data directory and clock, with the
    /// configuration it was started with (so the same durability).
    pub async fn restart(mut self) -> TestServer {
        self.server
            .take()
            .unwrap()
            .shutdown()
            .await
            .expect("clean shutdown");
        TestServer::start_configured(self.dir, self.clock, self.config).await
    }

    pub async fn stop(self) {
        self.shutdown().await.expect("clean shutdown");
    }

    /// Graceful stop; answers what the shutdown reports (an error once the log failed).
    pub async fn shutdown(mut self) -> Result<(), stockd::storage::log::LogError> {
        match self.server.take() {
            Some(server) => server.shutdown().await,
            None => Ok(()),
        }
    }
}

/// Polls `check` until it returns true or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (5 s at most) until `sku` could hold `units` more. Holds of reservations still
/// being assembled are not shown in `available`, but a request for more units than any
/// product here has is refused with what could still be held.
pub async fn holdable_becomes(c: &Client, sku: &str, units: u64) -> bool {
    eventually(Duration::from_secs(5), || {
        let (c, sku) = (c.clone(), sku.to_string());
        async move {
            let probe = c.reserve("probe", &sku, 1_000_000).await;
            probe.status == 409 && probe.body["available"] == units
        }
    })
    .await
}

/// Waits (`limit` at most) until a snapshot file is being written in `dir` (its temporary
/// file exists): how tests catch a snapshot held before its rename.
pub async fn snapshot_being_written(dir: &Path, limit: Duration) -> bool {
    eventually(limit, || {
        let dir = dir.to_path_buf();
        async move {
            std::fs::read_dir(&dir).is_ok_and(|mut entries| {
                entries.any(|e| {
                    e.is_ok_and(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .starts_with(".tmp-snapshot-")
                    })
                })
            })
        }
    })
    .await
}

/// The flags `stockd serve --help` (and so bare `stockd --help`) must describe.
pub const SERVE_FLAGS: [&str; 5] = [
    "--listen",
    "--data-dir",
    "--snapshot-dir",
    "--default-ttl",
    "--durability",
];

/// Waits (up to `limit`) until the supervisor has restarted `times` product actors.
pub async fn restarts_reach(
    service: &stockd::service::Service,
    times: u64,
    limit: Duration,
) -> bool {
    eventually(limit, || {
        let service = service.clone();
        async move { service.stats().await.unwrap().product_restarts == times }
    })
    .await
}

/// The real `stockd` binary as a child process (`loadtest`'s harness), with a client;
/// killed (SIGKILL) when dropped. `pid`, `kill9` and `terminate` are the process's.
pub struct ChildServer {
    process: ServerProcess,
    pub client: Client,
    pub data_dir: PathBuf,
}

/// `stockd serve` on 127.0.0.1:0 with its log in `dir/data` and its snapshots in
/// `dir/snapshots`, plus `extra` flags.
pub fn serve(dir: &Path, extra: &[&str]) -> Launch {
    Launch::serve(env!("CARGO_BIN_EXE_stockd"), dir).args(extra)
}

/// `serve`'s command, not started.
pub fn serve_command(dir: &Path, extra: &[&str]) -> Command {
    serve(dir, extra).into_command()
}

impl ChildServer {
    pub fn spawn(dir: &Path, extra: &[&str]) -> ChildServer {
        ChildServer::spawn_with_env(dir, extra, &[])
    }

    /// `spawn`, with these environment variables set for the child.
    pub fn spawn_with_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> ChildServer {
        ChildServer::launch(
            serve(dir, extra).envs(env.iter().copied()),
            dir.join("data"),
        )
    }

    /// Starts `cmd` (a `stockd` that serves, set up however the test likes; its log is in
    /// `data_dir`) and waits for its `listening on ADDR` line.
    pub fn start(cmd: Command, data_dir: PathBuf) -> ChildServer {
        ChildServer::launch(Launch::command(cmd), data_dir)
    }

    /// `start`, with the child's stderr sent to `stderr` (a file, `/dev/full`).
    pub fn start_with_stderr(cmd: Command, data_dir: PathBuf, stderr: Stdio) -> ChildServer {
        ChildServer::launch(Launch::command(cmd).stderr_to(stderr), data_dir)
    }

    /// `start`, and once it listens the read ends of its stdout and stderr are closed (a
    /// supervisor that died).
    pub fn start_orphaned(cmd: Command, data_dir: PathBuf) -> ChildServer {
        ChildServer::launch(Launch::command(cmd).close_output_once_listening(), data_dir)
    }

    /// Starts `launch`, answering why it did not start instead of panicking (for a caller
    /// that tries again, on other ports say).
    pub fn try_start(launch: Launch, data_dir: PathBuf) -> Result<ChildServer, String> {
        let process = launch.start()?;
        Ok(ChildServer {
            client: Client::new(process.base_url.clone()),
            process,
            data_dir,
        })
    }

    fn launch(launch: Launch, data_dir: PathBuf) -> ChildServer {
        let process = launch.start().unwrap_or_else(|e| panic!("{e}"));
        ChildServer {
            client: Client::new(process.base_url.clone()),
            process,
            data_dir,
        }
    }
}

impl Deref for ChildServer {
    type Target = ServerProcess;

    fn deref(&self) -> &ServerProcess {
        &self.process
    }
}

impl DerefMut for ChildServer {
    fn deref_mut(&mut self) -> &mut ServerProcess {
        &mut self.process
    }
}
