//! The node's role, published on a `tokio::sync::watch` channel: HTTP reads it for every
//! application request (only a node that serves them answers one), for `/health` and for
//! `GET /v1/cluster`. A single node's role is `Single` for its whole life.

pub use crate::storage::entry::NodeId;

/// The id a single node (no `--peers`) reports for itself.
pub const SINGLE_NODE_ID: NodeId = 1;

/// What this node is in its cluster (docs/REPLICATION.md, "Gaining and losing the
/// leadership").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A server without a cluster (no `--peers`): it decides and stores every change.
    Single,
    /// The cluster's leader; `ready` once it has folded everything committed before its
    /// term and expired what was overdue, and serves.
    Leader { ready: bool },
    /// A follower that knows its leader.
    Follower { leader: NodeId },
    /// No leader is known (an election is running, or there is no quorum).
    Leaderless,
}

impl Role {
    /// The role's name in `/health` and `GET /v1/cluster`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Single => "single",
            Role::Leader { .. } => "leader",
            Role::Follower { .. } => "follower",
            Role::Leaderless => "leaderless",
        }
    }

    /// Whether this node answers application requests (reads and changes) itself: a single
    /// node, or a leader that is ready. Any other node refuses them: a follower
    /// with a 307 to its leader, the others with 503.
    pub fn serves(&self) -> bool {
        matches!(self, Role::Single | Role::Leader { ready: true })
    }

    /// The leader this node knows of (`None`: none, or a single node, which leads itself).
    pub fn leader(&self, me: NodeId) -> Option<NodeId> {
        match self {
            Role::Single | Role::Leader { .. } => Some(me),
            Role::Follower { leader } => Some(*leader),
            Role::Leaderless => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_single_node_or_a_ready_leader_serves() {
        assert!(Role::Single.serves());
        assert!(Role::Leader { ready: true }.serves());
        assert!(!Role::Leader { ready: false }.serves());
        assert!(!Role::Follower { leader: 2 }.serves());
        assert!(!Role::Leaderless.serves());
    }

    #[test]
    fn names_and_leaders() {
        let roles = [
            (Role::Single, "single", Some(7)),
            (Role::Leader { ready: false }, "leader", Some(7)),
            (Role::Follower { leader: 3 }, "follower", Some(3)),
            (Role::Leaderless, "leaderless", None),
        ];
        for (role, name, leader) in roles {
            assert_eq!(role.as_str(), name);
            assert_eq!(role.leader(7), leader);
        }
    }
}
