//! The bundled load test for stockd.
//!
//! A load test for an inventory server must prove two things in one run: speed, and that
//! under that speed not one unit was oversold and not one acknowledged change was lost. So
//! every scenario ends by checking its own results against the server's state, and every
//! throughput is reported beside the HTTP ceiling of the same server, measured with the
//! same client and connections in the same invocation (this machine is noisy: only ratios
//! from one run mean anything).
//!
//! - `server`: a `stockd` child process on a free loopback port, stopped on drop (also the
//!   harness of stockd's integration tests and benches).
//! - `driver`: the closed-loop client (fixed connections, keep-alive) and its histogram.
//! - `options`: what a run is asked to do; `api`: the requests that set up and verify.
//! - `rounds`: ceiling phases, and a scenario's load in rounds between them.
//! - `scenarios`: `ceiling`, `flash-sale`, and `run`, which runs any scenario; `checkout`:
//!   the shopper mix; `crash`: the mix with a SIGKILL and a restart. Dependencies go one
//!   way: `scenarios` → `crash` → `checkout` → `rounds`, `api`, `options`.
//! - `cluster`: three `stockd` nodes on loopback, started and stopped by the run;
//!   `failover`: the flash sale while the cluster's leader is killed with SIGKILL;
//!   `cluster_ratio`: the cluster's flash sale against one node's, alternated.
//! - `follow`: `--follow-events`, a live reader of the change feed and its lag.
//! - `report`: the terminal table, Markdown and JSON; `chart`: the SVG chart.

pub mod api;
pub mod chart;
pub mod checkout;
pub mod cluster;
pub mod cluster_ratio;
pub mod crash;
pub mod driver;
pub mod failover;
pub mod follow;
pub mod limits;
pub mod options;
pub mod report;
pub mod rounds;
pub mod scenarios;
pub mod server;

pub use options::{Options, Scenario, Target};
pub use report::Report;
pub use scenarios::run;
