//! Raft entries as stockd stores and folds them (docs/REPLICATION.md, "The epoch chain"),
//! without the engine's types: `src/cluster/` converts between these and openraft's, so the
//! storage layer, snapshots and the fold never depend on the engine's API.
//!
//! Positions here are log sequence numbers (`seq`, from 1), as everywhere in storage; the
//! engine's index is `seq - 1`, and only `src/cluster/` converts.
//!
//! A leader numbers its proposals within an *epoch* (its term, and a counter `k` that grows
//! each time the leader starts afresh within one term after a refused proposal): `n` = 1,
//! 2, 3… The fold applies a proposal only if it continues its epoch's chain (`n ==
//! next_n`) or opens a newer epoch (`n == 1`, epoch greater than the chain's); anything
//! else is skipped, on every node alike. So whatever proposals the engine refuses, the
//! folded log is a prefix of each epoch's proposals, and every prefix of the log keeps
//! invariants 1, 3 and 6 (docs/ARCHITECTURE.md) as a single node's log does.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::clock::Millis;
use crate::storage::record::Record;

/// A node's id in its cluster.
pub type NodeId = u64;

/// A leadership's place in the log: its term, then `k`, the fresh starts within the term.
/// Ordered by term, then `k`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Epoch {
    pub term: u64,
    pub k: u32,
}

/// An entry's place: the term it was appended in, and its log sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LogPos {
    pub term: u64,
    pub seq: u64,
}

/// A node's addresses, as `--peers` names them (`HOST:PORT`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddr {
    pub api: String,
    pub raft: String,
}

/// The cluster's members: one set of voters, or two during a joint change; every node
/// (voters and learners) with its addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub configs: Vec<BTreeSet<NodeId>>,
    pub nodes: BTreeMap<NodeId, NodeAddr>,
}

/// The membership in force, and the entry that set it (`None`: none yet).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMembership {
    pub pos: Option<LogPos>,
    pub membership: Membership,
}

/// Where the chain of proposals stands: the newest epoch that applied one, and the `n`
/// its next proposal must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chain {
    pub epoch: Epoch,
    pub next_n: u64,
}

impl Default for Chain {
    fn default() -> Chain {
        Chain {
            epoch: Epoch::default(),
            next_n: 1,
        }
    }
}

impl Chain {
    /// Whether proposal `n` of `epoch` continues the chain (or opens a newer epoch).
    pub fn admits(&self, epoch: Epoch, n: u64) -> bool {
        if epoch == self.epoch {
            n == self.next_n
        } else {
            epoch > self.epoch && n == 1
        }
    }
}

/// What a replicated state knows beside the records' effects (`State::raft`; snapshot
/// format 3). `None` on a single node, whose snapshots stay format 2.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftMeta {
    /// The last entry folded (`None`: none yet).
    pub last_applied: Option<LogPos>,
    pub membership: StoredMembership,
    pub chain: Chain,
    /// The largest decision time (`Record::at`) of any record applied: a new leader's clock
    /// never runs behind it.
    pub clock_floor: Millis,
}

/// What an entry carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// The engine's blank entry (a new leader's first, or a poisoned epoch's end).
    Blank,
    /// Proposal `n` of `epoch`: one record.
    Normal {
        epoch: Epoch,
        n: u64,
        record: Record,
    },
    /// A membership change.
    Membership(Membership),
}

/// One Raft entry, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub pos: LogPos,
    pub payload: Payload,
}

/// What folding an entry did: what the leader's ticket for a proposal resolves by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Folded: a proposal that continued its epoch's chain, a membership entry, a blank.
    Applied,
    /// A proposal off the chain (one after a refused proposal of its epoch, or of an
    /// older epoch, or in an entry of another term), left out on every node alike.
    Skipped,
}
