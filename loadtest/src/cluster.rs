//! A three-node stockd cluster on loopback, started by the load test (`failover`,
//! `cluster`): three `stockd serve` processes with the same `--peers`, on free ports, each
//! with a fresh data directory in one temporary directory, and a cluster key generated for
//! the run and passed through a key file (`--cluster-key-file`, readable by its owner
//! only), so that it shows in no process list. Every node is a `ServerProcess`, killed
//! (SIGKILL) when dropped: when the run ends, fails or panics. Every wait is bounded and
//! waits for a state.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::server::{Launch, ServerProcess};

/// How long a node may take to listen, and the cluster to agree on a serving leader.
pub const CLUSTER_WAIT: Duration = Duration::from_secs(60);

/// The nodes' log filter: warnings, but not the engine's for each failed call to a peer
/// (every 50 ms while the killed node is down), as stockd's default filter does; its
/// network client says once that the peer does not answer. `LOADTEST_NODE_LOG` in the
/// load test's environment replaces it (e.g. `warn,stockd::leadership=info` to see when
/// each epoch began, and how long its beginning took).
const LOG_FILTER: &str = "warn,openraft::core::heartbeat=error,openraft::replication=error,\
    openraft::replication::stream_state=warn,openraft::replication::replication_handle=warn,\
    openraft::replication::snapshot_transmitter=warn,\
    openraft::engine::handler::replication_handler=error";

/// The nodes' ids: node 1, the lowest, initializes the cluster, so it starts first.
pub const NODE_IDS: [u64; 3] = [1, 2, 3];

/// `n` different free loopback ports: all bound at once, then let go, so that no two are
/// the same (ports bound and let go one at a time may come back twice).
fn free_ports(n: usize) -> Result<Vec<u16>, String> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("no free loopback port: {e}"))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("no free loopback port: {e}"))
}

/// One node's loopback addresses (`HOST:PORT`).
#[derive(Debug, Clone)]
pub struct NodeAddrs {
    pub api: String,
    pub raft: String,
}

/// Three stockd nodes on loopback, some of them running.
pub struct LocalCluster {
    stockd: PathBuf,
    pub addrs: BTreeMap<u64, NodeAddrs>,
    /// The running nodes (a killed one is kept, stopped, to be restarted).
    pub nodes: BTreeMap<u64, ServerProcess>,
    /// Removed after the nodes (fields drop in order).
    dir: tempfile::TempDir,
}

impl LocalCluster {
    /// Starts the three nodes, node 1 first; a start that fails (a port taken meanwhile)
    /// is retried whole on other ports, up to 5 times. Blocking: each start waits for
    /// `listening on`.
    pub fn start(stockd: &std::path::Path) -> Result<LocalCluster, String> {
        let mut last = String::new();
        for _ in 0..5 {
            let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
            let key: String = (0..40).map(|_| fastrand::alphanumeric()).collect();
            let key_file = dir.path().join("cluster.key");
            write_private(&key_file, &format!("{key}\n"))?;
            let mut addrs = BTreeMap::new();
            let mut ports = free_ports(2 * NODE_IDS.len())?.into_iter();
            for id in NODE_IDS {
                let mut port = || ports.next().ok_or("no free loopback port");
                let api = format!("127.0.0.1:{}", port()?);
                let raft = format!("127.0.0.1:{}", port()?);
                addrs.insert(id, NodeAddrs { api, raft });
            }
            let mut cluster = LocalCluster {
                stockd: stockd.to_path_buf(),
                addrs,
                nodes: BTreeMap::new(),
                dir,
            };
            match NODE_IDS.iter().try_for_each(|&id| cluster.launch(id)) {
                Ok(()) => return Ok(cluster),
                Err(err) => last = err,
            }
        }
        Err(format!("the cluster did not start in 5 tries: {last}"))
    }

    fn peers(&self) -> String {
        let peers: Vec<String> = self
            .addrs
            .iter()
            .map(|(id, a)| format!("{id}={}@{}", a.api, a.raft))
            .collect();
        peers.join(",")
    }

    fn command(&self, id: u64) -> Command {
        let data = self.dir.path().join(format!("node-{id}"));
        let mut cmd = Command::new(&self.stockd);
        cmd.arg("serve")
            .args(["--listen", &self.addrs[&id].api])
            .arg("--data-dir")
            .arg(data.join("data"))
            .arg("--snapshot-dir")
            .arg(data.join("snapshots"))
            .args(["--node-id", &id.to_string()])
            .args(["--peers", &self.peers()])
            .arg("--cluster-key-file")
            .arg(self.dir.path().join("cluster.key"))
            .env_remove("STOCKD_CLUSTER_KEY")
            .env(
                "RUST_LOG",
                std::env::var("LOADTEST_NODE_LOG").unwrap_or_else(|_| LOG_FILTER.into()),
            );
        cmd
    }

    fn launch(&mut self, id: u64) -> Result<(), String> {
        let server = Launch::command(self.command(id))
            .timeout(CLUSTER_WAIT)
            .start()
            .map_err(|e| format!("node {id}: {e}"))?;
        self.nodes.insert(id, server);
        Ok(())
    }

    /// `http://API` of node `id`.
    pub fn base(&self, id: u64) -> String {
        format!("http://{}", self.addrs[&id].api)
    }

    /// Every node's base URL, in id order.
    pub fn bases(&self) -> Vec<(u64, String)> {
        NODE_IDS.iter().map(|&id| (id, self.base(id))).collect()
    }

    /// The node that serves as leader (`GET /health?role=leader` is 200 only on it),
    /// among the running nodes but `except`, once there is one.
    pub async fn serving_leader(
        &self,
        client: &reqwest::Client,
        except: Option<u64>,
    ) -> Result<u64, String> {
        let deadline = Instant::now() + CLUSTER_WAIT;
        loop {
            for id in self.nodes.keys().filter(|id| Some(**id) != except) {
                let url = format!("{}/health?role=leader", self.base(*id));
                let answer = client
                    .get(&url)
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await;
                if answer.is_ok_and(|res| res.status().as_u16() == 200) {
                    return Ok(*id);
                }
            }
            if Instant::now() > deadline {
                return Err(format!("no leader served within {CLUSTER_WAIT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILL of node `id` (kept, to be restarted).
    pub fn kill9(&mut self, id: u64) {
        if let Some(node) = self.nodes.get_mut(&id) {
            node.kill9();
        }
    }

    /// Starts node `id` again on its data directory and ports. Blocking.
    pub fn restart(&mut self, id: u64) -> Result<Duration, String> {
        let node = self.nodes.get_mut(&id).ok_or("no such node")?;
        node.restart().map_err(|e| format!("node {id}: {e}"))
    }

    /// Once every node has applied the leader's whole log (nothing being written), each
    /// node's `GET /v1/admin/cluster/digest` at that position: the position and the
    /// digests, or why not within `CLUSTER_WAIT`.
    pub async fn digests(
        &self,
        client: &reqwest::Client,
    ) -> Result<(u64, BTreeMap<u64, String>), String> {
        let deadline = Instant::now() + CLUSTER_WAIT;
        let mut last = String::new();
        loop {
            match self.digests_once(client).await {
                Ok(Some(found)) => return Ok(found),
                Ok(None) => {}
                Err(err) => last = err,
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the nodes' digests at one position within {CLUSTER_WAIT:?}: {last}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn digests_once(
        &self,
        client: &reqwest::Client,
    ) -> Result<Option<(u64, BTreeMap<u64, String>)>, String> {
        let get = |url: String| async move {
            let res = client
                .get(&url)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .map_err(|e| format!("GET {url}: {e}"))?;
            if !res.status().is_success() {
                return Err(format!("GET {url}: {}", res.status()));
            }
            res.json::<Value>()
                .await
                .map_err(|e| format!("GET {url}: {e}"))
        };
        let mut statuses = BTreeMap::new();
        for id in self.nodes.keys() {
            statuses.insert(*id, get(format!("{}/v1/cluster", self.base(*id))).await?);
        }
        let leader = statuses.values().next().and_then(|s| s["leader"].as_u64());
        let Some(last) = leader.and_then(|l| statuses.get(&l)?["last_seq"].as_u64()) else {
            return Err(format!("no leader agreed: {statuses:?}"));
        };
        let caught_up = statuses.values().all(|s| {
            s["leader"].as_u64() == leader
                && s["applied_seq"].as_u64() == Some(last)
                && s["durable_seq"].as_u64() == Some(last)
        });
        if !caught_up {
            return Err(format!("not every node at the leader's {last}"));
        }
        let mut digests = BTreeMap::new();
        for id in self.nodes.keys() {
            let d = get(format!("{}/v1/admin/cluster/digest", self.base(*id))).await?;
            if d["applied_seq"].as_u64() != Some(last) {
                return Ok(None);
            }
            let digest = d["digest"].as_str().ok_or("a digest without `digest`")?;
            digests.insert(*id, digest.to_string());
        }
        Ok(Some((last, digests)))
    }
}

/// Writes `text` to a new file readable and writable by its owner only.
fn write_private(path: &std::path::Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(text.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}
