//! A cluster node's settings (`--node-id`, `--peers`, `--raft-listen`, the cluster key),
//! parsed and checked before the server opens anything (docs/REPLICATION.md, "HTTP
//! surface, flags and settings").

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;

use super::NodeId;

/// The shortest cluster key accepted, in bytes.
pub const CLUSTER_KEY_MIN_BYTES: usize = 16;

/// The secret every Raft request carries (header `Stockd-Cluster-Key`). Its `Debug` never
/// shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey(String);

impl ClusterKey {
    /// A key: at least `CLUSTER_KEY_MIN_BYTES` bytes of visible ASCII (it travels in a
    /// header), no spaces.
    pub fn new(key: &str) -> Result<ClusterKey, String> {
        if key.len() < CLUSTER_KEY_MIN_BYTES {
            return Err(format!(
                "the cluster key is too short: at least {CLUSTER_KEY_MIN_BYTES} characters"
            ));
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "the cluster key must be visible ASCII characters, without spaces".to_string(),
            );
        }
        Ok(ClusterKey(key.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `given` is this key, compared in constant time.
    pub fn matches(&self, given: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        // Lengths are not secret (the minimum is documented); the bytes are.
        self.0.len() == given.len() && bool::from(self.0.as_bytes().ct_eq(given))
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

/// One member as `--peers` names it: its public API's and its Raft listener's addresses,
/// `HOST:PORT` each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub api: String,
    pub raft: String,
}

/// What a cluster node starts with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// This node's id (`--node-id`), one of `peers`.
    pub node_id: NodeId,
    /// Every voter of the cluster, this node included (`--peers`): the membership a node
    /// not yet initialized starts the cluster with.
    pub peers: BTreeMap<NodeId, Peer>,
    /// Where the Raft listener binds (`--raft-listen`; by default this node's Raft address
    /// in `peers`).
    pub raft_listen: SocketAddr,
    pub key: ClusterKey,
    /// `--join`: this node joins a running cluster (added through the admin API) and
    /// never initializes one, even with the lowest id in `peers`.
    pub join: bool,
}

/// The flags as given, before they are checked.
#[derive(Clone, Debug, Default)]
pub struct Flags {
    pub node_id: Option<NodeId>,
    pub peers: Option<String>,
    pub raft_listen: Option<SocketAddr>,
    /// The cluster key, and where it came from (for messages).
    pub key: Option<(String, String)>,
    /// `--durability async` was asked for.
    pub durability_async: bool,
    /// `--join` was given.
    pub join: bool,
}

/// Checks `HOST:PORT`: a host, and a port from 1 to 65535. The error says what is wrong.
/// (`--peers` and the membership changes of the admin API check addresses with it.)
pub fn host_port(value: &str) -> Result<(), &'static str> {
    let (host, port) = value.rsplit_once(':').ok_or("no port")?;
    if host.is_empty() {
        return Err("no host");
    }
    if host.contains(['/', '@', ',', '=', ' ']) || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the host holds a character an address cannot");
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err("the port must be 1 to 65535"),
        Ok(_) => Ok(()),
    }
}

/// Checks one of `--peers`' addresses (`host_port`).
fn address(what: &str, id: NodeId, value: &str) -> Result<String, String> {
    host_port(value).map_err(|why| {
        format!("--peers: node {id}'s {what} address {value:?} is not HOST:PORT ({why})")
    })?;
    Ok(value.to_string())
}

/// Parses `--peers`: `ID=API@RAFT` separated by commas, ids from 1, no id or address
/// twice.
pub fn parse_peers(value: &str) -> Result<BTreeMap<NodeId, Peer>, String> {
    let mut peers = BTreeMap::new();
    let mut addresses = BTreeSet::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bad = |why: &str| format!("--peers: {item:?} is not ID=API@RAFT ({why})");
        let (id, addrs) = item.split_once('=').ok_or_else(|| bad("no '='"))?;
        let id: NodeId = id
            .trim()
            .parse()
            .map_err(|_| bad("the id is not a whole number"))?;
        if id == 0 {
            return Err(bad("node ids start at 1"));
        }
        let (api, raft) = addrs.split_once('@').ok_or_else(|| bad("no '@'"))?;
        let peer = Peer {
            api: address("API", id, api.trim())?,
            raft: address("Raft", id, raft.trim())?,
        };
        for addr in [&peer.api, &peer.raft] {
            if !addresses.insert(addr.clone()) {
                return Err(format!("--peers: the address {addr} is named twice"));
            }
        }
        if peers.insert(id, peer).is_some() {
            return Err(format!("--peers: node {id} is named twice"));
        }
    }
    if peers.is_empty() {
        return Err("--peers names no node".to_string());
    }
    Ok(peers)
}

/// The settings of a cluster node, or `None` for a single server (no cluster flag at all).
/// Every mistake is refused with a message naming the flag.
pub fn settings(flags: Flags) -> Result<Option<Settings>, String> {
    let Some(peers) = flags.peers.as_deref() else {
        let stray = [
            (flags.node_id.is_some(), "--node-id"),
            (flags.raft_listen.is_some(), "--raft-listen"),
            (flags.join, "--join"),
        ];
        if let Some((_, flag)) = stray.iter().find(|(given, _)| *given) {
            return Err(format!("{flag} needs --peers (it is a cluster flag)"));
        }
        return Ok(None);
    };
    let peers = parse_peers(peers)?;
    let node_id = flags
        .node_id
        .ok_or("--peers needs --node-id: which of the peers this node is")?;
    let me = peers.get(&node_id).ok_or_else(|| {
        let ids: Vec<String> = peers.keys().map(|id| id.to_string()).collect();
        format!(
            "--node-id {node_id} is not among --peers (ids {})",
            ids.join(", ")
        )
    })?;
    if flags.durability_async {
        return Err(
            "--durability async cannot be used with --peers: a cluster acknowledges a change \
             once a majority has flushed it (always sync)"
                .to_string(),
        );
    }
    let raft_listen = match flags.raft_listen {
        Some(addr) => addr,
        None => me.raft.parse().map_err(|_| {
            format!(
                "--raft-listen is needed: node {node_id}'s Raft address {} is not an IP \
                 address and port to bind",
                me.raft
            )
        })?,
    };
    let (key, source) = flags.key.ok_or(
        "--peers needs a cluster key: --cluster-key-file PATH or the environment variable \
         STOCKD_CLUSTER_KEY (the same on every node)",
    )?;
    let key = ClusterKey::new(&key).map_err(|err| format!("{err} ({source})"))?;
    Ok(Some(Settings {
        node_id,
        peers,
        raft_listen,
        key,
        join: flags.join,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEERS: &str = "1=127.0.0.1:8001@127.0.0.1:9001,2=127.0.0.1:8002@127.0.0.1:9002,\
                         3=127.0.0.1:8003@127.0.0.1:9003";

    fn flags() -> Flags {
        Flags {
            node_id: Some(2),
            peers: Some(PEERS.to_string()),
            raft_listen: None,
            key: Some(("a-cluster-key-of-32-characters..".into(), "test".into())),
            durability_async: false,
            join: false,
        }
    }

    fn refused(flags: Flags, says: &str) {
        let err = settings(flags).expect_err("refused");
        assert!(err.contains(says), "{err:?} does not say {says:?}");
    }

    #[test]
    fn no_cluster_flag_is_a_single_server() {
        assert_eq!(settings(Flags::default()), Ok(None));
        // A key alone (from the environment, say) makes no cluster either.
        let key = Flags {
            key: Some(("a-cluster-key-of-32-characters..".into(), "test".into())),
            ..Flags::default()
        };
        assert_eq!(settings(key), Ok(None));
    }

    #[test]
    fn a_complete_set_of_flags_is_a_cluster_node() {
        let s = settings(flags()).unwrap().unwrap();
        assert_eq!(s.node_id, 2);
        assert_eq!(s.peers.len(), 3);
        assert_eq!(s.peers[&3].api, "127.0.0.1:8003");
        assert_eq!(s.peers[&3].raft, "127.0.0.1:9003");
        // The Raft listener defaults to this node's Raft address.
        assert_eq!(s.raft_listen, "127.0.0.1:9002".parse().unwrap());
        let given = Flags {
            raft_listen: Some("0.0.0.0:7000".parse().unwrap()),
            ..flags()
        };
        let s = settings(given).unwrap().unwrap();
        assert_eq!(s.raft_listen, "0.0.0.0:7000".parse().unwrap());
        assert_eq!(format!("{:?}", s.key), "ClusterKey(..)");
        assert!(!s.join);
        let joining = Flags {
            join: true,
            ..flags()
        };
        assert!(settings(joining).unwrap().unwrap().join);
    }

    #[test]
    fn cluster_flags_without_peers_are_refused() {
        let node = Flags {
            node_id: Some(1),
            ..Flags::default()
        };
        refused(node, "--node-id needs --peers");
        let listen = Flags {
            raft_listen: Some("127.0.0.1:9000".parse().unwrap()),
            ..Flags::default()
        };
        refused(listen, "--raft-listen needs --peers");
        let join = Flags {
            join: true,
            ..Flags::default()
        };
        refused(join, "--join needs --peers");
    }

    #[test]
    fn peers_without_a_node_id_or_not_naming_it_are_refused() {
        refused(
            Flags {
                node_id: None,
                ..flags()
            },
            "--peers needs --node-id",
        );
        refused(
            Flags {
                node_id: Some(4),
                ..flags()
            },
            "--node-id 4 is not among --peers (ids 1, 2, 3)",
        );
    }

    #[test]
    fn duplicate_ids_or_addresses_are_refused() {
        let twice = |peers: &str| Flags {
            peers: Some(peers.to_string()),
            node_id: Some(1),
            ..flags()
        };
        refused(twice("1=a:1@a:2,1=b:1@b:2"), "node 1 is named twice");
        refused(
            twice("1=a:1@a:2,2=a:1@b:2"),
            "the address a:1 is named twice",
        );
        refused(
            twice("1=a:1@a:2,2=b:1@a:2"),
            "the address a:2 is named twice",
        );
        refused(twice("1=a:1@a:1"), "the address a:1 is named twice");
    }

    #[test]
    fn malformed_peers_are_refused() {
        for (peers, says) in [
            ("", "names no node"),
            ("1", "no '='"),
            ("x=a:1@a:2", "not a whole number"),
            ("0=a:1@a:2", "node ids start at 1"),
            ("1=a:1", "no '@'"),
            ("1=a@a:2", "no port"),
            ("1=:1@a:2", "no host"),
            ("1=a:0@a:2", "the port must be 1 to 65535"),
            ("1=a:1@a:99999", "the port must be 1 to 65535"),
        ] {
            refused(
                Flags {
                    peers: Some(peers.to_string()),
                    node_id: Some(1),
                    ..flags()
                },
                says,
            );
        }
    }

    #[test]
    fn async_durability_and_a_missing_or_weak_key_are_refused() {
        refused(
            Flags {
                durability_async: true,
                ..flags()
            },
            "--durability async cannot be used with --peers",
        );
        refused(
            Flags {
                key: None,
                ..flags()
            },
            "--peers needs a cluster key",
        );
        refused(
            Flags {
                key: Some(("short".into(), "in FILE".into())),
                ..flags()
            },
            "too short",
        );
        refused(
            Flags {
                key: Some(("a key with spaces in it, long".into(), "in FILE".into())),
                ..flags()
            },
            "without spaces",
        );
    }

    #[test]
    fn a_raft_address_that_is_no_socket_address_needs_raft_listen() {
        let named = Flags {
            peers: Some("1=node1:8000@node1:9000".into()),
            node_id: Some(1),
            ..flags()
        };
        refused(named.clone(), "--raft-listen is needed");
        let given = Flags {
            raft_listen: Some("0.0.0.0:9000".parse().unwrap()),
            ..named
        };
        assert!(settings(given).unwrap().is_some());
    }

    #[test]
    fn keys_compare_whole() {
        let key = ClusterKey::new("0123456789abcdef").unwrap();
        assert!(key.matches(b"0123456789abcdef"));
        assert!(!key.matches(b"0123456789abcdeF"));
        assert!(!key.matches(b"0123456789abcde"));
        assert!(!key.matches(b"0123456789abcdef0"));
        assert!(!key.matches(b""));
    }
}
