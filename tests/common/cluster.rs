//! Real `stockd serve` processes on loopback, started with `--peers`: the harness the
//! cluster tests share. A cluster starts with three members (the founders, whose `--peers`
//! names the three); `Cluster::start_sized` picks addresses for more nodes, which join it
//! through the admin API, each started with the founders and the nodes before it, itself
//! included, in its `--peers`. Every process is a `ChildServer`, killed (SIGKILL) when
//! dropped, so also when a test fails. Every wait is bounded and generous (a loaded
//! two-core machine), and waits for a state, never for a time.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use loadtest::server::Launch;
use reqwest::Method;
use serde_json::{json, Value};

use super::{Answer, ChildServer, Client};

/// How long any one wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(60);

pub const KEY: &str = "the-cluster-key-of-this-test-0123";

/// `n` different free ports on loopback: all bound at once, then let go, so that no two
/// are the same (ports bound and let go one at a time may come back twice).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("a bound port").port())
        .collect()
}

/// One node's addresses.
#[derive(Clone)]
pub struct Addrs {
    pub api: String,
    pub raft: String,
}

/// A cluster of three nodes on loopback (and addresses for more), some of them running.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// Every node's addresses: the founders' and those of the nodes that may join.
    pub addrs: BTreeMap<u64, Addrs>,
    pub nodes: BTreeMap<u64, ChildServer>,
    /// The nodes the cluster was initialized with (1, 2 and 3): `peers()` names them.
    pub founders: Vec<u64>,
}

impl Cluster {
    /// Starts the nodes `running` of a three-node cluster (each with the same `--peers`),
    /// on fresh ports; a start that fails (a port taken meanwhile) is retried on others.
    pub fn start(running: &[u64]) -> Cluster {
        Cluster::start_with(running, &[])
    }

    /// `start`, every node with the environment variables `env` too (a restart passes
    /// them again: `launch_with`).
    pub fn start_with(running: &[u64], env: &[(&str, &str)]) -> Cluster {
        Cluster::start_sized(3, running, env)
    }

    /// `start_with` for all three founders, from an async test (the start blocks while the
    /// nodes come up, so it runs on a blocking thread).
    pub async fn three_with(env: &'static [(&'static str, &'static str)]) -> Cluster {
        tokio::task::spawn_blocking(move || Cluster::start_with(&[1, 2, 3], env))
            .await
            .expect("the cluster starts")
    }

    /// `start_with`, with addresses picked for nodes 1 to `size`: the founders 1 to 3, and
    /// nodes that may join later (`launch` them, then add them through the admin API).
    pub fn start_sized(size: u64, running: &[u64], env: &[(&str, &str)]) -> Cluster {
        assert!(size >= 3, "a cluster here has three founders");
        let mut last = String::new();
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::write(dir.path().join("cluster.key"), format!("{KEY}\n")).unwrap();
            let mut ports = free_ports(2 * size as usize).into_iter();
            let mut port = || ports.next().expect("a port per address");
            let addrs: BTreeMap<u64, Addrs> = (1..=size)
                .map(|id| {
                    let addrs = Addrs {
                        api: format!("127.0.0.1:{}", port()),
                        raft: format!("127.0.0.1:{}", port()),
                    };
                    (id, addrs)
                })
                .collect();
            let mut cluster = Cluster {
                dir,
                addrs,
                nodes: BTreeMap::new(),
                founders: vec![1, 2, 3],
            };
            match running
                .iter()
                .try_for_each(|id| cluster.launch_with(*id, env))
            {
                Ok(()) => return cluster,
                Err(err) => last = err,
            }
        }
        panic!("the cluster did not start in 5 tries: {last}");
    }

    /// The founders' `--peers`.
    pub fn peers(&self) -> String {
        self.peers_of(&self.founders)
    }

    /// A `--peers` naming `ids`.
    pub fn peers_of(&self, ids: &[u64]) -> String {
        let peers: Vec<String> = ids
            .iter()
            .map(|id| {
                let a = &self.addrs[id];
                format!("{id}={}@{}", a.api, a.raft)
            })
            .collect();
        peers.join(",")
    }

    /// Node `id`'s `--peers`: the founders' for a founder; for a node that joins, the
    /// founders, the nodes numbered before it, and itself (the members it joins, as an
    /// operator would list them).
    pub fn peers_for(&self, id: u64) -> String {
        if self.founders.contains(&id) {
            return self.peers();
        }
        let ids: Vec<u64> = self.addrs.keys().copied().filter(|n| *n <= id).collect();
        self.peers_of(&ids)
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node-{id}"))
    }

    /// Node `id`'s command: a node that joins is started with `--join`, as an operator
    /// would start one (it never initializes a cluster of its own).
    pub fn command(&self, id: u64) -> Command {
        let mut cmd = self.command_with(id, &self.peers_for(id));
        if !self.founders.contains(&id) {
            cmd.arg("--join");
        }
        cmd
    }

    /// Node `id`'s command, with `peers` for `--peers`.
    pub fn command_with(&self, id: u64, peers: &str) -> Command {
        let data = self.data_dir(id);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stockd"));
        cmd.arg("serve")
            .args(["--listen", &self.addrs[&id].api])
            .arg("--data-dir")
            .arg(data.join("data"))
            .arg("--snapshot-dir")
            .arg(data.join("snapshots"))
            .args(["--node-id", &id.to_string()])
            .args(["--peers", peers])
            .arg("--cluster-key-file")
            .arg(self.dir.path().join("cluster.key"))
            .env("RUST_LOG", "warn");
        cmd
    }

    pub fn launch(&mut self, id: u64) -> Result<(), String> {
        self.launch_with(id, &[])
    }

    /// `launch`, with the environment variables `env` too.
    pub fn launch_with(&mut self, id: u64, env: &[(&str, &str)]) -> Result<(), String> {
        self.launch_as(id, env, false)
    }

    /// `launch_with`, the node's stderr kept for `ChildServer::find_in_stderr`.
    pub fn launch_capturing(&mut self, id: u64, env: &[(&str, &str)]) -> Result<(), String> {
        self.launch_as(id, env, true)
    }

    fn launch_as(&mut self, id: u64, env: &[(&str, &str)], capture: bool) -> Result<(), String> {
        let mut command = self.command(id);
        command.envs(env.iter().copied());
        let mut launch = Launch::command(command).timeout(WAIT);
        if capture {
            launch = launch.capture_stderr();
        }
        let server = ChildServer::try_start(launch, self.data_dir(id).join("data"))
            .map_err(|e| format!("node {id}: {e}"))?;
        self.nodes.insert(id, server);
        Ok(())
    }

    pub fn client(&self, id: u64) -> &Client {
        &self.nodes[&id].client
    }

    /// `GET /v1/cluster` of every running node, once each answers it and all of them
    /// name the same leader, a running one, in the same term. Returns the statuses.
    pub async fn agreed(&self) -> BTreeMap<u64, Value> {
        let deadline = Instant::now() + WAIT;
        let running: Vec<u64> = self.nodes.keys().copied().collect();
        loop {
            let mut statuses = BTreeMap::new();
            for (id, node) in &self.nodes {
                let answer = node
                    .client
                    .send(reqwest::Method::GET, "/v1/cluster", None, &[])
                    .await;
                if let Ok(a) = answer {
                    if a.status == 200 {
                        statuses.insert(*id, a.body);
                    }
                }
            }
            if statuses.len() == running.len() {
                let first = statuses.values().next().expect("a running node");
                let (leader, term) = (&first["leader"], &first["term"]);
                let agreed = leader.as_u64().is_some_and(|l| running.contains(&l))
                    && statuses
                        .values()
                        .all(|s| &s["leader"] == leader && &s["term"] == term);
                if agreed {
                    return statuses;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the nodes agree on a leader within {WAIT:?}: {statuses:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Cluster {
    /// `agreed`, once every running node has also flushed and applied everything in the
    /// leader's log (the membership and the leader's first entry at least). A follower may
    /// apply a committed entry before its own flush of it ends (the engine allows it),
    /// which a new node's first flush, creating its log's first segment, makes likely.
    pub async fn caught_up(&self) -> BTreeMap<u64, Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let statuses = self.agreed().await;
            let last = statuses[&leader_of(&statuses)]["last_seq"]
                .as_u64()
                .unwrap();
            let done = |s: &Value| s["applied_seq"] == last && s["durable_seq"] == last;
            if last >= 2 && statuses.values().all(done) {
                return statuses;
            }
            assert!(
                Instant::now() < deadline,
                "every node applies the leader's log within {WAIT:?}: {statuses:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub fn leader_of(statuses: &BTreeMap<u64, Value>) -> u64 {
    statuses.values().next().unwrap()["leader"]
        .as_u64()
        .unwrap()
}

/// Asserts that `value` fits the schema `name` of the OpenAPI document
/// (`src/http/openapi.json`), naming every mismatch.
pub fn fits(name: &str, value: &Value) {
    let mut root: Value = serde_json::from_str(stockd::http::router::OPENAPI).unwrap();
    root["$ref"] = json!(format!("#/components/schemas/{name}"));
    root["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&root)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let errors: Vec<String> = validator
        .iter_errors(value)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{name}: {value}: {errors:#?}");
}

/// A client that shows redirects instead of following them.
pub fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

impl Cluster {
    /// The leader, once the running nodes agree on it and it serves (its
    /// `/health?role=leader` is 200).
    pub async fn serving(&self) -> u64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let leader = leader_of(&self.agreed().await);
            if self.client(leader).get("/health?role=leader").await.status == 200 {
                return leader;
            }
            assert!(Instant::now() < deadline, "a leader serves within {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Once every running node has applied the same position of the log (nothing is
    /// being written), each node's `GET /v1/admin/cluster/digest`, which must all be
    /// at that position. Returns the position and each node's digest.
    pub async fn digests(&self) -> (u64, BTreeMap<u64, String>) {
        let deadline = Instant::now() + WAIT;
        loop {
            let statuses = self.caught_up().await;
            let applied = statuses.values().next().unwrap()["applied_seq"].clone();
            let mut digests = BTreeMap::new();
            for (id, node) in &self.nodes {
                let a = node.client.get("/v1/admin/cluster/digest").await;
                if a.status == 200 && a.body["applied_seq"] == applied {
                    fits("ClusterDigest", &a.body);
                    digests.insert(*id, a.body["digest"].as_str().unwrap().to_string());
                }
            }
            if digests.len() == self.nodes.len() {
                return (applied.as_u64().unwrap(), digests);
            }
            assert!(
                Instant::now() < deadline,
                "every node's digest at one position within {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A checkout's client of the whole cluster: every node's address, tried in turn.
#[derive(Clone)]
pub struct Checkout {
    pub nodes: Vec<Client>,
    /// How long one try waits for its answer (a paused node never answers).
    pub patience: Duration,
    /// Tries repeated after a 503 or an error (whose outcome may have been a change).
    pub retried: Arc<AtomicUsize>,
}

impl Checkout {
    pub fn of(cluster: &Cluster) -> Checkout {
        Checkout {
            nodes: cluster.nodes.values().map(|n| n.client.clone()).collect(),
            patience: WAIT,
            retried: Arc::default(),
        }
    }

    /// Sends until an answer that is not a 503 (a leader being elected, or one whose
    /// epoch ended) nor a connection error (a node killed): on another node each time.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        key: Option<&str>,
    ) -> Answer {
        self.send_counted(method, path, body, key).await.0
    }

    /// `send`; also answers whether a try was repeated.
    pub async fn send_counted(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        key: Option<&str>,
    ) -> (Answer, bool) {
        let deadline = Instant::now() + WAIT;
        let body = body.map(Value::to_string);
        let headers: Vec<(&str, &str)> = key.map(|k| ("idempotency-key", k)).into_iter().collect();
        let mut last;
        for turn in 0.. {
            let node = &self.nodes[turn % self.nodes.len()];
            let sent = node.send(method.clone(), path, body.as_deref(), &headers);
            match tokio::time::timeout(self.patience, sent).await {
                Ok(Ok(answer)) if answer.status != 503 => return (answer, turn > 0),
                Ok(Ok(answer)) => last = format!("{answer:?}"),
                Ok(Err(err)) => last = err.to_string(),
                Err(_) => last = format!("no answer within {:?}", self.patience),
            }
            assert!(
                Instant::now() < deadline,
                "{method} {path}: no answer but 503s and errors within {WAIT:?}; last: {last}"
            );
            self.retried.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        unreachable!()
    }

    /// Creates product `sku`. A create repeated after a 503 whose change was committed
    /// meets its own product (409 `sku_exists`): the product must then be as asked.
    pub async fn create(&self, sku: &str, on_hand: u64) {
        let body = json!({"sku": sku, "name": sku, "on_hand": on_hand});
        let (a, retried) = self
            .send_counted(Method::POST, "/v1/products", Some(&body), None)
            .await;
        if retried && a.status == 409 && a.code() == "sku_exists" {
            assert_eq!(self.product(sku).await["on_hand"], on_hand, "{a:?}");
            return;
        }
        assert_eq!(a.status, 201, "{a:?}");
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, None, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Answer {
        self.send(Method::POST, path, Some(&body), None).await
    }

    pub async fn reserve(&self, customer: &str, items: Value, key: &str) -> Answer {
        let body = json!({"customer_id": customer, "items": items, "ttl_seconds": 600});
        self.send(Method::POST, "/v1/reservations", Some(&body), Some(key))
            .await
    }

    pub async fn product(&self, sku: &str) -> Value {
        let a = self.get(&format!("/v1/products/{sku}")).await;
        assert_eq!(a.status, 200, "{a:?}");
        a.body
    }
}
