//! The engine's type configuration (`Tc`), and the one place where the engine's log ids,
//! votes, memberships and entries are converted to and from stockd's own
//! (`storage::entry`): storage, snapshots and the fold never name the engine
//! (docs/REPLICATION.md, "Types").
//!
//! Numbering: the engine's index `i` is log sequence `i + 1` (the engine starts at 0, the
//! log keeps 0 for "none"). The arithmetic is `log_store::{seq_of, index_of}`; every
//! conversion here goes through those two.

use std::collections::BTreeMap;
use std::fmt;
use std::io;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::storage::entry::{
    self, encode_blank, encode_membership, encode_proposal, Epoch, LogPos, NodeAddr, NodeId,
    Outcome, Payload,
};
use crate::storage::log::NewEntry;
use crate::storage::record;

use super::log_store::{index_of, seq_of};

openraft::declare_raft_types!(
    /// stockd's Raft types: a proposal per entry, `Outcome` per applied entry, standard
    /// Raft leader ids (one leader a term: a log id's committed leader is its term).
    pub Tc:
        D = Proposal,
        R = Outcome,
        NodeId = NodeId,
        Node = StockdNode,
        Term = u64,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, NodeId>,
);

/// The engine's names for what `Tc` makes of its generic types.
pub type LogId = openraft::type_config::alias::LogIdOf<Tc>;
pub type RaftVote = openraft::impls::Vote<openraft::impls::leader_id_std::LeaderId<u64, NodeId>>;
pub type RaftEntry = openraft::type_config::alias::EntryOf<Tc>;
pub type RaftMembership = openraft::Membership<NodeId, StockdNode>;
pub type RaftStoredMembership = openraft::type_config::alias::StoredMembershipOf<Tc>;

/// One proposal: a record exactly as `record::encode` made it (encoded once, on the
/// leader; every node stores and replicates those bytes), and its place in its epoch's
/// chain (docs/REPLICATION.md, "The epoch chain").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub epoch: Epoch,
    pub n: u64,
    pub record: Bytes,
}

impl fmt::Display for Proposal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "proposal {} of epoch ({}, {}), {} bytes",
            self.n,
            self.epoch.term,
            self.epoch.k,
            self.record.len()
        )
    }
}

/// A member's addresses, as the engine carries them in memberships (`entry::NodeAddr`
/// in storage). `Default` (empty addresses) only because the engine's test suite builds
/// memberships of nodes it does not name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockdNode {
    /// The public API's address, `HOST:PORT`.
    pub api: String,
    /// The Raft listener's address, `HOST:PORT`.
    pub raft: String,
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// An engine log id as a log position.
pub fn pos_of(log_id: &LogId) -> LogPos {
    LogPos {
        term: log_id.leader_id.term,
        seq: seq_of(log_id.index),
    }
}

/// A log position as an engine log id (`pos.seq` is at least 1: 0 means "none").
pub fn log_id_of(pos: LogPos) -> LogId {
    debug_assert!(pos.seq > 0, "sequence 0 is no entry");
    LogId::new_term_index(pos.term, index_of(pos.seq))
}

/// The engine's vote as stockd stores it.
pub fn vote_to_stored(vote: &RaftVote) -> entry::Vote {
    entry::Vote {
        term: vote.leader_id.term,
        voted_for: Some(vote.leader_id.voted_for),
        committed: vote.committed,
    }
}

/// A stored vote as the engine's. Standard Raft leader ids always name a node, so a
/// stored vote for nobody (which this module never writes) is refused.
pub fn vote_from_stored(vote: &entry::Vote) -> io::Result<RaftVote> {
    let node = vote.voted_for.ok_or_else(|| {
        invalid(format!(
            "the stored vote of term {} names no node",
            vote.term
        ))
    })?;
    Ok(match vote.committed {
        true => RaftVote::new_committed(vote.term, node),
        false => RaftVote::new(vote.term, node),
    })
}

/// The engine's membership as stockd stores it.
pub fn membership_to_stored(membership: &RaftMembership) -> entry::Membership {
    entry::Membership {
        configs: membership.get_joint_config().clone(),
        nodes: membership
            .nodes()
            .map(|(id, node)| {
                let addr = NodeAddr {
                    api: node.api.clone(),
                    raft: node.raft.clone(),
                };
                (*id, addr)
            })
            .collect(),
    }
}

/// A stored membership as the engine's (refused if a voter has no addresses: the engine
/// would refuse it too).
pub fn membership_from_stored(membership: &entry::Membership) -> io::Result<RaftMembership> {
    let nodes: BTreeMap<NodeId, StockdNode> = membership
        .nodes
        .iter()
        .map(|(id, addr)| {
            let node = StockdNode {
                api: addr.api.clone(),
                raft: addr.raft.clone(),
            };
            (*id, node)
        })
        .collect();
    RaftMembership::new(membership.configs.clone(), nodes)
        .map_err(|e| invalid(format!("a stored membership the engine refuses: {e}")))
}

/// A stored membership with its position as the engine's.
pub fn stored_membership_of(stored: &entry::StoredMembership) -> io::Result<RaftStoredMembership> {
    Ok(RaftStoredMembership::new(
        stored.pos.map(log_id_of),
        membership_from_stored(&stored.membership)?,
    ))
}

/// An engine entry as the log stores it: its term, and its payload encoded by
/// `storage::entry` (docs/REPLICATION.md, "Entries on disk").
pub fn new_entry(entry: &RaftEntry) -> NewEntry {
    let mut payload = Vec::new();
    match &entry.payload {
        openraft::EntryPayload::Blank => encode_blank(&mut payload),
        openraft::EntryPayload::Normal(proposal) => {
            encode_proposal(proposal.epoch, proposal.n, &proposal.record, &mut payload)
        }
        openraft::EntryPayload::Membership(membership) => {
            encode_membership(&membership_to_stored(membership), &mut payload)
        }
    }
    NewEntry {
        term: entry.log_id.leader_id.term,
        payload: Bytes::from(payload),
    }
}

/// A stored entry (decoded and verified by the log's reader) as the engine's. A
/// proposal's record is encoded again, in today's record format: within one format
/// `record::encode` is deterministic, so these are the bytes the leader encoded; a record
/// the leader encoded in an older format comes back in today's, with the same meaning
/// (the decoder converts old formats), so the bytes may differ but never what they fold
/// to.
pub fn raft_entry_of(stored: entry::Entry) -> io::Result<RaftEntry> {
    let payload = match stored.payload {
        Payload::Blank => openraft::EntryPayload::Blank,
        Payload::Normal { epoch, n, record } => openraft::EntryPayload::Normal(Proposal {
            epoch,
            n,
            record: Bytes::from(record::encode(&record)),
        }),
        Payload::Membership(membership) => {
            openraft::EntryPayload::Membership(membership_from_stored(&membership)?)
        }
    };
    Ok(openraft::Entry {
        log_id: log_id_of(stored.pos),
        payload,
    })
}

/// An engine entry as the fold takes it: a proposal's record decoded and verified by its
/// own checksum (a record that does not decode is an error: the entry is committed, and
/// every node would fail on the same bytes).
pub fn fold_entry_of(entry: RaftEntry) -> io::Result<entry::Entry> {
    let pos = pos_of(&entry.log_id);
    let payload = match entry.payload {
        openraft::EntryPayload::Blank => Payload::Blank,
        openraft::EntryPayload::Normal(proposal) => Payload::Normal {
            epoch: proposal.epoch,
            n: proposal.n,
            record: record::decode(&proposal.record).map_err(|e| {
                invalid(format!(
                    "the record of entry {} does not decode: {e}",
                    pos.seq
                ))
            })?,
        },
        openraft::EntryPayload::Membership(membership) => {
            Payload::Membership(membership_to_stored(&membership))
        }
    };
    Ok(entry::Entry { pos, payload })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::entry::loopback_membership;
    use crate::storage::record::Record;

    /// Index 0 is sequence 1, both ways; votes and memberships come back as they went.
    #[test]
    fn conversions_round_trip() {
        let id = LogId::new_term_index(4, 0);
        assert_eq!(pos_of(&id), LogPos { term: 4, seq: 1 });
        assert_eq!(log_id_of(pos_of(&id)), id);
        for vote in [RaftVote::new(7, 2), RaftVote::new_committed(7, 2)] {
            assert_eq!(vote_from_stored(&vote_to_stored(&vote)).unwrap(), vote);
        }
        let nobody = entry::Vote {
            term: 3,
            voted_for: None,
            committed: false,
        };
        assert!(vote_from_stored(&nobody).is_err());
        let stored = loopback_membership(3, &[&[1, 2], &[1, 2, 3]]);
        let raft = membership_from_stored(&stored).unwrap();
        assert_eq!(membership_to_stored(&raft), stored);
        let mut orphan = stored.clone();
        orphan.nodes.remove(&3);
        assert!(membership_from_stored(&orphan).is_err());
    }

    /// An entry stored, then read back by the log's own decoder, is the entry the engine
    /// gave, and the fold gets the record decoded.
    #[test]
    fn entries_round_trip_through_the_stored_encoding() {
        let record = Record::Replenished {
            sku: "A".into(),
            quantity: 2,
            at: 5,
            by: None,
        };
        let entry = openraft::Entry {
            log_id: LogId::new_term_index(3, 9),
            payload: openraft::EntryPayload::Normal(Proposal {
                epoch: Epoch { term: 3, k: 0 },
                n: 4,
                record: Bytes::from(record::encode(&record)),
            }),
        };
        let stored = new_entry(&entry);
        let crc = entry::frame_crc(stored.term, &stored.payload);
        let decoded = entry::decode_entry(10, stored.term, &stored.payload, crc).unwrap();
        assert_eq!(raft_entry_of(decoded).unwrap(), entry);
        let folded = fold_entry_of(entry).unwrap();
        assert_eq!(folded.pos, LogPos { term: 3, seq: 10 });
        assert_eq!(
            folded.payload,
            Payload::Normal {
                epoch: Epoch { term: 3, k: 0 },
                n: 4,
                record
            }
        );
    }
}
