//! The Raft transport's server side: the routes of the Raft listener (`--raft-listen`),
//! away from the public API's port, its admission limit, its rate limit and its API keys
//! (docs/REPLICATION.md, "Transport between nodes"; the wire format is `net`'s).
//!
//! Every request must carry the cluster key (header `Stockd-Cluster-Key`, compared in
//! constant time); without it, or with another, the answer is 401 and nothing is read
//! or done. Errors are problem+json, as the public API's.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::Serialize;
use warp::http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use warp::Filter;

use super::net::{self, SnapshotRequest, KEY_HEADER, RPC_BYTES_MAX, SNAPSHOT_BYTES_MAX};
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
    incoming: PathBuf,
) -> impl Filter<Extract = (Reply,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    let id = {
        use openraft::async_runtime::WatchReceiver;
        raft.metrics().borrow_watched().id
    };
    let transport = Arc::new(Transport {
        raft,
        id,
        key,
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
    let limit = if rpc == net::SNAPSHOT {
        SNAPSHOT_BYTES_MAX + 4096
    } else {
        RPC_BYTES_MAX
    };
    let body = match read_body(body, limit).await {
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
        net::TRANSFER_LEADER => match net::decode(&body) {
            Ok(req) => raft
                .handle_transfer_leader(req)
                .await
                .map_or_else(engine_error, |r| ok(&r)),
            Err(err) => bad_body(err),
        },
        _ => match net::decode::<SnapshotRequest>(&body) {
            Ok(req) if from_myself(t, &req.vote) => own_name(),
            Ok(req) => install(t, req).await,
            Err(err) => bad_body(err),
        },
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

/// Writes a received snapshot to a file of its own, verifies it (a damaged one is 400 and
/// nothing is done), has the engine install it (the state machine loads it with the
/// verified loader, checks it against its metadata and keeps its own copy), then removes
/// the file.
async fn install(t: &Transport, req: SnapshotRequest) -> Reply {
    let n = t.received.fetch_add(1, Ordering::Relaxed);
    let path = t
        .incoming
        .join(format!("received-{}-{n}.snapshot", std::process::id()));
    let dir = t.incoming.clone();
    let written = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::create_dir_all(&dir)?;
            std::fs::write(&path, &req.data)
        })
        .await
    };
    if let Err(err) = written
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
    {
        let _ = tokio::fs::remove_file(&path).await;
        return engine_error(format!(
            "cannot keep the received snapshot in {}: {err}",
            path.display()
        ));
    }
    // A damaged file never reaches the engine, which would stop on a snapshot its state
    // machine cannot install: its header and checksum are verified first.
    let verified = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || snapshot::verify(&path).map_err(|e| e.to_string()))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
    };
    if let Err(err) = verified {
        let _ = tokio::fs::remove_file(&path).await;
        return bad_body(format!("the snapshot does not verify: {err}"));
    }
    let snapshot = Snapshot {
        meta: req.meta,
        snapshot: SnapshotFile { path: path.clone() },
    };
    let result = t.raft.install_full_snapshot(req.vote, snapshot).await;
    let _ = tokio::fs::remove_file(&path).await;
    result.map_or_else(engine_error, |r| ok(&r))
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
