//! The seams of replication (docs/REPLICATION.md): what the rest of the server appends
//! through (`Journal`), the node's role in a cluster (`Role`) and what `GET /v1/cluster`
//! tells about it (`Status`).
//!
//! A server without `--peers` is a single node: the journal is the local write-ahead log,
//! the role is always `Role::Single`. A cluster node's journal is its leader's epoch's
//! (`Journal::Raft`, the `proposer`) while it serves, and refuses every record otherwise;
//! its role follows the engine. The cluster's engine (openraft) lives in this module and
//! nowhere else, behind these same types, so that the supervisor, the product actors, the
//! service, the keyring and HTTP keep calling what they always called, and the epochs of
//! a serving leader (`crate::leadership`, a layer above) reach the engine only through
//! `node::ClusterNode`. What is here: the engine's types and their conversions to
//! stockd's own (`types`), its log storage over the write-ahead log
//! (`log_store::ClusterLog`), its state machine (`state_machine::StockSm`, which folds
//! every committed entry, and on a leader lends its state to the epoch and rebuilds it
//! when the epoch ends), a leader's proposals (`proposer`), the
//! node (`node`: the engine started with the flags of `settings`, its metrics made a
//! `Role` and a `Status`), the Raft transport over HTTP, client (`net`) and server
//! (`transport`), the cluster id every Raft message names (`cluster_id`), and tests against
//! the engine's storage suite and as an in-process
//! three-node cluster (`tests`). A server started with `--peers` builds these; one
//! without builds none of them.
//!
//! Layer: between `storage`/`feed` and `actors`. It imports only from those below it.

pub mod cluster_id;
pub mod journal;
pub mod log_store;
pub mod membership;
pub mod net;
pub mod node;
pub mod proposer;
pub mod role;
pub mod settings;
pub mod state_machine;
#[cfg(test)]
mod tests;
pub mod transport;
pub mod types;

pub use journal::Journal;
pub use role::{NodeId, Role, SINGLE_NODE_ID};

use serde::Serialize;

/// One member of the cluster as `GET /v1/cluster` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Member {
    pub id: NodeId,
    /// The address its public API serves on, `HOST:PORT` as it was bound (or, in a
    /// cluster, as `--peers` names it).
    pub api: String,
    /// The address of its Raft listener (`None`: a single node has none).
    pub raft: Option<String>,
    /// A voter (counts toward a majority) rather than a learner. A single node votes.
    pub voter: bool,
}

/// What `GET /v1/cluster` answers, for any role. Positions are log sequence numbers, the
/// numbering every other answer of the API uses (events' `seq`, a snapshot's `sequence`):
/// 0 means "none".
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Status {
    /// A cluster node's: the id of its cluster (`Some(None)`, shown as `null`: none yet,
    /// a new node no leader has reached). A single node has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<Option<String>>,
    pub node_id: NodeId,
    pub role: &'static str,
    /// The Raft term this node knows (0: no election ever happened, as on a single node).
    pub term: u64,
    /// The node that accepts changes now (`None`: none known). A single node is its own.
    pub leader: Option<NodeId>,
    pub members: Vec<Member>,
    /// The last record this node holds in its log, flushed or not.
    pub last_seq: u64,
    /// The last record flushed to this node's disk.
    pub durable_seq: u64,
    /// The last record this node knows to be committed (on a single node: durable).
    pub committed_seq: u64,
    /// The last record folded into the state this node serves from.
    pub applied_seq: u64,
    /// The record the newest snapshot covers (0: none yet).
    pub snapshot_seq: u64,
    /// A cluster node's further figures (none on a single node): what a majority has
    /// flushed, as the leader knows it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_committed_seq: Option<u64>,
    /// A cluster node's: the last entry purged from its log (0: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purged_seq: Option<u64>,
    /// The leader's: milliseconds since a majority last acknowledged it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub millis_since_quorum_ack: Option<u64>,
    /// The leader's: the last entry known to be on each voter's log, by node id (0: none
    /// yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replication: Option<std::collections::BTreeMap<NodeId, u64>>,
}

impl Status {
    /// The status of a single node (no `--peers`): it leads itself, and everything its log
    /// has flushed is committed and applied.
    pub fn single(api: String, journal: &Journal, snapshot_seq: u64) -> Status {
        let durable = journal.durable_seq();
        Status {
            cluster_id: None,
            node_id: SINGLE_NODE_ID,
            role: Role::Single.as_str(),
            term: 0,
            leader: Some(SINGLE_NODE_ID),
            members: vec![Member {
                id: SINGLE_NODE_ID,
                api,
                raft: None,
                voter: true,
            }],
            last_seq: durable,
            durable_seq: durable,
            committed_seq: durable,
            applied_seq: durable,
            snapshot_seq,
            cluster_committed_seq: None,
            purged_seq: None,
            millis_since_quorum_ack: None,
            replication: None,
        }
    }
}
