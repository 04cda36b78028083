//! The Raft transport's client side (docs/REPLICATION.md, "Transport between nodes"): the
//! engine's `RaftNetworkFactory` and `RaftNetworkV2` over reqwest, and the wire format
//! both sides share.
//!
//! Every request is `POST http://RAFT/raft/<rpc>` with the cluster key in the header
//! `Stockd-Cluster-Key` and the cluster id in `Stockd-Cluster-Id`, its body the engine's
//! request in bincode 2 (serde, standard configuration), its 200 answer the engine's
//! response the same way. Any other status is an error whose body is problem+json. A node
//! without a cluster id yet sends nothing (it has not been reached by a leader).
//!
//! A snapshot is streamed: its body is `[n u32 BE][n bytes: bincode of SnapshotHeader
//! (vote, metadata, file length)]` then the file, read from disk as it is sent, never
//! held in memory whole (at most `SNAPSHOT_BYTES_MAX`).
//!
//! Two reqwest clients (two connection pools) per node: one for replication and
//! snapshots, one for heartbeats, so that a long append or snapshot never holds up a
//! heartbeat. Each call's timeout is the engine's `RPCOption::soft_ttl()`; a connection
//! that cannot be made is `Unreachable` (the engine backs off), anything else `Network`.
//!
//! A peer that stops answering is reported once (a warning), and once when it answers
//! again, with a reminder while it stays down (`Reachability`): the engine's own warning
//! for each failed heartbeat (every 50 ms) is filtered out by the log filter
//! (`logging`).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::AnyError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::cluster_id::{ClusterId, ID_HEADER};
use super::settings::ClusterKey;
use super::state_machine::{Snapshot, SnapshotFile, SnapshotMeta};
use super::types::{RaftVote, StockdNode, Tc};
use super::NodeId;

/// The header carrying the cluster key.
pub const KEY_HEADER: &str = "stockd-cluster-key";

/// The largest snapshot file sent or received, in bytes. It is streamed from disk to
/// disk, so this bounds the receiver's disk use, not anyone's memory.
pub const SNAPSHOT_BYTES_MAX: u64 = 16 << 30;

/// The largest snapshot header (vote, metadata with its membership), in bytes.
pub const SNAPSHOT_HEADER_BYTES_MAX: usize = 1 << 20;

/// A snapshot send fails once its body has not moved for this long (the receiver, or
/// the network, stopped taking it).
pub const SNAPSHOT_STALL: Duration = Duration::from_secs(30);

/// How long the sender waits for the answer once the whole body is sent: the receiver
/// verifies the file and installs it (both read it whole) before it answers.
pub const SNAPSHOT_ANSWER_WAIT: Duration = Duration::from_secs(600);

/// The largest body of any other Raft request, in bytes (`max_payload_entries` entries of
/// at most a record's size each fit many times over).
pub const RPC_BYTES_MAX: usize = 256 << 20;

/// The routes, by the engine's RPC.
pub const APPEND: &str = "append";
pub const VOTE: &str = "vote";
pub const PRE_VOTE: &str = "pre-vote";
pub const SNAPSHOT: &str = "snapshot";
pub const TRANSFER_LEADER: &str = "transfer-leader";

/// What comes before a snapshot's file on the wire: the sender's vote, the snapshot's
/// metadata and the file's length in bytes.
#[derive(Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub vote: RaftVote,
    pub meta: SnapshotMeta,
    pub len: u64,
}

/// The start of a snapshot's body: the header's length (u32, big-endian), then the
/// header; the file follows.
pub fn snapshot_prefix(header: &SnapshotHeader) -> Result<Vec<u8>, String> {
    let encoded = encode(header)?;
    if encoded.len() > SNAPSHOT_HEADER_BYTES_MAX {
        return Err(format!(
            "a snapshot header of {} bytes, over {SNAPSHOT_HEADER_BYTES_MAX}",
            encoded.len()
        ));
    }
    let mut prefix = Vec::with_capacity(4 + encoded.len());
    prefix.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
    prefix.extend_from_slice(&encoded);
    Ok(prefix)
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(|e| e.to_string())
}

/// Decodes a whole body: bytes left over are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let (value, read) = bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map_err(|e| e.to_string())?;
    if read != bytes.len() {
        return Err(format!("{} bytes after the message", bytes.len() - read));
    }
    Ok(value)
}

/// Makes the clients of every peer: one pool for replication, one for heartbeats.
pub struct ClusterNet {
    key: ClusterKey,
    ids: Arc<ClusterId>,
    replication: reqwest::Client,
    heartbeat: reqwest::Client,
    /// Each peer's reachability, shared by its replication and heartbeat clients.
    reach: Mutex<BTreeMap<NodeId, Arc<Mutex<Reachability>>>>,
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(1))
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_else(|err| {
            tracing::warn!(error = %err, "cannot build the Raft client; using the defaults");
            reqwest::Client::new()
        })
}

impl ClusterNet {
    /// The clients of a node whose requests carry `key` and the cluster id in `ids`.
    pub fn new(key: ClusterKey, ids: Arc<ClusterId>) -> ClusterNet {
        ClusterNet {
            key,
            ids,
            replication: client(),
            heartbeat: client(),
            reach: Mutex::new(BTreeMap::new()),
        }
    }

    fn conn(&self, target: NodeId, node: &StockdNode, http: &reqwest::Client) -> PeerConn {
        let reach = self
            .reach
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(target)
            .or_default()
            .clone();
        PeerConn {
            target,
            base: format!("http://{}/raft/", node.raft),
            key: self.key.clone(),
            ids: self.ids.clone(),
            http: http.clone(),
            reach,
        }
    }
}

impl RaftNetworkFactory<Tc> for ClusterNet {
    type Network = PeerConn;

    async fn new_client(&mut self, target: NodeId, node: &StockdNode) -> PeerConn {
        self.conn(target, node, &self.replication)
    }

    async fn new_heartbeat_client(&mut self, target: NodeId, node: &StockdNode) -> PeerConn {
        self.conn(target, node, &self.heartbeat)
    }
}

/// The client of one peer.
pub struct PeerConn {
    target: NodeId,
    base: String,
    key: ClusterKey,
    ids: Arc<ClusterId>,
    http: reqwest::Client,
    reach: Arc<Mutex<Reachability>>,
}

/// Why a call failed, before it is made an engine error of the right kind.
enum CallError {
    /// No connection could be made.
    Unreachable(String),
    Network(String),
}

impl CallError {
    fn why(&self) -> &str {
        match self {
            CallError::Unreachable(why) | CallError::Network(why) => why,
        }
    }

    fn into_rpc(self) -> RPCError<Tc> {
        match self {
            CallError::Unreachable(why) => {
                RPCError::Unreachable(Unreachable::new(&AnyError::error(why)))
            }
            CallError::Network(why) => RPCError::Network(NetworkError::new(&AnyError::error(why))),
        }
    }

    fn into_streaming(self) -> StreamingError<Tc> {
        match self {
            CallError::Unreachable(why) => {
                StreamingError::Unreachable(Unreachable::new(&AnyError::error(why)))
            }
            CallError::Network(why) => {
                StreamingError::Network(NetworkError::new(&AnyError::error(why)))
            }
        }
    }
}

/// A peer's reachability as this node's calls to it find it, for reporting a peer that
/// went down once (and once when it is back), not at every failed call. A peer that flaps
/// is reported down at most once every `REPORT_GAP`; while it stays down, a reminder
/// every `REMIND_EVERY`.
#[derive(Debug, Default)]
pub struct Reachability {
    /// When the current run of failures began (`None`: the last call succeeded).
    down_since: Option<Instant>,
    /// Failed calls in the current run.
    failures: u64,
    /// When it was last reported down (or still down).
    last_report: Option<Instant>,
    /// Whether the current run of failures was reported (its end is reported only then).
    reported: bool,
}

/// What to tell the log about a peer, if anything.
#[derive(Debug, PartialEq, Eq)]
pub enum Report {
    Down,
    StillDown { down_for: Duration, failures: u64 },
    Back { down_for: Duration, failures: u64 },
}

impl Reachability {
    /// The least time between two reports of a peer going down.
    pub const REPORT_GAP: Duration = Duration::from_secs(10);
    /// How often a peer that stays down is reported again.
    pub const REMIND_EVERY: Duration = Duration::from_secs(60);

    pub fn failed(&mut self, now: Instant) -> Option<Report> {
        let since_report = |last: Option<Instant>| last.map(|at| now.saturating_duration_since(at));
        self.failures += 1;
        match self.down_since {
            None => {
                self.down_since = Some(now);
                self.failures = 1;
                self.reported =
                    since_report(self.last_report).is_none_or(|d| d >= Self::REPORT_GAP);
                if self.reported {
                    self.last_report = Some(now);
                    return Some(Report::Down);
                }
                None
            }
            Some(since) => {
                let due = since_report(self.last_report).is_none_or(|d| d >= Self::REMIND_EVERY);
                if !due {
                    return None;
                }
                self.last_report = Some(now);
                let first = !self.reported;
                self.reported = true;
                Some(if first {
                    Report::Down
                } else {
                    Report::StillDown {
                        down_for: now.saturating_duration_since(since),
                        failures: self.failures,
                    }
                })
            }
        }
    }

    pub fn succeeded(&mut self, now: Instant) -> Option<Report> {
        let since = self.down_since.take()?;
        let reported = std::mem::take(&mut self.reported);
        reported.then(|| Report::Back {
            down_for: now.saturating_duration_since(since),
            failures: self.failures,
        })
    }
}

impl PeerConn {
    /// Notes how a call to this peer went, and says so in the log when that changes.
    fn note<T>(&self, result: &Result<T, CallError>) {
        let now = Instant::now();
        let report = {
            let mut reach = self.reach.lock().unwrap_or_else(|e| e.into_inner());
            match result {
                Ok(_) => reach.succeeded(now),
                Err(_) => reach.failed(now),
            }
        };
        let target = self.target;
        match (report, result) {
            (None, _) => {}
            (Some(Report::Back { down_for, failures }), _) => tracing::info!(
                node = target,
                down_ms = down_for.as_millis() as u64,
                failures,
                "a peer answers again"
            ),
            (Some(Report::Down), Err(err)) => tracing::warn!(
                node = target,
                error = err.why(),
                "a peer does not answer (reported again every {} s while it lasts)",
                Reachability::REMIND_EVERY.as_secs()
            ),
            (Some(Report::StillDown { down_for, failures }), Err(err)) => tracing::warn!(
                node = target,
                down_ms = down_for.as_millis() as u64,
                failures,
                error = err.why(),
                "a peer still does not answer"
            ),
            (Some(_), Ok(_)) => {}
        }
    }

    /// The request to `rpc` with the key and the cluster id, or why none can be sent.
    fn request(&self, rpc: &str) -> Result<(String, reqwest::RequestBuilder), CallError> {
        let url = format!("{}{rpc}", self.base);
        let Some(id) = self.ids.get() else {
            return Err(CallError::Network(format!(
                "node {} ({url}): this node belongs to no cluster yet (no leader has reached it)",
                self.target
            )));
        };
        let builder = self
            .http
            .post(&url)
            .header(KEY_HEADER, self.key.as_str())
            .header(ID_HEADER, id.to_string())
            .header("content-type", "application/octet-stream");
        Ok((url, builder))
    }

    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        rpc: &str,
        body: &Req,
        timeout: Duration,
    ) -> Result<Resp, CallError> {
        let result = async {
            let (url, request) = self.request(rpc)?;
            let body = encode(body).map_err(|e| CallError::Network(format!("encoding: {e}")))?;
            let sent = request.timeout(timeout).body(body).send().await;
            self.answer(&url, sent).await
        }
        .await;
        self.note(&result);
        result
    }

    /// The engine's response in a peer's answer to `url`.
    async fn answer<Resp: DeserializeOwned>(
        &self,
        url: &str,
        sent: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<Resp, CallError> {
        let target = self.target;
        let res = sent.map_err(|err| {
            let why = format!("node {target} ({url}): {err}");
            if err.is_connect() {
                CallError::Unreachable(why)
            } else {
                CallError::Network(why)
            }
        })?;
        let status = res.status();
        let bytes = res
            .bytes()
            .await
            .map_err(|e| CallError::Network(format!("node {target} ({url}): reading: {e}")))?;
        if status != reqwest::StatusCode::OK {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned();
            return Err(CallError::Network(format!(
                "node {target} ({url}) answered {status}: {text}"
            )));
        }
        decode(&bytes)
            .map_err(|e| CallError::Network(format!("node {target} ({url}): decoding: {e}")))
    }

    /// Sends a snapshot: the header, then the file streamed from disk. Fails once the
    /// body has not moved for `SNAPSHOT_STALL`, or the answer has not come
    /// `SNAPSHOT_ANSWER_WAIT` after the whole body went.
    async fn send_snapshot(
        &self,
        vote: RaftVote,
        snapshot: Snapshot,
    ) -> Result<SnapshotResponse<Tc>, CallError> {
        let path = snapshot.snapshot.path.clone();
        let reading = |e: std::io::Error| {
            CallError::Network(format!("reading the snapshot {}: {e}", path.display()))
        };
        let file = tokio::fs::File::open(&path).await.map_err(reading)?;
        let len = file.metadata().await.map_err(reading)?.len();
        if len > SNAPSHOT_BYTES_MAX {
            return Err(CallError::Network(format!(
                "the snapshot {} is {len} bytes, over the {SNAPSHOT_BYTES_MAX} a node receives",
                path.display()
            )));
        }
        let header = SnapshotHeader {
            vote,
            meta: snapshot.meta,
            len,
        };
        let prefix = snapshot_prefix(&header).map_err(CallError::Network)?;
        let total = prefix.len() as u64 + len;
        // When the body last moved, and whether it is all sent: what the watch below
        // reads.
        let progress = Arc::new(Mutex::new((Instant::now(), false)));
        let body = {
            let moving = progress.clone();
            let moved = move || {
                let mut p = moving.lock().unwrap_or_else(|e| e.into_inner());
                p.0 = Instant::now();
            };
            let done = {
                let progress = progress.clone();
                move || {
                    let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
                    *p = (Instant::now(), true);
                }
            };
            let file = tokio_util::io::ReaderStream::with_capacity(file, 256 << 10);
            let mut sent = 0u64;
            futures_util::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(prefix)) })
                .chain(file)
                .map(move |chunk| {
                    if let Ok(chunk) = &chunk {
                        sent += chunk.len() as u64;
                        moved();
                        if sent >= total {
                            done();
                        }
                    }
                    chunk
                })
        };
        let (url, request) = self.request(SNAPSHOT)?;
        let send = request
            .header("content-length", total)
            .body(reqwest::Body::wrap_stream(body))
            .send();
        let mut send = std::pin::pin!(send);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let sent = loop {
            tokio::select! {
                sent = &mut send => break sent,
                _ = tick.tick() => {
                    let (moved, done) = *progress.lock().unwrap_or_else(|e| e.into_inner());
                    let (limit, what) = match done {
                        false => (SNAPSHOT_STALL, "its body has not moved"),
                        true => (SNAPSHOT_ANSWER_WAIT, "no answer came after its body"),
                    };
                    if moved.elapsed() >= limit {
                        return Err(CallError::Network(format!(
                            "node {} ({url}): snapshot sending stopped: {what} for {} s",
                            self.target,
                            limit.as_secs()
                        )));
                    }
                }
            }
        };
        self.answer(&url, sent).await
    }
}

impl RaftNetworkV2<Tc> for PeerConn {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<Tc>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<Tc>, RPCError<Tc>> {
        self.call(APPEND, &rpc, option.soft_ttl())
            .await
            .map_err(CallError::into_rpc)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<Tc>,
        option: RPCOption,
    ) -> Result<VoteResponse<Tc>, RPCError<Tc>> {
        self.call(VOTE, &rpc, option.soft_ttl())
            .await
            .map_err(CallError::into_rpc)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<Tc>,
        option: RPCOption,
    ) -> Result<VoteResponse<Tc>, RPCError<Tc>> {
        self.call(PRE_VOTE, &rpc, option.soft_ttl())
            .await
            .map_err(CallError::into_rpc)
    }

    /// The snapshot streamed from its file; `cancel` (the engine closing this
    /// replication) drops the request mid-body, which closes its connection. No overall
    /// deadline: a large snapshot takes as long as it takes while it moves (see
    /// `send_snapshot`); the engine's `install_snapshot_timeout` (`option`) is meant for
    /// one chunk, not a whole file.
    async fn full_snapshot(
        &mut self,
        vote: RaftVote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<Tc>, StreamingError<Tc>> {
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            sent = self.send_snapshot(vote, snapshot) => {
                self.note(&sent);
                sent.map_err(CallError::into_streaming)
            }
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<Tc>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<Tc>, RPCError<Tc>> {
        self.call(TRANSFER_LEADER, &req, option.soft_ttl())
            .await
            .map_err(CallError::into_rpc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that goes down is reported once, reminded of every `REMIND_EVERY` while it
    /// stays down, and reported back once; one that flaps is reported down at most once
    /// every `REPORT_GAP`, and its return only when its going down was.
    #[test]
    fn a_down_peer_is_reported_once_and_again_when_back() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut r = Reachability::default();
        assert_eq!(r.succeeded(at(0)), None);
        assert_eq!(r.failed(at(0)), Some(Report::Down));
        // A heartbeat every 50 ms for 59 s: nothing more.
        for ms in (50..59_000).step_by(50) {
            assert_eq!(r.failed(at(ms)), None, "at {ms} ms");
        }
        assert!(matches!(
            r.failed(at(60_000)),
            Some(Report::StillDown { failures, .. }) if failures == 1 + 1179 + 1
        ));
        assert_eq!(r.failed(at(60_050)), None);
        assert!(matches!(
            r.succeeded(at(61_000)),
            Some(Report::Back { down_for, .. }) if down_for == Duration::from_secs(61)
        ));
        assert_eq!(r.succeeded(at(61_050)), None);
        // It flaps: down again 1 s after it came back, within the gap since the last
        // report; so nothing, neither down nor back.
        assert_eq!(r.failed(at(61_100)), None);
        assert_eq!(r.succeeded(at(61_200)), None);
        // Down again past the gap: reported.
        assert_eq!(r.failed(at(75_000)), Some(Report::Down));
        assert!(r.succeeded(at(75_100)).is_some());
        // A run of failures first not reported (within the gap) is reported once it
        // lasts: as down, not as still down.
        assert_eq!(r.failed(at(76_000)), None);
        assert_eq!(r.failed(at(80_000)), None);
        assert_eq!(r.failed(at(135_000)), Some(Report::Down));
        assert!(r.succeeded(at(136_000)).is_some());
    }
}
