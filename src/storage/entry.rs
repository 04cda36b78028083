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
use crate::storage::record::{self, DecodeError, Record};

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

/// A cluster node's vote, which the engine needs kept durably (`DIR/log/vote`): the term,
/// the node voted for in it, and whether the vote is committed (granted by a quorum: its
/// node leads that term). stockd's own type, like `LogPos`; `src/cluster/` converts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vote {
    pub term: u64,
    pub voted_for: Option<NodeId>,
    pub committed: bool,
}

/// What a replicated state knows beside the records' effects (`State::raft`; after the
/// state in snapshot format 4, as in format 3 before it). `None` on a single node.
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

/// What folding an entry did: what the leader's ticket for a proposal resolves by (and
/// the engine's response type, so it is serializable).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Folded: a proposal that continued its epoch's chain, a membership entry, a blank.
    Applied,
    /// A proposal off the chain (one after a refused proposal of its epoch, or of an
    /// older epoch, or in an entry of another term), left out on every node alike.
    Skipped,
}

/// First byte of a proposal's payload (`Payload::Normal`).
pub const PAYLOAD_PROPOSAL: u8 = 0xA0;
/// The payload of a blank entry: this byte alone.
pub const PAYLOAD_BLANK: u8 = 0xB0;
/// First byte of a membership entry's payload.
pub const PAYLOAD_MEMBERSHIP: u8 = 0xB1;
/// Bytes before a proposal's record: kind, epoch term, epoch k, n.
const PROPOSAL_HEADER_BYTES: usize = 1 + 8 + 4 + 8;

/// Appends the payload of proposal `n` of `epoch` to `out`, as a `0x82` batch frame stores
/// it (docs/REPLICATION.md, "Entries on disk"): `[0xA0][epoch.term u64 LE][epoch.k u32 LE]
/// [n u64 LE]` then `record` exactly as `record::encode` made it (encoded once, on the
/// leader; every node stores those bytes).
pub fn encode_proposal(epoch: Epoch, n: u64, record: &[u8], out: &mut Vec<u8>) {
    out.push(PAYLOAD_PROPOSAL);
    out.extend_from_slice(&epoch.term.to_le_bytes());
    out.extend_from_slice(&epoch.k.to_le_bytes());
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(record);
}

/// Appends the payload of a blank entry to `out`.
pub fn encode_blank(out: &mut Vec<u8>) {
    out.push(PAYLOAD_BLANK);
}

/// Appends the payload of a membership entry to `out`: `[0xB1]` then bincode 2 of it.
pub fn encode_membership(membership: &Membership, out: &mut Vec<u8>) {
    out.push(PAYLOAD_MEMBERSHIP);
    // Plain data into a Vec: no I/O, no size limit.
    bincode::serde::encode_into_std_write(membership, &mut *out, bincode::config::standard())
        .expect("encoding a membership into memory cannot fail");
}

/// The checksum a `0x82` frame stores beside its payload: over the entry's term and the
/// whole payload, which the record's own checksum does not cover (its epoch and number,
/// which decide what the fold does with it, and a membership).
pub fn frame_crc(term: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&term.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Decodes and verifies a stored entry: the frame's checksum (`stored_crc`, over `term`
/// and `payload`), then the payload by its kind (a proposal's record by its own checksum
/// too). Nothing is trusted before the frame's checksum matched.
pub fn decode_entry(
    seq: u64,
    term: u64,
    payload: &[u8],
    stored_crc: u32,
) -> Result<Entry, DecodeError> {
    if frame_crc(term, payload) != stored_crc {
        return Err(DecodeError::Checksum);
    }
    let pos = LogPos { term, seq };
    let payload = match payload.first() {
        None => return Err(DecodeError::Truncated(0)),
        Some(&PAYLOAD_PROPOSAL) => {
            let Some(header) = payload.get(..PROPOSAL_HEADER_BYTES) else {
                return Err(DecodeError::Truncated(payload.len()));
            };
            let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8"));
            let epoch = Epoch {
                term: u64_at(1),
                k: u32::from_le_bytes(header[9..13].try_into().expect("4 bytes")),
            };
            let record = record::decode(&payload[PROPOSAL_HEADER_BYTES..])?;
            Payload::Normal {
                epoch,
                n: u64_at(13),
                record,
            }
        }
        Some(&PAYLOAD_BLANK) if payload.len() == 1 => Payload::Blank,
        Some(&PAYLOAD_BLANK) => {
            return Err(DecodeError::Framing(format!(
                "a blank entry of {} bytes",
                payload.len()
            )))
        }
        Some(&PAYLOAD_MEMBERSHIP) => {
            let (membership, used) = bincode::serde::decode_from_slice::<Membership, _>(
                &payload[1..],
                bincode::config::standard(),
            )
            .map_err(|e| DecodeError::Payload(e.to_string()))?;
            if used != payload.len() - 1 {
                return Err(DecodeError::Payload(
                    "trailing bytes after the membership".into(),
                ));
            }
            Payload::Membership(membership)
        }
        Some(kind) => {
            return Err(DecodeError::Framing(format!(
                "unknown Raft entry kind {kind:#04x}"
            )))
        }
    };
    Ok(Entry { pos, payload })
}

/// A membership of nodes 1..=`nodes` on loopback (API port 8000 + id, Raft 9000 + id)
/// with these voter sets, one per config (tests).
#[cfg(test)]
pub(crate) fn loopback_membership(nodes: NodeId, configs: &[&[NodeId]]) -> Membership {
    Membership {
        configs: configs
            .iter()
            .map(|voters| voters.iter().copied().collect())
            .collect(),
        nodes: (1..=nodes)
            .map(|id| {
                let addr = NodeAddr {
                    api: format!("127.0.0.1:{}", 8000 + id),
                    raft: format!("127.0.0.1:{}", 9000 + id),
                };
                (id, addr)
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn membership() -> Membership {
        loopback_membership(3, &[&[1, 2, 3]])
    }

    fn record() -> Record {
        Record::Replenished {
            sku: "A".into(),
            quantity: 3,
            at: 17,
            by: None,
        }
    }

    /// Each kind of payload comes back as it went in, with its position.
    #[test]
    fn payloads_round_trip() {
        let epoch = Epoch { term: 7, k: 2 };
        let mut proposal = Vec::new();
        encode_proposal(epoch, 41, &record::encode(&record()), &mut proposal);
        let mut blank = Vec::new();
        encode_blank(&mut blank);
        let mut change = Vec::new();
        encode_membership(&membership(), &mut change);
        let cases = [
            (
                proposal,
                Payload::Normal {
                    epoch,
                    n: 41,
                    record: record(),
                },
            ),
            (blank, Payload::Blank),
            (change, Payload::Membership(membership())),
        ];
        for (i, (bytes, expected)) in cases.into_iter().enumerate() {
            let seq = 100 + i as u64;
            let entry = decode_entry(seq, 9, &bytes, frame_crc(9, &bytes)).unwrap();
            assert_eq!(entry.pos, LogPos { term: 9, seq });
            assert_eq!(entry.payload, expected);
        }
    }

    /// A flipped bit anywhere in the payload, or a different term, fails the frame's
    /// checksum (the epoch and number too, which the record's own checksum does not
    /// cover); a payload that verifies but is malformed is refused by kind.
    #[test]
    fn damage_and_malformed_payloads_are_refused() {
        let mut bytes = Vec::new();
        encode_proposal(
            Epoch { term: 3, k: 0 },
            5,
            &record::encode(&record()),
            &mut bytes,
        );
        let crc = frame_crc(3, &bytes);
        assert!(decode_entry(1, 3, &bytes, crc).is_ok());
        assert_eq!(decode_entry(1, 4, &bytes, crc), Err(DecodeError::Checksum));
        for at in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x10;
            assert_eq!(
                decode_entry(1, 3, &damaged, crc),
                Err(DecodeError::Checksum),
                "byte {at}"
            );
        }
        let refused = |payload: &[u8]| decode_entry(1, 3, payload, frame_crc(3, payload));
        assert_eq!(refused(&[]), Err(DecodeError::Truncated(0)));
        assert_eq!(refused(&bytes[..10]), Err(DecodeError::Truncated(10)));
        assert!(matches!(refused(&[0xB0, 0]), Err(DecodeError::Framing(_))));
        assert!(matches!(refused(&[0x81]), Err(DecodeError::Framing(_))));
        assert!(matches!(
            refused(&[0xB1, 0xff]),
            Err(DecodeError::Payload(_))
        ));
        let mut change = Vec::new();
        encode_membership(&membership(), &mut change);
        change.push(0);
        assert!(matches!(refused(&change), Err(DecodeError::Payload(_))));
        // A proposal whose record is damaged under a frame checksum that matches (the
        // checksum was made over the damaged bytes) is still caught by the record's own.
        let mut inner = bytes.clone();
        let last = inner.len() - 1;
        inner[last] ^= 0x01;
        assert_eq!(refused(&inner), Err(DecodeError::Checksum));
    }
}
