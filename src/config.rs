//! Server configuration, with the embedded defaults of `stockd` without flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use std::time::Duration;

use crate::clock::{SharedClock, SystemClock};
pub use crate::http::rate::CustomerRate;
pub use crate::keyring::AdminKey;
use crate::limits::{
    PASSIVATE_AFTER_SECONDS_DEFAULT, RETENTION_SECONDS_DEFAULT, TTL_SECONDS_DEFAULT,
};
use crate::storage::snapshot::WriteHooks;
use crate::storage::snapshotter::SnapshotPolicy;
pub use crate::storage::Durability;

/// The address `stockd` serves on without `--listen`.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:8080";
/// The data directory without `--data-dir` (the log lives in `DIR/log`).
pub const DATA_DIR_DEFAULT: &str = "./data";
/// The snapshot directory without `--snapshot-dir`.
pub const SNAPSHOT_DIR_DEFAULT: &str = "./snapshots";

#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub snapshot_dir: PathBuf,
    pub default_ttl_seconds: u64,
    pub durability: Durability,
    pub clock: SharedClock,
    pub snapshots: SnapshotPolicy,
    /// A product actor idle this long is passivated (`None`: never).
    pub passivate_after: Option<Duration>,
    /// How long ended reservations and idempotency keys are remembered.
    pub retention: Duration,
    /// Start even if a log record is damaged, by removing it and every later record (the
    /// operator's explicit choice; the default refuses to start and names the record).
    pub truncate_damaged_log: bool,
    /// Reservation attempts per customer (`--customer-rate`, `--customer-burst`); `None`:
    /// no limit.
    pub customer_rate: Option<CustomerRate>,
    /// The bootstrap admin key (`--admin-key-file`, `STOCKD_ADMIN_KEY`): a valid `admin`
    /// bearer secret, never stored. `None`: authentication is on only if the log holds
    /// keys, and a server without keys may serve only on a loopback address
    /// (`crate::keyring`).
    pub admin_key: Option<AdminKey>,
    /// The `stockd` binary that builds snapshots in a child process, so that the second
    /// copy of the state a snapshot needs never lives in the server
    /// (`crate::storage::snapshot_worker`). `None` builds them in this process: a library user (or a
    /// test) has no `stockd` binary to start. The binary sets its own path.
    pub snapshot_worker: Option<PathBuf>,
    /// The change feed's retention (`--events-retention-seconds`, `--events-max-bytes`);
    /// `None` turns the feed off (`--events off`): no projector, no store, and
    /// `GET /v1/events` answers 404 `events_disabled`.
    pub events: Option<crate::feed::Retention>,
    /// When webhook deliveries time out, are retried and given up (`--webhook-*`).
    /// Webhooks need the change feed: with `events` off nothing is delivered.
    pub webhooks: crate::webhooks::Schedule,
    /// A PEM file of certificates trusted for https webhook endpoints beside the webpki
    /// roots (`--webhook-ca-file`): a shop's own CA. Read and checked at start-up, before
    /// recovery; a file that is missing or holds no certificate stops start-up.
    pub webhook_ca_file: Option<PathBuf>,
    /// A cluster node's settings (`--node-id`, `--peers`, `--raft-listen`, the cluster
    /// key); `None`: a single server, which constructs nothing of a cluster.
    pub cluster: Option<crate::cluster::settings::Settings>,
    /// Test hooks for snapshot writing.
    #[doc(hidden)]
    pub snapshot_hooks: WriteHooks,
    /// Records per log segment (tests use small ones to see truncation).
    #[doc(hidden)]
    pub log_segment_records: u64,
    /// Test hook: log writes fail from the record with this sequence on, as if the disk
    /// refused them (`LogHandle::inject_write_failure_from`).
    #[doc(hidden)]
    pub log_fail_from_seq: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: LISTEN_DEFAULT.parse().expect("the default address parses"),
            data_dir: PathBuf::from(DATA_DIR_DEFAULT),
            snapshot_dir: PathBuf::from(SNAPSHOT_DIR_DEFAULT),
            default_ttl_seconds: TTL_SECONDS_DEFAULT,
            durability: Durability::Sync,
            clock: Arc::new(SystemClock),
            snapshots: SnapshotPolicy::default(),
            passivate_after: Some(Duration::from_secs(PASSIVATE_AFTER_SECONDS_DEFAULT)),
            retention: Duration::from_secs(RETENTION_SECONDS_DEFAULT),
            truncate_damaged_log: false,
            customer_rate: None,
            admin_key: None,
            snapshot_worker: None,
            // Off unless asked for: the feed's shadow copy of the products would take a
            // million-product catalogue past 1 GB (docs/PERFORMANCE.md).
            events: None,
            webhooks: crate::webhooks::Schedule::default(),
            webhook_ca_file: None,
            snapshot_hooks: WriteHooks::default(),
            log_segment_records: crate::storage::log::SEGMENT_RECORDS_DEFAULT,
            log_fail_from_seq: None,
            cluster: None,
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
            .field("snapshots", &self.snapshots)
            .field("passivate_after", &self.passivate_after)
            .field("retention", &self.retention)
            .field("truncate_damaged_log", &self.truncate_damaged_log)
            .field("customer_rate", &self.customer_rate)
            .field("admin_key", &self.admin_key)
            .field("snapshot_worker", &self.snapshot_worker)
            .field("events", &self.events)
            .field("webhooks", &self.webhooks)
            .field("webhook_ca_file", &self.webhook_ca_file)
            .field("cluster", &self.cluster)
            .field("log_segment_records", &self.log_segment_records)
            .finish()
    }
}
