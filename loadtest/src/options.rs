//! What a run is asked to do: the scenario, the server to load, the load's limits and
//! the scenario's sizes.

use std::path::PathBuf;

use crate::driver::Limits;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// GET /health only: the HTTP ceiling of this machine for this client.
    Ceiling,
    /// One hot SKU with stock S; every request reserves one unit.
    FlashSale,
    /// The flash sale with a purchase limit on the hot SKU: half the requests from a few
    /// greedy buyers, half from buyers who ask once; verified: nobody above the limit.
    Limits,
    /// A shopper mix over a Zipf-skewed catalogue: reads, reserve then confirm / cancel /
    /// abandon, replenishments; verified by per-SKU conservation.
    Checkout,
    /// The checkout mix while the server is killed with SIGKILL and restarted.
    Crash,
    /// The flash sale on a three-node cluster it starts, its leader killed with SIGKILL
    /// mid-run; verified: every acknowledged hold on the new leader, each once.
    Failover,
    /// The flash sale on a three-node cluster it starts, alternated with the flash sale on
    /// one node (sync): the cluster's throughput as a ratio to one node's.
    Cluster,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Ceiling => "ceiling",
            Scenario::FlashSale => "flash-sale",
            Scenario::Limits => "limits",
            Scenario::Checkout => "checkout",
            Scenario::Crash => "crash",
            Scenario::Failover => "failover",
            Scenario::Cluster => "cluster",
        }
    }
}

/// Which server to load.
#[derive(Debug, Clone)]
pub enum Target {
    /// Start this `stockd` binary on a free loopback port with a fresh data directory.
    Spawn { stockd: PathBuf, durability: String },
    /// A server already running (loopback only: see `check_loopback`).
    Url(String),
}

#[derive(Debug, Clone)]
pub struct Options {
    pub scenario: Scenario,
    pub target: Target,
    pub limits: Limits,
    /// Units of the hot SKU (flash-sale), or of each SKU (checkout).
    pub stock: u64,
    /// SKUs in the catalogue (checkout).
    pub catalogue: usize,
    /// TTL of the reservations shoppers abandon (checkout).
    pub abandon_ttl_seconds: u64,
    /// Flash-sale and checkout: the scenario's duration (and request budget) is split into
    /// this many phases, alternating with ceiling phases of the same length.
    pub rounds: usize,
    /// The hot SKU's `max_per_customer` (limits).
    pub max_per_customer: u64,
    /// Sent as `Authorization: Bearer` on every request (a server with API keys); needs
    /// the `admin` scope, or `stock`, `reserve` and `read` (the scenarios create products).
    pub api_key: Option<String>,
    /// Follow the change feed live during the run and report how far behind it fell
    /// (`crate::follow`).
    pub follow_events: bool,
}
