//! Server configuration, with the embedded defaults of `stockd` without flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::clock::{SharedClock, SystemClock};
use crate::limits::TTL_SECONDS_DEFAULT;

/// When a mutation is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// A 2xx means the change's log record is flushed (the default).
    Sync,
    /// A 2xx is sent once the record is queued; it is flushed within one group commit
    /// (milliseconds) afterwards. A crash in that window loses acknowledged changes.
    Async,
}

#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub snapshot_dir: PathBuf,
    pub default_ttl_seconds: u64,
    pub durability: Durability,
    pub clock: SharedClock,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./data"),
            snapshot_dir: PathBuf::from("./snapshots"),
            default_ttl_seconds: TTL_SECONDS_DEFAULT,
            durability: Durability::Sync,
            clock: Arc::new(SystemClock),
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("snapshot_dir", &self.snapshot_dir)
            .field("default_ttl_seconds", &self.default_ttl_seconds)
            .field("durability", &self.durability)
            .finish()
    }
}
