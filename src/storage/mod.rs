//! Everything that reaches the disk, and the one fold that turns it back into state.
//!
//! - `record`: the log record type and its versioned, checksummed bincode codec.
//! - `fold`: `apply(state, record)`, the only place records become state (invariant 4 in
//!   docs/ARCHITECTURE.md).
//! - `log`: the write-ahead log over sled: one writer thread with group commit, segments,
//!   reading, the directory lock and truncation.
//! - `snapshot`: snapshot files (the state after log record S): write, verify, read, prune.
//! - `recovery`: the newest verifying snapshot plus the log after it, folded.
//! - `snapshotter`: the background thread that takes snapshots and truncates the log.
//! - `snapshot_worker`: the child process (`stockd snapshot-worker`) that builds a snapshot
//!   for a running server, and the server's side of that exchange.
//!
//! Nothing here knows about actors, the service or HTTP.

pub mod entry;
pub mod fold;
pub mod legacy;
pub mod log;
pub mod record;
pub mod recovery;
pub mod snapshot;
pub mod snapshot_worker;
pub mod snapshotter;

/// When a mutation is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// A 2xx means the change's log record is flushed (the default).
    Sync,
    /// A 2xx is sent once the record is queued; it is flushed within one group commit
    /// (milliseconds) afterwards. A crash in that window loses acknowledged changes.
    Async,
}

impl Durability {
    /// Its spelling on the command line (`sync`, `async`), also the one logs use.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Sync => "sync",
            Durability::Async => "async",
        }
    }
}
