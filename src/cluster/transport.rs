//! The Raft transport's server side: the routes of the Raft listener (`--raft-listen`),
//! away from the public API's port, its admission limit, its rate limit and its API keys
//! (docs/REPLICATION.md, "Transport between nodes"; the wire format is `net`'s).
//!
//! Every request must carry the cluster key (header `Stockd-Cluster-Key`, compared in
//! constant time); without it, or with another, the answer is 401 and nothing is read
//! or done. It must name the cluster (header `Stockd-Cluster-Id`): another cluster's
//! request is 409 and nothing is read or done; a node without an id yet takes the id of
//! the first leader that reaches it (an append or a snapshot). Errors are problem+json,
//! as the public API's.
//!
//! A snapshot's body is streamed to a file of its own in the incoming directory (never
//! held in memory), verified, then handed to the engine; the file is removed whatever
//! happens, and files left by a process that stopped mid-receive are removed when the
//! routes are made.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use uuid::Uuid;
use warp::http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use warp::Filter;

use super::cluster_id::{AdoptError, ClusterId, ID_HEADER};
use super::net::{
    self, SnapshotHeader, KEY_HEADER, RPC_BYTES_MAX, SNAPSHOT_BYTES_MAX, SNAPSHOT_HEADER_BYTES_MAX,
};
use super::node::Raft;
use super::settings::ClusterKey;
use super::state_machine::{Snapshot, SnapshotFile};
use super::types::{RaftVote, Tc};
use crate::storage::snapshot;
use openraft::raft::{AppendEntriesRequest, VoteRequest};

type Reply = warp::reply::Response;

/// What the Raft routes need.
struct Transport {
    raft: Raft,
    /// This node's id: a request in its own name comes from no peer.
    id: super::NodeId,
    key: ClusterKey,
    /// This node's cluster id (or none yet), which every request must name.
    ids: Arc<ClusterId>,
    /// Where a received snapshot is written before the engine installs it.
    incoming: PathBuf,
    received: AtomicU64,
}

/// An RFC 9457 problem, shaped as the public API's (`code` and `type` alike).
fn problem(status: u16, code: &str, title: &str, detail: impl Into<String>) -> Reply {
    let body = serde_json::json!({
        "type": format!("/problems/{code}"),
        "title": title,
        "status": status,
        "detail": detail.into(),
        "code": code,
    });
    let mut reply = Response::new(body.to_string().into());
    *reply.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    reply.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/problem+json"),
    );
    reply
}

fn ok<T: Serialize>(value: &T) -> Reply {
    match net::encode(value) {
        Ok(bytes) => {
            let mut reply = Response::new(bytes.into());
            reply.headers_mut().insert(
                "content-type",
                HeaderValue::from_static("application/octet-stream"),
            );
            reply
        }
        Err(err) => problem(
            500,
            "internal_error",
            "Internal server error",
            format!("encoding the answer: {err}"),
        ),
    }
}

/// The engine refused to act (it stopped, or is shutting down).
fn engine_error(err: impl std::fmt::Display) -> Reply {
    problem(
        503,
        "unavailable",
        "Service unavailable",
        format!("the Raft engine cannot answer: {err}"),
    )
}

fn bad_body(err: String) -> Reply {
    problem(
        400,
        "bad_request",
        "Malformed request",
        format!("the body is not this route's message: {err}"),
    )
}

/// The Raft listener's filter: `POST /raft/{append,vote,pre-vote,snapshot,transfer-leader}`.
pub fn routes(
    raft: Raft,
    key: ClusterKey,
    ids: Arc<ClusterId>,
    incoming: PathBuf,
) -> impl Filter<Extract = (Reply,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    let id = {
        use openraft::async_runtime::WatchReceiver;
        raft.metrics().borrow_watched().id
    };
    remove_left_over(&incoming);
    let transport = Arc::new(Transport {
        raft,
        id,
        key,
        ids,
        incoming,
        received: AtomicU64::new(0),
    });
    warp::method()
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .then(
            move |method: Method, path: warp::path::FullPath, headers: HeaderMap, body| {
                let transport = Arc::clone(&transport);
                async move {
                    // A task of its own: a peer hanging up cannot cut an install short.
                    let path = path.as_str().to_string();
                    let handled = tokio::spawn(async move {
                        handle(&transport, method, &path, &headers, body).await
                    });
                    handled.await.unwrap_or_else(|err| {
                        tracing::error!(error = %err, "a Raft request handler failed");
                        problem(
                            500,
                            "internal_error",
                            "Internal server error",
                            "the request failed inside the server",
                        )
                    })
                }
            },
        )
}

async fn handle<S, B>(
    t: &Transport,
    method: Method,
    path: &str,
    headers: &HeaderMap,
    body: S,
) -> Reply
where
    S: futures_util::Stream<Item = Result<B, warp::Error>> + Send,
    B: bytes::Buf,
{
    let rpc = match path.strip_prefix("/raft/") {
        Some(
            rpc @ (net::APPEND | net::VOTE | net::PRE_VOTE | net::SNAPSHOT | net::TRANSFER_LEADER),
        ) => rpc,
        _ => {
            return problem(
                404,
                "not_found",
                "Not found",
                format!("no route for {path}"),
            )
        }
    };
    if method != Method::POST {
        let mut reply = problem(
            405,
            "method_not_allowed",
            "Method not allowed",
            format!("{method} is not allowed on {path}; allowed: POST"),
        );
        reply
            .headers_mut()
            .insert("allow", HeaderValue::from_static("POST"));
        return reply;
    }
    let given = headers.get(KEY_HEADER).map(HeaderValue::as_bytes);
    if !given.is_some_and(|given| t.key.matches(given)) {
        tracing::warn!(path, "a Raft request without the cluster key was refused");
        return problem(
            401,
            "unauthorized",
            "Unauthorized",
            "a Raft request needs this cluster's key in the Stockd-Cluster-Key header",
        );
    }
    if let Err(reply) = check_cluster(t, rpc, headers).await {
        return reply;
    }
    if rpc == net::SNAPSHOT {
        return receive_snapshot(t, body).await;
    }
    let body = match read_body(body, RPC_BYTES_MAX).await {
        Ok(body) => body,
        Err(reply) => return reply,
    };
    let raft = &t.raft;
    match rpc {
        net::APPEND => match net::decode::<AppendEntriesRequest<Tc>>(&body) {
            Ok(req) if from_myself(t, &req.vote) => own_name(),
            Ok(req) => raft
                .append_entries(req)
                .await
                .map_or_else(engine_error, |r| ok(&r)),
            Err(err) => bad_body(err),
        },
        net::VOTE => match net::decode::<VoteRequest<Tc>>(&body) {
            Ok(req) if from_myself(t, &req.vote) => own_name(),
            Ok(req) => raft.vote(req).await.map_or_else(engine_error, |r| ok(&r)),
            Err(err) => bad_body(err),
        },
        net::PRE_VOTE => match net::decode::<VoteRequest<Tc>>(&body) {
            Ok(req) if from_myself(t, &req.vote) => own_name(),
            Ok(req) => raft
                .pre_vote(req)
                .await
                .map_or_else(engine_error, |r| ok(&r)),
            Err(err) => bad_body(err),
        },
        _ => match net::decode(&body) {
            Ok(req) => raft
                .handle_transfer_leader(req)
                .await
                .map_or_else(engine_error, |r| ok(&r)),
            Err(err) => bad_body(err),
        },
    }
}

/// Checks the cluster a request names (before its body is read): this node's, or, on a
/// node without one yet, an append's or a snapshot's (a leader's), which it takes. A
/// vote is answered without taking the id: the candidate may never lead.
async fn check_cluster(t: &Transport, rpc: &str, headers: &HeaderMap) -> Result<(), Reply> {
    let named = headers
        .get(ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Uuid::parse_str(v.trim()).ok());
    let Some(named) = named else {
        return Err(problem(
            400,
            "bad_request",
            "Malformed request",
            "a Raft request must name its cluster's id (a UUID) in the Stockd-Cluster-Id header",
        ));
    };
    let ours = t.ids.get();
    let adopts = ours.is_none() && matches!(rpc, net::APPEND | net::SNAPSHOT);
    let checked = match ours {
        Some(ours) if ours == named => return Ok(()),
        Some(ours) => Err(AdoptError::Other { ours }),
        None if !adopts => return Ok(()),
        None => {
            let ids = t.ids.clone();
            tokio::task::spawn_blocking(move || ids.adopt(named))
                .await
                .unwrap_or_else(|e| {
                    Err(AdoptError::Io {
                        path: String::new(),
                        source: std::io::Error::other(e.to_string()),
                    })
                })
        }
    };
    match checked {
        Ok(_) => {
            tracing::info!(cluster = %named, "this node joined the cluster of the first leader that reached it");
            Ok(())
        }
        Err(AdoptError::Other { ours }) => {
            tracing::warn!(ours = %ours, theirs = %named, rpc, "a Raft request from another cluster was refused");
            Err(problem(
                409,
                "wrong_cluster",
                "Another cluster",
                format!(
                    "this node belongs to cluster {ours}, and the request comes from cluster \
                     {named}: a node of another cluster (check --peers, and which data \
                     directory each node runs on); nothing was done"
                ),
            ))
        }
        Err(err @ AdoptError::Io { .. }) => Err(engine_error(err)),
    }
}

/// Whether a message carries a vote in this node's own name: no peer sends one (a node
/// never sends itself a message), and the engine asserts against receiving it (a leader
/// told of its own leadership stops), so it is refused before the engine sees it.
fn from_myself(t: &Transport, vote: &RaftVote) -> bool {
    vote.leader_id.voted_for == t.id
}

fn own_name() -> Reply {
    problem(
        400,
        "bad_request",
        "Malformed request",
        "the message is in this node's own name: no peer sends one",
    )
}

/// A received snapshot's file, removed when dropped: whatever ends its handling (an
/// install, a refusal, a body cut short), nothing is left behind.
struct Incoming(PathBuf);

impl Drop for Incoming {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.0) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(path = %self.0.display(), error = %e, "cannot remove a received snapshot")
            }
            _ => {}
        }
    }
}

/// The prefix of received snapshot files (`received-<pid>-<n>.snapshot`).
const RECEIVED_PREFIX: &str = "received-";

/// Removes received snapshot files a process left (it stopped while receiving).
fn remove_left_over(incoming: &Path) {
    let Ok(entries) = std::fs::read_dir(incoming) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(RECEIVED_PREFIX)
        {
            if let Err(e) = std::fs::remove_file(entry.path()) {
                tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove a received snapshot left over");
            }
        }
    }
}

/// A request body read piece by piece.
struct BodyReader<S> {
    stream: std::pin::Pin<Box<S>>,
    /// What was read past the last `read_exact`.
    left: BytesMut,
}

impl<S, B> BodyReader<S>
where
    S: Stream<Item = Result<B, warp::Error>> + Send,
    B: Buf,
{
    /// The next piece of the body (`None`: its end).
    async fn next(&mut self) -> Option<Result<Bytes, String>> {
        if !self.left.is_empty() {
            return Some(Ok(self.left.split().freeze()));
        }
        let mut chunk = match self.stream.next().await? {
            Ok(chunk) => chunk,
            Err(e) => return Some(Err(e.to_string())),
        };
        Some(Ok(chunk.copy_to_bytes(chunk.remaining())))
    }

    /// Exactly `n` bytes (an error if the body ends first).
    async fn read_exact(&mut self, n: usize) -> Result<Bytes, String> {
        while self.left.len() < n {
            match self.stream.next().await {
                Some(Ok(mut chunk)) => {
                    while chunk.has_remaining() {
                        let part = chunk.chunk();
                        self.left.extend_from_slice(part);
                        let len = part.len();
                        chunk.advance(len);
                    }
                }
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err(format!("the body ended within its first {n} bytes")),
            }
        }
        Ok(self.left.split_to(n).freeze())
    }
}

/// Receives a snapshot: its header first (the sender's vote, the metadata, the file's
/// length), then the file streamed to a file of its own, verified (a damaged one is 400
/// and nothing is done), installed by the engine (the state machine loads it with the
/// verified loader, checks it against its metadata and keeps its own copy); the file is
/// removed after, and also when the body ends early or runs long.
async fn receive_snapshot<S, B>(t: &Transport, body: S) -> Reply
where
    S: Stream<Item = Result<B, warp::Error>> + Send,
    B: Buf,
{
    let mut body = BodyReader {
        stream: Box::pin(body),
        left: BytesMut::new(),
    };
    let header = async {
        let len = body.read_exact(4).await?;
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if len > SNAPSHOT_HEADER_BYTES_MAX {
            return Err(format!(
                "a snapshot header of {len} bytes, over {SNAPSHOT_HEADER_BYTES_MAX}"
            ));
        }
        net::decode::<SnapshotHeader>(&body.read_exact(len).await?)
    };
    let header = match header.await {
        Ok(header) => header,
        Err(err) => return bad_body(err),
    };
    if from_myself(t, &header.vote) {
        return own_name();
    }
    if header.len > SNAPSHOT_BYTES_MAX {
        return problem(
            413,
            "payload_too_large",
            "Request body too large",
            format!(
                "a snapshot of {} bytes: at most {SNAPSHOT_BYTES_MAX} are received",
                header.len
            ),
        );
    }
    let n = t.received.fetch_add(1, Ordering::Relaxed);
    let file = Incoming(t.incoming.join(format!(
        "{RECEIVED_PREFIX}{}-{n}.snapshot",
        std::process::id()
    )));
    match write_body(&mut body, &file.0, header.len).await {
        Ok(()) => {}
        Err(Received::Io(err)) => {
            return engine_error(format!(
                "cannot keep the received snapshot in {}: {err}",
                file.0.display()
            ))
        }
        Err(Received::Bad(err)) => return bad_body(err),
    }
    // A damaged file never reaches the engine, which would stop on a snapshot its state
    // machine cannot install: its header and checksum are verified first.
    let verified = {
        let path = file.0.clone();
        tokio::task::spawn_blocking(move || snapshot::verify(&path).map_err(|e| e.to_string()))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
    };
    if let Err(err) = verified {
        return bad_body(format!("the snapshot does not verify: {err}"));
    }
    let snapshot = Snapshot {
        meta: header.meta,
        snapshot: SnapshotFile {
            path: file.0.clone(),
        },
    };
    let result = t.raft.install_full_snapshot(header.vote, snapshot).await;
    drop(file);
    result.map_or_else(engine_error, |r| ok(&r))
}

/// Why a snapshot's body was not kept.
enum Received {
    /// This node could not write it.
    Io(std::io::Error),
    /// The body is not what its header announced (cut short, or longer).
    Bad(String),
}

/// Writes the rest of `body`, which must be exactly `len` bytes, to `path`.
async fn write_body<S, B>(body: &mut BodyReader<S>, path: &Path, len: u64) -> Result<(), Received>
where
    S: Stream<Item = Result<B, warp::Error>> + Send,
    B: Buf,
{
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(Received::Io)?;
    }
    let file = tokio::fs::File::create(path).await.map_err(Received::Io)?;
    let mut out = tokio::io::BufWriter::with_capacity(256 << 10, file);
    let mut written = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            Received::Bad(format!(
                "the snapshot's body ended after {written} of its {len} bytes: {e}"
            ))
        })?;
        written += chunk.len() as u64;
        if written > len {
            return Err(Received::Bad(format!(
                "the snapshot's body runs past the {len} bytes its header announced"
            )));
        }
        out.write_all(&chunk).await.map_err(Received::Io)?;
    }
    if written != len {
        return Err(Received::Bad(format!(
            "the snapshot's body ended after {written} of its {len} bytes"
        )));
    }
    out.flush().await.map_err(Received::Io)?;
    Ok(())
}

/// Reads at most `limit` bytes of body.
async fn read_body<S, B>(stream: S, limit: usize) -> Result<Bytes, Reply>
where
    S: futures_util::Stream<Item = Result<B, warp::Error>>,
    B: bytes::Buf,
{
    let mut stream = std::pin::pin!(stream);
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        let mut chunk = chunk.map_err(|e| {
            problem(
                400,
                "bad_request",
                "Malformed request",
                format!("reading the body: {e}"),
            )
        })?;
        while chunk.has_remaining() {
            let part = chunk.chunk();
            if body.len() + part.len() > limit {
                return Err(problem(
                    413,
                    "payload_too_large",
                    "Request body too large",
                    format!("a body on this route is limited to {limit} bytes"),
                ));
            }
            body.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(Bytes::from(body))
}
