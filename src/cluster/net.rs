//! The Raft transport's client side (docs/REPLICATION.md, "Transport between nodes"): the
//! engine's `RaftNetworkFactory` and `RaftNetworkV2` over reqwest, and the wire format
//! both sides share.
//!
//! Every request is `POST http://RAFT/raft/<rpc>` with the cluster key in the header
//! `Stockd-Cluster-Key`, its body the engine's request in bincode 2 (serde, standard
//! configuration), its 200 answer the engine's response the same way. Any other status
//! is an error whose body is problem+json.
//!
//! Two reqwest clients (two connection pools) per node: one for replication and
//! snapshots, one for heartbeats, so that a long append or snapshot never holds up a
//! heartbeat. Each call's timeout is the engine's `RPCOption::soft_ttl()`; a connection
//! that cannot be made is `Unreachable` (the engine backs off), anything else `Network`.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::AnyError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::settings::ClusterKey;
use super::state_machine::{Snapshot, SnapshotFile, SnapshotMeta};
use super::types::{RaftVote, StockdNode, Tc};
use super::NodeId;

/// The header carrying the cluster key.
pub const KEY_HEADER: &str = "stockd-cluster-key";

/// The largest snapshot sent or received, in bytes: a snapshot travels as one in-memory
/// body (docs/REPLICATION.md says what is left: a streamed body).
pub const SNAPSHOT_BYTES_MAX: usize = 1 << 30;

/// The largest body of any other Raft request, in bytes (`max_payload_entries` entries of
/// at most a record's size each fit many times over).
pub const RPC_BYTES_MAX: usize = 256 << 20;

/// The routes, by the engine's RPC.
pub const APPEND: &str = "append";
pub const VOTE: &str = "vote";
pub const PRE_VOTE: &str = "pre-vote";
pub const SNAPSHOT: &str = "snapshot";
pub const TRANSFER_LEADER: &str = "transfer-leader";

/// A full snapshot on the wire: the sender's vote, the snapshot's metadata and its file.
#[derive(Serialize, Deserialize)]
pub struct SnapshotRequest {
    pub vote: RaftVote,
    pub meta: SnapshotMeta,
    pub data: Bytes,
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
    replication: reqwest::Client,
    heartbeat: reqwest::Client,
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
    pub fn new(key: ClusterKey) -> ClusterNet {
        ClusterNet {
            key,
            replication: client(),
            heartbeat: client(),
        }
    }

    fn conn(&self, target: NodeId, node: &StockdNode, http: &reqwest::Client) -> PeerConn {
        PeerConn {
            target,
            base: format!("http://{}/raft/", node.raft),
            key: self.key.clone(),
            http: http.clone(),
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
    http: reqwest::Client,
}

/// Why a call failed, before it is made an engine error of the right kind.
enum CallError {
    /// No connection could be made.
    Unreachable(String),
    Network(String),
}

impl CallError {
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

impl PeerConn {
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        rpc: &str,
        body: &Req,
        timeout: Duration,
    ) -> Result<Resp, CallError> {
        let url = format!("{}{rpc}", self.base);
        let body = encode(body).map_err(|e| CallError::Network(format!("encoding: {e}")))?;
        let sent = self
            .http
            .post(&url)
            .header(KEY_HEADER, self.key.as_str())
            .header("content-type", "application/octet-stream")
            .timeout(timeout)
            .body(body)
            .send()
            .await;
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

    async fn full_snapshot(
        &mut self,
        vote: RaftVote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<Tc>, StreamingError<Tc>> {
        let path = snapshot.snapshot.path.clone();
        let data = tokio::fs::read(&path).await.map_err(|e| {
            StreamingError::Network(NetworkError::new(&AnyError::error(format!(
                "reading the snapshot {}: {e}",
                path.display()
            ))))
        })?;
        if data.len() > SNAPSHOT_BYTES_MAX {
            return Err(StreamingError::Network(NetworkError::new(
                &AnyError::error(format!(
                    "the snapshot {} is {} bytes, over the {SNAPSHOT_BYTES_MAX} one request \
                     may carry",
                    path.display(),
                    data.len()
                )),
            )));
        }
        let request = SnapshotRequest {
            vote,
            meta: snapshot.meta,
            data: Bytes::from(data),
        };
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            sent = self.call(SNAPSHOT, &request, option.hard_ttl()) => {
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
